//! [`DtfedProcess`]: one real `dtfed run --config <file>` daemon.
//!
//! The config (TOML, usually from [`ConfigBuilder`](crate::ConfigBuilder), with
//! `listen = "127.0.0.1:0"`) is written to a temporary directory; the daemon's stdout and
//! stderr go to `dtfed.log` there. Start-up is done when the daemon has printed
//! `listening client=<addr> admin=<addr>` on stdout and `GET /readyz` on the admin address
//! answers 200 (timeout 60 s; the error carries the tail of the log).
//!
//! The binary is `$DTFED_BIN`, else `dtfed` next to the test binary's `deps/` directory
//! (`target/<profile>/dtfed`): `cargo build -p dtfed` (or `deploy/test.sh`) builds it.
//! Dropping a `DtfedProcess` SIGKILLs it (its log tail is printed if the test panicked).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::http::{self, HttpResponse};
use super::sys::{self, ChildProc};
use super::util::{self, TestDir};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A running `dtfed` daemon.
#[derive(Debug)]
pub struct DtfedProcess {
    bin: PathBuf,
    dir: TestDir,
    config_path: PathBuf,
    env: Vec<(String, String)>,
    /// Extra arguments after `run --config <file>` (e.g. `--grace 3`).
    args: Vec<String>,
    proc: Option<ChildProc>,
    /// Disconnected once the stdout reader thread has copied everything to the log.
    stdout_copied: Option<mpsc::Receiver<()>>,
    client: SocketAddr,
    admin: SocketAddr,
}

/// How long, after the daemon exited, its last stdout lines may take to reach the log.
const STDOUT_DRAIN: Duration = Duration::from_secs(2);

impl DtfedProcess {
    /// Where the `dtfed` binary is: `$DTFED_BIN`, or `target/<profile>/dtfed` found from
    /// the running test binary (`target/<profile>/deps/<test>-<hash>`).
    pub fn binary() -> Result<PathBuf> {
        if let Some(bin) = std::env::var_os("DTFED_BIN") {
            let bin = PathBuf::from(bin);
            anyhow::ensure!(bin.is_file(), "DTFED_BIN={} is not a file", bin.display());
            return Ok(bin);
        }
        let exe = std::env::current_exe().context("current_exe")?;
        let mut candidates = Vec::new();
        let mut dir = exe.parent();
        // deps/ -> <profile>/ ; also accept a binary sitting in <profile>/ itself.
        for _ in 0..2 {
            if let Some(d) = dir {
                candidates.push(d.join("dtfed"));
                dir = d.parent();
            }
        }
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .with_context(|| {
                format!(
                    "the dtfed binary is not built (looked for {}): build it with `cargo build -p dtfed`, or set DTFED_BIN",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// Write `config_toml` to a file and start `dtfed run --config <file>`; wait until it
    /// listens and `/readyz` is 200.
    pub fn start(config_toml: &str) -> Result<Self> {
        Self::start_with_env(config_toml, &[])
    }

    /// [`start`](Self::start) with extra environment variables (e.g. `DTFED_JWT_SECRET`,
    /// `RUST_LOG`). The daemon otherwise inherits the test's environment.
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_binary(&Self::binary()?, config_toml, env)
    }

    /// [`start_with_env`](Self::start_with_env) with an explicit binary (another build,
    /// or a stand-in in the harness's own tests). It is run as `<bin> run --config <file>`.
    pub fn start_binary(bin: &Path, config_toml: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_full(bin, config_toml, env, &[])
    }

    /// [`start_with_env`](Self::start_with_env) with extra arguments after
    /// `run --config <file>`, e.g. `["--grace", "3"]`.
    pub fn start_with_args(config_toml: &str, env: &[(&str, &str)], args: &[&str]) -> Result<Self> {
        Self::start_full(&Self::binary()?, config_toml, env, args)
    }

    fn start_full(
        bin: &Path,
        config_toml: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Self> {
        let dir = TestDir::new("dtfed")?;
        let config_path = dir.path().join("dtfed.toml");
        std::fs::write(&config_path, config_toml)
            .with_context(|| format!("write {}", config_path.display()))?;
        let mut daemon = DtfedProcess {
            bin: bin.to_path_buf(),
            dir,
            config_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            proc: None,
            stdout_copied: None,
            client: util::loopback(0),
            admin: util::loopback(0),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(self.proc.is_none(), "dtfed is already running");
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        let mut proc = sys::spawn(cmd, "dtfed")?;
        let stdout = proc_stdout(&mut proc)?;
        // Copy stdout to the log, and pass on the `listening ...` line.
        let (tx, rx) = mpsc::channel();
        let (copied_tx, copied_rx) = mpsc::channel::<()>();
        self.stdout_copied = Some(copied_rx);
        std::thread::Builder::new()
            .name("dtfed-stdout".into())
            .spawn(move || {
                copy_stdout(stdout, log, tx);
                drop(copied_tx);
            })
            .context("spawn the dtfed stdout reader thread")?;

        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        let (client, admin) = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addrs) => break addrs,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.wait_timeout(Duration::from_secs(2))?;
                    anyhow::bail!(
                        "dtfed closed its stdout without printing `listening client=.. admin=..` (exit: {}); {}",
                        status.map_or("still running".to_string(), |s| s.to_string()),
                        self.describe_log()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(status) = proc.try_wait()? {
                // Let the reader thread drain what is left into the log.
                std::thread::sleep(Duration::from_millis(100));
                anyhow::bail!(
                    "dtfed exited during start-up ({status}); {}",
                    self.describe_log()
                );
            }
            if Instant::now() >= deadline {
                let _ = proc.kill();
                anyhow::bail!(
                    "dtfed did not print `listening client=.. admin=..` within {START_TIMEOUT:?} (killed it); {}",
                    self.describe_log()
                );
            }
        };
        self.client = client;
        self.admin = admin;
        self.proc = Some(proc);

        let mut last;
        loop {
            match http::http_get(admin, "/readyz", None) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status, r.body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            let proc = self.proc.as_mut().expect("set above");
            if let Some(status) = proc.try_wait()? {
                self.proc = None;
                anyhow::bail!(
                    "dtfed exited while waiting for /readyz ({status}); {}",
                    self.describe_log()
                );
            }
            if Instant::now() >= deadline {
                let _ = proc.kill();
                self.proc = None;
                anyhow::bail!(
                    "dtfed at admin {admin} not ready within {START_TIMEOUT:?} (last /readyz: {last}; killed it); {}",
                    self.describe_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn describe_log(&self) -> String {
        format!(
            "config {}; last lines of {}:\n{}",
            self.config_path.display(),
            self.log_path().display(),
            self.log_tail(40)
        )
    }

    /// `ws://<client addr>/ws` (add `?name=` or `?token=` yourself, or use
    /// [`ws_url_as`](Self::ws_url_as)).
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.client)
    }

    /// `ws://<client addr>/ws?name=<name>` (auth = "none").
    pub fn ws_url_as(&self, name: &str) -> String {
        format!("{}?name={name}", self.ws_url())
    }

    /// `ws://<client addr>/ws?token=<jwt>` (auth = "jwt").
    pub fn ws_url_with_token(&self, token: &str) -> String {
        format!("{}?token={token}", self.ws_url())
    }

    /// The client (WebSocket) listener address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// The admin HTTP listener address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<admin addr>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `GET <path>` on the admin listener (`/metrics`, `/status`, ...).
    pub fn admin_get(&self, path: &str, token: Option<&str>) -> Result<HttpResponse> {
        http::http_get(self.admin, path, token)
    }

    /// The daemon's PID. Panics if it is not running (after [`kill9`](Self::kill9) or
    /// [`terminate`](Self::terminate)); see [`try_pid`](Self::try_pid).
    pub fn pid(&self) -> u32 {
        self.try_pid().expect("dtfed is not running")
    }

    /// The daemon's PID while it runs.
    pub fn try_pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// Is the daemon process alive?
    pub fn is_running(&self) -> bool {
        self.try_pid().is_some_and(sys::pid_alive)
    }

    /// Crash it: SIGKILL, and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.kill()?;
            self.wait_stdout_copied();
        }
        Ok(())
    }

    /// After the process exited: waits until its last stdout lines are in the log (the
    /// reader thread sees end-of-file), so `log()` and `log_tail()` show them.
    fn wait_stdout_copied(&mut self) {
        if let Some(copied) = self.stdout_copied.take() {
            let _ = copied.recv_timeout(STDOUT_DRAIN);
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the daemon without waiting for anything.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        self.proc
            .as_mut()
            .context("dtfed is not running")?
            .signal(sig)
    }

    /// Waits up to `timeout` for the daemon to exit (after [`signal`](Self::signal)); its
    /// exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let proc = self.proc.as_mut().context("dtfed is not running")?;
        let status = proc.wait_timeout(timeout)?;
        if status.is_some() {
            self.proc = None;
            self.wait_stdout_copied();
        }
        Ok(status)
    }

    /// Graceful stop: SIGTERM and wait for the exit status (the daemon drains and exits
    /// 0). Error if it is not running, or still runs 30 s after SIGTERM (then it is
    /// killed).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut proc = self.proc.take().context("dtfed is not running")?;
        let (status, killed) = proc.terminate(STOP_GRACE)?;
        self.wait_stdout_copied();
        anyhow::ensure!(
            !killed,
            "dtfed (pid {}) still ran {STOP_GRACE:?} after SIGTERM: killed it; {}",
            proc.pid(),
            self.describe_log()
        );
        Ok(status)
    }

    /// Start it again with the same config and environment (stopping it with SIGTERM
    /// first if it runs). With port 0 in the config it gets new addresses.
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.terminate()?;
        }
        self.spawn()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (stdout and stderr of the daemon, across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dtfed.log")
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.log_path(), lines)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for DtfedProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "dtfed-tests: dtfed (client {}, admin {}): last lines of {}:\n{}",
                self.client,
                self.admin,
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.kill();
        }
    }
}

fn proc_stdout(proc: &mut ChildProc) -> Result<std::process::ChildStdout> {
    proc.take_stdout().context("dtfed stdout was not piped")
}

fn copy_stdout(
    stdout: std::process::ChildStdout,
    mut log: File,
    tx: mpsc::Sender<(SocketAddr, SocketAddr)>,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut sent = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = log.write_all(&line);
        if !sent {
            if let Some(addrs) = parse_listening(&String::from_utf8_lossy(&line)) {
                sent = true;
                let _ = tx.send(addrs);
            }
        }
    }
}

/// Finds `client=<addr>` and `admin=<addr>` in a line containing `listening`.
fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let find = |key: &str| {
        line.split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|tok| tok.strip_prefix(key))
            .and_then(|v| v.trim_matches(|c| c == '"' || c == '\'').parse().ok())
    };
    Some((find("client=")?, find("admin=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let (c, a) =
            parse_listening("listening client=127.0.0.1:4100 admin=127.0.0.1:4101\n").unwrap();
        assert_eq!((c.port(), a.port()), (4100, 4101));
        let (c, _) = parse_listening(
            "2026-01-01T00:00:00Z INFO dtfed: listening client=\"127.0.0.1:1\" admin=127.0.0.1:2",
        )
        .unwrap();
        assert_eq!(c.port(), 1);
        assert!(parse_listening("listening client=127.0.0.1:1").is_none());
        assert!(parse_listening("hello").is_none());
    }
}
