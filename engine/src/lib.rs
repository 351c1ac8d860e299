//! The chinwag gateway.

pub mod store;
