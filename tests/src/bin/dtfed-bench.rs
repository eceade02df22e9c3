//! `dtfed-bench`: load generator and checker for client protocol v1 (dtfed, or the
//! `redis-relay` baseline).
//!
//! Load run:
//! ```text
//! dtfed-bench --url ws://127.0.0.1:P/ws [--url ...] --clients 1000 --rooms 100 --rate 5000 \
//!     --duration 30 --warmup 5 --body-bytes 100 --label dtfed [--pid <server pid>]... \
//!     [--json out.jsonl]
//! ```
//! 1. Opens `--clients` WebSocket connections (TCP_NODELAY, `?name=bench-<i>`, at most
//!    `--connect-concurrency` handshakes in flight so there is no connect storm), round-robin
//!    over the `--url`s. Client i subscribes to room `bench-<run-id>-<i % rooms>` and waits
//!    for `synced`.
//! 2. Every client publishes to its room at `rate / clients` msg/s on its own timer, first
//!    tick jittered uniformly over one period. The timer is a `tokio::time::interval` with
//!    `MissedTickBehavior::Burst`: publishing is open-loop (never waits for acks), and when a
//!    write blocks (server not reading) or the generator is starved, the missed ticks are sent
//!    as soon as possible, so the offered load stays at the target instead of quietly dropping
//!    (which is what `Delay`/`Skip` would do, hiding a slow server: coordinated omission).
//!    Latency is measured from the actual send time; ticks fired late are counted (`late
//!    ticks`) so a saturated generator is visible.
//! 3. Body: `{"run":..,"c":<client>,"s":<seq>,"t":<ns since this process' base Instant>,
//!    "pad":"xxx.."}` padded to `--body-bytes`. The `ref` is `<seq>:<send ns>`.
//! 4. Measures, after the warm-up only, publish→ack and publish→delivery latency (every
//!    subscriber, same process, same clock) into HDR histograms (µs). Counts sent, acked,
//!    errors by code, delivered vs expected (sum over sent messages of the room's subscriber
//!    count), per-(room, origin) order violations (offsets must strictly increase on each
//!    connection), duplicates (same (client, seq) twice on a connection), `prev` chain breaks,
//!    `gap` frames, undecodable server frames and unexpected disconnects.
//! 5. CPU% of every `--pid` (utime+stime from `/proc/<pid>/stat` over the measured window)
//!    and its VmRSS / VmHWM at the end; `--infra-pid` (Redis, Kafka) CPU% apart; also the
//!    generator's own CPU%.
//! 6. After the last publish, waits for the outstanding acks and deliveries as long as they
//!    keep coming (`--drain-timeout` without progress, `--drain-max` in all), so a server that
//!    is behind is reported as slow (`drain s`) rather than lossy.
//! 7. Prints a table, appends a JSON line to `--json`, unsubscribes and closes every client.
//!    Exit 1 on order violations, duplicates or deliveries < 99.9 % of expected; exit 2 when
//!    the clients could not be set up.
//!
//! Memory run: `--idle-connections N` opens N idle subscribed connections, holds them
//! `--idle-hold` seconds and reports the server's RSS growth per connection.
//!
//! Report: `--report FILE [--baseline LABEL]` turns the JSON lines of several runs into a
//! markdown table with the ratio of every run to the baseline for p50 and p99.

// The result record is one large `json!` literal.
#![recursion_limit = "256"]

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use dtfed_proto::client::{decode_server_frame, encode_client_frame, Body};
use dtfed_proto::{ClientFrame, RoomId, ServerFrame};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rand::Rng as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;
type WsSink = SplitSink<Ws, Message>;
type WsStream = SplitStream<Ws>;

/// Load generator for dtfed's client protocol v1.
#[derive(Parser, Debug, Clone)]
#[command(name = "dtfed-bench", version)]
struct Args {
    /// WebSocket endpoint, e.g. ws://127.0.0.1:8080/ws; repeat to spread clients round-robin.
    #[arg(long = "url")]
    urls: Vec<String>,
    /// Number of client connections.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Number of rooms; client i is in room i % rooms.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Total publish rate, messages per second, spread evenly over the clients.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Measured window, seconds (after the warm-up).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Warm-up, seconds: load is applied but nothing is measured.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Size of each message body (JSON), bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Name of this run in the output.
    #[arg(long, default_value = "bench")]
    label: String,
    /// Server process to sample CPU and RSS of; repeatable.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Infrastructure process (Redis, Kafka) whose CPU% is reported separately; repeatable.
    #[arg(long = "infra-pid")]
    infra_pids: Vec<u32>,
    /// Append one JSON line with the results to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Memory mode: open this many idle subscribed connections and report RSS per connection.
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Memory mode: seconds to hold the idle connections before sampling RSS.
    #[arg(long, default_value_t = 5.0)]
    idle_hold: f64,
    /// WebSocket handshakes in flight at once while ramping up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds allowed for one connection's TCP connect + handshake + `synced`.
    #[arg(long, default_value_t = 15.0)]
    connect_timeout: f64,
    /// After the last publish, wait for outstanding acks and deliveries while they keep
    /// coming: give up after this many seconds without progress...
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// ...or after this many seconds in all (a server far behind is reported, not waited
    /// for forever).
    #[arg(long, default_value_t = 120.0)]
    drain_max: f64,
    /// Room names are `bench-<run-id>-<r>`; random by default.
    #[arg(long)]
    run_id: Option<String>,
    /// Report mode: print a markdown table of the JSON lines in this file and exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Report mode: label of the run the others are compared with (default: the first).
    #[arg(long)]
    baseline: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.report {
        return match report(path, args.baseline.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dtfed-bench: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dtfed-bench: error: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = rt.block_on(async {
        if let Some(n) = args.idle_connections {
            idle_run(&args, n).await
        } else {
            load_run(&args).await
        }
    });
    // Do not wait for stragglers (a reader stuck on a dead server) at shutdown.
    rt.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dtfed-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

enum Outcome {
    Passed,
    Failed,
}

// ------------------------------------------------------------------ shared state

/// Event counters, shared by every client task.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    sent_measured: AtomicU64,
    acked: AtomicU64,
    acked_measured: AtomicU64,
    /// Error frames that answered a publish (carry one of our refs).
    pub_errors: AtomicU64,
    errors: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
    expected: AtomicU64,
    order_violations: AtomicU64,
    duplicates: AtomicU64,
    prev_breaks: AtomicU64,
    gaps: AtomicU64,
    bad_frames: AtomicU64,
    foreign: AtomicU64,
    misrouted: AtomicU64,
    unmatched_acks: AtomicU64,
    disconnects: AtomicU64,
    send_failures: AtomicU64,
    late_ticks: AtomicU64,
    max_tick_lag_us: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Hists {
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
}

struct Shared {
    base: Instant,
    run_id: String,
    /// Measured window, ns since `base`: [start, end).
    window: (u64, u64),
    subs_per_room: Vec<u64>,
    c: Counters,
    hists: Mutex<Hists>,
    errors_by_code: Mutex<BTreeMap<String, u64>>,
    /// A few examples of anything odd, for the report.
    notes: Mutex<Vec<String>>,
    closing: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn note(&self, what: String) {
        let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        if notes.len() < 10 {
            notes.push(what);
        }
    }
}

fn new_hist() -> anyhow::Result<Histogram<u64>> {
    // 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("cannot create a histogram")
}

// ------------------------------------------------------------------ connecting

fn ws_config() -> WebSocketConfig {
    // Chat frames are small: tungstenite's 128 KiB default read buffer per connection would
    // make 10,000 idle clients cost 1.3 GB here.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
}

/// `ws://host:port/path?query` → (`host:port`, URL with `name=` added).
fn client_url(url: &str, name: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("--url {url:?}: only ws:// URLs are supported"))?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() || !host.contains(':') {
        bail!("--url {url:?}: needs host:port");
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok((host.to_owned(), format!("{url}{sep}name={name}")))
}

fn room_name(run_id: &str, r: usize) -> anyhow::Result<RoomId> {
    RoomId::parse(&format!("bench-{run_id}-{r}"))
        .map_err(|e| anyhow!("room name for run id {run_id:?}: {e}"))
}

/// Connects client `idx`, subscribes it to `room` and waits for `synced`.
async fn connect_client(url: &str, idx: usize, room: &RoomId) -> anyhow::Result<Ws> {
    let (host, full) = client_url(url, &format!("bench-{idx}"))?;
    let tcp = TcpStream::connect(&host)
        .await
        .with_context(|| format!("TCP connect to {host}"))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(full, tcp, Some(ws_config()))
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    let sub = encode_client_frame(&ClientFrame::Sub {
        room: room.clone(),
        since: None,
    });
    ws.send(Message::Text(sub.into()))
        .await
        .context("sending sub")?;
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("connection closed before synced"))?
            .context("reading synced")?;
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => bail!("server closed before synced: {c:?}"),
            _ => continue,
        };
        match decode_server_frame(&text) {
            Ok(ServerFrame::Synced { room: r, .. }) if &r == room => return Ok(ws),
            Ok(ServerFrame::Error { code, message, .. }) => {
                bail!("server refused sub: {}: {message}", code.as_str())
            }
            Ok(_) => {}
            Err(e) => bail!("undecodable frame while waiting for synced ({e}): {text:.200}"),
        }
    }
}

/// Connects `n` clients, at most `concurrency` handshakes at once. Every connection that
/// failed is reported; any failure closes the others and fails the run.
async fn connect_all(args: &Args, run_id: &str, n: usize) -> anyhow::Result<Vec<(usize, Ws)>> {
    if args.urls.is_empty() {
        bail!("give at least one --url ws://host:port/ws");
    }
    for u in &args.urls {
        client_url(u, "x")?;
    }
    let rooms: Vec<RoomId> = (0..args.rooms)
        .map(|r| room_name(run_id, r))
        .collect::<anyhow::Result<_>>()?;
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let t0 = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let url = args.urls[i % args.urls.len()].clone();
            let room = rooms[i % rooms.len()].clone();
            async move {
                let r = tokio::time::timeout(timeout, connect_client(&url, i, &room))
                    .await
                    .map_err(|_| anyhow!("no synced within {timeout:?}"))
                    .and_then(|r| r);
                (i, r)
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1));
    let mut ok = Vec::with_capacity(n);
    let mut failed: Vec<(usize, anyhow::Error)> = Vec::new();
    let mut last_progress = Instant::now();
    while let Some((i, r)) = results.next().await {
        match r {
            Ok(ws) => ok.push((i, ws)),
            Err(e) => failed.push((i, e)),
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!(
                "dtfed-bench: connected {}/{n} ({} failed)",
                ok.len(),
                failed.len()
            );
        }
    }
    if !failed.is_empty() {
        let sample: Vec<String> = failed
            .iter()
            .take(5)
            .map(|(i, e)| format!("  client {i}: {e:#}"))
            .collect();
        close_all(ok.into_iter().map(|(_, ws)| ws).collect()).await;
        bail!(
            "{} of {n} clients could not connect and subscribe (first errors below); \
             check the server, its max_connections and `ulimit -n` on both sides\n{}",
            failed.len(),
            sample.join("\n")
        );
    }
    eprintln!(
        "dtfed-bench: {n} clients connected and synced in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    ok.sort_by_key(|(i, _)| *i);
    Ok(ok)
}

async fn close_all(conns: Vec<Ws>) {
    let closes = conns.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), ws.close(None)).await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures::stream::iter(closes)
            .buffer_unordered(256)
            .collect::<Vec<()>>(),
    )
    .await;
}

// ------------------------------------------------------------------ /proc sampling

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of `pid` ("self" for this process), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields restart after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
fn status_kb(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

struct CpuSample {
    at: Instant,
    ticks: Vec<Option<u64>>,
}

fn sample_cpu(pids: &[String]) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        ticks: pids.iter().map(|p| cpu_ticks(p)).collect(),
    }
}

/// CPU% per pid between two samples (100 = one core busy).
fn cpu_pct(a: &CpuSample, b: &CpuSample, tck: f64) -> Vec<Option<f64>> {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    a.ticks
        .iter()
        .zip(&b.ticks)
        .map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => Some(y.saturating_sub(*x) as f64 / tck / wall * 100.0),
            _ => None,
        })
        .collect()
}

// ------------------------------------------------------------------ load run

#[derive(Deserialize)]
struct BenchBody<'a> {
    run: &'a str,
    c: u32,
    s: u64,
    t: u64,
}

fn make_body(run_id: &str, client: usize, seq: u64, t: u64, size: usize) -> String {
    let head = format!(r#"{{"run":"{run_id}","c":{client},"s":{seq},"t":{t},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Publishes until the end of the window; returns the sink for the orderly close.
async fn publisher(
    shared: Arc<Shared>,
    mut sink: WsSink,
    idx: usize,
    room: RoomId,
    first_tick: tokio::time::Instant,
    period: Duration,
    body_bytes: usize,
) -> Option<WsSink> {
    let room_idx = idx % shared.subs_per_room.len();
    let subs = shared.subs_per_room[room_idx];
    let end = shared.base + Duration::from_nanos(shared.window.1);
    let mut iv = tokio::time::interval_at(first_tick, period);
    iv.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut seq: u64 = 0;
    loop {
        let scheduled = iv.tick().await;
        if scheduled.into_std() >= end {
            return Some(sink);
        }
        let lag = scheduled.elapsed();
        if lag > Duration::from_millis(5) {
            inc(&shared.c.late_ticks);
            shared
                .c
                .max_tick_lag_us
                .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
        }
        seq += 1;
        let t = shared.now_ns();
        let body = make_body(&shared.run_id, idx, seq, t, body_bytes);
        let Ok(body) = Body::from_json(&body) else {
            shared.note("internal: generated body is not JSON".into());
            return Some(sink);
        };
        let frame = encode_client_frame(&ClientFrame::Pub {
            room: room.clone(),
            body,
            reference: Some(format!("{seq}:{t}")),
        });
        inc(&shared.c.sent);
        shared.c.expected.fetch_add(subs, Ordering::Relaxed);
        if shared.in_window(t) {
            inc(&shared.c.sent_measured);
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            sink.send(Message::Text(frame.into())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                inc(&shared.c.send_failures);
                if !shared.closing.load(Ordering::Relaxed) {
                    shared.note(format!("client {idx}: publish failed: {e}"));
                }
                return None;
            }
            Err(_) => {
                inc(&shared.c.send_failures);
                shared.note(format!(
                    "client {idx}: a publish write blocked 10 s (server not reading)"
                ));
                return None;
            }
        }
    }
}

/// Per-connection checker state.
struct ReaderState {
    idx: usize,
    room: RoomId,
    /// origin → last offset seen on this connection (room is fixed per connection).
    last: HashMap<String, i64>,
    /// sender client → bitset of seqs seen.
    seen: HashMap<u32, Vec<u64>>,
}

impl ReaderState {
    /// Marks (client, seq) as seen; true if it had been seen already.
    fn seen_before(&mut self, client: u32, seq: u64) -> bool {
        let bits = self.seen.entry(client).or_default();
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let was = bits[word] & (1 << bit) != 0;
        bits[word] |= 1 << bit;
        was
    }
}

fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

fn on_text(shared: &Shared, st: &mut ReaderState, text: &str) {
    let frame = match decode_server_frame(text) {
        Ok(f) => f,
        Err(e) => {
            inc(&shared.c.bad_frames);
            shared.note(format!(
                "client {}: undecodable server frame ({e}): {text:.200}",
                st.idx
            ));
            return;
        }
    };
    match frame {
        ServerFrame::Msg(m) => {
            let now = shared.now_ns();
            let body = match serde_json::from_str::<BenchBody<'_>>(m.body.as_json()) {
                Ok(b) if b.run == shared.run_id => b,
                _ => {
                    inc(&shared.c.foreign);
                    return;
                }
            };
            if m.room != st.room {
                inc(&shared.c.misrouted);
                shared.note(format!(
                    "client {} (room {}) got a message of room {}",
                    st.idx, st.room, m.room
                ));
                return;
            }
            if st.seen_before(body.c, body.s) {
                inc(&shared.c.duplicates);
                shared.note(format!(
                    "client {}: duplicate of client {} seq {} (origin {} offset {})",
                    st.idx, body.c, body.s, m.origin, m.offset
                ));
                return;
            }
            let last = st.last.get(&m.origin).copied();
            if let Some(last) = last {
                if m.offset <= last {
                    inc(&shared.c.order_violations);
                    shared.note(format!(
                        "client {}: room {} origin {}: offset {} after {last}",
                        st.idx, m.room, m.origin, m.offset
                    ));
                }
            }
            // `prev` must chain to what this connection saw (the room is fresh and we were
            // subscribed before anything was published in it). The relay sends null.
            if let Some(prev) = m.prev {
                if last != Some(prev) {
                    inc(&shared.c.prev_breaks);
                    shared.note(format!(
                        "client {}: room {} origin {}: prev {prev} but last seen {last:?}",
                        st.idx, m.room, m.origin
                    ));
                }
            }
            if last.is_none_or(|l| m.offset > l) {
                st.last.insert(m.origin, m.offset);
            }
            inc(&shared.c.delivered);
            if shared.in_window(now) {
                inc(&shared.c.delivered_measured);
            }
            if shared.in_window(body.t) {
                let mut h = shared.hists.lock().unwrap_or_else(PoisonError::into_inner);
                record(&mut h.delivery, now.saturating_sub(body.t));
            }
        }
        ServerFrame::Ack { reference, .. } => {
            let now = shared.now_ns();
            let sent = reference
                .as_deref()
                .and_then(|r| r.split_once(':'))
                .and_then(|(_, t)| t.parse::<u64>().ok());
            let Some(sent) = sent else {
                inc(&shared.c.unmatched_acks);
                return;
            };
            inc(&shared.c.acked);
            if shared.in_window(sent) {
                inc(&shared.c.acked_measured);
                let mut h = shared.hists.lock().unwrap_or_else(PoisonError::into_inner);
                record(&mut h.ack, now.saturating_sub(sent));
            }
        }
        ServerFrame::Error {
            code,
            message,
            reference,
        } => {
            inc(&shared.c.errors);
            if reference.is_some() {
                inc(&shared.c.pub_errors);
            }
            *shared
                .errors_by_code
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(code.as_str().to_owned())
                .or_default() += 1;
            shared.note(format!(
                "client {}: error {}: {message}",
                st.idx,
                code.as_str()
            ));
        }
        ServerFrame::Gap {
            room,
            origin,
            from,
            to,
        } => {
            inc(&shared.c.gaps);
            shared.note(format!(
                "client {}: gap in {room} from {origin}: {from}..={to}",
                st.idx
            ));
        }
        ServerFrame::Synced { .. } | ServerFrame::Pong => {}
    }
}

async fn reader(shared: Arc<Shared>, mut stream: WsStream, idx: usize, room: RoomId) {
    let mut st = ReaderState {
        idx,
        room,
        last: HashMap::new(),
        seen: HashMap::new(),
    };
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => on_text(&shared, &mut st, &t),
            Some(Ok(Message::Binary(_))) => {
                inc(&shared.c.bad_frames);
                shared.note(format!("client {idx}: binary frame from the server"));
            }
            Some(Ok(Message::Close(frame))) => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("client {idx}: server closed: {frame:?}"));
                }
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("client {idx}: connection error: {e}"));
                }
                return;
            }
            None => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("client {idx}: connection ended"));
                }
                return;
            }
        }
    }
}

fn run_id(args: &Args) -> String {
    args.run_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()))
}

fn check_common(args: &Args) -> anyhow::Result<()> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be > 0");
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        bail!("--warmup must be >= 0");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be >= 0");
    }
    for (what, v) in [
        ("--idle-hold", args.idle_hold),
        ("--connect-timeout", args.connect_timeout),
        ("--drain-timeout", args.drain_timeout),
        ("--drain-max", args.drain_max),
    ] {
        if !(0.0..1e6).contains(&v) {
            bail!("{what} must be a number of seconds >= 0, got {v}");
        }
    }
    for pid in args.pids.iter().chain(&args.infra_pids) {
        if cpu_ticks(&pid.to_string()).is_none() {
            bail!("--pid {pid}: no such process (cannot read /proc/{pid}/stat)");
        }
    }
    Ok(())
}

async fn load_run(args: &Args) -> anyhow::Result<Outcome> {
    check_common(args)?;
    let run_id = run_id(args);
    let n = args.clients;
    let conns = connect_all(args, &run_id, n).await?;

    let mut subs_per_room = vec![0u64; args.rooms];
    for i in 0..n {
        subs_per_room[i % args.rooms] += 1;
    }
    let base = Instant::now();
    // Everyone starts 200 ms from now; the first ticks are spread over one period.
    let start = base + Duration::from_millis(200);
    let warm_end = start + Duration::from_secs_f64(args.warmup);
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| t.duration_since(base).as_nanos() as u64;
    let shared = Arc::new(Shared {
        base,
        run_id: run_id.clone(),
        window: (ns(warm_end), ns(end)),
        subs_per_room,
        c: Counters::default(),
        hists: Mutex::new(Hists {
            ack: new_hist()?,
            delivery: new_hist()?,
        }),
        errors_by_code: Mutex::new(BTreeMap::new()),
        notes: Mutex::new(Vec::new()),
        closing: AtomicBool::new(false),
    });

    let publishing = args.rate > 0.0;
    let period = if publishing {
        Duration::from_secs_f64(n as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    if publishing && period < Duration::from_micros(100) {
        bail!(
            "--rate {} over {n} clients is {:.0} msg/s per client: use more clients",
            args.rate,
            args.rate / n as f64
        );
    }
    eprintln!(
        "dtfed-bench: {} — {n} clients, {} rooms, {} msg/s ({:.2} msg/s per client), \
         warm-up {} s, measuring {} s, run id {run_id}",
        args.label,
        args.rooms,
        args.rate,
        args.rate / n as f64,
        args.warmup,
        args.duration
    );

    let mut readers = Vec::with_capacity(n);
    let mut publishers = Vec::with_capacity(n);
    let mut idle_sinks = Vec::new();
    {
        let mut rng = rand::rng();
        for (i, ws) in conns {
            let room = room_name(&run_id, i % args.rooms)?;
            let (sink, stream) = ws.split();
            readers.push(tokio::spawn(reader(
                shared.clone(),
                stream,
                i,
                room.clone(),
            )));
            if publishing {
                let jitter = Duration::from_nanos(rng.random_range(0..period.as_nanos() as u64));
                let task = tokio::spawn(publisher(
                    shared.clone(),
                    sink,
                    i,
                    room.clone(),
                    tokio::time::Instant::from_std(start + jitter),
                    period,
                    args.body_bytes,
                ));
                publishers.push((room, task));
            } else {
                idle_sinks.push((room, sink));
            }
        }
    }

    // CPU of the servers and of this process over the measured window.
    // Sampled in this order: --pid..., --infra-pid..., this process.
    let mut pids: Vec<String> = args
        .pids
        .iter()
        .chain(&args.infra_pids)
        .map(u32::to_string)
        .collect();
    pids.push("self".into());
    tokio::time::sleep_until(tokio::time::Instant::from_std(warm_end)).await;
    let cpu_a = sample_cpu(&pids);
    let progress_every = Duration::from_secs(5);
    let mut next_progress = warm_end + progress_every;
    while next_progress < end {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next_progress)).await;
        eprintln!(
            "dtfed-bench: {:>4.0} s: sent {} acked {} delivered {}/{}",
            next_progress.duration_since(warm_end).as_secs_f64(),
            get(&shared.c.sent),
            get(&shared.c.acked),
            get(&shared.c.delivered),
            get(&shared.c.expected)
        );
        next_progress += progress_every;
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    let cpu_b = sample_cpu(&pids);
    let rss: Vec<(Option<u64>, Option<u64>)> = args
        .pids
        .iter()
        .map(|p| {
            let p = p.to_string();
            (status_kb(&p, "VmRSS"), status_kb(&p, "VmHWM"))
        })
        .collect();

    // Publishers stop at the end of the window; then wait for the stragglers.
    let mut sinks = idle_sinks;
    let publishers_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for (room, p) in publishers {
        match tokio::time::timeout_at(publishers_deadline, p).await {
            Ok(Ok(Some(sink))) => sinks.push((room, sink)),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => shared.note(format!("publisher task failed: {e}")),
            Err(_) => shared.note("a publisher did not stop within 15 s".into()),
        }
    }
    // Drain: a slow server (deliveries far behind) is told apart from a lossy one by
    // waiting as long as acks or deliveries still arrive.
    let drain_start = Instant::now();
    let hard_deadline = drain_start + Duration::from_secs_f64(args.drain_max);
    let idle_limit = Duration::from_secs_f64(args.drain_timeout);
    let mut last_seen = (u64::MAX, u64::MAX);
    let mut last_progress = drain_start;
    let drained = loop {
        let answered = get(&shared.c.acked) + get(&shared.c.pub_errors);
        let delivered = get(&shared.c.delivered);
        if answered >= get(&shared.c.sent) && delivered >= get(&shared.c.expected) {
            break true;
        }
        let now = Instant::now();
        if (answered, delivered) != last_seen {
            last_seen = (answered, delivered);
            last_progress = now;
        }
        if now >= hard_deadline || now.duration_since(last_progress) >= idle_limit {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain_s = drain_start.elapsed().as_secs_f64();
    if drain_s > 1.0 {
        eprintln!("dtfed-bench: drained in {drain_s:.1} s after the last publish");
    }

    // Orderly goodbye: unsub, close, let the readers see the server's close.
    shared.closing.store(true, Ordering::Relaxed);
    let goodbyes = sinks.into_iter().map(|(room, mut sink)| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let unsub = encode_client_frame(&ClientFrame::Unsub { room });
            let _ = sink.send(Message::Text(unsub.into())).await;
            let _ = sink.close().await;
        })
        .await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures::stream::iter(goodbyes)
            .buffer_unordered(256)
            .collect::<Vec<()>>(),
    )
    .await;
    let reader_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(reader_deadline, r).await.is_err() {
            abort.abort();
        }
    }

    let tck = clk_tck();
    let cpu = cpu_pct(&cpu_a, &cpu_b, tck);
    let results = LoadResults {
        args,
        run_id: &run_id,
        shared: &shared,
        cpu: &cpu,
        rss: &rss,
        drained,
        drain_s,
    };
    results.print_and_save()
}

struct LoadResults<'a> {
    args: &'a Args,
    run_id: &'a str,
    shared: &'a Shared,
    /// Per `--pid`, then per `--infra-pid`, then this process last.
    cpu: &'a [Option<f64>],
    rss: &'a [(Option<u64>, Option<u64>)],
    drained: bool,
    /// Seconds from the end of publishing until every ack and delivery was in (or given up).
    drain_s: f64,
}

fn ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

fn max_ms(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

impl LoadResults<'_> {
    fn print_and_save(&self) -> anyhow::Result<Outcome> {
        let a = self.args;
        let c = &self.shared.c;
        let hists = self
            .shared
            .hists
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dur = a.duration;
        let achieved = get(&c.acked_measured) as f64 / dur;
        let offered = get(&c.sent_measured) as f64 / dur;
        let deliveries_per_s = get(&c.delivered_measured) as f64 / dur;
        let delivered = get(&c.delivered);
        let expected = get(&c.expected);
        let ratio = if expected == 0 {
            1.0
        } else {
            delivered as f64 / expected as f64
        };
        let n_pids = a.pids.len();
        let server_cpu: Option<f64> = if n_pids == 0 {
            None
        } else {
            self.cpu[..n_pids]
                .iter()
                .try_fold(0.0, |acc, v| v.map(|v| acc + v))
        };
        let bench_cpu = self.cpu.last().copied().flatten();
        let infra = &self.cpu[n_pids..self.cpu.len() - 1];
        let infra_cpu: Option<f64> = if infra.is_empty() {
            None
        } else {
            infra.iter().try_fold(0.0, |acc, v| v.map(|v| acc + v))
        };
        let rss_kb: Option<u64> = if n_pids == 0 {
            None
        } else {
            self.rss
                .iter()
                .try_fold(0, |acc, (r, _)| r.map(|r| acc + r))
        };
        let hwm_kb: Option<u64> = if n_pids == 0 {
            None
        } else {
            self.rss
                .iter()
                .try_fold(0, |acc, (_, h)| h.map(|h| acc + h))
        };
        let errors_by_code = self
            .shared
            .errors_by_code
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let notes = self
            .shared
            .notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();

        let mut failures = Vec::new();
        if get(&c.order_violations) > 0 {
            failures.push(format!(
                "{} per-(room, origin) order violations",
                get(&c.order_violations)
            ));
        }
        if get(&c.duplicates) > 0 {
            failures.push(format!("{} duplicate deliveries", get(&c.duplicates)));
        }
        if ratio < 0.999 {
            let refused = get(&c.pub_errors);
            let why = if refused > 0 {
                format!("; {refused} publishes were refused with an error frame, see below")
            } else {
                String::new()
            };
            failures.push(format!(
                "delivered {delivered} of {expected} expected ({:.3} %, below 99.9 %){why}",
                ratio * 100.0
            ));
        }
        if a.rate > 0.0 && get(&c.sent) == 0 {
            failures.push("nothing was published".into());
        }
        let mut warnings = Vec::new();
        if get(&c.errors) > 0 {
            warnings.push(format!(
                "{} error frames {errors_by_code:?}",
                get(&c.errors)
            ));
        }
        for (n, what) in [
            (get(&c.disconnects), "unexpected disconnects"),
            (get(&c.bad_frames), "undecodable server frames"),
            (get(&c.prev_breaks), "prev chain breaks"),
            (get(&c.gaps), "gap frames"),
            (get(&c.misrouted), "messages of another room"),
            (get(&c.foreign), "messages not from this run"),
            (get(&c.unmatched_acks), "acks without our ref"),
            (get(&c.send_failures), "publish writes that failed"),
        ] {
            if n > 0 {
                warnings.push(format!("{n} {what}"));
            }
        }
        if !self.drained {
            warnings.push(format!(
                "gave up draining after {:.1} s ({} s without progress, or --drain-max {} s): \
                 {} sent, {} acked, {} refused, {delivered} of {expected} delivered",
                self.drain_s,
                a.drain_timeout,
                a.drain_max,
                get(&c.sent),
                get(&c.acked),
                get(&c.pub_errors)
            ));
        } else if self.drain_s > 1.0 {
            warnings.push(format!(
                "the server was behind: the last acks/deliveries came {:.1} s after the last publish",
                self.drain_s
            ));
        }
        if get(&c.late_ticks) > 0 {
            warnings.push(format!(
                "{} publish ticks fired > 5 ms late (max {:.1} ms): the generator was short of CPU or its writes blocked",
                get(&c.late_ticks),
                get(&c.max_tick_lag_us) as f64 / 1000.0
            ));
        }

        let rows: Vec<(&str, String)> = vec![
            ("label", a.label.clone()),
            ("run id", self.run_id.to_owned()),
            ("clients / rooms", format!("{} / {}", a.clients, a.rooms)),
            (
                "target rate",
                format!("{} msg/s, body {} B", a.rate, a.body_bytes),
            ),
            (
                "window",
                format!("{} s after {} s warm-up", a.duration, a.warmup),
            ),
            (
                "achieved (acked)",
                format!("{achieved:.0} msg/s (offered {offered:.0})"),
            ),
            (
                "deliveries",
                format!(
                    "{deliveries_per_s:.0} /s (drained {:.1} s after the last publish)",
                    self.drain_s
                ),
            ),
            (
                "ack p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {} ms",
                    fmt_opt(ms(&hists.ack, 0.5), 3),
                    fmt_opt(ms(&hists.ack, 0.99), 3),
                    fmt_opt(ms(&hists.ack, 0.999), 3),
                    fmt_opt(max_ms(&hists.ack), 3)
                ),
            ),
            (
                "delivery p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {} ms",
                    fmt_opt(ms(&hists.delivery, 0.5), 3),
                    fmt_opt(ms(&hists.delivery, 0.99), 3),
                    fmt_opt(ms(&hists.delivery, 0.999), 3),
                    fmt_opt(max_ms(&hists.delivery), 3)
                ),
            ),
            (
                "sent / acked / errors",
                format!(
                    "{} / {} / {} {:?}",
                    get(&c.sent),
                    get(&c.acked),
                    get(&c.errors),
                    errors_by_code
                ),
            ),
            (
                "delivered / expected",
                format!("{delivered} / {expected} ({:.3} %)", ratio * 100.0),
            ),
            (
                "order violations / dupes",
                format!("{} / {}", get(&c.order_violations), get(&c.duplicates)),
            ),
            (
                "server CPU",
                match server_cpu {
                    Some(v) => format!("{v:.0} % (100 % = one core)"),
                    None => "- (no --pid)".into(),
                },
            ),
            (
                "server RSS (peak)",
                match (rss_kb, hwm_kb) {
                    (Some(r), Some(h)) => {
                        format!("{:.1} MB ({:.1} MB)", r as f64 / 1024.0, h as f64 / 1024.0)
                    }
                    _ => "-".into(),
                },
            ),
            (
                "infra CPU (Redis, Kafka)",
                match infra_cpu {
                    Some(v) => format!("{v:.0} %"),
                    None => "- (no --infra-pid)".into(),
                },
            ),
            ("bench CPU", format!("{} %", fmt_opt(bench_cpu, 0))),
        ];
        println!();
        println!("== dtfed-bench: {} ==", a.label);
        for (k, v) in &rows {
            println!("  {k:<28} {v}");
        }
        for w in &warnings {
            println!("  warning: {w}");
        }
        if !notes.is_empty() {
            println!("  first events worth a look:");
            for n in &notes {
                println!("    {n}");
            }
        }

        let per_pid: Vec<Value> = a
            .pids
            .iter()
            .enumerate()
            .map(|(k, pid)| {
                json!({
                    "pid": pid,
                    "cpu_pct": self.cpu[k],
                    "rss_kb": self.rss[k].0,
                    "hwm_kb": self.rss[k].1,
                })
            })
            .collect();
        let record = json!({
            "mode": "load",
            "label": a.label,
            "run_id": self.run_id,
            "urls": a.urls,
            "clients": a.clients,
            "rooms": a.rooms,
            "target_rate": a.rate,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "body_bytes": a.body_bytes,
            "sent": get(&c.sent),
            "acked": get(&c.acked),
            "errors": get(&c.errors),
            "errors_by_code": errors_by_code,
            "achieved_msgs_per_s": achieved,
            "offered_msgs_per_s": offered,
            "deliveries_per_s": deliveries_per_s,
            "delivered": delivered,
            "expected": expected,
            "delivered_ratio": ratio,
            "ack_p50_ms": ms(&hists.ack, 0.5),
            "ack_p99_ms": ms(&hists.ack, 0.99),
            "ack_p999_ms": ms(&hists.ack, 0.999),
            "ack_max_ms": max_ms(&hists.ack),
            "delivery_p50_ms": ms(&hists.delivery, 0.5),
            "delivery_p99_ms": ms(&hists.delivery, 0.99),
            "delivery_p999_ms": ms(&hists.delivery, 0.999),
            "delivery_max_ms": max_ms(&hists.delivery),
            "order_violations": get(&c.order_violations),
            "duplicates": get(&c.duplicates),
            "prev_breaks": get(&c.prev_breaks),
            "gaps": get(&c.gaps),
            "bad_frames": get(&c.bad_frames),
            "disconnects": get(&c.disconnects),
            "late_ticks": get(&c.late_ticks),
            "server_cpu_pct": server_cpu,
            "server_rss_mb": rss_kb.map(|k| k as f64 / 1024.0),
            "server_hwm_mb": hwm_kb.map(|k| k as f64 / 1024.0),
            "servers": per_pid,
            "infra_pids": a.infra_pids,
            "infra_cpu_pct": infra_cpu,
            "bench_cpu_pct": bench_cpu,
            "drained": self.drained,
            "drain_s": self.drain_s,
            "ok": failures.is_empty(),
            "failures": failures,
            "warnings": warnings,
        });
        if let Some(path) = &a.json {
            append_json(path, &record)?;
        }
        if failures.is_empty() {
            println!("  result: PASS");
            Ok(Outcome::Passed)
        } else {
            for f in &failures {
                println!("  FAIL: {f}");
            }
            eprintln!("dtfed-bench: {}: FAILED: {}", a.label, failures.join("; "));
            Ok(Outcome::Failed)
        }
    }
}

fn append_json(path: &Path, record: &Value) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{record}").with_context(|| format!("cannot write {}", path.display()))
}

// ------------------------------------------------------------------ idle (memory) run

async fn idle_run(args: &Args, n: usize) -> anyhow::Result<Outcome> {
    check_common(args)?;
    if n == 0 {
        bail!("--idle-connections must be at least 1");
    }
    if args.pids.is_empty() {
        eprintln!("dtfed-bench: warning: no --pid given: only this process' memory is reported");
    }
    let run_id = run_id(args);
    let pids: Vec<String> = args.pids.iter().map(u32::to_string).collect();
    let rss = |pids: &[String]| -> Option<u64> {
        pids.iter()
            .try_fold(0, |acc, p| status_kb(p, "VmRSS").map(|r| acc + r))
    };
    let before = rss(&pids);
    let self_before = status_kb("self", "VmRSS");
    eprintln!(
        "dtfed-bench: {} — opening {n} idle connections over {} rooms (run id {run_id})",
        args.label, args.rooms
    );
    let conns = connect_all(args, &run_id, n).await?;
    let shared_closing = Arc::new(AtomicBool::new(false));
    let disconnects = Arc::new(AtomicU64::new(0));
    let mut sinks = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for (_, ws) in conns {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let closing = shared_closing.clone();
        let disconnects = disconnects.clone();
        readers.push(tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                if m.is_err() || matches!(m, Ok(Message::Close(_))) {
                    break;
                }
            }
            if !closing.load(Ordering::Relaxed) {
                disconnects.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.idle_hold)).await;
    let after = rss(&pids);
    let hwm = pids
        .iter()
        .try_fold(0, |acc, p| status_kb(p, "VmHWM").map(|r| acc + r));
    let self_after = status_kb("self", "VmRSS");
    let lost = disconnects.load(Ordering::Relaxed);

    shared_closing.store(true, Ordering::Relaxed);
    let goodbyes = sinks.into_iter().map(|mut sink| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), sink.close()).await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        futures::stream::iter(goodbyes)
            .buffer_unordered(512)
            .collect::<Vec<()>>(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(deadline, r).await.is_err() {
            abort.abort();
        }
    }

    let per_conn = match (before, after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    let self_per_conn = match (self_before, self_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    println!();
    println!("== dtfed-bench idle connections: {} ==", args.label);
    println!("  {:<28} {n} over {} rooms", "connections", args.rooms);
    println!(
        "  {:<28} {} MB → {} MB (peak {} MB)",
        "server RSS",
        fmt_opt(before.map(|k| k as f64 / 1024.0), 1),
        fmt_opt(after.map(|k| k as f64 / 1024.0), 1),
        fmt_opt(hwm.map(|k| k as f64 / 1024.0), 1)
    );
    println!(
        "  {:<28} {} KB",
        "server RSS per connection",
        fmt_opt(per_conn, 2)
    );
    println!(
        "  {:<28} {} KB",
        "bench RSS per connection",
        fmt_opt(self_per_conn, 2)
    );
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} idle connections were closed by the server"));
        println!("  FAIL: {lost} idle connections were closed by the server");
    }
    if let Some(path) = &args.json {
        append_json(
            path,
            &json!({
                "mode": "idle",
                "label": args.label,
                "run_id": run_id,
                "connections": n,
                "rooms": args.rooms,
                "server_rss_before_kb": before,
                "server_rss_after_kb": after,
                "server_hwm_kb": hwm,
                "server_kb_per_conn": per_conn,
                "bench_kb_per_conn": self_per_conn,
                "disconnects": lost,
                "ok": failures.is_empty(),
                "failures": failures,
            }),
        )?;
    }
    Ok(if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed
    })
}

// ------------------------------------------------------------------ report

fn report(path: &Path, baseline: Option<&str>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut loads = Vec::new();
    let mut idles = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), k + 1))?;
        match v["mode"].as_str() {
            Some("idle") => idles.push(v),
            _ => loads.push(v),
        }
    }
    let f = |v: &Value, key: &str, prec: usize| -> String {
        v[key]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
    };
    if !loads.is_empty() {
        println!(
            "| run | clients | rooms | target msg/s | achieved msg/s | deliveries/s | ack p50 ms | ack p99 ms | ack p99.9 ms | delivery p50 ms | delivery p99 ms | delivery p99.9 ms | delivery max ms | drain s | errors | order viol. | dupes | delivered | server CPU % | infra CPU % | server RSS MB | ok |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &loads {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} | {} | {} |",
                v["label"].as_str().unwrap_or("?"),
                v["clients"],
                v["rooms"],
                f(v, "target_rate", 0),
                f(v, "achieved_msgs_per_s", 0),
                f(v, "deliveries_per_s", 0),
                f(v, "ack_p50_ms", 2),
                f(v, "ack_p99_ms", 2),
                f(v, "ack_p999_ms", 2),
                f(v, "delivery_p50_ms", 2),
                f(v, "delivery_p99_ms", 2),
                f(v, "delivery_p999_ms", 2),
                f(v, "delivery_max_ms", 1),
                f(v, "drain_s", 1),
                v["errors"],
                v["order_violations"],
                v["duplicates"],
                v["delivered_ratio"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.3}", x * 100.0)),
                f(v, "server_cpu_pct", 0),
                f(v, "infra_cpu_pct", 0),
                f(v, "server_rss_mb", 1),
                if v["ok"].as_bool() == Some(true) { "yes" } else { "**no**" },
            );
        }
        let base = match baseline {
            Some(b) => loads
                .iter()
                .find(|v| v["label"].as_str() == Some(b))
                .ok_or_else(|| anyhow!("no load run labelled {b:?} in {}", path.display()))?,
            None => &loads[0],
        };
        let base_label = base["label"].as_str().unwrap_or("?");
        let others: Vec<&Value> = loads.iter().filter(|v| !std::ptr::eq(*v, base)).collect();
        if !others.is_empty() {
            println!();
            println!("| ratio to {base_label} | ack p50 | ack p99 | delivery p50 | delivery p99 | server CPU |");
            println!("|---|---:|---:|---:|---:|---:|");
            for v in others {
                let r = |key: &str| -> String {
                    match (v[key].as_f64(), base[key].as_f64()) {
                        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
                        _ => "-".into(),
                    }
                };
                println!(
                    "| {}/{base_label} | {} | {} | {} | {} | {} |",
                    v["label"].as_str().unwrap_or("?"),
                    r("ack_p50_ms"),
                    r("ack_p99_ms"),
                    r("delivery_p50_ms"),
                    r("delivery_p99_ms"),
                    r("server_cpu_pct"),
                );
            }
        }
    }
    if !idles.is_empty() {
        if !loads.is_empty() {
            println!();
        }
        println!("| idle run | connections | rooms | server RSS before MB | after MB | KB per connection | ok |");
        println!("|---|---:|---:|---:|---:|---:|---|");
        for v in &idles {
            let mb = |key: &str| {
                v[key]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.1}", x / 1024.0))
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                v["label"].as_str().unwrap_or("?"),
                v["connections"],
                v["rooms"],
                mb("server_rss_before_kb"),
                mb("server_rss_after_kb"),
                f(v, "server_kb_per_conn", 2),
                if v["ok"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "**no**"
                },
            );
        }
    }
    if loads.is_empty() && idles.is_empty() {
        bail!("{}: no runs", path.display());
    }
    Ok(())
}
