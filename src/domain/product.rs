//! A product: priced, named, and listed within one category.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ExpectedVersion, ValidationError, parse_uuid};

/// A product as stored; also the cached value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Product {
    pub id: Uuid,
    pub category_id: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub version: i64,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductId(Uuid);

impl ProductId {
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

impl std::fmt::Display for ProductId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// 1–64 characters of `[A-Za-z0-9_-]`: safe inside a Redis key and its hash tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CategoryId(String);

impl CategoryId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(ValidationError::new("category_id", "must be 1 to 64 characters"));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ValidationError::new(
                "category_id",
                "may contain only A-Z, a-z, 0-9, '_' and '-'",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CategoryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// 1–200 characters (not bytes), at least one of them visible; no control
/// characters and no invisible ones (see `domain::is_invisible`), except
/// what emoji and scripts attach to a visible character: zero-width joiners
/// (U+200C, U+200D) and variation selectors (as in ❤️).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if chars == 0 || chars > 200 {
            return Err(ValidationError::new("name", "must be 1 to 200 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(ValidationError::new("name", "must not contain control characters"));
        }
        let (mut after_visible, mut any_visible) = (false, false);
        for c in raw.chars() {
            if super::is_invisible(c) && !(after_visible && attaches(c)) {
                return Err(ValidationError::new(
                    "name",
                    "must not contain bidirectional overrides or invisible characters",
                ));
            }
            let visible = super::is_visible(c);
            any_visible |= visible;
            after_visible = visible || (after_visible && attaches(c));
        }
        if !any_visible {
            return Err(ValidationError::new("name", "must contain a visible character"));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Invisible characters that join or select the form of the visible one before them.
fn attaches(c: char) -> bool {
    matches!(c, '\u{200C}' | '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}')
}

/// At most 5000 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.chars().count() > 5000 {
            return Err(ValidationError::new("description", "must be at most 5000 characters"));
        }
        if raw.contains('\0') {
            return Err(ValidationError::new("description", "must not contain NUL characters"));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceCents(i64);

impl PriceCents {
    pub fn parse(raw: i64) -> Result<Self, ValidationError> {
        if raw < 0 {
            return Err(ValidationError::new("price_cents", "must be 0 or more"));
        }
        Ok(Self(raw))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// An ISO 4217 code: three upper-case ASCII letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.len() != 3 || !raw.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ValidationError::new(
                "currency",
                "must be three upper-case letters, like EUR",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub category_id: CategoryId,
    pub name: ProductName,
    pub description: Description,
    pub price_cents: PriceCents,
    pub currency: Currency,
}

/// The fields an update changes (`None` leaves a field as it is).
#[derive(Debug, Clone)]
pub struct ProductPatch {
    pub id: ProductId,
    pub category_id: Option<CategoryId>,
    pub name: Option<ProductName>,
    pub description: Option<Description>,
    pub price_cents: Option<PriceCents>,
    pub currency: Option<Currency>,
    pub expected_version: ExpectedVersion,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_id_allows_only_key_safe_characters() {
        assert!(CategoryId::parse("books_2-new").is_ok());
        assert!(CategoryId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a:b", "{tag}", "a*", "é", &"a".repeat(65)] {
            assert_eq!(CategoryId::parse(bad).unwrap_err().field, "category_id", "{bad:?}");
        }
    }

    #[test]
    fn name_counts_characters_not_bytes() {
        assert!(ProductName::parse(&"é".repeat(200)).is_ok());
        assert!(ProductName::parse(&"é".repeat(201)).is_err());
        assert!(ProductName::parse("").is_err());
    }

    #[test]
    fn name_needs_a_visible_character_and_no_invisible_one() {
        for bad in [
            " ",
            "\u{3164}",
            "\u{200D}",
            "Book\u{E0041}",
            "Bo\u{00AD}ok",
            "\u{FE0F}Book",
        ] {
            assert_eq!(ProductName::parse(bad).unwrap_err().field, "name", "{bad:?}");
        }
        // Emoji and scripts attach joiners and variation selectors to a visible character.
        for ok in [
            "I \u{2764}\u{FE0F} tea",
            "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467} set",
            "\u{645}\u{6CC}\u{200C}\u{62E}\u{648}\u{627}\u{647}\u{645}",
        ] {
            assert!(ProductName::parse(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn currency_is_three_upper_case_letters() {
        assert!(Currency::parse("EUR").is_ok());
        for bad in ["eur", "EU", "EURO", "E1R", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
    }
}
