//! Federation end to end: two and three regions, each with its own Kafka broker, its own
//! Redis and its own `dtfed` daemons, mirroring over QUIC with mutual TLS (certificates
//! made by `dtfed certs`). What a player sees: messages from every region, in per-origin
//! order, none lost and none twice — across link cuts, daemon crashes and broker restarts —
//! and a cursor that resumes in any region.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_regions::{WanProfile, WanRelay};
use dtfed_tests::harness::federation::{free_udp_port, make_certs};
use dtfed_tests::{ConfigBuilder, DtfedProcess, KafkaBroker, RedisServer, TestDir, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// Each test runs several Kafka brokers and daemons: on a 2-core machine they run one at a
/// time, whatever `--test-threads` says, so that timings stay those of one scenario.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PARTITIONS: i64 = 4;
/// The admin token of every region (drills and /status need it).
const DRILL_TOKEN: &str = "drill-token-0123456789";

/// One region of a test: its own Kafka, Redis, config, and QUIC port.
struct Region {
    name: String,
    kafka: KafkaBroker,
    /// Kept for the region's lifetime; stopped by its drop.
    _redis: RedisServer,
    cfg: ConfigBuilder,
    /// One QUIC port per daemon of the region.
    quic_ports: Vec<u16>,
    daemons: Vec<DtfedProcess>,
}

impl Region {
    fn ws(&self, i: usize, name: &str) -> String {
        self.daemons[i].ws_url_as(name)
    }
}

/// Starts the Kafka brokers and Redis servers of `names`, makes certificates, and returns
/// the regions with their configs for `daemons` daemons each (peers pointing at each
/// other's daemons, or at `via` when given: `via[(receiver, origin)]` is the address
/// `receiver` dials to reach `origin`).
fn federation(
    test: &str,
    names: &[&str],
    certs: &Path,
    via: &HashMap<(String, String), SocketAddr>,
    daemons: usize,
) -> Result<Vec<Region>> {
    make_certs(certs, names)?;
    let base = ConfigBuilder::new(test, names[0]);
    let mut regions: Vec<Region> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                s.spawn(move || -> Result<(String, KafkaBroker, RedisServer)> {
                    Ok((n.to_string(), KafkaBroker::start()?, RedisServer::start()?))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("start thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .map(|(name, kafka, redis)| -> Result<Region> {
        Ok(Region {
            cfg: base
                .for_region(&name)
                .kafka(&kafka.bootstrap())
                .redis(&redis.url())
                .partitions(PARTITIONS)
                .unthrottled()
                .set("kafka", "session_timeout_ms", 4000)
                .admin_token(DRILL_TOKEN),
            quic_ports: (0..daemons)
                .map(|_| free_udp_port())
                .collect::<Result<_>>()?,
            name,
            kafka,
            _redis: redis,
            daemons: Vec::new(),
        })
    })
    .collect::<Result<_>>()?;
    let plan: Vec<(String, Vec<u16>, String)> = regions
        .iter()
        .map(|r| (r.name.clone(), r.quic_ports.clone(), r.cfg.local_topic()))
        .collect();
    for r in &mut regions {
        let mut fed = format!(
            "[federation]\nlisten = \"127.0.0.1:{}\"\nca_cert = \"{dir}/ca.crt\"\ncert = \"{dir}/{n}.crt\"\nkey = \"{dir}/{n}.key\"\n",
            r.quic_ports[0],
            dir = certs.display(),
            n = r.name
        );
        for (peer, ports, topic) in &plan {
            if peer == &r.name {
                continue;
            }
            let addrs: Vec<String> = match via.get(&(r.name.clone(), peer.clone())) {
                Some(a) => vec![format!("\"{a}\"")],
                None => ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect(),
            };
            fed.push_str(&format!(
                "[[federation.peers]]\nname = \"{peer}\"\naddrs = [{}]\ntopic = \"{topic}\"\npartitions = {PARTITIONS}\n",
                addrs.join(", ")
            ));
        }
        r.cfg = r.cfg.clone().merge_toml(&fed);
    }
    Ok(regions)
}

/// Starts the daemons of each region (in parallel: each waits for its readiness).
fn start_daemons(regions: &mut [Region]) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = regions
            .iter()
            .flat_map(|r| {
                r.quic_ports.iter().enumerate().map(move |(i, port)| {
                    let cfg = r.cfg.clone().node(&format!("{}-{i}", r.name)).set(
                        "federation",
                        "listen",
                        format!("127.0.0.1:{port}"),
                    );
                    (r.name.clone(), cfg)
                })
            })
            .map(|(name, cfg)| {
                s.spawn(move || DtfedProcess::start(&cfg.build()).map(|d| (name, d)))
            })
            .collect();
        for h in handles {
            let (name, d) = h
                .join()
                .map_err(|_| anyhow::anyhow!("daemon start panicked"))??;
            if let Some(r) = regions.iter_mut().find(|r| r.name == name) {
                r.daemons.push(d);
            }
        }
        Ok(())
    })
}

/// Receives `msg` frames of `room` until `want` arrived; checks per-origin order and no
/// duplicates on the way. Returns them in arrival order.
async fn collect(
    c: &mut WsClient,
    room: &str,
    want: usize,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = c
            .recv_until(|f| f["op"] == "msg" && f["room"] == room, left)
            .await
            .with_context(|| format!("{room}: {} of {want} messages arrived", out.len()))?;
        let origin = f["origin"].as_str().unwrap_or_default().to_owned();
        let offset = f["offset"].as_i64().unwrap_or(-1);
        anyhow::ensure!(seen.insert((origin.clone(), offset)), "duplicate {f}");
        if let Some(p) = last.insert(origin, offset) {
            anyhow::ensure!(offset > p, "order broken: {p} then {f}");
        }
        out.push(f);
    }
    Ok(out)
}

fn by_origin(msgs: &[Value]) -> BTreeMap<String, Vec<i64>> {
    let mut m: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for f in msgs {
        m.entry(f["origin"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(f["offset"].as_i64().unwrap_or(-1));
    }
    m
}

async fn publish_n(url: &str, room: &str, n: usize, tag: &str) -> Result<Vec<i64>> {
    let mut c = WsClient::connect(url).await?;
    let mut offs = Vec::new();
    for i in 0..n {
        let ack = c
            .publish(room, json!({"text": format!("{tag} {i}")}), T)
            .await?;
        offs.push(ack["offset"].as_i64().context("ack offset")?);
    }
    Ok(offs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_mirror_every_room_in_order() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-three")?;
    let names = ["seoul", "tokyo", "frankfurt"];
    let path: PathBuf = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("three", &names, &path, &HashMap::new(), 1)?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let rooms: Vec<String> = (0..6).map(|i| format!("quest-{i}")).collect();
    // A listener in every region, on every room.
    let mut listeners = Vec::new();
    for r in &regions {
        let mut c = WsClient::connect(&r.ws(0, "listener")).await?;
        for room in &rooms {
            c.sub(room, None, T).await?;
        }
        listeners.push(c);
    }
    // Every region publishes 60 messages into every room.
    let mut acked: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    let mut jobs = Vec::new();
    for r in &regions {
        for room in &rooms {
            let url = r.ws(0, "bard");
            let (region, room) = (r.name.clone(), room.clone());
            jobs.push(tokio::spawn(async move {
                let offs = publish_n(&url, &room, 60, &region).await?;
                anyhow::Ok(((region, room), offs))
            }));
        }
    }
    for j in jobs {
        let (k, v) = j.await??;
        acked.insert(k, v);
    }
    let per_room = 60 * regions.len();
    for (i, c) in listeners.iter_mut().enumerate() {
        let mut got: Vec<Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut per: HashMap<String, usize> = HashMap::new();
        while got.len() < per_room * rooms.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = c
                .recv_until(|f| f["op"] == "msg", left)
                .await
                .with_context(|| {
                    format!(
                        "listener in {}: {} of {} messages",
                        regions[i].name,
                        got.len(),
                        per_room * rooms.len()
                    )
                })?;
            *per.entry(f["room"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
            got.push(f);
        }
        for room in &rooms {
            let in_room: Vec<Value> = got
                .iter()
                .filter(|f| f["room"] == room.as_str())
                .cloned()
                .collect();
            let origins = by_origin(&in_room);
            for r in &regions {
                assert_eq!(
                    origins.get(&r.name),
                    acked.get(&(r.name.clone(), room.clone())),
                    "region {} sees {room} from {} in order, each once",
                    regions[i].name,
                    r.name
                );
            }
        }
    }
    // Operators see the links and the mirror lag.
    let status = regions[0].daemons[0]
        .admin_get("/status", Some(DRILL_TOKEN))?
        .json()?;
    let links = status["links"].as_array().context("links in /status")?;
    assert_eq!(links.len(), 2, "{status}");
    let mirror = status["mirror"].as_array().context("mirror in /status")?;
    assert_eq!(mirror.len(), 2 * PARTITIONS as usize, "{status}");
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_then_healed_loses_and_duplicates_nothing() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-cut")?;
    // tokyo reaches seoul through a relay we can cut.
    let seoul_port = free_udp_port()?;
    let relay = WanRelay::start(
        "127.0.0.1:0".parse()?,
        SocketAddr::from(([127, 0, 0, 1], seoul_port)),
        WanProfile::with_delay(Duration::from_millis(5)),
    )
    .await?;
    let mut via = HashMap::new();
    via.insert(("tokyo".to_owned(), "seoul".to_owned()), relay.local_addr());
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("cut", &["seoul", "tokyo"], &path, &via, 1)?;
        r[0].quic_ports = vec![seoul_port];
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let mut watcher = WsClient::connect(&regions[1].ws(0, "watcher")).await?;
    watcher.sub("siege", None, T).await?;
    let url = regions[0].ws(0, "herald");
    let mut herald = WsClient::connect(&url).await?;
    let mut acked = Vec::new();
    for i in 0..300 {
        if i == 100 {
            relay.cut();
        }
        if i == 200 {
            // Keep the link down for 10+ s in all.
            tokio::time::sleep(Duration::from_secs(10)).await;
            relay.heal();
        }
        let a = herald
            .publish("siege", json!({"text": format!("wave {i}")}), T)
            .await?;
        acked.push(a["offset"].as_i64().unwrap_or(-1));
        if i < 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let got = collect(&mut watcher, "siege", acked.len(), Duration::from_secs(90)).await?;
    assert_eq!(by_origin(&got).get("seoul"), Some(&acked));
    watcher.expect_silence(Duration::from_millis(500)).await?;
    assert!(relay.dropped() > 0, "the cut dropped packets");
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_task_owner_killed_another_daemon_takes_over() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-kill")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("kill", &["seoul", "tokyo"], &path, &HashMap::new(), 2)?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let mut watcher = WsClient::connect(&regions[1].ws(1, "watcher")).await?;
    watcher.sub("vault", None, T).await?;
    let mut herald = WsClient::connect(&regions[0].ws(0, "herald")).await?;
    let mut acked = Vec::new();
    for i in 0..200 {
        if i == 60 {
            // Kill whichever tokyo daemon runs the mirror task of vault's partition... both
            // may; killing daemon 0 covers either case: its tasks move to daemon 1.
            regions[1].daemons[0].kill9()?;
        }
        let a = herald
            .publish("vault", json!({"text": format!("coin {i}")}), T)
            .await?;
        acked.push(a["offset"].as_i64().unwrap_or(-1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = collect(&mut watcher, "vault", acked.len(), Duration::from_secs(90)).await?;
    assert_eq!(by_origin(&got).get("seoul"), Some(&acked));
    watcher.expect_silence(Duration::from_millis(500)).await?;
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_kafka_restarted_mid_stream() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-kafka")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation(
            "kafka-restart",
            &["seoul", "tokyo"],
            &path,
            &HashMap::new(),
            1,
        )?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let mut watcher = WsClient::connect(&regions[1].ws(0, "watcher")).await?;
    watcher.sub("forge", None, T).await?;
    let url = regions[0].ws(0, "smith");
    let mut acked = publish_n(&url, "forge", 50, "before").await?;
    let mut seoul = regions.remove(0);
    seoul.kafka = tokio::task::spawn_blocking(move || {
        let mut k = seoul.kafka;
        k.stop()?;
        k.restart()?;
        anyhow::Ok(k)
    })
    .await??;
    // After the broker is back, publishing resumes (retry until acked) and mirroring follows.
    let mut smith = WsClient::connect(&url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while acked.len() < 100 {
        let f = smith
            .publish_result("forge", json!({"text": format!("after {i}")}), T)
            .await?;
        if f["op"] == "ack" {
            acked.push(f["offset"].as_i64().unwrap_or(-1));
            i += 1;
        } else {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no ack within 60 s of the restart: {f}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let got = collect(&mut watcher, "forge", 100, Duration::from_secs(90)).await?;
    assert_eq!(by_origin(&got).get("seoul"), Some(&acked));
    drop(seoul);
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn player_resumes_in_another_region_with_its_cursor() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-resume")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("resume", &["seoul", "tokyo"], &path, &HashMap::new(), 1)?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    // Messages from both regions in one room.
    let s_url = regions[0].ws(0, "sage");
    let t_url = regions[1].ws(0, "ronin");
    let mut player = WsClient::connect(&regions[0].ws(0, "player")).await?;
    player.sub("dojo", None, T).await?;
    publish_n(&s_url, "dojo", 20, "seoul").await?;
    publish_n(&t_url, "dojo", 20, "tokyo").await?;
    let first = collect(&mut player, "dojo", 40, Duration::from_secs(60)).await?;
    let mut cursor = serde_json::Map::new();
    for (origin, offs) in by_origin(&first) {
        cursor.insert(origin, json!(offs.last().copied().unwrap_or(-1)));
    }
    player.close().await;
    // While the player is away, both regions keep talking.
    let s_more = publish_n(&s_url, "dojo", 15, "seoul-late").await?;
    let t_more = publish_n(&t_url, "dojo", 15, "tokyo-late").await?;
    // The player moves to tokyo and resumes with the cursor it had in seoul.
    let mut moved = WsClient::connect(&regions[1].ws(0, "player")).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = moved
            .sub("dojo", Some(Value::Object(cursor.clone())), T)
            .await?;
        let got: Vec<Value> = s.messages().into_iter().cloned().collect();
        let origins = by_origin(&got);
        // tokyo may still be mirroring seoul's last messages: retry until it holds them.
        if origins.get("seoul") == Some(&s_more) {
            assert_eq!(
                origins.get("tokyo"),
                Some(&t_more),
                "tokyo's own messages, exactly the missed ones"
            );
            assert!(
                s.frames.iter().all(|f| f["op"] == "msg"),
                "no gap: {:?}",
                s.frames
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "tokyo never held seoul's late messages: {origins:?}"
        );
        moved.unsub("dojo").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_a_foreign_ca_or_the_wrong_region_are_refused() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-refuse")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("refuse", &["seoul", "tokyo"], &path, &HashMap::new(), 1)?;
        // A second federation CA makes its own "tokyo": a region that trusts that CA starts,
        // but seoul, trusting the real one, must refuse it.
        let rogue = path.join("rogue");
        std::fs::create_dir_all(&rogue)?;
        make_certs(&rogue, &["tokyo"])?;
        r[1].cfg = r[1]
            .cfg
            .clone()
            .set("federation", "ca_cert", rogue.join("ca.crt").display().to_string())
            .set("federation", "cert", rogue.join("tokyo.crt").display().to_string())
            .set("federation", "key", rogue.join("tokyo.key").display().to_string());
        // "osaka" has a genuine certificate from the real CA, but seoul does not list it as
        // a peer: refused too.
        let bin = DtfedProcess::binary()?;
        let out = Command::new(bin)
            .args(["certs", "issue", "--dir", path.to_str().context("utf-8")?, "--region", "osaka"])
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let seoul_port = r[0].quic_ports[0];
        let seoul_topic = r[0].cfg.local_topic();
        let osaka_cfg = r[1]
            .cfg
            .for_region("osaka")
            .unset("federation", "peers")
            .set("federation", "ca_cert", path.join("ca.crt").display().to_string())
            .set("federation", "cert", path.join("osaka.crt").display().to_string())
            .set("federation", "key", path.join("osaka.key").display().to_string())
            .merge_toml(&format!(
                "[[federation.peers]]\nname = \"seoul\"\naddrs = [\"127.0.0.1:{seoul_port}\"]\ntopic = \"{seoul_topic}\"\npartitions = {PARTITIONS}\n"
            ));
        let osaka_port = free_udp_port()?;
        r.push(Region {
            name: "osaka".into(),
            kafka: KafkaBroker::start()?,
            _redis: RedisServer::start()?,
            cfg: osaka_cfg,
            quic_ports: vec![osaka_port],
            daemons: Vec::new(),
        });
        let osaka_kafka = r[2].kafka.bootstrap();
        r[2].cfg = r[2].cfg.clone().kafka(&osaka_kafka).redis(&r[2]._redis.url());
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let seoul = &regions[0];
    let mut guard = WsClient::connect(&seoul.ws(0, "guard")).await?;
    guard.sub("gate", None, T).await?;
    for (i, r) in regions.iter().enumerate().skip(1) {
        let mut spy = WsClient::connect(&r.ws(0, "spy")).await?;
        spy.publish("gate", json!({"text": format!("let me in ({i})")}), T)
            .await?;
    }
    // seoul says why, for each of them, and nothing of theirs reaches its players.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = seoul.daemons[0].log();
        let foreign_ca = log.contains("not signed by the federation CA");
        let wrong_region = log
            .lines()
            .any(|l| l.contains("refused peer") && l.contains("osaka"));
        if foreign_ca && wrong_region {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "seoul did not log both refusals (foreign CA: {foreign_ca}, osaka: {wrong_region}):\n{}",
            seoul.daemons[0].log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    guard.expect_silence(Duration::from_secs(2)).await?;
    let status = seoul.daemons[0]
        .admin_get("/status", Some(DRILL_TOKEN))?
        .json()?;
    let mirrored: i64 = status["mirror"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t["records_mirrored"].as_i64())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(mirrored, 0, "{status}");
    regions.clear();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pauses_and_resumes_a_peer_link() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-pause")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("pause", &["seoul", "tokyo"], &path, &HashMap::new(), 1)?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let tokyo_admin = regions[1].daemons[0].admin_addr();
    let post = |path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        dtfed_tests::http_request(tokyo_admin, "POST", path, &headers, b"")
    };
    // Without the admin token, nothing changes.
    assert_eq!(post("/peers/seoul/pause", None)?.status, 401);
    assert_eq!(post("/peers/seoul/pause", Some("wrong"))?.status, 401);
    assert_eq!(
        post("/peers/atlantis/pause", Some(DRILL_TOKEN))?.status,
        404
    );

    let mut watcher = WsClient::connect(&regions[1].ws(0, "watcher")).await?;
    watcher.sub("keep", None, T).await?;
    let url = regions[0].ws(0, "herald");
    let first = publish_n(&url, "keep", 5, "before").await?;
    collect(&mut watcher, "keep", 5, Duration::from_secs(60)).await?;

    assert_eq!(post("/peers/seoul/pause", Some(DRILL_TOKEN))?.status, 200);
    let status = regions[1].daemons[0]
        .admin_get("/status", Some(DRILL_TOKEN))?
        .json()?;
    assert_eq!(status["links"][0]["state"], "paused", "{status}");
    // While paused, mirror lag is unknown (null), never a reassuring 0.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = regions[1].daemons[0]
            .admin_get("/status", Some(DRILL_TOKEN))?
            .json()?;
        let tasks = status["mirror"].as_array().cloned().unwrap_or_default();
        if !tasks.is_empty()
            && tasks
                .iter()
                .all(|t| t["state"] == "paused" && t["lag_records"].is_null())
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "mirror tasks not shown paused with unknown lag: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = publish_n(&url, "keep", 5, "paused").await?;
    watcher.expect_silence(Duration::from_secs(3)).await?;

    assert_eq!(post("/peers/seoul/resume", Some(DRILL_TOKEN))?.status, 200);
    let got = collect(&mut watcher, "keep", 5, Duration::from_secs(60)).await?;
    assert_eq!(by_origin(&got).get("seoul"), Some(&during));
    assert!(first.last() < during.first());
    regions.clear();
    Ok(())
}

/// `client.max_frame_bytes` above what one region link frame can carry is refused by
/// `dtfed check-config` (a message that large could never be mirrored and would stop its
/// partition's mirror for good), beside every other problem of the file.
#[test]
fn check_config_refuses_a_frame_limit_the_link_cannot_carry() -> Result<()> {
    let dir = TestDir::new("fed-frame-limit")?;
    let write = |name: &str, frame: usize| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "region = \"seoul\"\n[client]\nauth = \"none\"\nmax_frame_bytes = {frame}\n\
                 [kafka]\nbrokers = \"127.0.0.1:9092\"\nlinger_ms = 5000\n\
                 [redis]\nurl = \"redis://127.0.0.1:6379\"\n\
                 [federation]\nlisten = \"127.0.0.1:7443\"\nca_cert = \"ca.crt\"\n\
                 cert = \"seoul.crt\"\nkey = \"seoul.key\"\n"
            ),
        )?;
        Ok(path)
    };
    let check = |path: &Path| -> Result<(Option<i32>, String)> {
        let out = Command::new(DtfedProcess::binary()?)
            .arg("check-config")
            .arg(path)
            .output()
            .context("running dtfed check-config")?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (code, stderr) = check(&write("big.toml", 10 * 1024 * 1024)?)?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("client.max_frame_bytes = 10485760") && stderr.contains("region link"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kafka.linger_ms"),
        "every problem at once: {stderr}"
    );
    let (code, stderr) = check(&write("fits.toml", 1024 * 1024)?)?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("max_frame_bytes"), "{stderr}");
    Ok(())
}

/// Writes `n` records into `topic` of `brokers` as a forger would: chat messages of `room`
/// (in the room's partition, as dtfed's partitioner puts it) whose `dtfed-origin` header
/// names `claim`.
async fn forge(brokers: &str, topic: &str, room: &str, claim: &str, n: usize) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .create()
        .expect("forger's producer");
    for i in 0..n {
        let value =
            json!({"from": "mallory", "ts": 1, "body": {"forged": claim, "i": i}}).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "dtfed-origin",
                value: Some(claim),
            })
            .insert(Header {
                key: "dtfed-origin-offset",
                value: Some("999999999"),
            });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(room)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("forged record written");
    }
}

/// Someone who can write seoul's local topic labels records as tokyo (the receiver
/// itself) and as frankfurt (a region that is not even in the federation). Tokyo's
/// players must still get every genuine message of tokyo and seoul in the room: the
/// forged records are seoul's (they are in seoul's log), and nothing is suppressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_forged_as_another_origin_suppress_nothing() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new("fed-forged")?;
    let path = dir.path().to_owned();
    let mut regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation("forged", &["seoul", "tokyo"], &path, &HashMap::new(), 1)?;
        start_daemons(&mut r)?;
        Ok(r)
    })
    .await??;
    let mut listener = WsClient::connect(&regions[1].ws(0, "listener")).await?;
    listener.sub("tavern", None, T).await?;
    let s_first = publish_n(&regions[0].ws(0, "sage"), "tavern", 3, "seoul").await?;
    // Forged into seoul's local topic: as tokyo's messages (they take seoul offsets 3..=12,
    // above tokyo's first ten) and as frankfurt's.
    let (brokers, topic) = (regions[0].kafka.bootstrap(), regions[0].cfg.local_topic());
    forge(&brokers, &topic, "tavern", "tokyo", 10).await;
    forge(&brokers, &topic, "tavern", "frankfurt", 2).await;
    let before = collect(&mut listener, "tavern", 3 + 12, Duration::from_secs(60)).await?;
    let origins = by_origin(&before);
    assert_eq!(
        origins.keys().collect::<Vec<_>>(),
        ["seoul"],
        "forged labels are not origins: {origins:?}"
    );
    // Now tokyo's own players talk (tokyo offsets 0.., which the forgeries claimed), and
    // seoul's again.
    let t_acked = publish_n(&regions[1].ws(0, "ronin"), "tavern", 10, "tokyo").await?;
    let s_more = publish_n(&regions[0].ws(0, "sage"), "tavern", 3, "seoul-late").await?;
    let after = collect(&mut listener, "tavern", 13, Duration::from_secs(60)).await?;
    let after = by_origin(&after);
    assert_eq!(
        after.get("tokyo"),
        Some(&t_acked),
        "every genuine tokyo message"
    );
    assert_eq!(
        after.get("seoul"),
        Some(&s_more),
        "every genuine seoul message"
    );
    let seoul_seen = &origins["seoul"];
    assert!(
        s_first.iter().all(|o| seoul_seen.contains(o)),
        "seoul's first messages: {s_first:?} in {seoul_seen:?}"
    );
    regions.clear();
    Ok(())
}

/// The link to seoul in a `/status`.
fn seoul_link(status: &Value) -> Value {
    status["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["region"] == "seoul"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Starts seoul and frankfurt, then tokyo with a config that says seoul's topic has
/// `believed` partitions (seoul's has [`PARTITIONS`]); tokyo's mirror topic of seoul is
/// made with that. Frankfurt is configured right everywhere.
async fn tokyo_believing_seoul_has(test: &str, believed: i64) -> Result<(TestDir, Vec<Region>)> {
    let dir = TestDir::new(&format!("fed-{test}"))?;
    let path = dir.path().to_owned();
    let test = test.to_owned();
    let regions = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut r = federation(
            &test,
            &["seoul", "tokyo", "frankfurt"],
            &path,
            &HashMap::new(),
            1,
        )?;
        start_daemons(&mut r[..1])?;
        start_daemons(&mut r[2..])?;
        let tokyo = &r[1];
        let text = tokyo
            .cfg
            .clone()
            .node("tokyo-0")
            .set(
                "federation",
                "listen",
                format!("127.0.0.1:{}", tokyo.quic_ports[0]),
            )
            // A short hot history, so that a resume reads the mirror topic.
            .set("history", "max_messages", 5)
            .build();
        let at = text
            .find("[[federation.peers]]")
            .context("peers in the config")?;
        let (head, peers) = text.split_at(at);
        let believed = format!("partitions = {believed}");
        let wrong = format!(
            "{head}{}",
            peers.replace(&format!("partitions = {PARTITIONS}"), &believed)
        );
        anyhow::ensure!(wrong.contains(&believed), "{wrong}");
        let d = DtfedProcess::start(&wrong)?;
        r[1].daemons.push(d);
        Ok(r)
    })
    .await??;
    Ok((dir, regions))
}

/// Three regions; tokyo's config says seoul has 2 partitions; seoul has 4. Tokyo learns
/// seoul's count on the link, grows its mirror topic to 4 and mirrors every partition: a
/// room that lives in seoul's partition 3, which tokyo's guess did not have, reaches
/// tokyo's players, live and on resume, beside frankfurt's messages in the same room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_more_partitions_than_configured_is_learned_and_mirrored() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_dir, mut regions) = tokyo_believing_seoul_has("grow", 2).await?;
    let room = (0..)
        .map(|i| format!("keep-{i}"))
        .find(|r| {
            dtfed_proto::RoomId::parse(r)
                .is_ok_and(|id| dtfed::kafka::partition_for(&id, PARTITIONS as i32) == 3)
        })
        .context("a room in partition 3")?;
    let mut watcher = WsClient::connect(&regions[1].ws(0, "watcher")).await?;
    watcher.sub(&room, None, T).await?;
    let sent = publish_n(&regions[0].ws(0, "herald"), &room, 20, "beyond the guess").await?;
    let from_frankfurt = publish_n(&regions[2].ws(0, "envoy"), &room, 5, "as configured").await?;
    // The new mirror partitions are found by tokyo's mirror group and fan-out within
    // their metadata refresh (30 s).
    let got = collect(
        &mut watcher,
        &room,
        sent.len() + from_frankfurt.len(),
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(by_origin(&got).get("seoul"), Some(&sent));
    assert_eq!(by_origin(&got).get("frankfurt"), Some(&from_frankfurt));

    let status = regions[1].daemons[0]
        .admin_get("/status", Some(DRILL_TOKEN))?
        .json()?;
    let tasks = status["mirror"].as_array().cloned().unwrap_or_default();
    let mut partitions: Vec<i64> = tasks
        .iter()
        .filter(|t| t["origin"] == "seoul")
        .filter_map(|t| t["partition"].as_i64())
        .collect();
    partitions.sort_unstable();
    assert_eq!(partitions, vec![0, 1, 2, 3], "{status}");
    assert!(seoul_link(&status)["last_error"].is_null(), "{status}");
    assert!(
        regions[1].daemons[0]
            .log()
            .contains("mirror topic grown to match"),
        "logged"
    );

    // A player arriving later resumes from the start of the room: tokyo's replay of seoul's
    // records looks in partition 3 of the mirror topic, not in partition 3 mod 2.
    let mut late = WsClient::connect(&regions[1].ws(0, "late")).await?;
    let replayed = late.sub(&room, Some(json!({})), T).await?.frames;
    assert_eq!(by_origin(&replayed).get("seoul"), Some(&sent));
    assert_eq!(by_origin(&replayed).get("frankfurt"), Some(&from_frankfurt));
    regions.clear();
    Ok(())
}

/// Three regions; tokyo's config says seoul has 6 partitions; seoul has 4. A mirror topic
/// never shrinks, so tokyo refuses to mirror seoul (rather than mirroring into the wrong
/// partitions): each mirror task and the link say why in `/status`, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_fewer_partitions_than_the_mirror_topic_is_refused_and_shown() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_dir, mut regions) = tokyo_believing_seoul_has("shrink", 6).await?;
    let want = format!(
        "partition count mismatch: seoul's topic {} has {PARTITIONS} partitions, the mirror \
         topic here has 6",
        regions[0].cfg.local_topic()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = regions[1].daemons[0]
            .admin_get("/status", Some(DRILL_TOKEN))?
            .json()?;
        let tasks: Vec<Value> = status["mirror"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t["origin"] == "seoul")
            .collect();
        let refused = tasks.len() == 6
            && tasks.iter().all(|t| {
                t["state"].as_str().is_some_and(|s| {
                    s.starts_with("backoff: ")
                        && s.contains(&want)
                        && s.contains("mirror topics never shrink")
                })
            });
        let link_says = seoul_link(&status)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&want));
        if refused && link_says {
            assert!(tasks.iter().all(|t| t["records_mirrored"] == 0), "{status}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "tokyo does not show the mismatch: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        regions[1].daemons[0]
            .log()
            .contains("partition count mismatch"),
        "logged"
    );
    regions.clear();
    Ok(())
}
