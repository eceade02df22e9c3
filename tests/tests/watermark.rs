//! Replication watermarks for players, across three real regions (Kafka, Redis, two `dtfed`
//! daemons each, QUIC with mutual TLS through cuttable WAN relays): a tokyo player learns in
//! `synced`, then in `wm` frames, how far tokyo holds seoul's log for its room and whether
//! the link is up — on the daemon that does *not* run the room's mirror task, so the mark
//! travelled through the region's Redis. Only seoul → tokyo is cut: frankfurt stays live.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed::kafka::partition_for;
use dtfed_proto::RoomId;
use dtfed_tests::harness::federation::ADMIN_TOKEN;
use dtfed_tests::harness::{http_get, Federation, FederationSpec, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Each test starts several brokers and daemons and times what players see: one at a time
/// on a 2-core machine (`deploy/test.sh` runs two tests of a binary at once).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PARTITIONS: i32 = 2;

/// Index of the tokyo daemon that runs the mirror task (seoul, `partition`), once one does
/// and it streams.
async fn task_owner(fed: &Federation, partition: i32) -> Result<usize> {
    let tokyo = fed.region("tokyo");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for (i, p) in tokyo.ports.iter().enumerate() {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p.admin));
            // A daemon killed by the test does not answer: not the owner.
            let Ok(status) = tokio::task::spawn_blocking(move || {
                http_get(addr, "/status", Some(ADMIN_TOKEN)).and_then(|r| r.json())
            })
            .await?
            else {
                continue;
            };
            let streams = status["mirror"].as_array().is_some_and(|tasks| {
                tasks.iter().any(|t| {
                    t["origin"] == "seoul"
                        && t["partition"] == partition
                        && t["state"] == "streaming"
                })
            });
            if streams {
                return Ok(i);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no tokyo daemon streams seoul's partition {partition}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the player has been told about `room`: the marks per origin (`synced` replaces,
/// `wm` merges), how many `wm` frames named each origin, and the offsets of its messages.
#[derive(Default)]
struct View {
    marks: BTreeMap<String, Value>,
    news: BTreeMap<String, usize>,
    msgs: Vec<(String, i64)>,
}

impl View {
    fn take(&mut self, room: &str, f: &Value) -> Result<()> {
        if f["room"] != room {
            return Ok(());
        }
        match f["op"].as_str() {
            Some("synced") => {
                self.marks.clear();
                if let Some(o) = f["origins"].as_object() {
                    self.marks
                        .extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            Some("wm") => {
                let o = f["origins"].as_object().context("wm without origins")?;
                anyhow::ensure!(!o.is_empty(), "an empty wm: {f}");
                for (k, v) in o {
                    *self.news.entry(k.clone()).or_default() += 1;
                    self.marks.insert(k.clone(), v.clone());
                }
            }
            Some("msg") => {
                let origin = f["origin"].as_str().unwrap_or_default().to_owned();
                self.msgs.push((origin, f["offset"].as_i64().unwrap_or(-1)));
            }
            _ => {}
        }
        Ok(())
    }

    fn mark(&self, origin: &str) -> &Value {
        self.marks.get(origin).unwrap_or(&Value::Null)
    }

    fn live(&self, origin: &str) -> bool {
        self.mark(origin)["live"] == true
    }

    fn offset(&self, origin: &str) -> i64 {
        self.mark(origin)["offset"].as_i64().unwrap_or(-1)
    }
}

/// Reads the player's frames into `view` until `pred` holds of it.
async fn until(
    c: &mut WsClient,
    room: &str,
    view: &mut View,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for f in c.drain_backlog() {
        view.take(room, &f)?;
    }
    while !pred(view) {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = c
            .recv_json(left)
            .await
            .with_context(|| format!("waiting for {what}; marks {:?}", view.marks))?;
        view.take(room, &f)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_see_how_far_their_region_holds_each_origin_and_when_a_link_is_down() -> Result<()>
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let room = "watchtower";
    let mut spec = FederationSpec::new("watermark", &["seoul", "tokyo", "frankfurt"], 2);
    spec.relayed = true;
    spec.partitions = i64::from(PARTITIONS);
    let fed = Federation::start(spec).await?;
    let partition = partition_for(&RoomId::parse(room)?, PARTITIONS);
    let owner = task_owner(&fed, partition).await?;
    // The player is on the other daemon: the mark reaches it only through Redis.
    let other = 1 - owner;
    let tokyo = fed.region("tokyo");
    let mut player = WsClient::connect(&tokyo.ws(other, "watcher")).await?;
    let mut view = View::default();
    let synced = player.sub(room, None, T).await?.synced;
    view.take(room, &synced)?;
    assert!(
        synced["origins"].get("tokyo").is_none(),
        "this region's own origin is not listed: {synced}"
    );
    // Marks are shared once a second: the first ones may come after `synced`.
    until(
        &mut player,
        room,
        &mut view,
        T,
        "seoul and frankfurt live",
        |v| v.live("seoul") && v.live("frankfurt"),
    )
    .await?;
    let first = view.mark("seoul").clone();
    assert!(first["offset"].as_i64().is_some(), "{first}");
    assert!(first["since"].as_i64().is_some(), "{first}");

    // A message published in seoul moves seoul's offset past it.
    let mut herald = WsClient::connect(&fed.region("seoul").ws(0, "herald")).await?;
    let ack = herald.publish(room, json!({"text": "to arms"}), T).await?;
    let n = ack["offset"].as_i64().context("ack offset")?;
    until(
        &mut player,
        room,
        &mut view,
        T,
        "the message and seoul's offset past it",
        |v| v.msgs.contains(&("seoul".to_owned(), n)) && v.offset("seoul") > n && v.live("seoul"),
    )
    .await?;
    let held = view.mark("seoul").clone();
    assert_eq!(held["lag_ms"], 0, "live and caught up: {held}");
    // Caught up and idle: nothing more to say.
    player.expect_no_frames(Duration::from_secs(3)).await?;

    // Cut seoul → tokyo only: seoul reads as not live within seconds, its offset unchanged.
    let relay = &fed.relays[&("tokyo".to_owned(), "seoul".to_owned())];
    let frankfurt_news = view.news.get("frankfurt").copied();
    let cut_at = Instant::now();
    relay.cut();
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(20),
        "seoul down after the cut",
        |v| !v.live("seoul"),
    )
    .await?;
    let took = cut_at.elapsed();
    let down = view.mark("seoul").clone();
    eprintln!("seoul read as down {took:?} after the cut: {down}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(down["offset"], held["offset"], "{down} vs {held}");
    assert!(down["since"].as_i64() > held["since"].as_i64(), "{down}");
    // A message published during the cut is acked in seoul but not held in tokyo.
    let during = herald
        .publish(room, json!({"text": "while cut"}), T)
        .await?["offset"]
        .as_i64()
        .context("ack offset")?;
    // Nothing crosses the cut link, and nothing changes while it stays down (`lag_ms`
    // grows, but that is no news): the player hears nothing at all.
    player.expect_no_frames(Duration::from_secs(4)).await?;
    // Only seoul's link was cut: frankfurt stayed live, and nothing was said about it.
    assert!(view.live("frankfurt"), "{:?}", view.marks);
    assert_eq!(view.news.get("frankfurt").copied(), frankfurt_news);

    // Heal: live again, and the message of the cut arrives with the offset past it.
    relay.heal();
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(60),
        "the message of the cut, and seoul live past it",
        |v| {
            v.msgs.contains(&("seoul".to_owned(), during))
                && v.live("seoul")
                && v.offset("seoul") > during
        },
    )
    .await?;
    let up = view.mark("seoul").clone();
    assert!(up["since"].as_i64() > down["since"].as_i64(), "{up}");
    assert!(relay.dropped() > 0, "the cut dropped packets");
    Ok(())
}

/// The daemon running the room's mirror task dies (SIGKILL): its marks expire in the
/// region's Redis, so a player on the other daemon reads seoul as not live (offset kept)
/// until the task runs on the survivor and streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_task_owner_reads_as_not_live_until_its_task_moves() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let room = "beacon";
    let mut spec = FederationSpec::new("watermark-owner", &["seoul", "tokyo"], 2);
    spec.partitions = i64::from(PARTITIONS);
    // The dead owner keeps its lease this long: what the player sees before it is the
    // expired mark, not the survivor's task starting.
    spec.extra_config = "[kafka]\nsession_timeout_ms = 15000\n".into();
    let mut fed = Federation::start(spec).await?;
    let partition = partition_for(&RoomId::parse(room)?, PARTITIONS);
    let owner = task_owner(&fed, partition).await?;
    let other = 1 - owner;
    let mut player = WsClient::connect(&fed.region("tokyo").ws(other, "watcher")).await?;
    let mut view = View::default();
    let synced = player.sub(room, None, T).await?.synced;
    view.take(room, &synced)?;
    let mut herald = WsClient::connect(&fed.region("seoul").ws(0, "herald")).await?;
    let n = herald.publish(room, json!({"text": "light it"}), T).await?["offset"]
        .as_i64()
        .context("ack offset")?;
    until(
        &mut player,
        room,
        &mut view,
        T,
        "seoul live past the message",
        |v| v.live("seoul") && v.offset("seoul") > n,
    )
    .await?;
    let held = view.mark("seoul").clone();

    let killed_at = Instant::now();
    tokio::task::block_in_place(|| fed.region_mut("tokyo").daemons[owner].kill9())?;
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(20),
        "seoul not live once the owner's mark expired",
        |v| !v.live("seoul"),
    )
    .await?;
    let took = killed_at.elapsed();
    let down = view.mark("seoul").clone();
    eprintln!("seoul read as not live {took:?} after its task's owner died: {down}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(down["offset"], held["offset"], "{down} vs {held}");
    // The survivor takes the task over (after the group's session timeout) and streams.
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(60),
        "seoul live again once the task moved",
        |v| v.live("seoul"),
    )
    .await?;
    assert_eq!(task_owner(&fed, partition).await?, other);
    let up = view.mark("seoul").clone();
    assert!(up["offset"].as_i64() >= held["offset"].as_i64(), "{up}");
    Ok(())
}

/// A region whose daemon (re)starts while the link to seoul is cut still tells its players
/// how far it holds seoul, and that seoul is not live: the mirror task never reaches seoul
/// to read its own tail, so the watermark reads the mirror partition's tail itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_started_during_a_cut_says_the_origin_is_down_and_how_far_it_holds_it(
) -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let room = "lighthouse";
    let mut spec = FederationSpec::new("watermark-restart", &["seoul", "tokyo"], 1);
    spec.relayed = true;
    spec.partitions = i64::from(PARTITIONS);
    let mut fed = Federation::start(spec).await?;
    let mut player = WsClient::connect(&fed.region("tokyo").ws(0, "watcher")).await?;
    let mut view = View::default();
    let synced = player.sub(room, None, T).await?.synced;
    view.take(room, &synced)?;
    let mut herald = WsClient::connect(&fed.region("seoul").ws(0, "herald")).await?;
    let n = herald
        .publish(room, json!({"text": "keep watch"}), T)
        .await?["offset"]
        .as_i64()
        .context("ack offset")?;
    until(
        &mut player,
        room,
        &mut view,
        T,
        "seoul live past the message",
        |v| v.live("seoul") && v.offset("seoul") > n,
    )
    .await?;
    let held = view.mark("seoul").clone();
    fed.relays[&("tokyo".to_owned(), "seoul".to_owned())].cut();
    drop(player);

    // tokyo's only daemon dies and comes back while the link is still cut, after its marks
    // expired in Redis: nothing is known of seoul but what tokyo's Kafka holds.
    tokio::task::block_in_place(|| fed.region_mut("tokyo").daemons[0].kill9())?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| fed.region_mut("tokyo").daemons[0].restart())?;
    let mut player = WsClient::connect(&fed.region("tokyo").ws(0, "watcher")).await?;
    let mut view = View::default();
    let synced = player.sub(room, None, T).await?.synced;
    view.take(room, &synced)?;
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(45),
        "seoul's mark after the restart",
        |v| v.marks.contains_key("seoul"),
    )
    .await?;
    let down = view.mark("seoul").clone();
    eprintln!("after the restart, during the cut: {down}");
    assert_eq!(down["live"], false, "{down}");
    assert_eq!(down["offset"], held["offset"], "{down} vs {held}");

    fed.relays[&("tokyo".to_owned(), "seoul".to_owned())].heal();
    until(
        &mut player,
        room,
        &mut view,
        Duration::from_secs(60),
        "seoul live after the heal",
        |v| v.live("seoul"),
    )
    .await?;
    Ok(())
}
