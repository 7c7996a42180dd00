//! Encryption-context validation and canonical serialization (request maps).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::context::EncryptionContext;

fuzz_target!(|entries: Vec<(String, String)>| {
    if let Ok(context) = EncryptionContext::from_entries(entries) {
        let bytes = context.serialize();
        assert!(bytes.len() <= wrapd::context::MAX_SERIALIZED_LEN);
        assert_eq!(bytes.is_empty(), context.is_empty());
    }
});
