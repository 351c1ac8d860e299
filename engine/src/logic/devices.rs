//! Devices and login: the owner of a user's devices finds or registers the device a session
//! logs in with, remembers which session holds it, and kicks an older session of the same
//! device.
//!
//! Which session holds a device is kept in memory only. An owner that starts (or, in a
//! cluster, takes a partition over) knows none, and learns those that stayed up on other
//! nodes from their shards' announcements ([`BusMsg::Announce`], asked for by
//! [`BusMsg::Reannounce`]): [`Owner::announced`] merges them with the logins that reach it
//! meanwhile, a later login winning (docs/cluster.md, "What a node's loss costs").

use chinwag_protocol::{DeviceId, DeviceType, Kick, Online, Uid};

use super::{unix_ms, Owner};
use crate::bus::{AnnouncedSession, BusMsg, PartitionId, SessionRef};

/// The session an owner holds for a device, and how it learned of it. As small as the
/// session address alone was in the map's entries (24 bytes with the key): the single node,
/// which never learns from announcements, pays nothing for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holder {
    pub session: SessionRef,
    /// 0: the session's `Register` reached this owner, which makes it the latest login of the
    /// device (a later one would have replaced it). Else its shard announced it, logged in at
    /// this Unix second (at least 1) by its node's clock.
    announced_login_s: u32,
}

const _: () = assert!(std::mem::size_of::<(DeviceId, Holder)>() == 24);

impl Holder {
    fn registered(session: SessionRef) -> Holder {
        Holder {
            session,
            announced_login_s: 0,
        }
    }

    fn announced(session: SessionRef, login_ms: u64) -> Holder {
        let login_s = u32::try_from(login_ms / 1000).unwrap_or(u32::MAX).max(1);
        Holder {
            session,
            announced_login_s: login_s,
        }
    }

    /// When it logged in (Unix seconds), if it was announced rather than registered here.
    fn announced_login_s(&self) -> Option<u32> {
        (self.announced_login_s != 0).then_some(self.announced_login_s)
    }
}

/// What [`Owner::announced`] did with one announced session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Merge {
    /// Held from now on (the device had none, or an announced one that logged in earlier or
    /// is on a node counted as down).
    Learned,
    /// Held already.
    Known,
    /// Kicked: the device's session held here is a later login.
    Kicked,
    /// Ignored: on a node counted as down, of a user of another partition, or of a device the
    /// user has not registered here.
    Ignored,
}

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
        let holder = Holder::registered(session);
        if let Some(older) = self.sessions.insert(device, holder) {
            if older.session != session {
                let kick = BusMsg::Kick {
                    session: older.session,
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
            .filter_map(|device| Some((device, self.sessions.get(&device)?.session)))
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
        if self.sessions.get(&device).map(|h| h.session) == Some(session) {
            self.sessions.remove(&device);
        }
    }

    /// Sessions of users of `partition` that a shard announced, asked for after this owner
    /// started or took the partition over. Each is held from now on unless this owner knows a
    /// later login of its device; the earlier of two logins of one device is kicked, as a
    /// second login kicks the first ([`Owner::register`]):
    /// - a session held from a `Register` is the later login: that login reached this owner,
    ///   so it came after every login made before this owner started, and a login after it
    ///   would have replaced it. The announced session is kicked (if this owner saw its login
    ///   too, it kicked it then, and the kick is repeated);
    /// - of two announced sessions the later login (by the clocks of their nodes, to the
    ///   second) stays, the other is kicked; the one held stays on a tie;
    /// - a held session on a node counted as down is replaced.
    ///
    /// An announced session that ends sends its `Unregister` after its announcement, by the
    /// same way, so a session that ended meanwhile is forgotten again.
    pub(super) fn announced(
        &mut self,
        partition: PartitionId,
        sessions: &[AnnouncedSession],
    ) -> Vec<Merge> {
        sessions
            .iter()
            .map(|announced| self.merge_announced(partition, announced))
            .collect()
    }

    /// The link to `node` came up again: forgets the sessions on it, which died with its
    /// earlier run if it restarted; it announces those it holds now ([`BusMsg::ForgetNode`]).
    pub(super) fn forget_node(&mut self, node: u16) {
        self.sessions.retain(|_, held| held.session.node != node);
    }

    fn merge_announced(&mut self, partition: PartitionId, a: &AnnouncedSession) -> Merge {
        let ours = self.map.partition_of(&a.uid) == partition
            && self.map.shard_of_partition(u32::from(partition)) == Some(self.shard);
        let registered = ours
            && self
                .log_of(&a.uid)
                .and_then(|log| log.device(a.uid, a.device.device_type()))
                == Some(a.device);
        if !registered || !self.node_alive(a.session.node) {
            return Merge::Ignored;
        }
        let announced = Holder::announced(a.session, a.login_ms);
        let held = match self.sessions.get(&a.device) {
            None => {
                self.sessions.insert(a.device, announced);
                return Merge::Learned;
            }
            Some(held) if held.session == a.session => return Merge::Known,
            Some(held) => *held,
        };
        let announced_is_later = match (held.announced_login_s(), announced.announced_login_s()) {
            _ if !self.node_alive(held.session.node) => true,
            (None, _) => false,
            (Some(held_s), announced_s) => announced_s > Some(held_s),
        };
        let (kept, kicked) = if announced_is_later {
            (announced, held.session)
        } else {
            (held, a.session)
        };
        self.sessions.insert(a.device, kept);
        self.push_out(BusMsg::Kick {
            session: kicked,
            by_service: false,
        });
        if announced_is_later {
            Merge::Learned
        } else {
            Merge::Kicked
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

    /// What an owner restarted since the logins learns from announcements.
    mod announced {
        use chinwag_protocol::{DeviceId, DeviceType, Kick, Uid};

        use crate::bus::{AnnouncedSession, BusMsg, Origin, SessionRef};
        use crate::logic::devices::Merge;
        use crate::logic::testing::*;

        fn announce(
            h: &mut Harness,
            session: SessionRef,
            device: DeviceId,
            login_ms: u64,
        ) -> Vec<(usize, BusMsg)> {
            let uid = buyer(1);
            let partition = h.owner.map.partition_of(&uid);
            h.turn(BusMsg::Announce {
                partition,
                sessions: vec![AnnouncedSession {
                    uid,
                    device,
                    session,
                    login_ms,
                }],
            })
        }

        fn kicked(out: &[(usize, BusMsg)]) -> Vec<SessionRef> {
            out.iter()
                .filter_map(|(_, m)| match m {
                    BusMsg::Kick { session, .. } => Some(*session),
                    _ => None,
                })
                .collect()
        }

        fn online(h: &Harness) -> Vec<DeviceId> {
            h.owner
                .presence(&[buyer(1)])
                .into_iter()
                .flat_map(|o| o.devices)
                .collect()
        }

        /// buyer 1's web device, logged in on a session the owner forgot by a restart.
        fn forgotten_login(h: &mut Harness) -> Origin {
            let first = h.login(buyer(1));
            h.restart();
            assert!(online(h).is_empty(), "a restart forgets the session");
            first
        }

        fn service_kick(h: &mut Harness) -> Vec<SessionRef> {
            let service = Origin {
                service: true,
                ..h.login(buyer(9))
            };
            let out = h.turn(BusMsg::KickUser {
                origin: Box::new(service),
                kick: Kick {
                    uid: buyer(1),
                    device: None,
                },
            });
            kicked(&out)
        }

        #[test]
        fn an_announced_session_is_online_and_a_service_kick_reaches_it() {
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            let out = announce(&mut h, first.session, first.device, 10);
            assert!(kicked(&out).is_empty());
            assert_eq!(online(&h), [first.device]);
            assert_eq!(service_kick(&mut h), [first.session]);
        }

        #[test]
        fn a_new_login_of_the_device_kicks_the_announced_session() {
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            announce(&mut h, first.session, first.device, 10);
            let second = h.new_session();
            let out = h.turn(BusMsg::Register {
                session: second,
                uid: buyer(1),
                device_type: DeviceType::Web,
            });
            assert_eq!(registered(&out, second), Some(first.device));
            assert_eq!(kicked(&out), [first.session]);
        }

        /// The race of a login with the announcements: a login of the device reached the
        /// restarted owner before the announcement of its older session did.
        #[test]
        fn a_login_that_reached_the_owner_wins_over_an_announced_session_of_its_device() {
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            let second = h.new_session();
            let out = h.turn(BusMsg::Register {
                session: second,
                uid: buyer(1),
                device_type: DeviceType::Web,
            });
            assert!(
                kicked(&out).is_empty(),
                "the owner does not know the first yet"
            );
            // Announced with a later clock than anything: a `Register` still wins.
            let out = announce(&mut h, first.session, first.device, u64::MAX);
            assert_eq!(kicked(&out), [first.session], "the older login is kicked");
            assert_eq!(service_kick(&mut h), [second], "the newer one is held");
        }

        #[test]
        fn of_two_announced_sessions_of_a_device_the_later_login_stays() {
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            let (early, late) = (h.new_session(), h.new_session());
            let ms = 1_700_000_000_000;
            assert!(kicked(&announce(&mut h, first.session, first.device, ms)).is_empty());
            let out = announce(&mut h, early, first.device, ms - 1000);
            assert_eq!(kicked(&out), [early], "logged in before the one held");
            let same_second = h.new_session();
            let out = announce(&mut h, same_second, first.device, ms + 999);
            assert_eq!(kicked(&out), [same_second], "a tie keeps the one held");
            let out = announce(&mut h, late, first.device, ms + 1000);
            assert_eq!(
                kicked(&out),
                [first.session],
                "logged in after the one held"
            );
            assert_eq!(service_kick(&mut h), [late]);
        }

        #[test]
        fn a_repeated_announcement_changes_nothing_and_the_sessions_logout_forgets_it() {
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            for _ in 0..2 {
                let out = announce(&mut h, first.session, first.device, 10);
                assert!(kicked(&out).is_empty());
            }
            assert_eq!(
                h.owner.announced(
                    h.owner.map.partition_of(&buyer(1)),
                    &[AnnouncedSession {
                        uid: buyer(1),
                        device: first.device,
                        session: first.session,
                        login_ms: 10
                    }]
                ),
                [Merge::Known]
            );
            // Its logout follows its announcement (same shard, same way).
            h.turn(BusMsg::Unregister {
                session: first.session,
                uid: buyer(1),
                device: first.device,
            });
            assert!(online(&h).is_empty());
        }

        /// A node restarted: the sessions of its earlier run are gone, and its link coming up
        /// makes the owner forget them (its live ones are announced again after).
        #[test]
        fn a_node_whose_link_came_up_again_has_its_sessions_forgotten() {
            let mut h = Harness::new();
            let web = h.login(buyer(1));
            let phone = SessionRef {
                node: 2,
                ..h.new_session()
            };
            h.turn(BusMsg::Register {
                session: phone,
                uid: buyer(1),
                device_type: DeviceType::Ios,
            });
            assert_eq!(online(&h).len(), 2);
            h.turn(BusMsg::ForgetNode { node: 3 });
            assert_eq!(online(&h).len(), 2, "no session on node 3");
            h.turn(BusMsg::ForgetNode { node: 2 });
            assert_eq!(
                online(&h),
                [web.device],
                "the phone's session on node 2 is forgotten"
            );
        }

        #[test]
        fn sessions_of_down_nodes_other_users_partitions_and_unknown_devices_are_ignored() {
            use crate::cluster::registry::{PartitionTable, Peers};
            let mut h = Harness::new();
            let first = forgotten_login(&mut h);
            let peers = std::sync::Arc::new(Peers::default());
            peers.set_alive_for_tests(&[(1, true), (2, true), (3, false)]);
            let table = PartitionTable::round_robin(PARTITIONS as u32, &[1]);
            h.owner.set_cluster(crate::cluster::Cluster::for_tests(
                1,
                table,
                std::sync::Arc::clone(&peers),
            ));
            let on = |node| SessionRef {
                node,
                ..first.session
            };
            let uid = buyer(1);
            let partition = h.owner.map.partition_of(&uid);
            let other_partition = (0u64..)
                .map(buyer)
                .find(|u| h.owner.map.partition_of(u) != partition)
                .unwrap();
            let a = |uid: Uid, device, session| AnnouncedSession {
                uid,
                device,
                session,
                login_ms: 10,
            };
            let phone = DeviceId::from_u64(first.device.get() + 1).unwrap();
            let merged = h.owner.announced(
                partition,
                &[
                    a(uid, first.device, on(3)),
                    a(other_partition, first.device, on(2)),
                    a(uid, phone, on(2)),
                    a(uid, first.device, on(2)),
                ],
            );
            use Merge::*;
            assert_eq!(merged, [Ignored, Ignored, Ignored, Learned]);
            // A held session whose node went down is replaced by an announced one.
            peers.set_alive_for_tests(&[(1, true), (2, false), (3, true)]);
            let merged = h.owner.announced(partition, &[a(uid, first.device, on(3))]);
            assert_eq!(merged, [Learned]);
            assert_eq!(online(&h), [first.device]);
        }
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
