//! `fanout`: one conversation with many members; a buyer sends, every member gets a push.
//!
//! The conversation is built one agent at a time ([`shop::build`]); after `--members` steps it
//! has the buyer and that many agents; they all log in again and the buyer sends. The store's
//! members limit (1,000 per conversation) bounds `--members`.
//!
//! Reports deliveries per second, latency from send to each member's push, and the spread of
//! one message's delivery across members (last push minus first push). Every member's pushes go
//! through a [`SeqTrack`] starting after the last seq of the build.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use chinwag_protocol::{Frame, Message, ShopId, Target, Uid, UidKind};
use clap::Args;

use crate::check::{SeqTrack, Violation, Violations};
use crate::procfs;
use crate::proto::{Event, Writer};
use crate::report::{self, Progress, Report};
use crate::scenarios::stamp::{self, STAMP_DIGITS};
use crate::scenarios::{connect_and_login, shop, Common};

/// How long a window slot of a refused send stays empty (the server's rate limit counts in
/// one-second windows; a tenth of one keeps the retries few).
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Flags of `fanout`.
#[derive(Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Agents in the conversation (besides the buyer); at most 999.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Messages the buyer keeps in flight (closed loop).
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Body bytes per message (at least 20).
    #[arg(long, default_value_t = 32)]
    pub message_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Seconds allowed after sending stops for every push to arrive.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
    /// Seconds allowed to build the conversation.
    #[arg(long, default_value_t = 120)]
    pub build_timeout_s: u64,
}

impl FanoutArgs {
    /// Checks what clap cannot (a bad flag exits 2 before anything runs).
    pub fn validate(&self) -> Result<(), String> {
        if self.common.run.procs > 1 || self.common.run.worker_of.is_some() {
            return Err(
                "fanout has one sender and one conversation: it runs in one process (no --procs)"
                    .into(),
            );
        }
        if self.members == 0 || self.members > 999 || self.window == 0 {
            return Err("fanout needs --members in 1..=999 and --window >= 1".into());
        }
        if self.message_bytes < STAMP_DIGITS {
            return Err("fanout needs --message-bytes >= 20".into());
        }
        Ok(())
    }
}

/// Runs `fanout` and returns its report.
pub fn run(args: &FanoutArgs) -> io::Result<Report> {
    let common = &args.common;
    let mut report = Report::default();
    let mut progress = Progress::new(!common.run.quiet);
    let base = common.uid_base();
    let shop = ShopId(base);
    let buyer = Uid::new(UidKind::Buyer, base);
    let agents: Vec<Uid> = (1..=args.members as u64)
        .map(|k| Uid::new(UidKind::Agent, base + k))
        .collect();
    let build_start = Instant::now();
    let deadline = build_start + Duration::from_secs(args.build_timeout_s);
    let (conv, build_last_seq) =
        shop::build(common, buyer, &agents, shop, deadline).map_err(io::Error::other)?;
    report.figure("build_s", build_start.elapsed().as_secs_f64());

    // Connection 0 is the buyer, connection k the k-th agent.
    let mut tokens = vec![common.token(buyer)];
    tokens.extend(agents.iter().map(|a| common.token_in_shop(*a, Some(shop))));
    let mut fleet = common.fleet()?;
    let opened = connect_and_login(&mut fleet, &tokens, common, &mut report, &mut progress)?;
    if opened.count() < tokens.len() {
        report.figure("logged_in", opened.count() as u64);
        fleet.traffic().report(&mut report);
        report.series = progress.series();
        return Ok(report);
    }
    let members = args.members as u32;
    let mut tracks: Vec<SeqTrack> = (0..tokens.len())
        .map(|_| SeqTrack::new(conv.0, build_last_seq + 1))
        .collect();
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    // Window slots of refused sends, each free again at its instant: a refused send is sent
    // again after a pause, so a server that refuses (say `rate_limited`) slows the run down
    // instead of emptying the window for good.
    let mut retry_at: VecDeque<Instant> = VecDeque::new();
    // Per seq in delivery: (first push ns, pushes so far).
    let mut spreading: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut send_to_push = report::latency_histogram();
    let mut spread = report::latency_histogram();
    let mut send_to_send_ok = report::latency_histogram();
    let mut violations = Violations::default();
    let (mut sent, mut send_ok, mut delivered, mut delivered_measured) = (0u64, 0u64, 0u64, 0u64);
    let mut last_seq = build_last_seq;
    let mut lost = false;
    let mut body = String::new();

    let start = Instant::now();
    let ns = |at: Instant| at.duration_since(start).as_nanos() as u64;
    let measure_from_ns = args.warmup_s * 1_000_000_000;
    let measure_to_ns = measure_from_ns + args.duration_s * 1_000_000_000;
    let drain_end = start + Duration::from_nanos(measure_to_ns) + Duration::from_secs(args.drain_s);
    let server_cpu = |pids: &[u32]| procfs::cpu_s(pids);
    let (mut cpu_from, mut cpu_to) = (None, None);
    let (mut own_from, mut own_to) = (0.0, 0.0);
    let mut measuring = false;
    progress.phase(if args.warmup_s > 0 {
        "warmup"
    } else {
        "measured"
    });
    let mut next_req = 2;
    let mut send = |writer: &mut Writer, now_ns: u64, in_flight: &mut VecDeque<(u64, u64)>| {
        stamp::write(&mut body, now_ns, args.message_bytes);
        let cmid = format!("f-{next_req}");
        in_flight.push_back((next_req, now_ns));
        writer.send(&Frame::with_req(
            next_req,
            Message::Send(chinwag_protocol::Send {
                target: Target::Conv(conv),
                cmid: cmid.as_str().into(),
                kind: "text".into(),
                body: body.as_str().into(),
            }),
        ));
        next_req += 1;
        sent += 1;
    };
    for _ in 0..args.window {
        send(&mut fleet.conns[0].writer, 0, &mut in_flight);
    }
    if let Err(failure) = fleet.flush(0) {
        report.fail(failure.cause());
        lost = true;
    }
    loop {
        let now = Instant::now();
        let now_ns = ns(now);
        if !measuring && now_ns >= measure_from_ns && now_ns < measure_to_ns {
            measuring = true;
            progress.phase("measured");
            cpu_from = server_cpu(&common.server_pid)?;
            own_from = report::own_cpu_s();
            send_to_push.reset();
            spread.reset();
            send_to_send_ok.reset();
        }
        if now_ns < measure_to_ns && retry_at.front().is_some_and(|at| *at <= now) {
            while retry_at.front().is_some_and(|at| *at <= now) {
                retry_at.pop_front();
                send(&mut fleet.conns[0].writer, now_ns, &mut in_flight);
            }
            if let Err(failure) = fleet.flush(0) {
                report.fail(failure.cause());
                lost = true;
            }
        }
        if now_ns >= measure_to_ns {
            if cpu_to.is_none() {
                progress.phase("drain");
                cpu_to = server_cpu(&common.server_pid)?.or(Some(0.0));
                own_to = report::own_cpu_s();
            }
            let expected = send_ok * u64::from(members);
            if lost || now >= drain_end || (in_flight.is_empty() && delivered >= expected) {
                break;
            }
        }
        fleet.turn(Duration::from_millis(1), |i, writer, event| {
            let now_ns = ns(Instant::now());
            let measured = (measure_from_ns..measure_to_ns).contains(&now_ns);
            match event {
                Event::Frame(Frame {
                    req,
                    message: Message::SendOk(ok),
                }) if i == 0 => {
                    let Some(at) = req.and_then(|r| in_flight.iter().position(|f| f.0 == r)) else {
                        violations.add(Violation::Other(format!(
                            "send_ok for no request in flight (req {req:?})"
                        )));
                        return;
                    };
                    let (_, intended_ns) = in_flight.remove(at).unwrap_or_default();
                    send_ok += 1;
                    if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                        let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                        report::record(&mut send_to_send_ok, latency);
                    }
                    last_seq = last_seq.max(ok.seq.0);
                    if ok.conv != conv {
                        violations.add(Violation::Other(format!("send_ok names conv {}", ok.conv)));
                    }
                    violations.check(tracks[0].own(ok.seq.0));
                    if now_ns < measure_to_ns {
                        send(writer, now_ns, &mut in_flight);
                    }
                }
                Event::Frame(Frame {
                    message: Message::Msg(msg),
                    ..
                }) if i > 0 => {
                    delivered += 1;
                    if measured {
                        delivered_measured += 1;
                    }
                    if msg.conv != conv || msg.from != buyer {
                        violations.add(Violation::Other(format!(
                            "member {i}: push in conv {} from {}",
                            msg.conv, msg.from
                        )));
                        return;
                    }
                    violations.check(tracks[i].push(msg.seq.0));
                    let what = format_args!("seq {}", msg.seq);
                    let Some(intended_ns) = stamp::read(&msg.body, what, &mut violations) else {
                        return;
                    };
                    let in_window = (measure_from_ns..measure_to_ns).contains(&intended_ns);
                    if in_window {
                        let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                        report::record(&mut send_to_push, latency);
                    }
                    let entry = spreading.entry(msg.seq.0).or_insert((now_ns, 0));
                    entry.1 += 1;
                    if entry.1 == members {
                        let first_ns = entry.0;
                        spreading.remove(&msg.seq.0);
                        if in_window {
                            let latency = Duration::from_nanos(now_ns.saturating_sub(first_ns));
                            report::record(&mut spread, latency);
                        }
                    }
                }
                Event::Frame(Frame {
                    req,
                    message: Message::Error(e),
                }) => {
                    report.fail(format!("refused: {}", e.code));
                    if let Some(at) = req.and_then(|r| in_flight.iter().position(|f| f.0 == r)) {
                        in_flight.remove(at);
                        retry_at.push_back(Instant::now() + RETRY_AFTER);
                    }
                }
                Event::Frame(Frame {
                    message: Message::Members(_) | Message::Receipt(_),
                    ..
                }) => {}
                Event::Frame(frame) => violations.add(Violation::Other(format!(
                    "connection {i}: unexpected {}",
                    frame.message.op()
                ))),
                Event::Bad(e) => violations.add(Violation::Other(format!(
                    "connection {i}: undecodable: {e}"
                ))),
                Event::Failed(failure) => {
                    report.fail(failure.cause());
                    lost = true;
                }
                Event::Upgraded => {}
            }
        })?;
        progress.tick(
            tokens.len(),
            delivered,
            report.failures_total() + violations.count,
            send_to_push.value_at_quantile(0.99),
        );
    }
    if !lost {
        for track in &tracks[1..] {
            for gap in track.finish(last_seq) {
                violations.add(gap);
            }
        }
    }

    let measured_s = args.duration_s.max(1) as f64;
    report.figure("conv", conv.0);
    report.figure("members", u64::from(members));
    report.figure("sent", sent);
    report.figure("send_ok", send_ok);
    report.figure("delivered", delivered);
    report.figure("measured_s", measured_s);
    report.figure(
        "messages_per_s",
        delivered_measured as f64 / measured_s / members as f64,
    );
    report.figure("deliveries_per_s", delivered_measured as f64 / measured_s);
    if let (Some(from), Some(to)) = (cpu_from, cpu_to) {
        report.figure("server_cpu_s", to - from);
        report.figure(
            "server_cpu_us_per_delivered",
            (to - from) * 1e6 / delivered_measured.max(1) as f64,
        );
    }
    report.figure("loadgen_cpu_s", own_to - own_from);
    report.figure(
        "loadgen_cpu_share_of_one_core",
        (own_to - own_from) / measured_s,
    );
    report.latencies.push(("send_to_push".into(), send_to_push));
    report.latencies.push(("delivery_spread".into(), spread));
    report
        .latencies
        .push(("send_to_send_ok".into(), send_to_send_ok));
    report.violations.count += violations.count;
    report.violations.first.extend(violations.first);
    fleet.traffic().report(&mut report);
    report.series = progress.series();
    Ok(report)
}
