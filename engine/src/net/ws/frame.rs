//! WebSocket framing (RFC 6455 §5): parsing frame headers, unmasking in place, encoding the
//! server's (unmasked) frames, and the checks the RFC requires of close frames and text.
//!
//! This module owns no buffers. The shard reads into its own buffer and hands slices here; a
//! parsed [`Header`] says how many bytes the whole frame needs, so the caller can tell a whole
//! frame from a partial one without copying anything.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2). Reserved opcodes never get this far: [`parse_header`]
/// rejects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames (close, ping, pong) may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// The header of one client frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: [u8; 4],
    /// Length of the header itself (6 to 14 bytes for a masked frame).
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    /// Bytes the whole frame occupies: header plus payload.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Why a frame cannot be accepted; each maps to the close code the RFC asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The peer broke the framing rules: close 1002.
    Protocol,
    /// A frame or message over the configured limit: close 1009.
    TooLarge,
    /// A text message or close reason that is not UTF-8: close 1007.
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol => CLOSE_PROTOCOL_ERROR,
            FrameError::TooLarge => CLOSE_TOO_LARGE,
            FrameError::InvalidUtf8 => CLOSE_INVALID_DATA,
        }
    }
}

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_LARGE: u16 = 1009;

/// The longest header a server frame needs: 2 bytes plus an 8-byte extended length.
pub const SERVER_HEADER_MAX: usize = 10;

/// Parses the header at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header. `frame_bytes_max` bounds
/// the payload; it is checked here, before any payload is buffered, so a peer cannot make the
/// shard hold more than the limit by announcing a big frame.
pub fn parse_header(buf: &[u8], frame_bytes_max: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    // No extension is negotiated, so every RSV bit must be clear (§5.2).
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::Protocol)?;
    // Client-to-server frames must be masked (§5.1).
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol);
    }
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 2)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(len);
            // The most significant bit must be 0 (§5.2).
            if len >> 63 != 0 {
                return Err(FrameError::Protocol);
            }
            (len, 8)
        }
        short => (short as u64, 0),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::Protocol);
    }
    if payload_len > frame_bytes_max as u64 {
        return Err(FrameError::TooLarge);
    }
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[header_len - 4..header_len]);
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        // Fits: payload_len <= frame_bytes_max, a usize.
        payload_len: payload_len as usize,
    }))
}

/// XORs `payload` with the frame's mask, in place. `offset` is the position of `payload[0]`
/// within the frame's payload, for unmasking a payload in several pieces.
pub fn unmask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    let mask = rotate_mask(mask, offset);
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    // Eight bytes at a time; the mask's period (4) divides 8, so every chunk starts at the same
    // mask phase.
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

fn rotate_mask(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ]
}

/// Encodes one whole, unmasked server frame. The result can be shared by every socket that
/// sends it (server frames are never masked, so the bytes are the same for each).
pub fn encode(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(SERVER_HEADER_MAX + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Writes the header of a final, unmasked server frame of `payload_len` bytes.
pub fn put_header(out: &mut BytesMut, opcode: Opcode, payload_len: usize) {
    let mut header = [0u8; SERVER_HEADER_MAX];
    let len = write_header(&mut header, opcode, payload_len);
    out.put_slice(&header[..len]);
}

/// Writes a server frame header for `payload_len` bytes into `header`; returns its length.
fn write_header(header: &mut [u8; SERVER_HEADER_MAX], opcode: Opcode, payload_len: usize) -> usize {
    header[0] = 0x80 | opcode.bits();
    if payload_len < 126 {
        header[1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        header[1] = 126;
        header[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// Encodes a server frame whose payload `write` appends, in one buffer and without copying
/// the payload: the header goes into room left in front of it once its length is known.
pub fn encode_with(opcode: Opcode, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(SERVER_HEADER_MAX + 128);
    out.put_bytes(0, SERVER_HEADER_MAX);
    write(&mut out);
    let mut header = [0u8; SERVER_HEADER_MAX];
    let len = write_header(&mut header, opcode, out.len() - SERVER_HEADER_MAX);
    let start = SERVER_HEADER_MAX - len;
    out[start..SERVER_HEADER_MAX].copy_from_slice(&header[..len]);
    out.advance(start);
    out.freeze()
}

/// Encodes a close frame with `code` and a reason (at most 123 bytes, so the frame is legal).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let reason = truncate_utf8(reason, 123);
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    encode(Opcode::Close, &payload[..2 + reason.len()])
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a peer's close frame asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseRequest {
    /// No status code: answer with 1000.
    Empty,
    /// A valid status code: echo it.
    Code(u16),
}

/// Checks a close frame's payload (§5.5.1, §7.4): empty, or a valid code and a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<CloseRequest, FrameError> {
    match payload.len() {
        0 => Ok(CloseRequest::Empty),
        1 => Err(FrameError::Protocol),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_is_valid(code) {
                return Err(FrameError::Protocol);
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(CloseRequest::Code(code))
        }
    }
}

/// Codes a peer may send (§7.4.1, IANA registry): 1004-1006 and 1015 are reserved and must
/// never be on the wire; below 1000 and 1016..=2999 are unassigned.
fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Incremental UTF-8 check for a text message arriving in fragments, so invalid text is
/// refused as soon as its first bad byte arrives (§8.1 "fail fast") instead of at the end.
#[derive(Debug, Default)]
pub struct Utf8Check {
    /// Bytes of the message already known to be whole, valid characters.
    valid_len: usize,
}

impl Utf8Check {
    /// Checks the bytes of `message` after those already checked. A character cut at the end
    /// is fine unless `fin` says the message is complete.
    pub fn feed(&mut self, message: &[u8], fin: bool) -> Result<(), FrameError> {
        match std::str::from_utf8(&message[self.valid_len..]) {
            Ok(_) => {
                self.valid_len = message.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.valid_len += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_with_writes_the_same_bytes_as_encode() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload = vec![0x5a; len];
            let direct = encode(Opcode::Binary, &payload);
            let in_place = encode_with(Opcode::Binary, |out| out.put_slice(&payload));
            assert_eq!(direct, in_place, "payload of {len} bytes");
        }
    }

    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else if payload.len() <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn parses_and_unmasks_each_length_form() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut frame = client_frame(0x82, &payload, [1, 2, 3, 4]);
            let header = parse_header(&frame, 1 << 20).unwrap().unwrap();
            assert_eq!(header.opcode, Opcode::Binary);
            assert!(header.fin);
            assert_eq!(header.frame_len(), frame.len());
            let body = &mut frame[header.header_len..];
            unmask(body, header.mask, 0);
            assert_eq!(body, &payload[..]);
        }
    }

    #[test]
    fn unmask_in_pieces_matches_unmask_whole() {
        let mask = [9, 8, 7, 6];
        let mut whole: Vec<u8> = (0..100u8).collect();
        let mut split = whole.clone();
        unmask(&mut whole, mask, 0);
        let (a, b) = split.split_at_mut(13);
        unmask(a, mask, 0);
        unmask(b, mask, 13);
        assert_eq!(whole, split);
    }

    #[test]
    fn partial_header_needs_more() {
        let frame = client_frame(0x81, &[0u8; 300], [1, 2, 3, 4]);
        for cut in 0..8 {
            assert_eq!(parse_header(&frame[..cut], 1 << 20), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn rejects_frame_longer_than_limit() {
        let frame = client_frame(0x82, &[0u8; 200], [0; 4]);
        assert_eq!(parse_header(&frame, 199), Err(FrameError::TooLarge));
        assert!(parse_header(&frame, 200).is_ok());
    }

    #[test]
    fn rejects_protocol_violations() {
        let unmasked = [0x81u8, 0x00];
        assert_eq!(parse_header(&unmasked, 100), Err(FrameError::Protocol));
        let rsv = client_frame(0xC1, b"", [0; 4]);
        assert_eq!(parse_header(&rsv, 100), Err(FrameError::Protocol));
        let reserved_opcode = client_frame(0x83, b"", [0; 4]);
        assert_eq!(
            parse_header(&reserved_opcode, 100),
            Err(FrameError::Protocol)
        );
        let fragmented_ping = client_frame(0x09, b"", [0; 4]);
        assert_eq!(
            parse_header(&fragmented_ping, 100),
            Err(FrameError::Protocol)
        );
        let long_ping = client_frame(0x89, &[0; 126], [0; 4]);
        assert_eq!(parse_header(&long_ping, 1000), Err(FrameError::Protocol));
    }

    #[test]
    fn encodes_server_frames_unmasked() {
        assert_eq!(&encode(Opcode::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let big = encode(Opcode::Binary, &[0u8; 300]);
        assert_eq!(&big[..4], &[0x82, 126, 1, 44]);
        let huge = encode(Opcode::Binary, &[0u8; 70000]);
        assert_eq!(huge[1], 127);
        assert_eq!(huge.len(), 10 + 70000);
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(parse_close(b""), Ok(CloseRequest::Empty));
        assert_eq!(parse_close(&[3]), Err(FrameError::Protocol));
        assert_eq!(
            parse_close(&1000u16.to_be_bytes()),
            Ok(CloseRequest::Code(1000))
        );
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()),
                Err(FrameError::Protocol),
                "{bad}"
            );
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xFF, 0xFE]);
        assert_eq!(parse_close(&bad_reason), Err(FrameError::InvalidUtf8));
        let close = encode_close(1001, &"é".repeat(100));
        assert!(close.len() <= 2 + 125);
        assert!(parse_close(&close[2..]).is_ok());
    }

    #[test]
    fn utf8_check_accepts_split_characters_and_fails_fast() {
        let text = "héllo €".as_bytes();
        let mut check = Utf8Check::default();
        // Cut inside the 3-byte euro sign: fine until the message ends.
        let cut = text.len() - 1;
        assert!(check.feed(&text[..cut], false).is_ok());
        assert!(check.feed(&text[..cut], true).is_err());
        let mut check = Utf8Check::default();
        assert!(check.feed(&text[..cut], false).is_ok());
        assert!(check.feed(text, true).is_ok());
        let mut check = Utf8Check::default();
        assert_eq!(
            check.feed(&[b'a', 0xFF], false),
            Err(FrameError::InvalidUtf8)
        );
    }
}

#[cfg(test)]
mod random_input {
    use super::*;

    /// Arbitrary bytes never make the parser panic or promise more than the buffer and the
    /// limit allow (a poor man's fuzz run, deterministic so it can sit in the unit tests).
    #[test]
    fn parse_header_survives_random_bytes() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buf = [0u8; 16];
        for _ in 0..200_000 {
            let len = (next() % 17) as usize;
            for byte in &mut buf[..len] {
                *byte = next() as u8;
            }
            if let Ok(Some(header)) = parse_header(&buf[..len], 1000) {
                assert!(header.header_len <= len);
                assert!(header.payload_len <= 1000);
                let mut payload = vec![0u8; header.payload_len];
                unmask(&mut payload, header.mask, (next() % 8) as usize);
            }
            let mut check = Utf8Check::default();
            let _ = check.feed(&buf[..len], next() % 2 == 0);
        }
    }
}
