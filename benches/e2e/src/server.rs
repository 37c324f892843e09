//! The server under test: this same binary started as `ember serve` on free
//! ports, with its CPU time, memory and metrics read from outside.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

pub struct Server {
    child: Child,
    pub http: String,
    pub flight: String,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

/// The `ember` binary every server of this run starts, chosen once.
static EMBER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

pub fn use_binary(path: std::path::PathBuf) {
    let _ = EMBER.set(path);
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    pub async fn start(data_dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let (http_port, flight_port) = (free_port()?, free_port()?);
        let exe = EMBER.get().context("the ember binary is not chosen yet")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))?;
        // Unless asked, the figures are of level-0 blocks, as ingested:
        // compaction on two cores would race the timed phases.
        let mut extra = extra.to_vec();
        if !extra.iter().any(|a| a == "--compaction-workers") {
            extra.extend(["--compaction-workers".to_string(), "0".to_string()]);
        }
        let child = Command::new(exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--flight-addr")
            .arg(format!("127.0.0.1:{flight_port}"))
            // The workload replays the last day of simulated time.
            .arg("--reject-older-than-seconds")
            .arg("0")
            .args(&extra)
            .env("EMBER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ember serve")?;
        let server = Self {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            flight: format!("http://127.0.0.1:{flight_port}"),
            data_dir: data_dir.to_path_buf(),
            extra,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = ember::http_client::Client::new();
        while Instant::now() < deadline {
            if let Ok((200, _)) = client.get(&format!("{}/ready", self.http)).await {
                if tokio::net::TcpStream::connect(self.flight.trim_start_matches("http://"))
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("ember serve did not become ready within 60 s")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU seconds the server has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid()))
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("{field} missing"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("malformed status")?
            .parse()?)
    }

    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        Ok(self.status_kib("VmRSS:")? * 1024)
    }

    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        Ok(self.status_kib("VmHWM:")? * 1024)
    }

    /// Resets the peak RSS to the current RSS, so that the next peak is one
    /// query's. Returns false where the kernel does not allow it.
    pub fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }

    /// The server's Prometheus metrics, summed over label sets.
    pub async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let (status, body) = ember::http_client::Client::new()
            .get(&format!("{}/metrics", self.http))
            .await?;
        anyhow::ensure!(status == 200, "GET /metrics: {status}");
        Ok(parse_metrics(&String::from_utf8_lossy(&body)))
    }

    pub async fn is_healthy(&self) -> bool {
        matches!(
            ember::http_client::Client::new()
                .get(&format!("{}/healthz", self.http))
                .await,
            Ok((200, _))
        )
    }

    /// Arguments the server takes from its next restart on.
    pub fn add_args(&mut self, args: &[String]) {
        self.extra.extend(args.iter().cloned());
    }

    /// Stops the server and starts it again on the same data: every cache
    /// is empty again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.terminate()?;
        *self = Server::start(&self.data_dir.clone(), &self.extra.clone()).await?;
        Ok(())
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        // SIGTERM for a clean shutdown, then wait.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name{labels} value` lines, summed by name and by name with labels.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        *out.entry(key.to_string()).or_insert(0.0) += v;
        if let Some((name, _)) = key.split_once('{') {
            *out.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// Total bytes of the files under a directory.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// User plus system CPU seconds of the process whose `/proc/<pid>/stat`
/// (or `/proc/self/stat`) is at `stat_path`.
pub fn cpu_seconds_of(stat_path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(stat_path)?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit(')').next().context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}
