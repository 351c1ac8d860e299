//! The conversation log: every message and every piece of state chinwag keeps.
//!
//! A [`Store`] owns one append-only log (one per partition) in preallocated, memory-mapped
//! segment files that start small and double up to `segment_bytes`, and the in-memory state that replaying it rebuilds: conversations with their seq
//! allocator and read index, devices, members, read cursors and the cmid windows that make
//! sends idempotent. Its contract:
//!
//! - **Seqs.** Per conversation, [`Store::append_message`] assigns 1, 2, 3, ... with no gap and
//!   no duplicate, across restarts and crashes. Only the owner of the `Store` (`&mut self`)
//!   advances them, and only the owner reads them: another shard asks it with a message.
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
//!
//! The code is split by what a caller does: `recovery` (open and replay), `writes` (appends,
//! commit, state changes), `reads` (history and lookups) and `maintenance` (snapshots,
//! retention, scrub, gauges); the on-disk formats are in `segment`, `record` and `snapshot`,
//! the rebuilt state in `state`.

mod cmid_table;
mod config;
mod error;
mod maintenance;
mod os;
mod reads;
mod record;
mod recovery;
mod replication;
mod segment;
mod snapshot;
mod state;
mod writes;

#[cfg(test)]
mod crash_test;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use chinwag_protocol::{ConvId, DeviceId, Seq, Uid};

pub use config::{
    FsyncPolicy, StoreConfig, CMID_WINDOW_ENTRIES_DEFAULT, SEGMENT_BYTES_FIRST_DEFAULT,
    SEGMENT_BYTES_MIN,
};

/// The smallest log segment that holds the largest record when messages may be
/// `message_bytes_max` bytes (see [`StoreConfig::segment_bytes_needed`]).
pub fn largest_record_bytes(message_bytes_max: usize) -> u64 {
    let mut config = StoreConfig::new("");
    config.body_bytes_max = message_bytes_max;
    config.segment_bytes_needed()
}
pub use error::{Position, StoreError};
pub use os::try_lock_exclusive;
pub use reads::{agent_stats_of_nothing, ScanError, STREAM_EVENT_BYTES};
pub use record::{ConvKind, MessageRef};
pub use replication::{RawChunk, EPOCHS_FILE};
pub use state::{Conversation, StoredProfile};

pub use segment::Preparer;
use segment::Segment;
use state::State;

/// A message to append.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// The conversation (must exist).
    pub conv: ConvId,
    /// Who sends it.
    pub sender: Uid,
    /// From which device.
    pub device: DeviceId,
    /// The sender's client message id: a repeat in the same conversation within the window is
    /// not stored again.
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
    /// The sender used this cmid in this conversation before: nothing was stored; this is
    /// the original.
    Duplicate {
        /// The original message's seq.
        seq: Seq,
        /// The original message's time (ms since the Unix epoch).
        ts_ms: u64,
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
    /// Segment files: the live ones (the active one included) and any prepared next.
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

/// One partition's conversation log and state. See the module docs for its contract.
pub struct Store {
    config: StoreConfig,
    /// Live segments in log order; the last one is where appends go.
    segments: VecDeque<Segment>,
    /// The next segment was asked of the preparer (the active one is half full), or handed
    /// to it at open: the preparer may hold a segment for this log.
    next_asked: bool,
    state: State,
    /// Everything before this position has been flushed to disk.
    synced: Position,
    /// Everything before this position is marked acknowledged in the segment headers.
    acked: Position,
    last_sync: Instant,
    /// The newest snapshot's position.
    snapshot: Option<Position>,
    /// A flush failed: durability can no longer be promised.
    poisoned: bool,
    /// The epoch history: which leader epoch wrote from which position on (`replication`).
    epochs: Vec<(u64, Position)>,
}

impl Store {
    pub(super) fn active(&self) -> &Segment {
        // `open` always leaves at least one segment, and retention never removes the last.
        self.segments.back().expect("the log has an active segment")
    }

    /// The position where the next record goes.
    pub fn tail(&self) -> Position {
        let active = self.active();
        segment::position(active.id, active.end)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Do not leave a thread creating files in a directory its owner may be removing.
        self.config.preparer.abandon(&self.config.dir);
    }
}

// The gateway moves each partition's store into the thread of the shard that owns it.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
};

#[cfg(test)]
mod tests;
