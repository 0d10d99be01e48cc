//! An SES v2 stand-in: an HTTP proxy in front of the AWS emulator that answers the SES v2
//! operations the emulator lacks as the SES v2 API reference documents them, and passes
//! every other request (SQS, and the SES calls the emulator has) through to it unchanged.
//!
//! Documented behaviour implemented here:
//! - `GetAccount` (`GET /v2/email/account`): `200` with `SendQuota` (`Max24HourSend`,
//!   `MaxSendRate`, `SentLast24Hours`), `SendingEnabled`, `ProductionAccessEnabled` and
//!   `EnforcementStatus` (`HEALTHY`), as JSON. `MaxSendRate` is what the test sets.
//! - `PutConfigurationSetSendingOptions` (`PUT /v2/email/configuration-sets/{name}/sending`,
//!   body `{"SendingEnabled": bool}`): `200` with an empty object. While a configuration
//!   set's sending is disabled, `GetConfigurationSet` says so in `SendingOptions`, and a
//!   `SendEmail` naming it is refused with `400` `SendingPausedException`.
//!
//! It also notes each `SendEmail` (`POST /v2/email/outbound-emails`) the emulator accepted:
//! when, with which configuration set and to how many recipients (`Destination`'s three
//! lists), so a test can check whose mail went out and at what rate.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// One `SendEmail` the emulator accepted.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub configuration_set: String,
    pub recipients: usize,
}

/// What the stand-in answers for the account, and what it saw.
struct State {
    max_send_rate: f64,
    /// The configuration sets whose sending is disabled.
    disabled: Mutex<HashSet<String>>,
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
            disabled: Mutex::default(),
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
        let account = json!({
            "SendQuota": {
                "Max24HourSend": 1_000_000.0,
                "MaxSendRate": state.max_send_rate,
                "SentLast24Hours": 0.0,
            },
            "SendingEnabled": true,
            "ProductionAccessEnabled": true,
            "EnforcementStatus": "HEALTHY",
            "DedicatedIpAutoWarmupEnabled": false,
        });
        return Ok(json_answer(StatusCode::OK, account));
    }
    let set: Option<Vec<String>> = path
        .strip_prefix("/v2/email/configuration-sets/")
        .map(|rest| rest.split('/').map(str::to_owned).collect());
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or_default();
    match (&method, set.as_deref()) {
        (&Method::PUT, Some([name, sending])) if sending == "sending" => {
            let mut disabled = state.disabled.lock().unwrap();
            if json["SendingEnabled"] == false {
                disabled.insert(name.clone());
            } else {
                disabled.remove(name);
            }
            return Ok(json_answer(StatusCode::OK, json!({})));
        }
        (&Method::GET, Some([name])) => {
            let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
            if !answer.status().is_success() {
                return Ok(answer);
            }
            let got = answer.into_body().collect().await?.to_bytes();
            let mut got: Value = serde_json::from_slice(&got)?;
            let enabled = !state.disabled.lock().unwrap().contains(name);
            got["SendingOptions"] = json!({ "SendingEnabled": enabled });
            return Ok(json_answer(StatusCode::OK, got));
        }
        _ => {}
    }
    let sending = method == Method::POST && path == "/v2/email/outbound-emails";
    let configuration_set = json["ConfigurationSetName"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    if sending && state.disabled.lock().unwrap().contains(&configuration_set) {
        let refusal = json!({ "message": "Sending is paused for this configuration set." });
        let mut answer = json_answer(StatusCode::BAD_REQUEST, refusal);
        answer.headers_mut().insert(
            "x-amzn-errortype",
            HeaderValue::from_static("SendingPausedException"),
        );
        return Ok(answer);
    }
    let answer = to_emulator(Request::from_parts(parts, Full::new(body))).await?;
    if sending && answer.status().is_success() {
        state.sent.lock().unwrap().push(Sent {
            at: Instant::now(),
            configuration_set,
            recipients: recipients(&json),
        });
    }
    Ok(answer)
}

fn json_answer(status: StatusCode, body: Value) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static answer")
}

/// How many recipients a `SendEmail` request names.
fn recipients(request: &Value) -> usize {
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
