//! Large rooms (PROTOCOL.md 1.1, "Large rooms"): `joined` lists at most 100
//! members with the count, `presence` pages, and above `--presence-events-max`
//! members a room gets coalesced `members` counts instead of per-user events.

mod common;

use common::{Client, Server};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn users(members: &Value) -> Vec<String> {
    members
        .as_array()
        .expect("members is a list")
        .iter()
        .map(|m| m["user"].as_str().expect("user").to_owned())
        .collect()
}

/// Every member of `room` as `c` pages through it `limit` at a time.
async fn all_pages(c: &mut Client, room: &str, limit: u64) -> (Vec<String>, Vec<Value>) {
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut cmd = json!({"type": "presence", "room": room, "limit": limit});
        if let Some(a) = &after {
            cmd["after"] = json!(a);
        }
        let page = c.request(cmd).await;
        assert_eq!(page["type"], "presence", "{page}");
        seen.extend(users(&page["members"]));
        after = page["next"].as_str().map(str::to_owned);
        pages.push(page);
        if after.is_none() {
            return (seen, pages);
        }
    }
}

#[tokio::test]
async fn joined_lists_the_first_100_members_by_user_id_and_the_member_count() {
    let s = Server::start(&[]).await;
    let mut members = Vec::new();
    for i in 0..104 {
        members.push(s.member(&format!("u{i:03}"), "big").await);
    }
    let mut last = s.guest("zed").await;
    let j = last.request(json!({"type": "join", "room": "big"})).await;
    assert_eq!(j["type"], "joined", "{j}");
    assert_eq!(j["member_count"], 105);
    let listed = users(&j["members"]);
    let expected: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
    assert_eq!(listed, expected, "the first 100 by user id");
}

#[tokio::test]
async fn presence_pages_cover_every_member_exactly_once_in_user_order() {
    let s = Server::start(&[]).await;
    let mut clients = Vec::new();
    for i in 0..25 {
        clients.push(s.member(&format!("m{i:02}"), "r").await);
    }
    let (seen, pages) = all_pages(&mut clients[0], "r", 7).await;
    let expected: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
    assert_eq!(seen, expected, "every member once, in order");
    assert_eq!(pages.len(), 4, "7 + 7 + 7 + 4");
    for p in &pages {
        assert_eq!(p["member_count"], 25);
    }
    assert!(pages[3].get("next").is_none(), "the last page has no next");
    assert_eq!(pages[0]["next"], "m06", "next is the last user of the page");
}

#[tokio::test]
async fn presence_without_a_limit_answers_up_to_1000_and_a_limit_over_it_is_clamped() {
    let s = Server::start(&[]).await;
    let mut a = s.member("a", "r").await;
    let _b = s.member("b", "r").await;
    let p = a.request(json!({"type": "presence", "room": "r"})).await;
    assert_eq!(p["type"], "presence", "{p}");
    assert_eq!(users(&p["members"]), vec!["a", "b"]);
    assert!(p.get("next").is_none());
    let p = a
        .request(json!({"type": "presence", "room": "r", "limit": 5000}))
        .await;
    assert_eq!(p["type"], "presence", "{p}");
    assert_eq!(p["member_count"], 2);
    let p = a
        .request(json!({"type": "presence", "room": "r", "after": "a"}))
        .await;
    assert_eq!(p["type"], "presence", "{p}");
    assert_eq!(users(&p["members"]), vec!["b"]);
}

#[tokio::test]
async fn presence_with_a_bad_after_or_limit_is_a_bad_request() {
    let s = Server::start(&[]).await;
    let mut a = s.member("a", "r").await;
    for bad in [
        json!({"type": "presence", "room": "r", "after": ""}),
        json!({"type": "presence", "room": "r", "after": 7}),
        json!({"type": "presence", "room": "r", "limit": -1}),
        json!({"type": "presence", "room": "r", "limit": "10"}),
    ] {
        let e = a.request(bad.clone()).await;
        assert_eq!(e["type"], "error", "{bad} -> {e}");
        assert_eq!(e["code"], "bad_request", "{bad} -> {e}");
    }
}

/// Read `members` events for `wait`, with when each arrived; fails on a `member`.
async fn counts_for(c: &mut Client, wait: Duration) -> Vec<(Instant, u64)> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match c.try_recv(left).await {
            Some(v) if v["type"] == "members" => {
                assert_eq!(v["room"], "r", "{v}");
                out.push((Instant::now(), v["count"].as_u64().expect("count")));
            }
            Some(v) if v["type"] == "member" => panic!("a per-user event in a large room: {v}"),
            Some(_) => continue,
            None => return out,
        }
    }
}

#[tokio::test]
async fn a_room_above_presence_events_max_gets_member_counts_at_most_once_a_second() {
    let s = Server::start(&["--presence-events-max", "3"]).await;
    let mut watcher = s.member("watcher", "r").await;
    let _a = s.member("a", "r").await;
    let _b = s.member("b", "r").await;
    for user in ["a", "b"] {
        let ev = watcher.recv_type("member").await;
        assert_eq!(
            (ev["user"].as_str(), ev["event"].as_str()),
            (Some(user), Some("join"))
        );
    }
    // The 4th, 5th and 6th users take the room over the threshold.
    let c = s.member("c", "r").await;
    let _d = s.member("d", "r").await;
    let _e = s.member("e", "r").await;
    let counts = counts_for(&mut watcher, Duration::from_millis(2500)).await;
    assert!(!counts.is_empty(), "a members event arrives");
    assert_eq!(counts.last().map(|c| c.1), Some(6));
    for w in counts.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= Duration::from_millis(800),
            "at most one members event a second: {counts:?}"
        );
    }
    // A leave is a count too.
    c.close().await;
    let counts = counts_for(&mut watcher, Duration::from_millis(2000)).await;
    assert_eq!(counts.iter().map(|c| c.1).collect::<Vec<_>>(), vec![5]);
}

#[tokio::test]
async fn an_unchanged_count_is_not_announced_again() {
    let s = Server::start(&["--presence-events-max", "1"]).await;
    let mut watcher = s.member("watcher", "r").await;
    let x = s.member("x", "r").await;
    x.close().await;
    // 2 then 1 within the same second: the count the watcher last saw (1, from
    // its own joined.member_count) is the count now: nothing to send.
    let counts = counts_for(&mut watcher, Duration::from_millis(2000)).await;
    assert!(counts.iter().all(|c| c.1 == 2 || c.1 == 1), "{counts:?}");
    let distinct: BTreeSet<u64> = counts.iter().map(|c| c.1).collect();
    assert!(counts.len() == distinct.len(), "no repeats: {counts:?}");
}
