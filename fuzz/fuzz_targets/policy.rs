//! The policy loader (reloaded on SIGHUP from a file an operator edits).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(policy) = wrapd::auth::Policy::parse(text) {
        let principals = vec!["unix:uid=0".to_owned()];
        let request = wrapd::auth::RequestAttributes::new();
        for op in wrapd::auth::Operation::ALL {
            let target = wrapd::auth::Target::Any;
            let _ = policy.allows(&principals, *op, &target, None, &request);
            let _ = policy.allows_with_key_grant(&principals, *op, &target, None, &request);
        }
    }
});
