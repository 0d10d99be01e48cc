//! Group commit: many small writes to one redb file share one fsynced transaction.
//!
//! Callers submit operations from any task; one writer thread takes every operation waiting
//! (up to a batch limit), applies them in one write transaction, commits it durably and only
//! then answers each caller. Under load a single fsync covers hundreds of accepts; with one
//! caller it costs the same as a plain commit. A batch of only lazy writes is committed
//! without an fsync; the next durable commit makes it durable too.

use std::sync::Arc;

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
#[error("storage failed: {0}")]
pub struct StorageError(pub String);

impl StorageError {
    pub fn from_display(err: impl std::fmt::Display) -> Self {
        StorageError(err.to_string())
    }
}

/// An operation, whether it must be fsynced before its caller hears back, and the reply.
type Job<Op, Out> = (Op, bool, oneshot::Sender<Result<Out, StorageError>>);

pub struct GroupCommit<Op, Out> {
    /// `None` only while dropping.
    jobs: Option<mpsc::UnboundedSender<Job<Op, Out>>>,
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
    /// Starts the writer thread. `apply` runs each operation inside the shared transaction;
    /// its error fails the whole batch (nothing of it is committed).
    pub fn start(
        name: &str,
        db: Arc<Database>,
        apply: impl Fn(&WriteTransaction, Op) -> Result<Out, StorageError> + Send + 'static,
    ) -> Result<Self, StorageError> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job<Op, Out>>();
        let thread = std::thread::Builder::new()
            .name(format!("commit-{name}"))
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    commit_batch(&db, &apply, &mut batch);
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
            thread: Some(thread),
        })
    }

    /// Applies `op` and returns once it is durable.
    pub async fn submit(&self, op: Op) -> Result<Out, StorageError> {
        self.submit_one(op, true).await
    }

    /// Applies `op` and returns once it is committed, before it is fsynced: it becomes
    /// durable with the next durable commit. For writes whose loss in a crash is harmless.
    pub async fn submit_lazy(&self, op: Op) -> Result<Out, StorageError> {
        self.submit_one(op, false).await
    }

    async fn submit_one(&self, op: Op, durable: bool) -> Result<Out, StorageError> {
        let mut outs = self.submit_many(vec![op], durable).await?;
        outs.pop()
            .ok_or_else(|| StorageError("the commit thread lost a write".into()))
    }

    /// Applies every op (queued together, so they usually share one commit) and returns once
    /// all are committed, and fsynced too when `durable` (see `submit_lazy` for when not).
    pub async fn submit_many(&self, ops: Vec<Op>, durable: bool) -> Result<Vec<Out>, StorageError> {
        let mut replies = Vec::with_capacity(ops.len());
        for op in ops {
            let (tx, rx) = oneshot::channel();
            self.jobs
                .as_ref()
                .ok_or_else(|| StorageError("the store is closing".into()))?
                .send((op, durable, tx))
                .map_err(|_| StorageError("the commit thread has stopped".into()))?;
            replies.push(rx);
        }
        let mut outs = Vec::with_capacity(replies.len());
        for rx in replies {
            outs.push(
                rx.await
                    .map_err(|_| StorageError("the write's batch failed to commit".into()))??,
            );
        }
        Ok(outs)
    }
}

fn commit_batch<Op, Out>(
    db: &Database,
    apply: &impl Fn(&WriteTransaction, Op) -> Result<Out, StorageError>,
    batch: &mut Vec<Job<Op, Out>>,
) {
    let run =
        |batch: &mut Vec<Job<Op, Out>>| -> Result<Vec<(Out, oneshot::Sender<_>)>, StorageError> {
            let mut txn = db.begin_write().map_err(StorageError::from_display)?;
            if !batch.iter().any(|(_, durable, _)| *durable) {
                txn.set_durability(Durability::None)
                    .map_err(StorageError::from_display)?;
            }
            let mut done = Vec::with_capacity(batch.len());
            for (op, _, reply) in batch.drain(..) {
                done.push((apply(&txn, op)?, reply));
            }
            txn.commit().map_err(StorageError::from_display)?;
            Ok(done)
        };
    match run(batch) {
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
