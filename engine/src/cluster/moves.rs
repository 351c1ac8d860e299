//! Moving partition replicas between nodes (`chinwag cluster add-node` / `retire-node`,
//! docs/cluster.md "Adding and retiring nodes"): the plan, and the Redis calls of each step.
//!
//! A move is Kafka's reassignment in two steps per partition, each one fenced by the
//! partition's epoch:
//! 1. the operator's command records the partition's **target** replica set
//!    (`chinwag:targets`, [`set_targets`]), planned so that the fewest replicas move;
//! 2. the partition's leader (its leadership thread, `cluster::lease`) adds the target's new
//!    nodes to the replica set at epoch + 1 ([`grow`]): they follow, copy the log, and the
//!    leader asks for each to join the in-sync set once it has caught up;
//! 3. once every node of the target is in sync, the leader makes the target the replica set
//!    at epoch + 1 ([`shrink`]); a leader that is not in the target hands the leadership over
//!    in the same script to the target's first node in sync and alive. The nodes that left
//!    are told `Drop`.
//!
//! The command only writes targets, so it returns at once, is safe to run again (a plan is
//! made from the targets already recorded: the same command plans nothing more), and
//! whatever happens to it, the leaders finish the moves. Each leader also hands its
//! leadership to the partition's preferred replica (the first of its set) once that one is
//! in sync ([`handoff`]), unless `cluster_preferred_leader` is off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::redis_conn::{eval, RedisTarget};
use super::redis_keys::{self as keys};
use super::registry::{self, PartitionTable};
use super::roles::Replicas;

/// Per partition, its replica set once the moves under way are done.
pub fn assignments(table: &PartitionTable) -> Vec<Replicas> {
    (0..table.count())
        .filter_map(|p| table.assignment(p).cloned())
        .collect()
}

/// Replicas and first places (preferred leaderships) per node in `sets`.
fn loads(sets: &[Replicas]) -> BTreeMap<u16, (usize, usize)> {
    let mut load: BTreeMap<u16, (usize, usize)> = BTreeMap::new();
    for set in sets {
        for (i, &n) in set.iter().enumerate() {
            let entry = load.entry(n).or_default();
            entry.0 += 1;
            if i == 0 {
                entry.1 += 1;
            }
        }
    }
    load
}

/// The replica sets that give node `node` its fair share of `sets`' replicas (their total
/// over the nodes, rounded down) and of first places (P over the nodes, rounded down), by
/// replacing replicas of the most loaded nodes, one at a time, while that makes the load more
/// even: the fewest replicas move, and every set keeps its size. A node that has its share
/// already gets nothing more (the plan of a second run is the first's result).
pub fn plan_add(sets: &[Replicas], node: u16) -> Vec<Replicas> {
    let mut sets = sets.to_vec();
    let mut load = loads(&sets);
    load.entry(node).or_default();
    let nodes = load.len();
    let total: usize = sets.iter().map(|s| s.len()).sum();
    let (share, first_share) = (total / nodes, sets.len() / nodes);
    // First places: from the node with the most (then the most replicas), a partition it is
    // the first of and `node` is not a replica of.
    while load[&node].1 < first_share && load[&node].0 < share {
        let donor = load
            .iter()
            .filter(|&(&n, _)| n != node)
            .filter(|&(&n, _)| sets.iter().any(|s| s[0] == n && !s.contains(&node)))
            .max_by_key(|&(&n, &(count, first))| (first, count, std::cmp::Reverse(n)))
            .map(|(&n, &l)| (n, l));
        let Some((donor, (_, first))) = donor else {
            break;
        };
        if first <= load[&node].1 + 1 {
            break;
        }
        let p = sets
            .iter()
            .position(|s| s[0] == donor && !s.contains(&node))
            .expect("the donor was chosen for having such a partition");
        sets[p][0] = node;
        move_load(&mut load, donor, node, true);
    }
    // Other places: from the node with the most replicas, a place that is not first if it
    // has one.
    while load[&node].0 < share {
        let donor = load
            .iter()
            .filter(|&(&n, _)| n != node)
            .filter(|&(&n, _)| sets.iter().any(|s| s.contains(&n) && !s.contains(&node)))
            .max_by_key(|&(&n, &(count, _))| (count, std::cmp::Reverse(n)))
            .map(|(&n, &l)| (n, l));
        let Some((donor, (count, _))) = donor else {
            break;
        };
        if count <= load[&node].0 + 1 {
            break;
        }
        let place = |first: bool| {
            sets.iter().enumerate().find_map(|(p, s)| {
                let i = s.iter().position(|&n| n == donor)?;
                ((i == 0) == first && !s.contains(&node)).then_some((p, i))
            })
        };
        let (p, i) = place(false)
            .or_else(|| place(true))
            .expect("the donor was chosen for having such a partition");
        sets[p][i] = node;
        move_load(&mut load, donor, node, i == 0);
    }
    sets
}

fn move_load(load: &mut BTreeMap<u16, (usize, usize)>, from: u16, to: u16, first: bool) {
    let source = load.entry(from).or_default();
    source.0 -= 1;
    source.1 -= usize::from(first);
    let target = load.entry(to).or_default();
    target.0 += 1;
    target.1 += usize::from(first);
}

/// The replica sets without node `node`: each of its replicas goes to the node of `sets` or
/// `spare` (nodes that may take replicas though they hold none yet) with the fewest replicas
/// that is not in the set yet (the lowest number among equals). Where `node` was first, the
/// next replica (in sync already) becomes first and the new one goes last; elsewhere the new
/// one takes its place. Fails if a partition has no node left to take it.
pub fn plan_retire(sets: &[Replicas], node: u16, spare: &[u16]) -> Result<Vec<Replicas>, String> {
    let mut sets = sets.to_vec();
    let mut load: BTreeMap<u16, usize> = loads(&sets).into_iter().map(|(n, l)| (n, l.0)).collect();
    for &n in spare {
        load.entry(n).or_default();
    }
    load.remove(&node);
    for (p, set) in sets.iter_mut().enumerate() {
        let Some(i) = set.iter().position(|&n| n == node) else {
            continue;
        };
        let Some((&taker, _)) = load
            .iter()
            .filter(|(n, _)| !set.contains(n))
            .min_by_key(|&(&n, &count)| (count, n))
        else {
            return Err(format!(
                "partition {p}: no node left to take node {node}'s replica (its {} replicas \
                 need {} other nodes): add a node first",
                set.len(),
                set.len()
            ));
        };
        if i == 0 {
            set.remove(0);
            set.push(taker);
        } else {
            set[i] = taker;
        }
        *load.entry(taker).or_default() += 1;
    }
    Ok(sets)
}

/// What a command planned: per partition that moves, its set before and its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub moves: Vec<(u32, Replicas, Replicas)>,
}

/// Plans with `plan` from the table in Redis and records the targets, again if another
/// command changed a target meanwhile (at most a few times). Returns what it recorded (no
/// moves: nothing was to change).
pub fn plan_and_record(
    target: &RedisTarget,
    plan: impl Fn(&PartitionTable, &mut redis::Connection) -> Result<Vec<Replicas>, String>,
) -> Result<Planned, String> {
    let mut c = target
        .connect()
        .map_err(|e| format!("cannot reach Redis at {}: {e}", target.url))?;
    let Some(meta) = registry::load_meta(&mut c)? else {
        return Err(format!("no cluster in Redis at {}", target.url));
    };
    for _ in 0..5 {
        let table = PartitionTable::load(&mut c, meta.partitions)?;
        let before = assignments(&table);
        let after = plan(&table, &mut c)?;
        let moves: Vec<(u32, Replicas, Replicas)> = (0..table.count())
            .zip(before.into_iter().zip(after))
            .filter(|(_, (from, to))| from != to)
            .map(|(p, (from, to))| (p, from, to))
            .collect();
        if moves.is_empty() {
            return Ok(Planned { moves });
        }
        if set_targets(&mut c, &moves).map_err(|e| e.to_string())? >= 0 {
            return Ok(Planned { moves });
        }
    }
    Err("the partition table kept changing while planning: run the command again".into())
}

/// Records `moves` (partition, the set planned from, its target) in one script call, all or
/// nothing ([`keys::SET_TARGETS_SCRIPT`]); -1 when a partition's set is no longer the one
/// planned from.
pub fn set_targets(
    c: &mut redis::Connection,
    moves: &[(u32, Replicas, Replicas)],
) -> redis::RedisResult<i64> {
    let mut args = Vec::with_capacity(moves.len() * 3);
    for (p, from, to) in moves {
        args.push(p.to_string());
        args.push(keys::node_list(from));
        args.push(keys::node_list(to));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eval(
        c,
        keys::SET_TARGETS_SCRIPT,
        &[keys::PARTITIONS, keys::TARGETS],
        &args,
    )
}

/// `chinwag cluster add-node N`: targets that give node `node` its fair share (a node
/// retired earlier is not retired any more).
pub fn add_node(target: &RedisTarget, node: u16) -> Result<Planned, String> {
    check_node(node)?;
    plan_and_record(target, |table, c| {
        redis::cmd("SREM")
            .arg(keys::RETIRED)
            .arg(node)
            .query::<()>(c)
            .map_err(|e| e.to_string())?;
        Ok(plan_add(&assignments(table), node))
    })
}

/// `chinwag cluster retire-node N`: targets without node `node`, its replicas going to the
/// other nodes that hold replicas or are registered, alive and not retired. Records `node`
/// as retired (`add-node` takes it back).
pub fn retire_node(target: &RedisTarget, node: u16) -> Result<Planned, String> {
    check_node(node)?;
    plan_and_record(target, |table, c| {
        let retired: Vec<u16> = redis::cmd("SMEMBERS")
            .arg(keys::RETIRED)
            .query(c)
            .map_err(|e| e.to_string())?;
        let spare: Vec<u16> = registry::read_peers(c)
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|p| p.alive && p.number != node && !retired.contains(&p.number))
            .map(|p| p.number)
            .collect();
        let sets = plan_retire(&assignments(table), node, &spare)?;
        redis::cmd("SADD")
            .arg(keys::RETIRED)
            .arg(node)
            .query::<()>(c)
            .map_err(|e| e.to_string())?;
        Ok(sets)
    })
}

fn check_node(node: u16) -> Result<(), String> {
    if (1..=keys::NODE_MAX).contains(&node) {
        Ok(())
    } else {
        Err(format!("node must be 1..={}", keys::NODE_MAX))
    }
}

/// Per node, the replicas it holds now and the ones it will hold once the moves are done
/// (for `show`: a node at 0 and 0 holds nothing and may be stopped).
pub fn replica_counts(table: &PartitionTable) -> HashMap<u16, (usize, usize)> {
    let mut counts: HashMap<u16, (usize, usize)> = HashMap::new();
    for p in 0..table.count() {
        if let Some(record) = table.record(p) {
            for &n in &record.replicas {
                counts.entry(n).or_default().0 += 1;
            }
        }
        if let Some(set) = table.assignment(p) {
            for &n in set {
                counts.entry(n).or_default().1 += 1;
            }
        }
    }
    counts
}

/// The partitions whose move is under way.
pub fn moving(table: &PartitionTable) -> BTreeSet<u32> {
    (0..table.count())
        .filter(|&p| table.target(p).is_some())
        .collect()
}

/// Step 2 of a move ([`keys::GROW_SCRIPT`]): `node`, leading `p` at `epoch` and holding its
/// lease, adds `to`'s new nodes to the replica set. The new epoch, or 0 (refused).
pub fn grow(
    c: &mut redis::Connection,
    p: u32,
    node: u16,
    epoch: u64,
    to: &[u16],
    lease: Duration,
) -> redis::RedisResult<u64> {
    let step = Step {
        p,
        node,
        epoch,
        lease,
    };
    step.run(c, keys::GROW_SCRIPT, &keys::node_list(to), &[])
}

/// Step 3 of a move ([`keys::SHRINK_SCRIPT`]): the replica set becomes `to`. The new epoch
/// and leader, or `(0, 0)` (refused).
pub fn shrink(
    c: &mut redis::Connection,
    p: u32,
    node: u16,
    epoch: u64,
    to: &[u16],
    lease: Duration,
) -> redis::RedisResult<(u64, u16)> {
    let alive: Vec<String> = to.iter().map(|&n| keys::alive(n)).collect();
    let step = Step {
        p,
        node,
        epoch,
        lease,
    };
    step.run(c, keys::SHRINK_SCRIPT, &keys::node_list(to), &alive)
}

/// The preferred leader ([`keys::HANDOFF_SCRIPT`]): `node`, leading `p` at `epoch`, hands it
/// to `successor`, its first replica. The new epoch, or 0 (refused).
pub fn handoff(
    c: &mut redis::Connection,
    p: u32,
    node: u16,
    epoch: u64,
    successor: u16,
    lease: Duration,
) -> redis::RedisResult<u64> {
    let step = Step {
        p,
        node,
        epoch,
        lease,
    };
    let alive = [keys::alive(successor)];
    step.run(c, keys::HANDOFF_SCRIPT, &successor.to_string(), &alive)
}

/// What every step script of a move is called with: the partition, the leader asking and
/// its epoch, and the lease it renews.
struct Step {
    p: u32,
    node: u16,
    epoch: u64,
    lease: Duration,
}

impl Step {
    /// Runs `script` with keys partitions, in-sync sets, targets, `p`'s lease and `more`, and
    /// arguments p, node, epoch, `what`, the lease in ms.
    fn run<T: redis::FromRedisValue>(
        &self,
        c: &mut redis::Connection,
        script: &str,
        what: &str,
        more: &[String],
    ) -> redis::RedisResult<T> {
        let args = [
            self.p.to_string(),
            self.node.to_string(),
            self.epoch.to_string(),
            what.to_string(),
            self.lease.as_millis().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let lease_key = keys::lease(self.p);
        let mut key_refs = vec![keys::PARTITIONS, keys::ISR, keys::TARGETS, &lease_key];
        key_refs.extend(more.iter().map(String::as_str));
        eval(c, script, &key_refs, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(table: &PartitionTable) -> Vec<Replicas> {
        assignments(table)
    }

    fn count(sets: &[Replicas], node: u16) -> (usize, usize) {
        loads(sets).get(&node).copied().unwrap_or_default()
    }

    #[test]
    fn a_new_node_gets_its_fair_share_of_replicas_and_first_places_with_the_fewest_moves() {
        let before = sets(&PartitionTable::placed(12, &[1, 2, 3], 2));
        let after = plan_add(&before, 4);
        // 24 replicas over 4 nodes: 6 each; 12 first places: 3 each.
        for n in 1..=4 {
            assert_eq!(count(&after, n), (6, 3), "node {n}: {after:?}");
        }
        let moved: usize = before
            .iter()
            .zip(&after)
            .map(|(b, a)| b.iter().zip(a).filter(|(x, y)| x != y).count())
            .sum();
        assert_eq!(moved, 6, "exactly node 4's share moves");
        for set in &after {
            assert_eq!(set.len(), 2);
            assert_ne!(set[0], set[1]);
        }
        // Again: nothing more.
        assert_eq!(plan_add(&after, 4), after);
    }

    #[test]
    fn retiring_a_node_moves_each_of_its_replicas_to_the_least_loaded_other_node() {
        let before = sets(&PartitionTable::placed(6, &[1, 2, 3], 2));
        let after = plan_retire(&before, 3, &[]).unwrap();
        assert_eq!(count(&after, 3), (0, 0));
        assert_eq!(count(&after, 1).0 + count(&after, 2).0, 12);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.len(), 2);
            assert_ne!(a[0], a[1]);
            if b[0] == 3 {
                // Its first place goes to the next replica, already in sync.
                assert_eq!(a[0], b[1], "{b:?} -> {a:?}");
            }
        }
        // A spare node takes them first; retiring it again plans nothing.
        let spare = plan_retire(&before, 3, &[4]).unwrap();
        assert_eq!(count(&spare, 4).0, 4);
        assert_eq!(plan_retire(&after, 3, &[]).unwrap(), after);
        // Two nodes left for three replicas each: refused.
        let three = sets(&PartitionTable::placed(3, &[1, 2, 3], 3));
        let e = plan_retire(&three, 2, &[]).unwrap_err();
        assert!(e.contains("no node left"), "{e}");
    }

    #[test]
    fn a_move_under_way_counts_as_done_for_the_next_plan() {
        let mut table = PartitionTable::placed(4, &[1, 2], 2);
        let targets: HashMap<String, String> = [("0".to_string(), "3,2".to_string())].into();
        table.set_targets(&targets);
        assert_eq!(table.assignment(0).unwrap().as_slice(), [3, 2]);
        assert_eq!(table.record(0).unwrap().replicas.as_slice(), [1, 2]);
        let counts = replica_counts(&table);
        assert_eq!(counts[&3], (0, 1));
        assert_eq!(counts[&1], (4, 3));
        assert_eq!(moving(&table).into_iter().collect::<Vec<_>>(), [0]);
    }
}
