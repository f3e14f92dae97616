//! In-process tests of the ordering core: the memory store, the local broker and
//! paused tokio time, so they need no network, no database and no real sleeps.

use super::upkeep::{IDLE_EVICT, SWEEP_EVERY};
use super::{Conn, Hub, Outbox, Outgoing, lock};
use crate::broker::Broker;
use crate::message::{ChannelKey, StoredMessage};
use crate::metrics::Metrics;
use crate::store::{LocalStore, MemoryStore, Store};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

fn hub() -> Arc<Hub> {
    let store = Arc::new(Store::Local(LocalStore::Memory(MemoryStore::new(10_000))));
    Hub::start(
        store,
        Broker::Local,
        Metrics::new(),
        super::HubOptions::default(),
    )
}

fn conn(id: u64, user: &str) -> Arc<Conn> {
    Arc::new(Conn {
        id,
        user: user.into(),
        name: user.into(),
        outbox: Arc::new(Outbox::new(1 << 20, 1 << 30)),
        token: std::sync::Mutex::new(None),
    })
}

/// Every frame queued for `c` so far, parsed.
fn frames(c: &Conn) -> Vec<Value> {
    c.outbox
        .take()
        .expect("the outbox did not overflow")
        .frames
        .iter()
        .flat_map(crate::ws::Out::payloads)
        .map(|t| serde_json::from_str(&t).expect("a frame is JSON"))
        .collect()
}

fn kind(v: &Value) -> &str {
    v["type"].as_str().expect("every frame has a type")
}

fn seqs_of(frames: &[Value], ty: &str) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| kind(f) == ty)
        .map(|f| f["seq"].as_u64().expect("a seq"))
        .collect()
}

fn text(t: &str, client_id: Option<&str>) -> Outgoing {
    Outgoing::message(t.to_owned(), None, client_id.map(str::to_owned))
}

fn room(r: &str) -> ChannelKey {
    ChannelKey::Room(r.to_owned())
}

fn stored(key: &ChannelKey, seq: u64) -> Arc<StoredMessage> {
    Arc::new(StoredMessage::message(
        key.clone(),
        seq,
        1,
        "x".into(),
        "x".into(),
        format!("m{seq}"),
    ))
}

#[tokio::test(start_paused = true)]
async fn concurrent_submits_get_gapless_seqs_in_the_order_each_sender_sent() {
    let hub = hub();
    let watcher = conn(1, "watcher");
    hub.join(&watcher, None, "r", None, 50).await.expect("join");
    let senders: Vec<Arc<Conn>> = (0..4).map(|i| conn(10 + i, &format!("s{i}"))).collect();
    let tasks: Vec<_> = senders
        .iter()
        .map(|s| {
            let (hub, s) = (hub.clone(), s.clone());
            tokio::spawn(async move {
                for i in 0..50 {
                    hub.submit(&s, None, room("r"), text(&format!("{}-{i}", s.user), None))
                        .await
                        .expect("submit");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("sender task");
    }
    hub.flush().await;

    let seen = frames(&watcher);
    assert_eq!(kind(&seen[0]), "joined");
    assert_eq!(seqs_of(&seen, "message"), (1..=200).collect::<Vec<_>>());
    let mut all_acks = Vec::new();
    for s in &senders {
        let acks = seqs_of(&frames(s), "ack");
        assert_eq!(acks.len(), 50, "{} got every ack", s.user);
        assert!(
            acks.windows(2).all(|w| w[0] < w[1]),
            "{}'s sends keep their order",
            s.user
        );
        // And each ack names the message that carries that sender's text.
        all_acks.extend(acks);
    }
    all_acks.sort_unstable();
    assert_eq!(all_acks, (1..=200).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_join_racing_commits_sees_neither_a_gap_nor_a_duplicate() {
    let hub = hub();
    let sender = conn(1, "sender");
    let total = 300u64;
    let sending = {
        let (hub, sender) = (hub.clone(), sender.clone());
        tokio::spawn(async move {
            for i in 0..total {
                hub.submit(&sender, None, room("r"), text(&format!("m{i}"), None))
                    .await
                    .expect("submit");
                tokio::task::yield_now().await;
            }
        })
    };
    let joiners: Vec<_> = (0..30u64)
        .map(|j| {
            let hub = hub.clone();
            tokio::spawn(async move {
                for _ in 0..j * 7 {
                    tokio::task::yield_now().await;
                }
                let c = conn(100 + j, &format!("j{j}"));
                hub.join(&c, None, "r", None, 500).await.expect("join");
                c
            })
        })
        .collect();
    sending.await.expect("sender task");
    let mut joined_mid_stream = 0;
    let mut joiner_conns = Vec::new();
    for j in joiners {
        joiner_conns.push(j.await.expect("joiner task"));
    }
    hub.flush().await;
    for c in joiner_conns {
        let seen = frames(&c);
        assert_eq!(
            kind(&seen[0]),
            "joined",
            "{}: the reply comes first",
            c.user
        );
        let at = seen[0]["seq"].as_u64().expect("joined.seq");
        let replayed: Vec<u64> = seen[0]["messages"]
            .as_array()
            .expect("joined.messages")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(
            replayed,
            (1..=at).collect::<Vec<_>>(),
            "{}: history up to joined.seq",
            c.user
        );
        let live = seqs_of(&seen[1..], "message");
        assert_eq!(
            live,
            (at + 1..=total).collect::<Vec<_>>(),
            "{}: live after it",
            c.user
        );
        if at > 0 && at < total {
            joined_mid_stream += 1;
        }
    }
    assert!(
        joined_mid_stream > 0,
        "some joins happened while messages were committed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_seq_is_filled_from_the_store_before_newer_ones_are_delivered() {
    let hub = hub();
    let watcher = conn(1, "watcher");
    hub.join(&watcher, None, "r", None, 50).await.expect("join");
    frames(&watcher); // the joined reply
    let key = room("r");
    let ch = hub.channel(&key).await.expect("channel");
    let (m1, m2, m3) = (stored(&key, 1), stored(&key, 2), stored(&key, 3));
    let Store::Local(local) = &*hub.store else {
        panic!("a local store");
    };
    local
        .append(&[m1.clone(), m2, m3.clone()])
        .await
        .expect("stored");

    hub.deliver(&ch, &m1);
    hub.deliver(&ch, &m3); // 2 was lost on its way here
    assert_eq!(
        seqs_of(&frames(&watcher), "message"),
        vec![1],
        "3 waits for 2"
    );

    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while got.len() < 2 {
            got.extend(seqs_of(&frames(&watcher), "message"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the gap is filled");
    assert_eq!(got, vec![2, 3]);
    hub.deliver(&ch, &m3);
    assert!(frames(&watcher).is_empty(), "a duplicate is dropped");
}

/// A member like [`conn`] that asked for batched frames.
fn batching_conn(id: u64, user: &str) -> Arc<Conn> {
    let c = conn(id, user);
    c.outbox.set_batch(true);
    c
}

#[tokio::test(start_paused = true)]
async fn a_run_reaches_a_batching_member_as_one_frame_and_others_as_one_frame_each() {
    let hub = hub();
    let (plain, batching) = (conn(1, "plain"), batching_conn(2, "batching"));
    for c in [&plain, &batching] {
        hub.join(c, None, "r", None, 50).await.expect("join");
        frames(c); // the joined reply
    }
    let key = room("r");
    let ch = hub.channel(&key).await.expect("channel");
    let run: Vec<_> = (1..=3).map(|s| stored(&key, s)).collect();
    hub.deliver_run(&ch, &run);

    assert_eq!(seqs_of(&frames(&plain), "message"), vec![1, 2, 3]);
    let taken = batching.outbox.take().expect("not overflowed").frames;
    assert_eq!(taken.len(), 1, "one shared frame for the run");
    let Some(crate::ws::Out::Text(one)) = taken.front() else {
        panic!("a batching member gets a text frame, not wire form: {taken:?}")
    };
    let lines: Vec<Value> = std::str::from_utf8(one.as_bytes())
        .expect("utf-8")
        .split('\n')
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(seqs_of(&lines, "message"), vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_run_with_a_gap_delivers_up_to_the_gap_and_holds_the_rest() {
    let hub = hub();
    let watcher = conn(1, "watcher");
    hub.join(&watcher, None, "r", None, 50).await.expect("join");
    frames(&watcher);
    let key = room("r");
    let ch = hub.channel(&key).await.expect("channel");
    hub.deliver_run(&ch, &[stored(&key, 1), stored(&key, 3)]);
    assert_eq!(seqs_of(&frames(&watcher), "message"), vec![1]);
    hub.deliver_run(&ch, &[stored(&key, 2), stored(&key, 1)]);
    assert_eq!(
        seqs_of(&frames(&watcher), "message"),
        vec![2, 3],
        "the held message follows the gap, the duplicate is dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_channel_is_evicted_and_reloads_its_sequence_and_client_ids() {
    let hub = hub();
    let sender = conn(1, "sender");
    hub.join(&sender, None, "r", None, 50).await.expect("join");
    for (i, cid) in [Some("first"), None, None].into_iter().enumerate() {
        hub.submit(&sender, None, room("r"), text(&format!("m{i}"), cid))
            .await
            .expect("submit");
    }
    hub.flush().await;
    assert!(hub.leave(&sender, "r"));
    let before = hub.channel(&room("r")).await.expect("channel");

    tokio::time::advance(IDLE_EVICT + SWEEP_EVERY).await;
    hub.sweep();
    assert!(!lock(&hub.channels).contains_key(&room("r")), "evicted");
    assert!(
        lock(&before.inner).evicted,
        "holders of the old channel look again"
    );

    frames(&sender);
    hub.submit(&sender, None, room("r"), text("again", Some("first")))
        .await
        .expect("resend");
    hub.submit(&sender, None, room("r"), text("new", None))
        .await
        .expect("submit");
    hub.flush().await;
    assert_eq!(
        seqs_of(&frames(&sender), "ack"),
        vec![1, 4],
        "the resend keeps seq 1"
    );
}

#[tokio::test(start_paused = true)]
async fn a_busy_channel_is_not_evicted() {
    let hub = hub();
    let member = conn(1, "member");
    hub.join(&member, None, "r", None, 50).await.expect("join");
    tokio::time::advance(IDLE_EVICT * 2).await;
    hub.sweep();
    assert!(
        lock(&hub.channels).contains_key(&room("r")),
        "a room with members stays"
    );
}

#[tokio::test(start_paused = true)]
async fn a_member_event_waits_for_the_presence_tick_to_share_a_write_but_no_longer() {
    use super::upkeep::PRESENCE_WAKE_EVERY;
    let hub = hub();
    let watcher = conn(1, "watcher");
    hub.join(&watcher, None, "r", None, 50).await.expect("join");
    frames(&watcher);
    // The joined reply woke the session; consume that wake-up.
    let _ = tokio::time::timeout(Duration::from_millis(1), watcher.outbox.notified()).await;

    let x = conn(2, "x");
    hub.join(&x, None, "r", None, 50).await.expect("join");
    let early = tokio::time::timeout(Duration::from_millis(1), watcher.outbox.notified()).await;
    assert!(
        early.is_err(),
        "the member event does not wake the session by itself"
    );
    tokio::time::timeout(PRESENCE_WAKE_EVERY * 2, watcher.outbox.notified())
        .await
        .expect("the presence tick wakes it");
    let seen = frames(&watcher);
    assert_eq!(seen.len(), 1);
    assert_eq!(kind(&seen[0]), "member");
    assert_eq!(seen[0]["user"], "x");
}

#[tokio::test(start_paused = true)]
async fn members_who_stay_get_every_message_once_after_members_leave_from_the_middle() {
    let hub = hub();
    let members: Vec<Arc<Conn>> = (0..6).map(|i| conn(i, &format!("u{i}"))).collect();
    for m in &members {
        hub.join(m, None, "r", None, 50).await.expect("join");
    }
    let sender = &members[0];
    hub.submit(sender, None, room("r"), text("before", None))
        .await
        .expect("submit");
    hub.flush().await;
    // A leave moves the last member into the leaver's place: leave from the middle
    // and from the front, then send again.
    assert!(hub.leave(&members[2], "r"), "u2 was a member");
    assert!(hub.leave(&members[1], "r"), "u1 was a member");
    hub.submit(sender, None, room("r"), text("after", None))
        .await
        .expect("submit");
    hub.flush().await;

    for (i, m) in members.iter().enumerate() {
        let got = seqs_of(&frames(m), "message");
        let expected: Vec<u64> = if i == 1 || i == 2 {
            vec![1]
        } else {
            vec![1, 2]
        };
        assert_eq!(got, expected, "{} got each message it should, once", m.user);
    }
}
