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
//! **The HTTP form.** A `POST /api/<op>` on the client port (net::api) is read up to the end of
//! its head by a client session, whose socket is then handed here ([`ServiceConn::for_api`]):
//! the bearer token authenticates, the body is read (at most `backend_frame_bytes_max`) and
//! decoded into the same `Message` a binary frame gives, and [`ServiceConn::on_request`]
//! answers it as it answers the binary port. The one reply (for `subscribe`, the first batch
//! with messages, or an empty one when the wait is over) goes out as an HTTP response, then
//! the connection lingers until the client's EOF (`close_timeout_ms` at most).
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
    json, token, AuthOk, DeviceId, ErrorCode, Frame, Message, Msg, NodeType, Notify, Online, Op,
    StreamBatch, Uid, UidKind,
};
use mio::net::TcpStream;
use mio::Token;

use super::context::Context;
use super::outbox::{self, Outbox};
use crate::bus::{
    self, stream_position, BusMsg, Fanout, GroupOp, GroupRequest, Origin, PartitionId, ProfileOp,
    ProfileRequest, SendRequest, SessionRef, StreamPart, STREAM_NOW,
};
use crate::net::api::{self, ApiHead};
use crate::operator::config::Config;

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

/// A subscription to the message stream: where each partition's log is read next. Reads go
/// to the shards, each for the partitions it serves.
#[derive(Debug)]
struct Stream {
    /// The `subscribe`'s `req`, echoed by every `stream_batch`.
    req: Option<u64>,
    /// Per partition: the log position to read next (`STREAM_NOW` until its shard said where
    /// its end is; 0: its start).
    positions: Vec<u64>,
    /// Per shard: a read is posted and not answered yet.
    in_flight: Vec<bool>,
    /// Per shard: its last read found messages, so there may be more right away.
    more: Vec<bool>,
    /// Every shard has answered once: the positions are all real, batches may go out.
    started: bool,
}

impl Stream {
    /// Asks `shard` for the next messages of its partitions (a shard with none is not asked).
    fn read(&mut self, shard: usize, me: SessionRef, ctx: &mut Context) {
        let from: Box<[(PartitionId, u64)]> = ctx
            .partitions()
            .partitions_of(shard)
            .map(|p| (p, self.positions[usize::from(p)]))
            .collect();
        if from.is_empty() {
            return;
        }
        self.in_flight[shard] = true;
        ctx.post.to(shard, BusMsg::StreamRead { session: me, from });
    }

    /// The signed position string of where every partition is read next. A partition still
    /// at `STREAM_NOW` (only one no shard here serves) is left at its start.
    fn position(&self, ctx: &Context) -> String {
        let named: Vec<(PartitionId, u64)> = self
            .positions
            .iter()
            .enumerate()
            .filter(|&(_, &pos)| pos != STREAM_NOW)
            .map(|(p, &pos)| (p as PartitionId, pos))
            .collect();
        stream_position::encode(&ctx.node.jwt_secret, self.positions.len(), &named)
    }
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

/// An API request's head and the input read after it, handed from the client-port session
/// that read the head to the service connection that serves it.
#[derive(Debug)]
pub struct HttpHandover {
    pub head: ApiHead,
    pub rest: Vec<u8>,
}

/// The one HTTP exchange of a connection serving `POST /api/<op>`.
#[derive(Debug)]
struct HttpExchange {
    op: Op,
    body_len: usize,
    /// The body read so far (at most `body_len`, which is at most `backend_frame_bytes_max`).
    body: Vec<u8>,
    /// How long a `subscribe` waits for messages.
    wait_ms: u64,
    /// The body is whole and the request was handed on.
    dispatched: bool,
    /// From when a waiting `subscribe` answers with what it has; for every request, from when
    /// a missing answer is `unavailable` (shard milliseconds, set at dispatch).
    deadline_ms: u64,
    /// When the answer was queued; the connection lingers for the client's EOF after it.
    answered_ms: Option<u64>,
    /// The client's FIN was read.
    peer_eof: bool,
    write_shut: bool,
}

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
    /// `Some` for a connection serving one HTTP API request rather than the binary port.
    http: Option<Box<HttpExchange>>,
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
            http: None,
        }
    }

    /// A connection serving the API request of `handover` on `stream` (taken from the
    /// client-port session that read its head): authenticated by its bearer token, its body
    /// limited to `backend_frame_bytes_max`, then read and answered.
    pub fn for_api(
        stream: TcpStream,
        slot: usize,
        generation: u32,
        handover: HttpHandover,
        ctx: &mut Context,
    ) -> ServiceConn {
        let HttpHandover { head, rest } = handover;
        let config = &ctx.node.config;
        let wait_ms = head
            .wait_ms
            .map_or(config.api_wait_ms_max, |ms| ms.min(config.api_wait_ms_max));
        let frame_bytes_max = config.backend_frame_bytes_max;
        let mut conn = ServiceConn::new(stream, slot, generation, ctx);
        conn.http = Some(Box::new(HttpExchange {
            op: head.op,
            body_len: head.body_len,
            body: Vec::new(),
            wait_ms,
            dispatched: false,
            deadline_ms: 0,
            answered_ms: None,
            peer_eof: false,
            write_shut: false,
        }));
        let verified = match head.token.as_deref() {
            Some(token) => verify_service(token, ctx),
            None => Err("no Authorization: Bearer <service token> header".to_string()),
        };
        match verified {
            Ok(uid) => conn.service = Some(uid),
            Err(text) => {
                conn.refuse(None, &text, ctx);
                return conn;
            }
        }
        if head.body_len > frame_bytes_max {
            let text = format!(
                "a body of {} bytes is over backend_frame_bytes_max ({frame_bytes_max})",
                head.body_len
            );
            conn.reply(None, bus::error(ErrorCode::TooLarge, &text), ctx);
            return conn;
        }
        if head.expect_continue && rest.len() < head.body_len {
            conn.send(api::continue_100(), ctx);
        }
        conn.on_api_bytes(&rest, ctx);
        conn
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
        if self.http.is_some() {
            return self.on_api_readable(rbuf, ctx);
        }
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

    /// Reads an API request's body (and, once it is answered, drops whatever else comes until
    /// the client's EOF). Returns `true` if the connection is done.
    fn on_api_readable(&mut self, rbuf: &mut [u8], ctx: &mut Context) -> bool {
        for _ in 0..READS_PER_TURN {
            match read_some(&mut self.stream, rbuf) {
                ReadOutcome::Data(n) => self.on_api_bytes(&rbuf[..n], ctx),
                ReadOutcome::Blocked => return false,
                ReadOutcome::Gone => return self.on_api_eof(),
            }
        }
        ctx.read_again.push(self.token());
        false
    }

    /// Bytes of an API request's body; the request is handed on when it is whole. Anything
    /// after the body (or after the answer) is dropped: one request per connection.
    fn on_api_bytes(&mut self, bytes: &[u8], ctx: &mut Context) {
        let Some(exchange) = self.http.as_mut() else {
            return;
        };
        if exchange.dispatched || self.closing {
            return;
        }
        let take = (exchange.body_len - exchange.body.len()).min(bytes.len());
        exchange.body.extend_from_slice(&bytes[..take]);
        if exchange.body.len() == exchange.body_len {
            self.dispatch_api(ctx);
        }
    }

    /// The client's EOF. Returns `true` if the connection is done: its request was never
    /// whole, or its answer is written. A client that shut its side after a whole request
    /// still gets the answer.
    fn on_api_eof(&mut self) -> bool {
        let Some(exchange) = self.http.as_mut() else {
            return true;
        };
        exchange.peer_eof = true;
        if self.closing {
            self.outbox.is_empty()
        } else {
            !exchange.dispatched
        }
    }

    /// A whole API request: its body decoded as the op of its path into the one typed model,
    /// then answered as the binary port answers that message.
    fn dispatch_api(&mut self, ctx: &mut Context) {
        let (Some(exchange), Some(service)) = (self.http.as_mut(), self.service) else {
            return;
        };
        exchange.dispatched = true;
        let op = exchange.op;
        let wait_ms = if op == Op::Subscribe {
            exchange.wait_ms
        } else {
            0
        };
        exchange.deadline_ms = ctx.now_ms.saturating_add(wait_ms);
        let body = std::mem::take(&mut exchange.body);
        // An empty body is an empty object: `subscribe` from now needs no field.
        let text = match std::str::from_utf8(&body) {
            Ok("") => "{}",
            Ok(text) => text,
            Err(_) => {
                let error = bus::error(ErrorCode::BadRequest, "the body is not UTF-8");
                return self.reply(None, error, ctx);
            }
        };
        match json::decode_as(op, text) {
            Ok(frame) => self.on_request(None, service, frame.message, ctx),
            Err(e) => self.reply(None, bus::error(e.code(), &e.to_string()), ctx),
        }
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
        self.on_request(req, service, frame.message, ctx);
    }

    /// One request of the authenticated `service`, whichever way it came (a frame of the
    /// service port, or `POST /api/<op>`): posted to the owner of its subject, or answered
    /// here. The reply comes back through [`ServiceConn::reply`], which frames it for the way
    /// the request came.
    fn on_request(
        &mut self,
        req: Option<u64>,
        service: Uid,
        message: Message<'_>,
        ctx: &mut Context,
    ) {
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
        match message {
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
                    profile: None,
                    // Through the sender's owner, which adds the sender's profile.
                    profile_pending: true,
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
                ctx.post.fanout(fanout);
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
                // Users of other nodes' partitions, by partition: each part goes to the
                // partition's node, whose owner shard answers for it.
                let mut remote: std::collections::BTreeMap<u16, Vec<Uid>> = Default::default();
                for uid in users {
                    match ctx.partitions().shard_of(&uid) {
                        Some(shard) => parts[shard].push(uid),
                        None => remote
                            .entry(ctx.partitions().partition_of(&uid))
                            .or_default()
                            .push(uid),
                    }
                }
                let token = self.next_gather_token;
                self.next_gather_token += 1;
                let mut asked = 0;
                let mut failed = false;
                for (shard, users) in parts.into_iter().enumerate() {
                    if !users.is_empty() {
                        let origin = Box::new(origin(service));
                        let request = BusMsg::Presence {
                            origin,
                            users,
                            token,
                        };
                        ctx.post.to(shard, request);
                        asked += 1;
                    }
                }
                for users in remote.into_values() {
                    let origin = Box::new(origin(service));
                    let request = BusMsg::Presence {
                        origin,
                        users,
                        token,
                    };
                    match ctx.post_to_owner(request) {
                        Ok(()) => asked += 1,
                        // The partition's node is down: its users' sessions are not known.
                        Err(_) => failed = true,
                    }
                }
                if asked == 0 {
                    let message = if failed {
                        let text = "the node that owns these users is down; try again";
                        bus::error(ErrorCode::Unavailable, text)
                    } else {
                        Message::PresenceOk(Vec::new())
                    };
                    return self.reply(req, message, ctx);
                }
                self.gathers.push(PresenceGather {
                    token,
                    req,
                    remaining: asked,
                    failed,
                    started_ms: ctx.now_ms,
                    online: Vec::new(),
                });
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
            Message::SetProfile(of) => {
                let op = ProfileOp::Set(of);
                let request = BusMsg::Profile(Box::new(ProfileRequest {
                    origin: origin(service),
                    op,
                }));
                self.post_to_owner(req, request, ctx);
            }
            Message::GetProfile(subject) => {
                let op = ProfileOp::Get(subject);
                let request = BusMsg::Profile(Box::new(ProfileRequest {
                    origin: origin(service),
                    op,
                }));
                self.post_to_owner(req, request, ctx);
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
        let partitions = ctx.partitions().count();
        let positions = if from.is_empty() {
            vec![STREAM_NOW; partitions]
        } else {
            match stream_position::decode(&ctx.node.jwt_secret, partitions, from) {
                Ok(named) => {
                    let mut positions = vec![0; partitions];
                    for (p, pos) in named {
                        positions[usize::from(p)] = pos;
                    }
                    positions
                }
                Err(text) => return self.reply(req, bus::error(ErrorCode::BadRequest, text), ctx),
            }
        };
        let mut stream = Box::new(Stream {
            req,
            positions,
            in_flight: vec![false; shards],
            more: vec![false; shards],
            started: false,
        });
        let me = self.session_ref(ctx);
        for shard in 0..shards {
            stream.read(shard, me, ctx);
        }
        self.subscription = Some(stream);
    }

    /// One shard's next messages for the stream: sent on as a `stream_batch` with the position
    /// after them, and the next reads asked for while the service keeps up.
    pub fn on_stream_part(&mut self, part: StreamPart, ctx: &mut Context) {
        // A long poll (the HTTP form) answers with the first messages, or, once its wait is
        // over, with none; the binary port's first batch goes out at once even when empty.
        let waits = self
            .http
            .as_ref()
            .is_some_and(|exchange| ctx.now_ms < exchange.deadline_ms);
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
        let mut moved = false;
        for (p, pos) in found.next {
            if let Some(at) = stream.positions.get_mut(usize::from(p)) {
                moved |= *at != pos;
                *at = pos;
            }
        }
        stream.more[shard] = moved;
        let first_round_done = !stream.started && !stream.in_flight.iter().any(|&f| f);
        if first_round_done {
            stream.started = true;
        }
        if !found.msgs.is_empty() || !found.events.is_empty() || (first_round_done && !waits) {
            self.send_batch(found.msgs, found.events, ctx);
        }
        self.pump_stream(false, ctx);
    }

    /// A `stream_batch` of `msgs` and `events` with the position after them (every shard's
    /// next read).
    fn send_batch(
        &mut self,
        msgs: Vec<Msg<'static>>,
        events: Vec<chinwag_protocol::StreamEvent>,
        ctx: &mut Context,
    ) {
        let Some(stream) = self.subscription.as_ref() else {
            return;
        };
        let req = stream.req;
        let position = stream.position(ctx);
        let batch = Message::StreamBatch(StreamBatch {
            position: position.into(),
            msgs,
            events,
        });
        self.reply(req, batch, ctx);
    }

    /// A sweep tick: streams look for new messages again; an API request whose wait is over
    /// is answered (a long-polling `subscribe` with an empty batch and its position), and one
    /// that got no answer `handshake_timeout_ms` after that is answered `unavailable`.
    pub fn on_tick(&mut self, ctx: &mut Context) {
        self.pump_stream(true, ctx);
        let Some(exchange) = self.http.as_ref() else {
            return;
        };
        if !exchange.dispatched || self.closing || ctx.now_ms < exchange.deadline_ms {
            return;
        }
        let give_up_ms = exchange
            .deadline_ms
            .saturating_add(ctx.node.config.handshake_timeout_ms);
        if self.subscription.as_ref().is_some_and(|s| s.started) {
            self.send_batch(Vec::new(), Vec::new(), ctx);
        } else if ctx.now_ms >= give_up_ms {
            let error = bus::error(ErrorCode::Unavailable, "no answer in time; retry");
            self.reply(None, error, ctx);
        }
    }

    /// The node is draining: an API request still waiting is answered `unavailable`, then
    /// what is queued is written (the shard closes every service connection after this).
    pub fn on_drain(&mut self, ctx: &mut Context) {
        if self.http.is_some() && !self.closing {
            let error = bus::error(ErrorCode::Unavailable, "the node is draining");
            self.reply(None, error, ctx);
        }
        self.flush();
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
        for shard in 0..stream.in_flight.len() {
            if !stream.in_flight[shard] && (poll || stream.more[shard]) {
                stream.read(shard, me, ctx);
            }
        }
    }

    /// `auth`: a valid token of kind `service` authenticates the connection; anything else
    /// closes it.
    fn auth(&mut self, req: Option<u64>, token: &str, ctx: &mut Context) {
        match verify_service(token, ctx) {
            Ok(uid) => {
                self.service = Some(uid);
                let ok = Message::AuthOk(AuthOk {
                    uid,
                    ts: ctx.unix_ms,
                });
                self.reply(req, ok, ctx);
            }
            Err(text) => self.refuse(req, &text, ctx),
        }
    }

    /// A group operation, to the owner of the group (docs/backend.md, "Groups").
    fn post_group(&mut self, origin: Origin, op: GroupOp, ctx: &mut Context) {
        let req = origin.req;
        let request = BusMsg::Group(Box::new(GroupRequest { origin, op }));
        self.post_to_owner(req, request, ctx);
    }

    /// Posts a request to the owner of its subject, here or on its node; a conversation id
    /// naming no partition is answered `not_found` here, one of a node that is down
    /// `unavailable`.
    fn post_to_owner(&mut self, req: Option<u64>, request: BusMsg, ctx: &mut Context) {
        if let Err(unrouted) = ctx.post_to_owner(request) {
            self.reply(req, bus::error(unrouted.code, unrouted.text), ctx)
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
        if let Some(exchange) = self.http.as_mut() {
            // One answer per HTTP request: the first reply is it, the rest (a stream's later
            // parts) are dropped.
            if self.closing {
                return;
            }
            exchange.answered_ms = Some(ctx.now_ms);
            self.send(api::response(message), ctx);
            self.closing = true;
            self.mark_dirty(ctx);
            return;
        }
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
        if ws_message.len() <= header_len {
            return;
        }
        let payload = ws_message.slice(header_len..);
        if self.http.is_some() {
            // The owner encoded the reply for the binary port; the HTTP answer is its JSON.
            match binary::decode(&payload) {
                Ok(frame) => self.reply(frame.req, frame.message, ctx),
                Err(_) => {
                    let error = bus::error(ErrorCode::Internal, "a reply did not decode");
                    self.reply(None, error, ctx);
                }
            }
            return;
        }
        self.send(payload, ctx);
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
        if !self.closing {
            return false;
        }
        match self.http.as_mut() {
            // Our last answer is out: a FIN after it, so the service reads it before the end.
            None => {
                let _ = self.stream.shutdown(Shutdown::Write);
                true
            }
            // An HTTP client may still be sending (a body we did not read): closing now could
            // reset the connection and destroy the answer in flight. Linger until its EOF.
            Some(exchange) => {
                if !exchange.write_shut {
                    exchange.write_shut = true;
                    let _ = self.stream.shutdown(Shutdown::Write);
                }
                exchange.peer_eof
            }
        }
    }

    /// Whether the connection is over its time: on the binary port, not authenticated within
    /// `handshake_timeout_ms` of its accept; an API request, its body not read within
    /// `handshake_timeout_ms` of its head, or answered `close_timeout_ms` ago without the
    /// client closing.
    pub fn timed_out(&self, now_ms: u64, config: &Config) -> bool {
        let handshake_over = now_ms >= self.accepted_ms.saturating_add(config.handshake_timeout_ms);
        match self.http.as_ref() {
            None => self.service.is_none() && handshake_over,
            Some(exchange) => match exchange.answered_ms {
                Some(at) => now_ms >= at.saturating_add(config.close_timeout_ms),
                None => !exchange.dispatched && handshake_over,
            },
        }
    }

    /// Whether this connection serves an HTTP API request.
    pub fn is_api(&self) -> bool {
        self.http.is_some()
    }
}

/// The service a token names, if it is a valid token of kind `service`; else why not.
fn verify_service(token: &str, ctx: &Context) -> Result<Uid, String> {
    match token::verify(&ctx.node.jwt_secret, token, ctx.unix_ms / 1000) {
        Ok(claims) if claims.uid.kind == UidKind::Service => Ok(claims.uid),
        Ok(claims) => Err(format!("{} is not a service token", claims.uid)),
        Err(e) => Err(e.to_string()),
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
