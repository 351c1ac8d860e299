//! `chat`: users in conversations of `--members K`, each user sending in a closed loop (a window
//! of messages in flight) or at an open-loop rate.
//!
//! Users `K·c` .. `K·c + K - 1` share conversation `c`. With two members it is a direct
//! conversation: the first `send` names the peer (`user`), the following ones the conversation
//! (`conv`) from `send_ok`. With more, it is a shop conversation of a buyer (user `K·c`) and
//! `K - 1` agents of the conversation's own shop, built before the load one agent at a time
//! ([`shop::build`]: the engine assigns one agent per dispatch and has no client API for group
//! conversations yet); every member then sends to the `conv`, and every member's seqs start
//! after the build's.
//!
//! Latency is measured from a message's *intended* send time to its `send_ok` and to the push
//! at every other member. In a closed loop the intended time is the moment it is sent; in an
//! open loop it is the message's slot in the schedule, so a server that stalls is charged for
//! every message the stall delayed (no coordinated omission). The intended time travels in the
//! body (20 decimal digits of nanoseconds since the run started), so the receiver needs no
//! lookup.
//!
//! Every push and `send_ok` goes through a [`SeqTrack`]; after the run drains, every seq of
//! every conversation must have been seen by every member exactly once.
//!
//! `storm` is `chat` with reconnect storms: each second a share of the users drops its
//! connection, connects and logs in again (same account and device type, so the same device),
//! and catches up with `history` after the last seq it has seen, page by page. It reports the
//! time from the drop to being caught up; a message neither pushed nor returned by `history`
//! is a gap. Messages in flight when a connection drops may or may not have been stored; their
//! seqs come back through `history` like everyone else's.
//!
//! With several addresses (`--addr` a comma-separated list: the nodes of a cluster) users are
//! spread over them in turn, and a user whose connection fails (its node died, drained, or
//! closed it) does what `storm` does, against the next address: connects, logs in, catches up
//! with `history` and sends again what was unsure. A node that answers `unavailable` (the owner
//! of the user's partition or conversation is down or cut off) is not the end either: a login
//! or `history` so refused moves the user on to the next address after [`RECONNECT_AFTER`],
//! and a `send` so refused (it may or may not have been stored) is sent again with its cmid
//! after [`RETRY_AFTER`]. So every acknowledged message is still checked once, in order, at
//! every member: a node's death costs failures (counted by cause), never a gap.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io;
use std::time::{Duration, Instant};

use chinwag_protocol::{
    ConvId, DeviceType, ErrorCode, Frame, History, HistoryRange, Login, Message, Send, SendOk, Seq,
    ShopId, Target, Uid, UidKind,
};
use clap::Args;

use crate::check::{SeqTrack, Violation, Violations};
use crate::ledger::{Ledger, Sent, WriteOutages};
use crate::procfs;
use crate::proto::{Event, Writer};
use crate::report::{self, Progress, Report};
use crate::scenarios::stamp::{self, STAMP_DIGITS};
use crate::scenarios::{connect_and_login, shop, verify, Common, LOGIN_REQ};

/// Flags of `chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Conversations; `--members` users (one connection each) per conversation.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Members per conversation: 2 is a direct conversation, more a shop conversation of a
    /// buyer and K-1 agents (at most 1,000, the store's limit).
    #[arg(long, default_value_t = 2)]
    pub members: usize,
    /// Seconds allowed to build the shop conversations (`--members` above 2).
    #[arg(long, default_value_t = 120)]
    pub build_timeout_s: u64,
    /// Messages per second each user sends (open loop); 0 runs a closed loop.
    #[arg(long, default_value_t = 0.0)]
    pub rate_per_user_per_s: f64,
    /// Closed loop: messages each user keeps in flight (sent, no `send_ok` yet).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Open loop: most messages in flight per user; past it the schedule slips (and latency,
    /// measured from the schedule, shows it).
    #[arg(long, default_value_t = 1000)]
    pub in_flight_max: usize,
    /// Body bytes per message (at least 20: the send time is stamped in the body).
    #[arg(long, default_value_t = 32)]
    pub message_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Seconds allowed after sending stops for every reply and push to arrive.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
    /// After the drain, read every conversation back with `history` (from any node of
    /// `--addr`) and check it against every acknowledged send: each stored exactly once at
    /// the seq its `send_ok` named, with its body; seqs 1..n with no hole (docs/loadgen.md,
    /// "Verifying the stored log").
    #[arg(long)]
    pub verify_log: bool,
    /// Seconds allowed for `--verify-log` to read every conversation.
    #[arg(long, default_value_t = 60)]
    pub verify_timeout_s: u64,
    /// With several `--addr`: how long a request waits for its reply before the user sends
    /// it again (a send, same cmid) or moves to the next address (a login or `history` while
    /// catching up). The JavaScript client's `requestTimeoutMs` is 5000.
    #[arg(long, default_value_t = 5000)]
    pub reply_timeout_ms: u64,
}

/// Flags of `storm`: those of `chat`, plus the storm.
#[derive(Args, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Share of the users that drop and log in again each second (0.1 = 10%).
    #[arg(long, default_value_t = 0.1)]
    pub drop_share_per_s: f64,
    /// Messages per `history` page while catching up (1..=200).
    #[arg(long, default_value_t = 200)]
    pub history_limit: u16,
}

struct User {
    /// The index of its current connection in the fleet.
    conn: usize,
    /// Set from the drop of its connection until `history` has caught it up.
    catching_up: Option<Instant>,
    /// The other member of a direct conversation, named in its first `send` (with more than
    /// two members the conversation is known from the build and this is not used).
    peer: Uid,
    conv: Option<ConvId>,
    /// Messages without `send_ok`.
    in_flight: VecDeque<InFlight>,
    /// Messages that were in flight when the connection dropped: they may or may not have
    /// been stored. After catching up they are sent again with the same cmid, as a client
    /// must (the server answers the original seq if it stored them).
    unsure: Vec<InFlight>,
    next_req: u64,
    sent: u64,
    track: Option<SeqTrack>,
    lost: bool,
    /// A move to the next address is scheduled (several addresses only).
    reconnect_due: bool,
    /// Failed moves since it last caught up: the first goes at once, the following ones
    /// wait [`RECONNECT_AFTER`].
    failed_moves: u32,
    /// Sends refused `unavailable` waiting to go again with their cmid.
    resends_due: usize,
    /// While draining with several addresses: when a user still missing seqs asks `history`
    /// for them (a push can be lost in a cluster, docs/cluster.md).
    repair_at: Option<Instant>,
    /// When its current connection last brought anything (or was opened).
    last_heard: Instant,
    /// The reqs (and message numbers) of sends whose reply timed out or that were answered
    /// `unavailable`, and that were sent again (a late reply to one is not a violation).
    abandoned: Vec<(u64, u64)>,
    /// Its conversation's number in this process (users `k·c` .. `k·c + k - 1`).
    conversation: usize,
    /// `--verify-log`: every send it made, by message number.
    log: Vec<Sent>,
}

/// A `send` waiting for its `send_ok`.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    req: u64,
    /// Intended send time, ns since the load started.
    intended_ns: u64,
    /// The user's message number, which makes its cmid.
    n: u64,
    /// Sent again after a reconnect: its seq may already have come through `history`.
    resent: bool,
    /// When it was written (for the reply timeout of several addresses).
    sent_at: Option<Instant>,
}

/// What the run counts as it goes.
#[derive(Default)]
struct Counts {
    sent: u64,
    send_ok: u64,
    delivered: u64,
    delivered_measured: u64,
    send_ok_measured: u64,
    errors: u64,
    behind: u64,
    reconnects: u64,
    history_pages: u64,
    resent: u64,
    /// `history` asked while draining for seqs no push brought (several addresses).
    repairs: u64,
    /// Replies not come within `--reply-timeout-ms` (several addresses).
    timed_out: u64,
    /// `--verify-log`: what was recorded of the sends.
    ledger: Ledger,
    /// Conversations (by number) from a failed or unanswered send to the next write.
    outages: WriteOutages<usize>,
    /// The slowest acknowledgements (from the intended send to the `send_ok`, resends
    /// included), slowest first, with what they acknowledged: what a failure's report needs.
    slowest: Vec<(Duration, String)>,
}

impl Counts {
    /// Keeps the acknowledgement of user `i`'s message `n` among the [`SLOWEST_KEPT`] slowest.
    fn slow(&mut self, latency: Duration, i: usize, n: u64, ok: &SendOk, resent: bool) {
        if self.slowest.len() == SLOWEST_KEPT
            && self.slowest.last().is_some_and(|(l, _)| *l >= latency)
        {
            return;
        }
        let again = if resent { ", sent again" } else { "" };
        let what = format!(
            "cmid {i}-{n}: conv {} seq {} after {:.1} s{again}",
            ok.conv,
            ok.seq,
            latency.as_secs_f64()
        );
        let at = self.slowest.partition_point(|(l, _)| *l >= latency);
        self.slowest.insert(at, (latency, what));
        self.slowest.truncate(SLOWEST_KEPT);
    }
}

/// Slowest acknowledgements a report names.
const SLOWEST_KEPT: usize = 5;

/// Runs `chat` and returns its report.
pub fn run(args: &ChatArgs) -> io::Result<Report> {
    run_with(args, None)
}

/// Runs `storm` and returns its report.
pub fn storm(args: &StormArgs) -> io::Result<Report> {
    run_with(&args.chat, Some(args))
}

impl ChatArgs {
    /// Checks what clap cannot (a bad flag exits 2 before anything runs).
    pub fn validate(&self) -> Result<(), String> {
        if self.message_bytes < STAMP_DIGITS || self.window == 0 || self.conversations == 0 {
            return Err(
                "chat needs --message-bytes >= 20, --window >= 1 and --conversations >= 1".into(),
            );
        }
        if !(2..=MEMBERS_MAX).contains(&self.members) {
            return Err("chat needs --members in 2..=1000".into());
        }
        if !self.rate_per_user_per_s.is_finite() || self.rate_per_user_per_s < 0.0 {
            return Err("--rate-per-user-per-s must be 0 (closed loop) or more".into());
        }
        if self.in_flight_max == 0 {
            return Err("--in-flight-max must be at least 1".into());
        }
        Ok(())
    }
}

impl StormArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.chat.validate()?;
        if !(0.0..=1.0).contains(&self.drop_share_per_s)
            || !(1..=HISTORY_PAGE_FULL).contains(&self.history_limit)
        {
            return Err(
                "storm needs --drop-share-per-s in 0..=1 and --history-limit in 1..=200".into(),
            );
        }
        Ok(())
    }
}

fn run_with(args: &ChatArgs, storm: Option<&StormArgs>) -> io::Result<Report> {
    let common = &args.common;
    let mut report = Report::default();
    let mut progress = Progress::new(!common.run.quiet);
    let k = args.members;
    let (first, conversations) = common.slice(args.conversations);
    let base = common.uid_base() + (k * first) as u64;
    let n = conversations * k;
    // User i is member i % k of conversation i / k; member 0 of a shop conversation is its
    // buyer, and the shop is named after the buyer's number.
    let uid = |i: usize| match (k, i % k) {
        (2, _) | (_, 0) => Uid::new(UidKind::Buyer, base + i as u64),
        _ => Uid::new(UidKind::Agent, base + i as u64),
    };
    let shop_of = |i: usize| (k > 2).then(|| ShopId(base + (i - i % k) as u64));
    let tokens: Vec<String> = (0..n)
        .map(|i| common.token_in_shop(uid(i), shop_of(i).filter(|_| i % k > 0)))
        .collect();
    // Shop conversations are built before the load: (conv, last seq of the build) of each.
    let mut built: Vec<Option<(ConvId, u64)>> = vec![None; conversations];
    if k > 2 {
        let build_start = Instant::now();
        let deadline = build_start + Duration::from_secs(args.build_timeout_s);
        for (c, conv) in built.iter_mut().enumerate() {
            let shop = shop_of(c * k).expect("k > 2: every conversation has a shop");
            let agents: Vec<Uid> = (c * k + 1..(c + 1) * k).map(uid).collect();
            let done = shop::build(common, uid(c * k), &agents, shop, deadline);
            *conv = Some(done.map_err(io::Error::other)?);
        }
        report.figure("build_s", build_start.elapsed().as_secs_f64());
    }
    let mut fleet = common.fleet()?;
    let opened = connect_and_login(&mut fleet, &tokens, common, &mut report, &mut progress)?;
    if opened.count() < n {
        report.figure("logged_in", opened.count() as u64);
        fleet.traffic().report(&mut report);
        report.series = progress.series();
        return Ok(report);
    }
    let mut users: Vec<User> = (0..n)
        .map(|i| User {
            conn: i,
            catching_up: None,
            peer: uid(i ^ 1),
            conv: built[i / k].map(|(conv, _)| conv),
            in_flight: VecDeque::new(),
            unsure: Vec::new(),
            next_req: 2,
            sent: 0,
            track: built[i / k].map(|(conv, last)| SeqTrack::new(conv.0, last + 1)),
            lost: false,
            reconnect_due: false,
            failed_moves: 0,
            resends_due: 0,
            repair_at: None,
            last_heard: Instant::now(),
            abandoned: Vec::new(),
            conversation: i / k,
            log: Vec::new(),
        })
        .collect();
    // Several addresses: a failed connection moves on instead of losing its user.
    let moves_on = fleet.addr_count() > 1;
    let mut moves: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut resends: VecDeque<(Instant, usize, InFlight)> = VecDeque::new();
    let mut next_timeout_scan = Instant::now();
    let reply_timeout = Duration::from_millis(args.reply_timeout_ms.max(1));

    let closed_loop = args.rate_per_user_per_s <= 0.0;
    let mut counts = Counts::default();
    let mut last_seq: HashMap<ConvId, u64> = built.iter().flatten().copied().collect();
    let mut send_to_send_ok = report::latency_histogram();
    let mut send_to_push = report::latency_histogram();
    let mut violations = Violations::default();
    let mut body = String::with_capacity(args.message_bytes);
    // Which user each connection belongs to; reconnects add connections.
    let mut conn_user: Vec<usize> = (0..n).collect();
    let mut catch_up = report::latency_histogram();
    let mut storm_cursor = 0usize;
    // Storms come half a second into the load, then every second.
    let mut next_storm = Instant::now() + Duration::from_millis(500);
    // Closed loop: window slots of refused sends, each free again at its instant (a refused
    // send is not repeated at once, or a rate-limited run would spin on refusals).
    let mut retries: VecDeque<(Instant, usize)> = VecDeque::new();

    let start = Instant::now();
    let ns = |at: Instant| at.duration_since(start).as_nanos() as u64;
    let measure_from_ns = args.warmup_s * 1_000_000_000;
    let measure_to_ns = measure_from_ns + args.duration_s * 1_000_000_000;
    let drain_end = start + Duration::from_nanos(measure_to_ns) + Duration::from_secs(args.drain_s);
    let period_ns = if closed_loop {
        0
    } else {
        (1e9 / args.rate_per_user_per_s) as u64
    };
    let (mut server_cpu_from, mut server_cpu_to) = (None, None);
    let (mut own_cpu_from, mut own_cpu_to) = (0.0, 0.0);
    let mut measuring = false;
    progress.phase(if args.warmup_s > 0 {
        "warmup"
    } else {
        "measured"
    });

    if closed_loop {
        for (i, user) in users.iter_mut().enumerate() {
            for _ in 0..args.window {
                send(
                    user,
                    i,
                    &mut fleet.conns[i].writer,
                    0,
                    &mut body,
                    args,
                    &mut counts,
                );
            }
            flush(&mut fleet, i, &mut report, user, None, &mut counts);
        }
    }
    loop {
        let now = Instant::now();
        let now_ns = ns(now);
        if !measuring && now_ns >= measure_from_ns && now_ns < measure_to_ns {
            measuring = true;
            progress.phase("measured");
            report.window_unix_ns = Some((report::unix_ns(), 0));
            server_cpu_from = procfs::cpu_s(&common.server_pid)?;
            own_cpu_from = report::own_cpu_s();
            send_to_send_ok.reset();
            send_to_push.reset();
        }
        let sending = now_ns < measure_to_ns;
        if !sending && server_cpu_to.is_none() {
            progress.phase("drain");
            server_cpu_to = procfs::cpu_s(&common.server_pid)?.or(Some(0.0));
            own_cpu_to = report::own_cpu_s();
            let from = report.window_unix_ns.map_or(report::unix_ns(), |w| w.0);
            report.window_unix_ns = Some((from, report::unix_ns()));
        }
        if !sending && (now >= drain_end || drained(&users, k, &last_seq)) {
            break;
        }
        if moves_on && !sending {
            // A cluster may lose a push (a device whose route had not reached the owner's node
            // yet, a push dropped with a link); a client repairs it from `history`. A user
            // still missing seqs a while after sending stopped asks for them.
            for (i, user) in users.iter_mut().enumerate() {
                let Some(conv) = user.conv else { continue };
                let next = user.track.as_ref().map_or(1, SeqTrack::next);
                let behind = next <= last_seq.get(&conv).copied().unwrap_or(0);
                let idle = user.in_flight.is_empty() && user.resends_due == 0;
                if user.lost || user.catching_up.is_some() || !idle || !behind {
                    user.repair_at = None;
                    continue;
                }
                match user.repair_at {
                    None => user.repair_at = Some(now + REPAIR_AFTER),
                    Some(at) if at <= now => {
                        user.repair_at = None;
                        user.catching_up = Some(now);
                        counts.repairs += 1;
                        let writer = &mut fleet.conns[user.conn].writer;
                        ask_history(user, writer, conv, next - 1, storm);
                        flush(
                            &mut fleet,
                            i,
                            &mut report,
                            user,
                            Some(&mut moves),
                            &mut counts,
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        if let (Some(storm), true) = (storm, sending && now >= next_storm) {
            next_storm += Duration::from_secs(1);
            let drops = (storm.drop_share_per_s * n as f64).round() as usize;
            for _ in 0..drops {
                storm_cursor = (storm_cursor + 1) % n;
                let user = &mut users[storm_cursor];
                if user.lost || user.catching_up.is_some() {
                    continue;
                }
                fleet.close(user.conn);
                let unsure: Vec<InFlight> = user.in_flight.drain(..).collect();
                user.unsure.extend(unsure);
                user.catching_up = Some(now);
                counts.reconnects += 1;
                conn_user.push(storm_cursor);
                match fleet.open() {
                    Ok(conn) => user.conn = conn,
                    Err(failure) => {
                        report.fail(failure.cause());
                        user.lost = true;
                    }
                }
            }
        }
        while moves.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, i)) = moves.pop_front() else {
                break;
            };
            let user = &mut users[i];
            user.reconnect_due = false;
            if user.lost {
                continue;
            }
            let old = user.conn;
            fleet.close(old);
            conn_user.push(i);
            user.last_heard = now;
            match fleet.open_next(old) {
                Ok(conn) => user.conn = conn,
                Err(failure) => {
                    report.fail(failure.cause());
                    user.conn = fleet.conns.len() - 1;
                    user.failed_moves += 1;
                    schedule_move(user, i, now, &mut moves);
                }
            }
        }
        while resends.front().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, i, unsure)) = resends.pop_front() else {
                break;
            };
            let user = &mut users[i];
            user.resends_due -= 1;
            if user.lost {
                continue;
            }
            if user.catching_up.is_some() {
                // Sent again once caught up, with the others that were unsure.
                user.unsure.push(unsure);
                continue;
            }
            counts.resent += 1;
            let writer = &mut fleet.conns[user.conn].writer;
            send_numbered(
                user,
                i,
                writer,
                unsure.intended_ns,
                unsure.n,
                true,
                &mut body,
                args,
            );
            flush(
                &mut fleet,
                i,
                &mut report,
                user,
                moves_on.then_some(&mut moves),
                &mut counts,
            );
        }
        if moves_on && now >= next_timeout_scan {
            next_timeout_scan = now + Duration::from_millis(100);
            // A cluster does not answer a request whose owner died after its node link
            // acknowledged it (docs/cluster.md, "Node links"): as a client must, give such a
            // reply `--reply-timeout-ms`, then send again with the cmid (a send) or move on (a login
            // or `history` while catching up).
            for (i, user) in users.iter_mut().enumerate() {
                if user.lost || user.reconnect_due {
                    continue;
                }
                if user.catching_up.is_some() {
                    if now.duration_since(user.last_heard) > reply_timeout {
                        counts.timed_out += 1;
                        user.failed_moves += 1;
                        schedule_move(user, i, now, &mut moves);
                    }
                    continue;
                }
                let late = |f: &InFlight| {
                    f.sent_at
                        .is_some_and(|at| now.duration_since(at) > reply_timeout)
                };
                if !user.in_flight.iter().any(late) {
                    continue;
                }
                let (stale, fresh): (VecDeque<InFlight>, VecDeque<InFlight>) =
                    user.in_flight.drain(..).partition(late);
                user.in_flight = fresh;
                let writer = &mut fleet.conns[user.conn].writer;
                for f in stale {
                    counts.timed_out += 1;
                    user.abandoned.push((f.req, f.n));
                    counts
                        .outages
                        .failed(user.conversation, f.sent_at.unwrap_or(now), now);
                    if user.abandoned.len() > ABANDONED_MAX {
                        user.abandoned.remove(0);
                    }
                    send_numbered(user, i, writer, f.intended_ns, f.n, true, &mut body, args);
                }
                flush(
                    &mut fleet,
                    i,
                    &mut report,
                    user,
                    Some(&mut moves),
                    &mut counts,
                );
            }
        }
        while sending && retries.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, i)) = retries.pop_front() else {
                break;
            };
            let user = &mut users[i];
            if user.lost || user.catching_up.is_some() || user.in_flight.len() >= args.window {
                continue;
            }
            let writer = &mut fleet.conns[user.conn].writer;
            send(user, i, writer, now_ns, &mut body, args, &mut counts);
            flush(
                &mut fleet,
                i,
                &mut report,
                user,
                moves_on.then_some(&mut moves),
                &mut counts,
            );
        }
        if sending && !closed_loop {
            // Open loop: every user sends each message whose slot has come; users are spread
            // evenly over one period so they do not all send in the same instant.
            for (i, user) in users.iter_mut().enumerate() {
                if user.lost || user.catching_up.is_some() {
                    continue;
                }
                let offset_ns = period_ns * i as u64 / n as u64;
                let mut queued = false;
                while offset_ns + user.sent * period_ns <= now_ns {
                    if user.in_flight.len() >= args.in_flight_max {
                        counts.behind += 1;
                        break;
                    }
                    let intended_ns = offset_ns + user.sent * period_ns;
                    send(
                        user,
                        i,
                        &mut fleet.conns[user.conn].writer,
                        intended_ns,
                        &mut body,
                        args,
                        &mut counts,
                    );
                    queued = true;
                }
                if queued {
                    flush(
                        &mut fleet,
                        i,
                        &mut report,
                        user,
                        moves_on.then_some(&mut moves),
                        &mut counts,
                    );
                }
            }
        }
        fleet.turn(Duration::from_millis(1), |conn, writer, event| {
            let now_ns = ns(Instant::now());
            let in_window = (measure_from_ns..measure_to_ns).contains(&now_ns);
            let i = conn_user[conn];
            let user = &mut users[i];
            if conn != user.conn {
                // A connection the user has left behind.
                return;
            }
            if !matches!(event, Event::Failed(_)) {
                user.last_heard = Instant::now();
            }
            match event {
                // Only reconnects upgrade here; the first logins happened before the loop.
                Event::Upgraded => writer.send(&Frame::with_req(
                    LOGIN_REQ,
                    Message::Login(Login {
                        token: tokens[i].as_str().into(),
                        device: DeviceType::Web,
                    }),
                )),
                Event::Frame(Frame {
                    message: Message::LoginOk(_),
                    ..
                }) => match user.conv {
                    Some(conv) => {
                        let after = user.track.as_ref().map_or(0, |t| t.next() - 1);
                        ask_history(user, writer, conv, after, storm);
                    }
                    // Dropped before it learned its conversation (no send_ok, no push yet):
                    // the peer may have written meanwhile, so find it the way a client
                    // does, with `convs`, and catch up on it.
                    None => {
                        let req = user.next_req;
                        user.next_req += 1;
                        writer.send(&Frame::with_req(req, Message::Convs));
                    }
                },
                Event::Frame(Frame {
                    message: Message::ConvsOk(convs),
                    ..
                }) => {
                    let me = uid(i);
                    let found = convs.iter().find(|c| {
                        c.members.contains(&me) && group(i, k).all(|j| c.members.contains(&uid(j)))
                    });
                    match found.map(|c| c.conv) {
                        Some(conv) => {
                            user.conv = Some(conv);
                            let after = user.track.as_ref().map_or(0, |t| t.next() - 1);
                            ask_history(user, writer, conv, after, storm);
                        }
                        None => caught_up(
                            user,
                            i,
                            writer,
                            now_ns,
                            &mut catch_up,
                            &mut body,
                            args,
                            &mut counts,
                            now_ns < measure_to_ns,
                        ),
                    }
                }
                Event::Frame(Frame {
                    message: Message::HistoryOk(page),
                    ..
                }) => {
                    counts.history_pages += 1;
                    let track = user
                        .track
                        .get_or_insert_with(|| SeqTrack::new(page.conv.0, 1));
                    for msg in &page.msgs {
                        track.recover(msg.seq.0);
                    }
                    let limit = storm.map_or(HISTORY_PAGE_FULL, |s| s.history_limit);
                    match page.msgs.last() {
                        Some(last) if page.msgs.len() >= usize::from(limit) => {
                            ask_history(user, writer, page.conv, last.seq.0, storm)
                        }
                        _ => caught_up(
                            user,
                            i,
                            writer,
                            now_ns,
                            &mut catch_up,
                            &mut body,
                            args,
                            &mut counts,
                            now_ns < measure_to_ns,
                        ),
                    }
                }
                Event::Frame(Frame {
                    req,
                    message: Message::SendOk(ok),
                }) => {
                    let Some(at) = req.and_then(|r| user.in_flight.iter().position(|f| f.req == r))
                    else {
                        if let Some(gone) =
                            req.and_then(|r| user.abandoned.iter().position(|a| a.0 == r))
                        {
                            // The late reply of a send already sent again: its seq counts once.
                            let (_, n) = user.abandoned.swap_remove(gone);
                            let conv_last = last_seq.entry(ok.conv).or_default();
                            *conv_last = (*conv_last).max(ok.seq.0);
                            if let Some(v) = ack(user, i, n, ok.conv, ok.seq) {
                                violations.add(v);
                            }
                            if let Some(track) = user.track.as_mut() {
                                track.recover(ok.seq.0);
                            }
                            return;
                        }
                        violations.add(Violation::Other(format!(
                            "user {i}: send_ok for no request in flight (req {req:?})"
                        )));
                        return;
                    };
                    let InFlight {
                        intended_ns,
                        resent,
                        n,
                        sent_at,
                        ..
                    } = user.in_flight.remove(at).unwrap_or_default();
                    counts.send_ok += 1;
                    let now = Instant::now();
                    counts
                        .outages
                        .acked(user.conversation, sent_at.unwrap_or(now), now);
                    if let Some(v) = ack(user, i, n, ok.conv, ok.seq) {
                        violations.add(v);
                    }
                    if in_window {
                        counts.send_ok_measured += 1;
                    }
                    let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                    if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                        report::record(&mut send_to_send_ok, latency);
                    }
                    counts.slow(latency, i, n, &ok, resent);
                    let conv_last = last_seq.entry(ok.conv).or_default();
                    *conv_last = (*conv_last).max(ok.seq.0);
                    if user.conv.is_some_and(|c| c != ok.conv) {
                        violations.add(Violation::Other(format!(
                            "user {i}: send_ok names conv {} after conv {:?}",
                            ok.conv, user.conv
                        )));
                        return;
                    }
                    user.conv = Some(ok.conv);
                    let track = user
                        .track
                        .get_or_insert_with(|| SeqTrack::new(ok.conv.0, 1));
                    if resent {
                        // The original may have been stored and caught up through history.
                        track.recover(ok.seq.0);
                    } else {
                        violations.check(track.own(ok.seq.0));
                    }
                    if closed_loop
                        && now_ns < measure_to_ns
                        && user.in_flight.len() < args.window
                        && user.catching_up.is_none()
                    {
                        send(user, i, writer, now_ns, &mut body, args, &mut counts);
                    }
                }
                Event::Frame(Frame {
                    message: Message::Msg(msg),
                    ..
                }) => {
                    counts.delivered += 1;
                    if in_window {
                        counts.delivered_measured += 1;
                    }
                    let from_member = group(i, k).any(|j| j != i && uid(j) == msg.from);
                    if !from_member || user.conv.is_some_and(|c| c != msg.conv) {
                        violations.add(Violation::Other(format!(
                            "user {i}: push in conv {} from {}, not from another member",
                            msg.conv, msg.from
                        )));
                        return;
                    }
                    user.conv = Some(msg.conv);
                    let track = user
                        .track
                        .get_or_insert_with(|| SeqTrack::new(msg.conv.0, 1));
                    // While catching up, pushes and history overlap by design.
                    if user.catching_up.is_none() || !track.has_seen(msg.seq.0) {
                        violations.check(track.push(msg.seq.0));
                    }
                    let what = format_args!("conv {} seq {}", msg.conv, msg.seq);
                    if let Some(intended_ns) = stamp::read(&msg.body, what, &mut violations) {
                        if (measure_from_ns..measure_to_ns).contains(&intended_ns) {
                            let latency = Duration::from_nanos(now_ns.saturating_sub(intended_ns));
                            report::record(&mut send_to_push, latency);
                        }
                    }
                }
                Event::Frame(Frame {
                    req,
                    message: Message::Error(e),
                }) => {
                    counts.errors += 1;
                    report.fail(format!("refused: {}", e.code));
                    let unavailable = e.code == ErrorCode::Unavailable;
                    if user.catching_up.is_some() {
                        if moves_on && unavailable {
                            // This node cannot serve the login or history now: another may.
                            if !user.reconnect_due {
                                user.failed_moves += 1;
                                schedule_move(user, i, Instant::now(), &mut moves);
                            }
                            return;
                        }
                        // A refused login or history: this user cannot catch up.
                        user.lost = true;
                        return;
                    }
                    if let Some(at) =
                        req.and_then(|r| user.in_flight.iter().position(|f| f.req == r))
                    {
                        let refused = user.in_flight.remove(at).unwrap_or_default();
                        if moves_on && unavailable {
                            // It may or may not have been stored: send it again, same cmid. A
                            // cluster may still answer it later (the owner did it, and its
                            // reply came back after the link gave up on it): not a violation.
                            user.abandoned.push((refused.req, refused.n));
                            let now = Instant::now();
                            let sent_at = refused.sent_at.unwrap_or(now);
                            counts.outages.failed(user.conversation, sent_at, now);
                            if user.abandoned.len() > ABANDONED_MAX {
                                user.abandoned.remove(0);
                            }
                            let again = InFlight {
                                resent: true,
                                ..refused
                            };
                            user.resends_due += 1;
                            resends.push_back((Instant::now() + RETRY_AFTER, i, again));
                        } else if closed_loop && now_ns < measure_to_ns {
                            retries.push_back((Instant::now() + RETRY_AFTER, i));
                        }
                    }
                }
                // A direct conversation's members never change, and storing a message moves
                // only the sender's cursor, which pushes no receipt; ignore both if they come.
                Event::Frame(Frame {
                    message: Message::Members(_) | Message::Receipt(_),
                    ..
                }) => {}
                Event::Frame(frame) => violations.add(Violation::Other(format!(
                    "user {i}: unexpected {}",
                    frame.message.op()
                ))),
                Event::Bad(e) => violations.add(Violation::Other(format!(
                    "user {i}: undecodable frame: {e}"
                ))),
                Event::Failed(failure) => {
                    report.fail(failure.cause());
                    if !moves_on {
                        user.lost = true;
                        return;
                    }
                    move_on(user, i, &mut moves, &mut counts);
                }
            }
        })?;
        let p99_us = send_to_push.value_at_quantile(0.99);
        let open = users.iter().filter(|u| !u.lost).count();
        progress.tick(
            open,
            counts.delivered,
            counts.errors + violations.count,
            p99_us,
        );
    }

    // Every seq of every conversation must have reached every member, unless one was lost.
    for (i, user) in users.iter().enumerate() {
        if group(i, k).any(|j| users[j].lost) {
            continue;
        }
        let Some(conv) = group(i, k).find_map(|j| users[j].conv) else {
            continue;
        };
        let last = last_seq.get(&conv).copied().unwrap_or(0);
        let track = user
            .track
            .clone()
            .unwrap_or_else(|| SeqTrack::new(conv.0, 1));
        for gap in track.finish(last) {
            violations.add(gap);
        }
    }

    let measured_s = args.duration_s.max(1) as f64;
    let mode = if closed_loop {
        format!("closed loop, window {}", args.window)
    } else {
        format!("open loop, {} msg/s per user", args.rate_per_user_per_s)
    };
    report.figure("mode", mode);
    report.figure("encoding", if common.json { "json" } else { "binary" });
    report.figure("conversations", conversations as u64);
    if k > 2 {
        report.figure("kind", format!("shop, {k} members"));
    }
    report.figure("connections", n as u64);
    report.figure("connect_login_s", opened.elapsed.as_secs_f64());
    report.figure("sent", counts.sent);
    report.figure("send_ok", counts.send_ok);
    report.figure("delivered", counts.delivered);
    report.figure("measured_s", measured_s);
    report.figure("send_ok_per_s", counts.send_ok_measured as f64 / measured_s);
    report.figure(
        "delivered_per_s",
        counts.delivered_measured as f64 / measured_s,
    );
    if !closed_loop {
        report.figure("open_loop_slipped", counts.behind);
    }
    if moves_on {
        report.figure("history_repairs", counts.repairs);
        report.figure("replies_timed_out", counts.timed_out);
        report.figure("write_outages", counts.outages.begun);
        report.figure("write_outages_unresolved", counts.outages.unresolved());
    }
    if storm.is_some() || moves_on {
        report.figure("reconnects", counts.reconnects);
        report.figure("resent_after_reconnect", counts.resent);
        report.figure(
            "slowest_acks",
            counts
                .slowest
                .iter()
                .map(|(_, what)| what.clone())
                .collect::<Vec<_>>(),
        );
        report.figure("history_pages", counts.history_pages);
        let still = users.iter().filter(|u| u.catching_up.is_some()).count();
        report.figure("not_caught_up_at_end", still as u64);
        report
            .latencies
            .push(("drop_to_caught_up".into(), catch_up));
    }
    if let (Some(from), Some(to)) = (server_cpu_from, server_cpu_to) {
        let cpu_s = to - from;
        report.figure("server_cpu_s", cpu_s);
        report.figure(
            "server_cpu_us_per_delivered",
            cpu_s * 1e6 / counts.delivered_measured.max(1) as f64,
        );
    }
    if let Some(rss) = procfs::rss_bytes_sum(&common.server_pid)? {
        report.figure("server_rss_bytes", rss);
    }
    let own_cpu_s = own_cpu_to - own_cpu_from;
    report.figure("loadgen_cpu_s", own_cpu_s);
    report.figure("loadgen_cpu_share_of_one_core", own_cpu_s / measured_s);
    report.latencies.push(("send_to_push".into(), send_to_push));
    report
        .latencies
        .push(("send_to_send_ok".into(), send_to_send_ok));
    report
        .latencies
        .push(("connect_to_login".into(), opened.connect_to_login));
    if moves_on {
        let resumed = std::mem::replace(&mut counts.outages.resumed, report::latency_histogram());
        report
            .latencies
            .push(("failure_to_write_resumed".into(), resumed));
    }
    for v in violations.first.drain(..) {
        report.violations.first.push(v);
    }
    report.violations.count += violations.count;
    fleet.traffic().report(&mut report);
    drop(fleet);
    if args.verify_log {
        if counts.ledger.full {
            report.fail(format!(
                "verify-log: not verified: more than {} sends to record, or one out of order",
                Ledger::SENDS_MAX
            ));
        } else {
            let to_read = logs_to_read(&users, k, &built, &tokens);
            let timeout = Duration::from_secs(args.verify_timeout_s);
            verify::run(common, timeout, to_read, &mut report);
        }
    }
    report.series = progress.series();
    Ok(report)
}

/// `--verify-log`: send number `n` of user `i` was acknowledged at `seq` of `conv`; a
/// violation if the same cmid was acknowledged at another seq before.
fn ack(user: &mut User, i: usize, n: u64, conv: ConvId, seq: Seq) -> Option<Violation> {
    let sent = user.log.get_mut(usize::try_from(n).ok()?)?;
    let first = sent.ack(seq.0).err()?;
    Some(Violation::AckedTwice {
        conv: conv.0,
        cmid: format!("{i}-{n}"),
        first,
        again: seq.0,
    })
}

/// The conversations of the run whose id some member learned, each with every send its
/// members made (by cmid, `USER-N`) and the token of its first member.
fn logs_to_read(
    users: &[User],
    k: usize,
    built: &[Option<(ConvId, u64)>],
    tokens: &[String],
) -> Vec<verify::ToRead> {
    let mut out = Vec::new();
    for (c, build) in built.iter().enumerate() {
        let members = group(c * k, k);
        // A direct conversation no member got a `send_ok` or a push of has nothing
        // acknowledged to check (and no id to read it by).
        let Some(conv) = members.clone().find_map(|j| users[j].conv) else {
            continue;
        };
        let mut sends = HashMap::new();
        for j in members {
            for (n, sent) in users[j].log.iter().enumerate() {
                sends.insert(format!("{j}-{n}"), *sent);
            }
        }
        out.push(verify::ToRead {
            conv,
            first: build.map_or(1, |(_, last)| last + 1),
            token: tokens[c * k].clone(),
            sends,
        });
    }
    out
}

/// How long a closed-loop window slot of a refused send stays empty (the server's rate limit
/// counts in one-second windows; a tenth of one keeps the retries few).
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// How long a user whose move to another address failed (or whose login or `history` was
/// answered `unavailable`) waits before trying the next one, so that a cluster with a node down
/// is not hammered by every user of that node at once.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);

/// User `i`'s connection failed, with several addresses: its node is gone (or closed it), so
/// the next address takes the user, which catches up there and sends again what was unsure.
fn move_on(user: &mut User, i: usize, moves: &mut VecDeque<(Instant, usize)>, counts: &mut Counts) {
    let now = Instant::now();
    // Sends in flight on the failed connection went unanswered.
    for f in &user.in_flight {
        counts
            .outages
            .failed(user.conversation, f.sent_at.unwrap_or(now), now);
    }
    let unsure: Vec<InFlight> = user.in_flight.drain(..).collect();
    user.unsure.extend(unsure);
    if user.catching_up.is_none() {
        user.catching_up = Some(now);
        counts.reconnects += 1;
    }
    if !user.reconnect_due {
        schedule_move(user, i, Instant::now(), moves);
        // Until it has caught up, the next failure waits before moving on.
        user.failed_moves += 1;
    }
}

/// Schedules user `i`'s move to the next address: at once after a connection that worked,
/// after [`RECONNECT_AFTER`] after one that did not.
fn schedule_move(user: &mut User, i: usize, now: Instant, moves: &mut VecDeque<(Instant, usize)>) {
    let delay = if user.failed_moves == 0 {
        Duration::ZERO
    } else {
        RECONNECT_AFTER
    };
    user.reconnect_due = true;
    moves.push_back((now + delay, i));
}

/// Reqs of abandoned sends remembered per user, at most (a late reply to an older one would
/// count as a violation).
const ABANDONED_MAX: usize = 1024;

/// How long a user still missing seqs after sending stopped waits for their pushes before it
/// asks `history` for them.
const REPAIR_AFTER: Duration = Duration::from_millis(500);

/// A full `history` page when no storm says otherwise.
const HISTORY_PAGE_FULL: u16 = chinwag_protocol::message::HISTORY_LIMIT_MAX;

/// The most members a conversation may have (the store's limit).
const MEMBERS_MAX: usize = 1000;

/// The users of the conversation user `i` is in, with `k` members per conversation.
fn group(i: usize, k: usize) -> std::ops::Range<usize> {
    let first = i - i % k;
    first..first + k
}

/// Whether the run has drained: no user has a message in flight or is catching up, and every
/// user has seen its conversation up to the last seq any `send_ok` named. A lost user (or
/// another member of its conversation) cannot drain; the drain then waits out `--drain-s`.
fn drained(users: &[User], k: usize, last_seq: &HashMap<ConvId, u64>) -> bool {
    users.iter().enumerate().all(|(i, user)| {
        let Some(conv) = group(i, k).find_map(|j| users[j].conv) else {
            return !user.lost && user.in_flight.is_empty();
        };
        let last = last_seq.get(&conv).copied().unwrap_or(0);
        let next = user.track.as_ref().map_or(1, SeqTrack::next);
        !group(i, k).any(|j| users[j].lost)
            && user.in_flight.is_empty()
            && user.resends_due == 0
            && user.catching_up.is_none()
            && next > last
    })
}

/// Asks for the page of `conv` after `after`.
fn ask_history(
    user: &mut User,
    writer: &mut Writer,
    conv: ConvId,
    after: u64,
    storm: Option<&StormArgs>,
) {
    let req = user.next_req;
    user.next_req += 1;
    writer.send(&Frame::with_req(
        req,
        Message::History(History {
            conv,
            range: HistoryRange::After(Seq(after)),
            limit: storm.map_or(HISTORY_PAGE_FULL, |s| s.history_limit),
        }),
    ));
}

/// A reconnected user has caught up: record how long it took, send again what was unsure, and
/// (`refill`: while the load lasts) fill its window again.
#[allow(clippy::too_many_arguments)]
fn caught_up(
    user: &mut User,
    i: usize,
    writer: &mut Writer,
    now_ns: u64,
    catch_up: &mut hdrhistogram::Histogram<u64>,
    body: &mut String,
    args: &ChatArgs,
    counts: &mut Counts,
    refill: bool,
) {
    let Some(dropped_at) = user.catching_up.take() else {
        return;
    };
    // The connection worked: a later failure moves on at once again.
    user.failed_moves = 0;
    report::record(catch_up, dropped_at.elapsed());
    for unsure in std::mem::take(&mut user.unsure) {
        counts.resent += 1;
        send_numbered(
            user,
            i,
            writer,
            unsure.intended_ns,
            unsure.n,
            true,
            body,
            args,
        );
    }
    if refill && args.rate_per_user_per_s <= 0.0 {
        while user.in_flight.len() < args.window {
            send(user, i, writer, now_ns, body, args, counts);
        }
    }
}

/// Queues one `send` from user `i`, stamped with its intended send time.
fn send(
    user: &mut User,
    i: usize,
    writer: &mut Writer,
    intended_ns: u64,
    body: &mut String,
    args: &ChatArgs,
    counts: &mut Counts,
) {
    stamp::write(body, intended_ns, args.message_bytes);
    let n = user.sent;
    user.sent += 1;
    counts.sent += 1;
    if args.verify_log {
        counts.ledger.record(&mut user.log, n, body.as_bytes());
    }
    send_numbered(user, i, writer, intended_ns, n, false, body, args);
}

/// Queues the `send` of user `i`'s message number `n` (its cmid), the body already stamped.
#[allow(clippy::too_many_arguments)]
fn send_numbered(
    user: &mut User,
    i: usize,
    writer: &mut Writer,
    intended_ns: u64,
    n: u64,
    resent: bool,
    body: &mut String,
    args: &ChatArgs,
) {
    if resent {
        stamp::write(body, intended_ns, args.message_bytes);
    }
    let mut cmid = String::with_capacity(24);
    let _ = write!(cmid, "{i}-{n}");
    let req = user.next_req;
    user.next_req += 1;
    user.in_flight.push_back(InFlight {
        req,
        intended_ns,
        n,
        resent,
        sent_at: Some(Instant::now()),
    });
    let target = match user.conv {
        Some(conv) => Target::Conv(conv),
        None => Target::User(user.peer),
    };
    writer.send(&Frame::with_req(
        req,
        Message::Send(Send {
            target,
            cmid: cmid.as_str().into(),
            kind: "text".into(),
            body: body.as_str().into(),
        }),
    ));
}

/// Writes what user `i` queued on its connection. A failure marks the user lost, or moves it
/// on with several addresses (`moves` is given).
fn flush(
    fleet: &mut crate::proto::Fleet,
    i: usize,
    report: &mut Report,
    user: &mut User,
    moves: Option<&mut VecDeque<(Instant, usize)>>,
    counts: &mut Counts,
) {
    if let Err(failure) = fleet.flush(user.conn) {
        report.fail(failure.cause());
        match moves {
            Some(moves) => move_on(user, i, moves, counts),
            None => user.lost = true,
        }
    }
}
