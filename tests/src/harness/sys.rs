//! Process plumbing: children that cannot outlive the test binary, signals by PID,
//! liveness checks, and clean-up at exit.
//!
//! Every child the harness starts goes through [`spawn`], which:
//!
//! - puts the child in its own process group (so a terminal's Ctrl-C reaches only the test
//!   binary, and the harness can kill a whole script's tree with one `kill(-pgid)`);
//! - sets `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child, so the kernel kills it when its
//!   parent goes away — even when the test binary is killed with SIGKILL, where no `Drop`
//!   runs. The death signal fires when the *thread* that forked the child exits, not the
//!   process, and cargo runs each test on its own short-lived thread; so all children are
//!   forked by one dedicated spawner thread that lives as long as the process.
//!   (PDEATHSIG survives `execve`, so it also covers `bash script` → `exec java`.)
//!
//! [`ChildProc`] owns a child: signal it, wait with a timeout, and on drop SIGKILL its
//! process group and reap it. A group is signalled only while its leader is not yet
//! reaped, so a recycled PID is never hit.
//!
//! This is the only module with `unsafe` code (libc `kill`, `prctl`, `getppid`, `atexit`).
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use libc::{SIGKILL, SIGTERM};

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("dtfed-tests-spawner".into())
            .spawn(move || {
                // Lives until the process exits: the PDEATHSIG of every child is tied to it.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // All senders gone (cannot happen: the static keeps one). Stay alive anyway.
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the dtfed-tests spawner thread");
        Mutex::new(tx)
    })
}

/// Spawn `cmd` in its own process group, with PDEATHSIG=SIGKILL, from the long-lived
/// spawner thread. `name` is used in messages ("kafka", "redis", "dtfed", ...).
pub fn spawn(mut cmd: Command, name: &str) -> Result<ChildProc> {
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid) and builds errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let program = format!("{:?}", cmd.get_program());
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| anyhow::anyhow!("the spawner thread is gone"))?;
    let child = rx
        .recv()
        .context("the spawner thread did not answer")?
        .with_context(|| format!("cannot start {name} ({program})"))?;
    Ok(ChildProc {
        pid: child.id() as i32,
        child,
        status: None,
        name: name.to_string(),
    })
}

/// A child process started by [`spawn`]. Dropping it SIGKILLs its process group.
#[derive(Debug)]
pub struct ChildProc {
    child: Child,
    pid: i32,
    status: Option<ExitStatus>,
    name: String,
}

impl ChildProc {
    /// The child's PID (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Take the child's stdout, if it was piped.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Take the child's stderr, if it was piped.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Exit status if it has exited (reaps it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waitpid({}) for {}", self.pid, self.name))?;
        }
        Ok(self.status)
    }

    /// Has it exited? (Reaps it if so.)
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.try_wait(), Ok(None))
    }

    /// Send `sig` to the child itself (not its group). No-op once it has been reaped.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        send_signal(self.pid, sig)
            .with_context(|| format!("kill({}, {sig}) for {}", self.pid, self.name))
    }

    /// Send `sig` to the child's whole process group (before reaping it, so the id is
    /// still ours). No-op once it has been reaped.
    pub fn signal_group(&mut self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // Not try_wait() first: a zombie leader keeps the group id reserved.
        match send_signal(-self.pid, sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("kill(-{}, {sig}) for {}", self.pid, self.name))
            }
        }
    }

    /// Wait up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the process group and reap the child.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal_group(libc::SIGKILL)?;
        match self.wait_timeout(Duration::from_secs(10))? {
            Some(status) => Ok(status),
            None => anyhow::bail!(
                "{} (pid {}) still not dead 10 s after SIGKILL",
                self.name,
                self.pid
            ),
        }
    }

    /// SIGTERM the child, wait up to `grace` for it to exit, then SIGKILL the group.
    /// Returns the exit status and whether the grace period ran out.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            // Leftovers of a script's tree, if any: the group is reaped with its leader
            // gone, so it can no longer be signalled safely; scripts here `exec`.
            return Ok((status, false));
        }
        Ok((self.kill()?, true))
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.signal_group(libc::SIGKILL);
            let _ = self.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// `kill(pid, sig)`; a negative `pid` names a process group.
pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Is there a live (not zombie, not dead) process with this PID?
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(
                stat[i + 1..].trim_start().chars().next(),
                Some('Z' | 'X' | 'x')
            ),
            None => true,
        },
        Err(_) => false,
    }
}

/// Wait up to `timeout` for `pid` to be gone (or a zombie). True if it is gone.
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

type ExitHook = Box<dyn FnOnce() + Send>;

fn exit_hooks() -> &'static Mutex<Vec<ExitHook>> {
    static HOOKS: OnceLock<Mutex<Vec<ExitHook>>> = OnceLock::new();
    HOOKS.get_or_init(|| {
        extern "C" fn run_exit_hooks() {
            let hooks = match exit_hooks().lock() {
                Ok(mut h) => std::mem::take(&mut *h),
                Err(e) => std::mem::take(&mut *e.into_inner()),
            };
            for hook in hooks {
                hook();
            }
        }
        // SAFETY: registers a plain extern "C" fn; it runs once, at exit(3).
        unsafe {
            libc::atexit(run_exit_hooks);
        }
        Mutex::new(Vec::new())
    })
}

/// Run `hook` when the process exits normally (`exit(3)`: the test harness's end, pass or
/// fail). Used for the process-wide shared servers, which are statics and never dropped.
/// (A SIGKILLed test binary runs no hooks: PDEATHSIG still kills its children.)
pub fn at_exit(hook: impl FnOnce() + Send + 'static) {
    exit_hooks()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(hook));
}
