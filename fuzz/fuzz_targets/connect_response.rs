//! The egress proxy's answer to CONNECT: only a 2xx head opens the tunnel,
//! and however the answer is split across reads, the verdict and the bytes
//! consumed are the same (RFC 9110 §9.3.6).
#![no_main]

use arbitrary::Unstructured;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The answer is the whole input, so corpus files are plain heads; the
    // split list is drawn from the same bytes with `arbitrary`.
    let mut u = Unstructured::new(data);
    let splits: Vec<u16> = u.arbitrary().unwrap_or_default();
    let splits: Vec<usize> = splits.into_iter().map(usize::from).collect();
    keyhole_fuzz::checks::connect_response(data, &splits);
    keyhole_fuzz::checks::connect_response(data, &(0..=data.len()).collect::<Vec<_>>());
});
