//! Replication's data path end to end (issue 14, docs/cluster.md "Replication"): three real
//! nodes with `--replicas 2` and static roles (the partition table's owner leads, the next
//! node follows). Every follower's log becomes the leader's, byte for byte at the same
//! positions; after the leader is SIGKILLed and its partitions are given to their followers,
//! every acknowledged message is there at its seq, and seqs go on.
//!
//! Leadership is static here (no leadership thread yet): the test hands the dead node's
//! partitions to their followers by rewriting the partition table and restarting the live
//! nodes, which read it at start. The followers' logs then open as leaders' (recovery
//! replays them).

use std::collections::BTreeMap;
use std::path::Path;

use chinwag_protocol::client::Encoding;
use chinwag_protocol::{ConvId, HistoryRange, Target};
use chinwag_tests::cluster::{Cluster, ClusterSpec};
use chinwag_tests::{buyer, history, send};

const NODES: u16 = 3;

/// The node after `n` (the follower of `n`'s partitions with two replicas).
fn next(n: u16) -> u16 {
    n % NODES + 1
}

/// The records of every segment of partition `p`'s log in `data_dir`, as they are on disk
/// (each segment's header fields that every log keeps for itself blanked).
fn log_bytes(data_dir: &Path, p: u64) -> Vec<Vec<u8>> {
    let dir = data_dir.join("partitions").join(format!("{p:05}"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| {
            let mut bytes = std::fs::read(dir.join(name)).unwrap_or_default();
            if bytes.len() >= 56 {
                bytes[40..56].fill(0);
            }
            bytes
        })
        .collect()
}

#[test]
#[ignore = "needs redis-server on the PATH (apt-get install redis-server); .ci/run installs it and runs these"]
fn followers_copy_the_leaders_log_and_take_over_with_every_acknowledged_message() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: NODES,
        extra: vec!["--replicas=2".into(), "--messages-per-s-max=0".into()],
        ..ClusterSpec::default()
    });
    // Six users, each logged in on a node of its own; five direct conversations, 20
    // messages each, every one acknowledged (`ack = replicated`: on both replicas).
    let mut clients: Vec<_> = (1..=6u64)
        .map(|id| cluster.login((id % 3) as u16 + 1, buyer(id), Encoding::Json))
        .collect();
    let mut acked: BTreeMap<ConvId, Vec<u64>> = BTreeMap::new();
    // A conversation's sender (buyer `pair + 1`).
    let mut sender: BTreeMap<ConvId, u64> = BTreeMap::new();
    for i in 0..20 {
        for (pair, client) in clients.iter_mut().take(5).enumerate() {
            let to = buyer(pair as u64 + 2);
            let (conv, seq) = send(
                client,
                Target::User(to),
                &format!("{pair}-{i}"),
                "replicated",
            );
            acked.entry(conv).or_default().push(seq.0);
            sender.insert(conv, pair as u64 + 1);
        }
    }
    for seqs in acked.values() {
        assert_eq!(*seqs, (1..=20).collect::<Vec<_>>());
    }
    // Every partition's follower holds the leader's log, byte for byte (it may trail the
    // leader by what is in flight; nothing is written now, so it catches up).
    cluster.wait_until("every follower's log to equal its leader's", |c| {
        (0..u64::from(c.spec.partitions)).all(|p| {
            let leader = (p % u64::from(NODES)) as u16 + 1;
            let lead = log_bytes(c.node(leader).data_dir.path(), p);
            lead == log_bytes(c.node(next(leader)).data_dir.path(), p)
        })
    });
    for &conv in acked.keys() {
        let p = conv.0 & 0xffff;
        let follower = next(cluster.owner_of(conv));
        let copied = log_bytes(cluster.node(follower).data_dir.path(), p);
        assert!(
            !copied.is_empty(),
            "partition {p} has a log on node {follower}"
        );
    }
    drop(clients);

    // The leader of the first conversation dies; its partitions go to their followers at
    // epoch 2. The live nodes read the new table at their restart.
    let (&first, _) = acked.iter().next().expect("a conversation");
    let dead = cluster.owner_of(first);
    cluster.kill(dead);
    {
        let mut redis = cluster.redis.connection();
        for p in 0..cluster.spec.partitions {
            if (p % u32::from(NODES)) as u16 + 1 == dead {
                let entry = format!("{} 2", next(dead));
                let _: () = redis::cmd("HSET")
                    .arg("chinwag:partitions")
                    .arg(p)
                    .arg(entry)
                    .query(&mut redis)
                    .expect("HSET the partition table");
            }
        }
    }
    // Without the dead node some partitions have only their leader: acknowledge on it.
    cluster.spec.extra.push("--ack=leader".into());
    let live: Vec<u16> = (1..=NODES).filter(|&n| n != dead).collect();
    for &n in &live {
        cluster.kill(n);
    }
    for &n in &live {
        cluster.restart(n);
    }
    // Every acknowledged message is on the new leader, at its seq; seqs go on.
    let reader = next(dead);
    for (&conv, seqs) in &acked {
        let mut client = cluster.login(reader, buyer(sender[&conv]), Encoding::Json);
        let got: Vec<u64> = history(&mut client, conv, HistoryRange::Newest, 50)
            .iter()
            .map(|m| m.seq.0)
            .collect();
        assert_eq!(&got, seqs, "conversation {conv} after the takeover");
        let (again, seq) = send(&mut client, Target::Conv(conv), "after", "x");
        assert_eq!((again, seq.0), (conv, 21));
    }
}
