//! Reads: history along the conversation chains, and lookups of the state.

use chinwag_protocol::{
    AgentStatsOk, ConvId, DeviceId, DeviceType, Seq, ShopId, StreamChange, StreamEvent, Uid,
};
use smallvec::SmallVec;

use super::record::{self, MessageRef};
use super::{segment, state, Conversation, HistoryFrom, Position, Store, StoreError};

/// Why a [`Store::scan`] could not start where it was asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// The position is in a segment retention deleted: the messages there are gone.
    Retired,
    /// The position is not one this log handed out.
    NotOurs,
}

/// What a [`Store::scan`] found.
#[derive(Debug)]
pub struct Scanned<'a> {
    /// The messages, in log order.
    pub messages: Vec<MessageRef<'a>>,
    /// The changes of members and read cursors, in log order.
    pub events: Vec<StreamEvent>,
    /// The position after the last record read.
    pub next: Position,
}

/// What one stream event counts against a scan's byte budget (about its size in JSON).
pub const STREAM_EVENT_BYTES: usize = 96;
/// The most events one scan returns (a batch counts them in a `u16`).
const EVENTS_MAX: usize = u16::MAX as usize;

/// One stretch of a conversation's chain that [`Store::history`] walks: from the record at
/// `pos` (expected to hold `seq`) down to `stop`.
#[derive(Debug, Clone, Copy)]
struct Lane {
    seq: u64,
    pos: Position,
    stop: u64,
}

impl Store {
    /// Messages of `conv` in ascending seq: at most `limit` (and at most
    /// [`StoreConfig::history_limit_max`]), from where `from` says.
    ///
    /// Costs at most `limit + index_stride` record reads. Messages in segments deleted by
    /// retention are gone: the result then starts at the oldest one still in the log.
    pub fn history(
        &self,
        conv: ConvId,
        from: HistoryFrom,
        limit: usize,
    ) -> Result<Vec<MessageRef<'_>>, StoreError> {
        let c = self
            .state
            .convs
            .get(&conv)
            .ok_or(StoreError::UnknownConv(conv))?;
        let last = c.seq;
        let k = limit.min(self.config.history_limit_max) as u64;
        if k == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi) = match from {
            HistoryFrom::Newest | HistoryFrom::Before(Seq(0)) => (last.saturating_sub(k) + 1, last),
            HistoryFrom::Before(Seq(s)) => {
                let hi = (s - 1).min(last);
                (hi.saturating_sub(k) + 1, hi)
            }
            HistoryFrom::After(Seq(s)) => (s.saturating_add(1), s.saturating_add(k).min(last)),
        };
        let (lo, hi) = match from {
            // Retention may have taken the start of the requested range: serve from the oldest
            // message still in the log instead.
            HistoryFrom::After(_) if self.retired(c, lo) => {
                let oldest = self.oldest_live_seq(c)?;
                (
                    lo.max(oldest),
                    hi.max(oldest.saturating_add(k - 1).min(last)),
                )
            }
            _ => (lo, hi),
        };
        if lo > hi {
            return Ok(Vec::new());
        }
        // Start from the nearest known position at or above `hi` and walk the chain down.
        let stride = u64::from(self.config.index_stride);
        let (mut seq, mut pos) = (last, c.last_pos);
        let mut slot = hi.div_ceil(stride);
        while slot * stride < last {
            match c.index.get(slot as usize - 1) {
                Some(&p) if p != 0 => {
                    (seq, pos) = (slot * stride, p);
                    break;
                }
                _ => slot += 1,
            }
        }
        // Cut the walk from there down to `lo` at every indexed seq: each piece (a lane) is a
        // chain of its own, so the lanes' record reads, each a cache miss, do not wait on each
        // other and the CPU overlaps them, instead of one miss after another.
        let mut lanes: SmallVec<[Lane; 8]> = SmallVec::new();
        let mut top = Lane { seq, pos, stop: lo };
        let mut slot = seq.saturating_sub(1) / stride;
        while slot > 0 && slot * stride >= lo {
            if let Some(&p) = c.index.get(slot as usize - 1).filter(|&&p| p != 0) {
                let anchor = slot * stride;
                lanes.push(Lane {
                    stop: anchor + 1,
                    ..top
                });
                top = Lane {
                    seq: anchor,
                    pos: p,
                    stop: lo,
                };
            }
            slot -= 1;
        }
        lanes.push(top);
        let mut out: Vec<Option<MessageRef<'_>>> = vec![None; (hi - lo + 1) as usize];
        let mut walking = true;
        while walking {
            walking = false;
            for lane in lanes.iter_mut().filter(|l| l.pos != 0 && l.seq >= l.stop) {
                let Some(m) = self.message_at(lane.pos)? else {
                    lane.pos = 0; // retired by retention
                    continue;
                };
                if m.conv != conv || m.seq.0 > lane.seq {
                    return Err(StoreError::corrupt(
                        lane.pos,
                        "conversation chain is broken",
                    ));
                }
                // A seq below the expected one is a gap left by `skip_corrupt`.
                if (lo..=hi).contains(&m.seq.0) {
                    out[(m.seq.0 - lo) as usize] = Some(m);
                }
                lane.pos = self.state.chain(m.prev);
                lane.seq = m.seq.0.saturating_sub(1);
                walking |= lane.pos != 0 && lane.seq >= lane.stop;
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Whether retention may have taken `seq` of `c`: the first index entry at or above it
    /// is gone (one lookup, so reads of live ranges pay nothing more).
    pub(super) fn retired(&self, c: &Conversation, seq: u64) -> bool {
        let first = self.segments[0].id;
        if first == 1 {
            return false;
        }
        let slot = seq.div_ceil(u64::from(self.config.index_stride)) as usize;
        match c.index.get(slot.saturating_sub(1)) {
            Some(&p) => segment::segment_of(p) < first,
            None => segment::segment_of(c.last_pos) < first,
        }
    }

    /// The oldest seq of `c` still in the log (after retention): a binary search of the index
    /// for the first entry in a live segment, then at most `index_stride` reads back from it.
    pub(super) fn oldest_live_seq(&self, c: &Conversation) -> Result<u64, StoreError> {
        let first = self.segments[0].id;
        let stride = u64::from(self.config.index_stride);
        // Index positions grow with seq, so the retired entries come first.
        let slot = c.index.partition_point(|&p| segment::segment_of(p) < first);
        let (mut seq, mut pos) = match c.index.get(slot) {
            Some(&p) => ((slot as u64 + 1) * stride, p),
            None => (c.seq, c.last_pos),
        };
        let mut oldest = seq + 1;
        while pos != 0 {
            let Some(m) = self.message_at(pos)? else {
                break;
            };
            oldest = m.seq.0;
            seq = oldest.saturating_sub(1);
            pos = self.state.chain(m.prev);
            if seq == 0 {
                break;
            }
        }
        Ok(oldest)
    }

    /// The message at `pos`, or `None` if its segment was retired.
    /// Everything before this position is acknowledged (what [`Store::scan`] reads up to).
    pub fn acked(&self) -> Position {
        self.acked
    }

    /// The messages stored from `from` on, in log order (so in seq order per conversation),
    /// and the changes of members and read cursors among them as stream events (each saying
    /// after how many of the returned messages it came; a conversation's creation gives a
    /// `joined` per first member): at most `records_max` records read, about `bytes_max` bytes
    /// (an event counts [`STREAM_EVENT_BYTES`]; always at least one record's worth if there is
    /// one), and only what is acknowledged. Returns them with the position after the last
    /// record read: the next scan starts there. Position 0 is the start of the log.
    ///
    /// A position in a segment deleted by retention is [`ScanError::Retired`]; one past the
    /// log or not on a record boundary is [`ScanError::NotOurs`].
    pub fn scan(
        &self,
        from: Position,
        records_max: usize,
        bytes_max: usize,
    ) -> Result<Scanned<'_>, ScanError> {
        let first = self.segments[0].id;
        let mut pos = if from == 0 {
            segment::position(first, segment::HEADER_BYTES)
        } else {
            from
        };
        if segment::segment_of(pos) < first {
            return Err(ScanError::Retired);
        }
        if pos
            > self
                .acked
                .max(segment::position(first, segment::HEADER_BYTES))
        {
            return Err(ScanError::NotOurs);
        }
        let mut messages: Vec<MessageRef<'_>> = Vec::new();
        let mut events: Vec<StreamEvent> = Vec::new();
        let mut bytes = 0;
        for _ in 0..records_max {
            if pos >= self.acked {
                break;
            }
            let id = segment::segment_of(pos);
            let Some(seg) = self.segments.get((id - first) as usize) else {
                break;
            };
            match record::decode(&seg.map, segment::offset_of(pos)) {
                Ok(Some((record, len))) => {
                    let after_msgs = messages.len() as u16;
                    let event = |uid, change| StreamEvent {
                        after_msgs,
                        conv: ConvId(0),
                        uid,
                        change,
                    };
                    let mut found: SmallVec<[StreamEvent; 2]> = SmallVec::new();
                    match &record {
                        // Profiles are not in the stream (a service sets them; it knows them).
                        record::Record::Message(_)
                        | record::Record::Device { .. }
                        | record::Record::Profile { .. } => {}
                        record::Record::Conv { conv, members, .. } => {
                            found.extend(members.iter().map(|&uid| StreamEvent {
                                conv: *conv,
                                ..event(uid, StreamChange::Joined { ts: 0 })
                            }))
                        }
                        record::Record::Member {
                            conv,
                            uid,
                            added,
                            ts_ms,
                        } => found.push(StreamEvent {
                            conv: *conv,
                            ..event(
                                *uid,
                                if *added {
                                    StreamChange::Joined { ts: *ts_ms }
                                } else {
                                    StreamChange::Left { ts: *ts_ms }
                                },
                            )
                        }),
                        record::Record::Cursor { conv, uid, seq } => found.push(StreamEvent {
                            conv: *conv,
                            ..event(*uid, StreamChange::Read { seq: *seq })
                        }),
                    }
                    let size = match &record {
                        record::Record::Message(m) => m.body.len() + m.kind.len() + m.cmid.len(),
                        _ => found.len() * STREAM_EVENT_BYTES,
                    };
                    let something = !messages.is_empty() || !events.is_empty();
                    if something
                        && (bytes + size > bytes_max || events.len() + found.len() > EVENTS_MAX)
                    {
                        break;
                    }
                    bytes += size;
                    if let record::Record::Message(m) = record {
                        messages.push(m);
                    }
                    events.extend(found);
                    pos += len as u64;
                }
                // The end of this segment's records: on to the next segment.
                Ok(None) if id < self.active().id => {
                    pos = segment::position(id + 1, segment::HEADER_BYTES);
                }
                Ok(None) => break,
                Err(_) => return Err(ScanError::NotOurs),
            }
        }
        Ok(Scanned {
            messages,
            events,
            next: pos,
        })
    }

    pub(super) fn message_at(&self, pos: Position) -> Result<Option<MessageRef<'_>>, StoreError> {
        let first = self.segments[0].id;
        let id = segment::segment_of(pos);
        if id < first {
            return Ok(None);
        }
        let seg = usize::try_from(id - first)
            .ok()
            .and_then(|i| self.segments.get(i))
            .ok_or_else(|| StoreError::corrupt(pos, "position past the log"))?;
        record::decode_message(&seg.map, segment::offset_of(pos))
            .map(Some)
            .map_err(|reason| StoreError::corrupt(pos, reason))
    }

    /// The reception figures of `shop`'s agents over `from_ms..to_ms` (widened to whole hours,
    /// cut to the hours kept): see `state/reception.rs`.
    pub fn agent_stats(&self, shop: ShopId, from_ms: u64, to_ms: u64) -> AgentStatsOk {
        self.state.reception.report(shop, from_ms, to_ms)
    }

    /// The conversation, if it is in this log.
    pub fn conv(&self, conv: ConvId) -> Option<&Conversation> {
        self.state.convs.get(&conv)
    }

    /// Every conversation in this log, in no particular order.
    pub fn conversations(&self) -> impl Iterator<Item = (ConvId, &Conversation)> + '_ {
        self.state.convs.iter().map(|(id, c)| (*id, c))
    }

    /// The conversation of this shop and buyer.
    pub fn shop_conv(&self, shop: ShopId, buyer: Uid) -> Option<ConvId> {
        self.state.shop_convs.get(&(shop, buyer)).copied()
    }

    /// The most members a conversation may have (`members_max`).
    pub fn members_max(&self) -> usize {
        self.config.members_max
    }

    /// The group the service created with `key`.
    pub fn group_conv(&self, key: u64) -> Option<ConvId> {
        self.state.group_convs.get(&key).copied()
    }

    /// The direct conversation of two users (in either order).
    pub fn direct_conv(&self, a: Uid, b: Uid) -> Option<ConvId> {
        self.state.direct_convs.get(&state::pair(a, b)).copied()
    }

    /// The conversations `uid` is a member of, in this log.
    pub fn convs_of(&self, uid: Uid) -> &[ConvId] {
        self.state
            .user_convs
            .get(&uid)
            .map_or(&[], |c| c.as_slice())
    }

    /// The newest profile of `subject` in this log (a user's own, or the copy this log keeps
    /// of a user who wrote in one of its conversations).
    pub fn profile(&self, subject: chinwag_protocol::Subject) -> Option<&state::StoredProfile> {
        self.state.profile(subject)
    }

    /// The device id registered for this user and device type.
    pub fn device(&self, uid: Uid, device_type: DeviceType) -> Option<DeviceId> {
        self.state.devices.get(&(uid, device_type)).copied()
    }

    /// The greatest device id registered (for `DeviceIdGenerator::resume_after`).
    pub fn device_max(&self) -> Option<DeviceId> {
        self.state.device_max
    }

    /// The greatest conversation id created (to continue allocating after a restart).
    pub fn conv_max(&self) -> Option<ConvId> {
        self.state.conv_max
    }
}

/// The figures of a shop whose partition has no log yet: nothing, over the window as
/// [`Store::agent_stats`] would give it.
pub fn agent_stats_of_nothing(shop: ShopId, from_ms: u64, to_ms: u64) -> AgentStatsOk {
    super::state::reception::Reception::default().report(shop, from_ms, to_ms)
}
