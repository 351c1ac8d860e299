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
        let target = RedisTarget::new(&redis.url(), Duration::from_millis(300)).unwrap();
        let leases = Arc::new(Leases::new(P as usize));
        let sink = Arc::new(Recorder::default());
        let owners = Arc::new(PartitionOwners::new(&PartitionTable::round_robin(P, &[1])));
        let thread = lease::start(
            target,
            settings(number),
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
    let out = Command::new(binary())
        .args([
            "cluster",
            "--cluster",
            &redis.url(),
            "init",
            "--nodes",
            "1,2,3",
        ])
        .args(["--partitions", &P.to_string(), "--replicas", replicas])
        .output()
        .expect("run chinwag cluster init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn show(redis: &RedisServer) -> String {
    let out = Command::new(binary())
        .args(["cluster", "--cluster", &redis.url(), "show"])
        .output()
        .expect("run chinwag cluster show");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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
    let holder: Option<String> = redis::cmd("GET")
        .arg("chinwag:lease:0")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(holder.as_deref(), Some("1 1"));
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
        wait_for(&format!("node 2 takes partition {p} over"), || {
            nodes[1].sink.leads(p, 2) && nodes[1].valid(p, 2)
        });
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
        wait_for(&format!("node 2 takes partition {p} over"), || {
            nodes[1].sink.leads(p, 2) && nodes[1].valid(p, 2)
        });
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
        let holder: Option<String> = redis::cmd("GET")
            .arg(format!("chinwag:lease:{p}"))
            .query(&mut redis.connection())
            .unwrap();
        assert_ne!(holder.as_deref(), Some("1 1"), "partition {p}");
    }
    for p in [0, 3] {
        wait_for(&format!("node 2 takes partition {p} over"), || {
            nodes[1].sink.leads(p, 2) && nodes[1].valid(p, 2)
        });
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
