//! One builder at a time for a file or directory that several models, or several
//! gateways sharing a cache, may want to make at once: an exclusive lock on a file beside
//! it, held while it is made. Whoever comes second waits, then finds it made.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

use tokio::process::Command;

/// A lock taken with [`hold`]; released when dropped, or when the process dies, and
/// not before every set-up command it was [shared](Held::share_with) with has ended.
#[derive(Debug)]
pub(super) struct Held(File);

/// Takes the exclusive lock on the file `lock` (made if missing) for making `what`,
/// waiting for whoever holds it (saying so once through `say`).
pub(super) async fn hold(
    lock: &Path,
    what: &Path,
    say: &(dyn Fn(&str) + Send + Sync),
) -> io::Result<Held> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(lock)?;
    match file.try_lock() {
        Ok(()) => return Ok(Held(file)),
        Err(TryLockError::WouldBlock) => say(&format!(
            "Waiting for another llmgate that is setting up {}…",
            what.display()
        )),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    tokio::task::spawn_blocking(move || file.lock().map(|()| Held(file)))
        .await
        .map_err(io::Error::other)?
}

impl Held {
    /// Lets `command`'s process, and what it starts, hold the lock too, for as long as
    /// they run: a gateway killed with SIGKILL leaves its `pip` running, and the next one
    /// must wait for that `pip` rather than build over it. The lock belongs to the open
    /// file, so it is shared through the child's standard input, a copy of the lock's
    /// descriptor: the lock file is empty, so reading it gives end-of-file, as
    /// `/dev/null` would. (Model servers and other children never hold it: the
    /// gateway's own descriptor is closed on exec.)
    pub(super) fn share_with<'c>(&self, command: &'c mut Command) -> io::Result<&'c mut Command> {
        Ok(command.stdin(self.0.try_clone()?))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn try_take(lock: &Path) -> bool {
        let file = OpenOptions::new().write(true).open(lock).unwrap();
        file.try_lock().is_ok()
    }

    /// Whether the lock comes free within a few seconds. Not at once: a process that
    /// another thread forks (here, another test starting a command) holds a copy of
    /// every descriptor until it execs, which closes them, so the lock can stay taken
    /// for that moment after its owners let it go.
    async fn comes_free(lock: &Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !try_take(lock) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_set_up_command_holds_the_lock_after_its_gateway_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".x.lock");
        let held = hold(&lock, dir.path(), &|_| {}).await.unwrap();
        let mut child = held
            .share_with(Command::new("sleep").arg("60").kill_on_drop(true))
            .unwrap()
            .spawn()
            .unwrap();
        // What a SIGKILL does to the gateway's own descriptor.
        drop(held);
        assert!(!try_take(&lock), "the running command still holds the lock");
        child.kill().await.unwrap();
        assert!(comes_free(&lock).await, "free once the command has ended");
    }

    #[tokio::test]
    async fn a_command_sharing_the_lock_reads_an_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let held = hold(&dir.path().join(".x.lock"), dir.path(), &|_| {})
            .await
            .unwrap();
        let out = held
            .share_with(Command::new("sh").args(["-c", "wc -c; echo done"]))
            .unwrap()
            .output()
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["0", "done"]
        );
    }

    #[tokio::test]
    async fn other_children_never_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".x.lock");
        let held = hold(&lock, dir.path(), &|_| {}).await.unwrap();
        let mut model_server = Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        drop(held);
        assert!(
            comes_free(&lock).await,
            "a model server started while the lock was held does not keep it"
        );
        model_server.kill().await.unwrap();
    }
}
