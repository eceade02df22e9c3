//! One region, end to end, on real Kafka, real Redis and real `dtfed` processes: what a
//! player sees when daemons, the partition owner, Kafka or Redis fail.
//!
//! Tests share one Kafka broker and one Redis per binary (each with its own topic, group and
//! key prefix) unless they stop or restart a server, in which case they start their own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::harness::jwt::hs256;
use dtfed_tests::{ConfigBuilder, DtfedProcess, KafkaBroker, RedisServer, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// Receives `msg` frames of `room` until `want` distinct (origin, offset) pairs arrived;
/// fails on a duplicate or an offset that does not increase per origin.
async fn collect(
    client: &mut WsClient,
    room: &str,
    want: usize,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut out = Vec::new();
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = client
            .recv_until(|f| f["op"] == "msg" && f["room"] == room, left)
            .await
            .with_context(|| format!("{room}: got {} of {want} messages", out.len()))?;
        check_in_order(&f, &mut last, &mut seen)?;
        out.push(f);
    }
    Ok(out)
}

fn check_in_order(
    f: &Value,
    last: &mut HashMap<String, i64>,
    seen: &mut HashSet<(String, i64)>,
) -> Result<()> {
    let origin = f["origin"]
        .as_str()
        .context("msg without origin")?
        .to_owned();
    let offset = f["offset"].as_i64().context("msg without offset")?;
    anyhow::ensure!(
        seen.insert((origin.clone(), offset)),
        "duplicate delivery {f}"
    );
    if let Some(prev) = last.insert(origin, offset) {
        anyhow::ensure!(offset > prev, "offset went from {prev} to {offset}: {f}");
    }
    Ok(())
}

fn offsets(msgs: &[Value]) -> Vec<i64> {
    msgs.iter().filter_map(|m| m["offset"].as_i64()).collect()
}

fn text(m: &Value) -> String {
    m["body"]["text"].as_str().unwrap_or_default().to_owned()
}

/// Which daemon owns partition `p` of its local topic, from `/status`.
fn owns(d: &DtfedProcess, p: i64) -> bool {
    d.admin_get("/status", None)
        .and_then(|r| r.json())
        .map(|s| {
            s["fanout"]["partitions"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|x| x["partition"] == p))
        })
        .unwrap_or(false)
}

/// A region's config on the shared broker and Redis, with publish limits out of the way.
fn shared_cfg(test: &str) -> Result<ConfigBuilder> {
    Ok(ConfigBuilder::shared(test, "seoul")?.unthrottled())
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_keep_per_room_order_across_thousands_of_messages() -> Result<()> {
    let cfg = shared_cfg("order")?.partitions(4);
    let (d1, d2) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            DtfedProcess::start(&cfg.clone().node("seoul-1").build())?,
            DtfedProcess::start(&cfg.node("seoul-2").build())?,
        ))
    })
    .await??;

    let rooms: Vec<String> = (0..12).map(|i| format!("table-{i}")).collect();
    let mut listener = WsClient::connect(&d2.ws_url_as("listener")).await?;
    for r in &rooms {
        listener.sub(r, None, T).await?;
    }
    // Three publishers on daemon 1, each writing to every room in turn, pipelined.
    let per_room = 150;
    let mut publishers = Vec::new();
    for p in 0..3 {
        let url = d1.ws_url_as(&format!("pub{p}"));
        let rooms = rooms.clone();
        publishers.push(tokio::spawn(async move {
            let mut c = WsClient::connect(&url).await?;
            let mut acks = Vec::new();
            for i in 0..per_room / 3 {
                for r in &rooms {
                    acks.push(
                        c.publish(r, json!({"text": format!("p{p}-{i}")}), T)
                            .await?,
                    );
                }
            }
            anyhow::Ok(acks)
        }));
    }
    let mut acked: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for p in publishers {
        for ack in p.await?? {
            acked
                .entry(ack["room"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(ack["offset"].as_i64().unwrap_or(-1));
        }
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert_eq!(total, per_room / 3 * 3 * rooms.len());

    // The listener on daemon 2 gets every room's messages in offset order, each once.
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut last: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut seen: HashMap<String, HashSet<(String, i64)>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.values().map(Vec::len).sum::<usize>() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = listener.recv_until(|f| f["op"] == "msg", left).await?;
        let room = f["room"].as_str().unwrap_or_default().to_owned();
        check_in_order(
            &f,
            last.entry(room.clone()).or_default(),
            seen.entry(room.clone()).or_default(),
        )?;
        got.entry(room)
            .or_default()
            .push(f["offset"].as_i64().unwrap_or(-1));
    }
    for (room, mut offs) in acked {
        offs.sort_unstable();
        assert_eq!(got.get(&room), Some(&offs), "room {room}");
    }
    // `prev` chains each room: every message names the one before it.
    let mut again = WsClient::connect(&d1.ws_url_as("auditor")).await?;
    let replay = again.sub("table-3", Some(json!({})), T).await?;
    let msgs = replay.messages();
    assert_eq!(msgs.len(), per_room);
    assert!(msgs[0]["prev"].is_null());
    for w in msgs.windows(2) {
        assert_eq!(
            w[1]["prev"], w[0]["offset"],
            "prev chain broken: {} then {}",
            w[0], w[1]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_message_survives_kill9_of_the_daemon_that_acked_it() -> Result<()> {
    let cfg = shared_cfg("kill9")?.partitions(2);
    let (mut d1, d2) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            DtfedProcess::start(&cfg.clone().node("seoul-1").build())?,
            DtfedProcess::start(&cfg.node("seoul-2").build())?,
        ))
    })
    .await??;
    let mut bob = WsClient::connect(&d2.ws_url_as("bob")).await?;
    bob.sub("crypt", None, T).await?;
    let mut ann = WsClient::connect(&d1.ws_url_as("ann")).await?;
    let mut acks = Vec::new();
    for i in 0..20 {
        acks.push(
            ann.publish("crypt", json!({"text": format!("torch {i}")}), T)
                .await?,
        );
    }
    d1.kill9()?;
    // Whoever owned the partition, the survivor delivers and replays every acked message.
    let live = collect(&mut bob, "crypt", 20, Duration::from_secs(60)).await?;
    let want: Vec<i64> = acks.iter().filter_map(|a| a["offset"].as_i64()).collect();
    assert_eq!(offsets(&live), want);
    let mut late = WsClient::connect(&d2.ws_url_as("late")).await?;
    let replay = late.sub("crypt", Some(json!({})), T).await?;
    assert_eq!(
        offsets(&replay.messages().into_iter().cloned().collect::<Vec<_>>()),
        want
    );
    assert_eq!(text(replay.messages()[19]), "torch 19");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    let cfg = shared_cfg("owner-crash")?
        .partitions(1)
        .set("kafka", "session_timeout_ms", 3000);
    let (d1, d2) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            DtfedProcess::start(&cfg.clone().node("seoul-1").build())?,
            DtfedProcess::start(&cfg.node("seoul-2").build())?,
        ))
    })
    .await??;
    // One partition: exactly one of the two daemons owns it. Kill that one mid-stream.
    let (mut owner, other) = tokio::task::spawn_blocking(move || -> Result<_> {
        wait_for("a partition owner", T, || owns(&d1, 0) || owns(&d2, 0))?;
        Ok(if owns(&d1, 0) { (d1, d2) } else { (d2, d1) })
    })
    .await??;

    let mut watcher = WsClient::connect(&other.ws_url_as("watcher")).await?;
    watcher.sub("arena", None, T).await?;
    let mut pubr = WsClient::connect(&other.ws_url_as("caller")).await?;
    let mut acked = Vec::new();
    for i in 0..200 {
        if i == 60 {
            owner.kill9()?;
        }
        let a = pubr
            .publish("arena", json!({"text": format!("round {i}")}), T)
            .await?;
        acked.push(a["offset"].as_i64().unwrap_or(-1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The survivor takes the partition over after the session timeout and replays from the
    // last commit: the watcher sees each acked message exactly once, in order.
    let got = collect(&mut watcher, "arena", acked.len(), Duration::from_secs(60)).await?;
    assert_eq!(offsets(&got), acked);
    watcher.expect_silence(Duration::from_millis(500)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_cursor_from_hot_history_and_from_kafka() -> Result<()> {
    let cfg = shared_cfg("resume")?
        .partitions(2)
        .set("history", "max_messages", 10);
    let region = cfg.region();
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let mut acks = Vec::new();
    for i in 0..50 {
        acks.push(
            ann.publish("library", json!({"text": format!("page {i}")}), T)
                .await?,
        );
    }
    let offs: Vec<i64> = acks.iter().filter_map(|a| a["offset"].as_i64()).collect();
    // Wait until the last one reached the hot history (a live subscriber sees it).
    let mut probe = WsClient::connect(&d.ws_url_as("probe")).await?;
    let s = probe
        .sub("library", Some(json!({ region.clone(): offs[48] })), T)
        .await?;
    assert_eq!(
        offsets(&s.messages().into_iter().cloned().collect::<Vec<_>>()),
        vec![offs[49]]
    );

    // From hot history only: the last 5.
    let mut a = WsClient::connect(&d.ws_url_as("a")).await?;
    let s = a
        .sub("library", Some(json!({ region.clone(): offs[44] })), T)
        .await?;
    assert_eq!(
        offsets(&s.messages().into_iter().cloned().collect::<Vec<_>>()),
        offs[45..].to_vec()
    );
    assert_eq!(s.synced["cursor"][&region], offs[49]);

    // Older than the hot history (10 entries): Kafka fills 6..40, history the rest.
    let mut b = WsClient::connect(&d.ws_url_as("b")).await?;
    let s = b
        .sub("library", Some(json!({ region.clone(): offs[5] })), T)
        .await?;
    assert!(
        s.frames.iter().all(|f| f["op"] == "msg"),
        "no gap expected: {:?}",
        s.frames
    );
    let got: Vec<Value> = s.messages().into_iter().cloned().collect();
    assert_eq!(offsets(&got), offs[6..].to_vec());
    assert_eq!(text(&got[0]), "page 6");
    assert_eq!(got[0]["prev"], offs[5]);
    for w in got.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["offset"]);
    }
    // Then live, with no gap and no duplicate at the seam.
    ann.publish("library", json!({"text": "page 50"}), T)
        .await?;
    let live = collect(&mut b, "library", 1, T).await?;
    assert_eq!(text(&live[0]), "page 50");
    assert_eq!(live[0]["prev"], offs[49]);
    // An empty cursor replays everything retained.
    let mut c = WsClient::connect(&d.ws_url_as("c")).await?;
    let s = c.sub("library", Some(json!({})), T).await?;
    assert_eq!(s.messages().len(), 51);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_means_unavailable_then_publishes_recover() -> Result<()> {
    let (mut kafka, redis) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((KafkaBroker::start()?, RedisServer::shared()?))
    })
    .await??;
    let cfg = ConfigBuilder::new("kafka-down", "seoul")
        .unthrottled()
        .kafka(&kafka.bootstrap())
        .redis(&redis.url())
        .partitions(1)
        .set("kafka", "publish_timeout_ms", 2000);
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    bob.sub("keep", None, T).await?;
    let before = ann.publish("keep", json!({"text": "before"}), T).await?;

    let mut kafka = tokio::task::spawn_blocking(move || kafka.stop().map(|_| kafka)).await??;
    let started = Instant::now();
    let refused = ann
        .publish_result("keep", json!({"text": "during"}), T)
        .await?;
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable");
    // The player is told what to do, not Kafka's internals (those are in the daemon's log).
    let said = refused["message"].as_str().unwrap_or_default();
    assert!(
        said.contains("try again") || said.contains("retry"),
        "{said}"
    );
    for internal in ["Local:", "Broker", "KafkaError", "librdkafka", "127.0.0.1"] {
        assert!(
            !said.contains(internal),
            "internal detail {internal:?} sent to a player: {said}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let kafka = tokio::task::spawn_blocking(move || kafka.restart().map(|_| kafka)).await??;
    // Publishing works again once the broker is back; retry until acked.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let f = ann
            .publish_result("keep", json!({"text": "after"}), T)
            .await?;
        if f["op"] == "ack" {
            break f;
        }
        assert_eq!(f["code"], "unavailable", "{f}");
        anyhow::ensure!(
            Instant::now() < deadline,
            "no ack within 60 s of the broker's return"
        );
    };
    // The refused message was never stored; the others are delivered in order.
    let got = collect(&mut bob, "keep", 2, Duration::from_secs(60)).await?;
    assert_eq!(text(&got[0]), "before");
    assert_eq!(got[0]["offset"], before["offset"]);
    assert_eq!(text(&got[1]), "after");
    assert_eq!(got[1]["offset"], after["offset"]);
    drop(kafka);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_players_miss_nothing() -> Result<()> {
    let redis = tokio::task::spawn_blocking(RedisServer::start).await??;
    let cfg = ConfigBuilder::new("redis-restart", "seoul")
        .unthrottled()
        .kafka(
            &tokio::task::spawn_blocking(|| KafkaBroker::shared().map(|k| k.bootstrap())).await??,
        )
        .redis(&redis.url())
        .partitions(2);
    let (d1, d2) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            DtfedProcess::start(&cfg.clone().node("seoul-1").build())?,
            DtfedProcess::start(&cfg.node("seoul-2").build())?,
        ))
    })
    .await??;
    let mut watcher = WsClient::connect(&d2.ws_url_as("watcher")).await?;
    watcher.sub("tower", None, T).await?;
    let mut caller = WsClient::connect(&d1.ws_url_as("caller")).await?;
    let mut acked = Vec::new();
    let mut redis = Some(redis);
    for i in 0..120 {
        if i == 40 {
            let r = redis.take().context("redis")?;
            redis = Some(r.bounce(Duration::from_millis(500)).await?);
        }
        let a = caller
            .publish("tower", json!({"text": format!("bell {i}")}), T)
            .await?;
        acked.push(a["offset"].as_i64().unwrap_or(-1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = collect(&mut watcher, "tower", acked.len(), Duration::from_secs(60)).await?;
    assert_eq!(offsets(&got), acked);
    let m = d2.admin_get("/metrics", None)?.body;
    assert!(m.contains("dtfed_bus_resyncs_total"), "metrics: {m}");
    drop(redis);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_documented_answer() -> Result<()> {
    let cfg = ConfigBuilder::shared("bad-input", "seoul")?
        .partitions(1)
        .set("client", "max_frame_bytes", 4096)
        .set("client", "publish_rate_per_sec", 5)
        .set("client", "publish_burst", 5)
        .set("client", "max_connections", 6)
        .set("client", "allowed_origins", vec!["https://play.example"]);
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut c = WsClient::connect(&d.ws_url_as("mallory")).await?;
    let cases = [
        ("{not json", "bad_frame"),
        (r#"{"op":"dance"}"#, "unknown_op"),
        (r#"{"op":"sub","room":"no spaces"}"#, "bad_room"),
        (r#"{"op":"sub","room":""}"#, "bad_room"),
        (r#"{"op":"pub","room":"r"}"#, "bad_frame"),
        (r#"{"op":"unsub","room":"never-joined"}"#, "not_subscribed"),
    ];
    for (frame, code) in cases {
        c.send_text(frame).await?;
        let e = c.recv_until(|f| f["op"] == "error", T).await?;
        assert_eq!(e["code"], code, "{frame} → {e}");
        c.ping(T).await?; // still usable
    }
    let big = format!(r#"{{"op":"pub","room":"r","body":"{}"}}"#, "x".repeat(5000));
    c.send_text(&big).await?;
    assert_eq!(
        c.recv_until(|f| f["op"] == "error", T).await?["code"],
        "too_large"
    );
    c.ping(T).await?;
    // Publish rate: the burst passes, then rate_limited with the ref echoed.
    let mut codes = Vec::new();
    for i in 0..12 {
        let f = c.publish_result("r", json!(i), T).await?;
        codes.push(if f["op"] == "ack" {
            "ack".to_owned()
        } else {
            f["code"].as_str().unwrap_or("?").to_owned()
        });
    }
    assert!(
        codes.iter().filter(|c| *c == "ack").count() >= 5,
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");

    // Beyond the hard limit (2 x max_frame_bytes): closed with 1009.
    let mut huge = WsClient::connect(&d.ws_url_as("huge")).await?;
    huge.send_text(&format!(
        r#"{{"op":"pub","room":"r","body":"{}"}}"#,
        "y".repeat(20_000)
    ))
    .await?;
    assert_eq!(huge.expect_close(T).await?.0, 1009);

    // A flood of frames: closed with 4002.
    let mut flood = WsClient::connect(&d.ws_url_as("flood")).await?;
    for _ in 0..200 {
        if flood.send_text(r#"{"op":"ping"}"#).await.is_err() {
            break;
        }
    }
    assert_eq!(flood.expect_close(T).await?.0, 4002);

    // A browser from another site is refused at the upgrade; one from the allowed site is not.
    let status =
        WsClient::handshake_status(&d.ws_url_as("x"), &[("Origin", "https://evil.example")])
            .await?;
    assert_eq!(status, 403);
    let ok =
        WsClient::connect_with_headers(&d.ws_url_as("y"), &[("Origin", "https://play.example")])
            .await?;
    // Connection limit (6): the 7th is refused with 503.
    let mut held = vec![ok];
    let mut refused = None;
    for i in 0..8 {
        let status = WsClient::handshake_status(&d.ws_url_as(&format!("n{i}")), &[]).await?;
        if status == 101 {
            held.push(WsClient::connect(&d.ws_url_as(&format!("h{i}"))).await?);
        } else {
            refused = Some(status);
            break;
        }
    }
    assert_eq!(refused, Some(503));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_and_the_room_keeps_flowing() -> Result<()> {
    let cfg = shared_cfg("slow-reader")?
        .partitions(1)
        .set("client", "outbound_queue", 16)
        .set("client", "publish_rate_per_sec", 10_000)
        .set("client", "publish_burst", 10_000);
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut sloth = WsClient::connect(&d.ws_url_as("sloth")).await?;
    sloth.sub("hall", None, T).await?;
    let mut fast = WsClient::connect(&d.ws_url_as("fast")).await?;
    fast.sub("hall", None, T).await?;
    // The fast reader reads while the messages come in.
    let fast =
        tokio::spawn(async move { collect(&mut fast, "hall", 200, Duration::from_secs(60)).await });
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    // 200 messages of 30 KB: far more than the socket buffers and a 16-frame queue hold.
    let body = "z".repeat(30_000);
    for i in 0..200 {
        ann.publish("hall", json!({"text": format!("{i}"), "pad": body}), T)
            .await?;
    }
    let got = fast.await??;
    assert_eq!(got.len(), 200);
    let (code, reason) = sloth.expect_close(Duration::from_secs(60)).await?;
    assert_eq!(code, 4001, "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_refuses_bad_tokens_and_forbidden_rooms() -> Result<()> {
    let secret = "a-test-secret-of-enough-length";
    let cfg = shared_cfg("jwt")?.partitions(1).auth_jwt(secret);
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut anon = WsClient::connect(&d.ws_url()).await?;
    let e = anon.recv_until(|f| f["op"] == "error", T).await?;
    assert_eq!(e["code"], "unauthorized");
    assert_eq!(anon.expect_close(T).await?.0, 1008);

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 300;
    let token = hs256(
        secret,
        &json!({"sub": "ann", "exp": exp, "rooms": ["table-*"]}),
    );
    let mut ann = WsClient::connect(&d.ws_url_with_token(&token)).await?;
    let s = ann.sub("table-1", None, T).await?;
    assert!(s.synced["cursor"].is_object());
    let ack = ann.publish("table-1", json!({"text": "hi"}), T).await?;
    let m = collect(&mut ann, "table-1", 1, T).await?;
    assert_eq!(m[0]["from"], "ann");
    assert_eq!(m[0]["offset"], ack["offset"]);
    let f = ann.publish_result("lobby", json!(1), T).await?;
    assert_eq!(f["code"], "forbidden");

    let forged = hs256(
        "another-secret-entirely!!",
        &json!({"sub": "eve", "exp": exp}),
    );
    let mut eve = WsClient::connect(&d.ws_url_with_token(&forged)).await?;
    assert_eq!(
        eve.recv_until(|f| f["op"] == "error", T).await?["code"],
        "unauthorized"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() -> Result<()> {
    let cfg = shared_cfg("sigterm")?.partitions(1);
    let mut d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await??;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    ann.sub("inn", None, T).await?;
    ann.publish("inn", json!({"text": "last orders"}), T)
        .await?;
    let (status, mut d) =
        tokio::task::spawn_blocking(move || d.terminate().map(|s| (s, d))).await??;
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log_tail(30)
    );
    let (code, _) = ann.expect_close(T).await?;
    assert_eq!(code, 1001);
    let _ = &mut d;
    Ok(())
}
