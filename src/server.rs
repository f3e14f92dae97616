//! The listener and the HTTP surface: `/ws` (upgrade), `/healthz`, `/readyz`,
//! `/metrics`, and graceful shutdown.
//!
//! Owns: opening the store and the broker and starting the hub, binding (plain or
//! TLS), the router, the Origin check, the client address behind trusted proxies,
//! the WebSocket upgrade, and the shutdown order: stop accepting and turn `/readyz`
//! red -> close sessions at `--drain-rate` per second (each sends `closing` with a
//! jittered reconnect delay and 1001) -> wait for them -> stop the hub (which
//! stores and acks what is in flight, leaves the cluster and closes the store), all
//! within `--shutdown-timeout`. Must not: handle protocol commands (that is
//! `session`), or reach into the hub's parts: it only starts and stops the hub.

use crate::accept::Acceptor;
use crate::app::AppState;
use crate::auth::{Authenticator, KeyError};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::hub::{Hub, HubOptions, Outbox};
use crate::metrics::Metrics;
use crate::session;
use crate::store::{Store, StoreError};
use crate::tls::{TlsCerts, TlsListener};
use crate::ws::{self, SharedTcp, WsStream};
use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Drained sessions are closed in slices this often, so closes are spread evenly.
const DRAIN_TICK: Duration = Duration::from_millis(10);
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
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error("cannot reach the other nodes: {0}")]
    Broker(#[from] BrokerError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl Server {
    /// Open the store, start the hub and bind the listener.
    pub async fn bind(
        mut config: Config,
        prometheus: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Result<Server, ServerError> {
        if config.max_connections == 0 {
            config.max_connections = default_max_connections();
        }
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
        if config.jwt_secret.as_ref().is_some_and(|k| k.len() < 32) {
            tracing::warn!(
                "--jwt-secret is under 32 bytes: easy to guess; use a long random one (e.g. openssl rand -hex 32)"
            );
        }
        let auth = Authenticator::new(
            config.jwt_secret.as_deref(),
            pem.as_ref().map(|(p, k)| (p.as_str(), k.as_slice())),
            config.guests_allowed(),
        )?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(TlsCerts::load(cert, key)?),
            _ => None,
        };
        let store = Store::open(&config.store_config()).await?;
        let metrics = Metrics::new();
        metrics.broker_up.set(1.0);
        let broker = Broker::connect(&config.broker(), metrics.clone()).await?;
        let options = HubOptions {
            presence_events_max: config.presence_events_max,
            max_reply_bytes: config.max_reply_bytes,
            writer_threads: config.writer_threads,
            batch_delay: std::time::Duration::from_millis(u64::from(config.batch_delay_ms)),
            commit_interval: std::time::Duration::from_millis(u64::from(config.commit_interval_ms)),
        };
        let hub = Hub::start(store, broker, metrics.clone(), options);
        crate::hooks::webhooks::Webhooks::start(&config, &hub, shutdown.clone())?;
        hub.load_bans().await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let state = Arc::new(AppState::new(
            config, hub, auth, shutdown, metrics, prometheus, tls,
        )?);
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// The TLS certificates, when serving TLS (for reloading on SIGHUP).
    pub fn tls(&self) -> Option<Arc<TlsCerts>> {
        self.state.tls.clone()
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
            .merge(crate::web::routes(&state.config.frame_ancestors))
            .nest("/api/v1", crate::api::routes(state.clone()))
            .with_state((state.clone(), tracker.clone()));

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

        // This node's figures for `GET /api/v1/stats`, once a second (and, with
        // several nodes, where the others read them).
        let sampler = {
            let state = state.clone();
            let token = state.shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tick.tick() => {
                            let mine = state.sample_stats();
                            state.hub.publish_stats(&mine).await;
                        }
                    }
                }
            })
        };

        let token = state.shutdown.clone();
        let app = router.into_make_service_with_connect_info::<PeerAddr>();
        let stopped = {
            let token = token.clone();
            async move { token.cancelled().await }
        };
        // axum serves until the token is cancelled, then waits for every in-flight
        // HTTP request (and no longer accepts). A client that sent half a request
        // would hold that wait for ever, so the wait runs beside the drain and
        // neither may outlast --shutdown-timeout.
        let serve = async {
            match state.tls.clone() {
                Some(certs) => {
                    let listener = TlsListener::new(
                        self.listener,
                        certs,
                        state.shutdown.clone(),
                        state.config.handshake_timeout,
                    )?;
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await?;
                }
                None => {
                    let listener = PlainListener(
                        self.listener,
                        state.config.handshake_timeout,
                        Acceptor::new(),
                    );
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await?;
                }
            }
            Ok::<(), ServerError>(())
        };
        tokio::pin!(serve);
        // With no request in flight, axum may be done as soon as the token is
        // cancelled: then it must not be polled again.
        let mut finished = false;
        tokio::select! {
            served = &mut serve => {
                served?;
                finished = true;
            }
            () = token.cancelled() => {}
        }

        let deadline = Instant::now() + state.config.shutdown_timeout;
        let http = async {
            if finished {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, &mut serve).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!("unfinished HTTP requests abandoned at --shutdown-timeout");
                    Ok(())
                }
            }
        };
        let (served, ()) = tokio::join!(http, drain_sessions(&state, deadline));
        served?;
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not finish closing before --shutdown-timeout");
        }
        // Every acked message is already stored; this stores and acks the rest, then
        // leaves the cluster and closes the store.
        state.hub.stop().await;
        sampler.abort();
        if let Some(u) = upkeep {
            u.abort();
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Close every session, `--drain-rate` per second, in evenly spaced slices; past the
/// deadline, close the rest at once.
async fn drain_sessions(state: &AppState, deadline: Instant) {
    let outboxes: Vec<Arc<Outbox>> = state.session_outboxes();
    let rate = u64::from(state.config.drain_rate);
    let n = outboxes.len() as u64;
    let drain_ms = n * 1000 / rate;
    state.set_drain_spread_ms(drain_ms.clamp(1000, 30_000));
    tracing::info!(
        sessions = n,
        rate,
        expected_ms = drain_ms,
        "draining sessions"
    );
    let per_tick =
        usize::try_from((rate * DRAIN_TICK.as_millis() as u64 / 1000).max(1)).unwrap_or(1);
    let mut next = Instant::now();
    for slice in outboxes.chunks(per_tick) {
        if Instant::now() >= deadline {
            break;
        }
        for o in slice {
            o.close();
        }
        next += DRAIN_TICK;
        tokio::time::sleep_until(next.min(deadline)).await;
    }
    for o in &outboxes {
        o.close();
    }
}

/// `--max-connections` when not given: the process's open-file limit less 256
/// descriptors for the store, the broker, listeners and new handshakes.
fn default_max_connections() -> usize {
    crate::accept::open_file_limit().map_or(10_000, |n| n.saturating_sub(256).max(16))
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the
/// nearest untrusted address in X-Forwarded-For (walking from the right, since each
/// proxy appends the address it saw).
fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> SocketAddr {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|n| n.contains(&ip));
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer.ip();
    let chain: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    for ip in chain.into_iter().rev() {
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    SocketAddr::new(client, 0)
}

/// The peer address of a connection, for any of our listeners (plain or TLS).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, PlainListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// A plain TCP listener that sets TCP_NODELAY on every connection (axum's does
/// not, and small frames would otherwise wait behind Nagle's algorithm).
/// At the open-file limit it backs off (`crate::accept`).
pub struct PlainListener(TcpListener, Duration, Acceptor);

impl Listener for PlainListener {
    type Io = crate::handshake::Guarded<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, addr) = self.2.accept(&self.0).await;
        (crate::handshake::Guarded::new(tcp, self.1), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

type Shared = (Arc<AppState>, TaskTracker);

/// A refused handshake: `status`, a plain-text reason and when to retry (seconds).
fn refused(status: StatusCode, reason: &'static str, retry_after: &'static str) -> Response {
    let mut resp = (status, reason).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
    resp
}

async fn ws_handler(
    State((state, tracker)): State<Shared>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    let remote = client_addr(peer, headers, &state.config.trusted_proxies);
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
    let accept = match ws::accept(req.method(), headers) {
        Ok(accept) => accept,
        Err(e) => {
            let mut resp = (e.status(), format!("{e}\n")).into_response();
            if e == ws::HandshakeError::Version {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return resp;
        }
    };
    if req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded to a WebSocket\n",
        )
            .into_response();
    }
    // Connections held and being upgraded (the tracker counts both; an upgrading
    // one may count twice for a moment, which errs on the side of refusing).
    if tracker.len() >= state.config.max_connections {
        Metrics::refused("max_connections");
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is at --max-connections; retry shortly or on another node\n",
            "1",
        );
    }
    let Some(slot) = state.take_ip_slot(remote.ip()) else {
        Metrics::refused("max_connections_per_ip");
        tracing::info!(%remote, "refused WebSocket handshake: --max-connections-per-ip reached");
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address (--max-connections-per-ip)\n",
            "5",
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let max = state.config.max_message;
    // Two tasks: one that waits for the upgrade and ends, and the session. Spawning
    // the session from inside the first, rather than awaiting it there, keeps the
    // long-lived task to the session's own state: an async block that awaits
    // `session::run(..)` carries the call's arguments beside the session future
    // (measured: 1,592 bytes of task state against the session's 736).
    let session_tracker = tracker.clone();
    tokio::spawn(tracker.track_future(async move {
        match upgrade.await {
            Ok(io) => {
                type Plain = TokioIo<crate::handshake::Guarded<tokio::net::TcpStream>>;
                let ws = match hyper_util::server::conn::auto::upgrade::downcast::<Plain>(io) {
                    // Plain TCP: the socket itself (see session::Transport), with
                    // what hyper read past the request.
                    Ok(parts) => {
                        let tcp = Either::Left(SharedTcp::new(parts.io.into_inner().into_inner()));
                        WsStream::new(tcp, max).with_read(&parts.read_buf)
                    }
                    Err(io) => WsStream::new(Either::Right(TokioIo::new(io)), max),
                };
                // The session's registration holds the address's slot from here.
                let session = session::run(ws, state, remote, Some(slot));
                tokio::spawn(session_tracker.track_future(session));
            }
            Err(e) => tracing::debug!(%remote, error = %e, "WebSocket upgrade failed"),
        }
    }));
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

async fn readyz(State((state, _)): State<Shared>) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match state.hub.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics_handler(State((state, _)): State<Shared>) -> Response {
    match &state.prometheus {
        Some(h) => {
            crate::metrics::collect_process();
            let mut text = h.render();
            text.push_str(&state.metrics.render_own());
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
