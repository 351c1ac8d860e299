//! The message stream's resume position: one log position per shard, handed to services as an
//! opaque string and signed, so that a position this node did not hand out is refused with a
//! clear error instead of being read as a log offset.
//!
//! Layout (then lowercase hex): `u8 version` (1) · `u16 shards` · `u64 position` × shards ·
//! the first 16 bytes of HMAC-SHA256 over the preceding bytes, keyed with the node's token
//! secret and a domain label (so the MAC is no use as anything else).

use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const MAC_BYTES: usize = 16;
const DOMAIN: &[u8] = b"chinwag stream position v1";

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

/// The position string for `positions` (one per shard).
pub fn encode(secret: &[u8], positions: &[u64]) -> String {
    let mut bytes = Vec::with_capacity(3 + positions.len() * 8 + MAC_BYTES);
    bytes.push(VERSION);
    bytes.extend_from_slice(&(positions.len() as u16).to_be_bytes());
    for p in positions {
        bytes.extend_from_slice(&p.to_be_bytes());
    }
    let tag = mac(secret, &bytes);
    bytes.extend_from_slice(&tag);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The per-shard positions of a string [`encode`] made on a node with this secret and shard
/// count; anything else is refused with the reason.
pub fn decode(secret: &[u8], shards: usize, text: &str) -> Result<Vec<u64>, &'static str> {
    const NOT_OURS: &str = "not a resume position of this node";
    if text.len() % 2 != 0 || text.len() > 2 * (3 + 256 * 8 + MAC_BYTES) {
        return Err(NOT_OURS);
    }
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| NOT_OURS)?;
    if bytes.len() != 3 + shards * 8 + MAC_BYTES || bytes[0] != VERSION {
        return Err(NOT_OURS);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_BYTES);
    // Not a timing-safe comparison, and it need not be: the tag only guards against reading a
    // position this node did not hand out, not against an attacker with a service token.
    if mac(secret, body) != tag {
        return Err(NOT_OURS);
    }
    if usize::from(u16::from_be_bytes([body[1], body[2]])) != shards {
        return Err(NOT_OURS);
    }
    Ok(body[3..]
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips_and_anything_else_is_not_ours() {
        let secret = b"a secret of thirty-two bytes, yes";
        let text = encode(secret, &[1 << 32 | 64, 7]);
        assert_eq!(decode(secret, 2, &text), Ok(vec![1 << 32 | 64, 7]));
        assert!(
            decode(b"another secret", 2, &text).is_err(),
            "another node's"
        );
        assert!(decode(secret, 3, &text).is_err(), "another shard count");
        let mut forged = text.clone().into_bytes();
        forged[10] = if forged[10] == b'0' { b'1' } else { b'0' };
        assert!(decode(secret, 2, &String::from_utf8(forged).unwrap()).is_err());
        for junk in ["", "zz", "0", "é", &"0".repeat(10_000)] {
            assert!(decode(secret, 2, junk).is_err(), "{junk:?}");
        }
    }
}
