//! Running Hubbub in production: TLS and certificate reload, drains without
//! reconnect storms, the client address behind trusted proxies, `config check`,
//! `health`, and the metric set.

mod common;

use common::{Client, Closed, Server, WAIT, signal};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for 127.0.0.1, written as PEM files into `dir`.
fn write_cert(dir: &Path, prefix: &str) -> (String, String, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("generate certificate");
    let cert = dir.join(format!("{prefix}.crt"));
    let key = dir.join(format!("{prefix}.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (
        cert.display().to_string(),
        key.display().to_string(),
        ck.cert.der().to_vec(),
    )
}

fn client_config(trusted: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
            .unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn wss_client(s: &Server, trusted: &[&[u8]]) -> Client {
    let url = format!("wss://127.0.0.1:{}/ws", s.addr.port());
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(client_config(trusted))),
    )
    .await
    .expect("wss connect");
    Client::from_ws(ws)
}

#[tokio::test]
async fn a_wss_client_connects_says_hello_and_chats() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let mut a = wss_client(&s, &[&der]).await;
    let w = a.request(json!({"type": "hello", "name": "secure"})).await;
    assert_eq!(w["type"], "welcome");
    a.request(json!({"type": "join", "room": "tls"})).await;
    let ack = a
        .request(json!({"type": "send", "room": "tls", "text": "over TLS"}))
        .await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(a.recv_type("message").await["text"], "over TLS");
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "no plaintext answer");
    // The server is unharmed.
    let mut c = wss_client(&s, &[&der]).await;
    assert_eq!(
        c.request(json!({"type": "hello", "name": "after"})).await["type"],
        "welcome"
    );
}

/// A minimal TLS 1.0 ClientHello (no supported_versions extension).
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01]; // client_version TLS 1.0
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // two CBC suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend(hs);
    rec
}

#[tokio::test]
async fn a_tls_1_0_client_gets_a_protocol_version_alert() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_cert(dir.path(), "a");
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&tls10_client_hello()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(buf.len() >= 7, "an alert record: {buf:?}");
    assert_eq!(buf[0], 0x15, "record type alert");
    assert_eq!(buf[5], 2, "fatal");
    // rustls answers handshake_failure (40); protocol_version (70) would do as well.
    assert!([40, 70].contains(&buf[6]), "alert {}", buf[6]);
}

async fn peer_cert(s: &Server, trusted: &[&[u8]]) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(client_config(trusted));
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der_a) = write_cert(dir.path(), "live");
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let mut old = wss_client(&s, &[&der_a]).await;
    old.request(json!({"type": "hello", "name": "old"})).await;
    old.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(peer_cert(&s, &[&der_a]).await, der_a);
    // New files in place, then SIGHUP.
    let (_, _, der_b) = write_cert(dir.path(), "live");
    assert_ne!(der_a, der_b);
    signal(s.pid(), "HUP");
    let deadline = Instant::now() + WAIT;
    while peer_cert(&s, &[&der_a, &der_b]).await != der_b {
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before the reload still works.
    let ack = old
        .request(json!({"type": "send", "room": "r", "text": "still here"}))
        .await;
    assert_eq!(ack["type"], "ack");
}

#[tokio::test]
async fn a_bad_certificate_on_sighup_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "live");
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]).await;
    std::fs::write(&cert, "not a certificate").unwrap();
    signal(s.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(peer_cert(&s, &[&der]).await, der);
    assert!(s.log().contains("TLS reload failed"));
}

#[tokio::test]
async fn a_sighup_the_moment_the_server_says_it_listens_does_not_stop_it() {
    // Without TLS there is nothing to reload; the signal must still not take its
    // default action (terminate), even when it arrives right after the listening line.
    let s = Server::start(&[]).await;
    signal(s.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = s.guest("after-hup").await;
    let joined = c.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert!(s.log().contains("nothing to reload"), "{}", s.log());
}

#[tokio::test]
async fn a_drain_of_2000_connections_at_500_per_second_spreads_closes_over_about_4_seconds() {
    let mut s = Server::start(&["--drain-rate", "500", "--rate-limit", "1000"]).await;
    let mut closers = Vec::new();
    for i in 0..2000 {
        let url = s.url();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let mut c = Client::from_ws(ws);
        c.send(json!({"type": "hello", "name": format!("u{i}")}))
            .await;
        closers.push(c);
    }
    // Every connection has its welcome before the drain starts.
    for c in closers.iter_mut() {
        assert_eq!(c.recv().await["type"], "welcome");
    }
    let mut sender = s.member("sender", "drain").await;
    let started = Instant::now();
    let watchers: Vec<_> = closers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let (closed, seen) = c.expect_close(Duration::from_secs(30)).await;
                let closing = seen.into_iter().find(|v| v["type"] == "closing");
                (closed, Instant::now(), closing)
            })
        })
        .collect();
    signal(s.pid(), "TERM");
    // Keep sending while the drain runs; every ack must survive.
    let mut acked = Vec::new();
    for i in 0..40 {
        sender
            .ws
            .send(Message::text(
                json!({"type": "send", "room": "drain", "text": format!("d{i}")}).to_string(),
            ))
            .await
            .ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, seen) = sender.expect_close(Duration::from_secs(30)).await;
    acked.extend(
        seen.iter()
            .filter(|v| v["type"] == "ack")
            .map(|v| v["seq"].as_u64().unwrap()),
    );
    let mut times = Vec::new();
    for w in watchers {
        let (closed, at, closing) = w.await.unwrap();
        assert_eq!(closed, Closed::Code(1001));
        let closing = closing.expect("closing before 1001");
        assert!(
            closing["reconnect_ms"].as_u64().is_some(),
            "a suggested reconnect delay: {closing}"
        );
        times.push(at.duration_since(started).as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let first = times[0];
    let last = times[times.len() - 1];
    assert!((3.0..6.5).contains(&last), "the drain took {last:.2} s");
    assert!(first < 1.0, "closing starts at once ({first:.2} s)");
    let in_first_second = times.iter().filter(|t| **t < first + 1.0).count();
    assert!(
        in_first_second < 800,
        "closes are spread: {in_first_second} in the first second"
    );
    assert!(s.terminate_wait().await.success());
    assert!(!acked.is_empty());
    s.restart().await;
    let mut check = s.guest("check").await;
    let h = check
        .request(json!({"type": "history", "room": "drain", "limit": 500}))
        .await;
    let stored: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    for seq in &acked {
        assert!(stored.contains(seq), "acked {seq} lost");
    }
}

#[tokio::test]
async fn a_small_server_still_exits_at_once() {
    let mut s = Server::start(&["--drain-rate", "1"]).await;
    let _a = s.guest("only").await;
    let started = Instant::now();
    assert!(s.terminate().await.success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_timeout_bounds_a_slow_drain() {
    let mut s = Server::start(&["--drain-rate", "1", "--shutdown-timeout", "2"]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(s.guest(&format!("g{i}")).await);
    }
    let started = Instant::now();
    assert!(s.terminate().await.success());
    // At 1/s, 20 sessions would take 20 s; the timeout cuts it to about 2.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_timeout_bounds_an_unfinished_http_request() {
    // Issue 13: one client that sent half a request held the shutdown for ever.
    let mut s = Server::start(&["--shutdown-timeout", "3"]).await;
    let mut half = TcpStream::connect(s.addr).await.expect("connect");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write half a request");
    let mut guest = s.guest("g").await;
    let started = Instant::now();
    signal(s.pid(), "TERM");
    // The drain is not held up by the unfinished request either.
    let (closed, seen) = guest.expect_close(Duration::from_secs(3)).await;
    assert_eq!(closed, Closed::Code(1001));
    assert!(seen.iter().any(|m| m["type"] == "closing"), "{seen:?}");
    assert!(s.terminate_wait().await.success());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "exit {:?} after SIGTERM with --shutdown-timeout 3",
        started.elapsed()
    );
    drop(half);
}

#[tokio::test]
async fn readyz_turns_red_when_the_drain_starts() {
    let mut s = Server::start(&["--drain-rate", "10"]).await;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(s.guest(&format!("r{i}")).await);
    }
    assert_eq!(s.http_get("/readyz").await.0, 200);
    signal(s.pid(), "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The listener is closed: a load balancer's probe is refused (or answered 503).
    match TcpStream::connect(s.addr).await {
        Err(_) => {}
        Ok(_) => assert_eq!(s.http_get("/readyz").await.0, 503),
    }
    assert!(s.terminate_wait().await.success());
}

fn log_has(s: &Server, needle: &str) -> bool {
    s.log().contains(needle)
}

async fn connect_with_xff(s: &Server, xff: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = s.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("X-Forwarded-For", xff.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    Client::from_ws(ws)
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let trusting = Server::start(&["--log-format", "json", "--trusted-proxies", "127.0.0.1"]).await;
    let mut c = connect_with_xff(&trusting, "198.51.100.1, 203.0.113.9").await;
    c.request(json!({"type": "hello", "name": "viaproxy"}))
        .await;
    c.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        log_has(&trusting, r#""remote":"203.0.113.9""#),
        "{}",
        trusting.log()
    );

    let wary = Server::start(&["--log-format", "json"]).await;
    let mut c = connect_with_xff(&wary, "203.0.113.9").await;
    c.request(json!({"type": "hello", "name": "forged"})).await;
    c.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!log_has(&wary, "203.0.113.9"));
    assert!(log_has(&wary, r#""remote":"127.0.0.1""#));
}

#[tokio::test]
async fn logs_never_contain_message_text() {
    let s = Server::start(&["--log-format", "json"]).await;
    let mut a = s.member("alice", "r").await;
    a.request(json!({"type": "send", "room": "r", "text": "s3cr3t-payload"}))
        .await;
    a.request(json!({"type": "direct", "to": "bob", "text": "dm-s3cr3t"}))
        .await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = s.log();
    assert!(
        log.contains(r#""user":"alice""#),
        "the conn span carries the user"
    );
    assert!(!log.contains("s3cr3t"));
}

#[tokio::test]
async fn config_check_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hubbub.toml");
    std::fs::write(
        &file,
        "jwt_secret = \"hunter2\"\nmax_text = 123\ndrain_rate = 50\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["config", "check", file.to_str().unwrap()])
        .env("HUBBUB_RATE_LIMIT", "9")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_text = 123"));
    assert!(text.contains("rate_limit = 9"), "the environment applies");
    assert!(text.contains("drain_rate = 50"));
    assert!(
        text.contains("guests = false"),
        "a JWT key turns guests off"
    );
    assert!(!text.contains("hunter2"), "secret masked:\n{text}");

    std::fs::write(&file, "max_txt = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["config", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_txt"));
}

#[tokio::test]
async fn health_subcommand_succeeds_only_against_a_live_server() {
    let s = Server::start(&[]).await;
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["health", "--url", &format!("http://{}/healthz", s.addr)])
        .status()
        .unwrap();
    assert!(ok.success());
    let port = s.addr.port();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args([
            "health",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz"),
        ])
        .status()
        .unwrap();
    assert!(!down.success());
}

/// Names of the metrics a running server exports (without label sets).
pub async fn exported_metrics(s: &Server) -> Vec<String> {
    let (_, body) = s.http_get("/metrics").await;
    let mut names: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Exercise the server enough that every metric has a value.
async fn exercise(s: &Server) {
    let mut a = s.member("alice", "m").await;
    let mut b = Client::connect(&s.url()).await;
    b.request(json!({"type": "hello", "name": "bob", "batch": true}))
        .await;
    b.request(json!({"type": "join", "room": "m"})).await;
    for i in 0..5 {
        a.send(json!({"type": "send", "room": "m", "text": format!("{i}")}))
            .await;
    }
    a.send(json!({"type": "typing", "room": "m"})).await;
    a.request(json!({"type": "nope"})).await;
    while b.try_recv(Duration::from_millis(300)).await.is_some() {}
    b.close().await;
    let _ = a.ws.next().await;
}

#[tokio::test]
async fn metrics_cover_connections_messages_queues_closes_store_and_broker() {
    let s = Server::start(&["--heartbeat", "0.3"]).await;
    exercise(&s).await;
    let mut ghost = common::RawWs::connect(s.addr).await;
    ghost
        .frame(0x81, br#"{"type":"hello","name":"ghost"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(900)).await; // dropped by the heartbeat
    let names = exported_metrics(&s).await;
    for want in [
        "hubbub_connections",
        "hubbub_connections_total",
        "hubbub_users",
        "hubbub_rooms",
        "hubbub_room_members",
        "hubbub_messages_in_total",
        "hubbub_messages_out_total",
        "hubbub_deliveries_total",
        "hubbub_outbox_depth_bucket",
        "hubbub_batch_size_bucket",
        "hubbub_slow_consumer_closes_total",
        "hubbub_rate_limited_total",
        "hubbub_heartbeat_drops_total",
        "hubbub_closes_total",
        "hubbub_store_commit_seconds_bucket",
        "hubbub_store_commit_batch_size_bucket",
        "hubbub_broker_publish_seconds_bucket",
        "hubbub_broker_reconnects_total",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want}; have {names:?}"
        );
    }
    let (_, body) = s.http_get("/metrics").await;
    assert!(body.contains(r#"hubbub_connections{state="active"}"#));
    assert!(body.contains(r#"hubbub_messages_out_total{type="message"}"#));
    assert!(body.contains("# HELP hubbub_heartbeat_drops_total"));
    let drops = body
        .lines()
        .find(|l| l.starts_with("hubbub_heartbeat_drops_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(drops >= 1.0);
}

#[tokio::test]
async fn metrics_include_the_process_memory_cpu_and_file_descriptors() {
    let s = Server::start(&[]).await;
    let _c = s.guest("someone").await;
    let (_, body) = s.http_get("/metrics").await;
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    assert!(value("process_resident_memory_bytes") > f64::from(1u32 << 20));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    // The listener, the client's socket and the database at least.
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/hubbub.json"),
        )
        .expect("deploy/grafana/hubbub.json"),
    )
    .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if let (true, Some(s)) = (k == "expr", v.as_str()) {
                        out.push(s.to_string());
                    }
                    walk(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "the dashboard has panels: {exprs:?}");
    let s = Server::start(&["--heartbeat", "0.3"]).await;
    exercise(&s).await;
    let exported = exported_metrics(&s).await;
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("hubbub_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "dashboard queries {name} (in {expr:?}), which Hubbub does not export"
            );
            rest = &rest[i + name.len()..];
        }
    }
}

#[tokio::test]
async fn process_cpu_seconds_keep_their_fraction_and_are_a_counter() {
    let s = Server::start(&[]).await;
    let _c = s.guest("someone").await;
    let (_, body) = s.http_get("/metrics").await;
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter"),
        "{body}"
    );
    let cpu: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("process_cpu_seconds_total in /metrics");
    // Starting up took some CPU, and well under a second of it: a whole-second
    // counter would say 0.
    assert!(cpu > 0.0, "{cpu}");
    assert_eq!(
        body.matches("\nprocess_cpu_seconds_total ").count(),
        1,
        "exported once"
    );
}
