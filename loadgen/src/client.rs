//! The WebSocket client side: one thread, one `mio::Poll`, many connections.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::{procfs, source, Target};

/// Connections started per loop turn while connecting, so the server's accept backlog is not
/// flooded with SYNs it would drop.
const CONNECTS_PER_TURN: usize = 256;
/// Longest time allowed to get every connection open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(PartialEq, Eq)]
enum State {
    Connecting,
    Handshaking,
    Open,
}

struct Conn {
    stream: TcpStream,
    state: State,
    inbound: Vec<u8>,
    /// When each message in flight was sent, oldest first (an echo server answers in order).
    sent_at: VecDeque<Instant>,
}

/// A pool of connections to one endpoint.
struct Pool {
    poll: Poll,
    conns: Vec<Conn>,
    request: Vec<u8>,
    open: usize,
}

impl Pool {
    fn new(target: &Target) -> Pool {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            target.path, target.addr
        );
        Pool {
            poll: Poll::new().expect("poll"),
            conns: Vec::with_capacity(target.connections),
            request: request.into_bytes(),
            open: 0,
        }
    }

    fn connect(&mut self, target: &Target) -> io::Result<()> {
        let i = self.conns.len();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&source(i, target.sources).into())?;
        match socket.connect(&target.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.conns.push(Conn {
            stream,
            state: State::Connecting,
            inbound: Vec::new(),
            sent_at: VecDeque::new(),
        });
        Ok(())
    }

    /// Opens every connection and completes its handshake.
    fn open_all(&mut self, target: &Target) -> io::Result<()> {
        let mut events = Events::with_capacity(4096);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while self.open < target.connections {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "only {} of {} connections opened",
                    self.open, target.connections
                )));
            }
            let started = self.conns.len();
            for _ in started..target.connections.min(started + CONNECTS_PER_TURN) {
                self.connect(target)?;
            }
            self.poll
                .poll(&mut events, Some(Duration::from_millis(10)))?;
            for event in events.iter() {
                let request = &self.request;
                let conn = &mut self.conns[event.token().0];
                if conn.state == State::Connecting && event.is_writable() {
                    if let Some(e) = conn.stream.take_error()? {
                        return Err(e);
                    }
                    conn.stream.write_all(request)?;
                    conn.state = State::Handshaking;
                }
                if conn.state == State::Handshaking && event.is_readable() && read_head(conn)? {
                    self.open += 1;
                }
            }
        }
        Ok(())
    }
}

/// Reads the handshake answer. Returns `true` once the connection is upgraded.
fn read_head(conn: &mut Conn) -> io::Result<bool> {
    let mut buf = [0u8; 1024];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return Err(io::Error::other("server closed during the handshake")),
            Ok(n) => conn.inbound.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Some(end) = conn.inbound.windows(4).position(|w| w == b"\r\n\r\n") {
            if !conn.inbound.starts_with(b"HTTP/1.1 101") {
                return Err(io::Error::other("handshake refused"));
            }
            conn.inbound.drain(..end + 4);
            conn.state = State::Open;
            return Ok(true);
        }
    }
}

/// A masked binary client frame with a `len`-byte payload (the mask is fixed: the server
/// unmasks whatever it is).
fn client_frame(len: usize) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82];
    match len {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend((0..len).map(|i| (i as u8) ^ mask[i % 4]));
    frame
}

/// Length of the server frame at the start of `buf`, if it is all there.
fn server_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let (header, payload) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize),
        126 | 127 => return None,
        n => (2, n as usize),
    };
    (buf.len() >= header + payload).then_some(header + payload)
}

/// Closed-loop echo with `window` messages in flight per connection. The echoes that one read
/// brings back are answered with one write, so a window above 1 also batches system calls.
pub fn echo(
    target: &Target,
    message_bytes: usize,
    window: usize,
    warmup_s: u64,
    duration_s: u64,
) -> io::Result<()> {
    let window = window.max(1);
    let mut pool = Pool::new(target);
    let connect_start = Instant::now();
    pool.open_all(target)?;
    println!(
        "connections: {} open in {:.2?}",
        pool.open,
        connect_start.elapsed()
    );
    let frame = client_frame(message_bytes);
    let batch = frame.repeat(window);
    for conn in &mut pool.conns {
        conn.stream.write_all(&batch)?;
        conn.sent_at
            .extend(std::iter::repeat(Instant::now()).take(window));
    }
    let mut latency_us =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup_s);
    let end = measure_from + Duration::from_secs(duration_s);
    let mut measuring = false;
    let mut messages = 0u64;
    let mut cpu_start = (0.0, 0.0);
    while Instant::now() < end {
        if !measuring && Instant::now() >= measure_from {
            measuring = true;
            messages = 0;
            latency_us.reset();
            cpu_start = target
                .server_pid
                .map(procfs::user_system_s)
                .transpose()?
                .unwrap_or((0.0, 0.0));
        }
        pool.poll
            .poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            let conn = &mut pool.conns[event.token().0];
            if !event.is_readable() {
                continue;
            }
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("server closed a connection")),
                    // A short read emptied the socket; data arriving later raises a new edge
                    // (epoll reports every arrival), so the read that could only answer
                    // WouldBlock is skipped: one system call in three per echoed message.
                    Ok(n) if n < buf.len() => {
                        conn.inbound.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Ok(n) => conn.inbound.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            let mut echoed = 0;
            while let Some(len) = server_frame_len(&conn.inbound) {
                conn.inbound.drain(..len);
                let Some(sent_at) = conn.sent_at.pop_front() else {
                    return Err(io::Error::other("the server echoed more than was sent"));
                };
                latency_us.saturating_record(now.duration_since(sent_at).as_micros() as u64);
                messages += 1;
                echoed += 1;
            }
            if echoed > 0 {
                conn.stream.write_all(&batch[..echoed * frame.len()])?;
                conn.sent_at.extend(std::iter::repeat(now).take(echoed));
            }
        }
    }
    let wall_s = duration_s as f64;
    println!(
        "messages: {messages} in {wall_s:.1} s = {:.0} msg/s",
        messages as f64 / wall_s
    );
    println!(
        "latency_us: p50 {} p99 {} p99.9 {} max {}",
        latency_us.value_at_quantile(0.5),
        latency_us.value_at_quantile(0.99),
        latency_us.value_at_quantile(0.999),
        latency_us.max()
    );
    if let Some(pid) = target.server_pid {
        let (user_s, system_s) = procfs::user_system_s(pid)?;
        let (user_s, system_s) = (user_s - cpu_start.0, system_s - cpu_start.1);
        let cpu_s = user_s + system_s;
        println!("server_cpu_s: {cpu_s:.2} (user {user_s:.2}, system {system_s:.2})");
        println!(
            "msg_per_server_cpu_s: {:.0}",
            messages as f64 / cpu_s.max(0.01)
        );
    }
    Ok(())
}

pub fn idle(target: &Target, hold_s: u64) -> io::Result<()> {
    let pid = target
        .server_pid
        .ok_or_else(|| io::Error::other("idle needs --server-pid"))?;
    let rss_before = procfs::rss_bytes(pid)?;
    let mut pool = Pool::new(target);
    pool.open_all(target)?;
    // Let the server finish its turn and any lazy work before reading its memory.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = procfs::rss_bytes(pid)?;
    let growth = rss_after.saturating_sub(rss_before);
    println!("connections: {}", pool.open);
    println!("server_rss_bytes: before {rss_before} after {rss_after}");
    println!(
        "rss_growth_bytes_per_connection: {:.0}",
        growth as f64 / pool.open as f64
    );
    std::thread::sleep(Duration::from_secs(hold_s));
    Ok(())
}
