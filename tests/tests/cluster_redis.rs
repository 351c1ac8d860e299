//! A cluster's view of the world in Redis, end to end: real nodes (the `chinwag` binary), a
//! real `redis-server` of the test's own. Registration and refusals, the routing table written
//! at login and logout, a dead node's routes, Redis lost and back, and the probe that finds a
//! subscription that no longer delivers (docs/cluster.md).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::{DeviceType, NodeId, NodeType, Uid};
use chinwag_tests::buyer;
use chinwag_tests::redis::{free_port, RedisServer};
use chinwag_tests::{binary, mint_token, Server};

const SECRET: &str = "cluster-secret-cluster-secret-0123";
const PARTITIONS: &str = "8";
/// Short heartbeats and probes, so that the tests see lapses in about a second.
const FAST: [&str; 4] = [
    "--cluster-heartbeat-interval-ms=200",
    "--cluster-heartbeat-ttl-ms=1000",
    "--cluster-probe-interval-ms=500",
    "--cluster-redis-timeout-ms=500",
];
/// The longest a test waits for the cluster to settle (a bound against hanging).
const SETTLE: Duration = Duration::from_secs(20);

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn init(redis: &RedisServer, nodes: &str) {
    redis.cluster_cli(&["init", "--nodes", nodes, "--partitions", PARTITIONS]);
}

fn show(redis: &RedisServer) -> String {
    redis.cluster_cli(&["show"])
}

/// The flags of cluster node `n` (its node link on a free port).
fn node_args(redis: &RedisServer, n: u16, link_port: u16) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--jwt-secret".into(),
        SECRET.into(),
        format!("--cluster={}", redis.url()),
        format!("--node={n}"),
        format!("--node-listen=127.0.0.1:{link_port}"),
        format!("--partitions={PARTITIONS}"),
        // Small and few logs: a node starts fast, and these tests store nothing.
        "--shards=1".into(),
        "--log-segment-bytes=1048576".into(),
    ];
    args.extend(FAST.iter().map(|s| s.to_string()));
    args
}

fn start_node(redis: &RedisServer, n: u16) -> Server {
    let args = node_args(redis, n, free_port());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// Runs `chinwag serve` expecting it to refuse to start: its exit code and stderr.
fn refused(args: &[String]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen=127.0.0.1:0", "--backend-listen=127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chinwag");
    let deadline = Instant::now() + SETTLE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node started although it should have been refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn routes_of(redis: &RedisServer, uid: Uid) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("chinwag:route:{uid}"))
        .query(&mut redis.connection())
        .unwrap()
}

fn login(server: &Server, uid: Uid) -> (Client, u64) {
    let mut client = Client::connect(&server.ws_url(), Encoding::Json).expect("connect");
    let ok = client
        .login(&mint_token(SECRET, uid), DeviceType::Web)
        .expect("login accepted");
    (client, ok.device_id.get())
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn three_nodes_register_and_see_each_other_with_their_node_ids() {
    let redis = RedisServer::start();
    init(&redis, "1,2,3");
    let link_port = free_port();
    let args = node_args(&redis, 2, link_port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nodes = [
        start_node(&redis, 1),
        Server::start(&args),
        start_node(&redis, 3),
    ];
    for node in &nodes {
        wait_until("every node to see three peers alive", || {
            node.metric("chinwag_cluster_peer_up", "node=") == 3
        });
        let (status, body) = node.get("/healthz");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("redis: up") && body.contains("subscription: up"),
            "{body}"
        );
    }
    let shown = show(&redis);
    for n in 1..=3 {
        assert!(shown.contains(&format!("  {n} alive id=")), "{shown}");
    }
    assert!(shown.contains("8 partitions"), "{shown}");
    assert!(shown.contains("  2: 1,4,7"), "round-robin: {shown}");
    // Node 2's registry entry: the NodeId of the seed layout and the bound client port.
    let entry: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("chinwag:node:2")
        .query(&mut redis.connection())
        .unwrap();
    let id: NodeId = entry["id"].parse().unwrap();
    let parts = id.unpack();
    assert_eq!(parts.node_type, NodeType::Connector);
    assert_eq!((parts.number, parts.port), (2, link_port));
    assert_eq!(parts.ip, std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(entry["client"], nodes[1].addr.to_string());
    assert_eq!(entry["service"], nodes[1].backend_addr.to_string());
    // A DeviceId carries in bits 4-15 the number of the node that minted it: the owner of
    // the user's devices (the node of the user's partition), wherever the login is. Users
    // logging in on node 3 get ids minted by several nodes.
    let minted: std::collections::BTreeSet<u64> = (30..40)
        .map(|id| (login(&nodes[2], buyer(id)).1 >> 48) & 0xfff)
        .collect();
    assert!(
        minted.len() > 1 && minted.iter().all(|n| (1..=3).contains(n)),
        "{minted:?}"
    );
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_duplicate_node_number_and_a_different_partition_count_are_refused() {
    let redis = RedisServer::start();
    init(&redis, "1,2");
    let _one = start_node(&redis, 1);
    let (code, stderr) = refused(&node_args(&redis, 1, free_port()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("node number 1 is held by a live node"),
        "{stderr}"
    );

    let mut other_p = node_args(&redis, 2, free_port());
    for arg in &mut other_p {
        if arg.starts_with("--partitions=") {
            *arg = "--partitions=16".into();
        }
    }
    let (code, stderr) = refused(&other_p);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("has 8 partitions, this node is set for 16"),
        "{stderr}"
    );

    let empty = RedisServer::start();
    let (code, stderr) = refused(&node_args(&empty, 2, free_port()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("chinwag cluster init"), "{stderr}");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_login_on_node_2_is_in_the_routing_table_and_every_cache_until_logout_or_drain() {
    let redis = RedisServer::start();
    init(&redis, "1,2");
    let one = start_node(&redis, 1);
    let two = start_node(&redis, 2);
    let (client, device) = login(&two, buyer(7));
    wait_until("the route in Redis", || {
        routes_of(&redis, buyer(7)).get(&device.to_string()) == Some(&"2".to_string())
    });
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("chinwag:node:2:routes")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(members, [format!("buyer:7 {device}")]);
    // Node 1 learnt it from the route channel.
    wait_until("node 1's cache", || {
        one.metric("chinwag_cluster_routes_cached", "") == 1
    });
    drop(client);
    wait_until("the route's removal", || {
        routes_of(&redis, buyer(7)).is_empty()
    });
    wait_until("node 1's cache to forget it", || {
        one.metric("chinwag_cluster_routes_cached", "") == 0
    });

    // A drained node deregisters: its routes go, and so does its heartbeat (its peers need
    // not wait for the TTL).
    let mut two = two;
    let (_client, device) = login(&two, buyer(9));
    wait_until("the second route", || {
        routes_of(&redis, buyer(9)).contains_key(&device.to_string())
    });
    two.signal(libc::SIGTERM);
    assert!(two.wait_exit().success(), "{}", two.log());
    assert!(two.log().contains("cluster: deregistered"), "{}", two.log());
    assert!(routes_of(&redis, buyer(9)).is_empty());
    let alive: bool = redis::cmd("EXISTS")
        .arg("chinwag:node:2:alive")
        .query(&mut redis.connection())
        .unwrap();
    assert!(!alive);
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_killed_nodes_routes_are_ignored_then_removed_after_its_heartbeat_lapses() {
    let redis = RedisServer::start();
    init(&redis, "1,2");
    let one = start_node(&redis, 1);
    let two = start_node(&redis, 2);
    let (_client, device) = login(&two, buyer(8));
    wait_until("the route in Redis", || {
        !routes_of(&redis, buyer(8)).is_empty()
    });
    wait_until("node 1 to see node 2", || {
        one.metric("chinwag_cluster_peer_up", "node=\"2\"") == 1
    });
    two.signal(libc::SIGKILL);
    // Node 1 marks node 2 dead once its heartbeat expires (then ignores its routes), and
    // removes the routes it left.
    wait_until("node 2 marked dead", || {
        one.metric("chinwag_cluster_peer_up", "node=\"2\"") == 0
    });
    wait_until("node 2's routes removed", || {
        routes_of(&redis, buyer(8)).is_empty()
    });
    assert!(!routes_of(&redis, buyer(8)).contains_key(&device.to_string()));
    let shown = show(&redis);
    assert!(shown.contains("  2 down"), "{shown}");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn redis_lost_and_back_the_nodes_say_so_then_register_again_and_rewrite_their_routes() {
    let mut redis = RedisServer::start_persistent();
    init(&redis, "1");
    let one = start_node(&redis, 1);
    let (before, before_device) = login(&one, buyer(1));
    wait_until("the first route", || {
        !routes_of(&redis, buyer(1)).is_empty()
    });
    wait_until("a healthy node", || one.get("/healthz").0 == 200);

    redis.kill();
    wait_until("/healthz to report Redis down", || {
        let (status, body) = one.get("/healthz");
        status == 503 && body.contains("redis: down")
    });
    assert_eq!(one.metric("chinwag_cluster_redis_up", ""), 0);
    assert!(one.metric("chinwag_cluster_redis_errors_total", "") > 0);
    // Logins do not wait for Redis (route writes are queued): one succeeds while it is away,
    // and a session ends.
    let (_during, during_device) = login(&one, buyer(2));
    drop(before);
    std::thread::sleep(Duration::from_millis(300));

    redis.restart();
    wait_until("a healthy node again", || one.get("/healthz").0 == 200);
    wait_until("the routes rewritten", || {
        routes_of(&redis, buyer(2)).get(&during_device.to_string()) == Some(&"1".to_string())
            && routes_of(&redis, buyer(1)).is_empty()
    });
    assert!(!routes_of(&redis, buyer(1)).contains_key(&before_device.to_string()));
    let alive: Option<String> = redis::cmd("GET")
        .arg("chinwag:node:1:alive")
        .query(&mut redis.connection())
        .unwrap();
    assert!(alive.is_some(), "registered again");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_killed_subscription_is_found_reconnected_and_the_routes_reloaded() {
    let redis = RedisServer::start();
    init(&redis, "1");
    let one = start_node(&redis, 1);
    wait_until("a healthy node", || one.get("/healthz").0 == 200);
    let reloads = one.metric("chinwag_cluster_route_reloads_total", "");
    assert_eq!(reloads, 1);
    let killed: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(killed, 1);
    wait_until("a reload after resubscribing", || {
        one.metric("chinwag_cluster_route_reloads_total", "") > reloads
    });
    // A route written while the subscription was away is in the cache after the reload.
    let mut c = redis.connection();
    redis::cmd("HSET")
        .arg(&["chinwag:route:buyer:77", "12345", "1"])
        .query::<()>(&mut c)
        .unwrap();
    let killed: u64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query(&mut c)
        .unwrap();
    assert_eq!(killed, 1);
    wait_until("the route loaded", || {
        one.metric("chinwag_cluster_routes_cached", "") == 1
    });
    wait_until("a healthy node again", || one.get("/healthz").0 == 200);
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_subscription_that_delivers_nothing_is_found_by_the_probe_and_reported() {
    use chinwag_tests::redis::SilencingProxy;
    use std::sync::atomic::Ordering::Relaxed;
    let redis = RedisServer::start();
    init(&redis, "1");
    let proxy = SilencingProxy::start(&redis);
    let mut args = node_args(&redis, 1, free_port());
    for arg in &mut args {
        if arg.starts_with("--cluster=") {
            *arg = format!("--cluster={}", proxy.url());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = Server::start(&args);
    wait_until("a healthy node", || one.get("/healthz").0 == 200);
    let reloads = one.metric("chinwag_cluster_route_reloads_total", "");

    // The subscription stays open but Redis's messages no longer reach it; every other call
    // still works.
    proxy.silence.store(true, Relaxed);
    wait_until("the missed probe reported", || {
        let (status, body) = one.get("/healthz");
        status == 503 && body.contains("subscription: down")
    });
    assert!(one.metric("chinwag_cluster_probes_missed_total", "") >= 1);
    assert_eq!(
        one.metric("chinwag_cluster_redis_up", ""),
        1,
        "Redis itself answers"
    );

    proxy.silence.store(false, Relaxed);
    wait_until("a healthy node again", || one.get("/healthz").0 == 200);
    assert!(one.metric("chinwag_cluster_route_reloads_total", "") > reloads);
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_node_whose_number_another_process_took_reports_it_and_leaves_its_routes_alone() {
    let redis = RedisServer::start();
    init(&redis, "1");
    let one = start_node(&redis, 1);
    wait_until("a healthy node", || one.get("/healthz").0 == 200);
    // Another process's heartbeat for number 1 (as if this node had been cut off past the
    // TTL and another had started with its number), and a route of that process.
    let mut c = redis.connection();
    redis::cmd("SET")
        .arg(&["chinwag:node:1:alive", "another-process", "PX", "60000"])
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("HSET")
        .arg(&["chinwag:route:buyer:5", "777", "1"])
        .query::<()>(&mut c)
        .unwrap();
    wait_until("the conflict reported", || {
        let (status, body) = one.get("/healthz");
        status == 503 && body.contains("node number: held by another instance")
    });
    assert_eq!(one.metric("chinwag_cluster_node_number_lost", ""), 1);
    // A login now writes no route: number 1's routes belong to the other process.
    let (_client, device) = login(&one, buyer(6));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!routes_of(&redis, buyer(6)).contains_key(&device.to_string()));
    assert_eq!(
        routes_of(&redis, buyer(5)).len(),
        1,
        "the other's route stays"
    );

    // The other process is gone: the node claims its number again and rewrites its routes.
    redis::cmd("DEL")
        .arg("chinwag:node:1:alive")
        .query::<()>(&mut c)
        .unwrap();
    wait_until("a healthy node again", || one.get("/healthz").0 == 200);
    wait_until("its route rewritten", || {
        routes_of(&redis, buyer(6)).contains_key(&device.to_string())
    });
}
