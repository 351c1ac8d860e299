//! A shard's announcements: when the owner of some partitions asks ([`BusMsg::Reannounce`],
//! after it started or took them over, docs/cluster.md "What a node's loss costs"), the shard
//! tells it which of its sessions are logged in as devices of those partitions' users, so that
//! the owner can list them in `presence`, reach them with a `kick` and kick them when the
//! device logs in elsewhere.
//!
//! The sessions go in batches, one [`BusMsg::Announce`] per partition for at most
//! [`ANNOUNCED_SESSIONS_MAX`] sessions, each by the normal routing to the partition's owner:
//! a shard of this node or another node's link. An announcement whose owner is down or unknown
//! is dropped and counted (`chinwag_session_announcements_dropped_total`); the owner asks
//! again when its link comes up.

use crate::bus::post::{Hop, To};
use crate::bus::{AnnouncedSession, BusMsg, PartitionId, PartitionMap, ANNOUNCED_SESSIONS_MAX};
use crate::operator::metrics;

use super::Shard;

impl Shard {
    /// Announces this shard's logged-in sessions of users of `partitions` to their owner.
    pub(super) fn announce(&mut self, partitions: &[PartitionId]) {
        let ctx = &self.ctx;
        let sessions = self.sessions.iter().filter_map(|(_, session)| {
            let app = session.app();
            let (uid, device, ..) = app.logged_in()?;
            Some(AnnouncedSession {
                uid,
                device,
                session: session.session_ref(ctx),
                login_ms: app.login_ms()?,
            })
        });
        let batches = announcements(sessions, partitions, ctx.partitions());
        for msg in batches {
            let BusMsg::Announce { sessions, .. } = &msg else {
                continue;
            };
            let count = sessions.len() as u64;
            let m = self.ctx.metrics();
            match self.ctx.post.office().hop(&msg) {
                Hop::Shard(_) | Hop::Node(_) => {
                    metrics::add(&m.sessions_announced, count);
                    self.ctx.post.send_later(To::Named, msg);
                }
                Hop::Down | Hop::Nowhere => {
                    metrics::add(&m.session_announcements_dropped, count);
                }
            }
        }
    }
}

/// The announcements of `sessions` whose users are in `asked` (partitions by `map`): per
/// partition, ascending, batches of at most [`ANNOUNCED_SESSIONS_MAX`].
pub(crate) fn announcements(
    sessions: impl Iterator<Item = AnnouncedSession>,
    asked: &[PartitionId],
    map: &PartitionMap,
) -> Vec<BusMsg> {
    let mut wanted = vec![false; map.count()];
    for &p in asked {
        if let Some(w) = wanted.get_mut(usize::from(p)) {
            *w = true;
        }
    }
    // Indexed by partition; only the asked ones fill.
    let mut batches: Vec<Vec<AnnouncedSession>> = vec![Vec::new(); map.count()];
    let mut out = Vec::new();
    for announced in sessions {
        let p = map.partition_of(&announced.uid);
        if !wanted.get(usize::from(p)).copied().unwrap_or(false) {
            continue;
        }
        let batch = &mut batches[usize::from(p)];
        batch.push(announced);
        if batch.len() == ANNOUNCED_SESSIONS_MAX {
            out.push(BusMsg::Announce {
                partition: p,
                sessions: std::mem::take(batch),
            });
        }
    }
    for (p, sessions) in batches.into_iter().enumerate() {
        if !sessions.is_empty() {
            out.push(BusMsg::Announce {
                // Below the map's count, at most `PARTITIONS_MAX`, which fits.
                partition: p as PartitionId,
                sessions,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{DeviceId, Uid, UidKind};

    use super::*;
    use crate::bus::SessionRef;

    fn session(uid: u64, slot: u32) -> AnnouncedSession {
        AnnouncedSession {
            uid: Uid::new(UidKind::Buyer, uid),
            device: DeviceId::from_u64(1000 + uid).unwrap(),
            session: SessionRef {
                node: 2,
                shard: 0,
                slot,
                generation: 1,
            },
            login_ms: 5,
        }
    }

    #[test]
    fn only_the_asked_partitions_are_announced_in_batches_per_partition() {
        let map = PartitionMap::single_node(8, 2);
        let sessions: Vec<AnnouncedSession> = (0..10_000).map(|i| session(i, i as u32)).collect();
        let partition = |s: &AnnouncedSession| map.partition_of(&s.uid);
        let asked = [1, 6];
        let out = announcements(sessions.iter().copied(), &asked, &map);
        let mut seen = Vec::new();
        for msg in &out {
            let BusMsg::Announce {
                partition: p,
                sessions,
            } = msg
            else {
                panic!("{msg:?}");
            };
            assert!(asked.contains(p), "{p}");
            assert!(!sessions.is_empty() && sessions.len() <= ANNOUNCED_SESSIONS_MAX);
            assert!(sessions.iter().all(|s| partition(s) == *p));
            seen.extend(sessions.iter().copied());
        }
        let expected: Vec<AnnouncedSession> = sessions
            .iter()
            .filter(|s| asked.contains(&partition(s)))
            .copied()
            .collect();
        assert!(
            expected.len() > ANNOUNCED_SESSIONS_MAX,
            "a partition needs two batches: {}",
            expected.len()
        );
        seen.sort_by_key(|s| s.session.slot);
        assert_eq!(seen, expected, "every asked session once, no other");
        // Not one message per session.
        assert!(out.len() <= 4, "{}", out.len());

        assert!(announcements(sessions.iter().copied(), &[], &map).is_empty());
        assert!(
            announcements(sessions.iter().copied(), &[200], &map).is_empty(),
            "a partition past the count asks for nothing"
        );
    }
}
