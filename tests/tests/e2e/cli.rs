//! The operator's and developer's entry points: the `cellmail` CLI against `cellmail up`,
//! and the health and reflection services every front door serves.

use std::process::Command;
use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::{
    Platform, authorized, binary, cellmail, cellmail_with, get_message, message, wait_for,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_and_lists_tenants_and_cells_and_sends() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "3"]).unwrap();
    let control = platform.control.trim_start_matches("http://");
    let created = cellmail(
        &platform,
        &[
            "tenant",
            "create",
            "acme",
            "--domain",
            "acme.example",
            "--control",
            control,
            "--json",
        ],
    );
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["cell"], "cell-1");
    let key = created["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("cm_"));

    let bad = Command::new(binary("cellmail").unwrap())
        .args([
            "tenant",
            "create",
            "Not_Valid",
            "--domain",
            "x.example",
            "--control",
            control,
        ])
        .env("CELLMAIL_ADMIN_TOKEN", platform.admin_token().unwrap())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("id:"),
        "the error names the field"
    );

    let tenants = cellmail(
        &platform,
        &["tenant", "list", "--control", control, "--json"],
    );
    assert_eq!(tenants.as_array().unwrap().len(), 1);
    assert_eq!(tenants[0]["domains"][0], "acme.example");
    // Piped into a reader that is gone (`| head -0`), the CLI ends quietly, as command-line
    // tools do, instead of panicking on the write.
    let mut piped = Command::new(binary("cellmail").unwrap())
        .args(["cell", "list", "--control", control])
        .env("CELLMAIL_ADMIN_TOKEN", platform.admin_token().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let closed = piped.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            closed.status.success() || closed.status.signal() == Some(13),
            "ended by SIGPIPE or cleanly: {:?}",
            closed.status
        );
    }

    let cells = cellmail(&platform, &["cell", "list", "--control", control, "--json"]);
    let cells = cells.as_array().unwrap();
    assert_eq!(cells.len(), 3);
    assert!(
        cells
            .iter()
            .all(|c| c["alive"] == true && c["state"] == "ACTIVE")
    );
    // Each cell runs this build: its release and the commit it was built from.
    assert!(cellmail_proto::VERSION.starts_with(concat!(env!("CARGO_PKG_VERSION"), "+")));
    assert!(
        cells
            .iter()
            .all(|c| c["version"] == cellmail_proto::VERSION),
        "{cells:?}"
    );
    let version = std::process::Command::new(cellmail_tests::binary("cellmail-cell").unwrap())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("cellmail-cell {}", cellmail_proto::VERSION)
    );
    assert_eq!(
        cells
            .iter()
            .map(|c| c["tenants"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );

    let router = platform.router.trim_start_matches("http://");
    let sent = cellmail(
        &platform,
        &[
            "send",
            "--router",
            router,
            "--api-key",
            &key,
            "--from",
            "shop@acme.example",
            "--to",
            "jane@example.com",
            "--subject",
            "Hi",
            "--text",
            "Hello",
            "--tag",
            "kind=test",
            "--json",
        ],
    );
    let id = sent["message_id"].as_str().unwrap().to_owned();
    assert_eq!(sent["recipients"][0]["state"], "RECIPIENT_STATE_ACCEPTED");
    let file = wait_for(
        std::time::Duration::from_secs(20),
        "the sent message",
        || {
            platform
                .mail_of("acme")
                .into_iter()
                .find(|f| f.ends_with(format!("{id}.eml")))
        },
    )
    .await
    .unwrap();
    assert!(
        std::fs::read_to_string(file)
            .unwrap()
            .contains("X-Cellmail-Tag-kind: test")
    );

    let issued = cellmail(
        &platform,
        &["key", "issue", "acme", "--control", control, "--json"],
    );
    assert_ne!(issued["api_key"].as_str().unwrap(), key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_control_plane_serve_health_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    for (endpoint, service) in [
        (&platform.router, "cellmail.v1.Sender"),
        (&platform.control, "cellmail.v1.Control"),
    ] {
        let channel = tonic::transport::Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service}");
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await;
        assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("no service list")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&service), "{service} not in {names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_needs_the_admin_token_and_a_tenant_key_never_works_there() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, tenant_key) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    let list = || cellmail_proto::v1::ListTenantsRequest {};
    let mut anonymous =
        cellmail_proto::v1::control_client::ControlClient::connect(platform.control.clone())
            .await
            .unwrap();
    assert_eq!(
        anonymous.list_tenants(list()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut as_tenant = cellmail_tests::control_client(&platform.control, &tenant_key)
        .await
        .unwrap();
    assert_eq!(
        as_tenant.list_tenants(list()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut operator = platform.control().await.unwrap();
    assert_eq!(
        operator
            .list_tenants(list())
            .await
            .unwrap()
            .into_inner()
            .tenants
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_and_the_tenants_other_keys_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let control = platform.control.trim_start_matches("http://").to_owned();
    let created = cellmail(
        &platform,
        &[
            "tenant",
            "create",
            "acme",
            "--domain",
            "acme.example",
            "--control",
            &control,
            "--json",
        ],
    );
    let (first_key, first_id) = (
        created["api_key"].as_str().unwrap().to_owned(),
        created["key_id"].as_str().unwrap().to_owned(),
    );
    let second = cellmail(
        &platform,
        &["key", "issue", "acme", "--control", &control, "--json"],
    );
    let second_key = second["api_key"].as_str().unwrap().to_owned();
    let listed = cellmail(
        &platform,
        &["key", "list", "acme", "--control", &control, "--json"],
    );
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        !listed.to_string().contains(&first_key),
        "listing never shows a key"
    );

    cellmail(
        &platform,
        &[
            "key",
            "revoke",
            "acme",
            &first_id,
            "--control",
            &control,
            "--json",
        ],
    );
    let mut sender = platform.sender().await.unwrap();
    let send = |key: &str| {
        cellmail_tests::authorized(
            key,
            cellmail_tests::message("a@acme.example", "j@example.com", ""),
        )
    };
    let mut code = tonic::Code::Ok;
    for _ in 0..100 {
        code = sender
            .send(send(&first_key))
            .await
            .err()
            .map_or(tonic::Code::Ok, |s| s.code());
        if code == tonic::Code::Unauthenticated {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(sender.send(send(&second_key)).await.is_ok());
    // The key that sent shows when it was last used (the router writes it within a second
    // or two of its first use); a key never used shows 0.
    let unused = cellmail(
        &platform,
        &["key", "issue", "acme", "--control", &control, "--json"],
    );
    let list = || {
        cellmail(
            &platform,
            &["key", "list", "acme", "--control", &control, "--json"],
        )
    };
    let listed = wait_for(Duration::from_secs(5), "the key's last use", || {
        let listed = list();
        let used = listed.as_array()?.iter().any(|k| {
            k["key_id"] == second["key_id"] && k["last_used_ms"].as_i64().unwrap_or(0) > 0
        });
        used.then_some(listed)
    })
    .await
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let never = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == unused["key_id"])
        .unwrap();
    assert_eq!(never["last_used_ms"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_suppression_applies_to_every_tenant_until_removed() {
    use cellmail_proto::v1::{RecipientState, SuppressionScope};
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, a) = platform.create_tenant("ta", &["a.example"]).await.unwrap();
    let (_, b) = platform.create_tenant("tb", &["b.example"]).await.unwrap();
    let control = platform.control.trim_start_matches("http://").to_owned();
    cellmail(
        &platform,
        &[
            "suppression",
            "add",
            "Trap@Example.com",
            "--kind",
            "complaint",
            "--control",
            &control,
            "--json",
        ],
    );
    let listed = cellmail(
        &platform,
        &["suppression", "list", "--control", &control, "--json"],
    );
    assert_eq!(listed[0]["address"], "Trap@Example.com");
    let bad = Command::new(binary("cellmail").unwrap())
        .args([
            "suppression",
            "add",
            "not-an-address",
            "--control",
            &control,
        ])
        .env("CELLMAIL_ADMIN_TOKEN", platform.admin_token().unwrap())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("address:"));

    let mut sender = platform.sender().await.unwrap();
    for (key, from) in [(&a, "x@a.example"), (&b, "x@b.example")] {
        let mut suppressed = None;
        for _ in 0..100 {
            let sent = sender
                .send(cellmail_tests::authorized(
                    key,
                    cellmail_tests::message(from, "trap@example.com", ""),
                ))
                .await
                .unwrap();
            let recipient = sent.into_inner().recipients.remove(0);
            if recipient.state == RecipientState::Suppressed as i32 {
                suppressed = Some(recipient);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let recipient = suppressed.expect("the global entry reached the cell");
        assert_eq!(recipient.scope, SuppressionScope::Global as i32);
        assert!(
            recipient.reason.contains("complaint"),
            "{}",
            recipient.reason
        );
    }
    cellmail(
        &platform,
        &[
            "suppression",
            "remove",
            "trap@example.com",
            "--control",
            &control,
            "--json",
        ],
    );
    let mut accepted = false;
    for _ in 0..100 {
        let sent = sender
            .send(cellmail_tests::authorized(
                &a,
                cellmail_tests::message("x@a.example", "trap@example.com", ""),
            ))
            .await
            .unwrap();
        if sent.into_inner().recipients[0].state == RecipientState::Accepted as i32 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(accepted, "removing the global entry lets mail through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_and_disabled_cells_get_no_new_tenants_and_every_change_is_audited() {
    use cellmail_proto::v1;
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "2"]).unwrap();
    let drained = platform.cli(&["cell", "drain", "cell-1", "--reason", "maintenance"]);
    assert_eq!(drained["state"], "DRAINING");
    for n in 0..3 {
        let (cell, _) = platform
            .create_tenant(&format!("t{n}"), &["t.example"])
            .await
            .unwrap();
        assert_eq!(cell, "cell-2", "a draining cell got a new tenant");
    }
    platform.cli(&["cell", "disable", "cell-2"]);
    let mut admin = platform.control().await.unwrap();
    let nowhere = admin
        .create_tenant(v1::CreateTenantRequest {
            id: "late".into(),
            domains: vec!["late.example".into()],
            tier: String::new(),
            policy: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), tonic::Code::Unavailable, "{nowhere:?}");
    platform.cli(&["cell", "enable", "cell-1"]);
    let (cell, _) = platform
        .create_tenant("late", &["late.example"])
        .await
        .unwrap();
    assert_eq!(cell, "cell-1");

    // Pinned placements: only the named cell, and only while it takes tenants.
    let pinned = platform.cli(&[
        "tenant",
        "create",
        "pin",
        "--domain",
        "pin.example",
        "--cell",
        "cell-1",
    ]);
    assert_eq!(pinned["cell"], "cell-1");
    let to_disabled = admin
        .create_tenant(v1::CreateTenantRequest {
            id: "pin2".into(),
            domains: vec!["pin2.example".into()],
            cell: "cell-2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(to_disabled.code(), tonic::Code::Unavailable);
    let unlabelled = admin
        .create_tenant(v1::CreateTenantRequest {
            id: "eu".into(),
            domains: vec!["eu.example".into()],
            labels: [("region".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(unlabelled.message().contains("region"), "{unlabelled:?}");

    let added = platform.cli(&[
        "cell",
        "add",
        "cell-9",
        "--capacity",
        "5",
        "--label",
        "region=eu",
    ]);
    assert_eq!(added["state"], "ACTIVE");
    assert_eq!(added["alive"], false, "registered ahead of its process");
    assert_eq!(added["capacity"], 5);
    let again = admin
        .add_cell(v1::AddCellRequest {
            id: "cell-9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
    let bad = admin
        .set_cell_state(v1::SetCellStateRequest {
            cell_id: "cell-1".into(),
            state: "BROKEN".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "state"
    );
    let unknown = admin
        .set_cell_state(v1::SetCellStateRequest {
            cell_id: "cell-7".into(),
            state: "DRAINING".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let audit = platform.cli(&["audit"]);
    let entries = audit.as_array().unwrap();
    let drain = entries
        .iter()
        .find(|e| e["action"] == "cell.state cell-1" && e["after"]["state"] == "DRAINING")
        .unwrap_or_else(|| panic!("no drain in {audit}"));
    assert_eq!(drain["reason"], "maintenance");
    assert_eq!(drain["before"]["state"], "ACTIVE");
    assert!(entries.iter().any(|e| e["action"] == "cell.add cell-9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_creation_keys_and_global_suppressions_are_audited_with_who_and_why_but_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let token = platform.admin_token().unwrap();
    let control = platform.control.trim_start_matches("http://").to_owned();
    let auditor = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--control", &control, "--json"]);
        cellmail_with(
            &[("CELLMAIL_ADMIN_TOKEN", &token), ("USER", "auditor")],
            &all,
        )
    };
    let created = auditor(&[
        "tenant",
        "create",
        "acme",
        "--domain",
        "acme.example",
        "--reason",
        "signed up",
    ]);
    let issued = auditor(&["key", "issue", "acme", "--reason", "second app"]);
    let (first_id, second_id) = (&created["key_id"], &issued["key_id"]);
    let revoke = ["key", "revoke", "acme", issued["key_id"].as_str().unwrap()];
    auditor(&[&revoke[..], &["--reason", "leaked"]].concat());
    auditor(&[
        "suppression",
        "add",
        "trap@example.com",
        "--kind",
        "complaint",
        "--reason",
        "abuse report",
    ]);
    let removed = ["suppression", "remove", "trap@example.com", "--reason"];
    assert_eq!(
        auditor(&[&removed[..], &["resolved"]].concat())["removed"],
        true
    );
    // Removing what is not there changes nothing, so it records nothing.
    assert_eq!(
        auditor(&[&removed[..], &["again"]].concat())["removed"],
        false
    );

    let of_acme = auditor(&["audit", "--tenant", "acme"]);
    let everything = auditor(&["audit"]);
    let only = |trail: &serde_json::Value, action: &str| {
        let found: Vec<_> = trail
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "one {action} in {trail}");
        assert_eq!(found[0]["actor"], "bootstrap", "{action}");
        found.into_iter().next().unwrap()
    };
    let create = only(&of_acme, "tenant.create");
    assert_eq!(create["tenant"], "acme");
    assert_eq!(create["reason"], "signed up");
    assert!(create["before"].is_null());
    assert!(
        create["after"]
            .to_string()
            .contains(first_id.as_str().unwrap())
    );
    let issue = only(&of_acme, "key.issue");
    assert_eq!(issue["reason"], "second app");
    assert_eq!(issue["after"]["key_id"], *second_id);
    let revoked = only(&of_acme, "key.revoke");
    assert_eq!(revoked["reason"], "leaked");
    assert_eq!(revoked["before"]["key_id"], *second_id);
    assert!(revoked["after"].is_null());
    let add = only(&everything, "suppression.add");
    assert_eq!(add["reason"], "abuse report");
    assert_eq!(add["after"]["address"], "trap@example.com");
    assert_eq!(add["after"]["reason"], "complaint");
    let remove = only(&everything, "suppression.remove");
    assert_eq!(remove["reason"], "resolved");
    assert_eq!(remove["before"]["address"], "trap@example.com");
    assert!(remove["after"].is_null());

    // Neither key, its secret part nor its stored hash is anywhere in the trail.
    let trail = everything.to_string();
    for key in [&created["api_key"], &issued["api_key"]] {
        let key = key.as_str().unwrap();
        let secret = key.rsplit('_').next().unwrap();
        let hash = cellmail_registry::apikey::hash(key);
        for text in [key, secret, &hash] {
            assert!(!trail.contains(text), "{text} is in the audit trail");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_the_credential_from_the_data_dir_up_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let control = platform.control.trim_start_matches("http://");
    let data_dir = dir.path().to_string_lossy();
    let run = |extra: &[&str]| {
        Command::new(binary("cellmail").unwrap())
            .args(["tenant", "list", "--json", "--control", control])
            .args(extra)
            .env_remove("CELLMAIL_ADMIN_TOKEN")
            .env_remove("CELLMAIL_DATA_DIR")
            .current_dir(elsewhere.path())
            .output()
            .unwrap()
    };
    let found = run(&["--data-dir", &data_dir]);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert!(listed.is_array(), "{listed}");
    // Run from elsewhere without it, the CLI says where it looked and how to point it.
    let missing = run(&[]);
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("--data-dir"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_does_only_what_its_scopes_allow_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, full) = platform
        .create_tenant("acme", &["acme.example"])
        .await
        .unwrap();
    let issue = |scopes: &[&str], expires: Option<&str>| {
        let mut args = vec!["key", "issue", "acme"];
        for scope in scopes {
            args.extend(["--scope", scope]);
        }
        args.extend(expires.map(|at| ["--expires", at]).into_iter().flatten());
        platform.cli(&args)["api_key"].as_str().unwrap().to_owned()
    };
    let send_only = issue(&["send"], None);
    let readers = issue(&["read", "suppressions"], None);
    let mut sender = platform.sender().await.unwrap();
    cellmail_tests::until_router_serves(&sender, &full).await;

    let sent = sender
        .send(authorized(
            &send_only,
            message("a@acme.example", "j@example.com", "s-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = get_message(&sender, &send_only, &sent.message_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("`read`"),
        "{}",
        refused.message()
    );
    let stats = sender
        .get_stats(authorized(&send_only, v1::GetStatsRequest { hours: 1 }))
        .await
        .unwrap_err();
    assert_eq!(stats.code(), tonic::Code::PermissionDenied);
    let events = sender
        .list_events(authorized(&send_only, v1::ListEventsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(events.code(), tonic::Code::PermissionDenied);
    let add = v1::AddSuppressionRequest {
        address: "x@example.com".into(),
        reason: 0,
    };
    let refused = sender
        .add_suppression(authorized(&send_only, add.clone()))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("`suppressions`"),
        "{}",
        refused.message()
    );

    // The reading key reads what the sending key sent, and may not send.
    assert!(
        get_message(&sender, &readers, &sent.message_id)
            .await
            .is_ok()
    );
    let listed = sender
        .list_events(authorized(&readers, v1::ListEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .events
            .iter()
            .any(|e| e.message_id == sent.message_id)
    );
    sender
        .add_suppression(authorized(&readers, add))
        .await
        .unwrap();
    let refused = sender
        .send(authorized(
            &readers,
            message("a@acme.example", "j@example.com", "s-2"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("`send`"),
        "{}",
        refused.message()
    );

    // A scope that does not exist, or an expiry in the past, is refused naming the field.
    let bad = cellmail_tests::control_client(&platform.control, &platform.admin_token().unwrap())
        .await
        .unwrap()
        .issue_api_key(v1::IssueApiKeyRequest {
            tenant_id: "acme".into(),
            scopes: vec!["send".into(), "admin".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("scopes[1]:"), "{}", bad.message());
    let past = cellmail_tests::control_client(&platform.control, &platform.admin_token().unwrap())
        .await
        .unwrap()
        .issue_api_key(v1::IssueApiKeyRequest {
            tenant_id: "acme".into(),
            expires_at_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        past.message().starts_with("expires_at_ms:"),
        "{}",
        past.message()
    );

    // A key past its expiry is refused as unknown keys are.
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    let expiring = issue(&[], Some(&soon.to_string()));
    // Unknown until the router sees it, then answered, then refused as expired.
    let expired = cellmail_tests::until_ok(Duration::from_secs(10), || {
        let mut sender = sender.clone();
        let request = authorized(&expiring, v1::GetStatsRequest { hours: 1 });
        async move {
            match sender.get_stats(request).await {
                Err(status)
                    if status.code() == tonic::Code::Unauthenticated
                        && status.message().contains("expired") =>
                {
                    Ok(status)
                }
                other => Err(format!("not refused as expired yet: {other:?}")),
            }
        }
    })
    .await;
    assert!(expired.is_ok(), "{expired:?}");
    let listed = platform.cli(&["key", "list", "acme"]);
    let scopes: Vec<&serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["scopes"])
        .collect();
    assert!(scopes.contains(&&serde_json::json!(["send"])), "{listed}");
    assert!(
        scopes.contains(&&serde_json::json!(["read", "suppressions"])),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_and_changes_nothing_and_each_action_names_its_operator() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let add = |name: &str, role: &str| {
        let added = platform.cli(&["operator", "add", name, "--role", role]);
        assert_eq!(added["role"], role);
        added["credential"].as_str().unwrap().to_owned()
    };
    let (alice, victor) = (add("alice", "admin"), add("victor", "viewer"));
    let connect = |credential: String| {
        let endpoint = platform.control.clone();
        async move {
            cellmail_tests::control_client(&endpoint, &credential)
                .await
                .unwrap()
        }
    };
    let mut as_alice = connect(alice).await;
    let mut as_victor = connect(victor.clone()).await;

    let created = as_alice
        .create_tenant(v1::CreateTenantRequest {
            id: "acme".into(),
            domains: vec!["acme.example".into()],
            reason: "signed up".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(created.into_inner().tenant.is_some());

    // The viewer reads everything...
    let tenants = as_victor
        .list_tenants(v1::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(tenants.len(), 1);
    let trail = as_victor
        .list_audit(v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    // ...and sees each action under the name of the operator who took it.
    let actors: Vec<(&str, &str)> = trail
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert!(
        actors.contains(&("operator.add", "bootstrap")),
        "{actors:?}"
    );
    assert!(actors.contains(&("tenant.create", "alice")), "{actors:?}");

    // ...and changes nothing.
    let refused = as_victor
        .suspend_tenant(v1::SuspendTenantRequest {
            tenant_id: "acme".into(),
            reason: "viewer".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("victor"),
        "{}",
        refused.message()
    );
    let refused = as_victor
        .add_operator(v1::AddOperatorRequest {
            name: "mallory".into(),
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let tenants = as_victor
        .list_tenants(v1::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(tenants[0].status, "ACTIVE");
    let names: Vec<String> = as_victor
        .list_operators(v1::ListOperatorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operators
        .into_iter()
        .map(|o| format!("{}:{}", o.name, o.role))
        .collect();
    assert_eq!(names, ["alice:admin", "bootstrap:admin", "victor:viewer"]);

    // A bad name or role is refused naming the field; a revoked credential no longer works.
    let bad = as_alice
        .add_operator(v1::AddOperatorRequest {
            name: "Bad Name".into(),
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("name:"), "{}", bad.message());
    let bad = as_alice
        .add_operator(v1::AddOperatorRequest {
            name: "root".into(),
            role: "root".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("role:"), "{}", bad.message());
    platform.cli(&["operator", "revoke", "victor"]);
    let revoked = as_victor
        .list_tenants(v1::ListTenantsRequest {})
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), tonic::Code::Unauthenticated);
}
