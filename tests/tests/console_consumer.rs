//! Kafka's own console consumer (`kafka-console-consumer.sh`, i.e.
//! `org.apache.kafka.tools.consumer.ConsoleConsumer` from the fetched Kafka jars) reads a
//! region's local topic as any other consumer group would (a database writer, analytics):
//! the key is the room, the value is JSON `{"from","ts","body"}`, and the dtfed headers say
//! where the message came from (`docs/OPERATIONS.md`, "Consuming the log").

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use dtfed_tests::harness::sys::spawn;
use dtfed_tests::harness::util::deploy_script;
use dtfed_tests::{ConfigBuilder, DtfedProcess, KafkaBroker, TestDir, WsClient};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// One record as the console consumer prints it with keys and headers.
#[derive(Debug)]
struct Printed {
    headers: HashMap<String, String>,
    key: String,
    value: Value,
}

/// Runs Kafka's console consumer on `topic` from the beginning until it has `n` records
/// (or its own timeout), and parses what it printed: `headers \t key \t value` per line.
fn console_consume(bootstrap: &str, topic: &str, n: usize) -> Result<Vec<Printed>> {
    let classpath = Command::new("bash")
        .arg(deploy_script("kafka.sh")?)
        .arg("classpath")
        .output()
        .context("deploy/kafka.sh classpath")?;
    anyhow::ensure!(
        classpath.status.success(),
        "deploy/kafka.sh classpath failed"
    );
    let classpath = String::from_utf8_lossy(&classpath.stdout).trim().to_owned();
    let dir = TestDir::new("console-consumer")?;
    let out_path = dir.path().join("out.txt");
    let err_path = dir.path().join("err.txt");
    let mut cmd = Command::new("java");
    cmd.args([
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseSerialGC",
        "-cp",
        &classpath,
    ])
    .arg("org.apache.kafka.tools.consumer.ConsoleConsumer")
    .args(["--bootstrap-server", bootstrap, "--topic", topic])
    .args(["--from-beginning", "--max-messages", &n.to_string()])
    .args(["--timeout-ms", "30000"])
    .args(["--formatter-property", "print.key=true"])
    .args(["--formatter-property", "print.headers=true"])
    .args(["--formatter-property", "key.separator=\t"])
    .args(["--formatter-property", "headers.separator=\t"])
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out_path)?)
    .stderr(std::fs::File::create(&err_path)?);
    let mut proc = spawn(cmd, "kafka-console-consumer")?;
    let status = proc
        .wait_timeout(Duration::from_secs(90))?
        .context("the console consumer did not finish within 90 s")?;
    let out = std::fs::read_to_string(&out_path)?;
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    anyhow::ensure!(status.success(), "console consumer: {status}\n{err}");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            // headers (tab separated), then the key, then the value: the value and the key
            // are the last two fields.
            let fields: Vec<&str> = line.split('\t').collect();
            anyhow::ensure!(fields.len() >= 3, "not headers, key, value: {line:?}");
            let value = serde_json::from_str(fields[fields.len() - 1])
                .with_context(|| format!("the value is JSON: {line:?}"))?;
            let key = fields[fields.len() - 2].to_owned();
            let headers = fields[..fields.len() - 2]
                .iter()
                .map(|h| {
                    // The formatter's default: `key:value`.
                    let (k, v) = h.split_once(':').unwrap_or((h, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            Ok(Printed {
                headers,
                key,
                value,
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafkas_console_consumer_reads_room_keys_json_values_and_dtfed_headers() -> Result<()> {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::shared).await??;
    let cfg = ConfigBuilder::shared("console", "seoul")?.partitions(2);
    let topic = cfg.local_topic();
    let toml = cfg.build();
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&toml)).await??;
    let mut ann = WsClient::connect(&d.ws_url_as("ann")).await?;
    let mut bob = WsClient::connect(&d.ws_url_as("bob")).await?;
    let mut sent = Vec::new();
    for (who, room, body) in [
        ("ann", "tavern", json!({"text": "a round for everyone"})),
        (
            "bob",
            "tavern",
            json!({"text": "make it two", "dice": [3, 5]}),
        ),
        ("ann", "cellar", json!("plain string body")),
    ] {
        let client = if who == "ann" { &mut ann } else { &mut bob };
        let ack = client.publish(room, body.clone(), T).await?;
        sent.push((who, room, body, ack["offset"].as_i64().context("offset")?));
    }
    let bootstrap = kafka.bootstrap();
    let printed =
        tokio::task::spawn_blocking(move || console_consume(&bootstrap, &topic, 3)).await??;
    assert_eq!(printed.len(), 3, "{printed:#?}");
    for (who, room, body, _offset) in &sent {
        let p = printed
            .iter()
            .find(|p| p.value["body"] == *body)
            .with_context(|| format!("{body} not consumed: {printed:#?}"))?;
        assert_eq!(p.key, *room, "the key is the room: {p:?}");
        assert_eq!(p.value["from"], *who, "{p:?}");
        assert!(p.value["ts"].as_i64().is_some_and(|ts| ts > 0), "{p:?}");
        assert_eq!(
            p.headers.get("dtfed-origin").map(String::as_str),
            Some("seoul"),
            "{p:?}"
        );
        assert_eq!(
            p.headers.get("dtfed-from").map(String::as_str),
            Some(*who),
            "{p:?}"
        );
        assert_eq!(
            p.headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "{p:?}"
        );
        // The harness's publish carries a ref: the retry check's header.
        assert!(
            p.headers.get("dtfed-ref").is_some_and(|r| !r.is_empty()),
            "{p:?}"
        );
    }
    Ok(())
}
