//! The node's configuration: embedded defaults, then a TOML file (`--config`), then `CHINWAG_*`
//! environment variables, then flags, each layer overriding the one before ([`Config::load`]):
//! the flag an operator types wins, as with most servers.
//!
//! Every setting is declared once, in the [`settings!`] table below: its doc line (the `--help`
//! text), its type, its default and how `--help` shows it. From that one entry come the flag
//! (a field of [`ServeArgs`]), the TOML key (a field of [`Config`], the flag's name with `_`
//! for `-`) and the environment variable (`CHINWAG_<FLAG>`, parsed by the same clap definition
//! so a value has the same syntax everywhere).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;

use crate::store::FsyncPolicy;
use crate::wechat::account::WechatSection;

/// Declares every setting of `chinwag serve`: its help text (no final period), any
/// `#[arg(...)]` attributes for its flag, then `name: Type = default, "the default as --help
/// shows it";` (without the last part `--help` shows no default). `name: Type => Flag = ...` gives a flag whose value type differs (a flag
/// `String` for an `Option<String>` setting).
macro_rules! settings {
    ($(
        $help:literal
        $(#[arg($($arg:tt)*)])*
        $name:ident : $ty:ty $(=> $flag_ty:ty)? = $default:expr $(, $shown:literal)?;
    )*) => {
        /// Flags of `chinwag serve`. Every value is optional here: what is not given falls
        /// through to the TOML file and then to the default shown.
        #[derive(Args, Debug, Default, Clone)]
        #[command(
            after_help = "Every flag can also be set in the TOML file given by --config (key: the flag's name \
with '_' for '-') and by the environment variable CHINWAG_<FLAG> ('-' as '_', e.g. CHINWAG_LISTEN). \
Precedence, lowest to highest: defaults, TOML file, environment, flags."
        )]
        pub struct ServeArgs {
            /// TOML configuration file.
            #[arg(long, value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[doc = concat!($help, ".")]
                #[arg(long, help = concat!($help $(, " [default: ", $shown, "]")?))]
                $(#[arg($($arg)*)])*
                pub $name: Option<settings!(@flag $ty $(, $flag_ty)?)>,
            )*
        }

        /// The resolved configuration of one node.
        #[derive(Clone, Debug, PartialEq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( #[doc = concat!($help, ".")] pub $name: $ty, )*
            /// The WeChat channel: its official accounts and its sender's limits, the
            /// `[wechat]` section (docs/wechat.md). Only in the TOML file: a list of accounts
            /// has no flag form.
            pub wechat: WechatSection,
        }

        impl Default for Config {
            fn default() -> Config {
                Config { $( $name: $default, )* wechat: WechatSection::default() }
            }
        }

        impl Config {
            /// Overrides every setting `args` gives.
            fn apply(&mut self, args: ServeArgs) {
                $( if let Some(value) = args.$name { self.$name = value.into(); } )*
            }
        }
    };
    (@flag $ty:ty) => { $ty };
    (@flag $ty:ty, $flag_ty:ty) => { $flag_ty };
}

settings! {
    "Client port for WebSocket and HTTP: HOST:PORT, an IP address or a host name"
    #[arg(value_name = "ADDR", value_parser = parse_listen)]
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7000)), "127.0.0.1:7000";
    "Service port for backend services (binary codec over TCP, docs/backend.md)"
    #[arg(value_name = "ADDR")]
    backend_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7001)), "127.0.0.1:7001";
    "Largest frame a backend service may send on the service port; larger closes the connection"
    #[arg(value_name = "BYTES")]
    backend_frame_bytes_max: usize = 1024 * 1024, "1048576";
    "Open service-port connections per shard; over it new ones are refused at accept"
    #[arg(value_name = "N")]
    backend_connections_per_shard_max: usize = 256, "256";
    "Encoded bytes a node link may queue for one peer; over it, requests for that peer are \
     answered unavailable at once and pushes dropped (docs/cluster.md, \"Node links\")"
    #[arg(value_name = "BYTES")]
    node_link_queue_bytes_max: usize = 64 << 20, "67108864";
    "A request queued for a peer this long (the link down, or the peer too slow) is answered \
     unavailable"
    #[arg(value_name = "MS")]
    node_link_request_timeout_ms: u64 = 5_000, "5000";
    "An idle node link sends a heartbeat this often"
    #[arg(value_name = "MS")]
    node_link_heartbeat_ms: u64 = 1_000, "1000";
    "A node link that received nothing this long is closed (and dialed again)"
    #[arg(value_name = "MS")]
    node_link_idle_timeout_ms: u64 = 5_000, "5000";
    "Largest frame a peer may send on a node link; a longer one closes the link"
    #[arg(value_name = "BYTES")]
    node_link_frame_bytes_max: usize = 16 << 20, "16777216";
    "HTTP API requests (POST /api/<op> on the client port) one shard serves at once, each \
     holding up to --backend-frame-bytes-max of body; over it a request is answered 503"
    #[arg(value_name = "N")]
    api_requests_per_shard_max: usize = 64, "64";
    "Longest time POST /api/subscribe waits for new messages before answering an empty batch \
     (a request's ?wait_ms= may ask for less)"
    #[arg(value_name = "MS")]
    api_wait_ms_max: u64 = 30_000, "30000";
    "HTTP API requests one client connection may send one after another (HTTP/1.1 keep-alive); \
     the answer to the last says Connection: close. 1 = a connection per request"
    #[arg(value_name = "N")]
    api_requests_per_connection_max: u64 = 1_000, "1000";
    "An HTTP API connection kept alive that sends no new request this long is closed"
    #[arg(value_name = "MS")]
    api_idle_timeout_ms: u64 = 5_000, "5000";
    "Data directory"
    #[arg(value_name = "DIR")]
    data_dir: PathBuf = PathBuf::from("./chinwag-data"), "./chinwag-data";
    "Secret that signs login tokens (HS256), at least 32 bytes. A secret on the command line is \
     visible to other local users (ps, /proc): prefer --jwt-secret-file or CHINWAG_JWT_SECRET"
    #[arg(value_name = "SECRET")]
    jwt_secret: Option<String> => String = None, "generated once, kept in DATA_DIR/jwt-secret";
    "File holding the token secret (at least 32 bytes; surrounding whitespace is ignored)"
    #[arg(value_name = "FILE")]
    jwt_secret_file: Option<PathBuf> => PathBuf = None;
    "Shards (event-loop threads); 0 = one per core. Any count works with any data directory: \
     the partitions are dealt to the shards at start"
    #[arg(value_name = "N")]
    shards: usize = 0, "0";
    "Partitions of the data (the unit of ownership: every user, shop, pair and group lives in \
     one, each with its own log), fixed when the data directory is created; 0 = the count an \
     existing data directory records, else 256. Another count on an existing directory is \
     refused"
    #[arg(value_name = "N")]
    partitions: usize = 0, "0";
    "When the log is forced to disk"
    #[arg(value_parser = fsync_parser())]
    fsync: FsyncPolicy = FsyncPolicy::Never, "never";
    "Serve GET /echo, a WebSocket that echoes every message"
    #[arg(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    enable_echo: bool = false, "false";
    "Serve GET /dev/token?uid=KIND:ID[&shop=ID], which mints a login token for anyone, so the web chat can be tried without a backend; refused unless --listen is a loopback address"
    #[arg(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    web_dev_tokens: bool = false, "false";
    "Log filter: error, warn, info, debug, trace, or a tracing directive"
    #[arg(value_name = "LEVEL")]
    log_level: String = "info".to_string(), "info";
    "Largest WebSocket frame payload accepted; larger closes with 1009. At most \
     --message-bytes-max (the default follows a lower one)"
    #[arg(value_name = "BYTES")]
    frame_bytes_max: usize = 64 * 1024, "65536";
    "Largest WebSocket message (all fragments) accepted; larger closes with 1009"
    #[arg(value_name = "BYTES")]
    message_bytes_max: usize = 64 * 1024, "65536";
    "Bytes queued for sending to one connection; over it the connection closes with 1008"
    #[arg(value_name = "BYTES")]
    send_queue_bytes_max: usize = 1024 * 1024, "1048576";
    "Longest time a push (another's message, a notify) waits so that a connection's pushes \
     are written together: each shard writes held pushes at most this often, one write per \
     connection for all of them; replies to a client's own requests leave at once (with what \
     is held). 0 = every loop turn, as soon as possible"
    #[arg(value_name = "MS")]
    push_flush_delay_ms: u64 = 0, "0";
    "Messages per second one connection may send; 0 = no limit"
    #[arg(value_name = "N")]
    messages_per_s_max: u32 = 100, "100";
    "Open connections per shard; over it new connections are refused at accept"
    #[arg(value_name = "N")]
    connections_per_shard_max: usize = 262_144, "262144";
    "Time a connection has to complete its HTTP request or handshake"
    #[arg(value_name = "MS")]
    handshake_timeout_ms: u64 = 10_000, "10000";
    "A WebSocket silent this long is closed (clients ping)"
    #[arg(value_name = "MS")]
    idle_timeout_ms: u64 = 90_000, "90000";
    "Time a closing connection has to finish the close handshake"
    #[arg(value_name = "MS")]
    close_timeout_ms: u64 = 5_000, "5000";
    "With --fsync interval, the longest time between two flushes of the log"
    #[arg(value_name = "MS")]
    fsync_interval_ms: u64 = 100, "100";
    "Size of the largest preallocated log segment file (a partition's segments start at \
     --log-segment-bytes-first and double up to it)"
    #[arg(value_name = "BYTES")]
    log_segment_bytes: u64 = 64 << 20, "67108864";
    "Size of a partition's first log segment file (never below what the largest record needs)"
    #[arg(value_name = "BYTES")]
    log_segment_bytes_first: u64 = crate::store::SEGMENT_BYTES_FIRST_DEFAULT, "131072";
    "Delete log segments whose newest message is older than this; 0 = keep"
    #[arg(value_name = "S")]
    log_retention_age_s: u64 = 0, "0";
    "Delete the oldest log segments while a partition's log is larger than this; 0 = no limit"
    #[arg(value_name = "BYTES")]
    log_retention_bytes_max: u64 = 0, "0";
    "How often each shard applies retention and snapshots the partitions written since their last snapshot"
    #[arg(value_name = "MS")]
    log_maintenance_interval_ms: u64 = 300_000, "300000";
    "Client message ids the node remembers for idempotent sends (for 24 h at most), shared \
     evenly by the partitions; memory is about 56 bytes each once a partition's share is used"
    #[arg(value_name = "N")]
    cmid_window_entries_max: usize = crate::store::CMID_WINDOW_ENTRIES_DEFAULT, "1000000";
    "Members one conversation may have (a group's limit; at most 65535); a group operation \
     that would exceed it is refused whole. Each member costs 16 bytes in the group's log \
     record (which must fit a log segment); a convs entry lists the members of a group of at \
     most 200 and only counts them above"
    #[arg(value_name = "N")]
    members_max: usize = 1_000, "1000";
    "Join the cluster whose registry, partition table and routing table are in this Redis: \
     redis://HOST:PORT (docs/cluster.md). Absent: the embedded single node, no Redis"
    #[arg(value_name = "URL")]
    cluster: Option<String> => String = None;
    "This node's number in its cluster, 1..=4095 (the node field of NodeIds and of the \
     DeviceIds it mints); required with --cluster, 0 without"
    #[arg(value_name = "N")]
    node: u16 = 0, "0";
    "Address of this node's node link, where its peers connect: IPV4:PORT, an address they \
     can reach (it goes into the NodeId); required with --cluster"
    #[arg(value_name = "ADDR", value_parser = parse_listen)]
    node_listen: Option<SocketAddr> => SocketAddr = None;
    "The node-link address this node registers for its peers to dial, when they reach it \
     through something in front of node_listen (a NAT, a container's port map, a TCP proxy): \
     IPV4:PORT (it goes into the NodeId). Default: node_listen's bound address"
    #[arg(value_name = "ADDR", value_parser = parse_listen)]
    node_advertise: Option<SocketAddr> => SocketAddr = None;
    "Timeout of every Redis call of a cluster node: the connect, each read, each write"
    #[arg(value_name = "MS")]
    cluster_redis_timeout_ms: u64 = 1_000, "1000";
    "How often a cluster node refreshes its heartbeat and reads its peers' liveness"
    #[arg(value_name = "MS")]
    cluster_heartbeat_interval_ms: u64 = 1_000, "1000";
    "How long a node's heartbeat lives without a refresh: a node silent this long counts as \
     dead (its routes are ignored, then removed by a peer)"
    #[arg(value_name = "MS")]
    cluster_heartbeat_ttl_ms: u64 = 5_000, "5000";
    "How often a cluster node publishes a probe on its own channel; a probe not received \
     before the next is due marks the subscription dead (reconnected, routes reloaded)"
    #[arg(value_name = "MS")]
    cluster_probe_interval_ms: u64 = 2_000, "2000";
    "Replicated partitions (docs/cluster.md): when a leader acknowledges a send (send_ok) and \
     pushes it: replicated = once every in-sync replica has the record, leader = once the \
     leader has it (a leader's loss may lose it)"
    #[arg(value_parser = ack_parser())]
    ack: AckPolicy = AckPolicy::Replicated, "replicated";
    "How long a partition leader's lease lives in Redis after a renewal: a leader that stops \
     renewing is replaced this long after its last renewal"
    #[arg(value_name = "MS")]
    cluster_lease_ms: u64 = 3_000, "3000";
    "How often a cluster node renews its leases and reads the partition table (one Redis \
     script call per round for all of its partitions)"
    #[arg(value_name = "MS")]
    cluster_lease_renew_ms: u64 = 1_000, "1000";
    "Taken off every lease deadline a leader holds locally, so that it stops acknowledging \
     before Redis lets the lease lapse even if its clock runs slower than Redis's"
    #[arg(value_name = "MS")]
    cluster_lease_margin_ms: u64 = 300, "300";
    "Hand each partition's leadership back to its preferred replica (the first of its replica \
     set) once that one is in sync and alive again, so that leaderships do not pile up on the \
     nodes that took over after failovers (one handover per node per round)"
    #[arg(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cluster_preferred_leader: bool = true, "true";
    "A follower behind its leader for longer than this leaves the in-sync set (recorded in \
     Redis before the leader acknowledges without it); it rejoins once caught up"
    #[arg(value_name = "MS")]
    replica_lag_max_ms: u64 = 5_000, "5000";
    "Start even if a record in the middle of the log is corrupt, skipping it (its messages are lost); without it such a node refuses to start"
    #[arg(value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    skip_corrupt_records: bool = false, "false";
}

/// The longest `push_flush_delay_ms` accepted.
pub const PUSH_FLUSH_DELAY_MS_MAX: u64 = 1_000;

/// When a leader of a replicated partition acknowledges a record (`--ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// Once the leader has it: a leader's loss may lose what it acknowledged.
    Leader,
    /// Once every in-sync replica has it.
    #[default]
    Replicated,
}

impl std::str::FromStr for AckPolicy {
    type Err = String;

    fn from_str(name: &str) -> Result<AckPolicy, String> {
        match name {
            "leader" => Ok(AckPolicy::Leader),
            "replicated" => Ok(AckPolicy::Replicated),
            _ => Err(format!("ack {name:?}: expected leader or replicated")),
        }
    }
}

/// `--ack`: the policy, by name.
fn ack_parser() -> impl TypedValueParser<Value = AckPolicy> {
    PossibleValuesParser::new(["leader", "replicated"])
        // Cannot fail: only the listed names get this far, and each is a policy.
        .map(|name| name.parse().unwrap_or_default())
}

/// The TOML file names the policy as the flag does.
impl<'de> Deserialize<'de> for AckPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// `--fsync`: the store's policy, by name.
fn fsync_parser() -> impl TypedValueParser<Value = FsyncPolicy> {
    PossibleValuesParser::new(["never", "interval", "always"])
        // Cannot fail: only the listed names get this far, and each is a policy.
        .map(|name| name.parse().unwrap_or_default())
}

/// The TOML file names the policy as the flag does.
impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Resolves the configuration from `flags`, the file they (or the environment) name, and
    /// the environment variables in `env`.
    pub fn load(
        flags: ServeArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, String> {
        let env = ServeArgs::from_env(env)?;
        let mut config = match flags.config.as_ref().or(env.config.as_ref()) {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        for layer in precedence(flags, env) {
            config.apply(layer);
        }
        // The frame limit's default follows a lower message limit (a frame is a piece of a
        // message); only a frame limit set above the message limit is refused.
        if config.frame_bytes_max == Config::default().frame_bytes_max {
            config.frame_bytes_max = config.frame_bytes_max.min(config.message_bytes_max);
        }
        config.validate()?;
        Ok(config)
    }

    /// The largest reply the gateway builds for one request (a `history` page, a `convs`
    /// list): half a connection's send queue, so a reply never gets its reader closed for a
    /// full queue and leaves room for the pushes around it.
    pub fn reply_bytes_max(&self) -> usize {
        self.send_queue_bytes_max / 2
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("frame_bytes_max", self.frame_bytes_max as u64),
            ("message_bytes_max", self.message_bytes_max as u64),
            (
                "connections_per_shard_max",
                self.connections_per_shard_max as u64,
            ),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("close_timeout_ms", self.close_timeout_ms),
            ("fsync_interval_ms", self.fsync_interval_ms),
            (
                "log_maintenance_interval_ms",
                self.log_maintenance_interval_ms,
            ),
            (
                "cmid_window_entries_max",
                self.cmid_window_entries_max as u64,
            ),
            ("members_max", self.members_max as u64),
            (
                "backend_frame_bytes_max",
                self.backend_frame_bytes_max as u64,
            ),
            (
                "backend_connections_per_shard_max",
                self.backend_connections_per_shard_max as u64,
            ),
            (
                "node_link_queue_bytes_max",
                self.node_link_queue_bytes_max as u64,
            ),
            (
                "node_link_request_timeout_ms",
                self.node_link_request_timeout_ms,
            ),
            ("node_link_heartbeat_ms", self.node_link_heartbeat_ms),
            ("node_link_idle_timeout_ms", self.node_link_idle_timeout_ms),
            (
                "node_link_frame_bytes_max",
                self.node_link_frame_bytes_max as u64,
            ),
            (
                "api_requests_per_shard_max",
                self.api_requests_per_shard_max as u64,
            ),
            (
                "api_requests_per_connection_max",
                self.api_requests_per_connection_max,
            ),
            ("api_idle_timeout_ms", self.api_idle_timeout_ms),
            ("cluster_redis_timeout_ms", self.cluster_redis_timeout_ms),
            (
                "cluster_heartbeat_interval_ms",
                self.cluster_heartbeat_interval_ms,
            ),
            ("cluster_heartbeat_ttl_ms", self.cluster_heartbeat_ttl_ms),
            ("cluster_probe_interval_ms", self.cluster_probe_interval_ms),
            ("cluster_lease_ms", self.cluster_lease_ms),
            ("cluster_lease_renew_ms", self.cluster_lease_renew_ms),
            ("replica_lag_max_ms", self.replica_lag_max_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        // The log stores a conversation's member count in 16 bits.
        if self.members_max > usize::from(u16::MAX) {
            return Err(format!(
                "members_max must be at most {}, not {}",
                u16::MAX,
                self.members_max
            ));
        }
        // A group's creation record lists its members (16 bytes each, after a 32-byte head)
        // and must fit one segment beside the segment's 64-byte header.
        let group_record_bytes = 64 + 32 + 16 * self.members_max as u64;
        if group_record_bytes > self.log_segment_bytes {
            return Err(format!(
                "log_segment_bytes ({}) must hold a group of members_max ({}) members: {} bytes",
                self.log_segment_bytes, self.members_max, group_record_bytes
            ));
        }
        // An echo or a push of the largest message must fit in the queue, or a well-behaved
        // client sending big messages would be cut off for no fault of its own.
        if self.send_queue_bytes_max
            < self.message_bytes_max + crate::net::ws::frame::SERVER_HEADER_MAX
        {
            return Err(
                "send_queue_bytes_max must hold at least one message of message_bytes_max".into(),
            );
        }
        // A push held longer than this would be a stall, not a batch.
        if self.push_flush_delay_ms > PUSH_FLUSH_DELAY_MS_MAX {
            return Err(format!(
                "push_flush_delay_ms ({}) must be at most {PUSH_FLUSH_DELAY_MS_MAX}",
                self.push_flush_delay_ms
            ));
        }
        // A link's heartbeats must come often enough that its peer never takes it for silent.
        if self.node_link_heartbeat_ms >= self.node_link_idle_timeout_ms {
            return Err(format!(
                "node_link_heartbeat_ms ({}) must be less than node_link_idle_timeout_ms ({})",
                self.node_link_heartbeat_ms, self.node_link_idle_timeout_ms
            ));
        }
        // The largest frame must fit a peer's queue, or it could never be sent.
        if self.node_link_queue_bytes_max < self.node_link_frame_bytes_max {
            return Err(
                "node_link_queue_bytes_max must hold one frame of node_link_frame_bytes_max".into(),
            );
        }
        // Anyone who can reach /dev/token can act as any user: only this machine may.
        if self.web_dev_tokens && !self.listen.ip().is_loopback() {
            return Err(format!(
                "web_dev_tokens mints tokens for anyone, so it needs a loopback listen address \
                 (127.0.0.1 or ::1), not {}",
                self.listen
            ));
        }
        check_log_level(&self.log_level)?;
        // A frame is a piece of a message: a frame limit above the message limit is unreachable
        // and says the operator meant something else.
        if self.frame_bytes_max > self.message_bytes_max {
            return Err(format!(
                "frame_bytes_max ({}) must be at most message_bytes_max ({})",
                self.frame_bytes_max, self.message_bytes_max
            ));
        }
        if self.shards > crate::bus::SHARDS_MAX {
            return Err(format!(
                "shards ({}) must be at most {}",
                self.shards,
                crate::bus::SHARDS_MAX
            ));
        }
        let partitions_max = crate::bus::partitions::PARTITIONS_MAX;
        if self.partitions > partitions_max {
            return Err(format!(
                "partitions ({}) must be at most {partitions_max} (a stream position names a \
                 log position per partition)",
                self.partitions
            ));
        }
        // Above log_segment_bytes it is log_segment_bytes (the store caps it).
        if self.log_segment_bytes_first < crate::store::SEGMENT_BYTES_MIN {
            return Err(format!(
                "log_segment_bytes_first ({}) must be at least {}",
                self.log_segment_bytes_first,
                crate::store::SEGMENT_BYTES_MIN
            ));
        }
        let largest = crate::store::largest_record_bytes(self.message_bytes_max);
        if self.log_segment_bytes < largest {
            return Err(format!(
                "log_segment_bytes ({}) must hold the largest record: at least {largest} bytes \
                 with message_bytes_max {}",
                self.log_segment_bytes, self.message_bytes_max
            ));
        }
        if self.jwt_secret.is_some() && self.jwt_secret_file.is_some() {
            return Err("give jwt_secret or jwt_secret_file, not both".into());
        }
        self.wechat.accounts().map_err(|e| e.to_string())?;
        self.validate_cluster()?;
        // Slots are u32 with the top bit marking a service connection (shard::service), and
        // tokens share the key space with the listener and waker tokens.
        if self.connections_per_shard_max >= 1 << 31
            || self.backend_connections_per_shard_max >= 1 << 30
            || self.api_requests_per_shard_max >= 1 << 30
        {
            return Err("connections_per_shard_max is too large".into());
        }
        Ok(())
    }
}

impl Config {
    /// The cluster settings: all or nothing, and an address peers can reach.
    fn validate_cluster(&self) -> Result<(), String> {
        let Some(url) = &self.cluster else {
            if self.node != 0 || self.node_listen.is_some() || self.node_advertise.is_some() {
                return Err(
                    "node, node_listen and node_advertise are for a cluster node: give cluster too"
                        .into(),
                );
            }
            return Ok(());
        };
        crate::cluster::redis_conn::RedisTarget::new(
            url,
            std::time::Duration::from_millis(self.cluster_redis_timeout_ms),
        )?;
        if self.node == 0 || self.node > crate::cluster::redis_keys::NODE_MAX {
            return Err(format!(
                "a cluster node needs node, a number 1..={} (not {})",
                crate::cluster::redis_keys::NODE_MAX,
                self.node
            ));
        }
        let link = self
            .node_listen
            .ok_or("a cluster node needs node_listen, the IPV4:PORT its peers connect to")?;
        // Port 0 is bound before the node registers: the registry holds the port bound.
        if !link.is_ipv4() || link.ip().is_unspecified() {
            return Err(format!(
                "node_listen {link}: give the IPv4 address peers connect to (it goes into the \
                 NodeId), not a wildcard address"
            ));
        }
        if let Some(advertised) = self.node_advertise {
            if !advertised.is_ipv4() || advertised.ip().is_unspecified() || advertised.port() == 0 {
                return Err(format!(
                    "node_advertise {advertised}: give the IPv4 address and port peers dial (it \
                     goes into the NodeId), not a wildcard address or port 0"
                ));
            }
        }
        if self.cluster_heartbeat_ttl_ms < 2 * self.cluster_heartbeat_interval_ms {
            return Err(format!(
                "cluster_heartbeat_ttl_ms ({}) must be at least twice \
                 cluster_heartbeat_interval_ms ({}), or one late heartbeat declares the node dead",
                self.cluster_heartbeat_ttl_ms, self.cluster_heartbeat_interval_ms
            ));
        }
        self.validate_lease()
    }

    /// The lease timings: a renewal (one interval, plus a Redis call that may take the whole
    /// timeout) must land before the deadline the previous one gave, or a healthy leader
    /// would stop acknowledging between two renewals.
    fn validate_lease(&self) -> Result<(), String> {
        if self.cluster_lease_margin_ms >= self.cluster_lease_ms {
            return Err(format!(
                "cluster_lease_margin_ms ({}) must be less than cluster_lease_ms ({})",
                self.cluster_lease_margin_ms, self.cluster_lease_ms
            ));
        }
        let deadline_ms = self.cluster_lease_ms - self.cluster_lease_margin_ms;
        let renewal_ms = self.cluster_lease_renew_ms + self.cluster_redis_timeout_ms;
        if renewal_ms >= deadline_ms {
            return Err(format!(
                "cluster_lease_renew_ms ({}) + cluster_redis_timeout_ms ({}) must be less than \
                 cluster_lease_ms ({}) - cluster_lease_margin_ms ({}): a leader must renew before \
                 its deadline passes",
                self.cluster_lease_renew_ms,
                self.cluster_redis_timeout_ms,
                self.cluster_lease_ms,
                self.cluster_lease_margin_ms
            ));
        }
        Ok(())
    }
}

/// The layers over the TOML file, lowest first: what a later one gives overrides an earlier
/// one. (Kept in one place so that the order is easy to see and to change.)
fn precedence(flags: ServeArgs, env: ServeArgs) -> [ServeArgs; 2] {
    [env, flags]
}

/// The level words `--log-level` takes besides a tracing directive.
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks `--log-level`: a level word, or a tracing directive naming a target (`a=debug`,
/// `warn,chinwag_engine=debug`). A bare word that is not a level (`loud`) is refused: tracing
/// would read it as a target name and the node would log almost nothing.
pub fn check_log_level(value: &str) -> Result<(), String> {
    let word = value.trim().to_ascii_lowercase();
    if LOG_LEVELS.contains(&word.as_str()) {
        return Ok(());
    }
    let directive_like = value.contains('=') || value.contains(',');
    if directive_like && tracing_subscriber::EnvFilter::try_new(value).is_ok() {
        return Ok(());
    }
    Err(format!(
        "log_level {value:?}: expected one of {} or a tracing directive such as \
         info,chinwag_engine=debug",
        LOG_LEVELS.join(", ")
    ))
}

/// Parses `--listen`: `HOST:PORT` with an IP address or a host name (`localhost:7000`); an IPv4
/// address is preferred when a name has both.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("{value}: expected HOST:PORT, e.g. 127.0.0.1:7000"))?;
    let port: u64 = port
        .parse()
        .map_err(|_| format!("{value}: the port {port:?} is not a number"))?;
    let port = u16::try_from(port)
        .map_err(|_| format!("{value}: the port {port} is out of range (0..=65535)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("{value}: cannot resolve {host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{value}: {host} has no address"))
}

/// `CHINWAG_*` variables in `env` that name no setting (a typo the node would otherwise
/// ignore without a word), for a warning at start.
pub fn unknown_env_vars(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let known: Vec<String> = Wrapper::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .map(|long| format!("CHINWAG_{}", long.to_uppercase().replace('-', "_")))
        .collect();
    let mut unknown: Vec<String> = env
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("CHINWAG_") && !known.contains(k))
        .collect();
    unknown.sort();
    unknown
}

impl Config {
    /// The configuration as the start log shows it: every setting, the secret redacted.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.jwt_secret.is_some() {
            shown.jwt_secret = Some("<redacted>".into());
        }
        // A Redis password in the cluster URL (redis://:PASSWORD@HOST:PORT).
        if let Some((scheme, rest)) = shown.cluster.as_deref().and_then(|u| u.split_once("://")) {
            if let Some((_, host)) = rest.rsplit_once('@') {
                shown.cluster = Some(format!("{scheme}://<redacted>@{host}"));
            }
        }
        format!("{shown:?}")
    }
}

impl ServeArgs {
    /// Reads `CHINWAG_<FLAG>` variables from `env` into flags.
    fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Result<ServeArgs, String> {
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CHINWAG_"))
            .collect();
        let command = Wrapper::command();
        let mut argv = vec!["chinwag-env".to_string()];
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let key = format!("CHINWAG_{}", long.to_uppercase().replace('-', "_"));
            if let Some((_, value)) = env.iter().find(|(k, _)| *k == key) {
                argv.push(format!("--{long}={value}"));
            }
        }
        let matches = command
            .try_get_matches_from(argv)
            .map_err(|e| format!("environment: {e}"))?;
        Wrapper::from_arg_matches(&matches)
            .map(|w| w.args)
            .map_err(|e| format!("environment: {e}"))
    }
}

/// A top-level parser around [`ServeArgs`], to parse the environment with the same rules.
#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: ServeArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_nothing_given() {
        assert_eq!(
            Config::load(ServeArgs::default(), env(&[])).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chinwag.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nidle_timeout_ms = 1\nshards = 3\nfsync = \"always\"\nenable_echo = true\n",
        )
        .unwrap();
        let flags = ServeArgs {
            config: Some(path),
            idle_timeout_ms: Some(2),
            shards: Some(4),
            ..ServeArgs::default()
        };
        let config = Config::load(
            flags,
            env(&[
                ("CHINWAG_SHARDS", "5"),
                ("CHINWAG_ENABLE_ECHO", "false"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap()); // file
        assert_eq!(config.fsync, FsyncPolicy::Always); // file
        assert_eq!(config.idle_timeout_ms, 2); // flag over file
        assert_eq!(config.shards, 4); // flag over environment
        assert!(!config.enable_echo); // environment over file
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::load(ServeArgs::default(), env(&[("CHINWAG_SHARDS", "many")])).is_err());
        assert!(Config::load(
            ServeArgs::default(),
            env(&[("CHINWAG_IDLE_TIMEOUT_MS", "0")])
        )
        .is_err());
        let small_queue = ServeArgs {
            send_queue_bytes_max: Some(100),
            ..ServeArgs::default()
        };
        assert!(Config::load(small_queue, env(&[])).is_err());
        let dev_tokens = |listen: &str| {
            let flags = ServeArgs {
                web_dev_tokens: Some(true),
                ..ServeArgs::default()
            };
            Config::load(flags, env(&[("CHINWAG_LISTEN", listen)]))
        };
        assert!(dev_tokens("127.0.0.1:7000").is_ok());
        assert!(dev_tokens("[::1]:7000").is_ok());
        let refused = dev_tokens("0.0.0.0:7000").unwrap_err();
        assert!(refused.contains("loopback"), "{refused}");
        assert!(dev_tokens("192.168.1.2:7000").is_err());
        let small_segments = ServeArgs {
            log_segment_bytes: Some(65_536),
            members_max: Some(10_000),
            ..ServeArgs::default()
        };
        let refused = Config::load(small_segments, env(&[])).unwrap_err();
        assert!(refused.contains("members_max"), "{refused}");
        for members in ["0", "65536"] {
            assert!(
                Config::load(
                    ServeArgs::default(),
                    env(&[("CHINWAG_MEMBERS_MAX", members)])
                )
                .is_err(),
                "members_max {members}"
            );
        }
        let delay = |ms: &str| {
            Config::load(
                ServeArgs::default(),
                env(&[("CHINWAG_PUSH_FLUSH_DELAY_MS", ms)]),
            )
        };
        assert_eq!(delay("1000").unwrap().push_flush_delay_ms, 1000);
        let refused = delay("1001").unwrap_err();
        assert!(refused.contains("push_flush_delay_ms"), "{refused}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        assert!(Config::load(
            ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            },
            env(&[])
        )
        .is_err());
    }

    /// The defaults `--help` shows are written by hand; each must be the real default.
    #[test]
    fn help_defaults_are_the_defaults() {
        let command = Wrapper::command();
        let mut checked = 0;
        for arg in command.get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            let Some(default) = help
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
            else {
                continue;
            };
            if long == "jwt-secret" {
                continue; // "generated once": not a value
            }
            let argv = ["chinwag".to_string(), format!("--{long}={default}")];
            let matches = Wrapper::command().try_get_matches_from(argv).unwrap();
            let args = Wrapper::from_arg_matches(&matches).unwrap().args;
            assert_eq!(
                Config::load(args, env(&[])).unwrap(),
                Config::default(),
                "--{long}"
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} defaults found in --help");
    }

    #[test]
    fn log_level_takes_words_and_directives_and_refuses_the_rest() {
        for ok in [
            "info",
            "WARN",
            "off",
            "trace",
            "info,chinwag_engine=debug",
            "chinwag_engine=trace",
        ] {
            assert!(check_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["loud", "", "verbose"] {
            let e = check_log_level(bad).unwrap_err();
            assert!(e.contains("expected one of off, error"), "{e}");
        }
    }

    #[test]
    fn listen_takes_host_names_and_says_when_the_port_is_out_of_range() {
        assert_eq!(
            parse_listen("127.0.0.1:7000").unwrap(),
            "127.0.0.1:7000".parse().unwrap()
        );
        let local = parse_listen("localhost:7000").unwrap();
        assert!(local.ip().is_loopback() && local.is_ipv4() && local.port() == 7000);
        let e = parse_listen("127.0.0.1:70000").unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_listen("127.0.0.1").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn impossible_combinations_are_refused_with_the_bound() {
        let load = |args: ServeArgs| Config::load(args, env(&[])).unwrap_err();
        let e = load(ServeArgs {
            frame_bytes_max: Some(100_000),
            ..ServeArgs::default()
        });
        assert!(e.contains("at most message_bytes_max (65536)"), "{e}");
        let lower = Config::load(
            ServeArgs {
                message_bytes_max: Some(16_384),
                ..ServeArgs::default()
            },
            env(&[]),
        )
        .unwrap();
        assert_eq!(lower.frame_bytes_max, 16_384, "the default follows");
        let e = load(ServeArgs {
            shards: Some(300),
            ..ServeArgs::default()
        });
        assert!(e.contains("at most 256"), "{e}");
        let e = load(ServeArgs {
            log_segment_bytes: Some(70_000),
            message_bytes_max: Some(1 << 20),
            send_queue_bytes_max: Some(4 << 20),
            ..ServeArgs::default()
        });
        assert!(e.contains("must hold the largest record: at least"), "{e}");
        let e = load(ServeArgs {
            log_level: Some("loud".into()),
            ..ServeArgs::default()
        });
        assert!(e.contains("log_level"), "{e}");
    }

    #[test]
    fn cluster_settings_are_all_or_nothing_and_name_a_reachable_ipv4_address() {
        let load = |pairs: &[(&str, &str)]| Config::load(ServeArgs::default(), env(pairs));
        let cluster = ("CHINWAG_CLUSTER", "redis://127.0.0.1:6379");
        let node = ("CHINWAG_NODE", "3");
        let link = ("CHINWAG_NODE_LISTEN", "10.0.0.3:7200");
        let config = load(&[cluster, node, link]).unwrap();
        assert_eq!(config.node, 3);
        assert_eq!(config.ack, AckPolicy::Replicated);
        let leader = load(&[cluster, node, link, ("CHINWAG_ACK", "leader")]).unwrap();
        assert_eq!(leader.ack, AckPolicy::Leader);
        let advertised = load(&[
            cluster,
            node,
            link,
            ("CHINWAG_NODE_ADVERTISE", "10.0.0.9:7300"),
        ]);
        assert_eq!(
            crate::cluster::JoinSettings::from_config(
                &advertised.unwrap(),
                "10.0.0.3:7000".parse().unwrap(),
                "10.0.0.3:7001".parse().unwrap()
            )
            .link,
            "10.0.0.9:7300".parse().unwrap(),
            "peers dial the advertised address"
        );
        let e = load(&[cluster, node, link, ("CHINWAG_ACK", "all")]).unwrap_err();
        assert!(e.contains("leader") && e.contains("replicated"), "{e}");
        for (pairs, expected) in [
            (vec![node], "give cluster too"),
            (vec![link], "give cluster too"),
            (vec![cluster, link], "needs node, a number 1..=4095"),
            (vec![cluster, ("CHINWAG_NODE", "4096"), link], "1..=4095"),
            (vec![cluster, node], "needs node_listen"),
            (
                vec![cluster, node, ("CHINWAG_NODE_LISTEN", "0.0.0.0:7200")],
                "wildcard",
            ),
            (
                vec![cluster, node, ("CHINWAG_NODE_LISTEN", "[::1]:7200")],
                "IPv4",
            ),
            (
                vec![("CHINWAG_CLUSTER", "127.0.0.1:6379"), node, link],
                "redis://",
            ),
            (
                vec![("CHINWAG_NODE_ADVERTISE", "10.0.0.9:7200")],
                "give cluster too",
            ),
            (
                vec![
                    cluster,
                    node,
                    link,
                    ("CHINWAG_NODE_ADVERTISE", "0.0.0.0:7200"),
                ],
                "node_advertise",
            ),
            (
                vec![
                    cluster,
                    node,
                    link,
                    ("CHINWAG_NODE_ADVERTISE", "10.0.0.9:0"),
                ],
                "port 0",
            ),
            (
                vec![
                    cluster,
                    node,
                    link,
                    ("CHINWAG_CLUSTER_HEARTBEAT_TTL_MS", "1500"),
                ],
                "at least twice",
            ),
            (
                vec![cluster, node, link, ("CHINWAG_CLUSTER_LEASE_MS", "2000")],
                "a leader must renew before its deadline passes",
            ),
            (
                vec![
                    cluster,
                    node,
                    link,
                    ("CHINWAG_CLUSTER_LEASE_MARGIN_MS", "3000"),
                ],
                "must be less than cluster_lease_ms",
            ),
            (
                vec![cluster, node, link, ("CHINWAG_CLUSTER_LEASE_RENEW_MS", "0")],
                "cluster_lease_renew_ms must be greater than 0",
            ),
        ] {
            let e = load(&pairs).unwrap_err();
            assert!(e.contains(expected), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn unknown_environment_variables_are_named() {
        let unknown = unknown_env_vars(env(&[
            ("CHINWAG_LISTEN", "127.0.0.1:1"),
            ("CHINWAG_LISTN", "x"),
            ("CHINWAG_JWT_SECRET", "y"),
            ("HOME", "/root"),
        ]));
        assert_eq!(unknown, ["CHINWAG_LISTN"]);
    }

    #[test]
    fn the_start_log_redacts_the_secret() {
        let config = Config {
            jwt_secret: Some("s3cret-s3cret-s3cret-s3cret-s3cret".into()),
            ..Config::default()
        };
        let shown = config.redacted();
        assert!(!shown.contains("s3cret"), "{shown}");
        let clustered = Config {
            cluster: Some("redis://:pa55word@10.0.0.1:6379".into()),
            ..Config::default()
        };
        let shown = clustered.redacted();
        assert!(
            !shown.contains("pa55word") && shown.contains("redis://<redacted>@10.0.0.1:6379"),
            "{shown}"
        );
        assert!(
            shown.contains("<redacted>") && shown.contains("idle_timeout_ms"),
            "{shown}"
        );
    }
}
