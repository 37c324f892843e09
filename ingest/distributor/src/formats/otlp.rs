//! OTLP profiles, as the OpenTelemetry eBPF profiler and collectors export
//! them: `opentelemetry.proto.collector.profiles.v1development`, at the
//! opentelemetry-proto version Pyroscope pins (v1.10.0: one dictionary per
//! request, stacks in a table, one sample type per profile).
//!
//! Each OTLP profile becomes a pprof profile and series labels the way
//! Pyroscope converts it, then goes through the same normalisation, limits
//! and validation as a pushed pprof (`crate::normalise`).

use std::collections::HashMap;

use ember_api::google::v1 as pprof;
use ember_engine::profile::Profile;

use bytes::Bytes;
use ember_engine::Labels;

use super::pprof::{gunzip, FlatProfile};
use super::{check_times, BodyEncoding, WireFormat};
use crate::limits::{Limits, ProfileLimits};
use crate::normalise::{normalise, validate_labels, Destination, DEFAULT_SERVICE};
use crate::IngestError;

/// The wire messages, generated from `proto/opentelemetry` with their
/// proto3 JSON mapping.
#[allow(clippy::all)]
pub mod wire {
    pub mod opentelemetry {
        pub mod proto {
            pub mod common {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.common.v1.rs"
                    ));
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.common.v1.serde.rs"
                    ));
                }
            }
            pub mod resource {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.resource.v1.rs"
                    ));
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.resource.v1.serde.rs"
                    ));
                }
            }
            pub mod profiles {
                pub mod v1development {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.profiles.v1development.rs"
                    ));
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.profiles.v1development.serde.rs"
                    ));
                }
            }
            pub mod collector {
                pub mod profiles {
                    pub mod v1development {
                        include!(concat!(
                            env!("OUT_DIR"),
                            "/opentelemetry.proto.collector.profiles.v1development.rs"
                        ));
                        include!(concat!(
                            env!("OUT_DIR"),
                            "/opentelemetry.proto.collector.profiles.v1development.serde.rs"
                        ));
                    }
                }
            }
        }
    }
    pub use opentelemetry::proto::collector::profiles::v1development::ExportProfilesServiceRequest;
    pub use opentelemetry::proto::common::v1::{any_value::Value, AnyValue, KeyValue};
    pub use opentelemetry::proto::profiles::v1development::*;
}

use wire::{AnyValue, ExportProfilesServiceRequest, ProfilesDictionary, Value};

/// A profile's duration when the exporter leaves it out, as Pyroscope reads it.
const DEFAULT_DURATION_NANOS: i64 = 10_000_000_000;

/// An OTLP profiles export body, protobuf or proto3 JSON, gzipped or not.
pub struct OtlpBody {
    pub body: Bytes,
    pub encoding: BodyEncoding,
}

impl WireFormat for OtlpBody {
    fn received_bytes(&self) -> usize {
        self.body.len()
    }

    fn profiles(
        self,
        limits: &Limits,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let inflated;
        let body = if self.encoding.gzip {
            inflated = gunzip(&self.body, limits.max_decompressed_bytes, "request body")?;
            inflated.as_slice()
        } else {
            &self.body
        };
        let profiles = export_body(limits, body, self.encoding.json, tenant, now_nanos)?;
        check_times(&profiles, &limits.for_tenant(tenant), now_nanos)?;
        Ok(profiles)
    }
}

/// Normalised profiles of an `ExportProfilesServiceRequest` body (already
/// decompressed under the request's limit).
fn export_body(
    limits: &Limits,
    body: &[u8],
    json: bool,
    tenant: &str,
    now_nanos: i64,
) -> Result<Vec<Profile>, IngestError> {
    let req: ExportProfilesServiceRequest = if json {
        ember_api::json::from_json(body).map_err(|reason| IngestError::Decode {
            what: "OTLP profiles request (JSON)",
            reason,
        })?
    } else {
        prost::Message::decode(body).map_err(|e| IngestError::Decode {
            what: "OTLP profiles request",
            reason: e.to_string(),
        })?
    };
    let limits = limits.for_tenant(tenant);
    // Stacks are shared through the dictionary, so a small request can
    // name the same deep stack many times: the frames it expands to are
    // bounded by its size, like a pprof's.
    let mut frame_budget = body.len().max(1 << 20);
    let mut out = Vec::new();
    for (labels, profile) in converted(&req, &limits, now_nanos, &mut frame_budget)? {
        let dest = Destination {
            tenant: tenant.to_string(),
            labels: validate_labels(labels)?,
            received_at_nanos: now_nanos,
            limits,
        };
        out.extend(normalise(&FlatProfile::of(&profile), &dest)?);
    }
    Ok(out)
}

/// Each OTLP profile as series labels and a pprof profile, one per
/// service its samples name.
fn converted(
    req: &ExportProfilesServiceRequest,
    limits: &ProfileLimits,
    now_nanos: i64,
    frame_budget: &mut usize,
) -> Result<Vec<(Labels, pprof::Profile)>, IngestError> {
    if req.resource_profiles.is_empty() {
        return Ok(Vec::new());
    }
    let dict = req
        .dictionary
        .as_ref()
        .ok_or_else(|| invalid("the request has no profiles dictionary"))?;
    let d = Dictionary(dict);
    let mut out = Vec::new();
    for rp in &req.resource_profiles {
        let resource_attributes = rp
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let service = resource_service(&d, resource_attributes);
        for sp in &rp.scope_profiles {
            let scope_attributes = sp
                .scope
                .as_ref()
                .map(|s| s.attributes.as_slice())
                .unwrap_or_default();
            for p in &sp.profiles {
                limits.check_samples(p.samples.len())?;
                let kind = ProfileKind::of(&d, p)?;
                for (service, samples) in samples_by_service(&d, p, &service)? {
                    let mut labels = vec![("__name__".to_string(), kind.name.clone())];
                    for kv in resource_attributes.iter().chain(scope_attributes) {
                        let key = label_name(&kv.key);
                        let value = kv.value.as_ref().map(|v| d.text(v)).unwrap_or_default();
                        if key == "__name__"
                            || key == "service_name"
                            || value.is_empty()
                            || labels.iter().any(|(k, _)| *k == key)
                        {
                            continue;
                        }
                        labels.push((key, value));
                    }
                    labels.push(("service_name".to_string(), service));
                    let profile =
                        pprof_of(&d, p, &kind, &samples, limits, now_nanos, frame_budget)?;
                    out.push((labels, profile));
                }
            }
        }
    }
    Ok(out)
}

/// The dictionary, with each index checked as it is read.
struct Dictionary<'a>(&'a ProfilesDictionary);

impl<'a> Dictionary<'a> {
    fn get<T>(table: &'a [T], index: i32, what: &str) -> Result<&'a T, IngestError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| table.get(i))
            .ok_or_else(|| invalid(format!("{what} index {index} is outside its table")))
    }

    fn string(&self, index: i32) -> Result<&'a str, IngestError> {
        Self::get(&self.0.string_table, index, "string").map(String::as_str)
    }

    /// An attribute value as a label value: strings and integers, or an
    /// array of one of those; anything else reads as empty (as Pyroscope).
    fn text(&self, v: &AnyValue) -> String {
        match &v.value {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::StringValueStrindex(i)) => self.string(*i).unwrap_or_default().to_string(),
            Some(Value::ArrayValue(a)) if a.values.len() == 1 => self.text(&a.values[0]),
            _ => String::new(),
        }
    }

    /// A sample's attributes as (label name, value), empty values left out.
    fn attributes(&self, indices: &[i32]) -> Result<Vec<(String, String)>, IngestError> {
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            let a = Self::get(&self.0.attribute_table, i, "attribute")?;
            let key = self.string(a.key_strindex)?;
            let value = a.value.as_ref().map(|v| self.text(v)).unwrap_or_default();
            if !value.is_empty() {
                out.push((key.to_string(), value));
            }
        }
        Ok(out)
    }
}

/// Label names as Pyroscope's distributor makes them (`process.pid` is
/// `process_pid`).
fn label_name(key: &str) -> String {
    key.replace('.', "_")
}

/// `service.name` of the resource, else `unknown_service` with the
/// executable's name when there is one.
fn resource_service(d: &Dictionary, attributes: &[wire::KeyValue]) -> String {
    let value = |key: &str| {
        attributes
            .iter()
            .filter(|kv| kv.key == key)
            .map(|kv| kv.value.as_ref().map(|v| d.text(v)).unwrap_or_default())
            .find(|v| !v.is_empty())
    };
    match (value("service.name"), value("process.executable.name")) {
        (Some(service), _) => service,
        (None, Some(executable)) => format!("{DEFAULT_SERVICE}:{executable}"),
        (None, None) => DEFAULT_SERVICE.to_string(),
    }
}

/// What a profile measures and how its sample values become pprof values.
struct ProfileKind {
    name: String,
    sample_type: (String, String),
    period_type: (String, String),
    period: i64,
    /// CPU samples counted, each worth one period.
    values_times_period: bool,
}

impl ProfileKind {
    fn of(d: &Dictionary, p: &wire::Profile) -> Result<Self, IngestError> {
        let st = p.sample_type.unwrap_or_default();
        let sample_type = (
            d.string(st.type_strindex)?.to_string(),
            d.string(st.unit_strindex)?.to_string(),
        );
        let period_type = match &p.period_type {
            Some(pt) if p.period != 0 => (
                d.string(pt.type_strindex)?.to_string(),
                d.string(pt.unit_strindex)?.to_string(),
            ),
            _ => (String::new(), String::new()),
        };
        let is = |a: &str, b: &str, c: &str, e: &str| {
            (sample_type.0.as_str(), sample_type.1.as_str()) == (a, b)
                && (period_type.0.as_str(), period_type.1.as_str()) == (c, e)
        };
        if is("samples", "count", "cpu", "nanoseconds") {
            return Ok(ProfileKind {
                name: "process_cpu".into(),
                sample_type: ("cpu".into(), "nanoseconds".into()),
                period_type,
                period: p.period,
                values_times_period: true,
            });
        }
        // Pyroscope names a profile by its period type, and an off-CPU
        // profile (no period) by its sample type.
        let name = if period_type.0.is_empty() {
            sample_type.0.clone()
        } else {
            period_type.0.clone()
        };
        if name.is_empty() {
            return Err(invalid(
                "a profile has neither a sample type nor a period type",
            ));
        }
        Ok(ProfileKind {
            name,
            sample_type,
            period_type,
            period: p.period,
            values_times_period: false,
        })
    }
}

/// The profile's samples grouped by the service a sample names (its
/// `service.name` attribute), else the resource's.
fn samples_by_service<'p>(
    d: &Dictionary,
    p: &'p wire::Profile,
    resource_service: &str,
) -> Result<Vec<(String, Vec<&'p wire::Sample>)>, IngestError> {
    let mut groups: Vec<(String, Vec<&wire::Sample>)> = Vec::new();
    for s in &p.samples {
        let own = d
            .attributes(&s.attribute_indices)?
            .into_iter()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v);
        let service = own.unwrap_or_else(|| resource_service.to_string());
        match groups.iter_mut().find(|(name, _)| *name == service) {
            Some((_, samples)) => samples.push(s),
            None => groups.push((service, vec![s])),
        }
    }
    Ok(groups)
}

/// Builds a pprof profile of some of an OTLP profile's samples, with only
/// the locations and functions they use.
struct PprofBuilder<'a> {
    d: &'a Dictionary<'a>,
    p: pprof::Profile,
    strings: HashMap<String, i64>,
    locations: HashMap<i32, u64>,
    functions: HashMap<String, u64>,
}

impl<'a> PprofBuilder<'a> {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.functions.get(name) {
            return id;
        }
        let id = self.p.function.len() as u64 + 1;
        let name_index = self.string(name);
        self.p.function.push(pprof::Function {
            id,
            name: name_index,
            ..Default::default()
        });
        self.functions.insert(name.to_string(), id);
        id
    }

    /// The pprof location id of a dictionary location, its frames named as
    /// Pyroscope names them (unsymbolised: `file!0xaddress`).
    fn location(&mut self, index: i32) -> Result<u64, IngestError> {
        if let Some(&id) = self.locations.get(&index) {
            return Ok(id);
        }
        let loc = Dictionary::get(&self.d.0.location_table, index, "location")?;
        let mut lines = Vec::with_capacity(loc.lines.len().max(1));
        for line in &loc.lines {
            let f = Dictionary::get(&self.d.0.function_table, line.function_index, "function")?;
            let mut name = self.d.string(f.name_strindex)?;
            if name.is_empty() {
                name = self.d.string(f.system_name_strindex)?;
            }
            lines.push(pprof::Line {
                function_id: self.function(name),
                line: line.line,
                column: line.column,
            });
        }
        if lines.is_empty() {
            let name = format!(
                "{}!0x{:x}",
                self.mapping_file(loc.mapping_index)?,
                loc.address
            );
            lines.push(pprof::Line {
                function_id: self.function(&name),
                ..Default::default()
            });
        }
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(pprof::Location {
            id,
            address: loc.address,
            line: lines,
            ..Default::default()
        });
        self.locations.insert(index, id);
        Ok(id)
    }

    /// The base name of a location's mapped file, `unknown` without one.
    fn mapping_file(&self, index: i32) -> Result<String, IngestError> {
        let file = if index == 0 {
            ""
        } else {
            let m = Dictionary::get(&self.d.0.mapping_table, index, "mapping")?;
            self.d.string(m.filename_strindex)?
        };
        let base = file.rsplit('/').next().unwrap_or_default();
        Ok(if base.is_empty() { "unknown" } else { base }.to_string())
    }
}

fn pprof_of(
    d: &Dictionary,
    p: &wire::Profile,
    kind: &ProfileKind,
    samples: &[&wire::Sample],
    limits: &ProfileLimits,
    now_nanos: i64,
    frame_budget: &mut usize,
) -> Result<pprof::Profile, IngestError> {
    let mut b = PprofBuilder {
        d,
        p: pprof::Profile::default(),
        strings: HashMap::new(),
        locations: HashMap::new(),
        functions: HashMap::new(),
    };
    b.string("");
    let sample_type = pprof::ValueType {
        r#type: b.string(&kind.sample_type.0),
        unit: b.string(&kind.sample_type.1),
    };
    let period_type = pprof::ValueType {
        r#type: b.string(&kind.period_type.0),
        unit: b.string(&kind.period_type.1),
    };
    b.p.sample_type = vec![sample_type];
    b.p.period_type = Some(period_type);
    b.p.period = kind.period;
    b.p.time_nanos = match i64::try_from(p.time_unix_nano) {
        Ok(0) => now_nanos,
        Ok(t) => t,
        Err(_) => {
            return Err(invalid(format!(
                "time_unix_nano {} is out of range",
                p.time_unix_nano
            )))
        }
    };
    b.p.duration_nanos = match i64::try_from(p.duration_nano) {
        Ok(0) | Err(_) => DEFAULT_DURATION_NANOS,
        Ok(n) => n,
    };
    // Locations past the root-most `depth` of a stack cannot change the
    // normalised stack (it is cut there), so they are not expanded.
    let depth = limits.kept_depth() + 2;
    for s in samples {
        let value = sample_value(s, kind)?;
        let stack = Dictionary::get(&d.0.stack_table, s.stack_index, "stack")?;
        let kept = &stack.location_indices[stack.location_indices.len().saturating_sub(depth)..];
        *frame_budget = frame_budget.checked_sub(kept.len()).ok_or_else(|| {
            invalid("the request's stacks expand to more frames than its size allows")
        })?;
        let location_id = kept
            .iter()
            .map(|&i| b.location(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut label = Vec::new();
        for (key, value) in d.attributes(&s.attribute_indices)? {
            if key == "service.name" {
                continue;
            }
            label.push(pprof::Label {
                key: b.string(&label_name(&key)),
                str: b.string(&value),
                ..Default::default()
            });
        }
        if s.link_index != 0 {
            let link = Dictionary::get(&d.0.link_table, s.link_index, "link")?;
            if let Ok(span) = <[u8; 8]>::try_from(link.span_id.as_slice()) {
                label.push(pprof::Label {
                    key: b.string("span_id"),
                    str: b.string(&format!("{:016x}", u64::from_be_bytes(span))),
                    ..Default::default()
                });
            }
        }
        b.p.sample.push(pprof::Sample {
            location_id,
            value: vec![value],
            label,
        });
    }
    Ok(b.p)
}

/// A sample's one value: its values summed (one per timestamp), or its
/// timestamps counted when it has none; CPU sample counts times the period.
fn sample_value(s: &wire::Sample, kind: &ProfileKind) -> Result<i64, IngestError> {
    let sum = if s.values.is_empty() {
        if s.timestamps_unix_nano.is_empty() {
            return Err(invalid("a sample has neither values nor timestamps"));
        }
        s.timestamps_unix_nano.len() as i64
    } else {
        s.values.iter().fold(0i64, |a, v| a.saturating_add(*v))
    };
    Ok(if kind.values_times_period {
        sum.saturating_mul(kind.period)
    } else {
        sum
    })
}

fn invalid(reason: impl Into<String>) -> IngestError {
    IngestError::Invalid(format!("OTLP profiles: {}", reason.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn fixture(name: &str) -> Vec<u8> {
        let path = ember_fixtures::fixtures_dir().join("otlp").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn limits() -> Limits {
        Limits {
            defaults: ProfileLimits {
                reject_older_than_seconds: 0,
                reject_newer_than_seconds: 0,
                ..ProfileLimits::default()
            },
            ..Limits::default()
        }
    }

    /// profile type -> total, over every profile of the service.
    fn totals(profiles: &[Profile], service: &str) -> HashMap<String, i64> {
        let mut out = HashMap::new();
        for p in profiles.iter().filter(|p| {
            p.labels
                .iter()
                .any(|(k, v)| k == "service_name" && v == service)
        }) {
            *out.entry(p.profile_type.clone()).or_default() +=
                p.samples.iter().map(|s| s.value).sum::<i64>();
        }
        out
    }

    #[test]
    fn the_ebpf_capture_converts_as_pyroscope_converts_it_in_both_encodings() {
        let l = limits();
        let proto = export_body(&l, &fixture("otel-ebpf-profile.pb.bin"), false, "t", 1).unwrap();
        let json = export_body(&l, &fixture("otel-ebpf-profile.pb.json"), true, "t", 1).unwrap();
        assert_eq!(proto, json);
        // The totals Pyroscope's SelectMergeProfile gave for the same
        // capture (`*.expected.json`).
        let t = totals(&proto, "unknown_service");
        assert_eq!(
            t["process_cpu:cpu:nanoseconds:cpu:nanoseconds"],
            500_000_000
        );
        assert_eq!(t["off_cpu:off_cpu:nanoseconds::"], 250_725_419_905);
        // Sample attributes become series labels, named as Pyroscope names them.
        assert!(proto
            .iter()
            .all(|p| p.labels.iter().any(|(k, _)| k == "process_pid")));
        assert!(proto
            .iter()
            .any(|p| p.labels.iter().any(|(k, _)| k == "thread_name")));
        // Resources naming their executable are services of their own.
        assert!(!totals(&proto, "unknown_service:containerd").is_empty());
    }

    #[test]
    fn unsymbolised_frames_are_named_by_file_and_address() {
        let l = limits();
        let profiles =
            export_body(&l, &fixture("otel-ebpf-profile.pb.bin"), false, "t", 1).unwrap();
        let names: Vec<&str> = profiles.iter().flat_map(|p| p.functions.iter()).collect();
        assert!(
            names.iter().any(|n| n.contains("!0x")),
            "no unsymbolised frame"
        );
        assert!(names.iter().all(|n| !n.starts_with("0x")));
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let l = limits();
        let mut req =
            ExportProfilesServiceRequest::decode(&fixture("otel-ebpf-profile.pb.bin")[..]).unwrap();
        let good = req.clone();
        // A stack index outside the table.
        req.resource_profiles[0].scope_profiles[0].profiles[0].samples[0].stack_index = 99_999;
        let e = export_body(&l, &req.encode_to_vec(), false, "t", 1).unwrap_err();
        assert!(e.to_string().contains("stack index 99999"), "{e}");
        // No dictionary.
        let mut req = good.clone();
        req.dictionary = None;
        let e = export_body(&l, &req.encode_to_vec(), false, "t", 1).unwrap_err();
        assert!(e.to_string().contains("dictionary"), "{e}");
        // Not protobuf, not JSON.
        assert!(export_body(&l, b"\xff\xff\xff", false, "t", 1).is_err());
        assert!(export_body(&l, b"{\"resourceProfiles\": 3}", true, "t", 1).is_err());
        // An empty export is nothing to store, not an error.
        assert!(export_body(&l, b"", false, "t", 1).unwrap().is_empty());
    }

    #[test]
    fn a_small_request_cannot_expand_a_shared_deep_stack_without_bound() {
        let l = limits();
        let mut req =
            ExportProfilesServiceRequest::decode(&fixture("otel-ebpf-profile.pb.bin")[..]).unwrap();
        let dict = req.dictionary.as_mut().unwrap();
        let deep: Vec<i32> = (1..dict.location_table.len() as i32)
            .cycle()
            .take(5_000)
            .collect();
        dict.stack_table.push(wire::Stack {
            location_indices: deep,
        });
        let index = dict.stack_table.len() as i32 - 1;
        let profile = &mut req.resource_profiles[0].scope_profiles[0].profiles[0];
        let sample = profile.samples[0].clone();
        profile.samples = vec![
            wire::Sample {
                stack_index: index,
                ..sample
            };
            10_000
        ];
        let body = req.encode_to_vec();
        let e = export_body(&l, &body, false, "t", 1).unwrap_err();
        assert!(e.to_string().contains("frames"), "{e}");
    }
}
