//! Segment files: one preallocated, memory-mapped file per stretch of the log.
//!
//! A segment is created whole (`NNNN.seg.tmp`, preallocated, header written and synced, then
//! renamed to `NNNN.seg` and the directory synced), so a segment file with its final name
//! always has a valid header and its full size on disk. Under `fsync = never` the two syncs are
//! left out: that policy promises nothing past a crash of the process, and the page cache,
//! which survives one, holds the header and the name (recovery removes a last segment that
//! a power loss left without its header). Its 64-byte header:
//!
//! ```text
//!  0  [8] magic "CHWGSEG1"      24 u64 file size
//!  8  u32 format version (1)    32 u32 CRC32C of bytes 0..32
//! 12  u32 header size (64)      40 u64 acked_end: records below this offset were acknowledged
//! 16  u64 segment id            48 u64 newest message ts (ms), written when sealed
//! ```
//!
//! `acked_end` and the newest ts are the only bytes of a segment ever overwritten.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use memmap2::MmapMut;

use super::error::{Position, StoreError};
use super::{os, FsyncPolicy};

/// Bytes of the segment header; records start here.
pub const HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 8] = b"CHWGSEG1";
const VERSION: u32 = 1;
const ACKED_END_AT: usize = 40;
const NEWEST_TS_AT: usize = 48;

const _: () = assert!(HEADER_BYTES % super::record::ALIGN == 0);

/// The position of `offset` in segment `id`.
pub const fn position(id: u64, offset: usize) -> Position {
    id << 32 | offset as u64
}

/// The segment id of a position.
pub const fn segment_of(pos: Position) -> u64 {
    pos >> 32
}

/// The offset of a position in its segment.
pub const fn offset_of(pos: Position) -> usize {
    (pos & 0xffff_ffff) as usize
}

/// The file name of segment `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// The id named by a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// One mapped segment.
pub struct Segment {
    /// Its id: segments are numbered 1, 2, 3, ... in log order.
    pub id: u64,
    /// Its file.
    pub path: PathBuf,
    /// The whole file, mapped.
    pub map: MmapMut,
    /// End of its records (where the next record goes, if this is the active segment).
    pub end: usize,
    /// Newest message timestamp in it (ms), for age-based retention; 0 if unknown.
    pub newest_ts_ms: u64,
}

impl Segment {
    /// Creates segment `id` of `bytes` in `dir`: preallocated, header written, renamed into
    /// place; the header and the new name are synced to disk unless `fsync` is `never`.
    pub fn create(
        dir: &Path,
        id: u64,
        bytes: u64,
        fsync: FsyncPolicy,
    ) -> Result<Segment, StoreError> {
        let durable = fsync != FsyncPolicy::Never;
        let path = dir.join(file_name(id));
        let tmp = path.with_extension("seg.tmp");
        let fail = |op: &'static str, p: &Path, e: io::Error| {
            if os::is_disk_full(&e) {
                StoreError::DiskFull {
                    path: p.to_path_buf(),
                }
            } else {
                StoreError::io(op, p, e)
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| fail("create segment", &tmp, e))?;
        if let Err(e) = os::preallocate(&file, bytes) {
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Err(fail("preallocate segment", &tmp, e));
        }
        let mut map = os::map(&file).map_err(|e| fail("map segment", &tmp, e))?;
        map[..HEADER_BYTES].copy_from_slice(&header(id, bytes));
        if durable {
            os::sync_range(&map, &tmp, 0, HEADER_BYTES)
                .and_then(|()| os::sync_file(&file, &tmp))
                .map_err(|e| fail("sync segment", &tmp, e))?;
        }
        os::prefault_for_writing(&mut map);
        fs::rename(&tmp, &path).map_err(|e| fail("rename segment", &path, e))?;
        if durable {
            os::sync_dir(dir).map_err(|e| fail("sync directory", dir, e))?;
        }
        Ok(Segment {
            id,
            path,
            map,
            end: HEADER_BYTES,
            newest_ts_ms: 0,
        })
    }

    /// Opens and maps an existing segment, checking its header. Its records are not read.
    pub fn open(dir: &Path, id: u64) -> Result<Segment, StoreError> {
        let path = dir.join(file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open segment", &path, e))?;
        let map = os::map(&file).map_err(|e| StoreError::io("map segment", &path, e))?;
        let at = position(id, 0);
        if map.len() < HEADER_BYTES {
            return Err(StoreError::corrupt(at, "segment shorter than its header"));
        }
        let expected = header(id, map.len() as u64);
        if map[..36] != expected[..36] {
            return Err(StoreError::corrupt(at, "bad segment header"));
        }
        let segment = Segment {
            id,
            path,
            map,
            end: HEADER_BYTES,
            newest_ts_ms: 0,
        };
        let acked = segment.acked_end();
        if acked < HEADER_BYTES || acked > segment.map.len() {
            return Err(StoreError::corrupt(at, "segment acked_end out of range"));
        }
        Ok(Segment {
            newest_ts_ms: u64_at(&segment.map, NEWEST_TS_AT),
            ..segment
        })
    }

    /// Offset below which every record was acknowledged under the durability policy.
    pub fn acked_end(&self) -> usize {
        usize::try_from(u64_at(&self.map, ACKED_END_AT)).unwrap_or(usize::MAX)
    }

    /// Records that everything below `end` is acknowledged.
    pub fn set_acked_end(&mut self, end: usize) {
        self.map[ACKED_END_AT..ACKED_END_AT + 8].copy_from_slice(&(end as u64).to_le_bytes());
    }

    /// Stores the newest message timestamp in the header (when the segment is sealed).
    pub fn store_newest_ts(&mut self) {
        let ts = self.newest_ts_ms;
        self.map[NEWEST_TS_AT..NEWEST_TS_AT + 8].copy_from_slice(&ts.to_le_bytes());
    }

    /// Flushes the header and the records up to `end` to disk.
    pub fn sync(&self, end: usize) -> Result<(), StoreError> {
        os::sync_range(&self.map, &self.path, 0, end)
            .map_err(|e| StoreError::io("msync segment", &self.path, e))
    }

    /// Bytes of the file.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn header(id: u64, bytes: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&bytes.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h[ACKED_END_AT..ACKED_END_AT + 8].copy_from_slice(&(HEADER_BYTES as u64).to_le_bytes());
    h
}

/// Whether segment `id` in `dir` holds nothing at all, header included: all zeros (or
/// empty), as a creation left it that never reached the disk.
pub fn is_blank(dir: &Path, id: u64) -> Result<bool, StoreError> {
    let path = dir.join(file_name(id));
    let fail = |e| StoreError::io("read segment", &path, e);
    let mut file = fs::File::open(&path).map_err(fail)?;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // A segment with a header (every segment but a lost creation) costs one read.
        let n = file.read(&mut chunk).map_err(fail)?;
        if n == 0 {
            return Ok(true);
        }
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// The segment ids in `dir`, ascending. Leftover `.seg.tmp` files (a creation interrupted by a
/// crash) are removed: nothing was ever written to them.
pub fn list(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list log directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list log directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = parse_file_name(name) {
            ids.push(id);
        } else if name.ends_with(".seg.tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates segments off the append path, for every log of a shard: one worker thread, one
/// queue. A log asks for its next segment once its active one is half full (so an idle log
/// keeps no prepared segment on disk), and takes it when it switches; if the worker has not
/// got to it yet, the log creates it on the spot. Cheap to clone: every clone is the same
/// preparer. The worker starts with the first request and stops when the last clone is dropped.
#[derive(Clone)]
pub struct Preparer {
    shared: Arc<Shared>,
    /// Stops the worker when the last clone goes.
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for Preparer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Preparer")
    }
}

/// One segment to create: which log, which id, how large, synced or not.
#[derive(Debug, Clone)]
struct Job {
    dir: PathBuf,
    id: u64,
    bytes: u64,
    fsync: FsyncPolicy,
}

impl Job {
    /// Whether this job is for the log in `dir`. The paths are compared as bytes: `Path`'s
    /// own `==` walks components, and the gauges ask this of every job for every log of the
    /// shard several times a second.
    fn is_for(&self, dir: &Path) -> bool {
        self.dir.as_os_str().as_encoded_bytes() == dir.as_os_str().as_encoded_bytes()
    }

    /// Whether this job makes segment `id` of the log in `dir`.
    fn makes(&self, dir: &Path, id: u64) -> bool {
        self.id == id && self.is_for(dir)
    }
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// The job the worker is doing now.
    busy: Option<Job>,
    /// Segments made (or found empty at open) and not taken yet.
    ready: Vec<(Job, Segment)>,
    worker: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    jobs: Mutex<Jobs>,
    changed: Condvar,
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut jobs = self.0.lock();
        jobs.stop = true;
        jobs.queue.clear();
        self.0.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        // A poisoned lock means the worker panicked while holding it; the job lists are
        // always whole between statements, so they are still usable.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work(&self) {
        loop {
            let job = {
                let mut jobs = self.lock();
                loop {
                    if jobs.stop {
                        jobs.worker = false;
                        return;
                    }
                    if let Some(job) = jobs.queue.pop_front() {
                        jobs.busy = Some(job.clone());
                        break job;
                    }
                    jobs = self.changed.wait(jobs).unwrap_or_else(|p| p.into_inner());
                }
            };
            let made = Segment::create(&job.dir, job.id, job.bytes, job.fsync);
            let mut jobs = self.lock();
            jobs.busy = None;
            // A failure (a full disk) is not kept: the log tries again itself when it switches,
            // and reports the error then.
            if let Ok(segment) = made {
                jobs.ready.push((job, segment));
            }
            self.changed.notify_all();
        }
    }
}

impl Default for Preparer {
    fn default() -> Self {
        Preparer::new()
    }
}

impl Preparer {
    /// A preparer with nothing to do (its worker starts with the first request).
    pub fn new() -> Preparer {
        let shared = Arc::new(Shared::default());
        Preparer {
            _stop: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
        }
    }

    /// Asks for segment `id` of the log in `dir` in the background, unless that is already
    /// under way (or done); `fsync` is the log's policy (see [`Segment::create`]).
    pub fn start(&self, dir: &Path, id: u64, bytes: u64, fsync: FsyncPolicy) {
        let job = Job {
            dir: dir.to_path_buf(),
            id,
            bytes,
            fsync,
        };
        let mut jobs = self.shared.lock();
        let same = |j: &Job| j.makes(dir, id) && j.bytes == bytes && j.fsync == fsync;
        let known = jobs.busy.as_ref().is_some_and(same)
            || jobs.queue.iter().any(same)
            || jobs.ready.iter().any(|(j, _)| same(j));
        if known || jobs.stop {
            return;
        }
        if !jobs.worker {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("chinwag-segment".into())
                .spawn(move || shared.work());
            // No thread to spare: `take` will create the segment itself.
            if spawned.is_err() {
                return;
            }
            jobs.worker = true;
        }
        jobs.queue.push_back(job);
        self.shared.changed.notify_all();
    }

    /// Takes `segment`, already on disk and empty, as the next one of the log in `dir`, so a
    /// restart reuses the segment the previous run prepared instead of creating another.
    pub fn hand_over(&self, dir: &Path, segment: Segment, fsync: FsyncPolicy) {
        let job = Job {
            dir: dir.to_path_buf(),
            id: segment.id,
            bytes: segment.capacity() as u64,
            fsync,
        };
        self.shared.lock().ready.push((job, segment));
    }

    /// Segment `id` of the log in `dir`, waiting for its preparation if it is under way (or
    /// creating it now if it was never asked for, is still queued, or failed).
    pub fn take(
        &self,
        dir: &Path,
        id: u64,
        bytes: u64,
        fsync: FsyncPolicy,
    ) -> Result<Segment, StoreError> {
        let mut jobs = self.shared.lock();
        while jobs.busy.as_ref().is_some_and(|j| j.makes(dir, id)) {
            jobs = self
                .shared
                .changed
                .wait(jobs)
                .unwrap_or_else(|p| p.into_inner());
        }
        jobs.queue.retain(|j| !j.is_for(dir));
        let at = jobs.ready.iter().position(|(j, _)| j.makes(dir, id));
        if let Some(at) = at {
            let (_, segment) = jobs.ready.swap_remove(at);
            if segment.capacity() as u64 == bytes {
                return Ok(segment);
            }
            // Made for another size (the configuration changed): made again below.
            let path = segment.path.clone();
            drop(segment);
            let _ = fs::remove_file(path);
        }
        drop(jobs);
        // Creation is idempotent: a failed attempt left at most a `.tmp` file, recreated here.
        Segment::create(dir, id, bytes, fsync)
    }

    /// Bytes of the segments in preparation or ready for the log in `dir` (they are, or are
    /// about to be, on disk).
    pub fn bytes(&self, dir: &Path) -> u64 {
        let jobs = self.shared.lock();
        let busy = jobs
            .busy
            .iter()
            .chain(&jobs.queue)
            .filter(|j| j.is_for(dir));
        let ready = jobs.ready.iter().map(|(j, _)| j).filter(|j| j.is_for(dir));
        busy.chain(ready).map(|j| j.bytes).sum()
    }

    /// Waits for what was asked for the log in `dir` and forgets it (a segment on disk stays
    /// there, empty: the next open finds it and hands it over again), so no file is created in
    /// a directory its owner may be removing.
    pub fn abandon(&self, dir: &Path) {
        let mut jobs = self.shared.lock();
        while jobs.busy.as_ref().is_some_and(|j| j.is_for(dir))
            || (jobs.worker && jobs.queue.iter().any(|j| j.is_for(dir)))
        {
            jobs = self
                .shared
                .changed
                .wait(jobs)
                .unwrap_or_else(|p| p.into_inner());
        }
        jobs.ready.retain(|(j, _)| !j.is_for(dir));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_segment_reopens_with_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 3, 64 << 10, FsyncPolicy::Always).unwrap();
        assert_eq!(seg.capacity(), 64 << 10);
        drop(seg);
        assert_eq!(list(dir.path()).unwrap(), vec![3]);
        let seg = Segment::open(dir.path(), 3).unwrap();
        assert_eq!(seg.acked_end(), HEADER_BYTES);
        assert!(seg.map[HEADER_BYTES..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_segment_with_a_damaged_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1, 64 << 10, FsyncPolicy::Always).unwrap();
        seg.map[20] ^= 1;
        seg.sync(HEADER_BYTES).unwrap();
        drop(seg);
        assert!(matches!(
            Segment::open(dir.path(), 1),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn preparer_hands_over_the_segment_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let p = Preparer::new();
        p.start(dir.path(), 2, 64 << 10, FsyncPolicy::Always);
        let seg = p
            .take(dir.path(), 2, 64 << 10, FsyncPolicy::Always)
            .unwrap();
        assert_eq!(seg.id, 2);
        // Asked for one it did not prepare, it makes it on the spot.
        let seg = p
            .take(dir.path(), 3, 64 << 10, FsyncPolicy::Always)
            .unwrap();
        assert_eq!(seg.id, 3);
        assert_eq!(list(dir.path()).unwrap(), vec![2, 3]);
    }

    #[test]
    fn creating_a_segment_syncs_its_file_and_directory_unless_fsync_is_never() {
        let synced = tempfile::tempdir().unwrap();
        let seg = Segment::create(synced.path(), 1, 64 << 10, FsyncPolicy::Always).unwrap();
        let tmp = seg.path.with_extension("seg.tmp");
        let dir = synced.path().to_path_buf();
        // The header (msync), the file, then the directory holding its new name.
        assert_eq!(
            os::synced::under(synced.path()),
            vec![tmp.clone(), tmp, dir]
        );

        let unsynced = tempfile::tempdir().unwrap();
        let seg = Segment::create(unsynced.path(), 1, 64 << 10, FsyncPolicy::Never).unwrap();
        assert!(os::synced::under(unsynced.path()).is_empty());
        drop(seg);
        // The page cache holds a whole segment all the same.
        let seg = Segment::open(unsynced.path(), 1).unwrap();
        assert_eq!(seg.capacity(), 64 << 10);
        assert_eq!(seg.acked_end(), HEADER_BYTES);
    }

    #[test]
    fn preparer_creates_with_the_logs_policy() {
        let never = tempfile::tempdir().unwrap();
        let always = tempfile::tempdir().unwrap();
        let p = Preparer::new();
        p.start(never.path(), 2, 64 << 10, FsyncPolicy::Never);
        p.start(always.path(), 2, 64 << 10, FsyncPolicy::Always);
        p.take(never.path(), 2, 64 << 10, FsyncPolicy::Never)
            .unwrap();
        p.take(always.path(), 2, 64 << 10, FsyncPolicy::Always)
            .unwrap();
        assert!(os::synced::under(never.path()).is_empty());
        assert_eq!(os::synced::under(always.path()).len(), 3);
    }

    #[test]
    fn blank_segment_is_told_from_one_with_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 1, 64 << 10, FsyncPolicy::Never).unwrap();
        assert!(!is_blank(dir.path(), 1).unwrap());
        fs::write(&seg.path, vec![0u8; 64 << 10]).unwrap();
        assert!(is_blank(dir.path(), 1).unwrap());
        let mut late = vec![0u8; 64 << 10];
        late[40_000] = 1;
        fs::write(&seg.path, late).unwrap();
        assert!(!is_blank(dir.path(), 1).unwrap());
    }
}
