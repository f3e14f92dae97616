//! RFC 6455 on the server side: the opening handshake's checks and answer, client
//! frames in, server frames out.
//!
//! Owns: validating the upgrade request and deriving `Sec-WebSocket-Accept`;
//! parsing client frames (masking, reserved bits, opcodes, fragmentation, control
//! frames, the close frame's code and reason, UTF-8 of text messages, the message
//! size cap) and writing server frames, from the session or, into a plain TCP
//! socket the session shares ([`SharedTcp`]), from a writer thread. Must not:
//! know the chat protocol (it moves text messages and control frames, nothing
//! else) or decide when to close (it reports what the peer did wrong with the RFC
//! close code to use; the session decides).
//!
//! Written by hand rather than with tungstenite because per-connection memory and
//! per-delivery CPU are where Hubbub competes. tungstenite keeps a read buffer and a
//! write buffer for the whole life of every connection (the read buffer zero-filled
//! before each read) and copies every outgoing frame into its write buffer. Here:
//! - an idle connection holds no buffer at all: bytes are read into a stack buffer,
//!   and only a frame that arrives in pieces (or a read that holds more than one
//!   message) is kept, in a buffer freed as soon as it is parsed;
//! - an outgoing text frame is a 2–10-byte header plus the payload [`Text`] that
//!   every receiver shares (encoded once by the hub), and a room's run of messages
//!   is framed once into a [`Wire`] that every receiver shares whole; a
//!   connection's queued entries leave in one vectored write (`writev`) of up to
//!   [`MAX_FRAMES_PER_WRITE`] entries, copying nothing, except that a writer
//!   thread's write of at most [`SEND_COPY`] bytes is copied on its stack and
//!   leaves with one `send`.

use crate::protocol::close;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use sha1::{Digest, Sha1};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Queue entries handed to one `writev` at most (two slices each: header and
/// payload; one for a run in wire form).
pub const MAX_FRAMES_PER_WRITE: usize = 64;
/// Queues this short are written from a small slice array (see `poll_write`).
const SMALL_WRITE: usize = 4;
/// A direct write of at most this many bytes in several slices is copied into
/// one buffer on the stack and sent with one `send` rather than a `writev`
/// ([`SharedTcp::try_write_bytes`] says why).
const SEND_COPY: usize = 1024;
/// Bytes read per read call. On the stack of the reading poll, not per connection.
const READ_CHUNK: usize = 4096;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// UTF-8 text, encoded once and shared by every connection it is sent to (cloning
/// is a reference count). Only built from `String`/`&'static str`, so it is
/// always valid UTF-8, which is what a text frame must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    /// The same bytes in memory (one allocation shared), not only equal bytes.
    fn is_the_same_as(&self, other: &Text) -> bool {
        self.0.as_ptr() == other.0.as_ptr() && self.0.len() == other.0.len()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s))
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text(Bytes::from_static(s.as_bytes()))
    }
}

/// Complete server text frames (headers and payloads) laid end to end, built once
/// for a run of messages and shared by every receiver that takes them frame by
/// frame: queueing a run for one more receiver is one reference count, and
/// writing it one slice, whatever the run's length. (Queued as separate texts, a
/// run of k messages cost each receiver k reference counts, taken on the fan-out's
/// core and dropped on a writer's, and 2k slices: measured as a tenth of the
/// server's CPU in one room of 1,000, BENCHMARKS.md.)
///
/// Behind one `Arc`, so that an outbox entry ([`Out`]) stays the size of a
/// [`Text`]: with the bytes and the count inline it was 40 bytes against 32,
/// and the queues of a join storm (every member's `member` events) grew with
/// it: 2,018-2,020 B of server memory per idle connection in 100 rooms of 190
/// against 1,928-1,937 B before (BENCHMARKS.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire(Arc<WireRun>);

#[derive(Debug, PartialEq, Eq)]
struct WireRun {
    bytes: Bytes,
    frames: u32,
}

impl Wire {
    /// `texts` as text frames, one after another.
    pub fn frames(texts: &[Text]) -> Wire {
        let len = texts.iter().map(text_frame_len).sum();
        let mut bytes = Vec::with_capacity(len);
        for t in texts {
            let (head, head_len) = frame_head(OP_TEXT, t.len());
            bytes.extend_from_slice(&head[..usize::from(head_len)]);
            bytes.extend_from_slice(&t.0);
        }
        Wire(Arc::new(WireRun {
            bytes: Bytes::from(bytes),
            frames: u32::try_from(texts.len()).unwrap_or(u32::MAX),
        }))
    }

    /// The text frames it holds.
    pub fn count(&self) -> usize {
        self.0.frames as usize
    }

    /// The frames' bytes, headers included.
    fn bytes(&self) -> &Bytes {
        &self.0.bytes
    }
}

/// One entry of a connection's outgoing queue: a text frame's payload, or a run
/// of frames already in their wire form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Text(Text),
    Wire(Wire),
}

impl Out {
    /// The bytes it takes on the wire, headers included.
    pub fn wire_len(&self) -> usize {
        match self {
            Out::Text(t) => text_frame_len(t),
            Out::Wire(w) => w.bytes().len(),
        }
    }

    /// The text frames it holds.
    pub fn count(&self) -> usize {
        match self {
            Out::Text(_) => 1,
            Out::Wire(w) => w.count(),
        }
    }

    /// Its header (none for a run already in wire form) and the bytes after it.
    fn parts(&self) -> (Head, &[u8]) {
        match self {
            Out::Text(t) => (frame_head(OP_TEXT, t.len()), &t.0[..]),
            Out::Wire(w) => (([0; 10], 0), &w.bytes()[..]),
        }
    }
}

#[cfg(test)]
impl Out {
    /// The payloads of the text frames it holds (for tests): a wire-form run is
    /// read back frame by frame, each header checked.
    pub fn payloads(&self) -> Vec<String> {
        let bytes: &[u8] = match self {
            Out::Text(t) => return vec![String::from_utf8(t.0.to_vec()).expect("utf-8")],
            Out::Wire(w) => w.bytes(),
        };
        let out: Vec<String> = server_frames(bytes)
            .into_iter()
            .map(|(first, payload)| {
                assert_eq!(first, 0x80 | OP_TEXT, "a final text frame");
                String::from_utf8(payload).expect("utf-8")
            })
            .collect();
        assert_eq!(out.len(), self.count(), "the count matches the frames");
        out
    }
}

/// Server frames (unmasked, whole) read back from their bytes, for tests: each
/// frame's first byte (FIN and opcode) and payload. Panics on a masked or cut
/// frame: what the server writes is neither.
#[cfg(test)]
pub fn server_frames(mut rest: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        assert_eq!(rest[1] & 0x80, 0, "server frames are unmasked");
        let (len, head) = match rest[1] {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&rest[2..10]);
                (usize::try_from(u64::from_be_bytes(l)).expect("fits"), 10)
            }
            n => (usize::from(n), 2),
        };
        out.push((rest[0], rest[head..head + len].to_vec()));
        rest = &rest[head + len..];
    }
    out
}

impl From<Text> for Out {
    fn from(t: Text) -> Self {
        Out::Text(t)
    }
}

/// Largest batched frame (`batch: true`) we build.
pub const MAX_BATCH_FRAME: usize = 64 * 1024;

/// The one rule of a batched frame, wherever one is built: a text of `next`
/// bytes joins a frame that holds `texts` texts in `joined` bytes when a newline
/// and it still fit [`MAX_BATCH_FRAME`]; a frame's first text always does (one
/// text larger than that leaves as a frame of its own).
pub fn joins_batch(texts: usize, joined: usize, next: usize) -> bool {
    texts == 0 || joined + 1 + next <= MAX_BATCH_FRAME
}

/// Texts joined into one, newline-separated (a `batch: true` frame). Still valid
/// UTF-8: a concatenation of valid UTF-8 and `\n`.
#[derive(Default)]
pub struct Lines(Vec<u8>);

impl Lines {
    /// `texts` as one batched frame, or None if it would exceed
    /// [`MAX_BATCH_FRAME`].
    pub fn joined(texts: &[Text]) -> Option<Text> {
        let len = texts.iter().map(|t| t.len() + 1).sum::<usize>();
        if len > MAX_BATCH_FRAME + 1 {
            return None;
        }
        let mut lines = Lines(Vec::with_capacity(len));
        for t in texts {
            lines.push(t);
        }
        Some(lines.into_text())
    }

    pub fn push(&mut self, t: &Text) {
        if !self.0.is_empty() {
            self.0.push(b'\n');
        }
        self.0.extend_from_slice(&t.0);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn into_text(self) -> Text {
        Text(Bytes::from(self.0))
    }
}

/// How many texts at the front of `queue` fit one batched frame, and the
/// payload they make joined.
fn batch_fit(queue: &VecDeque<Out>) -> (usize, usize) {
    let mut payload = 0;
    let mut n = 0;
    for entry in queue {
        let Out::Text(t) = entry else { break };
        if !joins_batch(n, payload, t.len()) {
            break;
        }
        payload += t.len() + usize::from(n > 0);
        n += 1;
    }
    (n, payload)
}

/// The first `n` texts of `queue` (a `payload` of bytes joined, [`batch_fit`])
/// framed as one text frame into `buf`, which is empty.
///
/// For a writer thread's direct write to a batching connection: one contiguous
/// buffer instead of two slices per queued text. Measured on this machine (a
/// loopback TCP socket, a reader draining it): 250 frames of 170 bytes cost 22.5 µs
/// of CPU as one `writev` of 500 slices and 12.5-13.3 µs copied into one buffer
/// and written with one `write`, the copy included; 50 frames 8.5-9.0 against
/// 5.9-6.1 µs. The kernel's per-slice cost is what the copy saves, and the client
/// reads one frame instead of 250.
fn frame_front(queue: &VecDeque<Out>, n: usize, payload: usize, buf: &mut Vec<u8>) {
    let (head, head_len) = frame_head(OP_TEXT, payload);
    buf.reserve(usize::from(head_len) + payload);
    buf.extend_from_slice(&head[..usize::from(head_len)]);
    for (i, entry) in queue.iter().take(n).enumerate() {
        if let Out::Text(t) = entry {
            if i > 0 {
                buf.push(b'\n');
            }
            buf.extend_from_slice(&t.0);
        }
    }
}

/// A writer thread's joined frame: the texts at the front of a queue that fit
/// one batched frame (newline-joined, a payload of at most [`MAX_BATCH_FRAME`]),
/// framed once ([`frame_front`]) and kept for the next queue that starts with
/// the same texts.
///
/// Why: a room's fan-out queues the same shared text (one allocation per group
/// commit) to every member that batches, and a writer thread writes a chunk of
/// those members one after another, so their queues usually start with the same
/// texts. The first member's frame is built; the others' writes are that frame
/// again, with no copy: at 1,000 in one room and 10,000 msg/s batched, copying a
/// frame per member was 5.7 % of the server's CPU (`memmove`, perf). Which texts
/// are the same is told by address and length, which is sound only because the
/// joiner holds them: while it does, no other text can take their place at that
/// address (and a text never changes).
pub struct Joiner {
    frame: Vec<u8>,
    /// The texts `frame` joins (none while it is empty), held.
    texts: Vec<Text>,
    /// Frames built (not reused), for tests.
    builds: u64,
}

impl Joiner {
    pub const fn new() -> Joiner {
        Joiner {
            frame: Vec::new(),
            texts: Vec::new(),
            builds: 0,
        }
    }

    /// Join the front of `queue` into [`frame`](Self::frame): how many texts the
    /// frame holds (below 2: none, and the frame is not to be written: the caller
    /// writes the queue as it is). The frame last built is reused when those texts are the ones it
    /// joins.
    pub fn join(&mut self, queue: &VecDeque<Out>) -> usize {
        let (n, payload) = batch_fit(queue);
        if n < 2 {
            return 0;
        }
        let same = n == self.texts.len()
            && queue
                .iter()
                .zip(&self.texts)
                .all(|(e, held)| matches!(e, Out::Text(t) if t.is_the_same_as(held)));
        if !same {
            self.frame.clear();
            self.texts.clear();
            frame_front(queue, n, payload, &mut self.frame);
            self.texts
                .extend(queue.iter().take(n).filter_map(|e| match e {
                    Out::Text(t) => Some(t.clone()),
                    Out::Wire(_) => None,
                }));
            self.builds += 1;
        }
        n
    }

    /// The frame of the last [`join`](Self::join) that returned 2 or more.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }
}

impl Default for Joiner {
    fn default() -> Self {
        Joiner::new()
    }
}

/// The text of a frame [`Joiner`] built, as one queue entry (for a write cut
/// short: the session finishes it as it is).
pub fn joined_text(frame: &[u8]) -> Text {
    let head_len = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    Text(Bytes::copy_from_slice(
        frame.get(head_len..).unwrap_or_default(),
    ))
}

/// Why an upgrade request is refused, with the HTTP status that says so.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("a WebSocket handshake must be a GET request")]
    MethodNotGet,
    #[error("the Connection header must include \"upgrade\"")]
    ConnectionHeader,
    #[error("the Upgrade header must be \"websocket\"")]
    UpgradeHeader,
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    #[error("Sec-WebSocket-Key is missing or not 16 bytes in base64")]
    Key,
}

impl HandshakeError {
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            // RFC 6455 §4.2.2: an unsupported version gets 426 and the versions we speak.
            HandshakeError::Version => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Check an upgrade request (RFC 6455 §4.2.1) and return the `Sec-WebSocket-Accept`
/// value to answer it with.
pub fn accept(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::MethodNotGet);
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::ConnectionHeader);
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(HandshakeError::UpgradeHeader);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(HandshakeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::Key)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| HandshakeError::Key)?;
    if decoded.len() != 16 {
        return Err(HandshakeError::Key);
    }
    Ok(accept_key(key.as_bytes()))
}

/// base64(SHA-1(key + the RFC's GUID)).
fn accept_key(key: &[u8]) -> HeaderValue {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let encoded = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    // base64 is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// What the peer did wrong, or that it is gone.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the TCP connection")]
    Eof,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("a text message or close reason is not valid UTF-8")]
    Utf8,
    #[error("message larger than {0} bytes")]
    TooBig(usize),
}

impl WsError {
    /// The close code (RFC 6455 §7.4.1) and reason to answer with; `None` when the
    /// connection is simply gone.
    pub fn close(&self) -> Option<(u16, &'static str)> {
        match *self {
            WsError::Io(_) | WsError::Eof => None,
            WsError::Protocol(why) => Some((close::PROTOCOL_ERROR, why)),
            WsError::Utf8 => Some((close::INVALID_UTF8, "invalid UTF-8")),
            WsError::TooBig(_) => Some((close::TOO_BIG, "message too big")),
        }
    }

    /// Just the code of [`close`](Self::close) (what the tests compare).
    #[cfg(test)]
    fn close_code(&self) -> Option<u16> {
        self.close().map(|(code, _)| code)
    }
}

/// A plain TCP socket shared by its session and, while the session is parked, the
/// fan-out's writer threads ([`crate::hub::writers`]), which write a connection's
/// queued frames straight into it instead of waking its session. Reading stays the
/// session's alone; who may write is decided under the connection's outbox lock
/// (see [`crate::hub::Outbox::park`]), so the two never write at the same time.
/// Both sides hold the socket by reference count, so a writer can never write to a
/// closed (or reused) descriptor.
#[derive(Clone, Debug)]
pub struct SharedTcp(Arc<tokio::net::TcpStream>);

impl SharedTcp {
    pub fn new(tcp: tokio::net::TcpStream) -> Self {
        SharedTcp(Arc::new(tcp))
    }

    /// Write `frames` (the first `sent` bytes of the first one already written)
    /// with one non-blocking vectored write, without waiting and from any thread;
    /// returns the bytes written. `WouldBlock` when the socket is full.
    pub fn try_write_texts(&self, frames: &VecDeque<Out>, sent: usize) -> io::Result<usize> {
        // A fan-out's write usually carries one entry: a small array for that.
        if frames.len() <= SMALL_WRITE {
            self.try_write_some::<SMALL_WRITE, { 2 * SMALL_WRITE }>(frames, sent)
        } else {
            self.try_write_some::<MAX_FRAMES_PER_WRITE, { 2 * MAX_FRAMES_PER_WRITE }>(frames, sent)
        }
    }

    fn try_write_some<const N: usize, const SLICES: usize>(
        &self,
        frames: &VecDeque<Out>,
        sent: usize,
    ) -> io::Result<usize> {
        let parts: [(Head, &[u8]); N] =
            std::array::from_fn(|i| frames.get(i).map_or((([0; 10], 0), &[][..]), Out::parts));
        let mut slices = [IoSlice::new(&[]); SLICES];
        let n = frame_slices(
            parts
                .iter()
                .take(frames.len())
                .map(|((h, hl), body)| (&h[..usize::from(*hl)], *body)),
            sent,
            &mut slices,
        );
        let slices = &slices[..n];
        if let [one] = slices {
            return self.try_write_bytes(one);
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total <= SEND_COPY {
            // A fan-out's usual write: one small frame's header and payload,
            // copied together (a few hundred bytes) to leave with one `send`.
            let mut buf = [0u8; SEND_COPY];
            let mut at = 0;
            for s in slices {
                buf[at..at + s.len()].copy_from_slice(s);
                at += s.len();
            }
            return self.try_write_bytes(&buf[..at]);
        }
        // Straight to the system call, not through tokio's `try_write_vectored`:
        // that first reads the socket's readiness from tokio's own per-socket
        // state (a cache miss per delivery, ~2 % of the server's time in the
        // profile), which a non-blocking write does not need. A `WouldBlock` here
        // leaves tokio believing the socket writable; the session's next write
        // meets the full socket itself and then waits for it, as it should.
        match rustix::io::writev(&*self.0, slices) {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        }
    }

    /// Write `bytes` with one non-blocking `send`, from any thread; returns the
    /// bytes written. `WouldBlock` when the socket is full. (Straight to the
    /// system call, as [`try_write_texts`](Self::try_write_texts).)
    ///
    /// `send`, not `write`: the socket call skips the file layer (`vfs_writev`
    /// with its iovec import and `sock_write_iter`: 10 % of the server's samples
    /// in a room of 5,000 at 20 messages/s, where every delivery is one small
    /// write). With it, and small frames copied to leave this way, the server's
    /// CPU per delivery there fell 13 % batched (4.50 / 4.35 -> 3.83 / 3.82 µs)
    /// and 6 % plain (4.52 / 4.63 -> 4.35 / 4.15 µs; perf and
    /// `scripts/bench-commit-ab`, 2026-12-05).
    pub fn try_write_bytes(&self, bytes: &[u8]) -> io::Result<usize> {
        use rustix::net::SendFlags;
        match rustix::net::send(&*self.0, bytes, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        }
    }

    /// A connected pair over loopback, this side the server's (for tests).
    #[cfg(test)]
    pub async fn loopback_pair() -> (SharedTcp, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        (SharedTcp::new(server), client)
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // SAFETY: the slice is only written by the kernel's read, and exactly
            // the bytes it reports are then marked initialized and filled (what
            // tokio's own `TcpStream::poll_read` does; it has no `&self` form).
            let unfilled = unsafe { buf.unfilled_mut() };
            let mut dst: &mut [MaybeUninit<u8>] = unfilled;
            match self.0.try_read_buf(&mut dst) {
                Ok(n) => {
                    // SAFETY: `try_read_buf` initialized the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A stale readiness: `try_read_buf` cleared it; wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Nothing to do: the session ends a connection with a close frame and then
    /// drops the socket (the last reference closes it).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A frame header's bytes and how many of them are used.
type Head = ([u8; 10], u8);

/// A server frame's header (FIN set, unmasked) for a payload of `len` bytes, and
/// its length. The one place a header is built, so a frame cut short by one writer
/// is finished byte for byte by another.
fn frame_head(opcode: u8, len: usize) -> Head {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode; // FIN: we never fragment
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if let Ok(len16) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&len16.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

/// The bytes `text` takes on the wire as a text frame, header included.
fn text_frame_len(text: &Text) -> usize {
    usize::from(frame_head(OP_TEXT, text.len()).1) + text.len()
}

/// Fill `slices` with header and payload of as many frames as fit (two slices
/// each), skipping the first `skip` bytes (of the first frame, already written);
/// returns how many slices were filled.
fn frame_slices<'a>(
    frames: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    mut skip: usize,
    slices: &mut [IoSlice<'a>],
) -> usize {
    let mut n = 0;
    for (head, body) in frames.take(slices.len() / 2) {
        if skip < head.len() {
            slices[n] = IoSlice::new(&head[skip..]);
            slices[n + 1] = IoSlice::new(body);
            n += 2;
        } else {
            slices[n] = IoSlice::new(&body[skip - head.len()..]);
            n += 1;
        }
        skip = 0;
    }
    n
}

/// A complete message or control frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    /// The peer's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// A server frame waiting to be written: header and (shared) payload.
struct OutFrame {
    head: [u8; 10],
    head_len: u8,
    body: Bytes,
}

impl OutFrame {
    fn new(opcode: u8, body: Bytes) -> Self {
        let (head, head_len) = frame_head(opcode, body.len());
        OutFrame {
            head,
            head_len,
            body,
        }
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }
}

/// One WebSocket connection after the handshake.
pub struct WsStream<S> {
    io: S,
    /// Bytes of frames not yet complete. Empty (no allocation) between messages.
    rbuf: Vec<u8>,
    /// A fragmented message being assembled: its opcode and payload so far.
    partial: Option<(u8, Vec<u8>)>,
    max_message: usize,
    /// Frames queued for writing. Its allocation is dropped once it drains.
    out: VecDeque<OutFrame>,
    /// Bytes of `out[0]` already written.
    written: usize,
    /// A write went out since the last flush.
    unflushed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    pub fn new(io: S, max_message: usize) -> Self {
        WsStream {
            io,
            rbuf: Vec::new(),
            partial: None,
            max_message,
            out: VecDeque::new(),
            written: 0,
            unflushed: false,
        }
    }

    /// Start reading with bytes that arrived before the stream was built (read
    /// along with the HTTP upgrade request: a client may send its first frame
    /// without waiting for the 101).
    pub fn with_read(mut self, already_read: &[u8]) -> Self {
        self.rbuf.extend_from_slice(already_read);
        self
    }

    /// Queue a text frame (written by the next [`next`](Self::next) or
    /// [`flush`](Self::flush)).
    pub fn push_text(&mut self, text: Text) {
        self.out.push_back(OutFrame::new(OP_TEXT, text.0));
    }

    /// Queue an outbox entry: a text frame, or frames already in wire form
    /// (written as they are).
    pub fn push_out(&mut self, out: Out) {
        match out {
            Out::Text(t) => self.push_text(t),
            Out::Wire(w) => self.out.push_back(OutFrame {
                head: [0; 10],
                head_len: 0,
                body: w.bytes().clone(),
            }),
        }
    }

    pub fn push_ping(&mut self) {
        self.out.push_back(OutFrame::new(OP_PING, Bytes::new()));
    }

    /// Queue a Pong. At most one waits at a time: a newer Ping's payload replaces
    /// the waiting one's (RFC 6455 §5.5.3 allows answering only the most recent), so a
    /// peer that pings without reading cannot grow the queue.
    pub fn push_pong(&mut self, payload: Bytes) {
        let frame = OutFrame::new(OP_PONG, payload);
        let first_untouched = usize::from(self.written > 0);
        if let Some(waiting) = self
            .out
            .iter_mut()
            .skip(first_untouched)
            .find(|f| f.head[0] & 0x0F == OP_PONG)
        {
            *waiting = frame;
        } else {
            self.out.push_back(frame);
        }
    }

    /// Room for `n` more frames, so a burst is queued with one allocation.
    pub fn reserve(&mut self, n: usize) {
        self.out.reserve(n);
    }

    /// Drop every queued frame except one already partly written (which must be
    /// finished, or the stream would be corrupt).
    pub fn discard_queued(&mut self) {
        let started = if self.written > 0 {
            self.out.pop_front()
        } else {
            None
        };
        self.out.clear();
        self.out.extend(started);
    }

    /// Queue a close frame; `None` sends one without a status code.
    pub fn push_close(&mut self, code: Option<u16>, reason: &str) {
        let body = match code {
            None => Bytes::new(),
            Some(code) => {
                let mut b = Vec::with_capacity(2 + reason.len().min(123));
                b.extend_from_slice(&code.to_be_bytes());
                // A control frame's payload is at most 125 bytes; cut on a char boundary.
                let mut cut = reason.len().min(123);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                b.extend_from_slice(&reason.as_bytes()[..cut]);
                Bytes::from(b)
            }
        };
        self.out.push_back(OutFrame::new(OP_CLOSE, body));
    }

    /// The transport (for the session to share a plain TCP socket with the fan-out).
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Nothing queued and nothing written since the last flush: another writer may
    /// use the socket now without interleaving with this one.
    pub fn is_idle(&self) -> bool {
        self.out.is_empty() && !self.unflushed
    }

    /// Queue an outbox entry whose first `written` bytes (header included) another
    /// writer already put on the wire; it must be the first queued.
    pub fn push_out_started(&mut self, out: Out, written: usize) {
        debug_assert!(self.out.is_empty());
        self.push_out(out);
        self.written = written;
    }

    /// Frames queued and not yet fully written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Write every queued frame and flush. Cancellation-safe: what was written stays
    /// written, the rest stays queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write(cx)).await
    }

    /// Write what is queued if the socket takes it now, without waiting and
    /// without asking to be woken: what does not fit stays queued for
    /// [`next`](Self::next), which waits for the socket. Saves a caller that has
    /// just queued frames a trip through its event loop only to write them.
    pub fn write_now(&mut self) -> io::Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_write(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    /// Write what is queued and read. Returns the next message from the peer, or
    /// `None` once everything queued has been written (so the caller can queue
    /// more). Both directions are tried on every poll, so a reader that keeps the
    /// queue full cannot starve reading, nor the other way round.
    /// Cancellation-safe: partial frames stay buffered in `self`.
    pub async fn next(&mut self) -> Result<Option<Incoming>, WsError> {
        poll_fn(|cx| {
            let mut drained = false;
            if !self.out.is_empty() || self.unflushed {
                match self.poll_write(cx) {
                    Poll::Ready(Ok(())) => drained = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(WsError::Io(e))),
                    Poll::Pending => {}
                }
            }
            match self.poll_read(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(Some)),
                Poll::Pending if drained => Poll::Ready(Ok(None)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            // At a few messages per second per connection a wake-up carries one or
            // two frames: those get a small slice array, so the per-delivery path
            // does not fill the 128 slices (2 KiB) of a full batch it will not use.
            let mut wrote = if self.out.len() <= SMALL_WRITE {
                ready!(self.poll_write_some::<{ 2 * SMALL_WRITE }>(cx))?
            } else {
                ready!(self.poll_write_some::<{ 2 * MAX_FRAMES_PER_WRITE }>(cx))?
            };
            self.unflushed = true;
            while wrote > 0 {
                let Some(front) = self.out.front() else { break };
                let left = front.len() - self.written;
                if wrote >= left {
                    wrote -= left;
                    self.written = 0;
                    self.out.pop_front();
                } else {
                    self.written += wrote;
                    wrote = 0;
                }
            }
        }
        if self.unflushed {
            // A no-op on TCP; TLS needs it to push its records out.
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        if self.out.capacity() > 0 {
            // Idle connections keep no queue allocation.
            self.out = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// One vectored write of the first `SLICES / 2` queued frames (the first one
    /// from where the last write stopped); returns the bytes written.
    fn poll_write_some<const SLICES: usize>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); SLICES];
        let n = frame_slices(
            self.out.iter().map(|f| (f.head(), &f.body[..])),
            self.written,
            &mut slices,
        );
        let wrote = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]))?;
        if wrote == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        Poll::Ready(Ok(wrote))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, WsError>> {
        loop {
            if let Some(msg) = self.parse()? {
                return Poll::Ready(Ok(msg));
            }
            // Uninitialized: this runs on every wake-up of the session (each delivery
            // polls the read side too), and zero-filling 4 KiB each time was 1.5 % of
            // the server's CPU at 100,000 deliveries/s. ReadBuf tracks what was written.
            let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(WsError::Eof));
            }
            self.rbuf.extend_from_slice(rb.filled());
        }
    }

    /// Take one complete message or control frame out of `rbuf`, if there is one.
    fn parse(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let Some(frame) = parse_header(&self.rbuf)? else {
                return Ok(None);
            };
            let data = frame.opcode < OP_CLOSE;
            if data {
                let so_far = self.partial.as_ref().map_or(0, |p| p.1.len());
                if frame.len.saturating_add(so_far as u64) > self.max_message as u64 {
                    return Err(WsError::TooBig(self.max_message));
                }
                match (frame.opcode, &self.partial) {
                    (OP_CONTINUATION, None) => {
                        return Err(WsError::Protocol("continuation frame without a message"));
                    }
                    (OP_TEXT | OP_BINARY, Some(_)) => {
                        return Err(WsError::Protocol(
                            "new message before the previous one's last fragment",
                        ));
                    }
                    _ => {}
                }
            }
            // Bounded above by max_message (data) or 125 (control), so it fits.
            let len = usize::try_from(frame.len).map_err(|_| WsError::TooBig(self.max_message))?;
            let total = frame.header_len + len;
            if self.rbuf.len() < total {
                self.rbuf.reserve(total - self.rbuf.len());
                return Ok(None);
            }
            let payload = &mut self.rbuf[frame.header_len..total];
            unmask(payload, frame.mask);
            let msg = match frame.opcode {
                OP_CLOSE => Some(parse_close(payload)?),
                OP_PING => Some(Incoming::Ping(Bytes::copy_from_slice(payload))),
                OP_PONG => Some(Incoming::Pong),
                op => match (&mut self.partial, frame.fin) {
                    (None, true) => Some(complete(op, payload.to_vec())?),
                    (None, false) => {
                        self.partial = Some((op, payload.to_vec()));
                        None
                    }
                    (Some((_, so_far)), _) => {
                        so_far.extend_from_slice(payload);
                        match self.partial.take() {
                            Some((op, all)) if frame.fin => Some(complete(op, all)?),
                            keep => {
                                self.partial = keep;
                                None
                            }
                        }
                    }
                },
            };
            self.rbuf.drain(..total);
            if self.rbuf.is_empty() {
                // Free it: an idle connection holds no read buffer.
                self.rbuf = Vec::new();
            }
            if msg.is_some() {
                return Ok(msg);
            }
        }
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
    header_len: usize,
}

/// Parse a client frame's header; `None` until all of it has arrived.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without an extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        l => (u64::from(l), 2),
    };
    if len >> 63 != 0 {
        return Err(WsError::Protocol("frame length with the top bit set"));
    }
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
        }
        _ => return Err(WsError::Protocol("unknown opcode")),
    }
    let Some(mask) = buf
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
    else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        len,
        mask,
        header_len: at + 4,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn complete(opcode: u8, payload: Vec<u8>) -> Result<Incoming, WsError> {
    if opcode == OP_TEXT {
        String::from_utf8(payload)
            .map(Incoming::Text)
            .map_err(|_| WsError::Utf8)
    } else {
        Ok(Incoming::Binary)
    }
}

/// A close frame's payload: nothing, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Incoming, WsError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(WsError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 §7.4: codes a peer may send (1004–1006 and 1015 are reserved).
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(WsError::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| WsError::Utf8)?;
            Ok(Incoming::Close(Some(code)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn a_direct_write_sends_its_frames_whole_and_in_order_copied_or_not() {
        // Two frames of `size` bytes: under SEND_COPY in all (copied into one
        // `send`), and over it (a `writev`); the first byte already written.
        for size in [10, SEND_COPY / 2 - 8, SEND_COPY] {
            let (tcp, mut client) = SharedTcp::loopback_pair().await;
            let frames: VecDeque<Out> = ["a", "b"]
                .into_iter()
                .map(|c| Out::from(Text::from(c.repeat(size))))
                .collect();
            let mut want: Vec<u8> = frames
                .iter()
                .flat_map(|f| {
                    let ((head, len), body) = f.parts();
                    [&head[..usize::from(len)], body].concat()
                })
                .collect();
            want.remove(0);
            let wrote = tcp.try_write_texts(&frames, 1).expect("written");
            assert_eq!(wrote, want.len(), "frames of {size} bytes");
            let mut got = vec![0; want.len()];
            client.read_exact(&mut got).await.expect("read");
            assert_eq!(got, want, "frames of {size} bytes");
        }
    }

    /// The joiner's rule without its memory, as the property tests' model: the
    /// front of `queue` that fits one batched frame, framed into `buf` (cleared
    /// first); how many texts it holds, and below 2 nothing (`buf` left empty).
    fn join_front(queue: &VecDeque<Out>, buf: &mut Vec<u8>) -> usize {
        buf.clear();
        let (n, payload) = batch_fit(queue);
        if n < 2 {
            return 0;
        }
        frame_front(queue, n, payload, buf);
        n
    }

    proptest::proptest! {
        /// `join_front` frames the longest run of leading texts whose joined
        /// payload fits 64 KiB (two at least, or nothing), as one final text frame
        /// that reads back as those texts, and `joined_text` recovers its payload.
        #[test]
        fn join_front_frames_the_longest_leading_run_that_fits(
            lens in proptest::collection::vec(0usize..40_000, 0..12),
            wire_at in proptest::option::of(0usize..12),
        ) {
            let mut queue: VecDeque<Out> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| Out::Text(Text::from(char::from(b'a' + (i % 26) as u8).to_string().repeat(n))))
                .collect();
            if let Some(at) = wire_at.filter(|&at| at < queue.len()) {
                queue[at] = Out::Wire(Wire::frames(&[Text::from("w")]));
            }
            let mut fit = 0;
            let mut payload = 0;
            for e in &queue {
                let Out::Text(t) = e else { break };
                let more = t.len() + usize::from(fit > 0);
                if payload + more > MAX_BATCH_FRAME {
                    break;
                }
                payload += more;
                fit += 1;
            }
            let mut buf = vec![1, 2, 3];
            let n = join_front(&queue, &mut buf);
            if fit < 2 {
                proptest::prop_assert_eq!(n, 0);
                proptest::prop_assert!(buf.is_empty());
            } else {
                proptest::prop_assert_eq!(n, fit);
                let frames = server_frames(&buf);
                proptest::prop_assert_eq!(frames.len(), 1);
                proptest::prop_assert_eq!(frames[0].0, 0x80 | OP_TEXT);
                let want: Vec<u8> = queue
                    .iter()
                    .take(n)
                    .map(|e| match e {
                        Out::Text(t) => t.as_bytes().to_vec(),
                        Out::Wire(_) => unreachable!("only texts are joined"),
                    })
                    .collect::<Vec<_>>()
                    .join(&b'\n');
                proptest::prop_assert_eq!(&frames[0].1, &want);
                let text = joined_text(&buf);
                proptest::prop_assert_eq!(text.as_bytes(), &want[..]);
            }
        }
    }

    proptest::proptest! {
        /// Whatever queues a writer thread meets one after another (windows of
        /// one pool of shared texts, some equal in bytes but apart in memory,
        /// others of the same length but other bytes, a frame in wire form among
        /// them), the joiner's frame is the one `join_front` builds for that queue.
        #[test]
        fn a_joiner_frames_every_queue_as_join_front_does(
            // Few lengths, so that texts of other bytes often share one; and
            // some long enough that not every queue fits one frame.
            lens in proptest::collection::vec(proptest::sample::select(vec![0usize, 1, 2, 25_000, 40_000]), 1..6),
            windows in proptest::collection::vec((0usize..12, 0usize..10, proptest::option::of(0usize..10)), 1..12),
        ) {
            // Texts come in pairs equal in bytes but apart in memory.
            let pool: Vec<Text> = (0..2 * lens.len())
                .map(|i| Text::from(char::from(b'a' + (i / 2 % 26) as u8).to_string().repeat(lens[i / 2])))
                .collect();
            let mut joiner = Joiner::new();
            let mut buf = Vec::new();
            for (start, len, wire_at) in windows {
                let start = start % pool.len();
                let mut queue: VecDeque<Out> =
                    pool[start..].iter().take(len).cloned().map(Out::Text).collect();
                if let Some(at) = wire_at.filter(|&at| at < queue.len()) {
                    queue[at] = Out::Wire(Wire::frames(&[Text::from("w")]));
                }
                let n = joiner.join(&queue);
                proptest::prop_assert_eq!(n, join_front(&queue, &mut buf));
                if n >= 2 {
                    proptest::prop_assert_eq!(joiner.frame(), &buf[..]);
                }
            }
        }
    }

    #[test]
    fn a_text_joins_a_batch_while_the_newline_and_it_fit_64_kib() {
        assert!(joins_batch(1, MAX_BATCH_FRAME - 2, 1), "exactly 64 KiB");
        assert!(!joins_batch(1, MAX_BATCH_FRAME - 1, 1), "one byte over");
        assert!(
            !joins_batch(3, 10, MAX_BATCH_FRAME),
            "a large one after others"
        );
    }

    #[test]
    fn a_frames_first_text_joins_it_whatever_its_size() {
        assert!(joins_batch(0, 0, MAX_BATCH_FRAME + 1));
    }

    fn queue_of(texts: &[&Text]) -> VecDeque<Out> {
        texts.iter().map(|&t| Out::Text(t.clone())).collect()
    }

    #[test]
    fn a_joiner_writes_its_frame_again_for_a_queue_of_the_same_texts() {
        let (a, b) = (Text::from("a"), Text::from("b"));
        let mut joiner = Joiner::new();
        assert_eq!(joiner.join(&queue_of(&[&a, &b])), 2);
        let first = joiner.frame().to_vec();
        assert_eq!(joiner.join(&queue_of(&[&a, &b])), 2);
        assert_eq!(joiner.frame(), &first[..]);
        assert_eq!(
            joiner.builds, 1,
            "the second queue's frame was not built again"
        );
    }

    #[test]
    fn a_joiner_builds_again_for_texts_equal_in_bytes_but_not_the_same() {
        // Made from Strings: a literal is one static, the same wherever it is used.
        let owned = |s: &str| Text::from(s.to_string());
        let mut joiner = Joiner::new();
        joiner.join(&queue_of(&[&owned("a"), &owned("b")]));
        assert_eq!(joiner.join(&queue_of(&[&owned("a"), &owned("b")])), 2);
        assert_eq!(joiner.frame(), b"\x81\x03a\nb");
        assert_eq!(joiner.builds, 2);
    }

    #[test]
    fn a_joiner_builds_again_when_more_of_the_queue_fits() {
        let (a, b, c) = (Text::from("a"), Text::from("b"), Text::from("c"));
        let mut joiner = Joiner::new();
        joiner.join(&queue_of(&[&a, &b]));
        assert_eq!(joiner.join(&queue_of(&[&a, &b, &c])), 3);
        assert_eq!(joiner.frame(), b"\x81\x05a\nb\nc");
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn a_message_split_over_many_reads_and_fragments_is_reassembled() {
        let (mut client, server) = duplex(64);
        let mut ws = WsStream::new(server, 1 << 20);
        let text = "é".repeat(40_000); // 80,000 bytes: 64-bit length, many reads
        let mut bytes = masked(0x01, &text.as_bytes()[..30_001]); // text, not FIN; splits a char
        bytes.extend(masked(0x89, b"mid")); // a ping between fragments
        bytes.extend(masked(0x80, &text.as_bytes()[30_001..])); // continuation, FIN
        let writer = tokio::spawn(async move { client.write_all(&bytes).await.map(|_| client) });
        assert_eq!(
            ws.next().await.unwrap(),
            Some(Incoming::Ping(Bytes::from_static(b"mid")))
        );
        assert_eq!(ws.next().await.unwrap(), Some(Incoming::Text(text)));
        assert_eq!(
            ws.rbuf.capacity(),
            0,
            "no read buffer kept between messages"
        );
        drop(writer.await);
    }

    #[tokio::test]
    async fn a_frame_over_the_size_cap_is_refused_from_its_header() {
        let (mut client, server) = duplex(1024);
        let mut ws = WsStream::new(server, 100);
        // Only the header of a 1 MB frame: refused before the payload arrives.
        client
            .write_all(&[0x81, 0x80 | 127, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4])
            .await
            .unwrap();
        let err = ws.next().await.unwrap_err();
        assert_eq!(err.close_code(), Some(1009));
    }

    #[tokio::test]
    async fn fragments_adding_up_past_the_cap_are_refused() {
        let (mut client, server) = duplex(1024);
        let mut ws = WsStream::new(server, 100);
        let mut bytes = masked(0x01, &[b'a'; 60]);
        bytes.extend(masked(0x80, &[b'a'; 60]));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(ws.next().await.unwrap_err().close_code(), Some(1009));
    }

    #[tokio::test]
    async fn unmasked_client_frames_are_a_protocol_error() {
        let (mut client, server) = duplex(1024);
        let mut ws = WsStream::new(server, 100);
        client.write_all(&[0x81, 0x02, b'{', b'}']).await.unwrap();
        assert_eq!(ws.next().await.unwrap_err().close_code(), Some(1002));
    }

    #[tokio::test]
    async fn a_continuation_without_a_message_is_a_protocol_error() {
        let (mut client, server) = duplex(1024);
        let mut ws = WsStream::new(server, 100);
        client.write_all(&masked(0x80, b"x")).await.unwrap();
        assert_eq!(ws.next().await.unwrap_err().close_code(), Some(1002));
    }

    #[tokio::test]
    async fn a_new_message_inside_a_fragmented_one_is_a_protocol_error() {
        let (mut client, server) = duplex(1024);
        let mut ws = WsStream::new(server, 100);
        let mut bytes = masked(0x01, b"a");
        bytes.extend(masked(0x81, b"b"));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(ws.next().await.unwrap_err().close_code(), Some(1002));
    }

    #[tokio::test]
    async fn close_codes_and_reasons_are_checked() {
        for (payload, want) in [
            (vec![], Ok(Some(Incoming::Close(None)))),
            (vec![0x03, 0xE8], Ok(Some(Incoming::Close(Some(1000))))),
            (
                vec![0x0F, 0xA0, b'o', b'k'],
                Ok(Some(Incoming::Close(Some(4000)))),
            ),
            (vec![0x03], Err(1002)),
            (vec![0x03, 0xED], Err(1002)), // 1005 may not be sent
            (vec![0x03, 0xE8, 0xff], Err(1007)),
        ] {
            let (mut client, server) = duplex(1024);
            let mut ws = WsStream::new(server, 100);
            client.write_all(&masked(0x88, &payload)).await.unwrap();
            let got = ws.next().await.map_err(|e| e.close_code().unwrap_or(0));
            assert_eq!(got, want, "close payload {payload:?}");
        }
    }

    #[test]
    fn only_one_pong_waits_and_it_answers_the_latest_ping() {
        let (_client, server) = duplex(64);
        let mut ws = WsStream::new(server, 100);
        ws.push_text(Text::from("a"));
        for i in 0..100u8 {
            ws.push_pong(Bytes::from(vec![i]));
        }
        assert_eq!(ws.queued(), 2);
        assert_eq!(&ws.out[1].body[..], &[99]);
    }

    #[test]
    fn discarding_keeps_only_a_partly_written_frame() {
        let (_client, server) = duplex(64);
        let mut ws = WsStream::new(server, 100);
        ws.push_text(Text::from("first"));
        ws.push_text(Text::from("second"));
        ws.written = 3;
        ws.discard_queued();
        assert_eq!(ws.queued(), 1);
        assert_eq!(&ws.out[0].body[..], b"first");
        ws.written = 0;
        ws.discard_queued();
        assert_eq!(ws.queued(), 0);
    }

    #[tokio::test]
    async fn write_now_writes_what_the_socket_takes_and_leaves_the_rest_queued() {
        let (mut client, server) = duplex(64);
        let mut ws = WsStream::new(server, 100);
        ws.push_text(Text::from("a".repeat(40)));
        ws.push_text(Text::from("b".repeat(40)));
        ws.write_now().unwrap();
        assert_eq!(ws.queued(), 1, "the second frame did not fit and waits");
        let mut first = [0u8; 42];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first[..2], &[0x81, 40], "a whole text frame of 40 bytes");
        ws.flush().await.unwrap();
        assert_eq!(ws.queued(), 0);
    }

    #[tokio::test]
    async fn a_run_in_wire_form_leaves_as_the_same_frames_between_its_neighbours() {
        let (mut client, server) = duplex(1 << 20);
        let mut ws = WsStream::new(server, 100);
        let big = "z".repeat(70_000);
        let run: Vec<Text> = vec!["b".into(), "c".repeat(300).into(), big.clone().into()];
        let wire = Wire::frames(&run);
        assert_eq!(wire.count(), 3);
        ws.push_text("a".into());
        ws.push_out(Out::Wire(wire.clone()));
        ws.push_text("d".into());
        ws.flush().await.expect("flushed");
        drop(ws);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        let mut expected = vec![0x81, 1, b'a'];
        for t in &run {
            let (head, hl) = frame_head(OP_TEXT, t.len());
            expected.extend_from_slice(&head[..usize::from(hl)]);
            expected.extend_from_slice(t.as_bytes());
        }
        expected.extend_from_slice(&[0x81, 1, b'd']);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "byte for byte the three frames, in place");
        assert_eq!(
            Out::Wire(wire).payloads(),
            ["b".to_owned(), "c".repeat(300), big],
            "and read back as the run"
        );
    }

    #[test]
    fn an_outbox_entry_is_the_size_of_a_text() {
        // Every queued entry of every connection pays it: a run in wire form
        // must not make the queues of a join storm larger.
        assert_eq!(std::mem::size_of::<Out>(), std::mem::size_of::<Text>());
    }

    #[tokio::test]
    async fn queued_frames_leave_in_order_with_correct_headers() {
        let (mut client, server) = duplex(1 << 20);
        let mut ws = WsStream::new(server, 100);
        let big: String = "x".repeat(70_000);
        for i in 0..(MAX_FRAMES_PER_WRITE + 5) {
            ws.push_text(Text::from(format!("m{i}")));
        }
        ws.push_text(Text::from(big.clone()));
        ws.push_text(Text::from("y".repeat(300)));
        ws.push_close(Some(1001), "bye");
        ws.flush().await.unwrap();
        assert_eq!(ws.queued(), 0);
        drop(ws);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let frames = server_frames(&got);
        assert_eq!(frames.len(), MAX_FRAMES_PER_WRITE + 8);
        assert_eq!(frames[0], (0x81, b"m0".to_vec()));
        assert_eq!(
            frames[MAX_FRAMES_PER_WRITE + 4],
            (0x81, format!("m{}", MAX_FRAMES_PER_WRITE + 4).into_bytes())
        );
        assert_eq!(frames[MAX_FRAMES_PER_WRITE + 5], (0x81, big.into_bytes()));
        assert_eq!(frames[MAX_FRAMES_PER_WRITE + 6].1.len(), 300);
        assert_eq!(
            frames[MAX_FRAMES_PER_WRITE + 7],
            (0x88, b"\x03\xe9bye".to_vec())
        );
    }
}
