//! Entities and the validated input types that build them.
//!
//! Input is parsed at the edge into types that cannot hold a bad value
//! (`Email::parse`, `CategoryId::parse`, ...): once a value has the type,
//! nobody checks it again, and nothing unvalidated reaches a Redis key or SQL.

mod page;
mod product;
mod user;

pub use page::{Cursor, PageRequest, PageStart};
pub use product::{
    CategoryId, Currency, Description, NewProduct, PriceCents, Product, ProductId, ProductName, ProductPatch,
};
pub use user::{Email, NewUser, Preferences, User, UserId, UserPatch};

use uuid::Uuid;

/// Input that breaks a rule; `field` names the offending request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// The same error, attributed to another request field (e.g. `user.id` for `id`).
    pub fn in_field(self, field: &'static str) -> Self {
        Self { field, ..self }
    }
}

/// Parses an id. Keys and SQL use the parsed `Uuid`, never the raw text, so
/// every spelling of one id names the same cache entry.
fn parse_uuid(field: &'static str, raw: &str) -> Result<Uuid, ValidationError> {
    Uuid::try_parse(raw)
        .map_err(|_| ValidationError::new(field, "must be a UUID like 123e4567-e89b-12d3-a456-426614174000"))
}

/// A write's optimistic-concurrency precondition: 0 means unconditional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedVersion(Option<i64>);

impl ExpectedVersion {
    pub fn parse(raw: i64) -> Result<Self, ValidationError> {
        match raw {
            0 => Ok(Self(None)),
            v if v > 0 => Ok(Self(Some(v))),
            _ => Err(ValidationError::new(
                "expected_version",
                "must be 0 (unconditional) or a positive version",
            )),
        }
    }

    pub fn get(self) -> Option<i64> {
        self.0
    }
}
