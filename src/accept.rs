//! Accepting TCP connections, for the plain and the TLS listener alike, and what
//! to do when the process runs out of file descriptors.
//!
//! Owns: the accept loop's error policy (a failed connection is skipped; out of
//! descriptors or memory pauses accepting with a backoff, said once per episode in
//! the log and in `hubbub_accept_paused` / `hubbub_accept_errors_total`, undone
//! when an accept succeeds again). Must not: read from or write to a connection.
//!
//! At the open-file limit `accept` fails with EMFILE while the pending
//! connection stays in the kernel's backlog; retrying at once would spin a core.
//! The connections already open keep being served, since only accepting waits.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// The first wait after a failed accept; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// One listener's accept state: the current episode of failures, if any.
#[derive(Debug, Default)]
pub struct Acceptor {
    episode: Option<Episode>,
    /// The wait after the next failure: doubled by each failure in a row, back
    /// to [`FIRST_BACKOFF`] after an accept.
    backoff: Option<Duration>,
}

/// Failures less than [`QUIET`] apart, with the accepts in between: near the
/// limit, every closed connection lets one accept through before the next
/// failure, and that flapping is one episode, logged once.
#[derive(Debug)]
struct Episode {
    since: Instant,
    failures: u64,
    last_failure: Instant,
    resumed_logged: bool,
}

/// An episode ends after this long without a failed accept.
const QUIET: Duration = Duration::from_secs(10);

impl Acceptor {
    pub fn new() -> Acceptor {
        metrics::gauge!("hubbub_accept_paused").set(0.0);
        Acceptor::default()
    }

    /// The next connection, with TCP_NODELAY set (small frames must not wait
    /// behind Nagle's algorithm). Waits and retries through errors.
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => {
                    self.accepted();
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    return (tcp, addr);
                }
                Err(e) if per_connection(&e) => {
                    tracing::debug!(error = %e, "a connection failed before it was accepted");
                }
                Err(e) => {
                    let wait = self.failed(&e, Instant::now());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// A failure that is about the process, not one connection: pause for the
    /// returned time. Logged once per episode.
    fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        metrics::counter!("hubbub_accept_errors_total", "reason" => reason(e)).increment(1);
        metrics::gauge!("hubbub_accept_paused").set(1.0);
        let wait = match self.backoff {
            Some(b) => (b * 2).min(MAX_BACKOFF),
            None => FIRST_BACKOFF,
        };
        self.backoff = Some(wait);
        match &mut self.episode {
            Some(ep) if now.saturating_duration_since(ep.last_failure) < QUIET => {
                ep.failures += 1;
                ep.last_failure = now;
            }
            _ => {
                let limit =
                    open_file_limit().map_or_else(|| "unknown".to_owned(), |n| n.to_string());
                tracing::warn!(
                    error = %e,
                    open_file_limit = %limit,
                    "cannot accept new connections (out of file descriptors?): pausing accepts \
                     with a backoff until some close; open connections are still served"
                );
                self.episode = Some(Episode {
                    since: now,
                    failures: 1,
                    last_failure: now,
                    resumed_logged: false,
                });
            }
        }
        wait
    }

    fn accepted(&mut self) {
        if self.backoff.take().is_none() {
            return;
        }
        metrics::gauge!("hubbub_accept_paused").set(0.0);
        if let Some(ep) = &mut self.episode
            && !ep.resumed_logged
        {
            ep.resumed_logged = true;
            tracing::info!(
                paused_ms = ep.since.elapsed().as_millis() as u64,
                failed_accepts = ep.failures,
                "accepting new connections again"
            );
        }
    }
}

/// Errors that end one pending connection and say nothing about the process.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// The `reason` label of `hubbub_accept_errors_total`.
fn reason(e: &io::Error) -> &'static str {
    // EMFILE (24): this process's limit; ENFILE (23): the system's.
    match e.raw_os_error() {
        Some(24) => "process_open_files",
        Some(23) => "system_open_files",
        Some(12 | 105) => "out_of_memory",
        _ => "other",
    }
}

/// The soft limit on open files of this process, from /proc (Linux).
pub fn open_file_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_before_accept_is_about_one_connection() {
        assert!(per_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }

    #[test]
    fn out_of_file_descriptors_is_about_the_process() {
        let e = io::Error::from_raw_os_error(24);
        assert!(!per_connection(&e));
        assert_eq!(reason(&e), "process_open_files");
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_resets_after_an_accept() {
        let mut a = Acceptor::new();
        let e = io::Error::from_raw_os_error(24);
        let t = Instant::now();
        let waits: Vec<Duration> = (0..8).map(|_| a.failed(&e, t)).collect();
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().expect("waits"), MAX_BACKOFF);
        a.accepted();
        assert_eq!(a.failed(&e, t), FIRST_BACKOFF);
    }

    #[test]
    fn failures_less_than_quiet_apart_are_one_episode() {
        let mut a = Acceptor::new();
        let e = io::Error::from_raw_os_error(24);
        let t = Instant::now();
        a.failed(&e, t);
        a.accepted();
        a.failed(&e, t + QUIET / 2);
        assert_eq!(a.episode.as_ref().map(|ep| ep.failures), Some(2));
        a.accepted();
        a.failed(&e, t + QUIET * 2);
        assert_eq!(
            a.episode.as_ref().map(|ep| ep.failures),
            Some(1),
            "a new episode"
        );
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }
}
