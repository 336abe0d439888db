//! Entry points for the fuzz targets and the corpus replay test: thin,
//! panic-free wrappers over the pure parsers. Not a stable API.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::DuplexStream;

use crate::body::{BodyError, Reframer};
use crate::budget::ClientLimits;
use crate::clients::Clients;
use crate::config::{Limits, Route, Secret, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEAD_BYTES};
use crate::conn::{Phase, Shared};
use crate::error::Refusal;
use crate::head::{self, Framing, HeadScan, RequestHead, Scan, Side};
use crate::route::RouteTable;
use crate::upstream::{tls_connector, Upstream};
use crate::usage::{body_kind, UsageScan};

/// The framing a head gave its body, as the harness compares it.
pub use crate::head::Framing as BodyFraming;
/// What the usage scanner found in a response body: the largest value of
/// each field, and what a token budget is charged.
pub use crate::usage::Usage as TokenCounts;

/// The value the fuzz route table injects.
pub const FUZZ_KEY: &str = "FUZZ-INJECTED-KEY";

/// Scans for the end of a head as keyhole does (64 KiB, 100 lines).
/// `Ok(Some(n))`: the head is the first `n` bytes; `Ok(None)`: incomplete;
/// `Err(status)`: refused with that status.
pub fn scan_head(bytes: &[u8]) -> Result<Option<usize>, u16> {
    match HeadScan::new(Side::Request).scan(bytes, DEFAULT_MAX_HEAD_BYTES, DEFAULT_MAX_HEADERS) {
        Ok(Scan::Complete(n)) => Ok(Some(n)),
        Ok(Scan::Partial) => Ok(None),
        Err(r) => Err(r.status()),
    }
}

/// Parses a complete request head as keyhole does (100 fields at most) and
/// hands it to `then`; the error is the status keyhole would answer.
fn with_request<T>(
    head_bytes: &[u8],
    then: impl FnOnce(&RequestHead<'_, '_>) -> Result<T, Refusal>,
) -> Result<T, u16> {
    let mut storage = head::header_array();
    let req = head::parse_request(head_bytes, &mut storage[..DEFAULT_MAX_HEADERS]);
    req.and_then(|req| then(&req)).map_err(Refusal::status)
}

/// Parses a complete request head. On success, returns the method, target
/// and framing; the error is the status keyhole would answer.
pub fn parse_request(head_bytes: &[u8]) -> Result<(String, String, BodyFraming), u16> {
    with_request(head_bytes, |req| {
        Ok((req.method.to_owned(), req.target.to_owned(), req.framing?))
    })
}

/// Decodes a chunked body fed in the pieces given. Returns bytes consumed,
/// the canonical re-encoding, payload size, and whether the body ended; or
/// an error text.
pub fn decode_chunked(pieces: &[&[u8]]) -> Result<(usize, Vec<u8>, u64, bool), &'static str> {
    let mut reader = Reframer::new(Framing::Chunked);
    let mut out = Vec::new();
    let mut used = 0;
    for piece in pieces {
        used += reader.feed(piece, &mut out).map_err(BodyError::reason)?;
        if reader.is_done() {
            break;
        }
    }
    Ok((used, out, reader.payload(), reader.is_done()))
}

/// The route table every fuzz target uses: `/` → `https://upstream.example/base`
/// injecting `x-api-key`, and `/openai` → `https://api.example/v1` injecting
/// `authorization`. The injected values are `FUZZ_KEY` and `Bearer FUZZ_KEY`.
fn fuzz_table() -> Option<RouteTable> {
    let root = Route::new("/", "https://upstream.example/base").ok()?;
    let openai = Route::new("/openai", "https://api.example/v1").ok()?;
    let routes = vec![
        root.header("x-api-key", Secret::new(FUZZ_KEY)),
        openai.header("authorization", Secret::new(format!("Bearer {FUZZ_KEY}"))),
    ];
    let clients = Arc::new(Clients::new(false, ClientLimits::default()));
    Some(RouteTable::new(routes, clients, Vec::new()))
}

/// A request as keyhole would forward it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The head written upstream, byte for byte.
    pub head: Vec<u8>,
    /// Upstream host the route points at.
    pub upstream_host: String,
    /// The body framing.
    pub framing: BodyFraming,
}

/// Reads an egress proxy's answer to CONNECT as keyhole does (8 KiB, 32
/// lines). `Ok(Some(n))`: a 2xx whose head is the first `n` bytes, the
/// tunnel opens; `Ok(None)`: incomplete; `Err(status)`: refused (`None`:
/// not a response head within the limits).
pub fn connect_answer(bytes: &[u8]) -> Result<Option<usize>, Option<u16>> {
    match crate::egress::parse_answer(bytes)? {
        Scan::Complete(n) => Ok(Some(n)),
        Scan::Partial => Ok(None),
    }
}

/// Parses, validates, routes and rewrites one complete request head through
/// the fuzz route table; the error is the status keyhole would answer.
pub fn forward_request(head_bytes: &[u8]) -> Result<Forwarded, u16> {
    let table = fuzz_table().ok_or(500u16)?;
    with_request(head_bytes, |req| {
        let fwd = table.forward(req, None)?;
        Ok(Forwarded {
            head: fwd.head().to_vec(),
            upstream_host: table.routes()[fwd.route()].upstream.host.clone(),
            framing: fwd.framing(),
        })
    })
}

/// A validated upstream response head as keyhole would relay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Status code.
    pub status: u16,
    /// The body framing for this response.
    pub framing: BodyFraming,
    /// The head keyhole writes to the client (without connection field and final CRLF).
    pub head: Vec<u8>,
    /// The upstream connection must not be reused.
    pub close: bool,
}

/// Parses and validates an upstream response head (`request_was_head`: the
/// request method was HEAD); the error is the status keyhole would answer.
pub fn relay_response(head_bytes: &[u8], request_was_head: bool) -> Result<Relayed, u16> {
    let mut storage = head::header_array();
    let res = head::parse_response(head_bytes, &mut storage, request_was_head)
        .map_err(Refusal::status)?;
    let mut out = Vec::new();
    head::write_response_head(&mut out, &res);
    Ok(Relayed {
        status: res.status,
        framing: res.framing,
        head: out,
        close: res.close,
    })
}

/// Serves one client connection through the real connection loop, with
/// the fuzz route table and in-memory upstreams: `connect` makes each new
/// upstream connection. Timeouts are short (20 ms) so a stalled exchange
/// ends quickly. Call it inside a tokio runtime with time enabled.
pub async fn serve_in_memory(
    client: DuplexStream,
    connect: impl Fn() -> DuplexStream + Clone + Send + Sync + 'static,
) {
    let (Some(table), Ok(connector)) = (fuzz_table(), tls_connector(&[])) else {
        return;
    };
    let mut upstreams = Vec::new();
    for route in table.routes() {
        let Ok(upstream) = Upstream::new(&route.upstream, &connector, Arc::default(), None) else {
            return;
        };
        upstreams.push(upstream.with_memory(Box::new(connect.clone())));
    }
    let short = Duration::from_millis(20);
    let limits = Limits {
        head_timeout: short,
        idle_timeout: short,
        upstream_timeout: short,
        connect_timeout: short,
        tls_timeout: short,
        ..Limits::default()
    };
    let shared = Arc::new(Shared {
        table,
        upstreams,
        limits,
    });
    let (_phase, phase) = tokio::sync::watch::channel(Phase::Running);
    crate::conn::serve(client, shared, phase).await;
}

/// Scans a response body of `content_type`, fed in the pieces given, for
/// model-token usage as keyhole does; `None` when the media type is not one
/// that keyhole scans.
#[must_use]
pub fn scan_usage(content_type: &[u8], pieces: &[&[u8]]) -> Option<TokenCounts> {
    let mut scan = UsageScan::new(body_kind(content_type)?);
    for piece in pieces {
        scan.feed(piece);
    }
    Some(scan.usage())
}
