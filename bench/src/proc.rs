//! What the benchmarks read from /proc: a process's CPU time, and whether
//! anything else is running that would spoil a measurement.

use std::time::Duration;

/// utime + stime of a whole process (all threads), in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| format!("/proc/{pid}/stat: unreadable"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ')': field 3 (state) is f[0]; utime = field 14, stime = field 15
    let field = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {}", i + 3))
    };
    let t = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(t as f64 / hz)
}

/// Process names (`comm`, at most 15 bytes) of the storage backends the
/// benchmarks start. Any of them left running busy-polls a core and makes
/// the next backend's figures wrong (measured: qemu-storage-daemon fell
/// from 1.24 M to 0.17 M IOPS beside a polling backend on its core).
pub const BACKEND_NAMES: [&str; 5] = ["quern", "qemu-storage-da", "vhost", "reactor_1", "fio"];

/// Backends running now (pid and name), other than `except`.
pub fn running_backends(except: &[u32]) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if except.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let comm = comm.trim();
        // a zombie holds no CPU
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rfind(')')
            .is_some_and(|i| state[i + 1..].trim_start().starts_with('Z'));
        if BACKEND_NAMES.contains(&comm) && !zombie {
            out.push((pid, comm.to_string()));
        }
    }
    out
}

/// The share of `core`'s time spent busy (not idle or iowait) over `window`.
pub fn core_busy_share(core: usize, window: Duration) -> Result<f64, String> {
    let read = || -> Result<(u64, u64), String> {
        let s = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
        let name = format!("cpu{core}");
        let line = s
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .ok_or_else(|| format!("/proc/stat has no {name}"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok((total, idle))
    };
    let (t0, i0) = read()?;
    std::thread::sleep(window);
    let (t1, i1) = read()?;
    let dt = (t1 - t0).max(1);
    Ok(1.0 - (i1 - i0) as f64 / dt as f64)
}
