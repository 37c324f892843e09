//! Label calls over many series: a tenant of its own with `--label-series`
//! series (100k by default), one small profile each, then Grafana's label
//! calls through Pyroscope's query API, cold and warm. Their cost is the
//! number of series, so each series holds a single sample.

use anyhow::Context;
use bytes::Bytes;
use ember_api::querier::v1 as q;
use ember_api::types::v1 as t;
use ember_engine::profile::now_nanos;
use prost::Message;

use super::queries::{self, Call, QueryRun};
use super::server::Server;
use super::workload::{gzip, one_sample, push_request, Series, Template};

pub const TENANT: &str = "bench-labels";
const SERVICES: usize = 100;
const SERIES_PER_REQUEST: usize = 1000;

pub async fn run(
    server: &mut Server,
    template: &Template,
    series: usize,
    repeats: usize,
) -> anyhow::Result<(Vec<QueryRun>, Vec<String>)> {
    push(server, template, series).await?;
    let now_ms = now_nanos() / 1_000_000;
    let (start, end) = (now_ms - 3_600_000, now_ms + 60_000);
    let calls = [
        (
            format!("LabelValues pod over {series} series"),
            Call::Connect {
                method: "LabelValues",
                body: encode(&t::LabelValuesRequest {
                    name: "pod".into(),
                    matchers: vec![],
                    start,
                    end,
                }),
                tenant: TENANT,
            },
            series,
        ),
        (
            format!("LabelValues service_name over {series} series"),
            Call::Connect {
                method: "LabelValues",
                body: encode(&t::LabelValuesRequest {
                    name: "service_name".into(),
                    matchers: vec![],
                    start,
                    end,
                }),
                tenant: TENANT,
            },
            SERVICES.min(series),
        ),
        (
            format!("LabelValues pod of one service over {series} series"),
            Call::Connect {
                method: "LabelValues",
                body: encode(&t::LabelValuesRequest {
                    name: "pod".into(),
                    matchers: vec![format!("{{service_name=\"{}\"}}", service(0))],
                    start,
                    end,
                }),
                tenant: TENANT,
            },
            series.div_ceil(SERVICES),
        ),
        (
            format!("LabelNames over {series} series"),
            Call::Connect {
                method: "LabelNames",
                body: encode(&t::LabelNamesRequest {
                    matchers: vec![],
                    start,
                    end,
                }),
                tenant: TENANT,
            },
            0,
        ),
        (
            format!("Series of one service over {series} series"),
            Call::Connect {
                method: "Series",
                body: encode(&q::SeriesRequest {
                    matchers: vec![format!("{{service_name=\"{}\"}}", service(0))],
                    label_names: vec![],
                    start,
                    end,
                }),
                tenant: TENANT,
            },
            // A label set per series and profile type of the template.
            0,
        ),
    ];
    let mut runs = Vec::new();
    let mut checks = Vec::new();
    for (name, call, want_rows) in calls {
        let run = queries::measure(server, &name, &call, 0, repeats).await?;
        if want_rows > 0 {
            anyhow::ensure!(
                run.rows == want_rows,
                "{name}: {} answers, {want_rows} expected",
                run.rows
            );
            checks.push(format!("{name}: {want_rows} answers, one per value stored"));
        }
        runs.push(run);
    }
    Ok((runs, checks))
}

fn service(i: usize) -> String {
    format!("labels-svc-{:03}", i % SERVICES)
}

fn encode(m: &impl Message) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// Every series pushed once, `SERIES_PER_REQUEST` to a request.
async fn push(server: &Server, template: &Template, series: usize) -> anyhow::Result<()> {
    let profile = gzip(&one_sample(template, now_nanos() - 60_000_000_000).encode_to_vec());
    let all: Vec<Series> = (0..series)
        .map(|i| Series {
            labels: vec![
                ("service_name".into(), service(i)),
                ("pod".into(), format!("pod-{i:07}")),
            ],
            template: 0,
        })
        .collect();
    let client = ember::http_client::Client::new();
    let url = format!("{}/push.v1.PusherService/Push", server.http);
    for (n, chunk) in all.chunks(SERIES_PER_REQUEST).enumerate() {
        let pairs: Vec<(&Series, Vec<u8>)> = chunk.iter().map(|s| (s, profile.clone())).collect();
        let body = Bytes::from(push_request(&pairs).encode_to_vec());
        let (status, reply) = client
            .post(&url, TENANT, "application/proto", body)
            .await
            .context("pushing the label series")?;
        anyhow::ensure!(
            status == 200,
            "push of label series: HTTP {status}: {}",
            String::from_utf8_lossy(&reply)
        );
        if (n + 1) % 20 == 0 {
            tracing::info!(
                "label series: {} of {series} pushed",
                (n + 1) * SERIES_PER_REQUEST
            );
        }
    }
    // Acknowledged is flushed: every series is in the index now.
    Ok(())
}
