//! `push_flush_delay_ms` against the real binary: held pushes arrive in order, ahead of the
//! reply to the client's next request, and by themselves when the shard's flush is due.

use std::time::Duration;

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::{
    DeviceType, GroupCreate, History, HistoryRange, Message, Send, Seq, Target, Uid, UidKind,
};
use chinwag_tests::Server;

const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-0";

fn login(server: &Server, uid: Uid) -> Client {
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).expect("connect");
    client
        .login(&chinwag_tests::mint_token(SECRET, uid), DeviceType::Web)
        .expect("login accepted");
    client
}

/// The seqs of the `msg` pushes already received, without waiting for more.
fn received_seqs(client: &mut Client) -> Vec<Seq> {
    let mut seqs = Vec::new();
    while let Some(frame) = client.next_push(Duration::ZERO).expect("push") {
        if let Message::Msg(m) = frame.message {
            seqs.push(m.msg.seq);
        }
    }
    seqs
}

#[test]
fn held_pushes_arrive_in_order_before_the_next_reply_and_on_their_own() {
    // One shard, so a push is queued for bob before alice's send_ok leaves; a delay of a
    // second holds it well past the point where bob asks for his history.
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--shards=1",
        "--messages-per-s-max=0",
        "--push-flush-delay-ms=1000",
    ]);
    let alice = Uid::new(UidKind::Buyer, 1);
    let bob = Uid::new(UidKind::Buyer, 2);
    let mut a = login(&server, alice);
    let mut b = login(&server, bob);
    let mut conv = None;
    for i in 0..20 {
        // Each send_ok is a reply: it is not held.
        let reply = a
            .call(Message::Send(Send {
                target: Target::User(bob),
                cmid: format!("m{i}").into(),
                kind: "text".into(),
                body: format!("{i}").into(),
            }))
            .expect("send accepted");
        let Message::SendOk(ok) = reply.message else {
            panic!("expected send_ok, got {reply:?}");
        };
        conv = Some(ok.conv);
    }
    let conv = conv.expect("twenty sends");
    // Bob's request: its reply leaves at once and takes the held pushes along, ahead of it.
    let reply = b
        .call(Message::History(History {
            conv,
            range: HistoryRange::Newest,
            limit: 50,
        }))
        .expect("history");
    let Message::HistoryOk(history) = reply.message else {
        panic!("expected history_ok, got {reply:?}");
    };
    assert_eq!(history.msgs.len(), 20);
    let expected: Vec<Seq> = (1..=20).map(Seq).collect();
    assert_eq!(
        received_seqs(&mut b),
        expected,
        "held pushes, before the reply"
    );

    // With no request to carry it, a push goes out when the shard's flush is due.
    a.call(Message::Send(Send {
        target: Target::Conv(conv),
        cmid: "last".into(),
        kind: "text".into(),
        body: "last".into(),
    }))
    .expect("send accepted");
    let push = b
        .next_push(Duration::from_secs(10))
        .expect("push")
        .expect("the held push, written by the shard's flush");
    let Message::Msg(m) = push.message else {
        panic!("expected a msg push, got {push:?}");
    };
    assert_eq!(m.msg.seq, Seq(21));
}

/// A group's messages held over the delay: the shard hands each run of them out once per
/// flush, one buffer per member; every member still gets every other member's message once,
/// in order, in its own encoding, and a sender's `send_ok` (a reply, not held) takes along
/// what was held for the sender, without its own message.
#[test]
fn held_group_pushes_reach_every_member_once_in_order() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--shards=1",
        "--messages-per-s-max=0",
        "--push-flush-delay-ms=200",
    ]);
    let members: Vec<Uid> = (1..=4).map(|n| Uid::new(UidKind::Buyer, n)).collect();
    let mut clients: Vec<Client> = members
        .iter()
        .enumerate()
        .map(|(i, &uid)| {
            // Two members read binary, two JSON: the run keeps one buffer per encoding.
            let encoding = if i % 2 == 0 {
                Encoding::Json
            } else {
                Encoding::Binary
            };
            server.login_as(uid, None, DeviceType::Web, encoding).0
        })
        .collect();
    let mut service = server.service();
    let created = service
        .call(Message::GroupCreate(GroupCreate {
            key: 1,
            users: members.clone(),
        }))
        .expect("group_create");
    let Message::GroupCreateOk(info) = created.message else {
        panic!("expected group_create_ok, got {created:?}");
    };
    let conv = info.conv;
    // Members 0 and 1 send in turns; each send_ok comes at once while pushes are held.
    let mut sent_by: Vec<usize> = Vec::new();
    for i in 0..20 {
        let sender = i % 2;
        let reply = clients[sender]
            .call(Message::Send(Send {
                target: Target::Conv(conv),
                cmid: format!("g{i}").into(),
                kind: "text".into(),
                body: format!("{i}").into(),
            }))
            .expect("send accepted");
        let Message::SendOk(ok) = reply.message else {
            panic!("expected send_ok, got {reply:?}");
        };
        assert_eq!(ok.seq, Seq(i as u64 + 1));
        sent_by.push(sender);
    }
    for (member, client) in clients.iter_mut().enumerate() {
        let expected: Vec<Seq> = (1..=20u64)
            .filter(|&seq| sent_by[seq as usize - 1] != member)
            .map(Seq)
            .collect();
        let mut seqs = Vec::new();
        let mut members_pushes = 0;
        while seqs.len() < expected.len() {
            match chinwag_tests::push(client) {
                Message::Msg(m) => {
                    assert_eq!(m.conv, conv);
                    assert_eq!(&*m.body, format!("{}", m.msg.seq.0 - 1));
                    seqs.push(m.msg.seq);
                }
                Message::Members(_) => members_pushes += 1,
                other => panic!("member {member}: unexpected {other:?}"),
            }
        }
        assert_eq!(
            seqs, expected,
            "member {member}: each message once, in order"
        );
        assert_eq!(
            members_pushes, 1,
            "member {member}: the group's members push"
        );
        // Nothing more comes: no message twice.
        assert!(
            client
                .next_push(Duration::from_millis(500))
                .expect("open")
                .is_none(),
            "member {member}: a push too many"
        );
    }
}

/// Held pushes stay within the send queue's limit: a member that never reads is closed with
/// `send_queue_full` when the shard hands it its held pushes, the sender is unaffected, and
/// the queue's memory goes with the connection.
#[test]
fn closes_a_member_that_never_reads_its_held_pushes() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--shards=1",
        "--messages-per-s-max=0",
        "--push-flush-delay-ms=20",
        "--message-bytes-max=8192",
        "--send-queue-bytes-max=65536",
    ]);
    let alice = Uid::new(UidKind::Buyer, 1);
    let bob = Uid::new(UidKind::Buyer, 2);
    let mut a = login(&server, alice);
    // Bob never reads: his pushes fill the kernel's buffers, then his queue in the server.
    let _b = login(&server, bob);
    let body = "x".repeat(6000);
    // Bounded: 5,000 messages of 6 kB (30 MB) are far more than the kernel buffers plus the
    // 64 kB queue hold.
    for i in 0..5000 {
        let reply = a
            .call(Message::Send(Send {
                target: Target::User(bob),
                cmid: format!("big{i}").into(),
                kind: "text".into(),
                body: body.as_str().into(),
            }))
            .expect("alice is unaffected");
        assert!(matches!(reply.message, Message::SendOk(_)), "{reply:?}");
        if i % 50 == 0
            && server.metric(
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
    // The queue's memory went with the connection (its close frame may take a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.metric("chinwag_send_queue_bytes", "") > 0 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("chinwag_send_queue_bytes", ""), 0);
}
