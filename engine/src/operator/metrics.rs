//! Counters and gauges for `/metrics`, in the Prometheus text format.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer, so a counter is bumped with a
//! plain load and store (no locked instruction, no contention); a scrape, on whichever shard
//! serves it, reads every shard's values with relaxed loads. A scrape may see one shard a few
//! events ahead of another, which is fine for monitoring.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use chinwag_protocol::{ErrorCode, Op};

use crate::net::ws::connection::CloseReason;

/// The ops a client sends, in the order of [`ShardMetrics::requests`].
pub const REQUEST_OPS: [Op; 7] = [
    Op::Login,
    Op::Send,
    Op::Read,
    Op::Resolve,
    Op::History,
    Op::Convs,
    Op::Ping,
];

/// `error` replies made, by code (index: the code's binary value − 1). Process-wide rather than
/// per shard: errors are rare, and they are made in several places (the session's app layer,
/// the conversation owners, the post office), all through [`crate::bus::error`].
pub static ERRORS_BY_CODE: [AtomicU64; ErrorCode::ALL.len()] =
    [const { AtomicU64::new(0) }; ErrorCode::ALL.len()];

/// Counts one `error` reply with `code`.
pub fn error_made(code: ErrorCode) {
    ERRORS_BY_CODE[code as usize - 1].fetch_add(1, Relaxed);
}

impl ShardMetrics {
    /// Counts one request decoded on `/ws`.
    pub fn request(&self, op: Op) {
        if let Some(i) = REQUEST_OPS.iter().position(|o| *o == op) {
            add(&self.requests[i], 1);
        }
    }
}

/// Upper bounds of the send → `send_ok` histogram buckets, in microseconds.
pub const SEND_OK_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// Upper bounds of the loop-turn histogram buckets, in microseconds.
pub const TURN_BUCKETS_US: [u64; 10] =
    [10, 50, 100, 250, 500, 1_000, 5_000, 10_000, 50_000, 100_000];

/// One shard's counters. Aligned to its own cache lines so that shards bumping their counters
/// never share a line.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardMetrics {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_closed: [AtomicU64; CloseReason::ALL.len()],
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub send_queue_bytes: AtomicU64,
    pub messages_rate_limited: AtomicU64,
    pub app_messages: AtomicU64,
    /// Requests decoded on `/ws`, by op ([`REQUEST_OPS`] order).
    pub requests: [AtomicU64; REQUEST_OPS.len()],
    pub mailbox_messages: AtomicU64,
    /// Messages for another shard dropped because its mailbox was full.
    pub mailbox_full_drops: AtomicU64,
    /// Sessions of this shard that completed `login`.
    pub sessions_logged_in: AtomicU64,
    /// This shard's sessions announced to the owner of their user's devices, when it asked
    /// (its start, a takeover).
    pub sessions_announced: AtomicU64,
    /// Sessions not announced because their owner's node was down or unknown.
    pub session_announcements_dropped: AtomicU64,
    /// Pushes (`msg`, `receipt`, `members`) queued to this shard's sessions.
    pub pushes_delivered: AtomicU64,
    /// Messages this shard stored in its partitions' logs (owner side).
    pub messages_stored: AtomicU64,
    /// Log commits that failed (their acknowledgements became `unavailable`).
    pub log_commit_failures: AtomicU64,
    /// Conversations, registered devices and segment bytes of the logs of this shard's
    /// partitions, and how many of those have a log open.
    pub log_conversations: AtomicU64,
    pub log_devices: AtomicU64,
    pub log_segment_bytes: AtomicU64,
    pub log_partitions_open: AtomicU64,
    /// Turns whose outputs wait for the in-sync replicas, and their bytes (replicated
    /// clusters with `ack = replicated`).
    pub replication_held_turns: AtomicU64,
    pub replication_held_bytes: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Cumulative counts per bucket of `TURN_BUCKETS_US`, plus one for +Inf.
    pub turn_buckets: [AtomicU64; TURN_BUCKETS_US.len() + 1],
    pub turn_us_sum: AtomicU64,
    /// send → `send_ok` latency, copied from the shard's owner: per [`SEND_OK_BUCKETS_US`]
    /// bucket (not cumulative; the last for larger), and the sum in µs.
    pub send_ok_buckets: [AtomicU64; SEND_OK_BUCKETS_US.len() + 1],
    pub send_ok_us_sum: AtomicU64,
}

/// Adds `n` to a counter that only the calling shard writes.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Subtracts `n` from a gauge that only the calling shard writes.
#[inline]
pub fn sub(gauge: &AtomicU64, n: u64) {
    gauge.store(gauge.load(Relaxed).wrapping_sub(n), Relaxed);
}

impl ShardMetrics {
    pub fn closed(&self, reason: CloseReason) {
        add(&self.connections_closed[reason as usize], 1);
    }

    pub fn record_turn(&self, turn_us: u64) {
        let bucket = TURN_BUCKETS_US
            .iter()
            .position(|&le| turn_us <= le)
            .unwrap_or(TURN_BUCKETS_US.len());
        add(&self.turn_buckets[bucket], 1);
        add(&self.turn_us_sum, turn_us);
    }
}

/// What a scrape needs besides the counters: each shard's mailbox depth.
pub struct Scrape<'a> {
    pub shards: &'a [&'a ShardMetrics],
    pub mailbox_depths: &'a [usize],
    pub draining: bool,
}

/// Writes one histogram per shard: cumulative buckets with upper bounds `bounds_us` (the last
/// bucket, beyond them, is `+Inf`), the sum and the count, in seconds.
fn histogram(
    out: &mut String,
    shards: &[&ShardMetrics],
    name: &str,
    help: &str,
    bounds_us: &[u64],
    counters: impl Fn(&ShardMetrics) -> (&[AtomicU64], &AtomicU64),
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, m) in shards.iter().enumerate() {
        let (buckets, sum_us) = counters(m);
        let mut cumulative = 0;
        for (b, bucket) in buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = bounds_us
                .get(b)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum_s = sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{i}\"}} {sum_s}");
        let _ = writeln!(out, "{name}_count{{shard=\"{i}\"}} {cumulative}");
    }
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(scrape: &Scrape) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let shards = scrape.shards;
    let per_shard = |out: &mut String,
                     name: &str,
                     kind: &str,
                     help: &str,
                     value: &dyn Fn(&ShardMetrics) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", value(m));
        }
    };
    let load = |a: &AtomicU64| a.load(Relaxed);
    per_shard(
        &mut out,
        "chinwag_connections_open",
        "gauge",
        "Connections open now.",
        &|m| load(&m.connections_open),
    );
    per_shard(
        &mut out,
        "chinwag_connections_accepted_total",
        "counter",
        "Connections accepted.",
        &|m| load(&m.connections_accepted),
    );
    per_shard(
        &mut out,
        "chinwag_connections_refused_total",
        "counter",
        "Connections refused at accept because the shard was at connections_per_shard_max.",
        &|m| load(&m.connections_refused),
    );
    let name = "chinwag_connections_closed_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections closed, by reason.\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for reason in CloseReason::ALL {
            let value = load(&m.connections_closed[reason as usize]);
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",reason=\"{}\"}} {value}",
                reason.label()
            );
        }
    }
    per_shard(
        &mut out,
        "chinwag_frames_in_total",
        "counter",
        "WebSocket frames received.",
        &|m| load(&m.frames_in),
    );
    per_shard(
        &mut out,
        "chinwag_frames_out_total",
        "counter",
        "WebSocket frames queued for sending.",
        &|m| load(&m.frames_out),
    );
    per_shard(
        &mut out,
        "chinwag_bytes_in_total",
        "counter",
        "Bytes read from client sockets.",
        &|m| load(&m.bytes_in),
    );
    per_shard(
        &mut out,
        "chinwag_bytes_out_total",
        "counter",
        "Bytes written to client sockets.",
        &|m| load(&m.bytes_out),
    );
    per_shard(
        &mut out,
        "chinwag_send_queue_bytes",
        "gauge",
        "Bytes queued for sending, over all connections.",
        &|m| load(&m.send_queue_bytes),
    );
    per_shard(
        &mut out,
        "chinwag_messages_rate_limited_total",
        "counter",
        "Messages refused for going over messages_per_s_max.",
        &|m| load(&m.messages_rate_limited),
    );
    let name = "chinwag_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests decoded on /ws, by op.\n# TYPE {name} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for (k, op) in REQUEST_OPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{i}\",op=\"{}\"}} {}",
                op.name(),
                load(&m.requests[k])
            );
        }
    }
    let name = "chinwag_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Error replies made, by code.\n# TYPE {name} counter"
    );
    for code in ErrorCode::ALL {
        let _ = writeln!(
            out,
            "{name}{{code=\"{}\"}} {}",
            code.as_str(),
            ERRORS_BY_CODE[code as usize - 1].load(Relaxed)
        );
    }
    per_shard(
        &mut out,
        "chinwag_app_messages_total",
        "counter",
        "Application messages received on /ws.",
        &|m| load(&m.app_messages),
    );
    per_shard(
        &mut out,
        "chinwag_mailbox_messages_total",
        "counter",
        "Messages from other shards handled.",
        &|m| load(&m.mailbox_messages),
    );
    per_shard(
        &mut out,
        "chinwag_sessions_logged_in",
        "gauge",
        "Sessions that completed login, on this shard.",
        &|m| load(&m.sessions_logged_in),
    );
    per_shard(
        &mut out,
        "chinwag_pushes_delivered_total",
        "counter",
        "Pushes (msg, receipt, members) queued to this shard's sessions.",
        &|m| load(&m.pushes_delivered),
    );
    per_shard(
        &mut out,
        "chinwag_messages_stored_total",
        "counter",
        "Messages stored in the logs of the partitions this shard serves.",
        &|m| load(&m.messages_stored),
    );
    per_shard(
        &mut out,
        "chinwag_log_commit_failures_total",
        "counter",
        "Log commits that failed; their acknowledgements were answered unavailable.",
        &|m| load(&m.log_commit_failures),
    );
    per_shard(
        &mut out,
        "chinwag_log_conversations",
        "gauge",
        "Conversations in the partitions this shard serves.",
        &|m| load(&m.log_conversations),
    );
    per_shard(
        &mut out,
        "chinwag_log_devices",
        "gauge",
        "Devices registered in the partitions this shard serves.",
        &|m| load(&m.log_devices),
    );
    per_shard(
        &mut out,
        "chinwag_log_segment_bytes",
        "gauge",
        "Bytes of the log segment files of the partitions this shard serves (preallocated).",
        &|m| load(&m.log_segment_bytes),
    );
    per_shard(
        &mut out,
        "chinwag_log_partitions_open",
        "gauge",
        "Partitions this shard serves that have a log (one is created on a partition's first write).",
        &|m| load(&m.log_partitions_open),
    );
    per_shard(
        &mut out,
        "chinwag_replication_held_turns",
        "gauge",
        "Loop turns whose acknowledgements and pushes wait for the partitions' in-sync replicas (ack = replicated).",
        &|m| load(&m.replication_held_turns),
    );
    per_shard(
        &mut out,
        "chinwag_replication_held_bytes",
        "gauge",
        "Bytes of the outputs those turns hold (at most 64 MiB per shard; past it, writes are answered unavailable).",
        &|m| load(&m.replication_held_bytes),
    );
    per_shard(
        &mut out,
        "chinwag_mailbox_full_drops_total",
        "counter",
        "Messages for another shard dropped because its mailbox was full.",
        &|m| load(&m.mailbox_full_drops),
    );
    per_shard(
        &mut out,
        "chinwag_sessions_announced_total",
        "counter",
        "Sessions of this shard announced to the owner of their user's devices when it asked (after its start or a takeover).",
        &|m| load(&m.sessions_announced),
    );
    per_shard(
        &mut out,
        "chinwag_session_announcements_dropped_total",
        "counter",
        "Sessions of this shard not announced because the owner of their user's devices was down or unknown.",
        &|m| load(&m.session_announcements_dropped),
    );
    per_shard(
        &mut out,
        "chinwag_accept_errors_total",
        "counter",
        "accept() failures (e.g. out of file descriptors).",
        &|m| load(&m.accept_errors),
    );
    let name = "chinwag_mailbox_depth";
    let _ = writeln!(
        out,
        "# HELP {name} Messages waiting in a shard's inbound queue.\n# TYPE {name} gauge"
    );
    for (i, depth) in scrape.mailbox_depths.iter().enumerate() {
        let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {depth}");
    }
    histogram(
        &mut out,
        shards,
        "chinwag_loop_turn_seconds",
        "Time a shard spends on one loop turn, not counting the wait for events.",
        &TURN_BUCKETS_US,
        |m| (&m.turn_buckets[..], &m.turn_us_sum),
    );
    histogram(
        &mut out,
        shards,
        "chinwag_send_ok_seconds",
        "From a send's decoding to its send_ok's release after the log commit (as \
         conversation owner).",
        &SEND_OK_BUCKETS_US,
        |m| (&m.send_ok_buckets[..], &m.send_ok_us_sum),
    );
    let name = "chinwag_draining";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while the node drains after SIGTERM.\n# TYPE {name} gauge"
    );
    let _ = writeln!(out, "{name} {}", u8::from(scrape.draining));
    if let Some(process) = super::process::ProcessFigures::read() {
        process.render(&mut out);
    }
    super::process::render_build_info(&mut out);
    out
}

// Called by the node once cluster routing starts its links (issue 13, lead's integration).
#[allow(dead_code)]
/// Appends the node links' metrics, one sample per peer node (`peer="N"`), to a scrape: in a
/// cluster, whether this node reaches each peer and what flows between them.
pub(crate) fn render_links(out: &mut String, peers: &[crate::cluster::link::PeerStats]) {
    type Stat = crate::cluster::link::PeerStats;
    /// Name, type, help, and the value of one peer.
    type Metric = (&'static str, &'static str, &'static str, fn(&Stat) -> u64);
    let metrics: [Metric; 10] = [
        (
            "chinwag_link_connected",
            "gauge",
            "1 while the node link to the peer is up (handshake done).",
            |p| u64::from(p.connected),
        ),
        (
            "chinwag_link_queue_bytes",
            "gauge",
            "Encoded bytes queued for the peer, bounded by the link's queue_bytes_max.",
            |p| p.queue_bytes,
        ),
        (
            "chinwag_link_bytes_out_total",
            "counter",
            "Bus message bytes written to the peer.",
            |p| p.bytes_out,
        ),
        (
            "chinwag_link_bytes_in_total",
            "counter",
            "Bus message bytes read from the peer.",
            |p| p.bytes_in,
        ),
        (
            "chinwag_link_messages_out_total",
            "counter",
            "Bus messages written to the peer.",
            |p| p.messages_out,
        ),
        (
            "chinwag_link_messages_in_total",
            "counter",
            "Bus messages read from the peer.",
            |p| p.messages_in,
        ),
        (
            "chinwag_link_reconnects_total",
            "counter",
            "Times the link to the peer came up again after being down.",
            |p| p.reconnects,
        ),
        (
            "chinwag_link_unavailable_total",
            "counter",
            "Requests for the peer answered unavailable (queue full, timed out, link cut).",
            |p| p.unavailable,
        ),
        (
            "chinwag_link_dropped_total",
            "counter",
            "Pushes and replies for the peer dropped (queue full, timed out).",
            |p| p.dropped,
        ),
        (
            "chinwag_link_errors_total",
            "counter",
            "Link connections closed for a refused handshake, a malformed frame or silence.",
            |p| p.errors,
        ),
    ];
    for (name, kind, help, value) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for peer in peers {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", peer.node, value(peer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line that is not a comment is `name{labels} value`.
    fn assert_samples_are_name_and_value(text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "bad sample line {line:?}");
        }
    }

    #[test]
    fn renders_one_sample_per_peer_link() {
        let peers = [
            crate::cluster::link::PeerStats {
                node: 2,
                connected: true,
                bytes_out: 100,
                ..Default::default()
            },
            crate::cluster::link::PeerStats {
                node: 3,
                reconnects: 4,
                ..Default::default()
            },
        ];
        let mut text = String::new();
        render_links(&mut text, &peers);
        assert!(text.contains("# TYPE chinwag_link_connected gauge\n"));
        assert!(text.contains("chinwag_link_connected{peer=\"2\"} 1\n"));
        assert!(text.contains("chinwag_link_connected{peer=\"3\"} 0\n"));
        assert!(text.contains("chinwag_link_bytes_out_total{peer=\"2\"} 100\n"));
        assert!(text.contains("chinwag_link_reconnects_total{peer=\"3\"} 4\n"));
        assert_samples_are_name_and_value(&text);
    }

    #[test]
    fn renders_help_type_and_cumulative_buckets() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        add(&a.connections_accepted, 3);
        a.closed(CloseReason::IdleTimeout);
        a.record_turn(5);
        a.record_turn(70);
        a.record_turn(1_000_000);
        let text = render(&Scrape {
            shards: &[&a, &b],
            mailbox_depths: &[0, 2],
            draining: false,
        });
        assert!(text.contains("# TYPE chinwag_connections_accepted_total counter\n"));
        assert!(text.contains("chinwag_connections_accepted_total{shard=\"0\"} 3\n"));
        assert!(text
            .contains("chinwag_connections_closed_total{shard=\"0\",reason=\"idle_timeout\"} 1\n"));
        assert!(text.contains("chinwag_loop_turn_seconds_bucket{shard=\"0\",le=\"0.00001\"} 1\n"));
        assert!(text.contains("chinwag_loop_turn_seconds_bucket{shard=\"0\",le=\"0.0001\"} 2\n"));
        assert!(text.contains("chinwag_loop_turn_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("chinwag_mailbox_depth{shard=\"1\"} 2\n"));
        assert_samples_are_name_and_value(&text);
    }
}
