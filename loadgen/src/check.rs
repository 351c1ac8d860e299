//! The correctness check every scenario runs on what it receives.
//!
//! The contract: within a conversation, seqs are 1, 2, 3, ... with no gap and no duplicate, and
//! a device receives a conversation's `msg` pushes in increasing seq, for every message except
//! those its own device sent (it learns their seqs from `send_ok`). So for one device and one
//! conversation, the seqs it sees from pushes and from its own `send_ok`s together must be
//! every seq from the first to the last exactly once, and the pushes alone must increase.
//!
//! A [`SeqTrack`] keeps that for one (device, conversation): `next` is the lowest seq not yet
//! seen; seqs seen above it wait in `ahead` until the hole below them fills. A `send_ok` may
//! arrive after pushes of later seqs (the reply and the push travel different paths), so a hole
//! is only a gap once the run has drained: [`SeqTrack::finish`] says which seqs never came.

use std::collections::BTreeSet;
use std::fmt;

/// One broken rule, with enough to find it in a server log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A seq was seen twice (pushed twice, or pushed to the device that sent it).
    Duplicate {
        /// The conversation.
        conv: u64,
        /// The seq.
        seq: u64,
    },
    /// A push came after a push of a higher seq.
    Reorder {
        /// The conversation.
        conv: u64,
        /// The seq that came late.
        seq: u64,
        /// The highest seq pushed before it.
        after: u64,
    },
    /// Seqs `from..=to` were never seen, though the conversation reached `to` or beyond.
    Gap {
        /// The conversation.
        conv: u64,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// The stored log (read back with `history`, `chat --verify-log`) lacks seqs
    /// `from..=to` below its last seq: a conversation's seqs are 1..n with no hole.
    Missing {
        /// The conversation.
        conv: u64,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// A send the server acknowledged at `seq` is not at `seq` in the stored log: the seq is
    /// past its end (`found` is `None`) or holds another message (`found` names its cmid).
    AckLost {
        /// The conversation.
        conv: u64,
        /// The seq its `send_ok` named.
        seq: u64,
        /// The send's cmid.
        cmid: String,
        /// The cmid stored at `seq` instead, if any.
        found: Option<String>,
    },
    /// One send (one cmid) is stored at two seqs: a retried send stored twice.
    StoredTwice {
        /// The conversation.
        conv: u64,
        /// The send's cmid.
        cmid: String,
        /// The first seq it is stored at.
        first: u64,
        /// Another seq it is stored at.
        again: u64,
    },
    /// One send (one cmid) was acknowledged with two different seqs.
    AckedTwice {
        /// The conversation.
        conv: u64,
        /// The send's cmid.
        cmid: String,
        /// The seq of the first `send_ok`.
        first: u64,
        /// The seq of a later one.
        again: u64,
    },
    /// The stored message at `seq` has the cmid of a send, but not its body.
    BodyDiffers {
        /// The conversation.
        conv: u64,
        /// The seq.
        seq: u64,
        /// The cmid.
        cmid: String,
    },
    /// The stored log holds a message under a cmid this run never sent.
    NeverSent {
        /// The conversation.
        conv: u64,
        /// The seq.
        seq: u64,
        /// The cmid.
        cmid: String,
    },
    /// Something else the server sent that the contract does not allow.
    Other(String),
}

impl Violation {
    /// How many messages the violation covers (a gap of three seqs counts three).
    pub fn count(&self) -> u64 {
        match self {
            Violation::Gap { from, to, .. } | Violation::Missing { from, to, .. } => to - from + 1,
            _ => 1,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Duplicate { conv, seq } => write!(f, "conv {conv}: seq {seq} seen twice"),
            Violation::Reorder { conv, seq, after } => {
                write!(f, "conv {conv}: seq {seq} pushed after seq {after}")
            }
            Violation::Gap { conv, from, to } if from == to => {
                write!(f, "conv {conv}: seq {from} never arrived")
            }
            Violation::Gap { conv, from, to } => {
                write!(f, "conv {conv}: seqs {from}..={to} never arrived")
            }
            Violation::Missing { conv, from, to } if from == to => {
                write!(f, "conv {conv}: seq {from} missing from the stored log")
            }
            Violation::Missing { conv, from, to } => {
                write!(f, "conv {conv}: seqs {from}..={to} missing from the stored log")
            }
            Violation::AckLost {
                conv,
                seq,
                cmid,
                found: None,
            } => write!(
                f,
                "conv {conv}: cmid {cmid} acknowledged at seq {seq} is not stored (lost)"
            ),
            Violation::AckLost {
                conv,
                seq,
                cmid,
                found: Some(other),
            } => write!(
                f,
                "conv {conv}: cmid {cmid} acknowledged at seq {seq}, but seq {seq} holds cmid {other}"
            ),
            Violation::StoredTwice {
                conv,
                cmid,
                first,
                again,
            } => write!(f, "conv {conv}: cmid {cmid} stored twice, at seqs {first} and {again}"),
            Violation::AckedTwice {
                conv,
                cmid,
                first,
                again,
            } => write!(
                f,
                "conv {conv}: cmid {cmid} acknowledged at seq {first}, then at seq {again}"
            ),
            Violation::BodyDiffers { conv, seq, cmid } => write!(
                f,
                "conv {conv}: seq {seq} (cmid {cmid}) holds another body than was sent"
            ),
            Violation::NeverSent { conv, seq, cmid } => {
                write!(f, "conv {conv}: seq {seq} holds cmid {cmid}, which was never sent")
            }
            Violation::Other(what) => f.write_str(what),
        }
    }
}

/// What one device has seen of one conversation.
#[derive(Debug, Clone)]
pub struct SeqTrack {
    conv: u64,
    /// The lowest seq not yet seen.
    next: u64,
    /// Seqs seen above `next`.
    ahead: BTreeSet<u64>,
    /// The highest seq pushed so far (0 before the first push).
    last_push: u64,
}

impl SeqTrack {
    /// A track of a conversation that starts at seq `first` (1 for a new conversation).
    pub fn new(conv: u64, first: u64) -> SeqTrack {
        SeqTrack {
            conv,
            next: first.max(1),
            ahead: BTreeSet::new(),
            last_push: 0,
        }
    }

    /// A `msg` push with `seq` arrived.
    pub fn push(&mut self, seq: u64) -> Result<(), Violation> {
        let last_push = self.last_push;
        self.last_push = last_push.max(seq);
        self.see(seq)?;
        if seq < last_push {
            return Err(Violation::Reorder {
                conv: self.conv,
                seq,
                after: last_push,
            });
        }
        Ok(())
    }

    /// The lowest seq not yet seen: every seq below it has been seen exactly once.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Whether `seq` has been seen.
    pub fn has_seen(&self, seq: u64) -> bool {
        seq < self.next || self.ahead.contains(&seq)
    }

    /// A message came in a `history` page. A reconnecting device's history and its pushes
    /// overlap by design, so a seq seen before is not a duplicate here.
    pub fn recover(&mut self, seq: u64) {
        if !self.has_seen(seq) {
            let _ = self.see(seq);
        }
    }

    /// This device's own `send_ok` with `seq` arrived.
    pub fn own(&mut self, seq: u64) -> Result<(), Violation> {
        self.see(seq)
    }

    fn see(&mut self, seq: u64) -> Result<(), Violation> {
        if seq < self.next || !self.ahead.insert(seq) {
            return Err(Violation::Duplicate {
                conv: self.conv,
                seq,
            });
        }
        while self.ahead.remove(&self.next) {
            self.next += 1;
        }
        Ok(())
    }

    /// After the run has drained, given the conversation's last seq (the highest any member
    /// was told in a `send_ok`): the seqs this device never saw.
    pub fn finish(&self, last_seq: u64) -> Vec<Violation> {
        let mut gaps = Vec::new();
        let mut from = self.next;
        for &seen in self.ahead.iter().chain(std::iter::once(&(last_seq + 1))) {
            if seen > last_seq + 1 {
                break;
            }
            if seen > from {
                gaps.push(Violation::Gap {
                    conv: self.conv,
                    from,
                    to: seen - 1,
                });
            }
            from = seen + 1;
        }
        gaps
    }
}

/// Counts violations and keeps the first few for the report.
#[derive(Debug, Default)]
pub struct Violations {
    /// Messages affected, summed over every violation.
    pub count: u64,
    /// The first [`Violations::KEPT`] violations, in the order they happened.
    pub first: Vec<Violation>,
}

impl Violations {
    /// How many violations are kept for printing.
    pub const KEPT: usize = 20;

    /// Counts `violation`.
    pub fn add(&mut self, violation: Violation) {
        self.count += violation.count();
        if self.first.len() < Violations::KEPT {
            self.first.push(violation);
        }
    }

    /// Counts the error of `result`, if any.
    pub fn check(&mut self, result: Result<(), Violation>) {
        if let Err(v) = result {
            self.add(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds pushes (`p`) and own send_oks (`o`) and returns every violation.
    fn run(events: &[(char, u64)], last_seq: u64) -> Vec<Violation> {
        let mut track = SeqTrack::new(7, 1);
        let mut found = Vec::new();
        for &(what, seq) in events {
            let result = match what {
                'p' => track.push(seq),
                _ => track.own(seq),
            };
            found.extend(result.err());
        }
        found.extend(track.finish(last_seq));
        found
    }

    #[test]
    fn in_order_pushes_and_own_sends_pass() {
        let events = [('p', 1), ('o', 2), ('p', 3), ('p', 4), ('o', 5)];
        assert_eq!(run(&events, 5), vec![]);
    }

    #[test]
    fn a_send_ok_after_later_pushes_is_not_a_gap() {
        let events = [('p', 1), ('p', 3), ('p', 4), ('o', 2)];
        assert_eq!(run(&events, 4), vec![]);
    }

    #[test]
    fn a_dropped_push_is_a_gap() {
        let events = [('p', 1), ('p', 2), ('p', 4)];
        let found = run(&events, 4);
        assert_eq!(
            found,
            vec![Violation::Gap {
                conv: 7,
                from: 3,
                to: 3
            }]
        );
    }

    #[test]
    fn a_dropped_last_push_is_a_gap() {
        let found = run(&[('p', 1), ('p', 2)], 4);
        assert_eq!(
            found,
            vec![Violation::Gap {
                conv: 7,
                from: 3,
                to: 4
            }]
        );
        assert_eq!(found[0].count(), 2);
    }

    #[test]
    fn a_reordered_push_is_caught() {
        let found = run(&[('p', 1), ('p', 3), ('p', 2)], 3);
        assert_eq!(
            found,
            vec![Violation::Reorder {
                conv: 7,
                seq: 2,
                after: 3
            }]
        );
    }

    #[test]
    fn a_duplicate_push_is_caught() {
        let found = run(&[('p', 1), ('p', 2), ('p', 2), ('p', 3)], 3);
        assert_eq!(found, vec![Violation::Duplicate { conv: 7, seq: 2 }]);
    }

    #[test]
    fn a_push_of_an_own_message_is_a_duplicate() {
        let found = run(&[('o', 1), ('p', 1)], 1);
        assert_eq!(found, vec![Violation::Duplicate { conv: 7, seq: 1 }]);
    }

    #[test]
    fn several_gaps_are_each_reported() {
        let found = run(&[('p', 2), ('p', 5), ('p', 6)], 8);
        assert_eq!(
            found,
            vec![
                Violation::Gap {
                    conv: 7,
                    from: 1,
                    to: 1
                },
                Violation::Gap {
                    conv: 7,
                    from: 3,
                    to: 4
                },
                Violation::Gap {
                    conv: 7,
                    from: 7,
                    to: 8
                },
            ]
        );
    }

    #[test]
    fn history_fills_holes_without_duplicates() {
        let mut track = SeqTrack::new(7, 1);
        track.push(1).unwrap();
        track.push(4).unwrap();
        for seq in 1..=5 {
            track.recover(seq);
        }
        assert_eq!(track.next(), 6);
        assert_eq!(track.finish(5), vec![]);
        assert!(track.has_seen(3) && !track.has_seen(6));
    }

    #[test]
    fn violations_keep_the_first_few_and_count_all() {
        let mut all = Violations::default();
        for seq in 0..100 {
            all.add(Violation::Duplicate { conv: 1, seq });
        }
        all.add(Violation::Gap {
            conv: 1,
            from: 1,
            to: 10,
        });
        assert_eq!(all.count, 110);
        assert_eq!(all.first.len(), Violations::KEPT);
    }
}
