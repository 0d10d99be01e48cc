//! The operator's and developer's entry points: the `cellmail` CLI against `cellmail up`,
//! and the health and reflection services every front door serves.

use std::process::Command;

use cellmail_tests::{Platform, binary, wait_for};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

fn cellmail(args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("cellmail").unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cellmail {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "cellmail {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_and_lists_tenants_and_cells_and_sends() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "3"]).unwrap();
    let control = platform.control.trim_start_matches("http://");
    let created = cellmail(&[
        "tenant",
        "create",
        "acme",
        "--domain",
        "acme.example",
        "--control",
        control,
        "--json",
    ]);
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
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("id:"),
        "the error names the field"
    );

    let tenants = cellmail(&["tenant", "list", "--control", control, "--json"]);
    assert_eq!(tenants.as_array().unwrap().len(), 1);
    assert_eq!(tenants[0]["domains"][0], "acme.example");
    let cells = cellmail(&["cell", "list", "--control", control, "--json"]);
    let cells = cells.as_array().unwrap();
    assert_eq!(cells.len(), 3);
    assert!(
        cells
            .iter()
            .all(|c| c["alive"] == true && c["state"] == "ACTIVE")
    );
    assert_eq!(
        cells
            .iter()
            .map(|c| c["tenants"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );

    let router = platform.router.trim_start_matches("http://");
    let sent = cellmail(&[
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
    ]);
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

    let issued = cellmail(&["key", "issue", "acme", "--control", control, "--json"]);
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
