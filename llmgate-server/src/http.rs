//! Serving the [`App`] over TCP: hyper's HTTP/1.1 and HTTP/2 (told apart per
//! connection), no Nagle delay, and a graceful shutdown that lets requests in flight
//! finish.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::Service;

use crate::app::App;

/// Accepts connections until `shutdown` completes, then stops accepting and waits for
/// the connections to finish what they are doing.
pub async fn serve(listener: TcpListener, app: App, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // No Nagle delay: streamed tokens are small writes that must go out at once.
        let _ = stream.set_nodelay(true);
        let service = ConnectionService(RefCell::new(app.clone()));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
    type Future = <App as Service<Request>>::Future;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.0.borrow_mut().call(request.map(Body::new))
    }
}
