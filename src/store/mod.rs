//! Durable history: the messages of every room and direct-message pair, by `seq`.
//!
//! Owns: the persisted shape of a message ([`StoredMessage`]), the channel key that
//! names a room or a DM pair ([`ChannelKey`]), the history `epoch`, and the three
//! stores: SQLite (durable, the single-node default), memory (bounded rings, fresh
//! epoch on every start) and PostgreSQL (shared by several nodes). Must not: deliver
//! anything. Who numbers messages: on one node the hub's sequencer assigns `seq`
//! and SQLite/memory only store it; with PostgreSQL the store assigns `seq` inside
//! the commit ([`Store::append_sequenced`]), because only the shared database can
//! order messages sent to different nodes.
//!
//! The store is an enum rather than a trait object: there are few stores, the calls
//! are async, and an enum keeps them static-dispatch without boxing every future.

mod memory;
mod postgres;
mod sqlite;

pub use memory::MemoryStore;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::protocol::encode;
use serde::Serialize;
use serde_json::value::RawValue;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("stored message is corrupt: {0}")]
    Corrupt(String),
}

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

    /// The key in the database: `#room` or `@["a","b"]`. Room names cannot contain
    /// `#`, `@` or `"`, so rooms and pairs never collide.
    pub fn storage_key(&self) -> String {
        match self {
            ChannelKey::Room(r) => format!("#{r}"),
            ChannelKey::Dm(a, b) => format!("@{}", encode(&[a, b])),
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

/// The wire form of a message (`type: message`), also used inside `joined.messages`
/// and `history.messages`.
#[derive(Serialize)]
pub struct MessageEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dm: Option<&'a str>,
    seq: u64,
    ts: i64,
    from: &'a str,
    name: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
}

impl StoredMessage {
    /// The event as `viewer` sees it: for a DM, `dm` is the other party.
    pub fn event(&self, viewer: &str) -> MessageEvent<'_> {
        let (room, dm) = self.channel.target(viewer);
        MessageEvent {
            kind: "message",
            room,
            dm,
            seq: self.seq,
            ts: self.ts,
            from: &self.from,
            name: &self.name,
            text: &self.text,
            meta: self.meta.as_deref(),
            client_id: self.client_id.as_deref(),
        }
    }
}

/// What the hub needs to take over a channel: where its sequence stands and which
/// `client_id`s were used recently (for idempotency across restarts).
#[derive(Debug, Default)]
pub struct ChannelInit {
    pub last_seq: u64,
    /// (sender, client_id, seq, ts) of messages newer than the asked-for time.
    pub client_ids: Vec<(String, String, u64, i64)>,
}

/// What [`Store::append_sequenced`] did with one message of a batch.
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

pub enum Store {
    Sqlite(SqliteStore),
    Memory(MemoryStore),
    Postgres(PgStore),
}

impl Store {
    pub async fn open(config: &StoreConfig) -> Result<Arc<Store>, StoreError> {
        Ok(Arc::new(match config {
            StoreConfig::Sqlite { file } => Store::Sqlite(SqliteStore::open(file).await?),
            StoreConfig::Memory { ring } => Store::Memory(MemoryStore::new(*ring)),
            StoreConfig::Postgres { url } => Store::Postgres(PgStore::open(url).await?),
        }))
    }

    /// Does this store assign `seq` itself (shared by several nodes)?
    pub fn sequences(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// The name of this store's history; it changes only when history was lost.
    pub fn epoch(&self) -> &str {
        match self {
            Store::Sqlite(s) => s.epoch(),
            Store::Memory(s) => s.epoch(),
            Store::Postgres(s) => s.epoch(),
        }
    }

    pub async fn load_channel(
        &self,
        key: &ChannelKey,
        client_ids_since_ts: i64,
    ) -> Result<ChannelInit, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_channel(key, client_ids_since_ts).await,
            Store::Memory(s) => Ok(s.load_channel(key, client_ids_since_ts)),
            Store::Postgres(s) => s.load_channel(key).await,
        }
    }

    /// Number and store a batch in one transaction (stores that [`Store::sequences`]):
    /// a `client_id` used since `client_id_since_ts` yields the original message.
    pub async fn append_sequenced(
        &self,
        batch: &[Arc<StoredMessage>],
        client_id_since_ts: i64,
    ) -> Result<Vec<Sequenced>, StoreError> {
        match self {
            Store::Postgres(s) => s.append_sequenced(batch, client_id_since_ts).await,
            _ => Err(StoreError::Corrupt(
                "this store does not assign seq; the hub does".to_owned(),
            )),
        }
    }

    /// The last stored `seq` of each of these channels (by storage key) that has one.
    /// Only the shared store answers; a single-node store has nothing to catch up on.
    pub async fn last_seqs(&self, keys: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            Store::Postgres(s) => s.last_seqs(keys).await,
            _ => Ok(Vec::new()),
        }
    }

    /// Store a batch in one transaction: all of it or none of it.
    pub async fn append(&self, batch: &[Arc<StoredMessage>]) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.append(batch).await,
            Store::Memory(s) => {
                s.append(batch);
                Ok(())
            }
            Store::Postgres(_) => Err(StoreError::Corrupt(
                "PostgreSQL assigns seq itself: use append_sequenced".to_owned(),
            )),
        }
    }

    /// Messages with `after < seq <= upto`, ascending.
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
            Store::Sqlite(s) => s.range(key, after, upto).await,
            Store::Memory(s) => Ok(s.range(key, after, upto)),
            Store::Postgres(s) => s.range(key, after, upto).await,
        }
    }

    /// The newest `limit` messages with `seq < before` (all if `before` is None),
    /// ascending.
    pub async fn latest(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        if limit == 0 || before == Some(0) {
            return Ok(Vec::new());
        }
        match self {
            Store::Sqlite(s) => s.latest(key, before, limit).await,
            Store::Memory(s) => Ok(s.latest(key, before, limit)),
            Store::Postgres(s) => s.latest(key, before, limit).await,
        }
    }

    /// Is the store usable? (`/readyz`)
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.check().await,
            Store::Memory(_) => Ok(()),
            Store::Postgres(s) => s.check().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
            Store::Memory(_) => {}
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

/// A message row as both SQL stores return it:
/// (seq, ts, sender, name, text, meta, client_id).
pub(crate) type Row7 = (
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

pub(crate) fn to_seq(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative seq {v}")))
}

pub(crate) fn to_message(key: &ChannelKey, r: Row7) -> Result<Arc<StoredMessage>, StoreError> {
    let (seq, ts, from, name, text, meta, client_id) = r;
    let meta = match meta {
        None => None,
        Some(m) => Some(
            serde_json::value::RawValue::from_string(m)
                .map_err(|e| StoreError::Corrupt(format!("meta of seq {seq}: {e}")))?,
        ),
    };
    Ok(Arc::new(StoredMessage {
        channel: key.clone(),
        seq: to_seq(seq)?,
        ts,
        from,
        name,
        text,
        meta,
        client_id,
    }))
}
