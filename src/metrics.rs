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
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    describe_process();
    Ok(handle)
}

/// Update the standard Prometheus process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`,
/// `process_threads`, …) from /proc. Called on each scrape of `/metrics`, so they
/// are as fresh as the scrape; `hubbub-bench` reads them when it has no PID.
pub fn collect_process() {
    let m = metrics_process::collector::collect();
    let gauges = [
        ("process_open_fds", m.open_fds),
        ("process_max_fds", m.max_fds),
        ("process_virtual_memory_bytes", m.virtual_memory_bytes),
        (
            "process_virtual_memory_max_bytes",
            m.virtual_memory_max_bytes,
        ),
        ("process_resident_memory_bytes", m.resident_memory_bytes),
        ("process_start_time_seconds", m.start_time_seconds),
        ("process_threads", m.threads),
    ];
    for (name, v) in gauges {
        if let Some(v) = v {
            gauge!(name).set(v as f64);
        }
    }
}

/// `process_cpu_seconds_total` with its fraction: metrics-process hands it to
/// the `metrics` crate as an integer counter, which cut it to whole seconds (0 on
/// a server that has used 0.9 s), so it is rendered here, from /proc, instead.
pub fn render_process_cpu(out: &mut String) {
    if let Some(cpu) = metrics_process::collector::collect().cpu_seconds_total {
        let _ = write!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total {cpu}\n"
        );
    }
}

/// Help texts of the process metrics [`collect_process`] sets.
fn describe_process() {
    describe_gauge!("process_open_fds", "Number of open file descriptors.");
    describe_gauge!(
        "process_max_fds",
        "Maximum number of open file descriptors (0: unlimited)."
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes."
    );
    describe_gauge!(
        "process_virtual_memory_max_bytes",
        "Maximum amount of virtual memory available in bytes (0: unlimited)."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory size in bytes."
    );
    describe_gauge!(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds."
    );
    describe_gauge!("process_threads", "Number of OS threads in the process.");
}

fn describe() {
    describe_gauge!(
        "hubbub_connections",
        "Open WebSocket connections, by state (awaiting_hello, active, closing)"
    );
    describe_counter!("hubbub_connections_total", "WebSocket connections accepted");
    describe_gauge!(
        "hubbub_accept_paused",
        "1 while accepting new connections is paused (out of file descriptors), else 0"
    );
    describe_counter!(
        "hubbub_accept_errors_total",
        "Failed accepts that paused accepting, by reason (process_open_files, system_open_files, out_of_memory, other)"
    );
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
        "Server messages queued to connections, by type (message, member, members, typing, ack, reply, error, closing)"
    );
    describe_counter!(
        "hubbub_deliveries_total",
        "Message events queued to client connections (one per receiving connection)"
    );
    describe_counter!(
        "hubbub_direct_writes_total",
        "Queue entries (messages, or a batching connection's group commits) the fan-out's writer threads wrote straight into parked sockets (no session woken)"
    );
    describe_counter!(
        "hubbub_direct_handbacks_total",
        "Parked connections whose frames went back to their session because the writer threads' queue was full"
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
    describe_counter!(
        "hubbub_connections_refused_total",
        "WebSocket handshakes refused, by reason (max_connections)"
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
const OUT_TYPES: [&str; 10] = [
    "message",
    "member",
    "members",
    "typing",
    "ack",
    "reply",
    "error",
    "closing",
    "left",
    "token_expiring",
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
    /// Recorded on every session wake-up: our own [`CountHistogram`], not the
    /// exporter's (see there).
    pub outbox_depth: Arc<CountHistogram>,
    pub batch_size: Arc<CountHistogram>,
    pub heartbeat_drops: Counter,
    pub broker_publish_seconds: Histogram,
    pub broker_reconnects: Counter,
    pub broker_up: Gauge,
    pub gaps_detected: Counter,
    pub gaps_filled: Counter,
    pub gap_messages: Counter,
    pub deliveries: Counter,
    pub direct_writes: Counter,
    pub direct_handbacks: Counter,
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
const COMMAND_TYPES: [&str; 18] = [
    "hello",
    "join",
    "leave",
    "send",
    "direct",
    "history",
    "presence",
    "typing",
    "ping",
    "edit",
    "delete",
    "react",
    "read",
    "unread",
    "refresh",
    "api_post",
    "api_delete",
    "invalid",
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
            outbox_depth: Arc::new(CountHistogram::new(
                "hubbub_outbox_depth",
                "Frames waiting in a connection's outgoing queue when it is drained (written with one flush)",
            )),
            batch_size: Arc::new(CountHistogram::new(
                "hubbub_batch_size",
                "Protocol messages per WebSocket frame for clients that asked for batching",
            )),
            heartbeat_drops: counter!("hubbub_heartbeat_drops_total"),
            broker_publish_seconds: histogram!("hubbub_broker_publish_seconds"),
            broker_reconnects: counter!("hubbub_broker_reconnects_total"),
            broker_up: gauge!("hubbub_broker_up"),
            gaps_detected: counter!("hubbub_broker_gaps_detected_total"),
            gaps_filled: counter!("hubbub_broker_gaps_filled_total"),
            gap_messages: counter!("hubbub_broker_gap_messages_total"),
            deliveries: counter!("hubbub_deliveries_total"),
            direct_writes: counter!("hubbub_direct_writes_total"),
            direct_handbacks: counter!("hubbub_direct_handbacks_total"),
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

    /// A handshake refused for `reason`.
    pub fn refused(reason: &'static str) {
        counter!("hubbub_connections_refused_total", "reason" => reason).increment(1);
    }
}

impl Metrics {
    /// The Prometheus text of the histograms kept here rather than by the
    /// exporter, to append to its render.
    pub fn render_own(&self) -> String {
        let mut out = String::new();
        render_process_cpu(&mut out);
        self.outbox_depth.render(&mut out);
        self.batch_size.render(&mut out);
        out
    }
}

/// Upper bounds of [`CountHistogram`]'s buckets: 1, 2, 4, ... 2048 (the exporter's
/// count buckets), then +Inf.
const COUNT_BUCKETS: usize = 12;

/// A Prometheus histogram of small counts with fixed power-of-two buckets, for
/// values recorded on every session wake-up. Written by hand because the
/// exporter's histograms keep every sample in a lock-free list until the next
/// scrape or upkeep: at 100,000 wake-ups a second that was megabytes of samples
/// (measured: 300 bytes of server RSS per idle connection after 19,000 joins into
/// 100 rooms) and an allocation every few samples. Here a sample is two relaxed
/// atomic additions and nothing is kept but the counts (the count rendered is the
/// +Inf bucket's).
pub struct CountHistogram {
    name: &'static str,
    help: &'static str,
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; COUNT_BUCKETS + 1],
    sum: AtomicU64,
}

impl CountHistogram {
    pub fn new(name: &'static str, help: &'static str) -> Self {
        CountHistogram {
            name,
            help,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }

    /// The bucket of `v`: the smallest i with v <= 2^i (0 and 1 go to the first).
    fn bucket(v: u64) -> usize {
        let bits = u64::BITS - v.saturating_sub(1).leading_zeros();
        (bits as usize).min(COUNT_BUCKETS)
    }

    pub fn record(&self, v: u64) {
        self.buckets[Self::bucket(v)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Append the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            if i < COUNT_BUCKETS {
                let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", 1u64 << i);
            } else {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Ordering::Relaxed));
        // The count is the +Inf bucket's, so the two agree in one render.
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_buckets_are_powers_of_two_and_cumulative() {
        let h = CountHistogram::new("h", "help");
        for v in [0, 1, 2, 3, 4, 5, 2048, 2049, 1_000_000] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out);
        let line = |le: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("h_bucket{{le=\"{le}\"}} ")))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        assert_eq!(line("1").as_deref(), Some("2"), "0 and 1");
        assert_eq!(line("2").as_deref(), Some("3"));
        assert_eq!(line("4").as_deref(), Some("5"), "3 and 4");
        assert_eq!(line("8").as_deref(), Some("6"));
        assert_eq!(line("2048").as_deref(), Some("7"));
        assert_eq!(line("+Inf").as_deref(), Some("9"));
        assert!(out.contains("h_count 9\n"));
        assert!(out.contains(&format!(
            "h_sum {}\n",
            1 + 2 + 3 + 4 + 5 + 2048 + 2049 + 1_000_000
        )));
        assert!(out.starts_with("# HELP h help\n# TYPE h histogram\n"));
    }
}
