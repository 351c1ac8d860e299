//! The replication data path of one partition in the shard that holds it (issue 14): what
//! its leader does (ship its log to the followers, know how far each has it, ask for the
//! in-sync set to change) and what a follower does (find where its log and the new leader's
//! diverge, append the leader's records at the same positions, say how far it is).
//!
//! The control plane (`cluster::lease`, the leadership thread) decides roles and records
//! in-sync sets in Redis; it tells the shard with a [`RoleChange`] (`cluster::roles`). This
//! module never waits for anything: each call takes a message or the shard's turn and returns
//! the messages to send (`(node, BusMsg)`), which the owner sends after its commit. The owner
//! (logic/mod.rs) holds a turn's acknowledgements until [`Leader::acked`] covers what the turn
//! wrote.
//!
//! Rules, and the failure each covers:
//! - A follower appends only records that continue its log exactly (`from` = its tail), from
//!   its leader's current epoch: records lost on a link (a full queue drops them) leave a
//!   gap that the follower's answer (its real tail) makes the leader fill by sending again
//!   from there; records from a deposed leader are refused.
//! - A follower starts by asking its leader where its own newest epoch ends in the leader's
//!   log and cuts its log there if it has more (Kafka's `OffsetsForLeaderEpoch`): what an old
//!   leader wrote and never had acknowledged goes, so every replica's log is a prefix of the
//!   leader's.
//! - A follower acknowledges only what its store committed under the node's fsync policy.
//! - The leader counts a record acknowledged once every replica of the in-sync set as Redis
//!   recorded it has it: a follower that lags longer than `lag_max_ms` is asked out of the
//!   set ([`Leases::request_isr`]) but waited for until the [`RoleChange::Isr`] answer says
//!   Redis recorded it; a follower that caught up is asked back in.
//! - Memory is bounded: at most [`IN_FLIGHT_BYTES_MAX`] shipped and not yet acknowledged per
//!   follower, chunks of at most [`CHUNK_BYTES`] (every frame under the link's limit).

use std::time::{Duration, Instant};

use bytes::Bytes;
use smallvec::SmallVec;

use super::roles::{IsrRequest, Leases, Replicas};
use crate::bus::{BusMsg, EpochAnswer, EpochQuery, LogData, PartitionId, ReplicaAck};
use crate::store::{Position, Store, StoreError};

/// Bytes of records in one [`LogData`] at most (a single larger record goes alone).
pub const CHUNK_BYTES: usize = 256 << 10;
/// Bytes shipped to one follower and not yet acknowledged, at most.
pub const IN_FLIGHT_BYTES_MAX: u64 = 1 << 20;
/// Shipped records that no acknowledgement covered for this long are sent again (the link
/// may have dropped them).
pub const RESEND_AFTER_MS: u64 = 1_000;
/// A follower that has not caught up with the leader for this long leaves the in-sync set.
pub const LAG_MAX_MS_DEFAULT: u64 = 2_000;
/// A follower asks its leader again after this long without an answer.
pub const QUERY_RETRY_MS: u64 = 500;

/// Messages to send: the node, and the message.
pub type Outbox = Vec<(u16, BusMsg)>;

/// What this node is for one partition.
pub enum Role {
    Lead(Box<Leader>),
    Follow(Follower),
}

/// One follower, as its leader knows it.
#[derive(Debug)]
struct Peer {
    node: u16,
    /// How far the follower has the log (its last acknowledgement); `None` until its first.
    acked: Option<Position>,
    /// Shipped up to here.
    sent: Position,
    /// When `acked` last moved (or shipping last started from it).
    progress_at: Instant,
    /// When the follower last had everything the leader had.
    caught_up_at: Instant,
}

/// What a leader needs to know of its own node.
#[derive(Debug, Clone, Copy)]
pub struct ThisNode {
    /// Its number.
    pub node: u16,
    /// A follower behind for longer than this leaves the in-sync set.
    pub lag_max_ms: u64,
}

/// The leader of a partition.
pub struct Leader {
    pub partition: PartitionId,
    pub epoch: u64,
    /// This node.
    node: u16,
    /// Every replica, leader first.
    pub replicas: Replicas,
    /// The in-sync set as Redis recorded it (this node included).
    pub isr: Replicas,
    /// The set asked for and not answered yet.
    isr_asked: Option<Replicas>,
    peers: SmallVec<[Peer; 3]>,
    lag_max: Duration,
}

impl Leader {
    /// Leads `partition` at `epoch`: records the epoch in the log's history (from its tail)
    /// and knows nothing of the followers until they speak.
    pub fn start(
        partition: PartitionId,
        epoch: u64,
        replicas: Replicas,
        isr: Replicas,
        store: &mut Store,
        this: ThisNode,
        now: Instant,
    ) -> Result<Leader, StoreError> {
        let ThisNode { node, lag_max_ms } = this;
        store.begin_epoch(epoch, store.tail())?;
        let peers = replicas
            .iter()
            .filter(|&&n| n != node)
            .map(|&n| Peer {
                node: n,
                acked: None,
                sent: 0,
                progress_at: now,
                caught_up_at: now,
            })
            .collect();
        Ok(Leader {
            partition,
            epoch,
            node,
            replicas,
            isr,
            isr_asked: None,
            peers,
            lag_max: Duration::from_millis(lag_max_ms),
        })
    }

    /// How far every replica of the in-sync set has the log: a record below this may be
    /// acknowledged. The leader's own part is `tail` (what it committed).
    pub fn acked(&self, tail: Position) -> Position {
        self.isr
            .iter()
            .filter(|&&n| n != self.node)
            .map(|&n| {
                self.peers
                    .iter()
                    .find(|p| p.node == n)
                    .and_then(|p| p.acked)
                    .unwrap_or(0)
            })
            .fold(tail, Position::min)
    }

    /// A follower's acknowledgement. One from another epoch is ignored (a newer epoch's
    /// means this node is deposed; the leadership thread tells it so).
    pub fn on_ack(&mut self, ack: &ReplicaAck, tail: Position, now: Instant) {
        if ack.epoch != self.epoch || ack.position > tail {
            return;
        }
        let Some(peer) = self.peers.iter_mut().find(|p| p.node == ack.node) else {
            return;
        };
        if peer.acked != Some(ack.position) {
            peer.progress_at = now;
        }
        // Shipping goes on from where it was: records shipped past the position are most
        // likely on their way (an acknowledgement trails them by a round trip). Records that
        // were lost stop the acknowledgements; they are sent again after `RESEND_AFTER_MS`.
        if peer.acked.is_none() || ack.position > peer.sent {
            peer.sent = ack.position;
        }
        peer.acked = Some(ack.position);
        if ack.position == tail {
            peer.caught_up_at = now;
        }
    }

    /// The answer to a follower's [`EpochQuery`] (`None` if it follows another epoch). The
    /// follower may cut its log after it: it counts as having nothing until it says where it
    /// is.
    pub fn answer(&mut self, query: &EpochQuery, store: &Store) -> Option<EpochAnswer> {
        if query.epoch != self.epoch {
            return None;
        }
        if let Some(peer) = self.peers.iter_mut().find(|p| p.node == query.node) {
            peer.acked = None;
            peer.sent = 0;
        }
        Some({
            let (last_epoch, end) = store.epoch_end(query.last_epoch);
            EpochAnswer {
                partition: self.partition,
                epoch: self.epoch,
                last_epoch,
                end,
            }
        })
    }

    /// Ships what each follower lacks, up to its in-flight bound, in chunks that keep to one
    /// segment and one epoch; records that no acknowledgement covered for
    /// [`RESEND_AFTER_MS`] are sent again.
    pub fn ship(&mut self, store: &Store, now: Instant, out: &mut Outbox) {
        let tail = store.tail();
        // Asked for only when a follower lacks something (every turn asks every partition).
        if self
            .peers
            .iter()
            .all(|p| p.acked.map_or(true, |a| a == tail))
        {
            for peer in self.peers.iter_mut().filter(|p| p.acked == Some(tail)) {
                peer.caught_up_at = now;
            }
            return;
        }
        let leader_acked = self.acked(tail);
        for peer in self.peers.iter_mut() {
            let Some(acked) = peer.acked else { continue };
            if acked == tail {
                peer.caught_up_at = now;
            }
            if peer.sent > acked
                && now.duration_since(peer.progress_at) >= Duration::from_millis(RESEND_AFTER_MS)
            {
                peer.sent = acked;
                peer.progress_at = now;
            }
            while peer.sent < tail && peer.sent.saturating_sub(acked) < IN_FLIGHT_BYTES_MAX {
                let (data_epoch, stop) = epoch_at(store.epochs(), peer.sent);
                let chunk = match store.read_raw(peer.sent, CHUNK_BYTES, stop) {
                    Ok(chunk) if !chunk.bytes.is_empty() => chunk,
                    Ok(_) => break,
                    Err(e) => {
                        // A position this log does not have (retention deleted it; a follower
                        // with more than the leader): it stays behind and leaves the set.
                        tracing::warn!(partition = self.partition, node = peer.node, position = peer.sent, error = %e, "cannot ship to a follower");
                        break;
                    }
                };
                let from = peer.sent;
                peer.sent = chunk.end();
                out.push((
                    peer.node,
                    BusMsg::LogData(Box::new(LogData {
                        partition: self.partition,
                        epoch: self.epoch,
                        data_epoch,
                        from,
                        at: chunk.at,
                        records: Bytes::from(chunk.bytes),
                        leader_acked,
                    })),
                ));
            }
        }
    }

    /// Asks for the in-sync set to lose a follower that lagged longer than the bound, or to
    /// take back one that caught up. One request at a time; the set changes only when the
    /// answer comes ([`Leader::on_isr`]).
    pub fn check_isr(&mut self, tail: Position, now: Instant, leases: &Leases) {
        // For `chinwag cluster show`: each follower as this leader sees it.
        let seen = self.peers.iter().map(|p| (p.node, p.acked, p.caught_up_at));
        leases.report_lag(self.partition, tail, seen);
        if self.isr_asked.is_some() {
            return;
        }
        // The usual case, without building a set: nobody to take out or back in.
        let change = self.peers.iter().any(|peer| {
            let in_set = self.isr.contains(&peer.node);
            (in_set && now.duration_since(peer.caught_up_at) > self.lag_max)
                || (!in_set && peer.acked == Some(tail))
        });
        if !change {
            return;
        }
        let mut wanted = self.isr.clone();
        for peer in &self.peers {
            let in_set = wanted.contains(&peer.node);
            let lagging = now.duration_since(peer.caught_up_at) > self.lag_max;
            let caught_up = peer.acked == Some(tail);
            if in_set && lagging {
                wanted.retain(|n| *n != peer.node);
            } else if !in_set && caught_up {
                wanted.push(peer.node);
            }
        }
        if wanted == self.isr {
            return;
        }
        // The order of `replicas`, so that equal sets compare equal.
        let wanted: Replicas = self
            .replicas
            .iter()
            .copied()
            .filter(|n| wanted.contains(n))
            .collect();
        let request = IsrRequest {
            partition: self.partition,
            epoch: self.epoch,
            isr: wanted.clone(),
        };
        if leases.request_isr(request) {
            tracing::info!(partition = self.partition, isr = ?wanted, "in-sync set change asked");
            self.isr_asked = Some(wanted);
        }
    }

    /// Redis recorded `isr` as the in-sync set (at this leader's epoch).
    pub fn on_isr(&mut self, isr: Replicas) {
        self.isr = isr;
        self.isr_asked = None;
    }

    /// The nodes of the in-sync set other than this one.
    pub fn followers_in_sync(&self) -> impl Iterator<Item = u16> + '_ {
        self.isr.iter().copied().filter(move |&n| n != self.node)
    }
}

/// The epoch that wrote the record at `pos` per `epochs` (0 before the first), and where its
/// stretch ends (`u64::MAX`: it is the newest).
fn epoch_at(epochs: &[(u64, Position)], pos: Position) -> (u64, Position) {
    let i = epochs.partition_point(|&(_, start)| start <= pos);
    let epoch = i.checked_sub(1).map_or(0, |j| epochs[j].0);
    let stop = epochs.get(i).map_or(u64::MAX, |&(_, start)| start);
    (epoch, stop)
}

/// Where a follower is with its leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asked where its newest epoch ends in the leader's log, at this instant.
    Asking(Instant),
    /// Appending what the leader sends.
    Copying,
}

/// A follower of a partition.
pub struct Follower {
    pub partition: PartitionId,
    pub leader: u16,
    pub epoch: u64,
    node: u16,
    phase: Phase,
    /// How far the leader said its log is acknowledged.
    pub leader_acked: Position,
}

/// What a follower did with a message.
pub enum Followed {
    /// Nothing to do now.
    Nothing,
    /// Its log changed: commit it, then acknowledge its tail ([`Follower::ack`]).
    Appended,
    /// Answer the leader with its position now (records it could not take).
    AckNow,
    /// Cut the log at this position (reopen it), then ask again ([`Follower::query`]).
    Truncate(Position),
}

impl Follower {
    /// Follows `leader` at `epoch`; the first thing to do is [`Follower::query`].
    pub fn new(partition: PartitionId, leader: u16, epoch: u64, node: u16, now: Instant) -> Self {
        Follower {
            partition,
            leader,
            epoch,
            node,
            phase: Phase::Asking(now),
            leader_acked: 0,
        }
    }

    /// The question to the leader: where does this log's newest epoch end in yours?
    pub fn query(&mut self, store: &Store, now: Instant, out: &mut Outbox) {
        self.phase = Phase::Asking(now);
        out.push((
            self.leader,
            BusMsg::EpochQuery(EpochQuery {
                partition: self.partition,
                epoch: self.epoch,
                node: self.node,
                last_epoch: store.last_epoch(),
            }),
        ));
    }

    /// Asks again if the leader did not answer (it may not know yet that it leads).
    pub fn tick(&mut self, store: &Store, now: Instant, out: &mut Outbox) {
        if let Phase::Asking(at) = self.phase {
            if now.duration_since(at) >= Duration::from_millis(QUERY_RETRY_MS) {
                self.query(store, now, out);
            }
        }
    }

    /// The leader's answer: cut the log where the leader's history says it diverged, or
    /// start copying. (When the leader knows only an older epoch than this log's newest,
    /// this log's newer stretches go and the question is asked again, about the epoch before.)
    pub fn on_answer(&mut self, answer: &EpochAnswer, store: &Store) -> Followed {
        if answer.epoch != self.epoch || !matches!(self.phase, Phase::Asking(_)) {
            return Followed::Nothing;
        }
        let own_last = store.last_epoch();
        let cut = if answer.last_epoch == own_last {
            answer.end.min(store.tail())
        } else {
            answer
                .end
                .min(store.start_after_epoch(answer.last_epoch))
                .min(store.tail())
        };
        if cut < store.tail() {
            return Followed::Truncate(cut);
        }
        if answer.last_epoch != own_last && store.last_epoch() > answer.last_epoch {
            // Nothing to cut, but the history names epochs the leader does not have.
            return Followed::Truncate(cut);
        }
        self.phase = Phase::Copying;
        Followed::AckNow
    }

    /// Records from the leader: appended if they continue this log at the current epoch.
    pub fn on_data(&mut self, data: &LogData, store: &mut Store) -> Followed {
        if data.epoch < self.epoch {
            // A deposed leader: tell it the epoch it missed.
            return Followed::AckNow;
        }
        if data.epoch > self.epoch || self.phase != Phase::Copying {
            // From a leader this node does not know of yet, or before the handshake: the
            // leadership thread's role change comes first.
            return Followed::Nothing;
        }
        if data.from != store.tail() {
            return Followed::AckNow;
        }
        match store.append_raw(data.at, &data.records) {
            Ok(_) => {
                if data.data_epoch > store.last_epoch() {
                    if let Err(e) = store.begin_epoch(data.data_epoch, data.at) {
                        tracing::error!(partition = self.partition, error = %e, "epoch history not written");
                    }
                }
                self.leader_acked = data.leader_acked;
                Followed::Appended
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, leader = self.leader, error = %e, "records from the leader refused");
                Followed::AckNow
            }
        }
    }

    /// The acknowledgement of this log's tail (send only once it is committed).
    pub fn ack(&self, store: &Store) -> (u16, BusMsg) {
        (
            self.leader,
            BusMsg::ReplicaAck(ReplicaAck {
                partition: self.partition,
                epoch: self.epoch,
                node: self.node,
                position: store.tail(),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, DeviceId, Uid, UidKind};
    use smallvec::smallvec;

    use super::*;
    use crate::store::{NewMessage, StoreConfig};

    const CONV: ConvId = ConvId(1 << 16);

    fn open(dir: &std::path::Path) -> Store {
        Store::open(StoreConfig {
            segment_bytes: 64 << 10,
            segment_bytes_first: 64 << 10,
            body_bytes_max: 4 << 10,
            ..StoreConfig::new(dir)
        })
        .unwrap()
        .0
    }

    fn write(store: &mut Store, n: usize, tag: &str) {
        if store.conv(CONV).is_none() {
            let (a, b) = (Uid::new(UidKind::Buyer, 1), Uid::new(UidKind::Buyer, 2));
            store.create_direct_conv(CONV, a, b).unwrap();
        }
        for i in 0..n {
            store
                .append_message(&NewMessage {
                    conv: CONV,
                    sender: Uid::new(UidKind::Buyer, 1),
                    device: DeviceId::from_u64(42).unwrap(),
                    cmid: format!("{tag}{i}").as_bytes(),
                    kind: b"text",
                    body: &[b'x'; 900],
                    ts_ms: 1,
                })
                .unwrap();
        }
        store.commit().unwrap();
    }

    /// A leader on node 1 and a follower on node 2, passing messages by hand; `drop_data`
    /// loses every record message on the way (a congested link).
    struct Pair {
        leader: Leader,
        leader_log: Store,
        follower: Follower,
        follower_log: Option<Store>,
        now: Instant,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    impl Pair {
        fn new(epoch: u64) -> Pair {
            let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let mut leader_log = open(dirs.0.path());
            let now = Instant::now();
            let leader = Leader::start(
                7,
                epoch,
                smallvec![1, 2],
                smallvec![1, 2],
                &mut leader_log,
                ThisNode {
                    node: 1,
                    lag_max_ms: LAG_MAX_MS_DEFAULT,
                },
                now,
            )
            .unwrap();
            let follower = Follower::new(7, 1, epoch, 2, now);
            Pair {
                leader,
                leader_log,
                follower,
                follower_log: Some(open(dirs.1.path())),
                now,
                _dirs: dirs,
            }
        }

        fn flog(&mut self) -> &mut Store {
            self.follower_log.as_mut().unwrap()
        }

        /// Delivers messages both ways until none is left; returns how many went.
        fn run(&mut self, drop_data: bool) -> usize {
            let mut to_leader = Outbox::new();
            self.follower.query(
                self.follower_log.as_ref().unwrap(),
                self.now,
                &mut to_leader,
            );
            self.pump(to_leader, drop_data)
        }

        fn pump(&mut self, mut to_leader: Outbox, drop_data: bool) -> usize {
            let mut count = 0;
            loop {
                let mut to_follower = Outbox::new();
                for (node, msg) in to_leader.drain(..) {
                    assert_eq!(node, 1);
                    count += 1;
                    match msg {
                        BusMsg::EpochQuery(q) => {
                            if let Some(a) = self.leader.answer(&q, &self.leader_log) {
                                to_follower.push((2, BusMsg::EpochAnswer(a)));
                            }
                        }
                        BusMsg::ReplicaAck(ack) => {
                            self.leader.on_ack(&ack, self.leader_log.tail(), self.now)
                        }
                        other => panic!("not for a leader: {other:?}"),
                    }
                }
                self.leader
                    .ship(&self.leader_log, self.now, &mut to_follower);
                if to_follower.is_empty() {
                    return count;
                }
                for (node, msg) in to_follower {
                    assert_eq!(node, 2);
                    count += 1;
                    let followed = match &msg {
                        BusMsg::EpochAnswer(a) => self
                            .follower
                            .on_answer(a, self.follower_log.as_ref().unwrap()),
                        BusMsg::LogData(_) if drop_data => Followed::Nothing,
                        BusMsg::LogData(d) => {
                            let log = self.follower_log.as_mut().unwrap();
                            self.follower.on_data(d, log)
                        }
                        other => panic!("not for a follower: {other:?}"),
                    };
                    match followed {
                        Followed::Nothing => {}
                        Followed::Appended | Followed::AckNow => {
                            self.flog().commit().unwrap();
                            to_leader.push(self.follower.ack(self.follower_log.as_ref().unwrap()));
                        }
                        Followed::Truncate(to) => {
                            let log = self.follower_log.take().unwrap();
                            self.follower_log = Some(log.truncated(to).unwrap().0);
                            let log = self.follower_log.as_ref().unwrap();
                            self.follower.query(log, self.now, &mut to_leader);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_follower_catches_up_and_the_leader_counts_it_acknowledged() {
        let mut pair = Pair::new(1);
        write(&mut pair.leader_log, 200, "a");
        let tail = pair.leader_log.tail();
        assert_eq!(
            pair.leader.acked(tail),
            0,
            "nothing acknowledged without the follower"
        );
        pair.run(false);
        assert_eq!(pair.flog().tail(), tail);
        assert_eq!(pair.leader.acked(tail), tail);
        // More records: shipped on the next turn, acknowledged once appended.
        write(&mut pair.leader_log, 3, "b");
        let tail = pair.leader_log.tail();
        assert!(pair.leader.acked(tail) < tail);
        pair.pump(Outbox::new(), false);
        assert_eq!(pair.leader.acked(tail), tail);
        let follower_epochs = pair.flog().epochs().to_vec();
        assert_eq!(follower_epochs, pair.leader_log.epochs());
    }

    #[test]
    fn records_lost_on_the_way_are_sent_again_from_the_followers_position() {
        let mut pair = Pair::new(1);
        write(&mut pair.leader_log, 10, "a");
        pair.run(false);
        write(&mut pair.leader_log, 10, "b");
        pair.pump(Outbox::new(), true);
        let tail = pair.leader_log.tail();
        assert!(pair.flog().tail() < tail, "lost");
        // Nothing is resent before the resend delay; after it, everything is.
        pair.now += Duration::from_millis(RESEND_AFTER_MS);
        pair.pump(Outbox::new(), false);
        assert_eq!(pair.flog().tail(), tail);
        assert_eq!(pair.leader.acked(tail), tail);
    }

    #[test]
    fn an_acknowledgement_trailing_records_in_flight_sends_nothing_again() {
        let mut pair = Pair::new(1);
        pair.run(false);
        write(&mut pair.leader_log, 600, "a");
        let mut shipped = Outbox::new();
        pair.leader.ship(&pair.leader_log, pair.now, &mut shipped);
        assert!(shipped.len() >= 2, "several chunks in flight");
        let BusMsg::LogData(first) = &shipped[0].1 else {
            panic!("records")
        };
        let log = pair.follower_log.as_mut().unwrap();
        assert!(matches!(
            pair.follower.on_data(first, log),
            Followed::Appended
        ));
        log.commit().unwrap();
        let (_, ack) = pair.follower.ack(log);
        let BusMsg::ReplicaAck(ack) = ack else {
            panic!("an ack")
        };
        pair.leader.on_ack(&ack, pair.leader_log.tail(), pair.now);
        let mut again = Outbox::new();
        pair.leader.ship(&pair.leader_log, pair.now, &mut again);
        assert!(again.is_empty(), "the rest is on its way: {}", again.len());
    }

    #[test]
    fn in_flight_bytes_per_follower_are_bounded() {
        let mut pair = Pair::new(1);
        let mut out = Outbox::new();
        pair.follower
            .query(pair.follower_log.as_ref().unwrap(), pair.now, &mut out);
        pair.pump(out, false);
        write(&mut pair.leader_log, 6_000, "a");
        let mut shipped = Outbox::new();
        pair.leader.ship(&pair.leader_log, pair.now, &mut shipped);
        let bytes: usize = shipped
            .iter()
            .map(|(_, m)| match m {
                BusMsg::LogData(d) => {
                    assert!(d.records.len() <= CHUNK_BYTES);
                    d.records.len()
                }
                _ => 0,
            })
            .sum();
        assert!(
            bytes as u64 <= IN_FLIGHT_BYTES_MAX + CHUNK_BYTES as u64,
            "{bytes}"
        );
        assert!(bytes < 6_000 * 900, "not everything at once");
    }

    #[test]
    fn a_follower_refuses_a_deposed_leaders_records_and_a_gap() {
        let mut pair = Pair::new(2);
        write(&mut pair.leader_log, 3, "a");
        pair.run(false);
        let tail = pair.flog().tail();
        let stale = LogData {
            partition: 7,
            epoch: 1,
            data_epoch: 1,
            from: tail,
            at: tail,
            records: Bytes::new(),
            leader_acked: 0,
        };
        let log = pair.follower_log.as_mut().unwrap();
        assert!(matches!(
            pair.follower.on_data(&stale, log),
            Followed::AckNow
        ));
        let gap = LogData {
            epoch: 2,
            from: tail + 8,
            at: tail + 8,
            ..stale
        };
        assert!(matches!(pair.follower.on_data(&gap, log), Followed::AckNow));
        assert_eq!(log.tail(), tail);
        // A deposed leader ignores acknowledgements of another epoch.
        let ack = ReplicaAck {
            partition: 7,
            epoch: 3,
            node: 2,
            position: 0,
        };
        pair.leader.on_ack(&ack, pair.leader_log.tail(), pair.now);
        assert_eq!(pair.leader.acked(pair.leader_log.tail()), tail);
    }

    /// The old leader of epoch 1 wrote records nobody else has; the new leader (epoch 2)
    /// wrote others. The old leader follows now: its extra records go, the logs end equal.
    #[test]
    fn an_old_leader_that_follows_cuts_its_unacknowledged_records_and_copies_the_new_ones() {
        let mut pair = Pair::new(1);
        write(&mut pair.leader_log, 5, "a");
        pair.run(false);
        // Now the roles swap: the follower's log leads at epoch 2, the old leader follows.
        let dirs = std::mem::replace(
            &mut pair._dirs,
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()),
        );
        let mut old = std::mem::replace(&mut pair.leader_log, open(pair._dirs.0.path()));
        write(&mut old, 4, "lost");
        let mut new = pair.follower_log.take().unwrap();
        let now = pair.now;
        let this = ThisNode {
            node: 1,
            lag_max_ms: 2_000,
        };
        pair.leader =
            Leader::start(7, 2, smallvec![1, 2], smallvec![1, 2], &mut new, this, now).unwrap();
        write(&mut new, 2, "new");
        pair.leader_log = new;
        pair.follower_log = Some(old);
        pair.follower = Follower::new(7, 1, 2, 2, now);
        pair.run(false);
        let (l, f) = (&pair.leader_log, pair.follower_log.as_ref().unwrap());
        assert_eq!(f.tail(), l.tail());
        assert_eq!(
            f.conv(CONV).unwrap().last_seq(),
            l.conv(CONV).unwrap().last_seq()
        );
        assert_eq!(f.epochs(), l.epochs());
        assert_eq!(l.conv(CONV).unwrap().last_seq().0, 7);
        drop(pair);
        drop(dirs);
    }

    #[test]
    fn a_lagging_follower_is_asked_out_of_the_set_and_waited_for_until_redis_recorded_it() {
        let mut pair = Pair::new(1);
        write(&mut pair.leader_log, 2, "a");
        pair.run(false);
        let leases = Leases::new(16);
        write(&mut pair.leader_log, 2, "b");
        let tail = pair.leader_log.tail();
        pair.leader.check_isr(tail, pair.now, &leases);
        assert!(leases.next_isr_request().is_none(), "not lagging yet");
        let later = pair.now + Duration::from_millis(LAG_MAX_MS_DEFAULT + 1);
        pair.leader.check_isr(tail, later, &leases);
        let request = leases.next_isr_request().expect("asked out");
        assert_eq!((request.partition, request.epoch), (7, 1));
        assert_eq!(request.isr.as_slice(), [1]);
        assert!(pair.leader.acked(tail) < tail, "still waited for");
        pair.leader.check_isr(tail, later, &leases);
        assert!(leases.next_isr_request().is_none(), "one request at a time");
        pair.leader.on_isr(smallvec![1]);
        assert_eq!(
            pair.leader.acked(tail),
            tail,
            "recorded: no longer waited for"
        );
        // It catches up and is asked back in.
        pair.now = later;
        pair.pump(Outbox::new(), false);
        pair.leader.check_isr(tail, later, &leases);
        assert_eq!(leases.next_isr_request().unwrap().isr.as_slice(), [1, 2]);
    }

    #[test]
    fn epoch_stretches_are_found_by_position() {
        let epochs = [(1, 100), (3, 200)];
        assert_eq!(epoch_at(&epochs, 50), (0, 100));
        assert_eq!(epoch_at(&epochs, 100), (1, 200));
        assert_eq!(epoch_at(&epochs, 250), (3, u64::MAX));
    }
}
