//! The record format: how one message or state change is laid out in a segment.
//!
//! Every record starts with a 16-byte header and is padded to 8 bytes (all integers are
//! little-endian; `docs/storage.md` has the byte-by-byte table):
//!
//! ```text
//!  0  u32  len    bytes of the record without padding, header included; written LAST
//!  4  u32  crc    CRC32C of len's 4 bytes followed by bytes 8..len
//!  8  u8   type   1 message, 2 device, 3 conversation, 4 member (40 bytes with its time;
//!                  32 without, as first written), 5 cursor, 6 profile
//!  9  [7]  small fields of the type
//! 16  ...  payload of the type
//! ```
//!
//! A segment is zero-filled when it is preallocated, so `len == 0` marks the end of the
//! records. Because `len` is stored after everything else, a record interrupted by a crash
//! has `len == 0` (it looks like the end) or fails its CRC; it is never taken for whole.

use std::sync::atomic::{compiler_fence, Ordering};

use chinwag_protocol::{ConvId, DeviceId, DeviceType, Seq, ShopId, Subject, Uid, UidKind};
use smallvec::SmallVec;

use super::error::Position;

/// Bytes of the common header.
pub const HEADER_BYTES: usize = 16;
/// Every record starts at a multiple of this.
pub const ALIGN: usize = 8;
/// Bytes of a message record before its variable fields.
pub const MESSAGE_FIXED_BYTES: usize = 64;
/// Bytes per member of a conversation record.
pub const MEMBER_BYTES: usize = 16;

const TYPE_MESSAGE: u8 = 1;
const TYPE_DEVICE: u8 = 2;
const TYPE_CONV: u8 = 3;
const TYPE_MEMBER: u8 = 4;
const TYPE_CURSOR: u8 = 5;
const TYPE_PROFILE: u8 = 6;

const DEVICE_BYTES: usize = 32;
const CONV_FIXED_BYTES: usize = 32;
/// A member record with its time (since agent statistics); the first format, without it,
/// was [`MEMBER_RECORD_V1_BYTES`] and is still read.
const MEMBER_RECORD_BYTES: usize = 40;
const MEMBER_RECORD_V1_BYTES: usize = 32;
const CURSOR_BYTES: usize = 40;
/// Bytes of a profile record before its name and avatar.
pub const PROFILE_FIXED_BYTES: usize = 32;

// A profile record's name length is one byte and its avatar length two.
const _: () = assert!(chinwag_protocol::limits::PROFILE_NAME_LEN_MAX <= u8::MAX as usize);
const _: () = assert!(chinwag_protocol::limits::PROFILE_AVATAR_LEN_MAX <= u16::MAX as usize);

/// What kind of conversation this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvKind {
    /// One shop and one buyer (plus the agents assigned to it).
    Shop,
    /// Two users.
    Direct,
    /// Members set by a backend service.
    Group,
}

impl ConvKind {
    pub(super) fn code(self) -> u8 {
        match self {
            ConvKind::Shop => 0,
            ConvKind::Direct => 1,
            ConvKind::Group => 2,
        }
    }

    pub(super) fn from_code(code: u8) -> Option<ConvKind> {
        match code {
            0 => Some(ConvKind::Shop),
            1 => Some(ConvKind::Direct),
            2 => Some(ConvKind::Group),
            _ => None,
        }
    }
}

/// A stored message, borrowed from the log's mapping (no copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// Its conversation.
    pub conv: ConvId,
    /// Its seq in the conversation.
    pub seq: Seq,
    /// When it was stored, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Who sent it.
    pub sender: Uid,
    /// From which device.
    pub device: DeviceId,
    /// The sender's client message id.
    pub cmid: &'a [u8],
    /// The message kind (`text`, ...).
    pub kind: &'a [u8],
    /// The body.
    pub body: &'a [u8],
    /// Position of the conversation's previous message (0: none).
    pub(super) prev: Position,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A message.
    Message(MessageRef<'a>),
    /// A device registration: (uid, device type) → device id.
    Device {
        uid: Uid,
        device_type: DeviceType,
        device: DeviceId,
    },
    /// A conversation was created.
    Conv {
        conv: ConvId,
        kind: ConvKind,
        /// The shop id for a shop conversation, the service's key for a group, 0 for direct.
        key: u64,
        members: SmallVec<[Uid; 2]>,
    },
    /// A member joined (`added`) or left a conversation at `ts_ms` (ms since the Unix epoch;
    /// 0 in records written before member records had a time); for a shop conversation an
    /// agent member is an agent assignment.
    Member {
        conv: ConvId,
        uid: Uid,
        added: bool,
        ts_ms: u64,
    },
    /// A read cursor moved.
    Cursor { conv: ConvId, uid: Uid, seq: Seq },
    /// A profile was set: a user's (on its owner shard, or a copy on the owner of a
    /// conversation it wrote in), a conversation's or a shop's. `version` orders the versions
    /// of one subject (a newer one replaces an older; never the other way).
    Profile {
        subject: Subject,
        version: u64,
        name: &'a str,
        avatar: &'a str,
    },
}

/// Padded size of a record of `len` bytes.
pub const fn padded(len: usize) -> usize {
    (len + ALIGN - 1) & !(ALIGN - 1)
}

/// Unpadded length of a message record.
pub const fn message_len(cmid: usize, kind: usize, body: usize) -> usize {
    MESSAGE_FIXED_BYTES + cmid + kind + body
}

/// Unpadded length of a conversation record.
pub const fn conv_len(members: usize) -> usize {
    CONV_FIXED_BYTES + members * MEMBER_BYTES
}

/// Unpadded length of a record, for reserving space before encoding it.
pub fn encoded_len(record: &Record<'_>) -> usize {
    match record {
        Record::Message(m) => message_len(m.cmid.len(), m.kind.len(), m.body.len()),
        Record::Device { .. } => DEVICE_BYTES,
        Record::Conv { members, .. } => conv_len(members.len()),
        Record::Member { .. } => MEMBER_RECORD_BYTES,
        Record::Cursor { .. } => CURSOR_BYTES,
        Record::Profile { name, avatar, .. } => PROFILE_FIXED_BYTES + name.len() + avatar.len(),
    }
}

/// Writes `record` at the start of `dst`, which must hold its padded length and be zero
/// beyond what this writes. Returns the padded length. `len` is stored last.
pub fn encode(dst: &mut [u8], record: &Record<'_>) -> usize {
    let len = encoded_len(record);
    let total = padded(len);
    assert!(dst.len() >= total, "caller reserved too little");
    let mut small = [0u8; 7];
    match record {
        Record::Message(m) => {
            small[0] = m.sender.kind as u8;
            small[1] = m.cmid.len() as u8;
            small[2] = m.kind.len() as u8;
            small[3..7].copy_from_slice(&(m.body.len() as u32).to_le_bytes());
            put_u64s(
                &mut dst[16..64],
                &[
                    m.conv.0,
                    m.seq.0,
                    m.prev,
                    m.ts_ms,
                    m.sender.id,
                    m.device.get(),
                ],
            );
            let cmid_end = 64 + m.cmid.len();
            let kind_end = cmid_end + m.kind.len();
            dst[64..cmid_end].copy_from_slice(m.cmid);
            dst[cmid_end..kind_end].copy_from_slice(m.kind);
            dst[kind_end..len].copy_from_slice(m.body);
        }
        Record::Device {
            uid,
            device_type,
            device,
        } => {
            small[0] = uid.kind as u8;
            small[1] = *device_type as u8;
            put_u64s(&mut dst[16..32], &[uid.id, device.get()]);
        }
        Record::Conv {
            conv,
            kind,
            key,
            members,
        } => {
            small[0] = kind.code();
            small[1..3].copy_from_slice(&(members.len() as u16).to_le_bytes());
            put_u64s(&mut dst[16..32], &[conv.0, *key]);
            for (i, uid) in members.iter().enumerate() {
                let at = CONV_FIXED_BYTES + i * MEMBER_BYTES;
                dst[at] = uid.kind as u8;
                dst[at + 1..at + 8].fill(0);
                dst[at + 8..at + 16].copy_from_slice(&uid.id.to_le_bytes());
            }
        }
        Record::Member {
            conv,
            uid,
            added,
            ts_ms,
        } => {
            small[0] = u8::from(*added);
            small[1] = uid.kind as u8;
            put_u64s(&mut dst[16..40], &[conv.0, uid.id, *ts_ms]);
        }
        Record::Cursor { conv, uid, seq } => {
            small[0] = uid.kind as u8;
            put_u64s(&mut dst[16..40], &[conv.0, uid.id, seq.0]);
        }
        Record::Profile {
            subject,
            version,
            name,
            avatar,
        } => {
            assert!(name.len() <= usize::from(u8::MAX) && avatar.len() <= usize::from(u16::MAX));
            let (code, uid_kind, id) = match *subject {
                Subject::User(uid) => (SUBJECT_USER, uid.kind as u8, uid.id),
                Subject::Conv(conv) => (SUBJECT_CONV, 0, conv.0),
                Subject::Shop(shop) => (SUBJECT_SHOP, 0, shop.0),
            };
            small[0] = code;
            small[1] = uid_kind;
            small[2] = name.len() as u8;
            small[3..5].copy_from_slice(&(avatar.len() as u16).to_le_bytes());
            put_u64s(&mut dst[16..32], &[id, *version]);
            let name_end = PROFILE_FIXED_BYTES + name.len();
            dst[PROFILE_FIXED_BYTES..name_end].copy_from_slice(name.as_bytes());
            dst[name_end..len].copy_from_slice(avatar.as_bytes());
        }
    }
    dst[8] = type_code(record);
    dst[9..16].copy_from_slice(&small);
    dst[len..total].fill(0);
    let crc = checksum(len as u32, &dst[8..len]);
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
    // The length must not reach memory before the rest: a crash between the two then leaves
    // a record that reads as the end of the log, not as a whole one.
    compiler_fence(Ordering::Release);
    dst[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    debug_assert_eq!(decode(dst, 0).ok().flatten(), Some((record.clone(), total)));
    total
}

fn type_code(record: &Record<'_>) -> u8 {
    match record {
        Record::Message(_) => TYPE_MESSAGE,
        Record::Device { .. } => TYPE_DEVICE,
        Record::Conv { .. } => TYPE_CONV,
        Record::Member { .. } => TYPE_MEMBER,
        Record::Cursor { .. } => TYPE_CURSOR,
        Record::Profile { .. } => TYPE_PROFILE,
    }
}

const SUBJECT_USER: u8 = 0;
const SUBJECT_CONV: u8 = 1;
const SUBJECT_SHOP: u8 = 2;

fn checksum(len: u32, rest: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), rest)
}

fn put_u64s(dst: &mut [u8], values: &[u64]) {
    for (chunk, v) in dst.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes the record at `off` of a segment's bytes, checking its CRC.
///
/// `Ok(None)`: `len` is 0, the end of the segment's records. `Ok(Some((record, padded_len)))`:
/// a whole record. `Err`: a record that is torn or corrupt (the caller decides which).
pub fn decode(seg: &[u8], off: usize) -> Result<Option<(Record<'_>, usize)>, &'static str> {
    let Some(head) = seg.get(off..off + HEADER_BYTES) else {
        // Fewer than 16 bytes left: the writer never starts a record there.
        return Ok(None);
    };
    let len = u32_at(head, 0) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len < HEADER_BYTES {
        return Err("record length below the header size");
    }
    let Some(bytes) = seg.get(off..off + len) else {
        return Err("record runs past the segment end");
    };
    if checksum(len as u32, &bytes[8..]) != u32_at(bytes, 4) {
        return Err("record CRC mismatch");
    }
    Ok(Some((parse(bytes)?, padded(len))))
}

/// Decodes the message at `off` without checking its CRC: for reads of records that recovery
/// or this process's own append already checked.
pub fn decode_message(seg: &[u8], off: usize) -> Result<MessageRef<'_>, &'static str> {
    let head = seg
        .get(off..off + HEADER_BYTES)
        .ok_or("position past the segment end")?;
    let len = u32_at(head, 0) as usize;
    let bytes = seg
        .get(off..off + len)
        .ok_or("record runs past the segment end")?;
    match parse(bytes)? {
        Record::Message(m) => Ok(m),
        _ => Err("position does not hold a message"),
    }
}

/// Parses a record whose length and CRC are known to be right.
fn parse(b: &[u8]) -> Result<Record<'_>, &'static str> {
    let len = b.len();
    let uid = |kind: u8, id: u64| -> Result<Uid, &'static str> {
        Ok(Uid::new(
            UidKind::from_code(kind).ok_or("bad uid kind")?,
            id,
        ))
    };
    match b[8] {
        TYPE_MESSAGE => {
            let cmid_len = usize::from(b[10]);
            let kind_len = usize::from(b[11]);
            let body_len = u32_at(b, 12) as usize;
            if len != message_len(cmid_len, kind_len, body_len) {
                return Err("message length does not match its fields");
            }
            let cmid_end = 64 + cmid_len;
            let kind_end = cmid_end + kind_len;
            Ok(Record::Message(MessageRef {
                conv: ConvId(u64_at(b, 16)),
                seq: Seq(u64_at(b, 24)),
                prev: u64_at(b, 32),
                ts_ms: u64_at(b, 40),
                sender: uid(b[9], u64_at(b, 48))?,
                device: DeviceId::from_u64(u64_at(b, 56)).map_err(|e| e.0)?,
                cmid: &b[64..cmid_end],
                kind: &b[cmid_end..kind_end],
                body: &b[kind_end..],
            }))
        }
        TYPE_DEVICE => {
            if len != DEVICE_BYTES {
                return Err("device record has the wrong length");
            }
            Ok(Record::Device {
                uid: uid(b[9], u64_at(b, 16))?,
                device_type: DeviceType::from_bits(b[10]).ok_or("bad device type")?,
                device: DeviceId::from_u64(u64_at(b, 24)).map_err(|e| e.0)?,
            })
        }
        TYPE_CONV => {
            let count = usize::from(u16::from_le_bytes([b[10], b[11]]));
            if len != conv_len(count) {
                return Err("conversation record has the wrong length");
            }
            let kind = ConvKind::from_code(b[9]).ok_or("bad conversation type")?;
            let key = u64_at(b, 24);
            let members = b[CONV_FIXED_BYTES..]
                .chunks_exact(MEMBER_BYTES)
                .map(|m| uid(m[0], u64_at(m, 8)))
                .collect::<Result<_, _>>()?;
            Ok(Record::Conv {
                conv: ConvId(u64_at(b, 16)),
                kind,
                key,
                members,
            })
        }
        TYPE_MEMBER => {
            if !(len == MEMBER_RECORD_BYTES || len == MEMBER_RECORD_V1_BYTES) || b[9] > 1 {
                return Err("bad member record");
            }
            Ok(Record::Member {
                conv: ConvId(u64_at(b, 16)),
                uid: uid(b[10], u64_at(b, 24))?,
                added: b[9] == 1,
                ts_ms: if len == MEMBER_RECORD_BYTES {
                    u64_at(b, 32)
                } else {
                    0
                },
            })
        }
        TYPE_CURSOR => {
            if len != CURSOR_BYTES {
                return Err("cursor record has the wrong length");
            }
            Ok(Record::Cursor {
                conv: ConvId(u64_at(b, 16)),
                uid: uid(b[9], u64_at(b, 24))?,
                seq: Seq(u64_at(b, 32)),
            })
        }
        TYPE_PROFILE => {
            let name_len = usize::from(b[11]);
            let avatar_len = usize::from(u16::from_le_bytes([b[12], b[13]]));
            if len != PROFILE_FIXED_BYTES + name_len + avatar_len {
                return Err("profile length does not match its fields");
            }
            let id = u64_at(b, 16);
            let subject = match b[9] {
                SUBJECT_USER => Subject::User(uid(b[10], id)?),
                SUBJECT_CONV => Subject::Conv(ConvId(id)),
                SUBJECT_SHOP => Subject::Shop(ShopId(id)),
                _ => return Err("bad profile subject"),
            };
            let name_end = PROFILE_FIXED_BYTES + name_len;
            let text = |bytes| std::str::from_utf8(bytes).map_err(|_| "profile is not UTF-8");
            Ok(Record::Profile {
                subject,
                version: u64_at(b, 24),
                name: text(&b[PROFILE_FIXED_BYTES..name_end])?,
                avatar: text(&b[name_end..])?,
            })
        }
        _ => Err("unknown record type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device() -> DeviceId {
        DeviceId::from_u64(0x0000_4000_0001_0002).unwrap()
    }

    fn samples() -> Vec<Record<'static>> {
        vec![
            Record::Message(MessageRef {
                conv: ConvId(7),
                seq: Seq(3),
                ts_ms: 1_700_000_000_000,
                sender: Uid::new(UidKind::Buyer, 1001),
                device: device(),
                cmid: b"c-1",
                kind: b"text",
                body: b"hello",
                prev: 1 << 32 | 64,
            }),
            Record::Device {
                uid: Uid::new(UidKind::Agent, 9),
                device_type: DeviceType::Ios,
                device: device(),
            },
            Record::Conv {
                conv: ConvId(8),
                kind: ConvKind::Shop,
                key: 5,
                members: [Uid::new(UidKind::Wechat, 2)].into_iter().collect(),
            },
            Record::Member {
                conv: ConvId(8),
                uid: Uid::new(UidKind::Agent, 3),
                added: true,
                ts_ms: 1_700_000_000_001,
            },
            Record::Cursor {
                conv: ConvId(8),
                uid: Uid::new(UidKind::Agent, 3),
                seq: Seq(12),
            },
            Record::Profile {
                subject: Subject::User(Uid::new(UidKind::Agent, 3)),
                version: 1_700_000_000_001,
                name: "Ann 😀",
                avatar: "https://a.example/3.png",
            },
            Record::Profile {
                subject: Subject::Conv(ConvId(8)),
                version: 2,
                name: "",
                avatar: "",
            },
            Record::Profile {
                subject: Subject::Shop(ShopId(5)),
                version: 3,
                name: "Shop five",
                avatar: "",
            },
        ]
    }

    #[test]
    fn every_type_round_trips() {
        for record in samples() {
            let mut buf = vec![0u8; 256];
            let n = encode(&mut buf, &record);
            assert_eq!(n % ALIGN, 0);
            assert_eq!(decode(&buf, 0).unwrap(), Some((record, n)));
            assert_eq!(
                decode(&buf, n).unwrap(),
                None,
                "zeros after a record mark the end"
            );
        }
    }

    /// Member records written before they had a time (32 bytes) still read, with time 0.
    #[test]
    fn a_member_record_without_a_time_still_reads() {
        let mut buf = vec![0u8; 64];
        buf[8] = TYPE_MEMBER;
        buf[9] = 1;
        buf[10] = UidKind::Agent as u8;
        put_u64s(&mut buf[16..32], &[8, 3]);
        let crc = checksum(32, &buf[8..32]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        buf[0..4].copy_from_slice(&32u32.to_le_bytes());
        let expected = Record::Member {
            conv: ConvId(8),
            uid: Uid::new(UidKind::Agent, 3),
            added: true,
            ts_ms: 0,
        };
        assert_eq!(decode(&buf, 0).unwrap(), Some((expected, 32)));
    }

    #[test]
    fn a_record_without_its_length_reads_as_the_end() {
        let mut buf = vec![0u8; 256];
        encode(&mut buf, &samples()[0]);
        buf[0..4].fill(0);
        assert_eq!(decode(&buf, 0).unwrap(), None);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        for record in samples() {
            let mut buf = vec![0u8; 256];
            let n = encode(&mut buf, &record);
            let len = encoded_len(&record);
            for bit in 0..len * 8 {
                let mut bad = buf.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                match decode(&bad, 0) {
                    Err(_) => {}
                    // A flipped length bit may turn the record into a zero length (the end).
                    Ok(None) => assert!(bit < 32),
                    Ok(Some(got)) => panic!("bit {bit} of {n} accepted: {got:?}"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn messages_round_trip(cmid in proptest::collection::vec(any::<u8>(), 0..=255),
                               kind in proptest::collection::vec(any::<u8>(), 0..=255),
                               body in proptest::collection::vec(any::<u8>(), 0..2000),
                               conv: u64, seq: u64, ts: u64, prev: u64, id: u64) {
            let record = Record::Message(MessageRef {
                conv: ConvId(conv), seq: Seq(seq), ts_ms: ts,
                sender: Uid::new(UidKind::Service, id), device: device(),
                cmid: &cmid, kind: &kind, body: &body, prev,
            });
            let mut buf = vec![0u8; padded(encoded_len(&record)) + 16];
            let n = encode(&mut buf, &record);
            prop_assert_eq!(decode(&buf, 0).unwrap(), Some((record, n)));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, 0);
            let _ = decode_message(&bytes, 0);
        }
    }
}
