//! A CA of the platform's own, for setups that have none (`cellmail up`, the local cluster,
//! the tests): a key pair and a self-signed certificate kept in a directory, and the
//! certificates it issues there for each process's [`Role`]. Production issues the same
//! certificates with its own CA (cert-manager in `deploy/k8s`).

use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::{Role, TlsError, TlsFiles};
use crate::error::quote;

/// The CA's certificate and key, under its directory.
const CERT: &str = "ca.pem";
const KEY: &str = "ca.key";
/// How long a CA made here is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long before now a certificate's validity starts, for clocks a little behind.
const SKEW: Duration = Duration::from_secs(3600);

pub struct LocalCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

fn generation(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("making a certificate: {e}"))
}

fn write(path: &Path, contents: &str) -> Result<(), TlsError> {
    let error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    // Written whole under another name, then renamed: a process reading the files again
    // never sees half of one. Keys are readable by this user only.
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl LocalCa {
    /// The CA kept in `dir`, made there first if there is none.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        let (cert, key) = (dir.join(CERT), dir.join(KEY));
        if !cert.exists() {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
                path: dir.to_owned(),
                source,
            })?;
            let key_pair = KeyPair::generate().map_err(generation)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "cellmail local CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = SystemTime::now();
            params.not_before = (now - SKEW).into();
            params.not_after = (now + CA_VALIDITY).into();
            let certificate = params.self_signed(&key_pair).map_err(generation)?;
            write(&key, &key_pair.serialize_pem())?;
            write(&cert, &certificate.pem())?;
        }
        let key_pair = KeyPair::from_pem(&read(&key)?).map_err(generation)?;
        let issuer = Issuer::from_ca_cert_pem(&read(&cert)?, key_pair).map_err(generation)?;
        Ok(Self {
            dir: dir.to_owned(),
            issuer,
        })
    }

    /// The CA's certificate file: what every process is given as `--tls-ca`.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(CERT)
    }

    /// Issues a certificate of `role`, valid from now for `validity`, into this CA's
    /// directory (`<role>.pem` and `<role>.key`, replacing any there).
    pub fn issue(&self, role: &Role, validity: Duration) -> Result<TlsFiles, TlsError> {
        self.issue_named(role, &[], validity)
    }

    /// [`Self::issue`], the certificate also naming `names` (DNS names or IP addresses), so
    /// that it can serve a front door (`--public-tls-cert`) at those names too.
    pub fn issue_named(
        &self,
        role: &Role,
        names: &[String],
        validity: Duration,
    ) -> Result<TlsFiles, TlsError> {
        let now = SystemTime::now();
        self.issue_into(role, names, now - SKEW..now + validity, &self.dir)
    }

    /// Issues a certificate of `role` (and `names`) valid over `validity` (which may be over
    /// already) into `dir`.
    pub fn issue_into(
        &self,
        role: &Role,
        names: &[String],
        validity: Range<SystemTime>,
        dir: &Path,
    ) -> Result<TlsFiles, TlsError> {
        let key_pair = KeyPair::generate().map_err(generation)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, role.to_string());
        let uri = role
            .uri()
            .try_into()
            .map_err(|e| TlsError::Config(format!("the URI of {role}: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|e| {
                    TlsError::Config(format!("{} is not a DNS name: {e}", quote(name)))
                })?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = validity.start.into();
        params.not_after = validity.end.into();
        let certificate = params
            .signed_by(&key_pair, &self.issuer)
            .map_err(generation)?;
        let name = match role {
            Role::Cell(id) => format!("cell-{id}"),
            other => other.to_string(),
        };
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: self.cert(),
        };
        write(&files.key, &key_pair.serialize_pem())?;
        write(&files.cert, &certificate.pem())?;
        Ok(files)
    }
}
