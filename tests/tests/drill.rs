//! `dtfed drill`, as ops run it: against `dtfed demo` (its topology written by the demo
//! itself) with a link pause, and against a server that acks but loses messages, where the
//! verdict must say so and the exit status must be non-zero.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use dtfed_tests::harness::sys::spawn;
use dtfed_tests::harness::{DrillOutcome, DrillProcess};
use dtfed_tests::{DtfedProcess, TestDir};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

const DRILL_ARGS: [&str; 10] = [
    "--rooms",
    "6",
    "--rate",
    "30",
    "--duration",
    "6",
    "--converge-timeout",
    "20",
    "--fault",
    "",
];

/// Runs `dtfed drill` with `fault` to its end.
fn drill(topology: &Path, fault: &str) -> Result<DrillOutcome> {
    let mut args = DRILL_ARGS;
    args[9] = fault;
    DrillProcess::start(topology, &args)?.finish(Duration::from_secs(90))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_pause_drill_on_the_demo_loses_nothing() -> Result<()> {
    let dir = TestDir::new("drill-demo")?;
    let topology = dir.path().join("topology.toml");
    let mut cmd = Command::new(DtfedProcess::binary()?);
    cmd.args(["demo", "--port", "0", "--write-topology"])
        .arg(&topology)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut demo = spawn(cmd, "dtfed demo")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !topology.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the demo wrote no topology");
        anyhow::ensure!(!demo.has_exited(), "the demo exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The demo's regions settle their links and groups in a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let DrillOutcome {
        exit_code: code,
        report,
        output: out,
    } = tokio::task::spawn_blocking(move || drill(&topology, "link-pause:tokyo,seoul")).await??;
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["verdict"], "pass", "{out}");
    assert_eq!(report["fault"], "link-pause:tokyo,seoul");
    assert!(report["acked"].as_u64().unwrap_or(0) >= 100, "{out}");
    for key in ["lost", "duplicated", "reordered", "gaps"] {
        assert_eq!(report[key], 0, "{key}: {out}");
    }
    assert!(report["converge_ms"].is_u64(), "{out}");
    assert_eq!(report["canaries"].as_array().map(Vec::len), Some(3));
    demo.kill()?;
    Ok(())
}

/// A stand-in "region" that speaks enough of protocol v1 for a drill, acks every publish
/// with a fresh offset and delivers it to every subscriber, except every `drop_every`th.
async fn lossy_region(name: &'static str, drop_every: u64) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/ws", listener.local_addr()?);
    let (tx, _) = broadcast::channel::<String>(10_000);
    let offsets = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            let offsets = offsets.clone();
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let mut rx = tx.subscribe();
                loop {
                    tokio::select! {
                        frame = stream.next() => {
                            let Some(Ok(Message::Text(text))) = frame else { return };
                            let Ok(f) = serde_json::from_str::<Value>(&text) else { continue };
                            let room = f["room"].clone();
                            let answer = match f["op"].as_str() {
                                Some("sub") => json!({"op": "synced", "room": room, "cursor": {}}),
                                Some("pub") => {
                                    let offset = offsets.fetch_add(1, Ordering::SeqCst);
                                    if offset % drop_every != drop_every - 1 {
                                        let _ = tx.send(json!({
                                            "op": "msg", "room": room, "origin": name,
                                            "offset": offset, "prev": null, "ts": 0,
                                            "from": "x", "body": f["body"],
                                        }).to_string());
                                    }
                                    json!({"op": "ack", "ref": f["ref"], "room": room,
                                           "origin": name, "offset": offset})
                                }
                                _ => continue,
                            };
                            if sink.send(Message::text(answer.to_string())).await.is_err() {
                                return;
                            }
                        }
                        msg = rx.recv() => {
                            let Ok(msg) = msg else { return };
                            if sink.send(Message::text(msg)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_against_a_lossy_server_fails_and_says_where() -> Result<()> {
    let dir = TestDir::new("drill-lossy")?;
    let topology = dir.path().join("topology.toml");
    // Two "regions" that never hear each other: each canary misses the other's messages,
    // and one of them also drops every 10th of its own.
    let a = lossy_region("alpha", 10).await?;
    let b = lossy_region("beta", u64::MAX).await?;
    std::fs::write(
        &topology,
        format!("[[region]]\nname = \"alpha\"\nws = [\"{a}\"]\n\n[[region]]\nname = \"beta\"\nws = [\"{b}\"]\n"),
    )?;
    let DrillOutcome {
        exit_code: code,
        report,
        output: out,
    } = tokio::task::spawn_blocking(move || drill(&topology, "none")).await??;
    assert_eq!(code, 1, "a lossy run exits 1: {out}");
    assert_eq!(report["verdict"], "fail", "{out}");
    let acked = report["acked"].as_u64().unwrap_or(0);
    let lost = report["lost"].as_u64().unwrap_or(0);
    // Each canary misses everything the other region acked, plus alpha's dropped tenth
    // (missed by alpha's own canary too).
    assert!(lost > acked / 2, "acked {acked}, lost {lost}: {out}");
    assert!(
        report["troubled_rooms"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{out}"
    );
    Ok(())
}

/// Local regions started with `deploy/region.sh`; `region.sh clean` (which stops every
/// process by its PID file) when dropped, also when the test fails.
struct LocalRegions {
    names: Vec<String>,
    env: Vec<(String, String)>,
}

impl LocalRegions {
    fn region_sh(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = Command::new("bash")
            .arg(dtfed_tests::harness::util::deploy_script("region.sh")?)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "region.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }
}

impl LocalRegions {
    /// Runs a drill with `fault` over these regions (10 rooms, 40 msg/s, `secs` seconds),
    /// with their environment (the topology's commands run `region.sh`), and checks that
    /// it passed: nothing lost, duplicated or reordered.
    async fn drill(&self, topology: &Path, fault: &str, secs: u32) -> Result<DrillOutcome> {
        let env = self.env.clone();
        let (topology, fault) = (topology.to_owned(), fault.to_owned());
        let outcome = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let secs = secs.to_string();
            let args = [
                "--fault",
                &fault,
                "--rooms",
                "10",
                "--rate",
                "40",
                "--duration",
                &secs,
                "--converge-timeout",
                "60",
            ];
            DrillProcess::start_with_env(&topology, &args, &env)?.finish(Duration::from_secs(240))
        })
        .await??;
        let out = &outcome.output;
        assert_eq!(outcome.exit_code, 0, "{out}");
        assert_eq!(outcome.report["verdict"], "pass", "{out}");
        for key in ["lost", "duplicated", "reordered"] {
            assert_eq!(outcome.report[key], 0, "{key}: {out}");
        }
        Ok(outcome)
    }
}

impl Drop for LocalRegions {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.region_sh(&["clean", "--name", name]);
        }
    }
}

/// A base port with the 30 ports region.sh uses above it free, below Linux's ephemeral
/// range (32768 and up): nothing listens there, but any outgoing connection of the tests
/// running beside this one may take such a port as its own while region.sh starts.
fn free_base() -> u16 {
    loop {
        let base = 20_000 + 100 * rand::random_range(0..127u16);
        let taken = (0..30).any(|i| {
            dtfed_tests::harness::util::port_open(dtfed_tests::harness::util::loopback(base + i))
        });
        if !taken {
            return base;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_down_drill_on_local_regions_loses_nothing() -> Result<()> {
    let dir = TestDir::new("drill-regions")?;
    let suffix = dtfed_tests::harness::util::random_suffix(4);
    let (seoul, tokyo) = (format!("seoul-{suffix}"), format!("tokyo-{suffix}"));
    let (sb, tb) = (free_base(), free_base());
    let certs = dir.path().join("certs");
    let bin = DtfedProcess::binary()?;
    let regions = LocalRegions {
        names: vec![seoul.clone(), tokyo.clone()],
        env: vec![
            ("DTFED_BIN".into(), bin.display().to_string()),
            ("DTFED_KAFKA_PROFILE".into(), "test".into()),
        ],
    };
    let token = "drill-token-0123456789abcdef";
    let start = |name: &str, base: u16, peer: &str, peer_base: u16| -> Vec<String> {
        [
            "start",
            "--name",
            name,
            "--base-port",
            &base.to_string(),
            "--peer",
            &format!("{peer}:{peer_base}"),
            "--certs",
            &certs.display().to_string(),
            "--admin-token",
            token,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (a, b) = (start(&seoul, sb, &tokyo, tb), start(&tokyo, tb, &seoul, sb));
    let regions = tokio::task::spawn_blocking(move || -> Result<LocalRegions> {
        std::thread::scope(|s| {
            let ha =
                s.spawn(|| regions.region_sh(&a.iter().map(String::as_str).collect::<Vec<_>>()));
            let hb =
                s.spawn(|| regions.region_sh(&b.iter().map(String::as_str).collect::<Vec<_>>()));
            for h in [ha, hb] {
                h.join()
                    .map_err(|_| anyhow::anyhow!("region.sh thread panicked"))??;
            }
            Ok::<(), anyhow::Error>(())
        })?;
        Ok(regions)
    })
    .await??;
    let topology = dir.path().join("topology.toml");
    let listing = regions.region_sh(&["topology", &seoul, &tokyo])?;
    std::fs::write(&topology, &listing.stdout)?;

    let outcome = regions
        .drill(&topology, &format!("region-down:{seoul}"), 20)
        .await?;
    let out = &outcome.output;
    // seoul's canary moved to tokyo when its region went down.
    let canary = &outcome.report["canaries"][0];
    assert!(
        canary["resumes_ms"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{out}"
    );
    assert!(
        canary["last_url"].as_str().is_some_and(
            |u| u.contains(&format!(":{}/", tb + 10)) || u.contains(&format!(":{}/", tb + 20))
        ),
        "{out}"
    );

    // Then one daemon killed (the topology's `kill`, SIGKILL) and started again (`start`):
    // seoul's canary moves to seoul's other daemon.
    let outcome = regions
        .drill(&topology, &format!("daemon-kill:{seoul}"), 15)
        .await?;
    let out = &outcome.output;
    let canary = &outcome.report["canaries"][0];
    assert!(
        canary["last_url"]
            .as_str()
            .is_some_and(|u| u.contains(&format!(":{}/", sb + 20))),
        "seoul's canary should be on seoul's second daemon: {out}"
    );
    drop(regions);
    Ok(())
}
