//! The response body wrapper that reads usage as the bytes go by.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};

use crate::usage::{
    BodyModel, JsonCollector, RequestPlan, SseExtractor, StreamText, StreamUsage, UsageGuard,
};

/// The body [`AuthUsageLayer`](super::AuthUsageLayer) answers with: the inner
/// service's body wrapped in a [`UsageBody`], or the layer's own error.
pub type AuthUsageBody<B> = Either<UsageBody<B>, Full<Bytes>>;

/// How long a JSON answer whose client has gone is still read for its usage.
const BACKGROUND_READ_LIMIT: Duration = Duration::from_secs(600);

/// A response body that reads the response's token usage on its way to the client
/// and settles the request's usage record when it ends or is dropped.
pub struct UsageBody<B> {
    /// `None` only once handed to a background read.
    inner: Option<Pin<Box<B>>>,
    tracking: Option<Box<Tracking>>,
    /// For a JSON answer dropped before its end (the client left while the upstream was
    /// sending it): reads the rest in the background so its tokens still count.
    finish_in_background: Option<ReadRest<B>>,
}

/// Takes over a dropped body and its accounting.
type ReadRest<B> = fn(Pin<Box<B>>, Box<Tracking>);

impl<B> std::fmt::Debug for UsageBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBody")
            .field("tracking", &self.tracking.is_some())
            .finish_non_exhaustive()
    }
}

/// A request's usage guard, and what its answer's body reads the usage with. The layer
/// boxes it as soon as the key is accepted: the guard (a few hundred bytes) then stays
/// where it is on its way from the layer's future into the body, instead of being
/// copied at each step, and the future is that much smaller.
pub(super) struct Tracking {
    pub(super) guard: UsageGuard,
    extractor: Extractor,
    /// Edited SSE events waiting to go out.
    ready: VecDeque<Bytes>,
    /// The inner body has ended; only `ready` is left.
    inner_done: bool,
    counting: Option<std::sync::Arc<serde_json::Value>>,
}

enum Extractor {
    /// Not a body with usage in it (audio, an error page, …): just count the request.
    Nothing,
    Json(JsonCollector),
    Sse(SseExtractor),
}

impl<B> UsageBody<B> {
    /// A body whose usage is read according to its content type, into `tracking` (from
    /// [`Tracking::new`]).
    pub(super) fn tracked(
        inner: B,
        mut tracking: Box<Tracking>,
        content_type: &str,
        plan: RequestPlan,
    ) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
    {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        let extractor = if mime.eq_ignore_ascii_case("text/event-stream") {
            let usage_out = if plan.strip_stream_usage {
                StreamUsage::Strip
            } else {
                StreamUsage::AsSent
            };
            let text = if plan.for_counting.is_some() && tracking.guard.counts_tokens() {
                StreamText::Gather
            } else {
                StreamText::Skip
            };
            Extractor::Sse(SseExtractor::new(usage_out, text))
        } else if mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json") {
            Extractor::Json(JsonCollector::default())
        } else {
            Extractor::Nothing
        };
        let finish_in_background = matches!(extractor, Extractor::Json(_))
            .then_some(read_rest_for_usage::<B> as ReadRest<B>);
        tracking.extractor = extractor;
        tracking.counting = plan.for_counting;
        Self {
            inner: Some(Box::pin(inner)),
            finish_in_background,
            tracking: Some(tracking),
        }
    }

    /// Whether the body may differ from the upstream's (its length is then unknown).
    pub(crate) fn edits(&self) -> bool {
        self.tracking
            .as_ref()
            .is_some_and(|t| matches!(&t.extractor, Extractor::Sse(sse) if sse.edits()))
    }
}

impl Tracking {
    /// `guard`'s tracking, with nothing to read yet: dropped before an answer, it only
    /// settles the guard.
    pub(super) fn new(guard: UsageGuard) -> Box<Self> {
        Box::new(Self {
            guard,
            extractor: Extractor::Nothing,
            ready: VecDeque::new(),
            inner_done: false,
            counting: None,
        })
    }

    /// The inner body has ended: read its usage now.
    fn end(&mut self) {
        self.inner_done = true;
        self.settle();
    }

    /// The body is complete, or dropped (hyper stops polling once a body of known
    /// length is sent; a client may leave): read what usage there is.
    fn settle(&mut self) {
        match &mut self.extractor {
            Extractor::Nothing => {}
            Extractor::Json(json) => {
                let model = if self.guard.has_model() {
                    BodyModel::Skip
                } else {
                    BodyModel::Read
                };
                let (usage, model) = json.finish(model);
                self.guard.set_model(model);
                if let Some(usage) = usage {
                    self.guard.set_usage(usage);
                }
            }
            Extractor::Sse(sse) => {
                sse.finish(&mut self.ready);
                self.guard.set_model(sse.model());
                if let Some(usage) = sse.usage() {
                    self.guard.set_usage(usage);
                }
            }
        }
        self.note_missing_usage();
    }

    fn note_missing_usage(&mut self) {
        if self.guard.has_usage() {
            return;
        }
        if let (Some(request), Extractor::Sse(sse)) = (self.counting.take(), &self.extractor) {
            if let Some(text) = sse.text() {
                self.guard.count_later(request, text.to_owned());
            }
        }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if !self.inner_done {
            self.settle();
        }
        // The guard's own Drop sends the record.
    }
}

impl<B> Drop for UsageBody<B> {
    fn drop(&mut self) {
        let unfinished = self.tracking.as_ref().is_some_and(|t| !t.inner_done);
        if let (true, Some(read_rest)) = (unfinished, self.finish_in_background) {
            if let (Some(inner), Some(mut tracking)) = (self.inner.take(), self.tracking.take()) {
                // The client has gone: its place in flight is free, though the rest of
                // the answer is still read for its tokens.
                tracking.guard.release_in_flight();
                read_rest(inner, tracking);
            }
        }
    }
}

/// Reads what is left of a JSON answer after its client went away, then settles.
fn read_rest_for_usage<B>(mut inner: Pin<Box<B>>, mut tracking: Box<Tracking>)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return; // dropping the tracking settles with what was seen
    }
    let recorder = tracking.guard.recorder().clone();
    recorder.read_in_background(async move {
        let _ = tokio::time::timeout(BACKGROUND_READ_LIMIT, async {
            while let Some(frame) = inner.frame().await {
                let Ok(frame) = frame else { return };
                if let (Ok(data), Extractor::Json(json)) =
                    (frame.into_data(), &mut tracking.extractor)
                {
                    json.observe(&data);
                }
            }
            tracking.end();
        })
        .await;
    });
}

impl<B> Body for UsageBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let Some(tracking) = this.tracking.as_mut() else {
            return inner.as_mut().poll_frame(cx);
        };
        loop {
            if let Some(data) = tracking.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if tracking.inner_done {
                // Settled: dropping the tracking now sends the record.
                this.tracking = None;
                return Poll::Ready(None);
            }
            match ready!(inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let pass = match &mut tracking.extractor {
                        Extractor::Nothing => Some(data),
                        Extractor::Json(json) => {
                            json.observe(&data);
                            Some(data)
                        }
                        Extractor::Sse(sse) if sse.edits() => {
                            sse.edit(&data, &mut tracking.ready);
                            None
                        }
                        Extractor::Sse(sse) => {
                            sse.observe(&data);
                            Some(data)
                        }
                    };
                    // A body of known length is over with its last byte: settle now, so
                    // the server can end the response without polling for the end (it
                    // drops a body once its length is sent).
                    if inner.is_end_stream() {
                        tracking.end();
                    }
                    if let Some(data) = pass {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Some(Err(err)) => {
                    // The upstream broke off mid-body; the drop records what was seen.
                    this.tracking = None;
                    return Poll::Ready(Some(Err(err)));
                }
                None => tracking.end(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match (&self.inner, &self.tracking) {
            (Some(inner), None) => inner.is_end_stream(),
            (None, _) => true,
            // Report the end only once poll_frame has settled the record.
            (Some(_), Some(tracking)) => tracking.inner_done && tracking.ready.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if !self.edits() => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::now_millis;
    use crate::storage::{MemoryStore, UsageStore};
    use crate::usage::UsageRecorder;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;
    use std::time::Instant;

    /// A store, its recorder and writer, and the guard of a request by key `k` that
    /// got a 200.
    fn answered_request() -> (
        Arc<MemoryStore>,
        UsageRecorder,
        crate::usage::UsageWriter,
        UsageGuard,
    ) {
        let store = Arc::new(MemoryStore::new());
        let (recorder, writer) = UsageRecorder::start(store.clone());
        let mut key = crate::auth::KeyRecord::new(
            "k",
            crate::auth::Role::User,
            &crate::auth::Secret::generate(),
        );
        key.id = "k".into();
        let mut guard = UsageGuard::new(
            recorder.clone(),
            &key,
            "POST",
            "/v1/chat/completions".to_owned(),
            now_millis(),
            Instant::now(),
        );
        guard.set_status(200);
        (store, recorder, writer, guard)
    }

    #[tokio::test]
    async fn a_finished_json_body_records_its_usage_once() {
        let (store, recorder, _writer, guard) = answered_request();
        let json =
            r#"{"model":"m","usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;
        let frames = json
            .as_bytes()
            .chunks(7)
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let tracked = UsageBody::tracked(
            body,
            Tracking::new(guard),
            "application/json; charset=utf-8",
            RequestPlan::default(),
        );
        let received = tracked.collect().await.unwrap().to_bytes();
        assert_eq!(received, json.as_bytes());
        recorder.flush().await;
        let rows = store.requests("k", None, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].prompt_tokens, rows[0].completion_tokens),
            (Some(4), Some(6))
        );
        assert_eq!(rows[0].model.as_deref(), Some("m"));
    }

    /// hyper ends a response whose length is known as soon as the body says it is at its
    /// end, and drops the body without polling further: the record must be settled by then.
    #[tokio::test]
    async fn a_known_length_body_ends_with_its_last_frame_and_is_recorded() {
        let (store, recorder, _writer, guard) = answered_request();
        let json = r#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        let mut tracked = UsageBody::tracked(
            Full::new(Bytes::from_static(json.as_bytes())),
            Tracking::new(guard),
            "application/json",
            RequestPlan::default(),
        );
        assert!(!tracked.is_end_stream());
        let frame = tracked.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), json.as_bytes());
        assert!(
            tracked.is_end_stream(),
            "the end is known with the last byte"
        );
        drop(tracked);
        recorder.flush().await;
        let rows = store.requests("k", None, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].prompt_tokens, rows[0].completion_tokens),
            (Some(3), Some(5))
        );
    }
}
