//! Ember's server, CLI and the clients they share. The `ember` binary
//! (`main.rs`) is the command line over this library; the benchmark
//! harness (`benches/e2e`) starts that binary and reuses the clients.

pub mod allocator;
pub mod cli;
mod cluster;
mod connections;
mod http;
pub mod http_client;
pub mod metastore_cli;

pub mod output;
pub mod query;
pub mod serve;
mod tls;
