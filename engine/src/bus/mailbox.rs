//! A shard's inbound queue: work that other threads hand to this shard, because only this
//! shard may touch its sockets.
//!
//! A bounded lock-free queue plus the shard's `mio::Waker`. Senders wake the shard only when
//! no wake-up is already pending, so a burst of pushes costs one `eventfd` write, and the shard
//! drains the queue in batches once per loop turn.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam::queue::ArrayQueue;

use crate::bus::BusMsg;

/// One shard's inbound queue.
pub struct Mailbox {
    queue: ArrayQueue<BusMsg>,
    waker: mio::Waker,
    wake_pending: AtomicBool,
}

impl Mailbox {
    pub fn new(capacity: usize, waker: mio::Waker) -> Mailbox {
        Mailbox {
            queue: ArrayQueue::new(capacity),
            waker,
            wake_pending: AtomicBool::new(false),
        }
    }

    /// Hands `msg` to the shard. Gives it back if the queue is full: the sender decides whether
    /// to drop it or to shed the load some other way, but never blocks.
    pub fn send(&self, msg: BusMsg) -> Result<(), BusMsg> {
        self.queue.push(msg)?;
        self.wake();
        Ok(())
    }

    /// Wakes the shard's poll unless a wake-up is already on its way.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed eventfd write means the counter is saturated, i.e. the shard is woken.
            let _ = self.waker.wake();
        }
    }

    /// Takes up to `max` messages. Called by the owning shard only.
    pub fn drain(&self, max: usize, mut handle: impl FnMut(BusMsg)) {
        // Cleared before popping: a message pushed after this point either is popped below or
        // wakes the shard again, so none is left behind unseen.
        self.wake_pending.store(false, Ordering::Release);
        for _ in 0..max {
            match self.queue.pop() {
                Some(msg) => handle(msg),
                None => return,
            }
        }
        // Left over from a burst larger than a batch: make sure the next turn comes round.
        if !self.queue.is_empty() {
            self.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }
}
