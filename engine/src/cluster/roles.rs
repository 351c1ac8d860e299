//! What this node is for each partition of a replicated cluster (issue 14), and how the
//! leadership thread tells the shards: the contract between the control plane (leases,
//! epochs and in-sync sets in Redis, `cluster::lease`) and the data path (log shipping and
//! held acknowledgements in the shards, `cluster::replica`).
//!
//! The leadership thread decides; the shards act. It never waits for a shard and a shard never
//! waits for it: role changes go to the shards as [`RoleChange`]s through a [`RoleSink`] (the
//! node posts each to the partition's shard), and the one thing a shard must check on every
//! acknowledgement, whether this node's lease on a partition still runs, is an atomic read of
//! [`Leases`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam::queue::ArrayQueue;
use smallvec::SmallVec;

use crate::bus::PartitionId;

/// Node numbers of a partition's replicas (R is small: 1 to 3 in practice).
pub type Replicas = SmallVec<[u16; 4]>;

/// A change of this node's role for one partition, in the order the leadership thread made
/// them (per partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleChange {
    /// This node leads `partition` from now on at `epoch`: it appends, ships its log to the
    /// other `replicas` and acknowledges once every node of `isr` (this one included) has a
    /// record. `replicas` lists every replica, leader first.
    Lead {
        partition: PartitionId,
        epoch: u64,
        replicas: Replicas,
        isr: Replicas,
    },
    /// This node copies `partition` from `leader`, whose epoch is `epoch`: it refuses
    /// anything from an older epoch and truncates what an older epoch wrote past what the
    /// new leader has.
    Follow {
        partition: PartitionId,
        leader: u16,
        epoch: u64,
    },
    /// The in-sync set of `partition`, which this node leads at `epoch`, is `isr` in Redis
    /// now (the answer to [`Leases::request_isr`], or a change made by an operator).
    Isr {
        partition: PartitionId,
        epoch: u64,
        isr: Replicas,
    },
    /// This node holds no replica of `partition` any more (it was moved away): close its log.
    Drop { partition: PartitionId },
}

impl RoleChange {
    /// The partition the change is about.
    pub fn partition(&self) -> PartitionId {
        match self {
            RoleChange::Lead { partition, .. }
            | RoleChange::Follow { partition, .. }
            | RoleChange::Isr { partition, .. }
            | RoleChange::Drop { partition } => *partition,
        }
    }
}

/// Where the leadership thread sends role changes (the node posts each to the shard that
/// serves the partition). Must not block. Every change must arrive, in order: the thread
/// tells each change once.
pub trait RoleSink: Send + Sync + 'static {
    fn changed(&self, change: RoleChange);

    /// Called every round of the leadership thread: a sink that could not deliver a change
    /// at once tries again here.
    fn tick(&self) {}
}

/// An epoch and lease deadline per partition, written by the leadership thread, read by the
/// shards before every acknowledgement. Lock-free: one atomic pair per partition.
pub struct Leases {
    /// The instant the deadlines count from (deadlines are milliseconds after it).
    start: Instant,
    /// Per partition: the epoch this node leads it at (0: not the leader).
    epoch: Vec<AtomicU64>,
    /// Per partition: until when (ms after `start`) this node may acknowledge as its leader.
    until_ms: Vec<AtomicU64>,
    /// In-sync set changes the leading shards asked for, for the leadership thread to write.
    isr_requests: ArrayQueue<IsrRequest>,
    /// Per partition: its leading shard's view of each follower (written by that shard,
    /// read by the leadership thread, which publishes it for `chinwag cluster show`).
    lag: Vec<[LagSlot; LAG_SLOTS]>,
}

/// Followers per partition whose lag is kept (R is at most `REPLICAS_MAX` = 8, a move adds
/// one: 8 covers every follower of every partition but the largest sets in a move).
pub const LAG_SLOTS: usize = 8;

/// One follower as its leader sees it: what [`Leases::lag`] gives (from what the leading
/// shard told [`Leases::report_lag`]) and `chinwag:node:N:lag` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLag {
    /// The follower's node.
    pub node: u16,
    /// How far it has the log (its last acknowledged position, in bytes).
    pub acked: u64,
    /// How far it is behind the leader's tail, in bytes.
    pub behind_bytes: u64,
    /// When it last had everything the leader had (Unix ms).
    pub caught_up_ms: u64,
}

/// One slot of the lag table: node 0 is an empty slot. Each field is its own atomic: a
/// reader may see one follower's fields from two reports (a diagnostic figure, never a
/// decision).
#[derive(Default)]
struct LagSlot {
    node: AtomicU64,
    acked: AtomicU64,
    behind_bytes: AtomicU64,
    caught_up_ms: AtomicU64,
}

/// A leader's request to record a new in-sync set for its partition (a follower fell behind
/// longer than the bound, or caught up again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrRequest {
    pub partition: PartitionId,
    /// The epoch the asking leader leads at: Redis refuses the change if it is not current.
    pub epoch: u64,
    pub isr: Replicas,
}

impl Leases {
    /// No lease on any of `partitions` partitions.
    pub fn new(partitions: usize) -> Leases {
        Leases {
            start: Instant::now(),
            epoch: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            until_ms: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            isr_requests: ArrayQueue::new(4 * partitions.max(1)),
            lag: (0..partitions).map(|_| Default::default()).collect(),
        }
    }

    /// Records that this node holds the lease on `p` at `epoch` until `until` (the instant
    /// before the renewal was asked plus the lease, minus a safety margin).
    pub fn hold(&self, p: PartitionId, epoch: u64, until: Instant) {
        let i = usize::from(p);
        let ms = until.saturating_duration_since(self.start).as_millis() as u64;
        // Epoch first: a reader that sees the new deadline also sees its epoch.
        self.epoch[i].store(epoch, Ordering::Release);
        self.until_ms[i].store(ms, Ordering::Release);
    }

    /// This node lost (or gave up) its lease on `p`.
    pub fn lose(&self, p: PartitionId) {
        let i = usize::from(p);
        self.until_ms[i].store(0, Ordering::Release);
        self.epoch[i].store(0, Ordering::Release);
    }

    /// Whether this node may acknowledge records of `p` written at `epoch` at `now`.
    pub fn valid(&self, p: PartitionId, epoch: u64, now: Instant) -> bool {
        let i = usize::from(p);
        let (Some(until), Some(held)) = (self.until_ms.get(i), self.epoch.get(i)) else {
            return false;
        };
        let until = until.load(Ordering::Acquire);
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        held.load(Ordering::Acquire) == epoch && now_ms < until
    }

    /// Asks the leadership thread to record `request` in Redis; its answer comes back as a
    /// [`RoleChange::Isr`]. Returns `false` when the queue is full (the shard asks again
    /// later). Until the answer, the leader keeps waiting for every node of the old set.
    pub fn request_isr(&self, request: IsrRequest) -> bool {
        self.isr_requests.push(request).is_ok()
    }

    /// The next in-sync set change asked for (the leadership thread's side).
    pub fn next_isr_request(&self) -> Option<IsrRequest> {
        self.isr_requests.pop()
    }

    /// The leading shard of `p` reports each follower as it sees it, every turn: its node,
    /// how far it acknowledged the log (`None`: not yet), and when it last had everything;
    /// `tail` is the leader's log end. The slots past them are emptied; more than
    /// [`LAG_SLOTS`] are not kept. Lock-free, a few relaxed stores, no clock read: the
    /// instants are kept relative to this table's start and turned into wall-clock time by
    /// [`Leases::lag`].
    pub fn report_lag(
        &self,
        p: PartitionId,
        tail: u64,
        followers: impl IntoIterator<Item = (u16, Option<u64>, Instant)>,
    ) {
        let Some(slots) = self.lag.get(usize::from(p)) else {
            return;
        };
        let mut followers = followers.into_iter();
        for slot in slots.iter() {
            match followers.next() {
                Some((node, acked, caught_up_at)) => {
                    let acked = acked.unwrap_or(0);
                    let caught_up = caught_up_at.saturating_duration_since(self.start);
                    slot.acked.store(acked, Ordering::Relaxed);
                    slot.behind_bytes
                        .store(tail.saturating_sub(acked), Ordering::Relaxed);
                    slot.caught_up_ms
                        .store(caught_up.as_millis() as u64, Ordering::Relaxed);
                    slot.node.store(u64::from(node), Ordering::Release);
                }
                None => slot.node.store(0, Ordering::Release),
            }
        }
    }

    /// Forgets `p`'s followers (this node no longer leads it).
    pub fn clear_lag(&self, p: PartitionId) {
        self.report_lag(p, 0, []);
    }

    /// The followers of `p` as its leading shard last reported them, `caught_up_ms` in Unix
    /// ms (the leadership thread's side: it reads the clock once per call).
    pub fn lag(&self, p: PartitionId) -> SmallVec<[ReplicaLag; 4]> {
        let Some(slots) = self.lag.get(usize::from(p)) else {
            return SmallVec::new();
        };
        let since_start = self.start.elapsed().as_millis() as u64;
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        slots
            .iter()
            .filter_map(|slot| {
                let node = slot.node.load(Ordering::Acquire) as u16;
                let caught_up = slot.caught_up_ms.load(Ordering::Relaxed);
                (node != 0).then(|| ReplicaLag {
                    node,
                    acked: slot.acked.load(Ordering::Relaxed),
                    behind_bytes: slot.behind_bytes.load(Ordering::Relaxed),
                    caught_up_ms: unix_now.saturating_sub(since_start.saturating_sub(caught_up)),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lease_is_valid_for_its_epoch_until_its_deadline_and_not_after_it_is_lost() {
        let leases = Leases::new(4);
        let now = Instant::now();
        assert!(!leases.valid(1, 1, now), "no lease yet");
        leases.hold(1, 3, now + Duration::from_secs(5));
        assert!(leases.valid(1, 3, now));
        assert!(!leases.valid(1, 2, now), "an older epoch's records");
        assert!(!leases.valid(2, 3, now), "another partition");
        assert!(
            !leases.valid(1, 3, now + Duration::from_secs(6)),
            "past the deadline"
        );
        leases.lose(1);
        assert!(!leases.valid(1, 3, now));
        assert!(!leases.valid(9, 3, now), "a partition past P");
    }

    #[test]
    fn the_lag_table_keeps_the_last_report_of_each_partition() {
        let leases = Leases::new(2);
        assert!(leases.lag(0).is_empty());
        let unix_ms = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = unix_ms();
        let now = Instant::now();
        let two = [
            (2, Some(100), now),
            (3, Some(40), now - Duration::from_secs(3)),
        ];
        leases.report_lag(1, 100, two);
        let lag = leases.lag(1);
        let after = unix_ms();
        assert_eq!(lag.len(), 2, "{lag:?}");
        assert_eq!(
            (lag[0].node, lag[0].acked, lag[0].behind_bytes),
            (2, 100, 0)
        );
        assert_eq!(
            (lag[1].node, lag[1].acked, lag[1].behind_bytes),
            (3, 40, 60)
        );
        // The instants reported, in wall-clock time (to the ms each side rounds to; the
        // table's start may be later than 3 s ago: then the oldest it tells is its start).
        assert!(
            (before - 2..=after + 2).contains(&lag[0].caught_up_ms),
            "{before}..{after}: {lag:?}"
        );
        assert!(lag[1].caught_up_ms <= lag[0].caught_up_ms, "{lag:?}");
        assert!(leases.lag(0).is_empty(), "another partition");
        leases.report_lag(1, 250, [(3, None, now)]);
        let lag = leases.lag(1);
        assert_eq!(lag.len(), 1, "a smaller report empties the rest: {lag:?}");
        assert_eq!(
            (lag[0].node, lag[0].acked, lag[0].behind_bytes),
            (3, 0, 250),
            "a follower not heard from is behind by the whole log"
        );
        leases.clear_lag(1);
        assert!(leases.lag(1).is_empty());
        leases.report_lag(9, 100, two);
        assert!(leases.lag(9).is_empty(), "a partition past P");
    }
}
