//! Prometheus metrics of the push front end.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type LabelSet = Vec<(String, String)>;

#[derive(Clone)]
pub struct PushMetrics {
    pub pushes: Family<LabelSet, Counter>,
    pub push_bytes: Counter,
    pub profiles: Counter,
    pub errors: Family<LabelSet, Counter>,
    pub push_seconds: Family<LabelSet, Histogram>,
}

impl PushMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            pushes: Family::default(),
            push_bytes: Counter::default(),
            profiles: Counter::default(),
            errors: Family::default(),
            push_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
            }),
        };
        registry.register(
            "ember_push_requests",
            "Push requests received, by API",
            m.pushes.clone(),
        );
        registry.register(
            "ember_push_received_bytes",
            "Bytes of push request bodies",
            m.push_bytes.clone(),
        );
        registry.register(
            "ember_push_profiles",
            "Normalised profiles accepted from pushes",
            m.profiles.clone(),
        );
        registry.register(
            "ember_push_errors",
            "Refused or failed pushes, by reason",
            m.errors.clone(),
        );
        registry.register(
            "ember_push_duration_seconds",
            "Time from request to acknowledgement, by API",
            m.push_seconds.clone(),
        );
        m
    }

    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    pub fn api(api: &str) -> LabelSet {
        vec![("api".to_string(), api.to_string())]
    }
}
