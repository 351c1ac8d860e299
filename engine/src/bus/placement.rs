//! Placement: which partition holds a key (a user, a shop, a pair of users, a group), the same
//! on every machine and every build.
//!
//! The partition of a key is `XXH64(encoding, seed 0) mod partitions`, over the canonical byte
//! encoding of the key below; which shard (later: which node) serves a partition is the
//! [`PartitionMap`](super::partitions::PartitionMap)'s business. XXH64 is specified (xxHash's `doc/xxhash_spec.md`) and its
//! output is fixed by that specification, unlike `std::hash::Hash` or a hasher such as `ahash`,
//! whose results may change with a crate version, a Rust release or the CPU's features: data
//! placed by one build must be found by the next, and, in a cluster, by every node. `docs/storage.md` ("Placement")
//! is the specification; the test vectors at the bottom pin it.
//!
//! Canonical encodings (integers little-endian; a uid is its kind code, 0 buyer, 1 wechat,
//! 2 agent, 3 service, then its id as `u64`):
//!
//! | key | bytes |
//! |---|---|
//! | user | `b'u'`, uid (10 bytes) |
//! | shop | `b's'`, shop id `u64` (9 bytes) |
//! | pair of users (direct conversation) | `b'p'`, the smaller uid, the larger uid, ordered by (kind code, id) (19 bytes) |
//! | group (by the service's key) | `b'g'`, key `u64` (9 bytes) |

use chinwag_protocol::{ShopId, Uid, UidKind};

/// The seed of the placement hash. Changing it moves every key: it is part of the data format.
const SEED: u64 = 0;
/// The longest canonical encoding (a pair).
const KEY_BYTES_MAX: usize = 19;

/// A key that has an owner partition.
pub trait Placed {
    /// Writes the key's canonical encoding into `out`; returns its length.
    fn encode(&self, out: &mut [u8; KEY_BYTES_MAX]) -> usize;

    /// The placement hash of the key.
    fn placement_hash(&self) -> u64 {
        let mut buf = [0u8; KEY_BYTES_MAX];
        let len = self.encode(&mut buf);
        xxhash_rust::xxh64::xxh64(&buf[..len], SEED)
    }
}

/// The partition that holds `key` among `partitions` (at least 1, at most 65,536).
pub fn partition_of<K: Placed + ?Sized>(key: &K, partitions: usize) -> u16 {
    debug_assert!((1..=1 << 16).contains(&partitions));
    (key.placement_hash() % partitions.max(1) as u64) as u16
}

fn kind_code(kind: UidKind) -> u8 {
    // Spelled out rather than `as u8`: the codes are part of the data format.
    match kind {
        UidKind::Buyer => 0,
        UidKind::Wechat => 1,
        UidKind::Agent => 2,
        UidKind::Service => 3,
    }
}

fn put_uid(out: &mut [u8], uid: Uid) {
    out[0] = kind_code(uid.kind);
    out[1..9].copy_from_slice(&uid.id.to_le_bytes());
}

impl Placed for Uid {
    fn encode(&self, out: &mut [u8; KEY_BYTES_MAX]) -> usize {
        out[0] = b'u';
        put_uid(&mut out[1..10], *self);
        10
    }
}

impl Placed for ShopId {
    fn encode(&self, out: &mut [u8; KEY_BYTES_MAX]) -> usize {
        out[0] = b's';
        out[1..9].copy_from_slice(&self.0.to_le_bytes());
        9
    }
}

/// A group conversation, by the key the service creates it with: creating the same key again
/// reaches the same partition, which answers with the group it made the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupKey(pub u64);

impl Placed for GroupKey {
    fn encode(&self, out: &mut [u8; KEY_BYTES_MAX]) -> usize {
        out[0] = b'g';
        out[1..9].copy_from_slice(&self.0.to_le_bytes());
        9
    }
}

/// The two users of a direct conversation, in either order.
impl Placed for (Uid, Uid) {
    fn encode(&self, out: &mut [u8; KEY_BYTES_MAX]) -> usize {
        let order = |u: &Uid| (kind_code(u.kind), u.id);
        let (a, b) = if order(&self.0) <= order(&self.1) {
            (self.0, self.1)
        } else {
            (self.1, self.0)
        };
        out[0] = b'p';
        put_uid(&mut out[1..10], a);
        put_uid(&mut out[10..19], b);
        19
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(kind: UidKind, id: u64) -> Uid {
        Uid::new(kind, id)
    }

    /// The hash itself, from the XXH64 specification's reference results.
    #[test]
    fn xxh64_matches_its_specification() {
        use xxhash_rust::xxh64::xxh64;
        assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
    }

    /// Fixed vectors: if one of these changes, keys placed by earlier builds are lost. Never
    /// update them; a new placement is a new data format. The hashes are those of data format
    /// 2; format 3 added the partitions (of 7, and of the default 256).
    #[test]
    fn placement_test_vectors() {
        let vectors: [(&dyn Placed, u64, u16, u16); 7] = [
            (&uid(UidKind::Buyer, 1), 0xe658_d460_f428_275b, 0, 0x5b),
            (&uid(UidKind::Agent, 8), 0xd840_dff9_b24a_182b, 0, 0x2b),
            (
                &uid(UidKind::Service, u64::MAX),
                0xe765_9048_9989_0f21,
                0,
                0x21,
            ),
            (&ShopId(12), 0xa651_5d2c_1634_18a0, 5, 0xa0),
            (&ShopId(0), 0x44a3_6e15_443b_b761, 4, 0x61),
            (
                &(uid(UidKind::Buyer, 1), uid(UidKind::Buyer, 2)),
                0x052c_3cf9_d6c0_1431,
                3,
                0x31,
            ),
            (&GroupKey(12), 0x466a_3119_3fa1_1fd0, 6, 0xd0),
        ];
        for (i, (key, hash, of_7, of_256)) in vectors.into_iter().enumerate() {
            assert_eq!(
                key.placement_hash(),
                hash,
                "vector {i}: {:#018x}",
                key.placement_hash()
            );
            assert_eq!(partition_of(key, 7), of_7, "vector {i}");
            assert_eq!(partition_of(key, 256), of_256, "vector {i}");
        }
        // Partition counts that are not powers of two use the whole hash.
        assert_eq!(
            u64::from(partition_of(&ShopId(12), 1000)),
            0xa651_5d2c_1634_18a0 % 1000
        );
        assert_eq!(partition_of(&ShopId(12), 1000), 632);
    }

    #[test]
    fn a_pair_places_the_same_in_either_order_and_keys_of_different_types_differ() {
        let (a, b) = (uid(UidKind::Buyer, 5), uid(UidKind::Wechat, 3));
        assert_eq!((a, b).placement_hash(), (b, a).placement_hash());
        assert_ne!(ShopId(5).placement_hash(), a.placement_hash());
        let encoded = |k: &dyn Placed| {
            let mut buf = [0u8; KEY_BYTES_MAX];
            let n = k.encode(&mut buf);
            buf[..n].to_vec()
        };
        assert_eq!(encoded(&a), [b'u', 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encoded(&ShopId(0x0102)), [b's', 2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            encoded(&(b, a)),
            [b'p', 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
