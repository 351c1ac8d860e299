//! Profiles: what a client shows of a user (nickname, avatar) and of a conversation (display
//! name, avatar; a shop conversation shows its shop's), set by backend services and carried
//! to clients in `msg` pushes, `members` pushes and `convs` entries without a lookup per
//! message (docs/protocol.md, "Profiles").
//!
//! Each profile lives with the owner of its subject: a user's with the owner of its devices, a
//! shop's with the shop's owner (where its conversations are), a conversation's with the
//! conversation's owner. A conversation's owner does not own its members' profiles, so it
//! keeps a **copy** of each sender's, in its own log: a client's session learns its user's
//! profile at login (and again whenever a service changes it), every `send` carries it, and
//! the conversation's owner stores a copy when the one it holds is older (profile versions
//! are ordered by the user's owner). A service's `send_as` goes through the sender's owner,
//! which adds the profile. Messages are frequent and profiles change rarely, so a message
//! costs a version comparison, and a copy is written once per change per shard.

use std::sync::Arc;

use chinwag_protocol::{
    ConvId, ErrorCode, Message, Msg, MsgPush, Profile, ProfileOf, Subject, Uid, UserProfile,
};
use smallvec::SmallVec;

use super::{store_error, Owner};
use crate::bus::{BusMsg, Fanout, Origin, PartitionId, ProfileOp};
use crate::store::{Store, StoreError, StoredProfile};

impl Owner {
    /// A service's `set_profile` or `get_profile`; this shard owns the subject.
    pub(super) fn profile_op(
        &mut self,
        origin: &Origin,
        op: ProfileOp,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        match op {
            ProfileOp::Get(subject) => {
                let profile = match subject {
                    Subject::Conv(conv) => {
                        self.local_conv(conv)?;
                        self.conv_profile(conv)
                    }
                    subject => self.held_profile(subject),
                };
                let reply = Message::GetProfileOk(ProfileOf { subject, profile });
                self.reply_now(origin, origin.reply(reply));
            }
            ProfileOp::Set(ProfileOf { subject, profile }) => {
                if let Subject::Conv(conv) = subject {
                    if let Some(shop) = self.local_conv(conv)?.shop() {
                        return Err((
                            ErrorCode::BadRequest,
                            format!(
                                "conversation {conv} shows its shop's profile: set the profile of shop {shop}"
                            ),
                        ));
                    }
                }
                // Versions of one subject only go up, whatever the clock does.
                let version = self
                    .subject_log(subject)
                    .and_then(|log| log.profile(subject))
                    .map_or(now_ms, |held| now_ms.max(held.version + 1));
                let log = match subject {
                    Subject::User(uid) => self.log_mut_of(&uid),
                    Subject::Shop(shop) => self.log_mut_of(&shop),
                    Subject::Conv(conv) => self.conv_log_mut(conv),
                };
                log.and_then(|log| log.set_profile(subject, version, &profile))
                    .map_err(store_error)?;
                self.ack(origin, origin.reply(Message::SetProfileOk));
                let stored = StoredProfile {
                    version,
                    profile: Arc::new(profile.clone()),
                };
                match subject {
                    Subject::User(uid) => self.tell_sessions(uid, &stored),
                    Subject::Conv(conv) => {
                        let members = self.members(conv);
                        let push = Message::ConvProfile(ProfileOf { subject, profile });
                        self.fanout(Fanout::new(members, None, push));
                    }
                    // A shop's conversations show it from their next message or `convs`.
                    Subject::Shop(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Tells every logged-in session of `uid` its new profile, for its next `send`s.
    fn tell_sessions(&mut self, uid: Uid, stored: &StoredProfile) {
        let sessions: SmallVec<[_; 4]> = self.online_devices(uid).map(|(_, s)| s).collect();
        for session in sessions {
            let profile = Box::new(stored.clone());
            self.push_out(BusMsg::OwnProfile { session, profile });
        }
    }

    /// Keeps `uid`'s profile as a sender brought it in the log of `partition` (the partition
    /// of the conversation it writes to, or of the shop it serves), when it is newer than the
    /// copy held there: one record, once per change per partition, so a partition holds what
    /// its conversations show.
    pub(super) fn keep_profile(
        &mut self,
        partition: PartitionId,
        uid: Uid,
        profile: Option<&StoredProfile>,
    ) -> Result<(), StoreError> {
        if let Some(p) = profile {
            self.partition_log_mut(partition)?.set_profile(
                Subject::User(uid),
                p.version,
                &p.profile,
            )?;
        }
        Ok(())
    }

    /// The log that holds `subject`'s own profile, if it is open here.
    fn subject_log(&self, subject: Subject) -> Option<&Store> {
        match subject {
            Subject::User(uid) => self.log_of(&uid),
            Subject::Shop(shop) => self.log_of(&shop),
            Subject::Conv(conv) => self.conv_log(conv),
        }
    }

    /// The profile of `subject` held by its own partition here, or an empty one.
    pub(super) fn held_profile(&self, subject: Subject) -> Profile {
        self.subject_log(subject)
            .and_then(|log| log.profile(subject))
            .map(|p| Profile::clone(&p.profile))
            .unwrap_or_default()
    }

    /// `uid`'s profile as `conv` shows it: the copy in the conversation's partition, else the
    /// user's own when its partition is served here.
    fn user_profile_in(&self, conv: ConvId, uid: Uid) -> Option<&StoredProfile> {
        let subject = Subject::User(uid);
        self.conv_log(conv)
            .and_then(|log| log.profile(subject))
            .or_else(|| self.log_of(&uid)?.profile(subject))
    }

    /// What a conversation shows: a shop conversation its shop's profile, another its own.
    pub(super) fn conv_profile(&self, conv: ConvId) -> Profile {
        let subject = match self.conv_log(conv).and_then(|l| l.conv(conv)?.shop()) {
            Some(shop) => Subject::Shop(shop),
            None => Subject::Conv(conv),
        };
        self.held_profile(subject)
    }

    /// The profiles `conv` shows of `members` (those with one set), in member order.
    pub(super) fn member_profiles(&self, conv: ConvId, members: &[Uid]) -> Vec<UserProfile> {
        members
            .iter()
            .filter_map(|&uid| {
                let held = self.user_profile_in(conv, uid)?;
                (!held.profile.is_empty()).then(|| UserProfile {
                    uid,
                    profile: Profile::clone(&held.profile),
                })
            })
            .collect()
    }

    /// The `msg` push of a stored message: with its sender's and its conversation's profiles.
    pub(super) fn msg_push<'a>(&self, msg: Msg<'a>) -> Message<'a> {
        Message::Msg(MsgPush {
            from_profile: self
                .user_profile_in(msg.conv, msg.from)
                .map(|p| Profile::clone(&p.profile))
                .unwrap_or_default(),
            conv_profile: self.conv_profile(msg.conv),
            msg,
        })
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, Profile, ProfileOf, ShopId, Subject, Target};

    use crate::bus::{BusMsg, ProfileOp, ProfileRequest};
    use crate::logic::testing::*;
    use crate::store::StoredProfile;

    fn set(h: &mut Harness, subject: Subject, name: &str) -> Vec<String> {
        let origin = service_origin(h);
        let op = ProfileOp::Set(ProfileOf {
            subject,
            profile: Profile {
                name: name.into(),
                avatar: format!("https://a/{name}.png"),
            },
        });
        let out = h.turn(BusMsg::Profile(Box::new(ProfileRequest { origin, op })));
        replies(&out, origin.session)
    }

    #[test]
    fn a_user_profile_reaches_its_sessions_and_its_messages() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let origin = service_origin(&mut h);
        let op = ProfileOp::Set(ProfileOf {
            subject: Subject::User(a.uid),
            profile: Profile {
                name: "Ann".into(),
                avatar: "https://a/Ann.png".into(),
            },
        });
        let out = h.turn(BusMsg::Profile(Box::new(ProfileRequest { origin, op })));
        assert!(replies(&out, origin.session)[0].contains("set_profile_ok"));
        let told: Vec<_> = out
            .iter()
            .filter_map(|(_, m)| match m {
                BusMsg::OwnProfile { session, profile } => Some((*session, profile.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(told.len(), 1, "the user's one session is told");
        assert_eq!(
            (told[0].0, told[0].1.profile.name.as_str()),
            (a.session, "Ann")
        );

        let out = h.turn(send(&a, Target::User(b.uid), "c1", "hello"));
        let (_, _, _, text) = &pushes(&out)[0];
        assert!(
            text.contains(r#""from_nick":"Ann","from_avatar":"https://a/Ann.png""#),
            "{text}"
        );
        assert!(!text.contains("conv_name"), "{text}");
    }

    #[test]
    fn a_conversations_owner_keeps_the_newest_profile_its_senders_bring_across_a_restart() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        let b = h.login(buyer(2));
        let stored = |version, name: &str| StoredProfile {
            version,
            profile: std::sync::Arc::new(Profile {
                name: name.into(),
                avatar: String::new(),
            }),
        };
        let out = h.turn(send_with_profile(
            &a,
            Target::User(b.uid),
            "c1",
            stored(5, "New"),
        ));
        let (conv, _) = send_ok(&replies(&out, a.session));
        assert!(pushes(&out)[0].3.contains(r#""from_nick":"New""#));
        // An older profile (a session that has not heard of the change yet) changes nothing.
        let out = h.turn(send_with_profile(
            &a,
            Target::Conv(conv),
            "c2",
            stored(4, "Old"),
        ));
        assert!(pushes(&out)[0].3.contains(r#""from_nick":"New""#));

        h.restart();
        let out = h.turn(send(&a, Target::Conv(conv), "c3", "after"));
        assert!(
            pushes(&out)[0].3.contains(r#""from_nick":"New""#),
            "kept in the log"
        );
        let convs = h.owner.convs_of(b.uid);
        assert_eq!(convs[0].profiles.len(), 1, "{convs:?}");
        assert_eq!(convs[0].profiles[0].profile.name, "New");

        // A direct conversation may have a name of its own, pushed to its members.
        let named = set(&mut h, Subject::Conv(conv), "Pair");
        assert!(named[0].contains("set_profile_ok"), "{named:?}");
        let out = h.turn(send(&b, Target::Conv(conv), "c4", "hi"));
        assert!(pushes(&out)[0].3.contains(r#""conv_name":"Pair""#));
    }

    #[test]
    fn a_shop_conversation_shows_its_shop_and_refuses_a_name_of_its_own() {
        let mut h = Harness::new();
        let a = h.login(buyer(1));
        assert!(set(&mut h, Subject::Shop(ShopId(42)), "Teas")[0].contains("set_profile_ok"));
        let out = h.turn(send(&a, Target::Shop(ShopId(42)), "c1", "hi"));
        let (conv, _) = send_ok(&replies(&out, a.session));
        let (_, _, _, text) = &pushes(&out)[0];
        assert!(text.contains(r#""conv_name":"Teas""#), "{text}");
        let refused = set(&mut h, Subject::Conv(conv), "Mine");
        assert!(
            refused[0].contains(r#""code":"bad_request""#),
            "{refused:?}"
        );
        let unknown = set(&mut h, Subject::Conv(ConvId(99 << 16)), "None");
        assert!(unknown[0].contains(r#""code":"not_found""#), "{unknown:?}");
    }
}
