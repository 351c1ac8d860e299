//! `--procs P`: the run split over P worker processes, one report.
//!
//! The parent starts P copies of itself with the same flags plus `--worker-of K,P` (which
//! slice of the users, conversations or connections worker K takes), one `--uid-base` for all
//! (protocol scenarios), and `--worker-dump FILE`. Each worker runs its slice on its own thread
//! and poll, with its own file limit, and dumps its report with whole histograms and its
//! measured window. The parent sums counts, rates and the workers' CPU, keeps the longest
//! duration, merges the histograms value by value, takes the server's figures from its own
//! samples over the union of the workers' windows, and derives the per-message figures again
//! from the merged totals.
//!
//! Workers own whole conversations, so every conversation is still checked in one place.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use crate::check::Violation;
use crate::procfs;
use crate::report::{self, latency_histogram, Report};

/// Flags the parent handles itself and does not pass on to workers (each takes a value).
const PARENT_FLAGS: [&str; 5] = [
    "--procs",
    "--uid-base",
    "--json-out",
    "--hgrm-out",
    "--plot",
];

/// Flags of how a run is split over processes and reported (every subcommand but `idle`).
#[derive(Args, Clone, Debug)]
pub struct RunFlags {
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write the latency histograms as HdrHistogram percentile distributions to this file.
    #[arg(long)]
    pub hgrm_out: Option<PathBuf>,
    /// Draw latency by percentile as an SVG chart to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Split the users (or connections) over this many worker processes and merge their reports (each worker
    /// needs its own file descriptors: keep connections per worker under the file limit).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Worker K of P takes the K-th of P slices (set by `--procs`).
    #[arg(long, hide = true, value_parser = parse_worker_of)]
    pub worker_of: Option<(usize, usize)>,
    /// Where a worker writes its report for the parent (set by `--procs`).
    #[arg(long, hide = true)]
    pub worker_dump: Option<PathBuf>,
}

impl RunFlags {
    /// This process's share of `total` (users, conversations or connections): (first index, count). The
    /// whole of it unless this is a worker of `--procs`.
    pub fn slice(&self, total: usize) -> (usize, usize) {
        let Some((k, p)) = self.worker_of else {
            return (0, total);
        };
        let first = total * k / p;
        (first, total * (k + 1) / p - first)
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.procs == 0 {
            return Err("--procs must be at least 1".into());
        }
        Ok(())
    }
}

fn parse_worker_of(s: &str) -> Result<(usize, usize), String> {
    let (k, p) = s.split_once(',').ok_or("K,P")?;
    let (k, p): (usize, usize) = (k.parse().map_err(|_| "K,P")?, p.parse().map_err(|_| "K,P")?);
    if k >= p {
        return Err("K must be below P".into());
    }
    Ok((k, p))
}

/// How often the parent samples the server while the workers run: the same as the kernel's
/// clock tick (`CLK_TCK` is 100 on Linux), the resolution of the CPU time it reads.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// One reading of the server's /proc figures.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    unix_ns: u64,
    cpu_s: f64,
    rss_bytes: u64,
}

/// The server's processes' figures now, summed; `None` without any (or if one is gone).
fn sample(pids: &[u32]) -> Option<Sample> {
    Some(Sample {
        unix_ns: report::unix_ns(),
        cpu_s: procfs::cpu_s(pids).ok()??,
        rss_bytes: procfs::rss_bytes_sum(pids).ok()??,
    })
}

/// Runs the command line of this process over `procs` workers; returns the merged report.
/// Given `server_pids`, the parent reads the server's CPU time and RSS itself every
/// [`SAMPLE_EVERY`] while the workers run, and takes the server figures from its own samples
/// at the ends of the workers' measured windows.
pub fn run(procs: usize, uid_base: Option<u64>, server_pids: &[u32]) -> io::Result<Report> {
    let exe = std::env::current_exe()?;
    let args = worker_args(std::env::args().skip(1));
    let dir = std::env::temp_dir().join(format!("chinwag-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut samples: Vec<Sample> = sample(server_pids).into_iter().collect();
    let mut children: Vec<Child> = Vec::with_capacity(procs);
    for k in 0..procs {
        let mut command = Command::new(&exe);
        command.args(&args);
        if let Some(base) = uid_base {
            command.arg(format!("--uid-base={base}"));
        }
        let child = command
            .arg(format!("--worker-of={k},{procs}"))
            .arg("--worker-dump")
            .arg(dir.join(format!("{k}.json")))
            .arg("--quiet")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        children.push(child);
    }
    // Workers bound their own runs in time; the parent waits for the last one to exit.
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; procs];
    while statuses.iter().any(Option::is_none) {
        samples.extend(sample(server_pids));
        for (child, status) in children.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = child.try_wait()?;
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    let mut merged = Merge::default();
    for (k, status) in statuses.iter().enumerate() {
        let path = dir.join(format!("{k}.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) => merged.add(&serde_json::from_str(&text).map_err(io::Error::other)?),
            Err(e) => {
                let status = status.map_or("?".into(), |s| s.to_string());
                merged
                    .report
                    .fail(format!("worker {k} wrote no report ({status}): {e}"))
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    merged.report.figure("procs", procs as u64);
    merged.server_figures(&samples);
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
        "window_unix_ns": report.window_unix_ns,
        "series": report.json()["series"],
        "seq_spread": report
            .seq_spread
            .iter()
            .map(|(seq, s)| [*seq, s.intended_ns, s.first_ns, s.last_ns, s.count])
            .collect::<Vec<_>>(),
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
        let window = &dump["window_unix_ns"];
        if let (Some(from), Some(to)) = (window[0].as_u64(), window[1].as_u64()) {
            self.report.window_unix_ns = Some(match self.report.window_unix_ns {
                None => (from, to),
                Some((a, b)) => (a.min(from), b.max(to)),
            });
        }
        for v in dump["violations_first"].as_array().into_iter().flatten() {
            if self.report.violations.first.len() < crate::check::Violations::KEPT {
                let text = v.as_str().unwrap_or("?").to_string();
                self.report.violations.first.push(Violation::Other(text));
            }
        }
        // Second k of every worker adds up; the phase is the first worker's.
        for (k, second) in dump["series"].as_array().into_iter().flatten().enumerate() {
            let field = |name: &str| second[name].as_u64().unwrap_or(0);
            let phase = match second["phase"].as_str() {
                Some("setup") => "setup",
                Some("warmup") => "warmup",
                Some("measured") => "measured",
                Some("drain") => "drain",
                Some("hold") => "hold",
                _ => "?",
            };
            if k == self.report.series.len() {
                self.report.series.push(report::Second {
                    t_s: field("t_s"),
                    phase,
                    connections: 0,
                    messages: 0,
                    errors: 0,
                    p99_us: 0,
                });
            }
            if let Some(s) = self.report.series.get_mut(k) {
                s.connections += field("connections");
                s.messages += field("messages");
                s.errors += field("errors");
                s.p99_us = s.p99_us.max(field("p99_us"));
            }
        }
        for entry in dump["seq_spread"].as_array().into_iter().flatten() {
            let field = |k: usize| entry[k].as_u64().unwrap_or(0);
            let part = report::SeqSpread {
                intended_ns: field(1),
                first_ns: field(2),
                last_ns: field(3),
                count: field(4),
            };
            self.report
                .seq_spread
                .entry(field(0))
                .or_default()
                .merge(&part);
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

    /// Replaces the server figures the workers read with the parent's own `samples`: CPU time
    /// from the last sample at or before the start of the first worker's measured window to the
    /// first sample at or after the end of the last one, RSS before (the sample taken before
    /// any worker started) and at that end. Only figures the workers reported are replaced.
    fn server_figures(&mut self, samples: &[Sample]) {
        let (Some((from_ns, to_ns)), Some(first), Some(last)) =
            (self.report.window_unix_ns, samples.first(), samples.last())
        else {
            return;
        };
        let from = samples
            .iter()
            .rev()
            .find(|s| s.unix_ns <= from_ns)
            .unwrap_or(first);
        let to = samples.iter().find(|s| s.unix_ns >= to_ns).unwrap_or(last);
        let r = &mut self.report;
        let mut set = |name: &str, value: Value| {
            if let Some((_, v)) = r.figures.iter_mut().find(|(n, _)| n == name) {
                *v = value;
            }
        };
        set("server_cpu_s", json!(to.cpu_s - from.cpu_s));
        set("server_rss_bytes", json!(to.rss_bytes));
        set("server_rss_bytes_before", json!(first.rss_bytes));
        set("server_rss_bytes_after", json!(to.rss_bytes));
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
        if let (Some(cpu), Some(messages)) = (get(r, "server_cpu_s"), get(r, "messages")) {
            set(r, "msg_per_server_cpu_s", messages / cpu.max(0.01));
        }
        if get(r, "deliveries_per_message").is_some() {
            crate::scenarios::group::finish(r);
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
/// measurement seen twice (keep the largest, except the RSS before any load: the smallest;
/// the parent's own samples replace the server's figures where it has them);
/// counts, rates and the workers' own CPU add up; lists (`slowest_acks`) join; text is the
/// same for all.
fn combine(name: &str, old: &Value, new: &Value) -> Value {
    if let (Some(a), Some(b)) = (old.as_array(), new.as_array()) {
        return Value::Array(a.iter().chain(b).cloned().collect());
    }
    let (Some(a), Some(b)) = (old.as_f64(), new.as_f64()) else {
        return old.clone();
    };
    let both_integers = old.is_u64() && new.is_u64();
    let value = if SAME_IN_EVERY_WORKER.contains(&name) {
        a.max(b)
    } else if name == "server_rss_bytes_before" {
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

/// Figures that describe the whole run, not a worker's share of it (`group`).
const SAME_IN_EVERY_WORKER: [&str; 3] = ["group_members", "deliveries_per_message", "conv"];

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
        let dir = tempfile_dir("merge");
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

    #[test]
    fn server_figures_come_from_the_parents_samples_over_the_union_of_windows() {
        let worker = |from_ns, to_ns| {
            let mut r = Report::default();
            r.figure("messages", 100u64);
            r.figure("server_cpu_s", 9.0);
            r.figure("msg_per_server_cpu_s", 0.0);
            r.figure("server_rss_bytes", 1u64);
            r.window_unix_ns = Some((from_ns, to_ns));
            r
        };
        let dir = tempfile_dir("window");
        let mut merge = Merge::default();
        for (k, (from_ns, to_ns)) in [(250, 600), (120, 700)].into_iter().enumerate() {
            let path = dir.join(format!("{k}.json"));
            dump(&worker(from_ns, to_ns), &path).unwrap();
            merge.add(&serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap());
        }
        let samples: Vec<Sample> = (0..10)
            .map(|k| Sample {
                unix_ns: k * 100,
                cpu_s: k as f64,
                rss_bytes: 1000 + k,
            })
            .collect();
        merge.server_figures(&samples);
        let json = merge.finish().json();
        // From the sample at 100 (last at or before 120) to the one at 700: 6 s, not the
        // workers' 9 s.
        assert_eq!(json["server_cpu_s"], 6.0);
        assert_eq!(json["server_rss_bytes"], 1007);
        assert_eq!(json["msg_per_server_cpu_s"], 200.0 / 6.0);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A directory of this test process's own, apart from other tests running at once.
    fn tempfile_dir(test: &str) -> std::path::PathBuf {
        let name = format!("loadgen-procs-test-{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
