//! The listener and the HTTP surface: `/ws` (upgrade), `/healthz`, `/readyz`,
//! `/metrics`, and graceful shutdown.
//!
//! Owns: binding, the router, the Origin check, WebSocket buffer settings, the
//! session task tracker, and the shutdown order (stop accepting -> every session
//! sends `closing` and 1001 -> wait for them -> drain the committer -> close the
//! store). Must not: handle protocol commands (that is `session`).

use crate::auth::{Authenticator, KeyError};
use crate::broker::Broker;
use crate::config::{Config, StoreKind};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session;
use crate::store::{Store, StoreConfig, StoreError};
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for sessions to finish their close handshakes.
const SESSION_DRAIN: Duration = Duration::from_secs(10);
/// tungstenite's read buffer per connection. Small: an idle connection should cost
/// little, and tungstenite zero-fills the buffer before each read (STACK-NOTES).
const READ_BUFFER: usize = 4 * 1024;
/// Frames are collected up to this size before a write; we flush once per drain.
const WRITE_BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// What every session and handler shares.
pub struct AppState {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
    prometheus: Option<PrometheusHandle>,
    next_id: AtomicU64,
}

impl AppState {
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    committer: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Open the store, start the hub and bind the listener.
    pub async fn bind(
        config: Config,
        prometheus: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Result<Server, ServerError> {
        let pem = match &config.jwt_public_key {
            None => None,
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            )),
        };
        let auth = Authenticator::new(
            config.jwt_secret.as_deref(),
            pem.as_ref().map(|(p, k)| (p.as_str(), k.as_slice())),
            config.guests,
        )?;
        let store_config = match config.store {
            StoreKind::Sqlite => StoreConfig::Sqlite {
                data_dir: config.data_dir.clone(),
            },
            StoreKind::Memory => StoreConfig::Memory {
                ring: config.memory_history,
            },
        };
        let store = Store::open(&store_config).await?;
        let metrics = Metrics::new();
        let (hub, committer) = Hub::start(store, Broker::Local, metrics.clone());
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let state = Arc::new(AppState {
            config,
            hub,
            auth,
            shutdown,
            metrics,
            prometheus,
            next_id: AtomicU64::new(1),
        });
        Ok(Server {
            listener,
            state,
            committer,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// Serve until the shutdown token is cancelled, then shut down in order.
    pub async fn run(self) -> Result<(), ServerError> {
        let state = self.state;
        let tracker = TaskTracker::new();
        let router = Router::new()
            .route("/ws", get(ws_handler))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_handler))
            .merge(crate::web::routes())
            .with_state((state.clone(), tracker.clone()));

        let sweeper = {
            let hub = state.hub.clone();
            let token = state.shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tick.tick() => hub.sweep(),
                    }
                }
            })
        };
        let upkeep = state.prometheus.clone().map(|h| {
            let token = state.shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tick.tick() => h.run_upkeep(),
                    }
                }
            })
        });

        let listener = self.listener.tap_io(|tcp| {
            // axum does not set TCP_NODELAY; small frames would wait behind Nagle.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "set_nodelay failed");
            }
        });
        let token = state.shutdown.clone();
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;

        tracing::info!("shutting down: closing sessions");
        tracker.close();
        if tokio::time::timeout(SESSION_DRAIN, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not finish closing in time");
        }
        // Every acked message is already stored; this stores and acks the rest.
        state.hub.drain().await;
        let _ = self.committer.await;
        state.hub.store().close().await;
        sweeper.abort();
        if let Some(u) = upkeep {
            u.abort();
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

type Shared = (Arc<AppState>, TaskTracker);

async fn ws_handler(
    State((state, tracker)): State<Shared>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let allowed = &state.config.allowed_origins;
    if !allowed.is_empty() {
        // A handshake without Origin is not from a browser and is allowed.
        if let Some(origin) = headers.get(header::ORIGIN) {
            let ok = origin.to_str().is_ok_and(|o| {
                allowed
                    .iter()
                    .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
            });
            if !ok {
                tracing::info!(%remote, ?origin, "refused WebSocket handshake: origin not allowed");
                return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
            }
        }
    }
    let max = state.config.max_message;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| tracker.track_future(session::run(socket, state, remote)))
}

async fn readyz(State((state, _)): State<Shared>) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if state.hub.store_failing() {
        return (StatusCode::SERVICE_UNAVAILABLE, "store commits failing\n").into_response();
    }
    match state.hub.store().check().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics_handler(State((state, _)): State<Shared>) -> Response {
    match &state.prometheus {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
