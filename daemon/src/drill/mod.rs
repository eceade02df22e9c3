//! `dtfed drill`: a failover drill against a live federation, with a verdict.
//!
//! Where to start: [`run`] is the whole drill, in order. A canary player per region
//! ([`canary`]) subscribes to every room of the run and publishes numbered messages into
//! them; a third of the way through the fault ([`faults`]) is injected, at two thirds it is
//! healed; publishing stops at the end and the drill waits for every acked message to reach
//! every canary. The [`checker`] then says, room by room, what was lost, duplicated or
//! reordered, and the drill exits non-zero if anything was. The regions come from a
//! topology file ([`topology`]); `dtfed demo --write-topology FILE` writes one.

pub mod canary;
pub mod checker;
pub mod faults;
pub mod topology;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use canary::{Canary, CanaryReport};
use checker::{Checker, Verdict};
use faults::Fault;
use topology::Topology;

#[derive(Clone, Debug, clap::Args)]
pub struct DrillArgs {
    /// The regions: WebSocket and admin URLs, tokens, stop/start/kill commands.
    #[arg(long)]
    pub topology: PathBuf,
    /// link-pause[:REGION[,PEER]], region-down[:REGION], daemon-kill[:REGION],
    /// daemon-drain[:REGION] or none (REGION: the first of the topology by default; with
    /// PEER, link-pause pauses only the link between the two).
    #[arg(long, default_value = "link-pause")]
    pub fault: String,
    /// Rooms the canaries use (fresh ones every run).
    #[arg(long, default_value_t = 20)]
    pub rooms: usize,
    /// Messages per second over all canaries.
    #[arg(long, default_value_t = 30.0)]
    pub rate: f64,
    /// Seconds of publishing; the fault is injected at 30 % and healed at 70 % of it.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds to wait, after the last publish, for every acked message to arrive.
    #[arg(long, default_value_t = 60.0)]
    pub converge_timeout: f64,
    /// Print the report as JSON too: its last line is one object.
    #[arg(long)]
    pub json: bool,
}

/// What a drill found, beyond the checker's verdict.
struct Timing {
    fault_ms: u64,
    heal_ms: u64,
    end_ms: u64,
    converge_ms: Option<u64>,
}

/// Runs the drill; `Ok(true)` when nothing was lost, duplicated or reordered.
pub async fn run(args: DrillArgs) -> anyhow::Result<bool> {
    let topo = Topology::load(&args.topology)?;
    let fault = Fault::parse(&args.fault, &topo)?;
    anyhow::ensure!((1..=200).contains(&args.rooms), "--rooms must be 1..=200");
    anyhow::ensure!(
        args.rate > 0.0 && args.duration >= 3.0,
        "--rate must be positive and --duration at least 3 s"
    );
    let run_id = format!("{:08x}", rand::random::<u32>());
    let rooms: Vec<String> = (0..args.rooms)
        .map(|i| format!("drill-{run_id}-{i}"))
        .collect();
    let epoch = Instant::now();
    let checker = Arc::new(Mutex::new(Checker::new()));
    let in_flight = Arc::new(AtomicI64::new(0));
    let go = CancellationToken::new();
    let publishing = CancellationToken::new();
    let stop = CancellationToken::new();
    println!(
        "drill {run_id}: {} regions, {} rooms, {} msg/s for {} s, fault {fault}",
        topo.regions.len(),
        rooms.len(),
        args.rate,
        args.duration
    );

    // Canaries: each starts on its own region, then tries the others in topology order.
    let mut tasks = Vec::new();
    for (i, region) in topo.regions.iter().enumerate() {
        let name = format!("drill-{}", region.name);
        checker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .subscriber(&name);
        let mut urls = region.ws.clone();
        for other in topo
            .regions
            .iter()
            .cycle()
            .skip(i + 1)
            .take(topo.regions.len() - 1)
        {
            urls.extend(other.ws.iter().cloned());
        }
        let canary = Canary {
            name,
            urls,
            rooms: rooms.clone(),
            rate: args.rate / topo.regions.len() as f64,
            run_id: run_id.clone(),
            epoch,
            checker: checker.clone(),
            in_flight: in_flight.clone(),
        };
        tasks.push(
            canary
                .start(go.clone(), publishing.clone(), stop.clone())
                .await?,
        );
    }
    go.cancel();

    let at = |frac: f64| Duration::from_secs_f64(args.duration * frac);
    let ms = |d: Instant| d.duration_since(epoch).as_millis() as u64;
    let t0 = Instant::now();
    tokio::time::sleep_until(t0 + at(0.3)).await;
    fault.inject(&topo).await.context("injecting the fault")?;
    let fault_ms = ms(Instant::now());
    println!("fault injected: {fault}");
    tokio::time::sleep_until(t0 + at(0.7)).await;
    fault.heal(&topo).await.context("healing the fault")?;
    let heal_ms = ms(Instant::now());
    println!("healed");
    tokio::time::sleep_until(t0 + at(1.0)).await;
    publishing.cancel();
    let end_ms = ms(Instant::now());

    let deadline = Instant::now() + Duration::from_secs_f64(args.converge_timeout);
    loop {
        let missing = checker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .missing();
        // Judged once every publish is answered and every acked one has arrived.
        let answered = in_flight.load(Ordering::SeqCst) <= 0;
        if (answered && missing == 0) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.context("a canary task failed")?);
    }
    let checker = checker.lock().unwrap_or_else(PoisonError::into_inner);
    let verdict = checker.verdict();
    let timing = Timing {
        fault_ms,
        heal_ms,
        end_ms,
        converge_ms: checker
            .converged_at(heal_ms)
            .map(|t| t.saturating_sub(heal_ms)),
    };
    print_report(&args, &fault, &verdict, &timing, &reports);
    Ok(verdict.passed())
}

fn print_report(
    args: &DrillArgs,
    fault: &Fault,
    v: &Verdict,
    t: &Timing,
    reports: &[CanaryReport],
) {
    let mut resumes: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.resumes_ms.iter().copied())
        .collect();
    resumes.sort_unstable();
    let p99 = resumes
        .get((resumes.len() * 99).div_ceil(100).saturating_sub(1))
        .copied();
    let mut delivery: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.delivery_ms.iter().copied())
        .collect();
    delivery.sort_unstable();
    let quantile = |q: f64| {
        (!delivery.is_empty()).then(|| {
            delivery[((delivery.len() as f64 * q).ceil() as usize).clamp(1, delivery.len()) - 1]
        })
    };
    let (d50, d99, dmax) = (quantile(0.5), quantile(0.99), delivery.last().copied());
    let troubled: Vec<_> = v
        .rooms
        .iter()
        .filter(|r| r.lost + r.duplicated + r.reordered + r.gaps > 0)
        .collect();
    println!();
    println!("canary            published  acked  errors  resumes  now on");
    for r in reports {
        let errors: u64 = r.publish_errors.values().sum();
        println!(
            "{:<17} {:>9}  {:>5}  {:>6}  {:>7}  {}",
            r.name,
            r.published,
            r.acked,
            errors,
            r.resumes_ms.len(),
            r.last_url
        );
    }
    println!();
    if troubled.is_empty() {
        println!("every room: nothing lost, duplicated or reordered");
    } else {
        println!("room                        acked  lost  dup  reord  gaps");
        for r in &troubled {
            println!(
                "{:<26} {:>6} {:>5} {:>4} {:>6} {:>5}",
                r.room, r.acked, r.lost, r.duplicated, r.reordered, r.gaps
            );
            for e in &r.lost_examples {
                println!("    {e}");
            }
        }
    }
    let fmt_ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} ms"));
    println!(
        "acked {}, lost {}, duplicated {}, reordered {}, gaps {}; resume p99 {}, converged {} after the heal",
        v.acked,
        v.lost,
        v.duplicated,
        v.reordered,
        v.gaps,
        fmt_ms(p99),
        fmt_ms(t.converge_ms)
    );
    println!(
        "delivery (publish to every canary, faults included): p50 {}, p99 {}, max {}",
        fmt_ms(d50),
        fmt_ms(d99),
        fmt_ms(dmax)
    );
    let verdict = if v.passed() { "pass" } else { "fail" };
    println!("verdict: {verdict}");
    if args.json {
        let canaries: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "published": r.published, "acked": r.acked,
                    "publish_errors": r.publish_errors, "resumes_ms": r.resumes_ms,
                    "last_url": r.last_url,
                })
            })
            .collect();
        let line = json!({
            "fault": fault.to_string(),
            "rooms": args.rooms,
            "rate": args.rate,
            "duration_s": args.duration,
            "fault_at_ms": t.fault_ms,
            "heal_at_ms": t.heal_ms,
            "end_at_ms": t.end_ms,
            "acked": v.acked,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "reordered": v.reordered,
            "gaps": v.gaps,
            "resume_ms_p99": p99,
            "converge_ms": t.converge_ms,
            "delivery_ms_p50": d50,
            "delivery_ms_p99": d99,
            "delivery_ms_max": dmax,
            "canaries": canaries,
            "troubled_rooms": troubled,
            "verdict": verdict,
        });
        println!("{line}");
    }
}
