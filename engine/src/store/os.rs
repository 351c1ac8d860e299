//! The store's only OS-specific and `unsafe` code: preallocation, memory maps, directory sync,
//! the data directory lock.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::{Advice, MmapMut, MmapOptions};

/// Reserves `len` bytes of disk for `file`, so that writes through a mapping never find the
/// disk full (which would be a SIGBUS, not an error). ENOSPC shows here instead.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: posix_fallocate only reads its integer arguments; the descriptor is open for
    // the duration of the call because `file` is borrowed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    // posix_fallocate returns the error number instead of setting errno.
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Maps the whole of `file` read-write and shared, so stores reach the page cache.
pub fn map(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the mapped file belongs to the store's directory, which no other process may
    // write or truncate while the store is open (docs/storage.md, "Ownership"); the store
    // never truncates a mapped segment, it only deletes whole segments after unmapping them.
    unsafe { MmapOptions::new().map_mut(file) }
}

/// Takes an exclusive advisory lock (`flock`) on `file` without waiting: `Ok(false)` if another
/// open file description holds it. The lock lasts until the file is closed. The mappings'
/// soundness rests on no other process writing the store's files; this lock is how a node
/// keeps a second one out of its data directory.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock only reads its integer arguments; the descriptor is open for the duration
    // of the call because `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Makes a directory's entries (created, renamed, deleted files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    synced::note(dir);
    File::open(dir)?.sync_all()
}

/// Makes `file` (at `path`), its data and its size, durable.
pub fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    synced::note(path);
    file.sync_all()
}

/// Writes the bytes `offset..offset + len` of a mapping of the file at `path` to disk (msync).
pub fn sync_range(map: &MmapMut, path: &Path, offset: usize, len: usize) -> io::Result<()> {
    synced::note(path);
    map.flush_range(offset, len)
}

/// Which paths the store synced, for unit tests that check a policy's system calls: a record
/// of every `sync_*` call, in every thread (tests tell theirs apart by their temporary
/// directory). Compiled to nothing outside tests.
pub mod synced {
    use std::path::Path;

    #[cfg(test)]
    static PATHS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

    /// Records that `path` is being synced.
    #[cfg_attr(not(test), inline(always))]
    pub fn note(path: &Path) {
        #[cfg(test)]
        PATHS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path.to_path_buf());
        #[cfg(not(test))]
        let _ = path;
    }

    /// The synced paths under `dir` (`dir` itself included), in the order of the calls.
    #[cfg(test)]
    pub fn under(dir: &Path) -> Vec<std::path::PathBuf> {
        PATHS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect()
    }
}

/// Whether an I/O error means the disk is full.
pub fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Faults in every page of a freshly created (all-zero) mapping for writing, so that appends
/// into it never stop for a page fault (allocating and zeroing a page cache page, and the file
/// system's write fault) on the shard's thread. The store runs it on the thread that prepares
/// the next segment.
pub fn prefault_for_writing(map: &mut MmapMut) {
    if map.advise(Advice::PopulateWrite).is_err() {
        // Kernels before 5.14 lack MADV_POPULATE_WRITE: write to one byte per page instead.
        // The mapping is all zeros, so writing zeros changes nothing; the compiler cannot drop
        // the stores, as it does not know what the mapping holds.
        for byte in map.iter_mut().step_by(4096) {
            *byte = 0;
        }
    }
}

/// Reads a mapping's pages in ahead of a sequential scan (recovery): one call instead of a
/// page fault every few pages. Failure (an old kernel) only costs speed.
pub fn prefault_for_reading(map: &MmapMut) {
    let _ = map.advise(Advice::PopulateRead);
}
