//! Hostile and broken players against a real `dtfed` (real Kafka, real Redis): cursors full
//! of made-up regions, connections that go silent, frames that break the WebSocket protocol,
//! tokens that expire mid-session. Some speak raw TCP, to do what no WebSocket library would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::harness::jwt::hs256;
use dtfed_tests::{ConfigBuilder, DtfedProcess, WsClient};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// A WebSocket client on a bare TCP socket: it does the upgrade, then sends exactly the
/// frames it is told to and answers nothing (no Pong, no Close).
struct RawWs {
    tcp: TcpStream,
    /// Bytes read past the upgrade response.
    buf: Vec<u8>,
}

/// One frame from the server: opcode and payload.
#[derive(Debug)]
struct RawFrame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a Close frame.
    fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    async fn connect(addr: SocketAddr, query: &str) -> Result<RawWs> {
        RawWs::upgrade(TcpStream::connect(addr).await?, addr, query).await
    }

    /// Does the WebSocket upgrade on an already connected socket.
    async fn upgrade(mut tcp: TcpStream, addr: SocketAddr, query: &str) -> Result<RawWs> {
        let request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(T, tcp.read(&mut chunk))
                .await
                .context("upgrade response")??;
            anyhow::ensure!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        Ok(RawWs {
            tcp,
            buf: buf[end..].to_vec(),
        })
    }

    /// Sends one final frame with `opcode` and `payload`, masked (with a zero key, which
    /// leaves the payload as is) as a client must.
    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        assert!(payload.len() < 126, "short frames only");
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await?;
        Ok(())
    }

    /// Every frame the server sends until it ends the connection; error if it is still open
    /// after `timeout`.
    async fn frames_until_closed(&mut self, timeout: Duration) -> Result<Vec<RawFrame>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => anyhow::bail!(
                    "server did not close the connection within {timeout:?}; frames so far: {:?}",
                    parse_frames(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(parse_frames(&self.buf)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Server frames (unmasked) in `buf`; a trailing partial frame is left out.
fn parse_frames(mut buf: &[u8]) -> Vec<RawFrame> {
    let mut out = Vec::new();
    while buf.len() >= 2 {
        let opcode = buf[0] & 0x0f;
        let (len, head) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n if n < 126 => (usize::from(n), 2),
            _ => break,
        };
        if buf.len() < head + len {
            break;
        }
        out.push(RawFrame {
            opcode,
            payload: buf[head..head + len].to_vec(),
        });
        buf = &buf[head + len..];
    }
    out
}

async fn start(cfg: ConfigBuilder) -> Result<DtfedProcess> {
    tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg.build())).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_within_the_idle_timeout_and_a_live_one_stays() -> Result<()>
{
    let idle = Duration::from_millis(2000);
    let cfg = ConfigBuilder::shared("idle", "seoul")?
        .partitions(1)
        .set("client", "ping_interval_ms", 300)
        .set("client", "idle_timeout_ms", idle.as_millis() as i64);
    let d = start(cfg).await?;
    let mut alive = WsClient::connect(&d.ws_url_as("alive")).await?;
    alive.sub("hall", None, T).await?;
    // The library client answers pings while it reads: it stays, for several idle timeouts,
    // and is still served.
    let alive = tokio::spawn(async move {
        alive.expect_silence(idle * 3).await?;
        alive.ping(T).await?;
        alive
            .publish("hall", json!({"text": "still here"}), T)
            .await?;
        anyhow::Ok(())
    });

    let started = Instant::now();
    let mut silent = RawWs::connect(d.client_addr(), "name=silent").await?;
    // The close handshake waits up to 1 s for the player's Close before dropping the socket.
    let frames = silent
        .frames_until_closed(idle + Duration::from_secs(3))
        .await?;
    let took = started.elapsed();
    assert!(
        took >= idle - Duration::from_millis(100),
        "closed after {took:?}, before the idle timeout"
    );
    assert!(
        frames.iter().filter(|f| f.opcode == 0x9).count() >= 2,
        "the server pings: {frames:?}"
    );
    let close = frames.iter().find_map(RawFrame::close_code);
    assert_eq!(close, Some(4003), "{frames:?}");
    alive.await??;
    Ok(())
}

/// The kernel's timer on the TCP connection from `client` to `server` (field `tr` of
/// /proc/net/tcp: 0 none, 1 retransmit, 2 keepalive, ...), if the connection is listed.
fn tcp_timer(server: SocketAddr, client: SocketAddr) -> Result<Option<u8>> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("/proc/net/tcp")?;
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 6 {
            continue;
        }
        if port(cols[1]) == Some(server.port()) && port(cols[2]) == Some(client.port()) {
            let timer = cols[5].split(':').next().unwrap_or_default();
            return Ok(u8::from_str_radix(timer, 16).ok());
        }
    }
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn player_sockets_have_tcp_keepalive() -> Result<()> {
    let d = start(ConfigBuilder::shared("keepalive", "seoul")?.partitions(1)).await?;
    let raw = RawWs::connect(d.client_addr(), "name=quiet").await?;
    let client = raw.tcp.local_addr()?;
    // An idle connection with nothing unacknowledged has the keepalive timer running on the
    // server's side; without SO_KEEPALIVE it has no timer at all.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut timer = None;
    while Instant::now() < deadline {
        timer = tcp_timer(d.client_addr(), client)?;
        if timer == Some(2) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("server side of {client}: timer {timer:?}, want 2 (keepalive)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_their_close_codes() -> Result<()> {
    let d = start(ConfigBuilder::shared("protocol", "seoul")?.partitions(1)).await?;
    // (opcode, payload, expected close code)
    let cases: [(u8, &[u8], u16); 4] = [
        (0x1, b"{\"op\":\"ping\"}\xff\xfe", 1007), // text that is not UTF-8
        (0x3, b"{}", 1002),                        // reserved data opcode
        (0xb, b"", 1002),                          // reserved control opcode
        (0x0, b"{}", 1002),                        // a continuation with nothing to continue
    ];
    for (opcode, payload, want) in cases {
        let mut raw = RawWs::connect(d.client_addr(), "name=raw").await?;
        raw.send_frame(opcode, payload).await?;
        let frames = raw.frames_until_closed(T).await?;
        assert_eq!(
            frames.iter().find_map(RawFrame::close_code),
            Some(want),
            "opcode {opcode:#x}: {frames:?}"
        );
    }
    // A well-formed frame on the same kind of socket is served.
    let mut raw = RawWs::connect(d.client_addr(), "name=raw").await?;
    raw.send_frame(0x1, br#"{"op":"ping"}"#).await?;
    raw.send_frame(0x8, &1000u16.to_be_bytes()).await?;
    let frames = raw.frames_until_closed(T).await?;
    assert!(
        frames.iter().any(|f| f.payload == br#"{"op":"pong"}"#),
        "{frames:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_naming_unknown_regions_is_bad_frame() -> Result<()> {
    let d = start(ConfigBuilder::shared("cursor-bomb", "seoul")?.partitions(1)).await?;
    let mut c = WsClient::connect(&d.ws_url_as("mallory")).await?;
    let sub = |since: Value| json!({"op": "sub", "room": "hall", "since": since});

    // 3,500 made-up origins in one frame under 64 KiB.
    let bomb: serde_json::Map<String, Value> =
        (0..3500).map(|i| (format!("r{i}"), json!(0))).collect();
    let frame = sub(Value::Object(bomb)).to_string();
    assert!(frame.len() < 64 * 1024, "{}", frame.len());
    c.send_text(&frame).await?;
    let e = c
        .recv_until(|f| f["op"] == "error" || f["op"] == "synced", T)
        .await?;
    // Shortened: before the fix, this was a `synced` echoing all 3,500 origins.
    let shown: String = e.to_string().chars().take(300).collect();
    assert_eq!(e["code"], "bad_frame", "{shown}");
    assert!(
        e["message"].as_str().unwrap_or_default().contains("64"),
        "{shown}"
    );

    // A few origins, but not regions this one knows.
    c.send_json(&sub(json!({"seoul": 0, "atlantis": 5})))
        .await?;
    let e = c
        .recv_until(|f| f["op"] == "error" || f["op"] == "synced", T)
        .await?;
    assert_eq!(e["code"], "bad_frame", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("atlantis"),
        "{e}"
    );
    for bad in [
        json!({"Seoul!": 0}),
        json!({"seoul": "zero"}),
        json!(["seoul"]),
    ] {
        c.send_json(&sub(bad.clone())).await?;
        let e = c
            .recv_until(|f| f["op"] == "error" || f["op"] == "synced", T)
            .await?;
        assert_eq!(e["code"], "bad_frame", "{bad} → {e}");
    }

    // The connection is still usable, and a cursor of this region is served.
    c.sub("hall", None, T).await?;
    let ack = c.publish("hall", json!({"text": "one"}), T).await?;
    let offset = ack["offset"].as_i64().context("ack offset")?;
    c.recv_until(|f| f["op"] == "msg", T).await?;
    c.unsub("hall").await?;
    c.send_json(&sub(json!({"seoul": offset - 1}))).await?;
    let synced = c.recv_until(|f| f["op"] == "synced", T).await?;
    assert_eq!(synced["cursor"], json!({"seoul": offset}), "{synced}");
    Ok(())
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// The attack of issue 7, scaled down: many connections, each subscribing 250 rooms with a
/// cursor of 3,500 made-up origins. Refused frame by frame, it leaves the daemon's memory
/// where it was (before the fix, every subscription kept its 3,500 origins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_bombs_do_not_grow_the_daemon() -> Result<()> {
    const CONNECTIONS: usize = 20;
    const ROOMS: usize = 250;
    let d = start(ConfigBuilder::shared("cursor-bomb-rss", "seoul")?.partitions(1)).await?;
    let bomb: serde_json::Map<String, Value> =
        (0..3500).map(|i| (format!("r{i}"), json!(0))).collect();
    let bomb = Value::Object(bomb).to_string();
    let before = rss_kb(d.pid())?;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let url = d.ws_url_as(&format!("bomber{c}"));
        let bomb = bomb.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = WsClient::connect(&url).await?;
            let mut refused = 0;
            for r in 0..ROOMS {
                ws.send_text(&format!(
                    r#"{{"op":"sub","room":"room-{r}","since":{bomb}}}"#
                ))
                .await?;
                let f = ws
                    .recv_until(|f| f["op"] == "error" || f["op"] == "synced", T)
                    .await?;
                if f["code"] == "bad_frame" {
                    refused += 1;
                }
            }
            anyhow::Ok((ws, refused))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        let (ws, refused) = t.await??;
        assert_eq!(refused, ROOMS);
        held.push(ws);
    }
    let during = rss_kb(d.pid())?;
    let grown_mb = during.saturating_sub(before) / 1024;
    eprintln!("daemon RSS {before} kB -> {during} kB with {CONNECTIONS} bombers");
    // 20 connections' buffers, not 5,000 subscriptions of 3,500 origins (~1 GB before).
    assert!(
        grown_mb < 32,
        "RSS grew by {grown_mb} MB ({before} kB -> {during} kB)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires_and_bad_claims_are_refused() -> Result<()> {
    let secret = "a-test-secret-of-enough-length";
    let cfg = ConfigBuilder::shared("jwt-expiry", "seoul")?
        .partitions(1)
        .auth_jwt(secret)
        .set("client", "jwt_issuer", "login.example")
        .set("client", "jwt_audience", "dtfed");
    let d = start(cfg).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (iss, aud) = ("login.example", "dtfed");
    // Valid for 2 more seconds, plus the 5 s of clock-skew leeway.
    let short = hs256(
        secret,
        &json!({"sub": "ann", "exp": now + 2, "iss": iss, "aud": aud}),
    );
    let long = hs256(
        secret,
        &json!({"sub": "bob", "exp": now + 600, "iss": iss, "aud": [aud, "chat"]}),
    );
    let started = Instant::now();
    let mut ann = WsClient::connect(&d.ws_url_with_token(&short)).await?;
    let mut bob = WsClient::connect(&d.ws_url_with_token(&long)).await?;
    ann.sub("hall", None, T).await?;
    let (code, reason) = ann.expect_close(Duration::from_secs(15)).await?;
    let took = started.elapsed();
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    assert!(
        took >= Duration::from_secs(5),
        "closed after {took:?}, before exp + leeway"
    );
    bob.ping(T).await?;

    // Not valid yet (nbf an hour ahead), control characters in sub, another issuer or
    // audience, or none: refused.
    for claims in [
        json!({"sub": "eve", "exp": now + 7200, "nbf": now + 3600, "iss": iss, "aud": aud}),
        json!({"sub": "eve\u{1b}[2J", "exp": now + 600, "iss": iss, "aud": aud}),
        json!({"sub": "eve", "exp": now + 600, "iss": "evil.example", "aud": aud}),
        json!({"sub": "eve", "exp": now + 600, "iss": iss, "aud": "another-service"}),
        json!({"sub": "eve", "exp": now + 600, "iss": iss}),
        json!({"sub": "eve", "exp": now + 600, "aud": aud}),
    ] {
        let mut eve = WsClient::connect(&d.ws_url_with_token(&hs256(secret, &claims))).await?;
        let e = eve.recv_until(|f| f["op"] == "error", T).await?;
        assert_eq!(e["code"], "unauthorized", "{claims} → {e}");
        assert_eq!(eve.expect_close(T).await?.0, 1008);
    }
    Ok(())
}

/// Issue 7, item 16: room joins and leaves used to share one daemon-wide lock, held across
/// the bus round trip. Here Redis stops answering (`CLIENT PAUSE`) while one player joins a
/// new room, so that join's bus subscribe hangs; a player leaving another room and pinging
/// must not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_subscribe_does_not_hold_up_other_rooms() -> Result<()> {
    let redis = tokio::task::spawn_blocking(dtfed_tests::RedisServer::start).await??;
    let cfg = ConfigBuilder::shared("room-locks", "seoul")?
        .partitions(1)
        .redis(&redis.url());
    let d = start(cfg).await?;
    let mut p = WsClient::connect(&d.ws_url_as("p")).await?;
    p.sub("lobby", None, T).await?;
    let mut q = WsClient::connect(&d.ws_url_as("q")).await?;
    q.sub("lobby", None, T).await?;
    let mut late = WsClient::connect(&d.ws_url_as("late")).await?;

    let pause = Duration::from_secs(4);
    let mut admin = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause.as_millis() as u64)
        .arg("ALL")
        .query_async(&mut admin)
        .await?;
    let paused = Instant::now();
    // The first player of a new room: the daemon subscribes it on the bus, which hangs.
    late.send_json(&json!({"op": "sub", "room": "new-room"}))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Leaving a room someone else still holds needs no bus round trip.
    q.unsub("lobby").await?;
    q.ping(T).await?;
    let took = paused.elapsed();
    anyhow::ensure!(
        took < Duration::from_millis(1500),
        "unsub + ping took {took:?}: it waited for another room's subscribe"
    );
    let synced = late.recv_until(|f| f["op"] == "synced", T).await?;
    assert!(
        paused.elapsed() >= pause - Duration::from_millis(500),
        "the subscribe did not hang: {synced}"
    );
    p.ping(T).await?;
    Ok(())
}

/// Rooms with local players and open connections, from `/status`.
fn rooms_and_clients(d: &DtfedProcess) -> Result<(u64, u64)> {
    let s = d.admin_get("/status", None)?.json()?;
    Ok((
        s["rooms"].as_u64().context("rooms")?,
        s["clients"].as_u64().context("clients")?,
    ))
}

/// A player that vanishes in the middle of its `sub` replay (here: it does not read, then
/// resets the connection while the server is blocked writing the replay) leaves nothing
/// behind: not its room membership, not the room's bus subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_gone_during_its_replay_leaves_its_room() -> Result<()> {
    let cfg = ConfigBuilder::shared("gone-mid-replay", "seoul")?
        .partitions(1)
        .set("client", "publish_rate_per_sec", 10_000)
        .set("client", "publish_burst", 10_000);
    let d = start(cfg).await?;
    // A history larger than the socket buffers between the server and a player that does
    // not read (its receive buffer shrunk to the minimum).
    let mut writer = WsClient::connect(&d.ws_url_as("writer")).await?;
    writer.sub("archive", None, T).await?;
    let pad = "p".repeat(30_000);
    const N: usize = 250;
    for i in 0..N {
        writer
            .publish("archive", json!({"i": i, "pad": pad}), T)
            .await?;
    }
    for _ in 0..N {
        writer.recv_until(|f| f["op"] == "msg", T).await?;
    }
    writer.unsub("archive").await?;
    writer.ping(T).await?;
    assert_eq!(rooms_and_clients(&d)?, (0, 1));

    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let tcp = socket.connect(d.client_addr()).await?;
    let mut raw = RawWs::upgrade(tcp, d.client_addr(), "name=vanishing").await?;
    raw.send_frame(
        0x1,
        br#"{"op":"sub","room":"archive","since":{"seoul":-1}}"#,
    )
    .await?;
    // The server is now blocked writing the replay; the player resets the connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    raw.tcp.set_zero_linger()?;
    drop(raw);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = rooms_and_clients(&d)?;
        if now == (0, 1) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "(rooms, clients) = {now:?} long after the player left; want (0, 1)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
