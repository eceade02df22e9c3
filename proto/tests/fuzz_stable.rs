//! The fuzz targets of `proto/fuzz/` on the stable toolchain, as ordinary tests: each
//! target's body (`proto/fuzz/bodies/<target>.rs`, the same code libFuzzer runs on nightly)
//! over its corpus and then over inputs generated from it, for a bounded time.
//!
//! - Corpus: seeds made here from valid frames (so mutations start close to the
//!   interesting paths), plus every file in `proto/fuzz/corpus/<target>/` (checked-in
//!   hostile inputs, and whatever a nightly `cargo fuzz run` leaves there).
//! - Generated: random mutations of corpus inputs (bit flips, byte sets, inserted and
//!   deleted runs, repeated runs, splices of two inputs, boundary integers), and plain
//!   random bytes.
//! - Budget: `DTFED_FUZZ_SECS` per target (default 4) and at least 2,000 inputs.
//!   `DTFED_FUZZ_SEED` fixes the generator's seed; a failure prints the seed and the input
//!   (hex) and writes the input to `$TMPDIR/dtfed-fuzz-<target>-<seed>.bin`, to replay with
//!   `cargo +nightly fuzz run <target> <file>` or this test under that seed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dtfed_proto::client::{decode_client_frame, encode_client_frame};
use dtfed_proto::link::codec::encode;
use dtfed_proto::link::{LinkFrame, LinkRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../fuzz/bodies/client_frame.rs"]
mod client_frame;
#[path = "../fuzz/bodies/link_frame.rs"]
mod link_frame;
#[path = "../fuzz/bodies/link_session.rs"]
mod link_session;
#[path = "../fuzz/bodies/stomp_frame.rs"]
mod stomp_frame;

const MIN_INPUTS: u64 = 2_000;
const MAX_INPUT_BYTES: usize = 64 * 1024;

fn budget() -> Duration {
    let secs = std::env::var("DTFED_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(4.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn seed() -> u64 {
    std::env::var("DTFED_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// Files of `proto/fuzz/corpus/<target>/`, if any.
fn corpus_files(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/{target}"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Runs `body` over `seeds`, the corpus files and generated inputs; panics with a
/// reproducible report on the first input that fails.
fn fuzz(target: &str, body: fn(&[u8]), seeds: Vec<Vec<u8>>) {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut corpus = seeds;
    corpus.extend(corpus_files(target));
    assert!(!corpus.is_empty());
    let started = Instant::now();
    let budget = budget();
    let mut runs = 0u64;
    let check = |input: &[u8], runs: u64| {
        if catch_unwind(AssertUnwindSafe(|| body(input))).is_err() {
            let file = std::env::temp_dir().join(format!("dtfed-fuzz-{target}-{seed}.bin"));
            let _ = std::fs::write(&file, input);
            let hex: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
            panic!(
                "{target}: input #{runs} fails (DTFED_FUZZ_SEED={seed}; written to {}): {} bytes, hex {hex}{}",
                file.display(),
                input.len(),
                if input.len() > 512 { "..." } else { "" }
            );
        }
    };
    for input in &corpus {
        check(input, runs);
        runs += 1;
    }
    while runs < MIN_INPUTS || started.elapsed() < budget {
        let input: Vec<u8> = if rng.random_ratio(1, 16) {
            let len = rng.random_range(0..512);
            (0..len).map(|_| rng.random()).collect()
        } else {
            let base = &corpus[rng.random_range(0..corpus.len())];
            let other = &corpus[rng.random_range(0..corpus.len())];
            mutate(&mut rng, base, other)
        };
        check(&input, runs);
        runs += 1;
    }
    eprintln!(
        "{target}: {runs} inputs in {:.1?} (DTFED_FUZZ_SEED={seed})",
        started.elapsed()
    );
}

/// A few random edits of `base` (sometimes spliced with `other`).
fn mutate(rng: &mut StdRng, base: &[u8], other: &[u8]) -> Vec<u8> {
    const BOUNDARIES: [i64; 8] = [0, -1, 1, i64::MAX, i64::MIN, i32::MAX as i64, 255, 65_536];
    let mut out = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 64));
                out.drain(i..j);
            }
            4 if !other.is_empty() => {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            5 if len >= 8 => {
                let i = rng.random_range(0..=len - 8);
                let v = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())];
                out[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ if len > 1 => {
                // Repeat a run: long arrays, deep nesting, many frames.
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 32));
                let run = out[i..j].to_vec();
                for _ in 0..rng.random_range(1..8) {
                    out.splice(i..i, run.iter().copied());
                }
            }
            _ => out.push(rng.random()),
        }
    }
    out.truncate(MAX_INPUT_BYTES);
    out
}

fn link_bytes(frames: &[LinkFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(f, &mut out).expect("a seed frame encodes");
    }
    out
}

fn link_seed_frames() -> Vec<LinkFrame> {
    let record = |offset: i64| LinkRecord {
        offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        key: b"tavern".to_vec(),
        headers: vec![("dtfed-origin".into(), b"seoul".to_vec())],
        value: br#"{"from":"ann","body":{"text":"hi"}}"#.to_vec(),
    };
    vec![
        LinkFrame::hello("seoul"),
        LinkFrame::Subscribe {
            topic: "dtfed.local".into(),
            partition: 3,
            from_offset: 100,
        },
        LinkFrame::Batch {
            partition: 3,
            records: vec![record(100), record(101), record(102)],
            high_watermark: 103,
        },
        LinkFrame::Batch {
            partition: 3,
            records: vec![],
            high_watermark: 110,
        },
        LinkFrame::Progress {
            partition: 3,
            next_offset: 103,
        },
        LinkFrame::Heartbeat { now_ms: 5_000 },
    ]
}

#[test]
fn client_frame_survives_hostile_text() {
    let mut seeds: Vec<Vec<u8>> = [
        r#"{"op":"sub","room":"tavern"}"#,
        r#"{"op":"sub","room":"tavern","since":{"seoul":41,"tokyo":7}}"#,
        r#"{"op":"sub","room":"tavern","since":{}}"#,
        r#"{"op":"unsub","room":"tavern"}"#,
        r#"{"op":"pub","room":"tavern","ref":"r1","body":{"text":"hi","dice":[1,6]}}"#,
        r#"{"op":"ping"}"#,
        r#"{"op":"msg","room":"tavern","origin":"seoul","offset":3,"from":"ann","ts":1,"body":{}}"#,
        r#"{"op":"error","code":"bad_frame","message":"x"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // The same frames as the encoder writes them.
    for text in seeds.clone() {
        if let Ok(frame) = decode_client_frame(std::str::from_utf8(&text).unwrap_or("")) {
            seeds.push(encode_client_frame(&frame).into_bytes());
        }
    }
    fuzz("client_frame", client_frame::run, seeds);
}

#[test]
fn stomp_frame_decoder_survives_hostile_bytes() {
    let seeds = [
        "CONNECT\naccept-version:1.0,1.1,1.2\nhost:x\nlogin:ann\nheart-beat:10000,10000\n\n\0",
        "SUBSCRIBE\r\nid:0\r\ndestination:/sub/chat/room/1\r\ndtfed-since:{\"seoul\"\\c4}\r\n\r\n\0\n",
        "SEND\ndestination:/pub/chat/room/1\ncontent-type:application/json\ncontent-length:9\n\n{\"t\":\"\0\"}\0",
        "SEND\ndestination:/pub/chat/room/1\nreceipt:r-1\na\\cb:c\\nd\\\\\n\nhello\0\n\nDISCONNECT\nreceipt:77\n\n\0",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("stomp_frame", stomp_frame::run, seeds);
}

#[test]
fn link_frame_decoder_survives_hostile_bytes() {
    let frames = link_seed_frames();
    let mut seeds = Vec::new();
    for chunk in [1u8, 7, 64, 255] {
        let mut s = vec![chunk];
        s.extend(link_bytes(&frames));
        seeds.push(s);
    }
    fuzz("link_frame", link_frame::run, seeds);
}

#[test]
fn link_sessions_survive_a_hostile_peer() {
    let frames = link_seed_frames();
    let mut seeds = Vec::new();
    for head in [0u8, 1, 3, 7, 7 | (4 << 3), 7 | (40 << 3)] {
        let mut s = vec![head];
        s.extend(link_bytes(&frames));
        seeds.push(s);
        let mut s = vec![head];
        s.extend(link_bytes(&frames[2..]));
        seeds.push(s);
    }
    fuzz("link_session", link_session::run, seeds);
}

#[test]
fn the_runner_reports_a_planted_bug_with_its_seed() {
    fn planted(data: &[u8]) {
        assert!(!data.contains(&0), "planted: a zero byte");
    }
    let report = catch_unwind(|| fuzz("planted", planted, vec![b"no zero here".to_vec()]))
        .expect_err("the generator makes a zero byte within its budget");
    let text = report.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        text.contains("planted: input #") && text.contains("DTFED_FUZZ_SEED="),
        "{text}"
    );
}
