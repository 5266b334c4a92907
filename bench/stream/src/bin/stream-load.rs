//! `stream-load`: holds `--streams` streaming chat completions open at once through the
//! URL given (opened evenly over `--ramp-secs`, one connection each), and reports what
//! the path to the upstream added: time to first byte, the gaps between chunks against
//! the gaps the upstream sent them with, chunks and tokens received, and, for the
//! process given with `--proxy-pid`, CPU time per chunk and resident memory per open
//! stream. Its last line, `summary …`, holds the figures as `name=value` pairs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use llmgate_bench_stream::chunk::{stamp_of, usage_of, wall_us, Usage};
use llmgate_bench_stream::proc::{cpu_us, machine_ticks, rss_kib, TICK_US};
use llmgate_bench_stream::sse::SseSplitter;
use llmgate_bench_stream::stats::{added_gaps, percentile};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Holds many SSE streams open through a proxy and measures it (bench/stream.sh)")]
struct Args {
    /// The chat completions URL, e.g. http://127.0.0.1:18102/v1/chat/completions
    #[arg(long)]
    url: http::Uri,
    /// API key sent as a bearer token (none when empty)
    #[arg(long, default_value = "")]
    key: String,
    /// Streams open at once
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Seconds over which the streams are opened
    #[arg(long, default_value_t = 3.0)]
    ramp_secs: f64,
    /// Content chunks asked of each stream (max_tokens)
    #[arg(long, default_value_t = 300)]
    chunks: u64,
    /// The proxy's process (or, for the direct arm, the upstream's): CPU and memory
    #[arg(long)]
    proxy_pid: Vec<u32>,
    /// The upstream's process, to show it keeps up
    #[arg(long)]
    upstream_pid: Option<u32>,
    /// Name of this arm in the report
    #[arg(long, default_value = "arm")]
    label: String,
    /// Worker threads
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What one stream saw.
#[derive(Debug, Default)]
struct StreamResult {
    error: Option<String>,
    /// Time to first byte less the time the upstream took before its first chunk, µs.
    ttfb_added_us: Option<i64>,
    /// (received, sent) of every stamped chunk, µs.
    chunks: Vec<(u64, u64)>,
    /// How late the upstream sent each chunk against its schedule, µs.
    upstream_late_us: Vec<u64>,
    /// Every `data:` event, [DONE] included.
    events: u64,
    usage: Option<Usage>,
    done: bool,
}

/// Streams that have their first byte, and streams over.
#[derive(Debug, Default)]
struct Progress {
    open: AtomicUsize,
    over: AtomicUsize,
}

fn main() {
    let args = Args::parse();
    llmgate_bench_stream::block_on(args.threads, run(args));
}

fn pids_cpu_us(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_us(&p.to_string())).sum()
}

fn pids_rss_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| rss_kib(&p.to_string())).sum()
}

async fn run(args: Args) {
    let args = Arc::new(args);
    let progress = Arc::new(Progress::default());
    let rss_before = pids_rss_kib(&args.proxy_pid);
    let proxy_cpu_before = pids_cpu_us(&args.proxy_pid);
    let upstream_cpu_before = args.upstream_pid.and_then(|p| cpu_us(&p.to_string()));
    let self_cpu_before = cpu_us("self").unwrap_or(0);
    let machine_before = machine_ticks().unwrap_or_default();
    let started = Instant::now();

    // The proxy's memory while every stream is open (and none over yet): the highest of
    // samples every 50 ms.
    let sampler = {
        let (args, progress) = (args.clone(), progress.clone());
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut samples = 0u32;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while progress.over.load(Ordering::Relaxed) < args.streams {
                tick.tick().await;
                if progress.open.load(Ordering::Relaxed) == args.streams
                    && progress.over.load(Ordering::Relaxed) == 0
                {
                    peak = peak.max(pids_rss_kib(&args.proxy_pid));
                    samples += 1;
                }
            }
            (peak, samples)
        })
    };

    let mut tasks = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let (args, progress) = (args.clone(), progress.clone());
        let at = started
            + Duration::from_secs_f64(args.ramp_secs * i as f64 / args.streams.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let mut result = StreamResult::default();
            if let Err(err) = one_stream(&args, &progress, &mut result).await {
                result.error = Some(err);
            }
            progress.over.fetch_add(1, Ordering::Relaxed);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a stream task"));
    }
    let elapsed = started.elapsed();
    let (rss_plateau, plateau_samples) = sampler.await.expect("the sampler");
    let proxy_cpu = pids_cpu_us(&args.proxy_pid) - proxy_cpu_before;
    let upstream_cpu = args
        .upstream_pid
        .and_then(|p| Some(cpu_us(&p.to_string())? - upstream_cpu_before?));
    let self_cpu = cpu_us("self").unwrap_or(0) - self_cpu_before;
    let machine_after = machine_ticks().unwrap_or_default();
    report(
        &args,
        &results,
        Measured {
            elapsed,
            rss_before,
            rss_plateau,
            plateau_samples,
            proxy_cpu,
            upstream_cpu,
            self_cpu,
            machine_busy: machine_after.0 - machine_before.0,
            machine_idle: machine_after.1 - machine_before.1,
        },
    );
}

async fn one_stream(
    args: &Args,
    progress: &Progress,
    result: &mut StreamResult,
) -> Result<(), String> {
    let authority = args.url.authority().ok_or("the URL has no host")?.clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let body = format!(
        r#"{{"model":"bench","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{},"messages":[{{"role":"user","content":"Tell me a long story."}}]}}"#,
        args.chunks
    );
    let mut request = Request::post(args.url.clone())
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/json");
    if !args.key.is_empty() {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", args.key));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let sent_at = wall_us();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let text = response.into_body().collect().await.map(|b| b.to_bytes());
        let text = text
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        return Err(format!(
            "{status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let mut body = response.into_body();
    let mut splitter = SseSplitter::new();
    let mut first = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let received = wall_us();
        splitter.push(data, |event| {
            result.events += 1;
            if event == b"[DONE]" {
                result.done = true;
            } else if let Some(stamp) = stamp_of(event) {
                if first {
                    first = false;
                    progress.open.fetch_add(1, Ordering::Relaxed);
                    let upstream_wait = stamp.sent_us.saturating_sub(stamp.request_us);
                    result.ttfb_added_us =
                        Some(received as i64 - sent_at as i64 - upstream_wait as i64);
                }
                result.chunks.push((received, stamp.sent_us));
                result.upstream_late_us.push(stamp.late_us);
            } else if let Some(usage) = usage_of(event) {
                result.usage = Some(usage);
            }
        });
    }
    if first {
        progress.open.fetch_add(1, Ordering::Relaxed);
    }
    if !result.done {
        return Err("the stream ended without [DONE]".to_owned());
    }
    Ok(())
}

#[derive(Debug)]
struct Measured {
    elapsed: Duration,
    rss_before: u64,
    rss_plateau: u64,
    plateau_samples: u32,
    proxy_cpu: u64,
    upstream_cpu: Option<u64>,
    self_cpu: u64,
    machine_busy: u64,
    machine_idle: u64,
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

fn report(args: &Args, results: &[StreamResult], m: Measured) {
    let failed: Vec<&str> = results.iter().filter_map(|r| r.error.as_deref()).collect();
    let mut ttfb: Vec<i32> = results
        .iter()
        .filter_map(|r| r.ttfb_added_us)
        .map(clamp_i32)
        .collect();
    let mut gaps: Vec<i32> = Vec::new();
    let mut transit: Vec<i32> = Vec::new();
    let mut late: Vec<i32> = Vec::new();
    let (mut chunks, mut events) = (0u64, 0u64);
    let mut tokens = Usage::default();
    let mut with_usage = 0usize;
    let mut usage_matches = 0usize;
    for r in results {
        gaps.extend(added_gaps(&r.chunks).map(clamp_i32));
        transit.extend(
            r.chunks
                .iter()
                .map(|(recv, sent)| clamp_i32(*recv as i64 - *sent as i64)),
        );
        late.extend(r.upstream_late_us.iter().map(|l| clamp_i32(*l as i64)));
        // Content chunks: all stamped chunks but the first (the role).
        let content = r.chunks.len().saturating_sub(1) as u64;
        chunks += content;
        events += r.events;
        if let Some(u) = r.usage {
            with_usage += 1;
            tokens.prompt += u.prompt;
            tokens.completion += u.completion;
            tokens.total += u.total;
            if u.completion == content && u.total == u.prompt + u.completion {
                usage_matches += 1;
            }
        }
    }
    for v in [&mut ttfb, &mut gaps, &mut transit, &mut late] {
        v.sort_unstable();
    }
    let secs = m.elapsed.as_secs_f64();
    let ok = results.len() - failed.len();
    let pct = |v: &[i32], p: f64| f64::from(percentile(v, p)) / 1000.0;
    println!(
        "== {} — {} streams through {}",
        args.label, args.streams, args.url
    );
    println!(
        "streams: {ok} complete, {} failed; {chunks} content chunks, {events} events in {secs:.1} s",
        failed.len()
    );
    for (i, error) in failed.iter().take(3).enumerate() {
        println!("  failure {}: {error}", i + 1);
    }
    println!(
        "usage chunks: {with_usage} ({usage_matches} equal to the chunks received); tokens {} prompt + {} completion = {}",
        tokens.prompt, tokens.completion, tokens.total
    );
    println!(
        "added TTFB ms: p50 {:.2} p99 {:.2} max {:.2}",
        pct(&ttfb, 50.0),
        pct(&ttfb, 99.0),
        pct(&ttfb, 100.0)
    );
    println!(
        "added inter-chunk delay ms: p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
        pct(&gaps, 50.0),
        pct(&gaps, 99.0),
        pct(&gaps, 99.9),
        pct(&gaps, 100.0)
    );
    println!(
        "chunk transit (sent → received) ms: p50 {:.3} p99 {:.3}",
        pct(&transit, 50.0),
        pct(&transit, 99.0)
    );
    println!(
        "upstream lateness against its schedule ms: p50 {:.3} p99 {:.3}",
        pct(&late, 50.0),
        pct(&late, 99.0)
    );
    let cpu_per_chunk = m.proxy_cpu as f64 / events.max(1) as f64;
    let kib_per_stream =
        (m.rss_plateau.saturating_sub(m.rss_before)) as f64 / args.streams.max(1) as f64;
    if !args.proxy_pid.is_empty() {
        println!(
            "proxy: CPU {:.1} µs per event ({:.0} % of a core); RSS {} KiB before, {} KiB with all streams open ({} samples): {:.1} KiB per open stream",
            cpu_per_chunk,
            100.0 * m.proxy_cpu as f64 / 1e6 / secs,
            m.rss_before,
            m.rss_plateau,
            m.plateau_samples,
            kib_per_stream
        );
    }
    let upstream_share = m.upstream_cpu.map(|c| 100.0 * c as f64 / 1e6 / secs);
    let load_share = 100.0 * m.self_cpu as f64 / 1e6 / secs;
    let machine_busy =
        100.0 * m.machine_busy as f64 / (m.machine_busy + m.machine_idle).max(1) as f64;
    println!(
        "keeping up: upstream {} of a core, this load generator {load_share:.0} %, machine busy {machine_busy:.0} % ({} µs a tick)",
        upstream_share.map_or("-".to_owned(), |s| format!("{s:.0} %")),
        TICK_US
    );
    println!(
        "summary label={} streams={} complete={ok} failed={} chunks={chunks} events={events} prompt_tokens={} completion_tokens={} total_tokens={} usage_exact_streams={usage_matches} ttfb_p50_ms={:.2} ttfb_p99_ms={:.2} gap_p50_ms={:.3} gap_p99_ms={:.3} gap_p999_ms={:.3} transit_p50_ms={:.3} transit_p99_ms={:.3} late_p99_ms={:.3} cpu_us_per_event={:.1} kib_per_stream={:.1} rss_before_kib={} rss_plateau_kib={} plateau_samples={} upstream_cpu_pct={} load_cpu_pct={load_share:.0} machine_busy_pct={machine_busy:.0}",
        args.label,
        args.streams,
        failed.len(),
        tokens.prompt,
        tokens.completion,
        tokens.total,
        pct(&ttfb, 50.0),
        pct(&ttfb, 99.0),
        pct(&gaps, 50.0),
        pct(&gaps, 99.0),
        pct(&gaps, 99.9),
        pct(&transit, 50.0),
        pct(&transit, 99.0),
        pct(&late, 99.0),
        cpu_per_chunk,
        kib_per_stream,
        m.rss_before,
        m.rss_plateau,
        m.plateau_samples,
        upstream_share.map_or("-".to_owned(), |s| format!("{s:.0}")),
    );
}
