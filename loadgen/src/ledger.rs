//! What the server acknowledged, kept to be checked against what it stored
//! (`chat --verify-log`), and how long a conversation refused writes after a failure.
//!
//! The contract (issue 14's checker): every send the server acknowledged with a `send_ok`
//! naming seq S is stored exactly once, at S, with the body sent; every conversation's stored
//! seqs are 1..n with no hole and no duplicate. A send that was never acknowledged (its reply
//! was lost with a node, it timed out, the connection failed) may or may not be stored: a client
//! cannot know, so it sends it again with the same cmid, and the server stores it at most once.
//! Stored once or not at all is fine (at least once from the client's retries, at most once
//! from the server's cmid check); stored twice is not.
//!
//! [`Ledger`] records, per cmid, the body's digest and the seq of its `send_ok`; [`judge`]
//! compares one conversation's stored log, read back with `history`, with it. [`WriteOutages`]
//! measures failover as a client sees it: from the first send of a conversation that failed or
//! went unanswered to the next `send_ok` in that conversation of a send written after the
//! failure was seen.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::check::Violation;
use crate::report;

/// A 64-bit FNV-1a digest of a message body: the ledger keeps it instead of the body.
pub fn digest(body: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    body.iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// One send of the run: its body's digest, and the seq its `send_ok` named, if one came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// [`digest`] of the body sent.
    pub digest: u64,
    /// The seq of the first `send_ok` for this cmid.
    pub acked: Option<u64>,
}

impl Sent {
    /// A `send_ok` for this cmid named `seq`. A cmid acknowledged twice (a retry) must be
    /// acknowledged at the same seq: `Err` gives the seq of the first.
    pub fn ack(&mut self, seq: u64) -> Result<(), u64> {
        match self.acked {
            None => {
                self.acked = Some(seq);
                Ok(())
            }
            Some(first) if first == seq => Ok(()),
            Some(first) => Err(first),
        }
    }
}

/// The sends of one user, by message number (its cmid is `USER-N`), bounded over the whole
/// run by [`Ledger::SENDS_MAX`].
#[derive(Debug, Default)]
pub struct Ledger {
    /// Sends recorded, all users together.
    pub recorded: u64,
    /// Set once a send could not be recorded: the run cannot be verified.
    pub full: bool,
}

impl Ledger {
    /// The most sends one process records (24 bytes each: about 100 MB).
    pub const SENDS_MAX: u64 = 4_000_000;

    /// Records send number `n` of a user whose sends are `log` (sends are numbered from 0 in
    /// the order they are first made; a retry of `n` records nothing new).
    pub fn record(&mut self, log: &mut Vec<Sent>, n: u64, body: &[u8]) {
        if n < log.len() as u64 {
            return;
        }
        if self.recorded >= Ledger::SENDS_MAX || n != log.len() as u64 {
            self.full = true;
            return;
        }
        self.recorded += 1;
        log.push(Sent {
            digest: digest(body),
            acked: None,
        });
    }
}

/// One message of a conversation's stored log, as `history` returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub cmid: String,
    /// [`digest`] of its body.
    pub digest: u64,
}

/// What [`judge`] found in one conversation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Messages in the stored log.
    pub stored: u64,
    /// Acknowledged sends checked (each found once, at its seq, or a violation).
    pub acked: u64,
    /// Sends never acknowledged that are stored once (the server stored what the client could
    /// not learn about: allowed).
    pub unacked_stored: u64,
    /// Sends never acknowledged and not stored (allowed).
    pub unacked_absent: u64,
    /// Broken rules, in seq order of the stored log, then by cmid.
    pub violations: Vec<Violation>,
}

/// Checks the stored log of conversation `conv` (`stored`, ascending by seq as `history`
/// pages it, from seq 1 to its end) against `sends`, every send this run made to it by cmid.
/// Messages below seq `first` were stored before the load (a shop conversation's build) and
/// are only checked for their seqs.
pub fn judge(conv: u64, first: u64, sends: &HashMap<String, Sent>, stored: &[Stored]) -> Verdict {
    let mut verdict = Verdict::default();
    let mut previous = 0u64;
    // Where each of this run's cmids is stored.
    let mut at: HashMap<&str, Vec<u64>> = HashMap::new();
    for message in stored {
        if message.seq <= previous {
            verdict.violations.push(Violation::Other(format!(
                "conv {conv}: the stored log has seq {} after seq {previous}",
                message.seq
            )));
            continue;
        }
        if message.seq > previous + 1 {
            verdict.violations.push(Violation::Missing {
                conv,
                from: previous + 1,
                to: message.seq - 1,
            });
        }
        previous = message.seq;
        verdict.stored += 1;
        if message.seq < first {
            continue;
        }
        match sends.get(&message.cmid) {
            None => verdict.violations.push(Violation::NeverSent {
                conv,
                seq: message.seq,
                cmid: message.cmid.clone(),
            }),
            Some(sent) => {
                if sent.digest != message.digest {
                    verdict.violations.push(Violation::BodyDiffers {
                        conv,
                        seq: message.seq,
                        cmid: message.cmid.clone(),
                    });
                }
                at.entry(message.cmid.as_str())
                    .or_default()
                    .push(message.seq);
            }
        }
    }
    let cmid_at = |seq: u64| -> Option<String> {
        let i = stored.binary_search_by_key(&seq, |m| m.seq).ok()?;
        Some(stored[i].cmid.clone())
    };
    let mut cmids: Vec<(&String, &Sent)> = sends.iter().collect();
    cmids.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (cmid, sent) in cmids {
        let seqs = at.get(cmid.as_str()).map_or(&[][..], Vec::as_slice);
        match sent.acked {
            Some(seq) => {
                verdict.acked += 1;
                if !seqs.contains(&seq) {
                    verdict.violations.push(Violation::AckLost {
                        conv,
                        seq,
                        cmid: cmid.clone(),
                        found: cmid_at(seq),
                    });
                }
            }
            None if seqs.is_empty() => verdict.unacked_absent += 1,
            None => verdict.unacked_stored += 1,
        }
        if let [first, again, ..] = seqs {
            verdict.violations.push(Violation::StoredTwice {
                conv,
                cmid: cmid.clone(),
                first: *first,
                again: *again,
            });
        }
    }
    verdict
}

/// Per conversation (`K`, any key that names one), the time from a failed or unanswered send
/// to the conversation's next acknowledged write: how long a failover kept it from taking
/// writes, as its clients saw it.
pub struct WriteOutages<K> {
    open: HashMap<K, Outage>,
    /// Outages begun.
    pub begun: u64,
    /// From the first failed send of each outage that ended to the `send_ok` that ended it, µs.
    pub resumed: Histogram<u64>,
}

/// A conversation that has not taken a write since a send failed.
#[derive(Clone, Copy, Debug)]
struct Outage {
    /// When the first send that failed (or went unanswered) was written.
    failed_sent_at: Instant,
    /// When the client first saw a send fail: a `send_ok` of a send written before it does not
    /// say that the conversation takes writes again.
    seen_at: Instant,
}

impl<K: Hash + Eq> Default for WriteOutages<K> {
    fn default() -> WriteOutages<K> {
        WriteOutages {
            open: HashMap::new(),
            begun: 0,
            resumed: report::latency_histogram(),
        }
    }
}

impl<K: Hash + Eq> WriteOutages<K> {
    /// A send to conversation `key`, written at `sent_at`, failed or went unanswered, as seen at
    /// `now` (its error reply, its reply timeout, or its connection's failure).
    pub fn failed(&mut self, key: K, sent_at: Instant, now: Instant) {
        match self.open.get_mut(&key) {
            Some(outage) => outage.failed_sent_at = outage.failed_sent_at.min(sent_at),
            None => {
                self.begun += 1;
                self.open.insert(
                    key,
                    Outage {
                        failed_sent_at: sent_at,
                        seen_at: now,
                    },
                );
            }
        }
    }

    /// A `send_ok` for a send to `key` written at `sent_at` arrived at `now`: if it was written
    /// after the outage was seen, the conversation takes writes again.
    pub fn acked(&mut self, key: K, sent_at: Instant, now: Instant) {
        let Some(outage) = self.open.get(&key) else {
            return;
        };
        if sent_at < outage.seen_at {
            return;
        }
        report::record(
            &mut self.resumed,
            now.saturating_duration_since(outage.failed_sent_at),
        );
        self.open.remove(&key);
    }

    /// Outages that had not ended when the run did.
    pub fn unresolved(&self) -> u64 {
        self.open.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sends(list: &[(&str, &str, Option<u64>)]) -> HashMap<String, Sent> {
        list.iter()
            .map(|(cmid, body, acked)| {
                let sent = Sent {
                    digest: digest(body.as_bytes()),
                    acked: *acked,
                };
                (cmid.to_string(), sent)
            })
            .collect()
    }

    fn log(list: &[(u64, &str, &str)]) -> Vec<Stored> {
        list.iter()
            .map(|(seq, cmid, body)| Stored {
                seq: *seq,
                cmid: cmid.to_string(),
                digest: digest(body.as_bytes()),
            })
            .collect()
    }

    #[test]
    fn every_acknowledged_send_stored_once_at_its_seq_passes() {
        let sent = sends(&[
            ("0-0", "a", Some(1)),
            ("1-0", "b", Some(2)),
            ("0-1", "c", Some(3)),
        ]);
        let stored = log(&[(1, "0-0", "a"), (2, "1-0", "b"), (3, "0-1", "c")]);
        let verdict = judge(9, 1, &sent, &stored);
        assert_eq!(verdict.violations, vec![]);
        assert_eq!((verdict.stored, verdict.acked), (3, 3));
    }

    #[test]
    fn an_acknowledged_send_missing_at_the_end_is_lost() {
        let sent = sends(&[("0-0", "a", Some(1)), ("0-1", "b", Some(2))]);
        let verdict = judge(9, 1, &sent, &log(&[(1, "0-0", "a")]));
        assert_eq!(
            verdict.violations,
            vec![Violation::AckLost {
                conv: 9,
                seq: 2,
                cmid: "0-1".into(),
                found: None
            }]
        );
    }

    #[test]
    fn another_message_at_an_acknowledged_seq_is_a_lost_ack() {
        // The new leader's epoch wrote "1-0" at seq 2, where the old one had acknowledged "0-1"
        // (which is also not stored anywhere else).
        let sent = sends(&[
            ("0-0", "a", Some(1)),
            ("0-1", "b", Some(2)),
            ("1-0", "c", Some(2)),
        ]);
        let verdict = judge(9, 1, &sent, &log(&[(1, "0-0", "a"), (2, "1-0", "c")]));
        assert_eq!(
            verdict.violations,
            vec![Violation::AckLost {
                conv: 9,
                seq: 2,
                cmid: "0-1".into(),
                found: Some("1-0".into())
            }]
        );
    }

    #[test]
    fn a_hole_in_the_stored_seqs_is_missing() {
        let sent = sends(&[("0-0", "a", Some(1)), ("0-2", "c", Some(4))]);
        let verdict = judge(9, 1, &sent, &log(&[(1, "0-0", "a"), (4, "0-2", "c")]));
        assert_eq!(
            verdict.violations,
            vec![Violation::Missing {
                conv: 9,
                from: 2,
                to: 3
            }]
        );
        assert_eq!(verdict.violations[0].count(), 2);
    }

    #[test]
    fn a_retried_send_stored_twice_is_caught_acknowledged_or_not() {
        let sent = sends(&[("0-0", "a", Some(1)), ("0-1", "b", None)]);
        let stored = log(&[
            (1, "0-0", "a"),
            (2, "0-1", "b"),
            (3, "0-0", "a"),
            (4, "0-1", "b"),
        ]);
        let verdict = judge(9, 1, &sent, &stored);
        assert_eq!(
            verdict.violations,
            vec![
                Violation::StoredTwice {
                    conv: 9,
                    cmid: "0-0".into(),
                    first: 1,
                    again: 3
                },
                Violation::StoredTwice {
                    conv: 9,
                    cmid: "0-1".into(),
                    first: 2,
                    again: 4
                },
            ]
        );
    }

    #[test]
    fn unacknowledged_sends_may_be_stored_once_or_not_at_all() {
        let sent = sends(&[
            ("0-0", "a", Some(1)),
            ("0-1", "b", None),
            ("0-2", "c", None),
        ]);
        let verdict = judge(9, 1, &sent, &log(&[(1, "0-0", "a"), (2, "0-1", "b")]));
        assert_eq!(verdict.violations, vec![]);
        assert_eq!((verdict.unacked_stored, verdict.unacked_absent), (1, 1));
    }

    #[test]
    fn a_changed_body_and_a_message_never_sent_are_caught() {
        let sent = sends(&[("0-0", "a", Some(1))]);
        let verdict = judge(9, 1, &sent, &log(&[(1, "0-0", "x"), (2, "5-5", "late")]));
        assert_eq!(
            verdict.violations,
            vec![
                Violation::BodyDiffers {
                    conv: 9,
                    seq: 1,
                    cmid: "0-0".into()
                },
                Violation::NeverSent {
                    conv: 9,
                    seq: 2,
                    cmid: "5-5".into()
                },
            ]
        );
    }

    #[test]
    fn messages_before_the_load_are_checked_for_their_seqs_only() {
        let sent = sends(&[("0-0", "a", Some(3))]);
        let stored = log(&[(1, "build-1", "x"), (2, "build-2", "y"), (3, "0-0", "a")]);
        let verdict = judge(9, 3, &sent, &stored);
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.stored, 3);
        let verdict = judge(9, 3, &sent, &log(&[(2, "build-2", "y"), (3, "0-0", "a")]));
        assert_eq!(
            verdict.violations,
            vec![Violation::Missing {
                conv: 9,
                from: 1,
                to: 1
            }]
        );
    }

    #[test]
    fn a_log_out_of_order_is_caught() {
        let sent = sends(&[("0-0", "a", Some(1)), ("0-1", "b", Some(2))]);
        let verdict = judge(
            9,
            1,
            &sent,
            &log(&[(1, "0-0", "a"), (2, "0-1", "b"), (2, "0-1", "b")]),
        );
        assert_eq!(verdict.violations.len(), 1, "{:?}", verdict.violations);
        assert!(verdict.violations[0]
            .to_string()
            .contains("seq 2 after seq 2"));
    }

    #[test]
    fn a_cmid_acknowledged_at_two_seqs_is_refused() {
        let mut sent = Sent::default();
        assert_eq!(sent.ack(4), Ok(()));
        assert_eq!(
            sent.ack(4),
            Ok(()),
            "the same seq again: a retry answered twice"
        );
        assert_eq!(sent.ack(7), Err(4));
        assert_eq!(sent.acked, Some(4));
    }

    #[test]
    fn the_ledger_records_each_send_once_and_stops_when_full() {
        let mut ledger = Ledger::default();
        let mut log = Vec::new();
        ledger.record(&mut log, 0, b"a");
        ledger.record(&mut log, 0, b"a");
        ledger.record(&mut log, 1, b"b");
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].digest, digest(b"b"));
        assert!(!ledger.full);
        ledger.record(&mut log, 5, b"skipped a number");
        assert!(ledger.full, "a send it could not record");
        let mut ledger = Ledger {
            recorded: Ledger::SENDS_MAX,
            full: false,
        };
        ledger.record(&mut Vec::new(), 0, b"a");
        assert!(ledger.full);
    }

    #[test]
    fn digests_differ_for_different_bodies() {
        assert_ne!(digest(b"ab"), digest(b"ba"));
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn writes_resume_at_the_first_ack_of_a_send_made_after_the_failure() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut outages = WriteOutages::default();
        // A send written at 100 ms goes unanswered; its node died. Seen at 5,100 ms.
        outages.failed(7, at(100), at(5_100));
        // Another send in flight since 50 ms fails with its connection: the outage starts then.
        outages.failed(7, at(50), at(5_200));
        assert_eq!(outages.begun, 1);
        // A send written before the failure was seen is acknowledged late: not a resumption.
        outages.acked(7, at(4_000), at(5_300));
        assert_eq!(outages.unresolved(), 1);
        // The retry, written at 5,400 ms, is acknowledged at 7,050 ms: 7 s after 50 ms.
        outages.acked(7, at(5_400), at(7_050));
        assert_eq!(outages.unresolved(), 0);
        assert_eq!(outages.resumed.len(), 1);
        let us = outages.resumed.max();
        assert!((6_990_000..=7_010_000).contains(&us), "{us}");
        // Other conversations are not affected; an ack with no outage records nothing.
        outages.acked(8, at(1), at(2));
        outages.failed(8, at(8_000), at(8_100));
        assert_eq!((outages.begun, outages.unresolved()), (2, 1));
    }
}
