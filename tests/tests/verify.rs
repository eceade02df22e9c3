//! `dtfed verify` as an operator runs it, on three regions (Kafka, Redis and `dtfed` each,
//! mirroring over QUIC): it reports agreement on a healthy federation, and after one
//! region's mirror was made to hold another record than the origin at one origin offset,
//! it names that region, the origin and the offset, and exits non-zero. Meanwhile the
//! daemons' background check (every second here) compares their mirror partitions with
//! the origins over the link: matches first, then a mismatch in that region's `/metrics`
//! and the offset in its log.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_proto::record::now_ms;
use dtfed_tests::harness::{Federation, FederationSpec};
use dtfed_tests::{DtfedProcess, TestDir, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = dtfed_tests::harness::federation::ADMIN_TOKEN;
const ROOM: &str = "campaign-7";

/// `dtfed verify --json`: its exit code, its stdout, and the report (its last line).
fn verify(topology: &Path) -> Result<(i32, String, Value)> {
    let out = Command::new(DtfedProcess::binary()?)
        .args(["verify", "--room", ROOM, "--json", "--topology"])
        .arg(topology)
        .output()
        .context("running dtfed verify")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    Ok((code, format!("{stdout}\n--- stderr\n{stderr}"), report))
}

/// What `region`'s first daemon holds of `origin` for the room: `(partition, end)`.
fn held(fed: &Federation, region: &str, origin: &str) -> Result<(i32, i64)> {
    let r = fed.region(region).daemons[0]
        .admin_get(&format!("/admin/rooms/{ROOM}/watermarks"), Some(TOKEN))?;
    anyhow::ensure!(r.status == 200, "{region}: {} {}", r.status, r.body);
    let w: Value = serde_json::from_str(&r.body)?;
    let o = w["origins"]
        .as_array()
        .and_then(|os| os.iter().find(|o| o["origin"] == origin))
        .with_context(|| format!("{region} holds no {origin}: {w}"))?;
    Ok((
        o["partition"].as_i64().context("partition")? as i32,
        o["end"].as_i64().context("end")?,
    ))
}

async fn wait_held(fed: &Federation, region: &str, origin: &str, end: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = tokio::task::block_in_place(|| held(fed, region, origin));
        match now {
            Ok((_, e)) if e >= end => return Ok(()),
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "{region} does not hold {origin} up to {end}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `dtfed_mirror_digest_checks_total` of `origin` with `result`, in `region`'s `/metrics`.
fn checks(fed: &Federation, region: &str, origin: &str, result: &str) -> Result<u64> {
    let r = fed.region(region).daemons[0].admin_get("/metrics", Some(TOKEN))?;
    anyhow::ensure!(r.status == 200, "{region}: {} {}", r.status, r.body);
    let (origin, result) = (
        format!("origin=\"{origin}\""),
        format!("result=\"{result}\""),
    );
    Ok(r.body
        .lines()
        .filter(|l| l.starts_with("dtfed_mirror_digest_checks_total{"))
        .filter(|l| l.contains(&origin) && l.contains(&result))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Waits until `region` counted a check of `origin` with `result`.
async fn wait_check(fed: &Federation, region: &str, origin: &str, result: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let n = tokio::task::block_in_place(|| checks(fed, region, origin, result))?;
        if n > 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{region} counted no {result} check of {origin}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes the records of `topic`/`partition` below `before` (as retention would).
async fn delete_records_before(brokers: &str, topic: &str, partition: i32, before: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))
        .expect("partition list");
    let res = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
    for e in res.elements() {
        assert!(e.error().is_ok(), "{:?}", e.error());
    }
    tokio::task::spawn_blocking(move || drop(admin))
        .await
        .expect("admin dropped");
}

async fn publish(url: &str, n: usize, tag: &str) -> Result<Vec<i64>> {
    let mut c = WsClient::connect(url).await?;
    let mut offsets = Vec::new();
    for i in 0..n {
        let ack = c
            .publish(ROOM, json!({"text": format!("{tag} {i}")}), T)
            .await?;
        offsets.push(ack["offset"].as_i64().context("ack offset")?);
    }
    c.close().await;
    Ok(offsets)
}

/// Writes into `topic` of `brokers`, at `partition`, a chat message of the room as the
/// mirror sink writes seoul's record at `origin_offset` — with a value seoul never had.
async fn forge_mirror_record(brokers: &str, topic: &str, partition: i32, origin_offset: i64) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let value = json!({"from": "mallory", "ts": now_ms(), "body": {"text": "forged"}}).to_string();
    let (offset, ts) = (origin_offset.to_string(), now_ms().to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "dtfed-from",
            value: Some("mallory"),
        })
        .insert(Header {
            key: "dtfed-origin",
            value: Some("seoul"),
        })
        .insert(Header {
            key: "dtfed-origin-offset",
            value: Some(&offset),
        })
        .insert(Header {
            key: "dtfed-origin-ts",
            value: Some(&ts),
        });
    producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(ROOM)
                .payload(&value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("forged mirror record written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_agrees_then_names_the_region_and_offset_that_diverge() -> Result<()> {
    let dir = TestDir::new("verify")?;
    let topology = dir.path().join("topology.toml");
    let mut spec = FederationSpec::new("verify", &["seoul", "tokyo", "frankfurt"], 1);
    spec.extra_config = "[federation]\nverify_every_secs = 1\n".into();
    let mut fed = Federation::start(spec).await?;
    fed.write_topology(&topology)?;

    // Every region publishes into the room; every region then holds every origin's records.
    let mut ends = Vec::new();
    for r in ["seoul", "tokyo", "frankfurt"] {
        let offsets = publish(&fed.region(r).ws(0, "bard"), 5, r).await?;
        ends.push((r, offsets.last().copied().unwrap_or(0) + 1));
    }
    for holder in ["seoul", "tokyo", "frankfurt"] {
        for (origin, end) in &ends {
            wait_held(&fed, holder, origin, *end).await?;
        }
    }
    let (code, out, report) = tokio::task::block_in_place(|| verify(&topology))?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["diverged"], false, "{out}");
    let origins = report["origins"].as_array().context("origins")?;
    assert_eq!(origins.len(), 3, "{out}");
    for o in origins {
        assert_eq!(o["count"], 5, "{out}");
        assert_eq!(o["agree"].as_array().map(Vec::len), Some(3), "{out}");
    }
    assert!(out.contains("every region holds the same records"), "{out}");
    // The background check agrees.
    for (holder, origin) in [
        ("tokyo", "seoul"),
        ("frankfurt", "seoul"),
        ("seoul", "tokyo"),
    ] {
        wait_check(&fed, holder, origin, "match").await?;
    }

    // Retention deletes seoul's first records of the room from seoul's own log; tokyo and
    // frankfurt still hold them. Not a divergence: the checks compare what every side
    // still holds.
    let (partition, _) = tokio::task::block_in_place(|| held(&fed, "seoul", "seoul"))?;
    let matched = tokio::task::block_in_place(|| checks(&fed, "tokyo", "seoul", "match"))?;
    delete_records_before(
        &fed.region("seoul").kafka.bootstrap(),
        &fed.region("seoul").cfg.local_topic(),
        partition,
        2,
    )
    .await;
    let (code, out, report) = tokio::task::block_in_place(|| verify(&topology))?;
    assert_eq!(code, 0, "{out}");
    let seoul = report["origins"]
        .as_array()
        .and_then(|os| os.iter().find(|o| o["origin"] == "seoul"))
        .context("origin seoul in the report")?;
    assert_eq!(
        (&seoul["from"], &seoul["count"]),
        (&json!(2), &json!(3)),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(45);
    while tokio::task::block_in_place(|| checks(&fed, "tokyo", "seoul", "match"))? < matched + 2 {
        let n = tokio::task::block_in_place(|| checks(&fed, "tokyo", "seoul", "mismatch"))?;
        assert_eq!(n, 0, "tokyo took seoul's retention for a divergence");
        anyhow::ensure!(Instant::now() < deadline, "tokyo did not check seoul again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Bad requests are refused and say why.
    let d = &fed.region("seoul").daemons[0];
    let digest = |q: &str, token: Option<&str>| {
        tokio::task::block_in_place(|| {
            d.admin_get(&format!("/admin/rooms/{ROOM}/digest?{q}"), token)
        })
    };
    let r = digest("origin=seoul&from=0&to=5", None)?;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = digest("origin=seoul&from=x&to=5", Some(TOKEN))?;
    assert_eq!(
        (r.status, r.body.contains("from")),
        (400, true),
        "{}",
        r.body
    );
    let r = digest("origin=seoul&from=6&to=5", Some(TOKEN))?;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = digest("origin=paris&from=0&to=5", Some(TOKEN))?;
    assert_eq!(
        (r.status, r.body.contains("paris")),
        (404, true),
        "{}",
        r.body
    );
    let r = tokio::task::block_in_place(|| {
        d.admin_get("/admin/rooms/bad$room/watermarks", Some(TOKEN))
    })?;
    assert_eq!(r.status, 400, "{}", r.body);

    // Tokyo's daemon is down; someone writes into its mirror of seoul, at the room's
    // partition, a record for seoul's next offset that seoul will not have.
    let (partition, next) = tokio::task::block_in_place(|| held(&fed, "seoul", "seoul"))?;
    {
        let d = &mut fed.region_mut("tokyo").daemons[0];
        tokio::task::block_in_place(|| d.terminate())?;
    }
    let tokyo_kafka = fed.region("tokyo").kafka.bootstrap();
    forge_mirror_record(&tokyo_kafka, "dtfed.mirror.seoul", partition, next).await;
    // Seoul's real message takes that offset; tokyo, back, resumes after its last mirrored
    // origin offset — the forged one — and mirrors the next one as usual.
    let real = publish(&fed.region("seoul").ws(0, "bard"), 1, "real").await?;
    assert_eq!(real, vec![next]);
    {
        let d = &mut fed.region_mut("tokyo").daemons[0];
        tokio::task::block_in_place(|| d.restart())?;
    }
    let after = publish(&fed.region("seoul").ws(0, "bard"), 1, "after").await?;
    for holder in ["tokyo", "frankfurt"] {
        wait_held(&fed, holder, "seoul", after[0] + 1).await?;
    }

    let (code, out, report) = tokio::task::block_in_place(|| verify(&topology))?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(report["diverged"], true, "{out}");
    let seoul = report["origins"]
        .as_array()
        .and_then(|os| os.iter().find(|o| o["origin"] == "seoul"))
        .context("origin seoul in the report")?;
    assert_eq!(seoul["agree"], json!(["frankfurt", "seoul"]), "{out}");
    assert_eq!(
        seoul["differ"],
        json!([{
            "region": "tokyo",
            "reference": "seoul",
            "first_differing_offset": next,
            "count": 5,
            "reference_count": 5,
        }]),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "tokyo differs from seoul at origin offset {next} of seoul"
        )),
        "{out}"
    );
    // Tokyo's background check finds it too, and logs where.
    wait_check(&fed, "tokyo", "seoul", "mismatch").await?;
    let log = fed.region("tokyo").daemons[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("mirror differs from the origin")
                && l.contains(&format!("first_differing_offset={next}"))),
        "no mismatch line naming offset {next} in tokyo's log"
    );
    for (holder, origin) in [
        ("frankfurt", "seoul"),
        ("seoul", "tokyo"),
        ("tokyo", "frankfurt"),
    ] {
        let n = tokio::task::block_in_place(|| checks(&fed, holder, origin, "mismatch"))?;
        assert_eq!(n, 0, "{holder} found a mismatch with {origin}");
    }
    // The other origins still agree everywhere.
    for o in report["origins"].as_array().context("origins")? {
        if o["origin"] != "seoul" {
            assert_eq!(o["differ"], json!([]), "{out}");
        }
    }

    // A region that does not answer: the check could not run, which is not a verdict.
    {
        let d = &mut fed.region_mut("frankfurt").daemons[0];
        tokio::task::block_in_place(|| d.terminate())?;
    }
    let (code, out, report) = tokio::task::block_in_place(|| verify(&topology))?;
    assert_eq!(code, 2, "{out}");
    assert_eq!(report, Value::Null, "{out}");
    assert!(out.contains("dtfed verify: frankfurt"), "{out}");
    Ok(())
}
