//! A node's membership in a cluster (docs/cluster.md): the registry, the partition table and
//! the routing table user → device → node, all kept in Redis, and the threads that talk to it.
//!
//! Nothing here runs on a shard. Two threads of their own hold the Redis connections, every
//! call with a timeout:
//! - the **registry thread** (`chinwag-cluster`): the heartbeat, the peers' liveness, the
//!   clean-up after dead peers, and this node's routes (written from the logins and logouts
//!   the shards post to its queue);
//! - the **subscriber thread** (`chinwag-cluster-sub`): the cache of every route, loaded whole
//!   and then kept fresh by the route channel, and the probe that proves the subscription
//!   still delivers.
//!
//! The shards use [`Cluster`] and never wait: [`Cluster::devices_of`] reads the cache,
//! [`Cluster::route_login`] and [`Cluster::route_logout`] queue a record without blocking,
//! [`Cluster::partition_owner`] reads the owners the leadership thread keeps current (the
//! table read at start until it runs) and the peers' liveness.
//! Without `--cluster` there is no `Cluster` at all and the node is the embedded single node.
//!
//! The leadership thread ([`lease`], started by [`Cluster::start_leases`]) holds this node's
//! leases on the partitions it leads, takes over partitions whose leader lapsed, and tells the
//! shards their roles ([`roles`]).
//!
//! The node links ([`link`], their wire format [`wire`]) carry the bus between nodes; the
//! post office (`bus::post`) sends through them what it routes to another node.

pub mod health;
pub mod lease;
pub(crate) mod link;
pub mod moves;
pub mod redis_conn;
pub mod redis_keys;
pub mod registry;
pub mod replica;
pub mod roles;
pub mod routes;
pub(crate) mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chinwag_protocol::ids::NodeIdParts;
use chinwag_protocol::{DeviceId, NodeId, NodeType, Uid};
use crossbeam::channel::{Sender, TrySendError};
use smallvec::SmallVec;

use crate::bus::SessionRef;
use crate::operator::config::Config;
use health::ClusterHealth;
use lease::{LeaseSettings, LeaseThread};
use redis_conn::RedisTarget;
use registry::{JoinError, PartitionOwners, PartitionTable, Peers, Registration, RegistryThread};
use roles::{Leases, RoleSink};
use routes::{Route, RouteCache, RouteOp, Subscriber};

/// Logins and logouts waiting for the registry thread, at most. The thread drains the queue
/// every few milliseconds whether or not Redis answers, so it fills only in a storm of logins
/// larger than this within one round; what does not fit is counted and repaired by the next
/// full rewrite of the node's routes.
pub const ROUTE_QUEUE_MAX: usize = 256 * 1024;

/// A partition's owner as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOwner {
    pub node: u16,
    /// The owner's fencing epoch for this partition.
    pub epoch: u64,
    /// The owner's heartbeat was there at the last read of the registry.
    pub alive: bool,
}

/// This node's membership, shared by its shards.
pub struct Cluster {
    /// The cluster's name on the node links (from its creation time in Redis).
    pub name: String,
    /// This node's number (1..=4095).
    pub node: u16,
    /// This node's id: type connector, its number, its node-link IPv4 address and port.
    pub node_id: NodeId,
    /// The partition table as read at join (the node's partition map at start). The live
    /// leaders are [`Cluster::partition_owner`]'s.
    pub partitions: PartitionTable,
    /// Every partition's leader and epoch now (kept current by the leadership thread).
    pub owners: Arc<PartitionOwners>,
    /// The cluster's Redis and the leadership thread's settings, for [`Cluster::start_leases`].
    target: Option<RedisTarget>,
    lease: LeaseSettings,
    pub peers: Arc<Peers>,
    pub routes: Arc<RouteCache>,
    pub health: Arc<ClusterHealth>,
    /// The node links, once started (for health and metrics).
    links: std::sync::OnceLock<Arc<link::Links>>,
    ops: Sender<RouteOp>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What joining needs from the configuration and the bound ports.
pub struct JoinSettings {
    pub redis_url: String,
    pub node: u16,
    pub partitions: u32,
    pub client: SocketAddr,
    pub service: SocketAddr,
    pub link: SocketAddr,
    pub timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_ttl: Duration,
    pub probe_interval: Duration,
    /// The leadership thread's lease timings (its node and P are the ones above).
    pub lease: Duration,
    pub lease_renew: Duration,
    pub lease_margin: Duration,
    /// Leaderships go back to each partition's preferred replica.
    pub preferred_leader: bool,
}

impl JoinSettings {
    /// The settings of `config` (which has `cluster` set), with the ports actually bound.
    pub fn from_config(config: &Config, client: SocketAddr, service: SocketAddr) -> JoinSettings {
        JoinSettings {
            redis_url: config.cluster.clone().unwrap_or_default(),
            node: config.node,
            // Resolved by main (the data directory's count, else the default), never 0.
            partitions: config.partitions as u32,
            client,
            service,
            // What peers dial: the advertised address, else the one bound.
            link: config
                .node_advertise
                .or(config.node_listen)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            timeout: Duration::from_millis(config.cluster_redis_timeout_ms),
            heartbeat_interval: Duration::from_millis(config.cluster_heartbeat_interval_ms),
            heartbeat_ttl: Duration::from_millis(config.cluster_heartbeat_ttl_ms),
            probe_interval: Duration::from_millis(config.cluster_probe_interval_ms),
            lease: Duration::from_millis(config.cluster_lease_ms),
            lease_renew: Duration::from_millis(config.cluster_lease_renew_ms),
            lease_margin: Duration::from_millis(config.cluster_lease_margin_ms),
            preferred_leader: config.cluster_preferred_leader,
        }
    }
}

/// The NodeId of node `node` whose node link listens on `link` (the seed layout: type
/// connector, the node number, the IPv4 address, the port; an IPv6 link has no IPv4 to put
/// there, and the configuration refuses one).
pub fn node_id(node: u16, link: SocketAddr) -> Result<NodeId, String> {
    let IpAddr::V4(ip) = link.ip() else {
        return Err(format!(
            "node_listen {link}: the NodeId holds an IPv4 address"
        ));
    };
    NodeId::pack(NodeIdParts {
        node_type: NodeType::Connector,
        number: node,
        ip,
        port: link.port(),
    })
    .map_err(|e| e.to_string())
}

/// The routes of `uid` in `cache` whose node `is_alive` says is up.
fn live_routes(
    cache: &RouteCache,
    uid: Uid,
    is_alive: impl Fn(u16) -> bool,
) -> SmallVec<[Route; 4]> {
    let mut routes = cache.of(uid);
    routes.retain(|r| is_alive(r.node));
    routes
}

impl Cluster {
    /// Joins the cluster (see [`registry::join`]) and starts the two threads.
    pub fn join(settings: JoinSettings) -> Result<Arc<Cluster>, JoinError> {
        let target =
            RedisTarget::new(&settings.redis_url, settings.timeout).map_err(JoinError::Refused)?;
        let node_id = node_id(settings.node, settings.link).map_err(JoinError::Refused)?;
        let mut token = [0u8; 8];
        getrandom::fill(&mut token)
            .map_err(|e| JoinError::Failed(format!("cluster: no random token: {e}")))?;
        let registration = Registration {
            node: settings.node,
            id: node_id,
            client: settings.client,
            service: settings.service,
            link: settings.link,
            token: format!("{:016x}", u64::from_le_bytes(token)),
            heartbeat_ttl: settings.heartbeat_ttl,
        };
        let peers = Arc::new(Peers::default());
        let (connection, partitions, meta) =
            registry::join(&target, &registration, settings.partitions, &peers)?;
        let health = Arc::new(ClusterHealth::default());
        let routes = Arc::new(RouteCache::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ops, ops_rx) = crossbeam::channel::bounded(ROUTE_QUEUE_MAX);
        let owned = partitions.owned_by(settings.node);
        tracing::info!(
            node = settings.node,
            node_id = %node_id,
            redis = %target.url,
            partitions = partitions.count(),
            owned = owned.len(),
            peers_alive = peers.list().iter().filter(|p| p.alive).count(),
            "cluster: joined"
        );
        let registry = RegistryThread {
            target: target.clone(),
            registration,
            heartbeat_interval: settings.heartbeat_interval,
            ops: ops_rx,
            peers: Arc::clone(&peers),
            health: Arc::clone(&health),
            stop: Arc::clone(&stop),
        };
        let lease = LeaseSettings {
            node: settings.node,
            partitions: settings.partitions,
            lease: settings.lease,
            renew: settings.lease_renew,
            margin: settings.lease_margin,
            preferred_leader: settings.preferred_leader,
        };
        let lease_target = target.clone();
        let subscriber = Subscriber {
            target,
            node: settings.node,
            probe_interval: settings.probe_interval,
            cache: Arc::clone(&routes),
            health: Arc::clone(&health),
            stop: Arc::clone(&stop),
        };
        let spawn_failed = |e: std::io::Error| JoinError::Failed(format!("cluster: thread: {e}"));
        let threads = vec![
            std::thread::Builder::new()
                .name("chinwag-cluster".into())
                .spawn(move || registry.run(connection))
                .map_err(spawn_failed)?,
            std::thread::Builder::new()
                .name("chinwag-cluster-sub".into())
                .spawn(move || subscriber.run())
                .map_err(spawn_failed)?,
        ];
        Ok(Arc::new(Cluster {
            // Names this cluster on its node links: a node of another cluster sharing the
            // addresses (an old one, a test's) is refused at the handshake.
            name: format!("chinwag-{}", meta.created_ms),
            node: settings.node,
            node_id,
            owners: Arc::new(PartitionOwners::new(&partitions)),
            partitions,
            target: Some(lease_target),
            lease,
            peers,
            routes,
            health,
            links: std::sync::OnceLock::new(),
            ops,
            stop,
            threads: Mutex::new(threads),
        }))
    }

    /// Node `node` of a cluster whose partitions are as `partitions` says and whose peers'
    /// liveness is `peers`, with no Redis and no thread (for tests of what reads it).
    #[cfg(test)]
    pub fn for_tests(node: u16, partitions: PartitionTable, peers: Arc<Peers>) -> Arc<Cluster> {
        let (ops, _) = crossbeam::channel::bounded(1);
        Arc::new(Cluster {
            name: "test".into(),
            node,
            node_id: node_id(node, SocketAddr::from(([127, 0, 0, 1], 7000 + node))).unwrap(),
            owners: Arc::new(PartitionOwners::new(&partitions)),
            lease: LeaseSettings {
                node,
                partitions: partitions.count(),
                lease: Duration::from_secs(3),
                renew: Duration::from_secs(1),
                margin: Duration::from_millis(300),
                preferred_leader: true,
            },
            partitions,
            target: None,
            peers,
            routes: Arc::new(RouteCache::default()),
            health: Arc::new(ClusterHealth::default()),
            links: std::sync::OnceLock::new(),
            ops,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Shows the node links' state in health and metrics.
    pub fn set_links(&self, links: Arc<link::Links>) {
        let _ = self.links.set(links);
    }

    /// Where `uid`'s devices are logged in: each device and the node holding its session,
    /// from the cache, leaving out nodes that are down ([`Cluster::is_alive`]). Never blocks on
    /// Redis.
    pub fn devices_of(&self, uid: Uid) -> SmallVec<[Route; 4]> {
        live_routes(&self.routes, uid, |node| self.is_alive(node))
    }

    /// Records that `session` of this node logged in as `device` of `uid` (queued; written to
    /// Redis by the registry thread in its next batch).
    pub fn route_login(&self, uid: Uid, device: DeviceId, session: SessionRef) {
        self.queue(RouteOp::Login {
            uid,
            device,
            session,
        });
    }

    /// Records that `session`, logged in as `device` of `uid`, ended (queued likewise; a
    /// newer session of the same device on this node keeps the route).
    pub fn route_logout(&self, uid: Uid, device: DeviceId, session: SessionRef) {
        self.queue(RouteOp::Logout {
            uid,
            device,
            session,
        });
    }

    fn queue(&self, op: RouteOp) {
        match self.ops.try_send(op) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.health.route_ops_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Starts the leadership thread (`chinwag-cluster-lease`, [`lease`]): it writes this
    /// node's lease deadlines into `leases`, sends role changes to `sink` (which must not
    /// block), and keeps [`Cluster::partition_owner`] current. Stop it with
    /// [`LeaseThread::drain`] when the node drains (its followers take over at once).
    pub fn start_leases(
        &self,
        leases: Arc<Leases>,
        sink: Arc<dyn RoleSink>,
    ) -> std::io::Result<LeaseThread> {
        let target = self
            .target
            .clone()
            .ok_or_else(|| std::io::Error::other("a cluster for tests has no Redis"))?;
        lease::start(target, self.lease, leases, sink, Arc::clone(&self.owners))
    }

    /// Which node leads partition `p` now, at which epoch, and whether it is alive; `None`
    /// for a partition number ≥ P. Lock-free (one atomic load).
    pub fn partition_owner(&self, p: u32) -> Option<PartitionOwner> {
        let entry = self.owners.get(p)?;
        Some(PartitionOwner {
            node: entry.node,
            epoch: entry.epoch,
            alive: self.is_alive(entry.node),
        })
    }

    /// Whether node `node` counts as up: this node, a peer whose heartbeat was there at the
    /// last read of the registry, or a peer whose node link is connected now. The link keeps a
    /// peer up while Redis is away or restarted (heartbeats lapse there, not between the
    /// nodes), so established sessions keep chatting; a killed peer's link drops at once, and
    /// one that hangs is closed after `node_link_idle_timeout_ms`.
    pub fn is_alive(&self, node: u16) -> bool {
        node == self.node
            || self.peers.is_alive(node)
            || self
                .links
                .get()
                .is_some_and(|links| links.is_connected(node))
    }

    /// Leaves the cluster: stops the threads; the registry thread writes the last routes,
    /// removes this node's routes and gives its number up. Blocks for at most a few Redis
    /// timeouts.
    pub fn leave(&self) {
        self.stop.store(true, Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// The `/healthz` lines and whether the node is healthy.
    pub fn healthz(&self, now_unix_ms: u64) -> (bool, String) {
        let mut text = String::new();
        self.health.describe(now_unix_ms, &mut text);
        let peers = self.peers.list();
        let alive = peers.iter().filter(|p| p.alive).count();
        text.push_str(&format!(
            "node: {} (id {})\npeers: {alive} alive of {} registered\n",
            self.node,
            self.node_id,
            peers.len()
        ));
        if let Some(links) = self.links.get() {
            for stats in links.stats() {
                text.push_str(&format!(
                    "link {}: {}, queued {} bytes, dropped {}, unavailable {}, reconnects {}\n",
                    stats.node,
                    if stats.connected { "up" } else { "down" },
                    stats.queue_bytes,
                    stats.dropped,
                    stats.unavailable,
                    stats.reconnects
                ));
            }
        }
        (self.health.is_healthy(), text)
    }

    /// Appends the cluster's metrics: the health's, the cache's size, each peer's liveness.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        self.health.render(out);
        let name = "chinwag_cluster_routes_cached";
        let _ = writeln!(
            out,
            "# HELP {name} Routes (user, device, node) in this node's cache of the routing table.\n\
             # TYPE {name} gauge\n{name} {}",
            self.routes.count()
        );
        let name = "chinwag_cluster_peer_up";
        let _ = writeln!(
            out,
            "# HELP {name} 1 while a registered node's heartbeat is there (this node included).\n\
             # TYPE {name} gauge"
        );
        for peer in self.peers.list() {
            let _ = writeln!(
                out,
                "{name}{{node=\"{}\"}} {}",
                peer.number,
                u8::from(peer.alive)
            );
        }
        if let Some(links) = self.links.get() {
            crate::operator::metrics::render_links(out, &links.stats());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn routes_of_dead_nodes_are_left_out() {
        let cache = RouteCache::default();
        let peers = Peers::default();
        let uid = Uid::new(chinwag_protocol::UidKind::Buyer, 1);
        for (node, device) in [(1, 10), (2, 11), (3, 12)] {
            cache.apply(redis_keys::RouteChange {
                added: true,
                node,
                uid,
                device: DeviceId::from_u64(device).unwrap(),
            });
        }
        peers.set_alive_for_tests(&[(1, true), (2, true), (3, false)]);
        let nodes = |me| -> Vec<u16> {
            let alive = |node| node == me || peers.is_alive(node);
            let mut n: Vec<u16> = live_routes(&cache, uid, alive)
                .iter()
                .map(|r| r.node)
                .collect();
            n.sort_unstable();
            n
        };
        assert_eq!(nodes(1), [1, 2], "node 3's heartbeat lapsed");
        assert_eq!(nodes(3), [1, 2, 3], "a node trusts its own routes");
    }

    #[test]
    fn the_node_id_packs_type_number_ipv4_and_port() {
        let id = node_id(3, "10.0.0.7:7100".parse().unwrap()).unwrap();
        let parts = id.unpack();
        assert_eq!(parts.node_type, NodeType::Connector);
        assert_eq!(parts.number, 3);
        assert_eq!(parts.ip, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(parts.port, 7100);
        assert_eq!(id.get(), 1 << 60 | 3 << 48 | 0x0a00_0007 << 16 | 7100);
        assert!(node_id(4096, "10.0.0.7:7100".parse().unwrap()).is_err());
        assert!(node_id(3, "[::1]:7100".parse().unwrap()).is_err());
    }
}
