//! `send`: finding or creating the conversation, storing the message (seq = last + 1, a
//! repeated `cmid` answered with the original's seq), `send_ok`, and the `msg` push to every
//! other device of every member.

use chinwag_protocol::{ConvId, ErrorCode, Message, Msg, SendOk, Seq, Target};

use super::dispatch::Decision;
use super::{store_error, Owner};
use crate::bus::{Fanout, Origin, CONV_SHARD_BITS};
use crate::store::{Appended, HistoryFrom, NewMessage, Store, StoreError};

impl Owner {
    pub(super) fn send(
        &mut self,
        origin: &Origin,
        target: Target,
        cmid: &str,
        kind: &str,
        body: &str,
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
                let existing = self.store.shop_conv(shop, uid);
                self.find_or_create(existing, |store, conv| {
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
                let existing = self.store.direct_conv(uid, other);
                self.find_or_create(existing, |store, conv| {
                    store.create_direct_conv(conv, uid, other)
                })?
            }
        };

        // Customer service: make sure an online agent serves the conversation before the
        // message goes out, so a newly assigned agent gets `members` and then the `msg`.
        if uid.kind.is_customer() {
            if let Some((shop, agents)) = self.shop_agents(conv) {
                if let Decision::Assign(agent) =
                    self.dispatcher.customer_message(shop, conv, &agents)
                {
                    self.assign(conv, agent).map_err(store_error)?;
                }
            }
        }

        let appended = self
            .store
            .append_message(&NewMessage {
                conv,
                sender: uid,
                device: origin.device,
                cmid: cmid.as_bytes(),
                kind: kind.as_bytes(),
                body: body.as_bytes(),
                ts_ms: now_ms,
            })
            .map_err(store_error)?;
        match appended {
            Appended::Stored { seq } => {
                self.messages_stored += 1;
                let ok = origin.reply(Message::SendOk(SendOk {
                    conv,
                    seq,
                    ts: now_ms,
                }));
                self.ack(origin, ok);
                let members = self.members(conv);
                self.fanout(Fanout::new(
                    members,
                    Some(origin.device),
                    Message::Msg(Msg {
                        conv,
                        seq,
                        from: uid,
                        ts: now_ms,
                        kind: kind.into(),
                        body: body.into(),
                        cmid: cmid.into(),
                    }),
                ));
            }
            Appended::Duplicate { conv, seq } => {
                // The original's time, read back: one record read, on a rare path.
                let ts = self
                    .store
                    .history(conv, HistoryFrom::After(Seq(seq.0 - 1)), 1)
                    .ok()
                    .and_then(|m| m.first().map(|m| m.ts_ms))
                    .unwrap_or(now_ms);
                let ok = origin.reply(Message::SendOk(SendOk { conv, seq, ts }));
                self.ack(origin, ok);
            }
        }
        Ok(())
    }

    /// `existing`, or a new conversation with the next id, created by `create`.
    pub(super) fn find_or_create(
        &mut self,
        existing: Option<ConvId>,
        create: impl FnOnce(&mut Store, ConvId) -> Result<(), StoreError>,
    ) -> Result<ConvId, (ErrorCode, String)> {
        if let Some(conv) = existing {
            return Ok(conv);
        }
        let conv = self.next_conv_id();
        create(&mut self.store, conv).map_err(store_error)?;
        Ok(conv)
    }

    pub(super) fn next_conv_id(&mut self) -> ConvId {
        let id = ConvId(self.conv_counter << CONV_SHARD_BITS | self.shard as u64);
        self.conv_counter += 1;
        id
    }
}
