//! [`ModelRouter`]: the service behind the auth-and-usage layer that sends each model
//! call to the model it names, and answers `/v1/models` from the list.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use llmgate_core::auth_usage::{RequestedModel, ServedModel};
use llmgate_core::limits::{Effective, KeyLimits};
use llmgate_core::proxy::ProxyBody;
use llmgate_core::BoxError;
use tower::Service;

use super::{Lease, Registry, Requester, RouteError, Slot};

/// The largest upstream model list the gateway reads to filter it for a key that may use
/// only some models.
const MAX_UPSTREAM_MODEL_LIST_BYTES: usize = 4 << 20;

/// Sends each request to the model its `model` names (by name or alias; the default
/// model when it names none) and holds the model's place until the response body ends.
#[derive(Clone, Debug)]
pub struct ModelRouter {
    registry: Arc<Registry>,
}

impl ModelRouter {
    /// A router over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

/// A response body with the model's place it holds: dropped when the body is.
#[derive(Debug)]
pub struct RoutedBody {
    inner: ProxyBody,
    _lease: Option<Lease>,
}

impl RoutedBody {
    fn answer(bytes: Bytes) -> Self {
        Self {
            inner: ProxyBody::Right(Full::new(bytes)),
            _lease: None,
        }
    }
}

impl From<Bytes> for RoutedBody {
    fn from(bytes: Bytes) -> Self {
        Self::answer(bytes)
    }
}

impl http_body::Body for RoutedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Proxied = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// [`ModelRouter`]'s future: straight to the model server when it has room, else boxed
/// (waiting for a load or a place).
pub enum RouteFuture {
    /// Forwarding now.
    Direct {
        /// The proxy's call.
        call: Proxied,
        /// The place it holds.
        lease: Option<Lease>,
        /// The canonical name, when the client used another one.
        served: Option<Arc<str>>,
    },
    /// Waiting first, or answered by the gateway.
    Waiting(Pin<Box<dyn Future<Output = Response<RoutedBody>> + Send>>),
}

impl std::fmt::Debug for RouteFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct { .. } => "RouteFuture::Direct",
            Self::Waiting(_) => "RouteFuture::Waiting",
        })
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<RoutedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Direct {
                call,
                lease,
                served,
            } => {
                let Ok(response) = std::task::ready!(call.as_mut().poll(cx));
                Poll::Ready(Ok(finish(response, lease.take(), served.take())))
            }
            Self::Waiting(future) => future.as_mut().poll(cx).map(Ok),
        }
    }
}

fn finish(
    response: Response<ProxyBody>,
    lease: Option<Lease>,
    served: Option<Arc<str>>,
) -> Response<RoutedBody> {
    let mut response = response.map(|inner| RoutedBody {
        inner,
        _lease: lease,
    });
    if let Some(name) = served {
        response.extensions_mut().insert(ServedModel(name));
    }
    response
}

/// A route error as the client sees it, with `Retry-After` where waiting helps.
fn refuse(err: &RouteError) -> Response<RoutedBody> {
    let (api, retry_after) = err.to_api();
    let mut response = api.into_response::<RoutedBody>();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl Service<Request<Body>> for ModelRouter {
    type Response = Response<RoutedBody>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> RouteFuture {
        let path = request.uri().path();
        if path.starts_with("/v1/models") && matches!(*request.method(), Method::GET | Method::HEAD)
        {
            // Only the models the key may use; a key that may use every model has none.
            let allowed = request
                .extensions()
                .get::<Effective>()
                .map(|effective| effective.0.clone())
                .filter(|limits| limits.models.as_ref().is_some_and(|m| !m.is_empty()));
            if !self.registry.lists_upstream_models() {
                let answer = list_models(&self.registry, path, allowed.as_deref());
                return RouteFuture::Waiting(Box::pin(std::future::ready(answer)));
            }
            if let Some(allowed) = allowed {
                let registry = self.registry.clone();
                return RouteFuture::Waiting(Box::pin(upstream_models_for(
                    registry, request, allowed,
                )));
            }
        }
        let requested = request.extensions().get::<RequestedModel>().map(|m| &*m.0);
        let (slot, served) = match self.registry.resolve(requested) {
            Ok(route) => (route.slot, route.served),
            Err(err) => {
                return RouteFuture::Waiting(Box::pin(std::future::ready(refuse(&err))));
            }
        };
        if let Some(lease) = slot.try_lease() {
            let call = slot.proxy.clone().call(request);
            return RouteFuture::Direct {
                call,
                lease: Some(lease),
                served,
            };
        }
        let registry = self.registry.clone();
        RouteFuture::Waiting(Box::pin(wait_then_forward(registry, slot, request, served)))
    }
}

async fn wait_then_forward(
    registry: Arc<Registry>,
    slot: Arc<Slot>,
    request: Request<Body>,
    served: Option<Arc<str>>,
) -> Response<RoutedBody> {
    match registry
        .lease(&slot, &Requester::of(request.extensions()))
        .await
    {
        Ok(lease) => {
            // The lease's model: new settings may have replaced the one asked for.
            let Ok(response) = lease.slot().proxy.clone().call(request).await;
            finish(response, Some(lease), served)
        }
        Err(err) => refuse(&err),
    }
}

/// `GET /v1/models` and `/v1/models/{id}` in OpenAI's format, from the list, whether or
/// not the models are loaded; with `allowed`, only the models it allows (another is
/// answered as a model that does not exist).
fn list_models(
    registry: &Registry,
    path: &str,
    allowed: Option<&KeyLimits>,
) -> Response<RoutedBody> {
    let may_use = |name: &str| allowed.is_none_or(|limits| limits.allows_model(name));
    let entry = |name: &str| {
        serde_json::json!({
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "llmgate",
        })
    };
    let body = match path.strip_prefix("/v1/models").unwrap_or("") {
        "" | "/" => serde_json::json!({
            "object": "list",
            "data": registry
                .names()
                .iter()
                .filter(|n| may_use(n))
                .map(|n| entry(n))
                .collect::<Vec<_>>(),
        }),
        id => {
            let id = id.trim_start_matches('/');
            let id = percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned();
            match registry.find(&id) {
                Some(slot) if may_use(slot.name()) || may_use(&id) => entry(&id),
                _ => return refuse(&RouteError::Unknown(id)),
            }
        }
    };
    let mut response = Response::new(RoutedBody::answer(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The one upstream's `/v1/models` answer with only the models `allowed` allows (the
/// gateway fronts one upstream that knows its models): `data` filtered in a list, a
/// single model's answer refused as unknown when not allowed. An answer that is not such
/// JSON, or larger than [`MAX_UPSTREAM_MODEL_LIST_BYTES`], becomes an empty list.
async fn upstream_models_for(
    registry: Arc<Registry>,
    request: Request<Body>,
    allowed: Arc<KeyLimits>,
) -> Response<RoutedBody> {
    use http_body_util::BodyExt;

    let single = request
        .uri()
        .path()
        .strip_prefix("/v1/models")
        .map(|rest| rest.trim_start_matches('/'))
        .filter(|rest| !rest.is_empty())
        .map(|id| {
            percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned()
        });
    if let Some(id) = &single {
        if !allowed.allows_model(id) {
            return refuse(&RouteError::Unknown(id.clone()));
        }
    }
    let slot = match registry.resolve(None) {
        Ok(route) => route.slot,
        Err(err) => return refuse(&err),
    };
    let requester = Requester::of(request.extensions());
    let lease = match registry.lease(&slot, &requester).await {
        Ok(lease) => lease,
        Err(err) => return refuse(&err),
    };
    let Ok(response) = lease.slot().proxy.clone().call(request).await;
    if single.is_some() || !response.status().is_success() {
        return finish(response, Some(lease), None);
    }
    let (mut parts, body) = response.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_UPSTREAM_MODEL_LIST_BYTES);
    let bytes = limited.collect().await.map(|b| b.to_bytes()).ok();
    let mut list: serde_json::Value = bytes
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"object": "list", "data": []}));
    match list.get_mut("data").and_then(|d| d.as_array_mut()) {
        Some(data) => data.retain(|model| {
            model
                .get("id")
                .and_then(|id| id.as_str())
                .is_some_and(|id| allowed.allows_model(id))
        }),
        None => list = serde_json::json!({"object": "list", "data": []}),
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, RoutedBody::answer(Bytes::from(list.to_string())))
}
