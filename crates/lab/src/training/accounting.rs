//! Time and memory accounting of a run: the machine, the peak resident set size, medians.

use std::fs;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: Option<String>,
    pub threads: usize,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpu_model = fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Machine { cpu_model, threads }
    }
}

/// Resets this process's peak resident set size to the current one (Linux ≥ 4.0), so that a
/// run's `peak_rss_bytes` is its own when `precond compare` trains several in one process.
pub fn reset_peak_rss() {
    // Best effort: elsewhere the peak covers the whole process (documented in the README).
    let _ = fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size (VmHWM) of this process (since the last [`reset_peak_rss`]).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The median (mean of the two middle values for an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}
