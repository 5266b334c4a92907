//! Starting and stopping the built `llmgate` for the tests in this folder.

#![allow(dead_code)] // each test file uses a part

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_llmgate");

/// A running `llmgate`.
pub struct Started {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The whole "llmgate listening on …" line.
    pub listening: String,
    /// What it printed on stdout before that line (keys shown once, instructions).
    pub printed: Vec<String>,
}

/// Spawns `command` with stdout piped here and waits up to `within` for it to listen;
/// its stdout is drained from then on so it never blocks on a full pipe.
pub async fn start(mut command: Command, within: Duration) -> Started {
    let mut child = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("llmgate starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let listening = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("llmgate listening on ") {
                return line;
            }
            printed.push(line);
        }
        panic!("llmgate exited before listening: {printed:#?}");
    })
    .await
    .unwrap_or_else(|_| panic!("llmgate listens within {within:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = listening
        .strip_prefix("llmgate listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    Started {
        child,
        url,
        listening,
        printed,
    }
}

/// The first key printed after the line containing `marker`.
pub fn key_after(printed: &[String], marker: &str) -> Option<String> {
    let at = printed.iter().position(|l| l.contains(marker))?;
    printed[at..].iter().find_map(|l| {
        l.trim()
            .strip_prefix("sk-lg-")
            .map(|k| format!("sk-lg-{k}"))
    })
}

/// SIGTERM, then its exit status (within `grace`).
pub async fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    let pid = child.id().unwrap().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(grace, child.wait())
        .await
        .expect("llmgate stops after SIGTERM")
        .unwrap()
}
