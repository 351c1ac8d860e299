//! `chinwag cluster ...`: create a cluster in Redis and look at it (docs/cluster.md).

use std::process::ExitCode;
use std::time::Duration;

use chinwag_engine::cluster::moves::{self, Planned};
use chinwag_engine::cluster::redis_conn::RedisTarget;
use chinwag_engine::cluster::redis_keys as keys;
use chinwag_engine::cluster::registry::{self, PartitionTable};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// The cluster's Redis, as nodes are given it with --cluster.
    #[arg(long, value_name = "URL", env = "CHINWAG_CLUSTER")]
    cluster: String,
    /// Timeout of every Redis call.
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    op: ClusterOp,
}

#[derive(clap::Subcommand)]
enum ClusterOp {
    /// Create the cluster: its partition count and the partition table, each partition's
    /// leader and replicas placed round-robin over the nodes (partition p: leader node p mod n,
    /// followers the next R-1 nodes), every replica in sync. Refused if the Redis holds a
    /// cluster already.
    Init {
        /// The node numbers that hold partitions, comma-separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u16>,
        /// Partitions (P), fixed for the cluster's life; every node is started with the same.
        #[arg(long, default_value_t = 256)]
        partitions: u32,
        /// Replicas per partition (R), each on another node: the leader and R-1 followers.
        /// Default: 2 with two nodes or more, else 1.
        #[arg(long)]
        replicas: Option<usize>,
    },
    /// Print the cluster: its metadata, every registered node and whether it is alive, how
    /// many replicas it holds (and will hold once the moves under way are done), which
    /// partitions each node leads, per group of partitions their leader, epoch, replicas,
    /// in-sync set, lease holder and the set they are moving to, and the followers that are
    /// behind their leader.
    Show,
    /// Give node N (registered, or about to be) its fair share of the replicas and preferred
    /// leaderships: records the replica set each moving partition goes to; its leader adds N,
    /// which copies the log, and once N is in sync removes the replica N replaces (handing
    /// the leadership over first if it was the leader). Safe to run again.
    AddNode {
        /// The node number.
        node: u16,
        /// Wait at most this long for the moves to finish, printing progress (0: return once
        /// they are recorded; `show` says how they go).
        #[arg(long, value_name = "S", default_value_t = 0)]
        wait_s: u64,
    },
    /// Move every replica off node N: each partition it holds gets a replacement replica,
    /// which copies the log; once it is in sync N leaves the set (handing the leadership over
    /// first where it led). `show` says when N holds no replica any more. Safe to run again.
    RetireNode {
        /// The node number.
        node: u16,
        /// As for add-node.
        #[arg(long, value_name = "S", default_value_t = 0)]
        wait_s: u64,
    },
}

pub fn run(args: ClusterArgs) -> ExitCode {
    let target = match RedisTarget::new(&args.cluster, Duration::from_millis(args.timeout_ms)) {
        Ok(target) => target,
        Err(e) => return fail(e, 2),
    };
    match args.op {
        ClusterOp::Init {
            nodes,
            partitions,
            replicas,
        } => {
            let replicas = replicas.unwrap_or(registry::replicas_default(nodes.len()));
            match registry::init(&target, &nodes, partitions, replicas) {
                Ok(()) => {
                    println!(
                        "created a cluster of {partitions} partitions over nodes {}, {replicas} \
                         replica{} each",
                        nodes
                            .iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        if replicas == 1 { "" } else { "s" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
        ClusterOp::AddNode { node, wait_s } => {
            moved(&target, moves::add_node(&target, node), "add", node, wait_s)
        }
        ClusterOp::RetireNode { node, wait_s } => moved(
            &target,
            moves::retire_node(&target, node),
            "retire",
            node,
            wait_s,
        ),
        ClusterOp::Show => match show(&target) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
    }
}

/// Prints what `add-node` / `retire-node` recorded, and with `wait_s`, waits for the moves
/// to finish (exit 1 if they did not within it).
fn moved(
    target: &RedisTarget,
    planned: Result<Planned, String>,
    verb: &str,
    node: u16,
    wait_s: u64,
) -> ExitCode {
    let planned = match planned {
        Ok(planned) => planned,
        Err(e) => return fail(e, 1),
    };
    if planned.moves.is_empty() {
        println!("{verb} node {node}: nothing to move (its share is recorded already)");
    } else {
        println!(
            "{verb} node {node}: {} partition{} to move; their leaders move them:",
            planned.moves.len(),
            if planned.moves.len() == 1 { "" } else { "s" }
        );
        for (p, from, to) in &planned.moves {
            println!(
                "  {p}: {} -> {}",
                keys::node_list(from),
                keys::node_list(to)
            );
        }
    }
    if wait_s == 0 {
        return ExitCode::SUCCESS;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(wait_s);
    let mut last = usize::MAX;
    loop {
        let left = match pending(target) {
            Ok(left) => left,
            Err(e) => return fail(e, 1),
        };
        if left != last {
            println!("moves under way: {left}");
            last = left;
        }
        if left == 0 {
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() >= deadline {
            return fail(
                format!(
                    "{left} moves not done after {wait_s} s: they go on; `chinwag cluster show` \
                     says which (a new replica still copying, or a leader away)"
                ),
                1,
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A connection to the cluster's Redis, its metadata and its partition table.
fn load_cluster(
    target: &RedisTarget,
) -> Result<(redis::Connection, registry::ClusterMeta, PartitionTable), String> {
    let mut c = target
        .connect()
        .map_err(|e| format!("cannot reach Redis at {}: {e}", target.url))?;
    let Some(meta) = registry::load_meta(&mut c)? else {
        return Err(format!("no cluster in Redis at {}", target.url));
    };
    let table = PartitionTable::load(&mut c, meta.partitions)?;
    Ok((c, meta, table))
}

/// How many partitions are moving.
fn pending(target: &RedisTarget) -> Result<usize, String> {
    let (_, _, table) = load_cluster(target)?;
    Ok(moves::moving(&table).len())
}

fn show(target: &RedisTarget) -> Result<String, String> {
    use std::fmt::Write;
    let (mut c, meta, table) = load_cluster(target)?;
    let peers = registry::read_peers(&mut c).map_err(|e| e.to_string())?;
    let holders = registry::lease_holders(&mut c, meta.partitions).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}: {} partitions, {} replica{} each, created_ms {}",
        target.url,
        meta.partitions,
        meta.replicas,
        if meta.replicas == 1 { "" } else { "s" },
        meta.created_ms
    );
    let counts = moves::replica_counts(&table);
    let _ = writeln!(out, "nodes:");
    let mut listed: Vec<u16> = peers.iter().map(|p| p.number).collect();
    for p in &peers {
        let id = p.id.map_or("-".to_string(), |id| id.to_string());
        let _ = writeln!(
            out,
            "  {} {} id={id} client={} service={} link={} routes={} {}",
            p.number,
            if p.alive { "alive" } else { "down" },
            p.client,
            p.service,
            p.link,
            p.routes,
            holds(counts.get(&p.number).copied().unwrap_or_default())
        );
    }
    // Nodes in the table that never registered (added before they start).
    let mut unregistered: Vec<u16> = counts
        .keys()
        .copied()
        .filter(|n| !listed.contains(n))
        .collect();
    unregistered.sort_unstable();
    for n in unregistered {
        let _ = writeln!(out, "  {n} not registered {}", holds(counts[&n]));
        listed.push(n);
    }
    let _ = writeln!(out, "leaders (node: partitions it leads):");
    for (node, ranges) in table.summary() {
        let _ = writeln!(out, "  {node}: {ranges}");
    }
    let _ = writeln!(out, "partitions:");
    for (ranges, line) in registry::describe_partitions(&table, &holders) {
        let _ = writeln!(out, "  {ranges}: {line}");
    }
    let lags = registry::read_lag(&mut c, &listed).map_err(|e| e.to_string())?;
    for line in registry::describe_lag(&table, &lags, unix_ms()) {
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// A node's replicas in `show`: now, and once the moves are done; a node with none either way
/// may be stopped.
fn holds((now, after): (usize, usize)) -> String {
    match (now, after) {
        (0, 0) => "replicas=0 (holds no replica: safe to stop)".to_string(),
        (now, after) if now == after => format!("replicas={now}"),
        (now, after) => format!("replicas={now} (moving: {after} once done)"),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn fail(error: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("chinwag: {error}");
    ExitCode::from(code)
}
