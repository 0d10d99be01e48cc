//! The CLI's connections to the platform's front doors, the router's `Sender` API and the
//! control plane's `Control` API: `host:port` or `http://host:port` in plaintext (as
//! `cellmail up` serves them on loopback), `https://host:port` over TLS, trusting the
//! system's certificate authorities and the one `--public-ca` names.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[derive(Args)]
pub struct PublicCa {
    /// A CA certificate (PEM) to trust for an `https://` router or control plane, besides
    /// the system's (e.g. the CA of `cellmail certs issue --name`).
    #[arg(long, env = "CELLMAIL_PUBLIC_CA", global = true)]
    public_ca: Option<PathBuf>,
}

impl PublicCa {
    /// A channel to the front door at `addr`, connected; `what` names it in errors.
    pub async fn connect(&self, addr: &str, what: &str) -> anyhow::Result<Channel> {
        let url = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .with_context(|| format!("--{what} {url} is not a URL"))?;
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(path) = &self.public_ca {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --public-ca {}", path.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the {what} at {url}"))
    }
}
