//! Sending identities: the DNS records a tenant publishes to send from a domain (ownership,
//! DKIM, SPF, DMARC), and their check through a real DNS resolver. Only a domain whose every
//! record checks out becomes one the tenant may send from.

use std::net::SocketAddr;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use rand::RngCore;

use cellmail_registry::dkim::{self, DkimError, DkimKeys};
use cellmail_registry::schema::{DkimKey, IdentityRecord};

/// How identities are verified, from flags or env.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityConfig {
    /// The DNS server domain checks ask (`ip:port`); default: the system's resolvers.
    #[arg(long, env = "CELLMAIL_DNS_RESOLVER")]
    pub dns_resolver: Option<SocketAddr>,
    /// Treat the domains a tenant is created with as verified (one-machine setups only; a
    /// domain added later is always checked in DNS).
    #[arg(long, env = "CELLMAIL_TRUST_NEW_DOMAINS")]
    pub trust_new_domains: bool,
    #[command(flatten)]
    pub dkim: cellmail_registry::dkim::DkimKeyFile,
}

const SPF_INCLUDE: &str = "include:amazonses.com";

/// One record a tenant must publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// ownership | dkim | spf | dmarc
    pub purpose: &'static str,
    pub kind: RecordType,
    pub name: String,
    pub value: String,
}

/// A new identity for `domain`: a fresh ownership token and, with key-encryption keys, a
/// DKIM key of its own.
pub fn new_identity(
    domain: &str,
    now_ms: u64,
    keys: Option<&DkimKeys>,
) -> Result<IdentityRecord, DkimError> {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let dkim = match keys {
        Some(keys) => vec![new_dkim_key(domain, now_ms, keys)?],
        None => Vec::new(),
    };
    Ok(IdentityRecord {
        domain: domain.to_owned(),
        token: hex::encode(bytes),
        dkim,
        added_at_ms: now_ms,
        verified_at_ms: None,
    })
}

/// A new DKIM key for `domain`, its private half sealed under `keys`; its selector names it
/// (`cm` and 8 random hex digits), so a rotation's new key never reuses an old record.
pub fn new_dkim_key(domain: &str, now_ms: u64, keys: &DkimKeys) -> Result<DkimKey, DkimError> {
    let mut selector = [0u8; 4];
    rand::rng().fill_bytes(&mut selector);
    let (private_key, public_key) = dkim::generate()?;
    Ok(DkimKey {
        selector: format!("cm{}", hex::encode(selector)),
        public_key,
        sealed_private_key: keys.seal(domain, &private_key)?,
        created_at_ms: now_ms,
    })
}

/// The records `identity` asks its tenant to publish.
pub fn records(identity: &IdentityRecord) -> Vec<DnsRecord> {
    let domain = &identity.domain;
    let mut records = vec![DnsRecord {
        purpose: "ownership",
        kind: RecordType::TXT,
        name: format!("_cellmail.{domain}"),
        value: format!("cellmail-verification={}", identity.token),
    }];
    records.extend(identity.dkim.iter().map(|key| DnsRecord {
        purpose: "dkim",
        kind: RecordType::TXT,
        name: format!("{}._domainkey.{domain}", key.selector),
        value: format!("v=DKIM1; k=rsa; p={}", key.public_key),
    }));
    records.push(DnsRecord {
        purpose: "spf",
        kind: RecordType::TXT,
        name: domain.clone(),
        value: format!("v=spf1 {SPF_INCLUDE} ~all"),
    });
    records.push(DnsRecord {
        purpose: "dmarc",
        kind: RecordType::TXT,
        name: format!("_dmarc.{domain}"),
        value: "v=DMARC1; p=none;".to_owned(),
    });
    records
}

/// Whether what DNS answered for `record` satisfies it: the exact ownership token, a DKIM
/// record with the key's public half, an SPF policy that includes SES, any DMARC policy.
fn satisfied(record: &DnsRecord, answers: &[String]) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    let tags = |s: &str| -> Vec<String> {
        s.split(';')
            .map(|tag| tag.chars().filter(|c| !c.is_whitespace()).collect())
            .filter(|tag: &String| !tag.is_empty())
            .collect()
    };
    answers.iter().any(|answer| match record.purpose {
        "spf" => {
            answer.starts_with("v=spf1") && answer.split_whitespace().any(|t| t == SPF_INCLUDE)
        }
        "dmarc" => answer.starts_with("v=DMARC1"),
        // A key record's tags in any order and spacing, each the one asked for.
        "dkim" => {
            let (mut got, mut wanted) = (tags(answer), tags(&record.value));
            got.sort();
            wanted.sort();
            got == wanted
        }
        _ => norm(answer) == norm(&record.value),
    })
}

/// Checks identities' records through a DNS resolver.
pub struct Checker {
    resolver: Resolver<TokioRuntimeProvider>,
}

impl Checker {
    pub fn new(config: &IdentityConfig) -> anyhow::Result<Self> {
        let mut builder = match config.dns_resolver {
            Some(server) => {
                let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut name_server.connections {
                    connection.port = server.port();
                }
                let resolvers = ResolverConfig::from_parts(None, Vec::new(), vec![name_server]);
                Resolver::builder_with_config(resolvers, TokioRuntimeProvider::default())
            }
            None => Resolver::builder_tokio()?,
        };
        // An operator re-checks right after fixing a record: answer from DNS, not a cache.
        builder.options_mut().cache_size = 0;
        Ok(Self {
            resolver: builder.build()?,
        })
    }

    /// What DNS answers for `name` and `kind`, as text (empty when nothing is published).
    async fn answers(&self, name: &str, kind: RecordType) -> Result<Vec<String>, String> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = match self.resolver.lookup(fqdn.as_str(), kind).await {
            Ok(lookup) => lookup,
            Err(err) if err.is_no_records_found() || err.is_nx_domain() => return Ok(Vec::new()),
            Err(err) => return Err(format!("DNS lookup of {name} failed: {err}")),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }

    /// Each of `identity`'s records with `None` when DNS has it, or what is wrong.
    pub async fn check(&self, identity: &IdentityRecord) -> Vec<(DnsRecord, Option<String>)> {
        let mut checked = Vec::new();
        for record in records(identity) {
            let problem = match self.answers(&record.name, record.kind).await {
                Ok(answers) if satisfied(&record, &answers) => None,
                Ok(answers) if answers.is_empty() => {
                    Some(format!("no {} record at {}", record.kind, record.name))
                }
                Ok(answers) => Some(format!("{} at {} is {answers:?}", record.kind, record.name)),
                Err(err) => Some(err),
            };
            checked.push((record, problem));
        }
        checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_the_domain_and_checks_accept_only_what_they_ask_for() {
        use base64::Engine as _;
        let kek = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let keys = DkimKeys::parse(&kek).unwrap();
        let identity = new_identity("news.example", 1, Some(&keys)).unwrap();
        let records = records(&identity);
        assert_eq!(records.len(), 4);
        let ownership = &records[0];
        assert!(satisfied(ownership, std::slice::from_ref(&ownership.value)));
        assert!(!satisfied(
            ownership,
            &["cellmail-verification=other".into()]
        ));
        let dkim = &records[1];
        let key = &identity.dkim[0];
        assert_eq!(
            dkim.name,
            format!("{}._domainkey.news.example", key.selector)
        );
        let spaced = format!("k=rsa;  v=DKIM1; p={}", key.public_key);
        assert!(satisfied(dkim, &[spaced]));
        let other = new_identity("news.example", 1, Some(&keys)).unwrap();
        let wrong = format!("v=DKIM1; k=rsa; p={}", other.dkim[0].public_key);
        assert!(!satisfied(dkim, &[wrong]));
        let private = keys.open("news.example", &key.sealed_private_key).unwrap();
        assert!(private.len() > 1000, "an RSA-2048 private key");
        let spf = &records[2];
        assert!(satisfied(
            spf,
            &["v=spf1 include:_spf.example include:amazonses.com -all".into()]
        ));
        assert!(!satisfied(
            spf,
            &["v=spf1 include:amazonses.com.evil ~all".into()]
        ));
        assert!(satisfied(&records[3], &["v=DMARC1; p=reject".into()]));
        assert!(!satisfied(&records[3], &[]));
    }

    #[test]
    fn without_key_encryption_keys_a_domain_has_no_dkim_key() {
        let identity = new_identity("news.example", 1, None).unwrap();
        assert!(identity.dkim.is_empty());
        let purposes: Vec<_> = records(&identity).iter().map(|r| r.purpose).collect();
        assert_eq!(purposes, ["ownership", "spf", "dmarc"]);
    }
}
