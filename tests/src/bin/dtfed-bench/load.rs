//! One load run (and the checks of its arguments): connect, warm up, publish at the rate or
//! flat out, drain, measure.

use super::*;

pub(crate) fn run_id(args: &Args) -> String {
    args.run_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()))
}

pub(crate) fn check_common(args: &Args) -> anyhow::Result<()> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be > 0");
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        bail!("--warmup must be >= 0");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be >= 0");
    }
    for (what, v) in [
        ("--idle-hold", args.idle_hold),
        ("--connect-timeout", args.connect_timeout),
        ("--drain-timeout", args.drain_timeout),
        ("--drain-max", args.drain_max),
    ] {
        if !(0.0..1e6).contains(&v) {
            bail!("{what} must be a number of seconds >= 0, got {v}");
        }
    }
    for pid in args.pids.iter().chain(&args.infra_pids) {
        if cpu_ticks(&pid.to_string()).is_none() {
            bail!("--pid {pid}: no such process (cannot read /proc/{pid}/stat)");
        }
    }
    for u in &args.sub_urls {
        client_url(u, "x")?;
    }
    if args.subscribers == Some(0) {
        bail!("--subscribers must be at least 1");
    }
    if args.subscribers.is_some() && args.sub_urls.is_empty() {
        bail!("--subscribers needs --sub-url (without it every client subscribes)");
    }
    if args.flat_out && args.inflight == 0 {
        bail!("--inflight must be at least 1");
    }
    if let Some(d) = args.delay_ms {
        if !(0.0..1e6).contains(&d) {
            bail!("--delay-ms must be >= 0, got {d}");
        }
    }
    if let Some(url) = &args.mirror_status {
        admin_hostport(url)?;
    }
    if args.catchup {
        if args.sub_urls.is_empty() {
            bail!(
                "--catchup needs --sub-url: the subscribers must be in the region across the relay"
            );
        }
        if args.relay_ctl.is_none() {
            bail!("--catchup needs --relay-ctl (the relay's command FIFO)");
        }
        if args.flat_out || args.rate <= 0.0 {
            bail!("--catchup publishes at a steady --rate (> 0), not --flat-out");
        }
        for (what, v) in [
            ("--cut-secs", args.cut_secs),
            ("--catchup-max", args.catchup_max),
        ] {
            if !(v > 0.0 && v < 1e6) {
                bail!("{what} must be a number of seconds > 0, got {v}");
            }
        }
    }
    Ok(())
}

pub(crate) async fn load_run(args: &Args) -> anyhow::Result<Outcome> {
    check_common(args)?;
    let run_id = run_id(args);
    let n = args.clients;
    let remote = !args.sub_urls.is_empty();
    let m = if remote {
        args.subscribers.unwrap_or(n)
    } else {
        0
    };
    // Subscribers first, so all of them are live before the first publish.
    let sub_conns = if remote {
        connect_all(args, &args.sub_urls, Role::Sub, &run_id, m).await?
    } else {
        Vec::new()
    };
    let pub_role = if remote { Role::Pub } else { Role::Both };
    let conns = match connect_all(args, &args.urls, pub_role, &run_id, n).await {
        Ok(c) => c,
        Err(e) => {
            close_all(sub_conns.into_iter().map(|(_, ws)| ws).collect()).await;
            return Err(e);
        }
    };

    let mut subs_per_room = vec![0u64; args.rooms];
    for i in 0..if remote { m } else { n } {
        subs_per_room[i % args.rooms] += 1;
    }
    let base = Instant::now();
    // Everyone starts 200 ms from now; the first ticks are spread over one period.
    let start = base + Duration::from_millis(200);
    let warm_end = start + Duration::from_secs_f64(args.warmup);
    // The end of the measured window; in a catch-up run, the cut.
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| t.duration_since(base).as_nanos() as u64;
    let shared = Arc::new(Shared {
        base,
        run_id: run_id.clone(),
        window_start: ns(warm_end),
        window_end: AtomicU64::new(ns(end)),
        // A catch-up run stops publishing once caught up.
        pub_end: AtomicU64::new(if args.catchup { u64::MAX / 4 } else { ns(end) }),
        subs_per_room,
        c: Counters::default(),
        hists: Mutex::new(Hists {
            ack: new_hist()?,
            delivery: new_hist()?,
        }),
        errors_by_code: Mutex::new(BTreeMap::new()),
        notes: Mutex::new(Vec::new()),
        closing: AtomicBool::new(false),
        tracker: args.catchup.then(|| Tracker::new(n)),
    });

    let publishing = args.flat_out || args.rate > 0.0;
    let period = if publishing && !args.flat_out {
        Duration::from_secs_f64(n as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    if publishing && !args.flat_out && period < Duration::from_micros(100) {
        bail!(
            "--rate {} over {n} clients is {:.0} msg/s per client: use more clients",
            args.rate,
            args.rate / n as f64
        );
    }
    let pace_text = if args.flat_out {
        format!("flat out, {} in flight per publisher", args.inflight)
    } else {
        format!(
            "{} msg/s ({:.2} msg/s per client)",
            args.rate,
            args.rate / n as f64
        )
    };
    let where_text = if remote {
        format!(
            "{n} publishers on {}, {m} subscribers on {}",
            args.urls.join(" "),
            args.sub_urls.join(" ")
        )
    } else {
        format!("{n} clients")
    };
    eprintln!(
        "dtfed-bench: {} — {where_text}, {} rooms, {pace_text}, warm-up {} s, measuring {} s{}, \
         run id {run_id}",
        args.label,
        args.rooms,
        args.warmup,
        args.duration,
        if args.catchup {
            format!(" then a {} s cut", args.cut_secs)
        } else {
            String::new()
        }
    );

    let mut readers = Vec::with_capacity(n + m);
    let mut publishers = Vec::with_capacity(n);
    let mut idle_sinks = Vec::new();
    for (j, ws) in sub_conns {
        let room = room_name(&run_id, j % args.rooms)?;
        let (sink, stream) = ws.split();
        readers.push(tokio::spawn(reader(
            shared.clone(),
            stream,
            j,
            Role::Sub,
            room.clone(),
            None,
        )));
        idle_sinks.push((Some(room), sink));
    }
    {
        let mut rng = rand::rng();
        for (i, ws) in conns {
            let room = room_name(&run_id, i % args.rooms)?;
            let (sink, stream) = ws.split();
            let window = args
                .flat_out
                .then(|| Arc::new(Semaphore::new(args.inflight)));
            readers.push(tokio::spawn(reader(
                shared.clone(),
                stream,
                i,
                pub_role,
                room.clone(),
                window.clone(),
            )));
            // Publishers of a remote run did not subscribe: nothing to unsubscribe.
            let sub_room = pub_role.subscribes().then(|| room.clone());
            if publishing {
                let pace = match window {
                    Some(w) => Pace::Window(w),
                    None => Pace::Rate {
                        first_tick: tokio::time::Instant::from_std(
                            start
                                + Duration::from_nanos(
                                    rng.random_range(0..period.as_nanos() as u64),
                                ),
                        ),
                        period,
                    },
                };
                let task = tokio::spawn(publisher(
                    shared.clone(),
                    sink,
                    i,
                    room.clone(),
                    pace,
                    args.body_bytes,
                ));
                publishers.push((sub_room, task));
            } else {
                idle_sinks.push((sub_room, sink));
            }
        }
    }
    let sampler = MirrorSampler::start(args, shared.clone()).await;

    // CPU of the servers and of this process over the measured window (a catch-up run:
    // from the heal until live again).
    // Sampled in this order: --pid..., --infra-pid..., this process.
    let mut pids: Vec<String> = args
        .pids
        .iter()
        .chain(&args.infra_pids)
        .map(u32::to_string)
        .collect();
    pids.push("self".into());
    let metrics_at = match &args.metrics {
        Some(url) => Some(admin_hostport(url)?),
        None => None,
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(warm_end)).await;
    let mut cpu_a = sample_cpu(&pids);
    let hops_a = scrape_hops(&shared, metrics_at.as_deref()).await;
    let progress_every = Duration::from_secs(5);
    let mut next_progress = warm_end + progress_every;
    while next_progress < end {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next_progress)).await;
        progress(
            &shared,
            next_progress.duration_since(warm_end).as_secs_f64(),
        );
        next_progress += progress_every;
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    let mut cpu_b = sample_cpu(&pids);
    let hops_b = scrape_hops(&shared, metrics_at.as_deref()).await;
    let hop_rows: Vec<(&str, &str, hops::Hist)> = match (&hops_a, &hops_b) {
        (Some(a), Some(b)) => hops::HOPS
            .iter()
            .filter_map(|(name, what)| b.get(*name).map(|h| (*name, *what, h.minus(a.get(*name)))))
            .collect(),
        _ => Vec::new(),
    };
    let catchup = if args.catchup {
        let (c, a, b) = catchup_phase(args, &shared, &pids).await;
        (cpu_a, cpu_b) = (a, b);
        // Publish one more second at the steady rate, then stop.
        shared
            .pub_end
            .store(shared.now_ns() + 1_000_000_000, Ordering::Relaxed);
        Some(c)
    } else {
        None
    };
    let rss: Vec<(Option<u64>, Option<u64>)> = args
        .pids
        .iter()
        .map(|p| {
            let p = p.to_string();
            (status_kb(&p, "VmRSS"), status_kb(&p, "VmHWM"))
        })
        .collect();

    // Publishers stop at `pub_end`; then wait for the stragglers.
    let mut sinks = idle_sinks;
    let publishers_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for (room, p) in publishers {
        match tokio::time::timeout_at(publishers_deadline, p).await {
            Ok(Ok(Some(sink))) => sinks.push((room, sink)),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => shared.note(format!("publisher task failed: {e}")),
            Err(_) => shared.note("a publisher did not stop within 15 s".into()),
        }
    }
    // Drain: a slow server (deliveries far behind) is told apart from a lossy one by
    // waiting as long as acks or deliveries still arrive.
    let drain_start = Instant::now();
    let hard_deadline = drain_start + Duration::from_secs_f64(args.drain_max);
    let idle_limit = Duration::from_secs_f64(args.drain_timeout);
    let mut last_seen = (u64::MAX, u64::MAX);
    let mut last_progress = drain_start;
    let drained = loop {
        let answered = get(&shared.c.acked) + get(&shared.c.pub_errors);
        let delivered = get(&shared.c.delivered);
        if answered >= get(&shared.c.sent) && delivered >= get(&shared.c.expected) {
            break true;
        }
        let now = Instant::now();
        if (answered, delivered) != last_seen {
            last_seen = (answered, delivered);
            last_progress = now;
        }
        if now >= hard_deadline || now.duration_since(last_progress) >= idle_limit {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain_s = drain_start.elapsed().as_secs_f64();
    if drain_s > 1.0 {
        eprintln!("dtfed-bench: drained in {drain_s:.1} s after the last publish");
    }
    let mirror = match sampler {
        Some(s) => Some(s.stop().await),
        None => None,
    };

    // Orderly goodbye: unsub, close, let the readers see the server's close.
    shared.closing.store(true, Ordering::Relaxed);
    let goodbyes = sinks.into_iter().map(|(room, mut sink)| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            if let Some(room) = room {
                let unsub = encode_client_frame(&ClientFrame::Unsub { room });
                let _ = sink.send(Message::Text(unsub.into())).await;
            }
            let _ = sink.close().await;
        })
        .await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures::stream::iter(goodbyes)
            .buffer_unordered(256)
            .collect::<Vec<()>>(),
    )
    .await;
    let reader_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(reader_deadline, r).await.is_err() {
            abort.abort();
        }
    }

    let tck = clk_tck();
    let cpu = cpu_pct(&cpu_a, &cpu_b, tck);
    let results = LoadResults {
        args,
        run_id: &run_id,
        shared: &shared,
        cpu: &cpu,
        rss: &rss,
        drained,
        drain_s,
        subscribers: m,
        mirror: mirror.as_deref(),
        catchup: catchup.as_ref(),
        hops: &hop_rows,
    };
    results.print_and_save()
}

pub(crate) fn progress(shared: &Shared, at_s: f64) {
    eprintln!(
        "dtfed-bench: {at_s:>4.0} s: sent {} acked {} delivered {}/{}",
        get(&shared.c.sent),
        get(&shared.c.acked),
        get(&shared.c.delivered),
        get(&shared.c.expected)
    );
}
