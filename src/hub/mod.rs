//! The hub: rooms, direct-message pairs, presence and fan-out on this node.
//!
//! Owns: the channels in memory and their loading ([`channel`]: sequence, ordered
//! delivery, gap fill, fan-out), room membership ([`membership`]: join and leave),
//! per-user presence, local and cluster-wide ([`presence`]), the registry of
//! connections by user ([`registry`], for DMs), the group committer
//! ([`committer`]), and its own upkeep tasks ([`upkeep`]: idle-channel eviction,
//! cluster catch-up, presence reconciliation), which [`Hub::start`] spawns and
//! [`Hub::stop`] ends, as the server only starts and stops the hub.
//! Must not: do I/O while holding a lock (every lock here is a std `Mutex` held for
//! in-memory work only), wait on a client (fan-out pushes into bounded
//! [`Outbox`]es and never blocks), reach another node except through the
//! [`Broker`] seam, or encode anything but through the protocol module.
//!
//! Who numbers messages follows the store's type: with a [`Store::Local`] store a
//! channel's `seq` is assigned under its lock here and the message is queued for
//! the committer under the same lock, so the committer sees each channel's messages
//! in `seq` order; with the [`Store::Shared`] store the commit numbers them, and
//! messages arrive from the broker in whatever order the nodes published them, so
//! [`Hub::deliver`] delivers strictly in `seq` order (see [`channel`]).

mod channel;
mod committer;
mod membership;
mod operator;
pub mod outbox;
mod presence;
mod registry;
#[cfg(test)]
mod tests;
mod upkeep;
pub mod writers;

pub use channel::Channel;
pub use operator::{PresencePage, RoomsPage};
pub use outbox::Outbox;
pub use presence::MembersPage;

use crate::broker::{Broker, Inbound};
use crate::message::{ChannelKey, EntryKind, StoredMessage};
use crate::metrics::Metrics;
use crate::protocol::{CommandError, CommandId, ErrorCode};
use crate::store::{Store, Which};
use crate::ws::Text;
use committer::Job;
use registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a `client_id` makes a resend idempotent.
pub const CLIENT_ID_WINDOW: Duration = Duration::from_secs(600);
/// Jobs the committer may have queued before new sends get `unavailable`.
const JOB_QUEUE: usize = 16384;

/// One authenticated connection, as the hub sees it. `user` and `name` are
/// shared (not copied) by the room presence entries and the user registry, so an
/// idle connection holds each string once.
pub struct Conn {
    pub id: u64,
    pub user: Arc<str>,
    pub name: Arc<str>,
    pub outbox: Arc<Outbox>,
    /// The token it said hello with, or last refreshed to (None for guests), for
    /// revocations; boxed so a guest's connection pays little for it.
    pub token: Mutex<Option<Box<crate::auth::TokenId>>>,
}

impl Conn {
    /// The token this connection holds now (None for guests).
    pub fn token(&self) -> Option<crate::auth::TokenId> {
        lock(&self.token).as_deref().cloned()
    }

    /// Hold `token` from now on (a live refresh).
    pub fn set_token(&self, token: crate::auth::TokenId) {
        *lock(&self.token) = Some(Box::new(token));
    }

    /// Queue a frame for this connection; false if its queue has overflowed.
    pub fn send(&self, frame: Text) -> bool {
        self.outbox.push(frame)
    }
}

/// Something that happened in the hub that the app's backend may hear of (the
/// webhooks): given to the listener set with [`Hub::on_activity`].
#[derive(Debug, Clone)]
pub enum Activity {
    /// `user` arrived in (`join`) or left `room`: their first or last connection in
    /// it on any node, as this node knows it, caused by a connection here.
    Member {
        room: String,
        user: String,
        name: String,
        join: bool,
    },
    /// `user`'s first connection on this node said hello (`online`), or their last
    /// one here closed.
    UserHere {
        user: String,
        name: String,
        online: bool,
    },
}

/// Who hears how a submitted message ended: an `ack` means stored and published.
pub enum Submitter {
    /// A WebSocket connection: `ack` or `error`, carrying its command's `id`.
    Conn(Arc<Conn>, Option<CommandId>),
    /// The server API: the stored message's place, or why it was not stored.
    Api {
        user: Arc<str>,
        name: Arc<str>,
        reply: oneshot::Sender<Result<Receipt, CommandError>>,
    },
}

/// Where a stored message is: what an `ack` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub ts: i64,
}

impl Submitter {
    /// The author: user id and display name.
    fn author(&self) -> (&Arc<str>, &Arc<str>) {
        match self {
            Submitter::Conn(c, _) => (&c.user, &c.name),
            Submitter::Api { user, name, .. } => (user, name),
        }
    }
}

/// What a `send` or `direct` (or, 1.1, an `edit`, `delete` or `react`) asks the
/// hub to store and deliver as the next entry of a channel.
pub struct Outgoing {
    pub text: String,
    pub meta: Option<Box<serde_json::value::RawValue>>,
    pub client_id: Option<String>,
    pub kind: EntryKind,
}

impl Outgoing {
    /// A plain message.
    pub fn message(
        text: String,
        meta: Option<Box<serde_json::value::RawValue>>,
        client_id: Option<String>,
    ) -> Outgoing {
        Outgoing {
            text,
            meta,
            client_id,
            kind: EntryKind::Message,
        }
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

/// The oldest `ts` whose `client_id` still makes a resend idempotent.
fn client_id_horizon() -> i64 {
    now_ms() - i64::try_from(CLIENT_ID_WINDOW.as_millis()).unwrap_or(0)
}

/// How the hub behaves, from the configuration.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Rooms with more users than this get `members` counts instead of per-user
    /// `member` events.
    pub presence_events_max: usize,
    /// About how many bytes of messages a `joined` carries at most.
    pub max_reply_bytes: usize,
    /// Writer threads for direct writes into parked sockets ([`writers`]); 0:
    /// none, every delivery wakes its session.
    pub writer_threads: usize,
    /// A room's batching members are written at most this often while its
    /// messages keep coming ([`writers::Writers::due`]); zero: at once.
    pub batch_delay: std::time::Duration,
    /// Under load, store commits start at most once this often, each with
    /// everything that came meanwhile ([`committer`]); zero: at once.
    pub commit_interval: std::time::Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            presence_events_max: 1000,
            max_reply_bytes: 512 * 1024,
            writer_threads: 0,
            batch_delay: std::time::Duration::ZERO,
            commit_interval: std::time::Duration::ZERO,
        }
    }
}

pub struct Hub {
    channels: Mutex<HashMap<ChannelKey, Arc<Channel>>>,
    options: HubOptions,
    /// Large rooms whose member count changed since the last `members` events.
    dirty_counts: Mutex<Vec<Arc<Channel>>>,
    /// Rooms whose members got quiet presence events since the last presence tick.
    quiet_rooms: Mutex<Vec<Arc<Channel>>>,
    registry: Registry,
    store: Arc<Store>,
    jobs: mpsc::Sender<Job>,
    broker: Broker,
    metrics: Metrics,
    /// Set while store commits are failing (and being retried); `/readyz` shows it.
    store_failing: AtomicBool,
    /// The committer and the upkeep tasks, taken by [`Hub::stop`].
    tasks: Mutex<Option<upkeep::Tasks>>,
    /// Banned users (the store's bans, kept current by the broker): user ->
    /// (until in ms, None: until lifted; reason).
    bans: Mutex<HashMap<String, (Option<i64>, String)>>,
    /// Token revocations in force: `j:<jti>` or `u:<user>` -> issued-before (s).
    revocations: Mutex<HashMap<String, Option<i64>>>,
    /// Who hears of [`Activity`] (set once; none: nobody, and it costs nothing).
    activity: std::sync::OnceLock<Box<dyn Fn(Activity) + Send + Sync>>,
    /// The fan-out's writer threads (none: sessions do every write).
    writers: Option<writers::Writers>,
}

impl Hub {
    /// Create the hub; start its committer, its upkeep tasks and the broker's.
    pub fn start(
        store: Arc<Store>,
        broker: Broker,
        metrics: Metrics,
        options: HubOptions,
    ) -> Arc<Hub> {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let writers = match options.writer_threads {
            0 => None,
            n => match writers::Writers::start(
                n,
                writers::QUEUE,
                options.batch_delay,
                metrics.clone(),
            ) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "no writer threads; sessions write every delivery");
                    None
                }
            },
        };
        let hub = Arc::new(Hub {
            channels: Mutex::new(HashMap::new()),
            options,
            dirty_counts: Mutex::new(Vec::new()),
            quiet_rooms: Mutex::new(Vec::new()),
            registry: Registry::default(),
            store,
            jobs: tx,
            broker,
            metrics,
            store_failing: AtomicBool::new(false),
            tasks: Mutex::new(None),
            bans: Mutex::new(HashMap::new()),
            revocations: Mutex::new(HashMap::new()),
            activity: std::sync::OnceLock::new(),
            writers,
        });
        let weak = Arc::downgrade(&hub);
        hub.broker.set_sink(move |event| {
            if let Some(hub) = weak.upgrade() {
                hub.on_inbound(event);
            }
        });
        let stop = CancellationToken::new();
        hub.broker.start(stop.clone());
        let committer = tokio::spawn(committer::run(rx, hub.clone()));
        let tasks = upkeep::spawn(&hub, committer, stop);
        *lock(&hub.tasks) = Some(tasks);
        hub
    }

    /// Do the fan-out's writer threads write into parked sockets? (Else a session
    /// has no reason to park.)
    pub fn direct_writes(&self) -> bool {
        self.writers.is_some()
    }

    /// Hand outboxes that a fan-out left a run in while parked to the writer
    /// threads, at once or (`at`, from [`Hub::batch_due`]) when due; with no
    /// writer threads, back to their sessions.
    fn write_direct(&self, chunk: Vec<Arc<Outbox>>, at: Option<std::time::Instant>) {
        match &self.writers {
            Some(w) => w.write_at(chunk, at),
            None => chunk.iter().for_each(|o| o.hand_back()),
        }
    }

    /// When a room's parked members that batch are due, paced by the room's
    /// `last` hand-over ([`writers::Writers::due`]); None: at once.
    fn batch_due(&self, last: &mut Option<std::time::Instant>) -> Option<std::time::Instant> {
        self.writers.as_ref().and_then(|w| w.due(last))
    }

    /// Stop the hub after everything queued is stored, delivered and acked: the
    /// committer ends, this node leaves the cluster cleanly, the upkeep tasks end
    /// and the store is closed. Call once sessions are gone.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let tasks = lock(&self.tasks).take();
        if let Some(tasks) = tasks {
            let _ = tasks.committer.await;
            // The broker outlives the sessions: their leaving is presence news.
            self.broker.shutdown().await;
            tasks.stop.cancel();
            for t in tasks.upkeep {
                let _ = t.await;
            }
        }
        self.store.close().await;
    }

    /// Resolves once every message submitted before this call is stored, delivered
    /// and acked.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Is the hub able to take messages? (`/readyz`) An error says why not.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.broker.healthy() {
            return Err("message broker unreachable".to_owned());
        }
        let checked = self
            .store
            .check()
            .await
            .map_err(|e| format!("store unavailable: {e}"));
        if self.store_failing.load(Ordering::Relaxed) {
            // A shared store's failed commit is answered, not retried, so no
            // commit may come to clear the flag: the store answering again does.
            // (A local store retries its commit until it succeeds.)
            if matches!(*self.store, Store::Shared(_)) && checked.is_ok() {
                self.set_store_failing(false);
            } else {
                return Err("store commits failing".to_owned());
            }
        }
        checked
    }

    /// The store's history epoch.
    pub fn epoch(&self) -> &str {
        self.store.epoch()
    }

    fn set_store_failing(&self, failing: bool) {
        self.store_failing.store(failing, Ordering::Relaxed);
    }

    /// Hear of every [`Activity`] from now on. `f` runs under the hub's locks: it
    /// must only hand the activity on (e.g. `try_send` into a bounded queue).
    pub fn on_activity(&self, f: impl Fn(Activity) + Send + Sync + 'static) {
        let _ = self.activity.set(Box::new(f));
    }

    /// Tell the listener, if there is one (`make` runs only then).
    pub(crate) fn tell(&self, make: impl FnOnce() -> Activity) {
        if let Some(f) = self.activity.get() {
            f(make());
        }
    }

    /// Make `conn` reachable for direct messages (on every node: the user's broker
    /// subscription is in place before this returns).
    pub async fn register(&self, conn: &Arc<Conn>) {
        self.broker
            .subscribe(crate::broker::Topic::User(&conn.user))
            .await;
        if self.registry.add(conn) {
            self.metrics.users.increment(1.0);
            self.tell(|| Activity::UserHere {
                user: conn.user.to_string(),
                name: conn.name.to_string(),
                online: true,
            });
        }
    }

    /// Forget a connection: leave its rooms (with `member leave` where it was the
    /// user's last connection) and drop it from the user registry.
    pub fn unregister<R: AsRef<str>>(&self, conn: &Arc<Conn>, rooms: impl IntoIterator<Item = R>) {
        for room in rooms {
            self.leave(conn, room.as_ref());
        }
        if self.registry.remove(conn) {
            self.metrics.users.decrement(1.0);
            self.tell(|| Activity::UserHere {
                user: conn.user.to_string(),
                name: conn.name.to_string(),
                online: false,
            });
        }
        self.broker
            .unsubscribe(crate::broker::Topic::User(&conn.user));
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
        self.submit_as(Submitter::Conn(conn.clone(), id), key, out)
            .await
    }

    /// [`Hub::submit`] for any author: the outcome goes to `to` once stored and
    /// published (or at once, if refused here).
    pub async fn submit_as(
        self: &Arc<Self>,
        to: Submitter,
        key: ChannelKey,
        out: Outgoing,
    ) -> Result<(), CommandError> {
        if !self.broker.healthy() {
            // Never ack what could not be published: refuse before storing.
            return Err(CommandError::new(
                ErrorCode::Unavailable,
                "the message broker between nodes is unreachable; retry shortly",
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
            // An edit, delete or reaction of a message deleted meanwhile (its delete
            // sequenced here, perhaps not stored yet) finds nothing to act on.
            if let Some(target) = out.kind.target() {
                if g.deleted_targets.contains(&target) {
                    return Err(CommandError::new(
                        ErrorCode::NotFound,
                        format!("message {target} was deleted"),
                    ));
                }
                // Sequenced here now (one node), so known deleted from now on; with
                // a shared store every node learns it at delivery instead.
                if matches!(out.kind, EntryKind::Delete { .. })
                    && matches!(*self.store, Store::Local(_))
                {
                    g.note_deleted(target);
                }
            }
            let ts = now_ms();
            g.last_active = Instant::now();
            let seq = match &*self.store {
                // Numbered, and checked for a repeated client_id, inside the commit.
                Store::Shared(_) => 0,
                Store::Local(_) => {
                    g.prune_client_ids(ts);
                    let user = to.author().0;
                    let known = out.client_id.as_ref().and_then(|cid| {
                        g.client_ids.get(&(user.to_string(), cid.clone())).copied()
                    });
                    if let Some((seq, ts)) = known {
                        permit.send(Job::Ack {
                            to,
                            key: key.clone(),
                            seq,
                            ts,
                        });
                        return Ok(());
                    }
                    let seq = g.next_seq;
                    g.next_seq += 1;
                    if let Some(cid) = &out.client_id {
                        g.remember_client_id(user.to_string(), cid.clone(), seq, ts);
                    }
                    seq
                }
            };
            let (user, name) = to.author();
            let msg = Arc::new(StoredMessage {
                channel: key.clone(),
                seq,
                ts,
                from: user.to_string(),
                name: name.to_string(),
                text: out.text,
                meta: out.meta,
                client_id: out.client_id,
                kind: out.kind,
                deleted: false,
            });
            // Queued while the lock is held (the permit makes this a plain push, no
            // await), so the committer sees this channel's messages in seq order.
            permit.send(Job::Append {
                channel: ch.clone(),
                msg,
                reply: Some(to),
            });
            drop(g);
            return Ok(());
        }
    }

    /// The history store (read state and entry lookups of the chat module).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The broker seam (the chat module's read events to other nodes).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Queue `frame` for every connection of `user` on this node but `except`;
    /// returns how many took it.
    pub fn send_to_user(&self, user: &str, except: Option<u64>, frame: &Text) -> u64 {
        self.registry.send_to_except(user, except, || frame.clone())
    }

    /// Stored messages of a channel, newest `limit` before `before`, ascending.
    pub async fn history(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, CommandError> {
        self.store
            .latest(key, before, limit, Which::Entries)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "reading history failed");
                CommandError::new(ErrorCode::Unavailable, "history store unavailable")
            })
    }

    /// Something another node published. Runs on the broker connection's reader:
    /// must not block.
    fn on_inbound(self: &Arc<Self>, event: Inbound) {
        match event {
            Inbound::Message(msg) => {
                let ch = {
                    let mut map = lock(&self.channels);
                    match (&msg.channel, map.get(&msg.channel)) {
                        (_, Some(ch)) => ch.clone(),
                        // A room nobody here is in: not subscribed any more.
                        (ChannelKey::Room(_), None) => return,
                        (ChannelKey::Dm(..), None) => {
                            let ch = Channel::new(&msg.channel);
                            let _ = ch.loaded.set(());
                            map.insert(msg.channel.clone(), ch.clone());
                            ch
                        }
                    }
                };
                self.deliver(&ch, &Arc::new(msg));
            }
            Inbound::Presence {
                room,
                user,
                name,
                inst,
                on,
            } => self.on_remote_presence(&room, &user, &name, &inst, on),
            Inbound::Typing { room, user, name } => self.typing_local(&room, &user, &name),
            Inbound::Ask { id, question } => self.answer(&id, question),
            Inbound::Read {
                channel,
                user,
                seq,
                to,
            } => {
                let frame = crate::protocol::events::read_event(None, &channel, &to, &user, seq);
                self.send_to_user(&to, None, &Text::from(frame));
            }
            other @ (Inbound::Disconnect { .. }
            | Inbound::Ban { .. }
            | Inbound::Remove { .. }
            | Inbound::Revoke { .. }) => {
                self.on_operator_inbound(other);
            }
        }
    }
}
