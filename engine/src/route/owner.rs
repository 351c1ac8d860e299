//! The owner side of a shard: the conversations, devices and shops this shard owns, with its
//! log ([`Store`]) and its customer-service [`Dispatcher`].
//!
//! [`Owner::handle`] acts on one [`Request`] and queues what it produces. Nothing leaves before
//! [`Owner::commit`]: the shard calls it once per loop turn, and only when the log has made the
//! turn's records durable under the fsync policy do the acknowledgements (`send_ok`, `read_ok`,
//! ...) and pushes go out. If the commit fails, every acknowledgement of the turn becomes an
//! `unavailable` error and its pushes are dropped: nothing is announced that a crash could lose.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use bytes::Bytes;
use chinwag_protocol::{
    ConvId, ConvSummary, ConvType, Cursor, DeviceId, DeviceIdGenerator, DeviceType, ErrorCode,
    History, HistoryOk, HistoryRange, Members, Message, Msg, Receipt, SendOk, Seq, ShopId, Target,
    Uid, UidKind,
};
use smallvec::SmallVec;

use super::{owner_of_conv, Fanout, Origin, Request, Routed, CONV_SHARD_BITS};
use crate::dispatch::{Decision, Dispatcher};
use crate::shard::mailbox::{SessionRef, ShardMsg};
use crate::store::{Appended, ConvKind, HistoryFrom, MessageRef, NewMessage, Store, StoreError};

/// What a `msg` entry costs on the wire besides its strings (ids, numbers, JSON punctuation
/// and escaping slack), for the reply byte budget.
const MSG_OVERHEAD_BYTES: usize = 160;

/// Where a message from the owner goes.
#[derive(Debug)]
pub enum Outgoing {
    /// To one shard.
    To(usize, ShardMsg),
    /// A push to every shard.
    All(Arc<Fanout>),
}

/// An output waiting for the turn's commit.
struct Pending {
    out: Outgoing,
    /// For an acknowledgement: the request it answers, to answer `unavailable` instead if the
    /// commit fails. (The error is encoded only then: commits rarely fail.)
    if_lost: Option<Origin>,
}

/// The conversations, devices and shops one shard owns.
pub struct Owner {
    shard: usize,
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
    /// Commits that failed since start (for metrics).
    pub commit_failures: u64,
}

impl Owner {
    /// The owner for shard `shard`, with its opened store; rebuilds the dispatcher's
    /// assignment counts and waiting queues from the stored conversations.
    pub fn new(
        shard: usize,
        store: Store,
        devices: Arc<Mutex<DeviceIdGenerator>>,
        reply_bytes_max: usize,
    ) -> Owner {
        let mut dispatcher = Dispatcher::new();
        let mut waiting: Vec<(ConvId, ShopId)> = Vec::new();
        for (id, conv) in store.conversations() {
            let Some(shop) = conv.shop() else { continue };
            let agents = conv.members().iter().filter(|u| u.kind == UidKind::Agent);
            let mut any_agent = false;
            for agent in agents {
                dispatcher.restore_assignment(shop, *agent);
                any_agent = true;
            }
            // A conversation with customer messages and no agent was waiting when the node
            // stopped. Its place in the queue is not stored; creation order stands in for it.
            if !any_agent && conv.last_seq() > Seq(0) {
                let last = store.history(id, HistoryFrom::Newest, 1).ok();
                let from_customer = last
                    .and_then(|m| m.first().map(|m| m.sender.kind.is_customer()))
                    .unwrap_or(false);
                if from_customer {
                    waiting.push((id, shop));
                }
            }
        }
        waiting.sort_unstable();
        for (conv, shop) in waiting {
            dispatcher.restore_waiting(shop, conv);
        }
        let conv_counter = store
            .conv_max()
            .map_or(1, |max| (max.0 >> CONV_SHARD_BITS) + 1);
        Owner {
            shard,
            store,
            dispatcher,
            conv_counter,
            devices,
            sessions: AHashMap::new(),
            pending: Vec::new(),
            reply_bytes_max,
            messages_stored: 0,
            commit_failures: 0,
        }
    }

    /// An owner with a fresh log in `dir`, for tests.
    #[cfg(test)]
    pub fn for_tests(shard: usize, dir: &std::path::Path) -> Owner {
        let mut config = crate::store::StoreConfig::new(dir);
        config.segment_bytes = 1 << 20;
        let (store, _) = Store::open(config).expect("a fresh log opens");
        let generator =
            DeviceIdGenerator::new(chinwag_protocol::NodeType::Client, 0).expect("cluster 0 fits");
        Owner::new(shard, store, Arc::new(Mutex::new(generator)), 1 << 20)
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

    /// Acts on `request` at `now_ms` (Unix milliseconds). Its outputs wait for [`Owner::commit`].
    pub fn handle(&mut self, request: Request, now_ms: u64) {
        match request {
            Request::Send {
                origin,
                target,
                cmid,
                kind,
                body,
            } => {
                if let Err((code, text)) = self.send(&origin, target, &cmid, &kind, &body, now_ms) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            Request::Read { origin, cursor } => {
                if let Err((code, text)) = self.read(&origin, cursor) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            Request::Resolve { origin, conv } => {
                if let Err((code, text)) = self.resolve(&origin, conv) {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            Request::History { origin, history } => {
                let reply = match self.history(&origin, history) {
                    Ok(message) => origin.reply(message),
                    Err((code, text)) => origin.error(code, &text),
                };
                self.reply_now(&origin, reply);
            }
            Request::Convs { origin } => {
                let convs = self.convs_of(origin.uid);
                self.push_out(
                    origin.session.shard as usize,
                    Routed::ConvsPart {
                        session: origin.session,
                        req: origin.req,
                        convs,
                    },
                );
            }
            Request::Register {
                session,
                uid,
                device_type,
            } => self.register(session, uid, device_type),
            Request::Unregister {
                session, device, ..
            } => {
                if self.sessions.get(&device) == Some(&session) {
                    self.sessions.remove(&device);
                }
            }
            Request::AgentOnline { shop, agent } => {
                for assignment in self.dispatcher.agent_online(shop, agent) {
                    if let Err(e) = self.assign(assignment.conv, assignment.agent) {
                        tracing::warn!(conv = %assignment.conv, error = %e, "assignment not stored");
                    }
                }
            }
            Request::AgentOffline { shop, agent } => self.dispatcher.agent_offline(shop, agent),
        }
    }

    /// Makes the turn's records durable and returns what may now go out, in order.
    pub fn commit(&mut self) -> Vec<Outgoing> {
        if self.pending.is_empty() {
            // Nothing to acknowledge; still give an `interval` policy its periodic flush.
            if let Err(e) = self.store.commit() {
                tracing::error!(shard = self.shard, error = %e, "log commit failed");
            }
            return Vec::new();
        }
        let pending = std::mem::take(&mut self.pending);
        match self.store.commit() {
            Ok(()) => pending.into_iter().map(|p| p.out).collect(),
            Err(e) => {
                self.commit_failures += 1;
                tracing::error!(shard = self.shard, error = %e, "log commit failed; answering unavailable");
                pending
                    .into_iter()
                    .filter_map(|p| match (p.if_lost, p.out) {
                        (Some(origin), _) => {
                            let to = origin.session;
                            let frame = origin.error(
                                ErrorCode::Unavailable,
                                "the log could not store the change",
                            );
                            Some(Outgoing::To(
                                to.shard as usize,
                                ShardMsg::Send { to, frame },
                            ))
                        }
                        // Pushes of the turn are dropped; replies that did not depend on the
                        // log (errors, history) still go.
                        (None, Outgoing::All(_)) => None,
                        (None, out) => Some(out),
                    })
                    .collect()
            }
        }
    }

    fn send(
        &mut self,
        origin: &Origin,
        target: Target,
        cmid: &str,
        kind: &str,
        body: &str,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        let uid = origin.uid;
        let conv = match target {
            Target::Conv(conv) => {
                self.member_conv(conv, uid)?;
                conv
            }
            Target::Shop(shop) => {
                if !uid.kind.is_customer() {
                    return Err((
                        ErrorCode::BadRequest,
                        "only buyers and wechat customers write to a shop; agents use conv".into(),
                    ));
                }
                let existing = self.store.shop_conv(shop, uid);
                self.find_or_create(existing, |store, conv| {
                    store.create_shop_conv(conv, shop, uid)
                })?
            }
            Target::User(other) => {
                if other == uid {
                    return Err((
                        ErrorCode::BadRequest,
                        "a direct conversation needs two users".into(),
                    ));
                }
                let existing = self.store.direct_conv(uid, other);
                self.find_or_create(existing, |store, conv| {
                    store.create_direct_conv(conv, uid, other)
                })?
            }
        };

        // Customer service: make sure an online agent serves the conversation before the
        // message goes out, so a newly assigned agent gets `members` and then the `msg`.
        if uid.kind.is_customer() {
            if let Some((shop, agents)) = self.shop_agents(conv) {
                if let Decision::Assign(agent) =
                    self.dispatcher.customer_message(shop, conv, &agents)
                {
                    self.assign(conv, agent).map_err(store_error)?;
                }
            }
        }

        let appended = self
            .store
            .append_message(&NewMessage {
                conv,
                sender: uid,
                device: origin.device,
                cmid: cmid.as_bytes(),
                kind: kind.as_bytes(),
                body: body.as_bytes(),
                ts_ms: now_ms,
            })
            .map_err(store_error)?;
        match appended {
            Appended::Stored { seq } => {
                self.messages_stored += 1;
                let ok = origin.reply(Message::SendOk(SendOk {
                    conv,
                    seq,
                    ts: now_ms,
                }));
                self.ack(origin, ok);
                let members = self.members(conv);
                self.fanout(Fanout::new(
                    members,
                    Some(origin.device),
                    Message::Msg(Msg {
                        conv,
                        seq,
                        from: uid,
                        ts: now_ms,
                        kind: kind.into(),
                        body: body.into(),
                        cmid: cmid.into(),
                    }),
                ));
            }
            Appended::Duplicate { seq, ts_ms } => {
                // The conversation is the one this request named or resolved to: the window
                // is keyed by conversation.
                let ok = origin.reply(Message::SendOk(SendOk {
                    conv,
                    seq,
                    ts: ts_ms,
                }));
                self.ack(origin, ok);
            }
        }
        Ok(())
    }

    fn read(&mut self, origin: &Origin, cursor: Cursor) -> Result<(), (ErrorCode, String)> {
        let conv = cursor.conv;
        let before = self.member_conv(conv, origin.uid)?.cursor(origin.uid);
        let after = self
            .store
            .mark_read(conv, origin.uid, cursor.seq)
            .map_err(store_error)?;
        let ok = origin.reply(Message::ReadOk(Cursor { conv, seq: after }));
        self.ack(origin, ok);
        if after > before {
            let members = self.members(conv);
            self.fanout(Fanout::new(
                members,
                Some(origin.device),
                Message::Receipt(Receipt {
                    conv,
                    uid: origin.uid,
                    seq: after,
                }),
            ));
        }
        Ok(())
    }

    fn resolve(&mut self, origin: &Origin, conv: ConvId) -> Result<(), (ErrorCode, String)> {
        if origin.uid.kind != UidKind::Agent {
            return Err((ErrorCode::BadRequest, "only agents resolve".into()));
        }
        let c = self.member_conv(conv, origin.uid)?;
        let Some(shop) = c.shop() else {
            return Err((ErrorCode::BadRequest, "not a shop conversation".into()));
        };
        self.store
            .remove_member(conv, origin.uid)
            .map_err(store_error)?;
        self.dispatcher.resolve(shop, origin.uid);
        let ok = origin.reply(Message::ResolveOk(conv));
        self.ack(origin, ok);
        let mut members = self.members(conv);
        let remaining = members.to_vec();
        members.push(origin.uid);
        self.fanout(Fanout::new(
            members,
            None,
            Message::Members(Members {
                conv,
                members: remaining,
            }),
        ));
        Ok(())
    }

    fn history(
        &self,
        origin: &Origin,
        history: History,
    ) -> Result<Message<'static>, (ErrorCode, String)> {
        let conv = history.conv;
        self.member_conv(conv, origin.uid)?;
        let from = match history.range {
            HistoryRange::Newest => HistoryFrom::Newest,
            HistoryRange::Before(seq) => HistoryFrom::Before(seq),
            HistoryRange::After(seq) => HistoryFrom::After(seq),
        };
        let page = self
            .store
            .history(conv, from, usize::from(history.limit))
            .map_err(store_error)?;
        // A page must fit the connection's send queue, or asking for it would get the client
        // disconnected: keep the messages nearest the anchor within the byte budget and let
        // the client page on (the contract's `limit` is a maximum).
        let size =
            |m: &MessageRef<'_>| MSG_OVERHEAD_BYTES + m.body.len() + m.kind.len() + m.cmid.len();
        let mut budget = self.reply_bytes_max;
        let mut fits = |m: &MessageRef<'_>| {
            let fits = size(m) <= budget;
            budget = budget.saturating_sub(size(m));
            fits
        };
        let keep = match history.range {
            // Ascending from the anchor: keep a prefix.
            HistoryRange::After(_) => page.iter().take_while(|m| fits(m)).count(),
            // Descending from the anchor: keep a suffix.
            HistoryRange::Newest | HistoryRange::Before(_) => {
                page.iter().rev().take_while(|m| fits(m)).count()
            }
        };
        // Always at least one message, so a client can page past any single message.
        let keep = keep.max(1).min(page.len());
        let kept = match history.range {
            HistoryRange::After(_) => &page[..keep],
            HistoryRange::Newest | HistoryRange::Before(_) => &page[page.len() - keep..],
        };
        let msgs = kept.iter().map(to_msg).collect();
        Ok(Message::HistoryOk(HistoryOk { conv, msgs }))
    }

    fn convs_of(&self, uid: Uid) -> Vec<ConvSummary<'static>> {
        self.store
            .convs_of(uid)
            .iter()
            .filter_map(|&id| {
                let c = self.store.conv(id)?;
                let last_seq = c.last_seq();
                let read_seq = c.cursor(uid);
                let last = self
                    .store
                    .history(id, HistoryFrom::Newest, 1)
                    .ok()
                    .and_then(|m| m.first().map(to_msg));
                Some(ConvSummary {
                    conv: id,
                    conv_type: match (c.kind(), c.shop()) {
                        (ConvKind::Shop, Some(shop)) => ConvType::Shop(shop),
                        (ConvKind::Group, _) => ConvType::Group,
                        _ => ConvType::Direct,
                    },
                    members: c.members().to_vec(),
                    last_seq,
                    read_seq,
                    unread: last_seq.0.saturating_sub(read_seq.0),
                    last,
                })
            })
            .collect()
    }

    fn register(&mut self, session: SessionRef, uid: Uid, device_type: DeviceType) {
        let device = match self.store.device(uid, device_type) {
            Some(device) => Ok(device),
            None => self.new_device(uid, device_type),
        };
        let device = match device {
            Ok(device) => device,
            Err(e) => {
                tracing::error!(%uid, error = %e, "device registration failed");
                // The session learns of it as a failed login.
                self.push_out(
                    session.shard as usize,
                    Routed::Registered {
                        session,
                        uid,
                        device: None,
                    },
                );
                return;
            }
        };
        if let Some(older) = self.sessions.insert(device, session) {
            if older != session {
                self.push_out(older.shard as usize, Routed::Kick { session: older });
            }
        }
        self.push_out(
            session.shard as usize,
            Routed::Registered {
                session,
                uid,
                device: Some(device),
            },
        );
    }

    fn new_device(&mut self, uid: Uid, device_type: DeviceType) -> Result<DeviceId, String> {
        let now_s = unix_ms() / 1000;
        // A poisoned lock means another shard panicked mid-generation; the generator's state
        // is a pair of integers that is never left half-written, so it is still sound.
        let id = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(device_type, now_s)
            .map_err(|e| e.to_string())?;
        self.store
            .register_device(uid, device_type, id)
            .map_err(|e| e.to_string())
    }

    /// Adds `agent` to `conv` and pushes the new member list to every member.
    fn assign(&mut self, conv: ConvId, agent: Uid) -> Result<(), StoreError> {
        self.store.add_member(conv, agent)?;
        let members = self.members(conv);
        let list = members.to_vec();
        self.fanout(Fanout::new(
            members,
            None,
            Message::Members(Members {
                conv,
                members: list,
            }),
        ));
        Ok(())
    }

    /// The conversation, if it is here and `uid` is a member.
    fn member_conv(
        &self,
        conv: ConvId,
        uid: Uid,
    ) -> Result<&crate::store::Conversation, (ErrorCode, String)> {
        let found = if owner_of_conv(conv) == self.shard {
            self.store.conv(conv)
        } else {
            None
        };
        let c = found.ok_or_else(|| (ErrorCode::NotFound, format!("no conversation {conv}")))?;
        if !c.members().contains(&uid) {
            return Err((
                ErrorCode::NotMember,
                format!("not a member of conversation {conv}"),
            ));
        }
        Ok(c)
    }

    /// For a shop conversation: its shop and assigned agents.
    fn shop_agents(&self, conv: ConvId) -> Option<(ShopId, SmallVec<[Uid; 4]>)> {
        let c = self.store.conv(conv)?;
        let shop = c.shop()?;
        let agents = c
            .members()
            .iter()
            .filter(|u| u.kind == UidKind::Agent)
            .copied()
            .collect();
        Some((shop, agents))
    }

    fn members(&self, conv: ConvId) -> SmallVec<[Uid; 4]> {
        self.store
            .conv(conv)
            .map(|c| SmallVec::from_slice(c.members()))
            .unwrap_or_default()
    }

    /// `existing`, or a new conversation with the next id, created by `create`.
    fn find_or_create(
        &mut self,
        existing: Option<ConvId>,
        create: impl FnOnce(&mut Store, ConvId) -> Result<(), StoreError>,
    ) -> Result<ConvId, (ErrorCode, String)> {
        if let Some(conv) = existing {
            return Ok(conv);
        }
        let conv = self.next_conv_id();
        create(&mut self.store, conv).map_err(store_error)?;
        Ok(conv)
    }

    fn next_conv_id(&mut self) -> ConvId {
        let id = ConvId(self.conv_counter << CONV_SHARD_BITS | self.shard as u64);
        self.conv_counter += 1;
        id
    }

    /// An acknowledgement: goes out after the commit, or becomes `unavailable` if it fails.
    fn ack(&mut self, origin: &Origin, frame: Bytes) {
        self.pending.push(Pending {
            out: Outgoing::To(
                origin.session.shard as usize,
                ShardMsg::Send {
                    to: origin.session,
                    frame,
                },
            ),
            if_lost: Some(*origin),
        });
    }

    /// A reply that does not depend on the turn's records (an error, a page of history).
    fn reply_now(&mut self, origin: &Origin, frame: Bytes) {
        self.pending.push(Pending {
            out: Outgoing::To(
                origin.session.shard as usize,
                ShardMsg::Send {
                    to: origin.session,
                    frame,
                },
            ),
            if_lost: None,
        });
    }

    fn push_out(&mut self, shard: usize, routed: Routed) {
        self.pending.push(Pending {
            out: Outgoing::To(shard, ShardMsg::Routed(routed)),
            if_lost: None,
        });
    }

    fn fanout(&mut self, fanout: Fanout) {
        self.pending.push(Pending {
            out: Outgoing::All(Arc::new(fanout)),
            if_lost: None,
        });
    }
}

/// A stored message as the protocol shows it. The store keeps what the protocol decoded as
/// UTF-8; a record that somehow is not shows with replacement characters rather than failing
/// the whole page.
fn to_msg(m: &MessageRef<'_>) -> Msg<'static> {
    let text = |bytes: &[u8]| Cow::Owned(String::from_utf8_lossy(bytes).into_owned());
    Msg {
        conv: m.conv,
        seq: m.seq,
        from: m.sender,
        ts: m.ts_ms,
        kind: text(m.kind),
        body: text(m.body),
        cmid: text(m.cmid),
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
