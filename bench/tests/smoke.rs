//! The benchmark tool, run for real for a few seconds: against the floor server and
//! against the real hubbub binary. These check that the tool counts right (every
//! expected delivery, every ack), not how fast anything is: speed is measured with
//! the tool itself (BENCHMARKS.md), never in timed tests.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a server process and return it with the address line it printed.
fn start(cmd: &mut Command, prefix: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let addr = line
        .trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc(child), addr)
}

/// The hubbub binary built beside this one in the workspace's target directory.
fn hubbub_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hubbub-bench"));
    let bin = exe.with_file_name("hubbub");
    assert!(
        bin.is_file(),
        "{} not built (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run hubbub-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The floor server on a free port, and its WebSocket URL.
fn floor() -> (Proc, String) {
    start(
        Command::new(env!("CARGO_BIN_EXE_hubbub-bench")).args(["floor", "--listen", "127.0.0.1:0"]),
        "floor listening on ",
    )
}

fn hubbub(extra: &[&str]) -> (Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (p, http) = start(
        Command::new(hubbub_bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--rate-limit",
                "100000",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(extra),
        "hubbub listening on ",
    );
    let ws = http.replace("http://", "ws://") + "/ws";
    (p, ws, dir)
}

#[test]
fn fanout_against_the_floor_counts_every_delivery() {
    let (_floor, url) = floor();
    let r = bench(&[
        "fanout",
        "--url",
        &url,
        "--conns",
        "50",
        "--rooms",
        "2",
        "--senders",
        "4",
        "--rate",
        "40",
        "--warmup",
        "1",
        "--duration",
        "2",
    ]);
    let step = &r["steps"][0];
    assert!(step["expected"].as_u64().unwrap() > 0);
    assert_eq!(step["received"], step["expected"], "{step}");
    assert_eq!(step["duplicates"], 0);
    assert_eq!(step["out_of_order"], 0);
}

#[test]
fn fanout_against_hubbub_counts_every_delivery_with_and_without_batching() {
    let (server, url, _dir) = hubbub(&[]);
    let pid = server.0.id().to_string();
    for batch in [false, true] {
        let mut args = vec![
            "fanout",
            "--url",
            &url,
            "--conns",
            "40",
            "--rooms",
            "1",
            "--senders",
            "2",
            "--rate",
            "20",
            "--warmup",
            "1",
            "--duration",
            "2",
            "--pid",
            &pid,
        ];
        if batch {
            args.push("--batch");
        }
        let r = bench(&args);
        let step = &r["steps"][0];
        // 2 s x 20 msg/s x 40 receivers.
        assert_eq!(step["expected"], 1600, "{step}");
        assert_eq!(step["received"], 1600, "{step}");
        assert!(step["server_cpu_us_per_delivery"].as_f64().is_some());
        assert!(step["p99_ms"].as_f64().unwrap() > 0.0);
    }
}

/// A ramp of 20 connections, 2 senders, from 10 messages/s, 1 s steps.
fn small_ramp(url: &str, max_steps: &str) -> Value {
    bench(&[
        "fanout",
        "--url",
        url,
        "--conns",
        "20",
        "--senders",
        "2",
        "--rate",
        "10",
        "--warmup",
        "1",
        "--duration",
        "1",
        "--ramp",
        "--max-steps",
        max_steps,
    ])
}

#[test]
fn ramp_reports_steps_and_the_highest_passing_rate() {
    let (_server, url, _dir) = hubbub(&["--store", "memory"]);
    let r = small_ramp(&url, "2");
    let steps = r["steps"].as_array().unwrap();
    // Whether a step passes depends on the machine; the ramp's rules do not: the
    // rate grows each step, the ramp stops at the first failing step or after
    // --max-steps, and the answer is the highest passing rate.
    assert!(!steps.is_empty() && steps.len() <= 2, "{r}");
    for pair in steps.windows(2) {
        assert!(pair[1]["rate"].as_f64().unwrap() > pair[0]["rate"].as_f64().unwrap());
        assert_eq!(pair[0]["passes"], true, "a failing step ends the ramp");
    }
    let best = steps
        .iter()
        .filter(|s| s["passes"] == true)
        .map(|s| s["rate"].as_f64().unwrap())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    assert_eq!(r["highest_passing_rate"].as_f64(), best);
    let ended_by_the_cap = steps.len() == 2 && steps[1]["passes"] == true;
    assert_eq!(r["capped"], ended_by_the_cap, "{r}");
}

#[test]
fn a_ramp_that_only_ran_out_of_steps_says_it_was_capped() {
    let (_server, url, _dir) = hubbub(&["--store", "memory"]);
    let r = small_ramp(&url, "1");
    assert_eq!(r["steps"][0]["passes"], true, "a light load passes: {r}");
    assert_eq!(r["capped"], true, "{r}");
}

#[test]
fn every_step_of_a_ramp_counts_its_deliveries_afresh() {
    // Senders keep numbering their messages across steps: a step that started
    // again from 1 would be counted as duplicates and reorderings, and lost.
    let (_server, url, _dir) = hubbub(&["--store", "memory"]);
    let r = small_ramp(&url, "3");
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "a light load passes every step: {r}");
    for step in steps {
        assert_eq!(step["duplicates"], 0, "{step}");
        assert_eq!(step["out_of_order"], 0, "{step}");
        assert_eq!(step["lost"], 0, "{step}");
        assert_eq!(step["ratio"], 1.0, "{step}");
    }
}

#[test]
fn acks_times_every_send_to_its_ack() {
    let (_server, url, _dir) = hubbub(&[]);
    let r = bench(&[
        "acks",
        "--url",
        &url,
        "--conns",
        "2",
        "--rate",
        "50",
        "--duration",
        "2",
    ]);
    assert_eq!(r["sent"], 100);
    assert_eq!(r["acked"], 100);
    assert!(r["p99_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn idle_reports_server_rss_per_connection() {
    let (server, url, _dir) = hubbub(&[]);
    let pid = server.0.id().to_string();
    let r = bench(&[
        "idle", "--url", &url, "--conns", "300", "--rooms", "10", "--hold", "1", "--pid", &pid,
    ]);
    assert_eq!(r["conns"], 300);
    assert!(r["rss_bytes_per_conn"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn idle_without_a_pid_reads_server_rss_from_metrics() {
    let (_server, url, _dir) = hubbub(&[]);
    let r = bench(&[
        "idle", "--url", &url, "--conns", "300", "--rooms", "10", "--hold", "1",
    ]);
    assert_eq!(r["server_figures"], "metrics", "{r}");
    assert!(r["rss_after"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["rss_bytes_per_conn"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn fanout_without_a_pid_reads_server_cpu_from_metrics() {
    let (_server, url, _dir) = hubbub(&[]);
    let r = bench(&[
        "fanout",
        "--url",
        &url,
        "--conns",
        "200",
        "--rooms",
        "1",
        "--senders",
        "2",
        "--rate",
        "50",
        "--warmup",
        "1",
        "--duration",
        "3",
    ]);
    assert_eq!(r["server_figures"], "metrics", "{r}");
    let step = &r["steps"][0];
    assert_eq!(step["received"], step["expected"], "{step}");
    assert!(
        step["server_cpu_us_per_delivery"].as_f64().unwrap() > 0.0,
        "{step}"
    );
}

#[test]
fn a_server_without_metrics_still_gets_measured_and_reports_no_server_figures() {
    let (_floor, url) = floor();
    let r = bench(&[
        "idle", "--url", &url, "--conns", "20", "--rooms", "2", "--hold", "0",
    ]);
    assert_eq!(r["conns"], 20);
    assert!(r["rss_bytes_per_conn"].is_null(), "{r}");
    assert!(r["server_figures"].is_null(), "{r}");
}

#[test]
fn an_open_file_limit_below_n_caps_the_connections_and_says_so() {
    let (_floor, url) = floor();
    // A hard limit of 200 open files that the tool cannot raise: 200 - 64 spare.
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -n 200 && exec "$0" idle --url "$1" --conns 500 --rooms 2 --hold 0 --json"#)
        .arg(env!("CARGO_BIN_EXE_hubbub-bench"))
        .arg(&url)
        .output()
        .expect("run hubbub-bench under ulimit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(r["conns_asked"], 500, "{r}");
    assert_eq!(r["conns"], 136, "{r}");
    assert!(
        stderr.contains("caps the connections at 136 (asked for 500)"),
        "{stderr}"
    );
}

#[test]
fn hello_times_a_user_with_rooms_beside_a_new_user() {
    let (_server, url, _dir) = hubbub(&[]);
    let r = bench(&[
        "hello",
        "--url",
        &url,
        "--rooms",
        "20",
        "--messages",
        "4",
        "--repeat",
        "5",
    ]);
    assert_eq!(r["rooms_listed"], 20, "welcome lists every room: {r}");
    for k in ["with_rooms_p50_ms", "new_user_p50_ms"] {
        assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
    }
}
