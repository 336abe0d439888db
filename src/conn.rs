//! One client connection: read head → validate → route → upstream → relay →
//! keep-alive or close. The only file that sequences the steps.

use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant, Sleep};

use crate::body::{BodyError, BodyReader};
use crate::config::{Limits, HEADER_ARRAY_LEN};
use crate::error::Refusal;
use crate::head::{self, Framing, Side, MAX_INTERIM_RESPONSES};
use crate::relay::{self, HeadError, InBuf, PumpError};
use crate::route::{Forward, RouteTable};
use crate::upstream::{Connection, Upstream};

/// The server's life cycle, watched by every connection; phases only move
/// forward, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Serving normally.
    Running,
    /// Shutting down: finish the request in flight, then close.
    Draining,
    /// The drain time is over: close now.
    Closing,
}

/// A client connection: a TCP stream, or an in-memory pipe under fuzzing.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves when a read would not block, so an idle connection can wait
    /// without holding a buffer.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ClientIo for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
}

impl ClientIo for tokio::io::DuplexStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) table: RouteTable,
    pub(crate) upstreams: Vec<Upstream>,
    pub(crate) limits: Limits,
}

/// Whether the client connection may carry another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// One request's log fields, filled in as it goes; one per connection.
struct Record {
    /// The log line so far: method and path once the head parsed.
    line: String,
    route: usize,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    started: Instant,
    /// When the exchange ended, if the clock was already read for it.
    ended: Option<Instant>,
}

impl Record {
    fn new() -> Record {
        Record {
            line: String::new(),
            route: usize::MAX,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            started: Instant::now(),
            ended: None,
        }
    }

    /// Starts the record of a new request at `now`.
    fn reset(&mut self, now: Instant) {
        self.line.clear();
        self.route = usize::MAX;
        self.status = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.started = now;
        self.ended = None;
    }

    /// Names the request: its method and path (never the query, which may
    /// carry a credential).
    fn name(&mut self, method: &str, path: &str) {
        self.line.clear();
        // Room for the whole line, so it is allocated once.
        self.line.reserve(method.len() + path.len() + 96);
        self.line.push_str(method);
        self.line.push(' ');
        self.line.push_str(path);
    }

    /// One line per request. Formatted as a single message because
    /// per-field formatting cost more than the rest of a small request.
    fn log(&mut self, shared: &Shared, reason: Option<&str>) {
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let ended = self.ended.unwrap_or_else(Instant::now);
        let ms = u64::try_from(ended.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        if self.line.is_empty() {
            // Refused before the head parsed: no method or path to name.
            self.line.push_str("- -");
        }
        self.line.push_str(" route=");
        self.line.push_str(shared.table.prefix(self.route));
        let numbers = [
            (" status=", u64::from(self.status)),
            (" in=", self.bytes_in),
            (" out=", self.bytes_out),
            (" ms=", ms),
        ];
        for (name, value) in numbers {
            self.line.push_str(name);
            let mut digits = [0; 20];
            let digits = head::decimal(value, &mut digits);
            self.line.extend(digits.iter().map(|&d| char::from(d)));
        }
        if let Some(reason) = reason {
            self.line.push_str(" refused: ");
            self.line.push_str(reason);
        }
        tracing::info!(message = self.line.as_str());
    }
}

/// Serves one client connection until it closes, errs, idles out or the
/// server shuts down.
pub(crate) async fn serve<S: ClientIo>(
    mut stream: S,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    // Registered once per connection, not once per request: first the wait
    // for draining (which ends an idle connection), then, if draining starts
    // during a request, the wait for closing (which ends that request).
    let mut shutdown = pin!(reached(phase.clone(), Phase::Draining));
    // One timer per connection, moved forward for each wait: for the next
    // request, then for the upstream's response head (see `timeout_in_steps`).
    let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
    let mut input = InBuf::default();
    let mut record = Record::new();
    loop {
        if input.is_empty() {
            // Idle: hold no buffer while waiting for the next request.
            input.release();
            record.line = String::new();
            // Until the first byte the idle timeout applies; the head
            // timeout starts with it (S15).
            let first_bytes = async {
                stream.readable().await?;
                input.read_from(&mut stream).await
            };
            // The idle time runs from the end of the last exchange (whose
            // clock reading is reused).
            let idle_since = record.ended.unwrap_or_else(Instant::now);
            timer
                .as_mut()
                .reset(idle_since + shared.limits.idle_timeout);
            tokio::select! {
                biased;
                read = first_bytes => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return;
                    }
                }
                () = timer.as_mut() => return,
                () = &mut shutdown => return,
            }
        }
        let draining = *phase.borrow() != Phase::Running;
        let mut request = Box::pin(handle_request(
            &mut stream,
            &mut input,
            &shared,
            &mut record,
            timer.as_mut(),
            draining,
        ));
        let next = loop {
            tokio::select! {
                biased;
                next = &mut request => break next,
                () = &mut shutdown => {
                    if *phase.borrow() == Phase::Closing {
                        break Next::Close;
                    }
                    shutdown.set(reached(phase.clone(), Phase::Closing));
                }
            }
        };
        drop(request);
        if next == Next::Close || *phase.borrow() != Phase::Running {
            return;
        }
    }
}

/// Resolves once the server's phase is `at` or later (or the server is gone).
async fn reached(mut phase: watch::Receiver<Phase>, at: Phase) {
    let _ = phase.wait_for(|p| *p >= at).await;
}

async fn handle_request<S: ClientIo>(
    stream: &mut S,
    input: &mut InBuf,
    shared: &Shared,
    record: &mut Record,
    timer: Pin<&mut Sleep>,
    draining: bool,
) -> Next {
    let limits = &shared.limits;
    let now = Instant::now();
    record.reset(now);
    // S15: the head timeout runs from the first byte and is not reset by trickling.
    let deadline = now + limits.head_timeout;
    let max_headers = limits.max_headers.min(HEADER_ARRAY_LEN);
    let head_len = match timeout_at(
        deadline,
        relay::read_head(
            stream,
            input,
            Side::Request,
            limits.max_head_bytes,
            max_headers,
        ),
    )
    .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(HeadError::Invalid(refusal))) => {
            return refuse(stream, refusal, record, shared).await
        }
        Ok(Err(HeadError::Closed | HeadError::Io)) => return Next::Close,
        Err(_) => return refuse(stream, Refusal::RequestTimeout, record, shared).await,
    };
    let forward = {
        let mut storage = head::header_array();
        match head::parse_request(&input.data()[..head_len], &mut storage[..max_headers]) {
            Ok(req) => {
                record.name(req.method, req.path());
                shared.table.forward(&req, limits.max_body_bytes)
            }
            Err(refusal) => Err(refusal),
        }
    };
    input.consume(head_len);
    let mut forward = match forward {
        Ok(forward) => forward,
        Err(refusal) => return refuse(stream, refusal, record, shared).await,
    };
    record.route = forward.route();
    let next = match exchange(stream, input, shared, &mut forward, record, timer, draining).await {
        Ok(next) => next,
        Err(refusal) => return refuse(stream, refusal, record, shared).await,
    };
    record.log(shared, None);
    next
}

/// Sends a generated response, then closes (S14). Lingers briefly reading
/// what the client still sends, so the close does not turn into a reset
/// that destroys the response before the client reads it.
async fn refuse<S: ClientIo>(
    stream: &mut S,
    refusal: Refusal,
    record: &mut Record,
    shared: &Shared,
) -> Next {
    /// How long and how much to read after a refusal before closing.
    const LINGER: Duration = Duration::from_secs(2);
    const LINGER_BYTES: usize = 1024 * 1024;
    record.status = refusal.status();
    record.ended = None;
    record.log(shared, Some(refusal.reason()));
    let sent = timeout(LINGER, stream.write_all(&refusal.response())).await;
    if matches!(sent, Ok(Ok(()))) && stream.shutdown().await.is_ok() {
        let mut sink = InBuf::default();
        let mut drained = 0;
        let linger = async {
            while let Ok(n) = sink.read_from(stream).await {
                if n == 0 || drained > LINGER_BYTES {
                    break;
                }
                drained += n;
                sink.consume(n);
            }
        };
        let _ = timeout(LINGER, linger).await;
    }
    Next::Close
}

/// Forwards one validated request and relays its response. `Err` means
/// nothing was sent to the client yet and the refusal should be.
async fn exchange<S: ClientIo>(
    stream: &mut S,
    input: &mut InBuf,
    shared: &Shared,
    forward: &mut Forward,
    record: &mut Record,
    timer: Pin<&mut Sleep>,
    close_after: bool,
) -> Result<Next, Refusal> {
    let limits = &shared.limits;
    let idle = limits.idle_timeout;
    let upstream = shared
        .upstreams
        .get(forward.route())
        .ok_or(Refusal::BadGateway("no upstream"))?;
    let mut request_body = BodyReader::new(forward.framing());
    let expect_continue = forward.expect_continue();
    let is_head = forward.is_head();
    let out = forward.head_mut();

    // The head and whatever body bytes already arrived leave in one write.
    if !input.is_empty() && !request_body.is_done() {
        let n = request_body.feed(input.data(), out).map_err(body_refusal)?;
        input.consume(n);
        if limits
            .max_body_bytes
            .is_some_and(|max| request_body.payload() > max)
        {
            return Err(Refusal::PayloadTooLarge);
        }
    }
    let mut conn = open_and_send(upstream, limits, out, record.started).await?;
    out.clear();

    if expect_continue && !request_body.is_done() && input.is_empty() {
        relay::write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n", idle)
            .await
            .map_err(|_| Refusal::RequestTimeout)?;
    }

    let mut response_in = InBuf::default();
    let mut request_complete = request_body.is_done();
    let response = if request_complete {
        // The usual case: the whole request left with the head. The wait
        // runs from when it was sent: on a pooled connection, microseconds
        // after the request's start (no clock read needed); on a new one,
        // after the connect and handshake.
        let sent_at = if conn.reused {
            record.started
        } else {
            Instant::now()
        };
        relay::timeout_in_steps(
            timer,
            sent_at,
            limits.upstream_timeout,
            idle,
            read_final_head(&mut conn.stream, &mut response_in, is_head),
        )
        .await
        .ok_or(Refusal::GatewayTimeout("upstream response timed out"))??
    } else {
        // The body is sent while the response head is awaited: the
        // upstream may answer early (an error) and stop reading.
        let (mut reader, mut writer) = tokio::io::split(&mut conn.stream);
        let head_future = read_final_head(&mut reader, &mut response_in, is_head);
        let mut head_future = std::pin::pin!(head_future);
        let pump = relay::pump(
            &mut *stream,
            input,
            &mut writer,
            &mut request_body,
            out,
            idle,
            limits.max_body_bytes,
        );
        let early = tokio::select! {
            sent = pump => match sent {
                Ok(()) => {
                    request_complete = true;
                    None
                }
                // The upstream may have answered and stopped reading:
                // its response, if any, is still worth relaying.
                Err(PumpError::SinkIo) => None,
                Err(PumpError::SinkTimeout) => return Err(Refusal::GatewayTimeout("upstream stopped reading the request")),
                Err(PumpError::SourceTimeout) => return Err(Refusal::RequestTimeout),
                Err(PumpError::SourceClosed | PumpError::SourceIo) => {
                    record.status = 499;
                    record.bytes_in = request_body.payload();
                    return Ok(Next::Close);
                }
                Err(PumpError::Framing(err)) => return Err(body_refusal(err)),
                Err(PumpError::TooLarge) => return Err(Refusal::PayloadTooLarge),
            },
            head = &mut head_future => Some(head),
        };
        match early {
            Some(head) => head?,
            None => relay::timeout_in_steps(
                timer,
                Instant::now(),
                limits.upstream_timeout,
                idle,
                head_future,
            )
            .await
            .ok_or(Refusal::GatewayTimeout("upstream response timed out"))??,
        }
    };
    record.bytes_in = request_body.payload();
    record.status = response.status;

    // From here on the client has (or may have) bytes of the response: a
    // failure can only close the connection, never produce a new status.
    // An upstream `Connection: close` only keeps that upstream connection
    // out of the pool; the client's connection can go on.
    let client_close = close_after
        || forward.close()
        || !request_complete
        || response.framing == Framing::UntilClose;
    let mut out = response.head;
    if client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let mut response_body = BodyReader::new(response.framing);
    // Body bytes that came with the head are checked before the head is
    // sent, so bad framing there is still a clean 502 (R5).
    if !response_in.is_empty() && !response_body.is_done() {
        let n = response_body
            .feed(response_in.data(), &mut out)
            .map_err(|_| Refusal::BadGateway("malformed upstream response body"))?;
        response_in.consume(n);
    }
    let relayed = relay::pump(
        &mut conn.stream,
        &mut response_in,
        stream,
        &mut response_body,
        &mut out,
        idle,
        None,
    )
    .await;
    record.bytes_out = response_body.payload();
    if let Err(err) = relayed {
        tracing::debug!(?err, "response relay stopped");
        record.status = if matches!(err, PumpError::SinkIo | PumpError::SinkTimeout) {
            499
        } else {
            502
        };
        return Ok(Next::Close);
    }
    let ended = Instant::now();
    record.ended = Some(ended);
    // R4: only a connection whose exchange ended cleanly goes back.
    if request_complete && !response.close && response_in.is_empty() {
        upstream.put_idle(conn, limits.pool_max_idle, ended.into_std());
    }
    Ok(if client_close {
        Next::Close
    } else {
        Next::KeepAlive
    })
}

/// Takes an idle connection or opens one, and sends the first bytes. A
/// pooled connection the upstream closed meanwhile fails that first write;
/// then, since the bytes are all still here, a fresh connection gets them.
async fn open_and_send(
    upstream: &Upstream,
    limits: &Limits,
    first: &[u8],
    now: Instant,
) -> Result<Connection, Refusal> {
    if let Some(mut conn) = upstream.take_idle(limits.pool_idle_timeout, now.into_std()) {
        if send_first(&mut conn, first, limits.idle_timeout)
            .await
            .is_ok()
        {
            return Ok(conn);
        }
        tracing::debug!("pooled upstream connection was closed; retrying on a new one");
    }
    let mut conn = upstream.connect(limits).await?;
    send_first(&mut conn, first, limits.idle_timeout)
        .await
        .map_err(|err| match err {
            PumpError::SinkTimeout => {
                Refusal::GatewayTimeout("upstream stopped reading the request")
            }
            _ => Refusal::BadGateway("upstream connection failed"),
        })?;
    Ok(conn)
}

async fn send_first(conn: &mut Connection, first: &[u8], idle: Duration) -> Result<(), PumpError> {
    relay::write_all(&mut conn.stream, first, idle).await?;
    relay::flush(&mut conn.stream, idle).await
}

/// The final response head, rewritten for the client (without its
/// connection field and final CRLF), and what the relay needs to know.
struct Response {
    head: relay::PooledBuf,
    status: u16,
    framing: Framing,
    close: bool,
}

/// Reads response heads until a final one (R1: interim 1xx are swallowed,
/// at most `MAX_INTERIM_RESPONSES`; keyhole sends its own 100 Continue).
async fn read_final_head<R>(
    reader: &mut R,
    input: &mut InBuf,
    is_head: bool,
) -> Result<Response, Refusal>
where
    R: tokio::io::AsyncRead + Unpin,
{
    for _ in 0..=MAX_INTERIM_RESPONSES {
        let head_len = relay::read_head(
            reader,
            input,
            Side::Response,
            crate::config::DEFAULT_MAX_HEAD_BYTES,
            HEADER_ARRAY_LEN - 1,
        )
        .await
        .map_err(|err| match err {
            HeadError::Invalid(_) => Refusal::BadGateway("malformed upstream response head"),
            HeadError::Closed | HeadError::Io => {
                Refusal::BadGateway("upstream closed without a response")
            }
        })?;
        let mut storage = head::header_array();
        let res = head::parse_response(&input.data()[..head_len], &mut storage, is_head)?;
        if res.status < 200 {
            input.consume(head_len);
            continue;
        }
        // The body bytes that came with the head usually join it in this
        // buffer, to leave in the same write.
        let mut head = relay::PooledBuf::take();
        head::write_response_head(&mut head, &res);
        let response = Response {
            head,
            status: res.status,
            framing: res.framing,
            close: res.close,
        };
        input.consume(head_len);
        return Ok(response);
    }
    Err(Refusal::BadGateway("too many interim responses"))
}

fn body_refusal(err: BodyError) -> Refusal {
    Refusal::BadRequest(err.reason())
}
