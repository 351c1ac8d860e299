//! The backend message stream of a cluster (docs/cluster.md, "The message stream"): a
//! subscription on any node streams every partition of the cluster, reading other nodes'
//! partitions over the node links; its position resumes on any node; a node that dies only
//! holds back its own partitions, which come, with no gap, once it is back. Three real nodes
//! and a real `redis-server` (tests/src/cluster.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{ConvId, Message, Send, SendAs, Target};
use chinwag_tests::buyer;
use chinwag_tests::cluster::{Cluster, ClusterSpec};

/// Three nodes of two shards each (a remote node splits a read over its shards), without the
/// per-connection rate limit.
fn cluster() -> Cluster {
    Cluster::start(ClusterSpec {
        shards: 2,
        extra: vec!["--messages-per-s-max=0".into()],
        ..ClusterSpec::default()
    })
}

/// The direct conversations the tests write in: buyer 1 with each of these.
const PEERS: std::ops::Range<u64> = 1000..1024;

/// A service client whose reads wait long enough for a node's read to be given up and asked
/// again (a bound against hanging, not a measure of speed).
fn service(cluster: &Cluster, n: u16) -> ServiceClient {
    let mut service = cluster.service(n);
    service.set_timeout(Duration::from_secs(60)).unwrap();
    service
}

/// Stores `count` messages as buyer 1 through `service`, spread over `peers` in turn; returns
/// each one's conversation.
fn store(service: &mut ServiceClient, tag: &str, peers: &[u64], count: usize) -> Vec<ConvId> {
    let mut reqs = Vec::new();
    for i in 0..count {
        let message = Message::SendAs(SendAs {
            from: buyer(1),
            send: Send {
                target: Target::User(buyer(peers[i % peers.len()])),
                cmid: format!("{tag}-{i}").into(),
                kind: "text".into(),
                body: format!("{tag} {i}").into(),
            },
        });
        reqs.push(service.send(message).unwrap());
    }
    reqs.into_iter()
        .map(|req| match service.wait(req).unwrap().message {
            Message::SendAsOk(ok) => ok.conv,
            other => panic!("send_as refused: {other:?}"),
        })
        .collect()
}

/// Every peer's conversation and the node that owns it.
fn owners(cluster: &Cluster, service: &mut ServiceClient) -> BTreeMap<u64, (ConvId, u16)> {
    let peers: Vec<u64> = PEERS.collect();
    let convs = store(service, "hello", &peers, peers.len());
    peers
        .into_iter()
        .zip(convs)
        .map(|(peer, conv)| (peer, (conv, cluster.owner_of(conv))))
        .collect()
}

/// What a subscriber has read: the seqs per conversation, in the order they came, and the
/// last position handed out.
#[derive(Default)]
struct Seen {
    seqs: BTreeMap<u64, Vec<u64>>,
    position: String,
}

impl Seen {
    fn take(&mut self, message: Message<'_>) {
        let Message::StreamBatch(batch) = message else {
            panic!("expected a stream batch: {message:?}")
        };
        for msg in &batch.msgs {
            self.seqs.entry(msg.conv.0).or_default().push(msg.seq.0);
        }
        self.position = batch.position.into_owned();
    }

    /// Subscribes `service` from `from` and takes the first batch.
    fn subscribe(service: &mut ServiceClient, from: &str) -> Seen {
        let req = service.send(Message::Subscribe(from.into())).unwrap();
        let mut seen = Seen::default();
        seen.take(service.wait(req).unwrap().message);
        seen
    }

    /// The distinct messages seen.
    fn distinct(&self) -> usize {
        self.seqs
            .values()
            .map(|s| s.iter().collect::<BTreeSet<_>>().len())
            .sum()
    }

    /// Reads batches until `distinct` messages in all were seen.
    fn read_until(&mut self, service: &mut ServiceClient, distinct: usize) {
        while self.distinct() < distinct {
            let frame = service.next_frame().expect("a stream batch");
            self.take(frame.message);
        }
    }

    /// Every conversation's seqs, as they came, run on by one from `first[conv]` (default 1),
    /// each once, except that a message may come again (at least once) but never before
    /// one after it was first seen out of turn.
    fn assert_in_order(&self, at_least_once: bool) {
        for (conv, seqs) in &self.seqs {
            let mut next = seqs[0];
            assert_eq!(next, 1, "conversation {conv} starts at 1: {seqs:?}");
            for &seq in seqs {
                if at_least_once && seq < next {
                    continue;
                }
                assert_eq!(seq, next, "conversation {conv} in order, no gap: {seqs:?}");
                next += 1;
            }
        }
    }
}

#[test]
#[ignore = "needs redis-server: run by .ci/run"]
fn a_subscription_on_one_node_streams_every_node_and_resumes_on_another() {
    let cluster = cluster();
    let mut writer = service(&cluster, 3);
    let mut reader = service(&cluster, 1);
    // From the start of every partition's log: the position of nothing read yet.
    let mut seen = Seen::subscribe(&mut reader, "");
    let owners = owners(&cluster, &mut writer);
    let nodes: BTreeSet<u16> = owners.values().map(|&(_, node)| node).collect();
    assert_eq!(nodes.len(), 3, "conversations on every node: {owners:?}");
    let peers: Vec<u64> = PEERS.collect();
    store(&mut writer, "a", &peers, 120);
    seen.read_until(&mut reader, peers.len() + 120);
    seen.assert_in_order(false);
    assert_eq!(seen.seqs.len(), peers.len(), "every conversation");
    assert_eq!(
        seen.seqs.values().map(Vec::len).sum::<usize>(),
        peers.len() + 120,
        "each message once"
    );

    // The service goes away; more is stored; it resumes on node 2 from its last position.
    let position = seen.position.clone();
    drop(reader);
    store(&mut writer, "b", &peers, 60);
    let mut reader = service(&cluster, 2);
    let mut resumed = Seen::subscribe(&mut reader, &position);
    store(&mut writer, "c", &peers, 36);
    resumed.read_until(&mut reader, 60 + 36);
    // Everything after the position, from every node's partitions, and nothing before it.
    for (conv, seqs) in &resumed.seqs {
        let before = seen.seqs[conv].len() as u64;
        let expected: Vec<u64> = (before + 1..=before + seqs.len() as u64).collect();
        assert_eq!(seqs, &expected, "conversation {conv} resumes where it was");
    }
    assert_eq!(
        resumed.distinct(),
        96,
        "exactly what came after the position"
    );
    let mut all = seen;
    for (conv, seqs) in resumed.seqs {
        all.seqs.entry(conv).or_default().extend(seqs);
    }
    all.assert_in_order(false);
}

#[test]
#[ignore = "needs redis-server: run by .ci/run"]
fn a_dead_owner_holds_back_only_its_partitions_and_they_come_after_its_restart() {
    let mut cluster = cluster();
    let mut writer = service(&cluster, 2);
    let mut reader = service(&cluster, 1);
    let mut seen = Seen::subscribe(&mut reader, "");
    let owners = owners(&cluster, &mut writer);
    let peers: Vec<u64> = PEERS.collect();
    let (on_3, live): (Vec<u64>, Vec<u64>) = peers.iter().partition(|p| owners[p].1 == 3);
    assert!(!on_3.is_empty() && !live.is_empty(), "{owners:?}");
    seen.read_until(&mut reader, peers.len());

    // Stored on every node; node 3 dies before the stream may have read its part.
    store(&mut writer, "a", &peers, 60);
    cluster.kill(3);
    // The stream goes on for nodes 1 and 2 while node 3 is down.
    store(&mut writer, "b", &live, 40);
    let live_convs: BTreeSet<u64> = live.iter().map(|p| owners[p].0 .0).collect();
    let stored_live = |seen: &Seen| -> usize {
        seen.seqs
            .iter()
            .filter(|(conv, _)| live_convs.contains(conv))
            .map(|(_, s)| s.iter().collect::<BTreeSet<_>>().len())
            .sum()
    };
    let live_total = live.len()
        + (0..60)
            .filter(|i| live.contains(&peers[i % peers.len()]))
            .count()
        + 40;
    while stored_live(&seen) < live_total {
        seen.take(reader.next_frame().expect("a stream batch").message);
    }

    // Node 3 is back: what it stored before it died, and what it stores now, comes.
    cluster.restart(3);
    store(&mut writer, "c", &peers, 24);
    seen.read_until(&mut reader, peers.len() + 60 + 40 + 24);
    seen.assert_in_order(true);
    assert_eq!(seen.distinct(), peers.len() + 60 + 40 + 24);
}
