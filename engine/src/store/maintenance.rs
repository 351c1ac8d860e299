//! Maintenance: snapshots, retention, the scrub and the gauges.

use std::fs;

use super::{os, record, segment, snapshot};
use super::{Position, Retained, Store, StoreError, StoreStats};

/// The cmid window, for the shard's budget across its partitions (`logic`).
impl Store {
    /// Cmids this log's window remembers.
    pub fn cmid_count(&self) -> usize {
        self.state.cmid_count()
    }

    /// The times of the cmids remembered, oldest first.
    pub fn cmid_times(&self) -> impl Iterator<Item = u64> + '_ {
        self.state.cmid_times()
    }

    /// Cmids added, and evicted by the window itself (age, its own limit), since the last call.
    pub fn take_cmid_churn(&mut self) -> (u64, u64) {
        self.state.take_cmid_churn()
    }

    /// Forgets the oldest cmid; false if none is left.
    pub fn evict_oldest_cmid(&mut self) -> bool {
        self.state.evict_oldest_cmid()
    }
}

impl Store {
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

    /// The position of the newest snapshot (`Some(tail)`: nothing new since).
    pub fn snapshot_position(&self) -> Option<Position> {
        self.snapshot
    }

    /// Whether something appended is not flushed to disk yet.
    pub fn needs_flush(&self) -> bool {
        self.synced != self.tail()
    }

    /// Gauges for metrics.
    pub fn stats(&self) -> StoreStats {
        // Only a log that asked for its next segment (or was handed one at open) has one in
        // the preparer: the others' gauges cost no lock.
        let prepared = if self.next_asked {
            self.config.preparer.bytes(&self.config.dir)
        } else {
            0
        };
        StoreStats {
            segments: self.segments.len() + usize::from(prepared > 0),
            segment_bytes: self
                .segments
                .iter()
                .map(|s| s.capacity() as u64)
                .sum::<u64>()
                + prepared,
            conversations: self.state.convs.len(),
            devices: self.state.devices.len(),
            cmid_entries: self.state.cmids.order.len(),
            tail: self.tail(),
            snapshot: self.snapshot,
        }
    }
}
