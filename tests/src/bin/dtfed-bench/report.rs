//! `--report`: markdown tables from the JSON lines of several runs (and `--mirror` for
//! cross-region runs).

use super::*;

pub(crate) fn report(path: &Path, baseline: Option<&str>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut loads = Vec::new();
    let mut idles = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), k + 1))?;
        match v["mode"].as_str() {
            Some("idle") => idles.push(v),
            _ => loads.push(v),
        }
    }
    let f = |v: &Value, key: &str, prec: usize| -> String {
        v[key]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
    };
    if !loads.is_empty() {
        println!(
            "| run | clients | rooms | target msg/s | achieved msg/s | deliveries/s | ack p50 ms | ack p99 ms | ack p99.9 ms | delivery p50 ms | delivery p99 ms | delivery p99.9 ms | delivery max ms | last delivery after last publish s | errors | order viol. | dupes | delivered | server CPU % | deliveries per server CPU-s | infra CPU % | server RSS MB | ok |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &loads {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} | {} | {} | {} |",
                v["label"].as_str().unwrap_or("?"),
                v["clients"],
                v["rooms"],
                f(v, "target_rate", 0),
                f(v, "achieved_msgs_per_s", 0),
                f(v, "deliveries_per_s", 0),
                f(v, "ack_p50_ms", 2),
                f(v, "ack_p99_ms", 2),
                f(v, "ack_p999_ms", 2),
                f(v, "delivery_p50_ms", 2),
                f(v, "delivery_p99_ms", 2),
                f(v, "delivery_p999_ms", 2),
                f(v, "delivery_max_ms", 1),
                f(v, "behind_s", 3),
                v["errors"],
                v["order_violations"],
                v["duplicates"],
                v["delivered_ratio"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.3}", x * 100.0)),
                f(v, "server_cpu_pct", 0),
                f(v, "deliveries_per_server_cpu_s", 0),
                {
                    let each: Vec<String> = v["infra_cpu"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|i| format!("{} {}", i["name"].as_str().unwrap_or("?"), f(i, "cpu_pct", 0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    if each.is_empty() {
                        f(v, "infra_cpu_pct", 0)
                    } else {
                        format!("{} ({})", f(v, "infra_cpu_pct", 0), each.join(", "))
                    }
                },
                f(v, "server_rss_mb", 1),
                if v["ok"].as_bool() == Some(true) { "yes" } else { "**no**" },
            );
        }
        let with_hops: Vec<&Value> = loads
            .iter()
            .filter(|v| v["hops"].as_array().is_some_and(|h| !h.is_empty()))
            .collect();
        for v in with_hops {
            println!();
            println!(
                "Where {}'s time went (its /metrics over the measured window):",
                v["label"].as_str().unwrap_or("?")
            );
            println!();
            println!("| hop | p50 ms | p99 ms | observations |");
            println!("|---|---:|---:|---:|");
            for h in v["hops"].as_array().into_iter().flatten() {
                println!(
                    "| {} | {} | {} | {} |",
                    h["hop"].as_str().unwrap_or("?"),
                    f(h, "p50_ms", 2),
                    f(h, "p99_ms", 2),
                    f(h, "count", 0)
                );
            }
        }
        let base = match baseline {
            Some(b) => loads
                .iter()
                .find(|v| v["label"].as_str() == Some(b))
                .ok_or_else(|| anyhow!("no load run labelled {b:?} in {}", path.display()))?,
            None => &loads[0],
        };
        let base_label = base["label"].as_str().unwrap_or("?");
        let others: Vec<&Value> = loads.iter().filter(|v| !std::ptr::eq(*v, base)).collect();
        if !others.is_empty() {
            println!();
            println!("| ratio to {base_label} | ack p50 | ack p99 | delivery p50 | delivery p99 | server CPU |");
            println!("|---|---:|---:|---:|---:|---:|");
            for v in others {
                let r = |key: &str| -> String {
                    match (v[key].as_f64(), base[key].as_f64()) {
                        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
                        _ => "-".into(),
                    }
                };
                println!(
                    "| {}/{base_label} | {} | {} | {} | {} | {} |",
                    v["label"].as_str().unwrap_or("?"),
                    r("ack_p50_ms"),
                    r("ack_p99_ms"),
                    r("delivery_p50_ms"),
                    r("delivery_p99_ms"),
                    r("server_cpu_pct"),
                );
            }
        }
    }
    if !idles.is_empty() {
        if !loads.is_empty() {
            println!();
        }
        println!("| idle run | connections | rooms | server RSS before MB | after MB | KB per connection | ok |");
        println!("|---|---:|---:|---:|---:|---:|---|");
        for v in &idles {
            let mb = |key: &str| {
                v[key]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.1}", x / 1024.0))
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                v["label"].as_str().unwrap_or("?"),
                v["connections"],
                v["rooms"],
                mb("server_rss_before_kb"),
                mb("server_rss_after_kb"),
                f(v, "server_kb_per_conn", 2),
                if v["ok"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "**no**"
                },
            );
        }
    }
    if loads.is_empty() && idles.is_empty() {
        bail!("{}: no runs", path.display());
    }
    Ok(())
}

// ------------------------------------------------------------------ mirror report

/// The cross-region tables of `--report FILE --mirror`: remote delivery at a steady rate,
/// flat-out throughput and catch-up, one row per run, with the goals checked.
pub(crate) fn mirror_report(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut paced = Vec::new();
    let mut flat = Vec::new();
    let mut catchups = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), k + 1))?;
        match (v["mode"].as_str(), v["flat_out"].as_bool()) {
            (Some("catchup"), _) => catchups.push(v),
            (Some("load"), Some(true)) => flat.push(v),
            (Some("load"), _) => paced.push(v),
            _ => {}
        }
    }
    if paced.is_empty() && flat.is_empty() && catchups.is_empty() {
        bail!("{}: no load or catch-up runs", path.display());
    }
    let f = |v: &Value, key: &str, prec: usize| -> String {
        v[key]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
    };
    let ok = |v: &Value| {
        if v["ok"].as_bool() == Some(true) {
            "yes"
        } else {
            "**no**"
        }
    };
    let verdict = |pass: Option<bool>| match pass {
        Some(true) => "✅",
        Some(false) => "❌",
        None => "?",
    };
    let delay = |v: &Value| v["delay_ms"].as_f64();
    let mut goals: Vec<String> = Vec::new();

    if !paced.is_empty() {
        println!("### Remote delivery at a steady rate");
        println!();
        println!(
            "| one-way delay ms | target msg/s | achieved msg/s | mirror rec/s | mirror MB/s | delivered MB/s | remote p50 ms | p99 ms | p99.9 ms | max ms | delivered / expected | order viol. | dupes | p99 ≤ delay + 25 ms | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|");
        for v in &paced {
            let pass = match (delay(v), v["delivery_p99_ms"].as_f64()) {
                (Some(d), Some(p)) => Some(p <= d + 25.0),
                _ => None,
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} ({} %) | {} | {} | {} | {} |",
                f(v, "delay_ms", 0),
                f(v, "target_rate", 0),
                f(v, "achieved_msgs_per_s", 0),
                f(v, "mirror_records_per_s", 0),
                f(v, "mirror_mb_per_s", 3),
                f(v, "delivered_mb_per_s", 3),
                f(v, "delivery_p50_ms", 1),
                f(v, "delivery_p99_ms", 1),
                f(v, "delivery_p999_ms", 1),
                f(v, "delivery_max_ms", 0),
                v["delivered"],
                v["expected"],
                v["delivered_ratio"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.3}", x * 100.0)),
                v["order_violations"],
                v["duplicates"],
                verdict(pass),
                ok(v),
            );
            goals.push(format!(
                "- p99 ≤ delay + 25 ms at {} msg/s, delay {} ms: p99 {} ms {}",
                f(v, "target_rate", 0),
                f(v, "delay_ms", 0),
                f(v, "delivery_p99_ms", 1),
                verdict(pass)
            ));
        }
        println!();
    }

    // Mirror throughput of a run: the receiving /status, else distinct deliveries.
    let mirror_rate = |v: &Value| -> Option<f64> {
        v["mirror_records_per_s"].as_f64().or_else(|| {
            let subs = v["subscribers"].as_f64()?;
            let rooms = v["rooms"].as_f64()?;
            (subs > 0.0).then(|| v["deliveries_per_s"].as_f64().map(|d| d * rooms / subs))?
        })
    };
    let ratio_line =
        |runs: &[Value], what: &str, rate: &dyn Fn(&Value) -> Option<f64>| -> Vec<String> {
            let Some(zero) = runs.iter().find(|v| delay(v) == Some(0.0)).and_then(rate) else {
                return Vec::new();
            };
            runs.iter()
                .filter(|v| delay(v).is_some_and(|d| d > 0.0))
                .filter_map(|v| {
                    let r = rate(v)? / zero;
                    let d = delay(v)?;
                    let pass = (d >= 270.0).then_some(r >= 0.8);
                    Some(format!(
                        "- {what}, {d:.0} ms / 0 ms: {r:.2}×{}",
                        match pass {
                            Some(p) => format!(" (goal ≥ 0.8× at 270 ms) {}", verdict(Some(p))),
                            None => String::new(),
                        }
                    ))
                })
                .collect()
        };
    if !flat.is_empty() {
        println!("### Max throughput (publishers flat out)");
        println!();
        println!(
            "| one-way delay ms | in flight / publisher | ingest msg/s (acked at origin) | mirror rec/s | mirror MB/s | mirror behind at window end | mirror all in after last publish s | deliveries/s | remote p50 ms | p99 ms | drain s | bound by | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for v in &flat {
            let ingest = v["achieved_msgs_per_s"].as_f64();
            let bound = match (v["mirror_behind_end"].as_f64(), ingest) {
                // More than half a second of ingest left over at the end: the mirror fell behind.
                (Some(b), Some(i)) if b > (0.5 * i).max(1000.0) => "mirror (fell behind)",
                (Some(_), Some(_)) => "ingest (mirror kept up)",
                _ => "?",
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {bound} | {} |",
                f(v, "delay_ms", 0),
                v["inflight"],
                f(v, "achieved_msgs_per_s", 0),
                mirror_rate(v).map_or_else(|| "-".to_owned(), |x| format!("{x:.0}")),
                f(v, "mirror_mb_per_s", 3),
                f(v, "mirror_behind_end", 0),
                f(v, "mirror_all_in_s", 2),
                f(v, "deliveries_per_s", 0),
                f(v, "delivery_p50_ms", 1),
                f(v, "delivery_p99_ms", 1),
                f(v, "drain_s", 1),
                ok(v),
            );
        }
        println!();
        goals.extend(ratio_line(
            &flat,
            "mirror rec/s, publishers flat out",
            &mirror_rate,
        ));
    }
    if !catchups.is_empty() {
        println!("### Catch-up after a cut (ingest goes on at R)");
        println!();
        println!(
            "| one-way delay ms | R msg/s | cut s | backlog msgs | pre-cut p99 ms | first delivery s | backlog delivered s | catch-up msg/s (× R) | live again s | net msg/s (× R) | mirror: behind at heal / link back s / all in s | mirror rec/s from heal (× R) | mirror rec/s once back | mirror behind at end | catch-up ≥ 5× R | ok |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|---|---|");
        for v in &catchups {
            let pass = v["backlog_x"].as_f64().map(|x| x >= 5.0);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}×) | {} | {} ({}×) | {} / {} / {} | {} ({}×) | {} | {} | {} | {} |",
                f(v, "delay_ms", 0),
                f(v, "target_rate", 0),
                f(v, "cut_s", 1),
                v["backlog"],
                f(v, "precut_p99_ms", 1),
                f(v, "first_delivery_s", 2),
                f(v, "backlog_delivered_s", 2),
                f(v, "backlog_msgs_per_s", 0),
                f(v, "backlog_x", 2),
                f(v, "live_s", 2),
                f(v, "catchup_msgs_per_s", 0),
                f(v, "catchup_x", 2),
                f(v, "mirror_backlog", 0),
                f(v, "mirror_resumed_s", 2),
                f(v, "mirror_backlog_s", 2),
                f(v, "mirror_catchup_records_per_s", 0),
                f(v, "mirror_catchup_x", 2),
                f(v, "mirror_transfer_records_per_s", 0),
                f(v, "mirror_behind_done", 0),
                verdict(pass),
                ok(v),
            );
            goals.push(format!(
                "- catch-up ≥ 5× ingest, delay {} ms: backlog delivered at {}× R {} \
                 (net of the ingest until live again: {}×; the mirror alone: {}×)",
                f(v, "delay_ms", 0),
                f(v, "backlog_x", 2),
                verdict(pass),
                f(v, "catchup_x", 2),
                f(v, "mirror_catchup_x", 2),
            ));
        }
        println!();
        goals.extend(ratio_line(
            &catchups,
            "mirror rec/s working off a backlog once the link is back (catch-up)",
            &|v: &Value| v["mirror_transfer_records_per_s"].as_f64(),
        ));
    }
    if !goals.is_empty() {
        println!("### Goals");
        println!();
        for g in &goals {
            println!("{g}");
        }
    }
    Ok(())
}
