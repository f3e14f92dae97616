//! Room membership: `join` (with the history or recovery it replies with) and
//! `leave`.
//!
//! Owns: the join race (the `joined` reply and the live stream that follows it
//! have no gap and no overlap) and the member count metrics. Must not: hold the
//! channel's lock while reading the store.
//!
//! A `join` reads history up to `committed` from the store, then, under the lock,
//! takes anything delivered meanwhile from the channel's small in-memory ring and
//! registers the member, so the reply is queued before any later live message.

use super::channel::Channel;
use super::{Conn, Hub, lock};
use crate::message::{ChannelKey, keep_newest_within};
use crate::protocol::events::{Joined, message_refs};
use crate::protocol::{
    self, CommandError, CommandId, ErrorCode, MAX_JOINED_MEMBERS, MAX_RECOVERY, Since,
};
use crate::store::{Store, Which};
use std::sync::Arc;
use tokio::time::Instant;

impl Hub {
    /// Join `room`: register the member and queue the `joined` reply (with the
    /// missed or latest messages) ahead of any live message that follows it.
    /// Returns about how many bytes of messages the reply carried.
    pub async fn join(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        id: Option<&CommandId>,
        room: &str,
        since: Option<Since>,
        history: u64,
    ) -> Result<usize, CommandError> {
        let key = ChannelKey::Room(room.to_owned());
        let epoch = self.store.epoch();
        let mut caught_up = false;
        loop {
            let ch = self.channel(&key).await?;
            let s0 = {
                let g = lock(&ch.inner);
                if g.evicted {
                    continue;
                }
                g.committed
            };
            // The client has seen more of the room than this node has delivered
            // (it comes from a node that is ahead: a broadcast here is late or
            // lost). Deliver up to its `since` from the store first, as a gap
            // fill would; otherwise the reply could not recover it and the fill
            // would later send the member messages it already has.
            if let Some(s) = since.as_ref().filter(|s| s.epoch == epoch && s.seq > s0)
                && !caught_up
                && matches!(*self.store, Store::Shared(_))
            {
                caught_up = true;
                self.catch_up_channel(&ch, s.seq).await?;
                continue;
            }
            // Recovery is possible when the client's history is ours and not too old.
            let from = since
                .as_ref()
                .filter(|s| s.epoch == epoch && s.seq <= s0 && s0 - s.seq <= MAX_RECOVERY)
                .map(|s| s.seq);
            let mut msgs = match from {
                Some(after) => self.store.range(&key, after, s0).await,
                None => {
                    self.store
                        .latest(&key, Some(s0 + 1), history, Which::Entries)
                        .await
                }
            }
            .map_err(|e| {
                tracing::error!(error = %e, "reading history for join failed");
                CommandError::new(ErrorCode::Unavailable, "history store unavailable")
            })?;

            let mut g = lock(&ch.inner);
            if g.evicted {
                continue;
            }
            let s1 = g.committed;
            if s1 > s0 {
                // Committed while we read: take those from the ring, or read again.
                let covered = g.recent.front().is_some_and(|m| m.seq <= s0 + 1);
                if !covered {
                    continue;
                }
                msgs.extend(g.recent.iter().filter(|m| m.seq > s0).cloned());
            }
            // Recovered only if every message after `since` is here: not too many
            // committed meanwhile, and none missing (a bounded memory ring may have
            // dropped the oldest; claiming recovery then would lose them silently).
            let mut recovered = from.is_some_and(|after| {
                s1 - after <= MAX_RECOVERY
                    && msgs.len() as u64 == s1 - after
                    && msgs.first().is_none_or(|m| m.seq == after + 1)
            });
            // A reply bounded in bytes too (a client with a 1 MiB frame limit must
            // be able to join): missed messages over the budget are not recovered.
            let budget = self.options.max_reply_bytes;
            if keep_newest_within(&mut msgs, budget, |m| m.reply_size()) {
                recovered = false;
            }
            if !recovered {
                let keep = usize::try_from(history).unwrap_or(usize::MAX);
                if msgs.len() > keep {
                    msgs.drain(..msgs.len() - keep);
                }
            }
            // Register the member (idempotent for a rejoin) and announce a new user.
            g.last_active = Instant::now();
            if g.members.insert(conn.id, conn.clone()).is_none() {
                self.metrics.room_members.increment(1.0);
                if g.members.len() == 1 {
                    self.metrics.rooms.increment(1.0);
                }
                self.presence_arrive(&ch, room, &mut g, conn);
            }
            self.metrics.out("reply", 1);
            let first = g.members_page(None, MAX_JOINED_MEMBERS);
            let reply = protocol::reply(
                "joined",
                id,
                Joined {
                    room,
                    epoch,
                    seq: s1,
                    members: first.members,
                    member_count: first.count,
                    messages: message_refs(&msgs, &conn.user),
                    recovered,
                },
            );
            conn.send(reply.into());
            return Ok(msgs.iter().map(|m| m.reply_size()).sum());
        }
    }

    /// Deliver the channel's stored messages up to `upto` (bounded by what the
    /// store has: a `since` beyond the room's end is the client's mistake and
    /// ends the reading). Every member gets them, as from a gap fill.
    async fn catch_up_channel(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        upto: u64,
    ) -> Result<(), CommandError> {
        loop {
            let after = lock(&ch.inner).committed;
            if after >= upto {
                return Ok(());
            }
            let msgs = self
                .store
                .range(&ch.key, after, upto.min(after + MAX_RECOVERY))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "reading history for join failed");
                    CommandError::new(ErrorCode::Unavailable, "history store unavailable")
                })?;
            for m in &msgs {
                self.deliver(ch, m);
            }
            if lock(&ch.inner).committed <= after {
                // Nothing more to read, or a hole the gap filler waits out.
                return Ok(());
            }
        }
    }

    /// Remove `conn` from `room`; `member leave` to the others if it was the user's
    /// last connection there (on every node). Returns whether it was a member.
    pub fn leave(&self, conn: &Arc<Conn>, room: &str) -> bool {
        let key = ChannelKey::Room(room.to_owned());
        let Some(ch) = lock(&self.channels).get(&key).cloned() else {
            return false;
        };
        let mut g = lock(&ch.inner);
        if g.members.swap_remove(&conn.id).is_none() {
            return false;
        }
        g.last_active = Instant::now();
        self.metrics.room_members.decrement(1.0);
        if g.members.is_empty() {
            self.metrics.rooms.decrement(1.0);
        }
        self.presence_depart(&ch, room, &mut g, conn);
        true
    }
}
