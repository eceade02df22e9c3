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
//!
//! # Where the code is
//!
//! `main.rs` (this file): the arguments and which run they ask for. A load run is
//! `load.rs` (connect, publish, drain) over `clients.rs` (connections, bodies, publishers)
//! and `track.rs` (the readers and what they count); `results.rs` turns it into the table,
//! the verdict and the JSON line. `mirror.rs` samples the receiving region and drives the
//! catch-up phase of cross-region runs; `hops.rs` reads the daemon's per-hop histograms;
//! `sysstat.rs` reads CPU and memory from `/proc`. `idle.rs` is the memory run and
//! `report.rs` the markdown reports.

// The result record is one large `json!` literal.
#![recursion_limit = "256"]

mod clients;
mod hops;
mod idle;
mod load;
mod mirror;
mod report;
mod results;
mod sysstat;
mod track;

use clients::*;
use idle::*;
use load::*;
use mirror::*;
use report::*;
use results::*;
use sysstat::*;
use track::*;

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
