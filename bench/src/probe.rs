//! Figures about the server under test: its resident memory and the CPU time it
//! has used, for RSS per connection and CPU per delivery.
//!
//! Owns: where those figures come from. With `--pid` (server on this machine) they
//! are read from /proc/PID; without it, from each node's `/metrics`
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`), summed over the
//! nodes, so an operator can benchmark a server on another machine. Must not: fail a
//! run because the figures are unavailable (the floor has no `/metrics`): a run
//! without them reports none and says why.

use crate::client::Target;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one scrape of `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// A `/metrics` page larger than this is not Hubbub's.
const MAX_PAGE: u64 = 4 << 20;

pub struct Probe {
    source: Source,
    /// A sample failed: the run goes on without server figures, and neither says
    /// so again nor asks again (a ramp would otherwise scrape a server without
    /// /metrics, and complain, twice per step).
    gave_up: AtomicBool,
}

enum Source {
    Pid(u32),
    /// The distinct nodes' HTTP addresses (host:port of their WebSocket URLs).
    Metrics(Vec<SocketAddr>),
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
}

impl Probe {
    pub fn new(pid: Option<u32>, targets: &[Target]) -> Probe {
        let source = match pid {
            Some(pid) => Source::Pid(pid),
            None => {
                let mut addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
                addrs.sort();
                addrs.dedup();
                Source::Metrics(addrs)
            }
        };
        Probe {
            source,
            gave_up: AtomicBool::new(false),
        }
    }

    /// Where the figures come from, for the JSON report.
    pub fn source(&self) -> &'static str {
        match self.source {
            Source::Pid(_) => "pid",
            Source::Metrics(_) => "metrics",
        }
    }

    /// Where the figures come from, for the table.
    pub fn origin(&self) -> &'static str {
        match self.source {
            Source::Pid(_) => "/proc/PID/status",
            Source::Metrics(_) => "/metrics",
        }
    }

    async fn sample(&self) -> anyhow::Result<Sample> {
        match &self.source {
            Source::Pid(pid) => Ok(Sample {
                rss_bytes: rss_bytes(*pid)?,
                cpu_seconds: cpu_seconds(*pid)?,
            }),
            Source::Metrics(addrs) => {
                let mut total = Sample {
                    rss_bytes: 0,
                    cpu_seconds: 0.0,
                };
                for addr in addrs {
                    let page = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(*addr))
                        .await
                        .with_context(|| format!("http://{addr}/metrics did not answer"))??;
                    let s = parse(&page)
                        .with_context(|| format!("http://{addr}/metrics: no process figures"))?;
                    total.rss_bytes += s.rss_bytes;
                    total.cpu_seconds += s.cpu_seconds;
                }
                Ok(total)
            }
        }
    }

    /// A sample, or `None` with the reason on stderr (once): figures are optional,
    /// the run is not.
    pub async fn sample_or_say(&self) -> Option<Sample> {
        if self.gave_up.load(Ordering::Relaxed) {
            return None;
        }
        match self.sample().await {
            Ok(s) => Some(s),
            Err(e) => {
                self.gave_up.store(true, Ordering::Relaxed);
                eprintln!("server figures unavailable for this run: {e:#}");
                None
            }
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces, inside parentheses).
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    // Clock ticks: 100 per second on Linux x86_64 and aarch64.
    Ok((utime + stime) / 100.0)
}

/// Resident memory of a process in bytes, from /proc/PID/status.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

/// GET /metrics over plain HTTP/1.0 (no chunked encoding, the server closes after
/// the body) and return the body.
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.take(MAX_PAGE).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        anyhow::bail!("GET /metrics answered {status:?}");
    }
    Ok(body.to_owned())
}

/// The process figures of a Prometheus text page.
fn parse(page: &str) -> Option<Sample> {
    let value = |name: &str| -> Option<f64> {
        page.lines()
            .filter_map(|l| l.strip_prefix(name))
            .find_map(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Sample {
        rss_bytes: value("process_resident_memory_bytes")? as u64,
        cpu_seconds: value("process_cpu_seconds_total")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_the_process_figures_and_skips_help_lines_and_lookalikes() {
        let page = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes_max 1\n\
                    process_resident_memory_bytes 21917696\n\
                    process_cpu_seconds_total 12.5\n";
        let s = parse(page).expect("figures");
        assert_eq!(s.rss_bytes, 21_917_696);
        assert_eq!(s.cpu_seconds, 12.5);
    }

    #[test]
    fn parse_without_process_figures_is_none() {
        assert!(parse("hubbub_connections 3\n").is_none());
    }
}
