//! The conversation log: every message and every piece of state chinwag keeps.
//!
//! A [`Store`] owns one append-only log (one per shard) in preallocated, memory-mapped segment
//! files, and the in-memory state that replaying it rebuilds: conversations with their seq
//! allocator and read index, devices, members, read cursors and the cmid windows that make
//! sends idempotent. Its contract:
//!
//! - **Seqs.** Per conversation, [`Store::append_message`] assigns 1, 2, 3, ... with no gap and
//!   no duplicate, across restarts and crashes. Only the owner of the `Store` (`&mut self`)
//!   advances them; any thread may read the last committed seq through
//!   [`Store::last_seq_handle`] without a lock.
//! - **Batches and acknowledgements.** Appends during a loop turn, then one [`Store::commit`];
//!   an acknowledgement (`send_ok`, `read_ok`, ...) for anything appended may go out only after
//!   `commit` returned `Ok`. What a committed record then survives depends on
//!   [`FsyncPolicy`] (`docs/storage.md`, "Durability").
//! - **Reads.** [`Store::history`] costs at most `limit + index_stride` record reads and one
//!   index lookup, never a scan: records of a conversation chain back to the previous one, and
//!   every `index_stride`-th seq's position is kept in memory.
//! - **Recovery.** [`Store::open`] verifies every record it replays, truncates a torn tail and
//!   refuses to start on corruption below what was acknowledged (unless
//!   [`StoreConfig::skip_corrupt`]); snapshots bound how much it replays.
//! - **Faults.** Bad input and bad bytes are errors ([`StoreError`]), never panics; a full disk
//!   fails appends with [`StoreError::DiskFull`] and harms nothing stored.
//!
//! Not thread-safe by design: one shard owns one `Store` (shared-nothing).

mod cmid_table;
mod config;
mod error;
mod os;
mod record;
mod segment;
mod snapshot;
mod state;

#[cfg(test)]
mod crash_test;

use std::collections::VecDeque;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chinwag_protocol::{ConvId, DeviceId, DeviceType, Seq, ShopId, Uid};
use smallvec::SmallVec;

pub use config::{FsyncPolicy, StoreConfig};
pub use error::{Position, StoreError};
pub use record::{ConvKind, MessageRef};
pub use state::Conversation;

use record::Record;
use segment::{Preparer, Segment};
use state::{Limits, State};

/// A message to append.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// The conversation (must exist).
    pub conv: ConvId,
    /// Who sends it.
    pub sender: Uid,
    /// From which device.
    pub device: DeviceId,
    /// The sender's client message id: a repeat within the window is not stored again.
    pub cmid: &'a [u8],
    /// The message kind.
    pub kind: &'a [u8],
    /// The body.
    pub body: &'a [u8],
    /// The time of storing, ms since the Unix epoch (the caller's clock).
    pub ts_ms: u64,
}

/// What [`Store::append_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored with this seq.
    Stored {
        /// The new message's seq.
        seq: Seq,
    },
    /// The sender used this cmid before: nothing was stored; this is the original.
    Duplicate {
        /// The original message's conversation.
        conv: ConvId,
        /// The original message's seq.
        seq: Seq,
    },
}

/// Which messages [`Store::history`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    /// The newest ones.
    Newest,
    /// Those with a seq below this one (exclusive). `Before(Seq(0))` means the newest.
    Before(Seq),
    /// Those with a seq above this one (exclusive).
    After(Seq),
}

/// What [`Store::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The position of the snapshot replay started from, if any.
    pub snapshot: Option<Position>,
    /// Snapshots that could not be used, and why.
    pub snapshots_rejected: Vec<(PathBuf, String)>,
    /// Records replayed after the snapshot.
    pub records: u64,
    /// Bytes of records replayed.
    pub bytes: u64,
    /// A torn tail that was cut off: where, and how many bytes after it were not zero.
    pub truncated: Option<(Position, u64)>,
    /// Corrupt stretches skipped because of [`StoreConfig::skip_corrupt`]: where, how long.
    pub skipped: Vec<(Position, u64)>,
}

/// One stretch of a conversation's chain that [`Store::history`] walks: from the record at
/// `pos` (expected to hold `seq`) down to `stop`.
#[derive(Debug, Clone, Copy)]
struct Lane {
    seq: u64,
    pos: Position,
    stop: u64,
}

/// What [`Store::retain`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Segments deleted.
    pub segments: usize,
    /// Bytes of files deleted.
    pub bytes: u64,
}

/// Gauges of one log, for the gateway's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Live segment files (the active one included).
    pub segments: usize,
    /// Bytes of those files on disk (preallocated).
    pub segment_bytes: u64,
    /// Conversations in this log.
    pub conversations: usize,
    /// Devices registered in this log.
    pub devices: usize,
    /// Entries in the cmid window.
    pub cmid_entries: usize,
    /// The position of the next record.
    pub tail: Position,
    /// The newest snapshot's position.
    pub snapshot: Option<Position>,
}

/// One shard's conversation log and state. See the module docs for its contract.
pub struct Store {
    config: StoreConfig,
    /// Live segments in log order; the last one is where appends go.
    segments: VecDeque<Segment>,
    preparer: Preparer,
    state: State,
    /// Conversations whose seq advanced since the last commit, to publish at the next.
    unpublished: Vec<ConvId>,
    /// Everything before this position has been flushed to disk.
    synced: Position,
    /// Everything before this position is marked acknowledged in the segment headers.
    acked: Position,
    last_sync: Instant,
    /// The newest snapshot's position.
    snapshot: Option<Position>,
    /// A flush failed: durability can no longer be promised.
    poisoned: bool,
}

impl Store {
    /// Opens the log in `config.dir` (creating it if needed), recovers it and rebuilds the
    /// state. Fails on corruption below the acknowledged end unless `config.skip_corrupt`.
    pub fn open(config: StoreConfig) -> Result<(Store, RecoveryReport), StoreError> {
        config.validate().map_err(StoreError::Config)?;
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create log directory", &dir, e))?;
        let limits = Limits {
            index_stride: u64::from(config.index_stride),
            members_max: config.members_max,
            cmid_window_age_ms: config.cmid_window_age_ms,
            cmid_window_entries_max: config.cmid_window_entries_max,
        };
        let mut report = RecoveryReport::default();
        let ids = segment::list(&dir)?;
        if let Some(pair) = ids.windows(2).find(|w| w[1] != w[0] + 1) {
            return Err(StoreError::corrupt(
                segment::position(pair[0] + 1, 0),
                "a segment file is missing",
            ));
        }

        // The newest snapshot that reads back whole and whose position is in the log.
        let mut start = None;
        for (pos, path) in snapshot::list(&dir)? {
            if !ids.contains(&segment::segment_of(pos)) {
                report
                    .snapshots_rejected
                    .push((path, "its segment is not in the log".into()));
                continue;
            }
            match snapshot::read(&path, limits) {
                Ok(found) => {
                    start = Some(found);
                    break;
                }
                Err(e) => report.snapshots_rejected.push((path, e.to_string())),
            }
        }
        let (state, start) = match start {
            Some((state, pos)) => {
                report.snapshot = Some(pos);
                (state, pos)
            }
            None => {
                if ids.first().is_some_and(|&first| first != 1) {
                    return Err(StoreError::corrupt(
                        segment::position(ids[0], 0),
                        "the log's first segments were retired but no snapshot covers them",
                    ));
                }
                let state = State::new(limits)
                    .map_err(|e| StoreError::io("map the cmid window", &dir, e))?;
                (state, segment::position(1, segment::HEADER_BYTES))
            }
        };
        let mut segments = VecDeque::with_capacity(ids.len() + 1);
        for &id in &ids {
            let mut seg = Segment::open(&dir, id)?;
            // Segments before the replay start are not scanned; their ends only matter for
            // flushing, which never reaches back to them.
            seg.end = seg.capacity();
            segments.push_back(seg);
        }
        if segments.is_empty() {
            segments.push_back(Segment::create(&dir, 1, config.segment_bytes)?);
        }
        let snapshot_pos = report.snapshot;
        let mut store = Store {
            config,
            segments,
            preparer: Preparer::new(),
            state,
            unpublished: Vec::new(),
            synced: start,
            acked: start,
            last_sync: Instant::now(),
            snapshot: snapshot_pos,
            poisoned: false,
        };
        store.state.defer_cmid_index();
        store.replay(start, &mut report)?;
        store.state.index_cmids();
        // What survived the crash may sit only in the page cache: make it durable and mark it
        // acknowledged before anything new is appended after it.
        store.flush()?;
        store.state.publish_all();
        let active = store.active();
        store
            .preparer
            .start(&dir, active.id + 1, store.config.segment_bytes);
        Ok((store, report))
    }

    /// Replays the records from `start`, rebuilding the state; handles a torn tail and
    /// corruption as the module docs say.
    fn replay(&mut self, start: Position, report: &mut RecoveryReport) -> Result<(), StoreError> {
        let first = self.segments[0].id;
        let Some(mut idx) = segment::segment_of(start)
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.segments.len())
        else {
            return Err(StoreError::corrupt(start, "replay starts outside the log"));
        };
        let mut off = segment::offset_of(start);
        let skip = self.config.skip_corrupt;
        for seg in self.segments.range(idx..) {
            os::prefault_for_reading(&seg.map);
        }
        while idx < self.segments.len() {
            let seg = &self.segments[idx];
            let pos = segment::position(seg.id, off);
            let bad = match record::decode(&seg.map, off) {
                Ok(Some((record, len))) => {
                    let mut ts = 0;
                    match self.state.check_and_apply(&record, pos, skip) {
                        Ok(()) => {
                            if let Record::Message(m) = &record {
                                ts = m.ts_ms;
                            }
                            report.records += 1;
                            report.bytes += len as u64;
                        }
                        // A whole record that contradicts the state is never a torn write.
                        Err(reason) if !skip => return Err(StoreError::corrupt(pos, reason)),
                        Err(_) => report.skipped.push((pos, len as u64)),
                    }
                    let seg = &mut self.segments[idx];
                    seg.newest_ts_ms = seg.newest_ts_ms.max(ts);
                    off += len;
                    continue;
                }
                Ok(None) if off >= seg.acked_end() => {
                    self.segments[idx].end = off;
                    idx += 1;
                    off = segment::HEADER_BYTES;
                    continue;
                }
                Ok(None) => "zeros where acknowledged records should be",
                Err(reason) => reason,
            };
            let seg = &self.segments[idx];
            let later_acked = self
                .segments
                .range(idx + 1..)
                .any(|s| s.acked_end() > segment::HEADER_BYTES);
            if off >= seg.acked_end() && !later_acked {
                report.truncated = Some((pos, self.truncate(idx, off)?));
                break;
            }
            if !skip {
                return Err(StoreError::corrupt(pos, bad));
            }
            // The operator accepted losing the corrupt stretch: resume at the next record that
            // checks out, or at the next segment.
            match resync(&seg.map, off + record::ALIGN) {
                Some(next) => {
                    report.skipped.push((pos, (next - off) as u64));
                    off = next;
                }
                None => {
                    report.skipped.push((pos, (seg.capacity() - off) as u64));
                    self.segments[idx].end = seg.capacity();
                    idx += 1;
                    off = segment::HEADER_BYTES;
                }
            }
        }
        if report.truncated.is_none() {
            // A record torn before its length was stored reads as the end, but its other
            // bytes are still there: clear them before new records are written over them.
            let last = self.segments.len() - 1;
            let end = self.segments[last].end;
            let dropped = self.truncate(last, end)?;
            if dropped > 0 {
                let active = &self.segments[last];
                report.truncated = Some((segment::position(active.id, end), dropped));
            }
        }
        Ok(())
    }

    /// Cuts the log at `off` of segment `idx`: zeroes the rest of that segment (so stale bytes
    /// can never pass for records after later appends) and deletes the segments after it,
    /// which hold nothing acknowledged. Returns how many non-zero bytes were dropped.
    fn truncate(&mut self, idx: usize, off: usize) -> Result<u64, StoreError> {
        let mut dropped = 0u64;
        let seg = &mut self.segments[idx];
        for chunk in seg.map[off..].chunks_mut(4096) {
            // Only touch pages that hold something: writing zeros over zeros would dirty
            // (and allocate) every page of the segment.
            let nonzero = chunk.iter().filter(|&&b| b != 0).count();
            if nonzero > 0 {
                dropped += nonzero as u64;
                chunk.fill(0);
            }
        }
        seg.end = off;
        if dropped > 0 {
            seg.sync(seg.capacity())?;
        }
        while self.segments.len() > idx + 1 {
            if let Some(later) = self.segments.pop_back() {
                dropped += later.map.iter().filter(|&&b| b != 0).count() as u64;
                let path = later.path.clone();
                drop(later);
                fs::remove_file(&path).map_err(|e| StoreError::io("delete segment", &path, e))?;
            }
        }
        os::sync_dir(&self.config.dir)
            .map_err(|e| StoreError::io("sync directory", &self.config.dir, e))?;
        Ok(dropped)
    }

    fn active(&self) -> &Segment {
        // `open` always leaves at least one segment, and retention never removes the last.
        self.segments.back().expect("the log has an active segment")
    }

    /// The position where the next record goes.
    pub fn tail(&self) -> Position {
        let active = self.active();
        segment::position(active.id, active.end)
    }

    /// Writes one record (already checked against the state) at the tail. Moves to the next
    /// segment when this one is full; fails with `DiskFull` if it cannot be created, leaving
    /// the log as it was.
    fn append_record(&mut self, record: &Record<'_>) -> Result<Position, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let len = record::padded(record::encoded_len(record));
        let active = self.active();
        if active.end + len > active.capacity() {
            self.switch_segment()?;
        }
        let Some(active) = self.segments.back_mut() else {
            unreachable!("the log has an active segment");
        };
        let off = active.end;
        let written = record::encode(&mut active.map[off..off + len], record);
        debug_assert_eq!(written, len);
        active.end += len;
        Ok(segment::position(active.id, off))
    }

    fn switch_segment(&mut self) -> Result<(), StoreError> {
        let (id, bytes) = (self.active().id + 1, self.config.segment_bytes);
        let next = self.preparer.take(&self.config.dir, id, bytes)?;
        if let Some(sealed) = self.segments.back_mut() {
            sealed.store_newest_ts();
        }
        self.segments.push_back(next);
        self.preparer.start(&self.config.dir, id + 1, bytes);
        Ok(())
    }

    /// Appends a message: assigns the conversation's next seq, or returns the original if the
    /// sender used this cmid within the window. Durable and acknowledgeable only after the
    /// next successful [`Store::commit`].
    pub fn append_message(&mut self, msg: &NewMessage<'_>) -> Result<Appended, StoreError> {
        let limits = [
            ("body", msg.body.len(), self.config.body_bytes_max),
            ("cmid", msg.cmid.len(), self.config.cmid_bytes_max),
            ("kind", msg.kind.len(), self.config.kind_bytes_max),
        ];
        if let Some(&(what, len, max)) = limits.iter().find(|(_, len, max)| len > max) {
            return Err(StoreError::TooLarge { what, len, max });
        }
        if let Some(pos) = self.state.cmid_position(msg.sender, msg.cmid) {
            // Confirm against the stored message: the window keys are hashes.
            if let Some(m) = self.message_at(pos)? {
                if m.sender == msg.sender && m.cmid == msg.cmid {
                    return Ok(Appended::Duplicate {
                        conv: m.conv,
                        seq: m.seq,
                    });
                }
            }
        }
        let conv = self
            .state
            .convs
            .get(&msg.conv)
            .ok_or(StoreError::UnknownConv(msg.conv))?;
        let seq = Seq(conv.seq + 1);
        let record = Record::Message(MessageRef {
            conv: msg.conv,
            seq,
            ts_ms: msg.ts_ms,
            sender: msg.sender,
            device: msg.device,
            cmid: msg.cmid,
            kind: msg.kind,
            body: msg.body,
            prev: conv.last_pos,
        });
        debug_assert_eq!(self.state.check(&record, false), Ok(()));
        let pos = self.append_record(&record)?;
        self.state.apply(&record, pos);
        if let Some(active) = self.segments.back_mut() {
            active.newest_ts_ms = active.newest_ts_ms.max(msg.ts_ms);
        }
        self.unpublished.push(msg.conv);
        Ok(Appended::Stored { seq })
    }

    /// Checks a state record, appends it and applies it.
    fn append_state(&mut self, record: Record<'_>) -> Result<(), StoreError> {
        self.state
            .check(&record, false)
            .map_err(StoreError::Invalid)?;
        let pos = self.append_record(&record)?;
        self.state.apply(&record, pos);
        Ok(())
    }

    /// Makes everything appended so far acknowledgeable under the durability policy: after
    /// `Ok`, acks for the batch may go out. Call once per loop turn, after the turn's appends.
    ///
    /// `never`: no system call. `interval`: flushes if the interval has passed since the last
    /// flush. `always`: flushes (group commit). Also publishes the new last seqs.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        match self.config.fsync {
            FsyncPolicy::Never => self.mark_acked(),
            FsyncPolicy::Interval => {
                let interval = Duration::from_millis(self.config.fsync_interval_ms);
                if self.last_sync.elapsed() >= interval {
                    self.flush()?;
                }
            }
            FsyncPolicy::Always => self.flush()?,
        }
        self.publish();
        Ok(())
    }

    /// Flushes everything appended to disk now, whatever the policy (e.g. at shutdown), and
    /// commits it.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        self.flush()?;
        self.publish();
        Ok(())
    }

    fn publish(&mut self) {
        for conv in self.unpublished.drain(..) {
            if let Some(c) = self.state.convs.get(&conv) {
                c.published.store(c.seq, Ordering::Release);
            }
        }
    }

    /// msyncs every segment written since the last flush, then marks it acknowledged.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.synced == self.tail() {
            // Nothing new: an idle shard's commits cost no system call.
            self.last_sync = Instant::now();
            return Ok(());
        }
        let from = segment::segment_of(self.synced);
        for seg in self.segments.iter().filter(|s| s.id >= from) {
            if let Err(e) = seg.sync(seg.end) {
                // After a failed msync the kernel may have dropped the dirty pages (and
                // cleared the error): retrying could report success for lost data.
                self.poisoned = true;
                return Err(e);
            }
        }
        self.synced = self.tail();
        self.last_sync = Instant::now();
        self.mark_acked();
        Ok(())
    }

    /// Records in the segment headers that everything up to the tail is acknowledged, so
    /// recovery can tell a torn tail (after it) from corruption (before it).
    fn mark_acked(&mut self) {
        let from = segment::segment_of(self.acked);
        for seg in self.segments.iter_mut().filter(|s| s.id >= from) {
            let end = seg.end;
            seg.set_acked_end(end);
        }
        self.acked = self.tail();
    }

    // ---- reads ----

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
    fn retired(&self, c: &Conversation, seq: u64) -> bool {
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
    fn oldest_live_seq(&self, c: &Conversation) -> Result<u64, StoreError> {
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
    fn message_at(&self, pos: Position) -> Result<Option<MessageRef<'_>>, StoreError> {
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

    /// A handle on the conversation's last committed seq, readable from any thread.
    pub fn last_seq_handle(&self, conv: ConvId) -> Option<Arc<AtomicU64>> {
        self.state.convs.get(&conv).map(|c| c.published.clone())
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

    // ---- state changes; each is acknowledgeable after the next `commit` ----

    /// Registers a device, or returns the one registered before for this user and type.
    pub fn register_device(
        &mut self,
        uid: Uid,
        device_type: DeviceType,
        device: DeviceId,
    ) -> Result<DeviceId, StoreError> {
        if let Some(known) = self.device(uid, device_type) {
            return Ok(known);
        }
        self.append_state(Record::Device {
            uid,
            device_type,
            device,
        })?;
        Ok(device)
    }

    /// Creates the conversation of `shop` and `buyer`. Fails with `ConvExists` (naming the
    /// existing one) if they have one, or if `conv` is taken.
    pub fn create_shop_conv(
        &mut self,
        conv: ConvId,
        shop: ShopId,
        buyer: Uid,
    ) -> Result<(), StoreError> {
        if let Some(existing) = self.shop_conv(shop, buyer) {
            return Err(StoreError::ConvExists(existing));
        }
        self.create_conv(conv, ConvKind::Shop, Some(shop), &[buyer])
    }

    /// Creates the direct conversation of two users (fails with `ConvExists` if they have one).
    pub fn create_direct_conv(&mut self, conv: ConvId, a: Uid, b: Uid) -> Result<(), StoreError> {
        if let Some(existing) = self.direct_conv(a, b) {
            return Err(StoreError::ConvExists(existing));
        }
        self.create_conv(conv, ConvKind::Direct, None, &[a, b])
    }

    /// Creates a group conversation with these members.
    pub fn create_group_conv(&mut self, conv: ConvId, members: &[Uid]) -> Result<(), StoreError> {
        if members.len() > self.config.members_max {
            return Err(StoreError::TooLarge {
                what: "members",
                len: members.len(),
                max: self.config.members_max,
            });
        }
        self.create_conv(conv, ConvKind::Group, None, members)
    }

    fn create_conv(
        &mut self,
        conv: ConvId,
        kind: ConvKind,
        shop: Option<ShopId>,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        if self.state.convs.contains_key(&conv) {
            return Err(StoreError::ConvExists(conv));
        }
        self.append_state(Record::Conv {
            conv,
            kind,
            shop,
            members: SmallVec::from_slice(members),
        })
    }

    /// Adds a member (for a shop conversation, an agent assignment). `Ok(false)` if the user
    /// is a member already.
    pub fn add_member(&mut self, conv: ConvId, uid: Uid) -> Result<bool, StoreError> {
        self.change_member(conv, uid, true)
    }

    /// Removes a member (for a shop conversation, ends an agent assignment). `Ok(false)` if
    /// the user was not a member.
    pub fn remove_member(&mut self, conv: ConvId, uid: Uid) -> Result<bool, StoreError> {
        self.change_member(conv, uid, false)
    }

    fn change_member(&mut self, conv: ConvId, uid: Uid, added: bool) -> Result<bool, StoreError> {
        let c = self.conv(conv).ok_or(StoreError::UnknownConv(conv))?;
        if c.members.contains(&uid) == added {
            return Ok(false);
        }
        if added && c.members.len() >= self.config.members_max {
            return Err(StoreError::TooLarge {
                what: "members",
                len: c.members.len() + 1,
                max: self.config.members_max,
            });
        }
        self.append_state(Record::Member { conv, uid, added })?;
        Ok(true)
    }

    /// Moves `uid`'s read cursor in `conv` up to `seq` (clamped to the last seq; never
    /// backwards) and returns the cursor after the request.
    pub fn mark_read(&mut self, conv: ConvId, uid: Uid, seq: Seq) -> Result<Seq, StoreError> {
        let c = self.conv(conv).ok_or(StoreError::UnknownConv(conv))?;
        let target = Seq(seq.0.min(c.seq));
        let current = c.cursor(uid);
        if target <= current {
            return Ok(current);
        }
        self.append_state(Record::Cursor {
            conv,
            uid,
            seq: target,
        })?;
        Ok(target)
    }

    // ---- snapshots and retention ----

    /// Flushes the log and writes a snapshot of the state at the tail, so the next open
    /// replays only what follows. Keeps [`StoreConfig::snapshots_kept`] snapshots.
    pub fn snapshot(&mut self) -> Result<Position, StoreError> {
        // The snapshot must never describe records a power loss could still take away.
        self.sync()?;
        let pos = self.tail();
        snapshot::write(&self.config.dir, &self.state, pos)?;
        self.snapshot = Some(pos);
        for (_, path) in snapshot::list(&self.config.dir)?
            .into_iter()
            .skip(self.config.snapshots_kept.max(1))
        {
            let _ = fs::remove_file(path);
        }
        Ok(pos)
    }

    /// Deletes whole sealed segments whose newest message is older than
    /// [`StoreConfig::retention_age_ms`], and the oldest ones while the log is larger than
    /// [`StoreConfig::retention_bytes_max`]. State records in them live on in a snapshot,
    /// taken first if the newest one does not cover them.
    pub fn retain(&mut self, now_ms: u64) -> Result<Retained, StoreError> {
        let mut total: u64 = self.segments.iter().map(|s| s.capacity() as u64).sum();
        let mut count = 0;
        // The active segment (the last) is never deleted.
        for seg in self.segments.range(..self.segments.len() - 1) {
            // A segment without messages has nothing to age: only state, kept in snapshots.
            let old = self
                .config
                .retention_age_ms
                .is_some_and(|age| seg.newest_ts_ms.saturating_add(age) < now_ms);
            let big = self
                .config
                .retention_bytes_max
                .is_some_and(|max| total > max);
            if !(old || big) {
                break;
            }
            total -= seg.capacity() as u64;
            count += 1;
        }
        if count == 0 {
            return Ok(Retained::default());
        }
        let kept_from = segment::position(self.segments[count].id, 0);
        if self.snapshot.map_or(true, |pos| pos < kept_from) {
            self.snapshot()?;
        }
        let mut retained = Retained::default();
        for _ in 0..count {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            let path = seg.path.clone();
            retained.bytes += seg.capacity() as u64;
            retained.segments += 1;
            drop(seg);
            fs::remove_file(&path).map_err(|e| StoreError::io("delete segment", &path, e))?;
        }
        os::sync_dir(&self.config.dir)
            .map_err(|e| StoreError::io("sync directory", &self.config.dir, e))?;
        // Snapshots from before the kept segments can no longer be replayed from.
        for (pos, path) in snapshot::list(&self.config.dir)? {
            if pos < kept_from {
                let _ = fs::remove_file(path);
            }
        }
        Ok(retained)
    }

    /// Re-reads every record in the log and checks its CRC (a scrub, e.g. for an operator's
    /// `verify` command). Returns the records and bytes checked, or the first bad record.
    pub fn verify(&self) -> Result<(u64, u64), StoreError> {
        let (mut records, mut bytes) = (0, 0);
        for seg in &self.segments {
            let mut off = segment::HEADER_BYTES;
            loop {
                match record::decode(&seg.map, off) {
                    Ok(Some((_, len))) => {
                        records += 1;
                        bytes += len as u64;
                        off += len;
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        return Err(StoreError::corrupt(segment::position(seg.id, off), reason))
                    }
                }
            }
        }
        Ok((records, bytes))
    }

    /// Gauges for metrics.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            segments: self.segments.len(),
            segment_bytes: self.segments.iter().map(|s| s.capacity() as u64).sum(),
            conversations: self.state.convs.len(),
            devices: self.state.devices.len(),
            cmid_entries: self.state.cmids.order.len(),
            tail: self.tail(),
            snapshot: self.snapshot,
        }
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Do not leave a thread creating files in a directory its owner may be removing.
        self.preparer.abandon();
    }
}

// The gateway moves each shard's store into the shard's thread.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
};

/// The offset of the first record at or after `from` that checks out, if any.
fn resync(seg: &[u8], from: usize) -> Option<usize> {
    (from..seg.len().saturating_sub(record::HEADER_BYTES))
        .step_by(record::ALIGN)
        .find(|&off| matches!(record::decode(seg, off), Ok(Some(_))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;
    use proptest::prelude::*;
    use std::path::Path;

    const BUYER: Uid = Uid::new(UidKind::Buyer, 1);
    const AGENT: Uid = Uid::new(UidKind::Agent, 2);

    fn device() -> DeviceId {
        DeviceId::from_u64(42).unwrap()
    }

    /// Small segments and a small stride, so tests cross both often.
    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            segment_bytes: 64 << 10,
            index_stride: 4,
            body_bytes_max: 4 << 10,
            ..StoreConfig::new(dir)
        }
    }

    fn open(config: StoreConfig) -> (Store, RecoveryReport) {
        Store::open(config).unwrap()
    }

    fn send(store: &mut Store, conv: u64, cmid: &str, body: &[u8]) -> Appended {
        store
            .append_message(&NewMessage {
                conv: ConvId(conv),
                sender: BUYER,
                device: device(),
                cmid: cmid.as_bytes(),
                kind: b"text",
                body,
                ts_ms: 1_000,
            })
            .unwrap()
    }

    fn seqs(msgs: &[MessageRef<'_>]) -> Vec<u64> {
        msgs.iter().map(|m| m.seq.0).collect()
    }

    #[test]
    fn seqs_count_from_one_per_conversation_and_history_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        store.create_direct_conv(ConvId(2), BUYER, AGENT).unwrap();
        for i in 0..1_000 {
            let conv = 1 + i % 2;
            let got = send(&mut store, conv, &format!("m{i}"), &[i as u8; 100]);
            assert_eq!(
                got,
                Appended::Stored {
                    seq: Seq(i / 2 + 1)
                }
            );
        }
        store.commit().unwrap();
        assert!(store.segments.len() > 2, "the test must cross segments");
        let c = ConvId(1);
        assert_eq!(
            seqs(&store.history(c, HistoryFrom::Newest, 3).unwrap()),
            [498, 499, 500]
        );
        assert_eq!(
            seqs(&store.history(c, HistoryFrom::Before(Seq(10)), 4).unwrap()),
            [6, 7, 8, 9]
        );
        assert_eq!(
            seqs(&store.history(c, HistoryFrom::After(Seq(10)), 4).unwrap()),
            [11, 12, 13, 14]
        );
        assert_eq!(
            seqs(&store.history(c, HistoryFrom::After(Seq(498)), 50).unwrap()),
            [499, 500]
        );
        assert_eq!(
            seqs(&store.history(c, HistoryFrom::Before(Seq(3)), 50).unwrap()),
            [1, 2]
        );
        assert!(store
            .history(c, HistoryFrom::After(Seq(500)), 5)
            .unwrap()
            .is_empty());
        let m = store.history(c, HistoryFrom::After(Seq(0)), 1).unwrap()[0];
        assert_eq!(
            (m.body, m.cmid, m.kind),
            (&[0u8; 100][..], &b"m0"[..], &b"text"[..])
        );
        assert!(matches!(
            store.history(ConvId(9), HistoryFrom::Newest, 1),
            Err(StoreError::UnknownConv(_))
        ));
    }

    #[test]
    fn a_repeated_cmid_returns_the_original_seq_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        send(&mut store, 1, "a", b"x");
        send(&mut store, 1, "b", b"y");
        let tail = store.tail();
        assert_eq!(
            send(&mut store, 1, "a", b"x"),
            Appended::Duplicate {
                conv: ConvId(1),
                seq: Seq(1)
            }
        );
        assert_eq!(store.tail(), tail);
        store.commit().unwrap();
        drop(store);
        // The window survives a restart.
        let (mut store, _) = open(config(dir.path()));
        assert!(matches!(
            send(&mut store, 1, "b", b"y"),
            Appended::Duplicate { seq: Seq(2), .. }
        ));
    }

    #[test]
    fn rejects_fields_over_their_limits_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        let tail = store.tail();
        let body = vec![0u8; 4097];
        let err = store
            .append_message(&NewMessage {
                conv: ConvId(1),
                sender: BUYER,
                device: device(),
                cmid: b"c",
                kind: b"text",
                body: &body,
                ts_ms: 0,
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { what: "body", .. }));
        assert_eq!(store.tail(), tail);
        assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(0));
    }

    #[test]
    fn last_seq_is_published_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        let handle = store.last_seq_handle(ConvId(1)).unwrap();
        send(&mut store, 1, "a", b"x");
        assert_eq!(handle.load(Ordering::Acquire), 0);
        store.commit().unwrap();
        let reader = std::thread::spawn(move || handle.load(Ordering::Acquire));
        assert_eq!(reader.join().unwrap(), 1);
    }

    #[test]
    fn state_survives_restart_with_and_without_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        let web = DeviceId::from_u64(1 << 46 | 5).unwrap();
        assert_eq!(
            store.register_device(BUYER, DeviceType::Web, web).unwrap(),
            web
        );
        let other = DeviceId::from_u64(6).unwrap();
        assert_eq!(
            store
                .register_device(BUYER, DeviceType::Web, other)
                .unwrap(),
            web,
            "a device keeps its id"
        );
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        assert!(matches!(
            store.create_shop_conv(ConvId(3), ShopId(7), BUYER),
            Err(StoreError::ConvExists(ConvId(1)))
        ));
        store.create_direct_conv(ConvId(2), AGENT, BUYER).unwrap();
        assert!(store.add_member(ConvId(1), AGENT).unwrap());
        for i in 0..10 {
            send(&mut store, 1, &format!("m{i}"), b"hello");
        }
        assert_eq!(store.mark_read(ConvId(1), AGENT, Seq(99)).unwrap(), Seq(10));
        assert_eq!(store.mark_read(ConvId(1), AGENT, Seq(3)).unwrap(), Seq(10));
        store.commit().unwrap();

        let check = |store: &Store| {
            assert_eq!(store.device(BUYER, DeviceType::Web), Some(web));
            assert_eq!(store.device_max(), Some(web));
            assert_eq!(store.conv_max(), Some(ConvId(2)));
            assert_eq!(store.shop_conv(ShopId(7), BUYER), Some(ConvId(1)));
            assert_eq!(store.direct_conv(BUYER, AGENT), Some(ConvId(2)));
            let c = store.conv(ConvId(1)).unwrap();
            assert_eq!(c.members(), &[BUYER, AGENT]);
            assert_eq!(c.cursor(AGENT), Seq(10));
            assert_eq!(c.cursor(BUYER), Seq(10), "a sender has read what he wrote");
            let mut convs = store.convs_of(AGENT).to_vec();
            convs.sort_unstable();
            assert_eq!(convs, [ConvId(1), ConvId(2)]);
            let newest = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
            assert_eq!(seqs(&newest), (1..=10).collect::<Vec<_>>());
            assert_eq!(
                store
                    .last_seq_handle(ConvId(1))
                    .unwrap()
                    .load(Ordering::Acquire),
                10
            );
        };
        check(&store);
        drop(store);
        let (mut store, report) = open(config(dir.path()));
        assert_eq!(report.snapshot, None);
        check(&store);
        let pos = store.snapshot().unwrap();
        assert!(store.remove_member(ConvId(1), AGENT).unwrap());
        assert!(store.add_member(ConvId(1), AGENT).unwrap());
        store.commit().unwrap();
        drop(store);
        let (store, report) = open(config(dir.path()));
        assert_eq!(report.snapshot, Some(pos));
        assert_eq!(
            report.records, 2,
            "only the records after the snapshot replay"
        );
        check(&store);
    }

    #[test]
    fn retention_deletes_old_segments_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            retention_bytes_max: Some(3 * (64 << 10)),
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg.clone());
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        store.create_direct_conv(ConvId(2), BUYER, AGENT).unwrap();
        for i in 0..2_000 {
            send(&mut store, 1, &format!("m{i}"), &[1; 200]);
        }
        store.commit().unwrap();
        let before = store.stats();
        let retained = store.retain(0).unwrap();
        assert_eq!(retained.segments, before.segments - 3);
        let after = store.stats();
        assert_eq!(after.segments, 3);
        assert_eq!(after.segment_bytes, 3 * (64 << 10));
        assert_eq!(after.conversations, 2);
        assert_eq!(after.cmid_entries, 2_000);
        assert!(after.snapshot.is_some(), "retention took a snapshot first");
        let oldest = store
            .history(ConvId(1), HistoryFrom::After(Seq(0)), 10)
            .unwrap();
        assert!(
            oldest[0].seq.0 > 1,
            "the oldest messages went with their segments"
        );
        assert_eq!(
            seqs(&store.history(ConvId(1), HistoryFrom::Newest, 2).unwrap()),
            [1999, 2000]
        );
        drop(store);
        let (mut store, report) = open(cfg);
        assert!(report.snapshot.is_some());
        assert_eq!(store.direct_conv(AGENT, BUYER), Some(ConvId(2)));
        assert_eq!(
            send(&mut store, 1, "next", b""),
            Appended::Stored { seq: Seq(2001) }
        );
    }

    #[test]
    fn age_retention_spares_recent_segments() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            retention_age_ms: Some(10_000),
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg);
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..600 {
            send(&mut store, 1, &format!("m{i}"), &[1; 200]);
        }
        store.commit().unwrap();
        assert_eq!(store.retain(1_000 + 10_000).unwrap().segments, 0);
        let n = store.segments.len();
        assert_eq!(store.retain(1_000 + 10_001).unwrap().segments, n - 1);
    }

    /// The files of a log directory and their bytes.
    type Files = Vec<(PathBuf, Vec<u8>)>;

    /// Files of a log directory, to restore it between damage experiments.
    fn save(dir: &Path) -> Files {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
    }

    fn restore(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
        for e in fs::read_dir(dir).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        for (p, bytes) in files {
            fs::write(p, bytes).unwrap();
        }
    }

    /// (start, unpadded len) of every record in a segment file.
    fn records_of(seg: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut off = segment::HEADER_BYTES;
        while let Ok(Some((_, padded))) = record::decode(seg, off) {
            let len = u32::from_le_bytes(seg[off..off + 4].try_into().unwrap()) as usize;
            out.push((off, len));
            off += padded;
        }
        out
    }

    /// Builds a log with 5 committed and 3 uncommitted messages; returns the saved files, the
    /// segment path and the records.
    fn torn_fixture(dir: &Path) -> (Files, PathBuf, Vec<(usize, usize)>) {
        let (mut store, _) = open(config(dir));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..5 {
            send(&mut store, 1, &format!("c{i}"), b"committed");
        }
        store.commit().unwrap();
        for i in 5..8 {
            send(&mut store, 1, &format!("c{i}"), b"in flight");
        }
        let path = store.segments[0].path.clone();
        drop(store);
        let files = save(dir);
        let seg = &files.iter().find(|(p, _)| *p == path).unwrap().1;
        let records = records_of(seg);
        assert_eq!(records.len(), 9, "conversation + 8 messages");
        (files, path, records)
    }

    #[test]
    fn torn_tail_at_every_byte_keeps_every_committed_record() {
        let dir = tempfile::tempdir().unwrap();
        let (files, path, records) = torn_fixture(dir.path());
        let first_uncommitted = records[6].0;
        let end = records[8].0 + records[8].1;
        for cut in first_uncommitted..end {
            restore(dir.path(), &files);
            // The write stopped at `cut`: nothing after it reached the file.
            let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
            seg[cut..].fill(0);
            fs::write(&path, &seg).unwrap();
            let (store, report) = open(config(dir.path()));
            let whole = records[6..].iter().filter(|(s, l)| s + l <= cut).count() as u64;
            let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
            assert_eq!(
                seqs(&msgs),
                (1..=5 + whole).collect::<Vec<_>>(),
                "cut {cut}"
            );
            // Recovery reports a cut exactly when a record was torn in its middle.
            let inside = records[6..].iter().any(|(s, l)| *s < cut && cut < s + l);
            assert_eq!(report.truncated.is_some(), inside, "cut {cut}");
        }
    }

    #[test]
    fn corrupt_tail_at_every_byte_is_cut_off_after_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let (files, path, records) = torn_fixture(dir.path());
        let first_uncommitted = records[6].0;
        let end = records[8].0 + records[8].1;
        for at in first_uncommitted..end {
            restore(dir.path(), &files);
            let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
            seg[at] ^= 0x5a;
            fs::write(&path, &seg).unwrap();
            let (mut store, report) = open(config(dir.path()));
            let hit = records.iter().position(|(s, l)| (*s..s + l).contains(&at));
            // Records before the damaged one stay; it and all after it are cut.
            let kept = hit.map_or(8, |i| i as u64 - 1);
            let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
            assert_eq!(seqs(&msgs), (1..=kept).collect::<Vec<_>>(), "byte {at}");
            assert_eq!(report.truncated.is_some(), hit.is_some(), "byte {at}");
            // The cut tail never comes back: the next append takes the next seq, and a
            // restart sees exactly what is there.
            assert_eq!(
                send(&mut store, 1, "after", b"x"),
                Appended::Stored { seq: Seq(kept + 1) }
            );
            store.commit().unwrap();
            drop(store);
            let (store, report) = open(config(dir.path()));
            assert_eq!(report.truncated, None);
            let n = store
                .history(ConvId(1), HistoryFrom::Newest, 50)
                .unwrap()
                .len();
            assert_eq!(n as u64, kept + 1);
        }
    }

    #[test]
    fn power_loss_leaving_holes_after_the_last_commit_loses_nothing_committed() {
        // Under `always`, what a power loss leaves of the records after the last commit is
        // any subset of their pages: simulate each page missing in turn, with the pages after
        // it (holding whole records) present.
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            fsync: FsyncPolicy::Always,
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg.clone());
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..50 {
            send(&mut store, 1, &format!("c{i}"), &[b'c'; 300]);
        }
        store.commit().unwrap();
        let committed_end = segment::offset_of(store.tail());
        for i in 50..120 {
            send(&mut store, 1, &format!("u{i}"), &[b'u'; 300]);
        }
        let path = store.segments[0].path.clone();
        let uncommitted_end = store.segments[0].end;
        assert_eq!(store.segments.len(), 1, "the test stays in one segment");
        drop(store);
        let files = save(dir.path());
        let first_page = committed_end / 4096 * 4096;
        for page in (first_page..uncommitted_end).step_by(4096) {
            restore(dir.path(), &files);
            let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
            // The part of the page after the commit did not reach the disk.
            let from = page.max(committed_end);
            seg[from..page + 4096].fill(0);
            fs::write(&path, &seg).unwrap();
            let (store, _) = open(cfg.clone());
            let msgs = store
                .history(ConvId(1), HistoryFrom::After(Seq(0)), 200)
                .unwrap();
            assert!(
                msgs.len() >= 50,
                "page {page}: a committed message was lost"
            );
            assert!(msgs
                .iter()
                .enumerate()
                .all(|(i, m)| m.seq.0 == i as u64 + 1));
            assert!(msgs[..50].iter().all(|m| m.body == [b'c'; 300]));
        }
    }

    #[test]
    fn history_returns_at_most_the_configured_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..300 {
            send(&mut store, 1, &format!("m{i}"), b"x");
        }
        let msgs = store
            .history(ConvId(1), HistoryFrom::Newest, 10_000)
            .unwrap();
        assert_eq!(msgs.len(), 200);
        assert_eq!(msgs[0].seq, Seq(101));
    }

    #[test]
    fn corruption_below_the_acknowledged_end_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let (files, path, records) = torn_fixture(dir.path());
        // Damage the second committed message.
        let (start, _) = records[2];
        for at in [start, start + 20, start + 70] {
            restore(dir.path(), &files);
            let mut seg = files.iter().find(|(p, _)| *p == path).unwrap().1.clone();
            seg[at] ^= 0x01;
            fs::write(&path, &seg).unwrap();
            let err = Store::open(config(dir.path())).err().unwrap();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            // The operator may skip it; the message is lost, everything else is there.
            let (store, report) = open(StoreConfig {
                skip_corrupt: true,
                ..config(dir.path())
            });
            assert_eq!(report.skipped.len(), 1);
            let msgs = store.history(ConvId(1), HistoryFrom::Newest, 50).unwrap();
            assert_eq!(seqs(&msgs), [1, 3, 4, 5, 6, 7, 8]);
        }
    }

    #[test]
    #[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
    fn disk_full_fails_appends_and_harms_nothing() {
        // A small tmpfs is a real full disk; mounting one needs root.
        let mnt = tempfile::tempdir().unwrap();
        let target = mnt.path().to_str().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", target])
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "mounting a tmpfs failed: this test needs root");
        let result = std::panic::catch_unwind(|| {
            let dir = mnt.path().join("log");
            let cfg = StoreConfig {
                history_limit_max: usize::MAX,
                ..config(&dir)
            };
            let (mut store, _) = open(cfg.clone());
            store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
            let mut stored = 0u64;
            let err = loop {
                let r = store.append_message(&NewMessage {
                    conv: ConvId(1),
                    sender: BUYER,
                    device: device(),
                    cmid: format!("m{stored}").as_bytes(),
                    kind: b"text",
                    body: &[7; 1000],
                    ts_ms: 0,
                });
                match r {
                    Ok(_) => stored += 1,
                    Err(e) => break e,
                }
                assert!(stored < 10_000, "the disk never filled");
            };
            assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
            assert!(err.is_unavailable());
            store.commit().unwrap();
            // Everything stored before is intact, after a restart too.
            drop(store);
            let (store, _) = open(cfg);
            let msgs = store
                .history(ConvId(1), HistoryFrom::Newest, 10_000)
                .unwrap();
            assert_eq!(msgs.len() as u64, stored);
            assert!(msgs.iter().all(|m| m.body == [7; 1000]));
        });
        let _ = std::process::Command::new("umount").arg(target).status();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn verify_checks_every_record_and_names_the_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..500 {
            send(&mut store, 1, &format!("m{i}"), &[3; 150]);
        }
        store.commit().unwrap();
        assert_eq!(store.verify().unwrap().0, 501);
        let seg = &mut store.segments[1];
        seg.map[segment::HEADER_BYTES + 100] ^= 1;
        let bad = segment::position(seg.id, segment::HEADER_BYTES);
        assert!(matches!(
            store.verify(),
            Err(StoreError::Corrupt { position, .. }) if position == bad
        ));
    }

    #[test]
    fn interval_policy_flushes_only_when_the_interval_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 3_600_000,
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg);
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        send(&mut store, 1, "a", b"x");
        store.commit().unwrap();
        assert!(store.synced < store.tail(), "an hour has not passed");
        // Committed all the same: the last seq is published.
        let handle = store.last_seq_handle(ConvId(1)).unwrap();
        assert_eq!(handle.load(Ordering::Acquire), 1);
        store.sync().unwrap();
        assert_eq!(store.synced, store.tail());
    }

    #[test]
    fn a_damaged_snapshot_falls_back_to_an_older_one_or_a_full_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        send(&mut store, 1, "a", b"x");
        let older = store.snapshot().unwrap();
        send(&mut store, 1, "b", b"y");
        let newer = store.snapshot().unwrap();
        send(&mut store, 1, "c", b"z");
        store.commit().unwrap();
        drop(store);
        let newest = dir.path().join(snapshot::file_name(newer));
        let mut bytes = fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&newest, &bytes).unwrap();
        let (store, report) = open(config(dir.path()));
        assert_eq!(report.snapshot, Some(older));
        assert_eq!(report.snapshots_rejected.len(), 1);
        assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(3));
        drop(store);
        fs::remove_file(dir.path().join(snapshot::file_name(older))).unwrap();
        let (store, report) = open(config(dir.path()));
        assert_eq!(report.snapshot, None);
        assert_eq!(store.conv(ConvId(1)).unwrap().last_seq(), Seq(3));
    }

    #[test]
    fn refuses_to_start_without_a_segment_or_the_snapshot_that_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            retention_bytes_max: Some(2 * (64 << 10)),
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg.clone());
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..1_000 {
            send(&mut store, 1, &format!("m{i}"), &[1; 200]);
        }
        store.commit().unwrap();
        let middle = store.segments[1].path.clone();
        assert!(store.retain(0).unwrap().segments > 0);
        drop(store);
        let snapshots = snapshot::list(dir.path()).unwrap();
        assert_eq!(snapshots.len(), 1);
        fs::remove_file(&snapshots[0].1).unwrap();
        assert!(matches!(
            Store::open(cfg.clone()),
            Err(StoreError::Corrupt { .. })
        ));

        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(config(dir.path()));
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..1_000 {
            send(&mut store, 1, &format!("m{i}"), &[1; 200]);
        }
        let middle_name = middle.file_name().unwrap().to_owned();
        drop(store);
        fs::remove_file(dir.path().join(middle_name)).unwrap();
        let err = Store::open(config(dir.path())).err().unwrap();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn group_and_member_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = open(StoreConfig {
            members_max: 3,
            ..config(dir.path())
        });
        let users: Vec<Uid> = (0..4).map(|i| Uid::new(UidKind::Service, i)).collect();
        assert!(matches!(
            store.create_group_conv(ConvId(1), &users),
            Err(StoreError::TooLarge {
                what: "members",
                ..
            })
        ));
        assert!(matches!(
            store.create_group_conv(ConvId(1), &[users[0], users[0]]),
            Err(StoreError::Invalid(_))
        ));
        store.create_group_conv(ConvId(1), &users[..3]).unwrap();
        assert!(matches!(
            store.add_member(ConvId(1), users[3]),
            Err(StoreError::TooLarge { .. })
        ));
        assert!(!store.remove_member(ConvId(1), users[3]).unwrap());
        assert!(store.remove_member(ConvId(1), users[0]).unwrap());
        assert!(store.add_member(ConvId(1), users[3]).unwrap());
        assert!(matches!(
            store.create_direct_conv(ConvId(2), users[1], users[1]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_member(ConvId(9), users[0]),
            Err(StoreError::UnknownConv(ConvId(9)))
        ));
    }

    #[test]
    fn always_policy_flushes_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            fsync: FsyncPolicy::Always,
            ..config(dir.path())
        };
        let (mut store, _) = open(cfg.clone());
        store.create_shop_conv(ConvId(1), ShopId(7), BUYER).unwrap();
        for i in 0..64 {
            send(&mut store, 1, &format!("m{i}"), b"batch");
        }
        assert!(store.synced < store.tail());
        store.commit().unwrap();
        assert_eq!(store.synced, store.tail());
        assert_eq!(store.segments[0].acked_end(), store.segments[0].end);
    }

    /// What the model of the store does.
    #[derive(Debug, Clone)]
    enum Op {
        Send {
            conv: u8,
            cmid: u8,
            body: u8,
        },
        Read {
            conv: u8,
            from: u8,
            at: u8,
            limit: u8,
        },
        Cursor {
            conv: u8,
            seq: u8,
        },
        Commit,
        Snapshot,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..4, any::<u8>(), any::<u8>())
                .prop_map(|(conv, cmid, body)| Op::Send { conv, cmid, body }),
            4 => (0u8..4, 0u8..3, any::<u8>(), 0u8..40)
                .prop_map(|(conv, from, at, limit)| Op::Read { conv, from, at, limit }),
            1 => (0u8..4, any::<u8>()).prop_map(|(conv, seq)| Op::Cursor { conv, seq }),
            2 => Just(Op::Commit),
            1 => Just(Op::Snapshot),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random interleavings of appends, reads, snapshots and restarts agree with a plain
        /// in-memory model.
        #[test]
        fn store_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..150)) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = StoreConfig { index_stride: 3, ..config(dir.path()) };
            let (mut store, _) = open(cfg.clone());
            for c in 0..4u64 {
                store.create_shop_conv(ConvId(c), ShopId(c), BUYER).unwrap();
            }
            // Per conversation, the bodies by seq - 1; per cmid, its (conv, seq).
            let mut model: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
            let mut cmids = std::collections::HashMap::new();
            let mut cursors = [0u64; 4];
            for op in ops {
                match op {
                    Op::Send { conv, cmid, body } => {
                        let body = vec![body; usize::from(body) * 3];
                        let cmid = format!("{cmid}");
                        let got = send(&mut store, u64::from(conv), &cmid, &body);
                        let want = match cmids.get(&cmid) {
                            Some(&(c, s)) => Appended::Duplicate { conv: ConvId(c), seq: Seq(s) },
                            None => {
                                let list = &mut model[usize::from(conv)];
                                list.push(body);
                                let seq = list.len() as u64;
                                cmids.insert(cmid, (u64::from(conv), seq));
                                cursors[usize::from(conv)] = seq;
                                Appended::Stored { seq: Seq(seq) }
                            }
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Read { conv, from, at, limit } => {
                        let list = &model[usize::from(conv)];
                        let last = list.len() as u64;
                        let at = u64::from(at) % (last + 2);
                        let k = u64::from(limit);
                        let (from, lo, hi) = match from {
                            0 => (HistoryFrom::Newest, last.saturating_sub(k) + 1, last),
                            1 if at == 0 => (HistoryFrom::Before(Seq(0)), last.saturating_sub(k) + 1, last),
                            1 => {
                                let hi = (at - 1).min(last);
                                (HistoryFrom::Before(Seq(at)), hi.saturating_sub(k) + 1, hi)
                            }
                            _ => (HistoryFrom::After(Seq(at)), at + 1, (at + k).min(last)),
                        };
                        let want: Vec<(u64, &[u8])> = if k == 0 { Vec::new() } else {
                            (lo..=hi).map(|s| (s, list[s as usize - 1].as_slice())).collect()
                        };
                        let got = store.history(ConvId(u64::from(conv)), from, usize::from(limit)).unwrap();
                        let got: Vec<(u64, &[u8])> = got.iter().map(|m| (m.seq.0, m.body)).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Cursor { conv, seq } => {
                        let c = usize::from(conv);
                        let want = (u64::from(seq).min(model[c].len() as u64)).max(cursors[c]);
                        cursors[c] = want;
                        let got = store.mark_read(ConvId(u64::from(conv)), BUYER, Seq(u64::from(seq))).unwrap();
                        prop_assert_eq!(got, Seq(want));
                    }
                    Op::Commit => store.commit().unwrap(),
                    Op::Snapshot => { store.snapshot().unwrap(); }
                    Op::Restart => {
                        drop(store);
                        store = open(cfg.clone()).0;
                    }
                }
            }
            for (c, list) in model.iter().enumerate() {
                let conv = store.conv(ConvId(c as u64)).unwrap();
                prop_assert_eq!(conv.last_seq(), Seq(list.len() as u64));
                prop_assert_eq!(conv.cursor(BUYER), Seq(cursors[c]));
            }
        }
    }
}
