//! The fan-out's writer threads: a room's deliveries written straight into the
//! parked sockets of its members, with no session woken per delivery.
//!
//! Owns: a few OS threads (one per core) and the bounded queue of work they take
//! from: chunks of outboxes that a fan-out left a run in while their sessions were
//! parked ([`Outbox::park`]). Must not: wait on anything but that queue; write
//! anywhere but through [`Outbox::write_direct`], which decides under the
//! outbox's lock whether the socket is still parked; or hold a room's lock (the
//! fan-out hands the work over after releasing it).
//!
//! Why threads of their own and not tokio tasks: a task that writes a few hundred
//! sockets in one poll keeps its worker from the I/O driver and the timers all
//! that time (a worker looks at the driver every 61 polls), so in one big room the
//! next message waited behind the fan-out of the last (measured, BENCHMARKS.md,
//! "direct writes"). Here the tokio workers stay free to read, and the kernel
//! shares the cores between the two.
//!
//! Policy when the queue is full: the chunk is handed back to its sessions
//! ([`Outbox::hand_back`]: unparked and woken, they write it themselves, as
//! without direct writes). Nothing waits on the queue and nothing is lost.
//!
//! Pacing: a busy room's members that asked for batches are handed over at most
//! once per batch delay ([`Writers::due`]); one more thread holds their
//! chunks until due, in a bounded queue of its own (full: handed over at once).
//! A held member whose queue fills half its bound is handed over at once
//! ([`Outbox::push_run`]), so the delay never makes a slow consumer of a client
//! that keeps up.
//! Why: at 1,000 members in one room, each write into a socket costs the server
//! a system call and the kernel a TCP send and a wake-up of the reader, whatever
//! it carries (about 8 µs here, as much as ~80 deliveries' bytes); holding a busy
//! room's writes 10 ms made each carry more, and the highest passing batched rate
//! went from 5,551 to 7,429 msg/s in one round (BENCHMARKS.md, "the batch
//! delay"); 25 ms (the default) halved the writes again and took 30 % off the
//! server's CPU at 5,000 msg/s (BENCHMARKS.md, "the batch delay's default").

use super::outbox::Outbox;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Outboxes per chunk of work: enough to make taking a chunk cheap, few enough
/// that both threads share a room's fan-out.
pub const CHUNK: usize = 128;
/// The writer threads' nice value: they yield to the tokio workers (reading the
/// next `send`, committing, acking) whenever both want a core. Writing a fan-out
/// is bulk work that can wait a moment; the path that feeds it cannot without
/// holding up every message behind it. At the same priority, the two writers
/// and the two workers shared two cores by time slices and a `send` waited for a
/// writer's slice to end. Measured in one sitting (BENCHMARKS.md, "writer
/// threads"): at 1,000 in one room the highest passing rate went from 0.64x and
/// 0.13x the floor's to 1.56x and 0.8x, and the p99 at 5,000 in one room from
/// 0.93-1.07x the floor's to 0.50-0.77x. (On that machine the load generator
/// shares the cores, and it too runs ahead of the writers.)
pub const NICE: i32 = 5;
/// Chunks waiting at most (with [`CHUNK`], deliveries to about 130,000 members).
pub const QUEUE: usize = 1024;

type Chunk = Vec<Arc<Outbox>>;

pub struct Writers {
    tx: crossbeam_channel::Sender<Chunk>,
    /// Chunks held until they are due, for the pacing thread (None: no batch
    /// delay, every chunk is handed over at once).
    paced: Option<crossbeam_channel::Sender<Due>>,
    delay: Duration,
    metrics: Metrics,
}

/// A chunk of parked outboxes held until `at` ([`Writers::due`]).
struct Due {
    at: Instant,
    chunk: Chunk,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: the earliest is the greatest, the top of a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

/// Hand `chunk` to the writer threads through `tx`, or if their queue is full
/// back to its sessions.
fn hand_over(tx: &crossbeam_channel::Sender<Chunk>, metrics: &Metrics, chunk: Chunk) {
    if let Err(e) = tx.try_send(chunk) {
        let chunk = e.into_inner();
        metrics.direct_handbacks.increment(chunk.len() as u64);
        for outbox in chunk {
            outbox.hand_back();
        }
    }
}

/// The pacing thread: holds chunks until they are due, earliest first, then
/// hands them over. Ends when `due` is closed, after handing over what it holds.
fn pace(
    due: crossbeam_channel::Receiver<Due>,
    tx: crossbeam_channel::Sender<Chunk>,
    metrics: Metrics,
) {
    let mut held = std::collections::BinaryHeap::<Due>::new();
    loop {
        let next = match held.peek() {
            Some(first) => due.recv_deadline(first.at),
            None => due
                .recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(d) => held.push(d),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                while let Some(d) = held.pop() {
                    hand_over(&tx, &metrics, d.chunk);
                }
                return;
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = held.pop() {
                hand_over(&tx, &metrics, d.chunk);
            }
        }
    }
}

impl Writers {
    /// Start `threads` writer threads taking from a queue of `queue` chunks, and
    /// with a `delay`, the thread that paces batching connections. They end when
    /// the `Writers` is dropped (after the work already queued).
    pub fn start(
        threads: usize,
        queue: usize,
        delay: Duration,
        metrics: Metrics,
    ) -> std::io::Result<Writers> {
        let (tx, rx) = crossbeam_channel::bounded::<Chunk>(queue);
        for i in 0..threads {
            let rx = rx.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("hubbub-writer-{i}"))
                .spawn(move || {
                    // Below the rest of the server (on Linux, per thread): see NICE.
                    // Failing to lower it changes nothing but the speed.
                    let _ = rustix::process::setpriority_process(None, NICE);
                    for chunk in rx {
                        let mut frames = 0u64;
                        for outbox in chunk {
                            frames += outbox.write_direct() as u64;
                        }
                        metrics.direct_writes.increment(frames);
                    }
                })?;
        }
        let paced = if delay.is_zero() {
            None
        } else {
            let (paced, due) = crossbeam_channel::bounded::<Due>(queue);
            let (tx, metrics) = (tx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("hubbub-pacer".into())
                .spawn(move || pace(due, tx, metrics))?;
            Some(paced)
        };
        Ok(Writers {
            tx,
            paced,
            delay,
            metrics,
        })
    }

    /// Hand a chunk of parked outboxes (each just given a run) to the threads; if
    /// their queue is full, back to the sessions.
    pub fn write(&self, chunk: Chunk) {
        hand_over(&self.tx, &self.metrics, chunk);
    }

    /// When a room's parked members that batch are due to be handed over, paced
    /// at most once per batch delay; None: at once. `last` is the room's previous
    /// hand-over (or the one it is waiting for), updated. A quiet room's (none
    /// within the delay) goes at once; a busy room's waits for the delay to pass
    /// since the last, and whatever the fan-out queues into these outboxes
    /// meanwhile leaves in the same write: under load, fewer and fuller writes per
    /// member, the same bytes. (Centrifugo's `write_delay` does this for every
    /// connection; here only for those that asked for batches, and without
    /// delaying a quiet room.)
    pub fn due(&self, last: &mut Option<Instant>) -> Option<Instant> {
        let now = Instant::now();
        let at = match *last {
            // A hand-over is still waiting: join it.
            Some(t) if t > now => t,
            Some(t) if now < t + self.delay => t + self.delay,
            _ => now,
        };
        *last = Some(at);
        (self.paced.is_some() && at > now).then_some(at)
    }

    /// [`write`](Self::write) when due ([`due`](Self::due)): at once for None,
    /// or held by the pacing thread until `at` (its queue full: at once).
    pub fn write_at(&self, chunk: Chunk, at: Option<Instant>) {
        match (&self.paced, at) {
            (Some(paced), Some(at)) => {
                if let Err(e) = paced.try_send(Due { at, chunk }) {
                    self.write(e.into_inner().chunk);
                }
            }
            _ => self.write(chunk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox::{Pushed, SharedRun};
    use crate::ws::SharedTcp;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// An outbox parked on `tcp` (of a connection that batches, or not) and
    /// given the run "hi".
    fn parked_with_a_run_of(tcp: &SharedTcp, batch: bool) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(10, 1 << 20));
        o.set_batch(batch);
        assert!(o.park(tcp));
        let texts = ["hi".into()];
        let expected = if batch {
            Pushed::DirectBatch
        } else {
            Pushed::Direct
        };
        assert_eq!(o.push_run(&mut SharedRun::new(&texts)), expected);
        o
    }

    fn parked_with_a_run(tcp: &SharedTcp) -> Arc<Outbox> {
        parked_with_a_run_of(tcp, false)
    }

    fn batching_parked_with_a_run(tcp: &SharedTcp) -> Arc<Outbox> {
        parked_with_a_run_of(tcp, true)
    }

    #[tokio::test]
    async fn a_writer_thread_writes_a_chunk_into_its_sockets() {
        let writers = Writers::start(1, QUEUE, Duration::ZERO, Metrics::new()).expect("threads");
        let (tcp, mut client) = SharedTcp::loopback_pair().await;
        writers.write(vec![parked_with_a_run(&tcp)]);
        read_hi(&mut client).await;
    }

    /// Read the frame of "hi" within 10 s.
    async fn read_hi(client: &mut tokio::net::TcpStream) {
        let mut frame = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut frame))
            .await
            .expect("written in time")
            .expect("read");
        assert_eq!(&frame, b"\x81\x02hi");
    }

    #[tokio::test]
    async fn a_quiet_rooms_batching_members_are_written_at_once() {
        // A delay far beyond the read's timeout: only an immediate write passes.
        let writers =
            Writers::start(1, QUEUE, Duration::from_secs(3600), Metrics::new()).expect("threads");
        let (tcp, mut client) = SharedTcp::loopback_pair().await;
        let mut last = None;
        let at = writers.due(&mut last);
        writers.write_at(vec![batching_parked_with_a_run(&tcp)], at);
        read_hi(&mut client).await;
    }

    #[tokio::test]
    async fn a_busy_rooms_batching_members_are_written_a_delay_after_the_last_write() {
        let delay = Duration::from_millis(300);
        let writers = Writers::start(1, QUEUE, delay, Metrics::new()).expect("threads");
        let (tcp, mut client) = SharedTcp::loopback_pair().await;
        let written = Instant::now();
        let mut last = Some(written);
        let at = writers.due(&mut last);
        writers.write_at(vec![batching_parked_with_a_run(&tcp)], at);
        assert_eq!(last, Some(written + delay), "the room's next hand-over");
        read_hi(&mut client).await;
        assert!(written.elapsed() >= delay, "held until due");
    }

    #[tokio::test]
    async fn a_paced_chunk_beyond_a_full_pacing_queue_is_handed_over_at_once() {
        // Neither queue is taken from: the pacing queue holds one chunk, the
        // writers' queue one.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (paced, _due) = crossbeam_channel::bounded(1);
        let writers = Writers {
            tx,
            paced: Some(paced),
            delay: Duration::from_secs(3600),
            metrics: Metrics::new(),
        };
        let (tcp1, _c1) = SharedTcp::loopback_pair().await;
        let (tcp2, _c2) = SharedTcp::loopback_pair().await;
        let mut last = Some(Instant::now());
        let at = writers.due(&mut last);
        writers.write_at(vec![batching_parked_with_a_run(&tcp1)], at);
        assert!(rx.is_empty(), "the first is held for the delay");
        let at = writers.due(&mut last);
        writers.write_at(vec![batching_parked_with_a_run(&tcp2)], at);
        let chunk = rx
            .try_recv()
            .expect("the second went to the writers at once");
        assert_eq!(chunk.len(), 1);
    }

    #[test]
    fn a_hand_over_while_one_is_waiting_joins_it() {
        let writers =
            Writers::start(1, QUEUE, Duration::from_secs(60), Metrics::new()).expect("threads");
        let waiting = Instant::now() + Duration::from_secs(30);
        let mut last = Some(waiting);
        writers.due(&mut last);
        assert_eq!(last, Some(waiting));
    }

    /// The nice value of this process's thread named `name`, from /proc.
    fn nice_of_thread(name: &str) -> Option<i32> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if comm.trim() == name {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // Fields after the command's closing parenthesis; nice is field 19.
                let rest = &stat[stat.rfind(')')? + 2..];
                return rest.split(' ').nth(16)?.parse().ok();
            }
        }
        None
    }

    #[test]
    fn writer_threads_run_below_the_rest_of_the_server() {
        let _writers = Writers::start(1, QUEUE, Duration::ZERO, Metrics::new()).expect("threads");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match nice_of_thread("hubbub-writer-0") {
                Some(n) if n == NICE => return,
                _ if std::time::Instant::now() > deadline => {
                    panic!(
                        "hubbub-writer-0 at nice {:?}",
                        nice_of_thread("hubbub-writer-0")
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[tokio::test]
    async fn a_chunk_beyond_a_full_queue_goes_back_to_its_sessions() {
        // No thread takes from the queue of one chunk: the second is refused.
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let writers = Writers {
            tx,
            paced: None,
            delay: Duration::ZERO,
            metrics: Metrics::new(),
        };
        let (tcp1, _c1) = SharedTcp::loopback_pair().await;
        let (tcp2, _c2) = SharedTcp::loopback_pair().await;
        let queued = parked_with_a_run(&tcp1);
        let refused = parked_with_a_run(&tcp2);
        writers.write(vec![queued.clone()]);
        writers.write(vec![refused.clone()]);
        assert!(queued.is_parked(), "waits for a writer");
        assert!(!refused.is_parked(), "handed back");
        let taken = refused.take().expect("not overflowed");
        assert_eq!(taken.frames.len(), 1, "its session writes the run");
    }
}
