//! One WebSocket connection's task, from upgrade to close.
//!
//! Owns: the connection's life cycle (hello deadline, token expiry, heartbeat,
//! shutdown), reading frames and dispatching commands ([`commands`]), and writing
//! the connection's [`Outbox`] to the socket (draining it, feeding each frame and
//! flushing once). Must not: touch another connection directly; everything shared
//! goes through the hub. One task per connection: reading, writing and timers are
//! branches of one `select!`, and the writer is cancellation-safe so a stalled
//! socket never stops the session from noticing a shutdown or an overflow.

mod commands;

use crate::auth::Identity;
use crate::hub::outbox::Drained;
use crate::hub::{Conn, Outbox};
use crate::limits::TokenBucket;
use crate::metrics::{ConnState, Metrics};
use crate::protocol::{self, close};
use crate::server::AppState;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::ready;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

/// How long a server-initiated close may take to reach a client that does not read.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long a session waits at shutdown for its in-flight sends to be acked.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// How long we wait for the client's answering close frame.
const CLOSE_ECHO: Duration = Duration::from_secs(2);
/// Largest batched frame (`batch: true`) we build.
const MAX_BATCH_FRAME: usize = 64 * 1024;

/// How a session ends.
#[derive(Debug)]
enum Exit {
    /// Drop the TCP connection without a close frame (peer gone, heartbeat lost).
    Drop(&'static str),
    /// The peer closed; tungstenite queued the echo, flush it.
    PeerClosed,
    /// Close with `code`; send `closing` with the reason first when `announce`.
    Close {
        code: u16,
        reason: &'static str,
        announce: bool,
    },
}

impl Exit {
    fn close(code: u16, reason: &'static str) -> Exit {
        Exit::Close {
            code,
            reason,
            announce: false,
        }
    }
    fn announced(code: u16, reason: &'static str) -> Exit {
        Exit::Close {
            code,
            reason,
            announce: true,
        }
    }
}

pub struct Session {
    state: Arc<AppState>,
    id: u64,
    outbox: Arc<Outbox>,
    /// Set by a successful `hello`.
    conn: Option<Arc<Conn>>,
    identity: Option<Identity>,
    rooms: HashSet<String>,
    bucket: TokenBucket,
    /// `hello` asked for newline-batched frames.
    batch: bool,
    last_rx: Instant,
    /// Hello deadline before `hello`, token expiry after it.
    deadline: Option<Instant>,
    /// Cancelled when the server's drain reaches this session.
    close: tokio_util::sync::CancellationToken,
}

pub async fn run(socket: WebSocket, state: Arc<AppState>, remote: SocketAddr) {
    let id = state.next_conn_id();
    // `remote` is the client (behind trusted proxies: from X-Forwarded-For).
    let span = tracing::info_span!("conn", id, remote = %remote.ip(), user = tracing::field::Empty);
    let cfg = &state.config;
    let outbox = Arc::new(Outbox::new(cfg.send_queue, cfg.send_queue_bytes));
    let now = Instant::now();
    let session = Session {
        bucket: TokenBucket::new(cfg.rate_limit, now.into_std()),
        deadline: Some(now + cfg.hello_timeout),
        state: state.clone(),
        id,
        outbox,
        conn: None,
        identity: None,
        rooms: HashSet::new(),
        batch: false,
        last_rx: now,
        close: state.register_session(id),
    };
    state.metrics.connections_total.increment(1);
    state
        .metrics
        .conn_state(None, Some(ConnState::AwaitingHello));
    session.run(socket).instrument(span).await;
    state.unregister_session(id);
}

type Sink = SplitSink<WebSocket, Message>;

/// Write `pending` and flush. Cancellation-safe: a frame leaves `pending` only once
/// the sink has taken it, so a cancelled call loses nothing.
async fn write_pending(
    sink: &mut Sink,
    pending: &mut VecDeque<Message>,
) -> Result<(), axum::Error> {
    poll_fn(|cx| {
        while !pending.is_empty() {
            ready!(sink.poll_ready_unpin(cx))?;
            if let Some(m) = pending.pop_front() {
                sink.start_send_unpin(m)?;
            }
        }
        sink.poll_flush_unpin(cx)
    })
    .await
}

impl Session {
    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let hb = self.state.config.heartbeat;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + hb, hb);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending: VecDeque<Message> = VecDeque::new();
        let mut scratch: Vec<Utf8Bytes> = Vec::new();
        let mut need_flush = false;
        let close_token = self.close.clone();

        let exit = loop {
            if pending.is_empty()
                && self.take_outbox(&mut scratch, &mut pending) == Drained::Overflowed
            {
                break self.slow_consumer();
            }
            let writing = !pending.is_empty() || need_flush;
            let deadline = self.deadline;
            // Not biased: under sustained fan-out the socket is almost always
            // writable, and a biased select would starve reading (the client's own
            // commands, and the pongs that keep it alive).
            tokio::select! {
                _ = close_token.cancelled() => break Exit::announced(close::GOING_AWAY, "server shutting down"),
                r = write_pending(&mut sink, &mut pending), if writing => {
                    need_flush = false;
                    if r.is_err() {
                        break Exit::Drop("write failed");
                    }
                }
                _ = self.outbox.notified() => {
                    if self.outbox.is_overflowed() {
                        break self.slow_consumer();
                    }
                }
                frame = stream.next() => {
                    self.last_rx = Instant::now();
                    match frame {
                        None => break Exit::Drop("peer gone"),
                        Some(Err(e)) => break classify(e),
                        Some(Ok(Message::Text(t))) => {
                            if let Some(exit) = self.on_text(t.as_str()).await {
                                break exit;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.reply_error(None, &protocol::CommandError::bad_request(
                                "binary frames are not part of the protocol; send JSON text",
                            ));
                        }
                        // tungstenite answers pings itself; the answer goes out on the
                        // next write or flush.
                        Some(Ok(Message::Ping(_))) => need_flush = true,
                        Some(Ok(Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) => break Exit::PeerClosed,
                    }
                }
                _ = heartbeat.tick() => {
                    if self.last_rx.elapsed() >= 2 * hb {
                        self.state.metrics.heartbeat_drops.increment(1);
                        break Exit::Drop("heartbeat lost");
                    }
                    pending.push_back(Message::Ping(Default::default()));
                }
                _ = sleep_until_opt(deadline) => {
                    break if self.conn.is_none() {
                        Exit::close(close::NO_HELLO, "no hello in time")
                    } else {
                        Exit::announced(close::UNAUTHORIZED, "token expired")
                    };
                }
            }
        };

        self.finish(exit, sink, stream, pending, scratch).await;
    }

    /// Move queued frames into `pending`, joining them with newlines when the client
    /// asked for batches. Records how deep the queue was (frames flushed together).
    fn take_outbox(
        &self,
        scratch: &mut Vec<Utf8Bytes>,
        pending: &mut VecDeque<Message>,
    ) -> Drained {
        scratch.clear();
        if self.outbox.drain_into(scratch) == Drained::Overflowed {
            return Drained::Overflowed;
        }
        if scratch.is_empty() {
            return Drained::Ok;
        }
        let metrics = &self.state.metrics;
        metrics.outbox_depth.record(scratch.len() as f64);
        if !self.batch || scratch.len() == 1 {
            pending.extend(scratch.drain(..).map(Message::Text));
        } else {
            let mut buf = String::new();
            let mut in_frame = 0u32;
            for f in scratch.drain(..) {
                if !buf.is_empty() && buf.len() + 1 + f.len() > MAX_BATCH_FRAME {
                    pending.push_back(Message::Text(std::mem::take(&mut buf).into()));
                    metrics.batch_size.record(f64::from(in_frame));
                    in_frame = 0;
                }
                if !buf.is_empty() {
                    buf.push('\n');
                }
                buf.push_str(f.as_str());
                in_frame += 1;
            }
            if !buf.is_empty() {
                pending.push_back(Message::Text(buf.into()));
                metrics.batch_size.record(f64::from(in_frame));
            }
        }
        Drained::Ok
    }

    fn slow_consumer(&self) -> Exit {
        self.state.metrics.slow_consumer_closes.increment(1);
        tracing::info!("closing slow consumer: outgoing queue overflowed");
        Exit::announced(
            close::SLOW_CONSUMER,
            "slow consumer: outgoing queue overflowed",
        )
    }

    async fn finish(
        mut self,
        exit: Exit,
        mut sink: Sink,
        mut stream: SplitStream<WebSocket>,
        mut pending: VecDeque<Message>,
        mut scratch: Vec<Utf8Bytes>,
    ) {
        tracing::debug!(?exit, "session ending");
        let was = if self.conn.is_some() {
            ConnState::Active
        } else {
            ConnState::AwaitingHello
        };
        self.state
            .metrics
            .conn_state(Some(was), Some(ConnState::Closing));
        if matches!(
            exit,
            Exit::Close {
                code: close::GOING_AWAY,
                ..
            }
        ) {
            // Shutdown: let our in-flight sends be stored and acked before we say
            // goodbye, so the client need not resend them.
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.state.hub.flush()).await;
        }
        // Leave rooms first, so others see `member leave` even if the close stalls.
        if let Some(conn) = self.conn.take() {
            let rooms = std::mem::take(&mut self.rooms);
            self.state.hub.unregister(&conn, rooms);
        }
        match exit {
            Exit::Drop(why) => {
                tracing::debug!(why, "dropping connection");
                Metrics::close(1006);
            }
            Exit::PeerClosed => {
                let _ =
                    tokio::time::timeout(CLOSE_ECHO, write_pending(&mut sink, &mut pending)).await;
                Metrics::close(close::NORMAL);
            }
            Exit::Close {
                code,
                reason,
                announce,
            } => {
                Metrics::close(code);
                if code == close::SLOW_CONSUMER {
                    pending.clear();
                } else {
                    // Deliver what is already queued: the `error` that explains the
                    // close, or stored messages that save a recovery round trip.
                    let _ = self.take_outbox(&mut scratch, &mut pending);
                }
                if announce {
                    let reconnect_ms =
                        (code == close::GOING_AWAY).then(|| self.state.suggested_reconnect_ms());
                    pending.push_back(Message::Text(
                        protocol::closing_event(reason, reconnect_ms).into(),
                    ));
                    self.state.metrics.out("closing", 1);
                }
                pending.push_back(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })));
                let sent =
                    tokio::time::timeout(CLOSE_FLUSH, write_pending(&mut sink, &mut pending)).await;
                if matches!(sent, Ok(Ok(()))) {
                    // Wait briefly for the client's close frame, then drop TCP.
                    let _ = tokio::time::timeout(CLOSE_ECHO, async {
                        while let Some(Ok(m)) = stream.next().await {
                            if matches!(m, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
            }
        }
        self.state
            .metrics
            .conn_state(Some(ConnState::Closing), None);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Map a WebSocket-layer error to how we close (RFC 6455 codes).
fn classify(e: axum::Error) -> Exit {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => Exit::close(close::TOO_BIG, "message too big"),
        Some(WsError::Utf8(_)) => Exit::close(close::INVALID_UTF8, "invalid UTF-8"),
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => Exit::Drop("reset"),
        Some(WsError::Protocol(_)) => Exit::close(close::PROTOCOL_ERROR, "protocol error"),
        Some(WsError::WriteBufferFull(_)) => Exit::Drop("write buffer full"),
        _ => Exit::Drop("connection error"),
    }
}
