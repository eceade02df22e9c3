//! CPU and memory of other processes, from `/proc`.

use super::*;

pub(crate) fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of `pid` ("self" for this process), in clock ticks.
pub(crate) fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields restart after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub(crate) fn status_kb(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

pub(crate) struct CpuSample {
    pub(crate) at: Instant,
    pub(crate) ticks: Vec<Option<u64>>,
}

pub(crate) fn sample_cpu(pids: &[String]) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        ticks: pids.iter().map(|p| cpu_ticks(p)).collect(),
    }
}

/// CPU% per pid between two samples (100 = one core busy).
pub(crate) fn cpu_pct(a: &CpuSample, b: &CpuSample, tck: f64) -> Vec<Option<f64>> {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    a.ticks
        .iter()
        .zip(&b.ticks)
        .map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => Some(y.saturating_sub(*x) as f64 / tck / wall * 100.0),
            _ => None,
        })
        .collect()
}

// ------------------------------------------------------------------ mirror sampling
