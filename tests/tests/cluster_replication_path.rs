//! Replication's data path end to end (issue 14, docs/storage.md "Replication"): three real
//! nodes, two replicas of every partition (`chinwag cluster init`'s default), the leadership
//! thread deciding roles. Every follower's log becomes the leader's, byte for byte at the same
//! positions; after a leader is SIGKILLed its in-sync follower takes over (epoch + 1) with
//! every acknowledged message at its seq, and seqs go on; the old leader, restarted, follows
//! and ends with the new leader's log.

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
        extra: vec!["--messages-per-s-max=0".into()],
        ..ClusterSpec::default()
    });
    // Six users spread over the nodes; five direct conversations, 20 messages each, every one
    // acknowledged (`ack = replicated`: on both replicas).
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

    // The leader of the first conversation dies; its follower takes over when the lease
    // lapses, and serves every acknowledged message at its seq; seqs go on.
    let (&first, _) = acked.iter().next().expect("a conversation");
    let dead = cluster.owner_of(first);
    let heir = next(dead);
    cluster.kill(dead);
    let conv_sender = sender[&first];
    let mut client = cluster.login(heir, buyer(conv_sender), Encoding::Json);
    let mut taken_over = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let asked = client.call(chinwag_protocol::Message::History(
            chinwag_protocol::History {
                conv: first,
                range: HistoryRange::Newest,
                limit: 50,
            },
        ));
        if let Ok(frame) = asked {
            if let chinwag_protocol::Message::HistoryOk(page) = frame.message {
                let got: Vec<u64> = page.msgs.iter().map(|m| m.seq.0).collect();
                assert_eq!(&got, &acked[&first], "after the takeover");
                taken_over = true;
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        taken_over,
        "node {heir} never served conversation {first}\n{}",
        cluster.logs()
    );
    let (again, seq) = send(&mut client, Target::Conv(first), "after", "x");
    assert_eq!((again, seq.0), (first, 21));
    drop(client);
    for (&conv, seqs) in &acked {
        let mut client = cluster.login(heir, buyer(sender[&conv]), Encoding::Json);
        let got: Vec<u64> = history(&mut client, conv, HistoryRange::Newest, 50)
            .iter()
            .map(|m| m.seq.0)
            .collect();
        let expected: Vec<u64> = match conv == first {
            true => (1..=21).collect(),
            false => seqs.clone(),
        };
        assert_eq!(got, expected, "conversation {conv}");
    }
    // The old leader comes back as a follower and copies the new leader's log.
    cluster.restart(dead);
    let p = first.0 & 0xffff;
    cluster.wait_until("the old leader's log to equal the new leader's", |c| {
        let lead = log_bytes(c.node(heir).data_dir.path(), p);
        lead == log_bytes(c.node(dead).data_dir.path(), p)
    });
}
