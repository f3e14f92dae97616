//! The load generator's side of a connection: connecting from several source
//! addresses, saying hello and joining, and reading the benchmark marker out of
//! frames without parsing JSON.
//!
//! Owns: client sockets and the marker format. Must not: keep per-message state
//! beyond what the caller asks for; the generator shares the cores with the server.

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use memchr::memmem;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The marker a benchmark message's text starts with: `bm:<sender>:<n>:<sent_ns>`.
pub const MARKER: &str = "bm:";

/// Source addresses 127.0.0.1 .. 127.0.0.8: each has its own ephemeral port range,
/// so more than ~28,000 connections to one server port are possible.
pub fn source_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 8) as u8))
}

/// Raise this process's open-file limit as far as allowed; returns the limit.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
    }
}

/// Where to connect: host:port and the path of the WebSocket endpoint.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub url: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .context("the URL must start with ws:// (TLS is not benchmarked)")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)?
            .next()
            .context("cannot resolve the host")?;
        Ok(Target {
            addr,
            url: url.to_string(),
        })
    }
}

/// One client connection with its own minimal WebSocket framing: a generator that
/// goes through a general WebSocket library spends more CPU per frame than the
/// server under test (measured: ~16 µs per frame with tokio-tungstenite here, which
/// zero-fills its read buffer on every read), and would measure itself.
pub struct Conn {
    pub read: OwnedReadHalf,
    pub write: OwnedWriteHalf,
    /// Bytes read but not yet parsed into frames.
    pub buf: BytesMut,
}

/// Open connection `i` (source address chosen by `i`) and upgrade it.
pub async fn connect(target: &Target, i: usize) -> anyhow::Result<Conn> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source_addr(i), 0))?;
    let mut tcp = sock.connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let path = target
        .url
        .splitn(4, '/')
        .nth(3)
        .map_or("/".to_string(), |p| format!("/{p}"));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.addr
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            bail!("closed during the handshake");
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                bail!(
                    "handshake refused: {}",
                    String::from_utf8_lossy(&buf[..end])
                );
            }
            buf.advance(end + 4);
            break;
        }
    }
    let (read, write) = tcp.into_split();
    Ok(Conn { read, write, buf })
}

/// Write one masked text frame (clients must mask).
pub async fn send_text(w: &mut OwnedWriteHalf, text: &str) -> anyhow::Result<()> {
    send_frame(w, 0x1, text.as_bytes()).await
}

/// Write one masked frame with `opcode` (0x1 text, 0xA pong).
pub async fn send_frame(w: &mut OwnedWriteHalf, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    // A fixed mask is as valid as a random one for a load generator on loopback.
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    w.write_all(&out).await?;
    Ok(())
}

/// A server frame: opcode and payload range in the buffer.
pub enum Frame {
    Text(std::ops::Range<usize>),
    Ping(std::ops::Range<usize>),
    Close,
    Other,
}

/// Parse the next complete (unmasked, unfragmented) server frame at the start of `buf`.
pub fn next_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if buf.len() < pos + len {
        return None;
    }
    let range = pos..pos + len;
    let frame = match opcode {
        0x1 => Frame::Text(range),
        0x9 => Frame::Ping(range),
        0x8 => Frame::Close,
        _ => Frame::Other,
    };
    Some((frame, pos + len))
}

/// Read until at least one more frame may be parsed; false at EOF.
pub async fn fill(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    matches!(read.read_buf(buf).await, Ok(n) if n > 0)
}

/// Say hello as `name` (asking for batches when `batch`), join `room`, and wait for
/// both replies.
pub async fn hello_and_join(
    c: &mut Conn,
    name: &str,
    room: &str,
    batch: bool,
) -> anyhow::Result<()> {
    send_text(
        &mut c.write,
        &format!(r#"{{"type":"hello","id":1,"name":"{name}","batch":{batch}}}"#),
    )
    .await?;
    send_text(
        &mut c.write,
        &format!(r#"{{"type":"join","id":2,"room":"{room}","history":0}}"#),
    )
    .await?;
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen < 2 {
        while let Some((frame, used)) = next_frame(&c.buf) {
            if let Frame::Text(r) = frame {
                let text = String::from_utf8_lossy(&c.buf[r]).to_string();
                for line in text.split('\n') {
                    if line.contains(r#""type":"welcome""#) || line.contains(r#""type":"joined""#) {
                        seen += 1;
                    } else if line.contains(r#""type":"error""#) {
                        bail!("server refused: {line}");
                    }
                }
            }
            c.buf.advance(used);
        }
        if seen >= 2 {
            break;
        }
        let more = tokio::time::timeout_at(deadline, fill(&mut c.read, &mut c.buf))
            .await
            .context("no welcome/joined within 30 s")?;
        if !more {
            bail!("closed during hello/join");
        }
    }
    Ok(())
}

/// A benchmark message seen in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    pub sender: u32,
    pub n: u64,
    pub sent_ns: u64,
}

/// Find every marker in a (possibly batched) frame, by scanning its bytes for the
/// marker text rather than parsing JSON: the generator must stay cheap. (With
/// `str::find`, `splitn` and UTF-8 validation this was half the generator's CPU
/// in a batched run of 6,000 msg/s to 1,000 members, where the generator took
/// 1.34 of the two cores: it, not the server, decided the highest passing rate.)
pub fn scan(frame: &[u8], mut each: impl FnMut(Marked)) {
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(MARKER));
    let mut at = 0;
    while let Some(i) = FINDER.find(&frame[at..]) {
        at += i + MARKER.len();
        let Some((sender, rest)) = field(&frame[at..]) else {
            continue;
        };
        let Some((n, rest)) = field(rest) else {
            continue;
        };
        let Some((sent_ns, _)) = number(rest) else {
            continue;
        };
        let Ok(sender) = u32::try_from(sender) else {
            continue;
        };
        each(Marked { sender, n, sent_ns });
    }
}

/// A marker's field: the number `s` starts with, when a `:` follows it, and what
/// follows the `:`.
fn field(s: &[u8]) -> Option<(u64, &[u8])> {
    let (value, len) = number(s)?;
    (s.get(len) == Some(&b':')).then(|| (value, &s[len + 1..]))
}

/// The decimal number `s` starts with and its length in digits: None when `s`
/// does not start with a digit or the number does not fit a u64.
///
/// One pass, and no overflow check for the first 19 digits (10^19 - 1 fits a
/// u64): a checked multiply per digit made each digit wait for the last one's
/// overflow test, and with a separate pass to count the digits, this was most of
/// [`scan`]'s cost, itself 30 % of the generator's CPU in a batched run of 10,000
/// msg/s to 1,000 members (perf, 2026-12-05); in one pass the generator's user
/// time in that run went from 5.5-5.9 s to 4.4 s.
fn number(s: &[u8]) -> Option<(u64, usize)> {
    const SAFE: usize = 19;
    let mut value = 0u64;
    let mut len = 0;
    for &b in s.iter().take(SAFE) {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        value = value * 10 + u64::from(d);
        len += 1;
    }
    if len == SAFE {
        // A 20th digit may still fit; a 21st never does.
        while let Some(d) = s.get(len).filter(|b| b.is_ascii_digit()) {
            value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            len += 1;
        }
    }
    (len > 0).then_some((value, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_every_marker_in_a_batched_frame() {
        let frame = concat!(
            r#"{"type":"message","room":"r","seq":1,"text":"bm:3:17:123456"}"#,
            "\n",
            r#"{"type":"ack","id":5}"#,
            "\n",
            r#"{"type":"message","room":"r","seq":2,"text":"bm:4:1:999:pad"}"#
        );
        let mut got = Vec::new();
        scan(frame.as_bytes(), |m| got.push(m));
        assert_eq!(
            got,
            vec![
                Marked {
                    sender: 3,
                    n: 17,
                    sent_ns: 123456
                },
                Marked {
                    sender: 4,
                    n: 1,
                    sent_ns: 999
                }
            ]
        );
    }

    #[test]
    fn scan_ignores_text_that_only_looks_like_a_marker() {
        let mut n = 0;
        scan(br#"{"text":"bm:x:y:z and bm:"}"#, |_| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn scan_skips_a_marker_cut_short_or_overflowing_and_finds_the_next() {
        let mut got = Vec::new();
        let frame = br#"bm:1:2 bm:4294967296:1:5 bm:1:99999999999999999999:5 bm:7:8:9"#;
        scan(frame, |m| got.push(m));
        assert_eq!(
            got,
            vec![Marked {
                sender: 7,
                n: 8,
                sent_ns: 9
            }]
        );
    }

    #[test]
    fn number_reads_every_u64_up_to_the_largest_and_nothing_beyond() {
        assert_eq!(
            number(b"9999999999999999999:"),
            Some((9_999_999_999_999_999_999, 19))
        );
        assert_eq!(number(b"18446744073709551615:"), Some((u64::MAX, 20)));
        assert_eq!(number(b"18446744073709551616:"), None);
        assert_eq!(number(b"100000000000000000000"), None);
        assert_eq!(number(b"0"), Some((0, 1)));
        assert_eq!(number(b":1"), None);
    }

    proptest::proptest! {
        /// Any u64 written in decimal reads back as itself, with its length.
        #[test]
        fn number_reads_back_any_u64(v in proptest::prelude::any::<u64>(), tail in "[:a-z]{0,2}") {
            let text = format!("{v}{tail}");
            proptest::prop_assert_eq!(number(text.as_bytes()), Some((v, v.to_string().len())));
        }

        /// Markers between text that holds none (and ends no number) are found,
        /// every one, in order, with their numbers.
        #[test]
        fn scan_finds_exactly_the_markers_between_any_other_text(
            parts in proptest::collection::vec(
                (any_marker(), "[a-z{}\\[\\]\",: ]{0,20}"), 0..8)
        ) {
            let mut frame = String::new();
            for ((sender, n, t), junk) in &parts {
                frame.push_str(&format!("bm:{sender}:{n}:{t}\""));
                frame.push_str(junk);
            }
            let mut got = Vec::new();
            scan(frame.as_bytes(), |m| got.push((m.sender, m.n, m.sent_ns)));
            let want: Vec<_> = parts.iter().map(|(m, _)| *m).collect();
            proptest::prop_assert_eq!(got, want);
        }

        /// Any bytes at all: no panic.
        #[test]
        fn scan_takes_any_bytes(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            scan(&frame, |_| {});
        }
    }

    fn any_marker() -> impl proptest::strategy::Strategy<Value = (u32, u64, u64)> {
        use proptest::prelude::any;
        (any::<u32>(), any::<u64>(), any::<u64>())
    }
}
