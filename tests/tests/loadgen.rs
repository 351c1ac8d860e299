//! `chinwag-loadgen` end to end: small runs of its scenarios against the real binary (counts
//! asserted, zero violations), and a fake server that drops or reorders a push, which the
//! load generator must catch and fail on.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use chinwag_protocol::{
    binary, token, DeviceId, Frame, LoginOk, Message, Msg, NodeId, SendOk, Seq, Target, Uid,
};
use chinwag_tests::Server;
use serde_json::Value;
use tungstenite::Message as WsMessage;

const SECRET: &str = "loadgen-secret-loadgen-secret-loadgen";

/// Runs the load generator and returns its output and its JSON report.
fn run(args: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("report.json");
    let output = Command::new(chinwag_tests::cluster::loadgen_binary())
        .args(args)
        .arg("--quiet")
        .arg("--json-out")
        .arg(&json_path)
        .output()
        .expect("run chinwag-loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("no report ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: Value = serde_json::from_str(&text).expect("report is JSON");
    (output, report)
}

fn start() -> Server {
    Server::start(&[
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--fsync=never",
    ])
}

fn addr(server: &Server) -> String {
    server.addr.to_string()
}

#[test]
fn connect_logs_in_and_holds_every_connection() {
    let server = start();
    let pid = server.pid().to_string();
    let (output, report) = run(&[
        "connect",
        "--addr",
        &addr(&server),
        "--secret",
        SECRET,
        "--connections",
        "60",
        "--hold-s",
        "2",
        "--heartbeat-s",
        "1",
        "--settle-s",
        "1",
        "--server-pid",
        &pid,
    ]);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["logged_in"], 60);
    assert_eq!(report["open_at_end"], 60);
    assert_eq!(report["failures_total"], 0);
    assert_eq!(report["violations"], 0);
    // Every connection pinged at least once per heartbeat of the hold, and every ping answered.
    let pings = report["pings"].as_u64().unwrap();
    assert!(pings >= 60, "{report}");
    assert_eq!(report["pongs"], pings);
    assert!(report["server_rss_bytes_per_connection"].is_number());
}

#[test]
fn connect_counts_refused_logins_by_cause() {
    let server = start();
    let (output, report) = run(&[
        "connect",
        "--addr",
        &addr(&server),
        "--secret",
        "not-the-secret",
        "--connections",
        "5",
        "--hold-s",
        "0",
        "--settle-s",
        "0",
    ]);
    assert!(!output.status.success());
    assert_eq!(report["logged_in"], 0);
    assert_eq!(
        report["failures"]["login refused: unauthorized"], 5,
        "{report}"
    );
}

fn chat(server: &Server, extra: &[&str]) -> (Output, Value) {
    scenario("chat", server, extra)
}

fn scenario(name: &str, server: &Server, extra: &[&str]) -> (Output, Value) {
    let addr = addr(server);
    let mut args = vec![
        name,
        "--addr",
        &addr,
        "--secret",
        SECRET,
        "--conversations",
        "20",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Sent, acknowledged and delivered agree: each `send_ok` produced exactly one push at the
/// other member of its direct conversation, and the checker saw every seq once.
fn assert_clean_chat(output: &Output, report: &Value) {
    assert!(output.status.success(), "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 40, "every user sent at least once: {report}");
    assert_eq!(report["send_ok"], sent, "{report}");
    assert_eq!(report["delivered"], sent, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    assert_eq!(report["failures_total"], 0, "{report}");
    assert!(
        report["latency"]["send_to_push_us"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn chat_closed_loop_delivers_every_message_in_order() {
    let server = start();
    let (output, report) = chat(&server, &["--window", "4"]);
    assert_clean_chat(&output, &report);
}

#[test]
fn chat_in_json_delivers_every_message_in_order() {
    let server = start();
    let (output, report) = chat(&server, &["--json"]);
    assert_clean_chat(&output, &report);
    assert_eq!(report["encoding"], "json");
}

#[test]
fn chat_members_3_delivers_every_message_to_every_other_member() {
    let server = start();
    // In one process, then split over two (each builds and checks its own conversations).
    for (procs, uid_base) in [("1", "1000"), ("2", "2000")] {
        chat_members_3(&server, procs, uid_base);
    }
}

fn chat_members_3(server: &Server, procs: &str, uid_base: &str) {
    let addr = addr(server);
    let (output, report) = run(&[
        "chat",
        "--procs",
        procs,
        "--uid-base",
        uid_base,
        "--addr",
        &addr,
        "--secret",
        SECRET,
        "--conversations",
        "4",
        "--members",
        "3",
        "--window",
        "2",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}\nstderr:\n{stderr}");
    assert_eq!(report["connections"], 12, "{report}");
    assert_eq!(report["kind"], "shop, 3 members", "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 12, "every member sent at least once: {report}");
    assert_eq!(report["send_ok"], sent, "{report}");
    // Each message reaches the two other members (one device each) and nobody else.
    assert_eq!(report["delivered"], sent * 2, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    assert_eq!(report["failures_total"], 0, "{report}");
    assert_eq!(
        report["latency"]["send_to_push_us"]["count"], report["delivered"],
        "{report}"
    );
}

#[test]
fn chat_open_loop_sends_on_schedule() {
    let server = start();
    let (output, report) = chat(&server, &["--rate-per-user-per-s", "20"]);
    assert_clean_chat(&output, &report);
    // 40 users at 20/s for 1 s: 800 slots, give or take the one in flight at the end.
    let sent = report["sent"].as_u64().unwrap();
    assert!((760..=840).contains(&sent), "{report}");
}

/// What the fake server does wrong.
#[derive(Clone, Copy)]
enum Fault {
    /// Never pushes this seq.
    Drop(u64),
    /// Pushes this seq after the next one to the same user.
    Swap(u64),
}

/// A server that speaks just enough of the protocol for `chat` with one conversation of two
/// users: it logs anyone in, numbers every message of the one conversation, answers `send_ok`
/// and pushes the message to the other user, except that it commits `fault`.
fn fake_server(fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap().to_string();
    let outboxes: Arc<Mutex<HashMap<Uid, mpsc::Sender<Vec<u8>>>>> = Arc::default();
    let state: Arc<Mutex<FakeState>> = Arc::default();
    std::thread::spawn(move || {
        // The load generator's probe of the port, then the two users.
        for stream in listener.incoming().take(3) {
            let Ok(stream) = stream else { return };
            let (outboxes, state) = (Arc::clone(&outboxes), Arc::clone(&state));
            std::thread::spawn(move || serve_fake(stream, outboxes, state, fault));
        }
    });
    addr
}

type Outboxes = Arc<Mutex<HashMap<Uid, mpsc::Sender<Vec<u8>>>>>;

/// The conversation's last seq, and a push held back by [`Fault::Swap`] with its receiver.
#[derive(Default)]
struct FakeState {
    seq: u64,
    held: Option<(Uid, Vec<u8>)>,
}

fn serve_fake(stream: TcpStream, outboxes: Outboxes, state: Arc<Mutex<FakeState>>, fault: Fault) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut me = None;
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let encode = |frame: &Frame<'_>| {
        let mut out = BytesMut::new();
        binary::encode(frame, &mut out).unwrap();
        out.to_vec()
    };
    loop {
        while let Ok(bytes) = rx.try_recv() {
            if ws.send(WsMessage::Binary(bytes.into())).is_err() {
                return;
            }
        }
        let data = match ws.read() {
            Ok(WsMessage::Binary(data)) => data,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        let Ok(frame) = binary::decode(&data) else {
            return;
        };
        let reply = match frame.message {
            Message::Login(login) => {
                let now_s = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let claims = token::verify(SECRET.as_bytes(), &login.token, now_s).unwrap();
                me = Some(claims.uid);
                outboxes.lock().unwrap().insert(claims.uid, tx.clone());
                Message::LoginOk(LoginOk {
                    uid: claims.uid,
                    device_id: DeviceId::from_u64(288230376151711744).unwrap(),
                    node_id: NodeId::from_u64(1152921504606846976).unwrap(),
                    ts: 0,
                })
            }
            Message::Send(send) => {
                let from = me.expect("logged in");
                let peer = match send.target {
                    Target::User(peer) => peer,
                    // One conversation: the peer is whoever else logged in.
                    _ => *outboxes
                        .lock()
                        .unwrap()
                        .keys()
                        .find(|u| **u != from)
                        .unwrap(),
                };
                let mut state = state.lock().unwrap();
                state.seq += 1;
                let seq = state.seq;
                let push = encode(&Frame::new(Message::Msg(chinwag_protocol::MsgPush::bare(
                    Msg {
                        conv: chinwag_protocol::ConvId(1),
                        seq: Seq(seq),
                        from,
                        ts: 0,
                        kind: send.kind.clone(),
                        body: send.body.clone(),
                        cmid: send.cmid.clone(),
                    },
                ))));
                let mut pushes = Vec::new();
                match fault {
                    Fault::Drop(s) if s == seq => {}
                    Fault::Swap(s) if s == seq => state.held = Some((peer, push)),
                    _ => {
                        pushes.push(push);
                        if state.held.as_ref().is_some_and(|(to, _)| *to == peer) {
                            pushes.extend(state.held.take().map(|(_, held)| held));
                        }
                    }
                }
                // The push goes out while the lock is held, so seqs leave in order.
                if let Some(peer_tx) = outboxes.lock().unwrap().get(&peer) {
                    for push in pushes {
                        let _ = peer_tx.send(push);
                    }
                }
                Message::SendOk(SendOk {
                    conv: chinwag_protocol::ConvId(1),
                    seq: Seq(seq),
                    ts: 0,
                })
            }
            _ => continue,
        };
        let bytes = encode(&Frame {
            req: frame.req,
            message: reply,
        });
        if ws.send(WsMessage::Binary(bytes.into())).is_err() {
            return;
        }
    }
}

fn chat_against_fake(fault: Fault) -> (Output, Value) {
    let addr = fake_server(fault);
    run(&[
        "chat",
        "--addr",
        &addr,
        "--secret",
        SECRET,
        "--uid-base",
        "1",
        "--conversations",
        "1",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
        "--drain-s",
        "1",
    ])
}

#[test]
fn chat_fails_on_a_dropped_push() {
    let (output, report) = chat_against_fake(Fault::Drop(3));
    assert!(!output.status.success(), "{report}");
    assert_eq!(report["violations"], 1, "{report}");
    assert_eq!(report["violations_first"][0], "conv 1: seq 3 never arrived");
}

#[test]
fn chat_fails_on_a_reordered_push() {
    let (output, report) = chat_against_fake(Fault::Swap(3));
    assert!(!output.status.success(), "{report}");
    assert_eq!(report["violations"], 1, "{report}");
    let first = report["violations_first"][0].as_str().unwrap();
    assert!(
        first.starts_with("conv 1: seq 3 pushed after seq "),
        "{report}"
    );
}

#[test]
fn fanout_delivers_every_message_to_every_member() {
    let server = start();
    let (output, report) = run(&[
        "fanout",
        "--addr",
        &addr(&server),
        "--secret",
        SECRET,
        "--members",
        "12",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
    ]);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["members"], 12);
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0, "{report}");
    assert_eq!(report["send_ok"], sent, "{report}");
    assert_eq!(report["delivered"], sent * 12, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    assert!(
        report["latency"]["delivery_spread_us"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// A large group (above the 200 of a full `members` list) made over the service port, its
/// members split over two processes and two senders: every message reaches every member but its
/// sender, once and in order, and the spread is measured across both processes.
#[test]
fn group_over_two_processes_delivers_every_message_to_every_other_member() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--messages-per-s-max=0",
        "--fsync=never",
        "--members-max=2000",
    ]);
    let pid = server.pid().to_string();
    let service = server.backend_addr.to_string();
    let (output, report) = run(&[
        "group",
        "--addr",
        &addr(&server),
        "--service-addr",
        &service,
        "--secret",
        SECRET,
        "--members",
        "1203",
        "--senders",
        "2",
        "--rate-per-s",
        "40",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
        "--procs",
        "2",
        "--server-pid",
        &pid,
    ]);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["group_members"], 1203, "{report}");
    assert_eq!(report["logged_in"], 1203, "{report}");
    assert_eq!(report["senders"], 2, "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 30, "40 per second for 1 s: {report}");
    assert_eq!(report["send_ok"], sent, "{report}");
    assert_eq!(report["delivered"], sent * 1202, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    let spread = report["latency"]["delivery_spread_us"]["count"]
        .as_u64()
        .unwrap();
    assert!(spread >= 30, "a spread for each message: {report}");
    assert!(
        report["deliveries_per_server_cpu_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

/// `group --notify`: the service names every member in each `notify_users`, and every member
/// gets each notify exactly once.
#[test]
fn group_notify_reaches_every_member_once_per_request() {
    let server = start();
    let service = server.backend_addr.to_string();
    let (output, report) = run(&[
        "group",
        "--notify",
        "--addr",
        &addr(&server),
        "--service-addr",
        &service,
        "--secret",
        SECRET,
        "--members",
        "50",
        "--rate-per-s",
        "20",
        "--warmup-s",
        "0",
        "--duration-s",
        "1",
    ]);
    assert!(output.status.success(), "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 15, "20 per second for 1 s: {report}");
    assert_eq!(report["send_ok"], sent, "{report}");
    assert_eq!(report["delivered"], sent * 50, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
}

#[test]
fn storm_reconnects_catch_up_without_missing_a_message() {
    let server = start();
    // 40 users for 1 s, 10 of them dropping; history pages of two messages, so that a
    // catch-up takes several.
    let (output, report) = scenario(
        "storm",
        &server,
        &["--drop-share-per-s", "0.25", "--history-limit", "2"],
    );
    assert!(output.status.success(), "{report}");
    assert!(report["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        report["history_pages"].as_u64().unwrap() >= report["reconnects"].as_u64().unwrap(),
        "{report}"
    );
    assert_eq!(report["not_caught_up_at_end"], 0, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    assert_eq!(report["failures_total"], 0, "{report}");
    assert!(
        report["latency"]["drop_to_caught_up_us"]["count"]
            .as_u64()
            .unwrap()
            >= 10
    );
}

#[test]
fn procs_split_the_users_and_merge_the_reports() {
    let server = start();
    let pid = server.pid().to_string();
    let (output, report) = chat(&server, &["--procs", "2", "--server-pid", &pid]);
    assert_clean_chat(&output, &report);
    assert_eq!(report["procs"], 2);
    // The parent's own readings of the server over the workers' measured window.
    assert!(report["server_cpu_s"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(report["server_rss_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["connections"], 40,
        "both workers' users are counted: {report}"
    );
}

#[test]
fn echo_runs_against_chinwags_echo_endpoint() {
    let server = Server::start(&["--enable-echo", "--messages-per-s-max=0"]);
    for window in ["1", "8"] {
        let report = echo(&server, &["--window", window]);
        assert_eq!(report["connections"], 20, "{report}");
        assert!(report["loadgen_cpu_s"].is_number(), "{report}");
    }
}

#[test]
fn echo_procs_split_the_connections_and_merge_the_reports() {
    let server = Server::start(&["--enable-echo", "--messages-per-s-max=0"]);
    let report = echo(&server, &["--procs", "2", "--window", "2"]);
    assert_eq!(report["procs"], 2);
    assert_eq!(
        report["connections"], 20,
        "both workers' connections: {report}"
    );
    // The merged histogram holds every measured echo of both workers, no more, no less.
    assert_eq!(
        report["latency"]["echo_us"]["count"], report["messages"],
        "{report}"
    );
    // The parent read the server's CPU itself over the workers' measured window.
    assert!(report["server_cpu_s"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(report["server_rss_bytes"].as_u64().unwrap() > 0, "{report}");
}

/// Runs `echo` with 20 connections for one measured second; asserts a clean run with echoes.
fn echo(server: &Server, extra: &[&str]) -> Value {
    let addr = addr(server);
    let pid = server.pid().to_string();
    let mut args = vec!["echo", "--addr", &addr, "--connections", "20"];
    args.extend(["--warmup-s", "0", "--duration-s", "1", "--server-pid", &pid]);
    args.extend(extra);
    let (output, report) = run(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(report["failures_total"], 0, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    // Every connection gets at least its first echo back within the second.
    assert!(report["messages"].as_u64().unwrap() >= 20, "{report}");
    assert!(stdout.contains("messages: "), "{stdout}");
    report
}

#[test]
fn reaches_a_server_by_host_name_and_reports_settings_traffic_and_a_series() {
    let server = start();
    let by_name = format!("localhost:{}", server.addr.port());
    let (output, report) = run(&[
        "chat",
        "--addr",
        &by_name,
        "--secret",
        SECRET,
        "--conversations",
        "5",
        "--warmup-s",
        "1",
        "--duration-s",
        "2",
    ]);
    assert_clean_chat(&output, &report);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The header repeats the run's settings (the secret excepted).
    assert!(stdout.starts_with("chinwag-loadgen "), "{stdout}");
    assert!(stdout.contains(&format!("--addr {by_name}")), "{stdout}");
    assert!(
        !stdout.contains(SECRET),
        "the secret is not repeated: {stdout}"
    );
    assert_eq!(report["settings"]["subcommand"], "chat");
    assert_eq!(report["settings"]["addr"], by_name.as_str());
    assert_eq!(report["settings"]["conversations"], "5");
    assert!(report["settings"].get("secret").is_none());
    // Traffic and error rate.
    let sent = report["sent"].as_u64().unwrap();
    assert!(
        report["requests"].as_u64().unwrap() >= sent + 10,
        "{report}"
    );
    assert!(
        report["bytes_sent"].as_u64().unwrap() > sent * 32,
        "{report}"
    );
    assert!(
        report["bytes_received"].as_u64().unwrap() > sent * 32,
        "{report}"
    );
    assert_eq!(report["error_rate"], 0.0);
    let latency = &report["latency"]["send_to_push_us"];
    assert!(latency["p95"].as_f64().unwrap() >= latency["p50"].as_f64().unwrap());
    assert!(latency["mean"].is_number());
    // One entry per second, warm-up then measured.
    let phases: Vec<&str> = report["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["phase"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"warmup"), "{phases:?}");
    assert!(phases.contains(&"measured"), "{phases:?}");
    let first_measured = phases.iter().position(|p| *p == "measured").unwrap();
    assert!(
        phases[..first_measured].iter().all(|p| *p != "measured"),
        "{phases:?}"
    );
}

#[test]
fn a_closed_port_ends_the_run_at_once_with_the_cause() {
    // A port nobody listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(chinwag_tests::cluster::loadgen_binary())
        .args(["chat", "--secret", SECRET, "--quiet", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .expect("run chinwag-loadgen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to"), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "no report for a run that never started"
    );
}

#[test]
fn rate_limited_sends_are_reported_with_the_fix_and_fanout_keeps_sending() {
    let server = Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=20"]);
    let (output, report) = run(&[
        "fanout",
        "--addr",
        &addr(&server),
        "--secret",
        SECRET,
        "--members",
        "2",
        "--window",
        "8",
        "--warmup-s",
        "0",
        "--duration-s",
        "2",
        "--drain-s",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "refusals fail the run: {stdout}"
    );
    assert!(
        report["failures"]["refused: rate_limited"]
            .as_u64()
            .unwrap()
            > 0,
        "{report}"
    );
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("--messages-per-s-max 0")),
        "{report}"
    );
    assert!(stdout.contains("note: the server refused"), "{stdout}");
    // The window's refused slots are sent again: far more than one window got through, every
    // one of them delivered to both members.
    let send_ok = report["send_ok"].as_u64().unwrap();
    assert!(send_ok > 8, "fanout stalled after the refusals: {report}");
    assert_eq!(
        report["delivered"].as_u64().unwrap(),
        send_ok * 2,
        "{report}"
    );
    assert!(report["messages_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
}

#[test]
fn every_bad_flag_exits_2() {
    let bad: [&[&str]; 19] = [
        &["chat", "--message-bytes", "5"],
        &["chat", "--members", "1"],
        &["chat", "--window", "0"],
        &["chat", "--conversations", "0"],
        &["chat", "--conversations", "x"],
        &["chat", "--procs", "0"],
        &["chat", "--bogus"],
        &["chat", "--addr", "127.0.0.1"],
        &["chat", "--addr", "127.0.0.1:99999"],
        &["chat", "--addr", "no-such-host.invalid:7000"],
        &["storm", "--history-limit", "300"],
        &["storm", "--drop-share-per-s", "2"],
        &["fanout", "--members", "1000"],
        &["fanout", "--procs", "2"],
        &["group", "--members", "1"],
        &["group", "--senders", "5", "--members", "5"],
        &["group", "--rate-per-s", "0"],
        &["connect", "--connect-rate-per-s", "0"],
        &["connect", "--sources", "0"],
    ];
    for args in bad {
        let output = Command::new(chinwag_tests::cluster::loadgen_binary())
            .args(args)
            .args(["--secret", SECRET])
            .output()
            .expect("run chinwag-loadgen");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for args in [["echo", "--window", "0"], ["idle", "--sources", "0"]] {
        let output = Command::new(chinwag_tests::cluster::loadgen_binary())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn chat_pauses_a_refused_slot_instead_of_spinning_on_refusals() {
    let server = Server::start(&["--jwt-secret", SECRET, "--messages-per-s-max=10"]);
    let (output, report) = run(&[
        "chat",
        "--addr",
        &addr(&server),
        "--secret",
        SECRET,
        "--conversations",
        "2",
        "--warmup-s",
        "0",
        "--duration-s",
        "2",
        "--drain-s",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(1), "{report}");
    let refused = report["failures"]["refused: rate_limited"]
        .as_u64()
        .unwrap();
    assert!(refused > 0, "{report}");
    // 4 users, a window of 1, a slot retried every 100 ms: tens of refusals per user and
    // second, not the thousands an immediate re-send would draw.
    assert!(refused < 4 * 3 * 40, "{refused} refusals: {report}");
    assert!(report["send_ok"].as_u64().unwrap() >= 4 * 10, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
}
