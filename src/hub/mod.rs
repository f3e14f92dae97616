//! The hub: rooms, direct-message pairs, presence and fan-out on this node.
//!
//! Owns: each channel's sequencer (`seq` assignment and `client_id` idempotency),
//! room membership and per-user presence, the registry of connections by user (for
//! DMs), and [`Hub::deliver`], the one local fan-out path that every committed
//! message takes, whether it was sent here or (with a cross-node broker) elsewhere.
//! Must not: do I/O while holding a lock (every lock here is a std `Mutex` held for
//! in-memory work only), or wait on a client: fan-out pushes into bounded
//! [`Outbox`]es and never blocks.
//!
//! Ordering: a channel's `seq` is assigned under its lock and the message is queued
//! for the committer under the same lock, so the committer sees each channel's
//! messages in `seq` order, stores them, and then delivers them in that order.
//! `committed` only moves forward after a message is stored; a `join` reads history
//! up to `committed` from the store and takes anything committed meanwhile from the
//! channel's small in-memory ring, then registers the member under the lock, so the
//! `joined` reply and the live stream that follows it have no gap and no overlap.

mod committer;
pub mod outbox;

pub use committer::Job;
pub use outbox::Outbox;

use crate::broker::Broker;
use crate::metrics::Metrics;
use crate::protocol::{self, CommandError, CommandId, ErrorCode, MAX_RECOVERY, Member, Since};
use crate::store::{ChannelInit, ChannelKey, Store, StoredMessage};
use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OnceCell, mpsc, oneshot};

/// How long a `client_id` makes a resend idempotent.
pub const CLIENT_ID_WINDOW: Duration = Duration::from_secs(600);
/// Committed messages each channel keeps in memory to close the join race.
const RECENT: usize = 64;
/// Jobs the committer may have queued before new sends get `unavailable`.
const JOB_QUEUE: usize = 16384;
/// An idle channel (no members, nothing in flight) is dropped from memory after this.
const IDLE_EVICT: Duration = Duration::from_secs(60);

/// One authenticated connection, as the hub sees it.
pub struct Conn {
    pub id: u64,
    pub user: String,
    pub name: String,
    pub outbox: Arc<Outbox>,
}

impl Conn {
    /// Queue a frame for this connection; false if its queue has overflowed.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        self.outbox.push(frame)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here do not leave half-updated state behind a panic that
    // matters more than stopping the whole server would, so keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A room or a DM pair in memory.
pub struct Channel {
    key: ChannelKey,
    loaded: OnceCell<()>,
    inner: Mutex<ChannelInner>,
}

struct Presence {
    name: String,
    conns: usize,
}

struct ChannelInner {
    /// The next `seq` to assign.
    next_seq: u64,
    /// The last `seq` stored and delivered.
    committed: u64,
    recent: VecDeque<Arc<StoredMessage>>,
    members: HashMap<u64, Arc<Conn>>,
    presence: HashMap<String, Presence>,
    /// (user, client_id) -> (seq, ts), for idempotent resends.
    client_ids: HashMap<(String, String), (u64, i64)>,
    client_id_order: VecDeque<(i64, String, String)>,
    /// Set when the channel was dropped from the hub's map; holders must look again.
    evicted: bool,
    last_active: Instant,
}

impl ChannelInner {
    fn apply_init(&mut self, init: ChannelInit) {
        self.next_seq = init.last_seq + 1;
        self.committed = init.last_seq;
        let mut ids = init.client_ids;
        ids.sort_by_key(|(_, _, seq, _)| *seq);
        for (user, cid, seq, ts) in ids {
            self.remember_client_id(user, cid, seq, ts);
        }
    }

    fn remember_client_id(&mut self, user: String, cid: String, seq: u64, ts: i64) {
        self.client_id_order
            .push_back((ts, user.clone(), cid.clone()));
        self.client_ids.insert((user, cid), (seq, ts));
    }

    fn prune_client_ids(&mut self, now_ms: i64) {
        let horizon = now_ms - i64::try_from(CLIENT_ID_WINDOW.as_millis()).unwrap_or(i64::MAX);
        while let Some((ts, _, _)) = self.client_id_order.front() {
            if *ts >= horizon {
                break;
            }
            if let Some((ts, user, cid)) = self.client_id_order.pop_front() {
                let key = (user, cid);
                if self.client_ids.get(&key).is_some_and(|(_, t)| *t == ts) {
                    self.client_ids.remove(&key);
                }
            }
        }
    }

    fn members_list(&self) -> Vec<Member> {
        let mut v: Vec<Member> = self
            .presence
            .iter()
            .map(|(user, p)| Member {
                user: user.clone(),
                name: p.name.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.user.cmp(&b.user));
        v
    }

    /// Send `frame` to every member connection except those of `user`; returns how
    /// many it was queued for.
    fn broadcast_except(&self, user: &str, frame: &Utf8Bytes) -> u64 {
        let mut n = 0;
        for c in self.members.values() {
            if c.user != user && c.send(frame.clone()) {
                n += 1;
            }
        }
        n
    }
}

#[derive(Serialize)]
struct MemberEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    user: &'a str,
    name: &'a str,
    event: &'static str,
}

/// `{"type":"member",...}` about `conn`'s user, encoded once for every receiver.
fn member_event(room: &str, conn: &Conn, event: &'static str) -> Utf8Bytes {
    Utf8Bytes::from(protocol::encode(&MemberEvent {
        kind: "member",
        room,
        user: &conn.user,
        name: &conn.name,
        event,
    }))
}

#[derive(Serialize)]
struct Joined<'a> {
    room: &'a str,
    epoch: &'a str,
    seq: u64,
    members: Vec<Member>,
    messages: Vec<protocol_message::Raw<'a>>,
    recovered: bool,
}

/// Messages embedded in replies, each serialized as its `message` event.
mod protocol_message {
    use crate::store::StoredMessage;
    use serde::{Serialize, Serializer};

    pub struct Raw<'a> {
        pub msg: &'a StoredMessage,
        pub viewer: &'a str,
    }

    impl Serialize for Raw<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.msg.event(self.viewer).serialize(s)
        }
    }
}

pub use protocol_message::Raw as MessageRef;

/// What a `send` or `direct` asks the hub to store and deliver.
pub struct Outgoing {
    pub text: String,
    pub meta: Option<Box<serde_json::value::RawValue>>,
    pub client_id: Option<String>,
}

pub struct Hub {
    channels: Mutex<HashMap<ChannelKey, Arc<Channel>>>,
    /// Connections by user id: DM delivery goes to all of a user's connections.
    users: Mutex<HashMap<String, Vec<Arc<Conn>>>>,
    store: Arc<Store>,
    jobs: mpsc::Sender<Job>,
    broker: Broker,
    metrics: Metrics,
    /// Set while store commits are failing (and being retried); `/readyz` shows it.
    store_failing: AtomicBool,
}

impl Hub {
    /// Create the hub and start its committer task.
    pub fn start(
        store: Arc<Store>,
        broker: Broker,
        metrics: Metrics,
    ) -> (Arc<Hub>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let hub = Arc::new(Hub {
            channels: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            store: store.clone(),
            jobs: tx,
            broker,
            metrics: metrics.clone(),
            store_failing: AtomicBool::new(false),
        });
        let task = tokio::spawn(committer::run(rx, store, hub.clone(), metrics));
        (hub, task)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn store_failing(&self) -> bool {
        self.store_failing
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop the committer after everything queued before this call is stored and
    /// delivered.
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves once every message submitted before this call is stored, delivered
    /// and acked.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn register(&self, conn: &Arc<Conn>) {
        let mut users = lock(&self.users);
        let conns = users.entry(conn.user.clone()).or_default();
        if conns.is_empty() {
            self.metrics.users.increment(1.0);
        }
        conns.push(conn.clone());
    }

    /// Forget a connection: leave its rooms (with `member leave` where it was the
    /// user's last connection) and drop it from the user registry.
    pub fn unregister(&self, conn: &Arc<Conn>, rooms: impl IntoIterator<Item = String>) {
        for room in rooms {
            self.leave(conn, &room);
        }
        let mut users = lock(&self.users);
        if let Some(v) = users.get_mut(&conn.user) {
            v.retain(|c| c.id != conn.id);
            if v.is_empty() {
                users.remove(&conn.user);
                self.metrics.users.decrement(1.0);
            }
        }
    }

    /// The channel for `key`, loaded from the store on first use.
    async fn channel(&self, key: &ChannelKey) -> Result<Arc<Channel>, CommandError> {
        let ch = lock(&self.channels)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Channel {
                    key: key.clone(),
                    loaded: OnceCell::new(),
                    inner: Mutex::new(ChannelInner {
                        next_seq: 1,
                        committed: 0,
                        recent: VecDeque::new(),
                        members: HashMap::new(),
                        presence: HashMap::new(),
                        client_ids: HashMap::new(),
                        client_id_order: VecDeque::new(),
                        evicted: false,
                        last_active: Instant::now(),
                    }),
                })
            })
            .clone();
        ch.loaded
            .get_or_try_init(|| async {
                let since = now_ms() - i64::try_from(CLIENT_ID_WINDOW.as_millis()).unwrap_or(0);
                let init = self.store.load_channel(key, since).await.map_err(|e| {
                    tracing::error!(error = %e, "loading channel state failed");
                    CommandError::new(ErrorCode::Unavailable, "history store unavailable")
                })?;
                lock(&ch.inner).apply_init(init);
                Ok::<(), CommandError>(())
            })
            .await?;
        Ok(ch)
    }

    /// Sequence a message and hand it to the committer. The `ack` (and the delivery
    /// to every receiver) follow once it is stored.
    pub async fn submit(
        &self,
        conn: &Arc<Conn>,
        id: Option<CommandId>,
        key: ChannelKey,
        out: Outgoing,
    ) -> Result<(), CommandError> {
        // Reserve queue space first: a full committer queue is refused here, before a
        // seq is taken, so a refusal can never leave a gap in the sequence.
        let permit = self.jobs.try_reserve().map_err(|_| {
            CommandError::new(
                ErrorCode::Unavailable,
                "server is overloaded; retry shortly",
            )
        })?;
        loop {
            let ch = self.channel(&key).await?;
            let mut g = lock(&ch.inner);
            if g.evicted {
                continue;
            }
            let ts = now_ms();
            g.last_active = Instant::now();
            g.prune_client_ids(ts);
            let known = out
                .client_id
                .as_ref()
                .and_then(|cid| g.client_ids.get(&(conn.user.clone(), cid.clone())).copied());
            if let Some((seq, ts)) = known {
                permit.send(Job::Ack {
                    conn: conn.clone(),
                    id,
                    key: key.clone(),
                    seq,
                    ts,
                });
                return Ok(());
            }
            let seq = g.next_seq;
            g.next_seq += 1;
            if let Some(cid) = &out.client_id {
                g.remember_client_id(conn.user.clone(), cid.clone(), seq, ts);
            }
            let msg = Arc::new(StoredMessage {
                channel: key.clone(),
                seq,
                ts,
                from: conn.user.clone(),
                name: conn.name.clone(),
                text: out.text,
                meta: out.meta,
                client_id: out.client_id,
            });
            // Queued while the lock is held (the permit makes this a plain push, no
            // await), so the committer sees this channel's messages in seq order.
            permit.send(Job::Append {
                channel: ch.clone(),
                msg,
                reply: Some((conn.clone(), id)),
            });
            drop(g);
            return Ok(());
        }
    }

    /// Deliver a stored message to every local receiver, in `seq` order. The single
    /// fan-out path: local sends and (later) broker deliveries both end here.
    pub fn deliver(&self, ch: &Channel, msg: &Arc<StoredMessage>) {
        let mut g = lock(&ch.inner);
        if msg.seq <= g.committed {
            return; // already delivered (a duplicate from the broker)
        }
        g.committed = msg.seq;
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back(msg.clone());
        match &ch.key {
            ChannelKey::Room(_) => {
                let frame = Utf8Bytes::from(protocol::encode(&msg.event("")));
                let mut refused = 0u64;
                for c in g.members.values() {
                    if !c.send(frame.clone()) {
                        refused += 1;
                    }
                }
                let n = g.members.len() as u64;
                drop(g);
                self.metrics.deliveries.increment(n - refused);
                self.metrics.out("message", n - refused);
                self.metrics.dropped_deliveries.increment(refused);
            }
            ChannelKey::Dm(a, b) => {
                drop(g);
                let users = lock(&self.users);
                let mut n = 0u64;
                for viewer in [a, b] {
                    let Some(conns) = users.get(viewer) else {
                        continue;
                    };
                    let frame = Utf8Bytes::from(protocol::encode(&msg.event(viewer)));
                    for c in conns {
                        if c.send(frame.clone()) {
                            n += 1;
                        }
                    }
                }
                drop(users);
                self.metrics.deliveries.increment(n);
                self.metrics.out("message", n);
            }
        }
    }

    /// Join `room`: register the member and queue the `joined` reply (with the
    /// missed or latest messages) ahead of any live message that follows it.
    pub async fn join(
        &self,
        conn: &Arc<Conn>,
        id: Option<&CommandId>,
        room: &str,
        since: Option<Since>,
        history: u64,
    ) -> Result<(), CommandError> {
        let key = ChannelKey::Room(room.to_owned());
        let epoch = self.store.epoch();
        loop {
            let ch = self.channel(&key).await?;
            let s0 = {
                let g = lock(&ch.inner);
                if g.evicted {
                    continue;
                }
                g.committed
            };
            // Recovery is possible when the client's history is ours and not too old.
            let from = since
                .as_ref()
                .filter(|s| s.epoch == epoch && s.seq <= s0 && s0 - s.seq <= MAX_RECOVERY)
                .map(|s| s.seq);
            let mut msgs = match from {
                Some(after) => self.store.range(&key, after, s0).await,
                None => self.store.latest(&key, Some(s0 + 1), history).await,
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
            let recovered = from.is_some_and(|after| {
                s1 - after <= MAX_RECOVERY
                    && msgs.len() as u64 == s1 - after
                    && msgs.first().is_none_or(|m| m.seq == after + 1)
            });
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
                let p = g.presence.entry(conn.user.clone()).or_insert(Presence {
                    name: conn.name.clone(),
                    conns: 0,
                });
                p.conns += 1;
                if p.conns == 1 {
                    let ev = member_event(room, conn, "join");
                    let n = g.broadcast_except(&conn.user, &ev);
                    self.metrics.out("member", n);
                }
            }
            self.metrics.out("reply", 1);
            let reply = protocol::reply(
                "joined",
                id,
                Joined {
                    room,
                    epoch,
                    seq: s1,
                    members: g.members_list(),
                    messages: msgs
                        .iter()
                        .map(|m| MessageRef {
                            msg: m,
                            viewer: &conn.user,
                        })
                        .collect(),
                    recovered,
                },
            );
            conn.send(reply.into());
            return Ok(());
        }
    }

    /// Remove `conn` from `room`; `member leave` to the others if it was the user's
    /// last connection there. Returns whether it was a member.
    pub fn leave(&self, conn: &Arc<Conn>, room: &str) -> bool {
        let key = ChannelKey::Room(room.to_owned());
        let Some(ch) = lock(&self.channels).get(&key).cloned() else {
            return false;
        };
        let mut g = lock(&ch.inner);
        if g.members.remove(&conn.id).is_none() {
            return false;
        }
        g.last_active = Instant::now();
        self.metrics.room_members.decrement(1.0);
        if g.members.is_empty() {
            self.metrics.rooms.decrement(1.0);
        }
        let last = match g.presence.get_mut(&conn.user) {
            Some(p) => {
                p.conns -= 1;
                p.conns == 0
            }
            None => false,
        };
        if last {
            g.presence.remove(&conn.user);
            let ev = member_event(room, conn, "leave");
            let n = g.broadcast_except(&conn.user, &ev);
            self.metrics.out("member", n);
        }
        true
    }

    /// The presence list of `room` (one entry per user).
    pub fn presence(&self, room: &str) -> Vec<Member> {
        let key = ChannelKey::Room(room.to_owned());
        match lock(&self.channels).get(&key).cloned() {
            None => Vec::new(),
            Some(ch) => lock(&ch.inner).members_list(),
        }
    }

    /// Relay a `typing` event to the room's other users. Never stored.
    pub fn typing(&self, conn: &Arc<Conn>, room: &str) {
        let key = ChannelKey::Room(room.to_owned());
        let Some(ch) = lock(&self.channels).get(&key).cloned() else {
            return;
        };
        #[derive(Serialize)]
        struct Typing<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            room: &'a str,
            user: &'a str,
            name: &'a str,
        }
        let ev = Utf8Bytes::from(protocol::encode(&Typing {
            kind: "typing",
            room,
            user: &conn.user,
            name: &conn.name,
        }));
        let n = lock(&ch.inner).broadcast_except(&conn.user, &ev);
        self.metrics.out("typing", n);
    }

    /// Stored messages of a channel, newest `limit` before `before`, ascending.
    pub async fn history(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, CommandError> {
        self.store.latest(key, before, limit).await.map_err(|e| {
            tracing::error!(error = %e, "reading history failed");
            CommandError::new(ErrorCode::Unavailable, "history store unavailable")
        })
    }

    /// Drop idle channels from memory (no members, nothing in flight, quiet for a
    /// minute). Their state is reloaded from the store on next use.
    pub fn sweep(&self) {
        let mut map = lock(&self.channels);
        map.retain(|_, ch| {
            let Ok(mut g) = ch.inner.try_lock() else {
                return true;
            };
            let idle = g.members.is_empty()
                && g.next_seq == g.committed + 1
                && ch.loaded.initialized()
                && g.last_active.elapsed() >= IDLE_EVICT;
            if idle {
                g.evicted = true;
            }
            !idle
        });
    }
}
