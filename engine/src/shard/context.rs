//! What a session may use of its shard while it handles an event: the shard's id and limits,
//! the node's shared state, the post for other shards, the turn's clocks, and the lists of
//! sessions the turn must come back to.

use std::sync::Arc;

use mio::Token;

use crate::bus::post::Post;
use crate::net::ws::connection::WsLimits;
use crate::operator::metrics::ShardMetrics;
use crate::operator::NodeState;

/// The limits a session checks, copied out of the config for quick access.
#[derive(Clone, Debug)]
pub struct Limits {
    /// What the WebSocket connection enforces.
    pub ws: WsLimits,
    pub send_queue_bytes_max: usize,
    pub connections_per_shard_max: usize,
}

impl Limits {
    /// How long one full pass of the timeout sweep over the slab takes: short enough that a
    /// timeout fires within a fraction of its length.
    pub(super) fn sweep_pass_ms(&self) -> u64 {
        let shortest = self
            .ws
            .handshake_timeout_ms
            .min(self.ws.idle_timeout_ms)
            .min(self.ws.close_timeout_ms);
        (shortest / 4).clamp(10, 1000)
    }
}

/// What a session may use of its shard while it handles an event.
pub struct Context {
    pub shard_id: usize,
    pub node: Arc<NodeState>,
    /// Messages for other shards (and this one) posted during the turn, and the mailboxes.
    pub post: Post,
    pub limits: Limits,
    /// Milliseconds since the shard started, read once per loop turn.
    pub now_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch, read once per loop turn (message times).
    pub unix_ms: u64,
    /// Sessions with output queued this turn.
    pub(super) dirty: Vec<Token>,
    /// Sessions that used their read budget and may have more to read.
    pub(super) read_again: Vec<Token>,
}

impl Context {
    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.shard_id]
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
}
