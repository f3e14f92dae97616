//! Webhooks (SERVER-API.md, "Webhooks"), black-box: the real binary POSTs to a real
//! HTTP receiver run by the test. At least once, in order per room, nothing lost
//! while the receiver is down or the sending node is killed, each event once from
//! two nodes, signatures valid, and the queue's bound.

mod common;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::services::{Database, Redis, free_port};
use common::{Client, Server};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "webhook-test-secret";

#[derive(Clone, Default)]
struct Receiver {
    /// Every event received, in arrival order.
    events: Arc<Mutex<Vec<Value>>>,
    /// Requests whose signature did not verify.
    bad_signatures: Arc<Mutex<usize>>,
    /// Time to take before answering each request.
    delay: Arc<Mutex<Duration>>,
}

fn hex_hmac(key: &str, data: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key.as_bytes());
    aws_lc_rs::hmac::sign(&key, data.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn take(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let ts = h("hubbub-timestamp");
    if h("hubbub-signature") != format!("sha256={}", hex_hmac(SECRET, &format!("{ts}.{body}"))) {
        *r.bad_signatures.lock().expect("lock") += 1;
    }
    let delay = *r.delay.lock().expect("lock");
    tokio::time::sleep(delay).await;
    let batch: Vec<Value> = serde_json::from_str(&body).expect("a JSON array of events");
    r.events.lock().expect("lock").extend(batch);
    StatusCode::OK
}

impl Receiver {
    /// Listen on `port` (127.0.0.1) from now on.
    async fn listen(&self, port: u16) {
        let app = Router::new()
            .route("/hook", post(take))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().expect("lock").clone()
    }

    /// Wait until events with every seq 1..=n of `room` have arrived; returns the
    /// distinct events by `event_id`, in arrival order.
    async fn until_room_has(&self, room: &str, n: u64, within: Duration) -> Vec<Value> {
        let all: Vec<u64> = (1..=n).collect();
        self.until_seqs(room, &all, within).await
    }

    /// Wait until events with each of `want` (seqs of `room`) have arrived.
    async fn until_seqs(&self, room: &str, want: &[u64], within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let seqs: std::collections::BTreeSet<u64> = self
                .events()
                .iter()
                .filter(|e| e["room"] == room)
                .filter_map(|e| e["seq"].as_u64())
                .collect();
            if want.iter().all(|s| seqs.contains(s)) {
                return distinct(self.events());
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} events of {room} arrived",
                seqs.len(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The first arrival of each `event_id`, in arrival order.
fn distinct(events: Vec<Value>) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    events
        .into_iter()
        .filter(|e| seen.insert(e["event_id"].as_i64().expect("event_id")))
        .collect()
}

/// The seqs of `room`'s events, in arrival order.
fn seqs_of(events: &[Value], room: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["room"] == room)
        .filter_map(|e| e["seq"].as_u64())
        .collect()
}

fn hook_args(port: u16) -> Vec<String> {
    [
        "--webhook-url".to_owned(),
        format!("http://127.0.0.1:{port}/hook"),
        "--webhook-secret".to_owned(),
        SECRET.to_owned(),
        "--rate-limit".to_owned(),
        "10000".to_owned(),
    ]
    .into()
}

/// Nodes a and b on a fresh database and a private Redis, posting to `port`.
/// Bound in this order by the caller, they are dropped nodes first.
async fn two_nodes(port: u16) -> (Database, Redis, Vec<Server>) {
    let db = Database::create();
    let redis = Redis::start();
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let (url, redis_url) = (db.url(), redis.url());
        nodes.push(start(port, &common::node_args(&url, &redis_url, id, &[])).await);
    }
    (db, redis, nodes)
}

async fn start(port: u16, extra: &[&str]) -> Server {
    let mut args = hook_args(port);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&refs).await
}

/// Send `n` messages into `room`, pipelined, and wait for every ack.
async fn send_many(c: &mut Client, room: &str, n: usize) {
    static BATCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let batch = BATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for i in 0..n {
        c.send(json!({"type": "send", "room": room, "text": format!("m{i}"), "client_id": format!("{room}-{batch}-{i}")}))
            .await;
    }
    let acks = c.await_acks(n).await;
    assert!(acks.iter().all(|a| a["type"] == "ack"));
}

#[tokio::test]
async fn messages_edits_and_deletes_arrive_once_in_order_and_signed() {
    let port = free_port();
    let r = Receiver::default();
    r.listen(port).await;
    let s = start(port, &[]).await;
    let mut alice = s.member("alice", "r").await;
    send_many(&mut alice, "r", 3).await;
    for cmd in [
        json!({"type": "edit", "room": "r", "target": 1, "text": "m0!"}),
        json!({"type": "react", "room": "r", "target": 1, "emoji": "x", "on": true}),
        json!({"type": "delete", "room": "r", "target": 2}),
    ] {
        let ack = alice.request(cmd).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let dm = alice
        .request(json!({"type": "direct", "to": "bob", "text": "psst"}))
        .await;
    assert_eq!(dm["type"], "ack");
    let events = r
        .until_seqs("r", &[1, 2, 3, 4, 6], Duration::from_secs(10))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.events().iter().any(|e| e["dm"] == "bob") {
        assert!(Instant::now() < deadline, "the DM's event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(*r.bad_signatures.lock().expect("lock"), 0);
    let types: Vec<&str> = events
        .iter()
        .filter(|e| e["room"] == "r" && e["seq"].is_u64())
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["message", "message", "message", "edit", "delete"],
        "reactions are not webhook events"
    );
    assert_eq!(seqs_of(&events, "r"), vec![1, 2, 3, 4, 6]);
    assert_eq!(
        r.events().len(),
        events.len(),
        "no duplicates in normal operation"
    );
    let dm = r
        .events()
        .into_iter()
        .find(|e| e["dm"] == "bob")
        .expect("dm");
    assert_eq!(
        (&dm["from"], &dm["text"]),
        (&json!("alice"), &json!("psst"))
    );
}

/// How long the receiver stays down: 3 s in the suite; `scripts/soak-webhooks` runs
/// the contract's 30 s (then the retry backoff reaches 16-32 s).
fn down_for() -> Duration {
    Duration::from_secs(
        std::env::var("HUBBUB_WEBHOOK_DOWN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    )
}

#[tokio::test]
async fn a_receiver_down_while_500_messages_are_sent_gets_them_all_in_order_afterwards() {
    let port = free_port();
    let s = start(port, &[]).await;
    let mut alice = s.member("alice", "a").await;
    let j = alice.request(json!({"type": "join", "room": "b"})).await;
    assert_eq!(j["type"], "joined");
    send_many(&mut alice, "a", 250).await;
    send_many(&mut alice, "b", 250).await;
    tokio::time::sleep(down_for()).await;
    let r = Receiver::default();
    r.listen(port).await;
    let within = down_for() * 2 + Duration::from_secs(30);
    r.until_room_has("a", 250, within).await;
    let events = r.until_room_has("b", 250, within).await;
    assert_eq!(seqs_of(&events, "a"), (1..=250).collect::<Vec<_>>());
    assert_eq!(seqs_of(&events, "b"), (1..=250).collect::<Vec<_>>());
    assert_eq!(*r.bad_signatures.lock().expect("lock"), 0);
    let (_, metrics) = s.http_get("/metrics").await;
    assert!(
        metrics.contains("hubbub_webhook_failures_total"),
        "failures are counted"
    );
}

#[tokio::test]
async fn a_sending_node_killed_mid_delivery_sends_everything_after_its_restart() {
    let port = free_port();
    let r = Receiver::default();
    *r.delay.lock().expect("lock") = Duration::from_millis(300);
    r.listen(port).await;
    let mut s = start(port, &[]).await;
    let mut alice = s.member("alice", "r").await;
    send_many(&mut alice, "r", 500).await;
    // A batch or two are in flight or delivered; the rest wait in the queue.
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.kill().await;
    let before = distinct(r.events()).len();
    assert!(before < 500, "killed mid-delivery ({before} delivered)");
    *r.delay.lock().expect("lock") = Duration::ZERO;
    s.restart().await;
    let events = r.until_room_has("r", 500, Duration::from_secs(30)).await;
    assert_eq!(seqs_of(&events, "r"), (1..=500).collect::<Vec<_>>());
}

#[tokio::test]
async fn on_two_nodes_each_event_is_sent_once() {
    let port = free_port();
    let r = Receiver::default();
    r.listen(port).await;
    let (_db, _redis, nodes) = two_nodes(port).await;
    let mut on_a = nodes[0].member("alice", "r").await;
    let mut on_b = nodes[1].member("bob", "r").await;
    send_many(&mut on_a, "r", 50).await;
    send_many(&mut on_b, "r", 50).await;
    let events = r.until_room_has("r", 100, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries = r.events().iter().filter(|e| e["seq"].is_u64()).count();
    assert_eq!(entries, 100, "each entry's event once");
    assert_eq!(seqs_of(&events, "r"), (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_full_queue_drops_new_events_and_counts_them() {
    let port = free_port();
    let s = start(port, &["--webhook-queue-max", "10"]).await;
    let mut alice = s.member("alice", "r").await;
    send_many(&mut alice, "r", 20).await;
    // The bound is checked every 2 s: after that the queue counts as full.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    send_many(&mut alice, "r", 5).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = s.http_get("/metrics").await;
        let dropped: BTreeMap<&str, &str> = metrics
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == "hubbub_webhook_dropped_total")
            .collect();
        if dropped.values().any(|v| *v == "5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dropped events counted: {dropped:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s.log().contains("webhook queue is full"), "and logged once");
    let r = Receiver::default();
    r.listen(port).await;
    let events = r.until_room_has("r", 20, Duration::from_secs(20)).await;
    assert_eq!(seqs_of(&events, "r"), (1..=20).collect::<Vec<_>>());
}

/// The presence events (`member`, `user`) about `user`, as (type, event).
fn presence_of(events: &[Value], user: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| (e["type"] == "member" || e["type"] == "user") && e["user"] == user)
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["event"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn until_presence(r: &Receiver, user: &str, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = presence_of(&r.events(), user);
        if p.len() >= n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "presence events of {user}: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_user_with_two_tabs_on_two_nodes_is_online_once_and_joins_once() {
    let port = free_port();
    let r = Receiver::default();
    r.listen(port).await;
    let (_db, _redis, nodes) = two_nodes(port).await;
    let tab1 = nodes[0].member("ann", "r").await;
    let p = until_presence(&r, "ann", 2).await;
    assert_eq!(
        p,
        [
            ("user".into(), "online".into()),
            ("member".into(), "join".into())
        ]
    );
    let tab2 = nodes[1].member("ann", "r").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        presence_of(&r.events(), "ann").len(),
        2,
        "the second tab changes nothing"
    );
    tab1.close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        presence_of(&r.events(), "ann").len(),
        2,
        "one tab is still open"
    );
    tab2.close().await;
    let p = until_presence(&r, "ann", 4).await;
    assert_eq!(
        p[2..],
        [
            ("member".into(), "leave".into()),
            ("user".into(), "offline".into())
        ]
    );
}
