//! Reception statistics: what the agents of the shops in this log did, hour by hour, for the
//! service op `agent_stats` (docs/backend.md, "Agent statistics").
//!
//! Per (shop, agent) [`Reception`] keeps one [`Hour`] per hour in which something happened:
//! conversations assigned and resolved, messages sent, the conversations still open at the
//! hour's end, and a histogram of first-reply times. Per shop conversation it keeps when its
//! customer started waiting for an answer, if they are waiting.
//!
//! It is part of the replayed state and changes only in `State::apply`, from what the records
//! say (a member record's time, a message's time), never from a clock: replaying the log,
//! appending live and loading a snapshot give the same figures, so they are the same after a
//! restart.
//!
//! Bounded: hours older than [`HOURS_KEPT`] before the newest record are dropped (what was
//! open then is kept as one number), and an agent with nothing kept and nothing open is
//! forgotten. An [`Hour`] costs 92 bytes; an agent at most [`HOURS_KEPT`] of them (68 KB), in
//! practice one per hour it worked (an agent working 8 hours a day: 23 KB). A waiting
//! conversation costs one map entry (~24 bytes).

use std::collections::VecDeque;

use ahash::AHashMap;
use chinwag_protocol::limits::STATS_AGENTS_MAX;
use chinwag_protocol::{AgentRow, AgentStatsOk, ConvId, ShopId, StatsRow, Uid, UidKind};

/// The statistics' time step.
pub const HOUR_MS: u64 = 3_600_000;
/// Hours of statistics kept, counted back from the newest record: 31 days.
pub const HOURS_KEPT: u64 = 31 * 24;
/// Bins of the first-reply histogram: bin `i` < `REPLY_BINS - 1` holds times up to
/// [`reply_bin_bound_ms`]`(i)` (1 s × √2^i, so up to 25.7 h); the last bin holds longer ones.
pub const REPLY_BINS: usize = 35;

/// The upper bound (ms) of first-reply bin `i`: 1 s × √2^i.
pub fn reply_bin_bound_ms(i: usize) -> u64 {
    (1000.0 * 2f64.powf(i as f64 / 2.0)).round() as u64
}

fn reply_bin(ms: u64) -> usize {
    (0..REPLY_BINS - 1)
        .find(|&i| ms <= reply_bin_bound_ms(i))
        .unwrap_or(REPLY_BINS - 1)
}

/// What one agent did in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hour {
    /// Hours since the Unix epoch.
    pub hour: u32,
    pub assigned: u32,
    pub resolved: u32,
    pub messages: u32,
    /// Conversations assigned to the agent and not resolved at the end of this hour.
    pub open: u32,
    /// First replies by time bin (saturating: 65,535 replies in one bin of one hour is far
    /// beyond one agent).
    pub replies: [u16; REPLY_BINS],
}

impl Hour {
    fn new(hour: u32, open: u32) -> Hour {
        Hour {
            hour,
            assigned: 0,
            resolved: 0,
            messages: 0,
            open,
            replies: [0; REPLY_BINS],
        }
    }
}

/// One agent of one shop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentHours {
    /// Hours with activity, oldest first, none older than [`HOURS_KEPT`].
    pub hours: VecDeque<Hour>,
    /// Conversations assigned and not resolved now.
    pub open: u32,
    /// Conversations open at the end of the hour before the oldest kept hour.
    pub open_before: u32,
}

/// Every shop's agents and waiting conversations in this log.
#[derive(Debug, Default)]
pub struct Reception {
    pub shops: AHashMap<ShopId, AHashMap<Uid, AgentHours>>,
    /// Shop conversations whose customer wrote and has no answer yet: since when (ms).
    pub waiting_since: AHashMap<ConvId, u64>,
    /// The newest time of any record counted (ms).
    pub newest_ms: u64,
    /// The hour up to which old hours were dropped (not saved: recomputed).
    pruned_hour: u64,
}

impl Reception {
    /// `agent` was assigned a conversation of `shop` at `ts_ms` (0: unknown, a record from
    /// before member records had a time; the newest time seen stands in).
    pub fn assigned(&mut self, shop: ShopId, agent: Uid, ts_ms: u64) {
        self.assignment(shop, agent, ts_ms, true);
    }

    /// `agent` resolved a conversation of `shop` at `ts_ms` (0: unknown, as for `assigned`).
    pub fn resolved(&mut self, shop: ShopId, agent: Uid, ts_ms: u64) {
        self.assignment(shop, agent, ts_ms, false);
    }

    /// An assignment began (`began`) or ended.
    fn assignment(&mut self, shop: ShopId, agent: Uid, ts_ms: u64, began: bool) {
        let a = self.agent(shop, agent, ts_ms);
        a.open = if began {
            a.open.saturating_add(1)
        } else {
            a.open.saturating_sub(1)
        };
        let open = a.open;
        if let Some(h) = a.hours.back_mut() {
            let count = if began {
                &mut h.assigned
            } else {
                &mut h.resolved
            };
            *count = count.saturating_add(1);
            h.open = open;
        }
    }

    /// A message by `sender` in the shop conversation `conv` at `ts_ms`.
    pub fn message(&mut self, shop: ShopId, conv: ConvId, sender: Uid, ts_ms: u64) {
        if sender.kind.is_customer() {
            self.observe(ts_ms);
            self.waiting_since.entry(conv).or_insert(ts_ms);
        } else if sender.kind == UidKind::Agent {
            let waited_ms = self
                .waiting_since
                .remove(&conv)
                .map(|since| ts_ms.saturating_sub(since));
            let a = self.agent(shop, sender, ts_ms);
            if let Some(h) = a.hours.back_mut() {
                h.messages = h.messages.saturating_add(1);
                if let Some(ms) = waited_ms {
                    let bin = &mut h.replies[reply_bin(ms)];
                    *bin = bin.saturating_add(1);
                }
            }
        }
    }

    /// The figures of `shop` over `from_ms..to_ms`, widened to whole hours and cut to the
    /// hours kept.
    pub fn report(&self, shop: ShopId, from_ms: u64, to_ms: u64) -> AgentStatsOk {
        let newest_hour = self.newest_ms / HOUR_MS;
        let horizon = (newest_hour + 1).saturating_sub(HOURS_KEPT);
        let from_hour = (from_ms / HOUR_MS).max(horizon);
        let to_hour = to_ms.div_ceil(HOUR_MS).max(from_hour);
        let mut total = Figures::default();
        let mut agents: Vec<AgentRow> = Vec::new();
        for (&agent, hours) in self.shops.get(&shop).into_iter().flatten() {
            let mut figures = Figures::default();
            for h in hours.hours.iter() {
                if (from_hour..to_hour).contains(&u64::from(h.hour)) {
                    figures.add_hour(h);
                }
            }
            figures.open = hours
                .hours
                .iter()
                .rev()
                .find(|h| u64::from(h.hour) < to_hour)
                .map_or(hours.open_before, |h| h.open);
            total.add(&figures);
            if figures != Figures::default() {
                agents.push(AgentRow {
                    agent,
                    stats: figures.row(),
                });
            }
        }
        agents.sort_unstable_by_key(|row| row.agent);
        agents.truncate(STATS_AGENTS_MAX);
        AgentStatsOk {
            shop,
            from_ms: from_hour.saturating_mul(HOUR_MS),
            to_ms: to_hour.saturating_mul(HOUR_MS),
            total: total.row(),
            agents,
        }
    }

    /// The agent's record, its newest hour being the one of an event at `ts_ms`. An event
    /// older than the agent's newest hour (the clock stepped back) counts in that newest hour.
    fn agent(&mut self, shop: ShopId, agent: Uid, ts_ms: u64) -> &mut AgentHours {
        let ts_ms = if ts_ms == 0 { self.newest_ms } else { ts_ms };
        self.observe(ts_ms);
        let hour = u32::try_from(ts_ms / HOUR_MS).unwrap_or(u32::MAX);
        let a = self
            .shops
            .entry(shop)
            .or_default()
            .entry(agent)
            .or_default();
        if !matches!(a.hours.back(), Some(h) if h.hour >= hour) {
            a.hours.push_back(Hour::new(hour, a.open));
        }
        a
    }

    /// Moves the newest time on; past a new hour, drops what is older than [`HOURS_KEPT`].
    fn observe(&mut self, ts_ms: u64) {
        self.newest_ms = self.newest_ms.max(ts_ms);
        let newest_hour = self.newest_ms / HOUR_MS;
        if newest_hour <= self.pruned_hour {
            return;
        }
        self.pruned_hour = newest_hour;
        let horizon = (newest_hour + 1).saturating_sub(HOURS_KEPT);
        for agents in self.shops.values_mut() {
            agents.retain(|_, a| {
                while a.hours.front().is_some_and(|h| u64::from(h.hour) < horizon) {
                    if let Some(old) = a.hours.pop_front() {
                        a.open_before = old.open;
                    }
                }
                !a.hours.is_empty() || a.open > 0
            });
        }
        self.shops.retain(|_, agents| !agents.is_empty());
    }
}

/// Sums over hours, before they become a [`StatsRow`].
#[derive(Debug, PartialEq, Eq)]
struct Figures {
    assigned: u32,
    open: u32,
    resolved: u32,
    messages: u32,
    replies: [u32; REPLY_BINS],
}

impl Default for Figures {
    fn default() -> Figures {
        Figures {
            assigned: 0,
            open: 0,
            resolved: 0,
            messages: 0,
            replies: [0; REPLY_BINS],
        }
    }
}

impl Figures {
    fn add_hour(&mut self, h: &Hour) {
        self.assigned = self.assigned.saturating_add(h.assigned);
        self.resolved = self.resolved.saturating_add(h.resolved);
        self.messages = self.messages.saturating_add(h.messages);
        for (sum, n) in self.replies.iter_mut().zip(h.replies) {
            *sum = sum.saturating_add(u32::from(n));
        }
    }

    fn add(&mut self, other: &Figures) {
        self.assigned = self.assigned.saturating_add(other.assigned);
        self.open = self.open.saturating_add(other.open);
        self.resolved = self.resolved.saturating_add(other.resolved);
        self.messages = self.messages.saturating_add(other.messages);
        for (sum, n) in self.replies.iter_mut().zip(other.replies) {
            *sum = sum.saturating_add(n);
        }
    }

    fn row(&self) -> StatsRow {
        let replies = self.replies.iter().fold(0u32, |n, b| n.saturating_add(*b));
        StatsRow {
            assigned: self.assigned,
            open: self.open,
            resolved: self.resolved,
            messages: self.messages,
            replies,
            reply_ms_p50: self.percentile_ms(replies, 50),
            reply_ms_p90: self.percentile_ms(replies, 90),
        }
    }

    /// The upper bound of the bin holding the `p`th percentile (0 without replies); for the
    /// last, unbounded bin the bound below it.
    fn percentile_ms(&self, count: u32, p: u64) -> u64 {
        if count == 0 {
            return 0;
        }
        let rank = (u64::from(count) * p).div_ceil(100).max(1);
        let mut seen = 0u64;
        for (i, n) in self.replies.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank {
                return reply_bin_bound_ms(i.min(REPLY_BINS - 2));
            }
        }
        reply_bin_bound_ms(REPLY_BINS - 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: ShopId = ShopId(5);
    const AGENT: Uid = Uid::new(UidKind::Agent, 7);
    const OTHER: Uid = Uid::new(UidKind::Agent, 8);
    const BUYER: Uid = Uid::new(UidKind::Buyer, 1);
    /// 2026-01-01T00:00:00Z, an hour boundary.
    const T0: u64 = 1_767_225_600_000;
    const S: u64 = 1_000;

    #[test]
    fn bins_grow_by_root_two_from_one_second() {
        assert_eq!(reply_bin_bound_ms(0), 1_000);
        assert_eq!(reply_bin_bound_ms(2), 2_000);
        assert_eq!(reply_bin_bound_ms(REPLY_BINS - 2), 92_681_900);
        assert_eq!(reply_bin(0), 0);
        assert_eq!(reply_bin(1_001), 1);
        assert_eq!(reply_bin(30_000), 10, "30 s is at most 32 s");
        assert_eq!(reply_bin(u64::MAX), REPLY_BINS - 1);
    }

    #[test]
    fn counts_assignments_messages_first_replies_and_resolves() {
        let mut r = Reception::default();
        let conv = ConvId(1);
        r.message(SHOP, conv, BUYER, T0);
        r.assigned(SHOP, AGENT, T0 + S);
        r.message(SHOP, conv, BUYER, T0 + 5 * S); // still the same wait
        r.message(SHOP, conv, AGENT, T0 + 30 * S); // first reply after 30 s
        r.message(SHOP, conv, AGENT, T0 + 40 * S); // not a first reply
        r.message(SHOP, conv, BUYER, T0 + 100 * S);
        r.message(SHOP, conv, AGENT, T0 + 102 * S); // 2 s
        r.resolved(SHOP, AGENT, T0 + 200 * S);

        let report = r.report(SHOP, T0, T0 + HOUR_MS);
        assert_eq!((report.from_ms, report.to_ms), (T0, T0 + HOUR_MS));
        assert_eq!(report.agents.len(), 1);
        let row = report.agents[0].stats;
        assert_eq!(report.agents[0].agent, AGENT);
        assert_eq!(
            (
                row.assigned,
                row.open,
                row.resolved,
                row.messages,
                row.replies
            ),
            (1, 0, 1, 3, 2)
        );
        assert_eq!((row.reply_ms_p50, row.reply_ms_p90), (2_000, 32_000));
        assert_eq!(report.total, row);
        assert!(r.waiting_since.is_empty());
    }

    #[test]
    fn open_is_counted_at_the_windows_end_and_windows_widen_to_whole_hours() {
        let mut r = Reception::default();
        r.assigned(SHOP, AGENT, T0 + 10 * S);
        r.assigned(SHOP, AGENT, T0 + HOUR_MS + 10 * S);
        r.assigned(SHOP, OTHER, T0 + HOUR_MS + 20 * S);
        r.resolved(SHOP, AGENT, T0 + 3 * HOUR_MS);

        let first_hour = r.report(SHOP, T0 + 5 * S, T0 + 20 * S);
        assert_eq!((first_hour.from_ms, first_hour.to_ms), (T0, T0 + HOUR_MS));
        assert_eq!(first_hour.agents.len(), 1, "{first_hour:?}");
        assert_eq!((first_hour.total.assigned, first_hour.total.open), (1, 1));

        let two_hours = r.report(SHOP, T0, T0 + 2 * HOUR_MS);
        let rows: Vec<_> = two_hours
            .agents
            .iter()
            .map(|a| (a.agent, a.stats.assigned, a.stats.open))
            .collect();
        assert_eq!(rows, [(AGENT, 2, 2), (OTHER, 1, 1)]);

        // Only what is open at the end: the resolve in hour 3 shows as open 1, resolved 1.
        let later = r.report(SHOP, T0 + 3 * HOUR_MS, T0 + 4 * HOUR_MS);
        let rows: Vec<_> = later
            .agents
            .iter()
            .map(|a| (a.agent, a.stats.assigned, a.stats.open, a.stats.resolved))
            .collect();
        assert_eq!(rows, [(AGENT, 0, 1, 1), (OTHER, 0, 1, 0)]);
        assert!(r.report(ShopId(6), T0, T0 + HOUR_MS).agents.is_empty());
    }

    #[test]
    fn hours_older_than_kept_are_dropped_but_what_was_open_is_not() {
        let mut r = Reception::default();
        r.assigned(SHOP, AGENT, T0);
        r.assigned(SHOP, OTHER, T0);
        r.resolved(SHOP, OTHER, T0 + S);
        let much_later = T0 + (HOURS_KEPT + 5) * HOUR_MS;
        r.message(SHOP, ConvId(9), BUYER, much_later);
        let a = &r.shops[&SHOP];
        assert!(a[&AGENT].hours.is_empty());
        assert_eq!((a[&AGENT].open, a[&AGENT].open_before), (1, 1));
        assert!(
            !a.contains_key(&OTHER),
            "nothing kept, nothing open: forgotten"
        );

        let report = r.report(SHOP, T0, much_later + 1);
        assert_eq!(
            report.from_ms,
            much_later / HOUR_MS * HOUR_MS - (HOURS_KEPT - 1) * HOUR_MS
        );
        assert_eq!(report.agents.len(), 1);
        assert_eq!((report.total.assigned, report.total.open), (0, 1));
    }

    #[test]
    fn a_time_from_before_member_records_had_one_counts_at_the_newest_time() {
        let mut r = Reception::default();
        r.message(SHOP, ConvId(1), BUYER, T0 + 2 * HOUR_MS);
        r.assigned(SHOP, AGENT, 0);
        let report = r.report(SHOP, T0 + 2 * HOUR_MS, T0 + 3 * HOUR_MS);
        assert_eq!(report.total.assigned, 1);
    }
}
