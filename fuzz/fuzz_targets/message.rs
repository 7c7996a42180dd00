//! The Encryption SDK message reader: whole messages from files and stdin.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let _ = wrapd::client::message::decrypt(data, |_| Ok(Zeroizing::new(vec![0x42; 32])));
});
