//! The results of a load run: the printed table, the pass/fail verdict and the JSON line.

use super::*;

pub(crate) struct LoadResults<'a> {
    pub(crate) args: &'a Args,
    pub(crate) run_id: &'a str,
    pub(crate) shared: &'a Shared,
    /// Per `--pid`, then per `--infra-pid`, then this process last.
    pub(crate) cpu: &'a [Option<f64>],
    pub(crate) rss: &'a [(Option<u64>, Option<u64>)],
    pub(crate) drained: bool,
    /// Seconds from the end of publishing until every ack and delivery was in (or given up).
    pub(crate) drain_s: f64,
    /// Subscriber connections in the other region (0: one-region run).
    pub(crate) subscribers: usize,
    /// `--mirror-status` / `--mirror-log-dir` samples.
    pub(crate) mirror: Option<&'a [MirrorSample]>,
    pub(crate) catchup: Option<&'a Catchup>,
    /// `--metrics`: each hop's histogram over the measured window.
    pub(crate) hops: &'a [(&'static str, &'static str, hops::Hist)],
}

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

pub(crate) fn max_ms(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
}

pub(crate) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

impl LoadResults<'_> {
    /// Rows and JSON fields of cross-region, mirror and catch-up runs.
    pub(crate) fn extras(
        &self,
        failures: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> (Vec<(&'static str, String)>, serde_json::Map<String, Value>) {
        let a = self.args;
        let c = &self.shared.c;
        let mut rows: Vec<(&'static str, String)> = Vec::new();
        let mut j = serde_json::Map::new();
        let ws = self.shared.window_start;
        let we = self.shared.window_end.load(Ordering::Relaxed);
        let dur = (we.saturating_sub(ws) as f64 / 1e9).max(1e-9);
        let delivered_mb_s = get(&c.delivered_bytes_measured) as f64 / dur / 1e6;
        j.insert("delay_ms".into(), json!(a.delay_ms));
        j.insert("flat_out".into(), json!(a.flat_out));
        j.insert("inflight".into(), json!(a.flat_out.then_some(a.inflight)));
        j.insert("sub_urls".into(), json!(a.sub_urls));
        j.insert("subscribers".into(), json!(self.subscribers));
        j.insert("delivered_mb_per_s".into(), json!(delivered_mb_s));
        if !a.sub_urls.is_empty() {
            rows.push((
                "cross-region",
                format!(
                    "{} publishers on {}, {} subscribers on {}{}",
                    a.clients,
                    a.urls.join(" "),
                    self.subscribers,
                    a.sub_urls.join(" "),
                    a.delay_ms
                        .map(|d| format!(", relay delay {d} ms one way"))
                        .unwrap_or_default()
                ),
            ));
        }
        if a.flat_out {
            rows.push((
                "pacing",
                format!("flat out, {} in flight per publisher", a.inflight),
            ));
        }
        rows.push((
            "delivered bytes",
            format!("{delivered_mb_s:.3} MB/s (msg frames, measured window)"),
        ));
        // Records mirrored before this run (the first sample is taken before publishing).
        let mirror_base = self.mirror.and_then(|s| s.first()).and_then(|x| x.mirrored);
        if let Some(s) = self.mirror {
            let rate = sample_rate(s, ws, we, s_mirrored);
            let mb = sample_rate(s, ws, we, s_bytes).map(|b| b / 1e6);
            let lag_end = sample_at(s, we, s_lag).map(|x| x.1);
            let behind_end =
                mirror_base.and_then(|b| sample_before(s, we).and_then(|x| mirror_behind(x, b)));
            let pub_end = self.shared.pub_end.load(Ordering::Relaxed);
            let all_in = mirror_base
                .and_then(|b| mirror_reached(s, 0, b, get(&c.acked) as i64))
                .map(|t| (t as f64 - pub_end as f64).max(0.0) / 1e9);
            let last = s.iter().rev().find_map(|x| x.mirrored);
            rows.push((
                "mirror (receiving /status)",
                format!(
                    "{} records/s, {} MB/s in its Kafka over the window; at its end {} records \
                     behind the origin (daemon's lag_records {}); every record in {} s after \
                     the last publish",
                    fmt_opt(rate, 0),
                    fmt_opt(mb, 3),
                    behind_end.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    fmt_opt(lag_end, 0),
                    fmt_opt(all_in, 2)
                ),
            ));
            j.insert("mirror_records_per_s".into(), json!(rate));
            j.insert("mirror_mb_per_s".into(), json!(mb));
            j.insert("mirror_behind_end".into(), json!(behind_end));
            j.insert("mirror_lag_end".into(), json!(lag_end));
            j.insert("mirror_all_in_s".into(), json!(all_in));
            j.insert("mirror_records_total".into(), json!(last));
            j.insert("mirror_samples".into(), json!(s.len()));
        }
        let Some(k) = self.catchup else {
            return (rows, j);
        };
        let since_heal = |t: Option<u64>| t.map(|t| t.saturating_sub(k.heal) as f64 / 1e9);
        let first_s = since_heal(k.first_delivery);
        let backlog_s = since_heal(k.backlog_delivered);
        let live_s = since_heal(k.live);
        let per_s = |secs: Option<f64>| secs.filter(|t| *t > 0.0).map(|t| k.backlog as f64 / t);
        let catchup_rate = per_s(live_s);
        let backlog_rate = per_s(backlog_s);
        let x = |r: Option<f64>| r.filter(|_| a.rate > 0.0).map(|r| r / a.rate);
        rows.push((
            "pre-cut remote p50/p99/p99.9",
            format!(
                "{} / {} / {} ms (live-again slack {:.0} ms)",
                fmt_opt(k.precut_p50_ms, 2),
                fmt_opt(k.precut_p99_ms, 2),
                fmt_opt(k.precut_p999_ms, 2),
                k.slack_ms
            ),
        ));
        rows.push((
            "cut",
            format!(
                "{:.1} s; {} sent meanwhile; backlog at heal {}",
                (k.heal - k.cut) as f64 / 1e9,
                k.sent_during_cut,
                k.backlog
            ),
        ));
        rows.push((
            "after the heal",
            format!(
                "first delivery {} s, backlog delivered {} s, live again {} s",
                fmt_opt(first_s, 2),
                fmt_opt(backlog_s, 2),
                fmt_opt(live_s, 2)
            ),
        ));
        rows.push((
            "catch-up rate",
            format!(
                "{} msg/s = {}× ingest (backlog / live again); backlog arrived at {} msg/s = {}×",
                fmt_opt(catchup_rate, 0),
                fmt_opt(x(catchup_rate), 2),
                fmt_opt(backlog_rate, 0),
                fmt_opt(x(backlog_rate), 2)
            ),
        ));
        // The mirror alone: records of this run the origin had at the heal and the receiver
        // did not, and how long until it had them all.
        let mut mirror_backlog = None;
        let mut mirror_backlog_s = None;
        let mut mirror_resumed_s = None;
        let mut mirror_peak = None;
        let mut mirror_behind_done = None;
        if let (Some(s), Some(b)) = (self.mirror, mirror_base) {
            let want = k.sent_at_heal as i64 - k.refused_at_heal as i64;
            let at_heal = sample_before(s, k.heal).and_then(|x| x.mirrored);
            mirror_backlog = at_heal.map(|m| want - (m - b));
            let all_in = mirror_reached(s, k.heal, b, want);
            mirror_backlog_s = since_heal(all_in);
            // The link is back: the first sample after the heal with more records.
            mirror_resumed_s = since_heal(at_heal.and_then(|h| {
                s.iter()
                    .filter(|x| x.t >= k.heal)
                    .find(|x| x.mirrored.is_some_and(|m| m > h))
                    .map(|x| x.t)
            }));
            mirror_peak = peak_rate(s, k.heal, all_in.unwrap_or(u64::MAX), s_mirrored);
            mirror_behind_done = sample_before(s, k.done).and_then(|x| mirror_behind(x, b));
        }
        let mirror_rate = match (mirror_backlog, mirror_backlog_s) {
            (Some(n), Some(t)) if t > 0.0 => Some(n as f64 / t),
            _ => None,
        };
        // The backlog's transfer alone, once the link was back.
        let mirror_transfer = match (mirror_backlog, mirror_backlog_s, mirror_resumed_s) {
            (Some(n), Some(t), Some(r)) if t > r => Some(n as f64 / (t - r)),
            _ => None,
        };
        if self.mirror.is_some() {
            rows.push((
                "mirror catch-up",
                format!(
                    "{} records behind at the heal; link back after {} s, all in {} s: \
                     {} records/s = {}× ingest from the heal, {} records/s once back \
                     (best 1 s {}); {} records behind when the phase ended",
                    mirror_backlog.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    fmt_opt(mirror_resumed_s, 2),
                    fmt_opt(mirror_backlog_s, 2),
                    fmt_opt(mirror_rate, 0),
                    fmt_opt(x(mirror_rate), 2),
                    fmt_opt(mirror_transfer, 0),
                    fmt_opt(mirror_peak, 0),
                    mirror_behind_done.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                ),
            ));
        }
        rows.push(("relay", k.relay_answers.join("; ")));
        if k.backlog == 0 {
            warnings.push(
                "no backlog at the heal: did the cut reach the relay (see `relay` above)?".into(),
            );
        }
        if k.live.is_none() {
            failures.push(format!(
                "not live again within --catchup-max {} s after the heal",
                a.catchup_max
            ));
        }
        for (key, v) in [
            ("precut_p50_ms", json!(k.precut_p50_ms)),
            ("precut_p99_ms", json!(k.precut_p99_ms)),
            ("precut_p999_ms", json!(k.precut_p999_ms)),
            ("slack_ms", json!(k.slack_ms)),
            ("cut_s", json!((k.heal - k.cut) as f64 / 1e9)),
            ("sent_during_cut", json!(k.sent_during_cut)),
            ("backlog", json!(k.backlog)),
            ("first_delivery_s", json!(first_s)),
            ("backlog_delivered_s", json!(backlog_s)),
            ("live_s", json!(live_s)),
            ("catchup_msgs_per_s", json!(catchup_rate)),
            ("catchup_x", json!(x(catchup_rate))),
            ("backlog_msgs_per_s", json!(backlog_rate)),
            ("backlog_x", json!(x(backlog_rate))),
            ("mirror_backlog", json!(mirror_backlog)),
            ("mirror_backlog_s", json!(mirror_backlog_s)),
            ("mirror_catchup_records_per_s", json!(mirror_rate)),
            ("mirror_catchup_x", json!(x(mirror_rate))),
            ("mirror_catchup_peak_records_per_s", json!(mirror_peak)),
            ("mirror_resumed_s", json!(mirror_resumed_s)),
            ("mirror_transfer_records_per_s", json!(mirror_transfer)),
            ("mirror_behind_done", json!(mirror_behind_done)),
            ("relay_answers", json!(k.relay_answers)),
        ] {
            j.insert(key.into(), v);
        }
        (rows, j)
    }

    pub(crate) fn print_and_save(&self) -> anyhow::Result<Outcome> {
        let a = self.args;
        let c = &self.shared.c;
        let hists = self
            .shared
            .hists
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let dur = a.duration;
        let achieved = get(&c.acked_measured) as f64 / dur;
        let offered = get(&c.sent_measured) as f64 / dur;
        let deliveries_per_s = get(&c.delivered_measured) as f64 / dur;
        let delivered = get(&c.delivered);
        let expected = get(&c.expected);
        let ratio = if expected == 0 {
            1.0
        } else {
            delivered as f64 / expected as f64
        };
        let n_pids = a.pids.len();
        let server_cpu: Option<f64> = if n_pids == 0 {
            None
        } else {
            self.cpu[..n_pids]
                .iter()
                .try_fold(0.0, |acc, v| v.map(|v| acc + v))
        };
        let bench_cpu = self.cpu.last().copied().flatten();
        let infra = &self.cpu[n_pids..self.cpu.len() - 1];
        let infra_cpu: Option<f64> = if infra.is_empty() {
            None
        } else {
            infra.iter().try_fold(0.0, |acc, v| v.map(|v| acc + v))
        };
        let rss_kb: Option<u64> = if n_pids == 0 {
            None
        } else {
            self.rss
                .iter()
                .try_fold(0, |acc, (r, _)| r.map(|r| acc + r))
        };
        let hwm_kb: Option<u64> = if n_pids == 0 {
            None
        } else {
            self.rss
                .iter()
                .try_fold(0, |acc, (_, h)| h.map(|h| acc + h))
        };
        let errors_by_code = self
            .shared
            .errors_by_code
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let notes = self
            .shared
            .notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();

        let mut failures = Vec::new();
        if get(&c.order_violations) > 0 {
            failures.push(format!(
                "{} per-(room, origin) order violations",
                get(&c.order_violations)
            ));
        }
        if get(&c.duplicates) > 0 {
            failures.push(format!("{} duplicate deliveries", get(&c.duplicates)));
        }
        if ratio < 0.999 {
            let refused = get(&c.pub_errors);
            let why = if refused > 0 {
                format!("; {refused} publishes were refused with an error frame, see below")
            } else {
                String::new()
            };
            failures.push(format!(
                "delivered {delivered} of {expected} expected ({:.3} %, below 99.9 %){why}",
                ratio * 100.0
            ));
        }
        if a.rate > 0.0 && get(&c.sent) == 0 {
            failures.push("nothing was published".into());
        }
        // How long after the last publish the last delivery came: the server's backlog.
        let last_sent = get(&c.last_sent_ns);
        let last_delivered = get(&c.last_delivered_ns);
        let behind_s = if last_sent > 0 && last_delivered > 0 {
            Some(last_delivered.saturating_sub(last_sent) as f64 / 1e9)
        } else {
            None
        };
        // A closed-loop (flat-out) run measures the ceiling: a backlog at its end is the
        // measurement, not a failure; a catch-up run has its own criteria.
        if self.catchup.is_none() && !a.flat_out {
            if let Some(b) = behind_s.filter(|b| *b > a.max_drain) {
                failures.push(format!(
                    "fell behind: the last delivery came {b:.2} s after the last publish (limit --max-drain {} s)",
                    a.max_drain
                ));
            }
            if let (Some(limit), Some(p99)) = (a.max_p99_ms, ms(&hists.delivery, 0.99)) {
                if p99 > limit {
                    failures.push(format!(
                        "fell behind: delivery p99 {p99:.1} ms is over --max-p99-ms {limit} ms"
                    ));
                }
            }
        }
        let per_cpu_s = match server_cpu {
            Some(cpu) if cpu > 0.0 => Some(deliveries_per_s / (cpu / 100.0)),
            _ => None,
        };
        let infra_each: Vec<(String, Option<f64>)> = infra
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let name = a
                    .infra_names
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| format!("pid {}", a.infra_pids[k]));
                (name, *v)
            })
            .collect();
        let mut warnings = Vec::new();
        if get(&c.errors) > 0 {
            warnings.push(format!(
                "{} error frames {errors_by_code:?}",
                get(&c.errors)
            ));
        }
        for (n, what) in [
            (get(&c.disconnects), "unexpected disconnects"),
            (get(&c.bad_frames), "undecodable server frames"),
            (get(&c.prev_breaks), "prev chain breaks"),
            (get(&c.gaps), "gap frames"),
            (get(&c.misrouted), "messages of another room"),
            (get(&c.foreign), "messages not from this run"),
            (get(&c.unmatched_acks), "acks without our ref"),
            (get(&c.send_failures), "publish writes that failed"),
        ] {
            if n > 0 {
                warnings.push(format!("{n} {what}"));
            }
        }
        if !self.drained {
            warnings.push(format!(
                "gave up draining after {:.1} s ({} s without progress, or --drain-max {} s): \
                 {} sent, {} acked, {} refused, {delivered} of {expected} delivered",
                self.drain_s,
                a.drain_timeout,
                a.drain_max,
                get(&c.sent),
                get(&c.acked),
                get(&c.pub_errors)
            ));
        } else if self.drain_s > 1.0 {
            warnings.push(format!(
                "the server was behind: the last acks/deliveries came {:.1} s after the last publish",
                self.drain_s
            ));
        }
        if get(&c.late_ticks) > 0 {
            warnings.push(format!(
                "{} publish ticks fired > 5 ms late (max {:.1} ms): the generator was short of CPU or its writes blocked",
                get(&c.late_ticks),
                get(&c.max_tick_lag_us) as f64 / 1000.0
            ));
        }

        let (extra_rows, extra_json) = self.extras(&mut failures, &mut warnings);

        let mut rows: Vec<(&str, String)> = vec![
            ("label", a.label.clone()),
            ("run id", self.run_id.to_owned()),
            ("clients / rooms", format!("{} / {}", a.clients, a.rooms)),
            (
                "target rate",
                format!("{} msg/s, body {} B", a.rate, a.body_bytes),
            ),
            (
                "window",
                format!("{} s after {} s warm-up", a.duration, a.warmup),
            ),
            (
                "achieved (acked)",
                format!("{achieved:.0} msg/s (offered {offered:.0})"),
            ),
            (
                "deliveries",
                format!(
                    "{deliveries_per_s:.0} /s (last one {} s after the last publish)",
                    fmt_opt(behind_s, 3)
                ),
            ),
            (
                "ack p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {} ms",
                    fmt_opt(ms(&hists.ack, 0.5), 3),
                    fmt_opt(ms(&hists.ack, 0.99), 3),
                    fmt_opt(ms(&hists.ack, 0.999), 3),
                    fmt_opt(max_ms(&hists.ack), 3)
                ),
            ),
            (
                "delivery p50/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {} ms",
                    fmt_opt(ms(&hists.delivery, 0.5), 3),
                    fmt_opt(ms(&hists.delivery, 0.99), 3),
                    fmt_opt(ms(&hists.delivery, 0.999), 3),
                    fmt_opt(max_ms(&hists.delivery), 3)
                ),
            ),
            (
                "sent / acked / errors",
                format!(
                    "{} / {} / {} {:?}",
                    get(&c.sent),
                    get(&c.acked),
                    get(&c.errors),
                    errors_by_code
                ),
            ),
            (
                "delivered / expected",
                format!("{delivered} / {expected} ({:.3} %)", ratio * 100.0),
            ),
            (
                "order violations / dupes",
                format!("{} / {}", get(&c.order_violations), get(&c.duplicates)),
            ),
            (
                "server CPU",
                match server_cpu {
                    Some(v) => format!("{v:.0} % (100 % = one core)"),
                    None => "- (no --pid)".into(),
                },
            ),
            (
                "server RSS (peak)",
                match (rss_kb, hwm_kb) {
                    (Some(r), Some(h)) => {
                        format!("{:.1} MB ({:.1} MB)", r as f64 / 1024.0, h as f64 / 1024.0)
                    }
                    _ => "-".into(),
                },
            ),
            ("deliveries per server CPU-s", fmt_opt(per_cpu_s, 0)),
            (
                "infra CPU (Redis, Kafka)",
                match infra_cpu {
                    Some(v) => {
                        let each: Vec<String> = infra_each
                            .iter()
                            .map(|(n, c)| format!("{n} {} %", fmt_opt(*c, 0)))
                            .collect();
                        format!("{v:.0} % ({})", each.join(", "))
                    }
                    None => "- (no --infra-pid)".into(),
                },
            ),
            ("bench CPU", format!("{} %", fmt_opt(bench_cpu, 0))),
        ];
        for (_, what, h) in self.hops {
            rows.push((
                what,
                format!(
                    "p50 {} / p99 {} ms ({} observations)",
                    fmt_opt(h.quantile(0.5).map(|v| v * 1000.0), 2),
                    fmt_opt(h.quantile(0.99).map(|v| v * 1000.0), 2),
                    h.count
                ),
            ));
        }
        rows.extend(extra_rows);
        println!();
        println!("== dtfed-bench: {} ==", a.label);
        for (k, v) in &rows {
            println!("  {k:<28} {v}");
        }
        for w in &warnings {
            println!("  warning: {w}");
        }
        if !notes.is_empty() {
            println!("  first events worth a look:");
            for n in &notes {
                println!("    {n}");
            }
        }

        let per_pid: Vec<Value> = a
            .pids
            .iter()
            .enumerate()
            .map(|(k, pid)| {
                json!({
                    "pid": pid,
                    "cpu_pct": self.cpu[k],
                    "rss_kb": self.rss[k].0,
                    "hwm_kb": self.rss[k].1,
                })
            })
            .collect();
        let mut record = json!({
            "mode": if self.catchup.is_some() { "catchup" } else { "load" },
            "label": a.label,
            "run_id": self.run_id,
            "urls": a.urls,
            "clients": a.clients,
            "rooms": a.rooms,
            "target_rate": a.rate,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "body_bytes": a.body_bytes,
            "sent": get(&c.sent),
            "acked": get(&c.acked),
            "errors": get(&c.errors),
            "errors_by_code": errors_by_code,
            "achieved_msgs_per_s": achieved,
            "offered_msgs_per_s": offered,
            "deliveries_per_s": deliveries_per_s,
            "delivered": delivered,
            "expected": expected,
            "delivered_ratio": ratio,
            "ack_p50_ms": ms(&hists.ack, 0.5),
            "ack_p99_ms": ms(&hists.ack, 0.99),
            "ack_p999_ms": ms(&hists.ack, 0.999),
            "ack_max_ms": max_ms(&hists.ack),
            "delivery_p50_ms": ms(&hists.delivery, 0.5),
            "delivery_p99_ms": ms(&hists.delivery, 0.99),
            "delivery_p999_ms": ms(&hists.delivery, 0.999),
            "delivery_max_ms": max_ms(&hists.delivery),
            "order_violations": get(&c.order_violations),
            "duplicates": get(&c.duplicates),
            "prev_breaks": get(&c.prev_breaks),
            "gaps": get(&c.gaps),
            "bad_frames": get(&c.bad_frames),
            "disconnects": get(&c.disconnects),
            "late_ticks": get(&c.late_ticks),
            "server_cpu_pct": server_cpu,
            "server_rss_mb": rss_kb.map(|k| k as f64 / 1024.0),
            "server_hwm_mb": hwm_kb.map(|k| k as f64 / 1024.0),
            "servers": per_pid,
            "infra_pids": a.infra_pids,
            "infra_cpu_pct": infra_cpu,
            "bench_cpu_pct": bench_cpu,
            "drained": self.drained,
            "drain_s": self.drain_s,
            "behind_s": behind_s,
            "max_drain_s": a.max_drain,
            "deliveries_per_server_cpu_s": per_cpu_s,
            "infra_cpu": infra_each.iter().map(|(n, c)| json!({"name": n, "cpu_pct": c})).collect::<Vec<_>>(),
            "note": a.note,
            "hops": self.hops.iter().map(|(name, what, h)| json!({
                "metric": name,
                "hop": what,
                "count": h.count,
                "p50_ms": h.quantile(0.5).map(|v| v * 1000.0),
                "p99_ms": h.quantile(0.99).map(|v| v * 1000.0),
            })).collect::<Vec<_>>(),
            "ok": failures.is_empty(),
            "failures": failures,
            "warnings": warnings,
        });
        if let Some(obj) = record.as_object_mut() {
            obj.extend(extra_json);
        }
        if let Some(path) = &a.json {
            append_json(path, &record)?;
        }
        if failures.is_empty() {
            println!("  result: PASS");
            Ok(Outcome::Passed)
        } else {
            for f in &failures {
                println!("  FAIL: {f}");
            }
            eprintln!("dtfed-bench: {}: FAILED: {}", a.label, failures.join("; "));
            Ok(Outcome::Failed)
        }
    }
}

pub(crate) fn append_json(path: &Path, record: &Value) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{record}").with_context(|| format!("cannot write {}", path.display()))
}

// ------------------------------------------------------------------ idle (memory) run
