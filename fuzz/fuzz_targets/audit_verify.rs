//! `wrapctl audit verify`: reads audit files that may have been tampered with.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wrapd::audit::verify(data, None, None);
});
