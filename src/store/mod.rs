//! Durable history: the messages of every room and direct-message pair, by `seq`.
//!
//! Owns: how messages ([`crate::message`]) are persisted, the history `epoch`, the
//! SQL schemas and queries (those the two SQL stores share word for word are
//! written once, in `sql`), and the three stores: SQLite (durable, the single-node
//! default), memory (bounded rings, fresh epoch on every start) and PostgreSQL
//! (shared by several nodes). Must not: deliver anything, or build what a client
//! sees (the protocol module encodes messages).
//!
//! Who numbers messages is a type, chosen when the store is opened: a
//! [`Store::Local`] store (SQLite or memory) keeps what the hub numbered
//! ([`LocalStore::append`]); the [`Store::Shared`] store (PostgreSQL) numbers each
//! batch inside its commit ([`PgStore::append_sequenced`]), because only the shared
//! database can order messages sent to different nodes.
//!
//! The store is an enum rather than a trait object: there are few stores, the calls
//! are async, and an enum keeps them static-dispatch without boxing every future.

mod memory;
mod postgres;
mod sql;
mod sqlite;

pub use memory::MemoryStore;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::message::{ChannelKey, EntryKind, StoredMessage};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("stored message is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot start the store's {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What the hub needs to take over a channel: where its sequence stands and which
/// `client_id`s were used recently (for idempotency across restarts).
#[derive(Debug, Default)]
pub struct ChannelInit {
    pub last_seq: u64,
    /// (sender, client_id, seq, ts) of messages newer than the asked-for time.
    pub client_ids: Vec<(String, String, u64, i64)>,
}

/// What [`PgStore::append_sequenced`] did with one message of a batch.
#[derive(Debug)]
pub enum Sequenced {
    /// Stored under a new `seq`.
    New(Arc<StoredMessage>),
    /// Its `client_id` was already used within the window: the original message.
    Duplicate(Arc<StoredMessage>),
}

/// Which store to open.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The SQLite database file.
    Sqlite {
        file: std::path::PathBuf,
    },
    Memory {
        ring: usize,
    },
    Postgres {
        url: String,
    },
}

/// The history store, by who numbers messages. This is chosen once, when the store
/// is opened, and the write path of each kind exists only on its own type, so the
/// hub cannot number messages for PostgreSQL nor leave SQLite to number them.
pub enum Store {
    /// One node: the hub numbers messages and this store keeps them.
    Local(LocalStore),
    /// Several nodes share this store; it numbers messages inside the commit.
    Shared(PgStore),
}

/// A single-node store: it stores messages whose `seq` the hub assigned.
pub enum LocalStore {
    Sqlite(SqliteStore),
    Memory(MemoryStore),
}

impl LocalStore {
    /// Store a batch in one transaction: all of it or none of it.
    pub async fn append(&self, batch: &[Arc<StoredMessage>]) -> Result<(), StoreError> {
        match self {
            LocalStore::Sqlite(s) => blocking(|| s.append_blocking(batch)),
            LocalStore::Memory(s) => {
                s.append(batch);
                Ok(())
            }
        }
    }
}

/// Run a short blocking call (a SQLite commit: a write and an fsync) in async code.
/// On a multi-thread runtime the worker first hands its other tasks to another
/// thread (`block_in_place`), so nothing else waits for the disk; on a
/// current-thread runtime (in-process tests) there is no one to hand them to.
///
/// Why not `spawn_blocking`: the commit would then wait for a pool thread to be
/// scheduled and the committer for a worker to pick it up again, two hand-offs
/// that each wait for a CPU on a machine busy fanning out; the committer stays on
/// its thread here and goes on to deliver the batch as soon as it is synced.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Store {
    pub async fn open(config: &StoreConfig) -> Result<Arc<Store>, StoreError> {
        Ok(Arc::new(match config {
            StoreConfig::Sqlite { file } => {
                Store::Local(LocalStore::Sqlite(SqliteStore::open(file).await?))
            }
            StoreConfig::Memory { ring } => {
                Store::Local(LocalStore::Memory(MemoryStore::new(*ring)))
            }
            StoreConfig::Postgres { url } => Store::Shared(PgStore::open(url).await?),
        }))
    }

    /// The name of this store's history; it changes only when history was lost.
    pub fn epoch(&self) -> &str {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.epoch(),
            Store::Local(LocalStore::Memory(s)) => s.epoch(),
            Store::Shared(s) => s.epoch(),
        }
    }

    /// Where a channel's sequence stands and its recent `client_id`s (those used
    /// since `client_ids_since_ts`; the shared store checks them in the commit).
    pub async fn load_channel(
        &self,
        key: &ChannelKey,
        client_ids_since_ts: i64,
    ) -> Result<ChannelInit, StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.load_channel(key, client_ids_since_ts).await,
            Store::Local(LocalStore::Memory(s)) => Ok(s.load_channel(key, client_ids_since_ts)),
            Store::Shared(s) => s.load_channel(key).await,
        }
    }

    /// Entries with `after < seq <= upto`, ascending.
    pub async fn range(
        &self,
        key: &ChannelKey,
        after: u64,
        upto: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().range(key, after, upto).await,
            Store::Local(LocalStore::Memory(s)) => {
                // A read yields once, as every other store's does, so an in-memory
                // server interleaves commits and joins like a durable one.
                tokio::task::yield_now().await;
                Ok(s.range(key, after, upto))
            }
            Store::Shared(s) => s.queries().range(key, after, upto).await,
        }
    }

    /// Rooms with stored messages whose name starts with `prefix` and sorts after
    /// `after`, by name, at most `limit`: (room, last seq).
    pub async fn rooms(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // Room channels' storage keys are `#` + the name, and sort as the names do.
        let prefix = format!("#{prefix}");
        let after = format!("#{after}");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match self {
            Store::Local(LocalStore::Sqlite(s)) => {
                s.queries().rooms(&prefix, &after, limit).await?
            }
            Store::Local(LocalStore::Memory(s)) => s.rooms(&prefix, &after, limit),
            Store::Shared(s) => s.queries().rooms(&prefix, &after, limit).await?,
        };
        rows.into_iter()
            .map(|(key, seq)| {
                let room = key.strip_prefix('#').unwrap_or(&key).to_owned();
                Ok((room, to_seq(seq)?))
            })
            .collect()
    }

    /// Every stored ban: (user, until in ms or None for "until lifted", reason).
    pub async fn bans(&self) -> Result<Vec<(String, Option<i64>, String)>, StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().bans().await,
            Store::Local(LocalStore::Memory(s)) => Ok(s.bans()),
            Store::Shared(s) => s.queries().bans().await,
        }
    }

    /// Store (or replace) a user's ban.
    pub async fn put_ban(
        &self,
        user: &str,
        until: Option<i64>,
        reason: &str,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().put_ban(user, until, reason).await,
            Store::Local(LocalStore::Memory(s)) => {
                s.put_ban(user, until, reason);
                Ok(())
            }
            Store::Shared(s) => s.queries().put_ban(user, until, reason).await,
        }
    }

    /// Lift a user's ban; true if there was one.
    pub async fn delete_ban(&self, user: &str) -> Result<bool, StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().delete_ban(user).await,
            Store::Local(LocalStore::Memory(s)) => Ok(s.delete_ban(user)),
            Store::Shared(s) => s.queries().delete_ban(user).await,
        }
    }

    /// Token revocations in force at `now_ms`: (key, issued_before in seconds).
    pub async fn revocations(&self, now_ms: i64) -> Result<Vec<(String, Option<i64>)>, StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().revocations(now_ms).await,
            Store::Local(LocalStore::Memory(s)) => Ok(s.revocations()),
            Store::Shared(s) => s.queries().revocations(now_ms).await,
        }
    }

    /// Store a token revocation, kept until `keep_until_ms`.
    pub async fn put_revocation(
        &self,
        key: &str,
        issued_before: Option<i64>,
        keep_until_ms: i64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => {
                s.put_revocation(key, issued_before, keep_until_ms).await
            }
            Store::Local(LocalStore::Memory(s)) => {
                s.put_revocation(key, issued_before);
                Ok(())
            }
            Store::Shared(s) => s.put_revocation(key, issued_before, keep_until_ms).await,
        }
    }

    /// The newest `limit` entries (or, with [`Which::Messages`], messages only)
    /// with `seq < before` (all if `before` is None), ascending.
    pub async fn latest(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
        which: Which,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        if limit == 0 || before == Some(0) {
            return Ok(Vec::new());
        }
        match self {
            Store::Local(LocalStore::Sqlite(s)) => {
                s.queries().latest(key, before, limit, which).await
            }
            Store::Local(LocalStore::Memory(s)) => {
                tokio::task::yield_now().await;
                Ok(s.latest(key, before, limit, which))
            }
            Store::Shared(s) => s.queries().latest(key, before, limit, which).await,
        }
    }

    /// The entry at `seq`, if there is one.
    pub async fn entry(
        &self,
        key: &ChannelKey,
        seq: u64,
    ) -> Result<Option<Arc<StoredMessage>>, StoreError> {
        Ok(self
            .range(key, seq.saturating_sub(1), seq)
            .await?
            .into_iter()
            .next())
    }

    /// The edits and reactions whose target is in `first..=last`, ascending by seq.
    pub async fn annotations(
        &self,
        key: &ChannelKey,
        first: u64,
        last: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        if last < first {
            return Ok(Vec::new());
        }
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().annotations(key, first, last).await,
            Store::Local(LocalStore::Memory(s)) => Ok(s.annotations(key, first, last)),
            Store::Shared(s) => s.queries().annotations(key, first, last).await,
        }
    }

    /// Move `user`'s read position in `key` to `seq` (clamped to the channel's
    /// latest seq; never backwards). A DM becomes one of the user's channels.
    /// Returns the position now stored.
    pub async fn mark_read(
        &self,
        user: &str,
        key: &ChannelKey,
        seq: u64,
    ) -> Result<u64, StoreError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let member = matches!(key, ChannelKey::Dm(..));
        let stored = match self {
            Store::Local(LocalStore::Sqlite(s)) => s.mark_read(user, key, seq, member).await?,
            Store::Local(LocalStore::Memory(s)) => s.mark_read(user, key, seq, member),
            Store::Shared(s) => s.mark_read(user, key, seq, member).await?,
        };
        to_seq(stored)
    }

    /// Make `key` one of `user`'s channels (`join` with `persist`), or no longer.
    pub async fn set_member(
        &self,
        user: &str,
        key: &ChannelKey,
        member: bool,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.set_member(user, key, member).await,
            Store::Local(LocalStore::Memory(s)) => {
                s.set_member(user, key, member);
                Ok(())
            }
            Store::Shared(s) => s.set_member(user, key, member).await,
        }
    }

    /// Every channel of `user` with its latest seq, read position and unread
    /// count, by storage key: one query, whatever the number of channels.
    pub async fn channel_states(&self, user: &str) -> Result<Vec<ChannelState>, StoreError> {
        let rows = match self {
            Store::Local(LocalStore::Sqlite(s)) => s.channel_states(user).await?,
            Store::Local(LocalStore::Memory(s)) => s.channel_states(user),
            Store::Shared(s) => s.channel_states(user).await?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for (key, read, seq, unread, peer_read) in rows {
            let Some(channel) = ChannelKey::from_storage_key(&key) else {
                return Err(StoreError::Corrupt(format!("channel key {key:?}")));
            };
            out.push(ChannelState {
                channel,
                seq: to_seq(seq)?,
                read: to_seq(read)?,
                unread: to_seq(unread)?.min(MAX_UNREAD),
                peer_read: peer_read.map(to_seq).transpose()?,
            });
        }
        Ok(out)
    }

    fn gate(&self) -> Option<&WebhookGate> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => Some(&s.webhooks),
            Store::Local(LocalStore::Memory(_)) => None,
            Store::Shared(s) => Some(&s.webhooks),
        }
    }

    /// Queue every stored message, edit and delete for the webhooks from now on.
    pub fn enable_webhooks(&self) {
        if let Some(g) = self.gate() {
            g.enabled.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Say whether the webhook queue is at its bound (new events are dropped).
    pub fn set_webhook_queue_full(&self, full: bool) {
        if let Some(g) = self.gate() {
            g.full.store(full, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Count one webhook event dropped before it reached the queue.
    pub fn note_webhook_dropped(&self) {
        if let Some(g) = self.gate() {
            g.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Events dropped because the queue was full, since start.
    pub fn webhook_dropped(&self) -> u64 {
        self.gate()
            .map_or(0, |g| g.dropped.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The oldest `limit` queued webhook events, in queue order.
    pub async fn webhook_batch(&self, limit: usize) -> Result<Vec<QueuedEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (heads, entries) = match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().webhook_batch(limit).await?,
            Store::Local(LocalStore::Memory(_)) => return Ok(Vec::new()),
            Store::Shared(s) => s.queries().webhook_batch(limit).await?,
        };
        let mut entries: std::collections::HashMap<i64, QueuedRow> =
            entries.into_iter().map(|r| (r.qid, r)).collect();
        let mut out = Vec::with_capacity(heads.len());
        for (id, created, body) in heads {
            match (body, entries.remove(&id)) {
                (Some(body), _) => out.push((id, created, Queued::Event(body))),
                (None, Some(row)) => {
                    let (id, created, m) = queued(row)?;
                    out.push((id, created, Queued::Entry(m)));
                }
                // The entry is gone (cannot happen: entries are never removed);
                // nothing to send for it.
                (None, None) => tracing::warn!(id, "a queued webhook event names no entry"),
            }
        }
        Ok(out)
    }

    /// Queue an event that is not a stored entry (presence): `channel` orders it
    /// with its room's entries, `body` is its JSON without `event_id`. Dropped
    /// (and counted) while the queue is full; a no-op without webhooks.
    pub async fn queue_webhook_event(&self, channel: &str, body: &str) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(g) = self.gate() else { return Ok(()) };
        if !g.enabled.load(Relaxed) {
            return Ok(());
        }
        if g.full.load(Relaxed) {
            g.dropped.fetch_add(1, Relaxed);
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        match self {
            Store::Local(LocalStore::Sqlite(s)) => {
                s.queries().queue_webhook_event(channel, body, now).await
            }
            Store::Local(LocalStore::Memory(_)) => Ok(()),
            Store::Shared(s) => s.queries().queue_webhook_event(channel, body, now).await,
        }
    }

    /// Forget delivered events.
    pub async fn webhook_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.webhook_done(ids).await,
            Store::Local(LocalStore::Memory(_)) => Ok(()),
            Store::Shared(s) => s.webhook_done(ids).await,
        }
    }

    /// How many events wait in the queue.
    pub async fn webhook_len(&self) -> Result<u64, StoreError> {
        let n = match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().webhook_len().await?,
            Store::Local(LocalStore::Memory(_)) => 0,
            Store::Shared(s) => s.queries().webhook_len().await?,
        };
        to_seq(n)
    }

    /// Become the node that delivers webhooks, if no other node is (None: another
    /// one is; try again later). Hold the result while delivering.
    pub async fn webhook_leader(&self) -> Result<Option<WebhookLeader>, StoreError> {
        match self {
            Store::Shared(s) => s.webhook_leader().await,
            _ => Ok(Some(WebhookLeader::Single)),
        }
    }

    /// Is `leader` still the delivering node (its lock's connection alive)?
    pub async fn still_leader(&self, leader: &mut WebhookLeader) -> bool {
        match leader {
            WebhookLeader::Single => true,
            WebhookLeader::Shared(conn) => {
                sqlx::query("SELECT 1").execute(&mut **conn).await.is_ok()
            }
        }
    }

    /// Is the store usable? (`/readyz`)
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.queries().check().await,
            Store::Local(LocalStore::Memory(_)) => Ok(()),
            Store::Shared(s) => s.queries().check().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Local(LocalStore::Sqlite(s)) => s.close().await,
            Store::Local(LocalStore::Memory(_)) => {}
            Store::Shared(s) => s.close().await,
        }
    }
}

pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(crate) fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
        path: dir.display().to_string(),
        source,
    })
}

/// The webhook queue's switches, held by each durable store: whether entries are
/// queued at all (`--webhook-url`), whether the queue is full (its bound reached:
/// new events are dropped and counted).
#[derive(Default)]
pub(crate) struct WebhookGate {
    enabled: std::sync::atomic::AtomicBool,
    full: std::sync::atomic::AtomicBool,
    dropped: std::sync::atomic::AtomicU64,
}

impl WebhookGate {
    /// Should `m` be queued now? Counts it as dropped when the queue is full.
    pub(crate) fn admits(&self, m: &StoredMessage) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.enabled.load(Relaxed) || matches!(m.kind, EntryKind::React { .. }) {
            return false;
        }
        if self.full.load(Relaxed) {
            self.dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }
}

/// What a queued webhook event is: a stored entry (as stored now: a message
/// deleted meanwhile is a tombstone), or an event whose JSON was queued as is.
#[derive(Debug)]
pub enum Queued {
    Entry(Arc<StoredMessage>),
    Event(String),
}

/// One queued webhook event: its id (the `event_id`), when it was queued, and what
/// it is.
pub type QueuedEvent = (i64, i64, Queued);

/// Who may deliver webhooks: one node at a time. SQLite has one node; with
/// PostgreSQL the holder of a session advisory lock, on a connection kept for it.
pub enum WebhookLeader {
    Single,
    /// The connection holding the lock, out of the pool: closing it (or this
    /// node dying) frees the lock for another node.
    Shared(Box<sqlx::PgConnection>),
}

/// Which entries [`Store::latest`] counts and returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Every entry of the stream (messages, edits, deletes, reactions).
    Entries,
    /// Messages only (`history` with `current: true`).
    Messages,
}

/// An entry row as both SQL stores return it (see `sql::select_entries!`).
#[derive(sqlx::FromRow)]
pub(crate) struct Row {
    pub seq: i64,
    pub ts: i64,
    pub sender: String,
    pub name: String,
    pub text: String,
    pub meta: Option<String>,
    pub client_id: Option<String>,
    pub kind: i16,
    pub target: Option<i64>,
    pub emoji: Option<String>,
    pub react_on: Option<i16>,
    pub deleted: i16,
}

/// A queued webhook event joined with its entry.
/// A queue row's head: (id, created_ms, body of a non-entry event).
pub(crate) type QueueHead = (i64, i64, Option<String>);

#[derive(sqlx::FromRow)]
pub(crate) struct QueuedRow {
    qid: i64,
    qcreated: i64,
    qchannel: String,
    #[sqlx(flatten)]
    row: Row,
}

pub(crate) fn queued(r: QueuedRow) -> Result<(i64, i64, Arc<StoredMessage>), StoreError> {
    let key = ChannelKey::from_storage_key(&r.qchannel)
        .ok_or_else(|| StoreError::Corrupt(format!("channel key {:?}", r.qchannel)))?;
    Ok((r.qid, r.qcreated, to_message(&key, r.row)?))
}

pub(crate) fn to_seq(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative seq {v}")))
}

pub(crate) fn to_message(key: &ChannelKey, r: Row) -> Result<Arc<StoredMessage>, StoreError> {
    let seq = r.seq;
    let meta = match r.meta {
        None => None,
        Some(m) => Some(
            serde_json::value::RawValue::from_string(m)
                .map_err(|e| StoreError::Corrupt(format!("meta of seq {seq}: {e}")))?,
        ),
    };
    let target = r.target.map(to_seq).transpose()?;
    let kind = EntryKind::from_columns(r.kind, target, r.emoji, r.react_on.map(|o| o != 0))
        .ok_or_else(|| StoreError::Corrupt(format!("entry kind {} of seq {seq}", r.kind)))?;
    Ok(Arc::new(StoredMessage {
        channel: key.clone(),
        seq: to_seq(seq)?,
        ts: r.ts,
        from: r.sender,
        name: r.name,
        text: r.text,
        meta,
        client_id: r.client_id,
        kind,
        deleted: r.deleted != 0,
    }))
}

/// The store's columns for an entry's kind: (kind, target, emoji, react_on).
pub(crate) fn kind_columns(m: &StoredMessage) -> (i16, Option<i64>, Option<&str>, Option<i16>) {
    let target = m
        .kind
        .target()
        .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
    let (emoji, on) = match &m.kind {
        EntryKind::React { emoji, on, .. } => (Some(emoji.as_str()), Some(i16::from(*on))),
        _ => (None, None),
    };
    (m.kind.code(), target, emoji, on)
}

/// The largest unread count the stores compute; more is reported as this many
/// (a client shows it as "9999+"), so `hello` never counts a huge backlog.
pub const MAX_UNREAD: u64 = 9999;

/// One of a user's channels, as `welcome` and `unread` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelState {
    pub channel: ChannelKey,
    /// The channel's latest `seq` (any entry).
    pub seq: u64,
    /// The user's read position.
    pub read: u64,
    /// Messages from others after `read`, not deleted (at most [`MAX_UNREAD`]).
    pub unread: u64,
    /// In a DM, how far the other party has read (None: not at all yet).
    pub peer_read: Option<u64>,
}

/// A row of the stores' `channel_states`: (channel storage key, read, latest seq,
/// unread, a DM peer's read).
pub(crate) type StateRow = (String, i64, i64, i64, Option<i64>);
