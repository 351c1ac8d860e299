//! The HTTP form of the service ops (`POST /api/<op>` on the client port, docs/backend.md "Over
//! HTTP") against the real binary: every op, answered with the same typed model as the service
//! port; the errors (401, 404, 400, 413, 405, 503); the long-poll `subscribe` tailed the way a
//! shell loop with curl tails it, resumed from each answer's position without gap.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use chinwag_protocol::client::ClientError;
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{json, ConvId, ConvType, ErrorCode, Frame, Message, Uid, UidKind};
use chinwag_tests::{buyer, parse_response, push, read_response, Server};

const SECRET: &str = "api-secret-api-secret-api-secret-api";
const LONG: Duration = Duration::from_secs(5);

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-secret", SECRET, "--messages-per-s-max=0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn service_token() -> String {
    chinwag_tests::mint_token(SECRET, Uid::new(UidKind::Service, 1))
}

/// `POST /api/<op>` with the service token; fails the test unless it is answered 200.
fn ok(server: &Server, op: &str, body: &str) -> Message<'static> {
    let (status, message) = server.api(op, &service_token(), body);
    assert_eq!(status, 200, "{op} {body}: {message:?}");
    message
}

/// `POST /api/<op>` with the service token, expecting an `error`: its status, code and text.
fn refused(server: &Server, op: &str, body: &str) -> (u16, ErrorCode, String) {
    let (status, message) = server.api(op, &service_token(), body);
    match message {
        Message::Error(e) => (status, e.code, e.message.into_owned()),
        other => panic!("{op} {body}: expected an error, got {status} {other:?}"),
    }
}

#[test]
fn every_service_op_over_http_does_what_it_does_on_the_service_port() {
    let server = start(&[]);
    let mut web = server.login(buyer(1));

    // send_as: stored as the user, pushed to the other side, idempotent by cmid.
    let body = r#"{"from":"buyer:2","user":"buyer:1","cmid":"h-1","kind":"text","body":"hello"}"#;
    let Message::SendAsOk(sent) = ok(&server, "send_as", body) else {
        panic!("send_as_ok")
    };
    assert_eq!(sent.seq.0, 1);
    let Message::Msg(msg) = push(&mut web) else {
        panic!("a msg push")
    };
    assert_eq!(
        (msg.conv, msg.from, &*msg.body),
        (sent.conv, buyer(2), "hello")
    );
    assert_eq!(
        ok(&server, "send_as", body),
        Message::SendAsOk(sent),
        "a retry"
    );

    // notify_users: the notify push, counted by users named.
    let body = r#"{"users":["buyer:1","buyer:77"],"kind":"order","body":"shipped"}"#;
    assert_eq!(ok(&server, "notify_users", body), Message::NotifyUsersOk(2));
    let Message::Notify(notify) = push(&mut web) else {
        panic!("a notify push")
    };
    assert_eq!((&*notify.kind, &*notify.body), ("order", "shipped"));

    // conv_history: the page, as the service port's conv_history_ok.
    let body = format!(r#"{{"conv":"{}","limit":10}}"#, sent.conv.0);
    let Message::ConvHistoryOk(page) = ok(&server, "conv_history", &body) else {
        panic!("conv_history_ok")
    };
    assert_eq!(page.msgs.len(), 1);
    assert_eq!(page.msgs[0].cmid, "h-1");

    // presence: buyer 1's device, no one else.
    let body = r#"{"users":["buyer:1","buyer:2"]}"#;
    let Message::PresenceOk(online) = ok(&server, "presence", body) else {
        panic!("presence_ok")
    };
    assert_eq!(online.len(), 1);
    assert_eq!((online[0].uid, online[0].devices.len()), (buyer(1), 1));

    // Groups: create (once per key), add, remove, info; members get the members push.
    let body = r#"{"key":"41","users":["buyer:1","buyer:2"]}"#;
    let Message::GroupCreateOk(group) = ok(&server, "group_create", body) else {
        panic!("group_create_ok")
    };
    assert!(group.created);
    assert_eq!(group.conv_type, ConvType::Group);
    assert_eq!(group.members, [buyer(1), buyer(2)]);
    let Message::Members(members) = push(&mut web) else {
        panic!("a members push")
    };
    assert_eq!(members.conv, group.conv);
    let Message::GroupCreateOk(again) = ok(&server, "group_create", body) else {
        panic!("group_create_ok")
    };
    assert_eq!((again.conv, again.created), (group.conv, false));
    let conv = group.conv.0;
    let add = format!(r#"{{"conv":"{conv}","users":["buyer:3"]}}"#);
    let Message::GroupAddOk(added) = ok(&server, "group_add", &add) else {
        panic!("group_add_ok")
    };
    assert_eq!(added.member_count, 3);
    let remove = format!(r#"{{"conv":"{conv}","users":["buyer:2"]}}"#);
    let Message::GroupRemoveOk(removed) = ok(&server, "group_remove", &remove) else {
        panic!("group_remove_ok")
    };
    assert_eq!(removed.members, [buyer(1), buyer(3)]);
    let Message::ConvInfoOk(info) = ok(&server, "conv_info", &format!(r#"{{"conv":"{conv}"}}"#))
    else {
        panic!("conv_info_ok")
    };
    assert_eq!(info.members, [buyer(1), buyer(3)]);
    // Errors of the ops themselves, with the status of their code and nothing stored.
    let remove_again = refused(&server, "group_remove", &remove);
    assert_eq!(
        (remove_again.0, remove_again.1),
        (403, ErrorCode::NotMember)
    );
    let unknown = refused(&server, "conv_info", r#"{"conv":"999999"}"#);
    assert_eq!((unknown.0, unknown.1), (404, ErrorCode::NotFound));

    // agent_stats: the shop's reception figures over a window.
    let body = r#"{"shop":"5","from_ms":0,"to_ms":99999999999999}"#;
    let Message::AgentStatsOk(stats) = ok(&server, "agent_stats", body) else {
        panic!("agent_stats_ok")
    };
    assert_eq!(stats.shop.0, 5);
    assert!(stats.from_ms <= stats.to_ms, "{stats:?}");

    // set_profile / get_profile: stored, read back, and carried to the client in `msg`.
    let body = r#"{"user":"buyer:2","nick":"Bo","avatar":"https://a/2.png"}"#;
    assert_eq!(ok(&server, "set_profile", body), Message::SetProfileOk);
    let Message::GetProfileOk(of) = ok(&server, "get_profile", r#"{"user":"buyer:2"}"#) else {
        panic!("get_profile_ok")
    };
    assert_eq!(
        (&*of.profile.name, &*of.profile.avatar),
        ("Bo", "https://a/2.png")
    );
    let body = format!(r#"{{"user":"buyer:2","nick":"{}"}}"#, "n".repeat(65));
    let bad = refused(&server, "set_profile", &body);
    assert_eq!((bad.0, bad.1), (400, ErrorCode::BadRequest), "{bad:?}");

    // kick: the session is kicked and closed with 4001.
    assert_eq!(
        ok(&server, "kick", r#"{"uid":"buyer:1"}"#),
        Message::KickOk(1)
    );
    loop {
        match web.next_push(LONG) {
            Ok(Some(frame)) if matches!(frame.message, Message::Kicked(_)) => continue,
            Ok(Some(_)) => continue,
            Err(ClientError::Closed { code, .. }) => {
                assert_eq!(code, Some(4001));
                break;
            }
            other => panic!("expected close 4001, got {other:?}"),
        }
    }
}

/// The same request over HTTP and on the service port gets the same message: one model.
#[test]
fn http_and_the_service_port_answer_with_the_same_message() {
    let server = start(&[]);
    let mut service = ServiceClient::connect(&server.backend_addr.to_string(), &service_token())
        .expect("service connects");
    let body = r#"{"key":"7","users":["buyer:5","agent:9"]}"#;
    let over_http = ok(&server, "group_create", body);
    let Message::GroupCreateOk(created) = &over_http else {
        panic!("group_create_ok")
    };
    let info = service
        .call(Message::ConvInfo(created.conv))
        .expect("conv_info");
    let Message::ConvInfoOk(binary_info) = info.message else {
        panic!("conv_info_ok")
    };
    let conv = created.conv.0;
    let Message::ConvInfoOk(http_info) =
        ok(&server, "conv_info", &format!(r#"{{"conv":"{conv}"}}"#))
    else {
        panic!("conv_info_ok")
    };
    assert_eq!(http_info, binary_info);
    // And the HTTP body is the JSON mapping of that message, byte for byte.
    let (_, text) = server.post(
        "/api/conv_info",
        Some(&service_token()),
        &format!(r#"{{"conv":"{conv}"}}"#),
    );
    let expected = json::encode_to_bytes(&Frame::new(Message::ConvInfoOk(binary_info)));
    assert_eq!(text.trim_end().as_bytes(), &expected[..]);
}

#[test]
fn bad_requests_get_the_status_and_error_code_that_say_why() {
    let server = start(&["--backend-frame-bytes-max=4096"]);
    let body = r#"{"users":["buyer:1"]}"#;

    // 401: no token, a forged one, a client's token. Nothing is done.
    let (status, text) = server.post("/api/presence", None, body);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains(r#""code":"unauthorized""#), "{text}");
    assert!(
        text.contains("Authorization"),
        "says what is missing: {text}"
    );
    for token in ["a.b.c".to_string(), server.token(buyer(1))] {
        let (status, message) = server.api("presence", &token, body);
        assert_eq!(status, 401);
        assert!(
            matches!(&message, Message::Error(e) if e.code == ErrorCode::Unauthorized),
            "{message:?}"
        );
    }
    let (status, message) = server.api("notify_users", &server.token(buyer(1)), body);
    assert_eq!(status, 401, "{message:?}");

    // 404: an op that is not a service request.
    for op in ["nope", "send", "auth", "presence_ok"] {
        let (status, code, text) = refused(&server, op, body);
        assert_eq!((status, code), (404, ErrorCode::NotFound), "{op}: {text}");
        assert!(text.contains(op), "{text}");
    }

    // 400: bad JSON, a missing field, a bad value: the text names what is wrong.
    for (body, names) in [
        ("{", "JSON"),
        (r#"["buyer:1"]"#, "JSON"),
        (r#"{"usrs":["buyer:1"]}"#, "users"),
        (r#"{"users":["nobody:1"]}"#, "users"),
        (r#"{"op":"kick","users":["buyer:1"]}"#, "op"),
    ] {
        let (status, code, text) = refused(&server, "presence", body);
        assert_eq!(
            (status, code),
            (400, ErrorCode::BadRequest),
            "{body}: {text}"
        );
        assert!(text.contains(names), "{body}: {text}");
    }
    let (status, code, text) = refused(&server, "subscribe", r#"{"from":"00ff"}"#);
    assert_eq!((status, code), (400, ErrorCode::BadRequest));
    assert!(text.contains("resume position"), "{text}");

    // 413: a body over backend_frame_bytes_max, answered without reading it (and the
    // answer arrives whole although the body is never read).
    let big = format!(
        r#"{{"users":["buyer:1"],"pad":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let (status, code, text) = refused(&server, "presence", &big);
    assert_eq!((status, code), (413, ErrorCode::TooLarge), "{text}");
    assert!(text.contains("4096"), "names the limit: {text}");

    // 405: the API takes POST only.
    let (status, text) = server.get("/api/presence");
    assert_eq!(status, 405, "{text}");
    assert!(text.contains(r#""code":"bad_request""#), "{text}");

    // A chunked body is refused rather than misread.
    let mut stream = server.tcp();
    write!(
        stream,
        "POST /api/presence HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert_eq!(parse_response(&response).0, 400, "{response}");

    // The node is unharmed: a good request still works.
    assert_eq!(
        ok(&server, "presence", body),
        Message::PresenceOk(Vec::new())
    );
}

/// A body that arrives in pieces (and after `Expect: 100-continue`) is read whole; one that
/// never completes is dropped after `handshake_timeout_ms`, and a client that shuts its side
/// after a whole request still gets the answer.
#[test]
fn a_body_in_pieces_is_read_whole_and_a_missing_one_is_dropped() {
    let server = start(&["--handshake-timeout-ms=1500"]);
    let body = r#"{"users":["buyer:1","buyer:2"],"kind":"k","body":"in pieces"}"#;
    let mut stream = server.tcp();
    write!(
        stream,
        "POST /api/notify_users HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        service_token(),
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    let (first, second) = body.split_at(20);
    stream.write_all(first.as_bytes()).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream.write_all(second.as_bytes()).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, "{\"op\":\"notify_users_ok\",\"count\":2}\n");

    // Half a body, then nothing: the connection is dropped, unanswered, nothing done.
    let mut stalled = server.tcp();
    write!(
        stalled,
        "POST /api/notify_users HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n{first}",
        service_token(),
        body.len()
    )
    .unwrap();
    let mut rest = Vec::new();
    stalled
        .read_to_end(&mut rest)
        .expect("closed within the read timeout");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // A whole request, then the client's FIN: the answer still comes.
    let mut half_closed = server.tcp();
    write!(
        half_closed,
        "POST /api/notify_users HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        service_token(),
        body.len()
    )
    .unwrap();
    half_closed.shutdown(std::net::Shutdown::Write).unwrap();
    let mut response = String::new();
    half_closed.read_to_string(&mut response).unwrap();
    assert_eq!(parse_response(&response).0, 200, "{response}");
}

/// A long poll from "now" with nothing stored answers an empty batch once its wait is over;
/// one with messages after its position answers at once with them.
#[test]
fn subscribe_is_a_long_poll_from_now_or_from_a_position() {
    let server = start(&[]);
    let Message::StreamBatch(empty) = ok(&server, "subscribe?wait_ms=200", "") else {
        panic!("stream_batch")
    };
    assert!(empty.msgs.is_empty());
    assert!(!empty.position.is_empty());
    let body = r#"{"from":"buyer:2","user":"buyer:1","cmid":"s-1","kind":"text","body":"one"}"#;
    ok(&server, "send_as", body);
    let from = format!(r#"{{"from":"{}"}}"#, empty.position);
    let Message::StreamBatch(batch) = ok(&server, "subscribe?wait_ms=10000", &from) else {
        panic!("stream_batch")
    };
    assert_eq!(batch.msgs.len(), 1);
    assert_eq!(batch.msgs[0].body, "one");
    // From the new position nothing is left: an empty batch with the same position.
    let from = format!(r#"{{"from":"{}"}}"#, batch.position);
    let Message::StreamBatch(rest) = ok(&server, "subscribe?wait_ms=100", &from) else {
        panic!("stream_batch")
    };
    assert!(rest.msgs.is_empty());
    assert_eq!(rest.position, batch.position);
}

/// The curl loop of docs/backend.md: `subscribe` again and again, each time from the last
/// answer's position, while a service stores messages: every message is seen once, in seq
/// order per conversation.
#[test]
fn a_curl_style_tail_resumes_from_each_position_without_gap() {
    let server = start(&[]);
    let Message::StreamBatch(start_batch) = ok(&server, "subscribe?wait_ms=0", "") else {
        panic!("stream_batch")
    };
    let total = 150usize;
    let writer_server_addr = server.backend_addr.to_string();
    let writer = std::thread::spawn(move || {
        let mut service =
            ServiceClient::connect(&writer_server_addr, &service_token()).expect("connects");
        for i in 0..total {
            let body = format!(
                r#"{{"op":"send_as","from":"buyer:1","user":"buyer:{}","cmid":"t-{i}","kind":"text","body":"{i}"}}"#,
                100 + i % 5
            );
            let message = json::decode(&body).unwrap().message.into_owned();
            let reply = service.call(message).expect("send_as");
            assert!(matches!(reply.message, Message::SendAsOk(_)), "{reply:?}");
            if i % 25 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let mut position = start_batch.position.into_owned();
    let mut seqs: BTreeMap<ConvId, Vec<u64>> = BTreeMap::new();
    let mut seen = 0;
    let mut polls = 0;
    while seen < total {
        polls += 1;
        assert!(
            polls < 2000,
            "the tail made no progress ({seen} of {total})"
        );
        let from = format!(r#"{{"from":"{position}"}}"#);
        let Message::StreamBatch(batch) = ok(&server, "subscribe?wait_ms=2000", &from) else {
            panic!("stream_batch")
        };
        for msg in &batch.msgs {
            seqs.entry(msg.conv).or_default().push(msg.seq.0);
            seen += 1;
        }
        position = batch.position.into_owned();
    }
    writer.join().unwrap();
    assert_eq!(seen, total, "no message twice");
    assert_eq!(seqs.len(), 5);
    for (conv, seqs) in &seqs {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, &expected,
            "conversation {conv}: in order, without gap"
        );
    }
}

/// At most `api_requests_per_shard_max` API requests per shard at once: one more is answered
/// 503 (and a waiting long poll is answered 503 when the node drains).
#[test]
fn requests_over_the_shard_limit_and_during_a_drain_are_unavailable() {
    let mut server = start(&["--shards=1", "--api-requests-per-shard-max=1"]);
    let token = service_token();
    let mut waiting = server.tcp();
    write!(
        waiting,
        "POST /api/subscribe?wait_ms=30000 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    // The long poll holds the shard's one API slot; others are refused until it ends.
    let deadline = std::time::Instant::now() + LONG;
    let (status, code, text) = loop {
        let answer = refused_or_ok(&server);
        if let Some(refusal) = answer {
            break refusal;
        }
        assert!(std::time::Instant::now() < deadline, "never refused");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((status, code), (503, ErrorCode::Unavailable), "{text}");
    // Other endpoints of the client port are not limited by it.
    assert_eq!(server.get("/healthz").0, 200);

    server.signal(libc::SIGTERM);
    let mut response = String::new();
    waiting.read_to_string(&mut response).unwrap();
    let (status, body) = parse_response(&response);
    assert_eq!(status, 503, "{response}");
    assert!(body.contains(r#""code":"unavailable""#), "{body}");
    assert!(body.contains("draining"), "{body}");
    assert!(server.wait_exit().success());
}

/// `POST /api/<op>` with the service token as a client writes it on a connection it keeps,
/// with `extra` header lines.
fn api_request(op: &str, body: &str, extra: &str) -> String {
    format!(
        "POST /api/{op} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        service_token(),
        body.len()
    )
}

/// Reads until the server closes the connection; fails the test if it sends anything more
/// or does not close within the read timeout.
fn assert_closed(stream: &mut std::net::TcpStream) {
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("closed within the read timeout");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// HTTP/1.1 keep-alive (docs/backend.md "Over HTTP"): requests one after another on one
/// connection, then ones sent ahead without waiting (pipelined) answered in order although
/// the first waits and the second could be answered at once, two long polls in a row, and a
/// request that says `Connection: close` answered and closed.
#[test]
fn one_connection_serves_requests_in_order_until_the_client_says_close() {
    let server = start(&[]);
    let mut web = server.login(buyer(1));
    let mut stream = server.tcp();
    let presence = r#"{"users":["buyer:1","buyer:2"]}"#;
    stream
        .write_all(api_request("presence", presence, "").as_bytes())
        .unwrap();
    let first = read_response(&mut stream);
    assert_eq!(first.status, 200, "{first:?}");
    assert!(
        first.head.contains("\r\nConnection: keep-alive\r\n"),
        "{first:?}"
    );
    let Message::PresenceOk(online) = json::decode(first.body.trim_end()).unwrap().message else {
        panic!("{first:?}")
    };
    assert_eq!(online.iter().map(|o| o.uid).collect::<Vec<_>>(), [buyer(1)]);
    let notify = r#"{"users":["buyer:1","buyer:2"],"kind":"k","body":"second"}"#;
    stream
        .write_all(api_request("notify_users", notify, "").as_bytes())
        .unwrap();
    let second = read_response(&mut stream);
    assert_eq!(second.body, "{\"op\":\"notify_users_ok\",\"count\":2}\n");
    assert!(!second.closes(), "{second:?}");
    assert!(matches!(push(&mut web), Message::Notify(n) if n.body == "second"));

    // Sent ahead in one write: a long poll that waits 300 ms, then a notify the node could
    // answer at once, then a long poll that answers at once. Answered in request order.
    let ahead = [
        api_request("subscribe?wait_ms=300", "", ""),
        api_request(
            "notify_users",
            r#"{"users":["buyer:1"],"kind":"k","body":"b"}"#,
            "",
        ),
        api_request("subscribe?wait_ms=0", "", ""),
    ]
    .concat();
    stream.write_all(ahead.as_bytes()).unwrap();
    let answers: Vec<String> = (0..3)
        .map(|_| {
            let answer = read_response(&mut stream);
            assert_eq!(answer.status, 200, "{answer:?}");
            answer.body
        })
        .collect();
    assert!(
        answers[0].starts_with("{\"op\":\"stream_batch\""),
        "{answers:?}"
    );
    assert_eq!(answers[1], "{\"op\":\"notify_users_ok\",\"count\":1}\n");
    assert!(
        answers[2].starts_with("{\"op\":\"stream_batch\""),
        "{answers:?}"
    );

    // The client says it is done: answered, said so, closed.
    stream
        .write_all(api_request("presence", presence, "Connection: close\r\n").as_bytes())
        .unwrap();
    let last = read_response(&mut stream);
    assert_eq!(last.status, 200, "{last:?}");
    assert!(last.closes(), "{last:?}");
    assert_closed(&mut stream);
}

/// A request refused from its head on a kept connection (its body unread, so where a next
/// request would start is unknown) gets its 4xx and the connection closes; so does a request
/// the connection does not serve. A body that does not decode keeps it: its length was known.
#[test]
fn a_bad_request_on_a_kept_connection_gets_its_4xx_and_the_connection_closes() {
    let server = start(&["--backend-frame-bytes-max=4096"]);
    let presence = r#"{"users":["buyer:1"]}"#;
    let no_token = format!(
        "POST /api/presence HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{presence}",
        presence.len()
    );
    let too_large = format!(
        "POST /api/presence HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 100000\r\n\r\n",
        service_token()
    );
    let cases = [
        (no_token, 401),
        (api_request("nope", presence, ""), 404),
        (too_large, 413),
        ("GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_string(), 421),
        ("NOT HTTP\r\n\r\n".to_string(), 400),
    ];
    for (bad, status) in cases {
        let mut stream = server.tcp();
        stream
            .write_all(api_request("presence", presence, "").as_bytes())
            .unwrap();
        let good = read_response(&mut stream);
        assert_eq!(good.status, 200, "{good:?}");
        assert!(!good.closes(), "{good:?}");
        stream.write_all(bad.as_bytes()).unwrap();
        let answer = read_response(&mut stream);
        assert_eq!(answer.status, status, "{bad:?}: {answer:?}");
        assert!(answer.closes(), "{bad:?}: {answer:?}");
        assert_closed(&mut stream);
    }

    let mut stream = server.tcp();
    let bad_body = api_request("presence", r#"{"users":"nobody"}"#, "");
    stream
        .write_all(
            [bad_body, api_request("presence", presence, "")]
                .concat()
                .as_bytes(),
        )
        .unwrap();
    let refused = read_response(&mut stream);
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(!refused.closes(), "{refused:?}");
    assert_eq!(read_response(&mut stream).status, 200);
}

/// A connection makes at most `api_requests_per_connection_max` requests (the last answer
/// says `Connection: close`), and one idle for `api_idle_timeout_ms` is closed.
#[test]
fn a_kept_connection_closes_after_its_request_limit_and_when_idle() {
    let server = start(&[
        "--api-requests-per-connection-max=3",
        "--api-idle-timeout-ms=300",
    ]);
    let presence = r#"{"users":["buyer:1"]}"#;
    let mut stream = server.tcp();
    for n in 1..=3 {
        stream
            .write_all(api_request("presence", presence, "").as_bytes())
            .unwrap();
        let answer = read_response(&mut stream);
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.closes(), n == 3, "request {n}: {answer:?}");
    }
    assert_closed(&mut stream);

    let mut idle = server.tcp();
    idle.write_all(api_request("presence", presence, "").as_bytes())
        .unwrap();
    assert!(!read_response(&mut idle).closes());
    // Nothing more sent: the server closes it (well within the read timeout).
    assert_closed(&mut idle);
}

/// `None` if a presence request was served, else its refusal.
fn refused_or_ok(server: &Server) -> Option<(u16, ErrorCode, String)> {
    let (status, message) = server.api("presence", &service_token(), r#"{"users":["buyer:1"]}"#);
    match message {
        Message::Error(e) => Some((status, e.code, e.message.into_owned())),
        _ => None,
    }
}
