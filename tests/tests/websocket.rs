//! WebSocket behaviour on /echo and /ws.

use std::io::Write;
use std::time::Duration;

use chinwag_tests::{close_code, read_close_code, read_frame, write_frame, ws_close_code, Server};
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

#[test]
fn echoes_text_and_binary() {
    let server = Server::start(&["--enable-echo"]);
    let mut ws = server.ws("/echo");
    ws.send(Message::text("hello, 世界")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello, 世界"));
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    // 70,000 bytes is over the default 64 KiB: raise the limits for this test's server.
    drop(ws);
    let server = Server::start(&[
        "--enable-echo",
        "--frame-bytes-max=100000",
        "--message-bytes-max=100000",
        "--messages-per-s-max=0",
    ]);
    let mut ws = server.ws("/echo");
    ws.send(Message::binary(binary.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(binary));
    for i in 0..100 {
        ws.send(Message::text(format!("message {i}"))).unwrap();
    }
    for i in 0..100 {
        assert_eq!(ws.read().unwrap(), Message::text(format!("message {i}")));
    }
}

#[test]
fn reassembles_fragments_with_interleaved_ping() {
    let server = Server::start(&["--enable-echo"]);
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x01, "héllo ".as_bytes()); // text, not final
    write_frame(&mut stream, 0x89, b"ping!"); // a control frame may come between fragments
                                              // A character split across fragments is fine.
    let euro = "€".as_bytes();
    let mut second = b"w".to_vec();
    second.push(euro[0]);
    write_frame(&mut stream, 0x00, &second);
    let mut last = euro[1..].to_vec();
    last.extend_from_slice(b"rld");
    write_frame(&mut stream, 0x80, &last); // final continuation
    assert_eq!(read_frame(&mut stream), Some((0x8A, b"ping!".to_vec())));
    assert_eq!(
        read_frame(&mut stream),
        Some((0x81, "héllo w€rld".as_bytes().to_vec()))
    );
}

#[test]
fn frames_split_across_reads_are_reassembled() {
    let server = Server::start(&["--enable-echo"]);
    let mut stream = server.raw_ws("/echo");
    let payload = vec![7u8; 40_000];
    let frame = chinwag_tests::encode_frame(0x82, &payload);
    // Dribble the frame out in pieces, some cutting the header.
    for piece in [
        &frame[..1],
        &frame[1..3],
        &frame[3..5000],
        &frame[5000..30_000],
        &frame[30_000..],
    ] {
        stream.write_all(piece).unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_frame(&mut stream), Some((0x82, payload)));
}

#[test]
fn answers_ping_with_pong() {
    let server = Server::start(&["--enable-echo"]);
    let mut ws = server.ws("/echo");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
}

#[test]
fn close_handshake_echoes_code() {
    let server = Server::start(&["--enable-echo"]);
    let mut ws = server.ws("/echo");
    ws.close(Some(CloseFrame {
        code: close_code(4000),
        reason: "bye".into(),
    }))
    .unwrap();
    assert_eq!(ws_close_code(&mut ws), Some(4000));
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"peer_closed\"",
            1
        ),
        1
    );
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = Server::start(&["--enable-echo"]);
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x81, &[b'o', b'k', 0xC0, 0xAF]);
    assert_eq!(read_close_code(&mut stream), Some(1007));
}

#[test]
fn protocol_violations_close_with_1002() {
    let server = Server::start(&["--enable-echo"]);
    // Unmasked client frame.
    let mut stream = server.raw_ws("/echo");
    stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close_code(&mut stream), Some(1002));
    // Continuation with no message started.
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x80, b"orphan");
    assert_eq!(read_close_code(&mut stream), Some(1002));
    // Reserved opcode.
    let mut stream = server.raw_ws("/echo");
    write_frame(&mut stream, 0x83, b"");
    assert_eq!(read_close_code(&mut stream), Some(1002));
}

#[test]
fn garbage_after_handshake_does_not_disturb_others() {
    let server = Server::start(&["--enable-echo", "--shards=1"]);
    let mut good = server.ws("/echo");
    let mut bad = server.raw_ws("/echo");
    bad.write_all(&[0xFF; 4096]).unwrap();
    assert_eq!(read_close_code(&mut bad), Some(1002));
    good.send(Message::text("still here")).unwrap();
    assert_eq!(good.read().unwrap(), Message::text("still here"));
}

#[test]
fn app_endpoint_upgrades_and_speaks_the_protocol() {
    let server = Server::start(&[]);
    let mut ws = server.ws("/ws");
    ws.send(Message::text("{\"op\":\"ping\",\"req\":3}"))
        .unwrap();
    // The JSON `ping` op is answered with `pong`, and a WebSocket ping after it with a pong frame.
    ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::text("{\"op\":\"pong\",\"req\":3}")
    );
    assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec().into()));
    assert_eq!(server.wait_metric("chinwag_app_messages_total", "", 1), 1);
}
