//! A cluster serves one set of users, end to end: three real nodes (the `chinwag` binary) and a
//! real `redis-server` of the test's own. Chat between users on different nodes in both
//! encodings, a shop's dispatch to agents on other nodes, the same device logging in on
//! another node, the backend's `presence` and `kick` across nodes, and a node SIGKILLed and
//! restarted (docs/cluster.md, "The message path").

use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, ClientError, Encoding};
use chinwag_protocol::{
    ConvId, DeviceType, ErrorCode, Frame, History, HistoryRange, Kick, Message, Msg, Seq, Target,
    Uid, UidKind,
};
use chinwag_tests::redis::RedisServer;
use chinwag_tests::{buyer, send};
use chinwag_tests::{mint_token_in_shop, service_client, Server};

const SECRET: &str = "cluster-secret-cluster-secret-0123";
/// Partition p is node p % 3 + 1's (`chinwag cluster init` deals them round-robin).
const PARTITIONS: u64 = 12;
/// The longest a test waits for something that should happen (a bound against hanging).
const LONG: Duration = Duration::from_secs(20);

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn init(redis: &RedisServer) {
    let partitions = PARTITIONS.to_string();
    // One replica: these are the unreplicated cluster's tests (a killed node's partitions
    // wait for it); cluster_replication.rs has the replicated ones.
    redis.cluster_cli(&[
        "init",
        "--nodes",
        "1,2,3",
        "--partitions",
        &partitions,
        "--replicas",
        "1",
    ]);
}

/// The flags of node `n`: its node link on port 0 (bound before it registers), two shards,
/// short heartbeats so that a dead node is seen within about a second.
fn node_args(redis: &RedisServer, n: u16) -> Vec<String> {
    [
        "--jwt-secret",
        SECRET,
        &format!("--cluster={}", redis.url()),
        &format!("--node={n}"),
        "--node-listen=127.0.0.1:0",
        &format!("--partitions={PARTITIONS}"),
        "--shards=2",
        "--log-segment-bytes=1048576",
        "--cluster-heartbeat-interval-ms=200",
        "--cluster-heartbeat-ttl-ms=1000",
        "--cluster-probe-interval-ms=500",
        "--cluster-redis-timeout-ms=500",
        "--node-link-request-timeout-ms=2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_node(redis: &RedisServer, n: u16) -> Server {
    let args = node_args(redis, n);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// Redis and three nodes whose links to each other are up.
fn cluster() -> (RedisServer, Vec<Server>) {
    let redis = RedisServer::start();
    init(&redis);
    let nodes: Vec<Server> = (1..=3).map(|n| start_node(&redis, n)).collect();
    for node in &nodes {
        wait_links_up(node, 2);
    }
    (redis, nodes)
}

fn wait_links_up(node: &Server, peers: u64) {
    wait_until("the node links up", || {
        node.metric("chinwag_link_connected", "peer=") == peers
    });
}

/// Waits until every node's route cache holds `routes` routes: a push reaches a device on
/// another node once the owner's node knows where it is.
fn wait_routes(nodes: &[&Server], routes: u64) {
    for node in nodes {
        wait_until("the routes in every node's cache", || {
            node.metric("chinwag_cluster_routes_cached", "") == routes
        });
    }
}

fn login(node: &Server, uid: Uid, shop: Option<u64>, encoding: Encoding) -> Client {
    let mut client = Client::connect(&node.ws_url(), encoding).expect("connect");
    client
        .login(&mint_token_in_shop(SECRET, uid, shop), DeviceType::Web)
        .expect("login accepted");
    client
}

/// The next `msg` push, skipping others.
fn next_msg(client: &mut Client) -> Msg<'static> {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        if let Some(Message::Msg(m)) = client.next_push(LONG).expect("push").map(|f| f.message) {
            return m.msg;
        }
    }
    panic!("no msg push within {LONG:?}");
}

fn history(client: &mut Client, conv: ConvId) -> Result<Vec<Msg<'static>>, ErrorCode> {
    let reply = client.call(Message::History(History {
        conv,
        range: HistoryRange::After(Seq(0)),
        limit: 100,
    }));
    match reply {
        Ok(Frame {
            message: Message::HistoryOk(ok),
            ..
        }) => Ok(ok.msgs),
        Err(ClientError::Rejected(e)) => Err(e.code),
        other => panic!("expected history_ok or an error, got {other:?}"),
    }
}

/// The node that owns conversation `conv` (1..=3).
fn node_of(conv: ConvId) -> u64 {
    (conv.0 & 0xffff) % 3 + 1
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn users_on_different_nodes_chat_in_both_encodings_and_list_their_conversations() {
    let (_redis, nodes) = cluster();
    let (a, b) = (buyer(1001), buyer(1002));
    let mut alice = login(&nodes[0], a, None, Encoding::Json);
    let mut bob = login(&nodes[1], b, None, Encoding::Binary);
    wait_routes(&nodes.iter().collect::<Vec<_>>(), 2);

    let mut conv = None;
    let mut seqs = Vec::new();
    for i in 0..10u64 {
        let (from, to, target) = if i % 2 == 0 {
            (&mut alice, &mut bob, Target::User(b))
        } else {
            (&mut bob, &mut alice, Target::User(a))
        };
        let body = format!("hello {i}");
        let (c, seq) = send(from, target, &format!("c{i}"), &body);
        assert!(conv.is_none_or(|known| known == c), "one conversation");
        conv = Some(c);
        seqs.push(seq.0);
        let got = next_msg(to);
        assert_eq!(
            (got.conv, got.seq, got.body.as_ref()),
            (c, seq, body.as_str())
        );
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<u64>>(), "contiguous seqs");
    let conv = conv.unwrap();

    // Each lists the conversation, wherever it lives; a second, with a third user whose pair
    // lands on another node, is listed too.
    let convs_of = |client: &mut Client| -> Vec<ConvId> {
        match client.call(Message::Convs).expect("convs").message {
            Message::ConvsOk(list) => list.iter().map(|c| c.conv).collect(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(convs_of(&mut bob), [conv]);
    let mut others = Vec::new();
    for id in 2000.. {
        let (c, _) = send(&mut alice, Target::User(buyer(id)), "x", "hi");
        if node_of(c) != node_of(conv) {
            others.push(c);
            break;
        }
    }
    let listed = convs_of(&mut alice);
    assert!(
        listed.contains(&conv) && listed.contains(&others[0]),
        "{listed:?}"
    );
    assert!(listed.len() >= 2, "{listed:?}");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_buyer_on_node_1_is_dispatched_to_an_agent_on_another_node() {
    let (_redis, nodes) = cluster();
    let shop = 77;
    let mut agents = [
        login(
            &nodes[1],
            Uid::new(UidKind::Agent, 1),
            Some(shop),
            Encoding::Json,
        ),
        login(
            &nodes[2],
            Uid::new(UidKind::Agent, 2),
            Some(shop),
            Encoding::Binary,
        ),
    ];
    let mut customer = login(&nodes[0], buyer(5), None, Encoding::Json);
    wait_routes(&nodes.iter().collect::<Vec<_>>(), 3);
    // The agents' `AgentOnline` crossed to the shop's owner: wait until it dispatches.
    let (conv, seq) = send(
        &mut customer,
        Target::Shop(chinwag_protocol::ShopId(shop)),
        "s1",
        "help",
    );
    let deadline = Instant::now() + LONG;
    let got = 'found: loop {
        assert!(
            Instant::now() < deadline,
            "no agent got the buyer's message"
        );
        for agent in &mut agents {
            if let Some(Message::Msg(m)) = agent
                .next_push(Duration::from_millis(200))
                .expect("push")
                .map(|f| f.message)
            {
                break 'found m.msg;
            }
        }
    };
    assert_eq!((got.conv, got.seq, got.body.as_ref()), (conv, seq, "help"));
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn the_same_device_on_another_node_kicks_the_first_and_the_backend_sees_and_kicks_across_nodes() {
    let (_redis, nodes) = cluster();
    let uid = buyer(42);
    let mut first = login(&nodes[0], uid, None, Encoding::Json);
    let mut second = login(&nodes[1], uid, None, Encoding::Binary);
    let push = first.next_push(LONG).expect("push").expect("kicked");
    assert!(matches!(push.message, Message::Kicked(_)), "{push:?}");
    match first.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }

    // A service on node 3 sees the device online (on node 2) and kicks it there.
    let mut service = service_client(&nodes[2], SECRET);
    let presence = service
        .call(Message::Presence(vec![uid, buyer(43)]))
        .unwrap();
    let Message::PresenceOk(online) = presence.message else {
        panic!("{presence:?}")
    };
    assert_eq!(online.len(), 1, "{online:?}");
    assert_eq!((online[0].uid, online[0].devices.len()), (uid, 1));
    let reply = service
        .call(Message::Kick(Kick { uid, device: None }))
        .unwrap();
    assert_eq!(reply.message, Message::KickOk(1));
    let push = second.next_push(LONG).expect("push").expect("kicked");
    assert!(matches!(push.message, Message::Kicked(_)), "{push:?}");
    match second.next_push(LONG) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    wait_until("the user offline", || {
        let presence = service.call(Message::Presence(vec![uid])).unwrap();
        presence.message == Message::PresenceOk(Vec::new())
    });
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_killed_nodes_partitions_answer_unavailable_until_it_is_back_with_its_messages() {
    let (redis, mut nodes) = cluster();
    let mut alice = login(&nodes[0], buyer(1), None, Encoding::Json);
    // A conversation that lives on node 3.
    let (conv, seq) = (2..)
        .map(|id| send(&mut alice, Target::User(buyer(id)), "c", "kept"))
        .find(|(conv, _)| node_of(*conv) == 3)
        .unwrap();
    assert_eq!(history(&mut alice, conv).unwrap()[0].seq, seq);

    let three = nodes.pop().unwrap();
    three.signal(libc::SIGKILL);
    let data_dir = three.into_data_dir();
    // Until its heartbeat lapses the request waits on the link and times out; after, it is
    // refused at once. Either way it is answered, never left hanging.
    wait_until("unavailable", || {
        history(&mut alice, conv) == Err(ErrorCode::Unavailable)
    });
    assert_eq!(history(&mut alice, conv), Err(ErrorCode::Unavailable));

    let args = node_args(&redis, 3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let three = Server::start_in(data_dir, &args, &[]);
    wait_links_up(&three, 2);
    wait_until("node 3 back", || history(&mut alice, conv).is_ok());
    let msgs = history(&mut alice, conv).unwrap();
    assert_eq!(
        msgs.iter()
            .map(|m| (m.seq, m.body.as_ref()))
            .collect::<Vec<_>>(),
        [(seq, "kept")]
    );
}
