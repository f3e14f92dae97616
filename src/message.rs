//! What a message is, independent of where it is stored, how it travels between
//! nodes or how a client sees it.
//!
//! Owns: [`ChannelKey`] (a room or a direct-message pair: the unit with its own
//! `seq`), [`StoredMessage`] (one entry of a channel's stream as it is stored and
//! shared in memory: a message, or an edit, delete or reaction of one, see
//! [`EntryKind`]) and [`current`], which folds a channel's entries into the current
//! state of its messages (protocol 1.1 `history` with `current: true`).
//! Must not: know SQL, the broker's format or the client's JSON: the store, the broker and the
//! protocol module each map these types to their own format.

use serde_json::value::RawValue;
use std::sync::Arc;

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

/// What an entry of a channel's `seq` stream is (protocol 1.1: edits, deletes and
/// reactions take a `seq` of their own, like messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A message: `text` and `meta` are its content.
    Message,
    /// A new text (`text`) for the message at `target`.
    Edit { target: u64 },
    /// The message at `target` is taken back (its text is wiped from storage).
    Delete { target: u64 },
    /// `from` adds (`on`) or removes a reaction `emoji` to the message at `target`.
    React {
        target: u64,
        emoji: String,
        on: bool,
    },
}

impl EntryKind {
    /// The number the stores keep in their `kind` column.
    pub fn code(&self) -> i16 {
        match self {
            EntryKind::Message => 0,
            EntryKind::Edit { .. } => 1,
            EntryKind::Delete { .. } => 2,
            EntryKind::React { .. } => 3,
        }
    }

    /// The message this entry acts on (None for a message).
    pub fn target(&self) -> Option<u64> {
        match self {
            EntryKind::Message => None,
            EntryKind::Edit { target }
            | EntryKind::Delete { target }
            | EntryKind::React { target, .. } => Some(*target),
        }
    }

    /// The inverse of [`EntryKind::code`] with the columns beside it; None for a
    /// row that does not make sense (a store written by a newer release).
    pub fn from_columns(
        code: i16,
        target: Option<u64>,
        emoji: Option<String>,
        on: Option<bool>,
    ) -> Option<EntryKind> {
        Some(match code {
            0 => EntryKind::Message,
            1 => EntryKind::Edit { target: target? },
            2 => EntryKind::Delete { target: target? },
            3 => EntryKind::React {
                target: target?,
                emoji: emoji?,
                on: on?,
            },
            _ => return None,
        })
    }
}

/// One stored entry of a channel's stream (see [`EntryKind`]). Immutable once
/// stored; shared by `Arc` between the committer, the recent-entry ring of its
/// channel and replies that include it.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub channel: ChannelKey,
    pub seq: u64,
    pub ts: i64,
    pub from: String,
    pub name: String,
    pub text: String,
    pub meta: Option<Box<RawValue>>,
    pub client_id: Option<String>,
    pub kind: EntryKind,
    /// Read back from the store: the message (or edit) was deleted and its text is
    /// gone. Never set on a live entry.
    pub deleted: bool,
}

impl StoredMessage {
    /// A new message (kind [`EntryKind::Message`], not deleted).
    pub fn message(
        channel: ChannelKey,
        seq: u64,
        ts: i64,
        from: String,
        name: String,
        text: String,
    ) -> StoredMessage {
        StoredMessage {
            channel,
            seq,
            ts,
            from,
            name,
            text,
            meta: None,
            client_id: None,
            kind: EntryKind::Message,
            deleted: false,
        }
    }

    /// The tombstone this message (or edit) leaves once deleted: no text, no meta.
    pub fn tombstone(&self) -> StoredMessage {
        StoredMessage {
            text: String::new(),
            meta: None,
            deleted: true,
            ..self.clone()
        }
    }

    pub fn is_message(&self) -> bool {
        self.kind == EntryKind::Message
    }

    /// About how many bytes this entry takes in a reply: its strings plus the
    /// fields' names and numbers. JSON escaping can add to it; reply budgets
    /// ([`keep_newest_within`]) leave room for that.
    pub fn reply_size(&self) -> usize {
        const FIXED: usize = 120;
        FIXED
            + self.text.len()
            + self.from.len()
            + self.name.len()
            + self.meta.as_ref().map_or(0, |m| m.get().len())
            + self.client_id.as_ref().map_or(0, String::len)
    }
}

/// Drop the oldest of `items` (ascending) until the rest is at most `budget`
/// bytes by `size`; the newest one is always kept, so a reply never comes back
/// empty because of one large entry. Returns whether any were dropped.
pub fn keep_newest_within<T>(
    items: &mut Vec<T>,
    budget: usize,
    size: impl Fn(&T) -> usize,
) -> bool {
    let mut total = 0usize;
    let mut keep = 0usize;
    for item in items.iter().rev() {
        total = total.saturating_add(size(item));
        if keep > 0 && total > budget {
            break;
        }
        keep += 1;
    }
    if keep < items.len() {
        items.drain(..items.len() - keep);
        true
    } else {
        false
    }
}

/// A message in its current state: the last edit's text, who reacted with what.
#[derive(Debug)]
pub struct Current {
    pub msg: Arc<StoredMessage>,
    /// The text after the last edit (None: never edited, or deleted).
    pub edited_text: Option<String>,
    pub edited_ts: Option<i64>,
    /// Emoji -> users who reacted with it, both in the order of the first reaction.
    pub reactions: Vec<(String, Vec<String>)>,
}

impl Current {
    /// [`StoredMessage::reply_size`] with the edited text and the reactions.
    pub fn reply_size(&self) -> usize {
        self.msg.reply_size()
            + self.edited_text.as_ref().map_or(0, |t| t.len() + 40)
            + self
                .reactions
                .iter()
                .map(|(e, users)| e.len() + 8 + users.iter().map(|u| u.len() + 3).sum::<usize>())
                .sum::<usize>()
    }
}

/// Fold `entries` (edits and reactions, ascending by `seq`) into the current
/// state of `messages` (ascending). Entries about other messages are ignored; a
/// user's last reaction with an emoji wins (`on: false` takes it back).
pub fn current(messages: Vec<Arc<StoredMessage>>, entries: &[Arc<StoredMessage>]) -> Vec<Current> {
    let mut out: Vec<Current> = messages
        .into_iter()
        .filter(|m| m.is_message())
        .map(|msg| Current {
            msg,
            edited_text: None,
            edited_ts: None,
            reactions: Vec::new(),
        })
        .collect();
    for e in entries {
        let Some(target) = e.kind.target() else {
            continue;
        };
        let Ok(i) = out.binary_search_by_key(&target, |c| c.msg.seq) else {
            continue;
        };
        let c = &mut out[i];
        match &e.kind {
            EntryKind::Edit { .. } if !c.msg.deleted && !e.deleted => {
                c.edited_text = Some(e.text.clone());
                c.edited_ts = Some(e.ts);
            }
            EntryKind::React { emoji, on, .. } => {
                let slot = match c.reactions.iter().position(|(em, _)| em == emoji) {
                    Some(p) => p,
                    None => {
                        c.reactions.push((emoji.clone(), Vec::new()));
                        c.reactions.len() - 1
                    }
                };
                let users = &mut c.reactions[slot].1;
                let had = users.iter().position(|u| *u == e.from);
                match (on, had) {
                    (true, None) => users.push(e.from.clone()),
                    (false, Some(p)) => {
                        users.remove(p);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    for c in &mut out {
        c.reactions.retain(|(_, users)| !users.is_empty());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn keep_newest_within_drops_the_oldest_until_the_rest_fits() {
        let mut v = vec![10, 20, 30, 40];
        assert!(keep_newest_within(&mut v, 75, |n| *n));
        assert_eq!(v, vec![30, 40]);
    }

    #[test]
    fn keep_newest_within_keeps_everything_that_fits() {
        let mut v = vec![10, 20];
        assert!(!keep_newest_within(&mut v, 30, |n| *n));
        assert_eq!(v, vec![10, 20]);
    }

    #[test]
    fn keep_newest_within_keeps_the_newest_even_when_it_alone_is_over_budget() {
        let mut v = vec![10, 500];
        assert!(keep_newest_within(&mut v, 100, |n| *n));
        assert_eq!(v, vec![500]);
    }

    use super::*;

    fn entry(seq: u64, from: &str, kind: EntryKind, text: &str) -> Arc<StoredMessage> {
        let mut m = StoredMessage::message(
            ChannelKey::Room("r".into()),
            seq,
            seq as i64 * 10,
            from.into(),
            from.into(),
            text.into(),
        );
        m.kind = kind;
        Arc::new(m)
    }

    #[test]
    fn the_current_state_has_the_last_edit_and_the_reactions_still_on() {
        let msgs = vec![entry(1, "a", EntryKind::Message, "helo")];
        let react = |seq, user, on| {
            entry(
                seq,
                user,
                EntryKind::React {
                    target: 1,
                    emoji: "👍".into(),
                    on,
                },
                "",
            )
        };
        let entries = vec![
            entry(2, "a", EntryKind::Edit { target: 1 }, "hello"),
            react(3, "b", true),
            react(4, "c", true),
            react(5, "b", false),
            entry(6, "a", EntryKind::Edit { target: 1 }, "hello!"),
        ];
        let cur = current(msgs, &entries);
        assert_eq!(cur.len(), 1);
        assert_eq!(cur[0].edited_text.as_deref(), Some("hello!"));
        assert_eq!(cur[0].edited_ts, Some(60));
        assert_eq!(
            cur[0].reactions,
            vec![("👍".to_owned(), vec!["c".to_owned()])]
        );
    }

    #[test]
    fn a_reaction_taken_back_by_everyone_is_not_listed() {
        let msgs = vec![entry(1, "a", EntryKind::Message, "x")];
        let r = |seq, on| {
            entry(
                seq,
                "b",
                EntryKind::React {
                    target: 1,
                    emoji: "🎉".into(),
                    on,
                },
                "",
            )
        };
        let cur = current(msgs, &[r(2, true), r(3, false)]);
        assert!(cur[0].reactions.is_empty());
    }

    #[test]
    fn entry_kinds_round_trip_through_their_columns() {
        for k in [
            EntryKind::Message,
            EntryKind::Edit { target: 3 },
            EntryKind::Delete { target: 4 },
            EntryKind::React {
                target: 5,
                emoji: "x".into(),
                on: false,
            },
        ] {
            let (emoji, on) = match &k {
                EntryKind::React { emoji, on, .. } => (Some(emoji.clone()), Some(*on)),
                _ => (None, None),
            };
            assert_eq!(
                EntryKind::from_columns(k.code(), k.target(), emoji, on),
                Some(k)
            );
        }
    }

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
