//! Body framing, pure over bytes: no IO, no tokio, no clocks.
//!
//! `Reframer` consumes one body's bytes as they arrive, however they are
//! split, validates its framing (chunked strictly, in both directions) and
//! writes what keyhole forwards: the payload unchanged and, for chunked and
//! close-delimited bodies, canonical chunked framing of its own
//! (`{size:x}\r\n` data `\r\n` … `0\r\n\r\n`). The peer's chunk extensions and
//! trailer fields are validated and dropped, so no framing byte that keyhole
//! did not write reaches the other side: a parser there that reads chunked
//! framing differently has nothing left to disagree about. It stops exactly
//! at the end of the body, so pipelined bytes after it are never consumed.
//!
//! The chunked decoder has one state per position in the RFC 9112 §7.1
//! grammar, and each byte either advances it or is refused: there is no
//! lenient path and no resynchronising. Data is copied in runs, not per byte.

use crate::config::{is_control, is_tchar};
use crate::head::Framing;
use std::io::Write as _;
use std::sync::Arc;

use crate::budget::Budget;
use crate::usage::{BodyKind, Usage, UsageScan};

/// Most chunk-extension bytes per body. RFC 9112 §7.1.1 asks a recipient to
/// limit them; keyhole drops them anyway, so the cap only bounds the work a
/// peer can make it do.
pub(crate) const MAX_EXTENSION_BYTES: u32 = 16 * 1024;
/// Most trailer bytes per body: trailer fields are field lines (RFC 9112
/// §7.1.2), bounded like a head's (RFC 9110 §5.4) even though dropped.
pub(crate) const MAX_TRAILER_BYTES: u32 = 16 * 1024;
/// Most trailer lines per body, the same as the default cap on a head's
/// field lines (`config::DEFAULT_MAX_HEADERS`): real trailers are a handful.
pub(crate) const MAX_TRAILER_LINES: u32 = 100;
/// Most hex digits in a chunk size: 16 are all a u64 holds, and counting
/// leading zeros too keeps a size line's length bounded.
const MAX_SIZE_DIGITS: u8 = 16;

/// Why a body's framing was refused: bad chunk framing, or chunk extensions
/// or trailers over their budget; the fixed text names what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyError(&'static str);

impl BodyError {
    /// The fixed text for this error.
    pub(crate) fn reason(self) -> &'static str {
        self.0
    }
}

/// Where the chunked decoder is in RFC 9112 §7.1's
/// `chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF`, with the last
/// chunk (size 0) followed by `trailer-section CRLF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In `chunk-size = 1*HEXDIG`, with `digits` read so far.
    Size { digits: u8 },
    /// In the size line's `chunk-ext`.
    Extension(Extension),
    /// Saw the CR ending a size line.
    SizeLf,
    /// In `chunk-data`, with `remaining` bytes to go.
    Data { remaining: u64 },
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// In the trailer section, after the last chunk.
    Trailer(Trailer),
    /// The body is complete.
    Done,
}

/// Where a size line is in RFC 9112 §7.1.1's
/// `chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extension {
    /// In BWS after the size or a value: only a `;` may end it.
    Bws,
    /// After `;`: BWS, then a name.
    NameStart,
    /// In a `chunk-ext-name`.
    Name,
    /// In BWS after a name: `=` or `;` must end it.
    NameBws,
    /// After `=`: BWS, then a value.
    ValueStart,
    /// In a token `chunk-ext-val`.
    Token,
    /// In a quoted-string `chunk-ext-val`.
    Quoted,
    /// After a `\` in a quoted-string.
    QuotedEscape,
    /// After a quoted-string's closing `"`.
    QuotedEnd,
}

/// Where the decoder is in RFC 9112 §7.1.2's `trailer-section =
/// *( field-line CRLF )`, then the CRLF ending the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trailer {
    /// At the start of a field line or of the final empty line.
    Start,
    /// In a field name.
    Name,
    /// In a field value.
    Value,
    /// Saw the CR ending a field line.
    Lf,
    /// Saw the CR of the final empty line.
    EndLf,
}

/// Consumes one body, validating its framing and writing it re-framed.
#[derive(Debug, Default)]
pub(crate) struct Reframer {
    /// Where in the body the next byte falls.
    state: State,
    /// The size read so far on the current size line.
    size: u64,
    /// Payload bytes seen (framing excluded).
    payload: u64,
    /// Chunk-extension bytes seen, against `MAX_EXTENSION_BYTES`.
    extension_bytes: u32,
    /// Trailer bytes seen, against `MAX_TRAILER_BYTES`.
    trailer_bytes: u32,
    /// Trailer lines seen, against `MAX_TRAILER_LINES`.
    trailer_lines: u32,
    /// Reads the model-token usage out of the payload (token budgets).
    usage: Option<Box<Observer>>,
}

/// A usage scanner, and the budget to charge once the body is complete.
#[derive(Debug)]
struct Observer {
    scan: UsageScan,
    charge: Option<Arc<Budget>>,
}

/// The body's framing, and how far it has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// A Content-Length body with this many bytes to go.
    Length(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// A body that ends when the peer closes.
    UntilClose,
    /// The body is complete.
    #[default]
    Done,
}

impl Reframer {
    /// A reframer for a body with this framing.
    pub(crate) fn new(framing: Framing) -> Reframer {
        Reframer {
            state: match framing {
                Framing::Empty | Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::Chunked(Chunk::Size { digits: 0 }),
                Framing::UntilClose => State::UntilClose,
            },
            ..Reframer::default()
        }
    }

    /// Shows every payload byte from now on to a usage scanner for `kind`,
    /// whose tokens `settle` charges to `budget`.
    pub(crate) fn observe_usage(&mut self, kind: BodyKind, budget: Arc<Budget>) {
        let scan = UsageScan::new(kind);
        let charge = Some(budget);
        self.usage = Some(Box::new(Observer { scan, charge }));
    }

    /// The usage seen in the payload, if it was observed.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage.as_ref().map(|o| o.scan.usage())
    }

    /// Charges the usage seen to the budget, once: as soon as the body is
    /// complete (`done`), before its last bytes are written, so that the
    /// client's next request finds the budget charged; or when the relay stops.
    pub(crate) fn settle(&mut self) {
        if let Some(observer) = &mut self.usage {
            let usage = observer.scan.usage();
            if let Some(budget) = observer.charge.take().filter(|_| usage.seen()) {
                budget.charge(usage.tokens_in(), usage.tokens_out());
            }
        }
    }

    /// Takes the leading run of `input` that a body with `remaining` bytes
    /// to go has there: counts it and shows it to the usage scanner. Returns
    /// its length, and how many bytes are still to go.
    fn payload_run(&mut self, remaining: u64, input: &[u8]) -> (usize, u64) {
        let take = input.len().min(remaining.try_into().unwrap_or(usize::MAX));
        self.payload += take as u64;
        if let Some(observer) = &mut self.usage {
            observer.scan.feed(&input[..take]);
        }
        (take, remaining - take as u64)
    }

    /// The state of a body just completed, whose usage is charged at once.
    fn done(&mut self) -> State {
        self.settle();
        State::Done
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
            self.state = self.done();
        }
        self.is_done()
    }

    /// How many leading bytes of `input` belong to a `Length` body; those
    /// pass through unchanged, so the caller may forward them straight from
    /// its buffer. `None` for bodies keyhole frames itself.
    pub(crate) fn passthrough(&mut self, input: &[u8]) -> Option<usize> {
        match self.state {
            State::Length(n) => {
                let (take, left) = self.payload_run(n, input);
                self.state = match left {
                    0 => self.done(),
                    left => State::Length(left),
                };
                Some(take)
            }
            State::Done => Some(0),
            State::Chunked(_) | State::UntilClose => None,
        }
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
        // cannot take the truncated body for a complete one. (No input makes
        // no chunk: the loop below takes nothing from a body not chunked.)
        if self.state == State::UntilClose && !input.is_empty() {
            write_size(out, input.len() as u64);
            out.extend_from_slice(input);
            out.extend_from_slice(b"\r\n");
            self.payload_run(u64::MAX, input);
            return Ok(input.len());
        }
        let mut i = 0;
        while let (Some(&byte), State::Chunked(chunk)) = (input.get(i), self.state) {
            let (next, used) = match chunk {
                Chunk::Data { remaining } => self.data(remaining, &input[i..], out),
                _ => (self.step(chunk, byte, out)?, 1),
            };
            self.state = match next {
                Chunk::Done => self.done(),
                _ => State::Chunked(next),
            };
            i += used;
        }
        Ok(i)
    }

    /// One byte of chunk framing: the next state, or a refusal.
    fn step(&mut self, chunk: Chunk, byte: u8, out: &mut Vec<u8>) -> Result<Chunk, BodyError> {
        let next = match chunk {
            Chunk::Size { digits } => self.size(digits, byte)?,
            Chunk::Extension(at) => extension(at, byte)?,
            Chunk::SizeLf => self.size_end(byte, out)?,
            // The CRLF after chunk data (RFC 9112 §7.1). Anything else means
            // the size did not match the data, refused rather than guessed at.
            Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
            Chunk::DataLf if byte == b'\n' => {
                out.extend_from_slice(b"\r\n");
                Chunk::Size { digits: 0 }
            }
            Chunk::DataCr | Chunk::DataLf => return Err(bad("chunk data not followed by CRLF")),
            Chunk::Trailer(at) => trailer(at, byte, out)?,
            // `feed` copies data runs itself and stops once the body is done.
            Chunk::Data { .. } | Chunk::Done => return Err(bad("internal framing state")),
        };
        self.count(next)?;
        Ok(next)
    }

    /// A byte of a size line before any extension. RFC 9112 §7.1:
    /// `chunk-size = 1*HEXDIG`, so an empty size, a sign, `0x` or leading
    /// whitespace is refused; at most `MAX_SIZE_DIGITS` digits, which a u64
    /// always holds.
    fn size(&mut self, digits: u8, byte: u8) -> Result<Chunk, BodyError> {
        let Some(value) = char::from(byte).to_digit(16) else {
            return match digits {
                0 => Err(bad("chunk size is not hex")),
                _ => extension_or_end(byte),
            };
        };
        if digits == MAX_SIZE_DIGITS {
            return Err(bad("chunk size too long"));
        }
        self.size = (self.size << 4) | u64::from(value);
        Ok(Chunk::Size { digits: digits + 1 })
    }

    /// The LF ending a size line. RFC 9112 §7.1 ends it with CRLF; a bare CR
    /// or LF is refused because other parsers disagree on what it means.
    fn size_end(&mut self, byte: u8, out: &mut Vec<u8>) -> Result<Chunk, BodyError> {
        if byte != b'\n' {
            return Err(bad("chunk size line not ended by CRLF"));
        }
        Ok(match std::mem::take(&mut self.size) {
            0 => Chunk::Trailer(Trailer::Start),
            size => {
                write_size(out, size);
                Chunk::Data { remaining: size }
            }
        })
    }

    /// As much of a chunk's data as `input` holds, copied as one run; and
    /// how many bytes that took.
    fn data(&mut self, remaining: u64, input: &[u8], out: &mut Vec<u8>) -> (Chunk, usize) {
        let (take, left) = self.payload_run(remaining, input);
        out.extend_from_slice(&input[..take]);
        match left {
            0 => (Chunk::DataCr, take),
            left => (Chunk::Data { remaining: left }, take),
        }
    }

    /// Charges the byte that moved the decoder `to` a state against the
    /// per-body budgets: every byte from the first `;` or BWS after a size up
    /// to the CR ending its line, every trailer byte up to each line's CR, and
    /// each trailer line at its CR.
    fn count(&mut self, to: Chunk) -> Result<(), BodyError> {
        match to {
            Chunk::Extension(_) => self.extension_bytes += 1,
            Chunk::Trailer(Trailer::Name | Trailer::Value | Trailer::Lf) => self.trailer_bytes += 1,
            _ => {}
        }
        self.trailer_lines += u32::from(to == Chunk::Trailer(Trailer::Lf));
        if self.extension_bytes > MAX_EXTENSION_BYTES {
            return Err(bad("chunk extensions too large"));
        }
        if self.trailer_bytes > MAX_TRAILER_BYTES || self.trailer_lines > MAX_TRAILER_LINES {
            return Err(bad("trailers too large"));
        }
        Ok(())
    }
}

/// HTAB, SP, VCHAR or obs-text: the bytes of RFC 9110 §5.6.4's quoted-pair
/// and of a field value (RFC 9110 §5.5); never a control byte, CR or LF.
fn is_text(byte: u8) -> bool {
    byte == b'\t' || !is_control(byte)
}

/// A byte after the size or after a whole extension. RFC 9112 §7.1.1 allows
/// a further extension's `;`, the BWS before it, or the CR ending the line.
fn extension_or_end(byte: u8) -> Result<Chunk, BodyError> {
    match byte {
        b';' => Ok(Chunk::Extension(Extension::NameStart)),
        b' ' | b'\t' => Ok(Chunk::Extension(Extension::Bws)),
        b'\r' => Ok(Chunk::SizeLf),
        _ => Err(bad("invalid byte in chunk size line")),
    }
}

/// One byte of a chunk extension (RFC 9112 §7.1.1). Extensions are dropped,
/// but parsed strictly all the same: where a lenient parser and a strict
/// one disagree on where a size line ends, bodies can be smuggled.
fn extension(at: Extension, byte: u8) -> Result<Chunk, BodyError> {
    use Extension as E;
    let bws = matches!(byte, b' ' | b'\t');
    let next = match at {
        // In RFC 9112 §7.1.1, BWS after a size or value only ever precedes
        // `;`: whitespace then CRLF matches no rule, so it is refused.
        E::Bws if bws => E::Bws,
        E::Bws if byte == b';' => E::NameStart,
        E::Bws => return Err(bad("whitespace in chunk size line not before `;`")),
        // A name is a token (RFC 9110 §5.6.2), and it is not optional.
        E::NameStart if bws => E::NameStart,
        E::NameStart | E::Name if is_tchar(byte) => E::Name,
        E::NameStart => return Err(bad("chunk extension without a name")),
        E::Name | E::NameBws if byte == b'=' => E::ValueStart,
        E::Name | E::NameBws if bws => E::NameBws,
        E::NameBws if byte == b';' => E::NameStart,
        E::NameBws => return Err(bad("whitespace in chunk extension not before `=` or `;`")),
        // `=` needs a value: a token or a quoted-string.
        E::ValueStart if bws => E::ValueStart,
        E::ValueStart if byte == b'"' => E::Quoted,
        E::ValueStart | E::Token if is_tchar(byte) => E::Token,
        E::ValueStart => return Err(bad("chunk extension without a value")),
        // A name or value may be the line's last: `;`, BWS or CR may follow.
        E::Name | E::Token | E::QuotedEnd => return extension_or_end(byte),
        // RFC 9110 §5.6.4: qdtext is HTAB, SP, 0x21, 0x23-0x5B, 0x5D-0x7E and
        // obs-text; a quoted-pair is `\` then HTAB, SP, VCHAR or obs-text. So
        // a quoted-string never holds a control byte, and never spans a line.
        E::Quoted if byte == b'"' => E::QuotedEnd,
        E::Quoted if byte == b'\\' => E::QuotedEscape,
        E::Quoted | E::QuotedEscape if is_text(byte) => E::Quoted,
        E::Quoted | E::QuotedEscape => return Err(bad("invalid byte in quoted chunk extension")),
    };
    Ok(Chunk::Extension(next))
}

/// One byte of the trailer section (RFC 9112 §7.1.2). Its fields are
/// dropped, but each line must still be a field line, so that no line can be
/// read as the end of the body or the start of another message.
fn trailer(at: Trailer, byte: u8, out: &mut Vec<u8>) -> Result<Chunk, BodyError> {
    use Trailer as T;
    let next = match at {
        T::Start if byte == b'\r' => T::EndLf,
        // A field name is a token (RFC 9110 §5.6.2): it is never empty, and
        // leading whitespace (obs-fold, RFC 9112 §5.2) is refused.
        T::Start if is_tchar(byte) => T::Name,
        T::Start => return Err(bad("invalid trailer field")),
        T::Name if byte == b':' => T::Value,
        T::Name if is_tchar(byte) => T::Name,
        T::Name => return Err(bad("invalid trailer field name")),
        T::Value if byte == b'\r' => T::Lf,
        T::Value if is_text(byte) => T::Value,
        T::Value => return Err(bad("control byte in trailer value")),
        // CRLF only, as for every line of the body (RFC 9112 §7.1): parsers
        // that also take a bare LF disagree with us on where lines end.
        T::Lf if byte == b'\n' => T::Start,
        T::Lf => return Err(bad("trailer line not ended by CRLF")),
        T::EndLf if byte == b'\n' => {
            out.extend_from_slice(b"0\r\n\r\n");
            return Ok(Chunk::Done);
        }
        T::EndLf => return Err(bad("chunked body not ended by CRLF")),
    };
    Ok(Chunk::Trailer(next))
}

/// A refusal of a body's framing.
fn bad(why: &'static str) -> BodyError {
    BodyError(why)
}

/// Appends a canonical chunk size line: lowercase hex, no leading zeros.
fn write_size(out: &mut Vec<u8>, size: u64) {
    // Writing into a `Vec` cannot fail.
    let _ = write!(out, "{size:x}\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a decode gives: bytes used, output, payload, done.
    type Decoded = Result<(usize, Vec<u8>, u64, bool), BodyError>;

    /// Where to split `input` in two: at every byte position, or for the big
    /// inputs of the budget tests at a few hundred positions spread over it.
    fn splits(input: &[u8]) -> impl Iterator<Item = usize> {
        let step = (input.len() / 256).max(1);
        (0..=input.len()).step_by(step).chain([input.len()])
    }

    /// A short, printable name for `input` in failure messages.
    fn show(input: &[u8]) -> String {
        format!(
            "{:?}",
            String::from_utf8_lossy(&input[..input.len().min(48)])
        )
    }

    /// Decodes `input` fed in `pieces`, stopping once the body is done.
    fn decode_pieces(pieces: &[&[u8]]) -> Decoded {
        let mut reframer = Reframer::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut used = 0;
        for piece in pieces {
            used += reframer.feed(piece, &mut out)?;
            if reframer.is_done() {
                break;
            }
        }
        Ok((used, out, reframer.payload(), reframer.is_done()))
    }

    /// Decodes `input` fed whole, checking that split in two anywhere it
    /// gives the same result, refusal included.
    fn decode(input: &[u8]) -> Decoded {
        let whole = decode_pieces(&[input]);
        for split in splits(input) {
            let (head, tail) = input.split_at(split);
            let got = decode_pieces(&[head, tail]);
            assert_eq!(got, whole, "{} split at {split}", show(input));
        }
        whole
    }

    /// Checks a complete body is accepted however split, re-framed as
    /// `canonical`, and that the canonical form decodes to itself.
    fn accepts(input: &[u8], canonical: &[u8]) {
        let name = show(input);
        let (used, out, payload, done) = decode(input).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!((used, done), (input.len(), true), "{name}");
        assert_eq!(out, canonical, "{name}");
        assert_eq!(decode(&out), Ok((out.len(), out.clone(), payload, true)));
    }

    /// Checks `input` is refused for `reason`, fed whole and however split.
    fn refuses(input: &[u8], reason: &str) {
        let got = decode(input).map(|_| ()).map_err(BodyError::reason);
        assert_eq!(got, Err(reason), "{}", show(input));
    }

    /// One test per refusing transition: its name, inputs, and the reason.
    macro_rules! refused {
        ($($name:ident: [$($input:expr),* $(,)?] => $reason:expr;)*) => {$(
            #[test]
            fn $name() {
                $(refuses($input, $reason);)*
            }
        )*};
    }

    const NOT_HEX: &str = "chunk size is not hex";
    const SIZE_LINE: &str = "invalid byte in chunk size line";
    const QUOTED: &str = "invalid byte in quoted chunk extension";
    const DATA_END: &str = "chunk data not followed by CRLF";

    refused! {
        // The audit's defect: BWS is only allowed before an extension's `;`.
        chunk_size_followed_by_whitespace_without_extension_is_refused: [
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\t\r\nhello\r\n0\r\n\r\n",
            b"5 \t x\r\n",
            b"5;a=b \r\n",
            b"5;a=\"b\" \r\n",
        ] => "whitespace in chunk size line not before `;`";
        empty_size_line_is_refused: [b"\r\nhello\r\n", b";a\r\n"] => NOT_HEX;
        signed_or_prefixed_size_is_refused: [b"+5\r\n", b"-5\r\n", b"x\r\n", b" 5\r\n"] => NOT_HEX;
        byte_after_size_digits_is_refused: [b"0x5\r\n", b"5g\r\n", b"5\n", b"5\x00\r\n"] => SIZE_LINE;
        seventeen_size_digits_are_refused: [
            b"00000000000000005\r\n",
            b"10000000000000000\r\n",
        ] => "chunk size too long";
        size_line_bare_cr_is_refused: [
            b"5\rhello",
            b"5;a\r\r\n",
        ] => "chunk size line not ended by CRLF";
        extension_without_name_is_refused: [
            b"5;\r\n",
            b"5;=x\r\n",
            b"5; \r\n",
            b"5;;a\r\n",
            b"5;\"q\"\r\n",
        ] => "chunk extension without a name";
        byte_in_extension_name_is_refused: [
            b"5;a\nb\r\n",
            b"5;a\x00\r\n",
            b"5;a\"b\"\r\n",
            b"5;a@\r\n",
        ] => SIZE_LINE;
        whitespace_after_extension_name_not_before_equals_or_semicolon_is_refused: [
            b"5;a \r\n",
            b"5;a b\r\n",
        ] => "whitespace in chunk extension not before `=` or `;`";
        extension_equals_without_value_is_refused: [
            b"5;a=\r\n",
            b"5;a=;b\r\n",
            b"5;a= \r\n",
            b"5;a==b\r\n",
        ] => "chunk extension without a value";
        byte_in_token_value_is_refused: [b"5;a=b\nx\r\n", b"5;a=b\"c\"\r\n", b"5;a=b=c\r\n"] => SIZE_LINE;
        control_byte_in_quoted_value_is_refused: [
            b"5;a=\"\r\n\"\r\n",
            b"5;a=\"\x00\"\r\n",
            b"5;a=\"\x7f\"\r\n",
            b"5;a=\"unbalanced\r\n",
        ] => QUOTED;
        control_byte_after_quoted_pair_backslash_is_refused: [
            b"5;a=\"\\\n\"\r\n",
            b"5;a=\"\\\x01\"\r\n",
        ] => QUOTED;
        byte_after_closing_quote_is_refused: [b"5;a=\"b\"c\r\n", b"5;a=\"b\"\"\r\n"] => SIZE_LINE;
        data_longer_than_size_is_refused: [b"5\r\nhelloX\r\n", b"5\r\nhello\n"] => DATA_END;
        data_cr_without_lf_is_refused: [b"5\r\nhello\r\r\n", b"5\r\nhello\rX"] => DATA_END;
        trailer_line_not_starting_with_token_is_refused: [
            b"0\r\n: v\r\n\r\n",
            b"0\r\n x: v\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nX-T: v\r\n\tobs-fold\r\n\r\n",
        ] => "invalid trailer field";
        byte_in_trailer_name_is_refused: [
            b"0\r\nX T: v\r\n\r\n",
            b"0\r\nnot a trailer\r\n\r\n",
            b"0\r\nX\r\n\r\n",
        ] => "invalid trailer field name";
        control_byte_in_trailer_value_is_refused: [
            b"0\r\nX-T: a\x00b\r\n\r\n",
            b"0\r\nX-T: v\n\r\n",
        ] => "control byte in trailer value";
        trailer_line_bare_cr_is_refused: [b"0\r\nX-T: v\r\r\n"] => "trailer line not ended by CRLF";
        final_line_bare_cr_is_refused: [
            b"0\r\n\r\r",
            b"0\r\nX-T: v\r\n\rGET",
        ] => "chunked body not ended by CRLF";
    }

    #[test]
    fn sixteen_size_digits_are_accepted() {
        let max = b"ffffffffffffffff\r\n";
        assert_eq!(
            decode(max),
            Ok((max.len(), b"ffffffffffffffff\r\n".to_vec(), 0, false))
        );
        accepts(
            b"0000000000000001\r\nx\r\n0\r\n\r\n",
            b"1\r\nx\r\n0\r\n\r\n",
        );
    }

    #[test]
    fn extension_bytes_over_budget_are_refused() {
        // Every byte from the `;` counts: `;` plus the rest of the budget fits.
        let mut body = b"1;".to_vec();
        body.resize(1 + MAX_EXTENSION_BYTES as usize, b'a');
        assert_eq!(decode(&body).map(|r| r.3), Ok(false));
        body.push(b'a');
        refuses(&body, "chunk extensions too large");
        // The budget is per body, not per chunk.
        let many = b"1;e=xxxxxxxxxxxx\r\na\r\n".repeat(MAX_EXTENSION_BYTES as usize / 15 + 1);
        refuses(&many, "chunk extensions too large");
    }

    #[test]
    fn many_chunks_without_extensions_spend_no_extension_budget() {
        let chunks = b"1\r\na\r\n".repeat(MAX_EXTENSION_BYTES as usize + 1);
        let body = [chunks, b"0\r\n\r\n".to_vec()].concat();
        assert_eq!(decode_pieces(&[&body]).map(|r| r.3), Ok(true));
    }

    #[test]
    fn trailer_bytes_over_budget_are_refused() {
        // Name, colon and value all count; the budget allows exactly this much.
        let mut body = b"0\r\nX:".to_vec();
        body.resize(3 + MAX_TRAILER_BYTES as usize, b'v');
        assert_eq!(decode(&body).map(|r| r.3), Ok(false));
        body.push(b'v');
        refuses(&body, "trailers too large");
    }

    #[test]
    fn trailer_lines_over_budget_are_refused() {
        let lines = b"a:\r\n".repeat(MAX_TRAILER_LINES as usize);
        accepts(&[b"0\r\n", &lines[..], b"\r\n"].concat(), b"0\r\n\r\n");
        let body = [b"0\r\n", &lines[..], b"a:\r\n"].concat();
        refuses(&body, "trailers too large");
    }

    #[test]
    fn valid_bodies_reframe_identically_however_split() {
        let hello = b"5\r\nhello\r\n0\r\n\r\n";
        for input in [
            &hello[..],
            b"5;a\r\nhello\r\n0\r\n\r\n",
            b"5 ;a\r\nhello\r\n0\r\n\r\n",
            b"5\t; a = b ;c;d=\"\"\r\nhello\r\n0;last\r\n\r\n",
            b"5;a=\"x\\\"y\\\\; \t\x80\xff!#[]~\" ; b=c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"\\\t\\ \\\xff\\a\"\r\nhello\r\n0\r\n\r\n",
            b"5;!#$%&'*+-.^_`|~09azAZ=!#$%&'*+-.^_`|~\r\nhello\r\n0\r\n\r\n",
            b"0005\r\nhello\r\n000\r\nX-A: 1\r\nx-b:\t2 \xff\r\nc:\r\n\r\n",
        ] {
            accepts(input, hello);
        }
        accepts(b"0\r\n\r\n", b"0\r\n\r\n");
        let two = b"A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n";
        accepts(two, b"a\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n");
    }

    #[test]
    fn stops_at_the_end_of_the_body() {
        let input = b"5;ext=\"a;b\"\r\nhello\r\n00A\r\n0123456789\r\n000\r\nX-T: v\r\n\r\nNEXT";
        let (used, out, payload, done) = decode(input).unwrap();
        assert_eq!((used, payload, done), (input.len() - 4, 15, true));
        assert_eq!(out, b"5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n");
    }

    #[test]
    fn partial_body_is_not_done() {
        let part = b"10\r\nonly-part";
        assert_eq!(decode(part), Ok((part.len(), part.to_vec(), 9, false)));
        assert_eq!(decode(b"0\r\n"), Ok((3, Vec::new(), 0, false)));
    }

    #[test]
    fn data_is_copied_in_one_run() {
        let mut body = b"10000\r\n".to_vec();
        body.resize(body.len() + 0x10000, b'x');
        let mut reframer = Reframer::new(Framing::Chunked);
        let mut out = Vec::new();
        assert_eq!(reframer.feed(&body, &mut out), Ok(body.len()));
        assert_eq!(reframer.state, State::Chunked(Chunk::DataCr));
        assert_eq!((out, reframer.payload()), (body, 0x10000));
    }

    #[test]
    fn length_stops_at_end() {
        let mut reframer = Reframer::new(Framing::Length(3));
        let mut out = Vec::new();
        assert_eq!(reframer.feed(b"ab", &mut out), Ok(2));
        assert!(!reframer.is_done());
        assert_eq!(reframer.passthrough(b"cdef"), Some(1));
        assert!(reframer.is_done());
        assert_eq!(reframer.feed(b"more", &mut out), Ok(0));
        assert_eq!((&out[..], reframer.payload()), (&b"ab"[..], 3));
        assert_eq!(Reframer::new(Framing::Chunked).passthrough(b"x"), None);
        assert!(Reframer::new(Framing::Empty).is_done());
    }

    #[test]
    fn until_close_is_reframed_as_chunked() {
        let mut reframer = Reframer::new(Framing::UntilClose);
        let mut out = Vec::new();
        assert_eq!(reframer.feed(b"xyz", &mut out), Ok(3));
        assert_eq!(reframer.feed(b"", &mut out), Ok(0));
        assert!(!reframer.is_done());
        assert!(reframer.finish_at_close(&mut out));
        assert_eq!(out, b"3\r\nxyz\r\n0\r\n\r\n");
        assert_eq!(reframer.payload(), 3);
        // A framed body cut short by a close is not complete.
        assert!(!Reframer::new(Framing::Chunked).finish_at_close(&mut out));
    }

    #[test]
    fn size_lines_are_lowercase_hex_without_leading_zeros() {
        for (size, text) in [
            (1, "1"),
            (0xf, "f"),
            (0x10, "10"),
            (0xabc, "abc"),
            (u64::MAX, "ffffffffffffffff"),
        ] {
            let mut out = Vec::new();
            write_size(&mut out, size);
            assert_eq!(out, format!("{text}\r\n").as_bytes());
        }
    }
}
