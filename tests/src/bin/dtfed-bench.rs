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
//!    Exit 1 on order violations, duplicates, deliveries < 99.9 % of expected, or (paced
//!    runs) a server that **fell behind**: its last delivery came more than `--max-drain` seconds (0.5)
//!    after the last publish, or (with `--max-p99-ms`) its delivery p99 was over that. A
//!    server that delivers everything late is not a pass. Exit 2 when the clients could not
//!    be set up.
//! 8. Efficiency: deliveries per second of server CPU (`--pid`), beside the CPU of each
//!    `--infra-pid` (Redis, Kafka). With `--metrics <admin>/metrics`, the daemon's per-hop
//!    histograms over the measured window (see `dtfed_*` in `daemon/src/metrics.rs`).
//!
//! Memory run: `--idle-connections N` opens N idle subscribed connections, holds them
//! `--idle-hold` seconds and reports the server's RSS growth per connection.
//!
//! Report: `--report FILE [--baseline LABEL]` turns the JSON lines of several runs into a
//! markdown table with the ratio of every run to the baseline for p50 and p99;
//! `--report FILE --mirror` makes the cross-region tables below instead.
//!
//! # Cross-region (mirror) runs
//!
//! `--sub-url ws://<other region>/ws` (repeatable) puts the subscribers in another region
//! than the publishers: `--clients` publishers connect to the `--url`s (they do not
//! subscribe; they only publish and read their acks), `--subscribers` (default
//! `--clients`) connections to the `--sub-url`s subscribe, subscriber j to room
//! `j % rooms`, and are all `synced` before the first publish. Both sides live in this one
//! process, so the delivery latency is *remote delivery time − send time* on one clock:
//! origin append, mirror over the link, the remote region's fan-out and gateway.
//!
//! - `--flat-out [--inflight K]`: closed loop instead of `--rate`: every publisher keeps K
//!   publishes unacked and sends the next one when one is answered, so the origin region
//!   takes as much as it can (raise `client.publish_rate_per_sec` in its config).
//! - `--mirror-status http://<remote admin>` `[--mirror-origin REGION]`: samples the
//!   remote daemon's `/status` every 100 ms (the first sample, the baseline, before the
//!   first publish); the sum over its mirror tasks (of that origin) of `mirrored_offset + 1`
//!   counts the records mirrored (origin offsets are dense: one idempotent producer per
//!   origin daemon, no transactions), so *mirrored records/s* is measured at the mirror
//!   itself, apart from the remote fan-out. Against the publishes the origin acked, it also
//!   gives how far the mirror is *behind* (records of this run acked but not mirrored; the
//!   daemon's own `lag_records` is relative to the high watermark the origin last reported,
//!   so it reads 0 while records are still on the way), and when the mirror held every
//!   record of the run. `--mirror-log-dir DIR` (the remote Kafka's `log.dirs`) adds the
//!   growth of the `*.log` segments of `dtfed.mirror.<origin>-*`: *mirror MB/s* as the
//!   remote Kafka stores it. Only this run may publish in the origin region.
//! - `--delay-ms MS`: the relay's one-way delay for this run, recorded for the report's
//!   goal checks (p99 ≤ delay + 25 ms).
//!
//! Catch-up run (`--catchup --relay-ctl FIFO --sub-url ...`): publishes at `--rate` for the
//! warm-up and `--duration` (the steady pre-cut window, whose remote p99/p99.9 is kept), then
//! writes `cut` to the relay's command FIFO, keeps publishing for `--cut-secs`, writes
//! `heal`, and follows every message until it is delivered to all its subscribers:
//!
//! - backlog B: messages sent before the heal and not delivered (to every subscriber of
//!   their room) at the heal;
//! - *first delivery*: heal → the first remote delivery (the link's redial and resume);
//! - *backlog delivered*: heal → every message sent before the heal delivered;
//! - *live again*: heal → the start of the first 1 s stretch during which no undelivered
//!   message is older than `slack = max(1.5 × pre-cut p99.9, pre-cut p99.9 + 100 ms)`.
//!
//! Publishing at `--rate` goes on throughout (ingest does not stop for a cut), so the
//! catch-up rate B / live-again seconds is the *net* rate (the mirror's rate minus the
//! ingest); B / backlog-delivered seconds is the rate at which the backlog itself arrived.
//! Both are reported as multiples of `--rate`. With `--mirror-status`, the mirror alone too:
//! records the origin had at the heal that the receiver did not, when the first of them
//! arrived (*link back*: redial and stream resume), when the receiver had them all, the
//! rate from the heal and from the link being back, so a remote fan-out slower than the
//! mirror shows. `--relay-out FILE` (the relay's stdout) is checked for the relay's
//! `ok cut` / `ok healed` answers.

// The result record is one large `json!` literal.
#![recursion_limit = "256"]

#[path = "dtfed-bench/hops.rs"]
mod hops;

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
use tokio::sync::Semaphore;
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
    /// A name for each `--infra-pid`, in the same order (e.g. redis, kafka).
    #[arg(long = "infra-name")]
    infra_names: Vec<String>,
    /// The server fell behind (a failed run) if its last delivery came more than this many
    /// seconds after the last publish.
    #[arg(long, default_value_t = 0.5)]
    max_drain: f64,
    /// The server fell behind (a failed run) if the delivery p99 was above this, ms.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// The daemon's admin URL (http://host:port): its `/metrics` per-hop latency over the
    /// measured window.
    #[arg(long)]
    metrics: Option<String>,
    /// Free text recorded with the result (e.g. the broker profile).
    #[arg(long)]
    note: Option<String>,
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
    /// Report mode: the cross-region tables (remote delivery, max throughput, catch-up).
    #[arg(long)]
    mirror: bool,
    /// Subscriber endpoint in another region than the `--url`s (repeatable, round-robin):
    /// publishers then only publish, subscribers only subscribe.
    #[arg(long = "sub-url")]
    sub_urls: Vec<String>,
    /// With `--sub-url`: number of subscriber connections (default: `--clients`).
    #[arg(long)]
    subscribers: Option<usize>,
    /// Closed loop: every publisher keeps `--inflight` publishes unacked, as fast as the
    /// server answers (`--rate` is ignored).
    #[arg(long)]
    flat_out: bool,
    /// With `--flat-out`: unanswered publishes per publisher.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// One-way delay of the WAN relay in this run (ms): recorded for the report's goals.
    #[arg(long)]
    delay_ms: Option<f64>,
    /// Admin URL (http://host:port) of the receiving region's daemon: its `/status` mirror
    /// offsets are sampled every 100 ms.
    #[arg(long)]
    mirror_status: Option<String>,
    /// With `--mirror-status`: count only the mirror tasks of this origin region.
    #[arg(long)]
    mirror_origin: Option<String>,
    /// Kafka `log.dirs` of the receiving region: the growth of the mirror topic's `*.log`
    /// segments is the mirrored bytes.
    #[arg(long)]
    mirror_log_dir: Option<PathBuf>,
    /// With `--mirror-log-dir`: the mirror topics' prefix.
    #[arg(long, default_value = "dtfed.mirror.")]
    mirror_topic_prefix: String,
    /// Catch-up run: steady load, `cut` the relay, `heal` it, time the catch-up.
    #[arg(long)]
    catchup: bool,
    /// Catch-up run: the relay's command input (a FIFO on its stdin) for `cut` and `heal`.
    #[arg(long)]
    relay_ctl: Option<PathBuf>,
    /// Catch-up run: the relay's stdout, checked for its `ok cut` / `ok healed` answers.
    #[arg(long)]
    relay_out: Option<PathBuf>,
    /// Catch-up run: seconds the relay stays cut.
    #[arg(long, default_value_t = 60.0)]
    cut_secs: f64,
    /// Catch-up run: give up this many seconds after the heal if not live again.
    #[arg(long, default_value_t = 300.0)]
    catchup_max: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.report {
        let made = if args.mirror {
            mirror_report(path)
        } else {
            report(path, args.baseline.as_deref())
        };
        return match made {
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
    /// Text bytes of the `msg` frames delivered in the measured window.
    delivered_bytes_measured: AtomicU64,
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
    /// When the last publish was written and the last delivery read, ns since `base`.
    last_sent_ns: AtomicU64,
    last_delivered_ns: AtomicU64,
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
    /// Measured window, ns since `base`: [start, end). The end moves in a catch-up run (it
    /// is the cut).
    window_start: u64,
    window_end: AtomicU64,
    /// Publishers stop at their first tick at or after this (ns since `base`).
    pub_end: AtomicU64,
    subs_per_room: Vec<u64>,
    c: Counters,
    hists: Mutex<Hists>,
    errors_by_code: Mutex<BTreeMap<String, u64>>,
    /// A few examples of anything odd, for the report.
    notes: Mutex<Vec<String>>,
    closing: AtomicBool,
    /// Catch-up runs: every message until all its subscribers have it.
    tracker: Option<Tracker>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_start && t < self.window_end.load(Ordering::Relaxed)
    }

    fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    fn note(&self, what: String) {
        let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        if notes.len() < 10 {
            notes.push(what);
        }
    }
}

/// Undelivered messages, per publisher, in send order (a publisher's messages all go to
/// one room, hence one partition: each subscriber gets them in that order).
struct Tracker {
    pubs: Vec<Mutex<PubTrack>>,
}

#[derive(Default)]
struct PubTrack {
    /// Seq of the front of `q`.
    base: u64,
    /// (send ns, deliveries still missing), from seq `base` on.
    q: std::collections::VecDeque<(u64, u32)>,
}

impl PubTrack {
    fn pop_done(&mut self) {
        while self.q.front().is_some_and(|&(_, left)| left == 0) {
            self.q.pop_front();
            self.base += 1;
        }
    }
}

impl Tracker {
    fn new(publishers: usize) -> Tracker {
        Tracker {
            pubs: (0..publishers).map(|_| Mutex::default()).collect(),
        }
    }

    fn lock(&self, client: usize) -> Option<std::sync::MutexGuard<'_, PubTrack>> {
        self.pubs
            .get(client)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Publisher `client` sends `seq` (1, 2, ...) at `t`, expecting `subs` deliveries.
    fn sent(&self, client: usize, seq: u64, t: u64, subs: u64) {
        if let Some(mut p) = self.lock(client) {
            if p.q.is_empty() {
                p.base = seq;
            }
            p.q.push_back((t, u32::try_from(subs).unwrap_or(u32::MAX)));
            p.pop_done();
        }
    }

    /// One delivery of (client, seq) (duplicates are filtered before).
    fn delivered(&self, client: usize, seq: u64) {
        if let Some(mut p) = self.lock(client) {
            if let Some(i) = seq.checked_sub(p.base) {
                if let Some(e) = p.q.get_mut(i as usize) {
                    e.1 = e.1.saturating_sub(1);
                }
            }
            p.pop_done();
        }
    }

    /// (client, seq) was refused: nobody will get it.
    fn refused(&self, client: usize, seq: u64) {
        if let Some(mut p) = self.lock(client) {
            if let Some(i) = seq.checked_sub(p.base) {
                if let Some(e) = p.q.get_mut(i as usize) {
                    e.1 = 0;
                }
            }
            p.pop_done();
        }
    }

    /// Send time of the oldest message not delivered to all its subscribers.
    fn oldest_pending(&self) -> Option<u64> {
        (0..self.pubs.len())
            .filter_map(|c| self.lock(c).and_then(|p| p.q.front().map(|e| e.0)))
            .min()
    }

    /// Messages sent before `t` not delivered to all their subscribers.
    fn pending_before(&self, t: u64) -> u64 {
        (0..self.pubs.len())
            .filter_map(|c| self.lock(c))
            .map(|p| p.q.iter().filter(|e| e.0 < t && e.1 > 0).count() as u64)
            .sum()
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

/// What a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Subscribes to its room and publishes in it (one region).
    Both,
    /// Only publishes (subscribers are in another region).
    Pub,
    /// Only subscribes.
    Sub,
}

impl Role {
    fn subscribes(self) -> bool {
        self != Role::Pub
    }

    fn name(self) -> &'static str {
        match self {
            Role::Both => "client",
            Role::Pub => "publisher",
            Role::Sub => "subscriber",
        }
    }

    /// `?name=` of connection `idx`.
    fn player(self, idx: usize) -> String {
        match self {
            Role::Sub => format!("bench-sub-{idx}"),
            Role::Both | Role::Pub => format!("bench-{idx}"),
        }
    }
}

/// Connects client `idx`; if its role subscribes, subscribes it to `room` and waits for
/// `synced`, else waits for the answer to a ping.
async fn connect_client(url: &str, idx: usize, room: &RoomId, role: Role) -> anyhow::Result<Ws> {
    let (host, full) = client_url(url, &role.player(idx))?;
    let tcp = TcpStream::connect(&host)
        .await
        .with_context(|| format!("TCP connect to {host}"))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(full, tcp, Some(ws_config()))
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    let first = if role.subscribes() {
        ClientFrame::Sub {
            room: room.clone(),
            since: None,
        }
    } else {
        ClientFrame::Ping
    };
    ws.send(Message::Text(encode_client_frame(&first).into()))
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
            Ok(ServerFrame::Synced { room: r, .. }) if &r == room && role.subscribes() => {
                return Ok(ws)
            }
            Ok(ServerFrame::Pong) if !role.subscribes() => return Ok(ws),
            Ok(ServerFrame::Error { code, message, .. }) => {
                bail!("server refused {first:?}: {}: {message}", code.as_str())
            }
            Ok(_) => {}
            Err(e) => bail!("undecodable frame while waiting for synced ({e}): {text:.200}"),
        }
    }
}

/// Connects `n` clients, at most `concurrency` handshakes at once. Every connection that
/// failed is reported; any failure closes the others and fails the run.
async fn connect_all(
    args: &Args,
    urls: &[String],
    role: Role,
    run_id: &str,
    n: usize,
) -> anyhow::Result<Vec<(usize, Ws)>> {
    if urls.is_empty() {
        bail!("give at least one --url ws://host:port/ws");
    }
    for u in urls {
        client_url(u, "x")?;
    }
    let rooms: Vec<RoomId> = (0..args.rooms)
        .map(|r| room_name(run_id, r))
        .collect::<anyhow::Result<_>>()?;
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let t0 = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let room = rooms[i % rooms.len()].clone();
            async move {
                let r = tokio::time::timeout(timeout, connect_client(&url, i, &room, role))
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
                "dtfed-bench: connected {}/{n} {}s ({} failed)",
                ok.len(),
                role.name(),
                failed.len()
            );
        }
    }
    if !failed.is_empty() {
        let sample: Vec<String> = failed
            .iter()
            .take(5)
            .map(|(i, e)| format!("  {} {i}: {e:#}", role.name()))
            .collect();
        close_all(ok.into_iter().map(|(_, ws)| ws).collect()).await;
        bail!(
            "{} of {n} {}s could not connect and subscribe (first errors below); \
             check the server, its max_connections and `ulimit -n` on both sides\n{}",
            failed.len(),
            role.name(),
            sample.join("\n")
        );
    }
    eprintln!(
        "dtfed-bench: {n} {}s connected and ready in {:.1} s",
        role.name(),
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

// ------------------------------------------------------------------ mirror sampling

/// `http://host:port` (an admin listener) → `host:port`.
fn admin_hostport(url: &str) -> anyhow::Result<String> {
    let hp = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url:?}: expected http://host:port"))?
        .trim_end_matches('/');
    if hp.is_empty() || hp.contains('/') || !hp.contains(':') {
        bail!("{url:?}: expected http://host:port");
    }
    Ok(hp.to_owned())
}

/// GET `path` from an admin listener, as JSON (HTTP/1.0: no chunked answer to decode).
async fn admin_get(hostport: &str, path: &str) -> anyhow::Result<Value> {
    let body = admin_get_text(hostport, path).await?;
    serde_json::from_str(&body).with_context(|| format!("GET http://{hostport}{path}: not JSON"))
}

/// The daemon's `hop_*` histograms now, or `None` (said in the notes) if unreadable.
async fn scrape_hops(
    shared: &Shared,
    hostport: Option<&str>,
) -> Option<std::collections::BTreeMap<String, hops::Hist>> {
    let hostport = hostport?;
    match admin_get_text(hostport, "/metrics").await {
        Ok(text) => Some(hops::parse(&text)),
        Err(e) => {
            shared.note(format!("per-hop metrics not read: {e:#}"));
            None
        }
    }
}

async fn admin_get_text(hostport: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = TcpStream::connect(hostport)
            .await
            .with_context(|| format!("connecting to {hostport}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .map_err(|_| anyhow!("GET http://{hostport}{path}: no answer within 2 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET http://{hostport}{path}: malformed HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET http://{hostport}{path}: {status}");
    }
    Ok(body.to_owned())
}

/// (records mirrored, lag records) over the `mirror` tasks of `/status` (of `origin` only
/// when given): records = Σ (mirrored_offset + 1), origin offsets being dense.
fn mirror_totals(status: &Value, origin: Option<&str>) -> (Option<i64>, Option<i64>) {
    let Some(tasks) = status["mirror"].as_array() else {
        return (None, None);
    };
    let tasks: Vec<&Value> = tasks
        .iter()
        .filter(|t| origin.is_none_or(|o| t["origin"].as_str() == Some(o)))
        .collect();
    if tasks.is_empty() {
        return (None, None);
    }
    let mirrored = tasks
        .iter()
        .map(|t| t["mirrored_offset"].as_i64().map_or(0, |o| o + 1))
        .sum();
    let lag = tasks
        .iter()
        .map(|t| t["lag_records"].as_i64())
        .try_fold(0, |acc, l| l.map(|l| acc + l.max(0)));
    (Some(mirrored), lag)
}

/// Bytes of the `*.log` segments of `<dir>/<prefix><origin>-<partition>/`.
fn mirror_log_bytes(dir: &Path, prefix: &str, origin: Option<&str>) -> Option<u64> {
    let want = format!("{prefix}{}", origin.unwrap_or_default());
    let mut total = 0;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((topic, part)) = name.rsplit_once('-') else {
            continue;
        };
        let topic_ok = if origin.is_some() {
            topic == want
        } else {
            topic.starts_with(&want)
        };
        if !topic_ok || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|x| x == "log") {
                total += f.metadata().map_or(0, |m| m.len());
            }
        }
    }
    Some(total)
}

#[derive(Clone, Copy, Debug)]
struct MirrorSample {
    /// ns since the run's base.
    t: u64,
    /// Records mirrored so far (see [`mirror_totals`]).
    mirrored: Option<i64>,
    /// Σ lag_records, as the receiving daemon reports it (relative to the origin's high
    /// watermark as last reported over the link, so it lags by the link's delay).
    lag: Option<i64>,
    /// Bytes of the mirror topic in the receiving Kafka.
    log_bytes: Option<u64>,
    /// Publishes of this run acked by the origin so far (each one origin record), read
    /// just before the request.
    acked: u64,
}

/// Reads the receiving region's mirror state.
struct MirrorProbe {
    status: Option<String>,
    log_dir: Option<PathBuf>,
    origin: Option<String>,
    prefix: String,
    complained: bool,
}

impl MirrorProbe {
    async fn sample(&mut self, shared: &Shared) -> MirrorSample {
        // Acked before asking: on a busy host the answer can take a while, and the acks
        // that come in meanwhile must not count as records the mirror is missing.
        let acked = get(&shared.c.acked);
        let t0 = shared.now_ns();
        let (mirrored, lag) = match &self.status {
            Some(hp) => match admin_get(hp, "/status").await {
                Ok(v) => {
                    let (m, l) = mirror_totals(&v, self.origin.as_deref());
                    if m.is_none() && !self.complained {
                        self.complained = true;
                        eprintln!(
                            "dtfed-bench: warning: http://{hp}/status has no mirror tasks{}: \
                             no mirrored records/s",
                            self.origin
                                .as_deref()
                                .map(|o| format!(" of origin {o}"))
                                .unwrap_or_default()
                        );
                    }
                    (m, l)
                }
                Err(e) => {
                    if !self.complained {
                        self.complained = true;
                        eprintln!("dtfed-bench: warning: {e:#}");
                    }
                    (None, None)
                }
            },
            None => (None, None),
        };
        let log_bytes = self
            .log_dir
            .as_deref()
            .and_then(|d| mirror_log_bytes(d, &self.prefix, self.origin.as_deref()));
        MirrorSample {
            // The middle of the request (the daemon answered somewhere within it).
            t: t0 + (shared.now_ns() - t0) / 2,
            mirrored,
            lag,
            log_bytes,
            acked,
        }
    }
}

/// Samples the receiving region's mirror every 100 ms.
struct MirrorSampler {
    samples: Arc<Mutex<Vec<MirrorSample>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl MirrorSampler {
    /// Takes the first sample (the baseline) before returning.
    async fn start(args: &Args, shared: Arc<Shared>) -> Option<MirrorSampler> {
        let mut probe = MirrorProbe {
            status: args
                .mirror_status
                .as_deref()
                .and_then(|u| admin_hostport(u).ok()),
            log_dir: args.mirror_log_dir.clone(),
            origin: args.mirror_origin.clone(),
            prefix: args.mirror_topic_prefix.clone(),
            complained: false,
        };
        if probe.status.is_none() && probe.log_dir.is_none() {
            return None;
        }
        let first = probe.sample(&shared).await;
        let samples = Arc::new(Mutex::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (samples, stop) = (samples.clone(), stop.clone());
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(Duration::from_millis(100));
                iv.set_missed_tick_behavior(MissedTickBehavior::Delay);
                iv.tick().await;
                while !stop.load(Ordering::Relaxed) {
                    iv.tick().await;
                    let sample = probe.sample(&shared).await;
                    samples
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(sample);
                }
            })
        };
        Some(MirrorSampler {
            samples,
            stop,
            task,
        })
    }

    async fn stop(self) -> Vec<MirrorSample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.clone()
    }
}

/// Records of this run the origin acked but the receiver has not mirrored yet, at sample
/// `x` (`base`: records mirrored before the run).
fn mirror_behind(x: &MirrorSample, base: i64) -> Option<i64> {
    x.mirrored.map(|m| x.acked as i64 - (m - base))
}

/// First sample at or after `t0` at which the receiver holds `want` records of this run.
fn mirror_reached(s: &[MirrorSample], t0: u64, base: i64, want: i64) -> Option<u64> {
    s.iter()
        .filter(|x| x.t >= t0)
        .find(|x| x.mirrored.is_some_and(|m| m - base >= want))
        .map(|x| x.t)
}

/// The sample of `f` nearest to `t` from below (else the first one after), as (t, value).
fn sample_at(
    s: &[MirrorSample],
    t: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<(u64, f64)> {
    let known = || s.iter().filter_map(|x| f(x).map(|v| (x.t, v)));
    known().rfind(|(ts, _)| *ts <= t).or_else(|| known().next())
}

/// The last sample at or before `t` that has the mirror's offsets (else the first one).
fn sample_before(s: &[MirrorSample], t: u64) -> Option<&MirrorSample> {
    let known = || s.iter().filter(|x| x.mirrored.is_some());
    known().rfind(|x| x.t <= t).or_else(|| known().next())
}

/// Rate of `f` per second between `t0` and `t1` (nearest samples).
fn sample_rate(
    s: &[MirrorSample],
    t0: u64,
    t1: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<f64> {
    let (a_t, a) = sample_at(s, t0, f)?;
    let (b_t, b) = sample_at(s, t1, f)?;
    (b_t > a_t).then(|| (b - a) / ((b_t - a_t) as f64 / 1e9))
}

/// Best rate of `f` over any ≥ 1 s span of samples within [t0, t1].
fn peak_rate(
    s: &[MirrorSample],
    t0: u64,
    t1: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<f64> {
    let pts: Vec<(u64, f64)> = s
        .iter()
        .filter(|x| x.t >= t0 && x.t <= t1)
        .filter_map(|x| f(x).map(|v| (x.t, v)))
        .collect();
    let mut best: Option<f64> = None;
    let mut j = 0;
    for i in 0..pts.len() {
        j = j.max(i);
        while j < pts.len() && pts[j].0 < pts[i].0 + 1_000_000_000 {
            j += 1;
        }
        if j == pts.len() {
            break;
        }
        let r = (pts[j].1 - pts[i].1) / ((pts[j].0 - pts[i].0) as f64 / 1e9);
        best = Some(best.map_or(r, |b| b.max(r)));
    }
    best
}

fn s_mirrored(x: &MirrorSample) -> Option<f64> {
    x.mirrored.map(|v| v as f64)
}

fn s_bytes(x: &MirrorSample) -> Option<f64> {
    x.log_bytes.map(|v| v as f64)
}

fn s_lag(x: &MirrorSample) -> Option<f64> {
    x.lag.map(|v| v as f64)
}

// ------------------------------------------------------------------ catch-up run

/// What a catch-up run found; times in ns since the run's base.
struct Catchup {
    precut_p50_ms: Option<f64>,
    precut_p99_ms: Option<f64>,
    precut_p999_ms: Option<f64>,
    slack_ms: f64,
    cut: u64,
    heal: u64,
    /// Messages sent before the heal, undelivered (to some subscriber) at the heal.
    backlog: u64,
    sent_during_cut: u64,
    /// Publishes sent, and refused, before the heal.
    sent_at_heal: u64,
    refused_at_heal: u64,
    first_delivery: Option<u64>,
    backlog_delivered: Option<u64>,
    live: Option<u64>,
    /// When the catch-up phase ended (live again, or given up).
    done: u64,
    relay_answers: Vec<String>,
}

/// Writes one command line to the relay's command FIFO (never blocks: no reader is an
/// error) and, with `--relay-out`, waits up to 2 s for the relay's answer.
async fn relay_command(args: &Args, cmd: &str, want: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let ctl = args
        .relay_ctl
        .as_deref()
        .ok_or_else(|| anyhow!("no --relay-ctl"))?;
    let out = args.relay_out.as_deref();
    let offset = out
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(ctl)
        .with_context(|| {
            format!(
                "cannot open the relay's command input {} (is the relay reading it?)",
                ctl.display()
            )
        })?;
    f.write_all(format!("{cmd}\n").as_bytes())
        .with_context(|| format!("writing `{cmd}` to {}", ctl.display()))?;
    drop(f);
    let Some(out) = out else {
        return Ok(format!("{cmd}: sent"));
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(all) = std::fs::read(out) {
            let new = String::from_utf8_lossy(all.get(offset as usize..).unwrap_or_default());
            if let Some(line) = new
                .lines()
                .find(|l| l.starts_with("ok ") || l.starts_with("error"))
            {
                if line.starts_with(want) {
                    return Ok(format!("{cmd}: {line}"));
                }
                bail!("the relay answered `{line}` to `{cmd}`");
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no answer from the relay to `{cmd}` in {} within 2 s",
                out.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// From the cut on: cut, wait, heal, follow the catch-up. Returns what it found and the
/// CPU samples at the heal and when live again (or given up).
async fn catchup_phase(
    args: &Args,
    shared: &Arc<Shared>,
    pids: &[String],
) -> (Catchup, CpuSample, CpuSample) {
    let Some(tracker) = shared.tracker.as_ref() else {
        unreachable!("a catch-up run has a tracker");
    };
    let (p50, p99, p999) = {
        let h = shared.hists.lock().unwrap_or_else(PoisonError::into_inner);
        (
            ms(&h.delivery, 0.5),
            ms(&h.delivery, 0.99),
            ms(&h.delivery, 0.999),
        )
    };
    let base_ms = p999.unwrap_or(args.delay_ms.unwrap_or(0.0) + 100.0);
    let slack_ms = (1.5 * base_ms).max(base_ms + 100.0);
    let slack = (slack_ms * 1e6) as u64;
    let mut answers = Vec::new();

    let cut = shared.now_ns();
    shared.window_end.store(cut, Ordering::Relaxed);
    let sent_at_cut = get(&shared.c.sent);
    match relay_command(args, "cut", "ok cut").await {
        Ok(a) => answers.push(a),
        Err(e) => {
            eprintln!("dtfed-bench: warning: {e:#}");
            answers.push(format!("cut: {e:#}"));
        }
    }
    eprintln!(
        "dtfed-bench: cut (pre-cut remote delivery p99 {} ms, p99.9 {} ms); healing in {} s",
        fmt_opt(p99, 1),
        fmt_opt(p999, 1),
        args.cut_secs
    );
    let heal_at = shared.instant(cut) + Duration::from_secs_f64(args.cut_secs);
    let mut next = Instant::now() + Duration::from_secs(10);
    while next < heal_at {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        progress(shared, shared.instant(cut).elapsed().as_secs_f64());
        next += Duration::from_secs(10);
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(heal_at)).await;
    let cpu_a = sample_cpu(pids);
    let heal = shared.now_ns();
    let delivered_at_heal = get(&shared.c.delivered);
    let sent_at_heal = get(&shared.c.sent);
    let refused_at_heal = get(&shared.c.pub_errors);
    let sent_during_cut = sent_at_heal.saturating_sub(sent_at_cut);
    match relay_command(args, "heal", "ok healed").await {
        Ok(a) => answers.push(a),
        Err(e) => {
            eprintln!("dtfed-bench: warning: {e:#}");
            answers.push(format!("heal: {e:#}"));
        }
    }
    let backlog = tracker.pending_before(heal);
    eprintln!(
        "dtfed-bench: healed; backlog {backlog} messages ({sent_during_cut} sent during the cut)"
    );

    let deadline = shared.instant(heal) + Duration::from_secs_f64(args.catchup_max);
    let mut first_delivery = None;
    let mut backlog_delivered = None;
    let mut live_since: Option<u64> = None;
    let mut live = None;
    let mut next_progress = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = shared.now_ns();
        if first_delivery.is_none() && get(&shared.c.delivered) > delivered_at_heal {
            first_delivery = Some(now);
            eprintln!(
                "dtfed-bench: first delivery {:.2} s after the heal",
                (now - heal) as f64 / 1e9
            );
        }
        let oldest = tracker.oldest_pending();
        if backlog_delivered.is_none() && oldest.is_none_or(|o| o >= heal) {
            backlog_delivered = Some(now);
            eprintln!(
                "dtfed-bench: backlog delivered {:.2} s after the heal",
                (now - heal) as f64 / 1e9
            );
        }
        let fresh = oldest.is_none_or(|o| now.saturating_sub(o) <= slack);
        if backlog_delivered.is_some() && fresh {
            let since = *live_since.get_or_insert(now);
            if now - since >= 1_000_000_000 {
                live = Some(since);
                eprintln!(
                    "dtfed-bench: live again {:.2} s after the heal",
                    (since - heal) as f64 / 1e9
                );
                break;
            }
        } else {
            live_since = None;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "dtfed-bench: not live again {} s after the heal: giving up",
                args.catchup_max
            );
            break;
        }
        if Instant::now() >= next_progress {
            progress(shared, shared.instant(cut).elapsed().as_secs_f64());
            next_progress += Duration::from_secs(5);
        }
    }
    let cpu_b = sample_cpu(pids);
    let done = shared.now_ns();
    (
        Catchup {
            precut_p50_ms: p50,
            precut_p99_ms: p99,
            precut_p999_ms: p999,
            slack_ms,
            cut,
            heal,
            backlog,
            sent_during_cut,
            sent_at_heal,
            refused_at_heal,
            first_delivery,
            backlog_delivered,
            live,
            done,
            relay_answers: answers,
        },
        cpu_a,
        cpu_b,
    )
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

/// How a publisher paces itself.
enum Pace {
    /// Open loop: one publish per `period`, first at `first_tick`.
    Rate {
        first_tick: tokio::time::Instant,
        period: Duration,
    },
    /// Closed loop: a permit per publish, given back by the reader on its ack or error.
    Window(Arc<Semaphore>),
}

/// Publishes until `pub_end`; returns the sink for the orderly close.
async fn publisher(
    shared: Arc<Shared>,
    mut sink: WsSink,
    idx: usize,
    room: RoomId,
    pace: Pace,
    body_bytes: usize,
) -> Option<WsSink> {
    let room_idx = idx % shared.subs_per_room.len();
    let subs = shared.subs_per_room[room_idx];
    let mut iv = match &pace {
        Pace::Rate { first_tick, period } => {
            let mut iv = tokio::time::interval_at(*first_tick, *period);
            iv.set_missed_tick_behavior(MissedTickBehavior::Burst);
            Some(iv)
        }
        Pace::Window(_) => None,
    };
    let mut seq: u64 = 0;
    loop {
        let end = shared.instant(shared.pub_end.load(Ordering::Relaxed));
        match (&mut iv, &pace) {
            (Some(iv), _) => {
                let scheduled = iv.tick().await;
                // `pub_end` may have moved while this task waited for its tick.
                let end = shared.instant(shared.pub_end.load(Ordering::Relaxed));
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
            }
            (None, Pace::Window(sem)) => {
                let deadline = tokio::time::Instant::from_std(end);
                match tokio::time::timeout_at(deadline, sem.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    Ok(Err(_)) | Err(_) => return Some(sink),
                }
                if Instant::now() >= end {
                    return Some(sink);
                }
            }
            (None, Pace::Rate { .. }) => return Some(sink),
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
        shared.c.last_sent_ns.fetch_max(t, Ordering::Relaxed);
        shared.c.expected.fetch_add(subs, Ordering::Relaxed);
        if let Some(tr) = &shared.tracker {
            tr.sent(idx, seq, t, subs);
        }
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
    role: Role,
    room: RoomId,
    /// `--flat-out`: the publisher's permits, one given back per answered publish.
    window: Option<Arc<Semaphore>>,
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
                "{} {}: undecodable server frame ({e}): {text:.200}",
                st.role.name(),
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
            if m.room != st.room || !st.role.subscribes() {
                inc(&shared.c.misrouted);
                shared.note(format!(
                    "{} {} (room {}) got a message of room {}",
                    st.role.name(),
                    st.idx,
                    st.room,
                    m.room
                ));
                return;
            }
            if st.seen_before(body.c, body.s) {
                inc(&shared.c.duplicates);
                shared.note(format!(
                    "{} {}: duplicate of client {} seq {} (origin {} offset {})",
                    st.role.name(),
                    st.idx,
                    body.c,
                    body.s,
                    m.origin,
                    m.offset
                ));
                return;
            }
            let last = st.last.get(&m.origin).copied();
            if let Some(last) = last {
                if m.offset <= last {
                    inc(&shared.c.order_violations);
                    shared.note(format!(
                        "{} {}: room {} origin {}: offset {} after {last}",
                        st.role.name(),
                        st.idx,
                        m.room,
                        m.origin,
                        m.offset
                    ));
                }
            }
            // `prev` must chain to what this connection saw (the room is fresh and we were
            // subscribed before anything was published in it). The relay sends null.
            if let Some(prev) = m.prev {
                if last != Some(prev) {
                    inc(&shared.c.prev_breaks);
                    shared.note(format!(
                        "{} {}: room {} origin {}: prev {prev} but last seen {last:?}",
                        st.role.name(),
                        st.idx,
                        m.room,
                        m.origin
                    ));
                }
            }
            if last.is_none_or(|l| m.offset > l) {
                st.last.insert(m.origin, m.offset);
            }
            inc(&shared.c.delivered);
            shared.c.last_delivered_ns.fetch_max(now, Ordering::Relaxed);
            if shared.in_window(now) {
                inc(&shared.c.delivered_measured);
                shared
                    .c
                    .delivered_bytes_measured
                    .fetch_add(text.len() as u64, Ordering::Relaxed);
            }
            if let Some(tr) = &shared.tracker {
                tr.delivered(body.c as usize, body.s);
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
            if let Some(w) = &st.window {
                w.add_permits(1);
            }
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
            if let Some(r) = &reference {
                inc(&shared.c.pub_errors);
                if let Some(w) = &st.window {
                    w.add_permits(1);
                }
                let seq = r.split_once(':').and_then(|(q, _)| q.parse::<u64>().ok());
                if let (Some(tr), Some(seq)) = (&shared.tracker, seq) {
                    tr.refused(st.idx, seq);
                }
            }
            *shared
                .errors_by_code
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(code.as_str().to_owned())
                .or_default() += 1;
            shared.note(format!(
                "{} {}: error {}: {message}",
                st.role.name(),
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
                "{} {}: gap in {room} from {origin}: {from}..={to}",
                st.role.name(),
                st.idx
            ));
        }
        ServerFrame::Synced { .. } | ServerFrame::More { .. } | ServerFrame::Pong => {}
    }
}

async fn reader(
    shared: Arc<Shared>,
    mut stream: WsStream,
    idx: usize,
    role: Role,
    room: RoomId,
    window: Option<Arc<Semaphore>>,
) {
    let who = format!("{} {idx}", role.name());
    let mut st = ReaderState {
        idx,
        role,
        room,
        window,
        last: HashMap::new(),
        seen: HashMap::new(),
    };
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => on_text(&shared, &mut st, &t),
            Some(Ok(Message::Binary(_))) => {
                inc(&shared.c.bad_frames);
                shared.note(format!("{who}: binary frame from the server"));
            }
            Some(Ok(Message::Close(frame))) => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("{who}: server closed: {frame:?}"));
                }
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("{who}: connection error: {e}"));
                }
                return;
            }
            None => {
                if !shared.closing.load(Ordering::Relaxed) {
                    inc(&shared.c.disconnects);
                    shared.note(format!("{who}: connection ended"));
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
    for u in &args.sub_urls {
        client_url(u, "x")?;
    }
    if args.subscribers == Some(0) {
        bail!("--subscribers must be at least 1");
    }
    if args.subscribers.is_some() && args.sub_urls.is_empty() {
        bail!("--subscribers needs --sub-url (without it every client subscribes)");
    }
    if args.flat_out && args.inflight == 0 {
        bail!("--inflight must be at least 1");
    }
    if let Some(d) = args.delay_ms {
        if !(0.0..1e6).contains(&d) {
            bail!("--delay-ms must be >= 0, got {d}");
        }
    }
    if let Some(url) = &args.mirror_status {
        admin_hostport(url)?;
    }
    if args.catchup {
        if args.sub_urls.is_empty() {
            bail!(
                "--catchup needs --sub-url: the subscribers must be in the region across the relay"
            );
        }
        if args.relay_ctl.is_none() {
            bail!("--catchup needs --relay-ctl (the relay's command FIFO)");
        }
        if args.flat_out || args.rate <= 0.0 {
            bail!("--catchup publishes at a steady --rate (> 0), not --flat-out");
        }
        for (what, v) in [
            ("--cut-secs", args.cut_secs),
            ("--catchup-max", args.catchup_max),
        ] {
            if !(v > 0.0 && v < 1e6) {
                bail!("{what} must be a number of seconds > 0, got {v}");
            }
        }
    }
    Ok(())
}

async fn load_run(args: &Args) -> anyhow::Result<Outcome> {
    check_common(args)?;
    let run_id = run_id(args);
    let n = args.clients;
    let remote = !args.sub_urls.is_empty();
    let m = if remote {
        args.subscribers.unwrap_or(n)
    } else {
        0
    };
    // Subscribers first, so all of them are live before the first publish.
    let sub_conns = if remote {
        connect_all(args, &args.sub_urls, Role::Sub, &run_id, m).await?
    } else {
        Vec::new()
    };
    let pub_role = if remote { Role::Pub } else { Role::Both };
    let conns = match connect_all(args, &args.urls, pub_role, &run_id, n).await {
        Ok(c) => c,
        Err(e) => {
            close_all(sub_conns.into_iter().map(|(_, ws)| ws).collect()).await;
            return Err(e);
        }
    };

    let mut subs_per_room = vec![0u64; args.rooms];
    for i in 0..if remote { m } else { n } {
        subs_per_room[i % args.rooms] += 1;
    }
    let base = Instant::now();
    // Everyone starts 200 ms from now; the first ticks are spread over one period.
    let start = base + Duration::from_millis(200);
    let warm_end = start + Duration::from_secs_f64(args.warmup);
    // The end of the measured window; in a catch-up run, the cut.
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| t.duration_since(base).as_nanos() as u64;
    let shared = Arc::new(Shared {
        base,
        run_id: run_id.clone(),
        window_start: ns(warm_end),
        window_end: AtomicU64::new(ns(end)),
        // A catch-up run stops publishing once caught up.
        pub_end: AtomicU64::new(if args.catchup { u64::MAX / 4 } else { ns(end) }),
        subs_per_room,
        c: Counters::default(),
        hists: Mutex::new(Hists {
            ack: new_hist()?,
            delivery: new_hist()?,
        }),
        errors_by_code: Mutex::new(BTreeMap::new()),
        notes: Mutex::new(Vec::new()),
        closing: AtomicBool::new(false),
        tracker: args.catchup.then(|| Tracker::new(n)),
    });

    let publishing = args.flat_out || args.rate > 0.0;
    let period = if publishing && !args.flat_out {
        Duration::from_secs_f64(n as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    if publishing && !args.flat_out && period < Duration::from_micros(100) {
        bail!(
            "--rate {} over {n} clients is {:.0} msg/s per client: use more clients",
            args.rate,
            args.rate / n as f64
        );
    }
    let pace_text = if args.flat_out {
        format!("flat out, {} in flight per publisher", args.inflight)
    } else {
        format!(
            "{} msg/s ({:.2} msg/s per client)",
            args.rate,
            args.rate / n as f64
        )
    };
    let where_text = if remote {
        format!(
            "{n} publishers on {}, {m} subscribers on {}",
            args.urls.join(" "),
            args.sub_urls.join(" ")
        )
    } else {
        format!("{n} clients")
    };
    eprintln!(
        "dtfed-bench: {} — {where_text}, {} rooms, {pace_text}, warm-up {} s, measuring {} s{}, \
         run id {run_id}",
        args.label,
        args.rooms,
        args.warmup,
        args.duration,
        if args.catchup {
            format!(" then a {} s cut", args.cut_secs)
        } else {
            String::new()
        }
    );

    let mut readers = Vec::with_capacity(n + m);
    let mut publishers = Vec::with_capacity(n);
    let mut idle_sinks = Vec::new();
    for (j, ws) in sub_conns {
        let room = room_name(&run_id, j % args.rooms)?;
        let (sink, stream) = ws.split();
        readers.push(tokio::spawn(reader(
            shared.clone(),
            stream,
            j,
            Role::Sub,
            room.clone(),
            None,
        )));
        idle_sinks.push((Some(room), sink));
    }
    {
        let mut rng = rand::rng();
        for (i, ws) in conns {
            let room = room_name(&run_id, i % args.rooms)?;
            let (sink, stream) = ws.split();
            let window = args
                .flat_out
                .then(|| Arc::new(Semaphore::new(args.inflight)));
            readers.push(tokio::spawn(reader(
                shared.clone(),
                stream,
                i,
                pub_role,
                room.clone(),
                window.clone(),
            )));
            // Publishers of a remote run did not subscribe: nothing to unsubscribe.
            let sub_room = pub_role.subscribes().then(|| room.clone());
            if publishing {
                let pace = match window {
                    Some(w) => Pace::Window(w),
                    None => Pace::Rate {
                        first_tick: tokio::time::Instant::from_std(
                            start
                                + Duration::from_nanos(
                                    rng.random_range(0..period.as_nanos() as u64),
                                ),
                        ),
                        period,
                    },
                };
                let task = tokio::spawn(publisher(
                    shared.clone(),
                    sink,
                    i,
                    room.clone(),
                    pace,
                    args.body_bytes,
                ));
                publishers.push((sub_room, task));
            } else {
                idle_sinks.push((sub_room, sink));
            }
        }
    }
    let sampler = MirrorSampler::start(args, shared.clone()).await;

    // CPU of the servers and of this process over the measured window (a catch-up run:
    // from the heal until live again).
    // Sampled in this order: --pid..., --infra-pid..., this process.
    let mut pids: Vec<String> = args
        .pids
        .iter()
        .chain(&args.infra_pids)
        .map(u32::to_string)
        .collect();
    pids.push("self".into());
    let metrics_at = match &args.metrics {
        Some(url) => Some(admin_hostport(url)?),
        None => None,
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(warm_end)).await;
    let mut cpu_a = sample_cpu(&pids);
    let hops_a = scrape_hops(&shared, metrics_at.as_deref()).await;
    let progress_every = Duration::from_secs(5);
    let mut next_progress = warm_end + progress_every;
    while next_progress < end {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next_progress)).await;
        progress(
            &shared,
            next_progress.duration_since(warm_end).as_secs_f64(),
        );
        next_progress += progress_every;
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    let mut cpu_b = sample_cpu(&pids);
    let hops_b = scrape_hops(&shared, metrics_at.as_deref()).await;
    let hop_rows: Vec<(&str, &str, hops::Hist)> = match (&hops_a, &hops_b) {
        (Some(a), Some(b)) => hops::HOPS
            .iter()
            .filter_map(|(name, what)| b.get(*name).map(|h| (*name, *what, h.minus(a.get(*name)))))
            .collect(),
        _ => Vec::new(),
    };
    let catchup = if args.catchup {
        let (c, a, b) = catchup_phase(args, &shared, &pids).await;
        (cpu_a, cpu_b) = (a, b);
        // Publish one more second at the steady rate, then stop.
        shared
            .pub_end
            .store(shared.now_ns() + 1_000_000_000, Ordering::Relaxed);
        Some(c)
    } else {
        None
    };
    let rss: Vec<(Option<u64>, Option<u64>)> = args
        .pids
        .iter()
        .map(|p| {
            let p = p.to_string();
            (status_kb(&p, "VmRSS"), status_kb(&p, "VmHWM"))
        })
        .collect();

    // Publishers stop at `pub_end`; then wait for the stragglers.
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
    let mirror = match sampler {
        Some(s) => Some(s.stop().await),
        None => None,
    };

    // Orderly goodbye: unsub, close, let the readers see the server's close.
    shared.closing.store(true, Ordering::Relaxed);
    let goodbyes = sinks.into_iter().map(|(room, mut sink)| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            if let Some(room) = room {
                let unsub = encode_client_frame(&ClientFrame::Unsub { room });
                let _ = sink.send(Message::Text(unsub.into())).await;
            }
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
        subscribers: m,
        mirror: mirror.as_deref(),
        catchup: catchup.as_ref(),
        hops: &hop_rows,
    };
    results.print_and_save()
}

fn progress(shared: &Shared, at_s: f64) {
    eprintln!(
        "dtfed-bench: {at_s:>4.0} s: sent {} acked {} delivered {}/{}",
        get(&shared.c.sent),
        get(&shared.c.acked),
        get(&shared.c.delivered),
        get(&shared.c.expected)
    );
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
    /// Subscriber connections in the other region (0: one-region run).
    subscribers: usize,
    /// `--mirror-status` / `--mirror-log-dir` samples.
    mirror: Option<&'a [MirrorSample]>,
    catchup: Option<&'a Catchup>,
    /// `--metrics`: each hop's histogram over the measured window.
    hops: &'a [(&'static str, &'static str, hops::Hist)],
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
    /// Rows and JSON fields of cross-region, mirror and catch-up runs.
    fn extras(
        &self,
        failures: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> (Vec<(&'static str, String)>, serde_json::Map<String, Value>) {
        let a = self.args;
        let c = &self.shared.c;
        let mut rows: Vec<(&'static str, String)> = Vec::new();
        let mut j = serde_json::Map::new();
        let ws = self.shared.window_start;
        let we = self.shared.window_end.load(Ordering::Relaxed);
        let dur = (we.saturating_sub(ws) as f64 / 1e9).max(1e-9);
        let delivered_mb_s = get(&c.delivered_bytes_measured) as f64 / dur / 1e6;
        j.insert("delay_ms".into(), json!(a.delay_ms));
        j.insert("flat_out".into(), json!(a.flat_out));
        j.insert("inflight".into(), json!(a.flat_out.then_some(a.inflight)));
        j.insert("sub_urls".into(), json!(a.sub_urls));
        j.insert("subscribers".into(), json!(self.subscribers));
        j.insert("delivered_mb_per_s".into(), json!(delivered_mb_s));
        if !a.sub_urls.is_empty() {
            rows.push((
                "cross-region",
                format!(
                    "{} publishers on {}, {} subscribers on {}{}",
                    a.clients,
                    a.urls.join(" "),
                    self.subscribers,
                    a.sub_urls.join(" "),
                    a.delay_ms
                        .map(|d| format!(", relay delay {d} ms one way"))
                        .unwrap_or_default()
                ),
            ));
        }
        if a.flat_out {
            rows.push((
                "pacing",
                format!("flat out, {} in flight per publisher", a.inflight),
            ));
        }
        rows.push((
            "delivered bytes",
            format!("{delivered_mb_s:.3} MB/s (msg frames, measured window)"),
        ));
        // Records mirrored before this run (the first sample is taken before publishing).
        let mirror_base = self.mirror.and_then(|s| s.first()).and_then(|x| x.mirrored);
        if let Some(s) = self.mirror {
            let rate = sample_rate(s, ws, we, s_mirrored);
            let mb = sample_rate(s, ws, we, s_bytes).map(|b| b / 1e6);
            let lag_end = sample_at(s, we, s_lag).map(|x| x.1);
            let behind_end =
                mirror_base.and_then(|b| sample_before(s, we).and_then(|x| mirror_behind(x, b)));
            let pub_end = self.shared.pub_end.load(Ordering::Relaxed);
            let all_in = mirror_base
                .and_then(|b| mirror_reached(s, 0, b, get(&c.acked) as i64))
                .map(|t| (t as f64 - pub_end as f64).max(0.0) / 1e9);
            let last = s.iter().rev().find_map(|x| x.mirrored);
            rows.push((
                "mirror (receiving /status)",
                format!(
                    "{} records/s, {} MB/s in its Kafka over the window; at its end {} records \
                     behind the origin (daemon's lag_records {}); every record in {} s after \
                     the last publish",
                    fmt_opt(rate, 0),
                    fmt_opt(mb, 3),
                    behind_end.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    fmt_opt(lag_end, 0),
                    fmt_opt(all_in, 2)
                ),
            ));
            j.insert("mirror_records_per_s".into(), json!(rate));
            j.insert("mirror_mb_per_s".into(), json!(mb));
            j.insert("mirror_behind_end".into(), json!(behind_end));
            j.insert("mirror_lag_end".into(), json!(lag_end));
            j.insert("mirror_all_in_s".into(), json!(all_in));
            j.insert("mirror_records_total".into(), json!(last));
            j.insert("mirror_samples".into(), json!(s.len()));
        }
        let Some(k) = self.catchup else {
            return (rows, j);
        };
        let since_heal = |t: Option<u64>| t.map(|t| t.saturating_sub(k.heal) as f64 / 1e9);
        let first_s = since_heal(k.first_delivery);
        let backlog_s = since_heal(k.backlog_delivered);
        let live_s = since_heal(k.live);
        let per_s = |secs: Option<f64>| secs.filter(|t| *t > 0.0).map(|t| k.backlog as f64 / t);
        let catchup_rate = per_s(live_s);
        let backlog_rate = per_s(backlog_s);
        let x = |r: Option<f64>| r.filter(|_| a.rate > 0.0).map(|r| r / a.rate);
        rows.push((
            "pre-cut remote p50/p99/p99.9",
            format!(
                "{} / {} / {} ms (live-again slack {:.0} ms)",
                fmt_opt(k.precut_p50_ms, 2),
                fmt_opt(k.precut_p99_ms, 2),
                fmt_opt(k.precut_p999_ms, 2),
                k.slack_ms
            ),
        ));
        rows.push((
            "cut",
            format!(
                "{:.1} s; {} sent meanwhile; backlog at heal {}",
                (k.heal - k.cut) as f64 / 1e9,
                k.sent_during_cut,
                k.backlog
            ),
        ));
        rows.push((
            "after the heal",
            format!(
                "first delivery {} s, backlog delivered {} s, live again {} s",
                fmt_opt(first_s, 2),
                fmt_opt(backlog_s, 2),
                fmt_opt(live_s, 2)
            ),
        ));
        rows.push((
            "catch-up rate",
            format!(
                "{} msg/s = {}× ingest (backlog / live again); backlog arrived at {} msg/s = {}×",
                fmt_opt(catchup_rate, 0),
                fmt_opt(x(catchup_rate), 2),
                fmt_opt(backlog_rate, 0),
                fmt_opt(x(backlog_rate), 2)
            ),
        ));
        // The mirror alone: records of this run the origin had at the heal and the receiver
        // did not, and how long until it had them all.
        let mut mirror_backlog = None;
        let mut mirror_backlog_s = None;
        let mut mirror_resumed_s = None;
        let mut mirror_peak = None;
        let mut mirror_behind_done = None;
        if let (Some(s), Some(b)) = (self.mirror, mirror_base) {
            let want = k.sent_at_heal as i64 - k.refused_at_heal as i64;
            let at_heal = sample_before(s, k.heal).and_then(|x| x.mirrored);
            mirror_backlog = at_heal.map(|m| want - (m - b));
            let all_in = mirror_reached(s, k.heal, b, want);
            mirror_backlog_s = since_heal(all_in);
            // The link is back: the first sample after the heal with more records.
            mirror_resumed_s = since_heal(at_heal.and_then(|h| {
                s.iter()
                    .filter(|x| x.t >= k.heal)
                    .find(|x| x.mirrored.is_some_and(|m| m > h))
                    .map(|x| x.t)
            }));
            mirror_peak = peak_rate(s, k.heal, all_in.unwrap_or(u64::MAX), s_mirrored);
            mirror_behind_done = sample_before(s, k.done).and_then(|x| mirror_behind(x, b));
        }
        let mirror_rate = match (mirror_backlog, mirror_backlog_s) {
            (Some(n), Some(t)) if t > 0.0 => Some(n as f64 / t),
            _ => None,
        };
        // The backlog's transfer alone, once the link was back.
        let mirror_transfer = match (mirror_backlog, mirror_backlog_s, mirror_resumed_s) {
            (Some(n), Some(t), Some(r)) if t > r => Some(n as f64 / (t - r)),
            _ => None,
        };
        if self.mirror.is_some() {
            rows.push((
                "mirror catch-up",
                format!(
                    "{} records behind at the heal; link back after {} s, all in {} s: \
                     {} records/s = {}× ingest from the heal, {} records/s once back \
                     (best 1 s {}); {} records behind when the phase ended",
                    mirror_backlog.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    fmt_opt(mirror_resumed_s, 2),
                    fmt_opt(mirror_backlog_s, 2),
                    fmt_opt(mirror_rate, 0),
                    fmt_opt(x(mirror_rate), 2),
                    fmt_opt(mirror_transfer, 0),
                    fmt_opt(mirror_peak, 0),
                    mirror_behind_done.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                ),
            ));
        }
        rows.push(("relay", k.relay_answers.join("; ")));
        if k.backlog == 0 {
            warnings.push(
                "no backlog at the heal: did the cut reach the relay (see `relay` above)?".into(),
            );
        }
        if k.live.is_none() {
            failures.push(format!(
                "not live again within --catchup-max {} s after the heal",
                a.catchup_max
            ));
        }
        for (key, v) in [
            ("precut_p50_ms", json!(k.precut_p50_ms)),
            ("precut_p99_ms", json!(k.precut_p99_ms)),
            ("precut_p999_ms", json!(k.precut_p999_ms)),
            ("slack_ms", json!(k.slack_ms)),
            ("cut_s", json!((k.heal - k.cut) as f64 / 1e9)),
            ("sent_during_cut", json!(k.sent_during_cut)),
            ("backlog", json!(k.backlog)),
            ("first_delivery_s", json!(first_s)),
            ("backlog_delivered_s", json!(backlog_s)),
            ("live_s", json!(live_s)),
            ("catchup_msgs_per_s", json!(catchup_rate)),
            ("catchup_x", json!(x(catchup_rate))),
            ("backlog_msgs_per_s", json!(backlog_rate)),
            ("backlog_x", json!(x(backlog_rate))),
            ("mirror_backlog", json!(mirror_backlog)),
            ("mirror_backlog_s", json!(mirror_backlog_s)),
            ("mirror_catchup_records_per_s", json!(mirror_rate)),
            ("mirror_catchup_x", json!(x(mirror_rate))),
            ("mirror_catchup_peak_records_per_s", json!(mirror_peak)),
            ("mirror_resumed_s", json!(mirror_resumed_s)),
            ("mirror_transfer_records_per_s", json!(mirror_transfer)),
            ("mirror_behind_done", json!(mirror_behind_done)),
            ("relay_answers", json!(k.relay_answers)),
        ] {
            j.insert(key.into(), v);
        }
        (rows, j)
    }

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
        // How long after the last publish the last delivery came: the server's backlog.
        let last_sent = get(&c.last_sent_ns);
        let last_delivered = get(&c.last_delivered_ns);
        let behind_s = if last_sent > 0 && last_delivered > 0 {
            Some(last_delivered.saturating_sub(last_sent) as f64 / 1e9)
        } else {
            None
        };
        // A closed-loop (flat-out) run measures the ceiling: a backlog at its end is the
        // measurement, not a failure; a catch-up run has its own criteria.
        if self.catchup.is_none() && !a.flat_out {
            if let Some(b) = behind_s.filter(|b| *b > a.max_drain) {
                failures.push(format!(
                    "fell behind: the last delivery came {b:.2} s after the last publish (limit --max-drain {} s)",
                    a.max_drain
                ));
            }
            if let (Some(limit), Some(p99)) = (a.max_p99_ms, ms(&hists.delivery, 0.99)) {
                if p99 > limit {
                    failures.push(format!(
                        "fell behind: delivery p99 {p99:.1} ms is over --max-p99-ms {limit} ms"
                    ));
                }
            }
        }
        let per_cpu_s = match server_cpu {
            Some(cpu) if cpu > 0.0 => Some(deliveries_per_s / (cpu / 100.0)),
            _ => None,
        };
        let infra_each: Vec<(String, Option<f64>)> = infra
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let name = a
                    .infra_names
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| format!("pid {}", a.infra_pids[k]));
                (name, *v)
            })
            .collect();
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

        let (extra_rows, extra_json) = self.extras(&mut failures, &mut warnings);

        let mut rows: Vec<(&str, String)> = vec![
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
                    "{deliveries_per_s:.0} /s (last one {} s after the last publish)",
                    fmt_opt(behind_s, 3)
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
            ("deliveries per server CPU-s", fmt_opt(per_cpu_s, 0)),
            (
                "infra CPU (Redis, Kafka)",
                match infra_cpu {
                    Some(v) => {
                        let each: Vec<String> = infra_each
                            .iter()
                            .map(|(n, c)| format!("{n} {} %", fmt_opt(*c, 0)))
                            .collect();
                        format!("{v:.0} % ({})", each.join(", "))
                    }
                    None => "- (no --infra-pid)".into(),
                },
            ),
            ("bench CPU", format!("{} %", fmt_opt(bench_cpu, 0))),
        ];
        for (_, what, h) in self.hops {
            rows.push((
                what,
                format!(
                    "p50 {} / p99 {} ms ({} observations)",
                    fmt_opt(h.quantile(0.5).map(|v| v * 1000.0), 2),
                    fmt_opt(h.quantile(0.99).map(|v| v * 1000.0), 2),
                    h.count
                ),
            ));
        }
        rows.extend(extra_rows);
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
        let mut record = json!({
            "mode": if self.catchup.is_some() { "catchup" } else { "load" },
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
            "behind_s": behind_s,
            "max_drain_s": a.max_drain,
            "deliveries_per_server_cpu_s": per_cpu_s,
            "infra_cpu": infra_each.iter().map(|(n, c)| json!({"name": n, "cpu_pct": c})).collect::<Vec<_>>(),
            "note": a.note,
            "hops": self.hops.iter().map(|(name, what, h)| json!({
                "metric": name,
                "hop": what,
                "count": h.count,
                "p50_ms": h.quantile(0.5).map(|v| v * 1000.0),
                "p99_ms": h.quantile(0.99).map(|v| v * 1000.0),
            })).collect::<Vec<_>>(),
            "ok": failures.is_empty(),
            "failures": failures,
            "warnings": warnings,
        });
        if let Some(obj) = record.as_object_mut() {
            obj.extend(extra_json);
        }
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
    let conns = connect_all(args, &args.urls, Role::Both, &run_id, n).await?;
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
            "| run | clients | rooms | target msg/s | achieved msg/s | deliveries/s | ack p50 ms | ack p99 ms | ack p99.9 ms | delivery p50 ms | delivery p99 ms | delivery p99.9 ms | delivery max ms | last delivery after last publish s | errors | order viol. | dupes | delivered | server CPU % | deliveries per server CPU-s | infra CPU % | server RSS MB | ok |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &loads {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} | {} | {} | {} |",
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
                f(v, "behind_s", 3),
                v["errors"],
                v["order_violations"],
                v["duplicates"],
                v["delivered_ratio"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.3}", x * 100.0)),
                f(v, "server_cpu_pct", 0),
                f(v, "deliveries_per_server_cpu_s", 0),
                {
                    let each: Vec<String> = v["infra_cpu"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|i| format!("{} {}", i["name"].as_str().unwrap_or("?"), f(i, "cpu_pct", 0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    if each.is_empty() {
                        f(v, "infra_cpu_pct", 0)
                    } else {
                        format!("{} ({})", f(v, "infra_cpu_pct", 0), each.join(", "))
                    }
                },
                f(v, "server_rss_mb", 1),
                if v["ok"].as_bool() == Some(true) { "yes" } else { "**no**" },
            );
        }
        let with_hops: Vec<&Value> = loads
            .iter()
            .filter(|v| v["hops"].as_array().is_some_and(|h| !h.is_empty()))
            .collect();
        for v in with_hops {
            println!();
            println!(
                "Where {}'s time went (its /metrics over the measured window):",
                v["label"].as_str().unwrap_or("?")
            );
            println!();
            println!("| hop | p50 ms | p99 ms | observations |");
            println!("|---|---:|---:|---:|");
            for h in v["hops"].as_array().into_iter().flatten() {
                println!(
                    "| {} | {} | {} | {} |",
                    h["hop"].as_str().unwrap_or("?"),
                    f(h, "p50_ms", 2),
                    f(h, "p99_ms", 2),
                    f(h, "count", 0)
                );
            }
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

// ------------------------------------------------------------------ mirror report

/// The cross-region tables of `--report FILE --mirror`: remote delivery at a steady rate,
/// flat-out throughput and catch-up, one row per run, with the issue's goals checked.
fn mirror_report(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut paced = Vec::new();
    let mut flat = Vec::new();
    let mut catchups = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), k + 1))?;
        match (v["mode"].as_str(), v["flat_out"].as_bool()) {
            (Some("catchup"), _) => catchups.push(v),
            (Some("load"), Some(true)) => flat.push(v),
            (Some("load"), _) => paced.push(v),
            _ => {}
        }
    }
    if paced.is_empty() && flat.is_empty() && catchups.is_empty() {
        bail!("{}: no load or catch-up runs", path.display());
    }
    let f = |v: &Value, key: &str, prec: usize| -> String {
        v[key]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
    };
    let ok = |v: &Value| {
        if v["ok"].as_bool() == Some(true) {
            "yes"
        } else {
            "**no**"
        }
    };
    let verdict = |pass: Option<bool>| match pass {
        Some(true) => "✅",
        Some(false) => "❌",
        None => "?",
    };
    let delay = |v: &Value| v["delay_ms"].as_f64();
    let mut goals: Vec<String> = Vec::new();

    if !paced.is_empty() {
        println!("### Remote delivery at a steady rate");
        println!();
        println!(
            "| one-way delay ms | target msg/s | achieved msg/s | mirror rec/s | mirror MB/s | delivered MB/s | remote p50 ms | p99 ms | p99.9 ms | max ms | delivered / expected | order viol. | dupes | p99 ≤ delay + 25 ms | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|");
        for v in &paced {
            let pass = match (delay(v), v["delivery_p99_ms"].as_f64()) {
                (Some(d), Some(p)) => Some(p <= d + 25.0),
                _ => None,
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} ({} %) | {} | {} | {} | {} |",
                f(v, "delay_ms", 0),
                f(v, "target_rate", 0),
                f(v, "achieved_msgs_per_s", 0),
                f(v, "mirror_records_per_s", 0),
                f(v, "mirror_mb_per_s", 3),
                f(v, "delivered_mb_per_s", 3),
                f(v, "delivery_p50_ms", 1),
                f(v, "delivery_p99_ms", 1),
                f(v, "delivery_p999_ms", 1),
                f(v, "delivery_max_ms", 0),
                v["delivered"],
                v["expected"],
                v["delivered_ratio"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.3}", x * 100.0)),
                v["order_violations"],
                v["duplicates"],
                verdict(pass),
                ok(v),
            );
            goals.push(format!(
                "- p99 ≤ delay + 25 ms at {} msg/s, delay {} ms: p99 {} ms {}",
                f(v, "target_rate", 0),
                f(v, "delay_ms", 0),
                f(v, "delivery_p99_ms", 1),
                verdict(pass)
            ));
        }
        println!();
    }

    // Mirror throughput of a run: the receiving /status, else distinct deliveries.
    let mirror_rate = |v: &Value| -> Option<f64> {
        v["mirror_records_per_s"].as_f64().or_else(|| {
            let subs = v["subscribers"].as_f64()?;
            let rooms = v["rooms"].as_f64()?;
            (subs > 0.0).then(|| v["deliveries_per_s"].as_f64().map(|d| d * rooms / subs))?
        })
    };
    let ratio_line =
        |runs: &[Value], what: &str, rate: &dyn Fn(&Value) -> Option<f64>| -> Vec<String> {
            let Some(zero) = runs.iter().find(|v| delay(v) == Some(0.0)).and_then(rate) else {
                return Vec::new();
            };
            runs.iter()
                .filter(|v| delay(v).is_some_and(|d| d > 0.0))
                .filter_map(|v| {
                    let r = rate(v)? / zero;
                    let d = delay(v)?;
                    let pass = (d >= 270.0).then_some(r >= 0.8);
                    Some(format!(
                        "- {what}, {d:.0} ms / 0 ms: {r:.2}×{}",
                        match pass {
                            Some(p) => format!(" (goal ≥ 0.8× at 270 ms) {}", verdict(Some(p))),
                            None => String::new(),
                        }
                    ))
                })
                .collect()
        };
    if !flat.is_empty() {
        println!("### Max throughput (publishers flat out)");
        println!();
        println!(
            "| one-way delay ms | in flight / publisher | ingest msg/s (acked at origin) | mirror rec/s | mirror MB/s | mirror behind at window end | mirror all in after last publish s | deliveries/s | remote p50 ms | p99 ms | drain s | bound by | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for v in &flat {
            let ingest = v["achieved_msgs_per_s"].as_f64();
            let bound = match (v["mirror_behind_end"].as_f64(), ingest) {
                // More than half a second of ingest left over at the end: the mirror fell behind.
                (Some(b), Some(i)) if b > (0.5 * i).max(1000.0) => "mirror (fell behind)",
                (Some(_), Some(_)) => "ingest (mirror kept up)",
                _ => "?",
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {bound} | {} |",
                f(v, "delay_ms", 0),
                v["inflight"],
                f(v, "achieved_msgs_per_s", 0),
                mirror_rate(v).map_or_else(|| "-".to_owned(), |x| format!("{x:.0}")),
                f(v, "mirror_mb_per_s", 3),
                f(v, "mirror_behind_end", 0),
                f(v, "mirror_all_in_s", 2),
                f(v, "deliveries_per_s", 0),
                f(v, "delivery_p50_ms", 1),
                f(v, "delivery_p99_ms", 1),
                f(v, "drain_s", 1),
                ok(v),
            );
        }
        println!();
        goals.extend(ratio_line(
            &flat,
            "mirror rec/s, publishers flat out",
            &mirror_rate,
        ));
    }
    if !catchups.is_empty() {
        println!("### Catch-up after a cut (ingest goes on at R)");
        println!();
        println!(
            "| one-way delay ms | R msg/s | cut s | backlog msgs | pre-cut p99 ms | first delivery s | backlog delivered s | catch-up msg/s (× R) | live again s | net msg/s (× R) | mirror: behind at heal / link back s / all in s | mirror rec/s from heal (× R) | mirror rec/s once back | mirror behind at end | catch-up ≥ 5× R | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|---|---|");
        for v in &catchups {
            let pass = v["backlog_x"].as_f64().map(|x| x >= 5.0);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}×) | {} | {} ({}×) | {} / {} / {} | {} ({}×) | {} | {} | {} | {} |",
                f(v, "delay_ms", 0),
                f(v, "target_rate", 0),
                f(v, "cut_s", 1),
                v["backlog"],
                f(v, "precut_p99_ms", 1),
                f(v, "first_delivery_s", 2),
                f(v, "backlog_delivered_s", 2),
                f(v, "backlog_msgs_per_s", 0),
                f(v, "backlog_x", 2),
                f(v, "live_s", 2),
                f(v, "catchup_msgs_per_s", 0),
                f(v, "catchup_x", 2),
                f(v, "mirror_backlog", 0),
                f(v, "mirror_resumed_s", 2),
                f(v, "mirror_backlog_s", 2),
                f(v, "mirror_catchup_records_per_s", 0),
                f(v, "mirror_catchup_x", 2),
                f(v, "mirror_transfer_records_per_s", 0),
                f(v, "mirror_behind_done", 0),
                verdict(pass),
                ok(v),
            );
            goals.push(format!(
                "- catch-up ≥ 5× ingest, delay {} ms: backlog delivered at {}× R {} \
                 (net of the ingest until live again: {}×; the mirror alone: {}×)",
                f(v, "delay_ms", 0),
                f(v, "backlog_x", 2),
                verdict(pass),
                f(v, "catchup_x", 2),
                f(v, "mirror_catchup_x", 2),
            ));
        }
        println!();
        goals.extend(ratio_line(
            &catchups,
            "mirror rec/s working off a backlog once the link is back (catch-up)",
            &|v: &Value| v["mirror_transfer_records_per_s"].as_f64(),
        ));
    }
    if !goals.is_empty() {
        println!("### Goals");
        println!();
        for g in &goals {
            println!("{g}");
        }
    }
    Ok(())
}
