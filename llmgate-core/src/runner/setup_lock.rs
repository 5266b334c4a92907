//! One builder at a time for a file or directory that several models, or several
//! gateways sharing a cache, may want to make at once: an exclusive lock on a file beside
//! it, held while it is made. Whoever comes second waits, then finds it made.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

/// Takes the exclusive lock on the file `lock` (made if missing) for making `what`,
/// waiting for whoever holds it (saying so once through `say`). The lock is held until
/// the returned file is dropped, and goes with the process if it dies.
pub(super) async fn hold(
    lock: &Path,
    what: &Path,
    say: &(dyn Fn(&str) + Send + Sync),
) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(TryLockError::WouldBlock) => say(&format!(
            "Waiting for another llmgate that is setting up {}…",
            what.display()
        )),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(io::Error::other)?
}
