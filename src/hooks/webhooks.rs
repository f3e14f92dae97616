//! Webhooks (SERVER-API.md): every stored message, edit and delete, POSTed to the
//! app's backend from the durable queue the store writes in the same transaction
//! as the entries.
//!
//! Owns: the delivery loop — one node of a cluster delivers (the store says which:
//! on PostgreSQL, the holder of an advisory lock), in queue order, in batches of at
//! most [`BATCH`], signed, each batch retried with exponential backoff (1 s doubling
//! to 5 min) until a 2xx, then forgotten — the queue's bound and metrics, and
//! turning the hub's presence activity into queued events.
//! Must not: write entries to the queue (the store does, in their own transaction),
//! or skip a batch (the order per room or DM is the queue's order, so a failing
//! batch holds the rest back).
//!
//! At least once: a batch is forgotten only after the backend's 2xx, so a crash
//! between the POST and the delete sends it again (same `event_id`s).

use super::Signer;
use crate::config::Config;
use crate::hub::{Activity, Hub};
use crate::protocol;
use crate::protocol::events::WebhookItem;
use crate::store::{Queued, Store, WebhookLeader};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Events per POST at most.
pub const BATCH: usize = 100;
/// First and longest wait before a failed batch is sent again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often an empty queue is looked at again.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often the queue's length is compared with its bound.
const BOUND_CHECK: Duration = Duration::from_secs(2);
/// How often a node that does not deliver tries to become the one that does.
const LEADER_RETRY: Duration = Duration::from_secs(2);
/// Presence changes waiting to be queued; beyond it they are dropped (counted).
const ACTIVITY_QUEUE: usize = 10_000;
/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Webhooks {
    url: String,
    client: reqwest::Client,
    signer: Option<Signer>,
    store: Arc<Store>,
}

impl Webhooks {
    /// Start delivering, if `--webhook-url` is set: the store queues entries from
    /// now on, and this node delivers whenever it is the one that may. Ends when
    /// `stop` is cancelled.
    pub fn start(
        config: &Config,
        hub: &Arc<Hub>,
        stop: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, super::HookError> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let store = hub.store().clone();
        // Presence events: handed over under the hub's locks, queued by a task.
        let (tx, rx) = tokio::sync::mpsc::channel(ACTIVITY_QUEUE);
        let counted = store.clone();
        hub.on_activity(move |a| {
            if tx.try_send(a).is_err() {
                counted.note_webhook_dropped();
            }
        });
        tokio::spawn(queue_presence(Arc::downgrade(hub), rx));
        if config.webhook_secret.is_none() {
            tracing::warn!("--webhook-url without --webhook-secret: webhooks are not signed");
        }
        store.enable_webhooks();
        // Every node watches the bound (each node's commits write to the queue).
        tokio::spawn(watch_bound(
            store.clone(),
            u64::try_from(config.webhook_queue_max).unwrap_or(u64::MAX),
            stop.clone(),
        ));
        let w = Webhooks {
            url: url.clone(),
            client: reqwest::Client::builder().timeout(POST_TIMEOUT).build()?,
            signer: config.webhook_secret.as_deref().map(Signer::new),
            store,
        };
        Ok(Some(tokio::spawn(w.run(stop))))
    }

    async fn run(self, stop: CancellationToken) {
        let delivered = metrics::counter!("hubbub_webhook_delivered_total");
        let failures = metrics::counter!("hubbub_webhook_failures_total");
        let lag = metrics::gauge!("hubbub_webhook_lag_seconds");
        let mut leader: Option<WebhookLeader> = None;
        let mut backoff = RETRY_FIRST;
        let wait = |d: Duration| {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    () = stop.cancelled() => false,
                    () = tokio::time::sleep(d) => true,
                }
            }
        };
        loop {
            if stop.is_cancelled() {
                return;
            }
            if leader.is_none() {
                match self.store.webhook_leader().await {
                    Ok(Some(l)) => {
                        tracing::info!("this node delivers the webhooks");
                        leader = Some(l);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot tell which node delivers webhooks")
                    }
                }
                if leader.is_none() {
                    if !wait(LEADER_RETRY).await {
                        return;
                    }
                    continue;
                }
            }
            let batch = match self.store.webhook_batch(BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the webhook queue failed");
                    if !wait(RETRY_FIRST).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(&(_, oldest, _)) = batch.first() else {
                lag.set(0.0);
                if !wait(IDLE_POLL).await {
                    return;
                }
                continue;
            };
            lag.set((crate::hub::now_ms() - oldest).max(0) as f64 / 1000.0);
            let body = protocol::events::webhook_events(batch.iter().map(|(id, _, q)| {
                let item = match q {
                    Queued::Entry(m) => WebhookItem::Entry(m),
                    Queued::Event(json) => WebhookItem::Raw(json),
                };
                (*id, item)
            }));
            match self.post(body).await {
                Ok(()) => {
                    let ids: Vec<i64> = batch.iter().map(|(id, _, _)| *id).collect();
                    if let Err(e) = self.store.webhook_done(&ids).await {
                        // Sent again later: at least once.
                        tracing::warn!(error = %e, "forgetting delivered webhook events failed");
                    }
                    delivered.increment(ids.len() as u64);
                    backoff = RETRY_FIRST;
                }
                Err(why) => {
                    failures.increment(1);
                    tracing::warn!(url = %self.url, error = %why, retry_in = ?backoff, "webhook delivery failed");
                    if !wait(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                    if let Some(l) = leader.as_mut()
                        && !self.store.still_leader(l).await
                    {
                        tracing::warn!("lost the webhook lock; another node may deliver now");
                        leader = None;
                    }
                }
            }
        }
    }

    /// POST one batch, signed; Ok on a 2xx.
    async fn post(&self, body: String) -> Result<(), String> {
        let req = super::signed_post(&self.client, &self.url, self.signer.as_ref(), body);
        let res = req.send().await.map_err(|e| e.to_string())?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", res.status()))
        }
    }
}

/// Compare the queue's length with its bound every [`BOUND_CHECK`]: at the bound
/// the store drops new events (counted) until the queue drains below it. The
/// policy is to drop rather than refuse messages: chat keeps working when the
/// backend has been gone long enough to fill the queue, and the loss is counted
/// (`hubbub_webhook_dropped_total`) and logged.
async fn watch_bound(store: Arc<Store>, max: u64, stop: CancellationToken) {
    let dropped = metrics::counter!("hubbub_webhook_dropped_total");
    let queued = metrics::gauge!("hubbub_webhook_queue");
    let mut full = false;
    loop {
        if let Ok(n) = store.webhook_len().await {
            queued.set(n as f64);
            let now_full = n >= max;
            if now_full != full {
                full = now_full;
                store.set_webhook_queue_full(full);
                if full {
                    tracing::error!(
                        queued = n,
                        max,
                        "the webhook queue is full: new events are dropped until it drains"
                    );
                } else {
                    tracing::info!(queued = n, "the webhook queue has room again");
                }
            }
        }
        dropped.absolute(store.webhook_dropped());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(BOUND_CHECK) => {}
        }
    }
}

/// Queue the hub's presence changes as webhook events: `member` join/leave as the
/// hub saw them (first or last connection of the user in the room, on any node),
/// and `user` online/offline when the user's first connection anywhere opened or
/// the last one closed: a user's first (last) connection on this node counts only
/// if no other node has one (asked through the broker, as `GET /users/{user}`).
async fn queue_presence(hub: std::sync::Weak<Hub>, mut rx: tokio::sync::mpsc::Receiver<Activity>) {
    while let Some(a) = rx.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        let now = crate::hub::now_ms();
        let (channel, body) = match a {
            Activity::Member {
                room,
                user,
                name,
                join,
            } => (
                format!("#{room}"),
                protocol::events::webhook_member_event(&room, &user, &name, join, now),
            ),
            Activity::UserHere { user, name, online } => {
                let here = hub.user_status(&user).0;
                let everywhere = match hub.user_status_everywhere(&user).await {
                    Ok((n, _)) => n,
                    Err(e) => {
                        tracing::warn!(error = %e.message, "cannot tell whether a user is online elsewhere; assuming not");
                        here
                    }
                };
                // Online: this node's connections are all there are; offline: none
                // are left anywhere.
                let first_or_last = if online {
                    everywhere <= here && here > 0
                } else {
                    everywhere == 0
                };
                if !first_or_last {
                    continue;
                }
                (
                    String::new(),
                    protocol::events::webhook_user_event(&user, &name, online, now),
                )
            }
        };
        if let Err(e) = hub.store().queue_webhook_event(&channel, &body).await {
            tracing::warn!(error = %e, "queueing a presence webhook event failed");
        }
    }
}
