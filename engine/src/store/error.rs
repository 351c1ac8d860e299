//! Everything the store can fail with. Nothing read from disk panics: bad bytes become
//! [`StoreError::Corrupt`].

use std::fmt;
use std::io;
use std::path::PathBuf;

use chinwag_protocol::ConvId;

/// A log position: the segment id in the high 32 bits, the byte offset in the low 32.
pub type Position = u64;

/// Why a store operation failed.
#[derive(Debug)]
pub enum StoreError {
    /// The configuration is inconsistent.
    Config(&'static str),
    /// A file system call failed.
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// No space left to prepare the next segment. Nothing stored is harmed; appends work again
    /// once space is freed.
    DiskFull {
        /// The segment that could not be created.
        path: PathBuf,
    },
    /// A field exceeds its configured limit.
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The request contradicts the stored state (e.g. a cursor or member change that does not
    /// apply).
    Invalid(&'static str),
    /// The conversation does not exist in this log.
    UnknownConv(ConvId),
    /// A conversation with this id, or for this shop and buyer or user pair, exists already.
    ConvExists(ConvId),
    /// Bad bytes on disk, or a record that contradicts the state before it.
    Corrupt {
        /// Where (see [`Position`]; 0 for a snapshot file).
        position: Position,
        /// What is wrong.
        reason: String,
    },
    /// The partition is not served by this shard (or this node): its log is not here.
    NotHere {
        /// The partition.
        partition: u32,
    },
    /// A flush to disk failed earlier; the store can no longer promise durability and refuses
    /// further writes until it is reopened.
    Poisoned,
}

impl StoreError {
    /// Whether the gateway should answer `unavailable` (a server-side condition, not bad input).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. }
                | StoreError::DiskFull { .. }
                | StoreError::Poisoned
                | StoreError::NotHere { .. }
        )
    }

    pub(super) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(super) fn corrupt(position: Position, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            position,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Config(why) => write!(f, "bad store configuration: {why}"),
            StoreError::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            StoreError::DiskFull { path } => {
                write!(f, "disk full: cannot preallocate {}", path.display())
            }
            StoreError::TooLarge { what, len, max } => {
                write!(f, "{what} is {len} bytes, the limit is {max}")
            }
            StoreError::Invalid(why) => write!(f, "invalid request: {why}"),
            StoreError::UnknownConv(conv) => write!(f, "unknown conversation {conv}"),
            StoreError::ConvExists(conv) => write!(f, "conversation {conv} exists already"),
            StoreError::Corrupt { position, reason } => write!(
                f,
                "corrupt log at segment {} offset {}: {reason}",
                position >> 32,
                position & 0xffff_ffff
            ),
            StoreError::NotHere { partition } => {
                write!(f, "partition {partition} is not served here")
            }
            StoreError::Poisoned => f.write_str("an earlier flush failed; the log is read-only"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
