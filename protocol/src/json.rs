//! The JSON text form of the contract: one object per WebSocket text message.
//!
//! Ids that can exceed 2^53 (`conv`, `shop`, `device_id`, `node_id`) are decimal strings; `seq`,
//! `unread`, `ts`, `req` and `limit` are numbers; uids are `"kind:id"`. Unknown fields are
//! ignored, so clients may add their own; a duplicated field is an error.
//!
//! Decoding borrows every string that has no escape sequence. Encoding writes straight into a
//! caller's `BytesMut` with its own string escaper, so an outgoing push costs one pass.

use std::borrow::Cow;
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::ids::{ConvId, DeviceId, NodeId, Seq, ShopId, Uid};
use crate::limits;
use crate::message::{
    AgentRow, AgentStats, AgentStatsOk, AuthOk, ConvInfo, ConvSummary, ConvType, Cursor,
    DecodeError, DecodeErrorKind, ErrorCode, ErrorReply, Frame, GroupCreate, GroupMembers, History,
    HistoryOk, HistoryRange, Kick, Login, LoginOk, Members, MembersDelta, Message, Msg, MsgPush,
    Notify, NotifyUsers, Online, Op, Profile, ProfileOf, Receipt, Send, SendAs, SendOk, StatsRow,
    StreamBatch, StreamChange, StreamEvent, Subject, Target, UserProfile, HISTORY_LIMIT_DEFAULT,
};

/// A JSON string that borrows from the input when it has no escapes. (serde's own `Cow<str>`
/// always copies when wrapped in `Option` or `Vec`; this visitor borrows wherever serde_json
/// hands it a borrowed string.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Every field any op may carry. One flat struct deserializes without buffering and lets each op
/// pick its fields and say precisely which is missing.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawFrame<'a> {
    #[serde(borrow)]
    op: Option<Text<'a>>,
    req: Option<u64>,
    #[serde(borrow)]
    token: Option<Text<'a>>,
    #[serde(borrow)]
    device: Option<Text<'a>>,
    #[serde(borrow)]
    uid: Option<Text<'a>>,
    #[serde(borrow)]
    device_id: Option<Text<'a>>,
    #[serde(borrow)]
    node_id: Option<Text<'a>>,
    ts: Option<u64>,
    #[serde(borrow)]
    conv: Option<Text<'a>>,
    #[serde(borrow)]
    shop: Option<Text<'a>>,
    #[serde(borrow)]
    user: Option<Text<'a>>,
    #[serde(borrow)]
    cmid: Option<Text<'a>>,
    #[serde(borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    body: Option<Text<'a>>,
    #[serde(borrow)]
    from: Option<Text<'a>>,
    seq: Option<u64>,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u64>,
    #[serde(borrow)]
    msgs: Option<Vec<RawMsg<'a>>>,
    #[serde(borrow)]
    convs: Option<Vec<RawConv<'a>>>,
    #[serde(borrow)]
    members: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    key: Option<Text<'a>>,
    #[serde(rename = "type", borrow)]
    conv_type: Option<Text<'a>>,
    member_count: Option<u64>,
    last_seq: Option<u64>,
    created: Option<bool>,
    #[serde(borrow)]
    added: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    removed: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    reason: Option<Text<'a>>,
    #[serde(borrow)]
    code: Option<Text<'a>>,
    #[serde(borrow)]
    message: Option<Text<'a>>,
    #[serde(borrow)]
    users: Option<Vec<Text<'a>>>,
    count: Option<u64>,
    #[serde(borrow)]
    online: Option<Vec<RawOnline<'a>>>,
    #[serde(borrow)]
    position: Option<Text<'a>>,
    #[serde(borrow)]
    nick: Option<Text<'a>>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    avatar: Option<Text<'a>>,
    #[serde(borrow)]
    from_nick: Option<Text<'a>>,
    #[serde(borrow)]
    from_avatar: Option<Text<'a>>,
    #[serde(borrow)]
    conv_name: Option<Text<'a>>,
    #[serde(borrow)]
    conv_avatar: Option<Text<'a>>,
    #[serde(borrow)]
    profiles: Option<Vec<RawUserProfile<'a>>>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    total: Option<RawStatsRow>,
    #[serde(borrow)]
    agents: Option<Vec<RawAgentRow<'a>>>,
    #[serde(borrow)]
    events: Option<Vec<RawStreamEvent<'a>>>,
}

#[derive(Deserialize)]
struct RawUserProfile<'a> {
    #[serde(borrow)]
    uid: Text<'a>,
    #[serde(default, borrow)]
    nick: Option<Text<'a>>,
    #[serde(default, borrow)]
    avatar: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct RawStreamEvent<'a> {
    #[serde(borrow)]
    event: Text<'a>,
    after_msgs: u16,
    #[serde(borrow)]
    conv: Text<'a>,
    #[serde(borrow)]
    uid: Text<'a>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
}

fn stream_event_from_raw(raw: &RawStreamEvent<'_>) -> Result<StreamEvent, DecodeErrorKind> {
    let change = match &*raw.event {
        "joined" => StreamChange::Joined {
            ts: need(raw.ts, "ts")?,
        },
        "left" => StreamChange::Left {
            ts: need(raw.ts, "ts")?,
        },
        "read" => StreamChange::Read {
            seq: Seq(need(raw.seq, "seq")?),
        },
        _ => return Err(DecodeErrorKind::BadValue("unknown stream event")),
    };
    Ok(StreamEvent {
        after_msgs: raw.after_msgs,
        conv: parse_str(&raw.conv, "conv")?,
        uid: parse_str(&raw.uid, "uid")?,
        change,
    })
}

#[derive(Deserialize)]
struct RawStatsRow {
    assigned: u32,
    open: u32,
    resolved: u32,
    messages: u32,
    replies: u32,
    reply_ms_p50: u64,
    reply_ms_p90: u64,
}

impl From<&RawStatsRow> for StatsRow {
    fn from(r: &RawStatsRow) -> StatsRow {
        StatsRow {
            assigned: r.assigned,
            open: r.open,
            resolved: r.resolved,
            messages: r.messages,
            replies: r.replies,
            reply_ms_p50: r.reply_ms_p50,
            reply_ms_p90: r.reply_ms_p90,
        }
    }
}

#[derive(Deserialize)]
struct RawAgentRow<'a> {
    #[serde(borrow)]
    agent: Text<'a>,
    #[serde(flatten)]
    stats: RawStatsRow,
}

#[derive(Deserialize)]
struct RawOnline<'a> {
    #[serde(borrow)]
    uid: Text<'a>,
    #[serde(borrow)]
    devices: Vec<Text<'a>>,
}

#[derive(Deserialize)]
struct RawMsg<'a> {
    #[serde(borrow)]
    conv: Text<'a>,
    seq: u64,
    #[serde(borrow)]
    from: Text<'a>,
    ts: u64,
    #[serde(borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    body: Text<'a>,
    #[serde(borrow)]
    cmid: Text<'a>,
}

#[derive(Deserialize)]
struct RawConv<'a> {
    #[serde(borrow)]
    conv: Text<'a>,
    #[serde(rename = "type", borrow)]
    conv_type: Text<'a>,
    #[serde(default, borrow)]
    shop: Option<Text<'a>>,
    #[serde(borrow)]
    members: Vec<Text<'a>>,
    member_count: u64,
    last_seq: u64,
    read_seq: u64,
    unread: u64,
    #[serde(default, borrow)]
    last: Option<RawMsg<'a>>,
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(default, borrow)]
    avatar: Option<Text<'a>>,
    #[serde(default, borrow)]
    profiles: Option<Vec<RawUserProfile<'a>>>,
}

/// Just the `req`, to echo it when the rest of a frame does not decode.
#[derive(Deserialize)]
struct RawReq {
    #[serde(default)]
    req: Option<u64>,
}

/// Just the `op`, to tell a failed login when the rest of a frame does not decode.
#[derive(Deserialize)]
struct RawOp {
    #[serde(default)]
    op: Option<String>,
}

/// Decodes one JSON object.
pub fn decode(text: &str) -> Result<Frame<'_>, DecodeError> {
    let raw: RawFrame<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let req = serde_json::from_str::<RawReq>(text)
                .ok()
                .and_then(|r| r.req);
            let op = serde_json::from_str::<RawOp>(text)
                .ok()
                .and_then(|r| Op::from_name(r.op.as_deref()?));
            return Err(DecodeError::new(req, DecodeErrorKind::BadJson(e.to_string())).with_op(op));
        }
    };
    let req = raw.req;
    let op = raw.op.as_ref().and_then(|name| Op::from_name(&name.0));
    let message = from_raw(raw).map_err(|kind| DecodeError::new(req, kind).with_op(op))?;
    Ok(Frame { req, message })
}

/// Decodes one JSON object as a message of `op`, named outside it (the `<op>` of the HTTP
/// form `POST /api/<op>`, docs/backend.md): the object need not carry `op`, and if it does it
/// must be the same. Everything else is read as [`decode`] reads it.
pub fn decode_as(op: Op, text: &str) -> Result<Frame<'_>, DecodeError> {
    // serde would read an array as the fields in order: only an object is a message.
    if !text.trim_start().starts_with('{') {
        let kind = DecodeErrorKind::BadJson("not a JSON object".into());
        return Err(DecodeError::new(None, kind).with_op(Some(op)));
    }
    let mut raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| {
        DecodeError::new(None, DecodeErrorKind::BadJson(e.to_string())).with_op(Some(op))
    })?;
    let req = raw.req;
    if raw.op.as_deref().is_some_and(|name| name != op.name()) {
        let kind = DecodeErrorKind::BadValue("op (not the op the request names)");
        return Err(DecodeError::new(req, kind).with_op(Some(op)));
    }
    raw.op = Some(Text(Cow::Borrowed(op.name())));
    let message = from_raw(raw).map_err(|kind| DecodeError::new(req, kind).with_op(Some(op)))?;
    Ok(Frame { req, message })
}

/// Decodes one JSON object given as bytes (a WebSocket text message, already UTF-8 checked or not).
pub fn decode_bytes(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| DecodeError::new(None, DecodeErrorKind::InvalidUtf8("text")))?;
    decode(text)
}

fn from_raw(mut raw: RawFrame<'_>) -> Result<Message<'_>, DecodeErrorKind> {
    let op_name = raw.op.take().ok_or(DecodeErrorKind::MissingField("op"))?;
    let op = Op::from_name(&op_name)
        .ok_or_else(|| DecodeErrorKind::UnknownOp(truncate(&op_name, 64)))?;
    let conv = || parse_field::<ConvId>(&raw.conv, "conv");
    Ok(match op {
        Op::Login => {
            let token = need_text(raw.token, "token")?;
            limits::check_token(&token)?;
            Message::Login(Login {
                device: parse_field(&raw.device, "device")?,
                token,
            })
        }
        Op::LoginOk => Message::LoginOk(LoginOk {
            uid: parse_field(&raw.uid, "uid")?,
            device_id: parse_field::<DeviceId>(&raw.device_id, "device_id")?,
            node_id: parse_field::<NodeId>(&raw.node_id, "node_id")?,
            ts: need(raw.ts, "ts")?,
        }),
        Op::Send => Message::Send(send_from_raw(&mut raw)?),
        Op::SendAs => Message::SendAs(SendAs {
            from: parse_field(&raw.from, "from")?,
            send: send_from_raw(&mut raw)?,
        }),
        Op::SendOk => Message::SendOk(send_ok_from_raw(&raw)?),
        Op::SendAsOk => Message::SendAsOk(send_ok_from_raw(&raw)?),
        Op::Read => Message::Read(Cursor {
            conv: conv()?,
            seq: Seq(need(raw.seq, "seq")?),
        }),
        Op::ReadOk => Message::ReadOk(Cursor {
            conv: conv()?,
            seq: Seq(need(raw.seq, "seq")?),
        }),
        Op::Resolve => Message::Resolve(conv()?),
        Op::ResolveOk => Message::ResolveOk(conv()?),
        Op::History => Message::History(history_from_raw(&raw)?),
        Op::ConvHistory => Message::ConvHistory(history_from_raw(&raw)?),
        Op::HistoryOk => Message::HistoryOk(history_ok_from_raw(raw)?),
        Op::ConvHistoryOk => Message::ConvHistoryOk(history_ok_from_raw(raw)?),
        Op::GroupCreate => Message::GroupCreate(GroupCreate {
            key: parse_field(&raw.key, "key")?,
            users: users_from_raw(&raw.users)?,
        }),
        Op::GroupAdd => Message::GroupAdd(GroupMembers {
            conv: conv()?,
            users: users_from_raw(&raw.users)?,
        }),
        Op::GroupRemove => Message::GroupRemove(GroupMembers {
            conv: conv()?,
            users: users_from_raw(&raw.users)?,
        }),
        Op::ConvInfo => Message::ConvInfo(conv()?),
        Op::GroupCreateOk => Message::GroupCreateOk(conv_info_from_raw(&raw)?),
        Op::GroupAddOk => Message::GroupAddOk(conv_info_from_raw(&raw)?),
        Op::GroupRemoveOk => Message::GroupRemoveOk(conv_info_from_raw(&raw)?),
        Op::ConvInfoOk => Message::ConvInfoOk(conv_info_from_raw(&raw)?),
        Op::Convs => Message::Convs,
        Op::ConvsOk => Message::ConvsOk(
            need(raw.convs, "convs")?
                .into_iter()
                .map(conv_from_raw)
                .collect::<Result<_, _>>()?,
        ),
        Op::Ping => Message::Ping,
        Op::Pong => Message::Pong,
        Op::Msg => {
            let from_profile = profile_from_raw(&raw.from_nick, &raw.from_avatar)?;
            let conv_profile = profile_from_raw(&raw.conv_name, &raw.conv_avatar)?;
            Message::Msg(MsgPush {
                msg: msg_from_raw(RawMsg {
                    conv: need(raw.conv, "conv")?,
                    seq: need(raw.seq, "seq")?,
                    from: need(raw.from, "from")?,
                    ts: need(raw.ts, "ts")?,
                    kind: need(raw.kind, "kind")?,
                    body: need(raw.body, "body")?,
                    cmid: need(raw.cmid, "cmid")?,
                })?,
                from_profile,
                conv_profile,
            })
        }
        Op::SetProfile => Message::SetProfile(profile_of_from_raw(&raw)?),
        Op::GetProfileOk => Message::GetProfileOk(profile_of_from_raw(&raw)?),
        Op::ConvProfile => Message::ConvProfile(profile_of_from_raw(&raw)?),
        Op::GetProfile => Message::GetProfile(subject_from_raw(&raw)?),
        Op::SetProfileOk => Message::SetProfileOk,
        Op::Receipt => Message::Receipt(Receipt {
            conv: conv()?,
            uid: parse_field(&raw.uid, "uid")?,
            seq: Seq(need(raw.seq, "seq")?),
        }),
        Op::Members => Message::Members(Members {
            conv: conv()?,
            members: parse_uids(&need(raw.members, "members")?)?,
            profiles: user_profiles_from_raw(&raw.profiles)?,
        }),
        Op::MembersDelta => Message::MembersDelta(MembersDelta {
            conv: conv()?,
            added: parse_uids(&need(raw.added, "added")?)?,
            removed: parse_uids(&need(raw.removed, "removed")?)?,
            count: count_from_raw(raw.count)?,
        }),
        Op::Kicked => Message::Kicked(need_text(raw.reason, "reason")?),
        Op::Error => Message::Error(ErrorReply {
            code: ErrorCode::from_str(&need(raw.code, "code")?)
                .map_err(|()| DecodeErrorKind::BadValue("unknown error code"))?,
            message: need_text(raw.message, "message")?,
        }),
        Op::Notify => {
            let kind = need_text(raw.kind, "kind")?;
            limits::check_kind(&kind)?;
            Message::Notify(Notify {
                kind,
                body: need_text(raw.body, "body")?,
                ts: need(raw.ts, "ts")?,
            })
        }
        Op::Auth => {
            let token = need_text(raw.token, "token")?;
            limits::check_token(&token)?;
            Message::Auth(token)
        }
        // No `from` is the empty position: from now.
        Op::Subscribe => Message::Subscribe(raw.from.map(|text| text.0).unwrap_or_default()),
        Op::AgentStats => Message::AgentStats(AgentStats {
            shop: parse_field(&raw.shop, "shop")?,
            from_ms: need(raw.from_ms, "from_ms")?,
            to_ms: need(raw.to_ms, "to_ms")?,
        }),
        Op::AgentStatsOk => {
            let agents = need_ref(&raw.agents, "agents")?;
            if agents.len() > usize::from(u16::MAX) {
                return Err(DecodeErrorKind::BadValue("agents"));
            }
            Message::AgentStatsOk(AgentStatsOk {
                shop: parse_field(&raw.shop, "shop")?,
                from_ms: need(raw.from_ms, "from_ms")?,
                to_ms: need(raw.to_ms, "to_ms")?,
                total: need_ref(&raw.total, "total")?.into(),
                agents: agents
                    .iter()
                    .map(|row| {
                        Ok(AgentRow {
                            agent: parse_str(&row.agent, "agent")?,
                            stats: (&row.stats).into(),
                        })
                    })
                    .collect::<Result<_, DecodeErrorKind>>()?,
            })
        }
        Op::StreamBatch => {
            let events = raw.events.unwrap_or_default();
            if events.len() > usize::from(u16::MAX) {
                return Err(DecodeErrorKind::BadValue("events"));
            }
            Message::StreamBatch(StreamBatch {
                position: need_text(raw.position, "position")?,
                msgs: need(raw.msgs, "msgs")?
                    .into_iter()
                    .map(msg_from_raw)
                    .collect::<Result<_, _>>()?,
                events: events
                    .iter()
                    .map(stream_event_from_raw)
                    .collect::<Result<_, _>>()?,
            })
        }
        Op::AuthOk => Message::AuthOk(AuthOk {
            uid: parse_field(&raw.uid, "uid")?,
            ts: need(raw.ts, "ts")?,
        }),
        Op::NotifyUsers => {
            let users = users_from_raw(&raw.users)?;
            let kind = need_text(raw.kind, "kind")?;
            limits::check_kind(&kind)?;
            Message::NotifyUsers(NotifyUsers {
                users,
                kind,
                body: need_text(raw.body, "body")?,
            })
        }
        Op::NotifyUsersOk => Message::NotifyUsersOk(count_from_raw(raw.count)?),
        Op::Kick => Message::Kick(Kick {
            uid: parse_field(&raw.uid, "uid")?,
            device: match &raw.device_id {
                None => None,
                Some(_) => Some(parse_field(&raw.device_id, "device_id")?),
            },
        }),
        Op::KickOk => Message::KickOk(count_from_raw(raw.count)?),
        Op::Presence => Message::Presence(users_from_raw(&raw.users)?),
        Op::PresenceOk => Message::PresenceOk(
            need(raw.online, "online")?
                .iter()
                .map(|entry| {
                    if entry.devices.len() > usize::from(u16::MAX) {
                        return Err(DecodeErrorKind::BadValue("devices"));
                    }
                    Ok(Online {
                        uid: parse_str(&entry.uid, "uid")?,
                        devices: entry
                            .devices
                            .iter()
                            .map(|d| parse_str(d, "devices"))
                            .collect::<Result<_, _>>()?,
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn send_from_raw<'a>(raw: &mut RawFrame<'a>) -> Result<Send<'a>, DecodeErrorKind> {
    let target = match (&raw.conv, &raw.shop, &raw.user) {
        (Some(_), None, None) => Target::Conv(parse_field(&raw.conv, "conv")?),
        (None, Some(_), None) => Target::Shop(parse_field(&raw.shop, "shop")?),
        (None, None, Some(_)) => Target::User(parse_field(&raw.user, "user")?),
        (None, None, None) => return Err(DecodeErrorKind::MissingField("conv|shop|user")),
        _ => {
            return Err(DecodeErrorKind::BadValue(
                "send takes exactly one of conv, shop, user",
            ))
        }
    };
    let cmid = need_text(raw.cmid.take(), "cmid")?;
    let kind = need_text(raw.kind.take(), "kind")?;
    limits::check_cmid(&cmid)?;
    limits::check_kind(&kind)?;
    Ok(Send {
        target,
        cmid,
        kind,
        body: need_text(raw.body.take(), "body")?,
    })
}

fn send_ok_from_raw(raw: &RawFrame<'_>) -> Result<SendOk, DecodeErrorKind> {
    Ok(SendOk {
        conv: parse_field(&raw.conv, "conv")?,
        seq: Seq(need(raw.seq, "seq")?),
        ts: need(raw.ts, "ts")?,
    })
}

fn history_from_raw(raw: &RawFrame<'_>) -> Result<History, DecodeErrorKind> {
    let range = match (raw.before.filter(|&b| b != 0), raw.after) {
        (None, None) => HistoryRange::Newest,
        (Some(before), None) => HistoryRange::Before(Seq(before)),
        (None, Some(after)) => HistoryRange::After(Seq(after)),
        (Some(_), Some(_)) => {
            return Err(DecodeErrorKind::BadValue(
                "history takes before or after, not both",
            ))
        }
    };
    let limit = match raw.limit {
        None => HISTORY_LIMIT_DEFAULT,
        Some(limit) => limits::check_history_limit(limit)?,
    };
    Ok(History {
        conv: parse_field(&raw.conv, "conv")?,
        range,
        limit,
    })
}

fn history_ok_from_raw(raw: RawFrame<'_>) -> Result<HistoryOk<'_>, DecodeErrorKind> {
    Ok(HistoryOk {
        conv: parse_field(&raw.conv, "conv")?,
        msgs: need(raw.msgs, "msgs")?
            .into_iter()
            .map(msg_from_raw)
            .collect::<Result<_, _>>()?,
    })
}

fn users_from_raw(users: &Option<Vec<Text<'_>>>) -> Result<Vec<Uid>, DecodeErrorKind> {
    let users = users
        .as_ref()
        .ok_or(DecodeErrorKind::MissingField("users"))?;
    limits::check_users(users.len())?;
    users.iter().map(|uid| parse_str(uid, "users")).collect()
}

fn count_from_raw(count: Option<u64>) -> Result<u32, DecodeErrorKind> {
    u32::try_from(need(count, "count")?).map_err(|_| DecodeErrorKind::BadValue("count"))
}

fn need<T>(field: Option<T>, name: &'static str) -> Result<T, DecodeErrorKind> {
    field.ok_or(DecodeErrorKind::MissingField(name))
}

fn need_text<'a>(
    field: Option<Text<'a>>,
    name: &'static str,
) -> Result<Cow<'a, str>, DecodeErrorKind> {
    need(field, name).map(|text| text.0)
}

fn parse_field<T: FromStr>(
    field: &Option<Text<'_>>,
    name: &'static str,
) -> Result<T, DecodeErrorKind> {
    parse_str(
        field
            .as_deref()
            .ok_or(DecodeErrorKind::MissingField(name))?,
        name,
    )
}

fn parse_str<T: FromStr>(text: &str, name: &'static str) -> Result<T, DecodeErrorKind> {
    text.parse().map_err(|_| DecodeErrorKind::BadValue(name))
}

fn parse_uids(uids: &[Text<'_>]) -> Result<Vec<Uid>, DecodeErrorKind> {
    if uids.len() > usize::from(u16::MAX) {
        return Err(DecodeErrorKind::BadValue("members"));
    }
    uids.iter().map(|uid| parse_str(uid, "members")).collect()
}

fn profile_from_raw(
    name: &Option<Text<'_>>,
    avatar: &Option<Text<'_>>,
) -> Result<Profile, DecodeErrorKind> {
    let profile = Profile {
        name: name.as_deref().unwrap_or_default().to_owned(),
        avatar: avatar.as_deref().unwrap_or_default().to_owned(),
    };
    limits::check_profile(&profile)?;
    Ok(profile)
}

fn user_profiles_from_raw(
    raw: &Option<Vec<RawUserProfile<'_>>>,
) -> Result<Vec<UserProfile>, DecodeErrorKind> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if raw.len() > usize::from(u16::MAX) {
        return Err(DecodeErrorKind::BadValue("profiles"));
    }
    raw.iter()
        .map(|p| {
            Ok(UserProfile {
                uid: parse_str(&p.uid, "uid")?,
                profile: profile_from_raw(&p.nick, &p.avatar)?,
            })
        })
        .collect()
}

/// Exactly one of `user`, `conv`, `shop`.
fn subject_from_raw(raw: &RawFrame<'_>) -> Result<Subject, DecodeErrorKind> {
    Ok(match (&raw.user, &raw.conv, &raw.shop) {
        (Some(_), None, None) => Subject::User(parse_field(&raw.user, "user")?),
        (None, Some(_), None) => Subject::Conv(parse_field(&raw.conv, "conv")?),
        (None, None, Some(_)) => Subject::Shop(parse_field(&raw.shop, "shop")?),
        (None, None, None) => return Err(DecodeErrorKind::MissingField("user|conv|shop")),
        _ => {
            return Err(DecodeErrorKind::BadValue(
                "a profile is of exactly one of user, conv, shop",
            ))
        }
    })
}

/// A subject and its profile: a user's `nick`, a conversation's or shop's `name`, `avatar`;
/// an absent field is empty (not set).
fn profile_of_from_raw(raw: &RawFrame<'_>) -> Result<ProfileOf, DecodeErrorKind> {
    let subject = subject_from_raw(raw)?;
    let name = match subject {
        Subject::User(_) if raw.name.is_some() => {
            return Err(DecodeErrorKind::BadValue(
                "a user's profile has nick, not name",
            ))
        }
        Subject::User(_) => &raw.nick,
        _ if raw.nick.is_some() => {
            return Err(DecodeErrorKind::BadValue(
                "a conversation's or shop's profile has name, not nick",
            ))
        }
        _ => &raw.name,
    };
    Ok(ProfileOf {
        subject,
        profile: profile_from_raw(name, &raw.avatar)?,
    })
}

fn msg_from_raw(raw: RawMsg<'_>) -> Result<Msg<'_>, DecodeErrorKind> {
    Ok(Msg {
        conv: parse_str(&raw.conv, "conv")?,
        seq: Seq(raw.seq),
        from: parse_str(&raw.from, "from")?,
        ts: raw.ts,
        kind: raw.kind.0,
        body: raw.body.0,
        cmid: raw.cmid.0,
    })
}

fn conv_info_from_raw(raw: &RawFrame<'_>) -> Result<ConvInfo, DecodeErrorKind> {
    let conv_type = conv_type_from_raw(&need_ref(&raw.conv_type, "type")?.0, &raw.shop)?;
    let key = match (&raw.key, conv_type) {
        (None, ConvType::Group) => return Err(DecodeErrorKind::MissingField("key")),
        (None, _) => None,
        (Some(_), ConvType::Group) => Some(parse_field(&raw.key, "key")?),
        (Some(_), _) => return Err(DecodeErrorKind::BadValue("key (only a group has one)")),
    };
    Ok(ConvInfo {
        conv: parse_field(&raw.conv, "conv")?,
        conv_type,
        key,
        members: parse_uids(need_ref(&raw.members, "members")?)?,
        member_count: u32::try_from(need(raw.member_count, "member_count")?)
            .map_err(|_| DecodeErrorKind::BadValue("member_count"))?,
        last_seq: Seq(need(raw.last_seq, "last_seq")?),
        created: need(raw.created, "created")?,
    })
}

fn need_ref<'r, T>(field: &'r Option<T>, name: &'static str) -> Result<&'r T, DecodeErrorKind> {
    field.as_ref().ok_or(DecodeErrorKind::MissingField(name))
}

fn conv_type_from_raw(
    conv_type: &str,
    shop: &Option<Text<'_>>,
) -> Result<ConvType, DecodeErrorKind> {
    Ok(match (conv_type, shop) {
        ("shop", Some(shop)) => ConvType::Shop(parse_str::<ShopId>(shop, "shop")?),
        ("direct", None) => ConvType::Direct,
        ("group", None) => ConvType::Group,
        _ => {
            return Err(DecodeErrorKind::BadValue(
                "type (shop needs a shop, others none)",
            ))
        }
    })
}

fn conv_from_raw(raw: RawConv<'_>) -> Result<ConvSummary<'_>, DecodeErrorKind> {
    let conv_type = match (&*raw.conv_type, &raw.shop) {
        ("shop", Some(shop)) => ConvType::Shop(parse_str::<ShopId>(shop, "shop")?),
        ("direct", None) => ConvType::Direct,
        ("group", None) => ConvType::Group,
        _ => {
            return Err(DecodeErrorKind::BadValue(
                "type (shop needs a shop, others none)",
            ))
        }
    };
    Ok(ConvSummary {
        conv: parse_str(&raw.conv, "conv")?,
        conv_type,
        members: parse_uids(&raw.members)?,
        member_count: u32::try_from(raw.member_count)
            .map_err(|_| DecodeErrorKind::BadValue("member_count"))?,
        last_seq: Seq(raw.last_seq),
        read_seq: Seq(raw.read_seq),
        unread: raw.unread,
        profile: profile_from_raw(&raw.name, &raw.avatar)?,
        profiles: user_profiles_from_raw(&raw.profiles)?,
        last: raw.last.map(msg_from_raw).transpose()?,
    })
}

fn truncate(s: &str, len_max: usize) -> String {
    let mut end = s.len().min(len_max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Appends `frame` as one JSON object to `out`.
pub fn encode(frame: &Frame<'_>, out: &mut BytesMut) {
    let mut w = Writer { out };
    w.raw("{\"op\":\"");
    w.raw(frame.message.op().name());
    w.raw("\"");
    if let Some(req) = frame.req {
        w.num("req", req);
    }
    match &frame.message {
        Message::Login(m) => {
            w.str("token", &m.token);
            w.str("device", m.device.as_str());
        }
        Message::LoginOk(m) => {
            w.display("uid", m.uid);
            w.display("device_id", m.device_id);
            w.display("node_id", m.node_id);
            w.num("ts", m.ts);
        }
        Message::Send(m) => w.send_fields(m),
        Message::SendAs(m) => {
            w.display("from", m.from);
            w.send_fields(&m.send);
        }
        Message::SendOk(m) | Message::SendAsOk(m) => {
            w.display("conv", m.conv);
            w.num("seq", m.seq.0);
            w.num("ts", m.ts);
        }
        Message::Read(c) | Message::ReadOk(c) => {
            w.display("conv", c.conv);
            w.num("seq", c.seq.0);
        }
        Message::Resolve(conv) | Message::ResolveOk(conv) => w.display("conv", *conv),
        Message::History(m) | Message::ConvHistory(m) => {
            w.display("conv", m.conv);
            match m.range {
                HistoryRange::Newest => {}
                HistoryRange::Before(seq) => w.num("before", seq.0),
                HistoryRange::After(seq) => w.num("after", seq.0),
            }
            w.num("limit", u64::from(m.limit));
        }
        Message::GroupCreate(m) => {
            w.key("key");
            w.quoted_decimal(m.key);
            w.uids("users", &m.users);
        }
        Message::GroupAdd(m) | Message::GroupRemove(m) => {
            w.display("conv", m.conv);
            w.uids("users", &m.users);
        }
        Message::ConvInfo(conv) => w.display("conv", *conv),
        Message::GroupCreateOk(info)
        | Message::GroupAddOk(info)
        | Message::GroupRemoveOk(info)
        | Message::ConvInfoOk(info) => {
            w.display("conv", info.conv);
            w.str("type", info.conv_type.name());
            if let ConvType::Shop(shop) = info.conv_type {
                w.display("shop", shop);
            }
            if let Some(key) = info.key {
                w.key("key");
                w.quoted_decimal(key);
            }
            w.uids("members", &info.members);
            w.num("member_count", u64::from(info.member_count));
            w.num("last_seq", info.last_seq.0);
            w.key("created");
            w.raw(if info.created { "true" } else { "false" });
        }
        Message::HistoryOk(m) | Message::ConvHistoryOk(m) => {
            w.display("conv", m.conv);
            w.msgs(&m.msgs);
        }
        Message::Convs | Message::Ping | Message::Pong => {}
        Message::ConvsOk(convs) => {
            w.array("convs", convs, |w, c| {
                w.raw("{\"conv\":");
                w.id(c.conv);
                w.str("type", c.conv_type.name());
                if let ConvType::Shop(shop) = c.conv_type {
                    w.display("shop", shop);
                }
                w.uids("members", &c.members);
                w.num("member_count", u64::from(c.member_count));
                w.num("last_seq", c.last_seq.0);
                w.num("read_seq", c.read_seq.0);
                w.num("unread", c.unread);
                match &c.last {
                    None => w.raw(",\"last\":null"),
                    Some(msg) => {
                        w.raw(",\"last\":{");
                        w.msg_fields(msg);
                        w.raw("}");
                    }
                }
                w.profile("name", "avatar", &c.profile);
                w.user_profiles(&c.profiles);
                w.raw("}");
            });
        }
        Message::Msg(m) => {
            w.raw(",");
            w.msg_fields(&m.msg);
            w.profile("from_nick", "from_avatar", &m.from_profile);
            w.profile("conv_name", "conv_avatar", &m.conv_profile);
        }
        Message::SetProfile(m) | Message::GetProfileOk(m) | Message::ConvProfile(m) => {
            w.subject(m.subject);
            let name = match m.subject {
                Subject::User(_) => "nick",
                Subject::Conv(_) | Subject::Shop(_) => "name",
            };
            w.profile(name, "avatar", &m.profile);
        }
        Message::GetProfile(subject) => w.subject(*subject),
        Message::SetProfileOk => {}
        Message::Receipt(m) => {
            w.display("conv", m.conv);
            w.display("uid", m.uid);
            w.num("seq", m.seq.0);
        }
        Message::Members(m) => {
            w.display("conv", m.conv);
            w.uids("members", &m.members);
            w.user_profiles(&m.profiles);
        }
        Message::MembersDelta(m) => {
            w.display("conv", m.conv);
            w.uids("added", &m.added);
            w.uids("removed", &m.removed);
            w.num("count", u64::from(m.count));
        }
        Message::Kicked(reason) => w.str("reason", reason),
        Message::Error(m) => {
            w.str("code", m.code.as_str());
            w.str("message", &m.message);
        }
        Message::Notify(m) => {
            w.str("kind", &m.kind);
            w.str("body", &m.body);
            w.num("ts", m.ts);
        }
        Message::Auth(token) => w.str("token", token),
        Message::Subscribe(from) => w.str("from", from),
        Message::AgentStats(m) => {
            w.display("shop", m.shop);
            w.num("from_ms", m.from_ms);
            w.num("to_ms", m.to_ms);
        }
        Message::AgentStatsOk(m) => {
            w.display("shop", m.shop);
            w.num("from_ms", m.from_ms);
            w.num("to_ms", m.to_ms);
            w.raw(",\"total\":{\"assigned\":");
            w.decimal(u64::from(m.total.assigned));
            w.stats_row_rest(&m.total);
            w.raw("}");
            w.array("agents", &m.agents, |w, row| {
                w.raw("{\"agent\":");
                w.id(row.agent);
                w.num("assigned", u64::from(row.stats.assigned));
                w.stats_row_rest(&row.stats);
                w.raw("}");
            });
        }
        Message::StreamBatch(m) => {
            w.str("position", &m.position);
            w.msgs(&m.msgs);
            // Only when there are any, as in the binary form.
            if !m.events.is_empty() {
                w.array("events", &m.events, |w, event| {
                    w.raw("{\"event\":");
                    w.string(event.change.name());
                    w.num("after_msgs", u64::from(event.after_msgs));
                    w.display("conv", event.conv);
                    w.display("uid", event.uid);
                    match event.change {
                        StreamChange::Joined { ts } | StreamChange::Left { ts } => w.num("ts", ts),
                        StreamChange::Read { seq } => w.num("seq", seq.0),
                    }
                    w.raw("}");
                });
            }
        }
        Message::AuthOk(m) => {
            w.display("uid", m.uid);
            w.num("ts", m.ts);
        }
        Message::NotifyUsers(m) => {
            w.uids("users", &m.users);
            w.str("kind", &m.kind);
            w.str("body", &m.body);
        }
        Message::NotifyUsersOk(n) | Message::KickOk(n) => w.num("count", u64::from(*n)),
        Message::Kick(m) => {
            w.display("uid", m.uid);
            if let Some(device) = m.device {
                w.display("device_id", device);
            }
        }
        Message::Presence(users) => w.uids("users", users),
        Message::PresenceOk(online) => {
            w.array("online", online, |w, entry| {
                w.raw("{\"uid\":");
                w.id(entry.uid);
                w.array("devices", &entry.devices, |w, device| w.id(*device));
                w.raw("}");
            });
        }
    }
    w.raw("}");
}

/// Encodes `frame` into a new buffer.
pub fn encode_to_bytes(frame: &Frame<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(96);
    encode(frame, &mut out);
    out.freeze()
}

/// Writes JSON fields. Every field but the first of an object is written with its leading comma.
struct Writer<'b> {
    out: &'b mut BytesMut,
}

impl Writer<'_> {
    /// The fields of a [`StatsRow`] after `assigned`.
    fn stats_row_rest(&mut self, row: &StatsRow) {
        self.num("open", u64::from(row.open));
        self.num("resolved", u64::from(row.resolved));
        self.num("messages", u64::from(row.messages));
        self.num("replies", u64::from(row.replies));
        self.num("reply_ms_p50", row.reply_ms_p50);
        self.num("reply_ms_p90", row.reply_ms_p90);
    }

    fn raw(&mut self, s: &str) {
        self.out.put_slice(s.as_bytes());
    }

    fn key(&mut self, key: &str) {
        self.raw(",\"");
        self.raw(key);
        self.raw("\":");
    }

    fn num(&mut self, key: &str, n: u64) {
        self.key(key);
        self.decimal(n);
    }

    /// A u64 id that is no typed id (a group key) as a JSON string.
    fn quoted_decimal(&mut self, n: u64) {
        self.raw("\"");
        self.decimal(n);
        self.raw("\"");
    }

    fn decimal(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.out.put_slice(&digits[i..]);
    }

    fn display(&mut self, key: &str, value: impl JsonId) {
        self.key(key);
        self.id(value);
    }

    /// An id as a JSON string. Ids hold only ASCII letters, digits and ':': nothing to escape.
    fn id(&mut self, value: impl JsonId) {
        self.raw("\"");
        if let Some(prefix) = value.kind() {
            self.raw(prefix);
            self.raw(":");
        }
        self.decimal(value.number());
        self.raw("\"");
    }

    fn str(&mut self, key: &str, s: &str) {
        self.key(key);
        self.string(s);
    }

    /// `"key":[...]`, each of `items` written by `item`.
    fn array<T>(&mut self, key: &str, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.key(key);
        self.raw("[");
        for (i, each) in items.iter().enumerate() {
            if i > 0 {
                self.raw(",");
            }
            item(self, each);
        }
        self.raw("]");
    }

    fn uids(&mut self, key: &str, uids: &[Uid]) {
        self.array(key, uids, |w, uid| w.id(*uid));
    }

    /// `"msgs":[...]`, each a `msg` entry.
    fn msgs(&mut self, msgs: &[Msg<'_>]) {
        self.array("msgs", msgs, |w, msg| {
            w.raw("{");
            w.msg_fields(msg);
            w.raw("}");
        });
    }

    fn send_fields(&mut self, m: &Send<'_>) {
        match m.target {
            Target::Conv(conv) => self.display("conv", conv),
            Target::Shop(shop) => self.display("shop", shop),
            Target::User(uid) => self.display("user", uid),
        }
        self.str("cmid", &m.cmid);
        self.str("kind", &m.kind);
        self.str("body", &m.body);
    }

    /// A profile's fields, each only when set.
    fn profile(&mut self, name_key: &str, avatar_key: &str, p: &Profile) {
        if !p.name.is_empty() {
            self.str(name_key, &p.name);
        }
        if !p.avatar.is_empty() {
            self.str(avatar_key, &p.avatar);
        }
    }

    /// `profiles`, only when there are any: `[{"uid","nick"?,"avatar"?}]`.
    fn user_profiles(&mut self, profiles: &[UserProfile]) {
        if profiles.is_empty() {
            return;
        }
        self.array("profiles", profiles, |w, p| {
            w.raw("{\"uid\":");
            w.id(p.uid);
            w.profile("nick", "avatar", &p.profile);
            w.raw("}");
        });
    }

    fn subject(&mut self, subject: Subject) {
        match subject {
            Subject::User(uid) => self.display("user", uid),
            Subject::Conv(conv) => self.display("conv", conv),
            Subject::Shop(shop) => self.display("shop", shop),
        }
    }

    /// The fields of a `msg` entry, the first without a leading comma.
    fn msg_fields(&mut self, m: &Msg<'_>) {
        self.raw("\"conv\":");
        self.id(m.conv);
        self.num("seq", m.seq.0);
        self.display("from", m.from);
        self.num("ts", m.ts);
        self.str("kind", &m.kind);
        self.str("body", &m.body);
        self.str("cmid", &m.cmid);
    }

    /// A JSON string: quotes, backslashes and control characters escaped, everything else
    /// (all of Unicode) as UTF-8.
    fn string(&mut self, s: &str) {
        self.raw("\"");
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.out.put_slice(&bytes[start..i]);
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.out.put_slice(b"\\u00");
                self.out.put_u8(HEX[usize::from(b >> 4)]);
                self.out.put_u8(HEX[usize::from(b & 0xf)]);
            } else {
                self.out.put_slice(escape);
            }
            start = i + 1;
        }
        self.out.put_slice(&bytes[start..]);
        self.raw("\"");
    }
}

/// An id written as a JSON string: a decimal u64, with a uid's kind in front.
trait JsonId: Copy {
    fn kind(self) -> Option<&'static str> {
        None
    }
    fn number(self) -> u64;
}

impl JsonId for ConvId {
    fn number(self) -> u64 {
        self.0
    }
}

impl JsonId for ShopId {
    fn number(self) -> u64 {
        self.0
    }
}

impl JsonId for DeviceId {
    fn number(self) -> u64 {
        self.get()
    }
}

impl JsonId for NodeId {
    fn number(self) -> u64 {
        self.get()
    }
}

impl JsonId for Uid {
    fn kind(self) -> Option<&'static str> {
        Some(self.kind.as_str())
    }
    fn number(self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_as_takes_the_op_from_outside_and_refuses_another() {
        let frame = decode_as(Op::ConvInfo, r#"{"conv":"42"}"#).unwrap();
        assert_eq!(frame.message, Message::ConvInfo(ConvId(42)));
        let same = decode_as(Op::ConvInfo, r#"{"op":"conv_info","conv":"42"}"#).unwrap();
        assert_eq!(same.message, frame.message);
        let other = decode_as(Op::ConvInfo, r#"{"op":"kick","conv":"42"}"#).unwrap_err();
        assert!(other.to_string().contains("op"), "{other}");
        let now = decode_as(Op::Subscribe, "{}").unwrap();
        assert_eq!(now.message, Message::Subscribe("".into()));
        let missing = decode_as(Op::ConvInfo, "{}").unwrap_err();
        assert_eq!(missing.kind, DecodeErrorKind::MissingField("conv"));
        for not_an_object in ["[1]", r#"["conv_info","42"]"#, "42", ""] {
            assert!(matches!(
                decode_as(Op::ConvInfo, not_an_object).unwrap_err().kind,
                DecodeErrorKind::BadJson(_)
            ));
        }
    }

    #[test]
    fn a_login_that_does_not_decode_names_its_op() {
        let long = "t".repeat(crate::limits::TOKEN_LEN_MAX + 1);
        for text in [
            format!(r#"{{"op":"login","token":"{long}","device":"web"}}"#),
            r#"{"op":"login","req":2,"token":7,"device":"web"}"#.to_string(),
        ] {
            assert_eq!(decode(&text).unwrap_err().op, Some(Op::Login), "{text}");
        }
        assert_eq!(
            decode(r#"{"op":"send","cmid":7}"#).unwrap_err().op,
            Some(Op::Send)
        );
        assert_eq!(decode("[1]").unwrap_err().op, None);
    }
    use crate::ids::{DeviceType, UidKind};
    use proptest::prelude::*;

    fn kind(text: &str) -> DecodeErrorKind {
        decode(text).unwrap_err().kind
    }

    fn encoded(frame: &Frame<'_>) -> String {
        String::from_utf8(encode_to_bytes(frame).to_vec()).unwrap()
    }

    #[test]
    fn decodes_the_contracts_examples() {
        let login = decode(r#"{"op":"login","req":1,"token":"t.t.t","device":"ios"}"#).unwrap();
        assert_eq!(login.req, Some(1));
        assert_eq!(
            login.message,
            Message::Login(Login {
                token: "t.t.t".into(),
                device: DeviceType::Ios
            })
        );
        let send = decode(r#"{"op":"send","user":"agent:7","cmid":"x","kind":"text","body":"hi"}"#)
            .unwrap();
        assert!(matches!(
            send.message,
            Message::Send(Send {
                target: Target::User(Uid {
                    kind: UidKind::Agent,
                    id: 7
                }),
                ..
            })
        ));
        assert_eq!(
            decode(r#"{"op":"ping"}"#).unwrap(),
            Frame::new(Message::Ping)
        );
        let history = decode(r#"{"op":"history","conv":"9","before":0}"#).unwrap();
        assert_eq!(
            history.message,
            Message::History(History {
                conv: ConvId(9),
                range: HistoryRange::Newest,
                limit: HISTORY_LIMIT_DEFAULT
            })
        );
    }

    #[test]
    fn encodes_ids_as_strings_and_counts_as_numbers() {
        let frame = Frame::with_req(
            3,
            Message::SendOk(SendOk {
                conv: ConvId(u64::MAX),
                seq: Seq(12),
                ts: 1_767_225_600_000,
            }),
        );
        assert_eq!(
            encoded(&frame),
            r#"{"op":"send_ok","req":3,"conv":"18446744073709551615","seq":12,"ts":1767225600000}"#
        );
        let convs = Frame::new(Message::ConvsOk(vec![ConvSummary {
            conv: ConvId(5),
            conv_type: ConvType::Shop(ShopId(8)),
            members: vec![Uid::new(UidKind::Buyer, 1), Uid::new(UidKind::Agent, 2)],
            member_count: 2,
            last_seq: Seq(0),
            read_seq: Seq(0),
            unread: 0,
            last: None,
            profile: Profile {
                name: "Shop \"8\"".into(),
                avatar: String::new(),
            },
            profiles: vec![UserProfile {
                uid: Uid::new(UidKind::Agent, 2),
                profile: Profile {
                    name: "Ann".into(),
                    avatar: "https://a/2.png".into(),
                },
            }],
        }]));
        assert_eq!(
            encoded(&convs),
            r#"{"op":"convs_ok","convs":[{"conv":"5","type":"shop","shop":"8","members":["buyer:1","agent:2"],"member_count":2,"last_seq":0,"read_seq":0,"unread":0,"last":null,"name":"Shop \"8\"","profiles":[{"uid":"agent:2","nick":"Ann","avatar":"https://a/2.png"}]}]}"#
        );
    }

    #[test]
    fn escapes_strings() {
        let frame = Frame::new(Message::Kicked("a\"b\\c\nd\u{1}é".into()));
        let text = encoded(&frame);
        assert_eq!(text, r#"{"op":"kicked","reason":"a\"b\\c\nd\u0001é"}"#);
        assert_eq!(decode(&text).unwrap(), frame);
    }

    #[test]
    fn borrows_unescaped_strings() {
        let text = r#"{"op":"send","conv":"1","cmid":"c","kind":"text","body":"plain"}"#;
        let Message::Send(send) = decode(text).unwrap().message else {
            panic!("expected send");
        };
        assert!(matches!(send.body, Cow::Borrowed(_)));
    }

    #[test]
    fn rejects_bad_frames_with_typed_errors() {
        assert_eq!(
            kind(r#"{"op":"fly"}"#),
            DecodeErrorKind::UnknownOp("fly".into())
        );
        assert_eq!(kind(r#"{"req":1}"#), DecodeErrorKind::MissingField("op"));
        assert!(matches!(kind("[1,2]"), DecodeErrorKind::BadJson(_)));
        assert!(matches!(kind("{"), DecodeErrorKind::BadJson(_)));
        assert!(matches!(kind(""), DecodeErrorKind::BadJson(_)));
        assert_eq!(
            kind(r#"{"op":"send","cmid":"c","kind":"t","body":"b"}"#),
            DecodeErrorKind::MissingField("conv|shop|user")
        );
        assert!(matches!(
            kind(r#"{"op":"send","conv":"1","shop":"2","cmid":"c","kind":"t","body":"b"}"#),
            DecodeErrorKind::BadValue(_)
        ));
        assert_eq!(
            kind(r#"{"op":"send","conv":"1","kind":"t","body":"b"}"#),
            DecodeErrorKind::MissingField("cmid")
        );
        // Ids must be decimal strings; numbers must be numbers.
        assert!(matches!(
            kind(r#"{"op":"read","conv":1,"seq":2}"#),
            DecodeErrorKind::BadJson(_)
        ));
        assert!(matches!(
            kind(r#"{"op":"read","conv":"1","seq":"2"}"#),
            DecodeErrorKind::BadJson(_)
        ));
        assert_eq!(
            kind(r#"{"op":"read","conv":"x","seq":2}"#),
            DecodeErrorKind::BadValue("conv")
        );
        assert!(matches!(
            kind(r#"{"op":"read","conv":"1","seq":-1}"#),
            DecodeErrorKind::BadJson(_)
        ));
        assert!(matches!(
            kind(r#"{"op":"read","conv":"1","seq":1.5}"#),
            DecodeErrorKind::BadJson(_)
        ));
        assert_eq!(
            kind(r#"{"op":"login","token":"t","device":"fridge"}"#),
            DecodeErrorKind::BadValue("device")
        );
        assert!(matches!(
            kind(r#"{"op":"history","conv":"1","limit":0}"#),
            DecodeErrorKind::BadValue(_)
        ));
        assert!(matches!(
            kind(r#"{"op":"history","conv":"1","limit":201}"#),
            DecodeErrorKind::BadValue(_)
        ));
        assert!(matches!(
            kind(r#"{"op":"history","conv":"1","before":5,"after":2}"#),
            DecodeErrorKind::BadValue(_)
        ));
        assert!(matches!(
            kind(r#"{"op":"ping","op":"ping"}"#),
            DecodeErrorKind::BadJson(_)
        ));
        let long_cmid = format!(
            r#"{{"op":"send","conv":"1","cmid":"{}","kind":"t","body":"b"}}"#,
            "c".repeat(129)
        );
        assert!(matches!(kind(&long_cmid), DecodeErrorKind::BadValue(_)));
    }

    #[test]
    fn reports_the_req_of_a_bad_frame() {
        assert_eq!(
            decode(r#"{"op":"fly","req":42}"#).unwrap_err().req,
            Some(42)
        );
        assert_eq!(
            decode(r#"{"op":"read","req":43,"conv":7}"#)
                .unwrap_err()
                .req,
            Some(43)
        );
        assert_eq!(decode(r#"{"op":"read","req":44"#).unwrap_err().req, None);
    }

    #[test]
    fn ignores_unknown_fields() {
        let frame = decode(r#"{"op":"ping","req":2,"trace":{"id":[1,2]}}"#).unwrap();
        assert_eq!(frame, Frame::with_req(2, Message::Ping));
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            decode_bytes(b"{\"op\":\"ping\",\"x\":\"\xff\"}")
                .unwrap_err()
                .kind,
            DecodeErrorKind::InvalidUtf8("text")
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
            let _ = decode(&text);
        }

        #[test]
        fn decoder_never_panics_on_json_shaped_text(
            fields in proptest::collection::vec(
                ("(op|req|conv|shop|user|cmid|kind|body|seq|before|after|limit|token|device|members|added|removed|count|msgs|convs|code|message|reason|uid|from|ts|type|last)",
                 "(\"[a-z0-9:_]{0,12}\"|-?[0-9]{1,22}|null|true|\\[\\]|\\{\\}|1\\.5|\\[\"buyer:1\"\\])"),
                0..8)
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let _ = decode(&format!("{{{}}}", body.join(",")));
        }
    }
}
