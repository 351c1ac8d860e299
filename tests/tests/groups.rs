//! Group conversations against the real binary (docs/backend.md "Groups", docs/protocol.md
//! "Groups"): a service creates and changes groups on the service port; clients in both
//! encodings receive the member pushes and each other's messages.

use std::time::Duration;

use chinwag_protocol::client::{ClientError, Encoding};
use chinwag_protocol::{
    ConvId, ConvInfo, ConvType, Cursor, DeviceType, ErrorCode, GroupCreate, GroupMembers, Message,
    Send, Seq, Target, Uid, UidKind,
};
use chinwag_tests::{buyer, push, rejected, Server};

const SECRET: &str = "groups-secret-groups-secret-groups";
const SHORT: Duration = Duration::from_millis(300);

fn start() -> Server {
    Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=0"])
}

fn info(reply: Result<chinwag_protocol::Frame<'static>, ClientError>) -> ConvInfo {
    match reply.map(|f| f.message) {
        Ok(
            Message::GroupCreateOk(info)
            | Message::GroupAddOk(info)
            | Message::GroupRemoveOk(info)
            | Message::ConvInfoOk(info),
        ) => info,
        other => panic!("expected conv info, got {other:?}"),
    }
}

fn send(conv: ConvId, cmid: &str, body: &str) -> Message<'static> {
    Message::Send(Send {
        target: Target::Conv(conv),
        cmid: cmid.to_string().into(),
        kind: "text".into(),
        body: body.to_string().into(),
    })
}

#[test]
fn a_service_makes_a_group_and_its_members_talk_in_both_encodings() {
    let server = start();
    let mut service = server.service();
    let mut ann = server.login(buyer(1));
    let mut bob = server
        .login_as(buyer(2), None, DeviceType::Web, Encoding::Binary)
        .0;
    let mut cat = server.login(buyer(3));

    let created = info(service.call(Message::GroupCreate(GroupCreate {
        key: 77,
        users: vec![ann_uid(), bob_uid()],
    })));
    assert!(created.created);
    assert_eq!(
        (created.conv_type, created.key, created.member_count),
        (ConvType::Group, Some(77), 2)
    );
    let conv = created.conv;
    for member in [&mut ann, &mut bob] {
        let Message::Members(m) = push(member) else {
            panic!("members first")
        };
        assert_eq!((m.conv, m.members), (conv, vec![ann_uid(), bob_uid()]));
    }
    // A retry with the same key: the same group, nothing new.
    let again = info(service.call(Message::GroupCreate(GroupCreate {
        key: 77,
        users: vec![buyer(9)],
    })));
    assert_eq!((again.conv, again.created), (conv, false));
    assert!(ann.next_push(SHORT).unwrap().is_none());

    // Members write; the other member's devices get it.
    let ok = ann.call(send(conv, "a1", "hi all")).unwrap();
    assert!(matches!(ok.message, Message::SendOk(_)), "{ok:?}");
    let Message::Msg(msg) = push(&mut bob) else {
        panic!("a msg")
    };
    assert_eq!(
        (msg.conv, &*msg.body, msg.from),
        (conv, "hi all", ann_uid())
    );
    let convs = bob.call(Message::Convs).unwrap();
    let Message::ConvsOk(convs) = convs.message else {
        panic!("{convs:?}")
    };
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].conv_type, convs[0].unread), (ConvType::Group, 1));
    assert_eq!(
        rejected(cat.call(send(conv, "c1", "let me in"))),
        ErrorCode::NotMember
    );

    // Cat is added: everyone hears it, then cat writes and ann reads it.
    let added = info(service.call(Message::GroupAdd(GroupMembers {
        conv,
        users: vec![buyer(3)],
    })));
    assert_eq!(added.members, [ann_uid(), bob_uid(), buyer(3)]);
    for member in [&mut ann, &mut bob, &mut cat] {
        assert!(matches!(push(member), Message::Members(m) if m.members.len() == 3));
    }
    cat.call(send(conv, "c2", "thanks")).unwrap();
    assert!(matches!(push(&mut ann), Message::Msg(m) if m.body == "thanks"));
    assert!(matches!(push(&mut bob), Message::Msg(m) if m.body == "thanks"));

    // A removal naming a non-member is refused whole; cat stays.
    assert_eq!(
        rejected(service.call(Message::GroupRemove(GroupMembers {
            conv,
            users: vec![buyer(3), buyer(4)],
        }))),
        ErrorCode::NotMember
    );
    let removed = info(service.call(Message::GroupRemove(GroupMembers {
        conv,
        users: vec![buyer(3)],
    })));
    assert_eq!(removed.members, [ann_uid(), bob_uid()]);
    let Message::Members(m) = push(&mut cat) else {
        panic!("the removed member hears it")
    };
    assert_eq!(m.members, [ann_uid(), bob_uid()]);
    assert_eq!(
        rejected(cat.call(send(conv, "c3", "still here?"))),
        ErrorCode::NotMember
    );

    // Info of the group, and errors for what is not a group.
    let now = info(service.call(Message::ConvInfo(conv)));
    assert_eq!((now.last_seq, now.member_count), (Seq(2), 2));
    assert_eq!(
        rejected(service.call(Message::ConvInfo(ConvId(conv.0 + (1000 << 8))))),
        ErrorCode::NotFound
    );
    let direct = ann.call(Message::Send(Send {
        target: Target::User(bob_uid()),
        cmid: "d1".into(),
        kind: "text".into(),
        body: "psst".into(),
    }));
    let Message::SendOk(direct) = direct.unwrap().message else {
        panic!("direct send")
    };
    assert_eq!(
        rejected(service.call(Message::GroupAdd(GroupMembers {
            conv: direct.conv,
            users: vec![buyer(3)],
        }))),
        ErrorCode::BadRequest
    );
}

#[test]
fn a_large_group_gets_member_deltas_and_no_receipts_from_others() {
    let server = start();
    let mut service = server.service();
    let mut ann = server.login(buyer(1));
    let mut bob = server
        .login_as(buyer(2), None, DeviceType::Web, Encoding::Binary)
        .0;
    // 201 members: over the 200 that get whole lists. Built in one create (≤ 1,000 per op).
    let members: Vec<Uid> = (1..=201).map(buyer).collect();
    let created = info(service.call(Message::GroupCreate(GroupCreate {
        key: 5,
        users: members,
    })));
    assert_eq!((created.member_count, created.members.len()), (201, 0));
    for member in [&mut ann, &mut bob] {
        let Message::MembersDelta(d) = push(member) else {
            panic!("a delta")
        };
        assert_eq!((d.added.len(), d.count), (201, 201));
    }
    let added = info(service.call(Message::GroupAdd(GroupMembers {
        conv: created.conv,
        users: vec![Uid::new(UidKind::Agent, 7)],
    })));
    assert_eq!(added.member_count, 202);
    for member in [&mut ann, &mut bob] {
        let Message::MembersDelta(d) = push(member) else {
            panic!("a delta")
        };
        assert_eq!(
            (d.added, d.removed, d.count),
            (vec![Uid::new(UidKind::Agent, 7)], vec![], 202)
        );
    }

    ann.call(send(created.conv, "a1", "to many")).unwrap();
    assert!(matches!(push(&mut bob), Message::Msg(_)));
    let read = bob.call(Message::Read(Cursor {
        conv: created.conv,
        seq: Seq(1),
    }));
    assert!(matches!(read.unwrap().message, Message::ReadOk(_)));
    assert!(
        ann.next_push(SHORT).unwrap().is_none(),
        "no receipt to other members of a large group"
    );
}

fn ann_uid() -> Uid {
    buyer(1)
}

fn bob_uid() -> Uid {
    buyer(2)
}

#[test]
fn chinwag_backend_group_subcommands_print_the_reply_as_json() {
    let server = start();
    let mut ann = server.login(buyer(1));
    let (ok, out) = server.backend(&["group", "create", "9", "buyer:1,agent:7"]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with(r#"{"op":"group_create_ok","req":2,"conv":""#),
        "{out}"
    );
    assert!(
        out.contains(r#""type":"group","key":"9","members":["buyer:1","agent:7"],"member_count":2,"last_seq":0,"created":true}"#),
        "{out}"
    );
    let conv = out.split('"').nth(9).unwrap().to_string();
    assert!(matches!(push(&mut ann), Message::Members(_)));

    let (ok, out) = server.backend(&["group", "add", &conv, "buyer:2"]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""member_count":3"#), "{out}");
    let (ok, out) = server.backend(&["group", "remove", &conv, "agent:7"]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""members":["buyer:1","buyer:2"]"#), "{out}");
    let (ok, out) = server.backend(&["info", &conv]);
    assert!(ok, "{out}");
    assert!(out.starts_with(r#"{"op":"conv_info_ok""#), "{out}");

    // An error reply: printed, exit code 1.
    let (ok, out) = server.backend(&["group", "remove", &conv, "agent:7"]);
    assert!(!ok);
    assert!(out.contains(r#""code":"not_member""#), "{out}");
}
