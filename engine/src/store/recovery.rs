//! Recovery: opening a log, replaying it into the state, cutting a torn tail.

use std::collections::VecDeque;
use std::fs;
use std::path::Path;
use std::time::Instant;

use super::record::{self, Record};
use super::segment::{self, Segment};
use super::state::{Limits, State};
use super::{os, snapshot, FsyncPolicy, Position, RecoveryReport, Store, StoreConfig, StoreError};

impl Store {
    /// Opens the log in `config.dir` (creating it if needed), recovers it and rebuilds the
    /// state. Fails on corruption below the acknowledged end unless `config.skip_corrupt`.
    pub fn open(config: StoreConfig) -> Result<(Store, RecoveryReport), StoreError> {
        config.validate().map_err(StoreError::Config)?;
        let dir = config.dir.clone();
        let durable = config.fsync != FsyncPolicy::Never;
        if !dir.is_dir() {
            // The new directory's entry (and its parent's, if that is new too) must be as
            // durable as what is written in it: under `never`, that is the page cache.
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            let parent_is_new = parent.is_some_and(|p| !p.is_dir());
            fs::create_dir_all(&dir)
                .map_err(|e| StoreError::io("create log directory", &dir, e))?;
            let grandparent = parent
                .and_then(Path::parent)
                .filter(|p| parent_is_new && !p.as_os_str().is_empty());
            for made_in in parent.into_iter().chain(grandparent).filter(|_| durable) {
                os::sync_dir(made_in).map_err(|e| StoreError::io("sync directory", made_in, e))?;
            }
        }
        let limits = Limits {
            index_stride: u64::from(config.index_stride),
            members_max: config.members_max,
            cmid_window_age_ms: config.cmid_window_age_ms,
            cmid_window_entries_max: config.cmid_window_entries_max,
        };
        let mut report = RecoveryReport::default();
        let mut ids = segment::list(&dir)?;
        // A segment created under `fsync = never` is not synced: a power loss may leave its
        // name with nothing in it, not even its header. Like a `.tmp` file, it is an unfinished
        // creation that holds nothing, and goes. (A header lost with records after it is
        // corruption, as before.)
        while let Some(&last) = ids.last() {
            if !segment::is_blank(&dir, last)? {
                break;
            }
            let path = dir.join(segment::file_name(last));
            fs::remove_file(&path).map_err(|e| StoreError::io("delete segment", &path, e))?;
            ids.pop();
        }
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
        // A new log (a partition's first write): nothing to replay, and its segment is known to
        // be all zeros, so the replay's check of the tail is left out.
        let fresh = segments.is_empty();
        if fresh {
            segments.push_back(Segment::create(
                &dir,
                1,
                config.segment_bytes_for(1),
                config.fsync,
            )?);
        } else if durable {
            // A previous run under `never` may have left names only the page cache holds.
            os::sync_dir(&dir).map_err(|e| StoreError::io("sync directory", &dir, e))?;
        }
        let snapshot_pos = report.snapshot;
        let mut store = Store {
            config,
            segments,
            next_asked: false,
            state,
            synced: start,
            acked: start,
            last_sync: Instant::now(),
            snapshot: snapshot_pos,
            poisoned: false,
            epochs: super::replication::read_epochs(&dir)?,
        };
        if !fresh {
            store.state.defer_cmid_index();
            store.replay(start, &mut report)?;
            store.state.index_cmids();
        }
        // A restart continues in the segment it stopped in: the empty one after it (prepared
        // for the next switch) stays prepared instead of becoming the active one, so restarts
        // do not add segments.
        if let Some(prepared) = store.take_prepared(start) {
            let fsync = store.config.fsync;
            store.config.preparer.hand_over(&dir, prepared, fsync);
            store.next_asked = true;
        }
        // What survived the crash may sit only in the page cache: make it durable and mark it
        // acknowledged before anything new is appended after it.
        store.flush()?;
        store.prepare_next_if_half_full();
        // A history that names positions past what survived (a power loss under `never`)
        // forgets them.
        let tail = store.tail();
        store.epochs.retain(|&(_, start)| start <= tail);
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

    /// The last segment, if it is empty and follows one that replay read to its end: the
    /// segment a previous run prepared but never wrote to.
    fn take_prepared(&mut self, start: Position) -> Option<Segment> {
        let n = self.segments.len();
        let last = self.segments.back()?;
        let empty = last.end == segment::HEADER_BYTES && last.acked_end() == segment::HEADER_BYTES;
        // Segments before the replay start have no known end to continue at.
        if n < 2 || !empty || segment::segment_of(start) >= last.id {
            return None;
        }
        self.segments.pop_back()
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
        let deletes = self.segments.len() > idx + 1;
        while self.segments.len() > idx + 1 {
            if let Some(later) = self.segments.pop_back() {
                dropped += later.map.iter().filter(|&&b| b != 0).count() as u64;
                let path = later.path.clone();
                drop(later);
                fs::remove_file(&path).map_err(|e| StoreError::io("delete segment", &path, e))?;
            }
        }
        // Only deleted files change the directory (every open cuts the log at its end, most
        // often deleting nothing).
        if deletes {
            os::sync_dir(&self.config.dir)
                .map_err(|e| StoreError::io("sync directory", &self.config.dir, e))?;
        }
        Ok(dropped)
    }
}

fn resync(seg: &[u8], from: usize) -> Option<usize> {
    (from..seg.len().saturating_sub(record::HEADER_BYTES))
        .step_by(record::ALIGN)
        .find(|&off| matches!(record::decode(seg, off), Ok(Some(_))))
}
