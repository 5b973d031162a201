//! Server-side resource readings from `/proc`: resident memory and CPU time of given PIDs.

use anyhow::{Context, Result};
use procfs::process::Process;

/// Sum of `VmRSS` over `pids`, in KiB.
pub fn rss_kib(pids: &[i32]) -> Result<u64> {
    let mut total = 0;
    for &pid in pids {
        let status =
            Process::new(pid).and_then(|p| p.status()).with_context(|| format!("reading /proc/{pid}/status"))?;
        total += status.vmrss.unwrap_or(0);
    }
    Ok(total)
}

/// Sum of utime + stime over `pids`, in seconds (all threads of each process).
pub fn cpu_secs(pids: &[i32]) -> Result<f64> {
    let tps = procfs::ticks_per_second() as f64;
    let mut ticks = 0u64;
    for &pid in pids {
        let stat = Process::new(pid).and_then(|p| p.stat()).with_context(|| format!("reading /proc/{pid}/stat"))?;
        ticks += stat.utime + stat.stime;
    }
    Ok(ticks as f64 / tps)
}

/// Open file limit of a process (soft), from `/proc/PID/limits`.
pub fn nofile_limit(pid: i32) -> Option<u64> {
    let limits = Process::new(pid).ok()?.limits().ok()?;
    match limits.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(v) => Some(v),
        procfs::process::LimitValue::Unlimited => None,
    }
}

/// A snapshot of CPU seconds for the server PIDs and the Redis PID.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnap {
    /// Server processes, summed.
    pub server: f64,
    /// Redis, if a PID was given.
    pub redis: f64,
}

impl CpuSnap {
    /// Reads the current totals.
    pub fn take(server: &[i32], redis: Option<i32>) -> Result<Self> {
        Ok(Self {
            server: cpu_secs(server)?,
            redis: match redis {
                Some(p) => cpu_secs(&[p])?,
                None => 0.0,
            },
        })
    }

    /// Difference `self - earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self { server: self.server - earlier.server, redis: self.redis - earlier.redis }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(rss_kib(&[me]).unwrap() > 0);
        // Burn CPU until the kernel's coarse tick counts some: on a loaded
        // machine, a fixed 30 ms of wall time may get no tick at all.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_secs(&[me]).unwrap() <= 0.0 && start.elapsed().as_secs() < 20 {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        assert!(x > 0);
        assert!(cpu_secs(&[me]).unwrap() > 0.0, "no CPU time read after 20 s of spinning");
        assert!(nofile_limit(me).is_some());
    }
}
