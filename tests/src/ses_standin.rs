//! An SES v2 stand-in: an HTTP proxy in front of the AWS emulator that answers the SES v2
//! operations the emulator lacks as the SES v2 API reference documents them, and passes
//! every other request (SQS, and the SES calls the emulator has) through to it unchanged.
//!
//! Documented behaviour implemented here:
//! - `GetAccount` (`GET /v2/email/account`): `200` with `SendQuota` (`Max24HourSend`,
//!   `MaxSendRate`, `SentLast24Hours`), `SendingEnabled`, `ProductionAccessEnabled` and
//!   `EnforcementStatus` (`HEALTHY`), as JSON. `MaxSendRate` is what the test sets.
//!
//! It also notes when each `SendEmail` (`POST /v2/email/outbound-emails`) the emulator
//! accepted went through and to how many recipients (`Destination`'s three lists), so a
//! test can check the rate a cell sends at.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// One `SendEmail` the emulator accepted.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub at: Instant,
    pub recipients: usize,
}

/// What the stand-in answers for the account, and what it saw.
struct State {
    max_send_rate: f64,
    sent: Mutex<Vec<Sent>>,
}

pub struct SesStandIn {
    /// `http://host:port`, for `--aws-endpoint`.
    pub endpoint: String,
    state: Arc<State>,
}

impl SesStandIn {
    /// A stand-in for an account that may send to `max_send_rate` recipients a second.
    pub async fn start(max_send_rate: f64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(State {
            max_send_rate,
            sent: Mutex::default(),
        });
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                let service =
                    hyper::service::service_fn(move |request| answer(state.clone(), request));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(Self { endpoint, state })
    }

    /// The `SendEmail` calls that went through so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.state.sent.lock().unwrap().clone()
    }
}

type Answer = Response<Full<Bytes>>;

async fn answer(state: Arc<State>, request: Request<Incoming>) -> anyhow::Result<Answer> {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    if method == Method::GET && path == "/v2/email/account" {
        return Ok(json_answer(json!({
            "SendQuota": {
                "Max24HourSend": 1_000_000.0,
                "MaxSendRate": state.max_send_rate,
                "SentLast24Hours": 0.0,
            },
            "SendingEnabled": true,
            "ProductionAccessEnabled": true,
            "EnforcementStatus": "HEALTHY",
            "DedicatedIpAutoWarmupEnabled": false,
        })));
    }
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let recipients =
        (method == Method::POST && path == "/v2/email/outbound-emails").then(|| recipients(&body));
    let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
    if let Some(recipients) = recipients
        && answer.status().is_success()
    {
        state.sent.lock().unwrap().push(Sent {
            at: Instant::now(),
            recipients,
        });
    }
    Ok(answer)
}

fn json_answer(body: Value) -> Answer {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static answer")
}

/// How many recipients a `SendEmail` request names.
fn recipients(body: &[u8]) -> usize {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    ["ToAddresses", "CcAddresses", "BccAddresses"]
        .iter()
        .filter_map(|list| request["Destination"][list].as_array())
        .map(Vec::len)
        .sum()
}

/// `request` as the emulator answers it, over a connection of its own.
async fn to_emulator(request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(crate::emulator::emulator()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (parts, body) = sender.send_request(request).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
