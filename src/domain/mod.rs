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

use icu_properties::{
    CodePointMapData, CodePointSetData,
    props::{DefaultIgnorableCodePoint, GeneralCategory},
};
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

/// Characters that are not seen but change what is: general category `Cf`
/// (bidirectional overrides and isolates, which make `abc` display as `cba`,
/// "Trojan Source"; the soft hyphen; zero-width spaces and joiners; tag
/// characters) and `Default_Ignorable_Code_Point` (variation selectors, the
/// combining grapheme joiner, Hangul fillers). In an email or a name they
/// serve mostly to make two values look alike. From the Unicode data ICU4X
/// ships, not a hand-written table.
pub fn is_invisible(c: char) -> bool {
    CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
        || CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

/// A character that shows as something: not a space, a control character
/// or an invisible one.
pub fn is_visible(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !is_invisible(c)
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

/// Cases each property test runs (see the `proptest!` blocks).
#[cfg(test)]
pub(crate) const CASES: u32 = 2000;

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Every parser of text input answers Ok or a validation error for any
        /// string, and what it accepts keeps its invariants.
        #[test]
        fn text_parsers_never_panic_and_keep_their_invariants(raw in any::<String>()) {
            if let Ok(id) = UserId::parse(&raw) {
                prop_assert_eq!(UserId::parse(&id.to_string()).unwrap(), id);
            }
            if let Ok(id) = ProductId::parse(&raw) {
                prop_assert_eq!(ProductId::parse(&id.to_string()).unwrap(), id);
            }
            if let Ok(email) = Email::parse(&raw) {
                prop_assert!(email.as_str().chars().count() <= Email::MAX_LEN);
                prop_assert!(!email.as_str().chars().any(char::is_control));
            }
            if let Ok(category) = CategoryId::parse(&raw) {
                prop_assert!(category.as_str().len() <= CategoryId::MAX_LEN);
                let glob_or_tag = ['{', '}', '*', '?', '[', ']', ' '];
                prop_assert!(!category.as_str().contains(glob_or_tag), "{:?}", category);
            }
            if let Ok(name) = ProductName::parse(&raw) {
                prop_assert!(!name.as_str().is_empty() && !name.as_str().chars().any(char::is_control));
            }
            if let Ok(description) = Description::parse(&raw) {
                prop_assert!(!description.as_str().contains('\0'));
            }
            if let Ok(currency) = Currency::parse(&raw) {
                prop_assert_eq!(currency.as_str().len(), 3);
            }
        }

        #[test]
        fn number_parsers_never_panic(n in any::<i64>(), page in any::<i32>(), size in any::<i32>()) {
            if let Ok(version) = ExpectedVersion::parse(n) {
                prop_assert!(version.get().is_none_or(|v| v > 0));
            }
            if let Ok(price) = PriceCents::parse(n) {
                prop_assert!(price.get() >= 0);
            }
            if let Ok(request) = PageRequest::parse(page, size) {
                prop_assert!((1..=PageRequest::MAX_SIZE).contains(&request.size()));
            }
        }

        /// Any JSON: accepted preferences are an object within the bounds.
        #[test]
        fn preferences_accept_only_bounded_objects(value in json(4)) {
            if let Ok(preferences) = Preferences::parse(value) {
                let json = preferences.as_json();
                prop_assert!(json.is_object());
                prop_assert!(serde_json::to_vec(json).unwrap().len() <= Preferences::MAX_BYTES);
            }
        }
    }

    /// Arbitrary JSON values, nested up to `depth`.
    pub(crate) fn json(depth: u32) -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<f64>().prop_map(
                |n| serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
            ),
            any::<String>().prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(depth, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }
}
