//! The client contract end to end: login, send, push, read, history, convs, dispatch, kick,
//! idempotency, membership, restart and crash — against the real binary, in both encodings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::token::{self, Claims};
use chinwag_protocol::{
    ConvId, ConvType, Cursor, DeviceType, ErrorCode, Frame, History, HistoryRange, Message, Msg,
    Send, Seq, ShopId, Target, Uid,
};
use chinwag_tests::{agent, buyer, history, next_msg, rejected, send, Server};

const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-0";
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

/// A server whose rate limit does not get in the way of tests that send in bursts.
fn start() -> Server {
    Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=1000000"])
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn next_push(client: &mut Client, wait: Duration) -> Option<Message<'static>> {
    client.next_push(wait).expect("push").map(|f| f.message)
}

#[test]
fn direct_chat_in_both_encodings_reaches_every_other_device() {
    let server = start();
    let alice = buyer(1);
    let bob = buyer(2);
    let (mut a_web, a_login) = server.login_as(alice, None, DeviceType::Web, Encoding::Json);
    let (mut a_ios, _) = server.login_as(alice, None, DeviceType::Ios, Encoding::Binary);
    let (mut b_web, b_login) = server.login_as(bob, None, DeviceType::Web, Encoding::Binary);
    assert_eq!(a_login.uid, alice);
    assert_ne!(a_login.device_id, b_login.device_id);
    // The node id names the connector's address and port.
    let node = a_login.node_id.unpack();
    assert_eq!(
        (node.ip, node.port),
        (std::net::Ipv4Addr::LOCALHOST, server.addr.port())
    );
    assert_eq!(node.node_type, chinwag_protocol::NodeType::Connector);
    let device = a_login.device_id.unpack();
    assert_eq!(device.device_type, DeviceType::Web);

    let (conv, seq) = send(&mut a_web, Target::User(bob), "a-1", "hello bob");
    assert_eq!(seq, Seq(1));
    // Bob (binary) and Alice's other device (binary) receive it; the sending device does not.
    for client in [&mut b_web, &mut a_ios] {
        let m = next_msg(client);
        assert_eq!((m.conv, m.seq, m.from), (conv, Seq(1), alice));
        assert_eq!((&*m.body, &*m.cmid, &*m.kind), ("hello bob", "a-1", "text"));
    }
    assert!(
        next_push(&mut a_web, SHORT).is_none(),
        "the sender's device gets no push"
    );

    // Bob answers into the same conversation by its id; the pair has one conversation.
    let (conv2, seq2) = send(&mut b_web, Target::Conv(conv), "b-1", "hi alice");
    assert_eq!((conv2, seq2), (conv, Seq(2)));
    let (conv3, seq3) = send(&mut b_web, Target::User(alice), "b-2", "again");
    assert_eq!((conv3, seq3), (conv, Seq(3)));
    for expected in [2, 3] {
        assert_eq!(next_msg(&mut a_web).seq, Seq(expected));
        assert_eq!(next_msg(&mut a_ios).seq, Seq(expected));
    }
}

#[test]
fn pushes_arrive_in_seq_order_each_once() {
    let server = start();
    let (mut a, _) = server.login_as(buyer(10), None, DeviceType::Web, Encoding::Binary);
    let (mut b, _) = server.login_as(buyer(11), None, DeviceType::Web, Encoding::Json);
    let mut conv = None;
    for i in 0..200 {
        // Pipelined: many sends in flight before the replies are read.
        a.send(&Frame::with_req(
            1000 + i,
            Message::Send(Send {
                target: Target::User(buyer(11)),
                cmid: format!("m{i}").into(),
                kind: "text".into(),
                body: format!("{i}").into(),
            }),
        ))
        .unwrap();
    }
    for i in 0..200u64 {
        let m = next_msg(&mut b);
        assert_eq!(m.seq, Seq(i + 1));
        assert_eq!(&*m.body, i.to_string());
        conv = Some(m.conv);
    }
    assert!(next_push(&mut b, SHORT).is_none(), "no duplicate pushes");
    // The conversation layer's metrics count what happened.
    assert_eq!(
        server.wait_metric("chinwag_messages_stored_total", "", 200),
        200
    );
    assert!(server.metric("chinwag_pushes_delivered_total", "") >= 200);
    assert_eq!(server.metric("chinwag_sessions_logged_in", ""), 2);
    assert_eq!(server.wait_metric("chinwag_log_conversations", "", 1), 1);
    assert_eq!(server.wait_metric("chinwag_log_devices", "", 2), 2);
    let all = history(&mut a, conv.unwrap(), HistoryRange::After(Seq(0)), 200);
    assert_eq!(all.len(), 200);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, m)| m.seq == Seq(i as u64 + 1)));
}

#[test]
fn cmid_makes_send_idempotent() {
    let server = start();
    let (mut a, _) = server.login_as(buyer(20), None, DeviceType::Web, Encoding::Json);
    let (mut b, _) = server.login_as(buyer(21), None, DeviceType::Web, Encoding::Json);
    let first = send(&mut a, Target::User(buyer(21)), "same", "once");
    let again = send(&mut a, Target::User(buyer(21)), "same", "once");
    assert_eq!(first, again);
    assert_eq!(next_msg(&mut b).seq, Seq(1));
    assert!(
        next_push(&mut b, SHORT).is_none(),
        "a repeated cmid pushes nothing"
    );
    let next = send(&mut a, Target::User(buyer(21)), "other", "twice");
    assert_eq!(next.1, Seq(2));
}

#[test]
fn read_cursors_unread_counts_and_receipts() {
    let server = start();
    let (mut a, _) = server.login_as(buyer(30), None, DeviceType::Web, Encoding::Json);
    let (mut b, _) = server.login_as(buyer(31), None, DeviceType::Web, Encoding::Binary);
    let (mut b2, _) = server.login_as(buyer(31), None, DeviceType::Android, Encoding::Json);
    let mut conv = ConvId(0);
    for i in 0..5 {
        conv = send(&mut a, Target::User(buyer(31)), &format!("c{i}"), "x").0;
    }
    let convs = |client: &mut Client| match client.call(Message::Convs).unwrap().message {
        Message::ConvsOk(convs) => convs,
        other => panic!("expected convs_ok, got {other:?}"),
    };
    let listed = convs(&mut b);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].conv, conv);
    assert_eq!(listed[0].conv_type, ConvType::Direct);
    assert_eq!(
        (listed[0].last_seq, listed[0].read_seq, listed[0].unread),
        (Seq(5), Seq(0), 5)
    );
    assert_eq!(listed[0].last.as_ref().unwrap().seq, Seq(5));
    // The sender has read what it wrote.
    assert_eq!(convs(&mut a)[0].unread, 0);

    let read = |client: &mut Client, seq| match client
        .call(Message::Read(Cursor {
            conv,
            seq: Seq(seq),
        }))
        .unwrap()
        .message
    {
        Message::ReadOk(c) => c.seq,
        other => panic!("expected read_ok, got {other:?}"),
    };
    assert_eq!(read(&mut b, 3), Seq(3));
    assert_eq!(read(&mut b, 2), Seq(3), "a cursor never moves backwards");
    assert_eq!(read(&mut b, 99), Seq(5), "a cursor stops at the last seq");
    assert_eq!(convs(&mut b)[0].unread, 0);

    // Receipts: to the other member and to the reader's other device, not the reading device.
    let receipts = |client: &mut Client| {
        let mut seqs = Vec::new();
        while let Some(m) = next_push(client, SHORT) {
            if let Message::Receipt(r) = m {
                assert_eq!((r.conv, r.uid), (conv, buyer(31)));
                seqs.push(r.seq.0);
            }
        }
        seqs
    };
    assert_eq!(receipts(&mut a), [3, 5]);
    assert_eq!(receipts(&mut b2), [3, 5]);
    assert_eq!(receipts(&mut b), Vec::<u64>::new());
}

#[test]
fn history_pages_before_and_after() {
    let server = start();
    let (mut a, _) = server.login_as(buyer(40), None, DeviceType::Web, Encoding::Binary);
    let mut conv = ConvId(0);
    for i in 1..=120 {
        conv = send(
            &mut a,
            Target::User(buyer(41)),
            &format!("h{i}"),
            &format!("{i}"),
        )
        .0;
    }
    let seqs = |msgs: Vec<Msg<'static>>| msgs.iter().map(|m| m.seq.0).collect::<Vec<_>>();
    assert_eq!(
        seqs(history(&mut a, conv, HistoryRange::Newest, 3)),
        [118, 119, 120]
    );
    assert_eq!(
        seqs(history(&mut a, conv, HistoryRange::Before(Seq(50)), 3)),
        [47, 48, 49]
    );
    assert_eq!(
        seqs(history(&mut a, conv, HistoryRange::After(Seq(50)), 3)),
        [51, 52, 53]
    );
    assert_eq!(
        seqs(history(&mut a, conv, HistoryRange::After(Seq(118)), 50)),
        [119, 120]
    );
    assert_eq!(history(&mut a, conv, HistoryRange::Newest, 200).len(), 120);
    // Out-of-range limits are refused by the decoder, in JSON too.
    let mut json = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    json.login(&server.token(buyer(40)), DeviceType::Desktop)
        .unwrap();
    json.send_raw(tungstenite::Message::text(format!(
        r#"{{"op":"history","req":5,"conv":"{conv}","limit":201}}"#
    )))
    .unwrap();
    match next_push(&mut json, LONG) {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("expected bad_request, got {other:?}"),
    }
}

#[test]
fn errors_of_the_contract() {
    let server = start();
    let url = server.ws_url();

    // Anything but login and ping before login: not_logged_in, known op or not.
    let mut c = Client::connect(&url, Encoding::Json).unwrap();
    assert_eq!(rejected(c.call(Message::Convs)), ErrorCode::NotLoggedIn);
    assert!(matches!(
        c.call(Message::Ping).unwrap().message,
        Message::Pong
    ));
    c.send_raw(tungstenite::Message::text(r#"{"op":"dance","req":9}"#))
        .unwrap();
    match next_push(&mut c, LONG) {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::NotLoggedIn),
        other => panic!("expected not_logged_in, got {other:?}"),
    }

    // A bad token: unauthorized, then close 1008.
    let forged = token::mint(
        b"wrong-secret",
        &Claims {
            uid: buyer(1),
            shop: None,
            exp: now_s() + 60,
        },
    );
    match c.login(&forged, DeviceType::Web) {
        Err(ClientError::Rejected(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected unauthorized, got {other:?}"),
    }
    match c.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(1008)),
        other => panic!("expected close 1008, got {other:?}"),
    }
    let mut expired = Client::connect(&url, Encoding::Binary).unwrap();
    let old = token::mint(
        SECRET.as_bytes(),
        &Claims {
            uid: buyer(1),
            shop: None,
            exp: 1,
        },
    );
    assert!(matches!(
        expired.login(&old, DeviceType::Web),
        Err(ClientError::Rejected(e)) if e.code == ErrorCode::Unauthorized
    ));

    // After login: unknown op and malformed frames are bad_request, and the connection stays.
    let (mut a, _) = server.login_as(buyer(50), None, DeviceType::Web, Encoding::Json);
    a.send_raw(tungstenite::Message::text(r#"{"op":"dance","req":10}"#))
        .unwrap();
    a.send_raw(tungstenite::Message::text("not json")).unwrap();
    a.send_raw(tungstenite::Message::binary(vec![0u8, 0, 0, 5]))
        .unwrap();
    for _ in 0..3 {
        match next_push(&mut a, LONG) {
            Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
            other => panic!("expected bad_request, got {other:?}"),
        }
    }
    assert!(matches!(
        a.call(Message::Ping).unwrap().message,
        Message::Pong
    ));
    // Not a member; no such conversation.
    let (mut b, _) = server.login_as(buyer(51), None, DeviceType::Web, Encoding::Json);
    let (conv, _) = send(&mut b, Target::User(buyer(52)), "x", "private");
    assert_eq!(
        rejected(a.call(Message::History(History {
            conv,
            range: HistoryRange::Newest,
            limit: 10
        }))),
        ErrorCode::NotMember
    );
    assert_eq!(
        rejected(a.call(Message::Send(Send {
            target: Target::Conv(conv),
            cmid: "y".into(),
            kind: "text".into(),
            body: "intrude".into(),
        }))),
        ErrorCode::NotMember
    );
    assert_eq!(
        rejected(a.call(Message::Read(Cursor {
            conv: ConvId(999_999 << 8),
            seq: Seq(1)
        }))),
        ErrorCode::NotFound
    );
    assert_eq!(
        rejected(a.call(Message::Read(Cursor {
            conv: ConvId(0xff),
            seq: Seq(1)
        }))),
        ErrorCode::NotFound,
        "a conversation id naming a shard the node lacks"
    );
    // Only agents resolve.
    assert_eq!(
        rejected(a.call(Message::Resolve(conv))),
        ErrorCode::BadRequest
    );
}

#[test]
fn over_the_rate_limit_requests_get_rate_limited() {
    let server = Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=20"]);
    let (mut a, _) = server.login_as(buyer(70), None, DeviceType::Web, Encoding::Json);
    for req in 0..60 {
        a.send(&Frame::with_req(req, Message::Ping)).unwrap();
    }
    let (mut pongs, mut limited) = (0, 0);
    while let Some(message) = next_push(&mut a, SHORT) {
        match message {
            Message::Pong => pongs += 1,
            Message::Error(e) if e.code == ErrorCode::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs + limited, 60, "every request is answered");
    assert!(
        limited >= 30,
        "{limited} of 60 were limited at 20 per second"
    );
}

#[test]
fn second_login_of_a_device_kicks_the_first() {
    let server = start();
    let (mut first, one) = server.login_as(buyer(60), None, DeviceType::Ios, Encoding::Json);
    let (mut second, two) = server.login_as(buyer(60), None, DeviceType::Ios, Encoding::Binary);
    assert_eq!(
        one.device_id, two.device_id,
        "the same (user, device type) keeps its DeviceId"
    );
    match next_push(&mut first, LONG) {
        Some(Message::Kicked(_)) => {}
        other => panic!("expected kicked, got {other:?}"),
    }
    match first.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    // The new session gets the pushes.
    let (mut other, _) = server.login_as(buyer(61), None, DeviceType::Web, Encoding::Json);
    send(&mut other, Target::User(buyer(60)), "k", "for the new one");
    assert_eq!(&*next_msg(&mut second).body, "for the new one");
    // And is kicked in its own (binary) encoding by a third login.
    let (_third, _) = server.login_as(buyer(60), None, DeviceType::Ios, Encoding::Json);
    assert!(matches!(
        next_push(&mut second, LONG),
        Some(Message::Kicked(_))
    ));
}

fn members_push(client: &mut Client) -> Vec<Uid> {
    loop {
        match next_push(client, LONG) {
            Some(Message::Members(m)) => return m.members,
            Some(_) => continue,
            None => panic!("no members push"),
        }
    }
}

#[test]
fn dispatch_assigns_least_loaded_agents_and_serves_the_queue() {
    let server = start();
    const SHOP: u64 = 77;
    // Two buyers write before any agent is online: both wait.
    let (mut b1, _) = server.login_as(buyer(101), None, DeviceType::Web, Encoding::Json);
    let (mut b2, _) = server.login_as(buyer(102), None, DeviceType::Web, Encoding::Binary);
    let (c1, _) = send(&mut b1, Target::Shop(ShopId(SHOP)), "q1", "anyone?");
    let (c2, _) = send(&mut b2, Target::Shop(ShopId(SHOP)), "q2", "hello?");
    assert_ne!(c1, c2);

    // The first agent to log in takes the waiting conversations in arrival order.
    let (mut a1, _) = server.login_as(agent(1), Some(SHOP), DeviceType::Desktop, Encoding::Json);
    let mut assigned = Vec::new();
    for _ in 0..2 {
        match next_push(&mut a1, LONG) {
            Some(Message::Members(m)) => {
                assert!(m.members.contains(&agent(1)));
                assigned.push(m.conv);
            }
            other => panic!("expected members, got {other:?}"),
        }
    }
    assert_eq!(assigned, [c1, c2]);
    assert!(members_push(&mut b1).contains(&agent(1)));
    // The agent reads the whole history and answers.
    assert_eq!(history(&mut a1, c1, HistoryRange::Newest, 50).len(), 1);
    send(&mut a1, Target::Conv(c1), "r1", "how can I help?");
    assert_eq!(&*next_msg(&mut b1).body, "how can I help?");

    // A second agent comes online; a new buyer goes to the least loaded (agent 2).
    let (mut a2, _) = server.login_as(agent(2), Some(SHOP), DeviceType::Web, Encoding::Binary);
    let (mut b3, _) = server.login_as(buyer(103), None, DeviceType::Web, Encoding::Json);
    let (c3, _) = send(&mut b3, Target::Shop(ShopId(SHOP)), "q3", "hi");
    let m = members_push(&mut a2);
    assert!(m.contains(&agent(2)) && m.contains(&buyer(103)));
    // The assignment came before the message.
    assert_eq!(next_msg(&mut a2).conv, c3);

    // Agent 2 cannot touch agent 1's conversation; an agent of another shop neither.
    assert_eq!(
        rejected(a2.call(Message::History(History {
            conv: c1,
            range: HistoryRange::Newest,
            limit: 5
        }))),
        ErrorCode::NotMember
    );
    let (mut stranger, _) =
        server.login_as(agent(9), Some(SHOP + 1), DeviceType::Web, Encoding::Json);
    assert_eq!(
        rejected(stranger.call(Message::History(History {
            conv: c3,
            range: HistoryRange::Newest,
            limit: 5
        }))),
        ErrorCode::NotMember
    );

    // Resolve: agent 1 leaves c1; the buyer's next message is dispatched afresh. Both agents
    // now have one conversation; the tie goes to the one assigned least recently, agent 1.
    match a1.call(Message::Resolve(c1)).unwrap().message {
        Message::ResolveOk(conv) => assert_eq!(conv, c1),
        other => panic!("expected resolve_ok, got {other:?}"),
    }
    assert_eq!(members_push(&mut b1), [buyer(101)]);
    send(&mut b1, Target::Shop(ShopId(SHOP)), "q4", "one more thing");
    let m = loop {
        match next_push(&mut a1, LONG) {
            Some(Message::Members(m)) if m.conv == c1 && m.members.len() == 2 => break m.members,
            Some(_) => continue,
            None => panic!("c1 was not reassigned"),
        }
    };
    assert!(m.contains(&buyer(101)) && m.contains(&agent(1)), "{m:?}");
    assert_eq!(&*next_msg(&mut a1).body, "one more thing");
    // A buyer may not resolve.
    assert_eq!(
        rejected(b1.call(Message::Resolve(c1))),
        ErrorCode::BadRequest
    );
}

#[test]
fn an_offline_assigned_agent_keeps_the_assignment_and_gets_company() {
    let server = start();
    const SHOP: u64 = 88;
    let (mut a1, _) = server.login_as(agent(11), Some(SHOP), DeviceType::Web, Encoding::Json);
    let (mut b, _) = server.login_as(buyer(201), None, DeviceType::Web, Encoding::Json);
    let (conv, _) = send(&mut b, Target::Shop(ShopId(SHOP)), "1", "hi");
    assert!(members_push(&mut a1).contains(&agent(11)));
    a1.close().unwrap();
    let (mut a2, _) = server.login_as(agent(12), Some(SHOP), DeviceType::Web, Encoding::Json);
    std::thread::sleep(Duration::from_millis(200));
    send(&mut b, Target::Shop(ShopId(SHOP)), "2", "still there?");
    let m = members_push(&mut a2);
    assert!(m.contains(&agent(11)) && m.contains(&agent(12)), "{m:?}");
    assert_eq!(next_msg(&mut a2).conv, conv);
}

#[test]
fn restart_keeps_devices_conversations_cursors_assignments_and_cmids() {
    let args = ["--jwt-secret", SECRET, "--fsync=always"];
    let server = Server::start(&args);
    const SHOP: u64 = 5;
    let (mut ag, ag_login) = server.login_as(agent(3), Some(SHOP), DeviceType::Web, Encoding::Json);
    let (mut b, b_login) = server.login_as(buyer(300), None, DeviceType::Ios, Encoding::Binary);
    let (conv, _) = send(&mut b, Target::Shop(ShopId(SHOP)), "keep", "before restart");
    members_push(&mut ag);
    send(&mut b, Target::Conv(conv), "keep2", "second");
    ag.call(Message::Read(Cursor { conv, seq: Seq(1) }))
        .unwrap();
    drop((ag, b));
    server.signal(libc::SIGTERM);
    let data = server.into_data_dir();

    let server = Server::start_in(data, &args, &[]);
    let (mut b, again) = server.login_as(buyer(300), None, DeviceType::Ios, Encoding::Binary);
    assert_eq!(again.device_id, b_login.device_id, "devices survive");
    let (mut ag, ag_again) = server.login_as(agent(3), Some(SHOP), DeviceType::Web, Encoding::Json);
    assert_eq!(ag_again.device_id, ag_login.device_id);
    // The same conversation, the next seq, and the cmid window remembers "keep".
    assert_eq!(
        send(&mut b, Target::Shop(ShopId(SHOP)), "keep", "before restart"),
        (conv, Seq(1))
    );
    assert_eq!(
        send(&mut b, Target::Shop(ShopId(SHOP)), "after", "third"),
        (conv, Seq(3))
    );
    // The assignment survived: the agent gets the message without a new members push.
    let m = next_msg(&mut ag);
    assert_eq!((m.conv, m.seq), (conv, Seq(3)));
    let listed = match ag.call(Message::Convs).unwrap().message {
        Message::ConvsOk(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].conv_type, ConvType::Shop(ShopId(SHOP)));
    assert_eq!(
        (listed[0].read_seq, listed[0].unread),
        (Seq(1), 2),
        "the cursor survived"
    );
}

/// Writers keep 24 conversations busy, spread over partitions of both shards (several per
/// shard, so a turn commits several logs); the node is SIGKILLed mid-load and restarted with
/// another shard count.
#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    let args = ["--jwt-secret", SECRET, "--shards=2"];
    let server = Server::start(&args);
    let mut acked: Vec<(ConvId, Seq, String, u64)> = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..6u64)
        .map(|w| {
            let url = server.ws_url();
            let token = server.token(buyer(400 + w));
            let stop = std::sync::Arc::clone(&stop);
            let count = std::sync::Arc::clone(&count);
            std::thread::spawn(move || {
                let mut client = Client::connect(&url, Encoding::Binary).unwrap();
                client.login(&token, DeviceType::Web).unwrap();
                let mut acked = Vec::new();
                for i in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let cmid = format!("w{w}-{i}");
                    let recipient = 500 + i % 4;
                    let result = client.call(Message::Send(Send {
                        target: Target::User(buyer(recipient)),
                        cmid: cmid.clone().into(),
                        kind: "text".into(),
                        body: format!("body {cmid}").into(),
                    }));
                    match result {
                        Ok(Frame {
                            message: Message::SendOk(ok),
                            ..
                        }) => {
                            acked.push((ok.conv, ok.seq, cmid, recipient));
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    // Mid-load: once a few hundred sends were acknowledged (bounded in time, however loaded
    // the machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count.load(std::sync::atomic::Ordering::Relaxed) < 500
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGKILL);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        acked.extend(writer.join().unwrap());
    }
    assert!(
        acked.len() > 100,
        "the load ran ({} acknowledged)",
        acked.len()
    );
    // Several partitions per shard took the load (partition p is on shard p mod 2).
    let partitions: std::collections::BTreeSet<u64> =
        acked.iter().map(|(conv, ..)| conv.0 & 0xffff).collect();
    for shard in 0..2 {
        let on_shard = partitions.iter().filter(|&&p| p % 2 == shard).count();
        assert!(on_shard >= 2, "shard {shard}: {partitions:?}");
    }
    let data = server.into_data_dir();

    let server = Server::start_in(data, &["--jwt-secret", SECRET, "--shards=3"], &[]);
    let mut readers: Vec<Client> = (500..504)
        .map(|id| {
            server
                .login_as(buyer(id), None, DeviceType::Desktop, Encoding::Binary)
                .0
        })
        .collect();
    let mut convs: std::collections::BTreeMap<ConvId, (u64, Vec<(Seq, String)>)> =
        Default::default();
    for (conv, seq, cmid, recipient) in &acked {
        let entry = convs.entry(*conv).or_insert((*recipient, Vec::new()));
        entry.1.push((*seq, cmid.clone()));
    }
    for (conv, (recipient, expected)) in convs {
        let mut stored = Vec::new();
        let client = &mut readers[(recipient - 500) as usize];
        let mut after = Seq(0);
        loop {
            let page = history(client, conv, HistoryRange::After(after), 200);
            let Some(last) = page.last() else { break };
            after = last.seq;
            stored.extend(page);
        }
        // Every conversation is 1..n with no gap.
        assert!(stored
            .iter()
            .enumerate()
            .all(|(i, m)| m.seq == Seq(i as u64 + 1)));
        for (seq, cmid) in expected {
            let m = &stored[(seq.0 - 1) as usize];
            assert_eq!(
                &*m.cmid, cmid,
                "acknowledged message {seq:?} of {conv} is there"
            );
        }
    }
}

#[test]
fn chinwag_token_mints_tokens_the_gateway_accepts() {
    let server = start();
    let output = std::process::Command::new(chinwag_tests::binary())
        .args([
            "token", "--secret", SECRET, "--uid", "agent:8", "--shop", "12", "--ttl", "60",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    let ok = client.login(token.trim(), DeviceType::Web).unwrap();
    assert_eq!(ok.uid, agent(8));
    // An agent without a shop is refused at the command line.
    let refused = std::process::Command::new(chinwag_tests::binary())
        .args(["token", "--secret", SECRET, "--uid", "agent:8"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn retention_deletes_old_segments_and_state_survives_in_snapshots() {
    let args = [
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--shards=1",
        "--log-segment-bytes=65536",
        "--message-bytes-max=16384",
        "--log-retention-bytes-max=262144",
        "--log-maintenance-interval-ms=100",
    ];
    let server = Server::start(&args);
    let (mut a, a_login) = server.login_as(buyer(600), None, DeviceType::Web, Encoding::Binary);
    let body = "x".repeat(1000);
    let mut conv = ConvId(0);
    for i in 0..1000 {
        conv = send(&mut a, Target::User(buyer(601)), &format!("r{i}"), &body).0;
    }
    let log_dir = server
        .data_dir
        .path()
        .join(format!("partitions/{:05}", conv.0 & 0xffff));
    let segments = || {
        std::fs::read_dir(&log_dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".seg")
            })
            .count()
    };
    // About 1 MB of messages in 64 KiB segments, kept to 256 KiB: old segments go.
    let deadline = std::time::Instant::now() + LONG;
    while segments() > 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(segments() <= 6, "{} segments left", segments());
    // The newest messages are still readable; the oldest are gone.
    let newest = history(&mut a, conv, HistoryRange::Newest, 5);
    assert_eq!(newest.last().unwrap().seq, Seq(1000));
    let oldest = history(&mut a, conv, HistoryRange::After(Seq(0)), 1);
    assert!(
        oldest[0].seq > Seq(1),
        "retention deleted the first messages"
    );
    drop(a);
    server.signal(libc::SIGKILL);
    let data = server.into_data_dir();

    // State records of deleted segments (the device, the conversation) live on in snapshots.
    let server = Server::start_in(data, &args, &[]);
    let (mut a, again) = server.login_as(buyer(600), None, DeviceType::Web, Encoding::Binary);
    assert_eq!(again.device_id, a_login.device_id);
    assert_eq!(
        send(&mut a, Target::User(buyer(601)), "after", "x"),
        (conv, Seq(1001))
    );
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
fn full_disk_answers_unavailable_and_keeps_what_is_stored() {
    // A small tmpfs is a real full disk; mounting one needs root (CI runs as root).
    let mountpoint = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(mountpoint.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mounting a tmpfs failed: this test needs root");
    let _mount = Mount(mountpoint.path().to_path_buf());
    let data = tempfile::tempdir_in(mountpoint.path()).unwrap();
    let args = [
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--shards=1",
        "--log-segment-bytes=262144",
        "--message-bytes-max=16384",
    ];
    let server = Server::start_in(data, &args, &[]);
    let (mut a, _) = server.login_as(buyer(700), None, DeviceType::Web, Encoding::Binary);
    let body = "f".repeat(8000);
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        let result = a.call(Message::Send(Send {
            target: Target::User(buyer(701)),
            cmid: format!("f{i}").into(),
            kind: "text".into(),
            body: body.as_str().into(),
        }));
        match result {
            Ok(Frame {
                message: Message::SendOk(ok),
                ..
            }) => stored.push((ok.conv, ok.seq)),
            Err(ClientError::Rejected(e)) => {
                refused = Some(e.code);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        refused,
        Some(ErrorCode::Unavailable),
        "a full disk is `unavailable`"
    );
    assert!(
        stored.len() > 10,
        "{} stored before the disk filled",
        stored.len()
    );
    // Everything acknowledged is still there, 1..n, and the node still answers.
    let conv = stored[0].0;
    let mut seen = 0u64;
    loop {
        let page = history(&mut a, conv, HistoryRange::After(Seq(seen)), 200);
        let Some(last) = page.last() else { break };
        assert!(page
            .iter()
            .enumerate()
            .all(|(i, m)| m.seq == Seq(seen + i as u64 + 1)));
        seen = last.seq.0;
    }
    assert_eq!(seen, stored.len() as u64);
    assert!(matches!(
        a.call(Message::Ping).unwrap().message,
        Message::Pong
    ));
}

#[test]
fn history_pages_fit_the_send_queue() {
    // 100 messages of 12 KB: 1.2 MB, more than the 1 MiB send queue. A page that held them all
    // would get the reader disconnected (1008); the page stops within half the queue instead.
    let server = start();
    let (mut a, _) = server.login_as(buyer(800), None, DeviceType::Web, Encoding::Json);
    let body = "h".repeat(12_000);
    let mut conv = ConvId(0);
    for i in 0..100 {
        conv = send(&mut a, Target::User(buyer(801)), &format!("b{i}"), &body).0;
    }
    let first = history(&mut a, conv, HistoryRange::After(Seq(0)), 200);
    assert!(
        (10..100).contains(&first.len()),
        "{} messages in the first page",
        first.len()
    );
    assert_eq!(first[0].seq, Seq(1));
    let newest = history(&mut a, conv, HistoryRange::Newest, 200);
    assert_eq!(
        newest.last().unwrap().seq,
        Seq(100),
        "the newest page ends at the newest"
    );
    assert!(newest.len() < 100);
    // Paging on reaches every message.
    let mut seen = first.last().unwrap().seq;
    while seen < Seq(100) {
        let page = history(&mut a, conv, HistoryRange::After(seen), 200);
        assert_eq!(page[0].seq, Seq(seen.0 + 1));
        seen = page.last().unwrap().seq;
    }
}

#[test]
fn convs_list_fits_the_send_queue() {
    // 30 conversations whose last messages are 60 KB each: 1.8 MB of `last` bodies, more than
    // the 1 MiB send queue. Every conversation is listed; the least recent lose their `last`.
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--message-bytes-max=65536",
    ]);
    let (mut a, _) = server.login_as(buyer(900), None, DeviceType::Web, Encoding::Binary);
    let body = "c".repeat(60_000);
    for peer in 0..30 {
        send(
            &mut a,
            Target::User(buyer(1000 + peer)),
            &format!("c{peer}"),
            &body,
        );
    }
    let listed = match a.call(Message::Convs).unwrap().message {
        Message::ConvsOk(convs) => convs,
        other => panic!("expected convs_ok, got {other:?}"),
    };
    assert_eq!(listed.len(), 30, "every conversation is listed");
    let with_last = listed.iter().filter(|c| c.last.is_some()).count();
    assert!(
        (1..30).contains(&with_last),
        "{with_last} listed with their last message"
    );
    assert!(listed.iter().all(|c| c.last_seq == Seq(1)));
    assert!(matches!(
        a.call(Message::Ping).unwrap().message,
        Message::Pong
    ));
}
