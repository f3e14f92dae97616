//! Wire types of the Hubbub protocol (docs/PROTOCOL.md): every command a client
//! sends ([`commands`]), every event the server sends ([`events`]), error codes,
//! close codes and the name rules.
//!
//! Owns: the exact JSON shapes on the wire, in one place, so docs/PROTOCOL.md maps
//! onto this module. Must not: touch sockets, the hub or the store (it reads the
//! plain message type of [`crate::message`] to encode it). Everything here is pure
//! and synchronous so it can be unit-tested alone.

pub mod api;
pub mod commands;
pub mod events;

pub use commands::{
    ApiPost, Command, HistoryTarget, ParseFailure, ParseLimits, Revocation, Since, parse_api_ban,
    parse_api_post, parse_api_reason, parse_api_revoke, parse_command, valid_user_id,
};
pub use events::{Member, closing_event, error_event};

use serde::Serialize;
use std::fmt;

/// The protocol version `welcome` announces (docs/PROTOCOL.md).
pub const VERSION: &str = "1.1";

/// Largest `history` / `limit` a client may ask for; larger counts are clamped.
pub const MAX_HISTORY: u64 = 500;
/// Default `history` / `limit` when the client gives none.
pub const DEFAULT_HISTORY: u64 = 50;
/// A rejoin returns at most this many missed messages; beyond it `recovered: false`.
pub const MAX_RECOVERY: u64 = 1000;
/// `joined.members` lists at most this many members (with `member_count` beside).
pub const MAX_JOINED_MEMBERS: usize = 100;
/// A `presence` page holds at most this many members; larger limits are clamped.
pub const MAX_PRESENCE_PAGE: usize = 1000;
/// `meta`, serialized, may be at most this many bytes.
pub const MAX_META_BYTES: usize = 1024;
/// `client_id` may be at most this many characters.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// A user id given to `direct` / `history.dm` may be at most this many characters.
pub const MAX_USER_ID_CHARS: usize = 256;

/// Close codes of the protocol (PROTOCOL.md, "Close codes").
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_UTF8: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const OVERLOADED: u16 = 1013;
    pub const NO_HELLO: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    /// Disconnected by the server API (kick or ban); 1.1.
    pub const DISCONNECTED: u16 = 4003;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const RATE_LIMITED: u16 = 4029;
}

/// The error codes of the protocol (PROTOCOL.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    NotJoined,
    RateLimited,
    TooLarge,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A command that failed: the code and the human text sent back in `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// The client-chosen `id` of a command: a string or an integer, echoed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CommandId {
    Int(i64),
    Str(String),
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandId::Int(i) => write!(f, "{i}"),
            CommandId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Room names: 1-64 characters from `A-Z a-z 0-9 _ - . :`.
pub fn valid_room_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Guest names: 1-32 characters from `A-Z a-z 0-9 _ - .`.
pub fn valid_guest_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Encode a server event. Serialization of our own types cannot fail (no maps with
/// non-string keys, no non-finite floats), so a failure is a bug we log and survive.
pub fn encode<T: Serialize>(event: &T) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| {
        tracing::error!(error = %e, "failed to encode a server event");
        r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_owned()
    })
}

/// A reply that is only `type` and `id` plus fixed fields (pong, left).
#[derive(Serialize)]
pub struct Reply<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a CommandId>,
    #[serde(flatten)]
    pub body: T,
}

pub fn reply<T: Serialize>(kind: &'static str, id: Option<&CommandId>, body: T) -> String {
    encode(&Reply { kind, id, body })
}
