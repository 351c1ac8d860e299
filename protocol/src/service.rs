//! A blocking client for backend services over the service port (docs/backend.md): the binary
//! codec on a plain TCP stream, authenticated by a `service` token in the first frame.
//!
//! [`ServiceClient::call`] numbers each request with a fresh `req` and waits for the reply
//! that echoes it; replies to other requests that arrive meanwhile (the port answers each
//! request when its owner has) are kept until asked for with [`ServiceClient::wait`], so
//! requests may be pipelined with [`ServiceClient::send`].
//!
//! ```no_run
//! use chinwag_protocol::service::ServiceClient;
//! use chinwag_protocol::{Message, NotifyUsers, Uid, UidKind};
//! # fn main() -> Result<(), chinwag_protocol::client::ClientError> {
//! let mut service = ServiceClient::connect("127.0.0.1:7001", "<a service token>")?;
//! let users = vec![Uid::new(UidKind::Buyer, 1001)];
//! let reply = service.call(Message::NotifyUsers(NotifyUsers {
//!     users,
//!     kind: "text".into(),
//!     body: "your parcel left the warehouse".into(),
//! }))?;
//! println!("{reply:?}");
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;

use crate::binary::{self, StreamDecoder};
use crate::client::ClientError;
use crate::ids::ShopId;
use crate::message::{AgentStats, AgentStatsOk, AuthOk, Frame, Message};

/// The largest frame the client accepts from the server.
pub const FRAME_BYTES_MAX: usize = 16 << 20;

/// A blocking connection to the service port.
pub struct ServiceClient {
    stream: TcpStream,
    decoder: StreamDecoder,
    next_req: u64,
    /// Frames read while waiting for another `req`.
    waiting: VecDeque<Frame<'static>>,
    auth: AuthOk,
}

impl ServiceClient {
    /// Connects to `addr` (`host:port`) and authenticates with `token`. Waits at most 10 s for
    /// any one reply (see [`ServiceClient::set_timeout`]).
    pub fn connect(addr: &str, token: &str) -> Result<ServiceClient, ClientError> {
        let stream = TcpStream::connect(addr).map_err(ClientError::Io)?;
        stream.set_nodelay(true).map_err(ClientError::Io)?;
        let mut client = ServiceClient::over(stream)?;
        match client.call(Message::Auth(token.into()))?.message {
            Message::AuthOk(ok) => client.auth = ok,
            other => {
                return Err(ClientError::Unexpected(Box::new(Frame::new(other))));
            }
        }
        Ok(client)
    }

    /// A client on a connected stream that has not authenticated (tests of the port's
    /// refusals use it to send anything first).
    pub fn over(stream: TcpStream) -> Result<ServiceClient, ClientError> {
        for timeout in [TcpStream::set_read_timeout, TcpStream::set_write_timeout] {
            timeout(&stream, Some(Duration::from_secs(10))).map_err(ClientError::Io)?;
        }
        Ok(ServiceClient {
            stream,
            decoder: StreamDecoder::new(FRAME_BYTES_MAX),
            next_req: 1,
            waiting: VecDeque::new(),
            auth: AuthOk {
                uid: crate::Uid::new(crate::UidKind::Service, 0),
                ts: 0,
            },
        })
    }

    /// Who the server says this service is (after [`ServiceClient::connect`]).
    pub fn auth(&self) -> AuthOk {
        self.auth
    }

    /// How long one read may wait.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)
    }

    /// Sends `message` with a fresh `req` and returns its reply; an `error` reply is
    /// [`ClientError::Rejected`].
    pub fn call(&mut self, message: Message<'_>) -> Result<Frame<'static>, ClientError> {
        let req = self.send(message)?;
        let frame = self.wait(req)?;
        match frame.message {
            Message::Error(e) => Err(ClientError::Rejected(e)),
            _ => Ok(frame),
        }
    }

    /// `set_profile`: sets the nickname and avatar of a user, or the display name and avatar
    /// of a conversation or shop (empty strings clear them).
    pub fn set_profile(
        &mut self,
        subject: crate::Subject,
        profile: crate::Profile,
    ) -> Result<(), ClientError> {
        let frame = self.call(Message::SetProfile(crate::ProfileOf { subject, profile }))?;
        match frame.message {
            Message::SetProfileOk => Ok(()),
            _ => Err(ClientError::Unexpected(Box::new(frame))),
        }
    }

    /// `get_profile`: the profile of a user, conversation (a shop conversation: its shop's) or
    /// shop; empty strings where nothing is set.
    pub fn get_profile(&mut self, subject: crate::Subject) -> Result<crate::Profile, ClientError> {
        let frame = self.call(Message::GetProfile(subject))?;
        match frame.message {
            Message::GetProfileOk(of) => Ok(of.profile),
            _ => Err(ClientError::Unexpected(Box::new(frame))),
        }
    }

    /// The customer-service figures of `shop`'s agents over `from_ms..to_ms` (`agent_stats`,
    /// docs/backend.md "Agent statistics").
    pub fn agent_stats(
        &mut self,
        shop: ShopId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<AgentStatsOk, ClientError> {
        let request = Message::AgentStats(AgentStats {
            shop,
            from_ms,
            to_ms,
        });
        let frame = self.call(request)?;
        match frame.message {
            Message::AgentStatsOk(stats) => Ok(stats),
            _ => Err(ClientError::Unexpected(Box::new(frame))),
        }
    }

    /// Sends `message` with a fresh `req` without waiting; returns the `req`.
    pub fn send(&mut self, message: Message<'_>) -> Result<u64, ClientError> {
        let req = self.next_req;
        self.next_req += 1;
        self.send_frame(&Frame::with_req(req, message))?;
        Ok(req)
    }

    /// Sends one frame as it is.
    pub fn send_frame(&mut self, frame: &Frame<'_>) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        binary::encode(frame, &mut out).map_err(ClientError::Encode)?;
        self.send_bytes(&out)
    }

    /// Sends raw bytes (tests of malformed input).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(ClientError::Io)
    }

    /// The reply to `req` (an `error` reply included).
    pub fn wait(&mut self, req: u64) -> Result<Frame<'static>, ClientError> {
        if let Some(at) = self.waiting.iter().position(|f| f.req == Some(req)) {
            return Ok(self
                .waiting
                .remove(at)
                .expect("the position is in the queue"));
        }
        loop {
            let frame = self.read_frame()?;
            if frame.req == Some(req) {
                return Ok(frame);
            }
            self.waiting.push_back(frame);
        }
    }

    /// The next frame from the server, whatever it answers.
    pub fn next_frame(&mut self) -> Result<Frame<'static>, ClientError> {
        match self.waiting.pop_front() {
            Some(frame) => Ok(frame),
            None => self.read_frame(),
        }
    }

    /// The next frame from the socket.
    fn read_frame(&mut self) -> Result<Frame<'static>, ClientError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(bytes) = self.decoder.next_frame() {
                return binary::decode(&bytes)
                    .map(Frame::into_owned)
                    .map_err(ClientError::Decode);
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: "the server closed the connection".into(),
                    })
                }
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Err(ClientError::TimedOut)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Io(e)),
            };
            self.decoder
                .extend(&buf[..n])
                .map_err(ClientError::Decode)?;
        }
    }
}
