//! Sending identities: the DNS records a tenant publishes to send from a domain (ownership,
//! DKIM, its MAIL FROM domain's MX and SPF, DMARC), and their check through a real DNS
//! resolver. Only a domain whose every record checks out (and that SES on the tenant's cell
//! has verified, [`crate::api`]) becomes one the tenant may send from.

use std::collections::BTreeSet;
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

/// The status SES gives a domain's DKIM and MAIL FROM once it has found their records.
pub const TRANSPORT_SUCCESS: &str = "SUCCESS";

/// One record a tenant must publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// ownership | dkim | mail-from-mx | mail-from-spf | dmarc
    pub purpose: &'static str,
    pub kind: RecordType,
    pub name: String,
    pub value: String,
    /// For a DKIM record on its way in or out of a rotation; empty otherwise.
    pub note: String,
    /// The DKIM key's selector, or the MX record's region.
    pub of: Option<String>,
}

/// The MX value of a MAIL FROM domain that SES sends with in `region`.
fn feedback_mx(region: &str) -> String {
    format!("10 feedback-smtp.{region}.amazonses.com")
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
        retire_at_ms: None,
    })
}

/// The records `identity` asks its tenant to publish at `now_ms`: one MAIL FROM MX per
/// region in `ses_regions` (the regions cells send through SES in, so that a move between
/// them needs no DNS change), and the DKIM records of every key but those retired before now.
pub fn records(
    identity: &IdentityRecord,
    ses_regions: &BTreeSet<String>,
    now_ms: u64,
) -> Vec<DnsRecord> {
    let domain = &identity.domain;
    let record = |purpose, kind, name: String, value: String| DnsRecord {
        purpose,
        kind,
        name,
        value,
        note: String::new(),
        of: None,
    };
    let mut records = vec![record(
        "ownership",
        RecordType::TXT,
        format!("_cellmail.{domain}"),
        format!("cellmail-verification={}", identity.token),
    )];
    let signing = identity.signing_key().map(|key| key.selector.as_str());
    for key in &identity.dkim {
        let note = match key.retire_at_ms {
            Some(until) if until <= now_ms => continue,
            Some(until) => format!(
                "replaced by a newer key; keep it published until {}",
                timestamp(until)
            ),
            None if Some(key.selector.as_str()) != signing => {
                "the next key: publish it, then run rotate-dkim again".to_owned()
            }
            None => String::new(),
        };
        records.push(DnsRecord {
            note,
            of: Some(key.selector.clone()),
            ..record(
                "dkim",
                RecordType::TXT,
                format!("{}._domainkey.{domain}", key.selector),
                format!("v=DKIM1; k=rsa; p={}", key.public_key),
            )
        });
    }
    let mail_from = identity.mail_from_domain();
    records.extend(ses_regions.iter().map(|region| DnsRecord {
        of: Some(region.clone()),
        ..record(
            "mail-from-mx",
            RecordType::MX,
            mail_from.clone(),
            feedback_mx(region),
        )
    }));
    records.push(record(
        "mail-from-spf",
        RecordType::TXT,
        mail_from,
        format!("v=spf1 {SPF_INCLUDE} ~all"),
    ));
    records.push(record(
        "dmarc",
        RecordType::TXT,
        format!("_dmarc.{domain}"),
        "v=DMARC1; p=none;".to_owned(),
    ));
    records
}

/// `ms` since the epoch as an RFC 3339 time.
fn timestamp(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

/// Whether what DNS answered for `record` satisfies it: the exact ownership token, a DKIM
/// record with the key's public half, an MX to SES's feedback endpoint (any preference), an
/// SPF policy that includes SES, any DMARC policy.
fn satisfied(record: &DnsRecord, answers: &[String]) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    let tags = |s: &str| -> Vec<String> {
        s.split(';')
            .map(|tag| tag.chars().filter(|c| !c.is_whitespace()).collect())
            .filter(|tag: &String| !tag.is_empty())
            .collect()
    };
    answers.iter().any(|answer| match record.purpose {
        "mail-from-spf" => {
            answer.starts_with("v=spf1") && answer.split_whitespace().any(|t| t == SPF_INCLUDE)
        }
        "mail-from-mx" => {
            let exchange = |s: &str| s.split_whitespace().last().map(norm);
            exchange(answer).is_some() && exchange(answer) == exchange(&record.value)
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
                RData::MX(mx) => Some(format!("{} {}", mx.preference, mx.exchange)),
                _ => None,
            })
            .collect())
    }

    /// `None` when DNS has `record`, or what is wrong.
    pub async fn check(&self, record: &DnsRecord) -> Option<String> {
        match self.answers(&record.name, record.kind).await {
            Ok(answers) if satisfied(record, &answers) => None,
            Ok(answers) if answers.is_empty() => {
                Some(format!("no {} record at {}", record.kind, record.name))
            }
            Ok(answers) => Some(format!("{} at {} is {answers:?}", record.kind, record.name)),
            Err(err) => Some(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> DkimKeys {
        use base64::Engine as _;
        let kek = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        DkimKeys::parse(&kek).unwrap()
    }

    fn regions(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn records_name_the_domain_and_checks_accept_only_what_they_ask_for() {
        let keys = keys();
        let identity = new_identity("news.example", 1, Some(&keys)).unwrap();
        let records = records(&identity, &regions(&["eu-west-1", "us-east-1"]), 1);
        let purposes: Vec<_> = records.iter().map(|r| r.purpose).collect();
        assert_eq!(
            purposes,
            [
                "ownership",
                "dkim",
                "mail-from-mx",
                "mail-from-mx",
                "mail-from-spf",
                "dmarc"
            ]
        );
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
        // One MX per region, each to that region's feedback endpoint, at any preference.
        let (eu, us) = (&records[2], &records[3]);
        assert_eq!(eu.name, "bounce.news.example");
        assert_eq!(eu.value, "10 feedback-smtp.eu-west-1.amazonses.com");
        assert!(satisfied(
            eu,
            &["20 feedback-smtp.eu-west-1.amazonses.com.".into()]
        ));
        assert!(!satisfied(eu, std::slice::from_ref(&us.value)));
        let spf = &records[4];
        assert_eq!(spf.name, "bounce.news.example");
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

    #[test]
    fn a_rotations_keys_are_listed_with_what_to_do_until_the_old_ones_overlap_ends() {
        let keys = keys();
        let mut identity = new_identity("news.example", 1, Some(&keys)).unwrap();
        identity
            .dkim
            .push(new_dkim_key("news.example", 2, &keys).unwrap());
        let notes = |identity: &IdentityRecord, now| -> Vec<String> {
            (records(identity, &BTreeSet::new(), now).into_iter())
                .filter(|r| r.purpose == "dkim")
                .map(|r| r.note)
                .collect()
        };
        assert_eq!(identity.signing_key(), identity.dkim.first());
        let pending = notes(&identity, 3);
        assert_eq!(pending[0], "");
        assert!(pending[1].contains("publish it"), "{pending:?}");

        identity.dkim[0].retire_at_ms = Some(1_800_000_000_000);
        assert_eq!(identity.signing_key(), identity.dkim.get(1));
        let overlap = notes(&identity, 3);
        assert_eq!(
            overlap[0],
            "replaced by a newer key; keep it published until 2027-01-15T08:00:00Z"
        );
        assert_eq!(overlap[1], "");
        assert_eq!(
            notes(&identity, 1_800_000_000_000),
            [""],
            "the overlap is over"
        );
    }

    #[test]
    fn without_key_encryption_keys_a_domain_has_no_dkim_key() {
        let identity = new_identity("news.example", 1, None).unwrap();
        assert!(identity.dkim.is_empty());
        let records = records(&identity, &BTreeSet::new(), 1);
        let purposes: Vec<_> = records.iter().map(|r| r.purpose).collect();
        assert_eq!(purposes, ["ownership", "mail-from-spf", "dmarc"]);
    }
}
