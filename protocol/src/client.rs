//! A small blocking client over `std::net` and tungstenite, for tests, the load generator's
//! control paths and backend examples.
//!
//! [`Client::call`] numbers each request with a fresh `req` and waits for the reply that echoes
//! it; pushes that arrive meanwhile are queued and come out of [`Client::next_push`] in order.
//!
//! ```no_run
//! use chinwag_protocol::client::{Client, Encoding};
//! use chinwag_protocol::{DeviceType, Message};
//! # fn main() -> Result<(), chinwag_protocol::client::ClientError> {
//! let mut client = Client::connect("ws://127.0.0.1:7000/ws", Encoding::Json)?;
//! let me = client.login("<token from `chinwag token`>", DeviceType::Web)?;
//! println!("logged in as {} on device {}", me.uid, me.device_id);
//! let reply = client.call(Message::Convs)?;
//! println!("{reply:?}");
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tungstenite::protocol::WebSocket;
use tungstenite::Message as WsMessage;

use crate::binary;
use crate::ids::DeviceType;
use crate::json;
use crate::message::{DecodeError, ErrorReply, Frame, Login, LoginOk, Message};

/// Which encoding the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON objects in text messages.
    Json,
    /// Binary frames in binary messages.
    Binary,
}

/// What can go wrong for a client.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed.
    Io(io::Error),
    /// The WebSocket layer failed (handshake, framing, or the server closed).
    WebSocket(tungstenite::Error),
    /// The server sent bytes that do not decode.
    Decode(DecodeError),
    /// A frame could not be encoded.
    Encode(binary::EncodeError),
    /// The server answered a request with `error`.
    Rejected(ErrorReply<'static>),
    /// The server answered with an op the request does not expect.
    Unexpected(Box<Frame<'static>>),
    /// No reply came within the client's timeout.
    TimedOut,
    /// The server closed the connection, with this close code (if it gave one).
    Closed {
        /// The close code, e.g. 1008 after a refused login, 4001 after `kicked`.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "socket: {e}"),
            ClientError::WebSocket(e) => write!(f, "websocket: {e}"),
            ClientError::Decode(e) => write!(f, "decode: {e}"),
            ClientError::Encode(e) => write!(f, "{e}"),
            ClientError::Rejected(e) => write!(f, "server error {}: {}", e.code, e.message),
            ClientError::Unexpected(frame) => write!(f, "unexpected reply {:?}", frame.message),
            ClientError::TimedOut => f.write_str("timed out waiting for the server"),
            ClientError::Closed { code, reason } => {
                write!(f, "server closed the connection ({code:?} {reason})")
            }
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::TimedOut
            }
            e => ClientError::WebSocket(e),
        }
    }
}

/// A blocking connection to a chinwag gateway.
pub struct Client {
    ws: WebSocket<TcpStream>,
    encoding: Encoding,
    next_req: u64,
    /// Frames received but not yet handed out (pushes, and frames of a multi-frame message).
    inbox: VecDeque<Frame<'static>>,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("encoding", &self.encoding)
            .field("next_req", &self.next_req)
            .field("inbox", &self.inbox.len())
            .finish()
    }
}

impl Client {
    /// Connects to `url` (e.g. `ws://127.0.0.1:7000/ws`) and completes the handshake.
    pub fn connect(url: &str, encoding: Encoding) -> Result<Client, ClientError> {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "url must be ws://"))?;
        let stream = TcpStream::connect(authority)?;
        stream.set_nodelay(true)?;
        let timeout = Duration::from_secs(10);
        stream.set_read_timeout(Some(timeout))?;
        let (ws, _response) = tungstenite::client::client(url, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => ClientError::from(e),
            tungstenite::HandshakeError::Interrupted(_) => ClientError::TimedOut,
        })?;
        Ok(Client {
            ws,
            encoding,
            next_req: 1,
            inbox: VecDeque::new(),
            timeout,
        })
    }

    /// How long [`Client::call`] waits for a reply (default 10 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The encoding this client speaks.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Logs in; fails with [`ClientError::Rejected`] if the server refuses the token.
    pub fn login(&mut self, token: &str, device: DeviceType) -> Result<LoginOk, ClientError> {
        let reply = self.call(Message::Login(Login {
            token: token.into(),
            device,
        }))?;
        match reply.message {
            Message::LoginOk(ok) => Ok(ok),
            _ => Err(ClientError::Unexpected(Box::new(reply))),
        }
    }

    /// Sends `message` with a fresh `req` and returns the reply that echoes it. An `error`
    /// reply is returned as [`ClientError::Rejected`].
    pub fn call(&mut self, message: Message<'_>) -> Result<Frame<'static>, ClientError> {
        let req = self.next_req;
        self.next_req += 1;
        self.send(&Frame::with_req(req, message))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let frame = self.receive_until(deadline)?;
            if frame.req != Some(req) {
                self.inbox.push_back(frame);
                continue;
            }
            return match frame.message {
                Message::Error(e) => Err(ClientError::Rejected(e)),
                _ => Ok(frame),
            };
        }
    }

    /// Sends one frame as one WebSocket message.
    pub fn send(&mut self, frame: &Frame<'_>) -> Result<(), ClientError> {
        let message = match self.encoding {
            Encoding::Json => {
                let mut out = BytesMut::new();
                json::encode(frame, &mut out);
                // The JSON encoder writes only UTF-8: it copies `str`s and ASCII.
                let text = String::from_utf8(out.to_vec()).expect("JSON encoder writes UTF-8");
                WsMessage::text(text)
            }
            Encoding::Binary => {
                WsMessage::binary(binary::encode_to_bytes(frame).map_err(ClientError::Encode)?)
            }
        };
        self.send_raw(message)
    }

    /// Sends a raw WebSocket message (for tests of malformed input).
    pub fn send_raw(&mut self, message: WsMessage) -> Result<(), ClientError> {
        self.ws.send(message)?;
        Ok(())
    }

    /// The next frame that is not a reply to a pending call, waiting up to `timeout`.
    /// `Ok(None)` if none came in time.
    pub fn next_push(&mut self, timeout: Duration) -> Result<Option<Frame<'static>>, ClientError> {
        if let Some(frame) = self.inbox.pop_front() {
            return Ok(Some(frame));
        }
        match self.receive_until(Instant::now() + timeout) {
            Ok(frame) => Ok(Some(frame)),
            Err(ClientError::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Closes the connection with a normal close and waits briefly for the server's answer.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.ws.close(None)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The underlying WebSocket, for tests that need the raw layer (close codes, pings).
    pub fn websocket(&mut self) -> &mut WebSocket<TcpStream> {
        &mut self.ws
    }

    /// The next frame from the inbox or the socket.
    fn receive_until(&mut self, deadline: Instant) -> Result<Frame<'static>, ClientError> {
        loop {
            if let Some(frame) = self.inbox.pop_front() {
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::TimedOut);
            }
            self.ws.get_mut().set_read_timeout(Some(left))?;
            match self.ws.read()? {
                WsMessage::Text(text) => {
                    let frame = json::decode(&text).map_err(ClientError::Decode)?;
                    self.inbox.push_back(frame.into_owned());
                }
                WsMessage::Binary(bytes) => {
                    for frame in binary::frames(&bytes) {
                        let frame = frame.map_err(ClientError::Decode)?;
                        self.inbox.push_back(frame.into_owned());
                    }
                }
                // Pings are answered by tungstenite on the next read or write.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                WsMessage::Close(frame) => {
                    return Err(ClientError::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
            }
        }
    }
}
