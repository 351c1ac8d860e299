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
//! with messages, or an empty one when the wait is over) goes out as an HTTP response.
//! Requests are served one at a time, each limited as the first: while one is being answered
//! nothing more is read (TCP holds what the client sends ahead), and each carries its own
//! number as the `req` of what it asks the owners, so a late reply to an earlier request is
//! never taken for a later one's. After an answer the connection is kept for the next request
//! (net::api, "Keep-alive") or closed: then it lingers until the client's EOF
//! (`close_timeout_ms` at most).
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
use crate::net::http::{self, Parsed, Request};
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
/// to the shards here, each for the partitions it serves, and in a cluster to each other live
/// node, for the partitions it owns (its node inbox splits the read over its shards).
#[derive(Debug)]
struct Stream {
    /// The `subscribe`'s `req`, echoed by every `stream_batch`.
    req: Option<u64>,
    /// Per partition of the cluster: the log position to read next (`STREAM_NOW` until its
    /// owner said where its end is; 0: its start).
    positions: Vec<u64>,
    /// Per partition: when (shard milliseconds) a read of it was posted that is not answered
    /// yet. A read not answered in [`STREAM_READ_TIMEOUT_MS`] is given up (lost with a node
    /// or a link): its partitions did not move and are read again on the next poll.
    asked_ms: Vec<Option<u64>>,
    /// Per partition: its last read found something, so there may be more right away.
    more: Vec<bool>,
    /// Every read of the first round is answered (or given up): the positions are all as
    /// real as they can be, batches may go out.
    started: bool,
    /// The HTTP request it served was answered: no more batches or reads; it goes once the
    /// reads in flight are back (they would answer into the next request's subscription).
    ended: bool,
}

/// A stream read not answered after this long is given up and asked again on a later poll:
/// the node that owns its partitions died, or the link lost it. Its partitions' positions
/// did not move, so nothing is skipped (a late answer is still taken: at-least-once).
const STREAM_READ_TIMEOUT_MS: u64 = 10_000;

/// Who a stream read goes to: a shard of this node, or another node.
type StreamReader = (bus::post::To, Vec<PartitionId>);

impl Stream {
    /// Every group of partitions read together: each shard's here, each other node's.
    /// A node that is down is left out: its partitions wait, at their positions, until it is
    /// back.
    fn readers(ctx: &Context) -> Vec<StreamReader> {
        let mut readers: Vec<StreamReader> = (0..ctx.shards())
            .map(|shard| {
                let partitions = ctx.partitions().partitions_of(shard).collect();
                (bus::post::To::Shard(shard), partitions)
            })
            .collect();
        readers.extend(
            ctx.post
                .office()
                .remote_partitions()
                .into_iter()
                .filter(|&(_, _, alive)| alive)
                .map(|(node, partitions, _)| (bus::post::To::Node(node), partitions)),
        );
        readers
    }

    /// Asks `to` for the next messages of `partitions`, unless one of them is still in
    /// flight or (without `poll`) none of them found something last time.
    fn read(
        &mut self,
        (to, partitions): &StreamReader,
        poll: bool,
        me: SessionRef,
        ctx: &mut Context,
    ) {
        let at = |p: &PartitionId| usize::from(*p);
        if partitions.is_empty()
            || partitions.iter().any(|p| self.asked_ms[at(p)].is_some())
            || !(poll || partitions.iter().any(|p| self.more[at(p)]))
        {
            return;
        }
        let from: Box<[(PartitionId, u64)]> = partitions
            .iter()
            .map(|&p| (p, self.positions[at(&p)]))
            .collect();
        for p in partitions {
            self.asked_ms[at(p)] = Some(ctx.now_ms);
        }
        ctx.post
            .send_later(*to, BusMsg::StreamRead { session: me, from });
    }

    /// Whether any read is posted and not answered yet.
    fn in_flight(&self) -> bool {
        self.asked_ms.iter().any(Option::is_some)
    }

    /// Gives up the reads posted `STREAM_READ_TIMEOUT_MS` or more ago.
    fn give_up_late_reads(&mut self, now_ms: u64) {
        for asked in &mut self.asked_ms {
            if asked.is_some_and(|ms| now_ms.saturating_sub(ms) >= STREAM_READ_TIMEOUT_MS) {
                *asked = None;
            }
        }
    }

    /// The signed position string of where every partition is read next. A partition still
    /// at `STREAM_NOW` (its owner has not answered yet: a node that was down) is left at its
    /// start: resuming from it may repeat, never skip.
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

/// The HTTP side of a connection serving `POST /api/<op>`: its requests one at a time, kept
/// alive between them (net::api, "Keep-alive").
#[derive(Debug)]
struct HttpConn {
    /// The request being read or answered; `None` between requests.
    request: Option<ApiRequest>,
    /// Input not served yet: the rest of the current request's body, or the next request
    /// (sent ahead). Nothing is read while a request is answered, so this holds at most one
    /// read beyond a request head ([`http::HEAD_BYTES_MAX`]).
    pending: Vec<u8>,
    /// Requests whose head was read on this connection; the latest one's number.
    requests: u64,
    /// When the last answer was queued: with no request since, the connection is idle.
    idle_since_ms: u64,
    /// When the connection's last answer was queued; it lingers for the client's EOF after it.
    closed_ms: Option<u64>,
    /// The client's FIN was read.
    peer_eof: bool,
    write_shut: bool,
}

/// One API request of a connection.
#[derive(Debug)]
struct ApiRequest {
    /// Its number on the connection, the `req` of what it asks the owners.
    req: u64,
    op: Op,
    body_len: usize,
    /// The body read so far (at most `body_len`, which is at most `backend_frame_bytes_max`).
    body: Vec<u8>,
    /// How long a `subscribe` waits for messages.
    wait_ms: u64,
    /// When its head was read: the body must follow within `handshake_timeout_ms`.
    head_ms: u64,
    /// The client may send another request after this one.
    keep_alive: bool,
    /// The body is whole and the request was handed on.
    dispatched: bool,
    /// From when a waiting `subscribe` answers with what it has; for every request, from when
    /// a missing answer is `unavailable` (shard milliseconds, set at dispatch).
    deadline_ms: u64,
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
    /// `Some` for a connection serving HTTP API requests rather than the binary port.
    http: Option<Box<HttpConn>>,
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
    /// client-port session that read its head), then the requests that follow it.
    pub fn for_api(
        stream: TcpStream,
        slot: usize,
        generation: u32,
        handover: HttpHandover,
        ctx: &mut Context,
    ) -> ServiceConn {
        let HttpHandover { head, rest } = handover;
        let mut conn = ServiceConn::new(stream, slot, generation, ctx);
        conn.http = Some(Box::new(HttpConn {
            request: None,
            pending: rest,
            requests: 0,
            idle_since_ms: ctx.now_ms,
            closed_ms: None,
            peer_eof: false,
            write_shut: false,
        }));
        conn.start_request(head, ctx);
        conn
    }

    /// Starts the API request of `head`, whose body comes first in `pending`: authenticated
    /// by its bearer token, its body limited to `backend_frame_bytes_max`, then read and
    /// answered.
    fn start_request(&mut self, head: ApiHead, ctx: &mut Context) {
        let config = &ctx.node.config;
        let wait_ms = head
            .wait_ms
            .map_or(config.api_wait_ms_max, |ms| ms.min(config.api_wait_ms_max));
        let frame_bytes_max = config.backend_frame_bytes_max;
        let Some(http) = self.http.as_mut() else {
            return;
        };
        http.requests += 1;
        http.request = Some(ApiRequest {
            req: http.requests,
            op: head.op,
            body_len: head.body_len,
            body: Vec::new(),
            wait_ms,
            head_ms: ctx.now_ms,
            keep_alive: head.keep_alive,
            dispatched: false,
            deadline_ms: 0,
        });
        let body_follows = http.pending.len() < head.body_len;
        // Each request names its service: one connection may carry several tokens.
        self.service = None;
        let verified = match head.token.as_deref() {
            Some(token) => verify_service(token, ctx),
            None => Err("no Authorization: Bearer <service token> header".to_string()),
        };
        match verified {
            Ok(uid) => self.service = Some(uid),
            Err(text) => return self.refuse_head(bus::error(ErrorCode::Unauthorized, &text), ctx),
        }
        if head.body_len > frame_bytes_max {
            let text = format!(
                "a body of {} bytes is over backend_frame_bytes_max ({frame_bytes_max})",
                head.body_len
            );
            return self.refuse_head(bus::error(ErrorCode::TooLarge, &text), ctx);
        }
        if head.expect_continue && body_follows {
            self.send(api::continue_100(), ctx);
        }
        self.take_body(ctx);
    }

    /// Answers the current API request from its head alone, and closes: its body is not
    /// read, so where a next request would start is unknown.
    fn refuse_head(&mut self, error: Message<'_>, ctx: &mut Context) {
        if let Some(request) = self.http.as_mut().and_then(|http| http.request.as_mut()) {
            request.keep_alive = false;
        }
        self.reply(None, error, ctx);
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

    /// Reads and serves API requests, one at a time: nothing is read while one is being
    /// answered. Once the last answer is queued, whatever else comes is dropped until the
    /// client's EOF. Returns `true` if the connection is done.
    fn on_api_readable(&mut self, rbuf: &mut [u8], ctx: &mut Context) -> bool {
        for _ in 0..READS_PER_TURN {
            self.serve_pending(ctx);
            if self.answering() {
                return false;
            }
            match read_some(&mut self.stream, rbuf) {
                ReadOutcome::Data(n) => {
                    if let Some(http) = self.http.as_mut().filter(|_| !self.closing) {
                        http.pending.extend_from_slice(&rbuf[..n]);
                    }
                }
                ReadOutcome::Blocked => {
                    self.serve_pending(ctx);
                    return false;
                }
                ReadOutcome::Gone => return self.on_api_eof(ctx),
            }
        }
        ctx.read_again.push(self.token());
        false
    }

    /// Whether an API request is being answered (or the stream of the last one is still
    /// winding down), so the next is not read yet.
    fn answering(&self) -> bool {
        let Some(http) = self.http.as_ref().filter(|_| !self.closing) else {
            return false;
        };
        match &http.request {
            Some(request) => request.dispatched,
            None => self.subscription.is_some(),
        }
    }

    /// Serves what `pending` holds: more of the current request's body, or, between requests,
    /// the next request's head.
    fn serve_pending(&mut self, ctx: &mut Context) {
        if self.closing || self.answering() {
            return;
        }
        let Some(state) = self.http.as_mut() else {
            return;
        };
        if state.request.is_some() {
            return self.take_body(ctx);
        }
        if state.pending.is_empty() {
            return;
        }
        let (request, head_len) = match http::parse(&state.pending, false, false) {
            Parsed::Partial => return,
            Parsed::Complete { request, head_len } => (request, head_len),
        };
        state.pending.drain(..head_len.min(state.pending.len()));
        match request {
            Request::Api(_) if ctx.is_draining() => {
                let answer = api::error_response(ErrorCode::Unavailable, "the node is draining");
                self.close_with(answer, ctx);
            }
            Request::Api(head) => self.start_request(*head, ctx),
            // The parser's own answer (400, 404, 405, 431): closes, as on a new connection.
            Request::Respond(answer) => self.close_with(answer, ctx),
            _ => self.close_with(api::misdirected(), ctx),
        }
    }

    /// Moves the current API request's body out of `pending`; a whole body is dispatched.
    fn take_body(&mut self, ctx: &mut Context) {
        let Some(http) = self.http.as_mut() else {
            return;
        };
        let Some(request) = http.request.as_mut() else {
            return;
        };
        if request.dispatched || self.closing {
            return;
        }
        let take = (request.body_len - request.body.len()).min(http.pending.len());
        request.body.extend(http.pending.drain(..take));
        if request.body.len() == request.body_len {
            self.dispatch_api(ctx);
        }
    }

    /// Queues `answer` as the connection's last, then closes it.
    fn close_with(&mut self, answer: Bytes, ctx: &mut Context) {
        self.send(answer, ctx);
        if let Some(http) = self.http.as_mut() {
            http.closed_ms.get_or_insert(ctx.now_ms);
        }
        self.closing = true;
        self.mark_dirty(ctx);
    }

    /// The client's EOF. Returns `true` if the connection is done: it was between requests
    /// or in one that can never be whole, and nothing is left to write. A client that shut
    /// its side after a whole request still gets the answer.
    fn on_api_eof(&mut self, ctx: &mut Context) -> bool {
        let Some(http) = self.http.as_mut() else {
            return true;
        };
        http.peer_eof = true;
        if self.closing {
            return self.outbox.is_empty();
        }
        if http.request.as_ref().is_some_and(|r| r.dispatched) {
            return false;
        }
        if self.outbox.is_empty() {
            return true;
        }
        http.closed_ms.get_or_insert(ctx.now_ms);
        self.closing = true;
        self.mark_dirty(ctx);
        false
    }

    /// A whole API request: its body decoded as the op of its path into the one typed model,
    /// then answered as the binary port answers that message.
    fn dispatch_api(&mut self, ctx: &mut Context) {
        let (Some(http), Some(service)) = (self.http.as_mut(), self.service) else {
            return;
        };
        let Some(request) = http.request.as_mut() else {
            return;
        };
        request.dispatched = true;
        let op = request.op;
        let req = Some(request.req);
        let wait_ms = if op == Op::Subscribe {
            request.wait_ms
        } else {
            0
        };
        request.deadline_ms = ctx.now_ms.saturating_add(wait_ms);
        let body = std::mem::take(&mut request.body);
        // An empty body is an empty object: `subscribe` from now needs no field.
        let text = match std::str::from_utf8(&body) {
            Ok("") => "{}",
            Ok(text) => text,
            Err(_) => {
                let error = bus::error(ErrorCode::BadRequest, "the body is not UTF-8");
                return self.reply(req, error, ctx);
            }
        };
        match json::decode_as(op, text) {
            Ok(frame) => self.on_request(req, service, frame.message, ctx),
            Err(e) => self.reply(req, bus::error(e.code(), &e.to_string()), ctx),
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
            asked_ms: vec![None; partitions],
            more: vec![false; partitions],
            started: false,
            ended: false,
        });
        let me = self.session_ref(ctx);
        for reader in Stream::readers(ctx) {
            stream.read(&reader, true, me, ctx);
        }
        let started = !stream.in_flight();
        stream.started = started;
        self.subscription = Some(stream);
        if started && self.http.is_none() {
            // Nothing to read (no node serving partitions is up): the first batch, empty.
            self.send_batch(Vec::new(), Vec::new(), ctx);
        }
    }

    /// One shard's next messages for the stream: sent on as a `stream_batch` with the position
    /// after them, and the next reads asked for while the service keeps up.
    pub fn on_stream_part(&mut self, part: StreamPart, ctx: &mut Context) {
        // A long poll (the HTTP form) answers with the first messages, or, once its wait is
        // over, with none; the binary port's first batch goes out at once even when empty.
        let waits = self
            .http
            .as_ref()
            .and_then(|http| http.request.as_ref())
            .is_some_and(|request| ctx.now_ms < request.deadline_ms);
        let Some(stream) = self.subscription.as_mut() else {
            return;
        };
        // Only the partitions still in flight are taken: a late answer to a read given up and
        // asked again may come twice, and the second must not move a position back.
        let mut answered = false;
        for p in part.partitions() {
            if let Some(asked) = stream.asked_ms.get_mut(usize::from(p)) {
                answered |= asked.take().is_some();
            }
        }
        if !answered {
            return;
        }
        if stream.ended {
            if !stream.in_flight() {
                // The last read of an answered request is back: the next request may come.
                self.subscription = None;
                ctx.read_again.push(self.token());
            }
            return;
        }
        let req = stream.req;
        let found = match part.result {
            Ok(found) => found,
            Err(refused) => {
                // The HTTP form ends its stream with its answer (below).
                if self.http.is_none() {
                    self.subscription = None;
                }
                // A leader changing is passing; a position that is not ours is not.
                let code = match refused.text {
                    bus::STREAM_NOT_LED => ErrorCode::Unavailable,
                    _ => ErrorCode::BadRequest,
                };
                let error = bus::error(code, refused.text);
                return self.reply(req, error, ctx);
            }
        };
        // A read that moved on found something (perhaps only records the stream leaves
        // out, such as device registrations): there may be more behind it.
        for (p, pos) in found.next {
            let p = usize::from(p);
            if let Some(at) = stream.positions.get_mut(p) {
                stream.more[p] = *at != pos;
                *at = pos;
            }
        }
        let first_round_done = !stream.started && !stream.in_flight();
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
        self.give_up_late_reads(ctx);
        self.pump_stream(true, ctx);
        let Some(request) = self.http.as_ref().and_then(|http| http.request.as_ref()) else {
            return;
        };
        if !request.dispatched || self.closing || ctx.now_ms < request.deadline_ms {
            return;
        }
        let give_up_ms = request
            .deadline_ms
            .saturating_add(ctx.node.config.handshake_timeout_ms);
        if self
            .subscription
            .as_ref()
            .is_some_and(|s| s.started && !s.ended)
        {
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

    /// Asks each shard (and in a cluster each other live node) with no read in flight for the
    /// next messages of its partitions: those that just found some, or all of them when
    /// `poll` (a timer tick, for those that were caught up). A service whose replies pile up
    /// (over a quarter of the send queue) is asked nothing more until it reads them: the log
    /// is the buffer, not memory.
    pub fn pump_stream(&mut self, poll: bool, ctx: &mut Context) {
        let me = self.session_ref(ctx);
        let backlog = self.outbox.len_bytes() > ctx.node.config.send_queue_bytes_max / 4;
        let Some(stream) = self.subscription.as_mut() else {
            return;
        };
        if !stream.started || stream.ended || backlog || self.closing {
            return;
        }
        for reader in Stream::readers(ctx) {
            stream.read(&reader, poll, me, ctx);
        }
    }

    /// A tick's look at the reads in flight: those posted too long ago are given up (their
    /// partitions are read again on a later poll). A first round complete by that is started
    /// (its first batch goes out, on the binary port at once); an answered request's
    /// subscription with nothing left in flight goes.
    fn give_up_late_reads(&mut self, ctx: &mut Context) {
        let Some(stream) = self.subscription.as_mut() else {
            return;
        };
        if !stream.in_flight() {
            return;
        }
        stream.give_up_late_reads(ctx.now_ms);
        if stream.in_flight() {
            return;
        }
        if stream.ended {
            self.subscription = None;
            ctx.read_again.push(self.token());
        } else if !stream.started {
            stream.started = true;
            if self.http.is_none() {
                self.send_batch(Vec::new(), Vec::new(), ctx);
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
        if self.http.is_some() {
            return self.answer_api(req, message, ctx);
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

    /// The answer to the current API request: the first reply for it (`req` its number, or
    /// `None` for one made here). A late reply to an earlier request, or a stream's later
    /// parts, are dropped. The connection is then kept for the next request, or closed.
    fn answer_api(&mut self, req: Option<u64>, message: Message<'_>, ctx: &mut Context) {
        let requests_max = ctx.node.config.api_requests_per_connection_max;
        let draining = ctx.is_draining();
        let Some(http) = self.http.as_mut() else {
            return;
        };
        let Some((number, kept)) = http.request.as_ref().map(|r| (r.req, r.keep_alive)) else {
            return;
        };
        if self.closing || req.is_some_and(|req| req != number) {
            return;
        }
        let keep_alive = kept && !http.peer_eof && http.requests < requests_max && !draining;
        http.request = None;
        if keep_alive {
            http.idle_since_ms = ctx.now_ms;
        } else {
            http.closed_ms = Some(ctx.now_ms);
        }
        // A long poll's subscription ends with its answer.
        match self.subscription.as_mut() {
            Some(stream) if stream.in_flight() => stream.ended = true,
            _ => self.subscription = None,
        }
        self.send(api::response(message, keep_alive), ctx);
        if keep_alive {
            // What the client sent meanwhile (its next request) is read now.
            ctx.read_again.push(self.token());
        } else {
            self.closing = true;
            self.mark_dirty(ctx);
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
            if let Some(http) = self.http.as_mut() {
                http.closed_ms.get_or_insert(ctx.now_ms);
            }
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
            Some(http) => {
                if !http.write_shut {
                    http.write_shut = true;
                    let _ = self.stream.shutdown(Shutdown::Write);
                }
                http.peer_eof
            }
        }
    }

    /// Whether the connection is over its time: on the binary port, not authenticated within
    /// `handshake_timeout_ms` of its accept; on the HTTP form, a request's body not read within
    /// `handshake_timeout_ms` of its head, no new request `api_idle_timeout_ms` after the last
    /// answer, or the last answer queued `close_timeout_ms` ago without the client closing.
    pub fn timed_out(&self, now_ms: u64, config: &Config) -> bool {
        let Some(http) = self.http.as_ref() else {
            let handshake_over =
                now_ms >= self.accepted_ms.saturating_add(config.handshake_timeout_ms);
            return self.service.is_none() && handshake_over;
        };
        if self.closing {
            let closed_ms = http.closed_ms.unwrap_or(http.idle_since_ms);
            return now_ms >= closed_ms.saturating_add(config.close_timeout_ms);
        }
        match &http.request {
            Some(request) if !request.dispatched => {
                now_ms >= request.head_ms.saturating_add(config.handshake_timeout_ms)
            }
            // Answered in time by `on_tick`.
            Some(_) => false,
            None => {
                now_ms
                    >= http
                        .idle_since_ms
                        .saturating_add(config.api_idle_timeout_ms)
            }
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
