//! The Logic of the seed design: the owner of the conversations, devices and shops of one
//! shard, with its log ([`Store`]) and its customer-service [`Dispatcher`].
//!
//! [`Owner::handle`] acts on one [`BusMsg`] and queues what it produces. Nothing leaves before
//! [`Owner::commit`]: the shard calls it once per loop turn, and only when the log has made the
//! turn's records durable under the fsync policy do the acknowledgements (`send_ok`, `read_ok`,
//! ...) and pushes go out. If the commit fails, every acknowledgement of the turn becomes an
//! `unavailable` error and its pushes are dropped: nothing is announced that a crash could lose.
//!
//! The owner knows no sockets: it takes messages and gives messages, so its rules are tested
//! here without any (see `tests` at the bottom of each file). By concern:
//! - [`devices`]: login (find or register a device, kick an older session), logout;
//! - [`send`]: `send`, creating conversations, fan-out of `msg`;
//! - [`cursors`]: `read` and its `receipt`;
//! - [`reads`]: `history` pages and this shard's part of `convs`;
//! - [`shop`]: customer service around the [`dispatch`] policy (assign, `resolve`, agents
//!   coming online);
//! - [`groups`]: group conversations for backend services (create, add, remove, info).
//! - [`wechat`]: WeChat customers' messages in, agents' replies to them out (after the
//!   commit), notices of replies that did not reach WeChat.

mod cursors;
mod devices;
pub mod dispatch;
mod groups;
mod reads;
mod send;
mod shop;
#[cfg(test)]
mod testing;
mod wechat;

use crate::operator::metrics::SEND_OK_BUCKETS_US;
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use bytes::Bytes;
use chinwag_protocol::{ConvId, DeviceId, DeviceIdGenerator, ErrorCode, Uid};
use smallvec::SmallVec;

use crate::bus::{
    owner_of_conv, BusMsg, Fanout, GroupRequest, Origin, SendRequest, SessionRef, CONV_SHARD_BITS,
};
use crate::store::{Store, StoreError};
use dispatch::Dispatcher;

/// An output waiting for the turn's commit: a message and the shard it goes to.
struct Pending {
    to: usize,
    msg: BusMsg,
    /// For an acknowledgement: the request it answers, to answer `unavailable` instead if the
    /// commit fails. (The error is encoded only then: commits rarely fail.)
    if_lost: Option<Origin>,
    /// For a `send_ok`: when its request was decoded, for the send → `send_ok` histogram.
    send_received: Option<std::time::Instant>,
}

/// The conversations, devices and shops one shard owns.
pub struct Owner {
    shard: usize,
    /// The node's shard count (a push goes to each).
    shards: usize,
    store: Store,
    dispatcher: Dispatcher,
    /// The next conversation counter; ids are `counter << 8 | shard`.
    conv_counter: u64,
    /// The node's DeviceId generator. Registration is rare (a device's first login), so one
    /// generator behind a lock keeps ids unique across shards at no cost to the message path.
    devices: Arc<Mutex<DeviceIdGenerator>>,
    /// For devices of users this shard owns: the session currently logged in as each.
    sessions: AHashMap<DeviceId, SessionRef>,
    pending: Vec<Pending>,
    /// The largest `history_ok` to build: half a connection's send queue.
    reply_bytes_max: usize,
    /// Messages stored since start (for metrics).
    pub messages_stored: u64,
    /// send → `send_ok` latencies since start: counts per [`SEND_OK_BUCKETS_US`] bucket (the
    /// last one for larger), and their sum in µs.
    pub send_ok_buckets: [u64; SEND_OK_BUCKETS_US.len() + 1],
    /// See [`Owner::send_ok_buckets`].
    pub send_ok_us_sum: u64,
    /// Commits that failed since start (for metrics).
    pub commit_failures: u64,
    /// The WeChat channel, when the node serves WeChat accounts.
    wechat: Option<Arc<crate::wechat::channel::Channel>>,
    /// Agents' replies to WeChat customers stored this turn, for the sender after the commit.
    wechat_out: Vec<wechat::PendingReply>,
    /// Makes the next commit fail as a full or broken disk would (unit tests only).
    #[cfg(test)]
    fail_next_commit: bool,
}

impl Owner {
    /// The owner for shard `shard`, with its opened store; rebuilds the dispatcher's
    /// assignment counts and waiting queues from the stored conversations.
    pub fn new(
        shard: usize,
        shards: usize,
        store: Store,
        devices: Arc<Mutex<DeviceIdGenerator>>,
        reply_bytes_max: usize,
    ) -> Owner {
        let dispatcher = shop::restore_dispatcher(&store);
        let conv_counter = store
            .conv_max()
            .map_or(1, |max| (max.0 >> CONV_SHARD_BITS) + 1);
        Owner {
            shard,
            shards,
            store,
            dispatcher,
            conv_counter,
            devices,
            sessions: AHashMap::new(),
            pending: Vec::new(),
            reply_bytes_max,
            messages_stored: 0,
            send_ok_buckets: [0; SEND_OK_BUCKETS_US.len() + 1],
            send_ok_us_sum: 0,
            commit_failures: 0,
            wechat: None,
            wechat_out: Vec::new(),
            #[cfg(test)]
            fail_next_commit: false,
        }
    }

    /// Serves the WeChat channel: agents' replies to WeChat customers go to its sender.
    pub fn set_wechat(&mut self, channel: Option<Arc<crate::wechat::channel::Channel>>) {
        self.wechat = channel;
    }

    /// An owner with a fresh log in `dir`, for tests.
    #[cfg(test)]
    pub fn for_tests(shard: usize, shards: usize, dir: &std::path::Path) -> Owner {
        let mut config = crate::store::StoreConfig::new(dir);
        config.segment_bytes = 1 << 20;
        let (store, _) = Store::open(config).expect("a fresh log opens");
        let generator =
            DeviceIdGenerator::new(chinwag_protocol::NodeType::Client, 0).expect("cluster 0 fits");
        Owner::new(
            shard,
            shards,
            store,
            Arc::new(Mutex::new(generator)),
            1 << 20,
        )
    }

    /// Periodic upkeep of the log: deletes segments past retention and writes a snapshot, so
    /// a restart replays only what came after it.
    pub fn maintain(&mut self, now_ms: u64) {
        match self.store.retain(now_ms) {
            Ok(r) if r.segments > 0 => {
                tracing::info!(
                    shard = self.shard,
                    segments = r.segments,
                    bytes = r.bytes,
                    "retention deleted log segments"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::error!(shard = self.shard, error = %e, "log retention failed"),
        }
        if let Err(e) = self.store.snapshot() {
            tracing::error!(shard = self.shard, error = %e, "log snapshot failed");
        }
    }

    /// The log's gauges.
    pub fn store_stats(&self) -> crate::store::StoreStats {
        self.store.stats()
    }

    /// The log (for snapshots, retention and metrics).
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Acts on `msg` at `now_ms` (Unix milliseconds). Its outputs wait for [`Owner::commit`].
    /// Only the messages for an owner (see [`BusMsg`]) are expected; others are ignored.
    pub fn handle(&mut self, msg: BusMsg, now_ms: u64) {
        match msg {
            BusMsg::Send(send) => {
                let SendRequest {
                    origin,
                    target,
                    cmid,
                    kind,
                    body,
                } = *send;
                if let Err((code, text)) = self.send(&origin, target, &cmid, &kind, &body, now_ms) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            BusMsg::Read { origin, cursor } => {
                if let Err((code, text)) = self.read(&origin, cursor) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            BusMsg::Resolve { origin, conv } => {
                if let Err((code, text)) = self.resolve(&origin, conv, now_ms) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            BusMsg::History { origin, history } => {
                let reply = match self.history(&origin, history) {
                    Ok(message) => origin.reply(message),
                    Err((code, text)) => origin.error(code, &text),
                };
                self.reply_now(&origin, reply);
            }
            BusMsg::AgentStats { origin, stats } => {
                let reply = if stats.from_ms < stats.to_ms {
                    let report = self
                        .store
                        .agent_stats(stats.shop, stats.from_ms, stats.to_ms);
                    origin.reply(chinwag_protocol::Message::AgentStatsOk(report))
                } else {
                    origin.error(ErrorCode::BadRequest, "from_ms must be before to_ms")
                };
                self.reply_now(&origin, reply);
            }
            BusMsg::KickUser { origin, kick } => {
                let kicked = self.kick(kick);
                self.reply_now(
                    &origin,
                    origin.reply(chinwag_protocol::Message::KickOk(kicked)),
                );
            }
            BusMsg::Presence {
                origin,
                users,
                token,
            } => {
                let online = self.presence(&users);
                self.push_out(
                    origin.session.shard as usize,
                    BusMsg::PresencePart {
                        session: origin.session,
                        token,
                        online: Some(online),
                    },
                );
            }
            BusMsg::StreamRead { session, from } => {
                let part = self.stream_read(session, from);
                self.push_out(session.shard as usize, BusMsg::StreamPart(Box::new(part)));
            }
            BusMsg::Convs { origin, token } => {
                let convs = self.convs_of(origin.uid);
                self.push_out(
                    origin.session.shard as usize,
                    BusMsg::ConvsPart {
                        session: origin.session,
                        token,
                        convs: Some(convs),
                    },
                );
            }
            BusMsg::Register {
                session,
                uid,
                device_type,
            } => self.register(session, uid, device_type),
            BusMsg::Unregister {
                session, device, ..
            } => self.unregister(session, device),
            BusMsg::AgentOnline { shop, agent } => self.agent_online(shop, agent, now_ms),
            BusMsg::AgentOffline { shop, agent } => self.dispatcher.agent_offline(shop, agent),
            BusMsg::Group(request) => {
                let GroupRequest { origin, op } = *request;
                if let Err((code, text)) = self.group(&origin, op, now_ms) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            BusMsg::WechatInbound(inbound) => self.wechat_inbound(*inbound, now_ms),
            BusMsg::WechatUndelivered(u) => {
                self.wechat_notice(u.conv, u.seq, &u.undelivered, now_ms)
            }
            BusMsg::Deliver { .. }
            | BusMsg::Push(_)
            | BusMsg::Registered { .. }
            | BusMsg::Kick { .. }
            | BusMsg::ConvsPart { .. }
            | BusMsg::PresencePart { .. }
            | BusMsg::StreamPart(_) => {
                debug_assert!(false, "not a message for an owner: {msg:?}");
            }
        }
    }

    /// Makes the turn's records durable and returns what may now go out, in order.
    pub fn commit(&mut self) -> Vec<(usize, BusMsg)> {
        if self.pending.is_empty() {
            // Nothing to acknowledge; still give an `interval` policy its periodic flush.
            if let Err(e) = self.commit_log() {
                tracing::error!(shard = self.shard, error = %e, "log commit failed");
            }
            return Vec::new();
        }
        let pending = std::mem::take(&mut self.pending);
        match self.commit_log() {
            Ok(()) => {
                for received in pending.iter().filter_map(|p| p.send_received) {
                    self.record_send_ok(received.elapsed().as_micros() as u64);
                }
                let mut out: Vec<(usize, BusMsg)> =
                    pending.into_iter().map(|p| (p.to, p.msg)).collect();
                // Only now that the agents' replies are durable do they go to WeChat.
                out.extend(self.wechat_submit());
                out
            }
            Err(e) => {
                self.commit_failures += 1;
                // The agents are answered `unavailable`: their replies do not go to WeChat.
                self.wechat_out.clear();
                tracing::error!(shard = self.shard, error = %e, "log commit failed; answering unavailable");
                pending
                    .into_iter()
                    .filter_map(|p| match (p.if_lost, p.msg) {
                        (Some(origin), _) => {
                            let to = origin.session;
                            let ws_message = origin.error(
                                ErrorCode::Unavailable,
                                "the log could not store the change",
                            );
                            Some((p.to, BusMsg::Deliver { to, ws_message }))
                        }
                        // Pushes of the turn are dropped; replies that did not depend on the
                        // log (errors, history) still go.
                        (None, BusMsg::Push(_)) => None,
                        (None, msg) => Some((p.to, msg)),
                    })
                    .collect()
            }
        }
    }

    /// The conversation, if it is here.
    fn local_conv(&self, conv: ConvId) -> Result<&crate::store::Conversation, (ErrorCode, String)> {
        let found = if owner_of_conv(conv) == self.shard {
            self.store.conv(conv)
        } else {
            None
        };
        found.ok_or_else(|| (ErrorCode::NotFound, format!("no conversation {conv}")))
    }

    /// The conversation, if it is here and `origin` may read it: a member, or a service.
    fn readable_conv(
        &self,
        conv: ConvId,
        origin: &Origin,
    ) -> Result<&crate::store::Conversation, (ErrorCode, String)> {
        if !origin.service {
            return self.member_conv(conv, origin.uid);
        }
        self.local_conv(conv)
    }

    /// The conversation, if it is here and `uid` is a member.
    fn member_conv(
        &self,
        conv: ConvId,
        uid: Uid,
    ) -> Result<&crate::store::Conversation, (ErrorCode, String)> {
        let c = self.local_conv(conv)?;
        if !c.members().contains(&uid) {
            return Err((
                ErrorCode::NotMember,
                format!("not a member of conversation {conv}"),
            ));
        }
        Ok(c)
    }

    fn members(&self, conv: ConvId) -> SmallVec<[Uid; 4]> {
        self.store
            .conv(conv)
            .map(|c| SmallVec::from_slice(c.members()))
            .unwrap_or_default()
    }

    fn commit_log(&mut self) -> Result<(), StoreError> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_commit) {
            return Err(StoreError::Poisoned);
        }
        self.store.commit()
    }

    /// An acknowledgement: goes out after the commit, or becomes `unavailable` if it fails.
    fn ack(&mut self, origin: &Origin, ws_message: Bytes) {
        self.pending.push(Pending {
            to: origin.session.shard as usize,
            msg: BusMsg::Deliver {
                to: origin.session,
                ws_message,
            },
            if_lost: Some(*origin),
            send_received: None,
        });
    }

    /// A `send_ok`: an acknowledgement whose latency from the request is measured.
    fn ack_send(&mut self, origin: &Origin, ws_message: Bytes) {
        self.ack(origin, ws_message);
        if let Some(last) = self.pending.last_mut() {
            last.send_received = Some(origin.received);
        }
    }

    fn record_send_ok(&mut self, us: u64) {
        let bucket = SEND_OK_BUCKETS_US
            .iter()
            .position(|&le| us <= le)
            .unwrap_or(SEND_OK_BUCKETS_US.len());
        self.send_ok_buckets[bucket] += 1;
        self.send_ok_us_sum += us;
    }

    /// A reply that does not depend on the turn's records (an error, a page of history).
    fn reply_now(&mut self, origin: &Origin, ws_message: Bytes) {
        self.push_out(
            origin.session.shard as usize,
            BusMsg::Deliver {
                to: origin.session,
                ws_message,
            },
        );
    }

    fn push_out(&mut self, shard: usize, msg: BusMsg) {
        self.pending.push(Pending {
            to: shard,
            msg,
            if_lost: None,
            send_received: None,
        });
    }

    /// A push for every shard's devices of `fanout.users`, encoded once and shared.
    fn fanout(&mut self, fanout: Fanout) {
        let fanout = Arc::new(fanout);
        for shard in 0..self.shards {
            self.push_out(shard, BusMsg::Push(Arc::clone(&fanout)));
        }
    }
}

fn store_error(e: StoreError) -> (ErrorCode, String) {
    let code = match &e {
        e if e.is_unavailable() => ErrorCode::Unavailable,
        StoreError::TooLarge { .. } => ErrorCode::TooLarge,
        StoreError::UnknownConv(_) => ErrorCode::NotFound,
        StoreError::Invalid(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::error!(error = %e, "store error");
    }
    (code, e.to_string())
}

/// Wall-clock milliseconds since the Unix epoch (message timestamps, device ids).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
