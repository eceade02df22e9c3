//! The memory run: many idle subscribed connections, the server's RSS growth per connection.

use super::*;

pub(crate) async fn idle_run(args: &Args, n: usize) -> anyhow::Result<Outcome> {
    check_common(args)?;
    if n == 0 {
        bail!("--idle-connections must be at least 1");
    }
    if args.pids.is_empty() {
        eprintln!("dtfed-bench: warning: no --pid given: only this process' memory is reported");
    }
    let run_id = run_id(args);
    let pids: Vec<String> = args.pids.iter().map(u32::to_string).collect();
    let rss = |pids: &[String]| -> Option<u64> {
        pids.iter()
            .try_fold(0, |acc, p| status_kb(p, "VmRSS").map(|r| acc + r))
    };
    let before = rss(&pids);
    let self_before = status_kb("self", "VmRSS");
    eprintln!(
        "dtfed-bench: {} — opening {n} idle connections over {} rooms (run id {run_id})",
        args.label, args.rooms
    );
    let conns = connect_all(args, &args.urls, Role::Both, &run_id, n).await?;
    let shared_closing = Arc::new(AtomicBool::new(false));
    let disconnects = Arc::new(AtomicU64::new(0));
    let mut sinks = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for (_, ws) in conns {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let closing = shared_closing.clone();
        let disconnects = disconnects.clone();
        readers.push(tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                if m.is_err() || matches!(m, Ok(Message::Close(_))) {
                    break;
                }
            }
            if !closing.load(Ordering::Relaxed) {
                disconnects.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.idle_hold)).await;
    let after = rss(&pids);
    let hwm = pids
        .iter()
        .try_fold(0, |acc, p| status_kb(p, "VmHWM").map(|r| acc + r));
    let self_after = status_kb("self", "VmRSS");
    let lost = disconnects.load(Ordering::Relaxed);

    shared_closing.store(true, Ordering::Relaxed);
    let goodbyes = sinks.into_iter().map(|mut sink| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), sink.close()).await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        futures::stream::iter(goodbyes)
            .buffer_unordered(512)
            .collect::<Vec<()>>(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(deadline, r).await.is_err() {
            abort.abort();
        }
    }

    let per_conn = match (before, after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    let self_per_conn = match (self_before, self_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    println!();
    println!("== dtfed-bench idle connections: {} ==", args.label);
    println!("  {:<28} {n} over {} rooms", "connections", args.rooms);
    println!(
        "  {:<28} {} MB → {} MB (peak {} MB)",
        "server RSS",
        fmt_opt(before.map(|k| k as f64 / 1024.0), 1),
        fmt_opt(after.map(|k| k as f64 / 1024.0), 1),
        fmt_opt(hwm.map(|k| k as f64 / 1024.0), 1)
    );
    println!(
        "  {:<28} {} KB",
        "server RSS per connection",
        fmt_opt(per_conn, 2)
    );
    println!(
        "  {:<28} {} KB",
        "bench RSS per connection",
        fmt_opt(self_per_conn, 2)
    );
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} idle connections were closed by the server"));
        println!("  FAIL: {lost} idle connections were closed by the server");
    }
    if let Some(path) = &args.json {
        append_json(
            path,
            &json!({
                "mode": "idle",
                "label": args.label,
                "run_id": run_id,
                "connections": n,
                "rooms": args.rooms,
                "server_rss_before_kb": before,
                "server_rss_after_kb": after,
                "server_hwm_kb": hwm,
                "server_kb_per_conn": per_conn,
                "bench_kb_per_conn": self_per_conn,
                "disconnects": lost,
                "ok": failures.is_empty(),
                "failures": failures,
            }),
        )?;
    }
    Ok(if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed
    })
}

// ------------------------------------------------------------------ report
