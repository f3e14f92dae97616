//! The broker seam: the one way to the other nodes. Stored messages, presence
//! changes and typing events go out through it, and what other nodes publish comes
//! back through it as [`Inbound`] events.
//!
//! Owns: the choice of transport between nodes, the envelope format on it, the
//! node's identity and heartbeat, and the cluster's presence records.
//! [`Broker::Local`] is one node: nothing leaves the process, publishing always
//! succeeds, and there is no remote presence. [`Broker::Redis`] publishes every
//! committed message on the Redis channel of its room (or of each DM party) and
//! hands what arrives from other nodes to the sink the hub installed
//! ([`Broker::set_sink`]), which delivers it through the same path as local
//! messages. Must not: store, number or encode messages for clients, or decide
//! order; the hub orders by `seq` and fills gaps from the store. Nothing outside
//! this module names Redis.

pub mod redis;
pub mod sentinel;

use self::redis::{RedisBroker, RedisSettings};
use crate::message::{ChannelKey, EntryKind, StoredMessage};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use self::redis::BrokerError;

/// Where another node is reached: nowhere (one node), or through Redis.
#[derive(Debug, Clone)]
pub enum BrokerConfig {
    Local,
    Redis {
        /// One URL, or with `cluster` a comma-separated list of seed nodes.
        url: String,
        cluster: bool,
        node_id: String,
        node_timeout: Duration,
    },
}

/// What another node published, as the hub needs it. Events this node published
/// itself are not handed back (a message may be: the hub drops duplicates by `seq`).
#[derive(Debug)]
pub enum Inbound {
    /// A stored message.
    Message(StoredMessage),
    /// Node instance `inst` now has (`on`) or no longer has `user` in `room`.
    Presence {
        room: String,
        user: String,
        name: String,
        inst: String,
        on: bool,
    },
    /// `user` is typing in `room`.
    Typing {
        room: String,
        user: String,
        name: String,
    },
    /// Close every connection of `user` here (the server API's disconnect).
    Disconnect { user: String, reason: String },
    /// Take `user`'s connections here out of `room` (the server API's remove).
    Remove {
        room: String,
        user: String,
        reason: String,
    },
    /// Tokens are revoked: `key` is `j:<jti>` or `u:<user>` (with `issued_before`).
    Revoke {
        key: String,
        issued_before: Option<i64>,
    },
    /// Another node asks a question: answer with [`Broker::answer`] under `id`.
    Ask { id: String, question: Question },
    /// `user` read `channel` up to `seq`: tell `to`'s connections here (the
    /// reader's own, or a DM peer's as a read receipt).
    Read {
        channel: ChannelKey,
        user: String,
        seq: u64,
        to: String,
    },
    /// `user` is banned until `until` (ms; None: until lifted), or no longer (None).
    Ban {
        user: String,
        ban: Option<(Option<i64>, String)>,
    },
}

/// A question the server API asks every node ([`Broker::ask`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// Where is this user? Answered with a [`UserHere`].
    User(String),
    /// Which rooms whose name starts with `prefix` and sorts after `after` have
    /// live members (the first `limit` by name)? Answered with a [`RoomsHere`].
    Rooms {
        prefix: String,
        after: String,
        limit: usize,
    },
    /// Close every connection of `user` (`closing` with `reason`, 4003) and say
    /// how many: a [`Closed`].
    Disconnect { user: String, reason: String },
    /// Take `user`'s connections out of `room` (`left` with `reason`) and say how
    /// many: a [`Closed`].
    Remove {
        room: String,
        user: String,
        reason: String,
    },
}

/// One node's answer to [`Question::Disconnect`] or [`Question::Remove`]: how many
/// of its connections it closed or took out of the room.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub n: usize,
}

/// One node's answer to [`Question::User`]: its connections of the user and the
/// rooms it sees them in.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserHere {
    pub connections: usize,
    pub rooms: Vec<String>,
}

/// One node's answer to [`Question::Rooms`]: (room, last seq, cluster-wide member
/// count) of the rooms it has live members in.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomsHere {
    pub rooms: Vec<(String, u64, usize)>,
}

/// The other live node instances' presence in one room: user -> (display name,
/// the instances that have the user there).
pub type RemotePresence = HashMap<String, (String, HashSet<String>)>;

/// Something a broker subscription is for.
#[derive(Debug, Clone, Copy)]
pub enum Topic<'a> {
    /// A room's messages, presence and typing.
    Room(&'a str),
    /// A user's direct messages.
    User(&'a str),
    /// Orders for every node (bans).
    Control,
}

pub enum Broker {
    /// Single node: publishing is delivering.
    Local,
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// Connect as configured (Redis must be reachable now).
    pub async fn connect(config: &BrokerConfig, metrics: Metrics) -> Result<Broker, BrokerError> {
        match config {
            BrokerConfig::Local => Ok(Broker::Local),
            BrokerConfig::Redis {
                url,
                cluster,
                node_id,
                node_timeout,
            } => {
                let settings = RedisSettings {
                    url: url.clone(),
                    cluster: *cluster,
                    node_id: node_id.clone(),
                    node_timeout: *node_timeout,
                };
                let redis = RedisBroker::connect(&settings, metrics).await?;
                tracing::info!(instance = redis.instance(), "joined the cluster over Redis");
                Ok(Broker::Redis(redis))
            }
        }
    }

    /// Are there other nodes?
    pub fn is_cluster(&self) -> bool {
        matches!(self, Broker::Redis(_))
    }

    /// Where inbound events go. Set once, before [`Broker::start`].
    pub fn set_sink(&self, sink: impl Fn(Inbound) + Send + Sync + 'static) {
        if let Broker::Redis(r) = self {
            r.set_sink(sink);
        }
    }

    /// Start the broker's own tasks (link checks, subscriptions, presence writes);
    /// they end when `stop` is cancelled.
    pub fn start(&self, stop: CancellationToken) {
        if let Broker::Redis(r) = self {
            r.start(stop);
        }
    }

    /// Leave the cluster cleanly: presence written, heartbeat removed.
    pub async fn shutdown(&self) {
        if let Broker::Redis(r) = self {
            r.shutdown().await;
        }
    }

    /// How often the cluster's presence is reconciled (None: one node, never).
    pub fn presence_period(&self) -> Option<Duration> {
        match self {
            Broker::Local => None,
            Broker::Redis(r) => Some(r.node_timeout() / 3),
        }
    }

    /// Resolves when the link to the other nodes came back after being down (never
    /// on one node).
    pub async fn reconnected(&self) {
        match self {
            Broker::Local => std::future::pending().await,
            Broker::Redis(r) => r.reconnected.notified().await,
        }
    }

    /// Can messages be published right now? (A send is refused when not.)
    pub fn healthy(&self) -> bool {
        match self {
            Broker::Local => true,
            Broker::Redis(r) => r.healthy(),
        }
    }

    /// Hold a subscription (reference-counted); returns once it is in place, or at
    /// once while the link is down (it is made on reconnection).
    pub async fn subscribe(&self, topic: Topic<'_>) {
        if let Broker::Redis(r) = self {
            r.subscribe(channel_of(topic)).await;
        }
    }

    /// Release one hold on a subscription.
    pub fn unsubscribe(&self, topic: Topic<'_>) {
        if let Broker::Redis(r) = self {
            r.unsubscribe(&channel_of(topic));
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

    /// Tell the other nodes that `user` is typing in `room` (best effort).
    pub fn typing(&self, room: &str, user: &str, name: &str) {
        if let Broker::Redis(r) = self {
            r.typing(room, user, name);
        }
    }

    /// Tell `to`'s connections on the other nodes that `user` read `channel` up to
    /// `seq` (best effort: the position is stored; this only syncs live badges).
    pub fn read(&self, channel: &ChannelKey, user: &str, seq: u64, to: &str) {
        if let Broker::Redis(r) = self {
            r.read(channel, user, seq, to);
        }
    }

    /// Ask every other node `question`; their answers (none on one node), as
    /// the JSON they sent. Waits at most about a second for nodes that do not
    /// answer.
    pub async fn ask(&self, question: &Question) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Local => Ok(Vec::new()),
            Broker::Redis(r) => r.ask(question).await,
        }
    }

    /// Answer another node's [`Inbound::Ask`] (best effort).
    pub fn answer<T: Serialize>(&self, id: &str, answer: &T) {
        if let Broker::Redis(r) = self {
            r.answer(id, &to_json(answer));
        }
    }

    /// Tell every node about a token revocation (see [`Inbound::Revoke`]).
    pub async fn revoke(&self, key: &str, issued_before: Option<i64>) -> Result<(), BrokerError> {
        match self {
            Broker::Local => Ok(()),
            Broker::Redis(r) => r.revoke(key, issued_before).await,
        }
    }

    /// Keep this node's figures (opaque JSON) for the other nodes to read.
    pub async fn put_stats(&self, json: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Local => Ok(()),
            Broker::Redis(r) => r.put_stats(json).await,
        }
    }

    /// Every node's last figures as put (none on one node).
    pub async fn all_stats(&self) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Local => Ok(Vec::new()),
            Broker::Redis(r) => r.all_stats().await,
        }
    }

    /// Tell the other nodes about a ban (`Some((until ms or 0, reason))`) or its
    /// lifting (None). An error: they could not be told.
    pub async fn ban(&self, user: &str, ban: Option<(i64, &str)>) -> Result<(), BrokerError> {
        match self {
            Broker::Local => Ok(()),
            Broker::Redis(r) => r.ban(user, ban).await,
        }
    }

    /// Announce that `user` is (`on`) or no longer is in `room` on this node.
    pub fn announce_presence(&self, room: &str, user: &str, name: &str, on: bool) {
        if let Broker::Redis(r) = self {
            r.presence(room, user, name, on);
        }
    }

    /// The other live node instances' presence in `room` (empty on one node).
    pub async fn presence_snapshot(&self, room: &str) -> Result<RemotePresence, BrokerError> {
        match self {
            Broker::Local => Ok(RemotePresence::new()),
            Broker::Redis(r) => r.presence_snapshot(room, &mut HashMap::new()).await,
        }
    }

    /// One round of cluster presence upkeep: refresh this node's heartbeat, then for
    /// each room make the records of this node match `here` (user -> name of the
    /// users this node has in the room), remove dead nodes' records, and return the
    /// other live nodes' presence per room. Stops at the first failure.
    pub async fn reconcile_presence(
        &self,
        rooms: Vec<(String, HashMap<String, String>)>,
    ) -> Result<Vec<(String, RemotePresence)>, BrokerError> {
        match self {
            Broker::Local => Ok(Vec::new()),
            Broker::Redis(r) => r.reconcile_presence(rooms).await,
        }
    }
}

fn channel_of(topic: Topic<'_>) -> String {
    match topic {
        Topic::Room(r) => room_channel(r),
        Topic::User(u) => user_channel(u),
        Topic::Control => CONTROL_CHANNEL.to_owned(),
    }
}

/// The channel every node subscribes to for cluster-wide orders.
pub const CONTROL_CHANNEL: &str = "hubbub:ctl";

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
    /// A stream entry's kind ([`crate::message::EntryKind::code`]; 0, a message,
    /// is left out).
    #[serde(default, skip_serializing_if = "is_zero_k")]
    pub kd: i16,
    /// An edit's, delete's or reaction's target seq.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tg: u64,
    /// A reaction's emoji and whether it is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub em: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<bool>,
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
    /// Close a user's connections (`c` and `from`: the user, `text`: the reason).
    /// Sent by earlier releases (now a [`Question::Disconnect`]); still obeyed so
    /// that a cluster can be upgraded node by node.
    #[serde(rename = "x")]
    Disconnect,
    /// A ban of `from` until `ts` (0: until lifted), `text` the reason.
    #[serde(rename = "b")]
    Ban,
    /// `from`'s ban is lifted.
    #[serde(rename = "ub")]
    Unban,
    /// Take `from`'s connections out of room `c` (`text`: the reason). Sent by
    /// earlier releases (now a [`Question::Remove`]); still obeyed.
    #[serde(rename = "rm")]
    Remove,
    /// Tokens revoked: `c` the key, `ts` the issued-before time (0: none).
    #[serde(rename = "rv")]
    Revoke,
    /// `from` read channel `c` up to `seq`; for user `name`'s connections.
    #[serde(rename = "rd")]
    Read,
    /// A question (`name`: "user" about user `from`; "rooms" with prefix `from`
    /// after `text`, at most `seq`; "disconnect" user `from` with reason `text`;
    /// "remove" user `from` from room `em` with reason `text`); answer under
    /// request id `c`.
    #[serde(rename = "q")]
    Ask,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i(v: &i64) -> bool {
    *v == 0
}
fn is_zero_k(v: &i16) -> bool {
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
            #[serde(skip_serializing_if = "is_zero_k")]
            kd: i16,
            #[serde(skip_serializing_if = "is_zero")]
            tg: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            em: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            on: Option<bool>,
        }
        let (em, on) = match &m.kind {
            EntryKind::React { emoji, on, .. } => (Some(emoji.as_str()), Some(*on)),
            _ => (None, None),
        };
        to_json(&Out {
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
            kd: m.kind.code(),
            tg: m.kind.target().unwrap_or(0),
            em,
            on,
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
            kd: 0,
            tg: 0,
            em: None,
            on: None,
        }
    }

    /// What this envelope means to a node instance `me`: None for what `me` sent
    /// itself (presence, typing) and for a malformed message.
    pub fn into_inbound(self, me: &str) -> Option<Inbound> {
        match self.k {
            Kind::Message => self.into_message().map(Inbound::Message),
            _ if self.n == me => None,
            Kind::Join | Kind::Leave => Some(Inbound::Presence {
                on: self.k == Kind::Join,
                room: self.c,
                user: self.from,
                name: self.name,
                inst: self.n,
            }),
            Kind::Typing => Some(Inbound::Typing {
                room: self.c,
                user: self.from,
                name: self.name,
            }),
            Kind::Disconnect => Some(Inbound::Disconnect {
                user: self.from,
                reason: self.text,
            }),
            Kind::Ban => Some(Inbound::Ban {
                user: self.from,
                ban: Some(((self.ts > 0).then_some(self.ts), self.text)),
            }),
            Kind::Unban => Some(Inbound::Ban {
                user: self.from,
                ban: None,
            }),
            Kind::Revoke => Some(Inbound::Revoke {
                key: self.c,
                issued_before: (self.ts > 0).then_some(self.ts),
            }),
            Kind::Ask => Some(Inbound::Ask {
                id: self.c,
                question: match self.name.as_str() {
                    "user" => Question::User(self.from),
                    "rooms" => Question::Rooms {
                        prefix: self.from,
                        after: self.text,
                        limit: usize::try_from(self.seq).unwrap_or(usize::MAX),
                    },
                    "disconnect" => Question::Disconnect {
                        user: self.from,
                        reason: self.text,
                    },
                    "remove" => Question::Remove {
                        room: self.em?,
                        user: self.from,
                        reason: self.text,
                    },
                    _ => return None,
                },
            }),
            Kind::Read => Some(Inbound::Read {
                channel: ChannelKey::from_storage_key(&self.c)?,
                user: self.from,
                seq: self.seq,
                to: self.name,
            }),
            Kind::Remove => Some(Inbound::Remove {
                room: self.c,
                user: self.from,
                reason: self.text,
            }),
        }
    }

    /// The stored message this envelope carries, if it is a well-formed one.
    pub fn into_message(self) -> Option<StoredMessage> {
        if self.k != Kind::Message || self.seq == 0 {
            return None;
        }
        let target = (self.tg > 0).then_some(self.tg);
        Some(StoredMessage {
            channel: ChannelKey::from_storage_key(&self.c)?,
            seq: self.seq,
            ts: self.ts,
            from: self.from,
            name: self.name,
            text: self.text,
            meta: self.meta,
            client_id: self.cid,
            kind: EntryKind::from_columns(self.kd, target, self.em, self.on)?,
            deleted: false,
        })
    }
}

/// Envelopes are our own types: serializing them cannot fail.
pub(crate) fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_envelope_round_trips_with_its_channel_and_meta() {
        let m = StoredMessage {
            meta: Some(RawValue::from_string(r#"{"a":[1,2]}"#.into()).expect("raw")),
            client_id: Some("c1".into()),
            ..StoredMessage::message(
                ChannelKey::dm("bob", "alice"),
                7,
                123,
                "bob".into(),
                "Bob".into(),
                "hi \"there\"".into(),
            )
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
        assert_eq!(got.kind, EntryKind::Message);
    }

    #[test]
    fn a_reaction_envelope_round_trips_with_its_target_and_emoji() {
        let m = StoredMessage {
            kind: EntryKind::React {
                target: 3,
                emoji: "👍".into(),
                on: false,
            },
            ..StoredMessage::message(
                ChannelKey::Room("r".into()),
                9,
                1,
                "u".into(),
                "U".into(),
                String::new(),
            )
        };
        let json = Envelope::encode_message("a.1", &m);
        let back: Envelope = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.into_message().expect("an entry").kind, m.kind);
    }

    #[test]
    fn a_presence_envelope_is_not_a_message() {
        let e = Envelope::event(Kind::Join, "a.1", "lobby", "u", "U");
        let json = serde_json::to_string(&e).expect("encode");
        let back: Envelope = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.k, Kind::Join);
        assert!(back.into_message().is_none());
    }

    #[test]
    fn a_nodes_own_presence_and_typing_are_not_inbound_but_its_messages_are() {
        let own = Envelope::event(Kind::Typing, "a.1", "lobby", "u", "U");
        assert!(own.into_inbound("a.1").is_none());
        let other = Envelope::event(Kind::Leave, "b.2", "lobby", "u", "U");
        let Some(Inbound::Presence { on, inst, .. }) = other.into_inbound("a.1") else {
            panic!("expected a presence event");
        };
        assert!(!on);
        assert_eq!(inst, "b.2");
    }
}
