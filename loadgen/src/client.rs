//! The WebSocket client side: one thread, one `mio::Poll`, many connections.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::check::Violation;
use crate::report::{self, Progress, Report};
use crate::{binds_sources, procfs, source, EchoArgs, Target};

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
    /// Failed and deregistered.
    Closed,
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
    /// The index of the first connection among all processes' (for its source address).
    first: usize,
}

impl Pool {
    fn new(target: &Target, first: usize) -> Pool {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            target.path,
            target.addr.split(',').next().unwrap_or(&target.addr)
        );
        Pool {
            poll: Poll::new().expect("poll"),
            conns: Vec::with_capacity(target.connections),
            request: request.into_bytes(),
            open: 0,
            first,
        }
    }

    /// Starts connection `i` (the next one), to address `i` of the list in turn.
    fn connect(&mut self, target: &Target) -> io::Result<()> {
        let i = self.conns.len();
        let addrs = target.socket_addrs()?;
        let addr = addrs[(self.first + i) % addrs.len()];
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if binds_sources(addr) {
            socket.bind(&source(self.first + i, target.sources).into())?;
        }
        match socket.connect(&addr.into()) {
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

    /// Opens `connections` connections and completes their handshakes.
    fn open_all(&mut self, target: &Target, connections: usize) -> io::Result<()> {
        let mut events = Events::with_capacity(4096);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while self.open < connections {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "only {} of {} connections opened",
                    self.open, connections
                )));
            }
            let started = self.conns.len();
            for _ in started..connections.min(started + CONNECTS_PER_TURN) {
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

    /// Counts connection `i` as failed by `cause` and stops polling it.
    fn drop_conn(&mut self, i: usize, report: &mut Report, cause: String) {
        let conn = &mut self.conns[i];
        if conn.state == State::Closed {
            return;
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        conn.state = State::Closed;
        conn.sent_at.clear();
        self.open -= 1;
        report.fail(cause);
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

/// Closed-loop echo with `--window` messages in flight per connection. The echoes that one
/// read brings back are answered with one write, so a window above 1 also batches system calls.
/// A connection the server closes, or that breaks, is counted as a failure and dropped; an
/// echo nobody sent is a violation. With `--procs`, this process takes its slice of the
/// connections.
pub fn echo(args: &EchoArgs) -> io::Result<Report> {
    let target = &args.target;
    let window = args.window.max(1);
    let mut report = Report::default();
    let mut progress = Progress::new(!args.run.quiet);
    let own_cpu_start_s = report::own_cpu_s();
    let (first, connections) = args.run.slice(target.connections);
    let mut pool = Pool::new(target, first);
    let connect_start = Instant::now();
    pool.open_all(target, connections)?;
    report.figure("mode", format!("closed loop, window {window}"));
    report.figure("connections", pool.open as u64);
    report.figure("connect_s", connect_start.elapsed().as_secs_f64());
    let frame = client_frame(args.message_bytes);
    let batch = frame.repeat(window);
    // Echo messages sent, and the bytes of them and of their echoes (handshakes not counted).
    let (mut requests, mut bytes_sent, mut bytes_received) = (0u64, 0u64, 0u64);
    progress.phase(if args.warmup_s > 0 {
        "warmup"
    } else {
        "measured"
    });
    for i in 0..pool.conns.len() {
        let conn = &mut pool.conns[i];
        let written = conn.stream.write_all(&batch);
        requests += window as u64;
        bytes_sent += batch.len() as u64;
        conn.sent_at
            .extend(std::iter::repeat(Instant::now()).take(window));
        if let Err(e) = written {
            pool.drop_conn(i, &mut report, format!("write: {e}"));
        }
    }
    let mut latency = report::latency_histogram();
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_s);
    let end = measure_from + Duration::from_secs(args.duration_s);
    let mut measuring = false;
    let (mut messages_total, mut messages) = (0u64, 0u64);
    let server_cpu = |pid: Option<u32>| -> io::Result<Option<f64>> {
        pid.map(|p| procfs::user_system_s(p).map(|(u, s)| u + s))
            .transpose()
    };
    let mut server_cpu_from = None;
    while Instant::now() < end && pool.open > 0 {
        if !measuring && Instant::now() >= measure_from {
            measuring = true;
            progress.phase("measured");
            messages = 0;
            latency.reset();
            report.window_unix_ns = Some((report::unix_ns(), 0));
            server_cpu_from = server_cpu(target.server_pid)?;
        }
        pool.poll
            .poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            let i = event.token().0;
            if !event.is_readable() || pool.conns[i].state != State::Open {
                continue;
            }
            let conn = &mut pool.conns[i];
            let mut broken = None;
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        broken = Some("closed by server".to_string());
                        break;
                    }
                    // A short read emptied the socket; data arriving later raises a new edge
                    // (epoll reports every arrival), so the read that could only answer
                    // WouldBlock is skipped: one system call in three per echoed message.
                    Ok(n) if n < buf.len() => {
                        bytes_received += n as u64;
                        conn.inbound.extend_from_slice(&buf[..n]);
                        break;
                    }
                    Ok(n) => {
                        bytes_received += n as u64;
                        conn.inbound.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        broken = Some(format!("read: {e}"));
                        break;
                    }
                }
            }
            let now = Instant::now();
            let mut echoed = 0;
            while let Some(len) = server_frame_len(&conn.inbound) {
                conn.inbound.drain(..len);
                let Some(sent_at) = conn.sent_at.pop_front() else {
                    report.violations.add(Violation::Other(format!(
                        "connection {i}: the server echoed more than was sent"
                    )));
                    broken = Some("echo of nothing sent".into());
                    break;
                };
                report::record(&mut latency, now.duration_since(sent_at));
                messages += 1;
                messages_total += 1;
                echoed += 1;
            }
            if echoed > 0 && broken.is_none() {
                if let Err(e) = conn.stream.write_all(&batch[..echoed * frame.len()]) {
                    broken = Some(format!("write: {e}"));
                }
                requests += echoed as u64;
                bytes_sent += (echoed * frame.len()) as u64;
                conn.sent_at.extend(std::iter::repeat(now).take(echoed));
            }
            if let Some(cause) = broken {
                pool.drop_conn(i, &mut report, cause);
            }
        }
        progress.tick(
            pool.open,
            messages_total,
            report.failures_total() + report.violations.count,
            latency.value_at_quantile(0.99),
        );
    }
    // A run whose every connection dropped during the warm-up measured nothing.
    let from_ns = report.window_unix_ns.map_or(report::unix_ns(), |w| w.0);
    report.window_unix_ns = Some((from_ns, report::unix_ns()));
    let measured_s = args.duration_s.max(1) as f64;
    report.figure("messages", messages);
    report.figure("measured_s", measured_s);
    report.figure("messages_per_s", messages as f64 / measured_s);
    if let (Some(from), Some(to)) = (server_cpu_from, server_cpu(target.server_pid)?) {
        let cpu_s = to - from;
        report.figure("server_cpu_s", cpu_s);
        report.figure("msg_per_server_cpu_s", messages as f64 / cpu_s.max(0.01));
    }
    if let Some(pid) = target.server_pid {
        report.figure("server_rss_bytes", procfs::rss_bytes(pid)?);
    }
    // The whole run's CPU (connecting included), so a reader can tell whether the load
    // generator was the limit.
    report.figure("loadgen_cpu_s", report::own_cpu_s() - own_cpu_start_s);
    report.latencies.push(("echo".into(), latency));
    report.figure("requests", requests);
    report.figure("bytes_sent", bytes_sent);
    report.figure("bytes_received", bytes_received);
    report.series = progress.series();
    Ok(report)
}

pub fn idle(target: &Target, hold_s: u64) -> io::Result<()> {
    let pid = target
        .server_pid
        .ok_or_else(|| io::Error::other("idle needs --server-pid"))?;
    let rss_before = procfs::rss_bytes(pid)?;
    let mut pool = Pool::new(target, 0);
    pool.open_all(target, target.connections)?;
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
