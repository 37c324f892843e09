//! `ember query`: SQL against a running Ember over Flight SQL, printed as a
//! table, so profiles can be read from a terminal.

use anyhow::Context;
use arrow::record_batch::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Endpoint;

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
}

pub async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(args.flight_url.clone())
        .context("invalid --flight-url")?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.flight_url))?;
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_header("x-scope-orgid", args.tenant);
    let info = client
        .execute(args.sql, None)
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
    println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    Ok(())
}
