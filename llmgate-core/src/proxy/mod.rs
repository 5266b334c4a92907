//! Forwarding to the upstream model server through a pooled hyper client.
//!
//! [`Proxy`] is a plain tower `Service`: put [`AuthUsageLayer`](crate::AuthUsageLayer)
//! in front of it and you have the gateway's request path. Response bodies stream
//! through as they arrive; failures become OpenAI-shaped 502/504 responses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::Service;

pub(crate) mod error;
mod pool;

pub use error::ProxyError;
pub use pool::{UpstreamBody, UpstreamBodyError};

use crate::auth::Secret;
use crate::error::ApiError;
use crate::BoxError;

/// Whether a request path means what it says: no `.` or `..` segment (also written
/// `%2e`), no encoded `/` or `\`, and no `\`. An upstream (or a server in front of
/// it) that resolves such paths would otherwise let a key holder reach paths outside
/// `/v1` with the gateway's `upstream_key`: `/v1/../admin`, `/v1/%2e%2e/admin`.
pub fn is_plain_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    // The usual path has none of these characters: one pass, nothing else to do.
    if !bytes.iter().any(|&b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    if bytes.contains(&b'\\') {
        return false;
    }
    path.split('/').all(|segment| {
        let lower = segment.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return false;
        }
        let decoded = lower.replace("%2e", ".");
        decoded != "." && decoded != ".."
    })
}

/// The body of a proxied response: the upstream's, streamed, or the gateway's error.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// Where and how to forward.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The upstream's base URL, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is
    /// accepted: `https://api.openai.com/v1` works as well).
    pub upstream: Uri,
    /// A key of the gateway's own, sent upstream as `Authorization: Bearer`.
    pub upstream_key: Option<Secret>,
    /// How long to wait for the upstream's response headers.
    pub timeout: Duration,
}

/// How long [`ProxyConfig::new`] waits for the upstream's response headers: a long
/// completion on a slow model server can take minutes before its first byte.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

impl ProxyConfig {
    /// Forward to `upstream` with no key and [`DEFAULT_UPSTREAM_TIMEOUT`].
    pub fn new(upstream: Uri) -> Self {
        Self {
            upstream,
            upstream_key: None,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
        }
    }
}

/// Forwards requests to the upstream. Cheap to clone; clones share the connections and
/// one upstream, which [`Proxy::set_upstream`] can switch (a model started or stopped at
/// run time).
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    target: RwLock<Option<Arc<Target>>>,
    /// hyper's pooled client, for `https://` upstreams; made on first use.
    remote: OnceLock<RemoteClient>,
}

type RemoteClient = Client<Connector, UnsyncBoxBody<Bytes, BoxError>>;

struct Target {
    /// For a plain `http://` upstream: connections driven by the requests' own tasks.
    /// `https://` upstreams (TLS, HTTP/2) go through hyper's pooled client.
    pool: Option<Arc<pool::Pool>>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    /// The `Host` header for the upstream.
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let upstream = self
            .current()
            .map(|t| format!("{}://{}{}", t.scheme, t.authority, t.base_path));
        f.debug_struct("Proxy")
            .field("upstream", &upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy to the configured upstream.
    pub fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        let proxy = Self::without_upstream();
        proxy.set_upstream(Some(config))?;
        Ok(proxy)
    }

    /// A proxy with no upstream yet: requests get 503 until [`Proxy::set_upstream`].
    pub fn without_upstream() -> Self {
        Self {
            shared: Arc::new(Shared {
                target: RwLock::new(None),
                remote: OnceLock::new(),
            }),
        }
    }

    fn remote(&self) -> &RemoteClient {
        self.shared.remote.get_or_init(|| {
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_keepalive(Some(Duration::from_secs(60)));
            http.enforce_http(false);
            #[cfg(feature = "tls")]
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            #[cfg(not(feature = "tls"))]
            let connector = http;
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector)
        })
    }

    /// Points every clone at a new upstream, or at none (requests then get 503).
    pub fn set_upstream(&self, config: Option<ProxyConfig>) -> Result<(), ProxyError> {
        let target = config.map(Target::new).transpose()?.map(Arc::new);
        *self
            .shared
            .target
            .write()
            .unwrap_or_else(|e| e.into_inner()) = target;
        Ok(())
    }

    /// Whether an upstream is set.
    pub fn has_upstream(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<Target>> {
        self.shared
            .target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Target {
    fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        let parts = config.upstream.into_parts();
        let scheme = parts.scheme.ok_or_else(|| {
            ProxyError::BadRequest("the upstream URL needs http:// or https://".into())
        })?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(ProxyError::BadRequest(format!(
                "unsupported upstream scheme '{scheme}'"
            )));
        }
        #[cfg(not(feature = "tls"))]
        if scheme == http::uri::Scheme::HTTPS {
            return Err(ProxyError::BadRequest(
                "https upstreams need the 'tls' feature".into(),
            ));
        }
        let authority = parts
            .authority
            .ok_or_else(|| ProxyError::BadRequest("the upstream URL needs a host".into()))?;
        let path = parts
            .path_and_query
            .as_ref()
            .map_or("", |pq| pq.path())
            .trim_end_matches('/');
        // Requests arrive as /v1/...; a base that already ends in /v1 must not double it.
        let base_path = path.strip_suffix("/v1").unwrap_or(path).to_owned();
        let authorization = config
            .upstream_key
            .map(|key| {
                let mut value =
                    HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                        ProxyError::BadRequest("the upstream key has invalid characters".into())
                    })?;
                value.set_sensitive(true);
                Ok::<_, ProxyError>(value)
            })
            .transpose()?;

        let pool = (scheme == http::uri::Scheme::HTTP).then(|| pool::Pool::new(&authority));
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let host = HeaderValue::try_from(host)
            .map_err(|_| ProxyError::BadRequest("the upstream host is not valid".into()))?;
        Ok(Self {
            pool,
            scheme,
            authority,
            base_path,
            host,
            authorization,
            timeout: config.timeout,
        })
    }

    /// The upstream's path and query for a request's.
    fn upstream_path(&self, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
        if !is_plain_path(uri.path()) {
            return Err(ProxyError::UnsafePath);
        }
        let path_and_query = uri.path_and_query();
        if self.base_path.is_empty() {
            // The common case: no string building, the request's path is reused as is.
            return Ok(path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        let path_and_query = path_and_query.map_or("/", |pq| pq.as_str());
        PathAndQuery::try_from(format!("{}{}", self.base_path, path_and_query))
            .map_err(|e| ProxyError::InvalidUri(e.into()))
    }

    /// The upstream's absolute URI for a request's.
    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(self.upstream_path(uri)?);
        Uri::from_parts(parts).map_err(|e| ProxyError::InvalidUri(e.into()))
    }
}

/// Headers that are not forwarded: first those that belong to one connection, not to the
/// message (RFC 9110 §7.6.1), then, for requests only, those meant for the gateway: the
/// client's key, its `Host`, and `Accept-Encoding` (usage is read from the body, so the
/// gateway asks for it uncompressed).
static DROPPED: [HeaderName; 13] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
    header::HOST,
    header::ACCEPT_ENCODING,
];
/// How many of [`DROPPED`] are hop-by-hop.
const HOP_BY_HOP: usize = 8;

/// The index of a header name in [`DROPPED`]: a match on the name's text, which rules
/// most headers out by their length alone.
fn dropped_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-authenticate" => 2,
        "proxy-authorization" => 3,
        "te" => 4,
        "trailer" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        "authorization" => 8,
        "api-key" => 9,
        "x-api-key" => 10,
        "host" => 11,
        "accept-encoding" => 12,
        _ => return None,
    })
}

/// Removes the first `count` of [`DROPPED`], and the headers a `Connection` header names.
/// One pass over the headers finds which are there; only those are looked up to go.
fn strip_headers(headers: &mut HeaderMap, count: usize) {
    let mut present = 0u16;
    let mut names_others = false;
    for (name, value) in headers.iter() {
        if let Some(i) = dropped_index(name.as_str()).filter(|&i| i < count) {
            present |= 1 << i;
            // Almost always `Connection: keep-alive` (or `close`), which names no header.
            names_others |= i == 0 && connection_names_headers(value.as_bytes());
        }
    }
    if present == 0 {
        return;
    }
    if names_others {
        // Headers that `Connection` names are hop-by-hop as well.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| {
                !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
            })
            .filter_map(|name| HeaderName::try_from(name).ok())
            .collect();
        for name in &listed {
            headers.remove(name);
        }
    }
    for (i, name) in DROPPED.iter().enumerate().take(count) {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether a `Connection` value may name headers: anything but a lone `keep-alive` or
/// `close`.
fn connection_names_headers(value: &[u8]) -> bool {
    !(value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_headers(headers, HOP_BY_HOP);
}

impl<B> Service<Request<B>> for Proxy
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Everything happens inside the one boxed future, so that the request and the
        // upstream call are built in place rather than moved into it.
        Box::pin(forward(self.clone(), request))
    }
}

/// Forwards one request to the upstream set now: 503 with none, 502/504 when it fails.
async fn forward<B>(proxy: Proxy, request: Request<B>) -> Result<Response<ProxyBody>, Infallible>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(target) = proxy.current() else {
        return Ok(error_response(ProxyError::NoUpstream));
    };
    let (mut parts, body) = request.into_parts();
    // A pooled connection takes the origin form (path and query) and a Host header;
    // hyper's client takes the absolute URI and sets Host itself.
    let uri = match &target.pool {
        Some(_) => target.upstream_path(&parts.uri).map(Uri::from),
        None => target.upstream_uri(&parts.uri),
    };
    parts.uri = match uri {
        Ok(uri) => uri,
        Err(err) => return Ok(error_response(err)),
    };
    parts.version = http::Version::HTTP_11;
    let headers = &mut parts.headers;
    strip_headers(headers, DROPPED.len());
    if target.pool.is_some() {
        headers.insert(header::HOST, target.host.clone());
    }
    if let Some(auth) = &target.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
    let sent = match &target.pool {
        Some(pool) => futures_util::future::Either::Left(pool.clone().send(request)),
        None => futures_util::future::Either::Right(proxy.remote().request(request).map(|sent| {
            sent.map(|response| response.map(UpstreamBody::unpooled))
                .map_err(|err| ProxyError::Unreachable(err.into()))
        })),
    };
    let response = match tokio::time::timeout(target.timeout, sent).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::warn!(error = %error::chain(&err), "upstream request failed");
            return Ok(error_response(err));
        }
        Err(_) => {
            tracing::warn!(timeout = ?target.timeout, "upstream timed out");
            return Ok(error_response(ProxyError::Timeout(target.timeout)));
        }
    };
    let (mut parts, mut body) = response.into_parts();
    body.stall_after(target.timeout);
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Either::Left(body)))
}

fn error_response(err: ProxyError) -> Response<ProxyBody> {
    ApiError::from(err)
        .into_response::<Full<Bytes>>()
        .map(Either::Right)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(upstream: &str) -> Proxy {
        Proxy::new(ProxyConfig::new(upstream.parse().unwrap())).unwrap()
    }

    #[test]
    fn paths_that_could_leave_v1_are_refused() {
        for path in [
            "/v1/../admin/keys",
            "/v1/./chat/completions",
            "/v1/%2e%2e/admin/keys",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/..",
            "/v1/a%2fb",
            "/v1/a%2F..%2Fb",
            "/v1/a%5cb",
            "/v1/a\\..\\b",
        ] {
            assert!(!is_plain_path(path), "{path}");
            let uri: Uri = path.parse().unwrap();
            assert!(
                matches!(
                    proxy("http://127.0.0.1:8000")
                        .current()
                        .unwrap()
                        .upstream_uri(&uri),
                    Err(ProxyError::UnsafePath)
                ),
                "{path}"
            );
        }
        for path in [
            "/v1/chat/completions",
            "/v1/models/qwen2.5-0.5b",
            "/v1/models/a..b",
            "/v1/files/file%20name",
            "/v1/.well-known",
        ] {
            assert!(is_plain_path(path), "{path}");
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn https_upstreams_need_the_tls_feature() {
        let config = ProxyConfig::new("https://api.example.com/v1".parse().unwrap());
        let err = Proxy::new(config).unwrap_err();
        assert!(err.to_string().contains("'tls' feature"), "{err}");
    }

    #[test]
    fn joins_the_upstream_base_and_the_request_path() {
        let uri: Uri = "/v1/chat/completions?x=1".parse().unwrap();
        for (base, expected) in [
            (
                "http://127.0.0.1:8000",
                "http://127.0.0.1:8000/v1/chat/completions?x=1",
            ),
            (
                "http://127.0.0.1:8000/",
                "http://127.0.0.1:8000/v1/chat/completions?x=1",
            ),
            (
                "http://h/openai/v1/",
                "http://h/openai/v1/chat/completions?x=1",
            ),
        ] {
            assert_eq!(
                proxy(base)
                    .current()
                    .unwrap()
                    .upstream_uri(&uri)
                    .unwrap()
                    .to_string(),
                expected,
                "{base}"
            );
        }
        #[cfg(feature = "tls")]
        assert_eq!(
            proxy("https://api.example.com/v1")
                .current()
                .unwrap()
                .upstream_uri(&uri)
                .unwrap()
                .to_string(),
            "https://api.example.com/v1/chat/completions?x=1"
        );
    }

    #[test]
    fn refuses_upstreams_without_scheme_or_host() {
        assert!(Proxy::new(ProxyConfig::new("/relative".parse().unwrap())).is_err());
        assert!(Proxy::new(ProxyConfig::new("ftp://host/".parse().unwrap())).is_err());
    }

    #[test]
    fn drops_hop_by_hop_headers_and_those_named_in_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));

        // A header named by a second `Connection` line, after a plain `keep-alive`.
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-second"));
        headers.insert("x-second", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn a_forwarded_request_loses_the_clients_key_host_and_encoding_but_nothing_else() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer sk-lg-x"),
            ("api-key", "sk-lg-x"),
            ("x-api-key", "sk-lg-x"),
            ("host", "gateway:8080"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive"),
            ("te", "trailers"),
            ("content-type", "application/json"),
            ("x-request-id", "42"),
            ("openai-organization", "org"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let mut response = headers.clone();
        strip_headers(&mut headers, DROPPED.len());
        let mut left: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            ["content-type", "openai-organization", "x-request-id"]
        );
        // A response keeps everything but the hop-by-hop headers.
        strip_hop_by_hop(&mut response);
        assert_eq!(response.len(), 8);
        assert!(response.contains_key(header::AUTHORIZATION));
    }
}
