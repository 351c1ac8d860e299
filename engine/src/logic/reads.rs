//! Reads that change nothing: `history` pages (kept within the reply budget) and this shard's
//! part of a user's `convs` list.

use std::borrow::Cow;

use chinwag_protocol::{
    ConvSummary, ConvType, ErrorCode, History, HistoryOk, HistoryRange, Message, Msg, Uid,
};

use chinwag_protocol::limits::GROUP_FULL_LIST_MAX;

use super::{store_error, Owner};
use crate::bus::{
    reply_size, Origin, PartitionId, SessionRef, StreamFound, StreamPart, StreamRefused, STREAM_NOW,
};
use crate::store::{
    ConvKind, Conversation, HistoryFrom, MessageRef, ScanError, StoreError, STREAM_EVENT_BYTES,
};

/// Log records one stream read looks at, so one subscriber's read is a bounded share of a
/// shard's turn.
const STREAM_RECORDS_MAX: usize = 1024;

impl Owner {
    pub(super) fn history(
        &self,
        origin: &Origin,
        history: History,
    ) -> Result<Message<'static>, (ErrorCode, String)> {
        let conv = history.conv;
        self.readable_conv(conv, origin)?;
        let from = match history.range {
            HistoryRange::Newest => HistoryFrom::Newest,
            HistoryRange::Before(seq) => HistoryFrom::Before(seq),
            HistoryRange::After(seq) => HistoryFrom::After(seq),
        };
        let page = self
            .conv_log(conv)
            .ok_or(StoreError::UnknownConv(conv))
            .and_then(|log| log.history(conv, from, usize::from(history.limit)))
            .map_err(store_error)?;
        // A page must fit the connection's send queue, or asking for it would get the client
        // disconnected: keep the messages nearest the anchor within the byte budget and let
        // the client page on (the contract's `limit` is a maximum).
        let size = |m: &MessageRef<'_>| reply_size::msg_bytes(m.kind, m.body, m.cmid);
        let mut budget = self.reply_bytes_max;
        let mut fits = |m: &MessageRef<'_>| {
            let fits = size(m) <= budget;
            budget = budget.saturating_sub(size(m));
            fits
        };
        let keep = match history.range {
            // Ascending from the anchor: keep a prefix.
            HistoryRange::After(_) => page.iter().take_while(|m| fits(m)).count(),
            // Descending from the anchor: keep a suffix.
            HistoryRange::Newest | HistoryRange::Before(_) => {
                page.iter().rev().take_while(|m| fits(m)).count()
            }
        };
        // Always at least one message, so a client can page past any single message.
        let keep = keep.max(1).min(page.len());
        let kept = match history.range {
            HistoryRange::After(_) => &page[..keep],
            HistoryRange::Newest | HistoryRange::Before(_) => &page[page.len() - keep..],
        };
        let msgs = kept.iter().map(to_msg).collect();
        Ok(Message::HistoryOk(HistoryOk { conv, msgs }))
    }

    /// The next messages and member and cursor changes of this shard's partitions' logs for a
    /// service's stream, from the
    /// position `from` gives each ([`STREAM_NOW`]: none, just the position of the log's end;
    /// 0: the start). One read looks at most at [`STREAM_RECORDS_MAX`] records over all the
    /// partitions (taking them in turn from the first with something new); a partition not
    /// reached keeps its position. A partition with no log yet is at 0, its start.
    pub(super) fn stream_read(
        &self,
        session: SessionRef,
        from: &[(PartitionId, u64)],
    ) -> StreamPart {
        let mut msgs = Vec::new();
        let mut events = Vec::new();
        let mut next = Vec::with_capacity(from.len());
        let mut records = STREAM_RECORDS_MAX;
        let mut bytes = self.reply_bytes_max / 4;
        let mut result = Ok(());
        for &(p, pos) in from {
            if self.map.shard_of_partition(u32::from(p)) != Some(self.shard) {
                result = Err(scan_text(ScanError::NotOurs));
                break;
            }
            if self.lease_lapsed(u32::from(p)) {
                result = Err(crate::bus::STREAM_NOT_LED);
                break;
            }
            let Some(log) = self.log(p) else {
                // No log: nothing was ever stored there, and its first record will be at the
                // start.
                if pos != STREAM_NOW && pos != 0 {
                    result = Err(scan_text(ScanError::NotOurs));
                    break;
                }
                next.push((p, 0));
                continue;
            };
            let read = if pos == STREAM_NOW {
                log.scan(log.acked(), 0, 0)
                    .map(|found| (Vec::new(), Vec::new(), found.next))
            } else if records == 0 || bytes == 0 {
                Ok((Vec::new(), Vec::new(), pos))
            } else {
                log.scan(pos, records, bytes)
                    .map(|found| (found.messages, found.events, found.next))
            };
            match read {
                Ok((found, changes, end)) => {
                    // The records looked at are not counted one by one: what was found
                    // (messages, events, bytes) stands for them, and at least one is used per
                    // read.
                    records = records.saturating_sub((found.len() + changes.len()).max(1));
                    let size: usize = found
                        .iter()
                        .map(|m| m.body.len() + m.kind.len() + m.cmid.len())
                        .sum::<usize>()
                        + changes.len() * STREAM_EVENT_BYTES;
                    bytes = bytes.saturating_sub(size);
                    msgs.extend(found.iter().map(to_msg));
                    events.extend(changes);
                    next.push((p, end));
                }
                Err(e) => {
                    result = Err(scan_text(e));
                    break;
                }
            }
        }
        StreamPart {
            session,
            shard: self.shard,
            result: result
                .map(|()| StreamFound { msgs, events, next })
                .map_err(|text| StreamRefused {
                    text,
                    from: from.to_vec(),
                }),
        }
    }

    /// This shard's part of `uid`'s conversation list: the conversations in its partitions.
    pub(super) fn convs_of(&self, uid: Uid) -> Vec<ConvSummary<'static>> {
        self.open_logs()
            .flat_map(|(_, log)| log.convs_of(uid).iter().map(move |&id| (log, id)))
            .filter_map(|(log, id)| {
                let c = log.conv(id)?;
                let last_seq = c.last_seq();
                let read_seq = c.cursor(uid);
                let last = log
                    .history(id, HistoryFrom::Newest, 1)
                    .ok()
                    .and_then(|m| m.first().map(to_msg));
                let members = c.members();
                Some(ConvSummary {
                    conv: id,
                    conv_type: conv_type(c),
                    // A large group's entry gives the count, not the list (docs/protocol.md,
                    // "convs"): one member of a 10,000-member group would otherwise be sent
                    // 160 kB at every `convs`.
                    members: if members.len() <= GROUP_FULL_LIST_MAX {
                        members.to_vec()
                    } else {
                        Vec::new()
                    },
                    // Within u16 (members_max ≤ 65,535, checked by the store's config).
                    member_count: members.len() as u32,
                    last_seq,
                    read_seq,
                    unread: last_seq.0.saturating_sub(read_seq.0),
                    last,
                    profile: self.conv_profile(id),
                    profiles: self.member_profiles(id, c.members()),
                })
            })
            .collect()
    }
}

/// A conversation's type as the protocol names it.
pub(super) fn conv_type(c: &Conversation) -> ConvType {
    match (c.kind(), c.shop()) {
        (ConvKind::Shop, Some(shop)) => ConvType::Shop(shop),
        (ConvKind::Group, _) => ConvType::Group,
        _ => ConvType::Direct,
    }
}

/// A stored message as the protocol shows it. The store keeps what the protocol decoded as
/// UTF-8; a record that somehow is not shows with replacement characters rather than failing
/// the whole page.
pub(super) fn to_msg(m: &MessageRef<'_>) -> Msg<'static> {
    let text = |bytes: &[u8]| Cow::Owned(String::from_utf8_lossy(bytes).into_owned());
    Msg {
        conv: m.conv,
        seq: m.seq,
        from: m.sender,
        ts: m.ts_ms,
        kind: text(m.kind),
        body: text(m.body),
        cmid: text(m.cmid),
    }
}

/// What a subscriber is told of a position the log cannot read from.
fn scan_text(e: ScanError) -> &'static str {
    match e {
        ScanError::Retired => "the resume position was deleted by log retention",
        ScanError::NotOurs => "not a resume position of this node",
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{json, ConvId, History, HistoryRange, Message, Seq, Target};

    use crate::bus::{BusMsg, Origin};
    use crate::logic::testing::*;

    fn page(h: &mut Harness, origin: &Origin, conv: ConvId, range: HistoryRange) -> Vec<u64> {
        let out = h.turn(BusMsg::History {
            origin: Box::new(*origin),
            history: History {
                conv,
                range,
                limit: 10,
            },
        });
        let texts = replies(&out, origin.session);
        match json::decode(&texts[0]).expect("a JSON reply").message {
            Message::HistoryOk(ok) => ok.msgs.iter().map(|m| m.seq.0).collect(),
            other => panic!("not history_ok: {other:?}"),
        }
    }

    #[test]
    fn history_pages_keep_the_messages_nearest_the_anchor_within_the_reply_budget() {
        // Each 300-byte message costs 160 + 300 + its kind and cmid: two fit in 1,000 bytes.
        let mut h = Harness::with_reply_bytes_max(1000);
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let mut conv = ConvId(0);
        for cmid in ["1", "2", "3", "4", "5"] {
            let out = h.turn(send(&a, Target::User(b.uid), cmid, &"x".repeat(300)));
            conv = send_ok(&replies(&out, a.session)).0;
        }
        assert_eq!(page(&mut h, &b, conv, HistoryRange::Newest), [4, 5]);
        assert_eq!(page(&mut h, &b, conv, HistoryRange::Before(Seq(4))), [2, 3]);
        assert_eq!(page(&mut h, &b, conv, HistoryRange::After(Seq(0))), [1, 2]);

        // One message over the whole budget still comes, alone, so a client can page past it.
        let out = h.turn(send(&a, Target::Conv(conv), "6", &"y".repeat(2000)));
        assert_eq!(send_ok(&replies(&out, a.session)).1, 6);
        assert_eq!(page(&mut h, &b, conv, HistoryRange::Newest), [6]);
    }

    #[test]
    fn history_is_for_members_only() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let c = h.login(buyer(3));
        let out = h.turn(send(&a, Target::User(b.uid), "1", "x"));
        let (conv, _) = send_ok(&replies(&out, a.session));
        let out = h.turn(BusMsg::History {
            origin: Box::new(c),
            history: History {
                conv,
                range: HistoryRange::Newest,
                limit: 10,
            },
        });
        assert!(replies(&out, c.session)[0].contains(r#""code":"not_member""#));

        // A service reads any conversation, and gets the service op's reply.
        let service = Origin {
            uid: chinwag_protocol::Uid::new(chinwag_protocol::UidKind::Service, 9),
            service: true,
            ..c
        };
        let out = h.turn(BusMsg::History {
            origin: Box::new(service),
            history: History {
                conv,
                range: HistoryRange::Newest,
                limit: 10,
            },
        });
        let reply = &replies(&out, c.session)[0];
        assert!(reply.starts_with(r#"{"op":"conv_history_ok""#), "{reply}");
        assert!(reply.contains(r#""body":"x""#), "{reply}");
    }

    #[test]
    fn convs_gives_this_shards_conversations_of_the_user_with_unread_counts() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let c = h.login(buyer(3));
        h.turn(send(&b, Target::User(a.uid), "1", "from b"));
        h.turn(send(&b, Target::User(a.uid), "2", "from b again"));
        h.turn(send(&c, Target::User(a.uid), "3", "from c"));
        let out = h.turn(BusMsg::Convs {
            origin: Box::new(a),
            token: 7,
            partitions: 1,
        });
        let parts: Vec<_> = out
            .iter()
            .filter_map(|(shard, msg)| match msg {
                BusMsg::ConvsPart {
                    session,
                    token,
                    convs: Some(convs),
                    ..
                } => Some((*shard, *session, *token, convs)),
                _ => None,
            })
            .collect();
        assert_eq!(parts.len(), 1);
        let (shard, session, token, convs) = &parts[0];
        assert_eq!(
            (*shard, *session, *token),
            (SESSION_SHARD as usize, a.session, 7)
        );
        let mut unread: Vec<_> = convs
            .iter()
            .map(|c| {
                (
                    c.last_seq.0,
                    c.unread,
                    c.last.as_ref().map(|m| m.body.to_string()),
                )
            })
            .collect();
        unread.sort();
        assert_eq!(
            unread,
            [
                (1, 1, Some("from c".to_string())),
                (2, 2, Some("from b again".to_string()))
            ]
        );
    }

    /// The stream carries membership and read-cursor changes beside the messages, each placed
    /// among them in log order.
    #[test]
    fn the_stream_reads_member_and_cursor_changes_among_the_messages() {
        use chinwag_protocol::{Cursor, ShopId, StreamChange, StreamEvent};
        let mut h = Harness::new();
        let support = h.login(agent(9));
        h.turn(BusMsg::AgentOnline {
            shop: ShopId(5),
            agent: support.uid,
            profile: None,
        });
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(ShopId(5)), "1", "hi"));
        let (conv, _) = send_ok(&replies(&out, customer.session));
        let assigned_ms = h.now_ms;
        h.turn(send(&support, Target::Conv(conv), "2", "hello"));
        h.turn(BusMsg::Read {
            origin: Box::new(customer),
            cursor: Cursor { conv, seq: Seq(2) },
        });
        h.turn(BusMsg::Resolve {
            origin: Box::new(support),
            conv,
        });
        let resolved_ms = h.now_ms;

        let out = h.turn(BusMsg::StreamRead {
            session: customer.session,
            // Every partition from the start of its log.
            from: (0..PARTITIONS as u16).map(|p| (p, 0)).collect(),
        });
        let Some(BusMsg::StreamPart(part)) = out.into_iter().map(|(_, m)| m).next() else {
            panic!("expected a stream part");
        };
        let found = part.result.expect("the start of the log is a position");
        let seqs: Vec<u64> = found.msgs.iter().map(|m| m.seq.0).collect();
        assert_eq!(seqs, [1, 2]);
        let event = |after_msgs, uid, change| StreamEvent {
            after_msgs,
            conv,
            uid,
            change,
        };
        assert_eq!(
            found.events,
            [
                event(0, customer.uid, StreamChange::Joined { ts: 0 }),
                event(0, support.uid, StreamChange::Joined { ts: assigned_ms }),
                event(2, customer.uid, StreamChange::Read { seq: Seq(2) }),
                event(2, support.uid, StreamChange::Left { ts: resolved_ms }),
            ]
        );
    }
}
