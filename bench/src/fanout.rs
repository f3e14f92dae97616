//! `fanout`: N connections over R rooms, S of them sending at a fixed total rate
//! (open loop), measured over a window after a warm-up.
//!
//! Every expected delivery is counted: a message sent in the window is expected once
//! by every member of its room (the sender included). Lost = expected - received;
//! duplicates and out-of-order arrivals are counted separately, per receiver and
//! sender. Latency runs from the message's *scheduled* send time, so a stalled
//! sender cannot hide a stall (no coordinated omission).
//!
//! Given several URLs (the nodes of one cluster), connection i goes to node
//! i mod n, so senders and receivers are spread over the nodes, and latencies are
//! also reported split into same-node and cross-node deliveries.

use crate::client::{self, Frame, Target};
use crate::probe::Probe;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// Senders are connections `0..senders`; a marker naming a sender beyond this is
/// not the generator's own and is not checked for order.
const MAX_SENDERS: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Plan {
    pub conns: usize,
    pub rooms: usize,
    pub senders: usize,
    pub batch: bool,
    pub text_bytes: usize,
}

/// Figures of one measured window.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub rate: f64,
    pub seconds: f64,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// With several nodes: (deliveries, p50, p99) of same-node and cross-node ones.
    pub same_node: Option<(u64, f64, f64)>,
    pub cross_node: Option<(u64, f64, f64)>,
}

impl StepResult {
    pub fn deliveries_per_sec(&self) -> f64 {
        self.received as f64 / self.seconds
    }
    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.received as f64 / self.expected as f64
        }
    }
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }
    /// The objective of a ramp step: p99 < 100 ms and ratio >= 0.999.
    pub fn passes(&self) -> bool {
        self.p99_ms < 100.0 && self.ratio() >= 0.999
    }
}

/// What the receivers and senders share. Counters are per window.
struct Shared {
    epoch: Instant,
    window_start_ns: AtomicU64,
    window_end_ns: AtomicU64,
    /// Latencies (µs) of deliveries in the window, merged from per-task histograms.
    hist: Mutex<Histogram<u64>>,
    /// The same latencies split by whether sender and receiver share a node.
    hist_same: Mutex<Histogram<u64>>,
    hist_cross: Mutex<Histogram<u64>>,
    nodes: usize,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    /// Deliveries seen so far (all windows), for the progress line.
    seen: AtomicU64,
    /// Connections the server closed (or dropped) before the run stopped them.
    closed: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn new(nodes: usize) -> Shared {
        Shared {
            epoch: Instant::now(),
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(u64::MAX),
            hist: Mutex::new(new_hist()),
            hist_same: Mutex::new(new_hist()),
            hist_cross: Mutex::new(new_hist()),
            nodes,
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_start_ns.load(Ordering::Relaxed)
            && ns < self.window_end_ns.load(Ordering::Relaxed)
    }
}

/// One single-threaded runtime per core, each owning every n-th connection (its
/// socket, its reader). Readers are the generator's hot path, a wake-up per
/// delivered frame: on a current-thread runtime a wake-up stays on its thread,
/// while the multi-threaded scheduler hands tasks between workers and unparks idle
/// ones (futex calls) — CPU taken from the server sharing these cores. The threads
/// run until the process exits.
fn cores() -> anyhow::Result<Vec<tokio::runtime::Handle>> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        std::thread::Builder::new()
            .name(format!("bench-core-{i}"))
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    }
    Ok(handles)
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

pub struct Rig {
    shared: Arc<Shared>,
    plan: Plan,
    senders: Vec<Writer>,
    /// Messages each sender scheduled inside the current window.
    sent_in_window: Vec<Arc<AtomicU64>>,
    /// Each sender's last message number. It carries on from step to step: the
    /// receivers check that numbers only grow, so a step that started again from 1
    /// would look like a stream of duplicates and reorderings.
    sent_total: Vec<Arc<AtomicU64>>,
    room_size: Vec<u64>,
}

impl Rig {
    /// Open every connection (at most 256 handshakes at once), say hello, join.
    /// Connection i goes to `targets[i % targets.len()]`.
    pub async fn open(targets: &[Target], plan: Plan, progress: bool) -> anyhow::Result<Rig> {
        anyhow::ensure!(!targets.is_empty(), "no server URL");
        let shared = Arc::new(Shared::new(targets.len()));
        let cores = cores()?;
        let gate = Arc::new(Semaphore::new(256));
        let mut tasks = Vec::with_capacity(plan.conns);
        for i in 0..plan.conns {
            let target = targets[i % targets.len()].clone();
            let gate = gate.clone();
            let room = format!("bench-{}", i % plan.rooms);
            let batch = plan.batch;
            // The connection lives on core i mod n: its socket registers with that
            // core's reactor, and its reader runs there (below).
            tasks.push(cores[i % cores.len()].spawn(async move {
                let _permit = gate.acquire().await?;
                let mut conn = client::connect(&target, i).await?;
                client::hello_and_join(&mut conn, &format!("b{i}"), &room, batch).await?;
                anyhow::Ok(conn)
            }));
        }
        let mut senders = Vec::new();
        let mut room_size = vec![0u64; plan.rooms];
        let started = Instant::now();
        for (i, t) in tasks.into_iter().enumerate() {
            let conn = t.await??;
            room_size[i % plan.rooms] += 1;
            let writer: Writer = Arc::new(tokio::sync::Mutex::new(conn.write));
            if i < plan.senders {
                senders.push(writer.clone());
            }
            let node = i % shared.nodes;
            cores[i % cores.len()].spawn(receive(
                conn.read,
                conn.buf,
                writer,
                shared.clone(),
                node,
            ));
            if progress && (i + 1) % 1000 == 0 {
                eprintln!(
                    "  {} connections open ({:.1} s)",
                    i + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let sent_in_window = (0..senders.len())
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let sent_total = (0..senders.len())
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        Ok(Rig {
            shared,
            plan,
            senders,
            sent_in_window,
            sent_total,
            room_size,
        })
    }

    /// Run one step at `rate` messages/s in total: warm up, measure, let stragglers
    /// arrive, and report.
    pub async fn step(
        &self,
        rate: f64,
        warmup: Duration,
        measure: Duration,
        probe: &Probe,
        progress: bool,
    ) -> anyhow::Result<StepResult> {
        let s = &self.shared;
        let begin = s.now_ns() + warmup.as_nanos() as u64;
        let end = begin + measure.as_nanos() as u64;
        s.window_start_ns.store(begin, Ordering::Relaxed);
        s.window_end_ns.store(end, Ordering::Relaxed);
        s.duplicates.store(0, Ordering::Relaxed);
        s.out_of_order.store(0, Ordering::Relaxed);
        for h in [&s.hist, &s.hist_same, &s.hist_cross] {
            h.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.reset();
        }
        for c in &self.sent_in_window {
            c.store(0, Ordering::Relaxed);
        }
        let per_sender = rate / self.senders.len().max(1) as f64;
        let pad = "x".repeat(self.plan.text_bytes.saturating_sub(32));
        let nsenders = self.senders.len().max(1) as u64;
        let mut send_tasks = Vec::new();
        for (j, sink) in self.senders.iter().enumerate() {
            let sink = sink.clone();
            let shared = s.clone();
            let count = self.sent_in_window[j].clone();
            let total = self.sent_total[j].clone();
            let room = format!("bench-{}", j % self.plan.rooms);
            let pad = pad.clone();
            send_tasks.push(tokio::spawn(async move {
                let interval_ns = ((1e9 / per_sender) as u64).max(1);
                // Stagger senders across one interval so they do not fire together.
                let mut due = shared.now_ns() + interval_ns * j as u64 / nsenders;
                let mut n = total.load(Ordering::Relaxed);
                while due < end {
                    let now = shared.now_ns();
                    if due > now {
                        tokio::time::sleep(Duration::from_nanos(due - now)).await;
                    }
                    n += 1;
                    total.store(n, Ordering::Relaxed);
                    let text = format!("bm:{j}:{n}:{due}:{pad}");
                    let cmd = format!(r#"{{"type":"send","room":"{room}","text":"{text}"}}"#);
                    // Locked per send, not for the whole step: the connection's
                    // reader takes the same lock to answer the server's pings, and
                    // holding it would stall that reader (and its deliveries) for
                    // the rest of the step.
                    if client::send_text(&mut *sink.lock().await, &cmd)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    if due >= begin {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    due += interval_ns;
                }
            }));
        }
        // Progress once a second while the step runs.
        let mut last_seen = s.seen.load(Ordering::Relaxed);
        let mut cpu_at_begin = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = s.now_ns();
            if cpu_at_begin.is_none() && now >= begin {
                cpu_at_begin = Some(probe.sample_or_say().await.map(|x| x.cpu_seconds));
            }
            let seen = s.seen.load(Ordering::Relaxed);
            if progress {
                let p99 = s
                    .hist
                    .lock()
                    .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0)
                    .unwrap_or(0.0);
                eprintln!(
                    "  rate {rate:.0}/s in: {} deliveries/s, window p99 so far {p99:.1} ms",
                    seen - last_seen
                );
            }
            last_seen = seen;
            if now >= end {
                break;
            }
        }
        let cpu_at_end = probe.sample_or_say().await.map(|x| x.cpu_seconds);
        for t in send_tasks {
            let _ = t.await;
        }
        // Stragglers: give in-flight messages time to arrive, and receivers time to
        // merge their histograms.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let expected: u64 = self
            .sent_in_window
            .iter()
            .enumerate()
            .map(|(j, c)| c.load(Ordering::Relaxed) * self.room_size[j % self.plan.rooms])
            .sum();
        let h = s
            .hist
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let received = h.len();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let split = |m: &Mutex<Histogram<u64>>| -> Option<(u64, f64, f64)> {
            let h = m.lock().ok()?;
            (s.nodes > 1).then(|| {
                (
                    h.len(),
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                )
            })
        };
        let (same_node, cross_node) = (split(&s.hist_same), split(&s.hist_cross));
        let server_cpu_us_per_delivery = match (cpu_at_begin.flatten(), cpu_at_end) {
            (Some(a), Some(b)) if received > 0 => Some((b - a) * 1e6 / received as f64),
            _ => None,
        };
        Ok(StepResult {
            rate,
            seconds: measure.as_secs_f64(),
            expected,
            received,
            duplicates: s.duplicates.load(Ordering::Relaxed),
            out_of_order: s.out_of_order.load(Ordering::Relaxed),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
            server_cpu_us_per_delivery,
            same_node,
            cross_node,
        })
    }

    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// How many connections the server has closed so far.
    pub fn closed(&self) -> u64 {
        self.shared.closed.load(Ordering::Relaxed)
    }
}

/// Latency histograms of one generator core (one per reader thread, not per
/// connection: a histogram here is ~240 KB, and 18,000 connections with three each
/// had the generator page-faulting gigabytes on their first deliveries, starving
/// the servers on the same cores). Readers merge them into the shared ones.
struct CoreHists {
    all: Option<Histogram<u64>>,
    same: Option<Histogram<u64>>,
    cross: Option<Histogram<u64>>,
    /// When (the generator's clock) this core last merged.
    merged_ns: u64,
}

/// A core merges its histograms at most this often. Each connection asked for a
/// merge 100 ms after its first unmerged delivery, so with 1,000 connections a
/// core merged (and zeroed) its ~240 KB histogram thousands of times a second:
/// 2 % of the machine in a batched run of 9,000 msg/s (perf, 2026-12-05).
const MERGE_EVERY_NS: u64 = 20_000_000;

impl CoreHists {
    fn record(&mut self, us: u64, same_node: Option<bool>) {
        let _ = self.all.get_or_insert_with(new_hist).record(us);
        let split = match same_node {
            None => return,
            Some(true) => &mut self.same,
            Some(false) => &mut self.cross,
        };
        let _ = split.get_or_insert_with(new_hist).record(us);
    }

    /// Make sure what this core recorded up to `last_ns` (a connection's last
    /// delivery) is in the shared histograms: already (a merge since), by merging
    /// now (`now`, the generator's clock), or, when this core merged less than
    /// [`MERGE_EVERY_NS`] ago, later: returns how long to wait before asking again.
    fn merge_covering(&mut self, shared: &Shared, last_ns: u64, now: u64) -> Option<Duration> {
        if self.merged_ns > last_ns {
            return None;
        }
        let since = now.saturating_sub(self.merged_ns);
        if since < MERGE_EVERY_NS {
            return Some(Duration::from_nanos(MERGE_EVERY_NS - since));
        }
        self.merge_into(shared);
        self.merged_ns = now;
        None
    }

    fn merge_into(&mut self, shared: &Shared) {
        for (l, h) in [
            (&mut self.all, &shared.hist),
            (&mut self.same, &shared.hist_same),
            (&mut self.cross, &shared.hist_cross),
        ] {
            if let Some(l) = l.as_mut()
                && !l.is_empty()
            {
                if let Ok(mut h) = h.lock() {
                    let _ = h.add(&*l);
                }
                l.reset();
            }
        }
    }
}

thread_local! {
    static CORE_HISTS: std::cell::RefCell<CoreHists> = const {
        std::cell::RefCell::new(CoreHists { all: None, same: None, cross: None, merged_ns: 0 })
    };
}

/// What one readiness of a connection gave.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    /// Bytes were read and every whole frame in them handed on.
    Frames,
    /// Nothing to read after all (the readiness was stale).
    NotYet,
    /// The server closed the connection (a close frame, EOF or an error).
    Closed,
}

/// Bytes one read may bring, beyond a partial frame carried over.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// One read buffer per generator core, shared by the connections on that core
    /// (they run one at a time). With a buffer of its own per connection, 1,000
    /// connections read into ~16 MB that never stayed in cache: the kernel's copy
    /// into it (`_copy_to_iter`) was 27 % of the generator's samples and moving
    /// partial frames to the front (`memmove`) 8 %, in a batched run of 12,000
    /// msg/s to 1,000 members (perf, 2026-12-05). Only a partial frame at the end
    /// of a read is kept per connection.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Read what `read` has into `scratch`, after the partial frame `pending` carried
/// over from the last read; hand every whole frame (with the bytes its range
/// points into) to `each`, and keep what is left of a frame in `pending`.
fn read_into_scratch(
    read: &OwnedReadHalf,
    pending: &mut BytesMut,
    scratch: &mut Vec<u8>,
    mut each: impl FnMut(Frame, &[u8]),
) -> Got {
    let left = pending.len();
    if scratch.len() < left + SCRATCH_BYTES {
        scratch.resize(left + SCRATCH_BYTES, 0);
    }
    scratch[..left].copy_from_slice(pending);
    let n = match read.try_read(&mut scratch[left..]) {
        Ok(0) => return Got::Closed,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Got::NotYet,
        Err(_) => return Got::Closed,
    };
    let data = &scratch[..left + n];
    let mut at = 0;
    while let Some((frame, used)) = client::next_frame(&data[at..]) {
        let here = &data[at..at + used];
        at += used;
        if matches!(frame, Frame::Close) {
            return Got::Closed;
        }
        each(frame, here);
    }
    pending.clear();
    pending.extend_from_slice(&data[at..]);
    Got::Frames
}

/// One connection's reader: read through its core's shared buffer
/// ([`read_into_scratch`]), scan the frames for markers, count and time
/// deliveries, answer pings, and see its latencies merged into the shared
/// histograms 100 ms after its first unmerged delivery.
async fn receive(
    read: OwnedReadHalf,
    mut buf: BytesMut,
    writer: Writer,
    shared: Arc<Shared>,
    node: usize,
) {
    // The last `n` seen from each sender, by sender (connection) index: a vector
    // rather than a hashed map, looked up once per delivery.
    let mut last: Vec<u64> = Vec::new();
    // Counted locally and merged 100 ms after the first unmerged delivery: one
    // shared atomic per delivery would contend across cores at a million
    // deliveries per second, and a timer that fired whether or not anything arrived
    // would wake 19,000 idle connections ten times a second.
    let mut seen = 0u64;
    // When (the generator's clock) this connection last read a delivery.
    let mut last_ns = 0u64;
    let flush = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(flush);
    let mut dirty = false;
    let closed = || {
        if !shared.stop.load(Ordering::Relaxed) {
            shared.closed.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        tokio::select! {
            ready = read.readable() => {
                if ready.is_err() {
                    closed();
                    break;
                }
                let now = shared.now_ns();
                let mut pings = Vec::new();
                let got = SCRATCH.with_borrow_mut(|scratch| {
                    read_into_scratch(&read, &mut buf, scratch, |frame, data| match frame {
                        Frame::Text(r) => client::scan(&data[r], |m| {
                            seen += 1;
                            let i = m.sender as usize;
                            if i >= last.len() {
                                if i >= MAX_SENDERS {
                                    return; // not one of ours
                                }
                                last.resize(i + 1, 0);
                            }
                            let prev = &mut last[i];
                            if m.n == *prev {
                                shared.duplicates.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            if m.n < *prev {
                                shared.out_of_order.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            *prev = m.n;
                            if shared.in_window(m.sent_ns) {
                                let us = (now.saturating_sub(m.sent_ns) / 1000).max(1);
                                // Sender j is connection j, on node j mod n.
                                let same = (shared.nodes > 1)
                                    .then(|| m.sender as usize % shared.nodes == node);
                                CORE_HISTS.with_borrow_mut(|h| h.record(us, same));
                            }
                        }),
                        Frame::Ping(r) => pings.push(data[r].to_vec()),
                        Frame::Close | Frame::Other => {}
                    })
                });
                for payload in pings {
                    let _ = client::send_frame(&mut *writer.lock().await, 0xA, &payload).await;
                }
                match got {
                    Got::Frames => {}
                    Got::NotYet => continue,
                    Got::Closed => {
                        closed();
                        return;
                    }
                }
                if seen > 0 {
                    last_ns = now;
                }
                if seen > 0 && !dirty {
                    dirty = true;
                    flush.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(100));
                }
            }
            () = &mut flush, if dirty => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                shared.seen.fetch_add(std::mem::take(&mut seen), Ordering::Relaxed);
                match CORE_HISTS.with_borrow_mut(|h| h.merge_covering(&shared, last_ns, shared.now_ns())) {
                    None => dirty = false,
                    Some(wait) => flush.as_mut().reset(tokio::time::Instant::now() + wait),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> CoreHists {
        CoreHists {
            all: None,
            same: None,
            cross: None,
            merged_ns: 0,
        }
    }

    /// A connected pair over loopback: the generator's read half and the
    /// "server's" end.
    async fn pair() -> (OwnedReadHalf, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (read, _write) = client.expect("connect").into_split();
        (read, server.expect("accept").0)
    }

    /// A server text frame (unmasked).
    fn text_frame(text: &str) -> Vec<u8> {
        let mut f = vec![0x81, text.len() as u8];
        f.extend_from_slice(text.as_bytes());
        f
    }

    /// Wait until `read` is readable, then read once into `scratch`, returning
    /// what came and the texts handed on.
    async fn read_once(
        read: &OwnedReadHalf,
        pending: &mut BytesMut,
        scratch: &mut Vec<u8>,
    ) -> (Got, Vec<String>) {
        read.readable().await.expect("readable");
        let mut texts = Vec::new();
        let got = read_into_scratch(read, pending, scratch, |frame, data| {
            if let Frame::Text(r) = frame {
                texts.push(String::from_utf8_lossy(&data[r]).into_owned());
            }
        });
        (got, texts)
    }

    #[tokio::test]
    async fn a_frame_split_over_two_reads_is_handed_on_once_and_whole() {
        use tokio::io::AsyncWriteExt;
        let (read, mut server) = pair().await;
        let (mut pending, mut scratch) = (BytesMut::new(), Vec::new());
        let mut bytes = text_frame("first");
        bytes.extend(text_frame("second"));
        let (head, tail) = bytes.split_at(9);
        server.write_all(head).await.expect("write");
        let (got, texts) = read_once(&read, &mut pending, &mut scratch).await;
        assert_eq!(got, Got::Frames);
        assert_eq!(texts, ["first"]);
        assert_eq!(&pending[..], &head[7..], "the second frame's start is kept");
        server.write_all(tail).await.expect("write");
        let (got, texts) = read_once(&read, &mut pending, &mut scratch).await;
        assert_eq!(got, Got::Frames);
        assert_eq!(texts, ["second"]);
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn connections_sharing_the_scratch_buffer_keep_their_own_partial_frames() {
        use tokio::io::AsyncWriteExt;
        let (read_a, mut server_a) = pair().await;
        let (read_b, mut server_b) = pair().await;
        let (mut pending_a, mut pending_b, mut scratch) =
            (BytesMut::new(), BytesMut::new(), Vec::new());
        let a = text_frame("from a");
        let b = text_frame("from b");
        server_a.write_all(&a[..4]).await.expect("write");
        server_b.write_all(&b[..5]).await.expect("write");
        assert_eq!(
            read_once(&read_a, &mut pending_a, &mut scratch).await,
            (Got::Frames, vec![])
        );
        assert_eq!(
            read_once(&read_b, &mut pending_b, &mut scratch).await,
            (Got::Frames, vec![])
        );
        server_a.write_all(&a[4..]).await.expect("write");
        server_b.write_all(&b[5..]).await.expect("write");
        let (_, texts_a) = read_once(&read_a, &mut pending_a, &mut scratch).await;
        let (_, texts_b) = read_once(&read_b, &mut pending_b, &mut scratch).await;
        assert_eq!(
            (texts_a, texts_b),
            (vec!["from a".to_string()], vec!["from b".to_string()])
        );
    }

    #[tokio::test]
    async fn a_close_frame_or_the_end_of_the_stream_reads_as_closed() {
        use tokio::io::AsyncWriteExt;
        let (read, mut server) = pair().await;
        let (mut pending, mut scratch) = (BytesMut::new(), Vec::new());
        let mut bytes = text_frame("last");
        bytes.extend([0x88, 0x00]);
        server.write_all(&bytes).await.expect("write");
        let (got, texts) = read_once(&read, &mut pending, &mut scratch).await;
        assert_eq!((got, texts), (Got::Closed, vec!["last".to_string()]));

        let (read, server) = pair().await;
        drop(server);
        let (got, texts) = read_once(&read, &mut BytesMut::new(), &mut scratch).await;
        assert_eq!((got, texts), (Got::Closed, vec![]));
    }

    fn merged(shared: &Shared) -> u64 {
        shared.hist.lock().expect("histogram").len()
    }

    #[test]
    fn a_core_that_merged_long_enough_ago_merges_at_once() {
        let shared = Shared::new(1);
        let mut core = core();
        core.record(10, None);
        core.record(20, None);
        let now = MERGE_EVERY_NS + 5;
        assert_eq!(core.merge_covering(&shared, 4, now), None);
        assert_eq!(merged(&shared), 2);
        assert_eq!(core.merged_ns, now);
    }

    #[test]
    fn a_core_that_merged_moments_ago_tells_the_connection_when_to_ask_again() {
        let shared = Shared::new(1);
        let mut core = core();
        core.merged_ns = 1_000_000;
        core.record(10, None);
        let wait = core.merge_covering(&shared, 1_000_001, 6_000_000);
        assert_eq!(wait, Some(Duration::from_nanos(MERGE_EVERY_NS - 5_000_000)));
        assert_eq!(merged(&shared), 0, "nothing merged yet");
        // Asked again when told: merged, and nothing more to wait for.
        assert_eq!(core.merge_covering(&shared, 1_000_001, 21_000_000), None);
        assert_eq!(merged(&shared), 1);
    }

    #[test]
    fn a_connection_whose_deliveries_came_before_the_last_merge_needs_none() {
        let shared = Shared::new(1);
        let mut core = core();
        core.merged_ns = 1_000_000;
        core.record(10, None); // another connection's, after the merge
        assert_eq!(core.merge_covering(&shared, 999_999, 1_000_100), None);
        assert_eq!(
            merged(&shared),
            0,
            "left for the connection that recorded it"
        );
    }

    #[test]
    fn a_delivery_read_in_the_same_nanosecond_as_the_merge_is_merged_again() {
        let shared = Shared::new(1);
        let mut core = core();
        core.merged_ns = MERGE_EVERY_NS;
        core.record(10, None);
        assert_eq!(
            core.merge_covering(&shared, MERGE_EVERY_NS, 2 * MERGE_EVERY_NS),
            None
        );
        assert_eq!(merged(&shared), 1);
    }
}
