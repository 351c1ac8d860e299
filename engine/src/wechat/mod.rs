//! The WeChat channel (issue 16): customers who write to a shop's official account reach the
//! shop's agents, and the agents' replies go back through WeChat's customer-service API.
//!
//! Read top-down as the data flows:
//! - in: [`endpoint`] turns a request to `/wechat/<appid>` into an answer and the message to
//!   store (a `wechat:<id>` user from [`directory`]); [`callback`] checks and opens WeChat's pushes (URL check, plain and safe mode) without
//!   I/O, using [`signature`] (SHA-1 signatures), [`cipher`] (AES-256-CBC of safe mode) and
//!   [`message`] (the XML, parsed into a typed `Message` with its dedup key);
//! - out: [`sender`] delivers replies on its own threads (bounded queues, retries with backoff,
//!   one typed report per reply), using [`api`] (the HTTP calls, with timeouts) and [`token`]
//!   (the shared access token cache); [`metrics`] counts both directions;
//! - [`account`]: the `[wechat]` configuration section; [`directory`]: which `wechat:<id>` user
//!   each (account, OpenID) is, kept in a file of the data directory.
//!
//! [`channel`] is the channel as the node runs it. The engine reaches it at three places: the
//! client port answers `/wechat/<appid>` through [`endpoint`] (`shard/session.rs`), the shop's
//! owner stores and dispatches customers' messages and hands agents' replies over after the
//! commit (`logic/wechat.rs`), and the node starts it (`node.rs`). The module is public so the
//! tests' stand-in and driver (`tests/src/wechat/`) can sign and encrypt as WeChat does.

pub mod account;
pub mod api;
pub mod callback;
pub mod channel;
pub mod cipher;
pub mod directory;
pub mod endpoint;
pub mod message;
pub mod metrics;
pub mod sender;
pub mod signature;
pub mod token;
