//! Server events: every JSON object the server sends, replies and unsolicited
//! events alike (docs/PROTOCOL.md, "Events" and each command's reply).
//!
//! Owns: the field names and order of each event. Each is a borrowed struct that
//! serializes straight from the state it describes, so an event is encoded once
//! (see [`super::encode`]) and the same bytes go to every receiver. Must not: decide
//! who receives an event or when; the hub and the session do.

use super::{CommandError, CommandId, ErrorCode, encode};
use crate::message::StoredMessage;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// One member in a presence list: one entry per user, not per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user: String,
    pub name: String,
}

/// `welcome`: the reply to a successful `hello`.
#[derive(Serialize)]
pub struct Welcome<'a> {
    pub user: &'a str,
    pub name: &'a str,
    pub conn: String,
    pub heartbeat_ms: u64,
    pub limits: Limits,
}

/// The limits announced in `welcome`.
#[derive(Serialize)]
pub struct Limits {
    pub max_message: usize,
    pub max_text: usize,
    pub max_meta: usize,
    pub max_client_id: usize,
    pub max_history: u64,
    pub max_rooms_per_conn: usize,
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub send_queue: usize,
}

/// `joined`: the reply to `join`.
#[derive(Serialize)]
pub struct Joined<'a> {
    pub room: &'a str,
    pub epoch: &'a str,
    pub seq: u64,
    /// The first [`super::MAX_JOINED_MEMBERS`] members by user id.
    pub members: Vec<Member>,
    /// Users in the room, on every node.
    pub member_count: usize,
    pub messages: Vec<MessageRef<'a>>,
    pub recovered: bool,
}

/// `left`: the reply to `leave`.
#[derive(Serialize)]
pub struct Left<'a> {
    pub room: &'a str,
    /// Why the server took the connection out of the room (1.1); absent on the
    /// reply to the client's own `leave`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// `ack`: a `send` or `direct` is stored (and published to every node).
#[derive(Serialize)]
pub struct Ack<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm: Option<&'a str>,
    pub seq: u64,
    pub ts: i64,
}

/// `history`: the reply to `history`.
#[derive(Serialize)]
pub struct History<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm: Option<&'a str>,
    pub messages: Vec<MessageRef<'a>>,
}

/// `presence`: the reply to `presence`, one page of members by user id.
#[derive(Serialize)]
pub struct Presence<'a> {
    pub room: &'a str,
    pub members: Vec<Member>,
    /// Users in the room, on every node.
    pub member_count: usize,
    /// The `after` of the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Serialize)]
struct MembersEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    count: usize,
}

/// `{"type":"members","room":...,"count":N}`: a large room's member count, sent
/// instead of per-user `member` events.
pub fn members_event(room: &str, count: usize) -> String {
    encode(&MembersEvent {
        kind: "members",
        room,
        count,
    })
}

/// `pong`: the reply to `ping`.
#[derive(Serialize)]
pub struct Pong {}

/// `member` and `typing` carry the same fields about one user in one room.
#[derive(Serialize)]
struct UserInRoom<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    user: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'static str>,
}

/// Whether a user joined or left a room (`member.event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    Join,
    Leave,
}

/// `{"type":"member",...}` about `user`.
pub fn member_event(room: &str, user: &str, name: &str, change: MemberChange) -> String {
    encode(&UserInRoom {
        kind: "member",
        room,
        user,
        name,
        event: Some(match change {
            MemberChange::Join => "join",
            MemberChange::Leave => "leave",
        }),
    })
}

/// `{"type":"typing",...}` about `user`.
pub fn typing_event(room: &str, user: &str, name: &str) -> String {
    encode(&UserInRoom {
        kind: "typing",
        room,
        user,
        name,
        event: None,
    })
}

/// The wire form of a message (`type: message`), also used inside
/// `joined.messages` and `history.messages`.
#[derive(Serialize)]
pub struct MessageEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dm: Option<&'a str>,
    seq: u64,
    ts: i64,
    from: &'a str,
    name: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
}

impl<'a> MessageEvent<'a> {
    /// The event as `viewer` sees `msg`: for a DM, `dm` is the other party.
    pub fn of(msg: &'a StoredMessage, viewer: &str) -> Self {
        let (room, dm) = msg.channel.target(viewer);
        MessageEvent {
            kind: "message",
            room,
            dm,
            seq: msg.seq,
            ts: msg.ts,
            from: &msg.from,
            name: &msg.name,
            text: &msg.text,
            meta: msg.meta.as_deref(),
            client_id: msg.client_id.as_deref(),
        }
    }
}

/// `msg` as a `message` event for `viewer`, encoded.
pub fn message_event(msg: &StoredMessage, viewer: &str) -> String {
    encode(&MessageEvent::of(msg, viewer))
}

/// A message embedded in a reply, serialized as its `message` event for `viewer`.
pub struct MessageRef<'a> {
    pub msg: &'a StoredMessage,
    pub viewer: &'a str,
}

impl Serialize for MessageRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        MessageEvent::of(self.msg, self.viewer).serialize(s)
    }
}

/// `msgs` as `viewer` sees them, for `joined.messages` and `history.messages`.
pub fn message_refs<'a, M: AsRef<StoredMessage>>(
    msgs: &'a [M],
    viewer: &'a str,
) -> Vec<MessageRef<'a>> {
    msgs.iter()
        .map(|m| MessageRef {
            msg: m.as_ref(),
            viewer,
        })
        .collect()
}

#[derive(Serialize)]
struct ErrorEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a CommandId>,
    code: ErrorCode,
    message: &'a str,
}

/// `{"type":"error",...}` answering command `id` (or none).
pub fn error_event(id: Option<&CommandId>, err: &CommandError) -> String {
    encode(&ErrorEvent {
        kind: "error",
        id,
        code: err.code,
        message: &err.message,
    })
}

#[derive(Serialize)]
struct ClosingEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect_ms: Option<u64>,
}

/// `{"type":"closing","reason":...}`, sent just before a server-initiated close;
/// with `reconnect_ms`, the delay the server suggests before reconnecting.
pub fn closing_event(reason: &str, reconnect_ms: Option<u64>) -> String {
    encode(&ClosingEvent {
        kind: "closing",
        reason,
        reconnect_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ChannelKey;

    #[test]
    fn error_event_carries_id_code_and_message() {
        let e = error_event(
            Some(&CommandId::Str("a".into())),
            &CommandError::new(ErrorCode::NotJoined, "join first"),
        );
        assert_eq!(
            e,
            r#"{"type":"error","id":"a","code":"not_joined","message":"join first"}"#
        );
    }

    #[test]
    fn a_dm_message_names_the_other_party_for_each_viewer() {
        let m = StoredMessage {
            channel: ChannelKey::dm("alice", "bob"),
            seq: 3,
            ts: 9,
            from: "alice".into(),
            name: "Alice".into(),
            text: "hi".into(),
            meta: None,
            client_id: None,
        };
        assert_eq!(
            message_event(&m, "bob"),
            r#"{"type":"message","dm":"alice","seq":3,"ts":9,"from":"alice","name":"Alice","text":"hi"}"#
        );
        assert!(message_event(&m, "alice").contains(r#""dm":"bob""#));
    }

    #[test]
    fn member_and_typing_events_differ_only_in_type_and_event() {
        assert_eq!(
            member_event("r", "u", "U", MemberChange::Leave),
            r#"{"type":"member","room":"r","user":"u","name":"U","event":"leave"}"#
        );
        assert_eq!(
            typing_event("r", "u", "U"),
            r#"{"type":"typing","room":"r","user":"u","name":"U"}"#
        );
    }
}
