//! The report: `report.json` (every figure), `report.md` (the tables that
//! BENCHMARKS.md quotes) and PNG charts of time against samples.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::peers::PeerRun;
use super::queries::QueryRun;
use super::Report;

pub fn write(out: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let charts = out.join("charts");
    std::fs::create_dir_all(&charts)?;
    let mut md = markdown(report);
    if let Some(p) = &report.production {
        md.push_str("\n## Production shape\n\n");
        md.push_str(&super::production::markdown(p));
    }
    if !report.compaction_jobs.is_empty() {
        md.push_str("\n## Compaction job memory\n\n");
        md.push_str(&super::job_memory::markdown(&report.compaction_jobs));
    }
    match flame_chart(&charts.join("flamegraph_scaling.png"), report) {
        Ok(()) => {
            md.push_str("\n![flame graph time against samples](charts/flamegraph_scaling.png)\n")
        }
        Err(e) => tracing::warn!("no chart: {e:#}"),
    }
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn peer<'a>(
    report: &'a Report,
    engine: &str,
    shape: &str,
    kind: &str,
    query: &str,
) -> Option<&'a PeerRun> {
    report
        .peers
        .iter()
        .find(|p| p.engine == engine && p.shape == shape && p.kind == kind && p.query == query)
}

/// The label calls alone, as `--labels-only` writes them.
pub fn label_table(runs: &[QueryRun]) -> String {
    let mut s = String::new();
    query_table(&mut s, runs);
    s
}

fn query_table(s: &mut String, queries: &[QueryRun]) {
    let _ = writeln!(
        s,
        "| query | samples | cold ms | warm ms | rows | GETs cold / warm | MB read cold | peak memory MB |\n|---|---|---|---|---|---|---|---|"
    );
    for q in queries {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0} / {:.0} | {:.1} | {} |",
            q.name,
            q.samples,
            ms(q.cold_ms),
            ms(q.warm_median_ms),
            q.rows,
            q.cold_gets,
            q.warm_gets,
            q.cold_read_bytes / 1e6,
            q.peak_memory_bytes
                .map(|b| format!("{:.1}", b as f64 / 1e6))
                .unwrap_or_else(|| "n/a".into())
        );
    }
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let w = &r.workload;
    let i = &r.ingest;
    let _ = writeln!(s, "Machine: {}\n", r.machine);
    let _ = writeln!(
        s,
        "Workload: {} series, {} profiles in {} requests over {:.1} h of simulated time; {} stored samples; {:.1} MB of requests ({:.1} MB of gzipped pprof).\n",
        w.series,
        w.profiles,
        w.requests,
        w.simulated_hours,
        w.stored_samples,
        w.request_bytes as f64 / 1e6,
        w.pprof_gzip_bytes as f64 / 1e6
    );
    let _ = writeln!(s, "## Ingest\n");
    let _ = writeln!(s, "| figure | value |\n|---|---|");
    let rows = [
        ("clients (full load)", format!("{}", i.clients)),
        ("wall time", format!("{:.1} s", i.seconds)),
        ("profiles/s", format!("{:.0}", i.profiles_per_second)),
        (
            "samples/s (wall, whole machine)",
            format!("{:.0}", i.samples_per_second),
        ),
        (
            "samples per server CPU-second",
            format!("{:.0}", i.samples_per_cpu_second),
        ),
        ("request MB/s", format!("{:.1}", i.mb_per_second)),
        (
            "ack p50 / p99 under full load",
            format!(
                "{} / {} ms",
                ms(i.under_load.p50_ms),
                ms(i.under_load.p99_ms)
            ),
        ),
        (
            "refused with 429 and retried (attempts) under full load",
            format!("{}", i.refusals),
        ),
        (
            "first attempt to ack, p50 / p99 under full load",
            format!(
                "{} / {} ms",
                ms(i.under_load_with_retries.p50_ms),
                ms(i.under_load_with_retries.p99_ms)
            ),
        ),
        (
            "ack p50 / p99 lone client, idle server",
            format!("{} / {} ms", ms(i.lone.p50_ms), ms(i.lone.p99_ms)),
        ),
        (
            "segment flushes / object PUTs",
            format!("{:.0} / {:.0}", i.flushes, i.puts),
        ),
        (
            "PUTs per second per shard",
            format!("{:.2}", i.puts_per_second_per_shard),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let st = &r.storage;
    let _ = writeln!(s, "\n## Storage\n");
    let _ = writeln!(
        s,
        "{:.1} MB in the object store: {:.2} bytes per sample, against {:.2} bytes per sample of gzipped pprof input ({:.2}x). Peers' Parquet export: normalised {:.1} MB, denormalised {:.1} MB.\n",
        st.object_bytes as f64 / 1e6,
        st.bytes_per_sample,
        st.pprof_gzip_bytes_per_sample,
        st.ratio_to_gzip_pprof,
        st.export_normalised_bytes as f64 / 1e6,
        st.export_denormalised_bytes as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "## Queries (Ember over Flight SQL, and Pyroscope's query API over Connect)\n"
    );
    query_table(&mut s, &r.queries);
    if !r.label_queries.is_empty() {
        let _ = writeln!(
            s,
            "\n## Label calls over many series (Pyroscope's query API)\n"
        );
        query_table(&mut s, &r.label_queries);
    }
    let _ = writeln!(
        s,
        "\n## Peers on the same data (median ms; ratio = peer / Ember warm)\n"
    );
    let versions: Vec<String> = {
        let mut v: Vec<String> = r
            .peers
            .iter()
            .map(|p| format!("{} {}", p.engine, p.version))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let _ = writeln!(s, "Versions: {}.\n", versions.join(", "));
    let _ = writeln!(
        s,
        "| query | Ember (tree included) | DuckDB GROUP BY (normalised) | DuckDB GROUP BY (denormalised) | DuckDB + tree | chDB GROUP BY (normalised) | chDB GROUP BY (denormalised) | chDB + tree | DataFusion GROUP BY |\n|---|---|---|---|---|---|---|---|---|"
    );
    for q in r.queries.iter().filter(|q| q.root_total.is_some()) {
        // A query API call is compared on the range of its flame query.
        let range = q.name.split(": ").next().unwrap_or(&q.name);
        if peer(r, "duckdb", "normalised", "group_by", range).is_none() {
            continue;
        }
        let ember = q.warm_median_ms;
        let cell = |p: Option<&PeerRun>| match p {
            Some(p) => format!("{} ({:.2}x)", ms(p.median_ms), p.median_ms / ember),
            None => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            q.name,
            ms(ember),
            cell(peer(r, "duckdb", "normalised", "group_by", range)),
            cell(peer(r, "duckdb", "denormalised", "group_by", range)),
            cell(peer(r, "duckdb", "normalised", "tree", range)),
            cell(peer(r, "chdb", "normalised", "group_by", range)),
            cell(peer(r, "chdb", "denormalised", "group_by", range)),
            cell(peer(r, "chdb", "normalised", "tree", range)),
            cell(peer(r, "datafusion", "normalised", "group_by", range)),
        );
    }
    let m = &r.mixed;
    let _ = writeln!(s, "\n## Mixed workload ({} steady agents)\n", m.clients);
    let _ = writeln!(
        s,
        "Ingest ack p50 / p99: alone {} / {} ms; with a loop of the heaviest flame graph ({} runs) {} / {} ms: p99 {:+.1}%.\n",
        ms(m.alone.p50_ms),
        ms(m.alone.p99_ms),
        m.queries_run,
        ms(m.with_queries.p50_ms),
        ms(m.with_queries.p99_ms),
        m.p99_change_percent
    );
    let l = &r.memory_limit;
    let _ = writeln!(s, "## Memory limit\n");
    let _ = writeln!(
        s,
        "`{}` under a {} MiB query memory limit: {}; server healthy after: {}; a small query after: {}.\n",
        l.query,
        l.limit_bytes >> 20,
        l.error.as_deref().map(|e| format!("failed with `{}`", e.lines().next().unwrap_or(""))).unwrap_or_else(|| "succeeded".into()),
        l.healthy_after,
        l.small_query_after
    );
    let _ = writeln!(s, "## Metastore lookup (one service, one hour)\n");
    let _ = writeln!(
        s,
        "| blocks | datasets found | p50 µs | p99 µs | load s |\n|---|---|---|---|---|"
    );
    for l in &r.metastore {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            l.blocks,
            l.datasets_found,
            l.latency.p50_ms * 1e3,
            l.latency.p99_ms * 1e3,
            l.load_seconds
        );
    }
    let _ = writeln!(s, "\n## Checks\n");
    for c in &r.checks {
        let _ = writeln!(s, "- {c}");
    }
    s
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let bytes = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| {
            anyhow::anyhow!("no DejaVuSans.ttf for chart text (apt install fonts-dejavu-core)")
        })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("unreadable font"))?;
    Ok(())
}

/// Warm time against samples for the all-services flame graphs, Ember and
/// each peer's normalised GROUP BY.
fn flame_chart(path: &Path, r: &Report) -> anyhow::Result<()> {
    register_font()?;
    let scale: Vec<&super::QueryRun> = r
        .queries
        .iter()
        .filter(|q| q.name.starts_with("all services") && q.root_total.is_some())
        .collect();
    anyhow::ensure!(scale.len() >= 2, "fewer than two sizes measured");
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![(
        "Ember flamegraph() (tree included)".into(),
        scale
            .iter()
            .map(|q| (q.samples as f64 / 1e6, q.warm_median_ms))
            .collect(),
    )];
    for (engine, shape, label) in [
        ("duckdb", "normalised", "DuckDB GROUP BY stack_id"),
        ("chdb", "normalised", "chDB GROUP BY stack_id"),
        ("datafusion", "normalised", "DataFusion GROUP BY stack_id"),
        ("duckdb", "denormalised", "DuckDB GROUP BY stack list"),
    ] {
        let points: Vec<(f64, f64)> = scale
            .iter()
            .filter_map(|q| {
                peer(r, engine, shape, "group_by", &q.name)
                    .map(|p| (q.samples as f64 / 1e6, p.median_ms))
            })
            .collect();
        if !points.is_empty() {
            series.push((label.into(), points));
        }
    }
    let max_x = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        * 1.05;
    let ys = || series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let max_y = ys().fold(0.0, f64::max) * 1.3;
    let min_y = ys().fold(f64::INFINITY, f64::min).max(0.1) * 0.7;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Flame graph time against samples (warm, median)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, (min_y..max_y).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("million samples in range")
        .y_desc("ms (log scale)")
        .draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (k, (label, points)) in series.into_iter().enumerate() {
        let color = colors[k % colors.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
