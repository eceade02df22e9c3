//! [`KafkaBroker`]: a real single-node Apache Kafka 4.3.1 (KRaft, broker+controller) on
//! loopback, started through `deploy/kafka.sh run` in a temporary directory.
//!
//! - [`KafkaBroker::start`] gives a test its own broker (about 1.5 s once the jars are
//!   fetched; the first start on a machine also fetches them, ~15 s).
//! - [`KafkaBroker::shared`] gives every test of a test binary the same broker, started
//!   once; tests keep apart by using unique topic and group names (see
//!   [`ConfigBuilder`](crate::ConfigBuilder)). It is killed and its directory removed when
//!   the test binary exits.
//!
//! A broker is ready when its `server.log` says `Kafka Server started` (after the start in
//! question: restarts append to the same log) and its port accepts TCP connections.
//! Dropping a broker SIGKILLs it (even on panic) and removes its directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::sys::{self, ChildProc};
use super::util::{self, TestDir};

const READY_LINE: &str = "Kafka Server started";
/// Covers a first start that must also fetch Kafka from Maven Central.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A running (or stopped, between [`stop`](Self::stop) and [`restart`](Self::restart))
/// single-node Kafka broker.
#[derive(Debug)]
pub struct KafkaBroker {
    port: u16,
    controller_port: u16,
    dir: TestDir,
    proc: Option<ChildProc>,
    /// The length of `server.log` at the last launch: readiness is looked for after it.
    ready_from: u64,
    /// Set for a node of a [`KafkaCluster`].
    member: Option<ClusterMember>,
}

/// A node's place in a [`KafkaCluster`].
#[derive(Debug, Clone)]
struct ClusterMember {
    node_id: u32,
    voters: String,
    cluster_id: String,
}

/// Several [`KafkaBroker`]s forming one KRaft cluster (each a broker and a controller),
/// started together: with three nodes, topics get replication factor 3 and
/// `min.insync.replicas` 2 (see `deploy/kafka.sh`), so one node can be killed at any time
/// without losing an acknowledged write.
#[derive(Debug)]
pub struct KafkaCluster {
    pub nodes: Vec<KafkaBroker>,
}

impl KafkaCluster {
    /// Starts `nodes` nodes on free ports and waits until every one is ready.
    pub fn start(nodes: usize) -> Result<Self> {
        anyhow::ensure!(nodes >= 1, "a cluster needs a node");
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok((util::free_port()?, util::free_port()?)))
            .collect::<Result<_>>()?;
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // A Kafka Uuid: 22 characters of URL-safe base64, not starting with '-'.
        let cluster_id = format!("A{}", util::random_suffix(21));
        let mut cluster = KafkaCluster { nodes: Vec::new() };
        for (i, (port, controller_port)) in ports.into_iter().enumerate() {
            let mut b = KafkaBroker {
                port,
                controller_port,
                dir: TestDir::new(&format!("kafka-node{}", i + 1))?,
                proc: None,
                ready_from: 0,
                member: Some(ClusterMember {
                    node_id: i as u32 + 1,
                    voters: voters.clone(),
                    cluster_id: cluster_id.clone(),
                }),
            };
            // Every node must be up before any is ready: a quorum needs a majority.
            b.launch()?;
            cluster.nodes.push(b);
        }
        for b in &mut cluster.nodes {
            b.wait_ready()?;
        }
        Ok(cluster)
    }

    /// Every node's `127.0.0.1:<port>`, comma separated, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(KafkaBroker::bootstrap)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (index into `nodes`) leading `topic`/`partition`, from Kafka's own
    /// `TopicCommand --describe` (a JVM start, a second or two).
    pub fn leader_of(&self, topic: &str, partition: i32) -> Result<usize> {
        let up = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .context("no node of the cluster runs")?;
        let classpath = Command::new("bash")
            .arg(util::deploy_script("kafka.sh")?)
            .arg("classpath")
            .output()
            .context("deploy/kafka.sh classpath")?;
        let classpath = String::from_utf8_lossy(&classpath.stdout).trim().to_owned();
        let out = Command::new("java")
            .args([
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                "-cp",
                &classpath,
            ])
            .arg("org.apache.kafka.tools.TopicCommand")
            .args([
                "--bootstrap-server",
                &up.bootstrap(),
                "--describe",
                "--topic",
                topic,
            ])
            .output()
            .context("running TopicCommand --describe")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("Partition: {partition}\t");
        let line = text
            .lines()
            .find(|l| l.contains(&want))
            .with_context(|| format!("no partition {partition} of {topic} in:\n{text}"))?;
        let leader: u32 = line
            .split("Leader: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no leader in {line:?}"))?;
        self.nodes
            .iter()
            .position(|n| n.member.as_ref().is_some_and(|m| m.node_id == leader))
            .with_context(|| format!("leader {leader} is not a node of this cluster"))
    }
}

impl KafkaBroker {
    /// Start a broker on free loopback ports in a fresh temporary directory, and wait
    /// until it is ready.
    pub fn start() -> Result<Self> {
        let mut broker = KafkaBroker {
            port: util::free_port()?,
            controller_port: util::free_port()?,
            dir: TestDir::new("kafka")?,
            proc: None,
            ready_from: 0,
            member: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// The process-wide broker of this test binary: started by the first caller, shared
    /// by all tests, killed at exit. It cannot be stopped or restarted (use
    /// [`start`](Self::start) for that). Fails in every caller if it failed to start.
    pub fn shared() -> Result<&'static KafkaBroker> {
        static SHARED: OnceLock<std::result::Result<KafkaBroker, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let broker = KafkaBroker::start().map_err(|e| format!("{e:#}"))?;
                let pid = broker.pid().expect("a started broker has a pid");
                let dir = broker.dir().to_path_buf();
                sys::at_exit(move || kill_and_remove(pid, &dir));
                Ok(broker)
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the shared Kafka broker failed to start: {e}"))
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready()
    }

    /// Starts the process without waiting for it to be ready.
    fn launch(&mut self) -> Result<()> {
        anyhow::ensure!(self.proc.is_none(), "Kafka broker is already running");
        let dir = self.dir.path();
        self.ready_from = util::file_len(&self.server_log());
        let out_path = dir.join("kafka.out");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("open {}", out_path.display()))?;
        let mut cmd = Command::new("bash");
        cmd.arg(util::deploy_script("kafka.sh")?)
            .arg("run")
            .args(["--port", &self.port.to_string()])
            .args(["--controller-port", &self.controller_port.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some(m) = &self.member {
            cmd.args(["--node-id", &m.node_id.to_string()])
                .args(["--voters", &m.voters])
                .args(["--cluster-id", &m.cluster_id]);
        }
        self.proc = Some(sys::spawn(cmd, "kafka")?);
        Ok(())
    }

    /// Waits until the launched broker has logged that it started and takes connections.
    fn wait_ready(&mut self) -> Result<()> {
        let log = self.server_log();
        let log_offset = self.ready_from;
        let mut proc = self.proc.take().context("Kafka broker is not launched")?;
        let started = Instant::now();
        let addr = util::loopback(self.port);
        loop {
            if let Some(status) = proc.try_wait()? {
                anyhow::bail!(
                    "Kafka broker on {addr} exited during start-up ({status}); {}",
                    self.describe_logs()
                );
            }
            if util::file_contains_after(&log, log_offset, READY_LINE) && util::port_open(addr) {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = proc.kill();
                anyhow::bail!(
                    "Kafka broker on {addr} not ready after {:?} (killed it); {}",
                    START_TIMEOUT,
                    self.describe_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(proc);
        Ok(())
    }

    fn describe_logs(&self) -> String {
        format!(
            "last lines of {}:\n{}\nlast lines of {}:\n{}",
            self.dir.path().join("kafka.out").display(),
            util::tail_file(&self.dir.path().join("kafka.out"), 15),
            self.server_log().display(),
            util::tail_file(&self.server_log(), 30)
        )
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker (client) port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The KRaft controller port.
    pub fn controller_port(&self) -> u16 {
        self.controller_port
    }

    /// The broker JVM's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// Is the broker process alive?
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(sys::pid_alive)
    }

    /// The broker's directory (`server.properties`, `server.log`, `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log file.
    pub fn server_log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last `lines` lines of the broker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.server_log(), lines)
    }

    /// Graceful stop: SIGTERM, wait (30 s), then SIGKILL. Data is kept for
    /// [`restart`](Self::restart). No-op if not running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            let (_, killed) = proc.terminate(STOP_GRACE)?;
            if killed {
                eprintln!(
                    "dtfed-tests: Kafka on port {} ignored SIGTERM for {STOP_GRACE:?}: killed",
                    self.port
                );
            }
        }
        Ok(())
    }

    /// Crash: SIGKILL, no shutdown. Data is kept for [`restart`](Self::restart). No-op if
    /// not running.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.kill()?;
        }
        Ok(())
    }

    /// Start again on the same ports with the same data (stopping it first, gracefully,
    /// if it runs), and wait until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "dtfed-tests: Kafka on port {}: last lines of {}:\n{}",
                self.port,
                self.server_log().display(),
                self.log_tail(20)
            );
        }
        // The process dies before its directory is removed (field order would do the
        // opposite for the SIGKILL-on-drop of ChildProc).
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.kill();
        }
    }
}

/// At-exit clean-up of a shared server: SIGKILL its process group, wait for it, remove
/// its directory.
pub(crate) fn kill_and_remove(pid: u32, dir: &Path) {
    let _ = sys::send_signal(-(pid as i32), sys::SIGKILL);
    sys::wait_pid_gone(pid, Duration::from_secs(5));
    util::remove_test_dir(dir);
}
