//! Test harness: keyhole on 127.0.0.1:0, an in-process TLS upstream (rcgen
//! certificates, tokio-rustls) that records exactly what it receives, and a
//! small raw HTTP/1.1 client.
#![allow(dead_code, missing_docs, unreachable_pub)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::{Builder, Proxy, ProxyHandle, Route, Secret};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The key every test route injects.
pub const SECRET: &str = "sk-test-SECRET-do-not-leak-4f9a2c";
/// A generous bound for any single test step.
pub const STEP: Duration = Duration::from_secs(10);

/// A CA and a server certificate for 127.0.0.1 and localhost.
pub struct Pki {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub fn new() -> Pki {
        Pki::build(false)
    }

    /// A server certificate that expired a year ago, from a CA keyhole trusts.
    pub fn expired() -> Pki {
        Pki::build(true)
    }

    fn build(expired: bool) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyhole test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pki {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// The head exactly as received, CRLFs included.
    pub head: String,
    pub method: String,
    pub target: String,
    /// Header names and values as received, in order.
    pub headers: Vec<(String, String)>,
    /// The body bytes as they arrived on the wire (framing included).
    pub raw_body: Vec<u8>,
    /// The decoded payload.
    pub body: Vec<u8>,
    /// Chunk sizes, for a chunked body.
    pub chunk_sizes: Vec<usize>,
    /// Which upstream connection carried it (0, 1, …).
    pub conn_id: usize,
}

impl Received {
    /// All values of header `name` (case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name).into_iter().next()
    }
}

/// What the standard upstream answers.
pub enum Reply {
    /// These bytes, verbatim.
    Bytes(Vec<u8>),
    /// These pieces, each after its delay, flushed one by one.
    Pieces(Vec<(Duration, Vec<u8>)>),
    /// A 200 with `len` deterministic bytes (see `pattern`), CL or chunked.
    Generated { len: usize, chunked: bool },
    /// Close the connection without answering.
    Close,
}

/// A 200 with a Content-Length body.
pub fn ok(body: &str) -> Reply {
    Reply::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// Deterministic bytes for large-body tests.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        use std::fmt::Write;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

type Stream = tokio_rustls::server::TlsStream<TcpStream>;
type ConnHandler = Arc<dyn Fn(UpConn) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A TLS upstream on 127.0.0.1 that records what it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    received: Arc<Mutex<Vec<Received>>>,
    raw: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Answers every request on every connection with `reply(&request)`.
    pub async fn start(reply: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        let reply = Arc::new(reply);
        Upstream::start_raw(move |mut conn| {
            let reply = reply.clone();
            async move {
                while let Some(req) = conn.read_request().await {
                    let answer = reply(&req);
                    if conn.send(answer).await.is_err() {
                        return;
                    }
                }
            }
        })
        .await
    }

    /// Hands each accepted TLS connection to `handler`.
    pub async fn start_raw<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(UpConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Upstream::start_with(Pki::new(), handler).await
    }

    /// As `start_raw`, with a given certificate set-up.
    pub async fn start_with<F, Fut>(pki: Pki, handler: F) -> Upstream
    where
        F: Fn(UpConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler: ConnHandler = Arc::new(move |conn| Box::pin(handler(conn)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let (rec, raw2, count) = (received.clone(), raw.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let id = count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (rec, raw2, handler) = (rec.clone(), raw2.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(Ok(stream)) = tokio::time::timeout(STEP, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    handler(UpConn {
                        stream,
                        buf: Vec::new(),
                        id,
                        received: rec,
                        raw: raw2,
                    })
                    .await;
                });
            }
        });
        Upstream {
            addr,
            ca_pem: pki.ca_pem,
            received,
            raw,
            connections,
            task,
        }
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Every byte received so far, on any connection, framing included.
    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The URL of this upstream, with an optional base path.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }
}

/// One upstream connection, for handlers that script their own behaviour.
pub struct UpConn {
    pub stream: Stream,
    buf: Vec<u8>,
    pub id: usize,
    received: Arc<Mutex<Vec<Received>>>,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl UpConn {
    async fn fill(&mut self) -> bool {
        // Read straight into the buffer: no large array on the future's stack.
        let start = self.buf.len();
        self.buf.reserve(16384);
        match tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
            .await
        {
            Ok(Ok(n)) if n > 0 => {
                self.raw
                    .lock()
                    .unwrap()
                    .extend_from_slice(&self.buf[start..]);
                true
            }
            _ => false,
        }
    }

    /// Reads a request head only (the body stays unread). `None` at EOF.
    pub async fn read_head(&mut self) -> Option<Received> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head_bytes: Vec<u8> = self.buf.drain(..end + 4).collect();
                let mut headers = [httparse::EMPTY_HEADER; 128];
                let mut req = httparse::Request::new(&mut headers);
                req.parse(&head_bytes).ok()?;
                return Some(Received {
                    head: String::from_utf8_lossy(&head_bytes).into_owned(),
                    method: req.method?.to_owned(),
                    target: req.path?.to_owned(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    conn_id: self.id,
                    ..Received::default()
                });
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads a whole request (head and body), records it, returns it.
    pub async fn read_request(&mut self) -> Option<Received> {
        let mut req = self.read_head().await?;
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let (raw, size) = loop {
                    if let Some(chunk) = take_chunk(&mut self.buf) {
                        break chunk.ok()?;
                    }
                    if !self.fill().await {
                        return None;
                    }
                };
                req.raw_body.extend_from_slice(&raw);
                if size == 0 {
                    break;
                }
                req.chunk_sizes.push(size);
                req.body
                    .extend_from_slice(&raw[raw.len() - size - 2..raw.len() - 2]);
            }
        } else if let Some(len) = req.header("content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill().await {
                    return None;
                }
            }
            req.body = self.buf.drain(..len).collect();
            req.raw_body = req.body.clone();
        }
        self.received.lock().unwrap().push(req.clone());
        Some(req)
    }

    /// Writes and flushes.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends a standard reply.
    pub async fn send(&mut self, reply: Reply) -> io::Result<()> {
        match reply {
            Reply::Bytes(bytes) => self.write(&bytes).await,
            Reply::Pieces(pieces) => {
                for (delay, piece) in pieces {
                    tokio::time::sleep(delay).await;
                    self.write(&piece).await?;
                }
                Ok(())
            }
            Reply::Generated { len, chunked } => {
                let body = pattern(len);
                if chunked {
                    self.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await?;
                    for piece in body.chunks(40_000) {
                        self.write(format!("{:x}\r\n", piece.len()).as_bytes())
                            .await?;
                        self.stream.write_all(piece).await?;
                        self.write(b"\r\n").await?;
                    }
                    self.write(b"0\r\n\r\n").await
                } else {
                    self.write(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").as_bytes(),
                    )
                    .await?;
                    self.write(&body).await
                }
            }
            Reply::Close => Err(io::Error::other("closing as asked")),
        }
    }
}

/// Takes one whole chunk (size line, data, CRLF; for the last chunk just
/// its size line and the final CRLF) off the front of `buf`: `None` if more
/// bytes are needed, `Some(Err(()))` if the size line is not hex, else the
/// raw bytes taken and the chunk size.
fn take_chunk(buf: &mut Vec<u8>) -> Option<Result<(Vec<u8>, usize), ()>> {
    let line_end = find(buf, b"\r\n")?;
    let Some(size) = std::str::from_utf8(&buf[..line_end])
        .ok()
        .and_then(|hex| usize::from_str_radix(hex, 16).ok())
    else {
        return Some(Err(()));
    };
    if buf.len() < line_end + 2 + size + 2 {
        return None;
    }
    Some(Ok((buf.drain(..line_end + 2 + size + 2).collect(), size)))
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// keyhole with one route `/` to `upstream`, injecting `x-api-key: SECRET`,
/// then whatever `configure` adds.
pub async fn keyhole(
    upstream: &Upstream,
    configure: impl FnOnce(Builder) -> Builder,
) -> ProxyHandle {
    let route = Route::new("/", &upstream.url(""))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET));
    let builder = Proxy::builder()
        .ca_pem(upstream.ca_pem.clone())
        .route(route);
    configure(builder).start().await.unwrap()
}

/// A parsed response as a client sees it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Raw body bytes as received (chunk framing included).
    pub raw_body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection to keyhole.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        self.buf.reserve(65536);
        matches!(tokio::time::timeout(STEP, self.stream.read_buf(&mut self.buf)).await, Ok(Ok(n)) if n > 0)
    }

    /// Reads one response; `None` if the connection closed (or stalled)
    /// before a complete response. `head_request`: no body expected.
    pub async fn response(&mut self, head_request: bool) -> Option<Response> {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head_bytes: Vec<u8> = self.buf.drain(..end + 4).collect();
        let (status, headers) = parse_response_head(&head_bytes)?;
        let mut response = Response {
            status,
            head: String::from_utf8_lossy(&head_bytes).into_owned(),
            headers,
            body: Vec::new(),
            raw_body: Vec::new(),
        };
        if status < 200 {
            return Some(response);
        }
        if head_request || status == 204 || status == 304 {
            return Some(response);
        }
        if response.header("transfer-encoding").is_some() {
            loop {
                let (raw, size) = loop {
                    if let Some(chunk) = take_chunk(&mut self.buf) {
                        break chunk.ok()?;
                    }
                    if !self.fill().await {
                        return None;
                    }
                };
                response.raw_body.extend_from_slice(&raw);
                if size == 0 {
                    break;
                }
                response
                    .body
                    .extend_from_slice(&raw[raw.len() - size - 2..raw.len() - 2]);
            }
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill().await {
                    return None;
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        Some(response)
    }

    /// True if the server closed the connection (EOF or reset) within `STEP`.
    pub async fn closed(&mut self) -> bool {
        loop {
            self.buf.reserve(4096);
            match tokio::time::timeout(STEP, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

/// Sends `bytes` on a new connection and reads one response.
pub async fn request(addr: SocketAddr, bytes: &[u8]) -> Option<Response> {
    let mut client = Client::connect(addr).await;
    client.send(bytes).await;
    client.response(bytes.starts_with(b"HEAD ")).await
}

/// A GET of `path` with the usual headers.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

/// Copies all of `src` to `dst` (for tests that stream).
pub async fn copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
) -> io::Result<u64> {
    tokio::io::copy(src, dst).await
}

// ---------------------------------------------------------------------------
// Additions for the end-to-end suites (proxy.rs, cli.rs). Existing items above
// keep their signatures.

impl Client {
    /// Reads until `needle` has arrived and returns (and consumes) every byte
    /// read so far, through the end of `needle`. `None` if the connection
    /// closed or stalled for `STEP` first.
    pub async fn read_until(&mut self, needle: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, needle) {
                return Some(self.buf.drain(..i + needle.len()).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads until the server closes the connection (EOF or reset) and
    /// returns every byte not yet consumed. `None` if it is still open after
    /// `limit`.
    pub async fn read_to_close(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.buf.reserve(65536);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(std::mem::take(&mut self.buf)),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }

    /// Bytes received but not consumed by a previous call.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

/// The chunk sizes of a chunked body as it appeared on the wire (`raw_body`),
/// final zero chunk excluded. Panics on framing it cannot read.
pub fn chunk_sizes(raw: &[u8]) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut rest = raw;
    loop {
        let end = find(rest, b"\r\n").expect("chunk size line");
        let line = std::str::from_utf8(&rest[..end]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return sizes;
        }
        sizes.push(size);
        rest = &rest[end + 2 + size + 2..];
    }
}

/// Canonical chunked framing of `chunks`: `{size:x}\r\n` data `\r\n` … `0\r\n\r\n`.
pub fn canonical_chunked(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// The request line and the header fields (name, value bytes) of the first
/// request head in `raw`, parsed strictly by httparse.
pub fn head_fields(raw: &[u8]) -> (String, Vec<(String, Vec<u8>)>) {
    let end = find(raw, b"\r\n\r\n").expect("a complete head") + 4;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&raw[..end]).expect("a valid head");
    let line_end = find(raw, b"\r\n").unwrap();
    let line = String::from_utf8_lossy(&raw[..line_end]).into_owned();
    let fields = req
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    (line, fields)
}

/// A 127.0.0.1 port nothing listens on (bound, then released).
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

/// A path in the system temp dir unique to this process and `name`.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("keyhole-test-{}-{n}-{name}", std::process::id()))
}

/// A builder trusting `upstream`'s CA, with no route yet.
pub fn builder_for(upstream: &Upstream) -> Builder {
    Proxy::builder().ca_pem(upstream.ca_pem.clone())
}

/// A route from `prefix` to `upstream` with base path `base`, injecting `x-api-key: SECRET`.
pub fn route_to(upstream: &Upstream, prefix: &str, base: &str) -> Route {
    Route::new(prefix, &upstream.url(base))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET))
}

/// A response head's status and fields (names as sent, values lossily as
/// text); `None` if it does not parse.
pub fn parse_response_head(head_bytes: &[u8]) -> Option<(u16, Vec<(String, String)>)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut headers);
    res.parse(head_bytes).ok()?;
    let status = res.code?;
    let headers = res
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Some((status, headers))
}
