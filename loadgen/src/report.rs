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
    /// The run's settings, repeated as the report's header: (flag, effective value).
    pub settings: Vec<(String, String)>,
    /// One entry per second of the run, marked with its phase.
    pub series: Vec<Second>,
    /// `group`: per message (by seq), when it was meant to be sent and when this process's
    /// members got it; `--procs` merges them into the delivery spread across all members.
    pub seq_spread: BTreeMap<u64, SeqSpread>,
}

/// One message's delivery as the members of one process (or, merged, of all) saw it. Times are
/// `CLOCK_REALTIME` ns since the Unix epoch, the one clock every process on a machine shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqSpread {
    /// When the message was meant to be sent (stamped in its body).
    pub intended_ns: u64,
    /// The first member's push.
    pub first_ns: u64,
    /// The last member's push.
    pub last_ns: u64,
    /// Pushes received.
    pub count: u64,
}

impl SeqSpread {
    /// A push of this message arrived at `now_ns`.
    pub fn push(&mut self, intended_ns: u64, now_ns: u64) {
        if self.count == 0 {
            *self = SeqSpread {
                intended_ns,
                first_ns: now_ns,
                last_ns: now_ns,
                count: 0,
            };
        }
        self.first_ns = self.first_ns.min(now_ns);
        self.last_ns = self.last_ns.max(now_ns);
        self.count += 1;
    }

    /// Another process's view of the same message.
    pub fn merge(&mut self, other: &SeqSpread) {
        if self.count == 0 {
            *self = *other;
        } else if other.count > 0 {
            self.first_ns = self.first_ns.min(other.first_ns);
            self.last_ns = self.last_ns.max(other.last_ns);
            self.count += other.count;
        }
    }
}

/// The delivery spread (last member's push minus the first's, µs) of every message meant to be
/// sent within `window_ns` that reached all `expected` members; a message that did not is a
/// gap the checker reports, not a spread.
pub fn spread_histogram(
    spreads: &BTreeMap<u64, SeqSpread>,
    expected: u64,
    window_ns: (u64, u64),
) -> Histogram<u64> {
    let mut h = latency_histogram();
    for s in spreads.values() {
        if s.count == expected && (window_ns.0..window_ns.1).contains(&s.intended_ns) {
            record(&mut h, Duration::from_nanos(s.last_ns - s.first_ns));
        }
    }
    h
}

/// One second of a run, as the JSON report's `series` gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Second {
    /// Seconds since the run started (the end of this second).
    pub t_s: u64,
    /// `setup` (connecting, logging in, building), `warmup`, `measured`, `drain`, or the
    /// scenario's own (`hold`).
    pub phase: &'static str,
    /// Open connections at the end of the second.
    pub connections: u64,
    /// Messages in the second (delivered pushes, pongs or echoes, as the progress line).
    pub messages: u64,
    /// Errors (failures and violations) so far.
    pub errors: u64,
    /// p99 latency so far, µs (0 when nothing was measured yet).
    pub p99_us: u64,
}

/// Quantiles of a histogram as the reports print them; all `None` for an empty one (a report
/// says "-" rather than a 0 that was never measured).
pub struct Summary {
    /// The number of values.
    pub count: u64,
    /// min, mean, p50, p90, p95, p99, p99.9, max.
    pub values: Option<[f64; 8]>,
}

/// The names of [`Summary::values`], in order.
const SUMMARY_NAMES: [&str; 8] = ["min", "mean", "p50", "p90", "p95", "p99", "p99_9", "max"];

impl Summary {
    /// The summary of `h`.
    pub fn of(h: &Histogram<u64>) -> Summary {
        let values = (!h.is_empty()).then(|| {
            let q = |q| h.value_at_quantile(q) as f64;
            [
                h.min() as f64,
                h.mean(),
                q(0.5),
                q(0.9),
                q(0.95),
                q(0.99),
                q(0.999),
                h.max() as f64,
            ]
        });
        Summary {
            count: h.len(),
            values,
        }
    }
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

    fn figure_u64(&self, name: &str) -> Option<u64> {
        self.figures
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_u64())
    }

    /// Failures per request sent (logins, sends, pings, history, echoes: every frame or
    /// message the load generator wrote), when the scenario counted its requests.
    pub fn error_rate(&self) -> Option<f64> {
        let requests = self.figure_u64("requests")?;
        Some(self.failures_total() as f64 / requests.max(1) as f64)
    }

    /// What the reader should know about the failures: the cause and what to do about it.
    pub fn notes(&self) -> Vec<String> {
        let count = |needle: &str| -> u64 {
            self.failures
                .iter()
                .filter(|(cause, _)| cause.contains(needle))
                .map(|(_, n)| n)
                .sum()
        };
        let mut notes = Vec::new();
        let limited = count("rate_limited");
        if limited > 0 {
            notes.push(format!(
                "the server refused {limited} requests with rate_limited: it allows \
                 --messages-per-s-max messages per connection per second (100 by default). For a \
                 load test start it without the limit: chinwag serve --messages-per-s-max 0 ..."
            ));
        }
        let unauthorized = count("unauthorized");
        if unauthorized > 0 {
            notes.push(format!(
                "the server refused {unauthorized} logins as unauthorized: --secret must be the \
                 server's --jwt-secret (or the content of DATA_DIR/jwt-secret)"
            ));
        }
        let queue = count("closed by server: 1008");
        if queue > 0 {
            notes.push(format!(
                "the server closed {queue} connections with 1008: the connection read too slowly \
                 (send queue full) or its login was refused"
            ));
        }
        notes
    }

    /// The report as text: a header repeating the settings, the figures, latency summaries,
    /// failures and violations, and notes on what went wrong.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.settings.is_empty() {
            let line: Vec<String> = self
                .settings
                .iter()
                .skip(1)
                .map(|(flag, value)| format!("--{flag} {value}"))
                .collect();
            let _ = writeln!(
                out,
                "chinwag-loadgen {} {}",
                env!("CARGO_PKG_VERSION"),
                self.settings[0].1
            );
            let _ = writeln!(out, "settings: {}", line.join(" "));
        }
        for (name, value) in &self.figures {
            let _ = writeln!(out, "{name}: {}", show(value));
        }
        for (name, h) in &self.latencies {
            let summary = Summary::of(h);
            let mut line = format!("{name}_us: count {}", summary.count);
            for (i, label) in ["mean", "p50", "p90", "p95", "p99", "p99.9", "max"]
                .iter()
                .enumerate()
            {
                let value = summary.values.map_or("-".to_string(), |v| {
                    let v = v[i + 1];
                    if i == 0 {
                        format!("{v:.1}")
                    } else {
                        format!("{v:.0}")
                    }
                });
                let _ = write!(line, " {label} {value}");
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "failures: {}", self.failures_total());
        for (cause, n) in &self.failures {
            let _ = writeln!(out, "  {cause}: {n}");
        }
        if let Some(rate) = self.error_rate() {
            let _ = writeln!(out, "error_rate: {:.4}%", rate * 100.0);
        }
        let _ = writeln!(out, "violations: {}", self.violations.count);
        for v in &self.violations.first {
            let _ = writeln!(out, "  {v}");
        }
        for note in self.notes() {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// The report as one JSON object.
    pub fn json(&self) -> Value {
        let mut root = Map::new();
        let settings: Map<String, Value> = self
            .settings
            .iter()
            .map(|(flag, value)| (flag.clone(), json!(value)))
            .collect();
        root.insert("settings".into(), Value::Object(settings));
        for (name, value) in &self.figures {
            root.insert(name.clone(), value.clone());
        }
        let mut latencies = Map::new();
        for (name, h) in &self.latencies {
            let summary = Summary::of(h);
            let mut entry = Map::new();
            entry.insert("count".into(), json!(summary.count));
            for (i, label) in SUMMARY_NAMES.iter().enumerate() {
                // null, not 0, for a histogram that recorded nothing.
                entry.insert((*label).into(), json!(summary.values.map(|v| v[i])));
            }
            latencies.insert(format!("{name}_us"), Value::Object(entry));
        }
        root.insert("latency".into(), Value::Object(latencies));
        root.insert("failures".into(), json!(self.failures));
        root.insert("failures_total".into(), json!(self.failures_total()));
        root.insert("error_rate".into(), json!(self.error_rate()));
        root.insert("notes".into(), json!(self.notes()));
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                json!({
                    "t_s": s.t_s,
                    "phase": s.phase,
                    "connections": s.connections,
                    "messages": s.messages,
                    "errors": s.errors,
                    "p99_us": s.p99_us,
                })
            })
            .collect();
        root.insert("series".into(), Value::Array(series));
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

/// The live progress line on stderr, and the per-second series of the JSON report: once a
/// second, what [`Progress::tick`] was last told, marked with the phase the run is in.
pub struct Progress {
    enabled: bool,
    start: Instant,
    last: Instant,
    last_messages: u64,
    phase: &'static str,
    series: Vec<Second>,
}

impl Progress {
    /// A progress line that prints only if `enabled` (the series is kept either way).
    pub fn new(enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            start: now,
            last: now,
            last_messages: 0,
            phase: "setup",
            series: Vec::new(),
        }
    }

    /// The run enters `phase` (`setup`, `warmup`, `measured`, `drain`, ...).
    pub fn phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }

    /// Notes the run's state; once a second adds it to the series and prints the line.
    pub fn tick(&mut self, connections: usize, messages: u64, errors: u64, p99_us: u64) {
        let now = Instant::now();
        let since = now.duration_since(self.last);
        if since < Duration::from_secs(1) {
            return;
        }
        let delta = messages.saturating_sub(self.last_messages);
        let t_s = now.duration_since(self.start).as_secs_f64();
        self.series.push(Second {
            t_s: t_s.round() as u64,
            phase: self.phase,
            connections: connections as u64,
            messages: delta,
            errors,
            p99_us,
        });
        if self.enabled {
            let rate = delta as f64 / since.as_secs_f64();
            eprintln!(
                "[{t_s:>4.0}s] {} connections {connections} msg/s {rate:.0} errors {errors} \
                 p99_us {p99_us}",
                self.phase
            );
        }
        self.last = now;
        self.last_messages = messages;
    }

    /// The series so far.
    pub fn series(&self) -> Vec<Second> {
        self.series.clone()
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

    #[test]
    fn an_empty_histogram_prints_a_dash_and_null_not_zero() {
        let mut report = Report::default();
        report
            .latencies
            .push(("send_to_push".into(), latency_histogram()));
        let text = report.text();
        assert!(
            text.contains("send_to_push_us: count 0 mean - p50 - p90 - p95 - p99 - p99.9 - max -"),
            "{text}"
        );
        let json = report.json();
        let entry = &json["latency"]["send_to_push_us"];
        assert_eq!(entry["count"], 0);
        for q in SUMMARY_NAMES {
            assert!(entry[q].is_null(), "{q}: {entry}");
        }
    }

    #[test]
    fn summaries_give_mean_and_p95() {
        let mut h = latency_histogram();
        for us in 1..=100 {
            record(&mut h, Duration::from_micros(us));
        }
        let values = Summary::of(&h).values.unwrap();
        assert_eq!(values[4], 95.0, "p95");
        assert!((values[1] - 50.5).abs() < 0.5, "mean {}", values[1]);
    }

    #[test]
    fn rate_limited_failures_get_a_note_saying_how_to_start_the_server() {
        let mut report = Report::default();
        report.figure("requests", 200u64);
        for _ in 0..50 {
            report.fail("refused: rate_limited".into());
        }
        assert_eq!(report.error_rate(), Some(0.25));
        let notes = report.notes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("50 requests"), "{}", notes[0]);
        assert!(notes[0].contains("--messages-per-s-max 0"), "{}", notes[0]);
        let text = report.text();
        assert!(text.contains("error_rate: 25.0000%"), "{text}");
        assert!(text.contains("note: the server refused 50"), "{text}");
        assert!(Report::default().notes().is_empty());
    }

    #[test]
    fn the_header_repeats_the_settings_and_the_series_its_phases() {
        let report = Report {
            settings: vec![
                ("subcommand".into(), "chat".into()),
                ("addr".into(), "localhost:7000".into()),
                ("window".into(), "4".into()),
            ],
            series: vec![Second {
                t_s: 1,
                phase: "warmup",
                connections: 2,
                messages: 10,
                errors: 0,
                p99_us: 0,
            }],
            ..Report::default()
        };
        let text = report.text();
        let mut lines = text.lines();
        assert!(lines.next().unwrap().ends_with(" chat"), "{text}");
        assert_eq!(
            lines.next().unwrap(),
            "settings: --addr localhost:7000 --window 4"
        );
        let json = report.json();
        assert_eq!(json["settings"]["addr"], "localhost:7000");
        assert_eq!(json["series"][0]["phase"], "warmup");
        assert_eq!(json["series"][0]["messages"], 10);
    }

    #[test]
    fn progress_keeps_one_entry_per_second_when_quiet() {
        let mut progress = Progress::new(false);
        progress.phase("measured");
        progress.last -= Duration::from_secs(1);
        progress.tick(3, 42, 0, 7);
        progress.tick(3, 50, 0, 7); // within the same second: not recorded
        let series = progress.series();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].phase, "measured");
        assert_eq!(series[0].messages, 42);
    }
}
