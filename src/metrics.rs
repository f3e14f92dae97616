//! Prometheus metrics: names, help texts, histogram buckets and the handles the hot
//! paths use.
//!
//! Owns: every metric Hubbub exports (all prefixed `hubbub_`). Must not: be looked
//! up by name on a per-delivery path; callers keep the handles in [`Metrics`].

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Install the process-wide Prometheus recorder and describe every metric.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    // Every histogram gets buckets (Prometheus users expect `_bucket{le=...}`, not
    // summaries): powers of two for counts, and second-based buckets for latencies.
    let counts: Vec<f64> = (0..12).map(|i| f64::from(1u32 << i)).collect();
    let handle = PrometheusBuilder::new()
        .set_buckets(&counts)?
        .set_buckets_for_metric(
            Matcher::Full("hubbub_store_commit_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("hubbub_broker_publish_seconds".into()),
            &[
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1,
            ],
        )?
        .install_recorder()?;
    describe();
    metrics_process::Collector::default().describe();
    Ok(handle)
}

/// Update the standard Prometheus process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`,
/// `process_threads`, …) from /proc. Called on each scrape of `/metrics`, so they
/// are as fresh as the scrape; `hubbub-bench` reads them when it has no PID.
pub fn collect_process() {
    metrics_process::Collector::default().collect();
}

fn describe() {
    describe_gauge!(
        "hubbub_connections",
        "Open WebSocket connections, by state (awaiting_hello, active, closing)"
    );
    describe_counter!("hubbub_connections_total", "WebSocket connections accepted");
    describe_gauge!(
        "hubbub_users",
        "Distinct users with at least one active connection"
    );
    describe_gauge!(
        "hubbub_rooms",
        "Rooms with at least one member on this node"
    );
    describe_gauge!(
        "hubbub_room_members",
        "Room memberships on this node (connections joined to rooms)"
    );
    describe_counter!(
        "hubbub_messages_in_total",
        "Client commands received, by type (invalid ones as type=\"invalid\")"
    );
    describe_counter!(
        "hubbub_messages_out_total",
        "Server messages queued to connections, by type (message, member, typing, ack, reply, error, closing)"
    );
    describe_counter!(
        "hubbub_deliveries_total",
        "Message events queued to client connections (one per receiving connection)"
    );
    describe_histogram!(
        "hubbub_outbox_depth",
        "Frames waiting in a connection's outgoing queue when it is drained (written with one flush)"
    );
    describe_histogram!(
        "hubbub_batch_size",
        "Protocol messages per WebSocket frame for clients that asked for batching"
    );
    describe_counter!(
        "hubbub_messages_stored_total",
        "Messages committed to the history store"
    );
    describe_counter!(
        "hubbub_slow_consumer_closes_total",
        "Connections closed with 4008 because their outgoing queue overflowed"
    );
    describe_counter!(
        "hubbub_dropped_deliveries_total",
        "Deliveries not queued because the receiving connection's queue had overflowed"
    );
    describe_counter!(
        "hubbub_rate_limited_total",
        "Commands refused by the rate limit"
    );
    describe_counter!(
        "hubbub_heartbeat_drops_total",
        "Connections dropped because nothing arrived for two heartbeat intervals"
    );
    describe_counter!(
        "hubbub_closes_total",
        "Connections closed, by close code (1006: dropped without a close frame)"
    );
    describe_histogram!(
        "hubbub_store_commit_seconds",
        metrics::Unit::Seconds,
        "Time to commit one batch of messages to the store"
    );
    describe_histogram!(
        "hubbub_store_commit_batch_size",
        "Messages per store commit (group commit)"
    );
    describe_counter!(
        "hubbub_store_errors_total",
        "Failed store commits (retried)"
    );
    describe_histogram!(
        "hubbub_broker_publish_seconds",
        metrics::Unit::Seconds,
        "Time to publish one committed batch of messages to the other nodes (0 on a single node)"
    );
    describe_counter!(
        "hubbub_broker_reconnects_total",
        "Reconnections of the cross-node broker (always 0 on a single node)"
    );
    describe_gauge!(
        "hubbub_broker_up",
        "1 while the cross-node broker answers, 0 while it does not; 1 on a single node"
    );
    describe_counter!(
        "hubbub_broker_gaps_detected_total",
        "Gaps in a room's or DM pair's seq noticed on this node (a missed broadcast)"
    );
    describe_counter!(
        "hubbub_broker_gaps_filled_total",
        "Gaps closed by reading the missing messages from the store"
    );
    describe_counter!(
        "hubbub_broker_gap_messages_total",
        "Messages delivered from the store to close gaps"
    );
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    AwaitingHello,
    Active,
    Closing,
}

impl ConnState {
    fn label(self) -> &'static str {
        match self {
            ConnState::AwaitingHello => "awaiting_hello",
            ConnState::Active => "active",
            ConnState::Closing => "closing",
        }
    }
}

/// Every value of the `type` label of `hubbub_messages_out_total`.
const OUT_TYPES: [&str; 7] = [
    "message", "member", "typing", "ack", "reply", "error", "closing",
];

/// Handles for the hot paths (registration is a hash lookup; we do it once).
#[derive(Clone)]
pub struct Metrics {
    connections: [Gauge; 3],
    pub connections_total: Counter,
    pub users: Gauge,
    pub rooms: Gauge,
    pub room_members: Gauge,
    out: Vec<(&'static str, Counter)>,
    pub outbox_depth: Histogram,
    pub batch_size: Histogram,
    pub heartbeat_drops: Counter,
    pub broker_publish_seconds: Histogram,
    pub broker_reconnects: Counter,
    pub broker_up: Gauge,
    pub gaps_detected: Counter,
    pub gaps_filled: Counter,
    pub gap_messages: Counter,
    pub deliveries: Counter,
    pub stored: Counter,
    pub slow_consumer_closes: Counter,
    pub dropped_deliveries: Counter,
    pub rate_limited: Counter,
    pub commit_seconds: Histogram,
    pub commit_batch: Histogram,
    pub store_errors: Counter,
    /// `hubbub_messages_in_total{type=...}`, one handle per command type.
    commands: Vec<(&'static str, Counter)>,
}

/// Every value of the `type` label of `hubbub_messages_in_total`.
const COMMAND_TYPES: [&str; 10] = [
    "hello", "join", "leave", "send", "direct", "history", "presence", "typing", "ping", "invalid",
];

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            connections: [
                ConnState::AwaitingHello,
                ConnState::Active,
                ConnState::Closing,
            ]
            .map(|s| gauge!("hubbub_connections", "state" => s.label())),
            connections_total: counter!("hubbub_connections_total"),
            users: gauge!("hubbub_users"),
            rooms: gauge!("hubbub_rooms"),
            room_members: gauge!("hubbub_room_members"),
            out: OUT_TYPES
                .iter()
                .map(|&kind| (kind, counter!("hubbub_messages_out_total", "type" => kind)))
                .collect(),
            outbox_depth: histogram!("hubbub_outbox_depth"),
            batch_size: histogram!("hubbub_batch_size"),
            heartbeat_drops: counter!("hubbub_heartbeat_drops_total"),
            broker_publish_seconds: histogram!("hubbub_broker_publish_seconds"),
            broker_reconnects: counter!("hubbub_broker_reconnects_total"),
            broker_up: gauge!("hubbub_broker_up"),
            gaps_detected: counter!("hubbub_broker_gaps_detected_total"),
            gaps_filled: counter!("hubbub_broker_gaps_filled_total"),
            gap_messages: counter!("hubbub_broker_gap_messages_total"),
            deliveries: counter!("hubbub_deliveries_total"),
            stored: counter!("hubbub_messages_stored_total"),
            slow_consumer_closes: counter!("hubbub_slow_consumer_closes_total"),
            dropped_deliveries: counter!("hubbub_dropped_deliveries_total"),
            rate_limited: counter!("hubbub_rate_limited_total"),
            commit_seconds: histogram!("hubbub_store_commit_seconds"),
            commit_batch: histogram!("hubbub_store_commit_batch_size"),
            store_errors: counter!("hubbub_store_errors_total"),
            commands: COMMAND_TYPES
                .iter()
                .map(|&kind| (kind, counter!("hubbub_messages_in_total", "type" => kind)))
                .collect(),
        }
    }

    /// Count one received command of `kind` (a `Command::kind()` or "invalid").
    pub fn command(&self, kind: &'static str) {
        if let Some((_, c)) = self.commands.iter().find(|(k, _)| *k == kind) {
            c.increment(1);
        }
    }

    /// Count `n` server messages of `kind` (one of the `OUT_TYPES`).
    pub fn out(&self, kind: &'static str, n: u64) {
        if let Some((_, c)) = self.out.iter().find(|(k, _)| *k == kind) {
            c.increment(n);
        }
    }

    /// Move one connection between states (`None`: not counted).
    pub fn conn_state(&self, from: Option<ConnState>, to: Option<ConnState>) {
        let idx = |s: ConnState| s as usize;
        if let Some(f) = from {
            self.connections[idx(f)].decrement(1.0);
        }
        if let Some(t) = to {
            self.connections[idx(t)].increment(1.0);
        }
    }

    pub fn close(code: u16) {
        counter!("hubbub_closes_total", "code" => code.to_string()).increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
