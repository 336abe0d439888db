//! Entry points for the fuzz targets and the corpus replay test: thin,
//! panic-free wrappers over the pure parsers. Not a stable API.

use crate::body::BodyReader;
use crate::error::Refusal;
use crate::head::{self, Framing, HeadScan, Scan};

/// The framing a head was given, in a form the harness can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// Content-Length.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

impl From<Framing> for BodyFraming {
    fn from(f: Framing) -> BodyFraming {
        match f {
            Framing::Empty => BodyFraming::Empty,
            Framing::Length(n) => BodyFraming::Length(n),
            Framing::Chunked => BodyFraming::Chunked,
            Framing::UntilClose => BodyFraming::UntilClose,
        }
    }
}

/// Scans for the end of a head as keyhole does (64 KiB, 100 lines).
/// `Ok(Some(n))`: the head is the first `n` bytes; `Ok(None)`: incomplete;
/// `Err(status)`: refused with that status.
pub fn scan_head(bytes: &[u8]) -> Result<Option<usize>, u16> {
    match HeadScan::default().scan(
        bytes,
        crate::config::DEFAULT_MAX_HEAD_BYTES,
        crate::config::DEFAULT_MAX_HEADERS,
    ) {
        Ok(Scan::Complete(n)) => Ok(Some(n)),
        Ok(Scan::Partial) => Ok(None),
        Err(r) => Err(r.status()),
    }
}

/// Parses a complete request head. On success, returns the method, target
/// and framing; the error is the status keyhole would answer.
pub fn parse_request(head_bytes: &[u8]) -> Result<(String, String, BodyFraming), u16> {
    let mut storage = head::header_array();
    let req = head::parse_request(
        head_bytes,
        &mut storage[..crate::config::DEFAULT_MAX_HEADERS],
    )
    .map_err(Refusal::status)?;
    let framing = req.framing.map_err(Refusal::status)?;
    Ok((req.method.to_owned(), req.target.to_owned(), framing.into()))
}

/// Decodes a chunked body fed in the pieces given. Returns bytes consumed,
/// the canonical re-encoding, payload size, and whether the body ended; or
/// an error text.
pub fn decode_chunked(pieces: &[&[u8]]) -> Result<(usize, Vec<u8>, u64, bool), &'static str> {
    let mut reader = BodyReader::new(Framing::Chunked);
    let mut out = Vec::new();
    let mut used = 0;
    for piece in pieces {
        let n = reader
            .feed(piece, &mut out)
            .map_err(crate::body::BodyError::reason)?;
        used += n;
        if reader.is_done() {
            break;
        }
    }
    Ok((used, out, reader.payload(), reader.is_done()))
}
