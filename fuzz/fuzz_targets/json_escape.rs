//! The JSON log escaper: any text round-trips through it and a reference
//! JSON parser, and no raw control byte reaches a log line.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole_fuzz::checks::json_escape(data));
