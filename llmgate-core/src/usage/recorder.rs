//! The queue between the request path and the usage store.
//!
//! Two background tasks: the intake settles each finished request (token counts,
//! [`RequestRecord::normalized`]) and queues it; the writer writes the queue in batches.
//! Nothing a client or an upstream sends, and no outage, stops recording:
//! - a batch the store refuses for what it holds is split until the refused records
//!   are alone; the others are written, the refused ones set aside for an admin
//!   ([`UsageRecorder::rejected`]), never retried;
//! - while the store is down the writer retries with growing waits, the intake keeps
//!   taking records, and beyond [`RecorderOptions::queue_max`] the oldest go to a spill
//!   file, written to the store when it is back (or on the next start);
//! - a shutdown with the store down spills what is left instead of waiting for it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::spill::{RejectedLog, SpillFile};
pub use super::spill::{RejectedRecord, MAX_REJECTED_SHOWN, REJECTED_FILE, SPILL_FILE};
use super::{TokenCounter, TokenUsage};
use crate::auth::KeyRecord;
use crate::limits::Admission;
use crate::storage::{RequestRecord, StorageError, UsageStore};

/// The most records written in one transaction.
const MAX_BATCH: usize = 4096;
/// Token counts asked of the model server at once (for streams whose upstream sent no
/// usage).
const COUNTS_AT_ONCE: usize = 8;
/// Records waiting for the intake beyond which streamed requests are no longer counted
/// but recorded with tokens unknown.
pub const MAX_WAITING_FOR_COUNT: usize = 10_000;
/// How long the intake lets records gather before it settles them.
const INTAKE_LINGER: Duration = Duration::from_millis(5);
/// How long the writer lets records gather before a write.
const LINGER: Duration = Duration::from_millis(50);
/// The first wait before the store is tried again after it failed; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between tries while the store is down.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a shutdown keeps trying the store before what is left goes to the spill
/// file: a stop must finish even when the database is down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How many records may wait in memory for the store by default; beyond, they go to the
/// spill file. About 30 MB, and minutes of traffic at a busy gateway's rate.
pub const DEFAULT_QUEUE_MAX: usize = 100_000;

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
    /// The record's model, still shared with the request (see [`UsageGuard`]): the writer
    /// makes the record's copy.
    model: Option<Arc<str>>,
    key_name: String,
    count: Option<(Arc<Value>, String)>,
    /// The limiter's count of the request, settled once its tokens are known (boxed:
    /// every record passes through the channel, few with an admission).
    admission: Option<Box<Admission>>,
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

    /// Records the store refused for what they hold, set aside
    /// ([`UsageRecorder::rejected`]).
    fn rejected(&self, _records: usize) {}

    /// Records written to the spill file: the store was down (or slow) for longer than
    /// the queue holds, or at shutdown. They are written to the store when it is back.
    fn spilled(&self, _records: usize) {}

    /// Records lost: there was no spill file, or it could not be written.
    fn lost(&self, _records: usize) {}
}

/// Optional parts of a [`UsageRecorder`].
pub struct RecorderOptions {
    /// Counts tokens of streams whose upstream sent no usage.
    pub counter: Option<Arc<dyn TokenCounter>>,
    /// Sees every finished request.
    pub observer: Option<Arc<dyn UsageObserver>>,
    /// The most records that wait in memory while the store is down or slow
    /// ([`DEFAULT_QUEUE_MAX`]); older ones go to the spill file in `data_dir`.
    pub queue_max: usize,
    /// Where records wait on disk (the spill file, [`SPILL_FILE`]) and where those the
    /// store refuses are kept ([`REJECTED_FILE`]). Without one, records beyond
    /// `queue_max` are lost (and counted), and refused ones kept in memory.
    pub data_dir: Option<PathBuf>,
}

impl Default for RecorderOptions {
    fn default() -> Self {
        Self {
            counter: None,
            observer: None,
            queue_max: DEFAULT_QUEUE_MAX,
            data_dir: None,
        }
    }
}

impl std::fmt::Debug for RecorderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderOptions")
            .field("counter", &self.counter.is_some())
            .field("observer", &self.observer.is_some())
            .field("queue_max", &self.queue_max)
            .field("data_dir", &self.data_dir)
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
    queue: Arc<Queue>,
    rejected: Arc<RejectedLog>,
    background: Background,
}

/// Reads that go on after their client left (the rest of a JSON answer, for its usage):
/// waited for, then cut short, on shutdown, so that their records are not lost.
#[derive(Clone, Debug, Default)]
struct Background {
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
}

/// How long a shutdown lets background reads finish before it cuts them short (they
/// are then recorded with what was seen).
const BACKGROUND_GRACE: Duration = Duration::from_secs(2);

impl Background {
    async fn finish(&self) {
        self.tasks.close();
        if tokio::time::timeout(BACKGROUND_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            self.stop.cancel();
            self.tasks.wait().await;
        }
    }
}

impl std::fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRecorder")
            .field("counts_tokens", &self.inner.counts_tokens)
            .finish_non_exhaustive()
    }
}

/// The background tasks that write usage records in batches. Call
/// [`UsageWriter::shutdown`] on the way out so that nothing queued is lost.
#[derive(Debug)]
pub struct UsageWriter {
    background: Background,
    stop: Option<oneshot::Sender<()>>,
    intake: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl UsageRecorder {
    /// Starts the writer on the current Tokio runtime.
    pub fn start(store: Arc<dyn UsageStore>) -> (Self, UsageWriter) {
        Self::start_with(store, RecorderOptions::default())
    }

    /// Starts the writer with a token counter, an observer, a queue bound, a data
    /// directory. Records a spill file there still holds (the store was down when the
    /// last process stopped) are written to the store first.
    pub fn start_with(store: Arc<dyn UsageStore>, options: RecorderOptions) -> (Self, UsageWriter) {
        let RecorderOptions {
            counter,
            observer,
            queue_max,
            data_dir,
        } = options;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let counts_tokens = counter.is_some();
        let flush_wanted = Arc::new(Notify::new());
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            wake: Notify::new(),
            closing: Notify::new(),
            max: queue_max.max(1),
        });
        let aside = Arc::new(SetAside {
            spill: data_dir.as_deref().map(SpillFile::new),
            rejected: Arc::new(RejectedLog::new(data_dir.as_deref())),
            observer: observer.clone(),
        });
        let intake = tokio::spawn(run_intake(
            rx,
            stop_rx,
            Intake {
                queue: queue.clone(),
                counter,
                observer,
                aside: aside.clone(),
            },
        ));
        let writer = tokio::spawn(run_writer(
            store,
            queue.clone(),
            flush_wanted.clone(),
            aside.clone(),
        ));
        let background = Background::default();
        let recorder = Self {
            inner: Arc::new(RecorderInner {
                tx,
                flush_wanted,
                counts_tokens,
                queue,
                rejected: aside.rejected.clone(),
                background: background.clone(),
            }),
        };
        (
            recorder,
            UsageWriter {
                background,
                stop: Some(stop_tx),
                intake,
                writer,
            },
        )
    }

    /// Waits until every record handed over before this call is in the store, or set
    /// aside (refused, or spilled to disk), or the store is found down: a reader of
    /// usage then sees the store as it is rather than waiting out an outage.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.inner.tx.send(Message::Flush(done)).is_ok() {
            self.inner.flush_wanted.notify_one();
            let _ = wait.await;
        }
    }

    /// The records the store refused for what they hold, with its reasons: the newest
    /// [`MAX_REJECTED_SHOWN`], oldest first.
    pub async fn rejected(&self) -> std::io::Result<Vec<RejectedRecord>> {
        self.inner.rejected.list().await
    }

    /// Records waiting in memory for the store (at most the queue bound).
    pub fn queued(&self) -> usize {
        self.inner.queue.lock().records
    }

    /// Runs `read` (the rest of an answer whose client left, read for its usage) on the
    /// current runtime, as a task the writer's shutdown waits for and then cuts short.
    pub(crate) fn read_in_background(
        &self,
        read: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let stop = self.inner.background.stop.clone();
        self.inner.background.tasks.spawn(async move {
            tokio::select! {
                () = read => {}
                () = stop.cancelled() => {}
            }
        });
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
    /// Stops taking records and writes everything queued; what the store cannot take
    /// within a few seconds goes to the spill file, to be written on the next start.
    pub async fn shutdown(mut self) {
        // First the answers still being read after their clients left: their records
        // must reach the intake before it stops taking any.
        self.background.finish().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in [&mut self.intake, &mut self.writer] {
            if let Err(err) = task.await {
                tracing::error!(error = %err, "usage writer failed");
            }
        }
    }
}

/// Records settled and waiting for the store, in order, with the flushes waiting on them.
struct Queue {
    state: Mutex<QueueState>,
    /// Records (or a flush) arrived, or the queue closed.
    wake: Notify,
    /// The queue closed: ends the writer's waits between retries.
    closing: Notify,
    max: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Item>,
    /// `Item::Record`s in `items`.
    records: usize,
    /// No more records will come.
    closed: bool,
    /// The last write failed: flushes are answered at once instead of waiting.
    store_down: bool,
}

enum Item {
    Record(RequestRecord),
    Flush(oneshot::Sender<()>),
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().expect("usage queue lock")
    }

    /// Up to `MAX_BATCH` records from the front, and the flushes among them.
    fn take(&self) -> (Vec<RequestRecord>, Vec<oneshot::Sender<()>>) {
        let mut state = self.lock();
        let mut records = Vec::with_capacity(state.records.min(MAX_BATCH));
        let mut flushes = Vec::new();
        while records.len() < MAX_BATCH {
            match state.items.pop_front() {
                Some(Item::Record(r)) => records.push(r),
                Some(Item::Flush(done)) => flushes.push(done),
                None => break,
            }
        }
        state.records -= records.len();
        (records, flushes)
    }

    /// Puts records the store could not take back at the front.
    fn put_back(&self, records: Vec<RequestRecord>) {
        let mut state = self.lock();
        state.records += records.len();
        for r in records.into_iter().rev() {
            state.items.push_front(Item::Record(r));
        }
    }

    /// The oldest records beyond the bound, taken out; the flushes among them are
    /// answered (their records are set aside).
    fn take_excess(&self) -> Vec<RequestRecord> {
        let mut state = self.lock();
        let excess = state.records.saturating_sub(self.max);
        let mut out = Vec::with_capacity(excess);
        while out.len() < excess {
            match state.items.pop_front() {
                Some(Item::Record(r)) => out.push(r),
                Some(Item::Flush(done)) => {
                    let _ = done.send(());
                }
                None => break,
            }
        }
        state.records -= out.len();
        out
    }

    /// The store failed (or works again).
    fn set_down(&self, down: bool) {
        let mut state = self.lock();
        state.store_down = down;
        if down {
            // Nobody waits out an outage: answer every flush queued now.
            let records = state.records;
            let items = std::mem::take(&mut state.items);
            state.items = items
                .into_iter()
                .filter_map(|item| match item {
                    Item::Flush(done) => {
                        let _ = done.send(());
                        None
                    }
                    record => Some(record),
                })
                .collect();
            debug_assert_eq!(records, state.records);
        }
    }

    fn has_flush(&self) -> bool {
        self.lock()
            .items
            .iter()
            .any(|item| matches!(item, Item::Flush(_)))
    }
}

/// Where records go that the store does not take.
struct SetAside {
    spill: Option<SpillFile>,
    rejected: Arc<RejectedLog>,
    observer: Option<Arc<dyn UsageObserver>>,
}

impl SetAside {
    /// To the spill file; lost (and said so) without one or when it cannot be written.
    async fn spill(&self, records: Vec<RequestRecord>) {
        if records.is_empty() {
            return;
        }
        let n = records.len();
        match &self.spill {
            Some(spill) => match spill.append(&records).await {
                Ok(()) => {
                    tracing::warn!(records = n, "usage store unavailable; records spilled to disk, to be written when it is back");
                    if let Some(o) = &self.observer {
                        o.spilled(n);
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, lost = n, "cannot write the usage spill file; records lost");
                    if let Some(o) = &self.observer {
                        o.lost(n);
                    }
                }
            },
            None => {
                tracing::error!(
                    lost = n,
                    "usage store unavailable and the queue is full; records lost (no data directory to spill to)"
                );
                if let Some(o) = &self.observer {
                    o.lost(n);
                }
            }
        }
    }

    /// Refused for good: logged (key id and reason), counted, kept for an admin.
    async fn reject(&self, rejected: Vec<(RequestRecord, StorageError)>) {
        if rejected.is_empty() {
            return;
        }
        let now = Utc::now();
        let kept = rejected
            .into_iter()
            .map(|(record, err)| {
                tracing::error!(key_id = %record.key_id, error = %err, "usage store refused a record; kept aside");
                RejectedRecord {
                    rejected_at: now,
                    error: err.to_string(),
                    record,
                }
            })
            .collect::<Vec<_>>();
        if let Some(o) = &self.observer {
            o.rejected(kept.len());
        }
        self.rejected.keep(kept).await;
    }
}

/// What the intake task needs: it settles records (token counts, normalization), shows
/// them to the observer and queues them, spilling beyond the bound. It never waits on
/// the store, so memory stays bounded whatever the store does.
struct Intake {
    queue: Arc<Queue>,
    counter: Option<Arc<dyn TokenCounter>>,
    observer: Option<Arc<dyn UsageObserver>>,
    aside: Arc<SetAside>,
}

async fn run_intake(
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut stop: oneshot::Receiver<()>,
    intake: Intake,
) {
    let mut messages = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            received = rx.recv_many(&mut messages, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                // Let a few more arrive: per batch, not per record, the intake pays its
                // wake-up, its metrics lookups and its queue lock (under load, hundreds
                // of records a batch). Not when someone waits on a flush.
                let flush = messages.iter().any(|m| matches!(m, Message::Flush(_)));
                if !flush && messages.len() < MAX_BATCH {
                    tokio::time::sleep(INTAKE_LINGER).await;
                    while messages.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(message) => messages.push(message),
                            Err(_) => break,
                        }
                    }
                }
                intake.settle(&mut messages, &rx).await;
            }
            _ = &mut stop => {
                rx.close();
                while rx.recv_many(&mut messages, MAX_BATCH).await > 0 {
                    intake.settle(&mut messages, &rx).await;
                }
                break;
            }
        }
    }
    intake.queue.lock().closed = true;
    intake.queue.wake.notify_one();
    intake.queue.closing.notify_one();
}

impl Intake {
    /// Counts, normalises and queues `messages`; `channel` holds those still to come.
    async fn settle(
        &self,
        messages: &mut Vec<Message>,
        channel: &mpsc::UnboundedReceiver<Message>,
    ) {
        let mut items = Vec::with_capacity(messages.len());
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages.drain(..) {
            match message {
                Message::Record(mut record) => {
                    record.record.model = record.model.take().map(|m| String::from(&*m));
                    pending.push(record);
                }
                Message::Flush(done) => items.push((pending.len(), done)),
            }
        }
        // Counted a few at a time, in chunks. A model server that counts slower than
        // streams end (it counts between generations) must not make records pile up
        // without bound: while more than MAX_WAITING_FOR_COUNT wait, streamed tokens
        // are recorded as unknown instead.
        let mut settled: Vec<(RequestRecord, String)> = Vec::with_capacity(pending.len());
        let mut skipped = 0;
        let total = pending.len();
        let mut pending = pending.into_iter();
        while settled.len() < total {
            let waiting = channel.len() + (total - settled.len());
            let counter = self
                .counter
                .as_deref()
                .filter(|_| waiting <= MAX_WAITING_FOR_COUNT);
            let chunk: Vec<Pending> = pending.by_ref().take(COUNTS_AT_ONCE * 4).collect();
            let to_count = chunk.iter().filter(|p| p.count.is_some()).count();
            if to_count == 0 || counter.is_none() {
                // Nothing to ask the model server (nearly always): no futures.
                skipped += to_count;
                settled.extend(chunk.into_iter().map(|p| {
                    if let Some(admission) = p.admission {
                        admission.settle(tokens_of(&p.record));
                    }
                    (p.record, p.key_name)
                }));
                continue;
            }
            let done: Vec<_> =
                futures_util::stream::iter(chunk.into_iter().map(|p| settle_count(p, counter)))
                    .buffered(COUNTS_AT_ONCE)
                    .collect()
                    .await;
            settled.extend(done);
        }
        if skipped > 0 && self.counter.is_some() {
            tracing::warn!(
                skipped,
                "the model server counts tokens slower than streams end; their tokens are recorded as unknown"
            );
        }
        let mut records = Vec::with_capacity(settled.len());
        let mut key_names = Vec::with_capacity(settled.len());
        for (record, key_name) in settled {
            records.push(record.normalized());
            key_names.push(key_name);
        }
        if let Some(observer) = &self.observer {
            observer.observe_batch(&records, &key_names);
        }
        {
            let mut state = self.queue.lock();
            state.records += records.len();
            let mut flushes = items.into_iter().peekable();
            for (i, record) in records.into_iter().enumerate() {
                while let Some((_, done)) = flushes.next_if(|(at, _)| *at == i) {
                    push_flush(&mut state, done);
                }
                state.items.push_back(Item::Record(record));
            }
            for (_, done) in flushes {
                push_flush(&mut state, done);
            }
        }
        self.queue.wake.notify_one();
        let excess = self.queue.take_excess();
        self.aside.spill(excess).await;
    }
}

fn push_flush(state: &mut QueueState, done: oneshot::Sender<()>) {
    if state.store_down {
        let _ = done.send(());
    } else {
        state.items.push_back(Item::Flush(done));
    }
}

/// Writes `parts` (the next one last). A part the store refuses for what it holds is
/// split in halves until the refused records are alone (added to `rejected`), so that
/// the others are written. On an outage, returns its error with `parts` holding what is
/// not written; so does a future dropped half-way, the part in flight included (whether
/// that one got in is then unknown).
async fn write_splitting(
    store: &dyn UsageStore,
    parts: &mut Vec<Vec<RequestRecord>>,
    rejected: &mut Vec<(RequestRecord, StorageError)>,
) -> Result<(), StorageError> {
    while let Some(part) = parts.last() {
        if part.is_empty() {
            parts.pop();
            continue;
        }
        match store.record(part).await {
            Ok(()) => {
                parts.pop();
            }
            Err(err) if err.refuses_content() => {
                let mut part = parts.pop().expect("the part just tried");
                if part.len() == 1 {
                    rejected.extend(part.pop().map(|r| (r, err)));
                } else {
                    let second = part.split_off(part.len() / 2);
                    parts.push(second);
                    parts.push(part);
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Writes records (see [`write_splitting`]), and sets the refused ones aside. Gives up
/// [`SHUTDOWN_GRACE`] after the queue closes, or at `deadline`: a stop must end even
/// with a store that does not answer. Returns the error and the records not written.
async fn write(
    store: &dyn UsageStore,
    queue: &Queue,
    aside: &SetAside,
    records: Vec<RequestRecord>,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), (StorageError, Vec<RequestRecord>)> {
    let mut parts = vec![records];
    let mut rejected = Vec::new();
    let give_up = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => {
                queue.closing.notified().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            }
        }
    };
    let result = tokio::select! {
        result = write_splitting(store, &mut parts, &mut rejected) => result,
        _ = give_up => Err(StorageError::Database(
            "no answer from the usage store while shutting down".into(),
        )),
    };
    aside.reject(rejected).await;
    result.map_err(|err| (err, parts.into_iter().rev().flatten().collect()))
}

/// Writes queued records (and spilled ones, when the store is up) until the queue
/// closes; retries, with growing waits, while the store is down.
async fn run_writer(
    store: Arc<dyn UsageStore>,
    queue: Arc<Queue>,
    flush_wanted: Arc<Notify>,
    aside: Arc<SetAside>,
) {
    let store = store.as_ref();
    let mut delay = RETRY_FIRST;
    let mut last_take = tokio::time::Instant::now();
    // The spill file's own back-off, while the disk fails (read-only, full, I/O errors):
    // the queue is written meanwhile, and the store is not deemed down.
    let mut replay_delay = RETRY_FIRST;
    let mut replay_at = tokio::time::Instant::now();
    loop {
        let pending = aside.spill.as_ref().is_some_and(SpillFile::is_pending);
        let replay = pending && tokio::time::Instant::now() >= replay_at;
        let (queued, closed) = {
            let state = queue.lock();
            (!state.items.is_empty(), state.closed)
        };
        if closed {
            break;
        }
        if !queued && !replay {
            if pending {
                tokio::select! {
                    _ = queue.wake.notified() => {}
                    _ = tokio::time::sleep_until(replay_at) => {}
                }
            } else {
                queue.wake.notified().await;
            }
            continue;
        }
        // Let a batch gather without a transaction per record, unless someone waits on
        // a flush: at most one transaction per LINGER. Counted from the last batch
        // taken, not from the end of its write: what came in during a write has waited
        // already, so a record waits at most LINGER (or one write) plus its own write.
        if queued && queue.lock().records < MAX_BATCH && !queue.has_flush() {
            tokio::select! {
                _ = tokio::time::sleep_until(last_take + LINGER) => {}
                _ = flush_wanted.notified() => {}
            }
        }
        let (records, flushes) = queue.take();
        last_take = tokio::time::Instant::now();
        let mut failed =
            write(store, &queue, &aside, records, None)
                .await
                .err()
                .map(|(err, left)| {
                    queue.put_back(left);
                    err
                });
        if failed.is_none() && replay {
            match replay_chunk(store, &queue, &aside).await {
                Ok(()) => replay_delay = RETRY_FIRST,
                Err(ReplayFailed::Store(err)) => failed = Some(err),
                Err(ReplayFailed::Disk(err)) => {
                    if replay_delay == RETRY_FIRST {
                        tracing::error!(error = %err, "cannot replay the usage spill file; retrying");
                    }
                    replay_at = tokio::time::Instant::now() + replay_delay;
                    replay_delay = (replay_delay * 2).min(RETRY_MAX);
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
        match failed {
            None => {
                if delay > RETRY_FIRST {
                    tracing::info!("usage store is back; writing queued records");
                }
                queue.set_down(false);
                delay = RETRY_FIRST;
            }
            Some(err) => {
                if delay == RETRY_FIRST {
                    tracing::warn!(error = %err, queued = queue.lock().records, "usage store failed; retrying");
                }
                queue.set_down(true);
                // Records put back may pass the bound.
                aside.spill(queue.take_excess()).await;
                // A write's grace period may have taken the close's notification: then
                // the queue is closed already, and the stop must not wait out `delay`.
                if !queue.lock().closed {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = queue.closing.notified() => {}
                    }
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
    finish(store, &queue, &aside).await;
}

/// Why a replay stopped.
enum ReplayFailed {
    /// The store is down: retried with the store's back-off.
    Store(StorageError),
    /// The spill file could not be read, or its progress noted: retried with a back-off
    /// of its own.
    Disk(std::io::Error),
}

/// Writes one chunk of the spill file to the store. What the store does not take stays
/// in the file, to be read again when it is back: records safe on disk are not moved
/// to memory, where a kill would lose them.
async fn replay_chunk(
    store: &dyn UsageStore,
    queue: &Queue,
    aside: &SetAside,
) -> Result<(), ReplayFailed> {
    let Some(spill) = &aside.spill else {
        return Ok(());
    };
    let Some(mut chunk) = spill
        .next_chunk(MAX_BATCH)
        .await
        .map_err(ReplayFailed::Disk)?
    else {
        return Ok(());
    };
    let records = std::mem::take(&mut chunk.records);
    let total = records.len();
    // What is not written is the end of the chunk (see `write_splitting`).
    let (written, outage) = match write(store, queue, aside, records, None).await {
        Ok(()) => (total, None),
        Err((err, left)) => (total - left.len(), Some(err)),
    };
    let unreadable = chunk.unreadable_passed(written);
    if unreadable > 0 {
        tracing::error!(
            lost = unreadable,
            "unreadable lines in the usage spill file (torn by a crash); records lost"
        );
        if let Some(o) = &aside.observer {
            o.lost(unreadable);
        }
    }
    // Not noted on disk: the replay waits before it reads on (a restart would write the
    // records in between again), but this process never writes them twice.
    let noted = spill.replayed(&chunk, written).await;
    match (outage, noted) {
        (Some(err), noted) => {
            if let Err(disk) = noted {
                tracing::warn!(error = %disk, "cannot note the usage spill file's progress");
            }
            Err(ReplayFailed::Store(err))
        }
        (None, noted) => noted.map_err(ReplayFailed::Disk),
    }
}

/// The queue closed: writes what is left, for at most [`SHUTDOWN_GRACE`]; the rest goes
/// to the spill file (at once when the store is down).
async fn finish(store: &dyn UsageStore, queue: &Queue, aside: &SetAside) {
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let mut down = queue.lock().store_down;
    loop {
        let (records, flushes) = queue.take();
        if records.is_empty() && flushes.is_empty() {
            break;
        }
        if down {
            aside.spill(records).await;
        } else if let Err((err, left)) = write(store, queue, aside, records, Some(deadline)).await {
            tracing::warn!(error = %err, "usage store failed while shutting down; spilling what is left");
            down = true;
            aside.spill(left).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
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
        admission,
        ..
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
    if let Some(admission) = admission {
        admission.settle(tokens_of(&record));
    }
    (record, key_name)
}

/// Prompt plus completion tokens, when both are known.
fn tokens_of(record: &RequestRecord) -> Option<u64> {
    record
        .prompt_tokens
        .zip(record.completion_tokens)
        .map(|(p, c)| p.saturating_add(c))
}

/// Held by a request from the moment its key is accepted; settles exactly one record,
/// when the response body ends or when it is dropped (the client went away).
pub(crate) struct UsageGuard {
    recorder: UsageRecorder,
    record: Option<RequestRecord>,
    /// The model, kept apart from `record` until the writer has it: the same name as the
    /// request's [`RequestedModel`](crate::auth_usage::RequestedModel), and the
    /// router's [`ServedModel`](crate::auth_usage::ServedModel), without a copy on the
    /// request path.
    model: Option<Arc<str>>,
    key_name: String,
    started: Instant,
    /// The request as JSON and the streamed text, for the token counter.
    count: Option<(Arc<Value>, String)>,
    /// The limiter's count of the request: its place in flight is freed when the guard
    /// drops, its tokens settled once known. Boxed, to keep the guard small without a
    /// limiter.
    admission: Option<Box<Admission>>,
}

impl UsageGuard {
    pub(crate) fn recorder(&self) -> &UsageRecorder {
        &self.recorder
    }

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
            end_user: None,
        };
        Self {
            recorder,
            record: Some(record),
            model: None,
            key_name: key.name.clone(),
            started,
            count: None,
            admission: None,
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

    /// The model of the request, unless one is known already (a name given as `&str` or
    /// `String` is copied only then).
    pub(crate) fn set_model(&mut self, model: Option<impl Into<Arc<str>>>) {
        if self.model.is_none() {
            self.model = model.map(Into::into);
        }
    }

    /// The model that served the request, in place of the name the client sent.
    pub(crate) fn replace_model(&mut self, model: &Arc<str>) {
        if self.model.as_deref() != Some(&**model) {
            self.model = Some(model.clone());
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

    /// The limiter admitted the request: the guard settles it.
    pub(crate) fn set_admission(&mut self, admission: Box<Admission>) {
        self.admission = Some(admission);
    }

    /// The client has gone: the request's place in flight is free (its tokens are
    /// settled later, with the record).
    pub(crate) fn release_in_flight(&mut self) {
        if let Some(admission) = &mut self.admission {
            admission.release();
        }
    }

    /// The end user the request names (its `user`, or a front-end's header).
    pub(crate) fn set_end_user(&mut self, end_user: Option<String>) {
        self.record().end_user = end_user;
    }

    pub(crate) fn has_model(&self) -> bool {
        self.model.is_some()
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
            // The request is over: its place in flight is free now, even if its tokens
            // are counted later.
            let mut admission = self.admission.take();
            if count.is_none() {
                if let Some(admission) = admission.take() {
                    admission.settle(tokens_of(&record));
                }
            } else if let Some(admission) = &mut admission {
                admission.release();
            }
            let key_name = std::mem::take(&mut self.key_name);
            self.recorder.send(Pending {
                record,
                model: self.model.take(),
                key_name,
                count,
                admission,
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
                ..Default::default()
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

    /// A model server that takes its time to count, and counts one request at a time
    /// per connection (as llama-cpp-python does between generations).
    struct Slow(std::time::Duration);
    #[async_trait::async_trait]
    impl TokenCounter for Slow {
        async fn count(&self, _: &Value, completion: &str) -> Result<TokenUsage, BoxError> {
            tokio::time::sleep(self.0).await;
            Ok(TokenUsage {
                prompt_tokens: 1,
                completion_tokens: completion.len() as u64,
            })
        }
    }

    #[tokio::test]
    async fn a_slow_counter_neither_holds_records_in_line_nor_lets_them_pile_up() {
        let store = Arc::new(MemoryStore::new());
        let (recorder, writer) = UsageRecorder::start_with(
            store.clone(),
            RecorderOptions {
                counter: Some(Arc::new(Slow(Duration::from_millis(200)))),
                ..Default::default()
            },
        );
        // Counted several at a time: 16 counts of 200 ms take well under 16 × 200 ms.
        let started = Instant::now();
        for _ in 0..16 {
            let mut g = guard(&recorder, "k");
            g.count_later(Arc::new(serde_json::json!({})), "abc".into());
        }
        recorder.flush().await;
        assert!(
            started.elapsed() < Duration::from_millis(1600),
            "{:?}",
            started.elapsed()
        );
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!((totals.requests, totals.completion_tokens), (16, 48));

        writer.shutdown().await;

        // More streams waiting than the bound: those beyond it are recorded with tokens
        // unknown instead of waiting their turn; the rest are counted.
        let (recorder, writer) = UsageRecorder::start_with(
            store.clone(),
            RecorderOptions {
                counter: Some(Arc::new(Slow(Duration::from_millis(2)))),
                ..Default::default()
            },
        );
        let sent = MAX_WAITING_FOR_COUNT + 2_000;
        for _ in 0..sent {
            let mut g = guard(&recorder, "k2");
            g.count_later(Arc::new(serde_json::json!({})), "abc".into());
        }
        writer.shutdown().await;
        let totals = store.totals_for_key("k2").await.unwrap();
        assert_eq!(totals.requests, sent as u64);
        assert!(
            totals.requests_without_usage >= 2_000 - COUNTS_AT_ONCE as u64 * 4,
            "{totals:?}"
        );
        assert!(totals.requests_without_usage < sent as u64, "{totals:?}");
    }

    /// A store that can be down, refuse records for what they hold (model "refused"),
    /// or never answer.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: std::sync::atomic::AtomicBool,
        hang: std::sync::atomic::AtomicBool,
        /// Records it takes before it is down, when set.
        budget: Mutex<Option<usize>>,
        /// Writes it failed as an outage.
        outages: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl UsageStore for Flaky {
        async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.hang.load(SeqCst) {
                std::future::pending::<()>().await;
            }
            let spent = {
                let mut budget = self.budget.lock().unwrap();
                match budget.as_mut() {
                    Some(left) if *left < batch.len() => true,
                    Some(left) => {
                        *left -= batch.len();
                        false
                    }
                    None => false,
                }
            };
            if spent || self.down.load(SeqCst) {
                self.outages.fetch_add(1, SeqCst);
                return Err(StorageError::Database("connection refused".into()));
            }
            if batch.iter().any(|r| r.model.as_deref() == Some("refused")) {
                return Err(StorageError::Rejected("value out of range".into()));
            }
            self.inner.record(batch).await
        }
        async fn totals(
            &self,
        ) -> Result<std::collections::BTreeMap<String, crate::storage::UsageTotals>, StorageError>
        {
            self.inner.totals().await
        }
        async fn totals_for_key(
            &self,
            key_id: &str,
        ) -> Result<crate::storage::UsageTotals, StorageError> {
            self.inner.totals_for_key(key_id).await
        }
        async fn requests(
            &self,
            key_id: &str,
            since: Option<DateTime<Utc>>,
            limit: u32,
        ) -> Result<Vec<RequestRecord>, StorageError> {
            self.inner.requests(key_id, since, limit).await
        }
    }

    #[derive(Default)]
    struct Counts {
        rejected: std::sync::atomic::AtomicUsize,
        spilled: std::sync::atomic::AtomicUsize,
        lost: std::sync::atomic::AtomicUsize,
    }

    impl UsageObserver for Counts {
        fn observe(&self, _: &RequestRecord, _: &str) {}
        fn rejected(&self, n: usize) {
            self.rejected
                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        fn spilled(&self, n: usize) {
            self.spilled
                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        fn lost(&self, n: usize) {
            self.lost.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Counts {
        fn get(&self) -> (usize, usize, usize) {
            use std::sync::atomic::Ordering::SeqCst;
            (
                self.rejected.load(SeqCst),
                self.spilled.load(SeqCst),
                self.lost.load(SeqCst),
            )
        }
    }

    fn start_flaky(
        store: &Arc<Flaky>,
        dir: &std::path::Path,
        queue_max: usize,
    ) -> (UsageRecorder, UsageWriter, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let (recorder, writer) = UsageRecorder::start_with(
            store.clone(),
            RecorderOptions {
                observer: Some(counts.clone()),
                queue_max,
                data_dir: Some(dir.to_owned()),
                ..Default::default()
            },
        );
        (recorder, writer, counts)
    }

    /// Records one request per `tokens`, its prompt tokens telling it apart.
    fn send(recorder: &UsageRecorder, tokens: std::ops::Range<u64>, model: &str) {
        for i in tokens {
            let mut g = guard(recorder, "k");
            g.set_status(200);
            g.set_model(Some(model));
            g.set_usage(TokenUsage {
                prompt_tokens: i,
                completion_tokens: 1,
            });
        }
    }

    /// The prompt tokens of every stored row of key "k", sorted.
    async fn stored(store: &Flaky) -> Vec<u64> {
        let rows = store.requests("k", None, u32::MAX).await.unwrap();
        let mut tokens: Vec<u64> = rows.iter().filter_map(|r| r.prompt_tokens).collect();
        tokens.sort_unstable();
        tokens
    }

    async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done().await {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spill_lines(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.to_string_lossy().contains("usage-spill")
                    && p.extension().is_some_and(|e| e == "jsonl")
            })
            .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
            .sum()
    }

    #[tokio::test]
    async fn a_record_the_store_refuses_is_set_aside_and_the_others_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky::default());
        let (recorder, writer, counts) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        send(&recorder, 0..37, "m");
        send(&recorder, 37..38, "refused");
        send(&recorder, 38..100, "m");
        recorder.flush().await;
        assert_eq!(
            stored(&store).await,
            (0..100).filter(|&i| i != 37).collect::<Vec<_>>()
        );
        let rejected = recorder.rejected().await.unwrap();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].record.model.as_deref(), Some("refused"));
        assert_eq!(rejected[0].record.prompt_tokens, Some(37));
        assert!(
            rejected[0].error.contains("value out of range"),
            "{}",
            rejected[0].error
        );
        assert_eq!(counts.get(), (1, 0, 0));

        // The writer goes on.
        send(&recorder, 100..150, "m");
        recorder.flush().await;
        assert_eq!(stored(&store).await.len(), 149);
        writer.shutdown().await;

        // An admin still finds it after a restart.
        let (recorder, writer, _) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        assert_eq!(recorder.rejected().await.unwrap(), rejected);
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn a_store_that_is_down_keeps_the_queue_bounded_and_gets_every_record_once_when_back() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky::default());
        store.down.store(true, SeqCst);
        let (recorder, writer, counts) = start_flaky(&store, dir.path(), 100);
        for burst in 0..10 {
            send(&recorder, burst * 100..(burst + 1) * 100, "m");
            tokio::task::yield_now().await;
        }
        // A reader of usage is not kept waiting by the outage.
        tokio::time::timeout(Duration::from_secs(2), recorder.flush())
            .await
            .expect("flush answers while the store is down");
        eventually(
            "the queue is within its bound, the rest on disk",
            async || {
                let queued = recorder.queued();
                queued <= 100
                    && spill_lines(dir.path()) + queued == 1_000
                    && counts.get().1 >= 1_000 - queued
            },
        )
        .await;
        assert!(stored(&store).await.is_empty());

        store.down.store(false, SeqCst);
        eventually("every record is written", async || {
            stored(&store).await.len() >= 1_000
        })
        .await;
        recorder.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            stored(&store).await,
            (0..1_000).collect::<Vec<_>>(),
            "each once"
        );
        assert_eq!(spill_lines(dir.path()), 0);
        assert_eq!(recorder.queued(), 0);
        assert_eq!(counts.get().2, 0, "none lost");
        writer.shutdown().await;
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the spill files are removed"
        );
    }

    #[tokio::test]
    async fn shutdown_with_the_store_down_finishes_promptly_and_the_next_start_writes_the_records()
    {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky::default());
        store.down.store(true, SeqCst);
        let (recorder, writer, _) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        send(&recorder, 0..50, "m");
        recorder.flush().await;
        let started = Instant::now();
        writer.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(spill_lines(dir.path()), 50);

        // A store that never answers: the stop still ends, after the grace period.
        let hanging = Arc::new(Flaky::default());
        hanging.hang.store(true, SeqCst);
        let (recorder, writer, _) = start_flaky(&hanging, dir.path(), DEFAULT_QUEUE_MAX);
        send(&recorder, 50..60, "m");
        // The writer is waiting on the store when the stop comes.
        tokio::time::sleep(LINGER * 4).await;
        let started = Instant::now();
        writer.shutdown().await;
        assert!(
            started.elapsed() < SHUTDOWN_GRACE + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(spill_lines(dir.path()) >= 60);

        let store = Arc::new(Flaky::default());
        let (recorder, writer, _) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        eventually("the spilled records are written", async || {
            stored(&store).await.len() >= 60
        })
        .await;
        recorder.flush().await;
        assert_eq!(stored(&store).await, (0..60).collect::<Vec<_>>());
        writer.shutdown().await;
        assert_eq!(spill_lines(dir.path()), 0);
    }

    /// The prompt tokens of the records on disk still to be written (the spill file, and
    /// the replay file from its saved position), sorted.
    fn on_disk(dir: &std::path::Path) -> Vec<u64> {
        use super::super::spill::{REPLAY_FILE, REPLAY_OFFSET_FILE};
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
        let offset: usize = String::from_utf8(read(REPLAY_OFFSET_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap_or(0);
        let mut lines = read(REPLAY_FILE).get(offset..).unwrap_or_default().to_vec();
        lines.extend(read(SPILL_FILE));
        let mut tokens: Vec<u64> = lines
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<RequestRecord>(line).ok())
            .filter_map(|r| r.prompt_tokens)
            .collect();
        tokens.sort_unstable();
        tokens
    }

    /// The names of the spill's files left in `dir`.
    fn spill_files(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("usage-spill"))
            .collect()
    }

    /// Starts a recorder whose store is down with a queue of 100, and sends `sent`
    /// records: all but the last 100 are spilled.
    async fn spilled_while_down(
        sent: u64,
    ) -> (
        tempfile::TempDir,
        Arc<Flaky>,
        UsageRecorder,
        UsageWriter,
        Arc<Counts>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky::default());
        store.down.store(true, SeqCst);
        let (recorder, writer, counts) = start_flaky(&store, dir.path(), 100);
        send(&recorder, 0..sent, "m");
        eventually("all but 100 are spilled", async || {
            spill_lines(dir.path()) == sent as usize - 100
        })
        .await;
        (dir, store, recorder, writer, counts)
    }

    #[tokio::test]
    async fn a_replay_whose_progress_cannot_be_saved_writes_each_record_once_and_waits() {
        use super::super::spill::disk_faults::{self, Op};
        use std::sync::atomic::Ordering::SeqCst;
        // Two chunks of the spill file.
        const SENT: u64 = MAX_BATCH as u64 + 1_000;
        for op in [Op::Save, Op::Remove] {
            let (dir, store, recorder, writer, _) = spilled_while_down(SENT).await;
            // A full disk, or one remounted read-only.
            disk_faults::fail(dir.path(), op);
            store.down.store(false, SeqCst);
            // The position after the first chunk cannot be saved: the replay waits before
            // the second. The file cannot be removed: both chunks are written.
            let expected = match op {
                Op::Save => 100 + MAX_BATCH,
                _ => SENT as usize,
            };
            eventually("the replay starts", async || {
                stored(&store).await.len() >= expected
            })
            .await;
            tokio::time::sleep(Duration::from_millis(600)).await;
            let mut written = stored(&store).await;
            let len = written.len();
            written.dedup();
            assert_eq!(
                (len, written.len()),
                (expected, expected),
                "{op:?}: each record written once"
            );
            let tries = disk_faults::tries(dir.path(), op);
            assert!(
                (2..=8).contains(&tries),
                "{op:?}: tried again, with waits between: {tries}"
            );

            disk_faults::work(dir.path(), op);
            eventually("the replay ends", async || {
                spill_files(dir.path()).is_empty()
            })
            .await;
            recorder.flush().await;
            assert_eq!(
                stored(&store).await,
                (0..SENT).collect::<Vec<_>>(),
                "{op:?}: each once"
            );
            writer.shutdown().await;
        }
    }

    #[tokio::test]
    async fn an_outage_during_a_replay_leaves_the_rest_on_disk_and_each_record_is_written_once() {
        use std::sync::atomic::Ordering::SeqCst;
        // Three chunks of the spill file.
        const SENT: u64 = 2 * MAX_BATCH as u64 + 1_000;
        let (dir, store, recorder, writer, counts) = spilled_while_down(SENT).await;
        // Back for the queue and the first chunk only.
        *store.budget.lock().unwrap() = Some(100 + MAX_BATCH);
        let outages = store.outages.load(SeqCst);
        store.down.store(false, SeqCst);
        eventually("the first chunk is written", async || {
            stored(&store).await.len() >= 100 + MAX_BATCH
        })
        .await;
        // The next chunk's write fails: by then the first chunk's place in the file is
        // saved, so the rest of the file is what is left.
        eventually("the store fails again", async || {
            store.outages.load(SeqCst) > outages
        })
        .await;
        assert_eq!(recorder.queued(), 0, "nothing moved from disk to memory");
        let mut everywhere = stored(&store).await;
        everywhere.extend(on_disk(dir.path()));
        everywhere.sort_unstable();
        assert_eq!(
            everywhere,
            (0..SENT).collect::<Vec<_>>(),
            "what is not written is on disk, once"
        );

        *store.budget.lock().unwrap() = None;
        eventually("every record is written", async || {
            stored(&store).await.len() >= SENT as usize
        })
        .await;
        recorder.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            stored(&store).await,
            (0..SENT).collect::<Vec<_>>(),
            "each once"
        );
        assert_eq!(counts.get(), (0, SENT as usize - 100, 0));
        writer.shutdown().await;
        assert_eq!(spill_files(dir.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_stop_during_a_replay_with_the_store_down_is_prompt_and_keeps_the_records_on_disk() {
        use std::sync::atomic::Ordering::SeqCst;
        const SENT: u64 = MAX_BATCH as u64 + 1_000;
        let (dir, store, _recorder, writer, _) = spilled_while_down(SENT).await;
        *store.budget.lock().unwrap() = Some(100 + MAX_BATCH);
        store.down.store(false, SeqCst);
        eventually("the first chunk is written", async || {
            stored(&store).await.len() >= 100 + MAX_BATCH
        })
        .await;
        store.down.store(true, SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        writer.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let mut everywhere = stored(&store).await;
        everywhere.extend(on_disk(dir.path()));
        everywhere.sort_unstable();
        assert_eq!(everywhere, (0..SENT).collect::<Vec<_>>());

        // The next start writes the rest.
        *store.budget.lock().unwrap() = None;
        store.down.store(false, SeqCst);
        let (recorder, writer, _) = start_flaky(&store, dir.path(), 100);
        eventually("the rest is written", async || {
            spill_files(dir.path()).is_empty()
        })
        .await;
        recorder.flush().await;
        assert_eq!(
            stored(&store).await,
            (0..SENT).collect::<Vec<_>>(),
            "each once"
        );
        writer.shutdown().await;
    }

    fn spill_line(tokens: u64, model: &str) -> Vec<u8> {
        let record = RequestRecord {
            at: now_millis(),
            key_id: "k".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: Some(model.into()),
            status: 200,
            prompt_tokens: Some(tokens),
            completion_tokens: Some(1),
            latency_ms: 3,
            first_byte_ms: None,
            end_user: None,
        };
        let mut line = serde_json::to_vec(&record).unwrap();
        line.push(b'\n');
        line
    }

    #[tokio::test]
    async fn a_spill_line_torn_inside_a_character_loses_only_itself_and_the_replay_ends() {
        use super::super::spill::disk_faults::{self, Op};
        let dir = tempfile::tempdir().unwrap();
        let mut file = Vec::new();
        for i in 0..3 {
            file.extend(spill_line(i, "modèle"));
        }
        // A crash in the middle of "è"; the next append ended the line.
        let torn = spill_line(99, "modèle");
        let cut = torn.iter().position(|&b| b == 0xC3).unwrap() + 1;
        file.extend_from_slice(&torn[..cut]);
        file.push(b'\n');
        for i in 3..6 {
            file.extend(spill_line(i, "m"));
        }
        std::fs::write(dir.path().join(SPILL_FILE), file).unwrap();
        disk_faults::work(dir.path(), Op::Read);

        let store = Arc::new(Flaky::default());
        let (recorder, writer, counts) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reads = disk_faults::tries(dir.path(), Op::Read);
        assert!(reads <= 5, "the writer does not spin: {reads} reads");
        recorder.flush().await;
        assert_eq!(stored(&store).await, (0..6).collect::<Vec<_>>());
        assert_eq!(counts.get(), (0, 0, 1), "only the torn line is lost");
        assert_eq!(spill_files(dir.path()), Vec::<String>::new());
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn a_spill_file_that_cannot_be_read_is_tried_again_with_growing_waits() {
        use super::super::spill::disk_faults::{self, Op};
        let dir = tempfile::tempdir().unwrap();
        let file: Vec<u8> = (0..3).flat_map(|i| spill_line(i, "m")).collect();
        std::fs::write(dir.path().join(SPILL_FILE), file).unwrap();
        disk_faults::fail(dir.path(), Op::Read);

        let store = Arc::new(Flaky::default());
        let (recorder, writer, _) = start_flaky(&store, dir.path(), DEFAULT_QUEUE_MAX);
        // The queue is written meanwhile.
        send(&recorder, 3..5, "m");
        recorder.flush().await;
        assert_eq!(stored(&store).await, [3, 4]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reads = disk_faults::tries(dir.path(), Op::Read);
        assert!((3..=10).contains(&reads), "{reads} reads in 1 s");

        disk_faults::work(dir.path(), Op::Read);
        eventually("the spill file is written", async || {
            spill_files(dir.path()).is_empty()
        })
        .await;
        assert_eq!(stored(&store).await, (0..5).collect::<Vec<_>>());
        writer.shutdown().await;
    }
}
