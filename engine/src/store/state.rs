//! The state that replaying the log rebuilds: conversations (with their seqs and read index),
//! devices, read cursors, profiles and the cmid windows.
//!
//! The reception statistics of the shops (`reception`) are part of it, so they are rebuilt by
//! replay like everything else.
//!
//! Every change goes through [`State::check`] and then [`State::apply`]. The live path checks
//! before it writes the record, so a record in the log is always one that applies; replay runs
//! the same two steps, so a record that does not apply is corruption, never a panic.

pub(super) mod reception;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use ahash::AHashMap;
use chinwag_protocol::limits::{PROFILE_AVATAR_LEN_MAX, PROFILE_NAME_LEN_MAX};
use chinwag_protocol::UidKind;
use chinwag_protocol::{ConvId, DeviceId, DeviceType, Profile, Seq, ShopId, Subject, Uid};
use smallvec::SmallVec;

use super::cmid_table::CmidTable;
use super::error::Position;
use super::record::{ConvKind, MessageRef, Record};
use reception::Reception;

/// One conversation as the owner keeps it.
#[derive(Debug)]
pub struct Conversation {
    /// Shop, direct or group.
    pub(super) kind: ConvKind,
    /// The shop id of a shop conversation, the service's key of a group, 0 for direct.
    pub(super) key: u64,
    /// Current members (for a shop conversation: the buyer and the assigned agents).
    pub(super) members: SmallVec<[Uid; 2]>,
    /// Read cursors, one per user who has read anything.
    pub(super) cursors: SmallVec<[(Uid, Seq); 2]>,
    /// The last seq stored.
    pub(super) seq: u64,
    /// Position of the newest message (0: none).
    pub(super) last_pos: Position,
    /// `index[i]` is the position of seq `(i + 1) * stride` (0: not in the log).
    pub(super) index: Vec<Position>,
}

impl Conversation {
    /// Shop, direct or group.
    pub fn kind(&self) -> ConvKind {
        self.kind
    }

    /// The shop, for a shop conversation.
    pub fn shop(&self) -> Option<ShopId> {
        (self.kind == ConvKind::Shop).then_some(ShopId(self.key))
    }

    /// The key the service created a group with.
    pub fn group_key(&self) -> Option<u64> {
        (self.kind == ConvKind::Group).then_some(self.key)
    }

    /// Current members.
    pub fn members(&self) -> &[Uid] {
        &self.members
    }

    /// The last seq stored (including appends not yet committed).
    pub fn last_seq(&self) -> Seq {
        Seq(self.seq)
    }

    /// The user's read cursor (0 if none).
    pub fn cursor(&self, uid: Uid) -> Seq {
        self.cursors
            .iter()
            .find(|(u, _)| *u == uid)
            .map_or(Seq(0), |&(_, s)| s)
    }

    /// Whether `m` is this conversation's next message.
    fn check_message(&self, m: &MessageRef<'_>, allow_gap: bool) -> Result<(), &'static str> {
        let next = self.seq + 1;
        if m.seq.0 != next && !(allow_gap && m.seq.0 > next) {
            return Err("message seq does not follow the conversation's last");
        }
        if m.prev != self.last_pos && !allow_gap {
            return Err("message does not chain to its conversation's last");
        }
        Ok(())
    }

    fn set_cursor(&mut self, uid: Uid, seq: Seq) {
        match self.cursors.iter_mut().find(|(u, _)| *u == uid) {
            Some((_, s)) => *s = (*s).max(seq),
            None => self.cursors.push((uid, seq)),
        }
    }
}

/// A profile as the log holds it: the newest version of its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProfile {
    /// Orders the versions of one subject; set by the subject's owner when a service sets it.
    pub version: u64,
    /// The fields, shared with the pushes and sessions that carry them.
    pub profile: Arc<Profile>,
}

/// The idempotency window: recent (sender, conversation, cmid) triples and where their message
/// is.
///
/// Entries are keyed by a 64-bit hash of the pair and hold only the message's position; the
/// store confirms a hit by reading that record's sender and cmid, so a hash collision can never
/// turn a new message into a duplicate. No allocation per message, ~50 bytes per entry.
#[derive(Debug)]
pub struct CmidWindow {
    pub(super) by_key: CmidTable,
    /// Oldest first: (ts, key, position).
    pub(super) order: VecDeque<(u64, u64, Position)>,
    /// During replay only `order` is kept up to date (see [`State::defer_cmid_index`]).
    pub(super) deferred: bool,
    /// Entries added and evicted (by age or this window's own limit) since
    /// [`State::take_cmid_churn`]: what the shard's budget across partitions keeps count of.
    pub(super) added: u64,
    pub(super) evicted: u64,
}

/// The window's key of a sender's cmid in a conversation. A fixed function (not a seeded
/// hasher), because keys are saved in snapshots and must mean the same after a restart.
pub fn cmid_key(sender: Uid, conv: ConvId, cmid: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (sender.id ^ (sender.kind as u64) << 56).wrapping_mul(K);
    h = (h ^ conv.0).wrapping_mul(K).rotate_left(29) ^ cmid.len() as u64;
    for chunk in cmid.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    // Final avalanche (the finalizer of MurmurHash3).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ h >> 33
}

/// Entries a new window's table holds before it first grows.
const CMID_TABLE_FIRST: usize = 64;

/// Limits the state enforces, taken from the store's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub index_stride: u64,
    pub members_max: usize,
    pub cmid_window_age_ms: u64,
    pub cmid_window_entries_max: usize,
}

/// Everything replay rebuilds.
#[derive(Debug)]
pub struct State {
    pub(super) limits: Limits,
    pub(super) convs: AHashMap<ConvId, Conversation>,
    pub(super) shop_convs: AHashMap<(ShopId, Uid), ConvId>,
    pub(super) direct_convs: AHashMap<(Uid, Uid), ConvId>,
    /// Groups by the key the service created them with.
    pub(super) group_convs: AHashMap<u64, ConvId>,
    pub(super) user_convs: AHashMap<Uid, SmallVec<[ConvId; 4]>>,
    pub(super) devices: AHashMap<(Uid, DeviceType), DeviceId>,
    pub(super) device_max: Option<DeviceId>,
    pub(super) conv_max: Option<ConvId>,
    pub(super) cmids: CmidWindow,
    /// Chain links that point at a record the operator skipped (`skip_corrupt`), mapped to
    /// the conversation's previous message that is still readable.
    pub(super) chain_repairs: AHashMap<Position, Position>,
    /// Profiles: of users, conversations and shops this shard owns, and copies of the
    /// profiles of users who wrote in its conversations.
    pub(super) profiles: AHashMap<Subject, StoredProfile>,
    /// What the agents of the shops did, for `agent_stats`.
    pub(super) reception: Reception,
}

/// The unordered pair key of a direct conversation.
pub fn pair(a: Uid, b: Uid) -> (Uid, Uid) {
    (a.min(b), a.max(b))
}

impl State {
    /// Empty state. Fails only if the memory for the cmid window cannot be mapped.
    pub fn new(limits: Limits) -> io::Result<State> {
        Ok(State {
            limits,
            convs: AHashMap::new(),
            shop_convs: AHashMap::new(),
            direct_convs: AHashMap::new(),
            group_convs: AHashMap::new(),
            user_convs: AHashMap::new(),
            devices: AHashMap::new(),
            device_max: None,
            conv_max: None,
            // Small at first: the window grows as cmids come, within the shard's budget.
            cmids: CmidWindow {
                by_key: CmidTable::with_capacity(
                    CMID_TABLE_FIRST.min(limits.cmid_window_entries_max),
                )?,
                order: VecDeque::new(),
                deferred: false,
                added: 0,
                evicted: 0,
            },
            chain_repairs: AHashMap::new(),
            profiles: AHashMap::new(),
            reception: Reception::default(),
        })
    }

    /// Cmids remembered.
    pub fn cmid_count(&self) -> usize {
        self.cmids.order.len()
    }

    /// The times of the cmids remembered, oldest first.
    pub fn cmid_times(&self) -> impl Iterator<Item = u64> + '_ {
        self.cmids.order.iter().map(|&(ts, _, _)| ts)
    }

    /// Cmids added and evicted by the window itself since the last call.
    pub fn take_cmid_churn(&mut self) -> (u64, u64) {
        let window = &mut self.cmids;
        (
            std::mem::take(&mut window.added),
            std::mem::take(&mut window.evicted),
        )
    }

    /// Forgets the oldest cmid (the shard's budget needs room); false if there is none.
    pub fn evict_oldest_cmid(&mut self) -> bool {
        let window = &mut self.cmids;
        let Some((_, key, at)) = window.order.pop_front() else {
            return false;
        };
        if !window.deferred {
            window.by_key.remove_if(key, at);
        }
        true
    }

    /// Where the message is that this sender probably sent with this cmid (the caller
    /// confirms by reading it).
    pub fn cmid_position(&self, sender: Uid, conv: ConvId, cmid: &[u8]) -> Option<Position> {
        self.cmids.by_key.get(cmid_key(sender, conv, cmid))
    }

    /// Whether `record` may be applied now. `allow_gap` admits a message seq beyond the next
    /// one (only when the operator skipped corrupt records).
    pub fn check(&self, record: &Record<'_>, allow_gap: bool) -> Result<(), &'static str> {
        match record {
            Record::Message(m) => self
                .convs
                .get(&m.conv)
                .ok_or("message in unknown conversation")?
                .check_message(m, allow_gap),
            Record::Device {
                uid, device_type, ..
            } => {
                if self.devices.contains_key(&(*uid, *device_type)) {
                    return Err("device registered twice");
                }
                Ok(())
            }
            Record::Conv {
                conv,
                kind,
                key,
                members,
            } => {
                if self.convs.contains_key(conv) {
                    return Err("conversation created twice");
                }
                if members.len() > self.limits.members_max {
                    return Err("too many members");
                }
                match kind {
                    ConvKind::Shop => {
                        let [buyer] = members.as_slice() else {
                            return Err("a shop conversation has one buyer");
                        };
                        if self.shop_convs.contains_key(&(ShopId(*key), *buyer)) {
                            return Err("shop and buyer have a conversation already");
                        }
                    }
                    ConvKind::Direct => {
                        let [a, b] = members.as_slice() else {
                            return Err("a direct conversation has two members");
                        };
                        if a == b || self.direct_convs.contains_key(&pair(*a, *b)) {
                            return Err("the pair has a direct conversation already");
                        }
                    }
                    ConvKind::Group => {
                        if self.group_convs.contains_key(key) {
                            return Err("a group with this key exists already");
                        }
                        let mut sorted = members.clone();
                        sorted.sort_unstable();
                        sorted.dedup();
                        if sorted.len() != members.len() {
                            return Err("a member is listed twice");
                        }
                    }
                }
                Ok(())
            }
            Record::Member {
                conv, uid, added, ..
            } => {
                let conv = self
                    .convs
                    .get(conv)
                    .ok_or("member of unknown conversation")?;
                let is_member = conv.members.contains(uid);
                if *added && is_member {
                    return Err("member added twice");
                }
                if *added && conv.members.len() >= self.limits.members_max {
                    return Err("too many members");
                }
                if !*added && !is_member {
                    return Err("removed user is not a member");
                }
                Ok(())
            }
            Record::Cursor { conv, uid, seq } => {
                let conv = self
                    .convs
                    .get(conv)
                    .ok_or("cursor of unknown conversation")?;
                if seq.0 > conv.seq || *seq <= conv.cursor(*uid) {
                    return Err("cursor beyond the last seq or not forward");
                }
                Ok(())
            }
            Record::Profile {
                subject,
                version,
                name,
                avatar,
            } => {
                if name.len() > PROFILE_NAME_LEN_MAX || avatar.len() > PROFILE_AVATAR_LEN_MAX {
                    return Err("profile field over its limit");
                }
                if let Subject::Conv(conv) = subject {
                    if !self.convs.contains_key(conv) {
                        return Err("profile of unknown conversation");
                    }
                }
                if self
                    .profiles
                    .get(subject)
                    .is_some_and(|held| held.version >= *version)
                {
                    return Err("profile version not newer than the one held");
                }
                Ok(())
            }
        }
    }

    /// The newest profile of `subject` held here.
    pub fn profile(&self, subject: Subject) -> Option<&StoredProfile> {
        self.profiles.get(&subject)
    }

    /// Applies a record that passed [`State::check`], found at `pos`.
    pub fn apply(&mut self, record: &Record<'_>, pos: Position) {
        match record {
            Record::Message(m) => self.apply_message(m, pos),
            Record::Device {
                uid,
                device_type,
                device,
            } => {
                self.devices.insert((*uid, *device_type), *device);
                self.device_max = self.device_max.max(Some(*device));
            }
            Record::Conv {
                conv,
                kind,
                key,
                members,
            } => {
                match kind {
                    ConvKind::Shop => {
                        // `check` guarantees a shop conversation has one member.
                        self.shop_convs.insert((ShopId(*key), members[0]), *conv);
                    }
                    ConvKind::Direct => {
                        self.direct_convs
                            .insert(pair(members[0], members[1]), *conv);
                    }
                    ConvKind::Group => {
                        self.group_convs.insert(*key, *conv);
                    }
                }
                for uid in members {
                    self.user_convs.entry(*uid).or_default().push(*conv);
                }
                self.conv_max = self.conv_max.max(Some(*conv));
                self.convs.insert(
                    *conv,
                    Conversation {
                        kind: *kind,
                        key: *key,
                        members: members.clone(),
                        cursors: SmallVec::new(),
                        seq: 0,
                        last_pos: 0,
                        index: Vec::new(),
                    },
                );
            }
            Record::Member {
                conv,
                uid,
                added,
                ts_ms,
            } => {
                let Some(c) = self.convs.get_mut(conv) else {
                    return;
                };
                let list = self.user_convs.entry(*uid).or_default();
                if *added {
                    c.members.push(*uid);
                    list.push(*conv);
                } else {
                    c.members.retain(|u| u != uid);
                    list.retain(|c| c != conv);
                }
                // An agent member of a shop conversation is an assignment.
                if let (Some(shop), UidKind::Agent) = (c.shop(), uid.kind) {
                    if *added {
                        self.reception.assigned(shop, *uid, *ts_ms);
                    } else {
                        self.reception.resolved(shop, *uid, *ts_ms);
                    }
                }
            }
            Record::Cursor { conv, uid, seq } => {
                if let Some(c) = self.convs.get_mut(conv) {
                    c.set_cursor(*uid, *seq);
                }
            }
            Record::Profile {
                subject,
                version,
                name,
                avatar,
            } => {
                self.profiles.insert(
                    *subject,
                    StoredProfile {
                        version: *version,
                        profile: Arc::new(Profile {
                            name: (*name).to_owned(),
                            avatar: (*avatar).to_owned(),
                        }),
                    },
                );
            }
        }
    }

    fn apply_message(&mut self, m: &MessageRef<'_>, pos: Position) {
        if let Some(c) = self.convs.get_mut(&m.conv) {
            store_message(
                c,
                m,
                pos,
                self.limits,
                &mut self.chain_repairs,
                &mut self.cmids,
            );
            count_message(&mut self.reception, c, m);
        }
    }

    /// [`State::check`] and [`State::apply`] in one, with a single conversation lookup for a
    /// message (replay's hot path).
    pub fn check_and_apply(
        &mut self,
        record: &Record<'_>,
        pos: Position,
        allow_gap: bool,
    ) -> Result<(), &'static str> {
        if let Record::Message(m) = record {
            let c = self
                .convs
                .get_mut(&m.conv)
                .ok_or("message in unknown conversation")?;
            c.check_message(m, allow_gap)?;
            store_message(
                c,
                m,
                pos,
                self.limits,
                &mut self.chain_repairs,
                &mut self.cmids,
            );
            count_message(&mut self.reception, c, m);
            return Ok(());
        }
        self.check(record, allow_gap)?;
        self.apply(record, pos);
        Ok(())
    }

    /// Replay mode: the cmid window keeps only its order until [`State::index_cmids`], so
    /// the millions of cmids that a long replay would insert and evict again never touch the
    /// hash table.
    pub fn defer_cmid_index(&mut self) {
        self.cmids.deferred = true;
    }

    /// Ends replay mode: indexes the cmids the window kept, oldest first, so a later message
    /// with a colliding key owns the entry, as it would have live.
    pub fn index_cmids(&mut self) {
        let window = &mut self.cmids;
        window.by_key.clear();
        for &(_, key, pos) in &window.order {
            window.by_key.insert(key, pos);
        }
        // Colliding keys share an entry, so there may be fewer keys than cmids, never more.
        debug_assert!(window.by_key.len() <= window.order.len());
        window.deferred = false;
    }

    /// Where the chain link `prev` of a message really leads.
    pub fn chain(&self, prev: Position) -> Position {
        self.chain_repairs.get(&prev).copied().unwrap_or(prev)
    }
}

/// Counts a message of a shop conversation in the reception statistics.
fn count_message(reception: &mut Reception, c: &Conversation, m: &MessageRef<'_>) {
    if let Some(shop) = c.shop() {
        reception.message(shop, m.conv, m.sender, m.ts_ms);
    }
}

/// Applies a checked message at `pos` to its conversation `c` and to the cmid window.
fn store_message(
    c: &mut Conversation,
    m: &MessageRef<'_>,
    pos: Position,
    limits: Limits,
    chain_repairs: &mut AHashMap<Position, Position>,
    window: &mut CmidWindow,
) {
    if m.prev != c.last_pos {
        chain_repairs.insert(m.prev, c.last_pos);
    }
    c.seq = m.seq.0;
    c.last_pos = pos;
    if m.seq.0 % limits.index_stride == 0 {
        let slot = (m.seq.0 / limits.index_stride - 1) as usize;
        // Seqs skipped by an operator's `skip_corrupt` leave holes (0) in the index.
        c.index.resize(slot, 0);
        c.index.push(pos);
    }
    // One has read what one wrote.
    c.set_cursor(m.sender, m.seq);

    let key = cmid_key(m.sender, m.conv, m.cmid);
    if !window.deferred {
        window.by_key.insert(key, pos);
    }
    window.order.push_back((m.ts_ms, key, pos));
    window.added += 1;
    while let Some(&(ts, key, at)) = window.order.front() {
        let expired = ts.saturating_add(limits.cmid_window_age_ms) < m.ts_ms;
        if !expired && window.order.len() <= limits.cmid_window_entries_max {
            break;
        }
        window.order.pop_front();
        window.evicted += 1;
        // A later message with a colliding key may own the entry now.
        if !window.deferred {
            window.by_key.remove_if(key, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            index_stride: 4,
            members_max: 3,
            cmid_window_age_ms: 1_000,
            cmid_window_entries_max: 3,
        }
    }

    const BUYER: Uid = Uid::new(UidKind::Buyer, 1);
    const AGENT: Uid = Uid::new(UidKind::Agent, 2);

    fn shop_conv(state: &mut State, conv: u64) {
        let r = Record::Conv {
            conv: ConvId(conv),
            kind: ConvKind::Shop,
            key: 9,
            members: [BUYER].into_iter().collect(),
        };
        state.check(&r, false).unwrap();
        state.apply(&r, 1);
    }

    fn message(conv: u64, seq: u64, ts: u64, cmid: &[u8]) -> Record<'_> {
        Record::Message(MessageRef {
            conv: ConvId(conv),
            seq: Seq(seq),
            ts_ms: ts,
            sender: BUYER,
            device: DeviceId::from_u64(1).unwrap(),
            cmid,
            kind: b"text",
            body: b"hi",
            prev: 0,
        })
    }

    #[test]
    fn rejects_a_second_conversation_for_the_same_shop_and_buyer() {
        let mut s = State::new(limits()).unwrap();
        shop_conv(&mut s, 1);
        let again = Record::Conv {
            conv: ConvId(2),
            kind: ConvKind::Shop,
            key: 9,
            members: [BUYER].into_iter().collect(),
        };
        assert!(s.check(&again, false).is_err());
        assert_eq!(s.shop_convs[&(ShopId(9), BUYER)], ConvId(1));
    }

    #[test]
    fn message_seqs_must_follow_without_gap() {
        let mut s = State::new(limits()).unwrap();
        shop_conv(&mut s, 1);
        assert!(s.check(&message(1, 2, 0, b"a"), false).is_err());
        s.apply(&message(1, 1, 0, b"a"), 8);
        assert!(s.check(&message(1, 1, 0, b"b"), false).is_err());
        assert!(s.check(&message(1, 3, 0, b"b"), true).is_ok());
        assert_eq!(s.convs[&ConvId(1)].cursor(BUYER), Seq(1));
    }

    #[test]
    fn cmid_window_keeps_the_young_up_to_its_size() {
        let mut s = State::new(limits()).unwrap();
        shop_conv(&mut s, 1);
        for (seq, (ts, cmid)) in [(0, b"a"), (10, b"b"), (20, b"c")].iter().enumerate() {
            s.apply(
                &message(1, seq as u64 + 1, *ts, *cmid),
                8 * (seq as u64 + 1),
            );
        }
        let c1 = ConvId(1);
        assert_eq!(s.cmid_position(BUYER, c1, b"a"), Some(8));
        assert_eq!(
            s.cmid_position(AGENT, c1, b"a"),
            None,
            "keys include the sender"
        );
        assert_eq!(
            s.cmid_position(BUYER, ConvId(2), b"a"),
            None,
            "keys include the conversation"
        );
        // Over the size limit, the oldest goes.
        s.apply(&message(1, 4, 30, b"d"), 32);
        assert_eq!(s.cmid_position(BUYER, c1, b"a"), None);
        assert_eq!(s.cmid_position(BUYER, c1, b"b"), Some(16));
        // Past the age limit, all older ones go.
        s.apply(&message(1, 5, 1_025, b"e"), 40);
        assert_eq!(s.cmid_position(BUYER, c1, b"b"), None);
        assert_eq!(s.cmid_position(BUYER, c1, b"c"), None);
        assert_eq!(s.cmid_position(BUYER, c1, b"d"), Some(32));
        assert_eq!(s.cmid_position(BUYER, c1, b"e"), Some(40));
    }

    #[test]
    fn cmid_keys_differ_for_nearby_inputs() {
        let mut inputs = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for id in 0..50 {
            for n in 0..300u32 {
                // Lengths around the 8-byte words the key is computed from.
                for len in [1, 7, 8, 9, 16, 17] {
                    let mut cmid = format!("{n}-cmid-of-{id}").into_bytes();
                    cmid.resize(len, b'_');
                    let sender = Uid::new(UidKind::ALL[id % 4], id as u64);
                    let conv = ConvId((n % 3) as u64);
                    keys.insert(cmid_key(sender, conv, &cmid));
                    inputs.insert((sender, conv, cmid));
                }
            }
        }
        assert!(inputs.len() > 50_000);
        assert_eq!(keys.len(), inputs.len());
    }

    #[test]
    fn members_and_cursors_follow_their_rules() {
        let mut s = State::new(limits()).unwrap();
        shop_conv(&mut s, 1);
        let add = Record::Member {
            conv: ConvId(1),
            uid: AGENT,
            added: true,
            ts_ms: 5,
        };
        s.check(&add, false).unwrap();
        s.apply(&add, 2);
        assert!(s.check(&add, false).is_err());
        assert_eq!(s.user_convs[&AGENT].as_slice(), &[ConvId(1)]);
        let cursor = |seq| Record::Cursor {
            conv: ConvId(1),
            uid: AGENT,
            seq: Seq(seq),
        };
        assert!(s.check(&cursor(1), false).is_err(), "beyond the last seq");
        s.apply(&message(1, 1, 0, b"x"), 8);
        s.check(&cursor(1), false).unwrap();
        s.apply(&cursor(1), 3);
        assert!(s.check(&cursor(1), false).is_err(), "not forward");
        let remove = Record::Member {
            conv: ConvId(1),
            uid: AGENT,
            added: false,
            ts_ms: 6,
        };
        s.check(&remove, false).unwrap();
        s.apply(&remove, 4);
        assert!(s.user_convs[&AGENT].is_empty());
    }

    #[test]
    fn profiles_only_go_forward_within_their_limits() {
        let mut s = State::new(limits()).unwrap();
        let profile = |subject, version, name: &'static str| Record::Profile {
            subject,
            version,
            name,
            avatar: "",
        };
        let ann = Subject::User(AGENT);
        s.check(&profile(ann, 5, "Ann"), false).unwrap();
        s.apply(&profile(ann, 5, "Ann"), 1);
        assert!(
            s.check(&profile(ann, 5, "Again"), false).is_err(),
            "same version"
        );
        assert!(s.check(&profile(ann, 4, "Older"), false).is_err(), "older");
        s.check(&profile(ann, 6, "Annie"), false).unwrap();
        s.apply(&profile(ann, 6, "Annie"), 2);
        assert_eq!(s.profile(ann).unwrap().profile.name, "Annie");
        let long: &'static str = Box::leak("n".repeat(65).into_boxed_str());
        assert!(
            s.check(&profile(ann, 7, long), false).is_err(),
            "over 64 bytes"
        );
        let unknown = Subject::Conv(ConvId(9));
        assert!(
            s.check(&profile(unknown, 1, "X"), false).is_err(),
            "unknown conversation"
        );
        shop_conv(&mut s, 9);
        s.check(&profile(unknown, 1, "X"), false).unwrap();
    }
}
