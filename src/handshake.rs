//! The first request on a connection must arrive in time and in bounds: its
//! request line and headers within `--handshake-timeout`, and within
//! [`MAX_HEAD`] bytes (beyond it: 431 and close).
//!
//! Owns: the deadline and the size bound of the first request head, as a wrapper
//! around the connection's byte stream. Must not: parse HTTP beyond finding the
//! blank line that ends the head, or touch anything after it (bodies, later
//! requests, the upgraded WebSocket: once the head is complete the wrapper only
//! forwards).
//!
//! Why by hand: `axum::serve` does not expose hyper's header read timeout, and
//! hyper's own head limit (~400 KB) is far above what a chat handshake needs; a
//! few lines here keep axum's server (graceful shutdown, upgrades) as it is. The
//! scanner is tested with every split of its input.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Largest first request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
    Content-Type: text/plain\r\nContent-Length: 37\r\nConnection: close\r\n\r\n\
    request head over 16 KiB: refused\r\n\r\n";

/// Where the search for the head's end stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Scan {
    /// Bytes of the head seen so far.
    seen: usize,
    /// How much of "\r\n\r\n" the last bytes matched.
    matched: u8,
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Still reading the head.
    Partial,
    /// The head ended (this many of the given bytes belong to it).
    Complete,
    TooLarge,
}

impl Scan {
    fn feed(&mut self, bytes: &[u8]) -> Head {
        for &b in bytes {
            self.seen += 1;
            self.matched = match (self.matched, b) {
                (0 | 2, b'\r') => self.matched + 1,
                (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                return Head::Complete;
            }
            if self.seen > MAX_HEAD {
                return Head::TooLarge;
            }
        }
        Head::Partial
    }
}

struct Guard {
    deadline: Pin<Box<Sleep>>,
    scan: Scan,
    /// Refusing: how much of the 431 answer is written.
    refusing: Option<usize>,
}

/// A connection whose first request head is guarded; see the module docs.
pub struct Guarded<T> {
    inner: T,
    guard: Option<Box<Guard>>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, timeout: Duration) -> Guarded<T> {
        Guarded {
            inner,
            guard: Some(Box::new(Guard {
                deadline: Box::pin(tokio::time::sleep(timeout)),
                scan: Scan::default(),
                refusing: None,
            })),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The connection itself (after the head, the wrapper only forwards).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(guard) = this.guard.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if let Some(written) = guard.refusing {
            // Answer 431, then end the stream: hyper sees the client gone.
            let mut written = written;
            while written < TOO_LARGE.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &TOO_LARGE[written..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Pending => {
                        guard.refusing = Some(written);
                        return Poll::Pending;
                    }
                }
            }
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
            guard.refusing = Some(TOO_LARGE.len());
            return Poll::Ready(Ok(()));
        }
        if guard.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within --handshake-timeout",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        match guard.scan.feed(&buf.filled()[before..]) {
            Head::Partial => {}
            Head::Complete => this.guard = None,
            Head::TooLarge => {
                // Nothing of this head reaches hyper.
                buf.set_filled(before);
                guard.refusing = Some(0);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";

    #[test]
    fn the_end_of_a_head_is_found_at_every_split() {
        for split in 0..=HEAD.len() {
            let mut s = Scan::default();
            let first = s.feed(&HEAD[..split]);
            let outcome = if first == Head::Complete {
                first
            } else {
                s.feed(&HEAD[split..])
            };
            assert_eq!(outcome, Head::Complete, "split at {split}");
        }
    }

    #[test]
    fn a_lone_crlf_or_a_cr_run_does_not_end_the_head() {
        let mut s = Scan::default();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\n\r\r\n"), Head::Partial);
        assert_eq!(
            s.feed(b"\r\n"),
            Head::Complete,
            "\\r\\n\\r\\n after a stray \\r"
        );
    }

    #[test]
    fn a_head_over_the_limit_is_too_large_and_one_at_it_is_not() {
        let mut at = Scan::default();
        let mut head = vec![b'a'; MAX_HEAD - 4];
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(at.feed(&head), Head::Complete);
        let mut over = Scan::default();
        assert_eq!(over.feed(&vec![b'a'; MAX_HEAD + 1]), Head::TooLarge);
    }
}
