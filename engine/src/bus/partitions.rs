//! Partitions: the unit of ownership. Every key with an owner (a user's devices, a shop with
//! its conversations, a direct pair, a group) lives in one of P partitions, found by the
//! placement hash ([`placement::partition_of`]); every conversation lives in the partition of
//! its key, and its id carries that partition. A partition has one log (its own directory of
//! segments) and one owner at a time: on a single node, one of the node's shards.
//!
//! P is fixed when the data (later: the cluster) is created, because placement depends on it.
//! Which shard serves a partition is not: the [`PartitionMap`] is built at start (a single
//! node owns every partition and deals them to its shards round-robin), so the shard count
//! may change between runs. A cluster fills the same map from its partition table: the
//! partitions of other nodes are "not here" ([`PartitionMap::shard_of_partition`] is `None`).
//!
//! Conversation ids (docs/protocol.md, "Ids"): the low [`CONV_PARTITION_BITS`] bits are the
//! partition, the bits above a counter per partition starting at 1:
//!
//! ```text
//!  63                                16 15             0
//! | counter (48 bits, from 1)          | partition     |
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

use chinwag_protocol::ConvId;

use super::placement::{self, Placed};

/// The partition number (below the map's count).
pub type PartitionId = u16;

/// Conversation ids carry their partition in the low 16 bits.
pub const CONV_PARTITION_BITS: u32 = 16;
/// The default partition count of a new data directory.
pub const PARTITIONS_DEFAULT: usize = 256;
/// The most partitions a node's data may have: a message stream's resume position names a
/// log position per partition and must fit the codec's 16-bit string length (about 20 KiB of
/// hex at 1,024), and every owned partition may hold a log.
pub const PARTITIONS_MAX: usize = 1024;

const _: () = assert!(PARTITIONS_MAX <= 1 << CONV_PARTITION_BITS);

/// The partition a conversation id names (it may be past the partition count: a forged id).
pub fn partition_of_conv(conv: ConvId) -> u32 {
    (conv.0 & ((1 << CONV_PARTITION_BITS) - 1)) as u32
}

/// The id of the `counter`-th conversation of `partition`.
pub fn conv_id(counter: u64, partition: PartitionId) -> ConvId {
    ConvId(counter << CONV_PARTITION_BITS | u64::from(partition))
}

/// The counter part of a conversation id (to go on after the greatest one at a restart).
pub fn conv_counter(conv: ConvId) -> u64 {
    conv.0 >> CONV_PARTITION_BITS
}

/// Which partitions this node holds and which of its shards holds each; which of them it
/// leads (serves requests for).
///
/// Changeable at run time, without a lock on the message path: one atomic per partition,
/// written by the shard that holds the partition when its role changes (a takeover, a
/// demotion; `cluster::replica`), read by every router. A reader between two changes sees one
/// or the other; a request that reaches a shard that no longer leads the partition is
/// answered as if it were another node's.
pub struct PartitionMap {
    /// Per partition: 0 if no replica is here, else the shard holding it plus one, with
    /// [`LEADS`] set when this node leads it.
    slots: Vec<AtomicU32>,
    shards: usize,
}

/// The bit of a [`PartitionMap`] slot that says this node leads the partition.
const LEADS: u32 = 1 << 31;

fn slot(shard: Option<u16>, leads: bool) -> u32 {
    match shard {
        None => 0,
        Some(s) => (u32::from(s) + 1) | if leads { LEADS } else { 0 },
    }
}

impl Clone for PartitionMap {
    fn clone(&self) -> PartitionMap {
        PartitionMap {
            slots: self
                .slots
                .iter()
                .map(|s| AtomicU32::new(s.load(Ordering::Acquire)))
                .collect(),
            shards: self.shards,
        }
    }
}

impl PartialEq for PartitionMap {
    fn eq(&self, other: &PartitionMap) -> bool {
        self.shards == other.shards
            && self.slots.len() == other.slots.len()
            && self
                .slots
                .iter()
                .zip(&other.slots)
                .all(|(a, b)| a.load(Ordering::Acquire) == b.load(Ordering::Acquire))
    }
}

impl Eq for PartitionMap {}

impl std::fmt::Debug for PartitionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionMap")
            .field("partitions", &self.slots.len())
            .field("shards", &self.shards)
            .finish()
    }
}

impl PartitionMap {
    /// A single node: it owns all `partitions`, dealt to its `shards` round-robin
    /// (partition `p` on shard `p mod shards`).
    pub fn single_node(partitions: usize, shards: usize) -> PartitionMap {
        let shards = shards.max(1);
        let assignment = (0..partitions).map(|p| Some((p % shards) as u16)).collect();
        PartitionMap::from_assignment(assignment, shards)
    }

    /// A map from an explicit assignment: entry `p` is the shard serving (leading) partition
    /// `p` here, `None` for a partition of another node (what a cluster's partition table
    /// gives).
    pub fn from_assignment(assignment: Vec<Option<u16>>, shards: usize) -> PartitionMap {
        debug_assert!(assignment
            .iter()
            .flatten()
            .all(|&s| usize::from(s) < shards));
        PartitionMap {
            slots: assignment
                .into_iter()
                .map(|s| AtomicU32::new(slot(s, true)))
                .collect(),
            shards: shards.max(1),
        }
    }

    /// P, the number of partitions of the data.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// The node's shard count.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The partition that holds `key`.
    pub fn partition_of<K: Placed + ?Sized>(&self, key: &K) -> PartitionId {
        placement::partition_of(key, self.count())
    }

    fn load(&self, p: u32) -> u32 {
        usize::try_from(p)
            .ok()
            .and_then(|i| self.slots.get(i))
            .map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// The shard serving partition `p` here: the one holding it, if this node leads it;
    /// `None` if `p` is another node's, only followed here, or past the partition count.
    pub fn shard_of_partition(&self, p: u32) -> Option<usize> {
        let slot = self.load(p);
        (slot & LEADS != 0).then(|| ((slot & !LEADS) - 1) as usize)
    }

    /// The shard holding a replica of partition `p` here, leader or follower.
    pub fn replica_shard(&self, p: u32) -> Option<usize> {
        let slot = self.load(p) & !LEADS;
        (slot != 0).then(|| (slot - 1) as usize)
    }

    /// The shard that takes partition `p` when a replica of it comes to this node at run time
    /// (`p mod shards`); `None` past the partition count.
    pub fn home_shard(&self, p: u32) -> Option<usize> {
        (usize::try_from(p).ok()? < self.count()).then(|| p as usize % self.shards)
    }

    /// Records that `shard` holds partition `p` here (`None`: nothing of it is here any
    /// more), leading it or not. Only the shard holding the partition calls this.
    pub fn set(&self, p: PartitionId, shard: Option<u16>, leads: bool) {
        if let Some(s) = self.slots.get(usize::from(p)) {
            s.store(slot(shard, leads), Ordering::Release);
        }
    }

    /// The shard serving the partition of `key` here, if this node owns it.
    pub fn shard_of<K: Placed + ?Sized>(&self, key: &K) -> Option<usize> {
        self.shard_of_partition(u32::from(self.partition_of(key)))
    }

    /// The shard serving conversation `conv` here; `None` for a partition this node does not
    /// own or that does not exist (a forged id).
    pub fn shard_of_conv(&self, conv: ConvId) -> Option<usize> {
        self.shard_of_partition(partition_of_conv(conv))
    }

    /// The partitions `shard` serves (leads), ascending.
    pub fn partitions_of(&self, shard: usize) -> impl Iterator<Item = PartitionId> + '_ {
        (0..self.slots.len())
            .filter(move |&p| self.shard_of_partition(p as u32) == Some(shard))
            .map(|p| p as PartitionId)
    }

    /// The partitions `shard` holds a replica of, led or followed, ascending.
    pub fn replicas_of(&self, shard: usize) -> impl Iterator<Item = PartitionId> + '_ {
        (0..self.slots.len())
            .filter(move |&p| self.replica_shard(p as u32) == Some(shard))
            .map(|p| p as PartitionId)
    }

    /// Whether this node owns (leads) partition `p`.
    pub fn owns(&self, p: u32) -> bool {
        self.shard_of_partition(p).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::{ShopId, Uid, UidKind};

    #[test]
    fn a_single_node_owns_every_partition_dealt_round_robin() {
        let map = PartitionMap::single_node(256, 3);
        assert_eq!((map.count(), map.shards()), (256, 3));
        assert_eq!(map.shard_of_partition(0), Some(0));
        assert_eq!(map.shard_of_partition(4), Some(1));
        assert_eq!(map.shard_of_partition(255), Some(0));
        assert_eq!(map.shard_of_partition(256), None, "past the count");
        assert_eq!(map.partitions_of(2).take(3).collect::<Vec<_>>(), [2, 5, 8]);
        let total: usize = (0..3).map(|s| map.partitions_of(s).count()).sum();
        assert_eq!(total, 256);
    }

    #[test]
    fn keys_keep_their_partition_whatever_the_shard_count() {
        let shop = ShopId(12);
        let p = PartitionMap::single_node(256, 1).partition_of(&shop);
        for shards in [1, 2, 3, 7] {
            let map = PartitionMap::single_node(256, shards);
            assert_eq!(map.partition_of(&shop), p);
            assert_eq!(map.shard_of(&shop), Some(usize::from(p) % shards));
        }
    }

    #[test]
    fn a_conversation_id_names_its_partition_and_a_forged_one_no_shard() {
        let conv = conv_id(7, 0x1f);
        assert_eq!(conv, ConvId(7 << 16 | 0x1f));
        assert_eq!((partition_of_conv(conv), conv_counter(conv)), (0x1f, 7));
        let map = PartitionMap::single_node(256, 2);
        assert_eq!(map.shard_of_conv(conv), Some(1));
        for forged in [ConvId(0x0100), ConvId(0xffff), ConvId(u64::MAX)] {
            assert_eq!(map.shard_of_conv(forged), None, "{forged}");
        }
    }

    #[test]
    fn partitions_of_other_nodes_are_not_here() {
        let map = PartitionMap::from_assignment(vec![Some(0), None, Some(1), None], 2);
        assert!(map.owns(0) && !map.owns(1));
        assert_eq!(map.shard_of_partition(1), None);
        let uid = Uid::new(UidKind::Buyer, 1);
        let p = map.partition_of(&uid);
        assert_eq!(map.shard_of(&uid).is_some(), p % 2 == 0);
    }

    #[test]
    fn a_partition_changes_role_at_run_time_without_moving_shard() {
        let map = PartitionMap::from_assignment(vec![Some(0), None, Some(1), None], 2);
        assert_eq!(map.replica_shard(1), None);
        assert_eq!(map.home_shard(1), Some(1));
        assert_eq!(map.home_shard(4), None, "past the count");
        map.set(1, Some(1), false);
        assert_eq!(map.replica_shard(1), Some(1), "followed here");
        assert_eq!(map.shard_of_partition(1), None, "a follower serves nothing");
        map.set(1, Some(1), true);
        assert_eq!(map.shard_of_partition(1), Some(1), "taken over");
        map.set(0, Some(0), false);
        assert!(!map.owns(0) && map.replica_shard(0) == Some(0), "demoted");
        assert_eq!(map.partitions_of(1).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(map.replicas_of(0).collect::<Vec<_>>(), [0]);
        map.set(0, None, false);
        assert_eq!(map.replica_shard(0), None, "dropped");
    }
}
