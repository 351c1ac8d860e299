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
//!
//! A cluster's nodes each have a service port; [`ServiceClient::connect_any`] takes their
//! addresses and connects to the first that answers, so a service keeps working while one node
//! is down (docs/backend.md, "Several nodes").

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::BytesMut;

use crate::binary::{self, StreamDecoder};
use crate::client::ClientError;
use crate::ids::ShopId;
use crate::message::{AgentStats, AgentStatsOk, AuthOk, Frame, Message};

/// How long one connect may take before the next address is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection to the first address `addr` resolves to that answers within
/// [`CONNECT_TIMEOUT`] (a host that is down does not hold the caller for minutes).
fn connect_timeout(addr: &str) -> Result<TcpStream, ClientError> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"));
    for resolved in addr.to_socket_addrs().map_err(ClientError::Io)? {
        match TcpStream::connect_timeout(&resolved, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(ClientError::Io(last))
}

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
        let stream = connect_timeout(addr)?;
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

    /// Connects to the first of `addrs` (`host:port` each, tried in order) that accepts the
    /// connection and authenticates `token`, the service ports of a cluster's nodes. Each
    /// attempt waits at most 10 s; a node that refuses or does not answer is skipped. Returns
    /// the client and the index in `addrs` of the address it connected to, or the last error
    /// if none would (or [`ClientError::Io`] of kind `InvalidInput` for an empty list).
    pub fn connect_any<A: AsRef<str>>(
        addrs: &[A],
        token: &str,
    ) -> Result<(ServiceClient, usize), ClientError> {
        let mut last = ClientError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no service address given",
        ));
        for (i, addr) in addrs.iter().enumerate() {
            match ServiceClient::connect(addr.as_ref(), token) {
                Ok(client) => return Ok((client, i)),
                // A token the server refuses is refused by every node: no point trying on.
                Err(e @ ClientError::Rejected(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A port of 127.0.0.1 that refuses connections (bound, then closed).
    fn closed_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    /// A one-connection service port that answers the `auth` frame with `auth_ok`.
    fn fake_service_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut decoder = StreamDecoder::new(FRAME_BYTES_MAX);
            let mut buf = [0u8; 4096];
            let bytes = loop {
                if let Some(bytes) = decoder.next_frame() {
                    break bytes;
                }
                let n = stream.read(&mut buf).unwrap();
                decoder.extend(&buf[..n]).unwrap();
            };
            let auth = binary::decode(&bytes).unwrap();
            assert!(matches!(auth.message, Message::Auth(_)));
            let uid = crate::Uid::new(crate::UidKind::Service, 9);
            let reply = Frame {
                req: auth.req,
                message: Message::AuthOk(AuthOk { uid, ts: 1 }),
            };
            let mut out = BytesMut::new();
            binary::encode(&reply, &mut out).unwrap();
            stream.write_all(&out).unwrap();
            // Hold the connection until the client is done with it.
            let _ = stream.read(&mut buf);
        });
        addr
    }

    #[test]
    fn connect_any_skips_addresses_that_refuse_and_says_which_it_reached() {
        let addrs = [closed_port(), closed_port(), fake_service_port()];
        let (client, at) = ServiceClient::connect_any(&addrs, "token").expect("the third answers");
        assert_eq!(at, 2);
        assert_eq!(client.auth().uid.to_string(), "service:9");
    }

    #[test]
    fn connect_any_with_no_address_that_answers_returns_the_last_error() {
        let none: [&str; 0] = [];
        match ServiceClient::connect_any(&none, "token") {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput),
            other => panic!("expected InvalidInput, got {:?}", other.map(|(_, i)| i)),
        }
        match ServiceClient::connect_any(&[closed_port(), closed_port()], "token") {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!(
                "expected a refused connect, got {:?}",
                other.map(|(_, i)| i)
            ),
        }
    }
}
