//! Keep-alive HTTP/1 connections to a plain `http://` upstream (the model server on this
//! machine or the next), each driven by the task that uses it.
//!
//! hyper's pooled client runs every connection as a task of its own and spawns another
//! per request to put the connection back, so one proxied request wakes three tasks,
//! often on the other worker thread. Here the request's own task polls the upstream
//! connection: first while it waits for the response head, then inside the response body
//! ([`UpstreamBody`]) while the body streams to the client, as nginx serves both sides of
//! a request from one event loop. When the body has ended the connection goes back to the
//! pool; a body dropped before its end (the client left) closes it.
//!
//! A connection is only reused on the Tokio runtime it was opened on: its socket is
//! registered with that runtime's event loop, which alone tells of its answers. A
//! service with a single-threaded runtime per thread (as `llmgate serve` serves) keeps
//! each request and its upstream connection on one thread; on one multi-threaded
//! runtime every connection is every task's.
//!
//! An idle connection is polled by nobody, so one the upstream has closed is noticed when
//! it is taken out: it is polled once then, and a closed one is thrown away. A request
//! that a reused connection could not even start to send is sent again on another.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::ConnectError;
use super::ProxyError;
use crate::BoxError;

/// The body type of requests sent upstream.
pub(crate) type OutBody = UnsyncBoxBody<Bytes, BoxError>;

/// At most this many idle connections are kept.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

struct Conn {
    sender: http1::SendRequest<OutBody>,
    driver: http1::Connection<TokioIo<TcpStream>, OutBody>,
    idle_since: Instant,
    /// The runtime whose I/O driver the socket is registered with.
    runtime: tokio::runtime::Id,
}

impl Conn {
    /// Lets the connection read and write what it can; false once it is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.driver).poll(cx).is_pending()
    }
}

/// The idle connections to one upstream address.
pub(crate) struct Pool {
    /// `host:port`, as `TcpStream::connect` takes it.
    address: String,
    /// Boxed, so that taking one out and handing it to a response body moves a pointer,
    /// not the connection's ~700 bytes of state.
    #[allow(clippy::vec_box)] // each is moved out, into a response body, and back
    idle: Mutex<Vec<Box<Conn>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(authority: &http::uri::Authority) -> Arc<Self> {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let address = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Arc::new(Self {
            address,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` (origin-form URI, `Host` set) and returns the response, whose body
    /// drives the connection until it ends.
    pub(crate) async fn send(
        self: Arc<Self>,
        mut request: Request<OutBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(conn) => (conn, true),
                // Rare (the first requests, or after a close): boxed, so that its state
                // does not make every request's future larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            let mut response = std::pin::pin!(conn.sender.try_send_request(request));
            let mut conn = Some(conn);
            let sent = poll_fn(|cx| {
                if conn.as_mut().is_some_and(|c| !c.drive(cx)) {
                    // Closed. Dropping it hands back a request it never took, with an
                    // error, so the response below is never left waiting.
                    conn = None;
                }
                response.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(response) => {
                    return Ok(response.map(|body| UpstreamBody::pooled(body, conn, self.clone())));
                }
                // A reused connection closed before the request went out: another try.
                Err(mut err) if reused && err.message().is_some() => {
                    request = err.take_message().expect("checked");
                }
                Err(err) => return Err(ProxyError::Unreachable(err.into_error().into())),
            }
        }
    }

    /// The most recently used idle connection of this runtime that is still open.
    async fn checkout(&self) -> Option<Box<Conn>> {
        let here = current_runtime();
        loop {
            let mut conn = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let at = idle.iter().rposition(|c| c.runtime == here)?;
                idle.remove(at)
            };
            if conn.idle_since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // A poll reads a close (or anything unexpected) the upstream sent meanwhile.
            let open = poll_fn(|cx| Poll::Ready(conn.drive(cx))).await;
            if open && conn.sender.is_ready() {
                return Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, ProxyError> {
        let stream = TcpStream::connect(&self.address).await.map_err(|source| {
            ProxyError::Unreachable(Box::new(ConnectError {
                address: self.address.to_string(),
                source,
            }))
        })?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| ProxyError::Unreachable(err.into()))?;
        Ok(Box::new(Conn {
            sender,
            driver,
            idle_since: Instant::now(),
            runtime: current_runtime(),
        }))
    }

    fn checkin(&self, mut conn: Box<Conn>) {
        let now = Instant::now();
        conn.idle_since = now;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest are at the front; close those past their time, and any over the cap.
        let expired = idle
            .iter()
            .take_while(|c| now.duration_since(c.idle_since) > IDLE_TIMEOUT)
            .count();
        let over = (idle.len() - expired + 1).saturating_sub(MAX_IDLE);
        idle.drain(..expired + over);
        idle.push(conn);
    }
}

/// The response body of an upstream request: hyper's body, plus the connection it
/// arrives on, which this body drives and then hands back to the pool at its end.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<(Box<Conn>, Arc<Pool>)>,
    /// How long the upstream may go without sending a byte of the body.
    stall_limit: Option<Duration>,
    /// Made at the first wait for the upstream (a body that is all there needs none).
    stall_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The timer runs: the body waits, and no frame came since it was set.
    waiting: bool,
}

/// Why an upstream's body broke off.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    /// The connection failed or the upstream sent something that is not HTTP.
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// The upstream sent nothing for this long in the middle of its answer.
    #[error("the upstream sent nothing for {0:?} in the middle of its answer")]
    Stalled(Duration),
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn pooled(inner: Incoming, conn: Option<Box<Conn>>, pool: Arc<Pool>) -> Self {
        let mut body = Self {
            inner,
            lease: conn.map(|conn| (conn, pool)),
            stall_limit: None,
            stall_timer: None,
            waiting: false,
        };
        if body.inner.is_end_stream() {
            body.release(None);
        }
        body
    }

    /// A body whose connection hyper's own client drives.
    pub(crate) fn unpooled(inner: Incoming) -> Self {
        Self {
            inner,
            lease: None,
            stall_limit: None,
            stall_timer: None,
            waiting: false,
        }
    }

    /// Ends the body with [`UpstreamBodyError::Stalled`] when the upstream sends nothing
    /// for `limit` (a hung model server would otherwise hold its client for ever).
    pub(crate) fn stall_after(&mut self, limit: Duration) {
        self.stall_limit = Some(limit);
    }

    /// Whether the upstream has been silent for too long; arms the timer at the start
    /// of a wait.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let limit = self.stall_limit?;
        let deadline = tokio::time::Instant::now() + limit;
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            timer.as_mut().reset(deadline);
            self.waiting = true;
        }
        timer.as_mut().poll(cx).is_ready().then_some(limit)
    }

    /// The body is complete: the connection goes back to the pool once it is ready for
    /// the next request (it needs one more poll to get there when it just read the end).
    fn release(&mut self, cx: Option<&mut Context<'_>>) {
        let Some((mut conn, pool)) = self.lease.take() else {
            return;
        };
        if !conn.sender.is_ready() {
            // Without a task to wake (the body ended as it was made), a no-op waker.
            let open = match cx {
                Some(cx) => conn.drive(cx),
                None => conn.drive(&mut Context::from_waker(std::task::Waker::noop())),
            };
            if !open || !conn.sender.is_ready() {
                return;
            }
        }
        pool.checkin(conn);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = &mut *self;
        let mut frame = Pin::new(&mut this.inner).poll_frame(cx);
        if frame.is_pending() {
            if let Some((conn, _)) = &mut this.lease {
                if !conn.drive(cx) {
                    this.lease = None;
                }
                frame = Pin::new(&mut this.inner).poll_frame(cx);
            }
        }
        if frame.is_pending() {
            if let Some(limit) = this.stalled(cx) {
                tracing::warn!(after = ?limit, "the upstream stalled mid-answer; closing it");
                this.lease = None;
                this.stall_limit = None;
                return Poll::Ready(Some(Err(UpstreamBodyError::Stalled(limit))));
            }
            return Poll::Pending;
        }
        this.waiting = false;
        let frame = ready!(frame).map(|f| f.map_err(UpstreamBodyError::from));
        match &frame {
            None => this.release(Some(cx)),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(Some(cx)),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The runtime a connection opened now is registered with (a pool is only used on
/// one: its sockets are Tokio's).
fn current_runtime() -> tokio::runtime::Id {
    tokio::runtime::Handle::current().id()
}
