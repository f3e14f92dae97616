//! The committer: group commit of sequenced messages, then delivery and `ack`.
//!
//! Owns: the job queue's consumer, the write path that matches the store's type,
//! and when an `ack` or an `unavailable` is sent. Must not: number messages for a
//! shared store (it numbers them in the commit), or ack before the commit and the
//! publish both succeeded.
//!
//! One task takes every job that is waiting (up to [`MAX_BATCH`]), stores all new
//! messages in one transaction, publishes them to the other nodes (with a broker),
//! delivers them here, and only then acks the senders. So an `ack` always means
//! "stored and published", and the number of fsyncs grows with the number of
//! batches, not of messages.
//!
//! On one node a failed commit is retried with backoff, never skipped: the hub has
//! already numbered those messages, and skipping would leave a hole in a channel's
//! sequence. With a shared store nothing is numbered before the commit, so a failed
//! commit is answered with `unavailable` instead. While it fails, the job queue fills and new sends
//! get `unavailable` (see [`super::Hub::submit`]).

use super::{Channel, Hub, Receipt, Submitter};
use crate::message::{ChannelKey, StoredMessage};
use crate::metrics::Metrics;
use crate::protocol;
use crate::protocol::events::Ack;
use crate::store::{LocalStore, PgStore, Sequenced, Store};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most messages stored in one transaction.
pub const MAX_BATCH: usize = 2048;

pub enum Job {
    /// Store `msg`, deliver it, then ack the sender.
    Append {
        channel: Arc<Channel>,
        msg: Arc<StoredMessage>,
        reply: Option<Submitter>,
    },
    /// A resend with a known `client_id`: ack the original `seq` once everything
    /// queued before it (possibly the original itself) is stored.
    Ack {
        to: Submitter,
        key: ChannelKey,
        seq: u64,
        ts: i64,
    },
    /// Everything before this is stored and delivered: reply.
    Barrier(oneshot::Sender<()>),
    /// Everything before this is stored and delivered: reply and stop.
    Stop(oneshot::Sender<()>),
}

fn send_ack(metrics: &Metrics, to: Submitter, key: &ChannelKey, seq: u64, ts: i64) {
    match to {
        Submitter::Conn(conn, id) => {
            metrics.out("ack", 1);
            let (room, dm) = key.target(&conn.user);
            conn.send(protocol::reply("ack", id.as_ref(), Ack { room, dm, seq, ts }).into());
        }
        // The caller may have given up waiting (its HTTP client went away).
        Submitter::Api { reply, .. } => {
            let _ = reply.send(Ok(Receipt { seq, ts }));
        }
    }
}

pub async fn run(mut rx: mpsc::Receiver<Job>, hub: Arc<Hub>) {
    let store = hub.store.clone();
    let metrics = hub.metrics.clone();
    let mut jobs: Vec<Job> = Vec::with_capacity(64);
    let mut msgs: Vec<Arc<StoredMessage>> = Vec::with_capacity(64);
    loop {
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        msgs.clear();
        msgs.extend(jobs.iter().filter_map(|j| match j {
            Job::Append { msg, .. } => Some(msg.clone()),
            _ => None,
        }));
        let stop = match &*store {
            Store::Shared(shared) => {
                commit_sequenced(shared, &hub, &metrics, &msgs, &mut jobs).await
            }
            Store::Local(local) => {
                if !msgs.is_empty() {
                    commit(local, &msgs, &metrics, &hub).await;
                }
                finish_local(&hub, &metrics, &mut jobs)
            }
        };
        if let Some(tx) = stop {
            let _ = tx.send(());
            return;
        }
    }
}

/// One node: the batch is stored (every seq was assigned by the hub); deliver in
/// order and ack.
fn finish_local(
    hub: &Arc<Hub>,
    metrics: &Metrics,
    jobs: &mut Vec<Job>,
) -> Option<oneshot::Sender<()>> {
    let mut stop = None;
    for job in jobs.drain(..) {
        match job {
            Job::Append {
                channel,
                msg,
                reply,
            } => {
                hub.deliver(&channel, &msg);
                if let Some(to) = reply {
                    send_ack(metrics, to, &msg.channel, msg.seq, msg.ts);
                }
            }
            other => finish_control(other, metrics, &mut stop),
        }
    }
    stop
}

/// A shared store: it numbers the batch (and finds repeated client_ids) in one
/// transaction; then every message is published to the other nodes, delivered here,
/// and acked only if the publish succeeded. A failed commit stored nothing and
/// numbered nothing, so its senders get `unavailable` and may simply resend.
async fn commit_sequenced(
    store: &PgStore,
    hub: &Arc<Hub>,
    metrics: &Metrics,
    msgs: &[Arc<StoredMessage>],
    jobs: &mut Vec<Job>,
) -> Option<oneshot::Sender<()>> {
    let mut outcomes = Vec::new();
    let mut failed = false;
    if !msgs.is_empty() {
        let started = Instant::now();
        match store
            .append_sequenced(msgs, super::client_id_horizon())
            .await
        {
            Ok(o) => {
                metrics
                    .commit_seconds
                    .record(started.elapsed().as_secs_f64());
                metrics.commit_batch.record(msgs.len() as f64);
                let new = o.iter().filter(|s| matches!(s, Sequenced::New(_))).count();
                metrics.stored.increment(new as u64);
                hub.set_store_failing(false);
                outcomes = o;
            }
            Err(e) => {
                hub.set_store_failing(true);
                metrics.store_errors.increment(1);
                tracing::error!(error = %e, batch = msgs.len(), "store commit failed; senders get unavailable");
                failed = true;
            }
        }
    }
    let stored: Vec<Arc<StoredMessage>> = outcomes
        .iter()
        .map(|o| match o {
            Sequenced::New(m) | Sequenced::Duplicate(m) => m.clone(),
        })
        .collect();
    // A duplicate is published again: its first publish may be the one that failed.
    let published = hub.broker.publish(&stored).await;
    let mut results = stored.into_iter().zip(published);
    let mut stop = None;
    for job in jobs.drain(..) {
        match job {
            Job::Append { channel, reply, .. } => {
                if failed {
                    if let Some(to) = reply {
                        send_error(metrics, to, "history store unavailable; retry shortly");
                    }
                    continue;
                }
                let Some((msg, ok)) = results.next() else {
                    continue;
                };
                hub.deliver(&channel, &msg);
                if let Some(to) = reply {
                    if ok {
                        send_ack(metrics, to, &msg.channel, msg.seq, msg.ts);
                    } else {
                        send_error(
                            metrics,
                            to,
                            "stored, but the other nodes could not be told (broker unreachable); \
                             resend with the same client_id to be sure",
                        );
                    }
                }
            }
            other => finish_control(other, metrics, &mut stop),
        }
    }
    stop
}

/// The jobs that store nothing: a resend's ack, a barrier, the stop.
fn finish_control(job: Job, metrics: &Metrics, stop: &mut Option<oneshot::Sender<()>>) {
    match job {
        Job::Ack { to, key, seq, ts } => send_ack(metrics, to, &key, seq, ts),
        Job::Barrier(tx) => {
            let _ = tx.send(());
        }
        Job::Stop(tx) => *stop = Some(tx),
        Job::Append { .. } => {} // stored jobs are finished by the caller
    }
}

fn send_error(metrics: &Metrics, to: Submitter, message: &str) {
    let err = protocol::CommandError::new(protocol::ErrorCode::Unavailable, message);
    match to {
        Submitter::Conn(conn, id) => {
            metrics.out("error", 1);
            conn.send(protocol::error_event(id.as_ref(), &err).into());
        }
        Submitter::Api { reply, .. } => {
            let _ = reply.send(Err(err));
        }
    }
}

async fn commit(store: &LocalStore, msgs: &[Arc<StoredMessage>], metrics: &Metrics, hub: &Hub) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        match store.append(msgs).await {
            Ok(()) => {
                metrics
                    .commit_seconds
                    .record(started.elapsed().as_secs_f64());
                metrics.commit_batch.record(msgs.len() as f64);
                metrics.stored.increment(msgs.len() as u64);
                hub.set_store_failing(false);
                return;
            }
            Err(e) => {
                hub.set_store_failing(true);
                metrics.store_errors.increment(1);
                tracing::error!(error = %e, batch = msgs.len(), "store commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
