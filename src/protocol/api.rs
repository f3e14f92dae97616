//! The server API's JSON bodies (SERVER-API.md): what app backends receive.
//!
//! Owns: the shapes of API answers and errors. Must not: decide anything; the
//! `api` module calls the hub and picks which of these to answer with. Request
//! bodies are parsed in [`super::commands`] (the same checks as the WebSocket
//! commands they mirror).

use super::{CommandError, ErrorCode};
use serde::{Deserialize, Serialize};

/// `{"error": {"code": ..., "message": ...}}`
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub code: &'static str,
    pub message: &'a str,
}

/// The HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest => 400,
        ErrorCode::Unauthorized => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::NotFound => 404,
        // Not a state an API call can be in (it joins nothing); kept total.
        ErrorCode::NotJoined => 409,
        ErrorCode::Conflict => 409,
        ErrorCode::TooLarge => 413,
        ErrorCode::RateLimited => 429,
        ErrorCode::Unavailable => 503,
        ErrorCode::Internal => 500,
    }
}

pub fn error_body(err: &CommandError) -> String {
    super::encode(&ErrorBody {
        error: ErrorDetail {
            code: err.code.as_str(),
            message: &err.message,
        },
    })
}

/// One room of `GET /rooms`.
#[derive(Serialize)]
pub struct RoomEntry {
    pub room: String,
    /// The room's last `seq` (0: nothing stored yet).
    pub seq: u64,
    /// Users in the room now, on every node this node knows of.
    pub member_count: usize,
}

#[derive(Serialize)]
pub struct RoomsPage {
    pub rooms: Vec<RoomEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /users/{user}`.
#[derive(Serialize)]
pub struct UserStatus<'a> {
    pub user: &'a str,
    pub online: bool,
    pub connections: usize,
    pub rooms: Vec<String>,
}

/// `POST /users/{user}/disconnect`.
#[derive(Serialize)]
pub struct Closed {
    pub closed: usize,
}

/// `POST /users/{user}/ban`.
#[derive(Serialize)]
pub struct Banned<'a> {
    pub user: &'a str,
    /// When it ends (ms); absent: until lifted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Connections closed on the answering node.
    pub closed: usize,
}

/// `DELETE /users/{user}/ban`.
#[derive(Serialize)]
pub struct Unbanned<'a> {
    pub user: &'a str,
    /// False when there was no ban to lift.
    pub lifted: bool,
}

/// `DELETE /rooms/{room}/messages/{seq}`: the delete entry's `seq` and the
/// deleted message's (`target`).
#[derive(Serialize)]
pub struct Deleted<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub target: u64,
}

/// `POST /rooms/{room}/members/{user}/remove`.
#[derive(Serialize)]
pub struct Removed {
    /// Connections taken out of the room on the answering node.
    pub removed: usize,
}

/// One node's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStats {
    pub node: String,
    /// "up" (serving) or "draining" (shutting down).
    pub state: String,
    pub broker_up: bool,
    pub connections: u64,
    pub users: u64,
    pub rooms: u64,
    /// Messages stored per second (each message is stored by one node).
    pub messages_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// p99 of the store commits of the last interval, in ms (0: none).
    pub commit_p99_ms: f64,
    /// Since the node started.
    pub slow_consumer_closes: u64,
    pub rate_limit_closes: u64,
    /// When this was sampled (ms since the epoch).
    pub at: i64,
}

/// The cluster's figures: the sum over the nodes (the commit p99 is the worst
/// node's) and each node's own.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStats {
    pub connections: u64,
    pub users: u64,
    pub rooms: u64,
    pub messages_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub commit_p99_ms: f64,
    pub slow_consumer_closes: u64,
    pub rate_limit_closes: u64,
    pub nodes: Vec<NodeStats>,
}

/// `POST /tokens/revoke`.
#[derive(Serialize)]
pub struct Revoked {
    /// Connections closed on the answering node.
    pub closed: usize,
    /// When the revocation is forgotten (ms): by then the tokens it names expired.
    pub kept_until: i64,
}
