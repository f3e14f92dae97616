//! The server API (SERVER-API.md, "Access" and "Routes"), black-box: the real
//! binary over real HTTP, with real WebSocket clients watching what it does.

mod common;

use common::services::{Database, Redis};
use common::{Closed, Server};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

const KEY: &str = "test-key-0123456789abcdef";

async fn api_server(extra: &[&str]) -> Server {
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// One HTTP/1.1 request; (status, JSON body or Null, raw head).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value, String) {
    let (status, head, body) = common::http(addr, method, path, headers, body).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::Null),
        head,
    )
}

/// Two API nodes, a and b, on a fresh database and a private Redis (plus `extra`).
async fn api_cluster(extra: &[&str]) -> (Database, Redis, Vec<Server>) {
    let db = Database::create();
    let redis = Redis::start();
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        nodes.push(api_node(&db, &redis, id, extra).await);
    }
    (db, redis, nodes)
}

async fn api_node(db: &Database, redis: &Redis, id: &str, extra: &[&str]) -> Server {
    let (url, redis_url) = (db.url(), redis.url());
    let mut args = common::node_args(&url, &redis_url, id, &["--api-key", KEY]);
    args.extend_from_slice(extra);
    Server::start(&args).await
}

const AUTH: (&str, &str) = ("Authorization", "Bearer test-key-0123456789abcdef");

async fn get(s: &Server, path: &str) -> (u16, Value) {
    let (st, v, _) = http(s.addr, "GET", path, &[AUTH], None).await;
    (st, v)
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let (st, v, _) = http(s.addr, "POST", path, &[AUTH], Some(&body.to_string())).await;
    (st, v)
}

/// The reply is an API error with this status and code.
fn assert_error(got: (u16, Value), status: u16, code: &str) {
    let (st, v) = got;
    assert_eq!(
        v["error"]["code"], code,
        "expected an error body with {code}: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "the error says why: {v}"
    );
    assert_eq!(st, status, "{v}");
}

async fn stored(s: &Server, room: &str) -> Vec<Value> {
    let (st, v) = get(s, &format!("/api/v1/rooms/{room}/messages?limit=500")).await;
    assert_eq!(st, 200, "{v}");
    v["messages"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_message_posted_to_a_room_reaches_its_members_and_is_in_history() {
    let s = api_server(&[]).await;
    let mut alice = s.member("alice", "lobby").await;
    let (st, v) = post(
        &s,
        "/api/v1/rooms/lobby/messages",
        json!({"text": "deploy at 5"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["room"], "lobby");
    assert_eq!(v["seq"], 1);
    assert!(v["ts"].as_i64().is_some_and(|t| t > 0), "{v}");

    let m = alice.recv_type("message").await;
    assert_eq!(m["from"], "hubbub", "the system user by default: {m}");
    assert_eq!(m["text"], "deploy at 5");
    assert_eq!(m["seq"], 1);

    let h = stored(&s, "lobby").await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["text"], "deploy at 5");
}

#[tokio::test]
async fn a_posted_message_shares_the_rooms_sequence_with_websocket_sends() {
    let s = api_server(&[]).await;
    let mut alice = s.member("alice", "lobby").await;
    let ack = alice
        .request(json!({"type": "send", "room": "lobby", "text": "first"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (st, v) = post(
        &s,
        "/api/v1/rooms/lobby/messages",
        json!({"text": "second", "from": "bot", "meta": {"kind": "notice"}}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["seq"], 2);
    let mut late = s.guest("carol").await;
    let j = late
        .request(json!({"type": "join", "room": "lobby", "history": 10}))
        .await;
    assert_eq!(j["type"], "joined", "{j}");
    let texts: Vec<&str> = j["messages"]
        .as_array()
        .expect("recovered messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        ["first", "second"],
        "in the history a join brings, like any other"
    );
    assert_eq!(j["messages"][1]["from"], "bot");
    assert_eq!(j["messages"][1]["meta"]["kind"], "notice");
}

#[tokio::test]
async fn a_repeat_with_the_same_idempotency_key_answers_the_original_and_stores_once() {
    let s = api_server(&[]).await;
    let body = json!({"text": "once"}).to_string();
    let idem = ("Idempotency-Key", "order-42");
    let (st1, a, _) = http(
        s.addr,
        "POST",
        "/api/v1/rooms/r/messages",
        &[AUTH, idem],
        Some(&body),
    )
    .await;
    let (st2, b, _) = http(
        s.addr,
        "POST",
        "/api/v1/rooms/r/messages",
        &[AUTH, idem],
        Some(&body),
    )
    .await;
    assert_eq!((st1, st2), (201, 201), "{a} {b}");
    assert_eq!(a["seq"], b["seq"]);
    assert_eq!(a["ts"], b["ts"]);
    assert_eq!(stored(&s, "r").await.len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_over_64_characters_is_refused() {
    let s = api_server(&[]).await;
    let long = "k".repeat(65);
    let body = json!({"text": "x"}).to_string();
    let (st, v, _) = http(
        s.addr,
        "POST",
        "/api/v1/rooms/r/messages",
        &[AUTH, ("Idempotency-Key", &long)],
        Some(&body),
    )
    .await;
    assert_error((st, v), 400, "bad_request");
    assert!(stored(&s, "r").await.is_empty());
}

#[tokio::test]
async fn a_direct_message_posted_as_a_user_reaches_the_recipient() {
    let s = api_server(&[]).await;
    let mut bob = s.guest("bob").await;
    let (st, v) = post(
        &s,
        "/api/v1/users/bob/messages",
        json!({"text": "psst", "from": "alice"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["dm"], "bob");
    let m = bob.recv_type("message").await;
    assert_eq!(m["from"], "alice");
    assert_eq!(m["dm"], "alice", "the recipient sees the other party: {m}");
    assert_eq!(m["text"], "psst");
}

#[tokio::test]
async fn a_direct_message_needs_a_from_other_than_the_recipient() {
    let s = api_server(&[]).await;
    assert_error(
        post(&s, "/api/v1/users/bob/messages", json!({"text": "x"})).await,
        400,
        "bad_request",
    );
    assert_error(
        post(
            &s,
            "/api/v1/users/bob/messages",
            json!({"text": "x", "from": "bob"}),
        )
        .await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn without_a_configured_key_every_api_path_is_404() {
    let s = Server::start(&[]).await;
    for path in ["/api/v1/rooms", "/api/v1/openapi.json", "/api/v1/users/a"] {
        let (st, v, _) = http(s.addr, "GET", path, &[AUTH], None).await;
        assert_error((st, v), 404, "not_found");
    }
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_stores_nothing() {
    let s = api_server(&[]).await;
    let body = json!({"text": "x"}).to_string();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-key-0123456789abcdef")],
        vec![("Authorization", "Basic dGVzdDp0ZXN0")],
        vec![("Authorization", KEY)],
    ] {
        let (st, v, _) = http(
            s.addr,
            "POST",
            "/api/v1/rooms/r/messages",
            &headers,
            Some(&body),
        )
        .await;
        assert_error((st, v), 401, "unauthorized");
    }
    assert!(stored(&s, "r").await.is_empty());
}

#[tokio::test]
async fn any_of_several_keys_is_accepted() {
    let s = Server::start(&["--api-key", "other-key-0123456789", "--api-key", KEY]).await;
    assert_eq!(get(&s, "/api/v1/rooms").await.0, 200);
    let (st, _, _) = http(
        s.addr,
        "GET",
        "/api/v1/rooms",
        &[("Authorization", "Bearer other-key-0123456789")],
        None,
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn the_openapi_document_needs_no_key() {
    let s = api_server(&[]).await;
    let (st, v, head) = http(s.addr, "GET", "/api/v1/openapi.json", &[], None).await;
    assert_eq!(st, 200);
    assert!(
        head.to_ascii_lowercase().contains("application/json"),
        "{head}"
    );
    assert_eq!(v["openapi"], "3.1.0");
}

#[tokio::test]
async fn an_unknown_route_is_404_with_the_error_body() {
    let s = api_server(&[]).await;
    assert_error(get(&s, "/api/v1/nothing/here").await, 404, "not_found");
}

#[tokio::test]
async fn a_method_the_path_does_not_take_is_404_with_the_error_body() {
    let s = api_server(&[]).await;
    for (method, path) in [
        ("PUT", "/api/v1/rooms"),
        ("DELETE", "/api/v1/rooms/lobby/messages"),
        ("GET", "/api/v1/users/alice/ban"),
        ("PATCH", "/api/v1/tokens/revoke"),
    ] {
        let (st, v, _) = http(s.addr, method, path, &[AUTH], Some("{}")).await;
        assert_error((st, v), 404, "not_found");
    }
}

#[tokio::test]
async fn a_method_the_path_does_not_take_still_needs_the_key() {
    let s = api_server(&[]).await;
    let (st, v, _) = http(s.addr, "PUT", "/api/v1/rooms", &[], None).await;
    assert_error((st, v), 401, "unauthorized");
}

#[tokio::test]
async fn malformed_or_wrongly_typed_bodies_are_400_and_store_nothing() {
    let s = api_server(&[]).await;
    for body in [
        "{\"text\":",
        "[1,2]",
        "{\"text\": 5}",
        "{\"text\": \"\"}",
        "{\"text\": \"x\", \"meta\": [1]}",
        "{\"text\": \"x\", \"from\": 7}",
        "{\"text\": \"x\", \"from\": \"a\\u0001b\"}",
        "{\"text\": \"x\", \"from\": \"   \"}",
        "{}",
    ] {
        let (st, v, _) = http(
            s.addr,
            "POST",
            "/api/v1/rooms/r/messages",
            &[AUTH],
            Some(body),
        )
        .await;
        assert_error((st, v), 400, "bad_request");
    }
    assert!(stored(&s, "r").await.is_empty());
}

#[tokio::test]
async fn unknown_fields_in_a_body_are_ignored() {
    let s = api_server(&[]).await;
    let (st, v) = post(
        &s,
        "/api/v1/rooms/r/messages",
        json!({"text": "x", "colour": "red"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}

#[tokio::test]
async fn text_over_the_limit_is_413_like_on_the_websocket() {
    let s = api_server(&["--max-text", "10"]).await;
    assert_error(
        post(
            &s,
            "/api/v1/rooms/r/messages",
            json!({"text": "x".repeat(11)}),
        )
        .await,
        413,
        "too_large",
    );
    let (st, _) = post(
        &s,
        "/api/v1/rooms/r/messages",
        json!({"text": "x".repeat(10)}),
    )
    .await;
    assert_eq!(st, 201, "exactly at the limit is fine");
    assert_eq!(stored(&s, "r").await.len(), 1);
}

#[tokio::test]
async fn a_body_over_64_kib_is_413() {
    let s = api_server(&["--max-text", "100000"]).await;
    let body = json!({"text": "x".repeat(64 * 1024)}).to_string();
    let (st, v, _) = http(
        s.addr,
        "POST",
        "/api/v1/rooms/r/messages",
        &[AUTH],
        Some(&body),
    )
    .await;
    assert_error((st, v), 413, "too_large");
    assert!(stored(&s, "r").await.is_empty());
}

#[tokio::test]
async fn names_that_break_the_rules_are_400() {
    let s = api_server(&[]).await;
    assert_error(
        post(
            &s,
            "/api/v1/rooms/has%20space/messages",
            json!({"text": "x"}),
        )
        .await,
        400,
        "bad_request",
    );
    let long = "r".repeat(65);
    assert_error(
        get(&s, &format!("/api/v1/rooms/{long}/messages")).await,
        400,
        "bad_request",
    );
    assert_error(get(&s, "/api/v1/users/%01ctl").await, 400, "bad_request");
    assert_error(
        get(&s, &format!("/api/v1/users/{}", "u".repeat(257))).await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn query_numbers_are_checked() {
    let s = api_server(&[]).await;
    assert_error(
        get(&s, "/api/v1/rooms/r/messages?limit=abc").await,
        400,
        "bad_request",
    );
    assert_error(
        get(&s, "/api/v1/rooms/r/messages?before=-1").await,
        400,
        "bad_request",
    );
    assert_error(
        get(&s, "/api/v1/rooms/r/presence?limit=-1").await,
        400,
        "bad_request",
    );
    assert_error(get(&s, "/api/v1/rooms?limit=1.5").await, 400, "bad_request");
    assert_error(
        get(&s, "/api/v1/rooms?prefix=a%20b").await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn a_limit_beyond_its_range_is_clamped_as_the_websocket_commands_clamp_it() {
    let s = api_server(&[]).await;
    for i in 1..=3 {
        let (st, v) = post(
            &s,
            "/api/v1/rooms/r/messages",
            json!({"text": format!("m{i}")}),
        )
        .await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v) = get(&s, "/api/v1/rooms/r/messages?limit=100000").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(3));
    let (st, v) = get(&s, "/api/v1/rooms/r/messages?limit=0").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["messages"].as_array().map(Vec::len),
        Some(0),
        "no messages, as history with limit 0: {v}"
    );
    let _ann = s.member("ann", "r").await;
    let _bob = s.member("bob", "r").await;
    let (st, v) = get(&s, "/api/v1/rooms/r/presence?limit=5000").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(2));
    let (st, v) = get(&s, "/api/v1/rooms/r/presence?limit=0").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["members"].as_array().map(Vec::len),
        Some(1),
        "0 counts as 1: {v}"
    );
    assert_eq!(v["next"], "ann");
    let (st, v) = get(&s, "/api/v1/rooms?limit=0").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rooms"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn history_pages_back_with_before_and_limit() {
    let s = api_server(&[]).await;
    for i in 1..=5 {
        let (st, _) = post(
            &s,
            "/api/v1/rooms/r/messages",
            json!({"text": format!("m{i}")}),
        )
        .await;
        assert_eq!(st, 201);
    }
    let (st, v) = get(&s, "/api/v1/rooms/r/messages?before=5&limit=2").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["room"], "r");
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [3, 4]);
}

#[tokio::test]
async fn beyond_the_per_key_rate_limit_calls_get_429() {
    let s = api_server(&["--api-rate-limit", "2"]).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get(&s, "/api/v1/rooms").await.0);
    }
    assert_eq!(
        &statuses[..4],
        &[200, 200, 200, 200],
        "the burst is 2x the rate"
    );
    let refused = get(&s, "/api/v1/rooms").await;
    assert_error(refused, 429, "rate_limited");
}

#[tokio::test]
async fn presence_pages_list_the_rooms_live_members() {
    let s = api_server(&[]).await;
    let _a = s.member("ann", "r").await;
    let _b = s.member("ben", "r").await;
    let _c = s.member("cat", "r").await;
    let (st, v) = get(&s, "/api/v1/rooms/r/presence?limit=2").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["member_count"], 3);
    let users: Vec<&str> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(users, ["ann", "ben"]);
    assert_eq!(v["next"], "ben");
    let (_, v) = get(&s, "/api/v1/rooms/r/presence?limit=2&after=ben").await;
    assert_eq!(v["members"][0]["user"], "cat");
    assert!(v.get("next").is_none(), "the last page has no next: {v}");
}

#[tokio::test]
async fn a_user_is_online_with_their_connections_and_rooms() {
    let s = api_server(&[]).await;
    let _a = s.member("ann", "r1").await;
    let mut a2 = s.guest("ann").await;
    let j = a2.request(json!({"type": "join", "room": "r2"})).await;
    assert_eq!(j["type"], "joined");
    let (st, v) = get(&s, "/api/v1/users/ann").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["online"], true);
    assert_eq!(v["connections"], 2);
    assert_eq!(v["rooms"], json!(["r1", "r2"]));
    let (_, v) = get(&s, "/api/v1/users/nobody").await;
    assert_eq!(v["online"], false);
    assert_eq!(v["connections"], 0);
}

#[tokio::test]
async fn on_a_cluster_every_node_gives_the_same_user_status() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let _a = nodes[0].member("ann", "r1").await;
    let _b = nodes[1].member("ann", "r2").await;
    let _c = nodes[1].guest("ann").await;
    for node in &nodes {
        let (st, v) = get(node, "/api/v1/users/ann").await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            (&v["online"], &v["connections"], &v["rooms"]),
            (&json!(true), &json!(3), &json!(["r1", "r2"])),
            "{v}"
        );
    }
    let (_, v) = get(&nodes[0], "/api/v1/users/nobody").await;
    assert_eq!(
        (&v["online"], &v["connections"]),
        (&json!(false), &json!(0))
    );
}

#[tokio::test]
async fn on_a_cluster_every_node_lists_a_room_live_only_on_another() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let _a = nodes[1].member("ann", "live-x").await;
    let _b = nodes[1].member("bob", "live-x").await;
    for node in &nodes {
        let (st, v) = get(node, "/api/v1/rooms?prefix=live-").await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["rooms"],
            json!([{"room": "live-x", "seq": 0, "member_count": 2}]),
            "{v}"
        );
    }
}

#[tokio::test]
async fn rooms_lists_stored_and_live_rooms_by_prefix_in_pages() {
    let s = api_server(&[]).await;
    for room in ["team-a", "team-b", "other"] {
        let (st, _) = post(
            &s,
            &format!("/api/v1/rooms/{room}/messages"),
            json!({"text": "x"}),
        )
        .await;
        assert_eq!(st, 201);
    }
    let _live = s.member("ann", "team-c").await;
    let (st, v) = get(&s, "/api/v1/rooms?prefix=team-&limit=2").await;
    assert_eq!(st, 200, "{v}");
    let names: Vec<&str> = v["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .filter_map(|r| r["room"].as_str())
        .collect();
    assert_eq!(names, ["team-a", "team-b"]);
    assert_eq!(v["rooms"][0]["seq"], 1);
    assert_eq!(v["next"], "team-b");
    let (_, v) = get(&s, "/api/v1/rooms?prefix=team-&after=team-b").await;
    assert_eq!(v["rooms"][0]["room"], "team-c");
    assert_eq!(v["rooms"][0]["member_count"], 1);
    assert_eq!(v["rooms"][0]["seq"], 0, "nothing stored there yet");
    assert!(v.get("next").is_none());
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_with_closing_and_4003() {
    let s = api_server(&[]).await;
    let mut a1 = s.member("ann", "r").await;
    let mut a2 = s.guest("ann").await;
    let mut bob = s.member("bob", "r").await;
    let (st, v) = post(
        &s,
        "/api/v1/users/ann/disconnect",
        json!({"reason": "spam"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["closed"], 2);
    for c in [&mut a1, &mut a2] {
        let (closed, seen) = c.expect_close(Duration::from_secs(2)).await;
        assert_eq!(closed, Closed::Code(4003));
        let closing = seen
            .iter()
            .find(|m| m["type"] == "closing")
            .expect("a closing event first");
        assert_eq!(closing["reason"], "spam");
    }
    let ev = bob.recv_type("member").await;
    assert_eq!(ev["user"], "ann");
    assert_eq!(ev["event"], "leave");
    // A kicked client may come back.
    let _again = s.member("ann", "r").await;
}

#[tokio::test]
async fn a_disconnect_reason_over_200_characters_is_413() {
    let s = api_server(&[]).await;
    let _a = s.guest("ann").await;
    assert_error(
        post(
            &s,
            "/api/v1/users/ann/disconnect",
            json!({"reason": "x".repeat(201)}),
        )
        .await,
        413,
        "too_large",
    );
    let (_, v) = get(&s, "/api/v1/users/ann").await;
    assert_eq!(v["connections"], 1, "nothing was closed");
}

#[tokio::test]
async fn on_a_cluster_a_disconnect_on_one_node_closes_the_user_on_another_within_2_s() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let mut ann = nodes[1].member("ann", "r").await;
    let _here = nodes[0].guest("ann").await;
    let (st, v) = post(
        &nodes[0],
        "/api/v1/users/ann/disconnect",
        json!({"reason": "bye"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["closed"], 2, "counted on every node: {v}");
    let (closed, seen) = ann.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4003));
    assert!(
        seen.iter()
            .any(|m| m["type"] == "closing" && m["reason"] == "bye"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn on_a_cluster_any_node_posts_into_the_one_sequence_and_sees_presence() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let mut ann = nodes[1].member("ann", "r").await;
    let (st, v) = post(
        &nodes[0],
        "/api/v1/rooms/r/messages",
        json!({"text": "from a"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let m = ann.recv_type("message").await;
    assert_eq!(m["text"], "from a");
    assert_eq!(m["seq"], v["seq"]);
    // Node a has nobody in the room; it answers from the cluster's presence.
    let mut page = Value::Null;
    for _ in 0..20 {
        let (st, v) = get(&nodes[0], "/api/v1/rooms/r/presence").await;
        assert_eq!(st, 200, "{v}");
        page = v;
        if page["member_count"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(page["member_count"], 1, "{page}");
    assert_eq!(page["members"][0]["user"], "ann");
}

async fn delete(s: &Server, path: &str) -> (u16, Value) {
    let (st, v, _) = http(s.addr, "DELETE", path, &[AUTH], None).await;
    (st, v)
}

/// A hello as guest `name`: the reply and how the connection ended (if it did).
async fn hello_as(s: &Server, name: &str) -> (Value, Option<Closed>) {
    let mut c = s.client().await;
    let r = c.request(json!({"type": "hello", "name": name})).await;
    if r["type"] == "welcome" {
        return (r, None);
    }
    let (closed, _) = c.expect_close(Duration::from_secs(2)).await;
    (r, Some(closed))
}

#[tokio::test]
async fn a_ban_closes_the_user_and_refuses_their_hello_with_4001() {
    let s = api_server(&[]).await;
    let mut ann = s.member("ann", "r").await;
    let (st, v) = post(&s, "/api/v1/users/ann/ban", json!({"reason": "abuse"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["closed"], 1);
    let (closed, seen) = ann.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4003));
    let closing = seen
        .iter()
        .find(|m| m["type"] == "closing")
        .expect("closing first");
    assert_eq!(closing["reason"], "banned: abuse");

    let (reply, closed) = hello_as(&s, "ann").await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unauthorized");
    assert_eq!(closed, Some(Closed::Code(4001)));
    let (reply, _) = hello_as(&s, "bob").await;
    assert_eq!(reply["type"], "welcome", "others are not affected: {reply}");
}

#[tokio::test]
async fn a_banned_users_hello_is_closed_with_4001_giving_the_ban_and_its_reason() {
    let s = api_server(&[]).await;
    let (st, v) = post(&s, "/api/v1/users/ann/ban", json!({"reason": "abuse"})).await;
    assert_eq!(st, 200, "{v}");
    let mut c = s.client().await;
    let r = c.request(json!({"type": "hello", "name": "ann"})).await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["message"], "banned: abuse");
    let (closed, _) = c.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert_eq!(c.close_reason.as_deref(), Some("banned: abuse"));
}

#[tokio::test]
async fn a_ban_survives_a_restart_and_an_unban_lifts_it() {
    let mut s = api_server(&[]).await;
    let (st, v) = post(&s, "/api/v1/users/ann/ban", json!({})).await;
    assert_eq!(st, 200, "{v}");
    s.restart().await;
    let (reply, closed) = hello_as(&s, "ann").await;
    assert_eq!(
        reply["type"], "error",
        "still banned after a restart: {reply}"
    );
    assert_eq!(closed, Some(Closed::Code(4001)));

    let (st, v) = delete(&s, "/api/v1/users/ann/ban").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["lifted"], true);
    let (reply, _) = hello_as(&s, "ann").await;
    assert_eq!(reply["type"], "welcome", "{reply}");
    let (_, v) = delete(&s, "/api/v1/users/ann/ban").await;
    assert_eq!(v["lifted"], false, "nothing left to lift");
}

#[tokio::test]
async fn a_ban_with_until_ends_by_itself() {
    let s = api_server(&[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let (st, v) = post(&s, "/api/v1/users/ann/ban", json!({"until": now + 1500})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["until"], now + 1500);
    assert_eq!(hello_as(&s, "ann").await.0["type"], "error");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(hello_as(&s, "ann").await.0["type"], "welcome");
}

#[tokio::test]
async fn a_ban_until_a_past_time_or_not_a_number_is_400_and_bans_nobody() {
    let s = api_server(&[]).await;
    assert_error(
        post(&s, "/api/v1/users/ann/ban", json!({"until": 1000})).await,
        400,
        "bad_request",
    );
    assert_error(
        post(&s, "/api/v1/users/ann/ban", json!({"until": "soon"})).await,
        400,
        "bad_request",
    );
    assert_eq!(hello_as(&s, "ann").await.0["type"], "welcome");
}

#[tokio::test]
async fn on_a_cluster_a_ban_on_one_node_closes_and_refuses_the_user_on_another() {
    let (db, redis, nodes) = api_cluster(&[]).await;
    let mut ann = nodes[1].member("ann", "r").await;
    let (st, v) = post(&nodes[0], "/api/v1/users/ann/ban", json!({"reason": "x"})).await;
    assert_eq!(st, 200, "{v}");
    let (closed, _) = ann.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4003));
    let (reply, closed) = hello_as(&nodes[1], "ann").await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(closed, Some(Closed::Code(4001)));
    // A node started after the ban reads it from the shared store.
    let late = api_node(&db, &redis, "c", &[]).await;
    assert_eq!(hello_as(&late, "ann").await.0["type"], "error");
    let (st, _) = delete(&nodes[0], "/api/v1/users/ann/ban").await;
    assert_eq!(st, 200);
    // The lifting reaches node b through the broker, promptly.
    let mut reply = Value::Null;
    for _ in 0..20 {
        reply = hello_as(&nodes[1], "ann").await.0;
        if reply["type"] == "welcome" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reply["type"], "welcome", "{reply}");
}

#[tokio::test]
async fn a_removed_member_gets_left_with_the_reason_and_may_rejoin() {
    let s = api_server(&[]).await;
    let mut ann = s.member("ann", "r").await;
    let mut bob = s.member("bob", "r").await;
    let (st, v) = post(
        &s,
        "/api/v1/rooms/r/members/ann/remove",
        json!({"reason": "off topic"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["removed"], 1);
    let left = ann.recv_type("left").await;
    assert_eq!(left["room"], "r");
    assert_eq!(left["reason"], "off topic");
    assert!(left.get("id").is_none(), "not a reply to a command: {left}");
    let ev = bob.recv_type("member").await;
    assert_eq!(
        (ev["user"].as_str(), ev["event"].as_str()),
        (Some("ann"), Some("leave"))
    );

    let refused = ann
        .request(json!({"type": "send", "room": "r", "text": "hi"}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "not_joined");
    let j = ann.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(j["type"], "joined", "removal is not a ban: {j}");
}

#[tokio::test]
async fn removing_someone_who_is_not_in_the_room_removes_nobody() {
    let s = api_server(&[]).await;
    let _ann = s.member("ann", "other").await;
    let (st, v) = post(&s, "/api/v1/rooms/r/members/ann/remove", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["removed"], 0);
    let (_, u) = get(&s, "/api/v1/users/ann").await;
    assert_eq!(u["rooms"], json!(["other"]));
}

#[tokio::test]
async fn on_a_cluster_a_remove_on_one_node_takes_the_user_out_on_another() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let mut ann = nodes[1].member("ann", "r").await;
    let (st, v) = post(
        &nodes[0],
        "/api/v1/rooms/r/members/ann/remove",
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["removed"], 1, "counted on every node: {v}");
    let left = ann.recv_type("left").await;
    assert_eq!(left["reason"], "x");
}

/// Poll `/stats` until `ok` holds (figures are sampled once a second).
async fn stats_until(s: &Server, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..50 {
        let (st, v) = get(s, "/api/v1/stats").await;
        assert_eq!(st, 200, "{v}");
        if ok(&v) {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("stats never matched; last {last}");
}

#[tokio::test]
async fn stats_show_this_nodes_connections_and_message_rate() {
    let s = api_server(&[]).await;
    let _ann = s.member("ann", "r").await;
    let _bob = s.member("bob", "r").await;
    let v = stats_until(&s, |v| v["connections"] == 2).await;
    assert_eq!(v["users"], 2);
    assert_eq!(v["rooms"], 1);
    assert_eq!(v["nodes"][0]["state"], "up");
    // Messages in: a second of posts shows as a rate.
    let posting = async {
        for i in 0..30 {
            let (st, _) = post(
                &s,
                "/api/v1/rooms/r/messages",
                json!({"text": format!("m{i}")}),
            )
            .await;
            assert_eq!(st, 201);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let watching = stats_until(&s, |v| {
        v["messages_per_sec"].as_f64().is_some_and(|r| r > 0.0)
            && v["deliveries_per_sec"].as_f64().is_some_and(|r| r > 0.0)
    });
    let (_, v) = tokio::join!(posting, watching);
    assert!(v["commit_p99_ms"].as_f64().is_some(), "{v}");
}

#[tokio::test]
async fn on_a_cluster_stats_sum_every_node() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let _x = nodes[0].member("x", "r").await;
    let _y = nodes[1].member("y", "r").await;
    let _z = nodes[1].member("z", "q").await;
    for n in &nodes {
        let v = stats_until(n, |v| v["connections"] == 3).await;
        let per_node: Vec<(String, u64)> = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap_or("").to_owned(),
                    n["connections"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(per_node, [("a".to_owned(), 1), ("b".to_owned(), 2)], "{v}");
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token(claims: Value) -> String {
    common::jwt_hs256("jwt-k", claims)
}

/// A hello with `token`: the reply, and how the connection ended if it did.
async fn token_hello(s: &Server, token: &str) -> (common::Client, Value) {
    let mut c = s.client().await;
    let r = c.request(json!({"type": "hello", "token": token})).await;
    (c, r)
}

async fn jwt_api_server(dir: Option<&std::path::Path>) -> Server {
    let args = ["--jwt-secret", "jwt-k", "--api-key", KEY];
    match dir {
        Some(d) => Server::start_in(d, &args).await,
        None => Server::start(&args).await,
    }
}

#[tokio::test]
async fn revoking_a_jti_closes_its_connections_and_refuses_it_but_not_other_tokens() {
    let s = jwt_api_server(None).await;
    let old = token(json!({"sub": "ann", "jti": "t-1"}));
    let other = token(json!({"sub": "ann", "jti": "t-2"}));
    let (mut c, w) = token_hello(&s, &old).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let (st, v) = post(&s, "/api/v1/tokens/revoke", json!({"jti": "t-1"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["closed"], 1);
    let (closed, seen) = c.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert!(
        seen.iter()
            .any(|m| m["type"] == "closing" && m["reason"] == "token revoked"),
        "{seen:?}"
    );
    let (_, r) = token_hello(&s, &old).await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "unauthorized");
    let (_, r) = token_hello(&s, &other).await;
    assert_eq!(
        r["type"], "welcome",
        "another token of the user is fine: {r}"
    );
}

#[tokio::test]
async fn a_revoked_tokens_hello_is_closed_with_4001_saying_token_revoked() {
    let s = jwt_api_server(None).await;
    let old = token(json!({"sub": "ann", "jti": "t-1"}));
    let (st, v) = post(&s, "/api/v1/tokens/revoke", json!({"jti": "t-1"})).await;
    assert_eq!(st, 200, "{v}");
    let (mut c, r) = token_hello(&s, &old).await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["message"], "token revoked");
    let (closed, _) = c.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert_eq!(c.close_reason.as_deref(), Some("token revoked"));
}

#[tokio::test]
async fn revoking_a_users_tokens_issued_before_a_time_spares_newer_ones() {
    let s = jwt_api_server(None).await;
    let now = now_secs();
    let older = token(json!({"sub": "ann", "iat": now - 100}));
    let no_iat = token(json!({"sub": "ann"}));
    let newer = token(json!({"sub": "ann", "iat": now + 10}));
    let bob = token(json!({"sub": "bob", "iat": now - 100}));
    let (mut c, _) = token_hello(&s, &older).await;
    let (st, v) = post(
        &s,
        "/api/v1/tokens/revoke",
        json!({"user": "ann", "issued_before": now}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (closed, _) = c.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert_eq!(token_hello(&s, &older).await.1["type"], "error");
    assert_eq!(
        token_hello(&s, &no_iat).await.1["type"],
        "error",
        "no iat cannot prove it is newer"
    );
    assert_eq!(token_hello(&s, &newer).await.1["type"], "welcome");
    assert_eq!(
        token_hello(&s, &bob).await.1["type"],
        "welcome",
        "other users are untouched"
    );
}

#[tokio::test]
async fn a_revocation_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = jwt_api_server(Some(dir.path())).await;
    let (st, _) = post(&s, "/api/v1/tokens/revoke", json!({"jti": "gone"})).await;
    assert_eq!(st, 200);
    s.restart().await;
    let (_, r) = token_hello(&s, &token(json!({"sub": "ann", "jti": "gone"}))).await;
    assert_eq!(r["type"], "error", "{r}");
}

#[tokio::test]
async fn a_revocation_must_name_a_jti_or_a_user_and_a_time() {
    let s = jwt_api_server(None).await;
    for body in [
        json!({}),
        json!({"jti": "a", "user": "b", "issued_before": 5}),
        json!({"user": "b"}),
        json!({"user": "b", "issued_before": "yesterday"}),
        json!({"jti": ""}),
    ] {
        assert_error(
            post(&s, "/api/v1/tokens/revoke", body).await,
            400,
            "bad_request",
        );
    }
}

#[tokio::test]
async fn on_a_cluster_a_revocation_closes_the_token_on_another_node_within_2_s() {
    let (_db, _redis, nodes) = api_cluster(&["--jwt-secret", "jwt-k"]).await;
    let t = token(json!({"sub": "ann", "jti": "x-1"}));
    let (mut c, w) = token_hello(&nodes[1], &t).await;
    assert_eq!(w["type"], "welcome");
    let (st, _) = post(&nodes[0], "/api/v1/tokens/revoke", json!({"jti": "x-1"})).await;
    assert_eq!(st, 200);
    let (closed, _) = c.expect_close(Duration::from_secs(2)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert_eq!(token_hello(&nodes[1], &t).await.1["type"], "error");
}

#[test]
fn the_openapi_document_is_valid_openapi_3_1() {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/openapi.json");
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", doc])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openapi-spec-validator (pip install openapi-spec-validator; scripts/test installs it): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- delete a message

#[tokio::test]
async fn deleting_a_message_reaches_members_and_leaves_only_a_tombstone() {
    let s = api_server(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "regrettable"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (st, v) = delete(&s, "/api/v1/rooms/r/messages/1").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["room"], &v["seq"], &v["target"]),
        (&json!("r"), &json!(2), &json!(1))
    );
    let ev = alice.recv_type("delete").await;
    assert_eq!((&ev["target"], &ev["from"]), (&json!(1), &json!("hubbub")));
    let (st, h) = get(&s, "/api/v1/rooms/r/messages?current=true").await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["messages"][0]["deleted"], true, "{h}");
    assert!(!h.to_string().contains("regrettable"), "{h}");
}

#[tokio::test]
async fn deleting_a_seq_that_is_not_a_message_is_404_and_stores_nothing() {
    let s = api_server(&[]).await;
    let mut alice = s.member("alice", "r").await;
    alice
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    assert_error(
        delete(&s, "/api/v1/rooms/r/messages/7").await,
        404,
        "not_found",
    );
    assert_eq!(delete(&s, "/api/v1/rooms/r/messages/1").await.0, 200);
    // The delete entry (seq 2) is not a message, and seq 1 is deleted already.
    assert_error(
        delete(&s, "/api/v1/rooms/r/messages/2").await,
        404,
        "not_found",
    );
    assert_error(
        delete(&s, "/api/v1/rooms/r/messages/1").await,
        404,
        "not_found",
    );
    assert_eq!(stored(&s, "r").await.len(), 2, "nothing more stored");
}

#[tokio::test]
async fn deleting_with_a_seq_that_is_not_a_number_is_400() {
    let s = api_server(&[]).await;
    for path in ["/api/v1/rooms/r/messages/x", "/api/v1/rooms/r/messages/0"] {
        assert_error(delete(&s, path).await, 400, "bad_request");
    }
    assert_error(
        delete(&s, "/api/v1/rooms/bad%20room/messages/1").await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn history_with_current_shows_edits_and_reactions() {
    let s = api_server(&[]).await;
    let mut alice = s.member("alice", "r").await;
    for cmd in [
        json!({"type": "send", "room": "r", "text": "v1"}),
        json!({"type": "edit", "room": "r", "target": 1, "text": "v2"}),
        json!({"type": "react", "room": "r", "target": 1, "emoji": "👍", "on": true}),
    ] {
        let ack = alice.request(cmd).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (st, h) = get(&s, "/api/v1/rooms/r/messages?current=true").await;
    assert_eq!(st, 200, "{h}");
    let m = &h["messages"][0];
    assert_eq!(
        (&m["text"], &m["reactions"]),
        (&json!("v2"), &json!({"👍": ["alice"]}))
    );
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(1));
    let all = stored(&s, "r").await;
    let types: Vec<&str> = all
        .iter()
        .map(|m| m["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["message", "edit", "react"]);
}

#[tokio::test]
async fn on_a_cluster_a_delete_on_one_node_reaches_members_on_another() {
    let (_db, _redis, nodes) = api_cluster(&[]).await;
    let mut alice = nodes[1].member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (st, v) = delete(&nodes[0], "/api/v1/rooms/r/messages/1").await;
    assert_eq!(st, 200, "{v}");
    let ev = alice.recv_type("delete").await;
    assert_eq!(ev["target"], 1);
}
