//! The hub's own periodic work: evicting idle channels, sending large rooms'
//! member counts, catching up with the shared store, and reconciling cluster
//! presence.
//!
//! Owns: the upkeep tasks, which [`spawn`] starts with the hub and the hub's stop
//! ends (as the `Db` of tokio's mini server owns its purge task). Must not: hold a channel's lock
//! across an await.

use super::channel::Channel;
use super::{Hub, lock};
use crate::message::ChannelKey;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An idle channel (no members, nothing in flight) is dropped from memory after this.
pub(super) const IDLE_EVICT: Duration = Duration::from_secs(60);
/// How often idle channels are looked for.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How often channels are compared with the shared store.
pub(super) const CATCH_UP_EVERY: Duration = Duration::from_secs(1);
/// How often large rooms' member counts are sent (at most).
pub(super) const COUNTS_EVERY: Duration = Duration::from_secs(1);
/// How long a `member` event may wait to share a write with others.
pub(super) const PRESENCE_WAKE_EVERY: Duration = Duration::from_millis(100);
/// Channels compared with the shared store per query.
const CATCH_UP_CHUNK: usize = 1000;

/// The hub's running tasks.
pub(super) struct Tasks {
    pub(super) committer: JoinHandle<()>,
    /// Ends the upkeep tasks and the broker's.
    pub(super) stop: CancellationToken,
    pub(super) upkeep: Vec<JoinHandle<()>>,
}

/// Run `work` every `period` until `stop`, holding the hub weakly between ticks.
fn every(
    hub: &Arc<Hub>,
    stop: &CancellationToken,
    period: Duration,
    work: fn(&Hub),
) -> JoinHandle<()> {
    let weak = Arc::downgrade(hub);
    let token = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => match weak.upgrade() {
                    Some(hub) => work(&hub),
                    None => return,
                },
            }
        }
    })
}

/// Start the upkeep tasks; they end with `stop` (the cluster task holds the hub
/// while it waits for a tick or a reconnection, so `Hub::stop` must end it).
pub(super) fn spawn(hub: &Arc<Hub>, committer: JoinHandle<()>, stop: CancellationToken) -> Tasks {
    let mut upkeep = vec![
        every(hub, &stop, SWEEP_EVERY, Hub::sweep),
        every(hub, &stop, COUNTS_EVERY, Hub::announce_counts),
        every(hub, &stop, PRESENCE_WAKE_EVERY, Hub::wake_quiet_rooms),
    ];
    if let Some(presence_every) = hub.broker.presence_period() {
        let weak = Arc::downgrade(hub);
        let token = stop.clone();
        upkeep.push(tokio::spawn(async move {
            let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
            let mut presence = tokio::time::interval(presence_every);
            loop {
                let Some(hub) = weak.upgrade() else { return };
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = catch_up.tick() => hub.catch_up().await,
                    _ = presence.tick() => hub.reconcile_presence().await,
                    _ = hub.broker.reconnected() => {
                        hub.catch_up().await;
                        hub.reconcile_presence().await;
                    }
                }
            }
        }));
    }
    Tasks {
        committer,
        stop,
        upkeep,
    }
}

impl Hub {
    /// Drop idle channels from memory (no members, nothing in flight, quiet for
    /// [`IDLE_EVICT`]). Their state is reloaded from the store on next use.
    pub(super) fn sweep(&self) {
        let mut evicted_rooms = Vec::new();
        let mut map = lock(&self.channels);
        map.retain(|key, ch| {
            let Ok(mut g) = ch.inner.try_lock() else {
                return true;
            };
            let idle = g.members.is_empty()
                && g.settled(&self.store)
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
        for room in evicted_rooms {
            self.forget_room(&room);
        }
    }

    /// With a shared store: compare every channel in memory with the store's last
    /// `seq` and fill what this node has not seen (a lost or late broadcast, above
    /// all the last one of a burst, which no later message would reveal).
    pub(super) async fn catch_up(self: &Arc<Self>) {
        let Store::Shared(shared) = &*self.store else {
            return;
        };
        let chans: Vec<Arc<Channel>> = lock(&self.channels)
            .values()
            .filter(|ch| ch.loaded.initialized())
            .cloned()
            .collect();
        for chunk in chans.chunks(CATCH_UP_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|c| c.key.storage_key()).collect();
            let last = match shared.last_seqs(&keys).await {
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
}
