//! Day-one safety (issue 9), against the real binary: one node per data directory and per
//! port, real secrets, idempotency per conversation, stable placement, no disk growth from
//! restarts, login refusals and a drain that load balancers can see.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{Message, Uid, UidKind};
use chinwag_tests::{binary, Server, WAIT};

const SECRET: &str = "safety-secret-safety-secret-safety";

/// Runs `chinwag serve ARGS` and waits (at most `WAIT`) for it to exit; returns its exit code
/// (`None` if it was still running, and was killed) and its stderr.
fn serve_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(binary());
    // The service port on an ephemeral port, so tests running at once do not collide on it.
    command.arg("serve");
    if !args.iter().any(|a| a.starts_with("--backend-listen")) {
        command.arg("--backend-listen=127.0.0.1:0");
    }
    command.args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CHINWAG_")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chinwag");
    let stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines.join("\n")
    });
    let deadline = Instant::now() + WAIT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap())
}

#[test]
fn issue_9_a_second_node_on_one_data_directory_is_refused() {
    let first = Server::start(&["--jwt-secret", SECRET]);
    let dir = first.data_dir.path().to_str().unwrap().to_string();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--shards=2",
            "--data-dir",
            &dir,
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "the second node must exit 2; log:\n{log}");
    assert!(log.contains(&dir), "names the directory: {log}");
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "names the holder: {log}"
    );
    // The first node is unharmed.
    assert_eq!(first.get("/healthz").0, 200);
}

#[test]
fn issue_9_a_second_node_on_one_port_is_refused() {
    let first = Server::start(&["--jwt-secret", SECRET]);
    let other = tempfile::tempdir().unwrap();
    let listen = format!("--listen={}", first.addr);
    let (code, log) = serve_to_exit(
        &[
            &listen,
            "--shards=2",
            "--data-dir",
            other.path().to_str().unwrap(),
            "--jwt-secret",
            "another-secret-another-secret-another",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "the second node must exit 2; log:\n{log}");
    assert!(
        log.contains(&first.addr.to_string()),
        "names the address: {log}"
    );
    assert_eq!(first.get("/healthz").0, 200);
}

/// The service port is claimed like the client port: a second node on the same `--backend-listen`
/// (with a client port of its own) exits 2 naming the address, and the first keeps serving.
#[test]
fn issue_12_a_second_node_on_one_service_port_is_refused() {
    let first = Server::start(&["--jwt-secret", SECRET]);
    let other = tempfile::tempdir().unwrap();
    let backend = format!("--backend-listen={}", first.backend_addr);
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            &backend,
            "--shards=2",
            "--data-dir",
            other.path().to_str().unwrap(),
            "--jwt-secret",
            "another-secret-another-secret-another",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "the second node must exit 2; log:\n{log}");
    assert!(
        log.contains(&first.backend_addr.to_string()),
        "names the address: {log}"
    );
    assert_eq!(first.get("/healthz").0, 200);
    // The first node's service port still answers.
    let token = chinwag_tests::mint_token(SECRET, Uid::new(UidKind::Service, 1));
    let mut service = ServiceClient::connect(&first.backend_addr.to_string(), &token)
        .expect("the first node's service port");
    let reply = service
        .call(Message::Presence(vec![Uid::new(UidKind::Buyer, 1)]))
        .expect("presence");
    assert_eq!(reply.message, Message::PresenceOk(Vec::new()));
}

#[test]
fn issue_9_empty_and_short_secrets_are_refused_from_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let base = ["--listen=127.0.0.1:0", "--shards=1", "--data-dir", data_dir];
    let short_file = dir.path().join("short");
    std::fs::write(&short_file, "x\n").unwrap();
    let short_file = format!("--jwt-secret-file={}", short_file.display());
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 5] = [
        (&["--jwt-secret", ""], &[]),
        (&["--jwt-secret", "x"], &[]),
        (&["--jwt-secret", &SECRET[..31]], &[]),
        (&[], &[("CHINWAG_JWT_SECRET", "")]),
        (&[&short_file], &[]),
    ];
    for (args, env) in cases {
        let all: Vec<&str> = base.iter().chain(args).copied().collect();
        let (code, log) = serve_to_exit(&all, env);
        assert_eq!(
            code,
            Some(2),
            "{args:?} {env:?} must be refused; log:\n{log}"
        );
        assert!(log.contains("openssl rand"), "says how to make one: {log}");
    }
    let help = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("visible to other local users"), "{help}");
    assert!(help.contains("--jwt-secret-file"), "{help}");
}

#[test]
fn a_secret_file_and_the_generated_secret_mint_tokens_the_node_accepts() {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::DeviceType;
    // Generated: `chinwag token --data-dir` reads it while the node holds the directory.
    let server = Server::start(&[]);
    let token = |args: &[&str]| {
        let out = Command::new(binary())
            .arg("token")
            .args(args)
            .args(["--uid", "buyer:1"])
            .env_remove("CHINWAG_JWT_SECRET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let dir = server.data_dir.path().to_str().unwrap().to_string();
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    client
        .login(&token(&["--data-dir", &dir]), DeviceType::Web)
        .expect("token from --data-dir accepted");
    drop(server);
    // From a file, given to both.
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let file = file.to_str().unwrap();
    let server = Server::start(&[&format!("--jwt-secret-file={file}")]);
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).unwrap();
    client
        .login(&token(&["--secret-file", file]), DeviceType::Web)
        .expect("token from --secret-file accepted");
    let short = Command::new(binary())
        .args(["token", "--secret", "short", "--uid", "buyer:1"])
        .env_remove("CHINWAG_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(short.status.code(), Some(2));
}

#[test]
fn any_shard_count_serves_a_data_directory_and_0_is_one_per_core() {
    let small = "--log-segment-bytes=1048576";
    let server = Server::start(&["--jwt-secret", SECRET, "--shards=3", small]);
    server.signal(libc::SIGTERM);
    let dir = server.into_data_dir();
    let server = Server::start_in(dir, &["--jwt-secret", SECRET, "--shards=2", small], &[]);
    assert!(server.log().contains("shards=2"), "{}", server.log());
    server.signal(libc::SIGTERM);
    let dir = server.into_data_dir();
    let cores = std::thread::available_parallelism().unwrap().get();
    let server = Server::start_in(dir, &["--jwt-secret", SECRET, "--shards=0", small], &[]);
    assert!(
        server.log().contains(&format!("shards={cores}")),
        "0 is one per core: {}",
        server.log()
    );
}

#[test]
fn a_data_directory_of_the_old_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shards"), "2\n").unwrap();
    std::fs::create_dir(dir.path().join("shard-0")).unwrap();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("data format 1"), "{log}");

    // Format 2: a log per shard.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("format"), "2\n").unwrap();
    std::fs::write(dir.path().join("shards"), "2\n").unwrap();
    std::fs::create_dir(dir.path().join("shard-0")).unwrap();
    let (code, log) = serve_to_exit(
        &[
            "--listen=127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("data format 2") && log.contains("empty --data-dir"),
        "{log}"
    );
    assert!(
        dir.path().join("shard-0").is_dir() && !dir.path().join("partitions").exists(),
        "nothing in it is touched"
    );
}

mod conversations {
    use super::*;
    use chinwag_protocol::client::{Client, ClientError, Encoding};
    use chinwag_protocol::limits::{CMID_LEN_MAX, KIND_LEN_MAX};
    use chinwag_protocol::token::{self, Claims};
    use chinwag_protocol::{
        ConvId, DeviceType, ErrorCode, History, HistoryRange, Message, Send, Seq, ShopId, Target,
        Uid, UidKind,
    };

    pub fn login(server: &Server, uid: Uid, encoding: Encoding) -> Client {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let token = token::mint(
            SECRET.as_bytes(),
            &Claims {
                uid,
                shop: None,
                exp,
            },
        );
        let mut client = Client::connect(&server.ws_url(), encoding).expect("connect");
        client.login(&token, DeviceType::Web).expect("login");
        client
    }

    pub fn send(
        client: &mut Client,
        target: Target,
        cmid: &str,
        kind: &str,
        body: &str,
    ) -> Result<(ConvId, Seq), ErrorCode> {
        let reply = client.call(Message::Send(Send {
            target,
            cmid: cmid.into(),
            kind: kind.into(),
            body: body.into(),
        }));
        match reply {
            Ok(frame) => match frame.message {
                Message::SendOk(ok) => Ok((ok.conv, ok.seq)),
                other => panic!("expected send_ok, got {other:?}"),
            },
            Err(ClientError::Rejected(e)) => Err(e.code),
            Err(e) => panic!("send: {e}"),
        }
    }

    fn bodies(client: &mut Client, conv: ConvId) -> Vec<String> {
        let reply = client
            .call(Message::History(History {
                conv,
                range: HistoryRange::Newest,
                limit: 50,
            }))
            .expect("history");
        match reply.message {
            Message::HistoryOk(ok) => ok.msgs.iter().map(|m| m.body.to_string()).collect(),
            other => panic!("expected history_ok, got {other:?}"),
        }
    }

    #[test]
    fn issue_9_the_same_cmid_in_another_conversation_is_stored() {
        // One shard: both conversations share one log and so one idempotency window.
        let server = Server::start(&["--jwt-secret", SECRET, "--shards=1"]);
        let buyer = Uid::new(UidKind::Buyer, 7);
        let mut client = login(&server, buyer, Encoding::Json);
        let first = send(&mut client, Target::Shop(ShopId(1)), "1", "text", "to one").unwrap();
        let second = send(&mut client, Target::Shop(ShopId(2)), "1", "text", "to two").unwrap();
        assert_ne!(
            first.0, second.0,
            "send_ok names the conversation the send named"
        );
        assert_eq!(second.1, Seq(1));
        assert_eq!(bodies(&mut client, first.0), ["to one"]);
        assert_eq!(
            bodies(&mut client, second.0),
            ["to two"],
            "stored, not dropped"
        );
        // A repeat in the same conversation still returns the original.
        let again = send(&mut client, Target::Conv(second.0), "1", "text", "to two").unwrap();
        assert_eq!(again, second);
        let again = send(&mut client, Target::Shop(ShopId(2)), "1", "text", "to two").unwrap();
        assert_eq!(again, second);
        assert_eq!(bodies(&mut client, second.0), ["to two"]);
    }

    /// Conversation ids carry their partition in the low 16 bits; the partition of a shop's and
    /// of a direct pair's conversation is the specified placement (docs/storage.md,
    /// "Placement"), so these are the same on any machine and any build.
    #[test]
    fn issue_9_placement_is_the_specified_hash() {
        let small = "--log-segment-bytes=1048576";
        let server = Server::start(&["--jwt-secret", SECRET, "--shards=4", small]);
        let me = Uid::new(UidKind::Buyer, 1);
        let mut client = login(&server, me, Encoding::Binary);
        // The partition (of 256) is in the id's low 16 bits; placement is `hash mod 256`, so
        // the partition mod 4 is the shard of 4 that data format 2 placed the key on.
        let owner = |conv: ConvId| {
            assert!(conv.0 & 0xffff < 256, "{conv}");
            (conv.0 & 0xffff) % 4
        };
        let shops: Vec<u64> = (1..=8)
            .map(|shop| {
                let to = Target::Shop(ShopId(shop));
                owner(send(&mut client, to, "p", "text", "hi").unwrap().0)
            })
            .collect();
        assert_eq!(shops, [0, 1, 2, 3, 2, 3, 2, 1]);
        let pairs: Vec<u64> = (2..=9)
            .map(|other| {
                let to = Target::User(Uid::new(UidKind::Buyer, other));
                owner(send(&mut client, to, "p", "text", "hi").unwrap().0)
            })
            .collect();
        assert_eq!(pairs, [1, 1, 3, 1, 1, 3, 0, 3]);
    }

    #[test]
    fn issue_9_cmid_and_kind_at_the_protocol_limits_are_stored_in_both_encodings() {
        let server = Server::start(&["--jwt-secret", SECRET]);
        for (i, encoding) in [Encoding::Json, Encoding::Binary].into_iter().enumerate() {
            let mut client = login(&server, Uid::new(UidKind::Buyer, 10 + i as u64), encoding);
            let to = Target::Shop(ShopId(3));
            let cmid = "c".repeat(CMID_LEN_MAX);
            let kind = "k".repeat(KIND_LEN_MAX);
            let stored = send(&mut client, to, &cmid, &kind, "longest");
            let (conv, seq) = stored.unwrap_or_else(|e| panic!("{encoding:?}: {e:?}"));
            assert_eq!(seq, Seq(1));
            let reply = client
                .call(Message::History(History {
                    conv,
                    range: HistoryRange::Newest,
                    limit: 1,
                }))
                .unwrap();
            let Message::HistoryOk(ok) = reply.message else {
                panic!("{reply:?}")
            };
            assert_eq!((&*ok.msgs[0].cmid, &*ok.msgs[0].kind), (&*cmid, &*kind));
            let longer = "c".repeat(CMID_LEN_MAX + 1);
            assert_eq!(
                send(&mut client, to, &longer, "text", "x"),
                Err(ErrorCode::BadRequest),
                "{encoding:?}: a cmid over the limit"
            );
            let longer = "k".repeat(KIND_LEN_MAX + 1);
            assert_eq!(
                send(&mut client, to, "other", &longer, "x"),
                Err(ErrorCode::BadRequest),
                "{encoding:?}: a kind over the limit"
            );
        }
    }
}

#[test]
fn issue_9_restarts_do_not_grow_the_log() {
    use chinwag_protocol::client::{Client, Encoding};
    use chinwag_protocol::{DeviceType, Message, Send, Target, Uid, UidKind};

    let args = [
        "--jwt-secret",
        SECRET,
        "--shards=1",
        "--messages-per-s-max=0",
        "--log-segment-bytes=1048576",
    ];
    // Every segment file of every partition's log.
    let segments = |dir: &std::path::Path| -> Vec<u64> {
        let mut sizes: Vec<u64> = std::fs::read_dir(dir.join("partitions"))
            .unwrap()
            .flat_map(|p| std::fs::read_dir(p.unwrap().path()).unwrap())
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .map(|e| e.metadata().unwrap().len())
            .collect();
        sizes.sort_unstable();
        sizes
    };
    // Once the node has prepared its next segment: the files on disk, and the metric.
    let settled = |server: &Server| {
        let deadline = Instant::now() + WAIT;
        loop {
            let on_disk = segments(server.data_dir.path());
            let metric = server.metric("chinwag_log_segment_bytes", "");
            let prepared = on_disk.contains(&(256 << 10));
            let done = prepared && metric == on_disk.iter().sum::<u64>();
            if done || Instant::now() > deadline {
                return (on_disk, metric);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut server = Server::start(&args);
    // Fill a conversation's first segment (128 KiB) past half: the next (256 KiB) is prepared.
    let mut client = Client::connect(&server.ws_url(), Encoding::Binary).unwrap();
    let me = Uid::new(UidKind::Buyer, 1);
    let token = chinwag_tests::mint_token(SECRET, me);
    client.login(&token, DeviceType::Web).unwrap();
    for i in 0..80 {
        client
            .call(Message::Send(Send {
                target: Target::User(Uid::new(UidKind::Buyer, 2)),
                cmid: format!("c{i}").into(),
                kind: "text".into(),
                body: "x".repeat(1000).into(),
            }))
            .unwrap();
    }
    drop(client);
    let (first, _) = settled(&server);
    assert!(
        first.contains(&(128 << 10)) && first.contains(&(256 << 10)),
        "the active segment and the next, twice as large: {first:?}"
    );
    for restart in 0..5 {
        server.signal(libc::SIGTERM);
        let dir = server.into_data_dir();
        server = Server::start_in(dir, &args, &[]);
        let (on_disk, metric) = settled(&server);
        assert_eq!(on_disk, first, "restart {restart} added segments");
        // The metric counts every segment file on disk, the prepared one included.
        assert_eq!(metric, on_disk.iter().sum::<u64>(), "restart {restart}");
    }
}

/// Every failed login is `unauthorized` and close 1008, whatever is wrong with the token.
#[test]
fn issue_9_every_failed_login_is_unauthorized_and_closes_1008() {
    use chinwag_protocol::client::Encoding;
    use chinwag_protocol::{binary, DeviceType, Frame, Login, Message};
    use chinwag_tests::ws_close_code;
    use tungstenite::Message as Ws;

    let server = Server::start(&["--jwt-secret", SECRET]);
    let long = "t".repeat(4097);
    let json = [
        format!(r#"{{"op":"login","req":1,"token":"{long}","device":"web"}}"#),
        r#"{"op":"login","req":2,"token":12345,"device":"web"}"#.to_string(),
        r#"{"op":"login","req":3,"token":["a"],"device":"web"}"#.to_string(),
        r#"{"op":"login","req":4,"token":"not.a.jwt","device":"web"}"#.to_string(),
    ];
    let binary = binary::encode_to_bytes(&Frame {
        req: Some(5),
        message: Message::Login(Login {
            token: long.clone().into(),
            device: DeviceType::Web,
        }),
    })
    .unwrap();
    let cases = json
        .into_iter()
        .map(|text| (Ws::text(text), Encoding::Json))
        .chain([(Ws::binary(binary.to_vec()), Encoding::Binary)]);
    for (i, (request, encoding)) in cases.enumerate() {
        let mut ws = server.ws("/ws");
        ws.send(request).unwrap();
        let reply = ws.read().expect("an error reply");
        let code = match (&reply, encoding) {
            (Ws::Text(text), Encoding::Json) => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(v["op"], "error", "case {i}: {text}");
                v["code"].as_str().unwrap().to_string()
            }
            (Ws::Binary(bytes), Encoding::Binary) => match binary::decode(bytes).unwrap().message {
                Message::Error(e) if e.code == chinwag_protocol::ErrorCode::Unauthorized => {
                    "unauthorized".to_string()
                }
                Message::Error(e) => format!("{:?}", e.code),
                other => panic!("case {i}: {other:?}"),
            },
            other => panic!("case {i}: {other:?}"),
        };
        assert_eq!(code, "unauthorized", "case {i}");
        assert_eq!(ws_close_code(&mut ws), Some(1008), "case {i}");
    }
}

/// `METHOD /healthz` on a fresh connection: (status, body).
fn healthz(server: &Server, method: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = server.tcp();
    write!(stream, "{method} /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    chinwag_tests::parse_response(&response)
}

#[test]
fn issue_9_the_drain_is_visible_to_load_balancers() {
    use std::io::{Read, Write};
    // Long close handshakes: the drain lasts while a client ignores its close frame.
    let mut server = Server::start(&["--jwt-secret", SECRET, "--close-timeout-ms=60000"]);
    assert_eq!(healthz(&server, "HEAD"), (200, String::new()));
    assert_eq!(server.metric("chinwag_draining", ""), 0);
    let mut holder = server.raw_ws("/ws");
    server.signal(libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    while server.get("/healthz").0 != 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.get("/healthz"), (503, "draining\n".to_string()));
    assert_eq!(healthz(&server, "HEAD"), (503, String::new()));
    assert_eq!(server.metric("chinwag_draining", ""), 1);
    // New WebSockets are turned away.
    let mut stream = server.tcp();
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    drop(stream);
    assert_eq!(
        chinwag_tests::parse_response(&response),
        (503, "draining\n".to_string())
    );
    // The last connection goes: the node exits.
    assert_eq!(chinwag_tests::read_close_code(&mut holder), Some(1001));
    drop(holder);
    assert!(server.wait_exit().success(), "{}", server.log());
}
