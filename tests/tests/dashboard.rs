//! `deploy/grafana/dtfed.json` against a real federated pair (real Kafka, Redis, QUIC): every
//! metric a panel's PromQL names must be in the daemons' `/metrics`, so the dashboard never
//! shows an empty panel because a metric was renamed or never existed.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use dtfed_tests::harness::federation::ADMIN_TOKEN;
use dtfed_tests::harness::util::repo_root;
use dtfed_tests::harness::{Federation, FederationSpec};
use dtfed_tests::WsClient;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("dtfed_") => out.push(s.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| expressions(i, out)),
        _ => {}
    }
}

/// The metric names an expression uses: identifiers starting with `dtfed_` (label names
/// and values never do in this dashboard; a string literal would be skipped with quotes).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_string = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            word.clear();
            continue;
        }
        if !in_string && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("dtfed_") {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

/// The sample names of an exposition, and the families declared histograms.
fn exposition(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some("histogram")) = (parts.next(), parts.next()) {
                histograms.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    (samples, histograms)
}

#[test]
fn names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(dtfed_publish_latency_seconds_bucket{region=~"dtfed_x"}[5m]))) / dtfed_connections"#,
    );
    let want: BTreeSet<String> = ["dtfed_publish_latency_seconds_bucket", "dtfed_connections"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    let (samples, histograms) = exposition(
        "# TYPE dtfed_h histogram\ndtfed_h_bucket{le=\"1\"} 0\ndtfed_h_sum 0\ndtfed_c_total 1\n# EOF\n",
    );
    assert!(samples.contains("dtfed_h_bucket") && samples.contains("dtfed_c_total"));
    assert!(histograms.contains("dtfed_h"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_names_is_in_metrics() -> Result<()> {
    let path = repo_root().join("deploy/grafana/dtfed.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard is JSON")?;
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // What the issue asks the dashboard to show.
    for must in [
        "dtfed_connections",
        "dtfed_publish_latency_seconds_bucket",
        "dtfed_hop_publish_to_gateway_seconds_bucket",
        "dtfed_fanout_lag_records",
        "dtfed_mirror_lag_records",
        "dtfed_errors_total",
    ] {
        assert!(wanted.contains(must), "the dashboard does not show {must}");
    }

    let mut spec = FederationSpec::new("dashboard", &["seoul", "tokyo"], 1);
    spec.partitions = 2;
    let fed = Federation::start(spec).await?;
    let seoul = fed.region("seoul");
    let tokyo = fed.region("tokyo");
    // A message across the link (publish, fan-out, mirror, delivery), and a refused player
    // in each region (an error by code, a close by reason).
    let mut ann = WsClient::connect(&tokyo.ws(0, "ann")).await?;
    ann.sub("hall", None, T).await?;
    let mut bob = WsClient::connect(&seoul.ws(0, "bob")).await?;
    bob.sub("hall", None, T).await?;
    bob.publish("hall", json!({"text": "hello tokyo"}), T)
        .await?;
    let m = ann.recv_until(|f| f["op"] == "msg", T).await?;
    assert_eq!(m["origin"], "seoul", "{m}");
    bob.recv_until(|f| f["op"] == "msg", T).await?;
    let long_name = "x".repeat(100);
    for r in [seoul, tokyo] {
        let mut refused = WsClient::connect(&r.ws(0, &long_name)).await?;
        let e = refused.recv_until(|f| f["op"] == "error", T).await?;
        assert_eq!(e["code"], "unauthorized", "{e}");
        refused.expect_close(T).await?;
    }

    let mut samples = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for r in [seoul, tokyo] {
        let d = &r.daemons[0];
        let resp = tokio::task::block_in_place(|| d.admin_get("/metrics", Some(ADMIN_TOKEN)))?;
        anyhow::ensure!(resp.status == 200, "{}: {}", resp.status, resp.body);
        let (s, h) = exposition(&resp.body);
        samples.extend(s);
        histograms.extend(h);
    }
    let missing: Vec<&String> = wanted.iter().filter(|n| !samples.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard names metrics /metrics does not have: {missing:?}\n/metrics has: {samples:?}"
    );
    // Quantiles are taken over histogram buckets: the family must be a histogram.
    for name in &wanted {
        if let Some(base) = name.strip_suffix("_bucket") {
            assert!(
                histograms.contains(base),
                "{name}: {base} is not a histogram"
            );
        }
        for suffix in ["_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                assert!(
                    histograms.contains(base),
                    "{name}: {base} is not a histogram"
                );
            }
        }
    }
    Ok(())
}
