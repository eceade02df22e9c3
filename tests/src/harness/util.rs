//! Small helpers shared by the harness: where the repository is, free loopback ports,
//! per-server temporary directories, log tails, TCP checks, unique names.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;

use super::sys;

/// The repository root (the workspace holding `deploy/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `deploy/<script>` in the repository, checked to exist.
pub fn deploy_script(name: &str) -> Result<PathBuf> {
    let path = repo_root().join("deploy").join(name);
    anyhow::ensure!(path.is_file(), "{} is missing", path.display());
    Ok(path)
}

/// A loopback port that was free a moment ago (bind 127.0.0.1:0, read, release). Never
/// hands out the same port twice in one process.
pub fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("could not find a free loopback port in 100 tries")
}

/// Does something accept TCP connections on `addr`?
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The last `lines` lines of a file ("" if it cannot be read). Reads at most the last
/// 256 KiB.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Does the file contain `needle` after byte `from`?
pub fn file_contains_after(path: &Path, from: u64, needle: &str) -> bool {
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).contains(needle)
}

/// Size of a file, 0 if it does not exist.
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A short random lowercase suffix for unique names.
pub fn random_suffix(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// A name made safe for Kafka topics, group ids and Redis keys: `[A-Za-z0-9._-]`, at most
/// 40 characters (test names like `module::test_name` become `module.test_name`).
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .replace("::", ".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(40);
    if out.is_empty() {
        out.push('t');
    }
    out
}

/// The root of the harness's temporary directories: `$DTFED_TEST_TMP` or
/// `<tmp>/dtfed-tests`.
pub fn temp_root() -> PathBuf {
    std::env::var_os("DTFED_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dtfed-tests"))
}

/// A temporary directory `<temp_root>/<kind>-<pid>-<n>-<rand>`, removed on drop (kept
/// when `DTFED_KEEP_TEST_DIRS` is set, to read the logs afterwards). The first one made
/// in a process also removes the directories of test processes that are no longer alive
/// (left behind by a SIGKILLed test binary).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Make a fresh directory; `kind` names what lives in it.
    pub fn new(kind: &str) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        static SWEEP: Once = Once::new();
        let root = temp_root();
        SWEEP.call_once(|| sweep_stale(&root));
        let path = root.join(format!(
            "{}-{}-{}-{}",
            sanitize_name(kind),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            random_suffix(4)
        ));
        fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forget the directory without removing it; returns its path.
    pub fn into_path(self) -> PathBuf {
        let path = self.path.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        remove_test_dir(&self.path);
    }
}

/// Remove a harness directory unless `DTFED_KEEP_TEST_DIRS` is set.
pub fn remove_test_dir(path: &Path) {
    if std::env::var_os("DTFED_KEEP_TEST_DIRS").is_some() {
        eprintln!("dtfed-tests: kept {}", path.display());
        return;
    }
    let _ = fs::remove_dir_all(path);
}

fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // <kind>-<pid>-<n>-<rand>: the pid is the third field from the end.
        let fields: Vec<&str> = name.rsplitn(4, '-').collect();
        if fields.len() != 4 {
            continue;
        }
        let Ok(pid) = fields[2].parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !sys::pid_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
