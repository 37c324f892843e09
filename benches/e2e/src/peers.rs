//! The peers, on the same data in the same run: DataFusion (this build's
//! version) in process, DuckDB and chDB through `benches/e2e/peers.py`.
//! Each runs the bare GROUP BY that a flame graph needs, and the GROUP BY
//! followed by building the tree.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};

use super::export::ExportPaths;
use super::queries::{median, FlameQuery};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRun {
    pub engine: String,
    pub version: String,
    pub shape: String,
    pub query: String,
    pub kind: String,
    pub first_ms: f64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub rows: u64,
    pub total: i64,
    #[serde(default)]
    pub nodes: Option<u64>,
}

fn where_clause(q: &FlameQuery) -> String {
    let mut w = format!(
        "profile_type = '{}' AND time >= arrow_cast({}, 'Timestamp(Nanosecond, Some(\"UTC\"))') AND time <= arrow_cast({}, 'Timestamp(Nanosecond, Some(\"UTC\"))')",
        q.profile_type, q.start_ns, q.end_ns
    );
    if let Some(s) = &q.service_name {
        w.push_str(&format!(" AND service_name = '{s}'"));
    }
    w
}

/// DataFusion SQL over the normalised export: `sum(value) GROUP BY stack_id`.
pub async fn datafusion_group_by(
    paths: &ExportPaths,
    queries: &[FlameQuery],
    repeats: usize,
) -> anyhow::Result<Vec<PeerRun>> {
    let mut out = Vec::new();
    for q in queries {
        let ctx = SessionContext::new();
        let dir = paths.normalised_dir.display().to_string();
        let table_path = match &q.service_name {
            Some(s) => format!("{dir}/{s}.parquet"),
            None => format!("{dir}/"),
        };
        ctx.register_parquet("samples", &table_path, ParquetReadOptions::default())
            .await
            .with_context(|| format!("registering {table_path}"))?;
        let sql = format!(
            "SELECT stack_id, sum(value) AS value FROM samples WHERE {} GROUP BY stack_id",
            where_clause(q)
        );
        let mut times = Vec::new();
        let (mut rows, mut total) = (0u64, 0i64);
        for _ in 0..repeats.max(1) + 1 {
            let t = Instant::now();
            let batches = ctx.sql(&sql).await?.collect().await?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            total = batches
                .iter()
                .filter_map(|b| {
                    b.column(1)
                        .as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .map(|a| a.iter().flatten().sum::<i64>())
                })
                .sum();
        }
        let first = times.remove(0);
        out.push(PeerRun {
            engine: "datafusion".into(),
            version: datafusion::DATAFUSION_VERSION.into(),
            shape: "normalised".into(),
            query: q.name.clone(),
            kind: "group_by".into(),
            first_ms: first,
            median_ms: median(times.clone()),
            min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
            rows,
            total,
            nodes: None,
        });
    }
    Ok(out)
}

#[derive(Serialize)]
struct Spec<'a> {
    repeats: usize,
    queries: Vec<SpecQuery<'a>>,
}

#[derive(Serialize)]
struct SpecQuery<'a> {
    #[serde(flatten)]
    query: &'a FlameQuery,
    denormalised: String,
    normalised: String,
    stacks: String,
}

#[derive(Deserialize)]
struct PeersOutput {
    peers: Vec<PeerRun>,
}

/// DuckDB and chDB, run by `peers.py` with the given Python.
pub fn python_peers(
    python: &Path,
    script: &Path,
    dir: &Path,
    paths: &ExportPaths,
    queries: &[FlameQuery],
    repeats: usize,
) -> anyhow::Result<Vec<PeerRun>> {
    let spec = Spec {
        repeats,
        queries: queries
            .iter()
            .map(|q| SpecQuery {
                query: q,
                denormalised: paths.denormalised(q.service_name.as_deref()),
                normalised: paths.normalised(q.service_name.as_deref()),
                stacks: paths.stacks.display().to_string(),
            })
            .collect(),
    };
    let spec_path = dir.join("queries.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
    let output = Command::new(python)
        .arg(script)
        .arg("--spec")
        .arg(&spec_path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed with {}",
        script.display(),
        output.status
    );
    let parsed: PeersOutput =
        serde_json::from_slice(&output.stdout).context("reading peers.py output")?;
    Ok(parsed.peers)
}
