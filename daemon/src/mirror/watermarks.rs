//! Replication watermarks: per (origin region, partition), how far this region holds the
//! origin's log and whether it is receiving it now, shared by every daemon of the region so
//! that each player's session can tell its rooms (`synced`'s `origins`, then `wm` frames;
//! `docs/PROTOCOL.md`, "Replication watermarks").
//!
//! Start at [`run`]: one loop per daemon, every [`PUBLISH_EVERY`]:
//!
//! 1. **Read the whole region's.** Every daemon reads the marks of every (O, p) from the bus
//!    and merges them into its table ([`merge`]): a mark that vanished (its owner stopped
//!    publishing) reads as not live, with the offset last known.
//! 2. **Publish what this daemon knows.** The mirror task of (O, p) runs on one daemon of
//!    the region (`tasks`); that daemon turns the task's status into an [`OriginMark`]
//!    ([`owned_mark`], continuing the mark it just read, so a task that moved keeps its
//!    offset and `since`) and puts it on the bus with a time to live of [`MARK_TTL`], so a
//!    dead owner, or a task that moved, leaves nothing readable behind a few seconds later.
//!    A task that has not reached its origin has not read its mirror partition's tail
//!    either (a region started during a cut): [`run`] reads that tail itself, read-only,
//!    through the mirror replay's reader (never the sink's tail, which fences writers).
//! 3. **Hand them to the sessions.** When the table changed, it goes out on a `watch`
//!    channel ([`MarksWatch`]); each session picks its rooms' partitions from it
//!    ([`RegionMarks::for_room`]) and sends a `wm` frame for the origins whose mark is
//!    news ([`is_news`]: offset, `live` or `since` moved; a `lag_ms` that only grew is not).
//!    The table changes at most once per [`PUBLISH_EVERY`], so a room's frames are too.
//!
//! `live` is the task streaming **and** its link heard from within two keep-alive intervals
//! ([`silent_after`], 4 s by default): QUIC keep-alives (every 2 s; each elicits an ACK)
//! make a healthy link receive datagrams whether or not there are records, so a cut path
//! shows within seconds, long before the connection's idle timeout (10 s) or the link
//! session's dead-peer timer (30 s) end the stream. The link checked is the one the task
//! streams over: its origin's, or, on a relay route (`via B`), B's — a relayed origin is
//! live while the relay delivers it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dtfed_proto::record::now_ms;
use dtfed_proto::{OriginMark, OriginMarks, RoomId};
use dtfed_regions::mirror::client::{LinkStatus, MirrorTaskState, MirrorTaskStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Federation;
use crate::bus::{Bus, PartitionMark};
use crate::kafka::partition_for;
use crate::replay::MirrorReplay;

/// How often a daemon publishes its tasks' marks and reads the region's.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How long a published mark stays readable: three publishes and a half, so a late one or
/// two do not make a partition flap, while a dead owner reads as not live within seconds.
pub const MARK_TTL: Duration = Duration::from_millis(3_500);
/// A link from which no datagram arrived for two of its keep-alive intervals is not heard
/// from (the shortest this is: a second).
pub fn silent_after(keep_alive: Duration) -> Duration {
    keep_alive.saturating_mul(2).max(Duration::from_secs(1))
}

/// Every daemon's view of the region's watermarks, by (origin, partition).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionMarks {
    /// Origin region → partition count of its mirror topic here.
    pub partitions: BTreeMap<String, i32>,
    pub marks: HashMap<(String, i32), OriginMark>,
}

impl RegionMarks {
    /// The marks of `room`'s partition of every origin that has one.
    pub fn for_room(&self, room: &RoomId) -> OriginMarks {
        self.partitions
            .iter()
            .filter_map(|(origin, &count)| {
                let p = partition_for(room, count);
                let mark = self.marks.get(&(origin.clone(), p))?;
                Some((origin.clone(), mark.clone()))
            })
            .collect()
    }

    /// Every (origin, partition) of the region's mirror topics.
    fn keys(&self) -> Vec<(String, i32)> {
        self.partitions
            .iter()
            .flat_map(|(o, &n)| (0..n).map(move |p| (o.clone(), p)))
            .collect()
    }
}

/// What a session watches: the region's marks, replaced as a whole when they change.
pub type MarksWatch = watch::Receiver<Arc<RegionMarks>>;

/// Whether `now` is news against `before`: its offset, `live` or `since` moved. `lag_ms`
/// alone is not (it grows with the clock while a link is down; `since` says as much).
pub fn is_news(before: Option<&OriginMark>, now: &OriginMark) -> bool {
    before.is_none_or(|b| (b.offset, b.live, b.since) != (now.offset, now.live, now.since))
}

/// The origins of `now` whose mark is news against `before` (new ones included): what a
/// `wm` frame for a room carries.
pub fn changed(before: &OriginMarks, now: &OriginMarks) -> OriginMarks {
    now.iter()
        .filter(|(o, m)| is_news(before.get(*o), m))
        .map(|(o, m)| (o.clone(), m.clone()))
        .collect()
}

/// The mark of a task this daemon runs, at `now` (ms).
///
/// - `offset`: the mirror partition's last origin offset + 1 (the next one not held), never
///   below what the region already said. A task reads its tail only once it reaches its
///   origin (a region started during a cut would know nothing): `tail_read` is the tail
///   [`run`] read itself for such a task (`Some(None)`: empty). `None` (no mark) while none
///   of that is known.
/// - `live`: streaming, and the link `heard` from recently.
/// - `lag_ms`: 0 when live and caught up with the origin's last reported end; when live but
///   behind, the age of the last record written; when not live, the time since this
///   region last knew it was complete (caught up at `caught_up_at`, or the last record
///   written, whichever is later); `None` when none of that is known.
/// - `since`: kept from `previous` while `live` stays the same, else `now`.
pub fn owned_mark(
    task: &MirrorTaskStatus,
    heard: bool,
    caught_up_at: Option<i64>,
    previous: Option<&OriginMark>,
    tail_read: Option<Option<i64>>,
    now: i64,
) -> Option<OriginMark> {
    // `None` is an empty mirror partition once streaming (its tail was read), but also a
    // tail not read yet before that: then the tail this module read itself, if any.
    let held = match (task.mirrored_offset, &task.state, tail_read) {
        (Some(o), _, _) => Some(o.saturating_add(1)),
        (None, MirrorTaskState::Streaming, _) => Some(0),
        (None, _, Some(tail)) => Some(tail.map_or(0, |o| o.saturating_add(1))),
        (None, _, None) => None,
    };
    let offset = match (previous, held) {
        (Some(p), Some(h)) => p.offset.max(h),
        (Some(p), None) => p.offset,
        (None, Some(h)) => h,
        // The task has not read its tail yet, and the region knows nothing: no mark
        // rather than a made-up offset.
        (None, None) => return None,
    };
    let live = task.state == MirrorTaskState::Streaming && heard;
    let lag_ms = if live {
        task.lag_ms(now)
    } else {
        caught_up_at
            .max(task.last_record_ts_ms)
            .map(|t| now.saturating_sub(t).max(0))
    };
    let since = match previous {
        Some(p) if p.live == live => p.since,
        _ => Some(now),
    };
    Some(OriginMark {
        offset,
        live,
        lag_ms,
        since,
    })
}

/// Merges what the bus holds for `keys` (`read`, in the same order) into `table` at `now`:
/// a mark read replaces the one known; a mark gone (its owner stopped publishing) keeps its
/// offset and reads as not live since `now`.
pub fn merge(
    table: &mut HashMap<(String, i32), OriginMark>,
    keys: &[(String, i32)],
    read: Vec<Option<OriginMark>>,
    now: i64,
) {
    for (key, mark) in keys.iter().zip(read) {
        match mark {
            Some(m) => {
                table.insert(key.clone(), m);
            }
            None => {
                if let Some(known) = table.get_mut(key) {
                    if known.live {
                        known.live = false;
                        known.lag_ms = None;
                        known.since = Some(now);
                    }
                }
            }
        }
    }
}

/// Per peer link: when it was last heard from, by its received-datagram count.
struct Hearing {
    silent_after: Duration,
    last: HashMap<String, (u64, Instant)>,
}

impl Hearing {
    /// Samples `links`; returns the peers heard from within `silent_after`.
    fn sample(&mut self, links: &[LinkStatus], now: Instant) -> Vec<String> {
        let mut heard = Vec::new();
        for l in links {
            let Some(rx) = l.rx_datagrams.filter(|_| l.connected && !l.paused) else {
                self.last.remove(&l.region);
                continue;
            };
            let entry = self.last.entry(l.region.clone()).or_insert((rx, now));
            if entry.0 != rx {
                *entry = (rx, now);
            }
            if now.duration_since(entry.1) < self.silent_after {
                heard.push(l.region.clone());
            }
        }
        heard
    }
}

/// The watch the sessions get, and its sender for [`run`].
pub fn channel(partitions: BTreeMap<String, i32>) -> (watch::Sender<Arc<RegionMarks>>, MarksWatch) {
    watch::channel(Arc::new(RegionMarks {
        partitions,
        marks: HashMap::new(),
    }))
}

/// Publishes this daemon's marks and reads the region's, every [`PUBLISH_EVERY`], until
/// `stop` (see the module docs).
pub async fn run(
    region: String,
    federation: Arc<Federation>,
    bus: Arc<dyn Bus>,
    mirrors: Arc<MirrorReplay>,
    tx: watch::Sender<Arc<RegionMarks>>,
    stop: CancellationToken,
) {
    let mut hearing = Hearing {
        silent_after: silent_after(federation.link_keep_alive()),
        last: HashMap::new(),
    };
    let mut caught_up: HashMap<(String, i32), i64> = HashMap::new();
    let mut tails = TailReads::default();
    let mut failing = false;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let heard = hearing.sample(&federation.link_status(), Instant::now());
        let table = tx.borrow().clone();
        // An origin's partition count is learned from the origin and may grow at run time:
        // the room → partition mapping and the marks read follow it.
        let partitions = federation.origins.all();
        let keys = RegionMarks {
            partitions: partitions.clone(),
            marks: HashMap::new(),
        }
        .keys();
        // Read first: a task that just moved here takes over its mark (offset, since)
        // from the daemon that ran it before.
        let read = match bus.watermarks(&keys).await {
            Ok(r) => r,
            Err(e) => {
                note_failure(&region, &mut failing, &e);
                continue;
            }
        };
        let mut marks = table.marks.clone();
        merge(&mut marks, &keys, read, now);
        let tasks = federation.task_status();
        let runs = |k: &(String, i32)| {
            tasks
                .iter()
                .any(|t| (&t.origin, t.partition) == (&k.0, k.1))
        };
        caught_up.retain(|k, _| runs(k));
        tails.read.retain(|k, _| runs(k));
        tails.failed.retain(|k, _| runs(k));
        let mut owned = Vec::with_capacity(tasks.len());
        for t in &tasks {
            let key = (t.origin.clone(), t.partition);
            // The link the task streams over: the origin's, or its relay's.
            let heard = heard.iter().any(|h| h == t.streams_from());
            if t.state == MirrorTaskState::Streaming && heard && t.lag_records == Some(0) {
                caught_up.insert(key.clone(), now);
            }
            let caught_up_at = caught_up.get(&key).copied();
            if t.mirrored_offset.is_none()
                && t.state != MirrorTaskState::Streaming
                && !marks.contains_key(&key)
            {
                tails.read_once(&region, &mirrors, &key).await;
            }
            let tail_read = tails.read.get(&key).copied();
            if let Some(mark) = owned_mark(t, heard, caught_up_at, marks.get(&key), tail_read, now)
            {
                marks.insert(key, mark.clone());
                owned.push(PartitionMark {
                    origin: t.origin.clone(),
                    partition: t.partition,
                    mark,
                });
            }
        }
        let ttl = i64::try_from(MARK_TTL.as_millis()).unwrap_or(i64::MAX);
        if let Err(e) = bus.put_watermarks(&owned, ttl).await {
            note_failure(&region, &mut failing, &e);
            continue;
        }
        if failing {
            tracing::info!(%region, "replication watermarks: the bus answers again");
            failing = false;
        }
        if marks != table.marks || partitions != table.partitions {
            let mut news = partitions != table.partitions;
            for (key, m) in &marks {
                let before = table.marks.get(key);
                news |= is_news(before, m);
                if before.map(|b| b.live) != Some(m.live) {
                    tracing::info!(%region, origin = %key.0, partition = key.1, live = m.live, offset = m.offset, "replication watermark: liveness changed");
                }
            }
            // The newest marks are always what a `synced` reads; sessions are woken only
            // for news (not for a `lag_ms` that grew while a link stays down).
            tx.send_if_modified(|current| {
                *current = Arc::new(RegionMarks { partitions, marks });
                news
            });
        }
    }
}

/// Tails of mirror partitions this module read itself, for tasks that have not read theirs
/// (see [`owned_mark`]): at most one read per task, retried every [`TAIL_RETRY`].
#[derive(Default)]
struct TailReads {
    read: HashMap<(String, i32), Option<i64>>,
    failed: HashMap<(String, i32), Instant>,
}

/// Bound on one tail read (it shares the mirror replay's read slots with players).
const TAIL_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before reading a tail again after a failed read.
const TAIL_RETRY: Duration = Duration::from_secs(10);

impl TailReads {
    async fn read_once(&mut self, region: &str, mirrors: &MirrorReplay, key: &(String, i32)) {
        if self.read.contains_key(key)
            || self
                .failed
                .get(key)
                .is_some_and(|at| at.elapsed() < TAIL_RETRY)
        {
            return;
        }
        match mirrors
            .reader
            .mirror_tail(&key.0, key.1, TAIL_READ_TIMEOUT)
            .await
        {
            Ok(tail) => {
                self.failed.remove(key);
                self.read.insert(key.clone(), tail);
            }
            Err(e) => {
                tracing::warn!(%region, origin = %key.0, partition = key.1, error = %e, "replication watermark: cannot read the mirror partition's tail; retrying in 10 s");
                self.failed.insert(key.clone(), Instant::now());
            }
        }
    }
}

/// Logs the first of a run of bus failures. Redis unreachable means the fan-out is down
/// too; the table is kept as it is until the bus answers again.
fn note_failure(region: &str, failing: &mut bool, e: &crate::bus::BusError) {
    if !*failing {
        tracing::warn!(%region, error = %e, "replication watermarks: cannot share them through the bus; keeping the last known");
        *failing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtfed_regions::mirror::AgeHistogram;

    fn task(state: MirrorTaskState, mirrored: Option<i64>, lag: Option<i64>) -> MirrorTaskStatus {
        MirrorTaskStatus {
            origin: "seoul".into(),
            topic: "dtfed.local".into(),
            partition: 2,
            state,
            mirrored_offset: mirrored,
            origin_high_watermark: None,
            lag_records: lag,
            last_record_ts_ms: Some(10_000),
            gaps: 0,
            last_gap: None,
            records_mirrored: 0,
            streams_opened: 1,
            append_age: AgeHistogram::default(),
            route: "direct".into(),
            route_switches: 0,
        }
    }

    #[test]
    fn a_relayed_task_streams_from_its_relay() {
        let mut t = task(MirrorTaskState::Streaming, Some(41), Some(0));
        assert_eq!(t.streams_from(), "seoul");
        t.route = "via frankfurt".into();
        assert_eq!(t.streams_from(), "frankfurt");
    }

    #[test]
    fn an_owned_mark_is_live_only_streaming_and_heard() {
        let t = task(MirrorTaskState::Streaming, Some(41), Some(0));
        let m = owned_mark(&t, true, Some(19_000), None, None, 20_000).unwrap();
        assert_eq!(
            m,
            OriginMark {
                offset: 42,
                live: true,
                lag_ms: Some(0),
                since: Some(20_000)
            }
        );
        // Silent link: not live; lag since it was last known complete; since moves.
        let m2 = owned_mark(&t, false, Some(19_000), Some(&m), None, 25_000).unwrap();
        assert!(!m2.live);
        assert_eq!(m2.lag_ms, Some(6_000));
        assert_eq!(m2.since, Some(25_000));
        // Still down a second later: since stays.
        let m3 = owned_mark(&t, false, Some(19_000), Some(&m2), None, 26_000).unwrap();
        assert_eq!(m3.since, Some(25_000));
        // Not streaming, heard or not: not live.
        let backoff = task(MirrorTaskState::Backoff("cut".into()), Some(41), None);
        assert!(
            !owned_mark(&backoff, true, None, None, None, 1)
                .unwrap()
                .live
        );
    }

    #[test]
    fn an_owned_mark_never_moves_back() {
        // A task that has not read its tail yet (no mirrored offset) keeps the region's.
        let t = task(MirrorTaskState::Connecting, None, None);
        let before = OriginMark {
            offset: 42,
            live: true,
            lag_ms: Some(0),
            since: Some(5),
        };
        assert_eq!(
            owned_mark(&t, true, None, Some(&before), None, 9).map(|m| m.offset),
            Some(42)
        );
        assert_eq!(owned_mark(&t, true, None, None, None, 9), None);
        // ... unless its tail was read for it: not live, from the tail.
        let m = owned_mark(&t, false, None, None, Some(Some(41)), 9).unwrap();
        assert_eq!((m.offset, m.live), (42, false));
        let m = owned_mark(&t, false, None, None, Some(None), 9).unwrap();
        assert_eq!(m.offset, 0);
        let empty = task(MirrorTaskState::Streaming, None, Some(0));
        assert_eq!(
            owned_mark(&empty, true, None, None, None, 9).map(|m| m.offset),
            Some(0)
        );
    }

    fn link(rx: Option<u64>) -> LinkStatus {
        LinkStatus {
            region: "seoul".into(),
            connected: rx.is_some(),
            rtt_ms: None,
            addr: None,
            paused: false,
            connects: 1,
            last_error: None,
            rx_datagrams: rx,
        }
    }

    #[test]
    fn a_link_is_heard_while_its_datagrams_grow() {
        let mut h = Hearing {
            silent_after: silent_after(Duration::from_secs(2)),
            last: HashMap::new(),
        };
        let t0 = Instant::now();
        assert_eq!(h.sample(&[link(Some(10))], t0), vec!["seoul".to_owned()]);
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(
            h.sample(&[link(Some(10))], t3).len(),
            1,
            "3 s of silence: heard"
        );
        let t5 = t0 + Duration::from_secs(5);
        assert!(h.sample(&[link(Some(10))], t5).is_empty(), "4 s of silence");
        assert_eq!(h.sample(&[link(Some(11))], t5).len(), 1, "a datagram");
        assert!(h.sample(&[link(None)], t5).is_empty(), "no connection");
        let mut paused = link(Some(12));
        paused.paused = true;
        assert!(h.sample(&[paused], t5).is_empty(), "paused");
    }

    #[test]
    fn a_vanished_mark_reads_not_live_with_its_offset() {
        let key = ("seoul".to_owned(), 0);
        let keys = vec![key.clone(), ("seoul".to_owned(), 1)];
        let live = OriginMark {
            offset: 8,
            live: true,
            lag_ms: Some(0),
            since: Some(1),
        };
        let mut table = HashMap::new();
        merge(&mut table, &keys, vec![Some(live.clone()), None], 100);
        assert_eq!(table.len(), 1, "nothing known of partition 1: no mark");
        merge(&mut table, &keys, vec![None, None], 200);
        let gone = &table[&key];
        assert_eq!((gone.offset, gone.live, gone.since), (8, false, Some(200)));
        // Still gone: unchanged, so nothing is sent again.
        let snapshot = table.clone();
        merge(&mut table, &keys, vec![None, None], 300);
        assert_eq!(table, snapshot);
    }

    #[test]
    fn a_room_gets_its_partition_of_each_origin() {
        let room = RoomId::parse("tavern").unwrap();
        let mut marks = RegionMarks {
            partitions: [("seoul".to_owned(), 4), ("frankfurt".to_owned(), 2)]
                .into_iter()
                .collect(),
            marks: HashMap::new(),
        };
        for p in 0..4 {
            let m = OriginMark {
                offset: i64::from(p) * 10,
                live: true,
                lag_ms: Some(0),
                since: None,
            };
            marks.marks.insert(("seoul".to_owned(), p), m);
        }
        let got = marks.for_room(&room);
        let p = partition_for(&room, 4);
        assert_eq!(got.len(), 1, "frankfurt has no mark yet: left out");
        assert_eq!(got["seoul"].offset, i64::from(p) * 10);
        assert_eq!(marks.keys().len(), 6);
        let mut later = got.clone();
        later.get_mut("seoul").unwrap().live = false;
        assert_eq!(changed(&got, &later), later);
        assert!(changed(&later, &later).is_empty());
        // A lag that grew is no news on its own.
        let mut older = later.clone();
        older.get_mut("seoul").unwrap().lag_ms = Some(99_000);
        assert!(changed(&later, &older).is_empty());
    }
}
