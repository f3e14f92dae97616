//! The deployment files, checked as far as this machine allows (no Docker engine
//! runs here): the compose file parses and points at files that exist, the
//! Dockerfile's build command produces a binary that starts with the image's
//! environment and passes the image's health check, the systemd unit verifies, and
//! nginx accepts the nginx config. (tests/../e2e runs a chat through nginx.)

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Resolve YAML merge keys (`<<: *anchor`), which YAML 1.2 parsers leave alone.
fn merged(y: &Yaml) -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    if let Yaml::Hash(h) = y {
        if let Some(base) = h.get(&Yaml::String("<<".into())) {
            out.extend(merged(base));
        }
        for (k, v) in h {
            if let Some(k) = k.as_str().filter(|k| *k != "<<") {
                out.insert(k.to_string(), v.clone());
            }
        }
    }
    out
}

/// Every configuration key Hubbub knows, from `hubbub config check`'s output.
fn known_keys() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.toml");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["config", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_once(" = ")
                .map(|(k, _)| format!("HUBBUB_{}", k.to_uppercase()))
        })
        .collect()
}

#[test]
fn compose_file_parses_and_everything_it_references_exists() {
    let docs = YamlLoader::load_from_str(&read("deploy/docker-compose.yml")).expect("valid YAML");
    let doc = &docs[0];
    let services = merged(&doc["services"]);
    for name in ["hubbub-a", "hubbub-b", "redis", "postgres", "nginx"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let known = known_keys();
    let deploy = root().join("deploy");
    for node in ["hubbub-a", "hubbub-b"] {
        let svc = merged(&services[node]);
        let build = merged(&svc["build"]);
        let context = deploy.join(build["context"].as_str().expect("build.context"));
        assert!(
            context
                .join(build["dockerfile"].as_str().unwrap())
                .is_file()
        );
        let env = merged(&svc["environment"]);
        assert_eq!(env["HUBBUB_NODE_ID"].as_str(), Some(&node[7..]));
        for key in env.keys() {
            assert!(
                known.contains(key),
                "{node} sets {key}, which Hubbub does not know"
            );
        }
    }
    let nginx = merged(&services["nginx"]);
    for v in nginx["volumes"].as_vec().unwrap() {
        let src = v.as_str().unwrap().split(':').next().unwrap();
        assert!(deploy.join(src).is_file(), "nginx mounts {src}");
    }
}

#[test]
fn dockerfile_copies_only_what_exists_and_runs_as_a_non_root_user() {
    let text = read("Dockerfile");
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "COPY source {src} missing");
        }
    }
    assert!(text.contains("RUN cargo build --release --locked"));
    let user = text
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("USER");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    assert!(text.contains(r#"CMD ["hubbub", "health", "--url", "http://127.0.0.1:8080/healthz"]"#));
    assert!(text.contains(r#"ENTRYPOINT ["hubbub"]"#));
    // The lock file the build needs is committed.
    assert!(root().join("Cargo.lock").is_file());
}

/// The ENV lines of the final stage.
fn dockerfile_env() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let final_stage = &text[text.rfind("\nFROM ").unwrap()..];
    let joined = final_stage.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn the_binary_built_like_the_dockerfile_starts_and_passes_the_health_check() {
    // scripts/test builds it with the Dockerfile's command: cargo build --release --locked.
    let bin = root().join("target/release/hubbub");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --release --locked` (scripts/test does)",
        bin.display()
    );
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(&bin);
    for (k, v) in dockerfile_env() {
        cmd.env(k, v);
    }
    // The image listens on 0.0.0.0:8080 and keeps data in /data; here, a free
    // loopback port and a temporary directory.
    cmd.env("HUBBUB_LISTEN", "127.0.0.1:0")
        .env("HUBBUB_DATA_DIR", data.path())
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(common::WAIT, lines.next_line())
        .await
        .expect("starts")
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("hubbub listening on http://")
        .expect(&line)
        .to_string();
    let health = Command::new(&bin)
        .args(["health", "--url", &format!("http://{addr}/healthz")])
        .status()
        .unwrap();
    assert!(health.success(), "the image's HEALTHCHECK command passes");
    // JSON logs, as the image sets.
    let mut err = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(5), err.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with('{'), "json log line: {first}");
    let _ = child.kill().await;
}

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let unit = read("deploy/hubbub.service");
    for key in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
        "StateDirectory=hubbub",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        // Not every machine has systemd tools; the keys above were still checked.
        eprintln!("systemd-analyze not available: skipping `verify`");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("hubbub.service");
    std::fs::write(
        &rendered,
        unit.replace("/usr/local/bin/hubbub", env!("CARGO_BIN_EXE_hubbub")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&rendered)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("hubbub.service"),
        "warnings about the unit: {stderr}"
    );
}

/// deploy/nginx/hubbub.conf with test ports and a test certificate, inside a
/// minimal main config that nginx can run as any user.
pub fn render_nginx(dir: &Path, http_port: u16, https_port: u16, upstreams: &[u16]) -> PathBuf {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let servers: String = upstreams
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p} max_fails=3 fail_timeout=5s;\n"))
        .collect();
    let mut site = read("deploy/nginx/hubbub.conf");
    let start = site.find("    server 127.0.0.1:8081").unwrap();
    let end = site[start..].find("    keepalive").unwrap() + start;
    site.replace_range(start..end, &servers);
    let site = site
        .replace("listen 80;", &format!("listen 127.0.0.1:{http_port};"))
        .replace(
            "listen 443 ssl;",
            &format!("listen 127.0.0.1:{https_port} ssl;"),
        )
        .replace(
            "/etc/ssl/hubbub/fullchain.pem",
            &dir.join("cert.pem").display().to_string(),
        )
        .replace(
            "/etc/ssl/hubbub/privkey.pem",
            &dir.join("key.pem").display().to_string(),
        );
    std::fs::write(dir.join("hubbub.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "worker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp-body;\n  \
         proxy_temp_path {d}/tmp-proxy;\n  fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  \
         scgi_temp_path {d}/tmp-scgi;\n  include {d}/hubbub.conf;\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).unwrap();
    path
}

#[test]
fn nginx_accepts_the_config() {
    let nginx = std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    assert!(
        Path::new(&nginx).is_file(),
        "nginx is needed for this test (scripts/test installs Debian's nginx)"
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = render_nginx(dir.path(), 18080, 18443, &[18081, 18082]);
    let out = Command::new(&nginx)
        .args(["-t", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
