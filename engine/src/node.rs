//! One node: binds the client port once per shard, opens every shard's log in the data
//! directory it holds, starts the shard threads, and turns SIGTERM (or SIGINT) into a drain.
//!
//! The shards share two things, both read-only or lock-free: the [`NodeState`] (configuration,
//! secret, metrics, drain flags) and the [`PostOffice`] (their mailboxes).

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
use crate::logic::Owner;
use crate::net::listener;
use crate::operator::config::Config;
use crate::operator::data_dir::DataDir;
use crate::operator::NodeState;
use crate::shard::{Shard, WAKER};
use crate::store::{Store, StoreConfig};

/// Messages one shard's mailbox holds before senders are told it is full.
const MAILBOX_CAPACITY: usize = 64 * 1024;

/// Starts the drain of a node: raises the flag, then wakes every shard to see it.
fn drain(state: &NodeState, office: &PostOffice) {
    state.start_drain();
    office.wake_all();
}

/// Runs a node on the locked `data_dir` until SIGTERM or SIGINT has drained it. `config.shards`
/// is the resolved count (not 0). The bound address (useful with port 0) is logged as
/// `listening addr=...`. A port taken by another node or program fails with `AddrInUse`.
pub fn serve(mut config: Config, data_dir: DataDir, jwt_secret: Vec<u8>) -> io::Result<()> {
    let shard_count = config.shards.max(1);
    let (listeners, addr, _port_claim) = listener::bind_shards(config.listen, shard_count)?;
    // The node id carries the port actually bound (the configured one may be 0).
    config.listen = addr;
    let (backend_listeners, backend_addr, _backend_claim) =
        listener::bind_shards(config.backend_listen, shard_count)?;
    config.backend_listen = backend_addr;
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
    let mut owners = open_owners(&config, data_dir.path(), shard_count)?;
    let office = Arc::new(PostOffice::new(mailboxes));
    let wechat = start_wechat(&config, data_dir.path(), &office)?;
    for owner in &mut owners {
        owner.set_wechat(wechat.clone());
    }
    let cluster = join_cluster(&config, addr, backend_addr)?;
    let mut state = NodeState::new(config, jwt_secret, shard_count, wechat);
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
    // Deregisters once every session has ended (their logouts are in the queue by now).
    if let Some(cluster) = &state.cluster {
        cluster.leave();
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
) -> io::Result<Option<Arc<crate::wechat::channel::Channel>>> {
    let office = Arc::clone(office);
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
            if office
                .post_from_outside(crate::bus::owner_of_conv(conv), msg)
                .is_err()
            {
                tracing::warn!(%conv, seq = tag.seq, "wechat notice dropped: the owner's mailbox is full");
            }
        },
    )?;
    Ok(channel.map(Arc::new))
}

/// Opens (recovering) every shard's log under the data directory and builds its owner.
///
/// Conversation ids and owners are tied to the shard count, which [`DataDir::shard_count`]
/// keeps to the one the directory was created with.
fn open_owners(config: &Config, dir: &Path, shards: usize) -> io::Result<Vec<Owner>> {
    if shards > crate::bus::SHARDS_MAX {
        return Err(io::Error::other(format!(
            "at most {} shards are supported",
            crate::bus::SHARDS_MAX
        )));
    }
    let mut stores = Vec::with_capacity(shards);
    for shard in 0..shards {
        let mut store_config = StoreConfig::new(dir.join(format!("shard-{shard}")));
        store_config.fsync = config.fsync;
        store_config.fsync_interval_ms = config.fsync_interval_ms;
        store_config.segment_bytes = config.log_segment_bytes;
        store_config.retention_age_ms = (config.log_retention_age_s > 0)
            .then(|| config.log_retention_age_s.saturating_mul(1000));
        store_config.retention_bytes_max =
            (config.log_retention_bytes_max > 0).then_some(config.log_retention_bytes_max);
        store_config.skip_corrupt = config.skip_corrupt_records;
        store_config.body_bytes_max = config.message_bytes_max;
        store_config.cmid_window_entries_max = config.cmid_window_entries_max;
        store_config.members_max = config.members_max;
        let (store, report) = Store::open(store_config)
            .map_err(|e| io::Error::other(format!("shard {shard} log: {e}")))?;
        for (pos, len) in &report.skipped {
            tracing::error!(
                shard,
                position = pos,
                bytes = len,
                "skipped a corrupt stretch of the log (--skip-corrupt-records)"
            );
        }
        // What the shard starts with: the snapshot's state plus the records replayed after it
        // (a restart after a snapshot replays few or none, so `records` alone says little).
        let stats = store.stats();
        let snapshot = report.snapshot.map_or("none".to_string(), |pos| {
            format!("segment {} offset {}", pos >> 32, pos & 0xffff_ffff)
        });
        for (path, why) in &report.snapshots_rejected {
            tracing::warn!(shard, path = %path.display(), reason = %why, "snapshot not used");
        }
        tracing::info!(
            shard,
            snapshot = %snapshot,
            records_replayed = report.records,
            bytes_replayed = report.bytes,
            conversations = stats.conversations,
            devices = stats.devices,
            truncated = report.truncated.is_some(),
            "log recovered"
        );
        stores.push(store);
    }
    // One generator for the node, continuing after every device any shard registered. Its
    // cluster field is the node number (0 for the single node), so that nodes of a cluster,
    // which all mint ids, never mint the same one.
    let mut generator = DeviceIdGenerator::new(NodeType::Client, config.node)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for last in stores.iter().filter_map(Store::device_max) {
        generator.resume_after(last);
    }
    let generator = Arc::new(Mutex::new(generator));
    Ok(stores
        .into_iter()
        .enumerate()
        .map(|(shard, store)| {
            Owner::new(
                shard,
                shards,
                store,
                Arc::clone(&generator),
                config.reply_bytes_max(),
            )
        })
        .collect())
}
