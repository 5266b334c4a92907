//! What no client can do to the gateway: hold connections with slow or idle sockets,
//! keep it from stopping, reach upstream paths outside `/v1`, grow `/metrics` without
//! bound, or read its database as another local user. Driven against the built binary.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use llmgate_core::test_util::{Answer, MockUpstream};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

mod common;

use common::{create_key, serve_fronting, start, usage_of, ADMIN, BIN};

fn chat(answer: Answer) -> Value {
    json!({"model": "mock-model", "stream": answer == Answer::Streamed,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// Reads until the peer closes the connection (or `within` passes: `None`).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// One raw HTTP/1.1 request, as written (no client normalises its path); the answer's
/// status and body.
async fn raw_request(addr: &str, head: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_and_cannot_lock_real_clients_out() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = serve_fronting(
        dir.path(),
        &upstream.url,
        &[
            ("LLMGATE_HEADER_READ_TIMEOUT_SECS", "1"),
            ("LLMGATE_IDLE_TIMEOUT_SECS", "2"),
            ("LLMGATE_MAX_CONNECTIONS", "8"),
        ],
    )
    .await;
    let key = create_key(&gw.url, "alice").await.secret;

    // A head sent a byte at a time is cut off, although bytes keep coming.
    let mut slow = TcpStream::connect(&gw.addr).await.unwrap();
    let dripping = async {
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                return true; // the gateway closed it
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let cut_off = tokio::time::timeout(Duration::from_secs(6), dripping).await;
    assert!(
        matches!(cut_off, Ok(true)),
        "a head dripping in for 6 s was not cut off: {cut_off:?}"
    );

    // A connection that sends nothing at all is cut off as soon.
    let mut silent = TcpStream::connect(&gw.addr).await.unwrap();
    let after = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert!(
        after < Duration::from_millis(1900),
        "closed after {after:?}"
    );

    // Every slot taken by half-sent heads: a real client waits, then is served once the
    // header-read timeout frees the slots.
    let mut holders = Vec::new();
    for _ in 0..12 {
        let mut s = TcpStream::connect(&gw.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        holders.push(s);
    }
    let asked = Instant::now();
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Whole))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("a real client is served while slow clients hold every slot");
    assert_eq!(answer.status(), 200);
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    for mut holder in holders {
        assert!(
            closed_within(&mut holder, Duration::from_secs(5))
                .await
                .is_some(),
            "a half-sent head keeps its connection"
        );
    }

    // An idle keep-alive connection is closed after the idle timeout …
    let mut idle = TcpStream::connect(&gw.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let after = closed_within(&mut idle, Duration::from_secs(8))
        .await
        .expect("an idle connection is closed");
    assert!(
        after >= Duration::from_millis(1500),
        "closed after {after:?}"
    );

    // … but a request whose answer takes longer than both timeouts is not cut short.
    upstream.set_response_delay(Duration::from_secs(3));
    let slow_answer = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Whole))
        .send()
        .await
        .unwrap();
    assert_eq!(slow_answer.status(), 200);
    let body: Value = slow_answer.json().await.unwrap();
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let mut gw = gw;
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

#[tokio::test]
async fn sigterm_stops_at_the_deadline_and_records_what_it_cut_off() {
    let upstream = MockUpstream::start().await;
    upstream.set_chunk_delay(Duration::from_secs(30)); // a stream that hangs
    let dir = tempfile::tempdir().unwrap();
    let mut gw = serve_fronting(
        dir.path(),
        &upstream.url,
        &[("LLMGATE_SHUTDOWN_TIMEOUT_SECS", "2")],
    )
    .await;
    let key = create_key(&gw.url, "alice").await.secret;

    let streaming = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Streamed))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    // And a client that never finishes its request head.
    let mut half = TcpStream::connect(&gw.addr).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let exit = common::terminate(&mut gw.child, Duration::from_secs(15)).await;
    assert!(exit.success(), "{exit}");
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "stopped after {took:?} with a 2 s deadline"
    );
    let rest = streaming.bytes().await;
    assert!(rest.is_err() || !String::from_utf8_lossy(&rest.unwrap()).contains("[DONE]"));

    // The cut-off stream is in the usage, as a request with tokens unknown.
    let alice = usage_of(dir.path(), "alice").await;
    assert_eq!(alice["requests"], 1, "{alice}");
}

#[tokio::test]
async fn dot_segments_never_reach_the_upstream() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = serve_fronting(dir.path(), &upstream.url, &[]).await;
    let key = create_key(&gw.url, "alice").await.secret;
    for path in [
        "/v1/../admin/keys",
        "/v1/%2e%2e/admin/keys",
        "/v1/%2E%2E/%2e%2e/secret",
        "/v1/./chat/completions",
        "/v1/chat%2f..%2f..%2fadmin",
    ] {
        let (status, body) = raw_request(
            &gw.addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "invalid_path", "{path}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    // The plain path still works.
    let (status, _) = raw_request(
        &gw.addr,
        &format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

#[tokio::test]
#[ignore = "needs promtool (Debian's prometheus package); scripts/test installs it"]
async fn metrics_read_as_prometheus_text_and_made_up_paths_are_one_series() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = serve_fronting(dir.path(), &upstream.url, &[]).await;
    let key = create_key(&gw.url, "alice").await.secret;
    let http = reqwest::Client::new();
    for i in 0..300 {
        let path = format!("/v1/made-up-{i}-{}", "x".repeat(i * 10));
        let answer = http
            .get(format!("{}{path}", gw.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404);
    }
    let answer = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Whole))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The usage writer feeds the metrics within its linger time.
    let mut text = String::new();
    for _ in 0..50 {
        let scrape = http
            .get(format!("{}/metrics", gw.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            scrape.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        text = scrape.text().await.unwrap();
        if text.contains(r#"endpoint="/v1/chat/completions""#)
            && text.contains(r#"status="404",model="other"} 300"#)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.contains(
            r#"llmgate_requests_total{key="alice",endpoint="other",status="404",model="other"} 300"#
        ),
        "{text}"
    );
    assert!(!text.contains("made-up"), "a made-up path became a label");
    assert!(
        text.contains("# TYPE llmgate_requests_total counter"),
        "{text}"
    );
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    assert!(text.len() < 64 * 1024, "{} bytes", text.len());

    // promtool, Prometheus's own checker, reads it without a complaint.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let checked = promtool.wait_with_output().await.unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A scraper that asks for OpenMetrics gets it.
    let scrape = http
        .get(format!("{}/metrics", gw.url))
        .bearer_auth(ADMIN)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert!(scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let open = scrape.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"));
    assert!(open.contains("# TYPE llmgate_requests counter"));
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_database_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = MockUpstream::start().await;
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("fresh/llmgate-data");
    let mut gw = serve_fronting(&data, &upstream.url, &[]).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    for file in ["llmgate.db", "llmgate.db-wal", "llmgate.db-shm"] {
        let path = data.join(file);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{file}");
        }
    }
    assert!(data.join("llmgate.db").exists());
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());

    // A database left readable by an older version is made private on the next start.
    std::fs::set_permissions(
        data.join("llmgate.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut gw = serve_fronting(&data, &upstream.url, &[]).await;
    assert_eq!(mode(&data.join("llmgate.db")), 0o600);
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_answer_is_cut_off_and_the_request_recorded() {
    let upstream = MockUpstream::start().await;
    upstream.set_chunk_delay(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let mut gw = serve_fronting(
        dir.path(),
        &upstream.url,
        &[("LLMGATE_UPSTREAM_TIMEOUT_SECS", "2")],
    )
    .await;
    let key = create_key(&gw.url, "alice").await.secret;
    let asked = Instant::now();
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Streamed))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let rest = tokio::time::timeout(Duration::from_secs(10), answer.bytes())
        .await
        .expect("the stream ends soon after the upstream goes silent");
    assert!(rest.is_err(), "a cut-off stream must not look complete");
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
    let alice = usage_of(dir.path(), "alice").await;
    assert_eq!(alice["requests"], 1, "{alice}");
    assert_eq!(alice["requests_without_usage"], 1, "{alice}");
}

#[tokio::test]
async fn with_few_file_descriptors_slow_clients_cannot_lock_real_clients_out() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // 256 open files at most (soft and hard): the connection cap follows from it.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args([
            "serve",
            "--upstream",
            &upstream.url,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("LLMGATE_LOG", "error")
        .env("LLMGATE_ADMIN_KEY", ADMIN)
        .env("LLMGATE_HEADER_READ_TIMEOUT_SECS", "1")
        .stderr(Stdio::inherit());
    let started = start(command, Duration::from_secs(20)).await;
    let mut child = started.child;
    let addr = started.url.trim_start_matches("http://").to_owned();
    let key = create_key(&started.url, "alice").await.secret;

    // 300 clients that never finish their request head: more than the process has
    // file descriptors for.
    let mut holders = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect(&addr).await {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
            holders.push(s);
        }
    }
    let asked = Instant::now();
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", started.url))
        .bearer_auth(&key)
        .json(&chat(Answer::Whole))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("a real client is served after the slow ones are cut off");
    assert_eq!(answer.status(), 200);
    eprintln!("served after {:?} behind 300 slow clients", asked.elapsed());
    drop(holders);
    let exit = common::terminate(&mut child, Duration::from_secs(10)).await;
    assert!(exit.success());
}
