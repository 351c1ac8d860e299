//! `agent_stats` (docs/backend.md, "Agent statistics") against the real binary: a shop, two
//! agents, buyers writing, agents replying and resolving, and the figures unchanged by a
//! SIGTERM restart and by a SIGKILL.

use std::time::Duration;

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{AgentStatsOk, ConvId, DeviceType, Message, ShopId, Target, Uid, UidKind};
use chinwag_tests::{agent, buyer, Server};

const SECRET: &str = "stats-secret-stats-secret-stats-se";
const ARGS: [&str; 3] = ["--jwt-secret", SECRET, "--messages-per-s-max=0"];
const SHOP: ShopId = ShopId(5);

fn send(client: &mut Client, target: Target, cmid: &str) -> ConvId {
    chinwag_tests::send(client, target, cmid, &format!("message {cmid}")).0
}

/// The agent assigned to `conv`, once there is one (an agent's coming online reaches the
/// shop's owner a moment after its `login_ok`, so the assignment may come a moment later).
fn assigned_agent(service: &mut ServiceClient, conv: ConvId) -> Uid {
    for _ in 0..500 {
        let reply = service.call(Message::ConvInfo(conv)).unwrap();
        let Message::ConvInfoOk(info) = reply.message else {
            panic!("expected conv_info_ok, got {reply:?}");
        };
        if let Some(agent) = info.members.iter().find(|u| u.kind == UidKind::Agent) {
            return *agent;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no agent was assigned to {conv}");
}

fn stats(server: &Server) -> AgentStatsOk {
    let to_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    server.service().agent_stats(SHOP, 0, to_ms).unwrap()
}

fn restart(server: Server, signal: i32) -> Server {
    server.signal(signal);
    let data_dir = server.into_data_dir();
    Server::start_in(data_dir, &ARGS, &[])
}

#[test]
fn agent_stats_count_a_shops_reception_and_survive_restarts() {
    let server = Server::start(&ARGS);
    let mut control = server.service();
    let (seven, eight) = (agent(7), agent(8));
    let mut agent7 = server
        .login_as(seven, Some(SHOP.0), DeviceType::Web, Encoding::Json)
        .0;

    // Buyer 1 is served by agent 7 (the only one online): two replies to its first message,
    // one to its second, then agent 7 resolves.
    let mut buyer1 = server.login(buyer(1));
    let conv1 = send(&mut buyer1, Target::Shop(SHOP), "b1-1");
    assert_eq!(assigned_agent(&mut control, conv1), seven);
    send(&mut agent7, Target::Conv(conv1), "a7-1");
    send(&mut agent7, Target::Conv(conv1), "a7-2");
    send(&mut buyer1, Target::Shop(SHOP), "b1-2");
    send(&mut buyer1, Target::Shop(SHOP), "b1-2"); // a resend: counted once
    send(&mut agent7, Target::Conv(conv1), "a7-3");
    let resolved = agent7.call(Message::Resolve(conv1)).unwrap();
    assert!(matches!(resolved.message, Message::ResolveOk(_)));

    // Agent 8 comes online; buyer 2's conversation goes to one of the two, who answers.
    let mut agent8 = server
        .login_as(eight, Some(SHOP.0), DeviceType::Web, Encoding::Json)
        .0;
    let mut buyer2 = server.login(buyer(2));
    let conv2 = send(&mut buyer2, Target::Shop(SHOP), "b2-1");
    let second = assigned_agent(&mut control, conv2);
    let replier = if second == seven {
        &mut agent7
    } else {
        &mut agent8
    };
    send(replier, Target::Conv(conv2), "r2-1");

    let before = stats(&server);
    let t = before.total;
    assert_eq!(
        (t.assigned, t.open, t.resolved, t.messages, t.replies),
        (2, 1, 1, 4, 3),
        "{before:?}"
    );
    assert!(t.reply_ms_p50 >= 1_000 && t.reply_ms_p50 <= t.reply_ms_p90);
    let row = |report: &AgentStatsOk, uid: Uid| {
        let row = report.agents.iter().find(|r| r.agent == uid);
        row.map(|r| {
            let s = r.stats;
            (s.assigned, s.open, s.resolved, s.messages, s.replies)
        })
    };
    if second == seven {
        assert_eq!(row(&before, seven), Some((2, 1, 1, 4, 3)));
        assert_eq!(row(&before, eight), None, "nothing to show for agent 8");
    } else {
        assert_eq!(row(&before, seven), Some((1, 0, 1, 3, 2)));
        assert_eq!(row(&before, eight), Some((1, 1, 0, 1, 1)));
    }
    drop((agent7, agent8, buyer1, buyer2, control));

    // The same figures after a clean restart and after a crash.
    let server = restart(server, libc::SIGTERM);
    assert_eq!(stats(&server), before);
    let server = restart(server, libc::SIGKILL);
    assert_eq!(stats(&server), before);

    // And they go on from there: the second conversation is resolved.
    let mut agent = server
        .login_as(second, Some(SHOP.0), DeviceType::Web, Encoding::Json)
        .0;
    let resolved = agent.call(Message::Resolve(conv2)).unwrap();
    assert!(matches!(resolved.message, Message::ResolveOk(_)));
    let after = stats(&server);
    assert_eq!((after.total.open, after.total.resolved), (0, 2));

    // From a shell, the same reply as one JSON line.
    let (ok, out) = server.backend(&["stats", "5", "--from-ms", "0"]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with(r#"{"op":"agent_stats_ok","req":2,"shop":"5","from_ms":"#),
        "{out}"
    );
    assert!(
        out.contains(r#""total":{"assigned":2,"open":0,"resolved":2,"messages":4,"replies":3,"#),
        "{out}"
    );
}

#[test]
fn agent_stats_refuse_an_empty_window() {
    let server = Server::start(&ARGS);
    let result = server.service().agent_stats(SHOP, 10, 10);
    match result {
        Err(chinwag_protocol::client::ClientError::Rejected(e)) => {
            assert_eq!(e.code, chinwag_protocol::ErrorCode::BadRequest)
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
}
