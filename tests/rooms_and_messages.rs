//! Rooms, messages, ordering, idempotency, presence, typing, DMs and history.

mod common;

use common::{Server, seqs};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn join_of_an_empty_room_has_seq_0_and_lists_self_as_member() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    let j = c.request(json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(j["type"], "joined");
    assert_eq!(j["room"], "lobby");
    assert_eq!(j["seq"], 0);
    assert!(j["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(j["members"], json!([{"user": "alice", "name": "alice"}]));
    assert_eq!(j["messages"], json!([]));
    assert_eq!(j["recovered"], false);
}

#[tokio::test]
async fn send_is_acked_and_delivered_to_every_member_including_the_sender() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.member("bob", "r").await;
    a.send(json!({"type": "send", "id": 5, "room": "r", "text": "hi", "meta": {"k": 1}, "client_id": "c1"})).await;
    let ack = a.reply_to(json!(5)).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["room"], "r");
    assert_eq!(ack["seq"], 1);
    assert!(ack["ts"].as_i64().unwrap() > 1_600_000_000_000);
    for c in [&mut a, &mut b] {
        let m = c.recv_type("message").await;
        assert_eq!(m["room"], "r");
        assert_eq!(m["seq"], 1);
        assert_eq!(m["from"], "alice");
        assert_eq!(m["name"], "alice");
        assert_eq!(m["text"], "hi");
        assert_eq!(m["meta"], json!({"k": 1}));
        assert_eq!(m["client_id"], "c1");
        assert_eq!(m["ts"], ack["ts"]);
        assert!(m.get("id").is_none(), "events carry no id: {m}");
    }
}

#[tokio::test]
async fn text_is_not_trimmed_and_unicode_counts_code_points() {
    let s = Server::start(&["--max-text", "5"]).await;
    let mut a = s.member("alice", "r").await;
    let ack = a
        .request(json!({"type": "send", "room": "r", "text": "  é😀 "}))
        .await;
    assert_eq!(ack["type"], "ack", "5 code points fit: {ack}");
    assert_eq!(a.recv_type("message").await["text"], "  é😀 ");
    let e = a
        .request(json!({"type": "send", "room": "r", "text": "123456"}))
        .await;
    assert_eq!(e["code"], "too_large");
}

#[tokio::test]
async fn pipelined_sends_get_increasing_seq_in_order_sent() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    for i in 0..30 {
        a.send(json!({"type": "send", "id": i, "room": "r", "text": format!("m{i}")}))
            .await;
    }
    let mut acks = Vec::new();
    let mut msgs = Vec::new();
    while acks.len() < 30 || msgs.len() < 30 {
        let v = a.recv().await;
        match v["type"].as_str() {
            Some("ack") => acks.push((v["id"].as_i64().unwrap(), v["seq"].as_u64().unwrap())),
            Some("message") => msgs.push(v["text"].as_str().unwrap().to_string()),
            _ => {}
        }
    }
    for (id, seq) in acks {
        assert_eq!(seq, id as u64 + 1);
    }
    let expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(msgs, expected);
}

#[tokio::test]
async fn concurrent_senders_all_receivers_see_one_gapless_order() {
    let s = Server::start(&["--rate-limit", "1000"]).await;
    let mut receivers = Vec::new();
    for name in ["r1", "r2", "r3"] {
        receivers.push(s.member(name, "busy").await);
    }
    let senders: Vec<_> = ["s1", "s2"]
        .into_iter()
        .map(|name| {
            let url = s.url();
            tokio::spawn(async move {
                let mut c = common::Client::connect(&url).await;
                c.request(json!({"type": "hello", "name": name})).await;
                c.request(json!({"type": "join", "room": "busy"})).await;
                for i in 0..200 {
                    c.send(json!({"type": "send", "room": "busy", "text": format!("{name}-{i}")}))
                        .await;
                }
                // Wait for our 200 acks before leaving.
                c.await_acks(200).await;
            })
        })
        .collect();
    let mut orders: Vec<Vec<(u64, String)>> = Vec::new();
    for r in receivers.iter_mut() {
        let mut got = Vec::new();
        while got.len() < 400 {
            let m = r.recv_type("message").await;
            got.push((
                m["seq"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            ));
        }
        orders.push(got);
    }
    for t in senders {
        t.await.unwrap();
    }
    let seqs: Vec<u64> = orders[0].iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=400).collect::<Vec<u64>>(),
        "gapless from 1, in order"
    );
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    // Each sender's own messages keep their send order.
    for name in ["s1", "s2"] {
        let mine: Vec<&String> = orders[0]
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with(name))
            .collect();
        let expected: Vec<String> = (0..200).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn same_client_id_gets_the_original_seq_and_one_delivery() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.member("bob", "r").await;
    let first = a
        .request(json!({"type": "send", "room": "r", "text": "once", "client_id": "abc"}))
        .await;
    let again = a
        .request(json!({"type": "send", "room": "r", "text": "once", "client_id": "abc"}))
        .await;
    assert_eq!(first["seq"], 1);
    assert_eq!(again["type"], "ack");
    assert_eq!(again["seq"], 1, "a resend is acked with the original seq");
    // From another tab of the same user too.
    let mut a2 = s.member("alice", "r").await;
    let third = a2
        .request(json!({"type": "send", "room": "r", "text": "once", "client_id": "abc"}))
        .await;
    assert_eq!(third["seq"], 1);
    // A different user with the same client_id is a different message.
    let other = b
        .request(json!({"type": "send", "room": "r", "text": "mine", "client_id": "abc"}))
        .await;
    assert_eq!(other["seq"], 2);
    let m = b.recv_type("message").await;
    assert_eq!(m["seq"], 1);
    let m = b.recv_type("message").await;
    assert_eq!(m["seq"], 2, "the resends were not delivered again");
    let h = b.request(json!({"type": "history", "room": "r"})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn client_id_idempotency_survives_a_restart() {
    let mut s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let first = a
        .request(json!({"type": "send", "room": "r", "text": "x", "client_id": "k1"}))
        .await;
    drop(a);
    s.restart().await;
    let mut a = s.member("alice", "r").await;
    let again = a
        .request(json!({"type": "send", "room": "r", "text": "x", "client_id": "k1"}))
        .await;
    assert_eq!(again["seq"], first["seq"]);
}

#[tokio::test]
async fn send_and_typing_need_the_room_joined() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    let e = a
        .request(json!({"type": "send", "room": "r", "text": "x"}))
        .await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("not_joined"))
    );
    let e = a.request(json!({"type": "typing", "room": "r"})).await;
    assert_eq!(e["code"], "not_joined");
    let e = a.request(json!({"type": "leave", "room": "r"})).await;
    assert_eq!(e["code"], "not_joined");
}

#[tokio::test]
async fn leave_answers_left_and_stops_delivery() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.member("bob", "r").await;
    let l = b.request(json!({"type": "leave", "room": "r"})).await;
    assert_eq!(l["type"], "left");
    assert_eq!(l["room"], "r");
    a.request(json!({"type": "send", "room": "r", "text": "after"}))
        .await;
    b.expect_no("message", Duration::from_millis(300)).await;
}

#[tokio::test]
async fn rejoin_answers_joined_again_without_a_second_member_event() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut b = s.member("bob", "r").await;
    assert_eq!(a.recv_type("member").await["user"], "bob");
    let j = b.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(j["type"], "joined");
    assert_eq!(j["members"].as_array().unwrap().len(), 2);
    a.expect_no("member", Duration::from_millis(300)).await;
}

#[tokio::test]
async fn join_beyond_max_rooms_per_conn_is_too_large() {
    let s = Server::start(&["--max-rooms-per-conn", "2"]).await;
    let mut a = s.guest("alice").await;
    a.request(json!({"type": "join", "room": "a"})).await;
    a.request(json!({"type": "join", "room": "b"})).await;
    let e = a.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(e["code"], "too_large");
    // Rejoining a room already joined is still fine.
    assert_eq!(
        a.request(json!({"type": "join", "room": "a"})).await["type"],
        "joined"
    );
}

#[tokio::test]
async fn presence_is_per_user_not_per_connection() {
    let s = Server::start(&[]).await;
    let mut watcher = s.member("watcher", "r").await;
    let tab1 = s.member("alice", "r").await;
    let j = watcher.recv_type("member").await;
    assert_eq!(
        (j["user"].as_str(), j["event"].as_str(), j["room"].as_str()),
        (Some("alice"), Some("join"), Some("r"))
    );
    let tab2 = s.member("alice", "r").await;
    watcher
        .expect_no("member", Duration::from_millis(300))
        .await;
    let p = watcher
        .request(json!({"type": "presence", "room": "r"}))
        .await;
    assert_eq!(p["type"], "presence");
    assert_eq!(
        p["members"],
        json!([{"user": "alice", "name": "alice"}, {"user": "watcher", "name": "watcher"}])
    );
    tab1.close().await;
    watcher
        .expect_no("member", Duration::from_millis(300))
        .await;
    tab2.close().await;
    let l = watcher.recv_type("member").await;
    assert_eq!(
        (l["user"].as_str(), l["event"].as_str()),
        (Some("alice"), Some("leave"))
    );
}

#[tokio::test]
async fn a_connection_gets_no_member_event_about_its_own_user() {
    let s = Server::start(&[]).await;
    let mut tab1 = s.member("alice", "r").await;
    let _tab2 = s.member("alice", "r").await;
    let _bob = s.member("bob", "r").await;
    let m = tab1.recv_type("member").await;
    assert_eq!(m["user"], "bob");
}

#[tokio::test]
async fn typing_reaches_others_but_not_the_typists_own_connections() {
    let s = Server::start(&[]).await;
    let mut a = s.member("alice", "r").await;
    let mut a2 = s.member("alice", "r").await;
    let mut b = s.member("bob", "r").await;
    a.send(json!({"type": "typing", "room": "r"})).await;
    let t = b.recv_type("typing").await;
    assert_eq!(
        (t["room"].as_str(), t["user"].as_str(), t["name"].as_str()),
        (Some("r"), Some("alice"), Some("alice"))
    );
    a2.expect_no("typing", Duration::from_millis(300)).await;
    a.expect_no("typing", Duration::from_millis(100)).await;
    // Never stored.
    let h = b.request(json!({"type": "history", "room": "r"})).await;
    assert_eq!(h["messages"], json!([]));
}

#[tokio::test]
async fn ping_gets_pong_with_the_same_id() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    a.send(json!({"type": "ping", "id": "p"})).await;
    let p = a.recv().await;
    assert_eq!(p, json!({"type": "pong", "id": "p"}));
}

async fn fill(c: &mut common::Client, room: &str, n: usize) {
    for i in 1..=n {
        let a = c
            .request(json!({"type": "send", "room": room, "text": format!("m{i}")}))
            .await;
        assert_eq!(a["type"], "ack", "{a}");
    }
}

#[tokio::test]
async fn history_before_is_exclusive_and_limit_takes_the_newest_ascending() {
    let s = Server::start(&["--rate-limit", "1000"]).await;
    let mut a = s.member("alice", "h").await;
    fill(&mut a, "h", 20).await;
    let h = a
        .request(json!({"type": "history", "room": "h", "before": 11, "limit": 3}))
        .await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["room"], "h");
    assert_eq!(seqs(&h["messages"]), vec![8, 9, 10]);
    let h = a
        .request(json!({"type": "history", "room": "h", "limit": 5}))
        .await;
    assert_eq!(seqs(&h["messages"]), vec![16, 17, 18, 19, 20]);
    let h = a.request(json!({"type": "history", "room": "h"})).await;
    assert_eq!(seqs(&h["messages"]), (1..=20).collect::<Vec<_>>());
    let h = a
        .request(json!({"type": "history", "room": "h", "before": 1}))
        .await;
    assert_eq!(h["messages"], json!([]));
    // History needs permission only, not membership.
    let mut b = s.guest("bob").await;
    let h = b
        .request(json!({"type": "history", "room": "h", "limit": 1}))
        .await;
    assert_eq!(seqs(&h["messages"]), vec![20]);
}

#[tokio::test]
async fn join_history_count_returns_the_latest_messages() {
    let s = Server::start(&["--rate-limit", "1000"]).await;
    let mut a = s.member("alice", "h").await;
    fill(&mut a, "h", 10).await;
    let mut b = s.guest("bob").await;
    let j = b
        .request(json!({"type": "join", "room": "h", "history": 3}))
        .await;
    assert_eq!(j["seq"], 10);
    assert_eq!(seqs(&j["messages"]), vec![8, 9, 10]);
    assert_eq!(j["messages"][0]["type"], "message");
    assert_eq!(j["messages"][0]["room"], "h");
    assert_eq!(j["recovered"], false);
}

#[tokio::test]
async fn join_with_since_returns_exactly_the_missed_messages() {
    let s = Server::start(&["--rate-limit", "1000"]).await;
    let mut a = s.member("alice", "h").await;
    fill(&mut a, "h", 3).await;
    let mut b = s.guest("bob").await;
    let j = b.request(json!({"type": "join", "room": "h"})).await;
    let epoch = j["epoch"].clone();
    b.request(json!({"type": "leave", "room": "h"})).await;
    fill(&mut a, "h", 4).await; // seq 4..7
    let j = b
        .request(json!({"type": "join", "room": "h", "since": {"seq": 3, "epoch": epoch}}))
        .await;
    assert_eq!(seqs(&j["messages"]), vec![4, 5, 6, 7]);
    assert_eq!(j["recovered"], true);
    assert_eq!(j["seq"], 7);
    // Nothing missed is recovered too.
    let j = b
        .request(json!({"type": "join", "room": "h", "since": {"seq": 7, "epoch": epoch}}))
        .await;
    assert_eq!(j["messages"], json!([]));
    assert_eq!(j["recovered"], true);
}

#[tokio::test]
async fn join_with_since_from_another_epoch_is_not_recovered() {
    let s = Server::start(&["--rate-limit", "1000"]).await;
    let mut a = s.member("alice", "h").await;
    fill(&mut a, "h", 5).await;
    let mut b = s.guest("bob").await;
    let j = b
        .request(json!({"type": "join", "room": "h", "history": 2, "since": {"seq": 1, "epoch": "not-this-one"}}))
        .await;
    assert_eq!(j["recovered"], false);
    assert_eq!(seqs(&j["messages"]), vec![4, 5]);
}

#[tokio::test]
async fn rejoin_missing_more_than_1000_is_not_recovered_and_gets_latest_history() {
    // The sender pipelines 1005 sends: give its queue room for the acks and echoes.
    let s = Server::start(&["--rate-limit", "100000", "--send-queue", "4096"]).await;
    let mut a = s.member("alice", "big").await;
    let j = a.request(json!({"type": "join", "room": "big"})).await;
    let epoch = j["epoch"].clone();
    for i in 0..1005 {
        a.send(json!({"type": "send", "room": "big", "text": format!("{i}")}))
            .await;
    }
    a.await_acks(1005).await;
    let mut b = s.guest("bob").await;
    let j = b
        .request(json!({"type": "join", "room": "big", "history": 10, "since": {"seq": 2, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], false);
    assert_eq!(seqs(&j["messages"]), (996..=1005).collect::<Vec<_>>());
    // Exactly 1000 missed is still recovered.
    let j = b
        .request(json!({"type": "join", "room": "big", "since": {"seq": 5, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], true);
    assert_eq!(j["messages"].as_array().unwrap().len(), 1000);
}

#[tokio::test]
async fn direct_message_reaches_both_users_every_connection_and_nobody_else() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    let mut a2 = s.guest("alice").await;
    let mut b = s.guest("bob").await;
    let mut b2 = s.guest("bob").await;
    let mut c = s.guest("carol").await;
    let ack = a
        .request(json!({"type": "direct", "to": "bob", "text": "psst"}))
        .await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["dm"], "bob");
    assert_eq!(ack["seq"], 1);
    for x in [&mut b, &mut b2] {
        let m = x.recv_type("message").await;
        assert_eq!(
            (m["dm"].as_str(), m["from"].as_str(), m["text"].as_str()),
            (Some("alice"), Some("alice"), Some("psst"))
        );
        assert!(m.get("room").is_none());
    }
    for x in [&mut a, &mut a2] {
        let m = x.recv_type("message").await;
        assert_eq!(
            m["dm"], "bob",
            "dm is the other party from the receiver's view"
        );
    }
    c.expect_no("message", Duration::from_millis(300)).await;
    // The pair has its own sequence, shared by both directions.
    let ack = b
        .request(json!({"type": "direct", "to": "alice", "text": "hey"}))
        .await;
    assert_eq!(
        (ack["dm"].as_str(), ack["seq"].as_u64()),
        (Some("alice"), Some(2))
    );
}

#[tokio::test]
async fn direct_to_an_offline_user_is_stored_and_found_in_history() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    let ack = a
        .request(json!({"type": "direct", "to": "dave", "text": "when you're back"}))
        .await;
    assert_eq!(ack["type"], "ack");
    let mut d = s.guest("dave").await;
    let h = d.request(json!({"type": "history", "dm": "alice"})).await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["dm"], "alice");
    assert_eq!(h["messages"][0]["text"], "when you're back");
    assert_eq!(h["messages"][0]["dm"], "alice");
}

#[tokio::test]
async fn direct_to_oneself_is_bad_request() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    let e = a
        .request(json!({"type": "direct", "to": "alice", "text": "me"}))
        .await;
    assert_eq!(e["code"], "bad_request");
}

#[tokio::test]
async fn direct_messages_are_idempotent_by_client_id() {
    let s = Server::start(&[]).await;
    let mut a = s.guest("alice").await;
    let one = a
        .request(json!({"type": "direct", "to": "bob", "text": "x", "client_id": "d1"}))
        .await;
    let two = a
        .request(json!({"type": "direct", "to": "bob", "text": "x", "client_id": "d1"}))
        .await;
    assert_eq!(one["seq"], two["seq"]);
    let h = a.request(json!({"type": "history", "dm": "bob"})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_rejoin_recovering_megabytes_is_delivered_not_closed_as_slow() {
    // 300 messages of 4,000 characters: a ~1.2 MB joined reply, over the 1 MiB queue cap
    // (and over the default reply budget, raised here).
    let s = Server::start(&[
        "--rate-limit",
        "100000",
        "--send-queue",
        "4096",
        "--max-reply-bytes",
        "4000000",
    ])
    .await;
    let mut a = s.member("alice", "big").await;
    let epoch = a.request(json!({"type": "join", "room": "big"})).await["epoch"].clone();
    let mut b = s.member("bob", "big").await;
    b.request(json!({"type": "leave", "room": "big"})).await;
    let text = "w".repeat(4000);
    for _ in 0..300 {
        let ack = a
            .request(json!({"type": "send", "room": "big", "text": text}))
            .await;
        assert_eq!(ack["type"], "ack");
    }
    // Queue something first, then the big reply.
    b.send(json!({"type": "ping", "id": "first"})).await;
    let j = b
        .request(json!({"type": "join", "room": "big", "since": {"seq": 0, "epoch": epoch}}))
        .await;
    assert_eq!(j["recovered"], true);
    assert_eq!(j["messages"].as_array().unwrap().len(), 300);
}

/// Sends `n` messages from a fresh member of `room` without waiting between
/// them, then checks each of `members` gets every one once, in `seq` order.
async fn burst_reaches_every_member_once_in_order(s: &Server, room: &str, members: usize, n: u64) {
    let mut listeners = Vec::new();
    for i in 0..members {
        listeners.push(s.member(&format!("m{i}"), room).await);
    }
    let mut sender = s.member("sender", room).await;
    for i in 0..n {
        sender
            .send(json!({"type": "send", "room": room, "text": format!("burst {i}"), "client_id": format!("b{i}")}))
            .await;
    }
    for l in &mut listeners {
        let mut got = Vec::new();
        while (got.len() as u64) < n {
            let m = l.recv_type("message").await;
            assert_eq!(m["type"], "message", "{m}");
            got.push((m["seq"].as_u64().expect("seq"), m["text"].clone()));
        }
        let expected: Vec<(u64, serde_json::Value)> = (0..n)
            .map(|i| (i + 1, json!(format!("burst {i}"))))
            .collect();
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn idle_members_get_a_burst_written_by_the_writer_threads_once_and_in_order() {
    let s = Server::start(&["--writer-threads", "2", "--rate-limit", "1000"]).await;
    burst_reaches_every_member_once_in_order(&s, "lobby", 40, 300).await;
    assert!(
        s.metric("hubbub_direct_writes_total").await > 0.0,
        "idle members' sessions parked their sockets and the writers wrote into them"
    );
}

#[tokio::test]
async fn with_writer_threads_0_every_session_writes_its_own_deliveries() {
    let s = Server::start(&["--writer-threads", "0", "--rate-limit", "1000"]).await;
    burst_reaches_every_member_once_in_order(&s, "lobby", 40, 300).await;
    assert_eq!(s.metric("hubbub_direct_writes_total").await, 0.0);
}
