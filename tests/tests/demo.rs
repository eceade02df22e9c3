//! `dtfed demo`, as a newcomer runs it: three federated regions in one process with no
//! outside services; a message published in one region reaches a player in another, and
//! SIGINT stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::{DtfedProcess, WsClient};
use serde_json::json;

/// Kills the demo by PID if the test fails before it stops it.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_federates_three_regions_and_stops_on_sigint() -> Result<()> {
    let mut child = Command::new(DtfedProcess::binary()?)
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dtfed demo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut demo = Demo(child);
    let regions = tokio::task::spawn_blocking(move || -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["region", name, url] = parts[..] {
                out.push((name.to_owned(), url.to_owned()));
                if out.len() == 3 {
                    break;
                }
            }
        }
        Ok(out)
    })
    .await??;
    let names: Vec<&str> = regions.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["seoul", "tokyo", "frankfurt"]);

    let t = Duration::from_secs(30);
    let mut hana = WsClient::connect(&format!("{}?name=hana", regions[1].1)).await?;
    hana.sub("tavern", None, t).await?;
    let mut jun = WsClient::connect(&format!("{}?name=jun", regions[0].1)).await?;
    // The regions' links and fan-out groups settle in a few seconds: publish until tokyo
    // delivers seoul's message.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ack = jun
        .publish("tavern", json!({"text": "a round for everyone"}), t)
        .await?;
    let got = loop {
        match hana
            .recv_until(|f| f["op"] == "msg", Duration::from_secs(5))
            .await
        {
            Ok(f) => break f,
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "tokyo never delivered: {e:#}"),
        }
    };
    assert_eq!(got["origin"], "seoul");
    assert_eq!(got["offset"], ack["offset"]);
    assert_eq!(got["from"], "jun");
    assert_eq!(got["body"]["text"], "a round for everyone");

    let pid = i32::try_from(demo.0.id())?;
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = demo.0.try_wait()? {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "demo did not stop within 30 s of SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
