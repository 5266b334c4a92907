//! Prometheus metrics, with `prometheus-client`: fed by the usage writer (never on the
//! request path), by the model registry as models load and are evicted, and by the
//! system monitor and the registry's gauges at scrape time.
//!
//! Every label value is bounded: keys are the operator's, endpoints are folded by
//! [`endpoint_label`], and models by the names set with [`Metrics::set_model_names`]
//! (anything else is `other`), so no client can grow the exposition.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use llmgate_core::storage::RequestRecord;
use llmgate_core::system::SystemReport;
use llmgate_core::usage::{endpoint_label, UsageObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::models::ModelState;

/// The label of requests for a model not set with [`Metrics::set_model_names`], or for
/// none.
pub const OTHER_MODEL: &str = "other";

/// The states `llmgate_model_state` always has a series for (0 or 1), so that a
/// dashboard can plot each; a gauge in another state gets a series of its own too.
pub const MODEL_STATES: [&str; ModelState::ALL.len()] = {
    let mut names = [""; ModelState::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ModelState::ALL[i].as_str();
        i += 1;
    }
    names
};

/// One model as `/metrics` shows it at a scrape, from the source set with
/// [`Metrics::set_model_gauges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelGauge {
    /// The model's (canonical) name.
    pub name: String,
    /// Where it is in its life: one of [`MODEL_STATES`], as the admin API names it.
    pub state: &'static str,
    /// Requests being answered by its model server (a stream until its body ends).
    pub in_flight: u64,
    /// Requests waiting in the gateway for a free slot.
    pub queued: u64,
}

/// Where the gauges of the models come from: called at each scrape.
pub type ModelGaugeSource = Arc<dyn Fn() -> Vec<ModelGauge> + Send + Sync>;

/// The source of the models' gauges, if one is set.
#[derive(Default, Clone)]
struct GaugeSource(Option<ModelGaugeSource>);

impl std::fmt::Debug for GaugeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "set" } else { "none" })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    key: String,
    endpoint: String,
    status: u16,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    key: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStateLabels {
    model: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    name: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;
type ModelHistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// Every metric llmgate exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<TokenLabels, Counter>,
    completion_tokens: Family<TokenLabels, Counter>,
    request_seconds: HistogramFamily,
    upstream_seconds: HistogramFamily,
    model_loads: Family<ModelLabels, Counter>,
    model_load_seconds: ModelHistogramFamily,
    model_evictions: Family<ModelLabels, Counter>,
    model_state: Family<ModelStateLabels, Gauge>,
    model_in_flight: Family<ModelLabels, Gauge>,
    model_queued: Family<ModelLabels, Gauge>,
    /// The model names that are labels of their own ([`Metrics::set_model_names`]).
    model_names: RwLock<HashSet<String>>,
    /// Where the models' gauges come from at a scrape ([`Metrics::set_model_gauges`]).
    model_gauges: RwLock<GaugeSource>,
    /// Held while a scrape rewrites the models' gauges and encodes them, so that two
    /// scrapes at once never see each other's half-written families.
    rendering: Mutex<()>,
    cpu_percent: FloatGauge,
    memory_used: Gauge,
    memory_total: Gauge,
    gateway_memory: Gauge,
    model_memory: Gauge,
    gpu_utilization: Family<GpuLabels, FloatGauge>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_memory_total: Family<GpuLabels, Gauge>,
    gpu_temperature: Family<GpuLabels, FloatGauge>,
    gpu_power: Family<GpuLabels, FloatGauge>,
    usage_rejected: Counter,
    usage_spilled: Counter,
    usage_lost: Counter,
    /// The series the last record counted into, kept across batches: the usage intake
    /// hands over small batches, and consecutive records nearly always share one.
    last_series: Mutex<Option<LastSeries>>,
}

/// A series with the key, endpoint, status and model (as the record names it) it counts.
struct LastSeries {
    key: String,
    endpoint: &'static str,
    status: u16,
    model: Option<String>,
    series: Series,
}

impl std::fmt::Debug for LastSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastSeries")
            .field("key", &self.key)
            .field("endpoint", &self.endpoint)
            .field("status", &self.status)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms … about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn load_histogram() -> Histogram {
    // 50 ms … about 27 min: a model server loads in well under a second to minutes.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("llmgate");
        let metrics = Self {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            model_loads: Family::default(),
            model_load_seconds: Family::new_with_constructor(load_histogram),
            model_evictions: Family::default(),
            model_state: Family::default(),
            model_in_flight: Family::default(),
            model_queued: Family::default(),
            model_names: RwLock::default(),
            model_gauges: RwLock::default(),
            rendering: Mutex::new(()),
            cpu_percent: FloatGauge::default(),
            memory_used: Gauge::default(),
            memory_total: Gauge::default(),
            gateway_memory: Gauge::default(),
            model_memory: Gauge::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_temperature: Family::default(),
            gpu_power: Family::default(),
            usage_rejected: Counter::default(),
            usage_spilled: Counter::default(),
            usage_lost: Counter::default(),
            last_series: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by key name, endpoint, status and model",
            metrics.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens by key name and model",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens by key name and model",
            metrics.completion_tokens.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to the last byte of its answer",
            Unit::Seconds,
            metrics.request_seconds.clone(),
        );
        registry.register_with_unit(
            "upstream_duration",
            "Time from a request's arrival to the model server's response headers (time to first token for streams)",
            Unit::Seconds,
            metrics.upstream_seconds.clone(),
        );
        registry.register(
            "model_state",
            "1 for each model's current state, 0 for the others",
            metrics.model_state.clone(),
        );
        registry.register(
            "model_requests_in_flight",
            "Requests being answered by each model's server",
            metrics.model_in_flight.clone(),
        );
        registry.register(
            "model_queue_length",
            "Requests waiting in the gateway for a slot of each model",
            metrics.model_queued.clone(),
        );
        registry.register(
            "model_loads",
            "Model server starts that ended with the model ready",
            metrics.model_loads.clone(),
        );
        registry.register_with_unit(
            "model_load_duration",
            "Time from a model server's start to the model being ready",
            Unit::Seconds,
            metrics.model_load_seconds.clone(),
        );
        registry.register(
            "model_evictions",
            "Models stopped to make room for another",
            metrics.model_evictions.clone(),
        );
        registry.register(
            "cpu_usage_percent",
            "CPU usage of the machine, all cores",
            metrics.cpu_percent.clone(),
        );
        registry.register_with_unit(
            "memory_used",
            "Memory in use on the machine",
            Unit::Bytes,
            metrics.memory_used.clone(),
        );
        registry.register_with_unit(
            "memory_total",
            "Memory installed",
            Unit::Bytes,
            metrics.memory_total.clone(),
        );
        registry.register_with_unit(
            "gateway_memory",
            "Resident memory of the gateway",
            Unit::Bytes,
            metrics.gateway_memory.clone(),
        );
        registry.register_with_unit(
            "model_server_memory",
            "Resident memory of the model server (0 when none runs)",
            Unit::Bytes,
            metrics.model_memory.clone(),
        );
        registry.register(
            "gpu_utilization_percent",
            "GPU utilisation",
            metrics.gpu_utilization.clone(),
        );
        registry.register_with_unit(
            "gpu_memory_used",
            "GPU memory in use",
            Unit::Bytes,
            metrics.gpu_memory_used.clone(),
        );
        registry.register_with_unit(
            "gpu_memory_total",
            "GPU memory installed",
            Unit::Bytes,
            metrics.gpu_memory_total.clone(),
        );
        registry.register(
            "gpu_temperature_celsius",
            "GPU temperature",
            metrics.gpu_temperature.clone(),
        );
        registry.register(
            "gpu_power_watts",
            "GPU power draw",
            metrics.gpu_power.clone(),
        );
        registry.register(
            "usage_records_rejected",
            "Usage records the database refused for what they hold, set aside (GET /admin/usage/rejected)",
            metrics.usage_rejected.clone(),
        );
        registry.register(
            "usage_records_spilled",
            "Usage records written to the spill file while the database was down, to be written when it is back",
            metrics.usage_spilled.clone(),
        );
        registry.register(
            "usage_records_lost",
            "Usage records lost: the spill file could not be written",
            metrics.usage_lost.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

/// The series one kind of request (key, endpoint, status, model) counts into.
struct Series {
    requests: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
}

impl Series {
    fn count(&self, record: &RequestRecord) {
        self.requests.inc();
        self.prompt_tokens.inc_by(record.prompt_tokens.unwrap_or(0));
        self.completion_tokens
            .inc_by(record.completion_tokens.unwrap_or(0));
        self.request_seconds
            .observe(record.latency_ms as f64 / 1000.0);
        if let Some(first_byte) = record.first_byte_ms {
            self.upstream_seconds.observe(first_byte as f64 / 1000.0);
        }
    }
}

impl Metrics {
    /// Sets the model names that are `model` labels of their own: the configured
    /// models' canonical names. Requests for any other model (or none) count as
    /// [`OTHER_MODEL`]. Call it again when the models change; series already counted
    /// stay.
    pub fn set_model_names(&self, names: impl IntoIterator<Item = String>) {
        let names: HashSet<String> = names.into_iter().collect();
        *self.model_names.write().unwrap_or_else(|e| e.into_inner()) = names;
        // The last series was labelled under the names before.
        *self.last_series.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The `model` label of a request for `model`: its name when it is known,
    /// [`OTHER_MODEL`] otherwise.
    fn model_label(&self, model: Option<&str>) -> String {
        let names = self.model_names.read().unwrap_or_else(|e| e.into_inner());
        match model {
            Some(model) if names.contains(model) => model.to_owned(),
            _ => OTHER_MODEL.to_owned(),
        }
    }

    /// A model server started and its model is ready, `seconds` after the start.
    pub fn model_loaded(&self, model: &str, seconds: f64) {
        let labels = ModelLabels {
            model: self.model_label(Some(model)),
        };
        self.model_loads.get_or_create(&labels).inc();
        self.model_load_seconds
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// A model was stopped to make room for another.
    pub fn model_evicted(&self, model: &str) {
        let labels = ModelLabels {
            model: self.model_label(Some(model)),
        };
        self.model_evictions.get_or_create(&labels).inc();
    }

    /// Sets where the models' state, requests in flight and queue lengths come from:
    /// `source` is called at each scrape, and only the models it answers have series.
    pub fn set_model_gauges(&self, source: ModelGaugeSource) {
        *self.model_gauges.write().unwrap_or_else(|e| e.into_inner()) = GaugeSource(Some(source));
    }

    /// Rewrites the models' gauges from the source: models gone since the last scrape
    /// lose their series.
    fn update_model_gauges(&self) {
        let source = self
            .model_gauges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        self.model_state.clear();
        self.model_in_flight.clear();
        self.model_queued.clear();
        let Some(source) = source else { return };
        for gauge in source() {
            let states = MODEL_STATES
                .iter()
                .copied()
                .chain((!MODEL_STATES.contains(&gauge.state)).then_some(gauge.state));
            for state in states {
                self.model_state
                    .get_or_create(&ModelStateLabels {
                        model: gauge.name.clone(),
                        state: state.to_owned(),
                    })
                    .set(i64::from(state == gauge.state));
            }
            let model = ModelLabels { model: gauge.name };
            let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.model_in_flight
                .get_or_create(&model)
                .set(count(gauge.in_flight));
            self.model_queued
                .get_or_create(&model)
                .set(count(gauge.queued));
        }
    }

    fn series(&self, record: &RequestRecord, key_name: &str) -> Series {
        // Known endpoints by name, everything else as `other`: a key holder making up
        // paths must not grow the exposition without bound. Models likewise.
        let endpoint_name = endpoint_label(&record.path);
        let endpoint = EndpointLabels {
            endpoint: endpoint_name.to_owned(),
        };
        let model = self.model_label(record.model.as_deref());
        let tokens = TokenLabels {
            key: key_name.to_owned(),
            model: model.clone(),
        };
        let requests = RequestLabels {
            key: key_name.to_owned(),
            endpoint: endpoint_name.to_owned(),
            status: record.status,
            model,
        };
        Series {
            requests: self.requests.get_or_create(&requests).clone(),
            prompt_tokens: self.prompt_tokens.get_or_create(&tokens).clone(),
            completion_tokens: self.completion_tokens.get_or_create(&tokens).clone(),
            request_seconds: self.request_seconds.get_or_create(&endpoint).clone(),
            upstream_seconds: self.upstream_seconds.get_or_create(&endpoint).clone(),
        }
    }
}

impl UsageObserver for Metrics {
    fn observe(&self, record: &RequestRecord, key_name: &str) {
        self.series(record, key_name).count(record);
    }

    /// Consecutive records of the same key, endpoint, status and model (nearly all of
    /// them under load) share one lookup of their series, within a batch and across
    /// batches.
    fn observe_batch(&self, records: &[RequestRecord], key_names: &[String]) {
        let mut last = self.last_series.lock().unwrap_or_else(|e| e.into_inner());
        for (record, key_name) in records.iter().zip(key_names) {
            let endpoint = endpoint_label(&record.path);
            match &*last {
                Some(seen)
                    if seen.status == record.status
                        && seen.endpoint == endpoint
                        && seen.key == *key_name
                        && seen.model == record.model =>
                {
                    seen.series.count(record)
                }
                _ => {
                    let series = self.series(record, key_name);
                    series.count(record);
                    *last = Some(LastSeries {
                        key: key_name.clone(),
                        endpoint,
                        status: record.status,
                        model: record.model.clone(),
                        series,
                    });
                }
            }
        }
    }

    fn rejected(&self, records: usize) {
        self.usage_rejected.inc_by(records as u64);
    }

    fn spilled(&self, records: usize) {
        self.usage_spilled.inc_by(records as u64);
    }

    fn lost(&self, records: usize) {
        self.usage_lost.inc_by(records as u64);
    }
}

impl Metrics {
    /// The exposition text, with the gauges brought up to date first.
    pub fn render(&self, system: &SystemReport, format: Format) -> String {
        let _rendering = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        self.update_model_gauges();
        self.cpu_percent.set(f64::from(system.cpu.usage_percent));
        self.memory_used.set(system.memory.used_bytes as i64);
        self.memory_total.set(system.memory.total_bytes as i64);
        self.gateway_memory.set(system.gateway.memory_bytes as i64);
        self.model_memory.set(
            system
                .model_server
                .as_ref()
                .map_or(0, |p| p.memory_bytes as i64),
        );
        for gpu in &system.gpu.devices {
            let labels = GpuLabels {
                gpu: gpu.index.to_string(),
                name: gpu.name.clone(),
            };
            if let Some(u) = gpu.utilization_percent {
                self.gpu_utilization
                    .get_or_create(&labels)
                    .set(f64::from(u));
            }
            if let Some(m) = gpu.memory_used_bytes {
                self.gpu_memory_used.get_or_create(&labels).set(m as i64);
            }
            if let Some(m) = gpu.memory_total_bytes {
                self.gpu_memory_total.get_or_create(&labels).set(m as i64);
            }
            if let Some(t) = gpu.temperature_celsius {
                self.gpu_temperature
                    .get_or_create(&labels)
                    .set(f64::from(t));
            }
            if let Some(p) = gpu.power_watts {
                self.gpu_power.get_or_create(&labels).set(p);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => openmetrics_to_prometheus(&out),
        }
    }
}

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: what every scraper and parser reads.
    Prometheus,
    /// OpenMetrics 1.0, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

impl Format {
    /// What an `Accept` header asks for: OpenMetrics only when it is named with a
    /// weight above 0 and at least that of `text/plain` (Prometheus itself asks for
    /// OpenMetrics first).
    pub fn from_accept(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Prometheus;
        };
        let (mut openmetrics, mut plain) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("").to_ascii_lowercase();
            let weight = params
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(weight),
                "text/plain" | "text/*" | "*/*" => plain = plain.max(weight),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= plain {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Rewrites OpenMetrics text (as `prometheus-client` writes it) in the Prometheus 0.0.4
/// format: a counter's `HELP` and `TYPE` name its `_total` samples, and the `UNIT` and
/// `EOF` lines, which 0.0.4 does not have, go. Samples are written alike in both.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + counters.len() * 12);
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str, status: u16, tokens: u64, latency_ms: u64) -> RequestRecord {
        RequestRecord {
            at: chrono::Utc::now(),
            key_id: "id".into(),
            method: "POST".into(),
            path: path.into(),
            model: None,
            status,
            prompt_tokens: Some(tokens),
            completion_tokens: Some(tokens * 2),
            latency_ms,
            first_byte_ms: (status == 200).then_some(latency_ms / 2),
            end_user: None,
        }
    }

    /// The exposition's lines, sorted (series come in hash-map order).
    fn text(metrics: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &metrics.registry).unwrap();
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort_unstable();
        lines.join("\n")
    }

    #[test]
    fn a_batch_counts_exactly_what_its_records_one_by_one_count() {
        let chat = "/v1/chat/completions";
        let records = vec![
            record(chat, 200, 3, 40),
            record(chat, 200, 4, 900),
            record(chat, 200, 5, 10),
            record("/v1/embeddings", 200, 6, 5),
            record(chat, 502, 0, 3000),
            record(chat, 200, 7, 20),
        ];
        let names: Vec<String> = ["alice", "alice", "bob", "alice", "alice", "alice"]
            .map(String::from)
            .to_vec();
        let batched = Metrics::default();
        batched.observe_batch(&records, &names);
        let single = Metrics::default();
        for (r, name) in records.iter().zip(&names) {
            single.observe(r, name);
        }
        let text = text(&batched);
        assert_eq!(text, self::text(&single));
        assert!(text.contains(
            r#"llmgate_requests_total{key="alice",endpoint="/v1/chat/completions",status="200",model="other"} 3"#
        ), "{text}");
        assert!(
            text.contains(r#"llmgate_prompt_tokens_total{key="alice",model="other"} 20"#),
            "{text}"
        );
    }

    fn asking(model: Option<&str>, tokens: u64) -> RequestRecord {
        RequestRecord {
            model: model.map(Into::into),
            ..record("/v1/chat/completions", 200, tokens, 10)
        }
    }

    /// The exposition's samples (not the comments) of one metric.
    fn samples<'t>(text: &'t str, metric: &str) -> Vec<&'t str> {
        text.lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            })
            .collect()
    }

    #[test]
    fn requests_and_tokens_count_per_known_model_and_everything_else_as_other() {
        let metrics = Metrics::default();
        metrics.set_model_names(["chat".to_owned(), "coder".to_owned()]);
        let records = vec![
            asking(Some("chat"), 1),
            asking(Some("chat"), 2),
            asking(Some("coder"), 3),
            asking(None, 4),
            asking(Some("gpt-4o"), 5),
            asking(Some("chat"), 6),
        ];
        let names = vec!["alice".to_owned(); records.len()];
        metrics.observe_batch(&records, &names);
        let text = text(&metrics);
        let labels = |model: &str| {
            format!(
                r#"{{key="alice",endpoint="/v1/chat/completions",status="200",model="{model}"}}"#
            )
        };
        for (model, requests, prompt) in [("chat", 3, 9), ("coder", 1, 3), ("other", 2, 9)] {
            let line = format!("llmgate_requests_total{} {requests}", labels(model));
            assert!(text.contains(&line), "{line} in {text}");
            let line =
                format!(r#"llmgate_prompt_tokens_total{{key="alice",model="{model}"}} {prompt}"#);
            assert!(text.contains(&line), "{line} in {text}");
            let line = format!(
                r#"llmgate_completion_tokens_total{{key="alice",model="{model}"}} {}"#,
                prompt * 2
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert_eq!(samples(&text, "llmgate_requests_total").len(), 3, "{text}");
    }

    #[test]
    fn a_client_naming_ten_thousand_models_adds_no_series() {
        let metrics = Metrics::default();
        metrics.set_model_names(["chat".to_owned()]);
        let names = vec!["mallory".to_owned(); 100];
        for batch in 0..100 {
            let records: Vec<_> = (0..100)
                .map(|i| asking(Some(&format!("made-up-{batch}-{i}")), 1))
                .collect();
            metrics.observe_batch(&records, &names);
        }
        metrics.observe(&asking(Some("chat"), 1), "mallory");
        let text = text(&metrics);
        assert!(!text.contains("made-up"), "{text}");
        assert_eq!(samples(&text, "llmgate_requests_total").len(), 2, "{text}");
        assert_eq!(
            samples(&text, "llmgate_prompt_tokens_total").len(),
            2,
            "{text}"
        );
        assert!(text.contains(
            r#"llmgate_requests_total{key="mallory",endpoint="/v1/chat/completions",status="200",model="other"} 10000"#
        ), "{text}");
        assert!(
            text.contains(r#"llmgate_prompt_tokens_total{key="mallory",model="chat"} 1"#),
            "{text}"
        );
        // Loads and evictions of models not set are `other` too.
        metrics.model_loaded("made-up", 1.0);
        metrics.model_evicted("made-up-too");
        let text = self::text(&metrics);
        assert!(!text.contains("made-up"), "{text}");
    }

    #[test]
    fn names_set_later_label_what_comes_after() {
        let metrics = Metrics::default();
        let alice = ["alice".to_owned()];
        metrics.observe_batch(&[asking(Some("late"), 1)], &alice);
        metrics.set_model_names(["late".to_owned()]);
        // The same kind of record as the last one: its series is looked up again.
        metrics.observe_batch(&[asking(Some("late"), 1)], &alice);
        let text = text(&metrics);
        assert!(
            text.contains(r#"llmgate_prompt_tokens_total{key="alice",model="other"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"llmgate_prompt_tokens_total{key="alice",model="late"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn loads_evictions_and_the_models_gauges_are_exported_per_model() {
        let metrics = Metrics::default();
        metrics.set_model_names(["chat".to_owned(), "coder".to_owned()]);
        metrics.model_loaded("chat", 0.3);
        metrics.model_loaded("chat", 2.5);
        metrics.model_loaded("coder", 1.0);
        metrics.model_evicted("chat");
        let gauges = Arc::new(Mutex::new(vec![
            ModelGauge {
                name: "chat".into(),
                state: "ready",
                in_flight: 3,
                queued: 7,
            },
            ModelGauge {
                name: "coder".into(),
                state: "stopping-for-a-reason-of-its-own",
                in_flight: 0,
                queued: 0,
            },
        ]));
        let source = gauges.clone();
        metrics.set_model_gauges(Arc::new(move || source.lock().unwrap().clone()));
        metrics.update_model_gauges();
        let text = text(&metrics);
        for line in [
            r#"llmgate_model_loads_total{model="chat"} 2"#,
            r#"llmgate_model_loads_total{model="coder"} 1"#,
            r#"llmgate_model_load_duration_seconds_count{model="chat"} 2"#,
            r#"llmgate_model_load_duration_seconds_sum{model="chat"} 2.8"#,
            r#"llmgate_model_evictions_total{model="chat"} 1"#,
            r#"llmgate_model_state{model="chat",state="ready"} 1"#,
            r#"llmgate_model_state{model="chat",state="loading"} 0"#,
            r#"llmgate_model_state{model="coder",state="stopped"} 0"#,
            r#"llmgate_model_state{model="coder",state="stopping-for-a-reason-of-its-own"} 1"#,
            r#"llmgate_model_requests_in_flight{model="chat"} 3"#,
            r#"llmgate_model_queue_length{model="chat"} 7"#,
            r#"llmgate_model_queue_length{model="coder"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let states = samples(&text, "llmgate_model_state");
        assert_eq!(states.len(), 2 * MODEL_STATES.len() + 1, "{text}");
        assert_eq!(states.iter().filter(|l| l.ends_with(" 1")).count(), 2);

        // A model gone from the source loses its series at the next scrape.
        gauges.lock().unwrap().remove(1);
        metrics.update_model_gauges();
        let text = self::text(&metrics);
        assert!(!text.contains(r#"model_state{model="coder""#), "{text}");
        assert!(!text.contains(r#"queue_length{model="coder""#), "{text}");
        assert_eq!(
            samples(&text, "llmgate_model_state").len(),
            MODEL_STATES.len()
        );
    }

    #[test]
    fn records_the_database_refused_spilled_or_lost_are_counted() {
        let metrics = Metrics::default();
        metrics.rejected(1);
        metrics.spilled(250);
        metrics.spilled(50);
        let text = text(&metrics);
        for line in [
            "llmgate_usage_records_rejected_total 1",
            "llmgate_usage_records_spilled_total 300",
            "llmgate_usage_records_lost_total 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
