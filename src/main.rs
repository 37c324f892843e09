//! `ember`: the one binary of every role.

use clap::{Parser, Subcommand};
use ember::{allocator, cli, metastore_cli, query, serve};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Ember: a continuous-profiling database"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process on the embedded default (local
    /// directory as object store, local metastore file).
    Serve(Box<serve::ServeArgs>),
    /// Run SQL against a running Ember over Flight SQL and print the result.
    Query(query::QueryArgs),
    /// Push profile files (pprof, folded) or directories of them.
    Ingest(cli::IngestArgs),
    /// Print a flame graph's top nodes, or write it as an SVG.
    Flamegraph(cli::FlameGraphArgs),
    /// Offline metastore tools: `ember metastore rebuild`.
    Metastore(metastore_cli::MetastoreArgs),
}

fn main() -> anyhow::Result<()> {
    allocator::no_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                // openraft narrates every election at info.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::serve(*args)),
        Command::Query(args) => runtime.block_on(query::query(args)),
        Command::Ingest(args) => runtime.block_on(cli::ingest(args)),
        Command::Flamegraph(args) => runtime.block_on(cli::flamegraph(args)),
        Command::Metastore(args) => runtime.block_on(metastore_cli::metastore(args)),
    }
}
