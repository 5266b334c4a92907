//! `llmgate pull` against a mock Hugging Face Hub on 127.0.0.1: downloads, picking,
//! resuming, the cache, offline mode and every error a user can meet.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use llmgate_core::hub::mock::{random_gguf, HubRequest, MockHub, MockServer};
use llmgate_core::hub::{DownloadProgress, Fetched, HubClient, HubError, HubSettings};

const REPO: &str = "llmgate/tiny-GGUF";
const SIZE: usize = 300_000;
/// Small chunks, so a few-hundred-KB file takes several requests and can resume.
const CHUNK: usize = 64 * 1024;

fn settings(endpoint: &str, cache: &Path) -> HubSettings {
    HubSettings {
        endpoint: endpoint.to_owned(),
        cache_dir: cache.to_owned(),
        token: None,
        offline: false,
        chunk_size: CHUNK,
    }
}

fn client(settings: HubSettings) -> HubClient {
    HubClient::new(settings).expect("client")
}

/// Fetches, returning the result and every progress report.
async fn fetch(
    client: &HubClient,
    repo: &str,
    file: Option<&str>,
) -> (Result<Fetched, HubError>, Vec<DownloadProgress>) {
    let reports = Mutex::new(Vec::new());
    let record = |p: DownloadProgress| reports.lock().unwrap().push(p);
    let result = client.fetch_gguf(repo, file, &record).await;
    (result, reports.into_inner().unwrap())
}

fn downloads(requests: &[HubRequest]) -> Vec<&HubRequest> {
    requests.iter().filter(|r| r.is_download()).collect()
}

fn read(path: &Path) -> Bytes {
    Bytes::from(std::fs::read(path).expect("downloaded file"))
}

#[tokio::test]
async fn named_file_arrives_intact_with_progress_as_it_downloads() {
    let hub = MockHub::start().await;
    let model = random_gguf(SIZE);
    hub.add_file(REPO, "tiny-Q8_0.gguf", model.clone());
    hub.add_file(REPO, "README.md", "# tiny");
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));

    let (result, reports) = fetch(&client, REPO, Some("tiny-Q8_0.gguf")).await;
    let fetched = result.expect("download");

    assert_eq!(read(&fetched.path), model, "the file is byte-identical");
    assert!(fetched.path.starts_with(cache.path()));
    assert_eq!(fetched.file, "tiny-Q8_0.gguf");
    assert!(!fetched.picked && !fetched.from_cache);
    // Reported while bytes arrived, never going backwards, ending at the size.
    let sizes: Vec<u64> = reports.iter().map(|p| p.downloaded).collect();
    assert!(
        sizes.iter().any(|&d| d > 0 && d < SIZE as u64),
        "no report mid-download: {sizes:?}"
    );
    assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
    let last = reports.last().unwrap();
    assert_eq!(
        (last.downloaded, last.total),
        (SIZE as u64, Some(SIZE as u64))
    );
    assert!(reports.iter().all(|p| p.file == "tiny-Q8_0.gguf"));
    // Fetched in chunks from the CDN the Hub redirected to.
    let got = hub.requests();
    assert!(downloads(&got).len() >= SIZE / CHUNK, "{got:?}");
}

#[tokio::test]
async fn picks_q4_k_m_when_no_file_is_named() {
    let hub = MockHub::start().await;
    let q4 = random_gguf(40_000);
    for (name, content) in [
        ("README.md", Bytes::from("# model")),
        ("config.json", Bytes::from("{}")),
        ("model-Q2_K.gguf", random_gguf(20_000)),
        ("model-Q4_K_M.gguf", q4.clone()),
        ("model-Q8_0.gguf", random_gguf(60_000)),
        ("mmproj-model-f16.gguf", random_gguf(10_000)),
    ] {
        hub.add_file(REPO, name, content);
    }
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));

    let (result, _) = fetch(&client, REPO, None).await;
    let fetched = result.expect("download");

    assert_eq!(fetched.file, "model-Q4_K_M.gguf");
    assert!(fetched.picked, "says it chose the file");
    assert_eq!(read(&fetched.path), q4);
    // Only the chosen file was downloaded.
    let got = hub.requests();
    let mut blobs: Vec<&str> = downloads(&got).iter().map(|r| r.path.as_str()).collect();
    blobs.dedup();
    assert_eq!(blobs.len(), 1, "{got:?}");
    let cached = client.list_files(REPO).await.unwrap();
    assert!(cached.contains(&"model-Q4_K_M.gguf".to_owned()));
}

#[tokio::test]
async fn interrupted_download_resumes_where_it_stopped() {
    let hub = MockHub::start().await;
    let model = random_gguf(SIZE);
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", model.clone());
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));
    // The connection drops in the third chunk; two whole chunks were written.
    hub.cut_downloads_at(150_000, 1);
    let kept = 2 * CHUNK as u64;

    let (first, _) = fetch(&client, REPO, Some("tiny-Q4_K_M.gguf")).await;
    let err = first.expect_err("the cut download fails");
    assert!(matches!(err, HubError::Interrupted { .. }), "{err:?}");
    assert!(
        err.to_string().contains("run the same command again"),
        "{err}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the HTTP error is kept: {err:?}"
    );
    // Nothing goes on downloading behind the caller's back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_chunk = (SIZE / CHUNK * CHUNK) as u64;
    assert!(
        !downloads(&hub.requests())
            .iter()
            .any(|r| r.range_start() == Some(last_chunk)),
        "{:?}",
        hub.requests()
    );

    hub.clear_requests();
    let (second, reports) = fetch(&client, REPO, Some("tiny-Q4_K_M.gguf")).await;
    let fetched = second.expect("the second attempt finishes");

    assert_eq!(
        read(&fetched.path),
        model,
        "the resumed file is byte-identical"
    );
    let got = hub.requests();
    let starts: Vec<u64> = downloads(&got)
        .iter()
        .map(|r| r.range_start().expect("ranged"))
        .collect();
    assert_eq!(
        starts.iter().min(),
        Some(&kept),
        "resumed at the kept size: {got:?}"
    );
    // The progress starts from what was kept, not from zero.
    assert_eq!(reports.first().map(|p| p.downloaded), Some(kept));
    assert_eq!(reports.last().map(|p| p.downloaded), Some(SIZE as u64));
}

#[tokio::test]
async fn unknown_repository_is_named_as_such() {
    let hub = MockHub::start().await;
    let cache = tempfile::tempdir().unwrap();

    // The Hub answers 401 to anonymous requests for a missing repository, 404 otherwise.
    let anonymous = client(settings(&hub.url, cache.path()));
    let with_token = client(HubSettings {
        token: Some("hf_test".into()),
        ..settings(&hub.url, cache.path())
    });
    for client in [anonymous, with_token] {
        let (result, _) = fetch(&client, "nobody/nothing-GGUF", None).await;
        let err = result.expect_err("no such repository");
        assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("nobody/nothing-GGUF") && message.contains("not found"));
        assert!(message.contains("OWNER/NAME"), "{message}");
    }
}

#[tokio::test]
async fn missing_file_lists_the_gguf_files_there_are() {
    let hub = MockHub::start().await;
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", random_gguf(1000));
    hub.add_file(REPO, "tiny-Q8_0.gguf", random_gguf(1000));
    hub.add_file(REPO, "README.md", "# tiny");
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));

    let (result, _) = fetch(&client, REPO, Some("tiny-Q5_K_M.gguf")).await;
    let err = result.expect_err("no such file");

    match &err {
        HubError::FileNotFound {
            file, available, ..
        } => {
            assert_eq!(file, "tiny-Q5_K_M.gguf");
            assert_eq!(available, &["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]);
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"),
        "{message}"
    );
    assert!(downloads(&hub.requests()).is_empty());

    // A repository without any GGUF says so.
    hub.add_file("llmgate/safetensors-only", "model.safetensors", "x");
    let (result, _) = fetch(&client, "llmgate/safetensors-only", None).await;
    assert!(matches!(result, Err(HubError::NoGguf { .. })), "{result:?}");
}

#[tokio::test]
async fn offline_without_a_cached_copy_asks_nobody() {
    let hub = MockHub::start().await;
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", random_gguf(1000));
    let cache = tempfile::tempdir().unwrap();
    let client = client(HubSettings {
        offline: true,
        ..settings(&hub.url, cache.path())
    });

    for file in [None, Some("tiny-Q4_K_M.gguf")] {
        let (result, _) = fetch(&client, REPO, file).await;
        let err = result.expect_err("nothing cached");
        assert!(matches!(err, HubError::NotCachedOffline { .. }), "{err:?}");
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }
    assert!(client.list_files(REPO).await.is_err());
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[tokio::test]
async fn offline_uses_what_was_downloaded_before() {
    let hub = MockHub::start().await;
    let model = random_gguf(50_000);
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", model.clone());
    hub.add_file(REPO, "tiny-Q8_0.gguf", random_gguf(1000));
    let cache = tempfile::tempdir().unwrap();
    let (online, _) = fetch(&client(settings(&hub.url, cache.path())), REPO, None).await;
    let online = online.expect("download");
    hub.clear_requests();

    let offline = client(HubSettings {
        offline: true,
        ..settings(&hub.url, cache.path())
    });
    for file in [None, Some("tiny-Q4_K_M.gguf")] {
        let (result, reports) = fetch(&offline, REPO, file).await;
        let fetched = result.expect("from the cache");
        assert_eq!(fetched.path, online.path);
        assert_eq!(fetched.picked, file.is_none());
        assert!(fetched.from_cache);
        assert_eq!(read(&fetched.path), model);
        assert_eq!(reports.last().unwrap().downloaded, 50_000);
    }
    assert_eq!(
        offline.list_files(REPO).await.unwrap(),
        ["tiny-Q4_K_M.gguf"]
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    // Online but with the Hub unreachable, a model pulled earlier still runs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (result, _) = fetch(&client(settings(&down, cache.path())), REPO, None).await;
    let fetched = result.expect("the cached model");
    assert!(fetched.from_cache && fetched.path == online.path);
}

#[tokio::test]
async fn unreachable_hub_is_a_network_error() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&endpoint, cache.path()));

    for file in [None, Some("tiny-Q4_K_M.gguf")] {
        let (result, _) = fetch(&client, REPO, file).await;
        let err = result.expect_err("nobody there");
        assert!(matches!(err, HubError::Network { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("cannot reach") && message.contains(&endpoint));
        assert!(message.contains("HF_ENDPOINT"), "{message}");
        // The cause is kept for whoever wants more than the message.
        let mut deepest = std::error::Error::source(&err).expect("a source");
        while let Some(cause) = deepest.source() {
            deepest = cause;
        }
        assert!(message.contains(&deepest.to_string()), "{message}");
    }
    let err = HubClient::new(settings("huggingface.co", cache.path())).unwrap_err();
    assert!(matches!(err, HubError::InvalidEndpoint { .. }), "{err:?}");
}

#[tokio::test]
async fn a_cached_file_is_not_downloaded_again() {
    let hub = MockHub::start().await;
    let model = random_gguf(SIZE);
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", model.clone());
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));
    let (first, _) = fetch(&client, REPO, Some("tiny-Q4_K_M.gguf")).await;
    let first = first.expect("download");
    assert!(!first.from_cache);
    hub.clear_requests();

    let (named, reports) = fetch(&client, REPO, Some("tiny-Q4_K_M.gguf")).await;
    let named = named.expect("cached");
    assert!(named.from_cache);
    assert_eq!(named.path, first.path);
    assert_eq!(read(&named.path), model);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    // One report, complete: a bar shows 100% at once.
    assert_eq!(
        reports,
        [DownloadProgress {
            file: "tiny-Q4_K_M.gguf".into(),
            downloaded: SIZE as u64,
            total: Some(SIZE as u64),
        }]
    );

    // Unnamed: the Hub is asked what to pick, but nothing is downloaded.
    let (picked, _) = fetch(&client, REPO, None).await;
    let picked = picked.expect("cached");
    assert!(picked.from_cache && picked.picked);
    let got = hub.requests();
    assert!(got.iter().all(|r| r.path.starts_with("/api/")), "{got:?}");
}

#[tokio::test]
async fn gated_repository_needs_a_token_that_downloads_do_not_leak() {
    let hub = MockHub::start().await;
    let model = random_gguf(100_000);
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", model.clone());
    hub.gate(REPO, "hf_right");
    let cache = tempfile::tempdir().unwrap();

    let (anonymous, _) = fetch(&client(settings(&hub.url, cache.path())), REPO, None).await;
    let err = anonymous.expect_err("gated");
    assert!(
        matches!(
            err,
            HubError::Unauthorized {
                token_sent: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    let wrong = client(HubSettings {
        token: Some("hf_wrong".into()),
        ..settings(&hub.url, cache.path())
    });
    let (refused, _) = fetch(&wrong, REPO, None).await;
    let err = refused.expect_err("wrong token");
    assert!(
        matches!(
            err,
            HubError::Unauthorized {
                token_sent: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("accept its license"), "{err}");

    hub.clear_requests();
    let right = client(HubSettings {
        token: Some("hf_right".into()),
        ..settings(&hub.url, cache.path())
    });
    let (result, _) = fetch(&right, REPO, None).await;
    assert_eq!(read(&result.expect("with the token").path), model);
    let got = hub.requests();
    assert!(got
        .iter()
        .filter(|r| r.server == MockServer::Hub)
        .all(|r| r.authorized));
    // hf-hub 0.4 sends the token with its one-byte size probe to the CDN, but not with
    // the content itself.
    assert!(
        downloads(&got).iter().all(|r| !r.authorized),
        "the token went to the CDN: {got:?}"
    );
}

#[tokio::test]
async fn a_split_model_arrives_whole() {
    let hub = MockHub::start().await;
    let parts: Vec<(String, Bytes)> = (1..=3)
        .map(|i| {
            (
                format!("Q4_K_M/tiny-Q4_K_M-0000{i}-of-00003.gguf"),
                random_gguf(30_000),
            )
        })
        .collect();
    for (name, content) in &parts {
        hub.add_file(REPO, name, content.clone());
    }
    hub.add_file(REPO, "tiny-Q8_0.gguf", random_gguf(1000));
    let cache = tempfile::tempdir().unwrap();
    let client = client(settings(&hub.url, cache.path()));

    let (result, reports) = fetch(&client, REPO, None).await;
    let fetched = result.expect("download");

    assert_eq!(fetched.file, parts[0].0);
    let folder = fetched.path.parent().unwrap();
    for (name, content) in &parts {
        let file_name = Path::new(name).file_name().unwrap();
        assert_eq!(&read(&folder.join(file_name)), content, "{name}");
        assert!(
            reports.iter().any(|p| &p.file == name),
            "no progress for {name}"
        );
    }
}
