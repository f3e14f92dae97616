//! Presence: who is in each room, per user and cluster-wide, and typing.
//!
//! Owns: a room's presence entries (a user's connections here plus the other node
//! instances that have the user there), the `member` join/leave events, applying
//! other nodes' presence news and the periodic reconciliation with the cluster's
//! records, and relaying `typing`. Must not: talk to other nodes except through the
//! broker seam, or keep per-connection state (that is the channel's member map).
//!
//! `member join`/`leave` fire when a user becomes present anywhere or is gone
//! everywhere, so every node announces each user once.
//!
//! Large rooms: while a room has more than `--presence-events-max` users (counted
//! on every node), a user's arrival or departure is not announced per user; the
//! room is marked, and once a second [`Hub::announce_counts`] sends every member a
//! `members` event with the new count (one per room per second at most, and only
//! when the count differs from the last one sent). Joins then cost O(log N) under
//! the room's lock: no per-member work, and `joined` lists the first 100 members.

use super::channel::{Channel, ChannelInner};
use super::{Conn, Hub, lock};
use crate::broker::{RemotePresence, Topic};
use crate::message::ChannelKey;
use crate::protocol::Member;
use crate::protocol::events::{MemberChange, member_event, members_event, typing_event};
use crate::ws::Text;
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

/// One user's presence in one room: small, as a room of 20,000 holds 20,000.
pub(super) struct Presence {
    /// Shared with the user's connection (or made once for a remote user).
    name: Arc<str>,
    /// This node's connections of the user in the room.
    pub(super) conns: u32,
    /// Other node instances that have the user in the room: a handful at most,
    /// and none (no allocation) for a user on this node only.
    remote: Vec<String>,
}

impl Presence {
    fn new(name: Arc<str>) -> Presence {
        Presence {
            name,
            conns: 0,
            remote: Vec::new(),
        }
    }

    fn present(&self) -> bool {
        self.conns > 0 || !self.remote.is_empty()
    }

    /// Take in the other nodes' presence read while a room was loading (nobody
    /// here is in it yet, so there is nobody to tell).
    pub(super) fn adopt_snapshot(g: &mut ChannelInner, remote: RemotePresence) {
        for (user, (name, insts)) in remote {
            let p = g
                .presence
                .entry(Arc::from(user))
                .or_insert_with(|| Presence::new(Arc::from(name)));
            for inst in insts {
                if !p.remote.contains(&inst) {
                    p.remote.push(inst);
                }
            }
        }
        g.announced_count = g.presence.len();
    }
}

/// One page of a room's members: who, how many in all, and where the next starts.
pub struct MembersPage {
    pub members: Vec<Member>,
    pub count: usize,
    pub next: Option<String>,
}

impl ChannelInner {
    /// Up to `limit` members whose user id sorts after `after`, by user id. Every
    /// entry of `presence` is present (entries are removed when they are not).
    pub(super) fn members_page(&self, after: Option<&str>, limit: usize) -> MembersPage {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut range = self
            .presence
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(user, p)| Member {
                user: user.to_string(),
                name: p.name.to_string(),
            });
        let members: Vec<Member> = range.by_ref().take(limit).collect();
        let next = match range.next() {
            Some(_) => members.last().map(|m| m.user.clone()),
            None => None,
        };
        MembersPage {
            members,
            count: self.presence.len(),
            next,
        }
    }

    /// Queue `frame` for every member connection except those of `user` (waking
    /// them, or quietly: it leaves with their next woken frame or at the hub's
    /// next presence tick); returns how many it was queued for.
    fn broadcast_except(&self, user: &str, frame: &Text, wake: Wake) -> u64 {
        let mut n = 0;
        for c in self.members.values() {
            if &*c.user == user {
                continue;
            }
            let queued = match wake {
                Wake::Now => c.send(frame.clone()),
                Wake::Later => c.outbox.push_quiet(frame.clone()),
            };
            if queued {
                n += 1;
            }
        }
        n
    }
}

/// Whether a broadcast wakes its receivers now or lets the frame wait a moment.
#[derive(Clone, Copy)]
enum Wake {
    Now,
    Later,
}

impl Hub {
    /// `conn` became a member of `room`: count it, and announce its user if the user
    /// is new to the room (here and, through the broker, everywhere).
    pub(super) fn presence_arrive(
        &self,
        ch: &Arc<Channel>,
        room: &str,
        g: &mut ChannelInner,
        conn: &Conn,
    ) {
        let before = g.presence.len();
        let p = g
            .presence
            .entry(Arc::clone(&conn.user))
            .or_insert_with(|| Presence::new(Arc::clone(&conn.name)));
        let was_present = p.present();
        p.conns += 1;
        if p.conns == 1 {
            self.broker
                .announce_presence(room, &conn.user, &conn.name, true);
            if !was_present {
                self.tell(|| super::Activity::Member {
                    room: room.to_owned(),
                    user: conn.user.to_string(),
                    name: conn.name.to_string(),
                    join: true,
                });
                self.member_changed(
                    ch,
                    room,
                    g,
                    before,
                    &conn.user,
                    &conn.name,
                    MemberChange::Join,
                );
            }
        }
    }

    /// A user arrived in or left `room` (the room had `before` users): announce it
    /// per user in a room within `--presence-events-max`, else mark the room's
    /// count for the next `members` event.
    #[allow(clippy::too_many_arguments)]
    fn member_changed(
        &self,
        ch: &Arc<Channel>,
        room: &str,
        g: &mut ChannelInner,
        before: usize,
        user: &str,
        name: &str,
        change: MemberChange,
    ) {
        let max = self.options.presence_events_max;
        if before <= max && g.presence.len() <= max {
            if g.announced_count != before {
                // The room was large until now and its clients have not heard its
                // latest count: say it first, so this change applies to the right one.
                let ev = Text::from(members_event(room, before));
                let n = g.broadcast_except("", &ev, Wake::Now);
                self.metrics.out("members", n);
            }
            // Queued quietly: a member event may wait for the next presence tick
            // (`PRESENCE_WAKE_EVERY`), so that a burst of joins costs each member
            // one write instead of one per join. Anything sent to the member
            // meanwhile carries it along, in order.
            let ev = Text::from(member_event(room, user, name, change));
            let n = g.broadcast_except(user, &ev, Wake::Later);
            self.metrics.out("member", n);
            g.announced_count = g.presence.len();
            if !g.wake_pending {
                g.wake_pending = true;
                lock(&self.quiet_rooms).push(ch.clone());
            }
        } else if !g.count_dirty {
            g.count_dirty = true;
            lock(&self.dirty_counts).push(ch.clone());
        }
    }

    /// Wake the members of rooms that got quiet presence events since the last
    /// tick, so that those leave within a tick.
    pub(super) fn wake_quiet_rooms(&self) {
        let rooms = std::mem::take(&mut *lock(&self.quiet_rooms));
        let mut outboxes = Vec::new();
        for ch in rooms {
            // Only the outboxes are collected under the room's lock; the wake-ups
            // (each an outbox lock and maybe a task scheduled) happen outside it.
            {
                let mut g = lock(&ch.inner);
                g.wake_pending = false;
                outboxes.extend(g.members.values().map(|c| Arc::clone(&c.outbox)));
            }
            for o in outboxes.drain(..) {
                o.wake();
            }
        }
    }

    /// Send each large room whose count changed a `members` event (once a second,
    /// from the hub's upkeep).
    pub(super) fn announce_counts(&self) {
        let dirty = std::mem::take(&mut *lock(&self.dirty_counts));
        for ch in dirty {
            let ChannelKey::Room(room) = &ch.key else {
                continue;
            };
            let mut g = lock(&ch.inner);
            g.count_dirty = false;
            let count = g.presence.len();
            if count == g.announced_count {
                continue;
            }
            g.announced_count = count;
            let ev = Text::from(members_event(room, count));
            let n = g.broadcast_except("", &ev, Wake::Now);
            self.metrics.out("members", n);
        }
    }

    /// `conn` is no longer a member of `room`: announce its user's leaving if it was
    /// the user's last connection anywhere.
    pub(super) fn presence_depart(
        &self,
        ch: &Arc<Channel>,
        room: &str,
        g: &mut ChannelInner,
        conn: &Conn,
    ) {
        let before = g.presence.len();
        let (last_here, gone) = match g.presence.get_mut(&conn.user) {
            Some(p) => {
                p.conns = p.conns.saturating_sub(1);
                (p.conns == 0, !p.present())
            }
            None => (false, false),
        };
        if last_here {
            self.broker
                .announce_presence(room, &conn.user, &conn.name, false);
        }
        if gone {
            g.presence.remove(&conn.user);
            self.tell(|| super::Activity::Member {
                room: room.to_owned(),
                user: conn.user.to_string(),
                name: conn.name.to_string(),
                join: false,
            });
            self.member_changed(
                ch,
                room,
                g,
                before,
                &conn.user,
                &conn.name,
                MemberChange::Leave,
            );
        }
    }

    /// A page of `room`'s presence (one entry per user, on every node), by user
    /// id after `after`.
    pub fn presence(&self, room: &str, after: Option<&str>, limit: usize) -> MembersPage {
        let key = ChannelKey::Room(room.to_owned());
        match lock(&self.channels).get(&key).cloned() {
            None => MembersPage {
                members: Vec::new(),
                count: 0,
                next: None,
            },
            Some(ch) => lock(&ch.inner).members_page(after, limit),
        }
    }

    /// Another node's presence news about `room`.
    pub(super) fn on_remote_presence(
        &self,
        room: &str,
        user: &str,
        name: &str,
        inst: &str,
        on: bool,
    ) {
        let key = ChannelKey::Room(room.to_owned());
        let Some(ch) = lock(&self.channels).get(&key).cloned() else {
            return;
        };
        let mut g = lock(&ch.inner);
        g.presence_events += 1;
        self.apply_remote_presence(&ch, room, &mut g, user, name, inst, on);
    }

    /// Node instance `inst` now has (`on`) or no longer has `user` in `room`.
    #[allow(clippy::too_many_arguments)]
    fn apply_remote_presence(
        &self,
        ch: &Arc<Channel>,
        room: &str,
        g: &mut ChannelInner,
        user: &str,
        name: &str,
        inst: &str,
        on: bool,
    ) {
        let before = g.presence.len();
        let p = g
            .presence
            .entry(Arc::from(user))
            .or_insert_with(|| Presence::new(Arc::from(name)));
        let was = p.present();
        if on {
            if !p.remote.iter().any(|i| i == inst) {
                p.remote.push(inst.to_owned());
            }
        } else {
            p.remote.retain(|i| i != inst);
        }
        let now = p.present();
        let name = Arc::clone(&p.name);
        if !now {
            g.presence.remove(user);
        }
        if was != now {
            let change = if now {
                MemberChange::Join
            } else {
                MemberChange::Leave
            };
            self.member_changed(ch, room, g, before, user, &name, change);
        }
    }

    /// Reconcile with the cluster's presence records: the broker refreshes this
    /// node's heartbeat, rewrites this node's records from what it has, drops dead
    /// nodes' records, and this node adopts the live nodes' view (so a dead node's
    /// users leave). Runs every `--node-timeout` / 3, so a dead node's users leave
    /// within 4/3 of it.
    pub(super) async fn reconcile_presence(&self) {
        let rooms: Vec<(String, Arc<super::Channel>)> = lock(&self.channels)
            .iter()
            .filter_map(|(k, ch)| match k {
                ChannelKey::Room(r) if ch.loaded.initialized() => Some((r.clone(), ch.clone())),
                _ => None,
            })
            .collect();
        let mut asked = Vec::with_capacity(rooms.len());
        let mut events_before = HashMap::with_capacity(rooms.len());
        for (room, ch) in &rooms {
            let g = lock(&ch.inner);
            events_before.insert(room.clone(), g.presence_events);
            let here: HashMap<String, String> = g
                .presence
                .iter()
                .filter(|(_, p)| p.conns > 0)
                .map(|(u, p)| (u.to_string(), p.name.to_string()))
                .collect();
            asked.push((room.clone(), here));
        }
        let views = match self.broker.reconcile_presence(asked).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "presence reconciliation failed");
                return;
            }
        };
        let channels: HashMap<String, Arc<super::Channel>> = rooms.into_iter().collect();
        for (room, theirs) in views {
            let Some(ch) = channels.get(&room) else {
                continue;
            };
            let mut g = lock(&ch.inner);
            // Adopt the other nodes' view, unless an event arrived since the snapshot
            // was read (the event is newer; the next pass checks again).
            if events_before.get(&room) != Some(&g.presence_events) {
                continue;
            }
            let known: Vec<(String, Vec<String>)> = g
                .presence
                .iter()
                .filter(|(_, p)| !p.remote.is_empty())
                .map(|(u, p)| (u.to_string(), p.remote.clone()))
                .collect();
            for (user, insts) in known {
                let keep = theirs.get(&user).map(|(_, s)| s);
                for inst in insts {
                    if !keep.is_some_and(|k| k.contains(&inst)) {
                        self.apply_remote_presence(ch, &room, &mut g, &user, "", &inst, false);
                    }
                }
            }
            for (user, (name, insts)) in &theirs {
                for inst in insts {
                    let has = g
                        .presence
                        .get(user.as_str())
                        .is_some_and(|p| p.remote.contains(inst));
                    if !has {
                        self.apply_remote_presence(ch, &room, &mut g, user, name, inst, true);
                    }
                }
            }
        }
    }

    /// Relay a `typing` event to the room's other users (on every node). Never stored.
    pub fn typing(&self, conn: &Conn, room: &str) {
        self.broker.typing(room, &conn.user, &conn.name);
        self.typing_local(room, &conn.user, &conn.name);
    }

    pub(super) fn typing_local(&self, room: &str, user: &str, name: &str) {
        let key = ChannelKey::Room(room.to_owned());
        let Some(ch) = lock(&self.channels).get(&key).cloned() else {
            return;
        };
        let ev = Text::from(typing_event(room, user, name));
        let n = lock(&ch.inner).broadcast_except(user, &ev, Wake::Now);
        self.metrics.out("typing", n);
    }

    /// Release a room's broker subscription (its channel left memory).
    pub(super) fn forget_room(&self, room: &str) {
        self.broker.unsubscribe(Topic::Room(room));
    }
}
