//! One node: binds the client port once per shard, starts the shard threads, and turns
//! SIGTERM (or SIGINT) into a drain.
//!
//! [`Node`] is the little state the shards share: the config, each shard's metrics and
//! mailbox, and the draining flag. All of it is either read-only or lock-free.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use mio::{Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::net::listener;
use crate::ops::config::Config;
use crate::ops::metrics::{self, ShardMetrics};
use crate::shard::mailbox::Mailbox;
use crate::shard::{Shard, WAKER};

/// Messages one shard's mailbox holds before senders are told it is full.
const MAILBOX_CAPACITY: usize = 64 * 1024;

pub struct Node {
    pub config: Config,
    pub metrics: Box<[ShardMetrics]>,
    pub mailboxes: Box<[Mailbox]>,
    draining: AtomicBool,
}

impl Node {
    /// A node of `mailboxes.len()` shards.
    pub fn new(config: Config, mailboxes: Vec<Mailbox>) -> Node {
        Node {
            config,
            metrics: mailboxes.iter().map(|_| ShardMetrics::default()).collect(),
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

/// Runs a node until SIGTERM or SIGINT has drained it. The bound address (useful with port 0)
/// is logged as `listening addr=...`.
pub fn serve(config: Config) -> io::Result<()> {
    let shard_count = config.shard_count();
    // The first bind resolves port 0; the other shards bind the port it got.
    let first = listener::bind(config.listen)?;
    let addr = first.local_addr()?;
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
    let node = Arc::new(Node::new(config, mailboxes));

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
    for (id, (poll, listener)) in polls.into_iter().zip(listeners).enumerate() {
        let shard = Shard::new(id, Arc::clone(&node), poll, listener)?;
        let handle = thread::Builder::new()
            .name(format!("chinwag-shard-{id}"))
            .spawn(move || shard.run())?;
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
