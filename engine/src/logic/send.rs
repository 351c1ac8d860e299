//! `send`: finding or creating the conversation, storing the message (seq = last + 1, a
//! repeated `cmid` answered with the original's seq), `send_ok`, and the `msg` push to every
//! other device of every member.

use chinwag_protocol::{ConvId, ErrorCode, Message, Msg, SendOk, Target, UidKind};

use super::dispatch::Decision;
use super::{store_error, Owner};
use crate::bus::partitions::conv_id;
use crate::bus::{user_pair, Fanout, Origin, PartitionId};
use crate::store::{Appended, NewMessage, Store, StoreError, StoredProfile};

impl Owner {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        origin: &Origin,
        target: Target,
        cmid: &str,
        kind: &str,
        body: &str,
        profile: Option<&StoredProfile>,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        let uid = origin.uid;
        let conv = match target {
            Target::Conv(conv) => {
                self.member_conv(conv, uid)?;
                conv
            }
            Target::Shop(shop) => {
                if !uid.kind.is_customer() {
                    return Err((
                        ErrorCode::BadRequest,
                        "only buyers and wechat customers write to a shop; agents use conv".into(),
                    ));
                }
                let p = self.map.partition_of(&shop);
                let existing = self.log(p).and_then(|log| log.shop_conv(shop, uid));
                self.find_or_create(p, existing, |store, conv| {
                    store.create_shop_conv(conv, shop, uid)
                })?
            }
            Target::User(other) => {
                if other == uid {
                    return Err((
                        ErrorCode::BadRequest,
                        "a direct conversation needs two users".into(),
                    ));
                }
                let p = self.map.partition_of(&user_pair(uid, other));
                let existing = self.log(p).and_then(|log| log.direct_conv(uid, other));
                self.find_or_create(p, existing, |store, conv| {
                    store.create_direct_conv(conv, uid, other)
                })?
            }
        };

        // Before the assignment and the message, so their pushes carry the profile the
        // sender brought.
        let partition = PartitionId::try_from(crate::bus::partitions::partition_of_conv(conv))
            .map_err(|_| store_error(StoreError::UnknownConv(conv)))?;
        self.keep_profile(partition, uid, profile)
            .map_err(store_error)?;
        let message = NewMessage {
            conv,
            sender: uid,
            device: origin.device,
            cmid: cmid.as_bytes(),
            kind: kind.as_bytes(),
            body: body.as_bytes(),
            ts_ms: now_ms,
        };
        // A repeated cmid only gets its original's answer: no dispatch, no assignment.
        if uid.kind.is_customer()
            && self
                .conv_log(conv)
                .ok_or(StoreError::UnknownConv(conv))
                .and_then(|log| log.duplicate_of(&message))
                .map_err(store_error)?
                .is_none()
        {
            self.serve_customer(conv, now_ms)?;
        }

        let appended = self
            .conv_log_mut(conv)
            .and_then(|log| log.append_message(&message))
            .map_err(store_error)?;
        match appended {
            Appended::Stored { seq } => {
                self.messages_stored += 1;
                let ok = origin.reply(Message::SendOk(SendOk {
                    conv,
                    seq,
                    ts: now_ms,
                }));
                self.ack_send(origin, ok);
                let members = self.members(conv);
                let push = self.msg_push(Msg {
                    conv,
                    seq,
                    from: uid,
                    ts: now_ms,
                    kind: kind.into(),
                    body: body.into(),
                    cmid: cmid.into(),
                });
                self.fanout(Fanout::new(members, Some(origin.device), push));
                if uid.kind == UidKind::Agent {
                    self.wechat_reply(conv, seq, kind, body, now_ms);
                }
            }
            Appended::Duplicate { seq, ts_ms } => {
                // The conversation is the one this request named or resolved to: the window
                // is keyed by conversation.
                let ok = origin.reply(Message::SendOk(SendOk {
                    conv,
                    seq,
                    ts: ts_ms,
                }));
                self.ack_send(origin, ok);
            }
        }
        Ok(())
    }

    /// Customer service: makes sure an online agent serves the shop conversation `conv`
    /// before a customer's message goes out, so a newly assigned agent gets `members` and then
    /// the `msg`.
    pub(super) fn serve_customer(
        &mut self,
        conv: ConvId,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        if let Some((shop, agents)) = self.shop_agents(conv) {
            if let Decision::Assign(agent) = self.dispatcher.customer_message(shop, conv, &agents) {
                self.assign(conv, agent, now_ms).map_err(store_error)?;
            }
        }
        Ok(())
    }

    /// `existing`, or a new conversation of partition `p` with its next id, created by
    /// `create` (the partition's log is opened if this is its first write).
    pub(super) fn find_or_create(
        &mut self,
        p: PartitionId,
        existing: Option<ConvId>,
        create: impl FnOnce(&mut Store, ConvId) -> Result<(), StoreError>,
    ) -> Result<ConvId, (ErrorCode, String)> {
        if let Some(conv) = existing {
            return Ok(conv);
        }
        let partition = self.partition_mut(p).map_err(store_error)?;
        let conv = conv_id(partition.conv_counter, p);
        partition.conv_counter += 1;
        create(&mut partition.store, conv).map_err(store_error)?;
        Ok(conv)
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, History, HistoryRange, Target};

    use crate::bus::BusMsg;
    use crate::logic::testing::*;

    #[test]
    fn a_send_is_stored_acknowledged_and_pushed_once_to_every_shard() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let out = h.turn(send(&a, Target::User(b.uid), "c1", "hello"));
        let (conv, seq) = send_ok(&replies(&out, a.session));
        assert_eq!(seq, 1);
        let p = test_map().partition_of(&crate::bus::user_pair(a.uid, b.uid));
        assert_eq!(
            conv,
            crate::bus::partitions::conv_id(1, p),
            "the first conversation of the pair's partition"
        );
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        let (shards, users, except, text) = &pushed[0];
        assert_eq!(shards, &[0, 1], "a push goes to every shard");
        assert_eq!(users, &[a.uid, b.uid]);
        assert_eq!(*except, Some(a.device), "not back to the sending device");
        assert!(text.contains(r#""op":"msg""#) && text.contains(r#""body":"hello""#));

        // The same pair writes into the same conversation; seqs go on.
        let out = h.turn(send(&b, Target::User(a.uid), "c2", "hi"));
        assert_eq!(send_ok(&replies(&out, b.session)), (conv, 2));
        let out = h.turn(send(&a, Target::Conv(conv), "c3", "again"));
        assert_eq!(send_ok(&replies(&out, a.session)), (conv, 3));
    }

    #[test]
    fn a_repeated_cmid_is_answered_with_the_first_seq_and_not_pushed_again() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let first = h.turn(send(&a, Target::User(b.uid), "same", "hello"));
        let again = h.turn(send(&a, Target::User(b.uid), "same", "hello"));
        assert_eq!(
            send_ok(&replies(&again, a.session)),
            send_ok(&replies(&first, a.session))
        );
        assert!(pushes(&again).is_empty());
    }

    #[test]
    fn only_members_write_and_unknown_conversations_are_not_found() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let c = h.login(buyer(3));
        let out = h.turn(send(&a, Target::User(b.uid), "c1", "hello"));
        let (conv, _) = send_ok(&replies(&out, a.session));

        let out = h.turn(send(&c, Target::Conv(conv), "c2", "intruder"));
        let texts = replies(&out, c.session);
        assert!(texts[0].contains(r#""code":"not_member""#), "{texts:?}");
        assert!(pushes(&out).is_empty());

        let out = h.turn(send(&a, Target::Conv(ConvId(99 << 8)), "c3", "x"));
        assert!(replies(&out, a.session)[0].contains(r#""code":"not_found""#));

        let out = h.turn(send(&a, Target::User(a.uid), "c4", "me"));
        assert!(replies(&out, a.session)[0].contains(r#""code":"bad_request""#));
    }

    /// Issue 10: a commit that fails turns the turn's acknowledgements into `unavailable` and
    /// drops its pushes, while a reply that did not depend on the log still goes out.
    #[test]
    fn a_failed_commit_answers_unavailable_and_drops_the_turns_pushes() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let c = h.login(buyer(3));
        let out = h.turn(send(&a, Target::User(b.uid), "c1", "stored"));
        let (conv, _) = send_ok(&replies(&out, a.session));

        h.fail_next_commit();
        h.owner
            .handle(send(&a, Target::Conv(conv), "c2", "lost"), h.now_ms);
        h.owner
            .handle(send(&b, Target::Conv(conv), "c3", "lost too"), h.now_ms);
        h.owner.handle(
            BusMsg::History {
                origin: Box::new(c),
                history: History {
                    conv,
                    range: HistoryRange::Newest,
                    limit: 10,
                },
            },
            h.now_ms,
        );
        let out = h.commit();
        for origin in [&a, &b] {
            let texts = replies(&out, origin.session);
            assert_eq!(texts.len(), 1, "{texts:?}");
            assert!(texts[0].contains(r#""code":"unavailable""#), "{texts:?}");
            assert!(
                texts[0].contains(r#""req":1"#),
                "answers the request: {texts:?}"
            );
        }
        assert!(
            pushes(&out).is_empty(),
            "nothing is announced that was not stored"
        );
        let refused = replies(&out, c.session);
        assert!(refused[0].contains(r#""code":"not_member""#), "{refused:?}");
        assert_eq!(h.owner.commit_failures, 1);

        // The next turn commits again.
        let out = h.turn(send(&a, Target::Conv(conv), "c4", "back"));
        assert!(replies(&out, a.session)[0].contains(r#""op":"send_ok""#));
        assert_eq!(pushes(&out).len(), 1);
    }
}
