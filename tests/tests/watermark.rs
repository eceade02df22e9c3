//! Replication watermarks for players, across real regions (Kafka, Redis, `dtfed` daemons,
//! QUIC with mutual TLS through cuttable WAN relays): a tokyo player learns in `synced`,
//! then in `wm` frames, how far tokyo holds seoul's log for its room and whether the link
//! is up — on the daemon that does *not* run the room's mirror task, so the mark travelled
//! through the region's Redis.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed::kafka::partition_for;
use dtfed_proto::RoomId;
use dtfed_tests::harness::federation::ADMIN_TOKEN;
use dtfed_tests::harness::{http_get, Federation, FederationSpec, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const PARTITIONS: i32 = 2;

/// Index of the tokyo daemon that runs the mirror task (seoul, `partition`), once one does
/// and it streams.
async fn task_owner(fed: &Federation, partition: i32) -> Result<usize> {
    let tokyo = fed.region("tokyo");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for (i, p) in tokyo.ports.iter().enumerate() {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p.admin));
            let status = tokio::task::spawn_blocking(move || {
                http_get(addr, "/status", Some(ADMIN_TOKEN)).and_then(|r| r.json())
            })
            .await??;
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

/// The seoul mark of the first `synced` or `wm` frame of `room` for which `pred` holds
/// (frames without a seoul mark do not count).
async fn seoul_mark(
    c: &mut WsClient,
    room: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let f = c
        .recv_until(
            |f| {
                matches!(f["op"].as_str(), Some("wm" | "synced"))
                    && f["room"] == room
                    && f["origins"].get("seoul").is_some_and(&mut pred)
            },
            timeout,
        )
        .await
        .with_context(|| format!("waiting for seoul's mark: {what}"))?;
    Ok(f["origins"]["seoul"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_see_how_far_their_region_holds_each_origin_and_when_a_link_is_down() -> Result<()>
{
    let room = "watchtower";
    let mut spec = FederationSpec::new("watermark", &["seoul", "tokyo"], 2);
    spec.relayed = true;
    spec.partitions = i64::from(PARTITIONS);
    let fed = Federation::start(spec).await?;
    let partition = partition_for(&RoomId::parse(room)?, PARTITIONS);
    let owner = task_owner(&fed, partition).await?;
    // The player is on the other daemon: the mark reaches it only through Redis.
    let other = 1 - owner;
    let tokyo = fed.region("tokyo");
    let mut player = WsClient::connect(&tokyo.ws(other, "watcher")).await?;
    let synced = player.sub(room, None, T).await?.synced;
    let first = match synced["origins"].get("seoul") {
        Some(m) if m["live"] == true => m.clone(),
        // Marks are shared once a second: the first may still be on its way.
        _ => seoul_mark(&mut player, room, T, "live at start", |m| m["live"] == true).await?,
    };
    assert!(first["offset"].as_i64().is_some(), "{first}");
    assert!(first["since"].as_i64().is_some(), "{first}");
    assert!(
        synced["origins"].get("tokyo").is_none(),
        "this region's own origin is not listed: {synced}"
    );

    // A message published in seoul moves seoul's offset past it.
    let mut herald = WsClient::connect(&fed.region("seoul").ws(0, "herald")).await?;
    let ack = herald.publish(room, json!({"text": "to arms"}), T).await?;
    let n = ack["offset"].as_i64().context("ack offset")?;
    player
        .recv_until(|f| f["op"] == "msg" && f["offset"] == n, T)
        .await?;
    let held = seoul_mark(&mut player, room, T, "offset past the message", |m| {
        m["offset"].as_i64().is_some_and(|o| o > n) && m["live"] == true
    })
    .await?;
    assert_eq!(held["lag_ms"], 0, "live and caught up: {held}");
    // Caught up and idle: nothing more to say.
    player.drain_backlog();
    player.expect_silence(Duration::from_secs(3)).await?;

    // Cut seoul → tokyo only: seoul reads as not live within seconds, its offset unchanged.
    let relay = &fed.relays[&("tokyo".to_owned(), "seoul".to_owned())];
    let cut_at = Instant::now();
    relay.cut();
    let down = seoul_mark(
        &mut player,
        room,
        Duration::from_secs(20),
        "down after the cut",
        |m| m["live"] == false,
    )
    .await?;
    let took = cut_at.elapsed();
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
    let before: Vec<Value> = player.drain_backlog();
    assert!(
        !before.iter().any(|f| f["op"] == "msg" || f["op"] == "wm"),
        "{before:?}"
    );
    player.expect_silence(Duration::from_secs(4)).await?;

    // Heal: live again, and the message of the cut arrives with the offset past it.
    relay.heal();
    player
        .recv_until(
            |f| f["op"] == "msg" && f["offset"] == during,
            Duration::from_secs(60),
        )
        .await?;
    let up = seoul_mark(
        &mut player,
        room,
        Duration::from_secs(30),
        "live after the heal",
        |m| m["live"] == true && m["offset"].as_i64().is_some_and(|o| o > during),
    )
    .await?;
    assert!(up["since"].as_i64() > down["since"].as_i64(), "{up}");
    assert!(relay.dropped() > 0, "the cut dropped packets");
    Ok(())
}
