//! The test services the README's test command starts (etcd, the AWS emulator), and private
//! etcd servers for tests that stop and restart theirs. A test that needs a service and does
//! not find it fails with the reason; it never skips.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::processes::free_port;

/// The shared etcd (`host:port`) the test command started.
pub fn etcd_endpoint() -> String {
    std::env::var("CELLMAIL_TEST_ETCD").unwrap_or_else(|_| {
        panic!("CELLMAIL_TEST_ETCD is not set: run ./deploy/local/test.sh, which starts etcd")
    })
}

/// A registry prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "/test-{test}-{}/",
        cellmail_proto::MessageId::generate()
            .to_string()
            .to_lowercase()
    )
}

/// An etcd server of the test's own, on free loopback ports, with its data in `dir` (so a
/// restart on the same dir keeps the data). Killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    pub endpoint: String,
    peer: u16,
    dir: std::path::PathBuf,
}

impl EtcdServer {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut server = Self {
            child: None,
            endpoint: format!("127.0.0.1:{}", free_port()?),
            peer: free_port()?,
            dir: dir.to_owned(),
        };
        server.restart().await?;
        Ok(server)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let client = format!("http://{}", self.endpoint);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "private", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("private={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (Debian's etcd-server; ./deploy/local/test.sh installs it)")?;
        self.child = Some(child);
        let endpoint = self.endpoint.clone();
        crate::wait_for(Duration::from_secs(20), "etcd to listen", || {
            std::net::TcpStream::connect(&endpoint).ok()
        })
        .await?;
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
