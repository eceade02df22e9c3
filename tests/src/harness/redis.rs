//! [`RedisServer`]: a real `redis-server` on loopback, started through
//! `deploy/redis.sh run` in a temporary directory, no persistence (unless
//! [`RedisServer::start_persistent`]).
//!
//! Ready when it answers `PING`. [`RedisServer::shared`] is one server per test binary,
//! killed at exit; tests keep apart with unique key prefixes (see
//! [`ConfigBuilder`](crate::ConfigBuilder)). Dropping a server SIGKILLs it and removes its
//! directory.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::kafka::kill_and_remove;
use super::sys::{self, ChildProc};
use super::util::{self, TestDir};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(20);

/// A running (or stopped, between [`stop`](Self::stop) and [`restart`](Self::restart))
/// Redis server.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    persist: bool,
    dir: TestDir,
    proc: Option<ChildProc>,
}

impl RedisServer {
    /// Start a Redis without persistence on a free loopback port and wait for `PING`.
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Like [`start`](Self::start), with an append-only file, so data survives
    /// [`restart`](Self::restart) (and, up to the last second, [`kill`](Self::kill)).
    pub fn start_persistent() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(persist: bool) -> Result<Self> {
        let mut server = RedisServer {
            port: util::free_port()?,
            persist,
            dir: TestDir::new("redis")?,
            proc: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The process-wide Redis of this test binary: started by the first caller, shared by
    /// all tests, killed at exit. Cannot be stopped or restarted.
    pub fn shared() -> Result<&'static RedisServer> {
        static SHARED: OnceLock<std::result::Result<RedisServer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let server = RedisServer::start().map_err(|e| format!("{e:#}"))?;
                let pid = server.pid().expect("a started server has a pid");
                let dir = server.dir().to_path_buf();
                sys::at_exit(move || kill_and_remove(pid, &dir));
                Ok(server)
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the shared Redis server failed to start: {e}"))
    }

    fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(self.proc.is_none(), "Redis is already running");
        let log = self.log_path();
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut cmd = Command::new("bash");
        cmd.arg(util::deploy_script("redis.sh")?)
            .arg("run")
            .args(["--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path());
        if self.persist {
            cmd.arg("--persist");
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut proc = sys::spawn(cmd, "redis")?;
        let started = Instant::now();
        loop {
            if let Some(status) = proc.try_wait()? {
                anyhow::bail!(
                    "redis-server on port {} exited during start-up ({status}); last lines of {}:\n{}",
                    self.port,
                    log.display(),
                    util::tail_file(&log, 20)
                );
            }
            if ping(self.port) {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = proc.kill();
                anyhow::bail!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?} (killed it); last lines of {}:\n{}",
                    self.port,
                    log.display(),
                    util::tail_file(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The redis-server PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// Is the server process alive?
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(sys::pid_alive)
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.log_path(), lines)
    }

    /// Graceful stop (SIGTERM, then SIGKILL after 20 s). No-op if not running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(STOP_GRACE)?;
        }
        Ok(())
    }

    /// Crash: SIGKILL. No-op if not running.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.kill()?;
        }
        Ok(())
    }

    /// Start again on the same port (stopping it first if it runs), wait for `PING`.
    /// Without persistence the data is gone, as after a real Redis restart.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// A Redis crash in the middle of a test: SIGKILL, `down` of silence, then a restart
    /// on the same port (data gone), from async code (the blocking steps off the runtime).
    pub async fn bounce(mut self, down: std::time::Duration) -> Result<RedisServer> {
        self = tokio::task::spawn_blocking(move || self.kill().map(|()| self)).await??;
        tokio::time::sleep(down).await;
        tokio::task::spawn_blocking(move || self.restart().map(|()| self)).await?
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "dtfed-tests: Redis on port {}: last lines of {}:\n{}",
                self.port,
                self.log_path().display(),
                self.log_tail(10)
            );
        }
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.kill();
        }
    }
}

/// Does a Redis on `127.0.0.1:port` answer `PING` with `+PONG`?
pub fn ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&util::loopback(port), Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].starts_with(b"+PONG"))
    };
    attempt().unwrap_or(false)
}
