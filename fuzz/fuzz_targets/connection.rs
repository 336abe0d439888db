//! Pipelining desync through the real connection loop: bytes keyhole refuses
//! never reach an upstream, what does is exactly the rewritten requests in
//! order, and no split of the client stream hangs the loop (S14, S16).
#![no_main]

use arbitrary::Unstructured;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The stream is the whole input (corpus files are plain client streams);
    // the read boundaries are drawn from the same bytes with `arbitrary`.
    let splits: Vec<u16> = Unstructured::new(data).arbitrary().unwrap_or_default();
    let splits: Vec<usize> = splits.into_iter().map(usize::from).collect();
    keyhole_fuzz::checks::connection(data, &splits);
});
