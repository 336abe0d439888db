//! Runs client bytes through keyhole's real connection loop against an
//! in-memory upstream (`keyhole::fuzzing::serve_in_memory`). Lives here, not
//! in the library, so the audited build carries no test harness; the same
//! file is compiled into `tests/fuzz_corpus.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::fuzzing;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// What one client byte stream produced.
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

type Recorded = Arc<Mutex<Vec<u8>>>;

/// Writes `pieces` one after another (then closes the write side) to a
/// keyhole connection whose upstreams answer every request they can parse
/// with `200 OK` and a two-byte body, recording the raw bytes they received.
#[must_use]
pub fn run_connection(pieces: &[&[u8]]) -> ConnectionReport {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ConnectionReport::default();
    };
    let streams: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let answered = Arc::new(AtomicUsize::new(0));
    let (recorded, counter) = (streams.clone(), answered.clone());
    let connect = move || {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let record = Recorded::default();
        if let Ok(mut all) = recorded.lock() {
            all.push(record.clone());
        }
        tokio::spawn(memory_upstream(theirs, record, counter.clone()));
        ours
    };
    let mut report = ConnectionReport::default();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(fuzzing::serve_in_memory(server, connect));
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
        match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(output) => report.client_output = output,
            Err(_) => report.hung = true,
        }
        serving.abort();
    });
    report.upstream_requests = answered.load(Ordering::SeqCst);
    if let Ok(all) = streams.lock() {
        report.upstream_streams = all
            .iter()
            .map(|s| s.lock().map(|b| b.clone()).unwrap_or_default())
            .collect();
    }
    report
}

/// A minimal upstream: reads requests (heads up to the empty line, bodies
/// as keyhole frames them), answers each with a fixed 200.
async fn memory_upstream(mut stream: DuplexStream, record: Recorded, answered: Arc<AtomicUsize>) {
    let mut input = Vec::new();
    loop {
        let head_len = loop {
            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if !matches!(stream.read_buf(&mut input).await, Ok(n) if n > 0) {
                return;
            }
        };
        let mut body = {
            let mut headers = [httparse::EMPTY_HEADER; 256];
            let mut req = httparse::Request::new(&mut headers);
            if !matches!(
                req.parse(&input[..head_len]),
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
            let length = value("content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
            if value("transfer-encoding").is_some() {
                Body::Chunked(Vec::new())
            } else {
                Body::Length(length)
            }
        };
        if let Ok(mut all) = record.lock() {
            all.extend_from_slice(&input[..head_len]);
        }
        input.drain(..head_len);
        while !matches!(body, Body::Length(0)) {
            if input.is_empty() && !matches!(stream.read_buf(&mut input).await, Ok(n) if n > 0) {
                return;
            }
            let Some(n) = body.feed(&input) else {
                return;
            };
            if let Ok(mut all) = record.lock() {
                all.extend_from_slice(&input[..n]);
            }
            input.drain(..n);
        }
        answered.fetch_add(1, Ordering::SeqCst);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Where a forwarded request body ends, by keyhole's own framing rules.
enum Body {
    /// This many bytes to go; `Length(0)` once any body is complete.
    Length(u64),
    /// A chunked body, with what the upstream has taken of it so far.
    Chunked(Vec<u8>),
}

impl Body {
    /// Consumes a prefix of `input`; returns how many bytes it took, or
    /// `None` if the framing is refused.
    fn feed(&mut self, input: &[u8]) -> Option<usize> {
        match self {
            Body::Length(left) => {
                let n = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Some(n)
            }
            // Decoded again from the start: the same result as fed piece
            // by piece (the `chunked_body` target checks that).
            Body::Chunked(seen) => {
                let (used, _, _, done) = fuzzing::decode_chunked(&[seen, input]).ok()?;
                let n = used - seen.len();
                seen.extend_from_slice(&input[..n]);
                if done {
                    *self = Body::Length(0);
                }
                Some(n)
            }
        }
    }
}
