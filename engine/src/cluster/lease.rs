//! The leadership thread (`chinwag-cluster-lease`): the control plane of replicated
//! partitions, kept in Redis (docs/cluster.md, "Replicas, leases and epochs").
//!
//! Each round (every `cluster_lease_renew_ms`) the thread, with one Redis connection whose
//! every call has a timeout:
//! 1. writes the in-sync set changes the leading shards asked for ([`Leases::request_isr`]),
//!    each only if its epoch is still the partition's (fencing);
//! 2. reads the whole partition table and the in-sync sets (one pipeline);
//! 3. renews, in one script call, the lease of every partition the table says this node leads,
//!    and writes each renewed deadline into [`Leases`]: the instant *before* it asked, plus the
//!    lease length, minus the safety margin. A renewal that fails (Redis away, the lease
//!    another's) writes nothing, so the deadline passes and the shards stop acknowledging by
//!    themselves;
//! 4. takes over, in one script call, every partition whose lease lapsed and whose in-sync
//!    set (at the current epoch) holds this node: epoch + 1, the old leader left out of the
//!    in-sync set until it catches up.
//!    Then, for the partitions it leads, the next step of a move under way or a handover to
//!    the preferred replica ([`super::moves`]), one fenced script each;
//! 5. tells the shards what changed for this node through the [`RoleSink`], per partition in
//!    order (`Lead`, `Follow`, `Isr`, `Drop`), and keeps [`PartitionOwners`] (what
//!    `Cluster::partition_owner` answers) current;
//! 6. publishes the lag the leading shards report of their followers
//!    ([`Leases::report_lag`]) in `chinwag:node:N:lag`.
//!
//! It never waits for a shard (the sink must not block) and no shard waits for it. Redis away:
//! no renewal and no takeover; the leaders' deadlines pass. Redis back: a leader whose lease
//! is still its own (or free, with the table still naming it at its epoch) renews it; one that
//! lost it is told to follow. A *restarted* node does not lead on with a lease its earlier run
//! still holds when an in-sync follower can take over: it deletes that lease, so the follower
//! takes over at once with epoch + 1, and it follows (a process that died may have lost or
//! half-written anything; its followers were in sync). After connecting, the thread takes nothing over for one lease
//! length, so that a leader that reconnects a little later is not deposed for Redis's outage.
//!
//! Entry point: [`start`] (or `Cluster::start_leases`, which passes the cluster's Redis,
//! settings and owner table); [`LeaseThread::drain`] gives this node's leases up so its
//! followers take over at once, [`LeaseThread::stop`] leaves them to lapse.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::moves;
use super::redis_conn::{eval, eval_cmd, RedisTarget};
use super::redis_keys::{self as keys, IsrRecord, PartitionRecord};
use super::registry::{PartitionEntry, PartitionOwners, PartitionTable};
use super::roles::{IsrRequest, Leases, Replicas, RoleChange, RoleSink};
use super::routes::sleep_unless_stopped;
use crate::bus::PartitionId;
use crate::operator::config::Config;

/// What the leadership thread needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// This node's number.
    pub node: u16,
    /// P.
    pub partitions: u32,
    /// How long a lease lives in Redis after a renewal.
    pub lease: Duration,
    /// How often the thread renews (and reads the table).
    pub renew: Duration,
    /// Taken off each deadline: covers a difference in clock rates between this node and
    /// Redis over one lease.
    pub margin: Duration,
    /// Hand each partition's leadership to its preferred replica (the first of its set) once
    /// that one is in sync and alive (`cluster_preferred_leader`).
    pub preferred_leader: bool,
}

impl LeaseSettings {
    /// The settings of `config` (a cluster node's).
    pub fn from_config(config: &Config) -> LeaseSettings {
        LeaseSettings {
            node: config.node,
            partitions: config.partitions as u32,
            lease: Duration::from_millis(config.cluster_lease_ms),
            renew: Duration::from_millis(config.cluster_lease_renew_ms),
            margin: Duration::from_millis(config.cluster_lease_margin_ms),
            preferred_leader: config.cluster_preferred_leader,
        }
    }
}

/// In-sync set requests taken from the shards per round, at most (each is one script call in
/// the round's pipeline). The rest wait for the next round.
const ISR_REQUESTS_PER_ROUND: usize = 1024;

/// Move steps and handovers per round, at most (each is one script call); the rest wait for
/// the next round.
const MOVES_PER_ROUND: usize = 64;

/// Rounds in a row a partition's preferred replica must be seen in sync before its leader
/// hands it the leadership: a replica that just rejoined the set gets a moment to show it
/// stays, and leaderships do not bounce while a node comes and goes.
const PREFERRED_ROUNDS: u32 = 3;

/// Preferred-leader handovers per round, at most: leaderships move back one at a time, so
/// a returning node does not take every partition's writes in one turn.
const HANDOFFS_PER_ROUND: usize = 1;

/// The running thread.
pub struct LeaseThread {
    stop: Arc<AtomicBool>,
    give_up: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl LeaseThread {
    /// Rounds done in which Redis answered every call (tests wait on it for a state).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Relaxed)
    }

    /// Stops the thread and leaves this node's leases to lapse in Redis (its deadlines in
    /// [`Leases`] pass by themselves). What a crash does; for tests, and for a node whose
    /// drain could not reach Redis anyway.
    pub fn stop(mut self) {
        self.finish(false);
    }

    /// Stops acknowledging on every partition this node leads, gives their leases up in Redis
    /// (so that their in-sync followers take over within one renewal interval instead of one
    /// lease), then stops the thread. Blocks for at most a few Redis timeouts.
    pub fn drain(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, give_up: bool) {
        self.give_up.store(give_up, Relaxed);
        self.stop.store(true, Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for LeaseThread {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Starts the leadership thread of node `settings.node` on the cluster in `target`'s Redis.
/// It writes deadlines into `leases`, sends role changes to `sink`, and keeps `owners`
/// current.
pub fn start(
    target: RedisTarget,
    settings: LeaseSettings,
    leases: Arc<Leases>,
    sink: Arc<dyn RoleSink>,
    owners: Arc<PartitionOwners>,
) -> io::Result<LeaseThread> {
    let stop = Arc::new(AtomicBool::new(false));
    let give_up = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut state = LeaseState {
        target,
        settings,
        leases,
        sink,
        owners,
        told: vec![Told::Nothing; settings.partitions as usize],
        held: BTreeMap::new(),
        declined: HashMap::new(),
        pending_isr: BTreeMap::new(),
        preferred_seen: HashMap::new(),
        lag_published: false,
        connection: None,
        takeover_after: Instant::now(),
        backoff: Duration::from_millis(50),
        next_attempt: Instant::now(),
    };
    let (thread_stop, thread_give_up, thread_rounds) =
        (Arc::clone(&stop), Arc::clone(&give_up), Arc::clone(&rounds));
    let handle = std::thread::Builder::new()
        .name("chinwag-cluster-lease".into())
        .spawn(move || {
            while !thread_stop.load(Relaxed) {
                let started = Instant::now();
                if state.round() {
                    thread_rounds.fetch_add(1, Relaxed);
                }
                let next = started + state.settings.renew;
                sleep_unless_stopped(next.saturating_duration_since(Instant::now()), &thread_stop);
            }
            if thread_give_up.load(Relaxed) {
                state.give_up();
            }
        })?;
    Ok(LeaseThread {
        stop,
        give_up,
        rounds,
        handle: Some(handle),
    })
}

/// What this node last told its shards about a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    /// Nothing: not a replica (or nothing told yet).
    Nothing,
    /// Leads it at `epoch`, with the in-sync set `isr` as last told.
    Lead { epoch: u64, isr: Replicas },
    /// Follows `leader` at `epoch`.
    Follow { leader: u16, epoch: u64 },
}

/// The thread's state between rounds.
struct LeaseState {
    target: RedisTarget,
    settings: LeaseSettings,
    leases: Arc<Leases>,
    sink: Arc<dyn RoleSink>,
    owners: Arc<PartitionOwners>,
    /// Per partition, what the shards were told.
    told: Vec<Told>,
    /// The partitions whose lease this node holds in Redis, and at which epoch.
    held: BTreeMap<u32, u64>,
    /// Partitions whose lease an earlier run of this node held and this process gave up, and
    /// until when it does not take them again (if no follower took them by then, their
    /// followers are away: this node leads them again).
    declined: HashMap<u32, Instant>,
    /// In-sync set requests not yet written (the latest per partition).
    pending_isr: BTreeMap<PartitionId, IsrRequest>,
    /// Per partition this node leads: rounds in a row its preferred replica (another node)
    /// was seen in sync.
    preferred_seen: HashMap<u32, u32>,
    /// This node's lag hash in Redis holds something.
    lag_published: bool,
    connection: Option<redis::Connection>,
    /// No takeover before this (one lease after connecting).
    takeover_after: Instant,
    backoff: Duration,
    next_attempt: Instant,
}

impl LeaseState {
    /// One round. Returns whether Redis answered all of it.
    fn round(&mut self) -> bool {
        self.sink.tick();
        while let Some(request) = self.leases.next_isr_request() {
            self.pending_isr.insert(request.partition, request);
        }
        if self.connection.is_none() {
            if Instant::now() < self.next_attempt {
                return false;
            }
            match self.target.connect() {
                Ok(c) => {
                    self.connection = Some(c);
                    self.backoff = Duration::from_millis(50);
                    self.takeover_after = Instant::now() + self.settings.lease;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster leases: Redis unreachable");
                    self.next_attempt = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(super::routes::BACKOFF_MAX);
                    return false;
                }
            }
        }
        match self.round_connected() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cluster leases: Redis call failed; leases not renewed");
                self.connection = None;
                self.next_attempt = Instant::now() + self.backoff;
                false
            }
        }
    }

    fn round_connected(&mut self) -> Result<(), String> {
        let node = self.settings.node;
        let Some(c) = self.connection.as_mut() else {
            return Ok(());
        };
        // 1. In-sync set changes, each fenced by its epoch.
        let requests: Vec<IsrRequest> = self
            .pending_isr
            .values()
            .take(ISR_REQUESTS_PER_ROUND)
            .cloned()
            .collect();
        let mut answered: Vec<PartitionId> = Vec::new();
        if !requests.is_empty() {
            let mut pipe = redis::pipe();
            for request in &requests {
                pipe.add_command(isr_cmd(
                    u32::from(request.partition),
                    request.epoch,
                    node,
                    &request.isr,
                ));
            }
            let outcomes: Vec<i64> = pipe.query(c).map_err(|e| e.to_string())?;
            for (request, outcome) in requests.iter().zip(outcomes) {
                self.pending_isr.remove(&request.partition);
                if outcome == 0 {
                    tracing::info!(
                        partition = request.partition,
                        epoch = request.epoch,
                        "cluster leases: in-sync set change refused: the epoch is not current"
                    );
                } else {
                    if outcome < 0 {
                        tracing::warn!(
                            partition = request.partition,
                            isr = ?request.isr,
                            "cluster leases: in-sync set change refused: not a set of replicas with the leader"
                        );
                    }
                    answered.push(request.partition);
                }
            }
        }
        // 2. The table.
        let mut table = PartitionTable::load(c, self.settings.partitions)?;
        // 3. Renew what the table says this node leads (but not, for one lease, what this
        //    process gave up as an earlier run's: its in-sync follower takes it meanwhile).
        let now = Instant::now();
        self.declined.retain(|_, until| *until > now);
        let leading: Vec<(u32, u64, bool)> = (0..table.count())
            .filter(|p| !self.declined.contains_key(p))
            .filter_map(|p| {
                table
                    .get(p)
                    .filter(|e| e.node == node)
                    .map(|e| (p, e.epoch))
            })
            .map(|(p, epoch)| (p, epoch, self.held.get(&p) == Some(&epoch)))
            .collect();
        let mut holding: HashMap<u32, u64> = HashMap::new();
        if !leading.is_empty() {
            let before = Instant::now();
            let renewed =
                renew(c, node, self.settings.lease, &leading).map_err(|e| e.to_string())?;
            let until = deadline(&self.settings, before);
            for (&(p, epoch, _), renewal) in leading.iter().zip(renewed) {
                match renewal {
                    Renewal::Held => {
                        self.leases.hold(p as PartitionId, epoch, until);
                        self.held.insert(p, epoch);
                        holding.insert(p, epoch);
                    }
                    Renewal::GivenUp => {
                        tracing::info!(
                            partition = p,
                            epoch,
                            "cluster leases: gave up an earlier run's lease to an in-sync follower"
                        );
                        self.declined.insert(p, before + self.settings.lease);
                    }
                    Renewal::Lost => {
                        if self.held.remove(&p).is_some() {
                            self.leases.lose(p as PartitionId);
                            self.leases.clear_lag(p as PartitionId);
                        }
                    }
                }
            }
        }
        // 4. Take over lapsed leases of partitions this node is in sync for.
        if Instant::now() >= self.takeover_after {
            let candidates: Vec<u32> = (0..table.count())
                .filter(|&p| {
                    let (Some(record), Some(isr)) = (table.record(p), table.isr(p)) else {
                        return false;
                    };
                    record.leader != node
                        && record.replicas.contains(&node)
                        && isr.epoch == record.epoch
                        && isr.isr.contains(&node)
                })
                .collect();
            if !candidates.is_empty() {
                let before = Instant::now();
                let taken =
                    take(c, node, self.settings.lease, &candidates).map_err(|e| e.to_string())?;
                let until = deadline(&self.settings, before);
                for (&p, epoch) in candidates.iter().zip(taken) {
                    if epoch == 0 {
                        continue;
                    }
                    tracing::info!(
                        partition = p,
                        epoch,
                        "cluster leases: took the leadership of a partition whose lease lapsed"
                    );
                    self.leases.hold(p as PartitionId, epoch, until);
                    self.held.insert(p, epoch);
                    holding.insert(p, epoch);
                    table.took_over(p, node, epoch);
                }
            }
        }
        // 4b. Moves under way, and leaderships back to their preferred replicas.
        let moved = step_moves(
            c,
            &self.settings,
            &self.leases,
            &mut self.held,
            &mut self.preferred_seen,
            &table,
            &mut holding,
        )
        .map_err(|e| e.to_string())?;
        if moved {
            table = PartitionTable::load(c, self.settings.partitions)?;
        }
        // 5. Tell the shards, keep the owners current.
        for p in 0..table.count() {
            let (Some(record), Some(isr)) = (table.record(p), table.isr(p)) else {
                continue;
            };
            self.owners.set(
                p,
                PartitionEntry {
                    node: record.leader,
                    epoch: record.epoch,
                },
            );
            let id = p as PartitionId;
            let held = holding.get(&p) == Some(&record.epoch);
            let answer = answered.contains(&id);
            let changes = decide(
                node,
                id,
                record,
                isr,
                held,
                answer,
                &mut self.told[p as usize],
            );
            for change in changes {
                if !matches!(change, RoleChange::Lead { .. } | RoleChange::Isr { .. })
                    && self.held.remove(&p).is_some()
                {
                    self.leases.lose(id);
                    self.leases.clear_lag(id);
                }
                self.sink.changed(change);
            }
        }
        // 6. Publish the lag of the followers of the partitions this node leads.
        let mut lag = redis::pipe();
        lag.cmd("DEL").arg(keys::lag(node)).ignore();
        let mut published = false;
        for (&p, &epoch) in &holding {
            let followers = self.leases.lag(p as PartitionId);
            if followers.is_empty() || table.get(p).map(|e| e.epoch) != Some(epoch) {
                continue;
            }
            lag.cmd("HSET")
                .arg(keys::lag(node))
                .arg(p)
                .arg(keys::lag_entry(&followers))
                .ignore();
            published = true;
        }
        if published || self.lag_published {
            if published {
                lag.cmd("PEXPIRE")
                    .arg(keys::lag(node))
                    .arg(lag_ttl(&self.settings).as_millis() as u64)
                    .ignore();
            }
            lag.query::<()>(c).map_err(|e| e.to_string())?;
            self.lag_published = published;
        }
        Ok(())
    }

    /// Stops acknowledging everywhere, then deletes this node's leases that are still its
    /// own. Best effort: a Redis that does not answer leaves them to lapse.
    fn give_up(&mut self) {
        let held = std::mem::take(&mut self.held);
        for &p in held.keys() {
            self.leases.lose(p as PartitionId);
        }
        if held.is_empty() {
            return;
        }
        let connection = match self.connection.take() {
            Some(c) => Ok(c),
            None => self.target.connect(),
        };
        let node = self.settings.node;
        let lease_keys: Vec<String> = held.keys().map(|&p| keys::lease(p)).collect();
        let holders: Vec<String> = held
            .values()
            .map(|&epoch| keys::partition_entry(node, epoch))
            .collect();
        let key_refs: Vec<&str> = lease_keys.iter().map(String::as_str).collect();
        let arg_refs: Vec<&str> = holders.iter().map(String::as_str).collect();
        let result = connection.and_then(|mut c| {
            eval::<i64>(&mut c, keys::RELEASE_LEASES_SCRIPT, &key_refs, &arg_refs)
        });
        match result {
            Ok(released) => {
                tracing::info!(released, "cluster leases: gave this node's leases up")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cluster leases: could not give the leases up; they lapse after the lease"
            ),
        }
    }
}

/// The deadline of a lease asked for at `before`: the lease length, minus the margin.
fn deadline(settings: &LeaseSettings, before: Instant) -> Instant {
    before + settings.lease.saturating_sub(settings.margin)
}

/// How long a node's published lag lives in Redis: a few rounds, so a node that stops leaves
/// nothing stale for `show`.
pub fn lag_ttl(settings: &LeaseSettings) -> Duration {
    (settings.renew * 3).max(settings.lease)
}

/// Step 4b of a round: for every partition of `table` this node leads with its lease
/// (`holding`, updated), the next step of its move if one is under way ([`moves::grow`]: its
/// target's new nodes join; [`moves::shrink`]: once they are all in sync, the target becomes
/// the replica set, and a leader outside it hands the leadership over), else, with
/// `preferred_leader`, the handover to its preferred replica once that one has been seen in
/// sync for [`PREFERRED_ROUNDS`] rounds ([`moves::handoff`]). A leader that hands over stops
/// acknowledging first (as a draining one does). Returns whether anything changed (the table
/// is read again).
fn step_moves(
    c: &mut redis::Connection,
    settings: &LeaseSettings,
    leases: &Leases,
    held: &mut BTreeMap<u32, u64>,
    preferred_seen: &mut HashMap<u32, u32>,
    table: &PartitionTable,
    holding: &mut HashMap<u32, u64>,
) -> redis::RedisResult<bool> {
    let node = settings.node;
    let (mut steps, mut handoffs) = (0, 0);
    let mut changed = false;
    let led: Vec<u32> = {
        let mut led: Vec<u32> = holding.keys().copied().collect();
        led.sort_unstable();
        led
    };
    preferred_seen.retain(|p, _| holding.contains_key(p));
    for p in led {
        if steps >= MOVES_PER_ROUND {
            break;
        }
        let (Some(record), Some(isr)) = (table.record(p), table.isr(p)) else {
            continue;
        };
        if record.leader != node || holding.get(&p) != Some(&record.epoch) {
            continue;
        }
        let epoch = record.epoch;
        let in_sync: Replicas = if isr.epoch == epoch {
            isr.isr.clone()
        } else {
            Replicas::from_slice(&[node])
        };
        let id = p as PartitionId;
        if let Some(target) = table.target(p).filter(|t| **t != record.replicas) {
            preferred_seen.remove(&p);
            let added = target.iter().any(|n| !record.replicas.contains(n));
            if added {
                steps += 1;
                let before = Instant::now();
                let next = moves::grow(c, p, node, epoch, target, settings.lease)?;
                if next > 0 {
                    tracing::info!(partition = p, epoch = next, target = ?target, "cluster moves: new replicas joined the replica set");
                    leases.hold(id, next, deadline(settings, before));
                    held.insert(p, next);
                    holding.insert(p, next);
                    changed = true;
                }
            } else if target.iter().all(|n| in_sync.contains(n)) {
                steps += 1;
                let leaving = !target.contains(&node);
                if leaving {
                    leases.lose(id);
                }
                let before = Instant::now();
                let (next, leader) = moves::shrink(c, p, node, epoch, target, settings.lease)?;
                if next == 0 {
                    // Refused (a successor not alive yet, the table moved on): the next
                    // round's renewal holds the lease again if it is still this node's.
                    continue;
                }
                tracing::info!(partition = p, epoch = next, leader, replicas = ?target, "cluster moves: the replica set is the target now");
                changed = true;
                if leader == node {
                    leases.hold(id, next, deadline(settings, before));
                    held.insert(p, next);
                    holding.insert(p, next);
                } else {
                    held.remove(&p);
                    holding.remove(&p);
                    leases.clear_lag(id);
                }
            }
            continue;
        }
        let preferred = record.replicas[0];
        if !settings.preferred_leader || preferred == node || !in_sync.contains(&preferred) {
            preferred_seen.remove(&p);
            continue;
        }
        let seen = preferred_seen.entry(p).or_insert(0);
        *seen += 1;
        if *seen < PREFERRED_ROUNDS || handoffs >= HANDOFFS_PER_ROUND {
            continue;
        }
        steps += 1;
        handoffs += 1;
        leases.lose(id);
        let next = moves::handoff(c, p, node, epoch, preferred, settings.lease)?;
        if next > 0 {
            tracing::info!(
                partition = p,
                epoch = next,
                leader = preferred,
                "cluster leases: leadership handed to the preferred replica"
            );
            preferred_seen.remove(&p);
            held.remove(&p);
            holding.remove(&p);
            leases.clear_lag(id);
            changed = true;
        }
    }
    Ok(changed)
}

/// What partition `p`'s entry `record` and in-sync set `isr` mean for node `node`, given what
/// it last told its shards (`told`, updated): the role changes to send, in order. `held`: this
/// node holds the lease at the entry's epoch; `answer`: a request of its leader to change the
/// in-sync set was handled this round (it gets an `Isr` even if the set did not change).
fn decide(
    node: u16,
    p: PartitionId,
    record: &PartitionRecord,
    isr: &IsrRecord,
    held: bool,
    answer: bool,
    told: &mut Told,
) -> SmallVec<[RoleChange; 2]> {
    let mut changes = SmallVec::new();
    // A set recorded at another epoch is not this epoch's: only the leader counts then.
    let isr_now = if isr.epoch == record.epoch {
        isr.isr.clone()
    } else {
        Replicas::from_slice(&[record.leader])
    };
    if record.leader == node {
        if !held {
            // The table names this node but the lease is not its own (or Redis did not
            // answer the renewal): tell nothing; the deadline passes, the next round sees.
            return changes;
        }
        match told {
            Told::Lead { epoch, isr } if *epoch == record.epoch => {
                if *isr != isr_now || answer {
                    *isr = isr_now.clone();
                    changes.push(RoleChange::Isr {
                        partition: p,
                        epoch: record.epoch,
                        isr: isr_now,
                    });
                }
            }
            _ => {
                *told = Told::Lead {
                    epoch: record.epoch,
                    isr: isr_now.clone(),
                };
                changes.push(RoleChange::Lead {
                    partition: p,
                    epoch: record.epoch,
                    replicas: record.leader_first(),
                    isr: isr_now,
                });
            }
        }
    } else if record.replicas.contains(&node) {
        let follow = Told::Follow {
            leader: record.leader,
            epoch: record.epoch,
        };
        if *told != follow {
            *told = follow;
            changes.push(RoleChange::Follow {
                partition: p,
                leader: record.leader,
                epoch: record.epoch,
            });
        }
    } else if *told != Told::Nothing {
        *told = Told::Nothing;
        changes.push(RoleChange::Drop { partition: p });
    }
    changes
}

/// The [`keys::ISR_SCRIPT`] call for a request.
fn isr_cmd(p: u32, epoch: u64, node: u16, isr: &[u16]) -> redis::Cmd {
    let args = [
        p.to_string(),
        epoch.to_string(),
        node.to_string(),
        keys::node_list(isr),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eval_cmd(keys::ISR_SCRIPT, &[keys::PARTITIONS, keys::ISR], &args)
}

/// How [`write_isr`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsrOutcome {
    Written,
    /// The epoch is not the partition's current one, or `node` is not its leader.
    StaleEpoch,
    /// The set lacks the leader or names a node that is not a replica.
    NotReplicas,
}

/// Records `isr` as partition `p`'s in-sync set, asked by `node` leading at `epoch`, if that
/// epoch is still current (what the thread does for [`Leases::request_isr`]).
pub fn write_isr(
    connection: &mut redis::Connection,
    p: u32,
    epoch: u64,
    node: u16,
    isr: &[u16],
) -> redis::RedisResult<IsrOutcome> {
    let outcome: i64 = isr_cmd(p, epoch, node, isr).query(connection)?;
    Ok(match outcome {
        1 => IsrOutcome::Written,
        0 => IsrOutcome::StaleEpoch,
        _ => IsrOutcome::NotReplicas,
    })
}

/// How [`renew`] ended for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Held for the lease length from before the call.
    Held,
    /// Not this node's: the table moved on, or another node holds the lease.
    Lost,
    /// An earlier run of this node held it and an in-sync follower can take over: given up.
    GivenUp,
}

/// Renews the leases of `leading` (partition, epoch, whether this process holds the lease
/// already) for `node`, one script call ([`keys::RENEW_SCRIPT`]).
pub fn renew(
    connection: &mut redis::Connection,
    node: u16,
    lease: Duration,
    leading: &[(u32, u64, bool)],
) -> redis::RedisResult<Vec<Renewal>> {
    let mut lease_keys = vec![keys::PARTITIONS.to_string(), keys::ISR.to_string()];
    let mut args = vec![node.to_string(), lease.as_millis().to_string()];
    for &(p, epoch, holding) in leading {
        lease_keys.push(keys::lease(p));
        args.push(p.to_string());
        args.push(epoch.to_string());
        args.push(if holding { "0" } else { "1" }.to_string());
    }
    let key_refs: Vec<&str> = lease_keys.iter().map(String::as_str).collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let held: Vec<i64> = eval(connection, keys::RENEW_SCRIPT, &key_refs, &arg_refs)?;
    Ok(held
        .into_iter()
        .map(|h| match h {
            1 => Renewal::Held,
            2 => Renewal::GivenUp,
            _ => Renewal::Lost,
        })
        .collect())
}

/// Tries to take over `candidates` for `node`, one script call; per partition the new epoch,
/// or 0 when it was not taken.
pub fn take(
    connection: &mut redis::Connection,
    node: u16,
    lease: Duration,
    candidates: &[u32],
) -> redis::RedisResult<Vec<u64>> {
    let mut lease_keys = vec![keys::PARTITIONS.to_string(), keys::ISR.to_string()];
    let mut args = vec![node.to_string(), lease.as_millis().to_string()];
    for &p in candidates {
        lease_keys.push(keys::lease(p));
        args.push(p.to_string());
    }
    let key_refs: Vec<&str> = lease_keys.iter().map(String::as_str).collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    eval(connection, keys::TAKE_SCRIPT, &key_refs, &arg_refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> PartitionRecord {
        PartitionRecord::parse(text).unwrap()
    }

    fn isr(text: &str) -> IsrRecord {
        IsrRecord::parse(text).unwrap()
    }

    #[test]
    fn a_leader_is_told_to_lead_once_then_only_in_sync_set_changes() {
        let mut told = Told::Nothing;
        let lead = decide(
            1,
            0,
            &record("1 1 1,2"),
            &isr("1 1,2"),
            true,
            false,
            &mut told,
        );
        assert_eq!(
            lead.as_slice(),
            [RoleChange::Lead {
                partition: 0,
                epoch: 1,
                replicas: Replicas::from_slice(&[1, 2]),
                isr: Replicas::from_slice(&[1, 2]),
            }]
        );
        assert!(decide(
            1,
            0,
            &record("1 1 1,2"),
            &isr("1 1,2"),
            true,
            false,
            &mut told
        )
        .is_empty());
        let shrunk = decide(
            1,
            0,
            &record("1 1 1,2"),
            &isr("1 1"),
            true,
            false,
            &mut told,
        );
        assert_eq!(
            shrunk.as_slice(),
            [RoleChange::Isr {
                partition: 0,
                epoch: 1,
                isr: Replicas::from_slice(&[1]),
            }]
        );
        // A request answered with the set unchanged (refused as not replicas) still answers.
        let answered = decide(1, 0, &record("1 1 1,2"), &isr("1 1"), true, true, &mut told);
        assert_eq!(answered.len(), 1);
        // Without the lease: nothing told (the deadline passes by itself).
        assert!(decide(
            1,
            0,
            &record("1 2 1,2"),
            &isr("2 1,2"),
            false,
            false,
            &mut told
        )
        .is_empty());
    }

    #[test]
    fn a_follower_hears_of_each_new_leader_or_epoch_and_a_former_replica_is_dropped() {
        let mut told = Told::Nothing;
        let follow = decide(
            2,
            5,
            &record("1 1 1,2"),
            &isr("1 1,2"),
            false,
            false,
            &mut told,
        );
        assert_eq!(
            follow.as_slice(),
            [RoleChange::Follow {
                partition: 5,
                leader: 1,
                epoch: 1
            }]
        );
        assert!(decide(
            2,
            5,
            &record("1 1 1,2"),
            &isr("1 1"),
            false,
            false,
            &mut told
        )
        .is_empty());
        // Node 3 took over at epoch 2.
        let again = decide(
            2,
            5,
            &record("3 2 1,2,3"),
            &isr("2 3"),
            false,
            false,
            &mut told,
        );
        assert_eq!(
            again.as_slice(),
            [RoleChange::Follow {
                partition: 5,
                leader: 3,
                epoch: 2
            }]
        );
        let dropped = decide(
            2,
            5,
            &record("3 3 1,3"),
            &isr("3 3"),
            false,
            false,
            &mut told,
        );
        assert_eq!(dropped.as_slice(), [RoleChange::Drop { partition: 5 }]);
        assert!(decide(
            2,
            5,
            &record("3 3 1,3"),
            &isr("3 3"),
            false,
            false,
            &mut told
        )
        .is_empty());
        // A node that never was a replica is told nothing.
        let mut never = Told::Nothing;
        assert!(decide(
            4,
            5,
            &record("3 3 1,3"),
            &isr("3 3"),
            false,
            false,
            &mut never
        )
        .is_empty());
    }

    #[test]
    fn a_demoted_leader_follows_and_a_new_epoch_leads_again() {
        let mut told = Told::Nothing;
        decide(
            1,
            0,
            &record("1 1 1,2"),
            &isr("1 1,2"),
            true,
            false,
            &mut told,
        );
        let demoted = decide(
            1,
            0,
            &record("2 2 1,2"),
            &isr("2 2"),
            false,
            false,
            &mut told,
        );
        assert_eq!(
            demoted.as_slice(),
            [RoleChange::Follow {
                partition: 0,
                leader: 2,
                epoch: 2
            }]
        );
        let back = decide(
            1,
            0,
            &record("1 3 1,2"),
            &isr("3 1"),
            true,
            false,
            &mut told,
        );
        assert!(matches!(
            back.as_slice(),
            [RoleChange::Lead { epoch: 3, .. }]
        ));
        // An in-sync set of another epoch counts as the leader alone.
        let mut fresh = Told::Nothing;
        let lead = decide(
            1,
            0,
            &record("1 4 1,2"),
            &isr("3 1,2"),
            true,
            false,
            &mut fresh,
        );
        assert!(
            matches!(&lead[0], RoleChange::Lead { isr, .. } if isr.as_slice() == [1]),
            "{lead:?}"
        );
    }
}
