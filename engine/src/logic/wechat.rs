//! The WeChat channel at the owner: a customer's message from WeChat stored and dispatched as a
//! buyer's; an agent's text reply in a conversation with a WeChat customer handed to the sender
//! once the turn is committed; a reply that did not reach WeChat turned into a notice in its
//! conversation (kind `wechat_undelivered`, from `service:0`), so every agent there learns it,
//! now or from `history`.

use chinwag_protocol::{ConvId, DeviceId, Msg, Seq, ShopId, Uid, UidKind};

use super::Owner;
use crate::bus::{Fanout, WechatUndelivered};
use crate::store::{Appended, NewMessage};
use crate::wechat::channel::ReplyTag;
use crate::wechat::endpoint::Inbound;
use crate::wechat::sender::{Reason, Undelivered, NOTICE_KIND};

/// The sender of notices: the system, not a person.
pub const NOTICE_SENDER: Uid = Uid::new(UidKind::Service, 0);
/// WeChat customers and notices have no device; their messages carry id 0, which the
/// generator never hands out (its ids carry a non-zero time).
fn no_device() -> DeviceId {
    DeviceId::from_u64(0).expect("0 is a well-formed device id")
}

/// An agent's reply waiting for the turn's commit before it goes to WeChat.
pub(super) struct PendingReply {
    pub customer: u64,
    pub content: String,
    pub tag: ReplyTag,
}

impl Owner {
    /// Stores a WeChat customer's message in their conversation with the shop and dispatches
    /// it as a buyer's. A retried push (same cmid) is not stored again.
    pub(super) fn wechat_inbound(&mut self, inbound: Inbound, now_ms: u64) {
        let uid = Uid::new(UidKind::Wechat, inbound.customer);
        let shop = ShopId(inbound.shop);
        let p = self.map.partition_of(&shop);
        let existing = self.log(p).and_then(|log| log.shop_conv(shop, uid));
        let stored = self
            .find_or_create(p, existing, |store, conv| {
                store.create_shop_conv(conv, shop, uid)
            })
            .and_then(|conv| {
                let message = NewMessage {
                    conv,
                    sender: uid,
                    device: no_device(),
                    cmid: inbound.cmid.as_bytes(),
                    kind: inbound.kind.as_bytes(),
                    body: inbound.body.as_bytes(),
                    ts_ms: now_ms,
                };
                // A retried push (same cmid) changes nothing: no dispatch either.
                let original = self
                    .conv_log(conv)
                    .ok_or(crate::store::StoreError::UnknownConv(conv))
                    .and_then(|log| log.duplicate_of(&message))
                    .map_err(super::store_error)?;
                if original.is_none() {
                    self.serve_customer(conv, now_ms)?;
                }
                self.store_and_push(&message, None)
                    .map_err(super::store_error)
            });
        if let Err((code, text)) = stored {
            // WeChat was already answered; the message is lost unless it retries. Say so.
            tracing::warn!(shop = inbound.shop, customer = %uid, cmid = inbound.cmid, ?code, text, "wechat message not stored");
        }
    }

    /// After an agent's message `seq` is stored in `conv`: if a member is a WeChat customer,
    /// queue the reply for after the commit (text only: other kinds leave a notice at once).
    pub(super) fn wechat_reply(
        &mut self,
        conv: ConvId,
        seq: Seq,
        kind: &str,
        body: &str,
        now_ms: u64,
    ) {
        if self.wechat.is_none() {
            return;
        }
        let Some(c) = self.conv_log(conv).and_then(|log| log.conv(conv)) else {
            return;
        };
        if c.shop().is_none() {
            return;
        }
        let customers: Vec<u64> = c
            .members()
            .iter()
            .filter(|u| u.kind == UidKind::Wechat)
            .map(|u| u.id)
            .collect();
        for customer in customers {
            if kind != "text" {
                let undelivered = Undelivered {
                    reason: Reason::Content,
                    errcode: None,
                    detail: format!("only text reaches WeChat customers, not {kind:?}"),
                };
                self.wechat_notice(conv, seq, &undelivered, now_ms);
                continue;
            }
            self.wechat_out.push(PendingReply {
                customer,
                content: body.to_string(),
                tag: ReplyTag {
                    conv: conv.0,
                    seq: seq.0,
                },
            });
        }
    }

    /// Hands the committed turn's replies to the sender; those it cannot queue come back as
    /// notices to store next turn.
    pub(super) fn wechat_submit(&mut self) -> Vec<(usize, crate::bus::BusMsg)> {
        let Some(channel) = self.wechat.clone() else {
            return Vec::new();
        };
        let mut refused = Vec::new();
        for reply in std::mem::take(&mut self.wechat_out) {
            if let Err(rejected) = channel.reply(reply.customer, reply.content, reply.tag) {
                refused.push((
                    self.shard,
                    crate::bus::BusMsg::WechatUndelivered(Box::new(WechatUndelivered {
                        conv: ConvId(reply.tag.conv),
                        seq: Seq(reply.tag.seq),
                        undelivered: Undelivered {
                            reason: rejected.reason,
                            errcode: None,
                            detail: format!("not sent: {}", rejected.reason.code()),
                        },
                    })),
                ));
            }
        }
        refused
    }

    /// Leaves a notice in `conv` that reply `seq` did not reach the WeChat customer.
    pub(super) fn wechat_notice(
        &mut self,
        conv: ConvId,
        seq: Seq,
        undelivered: &Undelivered,
        now_ms: u64,
    ) {
        // The conversation is in the cmid too: the notices of every conversation share one
        // sender, and a cmid must not repeat one of another conversation.
        let cmid = format!("wx-undelivered-{conv}-{seq}");
        let body = undelivered.notice(seq.0);
        let stored = self.store_and_push(
            &NewMessage {
                conv,
                sender: NOTICE_SENDER,
                device: no_device(),
                cmid: cmid.as_bytes(),
                kind: NOTICE_KIND.as_bytes(),
                body: body.as_bytes(),
                ts_ms: now_ms,
            },
            None,
        );
        if let Err(e) = stored {
            tracing::warn!(%conv, %seq, error = %e, "wechat notice not stored");
        }
    }

    /// Appends `message` and, when it is new, pushes it to every member (but `except`).
    pub(super) fn store_and_push(
        &mut self,
        message: &NewMessage<'_>,
        except: Option<DeviceId>,
    ) -> Result<Appended, crate::store::StoreError> {
        let appended = self.conv_log_mut(message.conv)?.append_message(message)?;
        if let Appended::Stored { seq } = appended {
            self.messages_stored += 1;
            let members = self.members(message.conv);
            let push = self.msg_push(Msg {
                conv: message.conv,
                seq,
                from: message.sender,
                ts: message.ts_ms,
                kind: String::from_utf8_lossy(message.kind),
                body: String::from_utf8_lossy(message.body),
                cmid: String::from_utf8_lossy(message.cmid),
            });
            self.fanout(Fanout::new(members, except, push));
        }
        Ok(appended)
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, Seq, ShopId, Target, Uid, UidKind};

    use super::NOTICE_SENDER;
    use crate::bus::{BusMsg, Origin, WechatUndelivered};
    use crate::logic::testing::*;
    use crate::wechat::endpoint::Inbound;
    use crate::wechat::sender::{Reason, Undelivered};

    const SHOP: ShopId = ShopId(42);

    fn inbound(customer: u64, cmid: &str, body: &str) -> BusMsg {
        BusMsg::WechatInbound(Box::new(Inbound {
            app_id: "wx1".into(),
            shop: SHOP.0,
            customer,
            cmid: cmid.into(),
            kind: "text".into(),
            body: body.into(),
            create_time: 1_700_000_000,
        }))
    }

    /// Agent 1, logged in and online for the shop.
    fn online_agent(h: &mut Harness) -> Origin {
        let support = h.login(agent(1));
        h.turn(BusMsg::AgentOnline {
            shop: SHOP,
            agent: support.uid,
            profile: None,
        });
        support
    }

    /// The shop's conversation with WeChat customer `customer`; it must exist.
    fn shop_conv(h: &Harness, customer: u64) -> ConvId {
        h.owner
            .log_of(&SHOP)
            .and_then(|log| log.shop_conv(SHOP, Uid::new(UidKind::Wechat, customer)))
            .expect("the conversation")
    }

    /// The report that the reply at seq 2 of `conv` did not reach its customer.
    fn undelivered(conv: ConvId, reason: Reason, errcode: i64, detail: &str) -> BusMsg {
        BusMsg::WechatUndelivered(Box::new(WechatUndelivered {
            conv,
            seq: Seq(2),
            undelivered: Undelivered {
                reason,
                errcode: Some(errcode),
                detail: detail.into(),
            },
        }))
    }

    #[test]
    fn a_wechat_message_is_stored_and_dispatched_as_a_buyers_and_stored_once() {
        let mut h = Harness::new();
        let support = online_agent(&mut h);
        let out = h.turn(inbound(7, "wx-msg-1", "在吗"));
        let pushed = pushes(&out);
        // The assignment (`members`), then the message, to the customer and the agent.
        assert_eq!(pushed.len(), 2, "{pushed:?}");
        let customer = Uid::new(UidKind::Wechat, 7);
        assert!(pushed[0].3.contains(r#""op":"members""#), "{}", pushed[0].3);
        assert_eq!(pushed[1].1, [customer, support.uid]);
        assert!(pushed[1].3.contains(r#""from":"wechat:7""#) && pushed[1].3.contains("在吗"));
        assert_eq!(
            pushed[1].2, None,
            "a WeChat customer has no device to spare"
        );

        // WeChat's retry: the same cmid is neither stored nor pushed again.
        let again = h.turn(inbound(7, "wx-msg-1", "在吗"));
        assert!(pushes(&again).is_empty(), "{:?}", pushes(&again));
        // The agent answers in the same conversation.
        let conv = shop_conv(&h, 7);
        let out = h.turn(send(&support, Target::Conv(conv), "a1", "您好"));
        assert_eq!(send_ok(&replies(&out, support.session)), (conv, 2));

        // Resolved, then WeChat retries once more: still nothing, no new assignment.
        h.turn(BusMsg::Resolve {
            origin: Box::new(support),
            conv,
        });
        let late = h.turn(inbound(7, "wx-msg-1", "在吗"));
        assert!(pushes(&late).is_empty(), "{:?}", pushes(&late));
        assert_eq!(h.owner.members(conv).as_slice(), [customer]);
    }

    #[test]
    fn an_undelivered_reply_leaves_a_notice_in_its_conversation() {
        let mut h = Harness::new();
        online_agent(&mut h);
        h.turn(inbound(7, "wx-msg-1", "hi"));
        let conv = shop_conv(&h, 7);
        let out = h.turn(undelivered(
            conv,
            Reason::ReplyWindowClosed,
            45015,
            "response out of time limit",
        ));
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        let text = &pushed[0].3;
        assert!(
            text.contains(&format!(r#""from":"{NOTICE_SENDER}""#)),
            "{text}"
        );
        assert!(text.contains(r#""kind":"wechat_undelivered""#), "{text}");
        assert!(
            text.contains("wechat_window_closed") && text.contains("45015"),
            "{text}"
        );
        // Reported twice (say a retried report): one notice.
        let again = h.turn(undelivered(conv, Reason::ReplyWindowClosed, 45015, ""));
        assert!(pushes(&again).is_empty());

        // Another conversation's notice for the same seq is its own message.
        h.turn(inbound(8, "wx-msg-2", "hello"));
        let other = shop_conv(&h, 8);
        let out = h.turn(undelivered(other, Reason::ReplyLimitReached, 45047, ""));
        assert_eq!(
            pushes(&out).len(),
            1,
            "stored in the other conversation too"
        );
    }
}
