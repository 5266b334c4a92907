//! Serving the [`App`] over TCP: hyper's HTTP/1.1 and HTTP/2 (told apart per
//! connection), no Nagle delay, and a graceful shutdown that lets requests in flight
//! finish.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tower::Service;

use crate::app::App;

/// Accepts connections until `shutdown` completes, then stops accepting and waits for
/// the connections to finish what they are doing. Connections are served on the
/// current runtime (see [`serve_on_loops`] for the gateway's own way).
pub async fn serve(listener: TcpListener, app: App, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut shutdown = std::pin::pin!(shutdown);
    while let Some(stream) = accept(&listener, shutdown.as_mut()).await {
        serve_connection(&builder, &graceful, stream, app.clone(), None);
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Like [`serve`], but each connection is served by one of `loops` event loops, each a
/// single-threaded Tokio runtime on a thread of its own, as nginx serves with a worker
/// process per core: a connection's requests, its upstream connections and their
/// wake-ups stay on one thread instead of moving between a shared runtime's workers.
/// The accept loop (here) hands each new connection to the loop with the fewest open.
/// Compared round by round on 2 cores (`bench/ab.sh`): 5–9 % more requests and 3–8 %
/// less CPU per request than on one multi-threaded runtime (docs/benchmarks.md).
///
/// Tasks that requests spawn on a loop (reading the rest of an answer whose client
/// left) keep running there after the shutdown, until the process exits.
pub async fn serve_on_loops(
    listener: TcpListener,
    app: App,
    loops: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut started = Vec::with_capacity(loops);
    for i in 0..loops.max(1) {
        started.push(EventLoop::start(i, app.clone())?);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    while let Some(stream) = accept(&listener, shutdown.as_mut()).await {
        let target = started
            .iter()
            .min_by_key(|l| l.open.load(Ordering::Relaxed))
            .expect("at least one loop");
        target.hand_over(stream);
    }
    drop(listener);
    // Each loop sees its queue close, lets its connections finish, and says so.
    let finished: Vec<_> = started.into_iter().map(|l| l.finished).collect();
    for done in finished {
        let _ = done.await;
    }
    Ok(())
}

/// One serving thread: its queue of new connections and how many it serves.
struct EventLoop {
    connections: mpsc::UnboundedSender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
    finished: oneshot::Receiver<()>,
}

impl EventLoop {
    fn start(index: usize, app: App) -> std::io::Result<Self> {
        let (connections, mut queue) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let (done, finished) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("llmgate-serve-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let graceful = GracefulShutdown::new();
                    let builder = auto::Builder::new(TokioExecutor::new());
                    while let Some(stream) = queue.recv().await {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => serve_connection(
                                &builder,
                                &graceful,
                                stream,
                                app.clone(),
                                Some(counter.clone()),
                            ),
                            Err(err) => {
                                counter.fetch_sub(1, Ordering::Relaxed);
                                tracing::warn!(error = %err, "cannot serve a connection");
                            }
                        }
                    }
                    graceful.shutdown().await;
                    let _ = done.send(());
                    // Keep driving what requests spawned here (the rest of an answer
                    // read for its usage after its client left) until the process exits.
                    std::future::pending::<()>().await;
                });
            })?;
        Ok(Self {
            connections,
            open,
            finished,
        })
    }

    fn hand_over(&self, stream: TcpStream) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hand a connection over");
                return;
            }
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        if self.connections.send(stream).is_err() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("a serving thread has stopped; a connection was closed");
        }
    }
}

/// The next connection, or `None` once `shutdown` completes.
async fn accept(
    listener: &TcpListener,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // No Nagle delay: streamed tokens are small writes that must go out at once.
                    let _ = stream.set_nodelay(true);
                    return Some(stream);
                }
                Err(err) => accept_failed(err).await,
            },
            () = &mut shutdown => return None,
        }
    }
}

/// Serves one connection on the current runtime until it closes; `open` counts down
/// when it does.
fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    app: App,
    open: Option<Arc<AtomicUsize>>,
) {
    let service = ConnectionService(RefCell::new(app));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "connection closed with an error");
        }
        if let Some(open) = open {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    });
}

/// A failed accept: a client that left before it was accepted is nothing; anything
/// else (out of file descriptors) is logged and waited out instead of spinning.
async fn accept_failed(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accepting a connection failed; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The app as one connection sees it. hyper calls a connection's service from that
/// connection's task, one call at a time, so the app is borrowed for each call instead
/// of cloned per request.
struct ConnectionService(RefCell<App>);

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = <App as Service<Request>>::Response;
    type Error = <App as Service<Request>>::Error;
    type Future = Either<
        <App as Service<Request>>::Future,
        BoxFuture<'static, Result<Self::Response, Self::Error>>,
    >;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        if request.version() != hyper::Version::HTTP_2 || request.body().is_end_stream() {
            return Either::Left(self.0.borrow_mut().call(request.map(Body::new)));
        }
        // An HTTP/2 request whose body may be left unread (refused before it is read):
        // what is left of the body is read after the answer has been sent, as nginx
        // does. Dropped unread, the stream would be reset, and clients such as curl
        // report a reset as a failure instead of showing the answer (a reset with
        // NO_ERROR after the answer is allowed, RFC 9113 8.1, but not understood by all).
        let (parts, body) = request.into_parts();
        let body = Arc::new(Mutex::new(Some(body)));
        let request = Request::from_parts(parts, Body::new(SharedBody(body.clone())));
        let answer = self.0.borrow_mut().call(request);
        Either::Right(Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|answer| {
                Body::new(KeepingRequestBody {
                    answer,
                    request: body,
                })
            }))
        }))
    }
}

/// A request body that the answer keeps too (see [`ConnectionService::call`]).
type Kept = Arc<Mutex<Option<Incoming>>>;

/// How much of a request body left unread is still read (and thrown away) after the
/// answer: what a refused upload of any sensible size sends over a local network.
const UNREAD_BODY_BYTES: usize = 64 * 1024 * 1024;
/// For how long, at most: a slow client gets a reset instead.
const UNREAD_BODY_TIME: Duration = Duration::from_secs(2);

/// The request's side of a [`Kept`] body.
struct SharedBody(Kept);

fn incoming(kept: &Kept) -> std::sync::MutexGuard<'_, Option<Incoming>> {
    kept.lock().unwrap_or_else(|e| e.into_inner())
}

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut *incoming(&self.0) {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        incoming(&self.0).as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        incoming(&self.0)
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// An answer's body that holds its request's body until the answer is done with, then
/// reads what the client still sends of it, within limits.
struct KeepingRequestBody {
    answer: Body,
    request: Kept,
}

impl Drop for KeepingRequestBody {
    fn drop(&mut self) {
        let Some(mut body) = incoming(&self.request).take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut read = 0;
            let _ = tokio::time::timeout(UNREAD_BODY_TIME, async {
                while read <= UNREAD_BODY_BYTES {
                    match body.frame().await {
                        Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                        _ => break,
                    }
                }
            })
            .await;
        });
    }
}

impl http_body::Body for KeepingRequestBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.answer).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.answer.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.answer.size_hint()
    }
}
