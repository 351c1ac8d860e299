//! One node: binds the client port once per shard, opens every partition's log in the data
//! directory it holds, starts the shard threads, and turns SIGTERM (or SIGINT) into a drain.
//!
//! The shards share two things, both read-only or lock-free: the [`NodeState`] (configuration,
//! secret, metrics, drain flags) and the [`PostOffice`] (their mailboxes).

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use chinwag_protocol::{DeviceIdGenerator, NodeType};
use mio::{Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::bus::mailbox::Mailbox;
use crate::bus::post::PostOffice;
use crate::bus::{PartitionId, PartitionMap};
use crate::cluster::roles::{Leases, RoleChange};
use crate::logic::{parse_partition_dir, LogSetup, Owner};
use crate::net::listener;
use crate::operator::config::Config;
use crate::operator::data_dir::DataDir;
use crate::operator::NodeState;
use crate::shard::{Shard, WAKER};
use crate::store::{Preparer, Store, StoreConfig};

/// The directory under the data directory that holds one directory per partition's log.
pub const PARTITIONS_DIR: &str = "partitions";

/// Messages one shard's mailbox holds before senders are told it is full.
const MAILBOX_CAPACITY: usize = 64 * 1024;

/// Starts the drain of a node: raises the flag, then wakes every shard to see it.
fn drain(state: &NodeState, office: &PostOffice) {
    state.start_drain();
    office.wake_all();
}

/// Runs a node on the locked `data_dir` until SIGTERM or SIGINT has drained it. `config.shards`
/// and `config.partitions` are the resolved counts (not 0). The bound address (useful with port 0) is logged as
/// `listening addr=...`. A port taken by another node or program fails with `AddrInUse`.
pub fn serve(mut config: Config, data_dir: DataDir, jwt_secret: Vec<u8>) -> io::Result<()> {
    let shard_count = config.shards.max(1);
    let (listeners, addr, _port_claim) = listener::bind_shards(config.listen, shard_count)?;
    // The node id carries the port actually bound (the configured one may be 0).
    config.listen = addr;
    let (backend_listeners, backend_addr, _backend_claim) =
        listener::bind_shards(config.backend_listen, shard_count)?;
    config.backend_listen = backend_addr;
    // In a cluster, the node link's listener first: the registry and the NodeId then hold the
    // port actually bound (`--node-listen 127.0.0.1:0` works).
    let link_listener = match (&config.cluster, config.node_listen) {
        (Some(_), Some(link)) => {
            let listener = std::net::TcpListener::bind(link)?;
            config.node_listen = Some(listener.local_addr()?);
            Some(listener)
        }
        _ => None,
    };
    let mut polls = Vec::with_capacity(shard_count);
    let mut mailboxes = Vec::with_capacity(shard_count);
    for _ in 0..shard_count {
        let poll = Poll::new()?;
        mailboxes.push(Mailbox::new(
            MAILBOX_CAPACITY,
            Waker::new(poll.registry(), WAKER)?,
        ));
        polls.push(poll);
    }
    // A cluster node learns its partitions from the cluster's table before it opens their logs.
    let cluster = join_cluster(&config, addr, backend_addr)?;
    let map = Arc::new(match &cluster {
        Some(cluster) => cluster_map(cluster, shard_count),
        None => PartitionMap::single_node(config.partitions, shard_count),
    });
    let mut owners = match open_owners(&config, data_dir.path(), &map) {
        Ok(owners) => owners,
        Err(e) => {
            if let Some(cluster) = &cluster {
                cluster.leave();
            }
            return Err(e);
        }
    };
    let office = Arc::new(PostOffice::new(mailboxes, Arc::clone(&map)));
    let wechat = start_wechat(&config, data_dir.path(), &office, &map)?;
    for owner in &mut owners {
        owner.set_wechat(wechat.clone());
    }
    let leases = Arc::new(Leases::new(map.count()));
    let links = match (&cluster, link_listener) {
        (Some(cluster), Some(listener)) => {
            for owner in &mut owners {
                owner.set_cluster(Arc::clone(cluster));
            }
            start_replication(&config, cluster.node, &leases, &mut owners);
            Some(start_links(&config, cluster, listener, &office, &map)?)
        }
        _ => None,
    };
    // The leadership thread, once the links run (a follower's first question goes by them).
    // Its first round's role changes wait in the shards' mailboxes; the shards start once it
    // is done (or after two lease lengths without Redis: the partitions then wait for a
    // later round), so that a node serves its partitions from its first turn.
    let lease_thread = match &cluster {
        Some(cluster) => {
            let sink = Arc::new(ShardRoles::new(Arc::clone(&office)));
            let thread = cluster.start_leases(Arc::clone(&leases), sink)?;
            let deadline = std::time::Instant::now()
                + std::time::Duration::from_millis(2 * config.cluster_lease_ms);
            while thread.rounds() == 0 && std::time::Instant::now() < deadline {
                thread::sleep(std::time::Duration::from_millis(10));
            }
            Some(thread)
        }
        None => None,
    };
    let mut state = NodeState::new(config, jwt_secret, Arc::clone(&map), wechat);
    if let Some(cluster) = &cluster {
        state.node_id = cluster.node_id;
    }
    state.cluster = cluster;
    let state = Arc::new(state);

    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (signal_state, signal_office) = (Arc::clone(&state), Arc::clone(&office));
    thread::Builder::new()
        .name("chinwag-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "signal received, draining");
                drain(&signal_state, &signal_office);
            }
        })?;

    let mut shards = Vec::with_capacity(shard_count);
    let shard_parts = polls
        .into_iter()
        .zip(listeners)
        .zip(backend_listeners)
        .zip(owners);
    for (id, (((poll, listener), backend_listener), owner)) in shard_parts.enumerate() {
        let shard = Shard::new(
            id,
            Arc::clone(&state),
            Arc::clone(&office),
            poll,
            listener,
            backend_listener,
            owner,
        )?;
        let stopped = StoppedShard(Arc::clone(&state), Arc::clone(&office), id);
        let handle = thread::Builder::new()
            .name(format!("chinwag-shard-{id}"))
            .spawn(move || {
                let _stopped = stopped;
                shard.run()
            })?;
        shards.push(handle);
    }
    tracing::info!(
        %addr,
        %backend_addr,
        shards = shard_count,
        partitions = map.count(),
        echo = state.config.enable_echo,
        "listening"
    );

    let mut result = Ok(());
    for (id, handle) in shards.into_iter().enumerate() {
        let outcome = match handle.join() {
            Ok(outcome) => outcome,
            Err(_) => Err(io::Error::other(format!("shard {id} panicked"))),
        };
        if let Err(e) = outcome {
            tracing::error!(shard = id, error = %e, "shard failed");
            // One shard down: take the others down cleanly too rather than run half a node.
            drain(&state, &office);
            result = Err(e);
        }
    }
    // Gives this node's leases up so that its followers take over at once (its shards have
    // stopped acknowledging: they are done).
    if let Some(thread) = lease_thread {
        thread.drain();
    }
    // Deregisters once every session has ended (their logouts are in the queue by now).
    if let Some(cluster) = &state.cluster {
        cluster.leave();
    }
    if let Some(links) = links {
        links.stop();
    }
    result
}

/// With `--cluster`, joins it: claims the node number, registers the bound ports, reads the
/// partition table, starts the cluster's threads. A refusal the operator must fix (a number
/// held by a live node, another P, no cluster created) is an `InvalidInput` error, which the
/// binary turns into exit code 2.
fn join_cluster(
    config: &Config,
    client: std::net::SocketAddr,
    service: std::net::SocketAddr,
) -> io::Result<Option<Arc<crate::cluster::Cluster>>> {
    if config.cluster.is_none() {
        return Ok(None);
    }
    let settings = crate::cluster::JoinSettings::from_config(config, client, service);
    match crate::cluster::Cluster::join(settings) {
        Ok(cluster) => Ok(Some(cluster)),
        Err(crate::cluster::registry::JoinError::Refused(text)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, text))
        }
        Err(crate::cluster::registry::JoinError::Failed(text)) => Err(io::Error::other(text)),
    }
}

/// This node's share of the cluster's partitions: those it holds a replica of, dealt to its
/// shards round-robin; the others are "not here". None is led yet: the leadership thread's
/// `Lead` makes a shard serve a partition, once this node holds its lease.
fn cluster_map(cluster: &crate::cluster::Cluster, shards: usize) -> PartitionMap {
    let shards = shards.max(1);
    let held: Vec<u32> = (0..cluster.partitions.count())
        .filter(|&p| {
            cluster
                .partitions
                .record(p)
                .is_some_and(|r| r.leader == cluster.node || r.replicas.contains(&cluster.node))
        })
        .collect();
    let mut assignment = vec![None; cluster.partitions.count() as usize];
    for (i, &p) in held.iter().enumerate() {
        // Below `SHARDS_MAX`, which fits.
        assignment[p as usize] = Some((i % shards) as u16);
    }
    let map = PartitionMap::from_assignment(assignment, shards);
    for &p in &held {
        let shard = map.replica_shard(p).map(|s| s as u16);
        // Below `PARTITIONS_MAX`, which fits.
        map.set(p as PartitionId, shard, false);
    }
    map
}

/// Makes the owners replicate their partitions: the leadership thread tells them their roles
/// (through [`ShardRoles`]), `leases` holds its deadlines.
fn start_replication(config: &Config, node: u16, leases: &Arc<Leases>, owners: &mut [Owner]) {
    let setup = crate::logic::ReplicationSetup {
        node,
        ack_replicated: config.ack == crate::operator::config::AckPolicy::Replicated,
        leases: Some(Arc::clone(leases)),
        lag_max_ms: config.replica_lag_max_ms,
        held_bytes_max: HELD_BYTES_MAX,
    };
    for owner in owners.iter_mut() {
        owner.set_replication(setup.clone());
    }
}

/// Where the leadership thread sends role changes: each to the mailbox of the shard that
/// holds (or takes) the partition. Never blocks: a change that finds the mailbox full waits
/// here, with every later one (they must arrive in order), and is posted again at the next
/// change or round of the thread.
pub struct ShardRoles {
    office: Arc<PostOffice>,
    waiting: Mutex<VecDeque<RoleChange>>,
}

impl ShardRoles {
    pub fn new(office: Arc<PostOffice>) -> ShardRoles {
        ShardRoles {
            office,
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    /// Posts the waiting changes, oldest first, until one finds its mailbox full.
    fn post_waiting(&self, waiting: &mut VecDeque<RoleChange>) {
        while let Some(change) = waiting.pop_front() {
            if let Err(change) = self.office.post_role(change) {
                waiting.push_front(change);
                return;
            }
        }
    }
}

impl crate::cluster::roles::RoleSink for ShardRoles {
    fn changed(&self, change: RoleChange) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.push_back(change);
        self.post_waiting(&mut waiting);
        if !waiting.is_empty() {
            tracing::warn!(
                waiting = waiting.len(),
                "role changes wait: a shard's mailbox is full"
            );
        }
    }

    fn tick(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        self.post_waiting(&mut waiting);
    }
}

/// Bytes of outputs one shard holds at most while their records reach the replicas.
const HELD_BYTES_MAX: usize = 64 << 20;

/// The node links of a cluster node, and the thread that keeps their peers in step with the
/// registry.
struct NodeLinks {
    thread: crate::cluster::link::LinkThread,
    watcher_stop: Arc<std::sync::atomic::AtomicBool>,
    watcher: thread::JoinHandle<()>,
}

impl NodeLinks {
    /// Stops the watcher, then the links (the node is done).
    fn stop(self) {
        self.watcher_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.watcher.join();
        self.thread.stop();
    }
}

/// Starts the node links on `listener`, delivering to the shards' mailboxes, makes the post
/// office route through them, and adds every registered peer; a watcher thread adds a peer
/// that registers later or whose address changed, every heartbeat interval.
fn start_links(
    config: &Config,
    cluster: &Arc<crate::cluster::Cluster>,
    listener: std::net::TcpListener,
    office: &Arc<PostOffice>,
    map: &Arc<PartitionMap>,
) -> io::Result<NodeLinks> {
    use crate::cluster::link::{LinkConfig, Links, OfficeInbox};
    let listen = listener.local_addr()?;
    let link_config = LinkConfig::from_config(config, &cluster.name, cluster.node, listen);
    let inbox = OfficeInbox {
        office: Arc::clone(office),
        partitions: Arc::clone(map),
    };
    let (links, thread) = Links::start_on(listener, link_config, inbox)?;
    office.join_cluster(Arc::clone(cluster), Arc::clone(&links));
    cluster.set_links(Arc::clone(&links));
    let watcher_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::clone(&watcher_stop);
    let cluster = Arc::clone(cluster);
    let interval = std::time::Duration::from_millis(config.cluster_heartbeat_interval_ms);
    // Every peer registered now is added before the shards start, so a login's first
    // request to another node finds its link (queued until the handshake). The watcher adds
    // the peers that register later.
    let mut known = std::collections::HashMap::<u16, std::net::SocketAddr>::new();
    add_new_peers(&cluster, &links, &mut known);
    let watcher = thread::Builder::new()
        .name("chinwag-cluster-links".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                crate::cluster::routes::sleep_unless_stopped(interval, &stop);
                add_new_peers(&cluster, &links, &mut known);
            }
        })?;
    Ok(NodeLinks {
        thread,
        watcher_stop,
        watcher,
    })
}

/// Adds to `links` every registered peer not in `known` or whose link address changed.
fn add_new_peers(
    cluster: &crate::cluster::Cluster,
    links: &crate::cluster::link::Links,
    known: &mut std::collections::HashMap<u16, std::net::SocketAddr>,
) {
    for peer in cluster.peers.list() {
        if peer.number == cluster.node {
            continue;
        }
        let Ok(addr) = peer.link.parse::<std::net::SocketAddr>() else {
            continue;
        };
        if known.get(&peer.number) != Some(&addr) {
            tracing::info!(node = peer.number, %addr, "node link peer");
            links.add_peer(peer.number, addr);
            known.insert(peer.number, addr);
        }
    }
}

/// Dropped when a shard's thread ends, however it ends (an error, a panic): the other shards
/// must not wait for its drain.
struct StoppedShard(Arc<NodeState>, Arc<PostOffice>, usize);

impl Drop for StoppedShard {
    fn drop(&mut self) {
        let StoppedShard(state, office, id) = self;
        drain(state, office);
        state.shard_drained(*id);
        office.wake_all();
    }
}

/// Starts the WeChat channel when the configuration has accounts. A reply that does not reach
/// WeChat is posted to its conversation's owner, which leaves a notice in the conversation; if
/// that owner's mailbox is full, the notice is lost (logged and counted as a mailbox drop would
/// be) — the reply itself stays in the conversation.
fn start_wechat(
    config: &Config,
    data_dir: &std::path::Path,
    office: &Arc<PostOffice>,
    map: &Arc<PartitionMap>,
) -> io::Result<Option<Arc<crate::wechat::channel::Channel>>> {
    let office = Arc::clone(office);
    let map = Arc::clone(map);
    let channel = crate::wechat::channel::Channel::start(
        &config.wechat,
        data_dir,
        config.fsync == crate::store::FsyncPolicy::Always,
        move |tag, undelivered| {
            let conv = chinwag_protocol::ConvId(tag.conv);
            let msg =
                crate::bus::BusMsg::WechatUndelivered(Box::new(crate::bus::WechatUndelivered {
                    conv,
                    seq: chinwag_protocol::Seq(tag.seq),
                    undelivered,
                }));
            let posted = map
                .shard_of_conv(conv)
                .is_some_and(|shard| office.post_from_outside(shard, msg).is_ok());
            if !posted {
                tracing::warn!(%conv, seq = tag.seq, "wechat notice dropped: the owner's mailbox is full");
            }
        },
    )?;
    Ok(channel.map(Arc::new))
}

/// Opens (recovering) the log of every partition of the data directory that has one, in
/// parallel, deals them to the shards as `map` says, and builds each shard's owner. Partitions
/// without a directory get one on their first write.
fn open_owners(config: &Config, dir: &Path, map: &Arc<PartitionMap>) -> io::Result<Vec<Owner>> {
    let shards = map.shards();
    if shards > crate::bus::SHARDS_MAX {
        return Err(io::Error::other(format!(
            "at most {} shards are supported",
            crate::bus::SHARDS_MAX
        )));
    }
    let root = dir.join(PARTITIONS_DIR);
    let mut template = StoreConfig::new(&root);
    template.fsync = config.fsync;
    template.fsync_interval_ms = config.fsync_interval_ms;
    template.segment_bytes = config.log_segment_bytes;
    template.segment_bytes_first = config.log_segment_bytes_first;
    template.retention_age_ms =
        (config.log_retention_age_s > 0).then(|| config.log_retention_age_s.saturating_mul(1000));
    template.retention_bytes_max =
        (config.log_retention_bytes_max > 0).then_some(config.log_retention_bytes_max);
    template.skip_corrupt = config.skip_corrupt_records;
    template.body_bytes_max = config.message_bytes_max;
    // The node's budget is shared by its shards; each shard's by its partitions, oldest cmid
    // first across them (`logic/cmid_budget.rs`), so one log may use its shard's whole share.
    template.cmid_window_entries_max = config.cmid_window_entries_max.div_ceil(shards).max(1);
    template.members_max = config.members_max;
    // One segment preparer per shard, shared by the logs of its partitions.
    let setups: Vec<LogSetup> = (0..shards)
        .map(|_| LogSetup {
            root: root.clone(),
            config: StoreConfig {
                preparer: Preparer::new(),
                ..template.clone()
            },
        })
        .collect();
    let found = existing_partitions(&root, map)?;
    let opened = open_partitions(&found, map, &setups)?;

    // One generator for the node, continuing after every device any partition registered. Its
    // cluster field is the node number (0 for the single node), so that nodes of a cluster,
    // which all mint ids, never mint the same one.
    let mut generator = DeviceIdGenerator::new(NodeType::Client, config.node)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for last in opened.iter().filter_map(|(_, store)| store.device_max()) {
        generator.resume_after(last);
    }
    let generator = Arc::new(Mutex::new(generator));
    let mut per_shard: Vec<Vec<(PartitionId, Store)>> = (0..shards).map(|_| Vec::new()).collect();
    for (p, store) in opened {
        // `existing_partitions` kept only partitions this node's shards serve.
        let shard = map.replica_shard(u32::from(p)).unwrap_or(0);
        per_shard[shard].push((p, store));
    }
    Ok(per_shard
        .into_iter()
        .zip(setups)
        .enumerate()
        .map(|(shard, (stores, setup))| {
            Owner::new(
                shard,
                Arc::clone(map),
                setup,
                stores,
                Arc::clone(&generator),
                config.reply_bytes_max(),
            )
        })
        .collect())
}

/// The partitions under `root` that have a log, ascending. A directory that names no partition
/// of this node is an error: something else writes there, or the data is not this node's.
fn existing_partitions(root: &Path, map: &PartitionMap) -> io::Result<Vec<PartitionId>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::other(format!("{}: {e}", root.display()))),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let p = name
            .to_str()
            .and_then(parse_partition_dir)
            .filter(|&p| usize::from(p) < map.count());
        match p {
            // A partition of the data that this node holds no replica of now (in a cluster,
            // it moved to other nodes): its log stays on disk, unopened.
            Some(p) if entry.path().is_dir() && map.replica_shard(u32::from(p)).is_none() => {
                tracing::info!(
                    partition = p,
                    "a log of a partition held elsewhere now left unopened"
                );
            }
            Some(p) if entry.path().is_dir() => found.push(p),
            _ => {
                return Err(io::Error::other(format!(
                    "{} is not a partition of this node's {} (docs/storage.md, \"Layout\")",
                    entry.path().display(),
                    map.count()
                )))
            }
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Opens the logs of `partitions`, a few at a time on as many threads as there are cores (a
/// restart replays each), and reports what recovery did.
fn open_partitions(
    partitions: &[PartitionId],
    map: &PartitionMap,
    setups: &[LogSetup],
) -> io::Result<Vec<(PartitionId, Store)>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(partitions.len()));
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(partitions.len());
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&p) = partitions.get(i) else {
                    return;
                };
                let shard = map.replica_shard(u32::from(p)).unwrap_or(0);
                let opened = Store::open(setups[shard].config_of(p));
                let failed = opened.is_err();
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((p, opened));
                if failed {
                    // The node will not start: let the other workers stop early.
                    next.store(partitions.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_unstable_by_key(|(p, _)| *p);
    let mut opened = Vec::with_capacity(results.len());
    let (mut records, mut bytes, mut truncated) = (0u64, 0u64, 0usize);
    let (mut from_snapshots, mut conversations, mut devices) = (0usize, 0usize, 0usize);
    for (p, result) in results {
        let (store, report) =
            result.map_err(|e| io::Error::other(format!("partition {p} log: {e}")))?;
        for (pos, len) in &report.skipped {
            tracing::error!(
                partition = p,
                position = pos,
                bytes = len,
                "skipped a corrupt stretch of the log (--skip-corrupt-records)"
            );
        }
        for (path, why) in &report.snapshots_rejected {
            tracing::warn!(partition = p, path = %path.display(), reason = %why, "snapshot not used");
        }
        // What the partition starts with: the snapshot's state plus the records replayed
        // after it (a restart after a snapshot replays few or none).
        let stats = store.stats();
        tracing::debug!(
            partition = p,
            snapshot = ?report.snapshot,
            records_replayed = report.records,
            conversations = stats.conversations,
            devices = stats.devices,
            truncated = report.truncated.is_some(),
            "partition log recovered"
        );
        from_snapshots += usize::from(report.snapshot.is_some());
        conversations += stats.conversations;
        devices += stats.devices;
        records += report.records;
        bytes += report.bytes;
        truncated += usize::from(report.truncated.is_some());
        opened.push((p, store));
    }
    tracing::info!(
        partitions = opened.len(),
        from_snapshots,
        conversations,
        devices,
        records_replayed = records,
        bytes_replayed = bytes,
        torn_tails_cut = truncated,
        "logs recovered"
    );
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role change that finds its shard's mailbox full is not lost: it waits, with every
    /// later one, and all arrive in order once there is room.
    #[test]
    fn role_changes_wait_for_a_full_mailbox_and_arrive_in_order() {
        use crate::cluster::roles::RoleSink;
        let poll = Poll::new().unwrap();
        let mailbox = Mailbox::new(2, Waker::new(poll.registry(), WAKER).unwrap());
        let map = Arc::new(PartitionMap::single_node(8, 1));
        let office = Arc::new(PostOffice::new(vec![mailbox], map));
        let roles = ShardRoles::new(Arc::clone(&office));
        let arrived = |office: &PostOffice| {
            let mut got = Vec::new();
            office.mailbox(0).drain(100, |msg| match msg {
                crate::bus::BusMsg::Role(change) => got.push(change.partition()),
                other => panic!("{other:?}"),
            });
            got
        };
        for p in 0..5 {
            roles.changed(RoleChange::Drop { partition: p });
        }
        assert_eq!(arrived(&office), [0, 1], "the mailbox holds two");
        roles.tick();
        assert_eq!(arrived(&office), [2, 3]);
        roles.changed(RoleChange::Drop { partition: 5 });
        assert_eq!(arrived(&office), [4, 5], "after the waiting ones");
        roles.tick();
        assert!(arrived(&office).is_empty());
    }

    #[test]
    fn the_partitions_with_a_log_are_found_and_anything_else_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(PARTITIONS_DIR);
        let map = PartitionMap::single_node(256, 2);
        assert!(existing_partitions(&root, &map).unwrap().is_empty());
        for p in ["00017", "00003", "00255"] {
            std::fs::create_dir_all(root.join(p)).unwrap();
        }
        assert_eq!(existing_partitions(&root, &map).unwrap(), [3, 17, 255]);
        for junk in ["00256", "17", "shard-0"] {
            std::fs::create_dir(root.join(junk)).unwrap();
            let err = existing_partitions(&root, &map).unwrap_err().to_string();
            assert!(err.contains(junk) && err.contains("256"), "{err}");
            std::fs::remove_dir(root.join(junk)).unwrap();
        }
    }

    /// Every partition's log is opened (in parallel), dealt to its shard, and the device ids
    /// go on after the greatest of all of them.
    #[test]
    fn open_owners_recovers_every_partition_for_any_shard_count() {
        use chinwag_protocol::{DeviceType, Uid, UidKind};
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            log_segment_bytes: 1 << 20,
            ..Config::default()
        };
        let map = Arc::new(PartitionMap::single_node(16, 2));
        assert_eq!(open_owners(&config, dir.path(), &map).unwrap().len(), 2);
        assert!(
            !dir.path().join(PARTITIONS_DIR).exists(),
            "opening creates no log"
        );
        // Logs in three partitions, one device each, written directly; the ids are from a
        // day ahead, so the node's next id must come from resuming after them.
        let mut ahead = DeviceIdGenerator::new(NodeType::Client, 0).unwrap();
        let tomorrow_s = crate::logic::unix_ms() / 1000 + 86_400;
        let mut greatest = 0;
        for (p, id) in [(1u16, 5u64), (6, 9), (11, 7)] {
            let mut store_config = StoreConfig::new("");
            store_config.dir = crate::logic::partition_dir(&dir.path().join(PARTITIONS_DIR), p);
            store_config.segment_bytes = 1 << 20;
            let (mut store, _) = Store::open(store_config).unwrap();
            let device = ahead.next(DeviceType::Web, tomorrow_s).unwrap();
            let uid = Uid::new(UidKind::Buyer, id);
            store.register_device(uid, DeviceType::Web, device).unwrap();
            store.commit().unwrap();
            greatest = greatest.max(device.get());
        }
        for shards in [1, 3] {
            let map = Arc::new(PartitionMap::single_node(16, shards));
            let found = existing_partitions(&dir.path().join(PARTITIONS_DIR), &map).unwrap();
            let mut owners = open_owners(&config, dir.path(), &map).unwrap();
            assert_eq!(owners.len(), shards);
            for (shard, owner) in owners.iter().enumerate() {
                let here = found.iter().filter(|&&p| usize::from(p) % shards == shard);
                assert_eq!(
                    owner.log_stats().partitions,
                    here.count(),
                    "{shards}/{shard}"
                );
            }
            let devices: usize = owners.iter().map(|o| o.log_stats().devices).sum();
            assert!(devices >= 3, "{devices}");
            // A new device, wherever its user lives, gets an id after every stored one.
            let uid = Uid::new(UidKind::Buyer, 1000 + shards as u64);
            let shard = map.shard_of(&uid).unwrap();
            let session = crate::bus::SessionRef {
                node: 0,
                shard: 0,
                slot: 1,
                generation: 1,
            };
            let owner = &mut owners[shard];
            owner.handle(
                crate::bus::BusMsg::Register {
                    session,
                    uid,
                    device_type: DeviceType::Ios,
                },
                0,
            );
            let device = owner
                .commit()
                .into_iter()
                .find_map(|(_, m)| match m {
                    crate::bus::BusMsg::Registered { device, .. } => device,
                    _ => None,
                })
                .expect("registered");
            assert!(device.get() > greatest, "{device:?}");
        }
    }
}
