//! What a run reports: named figures, failures by cause, latency histograms and violations, as
//! text on stdout, as JSON (`--json-out`), and as HdrHistogram percentile distributions
//! (`--hgrm-out`). Also the live progress line and the loadgen's own CPU time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::check::Violations;
use crate::procfs;

/// Latencies are recorded in microseconds, from 1 µs to 60 s, with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Records `latency` in microseconds (values past the top are clamped, not dropped).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record((latency.as_micros() as u64).max(1));
}

/// The final report of one run.
#[derive(Default)]
pub struct Report {
    /// Named figures in the order they were added.
    pub figures: Vec<(String, Value)>,
    /// Failed connections and refused requests, by cause.
    pub failures: BTreeMap<String, u64>,
    /// Latency histograms (µs), by name.
    pub latencies: Vec<(String, Histogram<u64>)>,
    /// Contract violations seen.
    pub violations: Violations,
    /// The measured window, in ns since the Unix epoch (not printed: with `--procs` the parent
    /// reads the server's figures over the union of its workers' windows).
    pub window_unix_ns: Option<(u64, u64)>,
}

impl Report {
    /// Adds a figure.
    pub fn figure(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.push((name.to_string(), value.into()));
    }

    /// Counts one failure of `cause`.
    pub fn fail(&mut self, cause: String) {
        *self.failures.entry(cause).or_default() += 1;
    }

    /// Failures of every cause.
    pub fn failures_total(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.figures {
            let _ = writeln!(out, "{name}: {}", show(value));
        }
        for (name, h) in &self.latencies {
            let _ = writeln!(
                out,
                "{name}_us: count {} p50 {} p90 {} p99 {} p99.9 {} max {}",
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max()
            );
        }
        let _ = writeln!(out, "failures: {}", self.failures_total());
        for (cause, n) in &self.failures {
            let _ = writeln!(out, "  {cause}: {n}");
        }
        let _ = writeln!(out, "violations: {}", self.violations.count);
        for v in &self.violations.first {
            let _ = writeln!(out, "  {v}");
        }
        out
    }

    /// The report as one JSON object.
    pub fn json(&self) -> Value {
        let mut root = Map::new();
        for (name, value) in &self.figures {
            root.insert(name.clone(), value.clone());
        }
        let mut latencies = Map::new();
        for (name, h) in &self.latencies {
            let quantile = |q| h.value_at_quantile(q);
            latencies.insert(
                format!("{name}_us"),
                json!({
                    "count": h.len(),
                    "min": h.min(),
                    "p50": quantile(0.5),
                    "p90": quantile(0.9),
                    "p99": quantile(0.99),
                    "p99_9": quantile(0.999),
                    "max": h.max(),
                    "mean": h.mean(),
                }),
            );
        }
        root.insert("latency".into(), Value::Object(latencies));
        root.insert("failures".into(), json!(self.failures));
        root.insert("failures_total".into(), json!(self.failures_total()));
        root.insert("violations".into(), json!(self.violations.count));
        let first: Vec<String> = self
            .violations
            .first
            .iter()
            .map(|v| v.to_string())
            .collect();
        root.insert("violations_first".into(), json!(first));
        Value::Object(root)
    }

    /// Every histogram as an HdrHistogram percentile distribution (the format of
    /// `outputPercentileDistribution`, values in µs), one section per histogram.
    pub fn hgrm(&self) -> String {
        let mut out = String::new();
        for (name, h) in &self.latencies {
            let _ = writeln!(out, "# {name}_us");
            let _ = writeln!(
                out,
                "{:>12} {:>14} {:>10} {:>14}\n",
                "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
            );
            let mut total = 0u64;
            for v in h.iter_quantiles(5) {
                total += v.count_since_last_iteration();
                let q = v.quantile_iterated_to();
                let inverse = if q < 1.0 {
                    1.0 / (1.0 - q)
                } else {
                    f64::INFINITY
                };
                let _ = writeln!(
                    out,
                    "{:>12.3} {:>14.12} {:>10} {:>14.2}",
                    v.value_iterated_to() as f64,
                    q,
                    total,
                    inverse
                );
            }
            let _ = writeln!(
                out,
                "#[Mean = {:.3}, StdDeviation = {:.3}]\n#[Max = {}, Total count = {}]\n",
                h.mean(),
                h.stdev(),
                h.max(),
                h.len()
            );
        }
        out
    }

    /// Latency by percentile as an SVG line chart: one line per histogram, the x axis the
    /// percentile on the usual log scale of 1/(1 − q) (0, 90, 99, 99.9, …), the y axis µs.
    pub fn svg(&self) -> String {
        const WIDTH: f64 = 800.0;
        const HEIGHT: f64 = 480.0;
        const LEFT: f64 = 80.0;
        const RIGHT: f64 = 20.0;
        const TOP: f64 = 30.0;
        const BOTTOM: f64 = 50.0;
        // Up to 99.9999%: log10(1 / (1 - 0.999999)) = 6.
        const NINES_MAX: f64 = 6.0;
        const COLORS: [&str; 6] = [
            "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
        ];
        let lines: Vec<(&str, Vec<(f64, f64)>)> = self
            .latencies
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| {
                let points = h
                    .iter_quantiles(10)
                    .map(|v| {
                        let q = v.quantile_iterated_to().min(1.0 - 1e-6);
                        ((1.0 / (1.0 - q)).log10(), v.value_iterated_to() as f64)
                    })
                    .collect();
                (name.as_str(), points)
            })
            .collect();
        let y_max = lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(1.0, f64::max);
        let x_of = |nines: f64| LEFT + nines / NINES_MAX * (WIDTH - LEFT - RIGHT);
        let y_of = |us: f64| HEIGHT - BOTTOM - us / y_max * (HEIGHT - TOP - BOTTOM);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{LEFT}\" y=\"18\">latency by percentile (µs)</text>"
        );
        for (nines, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
            .iter()
            .enumerate()
        {
            let x = x_of(nines as f64);
            let _ = writeln!(
                out,
                "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
                HEIGHT - BOTTOM,
                HEIGHT - BOTTOM + 18.0
            );
        }
        for step in 0..=5 {
            let us = y_max * step as f64 / 5.0;
            let y = y_of(us);
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{us:.0}</text>",
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0
            );
        }
        for (k, (name, points)) in lines.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let path: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{name}</text>",
                path.join(" "),
                LEFT + 10.0,
                TOP + 16.0 * (k + 1) as f64
            );
        }
        out.push_str("</svg>\n");
        out
    }

    /// Prints the text report and writes the files asked for.
    pub fn emit(
        &self,
        json_out: Option<&Path>,
        hgrm_out: Option<&Path>,
        plot: Option<&Path>,
    ) -> io::Result<()> {
        print!("{}", self.text());
        if let Some(path) = json_out {
            let mut text = serde_json::to_string_pretty(&self.json()).map_err(io::Error::other)?;
            text.push('\n');
            std::fs::write(path, text)?;
        }
        if let Some(path) = hgrm_out {
            std::fs::write(path, self.hgrm())?;
        }
        if let Some(path) = plot {
            std::fs::write(path, self.svg())?;
        }
        Ok(())
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.abs() >= 100.0 {
                format!("{f:.0}")
            } else {
                format!("{f:.3}")
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Nanoseconds since the Unix epoch (a wall clock every process reads alike).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// This process's CPU time (user + system), in seconds.
pub fn own_cpu_s() -> f64 {
    procfs::user_system_s(std::process::id())
        .map(|(user, system)| user + system)
        .unwrap_or(0.0)
}

/// The live progress line on stderr, once a second.
pub struct Progress {
    enabled: bool,
    start: Instant,
    last: Instant,
    last_messages: u64,
}

impl Progress {
    /// A progress line that prints only if `enabled`.
    pub fn new(enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            start: now,
            last: now,
            last_messages: 0,
        }
    }

    /// Prints a line if a second has passed since the last one.
    pub fn tick(&mut self, connections: usize, messages: u64, errors: u64, p99_us: u64) {
        let now = Instant::now();
        let since = now.duration_since(self.last);
        if !self.enabled || since < Duration::from_secs(1) {
            return;
        }
        let rate = messages.saturating_sub(self.last_messages) as f64 / since.as_secs_f64();
        eprintln!(
            "[{:>4.0}s] connections {connections} msg/s {rate:.0} errors {errors} p99_us {p99_us}",
            now.duration_since(self.start).as_secs_f64()
        );
        self.last = now;
        self.last_messages = messages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Violation;

    #[test]
    fn json_and_text_carry_figures_failures_and_violations() {
        let mut report = Report::default();
        report.figure("connections", 3u64);
        report.fail("eof".into());
        report.fail("eof".into());
        let mut h = latency_histogram();
        record(&mut h, Duration::from_micros(250));
        report.latencies.push(("send_to_push".into(), h));
        report
            .violations
            .add(Violation::Duplicate { conv: 1, seq: 2 });
        let json = report.json();
        assert_eq!(json["connections"], 3);
        assert_eq!(json["failures"]["eof"], 2);
        assert_eq!(json["violations"], 1);
        assert_eq!(json["latency"]["send_to_push_us"]["count"], 1);
        let text = report.text();
        assert!(text.contains("violations: 1"), "{text}");
        assert!(text.contains("conv 1: seq 2 seen twice"), "{text}");
        assert!(report.hgrm().contains("Total count = 1"));
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline") && svg.contains("send_to_push"));
    }
}
