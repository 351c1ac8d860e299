//! One connection on the client port as a state machine without I/O: the HTTP request, the
//! WebSocket it may become (RFC 6455), and the close handshake.
//!
//! [`Connection`] is given bytes (already read by someone else) and the time; it says what it
//! found as an [`Event`] — a request head, a whole message, bytes to send back — and keeps its
//! phase, a fragmented message being put together, its timers and its rate limit. It never
//! touches a socket or the clock, so every rule below is tested here with plain byte slices.
//!
//! Rules it keeps: client frames must be masked; RSV bits clear (no extension is negotiated);
//! reserved opcodes, fragmented or oversized control frames, a continuation without a started
//! message, or a new message inside a fragmented one close with 1002; text must be UTF-8 (1007),
//! checked as each fragment arrives; a frame or message over its limit closes with 1009. A close
//! frame is answered with the same code (1000 when it has none, 1002 when malformed). After its
//! own close frame the connection reads on only for the peer's close frame.

use std::ops::Deref;

use bytes::Bytes;

use super::frame::{self, CloseRequest, FrameError, Opcode, Utf8Check};
use crate::net::http::{self, Endpoint, Parsed};

/// Why a connection ended; each is a label value of `chinwag_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed the TCP connection or reset it.
    PeerGone,
    /// The peer sent a WebSocket close frame.
    PeerClosed,
    /// A plain HTTP request was answered.
    HttpDone,
    /// The peer broke HTTP or WebSocket rules (400, 1002, 1007).
    ProtocolError,
    /// A frame or message over the size limit (1009).
    TooLarge,
    /// The outbound queue went over its byte limit (1008).
    SendQueueFull,
    HandshakeTimeout,
    IdleTimeout,
    /// The node is shutting down (1001).
    Drain,
    /// A login token was refused (1008).
    Unauthorized,
    /// The device logged in on another connection (4001).
    Kicked,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::PeerGone,
        CloseReason::PeerClosed,
        CloseReason::HttpDone,
        CloseReason::ProtocolError,
        CloseReason::TooLarge,
        CloseReason::SendQueueFull,
        CloseReason::HandshakeTimeout,
        CloseReason::IdleTimeout,
        CloseReason::Drain,
        CloseReason::Unauthorized,
        CloseReason::Kicked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::PeerGone => "peer_gone",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::HttpDone => "http_done",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::TooLarge => "too_large",
            CloseReason::SendQueueFull => "send_queue_full",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Drain => "drain",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::Kicked => "kicked",
        }
    }
}

/// The limits a connection enforces.
#[derive(Clone, Debug)]
pub struct WsLimits {
    /// Serve `/echo`.
    pub enable_echo: bool,
    /// Serve `/wechat/<appid>` (the node has WeChat accounts).
    pub enable_wechat: bool,
    pub frame_bytes_max: usize,
    pub message_bytes_max: usize,
    /// Messages per second; 0 = no limit.
    pub messages_per_s_max: u32,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub close_timeout_ms: u64,
}

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

/// A message's payload: in the caller's buffer when it came in one frame, reassembled
/// otherwise.
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Reassembled(Vec<u8>),
}

impl Deref for Payload<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Borrowed(bytes) => bytes,
            Payload::Reassembled(bytes) => bytes,
        }
    }
}

/// What the connection found in the bytes it was given.
pub enum Event<'a> {
    /// A whole HTTP request head. The owner answers it: [`Connection::upgrade`] after queuing
    /// the 101 answer, or [`Connection::answered`] after queuing any other.
    Request(http::Request),
    /// A whole frame that needs nothing from the owner.
    Frame,
    /// A whole message (a text one is valid UTF-8), within the rate limit.
    Message(Opcode, Payload<'a>),
    /// A whole message over the rate limit.
    RateLimited(Opcode, Payload<'a>),
    /// A frame the connection answers itself (a ping's pong): send it like any other message.
    Reply(Bytes),
    /// A whole frame made the connection close: queue `Some` close frame whatever the queue
    /// holds, then flush.
    Closing(Option<Bytes>),
    /// Bytes that cannot start a frame (a broken header, or one over the size limit): the
    /// connection closes as for [`Event::Closing`], and the bytes are dropped.
    Invalid(Option<Bytes>),
}

impl Event<'_> {
    /// Whether the event stands for one whole frame (for the `frames_in` count).
    pub fn is_frame(&self) -> bool {
        !matches!(self, Event::Request(_) | Event::Invalid(_))
    }
}

/// What the owner should do about a timer or a drain.
#[derive(Debug, PartialEq, Eq)]
pub enum Timer {
    /// Nothing.
    Keep,
    /// Queue this close frame and flush: the close handshake starts.
    Close(Bytes),
    /// Drop the connection now.
    Drop,
}

/// One connection's protocol state.
pub struct Connection {
    phase: Phase,
    message: Option<Box<Reassembly>>,
    /// When the current timeout started: accept (handshake timeout), the last read (idle
    /// timeout), or the start of closing (close timeout), in the caller's milliseconds.
    timer_ms: u64,
    rate_window_ms: u64,
    rate_count: u32,
    /// Why the connection ended (or will): a metrics label.
    pub close_reason: CloseReason,
}

impl Connection {
    /// A connection accepted at `now_ms`, expecting an HTTP request.
    pub fn new(now_ms: u64) -> Connection {
        Connection {
            phase: Phase::Http,
            message: None,
            timer_ms: now_ms,
            rate_window_ms: now_ms,
            rate_count: 0,
            close_reason: CloseReason::PeerGone,
        }
    }

    /// The endpoint of an open WebSocket.
    pub fn endpoint(&self) -> Option<Endpoint> {
        match self.phase {
            Phase::Open(endpoint) => Some(endpoint),
            _ => None,
        }
    }

    /// Whether the connection is still reading its HTTP request (head, and a WeChat
    /// callback's body).
    pub fn in_http(&self) -> bool {
        self.phase == Phase::Http
    }

    /// Whether incoming bytes are still parsed (as an HTTP head or as frames).
    pub fn reads_input(&self) -> bool {
        matches!(
            self.phase,
            Phase::Http | Phase::Open(_) | Phase::Closing(Closing::AwaitingClose)
        )
    }

    /// Both close frames are exchanged: drop the connection once its queue is written.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Closing(Closing::Done)
    }

    /// Closing by lingering: once the queue is written, shut the write side and read until EOF.
    pub fn lingers(&self) -> bool {
        self.phase == Phase::Closing(Closing::Linger)
    }

    /// Bytes arrived at `now_ms`: an open WebSocket is not idle.
    pub fn on_input(&mut self, now_ms: u64) {
        if let Phase::Open(_) = self.phase {
            self.timer_ms = now_ms;
        }
    }

    /// Finds the next item in `data`: returns the bytes it used and what it found, or `None`
    /// when `data` holds no whole item (or input is no longer read).
    pub fn read<'a>(
        &mut self,
        data: &'a mut [u8],
        now_ms: u64,
        limits: &WsLimits,
    ) -> Option<(usize, Event<'a>)> {
        match self.phase {
            Phase::Http => {
                return match http::parse(data, limits.enable_echo, limits.enable_wechat) {
                    Parsed::Partial => None,
                    Parsed::Complete { request, head_len } => {
                        Some((head_len, Event::Request(request)))
                    }
                };
            }
            Phase::Open(_) | Phase::Closing(Closing::AwaitingClose) => {}
            Phase::Closing(_) => return None,
        }
        let header = match frame::parse_header(data, limits.frame_bytes_max) {
            Ok(Some(header)) if header.frame_len() <= data.len() => header,
            Ok(_) => return None,
            Err(e) => return Some((data.len(), Event::Invalid(self.fail(e, now_ms)))),
        };
        let len = header.frame_len();
        let payload = &mut data[header.header_len..len];
        if self.phase == Phase::Closing(Closing::AwaitingClose) {
            // Only the peer's close frame matters now; its payload is not checked, the
            // connection ends either way.
            if header.opcode == Opcode::Close {
                self.phase = Phase::Closing(Closing::Done);
                return Some((len, Event::Closing(None)));
            }
            return Some((len, Event::Frame));
        }
        frame::unmask(payload, header.mask, 0);
        let event = match self.on_frame(header.opcode, header.fin, payload, now_ms, limits) {
            Ok(event) => event,
            Err(e) => Event::Closing(self.fail(e, now_ms)),
        };
        Some((len, event))
    }

    /// Handles one whole, unmasked frame.
    fn on_frame<'a>(
        &mut self,
        opcode: Opcode,
        fin: bool,
        payload: &'a [u8],
        now_ms: u64,
        limits: &WsLimits,
    ) -> Result<Event<'a>, FrameError> {
        let message_bytes_max = limits.message_bytes_max;
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
                    return Ok(self.message(opcode, Payload::Borrowed(payload), now_ms, limits));
                }
                let mut message = Box::new(Reassembly {
                    opcode,
                    payload: payload.to_vec(),
                    utf8: Utf8Check::default(),
                });
                if opcode == Opcode::Text {
                    message.utf8.feed(&message.payload, false)?;
                }
                self.message = Some(message);
                Ok(Event::Frame)
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
                match self.message.take() {
                    Some(message) if fin => {
                        let Reassembly {
                            opcode, payload, ..
                        } = *message;
                        Ok(self.message(opcode, Payload::Reassembled(payload), now_ms, limits))
                    }
                    unfinished => {
                        self.message = unfinished;
                        Ok(Event::Frame)
                    }
                }
            }
            Opcode::Ping => Ok(Event::Reply(frame::encode(Opcode::Pong, payload))),
            Opcode::Pong => Ok(Event::Frame),
            Opcode::Close => {
                let code = match frame::parse_close(payload) {
                    Ok(CloseRequest::Empty) => frame::CLOSE_NORMAL,
                    Ok(CloseRequest::Code(code)) => code,
                    Err(e) => {
                        // A malformed close is still the peer's close: answer with the error
                        // code and end the connection without waiting for another.
                        let close = self.fail(e, now_ms);
                        self.phase = Phase::Closing(Closing::Done);
                        return Ok(Event::Closing(close));
                    }
                };
                let close = self.close(code, "", CloseReason::PeerClosed, now_ms);
                // Our reply completes the handshake.
                self.phase = Phase::Closing(Closing::Done);
                Ok(Event::Closing(close))
            }
        }
    }

    /// A whole message: within the rate limit or not.
    fn message<'a>(
        &mut self,
        opcode: Opcode,
        payload: Payload<'a>,
        now_ms: u64,
        limits: &WsLimits,
    ) -> Event<'a> {
        if self.take_rate_token(now_ms, limits.messages_per_s_max) {
            Event::Message(opcode, payload)
        } else {
            Event::RateLimited(opcode, payload)
        }
    }

    /// Fixed-window rate limit: at most `max` messages per one-second window.
    fn take_rate_token(&mut self, now_ms: u64, max: u32) -> bool {
        if max == 0 {
            return true;
        }
        if now_ms.saturating_sub(self.rate_window_ms) >= 1000 {
            self.rate_window_ms = now_ms;
            self.rate_count = 0;
        }
        self.rate_count = self.rate_count.saturating_add(1);
        self.rate_count <= max
    }

    /// The HTTP request was a WebSocket upgrade to `endpoint`, answered with 101.
    pub fn upgrade(&mut self, endpoint: Endpoint, now_ms: u64) {
        self.phase = Phase::Open(endpoint);
        self.timer_ms = now_ms;
    }

    /// The HTTP request got a final answer (`malformed`: a 400 or 431); the connection lingers.
    pub fn answered(&mut self, malformed: bool, now_ms: u64) {
        self.phase = Phase::Closing(Closing::Linger);
        self.timer_ms = now_ms;
        self.close_reason = if malformed {
            CloseReason::ProtocolError
        } else {
            CloseReason::HttpDone
        };
    }

    /// Starts the close handshake with `code`. Returns the close frame to queue (`None` when
    /// there is none: an HTTP connection just lingers). Nothing may be sent after it.
    /// Returns `None` and changes nothing if the connection is already closing.
    pub fn close(
        &mut self,
        code: u16,
        reason: &str,
        why: CloseReason,
        now_ms: u64,
    ) -> Option<Bytes> {
        let frame = match self.phase {
            Phase::Closing(_) => return None,
            Phase::Open(_) => {
                self.phase = Phase::Closing(Closing::AwaitingClose);
                Some(frame::encode_close(code, reason))
            }
            Phase::Http => {
                self.phase = Phase::Closing(Closing::Linger);
                None
            }
        };
        self.close_reason = why;
        self.timer_ms = now_ms;
        self.message = None;
        frame
    }

    /// Whether [`Connection::close`] would change anything.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_))
    }

    /// The peer broke the rules: returns the close frame to queue, if any.
    fn fail(&mut self, error: FrameError, now_ms: u64) -> Option<Bytes> {
        if self.phase == Phase::Closing(Closing::AwaitingClose) {
            // The peer broke framing after our close frame: its close frame cannot be found
            // any more, so stop parsing and wait for its EOF.
            self.phase = Phase::Closing(Closing::Linger);
            return None;
        }
        let why = match error {
            FrameError::TooLarge => CloseReason::TooLarge,
            FrameError::Protocol | FrameError::InvalidUtf8 => CloseReason::ProtocolError,
        };
        self.close(error.close_code(), "", why, now_ms)
    }

    /// Checks the timeout at `now_ms`.
    pub fn on_timer(&mut self, now_ms: u64, limits: &WsLimits) -> Timer {
        let elapsed_ms = now_ms.saturating_sub(self.timer_ms);
        match self.phase {
            Phase::Http if elapsed_ms >= limits.handshake_timeout_ms => {
                self.close_reason = CloseReason::HandshakeTimeout;
                Timer::Drop
            }
            Phase::Open(_) if elapsed_ms >= limits.idle_timeout_ms => {
                let why = CloseReason::IdleTimeout;
                match self.close(frame::CLOSE_NORMAL, "idle timeout", why, now_ms) {
                    Some(frame) => Timer::Close(frame),
                    None => Timer::Keep,
                }
            }
            Phase::Closing(_) if elapsed_ms >= limits.close_timeout_ms => Timer::Drop,
            _ => Timer::Keep,
        }
    }

    /// The node is shutting down.
    pub fn on_drain(&mut self, now_ms: u64) -> Timer {
        match self.phase {
            // Still in its request: it gets its answer (503 for an upgrade), as connections
            // accepted during the drain do; the handshake timeout bounds it.
            Phase::Http => Timer::Keep,
            Phase::Open(_) => {
                let why = CloseReason::Drain;
                match self.close(frame::CLOSE_GOING_AWAY, "going away", why, now_ms) {
                    Some(frame) => Timer::Close(frame),
                    None => Timer::Keep,
                }
            }
            Phase::Closing(_) => Timer::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WsLimits = WsLimits {
        enable_echo: true,
        enable_wechat: false,
        frame_bytes_max: 1000,
        message_bytes_max: 2000,
        messages_per_s_max: 0,
        handshake_timeout_ms: 100,
        idle_timeout_ms: 1000,
        close_timeout_ms: 50,
    };

    /// A masked client frame.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [7, 1, 9, 3];
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn open() -> Connection {
        let mut conn = Connection::new(0);
        conn.upgrade(Endpoint::App, 0);
        conn
    }

    /// Reads every event in `bytes`; returns a short description of each.
    fn events(conn: &mut Connection, bytes: &[u8], now_ms: u64) -> Vec<String> {
        let mut data = bytes.to_vec();
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Some((used, event)) = conn.read(&mut data[pos..], now_ms, &LIMITS) {
            pos += used;
            seen.push(match event {
                Event::Request(request) => format!("request {request:?}"),
                Event::Frame => "frame".into(),
                Event::Message(op, p) => format!("message {op:?} {}", String::from_utf8_lossy(&p)),
                Event::RateLimited(op, _) => format!("rate limited {op:?}"),
                Event::Reply(bytes) => format!("reply {:02x?}", &bytes[..]),
                Event::Closing(close) => format!("closing {:?}", close.map(|c| c.to_vec())),
                Event::Invalid(close) => format!("invalid {:?}", close.map(|c| c.to_vec())),
            });
        }
        seen
    }

    fn close_frame(code: u16) -> String {
        format!("closing {:?}", Some(frame::encode_close(code, "").to_vec()))
    }

    #[test]
    fn an_http_head_is_read_whole_and_a_plain_answer_lingers() {
        let mut conn = Connection::new(0);
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(
            events(&mut conn, &head[..20], 1).is_empty(),
            "a partial head waits"
        );
        assert_eq!(
            events(&mut conn, head, 1),
            ["request Healthz { head: false }"],
            "one request, and nothing after it is read as frames"
        );
        conn.answered(false, 2);
        assert!(conn.lingers() && !conn.reads_input());
        assert_eq!(conn.close_reason, CloseReason::HttpDone);
    }

    #[test]
    fn messages_in_one_frame_or_in_fragments() {
        let mut conn = open();
        let mut bytes = client(0x81, b"hello");
        bytes.extend(client(0x02, b"bi"));
        bytes.extend(client(0x89, b"p"));
        bytes.extend(client(0x80, b"nary"));
        assert_eq!(
            events(&mut conn, &bytes, 1),
            [
                "message Text hello",
                "frame",
                "reply [8a, 01, 70]",
                "message Binary binary"
            ]
        );
    }

    #[test]
    fn bad_frames_close_with_the_code_the_rfc_asks_for() {
        // Text that is not UTF-8: 1007, found in the first fragment.
        let mut conn = open();
        let got = events(&mut conn, &client(0x01, &[b'a', 0xFF]), 1);
        assert_eq!(got, [close_frame(frame::CLOSE_INVALID_DATA)]);
        assert_eq!(conn.close_reason, CloseReason::ProtocolError);

        // A continuation with no message started: 1002.
        let mut conn = open();
        let got = events(&mut conn, &client(0x80, b"x"), 1);
        assert_eq!(got, [close_frame(frame::CLOSE_PROTOCOL_ERROR)]);

        // A frame over the limit is refused from its header: 1009, nothing buffered.
        let mut conn = open();
        let got = events(&mut conn, &client(0x82, &[0; 1001])[..8], 1);
        let invalid = format!("invalid {:?}", Some(frame::encode_close(1009, "").to_vec()));
        assert_eq!(got, [invalid]);
        assert_eq!(conn.close_reason, CloseReason::TooLarge);

        // A message over the limit in fragments: 1009.
        let mut conn = open();
        let mut bytes = client(0x02, &[0; 1000]);
        bytes.extend(client(0x00, &[0; 1000]));
        bytes.extend(client(0x80, &[0; 1]));
        let got = events(&mut conn, &bytes, 1);
        assert_eq!(got[2], close_frame(frame::CLOSE_TOO_LARGE));
    }

    #[test]
    fn the_close_handshake_either_way() {
        // The peer closes: echo its code, and the handshake is complete.
        let mut conn = open();
        let got = events(&mut conn, &client(0x88, &4000u16.to_be_bytes()), 1);
        assert_eq!(got, [close_frame(4000)]);
        assert!(conn.is_done());

        // We close: frames other than the peer's close are skipped until it comes.
        let mut conn = open();
        let close = conn.close(frame::CLOSE_GOING_AWAY, "", CloseReason::Drain, 1);
        assert!(close.is_some());
        assert_eq!(conn.close(1000, "", CloseReason::IdleTimeout, 1), None);
        let mut bytes = client(0x81, b"late");
        bytes.extend(client(0x88, b""));
        assert_eq!(events(&mut conn, &bytes, 2), ["frame", "closing None"]);
        assert!(conn.is_done());
        assert_eq!(conn.close_reason, CloseReason::Drain);
    }

    #[test]
    fn rate_limit_per_one_second_window() {
        let limits = WsLimits {
            messages_per_s_max: 2,
            ..LIMITS
        };
        let mut conn = open();
        let mut kinds = Vec::new();
        for now_ms in [0, 10, 20, 1000] {
            let mut data = client(0x81, b"x");
            match conn.read(&mut data, now_ms, &limits) {
                Some((_, Event::Message(..))) => kinds.push("ok"),
                Some((_, Event::RateLimited(..))) => kinds.push("limited"),
                _ => panic!("a message was expected"),
            }
        }
        assert_eq!(kinds, ["ok", "ok", "limited", "ok"]);
    }

    #[test]
    fn timers_are_inputs() {
        let mut conn = Connection::new(0);
        assert_eq!(conn.on_timer(99, &LIMITS), Timer::Keep);
        assert_eq!(conn.on_timer(100, &LIMITS), Timer::Drop);
        assert_eq!(conn.close_reason, CloseReason::HandshakeTimeout);

        let mut conn = open();
        conn.on_input(500);
        assert_eq!(
            conn.on_timer(1499, &LIMITS),
            Timer::Keep,
            "input resets the idle timer"
        );
        let idle = conn.on_timer(1500, &LIMITS);
        assert_eq!(
            idle,
            Timer::Close(frame::encode_close(frame::CLOSE_NORMAL, "idle timeout"))
        );
        assert_eq!(conn.on_timer(1549, &LIMITS), Timer::Keep);
        assert_eq!(
            conn.on_timer(1550, &LIMITS),
            Timer::Drop,
            "the close timeout"
        );

        let mut conn = open();
        assert!(matches!(conn.on_drain(5), Timer::Close(_)));
        assert_eq!(conn.on_drain(6), Timer::Keep);
        assert_eq!(
            Connection::new(0).on_drain(1),
            Timer::Keep,
            "a request in progress still gets its answer"
        );
    }
}
