//! STOMP 1.2 over WebSocket at `/stomp` against a real `dtfed` (real Kafka, real Redis),
//! spoken by `@stomp/stompjs` (npm, over the `ws` package) in Node: the scripts are in
//! `tests/node/stomp/` and print what the STOMP client saw; v1 players in the same rooms
//! are the harness's [`WsClient`].
//!
//! Tests share one Kafka broker and one Redis (each with its own topic and key prefix).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::harness::jwt::hs256;
use dtfed_tests::harness::{NodeOutput, NodeScript};
use dtfed_tests::{ConfigBuilder, DtfedProcess, TestDir, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

async fn start(cfg: ConfigBuilder) -> Result<DtfedProcess> {
    tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await?
}

fn stomp_url(d: &DtfedProcess) -> String {
    format!("ws://{}/stomp", d.client_addr())
}

/// Runs `script` to its end (off the async runtime: it blocks).
async fn node(script: NodeScript) -> Result<NodeOutput> {
    tokio::task::spawn_blocking(move || script.run()).await?
}

/// The values of the script's lines `<kind> {json}`, in order.
fn lines(out: &NodeOutput, kind: &str) -> Result<Vec<Value>> {
    let prefix = format!("{kind} ");
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|j| serde_json::from_str(j).with_context(|| format!("{kind} line {j}")))
        .collect()
}

fn wait_for_file(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// (origin, offset) of a v1 `msg` frame or of a script's MESSAGE line.
fn position(m: &Value) -> (String, i64) {
    (
        m["origin"].as_str().unwrap_or_default().to_owned(),
        m["offset"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stompjs_and_a_v1_player_chat_in_one_room_in_order_with_durable_receipts() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-chat", "seoul")?.unthrottled();
    let d = start(cfg).await?;
    let room = "tavern";
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    bob.sub(room, None, T).await?;

    let sync = TestDir::new("stomp-chat")?;
    let script = NodeScript::new("stomp", "chat.mjs")
        .arg(stomp_url(&d))
        .arg(room)
        .arg(sync.path().display().to_string())
        .arg("bob")
        .arg("2")
        .deadline(Duration::from_secs(60))
        .start()?;
    let flag = sync.path().join("subscribed");
    tokio::task::spawn_blocking(move || wait_for_file(&flag, T)).await??;
    // The STOMP client is live in the room: bob speaks twice, interleaved with its sends.
    let mut bob_acks = Vec::new();
    for i in 0..2 {
        bob_acks.push(
            bob.publish(room, json!({"text": format!("bob {i}")}), T)
                .await?,
        );
    }
    let out = tokio::task::spawn_blocking(move || script.finish()).await??;
    out.ensure_success()?;

    // CONNECTED: the subprotocol, version 1.2, the configured heart-beat, `server`.
    let connected = &lines(&out, "CONNECTED")?[0];
    assert_eq!(connected["protocol"], "v12.stomp", "{connected}");
    assert_eq!(connected["headers"]["version"], "1.2");
    assert_eq!(connected["headers"]["heart-beat"], "30000,30000");
    assert!(connected["headers"]["server"]
        .as_str()
        .is_some_and(|s| s.starts_with("dtfed/")));

    // bob sees alice's three messages (JSON stays JSON, text becomes a JSON string) and his
    // own two, and alice sees exactly the same five in the same order.
    let mut bob_saw = Vec::new();
    while bob_saw.len() < 5 {
        let f = bob
            .recv_until(|f| f["op"] == "msg" && f["room"] == room, T)
            .await?;
        bob_saw.push(f);
    }
    let alice: Vec<&Value> = bob_saw.iter().filter(|m| m["from"] == "alice").collect();
    assert_eq!(alice.len(), 3, "{bob_saw:#?}");
    assert_eq!(alice[0]["body"], json!({"text": "one", "n": 1}));
    assert_eq!(alice[1]["body"], json!("two: plain text, with a colon"));
    assert_eq!(alice[2]["body"], json!({"text": "three", "n": 3}));

    let stomp_saw = lines(&out, "MESSAGE")?;
    let order = |ms: &[Value]| ms.iter().map(position).collect::<Vec<_>>();
    assert_eq!(
        order(&stomp_saw),
        order(&bob_saw),
        "both players see one order"
    );
    for (m, v1) in stomp_saw.iter().zip(&bob_saw) {
        let (origin, offset) = position(m);
        assert_eq!(origin, "seoul");
        assert_eq!(m["messageId"], format!("seoul:{offset}"));
        assert_eq!(m["destination"], format!("/sub/chat/room/{room}"));
        assert_eq!(m["subscription"], "chat-1");
        assert_eq!(m["from"], v1["from"]);
        assert_eq!(m["ts"], v1["ts"]);
        assert_eq!(
            m["prev"],
            if v1["prev"].is_null() {
                Value::Null
            } else {
                v1["prev"].clone()
            }
        );
        // The body as the STOMP client got it.
        if v1["body"].is_string() {
            assert_eq!(m["contentType"], "text/plain;charset=utf-8");
            assert_eq!(m["body"], v1["body"]);
        } else {
            assert_eq!(m["contentType"], "application/json");
            let parsed: Value = serde_json::from_str(m["body"].as_str().unwrap_or(""))?;
            assert_eq!(parsed, v1["body"]);
        }
    }
    for ack in &bob_acks {
        assert!(stomp_saw.iter().any(|m| position(m) == position(ack)));
    }

    // Each RECEIPT names the stored message, and it is in the room's history: a v1 player
    // resuming from nothing replays it.
    let receipts = lines(&out, "RECEIPT")?;
    assert_eq!(receipts.len(), 3);
    let mut carol = WsClient::connect(&d.ws_url_as("carol")).await?;
    let replayed = carol.sub(room, Some(json!({})), T).await?;
    for r in &receipts {
        let offset: i64 = r["dtfed-offset"]
            .as_str()
            .context("dtfed-offset")?
            .parse()?;
        assert_eq!(r["dtfed-origin"], "seoul");
        assert!(
            replayed
                .frames
                .iter()
                .any(|m| m["offset"] == offset && m["from"] == "alice"),
            "receipted offset {offset} not in the replay {:#?}",
            replayed.frames
        );
    }
    Ok(())
}

/// Messages of `room` a v1 player replays from nothing.
async fn stored(d: &DtfedProcess, room: &str) -> Result<Vec<Value>> {
    let mut c = WsClient::connect(&d.ws_url_as("auditor")).await?;
    Ok(c.sub(room, Some(json!({})), T).await?.frames)
}

async fn error_case(d: &DtfedProcess, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let mut script = NodeScript::new("stomp", "errors.mjs").arg(stomp_url(d));
    for a in args {
        script = script.arg(*a);
    }
    for (k, v) in env {
        script = script.env(*k, *v);
    }
    let out = node(script.deadline(Duration::from_secs(60))).await?;
    out.ensure_success()?;
    lines(&out, "RESULT")?
        .pop()
        .with_context(|| format!("no RESULT: {}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_destination_bad_frame_too_large_or_too_fast_send_gets_error_then_close() -> Result<()>
{
    let cfg = ConfigBuilder::shared("stomp-errors", "seoul")?
        .set("client", "publish_rate_per_sec", 1)
        .set("client", "publish_burst", 2)
        .set("client", "max_frame_bytes", 1024);
    let d = start(cfg).await?;

    let r = error_case(&d, &["bad-destination"], &[]).await?;
    let e = &r["error"]["headers"];
    assert_eq!(e["dtfed-code"], "bad_room", "{r}");
    assert_eq!(e["receipt-id"], "sub-x", "{r}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("/topic/nowhere")),
        "{r}"
    );
    assert_eq!(r["close"]["code"], 1000, "{r}");

    let r = error_case(&d, &["bad-frame"], &[]).await?;
    assert!(
        r["error"]["raw"]
            .as_str()
            .is_some_and(|m| m.contains("dtfed-code:bad_frame") && m.contains("has no colon")),
        "{r}"
    );
    assert!(r["close"].is_object(), "{r}");

    // Over client.max_frame_bytes (but within what the socket buffers): ERROR, nothing stored.
    let r = error_case(&d, &["too-large", "1500"], &[]).await?;
    assert_eq!(r["error"]["headers"]["dtfed-code"], "too_large", "{r}");
    assert!(r["close"].is_object(), "{r}");
    assert!(stored(&d, "big").await?.is_empty());

    // Ten sends at once with a burst of 2: two RECEIPTs, then ERROR for the third (with its
    // receipt-id) and the close; exactly two stored.
    let r = error_case(&d, &["rate", "10"], &[]).await?;
    assert_eq!(r["error"]["headers"]["dtfed-code"], "rate_limited", "{r}");
    assert_eq!(r["error"]["headers"]["receipt-id"], "r2", "{r}");
    assert_eq!(r["receipts"], json!(["r0", "r1"]), "{r}");
    assert_eq!(r["errors"], 1, "{r}");
    let flood = stored(&d, "flood").await?;
    assert_eq!(flood.len(), 2, "{flood:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_takes_the_token_from_passcode_and_enforces_its_rooms() -> Result<()> {
    let secret = "a-test-secret-of-enough-length";
    let cfg = ConfigBuilder::shared("stomp-jwt", "seoul")?
        .unthrottled()
        .auth_jwt(secret);
    let d = start(cfg).await?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let alice = hs256(
        secret,
        &json!({"sub": "alice", "exp": exp, "rooms": ["table-*"]}),
    );
    let bob = hs256(secret, &json!({"sub": "bob", "exp": exp}));
    let room = "table-1";
    let mut bob_ws = WsClient::connect(&d.ws_url_with_token(&bob)).await?;
    bob_ws.sub(room, None, T).await?;

    let sync = TestDir::new("stomp-jwt")?;
    let script = NodeScript::new("stomp", "chat.mjs")
        .arg(stomp_url(&d))
        .arg(room)
        .arg(sync.path().display().to_string())
        .arg("bob")
        .arg("1")
        // The login header is not who the player is in jwt mode: the token's `sub` is.
        .env("LOGIN", "alice")
        .env("PASSCODE", alice.clone())
        .deadline(Duration::from_secs(60))
        .start()?;
    let flag = sync.path().join("subscribed");
    tokio::task::spawn_blocking(move || wait_for_file(&flag, T)).await??;
    bob_ws.publish(room, json!({"text": "hi alice"}), T).await?;
    let out = tokio::task::spawn_blocking(move || script.finish()).await??;
    out.ensure_success()?;
    assert_eq!(
        lines(&out, "CONNECTED")?[0]["headers"]["user-name"],
        "alice"
    );
    let from_alice = bob_ws
        .recv_until(|f| f["op"] == "msg" && f["from"] == "alice", T)
        .await?;
    assert_eq!(from_alice["room"], room);

    // Outside the token's rooms: ERROR forbidden, as on /ws (the token given this time in
    // an `Authorization: Bearer` header).
    let r = error_case(&d, &["forbidden", "secret-room"], &[("BEARER", &alice)]).await?;
    assert_eq!(r["error"]["headers"]["dtfed-code"], "forbidden", "{r}");
    assert!(r["close"].is_object(), "{r}");
    // A bad token, or none: ERROR unauthorized, close 1008.
    let r = error_case(&d, &["unauthorized"], &[("PASSCODE", "not-a-token")]).await?;
    assert_eq!(r["error"]["headers"]["dtfed-code"], "unauthorized", "{r}");
    assert_eq!(r["close"]["code"], 1008, "{r}");
    let r = error_case(&d, &["unauthorized"], &[]).await?;
    assert_eq!(r["error"]["headers"]["dtfed-code"], "unauthorized", "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_dtfed_since_resumes_exactly_after_the_cursor() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-resume", "seoul")?.unthrottled();
    let d = start(cfg).await?;
    let room = "saga";
    let mut v1 = WsClient::connect(&d.ws_url_as("bard")).await?;
    let mut offsets = Vec::new();
    for i in 0..5 {
        let ack = v1.publish(room, json!({"verse": i}), T).await?;
        offsets.push(ack["offset"].as_i64().context("offset")?);
    }
    let resume = |since: String, count: usize| {
        NodeScript::new("stomp", "resume.mjs")
            .arg(stomp_url(&d))
            .arg(room)
            .arg(since)
            .arg(count.to_string())
            .deadline(Duration::from_secs(60))
    };
    // From after the second message: exactly the last three, in order.
    let out = node(resume(json!({"seoul": offsets[1]}).to_string(), 3)).await?;
    out.ensure_success()?;
    let got = lines(&out, "MESSAGE")?;
    let got_offsets: Vec<i64> = got.iter().map(|m| position(m).1).collect();
    assert_eq!(got_offsets, offsets[2..].to_vec(), "{got:#?}");
    assert_eq!(got[0]["prev"], offsets[1]);
    assert_eq!(got[2]["body"], r#"{"verse":4}"#);
    // The cursor a client keeps from those headers resumes with nothing twice.
    let cursor = lines(&out, "RESULT")?[0]["cursor"].to_string();
    v1.publish(room, json!({"verse": 5}), T).await?;
    let out = node(resume(cursor, 1)).await?;
    out.ensure_success()?;
    let got = lines(&out, "MESSAGE")?;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["body"], r#"{"verse":5}"#);
    // An empty cursor replays everything; a region this one does not know is an ERROR.
    let out = node(resume("{}".into(), 6)).await?;
    out.ensure_success()?;
    assert_eq!(lines(&out, "MESSAGE")?.len(), 6);
    let out = node(resume(r#"{"mars":1}"#.into(), 1)).await?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("mars"), "{}", out.stderr);
    Ok(())
}

/// The shortened heart-beat test: a client that promised heart-beats and sends them stays
/// connected well past `client.idle_timeout_ms`; one that promised them and goes silent is
/// told why and closed (4003) after twice the negotiated interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heart_beats_keep_a_connection_alive_and_their_absence_closes_it() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-beats", "seoul")?
        .set("client", "ping_interval_ms", 500)
        .set("client", "idle_timeout_ms", 1000)
        .merge_toml("[stomp]\nheart_beat_ms = [500, 500]\n");
    let d = start(cfg).await?;
    let raw = |every: &str| {
        NodeScript::new("stomp", "silent.mjs")
            .arg(stomp_url(&d))
            .arg("1000,1000")
            .arg(every.to_string())
            .arg("4000")
            .deadline(Duration::from_secs(30))
    };
    let out = node(raw("300")).await?;
    out.ensure_success()?;
    let r = &lines(&out, "RESULT")?[0];
    assert!(
        r["connected"].to_string().contains("heart-beat:500,500"),
        "{r}"
    );
    assert!(r["close"].is_null(), "beating client was closed: {r}");
    // The server beats every max(500, 1000) ms.
    assert!(
        r["serverBeats"]
            .as_i64()
            .is_some_and(|n| (3..=6).contains(&n)),
        "{r}"
    );

    let out = node(raw("0")).await?;
    out.ensure_success()?;
    assert_idle_close(&lines(&out, "RESULT")?[0], "no heart-beat", 1900..3500);

    // Heart-beats without a CONNECT do not hold a socket: closed after the idle timeout.
    let out = node(raw("300").env("NO_CONNECT", "1")).await?;
    out.ensure_success()?;
    assert_idle_close(&lines(&out, "RESULT")?[0], "no CONNECT", 800..2500);
    Ok(())
}

/// The issue's test: `@stomp/stompjs` with its default heart-beats (10 s each way) against
/// the default `[stomp]` (30 s), idle for a full minute and more, then still chatting.
/// The server would close a silent client after 2 × 30 s, and stompjs a silent server
/// likewise: both ends' heart-beats keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stompjs_stays_connected_over_an_idle_minute_on_heart_beats() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-idle", "seoul")?;
    let d = start(cfg).await?;
    let out = node(
        NodeScript::new("stomp", "idle.mjs")
            .arg(stomp_url(&d))
            .arg("lounge")
            .arg("65000")
            .arg("10000")
            .arg("10000")
            .deadline(Duration::from_secs(120)),
    )
    .await?;
    out.ensure_success()?;
    let r = &lines(&out, "RESULT")?[0];
    assert!(r["idleFor"].as_i64().is_some_and(|ms| ms >= 65_000), "{r}");
    // Server heart-beats at 30 s and 60 s.
    assert!(r["heartbeats"].as_i64().is_some_and(|n| n >= 2), "{r}");
    assert_eq!(r["heartbeatLost"], 0, "{r}");
    assert!(r["close"].is_null(), "{r}");
    Ok(())
}

/// A RECEIPT means Kafka has the message: with the broker stopped, a SEND with a receipt
/// gets no RECEIPT, but `ERROR` `unavailable` with its `receipt-id` once
/// `kafka.publish_timeout_ms` passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_receipt_without_kafka_only_error_unavailable() -> Result<()> {
    let mut kafka = tokio::task::spawn_blocking(dtfed_tests::KafkaBroker::start).await??;
    let cfg = ConfigBuilder::new("stomp-outage", "seoul")
        .kafka(&kafka.bootstrap())
        .redis(&dtfed_tests::RedisServer::shared()?.url())
        .set("kafka", "publish_timeout_ms", 2000);
    let d = start(cfg).await?;
    let sync = TestDir::new("stomp-outage")?;
    let script = NodeScript::new("stomp", "outage.mjs")
        .arg(stomp_url(&d))
        .arg("archive")
        .arg(sync.path().display().to_string())
        .deadline(Duration::from_secs(90))
        .start()?;
    let ready = sync.path().join("ready");
    tokio::task::spawn_blocking(move || wait_for_file(&ready, T)).await??;
    let go = sync.path().join("go");
    let mut kafka = tokio::task::spawn_blocking(move || -> Result<_> {
        kafka.stop()?;
        std::fs::write(&go, "go")?;
        Ok(kafka)
    })
    .await??;
    let out = tokio::task::spawn_blocking(move || script.finish()).await??;
    out.ensure_success()?;
    let r = &lines(&out, "RESULT")?[0];
    assert!(r["before"]["dtfed-offset"].is_string(), "{r}");
    assert!(r["during"].is_null(), "a RECEIPT without Kafka: {r}");
    assert_eq!(r["error"]["headers"]["dtfed-code"], "unavailable", "{r}");
    assert_eq!(r["error"]["headers"]["receipt-id"], "during-1", "{r}");
    assert!(
        r["errorAfterMs"].as_i64().is_some_and(|ms| ms >= 1500),
        "{r}"
    );
    drop(d);
    tokio::task::spawn_blocking(move || kafka.stop()).await??;
    Ok(())
}

/// Version negotiation and what differs between versions, on the raw wire: 1.0 (no
/// `accept-version`) needs no subscription id and escapes no header; 1.2 escapes (a `:` in
/// a player's name is `\c`); no version in common is an ERROR naming the supported ones.
/// Admission is `/ws`'s: an Origin outside `client.allowed_origins` is refused with 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_1_0_to_1_2_negotiate_and_escape_as_the_spec_says() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-versions", "seoul")?
        .unthrottled()
        .set("client", "allowed_origins", vec!["https://play.example"]);
    let d = start(cfg).await?;
    let run = |accept: &str, room: &str| {
        NodeScript::new("stomp", "versions.mjs")
            .arg(stomp_url(&d))
            .arg(accept)
            .arg("ann:the:bard")
            .arg(room)
            .deadline(Duration::from_secs(30))
    };
    let result = |out: &NodeOutput| -> Result<Value> {
        out.ensure_success()?;
        lines(out, "RESULT")?.pop().context("no RESULT")
    };
    let r = result(&node(run("-", "v10")).await?)?;
    let frames = raw_frames(&r)?;
    assert!(frames[0].contains("\nversion:1.0\n"), "{r}");
    let msg = first_message(&frames)?;
    assert!(msg.contains("\ndtfed-from:ann:the:bard\n"), "{msg}");
    assert!(msg.contains("\nsubscription:/sub/chat/room/v10\n"), "{msg}");

    let r = result(&node(run("1.1,1.2", "v12").env("WITH_ID", "1")).await?)?;
    assert_eq!(r["protocol"], "v12.stomp");
    let frames = raw_frames(&r)?;
    assert!(frames[0].contains("\nversion:1.2\n"), "{r}");
    let msg = first_message(&frames)?;
    assert!(msg.contains("\ndtfed-from:ann\\cthe\\cbard\n"), "{msg}");
    assert!(msg.contains("\nsubscription:s-1\n"), "{msg}");
    // From 1.1 on a subscription needs an id.
    let r = result(&node(run("1.2", "v12b")).await?)?;
    let frames = raw_frames(&r)?;
    assert!(
        frames
            .iter()
            .any(|f| f.starts_with("ERROR") && f.contains("needs an id")),
        "{r}"
    );
    assert!(!frames.iter().any(|f| f.starts_with("MESSAGE")), "{r}");

    let r = result(&node(run("2.0", "v20")).await?)?;
    let frames = raw_frames(&r)?;
    assert!(
        frames[0].starts_with("ERROR") && frames[0].contains("\nversion:1.0,1.1,1.2\n"),
        "{r}"
    );

    let url = stomp_url(&d);
    let status = WsClient::handshake_status(&url, &[("Origin", "https://evil.example")]).await?;
    assert_eq!(status, 403);
    Ok(())
}

/// SIGTERM: a STOMP client is told why (`ERROR` "server shutting down") and closed with
/// 1001, as v1 players are, and the daemon exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_error_then_closes_1001() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-shutdown", "seoul")?;
    let mut d = start(cfg).await?;
    let sync = TestDir::new("stomp-shutdown")?;
    let script = NodeScript::new("stomp", "errors.mjs")
        .arg(stomp_url(&d))
        .arg("shutdown")
        .arg(sync.path().display().to_string())
        .deadline(Duration::from_secs(60))
        .start()?;
    let ready = sync.path().join("ready");
    let status = tokio::task::spawn_blocking(move || -> Result<_> {
        wait_for_file(&ready, T)?;
        d.terminate()
    })
    .await??;
    assert!(status.success(), "{status}");
    let out = tokio::task::spawn_blocking(move || script.finish()).await??;
    out.ensure_success()?;
    let r = &lines(&out, "RESULT")?[0];
    assert_eq!(r["close"]["code"], 1001, "{r}");
    assert!(
        r["error"]["headers"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("server shutting down")),
        "{r}"
    );
    Ok(())
}

/// A resume that needs the Kafka log for more than one read's limit (1,000 messages): the
/// server continues the replay itself, piece after piece (a STOMP client cannot ask for
/// the next one), and the client gets every message once, in order, `dtfed-prev` chained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_resume_from_the_log_arrives_whole_and_in_order() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-long-resume", "seoul")?
        .unthrottled()
        .set("history", "max_messages", 10);
    let d = start(cfg).await?;
    let room = "chronicle";
    let total = 2_100;
    let mut v1 = WsClient::connect(&d.ws_url_as("scribe")).await?;
    for i in 0..total {
        v1.send_json(&json!({"op": "pub", "room": room, "body": {"n": i}}))
            .await?;
    }
    for _ in 0..total {
        v1.recv_until(|f| f["op"] == "ack", T).await?;
    }
    let out = node(
        NodeScript::new("stomp", "resume.mjs")
            .arg(stomp_url(&d))
            .arg(room)
            .arg("{}")
            .arg(total.to_string())
            .deadline(Duration::from_secs(90)),
    )
    .await?;
    out.ensure_success()?;
    let got = lines(&out, "MESSAGE")?;
    assert_eq!(got.len(), total, "every message once");
    for (i, m) in got.iter().enumerate() {
        let body: Value = serde_json::from_str(m["body"].as_str().unwrap_or(""))?;
        assert_eq!(body, json!({"n": i}), "message {i} in order");
        if i > 0 {
            assert_eq!(m["prev"], got[i - 1]["offset"], "prev chain at {i}");
        }
    }
    Ok(())
}

/// `dtfed-ref` makes a SEND idempotent like v1's `ref`: a retry gets the RECEIPT of the
/// message already stored (same offset), never a second copy; another ref is another
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_with_the_same_dtfed_ref_is_stored_once() -> Result<()> {
    let cfg = ConfigBuilder::shared("stomp-idempotent", "seoul")?.unthrottled();
    let d = start(cfg).await?;
    let out = node(
        NodeScript::new("stomp", "idempotent.mjs")
            .arg(stomp_url(&d))
            .arg("dice")
            .deadline(Duration::from_secs(60)),
    )
    .await?;
    out.ensure_success()?;
    let r = &lines(&out, "RESULT")?[0]["receipts"];
    assert_eq!(r[0]["dtfed-offset"], r[1]["dtfed-offset"], "{r}");
    assert_ne!(r[0]["dtfed-offset"], r[2]["dtfed-offset"], "{r}");
    let stored = stored(&d, "dice").await?;
    assert_eq!(stored.len(), 2, "{stored:#?}");
    Ok(())
}

/// Redis (the bus) killed and restarted while a room is busy: live delivery to a STOMP
/// subscriber has a hole, and the session backfills it from history before going on, so
/// the STOMP client gets exactly the acknowledged messages, in order, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_costs_a_stomp_subscriber_nothing() -> Result<()> {
    let redis = tokio::task::spawn_blocking(dtfed_tests::RedisServer::start).await??;
    let brokers =
        tokio::task::spawn_blocking(|| dtfed_tests::KafkaBroker::shared().map(|k| k.bootstrap()))
            .await??;
    let cfg = ConfigBuilder::new("stomp-redis-restart", "seoul")
        .unthrottled()
        .kafka(&brokers)
        .redis(&redis.url())
        .partitions(2);
    let d = start(cfg).await?;
    let total = 120;
    let sync = TestDir::new("stomp-redis")?;
    let watcher = NodeScript::new("stomp", "resume.mjs")
        .arg(stomp_url(&d))
        .arg("tower")
        .arg("-")
        .arg(total.to_string())
        .env("SYNC_DIR", sync.path().display().to_string())
        .env("WAIT_MS", "60000")
        .deadline(Duration::from_secs(90))
        .start()?;
    let flag = sync.path().join("subscribed");
    tokio::task::spawn_blocking(move || wait_for_file(&flag, T)).await??;
    let mut caller = WsClient::connect(&d.ws_url_as("caller")).await?;
    let mut acked = Vec::new();
    let mut redis = Some(redis);
    for i in 0..total {
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
    let out = tokio::task::spawn_blocking(move || watcher.finish()).await??;
    out.ensure_success()?;
    let got: Vec<i64> = lines(&out, "MESSAGE")?
        .iter()
        .map(|m| position(m).1)
        .collect();
    assert_eq!(got, acked);
    drop(redis);
    Ok(())
}

/// The raw frames a `versions.mjs` run recorded, in order.
fn raw_frames(r: &Value) -> Result<Vec<&str>> {
    Ok(r["frames"]
        .as_array()
        .context("frames")?
        .iter()
        .filter_map(Value::as_str)
        .collect())
}

/// The first `MESSAGE` among raw frames.
fn first_message<'a>(frames: &[&'a str]) -> Result<&'a str> {
    frames
        .iter()
        .find(|f| f.starts_with("MESSAGE"))
        .copied()
        .context("MESSAGE")
}

/// A `raw.mjs` result closed as idle (4003) after an ERROR saying `why`, within `after_ms`.
fn assert_idle_close(r: &Value, why: &str, after_ms: std::ops::Range<i64>) {
    assert_eq!(r["close"]["code"], 4003, "{r}");
    assert!(r["error"].as_str().is_some_and(|e| e.contains(why)), "{r}");
    let after = r["closedAfter"].as_i64().unwrap_or(0);
    assert!(after_ms.contains(&after), "closed after {after} ms: {r}");
}
