//! Offboarding: a suspended tenant's data from every cell it was on goes to a file, then it is
//! deleted everywhere; nothing of another tenant is exported or touched.

use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::{Platform, authorized, get_message, message, until_ok};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offboarded_tenant_is_exported_from_every_cell_then_gone_and_its_neighbour_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (home, leaving) = platform
        .create_tenant("leaving", &["leaving.example"])
        .await
        .unwrap();
    let (_, staying) = platform
        .create_tenant("staying", &["staying.example"])
        .await
        .unwrap();
    let sender = platform.sender().await.unwrap();
    let send = |key: &str, request: v1::SendRequest| {
        let (sender, key) = (sender.clone(), key.to_owned());
        async move {
            until_ok(Duration::from_secs(10), || {
                let (mut sender, request) = (sender.clone(), authorized(&key, request.clone()));
                async move { sender.send(request).await }
            })
            .await
            .unwrap()
            .into_inner()
            .message_id
        }
    };
    let bounced = send(
        &leaving,
        message(
            "shop@leaving.example",
            "bounce@simulator.amazonses.com",
            "b",
        ),
    )
    .await;
    let first = send(
        &leaving,
        message("shop@leaving.example", "jane@example.com", "1"),
    )
    .await;
    let theirs = send(
        &staying,
        message("shop@staying.example", "jane@example.com", "s"),
    )
    .await;
    let other = if home == "cell-1" { "cell-2" } else { "cell-1" };
    let moved = platform.cli(&["tenant", "move", "leaving", "--to", other, "--wait"]);
    assert_eq!(moved["state"], "COMPLETE");
    let second = send(
        &leaving,
        message("shop@leaving.example", "joe@example.com", "2"),
    )
    .await;
    for id in [&first, &second, &theirs] {
        let key = if id == &theirs { &staying } else { &leaving };
        let sent = until_ok(Duration::from_secs(20), || async {
            match get_message(&sender, key, id).await {
                Ok(m) if m.state == "SENT" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert!(sent.is_ok(), "{id}: {sent:?}");
    }

    let export = dir.path().join("leaving.json");
    let done = platform.cli(&[
        "tenant",
        "offboard",
        "leaving",
        "--export",
        export.to_str().unwrap(),
        "--reason",
        "contract ended",
    ]);
    assert_eq!(done["erased_on"], serde_json::json!(["cell-1", "cell-2"]));
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    assert_eq!(exported["tenant"], "leaving");
    let ids: Vec<&str> = exported["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    for id in [&bounced, &first, &second] {
        assert!(ids.contains(&id.as_str()), "{id} in {ids:?}");
    }
    assert!(
        !ids.contains(&theirs.as_str()),
        "another tenant's message was exported"
    );
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "each message once, though both cells keep the moved ones"
    );
    let first_events = exported["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["message_id"] == first.as_str())
        .unwrap()["events"]
        .to_string();
    assert!(first_events.contains("SENT"), "{first_events}");
    let suppressed: Vec<&str> = exported["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert!(
        suppressed.contains(&"bounce@simulator.amazonses.com"),
        "{suppressed:?}"
    );
    let sent: u64 = exported["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sent"].as_u64().unwrap())
        .sum();
    assert_eq!(sent, 3, "figures from both cells");

    // Gone everywhere: its key stops working, it is no longer listed, the deletion is audited.
    let refused = until_ok(Duration::from_secs(10), || {
        let (mut sender, request) = (
            sender.clone(),
            authorized(
                &leaving,
                message("shop@leaving.example", "x@example.com", "3"),
            ),
        );
        async move {
            match sender.send(request).await {
                Err(status) if status.code() == Code::Unauthenticated => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "{refused:?}");
    let tenants = platform.cli(&["tenant", "list"]);
    let names: Vec<&str> = tenants
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["staying"]);
    let audit = platform.cli(&["audit", "--tenant", "leaving"]).to_string();
    assert!(
        audit.contains("tenant.offboard") && audit.contains("contract ended"),
        "{audit}"
    );
    let status = get_message(&sender, &staying, &theirs).await.unwrap();
    assert_eq!(status.state, "SENT", "the neighbour's data is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_refuses_an_active_or_unknown_tenant_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &[]).unwrap();
    let (_, key) = platform
        .create_tenant("active", &["active.example"])
        .await
        .unwrap();
    let mut control = platform.control().await.unwrap();
    let delete = |tenant: &str| v1::DeleteTenantRequest {
        tenant_id: tenant.to_owned(),
        reason: String::new(),
    };
    let status = control.delete_tenant(delete("active")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = control.delete_tenant(delete("nobody")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = control.delete_tenant(delete("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let request = v1::TenantDataRequest {
        tenant_id: "active".into(),
    };
    let status = control.export_tenant_data(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // An export file that exists already is refused before anything changes.
    let taken = dir.path().join("taken.json");
    std::fs::write(&taken, "keep me").unwrap();
    let output = std::process::Command::new(cellmail_tests::binary("cellmail").unwrap())
        .args([
            "tenant",
            "offboard",
            "active",
            "--export",
            taken.to_str().unwrap(),
        ])
        .args(["--control", platform.control.trim_start_matches("http://")])
        .env("CELLMAIL_ADMIN_TOKEN", platform.admin_token().unwrap())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--export"));
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "keep me");
    let sender = platform.sender().await.unwrap();
    let sent = until_ok(Duration::from_secs(10), || {
        let (mut sender, request) = (
            sender.clone(),
            authorized(&key, message("shop@active.example", "x@example.com", "")),
        );
        async move { sender.send(request).await }
    })
    .await;
    assert!(sent.is_ok(), "the tenant still sends: {sent:?}");
}
