//! One node: binds the client port once per shard, opens every shard's log, starts the shard
//! threads, and turns SIGTERM (or SIGINT) into a drain.
//!
//! The shards share two things, both read-only or lock-free: the [`NodeState`] (configuration,
//! secret, metrics, drain flag) and the [`PostOffice`] (their mailboxes).

use std::io;
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

/// Runs a node until SIGTERM or SIGINT has drained it. The bound address (useful with port 0)
/// is logged as `listening addr=...`.
pub fn serve(mut config: Config) -> io::Result<()> {
    let shard_count = config.shard_count();
    // The first bind resolves port 0; the other shards bind the port it got.
    let first = listener::bind(config.listen)?;
    let addr = first.local_addr()?;
    // The node id carries the port actually bound (the configured one may be 0).
    config.listen = addr;
    let mut listeners = vec![first];
    for _ in 1..shard_count {
        listeners.push(listener::bind(addr)?);
    }
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
    let jwt_secret =
        crate::operator::secret::jwt_secret(config.jwt_secret.as_deref(), &config.data_dir)?;
    let owners = open_owners(&config, shard_count)?;
    let state = Arc::new(NodeState::new(config, jwt_secret.into_bytes(), shard_count));
    let office = Arc::new(PostOffice::new(mailboxes));

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
    for (id, ((poll, listener), owner)) in polls.into_iter().zip(listeners).zip(owners).enumerate()
    {
        let shard = Shard::new(
            id,
            Arc::clone(&state),
            Arc::clone(&office),
            poll,
            listener,
            owner,
        )?;
        let handle = thread::Builder::new()
            .name(format!("chinwag-shard-{id}"))
            .spawn(move || shard.run())?;
        shards.push(handle);
    }
    tracing::info!(%addr, shards = shard_count, echo = state.config.enable_echo, "listening");

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
    result
}

/// The file in the data directory that records how many shards the logs were written by.
const SHARDS_FILE: &str = "shards";

/// Opens (recovering) every shard's log under the data directory and builds its owner.
///
/// Conversation ids and owners are tied to the shard count, so a data directory keeps the count
/// it was created with: starting with another one is refused with a clear error.
fn open_owners(config: &Config, shards: usize) -> io::Result<Vec<Owner>> {
    if shards > crate::bus::SHARDS_MAX {
        return Err(io::Error::other(format!(
            "at most {} shards are supported",
            crate::bus::SHARDS_MAX
        )));
    }
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)?;
    let pinned = dir.join(SHARDS_FILE);
    match std::fs::read_to_string(&pinned) {
        Ok(text) => {
            let was: usize = text.trim().parse().map_err(|_| {
                io::Error::other(format!("{} is not a shard count", pinned.display()))
            })?;
            if was != shards {
                return Err(io::Error::other(format!(
                    "the data directory {} was written by {was} shards; start with --shards {was}",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::write(&pinned, format!("{shards}\n"))?;
        }
        Err(e) => return Err(e),
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
                shards,
                store,
                Arc::clone(&generator),
                config.reply_bytes_max(),
            )
        })
        .collect())
}
