//! The statements both SQL stores run word for word, written once over sqlx's
//! [`Database`] (SQLite reads PostgreSQL's `$N` parameters as they are).
//!
//! Owns: those shared statements: reads of a channel's entries, the rooms list,
//! bans, revocations in force, and the webhook queue's reads and inserts.
//! Must not: hold anything a dialect decides (upserts built on `GREATEST` or
//! `MIN`, the numbering transaction, `channels` bookkeeping, deleting many queue
//! rows at once): those stay in [`super::sqlite`] and [`super::postgres`], next to
//! the dialect they are written in.

/// `SELECT <every column of an entry> FROM messages <rest>`: the column list
/// matching [`Row`].
macro_rules! select_entries {
    ($rest:literal) => {
        concat!(
            "SELECT seq, ts, sender, name, text, meta, client_id, kind, target, emoji, \
             react_on, deleted FROM messages ",
            $rest
        )
    };
}

use super::{ChannelKey, QueueHead, QueuedRow, Row, StoreError, StoredMessage, Which, to_message};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use std::sync::Arc;

/// A store's pool, for the statements of this module.
pub(super) struct Queries<'p, DB: Database>(pub &'p Pool<DB>);

impl<DB> Queries<'_, DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> Row: FromRow<'r, DB::Row>,
    for<'r> QueuedRow: FromRow<'r, DB::Row>,
    for<'r> QueueHead: FromRow<'r, DB::Row>,
    for<'r> (String, i64): FromRow<'r, DB::Row>,
    for<'r> (String, Option<i64>): FromRow<'r, DB::Row>,
    for<'r> (String, Option<i64>, String): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
{
    /// A channel's entry rows that `sql` picks: `$1` is the channel, `$2` and `$3`
    /// two bounds (saturated into SQL's i64), in the order `sql` gives them.
    async fn entries(
        &self,
        sql: &'static str,
        key: &ChannelKey,
        low: u64,
        high: u64,
    ) -> Result<Vec<Row>, StoreError> {
        Ok(sqlx::query_as(sql)
            .bind(key.storage_key())
            .bind(i64::try_from(low).unwrap_or(i64::MAX))
            .bind(i64::try_from(high).unwrap_or(i64::MAX))
            .fetch_all(self.0)
            .await?)
    }

    /// A channel's entries `after < seq <= upto`, ascending.
    pub async fn range(
        &self,
        key: &ChannelKey,
        after: u64,
        upto: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        let sql = select_entries!("WHERE channel = $1 AND seq > $2 AND seq <= $3 ORDER BY seq ASC");
        let rows = self.entries(sql, key, after, upto).await?;
        rows.into_iter().map(|r| to_message(key, r)).collect()
    }

    /// The last `limit` entries (or messages) before `before`, ascending.
    pub async fn latest(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
        which: Which,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        let sql = match which {
            Which::Entries => {
                select_entries!("WHERE channel = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3")
            }
            Which::Messages => select_entries!(
                "WHERE channel = $1 AND seq < $2 AND kind = 0 ORDER BY seq DESC LIMIT $3"
            ),
        };
        let mut rows = self
            .entries(sql, key, before.unwrap_or(u64::MAX), limit)
            .await?;
        rows.reverse();
        rows.into_iter().map(|r| to_message(key, r)).collect()
    }

    /// Edits and reactions of the messages `first..=last`, ascending.
    pub async fn annotations(
        &self,
        key: &ChannelKey,
        first: u64,
        last: u64,
    ) -> Result<Vec<Arc<StoredMessage>>, StoreError> {
        let sql = select_entries!(
            "WHERE channel = $1 AND target >= $2 AND target <= $3 AND kind IN (1, 3) ORDER BY seq ASC"
        );
        let rows = self.entries(sql, key, first, last).await?;
        rows.into_iter().map(|r| to_message(key, r)).collect()
    }

    /// (channel storage key, last seq) of channels starting with `prefix`, after
    /// `after`, by key.
    pub async fn rooms(
        &self,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT channel, MAX(seq) FROM messages WHERE substr(channel, 1, length($1)) = $1 \
             AND channel > $2 GROUP BY channel ORDER BY channel LIMIT $3",
        )
        .bind(prefix)
        .bind(after)
        .bind(limit)
        .fetch_all(self.0)
        .await?)
    }

    /// Every ban: (user, until in ms or None, reason).
    pub async fn bans(&self) -> Result<Vec<(String, Option<i64>, String)>, StoreError> {
        Ok(sqlx::query_as("SELECT user_id, until_ms, reason FROM bans")
            .fetch_all(self.0)
            .await?)
    }

    pub async fn put_ban(
        &self,
        user: &str,
        until: Option<i64>,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO bans (user_id, until_ms, reason) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET until_ms = excluded.until_ms, reason = excluded.reason",
        )
        .bind(user)
        .bind(until)
        .bind(reason)
        .execute(self.0)
        .await?;
        Ok(())
    }

    /// True if there was a ban to lift. (`RETURNING` rather than the count of
    /// rows: sqlx has no count of rows affected over any database.)
    pub async fn delete_ban(&self, user: &str) -> Result<bool, StoreError> {
        let gone: Option<(String,)> =
            sqlx::query_as("DELETE FROM bans WHERE user_id = $1 RETURNING user_id")
                .bind(user)
                .fetch_optional(self.0)
                .await?;
        Ok(gone.is_some())
    }

    /// Revocations still in force at `now_ms` (older ones are deleted).
    pub async fn revocations(&self, now_ms: i64) -> Result<Vec<(String, Option<i64>)>, StoreError> {
        sqlx::query("DELETE FROM revocations WHERE keep_until_ms < $1")
            .bind(now_ms)
            .execute(self.0)
            .await?;
        Ok(sqlx::query_as("SELECT key, issued_before FROM revocations")
            .fetch_all(self.0)
            .await?)
    }

    /// The oldest `limit` queue rows, and the entries those of them name.
    pub async fn webhook_batch(
        &self,
        limit: i64,
    ) -> Result<(Vec<QueueHead>, Vec<QueuedRow>), StoreError> {
        let heads: Vec<QueueHead> =
            sqlx::query_as("SELECT id, created_ms, body FROM webhook_queue ORDER BY id LIMIT $1")
                .bind(limit)
                .fetch_all(self.0)
                .await?;
        let (Some(first), Some(last)) = (heads.first(), heads.last()) else {
            return Ok((heads, Vec::new()));
        };
        let entries: Vec<QueuedRow> = sqlx::query_as(
            "SELECT q.id AS qid, q.created_ms AS qcreated, q.channel AS qchannel, \
             m.seq, m.ts, m.sender, m.name, m.text, m.meta, m.client_id, m.kind, m.target, \
             m.emoji, m.react_on, m.deleted \
             FROM webhook_queue q JOIN messages m ON m.channel = q.channel AND m.seq = q.seq \
             WHERE q.id >= $1 AND q.id <= $2 AND q.body IS NULL",
        )
        .bind(first.0)
        .bind(last.0)
        .fetch_all(self.0)
        .await?;
        Ok((heads, entries))
    }

    /// Queue a non-entry event (its own transaction).
    pub async fn queue_webhook_event(
        &self,
        channel: &str,
        body: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_queue (channel, seq, body, created_ms) VALUES ($1, 0, $2, $3)",
        )
        .bind(channel)
        .bind(body)
        .bind(now_ms)
        .execute(self.0)
        .await?;
        Ok(())
    }

    pub async fn webhook_len(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM webhook_queue")
            .fetch_one(self.0)
            .await?;
        Ok(n)
    }

    pub async fn check(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.0).await?;
        Ok(())
    }
}

/// The shared statements on SQLite, which reads PostgreSQL's `$N` parameters (the
/// PostgreSQL side runs them through every clustered test: tests/cluster.rs).
#[cfg(test)]
mod tests {
    use super::super::SqliteStore;
    use super::*;

    async fn store_with(entries: &[(&str, u64)]) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("h.db"))
            .await
            .expect("open");
        let batch: Vec<Arc<StoredMessage>> = entries
            .iter()
            .map(|(room, seq)| {
                Arc::new(StoredMessage::message(
                    ChannelKey::Room((*room).into()),
                    *seq,
                    0,
                    "u".into(),
                    "u".into(),
                    format!("{room} {seq}"),
                ))
            })
            .collect();
        store.append_blocking(&batch).expect("append");
        (dir, store)
    }

    fn seqs(entries: &[Arc<StoredMessage>]) -> Vec<u64> {
        entries.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn range_reads_the_entries_after_one_seq_up_to_another_ascending() {
        let (_dir, store) = store_with(&[("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1)]).await;
        let got = store
            .queries()
            .range(&ChannelKey::Room("a".into()), 1, 3)
            .await
            .expect("range");
        assert_eq!(seqs(&got), [2, 3]);
        assert_eq!(got[0].text, "a 2");
    }

    #[tokio::test]
    async fn latest_reads_the_last_entries_before_a_seq_ascending() {
        let (_dir, store) = store_with(&[("a", 1), ("a", 2), ("a", 3), ("a", 4)]).await;
        let q = store.queries();
        let key = ChannelKey::Room("a".into());
        let got = q.latest(&key, Some(4), 2, Which::Entries).await;
        assert_eq!(seqs(&got.expect("latest")), [2, 3]);
        let got = q.latest(&key, None, 10, Which::Messages).await;
        assert_eq!(seqs(&got.expect("latest")), [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn rooms_binds_a_parameter_used_twice_as_one_value() {
        let (_dir, store) = store_with(&[("ab", 1), ("ab", 2), ("ac", 1), ("b", 5)]).await;
        let got = store.queries().rooms("#a", "", 10).await.expect("rooms");
        assert_eq!(got, [("#ab".to_owned(), 2), ("#ac".to_owned(), 1)]);
        let got = store.queries().rooms("#a", "#ab", 10).await.expect("rooms");
        assert_eq!(got, [("#ac".to_owned(), 1)]);
    }

    #[tokio::test]
    async fn deleting_a_ban_says_whether_there_was_one_to_lift() {
        let (_dir, store) = store_with(&[]).await;
        let q = store.queries();
        q.put_ban("mallory", Some(5), "spam").await.expect("ban");
        q.put_ban("mallory", None, "worse")
            .await
            .expect("ban again");
        let bans = q.bans().await.expect("bans");
        assert_eq!(bans, [("mallory".to_owned(), None, "worse".to_owned())]);
        assert!(q.delete_ban("mallory").await.expect("unban"));
        assert!(!q.delete_ban("mallory").await.expect("unban again"));
        assert!(q.bans().await.expect("bans").is_empty());
    }
}
