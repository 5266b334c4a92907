//! Faults, with real processes: an upstream that breaks off, hangs or answers garbage,
//! and a gateway stopped or killed under load. Each test states what the client was
//! answered and what was recorded: nothing answered is lost, except what a SIGKILL
//! cannot save (docs/operations.md gives that bound).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmgate_core::test_util::{Answer, MockUpstream};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

mod common;

use common::{create_key, serve_fronting, usage_of, ADMIN};

/// A gateway in front of `upstream`, with the user key alice.
struct Gateway {
    child: Child,
    url: String,
    key: String,
    key_id: String,
}

async fn gateway(data_dir: &Path, upstream: &str, env: &[(&str, &str)]) -> Gateway {
    let served = serve_fronting(data_dir, upstream, env).await;
    let alice = create_key(&served.url, "alice").await;
    Gateway {
        child: served.child,
        url: served.url,
        key: alice.secret,
        key_id: alice.id,
    }
}

/// The key's request rows, once there are `count` (the writer batches every 50 ms).
async fn recorded(gw: &Gateway, count: usize) -> Vec<Value> {
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = http
            .get(format!(
                "{}/admin/usage/{}/requests?limit=10000",
                gw.url, gw.key_id
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json::<Vec<Value>>()
            .await
            .unwrap();
        if rows.len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows
}

/// Alice's requests in the data directory, after the gateway has stopped.
async fn requests_in_database(dir: &Path) -> u64 {
    usage_of(dir, "alice").await["requests"]
        .as_u64()
        .unwrap_or(0)
}

/// An upstream that misbehaves as the request's `model` says.
async fn broken_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(misbehave(stream));
        }
    });
    url
}

async fn misbehave(mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    // The head, then as much body as it announces.
    let body_start = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..body_start]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < body_start + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = String::from_utf8_lossy(&request[body_start..]).into_owned();
    let sse_head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let event = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());
    if body.contains("close-mid-stream") {
        let _ = stream
            .write_all(format!("{sse_head}{}", chunk(event)).as_bytes())
            .await;
        // and goes away without the last chunk, once the client has the first
        tokio::time::sleep(Duration::from_millis(300)).await;
    } else if body.contains("garbage") {
        let _ = stream.write_all(b"\x00\x01 this is not HTTP\r\n\r\n").await;
    } else if body.contains("hang") {
        tokio::time::sleep(Duration::from_secs(60)).await;
    } else if body.contains("bad-json") {
        let text = "{\"usage\": {\"prompt_tokens\": oops";
        let _ = stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                )
                .as_bytes(),
            )
            .await;
    } else if body.contains("short-body") {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":")
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    } else if body.contains("broken-at-once") {
        // Head and a broken body in one go: the gateway has sent nothing yet.
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":")
            .await;
    } else if body.contains("huge-line") {
        // 64 MiB of one SSE line with no end, then a usage event: the gateway passes
        // it through without holding it.
        let _ = stream.write_all(sse_head.as_bytes()).await;
        let piece = vec![b'x'; 1 << 20];
        let _ = stream
            .write_all(format!("{:x}\r\ndata: ", 6 + (64 << 20)).as_bytes())
            .await;
        for _ in 0..64 {
            if stream.write_all(&piece).await.is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"\r\n").await;
        let tail = "\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let _ = stream
            .write_all(format!("{}0\r\n\r\n", chunk(tail)).as_bytes())
            .await;
    }
    let _ = stream.shutdown().await;
}

fn chat(model: &str, answer: Answer) -> Value {
    json!({"model": model, "stream": answer == Answer::Streamed, "messages": [{"role": "user", "content": "hi"}]})
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test]
async fn an_upstream_that_breaks_off_hangs_or_answers_garbage_is_answered_clearly_and_recorded() {
    let upstream = broken_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(
        dir.path(),
        &upstream,
        &[("LLMGATE_UPSTREAM_TIMEOUT_SECS", "2")],
    )
    .await;
    let http = reqwest::Client::new();
    let send = |model: &str, answer: Answer| {
        http.post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&gw.key)
            .json(&chat(model, answer))
            .send()
    };

    // Closes mid-stream: the client sees the stream break, not end.
    let answer = send("close-mid-stream", Answer::Streamed).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        answer.bytes().await.is_err(),
        "a broken stream must not look whole"
    );

    // Not HTTP at all: 502 in OpenAI's shape.
    let answer = send("garbage", Answer::Whole).await.unwrap();
    assert_eq!(answer.status(), 502);
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_unavailable");

    // Never answers: 504 after upstream_timeout_secs.
    let asked = Instant::now();
    let answer = send("hang", Answer::Whole).await.unwrap();
    assert_eq!(answer.status(), 504);
    assert!(asked.elapsed() >= Duration::from_millis(1900));

    // A 200 whose JSON is broken reaches the client as sent.
    let answer = send("bad-json", Answer::Whole).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        "{\"usage\": {\"prompt_tokens\": oops"
    );

    // A body shorter than announced: the client sees it break.
    let answer = send("short-body", Answer::Whole).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.bytes().await.is_err());

    // Broken before the gateway could send anything: the connection is closed, so the
    // client sees an error, never a short answer taken for whole.
    match send("broken-at-once", Answer::Whole).await {
        Err(_) => {}
        Ok(answer) => assert!(answer.bytes().await.is_err()),
    }

    let rows = recorded(&gw, 6).await;
    assert_eq!(rows.len(), 6, "{rows:#?}");
    let by_model = |model: &str| {
        rows.iter()
            .find(|r| r["model"] == model)
            .unwrap_or_else(|| panic!("{model} recorded: {rows:#?}"))
    };
    for (model, status) in [
        ("close-mid-stream", 200),
        ("garbage", 502),
        ("hang", 504),
        ("bad-json", 200),
        ("short-body", 200),
        ("broken-at-once", 200),
    ] {
        let row = by_model(model);
        assert_eq!(row["status"], status, "{model}: {row}");
        if status == 200 {
            // The model may have run: its tokens are unknown, never taken for zero.
            assert!(row["prompt_tokens"].is_null(), "{model}: {row}");
        } else {
            // The gateway's own error: nothing reached a model.
            assert_eq!(row["prompt_tokens"], 0, "{model}: {row}");
        }
    }
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

#[tokio::test]
async fn a_64_mib_sse_line_passes_through_without_being_held() {
    let upstream = broken_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &upstream, &[]).await;
    let pid = gw.child.id().unwrap();
    let before = rss(pid);
    let mut answer = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&gw.key)
        .json(&chat("huge-line", Answer::Streamed))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut received = 0usize;
    let mut peak = before;
    // Read slowly enough that a gateway holding the line would show it.
    while let Some(chunk) = answer.chunk().await.unwrap() {
        received += chunk.len();
        if received % (8 << 20) < chunk.len() {
            peak = peak.max(rss(pid));
        }
    }
    assert!(received > 64 << 20, "{received}");
    let grew = peak.saturating_sub(before);
    assert!(grew < 48 << 20, "the gateway grew by {} MiB", grew >> 20);
    let rows = recorded(&gw, 1).await;
    assert_eq!(rows.len(), 1);
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

/// Clients sending requests as fast as they are answered, until told to stop; counts
/// what each side saw.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    /// When each answer was complete, in ms since `started`.
    answered_at: Arc<std::sync::Mutex<Vec<u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn load(url: &str, key: &str, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let answered_at = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let tasks = (0..clients)
        .map(|i| {
            let (stop, sent, answered, answered_at) = (
                stop.clone(),
                sent.clone(),
                answered.clone(),
                answered_at.clone(),
            );
            let (url, key) = (url.to_owned(), key.to_owned());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(Ordering::SeqCst) {
                    sent.fetch_add(1, Ordering::SeqCst);
                    let reply = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&chat(
                            "mock-model",
                            if i % 2 == 0 {
                                Answer::Streamed
                            } else {
                                Answer::Whole
                            },
                        ))
                        .send()
                        .await;
                    let Ok(reply) = reply else { break };
                    let whole = reply.status() == 200 && reply.bytes().await.is_ok();
                    if !whole {
                        break;
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    answered_at
                        .lock()
                        .unwrap()
                        .push(started.elapsed().as_millis() as u64);
                }
            })
        })
        .collect();
    Load {
        stop,
        sent,
        answered,
        answered_at,
        tasks,
    }
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing_that_was_answered() {
    let upstream = MockUpstream::start().await;
    upstream.set_chunk_delay(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &upstream.url, &[]).await;
    let load = load(&gw.url, &gw.key, 16);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exit = common::terminate(&mut gw.child, Duration::from_secs(40)).await;
    assert!(exit.success(), "{exit}");
    load.stop.store(true, Ordering::SeqCst);
    for task in load.tasks {
        let _ = task.await;
    }
    let sent = load.sent.load(Ordering::SeqCst);
    let answered = load.answered.load(Ordering::SeqCst);
    let recorded = requests_in_database(dir.path()).await;
    assert!(answered > 50, "the load ran: {answered} answered");
    // Everything answered is recorded; so is what was cut off or refused once it
    // reached the gateway, and nothing more than was sent.
    assert!(
        recorded >= answered && recorded <= sent,
        "sent {sent}, answered {answered}, recorded {recorded}"
    );
}

#[tokio::test]
async fn sigkill_under_load_loses_at_most_the_last_moments() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &upstream.url, &[]).await;
    let load = load(&gw.url, &gw.key, 16);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = started.elapsed().as_millis() as u64;
    gw.child.start_kill().unwrap();
    let _ = gw.child.wait().await;
    load.stop.store(true, Ordering::SeqCst);
    for task in load.tasks {
        let _ = task.await;
    }
    let answered = load.answered.load(Ordering::SeqCst);
    let before_the_last_second = load
        .answered_at
        .lock()
        .unwrap()
        .iter()
        .filter(|&&at| at + 1000 < killed_at)
        .count() as u64;
    let recorded = requests_in_database(dir.path()).await;
    assert!(before_the_last_second > 50, "the load ran");
    assert!(
        recorded >= before_the_last_second && recorded <= load.sent.load(Ordering::SeqCst),
        "answered {answered} ({before_the_last_second} more than 1 s before the kill), recorded {recorded}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_its_answer_is_cut_off_after_the_idle_timeout() {
    let upstream = broken_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &upstream, &[("LLMGATE_IDLE_TIMEOUT_SECS", "2")]).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let body = chat("huge-line", Answer::Streamed).to_string();
    let mut client = TcpStream::connect(&addr).await.unwrap();
    client
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                gw.key,
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // It reads nothing while the gateway has 64 MiB to send it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection is still open");
    assert!(received < 64 << 20, "the whole answer was sent: {received}");
    let rows = recorded(&gw, 1).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["status"], 200);
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}

/// The CPU time (user and system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = 100; // USER_HZ on Linux
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Clients whose first bytes begin HTTP/2's preface ("PR") and stop there cost the
/// gateway nothing while they wait: it waits on the sockets, not polling them, and a
/// client that goes on is served (HTTP/1 or HTTP/2 as its bytes say).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn clients_that_stop_inside_the_http2_preface_cost_nothing_while_they_wait() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &upstream.url, &[]).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let pid = gw.child.id().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut client = TcpStream::connect(&addr).await.unwrap();
        client.write_all(b"PR").await.unwrap();
        stalled.push(client);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(150),
        "200 waiting clients took {used:?} of CPU in 2 s"
    );
    // One that goes on with an HTTP/1 request ("PR" cannot begin one: a 400) and one
    // that completes the preface as an HTTP/2 client (its SETTINGS answered).
    let mut http1 = TcpStream::connect(&addr).await.unwrap();
    http1.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    http1
        .write_all(b"OST /healthz HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    http1.read_exact(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
    let mut http2 = TcpStream::connect(&addr).await.unwrap();
    http2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rest of the preface, then an empty SETTINGS frame.
    http2
        .write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    http2.read_exact(&mut frame).await.unwrap();
    assert_eq!(
        frame[3], 4,
        "the server's first frame is SETTINGS: {frame:?}"
    );
    drop(stalled);
    let exit = common::terminate(&mut gw.child, Duration::from_secs(10)).await;
    assert!(exit.success());
}
