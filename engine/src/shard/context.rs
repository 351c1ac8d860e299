//! What a session may use of its shard while it handles an event: the shard's id and limits,
//! the node's shared state, the post for other shards, the turn's clocks, and the lists of
//! sessions the turn must come back to.

use std::sync::Arc;

use mio::Token;

use chinwag_protocol::ErrorCode;

use crate::bus::post::{Hop, Post, To};
use crate::bus::{BusMsg, SessionRef};
use crate::net::ws::connection::WsLimits;
use crate::operator::config::Config;
use crate::operator::metrics::ShardMetrics;
use crate::operator::NodeState;

/// The connection's limits, from the node's configuration.
pub fn ws_limits(config: &Config) -> WsLimits {
    WsLimits {
        enable_echo: config.enable_echo,
        enable_wechat: !config.wechat.accounts.is_empty(),
        frame_bytes_max: config.frame_bytes_max,
        message_bytes_max: config.message_bytes_max,
        messages_per_s_max: config.messages_per_s_max,
        handshake_timeout_ms: config.handshake_timeout_ms,
        idle_timeout_ms: config.idle_timeout_ms,
        close_timeout_ms: config.close_timeout_ms,
    }
}

/// How long one full pass of the timeout sweep over the slab takes: short enough that a
/// timeout fires within a fraction of its length.
pub fn sweep_pass_ms(limits: &WsLimits) -> u64 {
    let shortest = limits
        .handshake_timeout_ms
        .min(limits.idle_timeout_ms)
        .min(limits.close_timeout_ms);
    (shortest / 4).clamp(10, 1000)
}

/// What a session may use of its shard while it handles an event.
pub struct Context {
    pub shard_id: usize,
    pub node: Arc<NodeState>,
    /// Messages for other shards (and this one) posted during the turn, and the mailboxes.
    pub post: Post,
    /// The connection's limits (a copy of the configuration's, kept at hand).
    pub ws_limits: WsLimits,
    /// Milliseconds since the shard started, read once per loop turn.
    pub now_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch, read once per loop turn (message times).
    pub unix_ms: u64,
    /// Sessions with output queued this turn.
    pub(super) dirty: Vec<Token>,
    /// Sessions that used their read budget and may have more to read.
    pub(super) read_again: Vec<Token>,
    /// An API request (`POST /api/<op>`) a session just read the head of: the shard hands its
    /// socket to a service connection (shard::service) once the session's read returns.
    pub(super) handover: Option<Box<super::service::HttpHandover>>,
    /// Service connections of this shard serving an API request (at most
    /// `api_requests_per_shard_max`).
    pub(super) api_requests_open: usize,
}

impl Context {
    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.shard_id]
    }

    /// This node's number in its cluster (the node field of its NodeId).
    pub fn node_number(&self) -> u16 {
        self.node.node_id.unpack().number
    }

    /// The address of this shard's session in `slot` of `generation`.
    pub fn session_ref(&self, slot: u32, generation: u32) -> SessionRef {
        SessionRef {
            node: self.node_number(),
            // Fits: a node has at most `SHARDS_MAX` shards (asserted beside `SessionRef`).
            shard: self.shard_id as u16,
            slot,
            generation,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.node.is_draining()
    }

    pub fn render_metrics(&self) -> String {
        self.node.render_metrics(&self.post.office().depths())
    }

    /// The node's shard count.
    pub fn shards(&self) -> usize {
        self.post.shards()
    }

    /// Which partitions this node owns and which shard serves each.
    pub fn partitions(&self) -> &crate::bus::PartitionMap {
        &self.node.partitions
    }

    /// Posts `msg` to the owner of its subject ([`PostOffice::hop`]): a shard here, or in a
    /// cluster the node that owns its partition. Gives it back, with the error to answer,
    /// when no one can take it: its partition does not exist (a forged conversation id:
    /// `not_found`) or its node is down (`unavailable`).
    ///
    /// [`PostOffice::hop`]: crate::bus::post::PostOffice::hop
    pub fn post_to_owner(&mut self, msg: BusMsg) -> Result<(), Unrouted> {
        match self.post.office().hop(&msg) {
            Hop::Shard(shard) => self.post.to(shard, msg),
            Hop::Node(_) => self.post.send_later(To::Named, msg),
            Hop::Down => {
                return Err(Unrouted {
                    msg,
                    code: ErrorCode::Unavailable,
                    text: "the node that owns this is down; try again",
                })
            }
            Hop::Nowhere => {
                return Err(Unrouted {
                    msg,
                    code: ErrorCode::NotFound,
                    text: "no such conversation",
                })
            }
        }
        Ok(())
    }
}

/// A message no shard or node can take, and what to answer.
#[derive(Debug)]
pub struct Unrouted {
    pub msg: BusMsg,
    pub code: ErrorCode,
    pub text: &'static str,
}
