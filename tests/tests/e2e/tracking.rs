//! Engagement end to end on `cellmail up`: marketing mail carries an RFC 8058 one-click
//! unsubscribe, a tracked class's html its links rewritten and an open pixel; the router's
//! tracking host answers them from the token alone (a tampered one gets 400 and no
//! redirect), and the tenant gets the opens, clicks and unsubscribes as events. The
//! unsubscribe suppresses the address for that tenant only.

use std::time::Duration;

use cellmail_proto::v1;
use cellmail_tests::{Platform, authorized, http, message, until_ok};
use tonic_types::StatusExt;

/// The header `name` of the .eml at `path`, unfolded.
fn header(eml: &[u8], name: &str) -> Option<String> {
    let parsed = mail_parser::MessageParser::default().parse(eml)?;
    let raw = parsed.header_raw(name)?;
    Some(raw.replace(['\r', '\n'], "").trim().to_owned())
}

/// Creates tenant `id` (sending from `<id>.example`) tracking `class`: its API key.
async fn tracked_tenant(control: &mut cellmail_tests::Control, id: &str, class: &str) -> String {
    let create = v1::CreateTenantRequest {
        id: id.into(),
        domains: vec![format!("{id}.example")],
        policy: Some(v1::TenantPolicy {
            tracked_classes: vec![class.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = control.create_tenant(create).await.unwrap();
    created.into_inner().api_key
}

/// `url`'s authority and path.
fn split(url: &str) -> (String, String) {
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_once('/').unwrap();
    (authority.to_owned(), format!("/{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_clicks_and_one_click_unsubscribes_come_back_for_their_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(dir.path(), &["--cells", "1"]).unwrap();
    let mut control = platform.control().await.unwrap();
    let key = tracked_tenant(&mut control, "trk", "marketing").await;
    let (_, other) = platform
        .create_tenant("trk-other", &["other.example"])
        .await
        .unwrap();
    let sender = platform.sender().await.unwrap();
    cellmail_tests::until_router_serves(&sender, &key).await;
    let marketing = |to: &str, idempotency_key: &str| {
        let mut request = message("news@trk.example", to, idempotency_key);
        request.message_class = v1::MessageClass::Marketing as i32;
        request.html =
            r#"<html><body><a href="https://shop.example/sale?a=1&amp;b=2">Sale</a></body></html>"#
                .into();
        request
    };
    let sent = (sender.clone())
        .send(authorized(&key, marketing("jo@example.com", "m-1")))
        .await
        .unwrap()
        .into_inner();
    (sender.clone())
        .send(authorized(
            &key,
            message("news@trk.example", "al@example.com", "t-1"),
        ))
        .await
        .unwrap();
    let files = until_ok(Duration::from_secs(20), || async {
        let files = platform.mail_of("trk");
        anyhow::ensure!(files.len() == 2, "{files:?}");
        Ok(files)
    })
    .await
    .unwrap();
    let emls: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let (eml, transactional) = match header(&emls[0], "List-Unsubscribe") {
        Some(_) => (&emls[0], &emls[1]),
        None => (&emls[1], &emls[0]),
    };
    assert_eq!(
        header(transactional, "List-Unsubscribe"),
        None,
        "transactional: not asked"
    );

    // One-click unsubscribe, and the html's link and pixel, all on the tracking host.
    let unsubscribe = header(eml, "List-Unsubscribe").unwrap();
    assert_eq!(
        header(eml, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    let unsubscribe = unsubscribe.trim_start_matches('<').trim_end_matches('>');
    assert!(
        unsubscribe.starts_with(&format!("{}/u/", platform.tracking)),
        "{unsubscribe}"
    );
    let parsed = mail_parser::MessageParser::default().parse(eml).unwrap();
    let html = parsed.body_html(0).unwrap().into_owned();
    assert!(!html.contains("shop.example"), "{html}");
    let link = |kind: &str| {
        let start = html
            .find(&format!("{}/{kind}/", platform.tracking))
            .unwrap();
        html[start..].split('"').next().unwrap().to_owned()
    };
    let (click, pixel) = (link("c"), link("o"));

    // The click redirects to its target; a tampered token gets 400 and no redirect.
    let (authority, path) = split(&click);
    let (head, _) = http(&authority, "GET", &path).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 302"), "{head}");
    assert!(
        head.contains("location: https://shop.example/sale?a=1&b=2"),
        "{head}"
    );
    let tampered = format!("{}x", &path[..path.len() - 1]);
    let (head, _) = http(&authority, "GET", &tampered).await.unwrap();
    assert!(
        head.starts_with("HTTP/1.1 400") && !head.contains("location"),
        "{head}"
    );
    let (head, _) = http(&authority, "GET", &split(&pixel).1).await.unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("image/gif"),
        "{head}"
    );

    // The unsubscribe page asks; the one-click POST (as the header's own URL) unsubscribes.
    let (_, unsubscribe_path) = split(unsubscribe);
    let (head, page) = http(&authority, "GET", &unsubscribe_path).await.unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && page.contains("jo@example.com"),
        "{page}"
    );
    let (head, _) = http(&authority, "POST", &unsubscribe_path).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The tenant gets them as events, and the address is on its list for unsubscribing.
    let events = until_ok(Duration::from_secs(10), || async {
        let events = crate::events::all_events(&sender, &key, Default::default()).await;
        let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
        for wanted in ["opened", "clicked", "unsubscribed"] {
            anyhow::ensure!(types.contains(&wanted), "{types:?}");
        }
        Ok(events)
    })
    .await
    .unwrap();
    let clicked = events.iter().find(|e| e.r#type == "clicked").unwrap();
    assert_eq!(clicked.detail, "https://shop.example/sale?a=1&b=2");
    assert_eq!(
        (clicked.message_id.as_str(), clicked.recipient.as_str()),
        (sent.message_id.as_str(), "jo@example.com")
    );
    let again = (sender.clone())
        .send(authorized(&key, marketing("jo@example.com", "m-2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.recipients[0].state,
        v1::RecipientState::Suppressed as i32
    );
    let listed = (sender.clone())
        .list_suppressions(authorized(&key, v1::ListSuppressionsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .suppressions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason, v1::SuppressionReason::Unsubscribe as i32);

    // Its stats count them; another tenant still reaches the address.
    let stats = (sender.clone())
        .get_stats(authorized(&key, v1::GetStatsRequest { hours: 1 }))
        .await
        .unwrap()
        .into_inner();
    let counted = stats
        .classes
        .iter()
        .find(|c| c.message_class == v1::MessageClass::Marketing as i32)
        .unwrap();
    assert_eq!(
        (counted.opened, counted.clicked, counted.unsubscribed),
        (1, 1, 1)
    );
    let theirs = (sender.clone())
        .send(authorized(
            &other,
            message("x@other.example", "jo@example.com", "o-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        theirs.recipients[0].state,
        v1::RecipientState::Accepted as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_is_answered_while_its_cell_is_down_and_counted_once_it_is_back() {
    use crate::processes::ADMIN_TOKEN;
    use cellmail_tests::processes::{Front, free_addr, registry_args, start_cell};
    use cellmail_tests::services::{etcd_endpoint, unique_prefix};
    let registry = registry_args(&etcd_endpoint(), &unique_prefix("tracking"));
    let dir = tempfile::tempdir().unwrap();
    let tracking = free_addr().unwrap();
    let base = format!("http://{tracking}");
    let cell_args = ["--tracking-base-url", base.as_str()];
    let mut cell = start_cell("cell-t", &registry, dir.path(), &cell_args)
        .await
        .unwrap();
    let router_env = [("CELLMAIL_TRACKING_ADDR", tracking.as_str())];
    let front = Front::start_with_env(&registry, ADMIN_TOKEN, &[], &router_env)
        .await
        .unwrap();
    let mut control =
        cellmail_tests::control_client(&format!("http://{}", front.control), ADMIN_TOKEN)
            .await
            .unwrap();
    cellmail_tests::cells_until(&control, |c| c.alive, 1).await;
    let key = tracked_tenant(&mut control, "clk", "transactional").await;
    let sender = v1::sender_client::SenderClient::connect(format!("http://{}", front.router))
        .await
        .unwrap();
    cellmail_tests::until_router_serves(&sender, &key).await;

    // Webhooks may not reach loopback, private, link-local or metadata addresses by default.
    for url in [
        "http://127.0.0.1:9/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
    ] {
        let create = v1::CreateWebhookRequest {
            url: url.into(),
            ..Default::default()
        };
        let refused = (sender.clone())
            .create_webhook(authorized(&key, create))
            .await
            .unwrap_err();
        let violation = &refused.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "url", "{url}");
    }

    let mut request = message("news@clk.example", "jo@example.com", "c-1");
    request.html = r#"<p><a href="https://shop.example/">Shop</a></p>"#.into();
    (sender.clone())
        .send(authorized(&key, request))
        .await
        .unwrap();
    let mail = dir.path().join("mail").join("clk");
    let html = until_ok(Duration::from_secs(20), || async {
        let file = std::fs::read_dir(&mail)?
            .next()
            .ok_or(anyhow::anyhow!("no mail yet"))??;
        let eml = std::fs::read(file.path())?;
        let parsed = mail_parser::MessageParser::default().parse(&eml).unwrap();
        Ok::<_, anyhow::Error>(parsed.body_html(0).unwrap().into_owned())
    })
    .await
    .unwrap();
    let start = html.find(&format!("{base}/c/")).unwrap();
    let click = html[start..].split('"').next().unwrap().to_owned();

    // The cell is killed: the click is still answered at once.
    cell.kill();
    let (authority, path) = split(&click);
    let (head, _) = http(&authority, "GET", &path).await.unwrap();
    assert!(
        head.starts_with("HTTP/1.1 302") && head.contains("location: https://shop.example/"),
        "{head}"
    );

    // Back up, the cell gets the click.
    let _cell = start_cell("cell-t", &registry, dir.path(), &cell_args)
        .await
        .unwrap();
    until_ok(Duration::from_secs(30), || async {
        let request = v1::ListEventsRequest {
            types: vec!["clicked".into()],
            ..Default::default()
        };
        let listed = (sender.clone())
            .list_events(authorized(&key, request))
            .await?;
        anyhow::ensure!(!listed.into_inner().events.is_empty(), "no click yet");
        Ok(())
    })
    .await
    .unwrap();
}
