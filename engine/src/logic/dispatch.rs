//! Customer-service dispatch: which agent of a shop serves which customer conversation.
//!
//! The dispatcher owns, per shop, the agents that are online (with how many devices), how many
//! conversations each is assigned, and the queue of conversations waiting for an agent. It does
//! not own the conversations' member lists: the caller tells it which agents a conversation has
//! and applies the decisions it returns (store the assignment, push `members`). That keeps the
//! customer-service policy apart from the messaging core, as the design this project implements
//! does, so a backend service could take this over.
//!
//! The policy (the client contract's; docs/architecture.md, "Conversations", says where it runs):
//! - A customer's message into a conversation none of whose assigned agents is online assigns
//!   the shop's online agent with the fewest assigned conversations; among equals, the one
//!   assigned least recently (so ties rotate fairly).
//! - With no agent online the conversation waits in the shop's queue; when an agent comes
//!   online, waiting conversations are assigned in arrival order, each to the least-loaded
//!   online agent.
//! - An assignment lasts until `resolve`; going offline does not end it.

use std::collections::VecDeque;

use ahash::{AHashMap, AHashSet};
use chinwag_protocol::{ConvId, ShopId, Uid};

/// What to do with a customer's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An assigned agent is online: deliver as usual.
    Served,
    /// Assign this agent to the conversation (store it, push `members`), then deliver.
    Assign(Uid),
    /// No agent of the shop is online: the conversation waits in the shop's queue.
    Queued,
}

/// A waiting conversation assigned because an agent came online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The conversation.
    pub conv: ConvId,
    /// The agent now assigned to it.
    pub agent: Uid,
}

#[derive(Debug, Default)]
struct Agent {
    /// Devices of the agent logged in now; online while non-zero.
    devices_online: u32,
    /// Conversations assigned and not resolved.
    assigned: u32,
    /// When the agent was last given a conversation (the dispatcher's tick), for fair ties.
    last_assigned_tick: u64,
}

#[derive(Debug, Default)]
struct Shop {
    agents: AHashMap<Uid, Agent>,
    waiting: VecDeque<ConvId>,
    /// The conversations in `waiting`, so a conversation queues once however often it is written.
    waiting_set: AHashSet<ConvId>,
}

impl Shop {
    /// The online agent with the fewest assignments; among equals the least recently assigned.
    fn least_loaded_online(&self) -> Option<Uid> {
        self.agents
            .iter()
            .filter(|(_, a)| a.devices_online > 0)
            .min_by_key(|(uid, a)| (a.assigned, a.last_assigned_tick, **uid))
            .map(|(uid, _)| *uid)
    }
}

/// The dispatch state of every shop one shard serves.
#[derive(Debug, Default)]
pub struct Dispatcher {
    shops: AHashMap<ShopId, Shop>,
    tick: u64,
}

impl Dispatcher {
    /// An empty dispatcher.
    pub fn new() -> Dispatcher {
        Dispatcher::default()
    }

    /// Forgets every shop `gone` says (their partition moved away from this shard: its
    /// dispatch state is rebuilt where the partition is led now).
    pub fn forget(&mut self, gone: impl Fn(ShopId) -> bool) {
        self.shops.retain(|&shop, _| !gone(shop));
    }

    /// Counts an assignment read back from the log at startup.
    pub fn restore_assignment(&mut self, shop: ShopId, agent: Uid) {
        self.agent_mut(shop, agent).assigned += 1;
    }

    /// Queues a conversation read back as waiting at startup.
    pub fn restore_waiting(&mut self, shop: ShopId, conv: ConvId) {
        let shop = self.shops.entry(shop).or_default();
        if shop.waiting_set.insert(conv) {
            shop.waiting.push_back(conv);
        }
    }

    /// A device of `agent` logged in. Returns the waiting conversations it (or, when several
    /// agents are online, the least loaded of them) now serves, in arrival order.
    pub fn agent_online(&mut self, shop_id: ShopId, agent: Uid) -> Vec<Assignment> {
        self.agent_mut(shop_id, agent).devices_online += 1;
        let mut assignments = Vec::new();
        loop {
            let shop = self.shops.entry(shop_id).or_default();
            let Some(conv) = shop.waiting.pop_front() else {
                break;
            };
            shop.waiting_set.remove(&conv);
            // The agent that just came online is online, so there is one to pick.
            let Some(chosen) = shop.least_loaded_online() else {
                break;
            };
            self.assign(shop_id, chosen);
            assignments.push(Assignment {
                conv,
                agent: chosen,
            });
        }
        assignments
    }

    /// A device of `agent` logged out or dropped. Its assignments stay.
    pub fn agent_offline(&mut self, shop: ShopId, agent: Uid) {
        if let Some(a) = self
            .shops
            .get_mut(&shop)
            .and_then(|s| s.agents.get_mut(&agent))
        {
            a.devices_online = a.devices_online.saturating_sub(1);
        }
    }

    /// Whether `agent` has a device online.
    pub fn is_online(&self, shop: ShopId, agent: Uid) -> bool {
        self.shops
            .get(&shop)
            .and_then(|s| s.agents.get(&agent))
            .is_some_and(|a| a.devices_online > 0)
    }

    /// A customer wrote into `conv`, whose assigned agents are `assigned`. Decides who serves it;
    /// on [`Decision::Assign`] the assignment is already counted.
    pub fn customer_message(
        &mut self,
        shop_id: ShopId,
        conv: ConvId,
        assigned: &[Uid],
    ) -> Decision {
        if assigned.iter().any(|agent| self.is_online(shop_id, *agent)) {
            return Decision::Served;
        }
        let shop = self.shops.entry(shop_id).or_default();
        match shop.least_loaded_online() {
            Some(agent) => {
                self.assign(shop_id, agent);
                Decision::Assign(agent)
            }
            None => {
                if shop.waiting_set.insert(conv) {
                    shop.waiting.push_back(conv);
                }
                Decision::Queued
            }
        }
    }

    /// `agent` resolved a conversation it was assigned to.
    pub fn resolve(&mut self, shop: ShopId, agent: Uid) {
        if let Some(a) = self
            .shops
            .get_mut(&shop)
            .and_then(|s| s.agents.get_mut(&agent))
        {
            a.assigned = a.assigned.saturating_sub(1);
        }
    }

    /// How many conversations `agent` is assigned.
    #[cfg(test)]
    pub fn assigned_count(&self, shop: ShopId, agent: Uid) -> u32 {
        self.shops
            .get(&shop)
            .and_then(|s| s.agents.get(&agent))
            .map_or(0, |a| a.assigned)
    }

    /// The conversations waiting in `shop`'s queue, in arrival order.
    #[cfg(test)]
    pub fn waiting(&self, shop: ShopId) -> impl Iterator<Item = ConvId> + '_ {
        self.shops
            .get(&shop)
            .into_iter()
            .flat_map(|s| s.waiting.iter().copied())
    }

    fn assign(&mut self, shop: ShopId, agent: Uid) {
        self.tick += 1;
        let tick = self.tick;
        let a = self.agent_mut(shop, agent);
        a.assigned += 1;
        a.last_assigned_tick = tick;
    }

    fn agent_mut(&mut self, shop: ShopId, agent: Uid) -> &mut Agent {
        self.shops
            .entry(shop)
            .or_default()
            .agents
            .entry(agent)
            .or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    const SHOP: ShopId = ShopId(1);

    fn agent(id: u64) -> Uid {
        Uid::new(UidKind::Agent, id)
    }

    #[test]
    fn assigns_the_least_loaded_online_agent() {
        let mut d = Dispatcher::new();
        d.agent_online(SHOP, agent(1));
        d.agent_online(SHOP, agent(2));
        d.restore_assignment(SHOP, agent(1));
        assert_eq!(
            d.customer_message(SHOP, ConvId(10), &[]),
            Decision::Assign(agent(2))
        );
        assert_eq!(d.assigned_count(SHOP, agent(2)), 1);
    }

    #[test]
    fn rotates_fairly_between_equally_loaded_agents() {
        let mut d = Dispatcher::new();
        for id in 1..=3 {
            d.agent_online(SHOP, agent(id));
        }
        let mut picked = Vec::new();
        for conv in 0..6 {
            match d.customer_message(SHOP, ConvId(conv), &[]) {
                Decision::Assign(a) => picked.push(a.id),
                other => panic!("expected an assignment, got {other:?}"),
            }
        }
        // Every agent gets two, and no agent twice before each had one.
        assert_eq!(picked[..3].iter().collect::<AHashSet<_>>().len(), 3);
        assert_eq!(picked[3..].iter().collect::<AHashSet<_>>().len(), 3);
        // Resolving frees capacity: the agent with fewer assignments is picked next.
        d.resolve(SHOP, agent(picked[5]));
        assert_eq!(
            d.customer_message(SHOP, ConvId(9), &[]),
            Decision::Assign(agent(picked[5]))
        );
    }

    #[test]
    fn an_online_assigned_agent_keeps_the_conversation() {
        let mut d = Dispatcher::new();
        d.agent_online(SHOP, agent(1));
        d.agent_online(SHOP, agent(2));
        d.restore_assignment(SHOP, agent(2));
        d.restore_assignment(SHOP, agent(2));
        assert_eq!(
            d.customer_message(SHOP, ConvId(5), &[agent(2)]),
            Decision::Served
        );
        assert_eq!(d.assigned_count(SHOP, agent(1)), 0);
    }

    #[test]
    fn an_offline_assigned_agent_gets_company() {
        let mut d = Dispatcher::new();
        d.agent_online(SHOP, agent(1));
        d.agent_online(SHOP, agent(2));
        assert_eq!(
            d.customer_message(SHOP, ConvId(5), &[]),
            Decision::Assign(agent(1))
        );
        d.agent_offline(SHOP, agent(1));
        // The assignment stays, but agent 1 is offline: agent 2 is added.
        assert_eq!(
            d.customer_message(SHOP, ConvId(5), &[agent(1)]),
            Decision::Assign(agent(2))
        );
        assert_eq!(d.assigned_count(SHOP, agent(1)), 1);
    }

    #[test]
    fn waiting_conversations_go_in_arrival_order_to_agents_coming_online() {
        let mut d = Dispatcher::new();
        for conv in [30, 10, 20, 10] {
            assert_eq!(
                d.customer_message(SHOP, ConvId(conv), &[]),
                Decision::Queued
            );
        }
        assert_eq!(
            d.waiting(SHOP).collect::<Vec<_>>(),
            [ConvId(30), ConvId(10), ConvId(20)]
        );
        let got = d.agent_online(SHOP, agent(4));
        assert_eq!(
            got.iter().map(|a| a.conv).collect::<Vec<_>>(),
            [ConvId(30), ConvId(10), ConvId(20)]
        );
        assert!(got.iter().all(|a| a.agent == agent(4)));
        assert_eq!(d.waiting(SHOP).count(), 0);
        assert_eq!(d.assigned_count(SHOP, agent(4)), 3);
    }

    #[test]
    fn a_second_device_of_an_agent_keeps_it_online_until_both_leave() {
        let mut d = Dispatcher::new();
        d.agent_online(SHOP, agent(1));
        d.agent_online(SHOP, agent(1));
        d.agent_offline(SHOP, agent(1));
        assert!(d.is_online(SHOP, agent(1)));
        d.agent_offline(SHOP, agent(1));
        assert!(!d.is_online(SHOP, agent(1)));
        assert_eq!(d.customer_message(SHOP, ConvId(1), &[]), Decision::Queued);
    }

    #[test]
    fn shops_do_not_share_agents() {
        let mut d = Dispatcher::new();
        d.agent_online(ShopId(2), agent(1));
        assert_eq!(d.customer_message(SHOP, ConvId(1), &[]), Decision::Queued);
    }
}
