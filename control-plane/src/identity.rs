//! Sending identities: the DNS records a tenant publishes to send from a domain (ownership,
//! DKIM, SPF, DMARC), and their check through a real DNS resolver. Only a domain whose every
//! record checks out becomes one the tenant may send from.

use std::net::SocketAddr;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use rand::RngCore;

use cellmail_registry::schema::IdentityRecord;

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
}

/// SES's DKIM signing domain, which the DKIM CNAMEs point into.
const DKIM_TARGET: &str = "dkim.amazonses.com";
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

/// A new identity for `domain`: a fresh ownership token and three DKIM selectors.
pub fn new_identity(domain: &str, now_ms: u64) -> IdentityRecord {
    let token = || {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        hex::encode(bytes)
    };
    IdentityRecord {
        domain: domain.to_owned(),
        token: token(),
        dkim_selectors: (0..3).map(|_| token()).collect(),
        added_at_ms: now_ms,
        verified_at_ms: None,
    }
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
    records.extend(identity.dkim_selectors.iter().map(|selector| DnsRecord {
        purpose: "dkim",
        kind: RecordType::CNAME,
        name: format!("{selector}._domainkey.{domain}"),
        value: format!("{selector}.{DKIM_TARGET}"),
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

/// Whether what DNS answered for `record` satisfies it: the exact CNAME target or ownership
/// token, an SPF policy that includes SES, any DMARC policy.
fn satisfied(record: &DnsRecord, answers: &[String]) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    answers.iter().any(|answer| match record.purpose {
        "spf" => {
            answer.starts_with("v=spf1") && answer.split_whitespace().any(|t| t == SPF_INCLUDE)
        }
        "dmarc" => answer.starts_with("v=DMARC1"),
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
                RData::CNAME(target) => Some(target.0.to_string()),
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
        let identity = new_identity("news.example", 1);
        let records = records(&identity);
        assert_eq!(records.len(), 6);
        assert_ne!(identity.dkim_selectors[0], identity.dkim_selectors[1]);
        let ownership = &records[0];
        assert!(satisfied(ownership, std::slice::from_ref(&ownership.value)));
        assert!(!satisfied(
            ownership,
            &["cellmail-verification=other".into()]
        ));
        let dkim = &records[1];
        assert!(dkim.name.ends_with("._domainkey.news.example"));
        assert!(satisfied(
            dkim,
            &[format!("{}.", dkim.value.to_uppercase())]
        ));
        let spf = &records[4];
        assert!(satisfied(
            spf,
            &["v=spf1 include:_spf.example include:amazonses.com -all".into()]
        ));
        assert!(!satisfied(
            spf,
            &["v=spf1 include:amazonses.com.evil ~all".into()]
        ));
        assert!(satisfied(&records[5], &["v=DMARC1; p=reject".into()]));
        assert!(!satisfied(&records[5], &[]));
    }
}
