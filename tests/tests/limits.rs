//! Every limit of docs/operations.md, enforced.

use std::io::Write;
use std::time::{Duration, Instant};

use chinwag_tests::{read_close_code, write_frame, ws_close_code, Server};
use tungstenite::Message;

#[test]
fn rejects_frame_longer_than_limit() {
    let server = Server::start(&["--enable-echo", "--frame-bytes-max=1000"]);
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x82, &[0u8; 1001]);
    assert_eq!(read_close_code(&mut stream), Some(1009));
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"too_large\"",
            1
        ),
        1
    );
}

#[test]
fn rejects_fragmented_message_longer_than_limit() {
    let server = Server::start(&[
        "--enable-echo",
        "--frame-bytes-max=1000",
        "--message-bytes-max=2500",
    ]);
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x02, &[1u8; 1000]);
    write_frame(&mut stream, 0x00, &[2u8; 1000]);
    write_frame(&mut stream, 0x80, &[3u8; 1000]);
    assert_eq!(read_close_code(&mut stream), Some(1009));
}

#[test]
fn closes_reader_that_falls_behind_and_others_keep_working() {
    let server = Server::start(&[
        "--enable-echo",
        "--shards=1",
        "--messages-per-s-max=0",
        "--send-queue-bytes-max=200000",
        "--message-bytes-max=65536",
    ]);
    let mut fine = server.ws("/echo");
    // This client sends and never reads: its echoes pile up in the kernel buffers and then in
    // the server's queue for it, until the queue limit closes it.
    let mut stalled = server.raw_ws("/echo");
    stalled
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let frame = chinwag_tests::encode_frame(0x82, &[0u8; 60_000]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent_bytes = 0usize;
    // Bounded: at most 1 GiB or 20 s; the server must cut us off long before.
    while sent_bytes < 1 << 30 && Instant::now() < deadline {
        if stalled.write_all(&frame).is_err() {
            break;
        }
        sent_bytes += frame.len();
        if server.metric(
            "chinwag_connections_closed_total",
            "reason=\"send_queue_full\"",
        ) > 0
        {
            break;
        }
    }
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"send_queue_full\"",
            1
        ),
        1
    );
    fine.send(Message::text("unaffected")).unwrap();
    assert_eq!(fine.read().unwrap(), Message::text("unaffected"));
    // The queue's memory went with the connection.
    assert_eq!(server.metric("chinwag_send_queue_bytes", ""), 0);
}

#[test]
fn drops_messages_over_rate() {
    let server = Server::start(&["--enable-echo", "--messages-per-s-max=5"]);
    let mut stream = server.raw_ws("/echo");
    let mut burst = Vec::new();
    for i in 0..20u8 {
        burst.extend_from_slice(&chinwag_tests::encode_frame(0x82, &[i]));
    }
    stream.write_all(&burst).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut echoed = 0;
    while let Some((_, payload)) = chinwag_tests::read_frame(&mut stream) {
        assert_eq!(payload, [echoed as u8], "the first messages pass, in order");
        echoed += 1;
    }
    // A fixed one-second window: a burst can straddle two windows, so at most twice the rate.
    assert!((5..=10).contains(&echoed), "echoed {echoed} of 20");
    assert!(server.metric("chinwag_messages_rate_limited_total", "") >= 10);
}

#[test]
fn refuses_connections_over_per_shard_limit() {
    let server = Server::start(&[
        "--enable-echo",
        "--shards=1",
        "--connections-per-shard-max=3",
    ]);
    let mut open: Vec<_> = (0..3).map(|_| server.ws("/echo")).collect();
    assert!(
        server.try_ws("/echo").is_err(),
        "a fourth connection must be refused"
    );
    // The first three still work.
    for ws in &mut open {
        ws.send(Message::text("x")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("x"));
    }
    // Free a slot to be able to scrape.
    open.pop().unwrap().close(None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.wait_metric("chinwag_connections_refused_total", "", 1) >= 1);
}

#[test]
fn closes_idle_connection_and_keeps_pinging_one() {
    let server = Server::start(&["--enable-echo", "--idle-timeout-ms=1500"]);
    let mut idle = server.ws("/echo");
    let mut pinging = server.ws("/echo");
    pinging
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    // Pings every 100 ms or so, far inside the 1.5 s idle timeout even on a loaded machine.
    while start.elapsed() < Duration::from_millis(3000) {
        pinging.send(Message::Ping(b"k".to_vec().into())).unwrap();
        // Reading the pong is enough; a timeout here is fine.
        let _ = pinging.read();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ws_close_code(&mut idle), Some(1000));
    pinging
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    pinging.send(Message::text("alive")).unwrap();
    loop {
        match pinging.read().unwrap() {
            Message::Pong(_) => continue,
            other => {
                assert_eq!(other, Message::text("alive"));
                break;
            }
        }
    }
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"idle_timeout\"",
            1
        ),
        1
    );
}

#[test]
fn drops_peer_that_never_answers_close() {
    let server = Server::start(&[
        "--enable-echo",
        "--idle-timeout-ms=300",
        "--close-timeout-ms=400",
    ]);
    let mut stream = server.raw_ws("/echo");
    // Idle: the server sends close 1000 and waits for our close frame, which never comes.
    assert_eq!(read_close_code(&mut stream), Some(1000));
    let start = Instant::now();
    assert_eq!(chinwag_tests::read_frame(&mut stream), None, "then EOF");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "dropped after close_timeout_ms, not later"
    );
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"idle_timeout\"",
            1
        ),
        1
    );
}

#[test]
fn flooding_connection_does_not_starve_others() {
    let server = Server::start(&["--enable-echo", "--shards=1"]);
    let flood_addr = server.addr;
    let flooder = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(flood_addr).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
            .write_all(
                b"GET /echo HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .unwrap();
        let burst: Vec<u8> = (0..1000)
            .flat_map(|_| chinwag_tests::encode_frame(0x82, &[0u8; 100]))
            .collect();
        // Bounded: two seconds of writing as fast as the server reads. It never reads its
        // echoes, which the rate limit (100/s by default) mostly drops anyway.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && stream.write_all(&burst).is_ok() {}
    });
    let mut ws = server.ws("/echo");
    // Twenty round trips, spread over the flood's two seconds, each answered correctly.
    for i in 0..20 {
        ws.send(Message::text(format!("{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("{i}")));
        std::thread::sleep(Duration::from_millis(50));
    }
    flooder.join().unwrap();
    assert!(server.metric("chinwag_messages_rate_limited_total", "") > 0);
}
