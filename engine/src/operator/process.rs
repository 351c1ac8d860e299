//! The `process_*` metrics every Prometheus exporter gives (the names and meanings of the
//! Prometheus client libraries' process collector), read from `/proc/self` at scrape time, and
//! `chinwag_build_info`.

use std::fmt::Write;

/// The unit of the CPU times in `/proc/*/stat`: `USER_HZ`, which Linux fixes at 100 for user
/// space on every architecture it runs chinwag on (it is not the kernel's `HZ`).
const USER_HZ: f64 = 100.0;

/// This process's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessFigures {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
}

impl ProcessFigures {
    /// Reads them from `/proc`; `None` where it is not mounted.
    pub fn read() -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let fields = parse_stat(&stat)?;
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let boot_s: f64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())?;
        Some(ProcessFigures {
            resident_memory_bytes: kib("VmRSS:")? * 1024,
            virtual_memory_bytes: kib("VmSize:")? * 1024,
            open_fds,
            max_fds,
            cpu_seconds: (fields.utime + fields.stime) as f64 / USER_HZ,
            start_time_seconds: boot_s + fields.starttime as f64 / USER_HZ,
        })
    }

    /// Appends the `process_*` families.
    pub fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_memory_bytes.to_string(),
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_memory_bytes.to_string(),
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.to_string(),
        );
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            self.max_fds.to_string(),
        );
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            format!("{:.2}", self.cpu_seconds),
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            format!("{:.2}", self.start_time_seconds),
        );
    }
}

/// Appends `chinwag_build_info`: always 1, the version in a label (the usual way to expose it).
pub(crate) fn render_build_info(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP chinwag_build_info The chinwag version this process runs.\n\
         # TYPE chinwag_build_info gauge\n\
         chinwag_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

struct StatFields {
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// Fields 14, 15 and 22 of `/proc/self/stat` (proc(5)), counted after the command name, which
/// is in parentheses and may itself hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// Seconds since the Unix epoch, now.
#[cfg(test)]
fn now_s() -> f64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_command_name_holding_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 \
                    1000 200 18446744073709551615";
        let fields = parse_stat(stat).unwrap();
        assert_eq!(
            (fields.utime, fields.stime, fields.starttime),
            (250, 50, 12345)
        );
    }

    #[test]
    fn reads_this_process() {
        let figures = ProcessFigures::read().expect("/proc is mounted");
        assert!(figures.resident_memory_bytes > 0);
        assert!(figures.virtual_memory_bytes >= figures.resident_memory_bytes);
        assert!(figures.open_fds >= 3, "stdin, stdout, stderr");
        assert!(figures.max_fds >= figures.open_fds);
        assert!(figures.start_time_seconds <= now_s() + 1.0);
        assert!(figures.start_time_seconds > now_s() - 86_400.0);
        let mut out = String::new();
        figures.render(&mut out);
        render_build_info(&mut out);
        for name in [
            "# TYPE process_resident_memory_bytes gauge",
            "process_open_fds ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
            "chinwag_build_info{version=\"",
        ] {
            assert!(out.contains(name), "{name}: {out}");
        }
    }
}
