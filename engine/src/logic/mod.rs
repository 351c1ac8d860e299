//! The Logic of the seed design: the owner of the conversations, devices and shops of the
//! partitions one shard serves, with a log ([`Store`]) per partition and its customer-service
//! [`Dispatcher`].
//!
//! A partition's log is opened on first write (an empty partition has no directory); a read
//! of a partition with no log finds nothing. The [`PartitionMap`] says which partitions are
//! this shard's; a request for another's is answered as if the conversation did not exist.
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
//! - [`profiles`]: users' and conversations' profiles, and the copies of senders' profiles
//!   that go into `msg`, `members` and `convs`.
//! - [`wechat`]: WeChat customers' messages in, agents' replies to them out (after the
//!   commit), notices of replies that did not reach WeChat.

mod cmid_budget;
mod cursors;
mod devices;
pub mod dispatch;
mod groups;
mod profiles;
mod reads;
mod replication;
mod send;
mod shop;
#[cfg(test)]
mod testing;
mod wechat;

use crate::operator::metrics::SEND_OK_BUCKETS_US;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use bytes::Bytes;
use chinwag_protocol::{ConvId, DeviceId, DeviceIdGenerator, ErrorCode, Uid};
use smallvec::SmallVec;

use crate::bus::partitions::{conv_counter, partition_of_conv};
use crate::bus::post::To;
use crate::bus::{
    BusMsg, Fanout, GroupRequest, Origin, PartitionId, PartitionMap, ProfileRequest, SendRequest,
};
use crate::store::{FsyncPolicy, Store, StoreConfig, StoreError};
use dispatch::Dispatcher;
pub use replication::ReplicationSetup;

/// The directory of partition `p`'s log under `root` (`DATA_DIR/partitions`).
pub fn partition_dir(root: &Path, p: PartitionId) -> PathBuf {
    root.join(format!("{p:05}"))
}

/// The partition a directory name under `DATA_DIR/partitions` names, if it is one.
pub fn parse_partition_dir(name: &str) -> Option<PartitionId> {
    (name.len() == 5 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

/// How an owner opens a partition's log on its first write.
#[derive(Debug, Clone)]
pub struct LogSetup {
    /// The directory holding one directory per partition (`DATA_DIR/partitions`).
    pub root: PathBuf,
    /// Every partition's log configuration; its `dir` is set per partition. Its preparer is
    /// the shard's, shared by the shard's logs.
    pub config: StoreConfig,
}

impl LogSetup {
    /// The configuration of partition `p`'s log.
    pub fn config_of(&self, p: PartitionId) -> StoreConfig {
        StoreConfig {
            dir: partition_dir(&self.root, p),
            ..self.config.clone()
        }
    }
}

/// One partition this shard serves: its log, and the next conversation counter.
pub struct Partition {
    store: Store,
    /// The next conversation counter; ids are `counter << 16 | partition`.
    conv_counter: u64,
    /// In a replicated cluster: whether this node leads or follows it (`None`: no replicas,
    /// the single node's and an unreplicated cluster's partitions).
    role: Option<crate::cluster::replica::Role>,
}

impl Partition {
    /// A partition around its opened log, going on after its greatest conversation id.
    pub fn new(store: Store) -> Partition {
        let conv_counter = store.conv_max().map_or(1, |max| conv_counter(max) + 1);
        Partition {
            store,
            conv_counter,
            role: None,
        }
    }

    /// Its log.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The gauges of a shard's logs, summed over its open partitions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Partitions with a log open.
    pub partitions: usize,
    /// Segment files (prepared ones included).
    pub segments: usize,
    /// Bytes of those files.
    pub segment_bytes: u64,
    /// Conversations.
    pub conversations: usize,
    /// Devices.
    pub devices: usize,
}

/// An output waiting for the turn's commit: a message and the shard it goes to.
struct Pending {
    to: To,
    msg: BusMsg,
    /// For an acknowledgement: the request it answers, to answer `unavailable` instead if the
    /// commit fails. (The error is encoded only then: commits rarely fail.)
    if_lost: Option<Origin>,
    /// For a `send_ok`: when its request was decoded, for the send → `send_ok` histogram.
    send_received: Option<std::time::Instant>,
}

/// The conversations, devices and shops of the partitions one shard serves.
pub struct Owner {
    shard: usize,
    /// Which partitions are this shard's; the node's shard count (a push goes to each).
    map: Arc<PartitionMap>,
    log: LogSetup,
    /// Indexed by partition: the open logs of this shard's partitions.
    partitions: Vec<Option<Partition>>,
    /// Partitions appended to since the last commit (each once), and a mark per partition.
    written: Vec<PartitionId>,
    written_mark: Vec<bool>,
    /// With `fsync = interval`: partitions committed but not flushed yet.
    unflushed: Vec<PartitionId>,
    dispatcher: Dispatcher,
    /// The node's DeviceId generator. Registration is rare (a device's first login), so one
    /// generator behind a lock keeps ids unique across shards at no cost to the message path.
    devices: Arc<Mutex<DeviceIdGenerator>>,
    /// For devices of users this shard owns: the session currently logged in as each.
    sessions: AHashMap<DeviceId, devices::Holder>,
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
    /// In a cluster: its membership. A session on a node it counts as down is not online.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Agents' replies to WeChat customers stored this turn, for the sender after the commit.
    wechat_out: Vec<wechat::PendingReply>,
    /// In a replicated cluster: roles, shipping, held acknowledgements (`replication`).
    replication: Option<replication::Replication>,
    /// The shard's cmid budget, across its partitions' windows.
    cmids: cmid_budget::CmidBudget,
    /// Makes the next commit fail as a full or broken disk would (unit tests only).
    #[cfg(test)]
    fail_next_commit: bool,
}

impl Owner {
    /// The owner for shard `shard` with the already opened logs of its partitions (those
    /// with data); rebuilds the dispatcher's assignment counts and waiting queues from the
    /// stored conversations. Other partitions of the shard get a log in `log.root` on first
    /// write.
    pub fn new(
        shard: usize,
        map: Arc<PartitionMap>,
        log: LogSetup,
        opened: Vec<(PartitionId, Store)>,
        devices: Arc<Mutex<DeviceIdGenerator>>,
        reply_bytes_max: usize,
    ) -> Owner {
        let mut partitions: Vec<Option<Partition>> = (0..map.count()).map(|_| None).collect();
        for (p, store) in opened {
            debug_assert_eq!(map.replica_shard(u32::from(p)), Some(shard));
            if let Some(slot) = partitions.get_mut(usize::from(p)) {
                *slot = Some(Partition::new(store));
            }
        }
        // Only the partitions served here now: in a cluster none is led at start, and each
        // `Lead` rebuilds its partition's part (`replication`).
        let dispatcher = shop::restore_dispatcher(
            partitions
                .iter()
                .enumerate()
                .filter(|(p, _)| map.shard_of_partition(*p as u32) == Some(shard))
                .filter_map(|(_, slot)| slot.as_ref())
                .map(Partition::store),
        );
        // Each log's own limit is the shard's whole budget (`node.rs`).
        let cmids = cmid_budget::CmidBudget::new(log.config.cmid_window_entries_max, map.count());
        Owner {
            shard,
            cmids,
            written_mark: vec![false; map.count()],
            map,
            log,
            partitions,
            written: Vec::new(),
            unflushed: Vec::new(),
            dispatcher,
            devices,
            sessions: AHashMap::new(),
            pending: Vec::new(),
            reply_bytes_max,
            messages_stored: 0,
            send_ok_buckets: [0; SEND_OK_BUCKETS_US.len() + 1],
            send_ok_us_sum: 0,
            commit_failures: 0,
            wechat: None,
            cluster: None,
            wechat_out: Vec::new(),
            replication: None,
            #[cfg(test)]
            fail_next_commit: false,
        }
    }

    /// Serves the WeChat channel: agents' replies to WeChat customers go to its sender.
    pub fn set_wechat(&mut self, channel: Option<Arc<crate::wechat::channel::Channel>>) {
        self.wechat = channel;
    }

    /// Serves a node of `cluster`: sessions of nodes it counts as down are not online.
    pub fn set_cluster(&mut self, cluster: Arc<crate::cluster::Cluster>) {
        self.cluster = Some(cluster);
    }

    /// Whether a session of `node` may be live ([`crate::cluster::Cluster::is_alive`]; always
    /// on the single node).
    fn node_alive(&self, node: u16) -> bool {
        self.cluster
            .as_ref()
            .map_or(true, |cluster| cluster.is_alive(node))
    }

    /// An owner of every partition of a one-shard node, with its logs under `dir`, for tests.
    #[cfg(test)]
    pub fn for_tests(shard: usize, shards: usize, dir: &std::path::Path) -> Owner {
        let mut config = crate::store::StoreConfig::new(dir);
        config.segment_bytes = 1 << 20;
        let generator =
            DeviceIdGenerator::new(chinwag_protocol::NodeType::Client, 0).expect("cluster 0 fits");
        let assignment = vec![Some(shard as u16); crate::bus::partitions::PARTITIONS_DEFAULT];
        Owner::new(
            shard,
            Arc::new(PartitionMap::from_assignment(assignment, shards)),
            LogSetup {
                root: dir.to_path_buf(),
                config,
            },
            Vec::new(),
            Arc::new(Mutex::new(generator)),
            1 << 20,
        )
    }

    /// Periodic upkeep of the logs: deletes segments past retention and writes a snapshot of
    /// each partition written since its last one, so a restart replays only what came after.
    pub fn maintain(&mut self, now_ms: u64) {
        let shard = self.shard;
        for (p, partition) in self.open_partitions_mut() {
            let store = &mut partition.store;
            match store.retain(now_ms) {
                Ok(r) if r.segments > 0 => {
                    tracing::info!(
                        shard,
                        partition = p,
                        segments = r.segments,
                        bytes = r.bytes,
                        "retention deleted log segments"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(shard, partition = p, error = %e, "log retention failed")
                }
            }
            if store.snapshot_position() == Some(store.tail()) {
                continue;
            }
            if let Err(e) = store.snapshot() {
                tracing::error!(shard, partition = p, error = %e, "log snapshot failed");
            }
        }
    }

    /// At shutdown: flushes every open log and snapshots those with something new.
    pub fn close_logs(&mut self) {
        let shard = self.shard;
        for (p, partition) in self.open_partitions_mut() {
            let store = &mut partition.store;
            let result = store.sync().and_then(|()| {
                if store.snapshot_position() != Some(store.tail()) {
                    store.snapshot()?;
                }
                Ok(())
            });
            if let Err(e) = result {
                tracing::error!(shard, partition = p, error = %e, "final log flush failed");
            }
        }
    }

    /// The logs' gauges, summed over this shard's open partitions.
    pub fn log_stats(&self) -> LogStats {
        let mut sum = LogStats::default();
        for partition in self.partitions.iter().flatten() {
            let s = partition.store.stats();
            sum.partitions += 1;
            sum.segments += s.segments;
            sum.segment_bytes += s.segment_bytes;
            sum.conversations += s.conversations;
            sum.devices += s.devices;
        }
        sum
    }

    /// This shard's open partitions, ascending.
    fn open_partitions_mut(&mut self) -> impl Iterator<Item = (PartitionId, &mut Partition)> {
        self.partitions
            .iter_mut()
            .enumerate()
            .filter_map(|(p, slot)| Some((p as PartitionId, slot.as_mut()?)))
    }

    /// This shard's open logs of the partitions it serves (leads), ascending by partition.
    fn open_logs(&self) -> impl Iterator<Item = (PartitionId, &Store)> {
        self.partitions
            .iter()
            .enumerate()
            .filter(|(p, _)| self.leads(*p as PartitionId))
            .filter_map(|(p, slot)| Some((p as PartitionId, &slot.as_ref()?.store)))
    }

    /// Whether this shard serves partition `p` (a follower's log serves no reads).
    fn leads(&self, p: PartitionId) -> bool {
        self.map.shard_of_partition(u32::from(p)) == Some(self.shard)
    }

    /// The log of partition `p`, if this shard serves it and it has one.
    fn log(&self, p: PartitionId) -> Option<&Store> {
        if !self.leads(p) {
            return None;
        }
        Some(&self.partitions.get(usize::from(p))?.as_ref()?.store)
    }

    /// The log of the partition that holds `key`, if it has one here.
    fn log_of<K: crate::bus::placement::Placed + ?Sized>(&self, key: &K) -> Option<&Store> {
        self.log(self.map.partition_of(key))
    }

    /// The log of `conv`'s partition, if this shard serves it and it has one.
    fn conv_log(&self, conv: ConvId) -> Option<&Store> {
        self.log(PartitionId::try_from(partition_of_conv(conv)).ok()?)
    }

    /// Partition `p` to write to: opened (its directory created) on first use, and marked
    /// for this turn's commit.
    fn partition_mut(&mut self, p: PartitionId) -> Result<&mut Partition, StoreError> {
        let here = self.map.shard_of_partition(u32::from(p)) == Some(self.shard);
        let Some(slot) = self.partitions.get_mut(usize::from(p)).filter(|_| here) else {
            return Err(StoreError::NotHere {
                partition: u32::from(p),
            });
        };
        if slot.is_none() {
            let (store, _) = Store::open(self.log.config_of(p))?;
            tracing::debug!(shard = self.shard, partition = p, "partition log created");
            *slot = Some(Partition::new(store));
        }
        if !self.written_mark[usize::from(p)] {
            self.written_mark[usize::from(p)] = true;
            self.written.push(p);
        }
        // Just made `Some` if it was not.
        Ok(slot.as_mut().expect("the partition is open"))
    }

    /// The log of partition `p`, to write to.
    fn partition_log_mut(&mut self, p: PartitionId) -> Result<&mut Store, StoreError> {
        Ok(&mut self.partition_mut(p)?.store)
    }

    /// The log of the partition holding `key`, to write to.
    fn log_mut_of<K: crate::bus::placement::Placed + ?Sized>(
        &mut self,
        key: &K,
    ) -> Result<&mut Store, StoreError> {
        let p = self.map.partition_of(key);
        Ok(&mut self.partition_mut(p)?.store)
    }

    /// The log of `conv`'s partition, to write to; `UnknownConv` if it has none here (a
    /// conversation never creates its partition's log).
    fn conv_log_mut(&mut self, conv: ConvId) -> Result<&mut Store, StoreError> {
        self.not_led_here(partition_of_conv(conv))?;
        let p = PartitionId::try_from(partition_of_conv(conv))
            .ok()
            .filter(|&p| self.log(p).is_some())
            .ok_or(StoreError::UnknownConv(conv))?;
        Ok(&mut self.partition_mut(p)?.store)
    }

    /// Acts on `msg` at `now_ms` (Unix milliseconds). Its outputs wait for [`Owner::commit`].
    /// Only the messages for an owner (see [`BusMsg`]) are expected; others are ignored.
    pub fn handle(&mut self, msg: BusMsg, now_ms: u64) {
        match msg {
            BusMsg::Send(mut send) if send.profile_pending => {
                // A service's `send_as`, at the sender's owner: on to the conversation's owner
                // with the sender's profile.
                send.profile = self
                    .log_of(&send.origin.uid)
                    .and_then(|log| log.profile(chinwag_protocol::Subject::User(send.origin.uid)))
                    .cloned();
                send.profile_pending = false;
                let msg = BusMsg::Send(send);
                match msg.owner(&self.map) {
                    Some(owner) if owner == self.shard => self.handle(msg, now_ms),
                    // Another shard's or node's, or none's (answered `not_found` there): the
                    // post office decides.
                    _ => self.push_out(msg),
                }
            }
            BusMsg::Send(send) => {
                let SendRequest {
                    origin,
                    target,
                    cmid,
                    kind,
                    body,
                    profile,
                    profile_pending: _,
                } = *send;
                let sent = self.send(
                    &origin,
                    target,
                    &cmid,
                    &kind,
                    &body,
                    profile.as_ref(),
                    now_ms,
                );
                if let Err((code, text)) = sent {
                    self.reply_now(&origin, origin.error(code, &text));
                }
            }
            BusMsg::Profile(request) => {
                let ProfileRequest { origin, op } = *request;
                if let Err((code, text)) = self.profile_op(&origin, op, now_ms) {
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
                    let (shop, from_ms, to_ms) = (stats.shop, stats.from_ms, stats.to_ms);
                    let report = match self.log_of(&shop) {
                        Some(log) => log.agent_stats(shop, from_ms, to_ms),
                        None => crate::store::agent_stats_of_nothing(shop, from_ms, to_ms),
                    };
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
                self.push_out(BusMsg::PresencePart {
                    session: origin.session,
                    token,
                    online: Some(online),
                });
            }
            BusMsg::StreamRead { session, from } => {
                let part = self.stream_read(session, &from);
                self.push_out(BusMsg::StreamPart(Box::new(part)));
            }
            BusMsg::Convs {
                origin,
                token,
                partitions,
            } => {
                let convs = self.convs_of(origin.uid);
                self.push_out(BusMsg::ConvsPart {
                    session: origin.session,
                    token,
                    partitions,
                    convs: Some(convs),
                });
            }
            BusMsg::Register {
                session,
                uid,
                device_type,
            } => self.register(session, uid, device_type),
            BusMsg::Unregister {
                session, device, ..
            } => self.unregister(session, device),
            BusMsg::Announce {
                partition,
                sessions,
            } => {
                self.announced(partition, &sessions);
            }
            BusMsg::ForgetNode { node } => self.forget_node(node),
            BusMsg::AgentOnline {
                shop,
                agent,
                profile,
            } => self.agent_online(shop, agent, profile.as_deref(), now_ms),
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
            msg @ (BusMsg::Role(_)
            | BusMsg::LogData(_)
            | BusMsg::ReplicaAck(_)
            | BusMsg::EpochQuery(_)
            | BusMsg::EpochAnswer(_)) => self.handle_replication(msg),
            BusMsg::Deliver { .. }
            | BusMsg::Push(_)
            | BusMsg::Registered { .. }
            | BusMsg::OwnProfile { .. }
            | BusMsg::Kick { .. }
            | BusMsg::ConvsPart { .. }
            | BusMsg::PresencePart { .. }
            | BusMsg::StreamPart(_)
            | BusMsg::Reannounce { .. } => {
                debug_assert!(false, "not a message for an owner: {msg:?}");
            }
        }
    }

    /// Makes the turn's records durable and returns what may now go out, in order: at once,
    /// or in a replicated cluster with `ack = replicated` once every in-sync replica has the
    /// turn's records (`replication`). Messages for other replicas (records, positions) are
    /// among them.
    pub fn commit(&mut self) -> Vec<(To, BusMsg)> {
        let mut out = Vec::new();
        if self.pending.is_empty() && self.replication.is_none() {
            // Nothing to acknowledge; still give an `interval` policy its periodic flush.
            if let Err(e) = self.commit_log() {
                tracing::error!(shard = self.shard, error = %e, "log commit failed");
            }
            return out;
        }
        let pending = std::mem::take(&mut self.pending);
        let needs = self.replicated_writes();
        match self.commit_log() {
            Ok(()) => {
                self.replicate(true, &mut out);
                self.hold_or_release(needs, pending, &mut out);
                // Only now that the agents' replies are durable do they go to WeChat.
                out.extend(
                    self.wechat_submit()
                        .into_iter()
                        .map(|(shard, msg)| (To::Shard(shard), msg)),
                );
            }
            Err(e) => {
                self.replicate(false, &mut out);
                if pending.is_empty() {
                    tracing::error!(shard = self.shard, error = %e, "log commit failed");
                    return out;
                }
                self.commit_failures += 1;
                // The agents are answered `unavailable`: their replies do not go to WeChat.
                self.wechat_out.clear();
                tracing::error!(shard = self.shard, error = %e, "log commit failed; answering unavailable");
                self.refuse(pending, &mut out, "the log could not store the change");
            }
        }
        out
    }

    /// The most members a conversation may have (`members_max`).
    fn members_max(&self) -> usize {
        self.log.config.members_max
    }

    /// `NotHere` (answered `unavailable`: retry) for a partition this shard holds a replica
    /// of but does not lead now (it was demoted after the request was routed here), or, in a
    /// cluster, no longer holds at all (a move took it away after the request was routed
    /// here: the retry goes to its new leader), or leads on a lease that has run out (another
    /// node may lead it by now: what this log holds may be stale, or hold records of its
    /// epoch that the new leader's log never will).
    fn not_led_here(&self, p: u32) -> Result<(), StoreError> {
        let follows = self.map.replica_shard(p) == Some(self.shard)
            && self.map.shard_of_partition(p) != Some(self.shard);
        let moved_away = self.replication.is_some()
            && (p as usize) < self.map.count()
            && self.map.replica_shard(p).is_none();
        match follows || moved_away || self.lease_lapsed(p) {
            true => Err(StoreError::NotHere { partition: p }),
            false => Ok(()),
        }
    }

    /// Whether this shard leads `p` on a lease that is not valid now (always false without
    /// a leadership thread: roles are static then).
    fn lease_lapsed(&self, p: u32) -> bool {
        let Some(leases) = self
            .replication
            .as_ref()
            .and_then(|r| r.setup.leases.as_deref())
        else {
            return false;
        };
        let Some(Some(Partition {
            role: Some(crate::cluster::replica::Role::Lead(leader)),
            ..
        })) = usize::try_from(p).ok().and_then(|i| self.partitions.get(i))
        else {
            return false;
        };
        !leases.valid(leader.partition, leader.epoch, std::time::Instant::now())
    }

    /// The conversation, if it is here.
    fn local_conv(&self, conv: ConvId) -> Result<&crate::store::Conversation, (ErrorCode, String)> {
        self.not_led_here(partition_of_conv(conv))
            .map_err(store_error)?;
        self.conv_log(conv)
            .and_then(|log| log.conv(conv))
            .ok_or_else(|| (ErrorCode::NotFound, format!("no conversation {conv}")))
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
        self.conv_log(conv)
            .and_then(|log| log.conv(conv))
            .map(|c| SmallVec::from_slice(c.members()))
            .unwrap_or_default()
    }

    /// Commits the logs of the partitions written this turn (and, with `fsync = interval`,
    /// flushes those whose interval is up). Every one is committed even if one fails; the
    /// first failure is the result.
    fn commit_log(&mut self) -> Result<(), StoreError> {
        let written = std::mem::take(&mut self.written);
        for &p in &written {
            self.written_mark[usize::from(p)] = false;
        }
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_commit) {
            return Err(StoreError::Poisoned);
        }
        let interval = self.log.config.fsync == FsyncPolicy::Interval;
        let mut result = Ok(());
        let earlier = std::mem::take(&mut self.unflushed);
        for p in written.into_iter().chain(earlier) {
            let Some(partition) = self.partitions[usize::from(p)].as_mut() else {
                continue;
            };
            // A partition both written and waiting for its flush is committed twice: the
            // second finds nothing new.
            if let Err(e) = partition.store.commit() {
                result = result.and(Err(e));
            }
            if interval && partition.store.needs_flush() && !self.unflushed.contains(&p) {
                self.unflushed.push(p);
            }
            let (added, forgot) = partition.store.take_cmid_churn();
            self.cmids.note(p, added, forgot);
        }
        self.cmids.trim(&mut self.partitions);
        result
    }

    /// An acknowledgement: goes out after the commit, or becomes `unavailable` if it fails.
    fn ack(&mut self, origin: &Origin, ws_message: Bytes) {
        self.pending.push(Pending {
            to: To::Named,
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
        self.push_out(BusMsg::Deliver {
            to: origin.session,
            ws_message,
        });
    }

    /// An output for where the message names (a session, here or on its node; the owner of
    /// a forwarded request), after the turn's commit.
    fn push_out(&mut self, msg: BusMsg) {
        self.pending.push(Pending {
            to: To::Named,
            msg,
            if_lost: None,
            send_received: None,
        });
    }

    /// A push for the devices of `fanout.users`, encoded once and shared by every shard and
    /// sent once to each node that holds one of them.
    fn fanout(&mut self, fanout: Fanout) {
        self.pending.push(Pending {
            to: To::Fanout,
            msg: BusMsg::Push(Arc::new(fanout)),
            if_lost: None,
            send_received: None,
        });
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

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, History, HistoryRange, Message, Target};

    use super::testing::*;
    use super::*;

    fn partition_dirs(h: &Harness) -> Vec<PartitionId> {
        (0..PARTITIONS as PartitionId)
            .filter(|&p| partition_dir(h.dir(), p).is_dir())
            .collect()
    }

    fn newest_seqs(h: &mut Harness, origin: &Origin, conv: ConvId) -> Vec<u64> {
        let out = h.turn(BusMsg::History {
            origin: Box::new(*origin),
            history: History {
                conv,
                range: HistoryRange::Newest,
                limit: 50,
            },
        });
        match chinwag_protocol::json::decode(&replies(&out, origin.session)[0])
            .expect("a JSON reply")
            .message
        {
            Message::HistoryOk(ok) => ok.msgs.iter().map(|m| m.seq.0).collect(),
            other => panic!("not history_ok: {other:?}"),
        }
    }

    #[test]
    fn an_owner_creates_a_partitions_log_on_its_first_write_only() {
        let mut h = Harness::new();
        assert!(partition_dirs(&h).is_empty(), "an empty owner has no log");
        assert_eq!(h.owner.log_stats(), LogStats::default());
        // A read of a conversation that does not exist creates nothing.
        let a = h.login(buyer(1));
        let before = partition_dirs(&h);
        assert_eq!(before, [test_map().partition_of(&buyer(1))]);
        let out = h.turn(BusMsg::History {
            origin: Box::new(a),
            history: History {
                conv: ConvId(5 << 16 | 3),
                range: HistoryRange::Newest,
                limit: 5,
            },
        });
        assert!(replies(&out, a.session)[0].contains(r#""code":"not_found""#));
        assert_eq!(partition_dirs(&h), before);
        assert_eq!(h.owner.log_stats().partitions, before.len());
    }

    /// Per-partition recovery: every partition with a log is opened again, its conversations
    /// and devices are there, seqs and conversation counters go on, and none is added.
    #[test]
    fn a_restart_reopens_every_partition_and_each_goes_on_where_it_stopped() {
        let mut h = Harness::new();
        let users: Vec<Origin> = (1..=12).map(|id| h.login(buyer(id))).collect();
        let mut convs = Vec::new();
        for pair in users.windows(2) {
            for cmid in ["1", "2", "3"] {
                let out = h.turn(send(&pair[0], Target::User(pair[1].uid), cmid, "x"));
                let (conv, _) = send_ok(&replies(&out, pair[0].session));
                if cmid == "1" {
                    convs.push((conv, pair[0], pair[1]));
                }
            }
        }
        let dirs = partition_dirs(&h);
        assert!(
            dirs.len() >= 4,
            "the data spreads over partitions: {dirs:?}"
        );
        let stats = h.owner.log_stats();
        h.restart();
        assert_eq!(partition_dirs(&h), dirs, "a restart adds no partition");
        assert_eq!(h.owner.log_stats().conversations, stats.conversations);
        assert_eq!(h.owner.log_stats().devices, stats.devices);
        for (i, &(conv, a, b)) in convs.iter().enumerate() {
            let a = h.login(a.uid);
            assert_eq!(newest_seqs(&mut h, &a, conv), [1, 2, 3]);
            let out = h.turn(send(&a, Target::User(b.uid), "4", "again"));
            assert_eq!(send_ok(&replies(&out, a.session)), (conv, 4), "pair {i}");
        }
        // A new conversation in a partition that had some gets the next counter there.
        let (conv, _, _) = convs[0];
        let p = partition_of_conv(conv) as PartitionId;
        let taken: Vec<u64> = convs
            .iter()
            .filter(|(c, ..)| partition_of_conv(*c) == u32::from(p))
            .map(|(c, ..)| conv_counter(*c))
            .collect();
        let shop = (1..)
            .map(chinwag_protocol::ShopId)
            .find(|s| test_map().partition_of(s) == p)
            .expect("some shop is in the partition");
        let out = h.turn(send(&users[0], Target::Shop(shop), "s", "hi"));
        let (new, _) = send_ok(&replies(&out, users[0].session));
        assert_eq!(partition_of_conv(new), u32::from(p));
        assert_eq!(conv_counter(new), taken.iter().max().unwrap() + 1);
    }

    #[test]
    fn a_turn_commits_the_partitions_it_wrote_and_forgets_them() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let c = h.login(buyer(3));
        h.owner
            .handle(send(&a, Target::User(b.uid), "1", "x"), h.now_ms);
        h.owner
            .handle(send(&a, Target::User(c.uid), "2", "y"), h.now_ms);
        let wrote: std::collections::BTreeSet<PartitionId> = [(a.uid, b.uid), (a.uid, c.uid)]
            .iter()
            .map(|(x, y)| test_map().partition_of(&crate::bus::user_pair(*x, *y)))
            .collect();
        let mut marked = h.owner.written.clone();
        marked.sort_unstable();
        assert_eq!(marked, wrote.into_iter().collect::<Vec<_>>());
        let out = h.commit();
        assert_eq!(pushes(&out).len(), 2);
        assert!(h.owner.written.is_empty());
        assert!(h.owner.written_mark.iter().all(|m| !m));
    }

    #[test]
    fn a_partition_of_another_shard_is_not_served_here() {
        let dir = tempfile::tempdir().unwrap();
        // Partitions alternate between shard 0 (the owner under test) and shard 1.
        let map = PartitionMap::single_node(PARTITIONS, 2);
        let mut config = StoreConfig::new(dir.path());
        config.segment_bytes = 1 << 20;
        let generator = DeviceIdGenerator::new(chinwag_protocol::NodeType::Client, 0).unwrap();
        let mut owner = Owner::new(
            0,
            Arc::new(map.clone()),
            LogSetup {
                root: dir.path().to_path_buf(),
                config,
            },
            Vec::new(),
            Arc::new(Mutex::new(generator)),
            1 << 20,
        );
        let elsewhere = (1..)
            .map(chinwag_protocol::ShopId)
            .find(|s| map.shard_of(s) == Some(1))
            .unwrap();
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        owner.handle(send(&a, Target::Shop(elsewhere), "1", "x"), 1);
        let out = by_shard(owner.commit(), &map);
        assert!(replies(&out, a.session)[0].contains(r#""code":"unavailable""#));
        owner.handle(
            send(
                &a,
                Target::Conv(crate::bus::partitions::conv_id(1, 1)),
                "2",
                "x",
            ),
            1,
        );
        let out = by_shard(owner.commit(), &map);
        assert!(replies(&out, a.session)[0].contains(r#""code":"not_found""#));
        assert!(!partition_dir(dir.path(), 1).exists());
    }
}
