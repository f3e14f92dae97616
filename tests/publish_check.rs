//! The publish check (SERVER-API.md, "Publish check"), black-box: the real binary
//! asks a real HTTP receiver run by the test before storing `send`, `direct`,
//! `edit` and API posts; allow, deny, rewrite, and a receiver that is too slow
//! under both failure modes.

mod common;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::{Client, Server};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "publish-check-test-secret";

/// What the receiver answers.
#[derive(Clone)]
enum Mode {
    Allow,
    Deny(&'static str),
    Rewrite(&'static str),
    Slow(Duration),
    Fail,
}

#[derive(Clone)]
struct Receiver {
    mode: Arc<Mutex<Mode>>,
    /// (Hubbub-Timestamp, Hubbub-Signature, body) of every request.
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
}

async fn answer(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: String,
) -> (axum::http::StatusCode, String) {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.seen
        .lock()
        .expect("lock")
        .push((h("hubbub-timestamp"), h("hubbub-signature"), body));
    let mode = r.mode.lock().expect("lock").clone();
    let ok = axum::http::StatusCode::OK;
    match mode {
        Mode::Allow => (ok, json!({"allow": true}).to_string()),
        Mode::Deny(reason) => (ok, json!({"allow": false, "reason": reason}).to_string()),
        Mode::Rewrite(text) => (ok, json!({"allow": true, "text": text}).to_string()),
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            (ok, json!({"allow": true}).to_string())
        }
        Mode::Fail => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new()),
    }
}

/// A receiver on a free loopback port: its URL and handle.
async fn receiver(mode: Mode) -> (String, Receiver) {
    let r = Receiver {
        mode: Arc::new(Mutex::new(mode)),
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/check", post(answer))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/check"), r)
}

async fn server(url: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--publish-check-url",
        url,
        "--webhook-secret",
        SECRET,
        "--publish-check-timeout",
        "1",
    ];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

fn expect_type(v: &Value, ty: &str) {
    assert_eq!(v["type"], ty, "expected a {ty}, got {v}");
}

async fn latest_seq(c: &mut Client, room: &str) -> u64 {
    let j = c.request(json!({"type": "join", "room": room})).await;
    expect_type(&j, "joined");
    j["seq"].as_u64().expect("seq")
}

fn hex_hmac(key: &str, data: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key.as_bytes());
    aws_lc_rs::hmac::sign(&key, data.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn an_allowed_message_is_stored_and_the_request_is_signed() {
    let (url, r) = receiver(Mode::Allow).await;
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "hello", "meta": {"k": 1}}))
        .await;
    expect_type(&ack, "ack");
    let seen = r.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    let (ts, sig, body) = &seen[0];
    let asked: Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(
        (
            &asked["user"],
            &asked["room"],
            &asked["text"],
            &asked["meta"]
        ),
        (
            &json!("alice"),
            &json!("r"),
            &json!("hello"),
            &json!({"k": 1})
        )
    );
    assert_eq!(
        *sig,
        format!("sha256={}", hex_hmac(SECRET, &format!("{ts}.{body}")))
    );
}

#[tokio::test]
async fn a_denied_message_gets_forbidden_with_the_reason_and_nothing_is_stored() {
    let (url, _r) = receiver(Mode::Deny("no links, please")).await;
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let r = alice
        .request(json!({"type": "send", "room": "r", "text": "http://spam"}))
        .await;
    expect_type(&r, "error");
    assert_eq!(
        (&r["code"], &r["message"]),
        (&json!("forbidden"), &json!("no links, please"))
    );
    assert_eq!(latest_seq(&mut alice, "r").await, 0);
}

#[tokio::test]
async fn a_rewritten_message_is_stored_and_delivered_as_rewritten() {
    let (url, _r) = receiver(Mode::Rewrite("[redacted]")).await;
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "my password is hunter2"}))
        .await;
    expect_type(&ack, "ack");
    let m = bob.recv_type("message").await;
    assert_eq!(m["text"], "[redacted]");
    let h = bob.request(json!({"type": "history", "room": "r"})).await;
    expect_type(&h, "history");
    assert_eq!(h["messages"][0]["text"], "[redacted]");
}

#[tokio::test]
async fn direct_messages_and_edits_are_checked_too() {
    let (url, r) = receiver(Mode::Allow).await;
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "direct", "to": "bob", "text": "psst"}))
        .await;
    expect_type(&ack, "ack");
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "v1"}))
        .await;
    expect_type(&ack, "ack");
    *r.mode.lock().expect("lock") = Mode::Deny("edits are closed");
    let e = alice
        .request(json!({"type": "edit", "room": "r", "target": 1, "text": "v2"}))
        .await;
    expect_type(&e, "error");
    assert_eq!(e["code"], "forbidden");
    let seen = r.seen.lock().expect("lock").clone();
    let asked: Vec<Value> = seen
        .iter()
        .map(|(_, _, b)| serde_json::from_str(b).expect("JSON"))
        .collect();
    assert_eq!(
        (&asked[0]["dm"], &asked[0]["type"]),
        (&json!("bob"), &json!("message"))
    );
    assert_eq!(
        (&asked[2]["type"], &asked[2]["target"]),
        (&json!("edit"), &json!(1))
    );
    assert_eq!(
        latest_seq(&mut alice, "r").await,
        1,
        "the denied edit is not stored"
    );
}

#[tokio::test]
async fn an_api_post_is_checked_like_a_send() {
    let (url, _r) = receiver(Mode::Deny("not from the API either")).await;
    let key = "publish-check-api-key-0123";
    let s = server(&url, &["--api-key", key]).await;
    let (status, _, body) = common::http(
        s.addr,
        "POST",
        "/api/v1/rooms/r/messages",
        &[("Authorization", &format!("Bearer {key}"))],
        Some(&json!({"text": "x"}).to_string()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not from the API either"), "{body}");
}

#[tokio::test]
async fn a_slow_check_fails_closed_by_default_with_unavailable_and_stores_nothing() {
    let (url, _r) = receiver(Mode::Slow(Duration::from_secs(3))).await;
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let started = std::time::Instant::now();
    let r = alice
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "bounded by the 1 s timeout"
    );
    assert_eq!(latest_seq(&mut alice, "r").await, 0);
}

#[tokio::test]
async fn a_slow_or_failing_check_fails_open_when_configured() {
    let (url, r) = receiver(Mode::Slow(Duration::from_secs(3))).await;
    let s = server(&url, &["--publish-check-failure", "open"]).await;
    let mut alice = s.member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    expect_type(&ack, "ack");
    *r.mode.lock().expect("lock") = Mode::Fail;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "y"}))
        .await;
    expect_type(&ack, "ack");
}

#[tokio::test]
async fn a_check_that_cannot_be_reached_fails_closed() {
    // Nothing listens on this port.
    let port = common::services::free_port();
    let url = format!("http://127.0.0.1:{port}/check");
    let s = server(&url, &[]).await;
    let mut alice = s.member("alice", "r").await;
    let r = alice
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "unavailable");
}
