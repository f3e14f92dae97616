//! The Redis broker: fan-out between nodes over Redis pub/sub (or sharded pub/sub on
//! a Redis Cluster), and the Redis structures behind cluster-wide presence.
//!
//! Owns: the Redis connection (redis-rs `ConnectionManager`, or its cluster client,
//! both reconnecting by themselves, or the primary named by sentinels, followed
//! through failovers by `super::sentinel`), which channels this node is subscribed to, the
//! health of the link (`/readyz` and every send ask it), this node's heartbeat key,
//! and the presence hashes. Must not: decide what a client sees; envelopes from other
//! nodes go to the hub, which orders them by `seq` and fills gaps from the store.
//!
//! Layout in Redis:
//! - `hubbub:r:<room>`: channel of a room's messages, presence and typing events.
//! - `hubbub:u:<user>`: channel of a user's direct messages.
//! - `hubbub:presence:<room>`: hash `<instance>|<user>` -> display name, one field
//!   per user per node instance that has the user in the room.
//! - `hubbub:ans:<request>`: list of the nodes' answers to a question on the
//!   control channel (where is a user?), deleted when read, expiring after 5 s.
//! - `hubbub:node:<instance>`: a node instance's heartbeat, expiring after
//!   `--node-timeout`; presence fields of an instance without one are dead.
//!
//! An instance is `<node-id>.<random>`, new at every start, so a node restarted
//! with the same id never mistakes its previous life's presence for its own.
//!
//! Subscriptions are kept as a desired state (a reference count per channel) that a
//! single task applies; on every reconnection it subscribes everything again, so a
//! Redis restart needs nothing from the operator.

use super::sentinel::{self, SentinelConn, SentinelError, SentinelUrl, SentinelUrlError};
use super::{
    Envelope, Inbound, Kind, Question, RemotePresence, room_channel, to_json as encode,
    user_channel,
};
use crate::message::{ChannelKey, StoredMessage};
use crate::metrics::Metrics;
use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, ProtocolVersion, PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// How long one Redis command may take before the link counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the link is checked.
const PING_EVERY: Duration = Duration::from_millis(500);
/// With sentinels, every this many checks the primary's address is asked for
/// while the link is up (every check while it is down).
const SENTINEL_EVERY: u64 = 6;

/// The connection manager's settings, for a plain URL and for each primary a
/// sentinel names: RESP3 pushes to `handler`, resubscription after a reconnect.
fn manager_config(
    handler: impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_push_sender(handler)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1))
}
/// Presence changes waiting to be written. When full, a change is dropped and the
/// periodic reconciliation (every `--node-timeout` / 3) writes it instead.
const PRESENCE_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Sentinel(#[from] SentinelError),
    #[error(transparent)]
    SentinelUrl(#[from] SentinelUrlError),
}

/// Where and how to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One URL, or with `cluster` a comma-separated list of seed nodes.
    pub url: String,
    pub cluster: bool,
    pub node_id: String,
    pub node_timeout: Duration,
}

#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// The primary the sentinels name, followed through failovers.
    Sentinel(Arc<SentinelConn>),
}

impl RedisConn {
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BrokerError> {
        let fut = async {
            match self {
                RedisConn::Single(c) => cmd.query_async::<T>(&mut c.clone()).await,
                RedisConn::Cluster(c) => cmd.query_async::<T>(&mut c.clone()).await,
                RedisConn::Sentinel(s) => cmd.query_async::<T>(&mut s.manager()).await,
            }
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BrokerError::Timeout(COMMAND_TIMEOUT)),
        }
    }
}

type Sink = Box<dyn Fn(Inbound) + Send + Sync>;

/// What the connection's push handler needs, shared before the broker exists.
struct PushState {
    /// This node instance (its own presence and typing are not handed on).
    inst: String,
    sink: OnceLock<Sink>,
    healthy: AtomicBool,
}

enum PresenceOp {
    Set {
        room: String,
        user: String,
        name: String,
    },
    Del {
        room: String,
        user: String,
        name: String,
    },
    Flush(oneshot::Sender<()>),
}

/// How long [`RedisBroker::ask`] waits for the other nodes' answers.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an answer list outlives its question (if the asker never deletes it).
const ANSWER_TTL_MS: u64 = 5000;

/// The list the answers to question `id` are pushed onto.
fn answers_key(id: &str) -> String {
    format!("hubbub:ans:{id}")
}

/// The hash of every node instance's figures (`GET /api/v1/stats`).
const STATS_KEY: &str = "hubbub:stats";

pub struct RedisBroker {
    conn: RedisConn,
    cluster: bool,
    node_timeout: Duration,
    inbound: Arc<PushState>,
    metrics: Metrics,
    /// Desired subscriptions: channel -> number of holders.
    desired: Mutex<HashMap<String, usize>>,
    want: AtomicU64,
    done: watch::Sender<u64>,
    resubscribe: AtomicBool,
    changed: Notify,
    presence_tx: mpsc::Sender<PresenceOp>,
    presence_rx: Mutex<Option<mpsc::Receiver<PresenceOp>>>,
    /// Notified each time the link comes back after being down.
    pub reconnected: Notify,
    /// Link checks so far (with sentinels: when to ask them again).
    checks: AtomicU64,
}

fn presence_key(room: &str) -> String {
    format!("hubbub:presence:{room}")
}

fn node_key(inst: &str) -> String {
    format!("hubbub:node:{inst}")
}

impl RedisBroker {
    /// Connect to Redis (failing if it cannot be reached now).
    pub async fn connect(
        settings: &RedisSettings,
        metrics: Metrics,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        let inst = format!("{}.{:08x}", settings.node_id, rand::random::<u32>());
        let inbound = Arc::new(PushState {
            inst,
            sink: OnceLock::new(),
            healthy: AtomicBool::new(true),
        });
        let handler = {
            let inbound = inbound.clone();
            move |info: PushInfo| -> Result<(), std::convert::Infallible> {
                on_push(&inbound, info);
                Ok(())
            }
        };
        let conn = if settings.cluster {
            let nodes: Vec<String> = settings
                .url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let client = ClusterClientBuilder::new(nodes)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(handler)
                .connection_timeout(COMMAND_TIMEOUT)
                .response_timeout(COMMAND_TIMEOUT)
                .retries(2)
                .build()?;
            RedisConn::Cluster(client.get_async_connection().await?)
        } else if settings.url.starts_with(sentinel::SCHEME) {
            let url = SentinelUrl::parse(&settings.url)?;
            RedisConn::Sentinel(Arc::new(
                SentinelConn::connect(&url, manager_config(handler), COMMAND_TIMEOUT).await?,
            ))
        } else {
            let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
            let settings_resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings_resp3))?;
            RedisConn::Single(
                ConnectionManager::new_with_config(client, manager_config(handler)).await?,
            )
        };
        let (presence_tx, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        let broker = Arc::new(RedisBroker {
            conn,
            cluster: settings.cluster,
            node_timeout: settings.node_timeout,
            inbound,
            metrics,
            desired: Mutex::new(HashMap::new()),
            want: AtomicU64::new(0),
            done: watch::Sender::new(0),
            resubscribe: AtomicBool::new(false),
            changed: Notify::new(),
            presence_tx,
            presence_rx: Mutex::new(Some(presence_rx)),
            reconnected: Notify::new(),
            checks: AtomicU64::new(0),
        });
        broker.heartbeat().await?;
        Ok(broker)
    }

    /// Where envelopes from other nodes go. Set once, before [`RedisBroker::start`].
    pub fn set_sink(&self, sink: impl Fn(Inbound) + Send + Sync + 'static) {
        let _ = self.inbound.sink.set(Box::new(sink));
    }

    /// This node instance's name (`<node-id>.<random>`).
    pub fn instance(&self) -> &str {
        &self.inbound.inst
    }

    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    pub fn healthy(&self) -> bool {
        self.inbound.healthy.load(Ordering::Relaxed)
    }

    fn set_unhealthy(&self, why: &dyn std::fmt::Display) {
        if self.inbound.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %why, "lost the connection to Redis");
        }
    }

    /// Start the link checker, the subscription task and the presence writer. They
    /// end when `stop` is cancelled.
    pub fn start(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let me = self.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => me.check_link().await,
                }
            }
        });
        let me = self.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = me.run_subscriptions() => {}
            }
        });
        let rx = self
            .presence_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = me.run_presence_writer(rx) => {}
                }
            });
        }
    }

    async fn check_link(&self) {
        if let RedisConn::Sentinel(s) = &self.conn {
            // While down: ask at every check; while up: every few seconds (a
            // demoted primary still answers PING, but refuses writes).
            let n = self.checks.fetch_add(1, Ordering::Relaxed);
            if !self.healthy() || n.is_multiple_of(SENTINEL_EVERY) {
                match s.follow(COMMAND_TIMEOUT).await {
                    Ok(Some(addr)) => {
                        tracing::warn!(primary = %addr, "the Redis primary moved (sentinel failover); following it");
                        // Down until the PING below: then resubscribe and catch up.
                        self.set_unhealthy(&"the primary moved");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "asking the sentinels failed"),
                }
            }
        }
        match self.conn.query::<String>(&redis::cmd("PING")).await {
            Ok(_) => {
                if !self.inbound.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("reconnected to Redis; resubscribing and catching up");
                    self.metrics.broker_reconnects.increment(1);
                    self.resubscribe.store(true, Ordering::Relaxed);
                    self.changed.notify_one();
                    self.reconnected.notify_one();
                }
                self.metrics.broker_up.set(1.0);
            }
            Err(e) => {
                self.set_unhealthy(&e);
                self.metrics.broker_up.set(0.0);
            }
        }
    }

    /// Hold a subscription to `channel` (reference-counted). Returns once Redis has
    /// confirmed it, or at once while Redis is down (it is made on reconnection).
    pub async fn subscribe(&self, channel: String) {
        *self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(channel)
            .or_insert(0) += 1;
        let gen_wanted = self.want.fetch_add(1, Ordering::Relaxed) + 1;
        self.changed.notify_one();
        if !self.healthy() {
            return;
        }
        let mut done = self.done.subscribe();
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, done.wait_for(|g| *g >= gen_wanted)).await;
    }

    /// Release one hold on `channel`; unsubscribed when none is left.
    pub fn unsubscribe(&self, channel: &str) {
        {
            let mut d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = d.get_mut(channel) {
                *n -= 1;
                if *n == 0 {
                    d.remove(channel);
                }
            }
        }
        self.want.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Apply the desired subscriptions, again after every change or reconnection.
    async fn run_subscriptions(&self) {
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut retry = false;
        loop {
            if retry {
                let _ = tokio::time::timeout(PING_EVERY, self.changed.notified()).await;
            } else {
                self.changed.notified().await;
            }
            let generation = self.want.load(Ordering::Relaxed);
            if self.resubscribe.swap(false, Ordering::Relaxed) {
                subscribed.clear();
            }
            let desired: HashSet<String> = self
                .desired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            let add: Vec<String> = desired.difference(&subscribed).cloned().collect();
            let drop: Vec<String> = subscribed.difference(&desired).cloned().collect();
            retry = false;
            if !add.is_empty() {
                match self.sub_cmd(true, &add).await {
                    Ok(()) => subscribed.extend(add),
                    Err(e) => {
                        self.set_unhealthy(&e);
                        retry = true;
                    }
                }
            }
            if !drop.is_empty() {
                for c in &drop {
                    subscribed.remove(c);
                }
                if let Err(e) = self.sub_cmd(false, &drop).await {
                    tracing::debug!(error = %e, "unsubscribe failed (harmless)");
                }
            }
            self.done.send_replace(generation);
        }
    }

    async fn sub_cmd(&self, on: bool, channels: &[String]) -> Result<(), BrokerError> {
        let fut = async {
            let mut c = match &self.conn {
                RedisConn::Single(c) => c.clone(),
                RedisConn::Sentinel(s) => s.manager(),
                RedisConn::Cluster(c) => {
                    // Sharded channels live on the shard of their slot: one at a time.
                    for ch in channels {
                        let mut c = c.clone();
                        if on {
                            c.ssubscribe(ch).await?;
                        } else {
                            c.sunsubscribe(ch).await?;
                        }
                    }
                    return Ok(());
                }
            };
            if on {
                c.subscribe(channels).await
            } else {
                c.unsubscribe(channels).await
            }
        };
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BrokerError::Timeout(COMMAND_TIMEOUT * 2)),
        }
    }

    fn publish_cmd(&self, channel: &str, payload: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(if self.cluster { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(channel).arg(payload);
        cmd
    }

    /// Publish stored messages; one result per message.
    pub async fn publish(&self, msgs: &[Arc<StoredMessage>]) -> Vec<bool> {
        if msgs.is_empty() {
            return Vec::new();
        }
        if !self.healthy() {
            return vec![false; msgs.len()];
        }
        let started = Instant::now();
        let futs = msgs.iter().map(|m| {
            let payload = Envelope::encode_message(&self.inbound.inst, m);
            let channels = match &m.channel {
                ChannelKey::Room(r) => vec![room_channel(r)],
                ChannelKey::Dm(a, b) => vec![user_channel(a), user_channel(b)],
            };
            async move {
                for ch in channels {
                    self.conn
                        .query::<i64>(&self.publish_cmd(&ch, &payload))
                        .await?;
                }
                Ok::<(), BrokerError>(())
            }
        });
        let results = join_all(futs).await;
        self.metrics
            .broker_publish_seconds
            .record(started.elapsed().as_secs_f64());
        results
            .into_iter()
            .map(|r| match r {
                Ok(()) => true,
                Err(e) => {
                    self.set_unhealthy(&e);
                    false
                }
            })
            .collect()
    }

    /// Tell the other nodes that `user` is typing in `room` (best effort).
    pub fn typing(&self, room: &str, user: &str, name: &str) {
        if !self.healthy() {
            return;
        }
        let payload = encode(&Envelope::event(
            Kind::Typing,
            &self.inbound.inst,
            room,
            user,
            name,
        ));
        let cmd = self.publish_cmd(&room_channel(room), &payload);
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _ = conn.query::<i64>(&cmd).await;
        });
    }

    /// Ask every node a question (on the control channel). PUBLISH answers how
    /// many subscribers got the question, so the answers to wait for are known: each
    /// node pushes its answer onto a list of this request, read until all are in or
    /// [`ASK_TIMEOUT`] has passed (a node that died meanwhile is not waited for
    /// longer).
    pub async fn ask(&self, question: &Question) -> Result<Vec<String>, BrokerError> {
        let id = format!("{}.{:016x}", self.inbound.inst, rand::random::<u64>());
        let env = match question {
            Question::User(user) => {
                Envelope::event(Kind::Ask, &self.inbound.inst, &id, user, "user")
            }
            Question::Rooms {
                prefix,
                after,
                limit,
            } => {
                let mut env = Envelope::event(Kind::Ask, &self.inbound.inst, &id, prefix, "rooms");
                env.text = after.clone();
                env.seq = u64::try_from(*limit).unwrap_or(u64::MAX);
                env
            }
            Question::Disconnect { user, reason } => {
                let mut env =
                    Envelope::event(Kind::Ask, &self.inbound.inst, &id, user, "disconnect");
                env.text = reason.clone();
                env
            }
            Question::Remove { room, user, reason } => {
                let mut env = Envelope::event(Kind::Ask, &self.inbound.inst, &id, user, "remove");
                env.text = reason.clone();
                env.em = Some(room.clone());
                env
            }
        };
        let receivers: i64 = self
            .conn
            .query(&self.publish_cmd(super::CONTROL_CHANNEL, &encode(&env)))
            .await?;
        // This node is subscribed too, and does not answer itself.
        let expected = usize::try_from(receivers.saturating_sub(1)).unwrap_or(0);
        let key = answers_key(&id);
        let deadline = Instant::now() + ASK_TIMEOUT;
        let mut got: Vec<String> = Vec::new();
        if expected > 0 {
            loop {
                let mut cmd = redis::cmd("LRANGE");
                cmd.arg(&key).arg(0).arg(-1);
                got = self.conn.query(&cmd).await?;
                if got.len() >= expected || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let mut del = redis::cmd("DEL");
        del.arg(&key);
        let _ = self.conn.query::<i64>(&del).await;
        if got.len() < expected {
            tracing::warn!(
                expected,
                got = got.len(),
                "not every node answered a question"
            );
        }
        Ok(got)
    }

    /// Push this node's answer (JSON) to an [`Inbound::Ask`] (kept briefly, then
    /// expired).
    pub fn answer(&self, id: &str, json: &str) {
        let key = answers_key(id);
        let mut push = redis::cmd("RPUSH");
        push.arg(&key).arg(json);
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(ANSWER_TTL_MS);
        let conn = self.conn.clone();
        tokio::spawn(async move {
            if conn.query::<i64>(&push).await.is_ok() {
                let _ = conn.query::<i64>(&expire).await;
            }
        });
    }

    /// Tell the nodes holding connections of `to` (subscribed to `to`'s channel)
    /// that `user` read `channel` up to `seq`. Best effort, like typing.
    pub fn read(&self, channel: &ChannelKey, user: &str, seq: u64, to: &str) {
        if !self.healthy() {
            return;
        }
        let mut env = Envelope::event(
            Kind::Read,
            &self.inbound.inst,
            &channel.storage_key(),
            user,
            to,
        );
        env.seq = seq;
        let cmd = self.publish_cmd(&user_channel(to), &encode(&env));
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _ = conn.query::<i64>(&cmd).await;
        });
    }

    /// Tell every node about a token revocation (on the control channel).
    pub async fn revoke(&self, key: &str, issued_before: Option<i64>) -> Result<(), BrokerError> {
        let mut env = Envelope::event(Kind::Revoke, &self.inbound.inst, key, "", "");
        env.ts = issued_before.unwrap_or(0);
        let cmd = self.publish_cmd(super::CONTROL_CHANNEL, &encode(&env));
        self.conn.clone().query::<i64>(&cmd).await?;
        Ok(())
    }

    /// Tell every node (all subscribe to the control channel) about a ban
    /// (`until` 0: until lifted) or, with `ban` false, its lifting.
    pub async fn ban(&self, user: &str, ban: Option<(i64, &str)>) -> Result<(), BrokerError> {
        let kind = if ban.is_some() {
            Kind::Ban
        } else {
            Kind::Unban
        };
        let mut env = Envelope::event(kind, &self.inbound.inst, "", user, "");
        if let Some((until, reason)) = ban {
            env.ts = until;
            env.text = reason.to_owned();
        }
        let cmd = self.publish_cmd(super::CONTROL_CHANNEL, &encode(&env));
        self.conn.clone().query::<i64>(&cmd).await?;
        Ok(())
    }

    /// Record that `user` is (`on`) or is no longer in `room` on this node, and tell
    /// the other nodes. Written in order by one task; when its queue (`PRESENCE_QUEUE`) is full the change is left to the next reconciliation.
    pub fn presence(&self, room: &str, user: &str, name: &str, on: bool) {
        let (room, user, name) = (room.to_owned(), user.to_owned(), name.to_owned());
        let op = if on {
            PresenceOp::Set { room, user, name }
        } else {
            PresenceOp::Del { room, user, name }
        };
        if self.presence_tx.try_send(op).is_err() {
            tracing::warn!("presence queue full; the next reconciliation will write it");
        }
    }

    /// Wait until every presence change queued before this call is written.
    pub async fn flush_presence(&self) {
        let (tx, rx) = oneshot::channel();
        if self.presence_tx.send(PresenceOp::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(COMMAND_TIMEOUT * 2, rx).await;
        }
    }

    async fn run_presence_writer(&self, mut rx: mpsc::Receiver<PresenceOp>) {
        while let Some(op) = rx.recv().await {
            let (room, user, name, on) = match op {
                PresenceOp::Flush(tx) => {
                    let _ = tx.send(());
                    continue;
                }
                PresenceOp::Set { room, user, name } => (room, user, name, true),
                PresenceOp::Del { room, user, name } => (room, user, name, false),
            };
            let field = format!("{}|{}", self.inbound.inst, user);
            let mut write = redis::cmd(if on { "HSET" } else { "HDEL" });
            write.arg(presence_key(&room)).arg(&field);
            if on {
                write.arg(&name);
            }
            let kind = if on { Kind::Join } else { Kind::Leave };
            let payload = encode(&Envelope::event(
                kind,
                &self.inbound.inst,
                &room,
                &user,
                &name,
            ));
            let result = async {
                self.conn.query::<i64>(&write).await?;
                self.conn
                    .query::<i64>(&self.publish_cmd(&room_channel(&room), &payload))
                    .await
            }
            .await;
            if let Err(e) = result {
                self.set_unhealthy(&e);
            }
        }
    }

    /// Refresh this instance's heartbeat key.
    /// Keep this node's figures (opaque JSON) where every node can read them.
    pub async fn put_stats(&self, json: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(STATS_KEY).arg(&self.inbound.inst).arg(json);
        self.conn.query::<Value>(&cmd).await.map(|_| ())
    }

    /// Every node instance's last figures (including this one's and departed
    /// nodes'; the caller judges their age).
    pub async fn all_stats(&self) -> Result<Vec<String>, BrokerError> {
        let mut cmd = redis::cmd("HVALS");
        cmd.arg(STATS_KEY);
        self.conn.query::<Vec<String>>(&cmd).await
    }

    async fn heartbeat(&self) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(node_key(&self.inbound.inst))
            .arg("1")
            .arg("PX")
            .arg(u64::try_from(self.node_timeout.as_millis()).unwrap_or(u64::MAX));
        self.conn.query::<Value>(&cmd).await.map(|_| ())
    }

    /// Is the node instance `inst` alive (its heartbeat key exists)?
    async fn alive(&self, inst: &str) -> Result<bool, BrokerError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(node_key(inst));
        Ok(self.conn.query::<i64>(&cmd).await? > 0)
    }

    /// Every (instance, user, name) in `room`'s presence hash.
    async fn presence_of(&self, room: &str) -> Result<Vec<(String, String, String)>, BrokerError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(presence_key(room));
        let map: HashMap<String, String> = self.conn.query(&cmd).await?;
        Ok(map
            .into_iter()
            .filter_map(|(field, name)| {
                let (inst, user) = field.split_once('|')?;
                Some((inst.to_owned(), user.to_owned(), name))
            })
            .collect())
    }

    /// Write a presence field directly (reconciliation).
    async fn presence_set(
        &self,
        room: &str,
        inst: &str,
        user: &str,
        name: &str,
        on: bool,
    ) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(if on { "HSET" } else { "HDEL" });
        cmd.arg(presence_key(room)).arg(format!("{inst}|{user}"));
        if on {
            cmd.arg(name);
        }
        self.conn.query::<i64>(&cmd).await.map(|_| ())
    }

    /// The other live instances' presence in `room`. Records of dead instances
    /// (no heartbeat) are removed for everyone on the way; `alive` caches the
    /// liveness checks of one pass.
    pub async fn presence_snapshot(
        &self,
        room: &str,
        alive: &mut HashMap<String, bool>,
    ) -> Result<RemotePresence, BrokerError> {
        Ok(self.snapshot_with_mine(room, alive).await?.0)
    }

    /// [`Self::presence_snapshot`], plus the users this instance's records name.
    async fn snapshot_with_mine(
        &self,
        room: &str,
        alive: &mut HashMap<String, bool>,
    ) -> Result<(RemotePresence, HashSet<String>), BrokerError> {
        let mut theirs = RemotePresence::new();
        let mut mine = HashSet::new();
        for (inst, user, name) in self.presence_of(room).await? {
            if inst == self.inbound.inst {
                mine.insert(user);
                continue;
            }
            let live = match alive.get(&inst) {
                Some(&l) => l,
                None => {
                    let l = self.alive(&inst).await.unwrap_or(true);
                    alive.insert(inst.clone(), l);
                    l
                }
            };
            if live {
                theirs
                    .entry(user)
                    .or_insert_with(|| (name, HashSet::new()))
                    .1
                    .insert(inst);
            } else {
                // A dead node's entry: remove it for everyone.
                let _ = self.presence_set(room, &inst, &user, "", false).await;
            }
        }
        Ok((theirs, mine))
    }

    /// One round of presence upkeep (see [`super::Broker::reconcile_presence`]).
    pub async fn reconcile_presence(
        &self,
        rooms: Vec<(String, HashMap<String, String>)>,
    ) -> Result<Vec<(String, RemotePresence)>, BrokerError> {
        self.heartbeat().await?;
        let mut alive = HashMap::new();
        let mut out = Vec::with_capacity(rooms.len());
        for (room, here) in rooms {
            let (theirs, mine) = self.snapshot_with_mine(&room, &mut alive).await?;
            // This node's own records: write what is missing, remove what is stale.
            for (user, name) in &here {
                if !mine.contains(user) {
                    let _ = self
                        .presence_set(&room, &self.inbound.inst, user, name, true)
                        .await;
                }
            }
            for user in mine.iter().filter(|u| !here.contains_key(*u)) {
                let _ = self
                    .presence_set(&room, &self.inbound.inst, user, "", false)
                    .await;
            }
            out.push((room, theirs));
        }
        Ok(out)
    }

    /// Leave the cluster cleanly: presence written, heartbeat removed.
    pub async fn shutdown(&self) {
        self.flush_presence().await;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(node_key(&self.inbound.inst));
        let _ = self.conn.query::<i64>(&cmd).await;
    }
}

/// Runs on the Redis connection's reader for every push: must not block.
fn on_push(inbound: &PushState, info: PushInfo) {
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            let Some(Value::BulkString(payload)) = info.data.get(1) else {
                return;
            };
            match serde_json::from_slice::<Envelope>(payload) {
                Ok(env) => {
                    if let (Some(sink), Some(event)) =
                        (inbound.sink.get(), env.into_inbound(&inbound.inst))
                    {
                        sink(event);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed broker envelope"),
            }
        }
        PushKind::Disconnection if inbound.healthy.swap(false, Ordering::Relaxed) => {
            tracing::warn!("the Redis connection dropped");
        }
        _ => {}
    }
}
