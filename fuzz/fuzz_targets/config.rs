//! The daemon's TOML config loader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = wrapd::config::Config::parse(text, std::path::Path::new("/nonexistent"));
});
