//! Serving the [`App`] over TCP: hyper's HTTP/1.1 and HTTP/2 (told apart per
//! connection), no Nagle delay, bounded connections ([`ConnectionLimits`]: how many, how
//! slow, how idle) and a graceful shutdown that lets requests in flight finish, up to a
//! deadline.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use llmgate_core::config::GatewayConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::app::{App, AppBody};

/// What one client may hold of the gateway, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From the first byte of a request (or of a connection's first bytes) to a whole
    /// request head: a client that sends its head a byte at a time is cut off.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; beyond this the gateway stops accepting until one
    /// closes (new clients wait in the listen backlog).
    pub max_connections: usize,
    /// After SIGTERM, how long requests in flight may take to finish before their
    /// connections are closed (their usage is still recorded).
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::from_config(&GatewayConfig::default())
    }
}

impl ConnectionLimits {
    /// The limits `config` sets; `max_connections` unset means as many as the process's
    /// file descriptors allow (each proxied connection needs two: client and upstream).
    pub fn from_config(config: &GatewayConfig) -> Self {
        let by_files = usize::try_from(open_files_limit().saturating_sub(128) / 2)
            .unwrap_or(usize::MAX)
            .max(16);
        Self {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            max_connections: config.max_connections.map_or_else(
                || by_files.min(llmgate_core::config::DEFAULT_MAX_CONNECTIONS as usize),
                |n| usize::try_from(n).unwrap_or(usize::MAX),
            ),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
        }
    }
}

/// The process's (soft) limit on open files.
fn open_files_limit() -> u64 {
    #[cfg(unix)]
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        return soft;
    }
    1024
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime does: a
/// gateway holds two descriptors per proxied connection, and the usual soft limit of
/// 1 024 is reached by a few hundred clients. Called once, before the limits are read.
pub fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    tracing::warn!(error = %err, soft, hard, "cannot raise the open files limit");
                }
            }
        }
    }
}

/// Accepts connections until `shutdown` completes, then stops accepting and waits for
/// the connections to finish what they are doing. Connections are served on the
/// current runtime (see [`serve_on_loops`] for the gateway's own way).
pub async fn serve(listener: TcpListener, app: App, shutdown: impl Future<Output = ()>) {
    serve_with(listener, app, ConnectionLimits::default(), shutdown).await;
}

/// [`serve`] with the given limits.
pub async fn serve_with(
    listener: TcpListener,
    app: App,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = Connections::new(app, limits);
    let mut shutdown = std::pin::pin!(shutdown);
    while let Some((stream, slot)) = accept(&listener, &slots, shutdown.as_mut()).await {
        connections.serve(stream, slot);
    }
    drop(listener);
    connections.shut_down().await;
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
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut started = Vec::with_capacity(loops);
    for i in 0..loops.max(1) {
        started.push(EventLoop::start(i, app.clone(), limits)?);
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    while let Some((stream, slot)) = accept(&listener, &slots, shutdown.as_mut()).await {
        let target = started
            .iter()
            .min_by_key(|l| l.open.load(Ordering::Relaxed))
            .expect("at least one loop");
        target.hand_over(stream, slot);
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
    connections: mpsc::UnboundedSender<(std::net::TcpStream, OwnedSemaphorePermit)>,
    open: Arc<AtomicUsize>,
    finished: oneshot::Receiver<()>,
}

impl EventLoop {
    fn start(index: usize, app: App, limits: ConnectionLimits) -> std::io::Result<Self> {
        let (connections, mut queue) = mpsc::unbounded_channel();
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
                    tokio::spawn(crate::allocator::give_back_freed_memory_when_quiet(
                        requests_begun_here,
                    ));
                    let mut served = Connections::new(app, limits);
                    served.open = Some(counter.clone());
                    while let Some((stream, slot)) = queue.recv().await {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => served.serve(stream, slot),
                            Err(err) => {
                                counter.fetch_sub(1, Ordering::Relaxed);
                                tracing::warn!(error = %err, "cannot serve a connection");
                            }
                        }
                    }
                    served.shut_down().await;
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

    fn hand_over(&self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hand a connection over");
                return;
            }
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        if self.connections.send((stream, slot)).is_err() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("a serving thread has stopped; a connection was closed");
        }
    }
}

/// The connections one runtime serves, and how they are stopped.
struct Connections {
    app: App,
    limits: ConnectionLimits,
    builders: Arc<Builders>,
    graceful: GracefulShutdown,
    tasks: TaskTracker,
    /// Becomes true when the shutdown starts: a connection that has not sent its first
    /// bytes yet closes.
    closing: watch::Sender<bool>,
    /// Becomes true when the shutdown deadline has passed: every connection closes.
    force_close: watch::Sender<bool>,
    /// Counts down as connections close (the loops' load, for handing out new ones).
    open: Option<Arc<AtomicUsize>>,
}

/// hyper-util's `auto` builder fixed to each protocol, for a connection whose protocol
/// [`peek_protocol`] has told, and left to tell it itself for one whose first bytes do
/// not yet say.
struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    undecided: auto::Builder<TokioExecutor>,
}

/// What a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// The bytes so far begin the HTTP/2 preface but do not complete it.
    Undecided,
}

/// The first bytes of every HTTP/2 connection with prior knowledge (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 from HTTP/1 by peeking at a new connection's first bytes, which stay in
/// the socket for hyper. `auto` reads them itself instead and hands them back: hyper's
/// first read then returns only those few bytes, and the next one doubles its 8 KiB read
/// buffer: 5–6 KiB more resident memory for each open stream (docs/benchmarks.md).
///
/// Bytes that begin the preface without completing it are left to `auto`, which waits
/// for the rest on the socket's readiness: peeking again would find the same bytes at
/// once, and a client that stops there would keep the loop polling (a timer and a
/// system call every few milliseconds, for each such connection) until the head timeout.
async fn peek_protocol(stream: &TcpStream) -> Protocol {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) if n == H2_PREFACE.len() && first == H2_PREFACE => Protocol::Http2,
        Ok(n) if n > 0 && first[..n] == H2_PREFACE[..n] => Protocol::Undecided,
        // Anything else, or the client gone: hyper's HTTP/1 reads it and answers or
        // closes.
        _ => Protocol::Http1,
    }
}

impl Connections {
    fn new(app: App, limits: ConnectionLimits) -> Self {
        Self {
            app,
            limits,
            builders: Arc::new(Builders {
                http1: auto::Builder::new(TokioExecutor::new()).http1_only(),
                http2: auto::Builder::new(TokioExecutor::new()).http2_only(),
                undecided: auto::Builder::new(TokioExecutor::new()),
            }),
            graceful: GracefulShutdown::new(),
            tasks: TaskTracker::new(),
            closing: watch::channel(false).0,
            force_close: watch::channel(false).0,
            open: None,
        }
    }

    /// Serves one connection on the current runtime until it closes, is idle or slow
    /// past the limits, or is closed at the shutdown deadline.
    fn serve(&self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let activity = Arc::new(Activity::default());
        let app = self.app.clone();
        let builders = self.builders.clone();
        // Made now, before a shutdown can start, so that the connection sees it.
        let watcher = self.graceful.watcher();
        let mut closing = self.closing.subscribe();
        let connection_activity = activity.clone();
        let open = self.open.clone();
        let limits = self.limits;
        let mut force_close = self.force_close.subscribe();
        let mut served = self.tasks.spawn(async move {
            let protocol = tokio::select! {
                protocol = peek_protocol(&stream) => protocol,
                _ = closing.wait_for(|closing| *closing) => return,
            };
            let io = WatchedIo {
                io: stream,
                activity: connection_activity.clone(),
            };
            let service = ConnectionService {
                app: RefCell::new(app),
                activity: connection_activity,
            };
            let builder = match protocol {
                Protocol::Http1 => &builders.http1,
                Protocol::Http2 => &builders.http2,
                Protocol::Undecided => &builders.undecided,
            };
            let connection = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection closed with an error");
            }
        });
        // The limits are watched from a task of their own, which aborts the connection's:
        // the connection's task, woken for every read and write, polls nothing else.
        self.tasks.spawn(async move {
            let closed_by: Option<&'static str> = tokio::select! {
                _ = &mut served => None,
                reason = activity.watchdog(limits) => Some(reason),
                _ = force_close.wait_for(|closing| *closing) => Some("the shutdown deadline"),
            };
            if let Some(reason) = closed_by {
                tracing::debug!(reason, "connection closed");
                served.abort();
                let _ = served.await;
            }
            drop(slot);
            if let Some(open) = open {
                open.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }

    /// Lets the connections finish their requests, for at most `shutdown_timeout`; then
    /// closes the rest. Their answers' usage is settled as their bodies are dropped.
    async fn shut_down(self) {
        self.tasks.close();
        let _ = self.closing.send(true);
        let in_time = tokio::time::timeout(self.limits.shutdown_timeout, self.graceful.shutdown())
            .await
            .is_ok();
        if !in_time {
            tracing::warn!(
                open = self.tasks.len() / 2, // two tasks a connection: it and its watchdog
                deadline_secs = self.limits.shutdown_timeout.as_secs(),
                "closing connections still open at the shutdown deadline"
            );
            let _ = self.force_close.send(true);
        }
        self.tasks.wait().await;
    }
}

/// The next connection and its slot, or `None` once `shutdown` completes. Waits for a
/// slot first: at `max_connections` the gateway leaves new clients in the backlog.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let slot = tokio::select! {
        slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        () = &mut shutdown => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // No Nagle delay: streamed tokens are small writes that must go out at once.
                    let _ = stream.set_nodelay(true);
                    return Some((stream, slot));
                }
                Err(err) => accept_failed(err).await,
            },
            () = &mut shutdown => return None,
        }
    }
}

/// A failed accept: a client that left before it was accepted is nothing; anything
/// else (out of file descriptors) is logged and waited out briefly instead of spinning,
/// and accepting goes on as soon as a descriptor is free.
async fn accept_failed(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accepting a connection failed; retrying");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// What a connection's watchdog needs to know: bytes from the client, and requests
/// whose answers are not done.
#[derive(Debug, Default)]
struct Activity {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// The last write found the client's socket full: the client is not reading.
    write_blocked: std::sync::atomic::AtomicBool,
    /// Requests begun on the connection, ever.
    requests: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    /// Completes when the connection breaks a limit: no whole request head within
    /// `header_read_timeout` of its first byte (or of the connection's opening: a
    /// connection that sends nothing holds a slot no longer than a slow one), no request
    /// in flight for `idle_timeout`, or an answer the client does not read for
    /// `idle_timeout`. A request in flight is otherwise left alone: a slow model is the
    /// upstream timeout's business, a slow upload the body's.
    async fn watchdog(&self, limits: ConnectionLimits) -> &'static str {
        let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut idle_since = Instant::now();
        let mut head_since: Option<Instant> = Some(idle_since);
        let mut bytes_seen = self.bytes_read.load(Ordering::Relaxed);
        let mut requests_seen = self.requests.load(Ordering::Relaxed);
        let mut written_seen = self.bytes_written.load(Ordering::Relaxed);
        let mut blocked_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let bytes = self.bytes_read.load(Ordering::Relaxed);
            let requests = self.requests.load(Ordering::Relaxed);
            let written = self.bytes_written.load(Ordering::Relaxed);
            if written == written_seen && self.write_blocked.load(Ordering::Relaxed) {
                // Counted from the tick before, as the socket may have filled just after it.
                let since = *blocked_since.get_or_insert(now - tick);
                if now - since >= limits.idle_timeout {
                    return "the client does not read its answer";
                }
            } else {
                blocked_since = None;
            }
            written_seen = written;
            if requests != requests_seen || self.in_flight.load(Ordering::Relaxed) > 0 {
                // A request came (and maybe went) since the last look.
                idle_since = now;
                head_since = None;
                bytes_seen = bytes;
                requests_seen = requests;
                continue;
            }
            if bytes != bytes_seen {
                bytes_seen = bytes;
                // The first bytes since the last request: a head is on its way. Counted
                // from the tick before, as they may have come just after it.
                head_since.get_or_insert(now - tick);
            }
            if head_since.is_some_and(|since| now - since >= limits.header_read_timeout) {
                return "request head not received in time";
            }
            if head_since.is_none() && now - idle_since >= limits.idle_timeout {
                return "idle";
            }
        }
    }
}

impl Activity {
    /// Notes a write's outcome: bytes out, or a full socket.
    fn wrote(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(Ok(n)) => {
                self.bytes_written.fetch_add(*n as u64, Ordering::Relaxed);
                self.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Ready(Err(_)) => {}
        }
    }
}

/// The client's socket, counting what it reads and writes for the watchdog.
struct WatchedIo {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity
                .bytes_read
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One request in flight on a connection, from its head until its answer's body is
/// done or dropped.
struct InFlight(Arc<Activity>);

thread_local! {
    /// Requests begun on this thread, ever.
    static REQUESTS_BEGUN_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Requests begun on all serving threads, as each last told at its quiet check (at most
/// [`crate::allocator::PURGE_DELAY_MS`] behind).
static REQUESTS_BEGUN: AtomicU64 = AtomicU64::new(0);

/// Requests begun on the calling serving thread; adds those begun since its last call to
/// [`requests_begun`]. Called once a tick, not per request: the count per request stays a
/// thread's own.
fn requests_begun_here() -> u64 {
    thread_local! {
        static TOLD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let now = REQUESTS_BEGUN_HERE.with(std::cell::Cell::get);
    let told = TOLD.with(|told| told.replace(now));
    REQUESTS_BEGUN.fetch_add(now - told, Ordering::Relaxed);
    now
}

/// Requests begun on all serving threads (see [`requests_begun_here`]).
pub fn requests_begun() -> u64 {
    REQUESTS_BEGUN.load(Ordering::Relaxed)
}

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        REQUESTS_BEGUN_HERE.with(|n| n.set(n.get() + 1));
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The app as one connection sees it. hyper calls a connection's service from that
/// connection's task, one call at a time, so the app is borrowed for each call instead
/// of cloned per request.
struct ConnectionService {
    app: RefCell<App>,
    activity: Arc<Activity>,
}

type AppFuture = <App as Service<Request>>::Future;
type AppError = <App as Service<Request>>::Error;

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = axum::response::Response;
    type Error = AppError;
    type Future = AnswerFuture;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::new(&self.activity);
        if request.version() != hyper::Version::HTTP_2 || request.body().is_end_stream() {
            let answer = self.app.borrow_mut().call(request.map(Body::new));
            return AnswerFuture {
                answer,
                held: Some(Held {
                    _in_flight: in_flight,
                    request: None,
                }),
            };
        }
        // An HTTP/2 request whose body may be left unread (refused before it is read):
        // what is left of the body is read after the answer has been sent, as nginx
        // does. Dropped unread, the stream would be reset, and clients such as curl
        // report a reset as a failure instead of showing the answer (a reset with
        // NO_ERROR after the answer is allowed, RFC 9113 8.1, but not understood by all).
        let (parts, body) = request.into_parts();
        let body = Arc::new(Mutex::new(Some(body)));
        let request = Request::from_parts(parts, Body::new(SharedBody(body.clone())));
        AnswerFuture {
            answer: self.app.borrow_mut().call(request),
            held: Some(Held {
                _in_flight: in_flight,
                request: Some(body),
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// An answer on its way, with what its body will hold.
    struct AnswerFuture {
        #[pin]
        answer: AppFuture,
        held: Option<Held>,
    }
}

impl Future for AnswerFuture {
    type Output = Result<axum::response::Response, AppError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.answer.poll(cx))?;
        let held = this.held.take();
        Poll::Ready(Ok(response.map(|answer| {
            Body::new(HoldingBody {
                answer,
                _held: held,
            })
        })))
    }
}

/// What an answer's body holds until it is done with: the request's place among those
/// in flight, and (HTTP/2) the request's body, whose unread rest is read on drop.
struct Held {
    _in_flight: InFlight,
    request: Option<Kept>,
}

/// An answer's body, with what it [`Held`].
struct HoldingBody {
    answer: AppBody,
    _held: Option<Held>,
}

impl http_body::Body for HoldingBody {
    type Data = Bytes;
    type Error = llmgate_core::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, llmgate_core::BoxError>>> {
        Pin::new(&mut self.answer).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.answer.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.answer.size_hint()
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

impl Drop for Held {
    /// Reads what the client still sends of a request body left unread, within limits.
    fn drop(&mut self) {
        let Some(mut body) = self.request.as_ref().and_then(|kept| incoming(kept).take()) else {
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
