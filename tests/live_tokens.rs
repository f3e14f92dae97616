//! Live tokens (PROTOCOL.md 1.1, "Live token refresh and revocation"), black-box:
//! `token_expiring`, `refresh` -> `refreshed`, rooms a narrower token forbids, and
//! refusals that keep the connection on its old token.

mod common;

use common::services::{Database, Redis};
use common::{Client, Closed, Server, jwt_hs256, now_secs};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const SECRET: &str = "a-live-token-test-secret-of-32-bytes!";

fn token(claims: Value) -> String {
    jwt_hs256(SECRET, claims)
}

/// A token for `sub` that expires in `secs`.
fn token_for(sub: &str, secs: u64) -> String {
    token(json!({"sub": sub, "exp": now_secs() + secs, "iat": now_secs()}))
}

fn expect_type(v: &Value, ty: &str) {
    assert_eq!(v["type"], ty, "expected a {ty}, got {v}");
}

async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-secret", SECRET, "--token-expiring-notice", "1"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

async fn hello(s: &Server, t: &str) -> Client {
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": t})).await;
    expect_type(&w, "welcome");
    c
}

#[tokio::test]
async fn a_connection_refreshed_five_times_across_three_expiries_stays_connected_and_joined() {
    let s = server(&[]).await;
    let mut alice = hello(&s, &token_for("alice", 2)).await;
    let j = alice.request(json!({"type": "join", "room": "r"})).await;
    expect_type(&j, "joined");
    let started = Instant::now();
    for _ in 0..5 {
        let warn = alice.recv_type("token_expiring").await;
        assert!(warn["exp"].as_u64().is_some(), "{warn}");
        let r = alice
            .request(json!({"type": "refresh", "token": token_for("alice", 2)}))
            .await;
        expect_type(&r, "refreshed");
        assert!(r["exp"].as_u64().is_some_and(|e| e >= now_secs()), "{r}");
    }
    // Make sure at least three whole token lifetimes went by.
    while started.elapsed() < Duration::from_secs(6) {
        let warn = alice.recv_type("token_expiring").await;
        assert!(warn["exp"].is_u64());
        let r = alice
            .request(json!({"type": "refresh", "token": token_for("alice", 2)}))
            .await;
        expect_type(&r, "refreshed");
    }
    let mut bob = hello(&s, &token_for("bob", 60)).await;
    let j = bob.request(json!({"type": "join", "room": "r"})).await;
    expect_type(&j, "joined");
    let ack = bob
        .request(json!({"type": "send", "room": "r", "text": "still there?"}))
        .await;
    expect_type(&ack, "ack");
    let m = alice.recv_type("message").await;
    assert_eq!(m["text"], "still there?", "alice is still joined: {m}");
}

#[tokio::test]
async fn without_a_refresh_token_expiring_comes_once_then_closing_and_4001() {
    let s = server(&[]).await;
    let mut alice = hello(&s, &token_for("alice", 2)).await;
    let (closed, seen) = alice.expect_close(Duration::from_secs(8)).await;
    assert_eq!(closed, Closed::Code(4001));
    let warnings = seen
        .iter()
        .filter(|v| v["type"] == "token_expiring")
        .count();
    assert_eq!(warnings, 1, "{seen:?}");
    assert!(seen.iter().any(|v| v["type"] == "closing"), "{seen:?}");
}

#[tokio::test]
async fn a_refresh_that_narrows_rooms_leaves_the_forbidden_room_with_reason_forbidden() {
    let s = server(&[]).await;
    let mut alice = hello(&s, &token_for("alice", 60)).await;
    for room in ["team-a", "other"] {
        let j = alice.request(json!({"type": "join", "room": room})).await;
        expect_type(&j, "joined");
    }
    let narrower = token(json!({"sub": "alice", "exp": now_secs() + 60, "rooms": ["team-*"]}));
    let r = alice
        .request(json!({"type": "refresh", "token": narrower}))
        .await;
    expect_type(&r, "refreshed");
    let left = alice.recv_type("left").await;
    assert_eq!(
        (&left["room"], &left["reason"]),
        (&json!("other"), &json!("forbidden"))
    );
    let send = alice
        .request(json!({"type": "send", "room": "other", "text": "x"}))
        .await;
    expect_type(&send, "error");
    assert_eq!(send["code"], "not_joined");
    let join = alice
        .request(json!({"type": "join", "room": "other"}))
        .await;
    expect_type(&join, "error");
    assert_eq!(join["code"], "forbidden");
    let ok = alice
        .request(json!({"type": "send", "room": "team-a", "text": "still here"}))
        .await;
    expect_type(&ok, "ack");
}

#[tokio::test]
async fn a_refresh_with_another_sub_is_forbidden_and_the_old_token_stays() {
    let s = server(&[]).await;
    let mut alice = hello(&s, &token_for("alice", 60)).await;
    let r = alice
        .request(json!({"type": "refresh", "token": token_for("mallory", 60)}))
        .await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "forbidden");
    let pong = alice.request(json!({"type": "ping"})).await;
    expect_type(&pong, "pong");
}

#[tokio::test]
async fn an_expired_or_badly_signed_refresh_is_unauthorized_and_the_connection_stays() {
    let s = server(&[]).await;
    let mut alice = hello(&s, &token_for("alice", 60)).await;
    let expired = token(json!({"sub": "alice", "exp": now_secs() - 60}));
    let forged = jwt_hs256(
        "another-secret-of-32-bytes-or-more!!",
        json!({"sub": "alice", "exp": now_secs() + 60}),
    );
    for t in [expired, forged, "not a jwt".to_owned()] {
        let r = alice.request(json!({"type": "refresh", "token": t})).await;
        expect_type(&r, "error");
        assert_eq!(r["code"], "unauthorized", "{r}");
    }
    let r = alice.request(json!({"type": "refresh"})).await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "bad_request");
    let pong = alice.request(json!({"type": "ping"})).await;
    expect_type(&pong, "pong");
}

#[tokio::test]
async fn a_guest_connection_has_no_token_to_refresh() {
    let s = server(&["--guests"]).await;
    let mut guest = s.guest("visitor").await;
    let r = guest
        .request(json!({"type": "refresh", "token": token_for("alice", 60)}))
        .await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "bad_request");
}

const KEY: &str = "live-token-api-key-0123456789";

async fn revoke(s: &Server, body: Value) {
    let (status, _, text) = common::http(
        s.addr,
        "POST",
        "/api/v1/tokens/revoke",
        &[("Authorization", &format!("Bearer {KEY}"))],
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn a_revoked_token_cannot_be_refreshed_to_and_a_replaced_one_no_longer_matters() {
    let s = server(&["--api-key", KEY]).await;
    let first = token(json!({"sub": "alice", "exp": now_secs() + 60, "jti": "t1"}));
    let mut alice = hello(&s, &first).await;
    revoke(&s, json!({"jti": "t2"})).await;
    let revoked = token(json!({"sub": "alice", "exp": now_secs() + 60, "jti": "t2"}));
    let r = alice
        .request(json!({"type": "refresh", "token": revoked}))
        .await;
    expect_type(&r, "error");
    assert_eq!(r["code"], "unauthorized");
    let second = token(json!({"sub": "alice", "exp": now_secs() + 60, "jti": "t3"}));
    let r = alice
        .request(json!({"type": "refresh", "token": second}))
        .await;
    expect_type(&r, "refreshed");
    // The token the connection said hello with is no longer the one it holds.
    revoke(&s, json!({"jti": "t1"})).await;
    let pong = alice.request(json!({"type": "ping"})).await;
    expect_type(&pong, "pong");
    revoke(&s, json!({"jti": "t3"})).await;
    let (closed, _) = alice.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
}

#[tokio::test]
async fn on_two_nodes_revoking_a_users_tokens_closes_their_connections_on_both() {
    let db = Database::create();
    let redis = Redis::start();
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let (url, redis_url) = (db.url(), redis.url());
        nodes.push(
            server(&common::node_args(
                &url,
                &redis_url,
                id,
                &["--api-key", KEY],
            ))
            .await,
        );
    }
    let mut on_a = hello(&nodes[0], &token_for("alice", 60)).await;
    let mut on_b = hello(&nodes[1], &token_for("alice", 60)).await;
    revoke(
        &nodes[0],
        json!({"user": "alice", "issued_before": now_secs() + 1}),
    )
    .await;
    for c in [&mut on_a, &mut on_b] {
        let (closed, seen) = c.expect_close(Duration::from_secs(2)).await;
        assert_eq!(closed, Closed::Code(4001));
        assert!(seen.iter().any(|v| v["type"] == "closing"), "{seen:?}");
    }
}
