//! Runner lifecycle with real processes: the real llama-cpp-python runner and its
//! bootstrap, running a stand-in server module in a throwaway virtual environment.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmgate_core::runner::process::RestartPolicy;
use llmgate_core::runner::{
    LlamaCppPythonRunner, ModelRunner, ModelSpec, PythonEnv, RunnerError, RunnerStatus,
};

fn fake_env(dir: &Path) -> PythonEnv {
    llmgate_tests::fake_llama_cpp_env(&dir.join("envs"))
}

fn model(dir: &Path, mode: &str) -> PathBuf {
    let path = dir.join(format!("{mode}.gguf"));
    std::fs::write(&path, mode).unwrap();
    path
}

fn quick_policy() -> RestartPolicy {
    RestartPolicy {
        max_restarts: 2,
        window: Duration::from_secs(60),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_millis(400),
        stop_grace: Duration::from_secs(3),
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn starts_answers_counts_tokens_and_stops_without_leaving_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let runner = LlamaCppPythonRunner::new(
        fake_env(dir.path()),
        ModelSpec::new(model(dir.path(), "ok")),
    );
    runner.start().await.unwrap();
    assert_eq!(runner.status(), RunnerStatus::Ready);
    assert!(runner.healthy().await);
    let base = runner.base_url().unwrap();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    assert_eq!(runner.count_tokens("three little words").await.unwrap(), 4);
    let log = runner.log_tail(20).join("\n");
    assert!(
        log.contains("--interrupt_requests false"),
        "the real flags reach the server: {log}"
    );

    let pid = runner.supervisor().pid().unwrap();
    assert!(alive(pid));
    runner.stop().await;
    assert_eq!(runner.status(), RunnerStatus::Stopped);
    assert!(!alive(pid), "stop leaves no process behind");
    assert!(!runner.healthy().await);
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn a_server_that_never_answers_fails_after_the_readiness_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        ready_timeout: Duration::from_secs(2),
        ..ModelSpec::new(model(dir.path(), "never-ready"))
    };
    let runner = LlamaCppPythonRunner::new(fake_env(dir.path()), spec).with_policy(quick_policy());
    let started = Instant::now();
    let err = runner.start().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.to_string().contains("did not answer") && err.to_string().contains("within 2 s"),
        "{err}"
    );
    assert!(matches!(runner.status(), RunnerStatus::Failed { .. }));
    assert!(
        runner.supervisor().pid().is_none(),
        "the hung process was killed"
    );
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn a_crashed_server_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let runner = LlamaCppPythonRunner::new(
        fake_env(dir.path()),
        ModelSpec::new(model(dir.path(), "crash-once")),
    )
    .with_policy(quick_policy());
    runner.start().await.unwrap();
    let first = runner.supervisor().pid().unwrap();
    let mut states = runner.supervisor().subscribe();
    // It crashes half a second after it first answered, then comes back on the same
    // address.
    let within = Duration::from_secs(30);
    tokio::time::timeout(
        within,
        states.wait_for(|s| matches!(s, RunnerStatus::Restarting { .. })),
    )
    .await
    .expect("restarting")
    .unwrap();
    tokio::time::timeout(within, states.wait_for(|s| *s == RunnerStatus::Ready))
        .await
        .expect("ready again")
        .unwrap();
    let second = runner.supervisor().pid().unwrap();
    assert_ne!(first, second);
    assert!(runner.healthy().await);
    assert!(
        runner.log_tail(50).join("\n").contains("exited"),
        "the crash is in the log"
    );
    runner.stop().await;
    assert!(!alive(second));
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn a_server_that_keeps_crashing_is_given_up_with_its_last_output() {
    let dir = tempfile::tempdir().unwrap();
    let runner = LlamaCppPythonRunner::new(
        fake_env(dir.path()),
        ModelSpec::new(model(dir.path(), "crash-always")),
    )
    .with_policy(quick_policy());
    let err = runner.start().await.unwrap_err().to_string();
    assert!(
        err.contains("exited 3 times") && err.contains("cannot load model"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn a_port_in_use_is_a_clear_error_and_a_missing_model_too() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let env = fake_env(dir.path());
    let spec = ModelSpec {
        port: Some(port),
        ..ModelSpec::new(model(dir.path(), "ok"))
    };
    let err = LlamaCppPythonRunner::new(env.clone(), spec)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunnerError::PortInUse(p) if p == port),
        "{err}"
    );
    let err = LlamaCppPythonRunner::new(env, ModelSpec::new(dir.path().join("absent.gguf")))
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("absent.gguf"), "{err}");
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn the_server_goes_when_its_parent_is_killed() {
    // Even a SIGKILL of llmgate (which it cannot intercept) must not leave the server
    // running: the bootstrap watches its parent. Here a shell plays llmgate.
    let dir = tempfile::tempdir().unwrap();
    let env = fake_env(dir.path());
    let runner = LlamaCppPythonRunner::new(env.clone(), ModelSpec::new(model(dir.path(), "ok")));
    let launch = runner.launch(0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = launch
        .args
        .iter()
        .map(|a| {
            if a == "0" {
                port.to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut parent = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("\"$@\" & echo $!; wait")
        .arg("sh")
        .arg(env.python())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(parent.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    let server: u32 = line.trim().parse().unwrap();
    wait_until("the server to answer", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    parent.start_kill().unwrap(); // SIGKILL
    parent.wait().await.unwrap();
    wait_until("the orphaned server to exit", || !alive(server)).await;
}

#[tokio::test]
async fn an_external_server_is_healthy_while_it_answers_and_offers_no_tokenizer() {
    use llmgate_core::runner::ExternalRunner;
    let upstream = llmgate_core::test_util::MockUpstream::start().await;
    let runner = ExternalRunner::new(format!("{}/v1/", upstream.url));
    runner.start().await.unwrap();
    assert_eq!(runner.base_url().unwrap(), format!("{}/v1", upstream.url));
    assert!(runner.healthy().await);
    assert!(
        upstream.seen().iter().any(|s| s.uri == "/v1/models"),
        "health is asked at /v1/models"
    );
    assert!(runner.count_tokens("x").await.is_err());

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = ExternalRunner::new(format!("http://{}", closed.local_addr().unwrap()));
    drop(closed);
    assert!(!gone.healthy().await);
}
