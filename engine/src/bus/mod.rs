//! The Msg-Bus: the one message type that travels between shards ([`BusMsg`]), the addresses
//! it carries ([`SessionRef`], [`Origin`]), who owns what, the mailboxes ([`mailbox`]) and the
//! post office that sends and delivers ([`post`]).
//!
//! Every piece of state lives in one partition, found by hashing its key, and has one owner
//! shard: the shard the [`PartitionMap`] gives that partition (docs/architecture.md,
//! "Conversations: ownership, routing, fan-out"):
//!
//! | state | partition |
//! |---|---|
//! | a user's devices and which session holds each device | `hash(uid)` |
//! | a shop's conversations, its dispatcher (online agents, waiting queue) | `hash(shop)` |
//! | a direct conversation | `hash(unordered pair)` |
//! | a group conversation, while the service creates it | `hash(group key)` |
//! | a user's profile (nickname, avatar) | `hash(uid)`, with its devices |
//! | a shop's profile | `hash(shop)`, with its conversations |
//! | a conversation's profile | the conversation's owner |
//! | any conversation, by id | the partition in the id's low 16 bits ([`partitions`]) |
//!
//! A session's shard posts a client's request to the owner (handled in place when it is
//! itself the owner); the owner answers with messages for the session's shard. A push for the
//! members of a conversation goes as one [`Fanout`] to every shard, each of which knows only
//! its own logged-in devices. Every queue is FIFO per pair of shards, so a device sees one
//! conversation's pushes in the order the owner made them. In a cluster the owner may be on
//! another node, and the session too: [`post::PostOffice::hop`] decides, and the node links
//! carry the same messages (docs/cluster.md, "The message path").

pub mod mailbox;
pub mod partitions;
pub mod placement;
pub mod post;
pub mod reply_size;
pub mod stream_position;

use std::sync::Arc;

use bytes::Bytes;
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    binary, json, ConvId, ConvSummary, Cursor, DeviceId, DeviceType, ErrorCode, ErrorReply, Frame,
    History, Kick, Message, Online, ProfileOf, ShopId, Subject, Target, Uid,
};
use smallvec::SmallVec;

use crate::cluster::roles::RoleChange;
use crate::net::ws::frame::{encode_with, Opcode};
use crate::store::StoredProfile;
pub use partitions::{PartitionId, PartitionMap};
use placement::GroupKey;

/// The most shards a node may run.
pub const SHARDS_MAX: usize = 256;

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
    /// The encoding of the request (the reply uses it).
    pub encoding: Encoding,
    /// The request's `req`.
    pub req: Option<u64>,
    /// The request came from a backend service (the service port): `uid` is the user it acts
    /// as, it may read any conversation, and its replies carry the service ops' codes.
    pub service: bool,
    /// When the session decoded the request (for the send → `send_ok` latency).
    pub received: std::time::Instant,
}

impl Origin {
    /// A reply to this request, as a WebSocket frame in the request's encoding. A service's
    /// request gets the service op's reply (`send_as_ok` for `send_ok`, and so on), so the
    /// owner answers both kinds of caller with the same code.
    pub fn reply(&self, message: Message<'_>) -> Bytes {
        let message = match message {
            Message::SendOk(ok) if self.service => Message::SendAsOk(ok),
            Message::HistoryOk(page) if self.service => Message::ConvHistoryOk(page),
            message => message,
        };
        ws_message(
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

/// An `error` message (counted in `chinwag_errors_total`: every error reply is made here).
pub fn error(code: ErrorCode, text: &str) -> Message<'_> {
    crate::operator::metrics::error_made(code);
    Message::Error(ErrorReply {
        code,
        message: text.into(),
    })
}

/// Where a session lives: its node, its shard, its slab slot, and the generation that tells it
/// apart from a later session in the same slot.
///
/// `node` is the node's number in its cluster (12 bits, [`NODE_NUMBER_MAX`]; outside a
/// cluster, the number its NodeId takes from the listen address): a message for a session of
/// another node leaves by the node links (`cluster::link`), one for this node's goes to the
/// shard's mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionRef {
    pub node: u16,
    pub shard: u16,
    pub slot: u32,
    pub generation: u32,
}

/// The highest node number: the seed's NodeId layout gives it 12 bits.
pub const NODE_NUMBER_MAX: u16 = 0x0fff;

// A node's shards fit the session address's shard field.
const _: () = assert!(SHARDS_MAX <= u16::MAX as usize + 1);

impl SessionRef {
    /// The session is one of node `node`'s (the shard compares it with its own number before
    /// handing a message to a socket).
    pub fn is_on(&self, node: u16) -> bool {
        self.node == node
    }
}

/// The one message that travels between shards. The first group goes to the owner of a
/// conversation, a shop or a user's devices ([`BusMsg::owner`] says which shard that is); the
/// second to the shard that holds a session.
#[derive(Debug)]
pub enum BusMsg {
    /// `send` from a client.
    Send(Box<SendRequest>),
    /// `read` from a client.
    Read {
        /// Who reads.
        origin: Box<Origin>,
        /// Up to where.
        cursor: Cursor,
    },
    /// `resolve` from an agent.
    Resolve {
        /// The agent.
        origin: Box<Origin>,
        /// The conversation.
        conv: ConvId,
    },
    /// `history` from a client.
    History {
        /// Who asks.
        origin: Box<Origin>,
        /// Which page.
        history: History,
    },
    /// `kick` from a service, for the owner of the user's devices.
    KickUser {
        /// The service.
        origin: Box<Origin>,
        /// Whom.
        kick: Kick,
    },
    /// `presence` from a service: the receiving shard's part (the users it owns).
    Presence {
        /// The service.
        origin: Box<Origin>,
        /// The users, all owned by the receiving shard.
        users: Vec<Uid>,
        /// The connection's token for the request (see [`BusMsg::PresencePart`]).
        token: u64,
    },
    /// The message stream of a service: the next messages of the receiving shard's partitions'
    /// logs (sent to another node: of that node's partitions; its inbox splits the read over
    /// its shards, each answering for its own).
    StreamRead {
        /// The service connection.
        session: SessionRef,
        /// Per partition of the receiving shard (or node): from this position of its log
        /// ([`STREAM_NOW`]: from the end; 0: from the start).
        from: Box<[(PartitionId, u64)]>,
    },
    /// `agent_stats` from a service, for the owner of the shop.
    AgentStats {
        /// The service.
        origin: Box<Origin>,
        /// Which shop, over which window.
        stats: chinwag_protocol::AgentStats,
    },
    /// `convs` from a client: the receiving shard's part of the user's conversation list.
    Convs {
        /// Who asks.
        origin: Box<Origin>,
        /// The session's token for this request (see [`BusMsg::ConvsPart`]).
        token: u64,
        /// How many partitions the receiver serves, echoed by its part (the gather is complete
        /// when its parts cover every partition of the cluster).
        partitions: u16,
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
        /// The agent's profile as its session had it at login (for the `members` pushes of
        /// the conversations it gets). Boxed, as the other profiles here: rare, and a bus
        /// message stays small.
        profile: Option<Box<StoredProfile>>,
    },
    /// An agent's session ended.
    AgentOffline {
        /// The agent's shop.
        shop: ShopId,
        /// The agent.
        agent: Uid,
    },

    /// A backend service's operation on group conversations (create, add, remove, info).
    Group(Box<GroupRequest>),
    /// A backend service's `set_profile` or `get_profile`, for the owner of the subject.
    Profile(Box<ProfileRequest>),
    /// A WeChat customer's message, accepted by the callback endpoint on any shard: for the
    /// owner of its shop, to store and dispatch as a buyer's.
    WechatInbound(Box<crate::wechat::endpoint::Inbound>),
    /// A reply that did not reach a WeChat customer (from the sender's threads, or from the
    /// owner itself when it could not queue it): for the conversation's owner, to leave a
    /// notice in the conversation.
    WechatUndelivered(Box<WechatUndelivered>),

    /// An encoded server message (a reply, an error) for one session. Dropped if the session
    /// is gone.
    Deliver {
        /// The session.
        to: SessionRef,
        /// The whole WebSocket message, header included.
        ws_message: Bytes,
    },
    /// A push for this shard's devices of some users.
    Push(Arc<Fanout>),
    /// The device of a login, found or registered by the user's owner shard (`None` if the
    /// registration could not be stored).
    Registered {
        /// The session logging in.
        session: SessionRef,
        /// The user logging in.
        uid: Uid,
        /// Its device.
        device: Option<DeviceId>,
        /// The user's profile, which the session carries in its `send`s.
        profile: Option<Box<StoredProfile>>,
    },
    /// A service set the profile of the session's user: the session carries this one in its
    /// `send`s from now on.
    OwnProfile {
        /// The session.
        session: SessionRef,
        /// The new profile.
        profile: Box<StoredProfile>,
    },
    /// The device logged in elsewhere, or a service kicked it: push `kicked` and close with 4001.
    Kick {
        /// The session.
        session: SessionRef,
        /// A service asked for it (rather than a newer login of the device).
        by_service: bool,
    },
    /// One shard's next messages for a stream, or why its position is refused.
    StreamPart(Box<StreamPart>),
    /// One shard's part of a `presence` reply.
    PresencePart {
        /// The service connection that asked.
        session: SessionRef,
        /// The connection's token for the request (unique per connection, unlike `req`).
        token: u64,
        /// The online devices of the asked users this shard owns; `None` when the request
        /// could not reach the shard (its mailbox was full).
        online: Option<Vec<Online>>,
    },
    /// One shard's part of a `convs` reply.
    ConvsPart {
        /// The session that asked.
        session: SessionRef,
        /// The session's token for the request: unique per session, unlike the client's `req`.
        token: u64,
        /// The partitions this part covers (the request's count).
        partitions: u16,
        /// That shard's conversations of the user; `None` when the request could not reach
        /// the shard (its mailbox was full).
        convs: Option<Vec<ConvSummary<'static>>>,
    },
    /// A node that now owns `partitions` (it started, or took them over) asks for the
    /// sessions of their users: every shard that receives it (each shard of the node it is
    /// sent to) answers with [`BusMsg::Announce`]s to the users' owners (docs/cluster.md,
    /// "What a node's loss costs").
    Reannounce {
        /// The partitions whose users' sessions are asked for, ascending, each once.
        partitions: Box<[PartitionId]>,
    },
    /// Logged-in sessions of users of one partition, for the owner of their devices, which
    /// adds those it does not know a newer session for (`logic/devices.rs`). At most
    /// [`ANNOUNCED_SESSIONS_MAX`]; a shard sends as many as it needs.
    Announce {
        /// The partition of every user below.
        partition: PartitionId,
        /// The sessions.
        sessions: Vec<AnnouncedSession>,
    },
    /// The link to node `node` came up again: the owner forgets the sessions on it it holds
    /// (the node may have restarted, and its sessions died with its earlier run), and the node
    /// announces those it holds now, asked by the same link-up. Posted by the link thread to
    /// each shard of its node, ahead of anything the new link delivers.
    ForgetNode {
        /// The node whose link came up.
        node: u16,
    },

    // ---- Replication (issue 14; cluster/replica.rs): one partition's log between its
    // leader and a follower. They go to the shard holding the partition's replica here
    // ([`PartitionMap::replica_shard`]), sent to a named node (`To::Node`). ----
    /// This node's role for a partition changed (the leadership thread, through the node's
    /// `RoleSink`; never sent over a link).
    Role(Box<RoleChange>),
    /// Leader → follower: records of the partition's log.
    LogData(Box<LogData>),
    /// Follower → leader: where its log is (committed under its fsync policy), at the epoch it
    /// follows. Also the answer to records it could not append there (a gap, an older epoch).
    ReplicaAck(ReplicaAck),
    /// Follower → leader: where does my newest epoch end in your log?
    EpochQuery(EpochQuery),
    /// Leader → follower: the answer to an [`EpochQuery`].
    EpochAnswer(EpochAnswer),
}

/// Records of a partition's log, for a follower (frames stay under the link's frame limit:
/// the leader reads chunks of at most `cluster::replica::CHUNK_BYTES`, whole records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogData {
    pub partition: PartitionId,
    /// The leader's epoch: a follower refuses records from an older one.
    pub epoch: u64,
    /// The epoch that wrote these records (a chunk never spans two).
    pub data_epoch: u64,
    /// The follower's log position these records continue, as the leader believes.
    pub from: u64,
    /// Where the records start: `from`, or the next segment's first record when `from` is the
    /// end of a segment.
    pub at: u64,
    /// Whole records, the leader's bytes.
    pub records: Bytes,
    /// How far the leader's log is acknowledged (every in-sync replica has it).
    pub leader_acked: u64,
}

/// A follower's position in a partition's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAck {
    pub partition: PartitionId,
    /// The epoch the follower follows (an older leader learns that it is stale).
    pub epoch: u64,
    /// The follower's node.
    pub node: u16,
    /// Its log's tail, committed.
    pub position: u64,
}

/// A follower's question to its new leader (Kafka's `OffsetsForLeaderEpoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochQuery {
    pub partition: PartitionId,
    /// The epoch of the leader the follower follows.
    pub epoch: u64,
    /// The follower's node.
    pub node: u16,
    /// The newest epoch of the follower's history.
    pub last_epoch: u64,
}

/// The leader's answer: its newest epoch at or below the one asked, and where that epoch's
/// stretch of its log ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochAnswer {
    pub partition: PartitionId,
    pub epoch: u64,
    pub last_epoch: u64,
    pub end: u64,
}

/// One logged-in session, as its shard announces it to the owner of its user's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnouncedSession {
    pub uid: Uid,
    pub device: DeviceId,
    pub session: SessionRef,
    /// When the login completed, by the clock of the session's node (Unix ms): of two
    /// announced sessions of one device, the later login stays.
    pub login_ms: u64,
}

/// The most sessions one [`BusMsg::Announce`] carries (37 bytes each on a node link: a frame
/// of about 38 KB).
pub const ANNOUNCED_SESSIONS_MAX: usize = 1024;

// A mailbox preallocates its slots, and every message is moved through one: the bulky parts
// (a client request's origin, a `send`'s strings) are boxed to keep a message small.
const _: () = assert!(std::mem::size_of::<BusMsg>() <= 56);

/// A [`BusMsg::StreamRead`] from the end of the log: only what is stored from now on.
pub const STREAM_NOW: u64 = u64::MAX;

/// One shard's answer to a [`BusMsg::StreamRead`].
#[derive(Debug)]
pub struct StreamPart {
    /// The service connection.
    pub session: SessionRef,
    /// The shard whose partitions were read (on the node that owns them).
    pub shard: usize,
    /// The messages and events found and, per partition read, the position after them; or
    /// why a position was refused. Either way it names the partitions it covers, which is how
    /// a stream counts its reads in flight across shards and nodes.
    pub result: Result<StreamFound, StreamRefused>,
}

/// [`StreamRefused::text`] when a partition's leader is changing (the shard read leads it on
/// a lease that ran out): answered `unavailable`, the subscriber asks again.
pub const STREAM_NOT_LED: &str = "the partition's leader is changing: subscribe again";

/// Why a [`BusMsg::StreamRead`] was refused, and what it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRefused {
    pub text: &'static str,
    /// The read's partitions and the positions it asked for.
    pub from: Vec<(PartitionId, u64)>,
}

impl StreamPart {
    /// The partitions this part answers for.
    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + '_ {
        let positions = match &self.result {
            Ok(found) => &found.next,
            Err(refused) => &refused.from,
        };
        positions.iter().map(|&(p, _)| p)
    }
}

/// The messages and events one stream read found, and where each partition read is read on.
#[derive(Debug)]
pub struct StreamFound {
    pub msgs: Vec<chinwag_protocol::Msg<'static>>,
    pub events: Vec<chinwag_protocol::StreamEvent>,
    /// Per partition read: the position in its log to read on from.
    pub next: Vec<(PartitionId, u64)>,
}

/// Which stored reply did not reach WeChat, and why.
#[derive(Debug)]
pub struct WechatUndelivered {
    pub conv: ConvId,
    pub seq: chinwag_protocol::Seq,
    pub undelivered: crate::wechat::sender::Undelivered,
}

/// A client's `send`.
#[derive(Debug)]
pub struct SendRequest {
    /// Who sends.
    pub origin: Origin,
    /// Where to.
    pub target: Target,
    /// The client message id.
    pub cmid: String,
    /// The message kind.
    pub kind: String,
    /// The body.
    pub body: String,
    /// The sender's profile, as its session knows it (the owner keeps a copy and puts it in
    /// the `msg` push).
    pub profile: Option<StoredProfile>,
    /// A service's `send_as`: the request goes to the sender's owner first, which fills in
    /// `profile` and passes it on to the conversation's owner.
    pub profile_pending: bool,
}

/// A service's operation on group conversations. Members lists are at most
/// [`GROUP_MEMBERS_PER_REQUEST_MAX`] long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOp {
    /// Creates the group `key` names with `members` (distinct); if the key has a group
    /// already, answers with that one and changes nothing.
    Create { key: u64, members: Vec<Uid> },
    /// Adds `members` to a group (users who are members already are left as they are).
    Add { conv: ConvId, members: Vec<Uid> },
    /// Removes `members` from a group; each must be a member.
    Remove { conv: ConvId, members: Vec<Uid> },
    /// A conversation's type, members (or their count) and last seq; any conversation type.
    Info { conv: ConvId },
}

/// The most users one group operation may name: it bounds a request and the `members_delta`
/// push it causes.
pub const GROUP_MEMBERS_PER_REQUEST_MAX: usize = 1_000;

/// A [`GroupOp`] and the service that asked (an [`Origin`] with `service` set: the reply
/// goes to its connection like any acknowledgement).
#[derive(Debug)]
pub struct GroupRequest {
    pub origin: Origin,
    pub op: GroupOp,
}

/// A profile operation of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileOp {
    /// `set_profile`: the subject's new profile.
    Set(ProfileOf),
    /// `get_profile`: the subject's profile.
    Get(Subject),
}

impl ProfileOp {
    /// Whose profile.
    pub fn subject(&self) -> Subject {
        match self {
            ProfileOp::Set(of) => of.subject,
            ProfileOp::Get(subject) => *subject,
        }
    }
}

/// A [`ProfileOp`] and the service that asked.
#[derive(Debug)]
pub struct ProfileRequest {
    pub origin: Origin,
    pub op: ProfileOp,
}

impl BusMsg {
    /// The client request's origin, for requests a client made.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            BusMsg::Send(send) => Some(&send.origin),
            BusMsg::Read { origin, .. }
            | BusMsg::Resolve { origin, .. }
            | BusMsg::History { origin, .. }
            | BusMsg::KickUser { origin, .. }
            | BusMsg::Presence { origin, .. }
            | BusMsg::AgentStats { origin, .. }
            | BusMsg::Convs { origin, .. } => Some(origin.as_ref()),
            _ => None,
        }
    }

    /// The session this message is for, for the messages that go to a session's shard (and,
    /// in a cluster, to the session's node).
    pub fn session(&self) -> Option<SessionRef> {
        match self {
            BusMsg::Deliver { to: session, .. }
            | BusMsg::OwnProfile { session, .. }
            | BusMsg::Registered { session, .. }
            | BusMsg::Kick { session, .. }
            | BusMsg::ConvsPart { session, .. }
            | BusMsg::PresencePart { session, .. } => Some(*session),
            BusMsg::StreamPart(part) => Some(part.session),
            _ => None,
        }
    }

    /// The shard that owns this message's subject: the shard serving its partition here, or
    /// `None` when the partition is not this node's (a forged conversation id names one past
    /// the partition count; in a cluster, another node's). A message for a session goes to
    /// the session's shard; a push goes to every shard and has no single one.
    pub fn owner(&self, map: &PartitionMap) -> Option<usize> {
        match self {
            BusMsg::Convs { origin, .. } => Some(origin.session.shard as usize),
            BusMsg::StreamPart(part) => Some(part.session.shard as usize),
            BusMsg::Deliver { to: session, .. }
            | BusMsg::OwnProfile { session, .. }
            | BusMsg::Registered { session, .. }
            | BusMsg::Kick { session, .. }
            | BusMsg::ConvsPart { session, .. }
            | BusMsg::PresencePart { session, .. } => Some(session.shard as usize),
            // Posted to each shard in turn, not to an owner.
            BusMsg::StreamRead { .. }
            | BusMsg::Push(_)
            | BusMsg::Reannounce { .. }
            | BusMsg::ForgetNode { .. } => None,
            // Replication: the shard holding a replica here, leader or follower; a role
            // change for a partition this node holds nothing of yet goes to its home shard.
            BusMsg::Role(change) => {
                let p = change.partition();
                map.replica_shard(u32::from(p))
                    .or_else(|| map.home_shard(u32::from(p)))
            }
            BusMsg::LogData(_)
            | BusMsg::ReplicaAck(_)
            | BusMsg::EpochQuery(_)
            | BusMsg::EpochAnswer(_) => map.replica_shard(self.replica_partition()?),
            _ => map.shard_of_partition(self.partition(map)?),
        }
    }

    /// The partition of this message's subject, for the messages that go to an owner; `None`
    /// for the others (a message for a session, a push, the part requests of a gather, which
    /// name their shard).
    pub fn partition(&self, map: &PartitionMap) -> Option<u32> {
        // A macro rather than a closure over `&dyn Placed`: the hash is on the hot path.
        macro_rules! of {
            ($key:expr) => {
                Some(u32::from(map.partition_of($key)))
            };
        }
        let of_conv = |conv: ConvId| Some(partitions::partition_of_conv(conv));
        match self {
            BusMsg::Send(send) if send.profile_pending => of!(&send.origin.uid),
            BusMsg::Send(send) => match send.target {
                Target::Conv(conv) => of_conv(conv),
                Target::Shop(shop) => of!(&shop),
                Target::User(other) => of!(&user_pair(send.origin.uid, other)),
            },
            BusMsg::Read { cursor, .. } => of_conv(cursor.conv),
            BusMsg::Resolve { conv, .. } => of_conv(*conv),
            BusMsg::History { history, .. } => of_conv(history.conv),
            BusMsg::KickUser { kick, .. } => of!(&kick.uid),
            BusMsg::AgentStats { stats, .. } => of!(&stats.shop),
            // Posted to the owner of its users, which all share it.
            BusMsg::Presence { users, .. } => of!(users.first()?),
            BusMsg::Register { uid, .. } | BusMsg::Unregister { uid, .. } => of!(uid),
            BusMsg::AgentOnline { shop, .. } | BusMsg::AgentOffline { shop, .. } => of!(shop),
            BusMsg::WechatInbound(inbound) => of!(&ShopId(inbound.shop)),
            BusMsg::WechatUndelivered(u) => of_conv(u.conv),
            BusMsg::Announce { partition, .. } => Some(u32::from(*partition)),
            BusMsg::Profile(request) => match request.op.subject() {
                Subject::User(uid) => of!(&uid),
                Subject::Conv(conv) => of_conv(conv),
                Subject::Shop(shop) => of!(&shop),
            },
            BusMsg::Group(request) => match &request.op {
                GroupOp::Create { key, .. } => of!(&GroupKey(*key)),
                GroupOp::Add { conv, .. }
                | GroupOp::Remove { conv, .. }
                | GroupOp::Info { conv } => of_conv(*conv),
            },
            BusMsg::Convs { .. }
            | BusMsg::StreamRead { .. }
            | BusMsg::Deliver { .. }
            | BusMsg::Push(_)
            | BusMsg::Registered { .. }
            | BusMsg::OwnProfile { .. }
            | BusMsg::Kick { .. }
            | BusMsg::StreamPart(_)
            | BusMsg::PresencePart { .. }
            | BusMsg::ConvsPart { .. }
            | BusMsg::Reannounce { .. }
            | BusMsg::ForgetNode { .. } => None,
            // Sent to a named node, never routed by a partition's leader.
            BusMsg::Role(_)
            | BusMsg::LogData(_)
            | BusMsg::ReplicaAck(_)
            | BusMsg::EpochQuery(_)
            | BusMsg::EpochAnswer(_) => None,
        }
    }

    /// The partition of a replication message (`None` for any other).
    pub fn replica_partition(&self) -> Option<u32> {
        let p = match self {
            BusMsg::Role(change) => change.partition(),
            BusMsg::LogData(data) => data.partition,
            BusMsg::ReplicaAck(ack) => ack.partition,
            BusMsg::EpochQuery(query) => query.partition,
            BusMsg::EpochAnswer(answer) => answer.partition,
            _ => return None,
        };
        Some(u32::from(p))
    }
}

/// What answers a message that could not reach where it goes (a full mailbox, a node that is
/// down, a congested or cut node link), kept without the message itself: the link keeps one
/// per request in flight. Made by [`Refusal::of`]; a message that needs no answer (a push,
/// a reply, a notice, a [`BusMsg::Reannounce`] or [`BusMsg::Announce`]: the next link-up
/// asks again) has none and is dropped and counted where it was refused.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// A client's or a service's request: an `error` reply to its session.
    Request(Origin),
    /// A gather's part request: the failed part, so that the gather answers once.
    ConvsPart {
        session: SessionRef,
        token: u64,
        partitions: u16,
    },
    PresencePart {
        session: SessionRef,
        token: u64,
    },
    /// A login's registration: a failed login.
    Login {
        session: SessionRef,
        uid: Uid,
    },
}

impl Refusal {
    /// The answer `msg` needs if it cannot be delivered, if any.
    pub fn of(msg: &BusMsg) -> Option<Refusal> {
        match msg {
            BusMsg::Convs {
                origin,
                token,
                partitions,
            } => Some(Refusal::ConvsPart {
                session: origin.session,
                token: *token,
                partitions: *partitions,
            }),
            BusMsg::Presence { origin, token, .. } => Some(Refusal::PresencePart {
                session: origin.session,
                token: *token,
            }),
            BusMsg::Register { session, uid, .. } => Some(Refusal::Login {
                session: *session,
                uid: *uid,
            }),
            msg => msg.origin().map(|origin| Refusal::Request(*origin)),
        }
    }

    /// The answer: an error of `code` saying `text` for a request; the failed part for a
    /// gather; a login that could not register its device.
    pub fn answer(&self, code: ErrorCode, text: &str) -> BusMsg {
        match *self {
            Refusal::Request(origin) => BusMsg::Deliver {
                to: origin.session,
                ws_message: origin.error(code, text),
            },
            Refusal::ConvsPart {
                session,
                token,
                partitions,
            } => BusMsg::ConvsPart {
                session,
                token,
                partitions,
                convs: None,
            },
            Refusal::PresencePart { session, token } => BusMsg::PresencePart {
                session,
                token,
                online: None,
            },
            Refusal::Login { session, uid } => BusMsg::Registered {
                session,
                uid,
                device: None,
                profile: None,
            },
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
            json: ws_message(&frame, Encoding::Json),
            binary: ws_message(&frame, Encoding::Binary),
        }
    }

    /// The push for a device speaking `encoding`.
    pub fn ws_message(&self, encoding: Encoding) -> &Bytes {
        match encoding {
            Encoding::Json => &self.json,
            Encoding::Binary => &self.binary,
        }
    }
}

/// Encodes the codec's `frame` as one WebSocket message in `encoding` (a text message for
/// JSON, a binary one for the binary codec): one buffer, the payload written once behind the
/// WebSocket header.
pub fn ws_message(frame: &Frame<'_>, encoding: Encoding) -> Bytes {
    match encoding {
        Encoding::Json => encode_with(Opcode::Text, |out| json::encode(frame, out)),
        Encoding::Binary => encode_with(Opcode::Binary, |out| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    #[test]
    fn owners_are_stable_and_spread() {
        let mut counts = [0usize; 4];
        for id in 0..4000 {
            let map = PartitionMap::single_node(256, 4);
            let owner = map.shard_of(&Uid::new(UidKind::Buyer, id)).unwrap();
            assert_eq!(owner, map.shard_of(&Uid::new(UidKind::Buyer, id)).unwrap());
            counts[owner] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn a_pair_has_one_owner_in_either_order() {
        let a = Uid::new(UidKind::Agent, 1);
        let b = Uid::new(UidKind::Buyer, 2);
        assert_eq!(user_pair(a, b), user_pair(b, a));
        let map = PartitionMap::single_node(256, 4);
        assert_eq!(map.shard_of_conv(ConvId(0x0012_0005)), Some(1));
        assert_eq!(
            map.shard_of_conv(ConvId(0x0012_0105)),
            None,
            "partition 261"
        );
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
}
#[cfg(test)]
mod size_probe {
    #[test]
    fn probe() {
        eprintln!(
            "BusMsg {} Origin {}",
            std::mem::size_of::<super::BusMsg>(),
            std::mem::size_of::<super::Origin>()
        );
    }
}
