//! `hello`: guests, JWTs (HS256, RS256, ES256), and the close codes of a bad start.

mod common;

use common::{Closed, Server, fixture, jwt_hs256, now_secs};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn guest_hello_gets_welcome_with_user_conn_heartbeat_and_limits() {
    let s = Server::start(&["--heartbeat", "7"]).await;
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "name": "alice"})).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["protocol"], "1.1");
    assert_eq!(w["user"], "alice");
    assert!(w["conn"].is_string());
    assert_eq!(w["heartbeat_ms"], 7000);
    assert_eq!(w["limits"]["max_text"], 4000);
    assert_eq!(w["limits"]["max_message"], 65536);
}

#[tokio::test]
async fn hello_echoes_a_string_id() {
    let s = Server::start(&[]).await;
    let mut c = s.client().await;
    c.send(json!({"type": "hello", "id": "h-1", "name": "bob"}))
        .await;
    let w = c.recv().await;
    assert_eq!(w["id"], "h-1");
}

#[tokio::test]
async fn hs256_token_sets_user_and_name() {
    let s = Server::start(&["--jwt-secret", "sekrit"]).await;
    let t = jwt_hs256(
        "sekrit",
        json!({"sub": "u-42", "name": "Ada", "exp": now_secs() + 60}),
    );
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["user"], "u-42");
    assert_eq!(w["name"], "Ada");
}

#[tokio::test]
async fn token_without_exp_is_accepted() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "forever"}));
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(w["user"], "forever");
}

async fn check_pem_token(public: &str, private: &str, alg: jsonwebtoken::Algorithm) {
    let pub_path = fixture(public);
    let s = Server::start(&["--jwt-public-key", pub_path.to_str().unwrap()]).await;
    let pem = std::fs::read(fixture(private)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &json!({"sub": "pem-user", "exp": now_secs() + 60}),
        &key,
    )
    .unwrap();
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["user"], "pem-user");
    // The same claims signed with HS256 and a guessed secret are refused.
    let forged = jwt_hs256("guess", json!({"sub": "pem-user"}));
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "token": forged})).await;
    assert_eq!(e["code"], "unauthorized");
}

#[tokio::test]
async fn rs256_token_verifies_with_a_pem_public_key() {
    check_pem_token(
        "rsa_public.pem",
        "rsa_private.pem",
        jsonwebtoken::Algorithm::RS256,
    )
    .await;
}

#[tokio::test]
async fn es256_token_verifies_with_a_pem_public_key() {
    check_pem_token(
        "ec_public.pem",
        "ec_private.pem",
        jsonwebtoken::Algorithm::ES256,
    )
    .await;
}

#[tokio::test]
async fn expired_token_gets_unauthorized_then_4001() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "late", "exp": now_secs() - 60}));
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "unauthorized");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4001)
    );
}

#[tokio::test]
async fn an_expired_tokens_close_says_token_expired_so_a_client_knows_to_get_a_new_one() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "late", "exp": now_secs() - 60}));
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["message"], "token expired");
    let (closed, _) = c.expect_close(Duration::from_secs(5)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert_eq!(c.close_reason.as_deref(), Some("token expired"));
}

#[tokio::test]
async fn bad_signature_gets_unauthorized_then_4001() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("other", json!({"sub": "x"}));
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(e["code"], "unauthorized");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4001)
    );
}

#[tokio::test]
async fn guest_hello_when_guests_are_off_gets_unauthorized_then_4001() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "name": "guest"})).await;
    assert_eq!(e["code"], "unauthorized");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4001)
    );
}

#[tokio::test]
async fn guests_can_be_turned_on_beside_a_jwt_key() {
    let s = Server::start(&["--jwt-secret", "k", "--guests"]).await;
    s.guest("visitor").await;
}

#[tokio::test]
async fn hello_without_name_or_token_gets_bad_request_then_4000() {
    let s = Server::start(&[]).await;
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello"})).await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4000)
    );
}

#[tokio::test]
async fn invalid_guest_name_gets_bad_request_then_4000() {
    let s = Server::start(&[]).await;
    let mut c = s.client().await;
    let e = c
        .request(json!({"type": "hello", "name": "has space"}))
        .await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4000)
    );
}

#[tokio::test]
async fn no_hello_in_time_closes_with_4000() {
    let s = Server::start(&["--hello-timeout", "1"]).await;
    let mut c = s.client().await;
    let started = std::time::Instant::now();
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4000)
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_command_before_hello_closes_with_4000() {
    let s = Server::start(&[]).await;
    let mut c = s.client().await;
    let e = c.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4000)
    );
}

#[tokio::test]
async fn a_second_hello_closes_with_4000() {
    let s = Server::start(&[]).await;
    let mut c = s.guest("alice").await;
    c.send(json!({"type": "hello", "name": "alice"})).await;
    let (closed, seen) = c.expect_close(Duration::from_secs(5)).await;
    assert_eq!(closed, Closed::Code(4000));
    assert!(seen.iter().any(|v| v["code"] == "bad_request"), "{seen:?}");
}

#[tokio::test]
async fn token_expiry_on_a_live_connection_sends_closing_then_4001() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "brief", "exp": now_secs() + 2}));
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(w["type"], "welcome");
    let (closed, seen) = c.expect_close(Duration::from_secs(10)).await;
    assert_eq!(closed, Closed::Code(4001));
    assert!(
        seen.iter().any(|v| v["type"] == "closing"),
        "closing first: {seen:?}"
    );
}

#[tokio::test]
async fn rooms_claim_is_enforced_with_forbidden() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "t", "rooms": ["team-*", "lobby"]}));
    let mut c = s.client().await;
    c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(
        c.request(json!({"type": "join", "room": "team-red"})).await["type"],
        "joined"
    );
    assert_eq!(
        c.request(json!({"type": "join", "room": "lobby"})).await["type"],
        "joined"
    );
    let e = c.request(json!({"type": "join", "room": "secret"})).await;
    assert_eq!(e["code"], "forbidden");
    let e = c
        .request(json!({"type": "history", "room": "secret"}))
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = c
        .request(json!({"type": "presence", "room": "secret"}))
        .await;
    assert_eq!(e["code"], "forbidden");
    // The connection stays usable.
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn token_subcommand_mints_a_token_the_server_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args([
            "token", "--secret", "s3", "--sub", "alice", "--name", "Alice", "--rooms", "team-*",
            "--ttl", "15m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let s = Server::start(&["--jwt-secret", "s3"]).await;
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "token": token})).await;
    assert_eq!(
        (w["user"].as_str(), w["name"].as_str()),
        (Some("alice"), Some("Alice"))
    );
    assert_eq!(
        c.request(json!({"type": "join", "room": "lobby"})).await["code"],
        "forbidden"
    );
}

#[tokio::test]
async fn serve_subcommand_takes_the_same_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--max-text",
            "9",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr = line
        .strip_prefix("hubbub listening on http://")
        .expect(&line)
        .to_string();
    let mut c = common::Client::connect(&format!("ws://{addr}/ws")).await;
    let w = c.request(json!({"type": "hello", "name": "sub"})).await;
    assert_eq!(w["limits"]["max_text"], 9);
    assert!(
        !dir.path().join("hubbub-data").exists(),
        "memory store writes nothing"
    );
}

#[tokio::test]
async fn hubbub_guests_false_in_the_environment_turns_guests_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(dir.path(), &[], &[("HUBBUB_GUESTS", "false")]).await;
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "name": "guest"})).await;
    assert_eq!(e["code"], "unauthorized");
}

/// A token hello that must be refused: `unauthorized`, then 4001.
async fn expect_token_refused(s: &Server, token: &str) {
    let mut c = s.client().await;
    let e = c.request(json!({"type": "hello", "token": token})).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert_eq!(
        c.expect_close(Duration::from_secs(5)).await.0,
        Closed::Code(4001)
    );
}

#[tokio::test]
async fn with_tokens_and_guests_a_guest_named_like_a_token_user_is_not_that_user() {
    // The attack of issue 13: a guest says hello with a token user's id as its name.
    let s = Server::start(&["--jwt-secret", "s3cret", "--guests"]).await;
    let t = jwt_hs256("s3cret", json!({"sub": "alice", "exp": now_secs() + 60}));
    let mut alice = s.client().await;
    let w = alice.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(w["user"], "alice", "{w}");
    let mut bob = s.guest("bob").await;
    let ack = alice
        .request(json!({"type": "direct", "to": "guest:bob", "text": "for bob only"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let _ = bob.recv_type("message").await;

    let mut fake = s.client().await;
    let w = fake
        .request(json!({"type": "hello", "name": "alice"}))
        .await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(
        w["user"], "guest:alice",
        "a guest's id is in the guests' namespace"
    );
    assert_eq!(w["name"], "alice", "its display name is what it asked for");
    let h = fake
        .request(json!({"type": "history", "dm": "guest:bob"}))
        .await;
    assert_eq!(h["type"], "history", "{h}");
    assert_eq!(h["messages"], json!([]), "alice's DMs stay alice's: {h}");
}

#[tokio::test]
async fn with_tokens_and_guests_a_token_whose_sub_starts_with_guest_is_refused() {
    let s = Server::start(&["--jwt-secret", "k", "--guests"]).await;
    expect_token_refused(&s, &jwt_hs256("k", json!({"sub": "guest:bob"}))).await;
}

#[tokio::test]
async fn on_a_token_only_server_a_guest_prefixed_sub_is_an_ordinary_user() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let mut c = s.client().await;
    let t = jwt_hs256("k", json!({"sub": "guest:bob"}));
    let w = c.request(json!({"type": "hello", "token": t})).await;
    assert_eq!(
        w["type"], "welcome",
        "no guests here to be confused with: {w}"
    );
}

#[tokio::test]
async fn on_a_guest_only_server_a_guests_user_id_is_its_name() {
    let s = Server::start(&[]).await;
    let mut c = s.client().await;
    let w = c.request(json!({"type": "hello", "name": "alice"})).await;
    assert_eq!(w["user"], "alice", "{w}");
}

#[tokio::test]
async fn a_token_sub_that_breaks_the_user_id_rules_is_refused() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    for sub in ["", "   ", "a\u{7}b", &"u".repeat(257)] {
        expect_token_refused(&s, &jwt_hs256("k", json!({"sub": sub}))).await;
    }
    let mut c = s.client().await;
    let w = c
        .request(json!({"type": "hello", "token": jwt_hs256("k", json!({"sub": "u".repeat(256)}))}))
        .await;
    assert_eq!(
        w["type"], "welcome",
        "256 characters is the limit, not over it: {w}"
    );
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let s = Server::start(&["--jwt-secret", "k"]).await;
    let t = jwt_hs256("k", json!({"sub": "a", "nbf": now_secs() + 3600}));
    expect_token_refused(&s, &t).await;
}

#[tokio::test]
async fn a_short_jwt_secret_is_accepted_with_a_warning_and_a_long_one_without() {
    let short = Server::start(&["--jwt-secret", "s3cret"]).await;
    let long = Server::start(&["--jwt-secret", &"k".repeat(32)]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(short.log().contains("under 32 bytes"), "{}", short.log());
    assert!(!long.log().contains("under 32 bytes"), "{}", long.log());
}

#[tokio::test]
async fn a_refused_token_is_explained_in_plain_words() {
    let s = Server::start(&["--jwt-secret", "the-right-secret-of-32-bytes-or-so"]).await;
    let forged = jwt_hs256(
        "another-secret-of-32-bytes-or-more",
        json!({"sub": "alice", "exp": now_secs() + 60}),
    );
    for (token, words) in [
        (forged.as_str(), "signature does not match"),
        ("not-a-token", "not a JWT"),
    ] {
        let mut c = s.client().await;
        let r = c.request(json!({"type": "hello", "token": token})).await;
        assert_eq!(r["type"], "error", "{r}");
        assert_eq!(r["code"], "unauthorized");
        let message = r["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{message}");
    }
}

#[tokio::test]
async fn a_refused_hello_is_logged_with_the_clients_address() {
    let s = Server::start(&["--jwt-secret", "the-right-secret-of-32-bytes-or-so"]).await;
    let mut c = s.client().await;
    let r = c
        .request(json!({"type": "hello", "token": "not-a-token"}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.log();
        if let Some(line) = log.lines().find(|l| l.contains("hello refused")) {
            assert!(line.contains("127.0.0.1"), "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
