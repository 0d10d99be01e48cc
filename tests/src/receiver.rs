//! A webhook receiver for the tests: a real HTTP server on loopback that keeps every request
//! it gets (path, Standard Webhooks headers, body) and answers each path as the test set it:
//! 200, 503 for its first requests, or never.
//!
//! [`verify`] checks a delivery's signature from the Standard Webhooks spec itself (HMAC-SHA256
//! written out over SHA-256), not with the code that signs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// One delivery as the receiver got it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// How the receiver answers a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// 503 to this many more requests, then 200.
    FailNext(u32),
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct State {
    answers: HashMap<String, Answer>,
    got: Vec<Delivery>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let serving = state.clone();
        crate::serve_http(listener, move |request| answer(serving.clone(), request));
        Ok(Self { addr, state })
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn answer(&self, path: &str, answer: Answer) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(path.to_owned(), answer);
    }

    /// What reached `path` so far, in order.
    pub fn got(&self, path: &str) -> Vec<Delivery> {
        let state = self.state.lock().unwrap();
        state
            .got
            .iter()
            .filter(|d| d.path == path)
            .cloned()
            .collect()
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (path, id, timestamp, signature) = (
        request.uri().path().to_owned(),
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = request.into_body().collect().await?.to_bytes().to_vec();
    let answer = {
        let mut state = state.lock().unwrap();
        state.got.push(Delivery {
            path: path.clone(),
            id,
            timestamp,
            signature,
            body,
            at: std::time::Instant::now(),
        });
        let answer = state.answers.get(&path).copied().unwrap_or(Answer::Ok);
        if let Answer::FailNext(n) = answer {
            let next = if n > 1 {
                Answer::FailNext(n - 1)
            } else {
                Answer::Ok
            };
            state.answers.insert(path, next);
        }
        answer
    };
    let status = match answer {
        Answer::Ok => StatusCode::OK,
        Answer::FailNext(_) => StatusCode::SERVICE_UNAVAILABLE,
        Answer::Hang => std::future::pending().await,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

/// HMAC-SHA256 as RFC 2104 writes it.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether `delivery` carries a `v1` signature by `secret` (`whsec_…`) over
/// `<webhook-id>.<webhook-timestamp>.<body>`, as the Standard Webhooks spec defines it.
pub fn verify(delivery: &Delivery, secret: &str) -> bool {
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| STANDARD.decode(k).ok())
    else {
        return false;
    };
    let mut signed = format!("{}.{}.", delivery.id, delivery.timestamp).into_bytes();
    signed.extend_from_slice(&delivery.body);
    let expected = format!("v1,{}", STANDARD.encode(hmac_sha256(&key, &signed)));
    delivery.signature.split(' ').any(|s| s == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_verifies_and_a_changed_body_does_not() {
        let mut delivery = Delivery {
            path: "/".into(),
            id: "msg_p5jXN8AQM9LWM0D4loKWxJek".into(),
            timestamp: "1614265330".into(),
            signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into(),
            body: br#"{"test": 2432232314}"#.to_vec(),
            at: std::time::Instant::now(),
        };
        assert!(verify(&delivery, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        delivery.body[3] = b'x';
        assert!(!verify(&delivery, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    }
}
