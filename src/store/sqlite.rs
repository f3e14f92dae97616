//! The SQLite store: WAL journal, `synchronous = FULL`, one transaction per batch.
//!
//! Owns: the SQLite schema (migrations/sqlite) and the queries written in its
//! dialect (those both SQL stores run word for word are in `super::sql`).
//! Must not: number messages (the hub did) or hold a transaction across anything
//! but its own work.
//!
//! Durability: a commit returns only after SQLite has fsynced the WAL, so an `ack`
//! sent after [`SqliteStore::append_blocking`] survives a crash of the process and of the OS.
//! Throughput comes from group commit (the hub's committer hands us every message
//! that arrived together), not from weakening the sync mode.

use super::{
    ChannelInit, ChannelKey, MAX_UNREAD, StateRow, StoreError, StoredMessage, ensure_dir,
    kind_columns, new_epoch, to_seq,
};
use crate::message::EntryKind;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct SqliteStore {
    /// Reads (and the migrations) go through sqlx's pool.
    pool: SqlitePool,
    /// Appends go through one rusqlite connection, on the committer's thread
    /// (see `super::blocking`). sqlx runs every statement on a
    /// worker thread of its own and answers through a channel: two thread hand-offs
    /// per commit, each of which waits for a CPU when the machine is busy fanning
    /// out (measured: 33 ms mean commit under 100,000 deliveries/s on 2 cores, while
    /// the fsync itself takes 0.1 ms). Every message's fan-out waits for its commit,
    /// so those hand-offs were most of a delivery's latency in one big room.
    writer: Mutex<rusqlite::Connection>,
    /// Stops the checkpointer thread when the store closes (or is dropped).
    checkpointer: Option<Checkpointer>,
    epoch: String,
    pub(crate) webhooks: super::WebhookGate,
    /// Users with any channel of their own (a `read_state` row with `member`):
    /// every other user's `hello` skips the query. This node is the database's
    /// only writer, so the set is kept exact here (loaded at open, added to by
    /// every write that can make a member row). Without it 19,000 hellos of new
    /// users were 19,000 queries through the pool's worker thread (joins took twice
    /// as long).
    with_state: Mutex<std::collections::HashSet<String>>,
}

impl SqliteStore {
    /// Open (creating if needed) the database file and its directory.
    pub async fn open(file: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(dir)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)")
            .bind(new_epoch())
            .execute(&pool)
            .await?;
        let epoch: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'epoch'")
            .fetch_one(&pool)
            .await?;
        let with_state: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT user_id FROM read_state WHERE member = 1")
                .fetch_all(&pool)
                .await?;
        let writer = rusqlite::Connection::open(file)?;
        // WAL is a property of the file (set above); the sync mode and the busy
        // wait are per connection.
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.busy_timeout(Duration::from_secs(5))?;
        // No checkpoint inside a commit: the thread below does them.
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Checkpointer::start(file)?;
        Ok(SqliteStore {
            pool,
            writer: Mutex::new(writer),
            checkpointer: Some(checkpointer),
            epoch,
            webhooks: super::WebhookGate::default(),
            with_state: Mutex::new(with_state.into_iter().collect()),
        })
    }

    /// This store's pool, for the statements both SQL stores share.
    pub(super) fn queries(&self) -> super::sql::Queries<'_, sqlx::Sqlite> {
        super::sql::Queries(&self.pool)
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub async fn load_channel(
        &self,
        key: &ChannelKey,
        since_ts: i64,
    ) -> Result<ChannelInit, StoreError> {
        let channel = key.storage_key();
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM messages WHERE channel = ?")
                .bind(&channel)
                .fetch_one(&self.pool)
                .await?;
        let rows = sqlx::query(
            "SELECT sender, client_id, seq, ts FROM messages \
             WHERE channel = ? AND ts >= ? AND client_id IS NOT NULL",
        )
        .bind(&channel)
        .bind(since_ts)
        .fetch_all(&self.pool)
        .await?;
        let mut client_ids = Vec::with_capacity(rows.len());
        for r in rows {
            client_ids.push((
                r.try_get::<String, _>(0)?,
                r.try_get::<String, _>(1)?,
                to_seq(r.try_get::<i64, _>(2)?)?,
                r.try_get::<i64, _>(3)?,
            ));
        }
        Ok(ChannelInit {
            last_seq: to_seq(last.unwrap_or(0))?,
            client_ids,
        })
    }

    /// Store a batch in one transaction, synced before it returns. Blocking: called
    /// through `super::blocking`, never straight from a runtime worker.
    ///
    /// In the same transaction a delete wipes its target's text (and its edits'),
    /// and a direct message makes the pair one of both users' channels.
    pub fn append_blocking(&self, batch: &[Arc<StoredMessage>]) -> Result<(), StoreError> {
        // Every critical section leaves the connection usable, so poison is harmless.
        let mut conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (channel, seq, ts, sender, name, text, meta, client_id, \
                 kind, target, emoji, react_on) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            let mut last_dm: Option<&ChannelKey> = None;
            for m in batch {
                let key = m.channel.storage_key();
                let (kind, target, emoji, on) = kind_columns(m);
                insert.execute(rusqlite::params![
                    key,
                    i64::try_from(m.seq).unwrap_or(i64::MAX),
                    m.ts,
                    m.from.as_str(),
                    m.name.as_str(),
                    m.text.as_str(),
                    m.meta.as_ref().map(|r| r.get()),
                    m.client_id.as_deref(),
                    kind,
                    target,
                    emoji,
                    on,
                ])?;
                if self.webhooks.admits(m) {
                    tx.prepare_cached(
                        "INSERT INTO webhook_queue (channel, seq, created_ms) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(rusqlite::params![
                        key,
                        i64::try_from(m.seq).unwrap_or(i64::MAX),
                        m.ts
                    ])?;
                }
                if let EntryKind::Delete { .. } = m.kind {
                    tx.prepare_cached(
                        "UPDATE messages SET text = '', meta = NULL, deleted = 1 \
                         WHERE channel = ?1 AND (seq = ?2 OR (target = ?2 AND kind = 1))",
                    )?
                    .execute(rusqlite::params![key, target])?;
                }
                if let ChannelKey::Dm(a, b) = &m.channel {
                    // Once per pair per run of its messages in the batch.
                    if last_dm != Some(&m.channel) {
                        let mut member = tx.prepare_cached(
                            "INSERT OR IGNORE INTO read_state (user_id, channel, member) \
                             VALUES (?1, ?2, 1)",
                        )?;
                        member.execute(rusqlite::params![a, key])?;
                        member.execute(rusqlite::params![b, key])?;
                        last_dm = Some(&m.channel);
                    }
                }
            }
        }
        tx.commit()?;
        drop(conn);
        for m in batch {
            if let ChannelKey::Dm(a, b) = &m.channel {
                self.note_state(a);
                self.note_state(b);
            }
        }
        Ok(())
    }

    /// `user` has a channel of their own from now on.
    fn note_state(&self, user: &str) {
        let mut set = self.with_state.lock().unwrap_or_else(|p| p.into_inner());
        if !set.contains(user) {
            set.insert(user.to_owned());
        }
    }

    /// Store a read position: clamped to the latest seq, never backwards.
    pub async fn mark_read(
        &self,
        user: &str,
        key: &ChannelKey,
        seq: i64,
        member: bool,
    ) -> Result<i64, StoreError> {
        if member {
            self.note_state(user);
        }
        Ok(sqlx::query_scalar(
            "INSERT INTO read_state (user_id, channel, read_seq, member) \
             VALUES (?1, ?2, MIN(?3, COALESCE((SELECT MAX(seq) FROM messages WHERE channel = ?2), 0)), ?4) \
             ON CONFLICT (user_id, channel) DO UPDATE SET \
             read_seq = MAX(read_state.read_seq, excluded.read_seq), \
             member = MAX(read_state.member, excluded.member) \
             RETURNING read_seq",
        )
        .bind(user)
        .bind(key.storage_key())
        .bind(seq)
        .bind(i64::from(member))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_member(
        &self,
        user: &str,
        key: &ChannelKey,
        member: bool,
    ) -> Result<(), StoreError> {
        if member {
            self.note_state(user);
        }
        sqlx::query(
            "INSERT INTO read_state (user_id, channel, member) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, channel) DO UPDATE SET member = excluded.member",
        )
        .bind(user)
        .bind(key.storage_key())
        .bind(i64::from(member))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (channel, read, latest seq, unread, a DM peer's read) of each of `user`'s channels.
    pub async fn channel_states(&self, user: &str) -> Result<Vec<StateRow>, StoreError> {
        let known = self
            .with_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user);
        if !known {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(
            "SELECT r.channel, r.read_seq, \
               COALESCE((SELECT MAX(seq) FROM messages m WHERE m.channel = r.channel), 0), \
               (SELECT COUNT(*) FROM (SELECT 1 FROM messages m WHERE m.channel = r.channel \
                  AND m.seq > r.read_seq AND m.kind = 0 AND m.deleted = 0 AND m.sender <> ?1 \
                  LIMIT ?2)), \
               CASE WHEN substr(r.channel, 1, 1) = '@' THEN \
                 (SELECT MAX(p.read_seq) FROM read_state p \
                  WHERE p.channel = r.channel AND p.user_id <> r.user_id) END \
             FROM read_state r WHERE r.user_id = ?1 AND r.member = 1 ORDER BY r.channel",
        )
        .bind(user)
        .bind(i64::try_from(MAX_UNREAD).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Store a revocation; a user's keeps the latest `issued_before` and the
    /// longest keep.
    pub async fn put_revocation(
        &self,
        key: &str,
        issued_before: Option<i64>,
        keep_until_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO revocations (key, issued_before, keep_until_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET \
             issued_before = MAX(COALESCE(revocations.issued_before, 0), COALESCE(excluded.issued_before, 0)), \
             keep_until_ms = MAX(revocations.keep_until_ms, excluded.keep_until_ms)",
        )
        .bind(key)
        .bind(issued_before)
        .bind(keep_until_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn webhook_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM webhook_queue WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(c) = &self.checkpointer {
            c.stop();
        }
        self.pool.close().await;
    }
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL checkpoints on a thread of their own. SQLite's automatic checkpoint runs in
/// the commit that crosses 1,000 WAL pages: that commit then copies the WAL into
/// the database and syncs it, tens of milliseconds during which every message's
/// fan-out waits (measured as p99 spikes in one big room). A PASSIVE checkpoint
/// from another connection never blocks the writer, and the writer starts the WAL
/// over once it has all been copied, so it stays small.
struct Checkpointer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Checkpointer {
    fn start(file: &Path) -> Result<Checkpointer, StoreError> {
        let conn = rusqlite::Connection::open(file)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("hubbub-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !*stopped {
                    let (g, _) = cv
                        .wait_timeout(stopped, CHECKPOINT_EVERY)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed (retried)");
                    }
                    stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
                // Leave a small WAL behind for the next start.
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })
            .map_err(|source| StoreError::Thread {
                what: "checkpoint",
                source,
            })?;
        Ok(Checkpointer { stop })
    }

    fn stop(&self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ChannelKey, StoredMessage};

    fn wal_size(db: &Path) -> u64 {
        std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_off_the_commit_and_stays_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("h.db");
        let store = SqliteStore::open(&file).await.expect("open");
        let text = "x".repeat(1000);
        let mut seq = 0;
        let mut biggest_batch = 0;
        for _ in 0..10 {
            let batch: Vec<Arc<StoredMessage>> = (0..20)
                .map(|_| {
                    seq += 1;
                    Arc::new(StoredMessage::message(
                        ChannelKey::Room("r".into()),
                        seq,
                        0,
                        "u".into(),
                        "u".into(),
                        text.clone(),
                    ))
                })
                .collect();
            let before = wal_size(&file);
            store.append_blocking(&batch).expect("append");
            biggest_batch = biggest_batch.max(wal_size(&file).saturating_sub(before));
            tokio::time::sleep(CHECKPOINT_EVERY + Duration::from_millis(150)).await;
        }
        // Each commit starts the WAL over once the checkpointer has copied it: it
        // holds about one batch (and the migrations'), not all ten: there is no
        // automatic checkpoint any more, so without the thread it would.
        let wal = wal_size(&file);
        assert!(biggest_batch > 0);
        assert!(
            wal < biggest_batch * 5,
            "the WAL is {wal} bytes, a batch {biggest_batch}"
        );
        store.close().await;
    }
}
