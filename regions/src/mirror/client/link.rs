//! The shared link to one peer region ([`PeerLink`]): one QUIC connection per peer,
//! dialled lazily with overlapping attempts (see the client's module docs), and the
//! origin's partition count asked once per link ([`describe_origin`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dtfed_proto::link::{DescribeAnswer, MirrorDescribe};
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

use crate::endpoint::{PeerConnection, RegionEndpoint};
use crate::mirror::client::ask::ask_on_stream;
use crate::mirror::client::{lock, MAX_DIALS_IN_FLIGHT};
use crate::mirror::Backoff;

/// The shared link to one peer region.
pub(super) struct PeerLink {
    pub(super) region: String,
    pub(super) addrs: Vec<String>,
    /// Held while dialling, so only one task dials and the others wait for its result.
    pub(super) dial: tokio::sync::Mutex<Redial>,
    pub(super) current: Mutex<Option<PeerConnection>>,
    pub(super) info: Mutex<LinkInfo>,
    pub(super) paused: watch::Sender<bool>,
    /// The origin's partition count as it told it on a link: (that link's id, answer;
    /// `None` from an origin too old to tell).
    pub(super) described: tokio::sync::Mutex<Option<(usize, Option<i32>)>>,
    /// The partition count of the mirror topic here ([`PeerRegion::partitions`]), grown to
    /// the origin's when the origin has more ([`MirrorLog::grow_partitions`]); the
    /// origin's must end up the same. [`UNCHECKED`]: not checked.
    pub(super) expected_partitions: AtomicI32,
    /// Other origins may be pulled through this peer ([`PeerRegion::relay`]).
    pub(super) relay: bool,
    /// This peer's own partitions are pulled from it directly ([`PeerRegion::direct`]).
    pub(super) direct: bool,
    /// What the connection last received, to tell a silent path (a cut) long before QUIC's
    /// idle timeout closes it.
    pub(super) heard: Mutex<Option<Heard>>,
}

/// The connection's received-datagram count when it last changed.
pub(super) struct Heard {
    conn: usize,
    datagrams: u64,
    at: Instant,
}

/// [`PeerLink::expected_partitions`] of a peer whose partition count is not checked.
pub(super) const UNCHECKED: i32 = -1;

pub(super) struct Redial {
    /// Spacing of attempts: `redial_max / 2` (at least `backoff_min`) doubling to
    /// `redial_max`, reset on success.
    pub(super) backoff: Backoff,
    /// No new attempt before this.
    pub(super) retry_at: Option<Instant>,
    /// Attempts in progress. They are tasks, so they keep going between two calls of
    /// [`PeerLink::connection`] (a failed attempt returns, the others go on).
    pub(super) attempts: JoinSet<Result<PeerConnection, String>>,
    /// The attempts in progress, oldest first.
    pub(super) started: VecDeque<AbortHandle>,
    /// Addresses still to try in this round (a fresh random order each round, so the
    /// region's daemons spread over the peer's addresses).
    pub(super) addr_order: Vec<String>,
    /// When the current run of attempts started (`None` while a link is up).
    pub(super) dialling_since: Option<Instant>,
    /// When "still unreachable" was last logged at warn.
    pub(super) warned_at: Option<Instant>,
}

#[derive(Default)]
pub(super) struct LinkInfo {
    pub(super) connects: u64,
    pub(super) last_error: Option<String>,
}

impl PeerLink {
    /// The mirror topic's partition count the origin's must match (`None`: not checked).
    pub(super) fn expected_partitions(&self) -> Option<i32> {
        let n = self.expected_partitions.load(Ordering::Relaxed);
        (n != UNCHECKED).then_some(n)
    }

    /// The current connection, if it is up.
    pub(super) fn live(&self) -> Option<PeerConnection> {
        lock(&self.current)
            .as_ref()
            .filter(|c| c.connection().close_reason().is_none())
            .cloned()
    }

    /// How long the live connection has received nothing at all (sampled now: callers
    /// sample every few hundred ms while it matters); `None` without a live connection.
    /// QUIC keep-alives (every 2 s, answered by acknowledgements) keep a healthy idle link
    /// from ever looking silent for longer than that.
    pub(super) fn silent_for(&self) -> Option<Duration> {
        let conn = self.live()?;
        let id = conn.connection().stable_id();
        let datagrams = conn.connection().stats().udp_rx.datagrams;
        let now = Instant::now();
        let mut heard = lock(&self.heard);
        match &*heard {
            Some(h) if h.conn == id && h.datagrams == datagrams => {}
            _ => {
                *heard = Some(Heard {
                    conn: id,
                    datagrams,
                    at: now,
                })
            }
        }
        heard.as_ref().map(|h| now.saturating_duration_since(h.at))
    }

    /// The live connection if it was heard from within `limit`.
    pub(super) fn usable(&self, limit: Duration) -> Option<PeerConnection> {
        let conn = self.live()?;
        (self.silent_for()? < limit).then_some(conn)
    }

    /// The connection, dialling if there is none. Returns when an attempt succeeds, or with
    /// the error of the first attempt that fails; attempts still in progress go on and the
    /// next call picks them up (see the module docs on overlapping dials).
    pub(super) async fn connection(
        &self,
        endpoint: &RegionEndpoint,
    ) -> Result<PeerConnection, String> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let mut guard = self.dial.lock().await;
        let redial = &mut *guard;
        // Someone else may have dialled while we waited for the lock.
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let dropped = lock(&self.current).take();
        if let Some(dead) = dropped {
            let reason = dead
                .connection()
                .close_reason()
                .map(|e| e.to_string())
                .unwrap_or_default();
            info!(peer = %self.region, reason = %reason, "mirror link lost; redialling");
            // The first attempt goes out at once: a lost link is usually a cut or a peer
            // restart, and the backoff spaces the attempts that follow.
            redial.backoff.reset();
            redial.retry_at = None;
        }
        loop {
            let next_at = redial.retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                Some(done) = redial.attempts.join_next_with_id(), if !redial.attempts.is_empty() => {
                    let (id, result) = match done {
                        Ok((id, result)) => (id, result),
                        // Aborted (superseded): already forgotten.
                        Err(e) if e.is_cancelled() => continue,
                        Err(e) => (e.id(), Err(format!("dial task failed: {e}"))),
                    };
                    redial.started.retain(|h| h.id() != id);
                    match result {
                        // Finished while nobody was waiting, and closed since.
                        Ok(conn) if conn.connection().close_reason().is_some() => continue,
                        Ok(conn) => {
                            // The other attempts are stale: drop them, results included (a
                            // half-open QUIC connection is closed when its handle goes).
                            redial.attempts = JoinSet::new();
                            redial.started.clear();
                            redial.backoff.reset();
                            redial.retry_at = None;
                            let dialled_for = redial.dialling_since.take().map(|t| t.elapsed());
                            redial.warned_at = None;
                            info!(
                                peer = %self.region,
                                ?dialled_for,
                                addr = %conn.remote_address(),
                                rtt_ms = u64::try_from(conn.rtt().as_millis()).unwrap_or(u64::MAX),
                                "mirror link up"
                            );
                            *lock(&self.current) = Some(conn.clone());
                            let mut info = lock(&self.info);
                            info.connects += 1;
                            info.last_error = None;
                            return Ok(conn);
                        }
                        Err(e) => {
                            self.note_failure(redial, &e);
                            return Err(e);
                        }
                    }
                }
                () = sleep_until(next_at) => {
                    let since = *redial.dialling_since.get_or_insert_with(Instant::now);
                    if redial.started.len() >= MAX_DIALS_IN_FLIGHT {
                        if let Some(oldest) = redial.started.pop_front() {
                            // Its Initial retransmissions have backed off the furthest.
                            oldest.abort();
                            let e = format!(
                                "no handshake completed in {:.1} s of dialling (path cut or peer down)",
                                since.elapsed().as_secs_f64()
                            );
                            self.note_failure(redial, &e);
                        }
                    }
                    let addr = self.pick_addr(redial);
                    let endpoint = endpoint.clone();
                    let region = self.region.clone();
                    let handle = redial
                        .attempts
                        .spawn(async move { dial_addr(&endpoint, &region, &addr).await });
                    redial.started.push_back(handle);
                    let delay = redial.backoff.next_delay();
                    debug!(
                        peer = %self.region,
                        in_progress = redial.started.len(),
                        next_attempt_in = ?delay,
                        "dialling peer region"
                    );
                    redial.retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }

    /// Records why the peer is unreachable (link status), logging at warn at most every
    /// 10 s while it stays so (attempts go out every `redial_max`).
    pub(super) fn note_failure(&self, redial: &mut Redial, error: &str) {
        lock(&self.info).last_error = Some(error.to_owned());
        let quiet = redial
            .warned_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if !quiet {
            redial.warned_at = Some(Instant::now());
            warn!(peer = %self.region, error = %error, in_progress = redial.attempts.len(), "cannot reach peer region");
        } else {
            debug!(peer = %self.region, error = %error, in_progress = redial.attempts.len(), "cannot reach peer region");
        }
    }

    /// The origin's partition count, asked once per link (see [`describe_origin`]).
    pub(super) async fn origin_partitions(
        &self,
        conn: &PeerConnection,
        local_region: &str,
        topic: &str,
        limit: Duration,
        fresh: bool,
    ) -> Result<Option<i32>, String> {
        let id = conn.connection().stable_id();
        let mut described = self.described.lock().await;
        if let Some((link, answer)) = *described {
            if link == id && !fresh {
                return Ok(answer);
            }
        }
        let answer = describe_origin(conn, local_region, &self.region, topic, limit).await?;
        match answer {
            Some(n) => {
                info!(peer = %self.region, topic, partitions = n, "origin's partition count")
            }
            None if !fresh => warn!(
                peer = %self.region,
                topic,
                "the origin does not tell its partition count (an older dtfed): not checked"
            ),
            None => {}
        }
        *described = Some((id, answer));
        Ok(answer)
    }

    /// The next address to dial: the peer's addresses in a random order, round robin.
    pub(super) fn pick_addr(&self, redial: &mut Redial) -> String {
        if redial.addr_order.is_empty() {
            redial.addr_order = self.addrs.clone();
            redial.addr_order.shuffle(&mut rand::rng());
        }
        redial.addr_order.pop().unwrap_or_default()
    }
}

/// One dial attempt to `addr` (resolved now), bounded by the endpoint's handshake timeout.
pub(super) async fn dial_addr(
    endpoint: &RegionEndpoint,
    region: &str,
    addr: &str,
) -> Result<PeerConnection, String> {
    if addr.is_empty() {
        return Err(format!("region {region} has no addresses"));
    }
    let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(addr).await {
        Ok(found) => found.collect(),
        Err(e) => return Err(format!("cannot resolve {addr}: {e}")),
    };
    let mut last = format!("{addr} resolves to no address");
    for sa in resolved {
        match endpoint.connect(sa, region).await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = format!("{addr} ({sa}): {e}"),
        }
    }
    Err(last)
}

/// Asks the origin on `conn` how many partitions `topic` has, on a stream of its own
/// ([`MirrorDescribe`]), within `limit`. `Ok(None)`: the origin is too old to tell.
pub(super) async fn describe_origin(
    conn: &PeerConnection,
    local_region: &str,
    origin: &str,
    topic: &str,
    limit: Duration,
) -> Result<Option<i32>, String> {
    let ask = MirrorDescribe::new(local_region, origin, topic);
    let answer = timeout(limit, ask_on_stream(conn, ask))
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    match answer {
        DescribeAnswer::Partitions(n) => Ok(Some(n)),
        DescribeAnswer::NotSupported => Ok(None),
        DescribeAnswer::Refused { code, message } => {
            Err(format!("the origin refused: {code}: {message}"))
        }
    }
}
