//! The broker seam: how stored messages, presence changes and typing events reach
//! the other nodes.
//!
//! Owns: the choice of transport between nodes and the envelope format on it.
//! [`Broker::Local`] is one node: nothing leaves the process, and publishing always
//! succeeds. [`Broker::Redis`] publishes every committed message on the Redis
//! channel of its room (or of each DM party) and hands what arrives from other nodes
//! to the hub ([`crate::hub::Hub::on_envelope`]), which delivers it through the same
//! path as local messages. Must not: store, number or encode messages for clients,
//! or decide order; the hub orders by `seq` and fills gaps from the store.

pub mod redis;

pub use self::redis::{RedisBroker, RedisSettings};

use crate::store::{ChannelKey, StoredMessage};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;

pub enum Broker {
    /// Single node: publishing is delivering.
    Local,
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// Is there more than one node to talk to?
    pub fn redis(&self) -> Option<&Arc<RedisBroker>> {
        match self {
            Broker::Local => None,
            Broker::Redis(r) => Some(r),
        }
    }

    /// Can messages be published right now? (A send is refused when not.)
    pub fn healthy(&self) -> bool {
        match self {
            Broker::Local => true,
            Broker::Redis(r) => r.healthy(),
        }
    }

    /// Publish stored messages to the other nodes; one result per message (true:
    /// every node subscribed to it has it, or will fetch it on reconnect).
    pub async fn publish(&self, msgs: &[Arc<StoredMessage>]) -> Vec<bool> {
        match self {
            Broker::Local => vec![true; msgs.len()],
            Broker::Redis(r) => r.publish(msgs).await,
        }
    }
}

/// The Redis channel of a room.
pub fn room_channel(room: &str) -> String {
    format!("hubbub:r:{room}")
}

/// The Redis channel of a user: direct messages to or from them.
pub fn user_channel(user: &str) -> String {
    format!("hubbub:u:{user}")
}

/// What travels between nodes, as JSON. `k` says what it is.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub k: Kind,
    /// The node instance that sent it.
    pub n: String,
    /// A message's channel storage key, or the room of a presence/typing event.
    pub c: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub ts: i64,
    /// Sender, or the user of a presence/typing event.
    pub from: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A stored message.
    #[serde(rename = "m")]
    Message,
    /// A user is now in a room on node `n`.
    #[serde(rename = "pj")]
    Join,
    /// A user is no longer in a room on node `n`.
    #[serde(rename = "pl")]
    Leave,
    #[serde(rename = "t")]
    Typing,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i(v: &i64) -> bool {
    *v == 0
}

impl Envelope {
    /// The JSON of a stored message's envelope, serialized straight from the message
    /// (no copy of its text: this runs once per published message).
    pub fn encode_message(inst: &str, m: &StoredMessage) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            k: Kind,
            n: &'a str,
            c: String,
            seq: u64,
            ts: i64,
            from: &'a str,
            name: &'a str,
            text: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            meta: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            cid: Option<&'a str>,
        }
        crate::protocol::encode(&Out {
            k: Kind::Message,
            n: inst,
            c: m.channel.storage_key(),
            seq: m.seq,
            ts: m.ts,
            from: &m.from,
            name: &m.name,
            text: &m.text,
            meta: m.meta.as_deref(),
            cid: m.client_id.as_deref(),
        })
    }

    pub fn event(k: Kind, inst: &str, room: &str, user: &str, name: &str) -> Envelope {
        Envelope {
            k,
            n: inst.to_owned(),
            c: room.to_owned(),
            seq: 0,
            ts: 0,
            from: user.to_owned(),
            name: name.to_owned(),
            text: String::new(),
            meta: None,
            cid: None,
        }
    }

    /// The stored message this envelope carries, if it is a well-formed one.
    pub fn into_message(self) -> Option<StoredMessage> {
        if self.k != Kind::Message || self.seq == 0 {
            return None;
        }
        Some(StoredMessage {
            channel: ChannelKey::from_storage_key(&self.c)?,
            seq: self.seq,
            ts: self.ts,
            from: self.from,
            name: self.name,
            text: self.text,
            meta: self.meta,
            client_id: self.cid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_envelope_round_trips_with_its_channel_and_meta() {
        let m = StoredMessage {
            channel: ChannelKey::dm("bob", "alice"),
            seq: 7,
            ts: 123,
            from: "bob".into(),
            name: "Bob".into(),
            text: "hi \"there\"".into(),
            meta: Some(RawValue::from_string(r#"{"a":[1,2]}"#.into()).expect("raw")),
            client_id: Some("c1".into()),
        };
        let json = Envelope::encode_message("a.1", &m);
        let back: Envelope = serde_json::from_str(&json).expect("decode");
        let got = back.into_message().expect("a message");
        assert_eq!(got.channel, ChannelKey::dm("alice", "bob"));
        assert_eq!((got.seq, got.ts), (7, 123));
        assert_eq!(got.text, m.text);
        assert_eq!(
            got.meta.map(|r| r.get().to_owned()).as_deref(),
            Some(r#"{"a":[1,2]}"#)
        );
        assert_eq!(got.client_id.as_deref(), Some("c1"));
    }

    #[test]
    fn a_presence_envelope_is_not_a_message() {
        let e = Envelope::event(Kind::Join, "a.1", "lobby", "u", "U");
        let json = serde_json::to_string(&e).expect("encode");
        let back: Envelope = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.k, Kind::Join);
        assert!(back.into_message().is_none());
    }
}
