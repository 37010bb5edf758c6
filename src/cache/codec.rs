//! The bytes of a cached value: a two-byte envelope, then MessagePack, zstd-compressed when large.
//!
//! ```text
//! [format version: u8][flags: u8][payload]     flags bit 0: payload is zstd
//! ```
//! The version byte lets a new encoding be rolled out without misreading old
//! entries; anything that does not decode is treated by callers as a miss.

use serde::{Serialize, de::DeserializeOwned};

const FORMAT_VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_ZSTD;
/// Fast level: values are small and written on every miss.
const ZSTD_LEVEL: i32 = 3;
/// Upper bound on a decompressed value, so a corrupt entry cannot make us allocate wildly.
const MAX_DECODED_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("value is shorter than its envelope")]
    Truncated,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("messagepack encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("messagepack decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes `value`, compressing the payload when it is larger than `compress_threshold` bytes.
pub fn encode<T: Serialize>(value: &T, compress_threshold: usize) -> Result<Vec<u8>, CodecError> {
    let payload = rmp_serde::to_vec(value)?;
    if payload.len() > compress_threshold {
        let compressed = zstd::bulk::compress(&payload, ZSTD_LEVEL).map_err(CodecError::Zstd)?;
        Ok(envelope(FLAG_ZSTD, &compressed))
    } else {
        Ok(envelope(0, &payload))
    }
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let [version, flags, payload @ ..] = bytes else {
        return Err(CodecError::Truncated);
    };
    if *version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(*version));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(CodecError::UnknownFlags(*flags));
    }
    if flags & FLAG_ZSTD != 0 {
        let raw = zstd::bulk::decompress(payload, MAX_DECODED_BYTES).map_err(CodecError::Zstd)?;
        Ok(rmp_serde::from_slice(&raw)?)
    } else {
        Ok(rmp_serde::from_slice(payload)?)
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&[FORMAT_VERSION, flags]);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        tags: Vec<String>,
    }

    fn sample(len: usize) -> Sample {
        Sample {
            name: "x".repeat(len),
            tags: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn small_values_round_trip_uncompressed() {
        let bytes = encode(&sample(10), 1024).unwrap();
        assert_eq!(bytes[..2], [FORMAT_VERSION, 0]);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample(10));
    }

    #[test]
    fn large_values_round_trip_compressed() {
        let bytes = encode(&sample(10_000), 1024).unwrap();
        assert_eq!(bytes[..2], [FORMAT_VERSION, FLAG_ZSTD]);
        assert!(bytes.len() < 1_000, "repetitive text compresses: {} bytes", bytes.len());
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample(10_000));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x02\x00abc",
            b"\x01\x80abc",
            b"\x01\x00\xc1\xff",
            b"\x01\x01not zstd",
        ] {
            assert!(decode::<Sample>(bytes).is_err(), "{bytes:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::domain::CASES))]

        /// Whatever Redis hands back, decoding fails or yields a value; it never panics.
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode::<crate::cache::Entry<crate::domain::User>>(&bytes);
            let _ = decode::<crate::cache::Entry<crate::domain::Product>>(&bytes);
            let _ = decode::<crate::cache::ListMeta>(&bytes);
        }

        /// The same behind a valid envelope, compressed or not, so the payload decoders are reached.
        #[test]
        fn any_payload_in_a_valid_envelope_decodes_or_fails(
            compressed in proptest::bool::ANY,
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let bytes = envelope(if compressed { FLAG_ZSTD } else { 0 }, &payload);
            let _ = decode::<crate::cache::Entry<crate::domain::User>>(&bytes);
            let _ = decode::<crate::cache::Entry<crate::domain::Product>>(&bytes);
        }
    }
}
