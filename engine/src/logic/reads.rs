//! Reads that change nothing: `history` pages (kept within the reply budget) and this shard's
//! part of a user's `convs` list.

use std::borrow::Cow;

use chinwag_protocol::{
    ConvSummary, ConvType, ErrorCode, History, HistoryOk, HistoryRange, Message, Msg, Uid,
};

use super::{store_error, Owner};
use crate::bus::Origin;
use crate::store::{ConvKind, HistoryFrom, MessageRef};

/// What a `msg` entry costs on the wire besides its strings (ids, numbers, JSON punctuation
/// and escaping slack), for the reply byte budget.
const MSG_OVERHEAD_BYTES: usize = 160;

impl Owner {
    pub(super) fn history(
        &self,
        origin: &Origin,
        history: History,
    ) -> Result<Message<'static>, (ErrorCode, String)> {
        let conv = history.conv;
        self.member_conv(conv, origin.uid)?;
        let from = match history.range {
            HistoryRange::Newest => HistoryFrom::Newest,
            HistoryRange::Before(seq) => HistoryFrom::Before(seq),
            HistoryRange::After(seq) => HistoryFrom::After(seq),
        };
        let page = self
            .store
            .history(conv, from, usize::from(history.limit))
            .map_err(store_error)?;
        // A page must fit the connection's send queue, or asking for it would get the client
        // disconnected: keep the messages nearest the anchor within the byte budget and let
        // the client page on (the contract's `limit` is a maximum).
        let size =
            |m: &MessageRef<'_>| MSG_OVERHEAD_BYTES + m.body.len() + m.kind.len() + m.cmid.len();
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

    pub(super) fn convs_of(&self, uid: Uid) -> Vec<ConvSummary<'static>> {
        self.store
            .convs_of(uid)
            .iter()
            .filter_map(|&id| {
                let c = self.store.conv(id)?;
                let last_seq = c.last_seq();
                let read_seq = c.cursor(uid);
                let last = self
                    .store
                    .history(id, HistoryFrom::Newest, 1)
                    .ok()
                    .and_then(|m| m.first().map(to_msg));
                Some(ConvSummary {
                    conv: id,
                    conv_type: match (c.kind(), c.shop()) {
                        (ConvKind::Shop, Some(shop)) => ConvType::Shop(shop),
                        (ConvKind::Group, _) => ConvType::Group,
                        _ => ConvType::Direct,
                    },
                    members: c.members().to_vec(),
                    last_seq,
                    read_seq,
                    unread: last_seq.0.saturating_sub(read_seq.0),
                    last,
                })
            })
            .collect()
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
