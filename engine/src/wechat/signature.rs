//! WeChat's callback signatures: the SHA-1 of the sorted, concatenated parts, in lower-case hex.
//!
//! The same rule signs both kinds of callback. A plain `GET`/`POST` carries `signature` over
//! (token, timestamp, nonce); a safe-mode `POST` also carries `msg_signature` over (token,
//! timestamp, nonce, Encrypt), which is the one that protects the encrypted body. Sorting is
//! byte-wise on the strings, as WeChat's samples sort them.

use sha1::{Digest, Sha1};

/// A signature: 20 bytes of SHA-1, shown and compared as 40 lower-case hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 20]);

impl Signature {
    /// Signs `parts`: sorts them, concatenates them and hashes the result.
    pub fn of(parts: &[&str]) -> Signature {
        let mut sorted: smallvec::SmallVec<[&str; 4]> = parts.iter().copied().collect();
        sorted.sort_unstable();
        let mut hasher = Sha1::new();
        for part in sorted {
            hasher.update(part.as_bytes());
        }
        Signature(hasher.finalize().into())
    }

    /// Whether `given` (hex, either case, as it arrives in a query string) is this signature.
    /// The comparison takes the same time wherever the first difference is, so a caller cannot
    /// learn a valid signature byte by byte from response times.
    pub fn matches(&self, given: &str) -> bool {
        let given = given.as_bytes();
        if given.len() != 40 {
            return false;
        }
        let mut diff = 0u8;
        for (i, byte) in self.0.iter().enumerate() {
            let hi = HEX[usize::from(byte >> 4)];
            let lo = HEX[usize::from(byte & 0x0f)];
            diff |= (given[2 * i].to_ascii_lowercase() ^ hi)
                | (given[2 * i + 1].to_ascii_lowercase() ^ lo);
        }
        diff == 0
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values from wechatpy's tests (tests/test_utils.py): token "test", timestamp 1410685589,
    // nonce "test".
    #[test]
    fn matches_wechatpy_plain_signature() {
        let signature = Signature::of(&["test", "1410685589", "test"]);
        assert_eq!(
            signature.to_string(),
            "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"
        );
        assert!(signature.matches("f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"));
        assert!(signature.matches("F21891DE399B4E33A1A93C9A7B8A8FFFB5A443FF"));
        assert!(!signature.matches("f21891de399b4e33a1a93c9a7b8a8fffb5a443fe"));
    }

    // WeChat's own sample for safe mode (the WXBizMsgCrypt samples): token "QDG6eK",
    // timestamp 1409659813, nonce 1372623149, and the sample's Encrypt value.
    #[test]
    fn matches_wechat_sample_msg_signature() {
        let encrypt = "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==";
        let signature = Signature::of(&["QDG6eK", "1409659813", "1372623149", encrypt]);
        assert_eq!(
            signature.to_string(),
            "477715d11cdb4164915debcba66cb864d751f3e6"
        );
    }

    #[test]
    fn refuses_wrong_lengths_and_non_hex() {
        let signature = Signature::of(&["a", "b", "c"]);
        let hex = signature.to_string();
        assert!(signature.matches(&hex));
        assert!(!signature.matches(&hex[..39]));
        assert!(!signature.matches(&format!("{hex}0")));
        assert!(!signature.matches(""));
        assert!(!signature.matches(&"z".repeat(40)));
        // Multi-byte characters never match (and never panic on a char boundary).
        assert!(!signature.matches(&"é".repeat(20)));
    }

    #[test]
    fn order_of_parts_does_not_matter() {
        assert_eq!(
            Signature::of(&["token", "1", "nonce"]),
            Signature::of(&["nonce", "token", "1"])
        );
    }
}
