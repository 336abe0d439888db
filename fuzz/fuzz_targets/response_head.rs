//! Response splitting and desync: an upstream head keyhole relays must get the
//! RFC 9112 §6.3 framing (HEAD/1xx/204/304 bodiless, CL+TE refused) and reach
//! the client without upstream framing or hop-by-hop fields (R1–R3).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole_fuzz::checks::response_head(data));
