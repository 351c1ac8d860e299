//! Many chinwag connections on one `mio::Poll`: TCP connect from a chosen source address, the
//! WebSocket upgrade, and protocol frames in and out in either encoding.
//!
//! A fleet may dial several servers (the nodes of a cluster): connection `i` goes to address
//! `i % addrs.len()`, and [`Fleet::open_next`] opens a connection to the address after the one
//! an earlier connection used, which is how a client moves on from a node that died.
//!
//! A [`Fleet`] owns the connections; a scenario drives it with [`Fleet::turn`], which hands
//! every event of a connection (upgraded, a decoded frame, a failure) to the scenario together
//! with that connection's [`Writer`], so the scenario can answer in place. Nothing the server
//! sends can panic this code: a bad byte becomes an [`Event::Bad`] or a failed connection.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use chinwag_protocol::{binary, json, DecodeError, Frame};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

/// The largest WebSocket message accepted from the server; more is a protocol failure.
const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Bytes read from a socket per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Which encoding the connections speak: the protocol crate's, JSON in text WebSocket messages
/// or binary frames in binary ones.
pub use chinwag_protocol::client::Encoding;

/// Why a connection ended. [`Failure::cause`] names it for the report's failure table.
#[derive(Debug)]
pub enum Failure {
    /// The TCP connect failed (refused, no ports left, ...).
    Connect(io::Error),
    /// The server answered the upgrade with something other than 101.
    Refused(String),
    /// The server sent a close frame with this code.
    Closed(Option<u16>),
    /// The server closed the TCP connection without a close frame.
    Eof,
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// The server broke the WebSocket framing.
    Framing(&'static str),
}

impl Failure {
    /// A short stable name for counting failures by cause.
    pub fn cause(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {}", e.kind()),
            Failure::Refused(status) => format!("upgrade refused: {status}"),
            Failure::Closed(Some(code)) => format!("closed by server: {code}"),
            Failure::Closed(None) => "closed by server".to_string(),
            Failure::Eof => "eof".to_string(),
            Failure::Io(e) => format!("io: {}", e.kind()),
            Failure::Framing(what) => format!("framing: {what}"),
        }
    }
}

/// What happened on one connection.
pub enum Event<'a> {
    /// The WebSocket upgrade completed; the connection may send.
    Upgraded,
    /// A protocol frame arrived.
    Frame(Frame<'a>),
    /// A protocol frame arrived that does not decode.
    Bad(DecodeError),
    /// The connection is over; no more events come from it.
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Upgrading,
    Open,
    Done,
}

/// The sending half of a connection: frames are encoded into `outbound` and written out by the
/// fleet after the scenario's callback returns.
pub struct Writer {
    encoding: Encoding,
    outbound: Vec<u8>,
    scratch: BytesMut,
    /// Protocol frames queued so far (each a request: the load generator sends no replies).
    frames: u64,
}

impl Writer {
    /// Queues `frame` as one WebSocket message. A frame the codec refuses (a string over its
    /// length limit) is a bug of the scenario, not of the server.
    pub fn send(&mut self, frame: &Frame<'_>) {
        self.scratch.clear();
        let opcode = match self.encoding {
            Encoding::Binary => {
                binary::encode(frame, &mut self.scratch).expect("scenario frames fit the codec");
                0x2
            }
            Encoding::Json => {
                json::encode(frame, &mut self.scratch);
                0x1
            }
        };
        put_client_frame(&mut self.outbound, opcode, &self.scratch);
        self.frames += 1;
    }
}

/// Appends one masked client frame. The masking key is zero: servers must unmask whatever the
/// key is, and a zero key spares the client a pass over each payload (RFC 6455 asks for an
/// unpredictable key to protect proxies, which a loopback load test does not have).
fn put_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// One connection.
pub struct Conn {
    /// `None` once the connection is done (or if it never connected).
    stream: Option<TcpStream>,
    phase: Phase,
    inbound: Vec<u8>,
    /// Its sending half.
    pub writer: Writer,
    /// Bytes written to and read from the socket (WebSocket and HTTP included).
    bytes_out: u64,
    bytes_in: u64,
    /// Which of the fleet's addresses it dialed.
    target: usize,
}

impl Conn {
    /// Whether the connection has failed or been closed.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// Where and how connections are opened.
#[derive(Debug, Clone)]
pub struct Dial {
    /// The servers (at least one), dialed in turn.
    pub addrs: Vec<SocketAddr>,
    /// The request path, `/ws` for chinwag.
    pub path: String,
    /// Source addresses used in turn, so that many connections do not run out of ports; empty:
    /// the kernel picks.
    pub sources: Vec<Ipv4Addr>,
    /// The encoding frames are sent in.
    pub encoding: Encoding,
}

/// Connections on one poll; a connection's index is its `Token`.
pub struct Fleet {
    poll: Poll,
    events: Events,
    dial: Dial,
    request: Vec<u8>,
    read_buf: Vec<u8>,
    /// The connections, in the order they were opened.
    pub conns: Vec<Conn>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new(dial: Dial) -> io::Result<Fleet> {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            dial.path, dial.addrs[0]
        );
        Ok(Fleet {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            dial,
            request: request.into_bytes(),
            read_buf: vec![0; READ_CHUNK_BYTES],
            conns: Vec::new(),
        })
    }

    /// Starts one more connection, to address `conns.len() % addrs.len()`. Its index is
    /// `conns.len()` before the call. A connect that fails at once is returned; the connection
    /// then exists and is done.
    pub fn open(&mut self) -> Result<usize, Failure> {
        let target = self.conns.len() % self.dial.addrs.len();
        self.open_to(target)
    }

    /// Starts one more connection, to the address after the one connection `after` dialed
    /// (the same one if the fleet has one address), as [`Fleet::open`] does.
    pub fn open_next(&mut self, after: usize) -> Result<usize, Failure> {
        let target = (self.conns[after].target + 1) % self.dial.addrs.len();
        self.open_to(target)
    }

    /// How many addresses the fleet dials.
    pub fn addr_count(&self) -> usize {
        self.dial.addrs.len()
    }

    fn open_to(&mut self, target: usize) -> Result<usize, Failure> {
        let i = self.conns.len();
        let source = (!self.dial.sources.is_empty())
            .then(|| SocketAddr::from((self.dial.sources[i % self.dial.sources.len()], 0)));
        let writer = Writer {
            encoding: self.dial.encoding,
            outbound: Vec::new(),
            scratch: BytesMut::with_capacity(256),
            frames: 0,
        };
        // A connection that fails at once still takes its index, so indexes stay dense.
        let mut conn = Conn {
            stream: None,
            phase: Phase::Done,
            inbound: Vec::new(),
            writer,
            bytes_out: 0,
            bytes_in: 0,
            target,
        };
        let result = connect(source, self.dial.addrs[target])
            .map_err(Failure::Connect)
            .and_then(|mut stream| {
                self.poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(Failure::Io)?;
                Ok(stream)
            });
        let result = result.map(|stream| {
            conn.stream = Some(stream);
            conn.phase = Phase::Connecting;
            i
        });
        self.conns.push(conn);
        result
    }

    /// Closes connection `i` from the client side (dropping its socket) and marks it done.
    pub fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.phase = Phase::Done;
    }

    /// Writes what connection `i` has queued. Call after queueing frames outside [`turn`].
    ///
    /// [`turn`]: Fleet::turn
    pub fn flush(&mut self, i: usize) -> Result<(), Failure> {
        let conn = &mut self.conns[i];
        let (Phase::Open, Some(stream)) = (conn.phase, conn.stream.as_mut()) else {
            return Ok(());
        };
        let result = write_out(stream, &mut conn.writer.outbound, &mut conn.bytes_out);
        if result.is_err() {
            self.close(i);
        }
        result
    }

    /// Requests sent, bytes sent and bytes received over every connection so far.
    pub fn traffic(&self) -> Traffic {
        let mut t = Traffic::default();
        for conn in &self.conns {
            t.requests += conn.writer.frames;
            t.bytes_sent += conn.bytes_out;
            t.bytes_received += conn.bytes_in;
        }
        t
    }

    /// Waits up to `timeout` for readiness and hands every event to `on_event(index, writer,
    /// event)`. A connection's queued frames are written after its events are handled.
    pub fn turn(
        &mut self,
        timeout: Duration,
        mut on_event: impl FnMut(usize, &mut Writer, Event<'_>),
    ) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in self.events.iter() {
            let i = event.token().0;
            let Some(conn) = self.conns.get_mut(i) else {
                continue;
            };
            // The peer closed (FIN or reset): read to the end, even past a short read, since
            // no later edge will come for an end that arrived with the last data.
            let closed = event.is_read_closed() || event.is_error();
            if let Err(failure) = drive(
                conn,
                &self.request,
                &mut self.read_buf,
                i,
                closed,
                &mut on_event,
            ) {
                if let Some(mut stream) = conn.stream.take() {
                    let _ = self.poll.registry().deregister(&mut stream);
                }
                conn.phase = Phase::Done;
                on_event(i, &mut conn.writer, Event::Failed(failure));
            }
        }
        Ok(())
    }
}

/// What a fleet sent and received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Protocol frames sent (every one a request).
    pub requests: u64,
    /// Bytes written to the sockets.
    pub bytes_sent: u64,
    /// Bytes read from the sockets.
    pub bytes_received: u64,
}

impl Traffic {
    /// Adds the figures `requests`, `bytes_sent` and `bytes_received` to `report`.
    pub fn report(self, report: &mut crate::report::Report) {
        report.figure("requests", self.requests);
        report.figure("bytes_sent", self.bytes_sent);
        report.figure("bytes_received", self.bytes_received);
    }
}

/// Moves one connection forward after a readiness event (`closed`: the event says the peer
/// closed). Returns an error if the connection is over.
fn drive(
    conn: &mut Conn,
    request: &[u8],
    read_buf: &mut [u8],
    i: usize,
    closed: bool,
    on_event: &mut impl FnMut(usize, &mut Writer, Event<'_>),
) -> Result<(), Failure> {
    let Conn {
        stream,
        phase,
        inbound,
        writer,
        bytes_out,
        bytes_in,
        ..
    } = conn;
    let Some(stream) = stream.as_mut() else {
        return Ok(());
    };
    if *phase == Phase::Connecting {
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Err(Failure::Connect(e)),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(Failure::Connect(e)),
        }
        writer.outbound.extend_from_slice(request);
        *phase = Phase::Upgrading;
    }
    // Read until the socket is drained (mio readiness is edge-triggered).
    loop {
        match stream.read(read_buf) {
            Ok(0) => {
                if *phase == Phase::Upgrading {
                    return Err(Failure::Refused("eof before the upgrade answer".into()));
                }
                // What arrived before the end (the last pushes, a close frame) is handed on
                // first.
                let consumed = read_messages(inbound, writer, i, on_event)?;
                inbound.drain(..consumed);
                return Err(Failure::Eof);
            }
            // A short read emptied the socket; later data raises a new edge (epoll reports
            // every arrival), so the read that could only answer WouldBlock is skipped.
            Ok(n) if n < read_buf.len() && !closed => {
                *bytes_in += n as u64;
                inbound.extend_from_slice(&read_buf[..n]);
                break;
            }
            Ok(n) => {
                *bytes_in += n as u64;
                inbound.extend_from_slice(&read_buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Io(e)),
        }
    }
    if *phase == Phase::Upgrading {
        let Some(end) = inbound.windows(4).position(|w| w == b"\r\n\r\n") else {
            if inbound.len() > 8192 {
                return Err(Failure::Refused("upgrade answer too long".into()));
            }
            return write_out(stream, &mut writer.outbound, bytes_out);
        };
        if !inbound.starts_with(b"HTTP/1.1 101") {
            let status = String::from_utf8_lossy(&inbound[..end.min(40)]);
            return Err(Failure::Refused(
                status.lines().next().unwrap_or("").to_string(),
            ));
        }
        inbound.drain(..end + 4);
        *phase = Phase::Open;
        on_event(i, writer, Event::Upgraded);
    }
    let consumed = read_messages(inbound, writer, i, on_event)?;
    inbound.drain(..consumed);
    write_out(stream, &mut writer.outbound, bytes_out)
}

/// Handles every complete server frame in `buf`. Returns the bytes consumed.
fn read_messages(
    buf: &[u8],
    writer: &mut Writer,
    i: usize,
    on_event: &mut impl FnMut(usize, &mut Writer, Event<'_>),
) -> Result<usize, Failure> {
    let mut at = 0;
    while let Some((header_len, payload_len)) = server_frame(&buf[at..])? {
        let first = buf[at];
        let payload = &buf[at + header_len..at + header_len + payload_len];
        at += header_len + payload_len;
        if first & 0x80 == 0 {
            // chinwag never fragments; a continuation here would need reassembly we do not do.
            return Err(Failure::Framing("fragmented message"));
        }
        match first & 0x0F {
            0x1 => match json::decode_bytes(payload) {
                Ok(frame) => on_event(i, writer, Event::Frame(frame)),
                Err(e) => on_event(i, writer, Event::Bad(e)),
            },
            0x2 => {
                for frame in binary::frames(payload) {
                    match frame {
                        Ok(frame) => on_event(i, writer, Event::Frame(frame)),
                        Err(e) => on_event(i, writer, Event::Bad(e)),
                    }
                }
            }
            0x8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return Err(Failure::Closed(code));
            }
            0x9 => put_client_frame(&mut writer.outbound, 0xA, payload),
            0xA => {}
            _ => return Err(Failure::Framing("unknown opcode")),
        }
    }
    Ok(at)
}

/// The header and payload length of the server frame at the start of `buf`, if all of it is
/// there.
fn server_frame(buf: &[u8]) -> Result<Option<(usize, usize)>, Failure> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err(Failure::Framing("masked server frame"));
    }
    let (header_len, payload_len) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as u64),
        127 if buf.len() >= 10 => {
            let mut len = [0; 8];
            len.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(len))
        }
        126 | 127 => return Ok(None),
        n => (2, n as u64),
    };
    if payload_len > MESSAGE_BYTES_MAX as u64 {
        return Err(Failure::Framing("message over 16 MiB"));
    }
    let payload_len = payload_len as usize;
    Ok((buf.len() >= header_len + payload_len).then_some((header_len, payload_len)))
}

/// Writes as much of `outbound` as the socket takes, counting it in `bytes_out`.
fn write_out(
    stream: &mut TcpStream,
    outbound: &mut Vec<u8>,
    bytes_out: &mut u64,
) -> Result<(), Failure> {
    let mut written = 0;
    while written < outbound.len() {
        match stream.write(&outbound[written..]) {
            Ok(0) => return Err(Failure::Eof),
            Ok(n) => {
                written += n;
                *bytes_out += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Io(e)),
        }
    }
    outbound.drain(..written);
    Ok(())
}

/// A non-blocking connect to `target`, from `source` if given.
fn connect(source: Option<SocketAddr>, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        socket.bind(&source.into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frame_lengths_use_the_three_forms() {
        for (len, header) in [(5, 2), (126, 4), (70_000, 10)] {
            let mut out = Vec::new();
            put_client_frame(&mut out, 0x2, &vec![7; len]);
            assert_eq!(out.len(), header + 4 + len);
            assert_eq!(out[0], 0x82);
            assert_ne!(out[1] & 0x80, 0, "client frames are masked");
        }
    }

    #[test]
    fn server_frame_needs_all_its_bytes_and_refuses_masks() {
        assert!(matches!(server_frame(&[0x82, 3, 1, 2]), Ok(None)));
        assert!(matches!(
            server_frame(&[0x82, 3, 1, 2, 3]),
            Ok(Some((2, 3)))
        ));
        assert!(matches!(server_frame(&[0x82, 126, 0]), Ok(None)));
        assert!(matches!(
            server_frame(&[0x82, 0x83, 0, 0]),
            Err(Failure::Framing(_))
        ));
        let huge = [0x82, 127, 0xFF, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(server_frame(&huge), Err(Failure::Framing(_))));
    }
}
