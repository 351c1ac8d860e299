//! Devices and login: the owner of a user's devices finds or registers the device a session
//! logs in with, remembers which session holds it, and kicks an older session of the same
//! device.

use chinwag_protocol::{DeviceId, DeviceType, Uid};

use super::{unix_ms, Owner};
use crate::bus::{BusMsg, SessionRef};

impl Owner {
    pub(super) fn register(&mut self, session: SessionRef, uid: Uid, device_type: DeviceType) {
        let device = match self.store.device(uid, device_type) {
            Some(device) => Ok(device),
            None => self.new_device(uid, device_type),
        };
        let device = match device {
            Ok(device) => device,
            Err(e) => {
                tracing::error!(%uid, error = %e, "device registration failed");
                // The session learns of it as a failed login.
                self.push_out(
                    session.shard as usize,
                    BusMsg::Registered {
                        session,
                        uid,
                        device: None,
                    },
                );
                return;
            }
        };
        if let Some(older) = self.sessions.insert(device, session) {
            if older != session {
                self.push_out(older.shard as usize, BusMsg::Kick { session: older });
            }
        }
        self.push_out(
            session.shard as usize,
            BusMsg::Registered {
                session,
                uid,
                device: Some(device),
            },
        );
    }

    pub(super) fn new_device(
        &mut self,
        uid: Uid,
        device_type: DeviceType,
    ) -> Result<DeviceId, String> {
        let now_s = unix_ms() / 1000;
        // A poisoned lock means another shard panicked mid-generation; the generator's state
        // is a pair of integers that is never left half-written, so it is still sound.
        let id = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(device_type, now_s)
            .map_err(|e| e.to_string())?;
        self.store
            .register_device(uid, device_type, id)
            .map_err(|e| e.to_string())
    }

    /// A logged-in session ended: forget it as its device's session, unless a newer one took
    /// the device over.
    pub(super) fn unregister(&mut self, session: SessionRef, device: DeviceId) {
        if self.sessions.get(&device) == Some(&session) {
            self.sessions.remove(&device);
        }
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::DeviceType;

    use crate::bus::BusMsg;
    use crate::logic::testing::*;

    #[test]
    fn a_device_is_registered_once_and_a_second_login_kicks_the_first_session() {
        let mut h = Harness::new();
        let first = h.login(buyer(1));
        let second_session = h.new_session();
        let out = h.turn(BusMsg::Register {
            session: second_session,
            uid: buyer(1),
            device_type: DeviceType::Web,
        });
        assert_eq!(registered(&out, second_session), Some(first.device));
        let kicked: Vec<_> = out
            .iter()
            .filter_map(|(shard, msg)| match msg {
                BusMsg::Kick { session } => Some((*shard, *session)),
                _ => None,
            })
            .collect();
        assert_eq!(kicked, [(SESSION_SHARD as usize, first.session)]);

        // Another device type of the same user is another device, and kicks nobody.
        let phone = h.new_session();
        let out = h.turn(BusMsg::Register {
            session: phone,
            uid: buyer(1),
            device_type: DeviceType::Ios,
        });
        let device = registered(&out, phone).unwrap();
        assert_ne!(device, first.device);
        assert!(!out.iter().any(|(_, m)| matches!(m, BusMsg::Kick { .. })));
    }

    #[test]
    fn the_end_of_an_older_session_does_not_forget_the_newer_one() {
        let mut h = Harness::new();
        let first = h.login(buyer(1));
        let second = h.login(buyer(1));
        assert_eq!(second.device, first.device);
        // The first session's logout arrives after the second took the device over.
        h.turn(BusMsg::Unregister {
            session: first.session,
            uid: buyer(1),
            device: first.device,
        });
        let third = h.new_session();
        let out = h.turn(BusMsg::Register {
            session: third,
            uid: buyer(1),
            device_type: DeviceType::Web,
        });
        let kicked: Vec<_> = out
            .iter()
            .filter_map(|(_, msg)| match msg {
                BusMsg::Kick { session } => Some(*session),
                _ => None,
            })
            .collect();
        assert_eq!(
            kicked,
            [second.session],
            "the newest session is the one kicked"
        );
    }

    #[test]
    fn devices_survive_a_restart() {
        let mut h = Harness::new();
        let before = h.login(buyer(7));
        h.restart();
        let after = h.login(buyer(7));
        assert_eq!(after.device, before.device);
        let other = h.login(buyer(8));
        assert_ne!(
            other.device, before.device,
            "ids go on after the registered ones"
        );
    }
}
