//! Delivering a tenant's events to its webhook endpoints: each event its endpoints want is
//! queued in the store's outbox as it is logged ([`crate::store`]), and the [`Dispatcher`]
//! posts what is due, signed per the Standard Webhooks spec ([`sign`]), at least once:
//! a failed attempt is tried again on [`WebhookConfig::retry_secs`]' schedule (by default
//! 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h after the one before: about 28 hours), and
//! after the last one the endpoint is marked failing and the operator is told (an ERROR log
//! and `cellmail_webhook_endpoints_failing_total`).
//!
//! Each endpoint has its own cap on deliveries under way and its own timeout, and the
//! dispatcher never waits for a delivery: one tenant's slow or dead endpoint holds up only
//! its own deliveries, never another tenant's webhooks or mail.

pub mod guard;
pub mod sign;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellmail_proto::now_ms;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::store::{Attempt, Due, Endpoint, Outcome, Store};
use guard::{Guard, Resolver};

/// How a cell delivers webhooks, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookConfig {
    /// Address ranges webhooks may reach although they are private, loopback or link-local
    /// (comma-separated CIDRs; none by default).
    #[arg(
        long = "webhook-allow-cidr",
        env = "CELLMAIL_WEBHOOK_ALLOW_CIDRS",
        value_delimiter = ','
    )]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Let webhooks use plain http:// to the allowed ranges (one machine only).
    #[arg(long = "webhook-allow-http", env = "CELLMAIL_WEBHOOK_ALLOW_HTTP")]
    pub allow_http: bool,
    /// Seconds between a failed attempt and the next one, one per retry; a delivery is
    /// given up on after the last.
    #[arg(
        long = "webhook-retry-secs",
        env = "CELLMAIL_WEBHOOK_RETRY_SECS",
        value_delimiter = ',',
        default_value = "5,300,1800,7200,18000,36000,36000",
        value_parser = retry_secs
    )]
    pub retry_secs: Vec<f64>,
}

/// A pause between attempts: seconds, at least 0 and at most a day.
fn retry_secs(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(secs) if (0.0..=86_400.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{value:?} is not 0 to 86400 seconds")),
    }
}

impl Default for WebhookConfig {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            allow_cidrs: Vec::new(),
            allow_http: false,
            retry_secs: vec![5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        }
    }
}

impl WebhookConfig {
    /// This config with loopback allowed, over plain http:// too (what `cellmail up` runs
    /// with: a developer's receiver is there).
    pub fn with_loopback(&self) -> Self {
        let mut allow = self.allow_cidrs.clone();
        allow.extend(
            ["127.0.0.0/8", "::1/128"].map(|net| net.parse::<ipnet::IpNet>().expect("a CIDR")),
        );
        Self {
            allow_cidrs: allow,
            allow_http: true,
            retry_secs: self.retry_secs.clone(),
        }
    }

    pub fn guard(&self) -> Guard {
        Guard {
            allow: self.allow_cidrs.clone(),
            allow_http: self.allow_http,
        }
    }
}

/// Endpoint defaults and limits.
pub const DEFAULT_IN_FLIGHT: u32 = 4;
pub const MAX_IN_FLIGHT: u32 = 32;
pub const DEFAULT_TIMEOUT_MS: u32 = 10_000;
pub const MAX_TIMEOUT_MS: u32 = 30_000;

/// The most of an endpoint's answer a delivery reads.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How long an attempt whose outcome could not be recorded waits before it is made again.
const UNRECORDED_PAUSE: Duration = Duration::from_secs(5);

/// How often the dispatcher looks for due deliveries.
const TICK: Duration = Duration::from_millis(100);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>;

/// Posts events to endpoints.
pub struct Poster {
    client: HttpsClient,
    guard: Guard,
}

impl Poster {
    pub fn new(guard: Guard) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new_with_resolver(Resolver(guard.clone()));
        http.enforce_http(false);
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            guard,
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Posts message `id` of `kind` with `data` to `endpoint` once: the attempt as its log
    /// shows it, and whether the endpoint took it (a 2xx).
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        (id, kind): (&str, &str),
        data: &serde_json::Value,
        attempt: u32,
    ) -> (Attempt, bool) {
        let started = Instant::now();
        let at_ms = now_ms();
        let answered = self.send(endpoint, (id, kind), data, at_ms).await;
        let (status, error) = match &answered {
            Ok(status) if (200..300).contains(status) => (*status, String::new()),
            Ok(status) => (*status, format!("the endpoint answered {status}")),
            Err(error) => (0, error.clone()),
        };
        let attempt = Attempt {
            event_id: id.to_owned(),
            event_type: kind.to_owned(),
            at_ms,
            attempt,
            status,
            latency_ms: started.elapsed().as_millis() as u64,
            error,
        };
        let delivered = attempt.error.is_empty();
        (attempt, delivered)
    }

    async fn send(
        &self,
        endpoint: &Endpoint,
        (id, kind): (&str, &str),
        data: &serde_json::Value,
        at_ms: u64,
    ) -> Result<u16, String> {
        let uri = self.guard.check_url(&endpoint.url)?;
        let body = sign::payload(kind, data, at_ms);
        let timestamp = at_ms / 1000;
        let signature = sign::signature(&endpoint.signing(at_ms), id, timestamp, &body)?;
        let request = hyper::Request::post(uri)
            .header("content-type", "application/json")
            .header("user-agent", "cellmail-webhooks")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let timeout = Duration::from_millis(u64::from(endpoint.timeout_ms));
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                let mut cause: &dyn std::error::Error = &e;
                while let Some(source) = cause.source() {
                    cause = source;
                }
                format!("no answer: {cause}")
            })?;
            let status = response.status().as_u16();
            // Read (and drop) a short body, so that the connection can be reused; a longer
            // one is not read: an endpoint may not fill the cell's memory.
            let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok(status)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} ms", endpoint.timeout_ms))?
    }
}

/// Posts what the outbox has due, each endpoint within its own cap.
pub struct Dispatcher {
    cell: String,
    store: Arc<Store>,
    poster: Arc<Poster>,
    retries: Vec<Duration>,
    /// Each endpoint's cap on deliveries under way, with the cap it was made for.
    gates: Mutex<HashMap<(String, String), Gate>>,
    /// The outbox entries being delivered now (tenant, endpoint, event), and those whose
    /// attempt was recorded at an instant: an outbox read from before then still lists them.
    under_way: Arc<Mutex<HashMap<Entry, Option<Instant>>>>,
    /// Woken as a delivery finishes: its endpoint has room for the next one now.
    finished: tokio::sync::Notify,
}

type Entry = (String, String, String);

/// An endpoint's cap on deliveries under way, with the cap it was made for.
type Gate = (u32, Arc<Semaphore>);

impl Dispatcher {
    pub fn new(
        cell: String,
        store: Arc<Store>,
        poster: Arc<Poster>,
        config: &WebhookConfig,
    ) -> Self {
        Self {
            cell,
            store,
            poster,
            retries: (config.retry_secs.iter())
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
                .collect(),
            gates: Mutex::default(),
            under_way: Arc::default(),
            finished: tokio::sync::Notify::new(),
        }
    }

    /// Dispatches until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
                () = self.finished.notified() => {}
            }
            let read_at = Instant::now();
            // Entries whose attempt was recorded before this read are in it as they are now.
            (self.under_way.lock().unwrap_or_else(|p| p.into_inner()))
                .retain(|_, done| done.is_none_or(|at| at >= read_at));
            // An endpoint with a delivery slot free gets its oldest due deliveries read, as
            // many as its cap: those under way are among them, and skipped.
            let room = |tenant: &cellmail_proto::TenantId, endpoint: &Endpoint| {
                let gate = self.gate(tenant.as_str(), endpoint);
                match gate.available_permits() {
                    0 => 0,
                    _ => endpoint.max_in_flight.max(1) as usize,
                }
            };
            match self.store.due(now_ms(), room) {
                Ok(due) => {
                    for (due, endpoint) in due {
                        self.start(due, endpoint);
                    }
                }
                Err(err) => tracing::warn!(cell = %self.cell, %err, "reading the webhook outbox"),
            }
        }
    }

    /// The cap of deliveries under way to `endpoint`.
    fn gate(&self, tenant: &str, endpoint: &Endpoint) -> Arc<Semaphore> {
        // Only whole inserts happen under the lock.
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_owned(), endpoint.id.clone());
        let cap = endpoint.max_in_flight.max(1);
        match gates.get(&key) {
            Some((made_for, gate)) if *made_for == cap => gate.clone(),
            _ => {
                let gate = Arc::new(Semaphore::new(cap as usize));
                gates.insert(key, (cap, gate.clone()));
                gate
            }
        }
    }

    /// Starts delivering `due`, read from the outbox after the last retain of `under_way`,
    /// unless it is under way already, its attempt was recorded after that read, or its
    /// endpoint is at its cap (then it stays due for a later look).
    fn start(self: &Arc<Self>, due: Due, endpoint: Endpoint) {
        let entry = (
            due.tenant.to_string(),
            endpoint.id.clone(),
            due.pending.event.id.clone(),
        );
        {
            // Only whole inserts, removals and retains happen under the lock.
            let mut under_way = self.under_way.lock().unwrap_or_else(|p| p.into_inner());
            if under_way.contains_key(&entry) {
                return;
            }
            let Ok(permit) = self.gate(&entry.0, &endpoint).try_acquire_owned() else {
                return;
            };
            under_way.insert(entry.clone(), None);
            let dispatcher = self.clone();
            tokio::spawn(async move {
                let recorded = dispatcher.deliver(due, endpoint).await;
                // An attempt not recorded stays due: it is made again, after a pause.
                let done = match recorded {
                    true => Instant::now(),
                    false => Instant::now() + UNRECORDED_PAUSE,
                };
                let mut under_way = dispatcher
                    .under_way
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                under_way.insert(entry, Some(done));
                drop((under_way, permit));
                dispatcher.finished.notify_one();
            });
        }
    }

    /// Makes one attempt of `due`, and whether its outcome was recorded.
    async fn deliver(&self, due: Due, endpoint: Endpoint) -> bool {
        let event = &due.pending.event;
        let number = due.pending.attempts + 1;
        let data = serde_json::to_value(event).unwrap_or_default();
        let (attempt, delivered) = self
            .poster
            .post(&endpoint, (&event.id, event.kind.as_str()), &data, number)
            .await;
        let now = now_ms();
        let outcome = match self.retries.get(due.pending.attempts as usize) {
            _ if delivered => Outcome::Delivered,
            Some(after) => Outcome::Retry(now + after.as_millis() as u64),
            None => {
                tracing::error!(cell = %self.cell, tenant = %due.tenant, endpoint = %endpoint.id, event = %event.id, error = %attempt.error, "ALARM: a webhook was given up on after every retry; the endpoint is failing");
                metrics::counter!("cellmail_webhook_endpoints_failing_total", "cell" => self.cell.clone()).increment(1);
                Outcome::GaveUp(now)
            }
        };
        metrics::counter!("cellmail_webhook_attempts_total", "cell" => self.cell.clone(), "delivered" => delivered.to_string()).increment(1);
        match self.store.record_attempt(due, outcome, attempt).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(cell = %self.cell, %err, "recording a webhook attempt");
                false
            }
        }
    }
}
