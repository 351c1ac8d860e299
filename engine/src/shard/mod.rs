//! A shard: one thread, one `mio::Poll`, one listener, one slab of sessions.
//!
//! A shard owns its sockets outright; no other thread touches them. Work from other threads
//! arrives in the shard's [`Mailbox`](crate::bus::mailbox::Mailbox), drained once per loop turn.
//!
//! One loop turn:
//! 1. wait for events (or until the next timer sweep);
//! 2. accept new connections until `WouldBlock`; read each readable session, handling every
//!    whole frame — replies only go into the session's outbox and mark it dirty;
//! 3. drain the mailbox (bus messages: requests for this shard as an owner, replies and pushes
//!    for its sessions), then commit the owner's log and send what the commit released;
//! 4. flush every dirty session with one vectored write: whatever the turn produced for a
//!    socket leaves in one system call (write corking); with `push_flush_delay_ms`, pushes
//!    wait for the shard's push flush instead (outbox::HeldPushes), unless a reply goes first;
//! 5. every few tens of milliseconds, sweep a share of the slab for handshake, idle and close
//!    timeouts (every slot is checked once per pass of at most a second).

mod announce;
pub mod app;
pub mod context;
pub mod local;
pub mod outbox;
pub mod service;
pub mod session;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::bus::post::{Post, PostOffice, To};
use crate::bus::{BusMsg, SessionRef};
use crate::logic::{self, Owner};
use crate::net::ws::connection::CloseReason;
use crate::operator::metrics;
use crate::operator::NodeState;
use context::Context;
use local::{LocalDevice, LocalDevices};
use service::{HttpHandover, ServiceConn, SERVICE_SLOT_BIT, SERVICE_TOKEN_BASE};
use session::Session;

const BACKEND_LISTENER: Token = Token(usize::MAX - 2);
const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX);

/// The shard-wide read buffer; every socket of the shard reads into it.
const READ_BUFFER_BYTES: usize = 64 * 1024;
const _: () = assert!(READ_BUFFER_BYTES > session::CARRY_BYTES_MAX);

/// Events handled per loop turn. A turn reads every ready socket and then writes every dirty
/// one; a smaller turn keeps the sockets it touches warm in the cache between the two.
const EVENTS_PER_TURN: usize = 128;

/// Mailbox messages handled per loop turn, so a flood from other shards cannot starve sockets.
const MAILBOX_BATCH: usize = 4096;

/// A pass is done in ticks of at most this long, each checking its share of the slab, so a
/// shard of half a million connections never stalls a turn for a whole pass.
const SWEEP_TICK_MS: u64 = 50;

pub struct Shard {
    poll: Poll,
    listener: Option<TcpListener>,
    sessions: Slab<Session>,
    /// The service port's listener (docs/backend.md): each shard has one, bound with
    /// SO_REUSEPORT like the client port, so the kernel spreads services over the shards.
    backend_listener: Option<TcpListener>,
    /// Backend services' connections (tokens from `SERVICE_TOKEN_BASE`).
    services: Slab<ServiceConn>,
    /// The conversations, devices and shops this shard owns.
    owner: Owner,
    /// This shard's part of the routing table: its logged-in sessions by user.
    local: LocalDevices,
    /// Mailbox messages taken this turn, handled after the drain.
    inbox: Vec<BusMsg>,
    rbuf: Box<[u8]>,
    ctx: Context,
    next_generation: u32,
    /// Where the timeout sweep goes on from.
    sweep_cursor: usize,
    started: Instant,
    accept_warned_ms: Option<u64>,
}

impl Shard {
    /// A shard with its `poll` (whose waker is in `office.mailbox(shard_id)`) and listener.
    pub fn new(
        shard_id: usize,
        node: Arc<NodeState>,
        office: Arc<PostOffice>,
        poll: Poll,
        mut listener: TcpListener,
        mut backend_listener: TcpListener,
        owner: Owner,
    ) -> io::Result<Shard> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut backend_listener, BACKEND_LISTENER, Interest::READABLE)?;
        let ws_limits = context::ws_limits(&node.config);
        // A session takes a run of held pushes in one piece: half its queue leaves room for
        // what is queued around them (the same share as a reply's, Config::reply_bytes_max).
        let held = outbox::HeldPushes::new(
            node.config.push_flush_delay_ms,
            node.config.reply_bytes_max(),
        );
        Ok(Shard {
            poll,
            listener: Some(listener),
            sessions: Slab::new(),
            backend_listener: Some(backend_listener),
            services: Slab::new(),
            owner,
            local: LocalDevices::default(),
            inbox: Vec::new(),
            rbuf: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            ctx: Context {
                shard_id,
                node,
                post: Post::new(shard_id, office),
                ws_limits,
                now_ms: 0,
                unix_ms: logic::unix_ms(),
                dirty: Vec::new(),
                read_again: Vec::new(),
                held,
                handover: None,
                api_requests_open: 0,
            },
            next_generation: first_generation(),
            sweep_cursor: 0,
            started: Instant::now(),
            accept_warned_ms: None,
        })
    }

    /// Runs the loop until the node has drained. Returns an error only if polling fails.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_TURN);
        let sweep_pass_ms = context::sweep_pass_ms(&self.ctx.ws_limits);
        let sweep_tick_ms = sweep_pass_ms.min(SWEEP_TICK_MS);
        let mut next_sweep_ms = sweep_tick_ms;
        let mut drained = false;
        let mut drain_started_ms = 0;
        // This shard's connections are drained; it waits for the other shards' before it exits.
        let mut shard_drained = false;
        let maintenance_interval_ms = self.ctx.node.config.log_maintenance_interval_ms;
        let mut next_maintenance_ms = maintenance_interval_ms;
        loop {
            // Reads posted after the last turn's mail (a stream pumped by a write) are taken
            // up at once.
            let timeout_ms = if self.ctx.read_again.is_empty() && self.ctx.post.is_empty() {
                let wake_ms = self
                    .ctx
                    .held
                    .due_ms()
                    .map_or(next_sweep_ms, |due_ms| due_ms.min(next_sweep_ms));
                wake_ms.saturating_sub(self.started.elapsed().as_millis() as u64)
            } else {
                0
            };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(timeout_ms)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let turn_start = Instant::now();
            self.ctx.now_ms = turn_start.duration_since(self.started).as_millis() as u64;
            self.ctx.unix_ms = logic::unix_ms();

            for token in std::mem::take(&mut self.ctx.read_again) {
                self.on_readable(token, false);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    BACKEND_LISTENER => self.accept_services(),
                    // The mailbox is drained below, once per turn, whatever woke us.
                    WAKER => {}
                    token if token.0 >= SERVICE_TOKEN_BASE => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(token, false);
                        }
                        if event.is_writable() {
                            self.on_writable(token);
                        }
                    }
                    token => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(token, event.is_read_closed() || event.is_error());
                        }
                        if event.is_writable() {
                            self.on_writable(token);
                        }
                    }
                }
            }
            self.drain_mailbox();
            self.send_and_commit();
            if self.ctx.now_ms >= next_sweep_ms {
                self.publish_log_metrics();
            }
            if self.ctx.now_ms >= next_maintenance_ms {
                self.owner.maintain(self.ctx.unix_ms);
                next_maintenance_ms = self.ctx.now_ms + maintenance_interval_ms;
            }
            if !drained && self.ctx.is_draining() {
                drained = true;
                drain_started_ms = self.ctx.now_ms;
                self.start_drain();
            }
            // Probes keep arriving during a drain; after as long as the close handshakes may
            // take, stop accepting them so that a steady stream cannot hold the node up.
            let close_timeout_ms = self.ctx.node.config.close_timeout_ms;
            if drained && self.ctx.now_ms >= drain_started_ms.saturating_add(close_timeout_ms) {
                self.stop_accepting();
            }
            if self.ctx.held.is_due(self.ctx.now_ms) {
                self.release_held_pushes();
            }
            self.flush_dirty();
            if self.ctx.now_ms >= next_sweep_ms {
                // Each tick covers tick/pass of the slab, so every slot is seen once a pass.
                let slots = self
                    .sessions
                    .capacity()
                    .div_ceil((sweep_pass_ms / sweep_tick_ms) as usize);
                self.sweep(slots);
                self.flush_dirty();
                next_sweep_ms = self.ctx.now_ms + sweep_tick_ms;
            }
            self.ctx
                .metrics()
                .record_turn(turn_start.elapsed().as_micros() as u64);
            if drained && self.sessions.is_empty() && !shard_drained {
                shard_drained = true;
                self.ctx.node.shard_drained(self.ctx.shard_id);
                self.ctx.post.office().wake_all();
            }
            if shard_drained && self.ctx.node.all_drained() {
                // Whatever the last sessions posted (their logouts) is handled, then the log
                // is flushed and snapshotted so the next start replays little.
                self.send_and_commit();
                self.owner.close_logs();
                tracing::info!(shard = self.ctx.shard_id, "drained");
                return Ok(());
            }
        }
    }

    fn accept(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Typically EMFILE. The connection stays in the backlog until a later
                    // accept succeeds; say so at most once a second.
                    metrics::add(&self.ctx.metrics().accept_errors, 1);
                    if self
                        .accept_warned_ms
                        .map_or(true, |ms| self.ctx.now_ms >= ms + 1000)
                    {
                        self.accept_warned_ms = Some(self.ctx.now_ms);
                        tracing::warn!(shard = self.ctx.shard_id, error = %e, "accept failed");
                    }
                    return;
                }
            };
            let m = self.ctx.metrics();
            if self.sessions.len() >= self.ctx.node.config.connections_per_shard_max {
                // Dropping the stream closes it: the cheapest refusal, and the client sees it.
                metrics::add(&m.connections_refused, 1);
                continue;
            }
            // Small frames are the norm (chat); corking per loop turn already batches them.
            let _ = stream.set_nodelay(true);
            let entry = self.sessions.vacant_entry();
            let token = Token(entry.key());
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(shard = self.ctx.shard_id, error = %e, "register failed");
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            entry.insert(Session::new(
                stream,
                token.0,
                self.next_generation,
                self.ctx.now_ms,
            ));
            metrics::add(&m.connections_accepted, 1);
            metrics::add(&m.connections_open, 1);
        }
    }

    /// Accepts service-port connections until `WouldBlock`.
    fn accept_services(&mut self) {
        let Some(listener) = self.backend_listener.as_ref() else {
            return;
        };
        loop {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    metrics::add(&self.ctx.metrics().accept_errors, 1);
                    tracing::warn!(shard = self.ctx.shard_id, error = %e, "service accept failed");
                    return;
                }
            };
            let binary_open = self.services.len() - self.ctx.api_requests_open;
            if binary_open >= self.ctx.node.config.backend_connections_per_shard_max {
                metrics::add(&self.ctx.metrics().connections_refused, 1);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let entry = self.services.vacant_entry();
            let token = Token(SERVICE_TOKEN_BASE + entry.key());
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(shard = self.ctx.shard_id, error = %e, "register failed");
                continue;
            }
            self.next_generation = self.next_generation.wrapping_add(1);
            let key = entry.key();
            entry.insert(ServiceConn::new(
                stream,
                key,
                self.next_generation,
                &self.ctx,
            ));
            tracing::debug!(shard = self.ctx.shard_id, slot = key, "service connected");
        }
    }

    fn on_readable(&mut self, token: Token, peer_closed: bool) {
        if let Some(key) = token.0.checked_sub(SERVICE_TOKEN_BASE) {
            let Some(service) = self.services.get_mut(key) else {
                return;
            };
            if service.on_readable(&mut self.rbuf, &mut self.ctx) {
                self.remove_service(key);
            }
            return;
        }
        // A token may be stale (its session ended earlier this turn): nothing to do then.
        let Some(session) = self.sessions.get_mut(token.0) else {
            return;
        };
        if session.on_readable(&mut self.rbuf, peer_closed, &mut self.ctx) {
            match self.ctx.handover.take() {
                Some(handover) => self.hand_over(token, *handover),
                None => self.remove(token),
            }
        }
    }

    /// Moves the socket of the session at `token`, which read the head of an API request, to
    /// a service connection that serves the request (shard::service, "The HTTP form"). For
    /// the client port's metrics the session ends there, as an answered HTTP request.
    fn hand_over(&mut self, token: Token, handover: HttpHandover) {
        let session = self.sessions.remove(token.0);
        let m = self.ctx.metrics();
        metrics::sub(&m.connections_open, 1);
        metrics::sub(&m.send_queue_bytes, session.outbox_bytes() as u64);
        m.closed(CloseReason::HttpDone);
        let mut stream = session.into_stream();
        let entry = self.services.vacant_entry();
        let key = entry.key();
        let service_token = Token(SERVICE_TOKEN_BASE + key);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .reregister(&mut stream, service_token, interest)
        {
            tracing::warn!(shard = self.ctx.shard_id, error = %e, "reregister failed");
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let conn = ServiceConn::for_api(stream, key, self.next_generation, handover, &mut self.ctx);
        entry.insert(conn);
        self.ctx.api_requests_open += 1;
        // Bytes that arrived while the socket changed hands raise no new edge: look once.
        self.ctx.read_again.push(service_token);
    }

    /// Drops the service connection in slot `key` (closing its socket).
    fn remove_service(&mut self, key: usize) {
        if self.services.try_remove(key).is_some_and(|s| s.is_api()) {
            self.ctx.api_requests_open -= 1;
        }
    }

    fn on_writable(&mut self, token: Token) {
        if let Some(key) = token.0.checked_sub(SERVICE_TOKEN_BASE) {
            self.flush_service(key);
            return;
        }
        let Some(session) = self.sessions.get_mut(token.0) else {
            return;
        };
        if session.wants_flush() && session.flush(&mut self.ctx) {
            self.remove(token);
        }
    }

    /// Writes what service connection `key` has queued. A stream subscriber whose backlog
    /// the write took asks the logs for more at once: waiting for the next sweep tick would
    /// pace a lagging subscriber at one read per tick.
    fn flush_service(&mut self, key: usize) {
        let Some(service) = self.services.get_mut(key) else {
            return;
        };
        if service.flush() {
            self.remove_service(key);
        } else {
            service.pump_stream(false, &mut self.ctx);
        }
    }

    /// Hands the held pushes out (`push_flush_delay_ms`): one pass over each run's users, and
    /// one buffer with all of a run's frames for each recipient session, written with
    /// whatever else the session has queued by the `flush_dirty` that follows.
    fn release_held_pushes(&mut self) {
        let release = self.ctx.held.release();
        let mut delivered = 0;
        for run in &release.runs {
            for uid in run.users() {
                for d in self.local.of(*uid) {
                    // The table and the slab change together (login, `remove`).
                    let Some(session) = self.sessions.get_mut(d.slot as usize) else {
                        continue;
                    };
                    if session.generation() != d.generation {
                        continue;
                    }
                    let from = release.from(d.slot, d.generation);
                    if let Some((bytes, frames)) = run.frames_for(from, d.device, d.encoding) {
                        session.push(bytes, frames, &mut self.ctx);
                        delivered += frames;
                    }
                }
            }
        }
        metrics::add(&self.ctx.metrics().pushes_delivered, delivered);
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.ctx.dirty);
        for token in dirty.drain(..) {
            if let Some(key) = token.0.checked_sub(SERVICE_TOKEN_BASE) {
                self.flush_service(key);
                continue;
            }
            let Some(session) = self.sessions.get_mut(token.0) else {
                continue;
            };
            if session.flush(&mut self.ctx) {
                self.remove(token);
            }
        }
        // Hand the (now empty) list back to keep its capacity for the next turn.
        self.ctx.dirty = dirty;
    }

    fn drain_mailbox(&mut self) {
        self.ctx.post.receive(MAILBOX_BATCH, &mut self.inbox);
        metrics::add(
            &self.ctx.metrics().mailbox_messages,
            self.inbox.len() as u64,
        );
        let mut inbox = std::mem::take(&mut self.inbox);
        for msg in inbox.drain(..) {
            self.handle(msg);
        }
        // Keep the buffer's capacity for the next turn.
        self.inbox = inbox;
    }

    /// Sends the turn's posted messages (to this shard's owner or through other shards'
    /// mailboxes), then commits the owner's log and sends what the commit released. Handling
    /// a released message can post more (a completed login tells the shop's dispatcher), so
    /// this goes round until nothing is left.
    fn send_and_commit(&mut self) {
        // Partitions this shard just took over: their owner has forgotten where their users'
        // devices are logged in, so every shard and node is asked to announce them.
        let taken = self.owner.take_taken_over();
        if !taken.is_empty() {
            self.ctx.post.office().ask_for_sessions(&taken);
        }
        loop {
            for (to, msg) in self.ctx.post.take() {
                self.deliver(to, msg);
            }
            for (to, msg) in self.owner.commit() {
                self.deliver(to, msg);
            }
            if self.ctx.post.is_empty() {
                return;
            }
        }
    }

    /// Copies the owner's counters and the log's gauges into the shard's metrics (once per
    /// sweep tick, not per message).
    fn publish_log_metrics(&self) {
        let m = self.ctx.metrics();
        let stats = self.owner.log_stats();
        let set = |gauge: &std::sync::atomic::AtomicU64, v: u64| {
            gauge.store(v, std::sync::atomic::Ordering::Relaxed)
        };
        set(&m.messages_stored, self.owner.messages_stored);
        for (gauge, count) in m.send_ok_buckets.iter().zip(self.owner.send_ok_buckets) {
            set(gauge, count);
        }
        set(&m.send_ok_us_sum, self.owner.send_ok_us_sum);
        set(&m.log_commit_failures, self.owner.commit_failures);
        set(&m.log_conversations, stats.conversations as u64);
        set(&m.log_devices, stats.devices as u64);
        set(&m.log_segment_bytes, stats.segment_bytes);
        set(&m.log_partitions_open, stats.partitions as u64);
        set(&m.replication_held_turns, self.owner.held_turns() as u64);
        set(&m.replication_held_bytes, self.owner.held_bytes() as u64);
    }

    fn deliver(&mut self, to: To, msg: BusMsg) {
        if let Some(msg) = self.ctx.post.send(to, msg, self.ctx.metrics()) {
            self.handle(msg);
        }
    }

    /// Acts on one message for this shard.
    fn handle(&mut self, msg: BusMsg) {
        // Slots and generations mean something on their own node only: a message for a
        // session of another node (a routing mistake) must not reach a session of this one.
        if let Some(to) = msg.session() {
            if !to.is_on(self.ctx.node_number()) {
                tracing::warn!(
                    node = to.node,
                    "message for a session of another node dropped"
                );
                return;
            }
        }
        match msg {
            BusMsg::Deliver { to, ws_message } if to.slot & SERVICE_SLOT_BIT != 0 => {
                let key = (to.slot & !SERVICE_SLOT_BIT) as usize;
                if let Some(service) = self.services.get_mut(key) {
                    if service.generation() == to.generation {
                        service.deliver(ws_message, &mut self.ctx);
                    }
                }
            }
            BusMsg::PresencePart {
                session: to,
                token,
                online,
            } => {
                let key = (to.slot & !SERVICE_SLOT_BIT) as usize;
                if let Some(service) = self.services.get_mut(key) {
                    if service.generation() == to.generation {
                        service.on_presence_part(token, online, &mut self.ctx);
                    }
                }
            }
            BusMsg::StreamPart(part) => {
                let to = part.session;
                let key = (to.slot & !SERVICE_SLOT_BIT) as usize;
                if let Some(service) = self.services.get_mut(key) {
                    if service.generation() == to.generation {
                        service.on_stream_part(*part, &mut self.ctx);
                    }
                }
            }
            BusMsg::Deliver { to, ws_message } => {
                if let Some(session) = session_in(&mut self.sessions, to.slot, to.generation) {
                    session.send(ws_message, &mut self.ctx);
                }
            }
            BusMsg::Push(fanout) if self.ctx.held.enabled() => {
                self.ctx.held.hold(fanout, self.ctx.now_ms);
            }
            BusMsg::Push(fanout) => {
                for uid in &fanout.users {
                    for d in self.local.of(*uid) {
                        if Some(d.device) == fanout.except {
                            continue;
                        }
                        // The table and the slab change together (login, `remove`).
                        if let Some(session) = self.sessions.get_mut(d.slot as usize) {
                            if session.generation() == d.generation {
                                let frame = fanout.ws_message(d.encoding).clone();
                                session.push(frame, 1, &mut self.ctx);
                                metrics::add(&self.ctx.metrics().pushes_delivered, 1);
                            }
                        }
                    }
                }
            }
            BusMsg::Registered {
                session: to,
                uid,
                device,
                profile,
            } => {
                let completed = match self.sessions.get_mut(to.slot as usize) {
                    Some(session) if session.generation() == to.generation => session
                        .with_app(&mut self.ctx, |app, s, ctx| {
                            app.on_registered(device, profile, s, ctx)
                        }),
                    _ => false,
                };
                match (completed, device) {
                    (true, Some(device)) => self.logged_in(to, uid, device),
                    // The session ended while its device was being registered.
                    (false, Some(device)) => self.tell_owner(BusMsg::Unregister {
                        session: to,
                        uid,
                        device,
                    }),
                    _ => {}
                }
            }
            BusMsg::Kick {
                session: to,
                by_service,
            } => {
                if let Some(session) = session_in(&mut self.sessions, to.slot, to.generation) {
                    session.with_app(&mut self.ctx, |app, s, ctx| app.kick(by_service, s, ctx));
                }
            }
            BusMsg::OwnProfile {
                session: to,
                profile,
            } => {
                if let Some(session) = session_in(&mut self.sessions, to.slot, to.generation) {
                    session.with_app(&mut self.ctx, |app, _, _| app.on_own_profile(profile));
                }
            }
            BusMsg::ConvsPart {
                session: to,
                token,
                partitions,
                convs,
            } => {
                if let Some(session) = session_in(&mut self.sessions, to.slot, to.generation) {
                    session.with_app(&mut self.ctx, |app, s, ctx| {
                        app.on_convs_part(token, partitions, convs, s, ctx)
                    });
                }
            }
            BusMsg::Reannounce { partitions } => self.announce(&partitions),
            // Everything else is for this shard as an owner.
            request => self.owner.handle(request, self.ctx.unix_ms),
        }
    }

    /// A session completed its login: route its pushes here, record the route in the cluster's
    /// routing table (queued, never waited for), and tell the dispatcher of an agent's shop.
    fn logged_in(
        &mut self,
        to: SessionRef,
        uid: chinwag_protocol::Uid,
        device: chinwag_protocol::DeviceId,
    ) {
        let Some(session) = self.sessions.get(to.slot as usize) else {
            return;
        };
        let Some((_, _, shop, encoding)) = session.app().logged_in() else {
            return;
        };
        metrics::add(&self.ctx.metrics().sessions_logged_in, 1);
        if let Some(cluster) = &self.ctx.node.cluster {
            cluster.route_login(uid, device, to);
        }
        // Pushes held before the login were not for this session.
        self.ctx.held.skip_for(to.slot, to.generation);
        self.local.insert(
            uid,
            LocalDevice {
                device,
                slot: to.slot,
                generation: to.generation,
                encoding,
            },
        );
        if let Some(shop) = shop {
            let profile = session.app().own_profile().cloned().map(Box::new);
            self.tell_owner(BusMsg::AgentOnline {
                shop,
                agent: uid,
                profile,
            });
        }
    }

    /// Posts a notice (no answer expected) to the owner of its subject, here or on its node.
    fn tell_owner(&mut self, msg: BusMsg) {
        if let Err(unrouted) = self.ctx.post_to_owner(msg) {
            tracing::debug!(msg = ?unrouted.msg, why = unrouted.text, "notice dropped");
        }
    }

    /// Starts the close handshake on every connection. The listener stays open, so load
    /// balancers can see the drain (`/healthz` answers 503, upgrades get 503) until the node
    /// exits or [`Shard::stop_accepting`] closes it.
    fn start_drain(&mut self) {
        tracing::info!(
            shard = self.ctx.shard_id,
            connections = self.sessions.len(),
            "draining"
        );
        let done: Vec<usize> = self
            .sessions
            .iter_mut()
            .filter_map(|(key, session)| session.on_drain(&mut self.ctx).then_some(key))
            .collect();
        for key in done {
            self.remove(Token(key));
        }
        // Services get what is queued for them, then their connections close; no new ones
        // are accepted.
        if let Some(mut listener) = self.backend_listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        for (_, service) in self.services.iter_mut() {
            service.on_drain(&mut self.ctx);
        }
        self.services.clear();
        self.ctx.api_requests_open = 0;
    }

    /// Closes the listener: new connections are refused by the kernel from now on.
    fn stop_accepting(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
    }

    /// Checks the timeouts of the next `slots` slab slots, wrapping around, and every service
    /// connection's authentication timeout (there are few).
    fn sweep(&mut self, slots: usize) {
        let now_ms = self.ctx.now_ms;
        let timed_out: Vec<usize> = self
            .services
            .iter()
            .filter(|(_, service)| service.timed_out(now_ms, &self.ctx.node.config))
            .map(|(key, _)| key)
            .collect();
        for key in timed_out {
            self.remove_service(key);
        }
        // Streams that were caught up (or paused by a service not reading) look again; API
        // requests whose wait is over are answered.
        for (_, service) in self.services.iter_mut() {
            service.on_tick(&mut self.ctx);
        }
        let capacity = self.sessions.capacity();
        if capacity == 0 {
            return;
        }
        for _ in 0..slots.min(capacity) {
            let slot = self.sweep_cursor % capacity;
            self.sweep_cursor = slot + 1;
            let Some(session) = self.sessions.get_mut(slot) else {
                continue;
            };
            if session.on_timer(&mut self.ctx) {
                self.remove(Token(slot));
            }
        }
    }

    fn remove(&mut self, token: Token) {
        // Dropping the stream closes the socket, which also takes it out of the epoll set.
        let session = self.sessions.remove(token.0);
        if let Some((uid, device, shop, _)) = session.app().logged_in() {
            let me = session.session_ref(&self.ctx);
            metrics::sub(&self.ctx.metrics().sessions_logged_in, 1);
            if let Some(cluster) = &self.ctx.node.cluster {
                cluster.route_logout(uid, device, me);
            }
            self.local.remove(uid, me.slot, me.generation);
            self.tell_owner(BusMsg::Unregister {
                session: me,
                uid,
                device,
            });
            if let Some(shop) = shop {
                self.tell_owner(BusMsg::AgentOffline { shop, agent: uid });
            }
        }
        let m = self.ctx.metrics();
        metrics::sub(&m.connections_open, 1);
        metrics::sub(&m.send_queue_bytes, session.outbox_bytes() as u64);
        m.closed(session.close_reason());
        let peer = session
            .peer_addr()
            .map_or("unknown".to_string(), |a| a.to_string());
        let uid = session
            .app()
            .logged_in()
            .map_or("-".to_string(), |(uid, ..)| uid.to_string());
        tracing::debug!(
            shard = self.ctx.shard_id,
            slot = token.0,
            %peer,
            %uid,
            reason = session.close_reason().label(),
            "closed"
        );
    }
}

/// Where a shard's session generations start: random, so that an address (slot, generation)
/// a restarted node hands out is unlikely to be one its earlier run did. An owner on another
/// node may still hold the earlier run's address for a device, and must not kick the new
/// session that happens to get it.
fn first_generation() -> u32 {
    if cfg!(test) {
        // The shard's tests address its first session as generation 1.
        return 0;
    }
    let mut seed = [0u8; 4];
    // Without randomness, the clock's nanoseconds do nearly as well.
    if getrandom::fill(&mut seed).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        seed = nanos.to_le_bytes();
    }
    u32::from_le_bytes(seed)
}

/// The session in `slot`, if it is still the one of `generation`.
fn session_in(sessions: &mut Slab<Session>, slot: u32, generation: u32) -> Option<&mut Session> {
    sessions
        .get_mut(slot as usize)
        .filter(|s| s.generation() == generation)
}

/// A one-shard node for in-process tests: its shard thread on an ephemeral port, and a client
/// past its WebSocket handshake (the shard's first session: slot 0, generation 1).
#[cfg(test)]
pub(crate) struct TestShard {
    pub node: Arc<NodeState>,
    pub office: Arc<PostOffice>,
    pub thread: std::thread::JoinHandle<io::Result<()>>,
    pub client: std::net::TcpStream,
    pub _dir: tempfile::TempDir,
}

#[cfg(test)]
impl TestShard {
    pub fn start(config: crate::operator::config::Config, secret: &[u8]) -> TestShard {
        use std::io::{Read, Write};
        let poll = Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), WAKER).unwrap();
        let map = Arc::new(crate::bus::PartitionMap::single_node(256, 1));
        let node = Arc::new(NodeState::new(
            config,
            secret.to_vec(),
            Arc::clone(&map),
            None,
        ));
        let mailbox = crate::bus::mailbox::Mailbox::new(64, waker);
        let office = Arc::new(PostOffice::new(vec![mailbox], map));
        let listen = "127.0.0.1:0".parse().unwrap();
        let listener = crate::net::listener::bind(listen).unwrap();
        let addr = listener.local_addr().unwrap();
        let backend_listener = crate::net::listener::bind(listen).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner::for_tests(0, 1, dir.path());
        let shard = Shard::new(
            0,
            Arc::clone(&node),
            Arc::clone(&office),
            poll,
            listener,
            backend_listener,
            owner,
        )
        .unwrap();
        let thread = std::thread::spawn(move || shard.run());
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // A guard against a hang, not a measurement: every frame these tests wait for is due
        // within milliseconds.
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        client
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        TestShard {
            node,
            office,
            thread,
            client,
            _dir: dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::net::ws::frame::{self, Opcode};
    use crate::operator::config::Config;

    /// A frame handed to the shard's mailbox by another thread reaches the right session, and
    /// a frame addressed to an earlier session of the same slot is dropped.
    #[test]
    fn mailbox_frames_reach_their_session_only() {
        let TestShard {
            node,
            office,
            thread,
            mut client,
            _dir,
        } = TestShard::start(Config::default(), b"secret");

        // The first session of the shard is slot 0, generation 1.
        let stale = SessionRef {
            node: 1,
            shard: 0,
            slot: 0,
            generation: 2,
        };
        let live = SessionRef {
            node: 1,
            shard: 0,
            slot: 0,
            generation: 1,
        };
        let mailbox = office.mailbox(0);
        mailbox
            .send(BusMsg::Deliver {
                to: stale,
                ws_message: frame::encode(Opcode::Text, b"not for you"),
            })
            .unwrap();
        mailbox
            .send(BusMsg::Deliver {
                to: live,
                ws_message: frame::encode(Opcode::Text, b"pushed"),
            })
            .unwrap();
        let mut received = [0u8; 8];
        client.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"\x81\x06pushed");

        node.start_drain();
        office.wake_all();
        let mut close = [0u8; 4];
        client.read_exact(&mut close).unwrap();
        assert_eq!(close[..2], [0x88, 12]);
        assert_eq!(
            u16::from_be_bytes([close[2], close[3]]),
            frame::CLOSE_GOING_AWAY
        );
        drop(client);
        thread.join().unwrap().unwrap();
    }
}
