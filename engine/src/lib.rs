//! The chinwag gateway: thread-per-core shards holding WebSocket connections, a message bus
//! between them, the owner of every conversation, device and shop, and the conversation log.
//!
//! Read top-down as the data flows (docs/architecture.md has the picture and the walk of one
//! `send` through these files):
//! - `node` starts it all on a data directory it holds alone: binds the client port, opens the
//!   logs, starts the shards, drains on SIGTERM;
//! - `shard`: the event loop, the sessions (socket and outbox), the `/ws` application layer;
//! - `net`: listeners, HTTP heads, and the WebSocket connection as a state machine without I/O;
//! - `bus`: the one message type between shards (`BusMsg`), who owns what (`placement`),
//!   mailboxes and the post office;
//! - `logic`: the owner of devices, conversations, cursors and shops, with dispatch beside it;
//! - `store`: the conversation log;
//! - `cluster`: a node's membership in a cluster (docs/cluster.md): the registry, the
//!   partition table and the routing table in Redis, on threads of their own;
//! - `operator`: the node's operations: configuration, metrics, the token secret, the data
//!   directory;
//! - `wechat`: the WeChat channel (docs/wechat.md): callbacks in, the customer-service sender
//!   out.
//!
//! Only what the `chinwag` binary, the benchmarks and the tests need is public (`node`,
//! `cluster` for `chinwag cluster`, `operator`, `store`, and `wechat` for the tests' WeChat stand-in and driver); everything
//! else is crate-private, so the compiler reports what nothing uses.

pub(crate) mod bus;
pub mod cluster;
pub(crate) mod logic;
pub(crate) mod net;
pub mod node;
pub mod operator;
pub(crate) mod shard;
pub mod store;
pub mod wechat;
