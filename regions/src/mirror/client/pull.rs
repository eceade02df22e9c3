//! The receiver's side of one stream ([`PullStream`]): a `MirrorPull` session run by the
//! shared [`StreamDriver`], appending records as they arrive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dtfed_proto::link::{LinkErrorCode, MirrorPull, PullEvent};
use quinn::SendStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::endpoint::PeerConnection;
use crate::mirror::client::link::PeerLink;
use crate::mirror::client::task::{until_paused, Outcome, ROUTE_CHECK_EVERY};
use crate::mirror::client::{PartitionTask, ROUTE_DIRECT};
use crate::mirror::stream::{PeerInput, StreamSide};
use crate::mirror::{MirrorClientConfig, MirrorTaskState};

/// How a stream is told to stop.
pub(super) enum PullStop {
    Shutdown,
    Paused,
}

/// The receiver's side of one stream: a [`MirrorPull`] session whose records are appended
/// to the mirror partition, run by a [`StreamDriver`].
pub(super) struct PullStream<'a> {
    pub(super) task: &'a mut PartitionTask,
    pub(super) conn: &'a PeerConnection,
    pub(super) shutdown: CancellationToken,
    pub(super) paused: watch::Receiver<bool>,
    pub(super) config: MirrorClientConfig,
    /// This stream wrote records (resets the task's backoff).
    pub(super) progressed: bool,
    /// Whether this stream asks for the origin's partition count again, and when.
    pub(super) recheck: bool,
    pub(super) recheck_at: Instant,
    /// The relay this stream pulls through (`None`: from the origin directly).
    pub(super) via: Option<Arc<PeerLink>>,
    /// Whether this stream re-judges its route (the task has relays), and when next.
    pub(super) route_checks: bool,
    pub(super) route_check_at: Instant,
    pub(super) resume_from: i64,
}

impl PullStream<'_> {
    fn relay_name(&self) -> String {
        self.via
            .as_ref()
            .map(|r| r.region.clone())
            .unwrap_or_default()
    }

    pub(super) fn failed(&self, reason: String, transient: bool) -> Outcome {
        Outcome::Failed {
            reason,
            transient,
            progressed: self.progressed,
        }
    }
}

impl StreamSide for PullStream<'_> {
    type Session = MirrorPull;
    type End = Outcome;
    type Stop = PullStop;
    type Wake = ();

    /// Acts on events in order: appends happen here. Records decoded before a stream
    /// failure are still written; nothing after a failed append is.
    async fn handle_events(&mut self, session: &mut MirrorPull, end: &mut Option<Outcome>) {
        while let Some(event) = session.poll_event() {
            let outcome = match event {
                PullEvent::Ready => {
                    debug!(
                        resume_from = self.resume_from,
                        "origin accepted the subscription"
                    );
                    self.task.set_state(MirrorTaskState::Streaming);
                    match &self.via {
                        Some(relay) => {
                            let route = format!("via {}", relay.region);
                            self.task.on_route_ready(&route, false);
                        }
                        None => self.task.on_route_ready(ROUTE_DIRECT, true),
                    }
                    None
                }
                // Shutting down: write nothing more (the next owner resumes from the tail).
                PullEvent::Records(_) if self.shutdown.is_cancelled() => {
                    session.close(
                        LinkErrorCode::Unavailable,
                        "the receiving daemon is shutting down",
                    );
                    Some(Outcome::Shutdown)
                }
                PullEvent::Records(records) => {
                    match self.task.write(records, &self.shutdown).await {
                        Ok(Some(next)) => {
                            session.handle_written(next);
                            self.progressed = true;
                            None
                        }
                        Ok(None) => None,
                        Err(reason) => {
                            session.close(
                                LinkErrorCode::Unavailable,
                                "the mirror topic is not writable",
                            );
                            Some(self.failed(reason, true))
                        }
                    }
                }
                PullEvent::Lag { high_watermark } => {
                    self.task.high_watermark = Some(high_watermark);
                    self.task.update_offsets();
                    None
                }
                // A relay never reports the origin's retention (it answers `unavailable`
                // when it lacks what is asked); should one say so anyway, it is not
                // believed: the origin itself may still hold those offsets.
                PullEvent::Gap { from, to } if self.via.is_some() => {
                    let relay = self.relay_name();
                    self.task.cool_down(&relay);
                    Some(self.failed(
                        format!("relay {relay} does not hold offsets {from}..={to}; not recorded as a gap"),
                        true,
                    ))
                }
                PullEvent::Gap { from, to } => Some(match self.task.on_gap(from, to).await {
                    Ok(()) => Outcome::Gap,
                    Err(reason) => self.failed(reason, true),
                }),
                // Out of range with nothing to skip: the origin's log ends before what the
                // mirror already holds (origin data lost, topic recreated). Keep retrying,
                // slowly and loudly.
                PullEvent::PeerError {
                    code: code @ LinkErrorCode::OffsetOutOfRange { .. },
                    message,
                } => Some(self.failed(
                    format!(
                        "the origin's log ends before offset {}, which the mirror needs \
                         next: {code}: {message}",
                        session.next_offset()
                    ),
                    false,
                )),
                // A relay that cannot serve (not relaying, too old, refusing) is not asked
                // again for a while; the task goes on with another route.
                PullEvent::PeerError { code, message } if self.via.is_some() => {
                    let relay = self.relay_name();
                    if !code.is_transient() {
                        warn!(relay = %relay, code = %code, message = %message, "relay refused the partition");
                        self.task.cool_down(&relay);
                    }
                    Some(self.failed(
                        format!("relay {relay} ended the stream: {code}: {message}"),
                        true,
                    ))
                }
                PullEvent::PeerError { code, message } => Some(self.failed(
                    format!("origin ended the stream: {code}: {message}"),
                    code.is_transient(),
                )),
                PullEvent::PeerSilent => Some(self.failed(
                    format!("origin silent for {:?}", self.config.timers.idle_timeout),
                    true,
                )),
            };
            if let Some(outcome) = outcome {
                // A stream failure seen while reading may already be recorded; an append
                // failure or the origin's own word is the better reason.
                if matches!(outcome, Outcome::Shutdown)
                    || !matches!(end, Some(Outcome::Shutdown | Outcome::Paused))
                {
                    *end = Some(outcome);
                }
                break;
            }
        }
    }

    fn write_limit(&self, closing: bool) -> Duration {
        if closing {
            self.config.close_grace
        } else {
            self.config.timers.idle_timeout
        }
    }

    fn stop(&self) -> impl Future<Output = PullStop> + Send + 'static {
        let shutdown = self.shutdown.clone();
        let mut paused = self.paused.clone();
        async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled_owned() => PullStop::Shutdown,
                () = until_paused(&mut paused) => PullStop::Paused,
            }
        }
    }

    fn on_stop(&mut self, session: &mut MirrorPull, stop: PullStop) -> Option<Outcome> {
        Some(match stop {
            PullStop::Shutdown => {
                session.close(
                    LinkErrorCode::Unavailable,
                    "the receiving daemon is shutting down",
                );
                Outcome::Shutdown
            }
            PullStop::Paused => {
                session.close(
                    LinkErrorCode::Unavailable,
                    "mirroring paused by an operator",
                );
                Outcome::Paused
            }
        })
    }

    async fn wake(&mut self) {
        let at = match (self.recheck, self.route_checks) {
            (false, false) => None,
            (true, false) => Some(self.recheck_at),
            (false, true) => Some(self.route_check_at),
            (true, true) => Some(self.recheck_at.min(self.route_check_at)),
        };
        match at {
            Some(at) => sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    }

    async fn on_wake(&mut self, session: &mut MirrorPull, (): ()) -> Option<Outcome> {
        let now = Instant::now();
        if self.route_checks && now >= self.route_check_at {
            self.route_check_at = now + ROUTE_CHECK_EVERY;
            if let Some(reason) = self.task.route_change(self.via.as_ref()) {
                session.close(LinkErrorCode::Unavailable, reason.clone());
                return Some(Outcome::Reroute(reason));
            }
        }
        if !self.recheck || now < self.recheck_at {
            return None;
        }
        self.recheck_at = Instant::now() + self.config.partitions_recheck;
        // Bounded well below the dead-peer timeout: the stream is not read meanwhile.
        let limit = self.config.timers.heartbeat_interval;
        let told = self.task.ask_partitions(self.conn, limit, true).await?;
        // A failed ask is not a mismatch: the stream goes on.
        let refused = self.task.judge_partitions(Ok(told.ok()?)).await?;
        session.close(LinkErrorCode::Unavailable, "partition count mismatch");
        Some(refused)
    }

    fn on_peer(&mut self, _session: &mut MirrorPull, input: PeerInput) -> Option<Outcome> {
        Some(match input {
            PeerInput::Finished => self.failed("origin finished the stream".to_owned(), true),
            PeerInput::ReadFailed(e) => self.failed(format!("stream failed: {e}"), true),
            PeerInput::Refused(e) => {
                warn!(error = %e, "refusing the origin's frame");
                self.failed(
                    format!("origin broke the protocol: {e}"),
                    e.code().is_transient(),
                )
            }
            PeerInput::Undecodable(e) => {
                warn!(error = %e, "undecodable input from the origin");
                self.failed(format!("undecodable input from the origin: {e}"), false)
            }
        })
    }

    fn abandoned(&mut self, end: Option<Outcome>, why: String) -> Outcome {
        end.unwrap_or_else(|| {
            if self.shutdown.is_cancelled() {
                Outcome::Shutdown
            } else if *self.paused.borrow() {
                Outcome::Paused
            } else {
                self.failed(why, true)
            }
        })
    }

    async fn finished(&mut self, end: Option<Outcome>, _send: &mut SendStream) -> Outcome {
        end.unwrap_or_else(|| self.failed("the mirror session closed".to_owned(), true))
    }
}
