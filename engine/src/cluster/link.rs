//! Node links: one TCP connection per pair of nodes, carrying [`BusMsg`]s in the link codec
//! ([`super::wire`]), run by one link thread per node with its own `mio::Poll`.
//!
//! [`Links`] is the node's handle, shared by its shards: [`Links::send`] encodes a message on
//! the calling thread (so the encoding cost is spread over the shards) and queues the bytes
//! for the peer's link, lock-free, waking the link thread once per burst like a shard's
//! mailbox. The link thread writes every peer's queue in vectored writes, many frames per
//! system call, and hands what it reads to an [`Inbox`] (for a node: [`OfficeInbox`], the
//! post office of its shards).
//!
//! Contract:
//! - **Order.** Messages to one peer leave in the order they were queued and arrive in that
//!   order (one FIFO queue, one TCP connection), so a conversation's pushes and replies keep
//!   the owner's order.
//! - **Bounded.** A peer's queue holds at most `queue_bytes_max` encoded bytes; past it
//!   [`Links::send`] refuses, and a client's request is answered `unavailable` at once. A peer
//!   that stops reading costs its queue's bound and no more.
//! - **Nothing hangs.** A request that waited in a queue longer than `request_timeout_ms`
//!   (the link is down, or never came up, or the peer is too slow) is answered `unavailable`.
//!   A request written to a connection that is then cut before the peer acknowledged it is
//!   answered `unavailable` when the cut is seen (it may or may not have been done: a `send`
//!   retried with its `cmid` is not stored twice). Pushes and replies that cannot be sent are
//!   dropped and counted; a lost push is repaired by `history`.
//! - **One connection per pair.** The node with the lower number dials; the other accepts.
//!   The dialer reconnects with a capped, jittered exponential backoff; both sides send a
//!   heartbeat when idle and close a connection that stayed silent for `idle_timeout_ms`.
//! - **Handshake.** Each side's first frame is a `hello` (cluster name, its number, the number
//!   it expects); a mismatch is answered with a `refuse` giving the reason, logged, and the
//!   connection closed. A malformed frame from a peer closes its connection with the reason
//!   logged; it never panics the link thread.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chinwag_protocol::binary::StreamDecoder;
use chinwag_protocol::ErrorCode;
use crossbeam::queue::SegQueue;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::wire::{self, Hello, LinkFrame};
use crate::bus::post::PostOffice;
use crate::bus::{
    BusMsg, PartitionId, PartitionMap, Refusal, StreamFound, StreamPart, NODE_NUMBER_MAX,
};

/// The limits and timers of a node's links.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The cluster's name: a node of another cluster is refused.
    pub cluster: String,
    /// This node's number (0..=[`NODE_NUMBER_MAX`]).
    pub node: u16,
    /// Where peers connect to this node.
    pub listen: SocketAddr,
    /// Encoded bytes queued for one peer, at most.
    pub queue_bytes_max: usize,
    /// A request queued this long is answered `unavailable`.
    pub request_timeout_ms: u64,
    /// An idle link sends a heartbeat this often.
    pub heartbeat_ms: u64,
    /// A connection that received nothing this long is closed.
    pub idle_timeout_ms: u64,
    /// The first reconnect delay; it doubles on each failure up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// The longest frame a peer may send (header included).
    pub frame_bytes_max: usize,
    /// Frames per write system call, at most (1: one write per frame, for the benchmark).
    pub frames_per_write_max: usize,
}

impl LinkConfig {
    /// The links of node `node` of `cluster`, listening on `listen`, with the node's
    /// `node_link_*` settings.
    pub fn from_config(
        config: &crate::operator::config::Config,
        cluster: &str,
        node: u16,
        listen: SocketAddr,
    ) -> LinkConfig {
        LinkConfig {
            queue_bytes_max: config.node_link_queue_bytes_max,
            request_timeout_ms: config.node_link_request_timeout_ms,
            heartbeat_ms: config.node_link_heartbeat_ms,
            idle_timeout_ms: config.node_link_idle_timeout_ms,
            frame_bytes_max: config.node_link_frame_bytes_max,
            ..LinkConfig::new(cluster, node, listen)
        }
    }

    /// The defaults for node `node` of `cluster`, listening on `listen`.
    pub fn new(cluster: &str, node: u16, listen: SocketAddr) -> LinkConfig {
        LinkConfig {
            cluster: cluster.to_string(),
            node,
            listen,
            queue_bytes_max: 64 << 20,
            request_timeout_ms: 5_000,
            heartbeat_ms: 1_000,
            idle_timeout_ms: 5_000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            frame_bytes_max: 16 << 20,
            frames_per_write_max: 256,
        }
    }
}

/// Where the link thread hands what it reads, and tells of peers coming and going.
pub trait Inbox: Send + 'static {
    /// A message from node `from` for this node. Returns a message to send back when the
    /// message could not be taken (the `unavailable` answer to a request).
    fn deliver(&mut self, from: u16, msg: BusMsg) -> Option<BusMsg>;
    /// Node `node`'s link came up (`true`) or went down.
    fn peer_changed(&mut self, node: u16, up: bool);
}

/// The node's inbox: a message for a session goes to the session's shard, a push to every
/// shard, a `convs` part request to every shard (each answers for its partitions), a stream
/// read split by the shards serving its partitions, anything
/// else to the shard serving its subject's partition here ([`BusMsg::owner`]).
pub struct OfficeInbox {
    pub office: Arc<PostOffice>,
    /// Which partitions this node owns and which shard serves each.
    pub partitions: Arc<PartitionMap>,
}

impl Inbox for OfficeInbox {
    fn deliver(&mut self, from: u16, msg: BusMsg) -> Option<BusMsg> {
        let shards = self.office.shards();
        match msg {
            BusMsg::Push(fanout) => {
                for shard in 0..shards {
                    // A full mailbox drops the push (counted by the shard's metrics
                    // elsewhere); the device repairs the gap with `history`.
                    let _ = self
                        .office
                        .post_from_outside(shard, BusMsg::Push(Arc::clone(&fanout)));
                }
                None
            }
            BusMsg::Reannounce { partitions } => {
                // Every shard announces its own sessions. A full mailbox drops the request:
                // that shard's sessions stay unknown to the asker until it asks again.
                for shard in 0..shards {
                    let ask = BusMsg::Reannounce {
                        partitions: partitions.clone(),
                    };
                    if self.office.post_from_outside(shard, ask).is_err() {
                        tracing::warn!(
                            from,
                            shard,
                            "request for announcements dropped: mailbox full"
                        );
                    }
                }
                None
            }
            BusMsg::Convs { origin, token, .. } => {
                // The asker counted this node's partitions; each shard answers for its own.
                // Those of shards that cannot take it fail in one part: the gather then
                // answers `unavailable` once.
                let mut failed = 0;
                for shard in 0..shards {
                    let partitions = self.office.partitions_of_shard(shard);
                    if partitions == 0 {
                        continue;
                    }
                    let part = BusMsg::Convs {
                        origin: origin.clone(),
                        token,
                        partitions,
                    };
                    if self.office.post_from_outside(shard, part).is_err() {
                        failed += partitions;
                    }
                }
                (failed > 0).then(|| BusMsg::ConvsPart {
                    session: origin.session,
                    token,
                    partitions: failed,
                    convs: None,
                })
            }
            BusMsg::StreamRead { session, from } => {
                // The asker read this node's partitions in one request; each shard reads its
                // own. Partitions no shard can read now (its mailbox is full, or the maps of
                // the two nodes disagree) are answered as not moved: the asker reads them
                // again on its next poll, from the same position.
                let mut skipped = Vec::new();
                for shard in 0..shards {
                    let part: Box<[(PartitionId, u64)]> = from
                        .iter()
                        .filter(|&&(p, _)| {
                            self.partitions.shard_of_partition(u32::from(p)) == Some(shard)
                        })
                        .copied()
                        .collect();
                    if part.is_empty() {
                        continue;
                    }
                    let read = BusMsg::StreamRead {
                        session,
                        from: part,
                    };
                    if let Err(BusMsg::StreamRead { from, .. }) =
                        self.office.post_from_outside(shard, read)
                    {
                        skipped.extend_from_slice(&from);
                    }
                }
                skipped.extend(
                    from.iter().filter(|&&(p, _)| {
                        self.partitions.shard_of_partition(u32::from(p)).is_none()
                    }),
                );
                (!skipped.is_empty()).then(|| {
                    BusMsg::StreamPart(Box::new(StreamPart {
                        session,
                        shard: 0,
                        result: Ok(StreamFound {
                            msgs: Vec::new(),
                            events: Vec::new(),
                            next: skipped,
                        }),
                    }))
                })
            }
            msg => {
                let shard = match msg.session() {
                    Some(session) => Some(usize::from(session.shard)),
                    None => msg.owner(&self.partitions),
                };
                let (refused, why) = match shard {
                    Some(shard) if shard < shards => {
                        match self.office.post_from_outside(shard, msg) {
                            Ok(()) => return None,
                            Err(msg) => (msg, "the owner shard is overloaded"),
                        }
                    }
                    _ => {
                        // A partition this node does not own (the peer's map is older or newer
                        // than ours), or a forged conversation id.
                        tracing::warn!(from, "a peer's message names no shard of this node");
                        (msg, "the owner is not on this node")
                    }
                };
                Some(Refusal::of(&refused)?.answer(ErrorCode::Unavailable, why))
            }
        }
    }

    fn peer_changed(&mut self, node: u16, up: bool) {
        tracing::info!(node, up, "node link");
        if up {
            // The peer may have restarted: its sessions this node's owners hold died with it.
            // They forget them first (before anything the new link delivers: this thread
            // posts both), then the peer announces those it holds now. It does so too if
            // this node has just started (its owners know no sessions yet), or if it holds
            // sessions of this node's users it could not tell while the link was down
            // (docs/cluster.md, "What a node's loss costs").
            for shard in 0..self.office.shards() {
                if self
                    .office
                    .post_from_outside(shard, BusMsg::ForgetNode { node })
                    .is_err()
                {
                    tracing::warn!(
                        node,
                        shard,
                        "forgetting a node's sessions dropped: mailbox full"
                    );
                }
            }
            self.office
                .ask_node_for_sessions(node, &self.office.own_partitions());
        }
    }
}

/// The `unavailable` answer to `msg`, if it needs one (see [`Refusal`]).
fn refused(msg: &BusMsg, text: &str) -> Option<BusMsg> {
    Refusal::of(msg).map(|r| r.answer(ErrorCode::Unavailable, text))
}

/// What one peer's link has done, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub node: u16,
    pub connected: bool,
    pub queue_bytes: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub messages_in: u64,
    pub reconnects: u64,
    /// Requests answered `unavailable` by the link (queue full, timed out, cut).
    pub unavailable: u64,
    /// Pushes and replies dropped (queue full, timed out, cut).
    pub dropped: u64,
    /// Connections closed for a bad handshake, a malformed frame or silence.
    pub errors: u64,
}

/// One peer's queue and counters, shared by the shards (senders) and the link thread.
struct PeerQueue {
    queue: SegQueue<Outgoing>,
    queue_bytes: AtomicUsize,
    connected: AtomicBool,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    messages_in: AtomicU64,
    reconnects: AtomicU64,
    unavailable: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

impl PeerQueue {
    fn new() -> PeerQueue {
        PeerQueue {
            queue: SegQueue::new(),
            queue_bytes: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn stats(&self, node: u16) -> PeerStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerStats {
            node,
            connected: self.connected.load(Ordering::Relaxed),
            queue_bytes: self.queue_bytes.load(Ordering::Relaxed) as u64,
            bytes_out: get(&self.bytes_out),
            bytes_in: get(&self.bytes_in),
            messages_out: get(&self.messages_out),
            messages_in: get(&self.messages_in),
            reconnects: get(&self.reconnects),
            unavailable: get(&self.unavailable),
            dropped: get(&self.dropped),
            errors: get(&self.errors),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// One encoded message waiting for its peer.
struct Outgoing {
    frame: Bytes,
    /// What answers the message (a request's `unavailable`) if it never reaches the peer.
    refusal: Option<Refusal>,
    queued: Instant,
}

/// What the shards ask of the link thread besides sending.
enum Control {
    /// Dial (or stop dialing, `None`) node `node` at this address.
    Peer(u16, Option<SocketAddr>),
    /// Close the connection to `node` now, as a network cut would (tests, operators).
    Cut(u16),
}

/// A node's links: the handle the shards send through.
pub struct Links {
    node: u16,
    /// Indexed by node number; a peer's slot is filled once and kept.
    peers: Box<[OnceLock<Arc<PeerQueue>>]>,
    control: SegQueue<Control>,
    waker: Waker,
    wake_pending: AtomicBool,
    stop: AtomicBool,
    local_addr: SocketAddr,
    queue_bytes_max: usize,
    frame_bytes_max: usize,
}

/// The link thread of [`Links::start`]; dropping it does not stop the thread, [`Self::stop`]
/// does.
pub struct LinkThread {
    links: Arc<Links>,
    handle: Option<thread::JoinHandle<()>>,
}

impl LinkThread {
    /// Stops the link thread and closes its connections (as the node's process ending would).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.links.stop.store(true, Ordering::Release);
        self.links.wake();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for LinkThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection tokens are slab keys plus this.
const FIRST_CONN: usize = 2;

impl Links {
    /// Binds `config.listen` and starts the link thread, which hands what it reads to `inbox`.
    pub fn start(config: LinkConfig, inbox: impl Inbox) -> io::Result<(Arc<Links>, LinkThread)> {
        let listener = std::net::TcpListener::bind(config.listen)?;
        Links::start_on(listener, config, inbox)
    }

    /// Starts the link thread on a `listener` bound already (a node binds it before it
    /// registers, so that the registry holds the port actually bound).
    pub fn start_on(
        listener: std::net::TcpListener,
        config: LinkConfig,
        inbox: impl Inbox,
    ) -> io::Result<(Arc<Links>, LinkThread)> {
        if config.node > NODE_NUMBER_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "node number over 12 bits",
            ));
        }
        if config.cluster.len() > wire::CLUSTER_NAME_LEN_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cluster name over 255 bytes",
            ));
        }
        let poll = Poll::new()?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let links = Arc::new(Links {
            node: config.node,
            peers: (0..=NODE_NUMBER_MAX).map(|_| OnceLock::new()).collect(),
            control: SegQueue::new(),
            waker: Waker::new(poll.registry(), WAKER)?,
            wake_pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            local_addr: listener.local_addr()?,
            queue_bytes_max: config.queue_bytes_max,
            frame_bytes_max: config.frame_bytes_max,
        });
        let mut link_loop = LinkLoop {
            links: Arc::clone(&links),
            config,
            poll,
            listener,
            conns: Slab::new(),
            peers: HashMap::new(),
            inbox,
            read_buf: vec![0; READ_CHUNK],
            read_again: Vec::new(),
            rng: seed(),
        };
        let handle = thread::Builder::new()
            .name(format!("chinwag-links-{}", links.node))
            .spawn(move || link_loop.run())?;
        let thread = LinkThread {
            links: Arc::clone(&links),
            handle: Some(handle),
        };
        Ok((links, thread))
    }

    /// This node's number.
    pub fn node(&self) -> u16 {
        self.node
    }

    /// The address peers connect to (the bound one, when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Makes `node` a peer, reached at `addr` (dialed by this node when its number is the
    /// lower; otherwise the address is kept and the peer is expected to dial). Calling it again
    /// changes the address.
    pub fn add_peer(&self, node: u16, addr: SocketAddr) {
        if node > NODE_NUMBER_MAX || node == self.node {
            return;
        }
        self.peer_queue(node);
        self.control.push(Control::Peer(node, Some(addr)));
        self.wake();
    }

    /// Stops dialing `node` (its queue stays, and times out).
    pub fn remove_peer(&self, node: u16) {
        self.control.push(Control::Peer(node, None));
        self.wake();
    }

    /// Closes the connection to `node` as a cut of the network would.
    pub fn cut(&self, node: u16) {
        self.control.push(Control::Cut(node));
        self.wake();
    }

    fn peer_queue(&self, node: u16) -> &Arc<PeerQueue> {
        self.peers[usize::from(node)].get_or_init(|| Arc::new(PeerQueue::new()))
    }

    /// Queues `msg` for node `node`. Returns what the caller must handle itself, like
    /// [`crate::bus::post::Post::send`]: when the message cannot be queued (unknown peer,
    /// queue over its bound, a message the codec cannot carry), the `unavailable` answer to a
    /// client's request; anything else is dropped and counted.
    pub fn send(&self, node: u16, msg: BusMsg) -> Option<BusMsg> {
        let peer = self.peers.get(usize::from(node)).and_then(OnceLock::get);
        let Some(peer) = peer.filter(|_| node != self.node) else {
            tracing::warn!(node, "message for an unknown node dropped");
            return refused(&msg, "unknown node");
        };
        let frame = match wire::encode_to_bytes(&msg) {
            // The peer closes a link that sends it a frame over its limit: never send one.
            Ok(frame) if frame.len() <= self.frame_bytes_max => frame,
            Ok(frame) => {
                tracing::warn!(
                    node,
                    len = frame.len(),
                    "message over the node link's frame limit"
                );
                add(&peer.dropped, 1);
                return refused(&msg, "request too large for a node link");
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "message the node link cannot carry");
                add(&peer.dropped, 1);
                return refused(&msg, "request too large for a node link");
            }
        };
        let len = frame.len();
        let before = peer.queue_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.queue_bytes_max {
            peer.queue_bytes.fetch_sub(len, Ordering::AcqRel);
            return match Refusal::of(&msg) {
                Some(refusal) => {
                    add(&peer.unavailable, 1);
                    Some(refusal.answer(ErrorCode::Unavailable, "the node link is congested"))
                }
                None => {
                    add(&peer.dropped, 1);
                    None
                }
            };
        }
        peer.queue.push(Outgoing {
            frame,
            refusal: Refusal::of(&msg),
            queued: Instant::now(),
        });
        self.wake();
        None
    }

    /// Each known peer's counters.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(node, q)| Some(q.get()?.stats(node as u16)))
            .collect()
    }

    /// Whether the link to `node` is up (handshake done).
    pub fn is_connected(&self, node: u16) -> bool {
        self.peers
            .get(usize::from(node))
            .and_then(OnceLock::get)
            .is_some_and(|q| q.connected.load(Ordering::Acquire))
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed eventfd write means the counter is saturated: the thread is woken.
            let _ = self.waker.wake();
        }
    }
}

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per loop turn, so one busy peer cannot starve the others.
const READ_TURN_BYTES_MAX: usize = 1 << 20;
/// The loop wakes at least this often to run its timers.
const TICK: Duration = Duration::from_millis(20);

/// The link thread's view of a peer.
struct Peer {
    queue: Arc<PeerQueue>,
    /// Dialed by this node (its number is the higher), at this address.
    addr: Option<SocketAddr>,
    /// The connection carrying the link, once its handshake is done.
    conn: Option<usize>,
    /// A dial in progress or a connection in its handshake.
    dialing: Option<usize>,
    next_dial: Instant,
    backoff_ms: u64,
    /// Frames taken from the queue, not yet written whole; the front's first `head_written`
    /// bytes are written.
    pending: VecDeque<Outgoing>,
    head_written: usize,
    ever_connected: bool,
}

/// One TCP connection, dialed or accepted.
struct Conn {
    stream: TcpStream,
    /// The peer: the one dialed, or the `hello`'s source once read.
    peer: Option<u16>,
    dialed: bool,
    /// The handshake is done (both `hello`s seen).
    open: bool,
    /// A dial completes when the socket turns writable.
    connecting: bool,
    /// Closes once `control` is written (after a `refuse`).
    closing: bool,
    decoder: StreamDecoder,
    /// Link frames of its own (hello, refuse, heartbeats) to write at the next frame boundary.
    control: BytesMut,
    last_read: Instant,
    last_write: Instant,
    /// Bus frames read on this connection, and the count last acknowledged to the peer.
    received: u64,
    received_acked: u64,
    /// Bus frames written whole on this connection.
    sent: u64,
    /// Requests written whole and not yet acknowledged: their frame number and answer.
    unacked: VecDeque<(u64, Refusal)>,
}

struct LinkLoop<I: Inbox> {
    links: Arc<Links>,
    config: LinkConfig,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    peers: HashMap<u16, Peer>,
    inbox: I,
    read_buf: Vec<u8>,
    /// Connections that used their read budget with bytes left: read again next turn (their
    /// readiness edge is spent).
    read_again: Vec<usize>,
    rng: u64,
}

/// Why a connection ends, for the log.
type Reason = String;

impl<I: Inbox> LinkLoop<I> {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        while !self.links.stop.load(Ordering::Acquire) {
            let timeout = if self.read_again.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "node links: poll failed");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        let key = t - FIRST_CONN;
                        if event.is_writable() {
                            self.on_writable(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key);
                        }
                    }
                }
            }
            for key in std::mem::take(&mut self.read_again) {
                self.on_readable(key);
            }
            self.links.wake_pending.store(false, Ordering::Release);
            self.take_control();
            self.turn();
        }
        // Stopping: every connection closes with the thread (a process ending).
        for (_, conn) in self.conns.iter_mut() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn take_control(&mut self) {
        while let Some(control) = self.links.control.pop() {
            match control {
                Control::Peer(node, addr) => {
                    // The lower number dials: one connection per pair.
                    let dial = addr.filter(|_| self.config.node < node);
                    let peer = self.peer(node);
                    peer.addr = dial;
                    peer.next_dial = Instant::now();
                }
                Control::Cut(node) => {
                    let conn = self.peers.get(&node).and_then(|p| p.conn.or(p.dialing));
                    if let Some(key) = conn {
                        self.close(key, "cut on request".into(), false);
                    }
                }
            }
        }
    }

    /// The link thread's state of `node`, made on first use.
    fn peer(&mut self, node: u16) -> &mut Peer {
        let queue = Arc::clone(self.links.peer_queue(node));
        let backoff_ms = self.config.reconnect_min_ms;
        self.peers.entry(node).or_insert_with(|| Peer {
            queue,
            addr: None,
            conn: None,
            dialing: None,
            next_dial: Instant::now(),
            backoff_ms,
            pending: VecDeque::new(),
            head_written: 0,
            ever_connected: false,
        })
    }
}

/// Requests written and not acknowledged, at most, before a peer that reads but never
/// acknowledges is taken for broken (bounds the link thread's memory like the queue's bound).
const UNACKED_MAX: usize = 1 << 16;
/// Connections the link thread holds at most, handshakes in progress included.
const CONNS_MAX: usize = 1024;

impl<I: Inbox> LinkLoop<I> {
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    // Each peer needs one connection; whoever opens more (or a flood of
                    // handshakes that never finish) is refused rather than held.
                    if self.conns.len() >= CONNS_MAX {
                        tracing::warn!(%addr, "node links: too many connections, refused");
                        continue;
                    }
                    let _ = self.add_conn(stream, None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of files, most likely: the peer will dial again.
                    tracing::warn!(error = %e, "node links: accept failed");
                    return;
                }
            }
        }
    }

    /// Registers a new connection: dialed to `dialed` (its `hello` goes first), or accepted.
    fn add_conn(&mut self, mut stream: TcpStream, dialed: Option<u16>) -> io::Result<usize> {
        let _ = stream.set_nodelay(true);
        let mut control = BytesMut::new();
        if let Some(node) = dialed {
            self.hello(node, &mut control);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Edge-triggered: a writable event comes when a dial completes and after each write
        // that would have blocked.
        self.poll.registry().register(
            &mut stream,
            Token(key + FIRST_CONN),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let now = Instant::now();
        entry.insert(Conn {
            stream,
            peer: dialed,
            dialed: dialed.is_some(),
            open: false,
            connecting: dialed.is_some(),
            closing: false,
            decoder: StreamDecoder::new(self.config.frame_bytes_max),
            control,
            last_read: now,
            last_write: now,
            received: 0,
            received_acked: 0,
            sent: 0,
            unacked: VecDeque::new(),
        });
        Ok(key)
    }

    fn hello(&self, target: u16, out: &mut BytesMut) {
        let hello = Hello {
            cluster: self.config.cluster.clone(),
            source: self.config.node,
            target,
        };
        if let Err(e) = wire::encode_hello(&hello, out) {
            // Only a cluster name over 64 KiB fails; `Links::start` refuses over 255 bytes.
            tracing::error!(error = %e, "node links: cannot encode hello");
        }
    }

    fn on_writable(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.connecting {
            match conn.stream.take_error() {
                Ok(None) => conn.connecting = false,
                Ok(Some(e)) | Err(e) => {
                    self.close(key, format!("dial failed: {e}"), false);
                    return;
                }
            }
            // A writable event without an error can still be a dial in progress.
            if let Err(e) = conn.stream.peer_addr() {
                if e.kind() == io::ErrorKind::NotConnected {
                    conn.connecting = true;
                    return;
                }
            }
        }
        self.flush(key);
    }

    fn on_readable(&mut self, key: usize) {
        let mut frames = Vec::new();
        let mut read = 0;
        let outcome = loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.connecting {
                return;
            }
            if read >= READ_TURN_BYTES_MAX {
                // More next turn: edge-triggered, no new event comes for these bytes.
                if !self.read_again.contains(&key) {
                    self.read_again.push(key);
                }
                break Ok(());
            }
            match conn.stream.read(&mut self.read_buf) {
                Ok(0) => break Err(("the peer closed the connection".to_string(), false)),
                Ok(n) => {
                    read += n;
                    conn.last_read = Instant::now();
                    if let Err(e) = conn.decoder.extend(&self.read_buf[..n]) {
                        break Err((format!("bad frame from the peer: {e}"), true));
                    }
                    while let Some(frame) = conn.decoder.next_frame() {
                        frames.push(frame);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err((format!("read failed: {e}"), false)),
            }
        };
        // Frames read before an error or the end are still the peer's: act on them first.
        for frame in frames {
            if !self.conns.contains(key) {
                return;
            }
            if let Err(reason) = self.on_frame(key, frame) {
                self.close(key, reason, true);
                return;
            }
        }
        if let Err((reason, error)) = outcome {
            self.close(key, reason, error);
        }
    }

    /// Acts on one frame of connection `key`. An error closes the connection.
    fn on_frame(&mut self, key: usize, frame: Bytes) -> Result<(), Reason> {
        let len = frame.len() as u64;
        let decoded = match wire::decode(&frame) {
            Ok(decoded) => decoded,
            // Say why before closing, so the other side's operator reads it in its log too.
            Err(e @ wire::WireError::Version(_)) => {
                self.refuse(key, e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        let conn = &mut self.conns[key];
        if conn.closing {
            return Ok(());
        }
        match decoded {
            LinkFrame::Hello(hello) => {
                if conn.open {
                    return Err("a second hello".into());
                }
                if let Some(reason) = self.check_hello(key, &hello) {
                    self.refuse(key, reason);
                    return Ok(());
                }
                if !self.conns[key].dialed {
                    let mut control = std::mem::take(&mut self.conns[key].control);
                    self.hello(hello.source, &mut control);
                    self.conns[key].control = control;
                }
                self.link_up(key, hello.source);
            }
            LinkFrame::Refuse(reason) => return Err(format!("refused by the peer: {reason}")),
            LinkFrame::Heartbeat { received } => {
                if !conn.open {
                    return Err("a heartbeat before the handshake".into());
                }
                if received > conn.sent {
                    return Err("the peer acknowledged frames never sent".into());
                }
                while conn.unacked.front().is_some_and(|(n, _)| *n <= received) {
                    conn.unacked.pop_front();
                }
            }
            LinkFrame::Bus(msg) => {
                let Some(node) = conn.peer.filter(|_| conn.open) else {
                    return Err("a message before the handshake".into());
                };
                conn.received += 1;
                if let Some(peer) = self.peers.get(&node) {
                    add(&peer.queue.messages_in, 1);
                    add(&peer.queue.bytes_in, len);
                }
                if let Some(back) = self.inbox.deliver(node, msg) {
                    self.route(back);
                }
            }
        }
        Ok(())
    }

    /// Why `hello` is refused on connection `key`, if it is.
    fn check_hello(&self, key: usize, hello: &Hello) -> Option<String> {
        let conn = &self.conns[key];
        let me = self.config.node;
        if hello.cluster != self.config.cluster {
            return Some(format!(
                "cluster {:?} is not this node's cluster {:?}",
                hello.cluster, self.config.cluster
            ));
        }
        if hello.target != me {
            return Some(format!("this is node {me}, not node {}", hello.target));
        }
        if conn.dialed {
            if conn.peer != Some(hello.source) {
                return Some(format!(
                    "dialed node {:?}, answered by node {}",
                    conn.peer, hello.source
                ));
            }
        } else if hello.source >= me {
            return Some(format!(
                "node {} must wait for node {me} to dial it (the lower number dials)",
                hello.source
            ));
        }
        None
    }

    /// Sends `refuse` with `reason` on connection `key`, then closes it.
    fn refuse(&mut self, key: usize, reason: String) {
        tracing::warn!(%reason, "node links: handshake refused");
        let conn = &mut self.conns[key];
        if let Some(peer) = conn.peer.and_then(|n| self.peers.get(&n)) {
            add(&peer.queue.errors, 1);
        }
        let _ = wire::encode_refuse(&reason, &mut conn.control);
        conn.closing = true;
        self.flush(key);
    }

    /// Connection `key` carries the link to `node` from now on.
    fn link_up(&mut self, key: usize, node: u16) {
        let min = self.config.reconnect_min_ms;
        let peer = self.peer(node);
        let old = peer.conn.replace(key);
        if old.is_some_and(|old| old != key) {
            // A frame begun on the old connection starts again, whole, on this one.
            peer.head_written = 0;
        }
        peer.dialing = None;
        peer.backoff_ms = min;
        if peer.ever_connected {
            add(&peer.queue.reconnects, 1);
        }
        peer.ever_connected = true;
        peer.queue.connected.store(true, Ordering::Release);
        let conn = &mut self.conns[key];
        conn.peer = Some(node);
        conn.open = true;
        if let Some(old) = old.filter(|&old| old != key) {
            self.close(old, "replaced by a newer connection".into(), false);
            // `close` saw `old` as no longer the link; the link is still up.
        }
        tracing::info!(node, "node link up");
        self.inbox.peer_changed(node, true);
        self.flush(key);
    }

    /// Closes connection `key`, logging `reason` (as a warning when `error`).
    fn close(&mut self, key: usize, reason: Reason, error: bool) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let Some(node) = conn.peer else {
            if error {
                tracing::warn!(%reason, "node links: connection closed before its handshake");
            }
            return;
        };
        if error {
            tracing::warn!(node, %reason, "node link closed");
        } else if conn.open {
            tracing::info!(node, %reason, "node link closed");
        } else {
            // A dial to a peer that is down fails at every backoff step: not news each time.
            tracing::debug!(node, %reason, "node link: connection closed before its handshake");
        }
        let now = Instant::now();
        let jitter = self.jitter();
        let max = self.config.reconnect_max_ms;
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if error {
            add(&peer.queue.errors, 1);
        }
        if peer.dialing == Some(key) {
            peer.dialing = None;
        }
        let was_link = peer.conn == Some(key);
        if peer.addr.is_some() && peer.conn.map_or(true, |k| k == key) {
            // Capped exponential backoff, jittered over its upper half so that the nodes
            // a failure hit together do not dial again together.
            let delay = peer.backoff_ms / 2 + jitter % (peer.backoff_ms / 2 + 1);
            peer.next_dial = now + Duration::from_millis(delay);
            peer.backoff_ms = (peer.backoff_ms * 2).min(max);
        }
        let queue = Arc::clone(&peer.queue);
        if was_link {
            peer.conn = None;
            // A frame cut in the middle never reached the peer: it goes again, whole, on the
            // next connection.
            peer.head_written = 0;
            peer.queue.connected.store(false, Ordering::Release);
            self.inbox.peer_changed(node, false);
        }
        // Also for a connection a newer one replaced: its requests are as lost.
        for (_, refusal) in conn.unacked {
            add(&queue.unavailable, 1);
            self.route(refusal.answer(
                ErrorCode::Unavailable,
                "the node link was cut; the request may or may not have been done",
            ));
        }
    }

    /// Sends a message the link thread made (an `unavailable` answer, an inbox's refusal)
    /// toward its session: this node's inbox, or a peer.
    fn route(&mut self, msg: BusMsg) {
        match msg.session() {
            Some(session) if session.node != self.config.node => {
                // What cannot be queued here is dropped: an answer about an answer would loop.
                let _ = self.links.send(session.node, msg);
            }
            _ => {
                let _ = self.inbox.deliver(self.config.node, msg);
            }
        }
    }

    fn jitter(&mut self) -> u64 {
        // xorshift64: enough to spread reconnects.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Everything timed, once per loop turn: queues into their pending lists, requests that
    /// waited too long, dials, heartbeats, silent connections, and the writes.
    fn turn(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let nodes: Vec<u16> = self.peers.keys().copied().collect();
        let mut answers = Vec::new();
        for node in nodes {
            let peer = self.peers.get_mut(&node).expect("listed above");
            while let Some(out) = peer.queue.queue.pop() {
                peer.pending.push_back(out);
            }
            // The oldest first; a frame being written stays (it is on its way).
            while peer.head_written == 0
                && peer
                    .pending
                    .front()
                    .is_some_and(|o| now.duration_since(o.queued) >= timeout)
            {
                let out = peer.pending.pop_front().expect("checked above");
                peer.queue
                    .queue_bytes
                    .fetch_sub(out.frame.len(), Ordering::AcqRel);
                match out.refusal {
                    Some(refusal) => {
                        add(&peer.queue.unavailable, 1);
                        answers.push(
                            refusal.answer(ErrorCode::Unavailable, "the node is unreachable"),
                        );
                    }
                    None => add(&peer.queue.dropped, 1),
                }
            }
            let dial = peer
                .addr
                .filter(|_| peer.conn.is_none() && peer.dialing.is_none() && now >= peer.next_dial);
            if let Some(addr) = dial {
                self.dial(node, addr);
            }
        }
        for answer in answers {
            self.route(answer);
        }
        let heartbeat = Duration::from_millis(self.config.heartbeat_ms);
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            if now.duration_since(conn.last_read) >= idle {
                let what = if conn.open {
                    "silent"
                } else {
                    "in its handshake"
                };
                self.close(key, format!("{what} for {idle:?}"), true);
                continue;
            }
            if conn.unacked.len() > UNACKED_MAX {
                self.close(key, "the peer does not acknowledge".into(), true);
                continue;
            }
            if conn.open
                && (conn.received > conn.received_acked
                    || now.duration_since(conn.last_write) >= heartbeat)
            {
                wire::encode_heartbeat(conn.received, &mut conn.control);
                conn.received_acked = conn.received;
                // Counts as a write, so an idle link sends one heartbeat per interval.
                conn.last_write = now;
            }
            self.flush(key);
        }
    }

    fn dial(&mut self, node: u16, addr: SocketAddr) {
        let jitter = self.jitter();
        let dialed = TcpStream::connect(addr).and_then(|stream| self.add_conn(stream, Some(node)));
        let max = self.config.reconnect_max_ms;
        let peer = self.peers.get_mut(&node).expect("dialed peers are known");
        match dialed {
            Ok(key) => peer.dialing = Some(key),
            Err(e) => {
                tracing::debug!(node, %addr, error = %e, "node link: dial failed");
                let delay = peer.backoff_ms / 2 + jitter % (peer.backoff_ms / 2 + 1);
                peer.next_dial = Instant::now() + Duration::from_millis(delay);
                peer.backoff_ms = (peer.backoff_ms * 2).min(max);
            }
        }
    }

    /// Writes what connection `key` has to write, until the socket would block.
    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.connecting {
            return;
        }
        let peer = conn
            .peer
            .filter(|_| conn.open && !conn.closing)
            .and_then(|node| self.peers.get_mut(&node))
            .filter(|peer| peer.conn == Some(key));
        match write_out(conn, peer, self.config.frames_per_write_max) {
            Ok(()) => {
                let conn = &self.conns[key];
                if conn.closing && conn.control.is_empty() {
                    self.close(key, "handshake refused".into(), true);
                }
            }
            Err(e) => self.close(key, format!("write failed: {e}"), false),
        }
    }
}

/// Writes `conn`'s control frames and, once the link is up, `peer`'s pending frames, in
/// vectored writes of up to `frames_max` frames, until done or the socket would block.
fn write_out(conn: &mut Conn, mut peer: Option<&mut Peer>, frames_max: usize) -> io::Result<()> {
    loop {
        // Control frames go between bus frames, never inside one.
        let at_boundary = peer.as_ref().map_or(true, |p| p.head_written == 0);
        if at_boundary && !conn.control.is_empty() {
            match conn.stream.write(&conn.control) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = conn.control.split_to(n);
                    conn.last_write = Instant::now();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(p) = peer.as_deref_mut() else {
            return Ok(());
        };
        if p.pending.is_empty() {
            return Ok(());
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames_max.min(p.pending.len()));
        for (i, out) in p.pending.iter().take(frames_max.max(1)).enumerate() {
            let from = if i == 0 { p.head_written } else { 0 };
            slices.push(IoSlice::new(&out.frame[from..]));
        }
        let written = match conn.stream.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        drop(slices);
        conn.last_write = Instant::now();
        let mut left = written;
        while left > 0 {
            let front = p
                .pending
                .front()
                .expect("written bytes belong to pending frames");
            let rest = front.frame.len() - p.head_written;
            if left < rest {
                p.head_written += left;
                break;
            }
            left -= rest;
            p.head_written = 0;
            let out = p.pending.pop_front().expect("checked above");
            let len = out.frame.len();
            p.queue.queue_bytes.fetch_sub(len, Ordering::AcqRel);
            add(&p.queue.bytes_out, len as u64);
            add(&p.queue.messages_out, 1);
            conn.sent += 1;
            if let Some(refusal) = out.refusal {
                conn.unacked.push_back((conn.sent, refusal));
            }
        }
    }
}

/// A seed for the reconnect jitter: differs per process and per start.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(bytes) | 1
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use chinwag_protocol::client::Encoding;
    use chinwag_protocol::{ConvId, Cursor, DeviceId, Seq, Uid, UidKind};
    use crossbeam::channel::{unbounded, Receiver, RecvTimeoutError, Sender};

    use super::*;
    use crate::bus::SessionRef;
    use crate::net::ws::frame::{self, Opcode};

    /// What a test node's inbox saw.
    #[derive(Debug)]
    enum Event {
        Msg(u16, BusMsg),
        // Whether it came up: read only through `Debug`, in a failing test's message.
        Peer(u16, #[allow(dead_code)] bool),
    }

    struct ChannelInbox(Sender<Event>);

    impl Inbox for ChannelInbox {
        fn deliver(&mut self, from: u16, msg: BusMsg) -> Option<BusMsg> {
            let _ = self.0.send(Event::Msg(from, msg));
            None
        }

        fn peer_changed(&mut self, node: u16, up: bool) {
            let _ = self.0.send(Event::Peer(node, up));
        }
    }

    /// Long enough for anything this machine does; only reached when a test fails.
    const WAIT: Duration = Duration::from_secs(20);

    fn config(node: u16, addr: SocketAddr) -> LinkConfig {
        LinkConfig {
            request_timeout_ms: 300,
            heartbeat_ms: 50,
            idle_timeout_ms: 1_000,
            reconnect_min_ms: 10,
            reconnect_max_ms: 200,
            ..LinkConfig::new("test", node, addr)
        }
    }

    /// [`config`] for tests of order under volume: thousands of messages queued at once may
    /// wait longer than its short request timeout on a loaded machine, and would be dropped.
    fn patient(node: u16, addr: SocketAddr) -> LinkConfig {
        LinkConfig {
            request_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            ..config(node, addr)
        }
    }

    fn any_port(ip: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, ip), 0))
    }

    struct Node {
        links: Arc<Links>,
        thread: LinkThread,
        events: Receiver<Event>,
    }

    fn start(config: LinkConfig) -> Node {
        let (tx, events) = unbounded();
        let (links, thread) = Links::start(config, ChannelInbox(tx)).unwrap();
        Node {
            links,
            thread,
            events,
        }
    }

    fn mesh(nodes: &[&Node]) {
        for a in nodes {
            for b in nodes {
                if a.links.node() != b.links.node() {
                    a.links.add_peer(b.links.node(), b.links.local_addr());
                }
            }
        }
    }

    fn session(node: u16, slot: u32) -> SessionRef {
        SessionRef {
            node,
            shard: 0,
            slot,
            generation: 1,
        }
    }

    /// A reply for `slot` on `node` whose payload says `n`.
    fn numbered(node: u16, slot: u32, n: u64) -> BusMsg {
        BusMsg::Deliver {
            to: session(node, slot),
            ws_message: frame::encode(Opcode::Binary, &n.to_be_bytes()),
        }
    }

    fn number_of(msg: &BusMsg) -> (u32, u64) {
        let BusMsg::Deliver { to, ws_message } = msg else {
            panic!("expected a Deliver, got {msg:?}");
        };
        let payload: [u8; 8] = ws_message[2..].try_into().unwrap();
        (to.slot, u64::from_be_bytes(payload))
    }

    fn request(on: u16, slot: u32, req: u64) -> BusMsg {
        BusMsg::Read {
            origin: Box::new(crate::bus::Origin {
                session: session(on, slot),
                uid: Uid::new(UidKind::Buyer, 1),
                device: DeviceId::from_u64(7).unwrap(),
                encoding: Encoding::Json,
                req: Some(req),
                service: false,
                received: Instant::now(),
            }),
            cursor: Cursor {
                conv: ConvId(1),
                seq: Seq(1),
            },
        }
    }

    /// The next message the node received, skipping peer events.
    fn next_msg(node: &Node) -> (u16, BusMsg) {
        let deadline = Instant::now() + WAIT;
        loop {
            match node
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Event::Msg(from, msg)) => return (from, msg),
                Ok(Event::Peer(..)) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no message within {WAIT:?}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn is_unavailable(msg: &BusMsg, slot: u32) -> bool {
        matches!(msg, BusMsg::Deliver { to, ws_message }
            if to.slot == slot
                && std::str::from_utf8(&ws_message[2..]).unwrap().contains("unavailable"))
    }

    #[test]
    fn two_nodes_exchange_messages_in_order() {
        let a = start(patient(1, any_port(1)));
        let b = start(patient(2, any_port(2)));
        mesh(&[&a, &b]);
        const N: u64 = 20_000;
        for n in 0..N {
            assert!(a.links.send(2, numbered(2, 5, n)).is_none());
            assert!(b.links.send(1, numbered(1, 6, n)).is_none());
        }
        for (node, from, slot) in [(&b, 1, 5), (&a, 2, 6)] {
            for n in 0..N {
                let (sender, msg) = next_msg(node);
                assert_eq!(sender, from);
                assert_eq!(number_of(&msg), (slot, n));
            }
        }
        let stats = a.links.stats();
        assert_eq!(stats.len(), 1);
        assert!(stats[0].connected);
        assert_eq!(stats[0].messages_out, N);
        assert_eq!(stats[0].messages_in, N);
        assert_eq!(stats[0].queue_bytes, 0);
    }

    #[test]
    fn a_forwarded_request_is_answered_the_same_way() {
        let a = start(config(1, any_port(1)));
        let b = start(config(2, any_port(2)));
        mesh(&[&a, &b]);
        assert!(a.links.send(2, request(1, 9, 42)).is_none());
        // Node 2, the owner, answers the origin's session: the reply goes back to node 1.
        let (from, msg) = next_msg(&b);
        assert_eq!(from, 1);
        let origin = *msg.origin().expect("a request");
        assert_eq!(origin.session, session(1, 9));
        assert_eq!(origin.req, Some(42));
        let reply = BusMsg::Deliver {
            to: origin.session,
            ws_message: origin.reply(chinwag_protocol::Message::ReadOk(Cursor {
                conv: ConvId(1),
                seq: Seq(1),
            })),
        };
        assert!(b.links.send(origin.session.node, reply).is_none());
        let (from, msg) = next_msg(&a);
        assert_eq!(from, 2);
        let BusMsg::Deliver { to, ws_message } = msg else {
            panic!("expected the reply");
        };
        assert_eq!(to, session(1, 9));
        assert!(std::str::from_utf8(&ws_message[2..])
            .unwrap()
            .contains(r#""op":"read_ok","req":42"#));
    }

    #[test]
    fn three_nodes_keep_each_pairs_order() {
        let nodes: Vec<Node> = (1..=3)
            .map(|n| start(patient(n, any_port(n as u8))))
            .collect();
        mesh(&nodes.iter().collect::<Vec<_>>());
        const N: u64 = 5_000;
        for n in 0..N {
            for a in &nodes {
                for b in &nodes {
                    let (from, to) = (a.links.node(), b.links.node());
                    if from != to {
                        // The slot names the sender, so each pair's order can be checked.
                        assert!(a.links.send(to, numbered(to, u32::from(from), n)).is_none());
                    }
                }
            }
        }
        for node in &nodes {
            let mut next = HashMap::new();
            for _ in 0..2 * N {
                let (from, msg) = next_msg(node);
                let (slot, n) = number_of(&msg);
                assert_eq!(slot, u32::from(from));
                let expected = next.entry(from).or_insert(0);
                assert_eq!(n, *expected, "from node {from}");
                *expected += 1;
            }
            assert!(next.values().all(|&n| n == N));
        }
    }

    #[test]
    fn queued_requests_answer_unavailable_when_the_peer_dies_and_the_link_returns() {
        let a = start(config(1, any_port(1)));
        let b = start(config(2, any_port(2)));
        let b_addr = b.links.local_addr();
        mesh(&[&a, &b]);
        wait_for("link up", || a.links.is_connected(2));
        // The peer process dies: its sockets close.
        b.thread.stop();
        wait_for("link down", || !a.links.is_connected(2));
        for req in 0..10 {
            assert!(a.links.send(2, request(1, 3, req)).is_none());
        }
        for _ in 0..10 {
            let (from, msg) = next_msg(&a);
            assert_eq!(from, 1, "answered by this node");
            assert!(is_unavailable(&msg, 3), "{msg:?}");
        }
        assert_eq!(a.links.stats()[0].unavailable, 10);
        assert_eq!(a.links.stats()[0].queue_bytes, 0);

        // The peer comes back on its address: the link is dialed again.
        let b = start(config(2, b_addr));
        a.links.add_peer(2, b_addr);
        b.links.add_peer(1, a.links.local_addr());
        wait_for("link up again", || a.links.is_connected(2));
        assert!(a.links.send(2, numbered(2, 1, 7)).is_none());
        assert_eq!(number_of(&next_msg(&b).1), (1, 7));
        assert!(a.links.stats()[0].reconnects >= 1);
    }

    #[test]
    fn a_cut_connection_is_dialed_again() {
        let a = start(config(1, any_port(1)));
        let b = start(config(2, any_port(2)));
        mesh(&[&a, &b]);
        wait_for("link up", || a.links.is_connected(2));
        for round in 0..3 {
            // Cut from either side: node 1 dials again.
            if round % 2 == 0 {
                a.links.cut(2);
            } else {
                b.links.cut(1);
            }
            wait_for("reconnected", || a.links.stats()[0].reconnects > round);
            wait_for("link up", || a.links.is_connected(2));
        }
        assert!(a.links.send(2, numbered(2, 1, 1)).is_none());
        assert_eq!(number_of(&next_msg(&b).1), (1, 1));
    }

    /// Reads one link frame from a blocking stream.
    fn read_frame(stream: &mut std::net::TcpStream) -> io::Result<Bytes> {
        let mut head = [0u8; 4];
        stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes(head) as usize;
        let mut frame = vec![0u8; len];
        frame[..4].copy_from_slice(&head);
        stream.read_exact(&mut frame[4..])?;
        Ok(Bytes::from(frame))
    }

    fn hello_bytes(cluster: &str, source: u16, target: u16) -> BytesMut {
        let mut out = BytesMut::new();
        let hello = Hello {
            cluster: cluster.into(),
            source,
            target,
        };
        wire::encode_hello(&hello, &mut out).unwrap();
        out
    }

    /// Reads until the peer closes; fails the test if it does not.
    fn assert_closed(stream: &mut std::net::TcpStream) {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the link was not closed: {e}"),
            }
        }
    }

    #[test]
    fn a_bad_handshake_is_refused_with_its_reason() {
        let b = start(config(2, any_port(2)));
        let cases = [
            (hello_bytes("other", 1, 2), "cluster"),
            (hello_bytes("test", 1, 3), "this is node 2, not node 3"),
            (hello_bytes("test", 4, 2), "must wait"),
            (
                {
                    let mut h = hello_bytes("test", 1, 2);
                    h[4] = 9;
                    h
                },
                "version 9",
            ),
        ];
        for (hello, reason) in cases {
            let mut peer = std::net::TcpStream::connect(b.links.local_addr()).unwrap();
            peer.write_all(&hello).unwrap();
            let frame = read_frame(&mut peer).unwrap();
            let LinkFrame::Refuse(text) = wire::decode(&frame).unwrap() else {
                panic!("expected a refuse");
            };
            assert!(text.contains(reason), "{text:?} should say {reason:?}");
            assert_closed(&mut peer);
        }
        assert!(!b.links.is_connected(1));
    }

    #[test]
    fn a_malformed_frame_closes_the_link() {
        let b = start(config(2, any_port(2)));
        let mut peer = std::net::TcpStream::connect(b.links.local_addr()).unwrap();
        peer.write_all(&hello_bytes("test", 1, 2)).unwrap();
        let LinkFrame::Hello(hello) = wire::decode(&read_frame(&mut peer).unwrap()).unwrap() else {
            panic!("expected a hello");
        };
        assert_eq!((hello.source, hello.target), (2, 1));
        wait_for("link up", || b.links.is_connected(1));
        // A `send` frame whose body stops short.
        let mut bad = wire::encode_to_bytes(&request(1, 1, 1)).unwrap().to_vec();
        bad.truncate(30);
        bad[..4].copy_from_slice(&30u32.to_be_bytes());
        peer.write_all(&bad).unwrap();
        assert_closed(&mut peer);
        wait_for("link down", || !b.links.is_connected(1));
        assert_eq!(b.links.stats()[0].errors, 1);
        // Nothing reached the inbox but the peer's coming and going.
        while let Ok(event) = b.events.try_recv() {
            assert!(matches!(event, Event::Peer(1, _)), "{event:?}");
        }
    }

    #[test]
    fn requests_written_but_not_acknowledged_answer_unavailable_at_a_cut() {
        let fake = std::net::TcpListener::bind(any_port(2)).unwrap();
        let a = start(config(1, any_port(1)));
        a.links.add_peer(2, fake.local_addr().unwrap());
        let (mut peer, _) = fake.accept().unwrap();
        read_frame(&mut peer).unwrap();
        peer.write_all(&hello_bytes("test", 2, 1)).unwrap();
        wait_for("link up", || a.links.is_connected(2));
        for req in 0..3 {
            assert!(a.links.send(2, request(1, 4, req)).is_none());
        }
        // Node 2 reads the requests, acknowledges the first only, and dies.
        let mut seen = 0;
        while seen < 3 {
            if let LinkFrame::Bus(_) = wire::decode(&read_frame(&mut peer).unwrap()).unwrap() {
                seen += 1;
            }
        }
        let mut ack = BytesMut::new();
        wire::encode_heartbeat(1, &mut ack);
        // The acknowledgement arrives before the end of the stream, and the link thread acts
        // on the frames it read before it acts on the end.
        peer.write_all(&ack).unwrap();
        drop(peer);
        wait_for("link down", || !a.links.is_connected(2));
        let mut answered = Vec::new();
        while answered.len() < 2 {
            let (from, msg) = next_msg(&a);
            assert_eq!(from, 1);
            assert!(is_unavailable(&msg, 4), "{msg:?}");
            let text = match &msg {
                BusMsg::Deliver { ws_message, .. } => {
                    String::from_utf8_lossy(&ws_message[2..]).into_owned()
                }
                _ => unreachable!(),
            };
            assert!(text.contains("may or may not"), "{text}");
            answered.push(text);
        }
        assert!(
            answered[0].contains(r#""req":1"#) && answered[1].contains(r#""req":2"#),
            "{answered:?}"
        );
        assert_eq!(a.links.stats()[0].unavailable, 2);
        // The first, acknowledged, is the peer's to answer: nothing more comes.
        assert!(a
            .events
            .recv_timeout(Duration::from_millis(200))
            .map_or(true, |e| matches!(e, Event::Peer(..))));
    }

    #[test]
    fn a_newer_connection_replaces_the_old_and_the_old_ones_requests_are_answered() {
        let b = start(config(2, any_port(2)));
        // Node 1 (a stand-in) dials, and node 2 sends it two requests on that connection.
        let mut first = std::net::TcpStream::connect(b.links.local_addr()).unwrap();
        first.write_all(&hello_bytes("test", 1, 2)).unwrap();
        read_frame(&mut first).unwrap();
        wait_for("link up", || b.links.is_connected(1));
        for req in 0..2 {
            assert!(b.links.send(1, request(2, 6, req)).is_none());
        }
        let mut seen = 0;
        while seen < 2 {
            if let LinkFrame::Bus(_) = wire::decode(&read_frame(&mut first).unwrap()).unwrap() {
                seen += 1;
            }
        }
        // Node 1 dials again (it took the first connection for dead) without acknowledging.
        let mut second = std::net::TcpStream::connect(b.links.local_addr()).unwrap();
        second.write_all(&hello_bytes("test", 1, 2)).unwrap();
        read_frame(&mut second).unwrap();
        for _ in 0..2 {
            let (_, msg) = next_msg(&b);
            assert!(is_unavailable(&msg, 6), "{msg:?}");
        }
        assert_closed(&mut first);
        // The link goes on over the second connection.
        assert!(b.links.send(1, numbered(1, 2, 3)).is_none());
        loop {
            if let LinkFrame::Bus(msg) = wire::decode(&read_frame(&mut second).unwrap()).unwrap() {
                assert_eq!(number_of(&msg), (2, 3));
                break;
            }
        }
        assert!(b.links.is_connected(1));
    }

    #[test]
    fn random_bytes_from_peers_never_stop_the_link_thread() {
        let b = start(config(2, any_port(2)));
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..50 {
            let mut peer = std::net::TcpStream::connect(b.links.local_addr()).unwrap();
            if round % 2 == 0 {
                peer.write_all(&hello_bytes("test", 1, 2)).unwrap();
            }
            let len = 16 + (round * 37) % 300;
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            // Whatever the bytes, the connection ends (an error, or silence past the idle
            // timeout when they announce a frame longer than what follows).
            let _ = peer.write_all(&garbage);
            assert_closed(&mut peer);
        }
        // The thread still serves a good peer.
        let a = start(config(1, any_port(1)));
        mesh(&[&a, &b]);
        assert!(a.links.send(2, numbered(2, 1, 9)).is_none());
        assert_eq!(number_of(&next_msg(&b).1), (1, 9));
    }

    #[test]
    fn a_peer_that_stops_reading_costs_the_queue_bound_and_no_more() {
        const BOUND: usize = 1 << 20;
        let fake = std::net::TcpListener::bind(any_port(2)).unwrap();
        let a = start(LinkConfig {
            queue_bytes_max: BOUND,
            request_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            ..config(1, any_port(1))
        });
        a.links.add_peer(2, fake.local_addr().unwrap());
        let (mut peer, _) = fake.accept().unwrap();
        let hello = read_frame(&mut peer).unwrap();
        assert!(matches!(wire::decode(&hello).unwrap(), LinkFrame::Hello(_)));
        peer.write_all(&hello_bytes("test", 2, 1)).unwrap();
        wait_for("link up", || a.links.is_connected(2));
        // Node 2 reads no more. Requests of 64 KiB each, far more than the socket buffers
        // and the bound together.
        let body = "x".repeat(64 * 1024);
        let mut refused = 0;
        for req in 0..2_000 {
            let mut msg = request(1, 1, req);
            if let BusMsg::Read { origin, .. } = msg {
                msg = BusMsg::Send(Box::new(crate::bus::SendRequest {
                    origin: *origin,
                    target: chinwag_protocol::Target::Conv(ConvId(1)),
                    cmid: format!("c{req}"),
                    kind: "text".into(),
                    body: body.clone(),
                    profile: None,
                    profile_pending: false,
                }));
            }
            if let Some(answer) = a.links.send(2, msg) {
                assert!(is_unavailable(&answer, 1));
                refused += 1;
            }
            assert!(a.links.stats()[0].queue_bytes as usize <= BOUND);
        }
        assert!(refused > 1_000, "only {refused} refused");
        assert_eq!(a.links.stats()[0].unavailable, refused);
        drop(peer);
    }

    #[test]
    fn the_office_inbox_posts_to_the_right_shard_and_refuses_when_full() {
        use crate::bus::mailbox::Mailbox;
        let polls = [Poll::new().unwrap(), Poll::new().unwrap()];
        let mailboxes = polls
            .iter()
            .map(|poll| Mailbox::new(2, Waker::new(poll.registry(), Token(0)).unwrap()))
            .collect();
        // Two shards of 256 partitions (all of them this node's): partition p on shard p % 2.
        let partitions = Arc::new(PartitionMap::single_node(256, 2));
        let office = Arc::new(PostOffice::new(mailboxes, Arc::clone(&partitions)));
        let mut inbox = OfficeInbox {
            office: Arc::clone(&office),
            partitions,
        };
        let to_shard_1 = SessionRef {
            shard: 1,
            ..session(1, 3)
        };
        let deliver = BusMsg::Deliver {
            to: to_shard_1,
            ws_message: frame::encode(Opcode::Text, b"{}"),
        };
        assert!(inbox.deliver(2, deliver).is_none());
        assert_eq!(office.depths(), [0, 1]);
        let push = crate::bus::Fanout::new(
            [Uid::new(UidKind::Buyer, 1)].into_iter().collect(),
            None,
            chinwag_protocol::Message::Kicked("x".into()),
        );
        assert!(inbox.deliver(2, BusMsg::Push(Arc::new(push))).is_none());
        assert_eq!(office.depths(), [1, 2], "a push goes to every shard");
        // The owner of conversation 1 is shard 1, whose mailbox is full: the request is
        // answered for its session on node 1, to be sent back there.
        let answer = inbox.deliver(2, request(1, 8, 5)).expect("refused");
        assert!(is_unavailable(&answer, 8));
        assert_eq!(answer.session().unwrap().node, 1);
        // Where partition 1 is another node's, the request reaches no shard and is answered.
        let mut elsewhere = OfficeInbox {
            office: Arc::clone(&office),
            partitions: Arc::new(PartitionMap::from_assignment(
                (0..256u16).map(|p| (p != 1).then_some(p % 2)).collect(),
                2,
            )),
        };
        let answer = elsewhere.deliver(2, request(1, 9, 6)).expect("refused");
        assert!(is_unavailable(&answer, 9));
        let BusMsg::Deliver { ws_message, .. } = &answer else {
            unreachable!()
        };
        assert!(std::str::from_utf8(&ws_message[2..])
            .unwrap()
            .contains("not on this node"));
        assert_eq!(office.depths(), [1, 2], "nothing posted");
    }

    /// A peer's stream read covers this node's partitions: each shard gets a read of its own;
    /// the partitions of a shard that cannot take it, and those not served here, come back to
    /// the asker as not moved (it reads them again on its next poll).
    #[test]
    fn the_office_inbox_splits_a_stream_read_over_the_shards_and_answers_what_it_cannot_read() {
        use crate::bus::mailbox::Mailbox;
        let polls = [Poll::new().unwrap(), Poll::new().unwrap()];
        let mailboxes = polls
            .iter()
            .map(|poll| Mailbox::new(1, Waker::new(poll.registry(), Token(0)).unwrap()))
            .collect();
        // Partitions 0..5 here: 0, 2, 4 on shard 0, 1 and 3 on shard 1; 5..8 another node's.
        let partitions = Arc::new(PartitionMap::from_assignment(
            (0..8u16).map(|p| (p < 5).then_some(p % 2)).collect(),
            2,
        ));
        let office = Arc::new(PostOffice::new(mailboxes, Arc::clone(&partitions)));
        let mut inbox = OfficeInbox {
            office: Arc::clone(&office),
            partitions,
        };
        let session = crate::bus::SessionRef {
            node: 2,
            shard: 1,
            slot: 7,
            generation: 1,
        };
        let read = |from: &[(PartitionId, u64)]| BusMsg::StreamRead {
            session,
            from: from.into(),
        };
        let all: Vec<(PartitionId, u64)> = (0..5).map(|p| (p, 10 + u64::from(p))).collect();
        assert!(inbox.deliver(2, read(&all)).is_none());
        let mut reads = Vec::new();
        for shard in 0..2 {
            let mut got = Vec::new();
            office.mailbox(shard).drain(8, |msg| got.push(msg));
            let [BusMsg::StreamRead { from, session: s }] = got.as_slice() else {
                panic!("{got:?}");
            };
            assert_eq!(*s, session);
            reads.push(from.to_vec());
        }
        assert_eq!(
            reads,
            [vec![(0, 10), (2, 12), (4, 14)], vec![(1, 11), (3, 13)]]
        );
        // Shard 0's mailbox (of one) full, and partition 6 not served here: those come back
        // unmoved, for the session; shard 1's read goes.
        office
            .post_from_outside(
                0,
                BusMsg::AgentOffline {
                    shop: chinwag_protocol::ShopId(1),
                    agent: Uid::new(UidKind::Agent, 1),
                },
            )
            .unwrap();
        let answer = inbox
            .deliver(2, read(&[(0, 10), (1, 11), (6, 16)]))
            .expect("answered");
        let BusMsg::StreamPart(part) = &answer else {
            panic!("{answer:?}");
        };
        assert_eq!(part.session, session);
        let found = part.result.as_ref().expect("not refused");
        assert!(found.msgs.is_empty() && found.events.is_empty());
        assert_eq!(found.next, [(0, 10), (6, 16)]);
        assert_eq!(office.depths(), [1, 1]);
    }

    /// A peer's `convs` part request covers this node's partitions: each shard gets one with
    /// its own count; a shard that cannot take it answers for the node with the failed part.
    #[test]
    fn the_office_inbox_splits_a_convs_request_over_the_shards_by_their_partitions() {
        use crate::bus::mailbox::Mailbox;
        let polls = [Poll::new().unwrap(), Poll::new().unwrap()];
        let mailboxes = polls
            .iter()
            .map(|poll| Mailbox::new(1, Waker::new(poll.registry(), Token(0)).unwrap()))
            .collect();
        // Partitions 0..5 here: 0, 2, 4 on shard 0, 1 and 3 on shard 1; 5..8 another node's.
        let partitions = Arc::new(PartitionMap::from_assignment(
            (0..8u16).map(|p| (p < 5).then_some(p % 2)).collect(),
            2,
        ));
        let office = Arc::new(PostOffice::new(mailboxes, Arc::clone(&partitions)));
        let mut inbox = OfficeInbox {
            office: Arc::clone(&office),
            partitions,
        };
        let BusMsg::Read { origin, .. } = request(1, 4, 3) else {
            unreachable!()
        };
        let convs = |origin: &crate::bus::Origin| BusMsg::Convs {
            origin: Box::new(*origin),
            token: 9,
            partitions: 5,
        };
        assert!(inbox.deliver(1, convs(&origin)).is_none());
        let mut counts = Vec::new();
        for shard in 0..2 {
            let mut got = Vec::new();
            office.mailbox(shard).drain(8, |msg| got.push(msg));
            let [BusMsg::Convs { partitions, .. }] = got.as_slice() else {
                panic!("{got:?}");
            };
            counts.push(*partitions);
        }
        assert_eq!(counts, [3, 2]);
        // Shard 0's mailbox (of one) full: its part fails, for the asker; shard 1's goes.
        office
            .post_from_outside(
                0,
                BusMsg::AgentOffline {
                    shop: chinwag_protocol::ShopId(1),
                    agent: Uid::new(UidKind::Agent, 1),
                },
            )
            .unwrap();
        let answer = inbox.deliver(1, convs(&origin)).expect("refused");
        assert!(
            matches!(
                answer,
                BusMsg::ConvsPart {
                    token: 9,
                    convs: None,
                    partitions: 3,
                    ..
                }
            ),
            "{answer:?}"
        );
        assert_eq!(office.depths(), [1, 1]);
    }

    /// Counts what arrives, for the throughput measurement.
    struct CountingInbox(Arc<AtomicU64>);

    impl Inbox for CountingInbox {
        fn deliver(&mut self, _from: u16, msg: BusMsg) -> Option<BusMsg> {
            drop(msg);
            self.0.fetch_add(1, Ordering::Release);
            None
        }

        fn peer_changed(&mut self, _node: u16, _up: bool) {}
    }

    /// Link throughput between two nodes on this machine: messages per second and bytes per
    /// message for a forwarded chat `send` and for fan-out pushes to k recipients, batched
    /// (up to 256 frames per write) against one frame per write. The sender thread encodes
    /// and queues, the link threads write and read, the receiver's thread decodes; the
    /// figure is the whole path. Run with:
    /// `cargo test -p chinwag-engine --release --lib link_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark: run it by hand in release (command in its doc)"]
    fn link_throughput() {
        use chinwag_protocol::{Message, Msg, MsgPush, Target};
        const N: u64 = 100_000;
        /// Runs per figure; the median is shown (the machine is shared).
        const RUNS: usize = 5;
        let body = "a chat message of about a hundred bytes, as people type them in a shop chat.";
        let send = |i: u64| {
            let BusMsg::Read { origin, .. } = request(1, 1, i) else {
                unreachable!()
            };
            BusMsg::Send(Box::new(crate::bus::SendRequest {
                origin: *origin,
                target: Target::Conv(ConvId(0x0001_0005)),
                cmid: format!("cmid-{i}"),
                kind: "text".into(),
                body: body.into(),
                profile: None,
                profile_pending: false,
            }))
        };
        let push = |k: u64, i: u64| {
            let msg = Message::Msg(MsgPush::bare(Msg {
                conv: ConvId(0x0001_0005),
                seq: Seq(i + 1),
                from: Uid::new(UidKind::Buyer, 1),
                ts: 1_700_000_000_000,
                kind: "text".into(),
                body: body.into(),
                cmid: format!("cmid-{i}").into(),
            }));
            let users = (0..k).map(|u| Uid::new(UidKind::Buyer, u)).collect();
            BusMsg::Push(Arc::new(crate::bus::Fanout::new(users, None, msg)))
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        println!("{cpu}");
        println!("| message | frames per write | messages/s (median of {RUNS}) | bytes/message |");
        println!("|---|---|---|---|");
        type Make<'a> = &'a dyn Fn(u64) -> BusMsg;
        let push1 = |i| push(1, i);
        let push10 = |i| push(10, i);
        let push100 = |i| push(100, i);
        let cases: [(&str, Make<'_>); 4] = [
            ("chat send (request to the owner)", &send),
            ("push, k = 1", &push1),
            ("push, k = 10", &push10),
            ("push, k = 100", &push100),
        ];
        for (name, make) in cases {
            for frames_per_write_max in [256, 1] {
                let mut rates = Vec::new();
                let mut bytes_per_message = 0;
                for _ in 0..RUNS {
                    let received = Arc::new(AtomicU64::new(0));
                    let (b, _b_thread) = Links::start(
                        LinkConfig {
                            queue_bytes_max: 1 << 30,
                            frames_per_write_max,
                            ..LinkConfig::new("bench", 2, any_port(2))
                        },
                        CountingInbox(Arc::clone(&received)),
                    )
                    .unwrap();
                    let (a, _a_thread) = Links::start(
                        LinkConfig {
                            queue_bytes_max: 1 << 30,
                            frames_per_write_max,
                            ..LinkConfig::new("bench", 1, any_port(1))
                        },
                        CountingInbox(Arc::new(AtomicU64::new(0))),
                    )
                    .unwrap();
                    a.add_peer(2, b.local_addr());
                    b.add_peer(1, a.local_addr());
                    wait_for("link up", || a.is_connected(2));
                    // Made beforehand: the figure is the link's, not the making of messages.
                    let msgs: Vec<BusMsg> = (0..N).map(make).collect();
                    let start = Instant::now();
                    for msg in msgs {
                        assert!(a.send(2, msg).is_none());
                    }
                    while received.load(Ordering::Acquire) < N {
                        thread::sleep(Duration::from_micros(200));
                    }
                    let elapsed = start.elapsed();
                    let stats = &a.stats()[0];
                    rates.push(N as f64 / elapsed.as_secs_f64());
                    bytes_per_message = stats.bytes_out / stats.messages_out;
                }
                rates.sort_by(f64::total_cmp);
                println!(
                    "| {name} | {frames_per_write_max} | {:.0} | {bytes_per_message} |",
                    rates[RUNS / 2],
                );
            }
        }
    }
}
