//! One client connection: its socket, where it is in its life (HTTP request, open WebSocket,
//! closing), the bytes of a partial frame if it holds one, a message being reassembled, and
//! its outbound queue.
//!
//! A session owns no read buffer: the shard reads into its own buffer and lends it here. Only
//! a session whose read ended inside a frame (or an HTTP head) keeps those bytes, in
//! `inbound`; when they are consumed the allocation is freed, so an idle session is this
//! struct (at most 136 bytes) plus its socket.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use bytes::Bytes;
use mio::net::TcpStream;
use mio::Token;

use super::mailbox::SessionRef;
use super::outbox::{self, Outbox};
use super::Context;
use crate::net::frame::{self, CloseRequest, FrameError, Opcode, Utf8Check};
use crate::net::http::{self, Endpoint, Parsed, Route};
use crate::net::web;
use crate::ops::metrics::{self, CloseReason};

mod protocol;
pub use protocol::CLOSE_KICKED;

/// Reads one session may do in one loop turn before the shard moves on to others; the rest
/// waits for the next turn, so a fast sender cannot starve its neighbours.
const READS_PER_TURN: usize = 16;

/// Up to this many carried bytes (a partial frame or HTTP head) are copied in front of the
/// shard's read buffer and read together with the next bytes; a bigger partial frame is
/// completed by reading straight into the session's own buffer instead.
pub const CARRY_BYTES_MAX: usize = 16 * 1024;
const _: () = assert!(http::HEAD_BYTES_MAX < CARRY_BYTES_MAX);

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading an HTTP request head.
    Http,
    /// An open WebSocket on an endpoint.
    Open(Endpoint),
    /// Nothing more will be sent but what is queued. Every closing connection is dropped after
    /// `close_timeout_ms` at the latest.
    Closing(Closing),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    /// We sent a close frame first and read on for the peer's close frame.
    AwaitingClose,
    /// Both close frames are exchanged: drop the connection once the queue is written (the
    /// server closes TCP first, RFC 6455 §7.1.1).
    Done,
    /// A final HTTP answer, or a peer that broke framing while we awaited its close frame:
    /// after the queue is written, shut the socket for writing and read (dropping the bytes)
    /// until the peer's EOF, so closing never turns into a reset that destroys our last bytes
    /// in flight.
    Linger,
}

/// A fragmented message being put together.
struct Reassembly {
    opcode: Opcode,
    payload: Vec<u8>,
    utf8: Utf8Check,
}

pub struct Session {
    stream: TcpStream,
    slot: u32,
    generation: u32,
    phase: Phase,
    /// Bytes of an incomplete frame or HTTP head; empty and unallocated otherwise.
    inbound: Vec<u8>,
    message: Option<Box<Reassembly>>,
    outbox: Outbox,
    /// When the current timeout started: accept (handshake timeout), the last read (idle
    /// timeout), or the start of closing (close timeout), in shard milliseconds.
    timer_ms: u64,
    rate_window_ms: u64,
    rate_count: u32,
    pub(super) close_reason: CloseReason,
    /// Already in the shard's list of sessions to flush this turn.
    dirty: bool,
    /// Who the session is, once it sent `login` (boxed: most of a session's life is idle, and
    /// an idle session should stay small).
    login: Option<Box<protocol::LoginState>>,
    write_shut: bool,
    /// The peer's FIN was read while lingering: nothing more will come.
    peer_eof: bool,
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
    pub fn new(stream: TcpStream, slot: usize, generation: u32, now_ms: u64) -> Session {
        Session {
            stream,
            // Fits: the slab never holds more than connections_per_shard_max <= u32::MAX.
            slot: slot as u32,
            generation,
            phase: Phase::Http,
            inbound: Vec::new(),
            message: None,
            outbox: Outbox::default(),
            timer_ms: now_ms,
            rate_window_ms: now_ms,
            rate_count: 0,
            close_reason: CloseReason::PeerGone,
            dirty: false,
            write_shut: false,
            login: None,
            peer_eof: false,
        }
    }

    /// The address other shards use to send to this session.
    pub fn session_ref(&self, shard: u32) -> SessionRef {
        SessionRef {
            shard,
            slot: self.slot,
            generation: self.generation,
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn outbox_bytes(&self) -> usize {
        self.outbox.len_bytes()
    }

    /// Reads what the socket has and handles every whole frame in it. `peer_closed` says the
    /// event also reported the peer's FIN, which a short read would otherwise leave unseen.
    /// Returns `true` if the connection is done.
    pub fn on_readable(&mut self, rbuf: &mut [u8], peer_closed: bool, ctx: &mut Context) -> bool {
        for _ in 0..READS_PER_TURN {
            if matches!(self.phase, Phase::Closing(Closing::Linger | Closing::Done)) {
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
                let rest = &data[consumed..];
                if rest.is_empty() || !self.reads_frames() {
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
                if consumed < buf.len() && self.reads_frames() {
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

    /// Whether incoming bytes are still parsed as frames.
    fn reads_frames(&self) -> bool {
        matches!(
            self.phase,
            Phase::Http | Phase::Open(_) | Phase::Closing(Closing::AwaitingClose)
        )
    }

    fn on_read(&mut self, n: usize, ctx: &mut Context) {
        metrics::add(&ctx.metrics().bytes_in, n as u64);
        if let Phase::Open(_) = self.phase {
            self.timer_ms = ctx.now_ms;
        }
    }

    /// Bytes still missing from the frame that starts `inbound`.
    fn missing_bytes(&self, ctx: &Context) -> usize {
        match frame::parse_header(&self.inbound, ctx.limits.frame_bytes_max) {
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
        if self.phase == Phase::Http {
            match http::parse(data, ctx.limits.enable_echo) {
                Parsed::Partial => return 0,
                Parsed::Complete { route, head_len } => {
                    pos = head_len;
                    if !self.on_request(route, ctx) {
                        return data.len();
                    }
                }
            }
        }
        loop {
            if !self.reads_frames() {
                return data.len();
            }
            let rest = &mut data[pos..];
            let header = match frame::parse_header(rest, ctx.limits.frame_bytes_max) {
                Ok(Some(header)) if header.frame_len() <= rest.len() => header,
                Ok(_) => return pos,
                Err(e) => {
                    self.fail(e, ctx);
                    return data.len();
                }
            };
            let payload = &mut rest[header.header_len..header.frame_len()];
            pos += header.frame_len();
            metrics::add(&ctx.metrics().frames_in, 1);
            if self.phase == Phase::Closing(Closing::AwaitingClose) {
                // Only the peer's close frame matters now; its payload is not checked, the
                // connection ends either way.
                if header.opcode == Opcode::Close {
                    self.phase = Phase::Closing(Closing::Done);
                    self.mark_dirty(ctx);
                }
                continue;
            }
            frame::unmask(payload, header.mask, 0);
            if let Err(e) = self.on_frame(header.opcode, header.fin, payload, ctx) {
                self.fail(e, ctx);
            }
        }
    }

    /// Answers an HTTP request. Returns `true` if the connection is now a WebSocket.
    fn on_request(&mut self, route: Route, ctx: &mut Context) -> bool {
        // Only the parser's own answers can say the request was malformed (a 400 from
        // /dev/token is about a well-formed request's query).
        let from_parser = matches!(route, Route::Respond(_));
        let answer = match route {
            // A node that is draining takes no new WebSocket: the client should go elsewhere.
            Route::Upgrade { .. } if ctx.is_draining() => http::draining(),
            Route::Upgrade { endpoint, key } => {
                self.queue(http::switching_protocols(&key), ctx);
                self.phase = Phase::Open(endpoint);
                self.timer_ms = ctx.now_ms;
                return true;
            }
            Route::Healthz { head } => {
                let answer = if ctx.is_draining() {
                    http::draining()
                } else {
                    http::response("200 OK", "text/plain", b"ok\n")
                };
                if head {
                    http::head_only(answer)
                } else {
                    answer
                }
            }
            Route::Metrics => http::response(
                "200 OK",
                "text/plain; version=0.0.4",
                ctx.render_metrics().as_bytes(),
            ),
            Route::Asset(asset) => web::serve(asset),
            Route::DevToken(request) => web::dev_token(
                &request,
                ctx.node.config.web_dev_tokens,
                &ctx.node.jwt_secret,
                ctx.unix_ms / 1000,
            ),
            Route::Respond(answer) => answer,
        };
        let malformed = from_parser
            && (answer.starts_with(b"HTTP/1.1 400") || answer.starts_with(b"HTTP/1.1 431"));
        self.queue(answer, ctx);
        self.phase = Phase::Closing(Closing::Linger);
        self.timer_ms = ctx.now_ms;
        self.close_reason = if malformed {
            CloseReason::ProtocolError
        } else {
            CloseReason::HttpDone
        };
        false
    }

    /// Handles one whole, unmasked frame.
    fn on_frame(
        &mut self,
        opcode: Opcode,
        fin: bool,
        payload: &[u8],
        ctx: &mut Context,
    ) -> Result<(), FrameError> {
        let message_bytes_max = ctx.limits.message_bytes_max;
        match opcode {
            Opcode::Text | Opcode::Binary => {
                if self.message.is_some() {
                    return Err(FrameError::Protocol);
                }
                if payload.len() > message_bytes_max {
                    return Err(FrameError::TooLarge);
                }
                if fin {
                    if opcode == Opcode::Text {
                        std::str::from_utf8(payload).map_err(|_| FrameError::InvalidUtf8)?;
                    }
                    self.on_message(opcode, payload, ctx);
                } else {
                    let mut message = Box::new(Reassembly {
                        opcode,
                        payload: payload.to_vec(),
                        utf8: Utf8Check::default(),
                    });
                    if opcode == Opcode::Text {
                        message.utf8.feed(&message.payload, false)?;
                    }
                    self.message = Some(message);
                }
            }
            Opcode::Continuation => {
                let message = self.message.as_mut().ok_or(FrameError::Protocol)?;
                if message.payload.len() + payload.len() > message_bytes_max {
                    return Err(FrameError::TooLarge);
                }
                message.payload.extend_from_slice(payload);
                if message.opcode == Opcode::Text {
                    message.utf8.feed(&message.payload, fin)?;
                }
                if fin {
                    if let Some(message) = self.message.take() {
                        self.on_message(message.opcode, &message.payload, ctx);
                    }
                }
            }
            Opcode::Ping => self.send(frame::encode(Opcode::Pong, payload), ctx),
            Opcode::Pong => {}
            Opcode::Close => {
                let code = match frame::parse_close(payload) {
                    Ok(CloseRequest::Empty) => frame::CLOSE_NORMAL,
                    Ok(CloseRequest::Code(code)) => code,
                    Err(e) => {
                        // A malformed close is still the peer's close: answer with the error
                        // code and end the connection without waiting for another.
                        self.fail(e, ctx);
                        self.phase = Phase::Closing(Closing::Done);
                        return Ok(());
                    }
                };
                self.close(code, "", CloseReason::PeerClosed, ctx);
                // Our reply completes the handshake.
                self.phase = Phase::Closing(Closing::Done);
            }
        }
        Ok(())
    }

    /// A whole message (text already checked to be UTF-8) arrived.
    fn on_message(&mut self, opcode: Opcode, payload: &[u8], ctx: &mut Context) {
        if !self.take_rate_token(ctx) {
            // Over messages_per_s_max: on /echo the message is dropped; on /ws it is refused
            // with `error` `rate_limited`.
            metrics::add(&ctx.metrics().messages_rate_limited, 1);
            if self.phase == Phase::Open(Endpoint::App) {
                self.on_app_rate_limited(opcode, payload, ctx);
            }
            return;
        }
        match self.phase {
            Phase::Open(Endpoint::Echo) => self.send(frame::encode(opcode, payload), ctx),
            Phase::Open(Endpoint::App) => self.on_app_message(opcode, payload, ctx),
            Phase::Http | Phase::Closing(_) => {}
        }
    }

    /// Fixed-window rate limit: at most `messages_per_s_max` messages per one-second window.
    fn take_rate_token(&mut self, ctx: &Context) -> bool {
        let max = ctx.limits.messages_per_s_max;
        if max == 0 {
            return true;
        }
        if ctx.now_ms.saturating_sub(self.rate_window_ms) >= 1000 {
            self.rate_window_ms = ctx.now_ms;
            self.rate_count = 0;
        }
        self.rate_count = self.rate_count.saturating_add(1);
        self.rate_count <= max
    }

    /// Queues one encoded server frame (shared `Bytes`: a frame for many sessions is encoded
    /// once). Written at the end of the loop turn, together with everything else the turn
    /// queued for this session. A session over `send_queue_bytes_max` is closed with 1008 and
    /// its queue dropped, so a reader that falls behind cannot hold memory.
    pub fn send(&mut self, frame: Bytes, ctx: &mut Context) {
        let Phase::Open(_) = self.phase else { return };
        if self.outbox.len_bytes() + frame.len() > ctx.limits.send_queue_bytes_max {
            let dropped = self.outbox.clear();
            metrics::sub(&ctx.metrics().send_queue_bytes, dropped as u64);
            self.close(
                frame::CLOSE_POLICY,
                "send queue full",
                CloseReason::SendQueueFull,
                ctx,
            );
            return;
        }
        metrics::add(&ctx.metrics().frames_out, 1);
        self.queue(frame, ctx);
    }

    fn queue(&mut self, bytes: Bytes, ctx: &mut Context) {
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
        match self.phase {
            Phase::Closing(_) => return,
            Phase::Open(_) => {
                metrics::add(&ctx.metrics().frames_out, 1);
                self.queue(frame::encode_close(code, reason), ctx);
                self.phase = Phase::Closing(Closing::AwaitingClose);
            }
            Phase::Http => {
                self.mark_dirty(ctx);
                self.phase = Phase::Closing(Closing::Linger);
            }
        }
        self.close_reason = why;
        self.timer_ms = ctx.now_ms;
        self.message = None;
    }

    fn fail(&mut self, error: FrameError, ctx: &mut Context) {
        if self.phase == Phase::Closing(Closing::AwaitingClose) {
            // The peer broke framing after our close frame: its close frame cannot be found
            // any more, so stop parsing and wait for its EOF.
            self.phase = Phase::Closing(Closing::Linger);
            self.mark_dirty(ctx);
            return;
        }
        let why = match error {
            FrameError::TooLarge => CloseReason::TooLarge,
            FrameError::Protocol | FrameError::InvalidUtf8 => CloseReason::ProtocolError,
        };
        self.close(error.close_code(), "", why, ctx);
    }

    /// Writes what is queued, in as few `writev` calls as the socket allows.
    /// Returns `true` if the connection is done.
    pub fn flush(&mut self, ctx: &mut Context) -> bool {
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
        match self.phase {
            Phase::Closing(Closing::Done) => return true,
            Phase::Closing(Closing::Linger) if self.peer_eof => return true,
            Phase::Closing(Closing::Linger) if !self.write_shut => {
                self.write_shut = true;
                // Our last byte is out: tell the peer with a FIN, then wait for its EOF.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
            _ => {}
        }
        false
    }

    /// Whether a writable event has work to do.
    pub fn wants_flush(&self) -> bool {
        !self.outbox.is_empty()
            || matches!(self.phase, Phase::Closing(Closing::Done | Closing::Linger))
    }

    /// Checks this session's timeout at `ctx.now_ms`. Returns `true` if the connection is done.
    pub fn on_timer(&mut self, ctx: &mut Context) -> bool {
        let limits = &ctx.limits;
        let elapsed_ms = ctx.now_ms.saturating_sub(self.timer_ms);
        match self.phase {
            Phase::Http if elapsed_ms >= limits.handshake_timeout_ms => {
                self.close_reason = CloseReason::HandshakeTimeout;
                true
            }
            Phase::Open(_) if elapsed_ms >= limits.idle_timeout_ms => {
                self.close(
                    frame::CLOSE_NORMAL,
                    "idle timeout",
                    CloseReason::IdleTimeout,
                    ctx,
                );
                false
            }
            Phase::Closing(_) => elapsed_ms >= limits.close_timeout_ms,
            _ => false,
        }
    }

    /// The node is shutting down. Returns `true` if the connection is done.
    pub fn on_drain(&mut self, ctx: &mut Context) -> bool {
        match self.phase {
            // Still in its request: it gets its answer (503 for an upgrade), as connections
            // accepted during the drain do; the handshake timeout bounds it.
            Phase::Http => false,
            Phase::Open(_) => {
                self.close(
                    frame::CLOSE_GOING_AWAY,
                    "going away",
                    CloseReason::Drain,
                    ctx,
                );
                false
            }
            Phase::Closing(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_session_is_small() {
        // What an idle connection costs in user space is this struct in the slab (no buffers);
        // docs/benchmarks.md measures ~134 bytes of RSS per idle connection. The login state
        // is boxed, so it adds one pointer here.
        let size = std::mem::size_of::<Session>();
        assert!(size <= 136, "Session is {size} bytes");
    }
}
