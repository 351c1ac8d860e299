//! The cluster: many nodes serving one set of users (docs/cluster.md).

pub mod wire;
