//! DKIM keys of tenants' domains, brought to SES ("bring your own DKIM"): one RSA-2048 key
//! pair per domain, made by the control plane. The tenant publishes its public half as
//! `<selector>._domainkey.<domain> TXT "v=DKIM1; k=rsa; p=…"`; every cell that serves the
//! tenant gives the private half to SES with that selector. So the domain verifies on every
//! cell, whatever its SES account or region, and a move needs no DNS change.
//!
//! A private key is kept in the registry sealed (AES-256-GCM, bound to its domain) under a
//! key-encryption key from `--dkim-key-file`: one base64-encoded 32-byte key per line. The
//! first line seals; every line opens, as a sealed key names the key that sealed it (a hash
//! of it). To rotate: put a new key on the first line and keep the old one below it until
//! every domain's DKIM key has been rotated (`cellmail tenant domain rotate-dkim`), then
//! remove it.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// Where the key-encryption keys are, from a flag or env.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DkimKeyFile {
    /// File of the keys that seal domains' DKIM private keys in the registry (one base64
    /// 32-byte key per line; the first seals, all open). Without it, domains get no DKIM key
    /// of their own.
    #[arg(long = "dkim-key-file", env = "CELLMAIL_DKIM_KEY_FILE")]
    pub path: Option<PathBuf>,
}

impl DkimKeyFile {
    /// The keys in the file, if one is given.
    pub fn load(&self) -> anyhow::Result<Option<DkimKeys>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading --dkim-key-file {}: {e}", path.display()))?;
        DkimKeys::parse(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--dkim-key-file {}: {e}", path.display()))
    }

    /// Writes a file of one new key at `path` (readable by its owner only) unless one is
    /// there: `cellmail up`'s keys.
    pub fn create_if_missing(path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness"))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut file) => Ok(writeln!(file, "{}", BASE64.encode(key))?),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(anyhow::anyhow!("creating {}: {e}", path.display())),
        }
    }
}

/// Why a DKIM key could not be sealed, opened or made.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("line {line}: {reason}")]
    KeyFile { line: usize, reason: String },
    #[error("the key file has no key")]
    NoKey,
    #[error("sealed by a key the key file does not have")]
    UnknownKey,
    #[error("not a sealed key, or sealed for another domain")]
    Unsealable,
    #[error("making an RSA key pair failed")]
    Generation,
}

/// The key-encryption keys: the first seals, all open.
pub struct DkimKeys {
    keys: Vec<(String, LessSafeKey)>,
}

/// A short name of a key-encryption key: the start of its SHA-256, in hex.
fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

impl DkimKeys {
    pub fn parse(text: &str) -> Result<Self, DkimError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| DkimError::KeyFile {
                line: n + 1,
                reason: reason.to_owned(),
            };
            let bytes = BASE64.decode(line).map_err(|_| bad("not base64"))?;
            if bytes.len() != 32 {
                return Err(bad("a key is 32 bytes"));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad("not a key"))?;
            keys.push((key_id(&bytes), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(DkimError::NoKey);
        }
        Ok(Self { keys })
    }

    /// `secret` sealed for `domain` under the first key: `<key id>.<base64 nonce+ciphertext>`.
    pub fn seal(&self, domain: &str, secret: &[u8]) -> Result<String, DkimError> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| DkimError::Generation)?;
        let mut sealed = secret.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(domain.as_bytes()),
            &mut sealed,
        )
        .map_err(|_| DkimError::Unsealable)?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(format!("{id}.{}", BASE64.encode(out)))
    }

    /// What [`Self::seal`] sealed for `domain`.
    pub fn open(&self, domain: &str, sealed: &str) -> Result<Vec<u8>, DkimError> {
        let (id, body) = sealed.split_once('.').ok_or(DkimError::Unsealable)?;
        let (_, key) = (self.keys.iter())
            .find(|(known, _)| known == id)
            .ok_or(DkimError::UnknownKey)?;
        let bytes = BASE64.decode(body).map_err(|_| DkimError::Unsealable)?;
        if bytes.len() < NONCE_LEN {
            return Err(DkimError::Unsealable);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| DkimError::Unsealable)?;
        let mut rest = rest.to_vec();
        let opened = key
            .open_in_place(nonce, Aad::from(domain.as_bytes()), &mut rest)
            .map_err(|_| DkimError::Unsealable)?;
        Ok(opened.to_vec())
    }
}

/// A new RSA-2048 DKIM key pair: the private key (PKCS #8 DER) and the public key as a DKIM
/// record's `p=` carries it (base64 of its SubjectPublicKeyInfo DER).
pub fn generate() -> Result<(Vec<u8>, String), DkimError> {
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| DkimError::Generation)?;
    let private: Pkcs8V1Der = pair.as_der().map_err(|_| DkimError::Generation)?;
    let public: PublicKeyX509Der =
        (pair.public_key().as_der()).map_err(|_| DkimError::Generation)?;
    Ok((private.as_ref().to_vec(), BASE64.encode(public.as_ref())))
}

/// A private key as SES's `DomainSigningPrivateKey` takes it: base64 of its DER.
pub fn for_ses(private_key: &[u8]) -> String {
    BASE64.encode(private_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(lines: &[[u8; 32]]) -> DkimKeys {
        let text: String = lines
            .iter()
            .map(|k| format!("{}\n", BASE64.encode(k)))
            .collect();
        DkimKeys::parse(&text).unwrap()
    }

    #[test]
    fn a_sealed_key_opens_for_its_domain_only() {
        let keys = keys(&[[1; 32]]);
        let sealed = keys.seal("acme.example", b"secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(keys.open("acme.example", &sealed).unwrap(), b"secret");
        assert!(matches!(
            keys.open("other.example", &sealed),
            Err(DkimError::Unsealable)
        ));
    }

    #[test]
    fn a_new_first_key_seals_and_the_old_one_still_opens() {
        let old = keys(&[[1; 32]]);
        let sealed_before = old.seal("acme.example", b"before").unwrap();
        let rotated = keys(&[[2; 32], [1; 32]]);
        let sealed_after = rotated.seal("acme.example", b"after").unwrap();
        assert_eq!(
            rotated.open("acme.example", &sealed_before).unwrap(),
            b"before"
        );
        assert_eq!(
            rotated.open("acme.example", &sealed_after).unwrap(),
            b"after"
        );
        assert!(matches!(
            old.open("acme.example", &sealed_after),
            Err(DkimError::UnknownKey)
        ));
    }

    #[test]
    fn a_bad_key_file_names_the_line() {
        let bad = DkimKeys::parse("# keys\n\nnot-base64!\n").err().unwrap();
        assert_eq!(bad.to_string(), "line 3: not base64");
        let short = DkimKeys::parse(&BASE64.encode([0u8; 16])).err().unwrap();
        assert_eq!(short.to_string(), "line 1: a key is 32 bytes");
        assert!(matches!(DkimKeys::parse("\n"), Err(DkimError::NoKey)));
    }

    #[test]
    fn a_generated_key_is_rsa_2048_with_its_public_half_in_base64() {
        let (private, public) = generate().unwrap();
        let again = KeyPair::from_pkcs8(&private).unwrap();
        assert_eq!(again.public_modulus_len() * 8, 2048);
        let der = BASE64.decode(&public).unwrap();
        assert_eq!(der, again.public_key().as_der().unwrap().as_ref());
    }
}
