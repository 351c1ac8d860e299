//! A cluster of real `chinwag` nodes for end-to-end tests: a `redis-server` of the test's own,
//! `chinwag cluster init`, and N nodes (`chinwag serve --cluster ...`), each on its own data
//! directory and on fixed ports, so that a node killed with SIGKILL comes back where its
//! clients and peers look for it.
//!
//! What a test can do to the cluster, each as the real thing (docs/cluster.md, "Failures"):
//! - [`Cluster::kill`] a node (SIGKILL) and [`Cluster::restart`] it on the same data directory
//!   and ports, or [`Cluster::wipe`] its data directory first (a lost disk);
//! - [`Cluster::pause`] a node (SIGSTOP: a process that stops answering without closing
//!   anything, as a long stall or a frozen VM) and [`Cluster::resume`] it (SIGCONT);
//! - read who leads each partition, at which epoch and with which in-sync set, from Redis
//!   ([`Cluster::partition`], [`Cluster::led_by`]), for replicated clusters (issue 14,
//!   `chinwag cluster init --replicas R`, [`ClusterSpec::replicas`]);
//! - [`Cluster::kill_redis`] and [`Cluster::start_redis`] (Redis keeps its data in an
//!   append-only file, as docs/cluster.md tells operators to run it);
//! - [`Cluster::cut_link`] the node link between two nodes and [`Cluster::heal_link`] it
//!   (with [`ClusterSpec::link_proxies`]). The engine has no way to cut a link from outside;
//!   but a node's peers dial the link address it registers, so the harness puts a TCP proxy in
//!   front of each node's link port and starts the node with `--node-advertise` naming the
//!   proxy (as an operator would behind a NAT or a port map). A cut makes the proxy drop every byte between
//!   the two nodes, both ways, on the open connection and on every new one, as a network that
//!   loses packets does: only the links' heartbeats and timeouts can find it. The proxy tells
//!   which node dialed by the process that owns the connection's other end (`ss -p`).
//!
//! Readiness is polled, never slept for: a node is ready when its `/healthz` answers 200 (Redis
//! and its subscription up) and it sees every live node of the cluster as alive.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chinwag_protocol::client::{Client, Encoding};
use chinwag_protocol::service::ServiceClient;
use chinwag_protocol::{DeviceType, Uid, UidKind};

use crate::redis::{free_port, RedisServer};
use crate::{binary, mint_token, Server};

/// The token secret every node of a test cluster shares.
pub const SECRET: &str = "cluster-secret-cluster-secret-0123";

/// The longest the harness waits for the cluster to reach a state (a bound against hanging,
/// not a measure of speed: a debug build on a loaded 2-core machine is slow).
pub const SETTLE: Duration = Duration::from_secs(30);

/// Heartbeats and probes short enough that a test sees a node's or Redis's lapse within about
/// a second, and the same on every node. The node links keep their defaults: shorter link
/// timers close links that a loaded machine left silent for a second (see [`FAST_LINKS`]).
pub const FAST: [&str; 4] = [
    "--cluster-heartbeat-interval-ms=200",
    "--cluster-heartbeat-ttl-ms=1000",
    "--cluster-probe-interval-ms=500",
    "--cluster-redis-timeout-ms=500",
];

/// Node-link timers for tests of a cut link: a silent link is found within a second and a
/// request waits at most a second for it.
pub const FAST_LINKS: [&str; 3] = [
    "--node-link-heartbeat-ms=200",
    "--node-link-idle-timeout-ms=1000",
    "--node-link-request-timeout-ms=1000",
];

/// How a test cluster is made.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Nodes 1..=nodes.
    pub nodes: u16,
    /// P, fixed when the cluster is created.
    pub partitions: u32,
    /// Shards per node.
    pub shards: usize,
    /// More flags for every node (after the harness's, so they override them).
    pub extra: Vec<String>,
    /// A proxy in front of every node's link port (needed by [`Cluster::cut_link`]).
    pub link_proxies: bool,
    /// Replicas per partition (`chinwag cluster init --replicas R`); `None`: init's default
    /// (and no flag, for an engine that has none).
    pub replicas: Option<u16>,
}

impl Default for ClusterSpec {
    fn default() -> ClusterSpec {
        ClusterSpec {
            nodes: 3,
            partitions: 8,
            shards: 1,
            extra: Vec::new(),
            link_proxies: false,
            replicas: None,
        }
    }
}

/// One node's fixed places: its ports and, while it is down, its data directory.
struct Slot {
    client_port: u16,
    backend_port: u16,
    link_port: u16,
    /// The running node, if it runs.
    server: Option<Server>,
    /// The data directory of a node that is down (a running node holds its own).
    parked: Option<tempfile::TempDir>,
    /// The proxy its peers dial instead of its link port, if the cluster has them.
    proxy: Option<LinkProxy>,
    /// Stopped by SIGSTOP ([`Cluster::pause`]).
    paused: bool,
}

/// A running cluster: Redis and its nodes, all stopped when dropped.
pub struct Cluster {
    pub spec: ClusterSpec,
    pub redis: RedisServer,
    slots: Vec<Slot>,
    /// Node processes by pid, for the link proxies to tell who dialed.
    pids: Arc<std::sync::Mutex<HashMap<u32, u16>>>,
}

impl Cluster {
    /// Redis, `chinwag cluster init --nodes 1,..,N --partitions P`, and every node, ready.
    pub fn start(spec: ClusterSpec) -> Cluster {
        let redis = RedisServer::start_persistent();
        let nodes: Vec<String> = (1..=spec.nodes).map(|n| n.to_string()).collect();
        let mut init = Command::new(binary());
        init.args(["cluster", "--cluster", &redis.url(), "init", "--nodes"])
            .arg(nodes.join(","))
            .arg("--partitions")
            .arg(spec.partitions.to_string());
        if let Some(r) = spec.replicas {
            init.arg("--replicas").arg(r.to_string());
        }
        let out = init.output().expect("run chinwag cluster init");
        assert!(
            out.status.success(),
            "chinwag cluster init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pids = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let slots = (1..=spec.nodes)
            .map(|_| {
                let link_port = free_port();
                Slot {
                    client_port: free_port(),
                    backend_port: free_port(),
                    link_port,
                    server: None,
                    parked: Some(tempfile::tempdir().expect("tempdir")),
                    proxy: spec
                        .link_proxies
                        .then(|| LinkProxy::start(link_port, Arc::clone(&pids))),
                    paused: false,
                }
            })
            .collect();
        let mut cluster = Cluster {
            spec,
            redis,
            slots,
            pids,
        };
        // The highest number first: the lower number dials, so a starting node finds the
        // peers it dials registered.
        for n in (1..=cluster.spec.nodes).rev() {
            cluster.launch(n);
        }
        cluster.wait_ready();
        cluster
    }

    /// Node `n` (1-based); panics if it is down.
    pub fn node(&self, n: u16) -> &Server {
        self.slot(n)
            .server
            .as_ref()
            .unwrap_or_else(|| panic!("node {n} is down"))
    }

    /// Whether node `n` runs (a paused node runs: it is only stopped).
    pub fn is_up(&self, n: u16) -> bool {
        self.slot(n).server.is_some()
    }

    /// Whether node `n` is stopped by [`Cluster::pause`].
    pub fn is_paused(&self, n: u16) -> bool {
        self.slot(n).paused
    }

    /// The client addresses of every node, `127.0.0.1:P1,127.0.0.1:P2,...`: what
    /// `chinwag-loadgen --addr` and the client libraries take.
    pub fn addrs(&self) -> String {
        (1..=self.spec.nodes)
            .map(|n| format!("127.0.0.1:{}", self.slot(n).client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The WebSocket URL of node `n` (known while it is down too: its port is fixed).
    pub fn ws_url(&self, n: u16) -> String {
        format!("ws://127.0.0.1:{}/ws", self.slot(n).client_port)
    }

    /// The service-port address of node `n`.
    pub fn backend_addr(&self, n: u16) -> String {
        format!("127.0.0.1:{}", self.slot(n).backend_port)
    }

    /// The node-link port of node `n`.
    pub fn link_port(&self, n: u16) -> u16 {
        self.slot(n).link_port
    }

    /// A login token for `uid`.
    pub fn token(&self, uid: Uid) -> String {
        mint_token(SECRET, uid)
    }

    /// A client of node `n` in `encoding`, logged in as `uid` on a web device.
    pub fn login(&self, n: u16, uid: Uid, encoding: Encoding) -> Client {
        let mut client = Client::connect(&self.ws_url(n), encoding)
            .unwrap_or_else(|e| panic!("connect to node {n}: {e}"));
        client
            .login(&self.token(uid), DeviceType::Web)
            .unwrap_or_else(|e| panic!("login of {uid} on node {n}: {e:?}"));
        client
    }

    /// A service-port client of node `n`, authenticated as `service:1`.
    pub fn service(&self, n: u16) -> ServiceClient {
        let token = mint_token(SECRET, Uid::new(UidKind::Service, 1));
        ServiceClient::connect(&self.backend_addr(n), &token)
            .unwrap_or_else(|e| panic!("service port of node {n}: {e}"))
    }

    /// Kills node `n` with SIGKILL and waits for it to be gone; its data directory is kept.
    pub fn kill(&mut self, n: u16) {
        let slot = self.slot_mut(n);
        slot.paused = false;
        let server = slot
            .server
            .take()
            .unwrap_or_else(|| panic!("node {n} is already down"));
        server.signal(libc::SIGKILL);
        slot.parked = Some(server.into_data_dir());
    }

    /// Gives node `n`, which is down, an empty data directory in place of its own: its disk
    /// is lost (what replication is for).
    pub fn wipe(&mut self, n: u16) {
        let slot = self.slot_mut(n);
        assert!(slot.server.is_none(), "node {n} runs: kill it first");
        slot.parked = Some(tempfile::tempdir().expect("tempdir"));
    }

    /// Starts node `n` again on its data directory and ports, once its last heartbeat has
    /// expired (until then Redis says the number is held by a live node, and a node refuses
    /// to start), and waits for the cluster to be ready.
    pub fn restart(&mut self, n: u16) {
        self.wait_until(&format!("node {n}'s last heartbeat to expire"), |c| {
            !c.heartbeat_alive(n)
        });
        self.launch(n);
        self.wait_ready();
    }

    /// Stops node `n` with SIGSTOP: it answers nothing, renews nothing and closes nothing
    /// (its sockets stay open, its peers' links to it go silent) until [`Cluster::resume`].
    pub fn pause(&mut self, n: u16) {
        let slot = self.slot(n);
        let server = slot
            .server
            .as_ref()
            .unwrap_or_else(|| panic!("node {n} is down"));
        server.signal(libc::SIGSTOP);
        self.slot_mut(n).paused = true;
    }

    /// Lets a node stopped by [`Cluster::pause`] run again (SIGCONT).
    pub fn resume(&mut self, n: u16) {
        let slot = self.slot(n);
        assert!(slot.paused, "node {n} is not paused");
        slot.server
            .as_ref()
            .unwrap_or_else(|| panic!("node {n} is down"))
            .signal(libc::SIGCONT);
        self.slot_mut(n).paused = false;
    }

    /// Partition `p`'s entry in Redis: `chinwag:partitions` (`"LEADER EPOCH [REPLICAS]"`) and
    /// `chinwag:isr` (`"EPOCH NODES"`); `None` if Redis does not answer or has no entry.
    pub fn partition(&self, p: u32) -> Option<PartitionEntry> {
        let mut c = self.try_redis()?;
        let entry: Option<String> = redis::cmd("HGET")
            .arg("chinwag:partitions")
            .arg(p)
            .query(&mut c)
            .ok()
            .flatten();
        let isr: Option<String> = redis::cmd("HGET")
            .arg("chinwag:isr")
            .arg(p)
            .query(&mut c)
            .ok()
            .flatten();
        PartitionEntry::parse(&entry?, isr.as_deref())
    }

    /// Every partition's entry, by partition number; `None` if any could not be read.
    pub fn partitions(&self) -> Option<Vec<PartitionEntry>> {
        (0..self.spec.partitions)
            .map(|p| self.partition(p))
            .collect()
    }

    /// The partitions node `n` leads now, by the table in Redis (empty if Redis does not
    /// answer).
    pub fn led_by(&self, n: u16) -> Vec<u32> {
        let table = self.partitions().unwrap_or_default();
        (0..self.spec.partitions)
            .zip(table)
            .filter(|(_, e)| e.leader == n)
            .map(|(p, _)| p)
            .collect()
    }

    /// The running node that leads the most partitions now (the lowest number among equals):
    /// the leader of the busiest share of a chat load that spreads its conversations over the
    /// partitions.
    pub fn busiest_leader(&self) -> u16 {
        (1..=self.spec.nodes)
            .filter(|&n| self.is_up(n))
            .max_by_key(|&n| (self.led_by(n).len(), std::cmp::Reverse(n)))
            .expect("a running node")
    }

    /// Waits until every partition of `partitions` is led by a running node other than
    /// `from`, at an epoch above the one it had in `before` (a takeover happened), and
    /// returns their new entries.
    pub fn wait_taken_over(
        &self,
        from: u16,
        before: &[(u32, PartitionEntry)],
    ) -> Vec<PartitionEntry> {
        let what = format!("node {from}'s partitions to be taken over");
        self.wait_until(&what, |c| {
            before.iter().all(|(p, old)| {
                c.partition(*p).is_some_and(|now| {
                    now.leader != from && c.is_up(now.leader) && now.epoch > old.epoch
                })
            })
        });
        before
            .iter()
            .map(|(p, _)| self.partition(*p).expect("read just now"))
            .collect()
    }

    /// Starts one more node (number N + 1, not in the `init` list) on fresh ports and data,
    /// waits for the cluster to be ready, and returns its number.
    pub fn add_node(&mut self) -> u16 {
        let link_port = free_port();
        let proxy = self
            .spec
            .link_proxies
            .then(|| LinkProxy::start(link_port, Arc::clone(&self.pids)));
        self.slots.push(Slot {
            client_port: free_port(),
            backend_port: free_port(),
            link_port,
            server: None,
            parked: Some(tempfile::tempdir().expect("tempdir")),
            proxy,
            paused: false,
        });
        self.spec.nodes += 1;
        let n = self.spec.nodes;
        self.launch(n);
        self.wait_ready();
        n
    }

    /// Runs `chinwag cluster --cluster URL ARGS` against this cluster's Redis; fails the test
    /// if it fails, else returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        self.redis.cluster_cli(args)
    }

    /// Kills Redis (SIGKILL); the nodes see a Redis that stopped answering.
    pub fn kill_redis(&mut self) {
        self.redis.kill();
    }

    /// Starts Redis again on its port and data (a restart, after [`Cluster::kill_redis`]),
    /// and waits for the nodes to be ready again.
    pub fn start_redis(&mut self) {
        self.redis.restart();
        self.wait_ready();
    }

    /// Cuts the node link between `a` and `b` until [`Cluster::heal_link`]: nothing passes
    /// between them, on the connection that is up and on every new one. Returns how many live
    /// connections it silenced (1 when the link was up through the proxy).
    pub fn cut_link(&mut self, a: u16, b: u16) -> usize {
        let (low, high) = (a.min(b), a.max(b));
        self.slot(high)
            .proxy
            .as_ref()
            .expect("cut_link needs ClusterSpec::link_proxies")
            .cut(low)
    }

    /// Ends a cut made by [`Cluster::cut_link`]: new connections pass again (the cut ones stay
    /// dead until the nodes close them).
    pub fn heal_link(&mut self, a: u16, b: u16) {
        let (low, high) = (a.min(b), a.max(b));
        self.slot(high)
            .proxy
            .as_ref()
            .expect("heal_link needs ClusterSpec::link_proxies")
            .heal(low);
    }

    /// Waits until every running node answers `/healthz` with 200, sees every running node
    /// alive (`chinwag_cluster_peer_up`) and has its node link to each of them up
    /// (`chinwag_link_connected`). A paused node counts as not running.
    pub fn wait_ready(&self) {
        let up: Vec<u16> = (1..=self.spec.nodes)
            .filter(|&n| self.is_up(n) && !self.slot(n).paused)
            .collect();
        self.wait_until(
            "every running node to be healthy, see the others and link to them",
            |c| {
                up.iter().all(|&n| {
                    let node = c.node(n);
                    node.get("/healthz").0 == 200
                        && up.iter().all(|&peer| {
                            let alive = format!("node=\"{peer}\"");
                            let linked = format!("peer=\"{peer}\"");
                            node.metric("chinwag_cluster_peer_up", &alive) == 1
                                && (peer == n
                                    || node.metric("chinwag_link_connected", &linked) == 1)
                        })
                })
            },
        );
    }

    /// Waits until node `n`'s link to `peer` is up (`true`) or down.
    pub fn wait_link(&self, n: u16, peer: u16, up: bool) {
        let what = format!(
            "node {n}'s link to node {peer} {}",
            if up { "up" } else { "down" }
        );
        self.wait_until(&what, |c| {
            let linked = format!("peer=\"{peer}\"");
            (c.node(n).metric("chinwag_link_connected", &linked) == 1) == up
        });
    }

    /// The node that owns conversation `conv`: its partition (the low 16 bits of the id) is
    /// dealt round-robin by `chinwag cluster init`, partition p to node p % N + 1.
    pub fn owner_of(&self, conv: chinwag_protocol::ConvId) -> u16 {
        ((conv.0 & 0xffff) % u64::from(self.spec.nodes)) as u16 + 1
    }

    /// Waits until `done(self)`; fails the test with the nodes' logs after [`SETTLE`].
    pub fn wait_until(&self, what: &str, mut done: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + SETTLE;
        while !done(self) {
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every running node's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.spec.nodes {
            if let Some(server) = &self.slot(n).server {
                let log = server.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                out.push_str(&format!("--- node {n} (last lines)\n{}\n", tail.join("\n")));
            } else {
                out.push_str(&format!("--- node {n}: down\n"));
            }
        }
        out
    }

    /// A connection to the cluster's Redis, if it answers within a second.
    fn try_redis(&self) -> Option<redis::Connection> {
        let client = redis::Client::open(self.redis.url()).ok()?;
        let c = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        Some(c)
    }

    /// Whether Redis holds node `n`'s heartbeat (false when Redis does not answer).
    fn heartbeat_alive(&self, n: u16) -> bool {
        let Some(mut c) = self.try_redis() else {
            return false;
        };
        redis::cmd("EXISTS")
            .arg(format!("chinwag:node:{n}:alive"))
            .query::<bool>(&mut c)
            .unwrap_or(false)
    }

    /// Starts node `n` on its parked data directory.
    fn launch(&mut self, n: u16) {
        let args = self.node_args(n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let slot = self.slot_mut(n);
        let dir = slot.parked.take().expect("a stopped node has its data dir");
        let server = Server::start_in(dir, &args, &[]);
        self.pids.lock().unwrap().insert(server.pid() as u32, n);
        self.slot_mut(n).server = Some(server);
    }

    /// The flags of node `n`.
    fn node_args(&self, n: u16) -> Vec<String> {
        let slot = self.slot(n);
        let mut args: Vec<String> = vec![
            "--jwt-secret".into(),
            SECRET.into(),
            format!("--cluster={}", self.redis.url()),
            format!("--node={n}"),
            format!("--node-listen=127.0.0.1:{}", slot.link_port),
            format!("--listen=127.0.0.1:{}", slot.client_port),
            format!("--backend-listen=127.0.0.1:{}", slot.backend_port),
            format!("--partitions={}", self.spec.partitions),
            format!("--shards={}", self.spec.shards),
            // Small segments: a node starts fast and the temporary directories stay small.
            "--log-segment-bytes=1048576".into(),
        ];
        if let Some(proxy) = &slot.proxy {
            // Peers dial the proxy: the node registers its address as its link's.
            args.push(format!("--node-advertise={}", proxy.addr));
        }
        args.extend(FAST.iter().map(|s| s.to_string()));
        args.extend(self.spec.extra.iter().cloned());
        args
    }

    fn slot(&self, n: u16) -> &Slot {
        assert!(
            (1..=self.spec.nodes).contains(&n),
            "no node {n} in this cluster"
        );
        &self.slots[usize::from(n - 1)]
    }

    fn slot_mut(&mut self, n: u16) -> &mut Slot {
        assert!(
            (1..=self.spec.nodes).contains(&n),
            "no node {n} in this cluster"
        );
        &mut self.slots[usize::from(n - 1)]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes go first (their Drop kills them), then Redis.
        for slot in &mut self.slots {
            slot.server = None;
        }
    }
}

/// One partition's entry in Redis (docs/cluster.md, "What Redis holds").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionEntry {
    /// The node that leads it.
    pub leader: u16,
    /// Its fencing epoch (1 at creation, + 1 at each takeover).
    pub epoch: u64,
    /// Its replicas in placement order (the leader alone for an unreplicated table).
    pub replicas: Vec<u16>,
    /// Its in-sync replicas as recorded at `isr_epoch` (the leader alone if none recorded).
    pub isr: Vec<u16>,
    /// The epoch the in-sync set was recorded at.
    pub isr_epoch: u64,
}

impl PartitionEntry {
    /// Parses `"LEADER EPOCH [REPLICAS]"` and `"EPOCH NODES"` (nodes comma-separated).
    fn parse(entry: &str, isr: Option<&str>) -> Option<PartitionEntry> {
        let nodes = |list: &str| -> Option<Vec<u16>> {
            list.split(',').map(|n| n.trim().parse().ok()).collect()
        };
        let mut fields = entry.split_whitespace();
        let leader: u16 = fields.next()?.parse().ok()?;
        let epoch: u64 = fields.next()?.parse().ok()?;
        let replicas = match fields.next() {
            Some(list) => nodes(list)?,
            None => vec![leader],
        };
        let (isr_epoch, isr) = match isr {
            Some(text) => {
                let (at, list) = text.trim().split_once(' ')?;
                (at.parse().ok()?, nodes(list)?)
            }
            None => (epoch, vec![leader]),
        };
        Some(PartitionEntry {
            leader,
            epoch,
            replicas,
            isr,
            isr_epoch,
        })
    }

    /// Whether node `n` is in the in-sync set at the current epoch.
    pub fn in_sync(&self, n: u16) -> bool {
        self.isr_epoch == self.epoch && self.isr.contains(&n)
    }
}

/// A TCP proxy in front of a node's link port, registered in Redis as the node's link address,
/// so its peers dial the proxy. It forwards each connection to the node until the dialer is
/// cut off: then it drops every byte of that dialer's connections, both ways, as a network
/// that loses packets does (the connections look open; only the links' heartbeats and
/// timeouts find them dead), and so it does for new connections of that dialer until healed.
struct LinkProxy {
    addr: std::net::SocketAddr,
    /// The dialer nodes cut off.
    cut: Arc<std::sync::Mutex<std::collections::HashSet<u16>>>,
    /// Every connection accepted.
    conns: Arc<std::sync::Mutex<Vec<Proxied>>>,
    /// Node processes by pid, to tell which node dialed.
    pids: Arc<std::sync::Mutex<HashMap<u32, u16>>>,
}

/// A connection through a [`LinkProxy`].
struct Proxied {
    /// The node that dialed it; 0 while unknown (a node dials its peers while it starts,
    /// before the harness has its pid: it is asked again at the cut).
    from: u16,
    /// The dialer's port, to ask `ss` which process owns it.
    dialer_port: u16,
    /// Once set, every byte is dropped; dead for good (bytes dropped mid-stream leave no
    /// framing to resume).
    dead: Arc<AtomicBool>,
}

impl LinkProxy {
    /// A proxy on a free port of 127.0.0.1 to `upstream`; `pids` maps node processes to their
    /// numbers, to tell which node dialed.
    fn start(upstream: u16, pids: Arc<std::sync::Mutex<HashMap<u32, u16>>>) -> LinkProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind link proxy");
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut_set, held, known) = (Arc::clone(&cut), Arc::clone(&conns), Arc::clone(&pids));
        std::thread::spawn(move || {
            for dialer in listener.incoming() {
                let Ok(dialer) = dialer else { continue };
                let Ok(node) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let dialer_port = dialer.peer_addr().map_or(0, |a| a.port());
                let from = dialer_node(dialer_port, addr.port(), &known);
                let dead = Arc::new(AtomicBool::new(false));
                {
                    // Under the lock `cut` takes, so a connection is never missed by a cut.
                    let cut_set = cut_set.lock().unwrap();
                    dead.store(cut_set.contains(&from), Ordering::SeqCst);
                    held.lock().unwrap().push(Proxied {
                        from,
                        dialer_port,
                        dead: Arc::clone(&dead),
                    });
                }
                let _ = dialer.set_nodelay(true);
                let _ = node.set_nodelay(true);
                forward(
                    dialer.try_clone().unwrap(),
                    node.try_clone().unwrap(),
                    Arc::clone(&dead),
                );
                forward(node, dialer, dead);
            }
        });
        LinkProxy {
            addr,
            cut,
            conns,
            pids,
        }
    }

    /// Cuts node `from` off; returns how many of its connections were live.
    fn cut(&self, from: u16) -> usize {
        let mut cut = self.cut.lock().unwrap();
        cut.insert(from);
        let mut conns = self.conns.lock().unwrap();
        let mut silenced = 0;
        for conn in conns.iter_mut().filter(|c| !c.dead.load(Ordering::SeqCst)) {
            if conn.from == 0 {
                conn.from = dialer_node(conn.dialer_port, self.addr.port(), &self.pids);
            }
            if conn.from == from && !conn.dead.swap(true, Ordering::SeqCst) {
                silenced += 1;
            }
        }
        silenced
    }

    fn heal(&self, from: u16) {
        self.cut.lock().unwrap().remove(&from);
    }
}

/// Which node dialed from `dialer_port` to the proxy's `port`: the process that owns that
/// end, by `ss`; 0 if unknown (closed, or a process the harness has not recorded yet).
fn dialer_node(dialer_port: u16, port: u16, pids: &std::sync::Mutex<HashMap<u32, u16>>) -> u16 {
    let out = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .arg(format!("( sport = :{dialer_port} and dport = :{port} )"))
        .stderr(Stdio::null())
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse::<u32>().ok());
    pid.and_then(|pid| pids.lock().unwrap().get(&pid).copied())
        .unwrap_or(0)
}

/// Copies `from` to `to` on a thread of its own until either side ends; once `dead`, reads
/// and drops everything.
fn forward(mut from: std::net::TcpStream, mut to: std::net::TcpStream, dead: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dead.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// A TCP relay in front of a server: it forwards every connection it accepts to `upstream`
/// until [`Relay::kill`], which resets every connection it holds and stops accepting (new
/// connections are refused), as a node that died looks to its clients. It lets a test put
/// "another node" in front of a single server.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    dead: Arc<AtomicBool>,
    /// Bytes relayed from the server to clients so far.
    pub bytes_down: Arc<AtomicU64>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    listener: Option<std::net::TcpListener>,
}

impl Relay {
    /// A relay on a free port of 127.0.0.1 to `upstream`.
    pub fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = listener.try_clone().expect("clone listener");
        let (dead_flag, down, held) = (
            Arc::clone(&dead),
            Arc::clone(&bytes_down),
            Arc::clone(&conns),
        );
        std::thread::spawn(move || {
            for client in accept.incoming() {
                if dead_flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut held = held.lock().unwrap();
                    // Checked under the lock `kill` takes, so no connection slips past it.
                    if dead_flag.load(Ordering::SeqCst) {
                        return;
                    }
                    held.push(client.try_clone().unwrap());
                    held.push(server.try_clone().unwrap());
                }
                copy(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    None,
                );
                copy(server, client, Some(Arc::clone(&down)));
            }
        });
        Relay {
            addr,
            dead,
            bytes_down,
            conns,
            listener: Some(listener),
        }
    }

    /// Resets every relayed connection and refuses new ones from now on.
    pub fn kill(&mut self) {
        self.dead.store(true, Ordering::SeqCst);
        // Closing the listener refuses connects; the accept thread ends at its next wake-up
        // (a connect to its port, made here, wakes it before the socket closes).
        let _ = std::net::TcpStream::connect(self.addr);
        self.listener = None;
        // Both directions end, as when the kernel closes a killed process's sockets.
        for stream in self.conns.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies `from` to `to` on a thread of its own until either side ends, counting the bytes in
/// `count` if given.
fn copy(mut from: std::net::TcpStream, mut to: std::net::TcpStream, count: Option<Arc<AtomicU64>>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
            if let Some(count) = &count {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// The `chinwag-loadgen` binary, built once per test process with this test's profile (as
/// [`binary`] builds `chinwag`).
pub fn loadgen_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let server = binary();
            let profile_dir = server.parent().expect("target/<profile>").to_path_buf();
            let target_dir = profile_dir.parent().expect("target/");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "chinwag-loadgen"]);
            build.arg("--target-dir").arg(target_dir);
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build");
            assert!(status.success(), "cargo build -p chinwag-loadgen failed");
            profile_dir.join("chinwag-loadgen")
        })
        .clone()
}

/// A chat load over every node of a cluster, as the failure tests run it: `conversations`
/// direct conversations of users `uid_base`.., two messages in flight per user, `duration_s`
/// seconds of sending (no warm-up), up to 60 s of drain, and at the end every conversation
/// read back and judged against every acknowledged send (`--verify-log`, docs/loadgen.md).
pub fn chat_load(
    cluster: &Cluster,
    uid_base: u64,
    conversations: u32,
    duration_s: u64,
) -> LoadgenRun {
    chat_load_with(cluster, uid_base, conversations, duration_s, &[])
}

/// [`chat_load`] with more `chinwag-loadgen chat` flags.
pub fn chat_load_with(
    cluster: &Cluster,
    uid_base: u64,
    conversations: u32,
    duration_s: u64,
    extra: &[&str],
) -> LoadgenRun {
    let addrs = cluster.addrs();
    let (uid_base, conversations) = (uid_base.to_string(), conversations.to_string());
    let duration = duration_s.to_string();
    let mut args = vec![
        "chat",
        "--uid-base",
        &uid_base,
        "--addr",
        &addrs,
        "--secret",
        SECRET,
        "--conversations",
        &conversations,
        "--window",
        "2",
        "--warmup-s",
        "0",
        "--duration-s",
        &duration,
        "--drain-s",
        "60",
        "--login-timeout-s",
        "60",
        "--verify-log",
        "--verify-timeout-s",
        "60",
    ];
    args.extend_from_slice(extra);
    LoadgenRun::start(&args)
}

/// The failures of a load report by cause; fails the test on a cause none of `allowed`
/// (prefixes) begins.
pub fn failures(
    report: &serde_json::Value,
    allowed: &[&str],
) -> std::collections::BTreeMap<String, u64> {
    let failures: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(report["failures"].clone()).expect("failures by cause");
    for cause in failures.keys() {
        assert!(
            allowed.iter().any(|a| cause.starts_with(a)),
            "unexpected failure {cause:?}: {report}"
        );
    }
    failures
}

/// The verdict of a [`chat_load`] report that must have lost nothing: no violation (every
/// acknowledged message seen once, in order, by every member; and in the stored log read back,
/// every acknowledged message once at its seq with its body, every conversation 1..n), every
/// user caught up, all `conversations` read back, and at least `send_ok_min` sends acknowledged.
/// Prints what the load went through and the failover figures (`failure_to_write_resumed`).
pub fn assert_verified(report: &serde_json::Value, conversations: u64, send_ok_min: u64) {
    let resumed = &report["latency"]["failure_to_write_resumed_us"];
    eprintln!(
        "chat load: send_ok {}, delivered {}, reconnects {}, replies_timed_out {}, \
         history_repairs {}, failures {}; stored log: {} conversations, {} stored, {} acked, \
         {} unacknowledged but stored; write outages {} (unresolved {}), writes resumed after \
         the failure p50 {} µs, max {} µs; slowest acks {}",
        report["send_ok"],
        report["delivered"],
        report["reconnects"],
        report["replies_timed_out"],
        report["history_repairs"],
        report["failures"],
        report["verify_conversations"],
        report["verify_stored"],
        report["verify_acked"],
        report["verify_unacked_stored"],
        report["write_outages"],
        report["write_outages_unresolved"],
        resumed["p50"],
        resumed["max"],
        report["slowest_acks"],
    );
    assert_eq!(
        report["violations"], 0,
        "the checkers found violations: {}\nthe report: {report}",
        report["violations_first"]
    );
    assert_eq!(report["not_caught_up_at_end"], 0, "{report}");
    let send_ok = report["send_ok"].as_u64().expect("send_ok");
    assert!(
        send_ok >= send_ok_min,
        "too little load to mean anything: {report}"
    );
    assert_eq!(report["verify_conversations"], conversations, "{report}");
    assert_eq!(report["verify_unread"], 0, "{report}");
    let acked = report["verify_acked"].as_u64().expect("verify_acked");
    // Each acknowledged cmid counts once (a retry acknowledged again is one).
    assert!(
        acked > 0 && acked <= send_ok,
        "acknowledged sends checked: {report}"
    );
}

/// A `chinwag-loadgen` run in the background, its JSON report read when it ends.
pub struct LoadgenRun {
    /// The running load generator (taken by [`LoadgenRun::finish`]).
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
    json_path: std::path::PathBuf,
}

impl LoadgenRun {
    /// Starts `chinwag-loadgen ARGS --quiet --json-out FILE`.
    pub fn start(args: &[&str]) -> LoadgenRun {
        let dir = tempfile::tempdir().expect("tempdir");
        let json_path = dir.path().join("report.json");
        let child = Command::new(loadgen_binary())
            .args(args)
            .arg("--quiet")
            .arg("--json-out")
            .arg(&json_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chinwag-loadgen");
        LoadgenRun {
            child: Some(child),
            _dir: dir,
            json_path,
        }
    }

    /// Whether the run is still going (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Waits for the run to end (it is bounded by its own flags) and returns its exit code and
    /// report; fails the test with its output if it wrote none.
    pub fn finish(mut self) -> (Option<i32>, serde_json::Value) {
        let output = self
            .child
            .take()
            .expect("a run is finished once")
            .wait_with_output()
            .expect("wait for chinwag-loadgen");
        let text = std::fs::read_to_string(&self.json_path).unwrap_or_else(|e| {
            panic!(
                "chinwag-loadgen wrote no report ({e}); stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let report = serde_json::from_str(&text).expect("the report is JSON");
        (output.status.code(), report)
    }
}

impl Drop for LoadgenRun {
    /// A test that fails before [`LoadgenRun::finish`] stops its load at once rather than
    /// leaving it to run out its own bounds against a cluster that is gone.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_entries_parse_with_and_without_replicas() {
        let entry = PartitionEntry::parse("2 5 1,2", Some("5 2")).unwrap();
        assert_eq!(
            entry,
            PartitionEntry {
                leader: 2,
                epoch: 5,
                replicas: vec![1, 2],
                isr: vec![2],
                isr_epoch: 5,
            }
        );
        assert!(entry.in_sync(2) && !entry.in_sync(1));
        // An unreplicated table (issue 13's layout): the owner alone.
        let single = PartitionEntry::parse("3 1", None).unwrap();
        assert_eq!(
            (single.replicas.clone(), single.isr.clone()),
            (vec![3], vec![3])
        );
        // An in-sync set of an older epoch holds nobody in sync now.
        let stale = PartitionEntry::parse("1 3 1,2", Some("2 1,2")).unwrap();
        assert!(!stale.in_sync(1));
        assert_eq!(PartitionEntry::parse("x 1", None), None);
        assert_eq!(PartitionEntry::parse("1 2 1,y", None), None);
    }
}
