//! Group commit: many small writes to one redb file share one fsynced transaction.
//!
//! Callers submit operations from any task; one writer thread takes every operation waiting
//! (up to a batch limit), applies them in one write transaction, commits it durably and only
//! then answers each caller. Under load a single fsync covers hundreds of accepts; with one
//! caller it costs the same as a plain commit. A batch of only lazy writes is committed
//! without an fsync; the next durable commit makes it durable too.
//!
//! Bulk writes (a move's copy of a tenant's records, a hundred or so at a time) are committed
//! one per transaction, and only while no other write waits: an accept never shares a commit
//! with one, so it waits at most for the one under way. Each part is fsynced on its own: a
//! part committed lazily would leave its pages for the next durable commit to flush, so the
//! accept after it would pay for the copy's fsync (in the move bench, a source-cell
//! neighbour's p99 during the moves was 4.5-5.3 ms with each part fsynced and 5.2-6.2 ms
//! with only the last).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cellmail_proto::{ApiError, now_ms};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 4096;

/// The time (ms) writes are stamped with as they are applied: the wall clock, except that it
/// never goes back within this process (a step back of the system clock holds it where it
/// was), so a write applied later never carries an earlier stamp.
pub fn stamp_ms() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    LAST.fetch_max(now, Ordering::SeqCst).max(now)
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("storage failed: {0}")]
pub struct StorageError(pub String);

impl StorageError {
    pub fn from_display(err: impl std::fmt::Display) -> Self {
        StorageError(err.to_string())
    }
}

impl From<StorageError> for ApiError {
    /// The store failing makes the cell unavailable: the caller may retry.
    fn from(err: StorageError) -> Self {
        ApiError::Unavailable(format!("cell store: {err}"))
    }
}

/// How a write is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Answered once committed, before the fsync: it becomes durable with the next durable
    /// commit. For writes whose loss in a crash is harmless.
    Lazy,
    /// Answered once fsynced.
    Durable,
    /// Durable, in a transaction of its own, after every other write waiting.
    Bulk,
}

/// Where a write's outcome is answered.
type Reply<Out> = oneshot::Receiver<Result<Out, StorageError>>;

/// An operation, how it is committed, and the reply.
struct Job<Op, Out> {
    op: Op,
    commit: Commit,
    reply: oneshot::Sender<Result<Out, StorageError>>,
}

pub struct GroupCommit<Op, Out> {
    /// `None` only while dropping.
    jobs: Option<mpsc::UnboundedSender<Job<Op, Out>>>,
    /// When the batch being written began (ms), or `u64::MAX` while none is.
    writing_since: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<Op, Out> Drop for GroupCommit<Op, Out> {
    /// Closes the queue of writes and waits for the last batch, so the file is released
    /// (and may be reopened) once this returns.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<Op: Send + 'static, Out: Send + 'static> GroupCommit<Op, Out> {
    /// Starts the writer thread. `apply` runs a batch's operations, in order, inside the
    /// shared transaction (opening what they write once for all of them) and answers one
    /// output each; its error fails the whole batch (nothing of it is committed).
    pub fn start(
        name: &str,
        db: Arc<Database>,
        apply: impl Fn(&WriteTransaction, Vec<Op>) -> Result<Vec<Out>, StorageError> + Send + 'static,
    ) -> Result<Self, StorageError> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job<Op, Out>>();
        let writing_since = Arc::new(AtomicU64::new(u64::MAX));
        let writing = writing_since.clone();
        let thread = std::thread::Builder::new()
            .name(format!("commit-{name}"))
            .spawn(move || {
                let (mut batch, mut bulk) = (Vec::new(), VecDeque::new());
                let take = |job: Job<Op, Out>, batch: &mut Vec<_>, bulk: &mut VecDeque<_>| match job
                    .commit
                {
                    Commit::Bulk => bulk.push_back(job),
                    Commit::Lazy | Commit::Durable => batch.push(job),
                };
                loop {
                    if batch.is_empty() && bulk.is_empty() {
                        match rx.blocking_recv() {
                            Some(job) => take(job, &mut batch, &mut bulk),
                            None => break,
                        }
                    }
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => take(job, &mut batch, &mut bulk),
                            Err(_) => break,
                        }
                    }
                    if batch.is_empty() {
                        batch.extend(bulk.pop_front());
                    }
                    writing.store(stamp_ms(), Ordering::SeqCst);
                    commit_batch(&db, &apply, &mut batch, &writing);
                }
                // Closing: make the last lazy commits durable, so a clean stop forgets none.
                let flushed = db
                    .begin_write()
                    .map_err(StorageError::from_display)
                    .and_then(|txn| txn.commit().map_err(StorageError::from_display));
                if let Err(err) = flushed {
                    tracing::error!(%err, "the last commit before closing failed");
                }
            })
            .map_err(StorageError::from_display)?;
        Ok(Self {
            jobs: Some(jobs),
            writing_since,
            thread: Some(thread),
        })
    }

    /// A time (ms) before which every write is committed: a read begun after this returns
    /// sees every write that `apply` stamped (with [`stamp_ms`], as it applied it) before it.
    /// The batch under way, if any, was stamped from when it began; a later one, from after.
    pub fn committed_before(&self) -> u64 {
        let now = stamp_ms();
        now.min(self.writing_since.load(Ordering::SeqCst))
    }

    /// Applies `op`; returns once it is committed as `commit` says.
    pub async fn submit(&self, op: Op, commit: Commit) -> Result<Out, StorageError> {
        let mut outs = self.submit_many(vec![op], commit).await?;
        outs.pop()
            .ok_or_else(|| StorageError("the commit thread lost a write".into()))
    }

    /// Applies every op (queued together, so they usually share one commit, bulk ones
    /// excepted) and returns once all are committed as `commit` says.
    pub async fn submit_many(
        &self,
        ops: Vec<Op>,
        commit: Commit,
    ) -> Result<Vec<Out>, StorageError> {
        let replies = self.enqueue(ops, commit)?;
        let mut outs = Vec::with_capacity(replies.len());
        for rx in replies {
            outs.push(
                rx.await
                    .map_err(|_| StorageError("the write's batch failed to commit".into()))??,
            );
        }
        Ok(outs)
    }

    /// Queues `ops` to be applied in order with every write queued after them and committed
    /// lazily, without waiting for that: for writes whose loss in a crash is harmless and
    /// whose caller goes on from what it already knows. A batch that fails is logged by the
    /// writer.
    pub fn submit_unanswered(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        self.enqueue(ops, Commit::Lazy).map(|_| ())
    }

    /// Hands every op to the writer thread, in order; returns where each is answered.
    fn enqueue(&self, ops: Vec<Op>, commit: Commit) -> Result<Vec<Reply<Out>>, StorageError> {
        let mut replies = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, rx) = oneshot::channel();
            let job = Job { op, commit, reply };
            self.jobs
                .as_ref()
                .ok_or_else(|| StorageError("the store is closing".into()))?
                .send(job)
                .map_err(|_| StorageError("the commit thread has stopped".into()))?;
            replies.push(rx);
        }
        Ok(replies)
    }
}

fn commit_batch<Op, Out>(
    db: &Database,
    apply: &impl Fn(&WriteTransaction, Vec<Op>) -> Result<Vec<Out>, StorageError>,
    batch: &mut Vec<Job<Op, Out>>,
    writing: &AtomicU64,
) {
    let run =
        |batch: &mut Vec<Job<Op, Out>>| -> Result<Vec<(Out, oneshot::Sender<_>)>, StorageError> {
            let mut txn = db.begin_write().map_err(StorageError::from_display)?;
            if batch.iter().all(|job| job.commit == Commit::Lazy) {
                txn.set_durability(Durability::None)
                    .map_err(StorageError::from_display)?;
            }
            let (ops, replies): (Vec<Op>, Vec<_>) =
                batch.drain(..).map(|job| (job.op, job.reply)).unzip();
            let outs = apply(&txn, ops)?;
            if outs.len() != replies.len() {
                return Err(StorageError(
                    "a batch answered the wrong number of writes".into(),
                ));
            }
            txn.commit().map_err(StorageError::from_display)?;
            Ok(outs.into_iter().zip(replies).collect())
        };
    let result = run(batch);
    // Done before anyone is answered: a caller's next read finds the batch committed.
    writing.store(u64::MAX, Ordering::SeqCst);
    match result {
        Ok(done) => {
            for (out, reply) in done {
                let _ = reply.send(Ok(out));
            }
        }
        // Every job of the batch was drained and dropped on the way out, so each caller is
        // answered with an error and none is told its write is durable.
        Err(err) => tracing::error!(%err, "group commit failed; the batch is not durable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Applied = Arc<Mutex<Vec<&'static str>>>;

    /// A writer whose op "hold" waits until told, recording the order ops are applied in;
    /// op "bad" fails its transaction.
    fn writer() -> (
        tempfile::TempDir,
        GroupCommit<&'static str, ()>,
        Applied,
        std::sync::mpsc::Sender<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("t.redb")).unwrap());
        let applied = Arc::new(Mutex::new(Vec::new()));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let seen = applied.clone();
        let commits = GroupCommit::start("test", db, move |_, ops| {
            ops.into_iter()
                .map(|op| {
                    if op == "hold" {
                        held.lock().unwrap().recv().unwrap();
                    }
                    seen.lock().unwrap().push(op);
                    match op {
                        "bad" => Err(StorageError("bad op".into())),
                        _ => Ok(()),
                    }
                })
                .collect()
        })
        .unwrap();
        (dir, commits, applied, release)
    }

    /// Submits `op` from a task of its own.
    fn submitted(
        commits: &Arc<GroupCommit<&'static str, ()>>,
        op: &'static str,
        commit: Commit,
    ) -> tokio::task::JoinHandle<Result<(), StorageError>> {
        let commits = commits.clone();
        tokio::spawn(async move { commits.submit(op, commit).await })
    }

    #[tokio::test]
    async fn bulk_writes_wait_for_the_others_and_commit_alone() {
        let (_dir, commits, applied, release) = writer();
        let commits = Arc::new(commits);
        let submit = |op, commit| submitted(&commits, op, commit);
        let hold = submit("hold", Commit::Durable);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Queued while the writer is busy: two bulk writes first, then two others.
        let first_bulk = submit("bulk-1", Commit::Bulk);
        let bad_bulk = submit("bad", Commit::Bulk);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let accept = submit("accept", Commit::Durable);
        let delete = submit("delete", Commit::Lazy);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        release.send(()).unwrap();

        hold.await.unwrap().unwrap();
        accept.await.unwrap().unwrap();
        delete.await.unwrap().unwrap();
        first_bulk.await.unwrap().unwrap();
        // The failing bulk write failed alone: nobody else's write shared its transaction.
        assert!(bad_bulk.await.unwrap().is_err());
        assert_eq!(
            *applied.lock().unwrap(),
            ["hold", "accept", "delete", "bulk-1", "bad"]
        );
    }

    #[tokio::test]
    async fn an_unanswered_write_returns_at_once_and_is_applied_before_later_ones() {
        let (_dir, commits, applied, release) = writer();
        let commits = Arc::new(commits);
        let held = submitted(&commits, "hold", Commit::Durable);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The writer is busy with "hold": queued behind it, and not waited for.
        commits
            .submit_unanswered(vec!["count-1", "count-2"])
            .unwrap();
        assert_eq!(*applied.lock().unwrap(), [] as [&str; 0]);
        let later = submitted(&commits, "delete", Commit::Lazy);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        later.await.unwrap().unwrap();
        assert_eq!(
            *applied.lock().unwrap(),
            ["hold", "count-1", "count-2", "delete"]
        );
    }

    const ROWS: redb::TableDefinition<&str, ()> = redb::TableDefinition::new("rows");

    /// The rows a copy of the file taken now holds: what a crash now would leave.
    fn on_disk(path: &std::path::Path) -> Vec<String> {
        use redb::{ReadableDatabase, ReadableTable};
        let copy = path.with_extension("copy");
        std::fs::copy(path, &copy).unwrap();
        let db = Database::open(&copy).unwrap();
        let read = db.begin_read().unwrap();
        let rows = match read.open_table(ROWS) {
            Ok(table) => table
                .iter()
                .unwrap()
                .map(|row| row.unwrap().0.value().to_owned())
                .collect(),
            Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
            Err(err) => panic!("{err}"),
        };
        std::fs::remove_file(copy).unwrap();
        rows
    }

    #[tokio::test]
    async fn a_bulk_submission_is_durable_once_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = Arc::new(Database::create(&path).unwrap());
        let commits = GroupCommit::start("test", db, |txn, ops: Vec<&'static str>| {
            let mut rows = txn.open_table(ROWS).map_err(StorageError::from_display)?;
            ops.into_iter()
                .map(|op| {
                    rows.insert(op, ())
                        .map(|_| ())
                        .map_err(StorageError::from_display)
                })
                .collect()
        })
        .unwrap();
        // A lazy write is not on disk until a durable commit follows it.
        commits.submit("lazy", Commit::Lazy).await.unwrap();
        assert!(on_disk(&path).is_empty());
        commits
            .submit_many(vec!["part-1", "part-2", "part-3"], Commit::Bulk)
            .await
            .unwrap();
        assert_eq!(on_disk(&path), ["lazy", "part-1", "part-2", "part-3"]);
    }

    #[tokio::test]
    async fn what_is_committed_before_excludes_the_batch_under_way() {
        use std::time::Duration;
        let (_dir, commits, _, release) = writer();
        let commits = Arc::new(commits);
        let held = submitted(&commits, "hold", Commit::Durable);
        // Once the held batch is under way, the time stops at when it began.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while commits.committed_before() + 10 > now_ms() {
            assert!(
                std::time::Instant::now() < deadline,
                "the time kept up with the clock while a batch was written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let during = commits.committed_before();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            commits.committed_before(),
            during,
            "still the batch's start"
        );
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        // Answered, so done: everything up to now is committed.
        assert!(commits.committed_before() >= during + 40);
    }
}
