//! Bad input gets a clear `error` with the command's id and loses nothing; every
//! limit is crossed at least once here.

mod common;

use common::{Client, Closed, Server};
use futures_util::SinkExt;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn still_usable(c: &mut Client) {
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn invalid_json_gets_bad_request_and_the_connection_stays_open() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    c.send_text("{not json").await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    still_usable(&mut c).await;
}

#[tokio::test]
async fn unknown_type_gets_bad_request_with_the_id() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    let e = c.request(json!({"type": "teleport"})).await;
    assert_eq!(e["code"], "bad_request");
    still_usable(&mut c).await;
}

#[tokio::test]
async fn binary_frame_gets_bad_request_not_a_close() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    still_usable(&mut c).await;
}

#[tokio::test]
async fn missing_field_gets_bad_request_with_the_id() {
    let s = Server::start(&[]).await;
    let mut c = s.member("alice", "r").await;
    let e = c.request(json!({"type": "send", "room": "r"})).await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("text"));
    still_usable(&mut c).await;
}

#[tokio::test]
async fn over_long_text_gets_too_large_with_the_id() {
    let s = Server::start(&["--max-text", "10"]).await;
    let mut c = s.member("alice", "r").await;
    let e = c
        .request(json!({"type": "send", "room": "r", "text": "x".repeat(11)}))
        .await;
    assert_eq!(e["code"], "too_large");
    let e = c
        .request(json!({"type": "direct", "to": "bob", "text": "x".repeat(11)}))
        .await;
    assert_eq!(e["code"], "too_large");
    still_usable(&mut c).await;
}

#[tokio::test]
async fn empty_text_gets_bad_request() {
    let s = Server::start(&[]).await;
    let mut c = s.member("alice", "r").await;
    let e = c
        .request(json!({"type": "send", "room": "r", "text": ""}))
        .await;
    assert_eq!(e["code"], "bad_request");
}

#[tokio::test]
async fn bad_room_name_gets_bad_request_with_the_id() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    for room in ["", "has space", "emoji😀", &"r".repeat(65), "slash/room"] {
        let e = c.request(json!({"type": "join", "room": room})).await;
        assert_eq!(e["code"], "bad_request", "room {room:?}: {e}");
    }
    let e = c.request(json!({"type": "join", "room": 42})).await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(
        c.request(json!({"type": "join", "room": "ok:name.1_x-y"}))
            .await["type"],
        "joined"
    );
}

#[tokio::test]
async fn meta_over_1_kib_is_too_large_and_client_id_over_64_is_bad_request() {
    let s = Server::start(&[]).await;
    let mut c = s.member("alice", "r").await;
    let e = c
        .request(
            json!({"type": "send", "room": "r", "text": "x", "meta": {"blob": "m".repeat(1100)}}),
        )
        .await;
    assert_eq!(e["code"], "too_large");
    let e = c
        .request(json!({"type": "send", "room": "r", "text": "x", "client_id": "c".repeat(65)}))
        .await;
    assert_eq!(e["code"], "bad_request");
    let e = c
        .request(json!({"type": "send", "room": "r", "text": "x", "meta": "not an object"}))
        .await;
    assert_eq!(e["code"], "bad_request");
    // Nothing was stored by the refused sends.
    let h = c.request(json!({"type": "history", "room": "r"})).await;
    assert_eq!(h["messages"], json!([]));
}

#[tokio::test]
async fn message_over_max_message_closes_with_1009() {
    let s = Server::start(&["--max-message", "1024"]).await;
    let mut c = s.member("alice", "r").await;
    let big = json!({"type": "send", "room": "r", "text": "x".repeat(2000)}).to_string();
    c.send_text(&big).await;
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(1009)
    );
}

#[tokio::test]
async fn message_just_under_max_message_is_accepted() {
    let s = Server::start(&["--max-message", "1024", "--max-text", "2000"]).await;
    let mut c = s.member("alice", "r").await;
    let mut cmd = json!({"type": "send", "id": 1, "room": "r", "text": ""});
    let overhead = cmd.to_string().len();
    cmd["text"] = json!("y".repeat(1024 - overhead));
    assert_eq!(cmd.to_string().len(), 1024);
    c.send_text(&cmd.to_string()).await;
    assert_eq!(c.reply_to(json!(1)).await["type"], "ack");
}

#[tokio::test]
async fn over_the_rate_limit_commands_get_rate_limited() {
    let s = Server::start(&["--rate-limit", "5"]).await;
    let mut c = s.member("alice", "r").await; // the join took one token of 10
    // Pipelined, so the bucket has no time to refill however slow the machine is.
    for i in 0..15 {
        c.send(json!({"type": "send", "id": i, "room": "r", "text": format!("{i}")}))
            .await;
    }
    let (acked, limited) = answered_or_limited(&mut c, 15, "ack").await;
    assert!((9..=10).contains(&acked), "burst is 2x rate: acked {acked}");
    assert!(limited >= 5);
    // ping is not rate limited.
    still_usable(&mut c).await;
}

#[tokio::test]
async fn flooding_past_the_limit_for_5_seconds_closes_with_4029() {
    let s = Server::start(&["--rate-limit", "2"]).await;
    let mut c = s.member("alice", "r").await;
    let started = std::time::Instant::now();
    for _ in 0..600 {
        let cmd = json!({"type": "presence", "room": "r"}).to_string();
        if c.ws.send(Message::text(cmd)).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let (closed, seen) = c.expect_close(Duration::from_secs(10)).await;
    assert_eq!(closed, Closed::Code(4029));
    assert!(seen.iter().any(|v| v["code"] == "rate_limited"));
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test]
async fn typing_over_the_limit_is_dropped_silently() {
    let s = Server::start(&["--rate-limit", "1"]).await;
    let mut c = s.member("alice", "r").await;
    for _ in 0..5 {
        c.send(json!({"type": "typing", "room": "r"})).await;
    }
    c.expect_no("error", Duration::from_millis(300)).await;
}

async fn slow_consumer_closes(s: &Server) -> f64 {
    let (_, body) = s.http_get("/metrics").await;
    body.lines()
        .find(|l| l.starts_with("hubbub_slow_consumer_closes_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A client stops reading while another floods its room: it must be closed with
/// 4008 once its queue (bounded by `flags`) overflows, and a reading client in the
/// same room must keep receiving every message in order.
async fn stalled_reader_case(flags: &[&str]) {
    let mut args = vec!["--store", "memory", "--rate-limit", "100000"];
    args.extend_from_slice(flags);
    let s = Server::start(&args).await;
    let mut stalled = s.member("stalled", "flood").await;
    let mut healthy = s.member("healthy", "flood").await;
    let total = 6000usize;
    let url = s.url();
    // How far the healthy reader has got. The flooder waits for it before each
    // window, so the healthy reader is never more than 16 messages (48 KB) behind —
    // far below any cap here — even when the test machine starves it of CPU for a
    // while. The stalled reader, which never reads, still overflows.
    let healthy_seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = healthy_seen.clone();
    let flooder = tokio::spawn(async move {
        let mut f = Client::connect(&url).await;
        f.request(json!({"type": "hello", "name": "flooder"})).await;
        f.request(json!({"type": "join", "room": "flood"})).await;
        let text = "z".repeat(3000);
        // Windows of 16 sends; the flooder reads its own acks so only the stalled
        // client falls behind.
        for window in 0..total / 16 {
            for i in 0..16 {
                let n = window * 16 + i;
                f.send(json!({"type": "send", "room": "flood", "text": format!("{n}:{text}")}))
                    .await;
            }
            f.await_acks(16).await;
            let sent = (window as u64 + 1) * 16;
            let waited = std::time::Instant::now();
            while progress.load(std::sync::atomic::Ordering::Relaxed) < sent {
                assert!(
                    waited.elapsed() < Duration::from_secs(20),
                    "the healthy reader stopped receiving"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let reader = tokio::spawn(async move {
        let mut next = 1u64;
        while next <= total as u64 {
            let m = healthy.recv_type("message").await;
            assert_eq!(
                m["seq"].as_u64(),
                Some(next),
                "healthy reader sees every message in order"
            );
            healthy_seen.store(next, std::sync::atomic::Ordering::Relaxed);
            next += 1;
        }
    });
    // As soon as the server reports the overflow, read the stalled client: it gets
    // what was buffered, then the 4008 close (the server waits up to 5 s for it).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while slow_consumer_closes(&s).await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no slow-consumer close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (closed, _) = stalled.expect_close(Duration::from_secs(20)).await;
    assert_eq!(closed, Closed::Code(4008));
    reader.await.unwrap();
    flooder.await.unwrap();
}

#[tokio::test]
async fn a_reader_that_stops_is_closed_with_4008_when_its_queue_is_full_in_messages() {
    stalled_reader_case(&["--send-queue", "64"]).await;
}

#[tokio::test]
async fn a_reader_that_stops_is_closed_with_4008_when_its_queue_is_full_in_bytes() {
    // 100,000 messages would never fill; 96 KiB of 3 KB messages does.
    stalled_reader_case(&["--send-queue", "100000", "--send-queue-bytes", "98304"]).await;
}

#[tokio::test]
async fn disallowed_origin_gets_403_at_the_handshake() {
    let s = Server::start(&[
        "--allowed-origins",
        "https://chat.example.com,http://localhost:3000",
    ])
    .await;
    let err = Client::connect_with_origin(&s.url(), "https://evil.example.net")
        .await
        .err()
        .expect("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    assert!(
        Client::connect_with_origin(&s.url(), "http://localhost:3000")
            .await
            .is_ok()
    );
    // No Origin header (not a browser): allowed.
    s.guest("cli").await;
}

#[tokio::test]
async fn without_an_allow_list_any_origin_is_accepted() {
    let s = Server::start(&[]).await;
    assert!(
        Client::connect_with_origin(&s.url(), "https://anywhere.example")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn history_limit_over_500_is_clamped_not_refused() {
    let s = Server::start(&["--rate-limit", "100000", "--send-queue", "4096"]).await;
    let mut a = s.member("alice", "r").await;
    for i in 0..510 {
        a.send(json!({"type": "send", "room": "r", "text": format!("{i}")}))
            .await;
    }
    let mut acks = 0;
    while acks < 510 {
        if a.recv().await["type"] == "ack" {
            acks += 1;
        }
    }
    let h = a
        .request(json!({"type": "history", "room": "r", "limit": 100000}))
        .await;
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 500);
    assert_eq!(msgs[0]["seq"], 11);
    assert_eq!(msgs[499]["seq"], 510);
    let j = a
        .request(json!({"type": "join", "room": "r", "history": 9999}))
        .await;
    assert_eq!(j["messages"].as_array().unwrap().len(), 500);
}

/// Read from `s` until the server closes it (or `within` passes): what it sent,
/// and whether it closed in time.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[tokio::test]
async fn a_request_head_over_16_kib_gets_431_and_no_upgrade() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    let _ = tcp.write_all(req.as_bytes()).await;
    let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(closed, "the connection is closed after the 431");
}

#[tokio::test]
async fn a_request_head_just_under_16_kib_is_served() {
    let s = Server::start(&[]).await;
    let pad = "a".repeat(15 * 1024);
    let (status, _) = common::http_get(s.addr, "/healthz", &[("X-Pad", &pad)]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_that_stalls_mid_head_is_dropped_at_the_handshake_timeout() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&["--handshake-timeout", "1"]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(4)).await;
    assert!(closed, "still open after 4 s");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_trickles_its_head_is_dropped_at_the_handshake_timeout() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&["--handshake-timeout", "1"]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = std::time::Instant::now();
    for b in req.iter() {
        if tcp.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(2)).await;
    assert!(closed);
    assert!(
        !answer.contains("200 OK"),
        "the trickled request was not served: {answer:?}"
    );
}

#[tokio::test]
async fn frames_that_fail_to_parse_draw_from_the_rate_limit_and_a_stream_of_them_closes_4029() {
    let s = Server::start(&["--rate-limit", "2"]).await;
    let mut c = s.guest("alice").await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        if c.ws.send(Message::text("{not json")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (closed, seen) = c.expect_close(Duration::from_secs(10)).await;
    assert_eq!(closed, Closed::Code(4029));
    assert!(
        seen.iter().any(|v| v["code"] == "bad_request"),
        "the first ones get their parse error"
    );
    assert!(
        seen.iter().any(|v| v["code"] == "rate_limited"),
        "then rate_limited"
    );
}

#[tokio::test]
async fn pings_are_never_refused_but_a_flood_of_them_closes_4029() {
    let s = Server::start(&["--rate-limit", "2"]).await;
    let mut c = s.guest("alice").await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let ping = json!({"type": "ping"}).to_string();
        if c.ws.send(Message::text(ping)).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (closed, seen) = c.expect_close(Duration::from_secs(10)).await;
    assert_eq!(closed, Closed::Code(4029));
    assert!(seen.iter().any(|v| v["type"] == "pong"));
    assert!(
        !seen.iter().any(|v| v["code"] == "rate_limited"),
        "a ping is answered, never refused"
    );
}

#[tokio::test]
async fn a_ping_a_second_is_fine_with_the_bucket_empty() {
    let s = Server::start(&["--rate-limit", "1"]).await;
    let mut c = s.member("alice", "r").await;
    for i in 0..5 {
        c.send(json!({"type": "presence", "id": i, "room": "r"}))
            .await;
    }
    for _ in 0..3 {
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    }
}

#[tokio::test]
async fn beyond_max_connections_a_handshake_gets_503_with_retry_after() {
    let s = Server::start(&["--max-connections", "2"]).await;
    let a = s.guest("a").await;
    let _b = s.guest("b").await;
    let refused = tokio_tungstenite::connect_async(s.url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        other => panic!("expected a 503 handshake, got {other:?}"),
    }
    let (st, metrics) = s.http_get("/metrics").await;
    assert_eq!(st, 200);
    assert!(
        metrics.contains("hubbub_connections_refused_total{reason=\"max_connections\"} 1"),
        "{metrics}"
    );
    // A connection that ends makes room again.
    a.close().await;
    let mut again = None;
    for _ in 0..20 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(s.url()).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "room again after a close");
}

#[tokio::test]
async fn a_hello_beyond_max_connections_per_user_closes_the_users_oldest_with_1008() {
    let s = Server::start(&["--max-connections-per-user", "2"]).await;
    let mut first = s.guest("ann").await;
    let mut second = s.guest("ann").await;
    let mut other = s.guest("bob").await;
    let mut third = s.guest("ann").await;
    let (closed, seen) = first.expect_close(Duration::from_secs(3)).await;
    assert_eq!(closed, Closed::Code(1008));
    assert!(seen.iter().any(|m| m["type"] == "closing"), "{seen:?}");
    for c in [&mut second, &mut third, &mut other] {
        assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    }
}

/// Open a WebSocket to `s`, as if forwarded for `xff` (None: no header); the
/// handshake's status.
async fn handshake_status(
    s: &Server,
    xff: Option<&str>,
) -> (u16, Option<String>, Option<common::Client>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = s.url().into_client_request().expect("request");
    if let Some(ip) = xff {
        req.headers_mut()
            .insert("x-forwarded-for", ip.parse().expect("header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => (resp.status().as_u16(), None, Some(Client::from_ws(ws))),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            None,
        ),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn beyond_max_connections_per_ip_a_handshake_gets_429_and_a_closed_one_frees_its_slot() {
    let s = Server::start(&["--max-connections-per-ip", "2"]).await;
    let (st, _, a) = handshake_status(&s, None).await;
    assert_eq!(st, 101);
    let (st, _, _b) = handshake_status(&s, None).await;
    assert_eq!(st, 101);
    let (st, retry, none) = handshake_status(&s, None).await;
    assert_eq!((st, retry.as_deref()), (429, Some("5")));
    assert!(none.is_none());
    let (_, metrics) = s.http_get("/metrics").await;
    assert!(
        metrics.contains("hubbub_connections_refused_total{reason=\"max_connections_per_ip\"} 1"),
        "{metrics}"
    );
    a.expect("connected").close().await;
    let mut ok = false;
    for _ in 0..20 {
        if handshake_status(&s, None).await.0 == 101 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a closed connection gives its slot back");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_what_is_counted() {
    let s = Server::start(&[
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
    ])
    .await;
    let (st, _, _a) = handshake_status(&s, Some("203.0.113.1")).await;
    assert_eq!(st, 101);
    let (st, _, _b) = handshake_status(&s, Some("203.0.113.2")).await;
    assert_eq!(st, 101, "another client behind the same proxy");
    let (st, _, _) = handshake_status(&s, Some("203.0.113.1")).await;
    assert_eq!(st, 429, "the first client again");
}

#[tokio::test]
async fn at_the_open_file_limit_accepting_pauses_once_open_connections_are_served_and_it_recovers()
{
    // 64 descriptors: the store, the runtime and the listener take a few dozen.
    let s = Server::start_with_nofile(
        &["--max-connections", "1000", "--handshake-timeout", "60"],
        64,
    )
    .await;
    let mut alice = s.member("alice", "r").await;
    let mut bob = s.member("bob", "r").await;

    // Bare TCP connections until the server is out of descriptors (the rest wait
    // in the kernel's backlog).
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            tokio::net::TcpStream::connect(s.addr)
                .await
                .expect("the kernel takes the connection"),
        );
    }
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !s.log().contains("cannot accept new connections") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pause is logged; log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The connections it has are still served.
    let ack = alice
        .request(json!({"type": "send", "room": "r", "text": "still here"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = bob.recv_type("message").await;
    assert_eq!(m["text"], "still here");

    // Files free up: new clients get in again.
    drop(held);
    let mut carol = tokio::time::timeout(common::WAIT, s.member("carol", "r"))
        .await
        .expect("a new client gets in once descriptors are free");
    let p = carol.request(json!({"type": "ping"})).await;
    assert_eq!(p["type"], "pong", "{p}");

    let log = s.log();
    assert_eq!(
        log.matches("cannot accept new connections").count(),
        1,
        "said once, not once per failed accept"
    );
    assert!(log.contains("accepting new connections again"), "{log}");
    let (_, metrics) = s.http_get("/metrics").await;
    let failed: f64 = metric_value(
        &metrics,
        "hubbub_accept_errors_total{reason=\"process_open_files\"}",
    );
    assert!(failed >= 1.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "hubbub_accept_paused"), 0.0);
}

/// The value of the sample named exactly `series` in a Prometheus text.
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} in\n{text}"))
}

/// `n` messages of `chars` characters each into `room`, acked; returns the sender.
async fn fill_room(s: &Server, room: &str, n: usize, chars: usize) -> Client {
    let mut c = s.member("filler", room).await;
    for i in 0..n {
        let text = format!("{i:04}{}", "x".repeat(chars - 4));
        let ack = c
            .request(json!({"type": "send", "room": room, "text": text}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    c
}

#[tokio::test]
async fn a_history_over_max_reply_bytes_keeps_the_newest_and_says_more() {
    let s = Server::start(&["--max-reply-bytes", "20000"]).await;
    let _filler = fill_room(&s, "big", 20, 3000).await;
    let mut c = s.member("reader", "big").await;

    let first = c
        .request(json!({"type": "history", "room": "big", "limit": 50}))
        .await;
    assert_eq!(first["type"], "history", "{first}");
    assert_eq!(first["more"], true, "cut short by bytes: {first}");
    let page1 = common::seqs(&first["messages"]);
    assert!((1..20).contains(&page1.len()), "{page1:?}");
    assert_eq!(*page1.last().expect("newest"), 20, "the newest are kept");
    assert!(first.to_string().len() <= 20000 + 4000, "about the budget");

    // Paging with `before` covers every message exactly once.
    let mut all = page1.clone();
    let mut before = page1[0];
    while before > 1 {
        let r = c
            .request(json!({"type": "history", "room": "big", "before": before, "limit": 50}))
            .await;
        assert_eq!(r["type"], "history", "{r}");
        let page = common::seqs(&r["messages"]);
        assert!(!page.is_empty(), "{r}");
        before = page[0];
        all.splice(0..0, page);
    }
    assert_eq!(all, (1..=20).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_history_within_max_reply_bytes_has_no_more_marker() {
    let s = Server::start(&[]).await;
    let _filler = fill_room(&s, "small", 3, 10).await;
    let mut c = s.member("reader", "small").await;
    let r = c.request(json!({"type": "history", "room": "small"})).await;
    assert_eq!(r["type"], "history", "{r}");
    assert_eq!(common::seqs(&r["messages"]), vec![1, 2, 3]);
    assert!(r.get("more").is_none(), "{r}");
}

#[tokio::test]
async fn a_rejoin_whose_missed_messages_exceed_max_reply_bytes_is_not_recovered() {
    let s = Server::start(&["--max-reply-bytes", "20000"]).await;
    let mut c = s.member("reader", "big").await;
    let epoch = c.request(json!({"type": "join", "room": "big"})).await["epoch"].clone();
    let _filler = fill_room(&s, "big", 20, 3000).await;
    let j = c
        .request(json!({"type": "join", "room": "big", "history": 500,
                        "since": {"seq": 0, "epoch": epoch}}))
        .await;
    assert_eq!(j["type"], "joined", "{j}");
    assert_eq!(j["recovered"], false, "{j}");
    let got = common::seqs(&j["messages"]);
    assert!((1..20).contains(&got.len()), "{got:?}");
    assert_eq!(*got.last().expect("newest"), 20);
}

#[tokio::test]
async fn large_replies_cost_more_rate_limit_tokens() {
    let s = Server::start(&["--rate-limit", "10"]).await;
    // 17 x 4,000 characters: one history of them is over 64 KiB (one more token).
    let _filler = fill_room(&s, "big", 17, 4000).await;
    let mut c = s.member("reader", "big").await; // one token of 20
    for i in 0..15 {
        c.send(json!({"type": "history", "id": i, "room": "big", "limit": 50}))
            .await;
    }
    let (served, limited) = answered_or_limited(&mut c, 15, "history").await;
    // 19 tokens left at two each: about 10 served, where 15 small ones would be.
    assert!((9..=11).contains(&served), "served {served}");
    assert_eq!(served + limited, 15);
}

/// The replies to commands with ids `0..n`: how many were `answer` and how many
/// `rate_limited` (anything else fails the test).
async fn answered_or_limited(c: &mut Client, n: u64, answer: &str) -> (usize, usize) {
    let (mut answered, mut limited) = (0, 0);
    for i in 0..n {
        let r = c.reply_to(json!(i)).await;
        match r["type"].as_str() {
            Some(t) if t == answer => answered += 1,
            Some("error") => {
                assert_eq!(r["code"], "rate_limited", "{r}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (answered, limited)
}
