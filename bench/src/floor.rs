//! `floor`: the least a WebSocket broadcast server can do on this machine, to give
//! every figure a ratio to what the machine can do at all.
//!
//! Its own HTTP upgrade and framing; it speaks just the part of the Hubbub protocol
//! the benchmark uses (`hello`, `join`, `send`; replies `welcome`, `joined`, `ack`,
//! and `message` to the room). Each message is framed once and the same bytes are
//! queued for every member; each connection's writer drains its queue with one
//! vectored write for many frames. No history, no auth, no limits: that is the point.

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

struct Peer {
    queue: Mutex<Vec<Bytes>>,
    notify: Notify,
}

impl Peer {
    fn push(&self, frame: Bytes) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = q.is_empty();
        q.push(frame);
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
    }
}

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<Arc<Peer>>,
}

type Rooms = Arc<Mutex<HashMap<String, Room>>>;

pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("floor listening on ws://{}/ws", listener.local_addr()?);
    let rooms: Rooms = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let rooms = rooms.clone();
        tokio::spawn(async move {
            let _ = serve(tcp, rooms).await;
        });
    }
}

/// A server-to-client text frame (unmasked), framed once.
fn frame(payload: &[u8], opcode: u8) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => out.extend_from_slice(&[n as u8]),
        n if n < 65536 => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.freeze()
}

async fn handshake(tcp: &mut TcpStream) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(2048);
    let end = loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            anyhow::bail!("closed during handshake");
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            anyhow::bail!("handshake too large");
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .ok_or_else(|| anyhow::anyhow!("no Sec-WebSocket-Key"))?;
    let accept =
        base64::engine::general_purpose::STANDARD.encode(Sha1::digest(format!("{key}{WS_GUID}")));
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    tcp.write_all(resp.as_bytes()).await?;
    buf.advance(end);
    Ok(buf)
}

async fn writer(mut w: OwnedWriteHalf, peer: Arc<Peer>) {
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        peer.notify.notified().await;
        {
            let mut q = peer.queue.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut *q, &mut batch);
        }
        if batch.is_empty() {
            continue;
        }
        // Several frames per write call.
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match w.write_vectored(rest).await {
                Ok(0) | Err(_) => return,
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
            }
        }
        drop(slices);
        batch.clear();
    }
}

async fn serve(mut tcp: TcpStream, rooms: Rooms) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = handshake(&mut tcp).await?;
    let (mut r, w) = tcp.into_split();
    let peer = Arc::new(Peer {
        queue: Mutex::new(Vec::new()),
        notify: Notify::new(),
    });
    tokio::spawn(writer(w, peer.clone()));
    let mut joined: Vec<String> = Vec::new();
    let result = async {
        loop {
            // Parse every complete client frame in the buffer.
            while let Some((opcode, payload, used)) = parse(&buf) {
                buf.advance(used);
                match opcode {
                    0x1 => command(&payload, &peer, &rooms, &mut joined),
                    0x8 => {
                        peer.push(frame(&payload[..payload.len().min(2)], 0x8));
                        return Ok(());
                    }
                    0x9 => peer.push(frame(&payload, 0xA)),
                    _ => {}
                }
            }
            if r.read_buf(&mut buf).await? == 0 {
                return anyhow::Ok(());
            }
        }
    }
    .await;
    let mut map = rooms.lock().unwrap_or_else(|p| p.into_inner());
    for room in joined {
        if let Some(rm) = map.get_mut(&room) {
            rm.members.retain(|p| !Arc::ptr_eq(p, &peer));
        }
    }
    result
}

/// A complete masked client frame at the start of `buf`: (opcode, payload, bytes used).
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(m)
    } else {
        None
    };
    let data = buf.get(pos..pos + len)?;
    let payload = match mask {
        Some(m) => data.iter().enumerate().map(|(i, b)| b ^ m[i % 4]).collect(),
        None => data.to_vec(),
    };
    Some((opcode, payload, pos + len))
}

fn command(payload: &[u8], peer: &Arc<Peer>, rooms: &Rooms, joined: &mut Vec<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
    let room = v
        .get("room")
        .and_then(|r| r.as_str())
        .unwrap_or("")
        .to_string();
    match v.get("type").and_then(|t| t.as_str()) {
        Some("hello") => {
            let name = v.get("name").and_then(|n| n.as_str()).unwrap_or("anon");
            let reply = serde_json::json!({"type": "welcome", "id": id, "user": name, "conn": "0", "heartbeat_ms": 25000, "limits": {}});
            peer.push(frame(reply.to_string().as_bytes(), 0x1));
        }
        Some("join") => {
            let seq = {
                let mut map = rooms.lock().unwrap_or_else(|p| p.into_inner());
                let rm = map.entry(room.clone()).or_default();
                rm.members.push(peer.clone());
                rm.seq
            };
            joined.push(room.clone());
            let reply = serde_json::json!({"type": "joined", "id": id, "room": room, "epoch": "floor", "seq": seq, "members": [], "messages": [], "recovered": false});
            peer.push(frame(reply.to_string().as_bytes(), 0x1));
        }
        Some("send") => {
            let text = v.get("text").and_then(|t| t.as_str()).unwrap_or("");
            let (seq, members, msg) = {
                let mut map = rooms.lock().unwrap_or_else(|p| p.into_inner());
                let rm = map.entry(room.clone()).or_default();
                rm.seq += 1;
                let msg = serde_json::json!({"type": "message", "room": room, "seq": rm.seq, "ts": 0, "from": "x", "name": "x", "text": text});
                (rm.seq, rm.members.clone(), msg)
            };
            // Framed once; the same bytes go to every member.
            let f = frame(msg.to_string().as_bytes(), 0x1);
            for m in &members {
                m.push(f.clone());
            }
            let ack =
                serde_json::json!({"type": "ack", "id": id, "room": room, "seq": seq, "ts": 0});
            peer.push(frame(ack.to_string().as_bytes(), 0x1));
        }
        _ => {}
    }
}
