//! [`Federation`]: several regions, each with its own Kafka broker, Redis server and
//! `dtfed` daemons, mirroring each other over QUIC with mutual TLS (certificates made with
//! the `dtfed certs` CLI). Every daemon has fixed ports, so a daemon killed and restarted
//! comes back at the same URLs, as a drill's topology expects; with `relayed`, every link
//! (receiver, origin) goes through its own in-process [`WanRelay`] that a test can cut.
//!
//! [`Federation::write_topology`] writes the `dtfed drill` topology file for it, and
//! [`DrillProcess`] runs `dtfed drill` against it, in the background while a test injects
//! faults itself, or to the end.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use dtfed_regions::{WanProfile, WanRelay};
use serde_json::Value;

use super::config::ConfigBuilder;
use super::daemon::DtfedProcess;
use super::kafka::KafkaCluster;
use super::redis::RedisServer;
use super::sys::{spawn, ChildProc};
use super::util::{free_port, TestDir};

/// The admin token of every daemon of a [`Federation`].
pub const ADMIN_TOKEN: &str = "federation-test-token-0123456789";

/// What to start.
#[derive(Clone, Debug)]
pub struct FederationSpec {
    pub test: String,
    pub regions: Vec<String>,
    pub daemons_per_region: usize,
    pub partitions: i64,
    /// Every link through its own cuttable relay (5 ms one way).
    pub relayed: bool,
    /// Every region serves relays (`serve_relay`) and may pull through every peer
    /// (`relay = true`): a cut link is bridged by a third region.
    pub relaying: bool,
    /// Kafka nodes of the first region (the others have one): 3 gives it replication
    /// factor 3 and `min.insync.replicas` 2.
    pub first_region_kafka_nodes: usize,
    /// TOML merged into every daemon's config (e.g. `"[client]\noutbound_queue = 64\n"`).
    pub extra_config: String,
    /// Environment variables of every daemon (secrets a config names, e.g. an API key's).
    pub env: Vec<(String, String)>,
}

impl FederationSpec {
    pub fn new(test: &str, regions: &[&str], daemons_per_region: usize) -> Self {
        FederationSpec {
            test: test.to_owned(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            daemons_per_region,
            partitions: 4,
            relayed: false,
            relaying: false,
            first_region_kafka_nodes: 1,
            extra_config: String::new(),
            env: Vec::new(),
        }
    }
}

/// One daemon's fixed addresses.
#[derive(Clone, Copy, Debug)]
pub struct DaemonPorts {
    pub client: u16,
    pub admin: u16,
    pub quic: u16,
}

/// One region: its Kafka, Redis, config and daemons.
pub struct Region {
    pub name: String,
    pub kafka: KafkaCluster,
    pub redis: RedisServer,
    pub cfg: ConfigBuilder,
    pub ports: Vec<DaemonPorts>,
    pub daemons: Vec<DtfedProcess>,
    /// Environment variables of its daemons ([`FederationSpec::env`]).
    pub env: Vec<(String, String)>,
}

impl Region {
    /// The config of daemon `i` (its node name and fixed ports).
    pub fn daemon_config(&self, i: usize) -> String {
        let p = self.ports[i];
        self.cfg
            .clone()
            .node(&format!("{}-{i}", self.name))
            .set("client", "listen", format!("127.0.0.1:{}", p.client))
            .set("admin", "listen", format!("127.0.0.1:{}", p.admin))
            .set("federation", "listen", format!("127.0.0.1:{}", p.quic))
            .build()
    }

    /// `ws://` URL of daemon `i`, as player `name`.
    pub fn ws(&self, i: usize, name: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?name={name}", self.ports[i].client)
    }
}

/// A running federation. Dropping it stops every process it started.
pub struct Federation {
    pub regions: Vec<Region>,
    /// `(receiver, origin)` → the relay `receiver` dials to reach `origin`.
    pub relays: HashMap<(String, String), WanRelay>,
    _certs: TestDir,
}

impl Federation {
    /// Starts Kafka and Redis of every region, makes certificates, starts every daemon and
    /// waits until each is ready.
    pub async fn start(spec: FederationSpec) -> Result<Federation> {
        let certs = TestDir::new(&format!("{}-certs", spec.test))?;
        let names: Vec<&str> = spec.regions.iter().map(String::as_str).collect();
        make_certs(certs.path(), &names)?;
        let mut ports: HashMap<String, Vec<DaemonPorts>> = HashMap::new();
        for r in &spec.regions {
            let mut v = Vec::new();
            for _ in 0..spec.daemons_per_region {
                v.push(DaemonPorts {
                    client: free_port()?,
                    admin: free_port()?,
                    quic: free_udp_port()?,
                });
            }
            ports.insert(r.clone(), v);
        }
        let mut relays = HashMap::new();
        if spec.relayed {
            for receiver in &spec.regions {
                for origin in spec.regions.iter().filter(|o| *o != receiver) {
                    // One relay per link, to the origin's first daemon.
                    let upstream = SocketAddr::from(([127, 0, 0, 1], ports[origin][0].quic));
                    let relay = WanRelay::start(
                        "127.0.0.1:0".parse()?,
                        upstream,
                        WanProfile::with_delay(Duration::from_millis(5)),
                    )
                    .await?;
                    relays.insert((receiver.clone(), origin.clone()), relay);
                }
            }
        }
        let via: HashMap<(String, String), SocketAddr> = relays
            .iter()
            .map(|(k, r)| (k.clone(), r.local_addr()))
            .collect();
        let certs_dir = certs.path().to_owned();
        let regions = tokio::task::spawn_blocking(move || -> Result<Vec<Region>> {
            let mut regions = start_regions(&spec, &ports, &via, &certs_dir)?;
            start_daemons(&mut regions)?;
            Ok(regions)
        })
        .await??;
        Ok(Federation {
            regions,
            relays,
            _certs: certs,
        })
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> &Region {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    /// The region called `name`, mutably (to kill or restart its daemons).
    pub fn region_mut(&mut self, name: &str) -> &mut Region {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    /// Writes the `dtfed drill` topology of this federation to `path`.
    pub fn write_topology(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for r in &self.regions {
            let ws: Vec<String> = r
                .ports
                .iter()
                .map(|p| format!("\"ws://127.0.0.1:{}/ws\"", p.client))
                .collect();
            let admin: Vec<String> = r
                .ports
                .iter()
                .map(|p| format!("\"http://127.0.0.1:{}\"", p.admin))
                .collect();
            text.push_str(&format!(
                "[[region]]\nname = \"{}\"\nws = [{}]\nadmin = [{}]\nadmin_token = \"{ADMIN_TOKEN}\"\n\n",
                r.name,
                ws.join(", "),
                admin.join(", ")
            ));
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// A free UDP port on loopback (for a QUIC listener).
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Makes the federation CA and one certificate per region with the `dtfed certs` CLI.
pub fn make_certs(dir: &Path, regions: &[&str]) -> Result<()> {
    let bin = DtfedProcess::binary()?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .context("running dtfed certs")?;
        anyhow::ensure!(
            out.status.success(),
            "dtfed {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let d = dir.to_str().context("utf-8 dir")?;
    run(&["certs", "init", "--dir", d])?;
    for r in regions {
        run(&["certs", "issue", "--dir", d, "--region", r])?;
    }
    Ok(())
}

fn start_regions(
    spec: &FederationSpec,
    ports: &HashMap<String, Vec<DaemonPorts>>,
    via: &HashMap<(String, String), SocketAddr>,
    certs: &Path,
) -> Result<Vec<Region>> {
    let base = ConfigBuilder::new(&spec.test, &spec.regions[0]);
    let started: Vec<(String, KafkaCluster, RedisServer)> = std::thread::scope(|s| {
        let handles: Vec<_> = spec
            .regions
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let nodes = if i == 0 {
                    spec.first_region_kafka_nodes
                } else {
                    1
                };
                s.spawn(move || -> Result<(String, KafkaCluster, RedisServer)> {
                    Ok((
                        n.clone(),
                        KafkaCluster::start(nodes)?,
                        RedisServer::start()?,
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("start thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let topics: HashMap<String, String> = spec
        .regions
        .iter()
        .map(|n| (n.clone(), base.for_region(n).local_topic()))
        .collect();
    started
        .into_iter()
        .map(|(name, kafka, redis)| -> Result<Region> {
            let mut fed = format!(
                "[federation]\nlisten = \"127.0.0.1:0\"\nca_cert = \"{dir}/ca.crt\"\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n",
                dir = certs.display(),
            );
            if spec.relaying {
                fed.push_str("serve_relay = true\n");
            }
            for peer in spec.regions.iter().filter(|p| **p != name) {
                let addrs: Vec<String> = match via.get(&(name.clone(), peer.clone())) {
                    Some(a) => vec![format!("\"{a}\"")],
                    None => ports[peer]
                        .iter()
                        .map(|p| format!("\"127.0.0.1:{}\"", p.quic))
                        .collect(),
                };
                fed.push_str(&format!(
                    "[[federation.peers]]\nname = \"{peer}\"\naddrs = [{}]\ntopic = \"{}\"\npartitions = {}\n",
                    addrs.join(", "),
                    topics[peer],
                    spec.partitions
                ));
                if spec.relaying {
                    fed.push_str("relay = true\n");
                }
            }
            let replication = if kafka.nodes.len() >= 3 { 3 } else { 1 };
            Ok(Region {
                cfg: base
                    .for_region(&name)
                    .kafka(&kafka.bootstrap())
                    .set("kafka", "replication_factor", replication)
                    .redis(&redis.url())
                    .partitions(spec.partitions)
                    .unthrottled()
                    .set("kafka", "session_timeout_ms", 4000)
                    .admin_token(ADMIN_TOKEN)
                    .merge_toml(&fed)
                    .merge_toml(&spec.extra_config),
                ports: ports[&name].clone(),
                name,
                kafka,
                redis,
                daemons: Vec::new(),
                env: spec.env.clone(),
            })
        })
        .collect()
}

/// Starts every daemon of every region, in parallel (each waits for its readiness).
fn start_daemons(regions: &mut [Region]) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = regions
            .iter()
            .enumerate()
            .flat_map(|(ri, r)| {
                (0..r.ports.len()).map(move |i| (ri, r.daemon_config(i), r.env.clone()))
            })
            .map(|(ri, cfg, env)| {
                s.spawn(move || {
                    let env: Vec<(&str, &str)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    DtfedProcess::start_with_env(&cfg, &env).map(|d| (ri, d))
                })
            })
            .collect();
        for h in handles {
            let (ri, d) = h
                .join()
                .map_err(|_| anyhow::anyhow!("daemon start panicked"))??;
            regions[ri].daemons.push(d);
        }
        Ok::<(), anyhow::Error>(())
    })?;
    // Daemon i of a region is the one with the ports of index i.
    for r in regions.iter_mut() {
        let ports = r.ports.clone();
        r.daemons.sort_by_key(|d| {
            ports
                .iter()
                .position(|p| p.client == d.client_addr().port())
                .unwrap_or(usize::MAX)
        });
    }
    Ok(())
}

/// A `dtfed drill` process.
pub struct DrillProcess {
    proc: ChildProc,
}

/// How a drill ended.
#[derive(Debug)]
pub struct DrillOutcome {
    pub exit_code: i32,
    /// The JSON object of its last line.
    pub report: Value,
    /// Everything it printed.
    pub output: String,
}

impl DrillProcess {
    /// Starts `dtfed drill --topology <topology> --json <args>`.
    pub fn start(topology: &Path, args: &[&str]) -> Result<DrillProcess> {
        Self::start_with_env(topology, args, &[])
    }

    /// [`start`](Self::start) with extra environment variables (the topology's commands
    /// see them too).
    pub fn start_with_env(
        topology: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<DrillProcess> {
        let mut cmd = Command::new(DtfedProcess::binary()?);
        cmd.envs(env.iter().copied());
        cmd.arg("drill")
            .arg("--topology")
            .arg(topology)
            .arg("--json")
            .args(args)
            .env("NO_COLOR", "1")
            .env("DTFED_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(DrillProcess {
            proc: spawn(cmd, "dtfed drill")?,
        })
    }

    /// Waits up to `timeout` for it to end, and reads its report.
    pub fn finish(mut self, timeout: Duration) -> Result<DrillOutcome> {
        // Read stdout and stderr on threads, so a chatty drill cannot block on a full pipe.
        let err = self.proc.take_stderr().context("the drill's stderr")?;
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let out = self.proc.take_stdout().context("the drill's stdout")?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let status = self
            .proc
            .wait_timeout(timeout)?
            .with_context(|| format!("dtfed drill still running after {timeout:?}"))?;
        let mut output = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the drill's output reader panicked"))?;
        let errors = errors
            .join()
            .map_err(|_| anyhow::anyhow!("the drill's error reader panicked"))?;
        if !errors.is_empty() {
            output.push_str("--- stderr ---\n");
            output.push_str(&errors);
        }
        let last = output
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("no JSON line in the drill's output:\n{output}"))?;
        Ok(DrillOutcome {
            exit_code: status.code().unwrap_or(-1),
            report: serde_json::from_str(last)?,
            output,
        })
    }
}
