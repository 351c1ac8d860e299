//! `chinwag cluster ...`: create a cluster in Redis and look at it (docs/cluster.md).

use std::process::ExitCode;
use std::time::Duration;

use chinwag_engine::cluster::redis_conn::RedisTarget;
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
    /// Print the cluster: its metadata, every registered node and whether it is alive, which
    /// partitions each node leads, and per group of partitions their leader, epoch, replicas,
    /// in-sync set and lease holder.
    Show,
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
        ClusterOp::Show => match show(&target) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
    }
}

fn show(target: &RedisTarget) -> Result<String, String> {
    use std::fmt::Write;
    let mut c = target
        .connect()
        .map_err(|e| format!("cannot reach Redis at {}: {e}", target.url))?;
    let Some(meta) = registry::load_meta(&mut c)? else {
        return Err(format!("no cluster in Redis at {}", target.url));
    };
    let table = PartitionTable::load(&mut c, meta.partitions)?;
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
    let _ = writeln!(out, "nodes:");
    for p in &peers {
        let id = p.id.map_or("-".to_string(), |id| id.to_string());
        let _ = writeln!(
            out,
            "  {} {} id={id} client={} service={} link={} routes={}",
            p.number,
            if p.alive { "alive" } else { "down" },
            p.client,
            p.service,
            p.link,
            p.routes
        );
    }
    let _ = writeln!(out, "leaders (node: partitions it leads):");
    for (node, ranges) in table.summary() {
        let _ = writeln!(out, "  {node}: {ranges}");
    }
    let _ = writeln!(out, "partitions:");
    for (ranges, line) in registry::describe_partitions(&table, &holders) {
        let _ = writeln!(out, "  {ranges}: {line}");
    }
    Ok(out)
}

fn fail(error: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("chinwag: {error}");
    ExitCode::from(code)
}
