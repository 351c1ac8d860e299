//! The routing table user → device → node: this node's part of it (written to Redis at login
//! and logout) and everyone's (a cache of the whole table, kept fresh by the route channel).
//!
//! **Writing.** A shard that completes a login or ends a logged-in session posts a [`RouteOp`]
//! to the registry thread's queue and goes on; it never waits for Redis. The thread keeps
//! [`OwnRoutes`], the routes of the sessions this node holds, applies each op to it, and writes
//! what changed in one pipeline per batch. When Redis is unreachable the ops still update
//! `OwnRoutes` (memory bounded by the node's sessions); on Redis's return the thread rewrites
//! them all ([`rewrite_all`]).
//!
//! **Reading.** [`RouteCache`] holds every route of the cluster, striped behind read-write
//! locks that only the subscriber thread takes for writing. The subscriber thread subscribes
//! to the route channel, then loads the whole table ([`reload`]), then applies every change the
//! channel delivers, in order: a change published before the load is applied again after it,
//! and since changes are applied in the order they were made the cache ends where Redis is.
//! Its own probe, published every few seconds, must come back on the subscription; if it does
//! not, the subscription is declared dead, reconnected and the table reloaded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use chinwag_protocol::{DeviceId, Uid};
use smallvec::SmallVec;

use super::health::ClusterHealth;
use super::redis_conn::{eval, eval_cmd, RedisTarget};
use super::redis_keys::{self as keys, RouteChange};
use crate::bus::SessionRef;
use crate::logic::unix_ms;

/// A device's session is on a node: one entry of the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub device: DeviceId,
    /// The number of the node that holds the device's session.
    pub node: u16,
}

/// A login or logout on this node, for the registry thread.
#[derive(Debug, Clone, Copy)]
pub enum RouteOp {
    /// `session` logged in as `device` of `uid`.
    Login {
        uid: Uid,
        device: DeviceId,
        session: SessionRef,
    },
    /// `session`, logged in as `device` of `uid`, ended.
    Logout {
        uid: Uid,
        device: DeviceId,
        session: SessionRef,
    },
}

/// The routes of the sessions this node holds, by (user, device): the session that holds each.
#[derive(Default)]
pub struct OwnRoutes {
    sessions: AHashMap<(Uid, DeviceId), SessionRef>,
}

impl OwnRoutes {
    /// Applies `op`. Returns the change Redis must see, if any: a logout of a session that a
    /// newer one of the same device on this node replaced changes nothing.
    pub fn apply(&mut self, op: RouteOp, node: u16) -> Option<RouteChange> {
        match op {
            RouteOp::Login {
                uid,
                device,
                session,
            } => {
                self.sessions.insert((uid, device), session);
                Some(RouteChange {
                    added: true,
                    node,
                    uid,
                    device,
                })
            }
            RouteOp::Logout {
                uid,
                device,
                session,
            } => {
                if self.sessions.get(&(uid, device)) != Some(&session) {
                    return None;
                }
                self.sessions.remove(&(uid, device));
                Some(RouteChange {
                    added: false,
                    node,
                    uid,
                    device,
                })
            }
        }
    }

    pub fn count(&self) -> usize {
        self.sessions.len()
    }

    /// Every route, as additions.
    pub fn all(&self, node: u16) -> impl Iterator<Item = RouteChange> + '_ {
        self.sessions.keys().map(move |&(uid, device)| RouteChange {
            added: true,
            node,
            uid,
            device,
        })
    }
}

/// The pipeline command that makes `change` in Redis (and publishes it).
pub fn write_cmd(change: &RouteChange) -> redis::Cmd {
    let route = keys::route(change.uid);
    let own = keys::node_routes(change.node);
    let device = change.device.to_string();
    let node = change.node.to_string();
    let member = keys::route_member(change.uid, change.device);
    let message = change.to_message();
    let script = if change.added {
        keys::ROUTE_ADD_SCRIPT
    } else {
        keys::ROUTE_DEL_SCRIPT
    };
    eval_cmd(
        script,
        &[&route, &own],
        &[&device, &node, &member, keys::ROUTES_CHANNEL, &message],
    )
}

/// Routes written per pipeline.
pub const WRITE_BATCH: usize = 1024;

/// Writes `changes` in pipelines of [`WRITE_BATCH`].
pub fn write(
    connection: &mut redis::Connection,
    changes: &[RouteChange],
) -> redis::RedisResult<()> {
    for batch in changes.chunks(WRITE_BATCH) {
        let mut pipe = redis::pipe();
        for change in batch {
            pipe.add_command(write_cmd(change)).ignore();
        }
        pipe.query::<()>(connection)?;
    }
    Ok(())
}

/// Members one sweep script takes at a time, so that Redis is never held long.
const SWEEP_BATCH: usize = 500;

/// Removes the routes that node `node` wrote and that still name it, publishing each removal.
/// Without `force`, stops as soon as the node is alive again. Returns how many it removed (an
/// upper bound: members whose route had moved on are counted too).
pub fn sweep(
    connection: &mut redis::Connection,
    node: u16,
    force: bool,
) -> redis::RedisResult<u64> {
    let own = keys::node_routes(node);
    let alive = keys::alive(node);
    let number = node.to_string();
    let batch = SWEEP_BATCH.to_string();
    let mut total = 0;
    // Bounded: each round pops members, and a node that keeps adding is alive (ends the loop
    // without force) or is this node (which adds nothing while it sweeps its own).
    for _ in 0..100_000 {
        let taken: i64 = eval(
            connection,
            keys::SWEEP_SCRIPT,
            &[&own, &alive],
            &[
                &number,
                &batch,
                keys::ROUTES_CHANNEL,
                keys::ROUTE_PREFIX,
                if force { "1" } else { "0" },
            ],
        )?;
        if taken <= 0 {
            break;
        }
        total += taken as u64;
    }
    Ok(total)
}

/// Replaces every route of this node in Redis with `own`'s: after a (re)registration, when
/// Redis may have lost them (restarted empty) or kept stale ones (sessions that ended while it
/// was unreachable).
pub fn rewrite_all(
    connection: &mut redis::Connection,
    own: &OwnRoutes,
    node: u16,
) -> redis::RedisResult<()> {
    sweep(connection, node, true)?;
    let all: Vec<RouteChange> = own.all(node).collect();
    write(connection, &all)
}

/// The devices one user may have in the cache: more than any real user (one per device type)
/// but a bound against a table filled by something else.
const DEVICES_PER_USER_MAX: usize = 16;

/// Stripes of the cache: readers of different users rarely meet on one lock.
const STRIPES: usize = 64;

type Stripe = AHashMap<Uid, SmallVec<[Route; 2]>>;

/// Every route of the cluster, as last seen in Redis.
pub struct RouteCache {
    stripes: Box<[RwLock<Stripe>]>,
    /// Routes held, over all stripes.
    count: AtomicU64,
}

impl Default for RouteCache {
    fn default() -> RouteCache {
        RouteCache {
            stripes: (0..STRIPES).map(|_| RwLock::default()).collect(),
            count: AtomicU64::new(0),
        }
    }
}

fn stripe_of(uid: Uid) -> usize {
    let mixed = (uid.id ^ (uid.kind as u64) << 56).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 58) as usize % STRIPES
}

impl RouteCache {
    /// The routes of `uid`'s devices (whatever the liveness of their nodes).
    pub fn of(&self, uid: Uid) -> SmallVec<[Route; 4]> {
        let stripe = self.stripes[stripe_of(uid)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        stripe
            .get(&uid)
            .map(|routes| routes.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Routes held.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Applies one change: an addition sets the device's node, a removal forgets the device
    /// only if the route still names the node that left (a newer login elsewhere stays).
    pub fn apply(&self, change: RouteChange) {
        let mut stripe = self.stripes[stripe_of(change.uid)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let before = stripe.get(&change.uid).map_or(0, SmallVec::len);
        apply_to(&mut stripe, change);
        let after = stripe.get(&change.uid).map_or(0, SmallVec::len);
        self.count.store(
            (self.count() + after as u64).saturating_sub(before as u64),
            Relaxed,
        );
    }

    /// Replaces everything with `routes`.
    pub fn replace_all(&self, routes: Vec<(Uid, Route)>) {
        let mut fresh: Vec<Stripe> = (0..STRIPES).map(|_| Stripe::default()).collect();
        for (uid, route) in routes {
            apply_to(
                &mut fresh[stripe_of(uid)],
                RouteChange {
                    added: true,
                    node: route.node,
                    uid,
                    device: route.device,
                },
            );
        }
        let mut count = 0;
        for (lock, stripe) in self.stripes.iter().zip(fresh) {
            count += stripe.values().map(|r| r.len() as u64).sum::<u64>();
            *lock.write().unwrap_or_else(|p| p.into_inner()) = stripe;
        }
        self.count.store(count, Relaxed);
    }
}

fn apply_to(stripe: &mut Stripe, change: RouteChange) {
    let RouteChange {
        added,
        node,
        uid,
        device,
    } = change;
    if added {
        let routes = stripe.entry(uid).or_default();
        if let Some(route) = routes.iter_mut().find(|r| r.device == device) {
            route.node = node;
        } else if routes.len() < DEVICES_PER_USER_MAX {
            routes.push(Route { device, node });
        }
    } else if let Some(routes) = stripe.get_mut(&uid) {
        routes.retain(|r| !(r.device == device && r.node == node));
        if routes.is_empty() {
            stripe.remove(&uid);
        }
    }
}

/// Route keys read per SCAN round.
const RELOAD_SCAN_COUNT: usize = 1000;

/// Reads the whole routing table from Redis.
pub fn reload(connection: &mut redis::Connection) -> redis::RedisResult<Vec<(Uid, Route)>> {
    let pattern = format!("{}*", keys::ROUTE_PREFIX);
    let mut routes = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(RELOAD_SCAN_COUNT)
            .query(connection)?;
        let uids: Vec<Uid> = batch.iter().filter_map(|k| keys::route_uid(k)).collect();
        if !uids.is_empty() {
            let mut pipe = redis::pipe();
            for uid in &uids {
                pipe.cmd("HGETALL").arg(keys::route(*uid));
            }
            let hashes: Vec<Vec<(String, String)>> = pipe.query(connection)?;
            for (uid, hash) in uids.into_iter().zip(hashes) {
                for (device, node) in hash {
                    let (Ok(device), Ok(node)) = (device.parse(), node.parse::<u16>()) else {
                        continue;
                    };
                    if (1..=keys::NODE_MAX).contains(&node) {
                        routes.push((uid, Route { device, node }));
                    }
                }
            }
        }
        if next == 0 {
            return Ok(routes);
        }
        cursor = next;
    }
}

/// The subscriber thread: subscription, probes, reloads, until `stop`.
pub struct Subscriber {
    pub target: RedisTarget,
    pub node: u16,
    pub probe_interval: Duration,
    pub cache: Arc<RouteCache>,
    pub health: Arc<ClusterHealth>,
    pub stop: Arc<AtomicBool>,
}

/// How long the subscriber waits for one message before it looks at its clocks again.
const SUBSCRIBER_TICK: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to reach Redis.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Subscriber {
    pub fn run(self) {
        let mut backoff = Duration::from_millis(50);
        while !self.stop.load(Relaxed) {
            match self.session() {
                Ok(()) => return,
                Err(e) => {
                    self.health.subscription_up.store(false, Relaxed);
                    tracing::warn!(error = %e, "cluster: route subscription lost; reconnecting");
                }
            }
            sleep_unless_stopped(backoff, &self.stop);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One subscription's life: subscribe, reload, then apply changes and check probes until
    /// an error or a missed probe (`Err`) or `stop` (`Ok`).
    fn session(&self) -> Result<(), String> {
        let fail = |what: &str, e: redis::RedisError| {
            self.health.error(what, &e);
            format!("{what}: {e}")
        };
        let mut commands = self
            .target
            .connect()
            .map_err(|e| fail("subscriber connect", e))?;
        let mut subscription = self
            .target
            .connect()
            .map_err(|e| fail("subscriber connect", e))?;
        let probe_channel = keys::probe_channel(self.node);
        let mut pubsub = subscription.as_pubsub();
        pubsub
            .subscribe(&[keys::ROUTES_CHANNEL, probe_channel.as_str()])
            .map_err(|e| fail("subscribe", e))?;
        // Subscribed first, loaded second: no change can fall between the two.
        let routes = reload(&mut commands).map_err(|e| fail("route reload", e))?;
        let loaded = routes.len();
        self.cache.replace_all(routes);
        self.health.route_reloads.fetch_add(1, Relaxed);
        self.health.ok(unix_ms());
        tracing::info!(routes = loaded, "cluster: route cache loaded");
        pubsub
            .set_read_timeout(Some(SUBSCRIBER_TICK))
            .map_err(|e| fail("subscriber timeout", e))?;
        // The first probe goes out at once: the subscription counts as up only once one
        // came back.
        let mut next_probe = Instant::now();
        let mut outstanding: Option<u64> = None;
        let mut sequence: u64 = 0;
        loop {
            if self.stop.load(Relaxed) {
                return Ok(());
            }
            if Instant::now() >= next_probe {
                if outstanding.is_some() {
                    self.health.probes_missed.fetch_add(1, Relaxed);
                    return Err(format!(
                        "probe {sequence} not received within {} ms: the subscription delivers nothing",
                        self.probe_interval.as_millis()
                    ));
                }
                sequence += 1;
                redis::cmd("PUBLISH")
                    .arg(&probe_channel)
                    .arg(sequence)
                    .query::<u64>(&mut commands)
                    .map_err(|e| fail("probe publish", e))?;
                self.health.probes_sent.fetch_add(1, Relaxed);
                outstanding = Some(sequence);
                next_probe = Instant::now() + self.probe_interval;
            }
            let message = match pubsub.get_message() {
                Ok(message) => message,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(fail("subscription read", e)),
            };
            let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
                self.health.route_changes_malformed.fetch_add(1, Relaxed);
                continue;
            };
            if message.get_channel_name() == probe_channel {
                if payload.parse() == Ok(sequence) {
                    outstanding = None;
                    self.health.subscription_up.store(true, Relaxed);
                    self.health.ok(unix_ms());
                }
                continue;
            }
            match RouteChange::parse(payload) {
                Some(change) => {
                    self.cache.apply(change);
                    self.health.route_changes.fetch_add(1, Relaxed);
                }
                None => {
                    self.health.route_changes_malformed.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// Sleeps for `duration` in short steps, returning early when `stop` is raised.
pub fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) {
    let end = Instant::now() + duration;
    while !stop.load(Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chinwag_protocol::UidKind;

    fn session(slot: u32) -> SessionRef {
        SessionRef {
            node: 1,
            shard: 0,
            slot,
            generation: 1,
        }
    }

    fn device(n: u64) -> DeviceId {
        DeviceId::from_u64(n).unwrap()
    }

    #[test]
    fn a_logout_of_a_replaced_session_keeps_the_newer_route() {
        let uid = Uid::new(UidKind::Buyer, 1);
        let mut own = OwnRoutes::default();
        let login = |slot| RouteOp::Login {
            uid,
            device: device(5),
            session: session(slot),
        };
        let logout = |slot| RouteOp::Logout {
            uid,
            device: device(5),
            session: session(slot),
        };
        assert!(own.apply(login(1), 2).unwrap().added);
        assert!(own.apply(login(2), 2).unwrap().added);
        // The first session's end arrives after the second took the device over.
        assert_eq!(own.apply(logout(1), 2), None);
        assert_eq!(own.count(), 1);
        let gone = own.apply(logout(2), 2).unwrap();
        assert!(!gone.added && gone.node == 2 && gone.device == device(5));
        assert_eq!(own.count(), 0);
    }

    #[test]
    fn the_cache_follows_changes_and_a_removal_from_a_node_the_device_left_is_ignored() {
        let cache = RouteCache::default();
        let uid = Uid::new(UidKind::Agent, 9);
        let change = |added, node, d| RouteChange {
            added,
            node,
            uid,
            device: device(d),
        };
        cache.apply(change(true, 1, 10));
        cache.apply(change(true, 1, 11));
        assert_eq!(cache.count(), 2);
        // Device 10 logs in on node 3; node 1's late logout must not remove it.
        cache.apply(change(true, 3, 10));
        cache.apply(change(false, 1, 10));
        let mut routes = cache.of(uid).to_vec();
        routes.sort_by_key(|r| r.device);
        assert_eq!(
            routes,
            [
                Route {
                    device: device(10),
                    node: 3
                },
                Route {
                    device: device(11),
                    node: 1
                }
            ]
        );
        cache.apply(change(false, 3, 10));
        cache.apply(change(false, 1, 11));
        assert!(cache.of(uid).is_empty());
        assert_eq!(cache.count(), 0);

        cache.replace_all(vec![(
            uid,
            Route {
                device: device(12),
                node: 2,
            },
        )]);
        assert_eq!(cache.count(), 1);
        assert_eq!(cache.of(uid)[0].node, 2);
        for d in 0..100 {
            cache.apply(change(true, 2, 100 + d));
        }
        assert_eq!(
            cache.of(uid).len(),
            DEVICES_PER_USER_MAX,
            "bounded per user"
        );
    }
}
