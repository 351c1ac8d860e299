//! How big a reply will be on the wire, estimated before it is encoded, so that a `history`
//! page or a `convs` list can be kept within
//! [`Config::reply_bytes_max`](crate::operator::config::Config::reply_bytes_max). The estimates
//! are meant as upper bounds for either encoding (JSON escaping included), not exact sizes.

use chinwag_protocol::ConvSummary;

/// What a `msg` entry costs besides its strings: ids, numbers, JSON punctuation and escaping
/// slack.
const MSG_OVERHEAD_BYTES: usize = 160;
/// What a `convs_ok` entry costs besides its members and its last message's strings.
const CONV_OVERHEAD_BYTES: usize = 320;
/// What one member costs in a member list.
const MEMBER_BYTES: usize = 24;

/// A `msg` with these strings.
pub fn msg_bytes(kind: &[u8], body: &[u8], cmid: &[u8]) -> usize {
    MSG_OVERHEAD_BYTES + kind.len() + body.len() + cmid.len()
}

/// A `convs_ok` entry.
pub fn conv_bytes(conv: &ConvSummary<'_>) -> usize {
    CONV_OVERHEAD_BYTES
        + conv.members.len() * MEMBER_BYTES
        + conv
            .last
            .as_ref()
            .map_or(0, |m| m.body.len() + m.kind.len() + m.cmid.len())
}
