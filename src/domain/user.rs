//! A user: an email that is unique regardless of case, and free-form preferences.

use chrono::{DateTime, Utc};
use icu_normalizer::ComposingNormalizerBorrowed;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ExpectedVersion, ValidationError, parse_uuid};

/// A user as stored; also the cached value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub preferences: serde_json::Value,
    pub version: i64,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub last_modified: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Uuid);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        parse_uuid("id", raw).map(Self)
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An email address of a plausible shape, at most 254 characters, in
/// Unicode's composed form (NFC): `café` typed with a combining accent and
/// with a precomposed `é` is one address, stored and compared one way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let invalid = |why: &str| ValidationError::new("email", why.to_string());
        if raw.is_empty() {
            return Err(invalid("is required"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(invalid("must be at most 254 characters"));
        }
        let email = ComposingNormalizerBorrowed::new_nfc().normalize(raw);
        if email.len() > Self::MAX_LEN {
            return Err(invalid("must be at most 254 characters"));
        }
        if !email.chars().all(super::is_visible) {
            return Err(invalid("must not contain spaces, control or invisible characters"));
        }
        let Some((local, domain)) = email.rsplit_once('@') else {
            return Err(invalid("must look like name@example.com"));
        };
        let domain_ok = domain.contains('.')
            && domain
                .split('.')
                .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'))
            && domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.');
        if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
            return Err(invalid("must look like name@example.com"));
        }
        Ok(Self(email.into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free-form JSON preferences: an object, at most 16 KiB encoded, nested at most 16 deep.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences(serde_json::Value);

impl Preferences {
    pub const MAX_BYTES: usize = 16 * 1024;
    pub const MAX_DEPTH: usize = 16;

    pub fn parse(value: serde_json::Value) -> Result<Self, ValidationError> {
        if !value.is_object() {
            return Err(ValidationError::new("preferences", "must be an object"));
        }
        if holds_nul(&value) {
            // PostgreSQL's jsonb cannot store U+0000 in a key or a string.
            return Err(ValidationError::new(
                "preferences",
                "must not contain the NUL character (U+0000)",
            ));
        }
        if depth(&value) > Self::MAX_DEPTH {
            return Err(ValidationError::new(
                "preferences",
                "must be nested at most 16 levels deep",
            ));
        }
        // Serializing a Value cannot fail: its keys are strings.
        let encoded_len = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(usize::MAX);
        if encoded_len > Self::MAX_BYTES {
            return Err(ValidationError::new(
                "preferences",
                "must be at most 16 KiB when encoded as JSON",
            ));
        }
        Ok(Self(value))
    }

    pub fn empty() -> Self {
        Self(serde_json::Value::Object(Default::default()))
    }

    pub fn as_json(&self) -> &serde_json::Value {
        &self.0
    }
}

/// Nesting depth of a JSON value: a scalar is 0, `{}` is 1, `{"a": {}}` is 2.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(map) => map.iter().any(|(key, value)| key.contains('\0') || holds_nul(value)),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::String(text) => text.contains('\0'),
        _ => false,
    }
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: Email,
    pub preferences: Preferences,
}

/// The fields an update changes (`None` leaves a field as it is).
#[derive(Debug, Clone)]
pub struct UserPatch {
    pub id: UserId,
    pub email: Option<Email>,
    pub preferences: Option<Preferences>,
    pub expected_version: ExpectedVersion,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn email_accepts_ordinary_addresses() {
        for ok in ["a@b.co", "first.last+tag@sub.example.com", "X@EXAMPLE.ORG"] {
            assert!(Email::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn email_rejects_malformed_addresses() {
        let too_long = format!("{}@example.com", "a".repeat(250));
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a b@example.com",
            "a@@b.com",
            "a@-b.com",
            "a@b..com",
            &too_long,
        ] {
            let err = Email::parse(bad).unwrap_err();
            assert_eq!(err.field, "email", "{bad}");
        }
    }

    #[test]
    fn email_is_stored_in_composed_form() {
        let decomposed = Email::parse("cafe\u{301}@example.com").unwrap();
        let composed = Email::parse("caf\u{e9}@example.com").unwrap();
        assert_eq!(decomposed, composed);
        assert_eq!(composed.as_str(), "caf\u{e9}@example.com");
    }

    #[test]
    fn email_refuses_every_invisible_character() {
        for invisible in [
            '\u{061C}',
            '\u{00AD}',
            '\u{E0041}',
            '\u{180E}',
            '\u{034F}',
            '\u{3164}',
            '\u{FE0F}',
            '\u{2060}',
        ] {
            let email = format!("ad{invisible}min@example.com");
            assert_eq!(Email::parse(&email).unwrap_err().field, "email", "{invisible:?}");
        }
    }

    #[test]
    fn preferences_depth_is_bounded() {
        let mut deep = json!({});
        for _ in 0..15 {
            deep = json!({ "a": deep });
        }
        assert!(Preferences::parse(deep.clone()).is_ok(), "16 levels are allowed");
        let deeper = json!({ "a": deep });
        assert_eq!(Preferences::parse(deeper).unwrap_err().field, "preferences");
    }

    #[test]
    fn preferences_size_is_bounded() {
        let big = json!({ "blob": "x".repeat(Preferences::MAX_BYTES) });
        assert!(Preferences::parse(big).is_err());
        assert!(Preferences::parse(json!({ "theme": "dark" })).is_ok());
        assert!(Preferences::parse(json!([1, 2])).is_err(), "must be an object");
    }
}
