//! `ember query`: SQL against a running Ember over Flight SQL, printed as a
//! table, so profiles can be read from a terminal.

use anyhow::Context;
use arrow::record_batch::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::output::{print_batches, OutputFormat};

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The statement, e.g. "SELECT * FROM flamegraph(...)".
    sql: String,
    /// Flight SQL address of the server.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "EMBER_FLIGHT_URL"
    )]
    flight_url: String,
    /// Tenant (sent as `x-scope-orgid`).
    #[arg(long, default_value = "anonymous", env = "EMBER_TENANT")]
    tenant: String,
    /// How to print the result.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
}

pub async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.flight_url, &args.tenant).await?;
    let batches = run_sql(&mut client, &args.sql).await?;
    print_batches(&batches, args.format)
}

/// A Flight SQL client for one tenant.
pub async fn connect(url: &str, tenant: &str) -> anyhow::Result<FlightSqlServiceClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())
        .context("invalid Flight SQL URL")?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_header("x-scope-orgid", tenant);
    Ok(client)
}

/// Every batch of a statement's result.
pub async fn run_sql(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> anyhow::Result<Vec<RecordBatch>> {
    let info = client
        .execute(sql.to_string(), None)
        .await
        .context("planning the statement")?;
    let mut batches: Vec<RecordBatch> = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.context("endpoint without a ticket")?;
        let stream = client.do_get(ticket).await.context("fetching results")?;
        batches.extend(
            stream
                .try_collect::<Vec<_>>()
                .await
                .context("reading results")?,
        );
    }
    Ok(batches)
}
