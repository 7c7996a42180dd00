//! The S3 Encryption Client envelope parsers (`wrapd::client::s3ec`): object metadata and
//! instruction files come from a bucket others can write to. Neither may panic, whatever the
//! bytes; an envelope that parses must re-serialize to one that parses the same. The input is
//! tried as an instruction file, and as metadata entries (lines `KEY=VALUE`).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use wrapd::client::s3ec::{self, Envelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_instruction_file(data) {
        let again = Envelope::from_instruction_file(&envelope.to_instruction_file())
            .expect("a parsed envelope re-parses");
        assert_eq!(again, envelope);
        let _ = envelope.check_context(&envelope.user_context());
    }
    let text = String::from_utf8_lossy(data);
    let entries: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let _ = s3ec::detect(&entries);
    if let Ok(envelope) = Envelope::from_entries(&entries) {
        let reparsed: HashMap<String, String> = envelope.entries().into_iter().collect();
        assert_eq!(Envelope::from_entries(&reparsed).expect("re-parses"), envelope);
    }
});
