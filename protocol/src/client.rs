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

    /// Connects to the first of `urls` (tried in order) that completes the handshake: the
    /// nodes of a cluster, where a client that loses its node moves to the next. Returns the
    /// client and the index in `urls` of the one it reached, or the last error if none would
    /// (or [`ClientError::Io`] of kind `InvalidInput` for an empty list).
    pub fn connect_any<U: AsRef<str>>(
        urls: &[U],
        encoding: Encoding,
    ) -> Result<(Client, usize), ClientError> {
        let mut last = ClientError::Io(io::Error::new(io::ErrorKind::InvalidInput, "no url given"));
        for (i, url) in urls.iter().enumerate() {
            match Client::connect(url.as_ref(), encoding) {
                Ok(client) => return Ok((client, i)),
                Err(e) => last = e,
            }
        }
        Err(last)
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
            if let Some(at) = self.inbox.iter().position(|f| f.req == Some(req)) {
                // `position` found it, so `remove` has an element to return.
                let frame = self.inbox.remove(at).expect("index from position");
                return match frame.message {
                    Message::Error(e) => Err(ClientError::Rejected(e)),
                    _ => Ok(frame),
                };
            }
            self.receive_until(deadline)?;
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
        if self.inbox.is_empty() {
            match self.receive_until(Instant::now() + timeout) {
                Ok(()) => {}
                Err(ClientError::TimedOut) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(self.inbox.pop_front())
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

    /// Reads one WebSocket message (waiting until `deadline`) and queues its frames.
    fn receive_until(&mut self, deadline: Instant) -> Result<(), ClientError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::TimedOut);
            }
            self.ws.get_mut().set_read_timeout(Some(left))?;
            match self.ws.read()? {
                WsMessage::Text(text) => {
                    let frame = json::decode(&text).map_err(ClientError::Decode)?;
                    self.inbox.push_back(frame.into_owned());
                    return Ok(());
                }
                WsMessage::Binary(bytes) => {
                    for frame in binary::frames(&bytes) {
                        let frame = frame.map_err(ClientError::Decode)?;
                        self.inbox.push_back(frame.into_owned());
                    }
                    return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConvId, DeviceId, NodeId, Seq, Uid, UidKind};
    use crate::message::{ErrorCode, Msg, SendOk};
    use std::net::TcpListener;
    use std::thread;

    /// A peer that answers like a gateway would, scripted per request: enough to test the
    /// client's request/reply matching, push queueing and both encodings.
    fn scripted_peer() -> (String, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut ws = tungstenite::accept(stream).unwrap();
            loop {
                let (frame, binary) = match ws.read() {
                    Ok(WsMessage::Text(t)) => (json::decode(&t).unwrap().into_owned(), false),
                    Ok(WsMessage::Binary(b)) => (binary::decode(&b).unwrap().into_owned(), true),
                    Ok(_) => continue,
                    Err(_) => return,
                };
                let push = Frame::new(Message::Msg(crate::MsgPush::bare(Msg {
                    conv: ConvId(1),
                    seq: Seq(9),
                    from: Uid::new(UidKind::Agent, 2),
                    ts: 5,
                    kind: "text".into(),
                    body: "pushed first".into(),
                    cmid: "m".into(),
                })));
                let reply = match frame.message {
                    Message::Login(_) => Message::LoginOk(LoginOk {
                        uid: Uid::new(UidKind::Buyer, 1),
                        device_id: DeviceId::from_u64(77).unwrap(),
                        node_id: NodeId::from_u64(88).unwrap(),
                        ts: 1,
                    }),
                    Message::Send(_) => Message::SendOk(SendOk {
                        conv: ConvId(1),
                        seq: Seq(10),
                        ts: 2,
                    }),
                    _ => Message::Error(ErrorReply {
                        code: ErrorCode::BadRequest,
                        message: "no".into(),
                    }),
                };
                let reply = Frame {
                    req: frame.req,
                    message: reply,
                };
                let out = if binary {
                    // Push and reply back to back in one binary message.
                    let mut buf = BytesMut::new();
                    binary::encode(&push, &mut buf).unwrap();
                    binary::encode(&reply, &mut buf).unwrap();
                    vec![WsMessage::binary(buf.freeze())]
                } else {
                    [push, reply]
                        .iter()
                        .map(|f| {
                            let text = String::from_utf8(json::encode_to_bytes(f).to_vec());
                            WsMessage::text(text.unwrap())
                        })
                        .collect()
                };
                for message in out {
                    ws.send(message).unwrap();
                }
            }
        });
        (url, handle)
    }

    fn exercise(encoding: Encoding) {
        let (url, peer) = scripted_peer();
        let mut client = Client::connect(&url, encoding).unwrap();
        let me = client.login("token", DeviceType::Web).unwrap();
        assert_eq!(me.device_id.get(), 77);
        let reply = client
            .call(Message::Send(crate::message::Send {
                target: crate::message::Target::Conv(ConvId(1)),
                cmid: "c".into(),
                kind: "text".into(),
                body: "hi".into(),
            }))
            .unwrap();
        assert_eq!(reply.req, Some(2));
        assert!(matches!(
            reply.message,
            Message::SendOk(SendOk { seq: Seq(10), .. })
        ));
        match client.call(Message::Convs) {
            Err(ClientError::Rejected(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
            other => panic!("expected a rejection, got {other:?}"),
        }
        // The three pushes that arrived before the replies come out in order.
        for _ in 0..3 {
            let push = client
                .next_push(Duration::from_millis(10))
                .unwrap()
                .unwrap();
            assert!(matches!(push.message, Message::Msg(_)));
        }
        assert!(client
            .next_push(Duration::from_millis(50))
            .unwrap()
            .is_none());
        client.close().unwrap();
        peer.join().unwrap();
    }

    #[test]
    fn calls_match_replies_and_queue_pushes_in_json() {
        exercise(Encoding::Json);
    }

    #[test]
    fn calls_match_replies_and_queue_pushes_in_binary() {
        exercise(Encoding::Binary);
    }

    #[test]
    fn connect_refuses_urls_that_are_not_ws() {
        assert!(matches!(
            Client::connect("http://127.0.0.1:1/ws", Encoding::Json),
            Err(ClientError::Io(_))
        ));
    }
}
