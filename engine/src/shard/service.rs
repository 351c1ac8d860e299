//! One backend service's connection on the service port (docs/backend.md): the binary codec
//! of docs/protocol.md over plain TCP, frames back to back, requests pipelined and answered
//! by `req` (replies may come out of request order: each goes to the owner of its subject).
//!
//! The contract this module keeps:
//! - **Authentication first.** The first frame must be `auth` with a `service` token. Anything
//!   else before it, or a bad token, is answered `error` `unauthorized` and the connection is
//!   closed once that answer is written.
//! - **Bad frames.** A frame that does not decode is answered `error` (`bad_request`, or
//!   `too_large`) echoing its `req`, and the connection goes on. A length out of bounds (below
//!   16, above `backend_frame_bytes_max`) loses the framing: answered, then closed.
//! - **Bounded memory.** Input: at most one frame in progress (`StreamDecoder`) plus what one
//!   read brings. Output: the outbox is bounded by `send_queue_bytes_max`; a service that does
//!   not read its replies is disconnected rather than buffered without bound. Presence
//!   gathers in flight: at most [`GATHERS_MAX`].
//!
//! The connection acts for the service through the same bus as a client session: a request
//! becomes a [`BusMsg`] with an [`Origin`] whose `service` flag lets the owner answer with the
//! service op's reply. Replies arrive as WebSocket-framed `Bytes` (what the owner encodes for
//! any caller); the WebSocket header is cut off here, which costs no copy.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::Bytes;
use chinwag_protocol::binary::{self, StreamDecoder};
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{
    token, AuthOk, DeviceId, ErrorCode, Frame, Message, NodeType, Notify, Online, StreamBatch, Uid,
    UidKind,
};
use mio::net::TcpStream;
use mio::Token;

use super::context::Context;
use super::outbox::{self, Outbox};
use crate::bus::{
    self, owner_of, stream_position, BusMsg, Fanout, GroupOp, GroupRequest, Origin, SendRequest,
    SessionRef, StreamPart, STREAM_NOW,
};

/// A [`SessionRef`] slot with this bit set names a service connection, not a client session.
pub const SERVICE_SLOT_BIT: u32 = 1 << 31;

/// Service connections' mio tokens start here (client sessions' tokens are their slab keys,
/// below 2^31).
pub const SERVICE_TOKEN_BASE: usize = 1 << 32;

/// `presence` requests one connection may have waiting for their shards' parts.
pub const GATHERS_MAX: usize = 16;

/// Reads one connection may do per loop turn before the shard serves others.
const READS_PER_TURN: usize = 16;

/// The device an [`Origin`] of a service names. Its node type (logic) is never given to a
/// client's device, so a push that skips "the sending device" skips no one.
fn service_device() -> DeviceId {
    // The value has bit 0 clear and node type 010 (logic), both of which from_u64 accepts.
    DeviceId::from_u64((NodeType::Logic as u64) << 60).expect("a valid device id")
}

/// A subscription to the message stream: where each shard's log is read next.
#[derive(Debug)]
struct Stream {
    /// The `subscribe`'s `req`, echoed by every `stream_batch`.
    req: Option<u64>,
    /// Per shard: the log position to read next (`STREAM_NOW` until the shard said where its
    /// end is).
    positions: Vec<u64>,
    /// Per shard: a read is posted and not answered yet.
    in_flight: Vec<bool>,
    /// Per shard: its last read found messages, so there may be more right away.
    more: Vec<bool>,
    /// Every shard has answered once: the positions are all real, batches may go out.
    started: bool,
}

#[derive(Debug)]
struct PresenceGather {
    /// Names this request among the connection's; never reused on a connection.
    token: u64,
    req: Option<u64>,
    remaining: usize,
    /// A shard could not answer (its mailbox was full): the reply is `unavailable`.
    failed: bool,
    /// When it was asked (the shard's clock), for [`PRESENCE_TIMEOUT_MS`].
    started_ms: u64,
    online: Vec<Online>,
}

/// A `presence` whose parts have not all come back after this long is answered `unavailable`
/// and its slot freed: a part can be lost on its way back (this shard's mailbox was full).
const PRESENCE_TIMEOUT_MS: u64 = 10_000;

/// A service connection: its socket, its partial input, its outbox, and who it is.
pub struct ServiceConn {
    stream: TcpStream,
    slot: u32,
    generation: u32,
    decoder: StreamDecoder,
    outbox: Outbox,
    dirty: bool,
    /// The service, once `auth` succeeded.
    service: Option<Uid>,
    /// An answer that ends the connection is queued: nothing more is read or queued; the
    /// connection closes once the outbox is written.
    closing: bool,
    /// When it was accepted (shard milliseconds), for the authentication timeout.
    accepted_ms: u64,
    gathers: Vec<PresenceGather>,
    /// The token of the next `presence` request: parts are matched by it, not by `req`.
    next_gather_token: u64,
    subscription: Option<Box<Stream>>,
}

enum ReadOutcome {
    Data(usize),
    Blocked,
    Gone,
}

impl ServiceConn {
    pub fn new(stream: TcpStream, slot: usize, generation: u32, ctx: &Context) -> ServiceConn {
        ServiceConn {
            stream,
            // Fits: backend_connections_per_shard_max < 2^31 (Config::validate).
            slot: slot as u32,
            generation,
            decoder: StreamDecoder::new(ctx.node.config.backend_frame_bytes_max),
            outbox: Outbox::default(),
            dirty: false,
            service: None,
            closing: false,
            accepted_ms: ctx.now_ms,
            gathers: Vec::new(),
            next_gather_token: 0,
            subscription: None,
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The address other shards use to answer this connection.
    pub fn session_ref(&self, ctx: &Context) -> SessionRef {
        ctx.session_ref(self.slot | SERVICE_SLOT_BIT, self.generation)
    }

    fn token(&self) -> Token {
        Token(SERVICE_TOKEN_BASE + self.slot as usize)
    }

    /// Reads what the socket has and handles every whole frame. Returns `true` if the
    /// connection is done.
    pub fn on_readable(&mut self, rbuf: &mut [u8], ctx: &mut Context) -> bool {
        for _ in 0..READS_PER_TURN {
            if self.closing {
                return false;
            }
            let n = match read_some(&mut self.stream, rbuf) {
                ReadOutcome::Data(n) => n,
                ReadOutcome::Blocked => return false,
                ReadOutcome::Gone => return true,
            };
            if let Err(e) = self.decoder.extend(&rbuf[..n]) {
                // The frame's length is out of bounds: the stream's framing is lost.
                let code = e.code();
                self.reply(e.req, bus::error(code, &e.to_string()), ctx);
                self.closing = true;
                self.mark_dirty(ctx);
                return false;
            }
            while let Some(frame) = self.decoder.next_frame() {
                self.on_frame(&frame, ctx);
                if self.closing {
                    return false;
                }
            }
        }
        ctx.read_again.push(self.token());
        false
    }

    fn on_frame(&mut self, bytes: &[u8], ctx: &mut Context) {
        let frame = match binary::decode(bytes) {
            Ok(frame) => frame,
            Err(e) if self.service.is_none() => {
                return self.refuse(e.req, &format!("authenticate first ({e})"), ctx)
            }
            Err(e) => return self.reply(e.req, bus::error(e.code(), &e.to_string()), ctx),
        };
        let req = frame.req;
        let Some(service) = self.service else {
            return match frame.message {
                Message::Auth(token) => self.auth(req, &token, ctx),
                other => {
                    let text = format!("{} before auth: the first frame must be auth", other.op());
                    self.refuse(req, &text, ctx)
                }
            };
        };
        let shards = ctx.shards();
        let me = self.session_ref(ctx);
        let received = std::time::Instant::now();
        let origin = |uid: Uid| Origin {
            session: me,
            uid,
            device: service_device(),
            encoding: Encoding::Binary,
            req,
            service: true,
            received,
        };
        match frame.message {
            Message::Ping => self.reply(req, Message::Pong, ctx),
            Message::Auth(_) => self.reply(
                req,
                bus::error(ErrorCode::BadRequest, "already authenticated"),
                ctx,
            ),
            Message::SendAs(m) => {
                let request = BusMsg::Send(Box::new(SendRequest {
                    origin: origin(m.from),
                    target: m.send.target,
                    cmid: m.send.cmid.into_owned(),
                    kind: m.send.kind.into_owned(),
                    body: m.send.body.into_owned(),
                }));
                self.post_to_owner(req, request, ctx);
            }
            Message::NotifyUsers(m) => {
                let count = m.users.len() as u32;
                let notify = Message::Notify(Notify {
                    kind: m.kind,
                    body: m.body,
                    ts: ctx.unix_ms,
                });
                let fanout = Arc::new(Fanout::new(m.users.into_iter().collect(), None, notify));
                for shard in 0..shards {
                    ctx.post.to(shard, BusMsg::Push(Arc::clone(&fanout)));
                }
                self.reply(req, Message::NotifyUsersOk(count), ctx);
            }
            Message::Kick(kick) => {
                let request = BusMsg::KickUser {
                    origin: Box::new(origin(service)),
                    kick,
                };
                self.post_to_owner(req, request, ctx);
            }
            Message::Presence(mut users) => {
                self.expire_gathers(ctx);
                if self.gathers.len() >= GATHERS_MAX {
                    let text = "too many presence requests in flight";
                    return self.reply(req, bus::error(ErrorCode::RateLimited, text), ctx);
                }
                users.sort_unstable();
                users.dedup();
                let mut parts: Vec<Vec<Uid>> = vec![Vec::new(); shards];
                for uid in users {
                    parts[owner_of(&uid, shards)].push(uid);
                }
                let asked = parts.iter().filter(|p| !p.is_empty()).count();
                let token = self.next_gather_token;
                self.next_gather_token += 1;
                self.gathers.push(PresenceGather {
                    token,
                    req,
                    remaining: asked,
                    failed: false,
                    started_ms: ctx.now_ms,
                    online: Vec::new(),
                });
                for (shard, users) in parts.into_iter().enumerate() {
                    if !users.is_empty() {
                        let origin = Box::new(origin(service));
                        let request = BusMsg::Presence {
                            origin,
                            users,
                            token,
                        };
                        ctx.post.to(shard, request);
                    }
                }
            }
            Message::Subscribe(from) => self.subscribe(req, &from, ctx),
            Message::ConvHistory(history) => {
                let request = BusMsg::History {
                    origin: Box::new(origin(service)),
                    history,
                };
                self.post_to_owner(req, request, ctx);
            }
            Message::GroupCreate(m) => {
                let op = GroupOp::Create {
                    key: m.key,
                    members: m.users,
                };
                self.post_group(origin(service), op, ctx);
            }
            Message::GroupAdd(m) => {
                let op = GroupOp::Add {
                    conv: m.conv,
                    members: m.users,
                };
                self.post_group(origin(service), op, ctx);
            }
            Message::GroupRemove(m) => {
                let op = GroupOp::Remove {
                    conv: m.conv,
                    members: m.users,
                };
                self.post_group(origin(service), op, ctx);
            }
            Message::ConvInfo(conv) => {
                self.post_group(origin(service), GroupOp::Info { conv }, ctx);
            }
            Message::AgentStats(stats) => {
                let request = BusMsg::AgentStats {
                    origin: Box::new(origin(service)),
                    stats,
                };
                self.post_to_owner(req, request, ctx);
            }
            other => {
                let text = format!("{} is not a service request", other.op());
                self.reply(req, bus::error(ErrorCode::BadRequest, &text), ctx);
            }
        }
    }

    /// `subscribe`: starts the message stream from `from` (empty: from now).
    fn subscribe(&mut self, req: Option<u64>, from: &str, ctx: &mut Context) {
        if self.subscription.is_some() {
            let error = bus::error(ErrorCode::BadRequest, "already subscribed");
            return self.reply(req, error, ctx);
        }
        let shards = ctx.shards();
        let positions = if from.is_empty() {
            vec![STREAM_NOW; shards]
        } else {
            match stream_position::decode(&ctx.node.jwt_secret, shards, from) {
                Ok(positions) => positions,
                Err(text) => return self.reply(req, bus::error(ErrorCode::BadRequest, text), ctx),
            }
        };
        let me = self.session_ref(ctx);
        for (shard, &from) in positions.iter().enumerate() {
            ctx.post.to(shard, BusMsg::StreamRead { session: me, from });
        }
        self.subscription = Some(Box::new(Stream {
            req,
            positions,
            in_flight: vec![true; shards],
            more: vec![false; shards],
            started: false,
        }));
    }

    /// One shard's next messages for the stream: sent on as a `stream_batch` with the position
    /// after them, and the next reads asked for while the service keeps up.
    pub fn on_stream_part(&mut self, part: StreamPart, ctx: &mut Context) {
        let Some(stream) = self.subscription.as_mut() else {
            return;
        };
        let shard = part.shard;
        let Some(in_flight) = stream.in_flight.get_mut(shard) else {
            return;
        };
        *in_flight = false;
        let req = stream.req;
        let found = match part.result {
            Ok(found) => found,
            Err(text) => {
                self.subscription = None;
                return self.reply(req, bus::error(ErrorCode::BadRequest, text), ctx);
            }
        };
        // A read that moved on found something (perhaps only records the stream leaves
        // out, such as device registrations): there may be more behind it.
        stream.more[shard] = found.next != stream.positions[shard];
        stream.positions[shard] = found.next;
        let first_round_done = !stream.started && !stream.in_flight.iter().any(|&f| f);
        if first_round_done {
            stream.started = true;
        }
        if !found.msgs.is_empty() || !found.events.is_empty() || first_round_done {
            let position = stream_position::encode(&ctx.node.jwt_secret, &stream.positions);
            let batch = Message::StreamBatch(StreamBatch {
                position: position.into(),
                msgs: found.msgs,
                events: found.events,
            });
            self.reply(req, batch, ctx);
        }
        self.pump_stream(false, ctx);
    }

    /// Asks each shard with no read in flight for its next messages: those that just found
    /// some, or all of them when `poll` (a timer tick, for shards that were caught up). A
    /// service whose replies pile up (over a quarter of the send queue) is asked nothing more
    /// until it reads them: the log is the buffer, not memory.
    pub fn pump_stream(&mut self, poll: bool, ctx: &mut Context) {
        let me = self.session_ref(ctx);
        let backlog = self.outbox.len_bytes() > ctx.node.config.send_queue_bytes_max / 4;
        let Some(stream) = self.subscription.as_mut() else {
            return;
        };
        if !stream.started || backlog || self.closing {
            return;
        }
        for shard in 0..stream.positions.len() {
            if !stream.in_flight[shard] && (poll || stream.more[shard]) {
                stream.in_flight[shard] = true;
                let from = stream.positions[shard];
                ctx.post.to(shard, BusMsg::StreamRead { session: me, from });
            }
        }
    }

    /// `auth`: a valid token of kind `service` authenticates the connection; anything else
    /// closes it.
    fn auth(&mut self, req: Option<u64>, token: &str, ctx: &mut Context) {
        let now_s = ctx.unix_ms / 1000;
        match token::verify(&ctx.node.jwt_secret, token, now_s) {
            Ok(claims) if claims.uid.kind == UidKind::Service => {
                self.service = Some(claims.uid);
                let ok = Message::AuthOk(AuthOk {
                    uid: claims.uid,
                    ts: ctx.unix_ms,
                });
                self.reply(req, ok, ctx);
            }
            Ok(claims) => {
                let text = format!("{} is not a service token", claims.uid);
                self.refuse(req, &text, ctx)
            }
            Err(e) => self.refuse(req, &e.to_string(), ctx),
        }
    }

    /// A group operation, to the owner of the group (docs/backend.md, "Groups").
    fn post_group(&mut self, origin: Origin, op: GroupOp, ctx: &mut Context) {
        let req = origin.req;
        let request = BusMsg::Group(Box::new(GroupRequest { origin, op }));
        self.post_to_owner(req, request, ctx);
    }

    /// Posts a request to the owner of its subject; a conversation id naming a shard this
    /// node does not have is answered `not_found` here.
    fn post_to_owner(&mut self, req: Option<u64>, request: BusMsg, ctx: &mut Context) {
        match request.owner(ctx.shards()) {
            Some(owner) if owner < ctx.shards() => ctx.post.to(owner, request),
            _ => self.reply(
                req,
                bus::error(ErrorCode::NotFound, "no such conversation"),
                ctx,
            ),
        }
    }

    /// One shard's part of the `presence` request `token` (`None`: that shard could not
    /// answer); the reply goes out when every shard asked has answered.
    pub fn on_presence_part(&mut self, token: u64, online: Option<Vec<Online>>, ctx: &mut Context) {
        // A part of a request that timed out finds no gather: it is dropped.
        let Some(at) = self.gathers.iter().position(|g| g.token == token) else {
            return;
        };
        let gather = &mut self.gathers[at];
        match online {
            Some(online) if !gather.failed => gather.online.extend(online),
            _ => {
                gather.failed = true;
                gather.online = Vec::new();
            }
        }
        gather.remaining -= 1;
        if gather.remaining > 0 {
            return;
        }
        let mut gather = self.gathers.remove(at);
        if gather.failed {
            let error = bus::error(ErrorCode::Unavailable, "a shard is overloaded; try again");
            return self.reply(gather.req, error, ctx);
        }
        gather.online.sort_unstable_by_key(|o| o.uid);
        self.reply(gather.req, Message::PresenceOk(gather.online), ctx);
    }

    /// Answers `unavailable` to the `presence` requests asked more than
    /// [`PRESENCE_TIMEOUT_MS`] ago and frees their slots (a part of theirs was lost).
    fn expire_gathers(&mut self, ctx: &mut Context) {
        let now_ms = ctx.now_ms;
        let expired =
            |g: &PresenceGather| now_ms.saturating_sub(g.started_ms) >= PRESENCE_TIMEOUT_MS;
        while let Some(at) = self.gathers.iter().position(expired) {
            let gather = self.gathers.remove(at);
            let error = bus::error(ErrorCode::Unavailable, "the presence request timed out");
            self.reply(gather.req, error, ctx);
        }
    }

    /// Refuses the connection: `unauthorized` with `text`, then close.
    fn refuse(&mut self, req: Option<u64>, text: &str, ctx: &mut Context) {
        self.reply(req, bus::error(ErrorCode::Unauthorized, text), ctx);
        self.closing = true;
        self.mark_dirty(ctx);
    }

    fn reply(&mut self, req: Option<u64>, message: Message<'_>, ctx: &mut Context) {
        match binary::encode_to_bytes(&Frame { req, message }) {
            Ok(bytes) => self.send(bytes, ctx),
            Err(_) => {
                // Only a reply over the codec's length fields fails; say so rather than
                // send nothing.
                let error = bus::error(ErrorCode::Internal, "reply too large to encode");
                if let Ok(bytes) = binary::encode_to_bytes(&Frame {
                    req,
                    message: error,
                }) {
                    self.send(bytes, ctx);
                }
            }
        }
    }

    /// A reply from an owner, encoded as a binary WebSocket message: its payload is the codec
    /// frame (server frames are unmasked, so the header is all there is to cut).
    pub fn deliver(&mut self, ws_message: Bytes, ctx: &mut Context) {
        let header_len = match ws_message.get(1).map(|b| b & 0x7f) {
            Some(126) => 4,
            Some(127) => 10,
            Some(_) => 2,
            None => return,
        };
        if ws_message.len() > header_len {
            self.send(ws_message.slice(header_len..), ctx);
        }
    }

    /// Queues bytes for the service. Over `send_queue_bytes_max` the queue is dropped and the
    /// connection closed: a service that does not read is not buffered without bound.
    fn send(&mut self, bytes: Bytes, ctx: &mut Context) {
        if self.closing {
            return;
        }
        if self.outbox.len_bytes() + bytes.len() > ctx.node.config.send_queue_bytes_max {
            self.outbox.clear();
            tracing::warn!(
                shard = ctx.shard_id,
                "service connection not reading: closed"
            );
            // Nothing more can be said on a connection that does not read: drop it.
            self.closing = true;
            let _ = self.stream.shutdown(Shutdown::Both);
            self.mark_dirty(ctx);
            return;
        }
        self.outbox.push(bytes);
        self.mark_dirty(ctx);
    }

    fn mark_dirty(&mut self, ctx: &mut Context) {
        if !self.dirty {
            self.dirty = true;
            ctx.dirty.push(self.token());
        }
    }

    /// Writes what is queued. Returns `true` if the connection is done.
    pub fn flush(&mut self) -> bool {
        self.dirty = false;
        while !self.outbox.is_empty() {
            let mut slices = outbox::empty_slices();
            let n = self.outbox.slices(&mut slices);
            let total: usize = slices[..n].iter().map(|s| s.len()).sum();
            let written = match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return true,
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            };
            self.outbox.advance(written);
            if written < total {
                return false;
            }
        }
        if self.closing {
            // Our last answer is out: a FIN after it, so the service reads it before the end.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.closing
    }

    /// Whether the connection has not authenticated within `timeout_ms` of its accept.
    pub fn auth_timed_out(&self, now_ms: u64, timeout_ms: u64) -> bool {
        self.service.is_none() && now_ms >= self.accepted_ms.saturating_add(timeout_ms)
    }
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> ReadOutcome {
    loop {
        match stream.read(buf) {
            Ok(0) => return ReadOutcome::Gone,
            Ok(n) => return ReadOutcome::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return ReadOutcome::Gone,
        }
    }
}
