//! The faults a drill injects and heals, against a [`Topology`].
//!
//! | fault | inject | heal |
//! | --- | --- | --- |
//! | `link-pause[:R]` | every link between R and the other regions paused, both ways, through the admin API of every daemon (`POST /peers/<region>/pause`) | resumed |
//! | `region-down[:R]` | R's `stop` command | R's `start` command |
//! | `daemon-kill[:R]` | R's `kill` command (one daemon, SIGKILL) | R's `start` command, if any |
//! | `daemon-drain[:R]` | `POST /drain` on R's first admin URL: that daemon hands its partitions and mirror tasks over and exits | R's `start` command, if any |
//! | `none` | — | — |
//!
//! R defaults to the first region of the topology.

use std::fmt;

use anyhow::Context;

use super::topology::{RegionEntry, Topology};
use crate::status::admin_request;

/// What a drill does to the federation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    LinkPause(String),
    RegionDown(String),
    DaemonKill(String),
    DaemonDrain(String),
}

impl Fault {
    /// Parses `--fault`, checking it against the topology (every problem at once).
    pub fn parse(spec: &str, topo: &Topology) -> anyhow::Result<Fault> {
        let (kind, region) = match spec.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (spec, None),
        };
        let region = region
            .map(str::to_owned)
            .or_else(|| topo.regions.first().map(|r| r.name.clone()))
            .context("the topology has no region")?;
        let entry = topo
            .region(&region)
            .with_context(|| format!("--fault {spec}: no region {region:?} in the topology"))?;
        let need = |cmd: &Option<String>, what: &str| {
            anyhow::ensure!(
                cmd.is_some(),
                "--fault {spec}: region {region} has no `{what}` command in the topology"
            );
            Ok(())
        };
        Ok(match kind {
            "none" => Fault::None,
            "link-pause" => {
                anyhow::ensure!(
                    topo.regions.iter().all(|r| !r.admin.is_empty()),
                    "--fault {spec}: every region needs its admin URLs in the topology"
                );
                Fault::LinkPause(region)
            }
            "region-down" => {
                need(&entry.stop, "stop")?;
                need(&entry.start, "start")?;
                Fault::RegionDown(region)
            }
            "daemon-kill" => {
                need(&entry.kill, "kill")?;
                Fault::DaemonKill(region)
            }
            "daemon-drain" => {
                anyhow::ensure!(
                    !entry.admin.is_empty(),
                    "--fault {spec}: region {region} has no admin URL in the topology"
                );
                Fault::DaemonDrain(region)
            }
            other => anyhow::bail!(
                "--fault {other:?}: one of link-pause[:REGION], region-down[:REGION], daemon-kill[:REGION], daemon-drain[:REGION], none"
            ),
        })
    }

    /// Injects the fault.
    pub async fn inject(&self, topo: &Topology) -> anyhow::Result<()> {
        match self {
            Fault::None => Ok(()),
            Fault::LinkPause(r) => links(topo, r, "pause").await,
            Fault::RegionDown(r) => run_command(region(topo, r)?.stop.as_deref(), r, "stop").await,
            Fault::DaemonKill(r) => run_command(region(topo, r)?.kill.as_deref(), r, "kill").await,
            Fault::DaemonDrain(r) => drain(region(topo, r)?).await,
        }
    }

    /// Undoes it.
    pub async fn heal(&self, topo: &Topology) -> anyhow::Result<()> {
        match self {
            Fault::None => Ok(()),
            Fault::LinkPause(r) => links(topo, r, "resume").await,
            Fault::RegionDown(r) | Fault::DaemonKill(r) | Fault::DaemonDrain(r) => {
                match region(topo, r)?.start.as_deref() {
                    Some(cmd) => run_command(Some(cmd), r, "start").await,
                    None => Ok(()),
                }
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => write!(f, "none"),
            Fault::LinkPause(r) => write!(f, "link-pause:{r}"),
            Fault::RegionDown(r) => write!(f, "region-down:{r}"),
            Fault::DaemonKill(r) => write!(f, "daemon-kill:{r}"),
            Fault::DaemonDrain(r) => write!(f, "daemon-drain:{r}"),
        }
    }
}

fn region<'a>(topo: &'a Topology, name: &str) -> anyhow::Result<&'a RegionEntry> {
    topo.region(name)
        .with_context(|| format!("no region {name:?} in the topology"))
}

/// Pauses or resumes every link between `target` and the other regions, on both sides.
async fn links(topo: &Topology, target: &str, verb: &str) -> anyhow::Result<()> {
    for r in &topo.regions {
        let peers: Vec<&str> = if r.name == target {
            topo.regions
                .iter()
                .filter(|o| o.name != target)
                .map(|o| o.name.as_str())
                .collect()
        } else {
            vec![target]
        };
        let token = r.token();
        for admin in &r.admin {
            for peer in &peers {
                let path = format!("/peers/{peer}/{verb}");
                let (status, body) = admin_request(admin, "POST", &path, token.as_deref())
                    .await
                    .with_context(|| format!("{verb} {peer} on {admin}"))?;
                anyhow::ensure!(
                    status == 200,
                    "POST {admin}{path}: HTTP {status}: {}{}",
                    body.trim(),
                    if status == 401 || status == 403 {
                        " (give the region's admin_token in the topology, or DTFED_ADMIN_TOKEN)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    tracing::info!(region = target, "links {verb}d");
    Ok(())
}

/// Asks the region's first daemon to drain and exit.
async fn drain(r: &RegionEntry) -> anyhow::Result<()> {
    let admin = r
        .admin
        .first()
        .with_context(|| format!("region {} has no admin URL", r.name))?;
    let token = r.token();
    let (status, body) = admin_request(admin, "POST", "/drain", token.as_deref())
        .await
        .with_context(|| format!("POST {admin}/drain"))?;
    anyhow::ensure!(
        status == 202,
        "POST {admin}/drain: HTTP {status}: {}",
        body.trim()
    );
    tracing::info!(region = %r.name, %admin, "daemon draining");
    Ok(())
}

/// Runs an operator command with `sh -c`; a non-zero exit is an error with its output.
async fn run_command(cmd: Option<&str>, region: &str, what: &str) -> anyhow::Result<()> {
    let cmd = cmd.with_context(|| format!("region {region} has no `{what}` command"))?;
    tracing::info!(region, command = cmd, "running the {what} command");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .await
        .with_context(|| format!("running `{cmd}`"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{cmd}` ({what} {region}) failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}
