//! The message model: every op of the contract as a typed value.
//!
//! A [`Frame`] is one message with its envelope (`req`). Both encodings map to and from it:
//! [`crate::binary`] and [`crate::json`]. Strings are `Cow<'a, str>` so that decoding borrows
//! from its input (the binary decoder always does; the JSON decoder does unless the string has
//! escapes), and [`Frame::into_owned`] detaches a frame from its buffer when it must outlive it.
//!
//! Values that cannot be valid do not exist here: a `send` has exactly one target, a `history`
//! has at most one of `before`/`after` and a limit in 1..=200, a uid has a known kind.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::ids::{ConvId, DeviceId, DeviceType, NodeId, Seq, ShopId, Uid};

/// The smallest and largest `history` page, and the page size when the request names none.
pub const HISTORY_LIMIT_MIN: u16 = 1;
/// See [`HISTORY_LIMIT_MIN`].
pub const HISTORY_LIMIT_MAX: u16 = 200;
/// See [`HISTORY_LIMIT_MIN`].
pub const HISTORY_LIMIT_DEFAULT: u16 = 50;

/// One message and its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The request id a client chose; a reply echoes it. `None` when absent.
    pub req: Option<u64>,
    /// The message.
    pub message: Message<'a>,
}

impl<'a> Frame<'a> {
    /// A frame without a request id (pushes, and requests that need no reply matching).
    pub fn new(message: Message<'a>) -> Frame<'a> {
        Frame { req: None, message }
    }

    /// A frame carrying a request id.
    pub fn with_req(req: u64, message: Message<'a>) -> Frame<'a> {
        Frame {
            req: Some(req),
            message,
        }
    }

    /// The frame with every borrowed string copied, so that it outlives its input.
    pub fn into_owned(self) -> Frame<'static> {
        Frame {
            req: self.req,
            message: self.message.into_owned(),
        }
    }
}

/// Every op of the contract: requests, replies, and pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `login` (client → server).
    Login(Login<'a>),
    /// `login_ok` (reply).
    LoginOk(LoginOk),
    /// `send` (client → server).
    Send(Send<'a>),
    /// `send_ok` (reply).
    SendOk(SendOk),
    /// `read` (client → server).
    Read(Cursor),
    /// `read_ok` (reply): the user's cursor after the request.
    ReadOk(Cursor),
    /// `resolve` (client → server).
    Resolve(ConvId),
    /// `resolve_ok` (reply).
    ResolveOk(ConvId),
    /// `history` (client → server).
    History(History),
    /// `history_ok` (reply).
    HistoryOk(HistoryOk<'a>),
    /// `convs` (client → server).
    Convs,
    /// `convs_ok` (reply).
    ConvsOk(Vec<ConvSummary<'a>>),
    /// `ping` (client → server).
    Ping,
    /// `pong` (reply).
    Pong,
    /// `msg` (push): a message stored in a conversation of the user, with what a client shows
    /// of its sender and its conversation.
    Msg(MsgPush<'a>),
    /// `receipt` (push): a member's read cursor moved.
    Receipt(Receipt),
    /// `members` (push): a conversation's member list changed.
    Members(Members),
    /// `members_delta` (push): members joined or left a large group (over
    /// [`crate::limits::GROUP_FULL_LIST_MAX`] members), sent instead of its whole list.
    MembersDelta(MembersDelta),
    /// `kicked` (push): this device logged in elsewhere or was kicked.
    Kicked(Cow<'a, str>),
    /// `error` (push or reply): a request failed.
    Error(ErrorReply<'a>),
    /// `notify` (push): a transient message from a backend service, not stored, no seq.
    Notify(Notify<'a>),
    /// `conv_profile` (push): a conversation's display name or avatar changed.
    ConvProfile(ProfileOf),

    // The service port's ops (docs/backend.md): requests 0x10..=0x2f, replies with bit 7 set.
    /// `auth` (service → server): the first frame of a service connection.
    Auth(Cow<'a, str>),
    /// `auth_ok` (reply): who the service is.
    AuthOk(AuthOk),
    /// `send_as` (service → server): store a message as any user.
    SendAs(SendAs<'a>),
    /// `send_as_ok` (reply): as `send_ok`.
    SendAsOk(SendOk),
    /// `notify_users` (service → server): push `notify` to every device of some users.
    NotifyUsers(NotifyUsers<'a>),
    /// `notify_users_ok` (reply): how many users the push was addressed to.
    NotifyUsersOk(u32),
    /// `kick` (service → server): close a user's sessions, or one device's.
    Kick(Kick),
    /// `kick_ok` (reply): how many sessions were kicked.
    KickOk(u32),
    /// `presence` (service → server): which devices of some users are online.
    Presence(Vec<Uid>),
    /// `presence_ok` (reply): the online devices of each asked user that has any.
    PresenceOk(Vec<Online>),
    /// `conv_history` (service → server): a page of any conversation.
    ConvHistory(History),
    /// `conv_history_ok` (reply): the page.
    ConvHistoryOk(HistoryOk<'a>),
    /// `subscribe` (service → server): the message stream from a resume position (empty: now).
    Subscribe(Cow<'a, str>),
    /// `stream_batch` (reply to `subscribe`, repeated): stored messages and the position after them.
    StreamBatch(StreamBatch<'a>),
    /// `set_profile` (service → server): a user's nickname and avatar, or a conversation's or
    /// shop's display name and avatar.
    SetProfile(ProfileOf),
    /// `set_profile_ok` (reply).
    SetProfileOk,
    /// `get_profile` (service → server): the profile of a user, conversation or shop.
    GetProfile(Subject),
    /// `get_profile_ok` (reply): the profile (empty strings: not set).
    GetProfileOk(ProfileOf),
    /// `agent_stats` (service → server): a shop's customer-service figures over a window.
    AgentStats(AgentStats),
    /// `agent_stats_ok` (reply): the figures, per agent and for the shop.
    AgentStatsOk(AgentStatsOk),

    // Group conversations (docs/backend.md, "Groups"): requests 0x30..=0x3f.
    /// `group_create` (service → server): a group, once per key.
    GroupCreate(GroupCreate),
    /// `group_create_ok` (reply): the group (`created` false if the key had one).
    GroupCreateOk(ConvInfo),
    /// `group_add` (service → server): add users to a group.
    GroupAdd(GroupMembers),
    /// `group_add_ok` (reply): the group after the change.
    GroupAddOk(ConvInfo),
    /// `group_remove` (service → server): remove members from a group.
    GroupRemove(GroupMembers),
    /// `group_remove_ok` (reply): the group after the change.
    GroupRemoveOk(ConvInfo),
    /// `conv_info` (service → server): any conversation's type, members and last seq.
    ConvInfo(ConvId),
    /// `conv_info_ok` (reply): the conversation.
    ConvInfoOk(ConvInfo),
}

/// The `op` of every message, with its JSON name and binary code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// `login`
    Login = 0x01,
    /// `send`
    Send = 0x02,
    /// `read`
    Read = 0x03,
    /// `resolve`
    Resolve = 0x04,
    /// `history`
    History = 0x05,
    /// `convs`
    Convs = 0x06,
    /// `ping`
    Ping = 0x07,
    /// `login_ok`
    LoginOk = 0x81,
    /// `send_ok`
    SendOk = 0x82,
    /// `read_ok`
    ReadOk = 0x83,
    /// `resolve_ok`
    ResolveOk = 0x84,
    /// `history_ok`
    HistoryOk = 0x85,
    /// `convs_ok`
    ConvsOk = 0x86,
    /// `pong`
    Pong = 0x87,
    /// `msg`
    Msg = 0xc1,
    /// `receipt`
    Receipt = 0xc2,
    /// `members`
    Members = 0xc3,
    /// `kicked`
    Kicked = 0xc4,
    /// `error`
    Error = 0xc5,
    /// `members_delta`
    MembersDelta = 0xc7,
    /// `notify`
    Notify = 0xc6,
    /// `conv_profile`
    ConvProfile = 0xc8,
    /// `auth`
    Auth = 0x10,
    /// `send_as`
    SendAs = 0x11,
    /// `notify_users`
    NotifyUsers = 0x12,
    /// `kick`
    Kick = 0x13,
    /// `presence`
    Presence = 0x14,
    /// `conv_history`
    ConvHistory = 0x15,
    /// `subscribe`
    Subscribe = 0x16,
    /// `stream_batch`
    StreamBatch = 0x96,
    /// `set_profile`
    SetProfile = 0x17,
    /// `get_profile`
    GetProfile = 0x18,
    /// `set_profile_ok`
    SetProfileOk = 0x97,
    /// `get_profile_ok`
    GetProfileOk = 0x98,
    /// `agent_stats`
    AgentStats = 0x1c,
    /// `agent_stats_ok`
    AgentStatsOk = 0x9c,
    /// `auth_ok`
    AuthOk = 0x90,
    /// `send_as_ok`
    SendAsOk = 0x91,
    /// `notify_users_ok`
    NotifyUsersOk = 0x92,
    /// `kick_ok`
    KickOk = 0x93,
    /// `presence_ok`
    PresenceOk = 0x94,
    /// `conv_history_ok`
    ConvHistoryOk = 0x95,
    /// `group_create`
    GroupCreate = 0x30,
    /// `group_add`
    GroupAdd = 0x31,
    /// `group_remove`
    GroupRemove = 0x32,
    /// `conv_info`
    ConvInfo = 0x33,
    /// `group_create_ok`
    GroupCreateOk = 0xb0,
    /// `group_add_ok`
    GroupAddOk = 0xb1,
    /// `group_remove_ok`
    GroupRemoveOk = 0xb2,
    /// `conv_info_ok`
    ConvInfoOk = 0xb3,
}

impl Op {
    /// Every op, requests first, then replies, then pushes.
    pub const ALL: [Op; 50] = [
        Op::Login,
        Op::Send,
        Op::Read,
        Op::Resolve,
        Op::History,
        Op::Convs,
        Op::Ping,
        Op::LoginOk,
        Op::SendOk,
        Op::ReadOk,
        Op::ResolveOk,
        Op::HistoryOk,
        Op::ConvsOk,
        Op::Pong,
        Op::Msg,
        Op::Receipt,
        Op::Members,
        Op::Kicked,
        Op::Error,
        Op::MembersDelta,
        Op::Notify,
        Op::Auth,
        Op::SendAs,
        Op::NotifyUsers,
        Op::Kick,
        Op::Presence,
        Op::ConvHistory,
        Op::AuthOk,
        Op::SendAsOk,
        Op::NotifyUsersOk,
        Op::KickOk,
        Op::PresenceOk,
        Op::ConvHistoryOk,
        Op::Subscribe,
        Op::StreamBatch,
        Op::AgentStats,
        Op::AgentStatsOk,
        Op::GroupCreate,
        Op::GroupAdd,
        Op::GroupRemove,
        Op::ConvInfo,
        Op::GroupCreateOk,
        Op::GroupAddOk,
        Op::GroupRemoveOk,
        Op::ConvInfoOk,
        Op::SetProfile,
        Op::GetProfile,
        Op::SetProfileOk,
        Op::GetProfileOk,
        Op::ConvProfile,
    ];

    /// The op with this binary code.
    pub fn from_code(code: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == code)
    }

    /// The op with this JSON name.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Login => "login",
            Op::Send => "send",
            Op::Read => "read",
            Op::Resolve => "resolve",
            Op::History => "history",
            Op::Convs => "convs",
            Op::Ping => "ping",
            Op::LoginOk => "login_ok",
            Op::SendOk => "send_ok",
            Op::ReadOk => "read_ok",
            Op::ResolveOk => "resolve_ok",
            Op::HistoryOk => "history_ok",
            Op::ConvsOk => "convs_ok",
            Op::Pong => "pong",
            Op::Msg => "msg",
            Op::Receipt => "receipt",
            Op::Members => "members",
            Op::Kicked => "kicked",
            Op::MembersDelta => "members_delta",
            Op::Error => "error",
            Op::Notify => "notify",
            Op::Auth => "auth",
            Op::SendAs => "send_as",
            Op::NotifyUsers => "notify_users",
            Op::Kick => "kick",
            Op::Presence => "presence",
            Op::ConvHistory => "conv_history",
            Op::AuthOk => "auth_ok",
            Op::SendAsOk => "send_as_ok",
            Op::NotifyUsersOk => "notify_users_ok",
            Op::KickOk => "kick_ok",
            Op::PresenceOk => "presence_ok",
            Op::ConvHistoryOk => "conv_history_ok",
            Op::Subscribe => "subscribe",
            Op::StreamBatch => "stream_batch",
            Op::AgentStats => "agent_stats",
            Op::AgentStatsOk => "agent_stats_ok",
            Op::GroupCreate => "group_create",
            Op::GroupAdd => "group_add",
            Op::GroupRemove => "group_remove",
            Op::ConvInfo => "conv_info",
            Op::GroupCreateOk => "group_create_ok",
            Op::GroupAddOk => "group_add_ok",
            Op::GroupRemoveOk => "group_remove_ok",
            Op::ConvInfoOk => "conv_info_ok",
            Op::SetProfile => "set_profile",
            Op::GetProfile => "get_profile",
            Op::SetProfileOk => "set_profile_ok",
            Op::GetProfileOk => "get_profile_ok",
            Op::ConvProfile => "conv_profile",
        }
    }

    /// Whether a client sends this op (as opposed to receiving it).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }

    /// Whether this is an op of the service port (requests `0x10..=0x3f` and their replies),
    /// which the client port refuses.
    pub fn is_service(self) -> bool {
        (0x10..0x40).contains(&((self as u8) & 0x7f)) && (self as u8) < 0xc0
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message<'_> {
    /// This message's op.
    pub fn op(&self) -> Op {
        match self {
            Message::Login(_) => Op::Login,
            Message::LoginOk(_) => Op::LoginOk,
            Message::Send(_) => Op::Send,
            Message::SendOk(_) => Op::SendOk,
            Message::Read(_) => Op::Read,
            Message::ReadOk(_) => Op::ReadOk,
            Message::Resolve(_) => Op::Resolve,
            Message::ResolveOk(_) => Op::ResolveOk,
            Message::History(_) => Op::History,
            Message::HistoryOk(_) => Op::HistoryOk,
            Message::Convs => Op::Convs,
            Message::ConvsOk(_) => Op::ConvsOk,
            Message::Ping => Op::Ping,
            Message::Pong => Op::Pong,
            Message::Msg(_) => Op::Msg,
            Message::Receipt(_) => Op::Receipt,
            Message::Members(_) => Op::Members,
            Message::MembersDelta(_) => Op::MembersDelta,
            Message::Kicked(_) => Op::Kicked,
            Message::Error(_) => Op::Error,
            Message::Notify(_) => Op::Notify,
            Message::Auth(_) => Op::Auth,
            Message::AuthOk(_) => Op::AuthOk,
            Message::SendAs(_) => Op::SendAs,
            Message::SendAsOk(_) => Op::SendAsOk,
            Message::NotifyUsers(_) => Op::NotifyUsers,
            Message::NotifyUsersOk(_) => Op::NotifyUsersOk,
            Message::Kick(_) => Op::Kick,
            Message::KickOk(_) => Op::KickOk,
            Message::Presence(_) => Op::Presence,
            Message::PresenceOk(_) => Op::PresenceOk,
            Message::ConvHistory(_) => Op::ConvHistory,
            Message::ConvHistoryOk(_) => Op::ConvHistoryOk,
            Message::Subscribe(_) => Op::Subscribe,
            Message::StreamBatch(_) => Op::StreamBatch,
            Message::AgentStats(_) => Op::AgentStats,
            Message::AgentStatsOk(_) => Op::AgentStatsOk,
            Message::GroupCreate(_) => Op::GroupCreate,
            Message::GroupCreateOk(_) => Op::GroupCreateOk,
            Message::GroupAdd(_) => Op::GroupAdd,
            Message::GroupAddOk(_) => Op::GroupAddOk,
            Message::GroupRemove(_) => Op::GroupRemove,
            Message::GroupRemoveOk(_) => Op::GroupRemoveOk,
            Message::ConvInfo(_) => Op::ConvInfo,
            Message::ConvInfoOk(_) => Op::ConvInfoOk,
            Message::SetProfile(_) => Op::SetProfile,
            Message::SetProfileOk => Op::SetProfileOk,
            Message::GetProfile(_) => Op::GetProfile,
            Message::GetProfileOk(_) => Op::GetProfileOk,
            Message::ConvProfile(_) => Op::ConvProfile,
        }
    }

    /// The message with every borrowed string copied.
    pub fn into_owned(self) -> Message<'static> {
        match self {
            Message::Login(m) => Message::Login(Login {
                token: own(m.token),
                device: m.device,
            }),
            Message::LoginOk(m) => Message::LoginOk(m),
            Message::Send(m) => Message::Send(Send {
                target: m.target,
                cmid: own(m.cmid),
                kind: own(m.kind),
                body: own(m.body),
            }),
            Message::SendOk(m) => Message::SendOk(m),
            Message::Read(m) => Message::Read(m),
            Message::ReadOk(m) => Message::ReadOk(m),
            Message::Resolve(m) => Message::Resolve(m),
            Message::ResolveOk(m) => Message::ResolveOk(m),
            Message::History(m) => Message::History(m),
            Message::HistoryOk(m) => Message::HistoryOk(HistoryOk {
                conv: m.conv,
                msgs: m.msgs.into_iter().map(Msg::into_owned).collect(),
            }),
            Message::Convs => Message::Convs,
            Message::ConvsOk(convs) => {
                Message::ConvsOk(convs.into_iter().map(ConvSummary::into_owned).collect())
            }
            Message::Ping => Message::Ping,
            Message::Pong => Message::Pong,
            Message::Msg(m) => Message::Msg(MsgPush {
                msg: m.msg.into_owned(),
                from_profile: m.from_profile,
                conv_profile: m.conv_profile,
            }),
            Message::Receipt(m) => Message::Receipt(m),
            Message::Members(m) => Message::Members(m),
            Message::MembersDelta(m) => Message::MembersDelta(m),
            Message::Kicked(reason) => Message::Kicked(own(reason)),
            Message::Error(m) => Message::Error(ErrorReply {
                code: m.code,
                message: own(m.message),
            }),
            Message::Notify(m) => Message::Notify(Notify {
                kind: own(m.kind),
                body: own(m.body),
                ts: m.ts,
            }),
            Message::Auth(token) => Message::Auth(own(token)),
            Message::AuthOk(m) => Message::AuthOk(m),
            Message::SendAs(m) => Message::SendAs(SendAs {
                from: m.from,
                send: Send {
                    target: m.send.target,
                    cmid: own(m.send.cmid),
                    kind: own(m.send.kind),
                    body: own(m.send.body),
                },
            }),
            Message::SendAsOk(m) => Message::SendAsOk(m),
            Message::NotifyUsers(m) => Message::NotifyUsers(NotifyUsers {
                users: m.users,
                kind: own(m.kind),
                body: own(m.body),
            }),
            Message::NotifyUsersOk(n) => Message::NotifyUsersOk(n),
            Message::Kick(m) => Message::Kick(m),
            Message::KickOk(n) => Message::KickOk(n),
            Message::Presence(users) => Message::Presence(users),
            Message::PresenceOk(online) => Message::PresenceOk(online),
            Message::ConvHistory(m) => Message::ConvHistory(m),
            Message::GroupCreate(m) => Message::GroupCreate(m),
            Message::GroupCreateOk(m) => Message::GroupCreateOk(m),
            Message::GroupAdd(m) => Message::GroupAdd(m),
            Message::GroupAddOk(m) => Message::GroupAddOk(m),
            Message::GroupRemove(m) => Message::GroupRemove(m),
            Message::GroupRemoveOk(m) => Message::GroupRemoveOk(m),
            Message::ConvInfo(m) => Message::ConvInfo(m),
            Message::ConvInfoOk(m) => Message::ConvInfoOk(m),
            Message::SetProfile(m) => Message::SetProfile(m),
            Message::SetProfileOk => Message::SetProfileOk,
            Message::GetProfile(m) => Message::GetProfile(m),
            Message::GetProfileOk(m) => Message::GetProfileOk(m),
            Message::ConvProfile(m) => Message::ConvProfile(m),
            Message::AgentStats(m) => Message::AgentStats(m),
            Message::AgentStatsOk(m) => Message::AgentStatsOk(m),
            Message::ConvHistoryOk(m) => Message::ConvHistoryOk(HistoryOk {
                conv: m.conv,
                msgs: m.msgs.into_iter().map(Msg::into_owned).collect(),
            }),
            Message::Subscribe(from) => Message::Subscribe(own(from)),
            Message::StreamBatch(m) => Message::StreamBatch(StreamBatch {
                position: own(m.position),
                msgs: m.msgs.into_iter().map(Msg::into_owned).collect(),
                events: m.events,
            }),
        }
    }
}

fn own(s: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(s.into_owned())
}

/// `login`: authenticate this connection as one device of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login<'a> {
    /// A JWT (HS256) signed with the gateway's secret.
    pub token: Cow<'a, str>,
    /// The kind of device logging in.
    pub device: DeviceType,
}

/// `login_ok`: who the connection is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginOk {
    /// The user the token named.
    pub uid: Uid,
    /// The device's stable id.
    pub device_id: DeviceId,
    /// The node holding the connection.
    pub node_id: NodeId,
    /// Server time, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// Where a `send` goes: exactly one of the contract's three targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `conv`: an existing conversation the sender is a member of.
    Conv(ConvId),
    /// `shop`: the sender's conversation with this shop.
    Shop(ShopId),
    /// `user`: the direct conversation with this user.
    User(Uid),
}

/// `send`: store a message in a conversation and push it to its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send<'a> {
    /// Where the message goes.
    pub target: Target,
    /// The client's id for the message, unique per sender (idempotency key).
    pub cmid: Cow<'a, str>,
    /// What the body is, e.g. `text`.
    pub kind: Cow<'a, str>,
    /// The content.
    pub body: Cow<'a, str>,
}

/// `send_ok`: where the message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOk {
    /// The conversation.
    pub conv: ConvId,
    /// The message's seq in it.
    pub seq: Seq,
    /// When it was stored, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// A read cursor: `read` (the highest seq read) and `read_ok` (the cursor after the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The conversation.
    pub conv: ConvId,
    /// The seq.
    pub seq: Seq,
}

/// Which page of a conversation `history` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// The newest messages (`before` absent or 0).
    Newest,
    /// The messages just before this seq (exclusive).
    Before(Seq),
    /// The messages just after this seq (exclusive).
    After(Seq),
}

/// `history`: a page of a conversation, ascending by seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// The conversation.
    pub conv: ConvId,
    /// Which page.
    pub range: HistoryRange,
    /// How many messages at most; always in
    /// [`HISTORY_LIMIT_MIN`]..=[`HISTORY_LIMIT_MAX`].
    pub limit: u16,
}

/// `history_ok`: the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryOk<'a> {
    /// The conversation.
    pub conv: ConvId,
    /// The messages, ascending by seq.
    pub msgs: Vec<Msg<'a>>,
}

/// A stored message: the `msg` push and a `history_ok` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<'a> {
    /// The conversation.
    pub conv: ConvId,
    /// Its seq in the conversation.
    pub seq: Seq,
    /// The sender.
    pub from: Uid,
    /// When it was stored, milliseconds since the Unix epoch.
    pub ts: u64,
    /// What the body is, e.g. `text`.
    pub kind: Cow<'a, str>,
    /// The content.
    pub body: Cow<'a, str>,
    /// The sender's client message id.
    pub cmid: Cow<'a, str>,
}

impl Msg<'_> {
    /// The message with every borrowed string copied.
    pub fn into_owned(self) -> Msg<'static> {
        Msg {
            conv: self.conv,
            seq: self.seq,
            from: self.from,
            ts: self.ts,
            kind: own(self.kind),
            body: own(self.body),
            cmid: own(self.cmid),
        }
    }
}

/// What a client shows of a user (its nickname) or of a conversation (its display name), set
/// by a backend service (`set_profile`). Empty strings: not set (a client shows the uid, or
/// its own default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Profile {
    /// A user's nickname or a conversation's display name, at most
    /// [`crate::limits::PROFILE_NAME_LEN_MAX`] bytes.
    pub name: String,
    /// An avatar URL, at most [`crate::limits::PROFILE_AVATAR_LEN_MAX`] bytes.
    pub avatar: String,
}

impl Profile {
    /// Whether neither field is set.
    pub fn is_empty(&self) -> bool {
        self.name.is_empty() && self.avatar.is_empty()
    }
}

/// Whose profile: a user's, a conversation's, or a shop's (which every conversation of the
/// shop shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A user: its nickname and avatar.
    User(Uid),
    /// A direct or group conversation: its display name and avatar.
    Conv(ConvId),
    /// A shop: the display name and avatar of each of its conversations.
    Shop(ShopId),
}

/// A subject and its profile: `set_profile`, `get_profile_ok`, `conv_profile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileOf {
    /// Whose.
    pub subject: Subject,
    /// The profile.
    pub profile: Profile,
}

/// A member's profile, in `members` and `convs_ok` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserProfile {
    /// The user.
    pub uid: Uid,
    /// Its nickname and avatar.
    pub profile: Profile,
}

/// The `msg` push: the stored message, with the sender's profile and the conversation's as
/// the conversation's owner knew them when it stored it (empty when not set or not known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgPush<'a> {
    /// The message.
    pub msg: Msg<'a>,
    /// The sender's nickname and avatar.
    pub from_profile: Profile,
    /// The conversation's display name and avatar (a shop conversation's: its shop's).
    pub conv_profile: Profile,
}

impl<'a> MsgPush<'a> {
    /// A push of `msg` with no profiles.
    pub fn bare(msg: Msg<'a>) -> MsgPush<'a> {
        MsgPush {
            msg,
            from_profile: Profile::default(),
            conv_profile: Profile::default(),
        }
    }
}

impl<'a> std::ops::Deref for MsgPush<'a> {
    type Target = Msg<'a>;
    fn deref(&self) -> &Msg<'a> {
        &self.msg
    }
}

/// What kind of conversation a [`ConvSummary`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvType {
    /// A shop and one of its customers, plus the agents assigned to it.
    Shop(ShopId),
    /// Two users.
    Direct,
    /// Members set by a backend service.
    Group,
}

impl ConvType {
    /// The JSON name (`shop`, `direct`, `group`).
    pub fn name(self) -> &'static str {
        match self {
            ConvType::Shop(_) => "shop",
            ConvType::Direct => "direct",
            ConvType::Group => "group",
        }
    }
}

/// One entry of `convs_ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSummary<'a> {
    /// The conversation.
    pub conv: ConvId,
    /// Its type (and shop, for shop conversations).
    pub conv_type: ConvType,
    /// Its members when there are at most [`crate::limits::GROUP_FULL_LIST_MAX`]; otherwise
    /// empty (a large group's list would dwarf the reply), and `member_count` says how many.
    pub members: Vec<Uid>,
    /// How many members it has.
    pub member_count: u32,
    /// The seq of its newest message (0 when empty).
    pub last_seq: Seq,
    /// The user's read cursor.
    pub read_seq: Seq,
    /// `last_seq - read_seq`.
    pub unread: u64,
    /// Its newest message.
    pub last: Option<Msg<'a>>,
    /// Its display name and avatar (a shop conversation's: its shop's).
    pub profile: Profile,
    /// The profiles of its members that the conversation's owner holds (see docs/protocol.md,
    /// "Profiles"), in member order.
    pub profiles: Vec<UserProfile>,
}

impl ConvSummary<'_> {
    /// The summary with every borrowed string copied.
    pub fn into_owned(self) -> ConvSummary<'static> {
        ConvSummary {
            conv: self.conv,
            conv_type: self.conv_type,
            members: self.members,
            member_count: self.member_count,
            last_seq: self.last_seq,
            read_seq: self.read_seq,
            unread: self.unread,
            last: self.last.map(Msg::into_owned),
            profile: self.profile,
            profiles: self.profiles,
        }
    }
}

/// `receipt`: a member's read cursor moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The conversation.
    pub conv: ConvId,
    /// The reader.
    pub uid: Uid,
    /// The reader's cursor.
    pub seq: Seq,
}

/// `members`: a conversation's member list changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// The conversation.
    pub conv: ConvId,
    /// Its members now.
    pub members: Vec<Uid>,
    /// The profiles of its members that the conversation's owner holds, in member order.
    pub profiles: Vec<UserProfile>,
}

/// `group_create`: make the group `key` names, with its first members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCreate {
    /// The service's own id for the group: creating the same key again answers with the same
    /// group and changes nothing.
    pub key: u64,
    /// Its first members (distinct), 1..=[`crate::limits::USERS_PER_REQUEST_MAX`].
    pub users: Vec<Uid>,
}

/// `group_add` / `group_remove`: users joining or leaving a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembers {
    /// The group.
    pub conv: ConvId,
    /// The users, 1..=[`crate::limits::USERS_PER_REQUEST_MAX`].
    pub users: Vec<Uid>,
}

/// A conversation as a service sees it (the reply of every group op and of `conv_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvInfo {
    /// The conversation.
    pub conv: ConvId,
    /// Its type (and shop, for shop conversations).
    pub conv_type: ConvType,
    /// For a group: the key it was created with.
    pub key: Option<u64>,
    /// Every member when there are at most [`crate::limits::GROUP_FULL_LIST_MAX`]; otherwise
    /// empty, and `member_count` says how many.
    pub members: Vec<Uid>,
    /// How many members it has.
    pub member_count: u32,
    /// The seq of its newest message (0 when empty).
    pub last_seq: Seq,
    /// For `group_create_ok`: whether this request made the group (false: the key had one).
    pub created: bool,
}

/// `members_delta`: who joined and who left a large group, and how many members it has now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersDelta {
    /// The conversation.
    pub conv: ConvId,
    /// Users who became members.
    pub added: Vec<Uid>,
    /// Users who are members no longer.
    pub removed: Vec<Uid>,
    /// The number of members after the change.
    pub count: u32,
}

/// `notify`: a transient push from a backend service (not stored, no seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify<'a> {
    /// What the body is, e.g. `text`.
    pub kind: Cow<'a, str>,
    /// The content.
    pub body: Cow<'a, str>,
    /// When the service sent it, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// `auth_ok`: the service connection is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthOk {
    /// The service the token named.
    pub uid: Uid,
    /// Server time, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// `send_as`: a `send` made by a service on behalf of `from`, with the same rules (`from` must
/// be a member of a `conv` target; `cmid` idempotency per (`from`, conversation)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAs<'a> {
    /// The user the message is stored as.
    pub from: Uid,
    /// The message.
    pub send: Send<'a>,
}

/// `notify_users`: push a `notify` to every logged-in device of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyUsers<'a> {
    /// The users; at most [`crate::limits::USERS_PER_REQUEST_MAX`].
    pub users: Vec<Uid>,
    /// What the body is.
    pub kind: Cow<'a, str>,
    /// The content.
    pub body: Cow<'a, str>,
}

/// `kick`: close every session of `uid`, or only the one of `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    /// The user.
    pub uid: Uid,
    /// One device of the user; `None` for all of them.
    pub device: Option<DeviceId>,
}

/// `stream_batch`: the next stored messages of the stream, in log order (so in seq order per
/// conversation), the membership and read-cursor changes stored among them, and the opaque
/// position to resume after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBatch<'a> {
    /// Resume here to get what follows this batch.
    pub position: Cow<'a, str>,
    /// The messages; may be empty (the first batch of a subscription).
    pub msgs: Vec<Msg<'a>>,
    /// The changes of members and read cursors, in log order; each says where it falls among
    /// `msgs`.
    pub events: Vec<StreamEvent>,
}

/// A change of membership or of a read cursor in the message stream (docs/backend.md, "The
/// message stream").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEvent {
    /// The change was stored after this many of its batch's messages and before the next one
    /// (log order), so a mirror applies events and messages in the order they happened.
    pub after_msgs: u16,
    /// The conversation.
    pub conv: ConvId,
    /// The member or reader.
    pub uid: Uid,
    /// What changed.
    pub change: StreamChange,
}

/// What a [`StreamEvent`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamChange {
    /// The user became a member (an agent assignment, a `group_add`, a conversation's first
    /// members), at `ts` (ms since the Unix epoch; 0: not recorded).
    Joined {
        /// When, ms since the Unix epoch (0: not recorded).
        ts: u64,
    },
    /// The user is no longer a member (a `resolve`, a `group_remove`).
    Left {
        /// When, ms since the Unix epoch (0: not recorded).
        ts: u64,
    },
    /// The user's read cursor moved up to `seq` (a `read`; a sender's own message moves its
    /// cursor too, with no event).
    Read {
        /// The seq read up to.
        seq: Seq,
    },
}

impl StreamChange {
    /// The JSON name (`event` field).
    pub fn name(self) -> &'static str {
        match self {
            StreamChange::Joined { .. } => "joined",
            StreamChange::Left { .. } => "left",
            StreamChange::Read { .. } => "read",
        }
    }
}

/// `agent_stats`: the customer-service figures of a shop's agents over the window
/// `from_ms..to_ms` (ms since the Unix epoch; docs/backend.md, "Agent statistics").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    /// The shop.
    pub shop: ShopId,
    /// The window's start (inclusive).
    pub from_ms: u64,
    /// The window's end (exclusive).
    pub to_ms: u64,
}

/// The figures of one agent, or of a whole shop, over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRow {
    /// Conversations assigned during the window.
    pub assigned: u32,
    /// Conversations assigned and not resolved at the window's end.
    pub open: u32,
    /// Conversations resolved during the window.
    pub resolved: u32,
    /// Messages the agents sent during the window.
    pub messages: u32,
    /// First replies to a waiting customer during the window (the count behind the
    /// percentiles).
    pub replies: u32,
    /// Median time from a customer's message to the agent's first reply, in ms (0 without
    /// replies).
    pub reply_ms_p50: u64,
    /// 90th percentile of the same, in ms (0 without replies).
    pub reply_ms_p90: u64,
}

/// One agent's line of `agent_stats_ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRow {
    /// The agent.
    pub agent: Uid,
    /// Its figures.
    pub stats: StatsRow,
}

/// `agent_stats_ok`: a shop's figures over a window, per agent and in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatsOk {
    /// The shop.
    pub shop: ShopId,
    /// The window the figures cover: the asked one, widened to whole hours and cut to the
    /// hours the node keeps.
    pub from_ms: u64,
    /// See `from_ms` (exclusive).
    pub to_ms: u64,
    /// The whole shop (every agent, also those beyond the listed ones).
    pub total: StatsRow,
    /// Each agent with anything in the window or open at its end, by uid; at most
    /// [`crate::limits::STATS_AGENTS_MAX`].
    pub agents: Vec<AgentRow>,
}

/// One entry of `presence_ok`: a user and its devices logged in now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    /// The user.
    pub uid: Uid,
    /// Its devices with a session, ascending.
    pub devices: Vec<DeviceId>,
}

/// `error`: why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply<'a> {
    /// The machine-readable reason.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: Cow<'a, str>,
}

/// The error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// A malformed frame, an unknown op after login, a bad field.
    BadRequest = 1,
    /// A bad, expired or incomplete token.
    Unauthorized = 2,
    /// Anything but `login`/`ping` before login.
    NotLoggedIn = 3,
    /// The conversation is not the user's.
    NotMember = 4,
    /// No such conversation or user.
    NotFound = 5,
    /// A message over the size limit.
    TooLarge = 6,
    /// Too many messages per second.
    RateLimited = 7,
    /// The gateway cannot serve the request now (e.g. the disk is full).
    Unavailable = 8,
    /// A bug in the gateway.
    Internal = 9,
}

impl ErrorCode {
    /// Every code, in code order.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotLoggedIn,
        ErrorCode::NotMember,
        ErrorCode::NotFound,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The code with this binary value.
    pub fn from_code(code: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u8 == code)
    }

    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl FromStr for ErrorCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes did not decode into a [`Frame`]. Both encodings share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The `req` of the offending frame, when it could be read, so an `error` reply can echo it.
    pub req: Option<u64>,
    /// The op of the offending frame, when it could be read: a `login` that does not decode is
    /// a failed login (`unauthorized`), not a bad request.
    pub op: Option<Op>,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

/// What was wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The op is not one this version knows (binary code or JSON name).
    UnknownOp(String),
    /// The frame ended before its body did.
    Truncated,
    /// A length field disagrees with the bytes present (binary), or bytes follow the body.
    BadLength(&'static str),
    /// The protocol version is not 1.
    BadVersion(u8),
    /// A string is not valid UTF-8.
    InvalidUtf8(&'static str),
    /// A field is missing.
    MissingField(&'static str),
    /// A field holds a value outside its range or of the wrong type.
    BadValue(&'static str),
    /// The text is not a JSON object.
    BadJson(String),
    /// A frame's length exceeds the configured maximum.
    TooLarge {
        /// The length the header announced.
        len: u64,
        /// The maximum.
        max: usize,
    },
}

impl DecodeError {
    pub(crate) fn new(req: Option<u64>, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            req,
            op: None,
            kind,
        }
    }

    pub(crate) fn with_op(self, op: Option<Op>) -> DecodeError {
        DecodeError { op, ..self }
    }

    /// The contract's error code for this failure (`bad_request`, or `too_large`).
    pub fn code(&self) -> ErrorCode {
        match self.kind {
            DecodeErrorKind::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DecodeErrorKind::UnknownOp(op) => write!(f, "unknown op {op}"),
            DecodeErrorKind::Truncated => f.write_str("frame ends before its body"),
            DecodeErrorKind::BadLength(what) => write!(f, "bad length: {what}"),
            DecodeErrorKind::BadVersion(v) => write!(f, "unsupported protocol version {v}"),
            DecodeErrorKind::InvalidUtf8(field) => write!(f, "{field} is not valid UTF-8"),
            DecodeErrorKind::MissingField(field) => write!(f, "missing field {field}"),
            DecodeErrorKind::BadValue(what) => write!(f, "bad value: {what}"),
            DecodeErrorKind::BadJson(why) => write!(f, "bad JSON: {why}"),
            DecodeErrorKind::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {max}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Proptest strategies for every message, shared by the codec tests of both encodings.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use crate::ids::{DeviceIdParts, NodeIdParts, NodeType, UidKind};
    use proptest::collection::vec;
    use proptest::prelude::*;

    pub fn uid() -> impl Strategy<Value = Uid> {
        (0u8..4, any::<u64>()).prop_map(|(k, id)| Uid::new(UidKind::from_code(k).unwrap(), id))
    }

    /// Text with quotes, backslashes, control characters and non-ASCII, to exercise escaping.
    fn text() -> impl Strategy<Value = Cow<'static, str>> {
        "(\\PC|[\"\\\\\n\t\u{0}\u{1f}é中😀]){0,40}".prop_map(Cow::Owned)
    }

    fn short(len_max: usize) -> impl Strategy<Value = Cow<'static, str>> {
        text().prop_filter_map("1..=len_max bytes", move |s| {
            (!s.is_empty() && s.len() <= len_max).then_some(s)
        })
    }

    pub fn msg() -> impl Strategy<Value = Msg<'static>> {
        (
            any::<u64>(),
            any::<u64>(),
            uid(),
            any::<u64>(),
            text(),
            text(),
            text(),
        )
            .prop_map(|(conv, seq, from, ts, kind, body, cmid)| Msg {
                conv: ConvId(conv),
                seq: Seq(seq),
                from,
                ts,
                kind,
                body,
                cmid,
            })
    }

    pub fn profile() -> impl Strategy<Value = Profile> {
        let field = |len_max: usize| {
            text().prop_filter_map("at most len_max bytes", move |s| {
                (s.len() <= len_max).then(|| s.into_owned())
            })
        };
        (
            field(crate::limits::PROFILE_NAME_LEN_MAX),
            field(crate::limits::PROFILE_AVATAR_LEN_MAX),
        )
            .prop_map(|(name, avatar)| Profile { name, avatar })
    }

    fn subject() -> impl Strategy<Value = Subject> {
        prop_oneof![
            uid().prop_map(Subject::User),
            any::<u64>().prop_map(|c| Subject::Conv(ConvId(c))),
            any::<u64>().prop_map(|s| Subject::Shop(ShopId(s))),
        ]
    }

    fn profile_of() -> impl Strategy<Value = ProfileOf> {
        (subject(), profile()).prop_map(|(subject, profile)| ProfileOf { subject, profile })
    }

    fn user_profiles() -> impl Strategy<Value = Vec<UserProfile>> {
        vec(
            (uid(), profile()).prop_map(|(uid, profile)| UserProfile { uid, profile }),
            0..3,
        )
    }

    fn conv_info() -> impl Strategy<Value = ConvInfo> {
        (
            any::<u64>(),
            prop_oneof![
                any::<u64>().prop_map(|s| (ConvType::Shop(ShopId(s)), None)),
                Just((ConvType::Direct, None)),
                any::<u64>().prop_map(|k| (ConvType::Group, Some(k))),
            ],
            vec(uid(), 0..5),
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(c, (conv_type, key), members, member_count, last_seq, created)| ConvInfo {
                    conv: ConvId(c),
                    conv_type,
                    key,
                    members,
                    member_count,
                    last_seq: Seq(last_seq),
                    created,
                },
            )
    }

    fn conv_summary() -> impl Strategy<Value = ConvSummary<'static>> {
        (
            any::<u64>(),
            prop_oneof![
                any::<u64>().prop_map(|s| ConvType::Shop(ShopId(s))),
                Just(ConvType::Direct),
                Just(ConvType::Group)
            ],
            (vec(uid(), 0..5), any::<u32>()),
            (any::<u64>(), any::<u64>(), any::<u64>()),
            proptest::option::of(msg()),
            (profile(), user_profiles()),
        )
            .prop_map(
                |(
                    conv,
                    conv_type,
                    (members, member_count),
                    (last, read, unread),
                    last_msg,
                    (profile, profiles),
                )| ConvSummary {
                    conv: ConvId(conv),
                    conv_type,
                    members,
                    member_count,
                    last_seq: Seq(last),
                    read_seq: Seq(read),
                    unread,
                    last: last_msg,
                    profile,
                    profiles,
                },
            )
    }

    fn device_id() -> impl Strategy<Value = DeviceId> {
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

    fn node_id() -> impl Strategy<Value = NodeId> {
        (0u8..3, 0u16..4096, any::<u32>(), any::<u16>()).prop_map(|(nt, number, ip, port)| {
            NodeId::pack(NodeIdParts {
                node_type: NodeType::from_bits(nt).unwrap(),
                number,
                ip: ip.into(),
                port,
            })
            .unwrap()
        })
    }

    fn cursor() -> impl Strategy<Value = Cursor> {
        (any::<u64>(), any::<u64>()).prop_map(|(c, s)| Cursor {
            conv: ConvId(c),
            seq: Seq(s),
        })
    }

    pub fn message() -> impl Strategy<Value = Message<'static>> {
        prop_oneof![
            ("[A-Za-z0-9._-]{0,300}", 0u8..4).prop_map(|(token, d)| Message::Login(Login {
                token: Cow::Owned(token),
                device: DeviceType::from_bits(d).unwrap(),
            })),
            (uid(), device_id(), node_id(), any::<u64>()).prop_map(
                |(uid, device_id, node_id, ts)| {
                    Message::LoginOk(LoginOk {
                        uid,
                        device_id,
                        node_id,
                        ts,
                    })
                }
            ),
            (
                prop_oneof![
                    any::<u64>().prop_map(|c| Target::Conv(ConvId(c))),
                    any::<u64>().prop_map(|s| Target::Shop(ShopId(s))),
                    uid().prop_map(Target::User),
                ],
                short(crate::limits::CMID_LEN_MAX),
                short(crate::limits::KIND_LEN_MAX),
                text()
            )
                .prop_map(|(target, cmid, kind, body)| Message::Send(Send {
                    target,
                    cmid,
                    kind,
                    body
                })),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(c, s, ts)| Message::SendOk(
                SendOk {
                    conv: ConvId(c),
                    seq: Seq(s),
                    ts
                }
            )),
            cursor().prop_map(Message::Read),
            cursor().prop_map(Message::ReadOk),
            any::<u64>().prop_map(|c| Message::Resolve(ConvId(c))),
            any::<u64>().prop_map(|c| Message::ResolveOk(ConvId(c))),
            (
                any::<u64>(),
                prop_oneof![
                    Just(HistoryRange::Newest),
                    (1..u64::MAX).prop_map(|s| HistoryRange::Before(Seq(s))),
                    any::<u64>().prop_map(|s| HistoryRange::After(Seq(s))),
                ],
                HISTORY_LIMIT_MIN..=HISTORY_LIMIT_MAX
            )
                .prop_map(|(c, range, limit)| Message::History(History {
                    conv: ConvId(c),
                    range,
                    limit
                })),
            (any::<u64>(), vec(msg(), 0..4)).prop_map(|(c, msgs)| Message::HistoryOk(HistoryOk {
                conv: ConvId(c),
                msgs
            })),
            Just(Message::Convs),
            vec(conv_summary(), 0..4).prop_map(Message::ConvsOk),
            Just(Message::Ping),
            Just(Message::Pong),
            (msg(), profile(), profile()).prop_map(|(msg, from_profile, conv_profile)| {
                Message::Msg(MsgPush {
                    msg,
                    from_profile,
                    conv_profile,
                })
            }),
            (any::<u64>(), uid(), any::<u64>()).prop_map(|(c, uid, s)| Message::Receipt(Receipt {
                conv: ConvId(c),
                uid,
                seq: Seq(s)
            })),
            (any::<u64>(), vec(uid(), 0..6), user_profiles()).prop_map(|(c, members, profiles)| {
                Message::Members(Members {
                    conv: ConvId(c),
                    members,
                    profiles,
                })
            }),
            (
                any::<u64>(),
                vec(uid(), 0..4),
                vec(uid(), 0..4),
                any::<u32>()
            )
                .prop_map(|(c, added, removed, count)| Message::MembersDelta(
                    MembersDelta {
                        conv: ConvId(c),
                        added,
                        removed,
                        count
                    }
                )),
            text().prop_map(Message::Kicked),
            (0usize..9, text()).prop_map(|(i, message)| Message::Error(ErrorReply {
                code: ErrorCode::ALL[i],
                message
            })),
        ]
    }

    /// The service port's ops and the `notify` push.
    fn stream_event() -> impl Strategy<Value = StreamEvent> {
        (any::<u16>(), any::<u64>(), uid(), 0u8..3, any::<u64>()).prop_map(
            |(after_msgs, c, uid, which, n)| StreamEvent {
                after_msgs,
                conv: ConvId(c),
                uid,
                change: match which {
                    0 => StreamChange::Joined { ts: n },
                    1 => StreamChange::Left { ts: n },
                    _ => StreamChange::Read { seq: Seq(n) },
                },
            },
        )
    }

    fn stats_row() -> impl Strategy<Value = StatsRow> {
        (any::<[u32; 5]>(), any::<u64>(), any::<u64>()).prop_map(|(n, p50, p90)| StatsRow {
            assigned: n[0],
            open: n[1],
            resolved: n[2],
            messages: n[3],
            replies: n[4],
            reply_ms_p50: p50,
            reply_ms_p90: p90,
        })
    }

    pub fn service_message() -> impl Strategy<Value = Message<'static>> {
        let history = || {
            (
                any::<u64>(),
                prop_oneof![
                    Just(HistoryRange::Newest),
                    (1..u64::MAX).prop_map(|s| HistoryRange::Before(Seq(s))),
                    any::<u64>().prop_map(|s| HistoryRange::After(Seq(s))),
                ],
                HISTORY_LIMIT_MIN..=HISTORY_LIMIT_MAX,
            )
                .prop_map(|(c, range, limit)| History {
                    conv: ConvId(c),
                    range,
                    limit,
                })
        };
        prop_oneof![
            (short(crate::limits::KIND_LEN_MAX), text(), any::<u64>())
                .prop_map(|(kind, body, ts)| Message::Notify(Notify { kind, body, ts })),
            "[A-Za-z0-9._-]{0,300}".prop_map(|t| Message::Auth(Cow::Owned(t))),
            (uid(), any::<u64>()).prop_map(|(uid, ts)| Message::AuthOk(AuthOk { uid, ts })),
            (
                uid(),
                any::<u64>(),
                short(crate::limits::CMID_LEN_MAX),
                short(crate::limits::KIND_LEN_MAX),
                text()
            )
                .prop_map(|(from, c, cmid, kind, body)| Message::SendAs(SendAs {
                    from,
                    send: Send {
                        target: Target::Conv(ConvId(c)),
                        cmid,
                        kind,
                        body
                    }
                })),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(c, s, ts)| Message::SendAsOk(
                SendOk {
                    conv: ConvId(c),
                    seq: Seq(s),
                    ts
                }
            )),
            (vec(uid(), 1..6), short(crate::limits::KIND_LEN_MAX), text()).prop_map(
                |(users, kind, body)| Message::NotifyUsers(NotifyUsers { users, kind, body })
            ),
            any::<u32>().prop_map(Message::NotifyUsersOk),
            (uid(), proptest::option::of(device_id()))
                .prop_map(|(uid, device)| Message::Kick(Kick { uid, device })),
            any::<u32>().prop_map(Message::KickOk),
            vec(uid(), 1..6).prop_map(Message::Presence),
            vec(
                (uid(), vec(device_id(), 0..4)).prop_map(|(uid, devices)| Online { uid, devices }),
                0..4
            )
            .prop_map(Message::PresenceOk),
            history().prop_map(Message::ConvHistory),
            (any::<u64>(), vec(uid(), 1..4))
                .prop_map(|(key, users)| Message::GroupCreate(GroupCreate { key, users })),
            (any::<u64>(), vec(uid(), 1..4)).prop_map(|(c, users)| Message::GroupAdd(
                GroupMembers {
                    conv: ConvId(c),
                    users
                }
            )),
            (any::<u64>(), vec(uid(), 1..4)).prop_map(|(c, users)| Message::GroupRemove(
                GroupMembers {
                    conv: ConvId(c),
                    users
                }
            )),
            any::<u64>().prop_map(|c| Message::ConvInfo(ConvId(c))),
            (0u8..4, conv_info()).prop_map(|(which, info)| match which {
                0 => Message::GroupCreateOk(info),
                1 => Message::GroupAddOk(info),
                2 => Message::GroupRemoveOk(info),
                _ => Message::ConvInfoOk(info),
            }),
            (any::<u64>(), vec(msg(), 0..4)).prop_map(|(c, msgs)| Message::ConvHistoryOk(
                HistoryOk {
                    conv: ConvId(c),
                    msgs
                }
            )),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(shop, from_ms, to_ms)| {
                Message::AgentStats(AgentStats {
                    shop: ShopId(shop),
                    from_ms,
                    to_ms,
                })
            }),
            (
                any::<u64>(),
                any::<(u64, u64)>(),
                stats_row(),
                vec((uid(), stats_row()), 0..4)
            )
                .prop_map(|(shop, (from_ms, to_ms), total, agents)| {
                    Message::AgentStatsOk(AgentStatsOk {
                        shop: ShopId(shop),
                        from_ms,
                        to_ms,
                        total,
                        agents: agents
                            .into_iter()
                            .map(|(agent, stats)| AgentRow { agent, stats })
                            .collect(),
                    })
                }),
            "[0-9a-f]{0,80}".prop_map(|p| Message::Subscribe(Cow::Owned(p))),
            profile_of().prop_map(Message::SetProfile),
            Just(Message::SetProfileOk),
            subject().prop_map(Message::GetProfile),
            profile_of().prop_map(Message::GetProfileOk),
            profile_of().prop_map(Message::ConvProfile),
            (
                "[0-9a-f]{0,80}",
                vec(msg(), 0..4),
                vec(stream_event(), 0..4)
            )
                .prop_map(|(p, msgs, events)| Message::StreamBatch(StreamBatch {
                    position: Cow::Owned(p),
                    msgs,
                    events
                })),
        ]
    }

    pub fn frame() -> impl Strategy<Value = Frame<'static>> {
        (
            proptest::option::of(any::<u64>()),
            prop_oneof![4 => message(), 1 => service_message()],
        )
            .prop_map(|(req, message)| Frame { req, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{binary, json};
    use bytes::BytesMut;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn op_codes_and_names_are_unique_and_inverse() {
        let codes: HashSet<u8> = Op::ALL.iter().map(|op| *op as u8).collect();
        let names: HashSet<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(codes.len(), Op::ALL.len());
        assert_eq!(names.len(), Op::ALL.len());
        for op in Op::ALL {
            assert_eq!(Op::from_code(op as u8), Some(op));
            assert_eq!(Op::from_name(op.name()), Some(op));
        }
        assert_eq!(
            Op::ALL
                .iter()
                .filter(|op| op.is_request() && !op.is_service())
                .count(),
            7,
            "login, send, read, resolve, history, convs, ping"
        );
        for op in Op::ALL.into_iter().filter(|op| op.is_service()) {
            let code = op as u8 & 0x7f;
            assert!(
                (0x10..=0x3f).contains(&code),
                "{op}: service ops are 0x10..=0x2f, group ops 0x30..=0x3f"
            );
        }
        assert!(!Op::Notify.is_service(), "notify is a client push");
    }

    #[test]
    fn a_service_request_names_1_to_10000_users() {
        let none = r#"{"op":"presence","req":1,"users":[]}"#;
        assert!(matches!(
            json::decode(none).unwrap_err().kind,
            DecodeErrorKind::BadValue(_)
        ));
        // A forged binary count of 2^32-1 users is refused before anything is allocated.
        let mut wire = BytesMut::new();
        let frame = Frame::with_req(
            1,
            Message::Presence(vec![Uid::new(crate::UidKind::Buyer, 1)]),
        );
        binary::encode(&frame, &mut wire).unwrap();
        wire[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = binary::decode(&wire).unwrap_err();
        assert_eq!((e.req, e.op), (Some(1), Some(Op::Presence)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_op_round_trips_through_binary(frame in strategies::frame()) {
            let mut wire = BytesMut::new();
            binary::encode(&frame, &mut wire).unwrap();
            prop_assert_eq!(binary::decode(&wire).unwrap(), frame);
        }

        #[test]
        fn every_op_round_trips_through_json(frame in strategies::frame()) {
            let mut text = BytesMut::new();
            json::encode(&frame, &mut text);
            let parsed: serde_json::Value = serde_json::from_slice(&text).unwrap();
            prop_assert!(parsed.is_object());
            prop_assert_eq!(json::decode_bytes(&text).unwrap(), frame);
        }

        #[test]
        fn binary_and_json_carry_the_same_frame(frame in strategies::frame()) {
            let mut wire = BytesMut::new();
            binary::encode(&frame, &mut wire).unwrap();
            let from_binary = binary::decode(&wire).unwrap();
            let mut text = BytesMut::new();
            json::encode(&from_binary, &mut text);
            prop_assert_eq!(json::decode_bytes(&text).unwrap(), frame);
        }
    }
}
