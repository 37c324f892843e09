//! The command line against a running Ember: `ember ingest` pushes profile
//! files, `ember flamegraph` draws one in the terminal or as an SVG, and
//! `ember query` prints SQL results (`crate::query`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use arrow::array::RecordBatch;
use bytes::Bytes;
use ember_sql::flamegraph::for_each_frame_row;
use prost::Message;

use crate::http_client::Client;
use crate::query::{connect, run_sql};

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// Profile files, or directories of them: pprof (`.pb.gz`, `.pprof`,
    /// `.pb`), JFR recordings (`.jfr`, `.jfr.gz`) or folded stacks
    /// (`.folded`, `.txt`: `a;b;c 42` per line).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The service the profiles belong to (its `service_name`).
    #[arg(long)]
    service: String,
    /// More labels, `key=value`, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Ember's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:4040", env = "EMBER_URL")]
    url: String,
    /// Tenant (sent as `X-Scope-OrgID`).
    #[arg(long, default_value = "anonymous", env = "EMBER_TENANT")]
    tenant: String,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give a label as key=value"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FileKind {
    Pprof,
    Jfr,
    Folded,
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if [".pb.gz", ".pprof", ".pb", ".pprof.gz"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        Some(FileKind::Pprof)
    } else if name.ends_with(".jfr") || name.ends_with(".jfr.gz") {
        Some(FileKind::Jfr)
    } else if [".folded", ".txt", ".collapsed"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        Some(FileKind::Folded)
    } else {
        None
    }
}

/// Profile files to push, and the other files the paths named.
#[derive(Default)]
struct Files {
    profiles: Vec<(PathBuf, FileKind)>,
    skipped: Vec<PathBuf>,
}

/// The files to push: each path, or the profile files in each directory
/// (sorted); anything else is reported, not pushed.
fn files_of(paths: &[PathBuf]) -> anyhow::Result<Files> {
    let mut found = Files::default();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let mut candidates = if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            entries
        } else {
            vec![path.clone()]
        };
        for file in candidates.drain(..) {
            match kind_of(&file) {
                Some(kind) => found.profiles.push((file, kind)),
                None => found.skipped.push(file),
            }
        }
    }
    Ok(found)
}

/// `ember ingest`: every file pushed as its own request, with progress on
/// stderr and a summary at the end; exits non-zero if any was refused.
pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let Files {
        profiles: files,
        skipped,
    } = files_of(&args.paths)?;
    for path in &skipped {
        eprintln!(
            "skipped {} (not .pb.gz, .pprof, .pb, .jfr, .jfr.gz, .folded or .txt)",
            path.display()
        );
    }
    anyhow::ensure!(!files.is_empty(), "no profile files to push");
    let client = Client::new();
    let base = args.url.trim_end_matches('/');
    let started = Instant::now();
    let (mut pushed, mut bytes, mut failed) = (0usize, 0u64, Vec::new());
    let progress = Progress::new(files.len());
    for (i, (path, kind)) in files.iter().enumerate() {
        progress.show(i, path);
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let size = data.len() as u64;
        let result = match kind {
            FileKind::Pprof => push_pprof(&client, base, &args, data).await,
            FileKind::Jfr => push_legacy(&client, base, &args, "jfr", data).await,
            FileKind::Folded => push_legacy(&client, base, &args, "folded", data).await,
        };
        match result {
            Ok(()) => {
                pushed += 1;
                bytes += size;
            }
            Err(e) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    progress.done();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "pushed {pushed} of {} files ({:.1} MiB) to {base} as tenant {} in {seconds:.1} s",
        files.len(),
        bytes as f64 / (1 << 20) as f64,
        args.tenant
    );
    for f in &failed {
        eprintln!("refused: {f}");
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} files were refused",
        failed.len(),
        files.len()
    );
    Ok(())
}

async fn push_pprof(
    client: &Client,
    base: &str,
    args: &IngestArgs,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    use ember_distributor::formats::push::{LabelPair, PushRequest, RawProfileSeries, RawSample};
    let mut labels = vec![LabelPair {
        name: "service_name".into(),
        value: args.service.clone(),
    }];
    labels.extend(args.labels.iter().map(|(name, value)| LabelPair {
        name: name.clone(),
        value: value.clone(),
    }));
    let body = PushRequest {
        series: vec![RawProfileSeries {
            labels,
            samples: vec![RawSample {
                raw_profile: data.into(),
                id: String::new(),
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    let url = format!("{base}/push.v1.PusherService/Push");
    let (status, reply) = client
        .post(&url, &args.tenant, "application/proto", Bytes::from(body))
        .await?;
    refused_unless_ok(status, &reply)
}

/// A push to `/ingest` (folded stacks, JFR), labels in the name.
async fn push_legacy(
    client: &Client,
    base: &str,
    args: &IngestArgs,
    format: &str,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    let tags: Vec<String> = args
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let name = format!("{}{{{}}}", args.service, tags.join(","));
    let url = format!("{base}/ingest?format={format}&name={}", url_escape(&name));
    let content_type = match format {
        "folded" => "text/plain",
        _ => "application/octet-stream",
    };
    let (status, reply) = client
        .post(&url, &args.tenant, content_type, Bytes::from(data))
        .await?;
    refused_unless_ok(status, &reply)
}

fn refused_unless_ok(status: u16, reply: &[u8]) -> anyhow::Result<()> {
    if status == 200 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(reply);
    let reason = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    anyhow::bail!("HTTP {status}: {reason}")
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A one-line progress bar on a terminal, a line per file otherwise.
struct Progress {
    total: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, done: usize, path: &Path) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        if self.tty {
            let width = 30;
            let filled = done * width / self.total.max(1);
            eprint!(
                "\r[{}{}] {done}/{} {name:<40.40}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
        } else {
            eprintln!("[{}/{}] {}", done + 1, self.total, path.display());
        }
    }

    fn done(&self) {
        if self.tty {
            eprintln!(
                "\r[{}] {}/{}{:40}",
                "#".repeat(30),
                self.total,
                self.total,
                ""
            );
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct FlameGraphArgs {
    /// The service (`service_name`).
    #[arg(long)]
    service: Option<String>,
    /// A label selector instead of or beside --service, e.g. '{env="prod"}'.
    #[arg(long, default_value = "{}")]
    selector: String,
    /// Profile type ID, e.g. process_cpu:cpu:nanoseconds:cpu:nanoseconds.
    #[arg(long = "type")]
    profile_type: String,
    /// Start: now-1h, -1h, or unix time (s, ms, µs or ns).
    #[arg(long, default_value = "now-1h", allow_hyphen_values = true)]
    from: String,
    /// End, as --from.
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    until: String,
    /// Write an interactive SVG flame graph here instead of printing.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Nodes kept (the rest are summed into `other`).
    #[arg(long, default_value_t = 40)]
    top: usize,
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "EMBER_FLIGHT_URL"
    )]
    flight_url: String,
    #[arg(long, default_value = "anonymous", env = "EMBER_TENANT")]
    tenant: String,
}

/// `-1h` is read as `now-1h`.
fn time_ms(text: &str, now: i64) -> anyhow::Result<i64> {
    let text = if text.starts_with('-') || text.starts_with('+') {
        format!("now{text}")
    } else {
        text.to_string()
    };
    ember_query_frontend::parse_time(&text, now).map_err(|e| anyhow::anyhow!(e))
}

fn selector_with_service(selector: &str, service: Option<&str>) -> anyhow::Result<String> {
    let inner = selector
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .with_context(|| format!("--selector {selector:?}: write it as {{name=\"value\", ...}}"))?
        .trim();
    let mut parts: Vec<String> = Vec::new();
    if let Some(service) = service {
        parts.push(format!("service_name=\"{}\"", service.replace('"', "\\\"")));
    }
    if !inner.is_empty() {
        parts.push(inner.to_string());
    }
    Ok(format!("{{{}}}", parts.join(", ")))
}

/// `ember flamegraph`: the top of a flame graph as an indented tree, or an
/// SVG (inferno) with every node the server kept.
pub async fn flamegraph(args: FlameGraphArgs) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let (from, until) = (time_ms(&args.from, now)?, time_ms(&args.until, now)?);
    let selector = selector_with_service(&args.selector, args.service.as_deref())?;
    let max_nodes = if args.svg.is_some() {
        16384
    } else {
        args.top.max(1)
    };
    let sql = format!(
        "SELECT * FROM flamegraph('{}', '{}', {from}, {until}, {max_nodes})",
        args.profile_type.replace('\'', "''"),
        selector.replace('\'', "''")
    );
    let mut client = connect(&args.flight_url, &args.tenant).await?;
    let batches = run_sql(&mut client, &sql).await?;
    let rows = frame_rows(&batches)?;
    let total = rows.first().map_or(0, |r| r.1);
    if total == 0 {
        eprintln!(
            "no samples of {} match {selector} in that range",
            args.profile_type
        );
        return Ok(());
    }
    match &args.svg {
        Some(path) => write_svg(path, &rows, &args.profile_type),
        None => {
            print_tree(&rows, total);
            Ok(())
        }
    }
}

/// (level, total, self, label) of the flame graph frame, depth first.
fn frame_rows(batches: &[RecordBatch]) -> anyhow::Result<Vec<(usize, i64, i64, String)>> {
    let mut rows = Vec::new();
    for_each_frame_row(batches, |row| {
        rows.push((row.depth, row.total, row.own, row.label.to_string()));
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(rows)
}

fn print_tree(rows: &[(usize, i64, i64, String)], total: i64) {
    for (level, value, own, label) in rows {
        let pct = |v: i64| 100.0 * v as f64 / total as f64;
        println!(
            "{:>6.2}% {:>6.2}%  {}{}",
            pct(*value),
            pct(*own),
            "  ".repeat(*level),
            label
        );
    }
}

/// Folded stacks (`a;b;c self`) of the frame, for inferno.
fn folded(rows: &[(usize, i64, i64, String)]) -> Vec<String> {
    let mut path: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for (level, _, own, label) in rows {
        if *level == 0 {
            continue;
        }
        path.truncate(level - 1);
        path.push(label);
        if *own > 0 {
            out.push(format!("{} {own}", path.join(";")));
        }
    }
    out
}

fn write_svg(
    path: &Path,
    rows: &[(usize, i64, i64, String)],
    profile_type: &str,
) -> anyhow::Result<()> {
    let lines = folded(rows);
    let mut options = inferno::flamegraph::Options::default();
    options.title = profile_type.to_string();
    options.count_name = profile_type
        .split(':')
        .nth(2)
        .unwrap_or("samples")
        .to_string();
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    inferno::flamegraph::from_lines(
        &mut options,
        lines.iter().map(String::as_str),
        std::io::BufWriter::new(file),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {} ({} stacks)", path.display(), lines.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_stacks_are_the_frame_paths_with_self() {
        let rows = vec![
            (0, 10, 0, "total".to_string()),
            (1, 10, 4, "main".to_string()),
            (2, 6, 6, "work".to_string()),
        ];
        assert_eq!(folded(&rows), vec!["main 4", "main;work 6"]);
    }

    #[test]
    fn files_and_selectors_read_as_a_user_writes_them() {
        assert_eq!(kind_of(Path::new("a/cpu.pb.gz")), Some(FileKind::Pprof));
        assert_eq!(kind_of(Path::new("x.folded")), Some(FileKind::Folded));
        assert_eq!(kind_of(Path::new("app.JFR.gz")), Some(FileKind::Jfr));
        assert_eq!(kind_of(Path::new("notes.md")), None);
        assert_eq!(
            selector_with_service("{env=\"prod\"}", Some("api")).unwrap(),
            "{service_name=\"api\", env=\"prod\"}"
        );
        assert_eq!(selector_with_service("{}", None).unwrap(), "{}");
        assert!(selector_with_service("env=prod", None).is_err());
        assert!(parse_label("novalue").is_err());
        assert_eq!(time_ms("-1h", 7_200_000).unwrap(), 3_600_000);
    }
}
