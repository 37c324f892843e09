//! The `flamegraph(...)` arguments as a client writes them, for the fuzz
//! target `flamegraph_args` (fuzz/) and the replay of its corpus: any text
//! is planned and run against an empty store, and must end in a value or an
//! error, never a panic.

use std::sync::{Arc, OnceLock};

use ember_engine::Metastore;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;

use crate::{QueryEngine, QueryEngineConfig};

struct Harness {
    runtime: tokio::runtime::Runtime,
    engine: QueryEngine,
}

fn harness() -> Option<&'static Harness> {
    static H: OnceLock<Option<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-sql-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let store = Arc::new(LocalFileSystem::new_with_prefix(&dir).ok()?);
        let metastore = Arc::new(Metastore::open(&dir.join("metastore.redb")).ok()?);
        let config = QueryEngineConfig {
            memory_limit: 256 << 20,
            target_partitions: 1,
            ..QueryEngineConfig::default()
        };
        let engine = QueryEngine::new(store, metastore, config).ok()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        Some(Harness { runtime, engine })
    })
    .as_ref()
}

/// `SELECT * FROM flamegraph(<data>)`, planned and run.
pub fn flamegraph_args(data: &[u8]) {
    let Ok(args) = std::str::from_utf8(data) else {
        return;
    };
    if args.len() > 4096 {
        return;
    }
    let Some(h) = harness() else {
        return;
    };
    let sql = format!("SELECT * FROM flamegraph({args})");
    h.runtime.block_on(async {
        if let Ok(stream) = h
            .engine
            .execute("fuzz", &sql, &crate::Settings::default())
            .await
        {
            let _ = stream.try_collect::<Vec<_>>().await;
        }
    });
}
