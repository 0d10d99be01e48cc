//! The tracking host (`--tracking-addr`, plain HTTP behind the platform's public TLS
//! terminator): what the links in tenants' mail point at.
//!
//! - `GET /o/<token>`: a 1x1 transparent GIF (an open);
//! - `GET /c/<token>`: a redirect to the link's target (a click);
//! - `GET /u/<token>`: a small page with an unsubscribe button;
//! - `POST /u/<token>`: an RFC 8058 one-click unsubscribe (the page's button posts too).
//!
//! A token is verified with the platform's tracking keys ([`cellmail_registry::tracking`]),
//! so answering needs no lookup and no cell: a tampered one gets 400 and no redirect, and
//! the redirect, pixel or page is answered at once even when the tenant's cell is down. The
//! event goes to the tenant's cell in the background ([`Handoff`]), retried while the cell
//! cannot take it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use cellmail_proto::{TenantId, now_ms};
use cellmail_registry::catalog::WatchedCatalog;
use cellmail_registry::tracking::{Action, Link};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::SenderApi;
use crate::routes::Routes;

/// Where the tracking host listens, from flags or env.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct TrackingConfig {
    /// Address the tracking host (open pixels, tracked links, unsubscribe URLs) listens on;
    /// unset: none. Cells' `--tracking-base-url` is its public address.
    #[arg(long = "tracking-addr", env = "CELLMAIL_TRACKING_ADDR")]
    pub tracking_addr: Option<SocketAddr>,
}

/// A transparent 1x1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Events waiting for their cells, at most, and for one tenant's cell: past either, new ones
/// are dropped (and counted), so that one tenant's flood of clicks cannot crowd out the
/// others'.
const WAITING: usize = 100_000;
const WAITING_PER_TENANT: usize = 10_000;
/// The longest an event waits for its cell, retried with backoff meanwhile.
const PATIENCE: Duration = Duration::from_secs(3600);

/// Hands events to the tenants' cells in the background, retrying while a cell cannot take
/// them.
pub struct Handoff {
    sender: Arc<SenderApi>,
    waiting: Arc<Semaphore>,
    /// How many of each tenant's events wait.
    per_tenant: Arc<std::sync::Mutex<HashMap<TenantId, usize>>>,
}

impl Handoff {
    pub fn new(sender: Arc<SenderApi>) -> Self {
        Self {
            sender,
            waiting: Arc::new(Semaphore::new(WAITING)),
            per_tenant: Arc::default(),
        }
    }

    fn hand(&self, link: Link, at_ms: u64) {
        let tenant = link.tenant.clone();
        let admitted = {
            // Only whole updates happen under the lock.
            let mut waiting = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
            let count = waiting.entry(tenant.clone()).or_default();
            (*count < WAITING_PER_TENANT)
                .then(|| self.waiting.clone().try_acquire_owned().ok())
                .flatten()
                .inspect(|_| *count += 1)
        };
        let Some(permit) = admitted else {
            metrics::counter!("cellmail_tracking_events_dropped_total").increment(1);
            tracing::warn!(%tenant, "too many engagement events wait for their cells: one dropped");
            return;
        };
        let (sender, per_tenant) = (self.sender.clone(), self.per_tenant.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = Duration::from_millis(200);
            loop {
                match sender.engaged(&link, at_ms).await {
                    Ok(()) => break,
                    // Only a cell that cannot take it now is asked again: an unknown or
                    // offboarded tenant's link is not.
                    Err(status) if !transient(status.code()) || started.elapsed() > PATIENCE => {
                        tracing::warn!(%tenant, %status, "an engagement event was not taken by its cell; dropped");
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(%tenant, %status, "the cell cannot take an engagement event yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                    }
                }
            }
            let mut waiting = per_tenant.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = waiting.get_mut(&tenant) {
                *count -= 1;
                if *count == 0 {
                    waiting.remove(&tenant);
                }
            }
            drop(permit);
        });
    }
}

/// Whether a cell's answer says to try again later.
fn transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | DeadlineExceeded | Aborted | ResourceExhausted | Unknown
    )
}

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

const PAGE_STYLE: &str = "font-family:sans-serif;max-width:30em;margin:4em auto";

/// The answer to one request.
fn route(
    catalog: &WatchedCatalog<Routes>,
    handoff: &Handoff,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let bad = || {
        answer(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "this link is not valid",
        )
    };
    let Some((kind, token)) = path.trim_start_matches('/').split_once('/') else {
        return answer(StatusCode::NOT_FOUND, "text/plain", "not found");
    };
    let Some(link) = catalog.read().tracking.verify(token) else {
        return bad();
    };
    let now = now_ms();
    match (method, kind, &link.action) {
        (&Method::GET, "o", Action::Open) => {
            handoff.hand(link, now);
            let mut pixel = answer(StatusCode::OK, "image/gif", PIXEL);
            pixel.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            pixel
        }
        (&Method::GET, "c", Action::Click(target)) => {
            let Ok(location) = hyper::header::HeaderValue::from_str(&ascii(target)) else {
                return bad();
            };
            handoff.hand(link.clone(), now);
            let mut redirect = answer(StatusCode::FOUND, "text/plain", "");
            redirect
                .headers_mut()
                .insert(hyper::header::LOCATION, location);
            redirect
        }
        (&Method::GET, "u", Action::Unsubscribe) => answer(
            StatusCode::OK,
            "text/html; charset=utf-8",
            format!(
                r#"<!doctype html><title>Unsubscribe</title><body style="{PAGE_STYLE}"><p>Stop this sender's marketing mail to {}?</p><form method="post"><button type="submit">Unsubscribe</button></form></body>"#,
                html_escape(&link.recipient)
            ),
        ),
        (&Method::POST, "u", Action::Unsubscribe) => {
            handoff.hand(link, now);
            answer(
                StatusCode::OK,
                "text/html; charset=utf-8",
                format!(
                    r#"<!doctype html><title>Unsubscribed</title><body style="{PAGE_STYLE}"><p>You are unsubscribed.</p></body>"#
                ),
            )
        }
        _ => bad(),
    }
}

/// `url` with each byte past ASCII percent-encoded, as a Location header must carry it.
fn ascii(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for byte in url.bytes() {
        if byte.is_ascii() {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Serves the tracking host on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    catalog: Arc<WatchedCatalog<Routes>>,
    handoff: Arc<Handoff>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "accepting a tracking connection");
                    continue;
                }
            },
        };
        let (catalog, handoff) = (catalog.clone(), handoff.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = route(&catalog, &handoff, request.method(), request.uri().path());
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}
