//! The trust boundary of a cell: its gRPC port answers only the platform's own processes,
//! each for the methods its role needs. Every `Cell` method is called straight at a cell
//! (skipping the router) as an attacker inside the network would: over plain TCP, over TLS
//! with no certificate, with a certificate from another CA, with an expired one, and with a
//! valid certificate of a role the method is not for. Each is refused, and the tenant's
//! data, read back through the router, is as it was. A cell's certificate rotated on disk is
//! the one it presents next, with no send failing meanwhile. The front doors serve TLS with
//! a certificate, and plaintext off loopback only when asked for.

use std::time::{Duration, SystemTime};

use cellmail_proto::CellId;
use cellmail_proto::tls::{Role, Tls, TlsFiles, ca::LocalCa};
use cellmail_proto::v1::{self, cell_client::CellClient, sender_client::SenderClient};
use cellmail_tests::emulator::ses_event;
use cellmail_tests::processes::free_addr;
use cellmail_tests::{Platform, authorized, get_message, message, pki, until_ok};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::{scrape, value};

const TENANT: &str = "victim";
const FROM: &str = "shop@victim.example";
const KEPT: &str = "kept@example.com";

/// Which platform process a `Cell` method is for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum For {
    Router,
    Control,
    Cell,
}

const METHODS: [(&str, For); 18] = [
    ("Accept", For::Router),
    ("GetMessage", For::Router),
    ("ListSuppressions", For::Router),
    ("AddSuppression", For::Router),
    ("RemoveSuppression", For::Router),
    ("GetStats", For::Router),
    ("ListEvents", For::Router),
    ("Webhooks", For::Router),
    ("RecordEngagement", For::Router),
    ("ProvisionTenant", For::Control),
    ("PrepareTenant", For::Control),
    ("ExportTenant", For::Control),
    ("ImportTenant", For::Control),
    ("TenantBacklog", For::Control),
    ("ExportTenantData", For::Control),
    ("EraseTenant", For::Control),
    ("GetHealthReport", For::Control),
    ("ForwardFeedback", For::Cell),
];

/// The tenant every test here creates.
fn victim_tenant() -> v1::CreateTenantRequest {
    v1::CreateTenantRequest {
        id: TENANT.into(),
        domains: vec!["victim.example".into()],
        ..Default::default()
    }
}

/// A platform of one cell with a tenant that has sent a message and kept a suppression.
struct Victim {
    platform: Platform,
    _dir: tempfile::TempDir,
    metrics: String,
    sender: SenderClient<Channel>,
    key: String,
    message_id: String,
    epoch: u64,
    cell: CellId,
    endpoint: String,
}

/// What the tenant sees of its data through the router.
#[derive(Debug, PartialEq)]
struct Seen {
    suppressions: Vec<String>,
    message: (String, Vec<String>),
    accepted: u64,
    complained: u64,
}

impl Victim {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let metrics = free_addr().unwrap();
        let args = ["--cells", "1", "--metrics-addr", &metrics];
        let platform = Platform::start(dir.path(), &args).unwrap();
        let mut control = platform.control().await.unwrap();
        let created = control
            .create_tenant(victim_tenant())
            .await
            .unwrap()
            .into_inner();
        let tenant = created.tenant.unwrap();
        let cells = control
            .list_cells(v1::ListCellsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cells;
        let endpoint = cells
            .into_iter()
            .find(|c| c.id == tenant.cell)
            .unwrap()
            .endpoint;
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let mut sender = platform.sender().await.unwrap();
        let key = created.api_key;
        cellmail_tests::until_router_serves(&sender, &key).await;
        let sent = sender
            .send(authorized(
                &key,
                message(FROM, "jane@example.com", "real-1"),
            ))
            .await
            .unwrap()
            .into_inner();
        let kept = v1::AddSuppressionRequest {
            address: KEPT.into(),
            reason: 0,
        };
        sender
            .add_suppression(authorized(&key, kept))
            .await
            .unwrap();
        let victim = Self {
            _dir: dir,
            metrics,
            key,
            message_id: sent.message_id,
            epoch: tenant.epoch,
            cell: CellId::new(tenant.cell).unwrap(),
            endpoint,
            sender,
            platform,
        };
        // Settled (SENT), so that what is read back changes only if someone changes it.
        until_ok(Duration::from_secs(20), || async {
            let status = get_message(&victim.sender, &victim.key, &victim.message_id).await?;
            (status.state == "SENT")
                .then_some(())
                .ok_or_else(|| tonic::Status::unavailable("not sent yet"))
        })
        .await
        .unwrap();
        victim
    }

    async fn seen(&self) -> Seen {
        let suppressions = self
            .sender
            .clone()
            .list_suppressions(authorized(
                &self.key,
                v1::ListSuppressionsRequest::default(),
            ))
            .await
            .unwrap()
            .into_inner()
            .suppressions
            .into_iter()
            .map(|s| s.address)
            .collect();
        let status = get_message(&self.sender, &self.key, &self.message_id)
            .await
            .unwrap();
        let recipients = status.recipients.into_iter().map(|r| r.address).collect();
        let stats = self
            .sender
            .clone()
            .get_stats(authorized(&self.key, v1::GetStatsRequest { hours: 1 }))
            .await
            .unwrap()
            .into_inner();
        let (accepted, complained) = stats
            .classes
            .iter()
            .fold((0, 0), |(a, c), s| (a + s.accepted, c + s.complained));
        Seen {
            suppressions,
            message: (status.state, recipients),
            accepted,
            complained,
        }
    }

    /// The platform's CA, as `cellmail up` keeps it.
    fn ca(&self) -> LocalCa {
        LocalCa::open_or_create(&self.platform.data_dir.join("tls")).unwrap()
    }

    /// A client of the cell presenting `files` (and trusting the platform's CA).
    fn client_with(&self, files: TlsFiles) -> CellClient<Channel> {
        let files = TlsFiles {
            ca: self.ca().cert(),
            ..files
        };
        let tls = Tls::load(files).unwrap();
        let endpoint = cellmail_proto::tls::endpoint(&self.endpoint).unwrap();
        CellClient::new(tls.channel(endpoint, Role::Cell(self.cell.clone())))
    }

    fn caller(&self) -> Option<v1::Caller> {
        Some(v1::Caller {
            tenant_id: TENANT.into(),
            epoch: self.epoch,
        })
    }

    /// Calls `method` for the tenant with what a forger would send; `Ok` if it was answered.
    async fn call(
        &self,
        client: &mut CellClient<Channel>,
        method: &str,
    ) -> Result<(), tonic::Status> {
        let tenant_id = || TENANT.to_owned();
        match method {
            "Accept" => client
                .accept(v1::AcceptRequest {
                    tenant_id: tenant_id(),
                    epoch: self.epoch,
                    message: Some(message(FROM, "forged@example.com", "forged-1")),
                })
                .await
                .map(drop),
            "GetMessage" => client
                .get_message(v1::CellGetMessageRequest {
                    caller: self.caller(),
                    request: Some(v1::GetMessageRequest {
                        message_id: self.message_id.clone(),
                    }),
                })
                .await
                .map(drop),
            "ListSuppressions" => client
                .list_suppressions(v1::CellListSuppressionsRequest {
                    caller: self.caller(),
                    request: Some(v1::ListSuppressionsRequest::default()),
                })
                .await
                .map(drop),
            "AddSuppression" => client
                .add_suppression(v1::CellAddSuppressionRequest {
                    caller: self.caller(),
                    request: Some(v1::AddSuppressionRequest {
                        address: "added@example.com".into(),
                        reason: 0,
                    }),
                })
                .await
                .map(drop),
            "RemoveSuppression" => client
                .remove_suppression(v1::CellRemoveSuppressionRequest {
                    caller: self.caller(),
                    request: Some(v1::RemoveSuppressionRequest {
                        address: KEPT.into(),
                    }),
                })
                .await
                .map(drop),
            "GetStats" => client
                .get_stats(v1::CellGetStatsRequest {
                    caller: self.caller(),
                    request: Some(v1::GetStatsRequest { hours: 1 }),
                })
                .await
                .map(drop),
            "ProvisionTenant" => client
                .provision_tenant(v1::ProvisionTenantRequest {
                    tenant_id: tenant_id(),
                    revision: 0,
                })
                .await
                .map(drop),
            "ListEvents" => client
                .list_events(v1::CellListEventsRequest {
                    caller: self.caller(),
                    request: Some(v1::ListEventsRequest::default()),
                })
                .await
                .map(drop),
            "RecordEngagement" => client
                .record_engagement(v1::CellEngagementRequest {
                    caller: self.caller(),
                    message_id: cellmail_proto::MessageId::generate().to_string(),
                    recipient: KEPT.into(),
                    action: "unsubscribe".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "Webhooks" => client
                .webhooks(v1::CellWebhooksRequest {
                    caller: self.caller(),
                    call: Some(v1::cell_webhooks_request::Call::List(
                        v1::ListWebhooksRequest {},
                    )),
                })
                .await
                .map(drop),
            "PrepareTenant" => client
                .prepare_tenant(v1::PrepareTenantRequest {
                    tenant_id: tenant_id(),
                    epoch: self.epoch + 1,
                })
                .await
                .map(drop),
            "ExportTenant" => client
                .export_tenant(v1::ExportTenantRequest {
                    tenant_id: tenant_id(),
                    epoch: self.epoch,
                    messages: true,
                    ..Default::default()
                })
                .await
                .map(drop),
            "ImportTenant" => client
                .import_tenant(v1::ImportTenantRequest {
                    tenant_id: tenant_id(),
                    chunk: Some(v1::TenantChunk {
                        removed_suppressions: vec![KEPT.into()],
                        ..Default::default()
                    }),
                })
                .await
                .map(drop),
            "TenantBacklog" => client
                .tenant_backlog(v1::TenantBacklogRequest {
                    tenant_id: tenant_id(),
                })
                .await
                .map(drop),
            "ExportTenantData" => client
                .export_tenant_data(v1::TenantDataRequest {
                    tenant_id: tenant_id(),
                })
                .await
                .map(drop),
            "EraseTenant" => client
                .erase_tenant(v1::TenantDataRequest {
                    tenant_id: tenant_id(),
                })
                .await
                .map(drop),
            "GetHealthReport" => client
                .get_health_report(v1::HealthReportRequest { window_secs: 60 })
                .await
                .map(drop),
            "ForwardFeedback" => {
                let record = ses_event("complaint.json", TENANT, &self.message_id);
                for _ in 0..5 {
                    client
                        .forward_feedback(v1::ForwardFeedbackRequest {
                            record: record.clone().into_bytes(),
                        })
                        .await?;
                }
                Ok(())
            }
            other => panic!("no such Cell method {other}"),
        }
    }

    async fn handshakes_refused(&self) -> f64 {
        let samples = scrape(&self.metrics).await;
        value(&samples, "cellmail_tls_handshakes_refused_total", &[]).unwrap_or(0.0)
    }

    async fn refused(&self, name: &str, reason: &str) -> f64 {
        let labels = [("method", name), ("reason", reason)];
        value(
            &scrape(&self.metrics).await,
            "cellmail_cell_calls_refused_total",
            &labels,
        )
        .unwrap_or(0.0)
    }
}

/// A certificate of `role` from `ca`, valid over `validity`, in a directory of its own.
fn certificate(
    ca: &LocalCa,
    role: &Role,
    validity: std::ops::Range<SystemTime>,
) -> (tempfile::TempDir, TlsFiles) {
    let dir = tempfile::tempdir().unwrap();
    let files = ca.issue_into(role, &[], validity, dir.path()).unwrap();
    (dir, files)
}

fn day() -> std::ops::Range<SystemTime> {
    let now = SystemTime::now();
    now - Duration::from_secs(60)..now + Duration::from_secs(24 * 3600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_method_refuses_callers_without_a_platform_certificate_and_changes_nothing() {
    let victim = Victim::start().await;
    let before = victim.seen().await;

    // Plain TCP: the cell speaks only TLS.
    let mut plain = CellClient::new(
        Endpoint::from_shared(victim.endpoint.replace("https://", "http://"))
            .unwrap()
            .connect_lazy(),
    );
    // TLS without a client certificate: the call is answered UNAUTHENTICATED.
    let mut anonymous = CellClient::new(pki::anonymous_channel(&victim.endpoint).unwrap());
    for (method, _) in METHODS {
        let refused = victim.call(&mut plain, method).await.unwrap_err();
        assert_ne!(refused.code(), Code::Ok, "{method} over plain TCP");
        let refused = victim.call(&mut anonymous, method).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{method}: {refused:?}"
        );
        assert!(refused.message().len() < 128, "{}", refused.message());
        assert_eq!(
            victim.refused(method, "unauthenticated").await,
            1.0,
            "{method}"
        );
    }
    assert_eq!(victim.seen().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_expired_are_refused_in_the_handshake() {
    let victim = Victim::start().await;
    let before = victim.seen().await;
    let now = SystemTime::now();
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = LocalCa::open_or_create(foreign_dir.path()).unwrap();
    let refused_before = victim.handshakes_refused().await;
    let mut calls = 0.0;
    for (method, role_for) in METHODS {
        // The role each method is for: only the certificate is wrong.
        let role = match role_for {
            For::Router => Role::Router,
            For::Control => Role::Control,
            For::Cell => Role::Cell(CellId::new("cell-9").unwrap()),
        };
        let expired = now - Duration::from_secs(2 * 24 * 3600)..now - Duration::from_secs(3600);
        for (what, (_dir, files)) in [
            ("another CA's", certificate(&foreign, &role, day())),
            ("an expired", certificate(&victim.ca(), &role, expired)),
        ] {
            let mut client = victim.client_with(files);
            let refused = victim.call(&mut client, method).await.unwrap_err();
            assert_ne!(refused.code(), Code::Ok, "{method} with {what} certificate");
            calls += 1.0;
        }
    }
    let refused_after = victim.handshakes_refused().await;
    assert!(
        refused_after - refused_before >= calls,
        "{calls} refused calls, {} handshakes counted",
        refused_after - refused_before
    );
    assert_eq!(victim.seen().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_calls_only_the_methods_of_its_role() {
    let victim = Victim::start().await;
    let before = victim.seen().await;
    let ca = victim.ca();
    let other_cell = Role::Cell(CellId::new("cell-9").unwrap());
    for (method, role_for) in METHODS {
        let others = match role_for {
            For::Router => [Role::Control, other_cell.clone()],
            For::Control => [Role::Router, other_cell.clone()],
            For::Cell => [Role::Router, Role::Control],
        };
        for role in others {
            let (_dir, files) = certificate(&ca, &role, day());
            let mut client = victim.client_with(files);
            let refused = victim.call(&mut client, method).await.unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{role} {method}");
        }
        assert_eq!(
            victim.refused(method, "permission_denied").await,
            2.0,
            "{method}"
        );
    }
    // The forged accept, complaints and erase changed nothing, and the tenant still sends.
    assert_eq!(victim.seen().await, before);
    victim
        .sender
        .clone()
        .send(authorized(
            &victim.key,
            message(FROM, "joe@example.com", "real-2"),
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_cell_certificate_is_presented_next_while_sends_go_on() {
    let victim = Victim::start().await;
    let addr = victim.endpoint.trim_start_matches("https://").to_owned();
    let first = pki::presented_certificate(&addr).await.unwrap();
    let sending = {
        let (sender, key) = (victim.sender.clone(), victim.key.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < 200 {
                let request = message(FROM, "jane@example.com", &format!("during-{sent}"));
                sender.clone().send(authorized(&key, request)).await?;
                sent += 1;
            }
            anyhow::Ok(sent)
        })
    };
    let role = Role::Cell(victim.cell.clone());
    victim
        .ca()
        .issue(&role, Duration::from_secs(24 * 3600))
        .unwrap();
    let rotated = until_ok(Duration::from_secs(10), || async {
        let presented = pki::presented_certificate(&addr).await?;
        anyhow::ensure!(
            presented != first,
            "the cell still presents its first certificate"
        );
        Ok(presented)
    })
    .await
    .unwrap();
    assert_eq!(Role::of_certificate(&rotated), Some(role));
    assert_eq!(sending.await.unwrap().unwrap(), 200, "every send succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_doors_serve_tls_with_a_certificate_and_nothing_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    // The doors' certificate, as an operator without cert-manager makes one.
    let ca_dir = dir.path().join("public-ca");
    let issued = std::process::Command::new(cellmail_tests::binary("cellmail").unwrap())
        .args(["certs", "issue", "--role", "router", "--name", "127.0.0.1"])
        .arg("--dir")
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    let setting = |name: &str| {
        String::from_utf8_lossy(&issued.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap()
    };
    let (cert, key, ca) = (
        setting("CELLMAIL_TLS_CERT"),
        setting("CELLMAIL_TLS_KEY"),
        setting("CELLMAIL_TLS_CA"),
    );
    let args = ["--public-tls-cert", &cert, "--public-tls-key", &key];
    let platform = Platform::start(&dir.path().join("data"), &args).unwrap();
    let https = |plain: &str| plain.replace("http://", "https://");
    let (control, router) = (https(&platform.control), https(&platform.router));

    // The CLI reaches both doors over TLS, trusting the doors' CA as told.
    let created = cellmail_tests::cellmail(
        &platform,
        &[
            "tenant",
            "create",
            TENANT,
            "--domain",
            "victim.example",
            "--control",
            &control,
            "--public-ca",
            &ca,
            "--json",
        ],
    );
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    let config = pki::anonymous();
    let endpoint = cellmail_proto::tls::endpoint(&router).unwrap();
    let sender = SenderClient::new(cellmail_proto::tls::channel_with(endpoint, move || {
        Ok(config.clone())
    }));
    cellmail_tests::until_router_serves(&sender, &api_key).await;
    let sent = cellmail_tests::cellmail(
        &platform,
        &[
            "send",
            "--router",
            &router,
            "--public-ca",
            &ca,
            "--api-key",
            &api_key,
            "--from",
            "shop@victim.example",
            "--to",
            "jane@example.com",
            "--subject",
            "Hi",
            "--text",
            "Hello",
            "--json",
        ],
    );
    assert!(sent["message_id"].as_str().is_some(), "{sent}");

    // It verifies the doors' certificate: without their CA, it refuses to talk.
    let unverified = std::process::Command::new(cellmail_tests::binary("cellmail").unwrap())
        .args(["tenant", "list", "--control", &control])
        .env("CELLMAIL_ADMIN_TOKEN", platform.admin_token().unwrap())
        .output()
        .unwrap();
    assert!(!unverified.status.success());
    let said = String::from_utf8_lossy(&unverified.stderr);
    assert!(said.contains("cannot reach the control"), "{said}");
    assert!(said.contains("invalid peer certificate"), "{said}");

    // The same doors in plaintext answer nothing.
    let mut plain = platform.sender().await.unwrap();
    let refused = plain
        .get_stats(authorized(&api_key, v1::GetStatsRequest { hours: 1 }))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_door_off_loopback_needs_a_certificate_or_plaintext_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let port = cellmail_tests::processes::free_port().unwrap();
    let any = format!("0.0.0.0:{port}");
    let data_dir = dir.path().to_string_lossy();
    let router = |extra: &[&str]| {
        let mut args = vec!["--router-addr", &any, "--data-dir", &data_dir];
        args.extend(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let refused = std::process::Command::new(cellmail_tests::binary("cellmail-router").unwrap())
        .args(router(&[]))
        .envs(pki::env(&Role::Router))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--public-tls-cert"), "{said}");
    assert!(said.contains("--insecure-plaintext"), "{said}");

    // Asked for, it serves plaintext there (a mesh or an ingress terminates TLS).
    let args = router(&["--insecure-plaintext"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let local = format!("127.0.0.1:{port}");
    let _router = cellmail_tests::processes::Daemon::start("cellmail-router", &args, Some(&local))
        .await
        .unwrap();
    let channel = Endpoint::from_shared(format!("http://{local}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, 1, "SERVING");
}
