//! The proxy's upstream connections, against real HTTP/1 servers on 127.0.0.1: kept
//! alive and reused, replaced when the upstream closed them, never reused half-read.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use llmgate_core::proxy::{Proxy, ProxyConfig};
use tower::ServiceExt;

/// How an upstream treats its connections.
#[derive(Clone, Copy)]
enum Mode {
    /// Keep-alive, answers at once.
    KeepAlive,
    /// Keep-alive, but closes a connection 200 ms after it opened, without saying so
    /// in the response (what a server's keep-alive timeout does to an idle pooled
    /// connection).
    CloseWhenIdle,
    /// Streams a body slowly, one chunk per 50 ms.
    Slow,
}

struct Upstream {
    url: String,
    connections: Arc<AtomicUsize>,
    /// Connections it has closed.
    closed: Arc<AtomicUsize>,
    /// (URI, Host header) of every request.
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

async fn upstream(mode: Mode) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let (count, log, closes) = (connections.clone(), seen.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            let closes = closes.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let host = request
                    .headers()
                    .get(http::header::HOST)
                    .map(|h| h.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                log.lock().unwrap().push((request.uri().to_string(), host));
                async move {
                    let body = match mode {
                        Mode::Slow => {
                            let chunks = futures_util::stream::unfold(0, |n| async move {
                                if n == 5 {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                Some((
                                    Ok::<_, Infallible>(Frame::data(Bytes::from("chunk\n"))),
                                    n + 1,
                                ))
                            });
                            StreamBody::new(chunks).boxed()
                        }
                        _ => Full::new(Bytes::from_static(b"{\"ok\":true}"))
                            .map_err(|e| match e {})
                            .boxed(),
                    };
                    Ok::<_, Infallible>(Response::new(body))
                }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if matches!(mode, Mode::CloseWhenIdle) {
                    let _ = tokio::time::timeout(Duration::from_millis(200), connection).await;
                } else {
                    let _ = connection.await;
                }
                closes.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Upstream {
        url,
        connections,
        closed,
        seen,
    }
}

async fn call(proxy: &Proxy, path: &str) -> (u16, Bytes) {
    let request = Request::post(path)
        .header("authorization", "Bearer sk-lg-client-key")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = proxy.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = upstream(Mode::KeepAlive).await;
    let proxy = Proxy::new(ProxyConfig::new(upstream.url.parse().unwrap())).unwrap();
    for _ in 0..20 {
        assert_eq!(
            call(&proxy, "/v1/models").await,
            (200, Bytes::from_static(b"{\"ok\":true}"))
        );
    }
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        1,
        "one connection for 20 requests in a row"
    );

    // Concurrent requests open at most one connection each, and those are reused.
    let calls = (0..8).map(|_| call(&proxy, "/v1/models"));
    for (status, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    let after_burst = upstream.connections.load(Ordering::SeqCst);
    assert!(after_burst <= 9, "{after_burst} connections");
    for _ in 0..8 {
        call(&proxy, "/v1/models").await;
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), after_burst);
}

#[tokio::test]
async fn requests_go_upstream_in_origin_form_with_the_upstreams_host() {
    let upstream = upstream(Mode::KeepAlive).await;
    let proxy = Proxy::new(ProxyConfig::new(upstream.url.parse().unwrap())).unwrap();
    call(&proxy, "/v1/chat/completions?x=1").await;
    let seen = upstream.seen.lock().unwrap().clone();
    let host = upstream.url.trim_start_matches("http://").to_owned();
    assert_eq!(seen, vec![("/v1/chat/completions?x=1".to_owned(), host)]);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced_without_an_error() {
    let upstream = upstream(Mode::CloseWhenIdle).await;
    let proxy = Proxy::new(ProxyConfig::new(upstream.url.parse().unwrap())).unwrap();
    for i in 1..=5 {
        assert_eq!(call(&proxy, "/v1/models").await.0, 200);
        // The upstream closes the connection while it is idle, and the close reaches
        // the pool (a slow test thread must not send the next request before it does).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while upstream.closed.load(Ordering::SeqCst) < i {
            assert!(std::time::Instant::now() < deadline, "never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_response_dropped_half_read_does_not_hand_its_connection_on() {
    let upstream = upstream(Mode::Slow).await;
    let proxy = Proxy::new(ProxyConfig::new(upstream.url.parse().unwrap())).unwrap();
    let request = Request::get("/v1/slow")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = proxy.clone().oneshot(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk\n");
    drop(body);
    // The next request must get a whole, clean answer of its own.
    let (status, body) = call(&proxy, "/v1/slow").await;
    assert_eq!((status, body), (200, Bytes::from("chunk\n".repeat(5))));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    // A body read to its end gives its connection back.
    call(&proxy, "/v1/slow").await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

/// Runs `work` on a thread of its own, on a single-threaded runtime of its own.
fn on_own_event_loop<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    })
}

/// One proxy used from two threads that each run their own event loop (as a service
/// with a single-threaded runtime per thread does): each loop's requests go over
/// connections opened on that loop, which keep being reused there. A connection is never
/// handed to another loop: its answer would only be noticed when its own loop next
/// looks, so one busy thread would hold up requests on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_loop_reuses_its_own_connections() {
    let upstream = upstream(Mode::KeepAlive).await;
    let proxy = Proxy::new(ProxyConfig::new(upstream.url.parse().unwrap())).unwrap();
    let (opened, is_open) = std::sync::mpsc::channel();
    let busy = on_own_event_loop({
        let proxy = proxy.clone();
        async move {
            for _ in 0..3 {
                assert_eq!(call(&proxy, "/v1/models").await.0, 200);
            }
            opened.send(()).unwrap();
            // Busy: this event loop looks at nothing for 2 seconds.
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    tokio::task::spawn_blocking(move || is_open.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    let other = on_own_event_loop({
        let proxy = proxy.clone();
        async move {
            let started = std::time::Instant::now();
            for _ in 0..10 {
                assert_eq!(call(&proxy, "/v1/models").await.0, 200);
            }
            started.elapsed()
        }
    });
    let took = tokio::task::spawn_blocking(move || other.join().unwrap())
        .await
        .unwrap();
    assert!(
        took < Duration::from_secs(1),
        "another thread's requests waited for the busy one: {took:?}"
    );
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    tokio::task::spawn_blocking(move || busy.join().unwrap())
        .await
        .unwrap();
}
