//! A connection's outbound queue: whole frames waiting to be written, in order.
//!
//! Frames are `Bytes`, so a frame sent to many connections is one allocation shared by all of
//! their queues. An empty outbox owns no memory.
//!
//! [`HeldPushes`] is the shard's list of outboxes whose pushes wait for the shard's next push
//! flush (`push_flush_delay_ms`): one deadline for the whole shard, not a timer per socket.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};
use mio::Token;

/// Slices handed to one `writev`; Linux allows 1024, and 64 frames is already more than a loop
/// turn produces for one connection in practice.
const IOVECS_MAX: usize = 64;

#[derive(Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

impl Outbox {
    pub fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Bytes queued.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Fills `slices` with the front of the queue; returns how many were filled.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; IOVECS_MAX]) -> usize {
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(self.frames.iter()) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }

    /// Drops the first `written` bytes, which the socket took.
    pub fn advance(&mut self, mut written: usize) {
        debug_assert!(written <= self.bytes);
        self.bytes -= written;
        while written > 0 {
            // Cannot be None: `written` is at most the bytes queued.
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() > written {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.frames.pop_front();
        }
        if self.frames.is_empty() {
            // Give the ring's memory back: an idle connection must not own a write buffer.
            self.frames = VecDeque::new();
        }
    }

    /// Drops everything queued; returns the bytes dropped.
    pub fn clear(&mut self) -> usize {
        let dropped = self.bytes;
        *self = Outbox::default();
        dropped
    }
}

/// The sessions holding pushes until the shard's next push flush. With `push_flush_delay_ms`
/// set, a push to a session that has nothing else to write this turn is queued in its outbox
/// and the session is listed here instead of being written at the end of the turn; the first
/// session listed after a flush sets the deadline, so no push waits longer than the delay (plus
/// the loop turn it is due in), and a socket is written at most once per delay for its pushes.
/// A reply to the session's own request is written at once and takes the held pushes with it,
/// in order.
#[derive(Default)]
pub struct HeldPushes {
    delay_ms: u64,
    tokens: Vec<Token>,
    /// When the listed sessions are due to be written (meaningless while `tokens` is empty).
    due_ms: u64,
}

impl HeldPushes {
    pub fn new(delay_ms: u64) -> HeldPushes {
        HeldPushes {
            delay_ms,
            ..HeldPushes::default()
        }
    }

    /// Whether pushes are held at all (`push_flush_delay_ms` > 0).
    pub fn enabled(&self) -> bool {
        self.delay_ms > 0
    }

    /// Lists a session whose pushes now wait; the caller lists each session once per flush.
    pub fn hold(&mut self, token: Token, now_ms: u64) {
        if self.tokens.is_empty() {
            self.due_ms = now_ms.saturating_add(self.delay_ms);
        }
        self.tokens.push(token);
    }

    /// When the shard must wake to write what is held, if anything is.
    pub fn due_ms(&self) -> Option<u64> {
        (!self.tokens.is_empty()).then_some(self.due_ms)
    }

    /// If the held pushes are due at `now_ms`, moves their sessions to `dirty` (the turn's list
    /// of sessions to write). A session may also be in `dirty` already, or be gone, or its slot
    /// be another session's by now: writing it is harmless (an empty outbox costs no system
    /// call), and the shard skips a slot without a session.
    pub fn release_due(&mut self, now_ms: u64, dirty: &mut Vec<Token>) {
        if !self.tokens.is_empty() && now_ms >= self.due_ms {
            dirty.append(&mut self.tokens);
        }
    }
}

pub fn empty_slices<'a>() -> [IoSlice<'a>; IOVECS_MAX] {
    [IoSlice::new(&[]); IOVECS_MAX]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_across_and_within_frames() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"abc"));
        outbox.push(Bytes::from_static(b"defg"));
        assert_eq!(outbox.len_bytes(), 7);
        outbox.advance(4);
        let mut slices = empty_slices();
        let n = outbox.slices(&mut slices);
        assert_eq!(n, 1);
        assert_eq!(&*slices[0], b"efg");
        outbox.advance(3);
        assert!(outbox.is_empty());
        assert_eq!(outbox.frames.capacity(), 0);
    }

    #[test]
    fn held_pushes_are_released_when_the_first_is_due() {
        let mut held = HeldPushes::new(5);
        let mut dirty = Vec::new();
        assert_eq!(held.due_ms(), None);
        held.hold(Token(1), 100);
        // A later hold does not move the deadline: the first push waits at most the delay.
        held.hold(Token(2), 103);
        assert_eq!(held.due_ms(), Some(105));
        held.release_due(104, &mut dirty);
        assert!(dirty.is_empty());
        held.release_due(105, &mut dirty);
        assert_eq!(dirty, [Token(1), Token(2)]);
        assert_eq!(held.due_ms(), None);
        // The next hold starts a new deadline from its own time.
        held.hold(Token(3), 200);
        assert_eq!(held.due_ms(), Some(205));
    }

    #[test]
    fn no_delay_holds_nothing() {
        assert!(!HeldPushes::new(0).enabled());
        assert!(HeldPushes::new(1).enabled());
    }
}
