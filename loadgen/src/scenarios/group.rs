//! `group`: one group conversation of many members, made by a service; a few senders post at a
//! steady rate and every member's device counts and checks what it is pushed.
//!
//! The run, in every worker of `--procs` (or in the one process):
//! 1. **create**: over the service port, `group_create` with the run's key (`--uid-base`) and
//!    the group's first members, the same request in every worker (the key makes it one
//!    group), then `group_add` of this worker's own slice of members. Workers wait for each
//!    other ([`Rendezvous`]) so that nobody logs in while members are still being added (each
//!    add to a large group pushes a `members_delta` to every logged-in member).
//! 2. **login**: this worker's members log in; the start of the load is agreed as the latest
//!    worker's "logged in" time plus [`START_MARGIN`].
//! 3. **load**: message k is due at start + k/R (R = `--rate-per-s`), sent by sender k mod S
//!    (the first S members; whichever worker holds a sender sends for it). The body carries the
//!    intended send time. Sending stops at the end of the measured window.
//! 4. **drain**: every worker posts the highest seq its senders were told; all wait until every
//!    member has seen every seq up to the highest of them, or `--drain-s` passes.
//!
//! With `--notify` there is no group and no sender: on the same schedule the service sends
//! `notify_users` naming every member (worker 0 sends it; the replies are collected at the
//! end), each member counts its `notify` pushes, and every member must get each one exactly
//! once.
//!
//! Times are `CLOCK_REALTIME` ns (`SystemTime`), the one clock every process on the machine
//! shares: a push's latency is its arrival minus the stamp in its body, and a message's delivery
//! spread is its last member's arrival minus its first's, across all workers.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::token::{self, Claims};
use chinwag_protocol::{
    ConvId, ConvInfo, Frame, GroupCreate, GroupMembers, Message, NotifyUsers, Target, Uid, UidKind,
};
use clap::Args;

use crate::check::{SeqTrack, Violation, Violations};
use crate::procfs;
use crate::proto::{Event, Writer};
use crate::report::{self, Progress, Report, SeqSpread};
use crate::scenarios::rendezvous::Rendezvous;
use crate::scenarios::stamp::{self, STAMP_DIGITS};
use crate::scenarios::{connect_and_login, Common};

/// The most users one group request may name (the engine's `GROUP_MEMBERS_PER_REQUEST_MAX`).
const USERS_PER_GROUP_REQUEST_MAX: usize = 1_000;
/// Between the last worker's logins and the first message: long enough for every worker to
/// read that time from the others.
const START_MARGIN: Duration = Duration::from_millis(500);
/// The most users one `notify_users` may name.
const USERS_PER_NOTIFY_MAX: usize = chinwag_protocol::limits::USERS_PER_REQUEST_MAX;
/// The most members a group can have (`members_max` is at most 65,535).
const MEMBERS_MAX: usize = 65_535;

/// Flags of `group`.
#[derive(Args, Debug)]
pub struct GroupArgs {
    #[command(flatten)]
    pub common: Common,
    /// The service port (`chinwag serve --backend-listen`).
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub service_addr: String,
    /// Members of the group (the server's `--members-max` must allow them).
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Members that send: the first S of the group.
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages per second over all senders, on a fixed schedule (open loop).
    #[arg(long, default_value_t = 100)]
    pub rate_per_s: u32,
    /// Most messages in flight per sender; past it the schedule slips (`open_loop_slipped`).
    #[arg(long, default_value_t = 1000)]
    pub in_flight_max: usize,
    /// Body bytes per message (at least 20).
    #[arg(long, default_value_t = 32)]
    pub message_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Seconds allowed after sending stops for every push to arrive.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
    /// Instead of group messages, the service sends `notify_users` naming every member
    /// (at most 10,000) at `--rate-per-s`.
    #[arg(long)]
    pub notify: bool,
}

impl GroupArgs {
    /// Checks what clap cannot (a bad flag exits 2 before anything runs).
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=MEMBERS_MAX).contains(&self.members) {
            return Err("group needs --members in 2..=65535".into());
        }
        if self.senders == 0 || self.senders >= self.members {
            return Err("group needs --senders in 1..members".into());
        }
        if self.rate_per_s == 0 || self.in_flight_max == 0 {
            return Err("group needs --rate-per-s and --in-flight-max >= 1".into());
        }
        if self.message_bytes < STAMP_DIGITS {
            return Err("group needs --message-bytes >= 20".into());
        }
        if self.notify && self.members > USERS_PER_NOTIFY_MAX {
            return Err(
                "group --notify names every member in one request: --members <= 10000".into(),
            );
        }
        if self.common.run.procs > self.members {
            return Err("group needs at least one member per process (--procs)".into());
        }
        Ok(())
    }
}

/// Runs `group` (this worker's slice of it) and returns its report.
pub fn run(args: &GroupArgs) -> io::Result<Report> {
    let common = &args.common;
    let mut report = Report::default();
    let mut progress = Progress::new(!common.run.quiet);
    let base = common.uid_base();
    let group: Vec<Uid> = (0..args.members as u64)
        .map(|i| Uid::new(UidKind::Buyer, base + i))
        .collect();
    let (first, count) = common.slice(args.members);
    let (worker, workers) = common.run.worker_of.unwrap_or((0, 1));
    let dir = common
        .run
        .worker_dump
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let mut meet = Rendezvous::new(dir, worker, workers);
    let setup_deadline = Instant::now() + Duration::from_secs(common.login_timeout_s);

    // 1. The group, and this worker's members in it; or, for `--notify`, the service
    // connection of worker 0.
    let mut notifier = None;
    let info = if args.notify {
        if worker == 0 {
            match service(args) {
                Ok(s) => notifier = Some(s),
                Err(e) => {
                    report.fail(format!("notify: {e}"));
                    return Ok(report);
                }
            }
        }
        ConvInfo {
            conv: ConvId(0),
            conv_type: chinwag_protocol::ConvType::Group,
            key: None,
            members: Vec::new(),
            member_count: args.members as u32,
            last_seq: chinwag_protocol::Seq(0),
            created: false,
        }
    } else {
        match make_group(args, base, &group, first, count) {
            Ok(info) => info,
            Err(e) => {
                report.fail(format!("group: {e}"));
                return Ok(report);
            }
        }
    };
    let conv = info.conv;
    meet.post("added", 1)?;
    if meet.wait("added", setup_deadline, || Ok(()))?.is_none() {
        report.fail("another worker did not add its members in time".into());
        return Ok(report);
    }
    // Every worker's adds are in: the group is whole.
    report.figure("group_members", args.members as u64);
    // Each message reaches every member but its sender; each notify every member.
    let per_message = args.members as u64 - u64::from(!args.notify);
    report.figure("deliveries_per_message", per_message);

    // 2. This worker's members log in.
    let tokens: Vec<String> = group[first..first + count]
        .iter()
        .map(|uid| common.token(*uid))
        .collect();
    let mut fleet = common.fleet()?;
    let opened = connect_and_login(&mut fleet, &tokens, common, &mut report, &mut progress)?;
    let logged_in = opened.count();
    report.figure("logged_in", logged_in as u64);
    report.figure("login_elapsed_s", opened.elapsed.as_secs_f64());
    report
        .latencies
        .push(("connect_to_login".into(), opened.connect_to_login));
    if logged_in < tokens.len() {
        // Tell the others not to wait, then stop.
        meet.post("ready", 0)?;
        fleet.traffic().report(&mut report);
        report.series = progress.series();
        return Ok(report);
    }
    meet.post("ready", report::unix_ns())?;
    // Nothing but membership news can come before the load; the connections are only kept read.
    let ready = meet.wait("ready", setup_deadline, || {
        fleet.turn(Duration::from_millis(1), |_, _, _| {})
    })?;
    let Some(ready) = ready.filter(|r| !r.contains(&0)) else {
        report.fail("another worker's members did not all log in".into());
        fleet.traffic().report(&mut report);
        report.series = progress.series();
        return Ok(report);
    };
    let start_ns = ready.iter().max().copied().unwrap_or(0) + START_MARGIN.as_nanos() as u64;

    // 3. The load.
    let measure_from_ns = start_ns + args.warmup_s * 1_000_000_000;
    let measure_to_ns = measure_from_ns + args.duration_s * 1_000_000_000;
    let drain_to_ns = measure_to_ns + args.drain_s * 1_000_000_000;
    let senders = args.senders;
    let sender_uids = &group[..senders];
    let slot_ns = 1_000_000_000 / u64::from(args.rate_per_s);
    let local = |member: usize| member.checked_sub(first).filter(|i| *i < count);
    let mut tracks: Vec<SeqTrack> = (0..count)
        .map(|_| SeqTrack::new(conv.0, info.last_seq.0 + 1))
        .collect();
    // Per local sender: (req, intended ns) of each message in flight.
    let senders_here = if args.notify {
        0
    } else {
        senders.saturating_sub(first).min(count)
    };
    // `--notify`: the `req` and intended time of each `notify_users` sent, and each local
    // member's `notify` pushes.
    let mut notifies: Vec<(u64, u64)> = Vec::new();
    let mut notified = vec![0u64; count];
    let mut in_flight: Vec<VecDeque<(u64, u64)>> = vec![VecDeque::new(); senders_here];
    let mut spreads: BTreeMap<u64, SeqSpread> = BTreeMap::new();
    let mut send_to_push = report::latency_histogram();
    let mut send_to_send_ok = report::latency_histogram();
    let mut violations = Violations::default();
    let (mut sent, mut send_ok, mut send_ok_measured) = (0u64, 0u64, 0u64);
    let (mut delivered, mut delivered_measured, mut slipped) = (0u64, 0u64, 0u64);
    let mut last_seq = info.last_seq.0;
    let mut lost = false;
    let mut next_slot = 0u64;
    let mut next_req = 2u64;
    let mut body = String::new();
    let (mut cpu_from, mut cpu_to) = (None, None);
    let (mut own_from, mut own_to) = (0.0, 0.0);
    let server_cpu = |pids: &[u32]| procfs::cpu_s(pids);
    let mut phase = "setup";
    let mut posted_last = false;
    let mut conv_last: Option<u64> = None;
    loop {
        let now_ns = report::unix_ns();
        let next_phase = if now_ns < start_ns {
            "setup"
        } else if now_ns < measure_from_ns {
            "warmup"
        } else if now_ns < measure_to_ns {
            "measured"
        } else {
            "drain"
        };
        if next_phase != phase {
            progress.phase(next_phase);
            if next_phase == "measured" {
                cpu_from = server_cpu(&common.server_pid)?;
                own_from = report::own_cpu_s();
                send_to_push.reset();
                send_to_send_ok.reset();
            }
            if next_phase == "drain" {
                cpu_to = server_cpu(&common.server_pid)?;
                own_to = report::own_cpu_s();
            }
            phase = next_phase;
        }
        // `--notify`: the requests due by now, from worker 0's service connection.
        while let Some(service) = notifier.as_mut() {
            if next_slot * slot_ns + start_ns > now_ns || now_ns >= measure_to_ns {
                break;
            }
            let intended_ns = start_ns + next_slot * slot_ns;
            stamp::write(&mut body, intended_ns, args.message_bytes);
            let request = Message::NotifyUsers(NotifyUsers {
                users: group.clone(),
                kind: "text".into(),
                body: body.as_str().into(),
            });
            match service.send(request) {
                Ok(req) => notifies.push((req, intended_ns)),
                Err(e) => {
                    report.fail(format!("notify_users: {e}"));
                    lost = true;
                    break;
                }
            }
            sent += 1;
            next_slot += 1;
        }
        // The messages due by now, each from its sender if this worker holds it.
        while !args.notify && next_slot * slot_ns + start_ns <= now_ns && now_ns < measure_to_ns {
            let sender = (next_slot % senders as u64) as usize;
            let intended_ns = start_ns + next_slot * slot_ns;
            if let Some(i) = local(sender) {
                if in_flight[i].len() >= args.in_flight_max {
                    slipped += 1;
                    break;
                }
                stamp::write(&mut body, intended_ns, args.message_bytes);
                let cmid = format!("g-{next_slot}");
                in_flight[i].push_back((next_req, intended_ns));
                fleet.conns[i].writer.send(&Frame::with_req(
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
                if let Err(failure) = fleet.flush(i) {
                    report.fail(failure.cause());
                    lost = true;
                }
            }
            next_slot += 1;
        }
        if now_ns >= measure_to_ns {
            // This worker's senders are done once their last send_ok is in; the notifier once
            // every `notify_users` is answered.
            if let Some(service) = notifier.as_mut() {
                for &(req, intended_ns) in &notifies {
                    match service.wait(req).map(|f| f.message) {
                        Ok(Message::NotifyUsersOk(n)) if n as usize == args.members => {
                            send_ok += 1;
                            if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                                send_ok_measured += 1;
                            }
                        }
                        Ok(other) => violations
                            .add(Violation::Other(format!("notify_users answered {other:?}"))),
                        Err(e) => report.fail(format!("notify_users: {e}")),
                    }
                }
                notifier = None;
            }
            if !posted_last && (in_flight.iter().all(VecDeque::is_empty) || now_ns >= drain_to_ns) {
                meet.post("last", if args.notify { send_ok } else { last_seq })?;
                posted_last = true;
            }
            if conv_last.is_none() {
                conv_last = meet.gather("last").map(|l| {
                    if args.notify {
                        l.into_iter().sum()
                    } else {
                        l.into_iter().max().unwrap_or(0)
                    }
                });
            }
            let all_seen = conv_last.is_some_and(|l| {
                if args.notify {
                    notified.iter().all(|n| *n >= l)
                } else {
                    tracks.iter().all(|t| t.next() > l)
                }
            });
            if lost || now_ns >= drain_to_ns || (posted_last && all_seen) {
                break;
            }
        }
        fleet.turn(
            Duration::from_millis(1),
            |i, _writer: &mut Writer, event| {
                let now_ns = report::unix_ns();
                let measured = (measure_from_ns..measure_to_ns).contains(&now_ns);
                match event {
                    Event::Frame(Frame {
                        req,
                        message: Message::SendOk(ok),
                    }) if i < in_flight.len() => {
                        let queue = &mut in_flight[i];
                        let Some(at) = req.and_then(|r| queue.iter().position(|f| f.0 == r)) else {
                            violations.add(Violation::Other(format!(
                                "send_ok for no request in flight (req {req:?})"
                            )));
                            return;
                        };
                        let (_, intended_ns) = queue.remove(at).unwrap_or_default();
                        send_ok += 1;
                        if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                            send_ok_measured += 1;
                            let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                            report::record(&mut send_to_send_ok, latency);
                        }
                        last_seq = last_seq.max(ok.seq.0);
                        if ok.conv != conv {
                            violations
                                .add(Violation::Other(format!("send_ok names conv {}", ok.conv)));
                        }
                        violations.check(tracks[i].own(ok.seq.0));
                    }
                    Event::Frame(Frame {
                        message: Message::Msg(msg),
                        ..
                    }) => {
                        delivered += 1;
                        if measured {
                            delivered_measured += 1;
                        }
                        let me = group[first + i];
                        if msg.conv != conv || msg.from == me || !sender_uids.contains(&msg.from) {
                            violations.add(Violation::Other(format!(
                                "member {}: push in conv {} from {}",
                                first + i,
                                msg.conv,
                                msg.from
                            )));
                            return;
                        }
                        violations.check(tracks[i].push(msg.seq.0));
                        let what = format_args!("seq {}", msg.seq);
                        let Some(intended_ns) = stamp::read(&msg.body, what, &mut violations)
                        else {
                            return;
                        };
                        if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                            let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                            report::record(&mut send_to_push, latency);
                        }
                        spreads
                            .entry(msg.seq.0)
                            .or_default()
                            .push(intended_ns, now_ns);
                    }
                    Event::Frame(Frame {
                        message: Message::Notify(n),
                        ..
                    }) if args.notify => {
                        delivered += 1;
                        if measured {
                            delivered_measured += 1;
                        }
                        notified[i] += 1;
                        let what = format_args!("notify");
                        let Some(intended_ns) = stamp::read(&n.body, what, &mut violations) else {
                            return;
                        };
                        if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                            let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                            report::record(&mut send_to_push, latency);
                        }
                        // A notify has no seq: its intended time tells it apart.
                        spreads
                            .entry(intended_ns)
                            .or_default()
                            .push(intended_ns, now_ns);
                    }
                    Event::Frame(Frame {
                        message: Message::Error(e),
                        ..
                    }) => report.fail(format!("refused: {}", e.code)),
                    // Membership news may come at any time; not wrong.
                    Event::Frame(Frame {
                        message:
                            Message::Members(_) | Message::MembersDelta(_) | Message::Receipt(_),
                        ..
                    }) => {}
                    Event::Frame(frame) => violations.add(Violation::Other(format!(
                        "member {}: unexpected {}",
                        first + i,
                        frame.message.op()
                    ))),
                    Event::Bad(e) => violations.add(Violation::Other(format!(
                        "member {}: undecodable: {e}",
                        first + i
                    ))),
                    Event::Failed(failure) => {
                        report.fail(failure.cause());
                        lost = true;
                    }
                    Event::Upgraded => {}
                }
            },
        )?;
        progress.tick(
            count,
            delivered,
            report.failures_total() + violations.count,
            send_to_push.value_at_quantile(0.99),
        );
    }
    if cpu_to.is_none() {
        cpu_to = server_cpu(&common.server_pid)?;
        own_to = report::own_cpu_s();
    }
    let conv_last = conv_last.or(meet
        .gather("last")
        .map(|l| l.into_iter().max().unwrap_or(0)));
    match conv_last {
        Some(notifies) if args.notify && !lost => {
            for (i, n) in notified.iter().enumerate() {
                if *n != notifies {
                    violations.add(Violation::Other(format!(
                        "member {}: {n} notify pushes of {notifies} sent",
                        first + i
                    )));
                }
            }
        }
        Some(conv_last) if !lost => {
            for track in &tracks {
                for gap in track.finish(conv_last) {
                    violations.add(gap);
                }
            }
        }
        Some(_) => {}
        None => report.fail("a worker never said how many messages its senders sent".into()),
    }

    let measured_s = args.duration_s.max(1) as f64;
    report.window_unix_ns = Some((measure_from_ns, measure_to_ns));
    report.figure("conv", conv.0);
    report.figure("senders", senders_here as u64);
    report.figure("sent", sent);
    report.figure("send_ok", send_ok);
    report.figure("open_loop_slipped", slipped);
    report.figure("delivered", delivered);
    report.figure("deliveries_measured", delivered_measured);
    report.figure("measured_s", measured_s);
    report.figure("messages_per_s", send_ok_measured as f64 / measured_s);
    report.figure("deliveries_per_s", delivered_measured as f64 / measured_s);
    if let (Some(from), Some(to)) = (cpu_from, cpu_to) {
        report.figure("server_cpu_s", to - from);
        report.figure("server_cpu_us_per_delivered", 0.0);
        report.figure("deliveries_per_server_cpu_s", 0.0);
    }
    report.figure("loadgen_cpu_s", own_to - own_from);
    report.figure(
        "loadgen_cpu_share_of_one_core",
        (own_to - own_from) / measured_s,
    );
    report.latencies.push(("send_to_push".into(), send_to_push));
    report
        .latencies
        .push(("send_to_send_ok".into(), send_to_send_ok));
    report.seq_spread = spreads;
    report.violations.count += violations.count;
    report.violations.first.extend(violations.first);
    fleet.traffic().report(&mut report);
    report.series = progress.series();
    if workers == 1 {
        finish(&mut report);
    }
    Ok(report)
}

/// Derives the figures that need every process's share: the delivery spread (from the merged
/// per-message arrivals) and the deliveries per second of server CPU time. Called on the
/// report of a run of one process, and by `--procs` on the merged one.
pub fn finish(report: &mut Report) {
    let get = |r: &Report, name: &str| {
        r.figures
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_f64())
    };
    let (Some(per_message), Some(window)) =
        (get(report, "deliveries_per_message"), report.window_unix_ns)
    else {
        return;
    };
    let spread = report::spread_histogram(&report.seq_spread, per_message as u64, window);
    report.latencies.push(("delivery_spread".into(), spread));
    if let (Some(cpu), Some(deliveries)) = (
        get(report, "server_cpu_s"),
        get(report, "deliveries_measured"),
    ) {
        for (name, value) in [
            (
                "server_cpu_us_per_delivered",
                cpu * 1e6 / deliveries.max(1.0),
            ),
            ("deliveries_per_server_cpu_s", deliveries / cpu.max(0.01)),
        ] {
            if let Some((_, v)) = report.figures.iter_mut().find(|(n, _)| n == name) {
                *v = value.into();
            }
        }
    }
}

/// Creates the run's group (or finds it: every worker sends the same `group_create`) and adds
/// this worker's slice of members, over the service port.
fn make_group(
    args: &GroupArgs,
    key: u64,
    group: &[Uid],
    first: usize,
    count: usize,
) -> Result<ConvInfo, String> {
    let mut service = service(args)?;
    let founders = group[..group.len().min(USERS_PER_GROUP_REQUEST_MAX)].to_vec();
    let created = service
        .call(Message::GroupCreate(GroupCreate {
            key,
            users: founders,
        }))
        .map_err(|e| format!("group_create: {e}"))?;
    let Message::GroupCreateOk(mut info) = created.message else {
        return Err(format!("group_create answered {}", created.message.op()));
    };
    let conv: ConvId = info.conv;
    for chunk in group[first..first + count].chunks(USERS_PER_GROUP_REQUEST_MAX) {
        let reply = service
            .call(Message::GroupAdd(GroupMembers {
                conv,
                users: chunk.to_vec(),
            }))
            .map_err(|e| format!("group_add: {e}"))?;
        match reply.message {
            Message::GroupAddOk(after) => info = after,
            other => return Err(format!("group_add answered {}", other.op())),
        }
    }
    Ok(info)
}

/// A connection to the service port, authenticated as service 1 with a token from `--secret`.
fn service(args: &GroupArgs) -> Result<ServiceClient, String> {
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let token = token::mint(
        args.common.secret.as_bytes(),
        &Claims {
            uid: Uid::new(UidKind::Service, 1),
            shop: None,
            exp: now_s + 3_600,
        },
    );
    ServiceClient::connect(&args.service_addr, &token)
        .map_err(|e| format!("service port {}: {e}", args.service_addr))
}
