//! This shard's part of the routing table: user → the sessions of that user logged in on this
//! shard. A push ([`Fanout`](crate::bus::Fanout)) reaches every shard, and each one finds here
//! which of its own sessions to give it to.

use ahash::AHashMap;
use chinwag_protocol::client::Encoding;
use chinwag_protocol::{DeviceId, Uid};
use smallvec::SmallVec;

/// One logged-in session of this shard, as the routing table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalDevice {
    /// The device.
    pub device: DeviceId,
    /// The session's slab slot.
    pub slot: u32,
    /// The session's generation (tells it apart from a later session in the same slot).
    pub generation: u32,
    /// The encoding of its pushes.
    pub encoding: Encoding,
}

/// This shard's part of the routing table: user → its devices logged in on this shard.
#[derive(Debug, Default)]
pub(crate) struct LocalDevices {
    users: AHashMap<Uid, SmallVec<[LocalDevice; 2]>>,
}

impl LocalDevices {
    /// Records a logged-in session.
    pub fn insert(&mut self, uid: Uid, device: LocalDevice) {
        self.users.entry(uid).or_default().push(device);
    }

    /// Forgets a session that ended.
    pub fn remove(&mut self, uid: Uid, slot: u32, generation: u32) {
        if let Some(devices) = self.users.get_mut(&uid) {
            devices.retain(|d| !(d.slot == slot && d.generation == generation));
            if devices.is_empty() {
                self.users.remove(&uid);
            }
        }
    }

    /// The sessions of `uid` on this shard.
    pub fn of(&self, uid: Uid) -> &[LocalDevice] {
        self.users.get(&uid).map_or(&[], |d| d.as_slice())
    }

    /// Users with a session on this shard.
    #[cfg(test)]
    fn user_count(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    #[test]
    fn local_devices_forget_only_the_session_that_ended() {
        let uid = Uid::new(UidKind::Buyer, 1);
        let mut local = LocalDevices::default();
        let device = DeviceId::from_u64(5).unwrap();
        let first = LocalDevice {
            device,
            slot: 3,
            generation: 1,
            encoding: Encoding::Json,
        };
        local.insert(uid, first);
        local.insert(
            uid,
            LocalDevice {
                generation: 2,
                slot: 4,
                ..first
            },
        );
        local.remove(uid, 3, 1);
        assert_eq!(local.of(uid).len(), 1);
        assert_eq!(local.of(uid)[0].slot, 4);
        local.remove(uid, 4, 2);
        assert_eq!(local.user_count(), 0);
    }
}
