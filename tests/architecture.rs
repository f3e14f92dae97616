//! The architecture, held by tests: the seams in the module docs are the only way
//! through, and no two modules import each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// (path relative to src/, contents) of every source file.
fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(src())
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&p).expect("readable source");
            (rel, text)
        })
        .collect()
}

/// The crate's top-level module a file belongs to (`hub/channel.rs` -> `hub`).
fn module_of(rel: &str) -> String {
    rel.split('/')
        .next()
        .expect("a path")
        .trim_end_matches(".rs")
        .to_owned()
}

#[test]
fn redis_is_named_only_in_the_broker_and_the_config() {
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("broker/") && rel != "config.rs")
        .filter(|(_, text)| text.to_lowercase().contains("redis"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        offenders.is_empty(),
        "Redis named outside broker/: {offenders:?}"
    );
}

#[test]
fn sql_is_spoken_only_in_the_store() {
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("store/"))
        .filter(|(_, text)| text.contains("sqlx"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        offenders.is_empty(),
        "sqlx used outside store/: {offenders:?}"
    );
}

#[test]
fn serde_serialize_derives_live_in_the_protocol_or_the_broker() {
    // Every JSON shape a client sees is in protocol/; the broker has its own
    // envelope between nodes. Nowhere else derives Serialize.
    let offenders: Vec<String> = sources()
        .into_iter()
        // auth.rs signs and verifies JWTs: their claims are a token's, not a
        // message's, and stay with the code that checks them.
        .filter(|(rel, _)| {
            !rel.starts_with("protocol/") && !rel.starts_with("broker/") && rel != "auth.rs"
        })
        .filter(|(_, text)| text.contains("derive(Serialize") || text.contains(", Serialize"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        offenders.is_empty(),
        "wire types outside protocol/: {offenders:?}"
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
        let from = module_of(&rel);
        for line in text.lines() {
            let line = line.trim_start();
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let to: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !to.is_empty() && to != from && !line.starts_with("//") {
                    imports.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, tos) in &imports {
        for b in tos {
            if a < b && imports.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other: {cycles:?}"
    );
}

#[test]
fn every_module_says_what_it_owns_and_what_it_must_not_do() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|(rel, _)| {
            // Module roots and files of their own; tests and the binary are exempt.
            !rel.ends_with("tests.rs") && rel != "main.rs" && rel != "lib.rs"
        })
        .filter(|(_, text)| {
            let doc: String = text
                .lines()
                .take_while(|l| l.starts_with("//!") || l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            !(doc.contains("Owns") && doc.contains("Must not"))
        })
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        missing.is_empty(),
        "module docs without Owns/Must not: {missing:?}"
    );
}
