//! The write path without the server around it: the first requests of the
//! ingest workload, decoded and written into blocks in this process as the
//! server's distributor and shards would (same limits, same shards, a flush
//! per shard every `FLUSH_PROFILES` profiles with the shard's node cache
//! kept across flushes). Wall time on this VM moves by a quarter between
//! runs; under `valgrind --tool=callgrind --toggle-collect=*replay_requests*`
//! this gives the instructions a stored sample costs, which do not.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use ember_distributor::formats::push::PushBody;
use ember_distributor::formats::{BodyEncoding, WireFormat};
use ember_distributor::limits::Limits;
use ember_distributor::shard_for;
use ember_engine::block::{write_block, StackNodes};
use ember_engine::profile::Profile;
use tracing::info;

use super::{workload, BenchArgs, SHARDS};

/// About what a shard holds at a flush under full load: 134 k profiles
/// in 379 flushes.
const FLUSH_PROFILES: usize = 350;

/// Writes the first `count` requests of the workload to `path`, each
/// length-prefixed, unless the file is there already.
pub fn dump(args: &BenchArgs, path: &Path, count: usize) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let templates = workload::load_templates(&args.fixtures)?;
    let config = super::workload_config(args);
    let all = workload::series(&config, &templates);
    let mut rng = workload::Rng::new(config.seed);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let (mut written, mut tick) = (0, 0);
    while written < count {
        let profiles = workload::tick_profiles(&config, &templates, &all, tick, &mut rng);
        for r in workload::tick_requests(&config, &all, &profiles) {
            if written < count {
                out.write_all(&(r.body.len() as u64).to_le_bytes())?;
                out.write_all(&r.body)?;
                written += 1;
            }
        }
        tick += 1;
    }
    out.flush()?;
    info!("{written} requests written to {}", path.display());
    Ok(())
}

fn read_requests(path: &Path) -> anyhow::Result<Vec<Bytes>> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut rest = data.as_slice();
    while rest.len() >= 8 {
        let (len, tail) = rest.split_at(8);
        let len = u64::from_le_bytes(len.try_into()?) as usize;
        anyhow::ensure!(tail.len() >= len, "{} is cut short", path.display());
        out.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    Ok(out)
}

/// Replays the requests in `path` and reports stored samples per CPU
/// second of this process.
pub fn run(path: &Path, split: bool) -> anyhow::Result<()> {
    let requests = read_requests(path)?;
    let cpu_seconds = || super::server::cpu_seconds_of("/proc/self/stat");
    let cpu = cpu_seconds()?;
    let wall = Instant::now();
    let (samples, bytes) = replay_requests(&requests, split)?;
    let cpu = cpu_seconds()? - cpu;
    info!(
        "{} requests, {samples} samples in {:.2} s ({:.2} CPU-s): {:.0} samples per CPU-second, \
         {:.2} level-0 block bytes a sample",
        requests.len(),
        wall.elapsed().as_secs_f64(),
        cpu,
        samples as f64 / cpu.max(1e-9),
        bytes as f64 / samples.max(1) as f64
    );
    Ok(())
}

/// Decodes and writes every request; returns the samples stored and the
/// bytes of the blocks they were stored in. With
/// `split`, the writing runs on a second thread as the server's shards
/// do, so profiles are freed on another thread than the one that made
/// them.
#[inline(never)]
fn replay_requests(requests: &[Bytes], split: bool) -> anyhow::Result<(u64, u64)> {
    // The workload replays the last day of simulated time, as the
    // benchmark's server takes it.
    let mut limits = Limits::default();
    limits.defaults.reject_older_than_seconds = 0;
    let encoding = BodyEncoding {
        json: false,
        gzip: false,
    };
    let decode = |body: &Bytes| {
        let push = PushBody {
            body: body.clone(),
            encoding,
        };
        push.profiles(&limits, "bench", super::now_nanos())
    };
    let mut shards = Shards::default();
    if !split {
        for body in requests {
            shards.add(decode(body)?)?;
        }
        return shards.finish();
    }
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Profile>>(4);
        let writer = scope.spawn(move || {
            for profiles in rx {
                shards.add(profiles)?;
            }
            shards.finish()
        });
        for body in requests {
            if tx.send(decode(body)?).is_err() {
                break;
            }
        }
        drop(tx);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writing thread panicked"))?
    })
}

/// The shards' open segments and node caches.
struct Shards {
    open: Vec<(Vec<Profile>, StackNodes)>,
    samples: u64,
    bytes: u64,
}

impl Default for Shards {
    fn default() -> Self {
        Shards {
            open: (0..SHARDS).map(|_| Default::default()).collect(),
            samples: 0,
            bytes: 0,
        }
    }
}

impl Shards {
    fn add(&mut self, profiles: Vec<Profile>) -> anyhow::Result<()> {
        for p in profiles {
            self.samples += p.samples.len() as u64;
            let shard = &mut self.open[shard_for(&p.tenant, p.service_name(), SHARDS) as usize];
            shard.0.push(p);
            if shard.0.len() >= FLUSH_PROFILES {
                self.bytes += write_block(&shard.0, 0, &mut shard.1)?.meta.size;
                shard.0.clear();
            }
        }
        Ok(())
    }

    /// Writes what is left open; the samples stored and the blocks' bytes.
    fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        for (profiles, nodes) in &mut self.open {
            if !profiles.is_empty() {
                self.bytes += write_block(profiles, 0, nodes)?.meta.size;
            }
        }
        Ok((self.samples, self.bytes))
    }
}
