//! The topology file a drill runs against: every region with its players' WebSocket URLs,
//! its daemons' admin URLs (and token), and the operator's commands that stop, start or
//! kill its daemons. `dtfed demo --write-topology FILE` writes one for the demo.
//!
//! ```toml
//! [[region]]
//! name = "seoul"
//! ws = ["ws://127.0.0.1:7000/ws", "ws://127.0.0.1:7010/ws"]   # any daemon of the region
//! admin = ["http://127.0.0.1:7001", "http://127.0.0.1:7011"]  # every daemon of the region
//! admin_token = ""              # or DTFED_ADMIN_TOKEN (a token in the file wins)
//! stop = "deploy/region.sh stop --name seoul"                   # fault region-down
//! start = "deploy/region.sh start --name seoul --base-port 7000"
//! kill = "kill -9 $(cat .dtfed/seoul/dtfed-1.pid)"              # fault daemon-kill
//! ```
//!
//! Commands run with `sh -c` from the directory the drill was started in.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Every region of a federation, as a drill sees it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(rename = "region")]
    pub regions: Vec<RegionEntry>,
}

/// One region of the topology.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    pub name: String,
    /// Players' WebSocket URLs (`ws://host:port/ws`), any daemon of the region.
    pub ws: Vec<String>,
    /// Admin URLs (`http://host:port`) of every daemon of the region.
    #[serde(default)]
    pub admin: Vec<String>,
    /// The daemons' `admin.token`; empty means `DTFED_ADMIN_TOKEN`, if set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_token: String,
    /// Stops every daemon of the region (fault `region-down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// Starts them again (the heal of `region-down` and `daemon-kill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Kills one daemon of the region with SIGKILL (fault `daemon-kill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill: Option<String>,
}

impl Topology {
    /// Reads and checks `path`, reporting every problem at once.
    pub fn load(path: &Path) -> anyhow::Result<Topology> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let topo: Topology =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let errs = topo.validate();
        anyhow::ensure!(errs.is_empty(), "{}:\n{}", path.display(), errs.join("\n"));
        Ok(topo)
    }

    /// Every problem: no regions, duplicate or invalid names, URLs of the wrong scheme.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.regions.len() < 2 {
            errs.push("a drill needs at least two [[region]] entries".to_owned());
        }
        for (i, r) in self.regions.iter().enumerate() {
            if !dtfed_proto::room::valid_region_name(&r.name) {
                errs.push(format!(
                    "region {:?}: must be 1-32 characters of [a-z0-9-]",
                    r.name
                ));
            }
            if self.regions[..i].iter().any(|o| o.name == r.name) {
                errs.push(format!("region {:?} is listed twice", r.name));
            }
            if r.ws.is_empty() {
                errs.push(format!("region {}: ws must list at least one URL", r.name));
            }
            for u in &r.ws {
                if !u.starts_with("ws://") {
                    errs.push(format!("region {}: ws {u:?} must start with ws://", r.name));
                }
            }
            for u in &r.admin {
                if !u.starts_with("http://") {
                    errs.push(format!(
                        "region {}: admin {u:?} must start with http://",
                        r.name
                    ));
                }
            }
        }
        errs
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> Option<&RegionEntry> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// As TOML, for `dtfed demo --write-topology`.
    pub fn to_toml(&self) -> String {
        let mut text =
            String::from("# A dtfed topology, for `dtfed drill --topology <this file>`.\n\n");
        text.push_str(&toml::to_string(self).unwrap_or_default());
        text
    }
}

impl RegionEntry {
    /// The admin token to use: the file's, else `DTFED_ADMIN_TOKEN`.
    pub fn token(&self) -> Option<String> {
        if self.admin_token.is_empty() {
            std::env::var("DTFED_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        } else {
            Some(self.admin_token.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_topology_reads_back() {
        let t = Topology {
            regions: ["seoul", "tokyo"]
                .into_iter()
                .enumerate()
                .map(|(i, n)| RegionEntry {
                    name: n.into(),
                    ws: vec![format!("ws://127.0.0.1:{}/ws", 8080 + i)],
                    admin: vec![format!("http://127.0.0.1:{}", 9090 + i)],
                    admin_token: "t".into(),
                    stop: None,
                    start: None,
                    kill: Some("kill -9 1234".into()),
                })
                .collect(),
        };
        let back: Topology = toml::from_str(&t.to_toml()).expect("parses");
        assert_eq!(back, t);
        assert!(back.validate().is_empty());
    }

    #[test]
    fn every_problem_is_reported() {
        let t: Topology = toml::from_str(
            r#"
[[region]]
name = "Seoul"
ws = ["http://x"]
admin = ["x"]
[[region]]
name = "Seoul"
ws = []
"#,
        )
        .expect("parses");
        let errs = t.validate();
        assert_eq!(errs.len(), 6, "{errs:#?}");
    }
}
