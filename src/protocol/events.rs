//! Server events: every JSON object the server sends, replies and unsolicited
//! events alike (docs/PROTOCOL.md, "Events" and each command's reply).
//!
//! Owns: the field names and order of each event. Each is a borrowed struct that
//! serializes straight from the state it describes, so an event is encoded once
//! (see [`super::encode`]) and the same bytes go to every receiver. Must not: decide
//! who receives an event or when; the hub and the session do.

use super::{CommandError, CommandId, ErrorCode, encode};
use crate::message::{ChannelKey, Current, EntryKind, StoredMessage};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// One member in a presence list: one entry per user, not per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user: String,
    pub name: String,
}

/// `welcome`: the reply to a successful `hello`.
#[derive(Serialize)]
pub struct Welcome<'a> {
    /// The protocol version this server speaks.
    pub protocol: &'static str,
    pub user: &'a str,
    pub name: &'a str,
    pub conn: String,
    pub heartbeat_ms: u64,
    pub limits: Limits,
    /// The user's rooms and DM peers with read state (1.1).
    #[serde(flatten)]
    pub state: Unread<'a>,
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
    /// Older messages were left out to keep the reply within `max_reply_bytes`:
    /// ask again with `before` set to the first message's `seq`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
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

/// `refreshed`: the reply to `refresh`; the new token's `exp` (absent if it has
/// none).
#[derive(Serialize)]
pub struct Refreshed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

#[derive(Serialize)]
struct TokenExpiring {
    #[serde(rename = "type")]
    kind: &'static str,
    exp: u64,
}

/// `{"type":"token_expiring","exp":...}`: the connection's token expires soon;
/// `refresh` keeps it open.
pub fn token_expiring_event(exp: u64) -> String {
    encode(&TokenExpiring {
        kind: "token_expiring",
        exp,
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

/// The wire form of one stream entry as `viewer` sees it: a `message`, `edit`,
/// `delete` or `react` event (1.1), also used inside `joined.messages` and
/// `history.messages`. For a DM, `dm` is the other party. A deleted message or
/// edit read back from the store is a tombstone: `"deleted": true`, no `text`.
pub struct EntryEvent<'a> {
    msg: &'a StoredMessage,
    viewer: &'a str,
}

impl<'a> EntryEvent<'a> {
    pub fn of(msg: &'a StoredMessage, viewer: &'a str) -> Self {
        EntryEvent { msg, viewer }
    }
}

impl Serialize for EntryEvent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.msg;
        let mut map = s.serialize_map(None)?;
        let kind = match m.kind {
            EntryKind::Message => "message",
            EntryKind::Edit { .. } => "edit",
            EntryKind::Delete { .. } => "delete",
            EntryKind::React { .. } => "react",
        };
        map.serialize_entry("type", kind)?;
        channel_fields(&mut map, m, self.viewer)?;
        map.serialize_entry("seq", &m.seq)?;
        if let Some(target) = m.kind.target() {
            map.serialize_entry("target", &target)?;
        }
        map.serialize_entry("ts", &m.ts)?;
        match &m.kind {
            EntryKind::React { emoji, on, .. } => {
                map.serialize_entry("user", &m.from)?;
                map.serialize_entry("name", &m.name)?;
                map.serialize_entry("emoji", emoji)?;
                map.serialize_entry("on", on)?;
            }
            EntryKind::Delete { .. } => {
                map.serialize_entry("from", &m.from)?;
                map.serialize_entry("name", &m.name)?;
            }
            EntryKind::Message | EntryKind::Edit { .. } => {
                map.serialize_entry("from", &m.from)?;
                map.serialize_entry("name", &m.name)?;
                if m.deleted {
                    map.serialize_entry("deleted", &true)?;
                } else {
                    map.serialize_entry("text", &m.text)?;
                    if let Some(meta) = m.meta.as_deref() {
                        map.serialize_entry("meta", meta)?;
                    }
                }
            }
        }
        if let Some(cid) = m.client_id.as_deref() {
            map.serialize_entry("client_id", cid)?;
        }
        map.end()
    }
}

/// `room`, or `dm` as `viewer` names the other party.
fn channel_fields<M: SerializeMap>(
    map: &mut M,
    m: &StoredMessage,
    viewer: &str,
) -> Result<(), M::Error> {
    let (room, dm) = m.channel.target(viewer);
    if let Some(room) = room {
        map.serialize_entry("room", room)?;
    }
    if let Some(dm) = dm {
        map.serialize_entry("dm", dm)?;
    }
    Ok(())
}

/// `msg` (any stream entry) as its event for `viewer`, encoded.
pub fn message_event(msg: &StoredMessage, viewer: &str) -> String {
    encode(&EntryEvent::of(msg, viewer))
}

/// What one webhook event is made of: a stored entry, or the JSON of an event
/// queued as is (presence, see [`webhook_member_event`], [`webhook_user_event`]).
pub enum WebhookItem<'a> {
    Entry(&'a StoredMessage),
    Raw(&'a str),
}

/// One webhook event (SERVER-API.md, Webhooks) with its `event_id`: an entry's
/// event as its author sees it (`dm` is the other party from the sender's side),
/// or a queued event's fields.
struct WebhookEvent<'a> {
    event_id: i64,
    item: WebhookItem<'a>,
}

impl Serialize for WebhookEvent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct WithId<T: Serialize> {
            event_id: i64,
            #[serde(flatten)]
            rest: T,
        }
        match &self.item {
            WebhookItem::Entry(m) => WithId {
                event_id: self.event_id,
                rest: EntryEvent::of(m, &m.from),
            }
            .serialize(s),
            WebhookItem::Raw(json) => {
                // Queued by us as a non-empty object: `event_id` goes in front of
                // its fields as written (their order kept). Anything else (never
                // written by us) is carried as a string in `body`.
                let spliced = json
                    .strip_prefix('{')
                    .filter(|rest| rest.trim_start().starts_with('"'))
                    .map(|rest| format!("{{\"event_id\":{},{rest}", self.event_id))
                    .and_then(|j| serde_json::value::RawValue::from_string(j).ok());
                match spliced {
                    Some(raw) => raw.serialize(s),
                    None => WithId {
                        event_id: self.event_id,
                        rest: serde_json::json!({ "body": json }),
                    }
                    .serialize(s),
                }
            }
        }
    }
}

/// The body of one webhook POST: a JSON array of events, in queue order.
pub fn webhook_events<'a>(events: impl IntoIterator<Item = (i64, WebhookItem<'a>)>) -> String {
    let list: Vec<WebhookEvent<'_>> = events
        .into_iter()
        .map(|(event_id, item)| WebhookEvent { event_id, item })
        .collect();
    encode(&list)
}

#[derive(Serialize)]
struct PresenceHook<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    user: &'a str,
    name: &'a str,
    event: &'static str,
    ts: i64,
}

/// A webhook `member` event: `user` joined or left `room` (first or last
/// connection in the cluster).
pub fn webhook_member_event(room: &str, user: &str, name: &str, join: bool, ts: i64) -> String {
    encode(&PresenceHook {
        kind: "member",
        room: Some(room),
        user,
        name,
        event: if join { "join" } else { "leave" },
        ts,
    })
}

/// A webhook `user` event: `user` came online (first connection in the cluster)
/// or went offline (last one closed).
pub fn webhook_user_event(user: &str, name: &str, online: bool, ts: i64) -> String {
    encode(&PresenceHook {
        kind: "user",
        room: None,
        user,
        name,
        event: if online { "online" } else { "offline" },
        ts,
    })
}

/// An entry embedded in a reply, serialized as its event for `viewer`.
pub struct MessageRef<'a> {
    pub msg: &'a StoredMessage,
    pub viewer: &'a str,
}

impl Serialize for MessageRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        EntryEvent::of(self.msg, self.viewer).serialize(s)
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

/// A message in its current state (`history` with `current: true`): the text
/// after the last edit and `edited_ts`, or `deleted`; `reactions` maps each emoji
/// to the users who reacted with it.
pub struct CurrentRef<'a> {
    pub cur: &'a Current,
    pub viewer: &'a str,
}

impl Serialize for CurrentRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.cur;
        let m = &*c.msg;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("type", "message")?;
        channel_fields(&mut map, m, self.viewer)?;
        map.serialize_entry("seq", &m.seq)?;
        map.serialize_entry("ts", &m.ts)?;
        map.serialize_entry("from", &m.from)?;
        map.serialize_entry("name", &m.name)?;
        if m.deleted {
            map.serialize_entry("deleted", &true)?;
        } else {
            map.serialize_entry("text", c.edited_text.as_deref().unwrap_or(&m.text))?;
            if let Some(meta) = m.meta.as_deref() {
                map.serialize_entry("meta", meta)?;
            }
            if let Some(ts) = c.edited_ts {
                map.serialize_entry("edited_ts", &ts)?;
            }
        }
        if let Some(cid) = m.client_id.as_deref() {
            map.serialize_entry("client_id", cid)?;
        }
        map.serialize_entry("reactions", &Reactions(&c.reactions))?;
        map.end()
    }
}

struct Reactions<'a>(&'a [(String, Vec<String>)]);

impl Serialize for Reactions<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (emoji, users) in self.0 {
            map.serialize_entry(emoji, users)?;
        }
        map.end()
    }
}

/// `history` with `current: true`: messages only, each in its current state.
#[derive(Serialize)]
pub struct CurrentHistory<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm: Option<&'a str>,
    pub messages: Vec<CurrentRef<'a>>,
    /// As in [`History`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// One of the user's channels in `welcome` and `unread`: its latest `seq`, the
/// user's `read` position and the `unread` messages from others after it.
#[derive(Serialize)]
pub struct ChannelUnread<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dm: Option<&'a str>,
    pub seq: u64,
    pub read: u64,
    pub unread: u64,
    /// In a DM, how far the other party has read (their latest read receipt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_read: Option<u64>,
}

/// The user's rooms (joined with `persist`) and DM peers, with read state.
#[derive(Serialize, Default)]
pub struct Unread<'a> {
    pub rooms: Vec<ChannelUnread<'a>>,
    pub dms: Vec<ChannelUnread<'a>>,
}

#[derive(Serialize)]
struct ReadEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a CommandId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dm: Option<&'a str>,
    seq: u64,
    user: &'a str,
}

/// `{"type":"read",...}`: `user` read the channel up to `seq`, as `viewer` names
/// the channel; with `id` when it answers the reader's own `read`.
pub fn read_event(
    id: Option<&CommandId>,
    channel: &ChannelKey,
    viewer: &str,
    user: &str,
    seq: u64,
) -> String {
    let (room, dm) = channel.target(viewer);
    encode(&ReadEvent {
        kind: "read",
        id,
        room,
        dm,
        seq,
        user,
    })
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
        let m = StoredMessage::message(
            ChannelKey::dm("alice", "bob"),
            3,
            9,
            "alice".into(),
            "Alice".into(),
            "hi".into(),
        );
        assert_eq!(
            message_event(&m, "bob"),
            r#"{"type":"message","dm":"alice","seq":3,"ts":9,"from":"alice","name":"Alice","text":"hi"}"#
        );
        assert!(message_event(&m, "alice").contains(r#""dm":"bob""#));
    }

    fn entry(kind: EntryKind) -> StoredMessage {
        StoredMessage {
            kind,
            ..StoredMessage::message(
                ChannelKey::Room("r".into()),
                5,
                9,
                "alice".into(),
                "Alice".into(),
                "fixed".into(),
            )
        }
    }

    #[test]
    fn an_edit_event_carries_its_target_and_new_text() {
        assert_eq!(
            message_event(&entry(EntryKind::Edit { target: 2 }), ""),
            r#"{"type":"edit","room":"r","seq":5,"target":2,"ts":9,"from":"alice","name":"Alice","text":"fixed"}"#
        );
    }

    #[test]
    fn a_delete_event_carries_no_text() {
        let mut e = entry(EntryKind::Delete { target: 2 });
        e.text.clear();
        assert_eq!(
            message_event(&e, ""),
            r#"{"type":"delete","room":"r","seq":5,"target":2,"ts":9,"from":"alice","name":"Alice"}"#
        );
    }

    #[test]
    fn a_react_event_names_the_user_emoji_and_on() {
        let e = entry(EntryKind::React {
            target: 2,
            emoji: "👍".into(),
            on: true,
        });
        assert_eq!(
            message_event(&e, ""),
            r#"{"type":"react","room":"r","seq":5,"target":2,"ts":9,"user":"alice","name":"Alice","emoji":"👍","on":true}"#
        );
    }

    #[test]
    fn a_deleted_message_is_a_tombstone_without_text_or_meta() {
        let m = entry(EntryKind::Message).tombstone();
        assert_eq!(
            message_event(&m, ""),
            r#"{"type":"message","room":"r","seq":5,"ts":9,"from":"alice","name":"Alice","deleted":true}"#
        );
    }

    #[test]
    fn a_read_event_names_the_dm_peer_from_the_viewers_side() {
        let dm = ChannelKey::dm("alice", "bob");
        assert_eq!(
            read_event(None, &dm, "bob", "alice", 4),
            r#"{"type":"read","dm":"alice","seq":4,"user":"alice"}"#
        );
        assert_eq!(
            read_event(Some(&CommandId::Int(3)), &dm, "alice", "alice", 4),
            r#"{"type":"read","id":3,"dm":"bob","seq":4,"user":"alice"}"#
        );
    }

    #[test]
    fn a_webhook_event_is_the_entry_from_the_senders_side_with_its_event_id() {
        let m = StoredMessage::message(
            ChannelKey::dm("alice", "bob"),
            3,
            9,
            "bob".into(),
            "Bob".into(),
            "hi".into(),
        );
        assert_eq!(
            webhook_events([(42, WebhookItem::Entry(&m))]),
            r#"[{"event_id":42,"type":"message","dm":"alice","seq":3,"ts":9,"from":"bob","name":"Bob","text":"hi"}]"#
        );
    }

    #[test]
    fn a_queued_presence_event_gets_its_event_id_in_front() {
        let body = webhook_user_event("alice", "Alice", true, 5);
        assert_eq!(
            webhook_events([(7, WebhookItem::Raw(&body))]),
            r#"[{"event_id":7,"type":"user","user":"alice","name":"Alice","event":"online","ts":5}]"#
        );
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
