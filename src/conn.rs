//! One client connection: read head → validate → route → upstream → relay →
//! keep-alive or close. The only file that sequences the steps; each step
//! is a method of `Handler`, which holds the connection's state.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant, Sleep};

use crate::body::{BodyError, Reframer};
use crate::config::{Limits, DEFAULT_MAX_HEAD_BYTES, HEADER_ARRAY_LEN};
use crate::error::Refusal;
use crate::head::{self, Framing, Side, MAX_INTERIM_RESPONSES};
use crate::record::{self, Record};
use crate::relay::{self, HeadError, InBuf, PooledBuf, PumpError};
use crate::route::{Forward, RouteTable};
use crate::upstream::{Connection, Upstream};
use crate::usage::{self, BodyKind, Usage};

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

/// A client connection: a TCP stream, or an in-memory pipe in tests and
/// under fuzzing.
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

#[cfg(any(test, feature = "fuzzing"))]
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

/// What the connection does once an exchange is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Read the next request.
    KeepAlive,
    /// Close now.
    Close,
    /// The client may still be sending what keyhole did not read: close
    /// gently (see `Handler::linger`).
    Linger,
}

/// One client connection's state: the stream, the bytes read from it and
/// not yet consumed, the log record of the request in progress, and the one
/// timer every wait uses.
struct Handler<'a, S> {
    stream: S,
    input: InBuf,
    shared: &'a Shared,
    record: Record,
    /// The server's phase: a drain turns the next response's keep-alive
    /// into a close.
    phase: watch::Receiver<Phase>,
    /// Moved forward for each wait, for the next request and then for the
    /// upstream's response head (see `relay::timeout_in_steps`).
    timer: Pin<&'a mut Sleep>,
}

/// Serves one client connection until it closes, errs, idles out or the
/// server shuts down.
pub(crate) async fn serve<S: ClientIo>(
    stream: S,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    // Registered once per connection, not once per request: first the wait
    // for draining (which ends an idle connection), then, if draining starts
    // during a request, the wait for closing (which ends that request).
    let mut shutdown = pin!(reached(phase.clone(), Phase::Draining));
    let timer = pin!(tokio::time::sleep_until(Instant::now()));
    let mut handler = Handler {
        stream,
        input: InBuf::default(),
        shared: &shared,
        record: Record::new(),
        phase: phase.clone(),
        timer,
    };
    loop {
        if handler.input.is_empty() {
            tokio::select! {
                biased;
                more = handler.await_request() => if !more {
                    return;
                },
                () = &mut shutdown => return,
            }
        }
        // Boxed so an idle connection's task does not hold room for it.
        let mut request = Box::pin(handler.handle_request());
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
        match next {
            Next::KeepAlive if *phase.borrow() == Phase::Running => {}
            Next::Linger => return handler.linger().await,
            _ => return,
        }
    }
}

/// Resolves once the server's phase is `at` or later (or the server is gone).
pub(crate) async fn reached(mut phase: watch::Receiver<Phase>, at: Phase) {
    let _ = phase.wait_for(|p| *p >= at).await;
}

/// The upstream did not send its response head in time.
const UPSTREAM_TIMEOUT: Refusal = Refusal::GatewayTimeout("upstream response timed out");

impl<S: ClientIo> Handler<'_, S> {
    /// Waits for the first bytes of the next request, holding no buffer,
    /// under the idle timeout (the head timeout starts with the first byte,
    /// docs/strict-profile.md "Limits"). False when the connection is done.
    async fn await_request(&mut self) -> bool {
        self.input.release();
        self.record.release();
        // The idle time runs from the end of the last exchange (whose clock
        // reading is reused).
        let idle_since = self.record.ended.unwrap_or_else(Instant::now);
        let Handler {
            stream,
            input,
            timer,
            shared,
            ..
        } = self;
        timer
            .as_mut()
            .reset(idle_since + shared.limits.idle_timeout);
        let first_bytes = async {
            stream.readable().await?;
            input.read_from(stream).await
        };
        tokio::select! {
            biased;
            read = first_bytes => matches!(read, Ok(n) if n > 0),
            () = timer.as_mut() => false,
        }
    }

    /// One request: its head, validated and rewritten, then the exchange.
    async fn handle_request(&mut self) -> Next {
        let shared = self.shared;
        let limits = &shared.limits;
        let now = Instant::now();
        self.record.reset(now);
        // The head timeout runs from the first byte and is not reset by
        // trickling (RFC 9112 §9.5 leaves the policy to the server).
        let read = relay::read_head(
            &mut self.stream,
            &mut self.input,
            Side::Request,
            limits.max_head_bytes,
            limits.max_headers,
        );
        let head_len = match timeout_at(now + limits.head_timeout, read).await {
            Ok(Ok(n)) => n,
            Ok(Err(HeadError::Invalid(refusal))) => return self.refuse(refusal).await,
            Ok(Err(HeadError::Closed | HeadError::Io)) => return Next::Close,
            Err(_) => return self.refuse(Refusal::RequestTimeout).await,
        };
        let forward = {
            let mut storage = head::header_array();
            let slots = &mut storage[..limits.max_headers];
            match head::parse_request(&self.input.data()[..head_len], slots) {
                Ok(req) => {
                    self.record.name(req.method, req.path());
                    shared.table.forward(&req, limits.max_body_bytes)
                }
                Err(refusal) => Err(refusal),
            }
        };
        self.input.consume(head_len);
        let forward = match forward {
            Ok(forward) => forward,
            Err(refusal) => return self.refuse(refusal).await,
        };
        self.record.route = forward.route();
        let admission = forward.admission();
        self.record.client = admission.map(|a| a.budget().name.clone());
        let exchanged = self.exchange(&forward).await;
        if let Some(admission) = admission {
            admission.finish(self.record.bytes_in, self.record.bytes_out);
        }
        match exchanged {
            Ok(next) => {
                self.record.log(&shared.table, None);
                next
            }
            Err(refusal) => self.refuse(refusal).await,
        }
    }

    /// Sends a generated response; the connection then closes (RFC 9112
    /// §9.6: keyhole cannot know where the refused request ends).
    async fn refuse(&mut self, refusal: Refusal) -> Next {
        self.record.status = refusal.status();
        self.record.ended = None;
        let error = (refusal.code(), refusal.reason());
        self.record.log(&self.shared.table, Some(error));
        let sent = timeout(LINGER, self.stream.write_all(&refusal.response())).await;
        if matches!(sent, Ok(Ok(()))) {
            Next::Linger
        } else {
            Next::Close
        }
    }

    /// Closes after an answer the client may not have read while it was
    /// still sending: shuts the write side, then reads and discards what
    /// the client still sends for a moment, so that the close does not turn
    /// into a reset that destroys the answer before the client reads it
    /// (RFC 9112 §9.6).
    async fn linger(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        // No byte limit: the time bounds the work, and a client still
        // sending a large body must be able to finish reading the answer.
        let linger = async {
            while let Ok(n @ 1..) = self.input.read_from(&mut self.stream).await {
                self.input.consume(n);
            }
        };
        let _ = timeout(LINGER, linger).await;
    }

    /// Forwards one validated request and relays its response. `Err` means
    /// nothing was sent to the client yet and the refusal should be.
    async fn exchange(&mut self, forward: &Forward) -> Result<Next, Refusal> {
        let upstream = (self.shared.upstreams.get(forward.route()))
            .ok_or(Refusal::Unreachable("no upstream"))?;
        let mut body = Reframer::new(forward.framing());
        let (mut conn, mut out) = self.send_request(upstream, forward, &mut body).await?;
        let response = self.await_response(&mut conn, forward, &mut body, &mut out);
        let Some(response) = response.await? else {
            return Ok(Next::Close);
        };
        // Neither buffer is needed while the response relays: a thousand
        // exchanges in flight then hold a thousand buffers fewer.
        drop(out);
        self.input.release();
        self.record.bytes_in = body.payload();
        // A drain that began during the exchange still gets its close.
        let close = *self.phase.borrow() != Phase::Running || forward.close();
        self.relay_response(upstream, forward, conn, response, close)
            .await
    }

    /// Sends the head and the body bytes that came with it in one write;
    /// then, if the client asked, tells it to go on (RFC 9110 §10.1.1).
    /// Returns the connection and the buffer the rest of the body goes
    /// through.
    async fn send_request(
        &mut self,
        upstream: &Upstream,
        forward: &Forward,
        body: &mut Reframer,
    ) -> Result<(Connection, PooledBuf), Refusal> {
        let limits = &self.shared.limits;
        let mut out = if body.is_done() {
            PooledBuf::empty()
        } else {
            PooledBuf::take()
        };
        if !self.input.is_empty() && !body.is_done() {
            let n = body
                .feed(self.input.data(), &mut out)
                .map_err(body_refusal)?;
            self.input.consume(n);
            if limits
                .max_body_bytes
                .is_some_and(|max| body.payload() > max)
            {
                return Err(Refusal::PayloadTooLarge);
            }
        }
        let conn = upstream
            .send(forward, &out, limits, self.record.started)
            .await?;
        out.clear();
        if forward.expect_continue() && !body.is_done() && self.input.is_empty() {
            relay::write_all(&mut self.stream, CONTINUE, limits.idle_timeout)
                .await
                .map_err(|_| Refusal::RequestTimeout)?;
        }
        Ok((conn, out))
    }

    /// Awaits the final response head. While the request body is still
    /// coming it is sent meanwhile: the upstream may answer early (an
    /// error) and stop reading. `None`: the client went away.
    async fn await_response(
        &mut self,
        conn: &mut Connection,
        forward: &Forward,
        body: &mut Reframer,
        out: &mut PooledBuf,
    ) -> Result<Option<Response>, Refusal> {
        let limits = &self.shared.limits;
        if body.is_done() {
            self.input.release();
            // The usual case: the whole request left with the head. The
            // wait runs from when it was sent: on a pooled connection,
            // microseconds after the request's start (no clock read
            // needed); on a new one, after the connect and handshake.
            let sent_at = if conn.reused {
                self.record.started
            } else {
                Instant::now()
            };
            let id = std::mem::take(&mut self.record.request_id);
            let head = read_final_head(&mut conn.stream, forward, id);
            return self.await_head(sent_at, head).await.map(Some);
        }
        let (mut reader, mut writer) = tokio::io::split(&mut conn.stream);
        let id = std::mem::take(&mut self.record.request_id);
        let mut head = pin!(read_final_head(&mut reader, forward, id));
        let pump = relay::pump(
            &mut self.stream,
            &mut self.input,
            &mut writer,
            body,
            out,
            limits.idle_timeout,
            limits.max_body_bytes,
        );
        let sent = tokio::select! {
            sent = pump => sent,
            early = &mut head => {
                let mut early = early?;
                early.request_complete = false;
                return Ok(Some(early));
            }
        };
        let request_complete = match sent {
            Ok(()) => true,
            // The upstream may have answered and stopped reading: its
            // response, if any, is still worth relaying.
            Err(PumpError::SinkIo) => false,
            Err(PumpError::SinkTimeout) => {
                return Err(Refusal::GatewayTimeout(
                    "upstream stopped reading the request",
                ))
            }
            Err(PumpError::SourceTimeout) => return Err(Refusal::RequestTimeout),
            Err(PumpError::SourceClosed | PumpError::SourceIo) => {
                self.record.status = CLIENT_GONE;
                self.record.bytes_in = body.payload();
                return Ok(None);
            }
            Err(PumpError::Framing(err)) => return Err(body_refusal(err)),
            Err(PumpError::TooLarge) => return Err(Refusal::PayloadTooLarge),
        };
        let mut response = self.await_head(Instant::now(), head).await?;
        response.request_complete = request_complete;
        Ok(Some(response))
    }

    /// Awaits the response head under the upstream timeout from `sent_at`.
    async fn await_head(
        &mut self,
        sent_at: Instant,
        head: impl Future<Output = Result<Response, Refusal>>,
    ) -> Result<Response, Refusal> {
        let limits = &self.shared.limits;
        let (wait, step) = (limits.upstream_timeout, limits.idle_timeout);
        let response = relay::timeout_in_steps(self.timer.as_mut(), sent_at, wait, step, head);
        let mut response = response.await.ok_or(UPSTREAM_TIMEOUT)??;
        self.record.request_id = std::mem::take(&mut response.request_id);
        // A clock read only for a log line that will be written.
        if tracing::enabled!(target: "keyhole::request", tracing::Level::INFO) {
            let upstream = sent_at.elapsed().as_millis();
            self.record.upstream_ms = Some(u64::try_from(upstream).unwrap_or(u64::MAX));
        }
        Ok(response)
    }

    /// Relays the response head and body. From here on the client has (or
    /// may have) bytes of the response: a failure can only close the
    /// connection, never produce a new status. An upstream `Connection:
    /// close` only keeps that upstream connection out of the pool; the
    /// client's connection can go on.
    async fn relay_response(
        &mut self,
        upstream: &Upstream,
        forward: &Forward,
        mut conn: Connection,
        mut response: Response,
        close: bool,
    ) -> Result<Next, Refusal> {
        let limits = &self.shared.limits;
        self.record.status = response.status;
        if matches!(response.status, 401 | 403) {
            upstream.key_refused(
                &self.shared.table.routes()[self.record.route],
                response.status,
            );
        }
        let client_close =
            close || !response.request_complete || response.framing == Framing::UntilClose;
        let out = &mut response.head;
        if client_close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let mut body = Reframer::new(response.framing);
        if let (Some(kind), Some(admission)) = (response.usage, forward.admission()) {
            body.observe_usage(kind, admission.budget().clone());
        }
        // Body bytes that came with the head are checked before the head is
        // sent, so bad framing there is still a clean 502.
        if !response.input.is_empty() && !body.is_done() {
            let n = (body.feed(response.input.data(), out))
                .map_err(|_| Refusal::BadGateway("malformed upstream response body"))?;
            response.input.consume(n);
        }
        let relayed = relay::pump(
            &mut conn.stream,
            &mut response.input,
            &mut self.stream,
            &mut body,
            out,
            limits.idle_timeout,
            None,
        )
        .await;
        self.record.bytes_out = body.payload();
        // A cut-off response is charged what it reported so far.
        body.settle();
        let usage = body.usage().filter(Usage::seen);
        self.record.tokens = usage.map(|u| (u.tokens_in(), u.tokens_out()));
        if let Err(err) = relayed {
            tracing::debug!(?err, "response relay stopped");
            self.record.status = match err {
                PumpError::SinkIo | PumpError::SinkTimeout => CLIENT_GONE,
                _ => 502,
            };
            return Ok(Next::Close);
        }
        let ended = Instant::now();
        self.record.ended = Some(ended);
        // Only a connection whose exchange ended cleanly goes back
        // (docs/strict-profile.md "Pool hygiene").
        if response.request_complete && !response.close && response.input.is_empty() {
            upstream.put_idle(conn, limits.pool_max_idle, ended);
        }
        Ok(if !response.request_complete {
            Next::Linger
        } else if client_close {
            Next::Close
        } else {
            Next::KeepAlive
        })
    }
}

/// Logged as the status of a request whose client went away before its
/// response was complete (nginx's convention).
const CLIENT_GONE: u16 = 499;
/// How long to read and discard what the client still sends after an
/// answer, before closing.
const LINGER: Duration = Duration::from_secs(2);
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The final response head, rewritten for the client (without its
/// connection field and final CRLF), and what the relay needs to know.
struct Response {
    head: PooledBuf,
    /// Response bytes read past the head.
    input: InBuf,
    status: u16,
    framing: Framing,
    /// The upstream connection must not be reused.
    close: bool,
    /// The whole request body reached the upstream before it answered.
    request_complete: bool,
    /// The response's `request-id` or `x-request-id`, for the log (the
    /// record's buffer, lent).
    request_id: String,
    /// The kind of body whose model-token usage is read (token budgets).
    usage: Option<BodyKind>,
}

/// Reads response heads until a final one: interim 1xx are swallowed, at
/// most `MAX_INTERIM_RESPONSES` (RFC 9110 §15.2; keyhole sends its own 100
/// Continue).
async fn read_final_head<R>(
    reader: &mut R,
    forward: &Forward,
    mut request_id: String,
) -> Result<Response, Refusal>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut input = InBuf::default();
    for _ in 0..=MAX_INTERIM_RESPONSES {
        let read = relay::read_head(
            reader,
            &mut input,
            Side::Response,
            DEFAULT_MAX_HEAD_BYTES,
            HEADER_ARRAY_LEN,
        );
        let head_len = read.await.map_err(|err| match err {
            HeadError::Invalid(_) => Refusal::BadGateway("malformed upstream response head"),
            HeadError::Closed | HeadError::Io => {
                Refusal::BadGateway("upstream closed without a response")
            }
        })?;
        let mut storage = head::header_array();
        let res = head::parse_response(&input.data()[..head_len], &mut storage, forward.is_head())?;
        if res.status < 200 {
            input.consume(head_len);
            continue;
        }
        // The body bytes that came with the head usually join it in this
        // buffer, to leave in the same write.
        let mut head = PooledBuf::take();
        head::write_response_head(&mut head, &res);
        let id_field = |h: &&httparse::Header<'_>| {
            h.name.eq_ignore_ascii_case("request-id") || h.name.eq_ignore_ascii_case("x-request-id")
        };
        if let Some(id) = res.headers.iter().find(id_field) {
            record::keep_request_id(&mut request_id, id.value);
        }
        let usage = if forward.counts_tokens() {
            let content_type = res
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-type"));
            content_type.and_then(|h| usage::body_kind(h.value))
        } else {
            None
        };
        let (status, framing, close) = (res.status, res.framing, res.close);
        input.consume(head_len);
        return Ok(Response {
            head,
            input,
            status,
            framing,
            close,
            request_complete: true,
            request_id,
            usage,
        });
    }
    Err(Refusal::BadGateway("too many interim responses"))
}

fn body_refusal(err: BodyError) -> Refusal {
    Refusal::BadRequest(err.reason())
}

#[cfg(test)]
mod tests {
    // The connection loop on in-memory streams under tokio's paused clock:
    // each named timeout fires exactly when configured (not a millisecond
    // before), and requests and responses arriving in pieces split at every
    // byte give the same bytes on the other side.

    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::{mpsc, watch};
    use tokio::time::Instant;

    use super::*;
    use crate::config::{Limits, Route, Secret};
    use crate::route::RouteTable;
    use crate::upstream::{self, tls_connector, Upstream, Wakeup};

    const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(20);
    const UPSTREAM_WAIT: Duration = Duration::from_secs(60);
    const POOL_IDLE: Duration = Duration::from_secs(30);
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    impl ClientIo for tokio_test::io::Mock {
        fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
            std::future::ready(Ok(()))
        }
    }

    /// keyhole's connection loop with one route to an in-memory upstream:
    /// every upstream connection keyhole opens arrives on `upstream_conns`.
    struct Rig {
        shared: Arc<Shared>,
        wakeup: Arc<Wakeup>,
        phase: watch::Sender<Phase>,
        upstream_conns: mpsc::UnboundedReceiver<DuplexStream>,
    }

    fn limits() -> Limits {
        Limits {
            head_timeout: HEAD_TIMEOUT,
            idle_timeout: IDLE,
            upstream_timeout: UPSTREAM_WAIT,
            pool_idle_timeout: POOL_IDLE,
            ..Limits::default()
        }
    }

    impl Rig {
        fn new(limits: Limits) -> Rig {
            let (tx, upstream_conns) = mpsc::unbounded_channel();
            let route = Route::new("/", "https://upstream.test")
                .unwrap()
                .header("x-api-key", Secret::new("injected-key"));
            let table = RouteTable::new(
                vec![route],
                Arc::new(crate::clients::Clients::new(
                    false,
                    crate::budget::ClientLimits::default(),
                )),
                Vec::new(),
            );
            let wakeup = Arc::new(Wakeup::default());
            let connector = tls_connector(&[]).unwrap();
            let url = table.routes()[0].upstream.clone();
            let upstream = Upstream::new(&url, &connector, wakeup.clone(), None)
                .unwrap()
                .with_memory(Box::new(move || {
                    let (ours, theirs) = duplex(1 << 16);
                    let _ = tx.send(theirs);
                    ours
                }));
            let shared = Arc::new(Shared {
                table,
                upstreams: vec![upstream],
                limits,
            });
            let (phase, _) = watch::channel(Phase::Running);
            Rig {
                shared,
                wakeup,
                phase,
                upstream_conns,
            }
        }

        /// A client connection served by keyhole in its own task.
        fn connect(&self) -> DuplexStream {
            let (client, server) = duplex(1 << 16);
            tokio::spawn(serve(server, self.shared.clone(), self.phase.subscribe()));
            client
        }

        /// The pool's reaper, as `start` runs it.
        fn start_reaper(&self) {
            let (shared, wakeup) = (self.shared.clone(), self.wakeup.clone());
            tokio::spawn(async move { upstream::reap(&shared.upstreams, wakeup, POOL_IDLE).await });
        }

        async fn next_upstream(&mut self) -> DuplexStream {
            self.upstream_conns.recv().await.unwrap()
        }
    }

    /// Reads until the peer closes.
    async fn read_to_end(stream: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Reads one forwarded request: its head and a Content-Length body, or a
    /// chunked body through its last chunk.
    async fn read_request(stream: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            stream.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            if head.contains("transfer-encoding: chunked") {
                if got.ends_with(b"\r\n0\r\n\r\n") {
                    return got;
                }
                continue;
            }
            let length = (head.lines())
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            if got.len() == end + 4 + length {
                return got;
            }
        }
    }

    /// Time since `start`, checked to be `limit` to the millisecond (the timer
    /// wheel's resolution).
    fn assert_fired_at(start: Instant, limit: Duration) {
        let elapsed = start.elapsed();
        assert!(
            elapsed >= limit && elapsed <= limit + Duration::from_millis(2),
            "fired after {elapsed:?}, configured {limit:?}"
        );
    }

    /// Asserts that nothing arrives on `stream` before `limit` (minus a
    /// millisecond) has passed.
    async fn assert_quiet_until(stream: &mut DuplexStream, start: Instant, limit: Duration) {
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout_at(start + limit - Duration::from_millis(1), async {
            stream.read(&mut byte).await
        });
        assert!(
            early.await.is_err(),
            "the connection moved before {limit:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn head_timeout_answers_408_when_the_head_stalls() {
        let rig = Rig::new(limits());
        let mut client = rig.connect();
        let start = Instant::now();
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        assert_quiet_until(&mut client, start, HEAD_TIMEOUT).await;
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
        assert_fired_at(start, HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn head_timeout_is_not_reset_by_trickling() {
        let rig = Rig::new(limits());
        let mut client = rig.connect();
        let start = Instant::now();
        for byte in b"GET /x HTTP/1.1\r\nHost: localhost\r\n" {
            client.write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
        assert_fired_at(start, HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes_a_silent_new_connection() {
        let rig = Rig::new(limits());
        let mut client = rig.connect();
        let start = Instant::now();
        assert_quiet_until(&mut client, start, IDLE).await;
        assert_eq!(read_to_end(&mut client).await, b"");
        assert_fired_at(start, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes_a_keep_alive_connection_after_its_last_exchange() {
        let mut rig = Rig::new(limits());
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        // The exchange takes a while; the idle time counts from its end.
        tokio::time::sleep(Duration::from_secs(5)).await;
        upstream.write_all(OK).await.unwrap();
        let mut answer = vec![0; OK.len()];
        client.read_exact(&mut answer).await.unwrap();
        let ended = Instant::now();
        assert_quiet_until(&mut client, ended, IDLE).await;
        assert_eq!(read_to_end(&mut client).await, b"");
        assert_fired_at(ended, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_in_a_request_body_answers_408() {
        let mut rig = Rig::new(limits());
        let mut client = rig.connect();
        client
            .write_all(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let _upstream = rig.next_upstream().await;
        let start = Instant::now();
        assert_quiet_until(&mut client, start, IDLE).await;
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
        assert_fired_at(start, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_in_a_response_body_cuts_the_connection() {
        let mut rig = Rig::new(limits());
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let start = Instant::now();
        let answer = read_to_end(&mut client).await;
        assert_fired_at(start, IDLE);
        // The head and the three bytes, then a close: the body never looks complete.
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(answer.ends_with(b"\r\n\r\nabc"), "{answer:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_timeout_answers_504_and_outlasts_the_idle_timeout() {
        assert!(UPSTREAM_WAIT > IDLE);
        let mut rig = Rig::new(limits());
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        let start = Instant::now();
        assert_quiet_until(&mut client, start, UPSTREAM_WAIT).await;
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with(b"HTTP/1.1 504 "), "{answer:?}");
        assert_fired_at(start, UPSTREAM_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_timeout_shorter_than_idle_answers_504() {
        let wait = Duration::from_secs(3);
        let mut rig = Rig::new(Limits {
            upstream_timeout: wait,
            ..limits()
        });
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        let start = Instant::now();
        let answer = read_to_end(&mut client).await;
        assert!(answer.starts_with(b"HTTP/1.1 504 "), "{answer:?}");
        assert_fired_at(start, wait);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_closes_idle_connections_and_finishes_requests_in_flight() {
        let mut rig = Rig::new(limits());
        let mut idle = rig.connect();
        let mut busy = rig.connect();
        busy.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        let start = Instant::now();
        rig.phase.send_replace(Phase::Draining);
        assert_eq!(read_to_end(&mut idle).await, b"");
        assert_eq!(start.elapsed(), Duration::ZERO);
        upstream.write_all(OK).await.unwrap();
        let answer = read_to_end(&mut busy).await;
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(
            answer.ends_with(b"connection: close\r\n\r\nok"),
            "{answer:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_cuts_a_request_still_in_flight() {
        let mut rig = Rig::new(limits());
        let mut busy = rig.connect();
        busy.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        rig.phase.send_replace(Phase::Draining);
        tokio::time::sleep(Duration::from_secs(1)).await;
        rig.phase.send_replace(Phase::Closing);
        assert_eq!(read_to_end(&mut busy).await, b"");
    }

    #[tokio::test(start_paused = true)]
    async fn pool_idle_timeout_closes_a_pooled_connection_without_a_request() {
        // The client connection outlives the pool's idle time.
        let mut rig = Rig::new(Limits {
            idle_timeout: POOL_IDLE * 2,
            ..limits()
        });
        rig.start_reaper();
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        upstream.write_all(OK).await.unwrap();
        let mut answer = vec![0; OK.len()];
        client.read_exact(&mut answer).await.unwrap();
        let pooled = Instant::now();
        assert_quiet_until(&mut upstream, pooled, POOL_IDLE).await;
        assert_eq!(read_to_end(&mut upstream).await, b"");
        assert_fired_at(pooled, POOL_IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn pooled_connection_closed_by_the_upstream_is_dropped_at_once() {
        let mut rig = Rig::new(limits());
        rig.start_reaper();
        let mut client = rig.connect();
        client.write_all(GET).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        upstream.write_all(OK).await.unwrap();
        let mut answer = vec![0; OK.len()];
        client.read_exact(&mut answer).await.unwrap();
        // Let the reaper start watching it, then close it from the upstream.
        tokio::time::sleep(Duration::from_secs(1)).await;
        upstream.shutdown().await.unwrap();
        let start = Instant::now();
        assert_eq!(read_to_end(&mut upstream).await, b"");
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
    }

    /// Sends `request` to keyhole split at `at`, answers with `response` split
    /// at `split_response`; returns what the upstream received and what the
    /// client received.
    async fn exchange_in_pieces(
        request: &[u8],
        at: usize,
        response: &[u8],
        split_response: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut rig = Rig::new(limits());
        let mut client = rig.connect();
        let pause = Duration::from_millis(1);
        let (first, second) = request.split_at(at);
        client.write_all(first).await.unwrap();
        tokio::time::sleep(pause).await;
        client.write_all(second).await.unwrap();
        let mut upstream = rig.next_upstream().await;
        let forwarded = read_request(&mut upstream).await;
        let (first, second) = response.split_at(split_response);
        upstream.write_all(first).await.unwrap();
        tokio::time::sleep(pause).await;
        upstream.write_all(second).await.unwrap();
        drop(upstream);
        client.shutdown().await.unwrap();
        (forwarded, read_to_end(&mut client).await)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_split_at_every_byte_forward_the_same_bytes() {
        let length = b"POST /x HTTP/1.1\r\nHost: localhost\r\nx-api-key: client\r\nContent-Length: 11\r\n\r\nhello world";
        let chunked = b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
        for request in [&length[..], &chunked[..]] {
            let (whole, answer) = exchange_in_pieces(request, request.len(), OK, OK.len()).await;
            let text = String::from_utf8_lossy(&whole);
            assert!(text.contains("x-api-key: injected-key\r\n"), "{text}");
            assert!(!text.contains("client"), "{text}");
            assert!(answer.ends_with(b"\r\n\r\nok"), "{answer:?}");
            for at in 0..request.len() {
                let (forwarded, got) = exchange_in_pieces(request, at, OK, OK.len()).await;
                assert_eq!(forwarded, whole, "request split at {at}");
                assert_eq!(got, answer, "request split at {at}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn responses_split_at_every_byte_relay_the_same_bytes() {
        let length =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nhello world";
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        for (response, body) in [
            (&length[..], &b"\r\n\r\nhello world"[..]),
            (
                &chunked[..],
                &b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
            ),
        ] {
            let (_, whole) = exchange_in_pieces(GET, GET.len(), response, response.len()).await;
            assert!(whole.starts_with(b"HTTP/1.1 200 OK\r\n"), "{whole:?}");
            assert!(whole.ends_with(body), "{whole:?}");
            for at in 0..response.len() {
                let (_, got) = exchange_in_pieces(GET, GET.len(), response, at).await;
                assert_eq!(got, whole, "response split at {at}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_client_gets_its_answer_and_a_pipelined_refusal() {
        // tokio-test's scripted stream checks every byte keyhole writes.
        let mut rig = Rig::new(limits());
        let refusal = Refusal::VersionNotSupported.response();
        let client = tokio_test::io::Builder::new()
            .read(&GET[..10])
            .wait(Duration::from_millis(5))
            .read(&GET[10..])
            .write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .read(b"GET /y HTTP/1.0\r\n\r\n")
            .write(&refusal)
            .build();
        let (_phase, phase) = watch::channel(Phase::Running);
        let shared = rig.shared.clone();
        let served = tokio::spawn(serve(client, shared, phase));
        let mut upstream = rig.next_upstream().await;
        read_request(&mut upstream).await;
        upstream.write_all(OK).await.unwrap();
        // A panic in the scripted stream (an unexpected byte) fails this.
        served.await.unwrap();
    }
}
