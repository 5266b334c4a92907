//! What a newcomer sees the first time they run `llmgate up`: the default model, and the
//! progress lines on stderr, each once and with no colour codes when stderr is not a
//! terminal. The model server is the stand-in llama-cpp-python server (a real process).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

mod common;

use common::{fake_llama_cpp_env, start, terminate, BIN};

#[tokio::test]
async fn up_without_a_model_runs_the_default_and_says_each_step_once_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let envs = dir.path().join("envs");
    fake_llama_cpp_env(&envs);
    // The default model already in the cache, as after a first run: no download.
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("models")).unwrap();
    let model = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::write(&model, "ok\n").unwrap();

    let mut command = Command::new(BIN);
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--python-env-dir")
        .arg(&envs)
        .arg("--cache-dir")
        .arg(&cache)
        // The default log level, plus the model server's output (which names the
        // arguments it was started with).
        .env("LLMGATE_LOG", "info,llmgate_core::runner::process=debug")
        .env_remove("LLMGATE_MODEL")
        .env_remove("LLMGATE_ADMIN_KEY")
        .env_remove("LLMGATE_CHAT_FORMAT")
        .stderr(Stdio::piped());
    let mut started = start(command, Duration::from_secs(60)).await;
    let mut stderr = started.child.stderr.take().unwrap();
    let status = terminate(&mut started.child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let mut bytes = Vec::new();
    stderr.read_to_end(&mut bytes).await.unwrap();
    let text = String::from_utf8_lossy(&bytes);
    eprintln!("llmgate's stderr:\n{text}");

    assert!(
        !bytes.contains(&0x1b),
        "no ANSI escape codes when stderr is not a terminal"
    );
    let steps: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("==> "))
        .collect();
    assert_eq!(
        steps,
        [
            "Python environment for the cpu backend",
            "Default model: SmolLM2 135M Instruct (Q4_1)",
            "Starting the model server (llama-cpp-python, cpu); loading the model",
            "Stopping the model server",
        ],
        "every step, in order"
    );
    for step in &steps {
        let mentions = text.lines().filter(|l| l.contains(step)).count();
        assert_eq!(
            mentions, 1,
            "'{step}' is said once, not again as a log line"
        );
    }
    assert!(
        text.contains(&format!("    cached: {}", model.display())),
        "the cached default model is used"
    );
    // SmolLM2 gets ChatML, the format it was trained on and one the gateway rebuilds
    // exactly for counting streamed tokens.
    let server_args = text
        .lines()
        .find(|l| l.contains("fake server pid"))
        .expect("the model server's output is logged at debug level");
    assert!(
        server_args.contains("--chat_format chatml"),
        "{server_args}"
    );
}
