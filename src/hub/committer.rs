//! The committer: group commit of sequenced messages, then delivery and `ack`.
//!
//! Owns: the job queue's consumer, the write path that matches the store's type,
//! and when an `ack` or an `unavailable` is sent. Must not: number messages for a
//! shared store (it numbers them in the commit), or ack before the commit and the
//! publish both succeeded.
//!
//! One task takes every job that is waiting (up to [`MAX_BATCH`]), stores all new
//! messages in one transaction, publishes them to the other nodes (with a broker),
//! delivers them here (consecutive messages of one room as one run: one push per
//! receiver), and only then acks the senders. So an `ack` always means
//! "stored and published", and the number of fsyncs grows with the number of
//! batches, not of messages. Under load commits start at most once per commit
//! interval, each with everything that came meanwhile ([`top_up`]), so that the
//! batches are fuller and fewer; a message after a quiet spell commits at once.
//!
//! On one node, under load, the storing and the delivering are two stages, in
//! order: while one batch is fanned out and acked, the next one is already being
//! synced (at most [`STORED_AHEAD`] batches wait between them); at a light load a
//! batch is delivered by the task that stored it. Measured in one big room: the ramp
//! at 1,000 members went from 1,164 to 1,819 messages/s with this and the SQLite
//! store's checkpoints moved off the commit (BENCHMARKS.md).
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most messages stored in one transaction.
pub const MAX_BATCH: usize = 2048;

/// Group commit under load: when the last commit started less than `interval`
/// before now, wait until it is `interval` old and add to `jobs` every job that
/// came meanwhile (up to [`MAX_BATCH`]). A message after a quiet spell (the last
/// commit longer ago), or after a commit that itself took longer than `interval`
/// (a slow disk gathers a full batch by itself), starts its commit at once.
///
/// Why: a commit's cost is mostly per commit, not per message. At 10,000 msg/s
/// from 10 senders the SQLite store's fsync took ~0.3 ms, so a batch held ~6
/// messages (18,000 commits in an 11 s run), and each commit cost the server
/// ~150 µs of CPU (the write and the fsync's VM exits, the worker handing off its
/// tasks around the blocking call, the wake-ups). With a 1 ms interval there were
/// a third as many commits and 40 % less server CPU for that run, 17 % less at
/// 1,000 members in the room, where each batch is also one push per member, for
/// acks 1.5-2.5 ms later under load (BENCHMARKS.md, "the commit interval"). The wait is at most `interval` plus the timer's tick (tokio's
/// timers count whole milliseconds). PostgreSQL's `commit_delay` does the like
/// for its WAL flushes.
///
/// Returns when the batch is ready: its commit's start, for the next call.
async fn top_up(
    rx: &mut mpsc::Receiver<Job>,
    jobs: &mut Vec<Job>,
    last_start: Option<tokio::time::Instant>,
    interval: Duration,
) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let Some(due) = last_start.map(|start| start + interval) else {
        return now;
    };
    if jobs.len() >= MAX_BATCH || now >= due {
        return now;
    }
    tokio::time::sleep_until(due).await;
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    tokio::time::Instant::now()
}

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

pub async fn run(rx: mpsc::Receiver<Job>, hub: Arc<Hub>) {
    let store = hub.store.clone();
    match &*store {
        Store::Local(local) => run_local(rx, hub.clone(), local).await,
        Store::Shared(shared) => run_shared(rx, hub.clone(), shared).await,
    }
}

/// The messages of `jobs` to store, into `msgs` (cleared first).
fn appends(jobs: &[Job], msgs: &mut Vec<Arc<StoredMessage>>) {
    msgs.clear();
    msgs.extend(jobs.iter().filter_map(|j| match j {
        Job::Append { msg, .. } => Some(msg.clone()),
        _ => None,
    }));
}

/// Batches stored and not yet delivered, at most: the next batch's commit (a
/// write and an fsync) runs while the one before it is fanned out.
const STORED_AHEAD: usize = 2;

/// One node: two stages in order. This task stores each batch (every seq was
/// assigned by the hub); when batches are coming faster than they are fanned out
/// (more jobs already waiting, or the deliverer still busy), a second task
/// delivers and acks the stored batches in the same order, so the disk and the
/// fan-out work at the same time instead of taking turns. Otherwise the batch is
/// delivered right here: at a light load a hand-off between tasks would only add
/// a wake-up to every message's latency. An ack still follows its message's
/// commit and delivery.
async fn run_local(mut rx: mpsc::Receiver<Job>, hub: Arc<Hub>, store: &LocalStore) {
    let metrics = hub.metrics.clone();
    let (stored_tx, mut stored_rx) = mpsc::channel::<Vec<Job>>(STORED_AHEAD);
    // Batches handed to the deliverer and not yet delivered.
    let handed = Arc::new(AtomicUsize::new(0));
    let deliverer = {
        let (hub, metrics, handed) = (hub.clone(), metrics.clone(), handed.clone());
        tokio::spawn(async move {
            while let Some(mut jobs) = stored_rx.recv().await {
                let stop = finish_local(&hub, &metrics, &mut jobs);
                handed.fetch_sub(1, Ordering::AcqRel);
                if let Some(tx) = stop {
                    let _ = tx.send(());
                    return;
                }
            }
        })
    };
    let mut msgs: Vec<Arc<StoredMessage>> = Vec::with_capacity(64);
    let interval = hub.options.commit_interval;
    let mut last_start = None;
    loop {
        let mut jobs: Vec<Job> = Vec::with_capacity(64);
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            break;
        }
        let ready = top_up(&mut rx, &mut jobs, last_start, interval).await;
        appends(&jobs, &mut msgs);
        if !msgs.is_empty() {
            last_start = Some(ready);
            commit(store, &msgs, &metrics, &hub).await;
        }
        let stopping = jobs.iter().any(|j| matches!(j, Job::Stop(_)));
        // Nothing delivered out of order: inline only when no earlier batch is
        // still with the deliverer.
        if !stopping && rx.is_empty() && handed.load(Ordering::Acquire) == 0 {
            finish_local(&hub, &metrics, &mut jobs);
            continue;
        }
        handed.fetch_add(1, Ordering::AcqRel);
        if stored_tx.send(jobs).await.is_err() || stopping {
            break;
        }
    }
    drop(stored_tx);
    let _ = deliverer.await;
}

/// A shared store numbers in the commit, and a failed commit is answered, not
/// retried: one stage, batch after batch.
async fn run_shared(mut rx: mpsc::Receiver<Job>, hub: Arc<Hub>, store: &PgStore) {
    let metrics = hub.metrics.clone();
    let mut jobs: Vec<Job> = Vec::with_capacity(64);
    let mut msgs: Vec<Arc<StoredMessage>> = Vec::with_capacity(64);
    let interval = hub.options.commit_interval;
    let mut last_start = None;
    loop {
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        let ready = top_up(&mut rx, &mut jobs, last_start, interval).await;
        appends(&jobs, &mut msgs);
        if !msgs.is_empty() {
            last_start = Some(ready);
        }
        if let Some(tx) = commit_sequenced(store, &hub, &metrics, &msgs, &mut jobs).await {
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
    let mut run = RunOut::default();
    for job in jobs.drain(..) {
        match job {
            Job::Append {
                channel,
                msg,
                reply,
            } => run.add(hub, metrics, channel, msg, reply.map(|to| (to, true))),
            other => {
                run.finish(hub, metrics);
                finish_control(other, metrics, &mut stop);
            }
        }
    }
    run.finish(hub, metrics);
    stop
}

/// Consecutive stored messages of one channel in a batch, delivered together
/// ([`Hub::deliver_run`]: one push per receiver, not one per message), then
/// answered: each ack still follows its message's delivery.
#[derive(Default)]
struct RunOut {
    channel: Option<Arc<Channel>>,
    msgs: Vec<Arc<StoredMessage>>,
    /// Whom to answer, and whether the message was also published (else the
    /// sender is told it may not have reached the other nodes).
    replies: Vec<(Submitter, Arc<StoredMessage>, bool)>,
}

impl RunOut {
    fn add(
        &mut self,
        hub: &Arc<Hub>,
        metrics: &Metrics,
        channel: Arc<Channel>,
        msg: Arc<StoredMessage>,
        reply: Option<(Submitter, bool)>,
    ) {
        if self
            .channel
            .as_ref()
            .is_some_and(|c| !Arc::ptr_eq(c, &channel))
        {
            self.finish(hub, metrics);
        }
        self.channel = Some(channel);
        if let Some((to, published)) = reply {
            self.replies.push((to, msg.clone(), published));
        }
        self.msgs.push(msg);
    }

    fn finish(&mut self, hub: &Arc<Hub>, metrics: &Metrics) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        hub.deliver_run(&channel, &self.msgs);
        self.msgs.clear();
        for (to, msg, published) in self.replies.drain(..) {
            if published {
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
    let mut run = RunOut::default();
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
                run.add(hub, metrics, channel, msg, reply.map(|to| (to, ok)));
            }
            other => {
                run.finish(hub, metrics);
                finish_control(other, metrics, &mut stop);
            }
        }
    }
    run.finish(hub, metrics);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const INTERVAL: Duration = Duration::from_millis(5);

    fn barrier() -> Job {
        Job::Barrier(oneshot::channel().0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_soon_after_a_commit_began_waits_out_the_interval_and_takes_what_came_meanwhile()
     {
        let (tx, mut rx) = mpsc::channel(8);
        let last_start = Instant::now();
        tokio::time::advance(Duration::from_millis(2)).await;
        let mut jobs = vec![barrier()];
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            tx.send(barrier()).await.expect("send");
            tx.send(barrier()).await.expect("send");
            tx
        });
        let started = Instant::now();
        top_up(&mut rx, &mut jobs, Some(last_start), INTERVAL).await;
        assert_eq!(started.elapsed(), Duration::from_millis(3));
        assert_eq!(jobs.len(), 3);
        drop(late.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_after_a_quiet_spell_starts_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let last_start = Instant::now();
        tokio::time::advance(INTERVAL).await;
        tx.send(barrier()).await.expect("send");
        let mut jobs = vec![barrier()];
        let started = Instant::now();
        top_up(&mut rx, &mut jobs, Some(last_start), INTERVAL).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // What is still queued is the next batch's.
        assert_eq!(jobs.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_batch_and_a_zero_interval_never_wait() {
        let (_tx, mut rx) = mpsc::channel(8);
        let mut jobs = vec![barrier()];
        let started = Instant::now();
        top_up(&mut rx, &mut jobs, None, INTERVAL).await;
        top_up(&mut rx, &mut jobs, Some(Instant::now()), Duration::ZERO).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_never_waits_and_a_topped_up_one_stops_at_the_maximum() {
        let (tx, mut rx) = mpsc::channel(MAX_BATCH + 8);
        let mut jobs: Vec<Job> = (0..MAX_BATCH).map(|_| barrier()).collect();
        let started = Instant::now();
        top_up(&mut rx, &mut jobs, Some(Instant::now()), INTERVAL).await;
        assert_eq!(started.elapsed(), Duration::ZERO);

        let mut jobs: Vec<Job> = (0..MAX_BATCH - 1).map(|_| barrier()).collect();
        for _ in 0..3 {
            tx.send(barrier()).await.expect("send");
        }
        top_up(&mut rx, &mut jobs, Some(Instant::now()), INTERVAL).await;
        assert_eq!(started.elapsed(), INTERVAL);
        assert_eq!(jobs.len(), MAX_BATCH);
        assert_eq!(rx.len(), 2);
    }
}
