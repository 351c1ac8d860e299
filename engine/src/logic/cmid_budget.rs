//! One idempotency budget for all the partitions of a shard.
//!
//! Each partition's log keeps its own cmid window (store/state.rs): the cmids it must remember
//! live in its own log, and a follower rebuilds them from the records it copies. What the node's
//! `cmid_window_entries_max` bounds is memory, and memory is the shard's: so the shard's share
//! of it is one budget for all its partitions, and when it is spent the oldest cmid of the
//! whole shard is forgotten first, whichever partition holds it. A busy partition then
//! remembers what the quiet ones do not use, instead of a fixed 1/P of the node's budget.
//!
//! The budget keeps the partition of every cmid the shard remembers, in the order they were
//! stored (2 bytes each): its front names the partition holding the oldest. A window also
//! forgets cmids by itself (past `cmid_window_age_ms`, or past its own limit, which is the
//! shard's whole budget): those are its oldest, so the budget skips as many of that
//! partition's entries when they reach the front. Anything that changes a window wholesale (a
//! log opened or truncated by replication, a partition dropped) makes the budget rebuild its
//! order from the windows' times at the next commit.

use std::collections::VecDeque;

use super::Partition;
use crate::bus::PartitionId;

pub(super) struct CmidBudget {
    /// Cmids the shard's partitions may remember together.
    max: usize,
    /// The partition of each cmid remembered (and of each a window already forgot), oldest
    /// first.
    order: VecDeque<PartitionId>,
    /// Per partition: entries of `order` whose cmid the window already forgot by itself.
    forgotten: Vec<u32>,
    forgotten_total: usize,
    /// `order` no longer matches the windows: rebuild it before using it.
    stale: bool,
}

impl CmidBudget {
    pub fn new(max: usize, partitions: usize) -> CmidBudget {
        CmidBudget {
            max: max.max(1),
            order: VecDeque::new(),
            forgotten: vec![0; partitions],
            forgotten_total: 0,
            stale: true,
        }
    }

    /// A window changed wholesale: the order is rebuilt at the next [`CmidBudget::trim`].
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Partition `p`'s window added `added` cmids and forgot `forgot` by itself.
    pub fn note(&mut self, p: PartitionId, added: u64, forgot: u64) {
        if self.stale {
            return;
        }
        self.order.extend(std::iter::repeat(p).take(added as usize));
        if let Some(count) = self.forgotten.get_mut(usize::from(p)) {
            *count += forgot as u32;
            self.forgotten_total += forgot as usize;
        }
    }

    /// Cmids the shard's partitions remember.
    pub fn held(&self) -> usize {
        self.order.len() - self.forgotten_total
    }

    /// Forgets the shard's oldest cmids until it is within budget.
    pub fn trim(&mut self, partitions: &mut [Option<Partition>]) {
        if self.stale {
            self.rebuild(partitions);
        }
        while self.held() > self.max {
            let Some(p) = self.order.pop_front() else {
                return;
            };
            let forgotten = &mut self.forgotten[usize::from(p)];
            if *forgotten > 0 {
                *forgotten -= 1;
                self.forgotten_total -= 1;
                continue;
            }
            let evicted = partitions
                .get_mut(usize::from(p))
                .and_then(Option::as_mut)
                .is_some_and(|partition| partition.store.evict_oldest_cmid());
            if !evicted {
                // The order was wrong about this partition: start over from the windows.
                self.rebuild(partitions);
            }
        }
    }

    /// Makes the order again from every window's cmid times (oldest first across them).
    fn rebuild(&mut self, partitions: &mut [Option<Partition>]) {
        let mut all: Vec<(u64, PartitionId)> = Vec::new();
        for (p, partition) in partitions.iter_mut().enumerate() {
            if let Some(partition) = partition {
                partition.store.take_cmid_churn();
                let p = p as PartitionId;
                all.extend(partition.store.cmid_times().map(|ts| (ts, p)));
            }
        }
        // Stable: a window's own order is kept for equal times.
        all.sort_by_key(|&(ts, _)| ts);
        self.order = all.into_iter().map(|(_, p)| p).collect();
        self.forgotten.iter_mut().for_each(|f| *f = 0);
        self.forgotten_total = 0;
        self.stale = false;
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::Target;

    use super::super::testing::*;
    use crate::bus::{user_pair, Origin};

    /// A busy partition remembers what the shard's quiet partitions leave of the budget, and
    /// the shard's oldest cmids go first, whichever partition holds them.
    #[test]
    fn the_shards_oldest_cmids_are_forgotten_first_whichever_partition_holds_them() {
        let mut h = Harness::with_cmid_budget(10);
        let (a, b) = (h.login(buyer(1)), h.login(buyer(2)));
        let map = test_map();
        let quiet = map.partition_of(&user_pair(a.uid, b.uid));
        let other = (3..)
            .step_by(2)
            .find(|&id| map.partition_of(&user_pair(buyer(id), buyer(id + 1))) != quiet)
            .unwrap();
        let (c, d) = (h.login(buyer(other)), h.login(buyer(other + 1)));
        let send_as = |h: &mut Harness, who: &Origin, to: &Origin, cmid: &str| {
            let out = h.turn(send(who, Target::User(to.uid), cmid, "x"));
            send_ok(&replies(&out, who.session))
        };
        for i in 0..3 {
            send_as(&mut h, &a, &b, &format!("q{i}"));
        }
        let busy: Vec<_> = (0..20)
            .map(|i| send_as(&mut h, &c, &d, &format!("b{i}")))
            .collect();
        assert_eq!(h.owner.cmids.held(), 10);
        // The busy partition has the whole budget: its last ten cmids are remembered (a
        // fixed share per partition would have kept 10 / 8 of them).
        for (i, first) in busy.iter().enumerate().skip(10) {
            assert_eq!(send_as(&mut h, &c, &d, &format!("b{i}")), *first, "b{i}");
        }
        assert_eq!(
            send_as(&mut h, &c, &d, "b9").1,
            21,
            "b9 was forgotten: stored again"
        );
        // The quiet partition's cmids were the shard's oldest: forgotten.
        assert_eq!(send_as(&mut h, &a, &b, "q0").1, 4);
        assert_eq!(h.owner.cmids.held(), 10);
        // A restart replays each window whole; the first commit brings the shard back within
        // its budget, newest kept.
        h.restart();
        h.commit();
        assert_eq!(h.owner.cmids.held(), 10);
        assert_eq!(
            send_as(&mut h, &a, &b, "q0").1,
            4,
            "the newest is remembered"
        );
    }
}
