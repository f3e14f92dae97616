//! Chat state (protocol 1.1, "Membership and read state" and "Edits, deletes and
//! reactions"): a user's rooms and DM peers, read positions and unread counts,
//! and the edits, deletes and reactions that act on stored messages.
//!
//! Owns: the rules of these commands — who may edit or delete what, which
//! targets exist, how a read position moves and who hears of it (the reader's
//! other connections, on every node, and a DM peer as a read receipt), and the
//! folding of a channel's entries into its messages' current state. Must not:
//! sequence, store or fan out entries itself (an edit, delete or reaction is
//! submitted to the hub like a message and takes the same path: `seq`, group
//! commit, ack after stored and published, `client_id`, gap fill), know SQL (the
//! store has the queries) or the transport between nodes (the broker carries read
//! events), or build JSON
//! by hand (the protocol module encodes every event).

use crate::app::AppState;
use crate::hub::{Conn, Hub, Outgoing, Submitter};
use crate::message::{ChannelKey, Current, EntryKind};
use crate::protocol::events::{ChannelUnread, Unread, read_event};
use crate::protocol::{CommandError, CommandId, ErrorCode};
use crate::store::{ChannelState, StoreError, Which};
use crate::ws::Text;
use std::sync::Arc;

/// The author of deletes made through the server API (SERVER-API.md).
pub const API_AUTHOR: &str = "hubbub";

/// Who asks for an edit, delete or reaction, for the permission check.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    /// A user: may edit and delete only their own messages.
    User(&'a str),
    /// The server API: may delete any message.
    Operator,
}

fn unavailable(e: StoreError) -> CommandError {
    tracing::error!(error = %e, "chat state store call failed");
    CommandError::new(ErrorCode::Unavailable, "history store unavailable")
}

fn not_found(target: u64) -> CommandError {
    CommandError::new(
        ErrorCode::NotFound,
        format!("there is no message {target} here"),
    )
}

/// Check that `kind`'s target is a message of `key`, not deleted, and that
/// `actor` may act on it (edits and deletes: the author only).
pub async fn check_target(
    hub: &Hub,
    key: &ChannelKey,
    kind: &EntryKind,
    actor: Actor<'_>,
) -> Result<(), CommandError> {
    let Some(target) = kind.target() else {
        return Ok(());
    };
    let entry = hub
        .store()
        .entry(key, target)
        .await
        .map_err(unavailable)?
        .filter(|m| m.is_message())
        .ok_or_else(|| not_found(target))?;
    if entry.deleted {
        return Err(CommandError::new(
            ErrorCode::NotFound,
            format!("message {target} was deleted"),
        ));
    }
    let own_only = matches!(kind, EntryKind::Edit { .. } | EntryKind::Delete { .. });
    match actor {
        Actor::User(user) if own_only && entry.from != user => Err(CommandError::new(
            ErrorCode::Forbidden,
            format!("message {target} is not yours to change"),
        )),
        Actor::Operator if !matches!(kind, EntryKind::Delete { .. }) => Err(CommandError::new(
            ErrorCode::Forbidden,
            "the server API may only delete messages",
        )),
        _ => Ok(()),
    }
}

/// Submit an edit, delete or reaction from a connection: its target checked, an
/// edit through the publish check, then stored and delivered like a message (the
/// `ack` follows once stored and published).
pub async fn act(
    state: &AppState,
    conn: &Arc<Conn>,
    id: Option<CommandId>,
    key: ChannelKey,
    mut out: Outgoing,
) -> Result<(), CommandError> {
    let hub = &state.hub;
    check_target(hub, &key, &out.kind, Actor::User(&conn.user)).await?;
    state.check_publish(&conn.user, &key, &mut out).await?;
    hub.submit_as(Submitter::Conn(conn.clone(), id), key, out)
        .await
}

/// Store `conn`'s user's read position in `key` and tell: the command's reply
/// (`read` with `id`) to `conn`, the same event without `id` to the user's other
/// connections, and, in a DM, to the peer (a read receipt); on every node.
pub async fn mark_read(
    hub: &Hub,
    conn: &Conn,
    id: Option<&CommandId>,
    key: &ChannelKey,
    seq: u64,
) -> Result<(), CommandError> {
    let user: &str = &conn.user;
    let stored = hub
        .store()
        .mark_read(user, key, seq)
        .await
        .map_err(unavailable)?;
    conn.send(Text::from(read_event(id, key, user, user, stored)));
    let mine = Text::from(read_event(None, key, user, user, stored));
    hub.send_to_user(user, Some(conn.id), &mine);
    hub.broker().read(key, user, stored, user);
    if let Some(peer) = key.peer_of(user) {
        let theirs = Text::from(read_event(None, key, peer, user, stored));
        hub.send_to_user(peer, None, &theirs);
        hub.broker().read(key, user, stored, peer);
    }
    Ok(())
}

/// Make `room` one of `user`'s rooms (`join` with `persist`), or no longer.
pub async fn set_member(
    hub: &Hub,
    user: &str,
    room: &str,
    member: bool,
) -> Result<(), CommandError> {
    hub.store()
        .set_member(user, &ChannelKey::Room(room.to_owned()), member)
        .await
        .map_err(unavailable)
}

/// `user`'s rooms and DM peers with read state (`welcome`, `unread`): one query.
pub async fn channel_states(hub: &Hub, user: &str) -> Result<Vec<ChannelState>, CommandError> {
    hub.store().channel_states(user).await.map_err(unavailable)
}

/// `states` as the protocol lists them, rooms and DMs apart, as `user` names them.
pub fn unread_lists<'a>(states: &'a [ChannelState], user: &'a str) -> Unread<'a> {
    let mut out = Unread::default();
    for s in states {
        let (room, dm) = s.channel.target(user);
        let entry = ChannelUnread {
            room,
            dm,
            seq: s.seq,
            read: s.read,
            unread: s.unread,
            peer_read: s.peer_read,
        };
        if room.is_some() {
            out.rooms.push(entry);
        } else {
            out.dms.push(entry);
        }
    }
    out
}

/// The newest `limit` messages before `before`, each in its current state: two
/// reads (the messages, then the edits and reactions of their seq range).
pub async fn current_history(
    hub: &Hub,
    key: &ChannelKey,
    before: Option<u64>,
    limit: u64,
) -> Result<Vec<Current>, CommandError> {
    let store = hub.store();
    let msgs = store
        .latest(key, before, limit, Which::Messages)
        .await
        .map_err(unavailable)?;
    let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
        return Ok(Vec::new());
    };
    let entries = store
        .annotations(key, first.seq, last.seq)
        .await
        .map_err(unavailable)?;
    Ok(crate::message::current(msgs, &entries))
}
