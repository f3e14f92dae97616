//! One channel (a room or a DM pair) in memory: its sequence, ordered delivery with
//! gap filling, and fan-out to this node's receivers.
//!
//! Owns: [`Channel`] and its state under one lock, loading it from the store (and,
//! for a room, its broker subscription and cluster presence), and
//! [`Hub::deliver`], the one local fan-out path that every committed message takes,
//! whether it was sent here or (with a cross-node broker) elsewhere. Must not: hold
//! the channel's lock across an await, or do per-receiver work other than one push
//! of the encoded frames (shared bytes) into each receiver's bounded outbox.
//!
//! Runs: messages delivered under one hold of the lock (a group commit's messages
//! of this room) reach each receiver with one push, and a batching receiver as one
//! frame built once for all of them.
//!
//! Ordering: `committed` is the last `seq` delivered here. A message ahead of
//! `committed + 1` waits in `pending` while the missing ones are read from the store
//! (a gap: a broadcast that was lost, or is merely late); a periodic catch-up
//! compares each channel with the store so that even the last message of a burst
//! is never missed. Duplicates (`seq <= committed`) are dropped.

use super::outbox::{Outbox, Pushed, SharedRun};
use super::presence::Presence;
use super::writers;
use super::{Hub, client_id_horizon, lock};
use crate::broker::Topic;
use crate::message::{ChannelKey, EntryKind, StoredMessage};
use crate::protocol::{self, CommandError, ErrorCode};
use crate::store::{ChannelInit, Store};
use crate::ws::Text;
use indexmap::IndexMap;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Committed messages each channel keeps in memory to close the join race.
pub(super) const RECENT: usize = 64;
/// Messages held back per channel while a gap before them is filled; more are
/// dropped from the buffer and read from the store with the gap.
const MAX_PENDING: usize = 4096;
/// Deletes remembered per channel for [`ChannelInner::deleted_targets`].
const DELETED_KEPT: usize = 64;
/// How long a gap may be just a late broadcast before the store is asked.
const GAP_GRACE: Duration = Duration::from_millis(25);
/// Messages read from the store per gap-filling query.
const FILL_PAGE: u64 = 1000;

/// A room or a DM pair in memory.
pub struct Channel {
    pub(super) key: ChannelKey,
    pub(super) loaded: OnceCell<()>,
    pub(super) inner: Mutex<ChannelInner>,
}

pub(super) struct ChannelInner {
    /// The next `seq` to assign (when this node numbers messages).
    pub(super) next_seq: u64,
    /// The last `seq` delivered on this node (stored, in order, nothing missing).
    pub(super) committed: u64,
    /// Is `committed` known? (A DM pair first seen from the broker starts at the
    /// first message it sees.) Messages before that wait in `pending`.
    pub(super) anchored: bool,
    /// Messages that arrived ahead of `committed + 1`, waiting for the gap to close.
    pub(super) pending: BTreeMap<u64, Arc<StoredMessage>>,
    /// The highest `seq` known to exist (seen from the broker or the store).
    pub(super) highest_seen: u64,
    /// A gap-filling task is running for this channel.
    pub(super) filling: bool,
    /// Presence events applied from other nodes so far: a reconciliation whose
    /// snapshot is older than the latest event does not overwrite it.
    pub(super) presence_events: u64,
    pub(super) recent: VecDeque<Arc<StoredMessage>>,
    /// This node's member connections, in the order they joined. Insertion-ordered
    /// rather than a `HashMap`'s order for the fan-out: connections that joined one
    /// after another had their tasks, outboxes and sockets allocated one after
    /// another, and visiting them in that order keeps the memory each delivery
    /// touches close to the previous one's (measured in one room of 5,000: 14 %
    /// less server CPU per delivery than in hash order, lower in 7 of 8 alternated
    /// rounds; BENCHMARKS.md). A leave swaps the last member into its place, O(1).
    pub(super) members: IndexMap<u64, Arc<super::Conn>>,
    /// Users present in the room (here or on other nodes), by user id: ordered, so
    /// a page of members is a range and the first page needs no sort.
    pub(super) presence: BTreeMap<Arc<str>, Presence>,
    /// The member count last sent in a `members` event (large rooms).
    pub(super) announced_count: usize,
    /// The member count changed in a large room; the next tick announces it.
    pub(super) count_dirty: bool,
    /// Members got quiet presence events; the next presence tick wakes them.
    pub(super) wake_pending: bool,
    /// When this room's batching members were last handed to the writer threads,
    /// or are due to be ([`super::writers::Writers::due`]).
    pub(super) batch_written: Option<std::time::Instant>,
    /// Targets of the deletes sequenced here lately (at most [`DELETED_KEPT`]):
    /// an edit, reaction or second delete racing a delete is refused here even
    /// before the delete is stored.
    pub(super) deleted_targets: VecDeque<u64>,
    /// (user, client_id) -> (seq, ts), for idempotent resends.
    pub(super) client_ids: HashMap<(String, String), (u64, i64)>,
    client_id_order: VecDeque<(i64, String, String)>,
    /// Set when the channel was dropped from the hub's map; holders must look again.
    pub(super) evicted: bool,
    pub(super) last_active: Instant,
}

impl Channel {
    pub(super) fn new(key: &ChannelKey) -> Arc<Channel> {
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
                members: IndexMap::new(),
                presence: BTreeMap::new(),
                announced_count: 0,
                count_dirty: false,
                wake_pending: false,
                batch_written: None,
                deleted_targets: VecDeque::new(),
                client_ids: HashMap::new(),
                client_id_order: VecDeque::new(),
                evicted: false,
                last_active: Instant::now(),
            }),
        })
    }
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

    /// Remember that the message at `target` is being deleted.
    pub(super) fn note_deleted(&mut self, target: u64) {
        if self.deleted_targets.len() == DELETED_KEPT {
            self.deleted_targets.pop_front();
        }
        self.deleted_targets.push_back(target);
    }

    pub(super) fn remember_client_id(&mut self, user: String, cid: String, seq: u64, ts: i64) {
        self.client_id_order
            .push_back((ts, user.clone(), cid.clone()));
        self.client_ids.insert((user, cid), (seq, ts));
    }

    pub(super) fn prune_client_ids(&mut self, now_ms: i64) {
        let horizon =
            now_ms - i64::try_from(super::CLIENT_ID_WINDOW.as_millis()).unwrap_or(i64::MAX);
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

    /// Nothing of this channel is in flight: it may be evicted when idle.
    pub(super) fn settled(&self, store: &Store) -> bool {
        match store {
            Store::Local(_) => self.next_seq == self.committed + 1,
            Store::Shared(_) => self.pending.is_empty() && !self.filling,
        }
    }
}

impl Hub {
    /// The channel for `key`, loaded on first use. A room's channel is subscribed
    /// on the broker first and its cluster presence read, then its last `seq`, so
    /// nothing published after the load can be missed.
    pub(super) async fn channel(
        self: &Arc<Self>,
        key: &ChannelKey,
    ) -> Result<Arc<Channel>, CommandError> {
        let ch = lock(&self.channels)
            .entry(key.clone())
            .or_insert_with(|| Channel::new(key))
            .clone();
        ch.loaded
            .get_or_try_init(|| async {
                if matches!(*self.store, Store::Shared(_)) && matches!(key, ChannelKey::Dm(..)) {
                    // A DM pair is anchored by the first message delivered here.
                    return Ok(());
                }
                let mut remote = Default::default();
                if let ChannelKey::Room(room) = key {
                    self.broker.subscribe(Topic::Room(room)).await;
                    match self.broker.presence_snapshot(room).await {
                        Ok(entries) => remote = entries,
                        Err(e) => tracing::warn!(error = %e, "reading room presence failed"),
                    }
                }
                let init = self
                    .store
                    .load_channel(key, client_id_horizon())
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "loading channel state failed");
                        // The next attempt subscribes again: release this one's hold.
                        if let ChannelKey::Room(room) = key {
                            self.broker.unsubscribe(Topic::Room(room));
                        }
                        CommandError::new(ErrorCode::Unavailable, "history store unavailable")
                    })?;
                let mut g = lock(&ch.inner);
                g.apply_init(init);
                Presence::adopt_snapshot(&mut g, remote);
                // Anything that arrived from the broker during the load.
                self.advance(&ch, &mut g);
                Ok::<(), CommandError>(())
            })
            .await?;
        Ok(ch)
    }

    /// Deliver a stored message to every local receiver, in `seq` order. The single
    /// fan-out path: local commits, broker envelopes and gap fills all end here.
    /// Duplicates are dropped; a message ahead of a gap waits for the gap to close.
    pub fn deliver(self: &Arc<Self>, ch: &Arc<Channel>, msg: &Arc<StoredMessage>) {
        self.deliver_run(ch, std::slice::from_ref(msg));
    }

    /// [`deliver`](Self::deliver) for messages of one channel committed together,
    /// under one lock: each receiver gets the run with one push (and a batching
    /// receiver one shared frame), so the per-receiver work is per run, not per
    /// message.
    pub fn deliver_run(self: &Arc<Self>, ch: &Arc<Channel>, msgs: &[Arc<StoredMessage>]) {
        let mut g = lock(&ch.inner);
        let mut run = Run::default();
        for msg in msgs {
            self.deliver_locked(ch, &mut g, msg, &mut run);
        }
        self.push_run(&mut g, run);
    }

    fn deliver_locked(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        g: &mut MutexGuard<'_, ChannelInner>,
        msg: &Arc<StoredMessage>,
        run: &mut Run,
    ) {
        if !g.anchored {
            if matches!(*self.store, Store::Shared(_)) && matches!(ch.key, ChannelKey::Dm(..)) {
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
            self.start_fill(ch, g);
            return;
        }
        self.fan_out(ch, g, msg, run);
        self.advance_into(ch, g, run);
    }

    /// Deliver what waits in `pending` now that it is next, and start filling if a
    /// gap remains.
    pub(super) fn advance(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        g: &mut MutexGuard<'_, ChannelInner>,
    ) {
        let mut run = Run::default();
        self.advance_into(ch, g, &mut run);
        self.push_run(g, run);
    }

    fn advance_into(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        g: &mut MutexGuard<'_, ChannelInner>,
        run: &mut Run,
    ) {
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
                        self.fan_out(ch, g, &m, run);
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
    pub(super) fn start_fill(
        self: &Arc<Self>,
        ch: &Arc<Channel>,
        g: &mut MutexGuard<'_, ChannelInner>,
    ) {
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

    /// Take one message (the next in order) as delivered: a room's goes into
    /// `run`, for [`push_run`](Self::push_run); a DM's to its parties at once.
    fn fan_out(
        &self,
        ch: &Channel,
        g: &mut MutexGuard<'_, ChannelInner>,
        msg: &Arc<StoredMessage>,
        run: &mut Run,
    ) {
        g.committed = msg.seq;
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back(msg.clone());
        if let EntryKind::Delete { target } = msg.kind {
            // The ring serves joins as the store would: with the tombstone.
            for e in g.recent.iter_mut() {
                let hit = e.seq == target
                    || matches!(e.kind, EntryKind::Edit { target: t } if t == target);
                if hit && !e.deleted {
                    *e = Arc::new(e.tombstone());
                }
            }
            // Every node learns of the delete here, whoever sequenced it.
            if !g.deleted_targets.contains(&target) {
                g.note_deleted(target);
            }
        }
        match &ch.key {
            ChannelKey::Room(_) => {
                if !g.members.is_empty() {
                    run.0
                        .push(Text::from(protocol::events::message_event(msg, "")));
                }
            }
            ChannelKey::Dm(a, b) => {
                let mut n = 0u64;
                for viewer in [a, b] {
                    // Encoded once per party, and only if the party has connections.
                    let mut frame = None;
                    n += self.registry.send_to(viewer, || {
                        frame
                            .get_or_insert_with(|| {
                                Text::from(protocol::events::message_event(msg, viewer))
                            })
                            .clone()
                    });
                }
                self.metrics.deliveries.increment(n);
                self.metrics.out("message", n);
            }
        }
    }

    /// Send a room's run of messages (encoded once) to this node's members: one
    /// push each of one shared entry, built once: the run's frames in wire form,
    /// or for members that batch one newline-joined frame (unless it would exceed
    /// [`crate::ws::MAX_BATCH_FRAME`]). Called before the channel's lock is
    /// released, so runs leave in `seq` order.
    fn push_run(&self, g: &mut MutexGuard<'_, ChannelInner>, run: Run) {
        let frames = run.0;
        if frames.is_empty() {
            return; // nothing, or a DM's (sent by fan_out itself)
        }
        let mut shared = SharedRun::new(&frames);
        let mut refused = 0u64;
        // Disjoint borrows of the members and the room's pace.
        let inner: &mut ChannelInner = g;
        // Members whose sessions are parked: written by the writer threads, a
        // chunk at a time, handed over as each fills (the threads start on the
        // first while the rest are queued). Those that batch go in chunks of
        // their own, handed over when the room is due (`Writers::due`, asked
        // once per run, at the first of them).
        let mut chunk: Vec<Arc<Outbox>> = Vec::new();
        let mut batching: Vec<Arc<Outbox>> = Vec::new();
        let mut due = None;
        for c in inner.members.values() {
            let (chunk, at) = match c.outbox.push_run(&mut shared) {
                Pushed::Queued => continue,
                Pushed::Refused => {
                    refused += 1;
                    continue;
                }
                Pushed::Direct => (&mut chunk, None),
                Pushed::DirectBatch => (
                    &mut batching,
                    *due.get_or_insert_with(|| self.batch_due(&mut inner.batch_written)),
                ),
            };
            if chunk.capacity() == 0 {
                chunk.reserve_exact(writers::CHUNK);
            }
            chunk.push(c.outbox.clone());
            if chunk.len() == writers::CHUNK {
                self.write_direct(std::mem::take(chunk), at);
            }
        }
        if !chunk.is_empty() {
            self.write_direct(chunk, None);
        }
        if !batching.is_empty() {
            self.write_direct(batching, due.flatten());
        }
        let k = frames.len() as u64;
        let n = inner.members.len() as u64;
        self.metrics.deliveries.increment((n - refused) * k);
        self.metrics.out("message", (n - refused) * k);
        self.metrics.dropped_deliveries.increment(refused * k);
    }
}

/// A room's messages delivered under one hold of its lock, encoded, waiting to be
/// pushed to its members together.
#[derive(Default)]
struct Run(Vec<Text>);
