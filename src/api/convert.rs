//! Conversions between protobuf messages and domain types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost_types::{FieldMask, ListValue, Struct, Timestamp, Value, value::Kind};

use crate::{
    domain::{Preferences, Product, User, ValidationError},
    proto,
};

pub fn user_to_proto(user: User) -> proto::User {
    proto::User {
        id: user.id.to_string(),
        email: user.email,
        preferences: Some(json_object_to_struct(user.preferences)),
        version: user.version,
        created_at: Some(timestamp(user.created_at)),
        last_modified: Some(timestamp(user.last_modified)),
    }
}

pub fn product_to_proto(product: Product) -> proto::Product {
    proto::Product {
        id: product.id.to_string(),
        category_id: product.category_id,
        name: product.name,
        description: product.description,
        price_cents: product.price_cents,
        currency: product.currency,
        version: product.version,
        created_at: Some(timestamp(product.created_at)),
        updated_at: Some(timestamp(product.updated_at)),
    }
}

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Absent preferences are an empty object.
pub fn preferences(raw: Option<Struct>) -> Result<Preferences, ValidationError> {
    match raw {
        None => Ok(Preferences::empty()),
        Some(raw) => Preferences::parse(struct_to_json(raw)?),
    }
}

fn struct_to_json(raw: Struct) -> Result<serde_json::Value, ValidationError> {
    let fields = raw
        .fields
        .into_iter()
        .map(|(key, value)| Ok((key, value_to_json(value)?)))
        .collect::<Result<serde_json::Map<_, _>, ValidationError>>()?;
    Ok(serde_json::Value::Object(fields))
}

fn value_to_json(value: Value) -> Result<serde_json::Value, ValidationError> {
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| ValidationError::new("preferences", "numbers must be finite"))?,
        Some(Kind::StructValue(s)) => struct_to_json(s)?,
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.into_iter().map(value_to_json).collect::<Result<_, _>>()?)
        }
    })
}

/// Stored preferences are always an object (validated on the way in).
fn json_object_to_struct(value: serde_json::Value) -> Struct {
    match json_to_value(value).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

fn json_to_value(value: serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect::<BTreeMap<_, _>>(),
        }),
    };
    Value { kind: Some(kind) }
}

/// How much of an unknown update-mask path an error message repeats.
const MASK_PATH_SHOWN: usize = 64;

/// A field an update mask may name: each resource's updatable fields, as an
/// enum, so that applying a mask is a `match` with an arm per field.
pub trait MaskField: Copy + PartialEq + 'static {
    /// Every updatable field, in the order `*` applies them.
    const ALL: &'static [Self];
    /// The field's name in the API (the mask path).
    fn path(self) -> &'static str;
}

/// The fields an update of a user may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserField {
    Email,
    Preferences,
}

impl MaskField for UserField {
    const ALL: &'static [Self] = &[Self::Email, Self::Preferences];
    fn path(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Preferences => "preferences",
        }
    }
}

/// The fields an update of a product may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductField {
    CategoryId,
    Name,
    Description,
    PriceCents,
    Currency,
}

impl MaskField for ProductField {
    const ALL: &'static [Self] = &[
        Self::CategoryId,
        Self::Name,
        Self::Description,
        Self::PriceCents,
        Self::Currency,
    ];
    fn path(self) -> &'static str {
        match self {
            Self::CategoryId => "category_id",
            Self::Name => "name",
            Self::Description => "description",
            Self::PriceCents => "price_cents",
            Self::Currency => "currency",
        }
    }
}

/// The fields an update mask names, checked against those a resource lets
/// callers change. `*` means all of them (AIP-134); an empty mask is an error.
pub fn mask_fields<F: MaskField>(mask: Option<&FieldMask>) -> Result<Vec<F>, ValidationError> {
    let paths: Vec<&str> = mask
        .map(|m| m.paths.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if paths.is_empty() {
        return Err(ValidationError::new("update_mask", "must name at least one field"));
    }
    if paths == ["*"] {
        return Ok(F::ALL.to_vec());
    }
    paths
        .iter()
        .map(|path| {
            F::ALL
                .iter()
                .copied()
                .find(|field| field.path() == *path)
                .ok_or_else(|| {
                    // Quoted back in part only: a 60 KiB path should not come back whole.
                    let shown: String = path.chars().take(MASK_PATH_SHOWN).collect();
                    let cut = if shown.len() < path.len() { "…" } else { "" };
                    let updatable: Vec<&str> = F::ALL.iter().map(|field| field.path()).collect();
                    ValidationError::new(
                        "update_mask",
                        format!(
                            "cannot update {shown:?}{cut}; updatable fields are {}",
                            updatable.join(", ")
                        ),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_round_trip_through_struct() {
        let json = serde_json::json!({"theme": "dark", "n": 2.5, "tags": ["a", null, true], "nested": {"x": {}}});
        let back = struct_to_json(json_object_to_struct(json.clone())).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn non_finite_numbers_are_rejected() {
        let raw = Struct {
            fields: [(
                "x".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(preferences(Some(raw)).unwrap_err().field, "preferences");
    }

    #[test]
    fn masks_name_only_updatable_fields() {
        let mask = |paths: &[&str]| FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        };
        assert_eq!(
            mask_fields::<UserField>(Some(&mask(&["email"]))).unwrap(),
            [UserField::Email]
        );
        assert_eq!(
            mask_fields::<UserField>(Some(&mask(&["*"]))).unwrap(),
            [UserField::Email, UserField::Preferences]
        );
        assert_eq!(
            mask_fields::<ProductField>(Some(&mask(&["price_cents", "name"]))).unwrap(),
            [ProductField::PriceCents, ProductField::Name]
        );
        let unknown = mask_fields::<UserField>(Some(&mask(&["version"]))).unwrap_err();
        assert_eq!(unknown.field, "update_mask");
        assert!(unknown.message.contains("email, preferences"), "{}", unknown.message);
        assert_eq!(
            mask_fields::<UserField>(Some(&mask(&[]))).unwrap_err().field,
            "update_mask"
        );
        assert_eq!(mask_fields::<UserField>(None).unwrap_err().field, "update_mask");
        let long = "x".repeat(10_000);
        let message = mask_fields::<UserField>(Some(&mask(&[long.as_str()])))
            .unwrap_err()
            .message;
        assert!(message.len() < 200, "{message}");
    }
}
