//! The data directory: held by one node at a time, in one data format, with the partition
//! count its data was placed by.
//!
//! [`DataDir::open`] takes an advisory lock (`flock` on `DATA_DIR/lock`) before anything else
//! in the directory is read or written, and holds it for the life of the process: two nodes
//! writing the same mapped segments would corrupt each other's logs. The lock file holds the
//! holder's pid, so the refused node can name it. Offline readers (`chinwag token
//! --data-dir`) read without taking the lock.
//!
//! The directory records its data format (`DATA_DIR/format`): a directory of another format is
//! refused with a message that says so, before any log is opened (there is no migration). It
//! records the partition count too (`DATA_DIR/partitions`): placement depends on it, so it is
//! fixed when the directory is created. The shard count is not recorded: any count serves the
//! partitions.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::bus::partitions::{PARTITIONS_DEFAULT, PARTITIONS_MAX};

/// The data format this build reads and writes. 3: a log per partition
/// (`DATA_DIR/partitions/NNNNN/`), conversation ids carrying their partition; 2: a log per
/// shard (`DATA_DIR/shard-N/`), placement by the specified hash (`docs/storage.md`,
/// "Placement"), idempotency keyed by conversation; 1 (no `format` file): placement by
/// `ahash`, which no build can be trusted to reproduce.
pub const FORMAT: u32 = 3;

const LOCK_FILE: &str = "lock";
const FORMAT_FILE: &str = "format";
/// Format 1 and 2 recorded how many shards the logs were written by.
const SHARDS_FILE: &str = "shards";
/// The file that records the partition count.
const PARTITIONS_FILE: &str = "partitions.count";

/// An open data directory, locked for this process until dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the `flock`; closing it (at drop or exit) releases the directory.
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed, locks it, and checks its data format. Errors are
    /// sentences for the operator (the node then exits with code 2).
    pub fn open(path: &Path) -> Result<DataDir, String> {
        let at = |what: &str, e: io::Error| format!("{what} {}: {e}", path.display());
        fs::create_dir_all(path).map_err(|e| at("cannot create the data directory", e))?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| at("cannot open the lock file of", e))?;
        match crate::store::try_lock_exclusive(&lock) {
            Ok(true) => {}
            Ok(false) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another process (pid {pid})"),
                };
                return Err(format!(
                    "the data directory {} is in use by {holder}: one node per data directory",
                    path.display()
                ));
            }
            Err(e) => return Err(at("cannot lock the data directory", e)),
        }
        lock.set_len(0)
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .map_err(|e| at("cannot write the lock file of", e))?;
        let dir = DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        };
        dir.check_format()?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a directory written in another data format; marks a new one with this one.
    fn check_format(&self) -> Result<(), String> {
        let path = self.path.join(FORMAT_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(FORMAT) => Ok(()),
                Ok(other) => Err(self.wrong_format(&other.to_string())),
                Err(_) => Err(format!("{} is not a data format number", path.display())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Format 1 had no format file but always wrote the shard count at start.
                if self.path.join(SHARDS_FILE).exists() {
                    return Err(self.wrong_format("1"));
                }
                write_durably(&self.path, &path, &format!("{FORMAT}\n"))
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn wrong_format(&self, found: &str) -> String {
        format!(
            "the data directory {} holds data format {found}; this chinwag reads format {FORMAT} \
             and does not migrate: start with an empty --data-dir (docs/storage.md, \"Data format\")",
            self.path.display()
        )
    }

    /// The partition count of the data: the one the directory records; for a new directory
    /// `configured` (0: [`PARTITIONS_DEFAULT`]), which is then recorded. An explicit count
    /// other than the recorded one is refused: placement depends on it.
    pub fn partition_count(&self, configured: usize) -> Result<usize, String> {
        let path = self.path.join(PARTITIONS_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let was: usize = text
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| (1..=PARTITIONS_MAX).contains(n))
                    .ok_or_else(|| format!("{} is not a partition count", path.display()))?;
                if configured != 0 && configured != was {
                    return Err(format!(
                        "the data directory {} holds {was} partitions, fixed when it was created; \
                         start with --partitions {was} (or 0)",
                        self.path.display()
                    ));
                }
                Ok(was)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let count = match configured {
                    0 => PARTITIONS_DEFAULT,
                    n => n,
                };
                write_durably(&self.path, &path, &format!("{count}\n"))?;
                Ok(count)
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// Writes a small file and makes it and its directory entry durable.
fn write_durably(dir: &Path, path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        assert!(err.contains("in use"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }

    #[test]
    fn an_old_format_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SHARDS_FILE), "2\n").unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        assert!(err.contains("data format 1"), "{err}");
        fs::write(dir.path().join(FORMAT_FILE), "7\n").unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        assert!(err.contains("data format 7"), "{err}");
    }

    #[test]
    fn the_partition_count_is_fixed_at_creation() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        assert_eq!(data.partition_count(64).unwrap(), 64);
        assert_eq!(data.partition_count(0).unwrap(), 64);
        assert_eq!(data.partition_count(64).unwrap(), 64);
        let err = data.partition_count(256).unwrap_err();
        assert!(err.contains("--partitions 64"), "{err}");

        let fresh = tempfile::tempdir().unwrap();
        let data = DataDir::open(fresh.path()).unwrap();
        assert_eq!(data.partition_count(0).unwrap(), PARTITIONS_DEFAULT);
    }

    #[test]
    fn a_format_2_directory_is_refused_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FORMAT_FILE), "2\n").unwrap();
        fs::write(dir.path().join(SHARDS_FILE), "2\n").unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        assert!(err.contains("data format 2"), "{err}");
        assert!(err.contains("empty --data-dir"), "{err}");
    }
}
