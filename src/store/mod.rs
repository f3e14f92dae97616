//! Durable history: the messages of every room and direct-message pair, by `seq`.
//!
//! Owns: the persisted shape of a message ([`StoredMessage`]), the channel key that
//! names a room or a DM pair ([`ChannelKey`]), the history `epoch`, and the two
//! stores: SQLite (durable, the default) and memory (bounded rings, fresh epoch on
//! every start). Must not: assign `seq` (the hub's sequencer does, so that the order
//! is decided in one place) or deliver anything.
//!
//! The store is an enum rather than a trait object: there are few stores, the calls
//! are async, and an enum keeps them static-dispatch without boxing every future.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
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

/// Which store to open.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite { data_dir: std::path::PathBuf },
    Memory { ring: usize },
}

pub enum Store {
    Sqlite(SqliteStore),
    Memory(MemoryStore),
}

impl Store {
    pub async fn open(config: &StoreConfig) -> Result<Arc<Store>, StoreError> {
        Ok(Arc::new(match config {
            StoreConfig::Sqlite { data_dir } => Store::Sqlite(SqliteStore::open(data_dir).await?),
            StoreConfig::Memory { ring } => Store::Memory(MemoryStore::new(*ring)),
        }))
    }

    /// The name of this store's history; it changes only when history was lost.
    pub fn epoch(&self) -> &str {
        match self {
            Store::Sqlite(s) => s.epoch(),
            Store::Memory(s) => s.epoch(),
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
        }
    }

    /// Is the store usable? (`/readyz`)
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.check().await,
            Store::Memory(_) => Ok(()),
        }
    }

    pub async fn close(&self) {
        if let Store::Sqlite(s) = self {
            s.close().await;
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
