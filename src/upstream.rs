//! Upstream connections: rustls client set-up, connect and handshake under
//! their own timeouts, and a pool of idle keep-alive connections per route.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;

use crate::config::{Limits, Route, UpstreamUrl};
use crate::egress::{self, Egress};
use crate::error::{Error, Refusal};
use crate::head::Scan;
use crate::relay::{self, PumpError};
use crate::route::Forward;

/// Builds the one TLS client configuration: ring provider, webpki roots plus
/// the extra PEM roots, ALPN `http/1.1` only.
pub(crate) fn tls_connector(extra_roots_pem: &[Vec<u8>]) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for pem in extra_roots_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|_| Error::BadCertificate("invalid PEM"))?;
            roots
                .add(cert)
                .map_err(|_| Error::BadCertificate("unusable certificate"))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::BadCertificate("no certificate found"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| Error::BadCertificate("TLS provider set-up failed"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A byte stream to an upstream: TLS, plain TCP for a loopback `http://`
/// URL, or an in-memory pipe in tests and under fuzzing. Boxed: one
/// allocation per connection, and a virtual call per read or write is
/// nothing beside the system call behind it.
pub(crate) type Stream = Box<dyn Io>;

/// What an upstream stream is.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One upstream connection. Not split into halves up front: most requests
/// are sent whole before the response is read, and the halves' shared lock
/// would cost every read and write; `conn` splits it only while a request
/// body and the response head are in flight together.
pub(crate) struct Connection {
    pub(crate) stream: Stream,
    /// Taken from the pool (so it may have been closed by the upstream).
    pub(crate) reused: bool,
}

impl Connection {
    fn new(stream: Stream) -> Connection {
        Connection {
            stream,
            reused: false,
        }
    }

    /// Is this idle connection still quiet? An idle connection that became
    /// readable (stray bytes, EOF, an error) is no longer a clean keep-alive
    /// connection (RFC 9112 §9.3: either side may close an idle one). A
    /// quiet one stays registered with `waker`, so its close is noticed.
    fn is_quiet(&mut self, waker: &Waker) -> bool {
        let mut cx = Context::from_waker(waker);
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

/// Wakes the pool's reaper when an idle connection becomes readable.
#[derive(Default)]
pub(crate) struct Wakeup(Notify);

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// How soon a newly idle connection is watched for the upstream closing it.
/// Watching it at once would cost a read system call per request; a
/// connection reused within this time never costs one.
const WATCH_AFTER: Duration = Duration::from_millis(250);

/// At most one warning per route in this time about refused credentials.
const KEY_REFUSED_EVERY: Duration = Duration::from_secs(60);

/// An upstream: where to connect, and its idle connections.
pub(crate) struct Upstream {
    url: UpstreamUrl,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// The egress proxy that connections go through, if any.
    egress: Option<Arc<Egress>>,
    idle: Mutex<Vec<(Connection, Instant)>>,
    wakeup: Arc<Wakeup>,
    /// When the upstream's last refusal of the injected key was logged.
    key_refused_at: Mutex<Option<Instant>>,
    /// In tests and under fuzzing: opens in-memory connections instead of sockets.
    #[cfg(any(test, feature = "fuzzing"))]
    memory: Option<MemoryConnector>,
}

/// Makes in-memory upstream connections.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) type MemoryConnector = Box<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

impl Upstream {
    /// An upstream for `url`, sharing the proxy's TLS connector, reaper
    /// and egress proxy (used if it carries `url`).
    pub(crate) fn new(
        url: &UpstreamUrl,
        connector: &TlsConnector,
        wakeup: Arc<Wakeup>,
        egress: Option<&Arc<Egress>>,
    ) -> Result<Upstream, Error> {
        let server_name = ServerName::try_from(url.host.clone())
            .map_err(|_| Error::BadUrl(url.host.clone(), "not a valid TLS server name"))?;
        Ok(Upstream {
            url: url.clone(),
            server_name,
            connector: connector.clone(),
            egress: egress.filter(|e| e.carries(url)).cloned(),
            idle: Mutex::new(Vec::new()),
            wakeup,
            key_refused_at: Mutex::new(None),
            #[cfg(any(test, feature = "fuzzing"))]
            memory: None,
        })
    }

    /// Replaces the network with in-memory connections.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn with_memory(mut self, connector: MemoryConnector) -> Upstream {
        self.memory = Some(connector);
        self
    }

    /// Sends `forward` — only a rewritten head can be sent — and the body
    /// bytes that came with it, in one write, on the most recently used idle
    /// connection or a new one. A pooled connection the upstream closed
    /// meanwhile fails that first write; then, since the bytes are all still
    /// here, a fresh connection gets them.
    pub(crate) async fn send(
        &self,
        forward: &Forward,
        body: &[u8],
        limits: &Limits,
        now: Instant,
    ) -> Result<Connection, Refusal> {
        if let Some(mut conn) = self.take_idle(limits.pool_idle_timeout, now) {
            if send_first(&mut conn, forward, body, limits).await.is_ok() {
                return Ok(conn);
            }
            tracing::debug!("pooled upstream connection was closed; retrying on a new one");
        }
        let mut conn = self.connect(limits).await?;
        send_first(&mut conn, forward, body, limits)
            .await
            .map_err(|err| match err {
                PumpError::SinkTimeout => {
                    Refusal::GatewayTimeout("upstream stopped reading the request")
                }
                _ => Refusal::Unreachable("upstream connection failed"),
            })?;
        Ok(conn)
    }

    /// The most recently used idle connection that is still clean, if any.
    fn take_idle(&self, max_age: Duration, now: Instant) -> Option<Connection> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((mut conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < max_age && conn.is_quiet(Waker::noop()) {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a clean connection to the pool (the caller checked that its
    /// exchange ended cleanly); with `max_idle` 0 nothing is pooled.
    pub(crate) fn put_idle(&self, conn: Connection, max_idle: usize, now: Instant) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() >= max_idle {
            if idle.is_empty() {
                return;
            }
            idle.remove(0);
        }
        if idle.is_empty() {
            // The reaper sleeps while every pool is empty.
            self.wakeup.0.notify_one();
        }
        idle.push((conn, now));
    }

    /// The upstream answered 401 or 403 on `route`: its injected key was
    /// refused. Warns, naming the route and the injected header names, at
    /// most once a minute, so the operator learns it from keyhole rather
    /// than from a confused agent.
    pub(crate) fn key_refused(&self, route: &Route, status: u16) {
        if route.headers.is_empty() {
            return;
        }
        let now = Instant::now();
        let Ok(mut last) = self.key_refused_at.lock() else {
            return;
        };
        if last.is_some_and(|at| now.saturating_duration_since(at) < KEY_REFUSED_EVERY) {
            return;
        }
        *last = Some(now);
        let names: Vec<&str> = route.headers.iter().map(|(n, _)| n.as_str()).collect();
        tracing::warn!(
            route = route.prefix,
            headers = names.join(","),
            status,
            "the upstream refused the injected credentials: check the key"
        );
    }

    /// Closes idle connections that are past `max_age` or no longer quiet;
    /// returns when the oldest remaining one expires, if any.
    fn sweep(&self, waker: &Waker, max_age: Duration, now: Instant) -> Option<Instant> {
        let mut idle = self.idle.lock().ok()?;
        idle.retain_mut(|(conn, since)| {
            now.saturating_duration_since(*since) < max_age && conn.is_quiet(waker)
        });
        idle.first().map(|(_, since)| *since + max_age)
    }

    /// Opens a new connection: DNS and TCP under `connect_timeout`, then the
    /// TLS handshake (certificate verified before any request byte) under
    /// `tls_timeout`.
    async fn connect(&self, limits: &Limits) -> Result<Connection, Refusal> {
        #[cfg(any(test, feature = "fuzzing"))]
        if let Some(memory) = &self.memory {
            return Ok(Connection::new(Box::new(memory())));
        }
        let tcp = timeout(limits.connect_timeout, self.connect_tcp(limits))
            .await
            .map_err(|_| Refusal::GatewayTimeout("upstream connect timed out"))??;
        if !self.url.tls {
            return Ok(Connection::new(Box::new(tcp)));
        }
        let tls = timeout(limits.tls_timeout, self.connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| Refusal::GatewayTimeout("upstream TLS handshake timed out"))?
            .map_err(|err| {
                tracing::warn!(upstream = %self.url.authority, error = %err, "upstream TLS handshake failed");
                Refusal::UpstreamTls
            })?;
        Ok(Connection::new(Box::new(tls)))
    }

    /// TCP to the upstream, or a tunnel to it through the egress proxy: a
    /// CONNECT, then the proxy's answer, read until its head ends.
    async fn connect_tcp(&self, limits: &Limits) -> Result<TcpStream, Refusal> {
        let Some(egress) = &self.egress else {
            return tcp((self.url.host.as_str(), self.url.port), &self.url.authority).await;
        };
        let mut tcp = tcp(egress.authority.as_str(), &egress.authority).await?;
        let (head, end) = (egress::connect_head(&self.url), egress.end.expose());
        let sent = relay::write_pair(&mut tcp, head.as_bytes(), end, limits.connect_timeout);
        // A failed write ends it as a close would.
        let mut read = sent.await.map_or(0, |()| 1);
        // On the heap: only tunnelled connects pay for it.
        let (mut answer, mut len) = (vec![0; egress::MAX_ANSWER_BYTES], 0);
        while read > 0 {
            read = tcp.read(&mut answer[len..]).await.unwrap_or(0);
            len += read;
            let why = match egress::parse_answer(&answer[..len]) {
                Ok(Scan::Partial) => continue,
                Ok(Scan::Complete(n)) if n == len => return Ok(tcp),
                // In TLS the client speaks first: bytes before it are no TLS.
                Ok(Scan::Complete(_)) => "egress proxy spoke first",
                Err(status) => {
                    tracing::warn!(egress_proxy = %egress.authority, status, upstream = %self.url.authority, "egress proxy refused the tunnel");
                    "egress proxy refused the tunnel"
                }
            };
            return Err(Refusal::EgressRefused(why));
        }
        Err(Refusal::EgressRefused("no answer from the egress proxy"))
    }
}

/// DNS, then TCP to each address in turn; a failure's warning names `peer`.
async fn tcp(addr: impl tokio::net::ToSocketAddrs, peer: &str) -> Result<TcpStream, Refusal> {
    let addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|_| Refusal::Unreachable("upstream name did not resolve"))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                // Heads and SSE events are small writes that must leave at once.
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(err) => last = Some(err),
        }
    }
    if let Some(err) = last {
        tracing::warn!(%peer, error = %err, "connect failed");
    }
    Err(Refusal::Unreachable("upstream unreachable"))
}

async fn send_first(
    conn: &mut Connection,
    forward: &Forward,
    body: &[u8],
    limits: &Limits,
) -> Result<(), PumpError> {
    relay::write_pair(&mut conn.stream, forward.head(), body, limits.idle_timeout).await?;
    relay::flush(&mut conn.stream, limits.idle_timeout).await
}

/// Runs for the proxy's life: closes idle connections as soon as their
/// upstream closes them or sends anything, and when they pass
/// `max_age`, without waiting for the next request on their route. Newly
/// idle connections are watched from the next sweep, `WATCH_AFTER` later.
pub(crate) async fn reap(upstreams: &[Upstream], wakeup: Arc<Wakeup>, max_age: Duration) {
    let waker = Waker::from(wakeup.clone());
    loop {
        let now = Instant::now();
        let expiry = upstreams
            .iter()
            .filter_map(|u| u.sweep(&waker, max_age, now))
            .min();
        match expiry {
            Some(expiry) => {
                let next = expiry.min(now + WATCH_AFTER);
                tokio::select! {
                    () = wakeup.0.notified() => {}
                    () = tokio::time::sleep_until(next) => {}
                }
            }
            None => wakeup.0.notified().await,
        }
    }
}
