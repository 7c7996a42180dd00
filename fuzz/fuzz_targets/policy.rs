//! The policy loader (reloaded on SIGHUP from a file an operator edits).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(policy) = wrapd::auth::Policy::parse(text) {
        let principals = vec!["unix:uid=0".to_owned()];
        for op in wrapd::auth::Operation::ALL {
            let _ = policy.allows(&principals, *op, &wrapd::auth::Target::Any, None);
        }
    }
});
