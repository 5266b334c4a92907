//! Usage records kept outside the store: those it cannot take now (an outage longer than
//! the queue holds, or one at shutdown) in a spill file that is written to the store
//! when it is back, and those it refuses for good in a log an admin can read.
//!
//! Both are JSON lines in the data directory, appended and synced to disk per batch:
//! the database just failed, so it cannot be where these records wait.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::storage::RequestRecord;

/// The spill file's name in the data directory.
pub const SPILL_FILE: &str = "usage-spill.jsonl";
/// The rejected records' file in the data directory.
pub const REJECTED_FILE: &str = "usage-rejected.jsonl";
/// The most rejected records [`UsageRecorder::rejected`](super::UsageRecorder::rejected)
/// returns (the newest), and keeps in memory without a data directory.
pub const MAX_REJECTED_SHOWN: usize = 1000;

/// The spill file while it is being written to the store: new spills go to a fresh
/// [`SPILL_FILE`] meanwhile.
pub(crate) const REPLAY_FILE: &str = "usage-spill.replaying.jsonl";
/// How far the replay got, in bytes of [`REPLAY_FILE`], so that a restart does not
/// write its first part again.
pub(crate) const REPLAY_OFFSET_FILE: &str = "usage-spill.replaying.offset";
/// How much of the end of the rejected file is read back.
const REJECTED_TAIL_BYTES: u64 = 4 << 20;

/// A record the store refused for what it holds, with the store's reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRecord {
    /// When it was set aside.
    pub rejected_at: DateTime<Utc>,
    /// Why the store refused it.
    pub error: String,
    /// The record itself.
    pub record: RequestRecord,
}

/// Appends lines to `path` and syncs them to disk. A line torn by a crash is ended first,
/// so that it spoils only itself.
/// The file and its directory are private to their owner (0600, 0700), as the database
/// is: they hold the same paths, models and tokens.
fn append_lines(path: &Path, lines: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
    }
    let mut options = OpenOptions::new();
    options.create(true).append(true).read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
    }
    file.write_all(lines)?;
    file.sync_data()
}

fn to_lines<T: Serialize>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.len() * 256);
    for item in items {
        serde_json::to_writer(&mut out, item).expect("records serialize");
        out.push(b'\n');
    }
    out
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Disk failures injected by tests, per data directory: a read-only directory does not
/// stop root, and tests run side by side.
#[cfg(test)]
pub(crate) mod disk_faults {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// What a replay does on disk.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub(crate) enum Op {
        /// Reads the spill file.
        Read,
        /// Saves its position.
        Save,
        /// Removes the replayed file.
        Remove,
    }

    /// Per watched directory and operation: whether it fails, and how often it was tried.
    static DIRS: Mutex<BTreeMap<(PathBuf, Op), (bool, usize)>> = Mutex::new(BTreeMap::new());

    /// Makes `op` in `dir` fail, and counts its tries from now on.
    pub(crate) fn fail(dir: &Path, op: Op) {
        set_failing(dir, op, true);
    }

    /// Makes `op` in `dir` work (again), and counts its tries from now on.
    pub(crate) fn work(dir: &Path, op: Op) {
        set_failing(dir, op, false);
    }

    fn set_failing(dir: &Path, op: Op, failing: bool) {
        let mut dirs = DIRS.lock().unwrap();
        dirs.entry((dir.to_owned(), op)).or_default().0 = failing;
    }

    /// How often `op` was tried in `dir` since it was first passed to [`fail`] or [`work`].
    pub(crate) fn tries(dir: &Path, op: Op) -> usize {
        let dirs = DIRS.lock().unwrap();
        dirs.get(&(dir.to_owned(), op))
            .map_or(0, |(_, tries)| *tries)
    }

    /// Called before `op` on `file`.
    pub(super) fn check(file: &Path, op: Op) -> io::Result<()> {
        let dir = file.parent().unwrap_or(file).to_owned();
        let mut dirs = DIRS.lock().unwrap();
        match dirs.get_mut(&(dir, op)) {
            Some((failing, tries)) => {
                *tries += 1;
                if *failing {
                    Err(io::Error::other(format!("injected: {op:?} fails")))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }
}

/// Records waiting on disk for the store.
#[derive(Debug)]
pub(crate) struct SpillFile {
    spill: PathBuf,
    replay: PathBuf,
    offset: PathBuf,
    /// Appending and starting a replay (which renames the file) take turns; the replay's
    /// progress.
    progress: tokio::sync::Mutex<Progress>,
    /// Something may wait to be replayed.
    pending: AtomicBool,
}

/// How far the replay of [`REPLAY_FILE`] got, in bytes.
#[derive(Debug, Default)]
struct Progress {
    /// What this process wrote to the store: it only moves forward, whatever happens to
    /// the saved copy, so that no record is written twice while the process lives.
    /// `None` until the replay file is opened.
    at: Option<u64>,
    /// What [`REPLAY_OFFSET_FILE`] holds. Behind `at` when saving failed: the replay
    /// waits until it is saved (a restart would write again what lies between).
    saved: Option<u64>,
}

/// Part of the spill file, read for the store.
#[derive(Debug)]
pub(crate) struct ReplayChunk {
    pub(crate) records: Vec<RequestRecord>,
    /// Where each record's line starts.
    starts: Vec<u64>,
    /// Where each line that is not a record (torn by a crash) starts: they cannot be
    /// replayed.
    unreadable: Vec<u64>,
    end: u64,
    at_end: bool,
}

impl ReplayChunk {
    /// Where the replay goes on once its first `written` records are in the store (or
    /// set aside): the line of the first one that is not.
    fn position_after(&self, written: usize) -> u64 {
        self.starts.get(written).copied().unwrap_or(self.end)
    }

    /// The unreadable lines the replay passes once its first `written` records are in
    /// the store.
    pub(crate) fn unreadable_passed(&self, written: usize) -> usize {
        let to = self.position_after(written);
        self.unreadable.iter().filter(|&&at| at < to).count()
    }
}

impl SpillFile {
    pub(crate) fn new(dir: &Path) -> Self {
        let spill = dir.join(SPILL_FILE);
        let replay = dir.join(REPLAY_FILE);
        let pending = spill.exists() || replay.exists();
        Self {
            spill,
            replay,
            offset: dir.join(REPLAY_OFFSET_FILE),
            progress: tokio::sync::Mutex::default(),
            pending: AtomicBool::new(pending),
        }
    }

    /// Appends records, synced to disk before it returns.
    pub(crate) async fn append(&self, records: &[RequestRecord]) -> io::Result<()> {
        let lines = to_lines(records);
        let path = self.spill.clone();
        let _turn = self.progress.lock().await;
        blocking(move || append_lines(&path, &lines)).await?;
        self.pending.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether records may wait in the file.
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// The next records to replay, at most `max`; `None` when nothing waits. Fails,
    /// without reading, while the position last replayed cannot be saved.
    pub(crate) async fn next_chunk(&self, max: usize) -> io::Result<Option<ReplayChunk>> {
        let mut progress = self.progress.lock().await;
        let (spill, replay, offset_path) =
            (self.spill.clone(), self.replay.clone(), self.offset.clone());
        let (at, saved) = (progress.at, progress.saved);
        let found = blocking(move || {
            #[cfg(test)]
            disk_faults::check(&replay, disk_faults::Op::Read)?;
            let at = match at {
                Some(at) => {
                    if saved != Some(at) {
                        save_offset(&offset_path, at)?;
                    }
                    at
                }
                None if replay.exists() => read_offset(&offset_path)?,
                None if spill.exists() => {
                    // One left by a replay whose end was not noted in full.
                    std::fs::remove_file(&offset_path).or_else(ignore_missing)?;
                    std::fs::rename(&spill, &replay)?;
                    0
                }
                None => return Ok(None),
            };
            read_chunk(&replay, at, max).map(|chunk| Some((at, chunk)))
        })
        .await?;
        match found {
            Some((at, chunk)) => {
                *progress = Progress {
                    at: Some(at),
                    saved: Some(at),
                };
                Ok(Some(chunk))
            }
            None => {
                self.pending.store(false, Ordering::SeqCst);
                Ok(None)
            }
        }
    }

    /// The first `written` records of the chunk are in the store (or set aside): the
    /// replay goes on after them; the others stay in the file, to be read again. The
    /// file is removed once all of it is written (its position saved first, so that a
    /// failed removal does not make a restart write the last chunk again). An error
    /// means the position could not be saved (or the file removed); the replay still goes
    /// on after the records written.
    pub(crate) async fn replayed(&self, chunk: &ReplayChunk, written: usize) -> io::Result<()> {
        let to = chunk.position_after(written);
        let mut progress = self.progress.lock().await;
        let at = progress.at.map_or(to, |at| at.max(to));
        progress.at = Some(at);
        let offset_path = self.offset.clone();
        blocking(move || save_offset(&offset_path, at)).await?;
        progress.saved = Some(at);
        if chunk.at_end && at == chunk.end {
            let replay = self.replay.clone();
            blocking(move || {
                #[cfg(test)]
                disk_faults::check(&replay, disk_faults::Op::Remove)?;
                std::fs::remove_file(&replay)
            })
            .await?;
            // A new replay starts at the beginning of a new file.
            *progress = Progress::default();
            let offset_path = self.offset.clone();
            blocking(move || std::fs::remove_file(&offset_path).or_else(ignore_missing)).await?;
        }
        Ok(())
    }
}

/// Saves the replay position: written aside and renamed over the old one, so that a crash
/// leaves either, never a torn number read as 0 (which would replay the file again).
fn save_offset(path: &Path, at: u64) -> io::Result<()> {
    #[cfg(test)]
    disk_faults::check(path, disk_faults::Op::Save)?;
    let next = path.with_extension("offset.next");
    let mut file = File::create(&next)?;
    file.write_all(at.to_string().as_bytes())?;
    file.sync_data()?;
    std::fs::rename(&next, path)
}

/// The replay position saved by an earlier process; 0 when there is none (the replay
/// had not gone past its first chunk).
fn read_offset(path: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(err),
    }
}

fn ignore_missing(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

fn read_chunk(path: &Path, offset: u64, max: usize) -> io::Result<ReplayChunk> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut chunk = ReplayChunk {
        records: Vec::new(),
        starts: Vec::new(),
        unreadable: Vec::new(),
        end: offset,
        at_end: false,
    };
    // Bytes, not text: a line torn by a crash may end inside a character (clients choose
    // the models and paths, non-ASCII ones included), and must spoil only itself.
    let mut line = Vec::new();
    while chunk.records.len() < max {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            chunk.at_end = true;
            break;
        }
        let start = chunk.end;
        chunk.end += read as u64;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<RequestRecord>(text) {
            Ok(record) => {
                chunk.records.push(record);
                chunk.starts.push(start);
            }
            Err(_) => chunk.unreadable.push(start),
        }
    }
    if !chunk.at_end {
        chunk.at_end = reader.fill_buf()?.is_empty();
    }
    Ok(chunk)
}

/// Records the store refused: in [`REJECTED_FILE`] when there is a data directory, else
/// the newest [`MAX_REJECTED_SHOWN`] in memory.
#[derive(Debug)]
pub(crate) struct RejectedLog {
    file: Option<PathBuf>,
    recent: Mutex<VecDeque<RejectedRecord>>,
}

impl RejectedLog {
    pub(crate) fn new(dir: Option<&Path>) -> Self {
        Self {
            file: dir.map(|d| d.join(REJECTED_FILE)),
            recent: Mutex::default(),
        }
    }

    /// Keeps them; when the file cannot be written they stay in memory.
    pub(crate) async fn keep(self: &Arc<Self>, rejected: Vec<RejectedRecord>) {
        if let Some(path) = self.file.clone() {
            let lines = to_lines(&rejected);
            let written = blocking(move || append_lines(&path, &lines)).await;
            match written {
                Ok(()) => return,
                Err(err) => {
                    tracing::error!(error = %err, "cannot write the rejected usage records' file; keeping them in memory")
                }
            }
        }
        let mut recent = self.recent.lock().expect("rejected lock");
        for r in rejected {
            if recent.len() == MAX_REJECTED_SHOWN {
                recent.pop_front();
            }
            recent.push_back(r);
        }
    }

    /// The newest, at most [`MAX_REJECTED_SHOWN`], oldest first.
    pub(crate) async fn list(&self) -> io::Result<Vec<RejectedRecord>> {
        let mut all = match self.file.clone() {
            Some(path) => blocking(move || read_rejected(&path)).await?,
            None => Vec::new(),
        };
        all.extend(self.recent.lock().expect("rejected lock").iter().cloned());
        let skip = all.len().saturating_sub(MAX_REJECTED_SHOWN);
        all.drain(..skip);
        Ok(all)
    }
}

fn read_rejected(path: &Path) -> io::Result<Vec<RejectedRecord>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(REJECTED_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let mut lines = text.split(|&b| b == b'\n');
    if start > 0 {
        lines.next(); // cut off in the middle
    }
    Ok(lines
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at: i64) -> RequestRecord {
        RequestRecord {
            at: DateTime::from_timestamp_millis(at).unwrap(),
            key_id: "k".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: Some("m".into()),
            status: 200,
            prompt_tokens: Some(1),
            completion_tokens: None,
            latency_ms: 3,
            first_byte_ms: None,
            end_user: None,
        }
    }

    #[tokio::test]
    async fn spilled_records_replay_in_chunks_once_across_restarts_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::new(dir.path());
        assert!(!spill.is_pending());
        spill
            .append(&[record(1), record(2), record(3)])
            .await
            .unwrap();
        // A crash in the middle of a write.
        let path = dir.path().join(SPILL_FILE);
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"{\"at\":\"20");
        std::fs::write(&path, torn).unwrap();
        spill.append(&[record(4)]).await.unwrap();

        let first = spill.next_chunk(2).await.unwrap().unwrap();
        assert_eq!(first.records, [record(1), record(2)]);
        // Spilled while a replay is on: goes to a fresh file, replayed after.
        spill.append(&[record(5)]).await.unwrap();
        spill.replayed(&first, 2).await.unwrap();

        // A restart in the middle of the replay goes on where it stopped.
        let spill = SpillFile::new(dir.path());
        assert!(spill.is_pending());
        let mut seen = Vec::new();
        let mut unreadable = 0;
        while let Some(chunk) = spill.next_chunk(2).await.unwrap() {
            seen.extend(chunk.records.iter().map(|r| r.at.timestamp_millis()));
            unreadable += chunk.unreadable_passed(chunk.records.len());
            spill.replayed(&chunk, chunk.records.len()).await.unwrap();
        }
        assert_eq!(seen, [3, 4, 5]);
        assert_eq!(unreadable, 1, "only the torn line is lost");
        assert!(!spill.is_pending());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_line_torn_inside_a_character_spoils_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::new(dir.path());
        let mut accented = record(2);
        accented.model = Some("modèle".into());
        spill.append(&[record(1), accented]).await.unwrap();
        // A crash in the middle of "è".
        let path = dir.path().join(SPILL_FILE);
        let mut torn = std::fs::read(&path).unwrap();
        let cut = torn.iter().rposition(|&b| b == 0xC3).unwrap() + 1;
        torn.truncate(cut);
        std::fs::write(&path, torn).unwrap();
        spill.append(&[record(3)]).await.unwrap();

        let chunk = spill.next_chunk(10).await.unwrap().unwrap();
        assert_eq!(chunk.records, [record(1), record(3)]);
        assert_eq!(chunk.unreadable_passed(2), 1);
        spill.replayed(&chunk, 2).await.unwrap();
        assert!(spill.next_chunk(10).await.unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn files_set_aside_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/usage-spill.jsonl");
        append_lines(&path, b"{}\n").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[tokio::test]
    async fn rejected_records_are_read_back_newest_last_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for log in [
            Arc::new(RejectedLog::new(Some(dir.path()))),
            Arc::new(RejectedLog::new(None)),
        ] {
            let rejected: Vec<_> = (0..MAX_REJECTED_SHOWN as i64 + 5)
                .map(|i| RejectedRecord {
                    rejected_at: Utc::now(),
                    error: format!("refused {i}"),
                    record: record(i),
                })
                .collect();
            log.keep(rejected[..3].to_vec()).await;
            log.keep(rejected[3..].to_vec()).await;
            let listed = log.list().await.unwrap();
            assert_eq!(listed.len(), MAX_REJECTED_SHOWN);
            assert_eq!(listed.last().unwrap(), rejected.last().unwrap());
            assert_eq!(listed[0].record.at.timestamp_millis(), 5);
        }
        assert!(dir.path().join(REJECTED_FILE).exists());
    }
}
