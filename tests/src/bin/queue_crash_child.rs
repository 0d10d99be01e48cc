//! Child process of the queue crash test: sends numbered messages to an embedded queue (in
//! the cell store at the path given) from several tasks at once and prints `acked <n>` for
//! each send the queue acknowledged, until the parent kills it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cellmail_cell::queue::{Queue, QueueConfig, QueueKind, local::LocalQueue};
use cellmail_cell::store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path: PathBuf = std::env::args()
        .nth(1)
        .context("usage: queue-crash-child <store file>")?
        .into();
    let store = Arc::new(Store::open(&path)?);
    let queue = Arc::new(LocalQueue::open(store, QueueConfig::default())?);
    let tasks: Vec<_> = (0..16u64)
        .map(|task| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for n in (task..).step_by(16) {
                    queue
                        .send(QueueKind::Transactional, n.to_string().into_bytes())
                        .await?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "acked {n}")?;
                    out.flush()?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
