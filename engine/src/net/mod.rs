//! The network edge: listening sockets, HTTP requests on the client port, and WebSocket
//! framing. Nothing here owns a connection; the shard does, and calls in with bytes.

pub mod api;
pub mod http;
pub mod listener;
pub mod web;
pub mod ws;
