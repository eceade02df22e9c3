//! A [`Bus`] for tests of the fan-out: it records every successful apply, in call order,
//! and can fail the first N calls; nothing else (no history, no subscriptions, no
//! watermarks).
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dtfed::bus::{Bus, BusError, PartitionMark, PublishClaim, PublishKey, PublishOutcome};
use dtfed_proto::{Cursor, LogRecord, MsgFrame, OriginMark, RoomId};

/// Records every successful apply, in call order; fails the first `fail_first` calls.
#[derive(Default)]
pub struct FakeBus {
    pub applied: Mutex<Vec<LogRecord>>,
    pub fail_first: AtomicUsize,
    pub failures: AtomicUsize,
}

impl FakeBus {
    pub fn failing(n: usize) -> Arc<FakeBus> {
        Arc::new(FakeBus {
            fail_first: AtomicUsize::new(n),
            ..FakeBus::default()
        })
    }

    pub fn applied(&self) -> Vec<LogRecord> {
        self.applied.lock().expect("lock").clone()
    }

    pub fn len(&self) -> usize {
        self.applied.lock().expect("lock").len()
    }
}

#[async_trait]
impl Bus for FakeBus {
    async fn apply(&self, rec: &LogRecord) -> Result<Option<MsgFrame>, BusError> {
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(BusError::Redis("injected failure".into()));
        }
        self.applied.lock().expect("lock").push(rec.clone());
        Ok(Some(rec.to_msg(None)))
    }

    async fn history(&self, _room: &RoomId) -> Result<Vec<MsgFrame>, BusError> {
        Ok(Vec::new())
    }

    async fn tails(&self, _room: &RoomId) -> Result<Cursor, BusError> {
        Ok(Cursor::default())
    }

    async fn subscribe(&self, _room: &RoomId) -> Result<(), BusError> {
        Ok(())
    }

    async fn unsubscribe(&self, _room: &RoomId) -> Result<(), BusError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn claim_publish(
        &self,
        _key: &PublishKey,
        _now_ms: i64,
        _stale_ms: i64,
        _window_ms: i64,
    ) -> Result<PublishClaim, BusError> {
        Ok(PublishClaim::Fresh)
    }

    async fn settle_publish(
        &self,
        _key: &PublishKey,
        _outcome: PublishOutcome,
        _window_ms: i64,
    ) -> Result<(), BusError> {
        Ok(())
    }

    async fn put_watermarks(&self, _marks: &[PartitionMark], _ttl_ms: i64) -> Result<(), BusError> {
        Ok(())
    }

    async fn watermarks(
        &self,
        keys: &[(String, i32)],
    ) -> Result<Vec<Option<OriginMark>>, BusError> {
        Ok(vec![None; keys.len()])
    }
}
