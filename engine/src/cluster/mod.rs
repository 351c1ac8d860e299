//! The cluster: many nodes serving one set of users (docs/cluster.md).

// Not yet called by the node: the lead wires cluster routing (issue 13) onto these.
#[allow(dead_code)]
pub mod link;
#[allow(dead_code)]
pub mod wire;
