//! [`RequireKeyLayer`]: a valid API key, or an admin key, in front of routes whose use is
//! not metered (an admin API, a key's own usage report).
//!
//! A request without a usable key gets the same OpenAI-shaped 401 as a model call, and a
//! user key on an admin route 403. The request body is passed on unread (no size limit,
//! no stall timeout of its own): the routes behind read it, within their own limits.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use tower::{Layer, Service, ServiceExt};

use super::{now_millis, AuthError, Caller, KeyCache, Role};
use crate::error::ApiError;

/// Lets through requests that present a valid key, with the [`Caller`] in their
/// extensions; refuses the others with 401 (403 for a non-admin key on an
/// [`admin`](Self::admin) layer). Records no usage.
#[derive(Clone, Debug)]
pub struct RequireKeyLayer {
    keys: KeyCache,
    required_role: Option<Role>,
}

impl RequireKeyLayer {
    /// Any valid key.
    pub fn new(keys: KeyCache) -> Self {
        Self {
            keys,
            required_role: None,
        }
    }

    /// Admin keys only: a valid user key gets 403.
    pub fn admin(keys: KeyCache) -> Self {
        Self {
            keys,
            required_role: Some(Role::Admin),
        }
    }
}

impl<S> Layer<S> for RequireKeyLayer {
    type Service = RequireKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireKey {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service built by [`RequireKeyLayer`].
#[derive(Clone, Debug)]
pub struct RequireKey<S> {
    inner: S,
    layer: RequireKeyLayer,
}

/// The body [`RequireKey`] answers with: the inner service's, or the refusal.
pub type RequireKeyBody<B> = Either<B, Full<Bytes>>;

type Outcome<B, E> = Result<Response<RequireKeyBody<B>>, E>;

/// Resolves to the inner service's response, or to the refusal.
pub struct ResponseFuture<B, E> {
    // Boxed: the key lookup is an `async fn` of the cache, a type that cannot be named.
    inner: Pin<Box<dyn Future<Output = Outcome<B, E>> + Send>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Outcome<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> std::fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireKey<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<RequireKeyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The ready service goes with this request; a clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let refuse = |err: AuthError| {
                    Ok(ApiError::from(err)
                        .into_response::<Full<Bytes>>()
                        .map(Either::Right))
                };
                let key = match layer
                    .keys
                    .authenticate(request.headers(), now_millis())
                    .await
                {
                    Ok(key) => key,
                    Err(err) => return refuse(err),
                };
                if layer.required_role.is_some_and(|role| role != key.role) {
                    return refuse(AuthError::Forbidden { role: key.role });
                }
                request.extensions_mut().insert(Caller::from(&*key));
                let response = inner.oneshot(request).await?;
                Ok(response.map(Either::Left))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::service_fn;

    use super::*;
    use crate::auth::{KeyRecord, Secret};
    use crate::storage::{KeyStore, MemoryStore};

    /// A key cache over a store holding one key of each role.
    async fn keys() -> (KeyCache, Secret, Secret) {
        let store = Arc::new(MemoryStore::new());
        let user = Secret::generate();
        let admin = Secret::generate();
        for (name, role, secret) in [("u", Role::User, &user), ("a", Role::Admin, &admin)] {
            let record = KeyRecord::new(name, role, secret);
            store.insert_key(&record, &secret.hash()).await.unwrap();
        }
        (KeyCache::new(store), user, admin)
    }

    /// Sends a request with `key` (if any) through `layer` in front of a service that
    /// answers with the caller's name; returns the status and the body.
    async fn call(layer: RequireKeyLayer, key: Option<&Secret>) -> (StatusCode, String) {
        let service = layer.layer(service_fn(|request: Request<String>| async move {
            let caller = request.extensions().get::<Caller>().cloned();
            let name = caller.map_or_else(|| "nobody".to_owned(), |c| c.name);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
        }));
        let mut request = Request::get("/admin/keys");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {}", key.expose()));
        }
        let response = service
            .oneshot(request.body(String::new()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn without_a_valid_key_answers_401_in_the_openai_shape() {
        let (keys, _, _) = keys().await;
        for layer in [
            RequireKeyLayer::new(keys.clone()),
            RequireKeyLayer::admin(keys),
        ] {
            let (status, body) = call(layer.clone(), None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let error: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(error["error"]["code"], "invalid_api_key", "{body}");
            let unknown = Secret::generate();
            let (status, _) = call(layer, Some(&unknown)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }

    #[tokio::test]
    async fn admin_routes_refuse_user_keys_with_403() {
        let (keys, user, _) = keys().await;
        let (status, body) = call(RequireKeyLayer::admin(keys), Some(&user)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "insufficient_permissions", "{body}");
    }

    #[tokio::test]
    async fn a_valid_key_reaches_the_service_as_its_caller() {
        let (keys, user, admin) = keys().await;
        let admin_only = RequireKeyLayer::admin(keys.clone());
        assert_eq!(
            call(admin_only, Some(&admin)).await,
            (StatusCode::OK, "a".into())
        );
        let any_key = RequireKeyLayer::new(keys);
        assert_eq!(
            call(any_key.clone(), Some(&user)).await,
            (StatusCode::OK, "u".into())
        );
        assert_eq!(
            call(any_key, Some(&admin)).await,
            (StatusCode::OK, "a".into())
        );
    }
}
