//! The application state every session and HTTP handler shares.
//!
//! Owns: the configuration, the hub, the authenticator, the shutdown signal, the
//! metrics and the registry of live sessions (which the drain walks). Must not:
//! serve anything itself; `server` serves HTTP and `session` runs connections, and
//! both import this module, never each other's.

use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::{Hub, Outbox};
use crate::metrics::Metrics;
use crate::tls::TlsCerts;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// A live session in the registry: its outbox, and the client address whose
/// connection slot it holds.
type Registered = (Arc<Outbox>, Option<std::net::IpAddr>);

/// What every session and handler shares.
pub struct AppState {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
    pub(crate) prometheus: Option<PrometheusHandle>,
    next_id: AtomicU64,
    /// Live sessions, by the outbox through which each is asked to close (a
    /// per-session token would cost every idle connection ~180 bytes); the drain
    /// walks this.
    /// With each, the client address whose `--max-connections-per-ip` slot it
    /// holds (given back when it is unregistered).
    sessions: Mutex<HashMap<u64, Registered>>,
    /// Set when a drain starts: the spread (ms) of suggested reconnect delays.
    drain_spread_ms: AtomicU64,
    pub tls: Option<Arc<TlsCerts>>,
    /// This node's figures, sampled once a second ([`AppState::sample_stats`]).
    stats: Mutex<(crate::stats::Sampler, crate::stats::NodeStats)>,
    /// WebSocket connections held (or being upgraded) per client address, for
    /// `--max-connections-per-ip`.
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// The publish check, when `--publish-check-url` is set.
    pub publish_check: Option<crate::hooks::PublishCheck>,
}

/// One connection's place in its address's count (see [`AppState::take_ip_slot`]):
/// given back when dropped, unless handed over to a registered session.
pub struct IpSlot {
    state: Arc<AppState>,
    ip: std::net::IpAddr,
    held: bool,
}

impl IpSlot {
    /// The session registry keeps the slot from now on (see
    /// [`AppState::register_session`]).
    fn hand_over(mut self) -> std::net::IpAddr {
        self.held = false;
        self.ip
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if self.held {
            self.state.release_ip(self.ip);
        }
    }
}

impl AppState {
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        auth: Authenticator,
        shutdown: CancellationToken,
        metrics: Metrics,
        prometheus: Option<PrometheusHandle>,
        tls: Option<Arc<TlsCerts>>,
    ) -> Result<AppState, crate::hooks::HookError> {
        let publish_check = crate::hooks::PublishCheck::from_config(&config)?;
        Ok(AppState {
            config,
            hub,
            auth,
            shutdown,
            metrics,
            prometheus,
            next_id: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            drain_spread_ms: AtomicU64::new(0),
            tls,
            stats: Mutex::default(),
            per_ip: Mutex::default(),
            publish_check,
        })
    }

    /// Run the publish check, if one is configured, on what `user` is about to
    /// store in `key` (it may rewrite `out`).
    pub async fn check_publish(
        &self,
        user: &str,
        key: &crate::message::ChannelKey,
        out: &mut crate::hub::Outgoing,
    ) -> Result<(), crate::protocol::CommandError> {
        match &self.publish_check {
            Some(check) => check.check(user, key, out).await,
            None => Ok(()),
        }
    }

    /// Take one of `ip`'s connection slots, if it has one left under
    /// `--max-connections-per-ip`; the slot is given back when dropped.
    pub fn take_ip_slot(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let max = self.config.max_connections_per_ip;
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            state: Arc::clone(self),
            ip,
            held: true,
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Register a session; its outbox is closed when the drain reaches it (at once
    /// if the drain has already begun).
    /// The session takes over `slot` (its address's connection count): it is
    /// given back when the session is unregistered. Kept here rather than in the
    /// session's task, whose state every idle connection pays for.
    pub fn register_session(&self, id: u64, outbox: &Arc<Outbox>, slot: Option<IpSlot>) {
        if self.shutdown.is_cancelled() {
            outbox.close();
        }
        let ip = slot.map(IpSlot::hand_over);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (outbox.clone(), ip));
    }

    pub fn unregister_session(&self, id: u64) {
        let gone = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some((_, Some(ip))) = gone {
            self.release_ip(ip);
        }
    }

    /// The client address of session `id` (for logs about it: the session itself
    /// keeps none, to stay small).
    pub fn session_ip(&self, id: u64) -> Option<std::net::IpAddr> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .and_then(|(_, ip)| *ip)
    }

    /// Give back one of `ip`'s connection slots.
    fn release_ip(&self, ip: std::net::IpAddr) {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// A reconnect delay to suggest in `closing`: random within the drain's spread,
    /// so that clients of a rolling restart do not all come back at once.
    pub fn suggested_reconnect_ms(&self) -> u64 {
        let spread = self.drain_spread_ms.load(Ordering::Relaxed).max(1000);
        rand::random_range(0..=spread)
    }

    /// The outboxes of every live session, to close them (the drain).
    pub fn session_outboxes(&self) -> Vec<Arc<Outbox>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// Set the spread (ms) of the reconnect delays suggested from now on.
    pub fn set_drain_spread_ms(&self, ms: u64) {
        self.drain_spread_ms.store(ms, Ordering::Relaxed);
    }

    /// Sample this node's figures (once a second, by the server) and keep them.
    pub fn sample_stats(&self) -> crate::stats::NodeStats {
        let text = self
            .prometheus
            .as_ref()
            .map(|h| {
                let mut t = h.render();
                t.push_str(&self.metrics.render_own());
                t
            })
            .unwrap_or_default();
        let mut g = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (sampler, last) = &mut *g;
        *last = sampler.sample(
            &self.config.node_id,
            self.shutdown.is_cancelled(),
            &text,
            crate::hub::now_ms(),
        );
        last.clone()
    }

    /// This node's last sampled figures.
    pub fn node_stats(&self) -> crate::stats::NodeStats {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}
