//! PostgreSQL outages: a private PostgreSQL server that the test stops and starts
//! under a running node. While it is down nothing is acked (sends get
//! `unavailable`), `/readyz` says 503, and when it is back the node serves again
//! by itself, with every acked message stored once and nothing else.

mod common;

use common::Server;
use common::services::PrivatePostgres;
use serde_json::{Value, json};
use std::time::Duration;

/// Poll `/readyz` until it answers `status` (within [`common::WAIT`] x 3).
async fn readyz_becomes(s: &Server, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + common::WAIT * 3;
    loop {
        let (st, body) = s.http_get("/readyz").await;
        if st == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stays {st} ({body}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn texts(history: &Value) -> Vec<String> {
    history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().expect("text").to_owned())
        .collect()
}

#[tokio::test]
async fn while_postgresql_is_down_sends_are_unavailable_and_readyz_is_503() {
    let pg = PrivatePostgres::start();
    let s = Server::start(&["--database-url", &pg.url()]).await;
    let mut alice = s.member("alice", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "before"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    readyz_becomes(&s, 200).await;

    pg.stop();
    let r = alice
        .request(json!({"type": "send", "room": "r", "text": "during", "client_id": "d1"}))
        .await;
    assert_eq!(
        r["type"], "error",
        "nothing is acked while the store is down: {r}"
    );
    assert_eq!(r["code"], "unavailable", "{r}");
    let why = readyz_becomes(&s, 503).await;
    assert!(why.contains("store"), "{why}");
    // The connection itself stays up.
    let p = alice.request(json!({"type": "ping"})).await;
    assert_eq!(p["type"], "pong", "{p}");
}

#[tokio::test]
async fn after_a_postgresql_outage_the_node_serves_again_by_itself_and_lost_nothing_acked() {
    let pg = PrivatePostgres::start();
    let s = Server::start(&["--database-url", &pg.url()]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "before"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    pg.stop();
    let r = alice
        .request(json!({"type": "send", "room": "r", "text": "during", "client_id": "d1"}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "unavailable", "{r}");
    readyz_becomes(&s, 503).await;

    pg.start_server();
    readyz_becomes(&s, 200).await;
    // Resending the refused message (same client_id, as the SDK does) stores it once.
    let mut acked = None;
    for _ in 0..50 {
        let r = alice
            .request(json!({"type": "send", "room": "r", "text": "during", "client_id": "d1"}))
            .await;
        if r["type"] == "ack" {
            acked = Some(r);
            break;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acked = acked.expect("a send is acked again within 10 s of PostgreSQL's return");
    assert_eq!(
        acked["seq"], 2,
        "no hole where the refused send was: {acked}"
    );
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "after"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 3, "{ack}");

    // Live delivery works again, and history holds exactly the acked messages.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = bob.recv_type("message").await;
        seen.push(m["text"].as_str().expect("text").to_owned());
    }
    assert_eq!(seen, ["before", "during", "after"]);
    let h = bob.request(json!({"type": "history", "room": "r"})).await;
    assert_eq!(h["type"], "history", "{h}");
    assert_eq!(common::seqs(&h["messages"]), vec![1, 2, 3]);
    assert_eq!(texts(&h), ["before", "during", "after"]);
    assert_eq!(
        pg.query("SELECT count(*) FROM messages WHERE text = 'during'"),
        "1",
        "stored once"
    );
}

#[tokio::test]
async fn a_room_first_joined_while_postgresql_is_down_is_unavailable_until_it_is_back() {
    let pg = PrivatePostgres::start();
    let s = Server::start(&["--database-url", &pg.url()]).await;
    pg.stop();
    readyz_becomes(&s, 503).await;
    let mut c = s.guest("carol").await;
    let j = c.request(json!({"type": "join", "room": "fresh"})).await;
    assert_eq!(j["type"], "error", "a room's state cannot be loaded: {j}");
    assert_eq!(j["code"], "unavailable", "{j}");
    pg.start_server();
    readyz_becomes(&s, 200).await;
    let mut joined = None;
    for _ in 0..50 {
        let j = c.request(json!({"type": "join", "room": "fresh"})).await;
        if j["type"] == "joined" {
            joined = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = joined.expect("the join works once PostgreSQL is back");
    assert_eq!(j["seq"], 0, "{j}");
}
