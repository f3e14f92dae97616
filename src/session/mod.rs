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

use crate::app::AppState;
use crate::auth::{EXP_LEEWAY_SECS, RoomAccess};
use crate::hub::outbox::{Alarm, CloseOrder, Overflowed, Taken};
use crate::hub::{Conn, Outbox};
use crate::limits::TokenBucket;
use crate::metrics::{ConnState, Metrics};
use crate::protocol::{self, close};
use crate::ws::{Incoming, Lines, Out, Text, WsError, WsStream, joins_batch};
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::either::Either;
use tracing::Instrument;

/// The upgraded connection.
pub type Socket = WsStream<Transport>;

/// The bytes under a WebSocket connection: on plain TCP (`Left`) the socket
/// itself (shared with the fan-out's writer threads while the session is parked,
/// see [`crate::hub::writers`]), taken out of hyper's upgrade, which wraps it in a
/// boxed trait object over two wrappers (about 100 bytes per idle connection, measured, and three
/// indirections per read or write); anything else (TLS, `Right`) behind hyper's
/// upgrade. An enum rather than a type parameter: one copy of the session's
/// code, not two.
pub type Transport = Either<crate::ws::SharedTcp, TokioIo<hyper::upgrade::Upgraded>>;

/// Outbox wake-ups in a row after which queued frames wait for the socket's poll
/// (which reads as well), so a steady fan-out cannot starve reading.
const MAX_OUTBOX_STREAK: u8 = 8;

/// How long a server-initiated close may take to reach a client that does not read.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long a session waits at shutdown for its in-flight sends to be acked.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// How long we wait for the client's answering close frame.
const CLOSE_ECHO: Duration = Duration::from_secs(2);

/// How a session ends.
#[derive(Debug)]
enum Exit {
    /// Drop the TCP connection without a close frame (peer gone, heartbeat lost).
    Drop(&'static str),
    /// The peer sent a close frame (with this code); echo it and drop.
    PeerClosed(Option<u16>),
    /// Close with `code`; send `closing` with the reason first when `announce`.
    Close {
        code: u16,
        reason: Cow<'static, str>,
        announce: bool,
    },
}

impl Exit {
    /// The server's order (drain or server API): announced with its reason.
    fn ordered(order: CloseOrder) -> Exit {
        Exit::Close {
            code: order.code,
            reason: Cow::Owned(order.reason.to_string()),
            announce: true,
        }
    }
    fn close(code: u16, reason: impl Into<Cow<'static, str>>) -> Exit {
        Exit::Close {
            code,
            reason: reason.into(),
            announce: false,
        }
    }
    fn announced(code: u16, reason: &'static str) -> Exit {
        Exit::Close {
            code,
            reason: Cow::Borrowed(reason),
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
    /// The rooms the token allows; set by a successful `hello`.
    access: Option<RoomAccess>,
    /// Joined rooms: at most `--max-rooms-per-conn` (100) short names, searched
    /// only by commands. Most connections are in one room, which is held inline
    /// (no allocation; a Vec or a set would cost an idle connection ~100 bytes).
    rooms: SmallVec<[Box<str>; 1]>,
    bucket: TokenBucket,
    /// `token_expiring` was sent for the token held now.
    warned: bool,
    last_rx: Instant,
    /// Hello deadline before `hello`, token expiry after it.
    deadline: Option<Instant>,
}

/// The connection's task. Not an `async fn`: the session and the socket move
/// straight into [`Session::run`]'s future, which is the whole per-connection task
/// state (an async wrapper would hold a second copy of both for the connection's
/// life).
pub fn run(
    socket: Socket,
    state: Arc<AppState>,
    remote: SocketAddr,
    slot: Option<crate::app::IpSlot>,
) -> tracing::instrument::Instrumented<impl Future<Output = ()>> {
    let id = state.next_conn_id();
    // `remote` is the client (behind trusted proxies: from X-Forwarded-For).
    // A debug-level span: at the default `info` level it is disabled and costs
    // nothing; enabled, the subscriber keeps ~350 bytes per connection for it (its
    // slab slot, extension map and formatted fields). The info-level events of a
    // session name the connection themselves.
    let span =
        tracing::debug_span!("conn", id, remote = %remote.ip(), user = tracing::field::Empty);
    let cfg = &state.config;
    let outbox = Arc::new(Outbox::new(cfg.send_queue, cfg.send_queue_bytes));
    state.register_session(id, &outbox, slot);
    let now = Instant::now();
    let session = Session {
        bucket: TokenBucket::new(cfg.rate_limit, now.into_std()),
        deadline: Some(now + cfg.hello_timeout),
        state: state.clone(),
        id,
        outbox,
        conn: None,
        access: None,
        rooms: SmallVec::new(),
        warned: false,
        last_rx: now,
    };
    state.metrics.connections_total.increment(1);
    state
        .metrics
        .conn_state(None, Some(ConnState::AwaitingHello));
    session.run(socket).instrument(span)
}

/// A session's permission to park its socket in its outbox: plain TCP only, with
/// writer threads only. Dropped with the session's task, it takes the socket back.
struct Parking {
    outbox: Option<Arc<Outbox>>,
}

impl Parking {
    fn new(ws: &Socket, outbox: &Arc<Outbox>, direct_writes: bool) -> Self {
        let plain = matches!(ws.get_ref(), Either::Left(_));
        Parking {
            outbox: (direct_writes && plain).then(|| outbox.clone()),
        }
    }

    /// Park the socket if the session has nothing of its own to write; whether
    /// it is parked now.
    fn park(&self, ws: &Socket) -> bool {
        match (&self.outbox, ws.get_ref()) {
            (Some(outbox), Either::Left(tcp)) if ws.is_idle() => outbox.park(tcp),
            _ => false,
        }
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        if let Some(outbox) = &self.outbox {
            outbox.unpark();
        }
    }
}

impl Session {
    // Not an `async fn`: its parameters would be copied into the future's locals,
    // keeping two copies of the session and the socket for the connection's life.
    // An `async move` block uses the captured ones in place (measured: 1,320 ->
    // 872 bytes of task state per connection).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, mut ws: Socket) -> impl Future<Output = ()> {
        async move {
            let hb = self.state.config.heartbeat;
            // One timer for the heartbeat and the deadline (hello, then token expiry):
            // armed for whichever comes first, reset in place rather than created anew
            // on every pass of the loop.
            let mut next_ping = Instant::now() + hb;
            let mut armed_deadline = self.next_deadline();
            let sleep = tokio::time::sleep_until(earliest(next_ping, armed_deadline));
            tokio::pin!(sleep);
            let mut timer = Timer::new(sleep);
            // Outbox wake-ups in a row that did not poll the socket (see below).
            let mut streak = 0u8;

            // Direct writes: the socket is parked in the outbox while the session
            // waits with nothing of its own to write; the guard takes it back
            // should this task be dropped there.
            let parking = Parking::new(&ws, &self.outbox, self.state.hub.direct_writes());
            let mut parked = false;

            let exit = loop {
                if parked {
                    // Back before anything is written: after this, no writer thread
                    // writes into the socket. (`take` below unparks too; this is for
                    // a socket that still has frames of its own queued.)
                    if ws.queued() > 0 {
                        self.outbox.unpark();
                    }
                }
                // Refill from the outbox only once the socket took everything: frames
                // waiting on a slow socket stay counted against the outbox's bounds.
                if ws.queued() == 0 {
                    match self.take_outbox(&mut ws) {
                        Err(Overflowed) => break self.slow_consumer(),
                        // What was taken is written by `finish` before the close.
                        Ok(Some(order)) => break Exit::ordered(order),
                        Ok(None) => {}
                    }
                    // Write what the socket takes at once: one pass of the select
                    // below per delivery instead of two (one to write, one to wait),
                    // measured in one big room. But writing here empties the queue,
                    // which lets the outbox branch win again and again under a steady
                    // fan-out without the socket ever being read; after a few such
                    // wins in a row the frames wait for `ws.next()`, which reads too.
                    if streak < MAX_OUTBOX_STREAK
                        && ws.queued() > 0
                        && let Err(e) = ws.write_now()
                    {
                        break classify(&WsError::Io(e));
                    }
                }
                if self.next_deadline() != armed_deadline {
                    armed_deadline = self.next_deadline();
                    timer.arm(earliest(next_ping, armed_deadline));
                }
                // Nothing of its own left to write: let the fan-out write for it.
                parked = parking.park(&ws);
                // `ws.next()` writes what is queued and then reads, every time it is
                // polled, so sustained fan-out cannot starve reading (the client's own
                // commands, and the pongs that keep it alive) nor the other way round.
                // Biased: a fixed order costs no random draw per wake-up, and no
                // branch can starve the others (see each one).
                tokio::select! {
                    biased;
                    // First, so that a client whose frames are always ready cannot
                    // put off its deadline (it is ready only once per expiry).
                    () = timer.due() => {
                        let now = Instant::now();
                        self.warn_of_expiry(now);
                        if self.deadline.is_some_and(|d| now >= d) {
                            break if self.conn.is_none() {
                                Exit::close(close::NO_HELLO, "no hello in time")
                            } else {
                                Exit::announced(close::UNAUTHORIZED, "token expired")
                            };
                        }
                        if now >= next_ping {
                            if self.last_rx.elapsed() >= 2 * hb {
                                self.state.metrics.heartbeat_drops.increment(1);
                                break Exit::Drop("heartbeat lost");
                            }
                            ws.push_ping();
                            next_ping = now + hb;
                        }
                        armed_deadline = self.next_deadline();
                        timer.arm(earliest(next_ping, armed_deadline));
                    }
                    // A wake-up from the outbox. With the socket idle, the take at the
                    // top of the loop (one lock) brings the frames and any alarm; with
                    // the socket still writing, only an alarm matters now. It wins at
                    // most MAX_OUTBOX_STREAK + 1 times in a row: its permit is re-armed
                    // only by a push into an emptied queue; at the streak's end the
                    // frames taken stay queued on the socket, so the queue is not
                    // emptied again until the branch below has run.
                    _ = self.outbox.notified() => {
                        streak = streak.saturating_add(1);
                        if ws.queued() > 0 {
                            match self.outbox.alarm() {
                                Some(Alarm::Overflowed) => break self.slow_consumer(),
                                Some(Alarm::Closing(order)) => break Exit::ordered(order),
                                None => {}
                            }
                        }
                    }
                    frame = ws.next() => {
                        streak = 0;
                        let msg = match frame {
                            Ok(Some(msg)) => msg,
                            // Written: back to the top to take more from the outbox.
                            Ok(None) => continue,
                            Err(e) => break classify(&e),
                        };
                        // Any frame from the client counts as alive.
                        self.last_rx = Instant::now();
                        match msg {
                            Incoming::Text(t) => {
                                // Boxed: command handling is the largest state of this
                                // task, and an idle connection should not carry it.
                                if let Some(exit) = Box::pin(self.on_text(&t)).await {
                                    break exit;
                                }
                            }
                            Incoming::Binary => {
                                self.reply_error(None, &protocol::CommandError::bad_request(
                                    "binary frames are not part of the protocol; send JSON text",
                                ));
                            }
                            Incoming::Ping(payload) => ws.push_pong(payload),
                            Incoming::Pong => {}
                            Incoming::Close(code) => break Exit::PeerClosed(code),
                        }
                    }
                }
            };

            // Takes the socket back if it is still parked (a break from the wait).
            drop(parking);
            // Boxed for the same reason as command handling.
            Box::pin(self.finish(exit, ws)).await;
        }
    }

    /// Move queued frames to the socket, joining them with newlines when the
    /// client asked for batches. Records how deep the queue was (frames written
    /// together). Returns the server's order to close, if it gave one.
    fn take_outbox(&mut self, ws: &mut Socket) -> Result<Option<CloseOrder>, Overflowed> {
        let Taken {
            mut frames,
            closing,
            removed,
            batch,
            sent,
            messages,
        } = self.outbox.take()?;
        for room in removed {
            self.rooms.retain(|r| *r != room);
        }
        if frames.is_empty() {
            return Ok(closing);
        }
        let metrics = &self.state.metrics;
        metrics.outbox_depth.record(messages as u64);
        if sent > 0
            && let Some(started) = frames.pop_front()
        {
            // A writer thread wrote part of it: the rest, as it is, first.
            ws.push_out_started(started, sent);
        }
        if !batch || frames.len() == 1 {
            ws.reserve(frames.len());
            for f in frames {
                ws.push_out(f);
            }
        } else {
            let mut lines = Lines::default();
            let mut in_frame = 0u32;
            // The lines gathered so far leave as one frame.
            let cut = |ws: &mut Socket, lines: &mut Lines, in_frame: &mut u32| {
                if !lines.is_empty() {
                    ws.push_text(std::mem::take(lines).into_text());
                    metrics
                        .batch_size
                        .record(u64::from(std::mem::take(in_frame)));
                }
            };
            for f in frames {
                match f {
                    Out::Text(f) => {
                        if !joins_batch(in_frame as usize, lines.len(), f.len()) {
                            cut(ws, &mut lines, &mut in_frame);
                        }
                        lines.push(&f);
                        in_frame += 1;
                    }
                    // Frames in wire form (queued before the connection asked
                    // to batch): as they are, in their place.
                    wire @ Out::Wire(_) => {
                        cut(ws, &mut lines, &mut in_frame);
                        ws.push_out(wire);
                    }
                }
            }
            cut(ws, &mut lines, &mut in_frame);
        }
        Ok(closing)
    }

    fn slow_consumer(&self) -> Exit {
        self.state.metrics.slow_consumer_closes.increment(1);
        tracing::info!(
            conn = self.id,
            "closing slow consumer: outgoing queue overflowed"
        );
        Exit::announced(
            close::SLOW_CONSUMER,
            "slow consumer: outgoing queue overflowed",
        )
    }

    async fn finish(mut self, exit: Exit, mut ws: Socket) {
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
            Exit::PeerClosed(code) => {
                // Echo the peer's code (RFC 6455 §5.5.1), after what is queued.
                ws.push_close(code, "");
                let _ = tokio::time::timeout(CLOSE_ECHO, ws.flush()).await;
                Metrics::close(close::NORMAL);
            }
            Exit::Close {
                code,
                reason,
                announce,
            } => {
                Metrics::close(code);
                if code == close::SLOW_CONSUMER {
                    // It is not reading: what is queued would only delay the close.
                    ws.discard_queued();
                } else if ws.queued() == 0 {
                    // Deliver what is already queued: the `error` that explains the
                    // close, or stored messages that save a recovery round trip.
                    let _ = self.take_outbox(&mut ws);
                }
                if announce {
                    let reconnect_ms =
                        (code == close::GOING_AWAY).then(|| self.state.suggested_reconnect_ms());
                    ws.push_text(Text::from(protocol::closing_event(&reason, reconnect_ms)));
                    self.state.metrics.out("closing", 1);
                }
                ws.push_close(Some(code), &reason);
                let sent = tokio::time::timeout(CLOSE_FLUSH, ws.flush()).await;
                if matches!(sent, Ok(Ok(()))) {
                    // Wait briefly for the client's close frame, then drop TCP.
                    let _ = tokio::time::timeout(CLOSE_ECHO, async {
                        while let Ok(m) = ws.next().await {
                            if matches!(m, Some(Incoming::Close(_))) {
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
        self.state.unregister_session(self.id);
    }
}

impl Session {
    /// When the timer must next look at the deadline: the token's `token_expiring`
    /// notice while it is still to be sent, else the deadline itself (hello, then
    /// token expiry).
    fn next_deadline(&self) -> Option<Instant> {
        let deadline = self.deadline?;
        if self.conn.is_none() || self.warned {
            return Some(deadline);
        }
        let before = Duration::from_secs(EXP_LEEWAY_SECS) + self.state.config.token_expiring_notice;
        Some(deadline.checked_sub(before).unwrap_or(deadline))
    }

    /// Send `token_expiring` once when the notice time of the token has come.
    fn warn_of_expiry(&mut self, now: Instant) {
        let Some(conn) = &self.conn else { return };
        if self.warned || self.next_deadline().is_none_or(|at| now < at) {
            return;
        }
        if let Some(exp) = conn.token().and_then(|t| t.exp) {
            self.warned = true;
            self.state.metrics.out("token_expiring", 1);
            self.outbox
                .push(protocol::events::token_expiring_event(exp).into());
        }
    }
}

/// The session's one timer, polled only when it has fired, or once after it was
/// armed (that poll registers the task's waker with it). In a big room a session
/// wakes once per message, and polling the timer on each of those wake-ups (the
/// task budget, the waker's registration) was a measurable share of a delivery's
/// cost; a registered timer wakes the task by itself when it fires. Arming goes
/// through [`Timer::arm`] only, so no reset can skip the registering poll.
struct Timer<'a> {
    sleep: Pin<&'a mut tokio::time::Sleep>,
    /// Polled since it was last armed.
    polled: bool,
}

impl<'a> Timer<'a> {
    fn new(sleep: Pin<&'a mut tokio::time::Sleep>) -> Self {
        Timer {
            sleep,
            polled: false,
        }
    }

    fn arm(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.polled = false;
    }

    /// Resolves when the timer fires; a branch of the session's `select!`. The
    /// registering poll is unconstrained by the task's budget: a budget-refused
    /// poll registers nothing, and the timer would then fire unheard.
    fn due(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.polled && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            self.polled = true;
            Pin::new(&mut tokio::task::unconstrained(self.sleep.as_mut())).poll(cx)
        })
    }
}

fn earliest(a: Instant, b: Option<Instant>) -> Instant {
    b.map_or(a, |b| a.min(b))
}

/// How a WebSocket-layer error ends the session: with the RFC 6455 close the layer
/// names, or by dropping a connection that is already gone.
fn classify(e: &WsError) -> Exit {
    match (e.close(), e) {
        (Some((code, reason)), _) => Exit::close(code, reason),
        (None, WsError::Eof) => Exit::Drop("peer gone"),
        (None, _) => Exit::Drop("connection error"),
    }
}
