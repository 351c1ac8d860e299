//! Snapshots: the whole state at one log position, so a restart replays only what follows.
//!
//! A snapshot file `PPPPPPPPPPPPPPPP.snap` (the position in hex) holds a 32-byte header and a
//! body (layout in `docs/storage.md`):
//!
//! ```text
//!  0 [8] magic "CHWGSNP1"   12 u32 CRC32C of bytes 16..32, then the body   24 u64 log position
//!  8 u32 format version (3) 16 u64 body length
//! ```
//!
//! It is written to a `.tmp` file, synced, renamed into place and the directory synced, so a
//! snapshot file with its final name is always whole; a damaged one fails its CRC and recovery
//! falls back to an older snapshot or to a full replay.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use chinwag_protocol::limits::{PROFILE_AVATAR_LEN_MAX, PROFILE_NAME_LEN_MAX};
use chinwag_protocol::{ConvId, DeviceId, DeviceType, Profile, Seq, ShopId, Subject, Uid, UidKind};
use smallvec::SmallVec;

use super::error::{Position, StoreError};
use super::os;
use super::record::ConvKind;
use super::state::reception::{AgentHours, Hour, Reception, REPLY_BINS};
use super::state::{pair, Conversation, Limits, State, StoredProfile};

const MAGIC: &[u8; 8] = b"CHWGSNP1";
/// 2: cmid window keys include the conversation (data format 2). 3: the reception statistics
/// follow the chain repairs. 4: the profiles follow them. Versions 2 and 3 are still read
/// (with no statistics, with no profiles).
const VERSION: u32 = 4;
const VERSION_WITHOUT_RECEPTION: u32 = 2;
const VERSION_WITHOUT_PROFILES: u32 = 3;
const HEADER_BYTES: usize = 32;

/// The file name of the snapshot at `pos`.
pub fn file_name(pos: Position) -> String {
    format!("{pos:016x}.snap")
}

/// The snapshots in `dir`, newest (highest position) first. Leftover `.snap.tmp` files are
/// removed: their rename never happened.
pub fn list(dir: &Path) -> Result<Vec<(Position, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list log directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list log directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".snap") {
            if let Ok(pos) = u64::from_str_radix(hex, 16) {
                found.push((pos, entry.path()));
            }
        } else if name.ends_with(".snap.tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    found.sort_unstable_by_key(|&(pos, _)| std::cmp::Reverse(pos));
    Ok(found)
}

/// Writes the snapshot of `state` at `pos` atomically: write, fsync, rename, fsync directory.
pub fn write(dir: &Path, state: &State, pos: Position) -> Result<PathBuf, StoreError> {
    let body = encode(state);
    let mut header = [0u8; HEADER_BYTES];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&pos.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[16..32]), &body);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    let path = dir.join(file_name(pos));
    let tmp = path.with_extension("snap.tmp");
    let result = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&header)?;
            f.write_all(&body)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, &path))
        .and_then(|()| os::sync_dir(dir));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(if os::is_disk_full(&e) {
            StoreError::DiskFull { path }
        } else {
            StoreError::io("write snapshot", &path, e)
        });
    }
    Ok(path)
}

/// Reads and checks the snapshot at `path`: its state and its log position.
pub fn read(path: &Path, limits: Limits) -> Result<(State, Position), StoreError> {
    let bytes = fs::read(path).map_err(|e| StoreError::io("read snapshot", path, e))?;
    let bad = |why: &str| StoreError::corrupt(0, format!("snapshot {}: {why}", path.display()));
    if bytes.len() < HEADER_BYTES || &bytes[0..8] != MAGIC {
        return Err(bad("bad header"));
    }
    let mut head = Reader {
        bytes: &bytes[8..HEADER_BYTES],
    };
    let (version, crc, len, pos) = (
        head.u32().map_err(bad)?,
        head.u32().map_err(bad)?,
        head.u64().map_err(bad)?,
        head.u64().map_err(bad)?,
    );
    if ![VERSION, VERSION_WITHOUT_PROFILES, VERSION_WITHOUT_RECEPTION].contains(&version) {
        return Err(bad("unknown version"));
    }
    let body = &bytes[HEADER_BYTES..];
    let crc_found = crc32c::crc32c_append(crc32c::crc32c(&bytes[16..HEADER_BYTES]), body);
    if body.len() as u64 != len || crc_found != crc {
        return Err(bad("length or CRC mismatch"));
    }
    let state = decode(body, limits, version).map_err(bad)?;
    Ok((state, pos))
}

fn encode(state: &State) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 * state.convs.len() + 4096));
    w.u64(state.device_max.map_or(0, |d| d.get() + 1));
    w.u64(state.conv_max.map_or(0, |c| c.0.saturating_add(1)));
    w.u32(state.devices.len() as u32);
    for (&(uid, device_type), device) in &state.devices {
        w.uid(uid);
        w.u8(device_type as u8);
        w.u64(device.get());
    }
    w.u32(state.convs.len() as u32);
    for (id, c) in &state.convs {
        w.u64(id.0);
        w.u8(c.kind.code());
        w.u64(c.key);
        w.u16(c.members.len() as u16);
        c.members.iter().for_each(|&m| w.uid(m));
        w.u64(c.seq);
        w.u64(c.last_pos);
        w.u32(c.index.len() as u32);
        c.index.iter().for_each(|&p| w.u64(p));
        w.u16(c.cursors.len() as u16);
        for &(uid, seq) in &c.cursors {
            w.uid(uid);
            w.u64(seq.0);
        }
    }
    w.u32(state.cmids.order.len() as u32);
    for &(ts, key, pos) in &state.cmids.order {
        w.u64(ts);
        w.u64(key);
        w.u64(pos);
    }
    w.u32(state.chain_repairs.len() as u32);
    for (&from, &to) in &state.chain_repairs {
        w.u64(from);
        w.u64(to);
    }
    encode_reception(&mut w, &state.reception);
    // Sorted, so the same state always writes the same bytes.
    let mut profiles: Vec<_> = state.profiles.iter().collect();
    profiles.sort_unstable_by_key(|(subject, _)| subject_key(**subject));
    w.u32(profiles.len() as u32);
    for (&subject, stored) in profiles {
        let (code, uid_kind, id) = subject_key(subject);
        w.u8(code);
        w.u8(uid_kind);
        w.u64(id);
        w.u64(stored.version);
        w.u8(stored.profile.name.len() as u8);
        w.0.extend_from_slice(stored.profile.name.as_bytes());
        w.u16(stored.profile.avatar.len() as u16);
        w.0.extend_from_slice(stored.profile.avatar.as_bytes());
    }
    w.0
}

/// A profile's subject as (0 user / 1 conversation / 2 shop, uid kind, id), as in its record.
fn subject_key(subject: Subject) -> (u8, u8, u64) {
    match subject {
        Subject::User(uid) => (0, uid.kind as u8, uid.id),
        Subject::Conv(conv) => (1, 0, conv.0),
        Subject::Shop(shop) => (2, 0, shop.0),
    }
}

/// The reception statistics, sorted (so equal states give equal bytes).
fn encode_reception(w: &mut Writer, reception: &Reception) {
    w.u64(reception.newest_ms);
    let mut waiting: Vec<_> = reception.waiting_since.iter().collect();
    waiting.sort_unstable();
    w.u32(waiting.len() as u32);
    for (conv, &since) in waiting {
        w.u64(conv.0);
        w.u64(since);
    }
    let mut agents: Vec<_> = reception
        .shops
        .iter()
        .flat_map(|(shop, agents)| agents.iter().map(move |(uid, a)| (*shop, *uid, a)))
        .collect();
    agents.sort_unstable_by_key(|&(shop, uid, _)| (shop, uid));
    w.u32(agents.len() as u32);
    for (shop, uid, a) in agents {
        w.u64(shop.0);
        w.uid(uid);
        w.u32(a.open);
        w.u32(a.open_before);
        w.u32(a.hours.len() as u32);
        for h in &a.hours {
            for n in [h.hour, h.assigned, h.resolved, h.messages, h.open] {
                w.u32(n);
            }
            h.replies.iter().for_each(|&n| w.u16(n));
        }
    }
}

fn decode_reception(r: &mut Reader<'_>) -> Result<Reception, &'static str> {
    let mut reception = Reception::default();
    reception.newest_ms = r.u64()?;
    for _ in 0..r.u32()? {
        let (conv, since) = (ConvId(r.u64()?), r.u64()?);
        reception.waiting_since.insert(conv, since);
    }
    for _ in 0..r.u32()? {
        let shop = ShopId(r.u64()?);
        let uid = r.uid()?;
        let mut a = AgentHours {
            open: r.u32()?,
            open_before: r.u32()?,
            ..AgentHours::default()
        };
        for _ in 0..r.u32()? {
            let mut h = [0u32; 5];
            for n in &mut h {
                *n = r.u32()?;
            }
            let mut replies = [0u16; REPLY_BINS];
            for n in &mut replies {
                *n = r.u16()?;
            }
            a.hours.push_back(Hour {
                hour: h[0],
                assigned: h[1],
                resolved: h[2],
                messages: h[3],
                open: h[4],
                replies,
            });
        }
        reception.shops.entry(shop).or_default().insert(uid, a);
    }
    Ok(reception)
}

fn decode(body: &[u8], limits: Limits, version: u32) -> Result<State, &'static str> {
    let mut r = Reader { bytes: body };
    let mut state = State::new(limits).map_err(|_| "no memory for the cmid window")?;
    state.device_max = match r.u64()? {
        0 => None,
        d => Some(DeviceId::from_u64(d - 1).map_err(|e| e.0)?),
    };
    state.conv_max = r.u64()?.checked_sub(1).map(ConvId);
    for _ in 0..r.u32()? {
        let uid = r.uid()?;
        let device_type = DeviceType::from_bits(r.u8()?).ok_or("bad device type")?;
        let device = DeviceId::from_u64(r.u64()?).map_err(|e| e.0)?;
        state.devices.insert((uid, device_type), device);
    }
    for _ in 0..r.u32()? {
        let conv = ConvId(r.u64()?);
        let kind = ConvKind::from_code(r.u8()?).ok_or("bad conversation type")?;
        let key = r.u64()?;
        let members: SmallVec<[Uid; 2]> =
            (0..r.u16()?).map(|_| r.uid()).collect::<Result<_, _>>()?;
        let seq = r.u64()?;
        let last_pos = r.u64()?;
        let index = (0..r.u32()?).map(|_| r.u64()).collect::<Result<_, _>>()?;
        let cursors = (0..r.u16()?)
            .map(|_| Ok((r.uid()?, Seq(r.u64()?))))
            .collect::<Result<_, &'static str>>()?;
        match (kind, members.as_slice()) {
            (ConvKind::Shop, [buyer, ..]) => {
                state.shop_convs.insert((ShopId(key), *buyer), conv);
            }
            (ConvKind::Direct, [a, b]) => {
                state.direct_convs.insert(pair(*a, *b), conv);
            }
            (ConvKind::Group, _) => {
                state.group_convs.insert(key, conv);
            }
            _ => return Err("conversation members do not fit its type"),
        }
        for &m in &members {
            state.user_convs.entry(m).or_default().push(conv);
        }
        state.convs.insert(
            conv,
            Conversation {
                kind,
                key,
                members,
                cursors,
                seq,
                last_pos,
                index,
            },
        );
    }
    for _ in 0..r.u32()? {
        let (ts, key, pos) = (r.u64()?, r.u64()?, r.u64()?);
        state.cmids.order.push_back((ts, key, pos));
    }
    for _ in 0..r.u32()? {
        let (from, to) = (r.u64()?, r.u64()?);
        state.chain_repairs.insert(from, to);
    }
    if version != VERSION_WITHOUT_RECEPTION {
        state.reception = decode_reception(&mut r)?;
    }
    if version == VERSION {
        for _ in 0..r.u32()? {
            let code = r.u8()?;
            let uid_kind = r.u8()?;
            let id = r.u64()?;
            let subject = match code {
                0 => Subject::User(Uid::new(
                    UidKind::from_code(uid_kind).ok_or("bad uid kind")?,
                    id,
                )),
                1 => Subject::Conv(ConvId(id)),
                2 => Subject::Shop(ShopId(id)),
                _ => return Err("bad profile subject"),
            };
            let version = r.u64()?;
            let name_len = usize::from(r.u8()?);
            let name = r.text(name_len)?;
            let avatar_len = usize::from(r.u16()?);
            let avatar = r.text(avatar_len)?;
            if name.len() > PROFILE_NAME_LEN_MAX || avatar.len() > PROFILE_AVATAR_LEN_MAX {
                return Err("profile field over its limit");
            }
            let profile = Arc::new(Profile { name, avatar });
            state
                .profiles
                .insert(subject, StoredProfile { version, profile });
        }
    }
    if !r.bytes.is_empty() {
        return Err("trailing bytes");
    }
    // Replay goes on from here; the store indexes the cmids once it is done.
    state.cmids.deferred = true;
    Ok(state)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn uid(&mut self, uid: Uid) {
        self.u8(uid.kind as u8);
        self.u64(uid.id);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.bytes.len() < n {
            return Err("truncated");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let mut v = [0u8; 4];
        v.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(v))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(v))
    }
    fn uid(&mut self) -> Result<Uid, &'static str> {
        let kind = UidKind::from_code(self.u8()?).ok_or("bad uid kind")?;
        Ok(Uid::new(kind, self.u64()?))
    }
    fn text(&mut self, len: usize) -> Result<String, &'static str> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "profile is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::{MessageRef, Record};

    fn limits() -> Limits {
        Limits {
            index_stride: 2,
            members_max: 10,
            cmid_window_age_ms: 1_000,
            cmid_window_entries_max: 100,
        }
    }

    fn sample() -> State {
        let mut s = State::new(limits()).unwrap();
        let buyer = Uid::new(UidKind::Buyer, 1);
        let records = [
            Record::Device {
                uid: buyer,
                device_type: DeviceType::Web,
                device: DeviceId::from_u64(77).unwrap(),
            },
            Record::Conv {
                conv: ConvId(5),
                kind: ConvKind::Shop,
                key: 3,
                members: [buyer].into_iter().collect(),
            },
            Record::Member {
                conv: ConvId(5),
                uid: Uid::new(UidKind::Agent, 4),
                added: true,
                ts_ms: 1,
            },
            Record::Profile {
                subject: Subject::User(buyer),
                version: 7,
                name: "Bo 😀",
                avatar: "https://a.example/b.png",
            },
            Record::Profile {
                subject: Subject::Conv(ConvId(5)),
                version: 8,
                name: "",
                avatar: "https://a.example/c.png",
            },
            Record::Profile {
                subject: Subject::Shop(ShopId(3)),
                version: 9,
                name: "Shop three",
                avatar: "",
            },
        ];
        for r in &records {
            s.check(r, false).unwrap();
            s.apply(r, 0);
        }
        for seq in 1..=3u64 {
            let cmid = [b'a' + seq as u8];
            let r = Record::Message(MessageRef {
                conv: ConvId(5),
                seq: Seq(seq),
                ts_ms: seq,
                sender: buyer,
                device: DeviceId::from_u64(77).unwrap(),
                cmid: &cmid,
                kind: b"text",
                body: b"",
                prev: if seq == 1 {
                    0
                } else {
                    (1 << 32) | ((seq - 1) * 64)
                },
            });
            s.check(&r, false).unwrap();
            s.apply(&r, (1 << 32) | (seq * 64));
        }
        s
    }

    #[test]
    fn snapshot_round_trips_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample();
        let path = write(dir.path(), &state, 1 << 32 | 640).unwrap();
        let (mut back, pos) = read(&path, limits()).unwrap();
        back.index_cmids();
        assert_eq!(pos, 1 << 32 | 640);
        assert_eq!(encode(&back), encode(&state));
        let c = &back.convs[&ConvId(5)];
        assert_eq!((c.seq, c.index.as_slice()), (3, &[1u64 << 32 | 128][..]));
        assert_eq!(
            back.cmid_position(Uid::new(UidKind::Buyer, 1), ConvId(5), b"c"),
            Some((1 << 32) | 128)
        );
        assert_eq!(
            back.shop_convs[&(ShopId(3), Uid::new(UidKind::Buyer, 1))],
            ConvId(5)
        );
        assert_eq!(list(dir.path()).unwrap(), vec![(1 << 32 | 640, path)]);
        let bo = back
            .profile(Subject::User(Uid::new(UidKind::Buyer, 1)))
            .unwrap();
        assert_eq!((bo.version, bo.profile.name.as_str()), (7, "Bo 😀"));
        assert_eq!(back.profiles, state.profiles);
    }

    /// A snapshot written before profiles (version 3) still loads, with no profiles.
    #[test]
    fn a_version_3_snapshot_loads_without_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample();
        state.profiles.clear();
        let path = write(dir.path(), &state, 99).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        // Drop the empty profiles section (its u32 count) and rewrite the header as version 3.
        bytes.truncate(bytes.len() - 4);
        let body_len = (bytes.len() - HEADER_BYTES) as u64;
        bytes[8..12].copy_from_slice(&VERSION_WITHOUT_PROFILES.to_le_bytes());
        bytes[16..24].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&bytes[16..HEADER_BYTES]),
            &bytes[HEADER_BYTES..],
        );
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let (back, _) = read(&path, limits()).unwrap();
        assert!(back.profiles.is_empty());
        assert_eq!(back.convs.len(), 1);
    }

    #[test]
    fn damaged_snapshot_is_rejected_at_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &sample(), 99).unwrap();
        let good = fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            assert!(read(&path, limits()).is_err(), "byte {i} accepted");
            fs::write(&path, &good[..i]).unwrap();
            assert!(read(&path, limits()).is_err(), "truncation at {i} accepted");
        }
    }
}
