//! Ember's server, CLI and the clients they share. The `ember` binary
//! (`main.rs`) is the command line over this library; the benchmark
//! harness (`benches/e2e`) starts that binary and reuses the clients.

pub mod allocator;
mod api;
pub mod cli;
mod connections;
mod grpc;
mod http;
pub mod http_client;

mod metrics;

pub mod output;
pub mod querier;
pub mod query;
mod render;
pub mod serve;
mod tls;
