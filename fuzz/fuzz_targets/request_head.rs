//! Request smuggling and header injection: a client head keyhole accepts must
//! reach the upstream with one unambiguous framing, its key exactly once, and
//! no hop-by-hop, credential or duplicated Host field (S5–S11).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole_fuzz::checks::request_head(data));
