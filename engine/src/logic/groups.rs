//! Group conversations, which backend services make and manage: create (once per service key),
//! add and remove members, and any conversation's info.
//!
//! A group lives in the partition its key hashes to (`bus::placement::GroupKey`), so creating the
//! same key twice reaches the same owner, which answers with the group it already made; after
//! that its id carries the partition like every conversation's. Members send, read and page through
//! a group like any conversation (`send` with `conv`, the usual `msg` fan-out).
//!
//! Member changes are pushed to the members after the change and to those removed. Up to
//! [`GROUP_FULL_LIST_MAX`] members the push is `members` with the whole list; above it,
//! `members_delta` with who joined, who left and the count, so a change costs each member the
//! change, not the whole list. In such a large group a `read` sends its `receipt` only to the
//! reader's own other devices (see `cursors`): a receipt to every member for every read would
//! be members² pushes.

use ahash::AHashSet;
use chinwag_protocol::limits::GROUP_FULL_LIST_MAX;
use chinwag_protocol::{ConvId, ConvInfo, ErrorCode, Members, MembersDelta, Message, Uid};
use smallvec::SmallVec;

use super::reads::conv_type;
use super::{store_error, Owner};
use crate::bus::placement::GroupKey;
use crate::bus::{Fanout, GroupOp, Origin, GROUP_MEMBERS_PER_REQUEST_MAX};
use crate::store::ConvKind;

type Failure = (ErrorCode, String);

impl Owner {
    /// Carries out a service's group operation: its reply (an acknowledgement, `unavailable`
    /// if the commit fails), records and pushes wait for the commit.
    pub(super) fn group(
        &mut self,
        origin: &Origin,
        op: GroupOp,
        now_ms: u64,
    ) -> Result<(), Failure> {
        let reply = match op {
            GroupOp::Create { key, members } => {
                Message::GroupCreateOk(self.group_create(key, &members)?)
            }
            GroupOp::Add { conv, members } => {
                Message::GroupAddOk(self.group_change(conv, &members, true, now_ms)?)
            }
            GroupOp::Remove { conv, members } => {
                Message::GroupRemoveOk(self.group_change(conv, &members, false, now_ms)?)
            }
            GroupOp::Info { conv } => Message::ConvInfoOk(self.conv_info(conv, false)?),
        };
        let reply = origin.reply(reply);
        self.ack(origin, reply);
        Ok(())
    }

    fn group_create(&mut self, key: u64, members: &[Uid]) -> Result<ConvInfo, Failure> {
        check_request(members)?;
        let p = self.map.partition_of(&GroupKey(key));
        if let Some(conv) = self.log(p).and_then(|log| log.group_conv(key)) {
            return self.conv_info(conv, false);
        }
        if distinct(members).len() != members.len() {
            return Err((ErrorCode::BadRequest, "a member is listed twice".into()));
        }
        let max = self.members_max();
        if members.len() > max {
            return Err(too_many(members.len(), max));
        }
        let conv = self.find_or_create(p, None, |store, conv| {
            store.create_group_conv(conv, key, members)
        })?;
        self.announce_members(conv, members, &[]);
        self.conv_info(conv, true)
    }

    /// Adds (`join`) or removes `members`. Nothing is stored unless the whole request is valid:
    /// a removed user who is not a member, or a group that would exceed `members_max`, fails
    /// it. (Only a disk failure part-way could leave part of it stored: then the reply is
    /// `unavailable` and the service retries; adding is idempotent, and removing again names
    /// the users still in.)
    fn group_change(
        &mut self,
        conv: ConvId,
        members: &[Uid],
        join: bool,
        now_ms: u64,
    ) -> Result<ConvInfo, Failure> {
        check_request(members)?;
        let c = self.local_conv(conv)?;
        if c.kind() != ConvKind::Group {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "conversation {conv} is not a group (a shop conversation's members are its \
                     agents' assignments; a direct one's are fixed)"
                ),
            ));
        }
        let current: AHashSet<Uid> = c.members().iter().copied().collect();
        let changed: Vec<Uid> = if join {
            distinct(members)
                .into_iter()
                .filter(|u| !current.contains(u))
                .collect()
        } else {
            if let Some(stranger) = members.iter().find(|u| !current.contains(u)) {
                return Err((
                    ErrorCode::NotMember,
                    format!("{stranger} is not a member of conversation {conv}"),
                ));
            }
            distinct(members)
        };
        let max = self.members_max();
        if join && current.len() + changed.len() > max {
            return Err(too_many(current.len() + changed.len(), max));
        }
        let log = self.conv_log_mut(conv).map_err(store_error)?;
        for &uid in &changed {
            let stored = if join {
                log.add_member(conv, uid, now_ms)
            } else {
                log.remove_member(conv, uid, now_ms)
            };
            stored.map_err(store_error)?;
        }
        if !changed.is_empty() {
            let (added, removed) = if join {
                (&changed[..], &[][..])
            } else {
                (&[][..], &changed[..])
            };
            self.announce_members(conv, added, removed);
        }
        self.conv_info(conv, false)
    }

    /// Pushes a change of `conv`'s members to its members and to those who left: the whole
    /// list for a small group, the change for a large one.
    fn announce_members(&mut self, conv: ConvId, added: &[Uid], removed: &[Uid]) {
        let members = self.members(conv);
        let message = if members.len() <= GROUP_FULL_LIST_MAX {
            Message::Members(Members {
                conv,
                members: members.to_vec(),
                profiles: self.member_profiles(conv, &members),
            })
        } else {
            Message::MembersDelta(MembersDelta {
                conv,
                added: added.to_vec(),
                removed: removed.to_vec(),
                // Within u16 (members_max ≤ 65,535, checked by the store's config).
                count: members.len() as u32,
            })
        };
        let mut users: SmallVec<[Uid; 4]> = members;
        users.extend_from_slice(removed);
        self.fanout(Fanout::new(users, None, message));
    }

    /// What a service sees of any conversation this shard owns.
    fn conv_info(&self, conv: ConvId, created: bool) -> Result<ConvInfo, Failure> {
        let c = self.local_conv(conv)?;
        let count = c.members().len();
        Ok(ConvInfo {
            conv,
            conv_type: conv_type(c),
            key: c.group_key(),
            members: if count <= GROUP_FULL_LIST_MAX {
                c.members().to_vec()
            } else {
                Vec::new()
            },
            member_count: count as u32,
            last_seq: c.last_seq(),
            created,
        })
    }
}

fn check_request(members: &[Uid]) -> Result<(), Failure> {
    if members.len() > GROUP_MEMBERS_PER_REQUEST_MAX {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "{} users in one request; at most {GROUP_MEMBERS_PER_REQUEST_MAX}",
                members.len()
            ),
        ));
    }
    Ok(())
}

fn too_many(count: usize, max: usize) -> Failure {
    (
        ErrorCode::TooLarge,
        format!("the group would have {count} members; at most {max} (members_max)"),
    )
}

/// `members` without repeats, in their first order.
fn distinct(members: &[Uid]) -> Vec<Uid> {
    let mut seen = AHashSet::with_capacity(members.len());
    members
        .iter()
        .copied()
        .filter(|u| seen.insert(*u))
        .collect()
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::limits::GROUP_FULL_LIST_MAX;
    use chinwag_protocol::{ConvId, ConvType, Cursor, ErrorCode, Seq, Target, Uid};

    use crate::bus::{placement::GroupKey, BusMsg, GroupOp};
    use crate::logic::testing::*;

    fn buyers(ids: std::ops::Range<u64>) -> Vec<Uid> {
        ids.map(buyer).collect()
    }

    /// A key whose group the owner under test owns.
    fn local_key(from: u64) -> u64 {
        (from..)
            .find(|k| test_map().shard_of(&GroupKey(*k)) == Some(OWNER_SHARD))
            .expect("some key hashes to the owner")
    }

    #[test]
    fn a_group_is_created_once_per_key_and_its_members_hear_of_it() {
        let mut h = Harness::new();
        let key = local_key(1);
        let members = buyers(1..4);
        let (out, info) = h.group(GroupOp::Create {
            key,
            members: members.clone(),
        });
        let info = info.expect("created");
        assert!(info.created);
        assert_eq!(info.conv_type, ConvType::Group);
        assert_eq!(info.key, Some(key));
        assert_eq!(
            (info.members.clone(), info.member_count),
            (members.clone(), 3)
        );
        assert_eq!(info.last_seq, Seq(0));
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].0, [0, 1], "to every shard");
        assert_eq!(pushed[0].1, members);
        assert!(pushed[0].3.contains(r#""op":"members""#), "{pushed:?}");

        // Again with the same key (a retry): the same group, nothing stored or pushed.
        let (out, again) = h.group(GroupOp::Create {
            key,
            members: buyers(7..9),
        });
        let again = again.expect("answered");
        assert!(!again.created);
        assert_eq!((again.conv, again.members), (info.conv, members));
        assert!(pushes(&out).is_empty());

        // It survives a restart, key included.
        h.restart();
        let (_, found) = h.group(GroupOp::Create {
            key,
            members: vec![],
        });
        assert_eq!(found.expect("found").conv, info.conv);
    }

    #[test]
    fn members_send_to_every_member_and_others_cannot() {
        let mut h = Harness::new();
        let (a, b, c) = (h.login(buyer(1)), h.login(agent(2)), h.login(buyer(3)));
        let conv = h.create_group(local_key(1), vec![a.uid, b.uid]);
        let out = h.turn(send(&a, Target::Conv(conv), "m1", "hello group"));
        assert_eq!(send_ok(&replies(&out, a.session)), (conv, 1));
        let pushed = pushes(&out);
        assert_eq!(pushed[0].1, [a.uid, b.uid]);
        assert!(pushed[0].3.contains(r#""body":"hello group""#));

        let out = h.turn(send(&c, Target::Conv(conv), "m2", "let me in"));
        assert!(replies(&out, c.session)[0].contains(r#""code":"not_member""#));

        // Added, c writes and reads; removed, it no longer does.
        h.group(GroupOp::Add {
            conv,
            members: vec![c.uid],
        })
        .1
        .expect("added");
        let out = h.turn(send(&c, Target::Conv(conv), "m3", "thanks"));
        assert_eq!(send_ok(&replies(&out, c.session)), (conv, 2));
        let (out, info) = h.group(GroupOp::Remove {
            conv,
            members: vec![c.uid],
        });
        assert_eq!(info.expect("removed").members, [a.uid, b.uid]);
        let pushed = pushes(&out);
        assert_eq!(
            pushed[0].1,
            [a.uid, b.uid, c.uid],
            "the removed user hears it"
        );
        assert!(pushed[0]
            .3
            .contains(&format!(r#""members":["{}","{}"]"#, a.uid, b.uid)));
        let out = h.turn(send(&c, Target::Conv(conv), "m4", "still here?"));
        assert!(replies(&out, c.session)[0].contains(r#""code":"not_member""#));
    }

    #[test]
    fn bad_requests_store_nothing() {
        let mut h = Harness::new();
        let conv = h.create_group(local_key(1), buyers(1..3));

        let refused = |h: &mut Harness, op: GroupOp, code: ErrorCode| {
            let (out, result) = h.group(op);
            let (got, text) = result.expect_err("refused");
            assert_eq!(got, code, "{text}");
            assert!(pushes(&out).is_empty());
        };
        // Removing a user who is not a member, even beside one who is: nothing changes.
        refused(
            &mut h,
            GroupOp::Remove {
                conv,
                members: vec![buyer(1), buyer(9)],
            },
            ErrorCode::NotMember,
        );
        refused(
            &mut h,
            GroupOp::Create {
                key: local_key(100),
                members: vec![buyer(1), buyer(1)],
            },
            ErrorCode::BadRequest,
        );
        refused(
            &mut h,
            GroupOp::Add {
                conv: ConvId(conv.0 + (1 << 8)),
                members: vec![buyer(5)],
            },
            ErrorCode::NotFound,
        );
        // A conversation of a partition not served here (past the count) is not found.
        refused(
            &mut h,
            GroupOp::Info {
                conv: ConvId((conv.0 & !0xffff) | PARTITIONS as u64),
            },
            ErrorCode::NotFound,
        );
        refused(
            &mut h,
            GroupOp::Add {
                conv,
                members: buyers(0..1_001),
            },
            ErrorCode::TooLarge,
        );
        // Over members_max (1,000 in the tests' store): refused whole.
        h.group(GroupOp::Add {
            conv,
            members: buyers(100..1_098),
        })
        .1
        .expect("up to the limit");
        refused(
            &mut h,
            GroupOp::Add {
                conv,
                members: buyers(2_000..2_002),
            },
            ErrorCode::TooLarge,
        );
        // A shop conversation's members are not the service's to set.
        let customer = h.login(buyer(1));
        let out = h.turn(send(
            &customer,
            Target::Shop(chinwag_protocol::ShopId(5)),
            "s",
            "hi",
        ));
        let (shop_conv, _) = send_ok(&replies(&out, customer.session));
        refused(
            &mut h,
            GroupOp::Add {
                conv: shop_conv,
                members: vec![agent(3)],
            },
            ErrorCode::BadRequest,
        );

        let (_, info) = h.group(GroupOp::Info { conv });
        let info = info.expect("info");
        assert_eq!(info.member_count, 1_000);
        assert!(
            info.members.is_empty(),
            "a large group's info gives the count"
        );
        assert!(!info.members.contains(&buyer(9)));
        let (_, shop_info) = h.group(GroupOp::Info { conv: shop_conv });
        let shop_info = shop_info.expect("any conversation's info");
        assert_eq!(
            shop_info.conv_type,
            ConvType::Shop(chinwag_protocol::ShopId(5))
        );
        assert_eq!((shop_info.last_seq, shop_info.key), (Seq(1), None));
    }

    #[test]
    fn a_large_group_gets_deltas_and_no_receipts_to_other_members() {
        let mut h = Harness::new();
        let reader = h.login(buyer(0));
        let writer = h.login(buyer(1));
        let mut members = buyers(0..GROUP_FULL_LIST_MAX as u64);
        let conv = h.create_group(local_key(1), members.clone());

        // Growing past the size: the push names the change, not the list.
        let (out, info) = h.group(GroupOp::Add {
            conv,
            members: vec![agent(1), agent(2)],
        });
        assert_eq!(
            info.expect("added").member_count,
            GROUP_FULL_LIST_MAX as u32 + 2
        );
        let pushed = pushes(&out);
        let text = &pushed[0].3;
        assert!(text.contains(r#""op":"members_delta""#), "{text}");
        assert!(
            text.contains(r#""added":["agent:1","agent:2"],"removed":[],"count":202"#),
            "{text}"
        );
        members.extend([agent(1), agent(2)]);
        assert_eq!(pushed[0].1, members);

        let out = h.turn(send(&writer, Target::Conv(conv), "m", "news"));
        assert_eq!(
            pushes(&out)[0].1.len(),
            GROUP_FULL_LIST_MAX + 2,
            "msg to all"
        );
        let out = h.turn(BusMsg::Read {
            origin: Box::new(reader),
            cursor: Cursor { conv, seq: Seq(1) },
        });
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].1, [reader.uid], "only the reader's own devices");
        assert_eq!(pushed[0].2, Some(reader.device));
        assert!(pushed[0].3.contains(r#""op":"receipt""#));

        // Shrinking back to the size: the whole list again.
        let (out, _) = h.group(GroupOp::Remove {
            conv,
            members: vec![agent(1), agent(2)],
        });
        let text = &pushes(&out)[0].3;
        assert!(text.contains(r#""op":"members","#), "{text}");
    }

    /// A `convs` entry of a large group gives the member count, not the list.
    #[test]
    fn convs_lists_a_small_groups_members_and_counts_a_large_ones() {
        let mut h = Harness::new();
        let member = h.login(buyer(0));
        let conv = h.create_group(local_key(1), buyers(0..GROUP_FULL_LIST_MAX as u64));
        let entry = |h: &mut Harness| {
            let out = h.turn(BusMsg::Convs {
                origin: Box::new(member),
                token: 1,
                partitions: 1,
            });
            out.into_iter()
                .find_map(|(_, msg)| match msg {
                    BusMsg::ConvsPart { convs, .. } => {
                        convs.into_iter().flatten().find(|c| c.conv == conv)
                    }
                    _ => None,
                })
                .expect("the group is among the member's conversations")
        };
        let small = entry(&mut h);
        assert_eq!(small.members.len(), GROUP_FULL_LIST_MAX);
        assert_eq!(small.member_count, GROUP_FULL_LIST_MAX as u32);

        let (_, added) = h.group(GroupOp::Add {
            conv,
            members: vec![agent(1)],
        });
        added.expect("added");
        let large = entry(&mut h);
        assert!(large.members.is_empty(), "{:?}", large.members.len());
        assert_eq!(large.member_count, GROUP_FULL_LIST_MAX as u32 + 1);
    }

    /// Issue 10's rule for services: a group change whose commit fails is answered
    /// `unavailable` and pushes nothing.
    #[test]
    fn a_failed_commit_answers_the_service_unavailable() {
        let mut h = Harness::new();
        h.fail_next_commit();
        let (out, result) = h.group(GroupOp::Create {
            key: local_key(1),
            members: buyers(1..3),
        });
        assert_eq!(result.expect_err("not done").0, ErrorCode::Unavailable);
        assert!(pushes(&out).is_empty());
    }
}
