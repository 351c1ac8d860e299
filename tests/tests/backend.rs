//! The service port (docs/backend.md) against the real binary: authentication first, bad
//! frames, and every service op with a client on the other side.

use std::net::TcpStream;
use std::time::Duration;

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{
    DeviceType, ErrorCode, History, HistoryRange, Kick, Message, NotifyUsers, Op, Send, SendAs,
    Target, Uid, UidKind,
};
use chinwag_tests::{buyer, rejected, Server};

const SECRET: &str = "backend-secret-backend-secret-back";
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

fn start() -> Server {
    Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=0"])
}

fn raw(server: &Server) -> ServiceClient {
    ServiceClient::over(TcpStream::connect(server.backend_addr).unwrap()).unwrap()
}

/// Reads until the server closes; fails the test if it does not within the read timeout.
fn assert_closed(stream: &mut ServiceClient) {
    loop {
        match stream.next_frame() {
            Err(ClientError::Closed { .. }) | Err(ClientError::Io(_)) => return,
            Err(ClientError::TimedOut) => panic!("the server did not close the connection"),
            _ => {}
        }
    }
}

#[test]
fn auth_comes_first_and_a_bad_token_is_refused_and_closed() {
    let server = start();
    // Anything before auth: unauthorized, then closed.
    let mut early = raw(&server);
    let req = early.send(Message::Ping).unwrap();
    let reply = early.wait(req).unwrap();
    assert!(
        matches!(&reply.message, Message::Error(e) if e.code == ErrorCode::Unauthorized),
        "{reply:?}"
    );
    assert_closed(&mut early);

    // A client's token is not a service token.
    let mut wrong_kind = raw(&server);
    assert_eq!(
        rejected(wrong_kind.call(Message::Auth(server.token(buyer(1)).into()))),
        ErrorCode::Unauthorized
    );
    assert_closed(&mut wrong_kind);

    // A forged token.
    let mut forged = raw(&server);
    assert_eq!(
        rejected(forged.call(Message::Auth("a.b.c".into()))),
        ErrorCode::Unauthorized
    );
    assert_closed(&mut forged);

    // A good one.
    let service = server.service();
    assert_eq!(service.auth().uid, Uid::new(UidKind::Service, 1));
}

#[test]
fn bad_frames_get_clear_errors_and_an_oversized_one_closes_the_connection() {
    let server = Server::start(&["--jwt-secret", SECRET, "--backend-frame-bytes-max=4096"]);
    let mut service = server.service();
    // An unknown op, with a req: answered, the connection goes on.
    let unknown = [0, 0, 0, 16, 1, 0x2e, 0, 1, 0, 0, 0, 0, 0, 0, 0, 42];
    service.send_bytes(&unknown).unwrap();
    let reply = service.wait(42).unwrap();
    assert!(
        matches!(&reply.message, Message::Error(e) if e.code == ErrorCode::BadRequest && e.message.contains("0x2e")),
        "{reply:?}"
    );
    // A client op is not a service op.
    assert_eq!(
        rejected(service.call(Message::Convs)),
        ErrorCode::BadRequest
    );
    // A truncated body.
    let truncated = [
        0,
        0,
        0,
        17,
        1,
        Op::Kick as u8,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        43,
        0,
    ];
    service.send_bytes(&truncated).unwrap();
    let reply = service.wait(43).unwrap();
    assert!(
        matches!(&reply.message, Message::Error(e) if e.code == ErrorCode::BadRequest),
        "{reply:?}"
    );
    assert!(service.call(Message::Ping).is_ok(), "still served");

    // A frame over backend_frame_bytes_max: refused from its length alone, then closed.
    let mut header = vec![0, 1, 0, 0, 1, Op::Ping as u8, 0, 1];
    header.extend_from_slice(&44u64.to_be_bytes());
    service.send_bytes(&header).unwrap();
    let reply = service.next_frame().unwrap();
    assert!(
        matches!(&reply.message, Message::Error(e) if e.code == ErrorCode::TooLarge),
        "{reply:?}"
    );
    assert_closed(&mut service);
}

#[test]
fn send_as_stores_as_the_user_idempotently_and_clients_receive_it() {
    let server = start();
    let mut service = server.service();
    let mut bob = server.login(buyer(2));
    let send = |cmid: &str| {
        Message::SendAs(SendAs {
            from: buyer(1),
            send: Send {
                target: Target::User(buyer(2)),
                cmid: cmid.to_string().into(),
                kind: "text".into(),
                body: "hello from a bot".into(),
            },
        })
    };
    let first = service.call(send("s-1")).unwrap();
    let Message::SendAsOk(ok) = first.message else {
        panic!("{first:?}")
    };
    assert_eq!(ok.seq.0, 1);
    // The same cmid again: the same answer, nothing stored.
    let again = service.call(send("s-1")).unwrap();
    assert_eq!(again.message, Message::SendAsOk(ok));
    let push = bob.next_push(LONG).unwrap().expect("bob gets the msg");
    let Message::Msg(msg) = push.message else {
        panic!("{push:?}")
    };
    assert_eq!(
        (msg.from, msg.seq, &*msg.body),
        (buyer(1), ok.seq, "hello from a bot")
    );
    assert!(
        bob.next_push(SHORT).unwrap().is_none(),
        "stored once, pushed once"
    );

    // As a non-member of a conversation: refused like the user would be.
    let outsider = Message::SendAs(SendAs {
        from: buyer(3),
        send: Send {
            target: Target::Conv(ok.conv),
            cmid: "s-2".into(),
            kind: "text".into(),
            body: "x".into(),
        },
    });
    assert_eq!(rejected(service.call(outsider)), ErrorCode::NotMember);

    // The history of any conversation.
    let page = service
        .call(Message::ConvHistory(History {
            conv: ok.conv,
            range: HistoryRange::Newest,
            limit: 50,
        }))
        .unwrap();
    let Message::ConvHistoryOk(page) = page.message else {
        panic!("{page:?}")
    };
    assert_eq!(page.msgs.len(), 1);
    assert_eq!(page.msgs[0].cmid, "s-1");
    let missing = Message::ConvHistory(History {
        conv: chinwag_protocol::ConvId(ok.conv.0 + 256 * 1000),
        range: HistoryRange::Newest,
        limit: 50,
    });
    assert_eq!(rejected(service.call(missing)), ErrorCode::NotFound);
}

#[test]
fn notify_reaches_every_device_of_the_users_and_no_one_else() {
    let server = start();
    let mut service = server.service();
    let mut web = server.login(buyer(1));
    let mut phone = server
        .login_as(buyer(1), None, DeviceType::Ios, Encoding::Json)
        .0;
    let mut other = server.login(buyer(2));
    let mut binary = Client::connect(&server.ws_url(), Encoding::Binary).unwrap();
    binary
        .login(&server.token(buyer(3)), DeviceType::Web)
        .unwrap();
    let reply = service
        .call(Message::NotifyUsers(NotifyUsers {
            users: vec![buyer(1), buyer(3), buyer(99)],
            kind: "parcel".into(),
            body: "on its way".into(),
        }))
        .unwrap();
    assert_eq!(reply.message, Message::NotifyUsersOk(3));
    for device in [&mut web, &mut phone, &mut binary] {
        let push = device.next_push(LONG).unwrap().expect("a notify");
        let Message::Notify(n) = push.message else {
            panic!("{push:?}")
        };
        assert_eq!((&*n.kind, &*n.body), ("parcel", "on its way"));
        assert!(n.ts > 0);
    }
    assert!(
        other.next_push(SHORT).unwrap().is_none(),
        "buyer 2 was not named"
    );
    // Nothing was stored: buyer 1 has no conversation.
    let convs = web.call(Message::Convs).unwrap();
    assert_eq!(convs.message, Message::ConvsOk(vec![]));
}

/// Regression test for the presence gather (session 3): a request's parts were matched by
/// the service's `req`, so two requests in flight with the same `req` took each other's parts
/// (one answered with a mix, or early and short). Parts are now matched by a token of the
/// connection's own. Two requests with the same `req`, each spanning several of four shards,
/// sent back to back again and again: each is answered once with exactly its own users.
#[test]
fn presence_requests_with_the_same_req_each_get_their_own_users() {
    let server = Server::start(&["--jwt-secret", SECRET, "--shards=4"]);
    // Buyers 1..=8 online (their partitions spread them over the shards); 9..=24 offline.
    let _online: Vec<Client> = (1..=8).map(|id| server.login(buyer(id))).collect();
    let everyone: Vec<Uid> = (1..=8).chain(17..=24).map(buyer).collect();
    let one: Vec<Uid> = std::iter::once(3).chain(9..=16).map(buyer).collect();
    let online_of = |message: &Message<'static>| -> Vec<(Uid, usize)> {
        let Message::PresenceOk(online) = message else {
            panic!("expected presence_ok, got {message:?}")
        };
        online.iter().map(|o| (o.uid, o.devices.len())).collect()
    };
    let all_eight: Vec<(Uid, usize)> = (1..=8).map(|id| (buyer(id), 1)).collect();
    let mut service = server.service();
    for req in 100..130 {
        for users in [&everyone, &one] {
            let frame = chinwag_protocol::Frame::with_req(req, Message::Presence(users.clone()));
            service.send_frame(&frame).unwrap();
        }
        let mut answers: Vec<Vec<(Uid, usize)>> = (0..2)
            .map(|_| {
                let frame = service.next_frame().expect("a presence answer");
                assert_eq!(frame.req, Some(req), "{frame:?}");
                online_of(&frame.message)
            })
            .collect();
        // Replies may come in either order: each goes out when its last part is back.
        answers.sort();
        assert_eq!(
            answers,
            [all_eight.clone(), vec![(buyer(3), 1)]],
            "round {req}"
        );
    }
    // Nothing more comes: neither request was answered twice.
    let mut quiet = service;
    quiet.set_timeout(SHORT).unwrap();
    assert!(
        matches!(quiet.next_frame(), Err(ClientError::TimedOut)),
        "an extra answer"
    );
}

#[test]
fn presence_lists_online_devices_and_kick_closes_them_with_4001() {
    let server = start();
    let mut service = server.service();
    let mut web = server.login(buyer(1));
    let mut phone = server
        .login_as(buyer(1), None, DeviceType::Ios, Encoding::Json)
        .0;
    let _other = server.login(buyer(2));
    let presence = service
        .call(Message::Presence(vec![buyer(3), buyer(1), buyer(2)]))
        .unwrap();
    let Message::PresenceOk(online) = presence.message else {
        panic!("{presence:?}")
    };
    let users: Vec<(Uid, usize)> = online.iter().map(|o| (o.uid, o.devices.len())).collect();
    assert_eq!(users, [(buyer(1), 2), (buyer(2), 1)], "buyer 3 is offline");

    // Kick one device: only the phone goes.
    let phone_device = online[0]
        .devices
        .iter()
        .copied()
        .find(|d| d.device_type() == DeviceType::Ios)
        .unwrap();
    let reply = service
        .call(Message::Kick(Kick {
            uid: buyer(1),
            device: Some(phone_device),
        }))
        .unwrap();
    assert_eq!(reply.message, Message::KickOk(1));
    let push = phone.next_push(LONG).unwrap().expect("kicked");
    assert!(matches!(push.message, Message::Kicked(_)), "{push:?}");
    match phone.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    assert!(web.call(Message::Ping).is_ok(), "the web session stays");

    // Kick the user: every session goes.
    let reply = service
        .call(Message::Kick(Kick {
            uid: buyer(1),
            device: None,
        }))
        .unwrap();
    // The phone's session may still be listed until its close completes: 1 or 2.
    assert!(matches!(reply.message, Message::KickOk(1 | 2)), "{reply:?}");
    let push = web.next_push(LONG).unwrap().expect("kicked");
    assert!(matches!(push.message, Message::Kicked(_)), "{push:?}");
}

#[test]
fn a_service_that_does_not_read_is_disconnected_and_others_are_unaffected() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--send-queue-bytes-max=131072",
        "--shards=1",
    ]);
    let mut stalled = server.service();
    let mut sender = server.service();
    let message = Message::SendAs(SendAs {
        from: buyer(1),
        send: Send {
            target: Target::User(buyer(2)),
            cmid: "big".into(),
            kind: "text".into(),
            body: "x".repeat(60_000).into(),
        },
    });
    let conv = match sender.call(message).unwrap().message {
        Message::SendAsOk(ok) => ok.conv,
        other => panic!("{other:?}"),
    };
    // Pipeline history pages of ~60 KB each without reading a single reply: the socket
    // buffers fill, then the outbox, then the server drops the connection.
    let page = Message::ConvHistory(History {
        conv,
        range: HistoryRange::Newest,
        limit: 1,
    });
    let mut sent = 0;
    let closed = loop {
        if stalled.send(page.clone()).is_err() {
            break true;
        }
        sent += 1;
        if sent == 5_000 {
            break false;
        }
    };
    // Whether the writes failed or not, reading now must end in a close, not 5,000 pages.
    if !closed {
        let mut pages = 0;
        let mut stream = stalled;
        while stream.next_frame().is_ok() {
            pages += 1;
        }
        assert!(
            pages < 5_000,
            "the server buffered every page for a reader that stalled"
        );
    }
    assert!(
        sender.call(Message::Ping).is_ok(),
        "another service is served"
    );
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200, "clients are served");
}

#[test]
fn chinwag_backend_subcommands_print_the_reply_as_json() {
    let server = start();
    let mut bob = server.login(buyer(2));
    let (ok, out) = server.backend(&[
        "send", "--from", "buyer:1", "--user", "buyer:2", "--cmid", "k1", "hi",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with(r#"{"op":"send_as_ok","req":2,"conv":""#),
        "{out}"
    );
    let conv = out.split('"').nth(9).unwrap().to_string();
    let push = bob.next_push(LONG).unwrap().expect("the msg");
    assert!(matches!(push.message, Message::Msg(_)), "{push:?}");

    let (ok, out) = server.backend(&["notify", "--users", "buyer:2,buyer:3", "ding"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), r#"{"op":"notify_users_ok","req":2,"count":2}"#);
    let push = bob.next_push(LONG).unwrap().expect("the notify");
    assert!(matches!(push.message, Message::Notify(_)), "{push:?}");

    let (ok, out) = server.backend(&["presence", "buyer:2,buyer:3"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(r#""online":[{"uid":"buyer:2","devices":[""#),
        "{out}"
    );

    let (ok, out) = server.backend(&["history", &conv]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""body":"hi""#), "{out}");

    let (ok, out) = server.backend(&["kick", "buyer:2"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), r#"{"op":"kick_ok","req":2,"count":1}"#);

    // An error reply: printed, exit code 1.
    let (ok, out) = server.backend(&["history", "999999"]);
    assert!(!ok);
    assert!(out.contains(r#""code":"not_found""#), "{out}");
}

/// Stores `count` messages as `buyer:from` in its direct conversations with buyers
/// 1000..1000+convs (spread over the shards), cmids prefixed with `tag`.
fn store_messages(service: &mut ServiceClient, tag: &str, convs: u64, count: usize) {
    let mut reqs = Vec::new();
    for i in 0..count {
        let message = Message::SendAs(SendAs {
            from: buyer(1),
            send: Send {
                target: Target::User(buyer(1000 + i as u64 % convs)),
                cmid: format!("{tag}-{i}").into(),
                kind: "text".into(),
                body: format!("{tag} {i}").into(),
            },
        });
        reqs.push(service.send(message).unwrap());
    }
    for req in reqs {
        let reply = service.wait(req).unwrap();
        assert!(matches!(reply.message, Message::SendAsOk(_)), "{reply:?}");
    }
}

/// What a subscriber has read: the seqs per conversation and the last position handed out.
#[derive(Default)]
struct Seen {
    seqs: std::collections::BTreeMap<u64, Vec<u64>>,
    position: String,
    total: usize,
}

impl Seen {
    /// Reads batches until `total` messages in all were seen.
    fn read_until(&mut self, stream: &mut ServiceClient, total: usize) {
        while self.total < total {
            let frame = stream.next_frame().expect("a stream batch");
            let Message::StreamBatch(batch) = frame.message else {
                panic!("{frame:?}")
            };
            for msg in &batch.msgs {
                self.seqs.entry(msg.conv.0).or_default().push(msg.seq.0);
                self.total += 1;
            }
            self.position = batch.position.into_owned();
        }
    }

    /// Every conversation's seqs run on by one from its first, each once.
    fn assert_no_gap_after_the_first(&self) {
        for (conv, seqs) in &self.seqs {
            let expected: Vec<u64> = (seqs[0]..seqs[0] + seqs.len() as u64).collect();
            assert_eq!(seqs, &expected, "conversation {conv}");
        }
    }

    /// Every conversation's seqs are 1, 2, 3, ... (duplicates from an at-least-once resume
    /// removed first, and only where they repeat a seq already seen).
    fn assert_no_gap(&self) {
        for (conv, seqs) in &self.seqs {
            let mut deduped = seqs.clone();
            deduped.dedup();
            let expected: Vec<u64> = (1..=deduped.len() as u64).collect();
            assert_eq!(deduped, expected, "conversation {conv}");
        }
    }
}

fn subscribe(service: &mut ServiceClient, from: &str) -> Seen {
    let req = service.send(Message::Subscribe(from.into())).unwrap();
    let first = service.wait(req).unwrap();
    let Message::StreamBatch(batch) = first.message else {
        panic!("{first:?}")
    };
    let mut seen = Seen::default();
    for msg in &batch.msgs {
        seen.seqs.entry(msg.conv.0).or_default().push(msg.seq.0);
        seen.total += 1;
    }
    seen.position = batch.position.into_owned();
    seen
}

#[test]
fn the_stream_delivers_every_message_in_order_and_refuses_foreign_positions() {
    let server = start();
    let mut writer = server.service();
    store_messages(&mut writer, "before", 4, 10);
    let mut reader = server.service();
    let mut seen = subscribe(&mut reader, "");
    assert_eq!(seen.total, 0, "from now: nothing stored before");
    store_messages(&mut writer, "after", 4, 200);
    seen.read_until(&mut reader, 200);
    assert_eq!(seen.total, 200);
    assert_eq!(seen.seqs.len(), 4);
    // 10 earlier messages over 4 conversations: 3, 3, 2, 2 of them; the stream starts after.
    let mut firsts: Vec<u64> = seen.seqs.values().map(|s| s[0]).collect();
    firsts.sort_unstable();
    assert_eq!(firsts, [3, 3, 4, 4]);
    seen.assert_no_gap_after_the_first();

    // From the start of the log (position of a fresh subscription's first answer replayed
    // from a second connection): everything after the position, again.
    let mut again = server.service();
    let mut replay = subscribe(&mut again, &seen.position);
    store_messages(&mut writer, "more", 4, 8);
    replay.read_until(&mut again, 8);
    assert_eq!(replay.total, 8, "exactly what came after the position");

    let mut foreign = server.service();
    let code = rejected(foreign.call(Message::Subscribe("00ff".into())));
    assert_eq!(code, ErrorCode::BadRequest);
    let mut twice = server.service();
    subscribe(&mut twice, "");
    assert_eq!(
        rejected(twice.call(Message::Subscribe("".into()))),
        ErrorCode::BadRequest,
        "one subscription per connection"
    );
}

fn stream_resumes_across_a_restart(signal: i32) {
    let args = ["--jwt-secret", SECRET, "--messages-per-s-max=0"];
    let server = Server::start(&args);
    let mut writer = server.service();
    let mut reader = server.service();
    let mut seen = subscribe(&mut reader, "");
    store_messages(&mut writer, "a", 6, 120);
    seen.read_until(&mut reader, 60);
    // The subscriber stops halfway; more is stored while it is away, then the node stops.
    let position = seen.position.clone();
    drop(reader);
    store_messages(&mut writer, "b", 6, 60);
    drop(writer);
    server.signal(signal);
    let data_dir = server.into_data_dir();
    let server = Server::start_in(data_dir, &args, &[]);
    let mut writer = server.service();
    store_messages(&mut writer, "c", 6, 30);

    let mut reader = server.service();
    let mut resumed = subscribe(&mut reader, &position);
    // Everything after the position: the rest of "a", all of "b" and "c" (at least once).
    // The position came with the last batch read: everything seen is before it.
    let expected = 120 - seen.total + 60 + 30;
    resumed.read_until(&mut reader, expected);
    let mut all = Seen::default();
    for (conv, seqs) in seen.seqs.iter().chain(resumed.seqs.iter()) {
        all.seqs.entry(*conv).or_default().extend(seqs);
    }
    for seqs in all.seqs.values_mut() {
        seqs.sort_unstable();
    }
    all.assert_no_gap();
    let stored: usize = all
        .seqs
        .values()
        .map(|s| {
            let mut s = s.clone();
            s.dedup();
            s.len()
        })
        .sum();
    assert_eq!(stored, 210, "every stored message was seen");
}

#[test]
fn the_stream_resumes_without_gap_across_a_sigterm_restart() {
    stream_resumes_across_a_restart(libc::SIGTERM);
}

#[test]
fn the_stream_resumes_without_gap_across_a_sigkill() {
    stream_resumes_across_a_restart(libc::SIGKILL);
}

#[test]
fn a_stalled_subscriber_is_paused_not_buffered_and_others_are_served() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--send-queue-bytes-max=131072",
    ]);
    let mut writer = server.service();
    let mut stalled = server.service();
    let mut seen = subscribe(&mut stalled, "");
    let anon_before = rss_anon_kib(&server);
    // Far more than the send queue (and the socket buffers) hold: 2,000 messages of 4 KB.
    let body = "y".repeat(4000);
    for round in 0..20 {
        let mut reqs = Vec::new();
        for i in 0..100 {
            let message = Message::SendAs(SendAs {
                from: buyer(1),
                send: Send {
                    target: Target::User(buyer(2 + i % 3)),
                    cmid: format!("s-{round}-{i}").into(),
                    kind: "text".into(),
                    body: body.as_str().into(),
                },
            });
            reqs.push(writer.send(message).unwrap());
        }
        for req in reqs {
            writer.wait(req).unwrap();
        }
    }
    // The 8 MB the subscriber has not read are in the log, not in the server's memory: its
    // anonymous memory grew by far less (the log's pages are file-backed, not anonymous).
    // (About 2.5 MB here: the writer's requests, the allocator's arenas.)
    let grown = rss_anon_kib(&server).saturating_sub(anon_before);
    assert!(
        grown < 6 * 1024,
        "the server's anonymous memory grew {grown} KiB while 8 MB waited for the subscriber"
    );
    // Meanwhile a client and another service are served.
    let mut bob = server.login(buyer(50));
    assert!(bob.call(Message::Ping).is_ok());
    assert!(writer.call(Message::Ping).is_ok());
    // The stalled subscriber was paused, not disconnected: reading now gets everything.
    seen.read_until(&mut stalled, 2000);
    assert_eq!(seen.total, 2000);
    seen.assert_no_gap();
}

#[test]
fn chinwag_backend_tail_prints_batches_as_json_lines_and_resumes() {
    use std::io::BufRead;
    let server = start();
    let mut writer = server.service();
    let token = server.token(Uid::new(UidKind::Service, 1));
    let tail = |from: &str| {
        let mut child = std::process::Command::new(chinwag_tests::binary())
            .arg("backend")
            .arg("--addr")
            .arg(server.backend_addr.to_string())
            .env("CHINWAG_SERVICE_TOKEN", &token)
            .args(["tail", "--from", from])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    let position_of = |line: &str| line.split('"').nth(9).unwrap().to_string();
    let (mut child, mut lines) = tail("");
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.starts_with(r#"{"op":"stream_batch","req":2,"position":""#),
        "{first}"
    );
    store_messages(&mut writer, "t1", 1, 1);
    let line = lines.next().unwrap().unwrap();
    assert!(line.contains(r#""body":"t1 0""#), "{line}");
    let position = position_of(&line);
    child.kill().unwrap();
    child.wait().unwrap();

    store_messages(&mut writer, "t2", 1, 1);
    let (mut child, mut lines) = tail(&position);
    let mut resumed = lines.next().unwrap().unwrap();
    if !resumed.contains("t2 0") {
        // The first answer may come before the shard's read of the message.
        resumed = lines.next().unwrap().unwrap();
    }
    assert!(resumed.contains(r#""body":"t2 0""#), "{resumed}");
    assert!(
        !resumed.contains("t1 0"),
        "only what came after the position: {resumed}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The server's anonymous resident memory (`RssAnon`), in KiB.
fn rss_anon_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}
