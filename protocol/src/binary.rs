//! The binary codec: a 16-byte header, then a body laid out per op.
//!
//! Header (big-endian): `u32 length` of the whole frame, header included · `u8 version` (1) ·
//! `u8 op` · `u16 flags` · `u64 req`. Flag bit 0 ([`FLAG_REQ`]) says the frame carries a `req`;
//! the other bits are reserved and must be 0. Body fields are fixed-width big-endian integers,
//! strings with a `u16` (short strings) or `u32` (message bodies) byte length, and lists with a
//! count. `docs/protocol.md` gives every byte of every op.
//!
//! Decoding borrows: strings in the decoded [`Frame`] point into the input. Encoding appends to a
//! caller's `BytesMut`. Nothing here panics on any input.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::{ConvId, DeviceId, DeviceType, NodeId, Seq, ShopId, Uid, UidKind};
use crate::limits;
use crate::message::{
    AgentRow, AgentStats, AgentStatsOk, AuthOk, ConvInfo, ConvSummary, ConvType, Cursor,
    DecodeError, DecodeErrorKind, ErrorCode, ErrorReply, Frame, GroupCreate, GroupMembers, History,
    HistoryOk, HistoryRange, Kick, Login, LoginOk, Members, MembersDelta, Message, Msg, MsgPush,
    Notify, NotifyUsers, Online, Op, Profile, ProfileOf, Receipt, Send, SendAs, SendOk, StatsRow,
    StreamBatch, StreamChange, StreamEvent, Subject, Target, UserProfile,
};

/// The header's size in bytes.
pub const HEADER_LEN: usize = 16;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Flag bit 0: the frame carries a `req`.
pub const FLAG_REQ: u16 = 0x0001;

/// The fixed header of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The whole frame's length, header included.
    pub len: u32,
    /// The op's binary code (not yet checked against known ops).
    pub op: u8,
    /// The `req`, when [`FLAG_REQ`] is set.
    pub req: Option<u64>,
}

impl Header {
    /// Reads a header from the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header, DecodeError> {
        let Some(head) = bytes.get(..HEADER_LEN) else {
            return Err(DecodeError::new(None, DecodeErrorKind::Truncated));
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = u16::from_be_bytes([head[6], head[7]]);
        let mut req_bytes = [0; 8];
        req_bytes.copy_from_slice(&head[8..16]);
        let req = (flags & FLAG_REQ != 0).then(|| u64::from_be_bytes(req_bytes));
        let fail = |kind| Err(DecodeError::new(req, kind));
        if head[4] != VERSION {
            return fail(DecodeErrorKind::BadVersion(head[4]));
        }
        if flags & !FLAG_REQ != 0 {
            return fail(DecodeErrorKind::BadValue("reserved flag bits are set"));
        }
        // One frame, one encoding: without the flag the req field must be 0, so that what
        // decodes re-encodes to the same bytes (found by the stream decoder fuzz target).
        if req.is_none() && req_bytes != [0; 8] {
            return fail(DecodeErrorKind::BadValue("req set without its flag"));
        }
        if (len as usize) < HEADER_LEN {
            return fail(DecodeErrorKind::BadLength("frame shorter than its header"));
        }
        Ok(Header {
            len,
            op: head[5],
            req,
        })
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub &'static str);

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot encode: {}", self.0)
    }
}

impl std::error::Error for EncodeError {}

/// Appends `frame` to `out`. On error `out` is left as it was.
pub fn encode(frame: &Frame<'_>, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    out.put_u32(0); // Patched once the body's length is known.
    out.put_u8(VERSION);
    out.put_u8(frame.message.op() as u8);
    out.put_u16(if frame.req.is_some() { FLAG_REQ } else { 0 });
    out.put_u64(frame.req.unwrap_or(0));
    let result = encode_body(&frame.message, out).and_then(|()| {
        u32::try_from(out.len() - start).map_err(|_| EncodeError("frame exceeds 4 GiB"))
    });
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

/// Encodes `frame` into a new buffer.
pub fn encode_to_bytes(frame: &Frame<'_>) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::with_capacity(64);
    encode(frame, &mut out)?;
    Ok(out.freeze())
}

fn encode_body(message: &Message<'_>, out: &mut BytesMut) -> Result<(), EncodeError> {
    match message {
        Message::Login(m) => {
            out.put_u8(m.device as u8);
            put_str16(out, &m.token, "token")?;
        }
        Message::LoginOk(m) => {
            put_uid(out, m.uid);
            out.put_u64(m.device_id.get());
            out.put_u64(m.node_id.get());
            out.put_u64(m.ts);
        }
        Message::Send(m) => put_send(out, m)?,
        Message::Read(c) | Message::ReadOk(c) => {
            out.put_u64(c.conv.0);
            out.put_u64(c.seq.0);
        }
        Message::Resolve(conv) | Message::ResolveOk(conv) => out.put_u64(conv.0),
        Message::Convs | Message::Ping | Message::Pong => {}
        Message::ConvsOk(convs) => {
            let count = u32::try_from(convs.len()).map_err(|_| EncodeError("too many convs"))?;
            out.put_u32(count);
            for c in convs {
                out.put_u64(c.conv.0);
                match c.conv_type {
                    ConvType::Shop(shop) => {
                        out.put_u8(CONV_SHOP);
                        out.put_u64(shop.0);
                    }
                    ConvType::Direct => out.put_u8(CONV_DIRECT),
                    ConvType::Group => out.put_u8(CONV_GROUP),
                }
                out.put_u32(c.member_count);
                put_uids(out, &c.members)?;
                out.put_u64(c.last_seq.0);
                out.put_u64(c.read_seq.0);
                out.put_u64(c.unread);
                match &c.last {
                    None => out.put_u8(0),
                    Some(msg) => {
                        out.put_u8(1);
                        put_msg(out, msg)?;
                    }
                }
                put_profile(out, &c.profile)?;
                put_user_profiles(out, &c.profiles)?;
            }
        }
        Message::Msg(m) => {
            put_msg(out, &m.msg)?;
            put_profile(out, &m.from_profile)?;
            put_profile(out, &m.conv_profile)?;
        }
        Message::SetProfile(m) | Message::GetProfileOk(m) | Message::ConvProfile(m) => {
            put_subject(out, m.subject);
            put_profile(out, &m.profile)?;
        }
        Message::GetProfile(subject) => put_subject(out, *subject),
        Message::SetProfileOk => {}
        Message::Receipt(m) => {
            out.put_u64(m.conv.0);
            put_uid(out, m.uid);
            out.put_u64(m.seq.0);
        }
        Message::Members(m) => {
            out.put_u64(m.conv.0);
            put_uids(out, &m.members)?;
            put_user_profiles(out, &m.profiles)?;
        }
        Message::MembersDelta(m) => {
            out.put_u64(m.conv.0);
            put_uids(out, &m.added)?;
            put_uids(out, &m.removed)?;
            out.put_u32(m.count);
        }
        Message::Kicked(reason) => put_str16(out, reason, "reason")?,
        Message::Error(m) => {
            out.put_u8(m.code as u8);
            put_str16(out, &m.message, "message")?;
        }
        Message::GroupCreate(m) => {
            out.put_u64(m.key);
            put_uids32(out, &m.users)?;
        }
        Message::GroupAdd(m) | Message::GroupRemove(m) => {
            out.put_u64(m.conv.0);
            put_uids32(out, &m.users)?;
        }
        Message::ConvInfo(conv) => out.put_u64(conv.0),
        Message::GroupCreateOk(info)
        | Message::GroupAddOk(info)
        | Message::GroupRemoveOk(info)
        | Message::ConvInfoOk(info) => put_conv_info(out, info)?,
        Message::Notify(m) => {
            put_str16(out, &m.kind, "kind")?;
            put_str32(out, &m.body)?;
            out.put_u64(m.ts);
        }
        Message::Auth(token) => put_str16(out, token, "token")?,
        Message::Subscribe(from) => put_str16(out, from, "from")?,
        Message::AgentStats(m) => {
            out.put_u64(m.shop.0);
            out.put_u64(m.from_ms);
            out.put_u64(m.to_ms);
        }
        Message::AgentStatsOk(m) => {
            out.put_u64(m.shop.0);
            out.put_u64(m.from_ms);
            out.put_u64(m.to_ms);
            put_stats_row(out, &m.total);
            put_count16(out, m.agents.len(), "agents")?;
            for row in &m.agents {
                put_uid(out, row.agent);
                put_stats_row(out, &row.stats);
            }
        }
        Message::StreamBatch(m) => {
            put_str16(out, &m.position, "position")?;
            put_count16(out, m.msgs.len(), "msgs")?;
            for msg in &m.msgs {
                put_msg(out, msg)?;
            }
            // Only when there are any: a batch of messages alone is what it always was.
            if !m.events.is_empty() {
                put_count16(out, m.events.len(), "events")?;
                for event in &m.events {
                    put_stream_event(out, event);
                }
            }
        }
        Message::AuthOk(m) => {
            put_uid(out, m.uid);
            out.put_u64(m.ts);
        }
        Message::SendAs(m) => {
            put_uid(out, m.from);
            put_send(out, &m.send)?;
        }
        Message::SendOk(m) | Message::SendAsOk(m) => {
            out.put_u64(m.conv.0);
            out.put_u64(m.seq.0);
            out.put_u64(m.ts);
        }
        Message::NotifyUsers(m) => {
            put_uids32(out, &m.users)?;
            put_str16(out, &m.kind, "kind")?;
            put_str32(out, &m.body)?;
        }
        Message::NotifyUsersOk(n) | Message::KickOk(n) => out.put_u32(*n),
        Message::Kick(m) => {
            put_uid(out, m.uid);
            out.put_u64(m.device.map_or(0, DeviceId::get));
        }
        Message::Presence(users) => put_uids32(out, users)?,
        Message::PresenceOk(online) => {
            let count = u32::try_from(online.len()).map_err(|_| EncodeError("too many users"))?;
            out.put_u32(count);
            for entry in online {
                put_uid(out, entry.uid);
                put_count16(out, entry.devices.len(), "devices")?;
                for device in &entry.devices {
                    out.put_u64(device.get());
                }
            }
        }
        Message::History(m) | Message::ConvHistory(m) => {
            out.put_u64(m.conv.0);
            let (range, seq) = match m.range {
                HistoryRange::Newest => (RANGE_NEWEST, Seq(0)),
                HistoryRange::Before(seq) => (RANGE_BEFORE, seq),
                HistoryRange::After(seq) => (RANGE_AFTER, seq),
            };
            out.put_u8(range);
            out.put_u64(seq.0);
            out.put_u16(m.limit);
        }
        Message::HistoryOk(m) | Message::ConvHistoryOk(m) => {
            out.put_u64(m.conv.0);
            put_count16(out, m.msgs.len(), "msgs")?;
            for msg in &m.msgs {
                put_msg(out, msg)?;
            }
        }
    }
    Ok(())
}

fn put_send(out: &mut BytesMut, m: &Send<'_>) -> Result<(), EncodeError> {
    match m.target {
        Target::Conv(conv) => {
            out.put_u8(TARGET_CONV);
            out.put_u64(conv.0);
        }
        Target::Shop(shop) => {
            out.put_u8(TARGET_SHOP);
            out.put_u64(shop.0);
        }
        Target::User(uid) => {
            out.put_u8(TARGET_USER);
            put_uid(out, uid);
        }
    }
    put_str16(out, &m.cmid, "cmid")?;
    put_str16(out, &m.kind, "kind")?;
    put_str32(out, &m.body)
}

/// `u64 conv` · `u8 type` · `u64 shop` (shop only) · `u8 has_key` · `u64 key` (when 1) ·
/// `u32 member_count` · `u16 n` · `uid` × n · `u64 last_seq` · `u8 created`.
/// `u8 event` (1 joined, 2 left, 3 read) · `u16 after_msgs` · `u64 conv` · `uid uid` · `u64`
/// (joined, left: ts; read: seq).
fn put_stream_event(out: &mut BytesMut, event: &StreamEvent) {
    let (code, value) = match event.change {
        StreamChange::Joined { ts } => (EVENT_JOINED, ts),
        StreamChange::Left { ts } => (EVENT_LEFT, ts),
        StreamChange::Read { seq } => (EVENT_READ, seq.0),
    };
    out.put_u8(code);
    out.put_u16(event.after_msgs);
    out.put_u64(event.conv.0);
    put_uid(out, event.uid);
    out.put_u64(value);
}

fn put_stats_row(out: &mut BytesMut, row: &StatsRow) {
    for n in [
        row.assigned,
        row.open,
        row.resolved,
        row.messages,
        row.replies,
    ] {
        out.put_u32(n);
    }
    out.put_u64(row.reply_ms_p50);
    out.put_u64(row.reply_ms_p90);
}

fn put_conv_info(out: &mut BytesMut, info: &ConvInfo) -> Result<(), EncodeError> {
    out.put_u64(info.conv.0);
    put_conv_type(out, info.conv_type);
    match info.key {
        None => out.put_u8(0),
        Some(key) => {
            out.put_u8(1);
            out.put_u64(key);
        }
    }
    out.put_u32(info.member_count);
    put_uids(out, &info.members)?;
    out.put_u64(info.last_seq.0);
    out.put_u8(u8::from(info.created));
    Ok(())
}

fn put_conv_type(out: &mut BytesMut, conv_type: ConvType) {
    match conv_type {
        ConvType::Shop(shop) => {
            out.put_u8(CONV_SHOP);
            out.put_u64(shop.0);
        }
        ConvType::Direct => out.put_u8(CONV_DIRECT),
        ConvType::Group => out.put_u8(CONV_GROUP),
    }
}

fn put_uids32(out: &mut BytesMut, uids: &[Uid]) -> Result<(), EncodeError> {
    let count = u32::try_from(uids.len()).map_err(|_| EncodeError("too many users"))?;
    out.put_u32(count);
    for uid in uids {
        put_uid(out, *uid);
    }
    Ok(())
}

const TARGET_CONV: u8 = 1;
const TARGET_SHOP: u8 = 2;
const TARGET_USER: u8 = 3;
const RANGE_NEWEST: u8 = 0;
const RANGE_BEFORE: u8 = 1;
const RANGE_AFTER: u8 = 2;
const CONV_SHOP: u8 = 0;
const CONV_DIRECT: u8 = 1;
const CONV_GROUP: u8 = 2;
/// A uid on the wire: `u8 kind` · `u64 id`.
const UID_LEN: usize = 9;
/// Bytes of a [`StreamEvent`].
const STREAM_EVENT_LEN: usize = 1 + 2 + 8 + UID_LEN + 8;
const EVENT_JOINED: u8 = 1;
const EVENT_LEFT: u8 = 2;
const EVENT_READ: u8 = 3;
/// Bytes of a [`StatsRow`]: five `u32` counts and two `u64` times.
const STATS_ROW_LEN: usize = 5 * 4 + 2 * 8;

fn put_uid(out: &mut BytesMut, uid: Uid) {
    out.put_u8(uid.kind as u8);
    out.put_u64(uid.id);
}

fn put_uids(out: &mut BytesMut, uids: &[Uid]) -> Result<(), EncodeError> {
    put_count16(out, uids.len(), "members")?;
    for uid in uids {
        put_uid(out, *uid);
    }
    Ok(())
}

fn put_count16(out: &mut BytesMut, n: usize, what: &'static str) -> Result<(), EncodeError> {
    out.put_u16(u16::try_from(n).map_err(|_| EncodeError(what))?);
    Ok(())
}

fn put_str16(out: &mut BytesMut, s: &str, what: &'static str) -> Result<(), EncodeError> {
    out.put_u16(u16::try_from(s.len()).map_err(|_| EncodeError(what))?);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_str32(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    out.put_u32(u32::try_from(s.len()).map_err(|_| EncodeError("body"))?);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// `str16 name` · `str16 avatar`.
fn put_profile(out: &mut BytesMut, p: &Profile) -> Result<(), EncodeError> {
    put_str16(out, &p.name, "name")?;
    put_str16(out, &p.avatar, "avatar")
}

/// `u16 k` · (`uid` · profile) × k.
fn put_user_profiles(out: &mut BytesMut, profiles: &[UserProfile]) -> Result<(), EncodeError> {
    put_count16(out, profiles.len(), "profiles")?;
    for p in profiles {
        put_uid(out, p.uid);
        put_profile(out, &p.profile)?;
    }
    Ok(())
}

/// `u8 subject` (0 user, 1 conv, 2 shop) · `uid` / `u64 conv` / `u64 shop`.
fn put_subject(out: &mut BytesMut, subject: Subject) {
    match subject {
        Subject::User(uid) => {
            out.put_u8(SUBJECT_USER);
            put_uid(out, uid);
        }
        Subject::Conv(conv) => {
            out.put_u8(SUBJECT_CONV);
            out.put_u64(conv.0);
        }
        Subject::Shop(shop) => {
            out.put_u8(SUBJECT_SHOP);
            out.put_u64(shop.0);
        }
    }
}

const SUBJECT_USER: u8 = 0;
const SUBJECT_CONV: u8 = 1;
const SUBJECT_SHOP: u8 = 2;

fn put_msg(out: &mut BytesMut, m: &Msg<'_>) -> Result<(), EncodeError> {
    out.put_u64(m.conv.0);
    out.put_u64(m.seq.0);
    put_uid(out, m.from);
    out.put_u64(m.ts);
    put_str16(out, &m.kind, "kind")?;
    put_str32(out, &m.body)?;
    put_str16(out, &m.cmid, "cmid")
}

/// Decodes exactly one whole frame: `bytes` must be as long as its header says.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let header = Header::parse(bytes)?;
    if header.len as usize != bytes.len() {
        return Err(DecodeError::new(
            header.req,
            DecodeErrorKind::BadLength("frame length differs from the bytes given"),
        ));
    }
    decode_body(header, &bytes[HEADER_LEN..])
}

/// Splits a buffer holding frames back to back (one binary WebSocket message) into frames.
///
/// Yields an error and stops at the first frame whose header is bad or whose length runs past
/// the buffer; a frame whose body is bad yields its error and the next frame follows, since its
/// length is still known.
pub fn frames(bytes: &[u8]) -> Frames<'_> {
    Frames { rest: bytes }
}

/// The iterator of [`frames`].
#[derive(Debug)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = match Header::parse(self.rest) {
            Ok(header) => header,
            Err(e) => {
                self.rest = &[];
                return Some(Err(e));
            }
        };
        let Some(frame) = self.rest.get(..header.len as usize) else {
            self.rest = &[];
            return Some(Err(DecodeError::new(
                header.req,
                DecodeErrorKind::Truncated,
            )));
        };
        self.rest = &self.rest[frame.len()..];
        Some(decode_body(header, &frame[HEADER_LEN..]))
    }
}

fn decode_body(header: Header, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let req = header.req;
    let fail = |kind| DecodeError::new(req, kind);
    let op = Op::from_code(header.op)
        .ok_or_else(|| fail(DecodeErrorKind::UnknownOp(format!("0x{:02x}", header.op))))?;
    let fail = |kind| fail(kind).with_op(Some(op));
    let mut r = Reader { bytes: body };
    let message = read_message(op, &mut r).map_err(fail)?;
    if !r.bytes.is_empty() {
        return Err(fail(DecodeErrorKind::BadLength("bytes follow the body")));
    }
    Ok(Frame { req, message })
}

fn read_message<'a>(op: Op, r: &mut Reader<'a>) -> Result<Message<'a>, DecodeErrorKind> {
    Ok(match op {
        Op::Login => {
            let device = DeviceType::from_bits(r.u8()?)
                .ok_or(DecodeErrorKind::BadValue("unknown device type"))?;
            let token = r.str16("token")?;
            limits::check_token(&token)?;
            Message::Login(Login { token, device })
        }
        Op::LoginOk => Message::LoginOk(LoginOk {
            uid: r.uid()?,
            device_id: DeviceId::from_u64(r.u64()?).map_err(|e| DecodeErrorKind::BadValue(e.0))?,
            node_id: NodeId::from_u64(r.u64()?).map_err(|e| DecodeErrorKind::BadValue(e.0))?,
            ts: r.u64()?,
        }),
        Op::Send => Message::Send(r.send()?),
        Op::SendAs => Message::SendAs(SendAs {
            from: r.uid()?,
            send: r.send()?,
        }),
        Op::SendOk => Message::SendOk(r.send_ok()?),
        Op::SendAsOk => Message::SendAsOk(r.send_ok()?),
        Op::Read => Message::Read(r.cursor()?),
        Op::ReadOk => Message::ReadOk(r.cursor()?),
        Op::Resolve => Message::Resolve(ConvId(r.u64()?)),
        Op::ResolveOk => Message::ResolveOk(ConvId(r.u64()?)),
        Op::History => Message::History(r.history()?),
        Op::ConvHistory => Message::ConvHistory(r.history()?),
        Op::HistoryOk => Message::HistoryOk(r.history_ok()?),
        Op::ConvHistoryOk => Message::ConvHistoryOk(r.history_ok()?),
        Op::GroupCreate => Message::GroupCreate(GroupCreate {
            key: r.u64()?,
            users: r.uids32()?,
        }),
        Op::GroupAdd | Op::GroupRemove => {
            let members = GroupMembers {
                conv: ConvId(r.u64()?),
                users: r.uids32()?,
            };
            if op == Op::GroupAdd {
                Message::GroupAdd(members)
            } else {
                Message::GroupRemove(members)
            }
        }
        Op::ConvInfo => Message::ConvInfo(ConvId(r.u64()?)),
        Op::GroupCreateOk => Message::GroupCreateOk(r.conv_info()?),
        Op::GroupAddOk => Message::GroupAddOk(r.conv_info()?),
        Op::GroupRemoveOk => Message::GroupRemoveOk(r.conv_info()?),
        Op::ConvInfoOk => Message::ConvInfoOk(r.conv_info()?),
        Op::Convs => Message::Convs,
        Op::ConvsOk => {
            let count = r.u32()?;
            let mut convs = r.list_with_capacity(count as usize, CONV_LEN_MIN);
            for _ in 0..count {
                let conv = ConvId(r.u64()?);
                let conv_type = match r.u8()? {
                    CONV_SHOP => ConvType::Shop(ShopId(r.u64()?)),
                    CONV_DIRECT => ConvType::Direct,
                    CONV_GROUP => ConvType::Group,
                    _ => return Err(DecodeErrorKind::BadValue("unknown conversation type")),
                };
                let member_count = r.u32()?;
                let members = r.uids()?;
                let last_seq = Seq(r.u64()?);
                let read_seq = Seq(r.u64()?);
                let unread = r.u64()?;
                let last = match r.u8()? {
                    0 => None,
                    1 => Some(r.msg()?),
                    _ => return Err(DecodeErrorKind::BadValue("last presence byte")),
                };
                convs.push(ConvSummary {
                    conv,
                    conv_type,
                    members,
                    member_count,
                    last_seq,
                    read_seq,
                    unread,
                    last,
                    profile: r.profile()?,
                    profiles: r.user_profiles()?,
                });
            }
            Message::ConvsOk(convs)
        }
        Op::Ping => Message::Ping,
        Op::Pong => Message::Pong,
        Op::Msg => Message::Msg(MsgPush {
            msg: r.msg()?,
            from_profile: r.profile()?,
            conv_profile: r.profile()?,
        }),
        Op::SetProfile => Message::SetProfile(r.profile_of()?),
        Op::GetProfileOk => Message::GetProfileOk(r.profile_of()?),
        Op::ConvProfile => Message::ConvProfile(r.profile_of()?),
        Op::GetProfile => Message::GetProfile(r.subject()?),
        Op::SetProfileOk => Message::SetProfileOk,
        Op::Receipt => Message::Receipt(Receipt {
            conv: ConvId(r.u64()?),
            uid: r.uid()?,
            seq: Seq(r.u64()?),
        }),
        Op::Members => Message::Members(Members {
            conv: ConvId(r.u64()?),
            members: r.uids()?,
            profiles: r.user_profiles()?,
        }),
        Op::MembersDelta => Message::MembersDelta(MembersDelta {
            conv: ConvId(r.u64()?),
            added: r.uids()?,
            removed: r.uids()?,
            count: r.u32()?,
        }),
        Op::Kicked => Message::Kicked(r.str16("reason")?),
        Op::Error => Message::Error(ErrorReply {
            code: ErrorCode::from_code(r.u8()?)
                .ok_or(DecodeErrorKind::BadValue("unknown error code"))?,
            message: r.str16("message")?,
        }),
        Op::Notify => {
            let kind = r.str16("kind")?;
            limits::check_kind(&kind)?;
            Message::Notify(Notify {
                kind,
                body: r.str32("body")?,
                ts: r.u64()?,
            })
        }
        Op::Auth => {
            let token = r.str16("token")?;
            limits::check_token(&token)?;
            Message::Auth(token)
        }
        Op::Subscribe => Message::Subscribe(r.str16("from")?),
        Op::AgentStats => Message::AgentStats(AgentStats {
            shop: ShopId(r.u64()?),
            from_ms: r.u64()?,
            to_ms: r.u64()?,
        }),
        Op::AgentStatsOk => {
            let shop = ShopId(r.u64()?);
            let from_ms = r.u64()?;
            let to_ms = r.u64()?;
            let total = r.stats_row()?;
            let count = r.u16()?;
            let mut agents = r.list_with_capacity(usize::from(count), UID_LEN + STATS_ROW_LEN);
            for _ in 0..count {
                agents.push(AgentRow {
                    agent: r.uid()?,
                    stats: r.stats_row()?,
                });
            }
            Message::AgentStatsOk(AgentStatsOk {
                shop,
                from_ms,
                to_ms,
                total,
                agents,
            })
        }
        Op::StreamBatch => {
            let position = r.str16("position")?;
            let count = r.u16()?;
            let mut msgs = r.list_with_capacity(usize::from(count), MSG_LEN_MIN);
            for _ in 0..count {
                msgs.push(r.msg()?);
            }
            let mut events = Vec::new();
            if !r.bytes.is_empty() {
                let count = r.u16()?;
                if count == 0 {
                    return Err(DecodeErrorKind::BadValue(
                        "an empty events list is left out",
                    ));
                }
                events = r.list_with_capacity(usize::from(count), STREAM_EVENT_LEN);
                for _ in 0..count {
                    events.push(r.stream_event()?);
                }
            }
            Message::StreamBatch(StreamBatch {
                position,
                msgs,
                events,
            })
        }
        Op::AuthOk => Message::AuthOk(AuthOk {
            uid: r.uid()?,
            ts: r.u64()?,
        }),
        Op::NotifyUsers => {
            let users = r.uids32()?;
            let kind = r.str16("kind")?;
            limits::check_kind(&kind)?;
            Message::NotifyUsers(NotifyUsers {
                users,
                kind,
                body: r.str32("body")?,
            })
        }
        Op::NotifyUsersOk => Message::NotifyUsersOk(r.u32()?),
        Op::Kick => Message::Kick(Kick {
            uid: r.uid()?,
            device: match r.u64()? {
                0 => None,
                id => Some(DeviceId::from_u64(id).map_err(|e| DecodeErrorKind::BadValue(e.0))?),
            },
        }),
        Op::KickOk => Message::KickOk(r.u32()?),
        Op::Presence => Message::Presence(r.uids32()?),
        Op::PresenceOk => {
            let count = r.u32()?;
            let mut online = r.list_with_capacity(count as usize, UID_LEN + 2);
            for _ in 0..count {
                let uid = r.uid()?;
                let n = r.u16()?;
                let mut devices = r.list_with_capacity(usize::from(n), 8);
                for _ in 0..n {
                    devices.push(
                        DeviceId::from_u64(r.u64()?).map_err(|e| DecodeErrorKind::BadValue(e.0))?,
                    );
                }
                online.push(Online { uid, devices });
            }
            Message::PresenceOk(online)
        }
    })
}

/// The fewest bytes a `msg` entry takes (conv, seq, uid, ts, three empty strings).
const MSG_LEN_MIN: usize = 8 + 8 + UID_LEN + 8 + 2 + 4 + 2;
/// The fewest bytes a `convs_ok` entry takes.
const CONV_LEN_MIN: usize = 8 + 1 + 4 + 2 + 8 + 8 + 8 + 1 + PROFILE_LEN_MIN + 2;
/// The fewest bytes a profile takes (two empty strings).
const PROFILE_LEN_MIN: usize = 2 + 2;

/// A cursor over a body. Every read checks the bytes left, so no input can make it panic.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeErrorKind> {
        if self.bytes.len() < n {
            return Err(DecodeErrorKind::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeErrorKind> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeErrorKind> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeErrorKind> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeErrorKind> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeErrorKind> {
        self.array().map(u64::from_be_bytes)
    }

    fn str_of(&mut self, len: usize, field: &'static str) -> Result<Cow<'a, str>, DecodeErrorKind> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| DecodeErrorKind::InvalidUtf8(field))
    }

    fn str16(&mut self, field: &'static str) -> Result<Cow<'a, str>, DecodeErrorKind> {
        let len = self.u16()?;
        self.str_of(usize::from(len), field)
    }

    fn str32(&mut self, field: &'static str) -> Result<Cow<'a, str>, DecodeErrorKind> {
        let len = self.u32()?;
        self.str_of(len as usize, field)
    }

    fn uid(&mut self) -> Result<Uid, DecodeErrorKind> {
        let kind = UidKind::from_code(self.u8()?).ok_or(DecodeErrorKind::BadValue("uid kind"))?;
        Ok(Uid::new(kind, self.u64()?))
    }

    fn uids(&mut self) -> Result<Vec<Uid>, DecodeErrorKind> {
        let count = self.u16()?;
        let mut uids = self.list_with_capacity(usize::from(count), UID_LEN);
        for _ in 0..count {
            uids.push(self.uid()?);
        }
        Ok(uids)
    }

    fn conv_type(&mut self) -> Result<ConvType, DecodeErrorKind> {
        Ok(match self.u8()? {
            CONV_SHOP => ConvType::Shop(ShopId(self.u64()?)),
            CONV_DIRECT => ConvType::Direct,
            CONV_GROUP => ConvType::Group,
            _ => return Err(DecodeErrorKind::BadValue("unknown conversation type")),
        })
    }

    fn stream_event(&mut self) -> Result<StreamEvent, DecodeErrorKind> {
        let code = self.u8()?;
        let after_msgs = self.u16()?;
        let conv = ConvId(self.u64()?);
        let uid = self.uid()?;
        let value = self.u64()?;
        let change = match code {
            EVENT_JOINED => StreamChange::Joined { ts: value },
            EVENT_LEFT => StreamChange::Left { ts: value },
            EVENT_READ => StreamChange::Read { seq: Seq(value) },
            _ => return Err(DecodeErrorKind::BadValue("unknown stream event")),
        };
        Ok(StreamEvent {
            after_msgs,
            conv,
            uid,
            change,
        })
    }

    fn stats_row(&mut self) -> Result<StatsRow, DecodeErrorKind> {
        Ok(StatsRow {
            assigned: self.u32()?,
            open: self.u32()?,
            resolved: self.u32()?,
            messages: self.u32()?,
            replies: self.u32()?,
            reply_ms_p50: self.u64()?,
            reply_ms_p90: self.u64()?,
        })
    }

    fn conv_info(&mut self) -> Result<ConvInfo, DecodeErrorKind> {
        let conv = ConvId(self.u64()?);
        let conv_type = self.conv_type()?;
        let key = match self.u8()? {
            0 => None,
            1 => Some(self.u64()?),
            _ => return Err(DecodeErrorKind::BadValue("key presence byte")),
        };
        let member_count = self.u32()?;
        let members = self.uids()?;
        let last_seq = Seq(self.u64()?);
        let created = match self.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeErrorKind::BadValue("created byte")),
        };
        Ok(ConvInfo {
            conv,
            conv_type,
            key,
            members,
            member_count,
            last_seq,
            created,
        })
    }

    /// A `u32` count of uids (1..=[`limits::USERS_PER_REQUEST_MAX`]), then the uids.
    fn uids32(&mut self) -> Result<Vec<Uid>, DecodeErrorKind> {
        let count = self.u32()? as usize;
        limits::check_users(count)?;
        let mut uids = self.list_with_capacity(count, UID_LEN);
        for _ in 0..count {
            uids.push(self.uid()?);
        }
        Ok(uids)
    }

    fn send(&mut self) -> Result<Send<'a>, DecodeErrorKind> {
        let target = match self.u8()? {
            TARGET_CONV => Target::Conv(ConvId(self.u64()?)),
            TARGET_SHOP => Target::Shop(ShopId(self.u64()?)),
            TARGET_USER => Target::User(self.uid()?),
            _ => return Err(DecodeErrorKind::BadValue("unknown send target")),
        };
        let cmid = self.str16("cmid")?;
        let kind = self.str16("kind")?;
        let body = self.str32("body")?;
        limits::check_cmid(&cmid)?;
        limits::check_kind(&kind)?;
        Ok(Send {
            target,
            cmid,
            kind,
            body,
        })
    }

    fn send_ok(&mut self) -> Result<SendOk, DecodeErrorKind> {
        Ok(SendOk {
            conv: ConvId(self.u64()?),
            seq: Seq(self.u64()?),
            ts: self.u64()?,
        })
    }

    fn history(&mut self) -> Result<History, DecodeErrorKind> {
        let conv = ConvId(self.u64()?);
        let range = self.u8()?;
        let seq = Seq(self.u64()?);
        let range = match range {
            RANGE_NEWEST if seq.0 == 0 => HistoryRange::Newest,
            RANGE_BEFORE if seq.0 != 0 => HistoryRange::Before(seq),
            RANGE_AFTER => HistoryRange::After(seq),
            _ => return Err(DecodeErrorKind::BadValue("history range")),
        };
        let limit = limits::check_history_limit(u64::from(self.u16()?))?;
        Ok(History { conv, range, limit })
    }

    fn history_ok(&mut self) -> Result<HistoryOk<'a>, DecodeErrorKind> {
        let conv = ConvId(self.u64()?);
        let count = self.u16()?;
        let mut msgs = self.list_with_capacity(usize::from(count), MSG_LEN_MIN);
        for _ in 0..count {
            msgs.push(self.msg()?);
        }
        Ok(HistoryOk { conv, msgs })
    }

    fn cursor(&mut self) -> Result<Cursor, DecodeErrorKind> {
        Ok(Cursor {
            conv: ConvId(self.u64()?),
            seq: Seq(self.u64()?),
        })
    }

    fn profile(&mut self) -> Result<Profile, DecodeErrorKind> {
        let profile = Profile {
            name: self.str16("name")?.into_owned(),
            avatar: self.str16("avatar")?.into_owned(),
        };
        limits::check_profile(&profile)?;
        Ok(profile)
    }

    fn user_profiles(&mut self) -> Result<Vec<UserProfile>, DecodeErrorKind> {
        let count = self.u16()?;
        let mut profiles = self.list_with_capacity(usize::from(count), UID_LEN + PROFILE_LEN_MIN);
        for _ in 0..count {
            profiles.push(UserProfile {
                uid: self.uid()?,
                profile: self.profile()?,
            });
        }
        Ok(profiles)
    }

    fn subject(&mut self) -> Result<Subject, DecodeErrorKind> {
        Ok(match self.u8()? {
            SUBJECT_USER => Subject::User(self.uid()?),
            SUBJECT_CONV => Subject::Conv(ConvId(self.u64()?)),
            SUBJECT_SHOP => Subject::Shop(ShopId(self.u64()?)),
            _ => return Err(DecodeErrorKind::BadValue("unknown profile subject")),
        })
    }

    fn profile_of(&mut self) -> Result<ProfileOf, DecodeErrorKind> {
        Ok(ProfileOf {
            subject: self.subject()?,
            profile: self.profile()?,
        })
    }

    fn msg(&mut self) -> Result<Msg<'a>, DecodeErrorKind> {
        Ok(Msg {
            conv: ConvId(self.u64()?),
            seq: Seq(self.u64()?),
            from: self.uid()?,
            ts: self.u64()?,
            kind: self.str16("kind")?,
            body: self.str32("body")?,
            cmid: self.str16("cmid")?,
        })
    }

    /// A vector for `count` entries of at least `entry_len_min` bytes each. The capacity is
    /// capped by the bytes left, so a forged count cannot make the decoder allocate more than
    /// its input could fill.
    fn list_with_capacity<T>(&self, count: usize, entry_len_min: usize) -> Vec<T> {
        Vec::with_capacity(count.min(self.bytes.len() / entry_len_min))
    }
}

/// Reassembles frames from a byte stream (the backend TCP port, node links) that arrives in
/// chunks of any size.
///
/// A frame's length is checked against `frame_len_max` as soon as its four length bytes are in,
/// before any of its body is buffered. After an error the stream's framing is lost: the decoder
/// stays failed and the connection should be closed.
#[derive(Debug)]
pub struct StreamDecoder {
    /// Whole frames not yet taken, then the start of an incomplete one.
    buf: BytesMut,
    /// Where the incomplete frame starts in `buf`; everything before it is whole frames.
    partial_at: usize,
    frame_len_max: usize,
    failed: bool,
}

impl StreamDecoder {
    /// A decoder refusing frames longer than `frame_len_max` bytes (header included).
    pub fn new(frame_len_max: usize) -> StreamDecoder {
        StreamDecoder {
            buf: BytesMut::new(),
            partial_at: 0,
            frame_len_max,
            failed: false,
        }
    }

    /// Adds bytes read from the stream.
    ///
    /// Fails as soon as a frame's length field is complete and out of bounds; none of that
    /// frame's body is buffered, and the decoder stays failed.
    pub fn extend(&mut self, mut chunk: &[u8]) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::new(
                None,
                DecodeErrorKind::BadValue("stream already failed"),
            ));
        }
        while !chunk.is_empty() {
            // Copy up to the next point where something must be checked: the end of the
            // partial frame's length field, or the end of the partial frame.
            let have = self.buf.len() - self.partial_at;
            let want = match self.partial_len() {
                None => 4 - have,
                Some(len) => len - have,
            };
            let n = want.min(chunk.len());
            self.buf.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if let Some(len) = self.partial_len() {
                self.check_len(len)?;
                if self.buf.len() - self.partial_at == len {
                    self.partial_at = self.buf.len();
                }
            }
        }
        Ok(())
    }

    /// The next whole frame's bytes, if one is buffered. Decode it with [`decode`].
    pub fn next_frame(&mut self) -> Option<Bytes> {
        if self.partial_at == 0 {
            return None;
        }
        // Everything before `partial_at` is whole frames whose lengths were checked.
        let len = read_len(&self.buf);
        self.partial_at -= len;
        Some(self.buf.split_to(len).freeze())
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// The length of the incomplete frame, once its length field is in.
    fn partial_len(&self) -> Option<usize> {
        let partial = &self.buf[self.partial_at..];
        (partial.len() >= 4).then(|| read_len(partial))
    }

    fn check_len(&mut self, len: usize) -> Result<(), DecodeError> {
        let kind = if len < HEADER_LEN {
            DecodeErrorKind::BadLength("frame shorter than its header")
        } else if len > self.frame_len_max {
            DecodeErrorKind::TooLarge {
                len: len as u64,
                max: self.frame_len_max,
            }
        } else {
            return Ok(());
        };
        self.failed = true;
        self.buf.clear();
        self.partial_at = 0;
        Err(DecodeError::new(None, kind))
    }
}

/// The length field at the start of `bytes` (which holds at least four).
fn read_len(bytes: &[u8]) -> usize {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::strategies;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn encoded(frame: &Frame<'_>) -> Vec<u8> {
        encode_to_bytes(frame).unwrap().to_vec()
    }

    // Golden vectors: if one of these changes, the wire format changed and every peer breaks.
    #[test]
    fn golden_ping() {
        let frame = Frame::with_req(1, Message::Ping);
        assert_eq!(
            hex(&encoded(&frame)),
            "00000010".to_owned() + "01" + "07" + "0001" + "0000000000000001"
        );
    }

    #[test]
    fn golden_send() {
        let frame = Frame::with_req(
            7,
            Message::Send(Send {
                target: Target::Conv(ConvId(42)),
                cmid: "c-1".into(),
                kind: "text".into(),
                body: "hello".into(),
            }),
        );
        let expected = [
            "0000002d01020001",
            "0000000000000007",
            "01",
            "000000000000002a",
            "0003632d31",
            "000474657874",
            "0000000568656c6c6f",
        ]
        .concat();
        assert_eq!(hex(&encoded(&frame)), expected);
    }

    #[test]
    fn golden_msg_push() {
        let frame = Frame::new(Message::Msg(MsgPush {
            msg: Msg {
                conv: ConvId(42),
                seq: Seq(3),
                from: Uid::new(UidKind::Buyer, 1001),
                ts: 1_767_225_600_000,
                kind: "text".into(),
                body: "hi".into(),
                cmid: "c-1".into(),
            },
            from_profile: Profile {
                name: "Al".into(),
                avatar: String::new(),
            },
            conv_profile: Profile::default(),
        }));
        let expected = [
            "0000004c01c10000",
            "0000000000000000",
            "000000000000002a",
            "0000000000000003",
            "00",
            "00000000000003e9",
            "0000019b76daa800",
            "000474657874",
            "000000026869",
            "0003632d31",
            "0002416c0000", // from: nick "Al", no avatar
            "00000000",     // conv: no profile
        ]
        .concat();
        assert_eq!(hex(&encoded(&frame)), expected);
    }

    #[test]
    fn golden_members_delta_and_group_create() {
        let frame = Frame::new(Message::MembersDelta(MembersDelta {
            conv: ConvId(42),
            added: vec![Uid::new(UidKind::Agent, 7)],
            removed: vec![],
            count: 201,
        }));
        let expected = [
            "0000002901c70000",
            "0000000000000000",
            "000000000000002a",
            "0001020000000000000007",
            "0000",
            "000000c9",
        ];
        assert_eq!(hex(&encoded(&frame)), expected.concat());
        let frame = Frame::with_req(
            3,
            Message::GroupCreate(GroupCreate {
                key: 77,
                users: vec![Uid::new(UidKind::Buyer, 1001)],
            }),
        );
        let expected = [
            "0000002501300001",
            "0000000000000003",
            "000000000000004d",
            "00000001",
            "0000000000000003e9",
        ];
        assert_eq!(hex(&encoded(&frame)), expected.concat());
    }

    #[test]
    fn golden_notify_push() {
        let frame = Frame::new(Message::Notify(crate::Notify {
            kind: "text".into(),
            body: "hi".into(),
            ts: 1_767_225_600_000,
        }));
        assert_eq!(
            hex(&encoded(&frame)),
            "0000002401c600000000000000000000".to_owned()
                + "000474657874"
                + "000000026869"
                + "0000019b76daa800"
        );
    }

    #[test]
    fn golden_auth_and_send_as() {
        let auth = Frame::with_req(1, Message::Auth("t".into()));
        assert_eq!(
            hex(&encoded(&auth)),
            "0000001301100001000000000000000100".to_owned() + "0174"
        );
        let send_as = Frame::with_req(
            2,
            Message::SendAs(crate::SendAs {
                from: crate::Uid::new(crate::UidKind::Buyer, 1001),
                send: Send {
                    target: Target::Conv(ConvId(42)),
                    cmid: "c-1".into(),
                    kind: "text".into(),
                    body: "hello".into(),
                },
            }),
        );
        assert_eq!(
            hex(&encoded(&send_as)),
            "0000003601110001000000000000000200".to_owned()
                + "00000000000003e9"
                + "01000000000000002a"
                + "0003632d31"
                + "000474657874"
                + "0000000568656c6c6f"
        );
    }

    #[test]
    fn golden_error() {
        let frame = Frame::with_req(
            9,
            Message::Error(ErrorReply {
                code: ErrorCode::NotMember,
                message: "no".into(),
            }),
        );
        assert_eq!(
            hex(&encoded(&frame)),
            "0000001501c500010000000000000009040002".to_owned() + "6e6f"
        );
    }

    #[test]
    fn decoding_borrows_strings_from_the_input() {
        let frame = Frame::new(Message::Kicked("elsewhere".into()));
        let wire = encoded(&frame);
        let decoded = decode(&wire).unwrap();
        let Message::Kicked(Cow::Borrowed(reason)) = decoded.message else {
            panic!("expected a borrowed reason, got {decoded:?}");
        };
        assert!(wire.as_ptr_range().contains(&reason.as_ptr()));
    }

    #[test]
    fn rejects_bad_headers_with_typed_errors() {
        let ping = encoded(&Frame::with_req(5, Message::Ping));
        let kind = |bytes: &[u8]| decode(bytes).unwrap_err().kind;

        assert_eq!(kind(&ping[..10]), DecodeErrorKind::Truncated);
        let mut v2 = ping.clone();
        v2[4] = 2;
        assert_eq!(kind(&v2), DecodeErrorKind::BadVersion(2));
        let mut unknown = ping.clone();
        unknown[5] = 0x7f;
        assert_eq!(kind(&unknown), DecodeErrorKind::UnknownOp("0x7f".into()));
        // The req is still reported, so the error reply can echo it.
        assert_eq!(decode(&unknown).unwrap_err().req, Some(5));
        let mut flags = ping.clone();
        flags[7] = 0x03;
        assert!(matches!(kind(&flags), DecodeErrorKind::BadValue(_)));
        let mut short = ping.clone();
        short[3] = 8;
        assert!(matches!(kind(&short), DecodeErrorKind::BadLength(_)));
        let mut long = ping.clone();
        long.push(0);
        assert!(matches!(kind(&long), DecodeErrorKind::BadLength(_)));
    }

    #[test]
    fn rejects_bad_bodies_with_typed_errors() {
        let send = Frame::new(Message::Send(Send {
            target: Target::Shop(ShopId(1)),
            cmid: "c".into(),
            kind: "text".into(),
            body: "abc".into(),
        }));
        let wire = encoded(&send);
        let kind = |bytes: &[u8]| decode(bytes).unwrap_err().kind;

        // A body cut short, with the header's length made to agree.
        let mut cut = wire[..wire.len() - 1].to_vec();
        cut[3] -= 1;
        assert_eq!(kind(&cut), DecodeErrorKind::Truncated);
        // Invalid UTF-8 in the body.
        let mut bad_utf8 = wire.clone();
        let at = bad_utf8.len() - 1;
        bad_utf8[at] = 0xff;
        assert_eq!(kind(&bad_utf8), DecodeErrorKind::InvalidUtf8("body"));
        // An unknown target tag.
        let mut target = wire.clone();
        target[HEADER_LEN] = 9;
        assert!(matches!(kind(&target), DecodeErrorKind::BadValue(_)));
        // History limit out of range.
        let mut history = encoded(&Frame::new(Message::History(History {
            conv: ConvId(1),
            range: HistoryRange::After(Seq(3)),
            limit: 200,
        })));
        let at = history.len() - 1;
        history[at] = 201;
        assert!(matches!(kind(&history), DecodeErrorKind::BadValue(_)));
        // An empty cmid.
        let empty_cmid = Frame::new(Message::Send(Send {
            cmid: "".into(),
            ..match send.message {
                Message::Send(s) => s,
                _ => unreachable!(),
            }
        }));
        assert!(matches!(
            kind(&encoded(&empty_cmid)),
            DecodeErrorKind::BadValue(_)
        ));
    }

    #[test]
    fn a_forged_count_does_not_allocate_beyond_the_input() {
        // convs_ok claiming 4 billion entries in a 4-byte body.
        let mut wire = vec![0, 0, 0, 20, VERSION, Op::ConvsOk as u8, 0, 0];
        wire.extend_from_slice(&[0; 8]);
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&wire).unwrap_err().kind, DecodeErrorKind::Truncated);
    }

    #[test]
    fn frames_splits_back_to_back_frames_and_survives_a_bad_body() {
        let mut buf = BytesMut::new();
        encode(&Frame::with_req(1, Message::Ping), &mut buf).unwrap();
        let bad_at = buf.len();
        encode(&Frame::with_req(2, Message::Resolve(ConvId(3))), &mut buf).unwrap();
        buf[bad_at + 5] = 0x70; // Unknown op; the length still frames it.
        encode(&Frame::with_req(3, Message::Convs), &mut buf).unwrap();
        let got: Vec<_> = frames(&buf).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap().req, Some(1));
        assert_eq!(got[1].as_ref().unwrap_err().req, Some(2));
        assert_eq!(got[2].as_ref().unwrap().message, Message::Convs);
        // A length running past the buffer ends the iteration with an error.
        let cut = &buf[..buf.len() - 1];
        let got: Vec<_> = frames(cut).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[2].as_ref().unwrap_err().kind,
            DecodeErrorKind::Truncated
        );
    }

    #[test]
    fn rejects_frame_longer_than_limit_before_buffering_its_body() {
        let mut decoder = StreamDecoder::new(64);
        let mut header = vec![0, 0, 0x10, 0]; // 4096 bytes announced.
        header.extend_from_slice(&[VERSION, Op::Ping as u8, 0, 0]);
        let err = decoder.extend(&header).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::TooLarge { len: 4096, max: 64 });
        assert_eq!(decoder.buffered_len(), 0);
        // The stream stays failed.
        assert!(decoder.extend(&[0]).is_err());
        // A too-large frame behind good ones in the same chunk is caught too, and no more
        // than its length field was looked at.
        let mut decoder = StreamDecoder::new(64);
        let mut chunk = encoded(&Frame::new(Message::Ping));
        chunk.extend_from_slice(&[0, 0, 0x10, 0]);
        chunk.extend_from_slice(&[0xaa; 1000]);
        assert!(decoder.extend(&chunk).is_err());
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn fuzz_1_req_bytes_without_the_req_flag_are_rejected() {
        // From the stream decoder fuzz target: such a frame decoded, then re-encoded with a
        // zero req field, so two byte strings meant one frame.
        let bytes = [
            0, 0, 0, 19, 1, 1, 0, 0, 0, 138, 0, 10, 0, 1, 255, 255, 2, 0, 0,
        ];
        assert!(matches!(
            decode(&bytes).unwrap_err().kind,
            DecodeErrorKind::BadValue("req set without its flag")
        ));
    }

    #[test]
    fn stream_decoder_rejects_a_length_shorter_than_the_header() {
        let mut decoder = StreamDecoder::new(1024);
        let err = decoder.extend(&[0, 0, 0, 3]).unwrap_err();
        assert!(matches!(err.kind, DecodeErrorKind::BadLength(_)));
    }

    proptest! {
        #[test]
        fn stream_decoder_reassembles_frames_from_any_chunking(
            frames_in in proptest::collection::vec(strategies::frame(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut stream = BytesMut::new();
            for frame in &frames_in {
                encode(frame, &mut stream).unwrap();
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut decoder = StreamDecoder::new(1 << 20);
            let mut out = Vec::new();
            for pair in cuts.windows(2) {
                decoder.extend(&stream[pair[0]..pair[1]]).unwrap();
                while let Some(bytes) = decoder.next_frame() {
                    out.push(decode(&bytes).unwrap().into_owned());
                }
            }
            prop_assert_eq!(out, frames_in);
            prop_assert_eq!(decoder.buffered_len(), 0);
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            for _ in frames(&bytes) {}
            let mut decoder = StreamDecoder::new(128);
            if decoder.extend(&bytes).is_ok() {
                while let Some(frame) = decoder.next_frame() {
                    let _ = decode(&frame);
                }
            }
        }

        #[test]
        fn decoders_never_panic_on_mutated_frames(
            frame in strategies::frame(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut wire = encoded(&frame);
            for (at, byte) in flips {
                let i = at.index(wire.len());
                wire[i] = byte;
            }
            let _ = decode(&wire);
            for _ in frames(&wire) {}
        }
    }
}
