//! Cross-region runs: the receiving daemon's `/status` and `/metrics` sampled while a run goes on,
//! and the catch-up phase (cut and heal through the relay's FIFO).

use super::*;

/// `http://host:port` (an admin listener) → `host:port`.
pub(crate) fn admin_hostport(url: &str) -> anyhow::Result<String> {
    let hp = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url:?}: expected http://host:port"))?
        .trim_end_matches('/');
    if hp.is_empty() || hp.contains('/') || !hp.contains(':') {
        bail!("{url:?}: expected http://host:port");
    }
    Ok(hp.to_owned())
}

/// GET `path` from an admin listener, as JSON (HTTP/1.0: no chunked answer to decode).
pub(crate) async fn admin_get(hostport: &str, path: &str) -> anyhow::Result<Value> {
    let body = admin_get_text(hostport, path).await?;
    serde_json::from_str(&body).with_context(|| format!("GET http://{hostport}{path}: not JSON"))
}

/// The daemon's `hop_*` histograms now, or `None` (said in the notes) if unreadable.
pub(crate) async fn scrape_hops(
    shared: &Shared,
    hostport: Option<&str>,
) -> Option<std::collections::BTreeMap<String, hops::Hist>> {
    let hostport = hostport?;
    match admin_get_text(hostport, "/metrics").await {
        Ok(text) => Some(hops::parse(&text)),
        Err(e) => {
            shared.note(format!("per-hop metrics not read: {e:#}"));
            None
        }
    }
}

pub(crate) async fn admin_get_text(hostport: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = TcpStream::connect(hostport)
            .await
            .with_context(|| format!("connecting to {hostport}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .map_err(|_| anyhow!("GET http://{hostport}{path}: no answer within 2 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET http://{hostport}{path}: malformed HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET http://{hostport}{path}: {status}");
    }
    Ok(body.to_owned())
}

/// (records mirrored, lag records) over the `mirror` tasks of `/status` (of `origin` only
/// when given): records = Σ (mirrored_offset + 1), origin offsets being dense.
pub(crate) fn mirror_totals(status: &Value, origin: Option<&str>) -> (Option<i64>, Option<i64>) {
    let Some(tasks) = status["mirror"].as_array() else {
        return (None, None);
    };
    let tasks: Vec<&Value> = tasks
        .iter()
        .filter(|t| origin.is_none_or(|o| t["origin"].as_str() == Some(o)))
        .collect();
    if tasks.is_empty() {
        return (None, None);
    }
    let mirrored = tasks
        .iter()
        .map(|t| t["mirrored_offset"].as_i64().map_or(0, |o| o + 1))
        .sum();
    let lag = tasks
        .iter()
        .map(|t| t["lag_records"].as_i64())
        .try_fold(0, |acc, l| l.map(|l| acc + l.max(0)));
    (Some(mirrored), lag)
}

/// Bytes of the `*.log` segments of `<dir>/<prefix><origin>-<partition>/`.
pub(crate) fn mirror_log_bytes(dir: &Path, prefix: &str, origin: Option<&str>) -> Option<u64> {
    let want = format!("{prefix}{}", origin.unwrap_or_default());
    let mut total = 0;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((topic, part)) = name.rsplit_once('-') else {
            continue;
        };
        let topic_ok = if origin.is_some() {
            topic == want
        } else {
            topic.starts_with(&want)
        };
        if !topic_ok || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|x| x == "log") {
                total += f.metadata().map_or(0, |m| m.len());
            }
        }
    }
    Some(total)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct MirrorSample {
    /// ns since the run's base.
    pub(crate) t: u64,
    /// Records mirrored so far (see [`mirror_totals`]).
    pub(crate) mirrored: Option<i64>,
    /// Σ lag_records, as the receiving daemon reports it (relative to the origin's high
    /// watermark as last reported over the link, so it lags by the link's delay).
    pub(crate) lag: Option<i64>,
    /// Bytes of the mirror topic in the receiving Kafka.
    pub(crate) log_bytes: Option<u64>,
    /// Publishes of this run acked by the origin so far (each one origin record), read
    /// just before the request.
    pub(crate) acked: u64,
}

/// Reads the receiving region's mirror state.
pub(crate) struct MirrorProbe {
    pub(crate) status: Option<String>,
    pub(crate) log_dir: Option<PathBuf>,
    pub(crate) origin: Option<String>,
    pub(crate) prefix: String,
    pub(crate) complained: bool,
}

impl MirrorProbe {
    pub(crate) async fn sample(&mut self, shared: &Shared) -> MirrorSample {
        // Acked before asking: on a busy host the answer can take a while, and the acks
        // that come in meanwhile must not count as records the mirror is missing.
        let acked = get(&shared.c.acked);
        let t0 = shared.now_ns();
        let (mirrored, lag) = match &self.status {
            Some(hp) => match admin_get(hp, "/status").await {
                Ok(v) => {
                    let (m, l) = mirror_totals(&v, self.origin.as_deref());
                    if m.is_none() && !self.complained {
                        self.complained = true;
                        eprintln!(
                            "dtfed-bench: warning: http://{hp}/status has no mirror tasks{}: \
                             no mirrored records/s",
                            self.origin
                                .as_deref()
                                .map(|o| format!(" of origin {o}"))
                                .unwrap_or_default()
                        );
                    }
                    (m, l)
                }
                Err(e) => {
                    if !self.complained {
                        self.complained = true;
                        eprintln!("dtfed-bench: warning: {e:#}");
                    }
                    (None, None)
                }
            },
            None => (None, None),
        };
        let log_bytes = self
            .log_dir
            .as_deref()
            .and_then(|d| mirror_log_bytes(d, &self.prefix, self.origin.as_deref()));
        MirrorSample {
            // The middle of the request (the daemon answered somewhere within it).
            t: t0 + (shared.now_ns() - t0) / 2,
            mirrored,
            lag,
            log_bytes,
            acked,
        }
    }
}

/// Samples the receiving region's mirror every 100 ms.
pub(crate) struct MirrorSampler {
    pub(crate) samples: Arc<Mutex<Vec<MirrorSample>>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl MirrorSampler {
    /// Takes the first sample (the baseline) before returning.
    pub(crate) async fn start(args: &Args, shared: Arc<Shared>) -> Option<MirrorSampler> {
        let mut probe = MirrorProbe {
            status: args
                .mirror_status
                .as_deref()
                .and_then(|u| admin_hostport(u).ok()),
            log_dir: args.mirror_log_dir.clone(),
            origin: args.mirror_origin.clone(),
            prefix: args.mirror_topic_prefix.clone(),
            complained: false,
        };
        if probe.status.is_none() && probe.log_dir.is_none() {
            return None;
        }
        let first = probe.sample(&shared).await;
        let samples = Arc::new(Mutex::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (samples, stop) = (samples.clone(), stop.clone());
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(Duration::from_millis(100));
                iv.set_missed_tick_behavior(MissedTickBehavior::Delay);
                iv.tick().await;
                while !stop.load(Ordering::Relaxed) {
                    iv.tick().await;
                    let sample = probe.sample(&shared).await;
                    samples
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(sample);
                }
            })
        };
        Some(MirrorSampler {
            samples,
            stop,
            task,
        })
    }

    pub(crate) async fn stop(self) -> Vec<MirrorSample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.clone()
    }
}

/// Records of this run the origin acked but the receiver has not mirrored yet, at sample
/// `x` (`base`: records mirrored before the run).
pub(crate) fn mirror_behind(x: &MirrorSample, base: i64) -> Option<i64> {
    x.mirrored.map(|m| x.acked as i64 - (m - base))
}

/// First sample at or after `t0` at which the receiver holds `want` records of this run.
pub(crate) fn mirror_reached(s: &[MirrorSample], t0: u64, base: i64, want: i64) -> Option<u64> {
    s.iter()
        .filter(|x| x.t >= t0)
        .find(|x| x.mirrored.is_some_and(|m| m - base >= want))
        .map(|x| x.t)
}

/// The sample of `f` nearest to `t` from below (else the first one after), as (t, value).
pub(crate) fn sample_at(
    s: &[MirrorSample],
    t: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<(u64, f64)> {
    let known = || s.iter().filter_map(|x| f(x).map(|v| (x.t, v)));
    known().rfind(|(ts, _)| *ts <= t).or_else(|| known().next())
}

/// The last sample at or before `t` that has the mirror's offsets (else the first one).
pub(crate) fn sample_before(s: &[MirrorSample], t: u64) -> Option<&MirrorSample> {
    let known = || s.iter().filter(|x| x.mirrored.is_some());
    known().rfind(|x| x.t <= t).or_else(|| known().next())
}

/// Rate of `f` per second between `t0` and `t1` (nearest samples).
pub(crate) fn sample_rate(
    s: &[MirrorSample],
    t0: u64,
    t1: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<f64> {
    let (a_t, a) = sample_at(s, t0, f)?;
    let (b_t, b) = sample_at(s, t1, f)?;
    (b_t > a_t).then(|| (b - a) / ((b_t - a_t) as f64 / 1e9))
}

/// Best rate of `f` over any ≥ 1 s span of samples within [t0, t1].
pub(crate) fn peak_rate(
    s: &[MirrorSample],
    t0: u64,
    t1: u64,
    f: fn(&MirrorSample) -> Option<f64>,
) -> Option<f64> {
    let pts: Vec<(u64, f64)> = s
        .iter()
        .filter(|x| x.t >= t0 && x.t <= t1)
        .filter_map(|x| f(x).map(|v| (x.t, v)))
        .collect();
    let mut best: Option<f64> = None;
    let mut j = 0;
    for i in 0..pts.len() {
        j = j.max(i);
        while j < pts.len() && pts[j].0 < pts[i].0 + 1_000_000_000 {
            j += 1;
        }
        if j == pts.len() {
            break;
        }
        let r = (pts[j].1 - pts[i].1) / ((pts[j].0 - pts[i].0) as f64 / 1e9);
        best = Some(best.map_or(r, |b| b.max(r)));
    }
    best
}

pub(crate) fn s_mirrored(x: &MirrorSample) -> Option<f64> {
    x.mirrored.map(|v| v as f64)
}

pub(crate) fn s_bytes(x: &MirrorSample) -> Option<f64> {
    x.log_bytes.map(|v| v as f64)
}

pub(crate) fn s_lag(x: &MirrorSample) -> Option<f64> {
    x.lag.map(|v| v as f64)
}

// ------------------------------------------------------------------ catch-up run

/// What a catch-up run found; times in ns since the run's base.
pub(crate) struct Catchup {
    pub(crate) precut_p50_ms: Option<f64>,
    pub(crate) precut_p99_ms: Option<f64>,
    pub(crate) precut_p999_ms: Option<f64>,
    pub(crate) slack_ms: f64,
    pub(crate) cut: u64,
    pub(crate) heal: u64,
    /// Messages sent before the heal, undelivered (to some subscriber) at the heal.
    pub(crate) backlog: u64,
    pub(crate) sent_during_cut: u64,
    /// Publishes sent, and refused, before the heal.
    pub(crate) sent_at_heal: u64,
    pub(crate) refused_at_heal: u64,
    pub(crate) first_delivery: Option<u64>,
    pub(crate) backlog_delivered: Option<u64>,
    pub(crate) live: Option<u64>,
    /// When the catch-up phase ended (live again, or given up).
    pub(crate) done: u64,
    pub(crate) relay_answers: Vec<String>,
}

/// Writes one command line to the relay's command FIFO (never blocks: no reader is an
/// error) and, with `--relay-out`, waits up to 2 s for the relay's answer.
pub(crate) async fn relay_command(args: &Args, cmd: &str, want: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let ctl = args
        .relay_ctl
        .as_deref()
        .ok_or_else(|| anyhow!("no --relay-ctl"))?;
    let out = args.relay_out.as_deref();
    let offset = out
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(ctl)
        .with_context(|| {
            format!(
                "cannot open the relay's command input {} (is the relay reading it?)",
                ctl.display()
            )
        })?;
    f.write_all(format!("{cmd}\n").as_bytes())
        .with_context(|| format!("writing `{cmd}` to {}", ctl.display()))?;
    drop(f);
    let Some(out) = out else {
        return Ok(format!("{cmd}: sent"));
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(all) = std::fs::read(out) {
            let new = String::from_utf8_lossy(all.get(offset as usize..).unwrap_or_default());
            if let Some(line) = new
                .lines()
                .find(|l| l.starts_with("ok ") || l.starts_with("error"))
            {
                if line.starts_with(want) {
                    return Ok(format!("{cmd}: {line}"));
                }
                bail!("the relay answered `{line}` to `{cmd}`");
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no answer from the relay to `{cmd}` in {} within 2 s",
                out.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// From the cut on: cut, wait, heal, follow the catch-up. Returns what it found and the
/// CPU samples at the heal and when live again (or given up).
pub(crate) async fn catchup_phase(
    args: &Args,
    shared: &Arc<Shared>,
    pids: &[String],
) -> (Catchup, CpuSample, CpuSample) {
    let Some(tracker) = shared.tracker.as_ref() else {
        unreachable!("a catch-up run has a tracker");
    };
    let (p50, p99, p999) = {
        let h = shared.hists.lock().unwrap_or_else(PoisonError::into_inner);
        (
            ms(&h.delivery, 0.5),
            ms(&h.delivery, 0.99),
            ms(&h.delivery, 0.999),
        )
    };
    let base_ms = p999.unwrap_or(args.delay_ms.unwrap_or(0.0) + 100.0);
    let slack_ms = (1.5 * base_ms).max(base_ms + 100.0);
    let slack = (slack_ms * 1e6) as u64;
    let mut answers = Vec::new();

    let cut = shared.now_ns();
    shared.window_end.store(cut, Ordering::Relaxed);
    let sent_at_cut = get(&shared.c.sent);
    match relay_command(args, "cut", "ok cut").await {
        Ok(a) => answers.push(a),
        Err(e) => {
            eprintln!("dtfed-bench: warning: {e:#}");
            answers.push(format!("cut: {e:#}"));
        }
    }
    eprintln!(
        "dtfed-bench: cut (pre-cut remote delivery p99 {} ms, p99.9 {} ms); healing in {} s",
        fmt_opt(p99, 1),
        fmt_opt(p999, 1),
        args.cut_secs
    );
    let heal_at = shared.instant(cut) + Duration::from_secs_f64(args.cut_secs);
    let mut next = Instant::now() + Duration::from_secs(10);
    while next < heal_at {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        progress(shared, shared.instant(cut).elapsed().as_secs_f64());
        next += Duration::from_secs(10);
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(heal_at)).await;
    let cpu_a = sample_cpu(pids);
    let heal = shared.now_ns();
    let delivered_at_heal = get(&shared.c.delivered);
    let sent_at_heal = get(&shared.c.sent);
    let refused_at_heal = get(&shared.c.pub_errors);
    let sent_during_cut = sent_at_heal.saturating_sub(sent_at_cut);
    match relay_command(args, "heal", "ok healed").await {
        Ok(a) => answers.push(a),
        Err(e) => {
            eprintln!("dtfed-bench: warning: {e:#}");
            answers.push(format!("heal: {e:#}"));
        }
    }
    let backlog = tracker.pending_before(heal);
    eprintln!(
        "dtfed-bench: healed; backlog {backlog} messages ({sent_during_cut} sent during the cut)"
    );

    let deadline = shared.instant(heal) + Duration::from_secs_f64(args.catchup_max);
    let mut first_delivery = None;
    let mut backlog_delivered = None;
    let mut live_since: Option<u64> = None;
    let mut live = None;
    let mut next_progress = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = shared.now_ns();
        if first_delivery.is_none() && get(&shared.c.delivered) > delivered_at_heal {
            first_delivery = Some(now);
            eprintln!(
                "dtfed-bench: first delivery {:.2} s after the heal",
                (now - heal) as f64 / 1e9
            );
        }
        let oldest = tracker.oldest_pending();
        if backlog_delivered.is_none() && oldest.is_none_or(|o| o >= heal) {
            backlog_delivered = Some(now);
            eprintln!(
                "dtfed-bench: backlog delivered {:.2} s after the heal",
                (now - heal) as f64 / 1e9
            );
        }
        let fresh = oldest.is_none_or(|o| now.saturating_sub(o) <= slack);
        if backlog_delivered.is_some() && fresh {
            let since = *live_since.get_or_insert(now);
            if now - since >= 1_000_000_000 {
                live = Some(since);
                eprintln!(
                    "dtfed-bench: live again {:.2} s after the heal",
                    (since - heal) as f64 / 1e9
                );
                break;
            }
        } else {
            live_since = None;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "dtfed-bench: not live again {} s after the heal: giving up",
                args.catchup_max
            );
            break;
        }
        if Instant::now() >= next_progress {
            progress(shared, shared.instant(cut).elapsed().as_secs_f64());
            next_progress += Duration::from_secs(5);
        }
    }
    let cpu_b = sample_cpu(pids);
    let done = shared.now_ns();
    (
        Catchup {
            precut_p50_ms: p50,
            precut_p99_ms: p99,
            precut_p999_ms: p999,
            slack_ms,
            cut,
            heal,
            backlog,
            sent_during_cut,
            sent_at_heal,
            refused_at_heal,
            first_delivery,
            backlog_delivered,
            live,
            done,
            relay_answers: answers,
        },
        cpu_a,
        cpu_b,
    )
}

// ------------------------------------------------------------------ load run
