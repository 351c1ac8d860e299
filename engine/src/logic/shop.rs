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
    dispatcher
}

impl Owner {
    pub(super) fn resolve(
        &mut self,
        origin: &Origin,
        conv: ConvId,
    ) -> Result<(), (ErrorCode, String)> {
        if origin.uid.kind != UidKind::Agent {
            return Err((ErrorCode::BadRequest, "only agents resolve".into()));
        }
        let c = self.member_conv(conv, origin.uid)?;
        let Some(shop) = c.shop() else {
            return Err((ErrorCode::BadRequest, "not a shop conversation".into()));
        };
        self.conv_log_mut(conv)
            .and_then(|log| log.remove_member(conv, origin.uid))
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
                members: remaining,
            }),
        ));
        Ok(())
    }

    /// Adds `agent` to `conv` and pushes the new member list to every member.
    pub(super) fn assign(&mut self, conv: ConvId, agent: Uid) -> Result<(), StoreError> {
        self.conv_log_mut(conv)?.add_member(conv, agent)?;
        let members = self.members(conv);
        let list = members.to_vec();
        self.fanout(Fanout::new(
            members,
            None,
            Message::Members(Members {
                conv,
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
    pub(super) fn agent_online(&mut self, shop: ShopId, agent: Uid) {
        for assignment in self.dispatcher.agent_online(shop, agent) {
            if let Err(e) = self.assign(assignment.conv, assignment.agent) {
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
}
