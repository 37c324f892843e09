//! `ember metastore`: what an operator does to the metastore offline.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ember_engine::object_store_url::open_object_store;
use ember_metastore::{rebuild_index, Metastore};

#[derive(Args)]
pub struct MetastoreArgs {
    #[command(subcommand)]
    command: MetastoreCommand,
}

#[derive(Subcommand)]
enum MetastoreCommand {
    /// Write a new metastore from the blocks in object storage alone (after
    /// losing the metastore's disk): every block object ends with its
    /// metadata, and compacted blocks name the blocks they replace.
    Rebuild(RebuildArgs),
}

#[derive(Args)]
struct RebuildArgs {
    /// Where the new `metastore.redb` goes (and the default object store,
    /// `<data-dir>/objects`); a server started on it serves the index.
    #[arg(long, default_value = "./data", env = "EMBER_DATA_DIR")]
    data_dir: PathBuf,
    /// The object store, as `ember serve` takes it.
    #[arg(long, env = "EMBER_OBJECT_STORE_URL")]
    object_store_url: Option<String>,
    /// `key=value` for the object store; repeatable.
    #[arg(long = "object-store-option", value_name = "KEY=VALUE")]
    object_store_options: Vec<String>,
}

pub async fn metastore(args: MetastoreArgs) -> anyhow::Result<()> {
    match args.command {
        MetastoreCommand::Rebuild(args) => rebuild(args).await,
    }
}

async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let path = args.data_dir.join("metastore.redb");
    anyhow::ensure!(
        !path.exists(),
        "{} exists: a rebuild writes a new metastore; move the old one away first",
        path.display()
    );
    let store = open_object_store(
        args.object_store_url.as_deref(),
        &args.data_dir.join("objects"),
        &args.object_store_options,
    )?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let metastore =
        Metastore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let last = Mutex::new(Instant::now());
    let progress = |read: usize, total: usize| {
        let mut last = last.lock().expect("progress clock");
        if read == total || last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            eprintln!("read {read} of {total} block footers");
        }
    };
    let rebuilt = match rebuild_index(store.as_ref(), &metastore, &progress).await {
        Ok(r) => r,
        Err(e) => {
            // A partial index must not be served: the next try starts clean.
            drop(metastore);
            let _ = std::fs::remove_file(&path);
            return Err(e).context("rebuilding the metastore");
        }
    };
    for (object, why) in &rebuilt.unreadable {
        tracing::warn!(object, error = %why, "block object left out: its footer does not read");
    }
    println!(
        "indexed {} blocks ({} datasets) into {}; left out {} datasets that compacted blocks replace \
         and {} objects whose footer does not read",
        rebuilt.blocks,
        rebuilt.datasets,
        path.display(),
        rebuilt.replaced,
        rebuilt.unreadable.len()
    );
    Ok(())
}
