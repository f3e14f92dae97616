//! One connection's outgoing queue: bounded in frames and in bytes.
//!
//! Owns: the queue, its bounds, the wake-up of the session that drains it, and who
//! writes into the session's socket (the session, or while it is parked a writer
//! thread). Must not: block or wait, ever; the fan-out pushes under a room-wide
//! lock. (The one thing done under this lock besides queueing is a writer
//! thread's non-blocking write, and for a batching connection the copy that joins
//! its frames: a push meets it only when the fan-out of the next message overtakes
//! the writers at that very outbox, and waits one system call and a copy of at
//! most 64 KiB.)
//!
//! Policy when it fills: a push into a queue that already holds `max_frames`
//! frames or `max_bytes` bytes is refused, the queue is marked overflowed and the session is woken to close the connection
//! with 4008 (slow consumer). Nothing ever waits on a full queue, so one slow
//! reader cannot hold up a fan-out to everyone else.
//!
//! Direct writes: a session with nothing of its own to write parks its plain TCP
//! socket here ([`Outbox::park`]). A room's fan-out then queues into a parked outbox
//! without waking the session, and one of the writer threads ([`super::writers`])
//! writes the queue into the socket ([`Outbox::write_direct`]): no task wake-up
//! per delivery. For a connection that batches, the texts queued are joined into
//! frames of up to 64 KiB on the way, in the writer thread's buffer
//! ([`crate::ws::Joiner`]: one contiguous write costs the kernel less than a slice
//! per text, copy included), and that frame is written again, not copied again,
//! to the next connection whose queue starts with the same texts (a room's
//! members that batch are queued the same ones). Whatever the socket does not
//! take (a full socket, an error) is handed back: the outbox unparks and wakes the
//! session, which finishes a frame cut short before anything else. Who writes is
//! decided under this lock, and a direct write happens under it, so the session
//! and a writer never write at once.

use crate::protocol::close;
use crate::ws::{Joiner, Lines, Out, SharedTcp, Text, Wire, joined_text};
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

pub struct Outbox {
    /// std Mutex: held only for a push or a drain, never across an await.
    inner: Mutex<Inner>,
    /// The wake-up of the one task that drains this queue (its session): a flag
    /// and that task's waker. Not a `tokio::sync::Notify`, which keeps a list of
    /// any number of waiters behind a mutex: a lock to wait and another to wake
    /// on every delivery, for a queue that only ever has one waiter.
    signal: Signal,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// Text frames, and runs of frames in wire form ([`Wire`]).
    frames: VecDeque<Out>,
    /// Messages queued (a run in wire form counts each of its frames), for
    /// `max_frames`. u32 like `bytes`, so that the two take one word.
    count: u32,
    /// Bytes queued (a run in wire form with its headers), for `max_bytes`:
    /// saturating, so a queue past 4 GiB still reads as full.
    bytes: u32,
    overflowed: bool,
    /// Frames were queued quietly since the session was last woken: the next
    /// waking push must wake it even though the queue is not empty.
    unwoken: bool,
    /// The connection asked for newline-batched frames: a run of messages is
    /// queued as one frame. (Here, in padding, rather than a field of the
    /// connection: it costs an idle connection nothing.)
    batch: bool,
    /// The server's orders, rare: boxed, so a connection without any pays one word.
    orders: Option<Box<Orders>>,
    /// The session's socket while it is parked: the fan-out's writers may write.
    parked: Option<SharedTcp>,
    /// Bytes of the first queued frame already written (by a direct write that
    /// the socket cut short), for the session to finish first.
    sent: u32,
    /// A writer thread has this outbox in its work: a push need not hand it over
    /// again.
    queued_direct: bool,
}

/// What one write of a parked outbox did. The numbers are the written entries'
/// counts ([`Out::count`]: a run in wire form counts its frames, a text one).
enum Wrote {
    /// Wrote whole entries, everything it tried.
    All(usize),
    /// Wrote whole entries, then part of the next.
    Cut(usize),
    /// Wrote nothing: the socket is full, or failing.
    Nothing,
}

thread_local! {
    /// A writer thread's joined frame ([`Inner::write_joined`]): its buffer
    /// reused, at most one batched frame (64 KiB) and its header, and the frame
    /// itself reused for the next connection queued the same texts.
    static JOINER: std::cell::RefCell<Joiner> = const { std::cell::RefCell::new(Joiner::new()) };
}

/// A queue counter's share of an entry: u32, saturating.
fn clamp(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Default)]
struct Orders {
    /// The server closes this connection (its drain, or the server API).
    closing: Option<CloseOrder>,
    /// Rooms the server took this connection out of (the server API), for the
    /// session to forget.
    removed: Vec<Box<str>>,
}

impl Inner {
    fn add(&mut self, entry: Out) {
        self.count = self.count.saturating_add(clamp(entry.count()));
        self.bytes = self.bytes.saturating_add(clamp(entry.wire_len()));
        self.frames.push_back(entry);
    }

    /// The first entry, of `count` messages and `bytes` bytes (as its writer
    /// measured it), has been written: drop it from the queue and its counters.
    fn pop_written(&mut self, count: usize, bytes: usize) {
        self.frames.pop_front();
        self.count = self.count.saturating_sub(clamp(count));
        self.bytes = self.bytes.saturating_sub(clamp(bytes));
    }

    /// Put `entry` back at the front of the queue, with its counters.
    fn add_front(&mut self, entry: Out) {
        self.count = self.count.saturating_add(clamp(entry.count()));
        self.bytes = self.bytes.saturating_add(clamp(entry.wire_len()));
        self.frames.push_front(entry);
    }

    /// Drop the first `n` entries (written) and their counters.
    fn pop_front_entries(&mut self, n: usize) {
        for _ in 0..n {
            let Some(front) = self.frames.front() else {
                return;
            };
            let (count, len) = (front.count(), front.wire_len());
            self.pop_written(count, len);
        }
    }

    /// One non-blocking vectored write of the queue as it is (the first `sent`
    /// bytes of its first entry already written) into the parked `socket`.
    fn write_queued(&mut self, socket: &SharedTcp) -> Wrote {
        let Ok(n) = socket.try_write_texts(&self.frames, self.sent as usize) else {
            return Wrote::Nothing;
        };
        let mut n = n + self.sent as usize;
        self.sent = 0;
        let mut written = 0;
        while let Some(front) = self.frames.front() {
            let (len, count) = (front.wire_len(), front.count());
            if n < len {
                // Cut short: the rest of this entry first, by the session.
                self.sent = clamp(n);
                return Wrote::Cut(written);
            }
            n -= len;
            self.pop_written(count, len);
            written += count;
        }
        Wrote::All(written)
    }

    /// For a batching connection: the texts at the front of the queue joined into
    /// one frame by the writer thread's `joiner` ([`Joiner`], which reuses the
    /// frame it built for the connection before when this queue starts with the
    /// same texts) and written with one write. None when
    /// fewer than two join (the queue is written as it is). A write cut short
    /// leaves the joined frame as the first entry, for the session to finish.
    fn write_joined(&mut self, socket: &SharedTcp, joiner: &mut Joiner) -> Option<Wrote> {
        let n = joiner.join(&self.frames);
        if n == 0 {
            return None;
        }
        let frame = joiner.frame();
        Some(match socket.try_write_bytes(frame) {
            Ok(w) if w == frame.len() => {
                self.pop_front_entries(n);
                Wrote::All(n)
            }
            Ok(w) => {
                self.pop_front_entries(n);
                self.add_front(Out::Text(joined_text(frame)));
                self.sent = clamp(w);
                Wrote::Cut(0)
            }
            Err(_) => Wrote::Nothing,
        })
    }

    fn orders(&mut self) -> &mut Orders {
        self.orders.get_or_insert_with(Box::default)
    }

    fn closing(&self) -> Option<CloseOrder> {
        self.orders.as_ref().and_then(|o| o.closing.clone())
    }
}

/// The server's order to close a connection: with this close code, after a
/// `closing` event with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOrder {
    pub code: u16,
    pub reason: Arc<str>,
}

/// Why a session must close, found by [`Outbox::alarm`].
#[derive(Debug, PartialEq, Eq)]
pub enum Alarm {
    Overflowed,
    /// The server closes this connection.
    Closing(CloseOrder),
}

/// A [`take`](Outbox::take) from a queue that has overflowed: the session closes
/// as a slow consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflowed;

/// What a [`take`](Outbox::take) found: the queued frames, and whether the server's
/// drain has reached this connection (write them, then close), in one look.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    pub frames: VecDeque<Out>,
    pub closing: Option<CloseOrder>,
    /// Rooms the server took the connection out of since the last take.
    pub removed: Vec<Box<str>>,
    /// The connection batches: join the frames with newlines.
    pub batch: bool,
    /// Bytes of the first frame already written (a direct write cut short): it
    /// must be finished, as it is, before anything else.
    pub sent: usize,
    /// Messages in `frames` (a run in wire form counts each of its frames).
    pub messages: usize,
}

/// What a [`push_run`](Outbox::push_run) did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; the session was woken if it had to be.
    Queued,
    /// Queued into a parked outbox: hand it to a writer thread
    /// ([`Outbox::write_direct`]) or back to its session ([`Outbox::hand_back`]).
    Direct,
    /// As [`Pushed::Direct`], for a connection that batches: it may be handed
    /// over a moment later ([`super::writers::Writers::due`]), so that
    /// the runs of that moment leave in one write.
    DirectBatch,
    /// The queue has overflowed (now or before): nothing was queued.
    Refused,
}

/// A run of messages on its way to a room's receivers ([`Outbox::push_run`]),
/// with the two forms receivers take it in, each built once, by the first
/// receiver that needs it, and shared by the rest.
pub struct SharedRun<'a> {
    texts: &'a [Text],
    /// Newline-joined, for receivers that batch (None: too large for one frame).
    joined: Option<Option<Text>>,
    /// In wire form, for the others.
    wire: Option<Wire>,
}

impl<'a> SharedRun<'a> {
    pub fn new(texts: &'a [Text]) -> Self {
        SharedRun {
            texts,
            joined: None,
            wire: None,
        }
    }
}

impl Outbox {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbox {
            inner: Mutex::new(Inner::default()),
            signal: Signal::default(),
            max_frames,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves Inner consistent, so poison is harmless.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a frame and wake the session. Returns false when the queue has
    /// overflowed (now or before).
    pub fn push(&self, frame: Text) -> bool {
        self.push_inner(frame, true)
    }

    /// Queue a frame without waking the session: it leaves with the next frame
    /// that does, or at the next [`Outbox::wake`]. For events that may wait a
    /// moment (presence), so that a burst of them shares one write. An overflow
    /// still wakes the session at once.
    pub fn push_quiet(&self, frame: Text) -> bool {
        self.push_inner(frame, false)
    }

    /// Wake the session if frames are waiting (after [`Outbox::push_quiet`]).
    pub fn wake(&self) {
        let mut g = self.lock();
        g.unwoken = false;
        if !g.frames.is_empty() {
            drop(g);
            self.signal.raise();
        }
    }

    /// May more be queued? Full when the frames, or the bytes *already* queued,
    /// reach their bounds: checking the bytes before adding lets one large reply
    /// (a `joined` with 1,000 recovered messages can be megabytes) into a queue
    /// that is keeping up, while the queue stays bounded by max_bytes + one push.
    /// A full queue is marked overflowed, emptied, and its session woken to close.
    fn admits(&self, g: &mut Inner) -> bool {
        if g.overflowed {
            return false;
        }
        if g.count as usize >= self.max_frames || g.bytes as usize >= self.max_bytes {
            g.overflowed = true;
            g.frames.clear();
            g.count = 0;
            g.bytes = 0;
            self.signal.raise();
            return false;
        }
        true
    }

    /// Half the queue's bound taken, in messages or in bytes.
    fn half_full(&self, g: &Inner) -> bool {
        g.count as usize >= self.max_frames.div_ceil(2)
            || g.bytes as usize >= self.max_bytes.div_ceil(2)
    }

    /// The connection asked for newline-batched frames (at `hello`).
    pub fn set_batch(&self, on: bool) {
        self.lock().batch = on;
    }

    /// Queue a run of messages committed together with one lock and at most one
    /// wake-up, as one entry built once for every receiver by the first that needs
    /// it ([`SharedRun`]): the run's frames in wire form, or if the connection
    /// batches one newline-joined frame (a run too large for one frame goes text
    /// by text, for the session to join as many as fit). The bounds are checked
    /// once, before the run: the queue stays bounded by its limits plus one run.
    pub fn push_run(&self, run: &mut SharedRun<'_>) -> Pushed {
        let mut g = self.lock();
        if !self.admits(&mut g) {
            return Pushed::Refused;
        }
        let must_wake = g.frames.is_empty() || g.unwoken;
        let was_half_full = g.batch && self.half_full(&g);
        if !g.batch {
            let wire = run.wire.get_or_insert_with(|| Wire::frames(run.texts));
            g.add(Out::Wire(wire.clone()));
        } else if let [one] = run.texts {
            // Texts, not wire form: the session joins what it takes into lines.
            g.add(Out::Text(one.clone()));
        } else if let Some(joined) = run.joined.get_or_insert_with(|| Lines::joined(run.texts)) {
            g.add(Out::Text(joined.clone()));
        } else {
            for t in run.texts {
                g.add(Out::Text(t.clone()));
            }
        }
        if g.parked.is_some() {
            // Quiet frames queued before this leave with it.
            g.unwoken = false;
            if g.queued_direct {
                // A batching member's hand-over may be held for its room's pace
                // (Writers::due); the push that fills half its queue hands it
                // over at once, so a client that keeps up is never closed as a
                // slow consumer because of the delay, whatever the room's rate.
                if g.batch && !was_half_full && self.half_full(&g) {
                    return Pushed::Direct;
                }
                return Pushed::Queued; // the writer that has it writes these too
            }
            g.queued_direct = true;
            return if g.batch {
                Pushed::DirectBatch
            } else {
                Pushed::Direct
            };
        }
        g.unwoken = false;
        drop(g);
        if must_wake {
            self.signal.raise();
        }
        Pushed::Queued
    }

    /// Park the session's socket: until [`unpark`](Self::unpark), pushes of runs
    /// are written into it by the fan-out's writers. Refused (false) when frames
    /// are waiting (the session takes them first) or the queue has overflowed.
    pub fn park(&self, socket: &SharedTcp) -> bool {
        let mut g = self.lock();
        if !g.frames.is_empty() || g.overflowed || g.sent != 0 {
            return false;
        }
        g.parked = Some(socket.clone());
        true
    }

    /// Take the socket back: once this returns, no writer thread writes into it
    /// (a direct write in progress holds this lock). What was queued and not yet
    /// written stays queued for [`take`](Self::take).
    pub fn unpark(&self) {
        let mut g = self.lock();
        g.parked = None;
    }

    /// Is the session's socket parked here?
    #[cfg(test)]
    pub fn is_parked(&self) -> bool {
        self.lock().parked.is_some()
    }

    /// A writer thread's work for this outbox: write what is queued into the
    /// parked socket. Whatever the socket does not take now (full, or an error),
    /// or a socket no longer parked, goes back to the session ([`hand_back`]).
    /// Returns the frames written.
    ///
    /// [`hand_back`]: Self::hand_back
    pub fn write_direct(&self) -> usize {
        let mut g = self.lock();
        g.queued_direct = false;
        let mut written = 0;
        loop {
            // Moved out while it writes, so that the queue can be changed beside
            // it; the lock is held throughout, so no one sees it gone.
            let Some(socket) = g.parked.take() else {
                // The session took its socket back and takes the frames itself.
                return written;
            };
            if g.frames.is_empty() {
                g.parked = Some(socket);
                return written;
            }
            let joined = if g.batch && g.sent == 0 {
                JOINER.with_borrow_mut(|joiner| g.write_joined(&socket, joiner))
            } else {
                None
            };
            let wrote = joined.unwrap_or_else(|| g.write_queued(&socket));
            g.parked = Some(socket);
            match wrote {
                Wrote::All(k) => written += k,
                // Cut short (the session finishes the first entry) or not
                // written (full, or failing: the session waits for the socket,
                // or meets the error and closes).
                Wrote::Cut(k) => {
                    written += k;
                    break;
                }
                Wrote::Nothing => break,
            }
        }
        g.parked = None;
        drop(g);
        self.signal.raise();
        written
    }

    /// Give a parked outbox's queue back to its session (no writer thread could
    /// take it): unpark and wake the session, which writes it.
    pub fn hand_back(&self) {
        let mut g = self.lock();
        g.queued_direct = false;
        g.parked = None;
        drop(g);
        self.signal.raise();
    }

    fn push_inner(&self, frame: Text, wake: bool) -> bool {
        let mut g = self.lock();
        if !self.admits(&mut g) {
            return false;
        }
        // A waking push into a non-empty queue need not wake the session again:
        // the push that made it non-empty did, unless that one (or a later one)
        // was quiet.
        let must_wake = wake && (g.frames.is_empty() || g.unwoken);
        g.unwoken = !wake && (g.frames.is_empty() || g.unwoken);
        g.add(Out::Text(frame));
        drop(g);
        if must_wake {
            self.signal.raise();
        }
        true
    }

    /// Take every queued frame (the queue's allocation goes with them, so an idle
    /// connection's outbox holds none), and whether the server is closing it: one
    /// lock per wake-up of a session that keeps up. Unparks the socket.
    pub fn take(&self) -> Result<Taken, Overflowed> {
        let mut g = self.lock();
        if g.overflowed {
            return Err(Overflowed);
        }
        g.bytes = 0;
        let messages = std::mem::take(&mut g.count) as usize;
        g.unwoken = false;
        // The session writes what it takes: its socket is its own again.
        g.parked = None;
        let sent = std::mem::take(&mut g.sent) as usize;
        Ok(Taken {
            frames: std::mem::take(&mut g.frames),
            closing: g.closing(),
            removed: g
                .orders
                .as_mut()
                .map(|o| std::mem::take(&mut o.removed))
                .unwrap_or_default(),
            batch: g.batch,
            sent,
            messages,
        })
    }

    /// What besides frames a wake-up may bring, for a session whose socket is still
    /// busy (it takes no frames until the socket has written what it has): an
    /// overflow (close as a slow consumer) wins over the server's close.
    pub fn alarm(&self) -> Option<Alarm> {
        let g = self.lock();
        if g.overflowed {
            Some(Alarm::Overflowed)
        } else {
            g.closing().map(Alarm::Closing)
        }
    }

    /// Tell the session it is no longer in `room` (after `frame`, its `left`, which
    /// is queued like any frame). False if the queue has overflowed.
    pub fn removed_from(&self, room: &str, frame: Text) -> bool {
        let mut g = self.lock();
        g.orders().removed.push(room.into());
        drop(g);
        self.push(frame)
    }

    /// Ask the session to close (the server is shutting down). Wakes it like a push.
    pub fn close(&self) {
        self.close_with(close::GOING_AWAY, "server shutting down");
    }

    /// Ask the session to close with `code`, telling the client `reason` in a
    /// `closing` event first. The first order stands.
    pub fn close_with(&self, code: u16, reason: &str) {
        let mut g = self.lock();
        let orders = g.orders();
        if orders.closing.is_none() {
            orders.closing = Some(CloseOrder {
                code,
                reason: Arc::from(reason),
            });
        }
        drop(g);
        self.signal.raise();
    }

    /// Resolves after a push into an empty queue, an overflow or a `close`. A wake-up hint only:
    /// the session drains the queue whenever it is idle anyway. A wake-up given while
    /// nobody waits is kept (one) for the next wait. One waiter at a time: the task
    /// that drains the queue.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| self.signal.poll(cx))
    }
}

/// A wake-up for one waiting task, kept when nobody waits (futures' `AtomicWaker`
/// with a flag: lock-free on both sides).
#[derive(Default)]
struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Taken before registering too: a raised flag needs no waker.
        if self.raised.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Looked at again after registering, or a raise between the first look
        // and the registration would be lost.
        if self.raised.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push `texts` as one run, as a room's fan-out does.
    fn run(o: &Outbox, texts: &[&'static str]) -> Pushed {
        let texts: Vec<Text> = texts.iter().map(|&t| Text::from(t)).collect();
        o.push_run(&mut SharedRun::new(&texts))
    }

    /// The payloads of the text frames taken, in order, each entry read back.
    fn payloads(frames: &VecDeque<Out>) -> Vec<String> {
        frames.iter().flat_map(Out::payloads).collect()
    }

    #[test]
    fn overflow_in_frames_refuses_and_marks() {
        let o = Outbox::new(2, 1 << 20);
        assert!(o.push("a".into()));
        assert!(o.push("b".into()));
        assert!(!o.push("c".into()));
        assert_eq!(o.alarm(), Some(Alarm::Overflowed));
        assert_eq!(o.take(), Err(Overflowed));
    }

    #[test]
    fn a_take_after_close_brings_the_frames_and_the_close() {
        let o = Outbox::new(10, 100);
        assert!(o.push("a".into()));
        o.close();
        let taken = o.take().expect("not overflowed");
        assert_eq!(taken.frames, VecDeque::from([Out::Text(Text::from("a"))]));
        assert!(taken.closing.is_some(), "the close is seen with the frames");
    }

    #[test]
    fn overflow_in_bytes_refuses_and_marks() {
        let o = Outbox::new(100, 10);
        assert!(o.push("123456".into()));
        assert!(
            o.push("123456".into()),
            "8 bytes queued (6 and a 2-byte header) is under the cap"
        );
        assert!(!o.push("1".into()), "16 bytes queued is over the cap");
        assert_eq!(o.alarm(), Some(Alarm::Overflowed));
    }

    #[test]
    fn a_run_pushed_at_once_keeps_its_order_behind_what_was_queued() {
        let o = Outbox::new(10, 100);
        assert!(o.push("a".into()));
        assert_eq!(Pushed::Queued, run(&o, &["b", "c"]));
        let taken = o.take().expect("not overflowed");
        assert_eq!(payloads(&taken.frames), ["a", "b", "c"]);
    }

    #[test]
    fn a_run_counts_each_of_its_messages_against_the_bound() {
        let o = Outbox::new(3, 1 << 20);
        assert_eq!(Pushed::Queued, run(&o, &["a", "b", "c"]));
        assert!(
            !o.push("d".into()),
            "three messages queued fill a queue of 3"
        );
        assert_eq!(o.alarm(), Some(Alarm::Overflowed));
    }

    #[test]
    fn a_plain_connection_gets_a_run_as_one_entry_in_wire_form_shared_with_the_next() {
        let (a, b) = (Outbox::new(10, 100), Outbox::new(10, 100));
        let texts: [Text; 2] = ["x".into(), "y".into()];
        let mut shared = SharedRun::new(&texts);
        assert_eq!(Pushed::Queued, a.push_run(&mut shared));
        let Some(built) = shared.wire.clone() else {
            panic!("the wire form is built by the first receiver")
        };
        assert_eq!(Pushed::Queued, b.push_run(&mut shared));
        for o in [&a, &b] {
            let frames = o.take().expect("not overflowed").frames;
            assert_eq!(frames, VecDeque::from([Out::Wire(built.clone())]));
            assert_eq!(payloads(&frames), ["x", "y"]);
        }
    }

    #[test]
    fn a_run_into_a_full_queue_is_refused_and_marks() {
        let o = Outbox::new(2, 1 << 20);
        assert_eq!(
            Pushed::Queued,
            run(&o, &["a", "b"]),
            "an empty queue takes a run"
        );
        assert_eq!(Pushed::Refused, run(&o, &["c"]));
        assert_eq!(o.alarm(), Some(Alarm::Overflowed));
        assert!(!o.push("d".into()), "and stays overflowed");
    }

    #[test]
    fn a_batching_connection_gets_a_run_as_one_frame_shared_with_the_next() {
        let (a, b, plain) = (
            Outbox::new(10, 100),
            Outbox::new(10, 100),
            Outbox::new(10, 100),
        );
        a.set_batch(true);
        b.set_batch(true);
        let texts: [Text; 2] = ["x".into(), "y".into()];
        let mut shared = SharedRun::new(&texts);
        assert_eq!(Pushed::Queued, a.push_run(&mut shared));
        assert_eq!(
            shared.joined,
            Some(Some(Text::from("x\ny"))),
            "built once, by the first"
        );
        assert_eq!(Pushed::Queued, b.push_run(&mut shared));
        assert_eq!(Pushed::Queued, plain.push_run(&mut shared));
        for o in [&a, &b] {
            let frames = o.take().expect("not overflowed").frames;
            assert_eq!(frames, VecDeque::from([Out::Text(Text::from("x\ny"))]));
        }
        let frames = plain.take().expect("not overflowed").frames;
        assert!(matches!(frames.front(), Some(Out::Wire(_))), "in wire form");
        assert_eq!(payloads(&frames), ["x", "y"], "frame by frame");
    }

    #[test]
    fn a_batching_connection_gets_a_run_of_one_as_text_for_its_session_to_join() {
        let o = Outbox::new(10, 1 << 20);
        o.set_batch(true);
        assert_eq!(Pushed::Queued, run(&o, &["a"]));
        assert_eq!(Pushed::Queued, run(&o, &["b"]));
        let frames = o.take().expect("not overflowed").frames;
        assert_eq!(
            frames,
            VecDeque::from([Out::Text("a".into()), Out::Text("b".into())])
        );
    }

    #[test]
    fn a_batching_connection_gets_a_run_too_large_for_one_frame_text_by_text() {
        let o = Outbox::new(10, 1 << 20);
        o.set_batch(true);
        let texts: Vec<Text> = (0..2)
            .map(|_| Text::from("x".repeat(crate::ws::MAX_BATCH_FRAME / 2 + 1)))
            .collect();
        let mut shared = SharedRun::new(&texts);
        assert_eq!(Pushed::Queued, o.push_run(&mut shared));
        assert_eq!(shared.joined, Some(None), "too large to join");
        let frames = o.take().expect("not overflowed").frames;
        assert_eq!(
            frames,
            texts.into_iter().map(Out::Text).collect::<VecDeque<_>>()
        );
    }

    #[tokio::test]
    async fn a_run_wakes_the_session_once() {
        let o = Outbox::new(10, 100);
        assert_eq!(Pushed::Queued, run(&o, &["a", "b"]));
        tokio::time::timeout(std::time::Duration::from_secs(1), o.notified())
            .await
            .expect("woken");
        let taken = o.take().expect("not overflowed");
        assert_eq!(payloads(&taken.frames), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_given_while_nobody_waits_is_kept_once() {
        let o = Outbox::new(10, 100);
        assert!(o.push("a".into()));
        assert!(o.push("b".into()));
        o.close();
        tokio::time::timeout(std::time::Duration::from_secs(1), o.notified())
            .await
            .expect("the kept wake-up resolves the first wait");
        let again = tokio::time::timeout(std::time::Duration::from_secs(1), o.notified()).await;
        assert!(again.is_err(), "three wake-ups while away are kept as one");
    }

    #[test]
    fn one_frame_larger_than_the_byte_cap_fits_a_queue_under_the_cap() {
        let o = Outbox::new(100, 10);
        assert!(o.push("abc".into()));
        assert!(o.push("x".repeat(1000).into()));
        assert_eq!(o.alarm(), None);
    }

    #[tokio::test]
    async fn close_wakes_the_session_and_is_seen() {
        let o = Outbox::new(10, 100);
        o.close();
        tokio::time::timeout(std::time::Duration::from_secs(1), o.notified())
            .await
            .expect("close wakes a waiting session");
        assert!(
            matches!(
                o.alarm(),
                Some(Alarm::Closing(CloseOrder {
                    code: close::GOING_AWAY,
                    ..
                }))
            ),
            "the drain closes with 1001"
        );
    }

    #[test]
    fn drain_empties_and_keeps_order() {
        let o = Outbox::new(10, 100);
        o.push("a".into());
        o.push("b".into());
        assert_eq!(
            o.take(),
            Ok(Taken {
                frames: VecDeque::from([Out::Text("a".into()), Out::Text("b".into())]),
                closing: None,
                removed: Vec::new(),
                batch: false,
                sent: 0,
                messages: 2,
            })
        );
        assert!(o.push("c".into()), "drained queue accepts again");
    }

    #[tokio::test]
    async fn a_waking_push_after_a_quiet_one_wakes_the_session() {
        let o = Outbox::new(10, 1 << 20);
        assert!(o.push_quiet(Text::from("member".to_owned())));
        assert!(o.push(Text::from("message".to_owned())));
        tokio::time::timeout(std::time::Duration::from_secs(1), o.notified())
            .await
            .expect("the message does not wait for the presence tick");
    }

    #[tokio::test]
    async fn a_quiet_push_waits_for_a_wake_and_keeps_its_place_in_line() {
        let o = Outbox::new(10, 1 << 20);
        assert!(o.push_quiet(Text::from("a".to_owned())));
        let woken = tokio::time::timeout(std::time::Duration::from_millis(20), o.notified()).await;
        assert!(woken.is_err(), "a quiet push does not wake the session");
        o.wake();
        tokio::time::timeout(std::time::Duration::from_secs(1), o.notified())
            .await
            .expect("wake() wakes it");
        assert!(o.push(Text::from("b".to_owned())));
        let taken = o.take().expect("not overflowed");
        assert_eq!(payloads(&taken.frames), ["a", "b"]);
    }

    /// Direct writes, over real loopback TCP.
    mod direct {
        use super::*;
        use crate::ws::WsStream;
        use std::pin::pin;
        use std::task::Waker;
        use tokio::io::AsyncReadExt;
        use tokio::net::TcpStream;

        /// The payloads of the next `n` server frames, each checked to be a final
        /// unmasked text frame.
        async fn read_texts(c: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for _ in 0..n {
                let mut h = [0u8; 2];
                c.read_exact(&mut h).await.expect("header");
                assert_eq!(h[0], 0x81, "a final text frame");
                assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
                let len = match h[1] {
                    126 => {
                        let mut l = [0u8; 2];
                        c.read_exact(&mut l).await.expect("length");
                        usize::from(u16::from_be_bytes(l))
                    }
                    127 => {
                        let mut l = [0u8; 8];
                        c.read_exact(&mut l).await.expect("length");
                        usize::try_from(u64::from_be_bytes(l)).expect("fits")
                    }
                    n => usize::from(n),
                };
                let mut payload = vec![0u8; len];
                c.read_exact(&mut payload).await.expect("payload");
                out.push(payload);
            }
            out
        }

        /// An outbox of a connection that batches, with these bounds, parked on a
        /// loopback socket, and the socket's other end.
        async fn parked_batching(max_frames: usize, max_bytes: usize) -> (Outbox, TcpStream) {
            let (tcp, client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(max_frames, max_bytes);
            o.set_batch(true);
            assert!(o.park(&tcp));
            (o, client)
        }

        /// The session's side of a write cut short: the socket's stream with the
        /// cut entry first (its first `sent` bytes already written), then the rest.
        fn as_the_session(tcp: &SharedTcp, taken: Taken) -> WsStream<SharedTcp> {
            let mut ws = WsStream::new(tcp.clone(), 1 << 20);
            let mut rest = taken.frames;
            let first = rest.pop_front().expect("the cut entry");
            ws.push_out_started(first, taken.sent);
            for f in rest {
                ws.push_out(f);
            }
            ws
        }

        /// Was the session woken (the wake-up is consumed)?
        fn woken(o: &Outbox) -> bool {
            let mut f = pin!(o.notified());
            f.as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready()
        }

        #[tokio::test]
        async fn a_run_into_a_parked_outbox_is_written_by_a_writer_without_waking_the_session() {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.park(&tcp));
            assert_eq!(run(&o, &["hello"]), Pushed::Direct);
            assert!(!woken(&o), "the session sleeps on");
            assert_eq!(o.write_direct(), 1);
            assert_eq!(read_texts(&mut client, 1).await, vec![b"hello".to_vec()]);
            assert!(o.is_parked(), "still parked for the next run");
            assert!(!woken(&o));
        }

        #[tokio::test]
        async fn a_run_into_a_parked_batching_outbox_is_handed_over_as_batching() {
            let (o, mut client) = parked_batching(10, 1 << 20).await;
            assert_eq!(run(&o, &["a", "b"]), Pushed::DirectBatch);
            assert_eq!(run(&o, &["c"]), Pushed::Queued, "rides with the first");
            assert!(!woken(&o), "the session sleeps on");
            assert_eq!(o.write_direct(), 2, "two entries");
            assert_eq!(
                read_texts(&mut client, 1).await,
                vec![b"a\nb\nc".to_vec()],
                "both runs in one write, joined into one frame"
            );
        }

        #[tokio::test]
        async fn a_held_batching_outbox_is_handed_over_at_once_when_half_its_frames_are_queued() {
            let (o, mut client) = parked_batching(10, 1 << 20).await;
            assert_eq!(
                run(&o, &["a", "b"]),
                Pushed::DirectBatch,
                "1 of 10 frames: a run is joined into one"
            );
            for (t, n) in [("c", 2), ("d", 3), ("e", 4)] {
                assert_eq!(run(&o, &[t]), Pushed::Queued, "{n} of 10");
            }
            assert_eq!(run(&o, &["f"]), Pushed::Direct, "5 of 10: at once");
            assert_eq!(run(&o, &["g"]), Pushed::Queued, "handed over already");
            assert_eq!(o.write_direct(), 6, "every entry queued");
            assert_eq!(
                read_texts(&mut client, 1).await,
                vec![b"a\nb\nc\nd\ne\nf\ng".to_vec()],
                "joined into one frame"
            );
            assert_eq!(
                run(&o, &["g"]),
                Pushed::DirectBatch,
                "written: the next run may be held again"
            );
        }

        #[tokio::test]
        async fn a_direct_write_to_a_batching_connection_joins_what_is_queued_into_one_frame() {
            let (o, mut client) = parked_batching(100, 1 << 20).await;
            for t in ["one", "two", "three"] {
                run(&o, &[t]);
            }
            assert_eq!(o.write_direct(), 3, "three messages written");
            assert_eq!(
                read_texts(&mut client, 1).await,
                vec![b"one\ntwo\nthree".to_vec()]
            );
            assert!(o.is_parked(), "still parked for the next run");
        }

        /// Two members of a room that batch, queued the same shared runs, and a
        /// third queued one more: each reads its whole queue as one frame (the
        /// writer thread's joined frame is reused only for the same texts).
        #[tokio::test]
        async fn members_queued_the_same_runs_each_read_them_all_in_one_frame() {
            let (a, mut client_a) = parked_batching(100, 1 << 20).await;
            let (b, mut client_b) = parked_batching(100, 1 << 20).await;
            let (c, mut client_c) = parked_batching(100, 1 << 20).await;
            for t in ["one", "two", "three"] {
                let texts = [Text::from(t)];
                let mut shared = SharedRun::new(&texts);
                for o in [&a, &b, &c] {
                    o.push_run(&mut shared);
                }
            }
            run(&c, &["four"]);
            for o in [&a, &b] {
                assert_eq!(o.write_direct(), 3);
            }
            assert_eq!(c.write_direct(), 4);
            for client in [&mut client_a, &mut client_b] {
                assert_eq!(
                    read_texts(client, 1).await,
                    vec![b"one\ntwo\nthree".to_vec()]
                );
            }
            assert_eq!(
                read_texts(&mut client_c, 1).await,
                vec![b"one\ntwo\nthree\nfour".to_vec()]
            );
        }

        #[tokio::test]
        async fn a_plain_connections_queue_is_never_joined() {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(100, 1 << 20);
            assert!(o.park(&tcp));
            for t in ["one", "two"] {
                run(&o, &[t]);
            }
            assert_eq!(o.write_direct(), 2);
            assert_eq!(
                read_texts(&mut client, 2).await,
                vec![b"one".to_vec(), b"two".to_vec()]
            );
        }

        #[tokio::test]
        async fn texts_that_would_make_a_joined_frame_over_64_kib_go_in_the_next() {
            let (o, mut client) = parked_batching(100, 1 << 22).await;
            let big = "x".repeat(40_000);
            for t in [big.clone(), "a".into(), big.clone(), "b".into()] {
                o.push_run(&mut SharedRun::new(&[Text::from(t)]));
            }
            assert_eq!(o.write_direct(), 4);
            let got = read_texts(&mut client, 2).await;
            assert_eq!(got[0], format!("{big}\na").into_bytes());
            assert_eq!(got[1], format!("{big}\nb").into_bytes());
            assert!(got.iter().all(|f| f.len() <= crate::ws::MAX_BATCH_FRAME));
        }

        #[tokio::test]
        async fn a_joined_frame_the_socket_cuts_short_is_finished_by_the_session_byte_for_byte() {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(100_000, 1 << 30);
            o.set_batch(true);
            assert!(o.park(&tcp));
            // Far more than a loopback socket's buffers take before the client
            // reads: 12,000 texts of ~1 KB (12 MB), each its own run, joined ~60
            // per frame.
            let texts: Vec<String> = (0..12_000u32)
                .map(|i| format!("{i:05}{}", "y".repeat(1_000)))
                .collect();
            for t in &texts {
                o.push_run(&mut SharedRun::new(&[Text::from(t.clone())]));
            }
            let written = o.write_direct();
            assert!(written < texts.len(), "the socket filled up");
            assert!(!o.is_parked(), "handed back");
            let taken = o.take().expect("not overflowed");
            assert!(taken.sent > 0, "a joined frame was cut short");
            let mut ws = as_the_session(&tcp, taken);
            let reader = tokio::spawn(async move {
                let mut lines = Vec::new();
                while lines.len() < 12_000 {
                    for frame in read_texts(&mut client, 1).await {
                        let text = String::from_utf8(frame).expect("utf-8");
                        lines.extend(text.split('\n').map(str::to_owned));
                    }
                }
                lines
            });
            ws.flush().await.expect("flushed");
            assert_eq!(
                reader.await.expect("reader"),
                texts,
                "every text once, in order"
            );
        }

        #[tokio::test]
        async fn a_held_batching_outbox_is_handed_over_at_once_when_half_its_bytes_are_queued() {
            let (o, _client) = parked_batching(100, 64).await;
            assert_eq!(run(&o, &["twenty bytes of text"]), Pushed::DirectBatch);
            assert_eq!(
                run(&o, &["twenty bytes of text"]),
                Pushed::Direct,
                "44 of 64 bytes with the frame headers: at once"
            );
        }

        #[tokio::test]
        async fn a_second_run_before_the_writer_comes_is_written_with_the_first() {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.park(&tcp));
            assert_eq!(run(&o, &["a"]), Pushed::Direct);
            assert_eq!(
                run(&o, &["b"]),
                Pushed::Queued,
                "not handed to a writer twice"
            );
            assert_eq!(o.write_direct(), 2);
            assert_eq!(
                read_texts(&mut client, 2).await,
                vec![b"a".to_vec(), b"b".to_vec()]
            );
            assert_eq!(
                run(&o, &["c"]),
                Pushed::Direct,
                "the writer is done with it: the next run is handed over again"
            );
        }

        #[tokio::test]
        async fn a_socket_taken_back_is_not_written_and_its_frames_go_to_the_session() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.park(&tcp));
            assert_eq!(run(&o, &["a"]), Pushed::Direct);
            o.unpark();
            assert_eq!(o.write_direct(), 0, "the writer leaves it alone");
            let taken = o.take().expect("not overflowed");
            assert_eq!(payloads(&taken.frames), ["a"]);
            assert_eq!(taken.sent, 0);
        }

        #[tokio::test]
        async fn a_take_unparks() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.park(&tcp));
            let _ = o.take().expect("not overflowed");
            assert!(!o.is_parked());
            assert_eq!(run(&o, &["a"]), Pushed::Queued);
            assert!(woken(&o), "an unparked session is woken as before");
        }

        #[tokio::test]
        async fn parking_is_refused_while_frames_wait() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.push("waiting".into()));
            assert!(!o.park(&tcp));
            assert!(!o.is_parked());
        }

        #[tokio::test]
        async fn parking_is_refused_after_an_overflow() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(1, 1 << 20);
            assert!(o.push("a".into()));
            assert!(!o.push("b".into()));
            assert!(!o.park(&tcp));
        }

        #[tokio::test]
        async fn an_overflow_while_parked_wakes_the_session_to_close() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(2, 1 << 20);
            assert!(o.park(&tcp));
            assert_eq!(run(&o, &["a"]), Pushed::Direct);
            assert_eq!(run(&o, &["b"]), Pushed::Queued);
            assert_eq!(run(&o, &["c"]), Pushed::Refused);
            assert!(woken(&o));
            assert_eq!(o.write_direct(), 0, "nothing left to write");
            assert_eq!(o.take(), Err(Overflowed));
        }

        #[tokio::test]
        async fn a_hand_back_unparks_and_wakes_the_session() {
            let (tcp, _client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(10, 1 << 20);
            assert!(o.park(&tcp));
            assert_eq!(run(&o, &["a"]), Pushed::Direct);
            o.hand_back();
            assert!(!o.is_parked());
            assert!(woken(&o));
            let taken = o.take().expect("not overflowed");
            assert_eq!(payloads(&taken.frames), ["a"]);
        }

        #[tokio::test]
        async fn a_frame_the_socket_cuts_short_is_finished_by_the_session_byte_for_byte() {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let o = Outbox::new(1000, 1 << 30);
            assert!(o.park(&tcp));
            // Far more than a loopback socket's buffers take before the client reads.
            let frames: Vec<Text> = (0..200u8)
                .map(|i| {
                    Text::from(
                        String::from(char::from(b'a' + i % 26)).repeat(65_000 + usize::from(i)),
                    )
                })
                .collect();
            // Ten runs of twenty.
            for run in frames.chunks(20) {
                o.push_run(&mut SharedRun::new(run));
            }
            let written = o.write_direct();
            assert!(written < frames.len(), "the socket filled up");
            assert_eq!(written % 20, 0, "only whole runs count as written");
            assert!(!o.is_parked(), "handed back");
            assert!(woken(&o));
            let taken = o.take().expect("not overflowed");
            assert!(taken.sent > 0, "a run was cut short (sent {})", taken.sent);
            assert_eq!(taken.frames.len(), (frames.len() - written) / 20);
            let mut ws = as_the_session(&tcp, taken);
            let reader = tokio::spawn(async move { read_texts(&mut client, 200).await });
            ws.flush().await.expect("flushed");
            let got = reader.await.expect("reader");
            assert_eq!(got.len(), frames.len());
            for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
                assert!(g[..] == *f.as_bytes(), "frame {i} arrived intact");
            }
        }
    }
}
