//! A connection's outbound queue: whole frames waiting to be written, in order.
//!
//! Frames are `Bytes`, so a frame sent to many connections is one allocation shared by all of
//! their queues. An empty outbox owns no memory.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

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
}
