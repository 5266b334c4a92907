//! `stream-upstream`: an OpenAI-compatible upstream that streams like a model. Every
//! `POST /v1/chat/completions` gets a role chunk at once, then one token a chunk every
//! 20–50 ms (`max_tokens` of them, or `--chunks`), then, when the request asks for
//! `stream_options.include_usage`, a usage chunk with the exact counts, then `[DONE]`.
//! Each chunk carries `"bench":{"seq","sent","late","req"}`: its number, when it was
//! sent and how late against the schedule (µs), and when the request came in.
//! `GET /healthz` answers 200.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use llmgate_bench_stream::chunk::{content_event, usage_and_done, wall_us, Stamp};
use llmgate_bench_stream::stats::Intervals;
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::{Instant, Sleep};

#[derive(Parser, Debug)]
#[command(about = "An SSE upstream that streams like a model (bench/stream.sh)")]
struct Args {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:18101")]
    listen: SocketAddr,
    /// Content chunks per answer when the request sets no max_tokens
    #[arg(long, default_value_t = 300)]
    chunks: u64,
    /// Shortest interval between two chunks, ms
    #[arg(long, default_value_t = 20)]
    min_interval_ms: u64,
    /// Longest interval between two chunks, ms
    #[arg(long, default_value_t = 50)]
    max_interval_ms: u64,
    /// Worker threads
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    llmgate_bench_stream::block_on(args.threads, serve(args));
}

async fn serve(args: Args) {
    let listener =
        listen(args.listen).unwrap_or_else(|err| panic!("cannot listen on {}: {err}", args.listen));
    println!("stream-upstream listening on http://{}", args.listen);
    let args: &'static Args = Box::leak(Box::new(args));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of files for a moment: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, args));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A listener whose queue holds a whole ramp of new connections (Tokio's default is
/// 1 024): a full queue drops a SYN, which the proxy retries a second later, and that
/// second would count against the proxy.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connections waiting to be accepted (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 16_384;

type Body = Either<ModelStream, Full<Bytes>>;

async fn answer(request: Request<Incoming>, args: &Args) -> Result<Response<Body>, Infallible> {
    let request_us = wall_us();
    if request.uri().path() == "/healthz" {
        return Ok(Response::new(Either::Right(Full::new(Bytes::from_static(
            b"ok",
        )))));
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let mut response = Response::new(Either::Right(Full::default()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let chunks = request["max_tokens"].as_u64().unwrap_or(args.chunks).max(1);
    let include_usage = request["stream_options"]["include_usage"] == true;
    let stream = ModelStream::new(args, chunks, include_usage, request_us);
    let mut response = Response::new(Either::Left(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(response)
}

/// One answer being streamed: a body whose frames come on the model's schedule.
#[derive(Debug)]
struct ModelStream {
    next_seq: u64,
    chunks: u64,
    include_usage: bool,
    request_us: u64,
    /// When the next chunk is due.
    due: Instant,
    sleep: Pin<Box<Sleep>>,
    intervals: Intervals,
    finished: bool,
}

static STREAMS: AtomicU64 = AtomicU64::new(0);

impl ModelStream {
    fn new(args: &Args, chunks: u64, include_usage: bool, request_us: u64) -> Self {
        let now = Instant::now();
        Self {
            next_seq: 0,
            chunks,
            include_usage,
            request_us,
            due: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            intervals: Intervals::new(
                STREAMS.fetch_add(1, Ordering::Relaxed),
                args.min_interval_ms,
                args.max_interval_ms,
            ),
            finished: false,
        }
    }
}

impl http_body::Body for ModelStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = Instant::now();
        let stamp = Stamp {
            seq: self.next_seq as u32,
            sent_us: wall_us(),
            late_us: now.saturating_duration_since(self.due).as_micros() as u64,
            request_us: self.request_us,
        };
        let last = self.next_seq == self.chunks;
        let mut event = content_event(&stamp, last);
        if last {
            self.finished = true;
            if self.include_usage {
                event.push_str(&usage_and_done(self.chunks));
            } else {
                event.push_str("data: [DONE]\n\n");
            }
        } else {
            self.next_seq += 1;
            // The schedule, not the time this chunk went out, sets the next one: a late
            // chunk does not push the rest back.
            let due = self.due + Duration::from_micros(self.intervals.next_us());
            self.due = due;
            self.sleep.as_mut().reset(due);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}
