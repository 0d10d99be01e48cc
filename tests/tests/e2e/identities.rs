//! Sending identities end to end: `cellmail up` checks a domain's DNS records through a DNS
//! server the test runs on loopback; a tenant sends from a domain only once its own records
//! are all published.

use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::dns::DnsServer;
use cellmail_tests::{Platform, authorized, message, until_ok};
use tonic::Code;
use tonic_types::StatusExt;

fn domain(tenant: &str, name: &str) -> v1::DomainRequest {
    v1::DomainRequest {
        tenant_id: tenant.into(),
        domain: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_is_sent_from_only_once_its_tenants_own_records_are_in_dns() {
    let dns = DnsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resolver = dns.addr.to_string();
    let platform =
        Platform::start(dir.path(), &["--cells", "1", "--dns-resolver", &resolver]).unwrap();
    let (_, key) = platform
        .create_tenant("ids", &["ids.example"])
        .await
        .unwrap();
    let (_, other_key) = platform
        .create_tenant("other", &["other.example"])
        .await
        .unwrap();
    let added = platform.cli(&["tenant", "domain", "add", "ids", "news.example"]);
    assert_eq!(added["verified"], false);
    let records = added["records"].as_array().unwrap().clone();
    let purposes: Vec<&str> = records
        .iter()
        .map(|r| r["purpose"].as_str().unwrap())
        .collect();
    // No cell sends through SES here: no MAIL FROM MX record (one per SES region).
    assert_eq!(purposes, ["ownership", "dkim", "mail-from-spf", "dmarc"]);
    let spf = &records[2];
    assert_eq!(
        (spf["name"].as_str(), spf["value"].as_str()),
        (
            Some("bounce.news.example"),
            Some("v=spf1 include:amazonses.com ~all")
        )
    );
    // The domain's own DKIM key: a TXT record of its public half under its selector.
    let dkim = &records[1];
    assert_eq!(dkim["type"], "TXT");
    let (name, value) = (
        dkim["name"].as_str().unwrap(),
        dkim["value"].as_str().unwrap(),
    );
    assert!(
        name.starts_with("cm") && name.ends_with("._domainkey.news.example"),
        "{name}"
    );
    assert!(value.starts_with("v=DKIM1; k=rsa; p=MII"), "{value}");

    let mut sender = platform.sender().await.unwrap();
    let from_news = || authorized(&key, message("hi@news.example", "j@example.com", ""));
    let refused = sender.send(from_news()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Ownership and DKIM only: the check names what is missing, and nothing changes.
    for r in &records[..2] {
        dns.publish(
            r["name"].as_str().unwrap(),
            r["type"].as_str().unwrap(),
            r["value"].as_str().unwrap(),
        );
    }
    let mut control = platform.control().await.unwrap();
    let partial = control
        .verify_domain(domain("ids", "news.example"))
        .await
        .unwrap()
        .into_inner();
    assert!(!partial.verified);
    let problems: Vec<(&str, &str)> = partial
        .records
        .iter()
        .filter(|r| !r.problem.is_empty())
        .map(|r| (r.purpose.as_str(), r.problem.as_str()))
        .collect();
    assert_eq!(
        problems,
        [
            ("mail-from-spf", "no TXT record at bounce.news.example"),
            ("dmarc", "no TXT record at _dmarc.news.example")
        ]
    );
    assert_eq!(
        sender.send(from_news()).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Everything published: verified, and the tenant sends from it.
    for r in &records[2..] {
        dns.publish(
            r["name"].as_str().unwrap(),
            r["type"].as_str().unwrap(),
            r["value"].as_str().unwrap(),
        );
    }
    let verified = platform.cli(&["tenant", "domain", "verify", "ids", "news.example"]);
    assert_eq!(verified["verified"], true, "{verified}");
    let sent = until_ok(Duration::from_secs(2), || {
        let mut sender = sender.clone();
        let request = from_news();
        async move { sender.send(request).await }
    })
    .await;
    assert!(sent.is_ok(), "{sent:?}");

    // Another tenant claiming the domain has its own token: ids' records do not verify it.
    let claimed = control
        .add_domain(domain("other", "news.example"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        claimed.records[0].value,
        records[0]["value"].as_str().unwrap()
    );
    let not_theirs = control
        .verify_domain(domain("other", "news.example"))
        .await
        .unwrap()
        .into_inner();
    assert!(!not_theirs.verified);
    assert!(
        not_theirs.records[0]
            .problem
            .contains("_cellmail.news.example")
    );
    let spoof = sender
        .send(authorized(
            &other_key,
            message("hi@news.example", "j@example.com", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(spoof.code(), Code::PermissionDenied);

    // Bad input names the field; a domain never added is not found.
    let bad = control
        .add_domain(domain("ids", "not a domain"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "domain"
    );
    let unknown = control
        .verify_domain(domain("ids", "never.example"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dkim_rotation_switches_keys_only_once_the_new_record_is_published() {
    let dns = DnsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resolver = dns.addr.to_string();
    let platform =
        Platform::start(dir.path(), &["--cells", "1", "--dns-resolver", &resolver]).unwrap();
    platform
        .create_tenant("rot", &["rot.example"])
        .await
        .unwrap();
    let added = platform.cli(&["tenant", "domain", "add", "rot", "mail.rot.example"]);
    let dkim_of = |info: &serde_json::Value| -> Vec<(String, String)> {
        (info["records"].as_array().unwrap().iter())
            .filter(|r| r["purpose"] == "dkim")
            .map(|r| {
                let name = r["name"].as_str().unwrap().to_owned();
                (name, r["note"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    let first = dkim_of(&added);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, "", "the one key signs");

    // The first run hands out the next key; the old one keeps signing.
    let started = platform.cli(&["tenant", "domain", "rotate-dkim", "rot", "mail.rot.example"]);
    let keys = dkim_of(&started);
    assert_eq!(keys.len(), 2, "{started}");
    assert_eq!(keys[0], first[0]);
    assert!(keys[1].1.contains("publish it"), "{:?}", keys[1]);
    let next = (started["records"].as_array().unwrap().iter())
        .find(|r| r["name"] == keys[1].0.as_str())
        .unwrap()
        .clone();

    // Not published yet: the switch is refused, naming the record.
    let mut control = platform.control().await.unwrap();
    let rotate = || v1::RotateDkimRequest {
        tenant_id: "rot".into(),
        domain: "mail.rot.example".into(),
        overlap_hours: 48,
    };
    let refused = control.rotate_dkim(rotate()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains(&keys[1].0),
        "{}",
        refused.message()
    );

    // Published: the new key signs, the old one stays listed to keep for the overlap.
    dns.publish(
        next["name"].as_str().unwrap(),
        "TXT",
        next["value"].as_str().unwrap(),
    );
    let switched = control.rotate_dkim(rotate()).await.unwrap().into_inner();
    let notes: Vec<(&str, &str)> = (switched.records.iter())
        .filter(|r| r.purpose == "dkim")
        .map(|r| (r.name.as_str(), r.note.as_str()))
        .collect();
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0].0, keys[0].0);
    assert!(notes[0].1.contains("keep it published until"), "{notes:?}");
    assert_eq!(notes[1], (keys[1].0.as_str(), ""), "the new key signs");

    // Bad input names the field; another tenant's domain is not found.
    let bad = control
        .rotate_dkim(v1::RotateDkimRequest {
            domain: "not a domain".into(),
            ..rotate()
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "domain"
    );
    platform
        .create_tenant("rot-other", &["other.example"])
        .await
        .unwrap();
    let not_theirs = control
        .rotate_dkim(v1::RotateDkimRequest {
            tenant_id: "rot-other".into(),
            ..rotate()
        })
        .await
        .unwrap_err();
    assert_eq!(not_theirs.code(), Code::NotFound);
}
