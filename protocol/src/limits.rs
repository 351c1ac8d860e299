//! Bounds on the fields a client controls, shared by both decoders so that whatever one
//! encoding accepts, the other can carry.

use crate::message::{DecodeErrorKind, HISTORY_LIMIT_MAX, HISTORY_LIMIT_MIN};

/// The longest `cmid`, in bytes (a UUID takes 36).
pub const CMID_LEN_MAX: usize = 128;
/// The longest message `kind`, in bytes.
pub const KIND_LEN_MAX: usize = 64;
/// The longest login token, in bytes.
pub const TOKEN_LEN_MAX: usize = 4096;
/// The most users one service request names (`notify_users`, `presence`).
pub const USERS_PER_REQUEST_MAX: usize = 10_000;
/// The most devices one `presence_ok` entry lists (a user has at most one per device type).
pub const DEVICES_PER_USER_MAX: usize = 4;

/// The longest nickname of a user or display name of a conversation, in bytes.
pub const PROFILE_NAME_LEN_MAX: usize = 64;
/// The longest avatar URL, in bytes.
pub const PROFILE_AVATAR_LEN_MAX: usize = 512;

pub(crate) fn check_profile(profile: &crate::message::Profile) -> Result<(), DecodeErrorKind> {
    if profile.name.len() > PROFILE_NAME_LEN_MAX {
        return Err(DecodeErrorKind::BadValue("nick/name longer than 64 bytes"));
    }
    if profile.avatar.len() > PROFILE_AVATAR_LEN_MAX {
        return Err(DecodeErrorKind::BadValue("avatar longer than 512 bytes"));
    }
    Ok(())
}

pub(crate) fn check_users(count: usize) -> Result<(), DecodeErrorKind> {
    if count == 0 || count > USERS_PER_REQUEST_MAX {
        return Err(DecodeErrorKind::BadValue("users must name 1..=10000 users"));
    }
    Ok(())
}

pub(crate) fn check_cmid(cmid: &str) -> Result<(), DecodeErrorKind> {
    if cmid.is_empty() || cmid.len() > CMID_LEN_MAX {
        return Err(DecodeErrorKind::BadValue("cmid must be 1..=128 bytes"));
    }
    Ok(())
}

pub(crate) fn check_kind(kind: &str) -> Result<(), DecodeErrorKind> {
    if kind.is_empty() || kind.len() > KIND_LEN_MAX {
        return Err(DecodeErrorKind::BadValue("kind must be 1..=64 bytes"));
    }
    Ok(())
}

pub(crate) fn check_token(token: &str) -> Result<(), DecodeErrorKind> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(DecodeErrorKind::BadValue("token longer than 4096 bytes"));
    }
    Ok(())
}

pub(crate) fn check_history_limit(limit: u64) -> Result<u16, DecodeErrorKind> {
    match u16::try_from(limit) {
        Ok(limit) if (HISTORY_LIMIT_MIN..=HISTORY_LIMIT_MAX).contains(&limit) => Ok(limit),
        _ => Err(DecodeErrorKind::BadValue("limit must be in 1..=200")),
    }
}

/// A group with more members than this is "large": a change of its members is pushed as
/// `members_delta` (who joined, who left, the new count) instead of the whole list, and a
/// member's `read` sends its `receipt` only to the reader's own other devices, not to every
/// other member (docs/protocol.md, "Groups").
pub const GROUP_FULL_LIST_MAX: usize = 200;

/// The most agents one `agent_stats_ok` lists (by uid; the shop's total counts them all): it
/// bounds the reply (45 bytes per agent in binary) whatever the shop's size.
pub const STATS_AGENTS_MAX: usize = 1_000;
