//! The chinwag gateway.
//!
//! Read top-down as the data flows: `net` (listeners, HTTP, WebSocket framing) → `shard` (the
//! event loops and sessions) → `store` (the conversation log) → `dispatch` (customer-service
//! assignment) → `ops` (config, metrics, the token secret); `node` starts it all on a
//! `data_dir` it holds alone.

pub mod data_dir;
pub mod dispatch;
pub mod net;
pub mod node;
pub mod ops;
pub mod placement;
pub mod route;
pub mod shard;
pub mod store;
