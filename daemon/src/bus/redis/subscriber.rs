//! The Redis bus's subscriber: one Pub/Sub connection per daemon, pumping room messages into
//! the bus's events, re-subscribing every room after a reconnect (then telling the gateway to
//! backfill, since messages published meanwhile were missed), with a keepalive PING so a
//! silently dead connection is noticed. Start at [`run_subscriber`].

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dtfed_proto::MsgFrame;
use futures::future::OptionFuture;
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::RedisError;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::bus::redis::{
    Keys, SubShared, BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, CONNECT_TIMEOUT, EVENTS_CAPACITY,
    KEEPALIVE_EVERY, KEEPALIVE_TIMEOUT, RESUBSCRIBE_CHUNK,
};
use crate::bus::BusEvent;

/// Opens a Pub/Sub connection, subscribes every recorded channel, and installs it (bumping
/// the generation) once nothing recorded is left unsubscribed.
pub(super) async fn open_pubsub(
    client: &redis::Client,
    shared: &SubShared,
) -> Result<(PubSubSink, PubSubStream), RedisError> {
    let pubsub = timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timeout_err("connecting"))??;
    let (mut sink, stream) = pubsub.split();
    let mut subscribed: HashSet<String> = HashSet::new();
    loop {
        let (add, remove) = {
            let mut st = shared.lock();
            let add: Vec<String> = st.channels.difference(&subscribed).cloned().collect();
            let remove: Vec<String> = subscribed.difference(&st.channels).cloned().collect();
            if add.is_empty() && remove.is_empty() {
                st.sink = Some(sink.clone());
                st.generation += 1;
                shared.installed.send_replace(st.generation);
                break;
            }
            (add, remove)
        };
        for chunk in add.chunks(RESUBSCRIBE_CHUNK) {
            timeout(COMMAND_TIMEOUT, sink.subscribe(chunk))
                .await
                .map_err(|_| timeout_err("SUBSCRIBE"))??;
        }
        subscribed.extend(add);
        for chunk in remove.chunks(RESUBSCRIBE_CHUNK) {
            timeout(COMMAND_TIMEOUT, sink.unsubscribe(chunk))
                .await
                .map_err(|_| timeout_err("UNSUBSCRIBE"))??;
        }
        for c in &remove {
            subscribed.remove(c);
        }
    }
    Ok((sink, stream))
}

pub(super) fn timeout_err(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer from Redis"),
    ))
}

/// Why the pump stopped.
pub(super) enum PumpEnd {
    /// Shutdown, or nobody reads the events any more.
    Stop,
    /// The connection is gone.
    Lost(String),
}

/// The subscriber task: pumps Pub/Sub messages into `events`, reconnects on failure.
pub(super) async fn run_subscriber(
    client: redis::Client,
    shared: Arc<SubShared>,
    keys: Keys,
    events: mpsc::Sender<BusEvent>,
    shutdown: CancellationToken,
    first: (PubSubSink, PubSubStream),
) {
    let mut conn = Some(first);
    let mut backoff = BACKOFF_MIN;
    let mut resync = false;
    loop {
        let (sink, stream) = match conn.take() {
            Some(c) => c,
            None => {
                let opened = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = open_pubsub(&client, &shared) => r,
                };
                match opened {
                    Ok(c) => {
                        tracing::info!(
                            rooms = shared.lock().channels.len(),
                            "bus pub/sub reconnected and re-subscribed"
                        );
                        backoff = BACKOFF_MIN;
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "bus pub/sub reconnect failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        match pump(sink, stream, &keys, &events, &shutdown, resync).await {
            PumpEnd::Stop => break,
            PumpEnd::Lost(why) => {
                tracing::warn!(reason = %why, "bus pub/sub connection lost; reconnecting");
                shared.lock().sink = None;
                resync = true;
            }
        }
    }
    shared.lock().sink = None;
    tracing::debug!("bus subscriber stopped");
}

/// A keepalive PING in flight: `Err` says why the connection is considered lost.
pub(super) type PingFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Reads one connection until it fails. With `resync`, first tells the gateway to backfill.
pub(super) async fn pump(
    sink: PubSubSink,
    mut stream: PubSubStream,
    keys: &Keys,
    events: &mpsc::Sender<BusEvent>,
    shutdown: &CancellationToken,
    mut resync: bool,
) -> PumpEnd {
    let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    keepalive.reset();
    let mut ping: Option<PingFuture> = None;
    let mut dropped: u64 = 0;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return PumpEnd::Stop,
            permit = events.reserve(), if resync => match permit {
                Ok(permit) => {
                    permit.send(BusEvent::Resync);
                    if dropped > 0 {
                        tracing::info!(dropped, "gateway caught up with the bus; resync sent");
                    }
                    resync = false;
                    dropped = 0;
                }
                Err(_) => return PumpEnd::Stop,
            },
            Some(result) = OptionFuture::from(ping.as_mut()), if ping.is_some() => {
                ping = None;
                if let Err(why) = result {
                    return PumpEnd::Lost(why);
                }
            }
            _ = keepalive.tick(), if ping.is_none() => {
                let mut sink = sink.clone();
                ping = Some(Box::pin(async move {
                    match timeout(KEEPALIVE_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(format!("keepalive ping: {e}")),
                        Err(_) => Err("keepalive ping unanswered".to_owned()),
                    }
                }));
            }
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return PumpEnd::Lost("connection closed".to_owned());
                };
                if resync {
                    // Still full: dropped, it is in the hot history; the resync covers it.
                    dropped += 1;
                    continue;
                }
                let frame: MsgFrame = match serde_json::from_slice(msg.get_payload_bytes()) {
                    Ok(f) => f,
                    Err(e) => {
                        let room = keys.room_of_channel(msg.get_channel_name());
                        tracing::error!(%room, error = %e, "undecodable message on the bus; dropped");
                        continue;
                    }
                };
                match events.try_send(BusEvent::Msg(Arc::new(frame))) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let room = keys.room_of_channel(msg.get_channel_name());
                        tracing::warn!(
                            %room,
                            capacity = EVENTS_CAPACITY,
                            "gateway cannot keep up with the bus; dropping live messages until it does, then resync"
                        );
                        resync = true;
                        dropped = 1;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return PumpEnd::Stop,
                }
            }
        }
    }
}
