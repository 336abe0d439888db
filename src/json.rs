//! String escaping for the binary's log lines: JSON strings for
//! `--log-format json` (RFC 8259 §7) and the text format's values, written
//! by hand (no serde) and fuzzed against a reference parser
//! (`fuzz/fuzz_targets/json_escape.rs`). Compiled into the binary, and into
//! the library only for the fuzz targets.

/// Appends `value` as a JSON string, quotes included: `"` and `\` escaped,
/// every control character as `\n`, `\r`, `\t` or `\u00XX`. A `&str` is
/// valid UTF-8, so every other character is written as it is.
#[allow(unreachable_pub)] // public in the library's fuzzing seam only
pub fn write_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    escape(out, value, true, b"u00");
    out.push(b'"');
}

/// Appends `value` with `\` and every control character escaped, as `\n`,
/// `\r`, `\t`, or `\`, `hex` and two hex digits (`\u00XX` in JSON, `\xXX`
/// in the text log); and `"` as `\"` when `quote`. The text log shares it.
pub(crate) fn escape(out: &mut Vec<u8>, value: &str, quote: bool, hex: &[u8]) {
    let bytes = value.as_bytes();
    let escaped = |b: u8| b < 0x20 || b == 0x7f || b == b'\\' || (quote && b == b'"');
    // Most values need no escape; this pass finds out, and unlike the loop
    // below it vectorises (a sixth of the loop's time on a request line).
    if !bytes.iter().fold(false, |any, &b| any | escaped(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().filter(|&(_, &b)| escaped(b)) {
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        match b {
            b'\n' => out.push(b'n'),
            b'\r' => out.push(b'r'),
            b'\t' => out.push(b't'),
            b'\\' | b'"' => out.push(b),
            _ => {
                let digit = |n: u8| b"0123456789abcdef"[usize::from(n & 15)];
                out.extend_from_slice(hex);
                out.extend_from_slice(&[digit(b >> 4), digit(b)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
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
