//! Page tokens (AIP-158): a `Cursor` made opaque and tamper-checked.
//!
//! ```text
//! base64url( [version: u8][generation: u64][position: u64][has key: u8][id: 16][name: utf-8 ...] [mac: 16] )
//! ```
//! The MAC is HMAC-SHA256 over the category and the payload, truncated to 16
//! bytes: a token only works for the category it was issued for, and any
//! change to it is INVALID_ARGUMENT. The key is the newest of the database's
//! `page_token_keys` (random, made by the migrations, so every instance
//! shares it with nothing to configure), or `PAGE_TOKEN_SECRET`; tokens
//! signed with any of the older keys are accepted too, so a key can be
//! rotated in before the old one goes. What a token decodes to is checked as
//! any request is: a position within a sorted set's reach, a product name
//! the domain accepts.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::{CategoryId, Cursor, ProductId, ProductName, ValidationError};

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
/// version, generation, position, has-key flag.
const HEADER_LEN: usize = 1 + 8 + 8 + 1;
const ID_LEN: usize = 16;
/// Longer than any token we issue (a product name is at most 800 bytes).
const MAX_TOKEN_LEN: usize = 2048;
/// The last position of the largest cached list: a Redis sorted set holds
/// fewer than 2^32 members.
const MAX_POSITION: u64 = u32::MAX as u64;

#[derive(Clone)]
pub struct PageTokens {
    /// The first signs; every one is accepted.
    keys: Vec<Vec<u8>>,
}

impl PageTokens {
    /// Tokens signed with `keys[0]`, and accepted when signed with any of
    /// `keys` (at least one).
    pub fn new(keys: Vec<Vec<u8>>) -> Self {
        assert!(!keys.is_empty(), "page tokens need a key");
        Self { keys }
    }

    pub fn encode(&self, category: &CategoryId, cursor: &Cursor) -> String {
        let mut bytes = Vec::with_capacity(HEADER_LEN + ID_LEN + 64 + MAC_LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&cursor.generation.to_be_bytes());
        bytes.extend_from_slice(&cursor.position.to_be_bytes());
        match &cursor.key {
            Some((name, id)) => {
                bytes.push(1);
                bytes.extend_from_slice(id.as_uuid().as_bytes());
                bytes.extend_from_slice(name.as_bytes());
            }
            None => bytes.push(0),
        }
        let mac = mac(&self.keys[0], category, &bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes()[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(&self, category: &CategoryId, token: &str) -> Result<Cursor, ValidationError> {
        let invalid = || ValidationError::new("page_token", "is not a token this service issued for this category");
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        if bytes.len() < HEADER_LEN + MAC_LEN {
            return Err(invalid());
        }
        let (payload, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        // Every key is tried, so timing does not tell which one matched.
        let authentic = self.keys.iter().fold(false, |authentic, key| {
            mac(key, category, payload).verify_truncated_left(tag).is_ok() | authentic
        });
        if !authentic {
            return Err(invalid());
        }
        // Authentic from here on: the layout is ours.
        let (header, rest) = payload.split_at(HEADER_LEN);
        if header[0] != VERSION {
            return Err(invalid());
        }
        let number = |range: std::ops::Range<usize>| u64::from_be_bytes(header[range].try_into().unwrap_or_default());
        let key = match header[17] {
            0 if rest.is_empty() => None,
            1 if rest.len() >= ID_LEN => {
                let (id, name) = rest.split_at(ID_LEN);
                let id = uuid::Uuid::from_slice(id).map_err(|_| invalid())?;
                let name = std::str::from_utf8(name).map_err(|_| invalid())?;
                // Checked before any query sees it, as a request's name is.
                let name = ProductName::parse(name).map_err(|_| invalid())?;
                Some((name.as_str().to_string(), ProductId::from_uuid(id)))
            }
            _ => return Err(invalid()),
        };
        let position = number(9..17);
        if position > MAX_POSITION {
            return Err(invalid());
        }
        Ok(Cursor {
            generation: number(1..9),
            position,
            key,
        })
    }
}

fn mac(key: &[u8], category: &CategoryId, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(category.as_str().as_bytes());
    // Categories hold no NUL, so the category and the payload cannot run into each other.
    mac.update(&[0]);
    mac.update(payload);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> PageTokens {
        PageTokens::new(vec![b"test secret".to_vec()])
    }

    fn category(name: &str) -> CategoryId {
        CategoryId::parse(name).unwrap()
    }

    fn cursor() -> Cursor {
        Cursor {
            generation: 42,
            position: 1_000_000,
            key: Some((
                "Grand Globe 7 – ünïcode".to_string(),
                ProductId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap(),
            )),
        }
    }

    #[test]
    fn tokens_round_trip() {
        let token = tokens().encode(&category("books"), &cursor());
        assert_eq!(tokens().decode(&category("books"), &token).unwrap(), cursor());
        let keyless = Cursor { key: None, ..cursor() };
        let token = tokens().encode(&category("books"), &keyless);
        assert_eq!(tokens().decode(&category("books"), &token).unwrap(), keyless);
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let token = tokens().encode(&category("books"), &cursor());
        let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            let tampered = URL_SAFE_NO_PAD.encode(tampered);
            let error = tokens().decode(&category("books"), &tampered).unwrap_err();
            assert_eq!(error.field, "page_token", "byte {i}");
        }
    }

    #[test]
    fn a_token_works_only_for_its_category_and_secret() {
        let token = tokens().encode(&category("books"), &cursor());
        assert!(tokens().decode(&category("games"), &token).is_err());
        assert!(
            PageTokens::new(vec![b"other".to_vec()])
                .decode(&category("books"), &token)
                .is_err()
        );
    }

    #[test]
    fn tokens_signed_with_a_previous_key_are_accepted_and_new_ones_use_the_first() {
        let old = tokens().encode(&category("books"), &cursor());
        let rotated = PageTokens::new(vec![b"new secret".to_vec(), b"test secret".to_vec()]);
        assert_eq!(rotated.decode(&category("books"), &old).unwrap(), cursor());
        let new = rotated.encode(&category("books"), &cursor());
        assert!(
            tokens().decode(&category("books"), &new).is_err(),
            "signed with the new key"
        );
    }

    #[test]
    fn an_authentic_token_out_of_bounds_or_with_a_name_the_domain_refuses_is_refused() {
        for position in [MAX_POSITION + 1, 1 << 63, u64::MAX - 4] {
            let token = tokens().encode(&category("books"), &Cursor { position, ..cursor() });
            assert!(
                tokens().decode(&category("books"), &token).is_err(),
                "position {position}"
            );
        }
        for name in ["nul\0name", "", "bidi\u{202E}"] {
            let key = Some((
                name.to_string(),
                ProductId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap(),
            ));
            let token = tokens().encode(&category("books"), &Cursor { key, ..cursor() });
            assert!(tokens().decode(&category("books"), &token).is_err(), "name {name:?}");
        }
        let deepest = Cursor {
            position: MAX_POSITION,
            ..cursor()
        };
        let token = tokens().encode(&category("books"), &deepest);
        assert_eq!(tokens().decode(&category("books"), &token).unwrap(), deepest);
    }

    #[test]
    fn garbage_is_refused() {
        for token in [
            "",
            "x",
            "!!!!",
            &"A".repeat(5000),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(tokens().decode(&category("books"), token).is_err(), "{token:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::domain::CASES))]

        /// A token from a client is whatever it sends: any string is rejected
        /// cleanly (forging the MAC by chance is out of reach), never a panic.
        #[test]
        fn any_token_string_is_rejected_without_panicking(token in proptest::prelude::any::<String>()) {
            let tokens = PageTokens::new(vec![b"secret".to_vec()]);
            let category = CategoryId::parse("books").unwrap();
            proptest::prop_assert!(tokens.decode(&category, &token).is_err());
        }

        /// The same for strings made of the token alphabet, which get past the base64 step.
        #[test]
        fn any_base64_token_is_rejected_without_panicking(token in "[A-Za-z0-9_-]{0,200}") {
            let tokens = PageTokens::new(vec![b"secret".to_vec()]);
            let category = CategoryId::parse("books").unwrap();
            proptest::prop_assert!(tokens.decode(&category, &token).is_err());
        }
    }
}
