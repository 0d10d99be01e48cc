//! Identifiers and value types shared by every crate.
//!
//! Each identifier is a newtype validated at construction, so a raw string never means two
//! things and a bad id is refused at the edge with the field it came from.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {} is invalid: {reason}", crate::error::quote(value))]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Checks the shape shared by tenant and cell ids: 1 to 63 characters of lowercase ASCII
/// letters, digits and '-', starting with a letter or digit. The same alphabet is safe in
/// registry keys, file paths, SES configuration-set names and SQS queue names.
fn check_slug(kind: &'static str, value: &str) -> Result<(), IdError> {
    let fail = |reason| {
        Err(IdError {
            kind,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() || value.len() > 63 {
        return fail("must be 1 to 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("may hold only lowercase letters, digits and '-'");
    }
    if value.starts_with('-') {
        return fail("must start with a letter or digit");
    }
    Ok(())
}

/// Slugs are kept inline (no allocation) up to 24 bytes: a router holds one or two per tenant
/// in its maps, and comparing a key then reads no second cache line.
macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(CompactString);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_slug($kind, &value)?;
                Ok(Self(CompactString::from(value)))
            }

            /// `value`, from the request field `field`: a bad id is INVALID_ARGUMENT naming it.
            pub fn from_field(field: &str, value: impl Into<String>) -> Result<Self, ApiError> {
                Self::new(value).map_err(|e| ApiError::invalid(field, e.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.into_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

slug_id!(
    /// A tenant: one customer of the SaaS product that sends through cellmail.
    TenantId,
    "tenant id"
);
slug_id!(
    /// A cell: one independent worker with its own queue, suppression state and mailer.
    CellId,
    "cell id"
);

/// A message id: a ULID, so ids sort by acceptance time and never collide across cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(ulid::Ulid);

impl MessageId {
    pub fn generate() -> Self {
        Self(ulid::Ulid::new())
    }

    /// When the id was generated (ms since the Unix epoch): ids sort by it.
    pub fn at_ms(&self) -> u64 {
        self.0.timestamp_ms()
    }

    /// The lowest id generated at `at_ms`: every id generated then or later sorts after it.
    pub fn first_at(at_ms: u64) -> Self {
        Self(ulid::Ulid::from_parts(at_ms, 0))
    }
}

impl TryFrom<String> for MessageId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        value.parse()
    }
}

impl std::str::FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        ulid::Ulid::from_string(s).map(Self).map_err(|_| IdError {
            kind: "message id",
            value: s.to_owned(),
            reason: "must be a 26-character ULID",
        })
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.to_string()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The generation of a tenant's placement. Every switch of a tenant's cell increments it,
/// and a cell refuses sends stamped with an epoch it does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Transactional mail (resets, receipts) is scheduled before marketing mail and has its own
/// queue, breaker and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageClass {
    Transactional,
    Marketing,
}

impl MessageClass {
    /// Scheduling order: transactional first.
    pub const ALL: [MessageClass; 2] = [MessageClass::Transactional, MessageClass::Marketing];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageClass::Transactional => "transactional",
            MessageClass::Marketing => "marketing",
        }
    }

    /// `None` for `MESSAGE_CLASS_UNSPECIFIED` or an unknown wire value.
    /// The class a request names: unset (the proto's zero value) is transactional, as a
    /// caller who did not choose expects; a value the proto does not have is none.
    pub fn from_wire(value: i32) -> Option<Self> {
        match crate::v1::MessageClass::try_from(value).ok()? {
            crate::v1::MessageClass::Unspecified | crate::v1::MessageClass::Transactional => {
                Some(MessageClass::Transactional)
            }
            crate::v1::MessageClass::Marketing => Some(MessageClass::Marketing),
        }
    }
}

impl std::str::FromStr for MessageClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        MessageClass::ALL
            .into_iter()
            .find(|class| class.as_str() == s)
            .ok_or_else(|| {
                let quoted = crate::error::quote(s);
                format!("unknown message class {quoted} (transactional | marketing)")
            })
    }
}

impl fmt::Display for MessageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an address is on a suppression list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    Bounce,
    Complaint,
    Manual,
    Unsubscribe,
}

/// Which suppression list an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionScope {
    /// The tenant's own list.
    Tenant,
    /// The operators' list, applied to every tenant.
    Global,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::Bounce => "bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Manual => "manual",
            SuppressionReason::Unsubscribe => "unsubscribe",
        }
    }

    pub fn to_wire(self) -> i32 {
        let wire = match self {
            SuppressionReason::Bounce => crate::v1::SuppressionReason::Bounce,
            SuppressionReason::Complaint => crate::v1::SuppressionReason::Complaint,
            SuppressionReason::Manual => crate::v1::SuppressionReason::Manual,
            SuppressionReason::Unsubscribe => crate::v1::SuppressionReason::Unsubscribe,
        };
        wire as i32
    }

    /// `None` for an unspecified or unknown wire value.
    pub fn from_wire(value: i32) -> Option<Self> {
        match crate::v1::SuppressionReason::try_from(value).ok()? {
            crate::v1::SuppressionReason::Bounce => Some(SuppressionReason::Bounce),
            crate::v1::SuppressionReason::Complaint => Some(SuppressionReason::Complaint),
            crate::v1::SuppressionReason::Manual => Some(SuppressionReason::Manual),
            crate::v1::SuppressionReason::Unsubscribe => Some(SuppressionReason::Unsubscribe),
            crate::v1::SuppressionReason::Unspecified => None,
        }
    }
}

impl SuppressionScope {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionScope::Tenant => "tenant",
            SuppressionScope::Global => "global",
        }
    }

    pub fn to_wire(self) -> i32 {
        let wire = match self {
            SuppressionScope::Tenant => crate::v1::SuppressionScope::Tenant,
            SuppressionScope::Global => crate::v1::SuppressionScope::Global,
        };
        wire as i32
    }
}

/// The key an address is suppressed under: the whole address lowercased. Mailbox providers
/// treat local parts case-insensitively in practice, so `Jane@X` and `jane@x` are one
/// person; a `+label` is kept, so `jane+news@x` is a different entry.
pub fn suppression_key(address: &str) -> String {
    address.trim().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_ids_refuse_what_is_unsafe_in_keys_and_paths() {
        assert!(TenantId::new("acme-42").is_ok());
        for bad in ["", "Acme", "a/b", "../x", "-x", "a b", &"x".repeat(64)] {
            let err = TenantId::new(bad).unwrap_err();
            assert_eq!(err.kind, "tenant id", "{bad:?}");
        }
    }

    #[test]
    fn slug_ids_short_and_long_behave_as_their_text() {
        use std::collections::HashSet;
        // 7 bytes is kept inline, 63 is not: both read, compare, order and convert alike.
        let (short, long) = ("acme-42".to_owned(), "a".repeat(63));
        let ids: Vec<TenantId> = [&short, &long]
            .iter()
            .map(|s| TenantId::new(s.as_str()).unwrap())
            .collect();
        for (id, text) in ids.iter().zip([&short, &long]) {
            assert_eq!(id.as_str(), text.as_str());
            assert_eq!(id.to_string(), *text);
            assert_eq!(String::from(id.clone()), *text);
            assert_eq!(text.parse::<TenantId>().unwrap(), *id);
        }
        assert!(
            ids[0] > ids[1],
            "ordered as their text: \"acme-42\" after \"aaa…\""
        );
        let set: HashSet<&TenantId> = ids.iter().collect();
        assert!(set.contains(&TenantId::new("acme-42").unwrap()));
        assert!(!set.contains(&TenantId::new("acme-43").unwrap()));
    }

    #[test]
    fn message_ids_round_trip_and_reject_garbage() {
        let id = MessageId::generate();
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        assert!("not-a-ulid".parse::<MessageId>().is_err());
    }

    #[test]
    fn suppression_reasons_round_trip_and_keys_fold_case_only() {
        for reason in [
            SuppressionReason::Bounce,
            SuppressionReason::Complaint,
            SuppressionReason::Manual,
            SuppressionReason::Unsubscribe,
        ] {
            assert_eq!(SuppressionReason::from_wire(reason.to_wire()), Some(reason));
        }
        assert_eq!(SuppressionReason::from_wire(0), None);
        assert_eq!(suppression_key(" Jane@Example.COM "), "jane@example.com");
        assert_ne!(
            suppression_key("jane+news@example.com"),
            suppression_key("jane@example.com")
        );
    }

    #[test]
    fn an_unset_class_is_transactional_and_an_unknown_one_none() {
        assert_eq!(
            MessageClass::from_wire(0),
            Some(MessageClass::Transactional)
        );
        assert_eq!(
            MessageClass::from_wire(1),
            Some(MessageClass::Transactional)
        );
        assert_eq!(MessageClass::from_wire(2), Some(MessageClass::Marketing));
        assert_eq!(MessageClass::from_wire(99), None);
    }
}
