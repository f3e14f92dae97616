//! What a message is, independent of where it is stored, how it travels between
//! nodes or how a client sees it.
//!
//! Owns: [`ChannelKey`] (a room or a direct-message pair: the unit with its own
//! `seq`) and [`StoredMessage`] (one message as it is stored and shared in memory).
//! Must not: know SQL, the broker's format or the client's JSON: the store, the broker and the
//! protocol module each map these types to their own format.

use serde_json::value::RawValue;

/// A room or a direct-message pair: the unit that has its own `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChannelKey {
    Room(String),
    /// The two users, sorted, so that (a, b) and (b, a) are one pair.
    Dm(String, String),
}

impl ChannelKey {
    pub fn dm(a: &str, b: &str) -> Self {
        if a <= b {
            ChannelKey::Dm(a.to_owned(), b.to_owned())
        } else {
            ChannelKey::Dm(b.to_owned(), a.to_owned())
        }
    }

    /// The key in the database and between nodes: `#room` or `@["a","b"]`. Room
    /// names cannot contain `#`, `@` or `"`, so rooms and pairs never collide.
    pub fn storage_key(&self) -> String {
        match self {
            ChannelKey::Room(r) => format!("#{r}"),
            ChannelKey::Dm(a, b) => {
                // Serializing two strings cannot fail.
                let pair = serde_json::to_string(&[a, b]).unwrap_or_default();
                format!("@{pair}")
            }
        }
    }

    /// `(room, dm)` as `viewer` names this channel on the wire: the room's name, or
    /// for a DM pair the other party.
    pub fn target<'a>(&'a self, viewer: &str) -> (Option<&'a str>, Option<&'a str>) {
        match self {
            ChannelKey::Room(r) => (Some(r.as_str()), None),
            ChannelKey::Dm(..) => (None, self.peer_of(viewer)),
        }
    }

    /// The inverse of [`ChannelKey::storage_key`].
    pub fn from_storage_key(s: &str) -> Option<ChannelKey> {
        if let Some(room) = s.strip_prefix('#') {
            return Some(ChannelKey::Room(room.to_owned()));
        }
        let pair: [String; 2] = serde_json::from_str(s.strip_prefix('@')?).ok()?;
        let [a, b] = pair;
        Some(ChannelKey::dm(&a, &b))
    }

    /// For a DM pair, the other party as seen by `viewer`.
    pub fn peer_of<'a>(&'a self, viewer: &str) -> Option<&'a str> {
        match self {
            ChannelKey::Room(_) => None,
            ChannelKey::Dm(a, b) => Some(if a == viewer { b } else { a }),
        }
    }
}

/// One stored message. Immutable once stored; shared by `Arc` between the committer,
/// the recent-message ring of its channel and replies that include it.
#[derive(Debug)]
pub struct StoredMessage {
    pub channel: ChannelKey,
    pub seq: u64,
    pub ts: i64,
    pub from: String,
    pub name: String,
    pub text: String,
    pub meta: Option<Box<RawValue>>,
    pub client_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dm_pair_is_one_channel_whichever_way_round() {
        assert_eq!(
            ChannelKey::dm("bob", "alice"),
            ChannelKey::dm("alice", "bob")
        );
    }

    #[test]
    fn storage_keys_round_trip_for_rooms_and_pairs() {
        for key in [
            ChannelKey::Room("lobby:1".into()),
            ChannelKey::dm("b\"x", "a"),
        ] {
            assert_eq!(ChannelKey::from_storage_key(&key.storage_key()), Some(key));
        }
    }
}
