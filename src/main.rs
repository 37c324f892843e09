//! `ember`: the one binary of every role.

// glibc's malloc returns each freed large buffer to the kernel and faults it
// in again on the next query; mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod http;
mod local_store;
mod metrics;
mod object_requests;
mod querier;
mod query;
mod serve;
mod tls;

use clap::{Parser, Subcommand};

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
    /// The end-to-end benchmark against a server it starts, and the peers
    /// (DuckDB, chDB, DataFusion) on the same data. See BENCHMARKS.md.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> anyhow::Result<()> {
    no_transparent_huge_pages();
    return_freed_memory_at_once();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::serve(*args)),
        Command::Query(args) => runtime.block_on(query::query(args)),
        Command::Bench(args) => runtime.block_on(bench::bench(*args)),
    }
}

/// mimalloc asks for transparent huge pages, which the kernel zeroes 2 MiB at
/// a time on first touch: the first flame graph after a start paid ~40 ms of
/// page clearing for a few hundred KiB it used.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no
    // memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys does
/// not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc returns freed pages to the kernel 10 ms after the fact by
/// default, and under a compaction job's churn those pages piled up: a job
/// budgeted at 256 MiB peaked at 424 MiB of RSS, 223 MiB with no delay.
fn return_freed_memory_at_once() {
    // SAFETY: sets one of the allocator's options, touching no memory of
    // ours; mimalloc reads the option at every purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}
