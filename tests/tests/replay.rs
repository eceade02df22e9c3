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
    Ok(ConfigBuilder::shared(test, "seoul")?.unthrottled())
}

async fn start(cfg: ConfigBuilder) -> Result<DtfedProcess> {
    tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await?
}

/// Publishes `n` messages to `room` without waiting for each ack, then waits for all of
/// them; returns the acked offsets, which must be in the order sent (a player's messages
/// are stored in the order the player sent them).
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
    if let Some(i) = (1..offsets.len()).find(|&i| offsets[i] <= offsets[i - 1]) {
        anyhow::bail!(
            "message {i} was stored at {} before message {} at {}: not in the order sent",
            offsets[i],
            i - 1,
            offsets[i - 1]
        );
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
        .unthrottled()
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

/// How a `sub` was answered: the room's `msg`/`gap` frames, then the frame that ended it
/// (`synced`, `more` or `error`).
struct Answer {
    frames: Vec<Value>,
    end: Value,
}

impl Answer {
    fn offsets(&self) -> Vec<i64> {
        self.frames
            .iter()
            .filter(|f| f["op"] == "msg")
            .filter_map(|f| f["offset"].as_i64())
            .collect()
    }
}

async fn sub_answer(client: &mut WsClient, room: &str, since: Value) -> Result<Answer> {
    client
        .send_json(&json!({"op": "sub", "room": room, "since": since}))
        .await?;
    let mut frames = Vec::new();
    loop {
        let f = client
            .recv_until(
                |f| {
                    (f["room"] == room
                        && matches!(f["op"].as_str(), Some("msg" | "gap" | "synced" | "more")))
                        || f["op"] == "error"
                },
                T,
            )
            .await?;
        match f["op"].as_str() {
            Some("msg" | "gap") => frames.push(f),
            _ => return Ok(Answer { frames, end: f }),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_replay_comes_in_pieces_and_log_replays_are_rate_limited() -> Result<()> {
    let cfg = shared_cfg("replay-pieces")?
        .partitions(1)
        .set("history", "max_messages", 10);
    let region = cfg.region();
    let d = start(cfg).await?;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let offs = publish_many(&mut ann, "saga", 2500).await?;
    wait_applied(&d, "saga", &region, offs[2499]).await?;

    // The whole room from an empty cursor: pieces of at most 1,000 messages, each ending
    // with `more` and the cursor to continue from, the last one with `synced`.
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    let mut got = Vec::new();
    let mut since = json!({});
    let mut pieces = 0;
    let synced = loop {
        let a = sub_answer(&mut bob, "saga", since.clone()).await?;
        pieces += 1;
        anyhow::ensure!(pieces <= 10, "no end after {pieces} pieces");
        anyhow::ensure!(
            a.frames.iter().all(|f| f["op"] == "msg"),
            "no gap expected: {:?}",
            a.frames.iter().find(|f| f["op"] != "msg")
        );
        let piece = a.offsets();
        anyhow::ensure!(piece.len() <= 1000, "a piece of {} messages", piece.len());
        got.extend(piece);
        match a.end["op"].as_str() {
            Some("more") => since = a.end["cursor"].clone(),
            Some("synced") => break a.end,
            _ => anyhow::bail!("sub answered {}", a.end),
        }
    };
    assert!(pieces >= 3, "{pieces} piece(s) for 2,500 messages");
    assert_eq!(got, offs, "every message once, in order");
    assert_eq!(synced["cursor"][&region], offs[2499]);
    // Live after the last piece.
    let last = ann.publish("saga", json!({"text": "live"}), T).await?;
    let live = bob
        .recv_until(|f| f["op"] == "msg" && f["room"] == "saga", T)
        .await?;
    assert_eq!(live["offset"], last["offset"]);

    // A player who keeps asking the log for replays is told to slow down.
    let mut eve = WsClient::connect(&d.ws_url_as("eve")).await?;
    let mut limited = None;
    for i in 0..40 {
        let a = sub_answer(&mut eve, "saga", json!({ region.clone(): offs[0] })).await?;
        if a.end["op"] == "error" {
            limited = Some((i, a.end));
            break;
        }
        anyhow::ensure!(a.end["op"] == "more", "sub answered {}", a.end);
    }
    let (i, refused) = limited.context("40 log replays in a row were all served")?;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(i >= 8, "refused after only {i} replays");
    // Not subscribed: nothing live arrives, and the daemon holds no extra room for eve.
    ann.publish("saga", json!({"text": "not for eve"}), T)
        .await?;
    eve.drain_backlog();
    eve.expect_silence(Duration::from_millis(500)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_log_means_unavailable_not_gap() -> Result<()> {
    let (mut kafka, redis) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((KafkaBroker::start()?, RedisServer::shared()?))
    })
    .await??;
    let cfg = ConfigBuilder::new("log-busy", "seoul")
        .unthrottled()
        .kafka(&kafka.bootstrap())
        .redis(&redis.url())
        .partitions(1)
        .set("history", "max_messages", 5);
    let region = cfg.region();
    let d = start(cfg).await?;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let offs = publish_many(&mut ann, "vault", 20).await?;
    wait_applied(&d, "vault", &region, offs[19]).await?;

    // The log is unreachable: the resume is refused (retry), no gap moves the cursor on.
    kafka = tokio::task::spawn_blocking(move || kafka.stop().map(|_| kafka)).await??;
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    let since = json!({ region.clone(): offs[2] });
    let a = sub_answer(&mut bob, "vault", since.clone()).await?;
    assert!(
        a.frames.is_empty(),
        "nothing before the refusal: {:?}",
        a.frames
    );
    assert_eq!(a.end["op"], "error", "{}", a.end);
    assert_eq!(a.end["code"], "unavailable", "{}", a.end);

    // Back: the same cursor gets everything.
    let kafka = tokio::task::spawn_blocking(move || kafka.restart().map(|_| kafka)).await??;
    let deadline = Instant::now() + Duration::from_secs(60);
    let a = loop {
        let a = sub_answer(&mut bob, "vault", since.clone()).await?;
        if a.end["op"] == "synced" {
            break a;
        }
        assert_eq!(a.end["code"], "unavailable", "{}", a.end);
        anyhow::ensure!(
            Instant::now() < deadline,
            "no replay within 60 s of the broker's return"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(a.offsets(), offs[3..].to_vec());
    drop(kafka);
    Ok(())
}

/// Publishes with the given `ref` and returns the `ack` or `error` answering it.
async fn pub_ref(client: &mut WsClient, room: &str, text: &str, r: &str) -> Result<Value> {
    client
        .send_json(&json!({"op": "pub", "room": room, "body": {"text": text}, "ref": r}))
        .await?;
    client
        .recv_until(
            |f| f["ref"] == r && matches!(f["op"].as_str(), Some("ack" | "error")),
            T,
        )
        .await
}

/// Retries a publish with the same `ref` until it is acknowledged (every refusal must be
/// `unavailable`, which says "retry").
async fn pub_until_acked(
    client: &mut WsClient,
    room: &str,
    text: &str,
    r: &str,
    within: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let f = pub_ref(client, room, text, r).await?;
        if f["op"] == "ack" {
            return Ok(f);
        }
        anyhow::ensure!(f["code"] == "unavailable", "refused: {f}");
        anyhow::ensure!(
            Instant::now() < deadline,
            "not acknowledged within {within:?}: {f}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The texts and offsets of every message of `room` (once the bus holds the one at offset
/// `last`), from a replay of all of it.
async fn room_texts(d: &DtfedProcess, room: &str, last: &Value) -> Result<Vec<(String, i64)>> {
    let last = last["offset"].as_i64().context("an ack")?;
    wait_applied(d, room, "seoul", last).await?;
    let mut reader = WsClient::connect(&d.ws_url_as("reader")).await?;
    let s = reader.sub(room, Some(json!({})), T).await?;
    reader.close().await;
    Ok(s.messages()
        .iter()
        .map(|m| {
            (
                m["body"]["text"].as_str().unwrap_or_default().to_owned(),
                m["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retried_with_the_same_ref_is_stored_once() -> Result<()> {
    let cfg = shared_cfg("same-ref")?.partitions(1);
    let d = start(cfg).await?;
    // The ack is lost with the connection; the player reconnects and retries.
    let mut first = WsClient::connect(&d.ws_url_as("ann")).await?;
    let ack = pub_ref(&mut first, "plaza", "hello", "hello-1").await?;
    assert_eq!(ack["op"], "ack", "{ack}");
    drop(first);
    let mut again = WsClient::connect(&d.ws_url_as("ann")).await?;
    let retry = pub_until_acked(&mut again, "plaza", "hello", "hello-1", T).await?;
    assert_eq!(
        retry["offset"], ack["offset"],
        "the retry names the stored message"
    );
    // The same ref from another player, or in another room, is another message.
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    let other = pub_ref(&mut bob, "plaza", "hi", "hello-1").await?;
    assert_eq!(other["op"], "ack", "{other}");
    assert_ne!(other["offset"], ack["offset"]);
    let elsewhere = pub_ref(&mut again, "market", "hello", "hello-1").await?;
    assert_eq!(elsewhere["op"], "ack", "{elsewhere}");
    // A client that reuses a ref for another message (a counter restarting with each
    // connection) loses nothing: another body is another message.
    let reused = pub_ref(&mut again, "plaza", "hello again", "hello-1").await?;
    assert_eq!(reused["op"], "ack", "{reused}");
    assert_ne!(reused["offset"], ack["offset"]);

    let texts = room_texts(&d, "plaza", &reused).await?;
    let hellos: Vec<i64> = texts
        .iter()
        .filter(|(t, _)| t == "hello")
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(
        hellos,
        vec![ack["offset"].as_i64().unwrap_or(-2)],
        "{texts:?}"
    );
    assert_eq!(texts.len(), 3, "{texts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_unknown_outcome_retried_is_stored_once() -> Result<()> {
    let (kafka, redis) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((KafkaBroker::start()?, RedisServer::shared()?))
    })
    .await??;
    let cfg = ConfigBuilder::new("unknown-outcome", "seoul")
        .unthrottled()
        .kafka(&kafka.bootstrap())
        .redis(&redis.url())
        .partitions(1)
        .set("kafka", "publish_timeout_ms", 2000);
    let d = start(cfg).await?;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    pub_until_acked(&mut ann, "tower", "before", "b1", T).await?;

    // The broker freezes with the publish in flight: no ack in time, though the broker
    // still holds the request and writes it when it wakes up.
    let pid = i32::try_from(kafka.pid().context("kafka pid")?)?;
    dtfed_tests::harness::sys::send_signal(pid, libc::SIGSTOP)?;
    let refused = pub_ref(&mut ann, "tower", "during", "d1").await;
    dtfed_tests::harness::sys::send_signal(pid, libc::SIGCONT)?;
    let refused = refused?;
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");

    // The player retries with the same ref until acknowledged: stored once.
    let ack = pub_until_acked(&mut ann, "tower", "during", "d1", Duration::from_secs(60)).await?;
    let last = pub_until_acked(&mut ann, "tower", "after", "a1", T).await?;
    let texts = room_texts(&d, "tower", &last).await?;
    let during: Vec<i64> = texts
        .iter()
        .filter(|(t, _)| t == "during")
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(
        during,
        vec![ack["offset"].as_i64().unwrap_or(-2)],
        "{texts:?}"
    );
    drop(kafka);
    Ok(())
}
