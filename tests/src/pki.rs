//! The certificates of the processes a test starts: one CA per test process (each test runs
//! in a process of its own), in a temporary directory, and a certificate per role issued from
//! it on first use; beside it, the key that seals domains' DKIM keys. The platform's processes call each other over mutual TLS with them, as
//! they do when deployed; `cellmail up` keeps a CA of its own in its data dir.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cellmail_proto::tls::{self, Role, TlsFiles, ca::LocalCa};
use tokio_rustls::rustls::{
    self, ClientConfig,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::CertificateDer,
};

struct Pki {
    _dir: tempfile::TempDir,
    ca: LocalCa,
    issued: Mutex<HashMap<Role, TlsFiles>>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory for the test CA");
        let ca = LocalCa::open_or_create(dir.path()).expect("the test CA");
        Pki {
            _dir: dir,
            ca,
            issued: Mutex::default(),
        }
    })
}

/// The test CA, to issue certificates of its own (an expired one, say).
pub fn ca() -> &'static LocalCa {
    &pki().ca
}

/// The certificate files of `role`, issued by the test CA.
pub fn files(role: &Role) -> TlsFiles {
    let pki = pki();
    let mut issued = pki.issued.lock().unwrap_or_else(|p| p.into_inner());
    issued
        .entry(role.clone())
        .or_insert_with(|| {
            pki.ca
                .issue(role, Duration::from_secs(24 * 3600))
                .expect("a test certificate")
        })
        .clone()
}

/// The file of the key that seals domains' DKIM keys, shared by the control planes and
/// cells a test starts, as a deployment's are.
pub fn dkim_key_file() -> std::path::PathBuf {
    let path = pki()._dir.path().join("dkim-keys");
    cellmail_registry::dkim::DkimKeyFile::create_if_missing(&path).expect("the test DKIM key");
    path
}

/// The environment that gives a process of `role` its certificate (and a control plane or
/// a cell the DKIM key file).
pub fn env(role: &Role) -> Vec<(&'static str, String)> {
    let files = files(role);
    let mut env = vec![
        ("CELLMAIL_TLS_CERT", files.cert.display().to_string()),
        ("CELLMAIL_TLS_KEY", files.key.display().to_string()),
        ("CELLMAIL_TLS_CA", files.ca.display().to_string()),
    ];
    if matches!(role, Role::Control | Role::Cell(_)) {
        let dkim = dkim_key_file().display().to_string();
        env.push(("CELLMAIL_DKIM_KEY_FILE", dkim));
    }
    env
}

/// The TLS material of a process of `role`, for one started in-process (the bench's).
pub fn tls(role: &Role) -> anyhow::Result<Arc<tls::Tls>> {
    Ok(tls::Tls::load(files(role))?)
}

/// A TLS client configuration that presents no certificate and accepts any server's: the
/// client an attacker on the network would bring.
pub fn anonymous() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("rustls' default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A channel to `endpoint` (`https://host:port`) over TLS with no client certificate.
pub fn anonymous_channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let config = anonymous();
    Ok(tls::channel_with(tls::endpoint(endpoint)?, move || {
        Ok(config.clone())
    }))
}

/// The certificate the server at `addr` (`host:port`) presents to a new connection (DER).
pub async fn presented_certificate(addr: &str) -> anyhow::Result<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("cellmail")?;
    let stream = tokio_rustls::TlsConnector::from(anonymous())
        .connect(name, tcp)
        .await?;
    let (_, session) = stream.get_ref();
    let first = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| anyhow::anyhow!("{addr} presented no certificate"))?;
    Ok(first.to_vec())
}

/// Accepts any server certificate (checking only its signatures over the handshake).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
