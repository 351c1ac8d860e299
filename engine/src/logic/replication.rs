//! The owner's side of replication (issue 14; the per-partition rules are in
//! `cluster::replica`): role changes of its partitions (lead, follow, in-sync set, drop),
//! the records and answers that come from other replicas, and the held acknowledgements.
//!
//! With `ack = replicated`, a turn's outputs (every acknowledgement, push and reply of the
//! turn, in order) wait in [`HeldTurn`]s until every in-sync replica of each partition the
//! turn wrote has what the turn wrote there; held turns leave strictly in order. Before a
//! turn leaves, the lease on each of its partitions must still run at the epoch it was
//! written at ([`Leases::valid`]); if it does not, or the partition was given up meanwhile,
//! its acknowledgements become `unavailable` (the client retries with its cmid and gets the
//! original if the record survived) and its pushes are dropped. The held bytes are bounded:
//! a turn that would pass `held_bytes_max` is answered `unavailable` at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use chinwag_protocol::ErrorCode;
use smallvec::SmallVec;

use super::{shop, Owner, Partition, Pending};
use crate::bus::post::To;
use crate::bus::{BusMsg, EpochAnswer, LogData, PartitionId, ReplicaAck};
use crate::cluster::replica::{Followed, Follower, Leader, Outbox, Role, ThisNode};
use crate::cluster::roles::{Leases, RoleChange};
use crate::store::{Position, Store};

/// How a node replicates the partitions its shards hold.
#[derive(Clone)]
pub struct ReplicationSetup {
    /// This node's number.
    pub node: u16,
    /// Acknowledge only once every in-sync replica has a record (`ack = replicated`), or
    /// once the leader's log has it (`ack = leader`).
    pub ack_replicated: bool,
    /// The leases, when a leadership thread keeps them (`None`: roles are static, from the
    /// partition table, and every lease counts as valid).
    pub leases: Option<Arc<Leases>>,
    /// A follower behind for longer than this leaves the in-sync set.
    pub lag_max_ms: u64,
    /// Bytes of held outputs a shard keeps at most.
    pub held_bytes_max: usize,
}

/// A turn's outputs waiting for its records to be on every in-sync replica.
pub(super) struct HeldTurn {
    /// Per partition the turn wrote: the epoch it led at and the log's tail after the turn.
    needs: SmallVec<[(PartitionId, u64, Position); 2]>,
    outputs: Vec<Pending>,
    bytes: usize,
}

/// The owner's replication state.
pub(super) struct Replication {
    pub setup: ReplicationSetup,
    pub held: VecDeque<HeldTurn>,
    pub held_bytes: usize,
    /// Messages for other replicas, sent after the turn's commit.
    pub outbox: Outbox,
    /// Followed partitions that appended (or refused records) this turn: their position goes
    /// to the leader once committed.
    pub acks_due: Vec<PartitionId>,
    /// Partitions this shard leads or follows (those with a role).
    pub replicated: Vec<PartitionId>,
    /// Partitions this shard took the lead of since the last [`Owner::take_taken_over`]:
    /// their users' sessions are asked for (`PostOffice::ask_for_sessions`).
    pub taken_over: Vec<PartitionId>,
}

impl Replication {
    pub fn new(setup: ReplicationSetup) -> Replication {
        Replication {
            setup,
            held: VecDeque::new(),
            held_bytes: 0,
            outbox: Vec::new(),
            acks_due: Vec::new(),
            replicated: Vec::new(),
            taken_over: Vec::new(),
        }
    }
}

/// The partition `p`, opened (created) if it is not yet, and counted as replicated.
fn open_replica<'a>(
    partitions: &'a mut [Option<Partition>],
    log: &super::LogSetup,
    replication: &mut Option<Replication>,
    p: PartitionId,
) -> Option<&'a mut Partition> {
    let slot = partitions.get_mut(usize::from(p))?;
    if slot.is_none() {
        match Store::open(log.config_of(p)) {
            Ok((store, _)) => *slot = Some(Partition::new(store)),
            Err(e) => {
                tracing::error!(partition = p, error = %e, "cannot open a replica's log");
                return None;
            }
        }
    }
    if let Some(r) = replication.as_mut() {
        if !r.replicated.contains(&p) {
            r.replicated.push(p);
        }
    }
    slot.as_mut()
}

/// The bytes an output holds (for the bound on held outputs).
fn output_bytes(p: &Pending) -> usize {
    let payload = match &p.msg {
        BusMsg::Deliver { ws_message, .. } => ws_message.len(),
        BusMsg::Push(fanout) => fanout.users.len() * 16 + 256,
        _ => 0,
    };
    std::mem::size_of::<Pending>() + payload
}

impl Owner {
    /// Replicates this shard's partitions as `setup` says (a cluster node with replicas).
    pub fn set_replication(&mut self, setup: ReplicationSetup) {
        self.replication = Some(Replication::new(setup));
    }

    /// Acts on a replication message (see [`BusMsg`]'s replication variants).
    pub(super) fn handle_replication(&mut self, msg: BusMsg) {
        let now = Instant::now();
        let Some(node) = self.replication.as_ref().map(|r| r.setup.node) else {
            tracing::warn!("replication message on a node that does not replicate");
            return;
        };
        match msg {
            BusMsg::Role(change) => self.role_change(*change, node, now),
            BusMsg::LogData(data) => self.on_log_data(&data),
            BusMsg::ReplicaAck(ack) => self.on_replica_ack(&ack, now),
            BusMsg::EpochQuery(query) => {
                let p = usize::from(query.partition);
                let answer = match self.partitions.get_mut(p).and_then(Option::as_mut) {
                    Some(Partition {
                        store,
                        role: Some(Role::Lead(leader)),
                        ..
                    }) => leader.answer(&query, store),
                    _ => None,
                };
                if let (Some(answer), Some(r)) = (answer, self.replication.as_mut()) {
                    r.outbox.push((query.node, BusMsg::EpochAnswer(answer)));
                }
            }
            BusMsg::EpochAnswer(answer) => self.on_epoch_answer(&answer, now),
            other => debug_assert!(false, "not a replication message: {other:?}"),
        }
    }

    fn role_change(&mut self, change: RoleChange, node: u16, now: Instant) {
        let p = change.partition();
        if !matches!(change, RoleChange::Isr { .. }) {
            // A log may be opened or dropped: its cmids join or leave the shard's budget.
            self.cmids.mark_stale();
        }
        let shard = self.shard as u16;
        match change {
            RoleChange::Lead {
                epoch,
                replicas,
                isr,
                ..
            } => {
                let was_leading = self.map.shard_of_partition(u32::from(p)) == Some(self.shard);
                let lag_max_ms = self.replication.as_ref().map_or(0, |r| r.setup.lag_max_ms);
                let Some(partition) =
                    open_replica(&mut self.partitions, &self.log, &mut self.replication, p)
                else {
                    return;
                };
                let this = ThisNode { node, lag_max_ms };
                let leader =
                    match Leader::start(p, epoch, replicas, isr, &mut partition.store, this, now) {
                        Ok(leader) => leader,
                        Err(e) => {
                            tracing::error!(partition = p, error = %e, "cannot take the lead");
                            return;
                        }
                    };
                partition.role = Some(Role::Lead(Box::new(leader)));
                if !was_leading {
                    // A takeover: the log holds what the old leader had; conversation ids go
                    // on after its greatest, and its shops' queues and counts are rebuilt.
                    partition.conv_counter = partition
                        .store
                        .conv_max()
                        .map_or(1, |max| crate::bus::partitions::conv_counter(max) + 1);
                    let store = &partition.store;
                    shop::restore_into(&mut self.dispatcher, std::iter::once(store));
                    tracing::info!(shard, partition = p, epoch, "partition taken over");
                    if let Some(r) = self.replication.as_mut() {
                        r.taken_over.push(p);
                    }
                }
                self.map.set(p, Some(shard), true);
            }
            RoleChange::Follow { leader, epoch, .. } => {
                let was_leading = self.map.shard_of_partition(u32::from(p)) == Some(self.shard);
                // Requests stop at once: the map says another node leads it now. Held turns
                // of the partition are answered `unavailable` when they come up.
                self.map.set(p, Some(shard), false);
                if was_leading {
                    let map = Arc::clone(&self.map);
                    self.dispatcher.forget(|s| map.partition_of(&s) == p);
                    tracing::info!(shard, partition = p, epoch, leader, "partition demoted");
                }
                let Some(partition) =
                    open_replica(&mut self.partitions, &self.log, &mut self.replication, p)
                else {
                    return;
                };
                let mut follower = Follower::new(p, leader, epoch, node, now);
                if let Some(r) = self.replication.as_mut() {
                    follower.query(&partition.store, now, &mut r.outbox);
                }
                partition.role = Some(Role::Follow(follower));
            }
            RoleChange::Isr { epoch, isr, .. } => {
                if let Some(Partition {
                    role: Some(Role::Lead(leader)),
                    ..
                }) = self
                    .partitions
                    .get_mut(usize::from(p))
                    .and_then(Option::as_mut)
                {
                    if leader.epoch == epoch {
                        leader.on_isr(isr);
                    }
                }
            }
            RoleChange::Drop { .. } => {
                self.map.set(p, None, false);
                let map = Arc::clone(&self.map);
                self.dispatcher.forget(|s| map.partition_of(&s) == p);
                if let Some(mut partition) = self
                    .partitions
                    .get_mut(usize::from(p))
                    .and_then(Option::take)
                {
                    if let Err(e) = partition.store.sync() {
                        tracing::error!(partition = p, error = %e, "final flush of a dropped partition failed");
                    }
                }
                if let Some(r) = self.replication.as_mut() {
                    r.replicated.retain(|&q| q != p);
                }
            }
        }
    }

    fn on_log_data(&mut self, data: &LogData) {
        let p = data.partition;
        let Some(Partition {
            store,
            role: Some(Role::Follow(follower)),
            ..
        }) = self
            .partitions
            .get_mut(usize::from(p))
            .and_then(Option::as_mut)
        else {
            return;
        };
        match follower.on_data(data, store) {
            Followed::Nothing => {}
            Followed::Appended => {
                self.mark_written(p);
                self.ack_due(p);
            }
            Followed::AckNow => self.ack_due(p),
            Followed::Truncate(_) => debug_assert!(false, "records never truncate"),
        }
    }

    fn on_epoch_answer(&mut self, answer: &EpochAnswer, now: Instant) {
        let p = answer.partition;
        let slot = match self.partitions.get_mut(usize::from(p)) {
            Some(slot) => slot,
            None => return,
        };
        let Some(Partition {
            store,
            role: Some(Role::Follow(follower)),
            ..
        }) = slot.as_mut()
        else {
            return;
        };
        match follower.on_answer(answer, store) {
            Followed::Nothing | Followed::Appended => {}
            Followed::AckNow => self.ack_due(p),
            Followed::Truncate(to) => {
                let Some(mut partition) = slot.take() else {
                    return;
                };
                let store = partition.store;
                match store.truncated(to) {
                    Ok((store, report)) => {
                        tracing::info!(
                            partition = p,
                            to,
                            records = report.records,
                            "follower log cut where it diverged from the leader"
                        );
                        partition.store = store;
                        self.cmids.mark_stale();
                        if let (Some(Role::Follow(follower)), Some(r)) =
                            (partition.role.as_mut(), self.replication.as_mut())
                        {
                            follower.query(&partition.store, now, &mut r.outbox);
                        }
                        *slot = Some(partition);
                    }
                    Err(e) => {
                        // The log is closed; the partition is not replicated here until the
                        // node restarts (and recovers it).
                        tracing::error!(partition = p, error = %e, "follower log truncation failed");
                    }
                }
            }
        }
    }

    fn on_replica_ack(&mut self, ack: &ReplicaAck, now: Instant) {
        if let Some(Partition {
            store,
            role: Some(Role::Lead(leader)),
            ..
        }) = self
            .partitions
            .get_mut(usize::from(ack.partition))
            .and_then(Option::as_mut)
        {
            leader.on_ack(ack, store.tail(), now);
        }
    }

    /// Marks `p` for this turn's commit (a follower's append; a leader's appends go through
    /// `partition_mut`).
    fn mark_written(&mut self, p: PartitionId) {
        if !self.written_mark[usize::from(p)] {
            self.written_mark[usize::from(p)] = true;
            self.written.push(p);
        }
    }

    fn ack_due(&mut self, p: PartitionId) {
        if let Some(r) = self.replication.as_mut() {
            if !r.acks_due.contains(&p) {
                r.acks_due.push(p);
            }
        }
    }

    /// What the turn wrote to led, replicated partitions: (partition, epoch, tail). Called
    /// before the commit takes `written`.
    pub(super) fn replicated_writes(&self) -> SmallVec<[(PartitionId, u64, Position); 2]> {
        let mut needs = SmallVec::new();
        if self.replication.is_none() {
            return needs;
        }
        for &p in &self.written {
            if let Some(Partition {
                store,
                role: Some(Role::Lead(leader)),
                ..
            }) = self.partitions[usize::from(p)].as_ref()
            {
                needs.push((p, leader.epoch, store.tail()));
            }
        }
        needs
    }

    /// After a successful commit: the followers' acknowledgements, the leaders' shipping and
    /// in-sync checks, the followers' retries. Appends the messages for other nodes to `out`.
    pub(super) fn replicate(&mut self, committed: bool, out: &mut Vec<(To, BusMsg)>) {
        let Some(r) = self.replication.as_mut() else {
            return;
        };
        let now = Instant::now();
        let acks_due = std::mem::take(&mut r.acks_due);
        let mut outbox = std::mem::take(&mut r.outbox);
        let leases = r.setup.leases.clone();
        for &p in &r.replicated {
            let Some(partition) = self.partitions[usize::from(p)].as_mut() else {
                continue;
            };
            match partition.role.as_mut() {
                Some(Role::Lead(leader)) => {
                    leader.ship(&partition.store, now, &mut outbox);
                    if let Some(leases) = &leases {
                        leader.check_isr(partition.store.tail(), now, leases);
                    }
                }
                Some(Role::Follow(follower)) => {
                    // Only what the store committed is acknowledged.
                    if committed && acks_due.contains(&p) {
                        outbox.push(follower.ack(&partition.store));
                    }
                    follower.tick(&partition.store, now, &mut outbox);
                }
                None => {}
            }
        }
        out.extend(outbox.into_iter().map(|(node, msg)| (To::Node(node), msg)));
    }

    /// The turn's outputs, committed: out at once, or held until the records they depend on
    /// are on every in-sync replica. Then releases, in order, every held turn that may go.
    pub(super) fn hold_or_release(
        &mut self,
        needs: SmallVec<[(PartitionId, u64, Position); 2]>,
        outputs: Vec<Pending>,
        out: &mut Vec<(To, BusMsg)>,
    ) {
        let now = Instant::now();
        let Some(r) = self.replication.as_mut() else {
            self.release(outputs, out);
            return;
        };
        if !r.setup.ack_replicated {
            let leases = r.setup.leases.clone();
            if self.leases_valid(leases.as_deref(), &needs, now) {
                self.release(outputs, out);
            } else {
                self.refuse(outputs, out, "this node lost the partition's lease");
            }
            return;
        }
        if !outputs.is_empty() {
            if needs.is_empty() && r.held.is_empty() {
                self.release(outputs, out);
            } else {
                let bytes: usize = outputs.iter().map(output_bytes).sum();
                if r.held_bytes + bytes > r.setup.held_bytes_max {
                    self.refuse(outputs, out, "too many writes wait for their replicas");
                } else {
                    r.held_bytes += bytes;
                    r.held.push_back(HeldTurn {
                        needs,
                        outputs,
                        bytes,
                    });
                }
            }
        }
        self.release_held(now, out);
    }

    /// Releases held turns from the front while each may go.
    fn release_held(&mut self, now: Instant, out: &mut Vec<(To, BusMsg)>) {
        loop {
            let Some(r) = self.replication.as_ref() else {
                return;
            };
            let Some(front) = r.held.front() else { return };
            let leases = r.setup.leases.clone();
            let mut lost = false;
            let mut waiting = false;
            for &(p, epoch, position) in &front.needs {
                match self.partitions[usize::from(p)].as_ref() {
                    Some(Partition {
                        store,
                        role: Some(Role::Lead(leader)),
                        ..
                    }) if leader.epoch == epoch => {
                        if leader.acked(store.tail()) < position {
                            waiting = true;
                        }
                    }
                    // Demoted, dropped, or led again at another epoch: never acknowledged.
                    _ => lost = true,
                }
            }
            if waiting && !lost {
                return;
            }
            let needs = front.needs.clone();
            let Some(turn) = self.replication.as_mut().and_then(|r| {
                let turn = r.held.pop_front()?;
                r.held_bytes -= turn.bytes;
                Some(turn)
            }) else {
                return;
            };
            if !lost && self.leases_valid(leases.as_deref(), &needs, now) {
                self.release(turn.outputs, out);
            } else {
                self.refuse(
                    turn.outputs,
                    out,
                    "the partition's leader changed; try again",
                );
            }
        }
    }

    fn leases_valid(
        &self,
        leases: Option<&Leases>,
        needs: &[(PartitionId, u64, Position)],
        now: Instant,
    ) -> bool {
        leases.map_or(true, |leases| {
            needs
                .iter()
                .all(|&(p, epoch, _)| leases.valid(p, epoch, now))
        })
    }

    /// Sends outputs as they are.
    pub(super) fn release(&mut self, outputs: Vec<Pending>, out: &mut Vec<(To, BusMsg)>) {
        for received in outputs.iter().filter_map(|p| p.send_received) {
            self.record_send_ok(received.elapsed().as_micros() as u64);
        }
        out.extend(outputs.into_iter().map(|p| (p.to, p.msg)));
    }

    /// Answers outputs' requests `unavailable` (`text` says why) and drops their pushes; the
    /// replies that did not depend on the log still go.
    pub(super) fn refuse(
        &mut self,
        outputs: Vec<Pending>,
        out: &mut Vec<(To, BusMsg)>,
        text: &str,
    ) {
        out.extend(
            outputs
                .into_iter()
                .filter_map(|p| match (p.if_lost, p.msg) {
                    (Some(origin), _) => {
                        let to = origin.session;
                        let ws_message = origin.error(ErrorCode::Unavailable, text);
                        Some((p.to, BusMsg::Deliver { to, ws_message }))
                    }
                    (None, BusMsg::Push(_)) => None,
                    (None, msg) => Some((p.to, msg)),
                }),
        );
    }

    /// The partitions this shard took the lead of since the last call.
    pub fn take_taken_over(&mut self) -> Vec<PartitionId> {
        self.replication
            .as_mut()
            .map(|r| std::mem::take(&mut r.taken_over))
            .unwrap_or_default()
    }

    /// Turns held for replicas now.
    pub fn held_turns(&self) -> usize {
        self.replication.as_ref().map_or(0, |r| r.held.len())
    }

    /// Bytes of outputs held for replicas now.
    pub fn held_bytes(&self) -> usize {
        self.replication.as_ref().map_or(0, |r| r.held_bytes)
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::client::Encoding;
    use chinwag_protocol::{DeviceType, History, HistoryRange, Message, Target, Uid};
    use smallvec::smallvec;

    use super::super::testing::*;
    use super::*;
    use crate::bus::Origin;

    /// Two owners of every test partition, on nodes 1 and 2, passing the messages for each
    /// other's node by hand; `cut` drops every message between them (a node link down).
    struct Two {
        nodes: [Harness; 2],
        cut: bool,
    }

    fn setup(node: u16, ack_replicated: bool, leases: Option<Arc<Leases>>) -> ReplicationSetup {
        ReplicationSetup {
            node,
            ack_replicated,
            leases,
            lag_max_ms: 2_000,
            held_bytes_max: 1 << 20,
        }
    }

    impl Two {
        /// Node 1 leads every partition at epoch 1, node 2 follows.
        fn new(ack_replicated: bool) -> Two {
            let mut nodes = [Harness::new(), Harness::new()];
            for (i, h) in nodes.iter_mut().enumerate() {
                h.owner
                    .set_replication(setup(i as u16 + 1, ack_replicated, None));
            }
            let mut two = Two { nodes, cut: false };
            two.roles(1, 1);
            two
        }

        /// Node `leader` leads every partition at `epoch`; the other follows it.
        fn roles(&mut self, leader: u16, epoch: u64) {
            for p in 0..PARTITIONS as PartitionId {
                for node in [1u16, 2] {
                    let change = if node == leader {
                        RoleChange::Lead {
                            partition: p,
                            epoch,
                            replicas: smallvec![leader, 3 - leader],
                            isr: smallvec![1, 2],
                        }
                    } else {
                        RoleChange::Follow {
                            partition: p,
                            leader,
                            epoch,
                        }
                    };
                    self.h(node).owner.handle(BusMsg::Role(Box::new(change)), 0);
                }
            }
        }

        fn h(&mut self, node: u16) -> &mut Harness {
            &mut self.nodes[usize::from(node) - 1]
        }

        /// Commits both owners and passes messages between them until none is left. Returns
        /// what each node's owner sent to its own shards.
        fn settle(&mut self) -> [Vec<(usize, BusMsg)>; 2] {
            let mut local: [Vec<(usize, BusMsg)>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..100 {
                let mut moved = false;
                for node in [1u16, 2] {
                    let out = self.h(node).owner.commit();
                    let (remote, here): (Vec<_>, Vec<_>) = out
                        .into_iter()
                        .partition(|(to, _)| matches!(to, To::Node(_)));
                    let map = test_map();
                    local[usize::from(node) - 1].extend(by_shard(here, &map));
                    for (to, msg) in remote {
                        let To::Node(target) = to else { unreachable!() };
                        assert_eq!(target, 3 - node, "to the other node");
                        if !self.cut {
                            self.h(target).owner.handle(msg, 0);
                            moved = true;
                        }
                    }
                }
                if !moved {
                    return local;
                }
            }
            panic!("the nodes never settle");
        }

        fn login(&mut self, node: u16, uid: Uid) -> Origin {
            let session = self.h(node).new_session();
            self.h(node).owner.handle(
                BusMsg::Register {
                    session,
                    uid,
                    device_type: DeviceType::Web,
                },
                1,
            );
            let out = self.settle();
            let device = registered(&out[usize::from(node) - 1], session).expect("registered");
            Origin {
                session,
                uid,
                device,
                encoding: Encoding::Json,
                req: Some(1),
                service: false,
                received: Instant::now(),
            }
        }

        fn history(
            &mut self,
            node: u16,
            origin: &Origin,
            conv: chinwag_protocol::ConvId,
        ) -> String {
            self.h(node).owner.handle(
                BusMsg::History {
                    origin: Box::new(*origin),
                    history: History {
                        conv,
                        range: HistoryRange::Newest,
                        limit: 50,
                    },
                },
                2,
            );
            let out = self.settle();
            replies(&out[usize::from(node) - 1], origin.session).remove(0)
        }
    }

    fn seqs_in(history: &str) -> Vec<u64> {
        match chinwag_protocol::json::decode(history).unwrap().message {
            Message::HistoryOk(ok) => ok.msgs.iter().map(|m| m.seq.0).collect(),
            other => panic!("not a history page: {other:?}"),
        }
    }

    #[test]
    fn a_send_is_acknowledged_only_once_the_follower_has_it() {
        let mut two = Two::new(true);
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "1", "hello"), 3);
        // The link is down: the record is shipped, nothing is acknowledged.
        two.cut = true;
        let out = two.settle();
        assert!(
            replies(&out[0], a.session).is_empty(),
            "held: {:?}",
            out[0].len()
        );
        assert!(pushes(&out[0]).is_empty(), "pushes are held too");
        assert_eq!(two.h(1).owner.held_turns(), 1);
        // The link is back: the follower asks again after the resend delay... here at once,
        // from its handshake's retry.
        two.cut = false;
        std::thread::sleep(std::time::Duration::from_millis(
            crate::cluster::replica::RESEND_AFTER_MS,
        ));
        let out = two.settle();
        let (conv, seq) = send_ok(&replies(&out[0], a.session));
        assert_eq!(seq, 1);
        assert_eq!(pushes(&out[0]).len(), 1, "the push goes with it");
        assert_eq!(two.h(1).owner.held_turns(), 0);
        // The follower serves no reads.
        let page = two.history(2, &a, conv);
        assert!(page.contains("unavailable"), "{page}");
    }

    #[test]
    fn a_follower_takes_over_with_every_acknowledged_message_and_the_old_leader_follows_it() {
        let mut two = Two::new(true);
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        let mut conv = None;
        for i in 0..5 {
            two.h(1)
                .owner
                .handle(send(&a, Target::User(b.uid), &i.to_string(), "x"), 3);
            let out = two.settle();
            conv = Some(send_ok(&replies(&out[0], a.session)).0);
        }
        let conv = conv.unwrap();
        // Node 1 writes one more record that never reaches node 2, then loses the lead.
        two.cut = true;
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "lost", "x"), 3);
        two.settle();
        two.roles(2, 2);
        let out = two.settle();
        assert!(
            replies(&out[0], a.session)[0].contains("unavailable"),
            "the unreplicated send is never acknowledged"
        );
        two.cut = false;
        std::thread::sleep(std::time::Duration::from_millis(
            crate::cluster::replica::QUERY_RETRY_MS,
        ));
        two.settle();
        // Node 2 serves the conversation: every acknowledged message, and seqs go on.
        assert_eq!(seqs_in(&two.history(2, &a, conv)), [1, 2, 3, 4, 5]);
        two.h(2)
            .owner
            .handle(send(&a, Target::User(b.uid), "6", "x"), 4);
        let out = two.settle();
        assert_eq!(send_ok(&replies(&out[1], a.session)), (conv, 6));
        // A retry of the lost send is stored once, now.
        two.h(2)
            .owner
            .handle(send(&a, Target::User(b.uid), "lost", "x"), 4);
        let out = two.settle();
        assert_eq!(send_ok(&replies(&out[1], a.session)), (conv, 7));
        // Node 1 cut its unacknowledged record and copied node 2's log.
        for p in 0..PARTITIONS {
            let tails: Vec<_> = (1..=2u16)
                .map(|n| {
                    two.h(n).owner.partitions[p]
                        .as_ref()
                        .map(|part| part.store.tail())
                })
                .collect();
            assert_eq!(tails[0], tails[1], "partition {p}");
        }
        // Node 1 refuses writes for the partition: it follows now.
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "8", "x"), 5);
        let out = two.settle();
        assert!(replies(&out[0], a.session)[0].contains("error"));
    }

    #[test]
    fn with_ack_leader_a_send_is_acknowledged_at_once_and_still_shipped() {
        let mut two = Two::new(false);
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        two.cut = true;
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "1", "x"), 3);
        let out = two.settle();
        assert_eq!(send_ok(&replies(&out[0], a.session)).1, 1);
    }

    #[test]
    fn an_expired_lease_acknowledges_nothing_and_serves_no_reads() {
        let mut two = Two::new(true);
        let leases = Arc::new(Leases::new(PARTITIONS));
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        two.h(1)
            .owner
            .set_replication(setup(1, true, Some(Arc::clone(&leases))));
        two.roles(1, 1);
        let p = test_map().partition_of(&crate::bus::user_pair(a.uid, b.uid));
        leases.hold(p, 1, Instant::now() + std::time::Duration::from_secs(60));
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "1", "x"), 3);
        let out = two.settle();
        let (conv, seq) = send_ok(&replies(&out[0], a.session));
        assert_eq!(seq, 1, "a valid lease");
        assert_eq!(
            seqs_in(&two.history(1, &a, conv)),
            vec![1],
            "read while it runs"
        );
        leases.lose(p);
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "2", "x"), 3);
        let out = two.settle();
        assert!(replies(&out[0], a.session)[0].contains("unavailable"));
        // Nor does it serve reads: another node may lead the partition by now.
        let page = two.history(1, &a, conv);
        assert!(page.contains("unavailable"), "{page}");
        leases.hold(p, 1, Instant::now() + std::time::Duration::from_secs(60));
        assert_eq!(seqs_in(&two.history(1, &a, conv)), vec![1], "renewed");
    }

    #[test]
    fn held_outputs_are_bounded() {
        let mut two = Two::new(true);
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        two.h(1).owner.set_replication(ReplicationSetup {
            held_bytes_max: 4 << 10,
            ..setup(1, true, None)
        });
        two.roles(1, 1);
        two.cut = true;
        let mut refused = 0;
        for i in 0..40 {
            two.h(1)
                .owner
                .handle(send(&a, Target::User(b.uid), &i.to_string(), "x"), 3);
            let out = two.settle();
            refused += replies(&out[0], a.session)
                .iter()
                .filter(|r| r.contains("unavailable"))
                .count();
        }
        assert!(refused > 0, "past the bound, writes are refused");
        let held = two.h(1).owner.replication.as_ref().unwrap().held_bytes;
        assert!(held <= 4 << 10, "{held}");
    }

    #[test]
    fn a_request_for_a_partition_moved_away_after_routing_is_answered_unavailable() {
        let mut two = Two::new(true);
        let a = two.login(1, buyer(1));
        let b = two.login(1, buyer(2));
        two.h(1)
            .owner
            .handle(send(&a, Target::User(b.uid), "1", "x"), 3);
        let out = two.settle();
        let (conv, _) = send_ok(&replies(&out[0], a.session));
        // A move takes the partition off node 1 (its shard drops it) while a read and a send
        // routed to it are on their way: both are answered unavailable (the retry goes to
        // the new leader), not not_found.
        let p = test_map().partition_of(&crate::bus::user_pair(a.uid, b.uid));
        two.h(1)
            .owner
            .handle(BusMsg::Role(Box::new(RoleChange::Drop { partition: p })), 0);
        let page = two.history(1, &a, conv);
        assert!(page.contains("unavailable"), "{page}");
        two.h(1)
            .owner
            .handle(send(&a, Target::Conv(conv), "2", "x"), 4);
        let out = two.settle();
        let reply = &replies(&out[0], a.session)[0];
        assert!(reply.contains("unavailable"), "{reply}");
    }
}
