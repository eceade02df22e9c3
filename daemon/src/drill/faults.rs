//! The faults a drill injects and heals, against a [`Topology`].
//!
//! | fault | inject | heal |
//! | --- | --- | --- |
//! | `link-pause[:R]` | every link between R and the other regions paused, both ways, through the admin API of every daemon (`POST /peers/<region>/pause`) | resumed |
//! | `link-pause:R,P` | only the link between R and P, both ways | resumed |
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
    /// All of a region's links, or (with the second region) only the one between them.
    LinkPause(String, Option<String>),
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
        // `link-pause:R,P`: one link only.
        let (region, peer) = match region.and_then(|r| r.split_once(',')) {
            Some((r, p)) => (Some(r), Some(p.to_owned())),
            None => (region, None),
        };
        if let Some(p) = &peer {
            anyhow::ensure!(
                kind == "link-pause",
                "--fault {spec}: only link-pause takes a second region"
            );
            anyhow::ensure!(
                topo.region(p).is_some() && Some(p.as_str()) != region,
                "--fault {spec}: {p:?} is not another region of the topology"
            );
        }
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
                Fault::LinkPause(region, peer)
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
            Fault::LinkPause(r, p) => links(topo, r, p.as_deref(), "pause").await,
            Fault::RegionDown(r) => run_command(region(topo, r)?.stop.as_deref(), r, "stop").await,
            Fault::DaemonKill(r) => run_command(region(topo, r)?.kill.as_deref(), r, "kill").await,
            Fault::DaemonDrain(r) => drain(region(topo, r)?).await,
        }
    }

    /// Undoes it.
    pub async fn heal(&self, topo: &Topology) -> anyhow::Result<()> {
        match self {
            Fault::None => Ok(()),
            Fault::LinkPause(r, p) => links(topo, r, p.as_deref(), "resume").await,
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
            Fault::LinkPause(r, None) => write!(f, "link-pause:{r}"),
            Fault::LinkPause(r, Some(p)) => write!(f, "link-pause:{r},{p}"),
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

/// Pauses or resumes every link between `target` and the other regions (or only the one
/// with `only`), on both sides.
async fn links(
    topo: &Topology,
    target: &str,
    only: Option<&str>,
    verb: &str,
) -> anyhow::Result<()> {
    for r in &topo.regions {
        let peers: Vec<&str> = if r.name == target {
            topo.regions
                .iter()
                .filter(|o| o.name != target && only.is_none_or(|p| o.name == p))
                .map(|o| o.name.as_str())
                .collect()
        } else if only.is_none_or(|p| r.name == p) {
            vec![target]
        } else {
            Vec::new()
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
    tracing::info!(region = target, only, "links {verb}d");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::topology::RegionEntry;

    fn topo() -> Topology {
        Topology {
            regions: ["seoul", "tokyo", "frankfurt"]
                .into_iter()
                .map(|n| RegionEntry {
                    name: n.into(),
                    ws: vec![format!("ws://{n}:1/ws")],
                    admin: vec![format!("http://{n}:2")],
                    admin_token: String::new(),
                    stop: (n == "tokyo").then(|| "true".into()),
                    start: (n == "tokyo").then(|| "true".into()),
                    kill: None,
                })
                .collect(),
        }
    }

    #[test]
    fn faults_name_their_regions_and_links() {
        let t = topo();
        let parse = |s: &str| Fault::parse(s, &t);
        assert_eq!(
            parse("link-pause").unwrap(),
            Fault::LinkPause("seoul".into(), None)
        );
        assert_eq!(
            parse("link-pause:tokyo,seoul").unwrap(),
            Fault::LinkPause("tokyo".into(), Some("seoul".into()))
        );
        assert_eq!(
            parse("link-pause:tokyo,seoul").unwrap().to_string(),
            "link-pause:tokyo,seoul"
        );
        assert_eq!(
            parse("region-down:tokyo").unwrap(),
            Fault::RegionDown("tokyo".into())
        );
        for bad in [
            "link-pause:tokyo,tokyo",
            "link-pause:tokyo,atlantis",
            "region-down:tokyo,seoul",
            "region-down:seoul",
            "daemon-kill:tokyo",
            "link-pause:atlantis",
            "meteor",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
