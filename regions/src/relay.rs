//! A userspace WAN emulator for UDP: [`WanRelay`] sits between two QUIC endpoints and adds
//! delay, jitter, loss, reordering and duplication, and can cut the link. The machines
//! the project runs on have no `tc netem`, so tests and ops drills (`dtfed-wan-relay`) use
//! this instead.
//!
//! ```text
//!  client A ─┐                 ┌─ socket for A ─┐
//!  client B ─┼─▶ relay socket ─┼─ socket for B ─┼─▶ upstream
//!            └◀──── replies ◀──┴────────────────┘
//! ```
//!
//! The relay listens on one UDP socket. Each client address gets its own socket towards
//! `upstream` (so the upstream sees distinct clients, and replies find their way back).
//! Every direction of every client is a *pipe*: one task that keeps packets in a timer
//! heap keyed by due time and sends each when due. Delay therefore never serialises
//! packets (a thousand packets in flight are a thousand heap entries, not a thousand
//! sleeps in a row).
//!
//! Semantics of [`WanProfile`], applied independently in each direction:
//!
//! - `loss`: probability a packet is dropped.
//! - `delay` ± uniform `jitter`: one-way delay. Within a direction packets stay in order
//!   (a packet is never due before the one sent before it), so jitter alone does not
//!   reorder, as on a real path.
//! - `reorder`: probability a packet is held back an extra
//!   `max(delay / 2, 2 × jitter, 1 ms)` without holding back the packets behind it, so
//!   those sent within that time overtake it.
//! - `duplicate`: probability a packet is sent twice.
//! - `limit`: packets queued per direction and client; more are dropped (like a full
//!   router queue).
//!
//! [`WanRelay::cut`] drops everything both ways, including packets already in flight, until
//! [`WanRelay::heal`]. Dropping the relay stops it (a [`CancellationToken`] stops every
//! task, which live in [`JoinSet`]s).

use std::cmp::{max, Ordering as CmpOrdering, Reverse};
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::future::pending;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Clients the relay tracks at once; datagrams from more are dropped.
const MAX_CLIENTS: usize = 1024;
/// A client silent both ways this long is forgotten (its socket towards upstream closes).
const CLIENT_IDLE: Duration = Duration::from_secs(120);
/// Packets waiting between a socket reader and its pipe task.
const HANDOFF_CAPACITY: usize = 4096;

/// Socket buffers asked for (the kernel caps them at `net.core.rmem_max`/`wmem_max`): the
/// relay reads one datagram per call, so under CPU contention the default 208 KiB
/// overflowed and the relay itself dropped packets that no profile asked it to drop.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn size_buffers(socket: &UdpSocket) {
    if let Err(e) = crate::tls::set_udp_buffers(socket, SOCKET_BUFFER_BYTES) {
        warn!(error = %e, "relay: cannot size a socket's buffers");
    }
}

/// Network conditions, applied in each direction. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanProfile {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform ± jitter around `delay`.
    pub jitter: Duration,
    /// Probability (0..=1) a packet is dropped.
    pub loss: f64,
    /// Probability (0..=1) a packet is held back so that the next ones overtake it.
    pub reorder: f64,
    /// Probability (0..=1) a packet is sent twice.
    pub duplicate: f64,
    /// Packets queued per direction and client before new ones are dropped.
    pub limit: usize,
}

impl Default for WanProfile {
    /// A perfect link: no delay, no loss, queue of 10 000 packets.
    fn default() -> Self {
        WanProfile {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
            limit: 10_000,
        }
    }
}

impl WanProfile {
    /// A perfect link with a one-way `delay`.
    pub fn with_delay(delay: Duration) -> WanProfile {
        WanProfile {
            delay,
            ..WanProfile::default()
        }
    }

    /// Checks probabilities are within 0..=1 and the queue limit is not zero.
    pub fn validate(&self) -> Result<(), RelayError> {
        for (name, p) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("duplicate", self.duplicate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(RelayError::Profile(format!(
                    "{name} must be within 0..=1, not {p}"
                )));
            }
        }
        if self.limit == 0 {
            return Err(RelayError::Profile("limit must be at least 1".into()));
        }
        Ok(())
    }

    fn reorder_extra(&self) -> Duration {
        max(
            max(self.delay / 2, self.jitter * 2),
            Duration::from_millis(1),
        )
    }
}

/// Errors starting or configuring a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid WAN profile: {0}")]
    Profile(String),
}

/// Packet counters of a relay, both directions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Packets sent on (duplicates included).
    pub forwarded: u64,
    /// Packets dropped for any reason (sum of the `dropped_*` below).
    pub dropped: u64,
    /// Dropped by `loss`.
    pub dropped_loss: u64,
    /// Dropped while the link was cut.
    pub dropped_cut: u64,
    /// Dropped because a queue was full (or too many clients).
    pub dropped_overflow: u64,
    /// Dropped because sending failed.
    pub dropped_error: u64,
    /// Extra copies made by `duplicate`.
    pub duplicated: u64,
    /// Clients currently tracked.
    pub clients: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_overflow: AtomicU64,
    dropped_error: AtomicU64,
    duplicated: AtomicU64,
    clients: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// State shared by the relay handle and its tasks.
struct Shared {
    profile: RwLock<WanProfile>,
    cut: AtomicBool,
    counters: Counters,
    epoch: Instant,
}

impl Shared {
    fn profile(&self) -> WanProfile {
        *self.profile.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A running UDP relay with WAN conditions. Stops when dropped.
pub struct WanRelay {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    upstream: SocketAddr,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for WanRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanRelay")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.upstream)
            .field("profile", &self.shared.profile())
            .field("cut", &self.shared.is_cut())
            .finish()
    }
}

impl Drop for WanRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl WanRelay {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and relays to `upstream` under `profile`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: WanProfile,
    ) -> Result<WanRelay, RelayError> {
        profile.validate()?;
        let front = UdpSocket::bind(listen)
            .await
            .map_err(|source| RelayError::Bind {
                addr: listen,
                source,
            })?;
        size_buffers(&front);
        let local_addr = front.local_addr().map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            profile: RwLock::new(profile),
            cut: AtomicBool::new(false),
            counters: Counters::default(),
            epoch: Instant::now(),
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let front = Front {
            socket: Arc::new(front),
            upstream,
            shared: shared.clone(),
            cancel: cancel.clone(),
        };
        tasks.spawn(front.run());
        info!(listen = %local_addr, upstream = %upstream, ?profile, "WAN relay up");
        Ok(WanRelay {
            shared,
            local_addr,
            upstream,
            cancel,
            tasks,
        })
    }

    /// Where clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the relay forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The profile in force.
    pub fn profile(&self) -> WanProfile {
        self.shared.profile()
    }

    /// Changes the network conditions; applies to packets arriving from now on.
    pub fn set_profile(&self, profile: WanProfile) -> Result<(), RelayError> {
        profile.validate()?;
        *self
            .shared
            .profile
            .write()
            .unwrap_or_else(PoisonError::into_inner) = profile;
        info!(relay = %self.local_addr, ?profile, "WAN profile changed");
        Ok(())
    }

    /// Cuts the link: every packet, both ways and in flight, is dropped until
    /// [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::Relaxed);
        info!(relay = %self.local_addr, "link cut");
    }

    /// Ends a [`cut`](Self::cut).
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::Relaxed);
        info!(relay = %self.local_addr, "link healed");
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.is_cut()
    }

    /// Packets forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.stats().forwarded
    }

    /// Packets dropped so far, for any reason.
    pub fn dropped(&self) -> u64 {
        self.stats().dropped
    }

    /// All counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (loss, cut, overflow, error) = (
            get(&c.dropped_loss),
            get(&c.dropped_cut),
            get(&c.dropped_overflow),
            get(&c.dropped_error),
        );
        RelayStats {
            forwarded: get(&c.forwarded),
            dropped: loss + cut + overflow + error,
            dropped_loss: loss,
            dropped_cut: cut,
            dropped_overflow: overflow,
            dropped_error: error,
            duplicated: get(&c.duplicated),
            clients: get(&c.clients),
        }
    }

    /// Stops the relay and waits for its tasks to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// A datagram and when it reached the relay.
type Handoff = (Instant, Bytes);

/// The listening socket: demultiplexes clients and feeds their upstream pipes.
struct Front {
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

/// A tracked client.
struct Client {
    to_upstream: mpsc::Sender<Handoff>,
    last_active: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Front {
    async fn run(self) {
        let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut sweep = tokio::time::interval(CLIENT_IDLE / 4);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = sweep.tick() => self.forget_idle(&mut clients),
                received = self.socket.recv_from(&mut buf) => {
                    let (len, from) = match received {
                        Ok(r) => r,
                        Err(e) => {
                            debug!(error = %e, "relay receive failed");
                            continue;
                        }
                    };
                    let at = Instant::now();
                    let data = Bytes::copy_from_slice(&buf[..len]);
                    let client = match clients.entry(from) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            if self.shared.counters.clients.load(Ordering::Relaxed) >= MAX_CLIENTS as u64 {
                                bump(&self.shared.counters.dropped_overflow);
                                continue;
                            }
                            match self.open_client(from, &mut tasks).await {
                                Ok(client) => e.insert(client),
                                Err(err) => {
                                    warn!(peer = %from, error = %err, "relay cannot open an upstream socket");
                                    bump(&self.shared.counters.dropped_error);
                                    continue;
                                }
                            }
                        }
                    };
                    client.last_active.store(self.shared.now_ms(), Ordering::Relaxed);
                    if client.to_upstream.try_send((at, data)).is_err() {
                        bump(&self.shared.counters.dropped_overflow);
                    }
                }
            }
        }
        for client in clients.values() {
            client.cancel.cancel();
        }
    }

    /// Opens the socket towards upstream for `client` and starts its two pipes and the
    /// reader of replies.
    async fn open_client(
        &self,
        client: SocketAddr,
        tasks: &mut JoinSet<()>,
    ) -> std::io::Result<Client> {
        let any: IpAddr = if self.upstream.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind((any, 0)).await?;
        size_buffers(&socket);
        socket.connect(self.upstream).await?;
        let socket = Arc::new(socket);
        let cancel = self.cancel.child_token();
        let last_active = Arc::new(AtomicU64::new(self.shared.now_ms()));

        let (up_tx, up_rx) = mpsc::channel(HANDOFF_CAPACITY);
        let (down_tx, down_rx) = mpsc::channel(HANDOFF_CAPACITY);
        let up = Pipe::new(up_rx, Out::Upstream(socket.clone()), self.shared.clone());
        let down = Pipe::new(
            down_rx,
            Out::Client(self.socket.clone(), client),
            self.shared.clone(),
        );
        tasks.spawn(up.run(cancel.clone()));
        tasks.spawn(down.run(cancel.clone()));
        tasks.spawn(read_replies(
            socket,
            down_tx,
            last_active.clone(),
            self.shared.clone(),
            cancel.clone(),
        ));
        self.shared.counters.clients.fetch_add(1, Ordering::Relaxed);
        debug!(peer = %client, upstream = %self.upstream, "relay client added");
        Ok(Client {
            to_upstream: up_tx,
            last_active,
            cancel,
        })
    }

    fn forget_idle(&self, clients: &mut HashMap<SocketAddr, Client>) {
        let now = self.shared.now_ms();
        let idle_ms = u64::try_from(CLIENT_IDLE.as_millis()).unwrap_or(u64::MAX);
        clients.retain(|addr, client| {
            let last = client.last_active.load(Ordering::Relaxed);
            let keep = now.saturating_sub(last) < idle_ms;
            if !keep {
                debug!(peer = %addr, "relay client idle, forgotten");
                client.cancel.cancel();
                self.shared.counters.clients.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }
}

/// Reads upstream's replies to one client and feeds them to its downstream pipe.
async fn read_replies(
    socket: Arc<UdpSocket>,
    to_client: mpsc::Sender<Handoff>,
    last_active: Arc<AtomicU64>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            received = socket.recv(&mut buf) => match received {
                Ok(len) => {
                    last_active.store(shared.now_ms(), Ordering::Relaxed);
                    let data = Bytes::copy_from_slice(&buf[..len]);
                    if to_client.try_send((Instant::now(), data)).is_err() {
                        bump(&shared.counters.dropped_overflow);
                    }
                }
                // e.g. ECONNREFUSED after an ICMP port unreachable: upstream not up (yet).
                Err(e) => debug!(error = %e, "relay upstream receive failed"),
            }
        }
    }
}

/// Where a pipe sends.
enum Out {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Upstream(socket) => socket.send(data).await,
            Out::Client(socket, addr) => socket.send_to(data, *addr).await,
        }
    }
}

/// A packet waiting in a pipe.
struct Scheduled {
    due: Instant,
    seq: u64,
    data: Bytes,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// By due time, then arrival: equal due times keep FIFO order.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// One direction of one client: applies the profile and sends packets when due.
struct Pipe {
    rx: mpsc::Receiver<Handoff>,
    out: Out,
    shared: Arc<Shared>,
    rng: SmallRng,
    heap: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    /// Due time of the last in-order packet: the next one is not due before it.
    fifo_tail: Option<Instant>,
}

impl Pipe {
    fn new(rx: mpsc::Receiver<Handoff>, out: Out, shared: Arc<Shared>) -> Pipe {
        Pipe {
            rx,
            out,
            shared,
            rng: SmallRng::from_rng(&mut rand::rng()),
            heap: BinaryHeap::new(),
            seq: 0,
            fifo_tail: None,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        loop {
            let next_due = self.heap.peek().map(|Reverse(p)| p.due);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = async {
                    match next_due {
                        Some(due) => sleep_until(due).await,
                        None => pending().await,
                    }
                } => self.send_due().await,
                handoff = self.rx.recv() => match handoff {
                    Some((at, data)) => self.schedule(at, data),
                    None => return,
                },
            }
        }
    }

    fn schedule(&mut self, at: Instant, data: Bytes) {
        let counters = &self.shared.counters;
        if self.shared.is_cut() {
            bump(&counters.dropped_cut);
            return;
        }
        let p = self.shared.profile();
        if p.loss > 0.0 && self.rng.random_bool(p.loss) {
            bump(&counters.dropped_loss);
            return;
        }
        if self.heap.len() >= p.limit {
            bump(&counters.dropped_overflow);
            return;
        }
        let mut due = at + p.delay;
        if !p.jitter.is_zero() {
            let j = i64::try_from(p.jitter.as_micros()).unwrap_or(i64::MAX);
            let offset = self.rng.random_range(-j..=j);
            let offset_abs = Duration::from_micros(offset.unsigned_abs());
            due = if offset >= 0 {
                due + offset_abs
            } else {
                due.checked_sub(offset_abs).map_or(at, |d| max(d, at))
            };
        }
        if p.reorder > 0.0 && self.rng.random_bool(p.reorder) {
            // Held back without moving the FIFO tail: later packets may pass it.
            due = max(due, self.fifo_tail.unwrap_or(due)) + p.reorder_extra();
        } else {
            due = max(due, self.fifo_tail.unwrap_or(due));
            self.fifo_tail = Some(due);
        }
        let copies = if p.duplicate > 0.0 && self.rng.random_bool(p.duplicate) {
            bump(&counters.duplicated);
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.seq += 1;
            self.heap.push(Reverse(Scheduled {
                due,
                seq: self.seq,
                data: data.clone(),
            }));
        }
    }

    async fn send_due(&mut self) {
        let now = Instant::now();
        while self.heap.peek().is_some_and(|Reverse(p)| p.due <= now) {
            let Some(Reverse(packet)) = self.heap.pop() else {
                break;
            };
            let counters = &self.shared.counters;
            if self.shared.is_cut() {
                bump(&counters.dropped_cut);
                continue;
            }
            match self.out.send(&packet.data).await {
                Ok(_) => bump(&counters.forwarded),
                Err(e) => {
                    debug!(error = %e, "relay send failed");
                    bump(&counters.dropped_error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    async fn recv_all(socket: &UdpSocket, n: usize, within: Duration) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let deadline = Instant::now() + within;
        while got.len() < n {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Ok(Ok(len)) => got.push(buf[..len].to_vec()),
                _ => break,
            }
        }
        got
    }

    #[test]
    fn profiles_are_validated() {
        assert!(WanProfile::default().validate().is_ok());
        for bad in [
            WanProfile {
                loss: 1.5,
                ..WanProfile::default()
            },
            WanProfile {
                reorder: -0.1,
                ..WanProfile::default()
            },
            WanProfile {
                duplicate: f64::NAN,
                ..WanProfile::default()
            },
            WanProfile {
                limit: 0,
                ..WanProfile::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn jitter_without_reorder_keeps_order_and_delay_does_not_serialize() {
        let (upstream, _echo) = echo_server().await;
        let profile = WanProfile {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(15),
            ..WanProfile::default()
        };
        let relay = WanRelay::start("127.0.0.1:0".parse().expect("addr"), upstream, profile)
            .await
            .expect("relay");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(relay.local_addr()).await.expect("connect");
        let started = Instant::now();
        for i in 0u32..200 {
            client.send(&i.to_be_bytes()).await.expect("send");
        }
        let got = recv_all(&client, 200, Duration::from_secs(5)).await;
        let elapsed = started.elapsed();
        let order: Vec<u32> = got
            .iter()
            .map(|b| u32::from_be_bytes(b[..4].try_into().expect("4 bytes")))
            .collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
        // 200 packets × 2 directions × ~20 ms would take 8 s if delays were serialised.
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
        // The counter moves just after the send: give the last one a moment.
        let deadline = Instant::now() + Duration::from_secs(1);
        while relay.forwarded() < 400 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.forwarded(), 400);
        assert_eq!(relay.dropped(), 0);
    }

    #[tokio::test]
    async fn reorder_duplicate_and_limit() {
        let (upstream, _echo) = echo_server().await;
        let profile = WanProfile {
            delay: Duration::from_millis(10),
            reorder: 0.3,
            ..WanProfile::default()
        };
        let relay = WanRelay::start("127.0.0.1:0".parse().expect("addr"), upstream, profile)
            .await
            .expect("relay");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(relay.local_addr()).await.expect("connect");
        for i in 0u32..200 {
            client.send(&i.to_be_bytes()).await.expect("send");
        }
        let got = recv_all(&client, 200, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 200);
        let order: Vec<u32> = got
            .iter()
            .map(|b| u32::from_be_bytes(b[..4].try_into().expect("4 bytes")))
            .collect();
        assert!(order.windows(2).any(|w| w[0] > w[1]), "no reordering seen");

        relay
            .set_profile(WanProfile {
                duplicate: 1.0,
                ..WanProfile::default()
            })
            .expect("profile");
        client.send(b"twice").await.expect("send");
        // Duplicated on the way up (2 reach the echo) and each echo on the way down: 4.
        let got = recv_all(&client, 4, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 4);

        relay
            .set_profile(WanProfile {
                delay: Duration::from_millis(200),
                limit: 10,
                ..WanProfile::default()
            })
            .expect("profile");
        let before = relay.stats().dropped_overflow;
        for _ in 0..50 {
            client.send(b"flood").await.expect("send");
        }
        let got = recv_all(&client, 50, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 10);
        assert_eq!(relay.stats().dropped_overflow - before, 40);
    }
}
