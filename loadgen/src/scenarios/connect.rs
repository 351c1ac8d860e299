//! `connect`: open N connections at a target rate, log each in, and hold them with heartbeats.
//!
//! Reports the connect + login rate, failures by cause, the time from connect to `login_ok`,
//! the heartbeat round trip while holding, and, given `--server-pid`, the server's RSS growth
//! per logged-in connection.

use std::io;
use std::time::{Duration, Instant};

use chinwag_protocol::{Frame, Message, Uid, UidKind};
use clap::Args;

use crate::check::Violation;
use crate::procfs;
use crate::proto::Event;
use crate::report::{self, Progress, Report};
use crate::scenarios::{connect_and_login, Common};

/// Flags of `connect`.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Number of connections (one user each).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to hold the connections after they are all logged in.
    #[arg(long, default_value_t = 10)]
    pub hold_s: u64,
    /// Seconds between two `ping`s of one connection while holding.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_s: u64,
    /// Seconds to wait after the last login before reading the server's RSS.
    #[arg(long, default_value_t = 2)]
    pub settle_s: u64,
}

/// Runs `connect` and returns its report.
pub fn run(args: &ConnectArgs) -> io::Result<Report> {
    let common = &args.common;
    let mut report = Report::default();
    let mut progress = Progress::new(!common.run.quiet);
    let (first, connections) = common.slice(args.connections);
    let base = common.uid_base() + first as u64;
    let tokens: Vec<String> = (0..connections as u64)
        .map(|i| common.token(Uid::new(UidKind::Buyer, base + i)))
        .collect();
    let rss_before = procfs::rss_bytes_sum(&common.server_pid)?;
    // From before the first connect to the RSS read after the last login (for `--procs`).
    let window_from_ns = report::unix_ns();
    let cpu_start = report::own_cpu_s();
    let mut fleet = common.fleet()?;
    let opened = connect_and_login(&mut fleet, &tokens, common, &mut report, &mut progress)?;
    let logged_in = opened.count();
    let elapsed_s = opened.elapsed.as_secs_f64();
    report.figure("connections", connections as u64);
    report.figure("logged_in", logged_in as u64);
    report.figure("login_elapsed_s", elapsed_s);
    report.figure("logins_per_s", logged_in as f64 / elapsed_s.max(1e-9));

    // Hold: each connection pings every heartbeat, the connections spread over the period.
    let heartbeat = Duration::from_secs(args.heartbeat_s.max(1));
    let mut pinged_at: Vec<Option<Instant>> = vec![None; fleet.conns.len()];
    let mut next_ping: Vec<Instant> = Vec::with_capacity(fleet.conns.len());
    let hold_start = Instant::now();
    progress.phase("hold");
    for i in 0..fleet.conns.len() {
        let offset = heartbeat.mul_f64(i as f64 / fleet.conns.len().max(1) as f64);
        next_ping.push(hold_start + offset);
    }
    let mut rtt = report::latency_histogram();
    let (mut pings, mut pongs, mut dropped) = (0u64, 0u64, 0u64);
    let settle_at = hold_start + Duration::from_secs(args.settle_s);
    let hold_end = hold_start + Duration::from_secs(args.hold_s.max(args.settle_s));
    let mut rss_after = None;
    let mut window_to_ns = 0;
    let mut open = logged_in;
    while Instant::now() < hold_end {
        let now = Instant::now();
        if rss_after.is_none() && now >= settle_at {
            rss_after = procfs::rss_bytes_sum(&common.server_pid)?;
            window_to_ns = report::unix_ns();
        }
        for i in 0..fleet.conns.len() {
            if !opened.logged_in[i] || fleet.conns[i].is_done() || next_ping[i] > now {
                continue;
            }
            next_ping[i] += heartbeat;
            if pinged_at[i].is_some() {
                report.fail("heartbeat: no pong within a heartbeat".into());
            }
            pinged_at[i] = Some(now);
            fleet.conns[i]
                .writer
                .send(&Frame::with_req(2, Message::Ping));
            pings += 1;
            if let Err(failure) = fleet.flush(i) {
                report.fail(failure.cause());
                dropped += 1;
            }
        }
        fleet.turn(Duration::from_millis(5), |i, _, event| match event {
            Event::Frame(Frame {
                message: Message::Pong,
                ..
            }) => match pinged_at[i].take() {
                Some(at) => {
                    report::record(&mut rtt, at.elapsed());
                    pongs += 1;
                }
                None => report.violations.add(Violation::Other(format!(
                    "connection {i}: pong without ping"
                ))),
            },
            Event::Frame(frame) => report.violations.add(Violation::Other(format!(
                "connection {i}: unexpected {} while idle",
                frame.message.op()
            ))),
            Event::Bad(e) => report.violations.add(Violation::Other(format!(
                "connection {i}: undecodable: {e}"
            ))),
            Event::Failed(failure) => {
                report.fail(failure.cause());
                dropped += 1;
            }
            Event::Upgraded => {}
        })?;
        open = logged_in.saturating_sub(dropped as usize);
        progress.tick(
            open,
            pongs,
            report.failures_total(),
            rtt.value_at_quantile(0.99),
        );
    }
    if rss_after.is_none() {
        // A hold no longer than the settle time ends before the loop read the RSS.
        rss_after = procfs::rss_bytes_sum(&common.server_pid)?;
        window_to_ns = report::unix_ns();
    }
    report.window_unix_ns = Some((window_from_ns, window_to_ns));
    report.figure("held_s", hold_start.elapsed().as_secs_f64());
    report.figure("open_at_end", open as u64);
    report.figure("pings", pings);
    report.figure("pongs", pongs);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.figure("server_rss_bytes_before", before);
        report.figure("server_rss_bytes_after", after);
        report.figure(
            "server_rss_bytes_per_connection",
            after.saturating_sub(before) as f64 / logged_in.max(1) as f64,
        );
    }
    report.figure("loadgen_cpu_s", report::own_cpu_s() - cpu_start);
    report
        .latencies
        .push(("connect_to_login".into(), opened.connect_to_login));
    report.latencies.push(("heartbeat_rtt".into(), rtt));
    fleet.traffic().report(&mut report);
    report.series = progress.series();
    Ok(report)
}
