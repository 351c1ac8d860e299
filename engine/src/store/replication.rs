//! Replication: what a partition's leader and its followers do to one log (issue 14,
//! docs/storage.md "Replication").
//!
//! A follower's log holds the leader's bytes at the leader's positions: the leader reads whole
//! records from a position ([`Store::read_raw`], a bounded chunk that stops at a segment's
//! end), the follower appends them at the same position ([`Store::append_raw`]), checking
//! every record (its CRC, and that it applies to the state, as replay does) and starting the
//! next segment, with the same id, where the leader started it. So the follower's state is
//! always the state of a prefix of the leader's log, and a follower that takes the lead has a
//! log like any other.
//!
//! The **epoch history** (Kafka's leader-epoch cache) says which leader epoch wrote which
//! stretch of the log: a list of (epoch, start position), ascending in both, kept in the file
//! `epochs` of the log's directory (rewritten atomically at each change; one line per epoch,
//! `EPOCH POSITION` in decimal). A follower that rejoins a new leader asks it where its own
//! last epoch ends in the leader's history ([`Store::epoch_end`]) and cuts its log there
//! ([`Store::truncated`]) if it wrote more: what an old leader wrote past the new leader's
//! log was never acknowledged, and goes.

use std::fs;
use std::io::Write;

use super::record;
use super::segment;
use super::{os, snapshot, FsyncPolicy, Position, RecoveryReport, Store, StoreError};

/// The file holding a log's epoch history.
pub const EPOCHS_FILE: &str = "epochs";

/// Most epochs a log's history keeps: older ones are forgotten (a follower that far behind
/// truncates to the oldest one kept and catches up from there).
pub const EPOCHS_KEPT_MAX: usize = 1_000;

/// Whole records read from a log for a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawChunk {
    /// Where the records start: the position asked, or the start of the next segment when
    /// the one asked ends there.
    pub at: Position,
    /// Whole records (empty when nothing follows the position yet).
    pub bytes: Vec<u8>,
}

impl RawChunk {
    /// The position after the chunk.
    pub fn end(&self) -> Position {
        self.at + self.bytes.len() as u64
    }
}

impl Store {
    /// Up to `max_bytes` of whole records from `from`, none at or past `stop` (the end of an
    /// epoch's stretch) nor past the end of `from`'s segment: when `from` is that end, the
    /// chunk starts at the next segment's first record. At least one record is read if one
    /// follows (even if it is longer than `max_bytes`: every record fits a frame). A position
    /// before the log's oldest segment (deleted by retention) is an error: a follower that far
    /// behind would need the snapshot, which is not shipped.
    pub fn read_raw(
        &self,
        from: Position,
        max_bytes: usize,
        stop: Position,
    ) -> Result<RawChunk, StoreError> {
        let mut at = from;
        let first = self.segments.front().map_or(0, |s| s.id);
        loop {
            let id = segment::segment_of(at);
            let seg = id
                .checked_sub(first)
                .and_then(|i| self.segments.get(usize::try_from(i).ok()?))
                .ok_or(StoreError::Invalid("the position is not in the log"))?;
            let off = segment::offset_of(at);
            if off < segment::HEADER_BYTES || off > seg.capacity() {
                return Err(StoreError::Invalid("the position is not in the log"));
            }
            let is_active = seg.id == self.active().id;
            let mut end = off;
            // Within this segment, and below `stop` if `stop` is in it.
            let limit = if segment::segment_of(stop) == id {
                segment::offset_of(stop).min(seg.capacity())
            } else {
                seg.capacity()
            };
            let active_end = if is_active { seg.end } else { seg.capacity() };
            while end < limit.min(active_end) {
                let Some(len) = record_len(&seg.map, end) else {
                    break;
                };
                if end + len > limit || (end > off && end + len - off > max_bytes) {
                    break;
                }
                end += len;
            }
            let sealed_end = !is_active && record_len(&seg.map, end).is_none();
            if end == off && sealed_end && stop > at {
                // The end of a sealed segment: the records go on in the next one.
                at = segment::position(id + 1, segment::HEADER_BYTES);
                continue;
            }
            return Ok(RawChunk {
                at,
                bytes: seg.map[off..end].to_vec(),
            });
        }
    }

    /// Appends `bytes`, whole records a leader read at `at`, at the same position: `at` is
    /// this log's tail, or the first record of the next segment (the leader started a new
    /// one there; it is created with the same id). Every record is checked as replay checks
    /// it (CRC, applies to the state); at the first that is not whole or does not apply,
    /// nothing from it on is kept and the error says where. Returns the new tail. Durable and
    /// acknowledgeable after the next [`Store::commit`], like any append.
    pub fn append_raw(&mut self, at: Position, bytes: &[u8]) -> Result<Position, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let tail = self.tail();
        let next_segment = segment::position(segment::segment_of(tail) + 1, segment::HEADER_BYTES);
        if at != tail && at != next_segment {
            return Err(StoreError::Invalid("raw records not at the log's tail"));
        }
        if bytes.is_empty() {
            return Ok(tail);
        }
        // Check the records' framing before anything is written or created.
        let mut off = 0;
        while off < bytes.len() {
            match record_len(bytes, off) {
                Some(len) if off + len <= bytes.len() => off += len,
                _ => return Err(StoreError::corrupt(at + off as u64, "not a whole record")),
            }
        }
        if at == next_segment {
            if self.active().end == segment::HEADER_BYTES {
                return Err(StoreError::Invalid(
                    "the leader rolled past an empty segment",
                ));
            }
            self.switch_segment()?;
        }
        let Some(active) = self.segments.back_mut() else {
            unreachable!("the log has an active segment");
        };
        let start = active.end;
        if start + bytes.len() > active.capacity() {
            return Err(StoreError::Invalid(
                "raw records do not fit the segment (another segment size than the leader's?)",
            ));
        }
        active.map[start..start + bytes.len()].copy_from_slice(bytes);
        let mut off = start;
        let end = start + bytes.len();
        let mut failed = None;
        while off < end {
            let pos = segment::position(active.id, off);
            match record::decode(&active.map, off) {
                Ok(Some((rec, len))) => {
                    if let Err(reason) = self.state.check_and_apply(&rec, pos, false) {
                        failed = Some((pos, reason));
                        break;
                    }
                    if let record::Record::Message(m) = &rec {
                        active.newest_ts_ms = active.newest_ts_ms.max(m.ts_ms);
                    }
                    off += len;
                }
                Ok(None) => {
                    failed = Some((pos, "zeros inside the raw records"));
                    break;
                }
                Err(reason) => {
                    failed = Some((pos, reason));
                    break;
                }
            }
        }
        // What did not check out never stays: stale bytes must not pass for records later.
        active.map[off..end].fill(0);
        active.end = off;
        self.prepare_next_if_half_full();
        match failed {
            None => Ok(self.tail()),
            Some((pos, reason)) => Err(StoreError::corrupt(pos, reason)),
        }
    }

    /// This log cut at `to` (a record boundary at or below the tail), reopened: everything
    /// from `to` on is zeroed or deleted, the acknowledged marks and the epoch history are
    /// lowered to it, snapshots past it are deleted, and the state is rebuilt by recovery
    /// (replay). Used by a follower whose log has records a new leader does not have.
    pub fn truncated(mut self, to: Position) -> Result<(Store, RecoveryReport), StoreError> {
        if to >= self.tail() {
            // Nothing to cut but epochs that start at the tail (they wrote nothing).
            let before = self.epochs.len();
            self.epochs.retain(|&(_, start)| start < to);
            if self.epochs.len() != before {
                self.write_epochs()?;
            }
            return Ok((self, RecoveryReport::default()));
        }
        let id = segment::segment_of(to);
        let first = self.segments.front().map_or(0, |s| s.id);
        let idx = id
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.segments.len())
            .ok_or(StoreError::Invalid("truncation below the log's start"))?;
        let off = segment::offset_of(to).max(segment::HEADER_BYTES);
        // Snapshots first: a crash halfway must not leave one describing records that are gone.
        for (pos, path) in snapshot::list(&self.config.dir)? {
            if pos > to {
                fs::remove_file(&path).map_err(|e| StoreError::io("delete snapshot", &path, e))?;
            }
        }
        self.epochs.retain(|&(_, start)| start < to);
        self.write_epochs()?;
        let dir = self.config.dir.clone();
        let is_last = idx + 1 == self.segments.len();
        let seg = &mut self.segments[idx];
        let acked = seg.acked_end().min(off);
        seg.set_acked_end(acked);
        let scan_end = if is_last {
            seg.end.max(off)
        } else {
            seg.capacity()
        };
        for chunk in seg.map[off..scan_end].chunks_mut(4096) {
            if chunk.iter().any(|&b| b != 0) {
                chunk.fill(0);
            }
        }
        seg.sync(seg.capacity())?;
        self.segments.truncate(idx + 1);
        // Later segments go, the one a preparer made ready after them included.
        self.config.preparer.abandon(&dir);
        self.next_asked = false;
        for later in segment::list(&dir)?.into_iter().filter(|&l| l > id) {
            let path = dir.join(segment::file_name(later));
            fs::remove_file(&path).map_err(|e| StoreError::io("delete segment", &path, e))?;
        }
        os::sync_dir(&dir).map_err(|e| StoreError::io("sync directory", &dir, e))?;
        let config = self.config.clone();
        drop(self);
        Store::open(config)
    }

    /// The epoch history: (epoch, start position), ascending.
    pub fn epochs(&self) -> &[(u64, Position)] {
        &self.epochs
    }

    /// The newest epoch that wrote to this log (0: none recorded).
    pub fn last_epoch(&self) -> u64 {
        self.epochs.last().map_or(0, |&(e, _)| e)
    }

    /// Records that `epoch` writes from `start` on (a leader from its tail when it takes the
    /// lead; a follower where the first records of that epoch arrive). An older or equal
    /// epoch than the last recorded changes nothing; an epoch that starts where the last one
    /// started replaces it (that one wrote nothing). Persisted before it returns.
    pub fn begin_epoch(&mut self, epoch: u64, start: Position) -> Result<(), StoreError> {
        if epoch <= self.last_epoch() {
            return Ok(());
        }
        while self.epochs.last().is_some_and(|&(_, s)| s >= start) {
            self.epochs.pop();
        }
        self.epochs.push((epoch, start));
        if self.epochs.len() > EPOCHS_KEPT_MAX {
            self.epochs.remove(0);
        }
        self.write_epochs()
    }

    /// Where `epoch`'s stretch of this log ends, as the leader answers a follower whose last
    /// epoch is `epoch`: the newest epoch of the history at or below it, and the start of the
    /// next epoch (or the tail, if it is the newest). Records before the first epoch of the
    /// history count as epoch 0.
    pub fn epoch_end(&self, epoch: u64) -> (u64, Position) {
        let i = self.epochs.partition_point(|&(e, _)| e <= epoch);
        let found = i.checked_sub(1).map_or(0, |j| self.epochs[j].0);
        let end = self.epochs.get(i).map_or(self.tail(), |&(_, start)| start);
        (found, end)
    }

    /// Where this log's stretch of epochs after `epoch` starts (the tail if none): a follower
    /// told that the leader knows nothing newer than `epoch` cuts its log there.
    pub fn start_after_epoch(&self, epoch: u64) -> Position {
        self.epochs
            .iter()
            .find(|&&(e, _)| e > epoch)
            .map_or(self.tail(), |&(_, start)| start)
    }

    fn write_epochs(&self) -> Result<(), StoreError> {
        let dir = &self.config.dir;
        let path = dir.join(EPOCHS_FILE);
        let tmp = dir.join("epochs.tmp");
        let mut text = String::new();
        for (epoch, start) in &self.epochs {
            text.push_str(&format!("{epoch} {start}\n"));
        }
        let durable = self.config.fsync != FsyncPolicy::Never;
        let result = fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                if durable {
                    f.sync_all()?;
                }
                Ok(())
            })
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| if durable { os::sync_dir(dir) } else { Ok(()) });
        result.map_err(|e| StoreError::io("write the epoch history", &path, e))
    }
}

/// Reads a log's epoch history (empty if it has none). Lines that do not parse, or that are not
/// ascending, make the file corrupt.
pub(super) fn read_epochs(dir: &std::path::Path) -> Result<Vec<(u64, Position)>, StoreError> {
    let path = dir.join(EPOCHS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read the epoch history", &path, e)),
    };
    let mut epochs: Vec<(u64, Position)> = Vec::new();
    for line in text.lines() {
        let parsed = line
            .split_once(' ')
            .and_then(|(e, p)| Some((e.parse().ok()?, p.parse().ok()?)));
        let Some((epoch, start)) = parsed else {
            return Err(StoreError::corrupt(
                0,
                "epochs: a line is not EPOCH POSITION",
            ));
        };
        if epochs.last().is_some_and(|&(e, s)| e >= epoch || s > start) {
            return Err(StoreError::corrupt(0, "epochs: not ascending"));
        }
        epochs.push((epoch, start));
    }
    Ok(epochs)
}

/// The padded length of the record at `off`, from its length field alone (no CRC: the
/// follower checks that); `None` at the end of the records or where no record fits.
fn record_len(seg: &[u8], off: usize) -> Option<usize> {
    let head = seg.get(off..off + record::HEADER_BYTES)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    (len >= record::HEADER_BYTES && off + len <= seg.len()).then(|| record::padded(len))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chinwag_protocol::{ConvId, DeviceId, Seq, Uid, UidKind};

    use super::*;
    use crate::store::{HistoryFrom, NewMessage, StoreConfig};

    const A: Uid = Uid::new(UidKind::Buyer, 1);
    const B: Uid = Uid::new(UidKind::Buyer, 2);
    const CONV: ConvId = ConvId(1 << 16);

    /// Small segments, so the logs cross several.
    fn open(dir: &Path) -> Store {
        let config = StoreConfig {
            segment_bytes: 64 << 10,
            segment_bytes_first: 64 << 10,
            body_bytes_max: 4 << 10,
            ..StoreConfig::new(dir)
        };
        Store::open(config).unwrap().0
    }

    fn send(store: &mut Store, cmid: &str, body_bytes: usize) -> Seq {
        let body = vec![b'x'; body_bytes];
        match store
            .append_message(&NewMessage {
                conv: CONV,
                sender: A,
                device: DeviceId::from_u64(42).unwrap(),
                cmid: cmid.as_bytes(),
                kind: b"text",
                body: &body,
                ts_ms: 1_000,
            })
            .unwrap()
        {
            crate::store::Appended::Stored { seq } => seq,
            other => panic!("not stored: {other:?}"),
        }
    }

    /// Copies the leader's log to the follower from the follower's tail, as the replication
    /// path does, in chunks of `chunk` bytes. Returns the chunks shipped.
    fn catch_up(leader: &Store, follower: &mut Store, chunk: usize) -> usize {
        let mut shipped = 0;
        loop {
            let raw = leader.read_raw(follower.tail(), chunk, u64::MAX).unwrap();
            if raw.bytes.is_empty() {
                return shipped;
            }
            let end = follower.append_raw(raw.at, &raw.bytes).unwrap();
            assert_eq!(end, raw.end());
            follower.commit().unwrap();
            shipped += 1;
        }
    }

    fn seqs(store: &Store) -> Vec<u64> {
        store
            .history(CONV, HistoryFrom::Newest, 200)
            .unwrap()
            .iter()
            .map(|m| m.seq.0)
            .collect()
    }

    /// The segments up to `last` (a prepared next one may or may not be there yet).
    fn log_bytes(dir: &Path, last: Position) -> Vec<Vec<u8>> {
        let mut ids = segment::list(dir).unwrap();
        ids.retain(|&id| id <= segment::segment_of(last));
        ids.sort_unstable();
        ids.iter()
            .map(|&id| {
                let mut bytes = fs::read(dir.join(segment::file_name(id))).unwrap();
                // The header's acked_end and newest ts are each log's own.
                bytes[40..56].fill(0);
                bytes
            })
            .collect()
    }

    #[test]
    fn a_follower_copies_the_leaders_records_at_the_same_positions_across_segments() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = open(ld.path());
        let mut follower = open(fd.path());
        leader.create_direct_conv(CONV, A, B).unwrap();
        for i in 0..60 {
            send(&mut leader, &i.to_string(), 3_000);
        }
        leader.commit().unwrap();
        assert!(
            segment::list(ld.path()).unwrap().len() >= 3,
            "crosses segments"
        );
        let chunks = catch_up(&leader, &mut follower, 16 << 10);
        assert!(chunks >= 8, "bounded chunks: {chunks}");
        assert_eq!(follower.tail(), leader.tail());
        assert_eq!(seqs(&follower), (1..=60).collect::<Vec<_>>());
        // Same bytes at the same positions: the segment files are equal but for the header
        // fields each log keeps for itself.
        follower.sync().unwrap();
        leader.sync().unwrap();
        let tail = leader.tail();
        let (lb, fb) = (log_bytes(ld.path(), tail), log_bytes(fd.path(), tail));
        assert_eq!(lb.len(), fb.len());
        assert!(lb == fb, "the logs differ");
        // A follower's log opens like any log and goes on as a leader's.
        drop(follower);
        let mut follower = open(fd.path());
        assert_eq!(follower.tail(), leader.tail());
        assert_eq!(send(&mut follower, "new", 10), Seq(61));
    }

    #[test]
    fn raw_records_elsewhere_than_the_tail_or_damaged_are_refused_and_nothing_is_kept() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = open(ld.path());
        let mut follower = open(fd.path());
        leader.create_direct_conv(CONV, A, B).unwrap();
        for i in 0..5 {
            send(&mut leader, &i.to_string(), 100);
        }
        let start = follower.tail();
        let raw = leader.read_raw(start, 1 << 20, u64::MAX).unwrap();
        assert!(follower.append_raw(start + 8, &raw.bytes).is_err(), "a gap");
        assert!(follower
            .append_raw(start, &raw.bytes[..raw.bytes.len() - 8])
            .is_err());
        let mut damaged = raw.bytes.clone();
        let last = damaged.len() - 20;
        damaged[last] ^= 0xff;
        assert!(matches!(
            follower.append_raw(start, &damaged),
            Err(StoreError::Corrupt { .. })
        ));
        // The whole records before the damaged one stayed; the rest is gone.
        assert_eq!(seqs(&follower), [1, 2, 3, 4]);
        let tail = follower.tail();
        let again = leader.read_raw(tail, 1 << 20, u64::MAX).unwrap();
        assert_eq!(again.at, tail);
        follower.append_raw(tail, &again.bytes).unwrap();
        assert_eq!(seqs(&follower), [1, 2, 3, 4, 5]);
        // A record that does not apply (a message of a conversation the follower lacks).
        let (od, _) = (tempfile::tempdir().unwrap(), ());
        let mut other = open(od.path());
        let raw = leader.read_raw(start, 1 << 20, u64::MAX).unwrap();
        let conv_len = record_len(&raw.bytes, 0).unwrap();
        assert!(other.append_raw(start, &raw.bytes[conv_len..]).is_err());
        assert_eq!(other.tail(), start);
    }

    #[test]
    fn a_chunk_stops_at_the_end_of_an_epochs_stretch() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.create_direct_conv(CONV, A, B).unwrap();
        send(&mut log, "1", 10);
        let cut = log.tail();
        log.begin_epoch(2, cut).unwrap();
        send(&mut log, "2", 10);
        let start = segment::position(1, segment::HEADER_BYTES);
        let first = log.read_raw(start, 1 << 20, cut).unwrap();
        assert_eq!(first.end(), cut);
        let second = log.read_raw(cut, 1 << 20, u64::MAX).unwrap();
        assert_eq!(second.end(), log.tail());
        assert!(log
            .read_raw(log.tail(), 1 << 20, u64::MAX)
            .unwrap()
            .bytes
            .is_empty());
    }

    #[test]
    fn the_epoch_history_persists_and_answers_where_an_epoch_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.create_direct_conv(CONV, A, B).unwrap();
        assert_eq!(log.epoch_end(5), (0, log.tail()), "no history: all epoch 0");
        let p1 = log.tail();
        log.begin_epoch(1, p1).unwrap();
        send(&mut log, "1", 10);
        let p3 = log.tail();
        log.begin_epoch(3, p3).unwrap();
        log.begin_epoch(2, p3).unwrap(); // older: ignored
        send(&mut log, "2", 10);
        // An epoch that wrote nothing is replaced by the next one at the same start.
        let p4 = log.tail();
        log.begin_epoch(4, p4).unwrap();
        log.begin_epoch(5, p4).unwrap();
        assert_eq!(log.epochs(), [(1, p1), (3, p3), (5, p4)]);
        assert_eq!(log.epoch_end(0), (0, p1));
        assert_eq!(log.epoch_end(1), (1, p3));
        assert_eq!(log.epoch_end(2), (1, p3), "the newest at or below");
        assert_eq!(log.epoch_end(5), (5, log.tail()));
        assert_eq!(log.start_after_epoch(1), p3);
        log.commit().unwrap();
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.epochs(), [(1, p1), (3, p3), (5, p4)]);
        fs::write(dir.path().join(EPOCHS_FILE), "3 10\n1 20\n").unwrap();
        drop(log);
        assert!(Store::open(StoreConfig::new(dir.path())).is_err());
    }

    /// Kafka's divergence case: the old leader wrote records its follower never got, then a
    /// new leader wrote others at the same positions. The old leader, following now, finds
    /// where its last epoch ends in the new leader's history, cuts its log there, and copies
    /// the rest: both logs end equal.
    #[test]
    fn a_follower_cuts_what_an_old_epoch_wrote_past_the_new_leaders_log_and_catches_up() {
        let (od, nd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut old = open(od.path());
        let mut new = open(nd.path());
        old.begin_epoch(1, old.tail()).unwrap();
        old.create_direct_conv(CONV, A, B).unwrap();
        for i in 0..10 {
            send(&mut old, &i.to_string(), 500);
        }
        old.commit().unwrap();
        catch_up(&old, &mut new, 4 << 10);
        new.begin_epoch(1, segment::position(1, segment::HEADER_BYTES))
            .unwrap();
        // The old leader goes on alone (never acknowledged: its follower did not have it).
        for i in 10..15 {
            send(&mut old, &format!("old{i}"), 500);
        }
        old.commit().unwrap();
        // The new leader takes over at epoch 2 and writes other messages.
        new.begin_epoch(2, new.tail()).unwrap();
        for i in 10..13 {
            send(&mut new, &format!("new{i}"), 700);
        }
        new.commit().unwrap();
        // The old leader follows: where does its last epoch (1) end on the new leader?
        let (epoch, end) = new.epoch_end(old.last_epoch());
        assert_eq!(epoch, 1);
        let cut = end.min(old.tail());
        let (mut old, _) = old.truncated(cut).unwrap();
        assert_eq!(old.tail(), cut);
        assert_eq!(seqs(&old).len(), 10, "its own extra records are gone");
        catch_up(&new, &mut old, 4 << 10);
        old.begin_epoch(2, end).unwrap();
        assert_eq!(old.tail(), new.tail());
        assert_eq!(seqs(&old), seqs(&new));
        assert_eq!(old.epochs(), new.epochs());
        old.sync().unwrap();
        new.sync().unwrap();
        let tail = new.tail();
        assert!(log_bytes(od.path(), tail) == log_bytes(nd.path(), tail));
        // After a reopen too (the truncation is on disk, acked marks included).
        drop(old);
        let old = open(od.path());
        assert_eq!(seqs(&old).len(), 13);
    }

    #[test]
    fn a_truncation_removes_the_snapshots_past_it_and_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        log.create_direct_conv(CONV, A, B).unwrap();
        for i in 0..10 {
            send(&mut log, &i.to_string(), 3_000);
        }
        let cut = log.tail();
        for i in 10..40 {
            send(&mut log, &i.to_string(), 3_000);
        }
        log.snapshot().unwrap();
        log.commit().unwrap();
        let segments = segment::list(dir.path()).unwrap().len();
        let (log, _) = log.truncated(cut).unwrap();
        assert_eq!(log.tail(), cut);
        assert_eq!(seqs(&log).len(), 10);
        assert!(segment::list(dir.path()).unwrap().len() < segments);
        assert!(snapshot::list(dir.path())
            .unwrap()
            .iter()
            .all(|(p, _)| *p <= cut));
    }
}
