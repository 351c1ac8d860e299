//! Writes: appending records, committing them under the durability policy, and the state
//! changes (devices, conversations, members, cursors).

use std::time::{Duration, Instant};

use chinwag_protocol::limits::{CMID_LEN_MAX, KIND_LEN_MAX};
use chinwag_protocol::{ConvId, DeviceId, DeviceType, Profile, Seq, ShopId, Subject, Uid};
use smallvec::SmallVec;

use super::record::{self, ConvKind, MessageRef, Record};
use super::segment;
use super::{Appended, FsyncPolicy, NewMessage, Position, Store, StoreError};

impl Store {
    /// Writes one record (already checked against the state) at the tail. Moves to the next
    /// segment when this one is full; fails with `DiskFull` if it cannot be created, leaving
    /// the log as it was.
    pub(super) fn append_record(&mut self, record: &Record<'_>) -> Result<Position, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let len = record::padded(record::encoded_len(record));
        let active = self.active();
        if active.end + len > active.capacity() {
            self.switch_segment()?;
        }
        let Some(active) = self.segments.back_mut() else {
            unreachable!("the log has an active segment");
        };
        let off = active.end;
        let written = record::encode(&mut active.map[off..off + len], record);
        debug_assert_eq!(written, len);
        active.end += len;
        let at = segment::position(active.id, off);
        self.prepare_next_if_half_full();
        Ok(at)
    }

    /// Asks the preparer for the next segment once the active one is half full: a log that
    /// is filling gets it ready before it needs it, an idle one keeps none on disk.
    pub(super) fn prepare_next_if_half_full(&mut self) {
        let active = self.active();
        if self.next_asked || active.end * 2 < active.capacity() {
            return;
        }
        let id = active.id + 1;
        let bytes = self.config.segment_bytes_for(id);
        self.config
            .preparer
            .start(&self.config.dir, id, bytes, self.config.fsync);
        self.next_asked = true;
    }

    pub(super) fn switch_segment(&mut self) -> Result<(), StoreError> {
        let id = self.active().id + 1;
        let bytes = self.config.segment_bytes_for(id);
        let next = self
            .config
            .preparer
            .take(&self.config.dir, id, bytes, self.config.fsync)?;
        if let Some(sealed) = self.segments.back_mut() {
            sealed.store_newest_ts();
        }
        self.segments.push_back(next);
        self.next_asked = false;
        Ok(())
    }

    /// Appends a message: assigns the conversation's next seq, or returns the original if the
    /// sender used this cmid in this conversation within the window. Durable and
    /// acknowledgeable only after the next successful [`Store::commit`].
    pub fn append_message(&mut self, msg: &NewMessage<'_>) -> Result<Appended, StoreError> {
        let limits = [
            ("body", msg.body.len(), self.config.body_bytes_max),
            ("cmid", msg.cmid.len(), CMID_LEN_MAX),
            ("kind", msg.kind.len(), KIND_LEN_MAX),
        ];
        if let Some(&(what, len, max)) = limits.iter().find(|(_, len, max)| len > max) {
            return Err(StoreError::TooLarge { what, len, max });
        }
        if let Some(original) = self.duplicate_of(msg)? {
            return Ok(original);
        }
        let conv = self
            .state
            .convs
            .get(&msg.conv)
            .ok_or(StoreError::UnknownConv(msg.conv))?;
        let seq = Seq(conv.seq + 1);
        let record = Record::Message(MessageRef {
            conv: msg.conv,
            seq,
            ts_ms: msg.ts_ms,
            sender: msg.sender,
            device: msg.device,
            cmid: msg.cmid,
            kind: msg.kind,
            body: msg.body,
            prev: conv.last_pos,
        });
        debug_assert_eq!(self.state.check(&record, false), Ok(()));
        let pos = self.append_record(&record)?;
        self.state.apply(&record, pos);
        if let Some(active) = self.segments.back_mut() {
            active.newest_ts_ms = active.newest_ts_ms.max(msg.ts_ms);
        }
        Ok(Appended::Stored { seq })
    }

    /// The original of `msg` if its sender used its cmid in its conversation within the
    /// window ([`Appended::Duplicate`]): what [`Store::append_message`] would answer without
    /// storing anything. Lets a caller skip the side effects of a new message (dispatch).
    pub fn duplicate_of(&self, msg: &NewMessage<'_>) -> Result<Option<Appended>, StoreError> {
        let Some(pos) = self.state.cmid_position(msg.sender, msg.conv, msg.cmid) else {
            return Ok(None);
        };
        // Confirm against the stored message: the window keys are hashes.
        Ok(self.message_at(pos)?.and_then(|m| {
            (m.sender == msg.sender && m.conv == msg.conv && m.cmid == msg.cmid).then_some(
                Appended::Duplicate {
                    seq: m.seq,
                    ts_ms: m.ts_ms,
                },
            )
        }))
    }

    /// Checks a state record, appends it and applies it.
    pub(super) fn append_state(&mut self, record: Record<'_>) -> Result<(), StoreError> {
        self.state
            .check(&record, false)
            .map_err(StoreError::Invalid)?;
        let pos = self.append_record(&record)?;
        self.state.apply(&record, pos);
        Ok(())
    }

    /// Makes everything appended so far acknowledgeable under the durability policy: after
    /// `Ok`, acks for the batch may go out. Call once per loop turn, after the turn's appends.
    ///
    /// `never`: no system call. `interval`: flushes if the interval has passed since the last
    /// flush. `always`: flushes (group commit).
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        match self.config.fsync {
            FsyncPolicy::Never => self.mark_acked(),
            FsyncPolicy::Interval => {
                let interval = Duration::from_millis(self.config.fsync_interval_ms);
                if self.last_sync.elapsed() >= interval {
                    self.flush()?;
                }
            }
            FsyncPolicy::Always => self.flush()?,
        }
        Ok(())
    }

    /// Flushes everything appended to disk now, whatever the policy (e.g. at shutdown), and
    /// commits it.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        self.flush()?;
        Ok(())
    }

    /// msyncs every segment written since the last flush, then marks it acknowledged.
    pub(super) fn flush(&mut self) -> Result<(), StoreError> {
        if self.synced == self.tail() {
            // Nothing new: an idle shard's commits cost no system call.
            self.last_sync = Instant::now();
            return Ok(());
        }
        let from = segment::segment_of(self.synced);
        for seg in self.segments.iter().filter(|s| s.id >= from) {
            if let Err(e) = seg.sync(seg.end) {
                // After a failed msync the kernel may have dropped the dirty pages (and
                // cleared the error): retrying could report success for lost data.
                self.poisoned = true;
                return Err(e);
            }
        }
        self.synced = self.tail();
        self.last_sync = Instant::now();
        self.mark_acked();
        Ok(())
    }

    /// Records in the segment headers that everything up to the tail is acknowledged, so
    /// recovery can tell a torn tail (after it) from corruption (before it).
    pub(super) fn mark_acked(&mut self) {
        let from = segment::segment_of(self.acked);
        for seg in self.segments.iter_mut().filter(|s| s.id >= from) {
            let end = seg.end;
            seg.set_acked_end(end);
        }
        self.acked = self.tail();
    }

    // ---- state changes; each is acknowledgeable after the next `commit` ----

    /// Registers a device, or returns the one registered before for this user and type.
    pub fn register_device(
        &mut self,
        uid: Uid,
        device_type: DeviceType,
        device: DeviceId,
    ) -> Result<DeviceId, StoreError> {
        if let Some(known) = self.device(uid, device_type) {
            return Ok(known);
        }
        self.append_state(Record::Device {
            uid,
            device_type,
            device,
        })?;
        Ok(device)
    }

    /// Creates the conversation of `shop` and `buyer`. Fails with `ConvExists` (naming the
    /// existing one) if they have one, or if `conv` is taken.
    pub fn create_shop_conv(
        &mut self,
        conv: ConvId,
        shop: ShopId,
        buyer: Uid,
    ) -> Result<(), StoreError> {
        if let Some(existing) = self.shop_conv(shop, buyer) {
            return Err(StoreError::ConvExists(existing));
        }
        self.create_conv(conv, ConvKind::Shop, shop.0, &[buyer])
    }

    /// Creates the direct conversation of two users (fails with `ConvExists` if they have one).
    pub fn create_direct_conv(&mut self, conv: ConvId, a: Uid, b: Uid) -> Result<(), StoreError> {
        if let Some(existing) = self.direct_conv(a, b) {
            return Err(StoreError::ConvExists(existing));
        }
        self.create_conv(conv, ConvKind::Direct, 0, &[a, b])
    }

    /// Creates a group with the service's `key` and its first `members` (distinct; at most
    /// `members_max`). Fails with `ConvExists` (naming the existing one) if the key has a
    /// group already, or if `conv` is taken.
    pub fn create_group_conv(
        &mut self,
        conv: ConvId,
        key: u64,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        if let Some(existing) = self.group_conv(key) {
            return Err(StoreError::ConvExists(existing));
        }
        if members.len() > self.config.members_max {
            return Err(StoreError::TooLarge {
                what: "members",
                len: members.len(),
                max: self.config.members_max,
            });
        }
        self.create_conv(conv, ConvKind::Group, key, members)
    }

    fn create_conv(
        &mut self,
        conv: ConvId,
        kind: ConvKind,
        key: u64,
        members: &[Uid],
    ) -> Result<(), StoreError> {
        if self.state.convs.contains_key(&conv) {
            return Err(StoreError::ConvExists(conv));
        }
        self.append_state(Record::Conv {
            conv,
            kind,
            key,
            members: SmallVec::from_slice(members),
        })
    }

    /// Adds a member at `ts_ms` (for a shop conversation, an agent assignment). `Ok(false)`
    /// if the user is a member already.
    pub fn add_member(&mut self, conv: ConvId, uid: Uid, ts_ms: u64) -> Result<bool, StoreError> {
        self.change_member(conv, uid, true, ts_ms)
    }

    /// Removes a member at `ts_ms` (for a shop conversation, ends an agent assignment).
    /// `Ok(false)` if the user was not a member.
    pub fn remove_member(
        &mut self,
        conv: ConvId,
        uid: Uid,
        ts_ms: u64,
    ) -> Result<bool, StoreError> {
        self.change_member(conv, uid, false, ts_ms)
    }

    fn change_member(
        &mut self,
        conv: ConvId,
        uid: Uid,
        added: bool,
        ts_ms: u64,
    ) -> Result<bool, StoreError> {
        let c = self.conv(conv).ok_or(StoreError::UnknownConv(conv))?;
        if c.members.contains(&uid) == added {
            return Ok(false);
        }
        if added && c.members.len() >= self.config.members_max {
            return Err(StoreError::TooLarge {
                what: "members",
                len: c.members.len() + 1,
                max: self.config.members_max,
            });
        }
        self.append_state(Record::Member {
            conv,
            uid,
            added,
            ts_ms,
        })?;
        Ok(true)
    }

    /// Moves `uid`'s read cursor in `conv` up to `seq` (clamped to the last seq; never
    /// backwards) and returns the cursor after the request.
    pub fn mark_read(&mut self, conv: ConvId, uid: Uid, seq: Seq) -> Result<Seq, StoreError> {
        let c = self.conv(conv).ok_or(StoreError::UnknownConv(conv))?;
        let target = Seq(seq.0.min(c.seq));
        let current = c.cursor(uid);
        if target <= current {
            return Ok(current);
        }
        self.append_state(Record::Cursor {
            conv,
            uid,
            seq: target,
        })?;
        Ok(target)
    }

    /// Stores `profile` as `subject`'s, at `version` (one record). `Ok(false)`, writing
    /// nothing, if this log holds that version or a newer one already.
    pub fn set_profile(
        &mut self,
        subject: Subject,
        version: u64,
        profile: &Profile,
    ) -> Result<bool, StoreError> {
        if self
            .state
            .profile(subject)
            .is_some_and(|held| held.version >= version)
        {
            return Ok(false);
        }
        self.append_state(Record::Profile {
            subject,
            version,
            name: &profile.name,
            avatar: &profile.avatar,
        })?;
        Ok(true)
    }
}
