//! The post office: how a [`BusMsg`] gets from one shard to another.
//!
//! [`PostOffice`] holds every shard's mailbox and is shared by the whole node. [`Post`] is one
//! shard's counter at it: what the shard posted during a loop turn waits in its tray until the
//! shard sends it, once the turn's reads are done. A message for the shard itself is handed
//! back to it rather than queued, so a shard that owns the subject of its own session's request
//! answers without a round trip through a queue.
//!
//! Each pair of shards is joined by one FIFO queue, so messages from one shard to another
//! arrive in the order they were sent.

use std::sync::Arc;

use chinwag_protocol::ErrorCode;

use super::mailbox::Mailbox;
use super::BusMsg;
use crate::operator::metrics::{self, ShardMetrics};

/// Every shard's mailbox.
pub struct PostOffice {
    mailboxes: Box<[Mailbox]>,
}

impl PostOffice {
    /// The post office of a node whose shard `n` reads `mailboxes[n]`.
    pub fn new(mailboxes: Vec<Mailbox>) -> PostOffice {
        PostOffice {
            mailboxes: mailboxes.into_boxed_slice(),
        }
    }

    /// The node's shard count.
    pub fn shards(&self) -> usize {
        self.mailboxes.len()
    }

    /// The mailbox of `shard`.
    #[cfg(test)]
    pub fn mailbox(&self, shard: usize) -> &Mailbox {
        &self.mailboxes[shard]
    }

    /// Wakes every shard (to see the drain flag).
    pub fn wake_all(&self) {
        for mailbox in self.mailboxes.iter() {
            mailbox.wake();
        }
    }

    /// Sends `msg` to `shard` from a thread that is not a shard (the WeChat sender). Gives it
    /// back when the mailbox is full.
    pub fn post_from_outside(&self, shard: usize, msg: BusMsg) -> Result<(), BusMsg> {
        self.mailboxes[shard].send(msg)
    }

    /// Messages waiting in each shard's mailbox.
    pub fn depths(&self) -> Vec<usize> {
        self.mailboxes.iter().map(Mailbox::len).collect()
    }
}

/// One shard's side of the post office.
pub struct Post {
    shard: usize,
    office: Arc<PostOffice>,
    /// Messages posted this turn, with the shard each goes to.
    tray: Vec<(usize, BusMsg)>,
}

impl Post {
    pub fn new(shard: usize, office: Arc<PostOffice>) -> Post {
        Post {
            shard,
            office,
            tray: Vec::new(),
        }
    }

    /// The node's shard count.
    pub fn shards(&self) -> usize {
        self.office.shards()
    }

    pub fn office(&self) -> &PostOffice {
        &self.office
    }

    /// Posts `msg` for `shard` (this one included); it leaves when the shard sends its tray.
    pub fn to(&mut self, shard: usize, msg: BusMsg) {
        self.tray.push((shard, msg));
    }

    /// Takes what was posted since the last call.
    pub fn take(&mut self) -> Vec<(usize, BusMsg)> {
        std::mem::take(&mut self.tray)
    }

    pub fn is_empty(&self) -> bool {
        self.tray.is_empty()
    }

    /// Takes up to `max` messages from this shard's mailbox into `into`.
    pub fn receive(&self, max: usize, into: &mut Vec<BusMsg>) {
        self.office.mailboxes[self.shard].drain(max, |msg| into.push(msg));
    }

    /// Sends `msg` to `shard`. Returns what this shard has to handle itself: `msg` when it is
    /// for this shard; when the other shard's mailbox is full, the `unavailable` answer to a
    /// client's request, or for a `convs` or `presence` part request the failed part (its
    /// gather then answers `unavailable` once and frees its slot); anything else is dropped and counted,
    /// and a lost push is repaired by `history`.
    pub fn send(&self, shard: usize, msg: BusMsg, metrics: &ShardMetrics) -> Option<BusMsg> {
        if shard == self.shard {
            return Some(msg);
        }
        let msg = self.office.mailboxes[shard].send(msg).err()?;
        // The other shard is far behind; shedding this message is the bounded choice.
        metrics::add(&metrics.mailbox_full_drops, 1);
        match msg {
            BusMsg::Convs { origin, token } => {
                return Some(BusMsg::ConvsPart {
                    session: origin.session,
                    token,
                    convs: None,
                })
            }
            BusMsg::Presence { origin, token, .. } => {
                return Some(BusMsg::PresencePart {
                    session: origin.session,
                    token,
                    online: None,
                })
            }
            _ => {}
        }
        let origin = msg.origin()?;
        Some(BusMsg::Deliver {
            to: origin.session,
            ws_message: origin.error(ErrorCode::Unavailable, "the owner shard is overloaded"),
        })
    }
}
