//! Several Hubbub nodes sharing history in a real PostgreSQL and talking over a real
//! Redis (a private redis-server per test; a fresh database per test). Each test is
//! one behaviour a user of a multi-node deployment relies on.

mod common;

use common::services::{Database, Redis, RedisCluster};
use common::{Client, Server, WAIT, seqs};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A fresh database, a private Redis and `n` nodes on them. Bound in this order by
/// the caller, they are dropped nodes first, then Redis, then the database.
async fn cluster(n: usize, extra: &[&str]) -> (Database, Redis, Vec<Server>) {
    let db = Database::create();
    let redis = Redis::start();
    let nodes = nodes(&db, &redis.url(), n, extra).await;
    (db, redis, nodes)
}

/// A cluster of `n` nodes named a, b, c... on one database and one Redis.
async fn nodes(db: &Database, redis_url: &str, n: usize, extra: &[&str]) -> Vec<Server> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = ((b'a' + i as u8) as char).to_string();
        let url = db.url();
        out.push(Server::start(&common::node_args(&url, redis_url, &id, extra)).await);
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

/// The next `member` event about `user` (others are skipped): "join" or "leave".
async fn member_event_about(c: &mut Client, user: &str) -> String {
    loop {
        let ev = c.recv_type("member").await;
        if ev["user"] == user {
            return ev["event"].as_str().unwrap_or_default().to_owned();
        }
    }
}

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().expect("seq")
}

#[tokio::test]
async fn a_message_sent_on_one_node_reaches_members_on_the_others() {
    let (_db, _redis, n) = cluster(3, &[]).await;
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

#[tokio::test]
async fn concurrent_senders_on_three_nodes_get_one_gapless_order_that_every_receiver_sees() {
    let (db, _redis, n) = cluster(3, &["--rate-limit", "1000"]).await;
    let mut receivers = Vec::new();
    for (i, node) in n.iter().enumerate() {
        receivers.push(node.member(&format!("r{i}"), "race").await);
    }
    let per_sender = 100;
    let mut senders = Vec::new();
    for (i, node) in n.iter().enumerate() {
        let mut s = node.member(&format!("s{i}"), "race").await;
        senders.push(tokio::spawn(async move {
            for k in 0..per_sender {
                s.send(json!({"type": "send", "room": "race", "text": format!("s{i}-{k}")}))
                    .await;
            }
            let acks = s.await_acks(per_sender).await;
            acks.iter().map(seq_of).collect::<Vec<u64>>()
        }));
    }
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.expect("sender"));
    }
    acked.sort_unstable();
    let total = 3 * per_sender as u64;
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "acks: gapless 1..{total}"
    );

    let mut orders = Vec::new();
    for r in &mut receivers {
        let got = read_messages(r, total as usize).await;
        let s: Vec<u64> = got.iter().map(seq_of).collect();
        assert_eq!(
            s,
            (1..=total).collect::<Vec<_>>(),
            "every receiver: 1..{total} in order"
        );
        orders.push(got.iter().map(|m| m["text"].clone()).collect::<Vec<_>>());
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "same texts in the same order"
    );
    let stored =
        db.query("SELECT count(*), min(seq), max(seq) FROM messages WHERE channel = '#race'");
    assert_eq!(stored, format!("{total}|1|{total}"));
}

#[tokio::test]
async fn a_client_id_retry_that_lands_on_another_node_gets_the_original_seq() {
    let (db, _redis, n) = cluster(2, &[]).await;
    let mut watcher = n[1].member("watcher", "idem").await;
    let mut first = n[0].member("dave", "idem").await;
    let ack1 = first
        .request(json!({"type": "send", "room": "idem", "text": "once", "client_id": "c-42"}))
        .await;
    assert_eq!(ack1["type"], "ack");
    first.close().await;

    let mut retry = n[1].member("dave", "idem").await;
    let ack2 = retry
        .request(json!({"type": "send", "room": "idem", "text": "once", "client_id": "c-42"}))
        .await;
    assert_eq!(ack2["type"], "ack", "{ack2}");
    assert_eq!(ack2["seq"], ack1["seq"], "the original seq");
    assert_eq!(ack2["ts"], ack1["ts"], "the original ts");
    assert_eq!(
        db.query("SELECT count(*) FROM messages WHERE channel = '#idem'"),
        "1"
    );
    let m = watcher.recv_type("message").await;
    assert_eq!(m["seq"], 1);
    watcher
        .expect_no("message", Duration::from_millis(500))
        .await;
}

#[tokio::test]
async fn a_direct_message_reaches_the_recipient_and_the_senders_other_tab_on_other_nodes() {
    let (_db, _redis, n) = cluster(3, &[]).await;
    let mut erin_a = n[0].guest("erin").await;
    let mut erin_c = n[2].guest("erin").await;
    let mut frank_b = n[1].guest("frank").await;
    let mut grace_c = n[2].guest("grace").await;

    let ack = erin_a
        .request(json!({"type": "direct", "to": "frank", "text": "psst"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = frank_b.recv_type("message").await;
    assert_eq!(
        (m["dm"].as_str(), m["from"].as_str(), m["seq"].as_u64()),
        (Some("erin"), Some("erin"), Some(1))
    );
    let mine = erin_c.recv_type("message").await;
    assert_eq!(
        (mine["dm"].as_str(), mine["text"].as_str()),
        (Some("frank"), Some("psst"))
    );
    grace_c
        .expect_no("message", Duration::from_millis(500))
        .await;

    let reply = frank_b
        .request(json!({"type": "direct", "to": "erin", "text": "hi"}))
        .await;
    assert_eq!(reply["seq"], 2, "one sequence per pair across nodes");
    for e in [&mut erin_a, &mut erin_c] {
        let m = loop {
            let m = e.recv_type("message").await;
            if m["seq"] != 1 {
                break m; // erin_a also saw her own message 1
            }
        };
        assert_eq!(
            (m["seq"].as_u64(), m["text"].as_str()),
            (Some(2), Some("hi"))
        );
    }
}

#[tokio::test]
async fn a_user_with_tabs_on_two_nodes_is_one_member_announced_once() {
    let (_db, _redis, n) = cluster(3, &[]).await;
    let mut watcher = n[2].member("watcher", "p").await;
    let mut tab1 = n[0].member("hana", "p").await;
    let ev = watcher.recv_type("member").await;
    assert_eq!(
        (ev["user"].as_str(), ev["event"].as_str()),
        (Some("hana"), Some("join"))
    );
    let tab2 = n[1].member("hana", "p").await;
    watcher
        .expect_no("member", Duration::from_millis(700))
        .await;

    let p = watcher
        .request(json!({"type": "presence", "room": "p"}))
        .await;
    let users: Vec<&str> = p["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(
        users,
        vec!["hana", "watcher"],
        "one entry per user, cluster-wide"
    );
    let j = tab1.request(json!({"type": "presence", "room": "p"})).await;
    assert_eq!(j["members"].as_array().map(Vec::len), Some(2));

    tab2.close().await;
    watcher
        .expect_no("member", Duration::from_millis(700))
        .await;
    tab1.close().await;
    let ev = watcher.recv_type("member").await;
    assert_eq!(
        (ev["user"].as_str(), ev["event"].as_str()),
        (Some("hana"), Some("leave"))
    );
    watcher
        .expect_no("member", Duration::from_millis(700))
        .await;
}

#[tokio::test]
async fn a_killed_nodes_users_leave_presence_everywhere_within_the_node_timeout() {
    let (_db, redis, mut n) = cluster(3, &["--node-timeout", "3"]).await;
    let mut watcher_b = n[1].member("wb", "ghosts").await;
    let mut watcher_c = n[2].member("wc", "ghosts").await;
    let _ivan = n[0].member("ivan", "ghosts").await;
    for w in [&mut watcher_b, &mut watcher_c] {
        assert_eq!(member_event_about(w, "ivan").await, "join");
    }
    let killed = Instant::now();
    n[0].kill().await;
    for w in [&mut watcher_b, &mut watcher_c] {
        assert_eq!(member_event_about(w, "ivan").await, "leave");
    }
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "left after {:?} (timeout 3 s)",
        killed.elapsed()
    );
    let p = watcher_b
        .request(json!({"type": "presence", "room": "ghosts"}))
        .await;
    let users: Vec<&str> = p["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(users, vec!["wb", "wc"], "no ghost left");
    let fields = redis
        .cli(&["HKEYS", "hubbub:presence:ghosts"])
        .unwrap_or_default();
    assert!(
        !fields.contains("|ivan"),
        "the dead node's field is gone from Redis: {fields}"
    );
}

#[tokio::test]
async fn after_sigkill_right_after_acks_a_rejoin_on_another_node_recovers_every_message_once() {
    let (db, _redis, mut n) = cluster(2, &["--rate-limit", "1000"]).await;
    let mut reader = n[0].guest("reader").await;
    let j = reader
        .request(json!({"type": "join", "room": "crash"}))
        .await;
    let epoch = j["epoch"].as_str().expect("epoch").to_owned();
    let mut sender = n[0].member("sender", "crash").await;
    let total = 200u64;
    for k in 0..total {
        sender
            .send(json!({"type": "send", "room": "crash", "text": format!("m{k}")}))
            .await;
    }
    let seen: Vec<u64> = read_messages(&mut reader, 50)
        .await
        .iter()
        .map(seq_of)
        .collect();
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    sender.await_acks(total as usize).await;
    n[0].kill().await;

    let mut back = n[1].guest("reader").await;
    let j = back
        .request(json!({"type": "join", "room": "crash", "since": {"seq": 50, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], true, "{j}");
    assert_eq!(j["seq"], total);
    let rest = seqs(&j["messages"]);
    assert_eq!(
        rest,
        (51..=total).collect::<Vec<_>>(),
        "every missed message, once, in order"
    );
    assert_eq!(
        db.query("SELECT count(*) FROM messages WHERE channel = '#crash'"),
        total.to_string()
    );
}

/// Send `text` with `client_id`, resending (as the SDK does) while the answer is
/// `unavailable`; returns the ack and how many times it was refused.
async fn send_until_acked(c: &mut Client, room: &str, text: &str, cid: &str) -> (Value, u32) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut refused = 0;
    loop {
        let r = c
            .request(json!({"type": "send", "room": room, "text": text, "client_id": cid}))
            .await;
        if r["type"] == "ack" {
            return (r, refused);
        }
        refused += 1;
        assert_eq!(r["code"], "unavailable", "only unavailable may refuse: {r}");
        assert!(Instant::now() < deadline, "never acked: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_status(server: &Server, path: &str, want: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = server.http_get(path).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {want} (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn while_redis_is_down_sends_get_unavailable_and_readyz_turns_red() {
    let (db, mut redis, n) = cluster(2, &[]).await;
    let mut alice = n[0].member("alice", "down").await;
    wait_for_status(&n[0], "/readyz", 200).await;

    redis.stop();
    wait_for_status(&n[0], "/readyz", 503).await;
    let r = alice
        .request(json!({"type": "send", "room": "down", "text": "lost?", "client_id": "x1"}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{r}"
    );
    assert_eq!(
        db.query("SELECT count(*) FROM messages"),
        "0",
        "nothing stored, nothing acked"
    );
}

#[tokio::test]
async fn when_redis_restarts_mid_traffic_delivery_resumes_with_nothing_lost_or_duplicated() {
    let (db, mut redis, n) = cluster(3, &["--rate-limit", "1000"]).await;
    let mut bob = n[1].member("bob", "flaky").await;
    let mut carol = n[2].member("carol", "flaky").await;
    let mut alice = n[0].member("alice", "flaky").await;

    // Redis goes away 0.4 s into the traffic and comes back 1.5 s later.
    let outage = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        redis.stop();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.restart();
        redis
    });
    let total = 60u64;
    let mut acked = Vec::new();
    let mut refusals = 0;
    for k in 0..total {
        let (ack, refused) =
            send_until_acked(&mut alice, "flaky", &format!("m{k}"), &format!("c{k}")).await;
        refusals += refused;
        acked.push(seq_of(&ack));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let _redis = outage.await.expect("outage task");
    assert!(refusals > 0, "the outage happened during the traffic");
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "one seq per message, no gaps"
    );
    for c in [&mut bob, &mut carol] {
        let got: Vec<u64> = read_messages(c, total as usize)
            .await
            .iter()
            .map(seq_of)
            .collect();
        assert_eq!(
            got,
            (1..=total).collect::<Vec<_>>(),
            "all of them, in order"
        );
        c.expect_no("message", Duration::from_millis(500)).await;
    }
    // Subscriptions came back by themselves: a new message is live everywhere.
    let (ack, _) = send_until_acked(&mut alice, "flaky", "after", "after").await;
    for c in [&mut bob, &mut carol] {
        assert_eq!(c.recv_type("message").await["seq"], ack["seq"]);
    }
    wait_for_status(&n[0], "/readyz", 200).await;
    assert!(n[0].metric("hubbub_broker_reconnects_total").await >= 1.0);
    assert_eq!(
        db.query("SELECT count(*) FROM messages"),
        (total + 1).to_string()
    );
}

/// Store messages as a node would have, bypassing Hubbub (the node "died" before
/// publishing some of them).
fn store_directly(db: &Database, room: &str, seqs: &[u64]) {
    let mut sql = String::from("BEGIN;");
    for s in seqs {
        sql.push_str(&format!(
            "INSERT INTO messages (channel, seq, ts, sender, name, text) \
             VALUES ('#{room}', {s}, 1, 'ghost', 'Ghost', 'stored {s}');"
        ));
    }
    let max = seqs.iter().max().copied().unwrap_or(0);
    sql.push_str(&format!(
        "INSERT INTO channels (key, last_seq) VALUES ('#{room}', {max}) \
         ON CONFLICT (key) DO UPDATE SET last_seq = {max}; COMMIT;"
    ));
    db.query(&sql);
}

fn publish_directly(redis: &Redis, room: &str, seq: u64) {
    let env = json!({"k": "m", "n": "dead.0", "c": format!("#{room}"), "seq": seq, "ts": 1,
                     "from": "ghost", "name": "Ghost", "text": format!("stored {seq}")});
    let n = redis.cli(&["PUBLISH", &format!("hubbub:r:{room}"), &env.to_string()]);
    assert_eq!(n.as_deref(), Some("1"), "one node subscribed");
}

#[tokio::test]
async fn a_missed_broadcast_is_filled_from_postgres_before_the_newer_message_is_delivered() {
    let (db, redis, n) = cluster(1, &[]).await;
    let mut alice = n[0].member("alice", "gap").await;
    let ack = alice
        .request(json!({"type": "send", "room": "gap", "text": "one"}))
        .await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(alice.recv_type("message").await["seq"], 1);

    // Messages 2 and 3 were committed by a node that published only 3.
    store_directly(&db, "gap", &[2, 3]);
    publish_directly(&redis, "gap", 3);
    let got = read_messages(&mut alice, 2).await;
    assert_eq!(got.iter().map(seq_of).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(got[0]["text"], "stored 2");
    alice.expect_no("message", Duration::from_millis(300)).await;
    assert!(n[0].metric("hubbub_broker_gaps_detected_total").await >= 1.0);
    assert!(n[0].metric("hubbub_broker_gap_messages_total").await >= 1.0);
}

#[tokio::test]
async fn the_last_message_of_a_burst_whose_broadcast_was_lost_still_arrives() {
    let (db, _redis, n) = cluster(1, &[]).await;
    let mut alice = n[0].member("alice", "tail").await;
    store_directly(&db, "tail", &[1]);
    let m = alice.recv_type("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(1), Some("stored 1"))
    );
}

#[tokio::test]
async fn a_rejoin_with_a_since_ahead_of_this_node_recovers_and_is_not_sent_those_messages_again() {
    // The node's room is behind the store (its broadcasts were lost or are late,
    // as after a Redis outage); a client coming from a node that was ahead joins
    // with `since` at the store's end.
    let (db, _redis, n) = cluster(1, &[]).await;
    let mut alice = n[0].guest("alice").await;
    let j = alice
        .request(json!({"type": "join", "room": "ahead"}))
        .await;
    assert_eq!(j["type"], "joined", "{j}");
    let epoch = j["epoch"].as_str().expect("epoch").to_owned();
    let mut bob = n[0].guest("bob").await;
    store_directly(&db, "ahead", &[1, 2, 3, 4, 5]);
    let j = bob
        .request(json!({"type": "join", "room": "ahead", "since": {"seq": 5, "epoch": epoch}}))
        .await;
    assert_eq!(j["type"], "joined", "{j}");
    assert_eq!(j["recovered"], true, "{j}");
    assert_eq!(j["seq"], 5);
    assert_eq!(seqs(&j["messages"]), Vec::<u64>::new(), "nothing it had");
    // Past the node's periodic catch-up: bob is not sent 1..5 a second time,
    // and alice, a member all along, gets each once.
    bob.expect_no("message", Duration::from_millis(1500)).await;
    let got = read_messages(&mut alice, 5).await;
    assert_eq!(
        got.iter().map(seq_of).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    alice.expect_no("message", Duration::from_millis(300)).await;
}

#[tokio::test]
async fn typing_reaches_the_rooms_users_on_other_nodes() {
    let (_db, _redis, n) = cluster(2, &[]).await;
    let mut bob = n[1].member("bob", "t").await;
    let mut alice = n[0].member("alice", "t").await;
    alice.send(json!({"type": "typing", "room": "t"})).await;
    let t = bob.recv_type("typing").await;
    assert_eq!(
        (t["user"].as_str(), t["room"].as_str()),
        (Some("alice"), Some("t"))
    );
}

#[tokio::test]
async fn nodes_that_start_together_on_a_fresh_database_migrate_it_once() {
    let db = Database::create();
    let redis = Redis::start();
    let url = db.url();
    let r = redis.url();
    let start = |id: &'static str| {
        let (url, r) = (url.clone(), r.clone());
        async move { Server::start(&["--database-url", &url, "--redis-url", &r, "--node-id", id]).await }
    };
    let (a, b, c) = tokio::join!(start("a"), start("b"), start("c"));
    // Each migration applied once, none failed.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .expect("migrations/postgres")
        .count();
    assert_eq!(
        db.query("SELECT count(*) FROM _sqlx_migrations WHERE success"),
        files.to_string()
    );
    assert_eq!(
        db.query("SELECT count(*) FROM _sqlx_migrations WHERE NOT success"),
        "0"
    );
    let mut x = a.member("x", "m").await;
    let _y = b.member("y", "m").await;
    let mut z = c.member("z", "m").await;
    x.request(json!({"type": "send", "room": "m", "text": "up"}))
        .await;
    assert_eq!(z.recv_type("message").await["text"], "up");
}

#[tokio::test]
async fn with_redis_cluster_nodes_chat_over_sharded_pubsub() {
    let db = Database::create();
    let cluster = RedisCluster::start();
    let n = nodes(&db, &cluster.url(), 2, &["--redis-cluster"]).await;
    // Several rooms, so their channels land on different shards.
    let rooms = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let mut pairs = Vec::new();
    for room in rooms {
        let a = n[0].member(&format!("a-{room}"), room).await;
        let b = n[1].member(&format!("b-{room}"), room).await;
        pairs.push((room, a, b));
    }
    for (room, a, b) in &mut pairs {
        let ack = a
            .request(json!({"type": "send", "room": *room, "text": "over shards"}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = b.recv_type("message").await;
        assert_eq!(
            (m["room"].as_str(), m["seq"].as_u64()),
            (Some(*room), Some(1))
        );
    }
    // Sharded channels, on more than one shard.
    let shards_with_channels = cluster
        .nodes
        .iter()
        .filter(|r| {
            r.cli(&["PUBSUB", "SHARDCHANNELS", "hubbub:r:*"])
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(
        shards_with_channels >= 2,
        "room channels spread over shards"
    );
    let (_, a, _) = &mut pairs[0];
    let dm = a
        .request(json!({"type": "direct", "to": "b-bravo", "text": "dm"}))
        .await;
    assert_eq!(dm["type"], "ack");
    let (_, _, b) = &mut pairs[1];
    assert_eq!(b.recv_type("message").await["dm"], "a-alpha");
}

#[tokio::test]
async fn redis_without_a_shared_postgres_database_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args([
            "--redis-url",
            "redis://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run hubbub");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres"), "says what is missing: {err}");
}

#[tokio::test]
async fn a_large_room_spread_over_nodes_gets_cluster_wide_counts_and_pages() {
    let (_db, _redis, n) = cluster(2, &["--presence-events-max", "2"]).await;
    let mut watcher = n[0].member("watcher", "big").await;
    let _x = n[1].member("x", "big").await;
    let ev = watcher.recv_type("member").await;
    assert_eq!(
        ev["user"], "x",
        "within the threshold a join is announced per user"
    );
    let _y = n[1].member("y", "big").await;
    let _z = n[0].member("z", "big").await;
    // Four users on two nodes: over the threshold, so a count, cluster-wide.
    let deadline = Instant::now() + WAIT;
    loop {
        let v = watcher.recv().await;
        assert_ne!(
            v["type"], "member",
            "no per-user events above the threshold: {v}"
        );
        if v["type"] == "members" && v["count"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no members count of 4");
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut cmd = json!({"type": "presence", "room": "big", "limit": 3});
        if let Some(a) = &after {
            cmd["after"] = json!(a);
        }
        let page = watcher.request(cmd).await;
        assert_eq!(page["type"], "presence", "{page}");
        assert_eq!(page["member_count"], 4);
        for m in page["members"].as_array().expect("members") {
            seen.push(m["user"].as_str().expect("user").to_owned());
        }
        after = page["next"].as_str().map(str::to_owned);
        if after.is_none() {
            break;
        }
    }
    assert_eq!(
        seen,
        vec!["watcher", "x", "y", "z"],
        "pages cover both nodes' members once"
    );
}
