//! The parsers that face the internet, under property-based fuzzing (proptest, on
//! stable Rust): the WebSocket frame reader and handshake checks (`src/ws.rs`), the
//! command parser and the server API's body parsers (`src/protocol/`), and the
//! publish check's answer. Inputs are arbitrary bytes, and mutations of a seed
//! corpus of valid frames and bodies (so that the deep paths are reached, not only
//! "invalid JSON"). Each property: no panic, and what is accepted keeps the limits.
//!
//! Bounded for the suite (`HUBBUB_FUZZ_CASES`, default 100,000 cases per target,
//! the frame reader a quarter of that: about 20 s in all on this machine);
//! `scripts/fuzz` runs 200 times more, in release. A failure is shrunk to a
//! minimal input and saved under `proptest-regressions/`, which every later run
//! replays first: each crash found becomes a regression test.

use hubbub::protocol::{self, Command, ParseLimits};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::time::Duration;

const LIMITS: ParseLimits = ParseLimits { max_text: 40 };

fn cases() -> u32 {
    std::env::var("HUBBUB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn config() -> Config {
    Config {
        cases: cases(),
        ..Config::default()
    }
}

/// Valid commands of every type, to mutate.
const COMMANDS: &[&str] = &[
    r#"{"type":"hello","id":1,"name":"alice","batch":true}"#,
    r#"{"type":"hello","id":"h","token":"eyJhbGciOiJIUzI1NiJ9.e30.sig"}"#,
    r#"{"type":"join","id":2,"room":"lobby","since":{"seq":3,"epoch":"e"},"history":10,"persist":true}"#,
    r#"{"type":"leave","room":"lobby","persist":true}"#,
    r#"{"type":"send","id":3,"room":"lobby","text":"hi","meta":{"a":[1,2,{"b":null}]},"client_id":"c1"}"#,
    r#"{"type":"direct","to":"bob","text":"psst","client_id":"x"}"#,
    r#"{"type":"history","dm":"bob","before":10,"limit":20,"current":true}"#,
    r#"{"type":"presence","room":"r","after":"m","limit":5}"#,
    r#"{"type":"typing","room":"r"}"#,
    r#"{"type":"ping","id":9}"#,
    r#"{"type":"edit","room":"r","target":4,"text":"fixed","client_id":"e"}"#,
    r#"{"type":"delete","dm":"bob","target":2}"#,
    r#"{"type":"react","room":"r","target":1,"emoji":"👍","on":false}"#,
    r#"{"type":"read","room":"r","seq":12}"#,
    r#"{"type":"unread","id":1}"#,
    r#"{"type":"refresh","token":"t"}"#,
];

/// Valid API bodies, to mutate.
const BODIES: &[&str] = &[
    r#"{"text":"deploy at 5","from":"bot","meta":{"k":1}}"#,
    r#"{"reason":"spam"}"#,
    r#"{"until":99999999999999,"reason":"x"}"#,
    r#"{"jti":"abc"}"#,
    r#"{"user":"alice","issued_before":1700000000}"#,
    r#"{"allow":true,"text":"[redacted]","meta":null}"#,
    r#"{"allow":false,"reason":"no"}"#,
];

/// A seed with a few random edits: bytes replaced, inserted or removed.
fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
    )
        .prop_map(|(seed, edits)| {
            let mut b = seed.as_bytes().to_vec();
            for (at, byte, op) in edits {
                let i = at.index(b.len() + 1);
                match op {
                    0 if i < b.len() => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ if i < b.len() => {
                        b.remove(i);
                    }
                    _ => {}
                }
            }
            b
        })
}

/// Arbitrary bytes, mutated seeds, or a seed's field swapped for an odd value.
fn inputs(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let odd_values = prop::sample::select(vec![
        "null",
        "-1",
        "1e400",
        "18446744073709551616",
        "\"\"",
        "\"\\u0000\"",
        "[]",
        "{}",
        "true",
        "\"x\"",
        "0.5",
    ]);
    let swapped = (
        prop::sample::select(seeds),
        odd_values,
        any::<prop::sample::Index>(),
    )
        .prop_map(|(seed, value, at)| {
            // Replace the value after one of the seed's colons.
            let colons: Vec<usize> = seed.match_indices(':').map(|(i, _)| i).collect();
            if colons.is_empty() {
                return seed.as_bytes().to_vec();
            }
            let c = colons[at.index(colons.len())];
            let rest = &seed[c + 1..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            format!("{}{}{}", &seed[..=c], value, &rest[end..]).into_bytes()
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        mutated(seeds),
        swapped,
    ]
}

/// What an accepted command promises.
fn check_command(cmd: &Command) {
    let text_ok = |t: &str| !t.is_empty() && t.chars().count() <= LIMITS.max_text;
    match cmd {
        Command::Send {
            room, text, meta, ..
        } => {
            assert!(protocol::valid_room_name(room));
            assert!(text_ok(text));
            assert!(
                meta.as_ref()
                    .is_none_or(|m| m.get().len() <= protocol::MAX_META_BYTES)
            );
        }
        Command::Direct { text, .. } | Command::Edit { text, .. } => assert!(text_ok(text)),
        Command::Join { room, history, .. } => {
            assert!(protocol::valid_room_name(room));
            assert!(*history <= protocol::MAX_HISTORY);
        }
        Command::History { limit, .. } => assert!(*limit <= protocol::MAX_HISTORY),
        Command::Presence { limit, .. } => {
            assert!((1..=protocol::MAX_PRESENCE_PAGE).contains(limit));
        }
        Command::React { emoji, target, .. } => {
            assert!(*target > 0);
            assert!((1..=16).contains(&emoji.chars().count()));
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_command_parser_never_panics_and_keeps_its_limits(input in inputs(COMMANDS)) {
        let frame = String::from_utf8_lossy(&input);
        if let Ok((_, cmd)) = protocol::parse_command(&frame, LIMITS) {
            check_command(&cmd);
        }
    }

    #[test]
    fn the_api_body_parsers_never_panic(input in inputs(BODIES)) {
        let _ = protocol::parse_api_post(&input, LIMITS);
        let _ = protocol::parse_api_reason(&input);
        let _ = protocol::parse_api_ban(&input, 1_700_000_000_000);
        let _ = protocol::parse_api_revoke(&input);
        let _ = protocol::api::parse_publish_verdict(&input, LIMITS);
    }

    #[test]
    fn the_handshake_checks_never_panic(
        key in prop::collection::vec(any::<u8>(), 0..64),
        version in prop::collection::vec(any::<u8>(), 0..8),
        upgrade in prop::sample::select(vec!["websocket", "WebSocket", "h2c", ""]),
        post in any::<bool>(),
    ) {
        use axum::http::{HeaderMap, HeaderValue, Method};
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("sec-websocket-key", key.as_slice()),
            ("sec-websocket-version", version.as_slice()),
            ("upgrade", upgrade.as_bytes()),
            ("connection", b"Upgrade".as_slice()),
        ] {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.insert(name, v);
            }
        }
        let method = if post { Method::POST } else { Method::GET };
        let _ = hubbub::ws::accept(&method, &h);
    }
}

/// Client frames: arbitrary bytes, or valid masked frames with random opcodes,
/// lengths, flags and payloads (fragments, control frames, closes).
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<bool>(),
        0u8..16,
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<[u8; 4]>(),
    )
        .prop_map(|(fin, opcode, masked, payload, mask)| {
            let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
            let m = if masked { 0x80 } else { 0 };
            match payload.len() {
                n if n < 126 => out.push(m | n as u8),
                n => {
                    out.push(m | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
            }
            if masked {
                out.extend_from_slice(&mask);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            } else {
                out.extend_from_slice(&payload);
            }
            out
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(frame, 1..6).prop_map(|fs| fs.concat()),
    ]
}

proptest! {
    #![proptest_config(Config { cases: cases() / 4, ..Config::default() })]

    #[test]
    fn the_frame_reader_never_panics_and_ends(input in frames()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            client.write_all(&input).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut ws = hubbub::ws::WsStream::new(server, 1024);
            // Every input ends: an error, a close, or the end of the bytes.
            let done = tokio::time::timeout(Duration::from_secs(5), async {
                for _ in 0..64 {
                    match ws.next().await {
                        Ok(Some(hubbub::ws::Incoming::Text(t))) => assert!(t.len() <= 1024),
                        Ok(Some(hubbub::ws::Incoming::Close(_))) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(done.is_ok(), "the reader hung on {input:?}");
        });
    }
}
