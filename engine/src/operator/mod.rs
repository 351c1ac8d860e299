//! The operations of the node: what the operator sets (configuration, the token secret, the
//! data directory it holds) and watches (metrics, the drain), and [`NodeState`], the part of
//! it every shard shares.

pub mod config;
pub mod data_dir;
pub(crate) mod metrics;
pub(crate) mod process;
pub mod secret;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chinwag_protocol::{NodeId, NodeType};

use config::Config;
use metrics::ShardMetrics;

/// What the shards of a node share besides the bus: the configuration, the secret, each
/// shard's metrics and the draining flag. All of it is either read-only or lock-free.
pub(crate) struct NodeState {
    pub config: Config,
    /// The secret that signs login tokens.
    pub jwt_secret: Vec<u8>,
    /// This node's id: in a cluster, its number and node-link address; else from its client
    /// address.
    pub node_id: NodeId,
    pub metrics: Box<[ShardMetrics]>,
    /// Which partitions this node owns and which shard serves each.
    pub partitions: Arc<crate::bus::PartitionMap>,
    /// The WeChat channel, when the configuration has WeChat accounts.
    pub wechat: Option<Arc<crate::wechat::channel::Channel>>,
    /// This node's membership, with `--cluster` (set before the shards start).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    draining: AtomicBool,
    /// Per shard: its connections are drained (or it has stopped). A shard keeps its listener
    /// (answering probes with 503) until every shard is done, because closing one listener of
    /// the `SO_REUSEPORT` group resets the connections the kernel queued on it.
    shards_drained: Box<[AtomicBool]>,
}

impl NodeState {
    /// The state of a node whose shards serve the partitions as `partitions` says.
    pub fn new(
        config: Config,
        jwt_secret: Vec<u8>,
        partitions: Arc<crate::bus::PartitionMap>,
        wechat: Option<Arc<crate::wechat::channel::Channel>>,
    ) -> NodeState {
        let shards = partitions.shards();
        let node_id = match config.listen {
            SocketAddr::V4(addr) => NodeId::for_addr(NodeType::Connector, addr),
            SocketAddr::V6(addr) => NodeId::for_addr(
                NodeType::Connector,
                std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, addr.port()),
            ),
        };
        NodeState {
            config,
            jwt_secret,
            node_id,
            metrics: (0..shards).map(|_| ShardMetrics::default()).collect(),
            partitions,
            wechat,
            cluster: None,
            draining: AtomicBool::new(false),
            shards_drained: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Raises the drain flag: every shard, once woken, stops accepting and closes its
    /// connections with 1001.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Records that shard `id` has drained its connections (or stopped). The caller wakes the
    /// shards, so that each sees whether all are done.
    pub fn shard_drained(&self, id: usize) {
        if let Some(done) = self.shards_drained.get(id) {
            done.store(true, Ordering::Release);
        }
    }

    /// Whether every shard has drained its connections: the shards may exit.
    pub fn all_drained(&self) -> bool {
        self.shards_drained
            .iter()
            .all(|done| done.load(Ordering::Acquire))
    }

    /// The Prometheus text of every metric; `mailbox_depths` are the shards' queue lengths.
    pub fn render_metrics(&self, mailbox_depths: &[usize]) -> String {
        let shards: Vec<&ShardMetrics> = self.metrics.iter().collect();
        let mut text = metrics::render(&metrics::Scrape {
            shards: &shards,
            mailbox_depths,
            draining: self.is_draining(),
        });
        if let Some(wechat) = &self.wechat {
            wechat.metrics.render(&mut text);
        }
        if let Some(cluster) = &self.cluster {
            cluster.render_metrics(&mut text);
        }
        text
    }
}
