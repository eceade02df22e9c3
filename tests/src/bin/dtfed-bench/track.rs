//! What the readers and publishers count: counters, latency histograms, per-publish tracking, and the
//! reader task that decodes every server frame into them.

use super::*;

/// Event counters, shared by every client task.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) sent_measured: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) acked_measured: AtomicU64,
    /// Error frames that answered a publish (carry one of our refs).
    pub(crate) pub_errors: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) delivered_measured: AtomicU64,
    /// Text bytes of the `msg` frames delivered in the measured window.
    pub(crate) delivered_bytes_measured: AtomicU64,
    pub(crate) expected: AtomicU64,
    pub(crate) order_violations: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) prev_breaks: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) foreign: AtomicU64,
    pub(crate) misrouted: AtomicU64,
    pub(crate) unmatched_acks: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) send_failures: AtomicU64,
    pub(crate) late_ticks: AtomicU64,
    pub(crate) max_tick_lag_us: AtomicU64,
    /// When the last publish was written and the last delivery read, ns since `base`.
    pub(crate) last_sent_ns: AtomicU64,
    pub(crate) last_delivered_ns: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub(crate) struct Hists {
    pub(crate) ack: Histogram<u64>,
    pub(crate) delivery: Histogram<u64>,
}

pub(crate) struct Shared {
    pub(crate) base: Instant,
    pub(crate) run_id: String,
    /// Measured window, ns since `base`: [start, end). The end moves in a catch-up run (it
    /// is the cut).
    pub(crate) window_start: u64,
    pub(crate) window_end: AtomicU64,
    /// Publishers stop at their first tick at or after this (ns since `base`).
    pub(crate) pub_end: AtomicU64,
    pub(crate) subs_per_room: Vec<u64>,
    pub(crate) c: Counters,
    pub(crate) hists: Mutex<Hists>,
    pub(crate) errors_by_code: Mutex<BTreeMap<String, u64>>,
    /// A few examples of anything odd, for the report.
    pub(crate) notes: Mutex<Vec<String>>,
    pub(crate) closing: AtomicBool,
    /// Catch-up runs: every message until all its subscribers have it.
    pub(crate) tracker: Option<Tracker>,
}

impl Shared {
    pub(crate) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub(crate) fn in_window(&self, t: u64) -> bool {
        t >= self.window_start && t < self.window_end.load(Ordering::Relaxed)
    }

    pub(crate) fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    pub(crate) fn note(&self, what: String) {
        let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        if notes.len() < 10 {
            notes.push(what);
        }
    }
}

/// Undelivered messages, per publisher, in send order (a publisher's messages all go to
/// one room, hence one partition: each subscriber gets them in that order).
pub(crate) struct Tracker {
    pub(crate) pubs: Vec<Mutex<PubTrack>>,
}

#[derive(Default)]
pub(crate) struct PubTrack {
    /// Seq of the front of `q`.
    pub(crate) base: u64,
    /// (send ns, deliveries still missing), from seq `base` on.
    pub(crate) q: std::collections::VecDeque<(u64, u32)>,
}

impl PubTrack {
    pub(crate) fn pop_done(&mut self) {
        while self.q.front().is_some_and(|&(_, left)| left == 0) {
            self.q.pop_front();
            self.base += 1;
        }
    }
}

impl Tracker {
    pub(crate) fn new(publishers: usize) -> Tracker {
        Tracker {
            pubs: (0..publishers).map(|_| Mutex::default()).collect(),
        }
    }

    pub(crate) fn lock(&self, client: usize) -> Option<std::sync::MutexGuard<'_, PubTrack>> {
        self.pubs
            .get(client)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Publisher `client` sends `seq` (1, 2, ...) at `t`, expecting `subs` deliveries.
    pub(crate) fn sent(&self, client: usize, seq: u64, t: u64, subs: u64) {
        if let Some(mut p) = self.lock(client) {
            if p.q.is_empty() {
                p.base = seq;
            }
            p.q.push_back((t, u32::try_from(subs).unwrap_or(u32::MAX)));
            p.pop_done();
        }
    }

    /// One delivery of (client, seq) (duplicates are filtered before).
    pub(crate) fn delivered(&self, client: usize, seq: u64) {
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
    pub(crate) fn refused(&self, client: usize, seq: u64) {
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
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        (0..self.pubs.len())
            .filter_map(|c| self.lock(c).and_then(|p| p.q.front().map(|e| e.0)))
            .min()
    }

    /// Messages sent before `t` not delivered to all their subscribers.
    pub(crate) fn pending_before(&self, t: u64) -> u64 {
        (0..self.pubs.len())
            .filter_map(|c| self.lock(c))
            .map(|p| p.q.iter().filter(|e| e.0 < t && e.1 > 0).count() as u64)
            .sum()
    }
}

pub(crate) fn new_hist() -> anyhow::Result<Histogram<u64>> {
    // 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("cannot create a histogram")
}

// ------------------------------------------------------------------ connecting

/// Per-connection checker state.
pub(crate) struct ReaderState {
    pub(crate) idx: usize,
    pub(crate) role: Role,
    pub(crate) room: RoomId,
    /// `--flat-out`: the publisher's permits, one given back per answered publish.
    pub(crate) window: Option<Arc<Semaphore>>,
    /// origin → last offset seen on this connection (room is fixed per connection).
    pub(crate) last: HashMap<String, i64>,
    /// sender client → bitset of seqs seen.
    pub(crate) seen: HashMap<u32, Vec<u64>>,
}

impl ReaderState {
    /// Marks (client, seq) as seen; true if it had been seen already.
    pub(crate) fn seen_before(&mut self, client: u32, seq: u64) -> bool {
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

pub(crate) fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

pub(crate) fn on_text(shared: &Shared, st: &mut ReaderState, text: &str) {
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
        ServerFrame::Synced { .. }
        | ServerFrame::More { .. }
        | ServerFrame::Wm { .. }
        | ServerFrame::Pong => {}
    }
}

pub(crate) async fn reader(
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
