//! Starting an example binary as a user would, and reading what it prints.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A running example (killed when dropped) and its standard output.
pub struct Example {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Example {
    /// Starts `binary` listening on a free port of 127.0.0.1.
    pub fn start(binary: &str) -> Self {
        let mut child = Command::new(binary)
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            _child: child,
            lines,
        }
    }

    /// The rest of the next line it prints, which must start with `prefix`.
    pub async fn printed(&mut self, prefix: &str) -> String {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("the example prints within 30 s")
            .unwrap()
            .expect("a line");
        line.strip_prefix(prefix).expect(&line).to_owned()
    }
}
