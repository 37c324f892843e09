//! The checked-in corpora replayed through their targets. Crashes that
//! `cargo fuzz` finds are added to these directories as regression inputs.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    entries
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let inputs = corpus(target);
    for (path, data) in &inputs {
        let outcome = std::panic::catch_unwind(|| run(data));
        assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
    }
    assert!(!inputs.is_empty(), "{target}: empty corpus");
    inputs.len()
}

#[test]
fn ingest_corpora_replay_without_panics() {
    let replayed: usize = crate::ingest::TARGETS
        .iter()
        .map(|(target, run)| replay(target, *run))
        .sum();
    assert!(replayed >= 40, "{replayed}");
}

#[cfg(feature = "sql")]
#[test]
fn flamegraph_args_corpus_replays_without_panics() {
    assert!(replay("flamegraph_args", crate::sql::flamegraph_args) >= 5);
}

#[cfg(feature = "sql")]
#[test]
fn sql_statement_corpus_replays_without_panics() {
    assert!(replay("sql_statement", crate::sql::sql_statement) >= 10);
}
