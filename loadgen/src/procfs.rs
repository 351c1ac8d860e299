//! What the load generator reads about the server from /proc: CPU time and resident memory.

use std::fs;
use std::io;

/// utime and stime of process `pid`, in seconds.
pub fn user_system_s(pid: u32) -> io::Result<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; the fields after it follow its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("bad stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("bad stat"))
    };
    // SAFETY: sysconf only reads a system constant.
    #[allow(unsafe_code)]
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? as f64 / per_s, ticks(12)? as f64 / per_s))
}

/// The CPU time (user and system) of processes `pids` together, in seconds; `None` for none
/// (a cluster's nodes: `--server-pid 1,2,3`).
pub fn cpu_s(pids: &[u32]) -> io::Result<Option<f64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0.0;
    for &pid in pids {
        let (user, system) = user_system_s(pid)?;
        total += user + system;
    }
    Ok(Some(total))
}

/// The resident set sizes of processes `pids` together, in bytes; `None` for none.
pub fn rss_bytes_sum(pids: &[u32]) -> io::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter()
        .map(|&pid| rss_bytes(pid))
        .sum::<io::Result<u64>>()
        .map(Some)
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| io::Error::other("no VmRSS"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("bad VmRSS"))?;
    Ok(kib * 1024)
}
