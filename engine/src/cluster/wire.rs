//! The node links' wire format: every [`BusMsg`] that crosses from one node to another, and the
//! link's own control frames, as bytes, in the style of the client binary codec
//! (docs/protocol.md): a 16-byte header, big-endian fixed-width integers, strings and byte
//! strings with a length before them. docs/cluster.md, "Node links", gives every layout.
//!
//! Header: `u32 length` of the whole frame, header included · `u8 version`
//! ([`LINK_VERSION`]) · `u8 kind` · `u16 flags` (0) · `u64` reserved (0).
//!
//! The parts of a message that are client messages (a `send`'s target and strings, a
//! `history` page request, a `kick`, the lists of `convs_ok`, `presence_ok` and a stream's
//! messages) are carried as whole client binary frames and decoded by `chinwag_protocol`, so
//! the link checks them with the very rules a client's frames meet. Encoded server messages
//! (replies, pushes) travel as the WebSocket messages the owner made, byte for byte, and are
//! shared (`Bytes`) by every recipient of the receiving node.
//!
//! Decoding is strict: a peer's frame with an unknown kind, a value out of range, a length
//! that disagrees with the bytes, or bytes left over is a [`WireError`], never a panic, and
//! the link that read it is closed. What encodes is guaranteed to decode (the property tests
//! below check it for every variant).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    binary, limits, ConvId, ConvSummary, Cursor, DeviceId, DeviceType, Frame, Message, Msg, Online,
    Profile, Seq, ShopId, StreamBatch, Uid, UidKind,
};
use smallvec::SmallVec;

use crate::bus::partitions::PARTITIONS_MAX;
use crate::bus::{
    AnnouncedSession, BusMsg, EpochAnswer, EpochQuery, Fanout, GroupOp, GroupRequest, LogData,
    Origin, PartitionId, ProfileOp, ProfileRequest, ReplicaAck, SendRequest, SessionRef,
    StreamFound, StreamPart, StreamRefused, WechatUndelivered, ANNOUNCED_SESSIONS_MAX,
    GROUP_MEMBERS_PER_REQUEST_MAX, NODE_NUMBER_MAX, SHARDS_MAX,
};
use crate::store::StoredProfile;
use crate::wechat::endpoint::Inbound;
use crate::wechat::sender::{Reason, Undelivered};

/// The link protocol's version; a peer speaking another is refused at the handshake.
pub const LINK_VERSION: u8 = 1;
/// The header's size in bytes.
pub const HEADER_LEN: usize = 16;
/// The most users a [`Fanout`] sent to a node may name (a group's members are bounded far
/// below it by `members_max`; this only bounds what a peer can make us allocate).
pub const FANOUT_USERS_MAX: usize = 1 << 20;
/// The longest cluster name a `hello` carries.
pub const CLUSTER_NAME_LEN_MAX: usize = 255;

// Kinds. Control frames of the link itself:
const HELLO: u8 = 0x01;
const REFUSE: u8 = 0x02;
const HEARTBEAT: u8 = 0x03;
// Requests for the owner of a conversation, a shop or a user's devices:
const SEND: u8 = 0x10;
const READ: u8 = 0x11;
const RESOLVE: u8 = 0x12;
const HISTORY: u8 = 0x13;
const KICK_USER: u8 = 0x14;
const PRESENCE: u8 = 0x15;
const STREAM_READ: u8 = 0x16;
const CONVS: u8 = 0x17;
const REGISTER: u8 = 0x18;
const UNREGISTER: u8 = 0x19;
const AGENT_ONLINE: u8 = 0x1a;
const AGENT_OFFLINE: u8 = 0x1b;
const GROUP: u8 = 0x1c;
const WECHAT_INBOUND: u8 = 0x1d;
const WECHAT_UNDELIVERED: u8 = 0x1e;
const AGENT_STATS: u8 = 0x1f;
const PROFILE: u8 = 0x20;
// Messages for the shard of a session, and pushes:
const DELIVER: u8 = 0x40;
const PUSH: u8 = 0x41;
const REGISTERED: u8 = 0x42;
const KICK: u8 = 0x43;
const STREAM_PART: u8 = 0x44;
const PRESENCE_PART: u8 = 0x45;
const CONVS_PART: u8 = 0x46;
const OWN_PROFILE: u8 = 0x47;
// An owner re-learning its users' sessions (after its start or a takeover):
const REANNOUNCE: u8 = 0x48;
const ANNOUNCE: u8 = 0x49;
const FORGET_NODE: u8 = 0x4a;
// Replication of a partition's log between its leader and a follower (issue 14):
const LOG_DATA: u8 = 0x60;
const REPLICA_ACK: u8 = 0x61;
const EPOCH_QUERY: u8 = 0x62;
const EPOCH_ANSWER: u8 = 0x63;

// Group op codes inside a GROUP frame.
const GROUP_CREATE: u8 = 0;
const GROUP_ADD: u8 = 1;
const GROUP_REMOVE: u8 = 2;
const GROUP_INFO: u8 = 3;

// A stream part's result codes.
const STREAM_OK: u8 = 0;
const STREAM_RETIRED: u8 = 1;
const STREAM_NOT_OURS: u8 = 2;
const STREAM_REFUSED: u8 = 3;
const STREAM_LEADER_CHANGING: u8 = 4;
/// The texts of [`StreamPart::result`]'s errors, by code (logic/reads.rs makes them).
const STREAM_ERRORS: [(u8, &str); 4] = [
    (
        STREAM_RETIRED,
        "the resume position was deleted by log retention",
    ),
    (STREAM_NOT_OURS, "not a resume position of this node"),
    (STREAM_REFUSED, "the owner refused the resume position"),
    (STREAM_LEADER_CHANGING, crate::bus::STREAM_NOT_LED),
];

/// WeChat's undelivered reasons, by their wire code (the index).
const WECHAT_REASONS: [Reason; 10] = Reason::ALL;

/// The first frame each side of a link sends: who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The cluster's name: nodes of different clusters refuse each other.
    pub cluster: String,
    /// The sender's node number.
    pub source: u16,
    /// The node number the sender believes it is talking to.
    pub target: u16,
}

/// One frame of a node link.
#[derive(Debug)]
pub enum LinkFrame {
    /// The handshake.
    Hello(Hello),
    /// The handshake was refused, and why; the sender closes the connection after it.
    Refuse(String),
    /// Proves the link alive when it is idle, and acknowledges the bus frames received on
    /// this connection so far (the sender then knows which requests reached this node).
    Heartbeat {
        /// Bus frames received on this connection.
        received: u64,
    },
    /// A message of the bus.
    Bus(BusMsg),
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A field or the frame is malformed, and which.
    Malformed(&'static str),
    /// An embedded client frame does not decode.
    Client(String),
    /// The frame's kind is not one this version knows.
    UnknownKind(u8),
    /// The peer speaks another version of the link protocol.
    Version(u8),
    /// A value is too large for its length field (encoding only).
    TooLarge(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Malformed(what) => write!(f, "malformed link frame: {what}"),
            WireError::Client(e) => write!(f, "malformed client frame in a link frame: {e}"),
            WireError::UnknownKind(kind) => write!(f, "unknown link frame kind 0x{kind:02x}"),
            WireError::Version(v) => {
                write!(f, "link protocol version {v}, expected {LINK_VERSION}")
            }
            WireError::TooLarge(what) => write!(f, "cannot encode: {what} too large"),
        }
    }
}

impl std::error::Error for WireError {}

type Result<T> = std::result::Result<T, WireError>;

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends `hello` as a frame.
pub fn encode_hello(hello: &Hello, out: &mut BytesMut) -> Result<()> {
    frame(out, HELLO, |out| {
        put_str16(out, &hello.cluster, "cluster name")?;
        out.put_u16(hello.source);
        out.put_u16(hello.target);
        Ok(())
    })
}

/// Appends a `refuse` frame giving `reason`.
pub fn encode_refuse(reason: &str, out: &mut BytesMut) -> Result<()> {
    frame(out, REFUSE, |out| put_str16(out, reason, "reason"))
}

/// Appends a heartbeat acknowledging `received` bus frames.
pub fn encode_heartbeat(received: u64, out: &mut BytesMut) {
    // A fixed-size body always fits.
    let _ = frame(out, HEARTBEAT, |out| {
        out.put_u64(received);
        Ok(())
    });
}

/// Appends `msg` as a frame. On error `out` is left as it was.
pub fn encode(msg: &BusMsg, out: &mut BytesMut) -> Result<()> {
    let kind = kind_of(msg);
    frame(out, kind, |out| encode_body(msg, out))
}

/// `msg` encoded as one frame of its own.
pub fn encode_to_bytes(msg: &BusMsg) -> Result<Bytes> {
    let mut out = BytesMut::with_capacity(128);
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

fn kind_of(msg: &BusMsg) -> u8 {
    match msg {
        BusMsg::Send(_) => SEND,
        BusMsg::Read { .. } => READ,
        BusMsg::Resolve { .. } => RESOLVE,
        BusMsg::History { .. } => HISTORY,
        BusMsg::KickUser { .. } => KICK_USER,
        BusMsg::Presence { .. } => PRESENCE,
        BusMsg::StreamRead { .. } => STREAM_READ,
        BusMsg::Convs { .. } => CONVS,
        BusMsg::Register { .. } => REGISTER,
        BusMsg::Unregister { .. } => UNREGISTER,
        BusMsg::AgentOnline { .. } => AGENT_ONLINE,
        BusMsg::AgentOffline { .. } => AGENT_OFFLINE,
        BusMsg::Group(_) => GROUP,
        BusMsg::WechatInbound(_) => WECHAT_INBOUND,
        BusMsg::WechatUndelivered(_) => WECHAT_UNDELIVERED,
        BusMsg::AgentStats { .. } => AGENT_STATS,
        BusMsg::Profile(_) => PROFILE,
        BusMsg::Deliver { .. } => DELIVER,
        BusMsg::Push(_) => PUSH,
        BusMsg::Registered { .. } => REGISTERED,
        BusMsg::Kick { .. } => KICK,
        BusMsg::StreamPart(_) => STREAM_PART,
        BusMsg::PresencePart { .. } => PRESENCE_PART,
        BusMsg::ConvsPart { .. } => CONVS_PART,
        BusMsg::OwnProfile { .. } => OWN_PROFILE,
        BusMsg::Reannounce { .. } => REANNOUNCE,
        BusMsg::Announce { .. } => ANNOUNCE,
        BusMsg::ForgetNode { .. } => FORGET_NODE,
        BusMsg::LogData(_) => LOG_DATA,
        BusMsg::ReplicaAck(_) => REPLICA_ACK,
        BusMsg::EpochQuery(_) => EPOCH_QUERY,
        BusMsg::EpochAnswer(_) => EPOCH_ANSWER,
        // Refused by `encode_body` (a role change never leaves its node); the kind is unused.
        BusMsg::Role(_) => 0,
    }
}

/// Writes a header for `kind`, the body `write` appends, then the length. On error, truncates
/// `out` back to where it was.
fn frame(
    out: &mut BytesMut,
    kind: u8,
    write: impl FnOnce(&mut BytesMut) -> Result<()>,
) -> Result<()> {
    let start = out.len();
    out.put_u32(0); // Patched once the body's length is known.
    out.put_u8(LINK_VERSION);
    out.put_u8(kind);
    out.put_u16(0);
    out.put_u64(0);
    let result = write(out)
        .and_then(|()| u32::try_from(out.len() - start).map_err(|_| WireError::TooLarge("frame")));
    match result {
        Ok(len) => {
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn encode_body(msg: &BusMsg, out: &mut BytesMut) -> Result<()> {
    match msg {
        BusMsg::Role(_) => {
            return Err(WireError::Malformed("a role change never leaves its node"));
        }
        BusMsg::LogData(data) => {
            out.put_u16(data.partition);
            out.put_u64(data.epoch);
            out.put_u64(data.data_epoch);
            out.put_u64(data.from);
            out.put_u64(data.at);
            out.put_u64(data.leader_acked);
            put_bytes32(out, &data.records, "log records")?;
        }
        BusMsg::ReplicaAck(ack) => {
            out.put_u16(ack.partition);
            out.put_u64(ack.epoch);
            out.put_u16(ack.node);
            out.put_u64(ack.position);
        }
        BusMsg::EpochQuery(query) => {
            out.put_u16(query.partition);
            out.put_u64(query.epoch);
            out.put_u16(query.node);
            out.put_u64(query.last_epoch);
        }
        BusMsg::EpochAnswer(answer) => {
            out.put_u16(answer.partition);
            out.put_u64(answer.epoch);
            out.put_u64(answer.last_epoch);
            out.put_u64(answer.end);
        }
        BusMsg::Send(send) => {
            // The peer decodes with the client's limits: refuse here what it would refuse.
            if !(1..=limits::CMID_LEN_MAX).contains(&send.cmid.len())
                || !(1..=limits::KIND_LEN_MAX).contains(&send.kind.len())
            {
                return Err(WireError::TooLarge(
                    "send: cmid or kind out of the codec's limits",
                ));
            }
            put_origin(out, &send.origin);
            put_client(
                out,
                Message::Send(chinwag_protocol::Send {
                    target: send.target,
                    cmid: Cow::Borrowed(&send.cmid),
                    kind: Cow::Borrowed(&send.kind),
                    body: Cow::Borrowed(&send.body),
                }),
            )?;
            out.put_u8(u8::from(send.profile_pending));
            put_stored_profile_opt(out, send.profile.as_ref())?;
        }
        BusMsg::Read { origin, cursor } => {
            put_origin(out, origin);
            out.put_u64(cursor.conv.0);
            out.put_u64(cursor.seq.0);
        }
        BusMsg::Resolve { origin, conv } => {
            put_origin(out, origin);
            out.put_u64(conv.0);
        }
        BusMsg::History { origin, history } => {
            put_origin(out, origin);
            put_client(out, Message::History(*history))?;
        }
        BusMsg::KickUser { origin, kick } => {
            put_origin(out, origin);
            put_client(out, Message::Kick(*kick))?;
        }
        BusMsg::Presence {
            origin,
            users,
            token,
        } => {
            put_origin(out, origin);
            out.put_u64(*token);
            put_uids32(out, users, limits::USERS_PER_REQUEST_MAX, "presence users")?;
        }
        BusMsg::AgentStats { origin, stats } => {
            put_origin(out, origin);
            put_client(out, Message::AgentStats(*stats))?;
        }
        BusMsg::StreamRead { session, from } => {
            put_session(out, *session);
            put_positions(out, from)?;
        }
        BusMsg::Convs {
            origin,
            token,
            partitions,
        } => {
            put_origin(out, origin);
            out.put_u64(*token);
            out.put_u16(*partitions);
        }
        BusMsg::Register {
            session,
            uid,
            device_type,
        } => {
            put_session(out, *session);
            put_uid(out, *uid);
            out.put_u8(*device_type as u8);
        }
        BusMsg::Unregister {
            session,
            uid,
            device,
        } => {
            put_session(out, *session);
            put_uid(out, *uid);
            out.put_u64(device.get());
        }
        BusMsg::AgentOnline {
            shop,
            agent,
            profile,
        } => {
            out.put_u64(shop.0);
            put_uid(out, *agent);
            put_stored_profile_opt(out, profile.as_deref())?;
        }
        BusMsg::AgentOffline { shop, agent } => {
            out.put_u64(shop.0);
            put_uid(out, *agent);
        }
        BusMsg::Profile(request) => {
            put_origin(out, &request.origin);
            put_client(
                out,
                match &request.op {
                    ProfileOp::Set(of) => Message::SetProfile(of.clone()),
                    ProfileOp::Get(subject) => Message::GetProfile(*subject),
                },
            )?;
        }
        BusMsg::OwnProfile { session, profile } => {
            put_session(out, *session);
            put_stored_profile(out, profile)?;
        }
        BusMsg::Group(request) => {
            put_origin(out, &request.origin);
            let max = GROUP_MEMBERS_PER_REQUEST_MAX;
            match &request.op {
                GroupOp::Create { key, members } => {
                    out.put_u8(GROUP_CREATE);
                    out.put_u64(*key);
                    put_uids32(out, members, max, "group members")?;
                }
                GroupOp::Add { conv, members } => {
                    out.put_u8(GROUP_ADD);
                    out.put_u64(conv.0);
                    put_uids32(out, members, max, "group members")?;
                }
                GroupOp::Remove { conv, members } => {
                    out.put_u8(GROUP_REMOVE);
                    out.put_u64(conv.0);
                    put_uids32(out, members, max, "group members")?;
                }
                GroupOp::Info { conv } => {
                    out.put_u8(GROUP_INFO);
                    out.put_u64(conv.0);
                }
            }
        }
        BusMsg::WechatInbound(inbound) => {
            put_str16(out, &inbound.app_id, "app id")?;
            out.put_u64(inbound.shop);
            out.put_u64(inbound.customer);
            put_str16(out, &inbound.cmid, "cmid")?;
            put_str16(out, &inbound.kind, "kind")?;
            put_bytes32(out, inbound.body.as_bytes(), "body")?;
            out.put_u64(inbound.create_time);
        }
        BusMsg::WechatUndelivered(u) => {
            out.put_u64(u.conv.0);
            out.put_u64(u.seq.0);
            let reason = WECHAT_REASONS
                .iter()
                .position(|r| *r == u.undelivered.reason)
                .ok_or(WireError::Malformed("wechat reason"))?;
            out.put_u8(reason as u8);
            match u.undelivered.errcode {
                None => out.put_u8(0),
                Some(code) => {
                    out.put_u8(1);
                    out.put_i64(code);
                }
            }
            put_str16(out, &u.undelivered.detail, "detail")?;
        }
        BusMsg::Deliver { to, ws_message } => {
            put_session(out, *to);
            put_bytes32(out, ws_message, "ws message")?;
        }
        BusMsg::Push(fanout) => {
            if fanout.users.len() > FANOUT_USERS_MAX {
                return Err(WireError::TooLarge("fan-out users"));
            }
            out.put_u32(fanout.users.len() as u32);
            for uid in &fanout.users {
                put_uid(out, *uid);
            }
            out.put_u64(fanout.except.map_or(0, DeviceId::get));
            put_bytes32(out, &fanout.json, "json push")?;
            put_bytes32(out, &fanout.binary, "binary push")?;
        }
        BusMsg::Registered {
            session,
            uid,
            device,
            profile,
        } => {
            put_session(out, *session);
            put_uid(out, *uid);
            out.put_u64(device.map_or(0, DeviceId::get));
            put_stored_profile_opt(out, profile.as_deref())?;
        }
        BusMsg::Kick {
            session,
            by_service,
        } => {
            put_session(out, *session);
            out.put_u8(u8::from(*by_service));
        }
        BusMsg::StreamPart(part) => {
            put_session(out, part.session);
            let shard = u16::try_from(part.shard).map_err(|_| WireError::TooLarge("shard"))?;
            out.put_u16(shard);
            match &part.result {
                Ok(found) => {
                    out.put_u8(STREAM_OK);
                    put_positions(out, &found.next)?;
                    put_client(
                        out,
                        Message::StreamBatch(StreamBatch {
                            position: Cow::Borrowed(""),
                            msgs: found.msgs.iter().map(borrow_msg).collect(),
                            events: found.events.clone(),
                        }),
                    )?;
                }
                Err(refused) => {
                    let code = STREAM_ERRORS
                        .iter()
                        .find(|(_, known)| *known == refused.text)
                        .map_or(STREAM_REFUSED, |(code, _)| *code);
                    out.put_u8(code);
                    put_positions(out, &refused.from)?;
                }
            }
        }
        BusMsg::PresencePart {
            session,
            token,
            online,
        } => {
            put_session(out, *session);
            out.put_u64(*token);
            match online {
                None => out.put_u8(0),
                Some(online) => {
                    out.put_u8(1);
                    put_client(out, Message::PresenceOk(online.clone()))?;
                }
            }
        }
        BusMsg::ConvsPart {
            session,
            token,
            partitions,
            convs,
        } => {
            put_session(out, *session);
            out.put_u64(*token);
            out.put_u16(*partitions);
            match convs {
                None => out.put_u8(0),
                Some(convs) => {
                    out.put_u8(1);
                    put_client(out, Message::ConvsOk(convs.clone()))?;
                }
            }
        }
        BusMsg::Reannounce { partitions } => {
            if partitions.len() > PARTITIONS_MAX {
                return Err(WireError::TooLarge("partitions"));
            }
            out.put_u16(partitions.len() as u16);
            for &partition in partitions.iter() {
                put_partition(out, partition)?;
            }
        }
        BusMsg::Announce {
            partition,
            sessions,
        } => {
            put_partition(out, *partition)?;
            if sessions.len() > ANNOUNCED_SESSIONS_MAX {
                return Err(WireError::TooLarge("announced sessions"));
            }
            out.put_u16(sessions.len() as u16);
            for announced in sessions {
                put_uid(out, announced.uid);
                out.put_u64(announced.device.get());
                put_session(out, announced.session);
                out.put_u64(announced.login_ms);
            }
        }
        BusMsg::ForgetNode { node } => {
            if *node > NODE_NUMBER_MAX {
                return Err(WireError::TooLarge("node number"));
            }
            out.put_u16(*node);
        }
    }
    Ok(())
}

/// A partition id, below [`PARTITIONS_MAX`].
fn put_partition(out: &mut BytesMut, partition: PartitionId) -> Result<()> {
    if usize::from(partition) >= PARTITIONS_MAX {
        return Err(WireError::TooLarge("partition"));
    }
    out.put_u16(partition);
    Ok(())
}

fn borrow_msg<'a>(m: &'a Msg<'_>) -> Msg<'a> {
    Msg {
        conv: m.conv,
        seq: m.seq,
        from: m.from,
        ts: m.ts,
        kind: Cow::Borrowed(&m.kind),
        body: Cow::Borrowed(&m.body),
        cmid: Cow::Borrowed(&m.cmid),
    }
}

fn put_session(out: &mut BytesMut, s: SessionRef) {
    out.put_u16(s.node);
    out.put_u16(s.shard);
    out.put_u32(s.slot);
    out.put_u32(s.generation);
}

fn put_uid(out: &mut BytesMut, uid: Uid) {
    out.put_u8(uid.kind as u8);
    out.put_u64(uid.id);
}

// Origin flag bits.
const ORIGIN_REQ: u8 = 0x01;
const ORIGIN_SERVICE: u8 = 0x02;
const ORIGIN_BINARY: u8 = 0x04;

fn put_origin(out: &mut BytesMut, o: &Origin) {
    put_session(out, o.session);
    put_uid(out, o.uid);
    out.put_u64(o.device.get());
    let mut flags = 0;
    if o.req.is_some() {
        flags |= ORIGIN_REQ;
    }
    if o.service {
        flags |= ORIGIN_SERVICE;
    }
    if o.encoding == Encoding::Binary {
        flags |= ORIGIN_BINARY;
    }
    out.put_u8(flags);
    out.put_u64(o.req.unwrap_or(0));
}

/// Per partition, a log position: `u16 count`, then `u16 partition · u64 position` each.
fn put_positions(out: &mut BytesMut, positions: &[(PartitionId, u64)]) -> Result<()> {
    if positions.len() > PARTITIONS_MAX {
        return Err(WireError::TooLarge("partition positions"));
    }
    out.put_u16(positions.len() as u16);
    for &(partition, position) in positions {
        if usize::from(partition) >= PARTITIONS_MAX {
            return Err(WireError::TooLarge("partition"));
        }
        out.put_u16(partition);
        out.put_u64(position);
    }
    Ok(())
}

/// A stored profile: `u64 version · str16 name · str16 avatar`, within the client's limits.
fn put_stored_profile(out: &mut BytesMut, stored: &StoredProfile) -> Result<()> {
    let profile = &stored.profile;
    if profile.name.len() > limits::PROFILE_NAME_LEN_MAX
        || profile.avatar.len() > limits::PROFILE_AVATAR_LEN_MAX
    {
        return Err(WireError::TooLarge("profile"));
    }
    out.put_u64(stored.version);
    put_str16(out, &profile.name, "profile name")?;
    put_str16(out, &profile.avatar, "profile avatar")
}

/// `u8 0`, or `u8 1` and the stored profile.
fn put_stored_profile_opt(out: &mut BytesMut, stored: Option<&StoredProfile>) -> Result<()> {
    match stored {
        None => {
            out.put_u8(0);
            Ok(())
        }
        Some(stored) => {
            out.put_u8(1);
            put_stored_profile(out, stored)
        }
    }
}

fn put_str16(out: &mut BytesMut, s: &str, what: &'static str) -> Result<()> {
    let len = u16::try_from(s.len()).map_err(|_| WireError::TooLarge(what))?;
    out.put_u16(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_bytes32(out: &mut BytesMut, b: &[u8], what: &'static str) -> Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| WireError::TooLarge(what))?;
    out.put_u32(len);
    out.put_slice(b);
    Ok(())
}

fn put_uids32(out: &mut BytesMut, uids: &[Uid], max: usize, what: &'static str) -> Result<()> {
    if uids.len() > max {
        return Err(WireError::TooLarge(what));
    }
    out.put_u32(uids.len() as u32);
    for uid in uids {
        put_uid(out, *uid);
    }
    Ok(())
}

/// Appends `message` as a whole client binary frame (its header says its length).
fn put_client(out: &mut BytesMut, message: Message<'_>) -> Result<()> {
    binary::encode(&Frame::new(message), out).map_err(|e| WireError::Client(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// The length of the frame starting `bytes`, once its four length bytes are in; the link reads
/// frames with `chinwag_protocol::binary::StreamDecoder`, whose framing is the same.
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    let head: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(head) as usize)
}

/// Decodes exactly one whole frame. The byte strings of the message (a reply's or a push's
/// WebSocket messages) share `frame`'s buffer.
pub fn decode(frame: &Bytes) -> Result<LinkFrame> {
    let head = frame
        .get(..HEADER_LEN)
        .ok_or(WireError::Malformed("frame shorter than its header"))?;
    if frame_len(head) != Some(frame.len()) {
        return Err(WireError::Malformed(
            "frame length differs from the bytes given",
        ));
    }
    if head[4] != LINK_VERSION {
        return Err(WireError::Version(head[4]));
    }
    if head[6..16].iter().any(|&b| b != 0) {
        return Err(WireError::Malformed("reserved header bits are set"));
    }
    let kind = head[5];
    let mut r = Reader {
        frame,
        at: HEADER_LEN,
    };
    let decoded = match kind {
        HELLO => {
            let cluster = r.string16("cluster name")?;
            if cluster.len() > CLUSTER_NAME_LEN_MAX {
                return Err(WireError::Malformed("cluster name too long"));
            }
            LinkFrame::Hello(Hello {
                cluster,
                source: r.node()?,
                target: r.node()?,
            })
        }
        REFUSE => LinkFrame::Refuse(r.string16("reason")?),
        HEARTBEAT => LinkFrame::Heartbeat { received: r.u64()? },
        kind => LinkFrame::Bus(decode_bus(kind, &mut r)?),
    };
    if r.at != frame.len() {
        return Err(WireError::Malformed("bytes follow the body"));
    }
    Ok(decoded)
}

fn decode_bus(kind: u8, r: &mut Reader<'_>) -> Result<BusMsg> {
    Ok(match kind {
        SEND => {
            let origin = r.origin()?;
            let Message::Send(send) = r.client()? else {
                return Err(WireError::Malformed("send: not a send frame"));
            };
            let profile_pending = r.bool()?;
            let profile = r.stored_profile_opt()?;
            BusMsg::Send(Box::new(SendRequest {
                origin,
                target: send.target,
                cmid: send.cmid.into_owned(),
                kind: send.kind.into_owned(),
                body: send.body.into_owned(),
                profile,
                profile_pending,
            }))
        }
        READ => BusMsg::Read {
            origin: Box::new(r.origin()?),
            cursor: Cursor {
                conv: ConvId(r.u64()?),
                seq: Seq(r.u64()?),
            },
        },
        RESOLVE => BusMsg::Resolve {
            origin: Box::new(r.origin()?),
            conv: ConvId(r.u64()?),
        },
        HISTORY => {
            let origin = Box::new(r.origin()?);
            let Message::History(history) = r.client()? else {
                return Err(WireError::Malformed("history: not a history frame"));
            };
            BusMsg::History { origin, history }
        }
        KICK_USER => {
            let origin = Box::new(r.origin()?);
            let Message::Kick(kick) = r.client()? else {
                return Err(WireError::Malformed("kick: not a kick frame"));
            };
            BusMsg::KickUser { origin, kick }
        }
        PRESENCE => BusMsg::Presence {
            origin: Box::new(r.origin()?),
            token: r.u64()?,
            users: r.uids32(limits::USERS_PER_REQUEST_MAX)?,
        },
        AGENT_STATS => {
            let origin = Box::new(r.origin()?);
            let Message::AgentStats(stats) = r.client()? else {
                return Err(WireError::Malformed(
                    "agent stats: not an agent_stats frame",
                ));
            };
            BusMsg::AgentStats { origin, stats }
        }
        STREAM_READ => BusMsg::StreamRead {
            session: r.session()?,
            from: r.positions()?.into_boxed_slice(),
        },
        CONVS => BusMsg::Convs {
            origin: Box::new(r.origin()?),
            token: r.u64()?,
            partitions: r.partition_count()?,
        },
        REGISTER => BusMsg::Register {
            session: r.session()?,
            uid: r.uid()?,
            device_type: DeviceType::from_bits(r.u8()?)
                .ok_or(WireError::Malformed("device type"))?,
        },
        UNREGISTER => BusMsg::Unregister {
            session: r.session()?,
            uid: r.uid()?,
            device: r.device()?.ok_or(WireError::Malformed("device 0"))?,
        },
        AGENT_ONLINE => BusMsg::AgentOnline {
            shop: ShopId(r.u64()?),
            agent: r.uid()?,
            profile: r.stored_profile_opt()?.map(Box::new),
        },
        AGENT_OFFLINE => BusMsg::AgentOffline {
            shop: ShopId(r.u64()?),
            agent: r.uid()?,
        },
        PROFILE => {
            let origin = r.origin()?;
            let op = match r.client()? {
                Message::SetProfile(of) => ProfileOp::Set(of),
                Message::GetProfile(subject) => ProfileOp::Get(subject),
                _ => {
                    return Err(WireError::Malformed(
                        "profile: not a set_profile or get_profile frame",
                    ))
                }
            };
            BusMsg::Profile(Box::new(ProfileRequest { origin, op }))
        }
        OWN_PROFILE => BusMsg::OwnProfile {
            session: r.session()?,
            profile: Box::new(r.stored_profile()?),
        },
        GROUP => {
            let origin = r.origin()?;
            let max = GROUP_MEMBERS_PER_REQUEST_MAX;
            let op = match r.u8()? {
                GROUP_CREATE => GroupOp::Create {
                    key: r.u64()?,
                    members: r.uids32(max)?,
                },
                GROUP_ADD => GroupOp::Add {
                    conv: ConvId(r.u64()?),
                    members: r.uids32(max)?,
                },
                GROUP_REMOVE => GroupOp::Remove {
                    conv: ConvId(r.u64()?),
                    members: r.uids32(max)?,
                },
                GROUP_INFO => GroupOp::Info {
                    conv: ConvId(r.u64()?),
                },
                _ => return Err(WireError::Malformed("group op")),
            };
            BusMsg::Group(Box::new(GroupRequest { origin, op }))
        }
        WECHAT_INBOUND => BusMsg::WechatInbound(Box::new(Inbound {
            app_id: r.string16("app id")?,
            shop: r.u64()?,
            customer: r.u64()?,
            cmid: r.string16("cmid")?,
            kind: r.string16("kind")?,
            body: {
                let body = r.bytes32()?;
                String::from_utf8(body.to_vec()).map_err(|_| WireError::Malformed("body"))?
            },
            create_time: r.u64()?,
        })),
        WECHAT_UNDELIVERED => {
            let conv = ConvId(r.u64()?);
            let seq = Seq(r.u64()?);
            let reason = *WECHAT_REASONS
                .get(usize::from(r.u8()?))
                .ok_or(WireError::Malformed("wechat reason"))?;
            let errcode = match r.u8()? {
                0 => None,
                1 => Some(r.u64()? as i64),
                _ => return Err(WireError::Malformed("errcode presence")),
            };
            let detail = r.string16("detail")?;
            BusMsg::WechatUndelivered(Box::new(WechatUndelivered {
                conv,
                seq,
                undelivered: Undelivered {
                    reason,
                    errcode,
                    detail,
                },
            }))
        }
        DELIVER => BusMsg::Deliver {
            to: r.session()?,
            ws_message: r.ws_message()?,
        },
        PUSH => {
            let count = r.u32()? as usize;
            if count > FANOUT_USERS_MAX {
                return Err(WireError::Malformed("fan-out users over the limit"));
            }
            // Capped by the bytes left, so a forged count allocates no more than the frame.
            let mut users = SmallVec::with_capacity(count.min(r.left() / UID_LEN));
            for _ in 0..count {
                users.push(r.uid()?);
            }
            let except = r.device()?;
            let json = r.ws_message()?;
            let binary = r.ws_message()?;
            BusMsg::Push(Arc::new(Fanout {
                users,
                except,
                json,
                binary,
            }))
        }
        REGISTERED => BusMsg::Registered {
            session: r.session()?,
            uid: r.uid()?,
            device: r.device()?,
            profile: r.stored_profile_opt()?.map(Box::new),
        },
        KICK => BusMsg::Kick {
            session: r.session()?,
            by_service: r.bool()?,
        },
        STREAM_PART => {
            let session = r.session()?;
            let shard = usize::from(r.u16()?);
            if shard >= SHARDS_MAX {
                return Err(WireError::Malformed("shard out of range"));
            }
            let result = match r.u8()? {
                STREAM_OK => {
                    let next = r.positions()?;
                    let Message::StreamBatch(batch) = r.client()? else {
                        return Err(WireError::Malformed("stream part: not a stream batch"));
                    };
                    if !batch.position.is_empty() {
                        return Err(WireError::Malformed("stream part: position set"));
                    }
                    Ok(StreamFound {
                        msgs: batch.msgs.into_iter().map(Msg::into_owned).collect(),
                        events: batch.events,
                        next,
                    })
                }
                code => Err(StreamRefused {
                    text: STREAM_ERRORS
                        .iter()
                        .find(|(known, _)| *known == code)
                        .map(|(_, text)| *text)
                        .ok_or(WireError::Malformed("stream part result"))?,
                    from: r.positions()?,
                }),
            };
            BusMsg::StreamPart(Box::new(StreamPart {
                session,
                shard,
                result,
            }))
        }
        PRESENCE_PART => {
            let session = r.session()?;
            let token = r.u64()?;
            let online = if r.bool()? {
                let Message::PresenceOk(online) = r.client()? else {
                    return Err(WireError::Malformed(
                        "presence part: not a presence_ok frame",
                    ));
                };
                Some(online.into_iter().collect::<Vec<Online>>())
            } else {
                None
            };
            BusMsg::PresencePart {
                session,
                token,
                online,
            }
        }
        CONVS_PART => {
            let session = r.session()?;
            let token = r.u64()?;
            let partitions = r.partition_count()?;
            let convs = if r.bool()? {
                let Message::ConvsOk(convs) = r.client()? else {
                    return Err(WireError::Malformed("convs part: not a convs_ok frame"));
                };
                Some(
                    convs
                        .into_iter()
                        .map(ConvSummary::into_owned)
                        .collect::<Vec<ConvSummary<'static>>>(),
                )
            } else {
                None
            };
            BusMsg::ConvsPart {
                session,
                token,
                partitions,
                convs,
            }
        }
        REANNOUNCE => {
            let count = r.partition_count()?;
            let mut partitions = Vec::with_capacity(usize::from(count).min(r.left() / 2));
            for _ in 0..count {
                partitions.push(r.partition()?);
            }
            BusMsg::Reannounce {
                partitions: partitions.into_boxed_slice(),
            }
        }
        ANNOUNCE => {
            let partition = r.partition()?;
            let count = usize::from(r.u16()?);
            if count > ANNOUNCED_SESSIONS_MAX {
                return Err(WireError::Malformed("too many announced sessions"));
            }
            // Capped by the bytes left, so a forged count allocates no more than the frame.
            let mut sessions = Vec::with_capacity(count.min(r.left() / ANNOUNCED_SESSION_LEN));
            for _ in 0..count {
                sessions.push(AnnouncedSession {
                    uid: r.uid()?,
                    device: r.device()?.ok_or(WireError::Malformed("device 0"))?,
                    session: r.session()?,
                    login_ms: r.u64()?,
                });
            }
            BusMsg::Announce {
                partition,
                sessions,
            }
        }
        FORGET_NODE => BusMsg::ForgetNode { node: r.node()? },
        LOG_DATA => {
            let partition = r.partition()?;
            let (epoch, data_epoch, from, at, leader_acked) =
                (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let len = r.u32()? as usize;
            let start = r.at;
            r.take(len)?;
            BusMsg::LogData(Box::new(LogData {
                partition,
                epoch,
                data_epoch,
                from,
                at,
                records: r.frame.slice(start..start + len),
                leader_acked,
            }))
        }
        REPLICA_ACK => BusMsg::ReplicaAck(ReplicaAck {
            partition: r.partition()?,
            epoch: r.u64()?,
            node: r.node()?,
            position: r.u64()?,
        }),
        EPOCH_QUERY => BusMsg::EpochQuery(EpochQuery {
            partition: r.partition()?,
            epoch: r.u64()?,
            node: r.node()?,
            last_epoch: r.u64()?,
        }),
        EPOCH_ANSWER => BusMsg::EpochAnswer(EpochAnswer {
            partition: r.partition()?,
            epoch: r.u64()?,
            last_epoch: r.u64()?,
            end: r.u64()?,
        }),
        kind => return Err(WireError::UnknownKind(kind)),
    })
}

/// A uid's size on the wire: kind and id.
const UID_LEN: usize = 9;
/// An announced session's size on the wire: uid, device, session, login time.
const ANNOUNCED_SESSION_LEN: usize = UID_LEN + 8 + 12 + 8;

/// A cursor over a frame. Every read checks the bytes left, so no input can make it panic.
struct Reader<'a> {
    frame: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.frame.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.left() < n {
            return Err(WireError::Malformed("truncated"));
        }
        let bytes = &self.frame[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("boolean byte")),
        }
    }

    fn node(&mut self) -> Result<u16> {
        let node = self.u16()?;
        if node > NODE_NUMBER_MAX {
            return Err(WireError::Malformed("node number over 12 bits"));
        }
        Ok(node)
    }

    fn session(&mut self) -> Result<SessionRef> {
        let node = self.node()?;
        let shard = self.u16()?;
        if usize::from(shard) >= SHARDS_MAX {
            return Err(WireError::Malformed("shard out of range"));
        }
        Ok(SessionRef {
            node,
            shard,
            slot: self.u32()?,
            generation: self.u32()?,
        })
    }

    fn uid(&mut self) -> Result<Uid> {
        let kind = UidKind::from_code(self.u8()?).ok_or(WireError::Malformed("uid kind"))?;
        Ok(Uid::new(kind, self.u64()?))
    }

    /// A device id, 0 for none.
    fn device(&mut self) -> Result<Option<DeviceId>> {
        match self.u64()? {
            0 => Ok(None),
            id => DeviceId::from_u64(id)
                .map(Some)
                .map_err(|_| WireError::Malformed("device id")),
        }
    }

    fn origin(&mut self) -> Result<Origin> {
        let session = self.session()?;
        let uid = self.uid()?;
        let device = self
            .device()?
            .ok_or(WireError::Malformed("origin device 0"))?;
        let flags = self.u8()?;
        if flags & !(ORIGIN_REQ | ORIGIN_SERVICE | ORIGIN_BINARY) != 0 {
            return Err(WireError::Malformed("origin flags"));
        }
        let req = self.u64()?;
        let req = if flags & ORIGIN_REQ != 0 {
            Some(req)
        } else if req == 0 {
            None
        } else {
            return Err(WireError::Malformed("req set without its flag"));
        };
        Ok(Origin {
            session,
            uid,
            device,
            encoding: if flags & ORIGIN_BINARY != 0 {
                Encoding::Binary
            } else {
                Encoding::Json
            },
            req,
            service: flags & ORIGIN_SERVICE != 0,
            // The latency of `send` → `send_ok` is measured from when this node took the
            // request: instants do not cross processes.
            received: std::time::Instant::now(),
        })
    }

    fn string16(&mut self, _what: &'static str) -> Result<String> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::Malformed("string is not UTF-8"))
    }

    /// A count of partitions, at most [`PARTITIONS_MAX`].
    fn partition_count(&mut self) -> Result<u16> {
        let count = self.u16()?;
        if usize::from(count) > PARTITIONS_MAX {
            return Err(WireError::Malformed("partition count out of range"));
        }
        Ok(count)
    }

    /// A partition id, below [`PARTITIONS_MAX`].
    fn partition(&mut self) -> Result<PartitionId> {
        let partition = self.u16()?;
        if usize::from(partition) >= PARTITIONS_MAX {
            return Err(WireError::Malformed("partition out of range"));
        }
        Ok(partition)
    }

    /// Per partition, a log position (see `put_positions`).
    fn positions(&mut self) -> Result<Vec<(PartitionId, u64)>> {
        let count = usize::from(self.u16()?);
        if count > PARTITIONS_MAX {
            return Err(WireError::Malformed("too many partition positions"));
        }
        // Capped by the bytes left, so a forged count allocates no more than the frame.
        let mut positions = Vec::with_capacity(count.min(self.left() / 10));
        for _ in 0..count {
            let partition = self.u16()?;
            if usize::from(partition) >= PARTITIONS_MAX {
                return Err(WireError::Malformed("partition out of range"));
            }
            positions.push((partition, self.u64()?));
        }
        Ok(positions)
    }

    fn stored_profile(&mut self) -> Result<StoredProfile> {
        let version = self.u64()?;
        let name = self.string16("profile name")?;
        let avatar = self.string16("profile avatar")?;
        if name.len() > limits::PROFILE_NAME_LEN_MAX
            || avatar.len() > limits::PROFILE_AVATAR_LEN_MAX
        {
            return Err(WireError::Malformed("profile over the codec's limits"));
        }
        Ok(StoredProfile {
            version,
            profile: Arc::new(Profile { name, avatar }),
        })
    }

    fn stored_profile_opt(&mut self) -> Result<Option<StoredProfile>> {
        if self.bool()? {
            self.stored_profile().map(Some)
        } else {
            Ok(None)
        }
    }

    fn bytes32(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn uids32(&mut self, max: usize) -> Result<Vec<Uid>> {
        let count = self.u32()? as usize;
        if count > max {
            return Err(WireError::Malformed("too many users"));
        }
        let mut uids = Vec::with_capacity(count.min(self.left() / UID_LEN));
        for _ in 0..count {
            uids.push(self.uid()?);
        }
        Ok(uids)
    }

    /// A server WebSocket message as the owner encoded it: one final, unmasked text, binary or
    /// close frame whose length field matches its bytes. Shares the frame's buffer.
    fn ws_message(&mut self) -> Result<Bytes> {
        let start = self.at + 4;
        let bytes = self.bytes32()?;
        check_server_ws_frame(bytes)?;
        Ok(self.frame.slice(start..start + bytes.len()))
    }

    /// A whole client binary frame.
    fn client(&mut self) -> Result<Message<'a>> {
        let len = frame_len(&self.frame[self.at..]).ok_or(WireError::Malformed("truncated"))?;
        let bytes = self.take(len)?;
        binary::decode(bytes)
            .map(|frame| frame.message)
            .map_err(|e| WireError::Client(e.to_string()))
    }
}

/// Checks that `bytes` is one whole server WebSocket frame, as `crate::bus::ws_message` and
/// the close frames make them: what a hostile peer sends is checked before it reaches a client.
fn check_server_ws_frame(bytes: &[u8]) -> Result<()> {
    let bad = |what| Err(WireError::Malformed(what));
    let [b0, b1, rest @ ..] = bytes else {
        return bad("ws message shorter than its header");
    };
    // FIN, no RSV bit, and text (1), binary (2) or close (8).
    if !matches!(b0, 0x81 | 0x82 | 0x88) {
        return bad("ws message: not a final text, binary or close frame");
    }
    if b1 & 0x80 != 0 {
        return bad("ws message: masked");
    }
    let (len, header_rest) = match b1 & 0x7f {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return bad("ws message: truncated length"),
        },
        127 => match rest.get(..8) {
            Some(l) => (u64::from_be_bytes(l.try_into().unwrap_or([0xff; 8])), 8),
            None => return bad("ws message: truncated length"),
        },
        short => (u64::from(short), 0),
    };
    if (rest.len() - header_rest) as u64 != len {
        return bad("ws message: length differs from its bytes");
    }
    if *b0 == 0x88 && len > 125 {
        return bad("ws message: close frame too long");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::ws::frame::Opcode;
    use chinwag_protocol::{
        ids::DeviceIdParts, message::HISTORY_LIMIT_MAX, ConvType, ErrorCode, HistoryRange, NodeType,
    };
    use chinwag_protocol::{
        AgentStats, History, Kick, ProfileOf, StreamChange, StreamEvent, Subject, Target,
        UserProfile,
    };
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn uid() -> impl Strategy<Value = Uid> {
        (0u8..3, any::<u64>()).prop_map(|(k, id)| Uid::new(UidKind::from_code(k).unwrap(), id))
    }

    fn device() -> impl Strategy<Value = DeviceId> {
        (0u8..3, 0u16..4096, 0u8..4, 0u32..1 << 30, any::<u16>()).prop_map(
            |(nt, cluster, dt, ts, counter)| {
                DeviceId::pack(DeviceIdParts {
                    node_type: NodeType::from_bits(nt).unwrap(),
                    cluster,
                    device_type: DeviceType::from_bits(dt).unwrap(),
                    ts,
                    counter,
                })
                .unwrap()
            },
        )
    }

    fn session() -> impl Strategy<Value = SessionRef> {
        (
            0..=NODE_NUMBER_MAX,
            0..SHARDS_MAX as u16,
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(node, shard, slot, generation)| SessionRef {
                node,
                shard,
                slot,
                generation,
            })
    }

    fn origin() -> impl Strategy<Value = Origin> {
        (
            session(),
            uid(),
            device(),
            any::<bool>(),
            any::<Option<u64>>(),
            any::<bool>(),
        )
            .prop_map(|(session, uid, device, binary, req, service)| Origin {
                session,
                uid,
                device,
                encoding: if binary {
                    Encoding::Binary
                } else {
                    Encoding::Json
                },
                req,
                service,
                received: std::time::Instant::now(),
            })
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!(".{{0,{max}}}")).unwrap()
    }

    fn msg() -> impl Strategy<Value = Msg<'static>> {
        (
            any::<u64>(),
            any::<u64>(),
            uid(),
            any::<u64>(),
            text(10),
            text(40),
            text(10),
        )
            .prop_map(|(conv, seq, from, ts, kind, body, cmid)| Msg {
                conv: ConvId(conv),
                seq: Seq(seq),
                from,
                ts,
                kind: kind.into(),
                body: body.into(),
                cmid: cmid.into(),
            })
    }

    fn ws(opcode: Opcode) -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..300)
            .prop_map(move |payload| crate::net::ws::frame::encode(opcode, &payload))
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            any::<u64>().prop_map(|c| Target::Conv(ConvId(c))),
            any::<u64>().prop_map(|s| Target::Shop(ShopId(s))),
            uid().prop_map(Target::User),
        ]
    }

    fn history() -> impl Strategy<Value = History> {
        (any::<u64>(), 0u8..3, 1u64.., 1..=HISTORY_LIMIT_MAX).prop_map(
            |(conv, range, seq, limit)| History {
                conv: ConvId(conv),
                range: match range {
                    0 => HistoryRange::Newest,
                    1 => HistoryRange::Before(Seq(seq)),
                    _ => HistoryRange::After(Seq(seq)),
                },
                limit,
            },
        )
    }

    fn group_op() -> impl Strategy<Value = GroupOp> {
        let members = || vec(uid(), 0..20);
        prop_oneof![
            (any::<u64>(), members()).prop_map(|(key, members)| GroupOp::Create { key, members }),
            (any::<u64>(), members()).prop_map(|(c, members)| GroupOp::Add {
                conv: ConvId(c),
                members
            }),
            (any::<u64>(), members()).prop_map(|(c, members)| GroupOp::Remove {
                conv: ConvId(c),
                members
            }),
            any::<u64>().prop_map(|c| GroupOp::Info { conv: ConvId(c) }),
        ]
    }

    fn conv_summary() -> impl Strategy<Value = ConvSummary<'static>> {
        (
            any::<u64>(),
            prop_oneof![
                any::<u64>().prop_map(|s| ConvType::Shop(ShopId(s))),
                Just(ConvType::Direct),
                Just(ConvType::Group),
            ],
            vec(uid(), 0..4),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(msg()),
            profile(),
            vec((uid(), profile()), 0..3),
        )
            .prop_map(
                |(conv, conv_type, members, last, read, unread, last_msg, profile, profiles)| {
                    ConvSummary {
                        conv: ConvId(conv),
                        conv_type,
                        member_count: members.len() as u32,
                        members,
                        last_seq: Seq(last),
                        read_seq: Seq(read),
                        unread,
                        last: last_msg,
                        profile,
                        profiles: profiles
                            .into_iter()
                            .map(|(uid, profile)| UserProfile { uid, profile })
                            .collect(),
                    }
                },
            )
    }

    fn stream_event() -> impl Strategy<Value = StreamEvent> {
        (0u16..6, any::<u64>(), uid(), 0u8..3, any::<u64>()).prop_map(
            |(after_msgs, conv, uid, change, value)| StreamEvent {
                after_msgs,
                conv: ConvId(conv),
                uid,
                change: match change {
                    0 => StreamChange::Joined { ts: value },
                    1 => StreamChange::Left { ts: value },
                    _ => StreamChange::Read { seq: Seq(value) },
                },
            },
        )
    }

    /// Per partition, a log position (a shard reads a few of the node's partitions).
    fn positions() -> impl Strategy<Value = Vec<(PartitionId, u64)>> {
        vec((0..PARTITIONS_MAX as u16, any::<u64>()), 0..6)
    }

    fn profile() -> impl Strategy<Value = Profile> {
        (
            text(limits::PROFILE_NAME_LEN_MAX / 4),
            text(limits::PROFILE_AVATAR_LEN_MAX / 4),
        )
            .prop_map(|(name, avatar)| Profile { name, avatar })
    }

    fn stored_profile() -> impl Strategy<Value = StoredProfile> {
        (any::<u64>(), profile()).prop_map(|(version, profile)| StoredProfile {
            version,
            profile: Arc::new(profile),
        })
    }

    fn subject() -> impl Strategy<Value = Subject> {
        prop_oneof![
            uid().prop_map(Subject::User),
            any::<u64>().prop_map(|c| Subject::Conv(ConvId(c))),
            any::<u64>().prop_map(|s| Subject::Shop(ShopId(s))),
        ]
    }

    fn profile_op() -> impl Strategy<Value = ProfileOp> {
        prop_oneof![
            (subject(), profile())
                .prop_map(|(subject, profile)| ProfileOp::Set(ProfileOf { subject, profile })),
            subject().prop_map(ProfileOp::Get),
        ]
    }

    fn stream_result() -> impl Strategy<Value = std::result::Result<StreamFound, StreamRefused>> {
        prop_oneof![
            (vec(msg(), 0..5), vec(stream_event(), 0..4), positions())
                .prop_map(|(msgs, events, next)| Ok(StreamFound { msgs, events, next })),
            (0..STREAM_ERRORS.len(), positions()).prop_map(|(i, from)| Err(StreamRefused {
                text: STREAM_ERRORS[i].1,
                from
            })),
        ]
    }

    /// Every variant of the bus, with every field drawn at random.
    fn bus_msg() -> impl Strategy<Value = BusMsg> {
        prop_oneof![
            (
                origin(),
                target(),
                "[ -~]{1,20}",
                "[a-z]{1,10}",
                text(100),
                proptest::option::of(stored_profile()),
                any::<bool>()
            )
                .prop_map(
                    |(origin, target, cmid, kind, body, profile, profile_pending)| {
                        BusMsg::Send(Box::new(SendRequest {
                            origin,
                            target,
                            cmid,
                            kind,
                            body,
                            profile,
                            profile_pending,
                        }))
                    }
                ),
            (origin(), any::<u64>(), any::<u64>()).prop_map(|(o, c, s)| BusMsg::Read {
                origin: Box::new(o),
                cursor: Cursor {
                    conv: ConvId(c),
                    seq: Seq(s)
                }
            }),
            (origin(), any::<u64>()).prop_map(|(o, c)| BusMsg::Resolve {
                origin: Box::new(o),
                conv: ConvId(c)
            }),
            (origin(), history()).prop_map(|(o, history)| BusMsg::History {
                origin: Box::new(o),
                history
            }),
            (origin(), uid(), proptest::option::of(device())).prop_map(|(o, uid, device)| {
                BusMsg::KickUser {
                    origin: Box::new(o),
                    kick: Kick { uid, device },
                }
            }),
            (origin(), vec(uid(), 0..10), any::<u64>()).prop_map(|(o, users, token)| {
                BusMsg::Presence {
                    origin: Box::new(o),
                    users,
                    token,
                }
            }),
            (origin(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(o, shop, from_ms, to_ms)| BusMsg::AgentStats {
                    origin: Box::new(o),
                    stats: AgentStats {
                        shop: ShopId(shop),
                        from_ms,
                        to_ms,
                    },
                }
            ),
            (session(), positions()).prop_map(|(session, from)| BusMsg::StreamRead {
                session,
                from: from.into_boxed_slice()
            }),
            (origin(), any::<u64>(), 0..=PARTITIONS_MAX as u16).prop_map(
                |(o, token, partitions)| BusMsg::Convs {
                    origin: Box::new(o),
                    token,
                    partitions,
                }
            ),
            (session(), uid(), 0u8..4).prop_map(|(session, uid, t)| BusMsg::Register {
                session,
                uid,
                device_type: DeviceType::from_bits(t).unwrap()
            }),
            (session(), uid(), device()).prop_map(|(session, uid, device)| BusMsg::Unregister {
                session,
                uid,
                device
            }),
            (any::<u64>(), uid(), proptest::option::of(stored_profile())).prop_map(
                |(s, agent, profile)| BusMsg::AgentOnline {
                    shop: ShopId(s),
                    agent,
                    profile: profile.map(Box::new),
                }
            ),
            (any::<u64>(), uid()).prop_map(|(s, agent)| BusMsg::AgentOffline {
                shop: ShopId(s),
                agent
            }),
            (origin(), group_op())
                .prop_map(|(origin, op)| BusMsg::Group(Box::new(GroupRequest { origin, op }))),
            (origin(), profile_op())
                .prop_map(|(origin, op)| BusMsg::Profile(Box::new(ProfileRequest { origin, op }))),
            (session(), stored_profile()).prop_map(|(session, profile)| BusMsg::OwnProfile {
                session,
                profile: Box::new(profile),
            }),
            (
                text(10),
                any::<u64>(),
                any::<u64>(),
                text(20),
                text(8),
                text(50),
                any::<u64>()
            )
                .prop_map(|(app_id, shop, customer, cmid, kind, body, create_time)| {
                    BusMsg::WechatInbound(Box::new(Inbound {
                        app_id,
                        shop,
                        customer,
                        cmid,
                        kind,
                        body,
                        create_time,
                    }))
                }),
            (
                any::<u64>(),
                any::<u64>(),
                0..WECHAT_REASONS.len(),
                any::<Option<i64>>(),
                text(30)
            )
                .prop_map(|(conv, seq, reason, errcode, detail)| {
                    BusMsg::WechatUndelivered(Box::new(WechatUndelivered {
                        conv: ConvId(conv),
                        seq: Seq(seq),
                        undelivered: Undelivered {
                            reason: WECHAT_REASONS[reason],
                            errcode,
                            detail,
                        },
                    }))
                }),
            (session(), prop_oneof![ws(Opcode::Text), ws(Opcode::Binary)])
                .prop_map(|(to, ws_message)| BusMsg::Deliver { to, ws_message }),
            (
                vec(uid(), 0..10),
                proptest::option::of(device()),
                ws(Opcode::Text),
                ws(Opcode::Binary)
            )
                .prop_map(|(users, except, json, binary)| BusMsg::Push(Arc::new(
                    Fanout {
                        users: users.into_iter().collect(),
                        except,
                        json,
                        binary
                    }
                ))),
            (
                session(),
                uid(),
                proptest::option::of(device()),
                proptest::option::of(stored_profile())
            )
                .prop_map(|(session, uid, device, profile)| BusMsg::Registered {
                    session,
                    uid,
                    device,
                    profile: profile.map(Box::new),
                }),
            (session(), any::<bool>()).prop_map(|(session, by_service)| BusMsg::Kick {
                session,
                by_service
            }),
            (session(), 0..SHARDS_MAX, stream_result()).prop_map(|(session, shard, result)| {
                BusMsg::StreamPart(Box::new(StreamPart {
                    session,
                    shard,
                    result,
                }))
            }),
            (
                session(),
                any::<u64>(),
                proptest::option::of(vec((uid(), vec(device(), 0..3)), 0..4))
            )
                .prop_map(|(session, token, online)| BusMsg::PresencePart {
                    session,
                    token,
                    online: online.map(|online| online
                        .into_iter()
                        .map(|(uid, devices)| Online { uid, devices })
                        .collect()),
                }),
            (
                session(),
                any::<u64>(),
                0..=PARTITIONS_MAX as u16,
                proptest::option::of(vec(conv_summary(), 0..3))
            )
                .prop_map(|(session, token, partitions, convs)| BusMsg::ConvsPart {
                    session,
                    token,
                    partitions,
                    convs
                }),
            vec(0..PARTITIONS_MAX as u16, 0..20).prop_map(|partitions| BusMsg::Reannounce {
                partitions: partitions.into_boxed_slice(),
            }),
            (
                0..PARTITIONS_MAX as u16,
                vec((uid(), device(), session(), any::<u64>()), 0..6)
            )
                .prop_map(|(partition, sessions)| BusMsg::Announce {
                    partition,
                    sessions: sessions
                        .into_iter()
                        .map(|(uid, device, session, login_ms)| AnnouncedSession {
                            uid,
                            device,
                            session,
                            login_ms,
                        })
                        .collect(),
                }),
            (0..=NODE_NUMBER_MAX).prop_map(|node| BusMsg::ForgetNode { node }),
        ]
    }

    fn replication_msg() -> impl Strategy<Value = BusMsg> {
        let p = 0..PARTITIONS_MAX as u16;
        let node = 0..=NODE_NUMBER_MAX;
        prop_oneof![
            (p.clone(), any::<[u64; 5]>(), vec(any::<u8>(), 0..300)).prop_map(
                |(partition, v, records)| BusMsg::LogData(Box::new(LogData {
                    partition,
                    epoch: v[0],
                    data_epoch: v[1],
                    from: v[2],
                    at: v[3],
                    records: Bytes::from(records),
                    leader_acked: v[4],
                }))
            ),
            (p.clone(), any::<u64>(), node.clone(), any::<u64>()).prop_map(
                |(partition, epoch, node, position)| BusMsg::ReplicaAck(ReplicaAck {
                    partition,
                    epoch,
                    node,
                    position
                })
            ),
            (p.clone(), any::<u64>(), node, any::<u64>()).prop_map(
                |(partition, epoch, node, last_epoch)| BusMsg::EpochQuery(EpochQuery {
                    partition,
                    epoch,
                    node,
                    last_epoch
                })
            ),
            (p, any::<[u64; 3]>()).prop_map(|(partition, v)| BusMsg::EpochAnswer(EpochAnswer {
                partition,
                epoch: v[0],
                last_epoch: v[1],
                end: v[2],
            })),
        ]
    }

    #[test]
    fn a_role_change_is_never_encoded_and_a_partition_past_the_maximum_is_refused() {
        let role = BusMsg::Role(Box::new(crate::cluster::roles::RoleChange::Drop {
            partition: 3,
        }));
        assert!(encode_to_bytes(&role).is_err());
        let ack = BusMsg::ReplicaAck(ReplicaAck {
            partition: 3,
            epoch: 1,
            node: 2,
            position: 4,
        });
        let mut wire = encode_to_bytes(&ack).unwrap().to_vec();
        wire[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&(PARTITIONS_MAX as u16).to_be_bytes());
        assert!(decode(&Bytes::from(wire)).is_err());
    }

    /// Everything a message holds but the instant a request was received (which does not
    /// cross processes), for comparing a decoded message with the original.
    fn fields(msg: &BusMsg) -> String {
        let text = format!("{msg:?}");
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find("received: ") {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let end = tail.find('}').unwrap_or(tail.len());
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
    }

    fn decode_bus_msg(bytes: &Bytes) -> BusMsg {
        match decode(bytes).unwrap() {
            LinkFrame::Bus(msg) => msg,
            other => panic!("expected a bus message, got {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_variant_round_trips(msg in bus_msg()) {
            let wire = encode_to_bytes(&msg).unwrap();
            let decoded = decode_bus_msg(&wire);
            prop_assert_eq!(fields(&decoded), fields(&msg));
            // And the decoded message encodes to the very same bytes.
            prop_assert_eq!(encode_to_bytes(&decoded).unwrap(), wire);
        }

        #[test]
        fn every_replication_message_round_trips(msg in replication_msg()) {
            let wire = encode_to_bytes(&msg).unwrap();
            let decoded = decode_bus_msg(&wire);
            prop_assert_eq!(format!("{decoded:?}"), format!("{msg:?}"));
            prop_assert_eq!(encode_to_bytes(&decoded).unwrap(), wire);
        }

        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(bytes));
        }

        /// Bytes that start as a valid frame, then are cut, flipped or extended: an error or a
        /// message, never a panic.
        #[test]
        fn damaged_frames_never_panic_the_decoder(
            msg in bus_msg(),
            flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let wire = encode_to_bytes(&msg).unwrap();
            let mut damaged = wire.to_vec();
            for (at, byte) in flips {
                let i = at.index(damaged.len());
                damaged[i] ^= byte;
            }
            let _ = decode(&Bytes::from(damaged.clone()));
            let cut = cut.index(damaged.len());
            prop_assert!(decode(&Bytes::from(damaged[..cut].to_vec())).is_err());
        }

        #[test]
        fn hello_round_trips(cluster in text(40), source in 0..=NODE_NUMBER_MAX, target in 0..=NODE_NUMBER_MAX) {
            let hello = Hello { cluster, source, target };
            let mut out = BytesMut::new();
            encode_hello(&hello, &mut out).unwrap();
            let LinkFrame::Hello(decoded) = decode(&out.freeze()).unwrap() else {
                panic!("not a hello");
            };
            prop_assert_eq!(decoded, hello);
        }
    }

    #[test]
    fn a_send_the_peer_would_refuse_does_not_encode() {
        let origin = Origin {
            session: SessionRef {
                node: 1,
                shard: 0,
                slot: 0,
                generation: 1,
            },
            uid: Uid::new(UidKind::Buyer, 1),
            device: DeviceId::from_u64(7).unwrap(),
            encoding: Encoding::Json,
            req: None,
            service: false,
            received: std::time::Instant::now(),
        };
        let send = BusMsg::Send(Box::new(SendRequest {
            origin,
            target: Target::Conv(ConvId(1)),
            cmid: "c".into(),
            kind: String::new(),
            body: String::new(),
            profile: None,
            profile_pending: false,
        }));
        let mut out = BytesMut::from(&b"xy"[..]);
        assert!(encode(&send, &mut out).is_err());
        assert_eq!(&out[..], b"xy", "left as it was");
    }

    #[test]
    fn an_announce_over_its_limit_neither_encodes_nor_decodes() {
        let announced = AnnouncedSession {
            uid: Uid::new(UidKind::Buyer, 1),
            device: DeviceId::from_u64(7).unwrap(),
            session: SessionRef {
                node: 2,
                shard: 0,
                slot: 1,
                generation: 1,
            },
            login_ms: 1,
        };
        let full = BusMsg::Announce {
            partition: 3,
            sessions: vec![announced; ANNOUNCED_SESSIONS_MAX],
        };
        let wire = encode_to_bytes(&full).unwrap();
        assert_eq!(
            wire.len(),
            HEADER_LEN + 2 + 2 + ANNOUNCED_SESSIONS_MAX * ANNOUNCED_SESSION_LEN
        );
        let over = BusMsg::Announce {
            partition: 3,
            sessions: vec![announced; ANNOUNCED_SESSIONS_MAX + 1],
        };
        assert!(encode_to_bytes(&over).is_err());
        // The count field says one more than the limit: refused before reading on.
        let mut forged = wire.to_vec();
        forged[HEADER_LEN + 2..HEADER_LEN + 4]
            .copy_from_slice(&(ANNOUNCED_SESSIONS_MAX as u16 + 1).to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(forged)),
            Err(WireError::Malformed(_))
        ));
        let past = BusMsg::Reannounce {
            partitions: vec![PARTITIONS_MAX as u16].into_boxed_slice(),
        };
        assert!(
            encode_to_bytes(&past).is_err(),
            "a partition past the limit"
        );
    }

    #[test]
    fn a_fanout_travels_once_with_its_recipients() {
        let fanout = Fanout::new(
            (0..100).map(|i| Uid::new(UidKind::Buyer, i)).collect(),
            None,
            Message::Kicked("hi".into()),
        );
        let pushes = fanout.json.len() + fanout.binary.len();
        let wire = encode_to_bytes(&BusMsg::Push(Arc::new(fanout))).unwrap();
        // The pushes once, plus 9 bytes per user and the fixed fields.
        assert_eq!(
            wire.len(),
            HEADER_LEN + 4 + 100 * UID_LEN + 8 + 4 + 4 + pushes
        );
    }

    #[test]
    fn rejects_a_ws_message_that_is_not_a_server_frame() {
        let to = SessionRef {
            node: 1,
            shard: 0,
            slot: 1,
            generation: 1,
        };
        let good = crate::bus::ws_message(
            &Frame::new(crate::bus::error(ErrorCode::Unavailable, "x")),
            Encoding::Json,
        );
        let wire = encode_to_bytes(&BusMsg::Deliver {
            to,
            ws_message: good.clone(),
        })
        .unwrap();
        assert!(decode(&wire).is_ok());
        // A masked frame (as a client sends) and a frame whose length lies are refused.
        for bad in [
            {
                let mut b = good.to_vec();
                b[1] |= 0x80;
                b
            },
            good[..good.len() - 1].to_vec(),
            vec![0x01, 0x00],
        ] {
            let wire = encode_to_bytes(&BusMsg::Deliver {
                to,
                ws_message: Bytes::from(bad),
            })
            .unwrap();
            assert!(matches!(decode(&wire), Err(WireError::Malformed(_))));
        }
    }

    #[test]
    fn rejects_node_numbers_over_12_bits_and_unknown_kinds() {
        let mut out = BytesMut::new();
        encode_hello(
            &Hello {
                cluster: "c".into(),
                source: 0x1000,
                target: 1,
            },
            &mut out,
        )
        .unwrap();
        assert!(decode(&out.split().freeze()).is_err());
        encode_heartbeat(3, &mut out);
        out[5] = 0x7f;
        assert_eq!(
            decode(&out.split().freeze()).unwrap_err(),
            WireError::UnknownKind(0x7f)
        );
        encode_heartbeat(3, &mut out);
        out[4] = 9;
        assert_eq!(decode(&out.freeze()).unwrap_err(), WireError::Version(9));
    }
}
