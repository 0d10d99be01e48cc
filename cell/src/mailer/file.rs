//! The file sink: the embedded mailer. Each message becomes
//! `<root>/<tenant>/<message id>.eml`, written to a temporary name, fsynced and renamed, so
//! a file is either whole or absent and sending the same message twice leaves one file.
//!
//! It also plays SES's mailbox simulator: for each `bounce@`, `complaint@` or
//! `success@simulator.amazonses.com` recipient it puts the feedback record SES would publish
//! on the cell's feedback queue.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cellmail_proto::{TenantId, now_ms};

use super::{Mailer, MailerError, Setup, render};
use crate::feedback;
use crate::message::Message;
use crate::queue::{Queue, QueueKind};

pub struct FileSink {
    root: PathBuf,
    feedback: Arc<dyn Queue>,
}

impl FileSink {
    /// Writes under `root`; simulated feedback goes to `feedback`'s feedback queue.
    pub fn new(root: PathBuf, feedback: Arc<dyn Queue>) -> Self {
        Self { root, feedback }
    }
}

fn retryable(reason: impl std::fmt::Display) -> MailerError {
    MailerError::Retryable {
        reason: reason.to_string(),
        retry_after: None,
    }
}

#[async_trait]
impl Mailer for FileSink {
    async fn send(&self, message: &Message) -> Result<(), MailerError> {
        let dir = self.root.join(message.tenant.as_str());
        let path = dir.join(format!("{}.eml", message.id));
        let tmp = dir.join(format!(".{}.eml.tmp", message.id));
        let raw = render(message);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&raw)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(retryable)?
        .map_err(|e| retryable(format!("writing the message file: {e}")))?;
        for record in feedback::simulated(message, now_ms()) {
            self.feedback
                .send(QueueKind::Feedback, record)
                .await
                .map_err(|e| retryable(format!("simulated feedback: {e}")))?;
        }
        Ok(())
    }

    async fn prepare(&self, tenant: &TenantId, _setup: &Setup) -> Result<(), MailerError> {
        // Called before every send: a look (one stat) when the directory is there already.
        let dir = self.root.join(tenant.as_str());
        if dir.is_dir() {
            return Ok(());
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| retryable(format!("creating the tenant's mail directory: {e}")))
    }
}
