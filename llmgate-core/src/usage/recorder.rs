//! The queue between the request path and the usage store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::{TokenCounter, TokenUsage};
use crate::auth::KeyRecord;
use crate::storage::{RequestRecord, UsageStore};

/// The most records written in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the writer lets records gather before a write.
const LINGER: Duration = Duration::from_millis(50);

// Records are nearly every message: boxing each would cost an allocation per request,
// freed on the writer's thread.
#[allow(clippy::large_enum_variant)]
enum Message {
    Record(Pending),
    Flush(oneshot::Sender<()>),
}

/// A record whose tokens the writer must still count.
struct Pending {
    record: RequestRecord,
    key_name: String,
    count: Option<(Arc<Value>, String)>,
}

/// Sees every finished request, in the background writer (never on the request path):
/// for metrics.
pub trait UsageObserver: Send + Sync {
    /// One finished request, with the name of the key that made it.
    fn observe(&self, record: &RequestRecord, key_name: &str);

    /// A batch of finished requests, `key_names[i]` naming the key of `records[i]`.
    /// By default, [`observe`](Self::observe) for each; an observer can do better by
    /// looking up what consecutive records share once.
    fn observe_batch(&self, records: &[RequestRecord], key_names: &[String]) {
        for (record, key_name) in records.iter().zip(key_names) {
            self.observe(record, key_name);
        }
    }
}

/// Optional parts of a [`UsageRecorder`].
#[derive(Default)]
pub struct RecorderOptions {
    /// Counts tokens of streams whose upstream sent no usage.
    pub counter: Option<Arc<dyn TokenCounter>>,
    /// Sees every finished request.
    pub observer: Option<Arc<dyn UsageObserver>>,
}

impl std::fmt::Debug for RecorderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderOptions")
            .field("counter", &self.counter.is_some())
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// Hands finished requests to the background [`UsageWriter`]. Cheap to clone; sending
/// never waits.
#[derive(Clone)]
pub struct UsageRecorder {
    // One shared allocation: a clone per request is one reference count, not three.
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    tx: mpsc::UnboundedSender<Message>,
    flush_wanted: Arc<Notify>,
    counts_tokens: bool,
}

impl std::fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRecorder")
            .field("counts_tokens", &self.inner.counts_tokens)
            .finish_non_exhaustive()
    }
}

/// The background task that writes usage records in batches. Call
/// [`UsageWriter::shutdown`] on the way out so that nothing queued is lost.
#[derive(Debug)]
pub struct UsageWriter {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl UsageRecorder {
    /// Starts the writer on the current Tokio runtime.
    pub fn start(store: Arc<dyn UsageStore>) -> (Self, UsageWriter) {
        Self::start_with(store, RecorderOptions::default())
    }

    /// Starts the writer with a token counter and/or an observer.
    pub fn start_with(store: Arc<dyn UsageStore>, options: RecorderOptions) -> (Self, UsageWriter) {
        let RecorderOptions { counter, observer } = options;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let counts_tokens = counter.is_some();
        let flush_wanted = Arc::new(Notify::new());
        let task = tokio::spawn(run_writer(
            rx,
            stop_rx,
            flush_wanted.clone(),
            Sink {
                store,
                counter,
                observer,
            },
        ));
        let recorder = Self {
            inner: Arc::new(RecorderInner {
                tx,
                flush_wanted,
                counts_tokens,
            }),
        };
        (
            recorder,
            UsageWriter {
                stop: Some(stop_tx),
                task,
            },
        )
    }

    /// Waits until every record handed over before this call is in the store.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.inner.tx.send(Message::Flush(done)).is_ok() {
            self.inner.flush_wanted.notify_one();
            let _ = wait.await;
        }
    }

    pub(crate) fn counts_tokens(&self) -> bool {
        self.inner.counts_tokens
    }

    fn send(&self, pending: Pending) {
        if self.inner.tx.send(Message::Record(pending)).is_err() {
            tracing::error!("usage writer has stopped; a usage record was lost");
        }
    }
}

impl UsageWriter {
    /// Stops taking records, writes everything queued, and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(err) = (&mut self.task).await {
            tracing::error!(error = %err, "usage writer failed");
        }
    }
}

async fn run_writer(
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut stop: oneshot::Receiver<()>,
    flush_wanted: Arc<Notify>,
    sink: Sink,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            received = rx.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    return;
                }
            }
            _ = &mut stop => stopping = true,
        }
        // Let a batch gather without being woken per record, unless someone waits on a
        // flush: under load that is one transaction per LINGER instead of one per wake-up.
        let waiting_on_flush = batch.iter().any(|m| matches!(m, Message::Flush(_)));
        if !stopping && !waiting_on_flush && batch.len() < MAX_BATCH {
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = flush_wanted.notified() => {}
                _ = &mut stop => stopping = true,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
        }
        write(&mut batch, &sink, false).await;
    }
    rx.close();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write(&mut batch, &sink, true).await;
    }
}

/// Where settled records go.
struct Sink {
    store: Arc<dyn UsageStore>,
    counter: Option<Arc<dyn TokenCounter>>,
    observer: Option<Arc<dyn UsageObserver>>,
}

async fn write(batch: &mut Vec<Message>, sink: &Sink, stopping: bool) {
    let store = sink.store.as_ref();
    let mut records = Vec::with_capacity(batch.len());
    let mut key_names = Vec::with_capacity(batch.len());
    let mut flushes = Vec::new();
    for message in batch.drain(..) {
        match message {
            Message::Record(pending) => {
                let (record, key_name) = settle_count(pending, sink.counter.as_deref()).await;
                records.push(record);
                key_names.push(key_name);
            }
            Message::Flush(done) => flushes.push(done),
        }
    }
    if let Some(observer) = &sink.observer {
        observer.observe_batch(&records, &key_names);
    }
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0;
    while !records.is_empty() {
        match store.record(&records).await {
            Ok(()) => break,
            Err(err) => {
                attempts += 1;
                if stopping && attempts >= 5 {
                    tracing::error!(error = %err, lost = records.len(), "usage store failed while shutting down; records lost");
                    break;
                }
                tracing::warn!(error = %err, pending = records.len(), "usage store failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    for done in flushes {
        let _ = done.send(());
    }
}

async fn settle_count(
    pending: Pending,
    counter: Option<&dyn TokenCounter>,
) -> (RequestRecord, String) {
    let Pending {
        mut record,
        count,
        key_name,
    } = pending;
    if let (Some(counter), Some((request, completion))) = (counter, count) {
        match counter.count(&request, &completion).await {
            Ok(usage) => {
                record.prompt_tokens = Some(usage.prompt_tokens);
                record.completion_tokens = Some(usage.completion_tokens);
            }
            Err(err) => {
                tracing::warn!(error = %err, "token counter failed; tokens recorded as unknown")
            }
        }
    }
    (record, key_name)
}

/// Held by a request from the moment its key is accepted; settles exactly one record,
/// when the response body ends or when it is dropped (the client went away).
pub(crate) struct UsageGuard {
    recorder: UsageRecorder,
    record: Option<RequestRecord>,
    key_name: String,
    started: Instant,
    /// The request as JSON and the streamed text, for the token counter.
    count: Option<(Arc<Value>, String)>,
}

impl UsageGuard {
    pub(crate) fn new(
        recorder: UsageRecorder,
        key: &KeyRecord,
        method: &str,
        path: String,
        at: DateTime<Utc>,
        started: Instant,
    ) -> Self {
        let record = RequestRecord {
            at,
            key_id: key.id.clone(),
            method: method.to_owned(),
            path,
            model: None,
            // Until a response arrives: the client closed the request.
            status: 499,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 0,
            first_byte_ms: None,
        };
        Self {
            recorder,
            record: Some(record),
            key_name: key.name.clone(),
            started,
            count: None,
        }
    }

    fn record(&mut self) -> &mut RequestRecord {
        self.record.as_mut().expect("a guard settles once")
    }

    pub(crate) fn counts_tokens(&self) -> bool {
        self.recorder.counts_tokens()
    }

    pub(crate) fn set_status(&mut self, status: u16) {
        self.record().status = status;
    }

    /// The upstream's response headers arrived.
    pub(crate) fn responded(&mut self, status: u16) {
        let elapsed = self.started.elapsed().as_millis() as u64;
        let record = self.record();
        record.status = status;
        record.first_byte_ms = Some(elapsed);
    }

    /// The model of the request, unless one is known already (a name given as `&str` is
    /// copied only then).
    pub(crate) fn set_model(&mut self, model: Option<impl Into<String>>) {
        let record = self.record();
        if record.model.is_none() {
            record.model = model.map(Into::into);
        }
    }

    pub(crate) fn set_usage(&mut self, usage: TokenUsage) {
        let record = self.record();
        record.prompt_tokens = Some(usage.prompt_tokens);
        record.completion_tokens = Some(usage.completion_tokens);
    }

    /// Tokens are known to be zero (no generation happened).
    pub(crate) fn set_no_tokens(&mut self) {
        self.set_usage(TokenUsage::default());
    }

    /// Let the writer count tokens, if it has a counter and the upstream reported none.
    pub(crate) fn count_later(&mut self, request: Arc<Value>, completion: String) {
        self.count = Some((request, completion));
    }

    pub(crate) fn has_model(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.model.is_some())
    }

    pub(crate) fn has_usage(&self) -> bool {
        self.record
            .as_ref()
            .is_some_and(|r| r.prompt_tokens.is_some())
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.latency_ms = self.started.elapsed().as_millis() as u64;
            let count = if record.prompt_tokens.is_none() {
                self.count.take()
            } else {
                None
            };
            let key_name = std::mem::take(&mut self.key_name);
            self.recorder.send(Pending {
                record,
                key_name,
                count,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::now_millis;
    use crate::storage::MemoryStore;
    use crate::BoxError;

    fn guard(recorder: &UsageRecorder, key: &str) -> UsageGuard {
        let mut record = KeyRecord::new(
            "tester",
            crate::auth::Role::User,
            &crate::auth::Secret::generate(),
        );
        record.id = key.to_owned();
        UsageGuard::new(
            recorder.clone(),
            &record,
            "POST",
            "/v1/chat/completions".to_owned(),
            now_millis(),
            Instant::now(),
        )
    }

    #[tokio::test]
    async fn every_guard_becomes_one_record_and_shutdown_drains_the_queue() {
        let store = Arc::new(MemoryStore::new());
        let (recorder, writer) = UsageRecorder::start(store.clone());
        for i in 0..2_500u64 {
            let mut g = guard(&recorder, "k");
            g.set_status(200);
            g.set_usage(TokenUsage {
                prompt_tokens: i % 7,
                completion_tokens: 1,
            });
        }
        drop(guard(&recorder, "k")); // a client that left before the answer
        writer.shutdown().await;
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!(totals.requests, 2_501);
        assert_eq!(totals.completion_tokens, 2_500);
        assert_eq!(
            totals.prompt_tokens,
            (0..2_500u64).map(|i| i % 7).sum::<u64>()
        );
        assert_eq!(totals.requests_without_usage, 1);
        let rows = store.requests("k", None, 1).await.unwrap();
        assert_eq!(rows[0].status, 499);
    }

    struct Words;
    #[async_trait::async_trait]
    impl TokenCounter for Words {
        async fn count(&self, request: &Value, completion: &str) -> Result<TokenUsage, BoxError> {
            let prompt = request["prompt"].as_str().ok_or("no prompt")?;
            Ok(TokenUsage {
                prompt_tokens: prompt.split_whitespace().count() as u64,
                completion_tokens: completion.split_whitespace().count() as u64,
            })
        }
    }

    #[tokio::test]
    async fn a_counter_fills_in_missing_usage_in_the_background() {
        let store = Arc::new(MemoryStore::new());
        let (recorder, _writer) = UsageRecorder::start_with(
            store.clone(),
            RecorderOptions {
                counter: Some(Arc::new(Words)),
                observer: None,
            },
        );
        let mut g = guard(&recorder, "k");
        g.count_later(
            Arc::new(serde_json::json!({"prompt": "one two three"})),
            "four five".into(),
        );
        drop(g);
        let mut failing = guard(&recorder, "k");
        failing.count_later(Arc::new(serde_json::json!({})), "x".into());
        drop(failing);
        recorder.flush().await;
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!((totals.prompt_tokens, totals.completion_tokens), (3, 2));
        assert_eq!(
            totals.requests_without_usage, 1,
            "a failed count stays unknown, not zero"
        );
    }
}
