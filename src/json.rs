//! JSON string escaping for the binary's `--log-format json` (RFC 8259 §7),
//! written by hand (no serde) and fuzzed against a reference parser
//! (`fuzz/fuzz_targets/json_escape.rs`). Compiled into the binary, and into
//! the library only for the fuzz targets.

/// Appends `value` as a JSON string, quotes included: `"` and `\` escaped,
/// every control character as `\n`, `\r`, `\t` or `\u00XX`. A `&str` is
/// valid UTF-8, so every other character is written as it is.
#[allow(unreachable_pub)] // public in the library's fuzzing seam only
pub fn write_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1f | 0x7f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(&[b'\\', short]);
        if short == b'u' {
            let hex = |n: u8| b"0123456789abcdef"[usize::from(n & 15)];
            out.extend_from_slice(&[b'0', b'0', hex(b >> 4), hex(b)]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::write_string;

    fn json(value: &str) -> String {
        let mut out = Vec::new();
        write_string(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_what_rfc_8259_requires() {
        assert_eq!(json(""), r#""""#);
        assert_eq!(json("plain /v1/x"), r#""plain /v1/x""#);
        assert_eq!(json("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(json("\n\r\t\0\x1b\x7f"), r#""\n\r\t\u0000\u001b\u007f""#);
        assert_eq!(json("é ✓"), "\"é ✓\"");
    }
}
