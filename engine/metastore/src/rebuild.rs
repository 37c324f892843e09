//! The index rebuilt from object storage alone: every block object ends
//! with its metadata, and a compacted block names the blocks it replaces,
//! so losing every metastore disk loses no acknowledged profile. Sources
//! still waiting for deletion are left out for the tenant whose compacted
//! block replaced them (a level-0 segment holds several tenants, and is
//! compacted for each on its own); retention and the sweeper then run as
//! on any index.

use std::collections::HashSet;

use ember_engine::block::{read_footer, BlockError};
use ember_engine::BlockMeta;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;

use crate::{Command, Metastore, MetastoreError};

/// Footers read at once.
const CONCURRENT_READS: usize = 16;
/// Blocks added in one transaction.
const BATCH: usize = 256;

/// What a rebuild found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Blocks indexed.
    pub blocks: usize,
    /// Datasets (a tenant's service in a block) indexed.
    pub datasets: usize,
    /// Datasets left out: a compacted block replaces them.
    pub replaced: usize,
    /// Objects named `block.bin` whose footer could not be read: (path, why).
    pub unreadable: Vec<(String, String)>,
}

/// Indexes into `metastore` every block in `store`, reporting each footer
/// read to `progress` (read, of how many).
pub async fn rebuild_index(
    store: &dyn ObjectStore,
    metastore: &Metastore,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Rebuilt, MetastoreError> {
    let unavailable = |e: object_store::Error| MetastoreError::Unavailable(e.to_string());
    let mut paths: Vec<String> = store
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_filter(|p| futures::future::ready(p.ends_with("/block.bin")))
        .try_collect()
        .await
        .map_err(unavailable)?;
    paths.sort();
    let total = paths.len();
    let mut rebuilt = Rebuilt::default();
    let mut metas = Vec::with_capacity(total);
    let mut reads = futures::stream::iter(paths)
        .map(|path| async move {
            let meta = read_footer(store, &path).await;
            (path, meta)
        })
        .buffer_unordered(CONCURRENT_READS);
    let mut read = 0;
    while let Some((path, meta)) = reads.next().await {
        read += 1;
        progress(read, total);
        match meta {
            Ok(meta) => metas.push(meta),
            // A damaged object is left out and named; a read that failed
            // (the store throttled, timed out) fails the rebuild, or a
            // block would be left out of the index and swept as an orphan.
            Err(e @ BlockError::Corrupt { .. }) => rebuilt.unreadable.push((path, e.to_string())),
            Err(e) => return Err(MetastoreError::Unavailable(e.to_string())),
        }
    }
    let replaced: HashSet<(String, String)> = metas
        .iter()
        .flat_map(|m| {
            m.datasets.iter().flat_map(move |d| {
                m.sources
                    .iter()
                    .map(move |source| (d.tenant.clone(), source.clone()))
            })
        })
        .collect();
    let mut commands = Vec::new();
    for mut meta in metas {
        let before = meta.datasets.len();
        meta.datasets
            .retain(|d| !replaced.contains(&(d.tenant.clone(), meta.id.clone())));
        rebuilt.replaced += before - meta.datasets.len();
        if meta.datasets.is_empty() {
            continue;
        }
        rebuilt.blocks += 1;
        rebuilt.datasets += meta.datasets.len();
        commands.push(Command::add_block(BlockMeta {
            sources: Vec::new(),
            ..meta
        }));
        if commands.len() == BATCH {
            metastore.apply_all(std::mem::take(&mut commands))?;
        }
    }
    if !commands.is_empty() {
        metastore.apply_all(commands)?;
    }
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockQuery;
    use ember_engine::block::block_path;
    use ember_engine::{DatasetMeta, SectionMeta};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    const HOUR: i64 = 3_600_000_000_000;

    fn block(id: &str, level: u32, tenants: &[&str], sources: &[&str]) -> BlockMeta {
        BlockMeta {
            format_version: 1,
            id: id.into(),
            path: block_path(level, 0, tenants[0], id),
            shard: 0,
            compaction_level: level,
            min_time: HOUR,
            max_time: 2 * HOUR,
            size: 1,
            datasets: tenants
                .iter()
                .map(|t| DatasetMeta {
                    tenant: t.to_string(),
                    service_name: "api".into(),
                    min_time: HOUR,
                    max_time: 2 * HOUR,
                    profile_types: vec!["cpu".into()],
                    sections: vec![SectionMeta::default()],
                    profiles: 1,
                    samples: 1,
                    ..DatasetMeta::default()
                })
                .collect(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn indexed(m: &Metastore, tenant: &str) -> Vec<String> {
        let mut ids: Vec<String> = m
            .query(&BlockQuery {
                tenant: tenant.into(),
                start: i64::MIN,
                end: i64::MAX,
                ..BlockQuery::default()
            })
            .iter()
            .map(|d| d.block_id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn the_index_comes_back_from_the_objects_without_replaced_sources() {
        let store = InMemory::new();
        // S holds two tenants; a's part of S and T went into C, and C into
        // D (which names every block before it); b's part of S is not
        // compacted yet. S, T and C still wait for deletion.
        for meta in [
            block("S", 0, &["a", "b"], &[]),
            block("T", 0, &["a"], &[]),
            block("C", 1, &["a"], &["S", "T"]),
            block("D", 2, &["a"], &["C", "S", "T"]),
        ] {
            let path = Path::from(meta.path.as_str());
            // A block object ends with its framed metadata.
            let mut bytes = b"sections".to_vec();
            bytes.extend(meta.encode_framed());
            store.put(&path, PutPayload::from(bytes)).await.unwrap();
        }
        let torn = Path::from("segments/0/anonymous/torn/block.bin");
        store.put(&torn, PutPayload::from("xx")).await.unwrap();
        store
            .put(&Path::from("dlq/0/S.meta"), PutPayload::from("not a block"))
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let m = Metastore::open(&dir.path().join("metastore.redb")).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let rebuilt = rebuild_index(&store, &m, &|read, total| {
            seen.lock().unwrap().push((read, total))
        })
        .await
        .unwrap();
        assert_eq!(indexed(&m, "a"), ["D"]);
        assert_eq!(indexed(&m, "b"), ["S"]);
        assert_eq!(
            (rebuilt.blocks, rebuilt.datasets, rebuilt.replaced),
            (2, 2, 3)
        );
        assert_eq!(rebuilt.unreadable.len(), 1);
        assert!(rebuilt.unreadable[0].0.contains("torn"));
        assert_eq!(seen.lock().unwrap().last(), Some(&(5, 5)));
    }
}
