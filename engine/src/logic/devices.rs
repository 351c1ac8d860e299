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
