//! Region link sessions: frames decoded from arbitrary bytes into a `MirrorPull` (and the
//! same frames into a `MirrorServe` and a `MirrorDescribe`), with time moving on. Nothing may panic, and whatever
//! the peer sends, the pull side delivers offsets that strictly increase from `resume_from`.
//!
//! The first byte chooses a head start so the fuzzer need not find the handshake bytes:
//! bit 0 gives the pull side a valid origin Hello, bit 1 gives the serve side a valid
//! receiver Hello, bit 2 also a valid Subscribe.
//!
//! The body of the `link_session` fuzz target, shared by the libFuzzer target
//! (`fuzz_targets/link_session.rs`, nightly) and the stable-toolchain run over the corpus and
//! generated inputs (`proto/tests/fuzz_stable.rs`, part of the test suite).

use std::time::Duration;

use dtfed_proto::link::{
    FrameDecoder, LinkFrame, MirrorDescribe, MirrorPull, MirrorServe, PullConfig, PullEvent,
    ServeConfig, ServeEvent, StreamQuestion,
};

const RESUME_FROM: i64 = 100;

/// One input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Some((&head, bytes)) = data.split_first() else {
        return;
    };
    let mut now = Duration::ZERO;
    let mut pull = MirrorPull::new(
        PullConfig::new("tokyo", "seoul", "dtfed.local", 3, RESUME_FROM),
        now,
    );
    let mut serve = MirrorServe::new(ServeConfig::new("seoul", "dtfed.local"), now);
    // The frames also go to a describe exchange: it may refuse them, never panic.
    let mut describe = MirrorDescribe::new("tokyo", "seoul", "dtfed.local");
    let mut frames = Vec::new();
    if head & 1 != 0 {
        let _ = pull.handle_frame(now, LinkFrame::hello("seoul"));
    }
    if head & 2 != 0 {
        let _ = serve.handle_frame(now, LinkFrame::hello("tokyo"));
    }
    if head & 4 != 0 {
        let _ = serve.handle_frame(
            now,
            LinkFrame::Subscribe {
                topic: "dtfed.local".into(),
                partition: 3,
                from_offset: RESUME_FROM,
            },
        );
    }
    let mut dec = FrameDecoder::new();
    dec.extend(bytes);
    while let Ok(Some(f)) = dec.next_frame() {
        frames.push(f);
    }

    let mut next = RESUME_FROM;
    for frame in frames {
        now += Duration::from_millis(u64::from(head >> 3) * 250);
        pull.handle_timeout(now);
        serve.handle_timeout(now);
        let was_closed = pull.is_closed();
        let res = pull.handle_frame(now, frame.clone());
        if was_closed {
            assert!(res.is_err());
        }
        while let Some(ev) = pull.poll_event() {
            match ev {
                PullEvent::Records(records) => {
                    assert!(!records.is_empty());
                    for r in &records {
                        assert!(r.offset >= next, "{} after {next}", r.offset);
                        next = r.offset + 1;
                    }
                    pull.handle_written(next);
                }
                PullEvent::Gap { from, to } => {
                    assert!(from == next && to >= from);
                    next = to + 1;
                }
                _ => {}
            }
        }
        while pull.poll_transmit().is_some() {}
        assert_eq!(pull.next_offset(), next);

        if let LinkFrame::Batch {
            records,
            high_watermark,
            ..
        } = &frame
        {
            let _ = serve.queue_records(records.clone(), *high_watermark);
        }
        let _ = describe.handle_frame(frame.clone());
        let _ = serve.handle_frame(now, frame);
        while let Some(ev) = serve.poll_event() {
            if matches!(ev, ServeEvent::Describe { .. }) {
                assert!(serve.describe(4).is_ok());
            }
        }
        while serve.poll_transmit().is_some() {}
        assert!(serve.is_closed() || serve.queued_bytes() == 0);
    }
}
