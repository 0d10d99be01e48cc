//! The file sink: the embedded mailer. Each message becomes
//! `<root>/<tenant>/<message id>.eml`, written to a temporary name, fsynced and renamed, so
//! a file is either whole or absent and sending the same message twice leaves one file.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{Mailer, MailerError, render};
use crate::message::Message;

pub struct FileSink {
    root: PathBuf,
}

impl FileSink {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
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
        .map_err(|e| MailerError::Retryable {
            reason: e.to_string(),
            retry_after: None,
        })?
        .map_err(|e| MailerError::Retryable {
            reason: format!("writing the message file: {e}"),
            retry_after: None,
        })
    }
}
