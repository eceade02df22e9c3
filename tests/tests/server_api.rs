//! The server API (`POST`/`GET /api/v1/rooms/{room}/messages`) against real Kafka, Redis and
//! `dtfed` daemons, as a game server sees it: what it publishes reaches the room's players
//! with its `from`; a retry with the same `Idempotency-Key` is stored once, whichever daemon
//! of the region it reaches; every refusal has its HTTP status and v1 error code and stores
//! nothing; reads page with `since`/`limit`, `last` gives a chat's first screen; and in a
//! federation one region's API reads another region's messages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::harness::{Federation, FederationSpec};
use dtfed_tests::{
    http_request, ConfigBuilder, DtfedProcess, HttpResponse, KafkaBroker, RedisServer, WsClient,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// The game master's key: every room.
const GM_ENV: &str = "DTFED_TEST_API_KEY_GM";
const GM: &str = "gm-secret-0123456789abcdef";
/// A key for `table-*` only.
const TABLES_ENV: &str = "DTFED_TEST_API_KEY_TABLES";
const TABLES: &str = "tables-secret-0123456789abcdef";
/// A key allowed one publish per second, burst 2.
const SLOW_ENV: &str = "DTFED_TEST_API_KEY_SLOW";
const SLOW: &str = "slow-secret-0123456789abcdef";

const KEYS: &str = r#"
[[api.keys]]
name = "gm"
secret_env = "DTFED_TEST_API_KEY_GM"
rooms = ["*"]
publish_rate_per_sec = 1000
publish_burst = 1000

[[api.keys]]
name = "tables"
secret_env = "DTFED_TEST_API_KEY_TABLES"
rooms = ["table-*"]

[[api.keys]]
name = "slow"
secret_env = "DTFED_TEST_API_KEY_SLOW"
rooms = ["*"]
publish_rate_per_sec = 1
publish_burst = 2
"#;

fn env() -> Vec<(String, String)> {
    [(GM_ENV, GM), (TABLES_ENV, TABLES), (SLOW_ENV, SLOW)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn start(cfg: ConfigBuilder) -> Result<DtfedProcess> {
    let toml = cfg.merge_toml(KEYS).build();
    tokio::task::spawn_blocking(move || {
        let env = env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        DtfedProcess::start_with_env(&toml, &env)
    })
    .await?
}

/// One HTTP request, off the async runtime (the harness's client blocks).
async fn call(
    addr: SocketAddr,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<HttpResponse> {
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        http_request(addr, method, &path, &headers, &body)
    })
    .await?
}

fn bearer(secret: &str) -> Vec<(String, String)> {
    vec![("Authorization".into(), format!("Bearer {secret}"))]
}

/// `POST` raw `body` to `room` with `secret` and an optional `Idempotency-Key`.
async fn post_raw(
    addr: SocketAddr,
    room: &str,
    secret: Option<&str>,
    idempotency: Option<&str>,
    body: Vec<u8>,
) -> Result<HttpResponse> {
    let mut headers = secret.map(bearer).unwrap_or_default();
    headers.push(("Content-Type".into(), "application/json".into()));
    if let Some(k) = idempotency {
        headers.push(("Idempotency-Key".into(), k.into()));
    }
    call(
        addr,
        "POST",
        format!("/api/v1/rooms/{room}/messages"),
        headers,
        body,
    )
    .await
}

async fn post(
    addr: SocketAddr,
    room: &str,
    secret: &str,
    request: Value,
    idempotency: Option<&str>,
) -> Result<HttpResponse> {
    post_raw(
        addr,
        room,
        Some(secret),
        idempotency,
        request.to_string().into_bytes(),
    )
    .await
}

/// Publishes as a game server does: a 503 is retried (with the same `Idempotency-Key`)
/// until it is answered. Returns the stored offset.
async fn publish(
    addr: SocketAddr,
    room: &str,
    request: Value,
    idempotency: Option<&str>,
) -> Result<i64> {
    let deadline = Instant::now() + T;
    loop {
        let r = post(addr, room, GM, request.clone(), idempotency).await?;
        if r.status == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        anyhow::ensure!(r.status == 200, "POST {room}: {} {}", r.status, r.body);
        let v = r.json()?;
        anyhow::ensure!(v["room"] == room, "{v}");
        return v["offset"]
            .as_i64()
            .with_context(|| format!("offset in {v}"));
    }
}

async fn get(addr: SocketAddr, room: &str, query: &str, secret: &str) -> Result<HttpResponse> {
    call(
        addr,
        "GET",
        format!("/api/v1/rooms/{room}/messages?{query}"),
        bearer(secret),
        Vec::new(),
    )
    .await
}

/// `GET ... ?since=<cursor>&limit=N` answered 200, as JSON.
async fn page(addr: SocketAddr, room: &str, since: &Value, limit: usize) -> Result<Value> {
    let q = format!("since={}&limit={limit}", percent_encode(&since.to_string()));
    let r = get(addr, room, &q, GM).await?;
    anyhow::ensure!(r.status == 200, "GET {room}?{q}: {} {}", r.status, r.body);
    r.json()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Waits until a read of `room` from the start holds `n` messages: reads serve what the
/// fan-out has applied, a few milliseconds after the append was acknowledged.
async fn applied(addr: SocketAddr, room: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        let p = page(addr, room, &json!({}), 1000).await?;
        if messages(&p).len() >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{room} never held {n} messages: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(origin, offset, from, body)` of every message of a page.
fn messages(page: &Value) -> Vec<(String, i64, String, Value)> {
    page["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| {
                    (
                        m["origin"].as_str().unwrap_or("").to_owned(),
                        m["offset"].as_i64().unwrap_or(-1),
                        m["from"].as_str().unwrap_or("").to_owned(),
                        m["body"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts a refusal: `status`, JSON `{"code": code, "message": ...}`.
fn refused(r: &HttpResponse, status: u16, code: &str) -> Result<()> {
    anyhow::ensure!(
        r.status == status,
        "expected {status} {code}, got {} {}",
        r.status,
        r.body
    );
    let v = r.json()?;
    anyhow::ensure!(
        v["code"] == code && v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "expected code {code} with a message, got {v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_reaches_players_and_a_retry_is_stored_once_on_any_daemon() -> Result<()>
{
    let cfg = ConfigBuilder::shared("api-publish", "seoul")?.partitions(2);
    let a = start(cfg.clone().node("a")).await?;
    let b = start(cfg.node("b")).await?;
    let mut ann = WsClient::connect(&a.ws_url_as("ann")).await?;
    ann.sub("tavern", None, T).await?;

    let said = json!({"from": "narrator", "body": {"text": "The door creaks open."}});
    let r = post(a.client_addr(), "tavern", GM, said.clone(), Some("scene-1")).await?;
    anyhow::ensure!(r.status == 200, "{} {}", r.status, r.body);
    let stored = r.json()?;
    assert_eq!(stored["origin"], "seoul", "{stored}");
    let offset = stored["offset"].as_i64().context("offset")?;
    let msg = ann.recv_until(|f| f["op"] == "msg", T).await?;
    assert_eq!(
        (
            &msg["room"],
            &msg["origin"],
            &msg["offset"],
            &msg["from"],
            &msg["body"]
        ),
        (
            &json!("tavern"),
            &json!("seoul"),
            &json!(offset),
            &json!("narrator"),
            &said["body"]
        ),
        "{msg}"
    );

    // The game server did not see the answer and retries, through the other daemon.
    let again = publish(b.client_addr(), "tavern", said.clone(), Some("scene-1")).await?;
    assert_eq!(again, offset, "a retry is answered with the first record");
    // The same key with another body is another message.
    let other = json!({"from": "narrator", "body": {"text": "A draft blows out the candles."}});
    let second = publish(a.client_addr(), "tavern", other.clone(), Some("scene-1")).await?;
    assert_ne!(second, offset);
    let msg = ann.recv_until(|f| f["op"] == "msg", T).await?;
    assert_eq!(
        (&msg["offset"], &msg["body"]),
        (&json!(second), &other["body"])
    );
    ann.expect_silence(Duration::from_secs(2)).await?;

    // The log agrees: two records, in order, from the other daemon too.
    applied(b.client_addr(), "tavern", 2).await?;
    let all = page(b.client_addr(), "tavern", &json!({}), 100).await?;
    let got: Vec<i64> = messages(&all).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![offset, second], "{all}");
    // And a v1 resume from before them sees the same two.
    let mut bob = WsClient::connect(&b.ws_url_as("bob")).await?;
    let resumed = bob.sub("tavern", Some(json!({})), T).await?;
    let offsets: Vec<&Value> = resumed.messages().iter().map(|m| &m["offset"]).collect();
    assert_eq!(offsets, vec![&json!(offset), &json!(second)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_v1_code_and_stores_nothing() -> Result<()> {
    let cfg = ConfigBuilder::shared("api-refusals", "seoul")?
        .partitions(1)
        .set("client", "max_frame_bytes", 1024);
    let d = start(cfg).await?;
    let addr = d.client_addr();
    let ok = json!({"from": "narrator", "body": {"text": "hello"}});
    let bytes = |v: &Value| v.to_string().into_bytes();

    // 401: no key, a wrong key, a key in the wrong scheme.
    let r = post_raw(addr, "tavern", None, None, bytes(&ok)).await?;
    refused(&r, 401, "unauthorized")?;
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")),
        "{:?}",
        r.headers
    );
    refused(
        &post_raw(
            addr,
            "tavern",
            Some("not-a-key-0123456789"),
            None,
            bytes(&ok),
        )
        .await?,
        401,
        "unauthorized",
    )?;
    let basic = vec![("Authorization".to_owned(), format!("Basic {GM}"))];
    let r = call(
        addr,
        "GET",
        "/api/v1/rooms/tavern/messages".into(),
        basic,
        vec![],
    )
    .await?;
    refused(&r, 401, "unauthorized")?;

    // 400 bad_room, 403 forbidden (the key's room patterns, both ways).
    refused(
        &post(addr, "no$room", GM, ok.clone(), None).await?,
        400,
        "bad_room",
    )?;
    refused(
        &post(addr, "lobby", TABLES, ok.clone(), None).await?,
        403,
        "forbidden",
    )?;
    refused(
        &get(addr, "lobby", "last=5", TABLES).await?,
        403,
        "forbidden",
    )?;
    let r = post(addr, "table-1", TABLES, ok.clone(), None).await?;
    anyhow::ensure!(
        r.status == 200,
        "table-1 is the tables key's: {} {}",
        r.status,
        r.body
    );

    // 413: over client.max_frame_bytes.
    let big = json!({"from": "narrator", "body": "x".repeat(2000)});
    refused(
        &post(addr, "tavern", GM, big, None).await?,
        413,
        "too_large",
    )?;

    // 400 bad_frame: what the request says is not a message.
    for (body, why) in [
        (b"not json".to_vec(), "not JSON"),
        (bytes(&json!({"body": 1})), "no from"),
        (bytes(&json!({"from": "", "body": 1})), "empty from"),
        (
            bytes(&json!({"from": "a\nb", "body": 1})),
            "control character in from",
        ),
        (
            bytes(&json!({"from": "x".repeat(65), "body": 1})),
            "from too long",
        ),
        (bytes(&json!({"from": "narrator"})), "no body"),
        (
            bytes(&json!({"from": "narrator", "body": null})),
            "null body",
        ),
    ] {
        let r = post_raw(addr, "tavern", Some(GM), None, body).await?;
        refused(&r, 400, "bad_frame").with_context(|| why)?;
    }
    let long_key = "k".repeat(129);
    refused(
        &post(addr, "tavern", GM, ok.clone(), Some(&long_key)).await?,
        400,
        "bad_frame",
    )?;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "since=notjson",
        "since=%7B%22atlantis%22%3A1%7D",
        "last=0",
        "last=3&since=%7B%7D",
        "bogus=1",
    ] {
        let r = get(addr, "tavern", query, GM).await?;
        refused(&r, 400, "bad_frame").with_context(|| query.to_owned())?;
    }

    // 429: the slow key's burst is 2.
    for i in 0..2 {
        let r = post(
            addr,
            "slow-room",
            SLOW,
            json!({"from": "bot", "body": i}),
            None,
        )
        .await?;
        anyhow::ensure!(r.status == 200, "within the burst: {} {}", r.status, r.body);
    }
    let r = post(
        addr,
        "slow-room",
        SLOW,
        json!({"from": "bot", "body": 2}),
        None,
    )
    .await?;
    refused(&r, 429, "rate_limited")?;
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another key is not held back by it.
    publish(addr, "slow-room", json!({"from": "gm", "body": 3}), None).await?;

    // Nothing refused was stored.
    applied(addr, "slow-room", 3).await?;
    applied(addr, "table-1", 1).await?;
    let count = |v: &Value| messages(v).len();
    assert_eq!(count(&page(addr, "tavern", &json!({}), 100).await?), 0);
    assert_eq!(count(&page(addr, "lobby", &json!({}), 100).await?), 0);
    assert_eq!(count(&page(addr, "table-1", &json!({}), 100).await?), 1);
    let slow = page(addr, "slow-room", &json!({}), 100).await?;
    let bodies: Vec<Value> = messages(&slow).into_iter().map(|m| m.3).collect();
    assert_eq!(bodies, vec![json!(0), json!(1), json!(3)], "{slow}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_kafka_does_not_acknowledge_is_503_and_its_retry_is_stored_once() -> Result<()> {
    let (mut kafka, redis) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((KafkaBroker::start()?, RedisServer::shared()?))
    })
    .await??;
    let cfg = ConfigBuilder::new("api-unavailable", "seoul")
        .kafka(&kafka.bootstrap())
        .redis(&redis.url())
        .partitions(1)
        .set("kafka", "publish_timeout_ms", 1500);
    let d = start(cfg).await?;
    let addr = d.client_addr();
    let before = publish(
        addr,
        "tavern",
        json!({"from": "gm", "body": "before"}),
        None,
    )
    .await?;
    let mut kafka = tokio::task::spawn_blocking(move || {
        kafka.stop()?;
        anyhow::Ok(kafka)
    })
    .await??;
    let during = json!({"from": "gm", "body": "during"});
    let started = Instant::now();
    let r = post(addr, "tavern", GM, during.clone(), Some("k-during")).await?;
    refused(&r, 503, "unavailable")?;
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered within the publish timeout and its guard: {:?}",
        started.elapsed()
    );
    // The game server retries with the same key while Kafka is back: stored once, whether
    // or not the first attempt reached the log.
    let kafka = tokio::task::spawn_blocking(move || {
        kafka.restart()?;
        anyhow::Ok(kafka)
    })
    .await??;
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let r = post(addr, "tavern", GM, during.clone(), Some("k-during")).await?;
        if r.status == 200 {
            break r.json()?["offset"].as_i64().context("offset")?;
        }
        refused(&r, 503, "unavailable")?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "Kafka never came back: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let again = publish(addr, "tavern", during.clone(), Some("k-during")).await?;
    assert_eq!(again, stored);
    applied(addr, "tavern", 2).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = page(addr, "tavern", &json!({}), 100).await?;
    let got: Vec<(i64, Value)> = messages(&all).into_iter().map(|m| (m.1, m.3)).collect();
    assert_eq!(
        got,
        vec![(before, json!("before")), (stored, json!("during"))],
        "{all}"
    );
    drop(kafka);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_page_with_since_and_limit_and_last_gives_the_newest() -> Result<()> {
    let cfg = ConfigBuilder::shared("api-read", "seoul")?.partitions(2);
    let d = start(cfg).await?;
    let addr = d.client_addr();
    let mut stored = Vec::new();
    for i in 0..7 {
        let o = publish(
            addr,
            "saga",
            json!({"from": "bard", "body": {"verse": i}}),
            None,
        )
        .await?;
        stored.push((
            "seoul".to_owned(),
            o,
            "bard".to_owned(),
            json!({"verse": i}),
        ));
    }
    // A player's message is in the same room, in order.
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let ack = ann.publish("saga", json!({"text": "encore!"}), T).await?;
    let o = ack["offset"].as_i64().context("offset")?;
    stored.push((
        "seoul".to_owned(),
        o,
        "ann".to_owned(),
        json!({"text": "encore!"}),
    ));
    applied(addr, "saga", stored.len()).await?;

    // Pages of 3, oldest first, each from the cursor of the one before.
    let mut cursor = json!({});
    let mut got = Vec::new();
    let mut pages = 0;
    loop {
        let p = page(addr, "saga", &cursor, 3).await?;
        let m = messages(&p);
        assert!(m.len() <= 3, "{p}");
        got.extend(m);
        cursor = p["cursor"].clone();
        pages += 1;
        if p["more"] == false {
            break;
        }
        anyhow::ensure!(pages < 10, "paging does not end: {p}");
    }
    assert_eq!(got, stored);
    assert_eq!(pages, 3, "8 messages in pages of 3");
    assert_eq!(cursor, json!({"seoul": o}));
    let after = page(addr, "saga", &cursor, 3).await?;
    assert!(
        messages(&after).is_empty() && after["more"] == false,
        "{after}"
    );
    // The cursor is a v1 cursor: a player resumes from it with nothing more to see.
    let resumed = ann.sub("saga", Some(cursor.clone()), T).await?;
    assert!(resumed.messages().is_empty(), "{:?}", resumed.frames);

    // The newest 2, oldest first, and the cursor to follow the room from.
    let r = get(addr, "saga", "last=2", GM).await?;
    anyhow::ensure!(r.status == 200, "{} {}", r.status, r.body);
    let last = r.json()?;
    assert_eq!(
        messages(&last),
        stored[stored.len() - 2..].to_vec(),
        "{last}"
    );
    assert_eq!(last["cursor"], cursor);
    let r = get(addr, "saga", "last=100", GM).await?;
    assert_eq!(messages(&r.json()?), stored);
    let r = get(addr, "empty-room", "last=10", GM).await?;
    let empty = r.json()?;
    assert!(
        messages(&empty).is_empty() && empty["cursor"] == json!({}),
        "{empty}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_reads_another_regions_messages_from_its_mirror_topic() -> Result<()> {
    let mut spec = FederationSpec::new("api-federated", &["seoul", "tokyo"], 1);
    spec.partitions = 2;
    // A hot history of 2: the older messages come from tokyo's mirror topic of seoul.
    spec.extra_config = format!("{KEYS}\n[history]\nmax_messages = 2\n");
    spec.env = env();
    let fed = Federation::start(spec).await?;
    let seoul = fed.region("seoul").daemons[0].client_addr();
    let tokyo = fed.region("tokyo").daemons[0].client_addr();
    let mut stored = Vec::new();
    for i in 0..5 {
        let body = json!({"line": i});
        let o = publish(
            seoul,
            "council",
            json!({"from": "herald", "body": body}),
            None,
        )
        .await?;
        stored.push(("seoul".to_owned(), o, "herald".to_owned(), body));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = page(tokyo, "council", &json!({}), 100).await?;
        let got = messages(&p);
        if got.len() >= stored.len() {
            assert_eq!(got, stored, "{p}");
            assert!(p["gaps"].as_array().is_some_and(Vec::is_empty), "{p}");
            assert_eq!(p["cursor"], json!({"seoul": stored[4].1}));
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "tokyo never served seoul's 5 messages: {p}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Paged there too, from the mirror topic.
    let first = page(tokyo, "council", &json!({}), 2).await?;
    assert_eq!(messages(&first), stored[..2].to_vec(), "{first}");
    assert_eq!(first["more"], true);
    let rest = page(tokyo, "council", &first["cursor"], 100).await?;
    assert_eq!(messages(&rest), stored[2..].to_vec(), "{rest}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtfed_demo_serves_the_api_under_dtfed_api_key_and_says_how() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let dir = dtfed_tests::TestDir::new("api-demo")?;
    let err_path = dir.path().join("stderr.txt");
    let mut cmd = std::process::Command::new(DtfedProcess::binary()?);
    cmd.args(["demo", "--regions", "seoul", "--port", "0"])
        .env("DTFED_API_KEY", GM)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err_path)?);
    let mut demo = dtfed_tests::harness::sys::spawn(cmd, "dtfed demo")?;
    let stdout = demo.take_stdout().context("stdout")?;
    let ws = tokio::task::spawn_blocking(move || -> Result<String> {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let ["region", "seoul", url] = line.split_whitespace().collect::<Vec<_>>()[..] {
                return Ok(url.to_owned());
            }
        }
        anyhow::bail!("the demo printed no region line")
    })
    .await??;
    let addr: SocketAddr = ws
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .with_context(|| ws.clone())?;
    let mut ann = WsClient::connect(&format!("{ws}?name=ann")).await?;
    ann.sub("tavern", None, T).await?;
    let said = json!({"from": "narrator", "body": {"text": "Welcome, travellers."}});
    let offset = publish(addr, "tavern", said.clone(), Some("welcome")).await?;
    let msg = ann.recv_until(|f| f["op"] == "msg", T).await?;
    assert_eq!(
        (&msg["offset"], &msg["from"]),
        (&json!(offset), &json!("narrator"))
    );
    refused(
        &post(addr, "tavern", "another-key-0123456789", said, None).await?,
        401,
        "unauthorized",
    )?;
    let printed = std::fs::read_to_string(&err_path)?;
    assert!(
        printed.contains(&format!("http://{addr}/api/v1/rooms/tavern/messages"))
            && printed.contains("Authorization: Bearer $DTFED_API_KEY"),
        "the demo says how to call its API:\n{printed}"
    );
    demo.terminate(Duration::from_secs(10))?;
    Ok(())
}
