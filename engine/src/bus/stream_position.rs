//! The message stream's resume position: one log position per partition, handed to services
//! as an opaque string and signed, so that a position this node did not hand out is refused
//! with a clear error instead of being read as a log offset. Positions name partitions, not
//! shards: a position stays valid when the node restarts with another shard count (and, in a
//! cluster, when a partition moves to another node that shares the secret).
//!
//! Layout (then lowercase hex): `u8 version` (2) · `u16 partitions` (the partition count) ·
//! `u16 n` · n × (`u16 partition` · `u64 position`), partitions ascending, only those not at
//! the start of their log (position 0) · the first 16 bytes of HMAC-SHA256 over the preceding
//! bytes, keyed with the node's token secret and a domain label (so the MAC is no use as
//! anything else). Version 1 (data format 2) named one position per shard; it is refused.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::partitions::{PartitionId, PARTITIONS_MAX};

const VERSION: u8 = 2;
const MAC_BYTES: usize = 16;
const HEAD_BYTES: usize = 5;
const ENTRY_BYTES: usize = 10;
const DOMAIN: &[u8] = b"chinwag stream position v2";

/// The longest position string: every partition named, in hex. It fits the codec's 16-bit
/// string length.
pub const TEXT_BYTES_MAX: usize = 2 * (HEAD_BYTES + PARTITIONS_MAX * ENTRY_BYTES + MAC_BYTES);
const _: () = assert!(TEXT_BYTES_MAX <= u16::MAX as usize);

fn mac(secret: &[u8], bytes: &[u8]) -> [u8; MAC_BYTES] {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(DOMAIN);
    mac.update(bytes);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&full[..MAC_BYTES]);
    out
}

/// The position string for `positions` (partition, position), ascending by partition, out of
/// `partitions`. Entries at 0 (the start) are left out.
pub fn encode(secret: &[u8], partitions: usize, positions: &[(PartitionId, u64)]) -> String {
    let named: Vec<_> = positions.iter().filter(|(_, pos)| *pos != 0).collect();
    let mut bytes = Vec::with_capacity(HEAD_BYTES + named.len() * ENTRY_BYTES + MAC_BYTES);
    bytes.push(VERSION);
    bytes.extend_from_slice(&(partitions as u16).to_be_bytes());
    bytes.extend_from_slice(&(named.len() as u16).to_be_bytes());
    for (p, pos) in named {
        bytes.extend_from_slice(&p.to_be_bytes());
        bytes.extend_from_slice(&pos.to_be_bytes());
    }
    let tag = mac(secret, &bytes);
    bytes.extend_from_slice(&tag);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The positions (partition, position; partitions ascending, each below `partitions`) of a
/// string [`encode`] made on a node with this secret and partition count; anything else is
/// refused with the reason. Partitions not named are at 0, the start of their log.
pub fn decode(
    secret: &[u8],
    partitions: usize,
    text: &str,
) -> Result<Vec<(PartitionId, u64)>, &'static str> {
    const NOT_OURS: &str = "not a resume position of this node";
    if text.len() % 2 != 0 || text.len() > TEXT_BYTES_MAX {
        return Err(NOT_OURS);
    }
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| NOT_OURS)?;
    if bytes.len() < HEAD_BYTES + MAC_BYTES || bytes[0] != VERSION {
        return Err(NOT_OURS);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_BYTES);
    // Not a timing-safe comparison, and it need not be: the tag only guards against reading a
    // position this node did not hand out, not against an attacker with a service token.
    if mac(secret, body) != tag {
        return Err(NOT_OURS);
    }
    let count = usize::from(u16::from_be_bytes([body[1], body[2]]));
    let n = usize::from(u16::from_be_bytes([body[3], body[4]]));
    if count != partitions || body.len() != HEAD_BYTES + n * ENTRY_BYTES {
        return Err(NOT_OURS);
    }
    let mut out: Vec<(PartitionId, u64)> = Vec::with_capacity(n);
    for entry in body[HEAD_BYTES..].chunks_exact(ENTRY_BYTES) {
        let p = u16::from_be_bytes([entry[0], entry[1]]);
        let pos = u64::from_be_bytes(entry[2..].try_into().expect("entries of 10 bytes"));
        let ascending = out.last().map_or(true, |&(last, _)| last < p);
        if usize::from(p) >= partitions || !ascending {
            return Err(NOT_OURS);
        }
        out.push((p, pos));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips_and_anything_else_is_not_ours() {
        let secret = b"a secret of thirty-two bytes, yes";
        let text = encode(secret, 256, &[(0, 0), (3, 1 << 32 | 64), (200, 7)]);
        assert_eq!(
            decode(secret, 256, &text),
            Ok(vec![(3, 1 << 32 | 64), (200, 7)]),
            "positions at the start are left out"
        );
        assert!(
            decode(b"another secret", 256, &text).is_err(),
            "another node's"
        );
        assert!(
            decode(secret, 128, &text).is_err(),
            "another partition count"
        );
        let mut forged = text.clone().into_bytes();
        forged[10] = if forged[10] == b'0' { b'1' } else { b'0' };
        assert!(decode(secret, 256, &String::from_utf8(forged).unwrap()).is_err());
        for junk in ["", "zz", "0", "é", &"0".repeat(100_000)] {
            assert!(decode(secret, 256, junk).is_err(), "{junk:?}");
        }
        // Every partition of the largest count fits.
        let all: Vec<(PartitionId, u64)> = (0..PARTITIONS_MAX as u16).map(|p| (p, 9)).collect();
        let text = encode(secret, PARTITIONS_MAX, &all);
        assert!(text.len() <= TEXT_BYTES_MAX);
        assert_eq!(decode(secret, PARTITIONS_MAX, &text), Ok(all));
    }

    #[test]
    fn a_signed_position_naming_a_partition_out_of_range_is_refused() {
        let secret = b"a secret of thirty-two bytes, yes";
        // Signed with this node's secret and partition count, naming partition 300 of 256.
        let text = encode(secret, 256, &[(300, 5)]);
        assert!(decode(secret, 256, &text).is_err());
    }
}
