//! Chunked-body desync (CVE-2025-55315 pattern): the decoder must reach the
//! same verdict, consume the same bytes and relay the same canonical body
//! however the input is split across reads (S10).
#![no_main]

use arbitrary::Unstructured;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The body is the whole input, so corpus files are plain chunked bodies;
    // the split list is drawn from the same bytes with `arbitrary`.
    let mut u = Unstructured::new(data);
    let splits: Vec<u16> = u.arbitrary().unwrap_or_default();
    let splits: Vec<usize> = splits.into_iter().map(usize::from).collect();
    keyhole_fuzz::checks::chunked_body(data, &splits);
    // One byte per read: the most adversarial split of all.
    keyhole_fuzz::checks::chunked_body(data, &(0..=data.len()).collect::<Vec<_>>());
});
