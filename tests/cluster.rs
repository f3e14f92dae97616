//! Several Hubbub nodes sharing history in a real PostgreSQL and talking over a real
//! Redis (a private redis-server per test; a fresh database per test). Each test is
//! one behaviour a user of a multi-node deployment relies on.

mod common;

use common::services::{Database, Redis, RedisCluster};
use common::{Client, Server, WAIT, seqs};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A cluster of `n` nodes named a, b, c... on one database and one Redis.
async fn nodes(db: &Database, redis_url: &str, n: usize, extra: &[&str]) -> Vec<Server> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = ((b'a' + i as u8) as char).to_string();
        let mut args = vec![
            "--database-url",
            &db.url(),
            "--redis-url",
            redis_url,
            "--node-id",
            &id,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        out.push(Server::start(&refs).await);
    }
    out
}

/// Read `room` messages until `n` have arrived; their seqs in arrival order.
async fn read_messages(c: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived",
            got.len()
        );
        let v = c.recv().await;
        if v["type"] == "message" {
            got.push(v);
        }
    }
    got
}

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().expect("seq")
}

async fn metric(server: &Server, name: &str) -> f64 {
    let (_, body) = server.http_get("/metrics").await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_message_sent_on_one_node_reaches_members_on_the_others() {
    let db = Database::create();
    let redis = Redis::start();
    let n = nodes(&db, &redis.url(), 3, &[]).await;
    let mut alice = n[0].member("alice", "lobby").await;
    let mut bob = n[1].member("bob", "lobby").await;
    let mut carol = n[2].member("carol", "lobby").await;

    let ack = alice
        .request(json!({"type": "send", "room": "lobby", "text": "hello from a"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    for c in [&mut bob, &mut carol] {
        let m = c.recv_type("message").await;
        assert_eq!(m["text"], "hello from a");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["seq"], 1);
    }
}
