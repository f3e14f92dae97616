//! The WebSocket layer itself: RFC 6455 close codes, close handshake, pings, and
//! the server's heartbeat.

mod common;

use common::{RawWs, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x81, &[0x7b, 0xff, 0xfe, 0x7d]).await;
    assert_eq!(raw.read_close_code().await, Some(1007));
}

#[tokio::test]
async fn reserved_bits_without_an_extension_close_with_1002() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x80 | 0x40 | 0x1, b"{}").await; // RSV1 set
    assert_eq!(raw.read_close_code().await, Some(1002));
}

#[tokio::test]
async fn an_unknown_opcode_closes_with_1002() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x83, b"x").await; // reserved data opcode 3
    assert_eq!(raw.read_close_code().await, Some(1002));
}

#[tokio::test]
async fn a_fragmented_control_frame_closes_with_1002() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x09, b"p").await; // ping without FIN
    assert_eq!(raw.read_close_code().await, Some(1002));
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x88, &1000u16.to_be_bytes()).await;
    assert_eq!(raw.read_close_code().await, Some(1000));
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_carrying_its_payload() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x89, b"hello?").await;
    let (op, payload) = raw.read_frame().await.expect("pong");
    assert_eq!(op, 0xA);
    assert_eq!(payload, b"hello?");
}

#[tokio::test]
async fn fragmented_text_messages_are_reassembled() {
    let s = Server::start(&[]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x01, br#"{"type":"hello","#).await;
    raw.frame(0x80, br#""id":1,"name":"frag"}"#).await;
    let (op, payload) = raw.read_frame().await.expect("welcome");
    assert_eq!(op, 0x1);
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "welcome");
}

#[tokio::test]
async fn the_server_pings_every_heartbeat_interval() {
    let s = Server::start(&["--heartbeat", "0.3"]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x81, br#"{"type":"hello","name":"hb"}"#).await;
    let mut pings = 0;
    let started = std::time::Instant::now();
    while pings < 2 {
        let (op, payload) = raw.read_frame().await.expect("frames");
        if op == 0x9 {
            pings += 1;
            raw.frame(0x8A, &payload).await; // answer with a pong
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn a_connection_receiving_messages_without_pause_is_still_pinged() {
    // The session polls its timer only once it has fired (it wakes per message
    // in a busy room); the heartbeat must still come while messages pour in.
    let s = Server::start(&["--heartbeat", "0.3"]).await;
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x81, br#"{"type":"hello","name":"busy"}"#).await;
    raw.frame(0x81, br#"{"type":"join","room":"r"}"#).await;
    let mut sender = s.member("sender", "r").await;
    let pour = tokio::spawn(async move {
        for i in 0..150 {
            sender
                .send(serde_json::json!({"type": "send", "room": "r", "text": format!("m{i}")}))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sender
    });
    let (mut pings, mut messages) = (0, 0);
    let started = std::time::Instant::now();
    while pings < 2 {
        let (op, payload) = tokio::time::timeout(Duration::from_secs(3), raw.read_frame())
            .await
            .expect("a frame within 3 s")
            .expect("frames");
        match op {
            0x9 => {
                pings += 1;
                raw.frame(0x8A, &payload).await;
            }
            0x1 if payload.starts_with(br#"{"type":"message""#) => messages += 1,
            _ => {}
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(messages > 10, "the pings came among messages ({messages})");
    drop(pour.await.expect("sender"));
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_two_intervals_and_its_presence_leaves() {
    let s = Server::start(&["--heartbeat", "0.5"]).await;
    let mut watcher = s.member("watcher", "r").await;
    // A raw client that joins and then never answers anything.
    let mut raw = RawWs::connect(s.addr).await;
    raw.frame(0x81, br#"{"type":"hello","name":"ghost"}"#).await;
    raw.frame(0x81, br#"{"type":"join","room":"r"}"#).await;
    let j = watcher.recv_type("member").await;
    assert_eq!(
        (j["user"].as_str(), j["event"].as_str()),
        (Some("ghost"), Some("join"))
    );
    let started = std::time::Instant::now();
    // The watcher answers pings (tungstenite does it while reading), the ghost does not.
    let l = watcher.recv_type("member").await;
    assert_eq!(
        (l["user"].as_str(), l["event"].as_str()),
        (Some("ghost"), Some("leave"))
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(4),
        "dropped after {took:?}"
    );
    // The watcher itself, which answers, is still connected.
    assert_eq!(
        watcher.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
    // And the ghost's TCP connection was dropped: reading reaches EOF (read_frame
    // panics if nothing arrives within the wait instead).
    let mut frames = 0;
    while raw.read_frame().await.is_some() {
        frames += 1;
        assert!(frames < 10, "only welcome, joined and pings were ever sent");
    }
}

#[tokio::test]
async fn tungstenite_client_close_handshake_completes_cleanly() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    c.ws.send(Message::Close(None)).await.unwrap();
    let mut saw_close = false;
    while let Some(Ok(m)) = c.ws.next().await {
        if m.is_close() {
            saw_close = true;
        }
    }
    assert!(saw_close);
}

#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read() {
    let s = Server::start(&[]).await;
    let hello = json!({"type": "hello", "id": "1", "name": "early"}).to_string();
    let mut ws = RawWs::connect_sending(s.addr, &RawWs::encode(0x81, hello.as_bytes(), true)).await;
    let (op, payload) = ws.read_frame().await.expect("a frame");
    assert_eq!(op, 0x1, "a text frame");
    let reply: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
    assert_eq!(reply["type"], "welcome", "{reply}");
    assert_eq!(reply["id"], "1");
}

/// An upgrade request to a fresh server with `Upgrade` and `Connection` set and
/// `more` headers: the status and body of the answer.
async fn upgrade_request(more: &[(&str, &str)]) -> (u16, String) {
    let s = Server::start(&[]).await;
    let mut headers = vec![("Upgrade", "websocket"), ("Connection", "Upgrade")];
    headers.extend_from_slice(more);
    common::http_get(s.addr, "/ws", &headers).await
}

#[tokio::test]
async fn a_handshake_without_a_key_is_refused_with_400() {
    let (status, body) = upgrade_request(&[("Sec-WebSocket-Version", "13")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("Sec-WebSocket-Key"),
        "the refusal says why: {body}"
    );
}

#[tokio::test]
async fn a_handshake_for_another_protocol_version_is_refused_with_426() {
    let (status, body) = upgrade_request(&[
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "8"),
    ])
    .await;
    assert_eq!(status, 426, "{body}");
    assert!(
        body.contains("13"),
        "the refusal names the version we speak: {body}"
    );
}
