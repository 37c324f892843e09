//! The decoders a pushing client reaches: pprof, push.v1 (protobuf and
//! JSON), OTLP, JFR, the `/ingest` formats and query string, multipart
//! bodies, and label selectors.

use std::collections::HashMap;

use ember_engine::selector::Selector;

use bytes::Bytes;

use ember_distributor::formats::jfr::JfrBody;
use ember_distributor::formats::legacy::{Format, IngestBody, IngestParams};
use ember_distributor::formats::otlp::OtlpBody;
use ember_distributor::formats::pprof;
use ember_distributor::formats::push::PushBody;
use ember_distributor::formats::{BodyEncoding, WireFormat};
use ember_distributor::limits::{Limits, ProfileLimits};
use ember_distributor::normalise::{normalise, validate_labels, Destination};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by corpus directory name.
pub const TARGETS: [(&str, Target); 10] = [
    ("pprof", pprof_profile),
    ("push_proto", push_proto),
    ("push_json", push_json),
    ("ingest_folded", ingest_folded),
    ("ingest_query", ingest_query),
    ("selector", selector),
    ("ingest_multipart", ingest_multipart),
    ("otlp_proto", otlp_proto),
    ("otlp_json", otlp_json),
    ("ingest_jfr", ingest_jfr),
];

const NOW: i64 = 1_800_000_000_000_000_000;

fn limits() -> Limits {
    Limits {
        max_request_bytes: 1 << 20,
        max_decompressed_bytes: 8 << 20,
        defaults: ProfileLimits {
            reject_older_than_seconds: 0,
            reject_newer_than_seconds: 0,
            ..ProfileLimits::default()
        },
        tenants: HashMap::new(),
    }
}

/// A pprof profile, gzipped or not, normalised.
pub fn pprof_profile(data: &[u8]) {
    let l = limits();
    let Ok(raw) = pprof::maybe_gunzip(data, l.defaults.max_profile_size_bytes, "pprof profile")
    else {
        return;
    };
    let Ok(profile) = pprof::FlatProfile::decode(&raw) else {
        return;
    };
    let Ok(labels) = validate_labels(vec![("service_name".into(), "fuzz".into())]) else {
        return;
    };
    let dest = Destination {
        tenant: "fuzz".into(),
        labels,
        received_at_nanos: NOW,
        limits: l.defaults,
    };
    if let Ok(profiles) = normalise(&profile, &dest) {
        check_bounds(&profiles, &l.defaults);
    }
}

/// A push.v1 request body as the Connect protocol carries it (protobuf).
pub fn push_proto(data: &[u8]) {
    push(data, false)
}

/// A push.v1 request body in Connect's JSON.
pub fn push_json(data: &[u8]) {
    push(data, true)
}

fn push(data: &[u8], json: bool) {
    let l = limits();
    let gzip = data.starts_with(&[0x1f, 0x8b]);
    let body = PushBody {
        body: Bytes::copy_from_slice(data),
        encoding: BodyEncoding { json, gzip },
    };
    if let Ok(profiles) = body.profiles(&l, "fuzz", NOW) {
        check_bounds(&profiles, &l.defaults);
    }
}

/// An OTLP profiles export body (protobuf).
pub fn otlp_proto(data: &[u8]) {
    otlp(data, false)
}

/// An OTLP profiles export body in proto3 JSON.
pub fn otlp_json(data: &[u8]) {
    otlp(data, true)
}

fn otlp(data: &[u8], json: bool) {
    let l = limits();
    let gzip = data.starts_with(&[0x1f, 0x8b]);
    let body = OtlpBody {
        body: Bytes::copy_from_slice(data),
        encoding: BodyEncoding { json, gzip },
    };
    if let Ok(profiles) = body.profiles(&l, "fuzz", NOW) {
        check_bounds(&profiles, &l.defaults);
    }
}

/// A JFR recording as `/ingest?format=jfr` takes it.
pub fn ingest_jfr(data: &[u8]) {
    let l = limits();
    let query = HashMap::from([("name".to_string(), "fuzz".to_string())]);
    let Ok(params) = IngestParams::from_query(&query) else {
        return;
    };
    let body = JfrBody {
        params,
        recording: Bytes::copy_from_slice(data),
        labels: None,
    };
    if let Ok(profiles) = body.profiles(&l, "fuzz", NOW) {
        check_bounds(&profiles, &l.defaults);
    }
}

/// A legacy `/ingest` body in the folded and the lines formats.
pub fn ingest_folded(data: &[u8]) {
    let l = limits();
    let query = HashMap::from([("name".to_string(), "fuzz.cpu{env=x}".to_string())]);
    let Ok(params) = IngestParams::from_query(&query) else {
        return;
    };
    for format in [Format::Folded, Format::Lines] {
        let body = IngestBody {
            params: params.clone(),
            format,
            body: Bytes::copy_from_slice(data),
        };
        if let Ok(profiles) = body.profiles(&l, "fuzz", NOW) {
            check_bounds(&profiles, &l.defaults);
        }
    }
}

/// The query string of `/ingest` (`name=app.cpu{k=v}&from=...`).
pub fn ingest_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let query: HashMap<String, String> = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(params) = IngestParams::from_query(&query) {
        let _ = params.destination("fuzz", NOW, true, &ProfileLimits::default());
        let _ = params.folded_profile_type();
    }
}

/// A multipart `/ingest` body (boundary `ember-fuzz`), its profile part
/// then decoded as pprof.
pub fn ingest_multipart(data: &[u8]) {
    let body = bytes::Bytes::copy_from_slice(data);
    let content_type = "multipart/form-data; boundary=ember-fuzz";
    let part = futures::executor::block_on(ember_distributor::formats::legacy::multipart_profile(
        content_type,
        body,
    ));
    if let Ok(profile) = part {
        assert!(profile.len() <= data.len());
        pprof_profile(&profile);
    }
}

/// A label selector, matched against a series.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = Selector::parse(text) {
        let _ = s.matches_series(r#"{env="prod", service_name="api"}"#);
        let _ = s.exact_services();
        let _ = s.may_match_service("api");
    }
}

/// What the limits promise of every accepted profile.
fn check_bounds(profiles: &[ember_engine::Profile], limits: &ProfileLimits) {
    for p in profiles {
        assert!(p.samples.len() <= limits.max_profile_stacktrace_samples);
        for s in &p.samples {
            assert!(s.stack.len() <= limits.max_profile_stacktrace_depth.max(2));
            assert!(p.stack(s).iter().all(|f| (*f as usize) < p.functions.len()));
        }
        assert!(p
            .functions
            .iter()
            .all(|f| f.len() <= limits.max_profile_symbol_value_length));
    }
}
