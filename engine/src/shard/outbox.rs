//! A connection's outbound queue: whole frames waiting to be written, in order.
//!
//! Frames are `Bytes`, so a frame sent to many connections is one allocation shared by all of
//! their queues. An empty outbox owns no memory.
//!
//! [`HeldPushes`] holds the pushes that wait for the shard's next push flush
//! (`push_flush_delay_ms`): one deadline for the whole shard, not a timer per socket, and the
//! fan-outs themselves rather than a copy in every recipient's outbox.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use ahash::AHashMap;
use bytes::{Buf, Bytes, BytesMut};
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{DeviceId, Uid};
use smallvec::SmallVec;

use crate::bus::Fanout;

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

    /// Puts `frame` ahead of everything queued from the `index`th frame on (frames ahead of
    /// it, possibly partly written, stay first).
    pub fn insert(&mut self, index: usize, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.insert(index, frame);
    }

    /// Frames queued.
    pub fn frame_count(&self) -> usize {
        self.frames.len()
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

/// Fan-outs held at most this many at once; one more releases them at the end of the turn, so
/// a flood of pushes within one delay cannot hold memory without bound.
pub const HELD_FANOUTS_MAX: usize = 4096;

/// Users named by the held runs at most (the sum of each run's list: one group of the largest
/// `members_max` fits); more release them at the end of the turn. It bounds the memory the
/// lists pin and the index of users to runs ([`HeldPushes::take_for`]), a few MiB at most.
pub const HELD_USERS_MAX: usize = 65_536;

/// The pushes ([`Fanout`]s) a shard holds until its next push flush (`push_flush_delay_ms`),
/// in arrival order, and which sessions already have some of them.
///
/// A held fan-out is not given to its recipients when it arrives: the shard keeps the
/// `Fanout` itself, and at the flush resolves each [`Run`] (consecutive fan-outs to the same
/// users) once, giving every recipient session one buffer with all of the run's frames for
/// it. So a group's messages cost one pass over its members per flush, not one per message,
/// and one write per socket. The first fan-out held after a flush sets the deadline, so no
/// push waits longer than the delay (plus the loop turn it is due in); more than
/// [`HELD_FANOUTS_MAX`] fan-outs, [`HELD_USERS_MAX`] users or `bytes_max` bytes of frames are
/// released at once.
///
/// A reply to a session's own request is not held: it takes the session's held pushes along,
/// ahead of it ([`HeldPushes::take_for`]), and the flush then gives that session only what
/// arrived after. A session that logs in during the delay gets only what arrived after its
/// login ([`HeldPushes::skip_for`]), as if each push had been handed out when it came.
/// (The default holds nothing: delay 0.)
#[derive(Default)]
pub struct HeldPushes {
    delay_ms: u64,
    /// Frame bytes (both encodings) held at most before they are released early.
    bytes_max: usize,
    /// When the held fan-outs are due (meaningless while `runs` is empty).
    due_ms: u64,
    runs: Vec<Run>,
    /// Fan-outs held; a fan-out's index is its position in arrival order since the last flush.
    fanouts: usize,
    bytes: usize,
    /// The users named by the runs (the sum of their lists).
    users: usize,
    /// User → the runs that name it (indices into `runs`), so that a reply finds its
    /// session's held pushes without scanning every run: in chat each push is its own run.
    runs_of: AHashMap<Uid, SmallVec<[u32; 2]>>,
    /// Slot → (generation, index of the first held fan-out that session still lacks), for the
    /// sessions that took held pushes with a reply or logged in during the delay.
    taken: AHashMap<u32, (u32, usize)>,
}

impl HeldPushes {
    /// `bytes_max`: the most frame bytes held before they are released early; it must leave
    /// room in a session's send queue, since a session takes a run's frames in one piece.
    pub fn new(delay_ms: u64, bytes_max: usize) -> HeldPushes {
        HeldPushes {
            delay_ms,
            bytes_max,
            due_ms: 0,
            runs: Vec::new(),
            fanouts: 0,
            bytes: 0,
            users: 0,
            runs_of: AHashMap::new(),
            taken: AHashMap::new(),
        }
    }

    /// Whether pushes are held at all (`push_flush_delay_ms` > 0).
    pub fn enabled(&self) -> bool {
        self.delay_ms > 0
    }

    /// Whether any fan-out waits.
    pub fn is_holding(&self) -> bool {
        !self.runs.is_empty()
    }

    /// Holds `fanout` until the flush.
    pub fn hold(&mut self, fanout: Arc<Fanout>, now_ms: u64) {
        if self.runs.is_empty() {
            self.due_ms = now_ms.saturating_add(self.delay_ms);
        }
        self.bytes += fanout.json.len() + fanout.binary.len();
        match self.runs.last_mut() {
            Some(run) if run.users() == &fanout.users[..] => run.push(fanout),
            _ => {
                self.users += fanout.users.len();
                // Fits: runs are at most HELD_FANOUTS_MAX.
                let run = self.runs.len() as u32;
                for uid in &fanout.users {
                    let runs = self.runs_of.entry(*uid).or_default();
                    if runs.last() != Some(&run) {
                        runs.push(run);
                    }
                }
                self.runs.push(Run::new(self.fanouts, fanout));
            }
        }
        self.fanouts += 1;
        if self.bytes >= self.bytes_max
            || self.fanouts >= HELD_FANOUTS_MAX
            || self.users >= HELD_USERS_MAX
        {
            self.due_ms = now_ms;
        }
    }

    /// When the shard must wake to release what is held, if anything is.
    pub fn due_ms(&self) -> Option<u64> {
        (!self.runs.is_empty()).then_some(self.due_ms)
    }

    /// Whether the held fan-outs are due at `now_ms`.
    pub fn is_due(&self, now_ms: u64) -> bool {
        !self.runs.is_empty() && now_ms >= self.due_ms
    }

    /// Takes everything held, for the shard to hand out; holding starts afresh.
    pub fn release(&mut self) -> Release {
        self.fanouts = 0;
        self.bytes = 0;
        self.users = 0;
        // Keeps its capacity for the next delay (at most HELD_USERS_MAX entries' worth).
        self.runs_of.clear();
        Release {
            runs: std::mem::take(&mut self.runs),
            taken: std::mem::take(&mut self.taken),
        }
    }

    /// A session logged in: the fan-outs held so far are not for it (it was not a recipient
    /// when they came).
    pub fn skip_for(&mut self, slot: u32, generation: u32) {
        if self.fanouts > 0 {
            self.taken.insert(slot, (generation, self.fanouts));
        }
    }

    /// The held pushes for one session (user `uid`, `device`, pushes in `encoding`) that it
    /// has not had yet, as one buffer, with the number of frames in it; from now on the flush
    /// gives it only fan-outs held after this call. For a reply that must not overtake them.
    pub fn take_for(
        &mut self,
        slot: u32,
        generation: u32,
        uid: Uid,
        device: DeviceId,
        encoding: Encoding,
    ) -> Option<(Bytes, u64)> {
        // No run names this user: nothing is held for it (and what comes later is later).
        let runs = self.runs_of.get(&uid)?;
        let from = from_in(&self.taken, slot, generation);
        if from >= self.fanouts {
            return None;
        }
        let parts: SmallVec<[(Bytes, u64); 4]> = runs
            .iter()
            .filter_map(|&run| self.runs[run as usize].frames_for(from, device, encoding))
            .collect();
        self.taken.insert(slot, (generation, self.fanouts));
        let frames = parts.iter().map(|(_, n)| n).sum();
        (frames > 0).then(|| (concat(parts.iter().map(|(b, _)| b)), frames))
    }
}

/// What one flush hands out: the held runs, and where each session that took some already
/// stands.
pub struct Release {
    pub runs: Vec<Run>,
    taken: AHashMap<u32, (u32, usize)>,
}

impl Release {
    /// The index of the first held fan-out the session in `slot` of `generation` lacks.
    pub fn from(&self, slot: u32, generation: u32) -> usize {
        if self.taken.is_empty() {
            return 0;
        }
        from_in(&self.taken, slot, generation)
    }
}

fn from_in(taken: &AHashMap<u32, (u32, usize)>, slot: u32, generation: u32) -> usize {
    match taken.get(&slot) {
        Some(&(g, from)) if g == generation => from,
        _ => 0,
    }
}

/// Consecutive held fan-outs to the same users: resolved to sessions once per flush.
pub struct Run {
    /// The index of the run's first fan-out.
    first: usize,
    fanouts: Vec<Arc<Fanout>>,
    /// Devices one of the fan-outs leaves out (the senders').
    excepts: SmallVec<[DeviceId; 2]>,
    /// Every frame of the run in one buffer, per encoding, made on first use.
    json: OnceCell<Bytes>,
    binary: OnceCell<Bytes>,
}

impl Run {
    fn new(first: usize, fanout: Arc<Fanout>) -> Run {
        let mut run = Run {
            first,
            fanouts: Vec::new(),
            excepts: SmallVec::new(),
            json: OnceCell::new(),
            binary: OnceCell::new(),
        };
        run.push(fanout);
        run
    }

    fn push(&mut self, fanout: Arc<Fanout>) {
        if let Some(device) = fanout.except {
            if !self.excepts.contains(&device) {
                self.excepts.push(device);
            }
        }
        self.fanouts.push(fanout);
        // A buffer made before (for a reply) lacks this fan-out.
        self.json = OnceCell::new();
        self.binary = OnceCell::new();
    }

    /// The users every fan-out of the run goes to.
    pub fn users(&self) -> &[Uid] {
        // Cannot panic: a run is made with its first fan-out.
        &self.fanouts[0].users
    }

    /// What `device` (pushes in `encoding`) gets of this run, as one buffer, with the number
    /// of frames in it: every fan-out from index `from` on that does not leave the device out.
    pub fn frames_for(
        &self,
        from: usize,
        device: DeviceId,
        encoding: Encoding,
    ) -> Option<(Bytes, u64)> {
        if from <= self.first && !self.excepts.contains(&device) {
            // The common case: the whole run, one buffer shared by every recipient.
            let cell = match encoding {
                Encoding::Json => &self.json,
                Encoding::Binary => &self.binary,
            };
            let all =
                cell.get_or_init(|| concat(self.fanouts.iter().map(|f| f.ws_message(encoding))));
            return Some((all.clone(), self.fanouts.len() as u64));
        }
        let frames: SmallVec<[&Bytes; 8]> = self
            .fanouts
            .iter()
            .skip(from.saturating_sub(self.first))
            .filter(|f| f.except != Some(device))
            .map(|f| f.ws_message(encoding))
            .collect();
        let n = frames.len() as u64;
        (n > 0).then(|| (concat(frames), n))
    }
}

/// The frames one after the other in one buffer (the frame itself if there is one).
fn concat<'a>(frames: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let frames: SmallVec<[&Bytes; 8]> = frames.into_iter().collect();
    if let [one] = frames[..] {
        return one.clone();
    }
    let mut all = BytesMut::with_capacity(frames.iter().map(|f| f.len()).sum());
    for frame in frames {
        all.extend_from_slice(frame);
    }
    all.freeze()
}

pub fn empty_slices<'a>() -> [IoSlice<'a>; IOVECS_MAX] {
    [IoSlice::new(&[]); IOVECS_MAX]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

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

    fn uid(n: u64) -> Uid {
        Uid::new(UidKind::Buyer, n)
    }

    fn device(n: u64) -> DeviceId {
        DeviceId::from_u64(n).unwrap()
    }

    /// A fan-out to `users` whose frames are `text` (json) and `text` uppercased (binary).
    fn fanout(users: &[u64], except: Option<u64>, text: &str) -> Arc<Fanout> {
        Arc::new(Fanout {
            users: users.iter().map(|&n| uid(n)).collect(),
            except: except.map(device),
            json: Bytes::from(text.to_string()),
            binary: Bytes::from(text.to_uppercase()),
        })
    }

    #[test]
    fn held_pushes_are_due_when_the_first_has_waited_the_delay() {
        let mut held = HeldPushes::new(5, 1 << 20);
        assert_eq!(held.due_ms(), None);
        assert!(!held.is_due(1000));
        held.hold(fanout(&[1], None, "a"), 100);
        // A later hold does not move the deadline: the first push waits at most the delay.
        held.hold(fanout(&[1], None, "b"), 103);
        assert_eq!(held.due_ms(), Some(105));
        assert!(!held.is_due(104));
        assert!(held.is_due(105));
        let release = held.release();
        assert_eq!(release.runs.len(), 1);
        assert!(!held.is_holding());
        // The next hold starts a new deadline from its own time.
        held.hold(fanout(&[1], None, "c"), 200);
        assert_eq!(held.due_ms(), Some(205));
    }

    #[test]
    fn a_run_gives_each_recipient_its_frames_in_one_buffer_in_order() {
        let mut held = HeldPushes::new(5, 1 << 20);
        held.hold(fanout(&[1, 2, 3], Some(11), "a1"), 0);
        held.hold(fanout(&[1, 2, 3], Some(12), "b2"), 0);
        held.hold(fanout(&[1, 2, 3], Some(11), "c3"), 0);
        let release = held.release();
        let [run] = &release.runs[..] else {
            panic!("one run, not {}", release.runs.len());
        };
        assert_eq!(run.users(), [uid(1), uid(2), uid(3)]);
        let for_13 = run.frames_for(release.from(0, 1), device(13), Encoding::Json);
        assert_eq!(for_13, Some((Bytes::from("a1b2c3"), 3)));
        let binary = run.frames_for(0, device(13), Encoding::Binary);
        assert_eq!(binary, Some((Bytes::from("A1B2C3"), 3)));
        // A sender's device gets the others' messages, not its own.
        assert_eq!(
            run.frames_for(0, device(11), Encoding::Json),
            Some((Bytes::from("b2"), 1))
        );
        assert_eq!(
            run.frames_for(0, device(12), Encoding::Json),
            Some((Bytes::from("a1c3"), 2))
        );
    }

    #[test]
    fn fan_outs_to_other_users_start_a_new_run_and_keep_arrival_order() {
        let mut held = HeldPushes::new(5, 1 << 20);
        held.hold(fanout(&[1, 2], None, "a"), 0);
        held.hold(fanout(&[2, 3], None, "b"), 0);
        // Same users as the first run, but after another: merging it into the first would let
        // it overtake "b" for user 2.
        held.hold(fanout(&[1, 2], None, "c"), 0);
        let release = held.release();
        let texts: Vec<Bytes> = release
            .runs
            .iter()
            .filter(|run| run.users().contains(&uid(2)))
            .filter_map(|run| run.frames_for(0, device(9), Encoding::Json))
            .map(|(bytes, _)| bytes)
            .collect();
        assert_eq!(texts, ["a", "b", "c"]);
    }

    #[test]
    fn a_session_that_took_its_held_pushes_gets_only_later_ones_at_the_flush() {
        let mut held = HeldPushes::new(5, 1 << 20);
        held.hold(fanout(&[1, 2], None, "a"), 0);
        held.hold(fanout(&[3], None, "x"), 0);
        held.hold(fanout(&[3], None, "y"), 0);
        // A reply to user 1's session (slot 7, generation 2) takes "a" along.
        let taken = held.take_for(7, 2, uid(1), device(21), Encoding::Json);
        assert_eq!(taken, Some((Bytes::from("a"), 1)));
        // Nothing more until something new is held.
        assert_eq!(
            held.take_for(7, 2, uid(1), device(21), Encoding::Json),
            None
        );
        // A user no held run names has nothing to take.
        assert_eq!(
            held.take_for(8, 1, uid(9), device(29), Encoding::Json),
            None
        );
        // User 3's session takes both of its pushes in one buffer, in order.
        assert_eq!(
            held.take_for(9, 1, uid(3), device(23), Encoding::Json),
            Some((Bytes::from("xy"), 2))
        );
        held.hold(fanout(&[1, 2], None, "b"), 0);
        let release = held.release();
        let for_session = |slot, generation| -> Vec<Bytes> {
            let from = release.from(slot, generation);
            release
                .runs
                .iter()
                .filter(|run| run.users().contains(&uid(1)))
                .filter_map(|run| run.frames_for(from, device(21), Encoding::Json))
                .map(|(bytes, _)| bytes)
                .collect()
        };
        assert_eq!(for_session(7, 2), ["b"]);
        // Another session in the same slot (a later generation) took nothing.
        assert_eq!(for_session(7, 3), ["a", "b"]);
    }

    #[test]
    fn a_session_that_logs_in_during_the_delay_gets_only_later_pushes() {
        let mut held = HeldPushes::new(5, 1 << 20);
        held.hold(fanout(&[1], None, "before"), 0);
        held.skip_for(4, 1);
        held.hold(fanout(&[1], None, "after"), 0);
        let release = held.release();
        let [run] = &release.runs[..] else {
            panic!("one run");
        };
        let from = release.from(4, 1);
        assert_eq!(
            run.frames_for(from, device(1), Encoding::Json),
            Some((Bytes::from("after"), 1))
        );
        assert_eq!(
            run.frames_for(release.from(5, 1), device(1), Encoding::Json),
            Some((Bytes::from("beforeafter"), 2))
        );
    }

    #[test]
    fn held_pushes_over_the_byte_or_count_limit_are_due_at_once() {
        let mut held = HeldPushes::new(100, 10);
        held.hold(fanout(&[1], None, "abcd"), 50);
        assert!(!held.is_due(50));
        // 4 + 4 bytes per fan-out (json and binary): the second reaches 16 >= 10.
        held.hold(fanout(&[1], None, "efgh"), 60);
        assert!(held.is_due(60));
        held.release();
        let mut held = HeldPushes::new(100, usize::MAX);
        for _ in 0..HELD_FANOUTS_MAX - 1 {
            held.hold(fanout(&[1], None, "a"), 0);
        }
        assert!(!held.is_due(0));
        held.hold(fanout(&[1], None, "a"), 0);
        assert!(held.is_due(0));
        held.release();
        // Users count once per run: a group's messages in one run count its members once.
        let members: Vec<u64> = (0..HELD_USERS_MAX as u64 / 2).collect();
        let mut held = HeldPushes::new(100, usize::MAX);
        held.hold(fanout(&members, None, "a"), 0);
        held.hold(fanout(&members, None, "b"), 0);
        assert!(!held.is_due(0));
        held.hold(fanout(&[1], None, "c"), 0);
        held.hold(fanout(&members, None, "d"), 0);
        assert!(held.is_due(0));
    }

    #[test]
    fn no_delay_holds_nothing() {
        assert!(!HeldPushes::new(0, 1).enabled());
        assert!(HeldPushes::new(1, 1).enabled());
    }
}
