//! The legacy `POST /ingest` API of older agents:
//! `?name=app.cpu{k=v}&from=&until=&format=pprof|folded|lines&sampleRate=&spyName=&units=&aggregationType=`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use ember_engine::profile::{normalise_labels, Labels, Profile, Stacks, METRIC_NAME, SERVICE_NAME};

use super::jfr::jfr_profiles;
use super::pprof::{maybe_gunzip, FlatProfile};
use super::{check_times, WireFormat};
use crate::limits::{Limits, ProfileLimits, TRUNCATED_FRAME};
use crate::normalise::{normalise, validate_labels, Destination};
use crate::IngestError;

/// The `profile` field of a multipart `/ingest` body, as older agents send
/// pprof (a `profile` part, and optionally `prev_profile` and
/// `sample_type_config`, which Ember does not need).
pub async fn multipart_profile(content_type: &str, body: Bytes) -> Result<Bytes, IngestError> {
    multipart_fields(content_type, body, &["profile"])
        .await?
        .remove("profile")
        .ok_or_else(|| IngestError::Invalid("multipart body has no \"profile\" field".into()))
}

/// The named fields of a multipart body; other fields are skipped.
pub async fn multipart_fields(
    content_type: &str,
    body: Bytes,
    wanted: &[&str],
) -> Result<HashMap<String, Bytes>, IngestError> {
    let bad = |reason: String| IngestError::Decode {
        what: "multipart body",
        reason,
    };
    let boundary = multer::parse_boundary(content_type).map_err(|e| bad(e.to_string()))?;
    let limit = body.len() as u64;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(limit)
            .per_field(limit),
    );
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut out = HashMap::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| bad(e.to_string()))?
    {
        let Some(name) = field
            .name()
            .filter(|n| wanted.contains(n))
            .map(str::to_string)
        else {
            continue;
        };
        out.insert(name, field.bytes().await.map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pprof,
    /// `a;b;c 10` per line.
    Folded,
    /// One stack per line, `a;b;c`, each worth 1.
    Lines,
    /// A Java Flight Recorder recording (`super::jfr`).
    Jfr,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Self, IngestError> {
        match s.unwrap_or("folded") {
            "pprof" => Ok(Format::Pprof),
            "folded" | "" => Ok(Format::Folded),
            "lines" => Ok(Format::Lines),
            "jfr" => Ok(Format::Jfr),
            other => Err(IngestError::Unsupported(format!(
                "format {other:?}: use pprof, jfr, folded or lines"
            ))),
        }
    }
}

/// What the query string of `/ingest` says.
#[derive(Debug, Clone)]
pub struct IngestParams {
    /// The application name as given, before any `{tags}`.
    pub app: String,
    pub service: String,
    /// The part after the last '.' of the app name: `cpu`, `alloc_objects`...
    pub kind: String,
    pub tags: Labels,
    pub from_nanos: Option<i64>,
    pub until_nanos: Option<i64>,
    pub sample_rate: Option<u32>,
    pub units: Option<String>,
    pub spy_name: Option<String>,
}

impl IngestParams {
    pub fn from_query(q: &HashMap<String, String>) -> Result<Self, IngestError> {
        let name = q
            .get("name")
            .ok_or_else(|| IngestError::Invalid("missing query parameter name".into()))?;
        let (app, tags) = parse_app_name(name)?;
        let (service, kind) = match app.rsplit_once('.') {
            Some((s, k)) if !s.is_empty() && !k.is_empty() => (s.to_string(), k.to_string()),
            _ => (app.to_string(), "cpu".to_string()),
        };
        let time = |key: &str| -> Result<Option<i64>, IngestError> {
            q.get(key)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse::<i64>().map(epoch_to_nanos).map_err(|_| {
                        IngestError::Invalid(format!("{key}={v:?} is not a unix time"))
                    })
                })
                .transpose()
        };
        let sample_rate = q
            .get("sampleRate")
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<u32>().ok().filter(|r| *r > 0).ok_or_else(|| {
                    IngestError::Invalid(format!("sampleRate={v:?} is not a positive integer"))
                })
            })
            .transpose()?;
        Ok(Self {
            app: app.to_string(),
            service,
            kind,
            tags,
            from_nanos: time("from")?,
            until_nanos: time("until")?,
            sample_rate,
            units: q.get("units").cloned().filter(|u| !u.is_empty()),
            spy_name: q.get("spyName").cloned().filter(|u| !u.is_empty()),
        })
    }

    /// Series labels; `__name__` only where the kind says it (pprof
    /// bodies otherwise name themselves by their sample types).
    pub fn destination(
        &self,
        tenant: &str,
        received_at_nanos: i64,
        with_name: bool,
        limits: &ProfileLimits,
    ) -> Result<Destination, IngestError> {
        let mut labels = self.tags.clone();
        labels.push((SERVICE_NAME.into(), self.service.clone()));
        if with_name {
            labels.push((METRIC_NAME.into(), self.metric_name().into()));
        }
        Ok(Destination {
            tenant: tenant.to_string(),
            labels: validate_labels(labels)?,
            received_at_nanos,
            limits: *limits,
        })
    }

    /// Series labels of one profile of a JFR recording, as Pyroscope sets
    /// them: the whole application name is the service (or `app_name` when
    /// the tags name a service), the agent, the profiler's event and the
    /// profile's `__name__`.
    pub fn jfr_destination(
        &self,
        tenant: &str,
        received_at_nanos: i64,
        metric: &str,
        event: &str,
        limits: &ProfileLimits,
    ) -> Result<Destination, IngestError> {
        let mut labels: Labels = self
            .tags
            .iter()
            .filter(|(k, _)| !k.starts_with("__") || k == "__session_id__")
            .cloned()
            .collect();
        let app_label = if labels.iter().any(|(k, _)| k == SERVICE_NAME) {
            "app_name"
        } else {
            SERVICE_NAME
        };
        labels.retain(|(k, _)| k != app_label);
        labels.push((app_label.into(), self.app.clone()));
        let spy = self.spy_name.as_deref().unwrap_or("unknown");
        labels.push(("pyroscope_spy".into(), spy.into()));
        if !event.is_empty() {
            labels.push(("jfr_event".into(), event.into()));
        }
        labels.push((METRIC_NAME.into(), metric.into()));
        Ok(Destination {
            tenant: tenant.to_string(),
            labels: validate_labels(labels)?,
            received_at_nanos,
            limits: *limits,
        })
    }

    fn metric_name(&self) -> &str {
        match self.kind.as_str() {
            "cpu" | "itimer" | "wall" => "process_cpu",
            k if k.starts_with("alloc_") || k.starts_with("inuse_") => "memory",
            k => k,
        }
    }

    /// Profile type of a folded or lines body.
    pub fn folded_profile_type(&self) -> String {
        let name = self.metric_name();
        match self.kind.as_str() {
            "cpu" | "itimer" => format!("{name}:samples:count:cpu:nanoseconds"),
            "wall" => format!("{name}:samples:count:wall:nanoseconds"),
            k if k.ends_with("_space") => format!("{name}:{k}:bytes:space:bytes"),
            k if k.ends_with("_objects") => format!("{name}:{k}:count:space:bytes"),
            k => {
                let unit = match self.units.as_deref() {
                    Some("bytes") => "bytes",
                    Some("objects") => "count",
                    Some("lock_nanoseconds") => "nanoseconds",
                    _ => "count",
                };
                format!("{name}:{k}:{unit}::")
            }
        }
    }
}

/// Accepts seconds, milliseconds, microseconds or nanoseconds, told apart by size.
fn epoch_to_nanos(v: i64) -> i64 {
    match v.unsigned_abs() {
        0..=99_999_999_999 => v.saturating_mul(1_000_000_000),
        100_000_000_000..=99_999_999_999_999 => v.saturating_mul(1_000_000),
        100_000_000_000_000..=99_999_999_999_999_999 => v.saturating_mul(1_000),
        _ => v,
    }
}

/// `app.cpu{env=prod,region=eu}` -> (`app.cpu`, labels).
fn parse_app_name(name: &str) -> Result<(&str, Labels), IngestError> {
    let Some(open) = name.find('{') else {
        return Ok((name.trim(), Labels::new()));
    };
    let app = name[..open].trim();
    let rest = name[open + 1..]
        .strip_suffix('}')
        .ok_or_else(|| IngestError::Invalid(format!("name {name:?} lacks a closing '}}'")))?;
    let mut labels = Labels::new();
    for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            IngestError::Invalid(format!("tag {pair:?} in name is not key=value"))
        })?;
        labels.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
    }
    if app.is_empty() {
        return Err(IngestError::Invalid("empty application name".into()));
    }
    Ok((app, normalise_labels(labels)))
}

/// Parses a folded (`a;b;c 10`) or lines (`a;b;c`) body into one profile.
pub fn parse_folded(
    body: &[u8],
    format: Format,
    params: &IngestParams,
    dest: &Destination,
) -> Result<Option<Profile>, IngestError> {
    let text = std::str::from_utf8(body).map_err(|e| IngestError::Decode {
        what: "folded profile",
        reason: e.to_string(),
    })?;
    let limits = &dest.limits;
    let mut names: Vec<String> = vec![TRUNCATED_FRAME.to_string()];
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut stacks: HashMap<Vec<u32>, i64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (stack, value) = match format {
            Format::Lines => (line, 1),
            _ => {
                let (stack, value) = line.rsplit_once(' ').ok_or_else(|| {
                    IngestError::Invalid(format!("line {}: expected \"frame;frame value\"", n + 1))
                })?;
                let value: i64 = value.trim().parse().map_err(|_| {
                    IngestError::Invalid(format!(
                        "line {}: value {value:?} is not an integer",
                        n + 1
                    ))
                })?;
                (stack, value)
            }
        };
        if value == 0 {
            continue;
        }
        let mut ids = Vec::new();
        let depth = stack.split(';').filter(|f| !f.is_empty()).count();
        let truncate = depth > limits.kept_depth() + 1;
        for frame in stack.split(';').filter(|f| !f.is_empty()) {
            if truncate && ids.len() == limits.kept_depth() {
                // Index 0 is the truncation frame.
                ids.push(0);
                break;
            }
            let id = *index.entry(frame).or_insert_with(|| {
                names.push(limits.symbol(frame.as_bytes()).into_owned());
                (names.len() - 1) as u32
            });
            ids.push(id);
        }
        if ids.is_empty() {
            continue;
        }
        if !stacks.contains_key(&ids) {
            limits.check_samples(stacks.len() + 1)?;
        }
        let slot = stacks.entry(ids).or_insert(0);
        *slot = slot.saturating_add(value);
    }
    let mut stacks: Vec<(Vec<u32>, i64)> = stacks.into_iter().filter(|(_, v)| *v != 0).collect();
    if stacks.is_empty() {
        return Ok(None);
    }
    stacks.sort_unstable();
    let (stacks, samples) = Stacks::with_samples(
        stacks
            .into_iter()
            .map(|(stack, value)| (stack, value, None)),
    );
    let from = params.from_nanos.unwrap_or(dest.received_at_nanos);
    let until = params.until_nanos.unwrap_or(from);
    let period = params
        .sample_rate
        .map(|r| 1_000_000_000 / i64::from(r))
        .unwrap_or(0);
    Ok(Some(Profile {
        tenant: dest.tenant.clone(),
        labels: dest.labels.clone(),
        profile_type: params.folded_profile_type(),
        time_nanos: from,
        duration_nanos: until.saturating_sub(from).max(0),
        period,
        functions: Arc::new(names.into_iter().collect()),
        stacks,
        samples,
    }))
}

/// A legacy `/ingest` body (already un-multiparted) in the format its
/// query string names.
pub struct IngestBody {
    pub params: IngestParams,
    pub format: Format,
    pub body: Bytes,
}

impl WireFormat for IngestBody {
    fn received_bytes(&self) -> usize {
        self.body.len()
    }

    fn profiles(
        self,
        limits_all: &Limits,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let Self {
            params,
            format,
            body,
        } = self;
        let limits = limits_all.for_tenant(tenant);
        let body = maybe_gunzip(&body, limits_all.max_decompressed_bytes, "request body")?;
        let profiles = match format {
            Format::Pprof => {
                let dest = params.destination(tenant, now_nanos, false, &limits)?;
                let raw = maybe_gunzip(&body, limits.max_profile_size_bytes, "pprof profile")?;
                let profile = FlatProfile::decode(&raw)?;
                let mut profiles = normalise(&profile, &dest)?;
                if let Some(from) = params.from_nanos.filter(|_| profile.time_nanos == 0) {
                    profiles.iter_mut().for_each(|p| p.time_nanos = from);
                }
                profiles
            }
            Format::Jfr => jfr_profiles(limits_all, &params, &body, None, tenant, now_nanos)?,
            Format::Folded | Format::Lines => {
                let dest = params.destination(tenant, now_nanos, true, &limits)?;
                parse_folded(&body, format, &params, &dest)?
                    .into_iter()
                    .collect()
            }
        };
        check_times(&profiles, &limits, now_nanos)?;
        Ok(profiles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_name_tags_and_times() {
        let p = IngestParams::from_query(&query(&[
            ("name", "shop.api.cpu{env=prod, region=eu}"),
            ("from", "1700000000"),
            ("until", "1700000010000"),
        ]))
        .unwrap();
        assert_eq!(p.service, "shop.api");
        assert_eq!(p.kind, "cpu");
        assert_eq!(
            p.tags,
            vec![
                ("env".to_string(), "prod".to_string()),
                ("region".to_string(), "eu".to_string())
            ]
        );
        assert_eq!(p.from_nanos, Some(1_700_000_000_000_000_000));
        assert_eq!(p.until_nanos, Some(1_700_000_010_000_000_000));
        assert_eq!(
            p.folded_profile_type(),
            "process_cpu:samples:count:cpu:nanoseconds"
        );
        assert!(IngestParams::from_query(&query(&[("name", "a{x")])).is_err());
        assert!(IngestParams::from_query(&query(&[])).is_err());
        assert!(IngestParams::from_query(&query(&[("name", "a"), ("from", "x")])).is_err());
    }

    #[test]
    fn folded_sums_and_checks_lines() {
        let params = IngestParams::from_query(&query(&[("name", "app.cpu")])).unwrap();
        let dest = params
            .destination("t", 5, true, &ProfileLimits::default())
            .unwrap();
        let p = parse_folded(
            b"main;a 2\nmain;b 3\nmain;a 4\n\n",
            Format::Folded,
            &params,
            &dest,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.total(), 9);
        assert_eq!(p.samples.len(), 2);
        assert_eq!(p.time_nanos, 5);
        assert!(parse_folded(b"main;a x\n", Format::Folded, &params, &dest).is_err());
        assert!(parse_folded(b"nospace\n", Format::Folded, &params, &dest).is_err());
        let p = parse_folded(b"a;b\na;b\n", Format::Lines, &params, &dest)
            .unwrap()
            .unwrap();
        assert_eq!(p.samples.len(), 1);
        // 0 is the truncation frame.
        assert_eq!(p.stack(&p.samples[0]), &[1, 2]);
        assert_eq!((p.samples[0].value, p.samples[0].span_id), (2, None));
    }
}
