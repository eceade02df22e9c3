//! Replays and publishes against hostile or unlucky players (issue 7), on real Kafka, real
//! Redis and real `dtfed` processes: a player who leaves in the middle of a replay, replays
//! too large for one answer, a busy log, a Redis that lost its data, a publish whose outcome
//! is unknown.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::{ConfigBuilder, DtfedProcess, KafkaBroker, RedisServer, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// A region's config on the shared broker and Redis, with publish limits out of the way.
fn shared_cfg(test: &str) -> Result<ConfigBuilder> {
    Ok(ConfigBuilder::shared(test, "seoul")?
        .set("client", "publish_rate_per_sec", 100_000)
        .set("client", "publish_burst", 100_000))
}

async fn start(cfg: ConfigBuilder) -> Result<DtfedProcess> {
    tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await?
}

/// Publishes `n` messages to `room` without waiting for each ack, then waits for all of
/// them; returns the acked offsets in the order sent.
async fn publish_many(client: &mut WsClient, room: &str, n: usize) -> Result<Vec<i64>> {
    for i in 0..n {
        client
            .send_json(&json!({"op": "pub", "room": room, "body": {"text": format!("line {i}")}, "ref": format!("m{i}")}))
            .await?;
    }
    let mut offsets = Vec::with_capacity(n);
    for i in 0..n {
        let r = format!("m{i}");
        let f = client
            .recv_until(|f| f["ref"] == r.as_str(), T)
            .await
            .with_context(|| format!("ack of message {i}"))?;
        anyhow::ensure!(f["op"] == "ack", "message {i} refused: {f}");
        offsets.push(f["offset"].as_i64().context("ack without offset")?);
    }
    Ok(offsets)
}

/// Waits until the bus applied `room`'s message at `offset` of `origin` (a live-only `sub`
/// answers with the room's tails).
async fn wait_applied(d: &DtfedProcess, room: &str, origin: &str, offset: i64) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        let mut probe = WsClient::connect(&d.ws_url_as("probe")).await?;
        let s = probe.sub(room, None, T).await?;
        probe.close().await;
        if s.cursor()[origin].as_i64().is_some_and(|o| o >= offset) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bus never applied {origin}/{offset} in {room}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(d: &DtfedProcess) -> Result<Value> {
    d.admin_get("/status", None)?.json()
}

async fn redis_con(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Subscribers Redis counts on `room`'s channel.
async fn redis_subscribers(url: &str, prefix: &str, room: &str) -> Result<i64> {
    let mut con = redis_con(url).await?;
    let channel = format!("{prefix}:{{{room}}}:c");
    let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut con)
        .await?;
    Ok(reply.first().map_or(0, |(_, n)| *n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn player_who_leaves_mid_replay_leaves_no_room_subscription_behind() -> Result<()> {
    let cfg = shared_cfg("leave-mid-replay")?
        .partitions(1)
        .set("history", "max_messages", 10);
    let prefix = cfg.key_prefix();
    let redis_url =
        tokio::task::spawn_blocking(|| RedisServer::shared().map(|r| r.url())).await??;
    let d = start(cfg).await?;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    publish_many(&mut ann, "archive", 3000).await?;
    ann.close().await;

    // Each player asks for the whole log (a long replay) and hangs up at once.
    for i in 0..5 {
        let mut quitter = WsClient::connect(&d.ws_url_as(&format!("quitter{i}"))).await?;
        quitter
            .send_json(&json!({"op": "sub", "room": "archive", "since": {}}))
            .await?;
        // Vanish without a close handshake while the daemon reads and sends the replay.
        drop(quitter);
    }

    // Nobody is left: the daemon holds no room and Redis has no subscriber on the channel.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rooms = status(&d)?["rooms"].as_u64().unwrap_or(u64::MAX);
        let subscribers = redis_subscribers(&redis_url, &prefix, "archive").await?;
        if rooms == 0 && subscribers == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "after every player left: the daemon still holds {rooms} room(s), Redis counts {subscribers} subscriber(s) on the room's channel"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_redis_lost_its_data_reads_the_log() -> Result<()> {
    // Its own Redis: this test empties it.
    let redis = tokio::task::spawn_blocking(RedisServer::start).await??;
    let kafka =
        tokio::task::spawn_blocking(|| KafkaBroker::shared().map(|k| k.bootstrap())).await??;
    let cfg = ConfigBuilder::new("redis-lost", "seoul")
        .set("client", "publish_rate_per_sec", 100_000)
        .set("client", "publish_burst", 100_000)
        .kafka(&kafka)
        .redis(&redis.url())
        .partitions(1);
    let region = cfg.region();
    let d = start(cfg).await?;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let mut offs = publish_many(&mut ann, "harbor", 5).await?;
    wait_applied(&d, "harbor", &region, offs[4]).await?;

    // Redis loses everything it had (no persistence), then the room goes on.
    let mut con = redis_con(&redis.url()).await?;
    redis::cmd("FLUSHALL").query_async::<()>(&mut con).await?;
    offs.push(
        ann.publish("harbor", json!({"text": "after the flush"}), T)
            .await?["offset"]
            .as_i64()
            .context("offset")?,
    );
    wait_applied(&d, "harbor", &region, offs[5]).await?;

    // A player who had seen the first two resumes: the rest comes from the Kafka log.
    let mut carol = WsClient::connect(&d.ws_url_as("carol")).await?;
    let s = carol
        .sub("harbor", Some(json!({ region.clone(): offs[1] })), T)
        .await?;
    assert!(
        s.frames.iter().all(|f| f["op"] == "msg"),
        "no gap expected: {:?}",
        s.frames
    );
    let got: Vec<i64> = s
        .messages()
        .iter()
        .filter_map(|m| m["offset"].as_i64())
        .collect();
    assert_eq!(got, offs[2..].to_vec(), "frames: {:?}", s.frames);
    assert_eq!(s.messages()[0]["prev"], offs[1]);
    assert_eq!(s.cursor()[&region], offs[5]);
    drop(redis);
    Ok(())
}
