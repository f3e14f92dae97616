//! What the server API asks of the hub: rooms and users as an operator sees them,
//! and disconnecting a user everywhere.
//!
//! Owns: those answers, assembled from the channels, the registry, the store and
//! (through the broker) the other nodes. Must not: speak HTTP or JSON (the `api`
//! module does), or change a channel other than through the hub's own paths.

use super::{Conn, Hub, lock};
use crate::broker::{Closed, Inbound, Question, RoomsHere, UserHere};
use crate::message::ChannelKey;
use crate::protocol::{CommandError, ErrorCode, Member, close};
use crate::stats::{ClusterStats, NodeStats};
use std::collections::BTreeMap;

/// One page of `GET /rooms`: (room, last seq, users present), by room name.
pub struct RoomsPage {
    pub rooms: Vec<(String, u64, usize)>,
    pub next: Option<String>,
}

/// One page of a room's members, on every node.
pub struct PresencePage {
    pub members: Vec<Member>,
    pub count: usize,
    pub next: Option<String>,
}

impl Hub {
    /// Rooms with live members on any node or with stored messages, whose name
    /// starts with `prefix` and sorts after `after` (the same answer on any node).
    pub async fn rooms_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<RoomsPage, CommandError> {
        let stored = self
            .store
            .rooms(prefix, after, limit + 1)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "listing rooms failed");
                CommandError::new(ErrorCode::Unavailable, "history store unavailable")
            })?;
        let mut merged: BTreeMap<String, (u64, usize)> = stored
            .into_iter()
            .map(|(room, seq)| (room, (seq, 0)))
            .collect();
        // Each source's first limit + 1 rooms: enough to fill the page and tell
        // whether another follows.
        let mut live = self.live_rooms(prefix, after, limit + 1);
        let question = Question::Rooms {
            prefix: prefix.to_owned(),
            after: after.to_owned(),
            limit: limit + 1,
        };
        for here in self.ask::<RoomsHere>(question).await? {
            live.extend(here.rooms);
        }
        // A node with members in a room holds its cluster-wide count: any such
        // node's figure is the room's.
        for (room, seq, count) in live {
            let e = merged.entry(room).or_insert((0, 0));
            e.0 = e.0.max(seq);
            e.1 = e.1.max(count);
        }
        let mut rooms: Vec<(String, u64, usize)> = merged
            .into_iter()
            .map(|(room, (seq, n))| (room, seq, n))
            .collect();
        let next = page(&mut rooms, limit, |r| r.0.clone());
        Ok(RoomsPage { rooms, next })
    }

    /// (room, last seq, members on every node) of the first `limit` rooms by name
    /// this node has loaded with members or messages, starting with `prefix`,
    /// after `after`.
    fn live_rooms(&self, prefix: &str, after: &str, limit: usize) -> Vec<(String, u64, usize)> {
        let live: Vec<_> = lock(&self.channels)
            .iter()
            .filter_map(|(k, ch)| match k {
                ChannelKey::Room(r) if r.starts_with(prefix) && r.as_str() > after => {
                    Some((r.clone(), ch.clone()))
                }
                _ => None,
            })
            .collect();
        let mut rooms: Vec<(String, u64, usize)> = live
            .into_iter()
            .filter_map(|(room, ch)| {
                let g = lock(&ch.inner);
                let count = g.presence.len();
                let seq = g.committed.max(g.next_seq.saturating_sub(1));
                (count > 0 || seq > 0).then_some((room, seq, count))
            })
            .collect();
        rooms.sort();
        rooms.truncate(limit);
        rooms
    }

    /// Keep this node's figures where the other nodes read them (best effort: a
    /// failure only leaves them a little stale).
    pub async fn publish_stats(&self, mine: &NodeStats) {
        if self.broker.is_cluster() {
            let json = serde_json::to_string(mine).unwrap_or_default();
            if let Err(e) = self.broker.put_stats(&json).await {
                tracing::debug!(error = %e, "publishing this node's figures failed");
            }
        }
    }

    /// Every live node's figures, this node's being `mine`, summed. Figures older
    /// than `max_age_ms` are of nodes that are gone.
    pub async fn cluster_stats(
        &self,
        mine: NodeStats,
        max_age_ms: i64,
    ) -> Result<ClusterStats, CommandError> {
        let mut nodes = vec![mine];
        if self.broker.is_cluster() {
            let all = self.broker.all_stats().await.map_err(|e| {
                tracing::warn!(error = %e, "reading the nodes' figures failed");
                CommandError::new(ErrorCode::Unavailable, "message broker unreachable")
            })?;
            let now = super::now_ms();
            for json in all {
                let Ok(n) = serde_json::from_str::<NodeStats>(&json) else {
                    continue;
                };
                if n.node != nodes[0].node && now - n.at <= max_age_ms {
                    nodes.push(n);
                }
            }
        }
        Ok(crate::stats::sum(nodes))
    }

    /// A page of `room`'s members on every node. A node with members there keeps
    /// the cluster's presence of the room; any other asks the broker for it.
    pub async fn presence_page(
        &self,
        room: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PresencePage, CommandError> {
        let key = ChannelKey::Room(room.to_owned());
        let local = lock(&self.channels).get(&key).cloned();
        if let Some(ch) = local {
            let g = lock(&ch.inner);
            if !g.presence.is_empty() || !self.broker.is_cluster() {
                let page = g.members_page(after, limit);
                return Ok(PresencePage {
                    members: page.members,
                    count: page.count,
                    next: page.next,
                });
            }
        }
        let remote = self.broker.presence_snapshot(room).await.map_err(|e| {
            tracing::warn!(error = %e, "reading cluster presence failed");
            CommandError::new(ErrorCode::Unavailable, "message broker unreachable")
        })?;
        let sorted: BTreeMap<String, String> = remote
            .into_iter()
            .map(|(user, (name, _))| (user, name))
            .collect();
        let count = sorted.len();
        let mut members: Vec<Member> = sorted
            .into_iter()
            .filter(|(u, _)| after.is_none_or(|a| u.as_str() > a))
            .take(limit + 1)
            .map(|(user, name)| Member { user, name })
            .collect();
        let next = page(&mut members, limit, |m| m.user.clone());
        Ok(PresencePage {
            members,
            count,
            next,
        })
    }

    /// `user`'s connections on this node, and the rooms this node knows them to be
    /// in (on any node: a room's presence here is cluster-wide).
    pub fn user_status(&self, user: &str) -> (usize, Vec<String>) {
        let connections = self.registry.count(user);
        let channels: Vec<_> = lock(&self.channels)
            .iter()
            .filter_map(|(k, ch)| match k {
                ChannelKey::Room(r) => Some((r.clone(), ch.clone())),
                ChannelKey::Dm(..) => None,
            })
            .collect();
        let mut rooms: Vec<String> = channels
            .into_iter()
            .filter(|(_, ch)| lock(&ch.inner).presence.contains_key(user))
            .map(|(r, _)| r)
            .collect();
        rooms.sort();
        (connections, rooms)
    }

    /// Ask every other node `question`; their answers that parse.
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        question: Question,
    ) -> Result<Vec<T>, CommandError> {
        let answers = self.broker.ask(&question).await.map_err(|e| {
            tracing::warn!(error = %e, "asking the other nodes failed");
            CommandError::new(ErrorCode::Unavailable, "message broker unreachable")
        })?;
        Ok(answers
            .iter()
            .filter_map(|a| serde_json::from_str(a).ok())
            .collect())
    }

    /// Answer another node's question from what this node has.
    pub(super) fn answer(&self, id: &str, question: Question) {
        match question {
            Question::User(user) => {
                let (connections, rooms) = self.user_status(&user);
                self.broker.answer(id, &UserHere { connections, rooms });
            }
            Question::Rooms {
                prefix,
                after,
                limit,
            } => {
                let rooms = self.live_rooms(&prefix, &after, limit);
                self.broker.answer(id, &RoomsHere { rooms });
            }
            Question::Disconnect { user, reason } => {
                let n = self.disconnect_here(&user, &reason);
                tracing::info!(
                    user,
                    closed = n,
                    "disconnected by the server API on another node"
                );
                self.broker.answer(id, &Closed { n });
            }
            Question::Remove { room, user, reason } => {
                let n = self.remove_here(&room, &user, &reason);
                self.broker.answer(id, &Closed { n });
            }
        }
    }

    /// `user`'s connections and rooms on every node: this node's, and every other
    /// node's answer through the broker (the same answer whichever node is asked).
    pub async fn user_status_everywhere(
        &self,
        user: &str,
    ) -> Result<(usize, Vec<String>), CommandError> {
        let (mut connections, mut rooms) = self.user_status(user);
        for here in self
            .ask::<UserHere>(Question::User(user.to_owned()))
            .await?
        {
            connections += here.connections;
            rooms.extend(here.rooms);
        }
        rooms.sort();
        rooms.dedup();
        Ok((connections, rooms))
    }

    /// Take `user` out of `room` here and, through the broker, on every node: each
    /// of their connections in the room leaves it (others see `member leave`) and
    /// gets `left` with `reason`. Returns how many connections left here.
    pub async fn remove_member(
        &self,
        room: &str,
        user: &str,
        reason: &str,
    ) -> Result<usize, CommandError> {
        let here = self.remove_here(room, user, reason);
        let question = Question::Remove {
            room: room.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        };
        let others = self
            .broker
            .ask(&question)
            .await
            .map_err(|e| untold(&e, &format!("removed {here} connection(s) on this node")))?;
        Ok(here + Self::closed_of(&others))
    }

    fn remove_here(&self, room: &str, user: &str, reason: &str) -> usize {
        let frame = crate::ws::Text::from(crate::protocol::reply(
            "left",
            None,
            crate::protocol::events::Left {
                room,
                reason: Some(reason),
            },
        ));
        let mut n = 0;
        for c in self.registry.conns(user) {
            if self.leave(&c, room) {
                c.outbox.removed_from(room, frame.clone());
                n += 1;
            }
        }
        n
    }

    /// The sum of the other nodes' [`Closed`] answers (JSON).
    fn closed_of(answers: &[String]) -> usize {
        answers
            .iter()
            .filter_map(|a| serde_json::from_str::<Closed>(a).ok())
            .map(|c| c.n)
            .sum()
    }

    /// Keep `user` within `max` connections on this node: close the oldest ones
    /// beyond it (`closing` with the reason, then 1008). Returns how many.
    pub fn enforce_connection_limit(&self, user: &str, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let mut conns = self.registry.conns(user);
        if conns.len() <= max {
            return 0;
        }
        // Connection ids grow: the smallest are the oldest.
        conns.sort_by_key(|c| c.id);
        let excess = conns.len() - max;
        for c in &conns[..excess] {
            c.outbox.close_with(
                close::POLICY,
                "too many connections for this user: the oldest is closed",
            );
        }
        excess
    }

    /// Close every connection of `user` with `closing` (the reason) and 4003: here
    /// at once, on the other nodes through the broker. Returns how many were
    /// closed here.
    pub async fn disconnect_user(&self, user: &str, reason: &str) -> Result<usize, CommandError> {
        let here = self.disconnect_here(user, reason);
        let question = Question::Disconnect {
            user: user.to_owned(),
            reason: reason.to_owned(),
        };
        let others = self
            .broker
            .ask(&question)
            .await
            .map_err(|e| untold(&e, &format!("closed {here} connection(s) on this node")))?;
        Ok(here + Self::closed_of(&others))
    }

    pub(super) fn disconnect_here(&self, user: &str, reason: &str) -> usize {
        let conns = self.registry.conns(user);
        for c in &conns {
            c.outbox.close_with(close::DISCONNECTED, reason);
        }
        conns.len()
    }

    /// The broker's events for this module.
    pub(super) fn on_operator_inbound(&self, event: Inbound) {
        match event {
            Inbound::Disconnect { user, reason } => {
                let n = self.disconnect_here(&user, &reason);
                tracing::info!(
                    user,
                    closed = n,
                    "disconnected by the server API on another node"
                );
            }
            Inbound::Ban {
                user,
                ban: Some(ban),
            } => {
                lock(&self.bans).insert(user.clone(), ban.clone());
                self.disconnect_here(&user, &ban_reason(&ban.1));
            }
            Inbound::Ban { user, ban: None } => {
                lock(&self.bans).remove(&user);
            }
            Inbound::Remove { room, user, reason } => {
                self.remove_here(&room, &user, &reason);
            }
            Inbound::Revoke { key, issued_before } => {
                self.revoke_here(&key, issued_before);
            }
            _ => {}
        }
    }

    /// Does a revocation name the token `conn` holds?
    pub fn revoked(&self, conn: &Conn) -> bool {
        conn.token()
            .is_some_and(|token| self.token_revoked(&conn.user, &token))
    }

    /// Does a revocation name `user`'s token `token`?
    pub fn token_revoked(&self, user: &str, token: &crate::auth::TokenId) -> bool {
        let revocations = lock(&self.revocations);
        if let Some(jti) = &token.jti
            && revocations.contains_key(&format!("j:{jti}"))
        {
            return true;
        }
        match revocations.get(&format!("u:{user}")) {
            None => false,
            // A token without `iat` cannot show it is newer: it is revoked.
            Some(before) => {
                let before = before.unwrap_or(i64::MAX);
                token
                    .iat
                    .is_none_or(|iat| i64::try_from(iat).unwrap_or(i64::MAX) < before)
            }
        }
    }

    /// Revoke tokens everywhere: one (`jti`) or every token of `user` issued before
    /// `issued_before` (Unix seconds). Stored until those tokens would have expired
    /// (`keep_until_ms`), then their live connections are closed (`closing`, 4001)
    /// here and on the other nodes. Returns how many were closed here.
    pub async fn revoke(
        &self,
        key: &str,
        issued_before: Option<i64>,
        keep_until_ms: i64,
    ) -> Result<usize, CommandError> {
        self.store
            .put_revocation(key, issued_before, keep_until_ms)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "storing a revocation failed");
                CommandError::new(
                    ErrorCode::Unavailable,
                    "the store is unavailable; nothing was revoked",
                )
            })?;
        let closed = self.revoke_here(key, issued_before);
        self.broker
            .revoke(key, issued_before)
            .await
            .map_err(|e| untold(&e, "revoked and stored here"))?;
        Ok(closed)
    }

    /// Remember a revocation and close this node's connections it names.
    fn revoke_here(&self, key: &str, issued_before: Option<i64>) -> usize {
        {
            let mut r = lock(&self.revocations);
            let e = r.entry(key.to_owned()).or_insert(issued_before);
            *e = (*e).max(issued_before);
        }
        let named = match key.split_once(':') {
            Some(("u", user)) => self.registry.conns(user),
            Some(("j", _)) => self.registry.matching(|c| lock(&c.token).is_some()),
            _ => Vec::new(),
        };
        let mut n = 0;
        for c in named {
            if self.revoked(&c) {
                c.outbox.close_with(close::UNAUTHORIZED, "token revoked");
                n += 1;
            }
        }
        n
    }

    /// Read the stored bans and follow the cluster's changes to them (on one node,
    /// there are none but our own). Call once, before serving.
    pub async fn load_bans(&self) -> Result<(), crate::store::StoreError> {
        self.broker.subscribe(crate::broker::Topic::Control).await;
        let stored = self.store.bans().await?;
        lock(&self.bans).extend(
            stored
                .into_iter()
                .map(|(user, until, reason)| (user, (until, reason))),
        );
        let revoked = self.store.revocations(super::now_ms()).await?;
        lock(&self.revocations).extend(revoked);
        Ok(())
    }

    /// Why `user` may not say `hello`, if they are banned now.
    pub fn banned(&self, user: &str) -> Option<String> {
        let bans = lock(&self.bans);
        let (until, reason) = bans.get(user)?;
        if until.is_some_and(|u| u <= super::now_ms()) {
            return None;
        }
        Some(ban_reason(reason))
    }

    /// Ban `user` until `until` (ms; None: until lifted), durably, on every node:
    /// stored first, then their connections are closed here and on the other nodes.
    /// Returns how many were closed here.
    pub async fn ban(
        &self,
        user: &str,
        until: Option<i64>,
        reason: &str,
    ) -> Result<usize, CommandError> {
        self.store.put_ban(user, until, reason).await.map_err(|e| {
            tracing::error!(error = %e, "storing a ban failed");
            CommandError::new(
                ErrorCode::Unavailable,
                "the store is unavailable; nothing was banned",
            )
        })?;
        // In the cache before the sweep, so a hello racing this call is either
        // registered (and closed by the sweep) or refused by the cache.
        lock(&self.bans).insert(user.to_owned(), (until, reason.to_owned()));
        let closed = self.disconnect_here(user, &ban_reason(reason));
        self.broker
            .ban(user, Some((until.unwrap_or(0), reason)))
            .await
            .map_err(|e| untold(&e, "banned and stored here"))?;
        Ok(closed)
    }

    /// Lift `user`'s ban everywhere; false if there was none.
    pub async fn unban(&self, user: &str) -> Result<bool, CommandError> {
        let existed = self.store.delete_ban(user).await.map_err(|e| {
            tracing::error!(error = %e, "lifting a ban failed");
            CommandError::new(
                ErrorCode::Unavailable,
                "the store is unavailable; the ban stands",
            )
        })?;
        lock(&self.bans).remove(user);
        self.broker
            .ban(user, None)
            .await
            .map_err(|e| untold(&e, "lifted here"))?;
        Ok(existed)
    }
}

/// What a banned user is told (in `closing`, and in the `error` at `hello`).
fn ban_reason(reason: &str) -> String {
    if reason.is_empty() {
        "banned".to_owned()
    } else {
        format!("banned: {reason}")
    }
}

/// The error when this node did its part of an order but could not pass it on to
/// the other nodes: `done_here` says what stands here; repeating the call is safe.
fn untold(e: &crate::broker::BrokerError, done_here: &str) -> CommandError {
    tracing::warn!(error = %e, done_here, "the other nodes could not be told");
    CommandError::new(
        ErrorCode::Unavailable,
        format!(
            "{done_here}, but the other nodes could not be told (broker unreachable); repeat the call"
        ),
    )
}

/// Cut `items` (fetched up to `limit + 1`) to a page of `limit`; the `after` of
/// the next page (the last item's key), if there is one.
fn page<T>(items: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> String) -> Option<String> {
    if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    }
}
