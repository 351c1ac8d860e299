//! Profiles against the real binary (docs/backend.md "Profiles", docs/protocol.md
//! "Profiles"): a service sets users', shops' and conversations' profiles on the service port;
//! logged-in clients in both encodings get them in `msg`, `members` and `convs`; they survive
//! restarts; bad input is refused and stores nothing.

use std::time::Duration;

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{
    ConvId, ConvSummary, DeviceType, ErrorCode, GroupCreate, Message, MsgPush, Profile, ProfileOf,
    Send, SendAs, ShopId, Subject, Target, Uid,
};
use chinwag_tests::{agent, buyer, rejected, Server};

const SECRET: &str = "profiles-secret-profiles-secret-pr";
const LONG: Duration = Duration::from_secs(5);
const SHOP: ShopId = ShopId(42);

fn args() -> [&'static str; 5] {
    // Four shards, so users, the shop and conversations land on different owners.
    [
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--shards=4",
        "--log-segment-bytes=1048576",
    ]
}

fn profile(name: &str) -> Profile {
    Profile {
        name: name.into(),
        avatar: format!("https://img.example/{name}.png"),
    }
}

fn send(target: Target, cmid: &str) -> Message<'static> {
    Message::Send(Send {
        target,
        cmid: cmid.to_string().into(),
        kind: "text".into(),
        body: "hello".into(),
    })
}

/// The next push of `client` that is a `msg`, skipping others.
fn next_msg(client: &mut Client) -> MsgPush<'static> {
    loop {
        match client.next_push(LONG).unwrap().map(|f| f.message) {
            Some(Message::Msg(m)) => return m,
            Some(_) => continue,
            None => panic!("no msg within {LONG:?}"),
        }
    }
}

fn convs(client: &mut Client) -> Vec<ConvSummary<'static>> {
    match client.call(Message::Convs).unwrap().message {
        Message::ConvsOk(convs) => convs,
        other => panic!("expected convs_ok, got {other:?}"),
    }
}

fn set(service: &mut ServiceClient, subject: Subject, p: Profile) {
    service.set_profile(subject, p).expect("set_profile_ok");
}

fn nicks(profiles: &[chinwag_protocol::UserProfile]) -> Vec<(Uid, &str)> {
    profiles
        .iter()
        .map(|p| (p.uid, p.profile.name.as_str()))
        .collect()
}

#[test]
fn profiles_set_by_a_service_reach_clients_in_msg_members_and_convs() {
    let server = Server::start(&args());
    let mut service = server.service();
    set(&mut service, Subject::User(buyer(1)), profile("Ann"));
    set(&mut service, Subject::User(agent(7)), profile("Ted"));
    set(&mut service, Subject::Shop(SHOP), profile("Tea shop"));
    assert_eq!(
        service.get_profile(Subject::User(buyer(1))).unwrap(),
        profile("Ann")
    );

    let mut ted = server
        .login_as(agent(7), Some(SHOP.0), DeviceType::Web, Encoding::Json)
        .0;
    let mut ann = server
        .login_as(buyer(1), None, DeviceType::Web, Encoding::Binary)
        .0;
    let ok = ann.call(send(Target::Shop(SHOP), "a1")).unwrap();
    let Message::SendOk(ok) = ok.message else {
        panic!("{ok:?}")
    };
    let conv = ok.conv;

    // The agent is assigned: `members` names both, with both profiles; then the message with
    // the sender's and the shop's profile.
    let members = loop {
        match ted.next_push(LONG).unwrap().map(|f| f.message) {
            Some(Message::Members(m)) => break m,
            Some(_) => continue,
            None => panic!("no members push"),
        }
    };
    assert_eq!(
        nicks(&members.profiles),
        vec![(buyer(1), "Ann"), (agent(7), "Ted")]
    );
    let msg = next_msg(&mut ted);
    assert_eq!((msg.conv, msg.from), (conv, buyer(1)));
    assert_eq!(msg.from_profile, profile("Ann"));
    assert_eq!(msg.conv_profile, profile("Tea shop"));

    // `convs` of either side: the shop's name and both members' profiles.
    for who in [&mut ted, &mut ann] {
        let list = convs(who);
        let entry = list
            .iter()
            .find(|c| c.conv == conv)
            .expect("the conversation");
        assert_eq!(entry.profile, profile("Tea shop"));
        assert_eq!(
            nicks(&entry.profiles),
            vec![(buyer(1), "Ann"), (agent(7), "Ted")]
        );
    }

    // A service writing as the agent: the buyer sees the agent's profile (through the agent's
    // owner, not a lookup at the conversation's).
    service
        .call(Message::SendAs(SendAs {
            from: agent(7),
            send: Send {
                target: Target::Conv(conv),
                cmid: "bot-1".into(),
                kind: "text".into(),
                body: "welcome".into(),
            },
        }))
        .unwrap();
    let msg = next_msg(&mut ann);
    assert_eq!(
        (msg.from, msg.from_profile.name.as_str()),
        (agent(7), "Ted")
    );

    // The buyer's nickname changes while it is logged in: its next message carries the new
    // one. (The ping makes sure the session's shard has handled what the owner posted.)
    set(&mut service, Subject::User(buyer(1)), profile("Annie"));
    ann.call(Message::Ping).unwrap();
    ann.call(send(Target::Conv(conv), "a2")).unwrap();
    let msg = loop {
        // The agent's own devices got the service's message too (a `send_as` skips none).
        let msg = next_msg(&mut ted);
        if msg.from == buyer(1) {
            break msg;
        }
    };
    assert_eq!(msg.from_profile, profile("Annie"));
    let entry = convs(&mut ted)
        .into_iter()
        .find(|c| c.conv == conv)
        .unwrap();
    assert_eq!(nicks(&entry.profiles)[0], (buyer(1), "Annie"));

    // A group's own name: set by the service, pushed to its members as `conv_profile`, then
    // in its messages.
    let mut bob = server.login(buyer(2));
    let created = service
        .call(Message::GroupCreate(GroupCreate {
            key: 5,
            users: vec![buyer(1), buyer(2)],
        }))
        .unwrap();
    let Message::GroupCreateOk(group) = created.message else {
        panic!("{created:?}")
    };
    set(&mut service, Subject::Conv(group.conv), profile("Club"));
    let pushed = loop {
        match bob.next_push(LONG).unwrap().map(|f| f.message) {
            Some(Message::ConvProfile(of)) => break of,
            Some(_) => continue,
            None => panic!("no conv_profile push"),
        }
    };
    assert_eq!(
        pushed,
        ProfileOf {
            subject: Subject::Conv(group.conv),
            profile: profile("Club")
        }
    );
    ann.call(send(Target::Conv(group.conv), "g1")).unwrap();
    let msg = next_msg(&mut bob);
    assert_eq!(
        (
            msg.conv_profile.name.as_str(),
            msg.from_profile.name.as_str()
        ),
        ("Club", "Annie")
    );
}

fn profiles_survive_a_restart(signal: i32) {
    let server = Server::start(&args());
    let mut service = server.service();
    set(&mut service, Subject::User(buyer(1)), profile("Ann"));
    set(&mut service, Subject::User(buyer(2)), profile("Bob"));
    let mut ann = server.login(buyer(1));
    let mut bob = server.login(buyer(2));
    let ok = ann.call(send(Target::User(buyer(2)), "a1")).unwrap();
    let Message::SendOk(ok) = ok.message else {
        panic!("{ok:?}")
    };
    bob.call(send(Target::Conv(ok.conv), "b1")).unwrap();
    set(&mut service, Subject::Conv(ok.conv), profile("Pair"));
    drop((ann, bob, service));
    server.signal(signal);
    let server = Server::start_in(server.into_data_dir(), &args(), &[]);

    let mut service = server.service();
    assert_eq!(
        service.get_profile(Subject::User(buyer(1))).unwrap(),
        profile("Ann")
    );
    assert_eq!(
        service.get_profile(Subject::Conv(ok.conv)).unwrap(),
        profile("Pair")
    );
    let mut bob = server
        .login_as(buyer(2), None, DeviceType::Web, Encoding::Binary)
        .0;
    let entry = convs(&mut bob)
        .into_iter()
        .find(|c| c.conv == ok.conv)
        .unwrap();
    assert_eq!(entry.profile, profile("Pair"));
    assert_eq!(
        nicks(&entry.profiles),
        vec![(buyer(1), "Ann"), (buyer(2), "Bob")]
    );
}

#[test]
fn profiles_survive_a_sigterm_restart() {
    profiles_survive_a_restart(libc::SIGTERM);
}

#[test]
fn profiles_survive_a_sigkill() {
    profiles_survive_a_restart(libc::SIGKILL);
}

#[test]
fn bad_profiles_are_refused_and_store_nothing() {
    let server = Server::start(&args());
    let mut service = server.service();

    // Over the limits: 65 bytes of nickname, 513 of avatar URL.
    let long_name = Profile {
        name: "n".repeat(65),
        avatar: String::new(),
    };
    let long_avatar = Profile {
        name: "ok".into(),
        avatar: "a".repeat(513),
    };
    for p in [long_name, long_avatar] {
        let reply = service.call(Message::SetProfile(ProfileOf {
            subject: Subject::User(buyer(1)),
            profile: p,
        }));
        assert_eq!(rejected(reply), ErrorCode::BadRequest);
    }
    assert_eq!(
        service.get_profile(Subject::User(buyer(1))).unwrap(),
        Profile::default(),
        "nothing stored"
    );
    // At the limits: accepted.
    let max = Profile {
        name: "é".repeat(32),
        avatar: "a".repeat(512),
    };
    set(&mut service, Subject::User(buyer(1)), max.clone());
    assert_eq!(service.get_profile(Subject::User(buyer(1))).unwrap(), max);

    // Unknown conversations, on a shard of this node or not.
    for conv in [ConvId(99 << 8), ConvId(99 << 8 | 200)] {
        let reply = service.call(Message::SetProfile(ProfileOf {
            subject: Subject::Conv(conv),
            profile: profile("X"),
        }));
        assert_eq!(rejected(reply), ErrorCode::NotFound, "{conv}");
    }

    // A shop conversation shows its shop's profile: naming it is refused.
    let mut ann = server.login(buyer(1));
    let ok = ann.call(send(Target::Shop(SHOP), "a1")).unwrap();
    let Message::SendOk(ok) = ok.message else {
        panic!("{ok:?}")
    };
    let reply = service.call(Message::SetProfile(ProfileOf {
        subject: Subject::Conv(ok.conv),
        profile: profile("Mine"),
    }));
    assert_eq!(rejected(reply), ErrorCode::BadRequest);
    assert_eq!(
        service.get_profile(Subject::Conv(ok.conv)).unwrap(),
        Profile::default()
    );

    // A client may not set profiles: a service op on /ws is a bad request.
    let reply = ann.call(Message::SetProfile(ProfileOf {
        subject: Subject::User(buyer(1)),
        profile: profile("Me"),
    }));
    assert_eq!(rejected(reply), ErrorCode::BadRequest);
    assert_eq!(service.get_profile(Subject::User(buyer(1))).unwrap(), max);
}

#[test]
fn chinwag_backend_profile_subcommands_print_the_reply_as_json() {
    let server = Server::start(&args());
    let (ok, out) = server.backend(&["profile", "set", "--user", "agent:7", "--nick", "Ted"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), r#"{"op":"set_profile_ok","req":2}"#);
    let (ok, out) = server.backend(&["profile", "set", "--shop", "42", "--name", "Tea shop"]);
    assert!(ok, "{out}");
    let (ok, out) = server.backend(&["profile", "get", "--user", "agent:7"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.trim(),
        r#"{"op":"get_profile_ok","req":2,"user":"agent:7","nick":"Ted"}"#
    );
    let (ok, out) = server.backend(&["profile", "get", "--shop", "42"]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""name":"Tea shop""#), "{out}");

    // An error reply: printed, exit code 1.
    let (ok, out) = server.backend(&["profile", "set", "--conv", "25600", "--name", "X"]);
    assert!(!ok);
    assert!(out.contains(r#""code":"not_found""#), "{out}");
}
