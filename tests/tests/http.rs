//! The plain HTTP side of the client port.

use std::io::{Read, Write};
use std::time::Duration;

use chinwag_tests::{parse_response, Server};

#[test]
fn healthz_metrics_and_not_found() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(server.get("/nope").0, 404);
    // Without --enable-echo, /echo does not exist.
    assert_eq!(server.get("/echo").0, 404);
    assert!(server.try_ws("/echo").is_err());
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "chinwag_connections_open",
        "chinwag_connections_accepted_total",
        "chinwag_connections_refused_total",
        "chinwag_connections_closed_total",
        "chinwag_frames_in_total",
        "chinwag_bytes_out_total",
        "chinwag_send_queue_bytes",
        "chinwag_mailbox_depth",
        "chinwag_loop_turn_seconds",
    ] {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
    }
    assert!(
        body.contains("chinwag_connections_open{shard=\"1\"}"),
        "per-shard samples"
    );
    // Every request so far was accepted and answered.
    assert!(server.metric("chinwag_connections_closed_total", "reason=\"http_done\"") >= 4);
}

#[test]
fn rejects_request_head_over_8_kib() {
    let server = Server::start(&[]);
    let mut stream = server.tcp();
    let filler = "a".repeat(9 * 1024);
    // Without the final blank line the head never ends; the server must stop at 8 KiB.
    write!(stream, "GET /ws HTTP/1.1\r\nX-Filler: {filler}\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert_eq!(parse_response(&response).0, 431, "{response}");
}

#[test]
fn answers_garbage_with_400_and_keeps_serving() {
    let server = Server::start(&[]);
    let mut stream = server.tcp();
    stream
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert_eq!(parse_response(&response).0, 400);
    assert_eq!(server.get("/healthz").0, 200);
}

#[test]
fn closes_handshake_not_finished_in_time() {
    let server = Server::start(&["--handshake-timeout-ms=300"]);
    let mut stream = server.tcp();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: slow\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut rest = Vec::new();
    // The server closed without an answer: EOF, no bytes.
    let n = stream.read_to_end(&mut rest).expect("EOF, not a timeout");
    assert_eq!(n, 0);
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"handshake_timeout\"",
            1
        ),
        1
    );
}

#[test]
fn upgrade_needs_websocket_headers() {
    let server = Server::start(&[]);
    let mut stream = server.tcp();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert_eq!(parse_response(&response).0, 426);
}

#[test]
fn request_followed_by_fin_is_answered_and_closed_at_once() {
    // A close timeout far beyond the wait below: only a prompt close passes.
    let server = Server::start(&["--close-timeout-ms=60000"]);
    let mut stream = server.tcp();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert_eq!(parse_response(&response).0, 200);
    // The server saw our FIN with the request and drops the connection without waiting for
    // close_timeout_ms: nothing stays open.
    assert_eq!(
        server.wait_metric(
            "chinwag_connections_closed_total",
            "reason=\"http_done\"",
            1
        ),
        1
    );
}
