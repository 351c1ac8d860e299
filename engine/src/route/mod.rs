//! Routing: who owns what, and how work and pushes travel between shards.
//!
//! Every piece of state has one owner shard, found by hashing its key (DESIGN.md, "One node"):
//!
//! | state | owner |
//! |---|---|
//! | a user's devices (DeviceInfo) and which session holds each device | `hash(uid)` |
//! | a shop's conversations, its dispatcher (online agents, waiting queue) | `hash(shop)` |
//! | a direct conversation | `hash(unordered pair)` |
//! | any conversation, by id | the shard number in the id's low byte ([`owner_of_conv`]) |
//!
//! Putting a shop's conversations on the shard of its dispatcher means that assigning an agent
//! and storing the message that caused it happen in one place, with no cross-shard protocol.
//!
//! A session's shard sends a [`Request`] to the owner (a plain call when it is itself the
//! owner); the owner answers with [`ShardMsg`]s to the session's shard. Pushes for the members
//! of a conversation go as one [`Fanout`] to every shard, each of which knows only its own
//! logged-in devices ([`LocalDevices`]). All queues are FIFO per pair of shards, so a device
//! sees one conversation's pushes in the order the owner made them.

pub mod owner;

use std::sync::Arc;

use ahash::AHashMap;
use bytes::Bytes;
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    binary, json, ConvId, ConvSummary, Cursor, DeviceId, DeviceType, ErrorCode, ErrorReply, Frame,
    History, Message, ShopId, Target, Uid,
};
use smallvec::SmallVec;

use crate::net::frame::{self, Opcode};
use crate::placement::Placed;
use crate::shard::mailbox::SessionRef;

/// Conversation ids carry their owner shard in the low byte, so any shard can route a `conv`
/// without a lookup. That bounds a node to 256 shards.
pub const CONV_SHARD_BITS: u32 = 8;
/// The most shards a node may run.
pub const SHARDS_MAX: usize = 1 << CONV_SHARD_BITS;

/// The shard that owns conversation `conv` (may be ≥ the node's shard count for a forged id).
pub fn owner_of_conv(conv: ConvId) -> usize {
    (conv.0 & (SHARDS_MAX as u64 - 1)) as usize
}

/// The shard that owns `key` (a uid, a shop, a user pair), among `shards`: the specified,
/// build-independent placement of [`crate::placement`].
pub fn owner_of<K: Placed>(key: &K, shards: usize) -> usize {
    crate::placement::shard_of(key, shards)
}

/// The key of a direct conversation: the two users in a canonical order.
pub fn user_pair(a: Uid, b: Uid) -> (Uid, Uid) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Who sent a request: enough to answer it and to check what the user may do.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The session to answer.
    pub session: SessionRef,
    /// The logged-in user.
    pub uid: Uid,
    /// The device the request came from.
    pub device: DeviceId,
    /// For agents, the shop they work for.
    pub shop: Option<ShopId>,
    /// The encoding of the request (the reply uses it).
    pub encoding: Encoding,
    /// The request's `req`.
    pub req: Option<u64>,
}

impl Origin {
    /// A reply to this request, as a WebSocket frame in the request's encoding.
    pub fn reply(&self, message: Message<'_>) -> Bytes {
        ws_frame(
            &Frame {
                req: self.req,
                message,
            },
            self.encoding,
        )
    }

    /// An `error` reply to this request.
    pub fn error(&self, code: ErrorCode, text: &str) -> Bytes {
        self.reply(error(code, text))
    }
}

/// An `error` message.
pub fn error(code: ErrorCode, text: &str) -> Message<'_> {
    Message::Error(ErrorReply {
        code,
        message: text.into(),
    })
}

/// Work for the shard that owns a conversation, a shop, or a user's devices.
#[derive(Debug)]
pub enum Request {
    /// `send`.
    Send {
        /// Who sends.
        origin: Origin,
        /// Where to.
        target: Target,
        /// The client message id.
        cmid: String,
        /// The message kind.
        kind: String,
        /// The body.
        body: String,
    },
    /// `read`.
    Read {
        /// Who reads.
        origin: Origin,
        /// Up to where.
        cursor: Cursor,
    },
    /// `resolve`.
    Resolve {
        /// The agent.
        origin: Origin,
        /// The conversation.
        conv: ConvId,
    },
    /// `history`.
    History {
        /// Who asks.
        origin: Origin,
        /// Which page.
        history: History,
    },
    /// `convs`: this shard's part of the user's conversation list.
    Convs {
        /// Who asks.
        origin: Origin,
    },
    /// A login on `session`: find or register the device, take it over from an older session.
    Register {
        /// The session logging in.
        session: SessionRef,
        /// The user.
        uid: Uid,
        /// The kind of device.
        device_type: DeviceType,
    },
    /// A logged-in session ended.
    Unregister {
        /// The session that ended.
        session: SessionRef,
        /// Its user.
        uid: Uid,
        /// Its device.
        device: DeviceId,
    },
    /// An agent's session logged in.
    AgentOnline {
        /// The agent's shop.
        shop: ShopId,
        /// The agent.
        agent: Uid,
    },
    /// An agent's session ended.
    AgentOffline {
        /// The agent's shop.
        shop: ShopId,
        /// The agent.
        agent: Uid,
    },
}

impl Request {
    /// The client request's origin, for requests a client made.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            Request::Send { origin, .. }
            | Request::Read { origin, .. }
            | Request::Resolve { origin, .. }
            | Request::History { origin, .. }
            | Request::Convs { origin } => Some(origin),
            _ => None,
        }
    }

    /// The shard that owns this request's subject, among `shards`.
    pub fn owner(&self, shards: usize) -> usize {
        match self {
            Request::Send { origin, target, .. } => match target {
                Target::Conv(conv) => owner_of_conv(*conv),
                Target::Shop(shop) => owner_of(shop, shards),
                Target::User(other) => owner_of(&user_pair(origin.uid, *other), shards),
            },
            Request::Read { cursor, .. } => owner_of_conv(cursor.conv),
            Request::Resolve { conv, .. } => owner_of_conv(*conv),
            Request::History { history, .. } => owner_of_conv(history.conv),
            Request::Convs { origin } => origin.session.shard as usize,
            Request::Register { uid, .. } | Request::Unregister { uid, .. } => {
                owner_of(uid, shards)
            }
            Request::AgentOnline { shop, .. } | Request::AgentOffline { shop, .. } => {
                owner_of(shop, shards)
            }
        }
    }
}

/// A push for every logged-in device of some users, encoded once per encoding and shared by
/// every recipient on every shard.
#[derive(Debug)]
pub struct Fanout {
    /// The users whose devices receive it.
    pub users: SmallVec<[Uid; 4]>,
    /// A device that does not receive it (the sender's, for `msg`; the reader's, for `receipt`).
    pub except: Option<DeviceId>,
    /// The push as a text WebSocket frame.
    pub json: Bytes,
    /// The push as a binary WebSocket frame.
    pub binary: Bytes,
}

impl Fanout {
    /// Encodes `message` in both encodings.
    pub fn new(
        users: SmallVec<[Uid; 4]>,
        except: Option<DeviceId>,
        message: Message<'_>,
    ) -> Fanout {
        let frame = Frame::new(message);
        Fanout {
            users,
            except,
            json: ws_frame(&frame, Encoding::Json),
            binary: ws_frame(&frame, Encoding::Binary),
        }
    }

    /// The frame for a device speaking `encoding`.
    pub fn frame(&self, encoding: Encoding) -> &Bytes {
        match encoding {
            Encoding::Json => &self.json,
            Encoding::Binary => &self.binary,
        }
    }
}

/// Encodes `frame` as one WebSocket message in `encoding`: one buffer, the payload written
/// once behind the WebSocket header.
pub fn ws_frame(frame: &Frame<'_>, encoding: Encoding) -> Bytes {
    match encoding {
        Encoding::Json => frame::encode_with(Opcode::Text, |out| json::encode(frame, out)),
        Encoding::Binary => frame::encode_with(Opcode::Binary, |out| {
            if binary::encode(frame, out).is_err() {
                // Only a string over the codec's length fields fails (and leaves `out` as it
                // was); the gateway's own frames are bounded far below them. Say so rather
                // than send nothing; a short error always encodes.
                let error = Frame {
                    req: frame.req,
                    message: error(ErrorCode::Internal, "reply too large to encode"),
                };
                let _ = binary::encode(&error, out);
            }
        }),
    }
}

/// One logged-in session of this shard, as the routing table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalDevice {
    /// The device.
    pub device: DeviceId,
    /// The session's slab slot.
    pub slot: u32,
    /// The session's generation (tells it apart from a later session in the same slot).
    pub generation: u32,
    /// The encoding of its pushes.
    pub encoding: Encoding,
}

/// This shard's part of the routing table: user → its devices logged in on this shard.
#[derive(Debug, Default)]
pub struct LocalDevices {
    users: AHashMap<Uid, SmallVec<[LocalDevice; 2]>>,
}

impl LocalDevices {
    /// Records a logged-in session.
    pub fn insert(&mut self, uid: Uid, device: LocalDevice) {
        self.users.entry(uid).or_default().push(device);
    }

    /// Forgets a session that ended.
    pub fn remove(&mut self, uid: Uid, slot: u32, generation: u32) {
        if let Some(devices) = self.users.get_mut(&uid) {
            devices.retain(|d| !(d.slot == slot && d.generation == generation));
            if devices.is_empty() {
                self.users.remove(&uid);
            }
        }
    }

    /// The sessions of `uid` on this shard.
    pub fn of(&self, uid: Uid) -> &[LocalDevice] {
        self.users.get(&uid).map_or(&[], |d| d.as_slice())
    }

    /// Users with a session on this shard.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// Work that arrives at a shard from the conversation layer (the mailbox carries it between
/// shards; a shard hands its own to itself directly).
#[derive(Debug)]
pub enum Routed {
    /// A request for this shard as owner.
    Request(Box<Request>),
    /// A push for this shard's devices of some users.
    Fanout(Arc<Fanout>),
    /// The device of a login, found or registered by the user's owner shard (`None` if the
    /// registration could not be stored).
    Registered {
        /// The session logging in.
        session: SessionRef,
        /// The user logging in.
        uid: Uid,
        /// Its device.
        device: Option<DeviceId>,
    },
    /// The device logged in elsewhere: push `kicked` and close with 4001.
    Kick {
        /// The older session.
        session: SessionRef,
    },
    /// One shard's part of a `convs` reply.
    ConvsPart {
        /// The session that asked.
        session: SessionRef,
        /// The request's `req`.
        req: Option<u64>,
        /// That shard's conversations of the user.
        convs: Vec<ConvSummary<'static>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    #[test]
    fn owners_are_stable_and_spread() {
        let mut counts = [0usize; 4];
        for id in 0..4000 {
            let owner = owner_of(&Uid::new(UidKind::Buyer, id), 4);
            assert_eq!(owner, owner_of(&Uid::new(UidKind::Buyer, id), 4));
            counts[owner] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn a_pair_has_one_owner_in_either_order() {
        let a = Uid::new(UidKind::Agent, 1);
        let b = Uid::new(UidKind::Buyer, 2);
        assert_eq!(user_pair(a, b), user_pair(b, a));
        assert_eq!(owner_of_conv(ConvId(0x0012_3405)), 5);
    }

    #[test]
    fn fanout_frames_are_websocket_messages_in_both_encodings() {
        let fanout = Fanout::new(SmallVec::new(), None, Message::Kicked("x".into()));
        assert_eq!(fanout.json[0], 0x81, "text, final");
        assert_eq!(fanout.binary[0], 0x82, "binary, final");
        let text = &fanout.json[2..];
        assert_eq!(text, br#"{"op":"kicked","reason":"x"}"#);
        assert!(binary::decode(&fanout.binary[2..]).is_ok());
    }

    #[test]
    fn local_devices_forget_only_the_session_that_ended() {
        let uid = Uid::new(UidKind::Buyer, 1);
        let mut local = LocalDevices::default();
        let device = DeviceId::from_u64(5).unwrap();
        let first = LocalDevice {
            device,
            slot: 3,
            generation: 1,
            encoding: Encoding::Json,
        };
        local.insert(uid, first);
        local.insert(
            uid,
            LocalDevice {
                generation: 2,
                slot: 4,
                ..first
            },
        );
        local.remove(uid, 3, 1);
        assert_eq!(local.of(uid).len(), 1);
        assert_eq!(local.of(uid)[0].slot, 4);
        local.remove(uid, 4, 2);
        assert_eq!(local.user_count(), 0);
    }
}
