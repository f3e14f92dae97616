//! The memory store: each channel's history in a bounded ring, gone on restart.
//!
//! Owns: the rings and the epoch. Must not: grow without bound (each ring keeps
//! `--memory-history` messages) or claim to hold what it dropped.
//!
//! A fresh epoch on every start tells reconnecting clients that history was lost,
//! so they get `recovered: false` instead of a silently wrong "nothing missed".

use super::{ChannelInit, ChannelKey, StoredMessage, new_epoch};
use crate::message::EntryKind;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub struct MemoryStore {
    epoch: String,
    ring: usize,
    /// std Mutex: every operation is a short in-memory copy, never held across await.
    channels: Mutex<HashMap<ChannelKey, VecDeque<Arc<StoredMessage>>>>,
    /// Bans live as long as the process, like the history.
    bans: Mutex<HashMap<String, (Option<i64>, String)>>,
    /// Revocations, like bans: for the life of the process.
    revocations: Mutex<HashMap<String, Option<i64>>>,
    /// (user, channel storage key) -> (read position, member), like the rest.
    read_state: Mutex<BTreeMap<(String, String), (i64, bool)>>,
}

impl MemoryStore {
    pub fn new(ring: usize) -> Self {
        MemoryStore {
            epoch: new_epoch(),
            ring: ring.max(1),
            channels: Mutex::new(HashMap::new()),
            bans: Mutex::new(HashMap::new()),
            revocations: Mutex::new(HashMap::new()),
            read_state: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelKey, VecDeque<Arc<StoredMessage>>>> {
        // A panic while holding this lock leaves the map consistent (each operation
        // is a single push/pop/scan), so a poisoned lock is safe to keep using.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn load_channel(&self, key: &ChannelKey, since_ts: i64) -> ChannelInit {
        let map = self.lock();
        let Some(ring) = map.get(key) else {
            return ChannelInit::default();
        };
        ChannelInit {
            last_seq: ring.back().map_or(0, |m| m.seq),
            client_ids: ring
                .iter()
                .filter(|m| m.ts >= since_ts)
                .filter_map(|m| {
                    m.client_id
                        .as_ref()
                        .map(|c| (m.from.clone(), c.clone(), m.seq, m.ts))
                })
                .collect(),
        }
    }

    /// Keep a batch; a delete replaces its target (and the target's edits) with
    /// tombstones, and a direct message makes the pair both users' channel.
    pub fn append(&self, batch: &[Arc<StoredMessage>]) {
        let mut map = self.lock();
        for m in batch {
            let ring = map.entry(m.channel.clone()).or_default();
            if ring.len() == self.ring {
                ring.pop_front();
            }
            ring.push_back(m.clone());
            if let EntryKind::Delete { target } = m.kind {
                for e in ring.iter_mut() {
                    let hit = e.seq == target
                        || (matches!(e.kind, EntryKind::Edit { target: t } if t == target));
                    if hit && !e.deleted {
                        *e = Arc::new(e.tombstone());
                    }
                }
            }
            if let ChannelKey::Dm(a, b) = &m.channel {
                let mut rs = self.read_lock();
                for u in [a, b] {
                    rs.entry((u.clone(), m.channel.storage_key()))
                        .or_insert((0, true));
                }
            }
        }
    }

    fn read_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), (i64, bool)>> {
        self.read_state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_seq(&self, key: &ChannelKey) -> i64 {
        self.lock()
            .get(key)
            .and_then(|r| r.back())
            .map_or(0, |m| i64::try_from(m.seq).unwrap_or(i64::MAX))
    }

    pub fn mark_read(&self, user: &str, key: &ChannelKey, seq: i64, member: bool) -> i64 {
        let latest = self.last_seq(key);
        let mut rs = self.read_lock();
        let e = rs
            .entry((user.to_owned(), key.storage_key()))
            .or_insert((0, member));
        e.0 = e.0.max(seq.min(latest));
        e.1 |= member;
        e.0
    }

    pub fn set_member(&self, user: &str, key: &ChannelKey, member: bool) {
        self.read_lock()
            .entry((user.to_owned(), key.storage_key()))
            .or_insert((0, member))
            .1 = member;
    }

    /// (channel, read, latest seq, unread, a DM peer's read) of each of `user`'s
    /// channels.
    pub fn channel_states(&self, user: &str) -> Vec<super::StateRow> {
        let mine: Vec<(String, i64)> = self
            .read_lock()
            .range((user.to_owned(), String::new())..)
            .take_while(|((u, _), _)| u == user)
            .filter(|(_, (_, member))| *member)
            .map(|((_, c), (read, _))| (c.clone(), *read))
            .collect();
        let peer_reads: Vec<Option<i64>> = {
            let rs = self.read_lock();
            mine.iter()
                .map(|(c, _)| {
                    let key = ChannelKey::from_storage_key(c)?;
                    let peer = key.peer_of(user)?;
                    rs.get(&(peer.to_owned(), c.clone())).map(|(r, _)| *r)
                })
                .collect()
        };
        let map = self.lock();
        mine.into_iter()
            .zip(peer_reads)
            .map(|((c, read), peer_read)| {
                let ring = ChannelKey::from_storage_key(&c).and_then(|k| map.get(&k));
                let latest = ring.and_then(|r| r.back()).map_or(0, |m| m.seq);
                let unread = ring.map_or(0, |r| {
                    r.iter()
                        .filter(|m| {
                            i64::try_from(m.seq).unwrap_or(i64::MAX) > read
                                && m.is_message()
                                && !m.deleted
                                && m.from != user
                        })
                        .count()
                });
                (
                    c,
                    read,
                    i64::try_from(latest).unwrap_or(i64::MAX),
                    i64::try_from(unread).unwrap_or(i64::MAX),
                    peer_read,
                )
            })
            .collect()
    }

    pub fn annotations(&self, key: &ChannelKey, first: u64, last: u64) -> Vec<Arc<StoredMessage>> {
        let map = self.lock();
        map.get(key).map_or_else(Vec::new, |ring| {
            ring.iter()
                .filter(|m| {
                    matches!(m.kind, EntryKind::Edit { .. } | EntryKind::React { .. })
                        && m.kind.target().is_some_and(|t| (first..=last).contains(&t))
                })
                .cloned()
                .collect()
        })
    }

    pub fn range(&self, key: &ChannelKey, after: u64, upto: u64) -> Vec<Arc<StoredMessage>> {
        let map = self.lock();
        map.get(key).map_or_else(Vec::new, |ring| {
            ring.iter()
                .filter(|m| m.seq > after && m.seq <= upto)
                .cloned()
                .collect()
        })
    }

    pub fn latest(
        &self,
        key: &ChannelKey,
        before: Option<u64>,
        limit: u64,
        which: super::Which,
    ) -> Vec<Arc<StoredMessage>> {
        let map = self.lock();
        let Some(ring) = map.get(key) else {
            return Vec::new();
        };
        let mut out: Vec<_> = ring
            .iter()
            .rev()
            .filter(|m| before.is_none_or(|b| m.seq < b))
            .filter(|m| which == super::Which::Entries || m.is_message())
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// (channel storage key, last seq) of channels starting with `prefix`, after
    /// `after`, by key.
    pub fn rooms(&self, prefix: &str, after: &str, limit: i64) -> Vec<(String, i64)> {
        let map = self.lock();
        let mut out: Vec<(String, i64)> = map
            .iter()
            .filter_map(|(key, ring)| {
                let k = key.storage_key();
                let last = ring.back()?.seq;
                (k.starts_with(prefix) && k.as_str() > after)
                    .then(|| (k, i64::try_from(last).unwrap_or(i64::MAX)))
            })
            .collect();
        out.sort();
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        out
    }

    fn bans_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<i64>, String)>> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bans(&self) -> Vec<(String, Option<i64>, String)> {
        self.bans_lock()
            .iter()
            .map(|(u, (until, reason))| (u.clone(), *until, reason.clone()))
            .collect()
    }

    pub fn put_ban(&self, user: &str, until: Option<i64>, reason: &str) {
        self.bans_lock()
            .insert(user.to_owned(), (until, reason.to_owned()));
    }

    pub fn delete_ban(&self, user: &str) -> bool {
        self.bans_lock().remove(user).is_some()
    }

    pub fn revocations(&self) -> Vec<(String, Option<i64>)> {
        self.revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    pub fn put_revocation(&self, key: &str, issued_before: Option<i64>) {
        let mut g = self.revocations.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.entry(key.to_owned()).or_insert(issued_before);
        *e = (*e).max(issued_before);
    }
}
