//! One client connection's I/O: its socket, the bytes of a partial frame if it holds one, its
//! outbound queue, and the turn's bookkeeping (dirty, read again). What the bytes mean is the
//! [`Connection`]'s business (net::ws, without I/O); what the messages of `/ws` mean is the
//! [`App`]'s.
//!
//! A session owns no read buffer: the shard reads into its own buffer and lends it here. Only
//! a session whose read ended inside a frame (or an HTTP head) keeps those bytes, in
//! `inbound`; when they are consumed the allocation is freed, so an idle session is this
//! struct (at most 136 bytes) plus its socket.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use bytes::Bytes;
use chinwag_protocol::ErrorCode;
use mio::net::TcpStream;
use mio::Token;

use super::app::{App, Link};
use super::context::Context;
use super::outbox::{self, Outbox};
use super::service::HttpHandover;
use crate::bus::SessionRef;
use crate::net::api;
use crate::net::http::{self, Endpoint};
use crate::net::web;
use crate::net::ws::connection::{CloseReason, Connection, Event, Timer};
use crate::net::ws::frame::{self, Opcode};
use crate::operator::metrics;

/// Reads one session may do in one loop turn before the shard moves on to others; the rest
/// waits for the next turn, so a fast sender cannot starve its neighbours.
const READS_PER_TURN: usize = 16;

/// Up to this many carried bytes (a partial frame or HTTP head) are copied in front of the
/// shard's read buffer and read together with the next bytes; a bigger partial frame is
/// completed by reading straight into the session's own buffer instead.
pub const CARRY_BYTES_MAX: usize = 16 * 1024;
const _: () = assert!(http::HEAD_BYTES_MAX < CARRY_BYTES_MAX);

pub struct Session {
    stream: TcpStream,
    slot: u32,
    generation: u32,
    /// The protocol state: HTTP, WebSocket, closing; timers and rate limit.
    conn: Connection,
    /// Bytes of an incomplete frame or HTTP head; empty and unallocated otherwise.
    inbound: Vec<u8>,
    outbox: Outbox,
    /// Already in the shard's list of sessions to flush this turn.
    dirty: bool,
    write_shut: bool,
    /// The peer's FIN was read while lingering: nothing more will come.
    peer_eof: bool,
    /// The application protocol of `/ws`.
    app: App,
}

/// What one `read` gave.
enum ReadOutcome {
    Data(usize),
    Blocked,
    Gone,
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

impl Session {
    /// The client's address, while the socket still knows it (not after a reset). Not kept in
    /// the session: an idle session stays small.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    pub fn new(stream: TcpStream, slot: usize, generation: u32, now_ms: u64) -> Session {
        Session {
            stream,
            // Fits: the slab never holds more than connections_per_shard_max <= u32::MAX.
            slot: slot as u32,
            generation,
            conn: Connection::new(now_ms),
            inbound: Vec::new(),
            outbox: Outbox::default(),
            dirty: false,
            write_shut: false,
            peer_eof: false,
            app: App::default(),
        }
    }

    /// The address other shards use to send to this session.
    pub fn session_ref(&self, ctx: &Context) -> SessionRef {
        ctx.session_ref(self.slot, self.generation)
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn outbox_bytes(&self) -> usize {
        self.outbox.len_bytes()
    }

    /// Why the connection ended (or will).
    pub fn close_reason(&self) -> CloseReason {
        self.conn.close_reason
    }

    /// The endpoint of an open WebSocket.
    pub fn endpoint(&self) -> Option<Endpoint> {
        self.conn.endpoint()
    }

    /// The application layer, read-only.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Lends the application layer and this session to `f`: the layer acts through the
    /// session (sends, closes) while it is out.
    pub fn with_app<R>(
        &mut self,
        ctx: &mut Context,
        f: impl FnOnce(&mut App, &mut Session, &mut Context) -> R,
    ) -> R {
        let mut app = std::mem::take(&mut self.app);
        // While the layer is out, the session cannot tell who it is, so what the layer queues
        // cannot take the held pushes along itself (Session::queue): they are put ahead of it
        // here. Only for a session that was logged in before: one that logs in now was no
        // recipient of the pushes held so far.
        let queued_before = self.outbox.frame_count();
        let was_logged_in = app.logged_in().is_some();
        let result = f(&mut app, self, ctx);
        self.app = app;
        if was_logged_in && ctx.held.is_holding() && self.outbox.frame_count() > queued_before {
            self.take_held_pushes(queued_before, ctx);
        }
        result
    }

    /// The socket, for a service connection to take over (an API request, handed over).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Reads what the socket has and handles every whole frame in it. `peer_closed` says the
    /// event also reported the peer's FIN, which a short read would otherwise leave unseen.
    /// Returns `true` if the connection is done: closed, or (with `ctx.handover` set) an API
    /// request whose socket the shard hands to a service connection.
    pub fn on_readable(&mut self, rbuf: &mut [u8], peer_closed: bool, ctx: &mut Context) -> bool {
        for _ in 0..READS_PER_TURN {
            if self.conn.lingers() || self.conn.is_done() {
                return self.discard_input(rbuf, ctx);
            }
            let carried = self.inbound.len();
            let (n, asked) = if carried <= CARRY_BYTES_MAX {
                rbuf[..carried].copy_from_slice(&self.inbound);
                let asked = rbuf.len() - carried;
                let n = match read_some(&mut self.stream, &mut rbuf[carried..]) {
                    ReadOutcome::Data(n) => n,
                    ReadOutcome::Blocked => return false,
                    ReadOutcome::Gone => return true,
                };
                self.on_read(n, ctx);
                let data = &mut rbuf[..carried + n];
                let consumed = self.on_bytes(data, ctx);
                if ctx.handover.is_some() {
                    return true;
                }
                let rest = &data[consumed..];
                if rest.is_empty() || !self.conn.reads_input() {
                    self.inbound = Vec::new();
                } else {
                    self.inbound.clear();
                    self.inbound.extend_from_slice(rest);
                }
                (n, asked)
            } else {
                // A big frame in progress: read only what it still lacks, straight into the
                // session's buffer, so it is not copied in and out of the shard's buffer.
                let asked = self.missing_bytes(ctx).clamp(1, rbuf.len());
                let mut buf = std::mem::take(&mut self.inbound);
                buf.resize(carried + asked, 0);
                let outcome = read_some(&mut self.stream, &mut buf[carried..]);
                let n = match outcome {
                    ReadOutcome::Data(n) => n,
                    ReadOutcome::Blocked => {
                        buf.truncate(carried);
                        self.inbound = buf;
                        return false;
                    }
                    ReadOutcome::Gone => return true,
                };
                buf.truncate(carried + n);
                self.on_read(n, ctx);
                let consumed = self.on_bytes(&mut buf, ctx);
                if ctx.handover.is_some() {
                    return true;
                }
                if consumed < buf.len() && self.conn.reads_input() {
                    buf.drain(..consumed);
                    self.inbound = buf;
                }
                (n, asked)
            };
            // A short read means the socket's receive queue is empty; with edge-triggered
            // readiness, bytes arriving later raise a new event, so skip the read that would
            // only say WouldBlock. Not so if the FIN is already in: read on to see the EOF.
            if n < asked && !peer_closed {
                return false;
            }
        }
        ctx.read_again.push(Token(self.slot as usize));
        false
    }

    fn on_read(&mut self, n: usize, ctx: &mut Context) {
        metrics::add(&ctx.metrics().bytes_in, n as u64);
        self.conn.on_input(ctx.now_ms);
    }

    /// Bytes still missing from the frame (or the WeChat callback's body) that starts
    /// `inbound`.
    fn missing_bytes(&self, ctx: &Context) -> usize {
        if self.conn.in_http() {
            return http::missing_bytes(&self.inbound);
        }
        match frame::parse_header(&self.inbound, ctx.ws_limits.frame_bytes_max) {
            Ok(Some(header)) => header.frame_len().saturating_sub(self.inbound.len()),
            // Cannot happen: more than CARRY_BYTES_MAX bytes hold a whole header, and it was
            // accepted when they were carried. Any positive answer keeps reading safely.
            _ => 1,
        }
    }

    /// In closing: reads and drops whatever the peer still sends until its EOF, so closing the
    /// socket does not turn into a reset that could destroy our close frame in flight.
    /// Returns `true` if the connection is done.
    fn discard_input(&mut self, rbuf: &mut [u8], ctx: &mut Context) -> bool {
        self.inbound = Vec::new();
        for _ in 0..READS_PER_TURN {
            match read_some(&mut self.stream, rbuf) {
                ReadOutcome::Data(n) => metrics::add(&ctx.metrics().bytes_in, n as u64),
                ReadOutcome::Blocked => return false,
                ReadOutcome::Gone => {
                    // The peer may have only shut its side: send what is queued (an HTTP
                    // answer, say) before dropping the connection.
                    self.peer_eof = true;
                    return self.flush(ctx);
                }
            }
        }
        ctx.read_again.push(Token(self.slot as usize));
        false
    }

    /// Handles the bytes read so far; returns how many were consumed. The rest is an
    /// incomplete HTTP head or frame.
    fn on_bytes(&mut self, data: &mut [u8], ctx: &mut Context) -> usize {
        let mut pos = 0;
        while let Some((used, event)) = self.conn.read(&mut data[pos..], ctx.now_ms, &ctx.ws_limits)
        {
            pos += used;
            if event.is_frame() {
                metrics::add(&ctx.metrics().frames_in, 1);
            }
            match event {
                Event::Request(request) => {
                    if self.on_request(request, &data[pos..], ctx) {
                        return data.len();
                    }
                }
                Event::Frame => {}
                Event::Message(opcode, payload) => self.on_message(opcode, &payload, ctx),
                Event::RateLimited(opcode, payload) => {
                    // Over messages_per_s_max: on /echo the message is dropped; on /ws it is
                    // refused with `error` `rate_limited`.
                    metrics::add(&ctx.metrics().messages_rate_limited, 1);
                    if self.conn.endpoint() == Some(Endpoint::App) {
                        self.with_app(ctx, |app, session, ctx| {
                            app.on_rate_limited(opcode, &payload, session, ctx)
                        });
                    }
                }
                Event::Reply(frame) => self.send(frame, ctx),
                Event::Closing(frame) | Event::Invalid(frame) => self.on_closing(frame, ctx),
            }
        }
        if self.conn.reads_input() {
            pos
        } else {
            data.len()
        }
    }

    /// Answers an HTTP request; an upgrade makes the connection a WebSocket. Returns `true`
    /// if the request is an API request to hand over (with `rest`, the input after its head,
    /// in `ctx.handover`).
    fn on_request(&mut self, request: http::Request, rest: &[u8], ctx: &mut Context) -> bool {
        // Only the parser's own answers can say the request was malformed (a 400 from
        // /dev/token is about a well-formed request's query).
        let from_parser = matches!(request, http::Request::Respond(_));
        let answer = match request {
            // A node that is draining takes no new WebSocket: the client should go elsewhere.
            http::Request::Upgrade { .. } if ctx.is_draining() => http::draining(),
            http::Request::Wechat(callback) => {
                let answer = wechat_callback(&callback, ctx);
                self.queue(answer, ctx);
                self.conn.answered(false, ctx.now_ms);
                return false;
            }
            http::Request::Upgrade { endpoint, key } => {
                self.queue(http::switching_protocols(&key), ctx);
                self.conn.upgrade(endpoint, ctx.now_ms);
                return false;
            }
            http::Request::Healthz { head } => {
                let answer = if ctx.is_draining() {
                    http::draining()
                } else if let Some(cluster) = &ctx.node.cluster {
                    // In a cluster, health includes the node's view of it: Redis reachable,
                    // the route subscription delivering (docs/cluster.md, "Health").
                    let (healthy, detail) = cluster.healthz(ctx.unix_ms);
                    let (status, first) = if healthy {
                        ("200 OK", "ok")
                    } else {
                        ("503 Service Unavailable", "unhealthy")
                    };
                    http::response(
                        status,
                        "text/plain",
                        format!("{first}\n{detail}").as_bytes(),
                    )
                } else {
                    http::response("200 OK", "text/plain", b"ok\n")
                };
                if head {
                    http::head_only(answer)
                } else {
                    answer
                }
            }
            http::Request::Metrics => http::response(
                "200 OK",
                "text/plain; version=0.0.4",
                ctx.render_metrics().as_bytes(),
            ),
            http::Request::Asset(asset) => web::serve(asset),
            http::Request::DevToken(request) => web::dev_token(
                &request,
                ctx.node.config.web_dev_tokens,
                &ctx.node.jwt_secret,
                ctx.unix_ms / 1000,
            ),
            http::Request::Api(head) => match api_refusal(ctx) {
                Some(answer) => answer,
                None => {
                    let rest = rest.to_vec();
                    ctx.handover = Some(Box::new(HttpHandover { head: *head, rest }));
                    return true;
                }
            },
            http::Request::Respond(answer) => answer,
        };
        let malformed = from_parser
            && (answer.starts_with(b"HTTP/1.1 400") || answer.starts_with(b"HTTP/1.1 431"));
        self.queue(answer, ctx);
        self.conn.answered(malformed, ctx.now_ms);
        false
    }

    /// A whole message within the rate limit (text already checked to be UTF-8).
    fn on_message(&mut self, opcode: Opcode, payload: &[u8], ctx: &mut Context) {
        match self.conn.endpoint() {
            Some(Endpoint::Echo) => self.send(frame::encode(opcode, payload), ctx),
            Some(Endpoint::App) => self.with_app(ctx, |app, session, ctx| {
                app.on_message(opcode, payload, session, ctx)
            }),
            None => {}
        }
    }

    /// The connection started closing: queue its close frame, if any, and get flushed.
    fn on_closing(&mut self, frame: Option<Bytes>, ctx: &mut Context) {
        match frame {
            Some(frame) => {
                metrics::add(&ctx.metrics().frames_out, 1);
                self.queue(frame, ctx);
            }
            None => self.mark_dirty(ctx),
        }
    }

    /// Queues one encoded server frame (shared `Bytes`: a frame for many sessions is encoded
    /// once). Written at the end of the loop turn, together with everything else the turn
    /// queued for this session. A session over `send_queue_bytes_max` is closed with 1008 and
    /// its queue dropped, so a reader that falls behind cannot hold memory.
    pub fn send(&mut self, frame: Bytes, ctx: &mut Context) {
        if self.admit(&frame, ctx) {
            metrics::add(&ctx.metrics().frames_out, 1);
            self.queue(frame, ctx);
        }
    }

    /// Queues pushes (messages of others, notifies: [`crate::bus::Fanout`]s' frames): `frames`
    /// whole frames in `bytes`, within the same limits as [`Session::send`]. With
    /// `push_flush_delay_ms` set the shard calls this at its push flush, with every push that
    /// came for this session meanwhile in one buffer (outbox::HeldPushes).
    pub fn push(&mut self, bytes: Bytes, frames: u64, ctx: &mut Context) {
        if self.admit(&bytes, ctx) {
            metrics::add(&ctx.metrics().frames_out, frames);
            self.queue(bytes, ctx);
        }
    }

    /// The shard holds pushes for this session and something else is queued for it (a reply,
    /// a close frame): the held pushes go first, in the outbox ahead of the frame queued
    /// `at` (everything queued before them stays ahead), so the reply does not overtake them.
    /// Returns `false` if they overflowed the send queue and closed the session.
    fn take_held_pushes(&mut self, at: usize, ctx: &mut Context) -> bool {
        let Some((uid, device, _, encoding)) = self.app.logged_in() else {
            return true;
        };
        let Some((held, frames)) =
            ctx.held
                .take_for(self.slot, self.generation, uid, device, encoding)
        else {
            return true;
        };
        // A session that is closing is queueing its close frame right now (nothing else is
        // queued once closing): the held pushes go ahead of it, as they would have been in
        // its outbox already, unless they do not fit; then the close frame goes alone.
        if self.conn.is_closing() {
            if self.outbox.len_bytes() + held.len() > ctx.node.config.send_queue_bytes_max {
                return true;
            }
        } else if !self.within_limit(held.len(), ctx) {
            return false;
        }
        metrics::add(&ctx.metrics().frames_out, frames);
        metrics::add(&ctx.metrics().send_queue_bytes, held.len() as u64);
        self.outbox.insert(at, held);
        self.mark_dirty(ctx);
        true
    }

    /// Whether `frame` may be queued: the session is a WebSocket, and its queue stays within
    /// `send_queue_bytes_max`. Over it, the queue is dropped and the session closed with 1008.
    fn admit(&mut self, frame: &Bytes, ctx: &mut Context) -> bool {
        self.conn.endpoint().is_some() && self.within_limit(frame.len(), ctx)
    }

    /// Whether `len` more bytes keep the queue within `send_queue_bytes_max`. Over it, the
    /// queue is dropped and the session closed with 1008.
    fn within_limit(&mut self, len: usize, ctx: &mut Context) -> bool {
        if self.outbox.len_bytes() + len > ctx.node.config.send_queue_bytes_max {
            let dropped = self.outbox.clear();
            metrics::sub(&ctx.metrics().send_queue_bytes, dropped as u64);
            self.close(
                frame::CLOSE_POLICY,
                "send queue full",
                CloseReason::SendQueueFull,
                ctx,
            );
            return false;
        }
        true
    }

    /// Queues bytes to be written at the end of this loop turn, behind the pushes the shard
    /// holds for this session.
    fn queue(&mut self, bytes: Bytes, ctx: &mut Context) {
        if ctx.held.is_holding() && !self.take_held_pushes(self.outbox.frame_count(), ctx) {
            // The held pushes overflowed the send queue: the session is closing, its close
            // frame is queued, and nothing may follow it.
            return;
        }
        metrics::add(&ctx.metrics().send_queue_bytes, bytes.len() as u64);
        self.outbox.push(bytes);
        self.mark_dirty(ctx);
    }

    fn mark_dirty(&mut self, ctx: &mut Context) {
        if !self.dirty {
            self.dirty = true;
            ctx.dirty.push(Token(self.slot as usize));
        }
    }

    /// Starts the close handshake: queues a close frame with `code`; no frame is sent after it.
    pub fn close(&mut self, code: u16, reason: &str, why: CloseReason, ctx: &mut Context) {
        if self.conn.is_closing() {
            return;
        }
        let frame = self.conn.close(code, reason, why, ctx.now_ms);
        self.on_closing(frame, ctx);
    }

    /// Writes what is queued, in as few `writev` calls as the socket allows.
    /// Returns `true` if the connection is done.
    pub fn flush(&mut self, ctx: &mut Context) -> bool {
        // The socket is written now anyway: pushes held for it leave in the same write (after
        // what is queued: they came after it, or a reply would have taken them along). In chat,
        // where each push is its own run, this saves the flush its own write to this socket.
        // Before `dirty` is cleared: taking them marks the session dirty, and a session marked
        // dirty here would never be listed again.
        if ctx.held.is_holding() && !self.conn.is_closing() {
            self.take_held_pushes(self.outbox.frame_count(), ctx);
        }
        self.dirty = false;
        while !self.outbox.is_empty() {
            let mut slices = outbox::empty_slices();
            let n = self.outbox.slices(&mut slices);
            let total: usize = slices[..n].iter().map(|s| s.len()).sum();
            // One frame (the common case) goes out with send(2): the same single system
            // call, without the iovec import and file-layer checks of writev(2).
            let result = if n == 1 {
                self.stream.write(&slices[0])
            } else {
                self.stream.write_vectored(&slices[..n])
            };
            let written = match result {
                Ok(0) => return true,
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            };
            self.outbox.advance(written);
            let m = ctx.metrics();
            metrics::add(&m.bytes_out, written as u64);
            metrics::sub(&m.send_queue_bytes, written as u64);
            if written < total {
                // The socket's send buffer is full; a writable event will come when it drains.
                return false;
            }
        }
        if self.conn.is_done() {
            return true;
        }
        if self.conn.lingers() {
            if self.peer_eof {
                return true;
            }
            if !self.write_shut {
                self.write_shut = true;
                // Our last byte is out: tell the peer with a FIN, then wait for its EOF.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        false
    }

    /// Whether a writable event has work to do.
    pub fn wants_flush(&self) -> bool {
        !self.outbox.is_empty() || self.conn.is_done() || self.conn.lingers()
    }

    /// Checks this session's timeout at `ctx.now_ms`. Returns `true` if the connection is done.
    pub fn on_timer(&mut self, ctx: &mut Context) -> bool {
        let timer = self.conn.on_timer(ctx.now_ms, &ctx.ws_limits);
        self.on_timer_outcome(timer, ctx)
    }

    /// The node is shutting down. Returns `true` if the connection is done.
    pub fn on_drain(&mut self, ctx: &mut Context) -> bool {
        let timer = self.conn.on_drain(ctx.now_ms);
        self.on_timer_outcome(timer, ctx)
    }

    /// Returns `true` if the connection is done.
    fn on_timer_outcome(&mut self, timer: Timer, ctx: &mut Context) -> bool {
        match timer {
            Timer::Keep => false,
            Timer::Close(frame) => {
                self.on_closing(Some(frame), ctx);
                false
            }
            Timer::Drop => true,
        }
    }
}

impl Link for Session {
    fn send(&mut self, ws_message: Bytes, ctx: &mut Context) {
        Session::send(self, ws_message, ctx);
    }

    fn close(&mut self, code: u16, reason: &str, why: CloseReason, ctx: &mut Context) {
        Session::close(self, code, reason, why, ctx);
    }

    fn session_ref(&self, ctx: &Context) -> SessionRef {
        Session::session_ref(self, ctx)
    }

    fn endpoint(&self) -> Option<Endpoint> {
        Session::endpoint(self)
    }
}

/// The answer that refuses an API request here rather than handing it over: the node is
/// draining, or the shard serves `api_requests_per_shard_max` already.
fn api_refusal(ctx: &Context) -> Option<Bytes> {
    let text = if ctx.is_draining() {
        "the node is draining"
    } else if ctx.api_requests_open >= ctx.node.config.api_requests_per_shard_max {
        "too many API requests on this shard at once; retry"
    } else {
        return None;
    };
    Some(api::error_response(ErrorCode::Unavailable, text))
}

/// Answers a WeChat callback through the channel's endpoint; a customer's message goes to its
/// shop's owner to be stored and dispatched. The answer does not wait for the store: WeChat
/// wants one within 5 s, and a retried push is stored once by its cmid.
fn wechat_callback(callback: &http::WechatRequest, ctx: &mut Context) -> bytes::Bytes {
    let Some(channel) = ctx.node.wechat.clone() else {
        return http::not_found();
    };
    let answer = if callback.body_too_large {
        channel.endpoint.too_large(&callback.path)
    } else {
        let (answer, inbound) = channel.endpoint.handle(
            &callback.method,
            &callback.path,
            &callback.query,
            &callback.body,
        );
        if let Some(inbound) = inbound {
            let msg = crate::bus::BusMsg::WechatInbound(Box::new(inbound));
            if let Err(unrouted) = ctx.post_to_owner(msg) {
                // Only in a cluster: the node of the shop's partition is down. WeChat retries
                // a push it got no answer for; this one was answered, so it is lost.
                tracing::warn!(why = unrouted.text, "wechat message dropped");
            }
        }
        answer
    };
    http::response(
        http::status_line(answer.status),
        "text/plain",
        answer.body.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use chinwag_protocol::token::{self, Claims};
    use chinwag_protocol::{Uid, UidKind};

    use super::*;
    use crate::bus::post::PostOffice;
    use crate::bus::{BusMsg, Fanout};
    use crate::operator::config::Config;
    use crate::operator::NodeState;

    const SECRET: &[u8] = b"push-flush-secret-push-flush-secret";

    /// A one-shard node on an ephemeral port, and a client logged in on it as `uid` (JSON),
    /// past its `login_ok`. The session is slot 0, generation 1: the shard's first.
    struct Node {
        node: Arc<NodeState>,
        office: Arc<PostOffice>,
        thread: std::thread::JoinHandle<io::Result<()>>,
        client: std::net::TcpStream,
        _dir: tempfile::TempDir,
    }

    impl Node {
        fn start(config: Config, uid: Uid) -> Node {
            let crate::shard::TestShard {
                node,
                office,
                thread,
                mut client,
                _dir: dir,
            } = crate::shard::TestShard::start(config, SECRET);
            let claims = Claims {
                uid,
                shop: None,
                exp: crate::logic::unix_ms() / 1000 + 3600,
            };
            let login = format!(
                r#"{{"op":"login","req":1,"token":"{}","device":"web"}}"#,
                token::mint(SECRET, &claims)
            );
            // A client frame must be masked; a zero key leaves the payload as it is.
            let len = u16::try_from(login.len()).unwrap().to_be_bytes();
            let mut frame = vec![0x81, 0x80 | 126, len[0], len[1], 0, 0, 0, 0];
            frame.extend_from_slice(login.as_bytes());
            client.write_all(&frame).unwrap();
            let mut node = Node {
                node,
                office,
                thread,
                client,
                _dir: dir,
            };
            let reply = node.read_text();
            assert!(reply.contains("login_ok"), "{reply}");
            node
        }

        /// The payload of the next server frame, which must be an unfragmented text frame.
        fn read_text(&mut self) -> String {
            let mut head = [0u8; 2];
            self.client.read_exact(&mut head).unwrap();
            assert_eq!(head[0], 0x81, "a whole text frame");
            let len = match head[1] {
                126 => {
                    let mut len = [0u8; 2];
                    self.client.read_exact(&mut len).unwrap();
                    usize::from(u16::from_be_bytes(len))
                }
                len => usize::from(len),
            };
            let mut payload = vec![0u8; len];
            self.client.read_exact(&mut payload).unwrap();
            String::from_utf8(payload).unwrap()
        }

        fn post(&self, msg: BusMsg) {
            self.office.mailbox(0).send(msg).unwrap();
        }

        fn stop(self) {
            self.node.start_drain();
            self.office.wake_all();
            drop(self.client);
            self.thread.join().unwrap().unwrap();
        }
    }

    fn push(uid: Uid, text: &str) -> BusMsg {
        let frame = frame::encode(Opcode::Text, text.as_bytes());
        BusMsg::Push(Arc::new(Fanout {
            users: [uid].into_iter().collect(),
            except: None,
            json: frame.clone(),
            binary: frame,
        }))
    }

    /// The first session of the shard (slot 0, generation 1).
    fn first_session() -> SessionRef {
        SessionRef {
            node: 1,
            shard: 0,
            slot: 0,
            generation: 1,
        }
    }

    /// With a push flush delay far longer than the test may run, a reply to the client still
    /// leaves at once, and the pushes held before it go out ahead of it, in order.
    #[test]
    fn held_pushes_leave_in_order_ahead_of_a_reply_that_is_not_held() {
        let uid = Uid::new(UidKind::Buyer, 7);
        let config = Config {
            // An hour: were the reply held too, the read below would fail.
            push_flush_delay_ms: 3_600_000,
            ..Config::default()
        };
        let mut node = Node::start(config, uid);
        node.post(push(uid, "push 1"));
        node.post(push(uid, "push 2"));
        node.post(BusMsg::Deliver {
            to: first_session(),
            ws_message: frame::encode(Opcode::Text, b"reply"),
        });
        assert_eq!(node.read_text(), "push 1");
        assert_eq!(node.read_text(), "push 2");
        assert_eq!(node.read_text(), "reply");
        node.stop();
    }

    /// A push that comes after a reply, while the reply waits to be written, leaves in the
    /// same write; and the session is written again for the next reply (a regression: taking
    /// the held pushes in the flush left the session marked dirty, so it was never written
    /// again).
    #[test]
    fn a_session_written_with_its_held_pushes_is_written_again_later() {
        let uid = Uid::new(UidKind::Buyer, 10);
        let config = Config {
            push_flush_delay_ms: 3_600_000,
            ..Config::default()
        };
        let mut node = Node::start(config, uid);
        // Fails the test rather than hanging it if a frame never comes.
        node.client
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let reply = |text: &str| BusMsg::Deliver {
            to: first_session(),
            ws_message: frame::encode(Opcode::Text, text.as_bytes()),
        };
        node.post(reply("reply 1"));
        node.post(push(uid, "push 1"));
        assert_eq!(node.read_text(), "reply 1");
        // Whether "push 1" came in reply 1's turn (and left with it) or in a later one (and
        // is taken along by reply 2), it comes before reply 2.
        node.post(reply("reply 2"));
        assert_eq!(node.read_text(), "push 1");
        assert_eq!(node.read_text(), "reply 2");
        node.stop();
    }

    /// A session that is kicked while pushes are held for it gets them first, then `kicked`,
    /// then the close frame (the first version of held runs dropped the pushes here, and on a
    /// drain the close frame).
    #[test]
    fn held_pushes_leave_ahead_of_a_kick_and_its_close_frame() {
        let uid = Uid::new(UidKind::Buyer, 9);
        let config = Config {
            push_flush_delay_ms: 3_600_000,
            ..Config::default()
        };
        let mut node = Node::start(config, uid);
        node.post(push(uid, "push 1"));
        node.post(push(uid, "push 2"));
        node.post(BusMsg::Kick {
            session: first_session(),
            by_service: true,
        });
        assert_eq!(node.read_text(), "push 1");
        assert_eq!(node.read_text(), "push 2");
        assert!(node.read_text().contains("kicked"));
        let mut head = [0u8; 2];
        node.client.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x88, "the close frame");
        node.stop();
    }

    /// Held pushes are written when the shard's push flush is due, with no other traffic to
    /// carry them, and in order.
    #[test]
    fn held_pushes_are_written_by_the_shards_flush() {
        let uid = Uid::new(UidKind::Buyer, 8);
        let config = Config {
            push_flush_delay_ms: 5,
            ..Config::default()
        };
        let mut node = Node::start(config, uid);
        for i in 0..20 {
            node.post(push(uid, &format!("push {i}")));
        }
        for i in 0..20 {
            assert_eq!(node.read_text(), format!("push {i}"));
        }
        node.stop();
    }

    #[test]
    fn idle_session_is_small() {
        // What an idle connection costs in user space is this struct in the slab (no buffers);
        // docs/benchmarks.md measures ~134 bytes of RSS per idle connection. The login state
        // is boxed, so it adds one pointer here.
        let size = std::mem::size_of::<Session>();
        assert!(size <= 136, "Session is {size} bytes");
    }
}
