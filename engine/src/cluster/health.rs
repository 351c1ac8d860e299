//! Whether the node's view of the cluster can be trusted, for `/healthz` and `/metrics`.
//!
//! Two threads write it (the registry's and the subscriber's, see [`super`]), any shard reads
//! it. "Up" is never assumed: the Redis connection counts as up only after a call succeeded,
//! and the subscription only after it delivered the node's own probe. A subscription that looks
//! open but delivers nothing (a failover, a proxy that lost it, `CLIENT KILL TYPE pubsub`) is
//! found by the probe, marked down, reconnected and followed by a full reload of the routes.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// The counters and flags of the cluster's connections.
#[derive(Default)]
pub struct ClusterHealth {
    /// The registry thread's connection answered its last call.
    pub redis_up: AtomicBool,
    /// Unix ms of the last successful Redis call (any thread).
    pub redis_last_ok_unix_ms: AtomicU64,
    /// Redis calls that failed (connect, timeout, error reply).
    pub redis_errors: AtomicU64,
    /// The subscription delivered the last probe in time.
    pub subscription_up: AtomicBool,
    pub probes_sent: AtomicU64,
    /// Probes that did not come back before the next was due: each one made the node
    /// reconnect its subscription and reload the routes.
    pub probes_missed: AtomicU64,
    /// Full reloads of the route cache (at start, after every resubscription).
    pub route_reloads: AtomicU64,
    /// Route changes applied from the channel.
    pub route_changes: AtomicU64,
    /// Messages on the route channel that did not parse.
    pub route_changes_malformed: AtomicU64,
    /// Route records (logins and logouts) written to Redis.
    pub route_writes: AtomicU64,
    /// Route records the shards could not queue (the registry thread's queue was full): the
    /// next full rewrite (after a reconnect) repairs them.
    pub route_ops_dropped: AtomicU64,
    /// Another instance holds this node's number: this node no longer counts as registered.
    pub claim_lost: AtomicBool,
    /// The last Redis error, for `/healthz` (written on errors only).
    last_error: Mutex<String>,
}

impl ClusterHealth {
    /// Records a successful call at `unix_ms`.
    pub fn ok(&self, unix_ms: u64) {
        self.redis_last_ok_unix_ms.fetch_max(unix_ms, Relaxed);
    }

    /// Records a failed call.
    pub fn error(&self, what: &str, error: &dyn std::fmt::Display) {
        self.redis_errors.fetch_add(1, Relaxed);
        let text = format!("{what}: {error}");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    /// Whether the node may call itself healthy: Redis reachable, the subscription delivering,
    /// the node number its own.
    pub fn is_healthy(&self) -> bool {
        self.redis_up.load(Relaxed)
            && self.subscription_up.load(Relaxed)
            && !self.claim_lost.load(Relaxed)
    }

    /// The lines `/healthz` adds in a cluster, e.g. `redis: up, last ok 120 ms ago`.
    pub fn describe(&self, now_unix_ms: u64, out: &mut String) {
        let last_ok = self.redis_last_ok_unix_ms.load(Relaxed);
        let ago = if last_ok == 0 {
            "never".to_string()
        } else {
            format!("{} ms ago", now_unix_ms.saturating_sub(last_ok))
        };
        let up = |b: &AtomicBool| if b.load(Relaxed) { "up" } else { "down" };
        let _ = writeln!(out, "redis: {}, last ok {ago}", up(&self.redis_up));
        if !self.redis_up.load(Relaxed) {
            let error = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(out, "redis error: {error}");
        }
        let _ = writeln!(
            out,
            "subscription: {}, probes missed {}",
            up(&self.subscription_up),
            self.probes_missed.load(Relaxed)
        );
        if self.claim_lost.load(Relaxed) {
            let _ = writeln!(out, "node number: held by another instance");
        }
    }

    /// Appends this node's cluster metrics (Prometheus text).
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Relaxed);
        let flag = |b: &AtomicBool| u8::from(b.load(Relaxed)) as u64;
        let metrics: [(&str, &str, &str, u64); 12] = [
            (
                "chinwag_cluster_redis_up",
                "gauge",
                "1 while the registry thread's Redis connection answers.",
                flag(&self.redis_up),
            ),
            (
                "chinwag_cluster_redis_last_ok_timestamp_seconds",
                "gauge",
                "Unix time of the last successful Redis call.",
                load(&self.redis_last_ok_unix_ms) / 1000,
            ),
            (
                "chinwag_cluster_redis_errors_total",
                "counter",
                "Redis calls that failed (connect, timeout, error reply).",
                load(&self.redis_errors),
            ),
            (
                "chinwag_cluster_subscription_up",
                "gauge",
                "1 while the route subscription delivers this node's probes.",
                flag(&self.subscription_up),
            ),
            (
                "chinwag_cluster_probes_sent_total",
                "counter",
                "Probes published on this node's probe channel.",
                load(&self.probes_sent),
            ),
            (
                "chinwag_cluster_probes_missed_total",
                "counter",
                "Probes not received in time; each one reconnected the subscription.",
                load(&self.probes_missed),
            ),
            (
                "chinwag_cluster_route_reloads_total",
                "counter",
                "Full reloads of the route cache from Redis.",
                load(&self.route_reloads),
            ),
            (
                "chinwag_cluster_route_changes_total",
                "counter",
                "Route changes applied from the route channel.",
                load(&self.route_changes),
            ),
            (
                "chinwag_cluster_route_changes_malformed_total",
                "counter",
                "Messages on the route channel that did not parse (skipped).",
                load(&self.route_changes_malformed),
            ),
            (
                "chinwag_cluster_route_writes_total",
                "counter",
                "Route records (logins, logouts) written to Redis.",
                load(&self.route_writes),
            ),
            (
                "chinwag_cluster_route_ops_dropped_total",
                "counter",
                "Route records the shards could not queue for Redis (queue full).",
                load(&self.route_ops_dropped),
            ),
            (
                "chinwag_cluster_node_number_lost",
                "gauge",
                "1 when another instance holds this node's number.",
                flag(&self.claim_lost),
            ),
        ];
        for (name, kind, help, value) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_when_redis_and_the_subscription_are_up() {
        let health = ClusterHealth::default();
        assert!(!health.is_healthy(), "nothing is assumed up");
        health.redis_up.store(true, Relaxed);
        assert!(!health.is_healthy());
        health.subscription_up.store(true, Relaxed);
        assert!(health.is_healthy());
        health.claim_lost.store(true, Relaxed);
        assert!(!health.is_healthy());

        let health = ClusterHealth::default();
        health.error("connect", &"Connection refused");
        let mut text = String::new();
        health.describe(1_000, &mut text);
        assert!(text.contains("redis: down, last ok never"), "{text}");
        assert!(
            text.contains("redis error: connect: Connection refused"),
            "{text}"
        );
        health.ok(900);
        health.redis_up.store(true, Relaxed);
        let mut text = String::new();
        health.describe(1_000, &mut text);
        assert!(text.contains("redis: up, last ok 100 ms ago"), "{text}");
        let mut metrics = String::new();
        health.render(&mut metrics);
        assert!(metrics.contains("chinwag_cluster_redis_errors_total 1\n"));
        assert!(metrics.contains("chinwag_cluster_redis_up 1\n"));
    }
}
