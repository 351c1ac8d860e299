//! Devices and login: the owner of a user's devices finds or registers the device a session
//! logs in with, remembers which session holds it, and kicks an older session of the same
//! device.

use chinwag_protocol::{DeviceId, DeviceType, Kick, Online, Uid};

use super::{unix_ms, Owner};
use crate::bus::{BusMsg, SessionRef};

impl Owner {
    pub(super) fn register(&mut self, session: SessionRef, uid: Uid, device_type: DeviceType) {
        let device = match self
            .log_of(&uid)
            .and_then(|log| log.device(uid, device_type))
        {
            Some(device) => Ok(device),
            None => self.new_device(uid, device_type),
        };
        let device = match device {
            Ok(device) => device,
            Err(e) => {
                tracing::error!(%uid, error = %e, "device registration failed");
                // The session learns of it as a failed login.
                self.push_out(BusMsg::Registered {
                    session,
                    uid,
                    device: None,
                    profile: None,
                });
                return;
            }
        };
        if let Some(older) = self.sessions.insert(device, session) {
            if older != session {
                let kick = BusMsg::Kick {
                    session: older,
                    by_service: false,
                };
                self.push_out(kick);
            }
        }
        self.push_out(BusMsg::Registered {
            session,
            uid,
            device: Some(device),
            profile: self
                .log_of(&uid)
                .and_then(|log| log.profile(chinwag_protocol::Subject::User(uid)))
                .map(|p| Box::new(p.clone())),
        });
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
        self.log_mut_of(&uid)
            .and_then(|log| log.register_device(uid, device_type, id))
            .map_err(|e| e.to_string())
    }

    /// The devices of `uid` with a session now, ascending (one per device type at most). In
    /// a cluster, a session on a node whose heartbeat lapsed is not one.
    pub(super) fn online_devices(
        &self,
        uid: Uid,
    ) -> impl Iterator<Item = (DeviceId, SessionRef)> + '_ {
        let log = self.log_of(&uid);
        DeviceType::ALL
            .into_iter()
            .filter_map(move |t| log?.device(uid, t))
            .filter_map(|device| Some((device, *self.sessions.get(&device)?)))
            .filter(|(_, session)| self.node_alive(session.node))
    }

    /// A service's `kick`: every session of the user (or of its one device) gets `kicked` and
    /// is closed. Returns how many sessions that was.
    pub(super) fn kick(&mut self, kick: Kick) -> u32 {
        let sessions: Vec<SessionRef> = self
            .online_devices(kick.uid)
            .filter(|(device, _)| kick.device.map_or(true, |d| d == *device))
            .map(|(_, session)| session)
            .collect();
        for session in &sessions {
            let msg = BusMsg::Kick {
                session: *session,
                by_service: true,
            };
            self.push_out(msg);
        }
        sessions.len() as u32
    }

    /// A service's `presence`, for the users this shard owns: those with a device online.
    pub(super) fn presence(&self, users: &[Uid]) -> Vec<Online> {
        users
            .iter()
            .filter_map(|&uid| {
                let mut devices: Vec<DeviceId> = self.online_devices(uid).map(|(d, _)| d).collect();
                devices.sort_unstable();
                (!devices.is_empty()).then_some(Online { uid, devices })
            })
            .collect()
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

    use crate::bus::{BusMsg, SessionRef};
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
                BusMsg::Kick { session, .. } => Some((*shard, *session)),
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
                BusMsg::Kick { session, .. } => Some(*session),
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

    #[test]
    fn a_service_kicks_every_session_of_a_user_or_one_device_and_sees_who_is_online() {
        let mut h = Harness::new();
        let web = h.login(buyer(1));
        let phone_session = h.new_session();
        let out = h.turn(BusMsg::Register {
            session: phone_session,
            uid: buyer(1),
            device_type: DeviceType::Ios,
        });
        let phone = registered(&out, phone_session).unwrap();
        let other = h.login(buyer(2));

        let mut online = h.owner.presence(&[buyer(1), buyer(2), buyer(3)]);
        online.sort_by_key(|o| o.uid);
        let mut both = vec![web.device, phone];
        both.sort_unstable();
        assert_eq!(online.len(), 2, "buyer 3 has no device online: {online:?}");
        assert_eq!((online[0].uid, &online[0].devices), (buyer(1), &both));
        assert_eq!(online[1].devices, [other.device]);

        let kicked = |out: &[(usize, BusMsg)]| -> Vec<SessionRef> {
            out.iter()
                .filter_map(|(_, m)| match m {
                    BusMsg::Kick {
                        session,
                        by_service: true,
                    } => Some(*session),
                    _ => None,
                })
                .collect()
        };
        let service = crate::bus::Origin {
            service: true,
            ..other
        };
        let one = chinwag_protocol::Kick {
            uid: buyer(1),
            device: Some(phone),
        };
        let out = h.turn(BusMsg::KickUser {
            origin: Box::new(service),
            kick: one,
        });
        assert_eq!(kicked(&out), [phone_session]);
        assert!(replies(&out, other.session)[0].contains(r#""op":"kick_ok","req":1,"count":1"#));

        let all = chinwag_protocol::Kick {
            uid: buyer(1),
            device: None,
        };
        let out = h.turn(BusMsg::KickUser {
            origin: Box::new(service),
            kick: all,
        });
        assert_eq!(
            kicked(&out).len(),
            2,
            "both sessions (the phone's is still registered)"
        );
    }
}
