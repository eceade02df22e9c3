//! `clients/js` (`@dtfed/client`) against real daemons: two federated regions (each its own
//! Kafka, Redis and daemon, mirroring over QUIC with mutual TLS), and Node scripts from
//! `tests/node/jsclient/` driving the library over the `ws` package. What a player sees: a
//! conversation across regions, every message once and in order; and a region stopped
//! mid-conversation, the client moving to the other region and back, missing nothing.
//!
//! Also runs the library's own unit tests (`node --test clients/js/test/`), so `.ci/run`
//! runs them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dtfed_tests::harness::sys;
use dtfed_tests::harness::util::repo_root;
use dtfed_tests::harness::{
    pid_alive, Federation, FederationSpec, NodeOutput, NodeScript, RunningNode, TestDir,
};

/// Each test runs two Kafka brokers and two daemons: one at a time on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The environment every script gets: region URLs and names, and a fresh room.
fn script(fed: &Federation, file: &str, room: &str) -> NodeScript {
    let (a, b) = (&fed.regions[0], &fed.regions[1]);
    NodeScript::new("jsclient", file)
        .env("URL_A", format!("ws://127.0.0.1:{}/ws", a.ports[0].client))
        .env("URL_B", format!("ws://127.0.0.1:{}/ws", b.ports[0].client))
        .env("REGION_A", &a.name)
        .env("REGION_B", &b.name)
        .env("ROOM", room)
}

/// Fails with the script's output unless it exited 0 and said `ok` last.
fn ensure_ok(out: &NodeOutput) -> Result<()> {
    println!("--- script stdout\n{}", out.stdout); // shown with --nocapture or on failure
    out.ensure_success()?;
    let last = out.stdout.lines().last().unwrap_or_default();
    anyhow::ensure!(
        last.contains(" ok: "),
        "the script exited 0 without its ok line:\n{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn library_unit_tests_pass() -> Result<()> {
    let dir = repo_root().join("clients").join("js");
    let mut cmd = Command::new("node");
    cmd.arg("--test")
        .arg("test/")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sys::spawn(cmd, "node --test")?;
    let (mut out, mut err) = (child.take_stdout(), child.take_stderr());
    let status = child
        .wait_timeout(Duration::from_secs(60))?
        .context("node --test did not finish within 60 s")?;
    let mut text = String::new();
    for s in [
        out.as_mut().map(|s| s as &mut dyn std::io::Read),
        err.as_mut().map(|s| s as &mut dyn std::io::Read),
    ]
    .into_iter()
    .flatten()
    {
        let _ = s.read_to_string(&mut text);
    }
    anyhow::ensure!(status.success(), "node --test failed:\n{text}");
    anyhow::ensure!(text.contains("# fail 0"), "no test summary:\n{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_across_two_regions_arrives_once_in_order() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let fed = Federation::start(FederationSpec::new("jsc-conv", &["seoul", "tokyo"], 1)).await?;
    let run = script(&fed, "conversation.mjs", "table-conv");
    let out = tokio::task::spawn_blocking(move || run.run()).await??;
    ensure_ok(&out)
}

/// Waits until the script writes `name` in `dir` (or exits, or `timeout` passes).
async fn wait_control(dir: &Path, name: &str, node: &RunningNode, timeout: Duration) -> Result<()> {
    let end = Instant::now() + timeout;
    while !dir.join(name).exists() {
        if !pid_alive(node.pid()) {
            bail!("the script exited before writing {name}");
        }
        if Instant::now() > end {
            bail!("the script did not write {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How the first region's daemon goes away mid-conversation.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGTERM: it drains (every in-flight publish gets its ack) and exits.
    Graceful,
    /// SIGKILL: a crash.
    Crash,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_mid_conversation_and_comes_back_missing_nothing() -> Result<()> {
    failover_and_back(Stop::Graceful, "jsc-failover").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_when_its_region_crashes_and_comes_back_missing_nothing() -> Result<()> {
    failover_and_back(Stop::Crash, "jsc-crash").await
}

/// The failover drill with the crash early, while the receiving region may still be in
/// its first mirror transactions: a daemon killed then came back unable to read that mirror
/// partition's tail (only an aborted record and its marker) and never mirrored it again;
/// the tail now reads such a partition as empty (`daemon/src/mirror/reads.rs`, and
/// `mirror_log::real_tail_of_a_partition_holding_only_an_aborted_first_transaction_is_empty`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_crashed_during_its_first_mirror_transaction_mirrors_again() -> Result<()> {
    failover_and_back_with(Stop::Crash, "jsc-early-crash", true).await
}

/// alice (seoul first) and bob (tokyo first) talk; seoul's daemon goes away (by its PID)
/// when the script says so, and comes back, at the same address, when it says so again.
async fn failover_and_back(stop: Stop, test: &str) -> Result<()> {
    failover_and_back_with(stop, test, false).await
}

/// [`failover_and_back`]; with `early`, the stop comes before the players see each other's
/// messages (while the receiving region may still be in its first mirror transactions).
async fn failover_and_back_with(stop: Stop, test: &str, early: bool) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fed = Federation::start(FederationSpec::new(test, &["seoul", "tokyo"], 1)).await?;
    let control = TestDir::new(&format!("{test}-control"))?;
    let node = script(&fed, "failover.mjs", &format!("table-{test}"))
        .env("CONTROL_DIR", control.path().display().to_string())
        .env(
            "STOP",
            if matches!(stop, Stop::Crash) {
                "kill"
            } else {
                "term"
            },
        )
        .env("EARLY", if early { "1" } else { "0" })
        .deadline(Duration::from_secs(180))
        .start()?;
    let steps = async {
        wait_control(control.path(), "stop-a", &node, Duration::from_secs(60)).await?;
        tokio::task::block_in_place(|| {
            let daemon = &mut fed.region_mut("seoul").daemons[0];
            match stop {
                Stop::Graceful => daemon.terminate().map(drop),
                Stop::Crash => daemon.kill9(),
            }
        })
        .context("stopping seoul's daemon")?;
        wait_control(control.path(), "start-a", &node, Duration::from_secs(60)).await?;
        tokio::task::block_in_place(|| fed.region_mut("seoul").daemons[0].restart())
            .context("restarting seoul's daemon")?;
        std::fs::write(control.path().join("a-started"), "")?;
        anyhow::Ok(())
    }
    .await;
    if steps.is_err() {
        // Stop the script now rather than at its deadline, and show what it printed.
        let _ = sys::send_signal(node.pid() as i32, libc::SIGKILL);
    }
    let out = tokio::task::spawn_blocking(move || node.finish()).await??;
    if let Err(e) = steps {
        bail!(
            "{e:#}\n--- script stdout\n{}\n--- stderr\n{}",
            out.stdout,
            out.stderr
        );
    }
    ensure_ok(&out)?;
    Ok(())
}
