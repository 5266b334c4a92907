//! A mock of the Hugging Face Hub for tests: real HTTP servers on 127.0.0.1:0.
//!
//! It speaks the part of the Hub's protocol that model downloads use:
//!
//! - `GET /api/models/OWNER/NAME/revision/main` — `{"id", "sha", "siblings": [{"rfilename"}]}`.
//! - `GET|HEAD /OWNER/NAME/resolve/main/FILE` — for a `.gguf` (an LFS file) a `302` to
//!   the CDN with `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size` and `ETag`; for
//!   other files the content itself, with `ETag` and `X-Repo-Commit`.
//! - `GET|HEAD` on the CDN (a second server, so the redirect leaves the Hub's host as it
//!   does on huggingface.co): the blob, honouring `Range: bytes=A-B` with `206` and
//!   `Content-Range`.
//!
//! Errors are the Hub's too: an unknown repository is `401` without a token and `404`
//! with one, both with `X-Error-Code: RepoNotFound`; a missing file is `404`
//! `EntryNotFound`; a gated repository refuses downloads with `401` (no token) or `403`
//! (a wrong one), `X-Error-Code: GatedRepo`. Every request is recorded, and the CDN
//! can be told to cut connections partway through a body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Which of the mock's two servers got a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockServer {
    /// The Hub's API and `resolve` URLs.
    Hub,
    /// Where `resolve` redirects large files.
    Cdn,
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct HubRequest {
    /// Which server got it.
    pub server: MockServer,
    /// Method.
    pub method: Method,
    /// Path, without the query.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether it carried `Authorization`.
    pub authorized: bool,
}

impl HubRequest {
    /// The first byte a ranged request asked for.
    pub fn range_start(&self) -> Option<u64> {
        let (start, _) = self
            .range
            .as_deref()?
            .strip_prefix("bytes=")?
            .split_once('-')?;
        start.parse().ok()
    }

    /// Whether this asked for file content (a `GET` on the CDN other than the one-byte
    /// probe `bytes=0-0` clients send to learn the size).
    pub fn is_download(&self) -> bool {
        self.server == MockServer::Cdn
            && self.method == Method::GET
            && self.range.as_deref() != Some("bytes=0-0")
    }
}

#[derive(Debug)]
struct MockFile {
    content: Bytes,
    sha256: String,
}

#[derive(Debug, Default)]
struct MockRepo {
    files: BTreeMap<String, MockFile>,
    /// A gated repository: downloads need this token.
    token: Option<String>,
}

#[derive(Debug)]
struct Cut {
    at: u64,
    times: usize,
}

#[derive(Debug, Default)]
struct State {
    repos: Mutex<BTreeMap<String, MockRepo>>,
    seen: Mutex<Vec<HubRequest>>,
    cut: Mutex<Option<Cut>>,
    cdn_url: String,
}

/// The running mock Hub; stops when dropped.
#[derive(Debug)]
pub struct MockHub {
    /// The Hub, `http://127.0.0.1:PORT`: the endpoint to give the client.
    pub url: String,
    /// The CDN, on another port.
    pub cdn_url: String,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MockHub {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type MockBody = UnsyncBoxBody<Bytes, std::io::Error>;

impl MockHub {
    /// Starts the Hub and its CDN on free ports, with no repositories.
    pub async fn start() -> Self {
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock hub");
        let cdn = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock cdn");
        let url = format!("http://{}", hub.local_addr().expect("hub address"));
        let cdn_url = format!("http://{}", cdn.local_addr().expect("cdn address"));
        let state = Arc::new(State {
            cdn_url: cdn_url.clone(),
            ..State::default()
        });
        let tasks = vec![
            tokio::spawn(serve(hub, MockServer::Hub, state.clone())),
            tokio::spawn(serve(cdn, MockServer::Cdn, state.clone())),
        ];
        Self {
            url,
            cdn_url,
            state,
            tasks,
        }
    }

    /// Adds a file to a repository, creating the repository if needed.
    pub fn add_file(&self, repo: &str, name: &str, content: impl Into<Bytes>) {
        let content = content.into();
        let sha256 = hex(&Sha256::digest(&content));
        let mut repos = self.state.repos.lock().unwrap();
        let repo = repos.entry(repo.to_owned()).or_default();
        repo.files
            .insert(name.to_owned(), MockFile { content, sha256 });
    }

    /// Makes a repository gated: downloads need `Authorization: Bearer TOKEN`.
    pub fn gate(&self, repo: &str, token: &str) {
        let mut repos = self.state.repos.lock().unwrap();
        repos.entry(repo.to_owned()).or_default().token = Some(token.to_owned());
    }

    /// The next `times` CDN bodies that would carry byte `at` stop just before it: the
    /// bytes up to it are sent, then the connection is dropped.
    pub fn cut_downloads_at(&self, at: u64, times: usize) {
        *self.state.cut.lock().unwrap() = Some(Cut { at, times });
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.state.seen.lock().unwrap().clear();
    }
}

/// `len` random bytes behind the GGUF magic: a stand-in model file.
pub fn random_gguf(len: usize) -> Bytes {
    let mut content = vec![0u8; len.max(4)];
    rand::thread_rng().fill_bytes(&mut content);
    content[..4].copy_from_slice(b"GGUF");
    Bytes::from(content)
}

async fn serve(listener: tokio::net::TcpListener, server: MockServer, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), server, req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    server: MockServer,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let headers = req.headers();
    let request = HubRequest {
        server,
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        range: headers
            .get(http::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        authorized: headers.contains_key(http::header::AUTHORIZATION),
    };
    state.seen.lock().unwrap().push(request.clone());
    let head = request.method == Method::HEAD;
    if request.method != Method::GET && !head {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED, None));
    }
    Ok(match server {
        MockServer::Hub => hub(&state, &request, req.headers()),
        MockServer::Cdn => cdn(&state, &request),
    })
}

fn hub(state: &State, request: &HubRequest, headers: &HeaderMap) -> Response<MockBody> {
    let repos = state.repos.lock().unwrap();
    let path = request.path.trim_start_matches('/');
    let (api, path) = match path.strip_prefix("api/models/") {
        Some(rest) => (true, rest),
        None => (false, path),
    };
    let mut segments = path.splitn(4, '/');
    let (Some(owner), Some(name), Some(rest)) = (segments.next(), segments.next(), segments.next())
    else {
        return status(StatusCode::NOT_FOUND, None);
    };
    let tail = segments.next().unwrap_or("");
    let repo_id = format!("{owner}/{name}");
    let Some(repo) = repos.get(&repo_id) else {
        // Like the Hub: without a token, a missing repository might be a private one.
        let code = if request.authorized {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNAUTHORIZED
        };
        return status(code, Some(("RepoNotFound", "Repository not found")));
    };
    let commit = hex(&Sha256::digest(repo_id.as_bytes()))[..40].to_owned();
    let (revision, file) = match (api, rest) {
        (true, "revision") => (tail, None),
        (false, "resolve") => match tail.split_once('/') {
            Some((revision, file)) => (revision, Some(file)),
            None => return status(StatusCode::NOT_FOUND, None),
        },
        _ => return status(StatusCode::NOT_FOUND, None),
    };
    if revision != "main" && revision != commit {
        return status(
            StatusCode::NOT_FOUND,
            Some(("RevisionNotFound", "Invalid rev id")),
        );
    }
    let Some(file) = file else {
        let siblings: Vec<_> = repo
            .files
            .keys()
            .map(|name| json!({ "rfilename": name }))
            .collect();
        let body = json!({
            "_id": commit[..24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": false,
            "gated": if repo.token.is_some() { json!("manual") } else { json!(false) },
            "siblings": siblings,
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(full(Bytes::from(body.to_string())))
            .expect("valid response");
    };
    if let Some(token) = &repo.token {
        let expected = format!("Bearer {token}");
        match headers.get(http::header::AUTHORIZATION) {
            None => {
                return status(
                    StatusCode::UNAUTHORIZED,
                    Some(("GatedRepo", "Access to this model is restricted")),
                )
            }
            Some(sent) if sent.as_bytes() != expected.as_bytes() => {
                return status(
                    StatusCode::FORBIDDEN,
                    Some(("GatedRepo", "Access to this model is restricted")),
                )
            }
            Some(_) => {}
        }
    }
    let Some(entry) = repo.files.get(file) else {
        return status(
            StatusCode::NOT_FOUND,
            Some(("EntryNotFound", "Entry not found")),
        );
    };
    // The Git blob id of the LFS pointer file; any stable 40 hex digits will do.
    let pointer_etag = format!("\"{}\"", &hex(&Sha256::digest(file.as_bytes()))[..40]);
    if file.ends_with(".gguf") {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(
                "location",
                format!("{}/blobs/{}", state.cdn_url, entry.sha256),
            )
            .header("x-repo-commit", &commit)
            .header("x-linked-etag", format!("\"{}\"", entry.sha256))
            .header("x-linked-size", entry.content.len())
            .header("etag", pointer_etag)
            .header("content-length", 0)
            .body(full(Bytes::new()))
            .expect("valid response");
    }
    let mut response = ranged(&entry.content, request, None);
    let headers = response.headers_mut();
    headers.insert("etag", pointer_etag.parse().expect("header"));
    headers.insert("x-repo-commit", commit.parse().expect("header"));
    response
}

fn cdn(state: &State, request: &HubRequest) -> Response<MockBody> {
    let Some(sha256) = request.path.strip_prefix("/blobs/") else {
        return status(StatusCode::NOT_FOUND, None);
    };
    let repos = state.repos.lock().unwrap();
    let Some(content) = repos
        .values()
        .flat_map(|repo| repo.files.values())
        .find(|file| file.sha256 == sha256)
        .map(|file| file.content.clone())
    else {
        return status(StatusCode::NOT_FOUND, None);
    };
    let mut response = ranged(&content, request, Some(&state.cut));
    response
        .headers_mut()
        .insert("etag", format!("\"{sha256}\"").parse().expect("header"));
    response
}

/// The content, or the part a `Range` header asks for, as HTTP servers send it.
fn ranged(
    content: &Bytes,
    request: &HubRequest,
    cut: Option<&Mutex<Option<Cut>>>,
) -> Response<MockBody> {
    let len = content.len() as u64;
    let range = match request.range.as_deref() {
        None => None,
        Some(header) => match parse_range(header, len) {
            Some(range) => Some(range),
            None => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header("content-range", format!("bytes */{len}"))
                    .body(full(Bytes::new()))
                    .expect("valid response")
            }
        },
    };
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let builder = Response::builder()
        .header("accept-ranges", "bytes")
        .header("content-length", end + 1 - start);
    let builder = match range {
        Some(_) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {start}-{end}/{len}")),
        None => builder.status(StatusCode::OK),
    };
    if request.method == Method::HEAD {
        return builder.body(full(Bytes::new())).expect("valid response");
    }
    let part = content.slice(start as usize..=end as usize);
    let cut_at = cut.and_then(|cut| {
        let mut cut = cut.lock().unwrap();
        let active = cut
            .as_mut()
            .filter(|c| c.times > 0 && request.is_download() && (start..=end).contains(&c.at))?;
        active.times -= 1;
        Some(active.at)
    });
    let Some(at) = cut_at else {
        return builder.body(full(part)).expect("valid response");
    };
    // The bytes before the cut, a moment for them to reach the client, then a broken
    // connection: what a dropped Wi-Fi looks like from the client.
    let sent = part.slice(..(at - start) as usize);
    let body = futures_util::stream::iter([Ok(Frame::data(sent))]).chain(
        futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock hub cut the connection",
            ))
        }),
    );
    builder
        .body(StreamBody::new(body).boxed_unsync())
        .expect("valid response")
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N`, clamped to the content; `None` when
/// unsatisfiable.
fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let (start, end) = header.strip_prefix("bytes=")?.split_once('-')?;
    let last = len.checked_sub(1)?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => (len.saturating_sub(suffix.parse().ok()?), last),
        (start, "") => (start.parse().ok()?, last),
        (start, end) => (start.parse().ok()?, end.parse::<u64>().ok()?.min(last)),
    };
    (start <= end).then_some((start, end))
}

fn status(code: StatusCode, error: Option<(&str, &str)>) -> Response<MockBody> {
    let mut builder = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    let message = error.map_or("Not found", |(_, message)| message);
    if let Some((code, message)) = error {
        builder = builder
            .header("x-error-code", code)
            .header("x-error-message", message);
    }
    builder
        .body(full(Bytes::from(json!({ "error": message }).to_string())))
        .expect("valid response")
}

fn full(bytes: Bytes) -> MockBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_like_an_http_server() {
        assert_eq!(parse_range("bytes=0-0", 10), Some((0, 0)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 9)));
        // Past the end is clamped (hf-hub asks for one byte too many on the last chunk).
        assert_eq!(parse_range("bytes=5-10", 10), Some((5, 9)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 9)));
        assert_eq!(parse_range("bytes=10-12", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
