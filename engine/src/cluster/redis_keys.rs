//! What the cluster keeps in Redis: every key's name, every pub/sub message's text, and the Lua
//! scripts that change several keys at once. Nothing here touches a socket, so the layout is
//! tested without a Redis (docs/cluster.md has the same table for operators).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chinwag:cluster` | hash | `partitions` (P), `created_ms`, `layout` (this layout's version) |
//! | `chinwag:partitions` | hash | partition number → `"NODE EPOCH"` (its owner and fencing epoch) |
//! | `chinwag:nodes` | set | every node number that ever registered |
//! | `chinwag:node:N` | hash | node N's `id` (NodeId), `client`, `service`, `link` addresses, `started_ms`, `version` |
//! | `chinwag:node:N:alive` | string, expires | the heartbeat: node N's instance token, `PX` heartbeat TTL |
//! | `chinwag:node:N:routes` | set | `"UID DEVICE"` of every route node N wrote (to clean them up when N is gone) |
//! | `chinwag:node:N:sweep` | string, expires | held by the node cleaning up dead node N's routes |
//! | `chinwag:route:UID` | hash | device id → number of the node holding its session |
//!
//! Pub/sub channels: `chinwag:routes` carries every route change (`"+ NODE UID DEVICE"`,
//! `"- NODE UID DEVICE"`), `chinwag:probe:N` node N's probes to itself.

use std::fmt::Write;

use chinwag_protocol::{DeviceId, Uid};

/// Every key starts with this, so a Redis shared with other programs keeps them apart.
pub const PREFIX: &str = "chinwag:";
/// The cluster's metadata (a hash).
pub const CLUSTER: &str = "chinwag:cluster";
/// The partition → node table (a hash).
pub const PARTITIONS: &str = "chinwag:partitions";
/// The numbers of every node that registered (a set).
pub const NODES: &str = "chinwag:nodes";
/// The channel of route changes.
pub const ROUTES_CHANNEL: &str = "chinwag:routes";
/// What a route key starts with; the uid follows.
pub const ROUTE_PREFIX: &str = "chinwag:route:";
/// The version of this layout, stored in [`CLUSTER`]: a node refuses a cluster of another.
pub const LAYOUT: u32 = 1;

/// The largest node number (12 bits: the NodeId and DeviceId layouts' node field).
pub const NODE_MAX: u16 = (1 << 12) - 1;

/// Node `n`'s registry entry (a hash).
pub fn node(n: u16) -> String {
    format!("chinwag:node:{n}")
}

/// Node `n`'s heartbeat (a string with an expiry).
pub fn alive(n: u16) -> String {
    format!("chinwag:node:{n}:alive")
}

/// The routes node `n` wrote (a set of [`route_member`]s).
pub fn node_routes(n: u16) -> String {
    format!("chinwag:node:{n}:routes")
}

/// The lock of whoever cleans up dead node `n`'s routes.
pub fn sweep_lock(n: u16) -> String {
    format!("chinwag:node:{n}:sweep")
}

/// Node `n`'s probe channel.
pub fn probe_channel(n: u16) -> String {
    format!("chinwag:probe:{n}")
}

/// A user's routes (a hash device → node).
pub fn route(uid: Uid) -> String {
    format!("{ROUTE_PREFIX}{uid}")
}

/// The uid of a route key, if `key` is one.
pub fn route_uid(key: &str) -> Option<Uid> {
    key.strip_prefix(ROUTE_PREFIX)?.parse().ok()
}

/// A member of a node's route set: `"UID DEVICE"`.
pub fn route_member(uid: Uid, device: DeviceId) -> String {
    format!("{uid} {device}")
}

/// A route change as the [`ROUTES_CHANNEL`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteChange {
    /// `true`: the device's session is on `node` now; `false`: it left `node`.
    pub added: bool,
    pub node: u16,
    pub uid: Uid,
    pub device: DeviceId,
}

impl RouteChange {
    /// The message text: `"+ NODE UID DEVICE"` or `"- NODE UID DEVICE"`.
    pub fn to_message(&self) -> String {
        let mut text = String::with_capacity(40);
        let sign = if self.added { '+' } else { '-' };
        let _ = write!(text, "{sign} {} {} {}", self.node, self.uid, self.device);
        text
    }

    /// Parses a message; `None` for anything that is not exactly one (it came from the
    /// network: a bad one is counted and skipped, never trusted).
    pub fn parse(text: &str) -> Option<RouteChange> {
        let mut words = text.split(' ');
        let added = match words.next()? {
            "+" => true,
            "-" => false,
            _ => return None,
        };
        let node: u16 = words.next()?.parse().ok()?;
        let uid: Uid = words.next()?.parse().ok()?;
        let device: DeviceId = words.next()?.parse().ok()?;
        if words.next().is_some() || node == 0 || node > NODE_MAX {
            return None;
        }
        Some(RouteChange {
            added,
            node,
            uid,
            device,
        })
    }
}

/// One partition's owner and epoch as the [`PARTITIONS`] hash holds it: `"NODE EPOCH"`.
pub fn partition_entry(node: u16, epoch: u64) -> String {
    format!("{node} {epoch}")
}

/// Parses a [`partition_entry`].
pub fn parse_partition_entry(text: &str) -> Option<(u16, u64)> {
    let (node, epoch) = text.split_once(' ')?;
    let node: u16 = node.parse().ok()?;
    let epoch: u64 = epoch.parse().ok()?;
    (1..=NODE_MAX).contains(&node).then_some((node, epoch))
}

/// Claims or refreshes a heartbeat. KEYS: the alive key. ARGV: instance token, TTL in ms.
/// Returns 1 when the key was ours and is refreshed, 2 when it was free and is now ours, 0 when
/// another instance holds it.
pub const CLAIM_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
";

/// Gives a heartbeat up if it is ours. KEYS: the alive key. ARGV: instance token.
pub const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Records a route. KEYS: the user's route hash, the node's route set. ARGV: device, node,
/// route member, channel, change message.
pub const ROUTE_ADD_SCRIPT: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Forgets a route, unless another node holds the device now. KEYS and ARGV as
/// [`ROUTE_ADD_SCRIPT`].
pub const ROUTE_DEL_SCRIPT: &str = r"
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
return 0
";

/// Removes up to a batch of a node's routes (those that still name it). KEYS: the node's route
/// set, its alive key. ARGV: the node's number, batch size, channel, route key prefix, `force`
/// (`1`: even while the node is alive — the node cleaning up its own). Returns how many members
/// it took, or -1 when the node is alive and `force` is not set (it came back: its routes are
/// its own again).
pub const SWEEP_SCRIPT: &str = r"
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
for _, member in ipairs(members) do
  local space = string.find(member, ' ', 1, true)
  if space then
    local uid = string.sub(member, 1, space - 1)
    local device = string.sub(member, space + 1)
    local key = ARGV[4] .. uid
    if redis.call('HGET', key, device) == ARGV[1] then
      redis.call('HDEL', key, device)
      redis.call('PUBLISH', ARGV[3], '- ' .. ARGV[1] .. ' ' .. uid .. ' ' .. device)
    end
  end
end
return #members
";

/// Creates the cluster once. KEYS: [`CLUSTER`], [`PARTITIONS`]. ARGV: P, created_ms, layout,
/// then the owner of each partition 0..P. Returns `created`, or the P of the cluster that
/// exists already (nothing is changed then).
pub const INIT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return tostring(redis.call('HGET', KEYS[1], 'partitions'))
end
local count = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'created_ms', ARGV[2], 'layout', ARGV[3])
for p = 0, count - 1 do
  redis.call('HSET', KEYS[2], tostring(p), ARGV[4 + p] .. ' 1')
end
return 'created'
";

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    #[test]
    fn keys_are_named_as_documented() {
        let uid = Uid::new(UidKind::Buyer, 1001);
        assert_eq!(node(3), "chinwag:node:3");
        assert_eq!(alive(3), "chinwag:node:3:alive");
        assert_eq!(node_routes(4095), "chinwag:node:4095:routes");
        assert_eq!(sweep_lock(7), "chinwag:node:7:sweep");
        assert_eq!(probe_channel(2), "chinwag:probe:2");
        assert_eq!(route(uid), "chinwag:route:buyer:1001");
        assert_eq!(route_uid("chinwag:route:buyer:1001"), Some(uid));
        assert_eq!(route_uid("chinwag:route:admin:1"), None);
        assert_eq!(route_uid("chinwag:node:1"), None);
        for key in [CLUSTER, PARTITIONS, NODES, ROUTES_CHANNEL, ROUTE_PREFIX] {
            assert!(key.starts_with(PREFIX), "{key}");
        }
        // The sweep script splits a member at its first space: a uid never has one.
        assert_eq!(
            route_member(uid, DeviceId::from_u64(42).unwrap()),
            "buyer:1001 42"
        );
    }

    #[test]
    fn route_changes_round_trip_and_refuse_anything_else() {
        let change = RouteChange {
            added: true,
            node: 2,
            uid: Uid::new(UidKind::Agent, 7),
            device: DeviceId::from_u64(123_456).unwrap(),
        };
        assert_eq!(change.to_message(), "+ 2 agent:7 123456");
        assert_eq!(RouteChange::parse(&change.to_message()), Some(change));
        let gone = RouteChange {
            added: false,
            ..change
        };
        assert_eq!(gone.to_message(), "- 2 agent:7 123456");
        assert_eq!(RouteChange::parse("- 2 agent:7 123456"), Some(gone));
        for bad in [
            "",
            "+",
            "* 2 agent:7 1",
            "+ 0 agent:7 1",
            "+ 4096 agent:7 1",
            "+ 2 agent 1",
            "+ 2 agent:7 x",
            "+ 2 agent:7 1 extra",
            "+  2 agent:7 1",
            "+ 2 agent:7 18446744073709551615",
        ] {
            assert_eq!(RouteChange::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn partition_entries_hold_a_node_and_an_epoch() {
        assert_eq!(partition_entry(3, 1), "3 1");
        assert_eq!(parse_partition_entry("3 1"), Some((3, 1)));
        assert_eq!(parse_partition_entry("4095 18"), Some((4095, 18)));
        assert_eq!(parse_partition_entry("0 1"), None);
        assert_eq!(parse_partition_entry("4096 1"), None);
        assert_eq!(parse_partition_entry("3"), None);
        assert_eq!(parse_partition_entry("3 -1"), None);
    }
}
