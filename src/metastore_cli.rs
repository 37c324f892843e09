//! `ember metastore`: what an operator does to the metastore: rebuild it
//! offline, list and change the replicas of a replicated one.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ember_engine::cluster_call::ClusterClient;
use ember_engine::object_store_url::open_object_store;
use ember_metastore::raft::{ClusterConfig, MembersChange, Network};
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
    /// List the replicas of a replicated metastore, or add and remove some:
    /// an added replica (started with `--metastore-raft-node-id` and the
    /// peers) first catches up as a learner, then votes.
    Members(MembersArgs),
}

#[derive(Args)]
struct MembersArgs {
    /// Any replica's `--metastore-listen-addr`, as `http://host:port`.
    #[arg(long, env = "EMBER_METASTORE_URL")]
    metastore_url: String,
    #[arg(long, env = "EMBER_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: String,
    /// PEM certificates a replica's `https://` address must present.
    #[arg(long, env = "EMBER_CLUSTER_CA")]
    cluster_ca: Option<PathBuf>,
    /// A replica to add, as `ID=http://host:port`; repeatable.
    #[arg(long, value_name = "ID=URL")]
    add: Vec<String>,
    /// A replica to remove, by id; repeatable.
    #[arg(long, value_name = "ID")]
    remove: Vec<u64>,
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
        MetastoreCommand::Members(args) => members(args).await,
    }
}

async fn members(args: MembersArgs) -> anyhow::Result<()> {
    let client = match &args.cluster_ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            ClusterClient::trusting(&args.cluster_token, &pem)
                .with_context(|| ca.display().to_string())?
        }
        None => ClusterClient::new(&args.cluster_token),
    };
    let network = Network::new(client);
    let url = args.metastore_url.trim_end_matches('/');
    let mut members = network
        .members(url)
        .await
        .map_err(|e| anyhow::anyhow!("asking {url} for the replicas: {e}"))?;
    if !args.add.is_empty() || !args.remove.is_empty() {
        let change = MembersChange {
            add: ClusterConfig::parse_peers(&args.add.join(","))?,
            remove: args.remove,
        };
        let leader = members
            .leader
            .and_then(|id| members.voters.get(&id))
            .context("no leader now: try again once the replicas have elected one")?
            .clone();
        members = network
            .change_members(&leader, &change)
            .await
            .map_err(|e| anyhow::anyhow!("changing the replicas at {leader}: {e}"))?;
    }
    for (id, addr) in &members.voters {
        let role = if members.leader == Some(*id) {
            "leader"
        } else {
            "voter"
        };
        println!("{id}\t{addr}\t{role}");
    }
    for (id, addr) in &members.learners {
        println!("{id}\t{addr}\tlearner");
    }
    Ok(())
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
