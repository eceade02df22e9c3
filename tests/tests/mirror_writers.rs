//! One writer per mirror partition, on a real broker: a daemon that takes a mirror task
//! over fences the writer before it, so a daemon stopped past its group session timeout
//! (SIGSTOP) and running again cannot write origin offsets a second time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed::config::KafkaConfig;
use dtfed::kafka::ensure_topic;
use dtfed::mirror::mirror_topic;
use dtfed::mirror::sink::KafkaMirrorLog;
use dtfed_proto::link::LinkRecord;
use dtfed_proto::record::{LogValue, HEADER_FROM, HEADER_ORIGIN, HEADER_ORIGIN_OFFSET};
use dtfed_proto::RoomId;
use dtfed_regions::mirror::log::MirrorLog;
use dtfed_tests::harness::sys::send_signal;
use dtfed_tests::harness::{DrillProcess, Federation, FederationSpec};
use dtfed_tests::{KafkaBroker, TestDir};
use rdkafka::config::FromClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// The origin offsets of the committed records of `topic`/`partition`, in mirror order.
fn committed_origin_offsets(brokers: &str, topic: &str, partition: i32) -> Result<Vec<i64>> {
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", "committed-origin-offsets")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false");
    let c: BaseConsumer = BaseConsumer::from_config(&cc)?;
    let (_, high) = c.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Until the position passes the high watermark (commit markers are never returned).
    loop {
        let position = c
            .position()?
            .find_partition(topic, partition)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(0);
        if position >= high || Instant::now() >= deadline {
            break;
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let o = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == HEADER_ORIGIN_OFFSET)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    })
                    .context("a mirror record without its origin offset")?;
                out.push(o);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

fn link(offset: i64, room: &RoomId) -> LinkRecord {
    let v = LogValue {
        from: "ann".into(),
        ts: 1_700_000_000_000 + offset,
        body: dtfed_proto::client::Body::from_json(&format!("{{\"n\":{offset}}}")).expect("json"),
    };
    LinkRecord {
        offset,
        timestamp_ms: v.ts,
        key: room.as_str().as_bytes().to_vec(),
        headers: vec![
            (HEADER_ORIGIN.to_owned(), b"tokyo".to_vec()),
            (HEADER_FROM.to_owned(), b"ann".to_vec()),
        ],
        value: v.to_json().into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_partition_has_one_writer_at_a_time() -> Result<()> {
    let broker = KafkaBroker::shared()?;
    let origin = format!("tokyo{}", dtfed_tests::harness::util::random_suffix(4));
    let cfg = KafkaConfig {
        brokers: broker.bootstrap(),
        ..KafkaConfig::default()
    };
    ensure_topic(&cfg, &mirror_topic(&origin), 1).await?;
    // Two daemons of one region, one mirror task.
    let a = KafkaMirrorLog::with_node(&cfg, "seoul", "a")?;
    let b = KafkaMirrorLog::with_node(&cfg, "seoul", "b")?;
    let room = RoomId::parse("hall").expect("room");
    let recs: Vec<LinkRecord> = (0..10).map(|o| link(o, &room)).collect();
    assert_eq!(a.tail(&origin, 0).await?, None);
    a.append(&origin, 0, &recs[..5]).await?;
    // b takes the task over (a was stopped past its session timeout) and reads the tail.
    assert_eq!(b.tail(&origin, 0).await?, Some(4));
    // a runs again and, not knowing yet, appends what it had next: refused, and nothing of
    // it becomes visible.
    assert!(a.append(&origin, 0, &recs[5..]).await.is_err());
    b.append(&origin, 0, &recs[5..]).await?;
    assert_eq!(b.tail(&origin, 0).await?, Some(9));
    let (brokers, topic) = (cfg.brokers.clone(), mirror_topic(&origin));
    let written =
        tokio::task::spawn_blocking(move || committed_origin_offsets(&brokers, &topic, 0))
            .await??;
    assert_eq!(
        written,
        (0..10).collect::<Vec<i64>>(),
        "each origin offset once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_past_its_session_timeout_writes_nothing_twice() -> Result<()> {
    let dir = TestDir::new("sigstop")?;
    // tokyo's two daemons share the mirror tasks of seoul's partitions.
    let fed = Federation::start(FederationSpec::new("sigstop", &["seoul", "tokyo"], 2)).await?;
    let topology = dir.path().join("topology.toml");
    fed.write_topology(&topology)?;
    let run = DrillProcess::start(
        &topology,
        &[
            "--fault",
            "none",
            "--rooms",
            "20",
            "--rate",
            "100",
            "--duration",
            "30",
            "--converge-timeout",
            "90",
        ],
    )?;
    // Both of tokyo's daemons in turn: stopped well past the 4 s session timeout (their
    // tasks move to the other), then running again with appends in hand.
    for i in [0, 1] {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let pid = fed.region("tokyo").daemons[i].pid() as i32;
        send_signal(pid, libc::SIGSTOP)?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        send_signal(pid, libc::SIGCONT)?;
    }
    let outcome =
        tokio::task::spawn_blocking(move || run.finish(Duration::from_secs(200))).await??;
    assert_eq!(outcome.exit_code, 0, "{}", outcome.output);
    for key in ["lost", "duplicated", "reordered"] {
        assert_eq!(outcome.report[key], 0, "{key}: {}", outcome.output);
    }
    // tokyo's mirror of seoul: every origin offset once, in order, in every partition.
    let brokers = fed.region("tokyo").kafka.bootstrap();
    for p in 0..4 {
        let b = brokers.clone();
        let written = tokio::task::spawn_blocking(move || {
            committed_origin_offsets(&b, &mirror_topic("seoul"), p)
        })
        .await??;
        assert!(!written.is_empty(), "partition {p} mirrored nothing");
        for w in written.windows(2) {
            assert!(
                w[0] < w[1],
                "partition {p}: origin offset {} written again after {}",
                w[1],
                w[0]
            );
        }
    }
    Ok(())
}
