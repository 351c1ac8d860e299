//! The message stream's membership and read-cursor events (docs/backend.md, "The message
//! stream") against the real binary: a group's members joining and leaving and a member's
//! read come in log order among the messages, and resuming from a position after a SIGKILL
//! gives them again without a gap (at least once), as `chinwag backend tail` shows.

use std::time::Duration;

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{
    ConvId, Cursor, DeviceType, GroupCreate, GroupMembers, Message, Send, SendAs, Seq,
    StreamChange, Target, Uid, UidKind,
};
use chinwag_tests::{buyer, Server};

const SECRET: &str = "events-secret-events-secret-events";
const ARGS: [&str; 3] = ["--jwt-secret", SECRET, "--messages-per-s-max=0"];

fn service(server: &Server) -> ServiceClient {
    let mut service = server.service();
    service.set_timeout(Duration::from_secs(10)).unwrap();
    service
}

/// What happened to one conversation, as the stream tells it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Msg(u64),
    Joined(Uid),
    Left(Uid),
    Read(Uid, u64),
}

/// Subscribes from `from` and reads the first batch (empty when from now); returns its
/// position.
fn subscribe(stream: &mut ServiceClient, from: &str) -> String {
    let req = stream.send(Message::Subscribe(from.into())).unwrap();
    match stream.wait(req).unwrap().message {
        Message::StreamBatch(batch) => batch.position.into_owned(),
        other => panic!("expected a stream batch, got {other:?}"),
    }
}

/// Reads batches until `conv` has `count` things seen; returns them in order, and the last
/// position.
fn read(stream: &mut ServiceClient, conv: ConvId, count: usize) -> (Vec<Seen>, String) {
    let mut seen = Vec::new();
    let mut position = String::new();
    while seen.len() < count {
        let frame = stream.next_frame().expect("a stream batch");
        let Message::StreamBatch(batch) = frame.message else {
            panic!("{frame:?}");
        };
        // Merge the batch's events among its messages by `after_msgs`.
        let mut events = batch.events.iter().peekable();
        for i in 0..=batch.msgs.len() {
            while let Some(event) = events.next_if(|e| usize::from(e.after_msgs) == i) {
                if event.conv == conv {
                    seen.push(match event.change {
                        StreamChange::Joined { .. } => Seen::Joined(event.uid),
                        StreamChange::Left { .. } => Seen::Left(event.uid),
                        StreamChange::Read { seq } => Seen::Read(event.uid, seq.0),
                    });
                }
            }
            if let Some(msg) = batch.msgs.get(i) {
                if msg.conv == conv {
                    seen.push(Seen::Msg(msg.seq.0));
                }
            }
        }
        assert!(
            events.next().is_none(),
            "every event falls among the messages"
        );
        position = batch.position.into_owned();
    }
    (seen, position)
}

#[test]
fn the_stream_carries_member_and_cursor_changes_in_order_across_a_sigkill() {
    let server = Server::start(&ARGS);
    let mut control = service(&server);
    let mut stream = service(&server);
    let start = subscribe(&mut stream, "");

    let info = |reply: chinwag_protocol::Frame<'static>| match reply.message {
        Message::GroupCreateOk(info) | Message::GroupAddOk(info) | Message::GroupRemoveOk(info) => {
            info
        }
        other => panic!("expected a group reply, got {other:?}"),
    };
    let conv = info(
        control
            .call(Message::GroupCreate(GroupCreate {
                key: 77,
                users: vec![buyer(1), buyer(2)],
            }))
            .unwrap(),
    )
    .conv;
    control
        .call(Message::GroupAdd(GroupMembers {
            conv,
            users: vec![buyer(3)],
        }))
        .unwrap();
    control
        .call(Message::SendAs(SendAs {
            from: buyer(1),
            send: Send {
                target: Target::Conv(conv),
                cmid: "m1".into(),
                kind: "text".into(),
                body: "hello group".into(),
            },
        }))
        .unwrap();
    let token = chinwag_tests::mint_token(SECRET, buyer(2));
    let mut reader = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    reader.login(&token, DeviceType::Web).unwrap();
    reader
        .call(Message::Read(Cursor { conv, seq: Seq(1) }))
        .unwrap();
    control
        .call(Message::GroupRemove(GroupMembers {
            conv,
            users: vec![buyer(3)],
        }))
        .unwrap();

    let expected = vec![
        Seen::Joined(buyer(1)),
        Seen::Joined(buyer(2)),
        Seen::Joined(buyer(3)),
        Seen::Msg(1),
        Seen::Read(buyer(2), 1),
        Seen::Left(buyer(3)),
    ];
    let (seen, _) = read(&mut stream, conv, expected.len());
    assert_eq!(seen, expected);
    drop((stream, control, reader));

    // After a crash, resuming from the subscription's first position gives everything again,
    // in the same order; nothing is missing.
    server.signal(libc::SIGKILL);
    let server = Server::start_in(server.into_data_dir(), &ARGS, &[]);
    let mut stream = service(&server);
    // The first batch may hold everything: read it as any other.
    stream
        .send(Message::Subscribe(start.as_str().into()))
        .unwrap();
    let (again, position) = read(&mut stream, conv, expected.len());
    assert_eq!(again, expected);

    // From a shell: one JSON line per batch, its events included; resumable.
    let token = chinwag_tests::mint_token(SECRET, Uid::new(UidKind::Service, 1));
    let mut tail = std::process::Command::new(chinwag_tests::binary())
        .arg("backend")
        .arg("--addr")
        .arg(server.backend_addr.to_string())
        .env("CHINWAG_SERVICE_TOKEN", &token)
        .args(["tail", "--from", &start])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut printed = String::new();
    while !printed.contains(r#""event":"left""#) {
        let line = lines.next().expect("a line").unwrap();
        printed.push_str(&line);
        printed.push('\n');
    }
    tail.kill().unwrap();
    tail.wait().unwrap();
    let read_event =
        format!(r#""event":"read","after_msgs":1,"conv":"{conv}","uid":"buyer:2","seq":1}}"#);
    assert!(printed.contains(&read_event), "{printed}");
    assert!(!position.is_empty());
}
