//! Stream tail benchmark: how fast a service reads the message stream (docs/backend.md, "The
//! message stream") from a full log.
//!
//! 1. Subscribes from "now" on an empty node and keeps the first batch's position.
//! 2. Fills the log over the service port: `send_as` from 1,000 users, each to its own direct
//!    conversation, `--window` requests in flight, until `MESSAGES` are stored.
//! 3. Subscribes again from the kept position on a new connection and reads until every
//!    message has come, counting messages per `stream_batch` from the binary header and the
//!    batch's count (no decoding of the messages, so the reader is not the limit).
//!
//! Prints messages per second (wall clock) and per second of the server's CPU time
//! (utime+stime from /proc/PID/stat over the read).
//!
//! ```sh
//! stream_tail ADDR SECRET SERVER_PID [MESSAGES]
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::token::{self, Claims};
use chinwag_protocol::{binary, Frame, Message, Send, SendAs, Target, Uid, UidKind};

/// Users that send; message k goes from user k mod USERS to its peer.
const USERS: u64 = 1_000;
/// `send_as` requests in flight while filling.
const WINDOW: usize = 512;
/// The binary header: u32 length, u8 version, u8 op, u16 flags, u64 req.
const HEADER_BYTES: usize = 16;
const OP_STREAM_BATCH: u8 = 0x96;
const OP_ERROR: u8 = 0x80;
/// Longest wait for the whole read.
const READ_DEADLINE: Duration = Duration::from_secs(300);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: stream_tail ADDR SECRET SERVER_PID [MESSAGES]");
        std::process::exit(2);
    }
    let (addr, secret) = (&args[0], &args[1]);
    let pid: u32 = args[2].parse().expect("SERVER_PID is a number");
    let messages: u64 = args
        .get(3)
        .map_or(1_000_000, |m| m.parse().expect("MESSAGES is a number"));
    let token = service_token(secret);

    // 1. The position of "now", before anything is stored.
    let mut first = ServiceClient::connect(addr, &token).expect("service port");
    let reply = first
        .call(Message::Subscribe("".into()))
        .expect("subscribe");
    let Message::StreamBatch(batch) = reply.message else {
        panic!("subscribe answered {:?}", reply.message.op());
    };
    let from = batch.position.into_owned();
    drop(first);

    // 2. Fill the log.
    let mut service = ServiceClient::connect(addr, &token).expect("service port");
    let filled_at = Instant::now();
    let body = "x".repeat(32);
    let mut sent = 0u64;
    while sent < messages {
        let batch = (messages - sent).min(WINDOW as u64);
        let mut reqs = Vec::with_capacity(batch as usize);
        for k in sent..sent + batch {
            let from = Uid::new(UidKind::Buyer, 1 + k % USERS);
            let to = Uid::new(UidKind::Buyer, 1 + USERS + k % USERS);
            let cmid = format!("t-{k}");
            let send = Send {
                target: Target::User(to),
                cmid: cmid.as_str().into(),
                kind: "text".into(),
                body: body.as_str().into(),
            };
            reqs.push(
                service
                    .send(Message::SendAs(SendAs { from, send }))
                    .expect("send_as"),
            );
        }
        for req in reqs {
            let reply = service.wait(req).expect("send_as reply");
            assert!(
                matches!(reply.message, Message::SendAsOk(_)),
                "send_as answered {:?}",
                reply.message
            );
        }
        sent += batch;
    }
    let fill_s = filled_at.elapsed().as_secs_f64();
    println!(
        "filled {messages} messages in {fill_s:.2} s ({:.0} send_as/s)",
        messages as f64 / fill_s
    );
    drop(service);

    // 3. Read them all from the stream.
    let mut stream = TcpStream::connect(addr).expect("service port");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write_frame(&mut stream, 1, Message::Auth(token.as_str().into()));
    write_frame(&mut stream, 2, Message::Subscribe(from.as_str().into()));
    let cpu_from = cpu_s(pid);
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    let (mut read, mut batches) = (0u64, 0u64);
    while read < messages {
        assert!(
            started.elapsed() < READ_DEADLINE,
            "read {read} of {messages}"
        );
        // Whole frames in buf[start..end]; a partial one is moved to the front.
        while end - start >= HEADER_BYTES {
            let len =
                u32::from_be_bytes(buf[start..start + 4].try_into().expect("4 bytes")) as usize;
            if end - start < len {
                break;
            }
            let op = buf[start + 5];
            let body = &buf[start + HEADER_BYTES..start + len];
            if op == OP_STREAM_BATCH {
                let position = u16::from_be_bytes([body[0], body[1]]) as usize;
                let count = u16::from_be_bytes([body[2 + position], body[3 + position]]);
                read += u64::from(count);
                batches += 1;
            } else if op == OP_ERROR {
                let frame = binary::decode(&buf[start..start + len]);
                panic!("the server refused the subscription: {frame:?}");
            }
            start += len;
        }
        if read >= messages {
            break;
        }
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream
            .read(&mut buf[end..])
            .unwrap_or_else(|e| panic!("read the stream after {read} messages: {e}"));
        assert!(n > 0, "the server closed the stream");
        end += n;
    }
    let read_s = started.elapsed().as_secs_f64();
    let cpu = cpu_s(pid) - cpu_from;
    println!("model: {}", cpu_model());
    println!("read {read} messages in {batches} batches in {read_s:.3} s");
    println!("messages_per_s: {:.0}", read as f64 / read_s);
    println!("server_cpu_s: {cpu:.2}");
    println!(
        "messages_per_server_cpu_s: {:.0}",
        read as f64 / cpu.max(0.01)
    );
}

fn service_token(secret: &str) -> String {
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    token::mint(
        secret.as_bytes(),
        &Claims {
            uid: Uid::new(UidKind::Service, 1),
            shop: None,
            exp: now_s + 3_600,
        },
    )
}

fn write_frame(stream: &mut TcpStream, req: u64, message: Message<'_>) {
    let mut out = BytesMut::new();
    binary::encode(&Frame::with_req(req, message), &mut out).expect("encodes");
    stream.write_all(&out).expect("write");
}

/// utime + stime of `pid`, seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("server's stat");
    let rest = stat.rsplit_once(')').expect("stat has a comm").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a system constant.
    #[allow(unsafe_code)]
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_s
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
