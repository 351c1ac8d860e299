//! The node registry, the cluster's metadata and the partition table, and the registry thread
//! that keeps this node registered and writes its routes.
//!
//! A node number is held by whoever holds its heartbeat key (`chinwag:node:N:alive`, expiring
//! after the heartbeat TTL). A starting node claims it with a script that succeeds only if the
//! key is free, so a second node started with a live node's number is refused; a node that
//! lost its key (Redis restarted, or the node could not reach it for longer than the TTL)
//! claims it again when it can, registers again and rewrites its routes. Peers' liveness is
//! read from the same keys every heartbeat.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chinwag_protocol::NodeId;
use crossbeam::channel::Receiver;

use super::health::ClusterHealth;
use super::redis_conn::{eval, RedisTarget};
use super::redis_keys::{self as keys, IsrRecord, PartitionRecord, RouteChange};
use super::roles::Replicas;
use super::routes::{self, OwnRoutes, RouteOp};
use crate::logic::unix_ms;

/// A refusal to join: `Refused` is for the operator to fix (exit code 2), `Failed` a failure
/// at run time (Redis unreachable, a malformed table; exit code 1).
#[derive(Debug)]
pub enum JoinError {
    Refused(String),
    Failed(String),
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinError::Refused(text) | JoinError::Failed(text) => f.write_str(text),
        }
    }
}

/// One partition's owner (its leader) and fencing epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionEntry {
    pub node: u16,
    pub epoch: u64,
}

/// The partition table as read at one instant: per partition its leader, epoch and replicas,
/// and its in-sync set. The node keeps the one read at join (its partition map at start);
/// the leadership thread reads it again every round and keeps [`PartitionOwners`] current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    records: Vec<PartitionRecord>,
    isr: Vec<IsrRecord>,
    /// Per partition, the replica set it is moving to (`chinwag:targets`), if a move is under
    /// way.
    targets: Vec<Option<Replicas>>,
}

impl PartitionTable {
    /// Partitions `0..P` assigned round-robin over `nodes`, one replica each, at epoch 1.
    pub fn round_robin(partitions: u32, nodes: &[u16]) -> PartitionTable {
        PartitionTable::placed(partitions, nodes, 1)
    }

    /// Partitions `0..P` with `replicas` replicas each, at epoch 1: partition p's leader is
    /// `nodes[p mod n]`, its followers the next `replicas - 1` nodes (wrapping); every replica
    /// is in sync (all are empty). `replicas` is at least 1 and at most `nodes.len()`.
    pub fn placed(partitions: u32, nodes: &[u16], replicas: usize) -> PartitionTable {
        let n = nodes.len();
        let records: Vec<PartitionRecord> = (0..partitions as usize)
            .map(|p| PartitionRecord {
                leader: nodes[p % n],
                epoch: 1,
                replicas: (0..replicas).map(|i| nodes[(p + i) % n]).collect(),
            })
            .collect();
        let isr = records
            .iter()
            .map(|r| IsrRecord {
                epoch: r.epoch,
                isr: r.replicas.clone(),
            })
            .collect();
        let targets = vec![None; records.len()];
        PartitionTable {
            records,
            isr,
            targets,
        }
    }

    /// P.
    pub fn count(&self) -> u32 {
        self.records.len() as u32
    }

    /// The leader and epoch of partition `p`.
    pub fn get(&self, p: u32) -> Option<PartitionEntry> {
        self.records.get(p as usize).map(|r| PartitionEntry {
            node: r.leader,
            epoch: r.epoch,
        })
    }

    /// Partition `p`'s whole entry: leader, epoch, replicas.
    pub fn record(&self, p: u32) -> Option<&PartitionRecord> {
        self.records.get(p as usize)
    }

    /// Partition `p`'s in-sync set as recorded.
    pub fn isr(&self, p: u32) -> Option<&IsrRecord> {
        self.isr.get(p as usize)
    }

    /// The replica set partition `p` is moving to, if a move is under way.
    pub fn target(&self, p: u32) -> Option<&Replicas> {
        self.targets.get(p as usize).and_then(Option::as_ref)
    }

    /// Partition `p`'s replica set once its move is done: its target, else its replicas.
    pub fn assignment(&self, p: u32) -> Option<&Replicas> {
        self.target(p)
            .or_else(|| self.record(p).map(|r| &r.replicas))
    }

    /// The partitions node `node` leads, ascending.
    pub fn owned_by(&self, node: u16) -> Vec<u32> {
        (0..self.count())
            .filter(|&p| self.records[p as usize].leader == node)
            .collect()
    }

    /// Reads the table of a cluster of `partitions` partitions: every entry must be there and
    /// well formed. A missing or malformed in-sync set (a layout 1 table has none) reads as
    /// the leader alone, at the entry's epoch: nobody takes such a partition over.
    pub fn load(
        connection: &mut redis::Connection,
        partitions: u32,
    ) -> Result<PartitionTable, String> {
        type Hash = HashMap<String, String>;
        let (table, isr, targets): (Hash, Hash, Hash) = redis::pipe()
            .cmd("HGETALL")
            .arg(keys::PARTITIONS)
            .cmd("HGETALL")
            .arg(keys::ISR)
            .cmd("HGETALL")
            .arg(keys::TARGETS)
            .query(connection)
            .map_err(|e| format!("reading {}: {e}", keys::PARTITIONS))?;
        let mut parsed = PartitionTable::parse(&table, &isr, partitions)?;
        parsed.set_targets(&targets);
        Ok(parsed)
    }

    /// Takes the targets of moves under way from `chinwag:targets`' contents. A malformed
    /// one, or one for a partition ≥ P, is ignored (and logged): no move is better than a
    /// move to a set nobody chose.
    pub fn set_targets(&mut self, targets: &HashMap<String, String>) {
        for (p, list) in targets {
            let slot = p
                .parse::<usize>()
                .ok()
                .and_then(|p| self.targets.get_mut(p));
            match (slot, keys::parse_node_list(list)) {
                (Some(slot), Some(nodes)) => *slot = Some(nodes),
                _ => {
                    tracing::warn!(partition = %p, target = %list, "{}: bad entry ignored", keys::TARGETS)
                }
            }
        }
    }

    /// The table from the two hashes' contents.
    pub fn parse(
        table: &HashMap<String, String>,
        isr: &HashMap<String, String>,
        partitions: u32,
    ) -> Result<PartitionTable, String> {
        let mut records = Vec::with_capacity(partitions as usize);
        let mut sets = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let key = p.to_string();
            let text = table
                .get(&key)
                .ok_or_else(|| format!("{}: partition {p} has no owner", keys::PARTITIONS))?;
            let record = PartitionRecord::parse(text).ok_or_else(|| {
                format!("{}: partition {p}: bad entry {text:?}", keys::PARTITIONS)
            })?;
            let set = isr
                .get(&key)
                .and_then(|text| IsrRecord::parse(text))
                .unwrap_or_else(|| IsrRecord {
                    epoch: record.epoch,
                    isr: Replicas::from_slice(&[record.leader]),
                });
            records.push(record);
            sets.push(set);
        }
        Ok(PartitionTable {
            targets: vec![None; records.len()],
            records,
            isr: sets,
        })
    }

    /// Records what [`keys::TAKE_SCRIPT`] wrote when `node` took partition `p` over at
    /// `epoch`: it leads, and the old leader is out of the in-sync set.
    pub fn took_over(&mut self, p: u32, node: u16, epoch: u64) {
        let (Some(record), Some(set)) = (
            self.records.get_mut(p as usize),
            self.isr.get_mut(p as usize),
        ) else {
            return;
        };
        let old = record.leader;
        record.leader = node;
        record.epoch = epoch;
        set.epoch = epoch;
        set.isr.retain(|n| *n != old);
    }

    /// The partitions each node leads, as ranges (`0-3,8`), for `chinwag cluster show`.
    pub fn summary(&self) -> Vec<(u16, String)> {
        let mut nodes: Vec<u16> = self.records.iter().map(|e| e.leader).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
            .into_iter()
            .map(|node| (node, ranges(&self.owned_by(node))))
            .collect()
    }
}

/// Every partition's leader and epoch as this node knows them now, lock-free: one atomic per
/// partition holding the leader (16 bits) and the epoch (48 bits). The post office reads it
/// for every message to another node ([`super::Cluster::partition_owner`]); the leadership
/// thread writes it from each round's table.
pub struct PartitionOwners {
    packed: Box<[AtomicU64]>,
}

/// Epochs above this do not fit [`PartitionOwners`]' 48 bits (2.8 × 10¹⁴ failovers).
pub const EPOCH_MAX: u64 = (1 << 48) - 1;

impl PartitionOwners {
    /// The owners `table` gives.
    pub fn new(table: &PartitionTable) -> PartitionOwners {
        let owners = PartitionOwners {
            packed: (0..table.count()).map(|_| AtomicU64::new(0)).collect(),
        };
        for p in 0..table.count() {
            if let Some(entry) = table.get(p) {
                owners.set(p, entry);
            }
        }
        owners
    }

    /// Partition `p`'s leader and epoch; `None` for a partition ≥ P.
    pub fn get(&self, p: u32) -> Option<PartitionEntry> {
        let packed = self.packed.get(p as usize)?.load(Acquire);
        Some(PartitionEntry {
            node: (packed >> 48) as u16,
            epoch: packed & EPOCH_MAX,
        })
    }

    /// Records `entry` as partition `p`'s (an epoch past [`EPOCH_MAX`] is kept at it).
    pub fn set(&self, p: u32, entry: PartitionEntry) {
        if let Some(slot) = self.packed.get(p as usize) {
            slot.store(
                u64::from(entry.node) << 48 | entry.epoch.min(EPOCH_MAX),
                Release,
            );
        }
    }

    /// P.
    pub fn count(&self) -> u32 {
        self.packed.len() as u32
    }
}

/// Every partition's lease holder (`"NODE EPOCH"`), or `None` where no lease is held now.
pub fn lease_holders(
    connection: &mut redis::Connection,
    partitions: u32,
) -> redis::RedisResult<Vec<Option<(u16, u64)>>> {
    let lease_keys: Vec<String> = (0..partitions).map(keys::lease).collect();
    if lease_keys.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&lease_keys).query(connection)?;
    Ok(values
        .iter()
        .map(|v| v.as_deref().and_then(keys::parse_lease_holder))
        .collect())
}

/// The replica lag the leaders among `nodes` published: per leader and partition, its
/// followers ([`keys::lag`]; a malformed entry is skipped), by partition.
pub fn read_lag(
    connection: &mut redis::Connection,
    nodes: &[u16],
) -> redis::RedisResult<Vec<(u16, u32, Vec<super::roles::ReplicaLag>)>> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for &n in nodes {
        pipe.cmd("HGETALL").arg(keys::lag(n));
    }
    let hashes: Vec<HashMap<String, String>> = pipe.query(connection)?;
    let mut out: Vec<(u16, u32, Vec<super::roles::ReplicaLag>)> = nodes
        .iter()
        .zip(hashes)
        .flat_map(|(&n, hash)| {
            hash.into_iter().filter_map(move |(p, text)| {
                Some((n, p.parse().ok()?, keys::parse_lag_entry(&text)?))
            })
        })
        .collect();
    out.sort_by_key(|&(n, p, _)| (p, n));
    Ok(out)
}

/// Each partition described in one line (leader, epoch, replicas, in-sync set, lease holder),
/// partitions with the same line grouped as ranges (`0,3,6-8`), in the order of their first
/// partition: what `chinwag cluster show` prints.
pub fn describe_partitions(
    table: &PartitionTable,
    holders: &[Option<(u16, u64)>],
) -> Vec<(String, String)> {
    let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for p in 0..table.count() {
        let (Some(record), Some(isr)) = (table.record(p), table.isr(p)) else {
            continue;
        };
        let lease = match holders.get(p as usize).copied().flatten() {
            None => "none".to_string(),
            Some((node, epoch)) if epoch == record.epoch => node.to_string(),
            Some((node, epoch)) => format!("{node} (epoch {epoch})"),
        };
        let in_sync = if isr.epoch == record.epoch {
            keys::node_list(&isr.isr)
        } else {
            format!("{} (epoch {})", keys::node_list(&isr.isr), isr.epoch)
        };
        let mut line = format!(
            "leader {} epoch {} replicas {} isr {in_sync} lease {lease}",
            record.leader,
            record.epoch,
            keys::node_list(&record.replicas)
        );
        if let Some(target) = table.target(p) {
            let _ = std::fmt::Write::write_fmt(
                &mut line,
                format_args!(" moving to {}", keys::node_list(target)),
            );
        }
        match index.get(&line) {
            Some(&i) => groups[i].1.push(p),
            None => {
                index.insert(line.clone(), groups.len());
                groups.push((line, vec![p]));
            }
        }
    }
    groups
        .into_iter()
        .map(|(line, partitions)| (ranges(&partitions), line))
        .collect()
}

/// Lines of `chinwag cluster show`'s lag section listing one partition behind each, at most.
pub const LAG_LINES_MAX: usize = 16;

/// The replica lag section of `chinwag cluster show`, from what the leaders published
/// ([`read_lag`]; only a partition's current leader's report counts, an earlier leader's
/// may still be in Redis). One line per follower node: over the partitions it follows, how
/// far behind it is at most (bytes of log its leader has and it has not acknowledged) and
/// how long ago it last had everything, at the oldest; a follower no leader reported is
/// named as such. Then the partitions whose follower is behind, furthest first, at most
/// [`LAG_LINES_MAX`]. `now_ms` is Unix ms.
pub fn describe_lag(
    table: &PartitionTable,
    lags: &[(u16, u32, Vec<super::roles::ReplicaLag>)],
    now_ms: u64,
) -> Vec<String> {
    use std::collections::BTreeMap;
    let age = |caught_up_ms: u64| now_ms.saturating_sub(caught_up_ms) as f64 / 1000.0;
    // Every follower the table names, with how many partitions it follows.
    let mut following: BTreeMap<u16, usize> = BTreeMap::new();
    for p in 0..table.count() {
        if let Some(record) = table.record(p) {
            for &n in record.replicas.iter().filter(|&&n| n != record.leader) {
                *following.entry(n).or_default() += 1;
            }
        }
    }
    // Per follower: partitions reported, (most bytes behind, its partition), oldest catch-up.
    let mut worst: BTreeMap<u16, (usize, (u64, u32), u64)> = BTreeMap::new();
    let mut behind: Vec<(u64, String)> = Vec::new();
    let mut reported = 0;
    for (leader, p, followers) in lags {
        if table.get(*p).map(|e| e.node) != Some(*leader) {
            continue;
        }
        for f in followers {
            reported += 1;
            let w = worst.entry(f.node).or_insert((0, (0, *p), u64::MAX));
            w.0 += 1;
            if f.behind_bytes > w.1 .0 {
                w.1 = (f.behind_bytes, *p);
            }
            w.2 = w.2.min(f.caught_up_ms);
            if f.behind_bytes > 0 {
                behind.push((
                    f.behind_bytes,
                    format!(
                        "  {p}: node {} behind leader {leader} by {} bytes (at {}), caught up {:.1} s ago",
                        f.node,
                        f.behind_bytes,
                        f.acked,
                        age(f.caught_up_ms)
                    ),
                ));
            }
        }
    }
    let expected: usize = following.values().sum();
    let mut out = vec![format!(
        "replica lag ({reported} of {expected} followers reported by their leaders, {} behind):",
        behind.len()
    )];
    for n in following
        .keys()
        .chain(worst.keys())
        .copied()
        .collect::<std::collections::BTreeSet<u16>>()
    {
        match worst.get(&n) {
            Some(&(count, (bytes, p), caught_up_ms)) => {
                let at = if bytes > 0 {
                    format!(" (partition {p})")
                } else {
                    String::new()
                };
                out.push(format!(
                    "  node {n}: {}, behind {bytes} bytes at most{at}, caught up {:.1} s ago at the oldest",
                    partitions(count),
                    age(caught_up_ms)
                ));
            }
            None => out.push(format!(
                "  node {n}: not reported (the leaders of its {} publish nothing: down, or leading for less than a round)",
                partitions(following[&n])
            )),
        }
    }
    if !behind.is_empty() {
        behind.sort_by_key(|b| std::cmp::Reverse(b.0));
        let shown = behind.len().min(LAG_LINES_MAX);
        out.push(if shown < behind.len() {
            format!("behind (the {shown} furthest of {}):", behind.len())
        } else {
            "behind (furthest first):".to_string()
        });
        out.extend(behind.into_iter().take(shown).map(|(_, line)| line));
    }
    out
}

/// "1 partition", "2 partitions".
fn partitions(n: usize) -> String {
    format!("{n} partition{}", if n == 1 { "" } else { "s" })
}

/// `[0, 1, 2, 5]` as `0-2,5`.
fn ranges(sorted: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// The cluster's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterMeta {
    pub partitions: u32,
    pub created_ms: u64,
    /// R as `init` placed it (1 for a layout 1 cluster).
    pub replicas: u32,
}

/// Reads the metadata; `Ok(None)` when no cluster was created in this Redis.
pub fn load_meta(connection: &mut redis::Connection) -> Result<Option<ClusterMeta>, String> {
    let meta: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys::CLUSTER)
        .query(connection)
        .map_err(|e| format!("reading {}: {e}", keys::CLUSTER))?;
    if meta.is_empty() {
        return Ok(None);
    }
    let layout = meta.get("layout").and_then(|l| l.parse::<u32>().ok());
    if !layout.is_some_and(|l| keys::LAYOUTS_READ.contains(&l)) {
        return Err(format!(
            "{}: layout {layout:?}, this build reads layouts {:?}",
            keys::CLUSTER,
            keys::LAYOUTS_READ
        ));
    }
    let partitions = meta
        .get("partitions")
        .and_then(|p| p.parse().ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("{}: no valid partitions field", keys::CLUSTER))?;
    Ok(Some(ClusterMeta {
        partitions,
        created_ms: meta
            .get("created_ms")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        replicas: meta
            .get("replicas")
            .and_then(|r| r.parse().ok())
            .unwrap_or(1),
    }))
}

/// The most partitions a cluster may have (each is a log directory on its owner).
pub const PARTITIONS_MAX: u32 = crate::bus::partitions::PARTITIONS_MAX as u32;

/// The replicas per partition when `init` is not told: 2 in a cluster of two nodes or more
/// (a node's loss loses nothing acknowledged), else 1.
pub fn replicas_default(nodes: usize) -> usize {
    if nodes >= 2 {
        2
    } else {
        1
    }
}

/// Creates a cluster of `partitions` partitions placed round-robin over `nodes` with
/// `replicas` replicas each ([`PartitionTable::placed`]). Fails, and changes nothing, when one
/// exists already.
pub fn init(
    target: &RedisTarget,
    nodes: &[u16],
    partitions: u32,
    replicas: usize,
) -> Result<(), String> {
    if nodes.is_empty() || nodes.iter().any(|&n| n == 0 || n > keys::NODE_MAX) {
        return Err(format!("nodes must be numbers 1..={}", keys::NODE_MAX));
    }
    let mut distinct = nodes.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != nodes.len() {
        return Err("nodes must be distinct".into());
    }
    if partitions == 0 || partitions > PARTITIONS_MAX {
        return Err(format!("partitions must be 1..={PARTITIONS_MAX}"));
    }
    let replicas_max = nodes.len().min(keys::REPLICAS_MAX);
    if replicas == 0 || replicas > replicas_max {
        return Err(format!(
            "replicas must be 1..={replicas_max} with {} nodes (each replica of a partition on \
             another node, at most {})",
            nodes.len(),
            keys::REPLICAS_MAX
        ));
    }
    let mut connection = target
        .connect()
        .map_err(|e| format!("cannot reach Redis at {}: {e}", target.url))?;
    let table = PartitionTable::placed(partitions, nodes, replicas);
    let mut args = vec![
        partitions.to_string(),
        unix_ms().to_string(),
        keys::LAYOUT.to_string(),
        replicas.to_string(),
    ];
    args.extend(table.records.iter().map(PartitionRecord::to_entry));
    args.extend(table.isr.iter().map(IsrRecord::to_entry));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome: String = eval(
        &mut connection,
        keys::INIT_SCRIPT,
        &[keys::CLUSTER, keys::PARTITIONS, keys::ISR],
        &args,
    )
    .map_err(|e| format!("creating the cluster: {e}"))?;
    if outcome == "created" {
        Ok(())
    } else {
        Err(format!(
            "a cluster exists already in {} ({outcome} partitions); nothing was changed",
            target.url
        ))
    }
}

/// A registered node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub number: u16,
    pub id: Option<NodeId>,
    /// Its client port (WebSocket, HTTP).
    pub client: String,
    /// Its service port.
    pub service: String,
    /// Its node-link address.
    pub link: String,
    /// Its heartbeat key exists.
    pub alive: bool,
    /// Routes it wrote that are still in its route set.
    pub routes: u64,
}

/// Reads every registered node.
pub fn read_peers(connection: &mut redis::Connection) -> redis::RedisResult<Vec<Peer>> {
    let mut numbers: Vec<u16> = redis::cmd("SMEMBERS")
        .arg(keys::NODES)
        .query::<Vec<String>>(connection)?
        .iter()
        .filter_map(|n| n.parse().ok())
        .filter(|n| (1..=keys::NODE_MAX).contains(n))
        .collect();
    numbers.sort_unstable();
    if numbers.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for &n in &numbers {
        pipe.cmd("HGETALL").arg(keys::node(n));
        pipe.cmd("EXISTS").arg(keys::alive(n));
        pipe.cmd("SCARD").arg(keys::node_routes(n));
    }
    type Row = (HashMap<String, String>, bool, u64);
    let rows: Vec<Row> = pipe.query(connection)?;
    Ok(numbers
        .into_iter()
        .zip(rows)
        .map(|(number, (hash, alive, routes))| {
            let field = |name: &str| hash.get(name).cloned().unwrap_or_default();
            Peer {
                number,
                id: hash.get("id").and_then(|id| id.parse().ok()),
                client: field("client"),
                service: field("service"),
                link: field("link"),
                alive,
                routes,
            }
        })
        .collect())
}

/// The registered nodes as this node last read them, and whether each is alive.
pub struct Peers {
    alive: Box<[AtomicBool]>,
    list: RwLock<Vec<Peer>>,
}

impl Default for Peers {
    fn default() -> Peers {
        Peers {
            alive: (0..=keys::NODE_MAX)
                .map(|_| AtomicBool::new(false))
                .collect(),
            list: RwLock::default(),
        }
    }
}

impl Peers {
    /// Whether node `node`'s heartbeat was there at the last read (lock-free).
    pub fn is_alive(&self, node: u16) -> bool {
        self.alive
            .get(node as usize)
            .is_some_and(|a| a.load(Relaxed))
    }

    /// Every registered node, ascending.
    pub fn list(&self) -> Vec<Peer> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets who is alive without a Redis (for tests of what reads it).
    #[cfg(test)]
    pub fn set_alive_for_tests(&self, alive: &[(u16, bool)]) {
        let peers = alive
            .iter()
            .map(|&(number, alive)| Peer {
                number,
                id: None,
                client: String::new(),
                service: String::new(),
                link: String::new(),
                alive,
                routes: 0,
            })
            .collect();
        self.set(peers);
    }

    fn set(&self, peers: Vec<Peer>) {
        for flag in self.alive.iter() {
            flag.store(false, Relaxed);
        }
        for peer in &peers {
            self.alive[peer.number as usize].store(peer.alive, Relaxed);
        }
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }
}

/// What this node registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node: u16,
    pub id: NodeId,
    pub client: SocketAddr,
    pub service: SocketAddr,
    pub link: SocketAddr,
    /// This process's random token: tells its heartbeat from an earlier or later instance's.
    pub token: String,
    pub heartbeat_ttl: Duration,
}

impl Registration {
    /// Claims the node number (or refreshes the claim). `Ok(false)`: another instance holds it.
    /// Returns whether the claim is new, in `fresh`.
    fn claim(&self, connection: &mut redis::Connection) -> redis::RedisResult<Claim> {
        let ttl = self.heartbeat_ttl.as_millis().to_string();
        let held: i64 = eval(
            connection,
            keys::CLAIM_SCRIPT,
            &[&keys::alive(self.node)],
            &[&self.token, &ttl],
        )?;
        Ok(match held {
            1 => Claim::Refreshed,
            2 => Claim::Fresh,
            _ => Claim::Taken,
        })
    }

    /// Writes the registry entry.
    fn write(&self, connection: &mut redis::Connection) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("HSET")
            .arg(keys::node(self.node))
            .arg("id")
            .arg(self.id.to_string())
            .arg("client")
            .arg(self.client.to_string())
            .arg("service")
            .arg(self.service.to_string())
            .arg("link")
            .arg(self.link.to_string())
            .arg("started_ms")
            .arg(unix_ms())
            .arg("version")
            .arg(env!("CARGO_PKG_VERSION"))
            .ignore()
            .cmd("SADD")
            .arg(keys::NODES)
            .arg(self.node)
            .ignore()
            .query(connection)
    }

    /// Gives the number up (if this instance still holds it).
    fn release(&self, connection: &mut redis::Connection) -> redis::RedisResult<()> {
        eval::<i64>(
            connection,
            keys::RELEASE_SCRIPT,
            &[&keys::alive(self.node)],
            &[&self.token],
        )
        .map(drop)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Refreshed,
    Fresh,
    Taken,
}

/// Joins at start: checks the cluster's metadata against this node's `partitions`, claims the
/// number, registers, removes the routes an earlier run of this node left, and reads the
/// partition table and the peers. Returns the connection for the registry thread, the table
/// and the cluster's metadata.
pub fn join(
    target: &RedisTarget,
    registration: &Registration,
    partitions: u32,
    peers: &Peers,
) -> Result<(redis::Connection, PartitionTable, ClusterMeta), JoinError> {
    let failed = |e: &dyn std::fmt::Display| {
        JoinError::Failed(format!("cluster: Redis at {}: {e}", target.url))
    };
    let mut connection = target.connect().map_err(|e| {
        JoinError::Failed(format!(
            "cluster: cannot reach Redis at {}: {e}",
            target.url
        ))
    })?;
    let meta = load_meta(&mut connection)
        .map_err(|e| failed(&e))?
        .ok_or_else(|| {
            JoinError::Refused(format!(
                "cluster: no cluster in Redis at {url}: create it first with `chinwag cluster \
                 init --cluster {url} --nodes 1,2,3 --partitions {partitions}`",
                url = target.url
            ))
        })?;
    if meta.partitions != partitions {
        return Err(JoinError::Refused(format!(
            "cluster: the cluster in Redis at {} has {} partitions, this node is set for {partitions}: \
             start it with --partitions {} (P is fixed when a cluster is created)",
            target.url, meta.partitions, meta.partitions
        )));
    }
    let table = PartitionTable::load(&mut connection, partitions).map_err(|e| failed(&e))?;
    let node = registration.node;
    match registration
        .claim(&mut connection)
        .map_err(|e| failed(&e))?
    {
        Claim::Taken => {
            return Err(JoinError::Refused(format!(
                "cluster: node number {node} is held by a live node (its heartbeat {} has not \
                 expired): give this node another --node, or stop the other one",
                keys::alive(node)
            )))
        }
        Claim::Fresh | Claim::Refreshed => {}
    }
    registration
        .write(&mut connection)
        .map_err(|e| failed(&e))?;
    // The routes a crashed earlier run left: this run holds no session yet.
    let stale = routes::sweep(&mut connection, node, true).map_err(|e| failed(&e))?;
    if stale > 0 {
        tracing::info!(
            routes = stale,
            "cluster: removed the routes of this node's earlier run"
        );
    }
    peers.set(read_peers(&mut connection).map_err(|e| failed(&e))?);
    Ok((connection, table, meta))
}

/// The registry thread's settings and shared state.
pub struct RegistryThread {
    pub target: RedisTarget,
    pub registration: Registration,
    pub heartbeat_interval: Duration,
    pub ops: Receiver<RouteOp>,
    pub peers: Arc<Peers>,
    pub health: Arc<ClusterHealth>,
    pub stop: Arc<AtomicBool>,
}

/// Ops taken from the queue per round, at most.
const OPS_PER_ROUND: usize = 8192;

/// How long the thread waits for ops before it looks at its clocks.
const REGISTRY_TICK: Duration = Duration::from_millis(50);

/// Dead nodes whose routes one heartbeat cleans up, at most (the rest wait for the next).
const SWEEPS_PER_HEARTBEAT: usize = 4;

impl RegistryThread {
    /// Runs until `stop`, then deregisters. `connection` is the one [`join`] used.
    pub fn run(self, connection: redis::Connection) {
        let node = self.registration.node;
        let mut own = OwnRoutes::default();
        let mut connection = Some(connection);
        self.health.redis_up.store(true, Relaxed);
        self.health.ok(unix_ms());
        let mut next_heartbeat = Instant::now() + self.heartbeat_interval;
        let mut next_attempt = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut pending: Vec<RouteChange> = Vec::new();
        loop {
            let stopping = self.stop.load(Relaxed);
            // Take what the shards posted; the mirror changes whether or not Redis answers.
            if let Ok(op) = self.ops.recv_timeout(if stopping {
                Duration::ZERO
            } else {
                REGISTRY_TICK
            }) {
                pending.extend(own.apply(op, node));
                for op in self.ops.try_iter().take(OPS_PER_ROUND) {
                    pending.extend(own.apply(op, node));
                }
            }
            if connection.is_none() {
                // Unreachable: the mirror has it all, and the reconnection rewrites it whole.
                pending.clear();
            }
            if connection.is_none() && Instant::now() >= next_attempt {
                // Back: register again and rewrite every route (Redis may have restarted
                // empty, or kept routes of sessions that ended meanwhile).
                match self.reconnect(&own) {
                    Ok(fresh) => {
                        tracing::info!(
                            routes = own.count(),
                            "cluster: Redis reached again; registered and routes rewritten"
                        );
                        connection = Some(fresh);
                        backoff = Duration::from_millis(50);
                        self.health.redis_up.store(true, Relaxed);
                        self.health.ok(unix_ms());
                    }
                    Err(e) => {
                        self.health.error("registry reconnect", &e);
                        next_attempt = Instant::now() + backoff;
                        backoff = (backoff * 2).min(routes::BACKOFF_MAX);
                    }
                }
            }
            if self.health.claim_lost.load(Relaxed) {
                // Another process has this number: its routes are not ours to overwrite. If
                // the number comes back to this node, it rewrites all of its routes then.
                pending.clear();
            }
            if let Some(c) = connection.as_mut() {
                let mut result = Ok(());
                let called = !pending.is_empty() || Instant::now() >= next_heartbeat;
                if !pending.is_empty() {
                    result = routes::write(c, &pending);
                    if result.is_ok() {
                        self.health
                            .route_writes
                            .fetch_add(pending.len() as u64, Relaxed);
                        pending.clear();
                    }
                }
                if result.is_ok() && Instant::now() >= next_heartbeat && !stopping {
                    result = self.heartbeat(c, &own);
                    next_heartbeat = Instant::now() + self.heartbeat_interval;
                }
                match result {
                    Ok(()) if called => self.health.ok(unix_ms()),
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: Redis call failed; retrying");
                        self.health.error("registry", &e);
                        self.health.redis_up.store(false, Relaxed);
                        connection = None;
                        // What was not written is rewritten whole on reconnection.
                        pending.clear();
                        next_attempt = Instant::now() + backoff;
                    }
                }
            }
            if stopping && self.ops.is_empty() {
                break;
            }
        }
        self.leave(connection);
    }

    /// A new connection, the number claimed again, the registry entry and every route
    /// rewritten.
    fn reconnect(&self, own: &OwnRoutes) -> Result<redis::Connection, String> {
        let mut c = self.target.connect().map_err(|e| e.to_string())?;
        if self.claim_checked(&mut c).map_err(|e| e.to_string())? == Claim::Taken {
            // Its registry entry and routes are the other process's now: touch neither.
            return Err(format!(
                "node number {} is held by another process",
                self.registration.node
            ));
        }
        self.registration.write(&mut c).map_err(|e| e.to_string())?;
        routes::rewrite_all(&mut c, own, self.registration.node).map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Claims the number; records a conflict in the health (another instance has it).
    fn claim_checked(&self, c: &mut redis::Connection) -> redis::RedisResult<Claim> {
        let claim = self.registration.claim(c)?;
        let taken = claim == Claim::Taken;
        if taken && !self.health.claim_lost.load(Relaxed) {
            tracing::error!(
                node = self.registration.node,
                "cluster: another instance holds this node's number; this node is not registered"
            );
        }
        self.health.claim_lost.store(taken, Relaxed);
        Ok(claim)
    }

    /// Refreshes the heartbeat (registering again if it had lapsed), reads the peers, and
    /// cleans up after dead ones.
    fn heartbeat(&self, c: &mut redis::Connection, own: &OwnRoutes) -> redis::RedisResult<()> {
        match self.claim_checked(c)? {
            Claim::Refreshed => {}
            Claim::Fresh => {
                tracing::warn!("cluster: this node's heartbeat had lapsed; registering again");
                self.registration.write(c)?;
                routes::rewrite_all(c, own, self.registration.node)?;
            }
            // The registry entry and the routes of this number are the other process's.
            Claim::Taken => {}
        }
        let peers = read_peers(c)?;
        let me = self.registration.node;
        let dead: Vec<u16> = peers
            .iter()
            .filter(|p| !p.alive && p.routes > 0 && p.number != me)
            .map(|p| p.number)
            .take(SWEEPS_PER_HEARTBEAT)
            .collect();
        self.peers.set(peers);
        for node in dead {
            // One node cleans up after a dead one; the lock lapses if it dies meanwhile.
            let lock: bool = redis::cmd("SET")
                .arg(keys::sweep_lock(node))
                .arg(me)
                .arg("NX")
                .arg("PX")
                .arg(10_000)
                .query::<Option<String>>(c)?
                .is_some();
            if lock {
                let removed = routes::sweep(c, node, false)?;
                tracing::info!(
                    node,
                    routes = removed,
                    "cluster: removed a dead node's routes"
                );
            }
        }
        Ok(())
    }

    /// Deregisters on the way out: this node's routes removed, its number given up. Best
    /// effort with the timeouts of every call: a node that cannot reach Redis leaves its
    /// heartbeat to expire and its routes to its peers' cleanup.
    fn leave(&self, connection: Option<redis::Connection>) {
        let node = self.registration.node;
        if self.health.claim_lost.load(Relaxed) {
            tracing::warn!(
                node,
                "cluster: another process holds this node's number; leaving its routes alone"
            );
            return;
        }
        let connection = match connection {
            Some(c) => Ok(c),
            None => self.target.connect(),
        };
        let result = connection.and_then(|mut c| {
            routes::sweep(&mut c, node, true)?;
            self.registration.release(&mut c)
        });
        match result {
            Ok(()) => tracing::info!(node, "cluster: deregistered"),
            Err(e) => {
                tracing::warn!(node, error = %e, "cluster: could not deregister; the heartbeat will lapse")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads_partitions_and_summarises_them_as_ranges() {
        let table = PartitionTable::round_robin(8, &[1, 2, 3]);
        assert_eq!(table.count(), 8);
        assert_eq!(table.get(0), Some(PartitionEntry { node: 1, epoch: 1 }));
        assert_eq!(table.get(4).unwrap().node, 2);
        assert_eq!(table.get(8), None);
        assert_eq!(table.owned_by(3), [2, 5]);
        assert_eq!(
            table.summary(),
            [
                (1, "0,3,6".to_string()),
                (2, "1,4,7".into()),
                (3, "2,5".into())
            ]
        );
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn replicas_follow_the_leader_round_robin_and_start_in_sync() {
        let table = PartitionTable::placed(4, &[1, 2, 3], 2);
        let replicas = |p| table.record(p).unwrap().replicas.to_vec();
        assert_eq!(replicas(0), [1, 2]);
        assert_eq!(replicas(1), [2, 3]);
        assert_eq!(replicas(2), [3, 1]);
        assert_eq!(replicas(3), [1, 2]);
        assert_eq!(table.isr(2).unwrap().isr.as_slice(), [3, 1]);
        assert_eq!(table.isr(2).unwrap().epoch, 1);
        assert_eq!(table.owned_by(1), [0, 3]);
        let all = PartitionTable::placed(2, &[4, 5, 6], 3);
        assert_eq!(all.record(1).unwrap().replicas.as_slice(), [5, 6, 4]);
        assert_eq!(replicas_default(1), 1);
        assert_eq!(replicas_default(3), 2);
    }

    #[test]
    fn a_layout_1_table_reads_as_one_replica_in_sync_alone() {
        let table: HashMap<String, String> = [("0", "1 1"), ("1", "2 3")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let table = PartitionTable::parse(&table, &HashMap::new(), 2).unwrap();
        assert_eq!(table.get(1), Some(PartitionEntry { node: 2, epoch: 3 }));
        assert_eq!(table.record(1).unwrap().replicas.as_slice(), [2]);
        let isr = table.isr(1).unwrap();
        assert_eq!((isr.epoch, isr.isr.as_slice()), (3, &[2][..]));
        let short: HashMap<String, String> = [("0".into(), "1 1".into())].into();
        let e = PartitionTable::parse(&short, &HashMap::new(), 2).unwrap_err();
        assert!(e.contains("partition 1 has no owner"), "{e}");
    }

    #[test]
    fn show_gives_each_follower_its_lag_and_lists_the_partitions_behind() {
        use crate::cluster::roles::ReplicaLag;
        // Partitions 0..4 over 1,2,3 with two replicas: 0 [1,2], 1 [2,3], 2 [3,1], 3 [1,2];
        // node 3 took 1 over from node 2.
        let mut table = PartitionTable::placed(4, &[1, 2, 3], 2);
        table.took_over(1, 3, 2);
        let now_ms = 1_000_000;
        let f = |node, acked, behind_bytes, ago_ms| ReplicaLag {
            node,
            acked,
            behind_bytes,
            caught_up_ms: now_ms - ago_ms,
        };
        let lags = vec![
            (1, 0, vec![f(2, 500, 0, 0)]),
            // Node 2's report of partition 1 from before the takeover: not its leader now.
            (2, 1, vec![f(3, 10, 90_000, 9_000)]),
            (3, 1, vec![f(2, 100, 4_000, 2_500)]),
            (1, 3, vec![f(2, 700, 300, 100)]),
        ];
        let lines = describe_lag(&table, &lags, now_ms);
        assert_eq!(
            lines,
            [
                "replica lag (3 of 4 followers reported by their leaders, 2 behind):",
                "  node 1: not reported (the leaders of its 1 partition publish nothing: down, \
                 or leading for less than a round)",
                "  node 2: 3 partitions, behind 4000 bytes at most (partition 1), caught up 2.5 s \
                 ago at the oldest",
                "behind (furthest first):",
                "  1: node 2 behind leader 3 by 4000 bytes (at 100), caught up 2.5 s ago",
                "  3: node 2 behind leader 1 by 300 bytes (at 700), caught up 0.1 s ago",
            ]
        );
        // Many partitions behind: the furthest LAG_LINES_MAX.
        let table = PartitionTable::placed(40, &[1, 2], 2);
        let lags: Vec<_> = (0..40)
            .map(|p| {
                let leader = table.get(p).unwrap().node;
                (leader, p, vec![f(3 - leader, 0, u64::from(p) + 1, 0)])
            })
            .collect();
        let lines = describe_lag(&table, &lags, now_ms);
        assert_eq!(lines.len(), 1 + 2 + 1 + LAG_LINES_MAX, "{lines:#?}");
        assert_eq!(lines[3], "behind (the 16 furthest of 40):");
        assert!(lines[4].starts_with("  39: node "), "{lines:#?}");
        assert_eq!(
            lines[1],
            "  node 1: 20 partitions, behind 40 bytes at most (partition 39), caught up 0.0 s \
             ago at the oldest"
        );
    }

    #[test]
    fn show_groups_partitions_that_read_the_same() {
        let mut table = PartitionTable::placed(6, &[1, 2, 3], 2);
        table.took_over(4, 3, 2);
        let holders = vec![
            Some((1, 1)),
            Some((2, 1)),
            None,
            Some((1, 1)),
            Some((3, 2)),
            Some((1, 3)),
        ];
        let lines = describe_partitions(&table, &holders);
        assert_eq!(
            lines,
            [
                (
                    "0,3".to_string(),
                    "leader 1 epoch 1 replicas 1,2 isr 1,2 lease 1".to_string()
                ),
                (
                    "1".into(),
                    "leader 2 epoch 1 replicas 2,3 isr 2,3 lease 2".into()
                ),
                (
                    "2".into(),
                    "leader 3 epoch 1 replicas 3,1 isr 3,1 lease none".into()
                ),
                (
                    "4".into(),
                    "leader 3 epoch 2 replicas 2,3 isr 3 lease 3".into()
                ),
                (
                    "5".into(),
                    "leader 3 epoch 1 replicas 3,1 isr 3,1 lease 1 (epoch 3)".into()
                ),
            ]
        );
    }

    #[test]
    fn partition_owners_pack_the_leader_and_the_epoch() {
        let owners = PartitionOwners::new(&PartitionTable::round_robin(3, &[1, 2]));
        assert_eq!(owners.get(2), Some(PartitionEntry { node: 1, epoch: 1 }));
        owners.set(
            2,
            PartitionEntry {
                node: 4095,
                epoch: EPOCH_MAX,
            },
        );
        assert_eq!(
            owners.get(2),
            Some(PartitionEntry {
                node: 4095,
                epoch: EPOCH_MAX
            })
        );
        assert_eq!(owners.get(1), Some(PartitionEntry { node: 2, epoch: 1 }));
        assert_eq!(owners.get(3), None);
    }
}
