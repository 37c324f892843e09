//! A realistic workload drawn from the recorded profiles: many services and
//! series, one profile per series every interval, each profile a skewed
//! subset of its recorded profile's samples with varied values, so that the
//! data keeps the repetition and the long tail of production profiles.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use ember_distributor::formats::pprof;
use ember_distributor::formats::push::{LabelPair, PushRequest, RawProfileSeries, RawSample};
use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message;

/// Recorded profiles too small to vary or far larger than an agent's
/// 10-second profile are left out.
const MIN_SAMPLES: usize = 20;
const MAX_FIXTURE_BYTES: u64 = 300 << 10;

/// A recorded profile the workload draws from.
pub struct Template {
    pub name: String,
    profile: pprof::Profile,
}

/// SplitMix64: reproducible without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The recorded pprof profiles usable as templates, by file name.
pub fn load_templates(fixtures: &Path) -> anyhow::Result<Vec<Template>> {
    let dir = fixtures.join("pprof");
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let len = e.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if len > MAX_FIXTURE_BYTES {
            continue;
        }
        let bytes = std::fs::read(e.path())?;
        let Ok(profile) = pprof::decode(&bytes, 256 << 20) else {
            continue;
        };
        if profile.sample.len() < MIN_SAMPLES {
            continue;
        }
        tracing::debug!(
            "template {:?}: {} samples x {} types",
            e.file_name(),
            profile.sample.len(),
            profile.sample_type.len()
        );
        out.push(Template {
            name: e.file_name().to_string_lossy().into_owned(),
            profile: with_explicit_ids(profile),
        });
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no usable pprof fixtures in {}",
        dir.display()
    );
    // Services take templates in turn: CPU profiles (fewest sample types)
    // first, as most fleets profile CPU everywhere and memory in places.
    out.sort_by_key(|t| (t.profile.sample_type.len(), t.name.clone()));
    Ok(out)
}

/// Ids of 0 mean "by position" (.NET); explicit ids survive pruning.
fn with_explicit_ids(mut p: pprof::Profile) -> pprof::Profile {
    for (i, l) in p.location.iter_mut().enumerate() {
        if l.id == 0 {
            l.id = i as u64 + 1;
        }
    }
    for (i, f) in p.function.iter_mut().enumerate() {
        if f.id == 0 {
            f.id = i as u64 + 1;
        }
    }
    p
}

/// Keeps only the locations, functions, mappings and strings the samples
/// use, as a profiler writes a profile of what it saw.
fn pruned(mut p: pprof::Profile) -> pprof::Profile {
    use std::collections::{BTreeSet, HashMap, HashSet};
    let locations: HashSet<u64> = p
        .sample
        .iter()
        .flat_map(|s| s.location_id.iter().copied())
        .collect();
    p.location.retain(|l| locations.contains(&l.id));
    let functions: HashSet<u64> = p
        .location
        .iter()
        .flat_map(|l| l.line.iter().map(|line| line.function_id))
        .collect();
    p.function.retain(|f| functions.contains(&f.id));
    let mappings: HashSet<u64> = p.location.iter().map(|l| l.mapping_id).collect();
    p.mapping.retain(|m| mappings.contains(&m.id));

    let mut used: BTreeSet<i64> = BTreeSet::from([0]);
    for t in p.sample_type.iter().chain(p.period_type.iter()) {
        used.extend([t.r#type, t.unit]);
    }
    for l in p.sample.iter().flat_map(|s| s.label.iter()) {
        used.extend([l.key, l.str, l.num_unit]);
    }
    for m in &p.mapping {
        used.extend([m.filename, m.build_id]);
    }
    for f in &p.function {
        used.extend([f.name, f.system_name, f.filename]);
    }
    used.extend(p.comment.iter().copied());
    used.extend([p.drop_frames, p.keep_frames, p.doc_url]);
    let remap: HashMap<i64, i64> = used
        .iter()
        .enumerate()
        .map(|(new, old)| (*old, new as i64))
        .collect();
    let at = |i: i64| remap.get(&i).copied().unwrap_or(0);
    p.string_table = used
        .iter()
        .map(|&i| p.string_table.get(i as usize).cloned().unwrap_or_default())
        .collect();
    for t in p.sample_type.iter_mut().chain(p.period_type.iter_mut()) {
        t.r#type = at(t.r#type);
        t.unit = at(t.unit);
    }
    for l in p.sample.iter_mut().flat_map(|s| s.label.iter_mut()) {
        l.key = at(l.key);
        l.str = at(l.str);
        l.num_unit = at(l.num_unit);
    }
    for m in p.mapping.iter_mut() {
        m.filename = at(m.filename);
        m.build_id = at(m.build_id);
    }
    for f in p.function.iter_mut() {
        f.name = at(f.name);
        f.system_name = at(f.system_name);
        f.filename = at(f.filename);
    }
    for c in p.comment.iter_mut() {
        *c = at(*c);
    }
    p.drop_frames = at(p.drop_frames);
    p.keep_frames = at(p.keep_frames);
    p.doc_url = at(p.doc_url);
    p
}

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub services: usize,
    pub series_per_service: usize,
    /// Stop after this many samples as Ember stores them.
    pub target_samples: u64,
    pub interval_nanos: i64,
    pub series_per_request: usize,
    pub start_nanos: i64,
    pub seed: u64,
}

/// One series: its labels and the template its profiles are drawn from.
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub template: usize,
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i:02}")
}

/// Every series of the workload: services take templates in turn.
pub fn series(config: &WorkloadConfig, templates: &[Template]) -> Vec<Series> {
    let regions = ["eu-west-1", "us-east-1", "ap-south-1"];
    let mut out = Vec::new();
    for s in 0..config.services {
        for p in 0..config.series_per_service {
            out.push(Series {
                labels: vec![
                    ("service_name".into(), service_name(s)),
                    ("pod".into(), format!("{}-{p}", service_name(s))),
                    ("region".into(), regions[p % regions.len()].into()),
                    ("version".into(), format!("1.{}.0", p % 2)),
                ],
                template: s % templates.len(),
            });
        }
    }
    out
}

/// A skewed subset of the template's samples with varied values: the head
/// of the recorded profile nearly always, its tail now and then.
pub fn vary(
    template: &pprof::Profile,
    time_nanos: i64,
    interval: i64,
    rng: &mut Rng,
) -> pprof::Profile {
    let n = template.sample.len() as f64;
    let mut samples = Vec::new();
    for (i, s) in template.sample.iter().enumerate() {
        let rank = 1.0 - i as f64 / n;
        if rng.unit() < 0.1 + 0.8 * rank * rank * rank {
            let scale = 0.5 + rng.unit();
            let value = s
                .value
                .iter()
                .map(|v| (*v as f64 * scale).round() as i64)
                .collect();
            samples.push(pprof::Sample { value, ..s.clone() });
        }
    }
    pruned(pprof::Profile {
        sample: samples,
        time_nanos,
        duration_nanos: interval,
        ..template.clone()
    })
}

/// The template's first sample alone, at `time_nanos`: the smallest real
/// profile, for runs whose cost is the number of series, not samples.
pub fn one_sample(template: &Template, time_nanos: i64) -> pprof::Profile {
    pruned(pprof::Profile {
        sample: template.profile.sample.iter().take(1).cloned().collect(),
        time_nanos,
        ..template.profile.clone()
    })
}

/// One push request of the workload, encoded as a client sends it.
#[derive(Clone)]
pub struct Request {
    pub body: Bytes,
    /// gzipped pprof bytes inside the request.
    pub pprof_bytes: usize,
    pub profiles: usize,
    /// pprof sample values (samples x sample types).
    pub values: u64,
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

pub fn push_request(series: &[(&Series, Vec<u8>)]) -> PushRequest {
    PushRequest {
        series: series
            .iter()
            .map(|(s, gz)| RawProfileSeries {
                labels: s
                    .labels
                    .iter()
                    .map(|(name, value)| LabelPair {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                samples: vec![RawSample {
                    raw_profile: gz.clone().into(),
                    id: String::new(),
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// The profiles of one tick (one interval of simulated time), varied and
/// gzipped, with the decoded profile for exporting to the peers.
pub fn tick_profiles(
    config: &WorkloadConfig,
    templates: &[Template],
    all: &[Series],
    tick: usize,
    rng: &mut Rng,
) -> Vec<(usize, pprof::Profile, Vec<u8>)> {
    tick_pprofs(config, templates, all, tick, rng)
        .into_iter()
        .map(|(i, p)| {
            let gz = gzip(&p.encode_to_vec());
            (i, p, gz)
        })
        .collect()
}

/// The profiles of one tick by series, as decoded pprof.
pub fn tick_pprofs(
    config: &WorkloadConfig,
    templates: &[Template],
    all: &[Series],
    tick: usize,
    rng: &mut Rng,
) -> Vec<(usize, pprof::Profile)> {
    let time = config.start_nanos + tick as i64 * config.interval_nanos;
    all.iter()
        .enumerate()
        .map(|(i, s)| {
            // Agents do not all report on the same nanosecond.
            let jitter = (rng.unit() * 1e9) as i64;
            let p = vary(
                &templates[s.template].profile,
                time + jitter,
                config.interval_nanos,
                rng,
            );
            (i, p)
        })
        .collect()
}

/// Groups one tick's profiles into push requests of `series_per_request`.
pub fn tick_requests(
    config: &WorkloadConfig,
    all: &[Series],
    profiles: &[(usize, pprof::Profile, Vec<u8>)],
) -> Vec<Request> {
    profiles
        .chunks(config.series_per_request.max(1))
        .map(|chunk| {
            let series: Vec<(&Series, Vec<u8>)> = chunk
                .iter()
                .map(|(i, _, gz)| (&all[*i], gz.clone()))
                .collect();
            Request {
                body: Bytes::from(push_request(&series).encode_to_vec()),
                pprof_bytes: chunk.iter().map(|(_, _, gz)| gz.len()).sum(),
                profiles: chunk.len(),
                values: chunk
                    .iter()
                    .map(|(_, p, _)| (p.sample.len() * p.sample_type.len()) as u64)
                    .sum(),
            }
        })
        .collect()
}
