//! Body framing state machines, pure over bytes.
//!
//! `BodyReader` consumes a body's bytes as they arrive, however they are split,
//! validates the framing (S10 for chunked, in both directions) and writes what
//! keyhole forwards: the payload unchanged, and for chunked bodies canonical
//! framing of its own (`{size:x}\r\n` data `\r\n` … `0\r\n\r\n`), with the
//! client's extensions and trailers validated and dropped. It stops exactly
//! at the end of the body, so pipelined bytes after it are never consumed.

use crate::config::{is_control, is_tchar};
use crate::head::Framing;

/// Most chunk-extension bytes per body (S10): they are dropped anyway, so a
/// generous cap only bounds the work an attacker can make keyhole do.
pub(crate) const MAX_EXTENSION_BYTES: u32 = 16 * 1024;
/// Most trailer bytes per body (S10, the same field-line budget idea as S15).
pub(crate) const MAX_TRAILER_BYTES: u32 = 16 * 1024;
/// Most trailer lines per body.
pub(crate) const MAX_TRAILER_LINES: u32 = 100;
/// 16 hex digits are all a u64 holds.
const MAX_SIZE_DIGITS: u8 = 16;

/// Why a body's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Bad chunk framing; the text names the rule.
    Chunk(&'static str),
    /// Chunk extensions or trailers over their budget.
    TooLarge(&'static str),
}

impl BodyError {
    /// The fixed text for this error.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            BodyError::Chunk(why) | BodyError::TooLarge(why) => why,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a size line.
    Size { digits: u8, size: u64 },
    /// In a chunk extension (after `;` or whitespace following the size).
    Extension {
        size: u64,
        quoted: bool,
        escaped: bool,
    },
    /// Saw the CR ending a size line.
    SizeLf { size: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// Saw the CR ending a trailer line.
    TrailerLf,
    /// Saw the CR of the final empty line.
    FinalLf,
    /// The body is complete.
    Done,
}

/// Consumes one body, validating its framing and emitting what is forwarded.
#[derive(Debug, Clone)]
pub(crate) struct BodyReader {
    state: State,
    payload: u64,
    extension_bytes: u32,
    trailer_bytes: u32,
    trailer_lines: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

impl BodyReader {
    /// A reader for a body with this framing.
    pub(crate) fn new(framing: Framing) -> BodyReader {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size { digits: 0, size: 0 }),
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader {
            state,
            payload: 0,
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_lines: 0,
        }
    }

    /// Has the whole body been consumed?
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes seen so far (framing excluded).
    pub(crate) fn payload(&self) -> u64 {
        self.payload
    }

    /// The peer closed cleanly: a close-delimited body is complete, and its
    /// terminating chunk goes to `out`. False if the body was cut short.
    pub(crate) fn finish_at_close(&mut self, out: &mut Vec<u8>) -> bool {
        if self.state == State::UntilClose {
            out.extend_from_slice(b"0\r\n\r\n");
            self.state = State::Done;
        }
        self.is_done()
    }

    /// How many leading bytes of `input` belong to a `Length` body; those
    /// pass through unchanged, so the caller may forward them straight from
    /// its buffer. `None` for bodies keyhole frames itself.
    pub(crate) fn passthrough(&mut self, input: &[u8]) -> Option<usize> {
        let take = match self.state {
            State::Length(n) => {
                let take = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                let left = n - take as u64;
                self.state = if left == 0 {
                    State::Done
                } else {
                    State::Length(left)
                };
                take
            }
            State::Done => 0,
            State::Chunked(_) | State::UntilClose => return None,
        };
        self.payload += take as u64;
        Some(take)
    }

    /// Consumes a prefix of `input`, appending what is forwarded to `out`.
    /// Returns how many bytes were consumed: all of `input`, or fewer when
    /// the body ended inside it.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        if let Some(take) = self.passthrough(input) {
            out.extend_from_slice(&input[..take]);
            return Ok(take);
        }
        // A close-delimited response is relayed as chunked, so that if the
        // upstream's stream is cut short the client sees no terminator and
        // cannot take the truncated body for a complete one.
        if self.state == State::UntilClose {
            if !input.is_empty() {
                write_size(out, input.len() as u64);
                out.extend_from_slice(input);
                out.extend_from_slice(b"\r\n");
                self.payload += input.len() as u64;
            }
            return Ok(input.len());
        }
        let mut i = 0;
        while i < input.len() {
            let State::Chunked(chunk) = self.state else {
                break;
            };
            if let Chunk::Data { remaining } = chunk {
                let take = (input.len() - i).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.payload += take as u64;
                let left = remaining - take as u64;
                self.state = State::Chunked(if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { remaining: left }
                });
                continue;
            }
            let next = self.step(chunk, input[i], out)?;
            self.state = if next == Chunk::Done {
                State::Done
            } else {
                State::Chunked(next)
            };
            i += 1;
        }
        Ok(i)
    }

    /// One byte of chunk framing (S10). Every branch either advances or
    /// refuses: there is no lenient path.
    fn step(&mut self, chunk: Chunk, byte: u8, out: &mut Vec<u8>) -> Result<Chunk, BodyError> {
        let bad = BodyError::Chunk;
        Ok(match chunk {
            Chunk::Size { digits, size } => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits == MAX_SIZE_DIGITS {
                        return Err(bad("chunk size too long"));
                    }
                    let value = u64::from((byte as char).to_digit(16).unwrap_or(0));
                    let size = size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(value))
                        .ok_or(bad("chunk size overflows"))?;
                    Chunk::Size {
                        digits: digits + 1,
                        size,
                    }
                }
                _ if digits == 0 => return Err(bad("chunk size is not hex")),
                b'\r' => Chunk::SizeLf { size },
                b';' | b' ' | b'\t' => {
                    self.count_extension()?;
                    Chunk::Extension {
                        size,
                        quoted: false,
                        escaped: false,
                    }
                }
                _ => return Err(bad("invalid byte after chunk size")),
            },
            Chunk::Extension {
                size,
                quoted,
                escaped,
            } => {
                self.count_extension()?;
                // chunk-ext grammar, loosely: tokens, `;`, `=`, BWS and quoted
                // strings; never a control byte or a bare CR/LF.
                if is_control(byte) && byte != b'\t' && (byte != b'\r' || quoted) {
                    return Err(bad("control byte in chunk extension"));
                }
                match (quoted, escaped, byte) {
                    (true, true, _) => Chunk::Extension {
                        size,
                        quoted,
                        escaped: false,
                    },
                    (true, false, b'\\') => Chunk::Extension {
                        size,
                        quoted,
                        escaped: true,
                    },
                    (true, false, b'"') => Chunk::Extension {
                        size,
                        quoted: false,
                        escaped: false,
                    },
                    (true, false, _) => chunk,
                    (false, _, b'"') => Chunk::Extension {
                        size,
                        quoted: true,
                        escaped: false,
                    },
                    (false, _, b'\r') => Chunk::SizeLf { size },
                    (false, _, b) if is_tchar(b) || b"; \t=".contains(&b) => chunk,
                    (false, _, _) => return Err(bad("invalid byte in chunk extension")),
                }
            }
            Chunk::SizeLf { size } => {
                if byte != b'\n' {
                    return Err(bad("chunk size line not ended by CRLF"));
                }
                if size == 0 {
                    Chunk::TrailerStart
                } else {
                    write_size(out, size);
                    Chunk::Data { remaining: size }
                }
            }
            Chunk::Data { .. } | Chunk::Done => return Err(bad("internal framing state")),
            Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
            Chunk::DataLf if byte == b'\n' => {
                out.extend_from_slice(b"\r\n");
                Chunk::Size { digits: 0, size: 0 }
            }
            Chunk::DataCr | Chunk::DataLf => return Err(bad("chunk data not followed by CRLF")),
            Chunk::TrailerStart => match byte {
                b'\r' => Chunk::FinalLf,
                _ if is_tchar(byte) => {
                    self.count_trailer(true)?;
                    Chunk::TrailerName
                }
                _ => return Err(bad("invalid trailer field")),
            },
            Chunk::TrailerName => {
                self.count_trailer(false)?;
                match byte {
                    b':' => Chunk::TrailerValue,
                    _ if is_tchar(byte) => chunk,
                    _ => return Err(bad("invalid trailer field name")),
                }
            }
            Chunk::TrailerValue => {
                self.count_trailer(false)?;
                match byte {
                    b'\r' => Chunk::TrailerLf,
                    _ if is_control(byte) && byte != b'\t' => {
                        return Err(bad("control byte in trailer value"))
                    }
                    _ => chunk,
                }
            }
            Chunk::TrailerLf if byte == b'\n' => Chunk::TrailerStart,
            Chunk::TrailerLf => return Err(bad("trailer line not ended by CRLF")),
            Chunk::FinalLf if byte == b'\n' => {
                out.extend_from_slice(b"0\r\n\r\n");
                Chunk::Done
            }
            Chunk::FinalLf => return Err(bad("chunked body not ended by CRLF")),
        })
    }

    fn count_extension(&mut self) -> Result<(), BodyError> {
        self.extension_bytes += 1;
        if self.extension_bytes > MAX_EXTENSION_BYTES {
            return Err(BodyError::TooLarge("chunk extensions too large"));
        }
        Ok(())
    }

    fn count_trailer(&mut self, new_line: bool) -> Result<(), BodyError> {
        self.trailer_bytes += 1;
        self.trailer_lines += u32::from(new_line);
        if self.trailer_bytes > MAX_TRAILER_BYTES || self.trailer_lines > MAX_TRAILER_LINES {
            return Err(BodyError::TooLarge("trailers too large"));
        }
        Ok(())
    }
}

/// Transitional name (see the body rewrite).
pub(crate) type Reframer = BodyReader;

/// Appends a canonical chunk size line.
fn write_size(out: &mut Vec<u8>, size: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = HEX[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole, then split at every point, and checks all agree.
    fn decode(input: &[u8]) -> Result<(usize, Vec<u8>, u64), BodyError> {
        let mut reader = BodyReader::new(Framing::Chunked);
        let mut out = Vec::new();
        let used = reader.feed(input, &mut out)?;
        let whole = (used, out, reader.payload());
        for split in 0..input.len() {
            let mut reader = BodyReader::new(Framing::Chunked);
            let mut out = Vec::new();
            let mut used = reader.feed(&input[..split], &mut out).unwrap();
            if used == split && !reader.is_done() {
                used += reader.feed(&input[split..], &mut out).unwrap();
            }
            assert_eq!(
                (used, &out, reader.payload()),
                (whole.0, &whole.1, whole.2),
                "split {split}"
            );
        }
        assert!(reader_done(input));
        Ok(whole)
    }

    fn reader_done(input: &[u8]) -> bool {
        let mut reader = BodyReader::new(Framing::Chunked);
        reader.feed(input, &mut Vec::new()).is_ok() && reader.is_done()
    }

    fn refused(input: &[u8]) -> bool {
        let mut reader = BodyReader::new(Framing::Chunked);
        reader.feed(input, &mut Vec::new()).is_err()
    }

    #[test]
    fn s10_canonical_reencoding() {
        let (used, out, payload) =
            decode(b"5;ext=\"a;b\"\r\nhello\r\n00A\r\n0123456789\r\n000\r\nX-T: v\r\n\r\nNEXT")
                .unwrap();
        assert_eq!(used, 52);
        assert_eq!(out, b"5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n");
        assert_eq!(payload, 15);
    }

    #[test]
    fn s10_bad_framing_refused() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"+5\r\nhello\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b" 5\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n",
            b"5\r\nhello\r\r",
            b"5;a\nb\r\n",
            b"5;a\x00\r\n",
            b"5;\"unbalanced\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX-T: v\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\n x: v\r\n\r\n",
            b"0\r\nX T: v\r\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(refused(bad), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!refused(b"ffffffffffffffff\r\n"));
    }

    #[test]
    fn s10_extension_budget() {
        let mut body = b"1;".to_vec();
        body.resize(2 + MAX_EXTENSION_BYTES as usize, b'a');
        assert!(matches!(
            BodyReader::new(Framing::Chunked).feed(&body, &mut Vec::new()),
            Err(BodyError::TooLarge(_))
        ));
    }

    #[test]
    fn length_stops_at_end() {
        let mut reader = BodyReader::new(Framing::Length(3));
        let mut out = Vec::new();
        assert_eq!(reader.feed(b"ab", &mut out).unwrap(), 2);
        assert!(!reader.is_done());
        assert_eq!(reader.feed(b"cdef", &mut out).unwrap(), 1);
        assert!(reader.is_done());
        assert_eq!(out, b"abc");
        let mut reader = BodyReader::new(Framing::UntilClose);
        let mut out = Vec::new();
        assert_eq!(reader.feed(b"xyz", &mut out).unwrap(), 3);
        assert!(reader.finish_at_close(&mut out));
        assert_eq!(out, b"3\r\nxyz\r\n0\r\n\r\n");
    }
}
