//! The `:authority` rewriter on unix sockets: every byte a local peer sends passes through it
//! before h2 sees it. Whatever the bytes and however they arrive, it must return (an error
//! at worst), never panic; and the first input byte picks the chunk size, so frame and
//! header-block boundaries fall anywhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wrapd::server::AuthorityRewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(rest);
    let mut rewriter = AuthorityRewriter::default();
    let mut out = Vec::new();
    for piece in input.chunks(usize::from(chunk).max(1)) {
        if rewriter.feed(piece, &mut out).is_err() {
            break;
        }
        out.clear();
    }
});
