//! Customer service around the [`Dispatcher`] policy: rebuilding it from the log at start,
//! assigning agents (stored as membership, announced with a `members` push), agents coming
//! online, and `resolve`.

use chinwag_protocol::{ConvId, ErrorCode, Members, Message, Seq, ShopId, Uid, UidKind};
use smallvec::SmallVec;

use super::dispatch::Dispatcher;
use super::{store_error, Owner};
use crate::bus::{Fanout, Origin};
use crate::store::{HistoryFrom, Store, StoreError};

/// A dispatcher with the assignment counts and waiting queues of the conversations in `store`.
pub(super) fn restore_dispatcher<'a>(stores: impl Iterator<Item = &'a Store>) -> Dispatcher {
    let mut dispatcher = Dispatcher::new();
    restore_into(&mut dispatcher, stores);
    dispatcher
}

/// Adds the assignment counts and waiting queues of the conversations in `stores` to
/// `dispatcher` (at start, and when this shard takes the lead of a partition).
pub(super) fn restore_into<'a>(
    dispatcher: &mut Dispatcher,
    stores: impl Iterator<Item = &'a Store>,
) {
    let mut waiting: Vec<(ConvId, ShopId)> = Vec::new();
    for (store, (id, conv)) in stores.flat_map(|s| s.conversations().map(move |c| (s, c))) {
        let Some(shop) = conv.shop() else { continue };
        let agents = conv.members().iter().filter(|u| u.kind == UidKind::Agent);
        let mut any_agent = false;
        for agent in agents {
            dispatcher.restore_assignment(shop, *agent);
            any_agent = true;
        }
        // A conversation with customer messages and no agent was waiting when the node
        // stopped. Its place in the queue is not stored; creation order stands in for it.
        if !any_agent && conv.last_seq() > Seq(0) {
            let last = store.history(id, HistoryFrom::Newest, 1).ok();
            let from_customer = last
                .and_then(|m| m.first().map(|m| m.sender.kind.is_customer()))
                .unwrap_or(false);
            if from_customer {
                waiting.push((id, shop));
            }
        }
    }
    waiting.sort_unstable();
    for (conv, shop) in waiting {
        dispatcher.restore_waiting(shop, conv);
    }
}

impl Owner {
    pub(super) fn resolve(
        &mut self,
        origin: &Origin,
        conv: ConvId,
        now_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        if origin.uid.kind != UidKind::Agent {
            return Err((ErrorCode::BadRequest, "only agents resolve".into()));
        }
        let c = self.member_conv(conv, origin.uid)?;
        let Some(shop) = c.shop() else {
            return Err((ErrorCode::BadRequest, "not a shop conversation".into()));
        };
        self.conv_log_mut(conv)
            .and_then(|log| log.remove_member(conv, origin.uid, now_ms))
            .map_err(store_error)?;
        self.dispatcher.resolve(shop, origin.uid);
        let ok = origin.reply(Message::ResolveOk(conv));
        self.ack(origin, ok);
        let mut members = self.members(conv);
        let remaining = members.to_vec();
        members.push(origin.uid);
        self.fanout(Fanout::new(
            members,
            None,
            Message::Members(Members {
                conv,
                profiles: self.member_profiles(conv, &remaining),
                members: remaining,
            }),
        ));
        Ok(())
    }

    /// Adds `agent` to `conv` at `now_ms` and pushes the new member list to every member.
    pub(super) fn assign(
        &mut self,
        conv: ConvId,
        agent: Uid,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conv_log_mut(conv)?.add_member(conv, agent, now_ms)?;
        let members = self.members(conv);
        let list = members.to_vec();
        self.fanout(Fanout::new(
            members,
            None,
            Message::Members(Members {
                conv,
                profiles: self.member_profiles(conv, &list),
                members: list,
            }),
        ));
        Ok(())
    }

    /// For a shop conversation: its shop and assigned agents.
    pub(super) fn shop_agents(&self, conv: ConvId) -> Option<(ShopId, SmallVec<[Uid; 4]>)> {
        let c = self.conv_log(conv)?.conv(conv)?;
        let shop = c.shop()?;
        let agents = c
            .members()
            .iter()
            .filter(|u| u.kind == UidKind::Agent)
            .copied()
            .collect();
        Some((shop, agents))
    }

    /// A device of `agent` logged in: waiting conversations of its shop may now be assigned.
    pub(super) fn agent_online(
        &mut self,
        shop: ShopId,
        agent: Uid,
        profile: Option<&crate::store::StoredProfile>,
        now_ms: u64,
    ) {
        let partition = self.map.partition_of(&shop);
        if let Err(e) = self.keep_profile(partition, agent, profile) {
            tracing::warn!(%agent, error = %e, "agent's profile not kept");
        }
        for assignment in self.dispatcher.agent_online(shop, agent) {
            if let Err(e) = self.assign(assignment.conv, assignment.agent, now_ms) {
                tracing::warn!(conv = %assignment.conv, error = %e, "assignment not stored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chinwag_protocol::{ConvId, ShopId, Target};

    use crate::bus::{BusMsg, Origin};
    use crate::logic::testing::*;

    const SHOP: ShopId = ShopId(5);

    fn agent_of_shop(h: &mut Harness, id: u64) -> Origin {
        h.login(agent(id))
    }

    fn online(h: &mut Harness, agent: &Origin) -> Vec<(usize, crate::bus::BusMsg)> {
        h.turn(BusMsg::AgentOnline {
            shop: SHOP,
            agent: agent.uid,
            profile: None,
        })
    }

    #[test]
    fn a_customer_waits_until_an_agent_comes_online_and_is_then_assigned() {
        let mut h = Harness::new();
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "anyone?"));
        let (conv, seq) = send_ok(&replies(&out, customer.session));
        assert_eq!(seq, 1, "stored while nobody serves the shop");
        assert_eq!(
            pushes(&out)[0].1,
            [customer.uid],
            "no agent is a member yet"
        );

        let support = agent_of_shop(&mut h, 9);
        let out = online(&mut h, &support);
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].1, [customer.uid, support.uid]);
        assert!(
            pushed[0].3.contains(r#""op":"members""#) && pushed[0].3.contains(&conv.to_string())
        );

        // From now on the agent is a member: it gets the customer's messages.
        let out = h.turn(send(&customer, Target::Shop(SHOP), "2", "hello"));
        assert_eq!(send_ok(&replies(&out, customer.session)), (conv, 2));
        assert_eq!(pushes(&out)[0].1, [customer.uid, support.uid]);
    }

    #[test]
    fn an_online_agent_is_assigned_before_the_message_goes_out() {
        let mut h = Harness::new();
        let support = agent_of_shop(&mut h, 9);
        online(&mut h, &support);
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "hi"));
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 2, "{pushed:?}");
        assert!(
            pushed[0].3.contains(r#""op":"members""#),
            "members first: {pushed:?}"
        );
        assert!(pushed[1].3.contains(r#""op":"msg""#));
        assert_eq!(pushed[1].1, [customer.uid, support.uid]);
    }

    #[test]
    fn resolve_takes_the_agent_out_and_tells_both() {
        let mut h = Harness::new();
        let support = agent_of_shop(&mut h, 9);
        online(&mut h, &support);
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "hi"));
        let (conv, _) = send_ok(&replies(&out, customer.session));

        let out = h.turn(BusMsg::Resolve {
            origin: Box::new(customer),
            conv,
        });
        assert!(replies(&out, customer.session)[0].contains(r#""code":"bad_request""#));

        let out = h.turn(BusMsg::Resolve {
            origin: Box::new(support),
            conv,
        });
        assert!(replies(&out, support.session)[0].contains(r#""op":"resolve_ok""#));
        let pushed = pushes(&out);
        assert_eq!(
            pushed[0].1,
            [customer.uid, support.uid],
            "the agent hears it too"
        );
        assert!(pushed[0]
            .3
            .contains(&format!(r#""members":["{}"]"#, customer.uid)));

        let out = h.turn(BusMsg::Resolve {
            origin: Box::new(support),
            conv: ConvId(conv.0 + (1 << 8)),
        });
        assert!(replies(&out, support.session)[0].contains(r#""code":"not_found""#));
    }

    #[test]
    fn a_waiting_conversation_is_still_waiting_after_a_restart() {
        let mut h = Harness::new();
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "anyone?"));
        let (conv, _) = send_ok(&replies(&out, customer.session));
        h.restart();
        let support = agent_of_shop(&mut h, 9);
        let out = online(&mut h, &support);
        let pushed = pushes(&out);
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert!(pushed[0].3.contains(&conv.to_string()));
        assert_eq!(pushed[0].1, [customer.uid, support.uid]);
    }

    /// A repeated cmid (a client's idempotent resend) ran dispatch again before the store
    /// found the duplicate: after a `resolve`, the resend assigned an agent anew.
    #[test]
    fn a_repeated_cmid_assigns_nobody_and_pushes_nothing() {
        let mut h = Harness::new();
        let support = agent_of_shop(&mut h, 9);
        online(&mut h, &support);
        let customer = h.login(buyer(1));
        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "hi"));
        let first = send_ok(&replies(&out, customer.session));
        h.turn(BusMsg::Resolve {
            origin: Box::new(support),
            conv: first.0,
        });
        assert_eq!(h.owner.dispatcher.assigned_count(SHOP, support.uid), 0);

        let out = h.turn(send(&customer, Target::Shop(SHOP), "1", "hi"));
        assert_eq!(send_ok(&replies(&out, customer.session)), first);
        assert!(pushes(&out).is_empty(), "{:?}", pushes(&out));
        assert_eq!(h.owner.dispatcher.assigned_count(SHOP, support.uid), 0);
        assert_eq!(h.owner.members(first.0).as_slice(), [customer.uid]);
    }

    /// `agent_stats` of [`SHOP`] from `from_ms` to `to_ms`, asked by a service on the session
    /// of `asker`: the replies.
    fn ask_stats(h: &mut Harness, asker: &Origin, from_ms: u64, to_ms: u64) -> Vec<String> {
        let service = Origin {
            uid: chinwag_protocol::Uid::new(chinwag_protocol::UidKind::Service, 1),
            service: true,
            ..*asker
        };
        let out = h.turn(BusMsg::AgentStats {
            origin: Box::new(service),
            stats: chinwag_protocol::AgentStats {
                shop: SHOP,
                from_ms,
                to_ms,
            },
        });
        replies(&out, asker.session)
    }

    fn stats(h: &mut Harness, asker: &Origin) -> String {
        let to_ms = h.now_ms + 1;
        let texts = ask_stats(h, asker, 0, to_ms);
        assert_eq!(texts.len(), 1, "{texts:?}");
        texts[0].clone()
    }

    #[test]
    fn agent_stats_count_what_agents_did_and_are_the_same_after_restarts() {
        let mut h = Harness::new();
        let (a, b) = (agent_of_shop(&mut h, 7), agent_of_shop(&mut h, 8));
        online(&mut h, &a);
        online(&mut h, &b);
        let (c1, c2) = (h.login(buyer(1)), h.login(buyer(2)));
        let out = h.turn(send(&c1, Target::Shop(SHOP), "1", "hi"));
        let (conv1, _) = send_ok(&replies(&out, c1.session));
        let out = h.turn(send(&c2, Target::Shop(SHOP), "1", "hello"));
        let (conv2, _) = send_ok(&replies(&out, c2.session));
        // Each agent got one conversation; find whose is whose.
        let members = h.owner.members(conv1);
        let (first, second) = if members.contains(&a.uid) {
            (a, b)
        } else {
            (b, a)
        };

        h.now_ms += 30_000;
        h.turn(send(&first, Target::Conv(conv1), "r1", "how can I help?"));
        h.turn(send(&first, Target::Conv(conv1), "r2", "still there?"));
        let before_snapshot = stats(&mut h, &c1);
        h.owner.maintain(h.now_ms);
        h.now_ms += 3_000;
        h.turn(send(&second, Target::Conv(conv2), "r1", "hello to you"));
        h.turn(BusMsg::Resolve {
            origin: Box::new(first),
            conv: conv1,
        });
        let report = stats(&mut h, &c1);
        assert_ne!(report, before_snapshot);
        let json = |uid: chinwag_protocol::Uid, row: &str| format!(r#"{{"agent":"{uid}",{row}}}"#);
        let first_row = r#""assigned":1,"open":0,"resolved":1,"messages":2,"replies":1,"reply_ms_p50":32000,"reply_ms_p90":32000"#;
        let second_row = r#""assigned":1,"open":1,"resolved":0,"messages":1,"replies":1,"reply_ms_p50":45255,"reply_ms_p90":45255"#;
        let mut rows = [(first.uid, first_row), (second.uid, second_row)];
        rows.sort();
        let expected = format!(
            r#""total":{{"assigned":2,"open":1,"resolved":1,"messages":3,"replies":2,"reply_ms_p50":32000,"reply_ms_p90":45255}},"agents":[{},{}]"#,
            json(rows[0].0, rows[0].1),
            json(rows[1].0, rows[1].1)
        );
        assert!(report.contains(&expected), "{report}\n{expected}");

        // Replayed from the snapshot and the records after it: the same figures.
        h.restart();
        assert_eq!(stats(&mut h, &c1), report);
        // Replayed from the start (no snapshot): the same figures.
        for snap in std::fs::read_dir(h.dir()).unwrap() {
            let path = snap.unwrap().path();
            if path.extension().is_some_and(|e| e == "snap") {
                std::fs::remove_file(path).unwrap();
            }
        }
        h.restart();
        assert_eq!(stats(&mut h, &c1), report);
    }

    #[test]
    fn agent_stats_refuse_an_empty_window() {
        let mut h = Harness::new();
        let asker = h.login(buyer(1));
        let texts = ask_stats(&mut h, &asker, 10, 10);
        assert!(texts[0].contains(r#""code":"bad_request""#), "{texts:?}");
    }
}
