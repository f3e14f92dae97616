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

use super::outbox::Outbox;
use crate::metrics::Metrics;
use std::sync::Arc;

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

pub struct Writers {
    tx: crossbeam_channel::Sender<Vec<Arc<Outbox>>>,
    metrics: Metrics,
}

impl Writers {
    /// Start `threads` writer threads taking from a queue of `queue` chunks. They
    /// end when the `Writers` is dropped (after the work already queued).
    pub fn start(threads: usize, queue: usize, metrics: Metrics) -> std::io::Result<Writers> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Arc<Outbox>>>(queue);
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
        Ok(Writers { tx, metrics })
    }

    /// Hand a chunk of parked outboxes (each just given a run) to the threads; if
    /// their queue is full, back to the sessions.
    pub fn write(&self, chunk: Vec<Arc<Outbox>>) {
        if let Err(e) = self.tx.try_send(chunk) {
            let chunk = e.into_inner();
            self.metrics.direct_handbacks.increment(chunk.len() as u64);
            for outbox in chunk {
                outbox.hand_back();
            }
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

    fn parked_with_a_run(tcp: &SharedTcp) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(10, 1 << 20));
        assert!(o.park(tcp));
        let texts = ["hi".into()];
        assert_eq!(o.push_run(&mut SharedRun::new(&texts)), Pushed::Direct);
        o
    }

    #[tokio::test]
    async fn a_writer_thread_writes_a_chunk_into_its_sockets() {
        let writers = Writers::start(1, QUEUE, Metrics::new()).expect("threads");
        let (tcp, mut client) = SharedTcp::loopback_pair().await;
        writers.write(vec![parked_with_a_run(&tcp)]);
        let mut frame = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut frame))
            .await
            .expect("written in time")
            .expect("read");
        assert_eq!(&frame, b"\x81\x02hi");
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
        let _writers = Writers::start(1, QUEUE, Metrics::new()).expect("threads");
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
