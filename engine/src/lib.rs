//! The chinwag gateway.
//!
//! Read top-down as the data flows: `net` (listeners, HTTP, WebSocket framing) → `shard` (the
//! event loops and sessions) → `bus` (messages between shards) → `logic` (the owner of
//! devices, conversations, cursors, dispatch) → `store` (the conversation log) → `operator`
//! (config, metrics, the token secret); `node` starts it all.

pub(crate) mod bus;
pub(crate) mod logic;
pub(crate) mod net;
pub mod node;
pub mod operator;
pub(crate) mod shard;
pub mod store;
