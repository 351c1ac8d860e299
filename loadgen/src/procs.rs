//! `--procs P`: the run split over P worker processes, one report.
//!
//! The parent starts P copies of itself with the same flags plus `--worker-of K,P` (which
//! slice of the users or conversations worker K takes), one `--uid-base` for all, and
//! `--worker-dump FILE`. Each worker runs its slice on its own thread and poll, with its own
//! file limit, and dumps its report with whole histograms. The parent sums counts, rates and
//! the workers' CPU, keeps the longest duration and the largest server figure, merges the
//! histograms value by value, and derives the per-message figures again from the merged
//! totals.
//!
//! Workers own whole conversations, so every conversation is still checked in one place.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::{Child, Command};

use serde_json::{json, Value};

use crate::check::Violation;
use crate::report::{latency_histogram, Report};

/// Flags the parent handles itself and does not pass on to workers (each takes a value).
const PARENT_FLAGS: [&str; 5] = [
    "--procs",
    "--uid-base",
    "--json-out",
    "--hgrm-out",
    "--plot",
];

/// Runs the command line of this process over `procs` workers; returns the merged report.
pub fn run(procs: usize, uid_base: u64) -> io::Result<Report> {
    let exe = std::env::current_exe()?;
    let args = worker_args(std::env::args().skip(1));
    let dir = std::env::temp_dir().join(format!("chinwag-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut children: Vec<Child> = Vec::with_capacity(procs);
    for k in 0..procs {
        let child = Command::new(&exe)
            .args(&args)
            .arg(format!("--uid-base={uid_base}"))
            .arg(format!("--worker-of={k},{procs}"))
            .arg("--worker-dump")
            .arg(dir.join(format!("{k}.json")))
            .arg("--quiet")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        children.push(child);
    }
    let mut merged = Merge::default();
    for (k, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        let path = dir.join(format!("{k}.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) => merged.add(&serde_json::from_str(&text).map_err(io::Error::other)?),
            Err(e) => merged
                .report
                .fail(format!("worker {k} wrote no report ({status}): {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    merged.report.figure("procs", procs as u64);
    Ok(merged.finish())
}

/// This process's arguments without the ones the parent keeps for itself.
fn worker_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if PARENT_FLAGS.contains(&arg.as_str()) {
            skip_value = true;
            continue;
        }
        // Workers are always quiet; passing it twice would be an error.
        if arg == "--quiet" {
            continue;
        }
        if PARENT_FLAGS
            .iter()
            .any(|flag| arg.starts_with(&format!("{flag}=")))
        {
            continue;
        }
        kept.push(arg);
    }
    kept
}

/// Writes a worker's report for the parent: figures in order, failures, violations, and every
/// histogram as (value, count) pairs.
pub fn dump(report: &Report, path: &Path) -> io::Result<()> {
    let figures: Vec<Value> = report
        .figures
        .iter()
        .map(|(name, value)| json!([name, value]))
        .collect();
    let histograms: BTreeMap<&str, Vec<[u64; 2]>> = report
        .latencies
        .iter()
        .map(|(name, h)| {
            let pairs = h
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect();
            (name.as_str(), pairs)
        })
        .collect();
    let first: Vec<String> = report
        .violations
        .first
        .iter()
        .map(|v| v.to_string())
        .collect();
    let value = json!({
        "figures": figures,
        "failures": report.failures,
        "violations": report.violations.count,
        "violations_first": first,
        "histograms": histograms,
    });
    std::fs::write(path, value.to_string())
}

#[derive(Default)]
struct Merge {
    report: Report,
    workers: usize,
}

impl Merge {
    fn add(&mut self, dump: &Value) {
        self.workers += 1;
        for pair in dump["figures"].as_array().into_iter().flatten() {
            let (Some(name), value) = (pair[0].as_str(), &pair[1]) else {
                continue;
            };
            match self.report.figures.iter_mut().find(|(n, _)| n == name) {
                None => self.report.figures.push((name.to_string(), value.clone())),
                Some((_, old)) => *old = combine(name, old, value),
            }
        }
        for (cause, n) in dump["failures"].as_object().into_iter().flatten() {
            *self.report.failures.entry(cause.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        self.report.violations.count += dump["violations"].as_u64().unwrap_or(0);
        for v in dump["violations_first"].as_array().into_iter().flatten() {
            if self.report.violations.first.len() < crate::check::Violations::KEPT {
                let text = v.as_str().unwrap_or("?").to_string();
                self.report.violations.first.push(Violation::Other(text));
            }
        }
        for (name, pairs) in dump["histograms"].as_object().into_iter().flatten() {
            let at = match self.report.latencies.iter().position(|(n, _)| n == name) {
                Some(at) => at,
                None => {
                    self.report
                        .latencies
                        .push((name.clone(), latency_histogram()));
                    self.report.latencies.len() - 1
                }
            };
            let h = &mut self.report.latencies[at].1;
            for pair in pairs.as_array().into_iter().flatten() {
                let (value, count) = (pair[0].as_u64(), pair[1].as_u64());
                if let (Some(value), Some(count)) = (value, count) {
                    let _ = h.record_n(value.clamp(1, h.high()), count);
                }
            }
        }
    }

    /// Derives the per-message and per-connection figures again from the merged totals.
    fn finish(mut self) -> Report {
        let get = |r: &Report, name: &str| {
            r.figures
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_f64())
        };
        let set = |r: &mut Report, name: &str, value: f64| {
            if let Some((_, v)) = r.figures.iter_mut().find(|(n, _)| n == name) {
                *v = json!(value);
            }
        };
        let r = &mut self.report;
        if let (Some(cpu), Some(rate), Some(s)) = (
            get(r, "server_cpu_s"),
            get(r, "delivered_per_s").or(get(r, "deliveries_per_s")),
            get(r, "measured_s"),
        ) {
            set(
                r,
                "server_cpu_us_per_delivered",
                cpu * 1e6 / (rate * s).max(1.0),
            );
        }
        if let (Some(before), Some(after), Some(n)) = (
            get(r, "server_rss_bytes_before"),
            get(r, "server_rss_bytes_after"),
            get(r, "logged_in"),
        ) {
            set(
                r,
                "server_rss_bytes_per_connection",
                (after - before) / n.max(1.0),
            );
        }
        self.report
    }
}

/// How one figure of two workers combines: the server's figures and durations are one
/// measurement seen twice (keep the largest, except the RSS before any load: the smallest);
/// counts, rates and the workers' own CPU add up; text is the same for all.
fn combine(name: &str, old: &Value, new: &Value) -> Value {
    let (Some(a), Some(b)) = (old.as_f64(), new.as_f64()) else {
        return old.clone();
    };
    let both_integers = old.is_u64() && new.is_u64();
    let value = if name == "server_rss_bytes_before" {
        a.min(b)
    } else if name.starts_with("server_") || is_duration(name) {
        a.max(b)
    } else {
        a + b
    };
    if both_integers {
        json!(value as u64)
    } else {
        json!(value)
    }
}

/// A duration figure (`held_s`), not a rate (`delivered_per_s`) or the workers' CPU.
fn is_duration(name: &str) -> bool {
    name.ends_with("_s") && !name.contains("_per_") && !name.starts_with("loadgen_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn worker_args_drop_the_parents_flags_in_both_forms() {
        let args = [
            "chat",
            "--procs",
            "2",
            "--uid-base=5",
            "--json-out",
            "x",
            "--secret",
            "S",
        ];
        let kept = worker_args(args.iter().map(|a| a.to_string()));
        assert_eq!(kept, ["chat", "--secret", "S"]);
    }

    #[test]
    fn merging_sums_counts_keeps_server_figures_and_merges_histograms() {
        let mut worker = Report::default();
        worker.figure("sent", 10u64);
        worker.figure("delivered_per_s", 100.0);
        worker.figure("measured_s", 2.0);
        worker.figure("server_cpu_s", 1.0);
        worker.figure("server_cpu_us_per_delivered", 0.0);
        worker.fail("eof".into());
        let mut h = latency_histogram();
        crate::report::record(&mut h, Duration::from_micros(100));
        worker.latencies.push(("send_to_push".into(), h));
        let dir = tempfile_dir();
        let path = dir.join("w.json");
        dump(&worker, &path).unwrap();
        let dumped: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut merge = Merge::default();
        merge.add(&dumped);
        merge.add(&dumped);
        let report = merge.finish();
        let json = report.json();
        assert_eq!(json["sent"], 20);
        assert_eq!(json["delivered_per_s"], 200.0);
        assert_eq!(json["measured_s"], 2.0);
        assert_eq!(json["server_cpu_s"], 1.0);
        // 1 s of server CPU over 200/s × 2 s = 400 messages.
        assert_eq!(json["server_cpu_us_per_delivered"], 2500.0);
        assert_eq!(json["failures"]["eof"], 2);
        assert_eq!(json["latency"]["send_to_push_us"]["count"], 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("loadgen-procs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
