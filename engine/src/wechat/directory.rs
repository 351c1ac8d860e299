//! The customer directory: which `wechat:<id>` user each (account, OpenID) is, kept durably in
//! one file of the data directory, `DATA_DIR/wechat-customers`.
//!
//! The contract:
//! - a customer gets an id on their first message and keeps it across restarts; ids are
//!   assigned from 1 upwards, node-wide, and never reused;
//! - [`Directory::assign`] writes the new line (and, with `fsync`, flushes it to disk) before it
//!   returns the id, so no message can be stored for a `wechat` user the directory could forget;
//! - both directions are looked up in memory: (AppID, OpenID) → id for a customer's message,
//!   id → (AppID, OpenID) for an agent's reply;
//! - the file is text, one line per customer: `<id> <appid> <openid> <crc32c>\n`, the CRC (hex)
//!   over the three fields joined by spaces. A torn last line (a crash during the append) is cut
//!   off at open; a bad line anywhere else is corruption and refuses the open.
//!
//! Why a file of its own and not the conversation log: the log is split by partition, while
//! this table is needed by any shard (a push arrives on whichever shard accepted the
//! connection; a reply is sent from the conversation's owner). One small append-only file read
//! at start gives every shard the same table without a cross-shard request per message, and it
//! is written only on a customer's first message (a rare path, so one lock is fine). Memory:
//! about 200 bytes per customer in the two maps.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::message::OpenId;

pub const FILE_NAME: &str = "wechat-customers";

/// A customer as the directory knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub app_id: Arc<str>,
    pub open_id: OpenId,
}

#[derive(Default)]
struct Tables {
    /// AppID → OpenID → id.
    by_customer: HashMap<Arc<str>, HashMap<OpenId, u64>>,
    by_id: HashMap<u64, Customer>,
    last_id: u64,
}

pub struct Directory {
    path: PathBuf,
    tables: RwLock<Tables>,
    /// Held while appending (inside the write lock of `tables`).
    file: std::sync::Mutex<File>,
    fsync: bool,
}

impl Directory {
    /// Opens (or creates) `data_dir/wechat-customers`. With `fsync`, each new customer's line is
    /// on disk before its id is handed out; without, it survives a process crash (the page
    /// cache) but not a power loss, like the log's `fsync = never`.
    pub fn open(data_dir: &Path, fsync: bool) -> io::Result<Directory> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let mut tables = Tables::default();
        let mut good_len = 0usize;
        let mut rest = &text[..];
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                break; // a torn last line: no newline yet
            };
            let line = &rest[..end];
            let last = end + 1 == rest.len();
            match parse_line(line) {
                Some((id, app_id, open_id)) => {
                    let app_id: Arc<str> = app_id.into();
                    let customer = Customer {
                        app_id: Arc::clone(&app_id),
                        open_id: open_id.clone(),
                    };
                    tables.by_customer.entry(app_id).or_default().insert(open_id, id);
                    tables.by_id.insert(id, customer);
                    tables.last_id = tables.last_id.max(id);
                }
                // A complete last line with a bad CRC is torn too (its bytes reached the file
                // in pieces); anywhere else it is corruption.
                None if last => break,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: corrupt line at byte {good_len}; the WeChat customer directory cannot be trusted",
                            path.display()
                        ),
                    ))
                }
            }
            good_len += end + 1;
            rest = &rest[end + 1..];
        }
        if good_len < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - good_len, "cutting off a torn last line");
            file.set_len(good_len as u64)?;
            file.sync_all()?;
        }
        Ok(Directory {
            path,
            tables: RwLock::new(tables),
            file: std::sync::Mutex::new(file),
            fsync,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of a known customer.
    pub fn lookup(&self, app_id: &str, open_id: &OpenId) -> Option<u64> {
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        tables.by_customer.get(app_id)?.get(open_id).copied()
    }

    /// The id of this customer, assigning (and durably recording) one on first sight.
    pub fn assign(&self, app_id: &str, open_id: &OpenId) -> io::Result<u64> {
        if let Some(id) = self.lookup(app_id, open_id) {
            return Ok(id);
        }
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = tables.by_customer.get(app_id).and_then(|m| m.get(open_id)) {
            return Ok(id); // assigned by another thread meanwhile
        }
        let id = tables.last_id + 1;
        let fields = format!("{id} {app_id} {open_id}");
        let line = format!("{fields} {:08x}\n", crc32c::crc32c(fields.as_bytes()));
        {
            let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(line.as_bytes())?;
            if self.fsync {
                file.sync_data()?;
            }
        }
        tables.last_id = id;
        let app_id: Arc<str> = match tables.by_customer.get_key_value(app_id) {
            Some((known, _)) => Arc::clone(known),
            None => Arc::from(app_id),
        };
        tables.by_id.insert(
            id,
            Customer {
                app_id: Arc::clone(&app_id),
                open_id: open_id.clone(),
            },
        );
        tables
            .by_customer
            .entry(app_id)
            .or_default()
            .insert(open_id.clone(), id);
        Ok(id)
    }

    /// The customer behind `wechat:<id>`.
    pub fn customer(&self, id: u64) -> Option<Customer> {
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        tables.by_id.get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        tables.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `<id> <appid> <openid> <crc>`; `None` when anything is off.
fn parse_line(line: &[u8]) -> Option<(u64, String, OpenId)> {
    let line = std::str::from_utf8(line).ok()?;
    let (fields, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(fields.as_bytes()) {
        return None;
    }
    let mut parts = fields.split(' ');
    let id: u64 = parts.next()?.parse().ok()?;
    let app_id = parts.next()?;
    let open_id = OpenId::parse(parts.next()?)?;
    if parts.next().is_some() || id == 0 || app_id.is_empty() {
        return None;
    }
    Some((id, app_id.to_string(), open_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_id(text: &str) -> OpenId {
        OpenId::parse(text).unwrap()
    }

    /// A closed directory in a fresh folder with customers `oA` (id 1) and `oB` (id 2), and
    /// its file.
    fn two_customers() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let directory = Directory::open(dir.path(), false).unwrap();
        directory.assign("wx1", &open_id("oA")).unwrap();
        directory.assign("wx1", &open_id("oB")).unwrap();
        let path = directory.path().to_path_buf();
        (dir, path)
    }

    #[test]
    fn assigns_once_and_keeps_ids_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let directory = Directory::open(dir.path(), true).unwrap();
        let a = directory.assign("wx1", &open_id("oA")).unwrap();
        let b = directory.assign("wx1", &open_id("oB")).unwrap();
        // The same OpenID under another account is another customer.
        let a2 = directory.assign("wx2", &open_id("oA")).unwrap();
        assert_eq!((a, b, a2), (1, 2, 3));
        assert_eq!(directory.assign("wx1", &open_id("oA")).unwrap(), 1);
        drop(directory);
        let directory = Directory::open(dir.path(), true).unwrap();
        assert_eq!(directory.len(), 3);
        assert_eq!(directory.lookup("wx1", &open_id("oB")), Some(2));
        let customer = directory.customer(3).unwrap();
        assert_eq!(
            (&*customer.app_id, customer.open_id.as_str()),
            ("wx2", "oA")
        );
        assert_eq!(directory.assign("wx1", &open_id("oC")).unwrap(), 4);
        assert_eq!(directory.customer(99), None);
    }

    #[test]
    fn cuts_off_a_torn_last_line() {
        let (dir, path) = two_customers();
        let full = std::fs::read(&path).unwrap();
        // Every cut inside the last line loses that customer and nothing else.
        let second_line_start = full.iter().position(|&b| b == b'\n').unwrap() + 1;
        for cut in second_line_start..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let directory = Directory::open(dir.path(), false).unwrap();
            assert_eq!(directory.len(), 1, "cut at {cut}");
            assert_eq!(directory.lookup("wx1", &open_id("oA")), Some(1));
            // The next customer gets the lost id's place, on a clean line.
            assert_eq!(directory.assign("wx1", &open_id("oC")).unwrap(), 2);
            drop(directory);
            assert_eq!(Directory::open(dir.path(), false).unwrap().len(), 2);
        }
    }

    #[test]
    fn refuses_corruption_before_the_last_line() {
        let (dir, path) = two_customers();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0x01; // inside the first line
        std::fs::write(&path, &bytes).unwrap();
        let error = Directory::open(dir.path(), false).err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn threads_assigning_the_same_customer_get_one_id() {
        let dir = tempfile::tempdir().unwrap();
        let directory = Arc::new(Directory::open(dir.path(), false).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let directory = Arc::clone(&directory);
                std::thread::spawn(move || {
                    let shared = directory.assign("wx1", &open_id("oSame")).unwrap();
                    let own = directory.assign("wx1", &open_id(&format!("o{i}"))).unwrap();
                    (shared, own)
                })
            })
            .collect();
        let results: Vec<(u64, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.iter().all(|(shared, _)| *shared == results[0].0));
        let mut ids: Vec<u64> = results.iter().map(|(_, own)| *own).collect();
        ids.push(results[0].0);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, (1..=9).collect::<Vec<u64>>());
    }
}
