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

/// What Hubbub POSTs to the publish check (SERVER-API.md): `{user, room|dm, text,
/// meta}`, plus `type` (`message` or `edit`) and an edit's `target`.
#[derive(Serialize)]
pub struct PublishCheckRequest<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    /// The other party, from the sender's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a serde_json::value::RawValue>,
}

/// The publish check's answer.
#[derive(Debug)]
pub enum PublishVerdict {
    /// Store it, with this `text` and/or `meta` instead when given (a `meta` of
    /// `null` removes it).
    Allow {
        text: Option<String>,
        meta: Option<Option<Box<serde_json::value::RawValue>>>,
    },
    /// Refuse it; the sender gets `forbidden` with the reason.
    Deny { reason: Option<String> },
}

/// Read the publish check's answer: `{"allow": true, "text"?, "meta"?}` or
/// `{"allow": false, "reason"?}`. A replacement `text`/`meta` must keep the limits
/// of a `send`; anything else is an error (the check failed).
pub fn parse_publish_verdict(
    body: &[u8],
    limits: super::ParseLimits,
) -> Result<PublishVerdict, super::CommandError> {
    use super::CommandError;
    use serde_json::Value;
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        _ => return Err(CommandError::bad_request("the answer is not a JSON object")),
    };
    match obj.get("allow") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let reason = obj
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| r.chars().take(super::commands::MAX_REASON_CHARS).collect());
            return Ok(PublishVerdict::Deny { reason });
        }
        _ => return Err(CommandError::bad_request("the answer has no boolean allow")),
    }
    // The replacement goes through the checks a `send` gets.
    let mut probe = serde_json::Map::new();
    probe.insert("type".into(), Value::String("send".into()));
    probe.insert("room".into(), Value::String("r".into()));
    let text = obj.get("text").cloned();
    probe.insert(
        "text".into(),
        text.clone().unwrap_or_else(|| Value::String("x".into())),
    );
    if let Some(m) = obj.get("meta") {
        probe.insert("meta".into(), m.clone());
    }
    let frame = Value::Object(probe).to_string();
    let (_, cmd) = super::parse_command(&frame, limits).map_err(|f| f.error)?;
    let super::Command::Send {
        text: new_text,
        meta,
        ..
    } = cmd
    else {
        return Err(CommandError::bad_request("unexpected replacement"));
    };
    Ok(PublishVerdict::Allow {
        text: text.map(|_| new_text),
        meta: obj.get("meta").map(|_| meta),
    })
}

#[cfg(test)]
mod publish_tests {
    use super::*;
    use crate::protocol::ParseLimits;

    const L: ParseLimits = ParseLimits { max_text: 10 };

    #[test]
    fn an_allow_without_replacement_changes_nothing() {
        let v = parse_publish_verdict(br#"{"allow":true}"#, L).expect("parses");
        assert!(
            matches!(
                v,
                PublishVerdict::Allow {
                    text: None,
                    meta: None
                }
            ),
            "{v:?}"
        );
    }

    #[test]
    fn a_denial_carries_its_reason() {
        let v = parse_publish_verdict(br#"{"allow":false,"reason":"no spam"}"#, L).expect("parses");
        let PublishVerdict::Deny { reason } = v else {
            panic!("a denial: {v:?}");
        };
        assert_eq!(reason.as_deref(), Some("no spam"));
    }

    #[test]
    fn a_replacement_keeps_the_limits_of_a_send() {
        let PublishVerdict::Allow { text, meta } =
            parse_publish_verdict(br#"{"allow":true,"text":"***","meta":{"m":1}}"#, L)
                .expect("parses")
        else {
            panic!("an allow");
        };
        assert_eq!(text.as_deref(), Some("***"));
        assert_eq!(
            meta.flatten().map(|m| m.get().to_owned()).as_deref(),
            Some(r#"{"m":1}"#)
        );
        for bad in [
            &br#"{"allow":true,"text":"far too long a text"}"#[..],
            br#"{"allow":true,"text":""}"#,
            br#"{"allow":true,"meta":[1]}"#,
            br#"{"allow":"yes"}"#,
            b"not json",
        ] {
            assert!(
                parse_publish_verdict(bad, L).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
