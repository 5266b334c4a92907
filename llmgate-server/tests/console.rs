//! The web console in real headless Chromium: `tests/browser/console.test.mjs`, driven by
//! playwright-core under Node's test runner, against the built `llmgate` in front of a
//! mock upstream (the model `upstream`; the Models page adds and removes more, local ones
//! run by `tests/browser/fake-llama-server.mjs`). Screenshots of each page land in `target/screenshots/` (in
//! `docs/screenshots/` with `UPDATE_SCREENSHOTS=1`).
//!
//! Needs Node.js, Debian's `chromium` and `npm ci` in `tests/browser` (the README's test
//! command, `scripts/test`, installs them).

use std::path::Path;
use std::time::Duration;

use llmgate_core::test_util::MockUpstream;
use tokio::process::Command;

mod common;

use common::{start, toml_string, BIN};

#[tokio::test]
#[ignore = "needs Node.js, Chromium and `npm ci` in tests/browser; scripts/test installs them"]
async fn the_console_works_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let browser_tests = root.join("tests/browser");
    assert!(
        browser_tests.join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/browser first (scripts/test does)"
    );
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let admin = format!("sk-lg-{}", "Console7Test".repeat(4));
    // Local models the page adds run under a stand-in `llama-server` (a Node script, as
    // this test needs Node anyway), from a sparse 64 MiB "model file" the loader counts
    // by its size.
    let fake_llama_server = browser_tests.join("fake-llama-server.mjs");
    let model_file = data.path().join("model.gguf");
    std::fs::File::create(&model_file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let config = data.path().join("llmgate.toml");
    std::fs::write(
        &config,
        format!(
            "llama_server = {}\n",
            toml_string(&fake_llama_server.canonicalize().unwrap())
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(&config)
        .args([
            "serve",
            "--upstream",
            &upstream.url,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .env("LLMGATE_ADMIN_KEY", &admin)
        .env("LLMGATE_LOG", "warn")
        // Longer than the page's 2 s poll, so that it sees the model loading.
        .env("FAKE_LOAD_MS", "3000");
    let server = start(command, Duration::from_secs(20)).await;
    let url = server.url.clone();

    // The README shows docs/screenshots; refresh them with UPDATE_SCREENSHOTS=1.
    let screenshots = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/screenshots")
    } else {
        root.join("target/screenshots")
    };
    let run = Command::new("node")
        .args(["--test", "--test-reporter=spec", "console.test.mjs"])
        .current_dir(&browser_tests)
        .env("LLMGATE_URL", &url)
        .env("LLMGATE_ADMIN_KEY", &admin)
        // The Models page adds a second model in front of the same mock.
        .env("LLMGATE_UPSTREAM_URL", &upstream.url)
        .env("LLMGATE_MODEL_FILE", &model_file)
        .env("SCREENSHOT_DIR", screenshots)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("browser tests finish")
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{report}");
    assert!(output.status.success(), "browser tests failed:\n{report}");
}
