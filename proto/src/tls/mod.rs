//! Mutual TLS between cellmail's own processes: nothing is trusted for being on the network.
//!
//! Every router, control plane and cell holds a certificate signed by the platform's CA,
//! whose URI SAN names its [`Role`]: `spiffe://cellmail/router`, `spiffe://cellmail/control`
//! or `spiffe://cellmail/cell/<id>`. A cell's server asks every client for its certificate and
//! checks it against the CA; a connection with a certificate the CA did not sign, or one that
//! has expired, is refused in the handshake, logged and counted. A client without one gets
//! through the handshake, so that the service's authorization can answer its calls
//! UNAUTHENTICATED. A client checks the server's chain and that the server is the cell it
//! meant to reach.
//!
//! The three files are read again when they change (a handshake looks at most once a
//! second), so a certificate that cert-manager or an operator rotates is the one presented
//! on the next connection, with no restart; connections already open carry on.
//!
//! The front doors (router, control plane) serve their own clients, who authenticate with
//! API keys and operator credentials, over TLS with a [`PublicTls`] certificate; plaintext
//! only on loopback, or behind a mesh or ingress that terminates TLS when asked for.
//!
//! [`ca::LocalCa`] makes a CA and these certificates where nobody else does.

pub mod ca;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::verify_server_cert_signed_by_trust_anchor;
use tokio_rustls::rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::CellId;

/// The trust domain of the platform's certificate identities.
const TRUST_DOMAIN: &str = "spiffe://cellmail/";
/// How often a handshake may look for changed files.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// The longest a client may take over its handshake before its connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The metric counting connections refused in the handshake.
const REFUSED_METRIC: &str = "cellmail_tls_handshakes_refused_total";

/// Who a process of the platform is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    Router,
    Control,
    Cell(CellId),
}

impl Role {
    /// The URI SAN a certificate of this role carries.
    pub fn uri(&self) -> String {
        match self {
            Role::Router => format!("{TRUST_DOMAIN}router"),
            Role::Control => format!("{TRUST_DOMAIN}control"),
            Role::Cell(id) => format!("{TRUST_DOMAIN}cell/{id}"),
        }
    }

    /// The role a URI SAN names, if it is one of the platform's.
    pub fn from_uri(uri: &str) -> Option<Role> {
        match uri.strip_prefix(TRUST_DOMAIN)? {
            "router" => Some(Role::Router),
            "control" => Some(Role::Control),
            other => CellId::new(other.strip_prefix("cell/")?)
                .ok()
                .map(Role::Cell),
        }
    }

    /// The role named by the URI SANs of a DER certificate (exactly one of the platform's).
    pub fn of_certificate(der: &[u8]) -> Option<Role> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let names = cert.subject_alternative_name().ok()??;
        let mut roles = names
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Role::from_uri(uri),
                _ => None,
            });
        match (roles.next(), roles.next()) {
            (Some(role), None) => Some(role),
            _ => None,
        }
    }

    /// The role of the client of a call served over [`Tls::incoming`] (from the request's
    /// extensions): `None` when it presented no certificate of the platform's.
    pub fn of_peer(extensions: &http::Extensions) -> Option<&Role> {
        extensions.get::<Peer>()?.0.as_ref()
    }
}

/// What a server knows of a connection's client: the role its certificate names, read once
/// when the connection is accepted rather than at every call on it.
#[derive(Debug, Clone)]
pub struct Peer(Option<Role>);

/// A TLS connection [`Tls::incoming`] accepted, with its [`Peer`] for each call's extensions.
pub struct Accepted {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for Accepted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Router => f.write_str("router"),
            Role::Control => f.write_str("control"),
            Role::Cell(id) => write!(f, "cell {id}"),
        }
    }
}

/// The certificate files of a process, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsFiles {
    /// PEM certificate chain this process presents to the platform's other processes.
    #[arg(long = "tls-cert", env = "CELLMAIL_TLS_CERT")]
    pub cert: PathBuf,
    /// PEM private key of `--tls-cert`.
    #[arg(long = "tls-key", env = "CELLMAIL_TLS_KEY")]
    pub key: PathBuf,
    /// PEM certificate of the platform's CA, which signs every process's certificate.
    #[arg(long = "tls-ca", env = "CELLMAIL_TLS_CA")]
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the TLS configuration is unusable: {0}")]
    Config(String),
    /// A connection that could not be made, or whose handshake failed.
    #[error("connecting to {0}")]
    Connect(String),
}

/// The certificate a front door (router, control plane) serves its own clients with, who
/// authenticate with credentials of their own rather than certificates.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PublicTls {
    /// PEM certificate chain of the public port (none: plaintext, on a loopback address only
    /// unless --insecure-plaintext).
    #[arg(
        long = "public-tls-cert",
        env = "CELLMAIL_PUBLIC_TLS_CERT",
        requires = "public_key"
    )]
    pub public_cert: Option<PathBuf>,
    /// PEM private key of `--public-tls-cert`.
    #[arg(
        long = "public-tls-key",
        env = "CELLMAIL_PUBLIC_TLS_KEY",
        requires = "public_cert"
    )]
    pub public_key: Option<PathBuf>,
    /// Serve plaintext on an address other than loopback: for a mesh or an ingress that
    /// terminates TLS in front of this process.
    #[arg(long = "insecure-plaintext", env = "CELLMAIL_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

impl PublicTls {
    /// How the public port at `addr` is served: over TLS with the certificate (`Some`), or
    /// plaintext (`None`) where that is allowed: on loopback, or when asked for.
    pub fn open(&self, addr: std::net::SocketAddr) -> Result<Option<Arc<Tls>>, TlsError> {
        match (&self.public_cert, &self.public_key) {
            (Some(cert), Some(key)) => {
                let source = Source {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: None,
                };
                let loaded = Mutex::new(load(&source)?);
                Ok(Some(Arc::new(Tls { source, loaded })))
            }
            _ if addr.ip().is_loopback() => Ok(None),
            _ if self.insecure_plaintext => {
                tracing::warn!(%addr, "serving plaintext on an address other than loopback (--insecure-plaintext)");
                Ok(None)
            }
            _ => Err(TlsError::Config(format!(
                "{addr} is not a loopback address: give --public-tls-cert and --public-tls-key, \
                 or --insecure-plaintext behind a mesh or ingress that terminates TLS"
            ))),
        }
    }
}

/// The files one [`Tls`] reads: a public port's have no CA, as it asks for no client
/// certificate.
struct Source {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

/// When each file was last changed, to tell whether they need reading again.
type Stamps = [Option<SystemTime>; 3];

/// The configurations built from one reading of the files.
struct Loaded {
    stamps: Stamps,
    checked: Instant,
    server: Arc<ServerConfig>,
    /// The CA's certificates (none for a public port).
    roots: Option<Arc<RootCertStore>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

/// A process's TLS material, read again when its files change.
pub struct Tls {
    source: Source,
    loaded: Mutex<Loaded>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

fn stamps(source: &Source) -> Stamps {
    [Some(&source.cert), Some(&source.key), source.ca.as_ref()]
        .map(|path| path.and_then(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(path)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn load(source: &Source) -> Result<Loaded, TlsError> {
    let stamps = stamps(source);
    let chain = certificates(&source.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&source.key)?).map_err(|e| TlsError::Pem {
        path: source.key.clone(),
        reason: e.to_string(),
    })?;
    let roots = source.ca.as_deref().map(roots).transpose()?;
    let config = |e: rustls::Error| TlsError::Config(e.to_string());
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?;
    let builder = match &roots {
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(config)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        stamps,
        checked: Instant::now(),
        server: Arc::new(server),
        roots,
        chain,
        key: Arc::new(key),
    })
}

impl Tls {
    /// Reads `files`; fails naming the file that is missing or does not parse.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let source = Source {
            cert: files.cert,
            key: files.key,
            ca: Some(files.ca),
        };
        let loaded = Mutex::new(load(&source)?);
        Ok(Arc::new(Tls { source, loaded }))
    }

    /// The current configurations, read again first when a file changed. A file that no
    /// longer reads (caught halfway through a rewrite) leaves the last good reading in place.
    fn current(&self) -> std::sync::MutexGuard<'_, Loaded> {
        // Only whole replacements happen under the lock; a panic cannot leave it half-changed.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.checked.elapsed() >= RELOAD_CHECK {
            loaded.checked = Instant::now();
            if stamps(&self.source) != loaded.stamps {
                match load(&self.source) {
                    Ok(fresh) => {
                        tracing::info!(cert = %self.source.cert.display(), "TLS files read again");
                        *loaded = fresh;
                    }
                    Err(err) => tracing::warn!("keeping the TLS files read before: {err}"),
                }
            }
        }
        loaded
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// A client configuration that presents this process's certificate and accepts only a
    /// server of role `peer`.
    fn client_config(&self, peer: Role) -> Result<Arc<ClientConfig>, TlsError> {
        let (roots, chain, key) = {
            let loaded = self.current();
            let roots = loaded.roots.clone().ok_or_else(|| {
                TlsError::Config("a public port's certificate is not a client's".into())
            })?;
            (roots, loaded.chain.clone(), loaded.key.clone_key())
        };
        let provider = provider();
        let verifier = PeerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
            peer,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The TLS connections `listener` accepts until `shutdown`, for a tonic server's
    /// `serve_with_incoming`. Each handshake runs on its own task, so a slow client holds up
    /// no other; one that fails is logged and counted, and its connection dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Accepted>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            tracing::warn!("accepting a connection: {err}");
                            continue;
                        }
                    },
                };
                // As the plaintext servers do: a response in several writes must not wait
                // for the peer's delayed acknowledgement.
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.server_config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let role = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| Role::of_certificate(certs.first()?));
                            let peer = Peer(role);
                            let _ = tx.send(Ok(Accepted { stream, peer })).await;
                        }
                        // Closed before a handshake began: a probe that checks the port
                        // is open (a kubelet's), not a refused client.
                        Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "connection closed before its TLS handshake");
                        }
                        Ok(Err(err)) => refused(&peer, &err.to_string()),
                        Err(_) => refused(&peer, "no handshake within the timeout"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A channel to `endpoint` (from [`endpoint`]) that presents this process's
    /// certificate and accepts only a server of role `peer`; it connects (and reconnects)
    /// lazily, with the files as they are at each connection.
    pub fn channel(
        self: &Arc<Self>,
        endpoint: tonic::transport::Endpoint,
        peer: Role,
    ) -> tonic::transport::Channel {
        let tls = self.clone();
        channel_with(endpoint, move || tls.client_config(peer.clone()))
    }
}

/// The endpoint of `uri` (`https://host:port`) for [`channel_with`] and [`Tls::channel`],
/// which make each connection TLS themselves: tonic's client is given `http://`, so that it
/// does not insist on a TLS of its own.
pub fn endpoint(uri: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let plain = match uri.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => uri.to_owned(),
    };
    tonic::transport::Endpoint::from_shared(plain)
}

/// A channel to `endpoint` (from [`endpoint`]) whose connections are TLS with the
/// configuration `config` gives at each connection.
pub fn channel_with(
    endpoint: tonic::transport::Endpoint,
    config: impl Fn() -> Result<Arc<ClientConfig>, TlsError> + Send + Sync + 'static,
) -> tonic::transport::Channel {
    let config = Arc::new(config);
    let connector = tower::service_fn(move |uri: http::Uri| {
        let config = config.clone();
        async move { connect(uri, config()?).await }
    });
    endpoint.connect_with_connector_lazy(connector)
}

fn refused(peer: &std::net::SocketAddr, reason: &str) {
    metrics::counter!(REFUSED_METRIC).increment(1);
    tracing::warn!(%peer, "TLS handshake refused: {reason}");
}

async fn connect(
    uri: http::Uri,
    config: Arc<ClientConfig>,
) -> Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, TlsError> {
    let io = |e: std::io::Error| TlsError::Connect(format!("{uri}: {e}"));
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host, port)).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    // The verifier checks the server's role, not a name: any valid name will do here.
    let name = ServerName::try_from("cellmail").map_err(|e| TlsError::Config(e.to_string()))?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(io)?;
    Ok(hyper_util::rt::TokioIo::new(stream))
}

/// Accepts a server whose certificate the platform's CA signed, for the role expected.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    peer: Role,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match Role::of_certificate(end_entity) {
            Some(role) if role == self.peer => Ok(ServerCertVerified::assertion()),
            found => Err(rustls::Error::General(format!(
                "the server is {}, not {}",
                found.map_or_else(|| "of no platform role".to_owned(), |r| r.to_string()),
                self.peer
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_survives_its_uri_and_foreign_uris_name_none() {
        let cell = Role::Cell(CellId::new("cell-7").unwrap());
        for role in [Role::Router, Role::Control, cell] {
            assert_eq!(Role::from_uri(&role.uri()), Some(role));
        }
        for foreign in [
            "spiffe://other/router",
            "spiffe://cellmail/admin",
            "spiffe://cellmail/cell/",
            "spiffe://cellmail/cell/Bad_Id",
            "https://cellmail/router",
        ] {
            assert_eq!(Role::from_uri(foreign), None, "{foreign}");
        }
    }
}
