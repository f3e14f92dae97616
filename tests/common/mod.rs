//! Test harness: the real `hubbub` binary on a loopback port with its own data
//! directory, and a real WebSocket client (tokio-tungstenite) to talk to it.
#![allow(dead_code)]

pub mod services;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The flags of one node of a cluster (its database, its Redis and its name),
/// then `extra`.
pub fn node_args<'a>(
    db_url: &'a str,
    redis_url: &'a str,
    id: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "--database-url",
        db_url,
        "--redis-url",
        redis_url,
        "--node-id",
        id,
    ];
    args.extend_from_slice(extra);
    args
}

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    args: Vec<String>,
    nofile: Option<u32>,
}

impl Server {
    /// Start with a fresh data directory and extra flags.
    pub async fn start(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server::start_in(&dir, args).await;
        s._tmp = Some(tmp);
        s
    }

    /// Start on an existing data directory (to test restarts).
    pub async fn start_in(dir: &Path, args: &[&str]) -> Server {
        Server::start_with_env(dir, args, &[]).await
    }

    pub async fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(dir, &args, env, None).await;
        Server {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            args,
            nofile: None,
        }
    }

    /// Start with the process's open-file limit (`ulimit -n`) set to `nofile`.
    pub async fn start_with_nofile(args: &[&str], nofile: u32) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(&dir, &args, &[], Some(nofile)).await;
        Server {
            child: Some(child),
            addr,
            dir,
            _tmp: Some(tmp),
            args,
            nofile: Some(nofile),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("server running")
    }

    /// Send SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        signal(pid, "TERM");
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("server exits within 15 s of SIGTERM")
            .expect("wait")
    }

    /// Wait for an exit already asked for (e.g. a signal sent by the test).
    pub async fn terminate_wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("server exits within 15 s")
            .expect("wait")
    }

    /// SIGKILL: no shutdown at all.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Start again on the same data directory and port-0 listener.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate().await;
        }
        let (child, addr) = spawn(&self.dir, &self.args, &[], self.nofile).await;
        self.child = Some(child);
        self.addr = addr;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url()).await
    }

    /// A client that has said hello as guest `name`.
    pub async fn guest(&self, name: &str) -> Client {
        let mut c = self.client().await;
        let w = c.request(json!({"type": "hello", "name": name})).await;
        assert_eq!(w["type"], "welcome", "hello as {name}: {w}");
        c
    }

    /// A guest that has joined `room` (and consumed the `joined` reply).
    pub async fn member(&self, name: &str, room: &str) -> Client {
        let mut c = self.guest(name).await;
        let j = c.request(json!({"type": "join", "room": room})).await;
        assert_eq!(j["type"], "joined", "{j}");
        c
    }

    /// GET a path over plain HTTP/1.1; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, &[]).await
    }

    /// The value of an unlabelled series in /metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

async fn spawn(
    dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
    nofile: Option<u32>,
) -> (Child, SocketAddr) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("log file");
    let bin = env!("CARGO_BIN_EXE_hubbub");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .env("HUBBUB_LOG", "hubbub=debug,info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn hubbub");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("hubbub listening on http://") {
                return rest.parse::<SocketAddr>().expect("address");
            }
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("hubbub exited before listening; log:\n{log}");
    })
    .await
    .expect("hubbub starts listening within 10 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, _, body) = http(addr, "GET", path, headers, None).await;
    (status, body)
}

/// One HTTP/1.1 request (a JSON body if given); returns (status, head, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (status, head.to_owned(), body.to_owned())
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server did to the connection, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

pub struct Client {
    pub ws: Ws,
    /// Parsed objects not yet consumed (a batched frame may carry several).
    buffered: VecDeque<Value>,
    next_id: i64,
    /// Every close seen while reading, kept for `expect_close`.
    closed: Option<Closed>,
    /// The reason in the server's close frame, once one has arrived.
    pub close_reason: Option<String>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Client::from_ws(ws)
    }

    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            buffered: VecDeque::new(),
            next_id: 1000,
            closed: None,
            close_reason: None,
        }
    }

    /// Connect with an Origin header; returns the handshake error if refused.
    pub async fn connect_with_origin(
        url: &str,
        origin: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("Origin", origin.parse().expect("header value"));
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client::from_ws(ws))
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::text(t.to_string()))
            .await
            .expect("send");
    }

    /// Next protocol object (splitting batched frames), within `WAIT`.
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(WAIT).await {
            Some(v) => v,
            None => panic!("expected a message within {WAIT:?}, got {:?}", self.closed),
        }
    }

    /// Next protocol object, or None on timeout or close.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        if let Some(v) = self.buffered.pop_front() {
            return Some(v);
        }
        if self.closed.is_some() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match frame {
                Some(Ok(Message::Text(t))) => {
                    for line in t.as_str().split('\n') {
                        let v: Value = serde_json::from_str(line)
                            .unwrap_or_else(|e| panic!("server sent invalid JSON {line:?}: {e}"));
                        self.buffered.push_back(v);
                    }
                    return self.buffered.pop_front();
                }
                Some(Ok(Message::Close(f))) => {
                    self.close_reason = f.as_ref().map(|f| f.reason.to_string());
                    self.closed = Some(Closed::Code(f.map_or(1005, |f: CloseFrame| f.code.into())));
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.closed.get_or_insert(Closed::Dropped);
                    return None;
                }
            }
        }
    }

    /// Skip events until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Some(v) if v["type"] == ty => return v,
                Some(_) => continue,
                None => panic!("no {ty:?} within {WAIT:?} (closed: {:?})", self.closed),
            }
        }
    }

    /// Send a command with a fresh integer id and return the reply carrying it.
    /// Events that arrive meanwhile stay buffered for later `recv`s.
    pub async fn request(&mut self, mut v: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        v["id"] = json!(id);
        self.send(v).await;
        self.reply_to(json!(id)).await
    }

    /// Wait for the reply carrying `id`, keeping other objects buffered in order.
    pub async fn reply_to(&mut self, id: Value) -> Value {
        let mut held = VecDeque::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        let found = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Read past the buffer without re-reading held items.
            let next = if let Some(v) = self.buffered.pop_front() {
                Some(v)
            } else {
                self.try_recv(left).await
            };
            match next {
                Some(v) if v["id"] == id => break v,
                Some(v) => held.push_back(v),
                None => panic!(
                    "no reply to id {id} within {WAIT:?} (closed: {:?}); got {held:?}",
                    self.closed
                ),
            }
        };
        held.extend(self.buffered.drain(..));
        self.buffered = held;
        found
    }

    /// Read until the connection closes; returns how it closed. Text frames
    /// (such as `closing`) are skipped but kept: see `seen`.
    pub async fn expect_close(&mut self, within: Duration) -> (Closed, Vec<Value>) {
        let mut seen: Vec<Value> = self.buffered.drain(..).collect();
        let deadline = tokio::time::Instant::now() + within;
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!(
                    "connection still open after {within:?}; saw {} messages, last {:?}",
                    seen.len(),
                    seen.last().map(|v| v["type"].clone())
                );
            }
            if let Some(v) = self.try_recv(left).await {
                seen.push(v);
            }
        }
        seen.extend(self.buffered.drain(..));
        (self.closed.take().expect("closed"), seen)
    }

    /// Assert that nothing of type `ty` arrives within `wait`.
    pub async fn expect_no(&mut self, ty: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.try_recv(left).await {
                Some(v) if v["type"] == ty => panic!("unexpected {ty}: {v}"),
                Some(_) => continue,
                None => return,
            }
        }
    }

    /// Read until `n` acks have arrived; returns them in arrival order.
    pub async fn await_acks(&mut self, n: usize) -> Vec<Value> {
        let mut acks = Vec::with_capacity(n);
        while acks.len() < n {
            let v = self.recv().await;
            if v["type"] == "ack" {
                acks.push(v);
            }
        }
        acks
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's close arrives.
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// A raw TCP client that performs the WebSocket handshake itself and then writes
/// hand-made frames, to test the server's RFC 6455 behaviour.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(addr: SocketAddr) -> RawWs {
        Self::connect_sending(addr, &[]).await
    }

    /// Connect, writing `early` (frames) in the same write as the upgrade
    /// request, before the server's answer.
    pub async fn connect_sending(addr: SocketAddr, early: &[u8]) -> RawWs {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut out = req.into_bytes();
        out.extend_from_slice(early);
        stream.write_all(&out).await.expect("write handshake");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("handshake reply in time")
                .expect("read");
            assert!(n > 0, "server closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..pos]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "handshake: {head}");
                buf.drain(..pos + 4);
                break;
            }
        }
        RawWs { stream, buf }
    }

    /// Write one masked frame with the given first byte (FIN/RSV/opcode) and payload.
    pub async fn frame(&mut self, first: u8, payload: &[u8]) {
        self.frame_masked(first, payload, true).await;
    }

    pub async fn frame_masked(&mut self, first: u8, payload: &[u8], masked: bool) {
        let out = Self::encode(first, payload, masked);
        let _ = self.stream.write_all(&out).await;
    }

    /// One client frame's bytes.
    pub fn encode(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len < 65536 {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            let key = [0x12u8, 0x34, 0x56, 0x78];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// Read the next frame from the server: (opcode, payload). None at EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some((op, payload));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("frame in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Read frames until a close frame; returns its code (None if EOF first).
    pub async fn read_close_code(&mut self) -> Option<u16> {
        while let Some((op, payload)) = self.read_frame().await {
            if op == 0x8 {
                return Some(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                });
            }
        }
        None
    }
}

fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0f;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf[1] & 0x80 != 0 {
        pos += 4;
    }
    if buf.len() < pos + len {
        return None;
    }
    Some((op, buf[pos..pos + len].to_vec(), pos + len))
}

/// The `seq`s of a `messages` array.
pub fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

/// Sign a JWT for tests with any claims.
pub fn jwt_hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
