//! Any bytes given to the record decoder and any string given as a key: a result or a typed
//! error, never a panic; a decoded record re-encodes to the same bytes.
#![no_main]

use kvstore_core::{envelope, validate_key, ErrorCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match envelope::decode(data) {
        Ok(record) => assert_eq!(envelope::encode(&record.metadata, &record.value), data),
        Err(err) => assert_eq!(err.code(), ErrorCode::Codec),
    }
    if let Ok(key) = std::str::from_utf8(data) {
        if let Err(err) = validate_key(key) {
            assert_eq!(err.code(), ErrorCode::IllegalKey);
        }
    }
});
