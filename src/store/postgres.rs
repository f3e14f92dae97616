//! The PostgreSQL store: history shared by every node, and the source of `seq`.
//!
//! Owns: the PostgreSQL schema (migrations/postgres), the queries written in its
//! dialect (those both SQL stores run word for word are in `super::sql`) and the
//! numbering transaction. Must not: publish or deliver; the committer does, after
//! this commit returns.
//!
//! With several nodes no node may number messages on its own. A batch commit locks
//! the counter row of each of its channels (`channels ... FOR UPDATE`, in key order so
//! that two nodes never deadlock on each other's locks), checks `client_id`s under
//! that lock, takes the next numbers and inserts the messages, all in one
//! transaction. So `seq` is gapless and totally ordered across nodes, a resend that
//! lands on another node finds the original, and a crash at any point leaves either
//! nothing or everything of a batch.
//!
//! Migrations run on start; sqlx takes a PostgreSQL advisory lock around them, so
//! nodes that start together migrate once.

use super::{
    ChannelInit, ChannelKey, MAX_UNREAD, Row, Sequenced, StateRow, StoreError, StoredMessage,
    kind_columns, new_epoch, to_message, to_seq,
};
use crate::message::EntryKind;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often a commit that lost a lock race (deadlock or serialization failure: the
/// transaction was rolled back, nothing was stored) is tried again at once.
const LOCK_RETRIES: usize = 5;

/// An entry found by its client_id, with its channel.
#[derive(sqlx::FromRow)]
struct DupRow {
    channel: String,
    #[sqlx(flatten)]
    row: Row,
}

pub struct PgStore {
    pool: PgPool,
    epoch: String,
    pub(crate) webhooks: super::WebhookGate,
}

/// The advisory lock whose holder delivers webhooks ("hubbub webhooks").
const WEBHOOK_LOCK: i64 = 0x6875_6262_7562_7768;

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        sqlx::query("INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT DO NOTHING")
            .bind(new_epoch())
            .execute(&pool)
            .await?;
        let epoch: String = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'epoch'")
            .fetch_one(&pool)
            .await?;
        Ok(PgStore {
            pool,
            epoch,
            webhooks: super::WebhookGate::default(),
        })
    }

    /// This store's pool, for the statements both SQL stores share.
    pub(super) fn queries(&self) -> super::sql::Queries<'_, sqlx::Postgres> {
        super::sql::Queries(&self.pool)
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub async fn load_channel(&self, key: &ChannelKey) -> Result<ChannelInit, StoreError> {
        let last: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM channels WHERE key = $1")
            .bind(key.storage_key())
            .fetch_optional(&self.pool)
            .await?;
        Ok(ChannelInit {
            last_seq: to_seq(last.unwrap_or(0))?,
            // Idempotency is checked in the database at commit time.
            client_ids: Vec::new(),
        })
    }

    /// The last stored `seq` of each of `keys` that has any.
    pub async fn last_seqs(&self, keys: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT key, last_seq FROM channels WHERE key = ANY($1)")
                .bind(keys)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(|(k, s)| Ok((k, to_seq(s)?))).collect()
    }

    /// Number and store `batch` (messages whose `seq` is not yet set), in order.
    pub async fn append_sequenced(
        &self,
        batch: &[Arc<StoredMessage>],
        client_id_since_ts: i64,
    ) -> Result<Vec<Sequenced>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.try_append(batch, client_id_since_ts).await {
                Err(StoreError::Db(sqlx::Error::Database(e)))
                    if attempt < LOCK_RETRIES
                        && matches!(e.code().as_deref(), Some("40P01") | Some("40001")) =>
                {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "commit lost a lock race; retrying");
                }
                other => return other,
            }
        }
    }

    async fn try_append(
        &self,
        batch: &[Arc<StoredMessage>],
        client_id_since_ts: i64,
    ) -> Result<Vec<Sequenced>, StoreError> {
        let mut keys: Vec<String> = batch.iter().map(|m| m.channel.storage_key()).collect();
        let storage_keys = keys.clone();
        keys.sort();
        keys.dedup();

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO channels (key, last_seq) \
             SELECT k, 0 FROM UNNEST($1::text[]) AS k ORDER BY k \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
        let counters: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, last_seq FROM channels WHERE key = ANY($1) ORDER BY key FOR UPDATE",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        let mut next: HashMap<String, u64> = HashMap::with_capacity(counters.len());
        for (k, s) in counters {
            next.insert(k, to_seq(s)?);
        }

        // client_ids used before (within the window), looked up under the locks.
        let (mut qc, mut qs, mut qi) = (Vec::new(), Vec::new(), Vec::new());
        for (m, k) in batch.iter().zip(&storage_keys) {
            if let Some(cid) = &m.client_id {
                qc.push(k.as_str());
                qs.push(m.from.as_str());
                qi.push(cid.as_str());
            }
        }
        let mut seen: HashMap<(String, String, String), Arc<StoredMessage>> = HashMap::new();
        if !qc.is_empty() {
            let rows: Vec<DupRow> =
                sqlx::query_as(
                    "SELECT m.channel, m.seq, m.ts, m.sender, m.name, m.text, m.meta, m.client_id, \
                     m.kind, m.target, m.emoji, m.react_on, m.deleted \
                     FROM messages m \
                     JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS q(channel, sender, client_id) \
                       ON m.channel = q.channel AND m.sender = q.sender AND m.client_id = q.client_id \
                     WHERE m.ts >= $4",
                )
                .bind(&qc)
                .bind(&qs)
                .bind(&qi)
                .bind(client_id_since_ts)
                .fetch_all(&mut *tx)
                .await?;
            for DupRow { channel, row } in rows {
                let key = ChannelKey::from_storage_key(&channel)
                    .ok_or_else(|| StoreError::Corrupt(format!("channel key {channel:?}")))?;
                let cid = row.client_id.clone().unwrap_or_default();
                let msg = to_message(&key, row)?;
                let k = (channel, msg.from.clone(), cid);
                // Keep the oldest use of a client_id.
                if seen.get(&k).is_none_or(|o| o.seq > msg.seq) {
                    seen.insert(k, msg);
                }
            }
        }

        let mut out = Vec::with_capacity(batch.len());
        // Storage keys of the new messages, in order (the rest is bound by reference).
        let mut c: Vec<String> = Vec::new();
        for (m, k) in batch.iter().zip(storage_keys) {
            let dedupe_key = m
                .client_id
                .as_ref()
                .map(|cid| (k.clone(), m.from.clone(), cid.clone()));
            if let Some(original) = dedupe_key.as_ref().and_then(|d| seen.get(d)) {
                out.push(Sequenced::Duplicate(original.clone()));
                continue;
            }
            let counter = next.entry(k.clone()).or_insert(0);
            *counter += 1;
            let stored = Arc::new(StoredMessage {
                seq: *counter,
                ..StoredMessage::clone(m)
            });
            c.push(k);
            if let Some(d) = dedupe_key {
                seen.insert(d, stored.clone());
            }
            out.push(Sequenced::New(stored));
        }
        if !c.is_empty() {
            let fresh: Vec<&StoredMessage> = out
                .iter()
                .filter_map(|o| match o {
                    Sequenced::New(m) => Some(&**m),
                    Sequenced::Duplicate(_) => None,
                })
                .collect();
            let sq: Vec<i64> = fresh
                .iter()
                .map(|m| i64::try_from(m.seq).unwrap_or(i64::MAX))
                .collect();
            let ts: Vec<i64> = fresh.iter().map(|m| m.ts).collect();
            let sender: Vec<&str> = fresh.iter().map(|m| m.from.as_str()).collect();
            let name: Vec<&str> = fresh.iter().map(|m| m.name.as_str()).collect();
            let text: Vec<&str> = fresh.iter().map(|m| m.text.as_str()).collect();
            let meta: Vec<Option<&str>> = fresh
                .iter()
                .map(|m| m.meta.as_ref().map(|r| r.get()))
                .collect();
            let cids: Vec<Option<&str>> = fresh.iter().map(|m| m.client_id.as_deref()).collect();
            let kinds: Vec<_> = fresh.iter().map(|m| kind_columns(m)).collect();
            let kind: Vec<i16> = kinds.iter().map(|k| k.0).collect();
            let target: Vec<Option<i64>> = kinds.iter().map(|k| k.1).collect();
            let emoji: Vec<Option<&str>> = kinds.iter().map(|k| k.2).collect();
            let react_on: Vec<Option<i16>> = kinds.iter().map(|k| k.3).collect();
            sqlx::query(
                "INSERT INTO messages (channel, seq, ts, sender, name, text, meta, client_id, \
                                       kind, target, emoji, react_on) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], \
                                      $5::text[], $6::text[], $7::text[], $8::text[], \
                                      $9::int2[], $10::int8[], $11::text[], $12::int2[])",
            )
            .bind(&c)
            .bind(&sq)
            .bind(&ts)
            .bind(&sender)
            .bind(&name)
            .bind(&text)
            .bind(&meta)
            .bind(&cids)
            .bind(&kind)
            .bind(&target)
            .bind(&emoji)
            .bind(&react_on)
            .execute(&mut *tx)
            .await?;
            // A delete wipes its target's text and its edits' in the same commit.
            let (dc, dt): (Vec<&str>, Vec<i64>) = c
                .iter()
                .zip(&fresh)
                .filter_map(|(k, m)| match m.kind {
                    EntryKind::Delete { target } => {
                        Some((k.as_str(), i64::try_from(target).unwrap_or(i64::MAX)))
                    }
                    _ => None,
                })
                .unzip();
            if !dc.is_empty() {
                sqlx::query(
                    "UPDATE messages AS m SET text = '', meta = NULL, deleted = 1 \
                     FROM UNNEST($1::text[], $2::int8[]) AS d(channel, target) \
                     WHERE m.channel = d.channel \
                       AND (m.seq = d.target OR (m.target = d.target AND m.kind = 1))",
                )
                .bind(&dc)
                .bind(&dt)
                .execute(&mut *tx)
                .await?;
            }
            // Webhook events, in the same transaction as their entries.
            let (wc, (ws, wt)): (Vec<&str>, (Vec<i64>, Vec<i64>)) = c
                .iter()
                .zip(&fresh)
                .filter(|(_, m)| self.webhooks.admits(m))
                .map(|(k, m)| (k.as_str(), (i64::try_from(m.seq).unwrap_or(i64::MAX), m.ts)))
                .unzip();
            if !wc.is_empty() {
                sqlx::query(
                    "INSERT INTO webhook_queue (channel, seq, created_ms) \
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])",
                )
                .bind(&wc)
                .bind(&ws)
                .bind(&wt)
                .execute(&mut *tx)
                .await?;
            }
            // A direct message makes the pair one of both users' channels.
            let mut mu: Vec<&str> = Vec::new();
            let mut mc: Vec<&str> = Vec::new();
            for (k, m) in c.iter().zip(&fresh) {
                if let ChannelKey::Dm(a, b) = &m.channel
                    && mc.last().is_none_or(|last| *last != k.as_str())
                {
                    mu.extend([a.as_str(), b.as_str()]);
                    mc.extend([k.as_str(), k.as_str()]);
                }
            }
            if !mu.is_empty() {
                sqlx::query(
                    "INSERT INTO read_state (user_id, channel, member) \
                     SELECT u, c, 1 FROM UNNEST($1::text[], $2::text[]) AS v(u, c) \
                     ON CONFLICT (user_id, channel) DO NOTHING",
                )
                .bind(&mu)
                .bind(&mc)
                .execute(&mut *tx)
                .await?;
            }
            let (uk, us): (Vec<String>, Vec<i64>) = next
                .into_iter()
                .map(|(k, s)| (k, i64::try_from(s).unwrap_or(i64::MAX)))
                .unzip();
            sqlx::query(
                "UPDATE channels AS c SET last_seq = v.seq \
                 FROM UNNEST($1::text[], $2::int8[]) AS v(key, seq) \
                 WHERE c.key = v.key AND c.last_seq < v.seq",
            )
            .bind(&uk)
            .bind(&us)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Store a read position: clamped to the latest seq, never backwards.
    pub async fn mark_read(
        &self,
        user: &str,
        key: &ChannelKey,
        seq: i64,
        member: bool,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO read_state (user_id, channel, read_seq, member) \
             VALUES ($1, $2, LEAST($3, COALESCE((SELECT last_seq FROM channels WHERE key = $2), 0)), $4) \
             ON CONFLICT (user_id, channel) DO UPDATE SET \
             read_seq = GREATEST(read_state.read_seq, excluded.read_seq), \
             member = GREATEST(read_state.member, excluded.member) \
             RETURNING read_seq",
        )
        .bind(user)
        .bind(key.storage_key())
        .bind(seq)
        .bind(i16::from(member))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_member(
        &self,
        user: &str,
        key: &ChannelKey,
        member: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO read_state (user_id, channel, member) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, channel) DO UPDATE SET member = excluded.member",
        )
        .bind(user)
        .bind(key.storage_key())
        .bind(i16::from(member))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (channel, read, latest seq, unread, a DM peer's read) of each of `user`'s
    /// channels.
    pub async fn channel_states(&self, user: &str) -> Result<Vec<StateRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT r.channel, r.read_seq, COALESCE(c.last_seq, 0), \
               (SELECT COUNT(*) FROM (SELECT 1 FROM messages m WHERE m.channel = r.channel \
                  AND m.seq > r.read_seq AND m.kind = 0 AND m.deleted = 0 AND m.sender <> $1 \
                  LIMIT $2) AS x), \
               CASE WHEN substr(r.channel, 1, 1) = '@' THEN \
                 (SELECT MAX(p.read_seq) FROM read_state p \
                  WHERE p.channel = r.channel AND p.user_id <> r.user_id) END \
             FROM read_state r LEFT JOIN channels c ON c.key = r.channel \
             WHERE r.user_id = $1 AND r.member = 1 ORDER BY r.channel",
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
            "INSERT INTO revocations (key, issued_before, keep_until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET \
             issued_before = GREATEST(COALESCE(revocations.issued_before, 0), COALESCE(excluded.issued_before, 0)), \
             keep_until_ms = GREATEST(revocations.keep_until_ms, excluded.keep_until_ms)",
        )
        .bind(key)
        .bind(issued_before)
        .bind(keep_until_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn webhook_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM webhook_queue WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Take the webhook lock on a connection of its own, if no other node holds it.
    pub async fn webhook_leader(&self) -> Result<Option<super::WebhookLeader>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(WEBHOOK_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        // A connection without the lock goes back to the pool; one with it is
        // detached, so the lock ends with it (or with this node).
        Ok(got.then(|| super::WebhookLeader::Shared(Box::new(conn.detach()))))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
