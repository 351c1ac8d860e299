//! A 3-node cluster and Redis (tests/src/cluster.rs) under the failures issue 13 names
//! (docs/cluster.md): a node SIGKILLed and restarted under chat load, Redis killed and started
//! again under chat load, and a node link cut and healed. The chat load is `chinwag-loadgen
//! chat` with the nodes' address list: it checks that every conversation is 1..n at every
//! member, each acknowledged message seen exactly once, its users moving to another node when
//! theirs dies and catching up with `history` (docs/loadgen.md, "A cluster").

use std::time::Duration;

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{
    ConvId, DeviceType, ErrorCode, Frame, History, HistoryRange, Message, Send, Seq, Target,
};
use chinwag_tests::cluster::{self, failures, Cluster, ClusterSpec, LoadgenRun, FAST_LINKS};
use chinwag_tests::{buyer, send};
use serde_json::Value;

/// Three nodes, one replica per partition (issue 13's failures of an unreplicated cluster;
/// cluster_replication.rs has the replicated ones), without the per-connection rate limit (a
/// closed-loop load passes it at once).
fn cluster() -> Cluster {
    Cluster::start(ClusterSpec {
        replicas: Some(1),
        extra: vec!["--messages-per-s-max=0".into()],
        ..ClusterSpec::default()
    })
}

/// The first user of the chat load: conversation c is between buyers UID_BASE + 2c and
/// UID_BASE + 2c + 1.
const UID_BASE: u64 = 1_000_000;

/// The chat load over every node (tests/src/cluster.rs, `chat_load`): 30 direct
/// conversations (60 users, 20 per node) for `duration_s`, every conversation read back at the
/// end and checked against every acknowledged send.
fn chat_load(cluster: &Cluster, duration_s: u64) -> LoadgenRun {
    cluster::chat_load(cluster, UID_BASE, 30, duration_s)
}

/// Messages stored by every running node's owners so far.
fn stored(cluster: &Cluster) -> u64 {
    (1..=3)
        .filter(|&n| cluster.is_up(n))
        .map(|n| cluster.node(n).metric("chinwag_messages_stored_total", ""))
        .sum()
}

/// The checkers' verdict (tests/src/cluster.rs, `assert_verified`): nothing acknowledged
/// lost, seen twice or out of order, by the members or in the stored log. On a violation, the
/// message says what the cluster holds of the conversations it names.
fn assert_nothing_lost(cluster: &Cluster, report: &Value) {
    if report["violations"] != 0 {
        panic!(
            "the checker found gaps, duplicates or reorders: {}\n{}\nthe report: {report}",
            report["violations_first"],
            stored_around(cluster, report)
        );
    }
    cluster::assert_verified(report, 30, 300);
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_node_killed_and_restarted_under_chat_load_loses_no_acknowledged_message() {
    let mut cluster = cluster();
    let run = chat_load(&cluster, 15);
    cluster.wait_until("chat load on every node", |c| {
        (1..=3).all(|n| c.node(n).metric("chinwag_messages_stored_total", "") >= 100)
    });
    cluster.kill(2);
    // Node 2's partitions are unavailable now; its users move to node 3 and the others; the
    // checker keeps counting.
    let while_down = stored(&cluster);
    cluster.wait_until("chat to go on on nodes 1 and 3", |c| {
        stored(c) >= while_down + 100
    });
    cluster.restart(2);
    cluster.wait_until("node 2 to store again", |c| {
        c.node(2).metric("chinwag_messages_stored_total", "") > 0
    });
    let (_, report) = run.finish();
    assert_nothing_lost(&cluster, &report);
    // Node 2's 20 users lost their connections and moved on, each once at least.
    assert!(
        report["reconnects"].as_u64().unwrap() >= 20,
        "node 2's users moved on: {report}"
    );
    // Their sends in flight went unanswered, and every conversation so stopped took writes
    // again (once node 2 was back, for its own partitions).
    let outages = report["write_outages"].as_u64().expect("write_outages");
    assert!(
        outages >= 1,
        "the kill cost some conversation a send: {report}"
    );
    assert_eq!(report["write_outages_unresolved"], 0, "{report}");
    assert_eq!(
        report["latency"]["failure_to_write_resumed_us"]["count"], outages,
        "{report}"
    );
    failures(
        &report,
        &[
            "eof",
            "io:",
            "connect:",
            "closed by server",
            "upgrade refused",
            "refused: unavailable",
        ],
    );
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn redis_restarted_under_chat_load_established_sessions_keep_chatting() {
    let mut cluster = cluster();
    let run = chat_load(&cluster, 15);
    cluster.wait_until("chat load on every node", |c| {
        (1..=3).all(|n| c.node(n).metric("chinwag_messages_stored_total", "") >= 100)
    });
    cluster.kill_redis();
    cluster.wait_until("every node to report Redis down", |c| {
        (1..=3).all(|n| {
            let (status, body) = c.node(n).get("/healthz");
            status == 503 && body.contains("redis: down")
        })
    });
    // The established sessions keep chatting across nodes without Redis.
    let at_outage = stored(&cluster);
    cluster.wait_until("chat to go on while Redis is down", |c| {
        stored(c) >= at_outage + 300
    });
    // A login while Redis is down is answered, one way or the other, and never hangs (the
    // client waits 10 s for any reply).
    for n in 1..=3 {
        let mut client = Client::connect(&cluster.ws_url(n), Encoding::Json).expect("connect");
        let uid = buyer(900 + u64::from(n));
        match client.login(&cluster.token(uid), DeviceType::Web) {
            Ok(_) => {}
            Err(ClientError::Rejected(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
            Err(e) => panic!("a login on node {n} while Redis was down: {e}"),
        }
    }
    cluster.start_redis();
    // The routing table is rebuilt from the sessions the nodes hold: the 60 chat users are
    // in Redis again.
    cluster.wait_until("the chat users' routes back in Redis", |c| {
        route_count(c) >= 60
    });
    // A login now is routed: a user on node 1 reaches one on node 3.
    let mut alice = cluster.login(1, buyer(801), Encoding::Json);
    let mut bob = cluster.login(3, buyer(802), Encoding::Binary);
    cluster.wait_until("the new routes in every node's cache", |c| {
        (1..=3).all(|n| route_count_cached(c, n) >= 62)
    });
    let (conv, seq) = send(&mut alice, Target::User(buyer(802)), "after-redis", "back");
    let push = next_msg(&mut bob);
    assert_eq!((push.0, push.1), (conv, seq), "the push crossed nodes");

    let (_, report) = run.finish();
    assert_nothing_lost(&cluster, &report);
    // No session of the load lost its connection (it would have moved on: `reconnects`).
    // Some sends may be refused `unavailable` while the nodes' view of each other's heartbeats
    // is rebuilt after Redis returns; they are sent again with their cmids and counted once.
    failures(&report, &["refused: unavailable"]);
    assert_eq!(report["reconnects"], 0, "a session was dropped: {report}");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_cut_node_link_answers_unavailable_never_hangs_and_heals() {
    let mut cluster = Cluster::start(ClusterSpec {
        replicas: Some(1),
        link_proxies: true,
        extra: FAST_LINKS.iter().map(|s| s.to_string()).collect(),
        ..ClusterSpec::default()
    });
    let mut alice = cluster.login(1, buyer(1), Encoding::Json);
    // A conversation whose owner is node 2, reached from node 1 over their link.
    let conv = (2..)
        .map(|id| send(&mut alice, Target::User(buyer(id)), "find", "find").0)
        .find(|&conv| cluster.owner_of(conv) == 2)
        .unwrap();

    let silenced = cluster.cut_link(1, 2);
    assert_eq!(
        silenced, 1,
        "the link was up, through the proxy, when it was cut"
    );
    // Every send is answered `unavailable` within the client's 10 s, never left hanging: first
    // while written to the silent connection (it may or may not have been stored), then,
    // once the link's idle timeout closed it, while queued for a link that is not up.
    let mut refused = Vec::new();
    for i in 0..10 {
        let cmid = format!("cut-{i}");
        match try_send(&mut alice, conv, &cmid) {
            Err(ErrorCode::Unavailable) => refused.push(cmid),
            other => panic!("send {i} during the cut: {other:?}"),
        }
    }
    cluster.wait_link(1, 2, false);
    // Other links are not affected: node 3 reaches node 2.
    let mut carol = cluster.login(3, buyer(3), Encoding::Json);
    let conv3 = (100..)
        .map(|id| send(&mut carol, Target::User(buyer(id)), "find", "find").0)
        .find(|&conv| cluster.owner_of(conv) == 2)
        .unwrap();
    assert_eq!(cluster.owner_of(conv3), 2);
    cluster.heal_link(1, 2);

    // Healed: the link comes back by itself, the refused sends go again with their cmids, and
    // each is stored once.
    cluster.wait_link(1, 2, true);
    for cmid in &refused {
        cluster.wait_until("a send over the healed link", |_| {
            try_send(&mut alice, conv, cmid).is_ok()
        });
    }
    let reply = alice
        .call(Message::History(History {
            conv,
            range: HistoryRange::After(Seq(0)),
            limit: 100,
        }))
        .expect("history");
    let Message::HistoryOk(page) = reply.message else {
        panic!("{reply:?}")
    };
    let seqs: Vec<u64> = page.msgs.iter().map(|m| m.seq.0).collect();
    assert_eq!(
        seqs,
        (1..=11).collect::<Vec<u64>>(),
        "the find message and ten sends, each once"
    );
    let bodies: Vec<&str> = page.msgs.iter().map(|m| m.body.as_ref()).collect();
    for i in 0..10 {
        let body = format!("cut-{i}");
        assert_eq!(
            bodies.iter().filter(|b| **b == body).count(),
            1,
            "{body} stored once: {bodies:?}"
        );
    }
}

/// For each "conv C: seqs A..=B never arrived" of the report: what the cluster's history of C
/// holds from A - 2 to B + 2 (seq, sender, cmid), read by a member (the chat load's users are
/// known from `UID_BASE`: the sender of cmid "i-n" is user i).
fn stored_around(cluster: &Cluster, report: &Value) -> String {
    let mut out = String::new();
    let Some(first) = report["violations_first"].as_array() else {
        return out;
    };
    for v in first.iter().filter_map(Value::as_str) {
        let Some((conv, range)) = v
            .strip_prefix("conv ")
            .and_then(|rest| rest.split_once(": seqs "))
            .or_else(|| v.strip_prefix("conv ").and_then(|r| r.split_once(": seq ")))
        else {
            continue;
        };
        let Ok(conv) = conv.parse::<u64>() else {
            continue;
        };
        let from: u64 = range
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        // Any member reads it: try each chat user until one is a member.
        let owner = cluster.owner_of(ConvId(conv));
        let reader = (1..=3)
            .find(|&n| n != owner && cluster.is_up(n))
            .unwrap_or(owner);
        for i in 0..60u64 {
            let Ok(mut client) = Client::connect(&cluster.ws_url(reader), Encoding::Json) else {
                break;
            };
            if client
                .login(&cluster.token(buyer(UID_BASE + i)), DeviceType::Web)
                .is_err()
            {
                continue;
            }
            let reply = client.call(Message::History(History {
                conv: ConvId(conv),
                range: HistoryRange::After(Seq(from.saturating_sub(3))),
                limit: 8,
            }));
            if let Ok(Frame {
                message: Message::HistoryOk(page),
                ..
            }) = reply
            {
                let held: Vec<String> = page
                    .msgs
                    .iter()
                    .map(|m| format!("{} from {} cmid {}", m.seq, m.from, m.cmid))
                    .collect();
                out.push_str(&format!(
                    "conv {conv} (owner node {owner}) holds: {held:?}\n"
                ));
                break;
            }
        }
    }
    out
}

/// Sends `cmid` (its body is the cmid) to `conv`: its seq, or the error code.
fn try_send(client: &mut Client, conv: ConvId, cmid: &str) -> Result<Seq, ErrorCode> {
    match client.call(Message::Send(Send {
        target: Target::Conv(conv),
        cmid: cmid.into(),
        kind: "text".into(),
        body: cmid.into(),
    })) {
        Ok(Frame {
            message: Message::SendOk(ok),
            ..
        }) => Ok(ok.seq),
        Err(ClientError::Rejected(e)) => Err(e.code),
        other => panic!("send {cmid}: expected send_ok or an error reply, got {other:?}"),
    }
}

/// The conversation and seq of the next `msg` push, skipping other pushes.
fn next_msg(client: &mut Client) -> (ConvId, Seq) {
    for _ in 0..100 {
        match client.next_push(Duration::from_secs(10)).expect("push") {
            Some(Frame {
                message: Message::Msg(m),
                ..
            }) => return (m.msg.conv, m.msg.seq),
            Some(_) => continue,
            None => break,
        }
    }
    panic!("no msg push within 10 s");
}

/// Routes in Redis (`chinwag:route:*` hashes' fields), 0 if Redis does not answer.
fn route_count(cluster: &Cluster) -> u64 {
    let Ok(client) = redis::Client::open(cluster.redis.url()) else {
        return 0;
    };
    let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return 0;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("chinwag:route:*")
        .query(&mut c)
        .unwrap_or_default();
    keys.iter()
        .map(|k| redis::cmd("HLEN").arg(k).query::<u64>(&mut c).unwrap_or(0))
        .sum()
}

/// Routes in node `n`'s cache.
fn route_count_cached(cluster: &Cluster, n: u16) -> u64 {
    cluster.node(n).metric("chinwag_cluster_routes_cached", "")
}
