//! The chinwag gateway.
