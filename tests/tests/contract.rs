//! The claims of `docs/protocol.md` that other end-to-end tests do not already hold: who receives
//! which push (and who does not), the order of `members` and `send_ok` on an assignment, what an
//! agent assigned at login gets, requests before `login_ok`, an oversized message, and that the
//! rate limit counts WebSocket messages, not frames.

use std::time::Duration;

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{
    binary, Cursor, DeviceType, ErrorCode, Frame, History, HistoryRange, Login, Message, Send, Seq,
    ShopId, Target,
};
use chinwag_tests::{agent, buyer, Server};
use tungstenite::Message as WsMessage;

/// At least 32 bytes, as HS256 keys should be.
const SECRET: &str = "contract-secret-contract-secret-contract";
/// How long to wait for a push that must not come.
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

fn start() -> Server {
    Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=0"])
}

fn send_frame(req: u64, target: Target, cmid: &str) -> Frame<'static> {
    Frame::with_req(
        req,
        Message::Send(Send {
            target,
            cmid: cmid.to_owned().into(),
            kind: "text".into(),
            body: format!("body of {cmid}").into(),
        }),
    )
}

/// The next frame the client receives (reply or push), in arrival order.
fn next(client: &mut Client, wait: Duration) -> Option<Frame<'static>> {
    client.next_push(wait).expect("connection open")
}

fn next_message(client: &mut Client) -> Message<'static> {
    next(client, LONG).expect("a frame within 5 s").message
}

fn assert_silent(client: &mut Client, who: &str) {
    if let Some(frame) = next(client, SHORT) {
        panic!("{who} got {frame:?}, expected nothing");
    }
}

#[test]
fn msg_and_receipt_reach_every_device_but_the_acting_one() {
    let server = start();
    let mut b_web = server
        .login_as(buyer(1), None, DeviceType::Web, Encoding::Json)
        .0;
    let mut b_ios = server
        .login_as(buyer(1), None, DeviceType::Ios, Encoding::Json)
        .0;
    let mut c_web = server
        .login_as(buyer(2), None, DeviceType::Web, Encoding::Json)
        .0;
    let mut c_ios = server
        .login_as(buyer(2), None, DeviceType::Ios, Encoding::Json)
        .0;

    // msg: every device of every member but the sending one.
    b_web
        .send(&send_frame(1, Target::User(buyer(2)), "m-1"))
        .unwrap();
    let Message::SendOk(ok) = next_message(&mut b_web) else {
        panic!("expected send_ok");
    };
    for (who, client) in [
        ("b_ios", &mut b_ios),
        ("c_web", &mut c_web),
        ("c_ios", &mut c_ios),
    ] {
        match next_message(client) {
            Message::Msg(m) => assert_eq!((m.conv, m.seq), (ok.conv, ok.seq), "{who}"),
            other => panic!("{who}: expected msg, got {other:?}"),
        }
    }
    // The sender's own send moved its cursor and pushed no receipt.
    for (who, client) in [("b_web", &mut b_web), ("c_web", &mut c_web)] {
        assert_silent(client, who);
    }

    // receipt: every device of every member but the reading one (so the reader's other devices).
    let read = |seq| {
        Message::Read(Cursor {
            conv: ok.conv,
            seq: Seq(seq),
        })
    };
    match c_web.call(read(1)).unwrap().message {
        Message::ReadOk(cursor) => assert_eq!(cursor.seq, Seq(1)),
        other => panic!("expected read_ok, got {other:?}"),
    }
    for (who, client) in [
        ("b_web", &mut b_web),
        ("b_ios", &mut b_ios),
        ("c_ios", &mut c_ios),
    ] {
        match next_message(client) {
            Message::Receipt(r) => assert_eq!((r.uid, r.seq), (buyer(2), Seq(1)), "{who}"),
            other => panic!("{who}: expected receipt, got {other:?}"),
        }
    }
    assert_silent(&mut c_web, "the reading device");

    // A cursor that does not move (asked below it, or past the last seq: clamped) answers
    // where it is and pushes nothing.
    for seq in [0, 99] {
        match c_web.call(read(seq)).unwrap().message {
            Message::ReadOk(cursor) => assert_eq!(cursor.seq, Seq(1), "read {seq}"),
            other => panic!("expected read_ok, got {other:?}"),
        }
    }
    assert_silent(&mut b_web, "b_web after reads that moved nothing");
}

#[test]
fn dispatch_as_a_client_sees_it() {
    let server = start();
    let shop = 4242;
    // No agent online: the conversation waits, nothing but send_ok comes.
    let mut b = server
        .login_as(buyer(10), None, DeviceType::Web, Encoding::Json)
        .0;
    b.send(&send_frame(1, Target::Shop(ShopId(shop)), "w-1"))
        .unwrap();
    let Message::SendOk(ok) = next_message(&mut b) else {
        panic!("expected send_ok");
    };
    assert_silent(&mut b, "the buyer while no agent is online");

    // Assigned at login: members after login_ok, and the waiting message is not pushed.
    let mut a1 = server
        .login_as(agent(11), Some(shop), DeviceType::Desktop, Encoding::Json)
        .0;
    match next_message(&mut a1) {
        Message::Members(m) => {
            assert_eq!(m.conv, ok.conv);
            assert_eq!(m.members, vec![buyer(10), agent(11)]);
        }
        other => panic!("expected members, got {other:?}"),
    }
    assert_silent(&mut a1, "an agent assigned at login");
    assert!(matches!(next_message(&mut b), Message::Members(_)));
    let page = a1
        .call(Message::History(History {
            conv: ok.conv,
            range: HistoryRange::Newest,
            limit: 50,
        }))
        .unwrap();
    let Message::HistoryOk(page) = page.message else {
        panic!("expected history_ok");
    };
    assert_eq!(page.msgs.len(), 1, "the agent reads the waiting message");

    // resolve: resolve_ok, then members without the agent, to it and the buyer.
    a1.send(&Frame::with_req(7, Message::Resolve(ok.conv)))
        .unwrap();
    assert!(matches!(next_message(&mut a1), Message::ResolveOk(_)));
    for client in [&mut a1, &mut b] {
        match next_message(client) {
            Message::Members(m) => assert_eq!(m.members, vec![buyer(10)]),
            other => panic!("expected members, got {other:?}"),
        }
    }
    let again = a1.call(Message::History(History {
        conv: ok.conv,
        range: HistoryRange::Newest,
        limit: 50,
    }));
    assert!(
        matches!(again, Err(ClientError::Rejected(ref e)) if e.code == ErrorCode::NotMember),
        "{again:?}"
    );
    // An agent cannot write to a shop, nor resolve what it is not assigned to.
    for (frame, code) in [
        (
            send_frame(8, Target::Shop(ShopId(shop)), "a-1"),
            ErrorCode::BadRequest,
        ),
        (
            Frame::with_req(9, Message::Resolve(ok.conv)),
            ErrorCode::NotMember,
        ),
    ] {
        a1.send(&frame).unwrap();
        match next_message(&mut a1) {
            Message::Error(e) => assert_eq!(e.code, code, "{frame:?}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    // Assigned while online: the buyer's devices get members before the send_ok, the agent
    // members and then the msg.
    b.send(&send_frame(2, Target::Conv(ok.conv), "w-2"))
        .unwrap();
    match next_message(&mut b) {
        Message::Members(m) => assert_eq!(m.members.len(), 2, "{m:?}"),
        other => panic!("expected members before send_ok, got {other:?}"),
    }
    assert!(matches!(next_message(&mut b), Message::SendOk(_)));
    let assigned = match next_message(&mut a1) {
        Message::Members(m) => m.members,
        other => panic!("expected members, got {other:?}"),
    };
    assert_eq!(
        assigned,
        vec![buyer(10), agent(11)],
        "the only online agent"
    );
    assert!(matches!(next_message(&mut a1), Message::Msg(_)));
}

#[test]
fn requests_before_login_ok_get_not_logged_in() {
    let server = start();
    let mut c = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    let expect_error = |c: &mut Client, req: Option<u64>, code: ErrorCode| match next_message(c) {
        Message::Error(e) => assert_eq!(e.code, code),
        other => panic!("{req:?}: expected {code}, got {other:?}"),
    };
    c.send_raw(WsMessage::text(r#"{"op":"fly","req":1}"#))
        .unwrap();
    expect_error(&mut c, Some(1), ErrorCode::NotLoggedIn);
    c.send_raw(WsMessage::text(
        r#"{"op":"send_ok","req":2,"conv":"1","seq":1,"ts":1}"#,
    ))
    .unwrap();
    expect_error(&mut c, Some(2), ErrorCode::NotLoggedIn);
    // A frame that does not decode is bad_request, logged in or not; broken JSON has no req.
    c.send_raw(WsMessage::text(r#"{"op":"read","req":3,"conv":1,"seq":1}"#))
        .unwrap();
    expect_error(&mut c, Some(3), ErrorCode::BadRequest);
    c.send_raw(WsMessage::text(r#"{"op":"ping","req":4"#))
        .unwrap();
    match next(&mut c, LONG).unwrap() {
        Frame {
            req: None,
            message: Message::Error(e),
        } => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("expected an error without req, got {other:?}"),
    }

    // A request pipelined behind the login in one binary message comes before login_ok.
    let mut b = Client::connect(&server.ws_url(), Encoding::Binary).unwrap();
    let mut wire = Vec::new();
    let login = Frame::with_req(
        1,
        Message::Login(Login {
            token: server.token(buyer(20)).into(),
            device: DeviceType::Web,
        }),
    );
    for frame in [
        login,
        Frame::with_req(2, Message::Ping),
        send_frame(3, Target::User(buyer(21)), "early"),
    ] {
        wire.extend_from_slice(&binary::encode_to_bytes(&frame).unwrap());
    }
    b.send_raw(WsMessage::binary(wire)).unwrap();
    let mut replies = Vec::new();
    while let Some(frame) = next(&mut b, SHORT) {
        replies.push((frame.req, frame.message.op().name()));
    }
    assert!(replies.contains(&(Some(2), "pong")), "{replies:?}");
    assert!(replies.contains(&(Some(3), "error")), "{replies:?}");
    assert!(replies.contains(&(Some(1), "login_ok")), "{replies:?}");
    let early = b.call(Message::Send(Send {
        target: Target::User(buyer(21)),
        cmid: "after".into(),
        kind: "text".into(),
        body: "x".into(),
    }));
    assert!(
        early.is_ok(),
        "after login_ok the same send works: {early:?}"
    );
}

#[test]
fn an_oversized_message_gets_close_1009_and_no_error_first() {
    let server = start();
    let mut c = server
        .login_as(buyer(30), None, DeviceType::Web, Encoding::Json)
        .0;
    let pad = "x".repeat(70_000);
    c.send_raw(WsMessage::text(format!(
        r#"{{"op":"ping","req":1,"pad":"{pad}"}}"#
    )))
    .unwrap();
    match c.websocket().read() {
        Ok(WsMessage::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009 first, got {other:?}"),
    }
}

#[test]
fn the_rate_limit_counts_websocket_messages_not_frames() {
    let server = Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=3"]);
    let mut c = Client::connect(&server.ws_url(), Encoding::Binary).unwrap();
    c.login(&server.token(buyer(40)), DeviceType::Web)
        .expect("login: message 1 of the window");
    // Two more messages of five frames each: within the limit of 3 messages per second.
    let pings = |first_req: u64| {
        let mut wire = Vec::new();
        for req in first_req..first_req + 5 {
            let frame = Frame::with_req(req, Message::Ping);
            wire.extend_from_slice(&binary::encode_to_bytes(&frame).unwrap());
        }
        WsMessage::binary(wire)
    };
    c.send_raw(pings(10)).unwrap();
    c.send_raw(pings(20)).unwrap();
    // The fourth message in the second is refused whole: one error, with its first frame's req.
    c.send_raw(pings(30)).unwrap();
    let mut pongs = Vec::new();
    let mut errors = Vec::new();
    while let Some(frame) = next(&mut c, SHORT) {
        match frame.message {
            Message::Pong => pongs.push(frame.req.unwrap()),
            Message::Error(e) => errors.push((frame.req, e.code)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, [10, 11, 12, 13, 14, 20, 21, 22, 23, 24]);
    assert_eq!(errors, [(Some(30), ErrorCode::RateLimited)]);
}

/// A client given several nodes' addresses skips one that is down and says which it reached.
#[test]
fn a_client_with_a_list_of_addresses_skips_a_dead_one() {
    let server = start();
    let dead = format!("ws://127.0.0.1:{}/ws", chinwag_tests::redis::free_port());
    let (mut client, at) =
        Client::connect_any(&[dead.as_str(), &server.ws_url()], Encoding::Json).expect("connect");
    assert_eq!(at, 1, "the second address");
    client
        .login(&server.token(buyer(1)), chinwag_protocol::DeviceType::Web)
        .expect("login on the node it reached");
    let none: [&str; 0] = [];
    assert!(Client::connect_any(&none, Encoding::Json).is_err());
    assert!(Client::connect_any(&[dead.as_str()], Encoding::Json).is_err());
}
