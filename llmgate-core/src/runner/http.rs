//! A small HTTP client for talking to a local model server (readiness, tokenizing).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Why a request to a local model server got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum LocalHttpError {
    /// The request could not be built (a malformed URL).
    #[error(transparent)]
    Request(#[from] http::Error),
    /// No connection, or it broke before the answer's head.
    #[error(transparent)]
    Send(#[from] hyper_util::client::legacy::Error),
    /// The answer's body broke off.
    #[error(transparent)]
    Body(#[from] hyper::Error),
    /// No whole answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer other than 2xx.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// Where the request went.
        url: String,
        /// The answer's status.
        status: StatusCode,
        /// The answer's body, as text.
        body: String,
    },
    /// A 2xx answer that is not JSON.
    #[error("{url} answered invalid JSON: {source}")]
    Json {
        /// Where the request went.
        url: String,
        /// What the JSON reader said.
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct LocalHttp {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for LocalHttp {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl LocalHttp {
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), LocalHttpError> {
        let mut request = Request::builder().method(method).uri(url);
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body)?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LocalHttpError::Timeout(timeout))?
    }

    /// `GET url`: the status, or why there was none.
    pub(crate) async fn get_status(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<StatusCode, LocalHttpError> {
        self.send(Method::GET, url, None, timeout)
            .await
            .map(|(status, _)| status)
    }

    /// `POST url` with a JSON body; the JSON answer of a 2xx response.
    pub(crate) async fn post_json(
        &self,
        url: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, LocalHttpError> {
        let (status, bytes) = self.send(Method::POST, url, Some(body), timeout).await?;
        if !status.is_success() {
            return Err(LocalHttpError::Status {
                url: url.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| LocalHttpError::Json {
            url: url.to_owned(),
            source,
        })
    }
}
