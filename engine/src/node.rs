//! One node: binds the client port once per shard, starts the shard threads, and turns
//! SIGTERM (or SIGINT) into a drain.
//!
//! [`Node`] is the little state the shards share: the config, each shard's metrics and
//! mailbox, and the draining flag. All of it is either read-only or lock-free.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use chinwag_protocol::{DeviceIdGenerator, NodeId, NodeType};
use mio::{Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::data_dir::DataDir;
use crate::net::listener;
use crate::ops::config::{Config, Fsync};
use crate::ops::metrics::{self, ShardMetrics};
use crate::route::owner::Owner;
use crate::shard::mailbox::Mailbox;
use crate::shard::{Shard, WAKER};
use crate::store::{FsyncPolicy, Store, StoreConfig};

/// Messages one shard's mailbox holds before senders are told it is full.
const MAILBOX_CAPACITY: usize = 64 * 1024;

pub struct Node {
    pub config: Config,
    /// The secret that signs login tokens.
    pub jwt_secret: Vec<u8>,
    /// This node's id, from its listening address.
    pub node_id: NodeId,
    pub metrics: Box<[ShardMetrics]>,
    pub mailboxes: Box<[Mailbox]>,
    draining: AtomicBool,
    /// Per shard: its connections are drained (or it has stopped). A shard keeps its listener
    /// (answering probes with 503) until every shard is done, because closing one listener of
    /// the `SO_REUSEPORT` group resets the connections the kernel queued on it.
    shards_drained: Box<[AtomicBool]>,
}

impl Node {
    /// A node of `mailboxes.len()` shards.
    pub fn new(config: Config, jwt_secret: Vec<u8>, mailboxes: Vec<Mailbox>) -> Node {
        let node_id = match config.listen {
            SocketAddr::V4(addr) => NodeId::for_addr(NodeType::Connector, addr),
            SocketAddr::V6(addr) => NodeId::for_addr(
                NodeType::Connector,
                std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, addr.port()),
            ),
        };
        Node {
            config,
            jwt_secret,
            node_id,
            metrics: mailboxes.iter().map(|_| ShardMetrics::default()).collect(),
            shards_drained: mailboxes.iter().map(|_| AtomicBool::new(false)).collect(),
            mailboxes: mailboxes.into_boxed_slice(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts the drain: every shard stops accepting and closes its connections with 1001.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        for mailbox in self.mailboxes.iter() {
            mailbox.wake();
        }
    }

    /// Records that shard `id` has drained its connections (or stopped).
    pub fn shard_drained(&self, id: usize) {
        if let Some(done) = self.shards_drained.get(id) {
            done.store(true, Ordering::Release);
        }
        for mailbox in self.mailboxes.iter() {
            mailbox.wake();
        }
    }

    /// Whether every shard has drained its connections: the shards may exit.
    pub fn all_drained(&self) -> bool {
        self.shards_drained
            .iter()
            .all(|done| done.load(Ordering::Acquire))
    }

    pub fn render_metrics(&self) -> String {
        let shards: Vec<&ShardMetrics> = self.metrics.iter().collect();
        let depths: Vec<usize> = self.mailboxes.iter().map(Mailbox::len).collect();
        metrics::render(&metrics::Scrape {
            shards: &shards,
            mailbox_depths: &depths,
            draining: self.is_draining(),
        })
    }
}

/// Runs a node on the locked `data_dir` until SIGTERM or SIGINT has drained it. `config.shards`
/// is the resolved count (not 0). The bound address (useful with port 0) is logged as
/// `listening addr=...`. A port taken by another node or program fails with `AddrInUse`.
pub fn serve(mut config: Config, data_dir: DataDir, jwt_secret: Vec<u8>) -> io::Result<()> {
    let shard_count = config.shards.max(1);
    let (listeners, addr, _port_claim) = listener::bind_shards(config.listen, shard_count)?;
    // The node id carries the port actually bound (the configured one may be 0).
    config.listen = addr;
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
    let owners = open_owners(&config, data_dir.path(), shard_count)?;
    let node = Arc::new(Node::new(config, jwt_secret, mailboxes));

    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let signal_node = Arc::clone(&node);
    thread::Builder::new()
        .name("chinwag-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "signal received, draining");
                signal_node.drain();
            }
        })?;

    let mut shards = Vec::with_capacity(shard_count);
    for (id, ((poll, listener), owner)) in polls.into_iter().zip(listeners).zip(owners).enumerate()
    {
        let shard = Shard::new(id, Arc::clone(&node), poll, listener, owner)?;
        let stopped = StoppedShard(Arc::clone(&node), id);
        let handle = thread::Builder::new()
            .name(format!("chinwag-shard-{id}"))
            .spawn(move || {
                let _stopped = stopped;
                shard.run()
            })?;
        shards.push(handle);
    }
    tracing::info!(%addr, shards = shard_count, echo = node.config.enable_echo, "listening");

    let mut result = Ok(());
    for (id, handle) in shards.into_iter().enumerate() {
        let outcome = match handle.join() {
            Ok(outcome) => outcome,
            Err(_) => Err(io::Error::other(format!("shard {id} panicked"))),
        };
        if let Err(e) = outcome {
            tracing::error!(shard = id, error = %e, "shard failed");
            // One shard down: take the others down cleanly too rather than run half a node.
            node.drain();
            result = Err(e);
        }
    }
    result
}

/// Dropped when a shard's thread ends, however it ends (an error, a panic): the other shards
/// must not wait for its drain.
struct StoppedShard(Arc<Node>, usize);

impl Drop for StoppedShard {
    fn drop(&mut self) {
        self.0.drain();
        self.0.shard_drained(self.1);
    }
}

/// Opens (recovering) every shard's log under the data directory and builds its owner.
///
/// Conversation ids and owners are tied to the shard count, which [`DataDir::shard_count`]
/// keeps to the one the directory was created with.
fn open_owners(config: &Config, dir: &Path, shards: usize) -> io::Result<Vec<Owner>> {
    if shards > crate::route::SHARDS_MAX {
        return Err(io::Error::other(format!(
            "at most {} shards are supported",
            crate::route::SHARDS_MAX
        )));
    }
    let fsync = match config.fsync {
        Fsync::Never => FsyncPolicy::Never,
        Fsync::Interval => FsyncPolicy::Interval,
        Fsync::Always => FsyncPolicy::Always,
    };
    let mut stores = Vec::with_capacity(shards);
    for shard in 0..shards {
        let mut store_config = StoreConfig::new(dir.join(format!("shard-{shard}")));
        store_config.fsync = fsync;
        store_config.fsync_interval_ms = config.fsync_interval_ms;
        store_config.segment_bytes = config.log_segment_bytes;
        store_config.retention_age_ms = (config.log_retention_age_s > 0)
            .then(|| config.log_retention_age_s.saturating_mul(1000));
        store_config.retention_bytes_max =
            (config.log_retention_bytes_max > 0).then_some(config.log_retention_bytes_max);
        store_config.skip_corrupt = config.skip_corrupt_records;
        store_config.body_bytes_max = config.message_bytes_max;
        store_config.cmid_window_entries_max = config.cmid_window_entries_max;
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
        tracing::info!(
            shard,
            records = report.records,
            bytes = report.bytes,
            truncated = report.truncated.is_some(),
            "log recovered"
        );
        stores.push(store);
    }
    // One generator for the node, continuing after every device any shard registered.
    let mut generator =
        DeviceIdGenerator::new(NodeType::Client, 0).map_err(|e| io::Error::other(e.to_string()))?;
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
                store,
                Arc::clone(&generator),
                config.send_queue_bytes_max / 2,
            )
        })
        .collect())
}
