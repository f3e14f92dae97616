//! The committer: group commit of sequenced messages, then delivery and `ack`.
//!
//! One task takes every job that is waiting (up to [`MAX_BATCH`]), stores all new
//! messages in one transaction, publishes each through the broker (which fans out
//! locally), and only then acks the senders. So an `ack` always means "stored", and
//! the number of fsyncs grows with the number of batches, not of messages.
//!
//! A failed commit is retried with backoff, never skipped: skipping would leave a
//! hole in a channel's sequence. While it fails, the job queue fills and new sends
//! get `unavailable` (see [`super::Hub::submit`]).

use super::{Channel, Conn, Hub};
use crate::metrics::Metrics;
use crate::protocol::{self, CommandId};
use crate::store::{ChannelKey, Store, StoredMessage};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most messages stored in one transaction.
pub const MAX_BATCH: usize = 2048;

pub enum Job {
    /// Store `msg`, deliver it, then ack the sender.
    Append {
        channel: Arc<Channel>,
        msg: Arc<StoredMessage>,
        reply: Option<(Arc<Conn>, Option<CommandId>)>,
    },
    /// A resend with a known `client_id`: ack the original `seq` once everything
    /// queued before it (possibly the original itself) is stored.
    Ack {
        conn: Arc<Conn>,
        id: Option<CommandId>,
        key: ChannelKey,
        seq: u64,
        ts: i64,
    },
    /// Everything before this is stored and delivered: reply.
    Barrier(oneshot::Sender<()>),
    /// Everything before this is stored and delivered: reply and stop.
    Stop(oneshot::Sender<()>),
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dm: Option<&'a str>,
    seq: u64,
    ts: i64,
}

fn send_ack(
    metrics: &Metrics,
    conn: &Conn,
    id: Option<&CommandId>,
    key: &ChannelKey,
    seq: u64,
    ts: i64,
) {
    metrics.out("ack", 1);
    let (room, dm) = key.target(&conn.user);
    conn.send(protocol::reply("ack", id, Ack { room, dm, seq, ts }).into());
}

pub async fn run(mut rx: mpsc::Receiver<Job>, store: Arc<Store>, hub: Arc<Hub>, metrics: Metrics) {
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
        if !msgs.is_empty() {
            commit(&store, &msgs, &metrics, &hub).await;
        }
        let mut stop = None;
        for job in jobs.drain(..) {
            match job {
                Job::Append {
                    channel,
                    msg,
                    reply,
                } => {
                    hub.broker.publish(&hub, &channel, &msg);
                    if let Some((conn, id)) = reply {
                        send_ack(&metrics, &conn, id.as_ref(), &msg.channel, msg.seq, msg.ts);
                    }
                }
                Job::Ack {
                    conn,
                    id,
                    key,
                    seq,
                    ts,
                } => send_ack(&metrics, &conn, id.as_ref(), &key, seq, ts),
                Job::Barrier(tx) => {
                    let _ = tx.send(());
                }
                Job::Stop(tx) => stop = Some(tx),
            }
        }
        if let Some(tx) = stop {
            let _ = tx.send(());
            return;
        }
    }
}

async fn commit(store: &Store, msgs: &[Arc<StoredMessage>], metrics: &Metrics, hub: &Hub) {
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
                hub.store_failing.store(false, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                hub.store_failing.store(true, Ordering::Relaxed);
                metrics.store_errors.increment(1);
                tracing::error!(error = %e, batch = msgs.len(), "store commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
