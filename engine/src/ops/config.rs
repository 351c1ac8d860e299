//! The node's configuration: embedded defaults, then a TOML file (`--config`), then flags, then
//! `CHINWAG_*` environment variables, each layer overriding the one before.
//!
//! Every value is declared once as a flag in [`ServeArgs`] (which gives `--help`) and once as a
//! field of [`Config`] (which gives the default and the TOML key, the flag's name with `_` for
//! `-`). The environment is read by turning each `CHINWAG_<FLAG>` into `--flag=value` and
//! parsing it with the same clap definition, so a value has the same syntax everywhere.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::Deserialize;

/// When the conversation log is forced to disk. Carried for the store; the network layer does
/// not use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    Never,
    Interval,
    Always,
}

/// Flags of `chinwag serve`. Every value is optional here: what is not given falls through to
/// the TOML file and then to the default shown.
#[derive(Args, Debug, Default, Clone)]
#[command(
    after_help = "Every flag can also be set in the TOML file given by --config (key: the flag's name \
with '_' for '-') and by the environment variable CHINWAG_<FLAG> ('-' as '_', e.g. CHINWAG_LISTEN). \
Precedence, lowest to highest: defaults, TOML file, flags, environment."
)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Client port for WebSocket and HTTP [default: 127.0.0.1:7000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./chinwag-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Secret that signs login tokens (HS256), at least 32 bytes. A secret on the command line
    /// is visible to other local users (ps, /proc): prefer --jwt-secret-file or
    /// CHINWAG_JWT_SECRET [default: generated once, kept in DATA_DIR/jwt-secret].
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: Option<String>,
    /// File holding the token secret (at least 32 bytes; surrounding whitespace is ignored).
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Shards (event-loop threads); 0 = the count an existing data directory was written by,
    /// else one per core [default: 0].
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// When the log is forced to disk [default: never].
    #[arg(long, value_enum)]
    pub fsync: Option<Fsync>,
    /// Serve GET /echo, a WebSocket that echoes every message [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_echo: Option<bool>,
    /// Serve GET /dev/token?uid=KIND:ID[&shop=ID], which mints a login token for anyone, so the
    /// web chat can be tried without a backend; refused unless --listen is a loopback address
    /// [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub web_dev_tokens: Option<bool>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Largest WebSocket frame payload accepted; larger closes with 1009 [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub frame_bytes_max: Option<usize>,
    /// Largest WebSocket message (all fragments) accepted; larger closes with 1009 [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub message_bytes_max: Option<usize>,
    /// Bytes queued for sending to one connection; over it the connection closes with 1008 [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub send_queue_bytes_max: Option<usize>,
    /// Messages per second one connection may send; 0 = no limit [default: 100].
    #[arg(long, value_name = "N")]
    pub messages_per_s_max: Option<u32>,
    /// Open connections per shard; over it new connections are refused at accept [default: 262144].
    #[arg(long, value_name = "N")]
    pub connections_per_shard_max: Option<usize>,
    /// Time a connection has to complete its HTTP request or handshake [default: 10000].
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// A WebSocket silent this long is closed (clients ping) [default: 90000].
    #[arg(long, value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Time a closing connection has to finish the close handshake [default: 5000].
    #[arg(long, value_name = "MS")]
    pub close_timeout_ms: Option<u64>,
    /// With --fsync interval, the longest time between two flushes of the log [default: 100].
    #[arg(long, value_name = "MS")]
    pub fsync_interval_ms: Option<u64>,
    /// Size of each preallocated log segment file [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    pub log_segment_bytes: Option<u64>,
    /// Delete log segments whose newest message is older than this; 0 = keep [default: 0].
    #[arg(long, value_name = "S")]
    pub log_retention_age_s: Option<u64>,
    /// Delete the oldest log segments while a shard's log is larger than this; 0 = no limit [default: 0].
    #[arg(long, value_name = "BYTES")]
    pub log_retention_bytes_max: Option<u64>,
    /// How often each shard applies retention and writes a snapshot of its state [default: 300000].
    #[arg(long, value_name = "MS")]
    pub log_maintenance_interval_ms: Option<u64>,
    /// Client message ids each shard remembers for idempotent sends (for 24 h at most); memory
    /// per shard is about 56 bytes each [default: 250000].
    #[arg(long, value_name = "N")]
    pub cmid_window_entries_max: Option<usize>,
    /// Start even if a record in the middle of the log is corrupt, skipping it (its messages are
    /// lost); without it such a node refuses to start [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_corrupt_records: Option<bool>,
}

/// The resolved configuration of one node.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub jwt_secret: Option<String>,
    pub jwt_secret_file: Option<PathBuf>,
    pub shards: usize,
    pub fsync: Fsync,
    pub enable_echo: bool,
    pub web_dev_tokens: bool,
    pub log_level: String,
    pub frame_bytes_max: usize,
    pub message_bytes_max: usize,
    pub send_queue_bytes_max: usize,
    pub messages_per_s_max: u32,
    pub connections_per_shard_max: usize,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub fsync_interval_ms: u64,
    pub log_segment_bytes: u64,
    pub log_retention_age_s: u64,
    pub log_retention_bytes_max: u64,
    pub log_maintenance_interval_ms: u64,
    pub cmid_window_entries_max: usize,
    pub skip_corrupt_records: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            data_dir: PathBuf::from("./chinwag-data"),
            jwt_secret: None,
            jwt_secret_file: None,
            shards: 0,
            fsync: Fsync::Never,
            enable_echo: false,
            web_dev_tokens: false,
            log_level: "info".to_string(),
            frame_bytes_max: 64 * 1024,
            message_bytes_max: 64 * 1024,
            send_queue_bytes_max: 1024 * 1024,
            messages_per_s_max: 100,
            connections_per_shard_max: 262_144,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            close_timeout_ms: 5_000,
            fsync_interval_ms: 100,
            log_segment_bytes: 64 << 20,
            log_retention_age_s: 0,
            log_retention_bytes_max: 0,
            log_maintenance_interval_ms: 300_000,
            cmid_window_entries_max: crate::store::CMID_WINDOW_ENTRIES_DEFAULT,
            skip_corrupt_records: false,
        }
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
        let mut config = match env.config.as_ref().or(flags.config.as_ref()) {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply(flags);
        config.apply(env);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, args: ServeArgs) {
        macro_rules! take {
            ($($field:ident),*) => { $(if let Some(value) = args.$field { self.$field = value; })* };
        }
        take!(
            listen,
            data_dir,
            shards,
            fsync,
            enable_echo,
            web_dev_tokens,
            log_level,
            frame_bytes_max,
            message_bytes_max,
            send_queue_bytes_max,
            messages_per_s_max,
            connections_per_shard_max,
            handshake_timeout_ms,
            idle_timeout_ms,
            close_timeout_ms,
            fsync_interval_ms,
            log_segment_bytes,
            log_retention_age_s,
            log_retention_bytes_max,
            log_maintenance_interval_ms,
            cmid_window_entries_max,
            skip_corrupt_records
        );
        if args.jwt_secret.is_some() {
            self.jwt_secret = args.jwt_secret;
        }
        if args.jwt_secret_file.is_some() {
            self.jwt_secret_file = args.jwt_secret_file;
        }
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
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        // An echo or a push of the largest message must fit in the queue, or a well-behaved
        // client sending big messages would be cut off for no fault of its own.
        if self.send_queue_bytes_max < self.message_bytes_max + crate::net::frame::SERVER_HEADER_MAX
        {
            return Err(
                "send_queue_bytes_max must hold at least one message of message_bytes_max".into(),
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
        if self.jwt_secret.is_some() && self.jwt_secret_file.is_some() {
            return Err("give jwt_secret or jwt_secret_file, not both".into());
        }
        // Tokens share the slab's key space with the listener and waker tokens.
        if self.connections_per_shard_max > u32::MAX as usize {
            return Err("connections_per_shard_max is too large".into());
        }
        Ok(())
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
    fn file_then_flags_then_environment() {
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
        assert_eq!(config.fsync, Fsync::Always); // file
        assert_eq!(config.idle_timeout_ms, 2); // flag over file
        assert_eq!(config.shards, 5); // environment over flag
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
}
