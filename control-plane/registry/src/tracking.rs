//! Signed engagement links: the open pixel, a rewritten link and the unsubscribe URL each
//! carry a token that names the tenant, the message, the recipient and (for a link) its
//! target, under an HMAC-SHA256 by one of the platform's tracking keys. Following one needs
//! no lookup, and a token cannot be changed to point elsewhere: the tracking host is no open
//! redirect.
//!
//! The keys are one registry record (`tracking/keys`), newest first: the newest signs, every
//! one verifies, so a rotation (`cellmail tracking rotate-key`) leaves links already sent
//! working until their key is dropped, [`KEPT`] rotations later.

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cellmail_proto::TenantId;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// How many keys a rotation keeps (the new one and the last ones before it).
pub const KEPT: usize = 3;

/// The platform's tracking keys, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingKeys {
    pub keys: Vec<TrackingKey>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingKey {
    pub id: String,
    /// Base64 of 32 random bytes.
    pub secret: String,
    pub created_ms: u64,
}

impl std::fmt::Debug for TrackingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackingKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TrackingKey {
    pub fn generate(now_ms: u64) -> Self {
        let (mut id, mut secret) = ([0u8; 4], [0u8; 32]);
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        Self {
            id: hex::encode(id),
            secret: STANDARD.encode(secret),
            created_ms: now_ms,
        }
    }

    fn tag(&self, payload: &str) -> Option<String> {
        let secret = STANDARD.decode(&self.secret).ok()?;
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &secret),
            payload.as_bytes(),
        );
        Some(URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }
}

/// What following a link does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "a", content = "u")]
pub enum Action {
    #[serde(rename = "o")]
    Open,
    #[serde(rename = "c")]
    Click(String),
    #[serde(rename = "u")]
    Unsubscribe,
}

/// Whose message and recipient a link is about, and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    #[serde(rename = "t")]
    pub tenant: TenantId,
    #[serde(rename = "m")]
    pub message_id: String,
    #[serde(rename = "r")]
    pub recipient: String,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    #[serde(rename = "k")]
    key: String,
    #[serde(flatten)]
    link: Link,
}

/// Makes the platform's first tracking key unless the registry has keys already (every
/// control plane does this at start; the first one's write wins).
pub async fn ensure_keys(
    registry: &dyn crate::Registry,
    keys: &crate::schema::Keys,
    now_ms: u64,
) -> Result<(), crate::RegistryError> {
    let first = TrackingKeys::default().rotated(now_ms);
    let value = crate::schema::encode(&first);
    registry
        .compare_and_swap(&keys.tracking_keys(), 0, value)
        .await
        .map(drop)
}

impl TrackingKeys {
    /// The keys after a rotation: a new one first, then the newest of the old ones.
    pub fn rotated(&self, now_ms: u64) -> Self {
        let mut keys = vec![TrackingKey::generate(now_ms)];
        keys.extend(self.keys.iter().take(KEPT - 1).cloned());
        Self { keys }
    }

    /// `link` as a token signed by the newest key; `None` without keys.
    pub fn sign(&self, link: &Link) -> Option<String> {
        let key = self.keys.first()?;
        let signed = Signed {
            key: key.id.clone(),
            link: link.clone(),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&signed).ok()?);
        let tag = key.tag(&payload)?;
        Some(format!("{payload}.{tag}"))
    }

    /// The link `token` carries, if one of the keys signed it as it is.
    pub fn verify(&self, token: &str) -> Option<Link> {
        let (payload, tag) = token.split_once('.')?;
        let signed: Signed = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let key = self.keys.iter().find(|k| k.id == signed.key)?;
        let expected = key.tag(payload)?;
        // Compared in constant time: the tag is what an attacker guesses at.
        let same = expected.len() == tag.len()
            && aws_lc_rs::constant_time::verify_slices_are_equal(
                expected.as_bytes(),
                tag.as_bytes(),
            )
            .is_ok();
        same.then_some(signed.link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(action: Action) -> Link {
        Link {
            tenant: TenantId::new("acme").unwrap(),
            message_id: "01ABC".into(),
            recipient: "jo@example.com".into(),
            action,
        }
    }

    #[test]
    fn a_token_verifies_as_signed_and_not_once_changed_or_after_its_key_is_dropped() {
        let keys = TrackingKeys::default().rotated(1);
        let click = link(Action::Click("https://shop.example/a?b=c".into()));
        let token = keys.sign(&click).unwrap();
        assert_eq!(keys.verify(&token), Some(click.clone()));
        for tampered in [
            token.replacen('.', "x.", 1),
            format!("{token}x"),
            token.replace(&token[..4], "AAAA"),
            "garbage".into(),
        ] {
            assert_eq!(keys.verify(&tampered), None, "{tampered}");
        }
        // Another link's signature does not carry over to this link's payload.
        let other = keys
            .sign(&link(Action::Click("https://evil.example".into())))
            .unwrap();
        let (payload, _) = other.split_once('.').unwrap();
        let (_, tag) = token.split_once('.').unwrap();
        assert_eq!(keys.verify(&format!("{payload}.{tag}")), None);

        // A rotation keeps old links working until their key is dropped.
        let mut later = keys.rotated(2);
        assert_eq!(later.verify(&token), Some(click));
        for now in 3..3 + KEPT as u64 {
            later = later.rotated(now);
        }
        assert_eq!(later.keys.len(), KEPT);
        assert_eq!(later.verify(&token), None);
        assert_eq!(TrackingKeys::default().sign(&link(Action::Open)), None);
    }
}
