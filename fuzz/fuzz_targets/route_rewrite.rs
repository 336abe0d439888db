//! Path traversal and route confusion: no target (dot segments, %2e, encoded
//! slashes, backslashes, prefix-boundary tricks) escapes its route's upstream
//! base path or reaches the other route (S3, S4).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhole_fuzz::checks::route_rewrite(data));
