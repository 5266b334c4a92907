//! [`HubClient`]: GGUF files from the Hub into the shared Hugging Face cache.

use std::io;
use std::path::{Path, PathBuf};

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError, Progress};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo};
use http::StatusCode;
use tokio::sync::{mpsc, oneshot};

use super::pick::{is_gguf, parts_of, pick_gguf};
use super::source::is_repo_id;
use super::{HubError, HubSettings};

/// How far a download has come; handed to the progress callback as bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file, as named in the repository.
    pub file: String,
    /// Bytes downloaded so far, including what an earlier, interrupted attempt kept.
    pub downloaded: u64,
    /// The file's size, when known.
    pub total: Option<u64>,
}

/// A model file ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The file in the cache. For a split model, its first part; the other parts lie
    /// next to it, where llama.cpp looks for them.
    pub path: PathBuf,
    /// Its name in the repository.
    pub file: String,
    /// Whether llmgate chose the file because none was named.
    pub picked: bool,
    /// Whether everything was in the cache already, so nothing was downloaded.
    pub from_cache: bool,
}

/// Finds and downloads GGUF models on the Hugging Face Hub.
///
/// Files land in the cache layout of the Python `huggingface_hub` library
/// (`models--OWNER--NAME/{blobs,snapshots,refs}`), so models pulled by either are
/// shared. A download that breaks keeps what it got (in `blobs/*.sync.part`) and the
/// next attempt asks only for the rest.
#[derive(Debug, Clone)]
pub struct HubClient {
    settings: HubSettings,
    /// For listings, on the caller's runtime. Downloads build their own; see
    /// [`download_on_own_runtime`].
    api: Api,
}

impl HubClient {
    /// A client for these settings; fails only on an endpoint that is not an HTTP URL.
    pub fn new(settings: HubSettings) -> Result<Self, HubError> {
        let endpoint_is_http = reqwest::Url::parse(&settings.endpoint)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.has_host());
        if !endpoint_is_http {
            return Err(HubError::InvalidEndpoint {
                endpoint: settings.endpoint,
            });
        }
        let api = build_api(&settings).map_err(|e| HubError::Failed {
            message: format!("cannot set up the HTTP client: {e}"),
            source: e.into(),
        })?;
        Ok(Self { settings, api })
    }

    /// The settings this client uses.
    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// Every file in the repository's `main` branch, as paths inside it.
    ///
    /// Offline, the files of the cached snapshot of `main`.
    pub async fn list_files(&self, repo: &str) -> Result<Vec<String>, HubError> {
        check_repo(repo)?;
        if self.settings.offline {
            let files = self.cached_files(repo);
            if files.is_empty() {
                return Err(self.not_cached(repo, None));
            }
            return Ok(files);
        }
        self.remote_files(repo).await
    }

    /// Downloads a GGUF file into the cache, or finds it there; with no file named, picks
    /// one with [`pick_gguf`].
    ///
    /// A named file already in the cache is returned without asking the Hub; delete it
    /// from the cache to download it again. A split model is downloaded whole. `progress`
    /// is called as bytes arrive, and once with the full size for a file that was
    /// already cached.
    pub async fn fetch_gguf(
        &self,
        repo: &str,
        file: Option<&str>,
        progress: &(dyn Fn(DownloadProgress) + Send + Sync),
    ) -> Result<Fetched, HubError> {
        check_repo(repo)?;
        let picked = file.is_none();
        if let Some(file) = file {
            if let Some(fetched) = self.cached_fetch(repo, file, picked, progress) {
                return Ok(fetched);
            }
        }
        if self.settings.offline {
            let file = match file {
                Some(file) => file.to_owned(),
                None => pick_gguf(&self.cached_files(repo))
                    .ok_or_else(|| self.not_cached(repo, None))?,
            };
            return self
                .cached_fetch(repo, &file, picked, progress)
                .ok_or_else(|| self.not_cached(repo, Some(file)));
        }

        let listing = match self.remote_files(repo).await {
            Ok(listing) => listing,
            Err(err @ HubError::Network { .. }) => {
                // Without a network, a model pulled earlier still runs.
                let cached = pick_gguf(&self.cached_files(repo))
                    .and_then(|file| self.cached_fetch(repo, &file, picked, progress));
                return match cached {
                    Some(fetched) => {
                        tracing::warn!(%repo, file = %fetched.file, error = %err,
                            "the Hub is unreachable; using the cached model");
                        Ok(fetched)
                    }
                    None => Err(err),
                };
            }
            Err(err) => return Err(err),
        };
        let available: Vec<String> = listing.iter().filter(|f| is_gguf(f)).cloned().collect();
        let file = match file {
            Some(file) => file.to_owned(),
            None => pick_gguf(&listing).ok_or_else(|| HubError::NoGguf {
                repo: repo.to_owned(),
            })?,
        };
        let parts = parts_of(&file);
        if let Some(missing) = parts.iter().find(|part| !listing.contains(part)) {
            return Err(HubError::FileNotFound {
                repo: repo.to_owned(),
                file: missing.clone(),
                available,
            });
        }

        let mut from_cache = true;
        let mut paths = Vec::with_capacity(parts.len());
        for part in &parts {
            let path = match self.cached_file(repo, part) {
                Some(path) => {
                    report_cached(part, &path, progress);
                    path
                }
                None => {
                    from_cache = false;
                    self.download(repo, part, &available, progress).await?
                }
            };
            paths.push(path);
        }
        Ok(Fetched {
            path: paths.swap_remove(0),
            file: parts[0].clone(),
            picked,
            from_cache,
        })
    }

    async fn remote_files(&self, repo: &str) -> Result<Vec<String>, HubError> {
        let response = self
            .api
            .model(repo.to_owned())
            .info_request()
            .send()
            .await
            .map_err(|e| self.network_error(e))?;
        let status = response.status();
        if !status.is_success() {
            // The Hub says what it means in a header: a 401 can mean "no such repo".
            let code = response
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(self.status_error(repo, None, &[], status, code.as_deref()));
        }
        let info: RepoInfo = response.json().await.map_err(|e| {
            if e.is_decode() {
                HubError::Failed {
                    message: format!(
                        "{} did not answer like the Hugging Face Hub (bad model listing: {}): \
                         check HF_ENDPOINT",
                        self.settings.endpoint,
                        innermost(&e)
                    ),
                    source: e.into(),
                }
            } else {
                self.network_error(e)
            }
        })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// Downloads one file, passing hf-hub's progress on to `progress`.
    async fn download(
        &self,
        repo: &str,
        file: &str,
        available: &[String],
        progress: &(dyn Fn(DownloadProgress) + Send + Sync),
    ) -> Result<PathBuf, HubError> {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (done_tx, mut done) = oneshot::channel();
        // Dropped when this future is (the caller gave up): the download thread stops.
        let (_cancel_on_drop, cancelled) = oneshot::channel::<()>();
        let (settings, repo_id, name) = (self.settings.clone(), repo.to_owned(), file.to_owned());
        std::thread::Builder::new()
            .name("llmgate-hub-download".into())
            .spawn(move || {
                let result = download_on_own_runtime(settings, repo_id, name, events_tx, cancelled);
                let _ = done_tx.send(result);
            })?;

        let mut state = DownloadProgress {
            file: file.to_owned(),
            downloaded: 0,
            total: None,
        };
        let mut reported = None;
        let result = loop {
            tokio::select! {
                // Events first: every event is sent before the result.
                biased;
                Some(event) = events.recv() => {
                    let mut advanced = state.apply(event);
                    // Fold a backlog into one call: the callback may redraw a screen.
                    while let Ok(event) = events.try_recv() {
                        advanced |= state.apply(event);
                    }
                    // Not on the start alone: a resumed download would flash 0% first.
                    if advanced {
                        progress(state.clone());
                        reported = Some(state.downloaded);
                    }
                }
                result = &mut done => break result,
            }
        };
        let path = result
            .map_err(|_| HubError::Other(format!("the download of {file} stopped unexpectedly")))?
            .map_err(|err| self.download_error(repo, file, available, err))?;
        if let Some(total) = state.total.filter(|&total| reported != Some(total)) {
            state.downloaded = total;
            progress(state);
        }
        Ok(path)
    }

    /// The file (all parts of a split model) from the cache, reporting it as complete.
    fn cached_fetch(
        &self,
        repo: &str,
        file: &str,
        picked: bool,
        progress: &(dyn Fn(DownloadProgress) + Send + Sync),
    ) -> Option<Fetched> {
        let parts = parts_of(file);
        let paths: Vec<PathBuf> = parts
            .iter()
            .map(|part| self.cached_file(repo, part))
            .collect::<Option<_>>()?;
        for (part, path) in parts.iter().zip(&paths) {
            report_cached(part, path, progress);
        }
        Some(Fetched {
            path: paths[0].clone(),
            file: parts[0].clone(),
            picked,
            from_cache: true,
        })
    }

    /// The cached copy of `file` in the snapshot `main` points at.
    fn cached_file(&self, repo: &str, file: &str) -> Option<PathBuf> {
        Cache::new(self.settings.cache_dir.clone())
            .model(repo.to_owned())
            .get(file)
            // A snapshot entry is a link to a blob; a dangling one is no copy.
            .filter(|path| path.is_file())
    }

    /// Every file of the cached snapshot of `main`, as paths inside the repository.
    fn cached_files(&self, repo: &str) -> Vec<String> {
        let folder = self
            .settings
            .cache_dir
            .join(Repo::model(repo.to_owned()).folder_name());
        let Ok(commit) = std::fs::read_to_string(folder.join("refs").join("main")) else {
            return Vec::new();
        };
        let snapshot = folder.join("snapshots").join(commit.trim());
        let mut files = Vec::new();
        let mut folders = vec![snapshot.clone()];
        while let Some(dir) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    folders.push(path);
                } else if path.is_file() {
                    if let Ok(relative) = path.strip_prefix(&snapshot) {
                        let parts: Vec<_> = relative.iter().map(|p| p.to_string_lossy()).collect();
                        files.push(parts.join("/"));
                    }
                }
            }
        }
        files.sort();
        files
    }

    fn not_cached(&self, repo: &str, file: Option<String>) -> HubError {
        HubError::NotCachedOffline {
            repo: repo.to_owned(),
            file,
            cache_dir: self.settings.cache_dir.clone(),
        }
    }

    fn network_error(&self, error: reqwest::Error) -> HubError {
        HubError::Network {
            endpoint: self.settings.endpoint.clone(),
            reason: innermost(&error),
            source: error.into(),
        }
    }

    /// An HTTP error status, read the way the Hub means it.
    fn status_error(
        &self,
        repo: &str,
        file: Option<&str>,
        available: &[String],
        status: StatusCode,
        code: Option<&str>,
    ) -> HubError {
        let endpoint = &self.settings.endpoint;
        match (status.as_u16(), code, file) {
            (_, Some("RepoNotFound"), _) | (404, _, None) => HubError::RepoNotFound {
                repo: repo.to_owned(),
                endpoint: endpoint.clone(),
            },
            (404, _, Some(file)) => HubError::FileNotFound {
                repo: repo.to_owned(),
                file: file.to_owned(),
                available: available.to_vec(),
            },
            (_, Some("GatedRepo"), _) | (401 | 403, _, _) => HubError::Unauthorized {
                repo: repo.to_owned(),
                token_sent: self.settings.token.is_some(),
            },
            (429, _, _) => HubError::Other(format!(
                "{endpoint} is limiting our requests (HTTP 429): wait a few minutes and try \
                 again; with HF_TOKEN set the limit is higher"
            )),
            (500.., _, _) => HubError::Other(format!(
                "{endpoint} failed with HTTP {status} for {repo}: the Hub may be having \
                 trouble; try again later"
            )),
            _ => HubError::Other(format!("{endpoint} answered HTTP {status} for {repo}")),
        }
    }

    fn download_error(
        &self,
        repo: &str,
        file: &str,
        available: &[String],
        error: ApiError,
    ) -> HubError {
        match error {
            ApiError::RequestError(e) => match e.status() {
                Some(status) => self.status_error(repo, Some(file), available, status, None),
                None if e.is_connect() || e.is_timeout() => self.network_error(e),
                None => HubError::Interrupted {
                    repo: repo.to_owned(),
                    file: file.to_owned(),
                    reason: innermost(&e),
                    source: e.into(),
                },
            },
            ApiError::TooManyRetries(inner) => self.download_error(repo, file, available, *inner),
            ApiError::IoError(e) => HubError::Io(e),
            ApiError::LockAcquisition(lock) => HubError::Other(format!(
                "another download of {file} is running (it holds {}): wait for it to finish",
                lock.display()
            )),
            ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => {
                HubError::Other(format!(
                    "{} did not answer like the Hugging Face Hub (the {header} header for \
                     {file} is missing or invalid): check HF_ENDPOINT",
                    self.settings.endpoint
                ))
            }
            other => HubError::Failed {
                message: format!("downloading {file} from {repo} failed: {other}"),
                source: other.into(),
            },
        }
    }
}

/// What a download thread tells the caller.
#[derive(Debug)]
enum ProgressEvent {
    Start { total: u64 },
    Advance { bytes: u64 },
}

impl DownloadProgress {
    /// Takes in an event; `true` when bytes arrived.
    fn apply(&mut self, event: ProgressEvent) -> bool {
        match event {
            ProgressEvent::Start { total } => {
                self.total = Some(total);
                self.downloaded = 0;
                false
            }
            ProgressEvent::Advance { bytes } => {
                // Never past the end, whatever the counting upstream.
                self.downloaded = (self.downloaded + bytes).min(self.total.unwrap_or(u64::MAX));
                true
            }
        }
    }
}

/// hf-hub's progress hook, forwarding to the caller's task.
#[derive(Debug, Clone)]
struct ChannelProgress(mpsc::UnboundedSender<ProgressEvent>);

impl Progress for ChannelProgress {
    async fn init(&mut self, size: usize, _filename: &str) {
        let _ = self.0.send(ProgressEvent::Start { total: size as u64 });
    }

    async fn update(&mut self, size: usize) {
        let _ = self.0.send(ProgressEvent::Advance { bytes: size as u64 });
    }

    async fn finish(&mut self) {}
}

/// Runs one hf-hub download to the end on a runtime of its own.
///
/// hf-hub spawns a task per chunk and leaves them running when the download fails or
/// its future is dropped; they would go on fetching (and writing the partial file)
/// behind the caller's back. Dropping this runtime on return stops them. The HTTP
/// client is built here too, because its pooled connections belong to the runtime that
/// opened them.
fn download_on_own_runtime(
    settings: HubSettings,
    repo: String,
    file: String,
    events: mpsc::UnboundedSender<ProgressEvent>,
    cancelled: oneshot::Receiver<()>,
) -> Result<PathBuf, ApiError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = build_api(&settings)?;
    runtime.block_on(async move {
        let repo = api.model(repo);
        let download = repo.download_with_progress(&file, ChannelProgress(events));
        tokio::select! {
            result = download => result,
            _ = cancelled => Err(ApiError::IoError(io::Error::new(
                io::ErrorKind::Interrupted,
                "download cancelled",
            ))),
        }
    })
}

fn build_api(settings: &HubSettings) -> Result<Api, ApiError> {
    // `from_cache`, not `new`: `new` panics on a machine without a home directory.
    ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        // Always set, so a token file the settings chose not to use is not read again.
        .with_token(settings.token.clone())
        .with_progress(false)
        .with_chunk_size(Some(settings.chunk_size.max(1)))
        .with_max_files(1)
        .with_user_agent("llmgate", env!("CARGO_PKG_VERSION"))
        .build()
}

fn check_repo(repo: &str) -> Result<(), HubError> {
    if is_repo_id(repo) {
        Ok(())
    } else {
        Err(HubError::InvalidSource {
            input: repo.to_owned(),
        })
    }
}

fn report_cached(file: &str, path: &Path, progress: &(dyn Fn(DownloadProgress) + Send + Sync)) {
    let size = std::fs::metadata(path).map(|m| m.len()).ok();
    progress(DownloadProgress {
        file: file.to_owned(),
        downloaded: size.unwrap_or(0),
        total: size,
    });
}

/// The deepest cause of an error: "Connection refused (os error 111)" rather than
/// "error sending request for url (…)".
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
