//! The cluster harness itself (tests/src/cluster.rs), on what main has without the message
//! path between nodes: three nodes come up ready, a node killed with SIGKILL comes back on its
//! ports and data directory with what it had stored, Redis comes back, and the service client
//! finds a live node in a list that starts with a dead one.

use std::time::Duration;

use chinwag_protocol::client::Encoding;
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{Frame, History, HistoryRange, Message, Send, Seq, Target, Uid, UidKind};
use chinwag_tests::buyer;
use chinwag_tests::cluster::{Cluster, ClusterSpec};
use chinwag_tests::mint_token;

/// The harness's own checks are of an unreplicated cluster (a killed node's partitions wait
/// for it); cluster_replication.rs has the replicated ones.
fn unreplicated() -> ClusterSpec {
    ClusterSpec {
        replicas: Some(1),
        ..ClusterSpec::default()
    }
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_node_killed_comes_back_on_its_ports_with_what_it_stored() {
    let mut cluster = Cluster::start(unreplicated());
    // Every node answers on its fixed client port and sees the other two.
    for n in 1..=3 {
        let (status, body) = cluster.node(n).get("/healthz");
        assert_eq!(status, 200, "node {n}: {body}");
        assert!(body.contains("peers: 3 alive of 3"), "node {n}: {body}");
    }
    let mut alice = cluster.login(2, buyer(1), Encoding::Json);
    let _bob = cluster.login(2, buyer(2), Encoding::Binary);
    let reply = alice
        .call(Message::Send(Send {
            target: Target::User(buyer(2)),
            cmid: "harness-1".into(),
            kind: "text".into(),
            body: "before the kill".into(),
        }))
        .expect("send");
    let Message::SendOk(ok) = reply.message else {
        panic!("send answered {reply:?}");
    };
    drop(alice);

    let old_pid = cluster.node(2).pid();
    cluster.kill(2);
    assert!(!cluster.is_up(2));
    cluster.restart(2);
    assert_ne!(cluster.node(2).pid(), old_pid, "a new process");
    assert_eq!(
        cluster.ws_url(2),
        cluster.node(2).ws_url(),
        "restarted on the same client port"
    );
    let mut alice = cluster.login(2, buyer(1), Encoding::Json);
    let page = alice
        .call(Message::History(History {
            conv: ok.conv,
            range: HistoryRange::After(Seq(0)),
            limit: 10,
        }))
        .expect("history");
    let Message::HistoryOk(page) = page.message else {
        panic!("history answered {page:?}");
    };
    let bodies: Vec<&str> = page.msgs.iter().map(|m| m.body.as_ref()).collect();
    assert_eq!(
        bodies,
        ["before the kill"],
        "the acknowledged message survived"
    );
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn redis_killed_and_started_again_the_nodes_become_ready_again() {
    let mut cluster = Cluster::start(unreplicated());
    cluster.kill_redis();
    cluster.wait_until("every node to report Redis down", |c| {
        (1..=3).all(|n| {
            let (status, body) = c.node(n).get("/healthz");
            status == 503 && body.contains("redis: down")
        })
    });
    cluster.start_redis();
    for n in 1..=3 {
        assert_eq!(cluster.node(n).get("/healthz").0, 200);
    }
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn the_service_client_skips_a_dead_node_in_its_list() {
    let mut cluster = Cluster::start(unreplicated());
    cluster.kill(1);
    let token = mint_token(
        chinwag_tests::cluster::SECRET,
        Uid::new(UidKind::Service, 1),
    );
    let addrs = [cluster.backend_addr(1), cluster.backend_addr(2)];
    let (mut service, at) = ServiceClient::connect_any(&addrs, &token).expect("node 2 answers");
    assert_eq!(at, 1, "node 1 is down, node 2 took the connection");
    service.set_timeout(Duration::from_secs(10)).unwrap();
    let pong = service.call(Message::Ping).expect("ping");
    assert!(
        matches!(
            pong,
            Frame {
                message: Message::Pong,
                ..
            }
        ),
        "{pong:?}"
    );
}
