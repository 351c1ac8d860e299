//! What the cluster keeps in Redis: every key's name, every pub/sub message's text, and the Lua
//! scripts that change several keys at once. Nothing here touches a socket, so the layout is
//! tested without a Redis (docs/cluster.md has the same table for operators).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chinwag:cluster` | hash | `partitions` (P), `created_ms`, `layout` (this layout's version) |
//! | `chinwag:cluster` | | also `replicas` (R, from `init`; layout 2) |
//! | `chinwag:partitions` | hash | partition number → `"LEADER EPOCH REPLICAS"`: its leader, fencing epoch and replica set (comma-separated, placement order, the leader among them); `"NODE EPOCH"` (layout 1, or R = 1) is one replica |
//! | `chinwag:isr` | hash | partition number → `"EPOCH NODES"`: the in-sync replicas (comma-separated) recorded at that epoch |
//! | `chinwag:lease:P` | string, expires | partition P's leadership lease: `"NODE EPOCH"` of its holder, `PX` the lease length; `"NODE EPOCH handoff"`: granted to NODE by the leader that handed it over, until NODE renews it |
//! | `chinwag:targets` | hash | partition number → the replica set it is moving to ([`node_list`], placement order), while a move is under way (`chinwag cluster add-node` / `retire-node`) |
//! | `chinwag:retired` | set | nodes `retire-node` retired: no plan gives them replicas until `add-node` names them |
//! | `chinwag:node:N:lag` | hash, expires | partition number → node N's view, as its leader, of each follower: `"NODE ACKED BEHIND CAUGHT_UP_MS"` per follower, `;`-separated |
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

use super::roles::{ReplicaLag, Replicas};

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
/// The in-sync sets (a hash partition → [`IsrRecord`]).
pub const ISR: &str = "chinwag:isr";
/// What a lease key starts with; the partition number follows.
pub const LEASE_PREFIX: &str = "chinwag:lease:";
/// The replica sets partitions are moving to (a hash partition → [`node_list`]).
pub const TARGETS: &str = "chinwag:targets";
/// The nodes `chinwag cluster retire-node` retired (a set): no plan gives them replicas
/// again until `add-node` names them.
pub const RETIRED: &str = "chinwag:retired";
/// What a lease granted by a handover holds after its `"NODE EPOCH"`.
pub const HANDOFF_SUFFIX: &str = " handoff";
/// The version of this layout, stored in [`CLUSTER`]: a node refuses a cluster of another.
/// Layout 2 added replica sets, in-sync sets and leases; a layout 1 table (`"NODE EPOCH"`
/// entries, no in-sync sets) reads as one replica per partition.
pub const LAYOUT: u32 = 2;
/// The layouts this build reads.
pub const LAYOUTS_READ: std::ops::RangeInclusive<u32> = 1..=LAYOUT;
/// The most replicas a partition may have.
pub const REPLICAS_MAX: usize = 8;

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

/// Partition `p`'s leadership lease (a string with an expiry).
pub fn lease(p: u32) -> String {
    format!("{LEASE_PREFIX}{p}")
}

/// Node `n`'s replica lag, as the leader of its partitions sees its followers (a hash with an
/// expiry: a node that stops publishing leaves nothing stale behind).
pub fn lag(n: u16) -> String {
    format!("chinwag:node:{n}:lag")
}

/// The holder of a lease as its value names it: `"NODE EPOCH"`, or a handover's grant
/// `"NODE EPOCH handoff"` (the node it was handed to, which has not renewed it yet).
pub fn parse_lease_holder(text: &str) -> Option<(u16, u64)> {
    parse_partition_entry(text.strip_suffix(HANDOFF_SUFFIX).unwrap_or(text))
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

/// Parses a [`partition_entry`] (or the leader and epoch of a [`PartitionRecord`]).
pub fn parse_partition_entry(text: &str) -> Option<(u16, u64)> {
    PartitionRecord::parse(text).map(|r| (r.leader, r.epoch))
}

/// A list of node numbers as the keys hold it: `1,2,3`.
pub fn node_list(nodes: &[u16]) -> String {
    let mut text = String::with_capacity(nodes.len() * 5);
    for (i, node) in nodes.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(text, "{node}");
    }
    text
}

/// Parses a [`node_list`]: 1 to [`REPLICAS_MAX`] distinct numbers 1..=[`NODE_MAX`].
pub fn parse_node_list(text: &str) -> Option<Replicas> {
    let mut nodes = Replicas::new();
    for word in text.split(',') {
        let node: u16 = word.parse().ok()?;
        if !(1..=NODE_MAX).contains(&node) || nodes.contains(&node) {
            return None;
        }
        nodes.push(node);
    }
    (nodes.len() <= REPLICAS_MAX).then_some(nodes)
}

/// A partition's entry in [`PARTITIONS`]: its leader, its fencing epoch and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRecord {
    pub leader: u16,
    pub epoch: u64,
    /// Every replica, in placement order (the first is the preferred leader); the leader is
    /// one of them.
    pub replicas: Replicas,
}

impl PartitionRecord {
    /// The entry's text: `"LEADER EPOCH R1,R2"`, or `"LEADER EPOCH"` for one replica (what a
    /// layout 1 table holds).
    pub fn to_entry(&self) -> String {
        if self.replicas.as_slice() == [self.leader] {
            return partition_entry(self.leader, self.epoch);
        }
        format!(
            "{} {} {}",
            self.leader,
            self.epoch,
            node_list(&self.replicas)
        )
    }

    /// Parses an entry; `None` for anything else (a leader that is not a replica included).
    pub fn parse(text: &str) -> Option<PartitionRecord> {
        let mut words = text.split(' ');
        let leader: u16 = words.next()?.parse().ok()?;
        let epoch: u64 = words.next()?.parse().ok()?;
        let replicas = match words.next() {
            Some(list) => parse_node_list(list)?,
            None => Replicas::from_slice(&[leader]),
        };
        let valid = words.next().is_none()
            && (1..=NODE_MAX).contains(&leader)
            && replicas.contains(&leader);
        valid.then_some(PartitionRecord {
            leader,
            epoch,
            replicas,
        })
    }

    /// The replicas, leader first (as [`super::roles::RoleChange::Lead`] lists them).
    pub fn leader_first(&self) -> Replicas {
        let mut list = Replicas::from_slice(&[self.leader]);
        list.extend(self.replicas.iter().copied().filter(|&n| n != self.leader));
        list
    }
}

/// A partition's in-sync set in [`ISR`]: `"EPOCH N1,N2"`, recorded at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrRecord {
    pub epoch: u64,
    pub isr: Replicas,
}

impl IsrRecord {
    pub fn to_entry(&self) -> String {
        format!("{} {}", self.epoch, node_list(&self.isr))
    }

    pub fn parse(text: &str) -> Option<IsrRecord> {
        let (epoch, list) = text.split_once(' ')?;
        Some(IsrRecord {
            epoch: epoch.parse().ok()?,
            isr: parse_node_list(list)?,
        })
    }
}

/// A partition's followers as its leader publishes them in [`lag`]:
/// `"NODE ACKED BEHIND CAUGHT_UP_MS"` per follower, `;`-separated.
pub fn lag_entry(followers: &[ReplicaLag]) -> String {
    let mut text = String::with_capacity(followers.len() * 40);
    for (i, f) in followers.iter().enumerate() {
        if i > 0 {
            text.push(';');
        }
        let _ = write!(
            text,
            "{} {} {} {}",
            f.node, f.acked, f.behind_bytes, f.caught_up_ms
        );
    }
    text
}

/// Parses a [`lag_entry`]; `None` if any part is malformed.
pub fn parse_lag_entry(text: &str) -> Option<Vec<ReplicaLag>> {
    text.split(';')
        .map(|part| {
            let mut words = part.split(' ');
            let lag = ReplicaLag {
                node: words.next()?.parse().ok()?,
                acked: words.next()?.parse().ok()?,
                behind_bytes: words.next()?.parse().ok()?,
                caught_up_ms: words.next()?.parse().ok()?,
            };
            (words.next().is_none() && (1..=NODE_MAX).contains(&lag.node)).then_some(lag)
        })
        .collect()
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

/// Lua functions the partition scripts share (prepended to each: EVAL sends one text).
/// `parse_entry` reads a [`PartitionRecord`] entry (leader and replicas as strings, the epoch
/// as a number; `nil` for a missing or malformed entry), `has` finds a node in a list,
/// `without` removes one from it.
macro_rules! lua_prelude {
    () => {
        r"
local function parse_entry(text)
  if not text then return nil end
  local leader, epoch, replicas = string.match(text, '^(%d+) (%d+) ?([%d,]*)$')
  if not leader then return nil end
  if replicas == '' then replicas = leader end
  return leader, tonumber(epoch), replicas
end
local function has(list, node)
  return string.find(',' .. list .. ',', ',' .. node .. ',', 1, true) ~= nil
end
local function without(list, node)
  local out = {}
  for n in string.gmatch(list, '[^,]+') do
    if n ~= node then out[#out + 1] = n end
  end
  return table.concat(out, ',')
end
"
    };
}

/// Creates the cluster once. KEYS: [`CLUSTER`], [`PARTITIONS`], [`ISR`]. ARGV: P, created_ms,
/// layout, R, then the [`PartitionRecord`] entry of each partition 0..P, then the
/// [`IsrRecord`] entry of each. Returns `created`, or the P of the cluster that exists already
/// (nothing is changed then).
pub const INIT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return tostring(redis.call('HGET', KEYS[1], 'partitions'))
end
local count = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'created_ms', ARGV[2], 'layout', ARGV[3],
  'replicas', ARGV[4])
for p = 0, count - 1 do
  redis.call('HSET', KEYS[2], tostring(p), ARGV[5 + p])
  redis.call('HSET', KEYS[3], tostring(p), ARGV[5 + count + p])
end
return 'created'
";

/// Renews (or takes again, if it lapsed) the leases of the partitions the table names this
/// node the leader of, at the epoch it names. KEYS: [`PARTITIONS`], [`ISR`], then each
/// partition's [`lease`] key. ARGV: node, lease length in ms, then per lease key its
/// partition, the epoch this node leads it at, and `1` if this process does not hold that
/// lease yet (`0` if it does). Returns per partition 1 (held for the lease length from now),
/// 0 (lost: the table names another leader or epoch, or another node holds the lease), or 2:
/// the lease was held by this node's number at this epoch but not by this process — an
/// earlier run of the node, which may have died in the middle of anything — and the in-sync
/// set names another replica: the lease is deleted, so that an in-sync follower takes over at
/// once rather than this process lead on from a log it has just recovered. A lease granted to
/// this node by a handover (`"NODE EPOCH handoff"`, see [`SHRINK_SCRIPT`]) counts as free for
/// it: it becomes `"NODE EPOCH"`.
pub const RENEW_SCRIPT: &str = concat!(
    lua_prelude!(),
    r"
local node, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 3, #KEYS do
  local p, epoch, fresh = ARGV[3 * i - 6], ARGV[3 * i - 5], ARGV[3 * i - 4]
  local mine = node .. ' ' .. epoch
  local holder = redis.call('GET', KEYS[i])
  if holder == mine .. ' handoff' then holder = nil end
  local leader, current = parse_entry(redis.call('HGET', KEYS[1], p))
  local held = 0
  if leader == node and current == tonumber(epoch) and (holder == mine or not holder) then
    local others = false
    if holder == mine and fresh == '1' then
      local isr = redis.call('HGET', KEYS[2], p)
      local isr_epoch, isr_list
      if isr then isr_epoch, isr_list = string.match(isr, '^(%d+) ([%d,]+)$') end
      others = isr_epoch and tonumber(isr_epoch) == current and without(isr_list, node) ~= ''
    end
    if others then
      redis.call('DEL', KEYS[i])
      held = 2
    else
      redis.call('SET', KEYS[i], mine, 'PX', ttl)
      held = 1
    end
  end
  out[#out + 1] = held
end
return out
"
);

/// Takes the leadership of partitions whose lease lapsed, one by one. KEYS: [`PARTITIONS`],
/// [`ISR`], then each partition's [`lease`] key. ARGV: node, lease length in ms, then each
/// lease key's partition. A partition is taken only if its lease is free, the taker is a
/// replica other than the leader and in the in-sync set recorded at the current epoch; then
/// the lease, the entry (the taker leads at epoch + 1, the replicas unchanged) and the in-sync
/// set (at epoch + 1, without the old leader, which must catch up to rejoin) are written
/// together. Returns per partition the new epoch, or 0 (not taken).
pub const TAKE_SCRIPT: &str = concat!(
    lua_prelude!(),
    r"
local node, ttl = ARGV[1], ARGV[2]
local out = {}
for i = 3, #KEYS do
  local p = ARGV[i]
  local taken = 0
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local leader, epoch, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
    local isr = redis.call('HGET', KEYS[2], p)
    local isr_epoch, isr_list
    if isr then isr_epoch, isr_list = string.match(isr, '^(%d+) ([%d,]+)$') end
    if leader and leader ~= node and has(replicas, node) and isr_epoch
        and tonumber(isr_epoch) == epoch and has(isr_list, node) then
      local next = string.format('%d', epoch + 1)
      redis.call('SET', KEYS[i], node .. ' ' .. next, 'PX', ttl)
      redis.call('HSET', KEYS[1], p, node .. ' ' .. next .. ' ' .. replicas)
      redis.call('HSET', KEYS[2], p, next .. ' ' .. without(isr_list, leader))
      taken = epoch + 1
    end
  end
  out[#out + 1] = taken
end
return out
"
);

/// Records a leader's new in-sync set, fenced by its epoch. KEYS: [`PARTITIONS`], [`ISR`].
/// ARGV: partition, epoch, node (the asking leader), the set as a [`node_list`]. Returns 1
/// (written), 0 (refused: the table names another leader or epoch), -1 (refused: the set
/// lacks the leader or names a node that is not a replica).
pub const ISR_SCRIPT: &str = concat!(
    lua_prelude!(),
    r"
local leader, epoch, replicas = parse_entry(redis.call('HGET', KEYS[1], ARGV[1]))
if not leader or leader ~= ARGV[3] or epoch ~= tonumber(ARGV[2]) then return 0 end
if not has(ARGV[4], leader) then return -1 end
for n in string.gmatch(ARGV[4], '[^,]+') do
  if not has(replicas, n) then return -1 end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[4])
return 1
"
);

/// Lua helpers of the move scripts (after [`lua_prelude`]): `isr_of` reads a partition's
/// in-sync list if it was recorded at `epoch` (else the leader alone), `all_in` says whether
/// every node of one list is in another, `union` appends to a list the nodes of another it
/// lacks, `keep` keeps the nodes of a list that are in another (in the other's order).
macro_rules! lua_moves {
    () => {
        r"
local function isr_of(text, epoch, leader)
  local isr_epoch, isr_list
  if text then isr_epoch, isr_list = string.match(text, '^(%d+) ([%d,]+)$') end
  if isr_epoch and tonumber(isr_epoch) == epoch then return isr_list end
  return leader
end
local function all_in(list, other)
  for n in string.gmatch(list, '[^,]+') do
    if not has(other, n) then return false end
  end
  return true
end
local function union(list, other)
  local out = list
  for n in string.gmatch(other, '[^,]+') do
    if not has(out, n) then out = out .. ',' .. n end
  end
  return out
end
local function keep(list, order)
  local out = {}
  for n in string.gmatch(order, '[^,]+') do
    if has(list, n) then out[#out + 1] = n end
  end
  return table.concat(out, ',')
end
"
    };
}

/// Records the replica sets partitions move to (`chinwag cluster add-node` / `retire-node`),
/// all or nothing. KEYS: [`PARTITIONS`], [`TARGETS`]. ARGV: triples of partition, the
/// replica set the plan was made from (its target if it had one, else its replicas), and the
/// new target. Nothing is written, and -1 returned, if any partition's set is no longer the
/// one the plan was made from (another command ran meanwhile: plan again). A target equal to
/// the replicas removes the target. Returns how many partitions changed.
pub const SET_TARGETS_SCRIPT: &str = concat!(
    lua_prelude!(),
    r"
for i = 1, #ARGV, 3 do
  local p = ARGV[i]
  local leader, epoch, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
  if not leader then return -1 end
  local current = redis.call('HGET', KEYS[2], p) or replicas
  if current ~= ARGV[i + 1] then return -1 end
end
local changed = 0
for i = 1, #ARGV, 3 do
  local p, from, to = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local leader, epoch, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
  if to ~= from then changed = changed + 1 end
  if to == replicas then
    redis.call('HDEL', KEYS[2], p)
  else
    redis.call('HSET', KEYS[2], p, to)
  end
end
return changed
"
);

/// A move's first step, run by the partition's leader: the replicas the target adds join the
/// replica set (out of the in-sync set: they copy the log from the leader and are asked into
/// the set once caught up), at epoch + 1, so that every replica hears of the new set. KEYS:
/// [`PARTITIONS`], [`ISR`], [`TARGETS`], the partition's [`lease`]. ARGV: partition, node (the
/// leader), its epoch, the target it saw, lease length in ms. Refused (0) unless the node
/// leads at that epoch, holds the lease and the target is still that one; else returns the
/// new epoch. The replica set becomes the target's nodes in its order, then the ones leaving.
pub const GROW_SCRIPT: &str = concat!(
    lua_prelude!(),
    lua_moves!(),
    r"
local p, node, epoch, target, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local leader, current, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
if leader ~= node or current ~= epoch then return 0 end
if redis.call('HGET', KEYS[3], p) ~= target then return 0 end
if redis.call('GET', KEYS[4]) ~= node .. ' ' .. ARGV[3] then return 0 end
if all_in(target, replicas) then return 0 end
local isr = isr_of(redis.call('HGET', KEYS[2], p), epoch, leader)
local next = string.format('%d', epoch + 1)
redis.call('HSET', KEYS[1], p, node .. ' ' .. next .. ' ' .. union(target, replicas))
redis.call('HSET', KEYS[2], p, next .. ' ' .. isr)
redis.call('SET', KEYS[4], node .. ' ' .. next, 'PX', ttl)
return epoch + 1
"
);

/// A move's second step, run by the partition's leader once every node of the target is in
/// the in-sync set: the replica set becomes the target, at epoch + 1, and the target is
/// removed. A leader that is not in the target hands the leadership over in the same step to
/// the target's first node that is in sync and alive (its heartbeat key exists): the lease is
/// granted to it (`"NODE EPOCH handoff"`, for one lease length, so that no other follower
/// takes over meanwhile; it becomes its own at its next renewal). KEYS: [`PARTITIONS`],
/// [`ISR`], [`TARGETS`], the partition's [`lease`], then the heartbeat key of each node of
/// the target, in its order. ARGV: partition, node, its epoch, the target it saw, lease
/// length in ms. Returns `{new epoch, new leader}`, or `{0, 0}` (refused: not the leader at
/// that epoch holding the lease, another target, a target node out of sync, or no successor
/// alive).
pub const SHRINK_SCRIPT: &str = concat!(
    lua_prelude!(),
    lua_moves!(),
    r"
local p, node, epoch, target, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local leader, current, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
if leader ~= node or current ~= epoch then return {0, 0} end
if redis.call('HGET', KEYS[3], p) ~= target then return {0, 0} end
if redis.call('GET', KEYS[4]) ~= node .. ' ' .. ARGV[3] then return {0, 0} end
local isr = isr_of(redis.call('HGET', KEYS[2], p), epoch, leader)
if not all_in(target, replicas) or not all_in(target, isr) then return {0, 0} end
local successor = nil
if has(target, node) then
  successor = node
else
  local i = 5
  for n in string.gmatch(target, '[^,]+') do
    if not successor and redis.call('EXISTS', KEYS[i]) == 1 then successor = n end
    i = i + 1
  end
end
if not successor then return {0, 0} end
local next = string.format('%d', epoch + 1)
redis.call('HSET', KEYS[1], p, successor .. ' ' .. next .. ' ' .. target)
redis.call('HSET', KEYS[2], p, next .. ' ' .. keep(isr, target))
redis.call('HDEL', KEYS[3], p)
if successor == node then
  redis.call('SET', KEYS[4], node .. ' ' .. next, 'PX', ttl)
else
  redis.call('SET', KEYS[4], successor .. ' ' .. next .. ' handoff', 'PX', ttl)
end
return {epoch + 1, tonumber(successor)}
"
);

/// Hands the leadership of a partition to its preferred replica (the first of its replica
/// set) when that one is in sync and alive and another leads. KEYS: [`PARTITIONS`], [`ISR`],
/// [`TARGETS`], the partition's [`lease`], the successor's heartbeat key. ARGV: partition,
/// node (the leader), its epoch, the successor, lease length in ms. Refused (0) unless the
/// node leads at that epoch and holds the lease, no move is under way, and the successor is
/// the first replica, in sync and alive; else the new epoch: the successor leads, the
/// in-sync set is unchanged (the old leader has every acknowledged record), and the lease is
/// granted to the successor as in [`SHRINK_SCRIPT`].
pub const HANDOFF_SCRIPT: &str = concat!(
    lua_prelude!(),
    lua_moves!(),
    r"
local p, node, epoch, successor, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local leader, current, replicas = parse_entry(redis.call('HGET', KEYS[1], p))
if leader ~= node or current ~= epoch or successor == node then return 0 end
if redis.call('HEXISTS', KEYS[3], p) == 1 then return 0 end
if redis.call('GET', KEYS[4]) ~= node .. ' ' .. ARGV[3] then return 0 end
if string.match(replicas, '^(%d+)') ~= successor then return 0 end
local isr = isr_of(redis.call('HGET', KEYS[2], p), epoch, leader)
if not has(isr, successor) or redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
local next = string.format('%d', epoch + 1)
redis.call('HSET', KEYS[1], p, successor .. ' ' .. next .. ' ' .. replicas)
redis.call('HSET', KEYS[2], p, next .. ' ' .. isr)
redis.call('SET', KEYS[4], successor .. ' ' .. next .. ' handoff', 'PX', ttl)
return epoch + 1
"
);

/// Gives leases up (a draining leader, so that a follower takes over at once). KEYS: the
/// lease keys. ARGV: per key the holder value this node wrote (`"NODE EPOCH"`). Deletes each
/// that still holds it; returns how many.
pub const RELEASE_LEASES_SCRIPT: &str = r"
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    released = released + redis.call('DEL', KEYS[i])
  end
end
return released
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
    fn partition_records_hold_a_leader_an_epoch_and_the_replicas() {
        let record = PartitionRecord::parse("2 7 1,2,3").unwrap();
        assert_eq!((record.leader, record.epoch), (2, 7));
        assert_eq!(record.replicas.as_slice(), [1, 2, 3]);
        assert_eq!(record.leader_first().as_slice(), [2, 1, 3]);
        assert_eq!(record.to_entry(), "2 7 1,2,3");
        // One replica: the layout 1 form, both ways.
        let single = PartitionRecord::parse("3 1").unwrap();
        assert_eq!(single.replicas.as_slice(), [3]);
        assert_eq!(single.to_entry(), "3 1");
        for bad in [
            "2 7 1,3", // the leader is not a replica
            "2 7 2,2", // twice the same node
            "2 7 2,0", // no node 0
            "2 7 2,",  // an empty name
            "2 7 2 x", // a fourth word
            "2 7 1,2,3,4,5,6,7,8,9",
        ] {
            assert_eq!(PartitionRecord::parse(bad), None, "{bad:?}");
        }
        let isr = IsrRecord::parse("4 1,3").unwrap();
        assert_eq!((isr.epoch, isr.isr.as_slice()), (4, &[1, 3][..]));
        assert_eq!(isr.to_entry(), "4 1,3");
        assert_eq!(IsrRecord::parse("4"), None);
        assert_eq!(IsrRecord::parse("x 1"), None);
        assert_eq!(lease(17), "chinwag:lease:17");
        assert_eq!(lag(3), "chinwag:node:3:lag");
        assert_eq!(parse_lease_holder("2 7"), Some((2, 7)));
        assert_eq!(parse_lease_holder("2 7 handoff"), Some((2, 7)));
        assert_eq!(parse_lease_holder("2 7 other"), None);
    }

    #[test]
    fn lag_entries_round_trip() {
        let followers = [
            ReplicaLag {
                node: 2,
                acked: 4096,
                behind_bytes: 0,
                caught_up_ms: 1_796_000_000_000,
            },
            ReplicaLag {
                node: 4,
                acked: 0,
                behind_bytes: 4096,
                caught_up_ms: 1_795_999_999_000,
            },
        ];
        let text = lag_entry(&followers);
        assert_eq!(text, "2 4096 0 1796000000000;4 0 4096 1795999999000");
        assert_eq!(parse_lag_entry(&text).unwrap(), followers);
        for bad in ["", "2 1 2", "2 1 2 3 4", "0 1 2 3", "2 1 2 3;", "x 1 2 3"] {
            assert_eq!(parse_lag_entry(bad), None, "{bad:?}");
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
