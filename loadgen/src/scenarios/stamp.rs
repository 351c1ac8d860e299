//! The stamp at the start of every body the load scenarios send: the intended send time in
//! nanoseconds since the epoch, zero-padded to a fixed width, so a receiver measures
//! send-to-push latency from the body alone, with no table of what was sent when.

use std::fmt::{self, Write as _};

use crate::check::{Violation, Violations};

/// Digits of the stamp: the least body a scenario may send (`--message-bytes`).
pub const STAMP_DIGITS: usize = 20;

/// Makes `body` the stamp of `intended_ns`, padded with dots to `bytes` (when longer).
pub fn write(body: &mut String, intended_ns: u64, bytes: usize) {
    body.clear();
    let _ = write!(body, "{intended_ns:0STAMP_DIGITS$}");
    while body.len() < bytes {
        body.push('.');
    }
}

/// The intended send time stamped in a received `body`, or a violation naming the message
/// (`what`, e.g. `seq 7`) when the body is not one a scenario sent.
pub fn read(body: &str, what: fmt::Arguments<'_>, violations: &mut Violations) -> Option<u64> {
    let stamp = body
        .get(..STAMP_DIGITS)
        .and_then(|digits| digits.parse::<u64>().ok());
    if stamp.is_none() {
        violations.add(Violation::Other(format!(
            "{what}: body is not what was sent"
        )));
    }
    stamp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_stamp_reads_back_and_a_foreign_body_is_a_violation() {
        let mut body = String::from("old");
        write(&mut body, 1_700_000_000_123_456_789, 32);
        assert_eq!(body.len(), 32);
        let mut violations = Violations::default();
        assert_eq!(
            read(&body, format_args!("seq 1"), &mut violations),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(violations.count, 0);
        assert_eq!(read("hello", format_args!("seq 2"), &mut violations), None);
        assert_eq!(violations.count, 1);
        assert!(
            matches!(&violations.first[0], Violation::Other(text) if text == "seq 2: body is not what was sent"),
            "{:?}",
            violations.first
        );
    }
}
