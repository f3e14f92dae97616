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
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("hubbub_store_commit_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("hubbub_store_commit_batch_size".into()),
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!("hubbub_connections", "Open WebSocket connections");
    describe_counter!("hubbub_connections_total", "WebSocket connections accepted");
    describe_gauge!(
        "hubbub_rooms",
        "Rooms with at least one member on this node"
    );
    describe_counter!(
        "hubbub_messages_in_total",
        "Client commands received, by type (invalid ones as type=\"invalid\")"
    );
    describe_counter!(
        "hubbub_messages_out_total",
        "WebSocket text frames written to clients"
    );
    describe_counter!(
        "hubbub_deliveries_total",
        "Message events queued to client connections (one per receiving connection)"
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
    describe_counter!("hubbub_closes_total", "Connections closed, by close code");
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
}

/// Handles for the hot paths (registration is a hash lookup; we do it once).
#[derive(Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub rooms: Gauge,
    pub messages_out: Counter,
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
            connections: gauge!("hubbub_connections"),
            connections_total: counter!("hubbub_connections_total"),
            rooms: gauge!("hubbub_rooms"),
            messages_out: counter!("hubbub_messages_out_total"),
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

    pub fn close(code: u16) {
        counter!("hubbub_closes_total", "code" => code.to_string()).increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
