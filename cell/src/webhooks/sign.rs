//! Standard Webhooks signing: a delivery's body is `{"type", "timestamp", "data"}`, and its
//! `webhook-signature` header is `v1,<base64 HMAC-SHA256>` over `<id>.<timestamp>.<body>`
//! under each secret that signs (the base64 after `whsec_`), space-separated, so a receiver
//! that knows either secret of a rotation verifies it.

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;

pub const SECRET_PREFIX: &str = "whsec_";

/// A new secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The body of a delivery of `data` as `kind`, made at `at_ms`.
pub fn payload(kind: &str, data: &serde_json::Value, at_ms: u64) -> Vec<u8> {
    let timestamp = i64::try_from(at_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    let body = serde_json::json!({ "type": kind, "timestamp": timestamp, "data": data });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The `webhook-signature` header for `body` of message `id` sent at `timestamp` (seconds).
pub fn signature(
    secrets: &[&str],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> Result<String, String> {
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(format!("{id}.{timestamp}.").as_bytes());
    signed.extend_from_slice(body);
    let mut signatures = Vec::new();
    for secret in secrets {
        let key = secret
            .strip_prefix(SECRET_PREFIX)
            .and_then(|key| STANDARD.decode(key).ok())
            .ok_or("the endpoint's secret is not a whsec_ secret")?;
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &signed);
        signatures.push(format!("v1,{}", STANDARD.encode(tag.as_ref())));
    }
    if signatures.is_empty() {
        return Err("the endpoint has no secret that signs".into());
    }
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_example_signs_as_the_spec_says() {
        // The spec's example: secret, id, timestamp, body and the signature it gives.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signed = signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            signed.unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let two = signature(&[secret, &new_secret()], "m", 1, b"{}").unwrap();
        assert_eq!(two.split(' ').count(), 2, "both secrets of a rotation sign");
        assert!(signature(&["not-a-secret"], "m", 1, b"{}").is_err());
        assert!(signature(&[], "m", 1, b"{}").is_err());
    }
}
