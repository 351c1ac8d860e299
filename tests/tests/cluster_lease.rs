//! The leadership thread of issue 14 against a real `redis-server` of the test's own: two or
//! three lease threads (nodes 1..3, each with its own `Leases` and a `RoleSink` that records
//! what it is told) on one Redis, a table made by `chinwag cluster init --replicas 2`. No
//! timed assertion: every wait is for a state, bounded by `WAIT`.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chinwag_engine::cluster::lease::{self, IsrOutcome, LeaseSettings, LeaseThread};
use chinwag_engine::cluster::redis_conn::RedisTarget;
use chinwag_engine::cluster::registry::{PartitionOwners, PartitionTable};
use chinwag_engine::cluster::roles::{IsrRequest, Leases, Replicas, RoleChange, RoleSink};
use chinwag_tests::redis::RedisServer;
use chinwag_tests::{binary, WAIT};

/// Partitions: with nodes 1, 2, 3 and two replicas, p0 and p3 are led by 1 (followed by 2),
/// p1 and p4 by 2 (followed by 3), p2 and p5 by 3 (followed by 1).
const P: u32 = 6;

/// Short timings, so that a lapse takes a fraction of a second.
fn settings(node: u16) -> LeaseSettings {
    LeaseSettings {
        node,
        partitions: P,
        lease: Duration::from_millis(800),
        renew: Duration::from_millis(100),
        margin: Duration::from_millis(100),
        preferred_leader: true,
    }
}

/// What one node's shards were told, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<RoleChange>>);

impl RoleSink for Recorder {
    fn changed(&self, change: RoleChange) {
        self.0.lock().unwrap().push(change);
    }
}

impl Recorder {
    fn changes(&self) -> Vec<RoleChange> {
        self.0.lock().unwrap().clone()
    }

    /// Whether it was told to lead `p` at `epoch`.
    fn leads(&self, p: u16, at: u64) -> bool {
        self.changes().iter().any(
            |c| matches!(c, RoleChange::Lead { partition, epoch, .. } if *partition == p && *epoch == at),
        )
    }

    /// Whether it was told to follow `leader` on `p` at `epoch`.
    fn follows(&self, p: u16, by: u16, at: u64) -> bool {
        self.changes().iter().any(|c| {
            *c == RoleChange::Follow {
                partition: p,
                leader: by,
                epoch: at,
            }
        })
    }
}

/// A node's leadership thread and what it writes to.
struct Node {
    number: u16,
    leases: Arc<Leases>,
    sink: Arc<Recorder>,
    owners: Arc<PartitionOwners>,
    thread: Option<LeaseThread>,
}

impl Node {
    fn start(redis: &RedisServer, number: u16) -> Node {
        Node::start_with(redis, settings(number))
    }

    /// Starts a node's leadership thread, registered and alive in Redis as far as the
    /// scripts look (`chinwag:nodes`, a heartbeat key without expiry; no registry thread).
    fn start_with(redis: &RedisServer, settings: LeaseSettings) -> Node {
        let number = settings.node;
        let _: () = redis::pipe()
            .cmd("SADD")
            .arg("chinwag:nodes")
            .arg(number)
            .ignore()
            .cmd("SET")
            .arg(format!("chinwag:node:{number}:alive"))
            .arg("test")
            .ignore()
            .query(&mut redis.connection())
            .unwrap();
        let target = RedisTarget::new(&redis.url(), Duration::from_millis(300)).unwrap();
        let leases = Arc::new(Leases::new(P as usize));
        let sink = Arc::new(Recorder::default());
        let owners = Arc::new(PartitionOwners::new(&PartitionTable::round_robin(P, &[1])));
        let thread = lease::start(
            target,
            settings,
            Arc::clone(&leases),
            Arc::clone(&sink) as Arc<dyn RoleSink>,
            Arc::clone(&owners),
        )
        .expect("start the lease thread");
        Node {
            number,
            leases,
            sink,
            owners,
            thread: Some(thread),
        }
    }

    /// Whether this node may acknowledge on `p` at `epoch` now.
    fn valid(&self, p: u16, epoch: u64) -> bool {
        self.leases.valid(p, epoch, Instant::now())
    }

    fn rounds(&self) -> u64 {
        self.thread.as_ref().map_or(0, LeaseThread::rounds)
    }

    /// Stops the thread as a crash would: its leases lapse in Redis.
    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.stop();
        }
    }

    fn drain(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.drain();
        }
    }
}

fn init(redis: &RedisServer, replicas: &str) -> String {
    let partitions = P.to_string();
    redis.cluster_cli(&[
        "init",
        "--nodes",
        "1,2,3",
        "--partitions",
        &partitions,
        "--replicas",
        replicas,
    ])
}

fn show(redis: &RedisServer) -> String {
    redis.cluster_cli(&["show"])
}

/// Waits until node 2 (`node`) leads partition `p` at epoch 2 with a valid lease: it took
/// over from node 1.
fn wait_taken_over(node: &Node, p: u16) {
    wait_for(&format!("node 2 takes partition {p} over"), || {
        node.sink.leads(p, 2) && node.valid(p, 2)
    });
}

/// Who holds partition `p`'s lease in Redis ("NODE EPOCH"), if anyone.
fn lease_holder(redis: &RedisServer, p: u32) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("chinwag:lease:{p}"))
        .query(&mut redis.connection())
        .unwrap()
}

/// Waits, at most `WAIT`, until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hget(redis: &RedisServer, key: &str, field: u32) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(&mut redis.connection())
        .unwrap()
}

fn entry(redis: &RedisServer, p: u32) -> String {
    hget(redis, "chinwag:partitions", p).unwrap_or_default()
}

fn isr(redis: &RedisServer, p: u32) -> String {
    hget(redis, "chinwag:isr", p).unwrap_or_default()
}

/// The leader of each partition, by the placement.
fn leader_of(p: u16) -> u16 {
    p % 3 + 1
}

/// Starts nodes 1..=3 and waits until each leads its partitions with a valid lease and has
/// been told so, and each follower has been told whom it follows.
fn steady(redis: &RedisServer) -> Vec<Node> {
    let nodes: Vec<Node> = (1..=3).map(|n| Node::start(redis, n)).collect();
    for p in 0..P as u16 {
        let leader = &nodes[usize::from(leader_of(p)) - 1];
        let follower = &nodes[usize::from(leader_of(p)) % 3];
        wait_for(
            &format!("node {} leads partition {p}", leader.number),
            || leader.valid(p, 1) && leader.sink.leads(p, 1),
        );
        wait_for(&format!("node {} follows on {p}", follower.number), || {
            follower.sink.follows(p, leader.number, 1)
        });
    }
    nodes
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn leaders_hold_their_leases_and_followers_are_told_whom_they_follow() {
    let redis = RedisServer::start();
    let created = init(&redis, "2");
    assert!(created.contains("2 replicas each"), "{created}");
    assert_eq!(entry(&redis, 0), "1 1 1,2");
    assert_eq!(entry(&redis, 2), "3 1 3,1");
    assert_eq!(isr(&redis, 2), "1 3,1");
    let nodes = steady(&redis);
    // Node 3 holds no replica of partition 0: it is told nothing about it.
    assert!(
        nodes[2].sink.changes().iter().all(|c| c.partition() != 0),
        "{:?}",
        nodes[2].sink.changes()
    );
    // The leader is told the replicas, leader first, and the in-sync set.
    let lead = nodes[2]
        .sink
        .changes()
        .into_iter()
        .find(|c| c.partition() == 2)
        .unwrap();
    assert_eq!(
        lead,
        RoleChange::Lead {
            partition: 2,
            epoch: 1,
            replicas: Replicas::from_slice(&[3, 1]),
            isr: Replicas::from_slice(&[3, 1]),
        }
    );
    // Only the leader may acknowledge.
    assert!(!nodes[1].valid(0, 1));
    assert_eq!(lease_holder(&redis, 0).as_deref(), Some("1 1"));
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn an_in_sync_follower_takes_over_a_stopped_leader_at_the_next_epoch() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    nodes[0].stop();
    // Node 1 led 0 and 3 (followed by 2); node 3 led 2 and 5, followed by node 1 — unchanged.
    for p in [0, 3] {
        wait_taken_over(&nodes[1], p);
        assert_eq!(entry(&redis, u32::from(p)), "2 2 1,2");
        // The old leader stays a replica, out of the in-sync set until it catches up.
        assert_eq!(isr(&redis, u32::from(p)), "2 2");
    }
    // The stopped leader's deadline passes by itself.
    wait_for("node 1's lease deadline on partition 0 passes", || {
        !nodes[0].valid(0, 1)
    });
    // Node 3, no replica of partition 0, sees the new owner.
    wait_for("node 3 sees node 2 lead partition 0", || {
        nodes[2].owners.get(0).map(|e| (e.node, e.epoch)) == Some((2, 2))
    });
    assert!(nodes[2].sink.changes().iter().all(|c| c.partition() != 0));
    assert!(nodes[2].valid(2, 1), "node 3 keeps its own partitions");

    // Node 1 comes back: it follows the new leaders and leads nothing it lost.
    let back = Node::start(&redis, 1);
    wait_for(
        "node 1 follows node 2 on partitions 0 and 3 at epoch 2",
        || back.sink.follows(0, 2, 2) && back.sink.follows(3, 2, 2),
    );
    wait_for("node 1 follows node 3 on partition 2", || {
        back.sink.follows(2, 3, 1)
    });
    assert!(!back.sink.leads(0, 2) && !back.valid(0, 2));
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_restarted_leader_gives_its_earlier_runs_lease_to_an_in_sync_follower() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    // Killed and started again at once: its earlier run's leases are still live in Redis.
    nodes[0].stop();
    let back = Node::start(&redis, 1);
    for p in [0, 3] {
        wait_taken_over(&nodes[1], p);
        wait_for(
            &format!("the restarted node 1 follows node 2 on {p}"),
            || back.sink.follows(p, 2, 2),
        );
    }
    // It never led on at the epoch of its earlier run.
    assert!(
        !back.sink.leads(0, 1) && !back.sink.leads(3, 1),
        "{:?}",
        back.sink.changes()
    );
    // Partitions it follows are untouched.
    assert!(back.sink.follows(2, 3, 1));
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn in_sync_set_changes_are_fenced_by_the_epoch_and_only_in_sync_replicas_take_over() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    // Node 1's shard asks to drop node 2 from partition 0's in-sync set: written, answered.
    assert!(nodes[0].leases.request_isr(IsrRequest {
        partition: 0,
        epoch: 1,
        isr: Replicas::from_slice(&[1]),
    }));
    let shrunk = RoleChange::Isr {
        partition: 0,
        epoch: 1,
        isr: Replicas::from_slice(&[1]),
    };
    wait_for("node 1 is told partition 0's in-sync set is {1}", || {
        nodes[0].sink.changes().contains(&shrunk)
    });
    assert_eq!(isr(&redis, 0), "1 1");
    // A stale epoch, a node that does not lead, a set without the leader or with a node that
    // is no replica: refused, nothing written.
    let mut c = redis.connection();
    assert_eq!(
        lease::write_isr(&mut c, 0, 0, 1, &[1, 2]).unwrap(),
        IsrOutcome::StaleEpoch
    );
    assert_eq!(
        lease::write_isr(&mut c, 0, 2, 1, &[1, 2]).unwrap(),
        IsrOutcome::StaleEpoch
    );
    assert_eq!(
        lease::write_isr(&mut c, 0, 1, 2, &[1, 2]).unwrap(),
        IsrOutcome::StaleEpoch
    );
    assert_eq!(
        lease::write_isr(&mut c, 0, 1, 1, &[2]).unwrap(),
        IsrOutcome::NotReplicas
    );
    assert_eq!(
        lease::write_isr(&mut c, 0, 1, 1, &[1, 3]).unwrap(),
        IsrOutcome::NotReplicas
    );
    assert_eq!(isr(&redis, 0), "1 1");

    // Node 1 stops. Partition 3 (in-sync set {1,2}) goes to node 2; partition 0 ({1}) goes to
    // nobody: node 2 is out of sync, node 3 no replica.
    nodes[0].stop();
    wait_for("node 2 takes partition 3 over", || {
        nodes[1].sink.leads(3, 2)
    });
    wait_for("partition 0's lease lapses in Redis", || {
        let exists: bool = redis::cmd("EXISTS")
            .arg("chinwag:lease:0")
            .query(&mut redis.connection())
            .unwrap();
        !exists
    });
    let (two, three) = (nodes[1].rounds(), nodes[2].rounds());
    wait_for("nodes 2 and 3 do three more rounds", || {
        nodes[1].rounds() >= two + 3 && nodes[2].rounds() >= three + 3
    });
    assert_eq!(entry(&redis, 0), "1 1 1,2");
    assert!(!nodes[1]
        .sink
        .changes()
        .iter()
        .any(|c| matches!(c, RoleChange::Lead { partition: 0, .. })));
    assert!(!nodes[2].sink.changes().iter().any(|c| c.partition() == 0));

    // Node 1 comes back: partition 0 is still its own at epoch 1; it renews and leads.
    let back = Node::start(&redis, 1);
    wait_for("node 1 leads partition 0 again at epoch 1", || {
        back.sink.leads(0, 1) && back.valid(0, 1)
    });
    assert!(back.sink.follows(3, 2, 2), "{:?}", back.sink.changes());
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn redis_away_lets_the_deadlines_pass_and_back_the_leases_resume() {
    let mut redis = RedisServer::start_persistent();
    init(&redis, "2");
    let nodes = steady(&redis);
    redis.kill();
    for p in 0..P as u16 {
        let leader = &nodes[usize::from(leader_of(p)) - 1];
        wait_for(
            &format!("node {}'s deadline on {p} passes", leader.number),
            || !leader.valid(p, 1),
        );
    }
    redis.restart();
    // Every partition is led again, with a valid lease, by the node the table names at the
    // table's epoch (its old leader, or an in-sync follower if it was quicker).
    for p in 0..P as u16 {
        wait_for(
            &format!("partition {p} has a leader with a valid lease"),
            || {
                let text = entry(&redis, u32::from(p));
                let mut words = text.split(' ');
                let (Some(Ok(leader)), Some(Ok(epoch))) = (
                    words.next().map(str::parse::<u16>),
                    words.next().map(str::parse::<u64>),
                ) else {
                    return false;
                };
                nodes[usize::from(leader) - 1].valid(p, epoch)
            },
        );
    }
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn a_draining_leader_gives_its_leases_up_to_its_followers() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    nodes[0].drain();
    // It stops acknowledging before it gives the leases up, and the leases are no longer its.
    assert!(!nodes[0].valid(0, 1) && !nodes[0].valid(3, 1));
    for p in [0u32, 3] {
        assert_ne!(
            lease_holder(&redis, p).as_deref(),
            Some("1 1"),
            "partition {p}"
        );
    }
    for p in [0, 3] {
        wait_taken_over(&nodes[1], p);
    }
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn cluster_show_prints_leaders_epochs_replicas_in_sync_sets_and_lease_holders() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    let shown = show(&redis);
    assert!(shown.contains("6 partitions, 2 replicas each"), "{shown}");
    assert!(shown.contains("  1: 0,3\n"), "{shown}");
    assert!(
        shown.contains("  0,3: leader 1 epoch 1 replicas 1,2 isr 1,2 lease 1\n"),
        "{shown}"
    );
    assert!(
        shown.contains("  2,5: leader 3 epoch 1 replicas 3,1 isr 3,1 lease 3\n"),
        "{shown}"
    );
    nodes[0].stop();
    wait_for("node 2 takes partitions 0 and 3 over", || {
        nodes[1].sink.leads(0, 2) && nodes[1].sink.leads(3, 2)
    });
    let shown = show(&redis);
    assert!(
        shown.contains("  0,3: leader 2 epoch 2 replicas 1,2 isr 2 lease 2\n"),
        "{shown}"
    );

    // One replica: the layout 1 form of an entry; more replicas than nodes: refused.
    let single = RedisServer::start();
    init(&single, "1");
    assert_eq!(entry(&single, 4), "2 1");
    assert!(show(&single).contains("  1,4: leader 2 epoch 1 replicas 2 isr 2 lease none\n"));
    let out = Command::new(binary())
        .args([
            "cluster",
            "--cluster",
            &single.url(),
            "init",
            "--nodes",
            "1,2",
        ])
        .args(["--replicas", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("replicas must be 1..=2"), "{error}");
}

// Moving replicas: `chinwag cluster add-node` / `retire-node` record targets, the leaders
// move them in two steps. A new replica's "caught up" is what its leader's shard would ask
// (`Leases::request_isr`); `catch_up` asks it for every partition whose leader holds its lease.

fn cli(redis: &RedisServer, args: &[&str]) -> String {
    redis.cluster_cli(args)
}

/// Partition `p`'s entry as (leader, epoch, replicas).
fn parsed(redis: &RedisServer, p: u32) -> (u16, u64, Vec<u16>) {
    let text = entry(redis, p);
    let words: Vec<&str> = text.split(' ').collect();
    let leader: u16 = words[0].parse().unwrap();
    let replicas = words.get(2).map_or(vec![leader], |l| {
        l.split(',').map(|n| n.parse().unwrap()).collect()
    });
    (leader, words[1].parse().unwrap(), replicas)
}

fn targets(redis: &RedisServer) -> std::collections::HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg("chinwag:targets")
        .query(&mut redis.connection())
        .unwrap()
}

/// Every leader's shard says all of its replicas have caught up (for partitions whose
/// in-sync set lacks some).
fn catch_up(redis: &RedisServer, nodes: &[&Node]) {
    for p in 0..P {
        let (leader, epoch, replicas) = parsed(redis, p);
        let in_sync = isr(redis, p);
        if in_sync == format!("{epoch} {}", join(&replicas)) {
            continue;
        }
        if let Some(node) = nodes.iter().find(|n| n.number == leader) {
            if node.valid(p as u16, epoch) {
                node.leases.request_isr(IsrRequest {
                    partition: p as u16,
                    epoch,
                    isr: Replicas::from_slice(&replicas),
                });
            }
        }
    }
}

fn join(nodes: &[u16]) -> String {
    nodes
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn replicas_of(redis: &RedisServer, node: u16) -> usize {
    (0..P)
        .filter(|&p| parsed(redis, p).2.contains(&node))
        .count()
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn add_node_moves_a_fair_share_in_two_steps_and_ends_with_r_replicas_each() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let nodes = steady(&redis);
    let four = Node::start(&redis, 4);
    let before: Vec<(u16, u64, Vec<u16>)> = (0..P).map(|p| parsed(&redis, p)).collect();
    let out = cli(&redis, &["add-node", "4"]);
    // 12 replicas over 4 nodes: 3 for node 4; 6 first places: 1.
    assert!(out.contains("3 partitions to move"), "{out}");
    let moving: Vec<u32> = targets(&redis).keys().map(|p| p.parse().unwrap()).collect();
    assert_eq!(moving.len(), 3, "{:?}", targets(&redis));
    // Step 1: node 4 joins each moving partition's replica set at epoch + 1, out of sync,
    // and follows; nothing leaves before it is in sync.
    for &p in &moving {
        wait_for(&format!("node 4 joins partition {p}'s replicas"), || {
            parsed(&redis, p).2.contains(&4)
        });
        let (leader, epoch, replicas) = parsed(&redis, p);
        assert_eq!(epoch, before[p as usize].1 + 1);
        assert_eq!(replicas.len(), 3, "R + 1 during the move: {replicas:?}");
        assert!(!isr(&redis, p).split(' ').nth(1).unwrap().contains('4'));
        wait_for(&format!("node 4 follows partition {p}"), || {
            four.sink.follows(p as u16, leader, epoch)
        });
        // The leader is told the new replica set at the new epoch.
        let lead = &nodes[usize::from(leader) - 1];
        wait_for(&format!("node {leader} leads {p} at epoch {epoch}"), || {
            lead.sink.leads(p as u16, epoch) && lead.valid(p as u16, epoch)
        });
    }
    assert_eq!(
        targets(&redis).len(),
        3,
        "the targets stay until the second step"
    );
    // Step 2, once node 4 is in sync: the target becomes the replica set.
    let all: Vec<&Node> = nodes.iter().chain([&four]).collect();
    wait_for("every move finishes", || {
        catch_up(&redis, &all);
        targets(&redis).is_empty()
    });
    for p in 0..P {
        assert_eq!(
            parsed(&redis, p).2.len(),
            2,
            "partition {p}: {}",
            entry(&redis, p)
        );
    }
    for n in 1..=4 {
        assert_eq!(replicas_of(&redis, n), 3, "node {n}");
    }
    // The partition where node 4 took the first place is led by node 4 (handed over), with
    // a valid lease; a replaced replica is told to drop its log.
    let first = (0..P)
        .find(|&p| parsed(&redis, p).2[0] == 4)
        .expect("a first place");
    wait_for(&format!("node 4 leads partition {first}"), || {
        let (leader, epoch, _) = parsed(&redis, first);
        leader == 4 && four.valid(first as u16, epoch) && four.sink.leads(first as u16, epoch)
    });
    for &p in &moving {
        let gone: Vec<u16> = before[p as usize]
            .2
            .iter()
            .copied()
            .filter(|n| !parsed(&redis, p).2.contains(n))
            .collect();
        assert_eq!(gone.len(), 1, "partition {p}");
        let node = &nodes[usize::from(gone[0]) - 1];
        wait_for(&format!("node {} drops partition {p}", gone[0]), || {
            node.sink.changes().contains(&RoleChange::Drop {
                partition: p as u16,
            })
        });
        assert!(!node.valid(p as u16, parsed(&redis, p).1));
    }
    // Run again: nothing to move, nothing changed.
    let table: Vec<String> = (0..P).map(|p| entry(&redis, p)).collect();
    let again = cli(&redis, &["add-node", "4"]);
    assert!(again.contains("nothing to move"), "{again}");
    assert!(targets(&redis).is_empty());
    assert_eq!((0..P).map(|p| entry(&redis, p)).collect::<Vec<_>>(), table);
    let shown = show(&redis);
    assert!(shown.contains("replicas=3"), "{shown}");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn retire_node_leaves_it_with_nothing_and_no_partition_under_r() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let nodes = steady(&redis);
    let out = cli(&redis, &["retire-node", "3"]);
    // Node 3 holds partitions 1, 2, 4 and 5.
    assert!(out.contains("4 partitions to move"), "{out}");
    let shown = show(&redis);
    assert!(
        shown.contains("replicas=4 (moving: 0 once done)"),
        "{shown}"
    );
    let all: Vec<&Node> = nodes.iter().collect();
    wait_for("every move finishes", || {
        catch_up(&redis, &all);
        targets(&redis).is_empty()
    });
    assert_eq!(replicas_of(&redis, 3), 0);
    for p in 0..P {
        let (leader, epoch, replicas) = parsed(&redis, p);
        assert_eq!(replicas.len(), 2, "partition {p}");
        assert_ne!(leader, 3);
        let lead = &nodes[usize::from(leader) - 1];
        wait_for(&format!("node {leader} leads partition {p}"), || {
            lead.valid(p as u16, epoch) && lead.sink.leads(p as u16, epoch)
        });
    }
    for p in [1u16, 2, 4, 5] {
        wait_for(&format!("node 3 drops partition {p}"), || {
            nodes[2]
                .sink
                .changes()
                .contains(&RoleChange::Drop { partition: p })
        });
        assert!(!nodes[2].valid(p, parsed(&redis, u32::from(p)).1));
    }
    let shown = show(&redis);
    assert!(
        shown.contains("replicas=0 (holds no replica: safe to stop)"),
        "{shown}"
    );
    assert!(cli(&redis, &["retire-node", "3"]).contains("nothing to move"));
    // Two nodes cannot hold three replicas each, nor two replicas without a second node.
    let out = Command::new(binary())
        .args(["cluster", "--cluster", &redis.url(), "retire-node", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node left"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn move_steps_of_a_stale_epoch_or_another_leader_are_refused() {
    use chinwag_engine::cluster::moves;
    let redis = RedisServer::start();
    init(&redis, "2");
    let nodes = steady(&redis);
    let mut c = redis.connection();
    let lease = Duration::from_secs(1);
    // Recorded target for partition 0 (1,2 -> 1,3), as add/retire would.
    let _: () = redis::cmd("HSET")
        .arg("chinwag:targets")
        .arg(0)
        .arg("1,3")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        moves::grow(&mut c, 0, 1, 0, &[1, 3], lease).unwrap(),
        0,
        "stale epoch"
    );
    assert_eq!(
        moves::grow(&mut c, 0, 2, 1, &[1, 3], lease).unwrap(),
        0,
        "not the leader"
    );
    assert_eq!(
        moves::grow(&mut c, 0, 1, 1, &[1, 2], lease).unwrap(),
        0,
        "another target"
    );
    assert_eq!(
        moves::shrink(&mut c, 0, 1, 1, &[1, 3], lease).unwrap(),
        (0, 0),
        "3 not a replica yet"
    );
    assert_eq!(
        moves::handoff(&mut c, 0, 1, 0, 2, lease).unwrap(),
        0,
        "stale epoch"
    );
    assert_eq!(
        moves::handoff(&mut c, 3, 1, 1, 2, lease).unwrap(),
        0,
        "2 is not the first replica"
    );
    assert_eq!(entry(&redis, 0), "1 1 1,2", "nothing written");
    // The leader moves it on its own: step 1 at epoch 2.
    wait_for("node 1 adds node 3 to partition 0", || {
        entry(&redis, 0) == "1 2 1,3,2"
    });
    assert_eq!(isr(&redis, 0), "2 1,2");
    // Node 3 catching up at a stale epoch: refused; at the current one: written, and the move
    // finishes.
    assert_eq!(
        lease::write_isr(&mut c, 0, 1, 1, &[1, 2, 3]).unwrap(),
        IsrOutcome::StaleEpoch
    );
    assert_eq!(
        moves::shrink(&mut c, 0, 1, 1, &[1, 3], lease).unwrap(),
        (0, 0),
        "stale epoch"
    );
    assert!(nodes[0].leases.request_isr(IsrRequest {
        partition: 0,
        epoch: 2,
        isr: Replicas::from_slice(&[1, 3, 2]),
    }));
    wait_for("partition 0 ends at 1,3", || entry(&redis, 0) == "1 3 1,3");
    assert_eq!(isr(&redis, 0), "3 1,3");
    wait_for("node 2 drops partition 0", || {
        nodes[1]
            .sink
            .changes()
            .contains(&RoleChange::Drop { partition: 0 })
    });
    wait_for("node 3 follows partition 0 at epoch 3", || {
        nodes[2].sink.follows(0, 1, 3)
    });
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn leadership_goes_back_to_the_preferred_replica_once_it_is_in_sync() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let mut nodes = steady(&redis);
    nodes[0].stop();
    for p in [0, 3] {
        wait_taken_over(&nodes[1], p);
    }
    let back = Node::start(&redis, 1);
    wait_for("node 1 follows partition 0", || back.sink.follows(0, 2, 2));
    // Out of sync: it stays a follower.
    let rounds = nodes[1].rounds();
    wait_for("node 2 does five more rounds", || {
        nodes[1].rounds() >= rounds + 5
    });
    assert_eq!(entry(&redis, 0), "2 2 1,2");
    // Caught up: node 2 hands partitions 0 and 3 back, one per round, at epoch 3.
    for p in [0u16, 3] {
        assert!(nodes[1].leases.request_isr(IsrRequest {
            partition: p,
            epoch: 2,
            isr: Replicas::from_slice(&[1, 2]),
        }));
    }
    for p in [0u16, 3] {
        wait_for(&format!("node 1 leads partition {p} again"), || {
            back.sink.leads(p, 3) && back.valid(p, 3)
        });
        assert_eq!(entry(&redis, u32::from(p)), "1 3 1,2");
        assert_eq!(
            isr(&redis, u32::from(p)),
            "3 1,2",
            "the old leader stays in sync"
        );
        wait_for(&format!("node 2 follows partition {p}"), || {
            nodes[1].sink.follows(p, 1, 3)
        });
        assert!(!nodes[1].valid(p, 2));
    }

    // Turned off: no handover.
    let other = RedisServer::start();
    init(&other, "2");
    let mut off: Vec<Node> = (1..=3)
        .map(|n| {
            Node::start_with(
                &other,
                LeaseSettings {
                    preferred_leader: false,
                    ..settings(n)
                },
            )
        })
        .collect();
    wait_for("node 1 leads partition 0", || off[0].valid(0, 1));
    off[0].stop();
    wait_for("node 2 takes partition 0 over", || off[1].valid(0, 2));
    let back = Node::start_with(
        &other,
        LeaseSettings {
            preferred_leader: false,
            ..settings(1)
        },
    );
    wait_for("node 1 follows", || back.sink.follows(0, 2, 2));
    assert!(off[1].leases.request_isr(IsrRequest {
        partition: 0,
        epoch: 2,
        isr: Replicas::from_slice(&[1, 2]),
    }));
    wait_for("partition 0 in sync again", || isr(&other, 0) == "2 1,2");
    let rounds = off[1].rounds();
    wait_for("node 2 does five more rounds", || {
        off[1].rounds() >= rounds + 5
    });
    assert_eq!(entry(&other, 0), "2 2 1,2");
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn show_prints_the_lag_leaders_report() {
    let redis = RedisServer::start();
    init(&redis, "2");
    let nodes = steady(&redis);
    let now = Instant::now();
    // Partition 0's leader (node 1) sees node 2 500 bytes behind; partition 1's (node 2) sees
    // node 3 up to date. Node 1 follows partitions too, but nobody reports it.
    assert_eq!((leader_of(0), leader_of(1)), (1, 2));
    nodes[0]
        .leases
        .report_lag(0, 1500, [(2, Some(1000), now - Duration::from_secs(3))]);
    nodes[1].leases.report_lag(1, 700, [(3, Some(700), now)]);
    wait_for("show prints both followers", || {
        show(&redis).contains("replica lag (2 of 6 followers reported by their leaders, 1 behind)")
    });
    let shown = show(&redis);
    for line in [
        "  node 1: not reported (the leaders of its 2 partitions publish nothing",
        "  node 2: 1 partition, behind 500 bytes at most (partition 0), caught up ",
        "  node 3: 1 partition, behind 0 bytes at most, caught up ",
        "behind (furthest first):\n  0: node 2 behind leader 1 by 500 bytes (at 1000), caught up ",
    ] {
        assert!(shown.contains(line), "{line:?} in:\n{shown}");
    }
}
