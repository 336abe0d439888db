//! Entry points for the fuzz targets and the corpus replay test: thin,
//! panic-free wrappers over the pure parsers. Not a stable API.

use crate::body::BodyReader;
use crate::error::Refusal;
use crate::head::{self, Framing, HeadScan, Scan, Side};

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
    match HeadScan::new(Side::Request).scan(
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

/// The route table every fuzz target uses: `/` → `https://upstream.example/base`
/// injecting `x-api-key`, and `/openai` → `https://api.example/v1` injecting
/// `authorization`. The injected values are `FUZZ_KEY` and `Bearer FUZZ_KEY`.
fn fuzz_table() -> Option<crate::route::RouteTable> {
    let routes = vec![
        crate::Route::new("/", "https://upstream.example/base")
            .ok()?
            .header("x-api-key", crate::Secret::new(FUZZ_KEY)),
        crate::Route::new("/openai", "https://api.example/v1")
            .ok()?
            .header(
                "authorization",
                crate::Secret::new(format!("Bearer {FUZZ_KEY}")),
            ),
    ];
    Some(crate::route::RouteTable::new(routes, None, Vec::new()))
}

/// The value the fuzz route table injects.
pub const FUZZ_KEY: &str = "FUZZ-INJECTED-KEY";

/// A request as keyhole would forward it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The head written upstream, byte for byte.
    pub head: Vec<u8>,
    /// Upstream host the route points at.
    pub upstream_host: String,
    /// The client's method.
    pub method: String,
    /// The client's target.
    pub client_target: String,
    /// The body framing.
    pub framing: BodyFraming,
}

/// Parses, validates, routes and rewrites one complete request head through
/// the fuzz route table; the error is the status keyhole would answer.
pub fn forward_request(head_bytes: &[u8]) -> Result<Forwarded, u16> {
    let mut storage = head::header_array();
    let req = head::parse_request(
        head_bytes,
        &mut storage[..crate::config::DEFAULT_MAX_HEADERS],
    )
    .map_err(Refusal::status)?;
    let table = fuzz_table().ok_or(500u16)?;
    let mut fwd = table.forward(&req, None).map_err(Refusal::status)?;
    Ok(Forwarded {
        head: fwd.head_mut().clone(),
        upstream_host: table.routes()[fwd.route()].upstream.host.clone(),
        method: req.method.to_owned(),
        client_target: req.target.to_owned(),
        framing: fwd.framing().into(),
    })
}

/// The upstream target keyhole would send for `target` through the fuzz
/// route table, with the upstream host; the error is the status.
pub fn route_target(target: &str) -> Result<(String, String), u16> {
    let bytes = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let fwd = forward_request(bytes.as_bytes())?;
    let head = String::from_utf8(fwd.head).map_err(|_| 500u16)?;
    let line = head.split("\r\n").next().unwrap_or_default();
    let upstream_target = line.split(' ').nth(1).unwrap_or_default().to_owned();
    Ok((fwd.upstream_host, upstream_target))
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
        framing: res.framing.into(),
        head: out,
        close: res.close,
    })
}

/// What one client byte stream produced when run through the real
/// connection loop against an in-memory upstream.
#[derive(Debug, Clone, Default)]
pub struct ConnectionReport {
    /// Every byte each upstream connection received, one entry per connection.
    pub upstream_streams: Vec<Vec<u8>>,
    /// Requests the in-memory upstream parsed and answered, in order.
    pub upstream_requests: usize,
    /// Everything keyhole wrote back to the client.
    pub client_output: Vec<u8>,
    /// The connection loop did not finish within its time bound.
    pub hung: bool,
}

/// Runs `pieces` (written one after another, then the write side closed)
/// through `conn::serve` with the fuzz route table, whose upstreams are
/// in-memory: each answers every request it can parse with
/// `200 OK` and a two-byte body, and records the raw bytes it received.
/// Timeouts are short (20 ms) so a stalled exchange ends quickly.
#[must_use]
pub fn run_connection(pieces: &[&[u8]]) -> ConnectionReport {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    type Recorded = Arc<Mutex<Vec<u8>>>;

    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ConnectionReport::default();
    };
    let streams: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let Some(table) = fuzz_table() else {
        return ConnectionReport::default();
    };
    let Ok(connector) = crate::upstream::tls_connector(&[]) else {
        return ConnectionReport::default();
    };
    let mut upstreams = Vec::new();
    for route in table.routes() {
        let (streams, answered) = (streams.clone(), answered.clone());
        let Ok(upstream) = crate::upstream::Upstream::new(&route.upstream, connector.clone())
        else {
            return ConnectionReport::default();
        };
        upstreams.push(upstream.with_memory(Box::new(move || {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let record = Arc::new(Mutex::new(Vec::new()));
            if let Ok(mut all) = streams.lock() {
                all.push(record.clone());
            }
            tokio::spawn(memory_upstream(theirs, record, answered.clone()));
            ours
        })));
    }
    let short = std::time::Duration::from_millis(20);
    let limits = crate::Limits {
        head_timeout: short,
        idle_timeout: short,
        upstream_timeout: short,
        connect_timeout: short,
        tls_timeout: short,
        ..crate::Limits::default()
    };
    let shared = Arc::new(crate::conn::Shared {
        table,
        upstreams,
        limits,
    });
    let (_phase_tx, phase_rx) = tokio::sync::watch::channel(crate::conn::Phase::Running);
    let mut report = ConnectionReport::default();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(crate::conn::serve(server, shared, phase_rx));
        let exchange = async {
            // Read concurrently so keyhole never blocks on a full pipe.
            let mut output = Vec::new();
            let (mut read_half, mut write_half) = tokio::io::split(&mut client);
            let write = async {
                for piece in pieces {
                    if write_half.write_all(piece).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = write_half.shutdown().await;
            };
            let read = read_half.read_to_end(&mut output);
            let _ = tokio::join!(write, read);
            output
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await {
            Ok(output) => report.client_output = output,
            Err(_) => report.hung = true,
        }
        serving.abort();
    });
    report.upstream_requests = answered.load(std::sync::atomic::Ordering::SeqCst);
    if let Ok(all) = streams.lock() {
        report.upstream_streams = all
            .iter()
            .map(|s| s.lock().map(|b| b.clone()).unwrap_or_default())
            .collect();
    }
    report
}

/// A minimal upstream: reads requests (heads by `HeadScan`, bodies by
/// `BodyReader`, as keyhole frames them), answers each with a fixed 200.
async fn memory_upstream(
    mut stream: tokio::io::DuplexStream,
    record: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    let mut input = crate::relay::InBuf::default();
    loop {
        let Ok(head_len) =
            crate::relay::read_head(&mut stream, &mut input, Side::Request, 1 << 20, 1000).await
        else {
            return;
        };
        let framing = {
            let mut storage = head::header_array();
            let mut req = httparse::Request::new(&mut []);
            if !matches!(
                req.parse_with_uninit_headers(&input.data()[..head_len], &mut storage),
                Ok(httparse::Status::Complete(_))
            ) {
                return;
            }
            let value = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            if value("transfer-encoding").is_some() {
                Framing::Chunked
            } else {
                value("content-length")
                    .and_then(head::parse_length)
                    .map_or(Framing::Empty, Framing::Length)
            }
        };
        if let Ok(mut all) = record.lock() {
            all.extend_from_slice(&input.data()[..head_len]);
        }
        input.consume(head_len);
        let mut body = BodyReader::new(framing);
        while !body.is_done() {
            if input.is_empty() && !matches!(input.read_from(&mut stream).await, Ok(n) if n > 0) {
                return;
            }
            let mut sink = Vec::new();
            let Ok(n) = body.feed(input.data(), &mut sink) else {
                return;
            };
            if let Ok(mut all) = record.lock() {
                all.extend_from_slice(&input.data()[..n]);
            }
            input.consume(n);
        }
        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_runs_pipelined_requests_and_stops_at_rejection() {
        let stream = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /openai/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /c HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let report = run_connection(&[&stream[..10], &stream[10..]]);
        assert!(!report.hung);
        assert_eq!(report.upstream_requests, 2);
        let out = String::from_utf8_lossy(&report.client_output);
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(
            out.ends_with("both Content-Length and Transfer-Encoding\n"),
            "{out}"
        );
        let all: Vec<u8> = report.upstream_streams.concat();
        let all = String::from_utf8_lossy(&all);
        assert!(all.contains("GET /base/a HTTP/1.1\r\nhost: upstream.example\r\nx-api-key: FUZZ-INJECTED-KEY\r\n\r\n"), "{all}");
        assert!(all.contains("POST /v1/x HTTP/1.1\r\nhost: api.example\r\nauthorization: Bearer FUZZ-INJECTED-KEY\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{all}");
        assert!(!all.contains("/c"));
    }
}
