//! The ciphertext blob parser: untrusted bytes from every Unwrap, ReWrap and KMS Decrypt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::blob::Blob;

fuzz_target!(|data: &[u8]| {
    if let Ok(blob) = Blob::parse(data) {
        // Whatever parses re-encodes to exactly the input.
        assert_eq!(blob.encode(), data);
    }
});
