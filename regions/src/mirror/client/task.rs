//! One (origin, partition) being mirrored ([`PartitionTask`]): route, link, tail, stream,
//! in a loop with backoff; appends and gaps. The route (direct, or through a relay peer) is
//! chosen before every stream ([`PartitionTask::route`]) and re-judged while it runs
//! ([`PartitionTask::route_change`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dtfed_proto::link::{LinkRecord, MirrorPull, PullConfig};
use dtfed_proto::record::now_ms;
use quinn::{RecvStream, SendStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::endpoint::PeerConnection;
use crate::mirror::client::pull::PullStream;
use crate::mirror::client::ROUTE_DIRECT;
use crate::mirror::client::{lock, ClientInner, PeerLink, READ_BUDGET, READ_CHUNK};
use crate::mirror::latency::AgeHistogram;
use crate::mirror::log::LogError;
use crate::mirror::stream::StreamDriver;
use crate::mirror::{mirror_topic, Backoff, MirrorTaskState, MirrorTaskStatus};

/// How often a running stream re-judges its route (silent links, the direct link back).
pub(super) const ROUTE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// How long a relay that refused a partition for good (not configured to relay, too old,
/// refusing the origin) is not asked again.
const RELAY_COOLDOWN: Duration = Duration::from_secs(30);

/// How one attempt (tail, link, stream) ended.
pub(super) enum Outcome {
    Shutdown,
    Paused,
    /// A gap was reported; resume at once from past it.
    Gap,
    /// No link to the peer: its own backoff paces the next dial.
    NoLink(String),
    /// The stream was ended to change route (the direct link went silent or came back, the
    /// relay went silent): pick a route again at once.
    Reroute(String),
    Failed {
        reason: String,
        /// Retrying soon may work (else: wait the longest backoff and alert).
        transient: bool,
        /// This attempt wrote records (resets the backoff).
        progressed: bool,
    },
}

/// Resolves once `rx` says paused.
pub(super) async fn until_paused(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|paused| *paused).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once `rx` says not paused.
pub(super) async fn until_resumed(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|paused| !*paused).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One (origin, partition) being mirrored.
pub(super) struct PartitionTask {
    pub(super) inner: Arc<ClientInner>,
    /// The origin's link.
    pub(super) peer: Arc<PeerLink>,
    /// Peers the origin's partitions may be pulled through (configured `relay`, not the
    /// origin), by name.
    pub(super) relays: Vec<Arc<PeerLink>>,
    /// Since when the direct link is known down or silent (cleared once a direct stream
    /// is accepted).
    pub(super) direct_down_since: Option<Instant>,
    /// Relays not to ask before the given time (they refused for good).
    pub(super) relay_cooldown: HashMap<String, Instant>,
    /// The route of the last stream the serving side accepted, for switch logs.
    pub(super) streamed_route: Option<String>,
    /// A background dial of the direct link while pulling through a relay.
    pub(super) direct_probe: Option<JoinHandle<()>>,
    pub(super) origin: String,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) key: (String, i32),
    /// Origin offset of the last record in the mirror partition: the tail as last read,
    /// then advanced by every append.
    pub(super) written: Option<i64>,
    /// The lowest offset worth asking for (one past the last gap).
    pub(super) floor: i64,
    pub(super) high_watermark: Option<i64>,
}

impl PartitionTask {
    pub(super) fn update(&self, f: impl FnOnce(&mut MirrorTaskStatus)) {
        if let Some(s) = lock(&self.inner.tasks).get_mut(&self.key) {
            f(s);
        }
    }

    pub(super) fn set_state(&self, state: MirrorTaskState) {
        self.update(|s| s.state = state);
    }

    /// The next origin offset the mirror partition needs.
    pub(super) fn next_needed(&self) -> i64 {
        self.written
            .map_or(0, |w| w.saturating_add(1))
            .max(self.floor)
    }

    pub(super) fn update_offsets(&self) {
        let written = self.written;
        let hw = self.high_watermark;
        let lag = hw.map(|hw| hw.saturating_sub(self.next_needed()).max(0));
        self.update(|s| {
            s.mirrored_offset = written;
            s.origin_high_watermark = hw;
            s.lag_records = lag;
        });
    }

    pub(super) async fn run(&mut self, shutdown: CancellationToken) {
        let config = &self.inner.config;
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        let mut paused = self.peer.paused.subscribe();
        info!(topic = %self.topic, "mirror task started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let is_paused = *paused.borrow_and_update();
            if is_paused {
                self.set_state(MirrorTaskState::Paused);
                info!("mirror task paused");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = until_resumed(&mut paused) => {}
                }
                info!("mirror task resumed");
                backoff.reset();
                continue;
            }
            self.set_state(MirrorTaskState::Connecting);
            match self.attempt(&shutdown, &mut paused).await {
                Outcome::Shutdown => break,
                Outcome::Paused => {}
                Outcome::Gap => backoff.reset(),
                Outcome::NoLink(reason) => {
                    self.set_state(MirrorTaskState::Backoff(reason));
                    // Without relays, the dials pace themselves. With them, this was no
                    // route at all (every relay cooling down, silent or unreachable; the
                    // direct link dials on in the background): pace the next look.
                    if !self.relays.is_empty() {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = sleep(ROUTE_CHECK_EVERY) => {}
                            () = until_paused(&mut paused) => {}
                        }
                    }
                }
                Outcome::Reroute(reason) => {
                    info!(reason = %reason, "mirror stream ended to change route");
                    backoff.reset();
                }
                Outcome::Failed {
                    reason,
                    transient,
                    progressed,
                } => {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    if progressed {
                        backoff.reset();
                    }
                    let delay = if transient {
                        let delay = backoff.next_delay();
                        warn!(reason = %reason, retry_in = ?delay, "mirror stream ended; will resume from the tail");
                        delay
                    } else {
                        let delay = backoff.max_delay();
                        error!(reason = %reason, retry_in = ?delay, "origin refused mirroring; needs an operator");
                        delay
                    };
                    self.set_state(MirrorTaskState::Backoff(reason));
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = sleep(delay) => {}
                        () = until_paused(&mut paused) => {}
                    }
                }
            }
        }
        if let Some(probe) = self.direct_probe.take() {
            probe.abort();
        }
        info!("mirror task stopped");
    }

    /// Link, tail, stream: one try.
    pub(super) async fn attempt(
        &mut self,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        // The tail is read while the link is set up, not after: this task is the mirror
        // partition's only writer (its lease) and appends nothing before it subscribes, so
        // a tail read alongside the dial is as current as one read after it, and after a
        // heal the link and the tail are ready together instead of one after the other.
        let log = self.inner.log.clone();
        let (origin, partition) = (self.origin.clone(), self.partition);
        let (route, tail) = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            () = until_paused(paused) => return Outcome::Paused,
            both = async {
                tokio::join!(self.route(), log.tail(&origin, partition))
            } => both,
        };
        let (conn, via) = match route {
            Ok(route) => route,
            Err(reason) => return Outcome::NoLink(reason),
        };
        // A relay's mirror topic was checked against the origin by the relay itself.
        if via.is_none() {
            if let Some(refused) = self.check_partitions(&conn, shutdown, paused).await {
                return refused;
            }
        }
        let span = info_span!(
            "stream",
            peer = %conn.remote_address(),
            via = via.as_ref().map_or("", |r| r.region.as_str()),
        );
        self.subscribe(conn, via, tail, shutdown, paused)
            .instrument(span)
            .await
    }

    /// The link to pull through: the origin's (`None`), or a relay's. Without relay peers,
    /// the origin's, as long as it takes. With them: the origin's while it is up and heard
    /// from, or until it has been down or silent for `relay_after`; then the first relay
    /// that is up (or dials) while the origin is redialled in the background.
    pub(super) async fn route(
        &mut self,
    ) -> Result<(PeerConnection, Option<Arc<PeerLink>>), String> {
        let endpoint = self.inner.endpoint.clone();
        if self.relays.is_empty() {
            return self
                .peer
                .connection(&endpoint)
                .await
                .map(|conn| (conn, None))
                .map_err(|e| format!("no link to {}: {e}", self.origin));
        }
        let limit = self.inner.config.relay_after;
        let mut why = String::from("direct link not used (direct = false)");
        let mut dial_error = None;
        if self.peer.direct {
            loop {
                if let Some(conn) = self.peer.usable(limit) {
                    return Ok((conn, None));
                }
                let since = *self.direct_down_since.get_or_insert_with(Instant::now);
                let left = limit.saturating_sub(since.elapsed());
                if left.is_zero() {
                    why = format!(
                        "direct link to {} down for {:?}{}",
                        self.origin,
                        since.elapsed(),
                        dial_error
                            .map(|e| format!(" (last dial: {e})"))
                            .unwrap_or_default()
                    );
                    break;
                }
                if self.peer.live().is_some() {
                    // Up but silent: it is heard from again, or the grace ends.
                    sleep(left.min(ROUTE_CHECK_EVERY)).await;
                    continue;
                }
                match timeout(left, self.peer.connection(&endpoint)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => dial_error = Some(e),
                    Err(_) => {}
                }
            }
            self.probe_direct();
        }
        let now = Instant::now();
        self.relay_cooldown.retain(|_, until| *until > now);
        let candidates: Vec<Arc<PeerLink>> = self
            .relays
            .iter()
            // A relay paused by an operator carries nothing either.
            .filter(|r| !self.relay_cooldown.contains_key(&r.region) && !*r.paused.borrow())
            .cloned()
            .collect();
        if let Some((conn, relay)) = candidates
            .iter()
            .find_map(|r| r.usable(limit).map(|c| (c, r.clone())))
        {
            return Ok((conn, Some(relay)));
        }
        for relay in candidates.iter().filter(|r| r.live().is_none()) {
            if let Ok(Ok(conn)) = timeout(limit, relay.connection(&endpoint)).await {
                return Ok((conn, Some(relay.clone())));
            }
        }
        let names: Vec<&str> = self.relays.iter().map(|r| r.region.as_str()).collect();
        Err(format!(
            "no route to {}: {why}, and no relay ({}) reachable",
            self.origin,
            names.join(", ")
        ))
    }

    /// Keeps one dial of the direct link going in the background (each bounded by
    /// `relay_after`), so the link is back soon after the path heals.
    pub(super) fn probe_direct(&mut self) {
        if self.direct_probe.as_ref().is_some_and(|p| !p.is_finished()) {
            return;
        }
        let peer = self.peer.clone();
        let endpoint = self.inner.endpoint.clone();
        let limit = self.inner.config.relay_after;
        self.direct_probe = Some(tokio::spawn(async move {
            let _ = timeout(limit, peer.connection(&endpoint)).await;
        }));
    }

    /// While a stream runs: `Some(reason)` when it should end to change route (the direct
    /// link went silent and a relay may carry it; the direct link is back; the relay went
    /// silent). Called every [`ROUTE_CHECK_EVERY`] by streams of tasks that have relays.
    pub(super) fn route_change(&mut self, via: Option<&Arc<PeerLink>>) -> Option<String> {
        let limit = self.inner.config.relay_after;
        match via {
            None => {
                let silent = self.peer.silent_for()?;
                if silent < limit {
                    return None;
                }
                let now = Instant::now();
                self.direct_down_since = Some(now.checked_sub(silent).unwrap_or(now));
                Some(format!(
                    "nothing received from {} for {silent:?}; trying a relay",
                    self.origin
                ))
            }
            Some(relay) => {
                if self.peer.direct {
                    if self.peer.usable(limit).is_some() {
                        return Some(format!("the direct link to {} is back", self.origin));
                    }
                    self.probe_direct();
                }
                if *relay.paused.borrow() {
                    return Some(format!("relay {} paused by an operator", relay.region));
                }
                match relay.silent_for() {
                    Some(silent) if silent < limit => None,
                    Some(silent) => Some(format!(
                        "nothing received from relay {} for {silent:?}",
                        relay.region
                    )),
                    None => Some(format!("the link to relay {} closed", relay.region)),
                }
            }
        }
    }

    /// The serving side accepted a stream on route `route`: log a switch, count it.
    pub(super) fn on_route_ready(&mut self, route: &str, direct: bool) {
        if direct {
            self.direct_down_since = None;
        }
        if self.streamed_route.as_deref() == Some(route) {
            return;
        }
        if let Some(from) = self.streamed_route.replace(route.to_owned()) {
            info!(from = %from, to = %route, next_offset = self.next_needed(), "mirror route switched");
            self.update(|s| s.route_switches += 1);
        }
    }

    /// A relay refused this partition for good: do not ask it again for a while.
    pub(super) fn cool_down(&mut self, relay: &str) {
        self.relay_cooldown
            .insert(relay.to_owned(), Instant::now() + RELAY_COOLDOWN);
    }

    /// Checks that the origin's partition count is the mirror topic's (once per link):
    /// partition p is mirrored into mirror partition p, so an origin partition beyond the
    /// mirror topic's would never be mirrored, and one the origin lacks would never be
    /// served. An origin with more partitions than the mirror topic has them added to it
    /// ([`MirrorLog::grow_partitions`](crate::mirror::log::MirrorLog::grow_partitions)):
    /// the count is learned from the origin. One with fewer is refused for every task of
    /// the origin (mirror topics never shrink), with a reason the operator sees in the
    /// task's state, the link's last error and the logs.
    pub(super) async fn check_partitions(
        &self,
        conn: &PeerConnection,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let told = tokio::select! {
            () = shutdown.cancelled() => return Some(Outcome::Shutdown),
            () = until_paused(paused) => return Some(Outcome::Paused),
            told = self.ask_partitions(conn, self.inner.config.timers.idle_timeout, false) => told?,
        };
        tokio::select! {
            () = shutdown.cancelled() => Some(Outcome::Shutdown),
            judged = self.judge_partitions(told) => judged,
        }
    }

    /// The origin's partition count (`None`: not checked for this peer); `fresh` asks again
    /// even if this link answered before.
    pub(super) async fn ask_partitions(
        &self,
        conn: &PeerConnection,
        limit: Duration,
        fresh: bool,
    ) -> Option<Result<Option<i32>, String>> {
        self.peer.expected_partitions()?;
        let local = self.inner.endpoint.region();
        Some(
            self.peer
                .origin_partitions(conn, local, &self.topic, limit, fresh)
                .await,
        )
    }

    /// What the origin's answer means for this task: `None` to go on. An origin with more
    /// partitions than the mirror topic grows the mirror topic first.
    pub(super) async fn judge_partitions(
        &self,
        told: Result<Option<i32>, String>,
    ) -> Option<Outcome> {
        let mut expected = self.peer.expected_partitions()?;
        let n = match told {
            Ok(Some(n)) => n,
            Ok(None) => return None,
            Err(e) => {
                return Some(Outcome::Failed {
                    reason: format!("cannot learn the origin's partition count: {e}"),
                    transient: true,
                    progressed: false,
                })
            }
        };
        if n > expected {
            match self.inner.log.grow_partitions(&self.origin, n).await {
                Ok(now) => {
                    if now != expected {
                        info!(
                            origin = %self.origin,
                            partitions = now,
                            was = expected,
                            "the origin has more partitions: mirror topic grown to match"
                        );
                    }
                    // Only ever raised: a concurrent task may have grown it further.
                    self.peer
                        .expected_partitions
                        .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                    expected = now;
                }
                Err(e) => {
                    warn!(origin = %self.origin, partitions = n, error = %e, "cannot grow the mirror topic");
                    return Some(self.refuse_count(n, expected, &format!(": {e}")));
                }
            }
        }
        (n != expected).then(|| self.refuse_count(n, expected, ""))
    }

    /// The refusal of an origin whose partition count `n` the mirror topic's `expected`
    /// cannot match (`why`: what growing it answered, if tried).
    fn refuse_count(&self, n: i32, expected: i32, why: &str) -> Outcome {
        let fix = if n < expected {
            "mirror topics never shrink: recreate it with"
        } else {
            "give it"
        };
        let reason = format!(
            "partition count mismatch: {}'s topic {} has {n} partitions, the mirror topic \
             here has {expected}{why}; mirroring from {} is refused until they match ({fix} \
             {n} partitions: dtfed.mirror.{})",
            self.origin, self.topic, self.origin, self.origin
        );
        lock(&self.peer.info).last_error = Some(reason.clone());
        Outcome::Failed {
            reason,
            transient: false,
            progressed: false,
        }
    }

    /// Stream and session on `conn`, resuming after `tail` (the mirror partition's tail,
    /// as just read).
    pub(super) async fn subscribe(
        &mut self,
        conn: PeerConnection,
        via: Option<Arc<PeerLink>>,
        tail: Result<Option<i64>, LogError>,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        match tail {
            Ok(tail) => {
                self.written = tail;
                self.update_offsets();
            }
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("cannot read the mirror tail: {e}"),
                    transient: true,
                    progressed: false,
                }
            }
        }
        let resume_from = self.next_needed();

        let opened = tokio::select! {
            () = shutdown.cancelled() => return Outcome::Shutdown,
            () = until_paused(paused) => return Outcome::Paused,
            opened = conn.connection().open_bi() => opened,
        };
        let (send, recv) = match opened {
            Ok(streams) => streams,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("cannot open a stream: {e}"),
                    transient: true,
                    progressed: false,
                }
            }
        };
        let route = via
            .as_ref()
            .map_or_else(|| ROUTE_DIRECT.to_owned(), |r| format!("via {}", r.region));
        self.update(|s| {
            s.streams_opened += 1;
            s.route = route;
        });
        self.stream(&conn, via, (send, recv), resume_from, shutdown, paused)
            .await
    }

    /// Runs one [`MirrorPull`] session on a fresh stream ([`PullStream`]).
    pub(super) async fn stream(
        &mut self,
        conn: &PeerConnection,
        via: Option<Arc<PeerLink>>,
        (send, recv): (SendStream, RecvStream),
        resume_from: i64,
        shutdown: &CancellationToken,
        paused: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let config = self.inner.config.clone();
        let cfg = PullConfig {
            local_region: self.inner.endpoint.region().to_owned(),
            origin: self.origin.clone(),
            via: via.as_ref().map(|r| r.region.clone()),
            // A relay serves its mirror topic of the origin, with the origin's offsets.
            topic: match &via {
                Some(_) => mirror_topic(&self.origin),
                None => self.topic.clone(),
            },
            partition: self.partition,
            resume_from,
            timers: config.timers,
        };
        let session = MirrorPull::new(cfg, Duration::ZERO);
        // The origin's partition count may change while streams run (an operator added
        // partitions): partition 0's task asks again now and then, so the mismatch shows.
        let recheck =
            self.partition == 0 && self.peer.expected_partitions().is_some() && via.is_none();
        let route_checks = !self.relays.is_empty();
        debug!(resume_from, "subscribing");
        let side = PullStream {
            recheck_at: Instant::now() + config.partitions_recheck,
            route_check_at: Instant::now() + ROUTE_CHECK_EVERY,
            route_checks,
            via,
            task: self,
            conn,
            shutdown: shutdown.clone(),
            paused: paused.clone(),
            progressed: false,
            recheck,
            resume_from,
            config,
        };
        StreamDriver::new(side, session, send, recv, READ_CHUNK, READ_BUDGET)
            .run()
            .await
    }

    /// Appends `records` after the tail; returns one past the last offset written, or
    /// `None` if there was nothing new.
    pub(super) async fn write(
        &mut self,
        records: Vec<LinkRecord>,
        shutdown: &CancellationToken,
    ) -> Result<Option<i64>, String> {
        // The session already dropped anything at or below where it resumed; check again at
        // the boundary that matters, against what the mirror partition holds.
        let mut last = self.written;
        let mut fresh = Vec::with_capacity(records.len());
        let mut dropped = 0usize;
        for r in records {
            if last.is_some_and(|l| r.offset <= l) {
                dropped += 1;
                continue;
            }
            last = Some(r.offset);
            fresh.push(r);
        }
        if dropped > 0 {
            warn!(dropped, tail = ?self.written, "dropped records at or below the mirror tail");
        }
        let (Some(last_record), Some(last_offset)) = (fresh.last(), last) else {
            return Ok(None);
        };
        let last_ts = last_record.timestamp_ms;
        let count = fresh.len();
        let log = self.inner.log.clone();
        let append = log.append(&self.origin, self.partition, &fresh);
        tokio::pin!(append);
        let result = tokio::select! {
            r = &mut append => r,
            () = shutdown.cancelled() => {
                // Let an append under way finish: abandoned, it could land later than the
                // next owner's tail read.
                let grace = self.inner.config.append_grace;
                match timeout(grace, &mut append).await {
                    Ok(r) => r,
                    Err(_) => {
                        error!(?grace, "mirror append still pending at shutdown; abandoning it");
                        return Err(format!("append still pending {grace:?} after shutdown"));
                    }
                }
            }
        };
        result.map_err(|e| format!("cannot append to the mirror topic: {e}"))?;
        let acked_ms = now_ms();
        let mut ages = AgeHistogram::default();
        for r in fresh.iter().filter(|r| r.timestamp_ms >= 0) {
            ages.record(acked_ms.saturating_sub(r.timestamp_ms));
        }
        lock(&self.inner.ages)
            .entry(self.origin.clone())
            .or_default()
            .merge(&ages);
        self.written = Some(last_offset);
        self.update_offsets();
        self.update(|s| {
            s.last_record_ts_ms = Some(last_ts);
            s.records_mirrored += count as u64;
            s.append_age.merge(&ages);
        });
        Ok(Some(last_offset.saturating_add(1)))
    }

    /// Reports a gap: logs, counts, records it; then resumes past it.
    pub(super) async fn on_gap(&mut self, from: i64, to: i64) -> Result<(), String> {
        warn!(
            from,
            to,
            missing_offsets = to.saturating_sub(from).saturating_add(1),
            "the origin no longer retains these offsets: gap in the mirror"
        );
        self.inner
            .log
            .record_gap(&self.origin, self.partition, from, to)
            .await
            .map_err(|e| format!("cannot record gap {from}..={to}: {e}"))?;
        self.floor = self.floor.max(to.saturating_add(1));
        self.update_offsets();
        self.update(|s| {
            s.gaps += 1;
            s.last_gap = Some((from, to));
        });
        Ok(())
    }
}
