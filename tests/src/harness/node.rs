//! Node.js scripts as test clients: real client libraries from npm (`@stomp/stompjs`,
//! `puppeteer-core`, `clients/js`) run under `node` against real daemons.
//!
//! The scripts live in `tests/node/<package>/` next to a `package.json` and a
//! `package-lock.json`; `deploy/test.sh` runs `npm ci` in each such folder. A script reports
//! on stdout and exits non-zero on failure; [`NodeScript::run`] stops it by its PID at the
//! deadline, and on drop like every [`ChildProc`].

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::sys::{self, ChildProc};
use super::util::repo_root;

/// One `node` run: the script, its arguments and environment, and a deadline.
pub struct NodeScript {
    package: PathBuf,
    script: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    deadline: Duration,
}

/// What a finished script printed and how it exited.
#[derive(Debug)]
pub struct NodeOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl NodeOutput {
    /// Fails with both streams in the message unless the script exited 0.
    pub fn ensure_success(&self) -> Result<()> {
        if !self.status.success() {
            bail!(
                "node exited with {}\n--- stdout\n{}\n--- stderr\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(())
    }
}

impl NodeScript {
    /// `script` (a path inside `tests/node/<package>/`) with the package's `node_modules`.
    pub fn new(package: &str, script: &str) -> NodeScript {
        NodeScript {
            package: repo_root().join("tests").join("node").join(package),
            script: script.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            deadline: Duration::from_secs(120),
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> NodeScript {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeScript {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The script is killed (its whole process group) if it has not exited by then.
    pub fn deadline(mut self, deadline: Duration) -> NodeScript {
        self.deadline = deadline;
        self
    }

    /// Starts the script without waiting for it (for scripts that run beside a test's own
    /// steps); [`RunningNode::finish`] collects its output.
    pub fn start(self) -> Result<RunningNode> {
        if !self.package.join("node_modules").is_dir() {
            bail!(
                "{}/node_modules is missing: run `npm ci` there (deploy/test.sh does)",
                self.package.display()
            );
        }
        let mut cmd = Command::new("node");
        cmd.arg(&self.script)
            .args(&self.args)
            .current_dir(&self.package)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = sys::spawn(cmd, "node").with_context(|| {
            format!(
                "node {} (is Node.js installed? deploy/test.sh installs it)",
                self.script
            )
        })?;
        let stdout = drain(child.take_stdout());
        let stderr = drain(child.take_stderr());
        Ok(RunningNode {
            child,
            stdout,
            stderr,
            deadline: self.deadline,
        })
    }

    /// Runs the script to its end (or its deadline).
    pub fn run(self) -> Result<NodeOutput> {
        self.start()?.finish()
    }
}

/// A started script; dropping it kills its process group.
pub struct RunningNode {
    child: ChildProc,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
    deadline: Duration,
}

impl RunningNode {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits for the script to exit (killing it at the deadline) and returns its output.
    pub fn finish(mut self) -> Result<NodeOutput> {
        let status = match self.child.wait_timeout(self.deadline)? {
            Some(status) => status,
            None => {
                self.child.kill()?;
                let stdout = self.stdout.join().unwrap_or_default();
                let stderr = self.stderr.join().unwrap_or_default();
                bail!(
                    "node did not finish within {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
                    self.deadline
                );
            }
        };
        Ok(NodeOutput {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        })
    }
}

fn drain(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stream {
            let mut bytes = Vec::new();
            let _ = s.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}
