//! The store's configuration: every limit it enforces, each with a default.

use std::path::PathBuf;
use std::str::FromStr;

use chinwag_protocol::limits::{CMID_LEN_MAX, KIND_LEN_MAX};

use super::segment::Preparer;

/// When an appended record counts as durable, and so when its acknowledgement may go out.
///
/// What each policy survives is documented in `docs/storage.md` ("Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Acknowledged once the record is in the mapping: survives a crash of the process
    /// (the kernel's page cache holds the bytes), not a power loss or kernel crash.
    #[default]
    Never,
    /// Like `Never`, plus the log is flushed to disk (msync) at most every
    /// [`StoreConfig::fsync_interval_ms`]: a power loss loses at most that window.
    Interval,
    /// Group commit: [`super::Store::commit`] flushes the batch to disk before it returns, so
    /// every acknowledged record survives a power loss.
    Always,
}

impl FromStr for FsyncPolicy {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(FsyncPolicy::Never),
            "interval" => Ok(FsyncPolicy::Interval),
            "always" => Ok(FsyncPolicy::Always),
            _ => Err("fsync must be never, interval or always"),
        }
    }
}

/// Default segment size: large enough that switching segments is rare, small enough that
/// retention frees space in useful steps.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default size of the node's idempotency window, in cmids, shared evenly by the partitions'
/// logs: sized for a small deployment (32 MiB of tables and 24 MB of entries once every
/// partition's share is used); `docs/operations.md` ("Sizing") says when to raise it.
pub const CMID_WINDOW_ENTRIES_DEFAULT: usize = 1_000_000;
/// Segments are addressed by a 32-bit offset inside a 64-bit position.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;
/// A segment must hold its header and at least one record of every maximum size.
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;
/// Default size of a log's first segment: each next one is twice as large, up to
/// `segment_bytes`, so a log with little in it costs little disk (and page cache).
pub const SEGMENT_BYTES_FIRST_DEFAULT: u64 = 128 << 10;
/// The record format stores the cmid and kind lengths in one byte each.
pub const SHORT_FIELD_BYTES_LIMIT: usize = 255;

// The store holds every cmid and kind the protocol accepts: the limits are the protocol's
// (`chinwag_protocol::limits`), declared once.
const _: () = assert!(CMID_LEN_MAX <= SHORT_FIELD_BYTES_LIMIT);
const _: () = assert!(KIND_LEN_MAX <= SHORT_FIELD_BYTES_LIMIT);

/// Configuration of one log (one per partition).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The directory that holds this log's segments and snapshots (created if absent).
    pub dir: PathBuf,
    /// Size of the largest preallocated segment file.
    pub segment_bytes: u64,
    /// Size of the first segment file; each next one doubles, up to `segment_bytes` (and
    /// never below what the largest record needs).
    pub segment_bytes_first: u64,
    /// Who creates the next segment off the append path (shared by the logs of a shard).
    pub preparer: Preparer,
    /// Durability policy (see [`FsyncPolicy`]).
    pub fsync: FsyncPolicy,
    /// With [`FsyncPolicy::Interval`], the longest time between two flushes.
    pub fsync_interval_ms: u64,
    /// Largest message body.
    pub body_bytes_max: usize,
    /// Most members one conversation may have.
    pub members_max: usize,
    /// Most messages one [`super::Store::history`] call returns (the protocol's `limit` is
    /// 1..=200).
    pub history_limit_max: usize,
    /// One in this many seqs of a conversation has its log position in the in-memory index;
    /// a read walks at most this many extra records.
    pub index_stride: u32,
    /// The idempotency window keeps every cmid younger than this ...
    pub cmid_window_age_ms: u64,
    /// ... unless the log holds more than this many; then the oldest go first. Memory: a hash
    /// table of 32 bytes per entry (load 1/2, rounded up to a power of two), resident once a
    /// few cmids per page landed in it, plus 24 bytes per entry held. (The node gives each
    /// partition's log an even share of its window.)
    pub cmid_window_entries_max: usize,
    /// Retention deletes sealed segments whose newest message is older than this.
    pub retention_age_ms: Option<u64>,
    /// Retention deletes the oldest sealed segments while the log is larger than this.
    pub retention_bytes_max: Option<u64>,
    /// Snapshot files kept after a newer one is written.
    pub snapshots_kept: usize,
    /// Operator override: start even when a record in the middle of the log is corrupt,
    /// skipping it (its messages are lost and leave a gap in their conversations' seqs).
    pub skip_corrupt: bool,
}

impl StoreConfig {
    /// The defaults, with the log in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            segment_bytes_first: SEGMENT_BYTES_FIRST_DEFAULT,
            preparer: Preparer::new(),
            fsync: FsyncPolicy::Never,
            fsync_interval_ms: 100,
            body_bytes_max: 64 << 10,
            members_max: 1_000,
            history_limit_max: 200,
            index_stride: 16,
            cmid_window_age_ms: 24 * 3_600 * 1_000,
            cmid_window_entries_max: CMID_WINDOW_ENTRIES_DEFAULT,
            retention_age_ms: None,
            retention_bytes_max: None,
            snapshots_kept: 2,
            skip_corrupt: false,
        }
    }

    /// The smallest `segment_bytes` that holds the largest record: an empty segment's header
    /// and a message of every maximum size with a `body_bytes_max` body, or a conversation
    /// record of `members_max` members, whichever is larger (and never below the minimum).
    pub fn segment_bytes_needed(&self) -> u64 {
        let largest = super::record::message_len(CMID_LEN_MAX, KIND_LEN_MAX, self.body_bytes_max);
        let largest_group = super::record::conv_len(self.members_max);
        ((largest.max(largest_group) + super::segment::HEADER_BYTES) as u64).max(SEGMENT_BYTES_MIN)
    }

    /// The size of segment `id` (ids start at 1): the first segment's size, doubled for each
    /// segment before it, at most `segment_bytes`; at least what the largest record needs,
    /// rounded up to whole pages.
    pub fn segment_bytes_for(&self, id: u64) -> u64 {
        let first = self
            .segment_bytes_first
            .max(self.segment_bytes_needed())
            .next_multiple_of(4096);
        let doublings = id.saturating_sub(1).min(32) as u32;
        first
            .saturating_mul(1u64 << doublings)
            .min(self.segment_bytes)
    }

    /// Checks the relations between the limits.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err("segment_bytes must be between 64 KiB and 2 GiB");
        }
        if self.members_max > usize::from(u16::MAX) {
            return Err("members_max must be at most 65535");
        }
        // A message record of every maximum size must fit an empty segment.
        let largest = super::record::message_len(CMID_LEN_MAX, KIND_LEN_MAX, self.body_bytes_max);
        let largest_group = super::record::conv_len(self.members_max);
        if (largest.max(largest_group) + super::segment::HEADER_BYTES) as u64 > self.segment_bytes {
            return Err("segment_bytes must hold the largest record");
        }
        if self.index_stride == 0 {
            return Err("index_stride must be at least 1");
        }
        if self.fsync == FsyncPolicy::Interval && self.fsync_interval_ms == 0 {
            return Err("fsync_interval_ms must be at least 1");
        }
        Ok(())
    }
}
