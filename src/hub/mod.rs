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
//! Ordering on one node: a channel's `seq` is assigned under its lock and the
//! message is queued for the committer under the same lock, so the committer sees
//! each channel's messages in `seq` order, stores them, and then delivers them in
//! that order. With several nodes the shared store assigns `seq` at commit, and
//! messages arrive from the broker in whatever order the nodes published them, so
//! [`Hub::deliver`] delivers strictly in `seq` order: a message ahead of the next
//! expected `seq` waits in the channel's `pending` buffer while the missing ones are
//! read from the store (a gap: a broadcast that was lost, or is merely late), and a
//! periodic catch-up compares each channel with the store so that even the last
//! message of a burst is never missed. `committed` is the last `seq` delivered here.
//!
//! A `join` reads history up to `committed` from the store and takes anything
//! delivered meanwhile from the channel's small in-memory ring, then registers the
//! member under the lock, so the `joined` reply and the live stream that follows it
//! have no gap and no overlap.
//!
//! Presence is per user, cluster-wide: a room's presence entry for a user counts the
//! user's connections here and names the other node instances that have the user in
//! the room. `member join`/`leave` fire when a user becomes present anywhere or is
//! gone everywhere, so every node announces each user once.

mod committer;
pub mod outbox;

pub use committer::Job;
pub use outbox::Outbox;

use crate::broker::{Broker, Envelope, Kind, room_channel, user_channel};
use crate::metrics::Metrics;
use crate::protocol::{self, CommandError, CommandId, ErrorCode, MAX_RECOVERY, Member, Since};
use crate::store::{ChannelInit, ChannelKey, Store, StoredMessage};
use crate::ws::Text;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
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
/// Messages held back per channel while a gap before them is filled; more are
/// dropped from the buffer and read from the store with the gap.
const MAX_PENDING: usize = 4096;
/// How long a gap may be just a late broadcast before the store is asked.
const GAP_GRACE: Duration = Duration::from_millis(25);
/// Messages read from the store per gap-filling query.
const FILL_PAGE: u64 = 1000;

/// One authenticated connection, as the hub sees it.
pub struct Conn {
    pub id: u64,
    pub user: String,
    pub name: String,
    pub outbox: Arc<Outbox>,
}

impl Conn {
    /// Queue a frame for this connection; false if its queue has overflowed.
    pub fn send(&self, frame: Text) -> bool {
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
    /// This node's connections of the user in the room.
    conns: usize,
    /// Other node instances that have the user in the room.
    remote: HashSet<String>,
}

impl Presence {
    fn present(&self) -> bool {
        self.conns > 0 || !self.remote.is_empty()
    }
}

struct ChannelInner {
    /// The next `seq` to assign (single node only).
    next_seq: u64,
    /// The last `seq` delivered on this node (stored, in order, nothing missing).
    committed: u64,
    /// Is `committed` known? (A DM pair first seen from the broker starts at the
    /// first message it sees.) Messages before that wait in `pending`.
    anchored: bool,
    /// Messages that arrived ahead of `committed + 1`, waiting for the gap to close.
    pending: BTreeMap<u64, Arc<StoredMessage>>,
    /// The highest `seq` known to exist (seen from the broker or the store).
    highest_seen: u64,
    /// A gap-filling task is running for this channel.
    filling: bool,
    /// Presence events applied from other nodes so far: a reconciliation whose
    /// snapshot is older than the latest event does not overwrite it.
    presence_events: u64,
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
        self.highest_seen = self.highest_seen.max(init.last_seq);
        self.anchored = true;
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
            .filter(|(_, p)| p.present())
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
    fn broadcast_except(&self, user: &str, frame: &Text) -> u64 {
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

/// `{"type":"member",...}` about `user`, encoded once for every receiver.
fn member_event(room: &str, user: &str, name: &str, event: &'static str) -> Text {
    Text::from(protocol::encode(&MemberEvent {
        kind: "member",
        room,
        user,
        name,
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
    pub(crate) broker: Broker,
    metrics: Metrics,
    /// Set while store commits are failing (and being retried); `/readyz` shows it.
    store_failing: AtomicBool,
    /// The store numbers messages (several nodes share it); see the module doc.
    sequenced_by_store: bool,
}

fn new_channel(key: &ChannelKey) -> Arc<Channel> {
    Arc::new(Channel {
        key: key.clone(),
        loaded: OnceCell::new(),
        inner: Mutex::new(ChannelInner {
            next_seq: 1,
            committed: 0,
            anchored: false,
            pending: BTreeMap::new(),
            highest_seen: 0,
            filling: false,
            presence_events: 0,
            recent: VecDeque::new(),
            members: HashMap::new(),
            presence: HashMap::new(),
            client_ids: HashMap::new(),
            client_id_order: VecDeque::new(),
            evicted: false,
            last_active: Instant::now(),
        }),
    })
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
            sequenced_by_store: store.sequences(),
            store: store.clone(),
            jobs: tx,
            broker,
            metrics: metrics.clone(),
            store_failing: AtomicBool::new(false),
        });
        if let Some(redis) = hub.broker.redis() {
            let weak = Arc::downgrade(&hub);
            redis.set_sink(move |env| {
                if let Some(hub) = weak.upgrade() {
                    hub.on_envelope(env);
                }
            });
        }
        let task = tokio::spawn(committer::run(rx, store, hub.clone(), metrics));
        (hub, task)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn store_failing(&self) -> bool {
        self.store_failing
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn sequenced_by_store(&self) -> bool {
        self.sequenced_by_store
    }

    /// This node instance's name on the broker ("" on a single node).
    fn instance(&self) -> &str {
        self.broker.redis().map_or("", |r| r.instance())
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

    /// Make `conn` reachable for direct messages (on every node, with a broker: the
    /// user's channel is subscribed before this returns).
    pub async fn register(&self, conn: &Arc<Conn>) {
        if let Some(redis) = self.broker.redis() {
            redis.subscribe(user_channel(&conn.user)).await;
        }
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
        drop(users);
        if let Some(redis) = self.broker.redis() {
            redis.unsubscribe(&user_channel(&conn.user));
        }
    }

    /// The channel for `key`, loaded on first use. With a broker, a room's channel is
    /// subscribed first and its cluster presence read, then its last `seq`, so
    /// nothing published after the load can be missed.
    async fn channel(self: &Arc<Self>, key: &ChannelKey) -> Result<Arc<Channel>, CommandError> {
        let ch = lock(&self.channels)
            .entry(key.clone())
            .or_insert_with(|| new_channel(key))
            .clone();
        ch.loaded
            .get_or_try_init(|| async {
                if self.sequenced_by_store && matches!(key, ChannelKey::Dm(..)) {
                    // A DM pair is anchored by the first message delivered here.
                    return Ok(());
                }
                let mut remote = Vec::new();
                if let (Some(redis), ChannelKey::Room(room)) = (self.broker.redis(), key) {
                    redis.subscribe(room_channel(room)).await;
                    match redis.presence_of(room).await {
                        Ok(entries) => remote = entries,
                        Err(e) => tracing::warn!(error = %e, "reading room presence failed"),
                    }
                }
                let since = now_ms() - i64::try_from(CLIENT_ID_WINDOW.as_millis()).unwrap_or(0);
                let init = self.store.load_channel(key, since).await.map_err(|e| {
                    tracing::error!(error = %e, "loading channel state failed");
                    // The next attempt subscribes again: release this one's hold.
                    if let (Some(redis), ChannelKey::Room(room)) = (self.broker.redis(), key) {
                        redis.unsubscribe(&room_channel(room));
                    }
                    CommandError::new(ErrorCode::Unavailable, "history store unavailable")
                })?;
                let mut g = lock(&ch.inner);
                g.apply_init(init);
                let me = self.instance();
                for (inst, user, name) in remote {
                    if inst != me {
                        g.presence
                            .entry(user)
                            .or_insert(Presence {
                                name,
                                conns: 0,
                                remote: HashSet::new(),
                            })
                            .remote
                            .insert(inst);
                    }
                }
                // Anything that arrived from the broker during the load.
                self.advance(&ch, &mut g);
                Ok::<(), CommandError>(())
            })
            .await?;
        Ok(ch)
    }

    /// Sequence a message (or, with a shared store, leave that to the commit) and hand
    /// it to the committer. The `ack` and the delivery follow once it is stored.
    pub async fn submit(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        id: Option<CommandId>,
        key: ChannelKey,
        out: Outgoing,
    ) -> Result<(), CommandError> {
        if !self.broker.healthy() {
            // Never ack what could not be published: refuse before storing.
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the message broker (Redis) is unreachable; retry shortly",
            ));
        }
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
            let seq = if self.sequenced_by_store {
                0 // numbered, and checked for a repeated client_id, inside the commit
            } else {
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
                seq
            };
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
    /// fan-out path: local commits, broker envelopes and gap fills all end here.
    /// Duplicates are dropped; a message ahead of a gap waits for the gap to close.
    pub fn deliver(self: &Arc<Self>, ch: &Arc<Channel>, msg: &Arc<StoredMessage>) {
        let mut g = lock(&ch.inner);
        if !g.anchored {
            if self.sequenced_by_store && matches!(ch.key, ChannelKey::Dm(..)) {
                g.committed = msg.seq - 1;
                g.anchored = true;
            } else {
                // The channel is loading; the loader delivers what waits here.
                if g.pending.len() < MAX_PENDING {
                    g.pending.insert(msg.seq, msg.clone());
                }
                g.highest_seen = g.highest_seen.max(msg.seq);
                return;
            }
        }
        if msg.seq <= g.committed {
            return; // already delivered
        }
        g.highest_seen = g.highest_seen.max(msg.seq);
        if msg.seq > g.committed + 1 {
            if g.pending.len() < MAX_PENDING {
                g.pending.insert(msg.seq, msg.clone());
            }
            self.start_fill(ch, &mut g);
            return;
        }
        self.fan_out(ch, &mut g, msg);
        self.advance(ch, &mut g);
    }

    /// Deliver what waits in `pending` now that it is next, and start filling if a
    /// gap remains.
    fn advance(self: &Arc<Self>, ch: &Arc<Channel>, g: &mut MutexGuard<'_, ChannelInner>) {
        loop {
            let committed = g.committed;
            // Drop what was delivered meanwhile.
            while g
                .pending
                .first_key_value()
                .is_some_and(|(s, _)| *s <= committed)
            {
                g.pending.pop_first();
            }
            match g.pending.first_key_value() {
                Some((&s, _)) if s == committed + 1 => {
                    if let Some((_, m)) = g.pending.pop_first() {
                        self.fan_out(ch, g, &m);
                    }
                }
                _ => break,
            }
        }
        if g.highest_seen > g.committed && g.anchored {
            self.start_fill(ch, g);
        }
    }

    /// Start reading a gap from the store, unless that is already under way.
    fn start_fill(self: &Arc<Self>, ch: &Arc<Channel>, g: &mut MutexGuard<'_, ChannelInner>) {
        if g.filling {
            return;
        }
        g.filling = true;
        self.metrics.gaps_detected.increment(1);
        let hub = self.clone();
        let ch = ch.clone();
        tokio::spawn(async move { hub.fill_gap(ch).await });
    }

    /// Read missing messages from the store and deliver them, until `committed`
    /// reaches the highest `seq` known to exist.
    async fn fill_gap(self: Arc<Self>, ch: Arc<Channel>) {
        tokio::time::sleep(GAP_GRACE).await;
        let mut backoff = Duration::from_millis(50);
        loop {
            let (after, upto) = {
                let mut g = lock(&ch.inner);
                if g.committed >= g.highest_seen {
                    g.filling = false;
                    self.metrics.gaps_filled.increment(1);
                    return;
                }
                let upto = g.highest_seen.min(g.committed + FILL_PAGE);
                (g.committed, upto)
            };
            match self.store.range(&ch.key, after, upto).await {
                Ok(msgs) if !msgs.is_empty() => {
                    for m in &msgs {
                        self.deliver(&ch, m);
                    }
                    // Counted as how far `committed` moved, at most the messages read.
                    let moved = lock(&ch.inner).committed.saturating_sub(after);
                    self.metrics
                        .gap_messages
                        .increment(moved.min(msgs.len() as u64));
                    backoff = Duration::from_millis(50);
                }
                Ok(_) => {
                    // Known to exist but not readable yet: try again shortly.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "filling a gap from the store failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Send one message (the next in order) to this node's receivers.
    fn fan_out(
        &self,
        ch: &Channel,
        g: &mut MutexGuard<'_, ChannelInner>,
        msg: &Arc<StoredMessage>,
    ) {
        g.committed = msg.seq;
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back(msg.clone());
        match &ch.key {
            ChannelKey::Room(_) => {
                let frame = Text::from(protocol::encode(&msg.event("")));
                let mut refused = 0u64;
                for c in g.members.values() {
                    if !c.send(frame.clone()) {
                        refused += 1;
                    }
                }
                let n = g.members.len() as u64;
                self.metrics.deliveries.increment(n - refused);
                self.metrics.out("message", n - refused);
                self.metrics.dropped_deliveries.increment(refused);
            }
            ChannelKey::Dm(a, b) => {
                // Lock order: channel, then users (nothing takes them the other way).
                let users = lock(&self.users);
                let mut n = 0u64;
                for viewer in [a, b] {
                    let Some(conns) = users.get(viewer) else {
                        continue;
                    };
                    let frame = Text::from(protocol::encode(&msg.event(viewer)));
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
        self: &Arc<Self>,
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
                    remote: HashSet::new(),
                });
                let was_present = p.present();
                p.conns += 1;
                if p.conns == 1 {
                    if let Some(redis) = self.broker.redis() {
                        redis.presence(room, &conn.user, &conn.name, true);
                    }
                    if !was_present {
                        let ev = member_event(room, &conn.user, &conn.name, "join");
                        let n = g.broadcast_except(&conn.user, &ev);
                        self.metrics.out("member", n);
                    }
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
    /// last connection there (on every node). Returns whether it was a member.
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
        let (last_here, gone) = match g.presence.get_mut(&conn.user) {
            Some(p) => {
                p.conns = p.conns.saturating_sub(1);
                (p.conns == 0, !p.present())
            }
            None => (false, false),
        };
        if last_here && let Some(redis) = self.broker.redis() {
            redis.presence(room, &conn.user, &conn.name, false);
        }
        if gone {
            g.presence.remove(&conn.user);
            let ev = member_event(room, &conn.user, &conn.name, "leave");
            let n = g.broadcast_except(&conn.user, &ev);
            self.metrics.out("member", n);
        }
        true
    }

    /// The presence list of `room` (one entry per user, on every node).
    pub fn presence(&self, room: &str) -> Vec<Member> {
        let key = ChannelKey::Room(room.to_owned());
        match lock(&self.channels).get(&key).cloned() {
            None => Vec::new(),
            Some(ch) => lock(&ch.inner).members_list(),
        }
    }

    /// Relay a `typing` event to the room's other users (on every node). Never stored.
    pub fn typing(&self, conn: &Arc<Conn>, room: &str) {
        if let Some(redis) = self.broker.redis() {
            redis.typing(room, &conn.user, &conn.name);
        }
        self.typing_local(room, &conn.user, &conn.name);
    }

    fn typing_local(&self, room: &str, user: &str, name: &str) {
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
        let ev = Text::from(protocol::encode(&Typing {
            kind: "typing",
            room,
            user,
            name,
        }));
        let n = lock(&ch.inner).broadcast_except(user, &ev);
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

    /// Something another node published: a stored message, a presence change or a
    /// typing event. Runs on the broker connection's reader: must not block.
    pub fn on_envelope(self: &Arc<Self>, env: Envelope) {
        match env.k {
            Kind::Message => {
                let Some(msg) = env.into_message() else {
                    return;
                };
                let ch = {
                    let mut map = lock(&self.channels);
                    match (&msg.channel, map.get(&msg.channel)) {
                        (_, Some(ch)) => ch.clone(),
                        // A room nobody here is in: not subscribed any more.
                        (ChannelKey::Room(_), None) => return,
                        (ChannelKey::Dm(..), None) => {
                            let ch = new_channel(&msg.channel);
                            let _ = ch.loaded.set(());
                            map.insert(msg.channel.clone(), ch.clone());
                            ch
                        }
                    }
                };
                self.deliver(&ch, &Arc::new(msg));
            }
            Kind::Join | Kind::Leave => {
                if env.n == self.instance() {
                    return;
                }
                let key = ChannelKey::Room(env.c.clone());
                let Some(ch) = lock(&self.channels).get(&key).cloned() else {
                    return;
                };
                let mut g = lock(&ch.inner);
                g.presence_events += 1;
                self.apply_remote_presence(
                    &env.c,
                    &mut g,
                    &env.from,
                    &env.name,
                    &env.n,
                    env.k == Kind::Join,
                );
            }
            Kind::Typing => {
                if env.n != self.instance() {
                    self.typing_local(&env.c, &env.from, &env.name);
                }
            }
        }
    }

    /// Node instance `inst` now has (`on`) or no longer has `user` in `room`.
    fn apply_remote_presence(
        &self,
        room: &str,
        g: &mut MutexGuard<'_, ChannelInner>,
        user: &str,
        name: &str,
        inst: &str,
        on: bool,
    ) {
        let p = g.presence.entry(user.to_owned()).or_insert(Presence {
            name: name.to_owned(),
            conns: 0,
            remote: HashSet::new(),
        });
        let was = p.present();
        if on {
            p.remote.insert(inst.to_owned());
        } else {
            p.remote.remove(inst);
        }
        let now = p.present();
        let name = p.name.clone();
        if !now {
            g.presence.remove(user);
        }
        if was != now {
            let ev = member_event(room, user, &name, if now { "join" } else { "leave" });
            let n = g.broadcast_except(user, &ev);
            self.metrics.out("member", n);
        }
    }

    /// With a shared store: compare every channel in memory with the store's last
    /// `seq` and fill what this node has not seen (a lost or late broadcast, above
    /// all the last one of a burst, which no later message would reveal).
    pub async fn catch_up(self: &Arc<Self>) {
        if !self.sequenced_by_store {
            return;
        }
        let chans: Vec<Arc<Channel>> = lock(&self.channels)
            .values()
            .filter(|ch| ch.loaded.initialized())
            .cloned()
            .collect();
        for chunk in chans.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|c| c.key.storage_key()).collect();
            let last = match self.store.last_seqs(&keys).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up query failed");
                    return;
                }
            };
            let last: HashMap<String, u64> = last.into_iter().collect();
            for (ch, key) in chunk.iter().zip(&keys) {
                let Some(&seq) = last.get(key) else {
                    continue;
                };
                let mut g = lock(&ch.inner);
                if g.anchored && seq > g.committed {
                    g.highest_seen = g.highest_seen.max(seq);
                    self.start_fill(ch, &mut g);
                }
            }
        }
    }

    /// With a broker: refresh this node's heartbeat, make the presence hashes match
    /// this node's members, and adopt what the other live nodes have (dropping the
    /// entries of dead ones, whose users thereby leave). Runs every
    /// `--node-timeout` / 3, so a dead node's users leave within 4/3 of it.
    pub async fn reconcile_presence(&self) {
        let Some(redis) = self.broker.redis() else {
            return;
        };
        if let Err(e) = redis.heartbeat().await {
            tracing::warn!(error = %e, "node heartbeat failed");
            return;
        }
        let me = redis.instance().to_owned();
        let rooms: Vec<(String, Arc<Channel>)> = lock(&self.channels)
            .iter()
            .filter_map(|(k, ch)| match k {
                ChannelKey::Room(r) if ch.loaded.initialized() => Some((r.clone(), ch.clone())),
                _ => None,
            })
            .collect();
        let mut alive: HashMap<String, bool> = HashMap::new();
        for (room, ch) in rooms {
            let events_before = lock(&ch.inner).presence_events;
            let entries = match redis.presence_of(&room).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading room presence failed");
                    return;
                }
            };
            let mut theirs: HashMap<String, (String, HashSet<String>)> = HashMap::new();
            let mut mine: HashSet<String> = HashSet::new();
            for (inst, user, name) in entries {
                if inst == me {
                    mine.insert(user);
                    continue;
                }
                let live = match alive.get(&inst) {
                    Some(&l) => l,
                    None => {
                        let l = redis.alive(&inst).await.unwrap_or(true);
                        alive.insert(inst.clone(), l);
                        l
                    }
                };
                if live {
                    theirs
                        .entry(user)
                        .or_insert_with(|| (name, HashSet::new()))
                        .1
                        .insert(inst);
                } else {
                    // A dead node's entry: remove it for everyone.
                    let _ = redis.presence_set(&room, &inst, &user, "", false).await;
                }
            }
            // This node's own entries: write what is missing, remove what is stale.
            let (add, remove) = {
                let g = lock(&ch.inner);
                let here: HashMap<String, String> = g
                    .presence
                    .iter()
                    .filter(|(_, p)| p.conns > 0)
                    .map(|(u, p)| (u.clone(), p.name.clone()))
                    .collect();
                let add: Vec<(String, String)> = here
                    .iter()
                    .filter(|(u, _)| !mine.contains(*u))
                    .map(|(u, n)| (u.clone(), n.clone()))
                    .collect();
                let remove: Vec<String> = mine
                    .iter()
                    .filter(|u| !here.contains_key(*u))
                    .cloned()
                    .collect();
                (add, remove)
            };
            for (user, name) in add {
                let _ = redis.presence_set(&room, &me, &user, &name, true).await;
            }
            for user in remove {
                let _ = redis.presence_set(&room, &me, &user, "", false).await;
            }
            // Adopt the other nodes' view, unless an event arrived since the snapshot
            // was read (the event is newer; the next pass checks again).
            let mut g = lock(&ch.inner);
            if g.presence_events != events_before {
                continue;
            }
            let known: Vec<(String, Vec<String>)> = g
                .presence
                .iter()
                .map(|(u, p)| (u.clone(), p.remote.iter().cloned().collect()))
                .collect();
            for (user, insts) in known {
                let keep = theirs
                    .get(&user)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default();
                for inst in insts {
                    if !keep.contains(&inst) {
                        self.apply_remote_presence(&room, &mut g, &user, "", &inst, false);
                    }
                }
            }
            for (user, (name, insts)) in theirs {
                for inst in insts {
                    let has = g
                        .presence
                        .get(&user)
                        .is_some_and(|p| p.remote.contains(&inst));
                    if !has {
                        self.apply_remote_presence(&room, &mut g, &user, &name, &inst, true);
                    }
                }
            }
        }
    }

    /// Drop idle channels from memory (no members, nothing in flight, quiet for a
    /// minute). Their state is reloaded from the store on next use.
    pub fn sweep(&self) {
        let mut evicted_rooms = Vec::new();
        let mut map = lock(&self.channels);
        map.retain(|key, ch| {
            let Ok(mut g) = ch.inner.try_lock() else {
                return true;
            };
            let settled = if self.sequenced_by_store {
                g.pending.is_empty() && !g.filling
            } else {
                g.next_seq == g.committed + 1
            };
            let idle = g.members.is_empty()
                && settled
                && ch.loaded.initialized()
                && g.last_active.elapsed() >= IDLE_EVICT;
            if idle {
                g.evicted = true;
                if let ChannelKey::Room(r) = key {
                    evicted_rooms.push(r.clone());
                }
            }
            !idle
        });
        drop(map);
        if let Some(redis) = self.broker.redis() {
            for room in evicted_rooms {
                redis.unsubscribe(&room_channel(&room));
            }
        }
    }
}
