//! Shutdown, restart, crash durability, the two stores, the HTTP endpoints,
//! configuration precedence, group commit and batched frames.

mod common;

use common::{Client, Closed, Server, WAIT, seqs, signal};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn sigterm_sends_closing_and_1001_to_every_client_and_exits_0_quickly() {
    let mut s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.guest("bob").await;
    let started = Instant::now();
    let status = {
        let pid = s.pid();
        signal(pid, "TERM");
        let (ca, seen_a) = a.expect_close(WAIT).await;
        let (cb, seen_b) = b.expect_close(WAIT).await;
        assert_eq!(ca, Closed::Code(1001));
        assert_eq!(cb, Closed::Code(1001));
        assert!(seen_a.iter().any(|v| v["type"] == "closing"));
        assert!(
            seen_b
                .iter()
                .any(|v| v["type"] == "closing" && v["reason"].is_string())
        );
        s.terminate_wait().await
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn after_a_restart_rejoin_with_since_recovers_exactly_the_missed_messages() {
    let mut s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.guest("bob").await;
    let j = b.request(json!({"type": "join", "room": "r"})).await;
    let epoch = j["epoch"].clone();
    for i in 1..=3 {
        a.request(json!({"type": "send", "room": "r", "text": format!("before {i}")}))
            .await;
    }
    let mut last_seen = 0;
    while last_seen < 3 {
        last_seen = b.recv_type("message").await["seq"].as_u64().unwrap();
    }
    drop(a);
    drop(b);
    let status = s.terminate().await;
    assert!(status.success());
    s.restart().await;
    let mut a = s.member("alice", "r").await;
    for i in 1..=2 {
        a.request(json!({"type": "send", "room": "r", "text": format!("after {i}")}))
            .await;
    }
    let mut b = s.guest("bob").await;
    let j = b
        .request(json!({"type": "join", "room": "r", "since": {"seq": last_seen, "epoch": epoch}}))
        .await;
    assert_eq!(j["epoch"], epoch, "epoch unchanged across a restart");
    assert_eq!(j["recovered"], true);
    assert_eq!(seqs(&j["messages"]), vec![4, 5]);
    assert_eq!(j["messages"][0]["text"], "after 1");
}

#[tokio::test]
async fn acked_messages_survive_sigkill() {
    let mut s = Server::start(&["--rate-limit", "10000"]).await;
    let mut a = s.member("alice", "r").await;
    for i in 0..200 {
        a.send(json!({"type": "send", "id": i, "room": "r", "text": format!("m{i}")}))
            .await;
    }
    let mut acked = Vec::new();
    while acked.len() < 200 {
        let v = a.recv().await;
        if v["type"] == "ack" {
            acked.push(v["seq"].as_u64().unwrap());
        }
    }
    s.kill().await; // no shutdown, no flush
    s.restart().await;
    let mut b = s.guest("bob").await;
    let h = b
        .request(json!({"type": "history", "room": "r", "limit": 500}))
        .await;
    assert_eq!(seqs(&h["messages"]), (1..=200).collect::<Vec<u64>>());
    assert_eq!(h["messages"][199]["text"], "m199");
}

#[tokio::test]
async fn memory_store_gets_a_fresh_epoch_on_every_start() {
    let mut s = Server::start(&["--store", "memory"]).await;
    let mut a = s.member("alice", "r").await;
    a.request(json!({"type": "send", "room": "r", "text": "gone soon"}))
        .await;
    let epoch1 = a.request(json!({"type": "join", "room": "r"})).await["epoch"].clone();
    drop(a);
    s.restart().await;
    let mut a = s.guest("alice").await;
    let j = a
        .request(json!({"type": "join", "room": "r", "since": {"seq": 1, "epoch": epoch1}}))
        .await;
    assert_ne!(j["epoch"], epoch1);
    assert_eq!(
        j["recovered"], false,
        "history was lost, so nothing is claimed recovered"
    );
    assert_eq!(j["seq"], 0);
}

#[tokio::test]
async fn memory_store_keeps_a_bounded_ring_per_room() {
    let s = Server::start(&[
        "--store",
        "memory",
        "--memory-history",
        "5",
        "--rate-limit",
        "1000",
    ])
    .await;
    let mut a = s.member("alice", "r").await;
    for i in 1..=12 {
        a.request(json!({"type": "send", "room": "r", "text": format!("{i}")}))
            .await;
    }
    let h = a
        .request(json!({"type": "history", "room": "r", "limit": 100}))
        .await;
    assert_eq!(seqs(&h["messages"]), vec![8, 9, 10, 11, 12]);
    // Sequence numbers keep counting past the ring.
    let ack = a
        .request(json!({"type": "send", "room": "r", "text": "13"}))
        .await;
    assert_eq!(ack["seq"], 13);
}

#[tokio::test]
async fn healthz_readyz_and_metrics_answer() {
    let s = Server::start(&[]).await;
    let (code, body) = s.http_get("/healthz").await;
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, _) = s.http_get("/readyz").await;
    assert_eq!(code, 200);
    let mut a = s.member("alice", "r").await;
    a.request(json!({"type": "send", "room": "r", "text": "count me"}))
        .await;
    let (code, m) = s.http_get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "hubbub_connections ",
        "hubbub_connections_total ",
        "hubbub_rooms ",
        "hubbub_messages_in_total{type=\"send\"}",
        "hubbub_messages_out_total ",
        "hubbub_deliveries_total ",
        "hubbub_store_commit_seconds_bucket{le=",
        "hubbub_store_commit_seconds_count ",
    ] {
        assert!(m.contains(name), "metrics lack {name:?}:\n{m}");
    }
    assert!(m.contains("# HELP hubbub_deliveries_total"));
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[tokio::test]
async fn concurrent_sends_are_group_committed() {
    let s = Server::start(&["--rate-limit", "10000"]).await;
    let mut tasks = Vec::new();
    for n in 0..10 {
        let url = s.url();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            c.request(json!({"type": "hello", "name": format!("u{n}")}))
                .await;
            c.request(json!({"type": "join", "room": format!("g{n}")}))
                .await;
            for i in 0..100 {
                c.send(json!({"type": "send", "room": format!("g{n}"), "text": format!("{i}")}))
                    .await;
            }
            c.await_acks(100).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, m) = s.http_get("/metrics").await;
    let stored = metric(&m, "hubbub_messages_stored_total");
    let commits = metric(&m, "hubbub_store_commit_batch_size_count");
    assert_eq!(stored, 1000.0);
    assert!(
        commits < stored / 2.0,
        "{commits} commits for {stored} messages: not grouped"
    );
}

/// A connection that said hello with `batch: true` (as "batcher") and joined `room`.
async fn batching_member(s: &Server, room: &str) -> Client {
    let mut reader = Client::connect(&s.url()).await;
    reader
        .request(json!({"type": "hello", "name": "batcher", "batch": true}))
        .await;
    reader.request(json!({"type": "join", "room": room})).await;
    reader
}

#[tokio::test]
async fn batch_hello_lets_the_server_pack_several_messages_per_frame() {
    let s = Server::start(&["--rate-limit", "10000"]).await;
    let mut reader = batching_member(&s, "b").await;
    let mut a = s.member("alice", "b").await;
    for i in 0..300 {
        a.send(json!({"type": "send", "room": "b", "text": format!("{i}")}))
            .await;
    }
    // Count raw frames and the objects they carry.
    let mut frames = 0;
    let mut seqs_seen = Vec::new();
    while seqs_seen.len() < 300 {
        if let Message::Text(t) = next_frame(&mut reader).await {
            frames += 1;
            for line in t.as_str().split('\n') {
                let v: Value = serde_json::from_str(line).expect("each line is one JSON object");
                if v["type"] == "message" {
                    seqs_seen.push(v["seq"].as_u64().unwrap());
                }
            }
        }
    }
    assert_eq!(seqs_seen, (1..=300).collect::<Vec<u64>>());
    assert!(
        frames < 300,
        "{frames} frames for 300 messages: nothing was batched"
    );
}

/// The message frames that reach a batching `reader` until `n` messages have, each
/// with when it arrived: (arrival, seqs it carries).
async fn batched_arrivals(reader: &mut Client, n: usize) -> Vec<(std::time::Instant, Vec<u64>)> {
    let mut arrivals = Vec::new();
    let mut seen = 0;
    while seen < n {
        let Message::Text(t) = next_frame(reader).await else {
            continue;
        };
        let mut seqs = Vec::new();
        for line in t.as_str().split('\n') {
            let v: Value = serde_json::from_str(line).expect("each line is one JSON object");
            if v["type"] == "message" {
                seqs.push(v["seq"].as_u64().expect("seq"));
            }
        }
        if !seqs.is_empty() {
            seen += seqs.len();
            arrivals.push((std::time::Instant::now(), seqs));
        }
    }
    arrivals
}

#[tokio::test]
async fn a_busy_rooms_messages_reach_a_batching_connection_a_batch_delay_apart() {
    let s = Server::start(&["--rate-limit", "10000", "--batch-delay-ms", "1000"]).await;
    let mut reader = batching_member(&s, "b").await;
    let mut a = s.member("alice", "b").await;
    until_member_event(&mut reader).await;
    // The room is quiet: the first message leaves at once.
    a.send(json!({"type": "send", "room": "b", "text": "first"}))
        .await;
    let first = batched_arrivals(&mut reader, 1).await;
    assert_eq!(first[0].1, [1]);
    // Now it is busy: the next four wait for the delay since the first.
    for i in 0..4 {
        a.send(json!({"type": "send", "room": "b", "text": format!("{i}")}))
            .await;
    }
    a.await_acks(5).await;
    let rest = batched_arrivals(&mut reader, 4).await;
    let seqs: Vec<u64> = rest.iter().flat_map(|(_, s)| s.clone()).collect();
    assert_eq!(seqs, [2, 3, 4, 5], "every message, once, in order");
    let waited = rest[0].0 - first[0].0;
    assert!(
        waited >= std::time::Duration::from_millis(500),
        "the next write came {waited:?} after the first"
    );
}

/// Wait for the `member` event of someone joining: it is quiet (it may wait for
/// the presence tick, whose wake-up would write anything held), so a test of
/// when messages arrive lets it arrive first.
async fn until_member_event(reader: &mut Client) {
    loop {
        if let Message::Text(t) = next_frame(reader).await
            && t.as_str().contains(r#""type":"member""#)
        {
            return;
        }
    }
}

/// The next WebSocket frame `reader` gets (it must come, and the connection stay
/// open).
async fn next_frame(reader: &mut Client) -> Message {
    tokio::time::timeout(WAIT, reader.ws.next())
        .await
        .expect("frame")
        .expect("open")
        .expect("ok")
}

#[tokio::test]
async fn a_batch_delay_never_closes_a_batching_connection_that_keeps_up() {
    // A second's delay and a queue of 16 frames: 60 messages in well under the
    // delay, each its own commit (one in flight), would overflow a queue held for
    // the whole delay; half full, it is written at once instead.
    let s = Server::start(&[
        "--rate-limit",
        "10000",
        "--batch-delay-ms",
        "1000",
        "--send-queue",
        "16",
    ])
    .await;
    let mut reader = batching_member(&s, "b").await;
    let mut a = s.member("alice", "b").await;
    until_member_event(&mut reader).await;
    a.send(json!({"type": "send", "room": "b", "text": "first"}))
        .await;
    a.await_acks(1).await;
    assert_eq!(batched_arrivals(&mut reader, 1).await[0].1, [1]);
    for i in 0..60 {
        a.send(json!({"type": "send", "room": "b", "text": format!("{i}")}))
            .await;
        a.await_acks(1).await;
    }
    let rest = batched_arrivals(&mut reader, 60).await;
    let seqs: Vec<u64> = rest.iter().flat_map(|(_, s)| s.clone()).collect();
    assert_eq!(
        seqs,
        (2..=61).collect::<Vec<u64>>(),
        "every message, once, in order, and the connection still open"
    );
}

#[tokio::test]
async fn without_batch_every_frame_is_exactly_one_object() {
    let s = Server::start(&["--rate-limit", "10000"]).await;
    let mut reader = s.member("plain", "b").await;
    let mut a = s.member("alice", "b").await;
    for i in 0..100 {
        a.send(json!({"type": "send", "room": "b", "text": format!("{i}")}))
            .await;
    }
    let mut n = 0;
    while n < 100 {
        if let Message::Text(t) = next_frame(&mut reader).await {
            assert!(!t.as_str().contains('\n'));
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "message" {
                n += 1;
            }
        }
    }
}

#[tokio::test]
async fn flags_override_environment_which_overrides_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hubbub.toml");
    std::fs::write(
        &file,
        "max_text = 100\nrate_limit = 7\nmax_rooms_per_conn = 3\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let s = Server::start_with_env(
        dir.path(),
        &["--config", f, "--max-text", "300"],
        &[("HUBBUB_MAX_TEXT", "200"), ("HUBBUB_RATE_LIMIT", "9")],
    )
    .await;
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "name": "cfg"})).await;
    assert_eq!(w["limits"]["max_text"], 300, "flag wins");
    assert_eq!(w["limits"]["rate_limit"], 9, "environment beats the file");
    assert_eq!(
        w["limits"]["max_rooms_per_conn"], 3,
        "the file beats the default"
    );
}

#[tokio::test]
async fn a_bad_config_value_is_refused_at_start_with_a_clear_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["--store", "postgresx", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store"), "{err}");
}

#[tokio::test]
async fn sends_in_flight_at_sigterm_are_acked_before_the_close() {
    let mut s = Server::start(&["--rate-limit", "10000"]).await;
    let mut a = s.member("alice", "r").await;
    for i in 0..300 {
        a.send(json!({"type": "send", "id": i, "room": "r", "text": format!("{i}")}))
            .await;
    }
    signal(s.pid(), "TERM");
    let (closed, seen) = a.expect_close(WAIT).await;
    assert_eq!(closed, Closed::Code(1001));
    let acks: Vec<u64> = seen
        .iter()
        .filter(|v| v["type"] == "ack")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert!(s.terminate_wait().await.success());
    // Every acked message is on disk after the restart.
    s.restart().await;
    let mut b = s.guest("bob").await;
    let h = b
        .request(json!({"type": "history", "room": "r", "limit": 500}))
        .await;
    let stored = seqs(&h["messages"]);
    for seq in &acks {
        assert!(
            stored.contains(seq),
            "acked seq {seq} missing after restart"
        );
    }
    assert_eq!(
        stored,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "gapless"
    );
}

#[tokio::test]
async fn a_rejoin_older_than_the_memory_ring_is_not_claimed_recovered() {
    let s = Server::start(&[
        "--store",
        "memory",
        "--memory-history",
        "5",
        "--rate-limit",
        "1000",
    ])
    .await;
    let mut a = s.member("alice", "r").await;
    let epoch = a.request(json!({"type": "join", "room": "r"})).await["epoch"].clone();
    for i in 1..=12 {
        a.request(json!({"type": "send", "room": "r", "text": format!("{i}")}))
            .await;
    }
    let mut b = s.guest("bob").await;
    // Messages 2..=7 were evicted from the ring: they cannot be recovered.
    let j = b
        .request(json!({"type": "join", "room": "r", "since": {"seq": 1, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], false, "{j}");
    assert_eq!(seqs(&j["messages"]), vec![8, 9, 10, 11, 12]);
    // Within the ring, recovery still works.
    let j = b
        .request(json!({"type": "join", "room": "r", "since": {"seq": 9, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], true);
    assert_eq!(seqs(&j["messages"]), vec![10, 11, 12]);
}

#[tokio::test]
async fn a_sqlite_database_url_keeps_history_in_that_file_across_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("nested").join("chat.db");
    let url = format!("sqlite://{}", file.display());
    let mut server = Server::start(&["--database-url", &url]).await;
    let mut alice = server.member("alice", "kept").await;
    let ack = alice
        .request(json!({"type": "send", "room": "kept", "text": "in the file"}))
        .await;
    assert_eq!(ack["type"], "ack");
    assert!(file.is_file(), "the database is the named file");
    assert!(
        !server.dir.join("data").join("hubbub.db").exists(),
        "not in --data-dir"
    );
    server.restart().await;
    let mut back = server.guest("alice").await;
    let j = back.request(json!({"type": "join", "room": "kept"})).await;
    assert_eq!(j["messages"][0]["text"], "in the file");
}
