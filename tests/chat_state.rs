//! Chat state (PROTOCOL.md 1.1, "Membership and read state" and "Edits, deletes and
//! reactions"), black-box over real WebSockets: one node on SQLite (and on the
//! memory store), three nodes on PostgreSQL + Redis, and an upgrade from a database
//! written by the release before chat state.

mod common;

use common::services::{Database, Redis};
use common::{Client, Server, fixture, jwt_hs256, now_secs, seqs};
use serde_json::{Value, json};
use std::time::Duration;

/// A reply must be of type `ty` before its fields are compared.
fn expect_type(v: &Value, ty: &str) {
    assert_eq!(v["type"], ty, "expected a {ty}, got {v}");
}

fn expect_error(v: &Value, code: &str) {
    expect_type(v, "error");
    assert_eq!(v["code"], code, "{v}");
}

/// Send `cmd` and return its ack's seq.
async fn acked(c: &mut Client, cmd: Value) -> u64 {
    let ack = c.request(cmd).await;
    expect_type(&ack, "ack");
    ack["seq"].as_u64().expect("seq")
}

async fn say(c: &mut Client, room: &str, text: &str) -> u64 {
    acked(c, json!({"type": "send", "room": room, "text": text})).await
}

/// The next event of type `ty` in `room` (others skipped).
async fn next_in(c: &mut Client, ty: &str) -> Value {
    c.recv_type(ty).await
}

/// `history` with `current: true` of a room.
async fn current(c: &mut Client, room: &str) -> Vec<Value> {
    let h = c
        .request(json!({"type": "history", "room": room, "current": true}))
        .await;
    expect_type(&h, "history");
    h["messages"].as_array().expect("messages").clone()
}

/// The room's latest seq, as `joined` says.
async fn latest_seq(c: &mut Client, room: &str) -> u64 {
    let j = c.request(json!({"type": "join", "room": room})).await;
    expect_type(&j, "joined");
    j["seq"].as_u64().expect("seq")
}

fn entry_for<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .expect("a list")
        .iter()
        .find(|e| e[key] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

// ---------------------------------------------------------------- edits

#[tokio::test]
async fn an_edit_reaches_every_member_and_is_the_current_text() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let seq = say(&mut alice, "r", "helo").await;
    next_in(&mut bob, "message").await;
    let edit = acked(
        &mut alice,
        json!({"type": "edit", "room": "r", "target": seq, "text": "hello"}),
    )
    .await;
    assert_eq!(edit, seq + 1, "an edit takes the next seq");
    let ev = next_in(&mut bob, "edit").await;
    assert_eq!(
        (
            &ev["room"],
            &ev["seq"],
            &ev["target"],
            &ev["from"],
            &ev["text"]
        ),
        (
            &json!("r"),
            &json!(edit),
            &json!(seq),
            &json!("alice"),
            &json!("hello")
        )
    );
    let cur = current(&mut bob, "r").await;
    assert_eq!(cur.len(), 1, "current history lists messages only: {cur:?}");
    assert_eq!(cur[0]["text"], "hello");
    assert!(cur[0]["edited_ts"].as_i64().is_some(), "{}", cur[0]);
}

#[tokio::test]
async fn editing_someone_elses_message_is_forbidden_and_stores_nothing() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let seq = say(&mut alice, "r", "mine").await;
    let r = bob
        .request(json!({"type": "edit", "room": "r", "target": seq, "text": "yours"}))
        .await;
    expect_error(&r, "forbidden");
    let r = bob
        .request(json!({"type": "delete", "room": "r", "target": seq}))
        .await;
    expect_error(&r, "forbidden");
    assert_eq!(latest_seq(&mut bob, "r").await, seq, "nothing stored");
}

#[tokio::test]
async fn a_target_that_is_not_a_message_of_the_channel_is_not_found() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let j = alice
        .request(json!({"type": "join", "room": "other"}))
        .await;
    expect_type(&j, "joined");
    let elsewhere = say(&mut alice, "other", "in another room").await;
    let seq = say(&mut alice, "r", "x").await;
    let edit = acked(
        &mut alice,
        json!({"type": "edit", "room": "r", "target": seq, "text": "y"}),
    )
    .await;
    for target in [seq + 50, edit] {
        let r = alice
            .request(json!({"type": "edit", "room": "r", "target": target, "text": "z"}))
            .await;
        expect_error(&r, "not_found");
    }
    // Seq 2 of "r" is the edit; seq `elsewhere` of "other" is not a message of "r".
    assert_eq!(elsewhere, 1);
    let r = alice
        .request(json!({"type": "react", "room": "r", "target": edit, "emoji": "👍", "on": true}))
        .await;
    expect_error(&r, "not_found");
    assert_eq!(latest_seq(&mut alice, "r").await, edit, "nothing stored");
}

#[tokio::test]
async fn an_edit_over_the_text_limit_is_too_large() {
    let s = Server::start(&["--max-text", "5"]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "hi").await;
    let r = alice
        .request(json!({"type": "edit", "room": "r", "target": seq, "text": "too long"}))
        .await;
    expect_error(&r, "too_large");
    let r = alice
        .request(json!({"type": "edit", "room": "r", "target": seq, "text": ""}))
        .await;
    expect_error(&r, "bad_request");
    assert_eq!(latest_seq(&mut alice, "r").await, seq);
}

#[tokio::test]
async fn editing_needs_the_room_joined_like_send() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "x").await;
    let left = alice.request(json!({"type": "leave", "room": "r"})).await;
    expect_type(&left, "left");
    let r = alice
        .request(json!({"type": "edit", "room": "r", "target": seq, "text": "y"}))
        .await;
    expect_error(&r, "not_joined");
}

#[tokio::test]
async fn a_repeated_edit_with_its_client_id_is_stored_once() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "x").await;
    let cmd = json!({"type": "edit", "room": "r", "target": seq, "text": "y", "client_id": "e1"});
    let first = acked(&mut alice, cmd.clone()).await;
    let again = acked(&mut alice, cmd).await;
    assert_eq!(first, again);
    assert_eq!(latest_seq(&mut alice, "r").await, first);
}

// ---------------------------------------------------------------- deletes

#[tokio::test]
async fn a_deleted_messages_text_is_gone_from_the_database() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "secret-original").await;
    acked(
        &mut alice,
        json!({"type": "edit", "room": "r", "target": seq, "text": "secret-edit"}),
    )
    .await;
    let del = acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    assert_eq!(del, seq + 2);
    let db = rusqlite::Connection::open(s.dir.join("data/hubbub.db")).expect("open the database");
    let left: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM messages WHERE text LIKE '%secret%'",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(
        left, 0,
        "the text of a deleted message (and its edits) is wiped"
    );
}

#[tokio::test]
async fn history_keeps_a_tombstone_and_the_delete_entry_in_order() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let seq = say(&mut alice, "r", "oops").await;
    let del = acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    let ev = next_in(&mut bob, "delete").await;
    assert_eq!((&ev["target"], &ev["seq"]), (&json!(seq), &json!(del)));
    assert!(ev.get("text").is_none(), "{ev}");
    let h = bob.request(json!({"type": "history", "room": "r"})).await;
    expect_type(&h, "history");
    assert_eq!(seqs(&h["messages"]), vec![seq, del]);
    let tomb = &h["messages"][0];
    assert_eq!(
        (&tomb["type"], &tomb["deleted"]),
        (&json!("message"), &json!(true))
    );
    assert!(tomb.get("text").is_none(), "{tomb}");
    assert_eq!(h["messages"][1]["type"], "delete");
    let cur = current(&mut bob, "r").await;
    assert_eq!(cur[0]["deleted"], true);
    assert!(cur[0].get("text").is_none());
}

#[tokio::test]
async fn a_deleted_message_cannot_be_deleted_edited_or_reacted_to() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "x").await;
    let del = acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    for cmd in [
        json!({"type": "delete", "room": "r", "target": seq}),
        json!({"type": "edit", "room": "r", "target": seq, "text": "y"}),
        json!({"type": "react", "room": "r", "target": seq, "emoji": "👍", "on": true}),
    ] {
        let r = alice.request(cmd.clone()).await;
        expect_error(&r, "not_found");
    }
    assert_eq!(latest_seq(&mut alice, "r").await, del, "nothing stored");
}

#[tokio::test]
async fn a_join_right_after_a_delete_gets_the_tombstone_not_the_text() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "take-me-back").await;
    acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    let mut carol = s.guest("carol").await;
    let j = carol.request(json!({"type": "join", "room": "r"})).await;
    expect_type(&j, "joined");
    assert!(
        !j.to_string().contains("take-me-back"),
        "joined carries a deleted text: {j}"
    );
}

// ---------------------------------------------------------------- reactions

#[tokio::test]
async fn reactions_add_and_remove_and_show_who_in_current_history() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let seq = say(&mut alice, "r", "party").await;
    let react = |who: &str, emoji: &str, on: bool| {
        let _ = who;
        json!({"type": "react", "room": "r", "target": seq, "emoji": emoji, "on": on})
    };
    acked(&mut bob, react("bob", "🎉", true)).await;
    let ev = next_in(&mut alice, "react").await;
    assert_eq!(
        (&ev["user"], &ev["emoji"], &ev["on"], &ev["target"]),
        (&json!("bob"), &json!("🎉"), &json!(true), &json!(seq))
    );
    acked(&mut alice, react("alice", "🎉", true)).await;
    acked(&mut alice, react("alice", "👍", true)).await;
    acked(&mut alice, react("alice", "👍", false)).await;
    let cur = current(&mut bob, "r").await;
    assert_eq!(cur[0]["reactions"], json!({"🎉": ["bob", "alice"]}));
}

#[tokio::test]
async fn an_emoji_too_long_or_empty_is_refused_and_nothing_stored() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let seq = say(&mut alice, "r", "x").await;
    let long = "ab".repeat(9);
    for (emoji, code) in [("", "bad_request"), (long.as_str(), "too_large")] {
        let r = alice
            .request(
                json!({"type": "react", "room": "r", "target": seq, "emoji": emoji, "on": true}),
            )
            .await;
        expect_error(&r, code);
    }
    assert_eq!(latest_seq(&mut alice, "r").await, seq);
}

// ---------------------------------------------------------------- recovery

#[tokio::test]
async fn a_client_offline_during_edits_recovers_them_with_since_in_order() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;
    let first = say(&mut alice, "r", "one").await;
    let j = bob.request(json!({"type": "join", "room": "r"})).await;
    let epoch = j["epoch"].clone();
    bob.close().await;
    let edit = acked(
        &mut alice,
        json!({"type": "edit", "room": "r", "target": first, "text": "uno"}),
    )
    .await;
    let second = say(&mut alice, "r", "two").await;
    let react = acked(
        &mut alice,
        json!({"type": "react", "room": "r", "target": second, "emoji": "✅", "on": true}),
    )
    .await;
    let del = acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": second}),
    )
    .await;
    let mut bob = s.guest("bob").await;
    let j = bob
        .request(json!({"type": "join", "room": "r", "since": {"seq": first, "epoch": epoch}}))
        .await;
    expect_type(&j, "joined");
    assert_eq!(j["recovered"], true, "{j}");
    assert_eq!(seqs(&j["messages"]), vec![edit, second, react, del]);
    let types: Vec<&str> = j["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types, ["edit", "message", "react", "delete"]);
}

// ---------------------------------------------------------------- DMs

#[tokio::test]
async fn an_edit_in_a_dm_reaches_both_parties() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    let mut bob = s.guest("bob").await;
    let seq = acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "hi"}),
    )
    .await;
    next_in(&mut bob, "message").await;
    acked(
        &mut alice,
        json!({"type": "edit", "dm": "bob", "target": seq, "text": "hi bob"}),
    )
    .await;
    let ev = next_in(&mut bob, "edit").await;
    assert_eq!(
        (&ev["dm"], &ev["text"]),
        (&json!("alice"), &json!("hi bob"))
    );
    let mine = next_in(&mut alice, "edit").await;
    assert_eq!(mine["dm"], "bob");
}

// ---------------------------------------------------------------- read state

#[tokio::test]
async fn a_persisted_room_is_listed_in_welcome_on_another_device_with_its_unread_count() {
    let s = Server::start(&[]).await;
    let mut laptop = s.guest("alice").await;
    let j = laptop
        .request(json!({"type": "join", "room": "team", "persist": true}))
        .await;
    expect_type(&j, "joined");
    let mut bob = s.member("bob", "team").await;
    for t in ["a", "b", "c"] {
        say(&mut bob, "team", t).await;
    }
    say(&mut laptop, "team", "mine").await;
    let mut phone = s.client().await;
    let w = phone
        .request(json!({"type": "hello", "name": "alice"}))
        .await;
    expect_type(&w, "welcome");
    let team = entry_for(&w["rooms"], "room", "team");
    assert_eq!(
        (&team["seq"], &team["read"], &team["unread"]),
        (&json!(4), &json!(0), &json!(3)),
        "unread counts messages from others only: {w}"
    );
}

#[tokio::test]
async fn reading_on_one_device_clears_the_badge_on_the_other() {
    let s = Server::start(&[]).await;
    let mut laptop = s.guest("alice").await;
    laptop
        .request(json!({"type": "join", "room": "team", "persist": true}))
        .await;
    let mut bob = s.member("bob", "team").await;
    let seq = say(&mut bob, "team", "news").await;
    let mut phone = s.guest("alice").await;
    let r = phone
        .request(json!({"type": "read", "room": "team", "seq": seq}))
        .await;
    expect_type(&r, "read");
    assert_eq!((&r["seq"], &r["user"]), (&json!(seq), &json!("alice")));
    let ev = next_in(&mut laptop, "read").await;
    assert_eq!((&ev["room"], &ev["seq"]), (&json!("team"), &json!(seq)));
    assert!(ev.get("id").is_none(), "{ev}");
    let u = laptop.request(json!({"type": "unread"})).await;
    expect_type(&u, "unread");
    assert_eq!(entry_for(&u["rooms"], "room", "team")["unread"], 0);
}

#[tokio::test]
async fn a_dm_read_is_a_receipt_for_the_peer() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    let mut bob = s.guest("bob").await;
    let seq = acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "seen?"}),
    )
    .await;
    let r = bob
        .request(json!({"type": "read", "dm": "alice", "seq": seq}))
        .await;
    expect_type(&r, "read");
    let ev = next_in(&mut alice, "read").await;
    assert_eq!(
        (&ev["dm"], &ev["user"], &ev["seq"]),
        (&json!("bob"), &json!("bob"), &json!(seq))
    );
}

#[tokio::test]
async fn a_dm_lists_how_far_the_peer_has_read() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    let mut bob = s.guest("bob").await;
    let seq = acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "1"}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "2"}),
    )
    .await;
    let r = bob
        .request(json!({"type": "read", "dm": "alice", "seq": seq}))
        .await;
    expect_type(&r, "read");
    let mut later = s.client().await;
    let w = later
        .request(json!({"type": "hello", "name": "alice"}))
        .await;
    expect_type(&w, "welcome");
    let dm = entry_for(&w["dms"], "dm", "bob");
    assert_eq!(
        (&dm["read"], &dm["peer_read"]),
        (&json!(0), &json!(seq)),
        "{w}"
    );
}

#[tokio::test]
async fn a_dm_peer_is_listed_in_welcome_dms() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "1"}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "direct", "to": "bob", "text": "2"}),
    )
    .await;
    let mut bob = s.client().await;
    let w = bob.request(json!({"type": "hello", "name": "bob"})).await;
    expect_type(&w, "welcome");
    let dm = entry_for(&w["dms"], "dm", "alice");
    assert_eq!((&dm["seq"], &dm["unread"]), (&json!(2), &json!(2)));
    let w2 = alice.request(json!({"type": "unread"})).await;
    expect_type(&w2, "unread");
    assert_eq!(entry_for(&w2["dms"], "dm", "bob")["unread"], 0);
}

#[tokio::test]
async fn read_positions_never_move_backwards_and_are_clamped_to_the_latest_seq() {
    let s = Server::start(&[]).await;
    let mut alice = s.member("alice", "r").await;
    for t in ["a", "b", "c"] {
        say(&mut alice, "r", t).await;
    }
    let r = alice
        .request(json!({"type": "read", "room": "r", "seq": 99}))
        .await;
    expect_type(&r, "read");
    assert_eq!(r["seq"], 3, "clamped to the latest seq");
    let r = alice
        .request(json!({"type": "read", "room": "r", "seq": 1}))
        .await;
    expect_type(&r, "read");
    assert_eq!(r["seq"], 3, "never backwards");
}

#[tokio::test]
async fn unread_ignores_edits_reactions_and_deleted_messages() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    alice
        .request(json!({"type": "join", "room": "r", "persist": true}))
        .await;
    let mut bob = s.member("bob", "r").await;
    let a = say(&mut bob, "r", "a").await;
    let b = say(&mut bob, "r", "b").await;
    acked(
        &mut bob,
        json!({"type": "edit", "room": "r", "target": a, "text": "A"}),
    )
    .await;
    acked(
        &mut bob,
        json!({"type": "react", "room": "r", "target": a, "emoji": "x", "on": true}),
    )
    .await;
    acked(
        &mut bob,
        json!({"type": "delete", "room": "r", "target": b}),
    )
    .await;
    let u = alice.request(json!({"type": "unread"})).await;
    expect_type(&u, "unread");
    let r = entry_for(&u["rooms"], "room", "r");
    assert_eq!((&r["seq"], &r["unread"]), (&json!(5), &json!(1)), "{u}");
}

#[tokio::test]
async fn leave_with_persist_removes_the_room_from_the_users_rooms() {
    let s = Server::start(&[]).await;
    let mut alice = s.guest("alice").await;
    alice
        .request(json!({"type": "join", "room": "r", "persist": true}))
        .await;
    let mut phone = s.guest("alice").await;
    let left = phone
        .request(json!({"type": "leave", "room": "r", "persist": true}))
        .await;
    expect_type(&left, "left");
    let u = alice.request(json!({"type": "unread"})).await;
    expect_type(&u, "unread");
    assert_eq!(u["rooms"], json!([]), "{u}");
}

#[tokio::test]
async fn a_read_on_a_room_the_token_forbids_is_forbidden() {
    let secret = "a-test-secret-of-at-least-32-bytes!!";
    let s = Server::start(&["--jwt-secret", secret]).await;
    let token = jwt_hs256(
        secret,
        json!({"sub": "alice", "exp": now_secs() + 600, "rooms": ["team-*"]}),
    );
    let mut alice = s.client().await;
    let w = alice
        .request(json!({"type": "hello", "token": token}))
        .await;
    expect_type(&w, "welcome");
    let r = alice
        .request(json!({"type": "read", "room": "secret", "seq": 1}))
        .await;
    expect_error(&r, "forbidden");
    let r = alice
        .request(json!({"type": "join", "room": "secret", "persist": true}))
        .await;
    expect_error(&r, "forbidden");
    let u = alice.request(json!({"type": "unread"})).await;
    expect_type(&u, "unread");
    assert_eq!(u["rooms"], json!([]), "a refused join stores no membership");
}

#[tokio::test]
async fn the_memory_store_keeps_chat_state_for_its_life() {
    let s = Server::start(&["--store", "memory"]).await;
    let mut alice = s.guest("alice").await;
    alice
        .request(json!({"type": "join", "room": "r", "persist": true}))
        .await;
    let mut bob = s.member("bob", "r").await;
    let seq = say(&mut bob, "r", "x").await;
    acked(
        &mut bob,
        json!({"type": "edit", "room": "r", "target": seq, "text": "y"}),
    )
    .await;
    let cur = current(&mut alice, "r").await;
    assert_eq!(cur[0]["text"], "y");
    acked(
        &mut bob,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    let cur = current(&mut alice, "r").await;
    assert_eq!(cur[0]["deleted"], true);
    let u = alice.request(json!({"type": "unread"})).await;
    expect_type(&u, "unread");
    assert_eq!(entry_for(&u["rooms"], "room", "r")["unread"], 0, "{u}");
}

// ---------------------------------------------------------------- upgrade

#[tokio::test]
async fn a_database_written_by_the_previous_release_opens_and_gains_chat_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("data")).expect("data dir");
    std::fs::copy(fixture("hubbub-1.0.db"), tmp.path().join("data/hubbub.db")).expect("copy");
    let s = Server::start_in(tmp.path(), &[]).await;
    let mut alice = s.guest("alice").await;
    let h = alice
        .request(json!({"type": "history", "room": "lobby", "current": true}))
        .await;
    expect_type(&h, "history");
    assert_eq!(seqs(&h["messages"]), vec![1, 2, 3, 4, 5]);
    assert_eq!(h["messages"][2]["text"], "old message 3");
    assert_eq!(h["messages"][2]["meta"], json!({"n": 3}));
    let j = alice
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    expect_type(&j, "joined");
    assert_eq!(j["seq"], 5);
    let edit = acked(
        &mut alice,
        json!({"type": "edit", "room": "lobby", "target": 1, "text": "edited after the upgrade"}),
    )
    .await;
    assert_eq!(edit, 6);
    let dm = alice.request(json!({"type": "history", "dm": "bob"})).await;
    expect_type(&dm, "history");
    assert_eq!(seqs(&dm["messages"]), vec![1, 2]);
    // DM pairs from before the upgrade are the users' channels, read up to date.
    let mut bob = s.client().await;
    let w = bob.request(json!({"type": "hello", "name": "bob"})).await;
    expect_type(&w, "welcome");
    let dm = entry_for(&w["dms"], "dm", "alice");
    assert_eq!(
        (&dm["seq"], &dm["read"], &dm["unread"]),
        (&json!(2), &json!(2), &json!(0)),
        "{w}"
    );
}

// ---------------------------------------------------------------- three nodes

async fn three_nodes() -> (Database, Redis, Vec<Server>) {
    let db = Database::create();
    let redis = Redis::start();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let (url, redis_url) = (db.url(), redis.url());
        nodes.push(Server::start(&common::node_args(&url, &redis_url, id, &[])).await);
    }
    (db, redis, nodes)
}

#[tokio::test]
async fn across_three_nodes_edits_deletes_and_reactions_reach_every_member_in_order() {
    let (db, _redis, nodes) = three_nodes().await;
    let mut alice = nodes[0].member("alice", "r").await;
    let mut bob = nodes[1].member("bob", "r").await;
    let mut carol = nodes[2].member("carol", "r").await;
    let seq = say(&mut alice, "r", "hi").await;
    let edit = acked(
        &mut alice,
        json!({"type": "edit", "room": "r", "target": seq, "text": "hi all"}),
    )
    .await;
    let react = acked(
        &mut bob,
        json!({"type": "react", "room": "r", "target": seq, "emoji": "👋", "on": true}),
    )
    .await;
    let del = acked(
        &mut alice,
        json!({"type": "delete", "room": "r", "target": seq}),
    )
    .await;
    for c in [&mut bob, &mut carol] {
        let mut got = Vec::new();
        while got.len() < 4 {
            let v = c.recv().await;
            if ["message", "edit", "react", "delete"].contains(&v["type"].as_str().unwrap_or("")) {
                got.push((
                    v["type"].as_str().unwrap_or_default().to_owned(),
                    v["seq"].clone(),
                ));
            }
        }
        assert_eq!(
            got,
            vec![
                ("message".to_owned(), json!(seq)),
                ("edit".to_owned(), json!(edit)),
                ("react".to_owned(), json!(react)),
                ("delete".to_owned(), json!(del)),
            ]
        );
    }
    let r = carol
        .request(json!({"type": "edit", "room": "r", "target": seq, "text": "again"}))
        .await;
    expect_error(&r, "not_found");
    let left = db.query("SELECT count(*) FROM messages WHERE text LIKE 'hi%'");
    assert_eq!(
        left.trim(),
        "0",
        "the deleted text is gone from PostgreSQL too"
    );
}

#[tokio::test]
async fn across_nodes_a_read_reaches_the_users_other_device_and_the_dm_peer() {
    let (_db, _redis, nodes) = three_nodes().await;
    let mut laptop = nodes[0].guest("alice").await;
    let mut bob = nodes[2].guest("bob").await;
    let seq = acked(
        &mut bob,
        json!({"type": "direct", "to": "alice", "text": "hey"}),
    )
    .await;
    let mut phone = nodes[1].guest("alice").await;
    let w = phone.request(json!({"type": "unread"})).await;
    expect_type(&w, "unread");
    assert_eq!(entry_for(&w["dms"], "dm", "bob")["unread"], 1, "{w}");
    let r = phone
        .request(json!({"type": "read", "dm": "bob", "seq": seq}))
        .await;
    expect_type(&r, "read");
    let ev = tokio::time::timeout(Duration::from_secs(2), laptop.recv_type("read"))
        .await
        .expect("the laptop on another node hears of the read within 2 s");
    assert_eq!((&ev["dm"], &ev["seq"]), (&json!("bob"), &json!(seq)));
    let receipt = tokio::time::timeout(Duration::from_secs(2), bob.recv_type("read"))
        .await
        .expect("the peer on a third node gets the receipt within 2 s");
    assert_eq!(
        (&receipt["dm"], &receipt["user"]),
        (&json!("alice"), &json!("alice"))
    );
}

#[tokio::test]
async fn across_nodes_welcome_lists_a_room_persisted_on_another_node() {
    let (_db, _redis, nodes) = three_nodes().await;
    let mut laptop = nodes[0].guest("alice").await;
    laptop
        .request(json!({"type": "join", "room": "team", "persist": true}))
        .await;
    let mut bob = nodes[1].member("bob", "team").await;
    say(&mut bob, "team", "one").await;
    say(&mut bob, "team", "two").await;
    let mut phone = nodes[2].client().await;
    let w = phone
        .request(json!({"type": "hello", "name": "alice"}))
        .await;
    expect_type(&w, "welcome");
    let team = entry_for(&w["rooms"], "room", "team");
    assert_eq!(
        (&team["seq"], &team["unread"]),
        (&json!(2), &json!(2)),
        "{w}"
    );
}
