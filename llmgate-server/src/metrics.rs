//! Prometheus metrics, with `prometheus-client`: fed by the usage writer (never on the
//! request path) and by the system monitor at scrape time.

use std::sync::atomic::AtomicU64;

use llmgate_core::runner::RunnerStatus;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    key: String,
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    name: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

/// Every metric llmgate exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<KeyLabels, Counter>,
    completion_tokens: Family<KeyLabels, Counter>,
    request_seconds: HistogramFamily,
    upstream_seconds: HistogramFamily,
    model_state: Family<StateLabels, Gauge>,
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
    last_series: std::sync::Mutex<Option<LastSeries>>,
}

/// A series with the key, endpoint and status it counts.
struct LastSeries {
    key: String,
    endpoint: &'static str,
    status: u16,
    series: Series,
}

impl std::fmt::Debug for LastSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastSeries")
            .field("key", &self.key)
            .field("endpoint", &self.endpoint)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms … about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The states `/metrics` reports: those of a model server (a set-up in progress shows
/// as `none`).
const MODEL_STATES: [ModelState; 7] = ModelState::ALL;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("llmgate");
        let metrics = Self {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            model_state: Family::default(),
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
            last_series: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by key name, endpoint and status",
            metrics.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens by key name",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens by key name",
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
            "1 for the model server's current state",
            metrics.model_state.clone(),
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

/// The series one kind of request (key, endpoint, status) counts into.
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
    fn series(&self, record: &RequestRecord, key_name: &str) -> Series {
        // Known endpoints by name, everything else as `other`: a key holder making up
        // paths must not grow the exposition without bound.
        let endpoint_name = endpoint_label(&record.path);
        let endpoint = EndpointLabels {
            endpoint: endpoint_name.to_owned(),
        };
        let key = KeyLabels {
            key: key_name.to_owned(),
        };
        let requests = RequestLabels {
            key: key_name.to_owned(),
            endpoint: endpoint_name.to_owned(),
            status: record.status,
        };
        Series {
            requests: self.requests.get_or_create(&requests).clone(),
            prompt_tokens: self.prompt_tokens.get_or_create(&key).clone(),
            completion_tokens: self.completion_tokens.get_or_create(&key).clone(),
            request_seconds: self.request_seconds.get_or_create(&endpoint).clone(),
            upstream_seconds: self.upstream_seconds.get_or_create(&endpoint).clone(),
        }
    }
}

impl UsageObserver for Metrics {
    fn observe(&self, record: &RequestRecord, key_name: &str) {
        self.series(record, key_name).count(record);
    }

    /// Consecutive records of the same key, endpoint and status (nearly all of them
    /// under load) share one lookup of their series, within a batch and across batches.
    fn observe_batch(&self, records: &[RequestRecord], key_names: &[String]) {
        let mut last = self.last_series.lock().unwrap_or_else(|e| e.into_inner());
        for (record, key_name) in records.iter().zip(key_names) {
            let endpoint = endpoint_label(&record.path);
            match &*last {
                Some(seen)
                    if seen.status == record.status
                        && seen.endpoint == endpoint
                        && seen.key == *key_name =>
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
    pub fn render(
        &self,
        system: &SystemReport,
        model: Option<&RunnerStatus>,
        format: Format,
    ) -> String {
        let state = match model {
            None => ModelState::Stopped,
            Some(RunnerStatus::Ready) => ModelState::Ready,
            Some(RunnerStatus::Failed { .. }) => ModelState::Failed,
            Some(_) => ModelState::Loading,
        };
        for s in MODEL_STATES {
            self.model_state
                .get_or_create(&StateLabels {
                    state: s.as_str().to_owned(),
                })
                .set(i64::from(s == state));
        }
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
            r#"llmgate_requests_total{key="alice",endpoint="/v1/chat/completions",status="200"} 3"#
        ), "{text}");
        assert!(
            text.contains(r#"llmgate_prompt_tokens_total{key="alice"} 20"#),
            "{text}"
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
