//! Token budgets: the usage scanner must read the same counts however a
//! response body is split across reads, never panic, and read a valid JSON
//! body as a reference parser does.
#![no_main]

use arbitrary::Unstructured;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte picks the media type and the rest is the body, so corpus
    // files are `j` or `s` then a plain body; the read boundaries are drawn
    // from the same bytes with `arbitrary` (byte by byte is always checked).
    let splits: Vec<u16> = Unstructured::new(data).arbitrary().unwrap_or_default();
    let splits: Vec<usize> = splits.into_iter().map(usize::from).collect();
    keyhole_fuzz::checks::usage_scan(data, &splits);
});
