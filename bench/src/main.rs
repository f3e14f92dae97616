//! `hubbub-bench`: a load generator for the Hubbub protocol, usable against any
//! Hubbub URL, and `floor`, a minimal broadcast server to compare against.
//!
//!   hubbub-bench floor --listen 127.0.0.1:9000
//!   hubbub-bench idle   --url ws://127.0.0.1:8080/ws --conns 19000 --rooms 100 --pid PID
//!   hubbub-bench fanout --url ws://127.0.0.1:8080/ws --conns 1000 --rooms 1 --senders 10 --rate 1000 --pid PID
//!   hubbub-bench fanout ... --ramp            # step the rate up until a step fails
//!   hubbub-bench acks   --url ws://127.0.0.1:8080/ws --rate 1000
//!   hubbub-bench bigroom --url ws://127.0.0.1:8080/ws --conns 19000 --senders 5 --rate 20
//!   hubbub-bench hello  --url ws://127.0.0.1:8080/ws --rooms 500 --messages 20
//!   hubbub-bench allow  --listen 127.0.0.1:9100   # a publish check that allows all
//!
//! Without `--pid`, the server's RSS and CPU come from its `/metrics`.
//! The server must allow the senders' rate (`hubbub --rate-limit`). Progress goes to
//! stderr; the final table (or one JSON line with `--json`) to stdout.

mod allow;
mod client;
mod fanout;
mod floor;
mod hello;
mod probe;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use client::Target;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "hubbub-bench",
    version,
    about = "Load generator for Hubbub, and the floor server"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the minimal broadcast server (the machine's floor).
    Floor {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
    /// A publish-check receiver that allows everything at once (for `hubbub
    /// --publish-check-url`), to measure what the check costs.
    Allow {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
    },
    /// Open N connections (hello + join), hold them, report server RSS per connection.
    Idle(IdleArgs),
    /// Fan-out: N connections over R rooms, S senders at a fixed total rate.
    Fanout(FanoutArgs),
    /// Send-to-ack latency (durable commit) at a fixed rate.
    Acks(AcksArgs),
    /// One big room: N clients join it (time until all are in, none closed), hold,
    /// then S senders at a fixed total rate fan out to everyone in it. With several
    /// URLs the room is spread over the nodes.
    Bigroom(BigroomArgs),
    /// What `hello` costs a user with many rooms (welcome lists them with unread
    /// counts), against a new user without rooms. Needs a server that lets one
    /// connection send fast (`hubbub --rate-limit 100000`).
    Hello(HelloArgs),
}

#[derive(Args)]
struct HelloArgs {
    #[command(flatten)]
    common: Common,
    /// Rooms the user has (joined with `persist`).
    #[arg(long, default_value_t = 500)]
    rooms: usize,
    /// Messages sent into each room by another user (the reader reads half).
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// Hellos measured, for each of the two users.
    #[arg(long, default_value_t = 50)]
    repeat: usize,
}

#[derive(Args)]
struct Common {
    /// The server's WebSocket URL. Several, comma-separated (the nodes of one
    /// cluster): connection i goes to URL i mod n, and fan-out latency is also split
    /// into same-node and cross-node deliveries.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// The server's PID, for RSS and CPU figures from /proc. Without it they come
    /// from each node's /metrics (process_resident_memory_bytes,
    /// process_cpu_seconds_total), summed over the nodes.
    #[arg(long)]
    pid: Option<u32>,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// Ask the server for newline-batched frames (`hello` with `batch: true`).
    #[arg(long)]
    batch: bool,
}

impl Common {
    fn targets(&self) -> anyhow::Result<Vec<Target>> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(Target::parse)
            .collect()
    }
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Seconds to hold the connections after they are all open.
    #[arg(long, default_value_t = 5)]
    hold: u64,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages per second in, over all senders.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Step the rate up (x`--factor` per step) until a step misses p99 < 100 ms
    /// or ratio >= 0.999; report the highest passing rate.
    #[arg(long)]
    ramp: bool,
    /// Steps at most. The default, 30, from 100 msg/s at x1.25 ends at ~65,000
    /// msg/s: above what this machine passes, so that a ramp ends by failing a
    /// step. (At 20 it ended at 6,939, below Hubbub's batched rate, and the
    /// scripted sittings reported that as its highest.) A ramp that ends here
    /// with every step passing says so (`capped`).
    #[arg(long, default_value_t = 30)]
    max_steps: usize,
    /// The ramp's step factor. A second, finer ramp (e.g. `--factor 1.06`) from
    /// a coarse ramp's highest passing rate, against a fresh server, narrows the
    /// result down (a step that fails may have closed connections as slow
    /// consumers, so the same connections cannot go back down).
    #[arg(long, default_value_t = 1.25)]
    factor: f64,
}

#[derive(Args)]
struct BigroomArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10000)]
    conns: usize,
    /// Seconds to hold the room after everyone is in (presence settles, RSS is read).
    #[arg(long, default_value_t = 5)]
    hold: u64,
    #[arg(long, default_value_t = 5)]
    senders: usize,
    /// Messages per second in, over all senders (0: join and hold only).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 6)]
    duration: u64,
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Args)]
struct AcksArgs {
    #[command(flatten)]
    common: Common,
    /// Sending connections.
    #[arg(long, default_value_t = 10)]
    conns: usize,
    /// Sends per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

async fn hello_mode(a: HelloArgs) -> anyhow::Result<()> {
    let targets = a.common.targets()?;
    let target = targets.first().context("a --url")?;
    let r = hello::run(target, a.rooms, a.messages, a.repeat).await?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if a.common.json {
        println!(
            "{}",
            json!({"mode": "hello", "rooms": a.rooms, "messages": a.messages, "repeat": a.repeat,
                   "rooms_listed": r.rooms_listed, "welcome_bytes": r.welcome_bytes,
                   "with_rooms_p50_ms": ms(&r.with_rooms, 0.5), "with_rooms_p99_ms": ms(&r.with_rooms, 0.99),
                   "new_user_p50_ms": ms(&r.without, 0.5), "new_user_p99_ms": ms(&r.without, 0.99)})
        );
    } else {
        println!(
            "hello of a user with {} rooms ({} listed, welcome {} bytes) vs a new user, {} each:",
            a.rooms, r.rooms_listed, r.welcome_bytes, a.repeat
        );
        println!(
            "  with rooms: p50 {:.2} ms  p99 {:.2} ms",
            ms(&r.with_rooms, 0.5),
            ms(&r.with_rooms, 0.99)
        );
        println!(
            "  new user:   p50 {:.2} ms  p99 {:.2} ms",
            ms(&r.without, 0.5),
            ms(&r.without, 0.99)
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.mode {
            Mode::Floor { listen } => floor::run(listen).await,
            Mode::Allow { listen } => allow::run(listen).await,
            Mode::Idle(a) => idle(a).await,
            Mode::Fanout(a) => fanout_mode(a).await,
            Mode::Acks(a) => acks(a).await,
            Mode::Bigroom(a) => bigroom(a).await,
            Mode::Hello(a) => hello_mode(a).await,
        }
    })
}

/// Files the process needs besides its connections (runtime, stdio, /proc reads).
const SPARE_FILES: u64 = 64;

/// Raise the open-file limit as far as allowed, and cap `asked` connections to what
/// it then allows, saying so.
fn cap_conns(asked: usize) -> usize {
    let limit = client::raise_nofile();
    let most = usize::try_from(limit.saturating_sub(SPARE_FILES)).unwrap_or(usize::MAX);
    if asked > most {
        eprintln!(
            "open-file limit {limit} caps the connections at {most} (asked for {asked}); \
             raise the hard limit (ulimit -Hn) for more"
        );
        most
    } else {
        eprintln!("open-file limit: {limit}");
        asked
    }
}

async fn idle(mut a: IdleArgs) -> anyhow::Result<()> {
    let asked = a.conns;
    a.conns = cap_conns(asked);
    let targets = a.common.targets()?;
    let probe = probe::Probe::new(a.common.pid, &targets);
    let before = probe.sample_or_say().await.map(|s| s.rss_bytes);
    let started = Instant::now();
    let plan = fanout::Plan {
        conns: a.conns,
        rooms: a.rooms,
        senders: 0,
        batch: a.common.batch,
        text_bytes: 0,
    };
    let rig = fanout::Rig::open(&targets, plan, !a.common.json).await?;
    let opened = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let after = probe.sample_or_say().await.map(|s| s.rss_bytes);
    let per_conn = match (before, after) {
        (Some(b), Some(a2)) => Some((a2.saturating_sub(b)) as f64 / a.conns as f64),
        _ => None,
    };
    let closed = rig.closed();
    rig.stop();
    if a.common.json {
        println!(
            "{}",
            json!({"mode": "idle", "conns": a.conns, "conns_asked": asked, "rooms": a.rooms, "open_seconds": opened, "closed": closed,
                   "rss_before": before, "rss_after": after, "rss_bytes_per_conn": per_conn,
                   "server_figures": per_conn.map(|_| probe.source())})
        );
    } else {
        println!("mode            idle");
        println!(
            "connections     {} over {} rooms (hello + join each)",
            a.conns, a.rooms
        );
        println!("opened in       {opened:.1} s");
        println!("closed          {closed} by the server while held");
        match (before, after, per_conn) {
            (Some(b), Some(a2), Some(p)) => {
                println!(
                    "server RSS      {:.1} MiB -> {:.1} MiB (from {})",
                    b as f64 / 1048576.0,
                    a2 as f64 / 1048576.0,
                    probe.origin()
                );
                println!("RSS per conn    {p:.0} bytes");
            }
            _ => println!(
                "server RSS      unavailable (no --pid, and /metrics gave no process figures)"
            ),
        }
    }
    Ok(())
}

async fn bigroom(mut a: BigroomArgs) -> anyhow::Result<()> {
    let asked = a.conns;
    a.conns = cap_conns(asked);
    anyhow::ensure!(a.senders <= a.conns, "--senders must be at most --conns");
    let targets = a.common.targets()?;
    let probe = probe::Probe::new(a.common.pid, &targets);
    let progress = !a.common.json;
    let before = probe.sample_or_say().await.map(|s| s.rss_bytes);
    let plan = fanout::Plan {
        conns: a.conns,
        rooms: 1,
        senders: a.senders,
        batch: a.common.batch,
        text_bytes: a.size,
    };
    let started = Instant::now();
    let rig = fanout::Rig::open(&targets, plan, progress).await?;
    let joined_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let after = probe.sample_or_say().await.map(|s| s.rss_bytes);
    let closed_while_holding = rig.closed();
    let per_conn = match (before, after) {
        (Some(b), Some(a2)) => Some((a2.saturating_sub(b)) as f64 / a.conns as f64),
        _ => None,
    };
    if progress {
        eprintln!(
            "{} joined one room in {joined_seconds:.1} s; {closed_while_holding} closed while holding",
            a.conns
        );
    }
    let step = if a.rate > 0.0 && a.senders > 0 {
        let r = rig
            .step(
                a.rate,
                Duration::from_secs(a.warmup),
                Duration::from_secs(a.duration),
                &probe,
                progress,
            )
            .await?;
        if progress {
            print_step(&r);
        }
        Some(r)
    } else {
        None
    };
    let closed = rig.closed();
    rig.stop();
    if a.common.json {
        println!(
            "{}",
            json!({"mode": "bigroom", "conns": a.conns, "conns_asked": asked, "nodes": targets.len(),
                   "joined_seconds": joined_seconds, "closed_while_holding": closed_while_holding,
                   "closed": closed, "rss_before": before, "rss_after": after, "rss_bytes_per_conn": per_conn,
                   "server_figures": per_conn.map(|_| probe.source()),
                   "senders": a.senders, "batch": a.common.batch, "step": step.as_ref().map(step_json)})
        );
    } else {
        println!("mode            bigroom ({} node(s))", targets.len());
        println!(
            "joined          {} in one room in {joined_seconds:.1} s",
            a.conns
        );
        println!("closed          {closed} (while holding: {closed_while_holding})");
        if let Some(p) = per_conn {
            println!("RSS per conn    {p:.0} bytes (from {})", probe.origin());
        }
        if step.is_none() {
            println!("fan-out         not run (--rate 0)");
        }
    }
    Ok(())
}

fn print_step(r: &fanout::StepResult) {
    println!(
        "rate {:>8.0}/s in | {:>10.0} deliveries/s | ratio {:.5} (lost {}, dup {}, out-of-order {}) | p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms{}",
        r.rate,
        r.deliveries_per_sec(),
        r.ratio(),
        r.lost(),
        r.duplicates,
        r.out_of_order,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.server_cpu_us_per_delivery
            .map_or(String::new(), |c| format!(
                " | server CPU {c:.2} µs/delivery"
            )),
    );
    if let (Some(same), Some(cross)) = (r.same_node, r.cross_node) {
        println!(
            "    same-node  {:>9} deliveries: p50 {:.2} p99 {:.2} ms\n    cross-node {:>9} deliveries: p50 {:.2} p99 {:.2} ms",
            same.0, same.1, same.2, cross.0, cross.1, cross.2
        );
    }
}

fn step_json(r: &fanout::StepResult) -> serde_json::Value {
    json!({"rate": r.rate, "deliveries_per_sec": r.deliveries_per_sec(), "expected": r.expected,
           "received": r.received, "ratio": r.ratio(), "lost": r.lost(), "duplicates": r.duplicates,
           "out_of_order": r.out_of_order, "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms,
           "p999_ms": r.p999_ms, "max_ms": r.max_ms, "server_cpu_us_per_delivery": r.server_cpu_us_per_delivery,
           "same_node": r.same_node.map(|(n, p50, p99)| json!({"deliveries": n, "p50_ms": p50, "p99_ms": p99})),
           "cross_node": r.cross_node.map(|(n, p50, p99)| json!({"deliveries": n, "p50_ms": p50, "p99_ms": p99})),
           "passes": r.passes()})
}

async fn fanout_mode(mut a: FanoutArgs) -> anyhow::Result<()> {
    let asked = a.conns;
    a.conns = cap_conns(asked);
    anyhow::ensure!(
        a.senders >= 1 && a.senders <= a.conns,
        "--senders must be 1..=--conns"
    );
    anyhow::ensure!(a.rooms >= 1, "--rooms must be at least 1");
    anyhow::ensure!(
        a.factor > 1.0 && a.factor.is_finite(),
        "--factor must be above 1"
    );
    let targets = a.common.targets()?;
    let plan = fanout::Plan {
        conns: a.conns,
        rooms: a.rooms,
        senders: a.senders,
        batch: a.common.batch,
        text_bytes: a.size,
    };
    let progress = !a.common.json;
    let probe = probe::Probe::new(a.common.pid, &targets);
    let rig = fanout::Rig::open(&targets, plan, progress).await?;
    let warmup = Duration::from_secs(a.warmup);
    let measure = Duration::from_secs(a.duration);
    let mut steps = Vec::new();
    let mut rate = a.rate;
    loop {
        if progress {
            eprintln!("step: {rate:.0} messages/s in");
        }
        let r = rig.step(rate, warmup, measure, &probe, progress).await?;
        if progress {
            print_step(&r);
        }
        let ok = r.passes();
        steps.push(r);
        if !a.ramp || !ok || steps.len() >= a.max_steps {
            break;
        }
        rate *= a.factor;
    }
    rig.stop();
    // Ended by --max-steps, not by a failing step: the server may pass more.
    let capped = a.ramp && steps.len() >= a.max_steps && steps.last().is_some_and(|s| s.passes());
    let best = steps
        .iter()
        .filter(|s| s.passes())
        .map(|s| s.rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    if a.common.json {
        println!(
            "{}",
            json!({"mode": "fanout", "conns": a.conns, "conns_asked": asked, "rooms": a.rooms, "senders": a.senders, "batch": a.common.batch,
                   "size": a.size, "ramp": a.ramp, "highest_passing_rate": best, "capped": capped,
                   "server_figures": steps.iter().any(|s| s.server_cpu_us_per_delivery.is_some()).then(|| probe.source()),
                   "steps": steps.iter().map(step_json).collect::<Vec<_>>()})
        );
    } else if a.ramp {
        match best {
            Some(b) => println!(
                "highest passing rate: {b:.0} messages/s in ({:.0} deliveries/s){}",
                b * (a.conns / a.rooms) as f64,
                if capped {
                    "; every step passed: --max-steps ended the ramp, not the server"
                } else {
                    ""
                }
            ),
            None => println!("no step passed (p99 < 100 ms and ratio >= 0.999)"),
        }
    }
    Ok(())
}

async fn acks(mut a: AcksArgs) -> anyhow::Result<()> {
    let asked = a.conns;
    a.conns = cap_conns(asked);
    let targets = a.common.targets()?;
    let mut tasks = Vec::new();
    let per_conn = a.rate / a.conns as f64;
    let run_for = Duration::from_secs(a.duration);
    let conns = a.conns as f64;
    for i in 0..a.conns {
        let target = targets[i % targets.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client::connect(&target, i).await?;
            let room = format!("acks-{i}");
            client::hello_and_join(&mut conn, &format!("a{i}"), &room, false).await?;
            let client::Conn {
                mut read,
                write: mut sink,
                mut buf,
            } = conn;
            let sent: std::sync::Arc<std::sync::Mutex<VecDeque<Instant>>> = Default::default();
            let sent2 = sent.clone();
            let reader = tokio::spawn(async move {
                use bytes::Buf;
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                while client::fill(&mut read, &mut buf).await {
                    while let Some((frame, used)) = client::next_frame(&buf) {
                        if let client::Frame::Text(r) = frame {
                            let text = std::str::from_utf8(&buf[r]).unwrap_or("");
                            for line in text.split('\n') {
                                if line.starts_with(r#"{"type":"ack""#) {
                                    // Acks of one connection come in send order.
                                    if let Some(at) =
                                        sent2.lock().ok().and_then(|mut q| q.pop_front())
                                    {
                                        let _ = h.record((at.elapsed().as_micros() as u64).max(1));
                                    }
                                }
                            }
                        }
                        buf.advance(used);
                    }
                }
                h
            });
            let interval = Duration::from_secs_f64(1.0 / per_conn);
            let start = Instant::now();
            // Stagger the connections across one interval.
            let mut due = start + interval.mul_f64(i as f64 / conns);
            let mut n = 0u64;
            while due < start + run_for {
                tokio::time::sleep_until(due.into()).await;
                n += 1;
                let cmd = format!(r#"{{"type":"send","id":{n},"room":"{room}","text":"ack {n}"}}"#);
                sent.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push_back(due);
                client::send_text(&mut sink, &cmd).await?;
                due += interval;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(sink);
            let h = tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .context("reader")??;
            anyhow::Ok((n, h))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sent = 0;
    for t in tasks {
        let (n, h) = t.await??;
        sent += n;
        total.add(&h)?;
    }
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    if a.common.json {
        println!(
            "{}",
            json!({"mode": "acks", "rate": a.rate, "conns": a.conns, "conns_asked": asked, "sent": sent, "acked": total.len(),
                   "acked_per_sec": total.len() as f64 / a.duration as f64,
                   "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": total.max() as f64 / 1000.0})
        );
    } else {
        println!(
            "mode        acks ({} connections, {:.0} sends/s)",
            a.conns, a.rate
        );
        println!("acked       {} of {}", total.len(), sent);
        println!(
            "send->ack   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(0.5),
            ms(0.99),
            total.max() as f64 / 1000.0
        );
    }
    Ok(())
}
