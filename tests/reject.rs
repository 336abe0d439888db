//! The adversarial suite: raw bytes over real sockets against keyhole's
//! strict profile (docs/strict-profile.md). Every test is named after the
//! rule it proves, by the short ids that document lists (S1–S16 request
//! side, R1–R5 upstream side, B1–B3 browsers, K client keys).
//!
//! For a refused request each case asserts: the exact status (a generated
//! response with `connection: close`), that keyhole then closes the
//! connection with nothing after the response, that the upstream received
//! nothing of the refused request, and that a fresh connection still gets a
//! 200. Body-framing errors are found while the body streams, so for them the
//! upstream may have received the head: there the case asserts instead that
//! the upstream never got a complete chunked terminator and that its
//! connection was closed (never pooled, never reused).

// The idle-connections test reports the open-file limit it could use.
#![allow(clippy::disallowed_macros)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhole::{Builder, Limits, Proxy, Route, Secret};
use support::{find, ok, parse_response_head, Pki, Received, Upstream, SECRET, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The client key used by the client-key cases.
const CLIENT_KEY: &str = "ck-placeholder-CLIENT-KEY-77e1";

// ---------------------------------------------------------------------------
// A raw client that can write in the background while it reads.
// ---------------------------------------------------------------------------

/// One response as the client saw it.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    head: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Body bytes as received (chunk framing included).
    raw_body: Vec<u8>,
    /// Whether the body was complete by its own framing.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Raw {
    rd: OwnedReadHalf,
    wr: Arc<Mutex<OwnedWriteHalf>>,
    buf: Vec<u8>,
    eof: bool,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (rd, wr) = stream.into_split();
        Raw {
            rd,
            wr: Arc::new(Mutex::new(wr)),
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes every part in order (pausing `gap` between parts) from a
    /// background task, ignoring write errors (keyhole may close first).
    fn send_parts(&self, parts: Vec<Vec<u8>>, gap: Duration) -> tokio::task::JoinHandle<()> {
        let wr = self.wr.clone();
        tokio::spawn(async move {
            let mut wr = wr.lock().await;
            for (i, part) in parts.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if wr.write_all(&part).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Writes and waits for the write to finish (errors ignored).
    async fn send(&self, bytes: &[u8]) {
        let _ = self.wr.lock().await.write_all(bytes).await;
    }

    async fn fill(&mut self, wait: Duration) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = vec![0u8; 65536];
        match tokio::time::timeout(wait, self.rd.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => {
                self.eof = true;
                false
            }
            Err(_) => false,
        }
    }

    /// The next response (1xx included). `None` if the connection closed or
    /// stalled for `STEP` before a complete head.
    async fn response(&mut self, head_request: bool) -> Option<Resp> {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if !self.fill(STEP).await {
                return None;
            }
        };
        let head_bytes: Vec<u8> = self.buf.drain(..end + 4).collect();
        let (status, headers) = parse_response_head(&head_bytes)?;
        let mut r = Resp {
            status,
            head: String::from_utf8_lossy(&head_bytes).into_owned(),
            headers,
            body: Vec::new(),
            raw_body: Vec::new(),
            complete: true,
        };
        if status < 200 || head_request || status == 204 || status == 304 {
            return Some(r);
        }
        if r.header("transfer-encoding").is_some() {
            r.complete = false;
            'chunks: loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    if !self.fill(STEP).await {
                        r.raw_body.append(&mut self.buf);
                        break 'chunks;
                    }
                };
                let line: Vec<u8> = self.buf.drain(..line_end + 2).collect();
                r.raw_body.extend_from_slice(&line);
                let Some(size) = std::str::from_utf8(&line[..line_end])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s, 16).ok())
                else {
                    break;
                };
                while self.buf.len() < size + 2 {
                    if !self.fill(STEP).await {
                        r.body
                            .extend_from_slice(&self.buf[..self.buf.len().min(size)]);
                        r.raw_body.append(&mut self.buf);
                        break 'chunks;
                    }
                }
                let data: Vec<u8> = self.buf.drain(..size + 2).collect();
                r.raw_body.extend_from_slice(&data);
                if size == 0 {
                    r.complete = true;
                    break;
                }
                r.body.extend_from_slice(&data[..size]);
            }
        } else if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill(STEP).await {
                    r.complete = false;
                    break;
                }
            }
            let n = len.min(self.buf.len());
            r.body = self.buf.drain(..n).collect();
            r.raw_body.clone_from(&r.body);
        } else {
            while self.fill(STEP).await {}
            r.body = std::mem::take(&mut self.buf);
            r.raw_body.clone_from(&r.body);
        }
        Some(r)
    }

    /// The next final (non-1xx) response.
    async fn final_response(&mut self, head_request: bool) -> Option<Resp> {
        loop {
            let r = self.response(head_request).await?;
            if r.status >= 200 {
                return Some(r);
            }
        }
    }

    /// True if the peer closes within `wait`; whatever arrives meanwhile is
    /// kept in `buf` (the caller asserts it is empty).
    async fn closes_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.fill(left).await;
        }
        true
    }
}

// ---------------------------------------------------------------------------
// Upstreams and proxies.
// ---------------------------------------------------------------------------

/// An upstream answering `ok:<target>` to every request, counting the
/// connections whose handler ended (the peer closed or sent garbage).
struct Up {
    up: Upstream,
    ended: Arc<AtomicUsize>,
}

async fn upstream() -> Up {
    scripted(|_| None).await
}

/// An upstream whose answer to a request can be scripted: `script` returns
/// `Some(bytes)` to send those bytes and then close the connection, or `None`
/// for the usual `ok:<target>`.
async fn scripted(script: impl Fn(&Received) -> Option<Vec<u8>> + Send + Sync + 'static) -> Up {
    let ended = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let counter = ended.clone();
    let up = Upstream::start_raw(move |mut conn| {
        let (counter, script) = (counter.clone(), script.clone());
        async move {
            while let Some(req) = Box::pin(conn.read_request()).await {
                if let Some(bytes) = script(&req) {
                    let _ = conn.write(&bytes).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                if conn.send(ok(&format!("ok:{}", req.target))).await.is_err() {
                    break;
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    Up { up, ended }
}

impl Up {
    /// Waits until every upstream connection accepted so far was closed by keyhole.
    async fn all_connections_closed(&self) -> bool {
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if self.ended.load(Ordering::SeqCst) == self.up.connections() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

fn limits() -> Limits {
    Limits::default()
}

fn with_client_key(b: Builder) -> Builder {
    b.client_key(Secret::new(CLIENT_KEY))
}

fn with_body_limit(b: Builder) -> Builder {
    b.limits(Limits {
        max_body_bytes: Some(10),
        ..limits()
    })
}

fn with_head_timeout(b: Builder) -> Builder {
    b.limits(Limits {
        head_timeout: Duration::from_secs(1),
        ..limits()
    })
}

fn same(b: Builder) -> Builder {
    b
}

/// keyhole with only the route `/v1` (so other paths are 404).
async fn keyhole_v1(up: &Upstream, configure: fn(Builder) -> Builder) -> keyhole::ProxyHandle {
    let route = Route::new("/v1", &up.url("/v1"))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET));
    configure(Proxy::builder().ca_pem(up.ca_pem.clone()).route(route))
        .start()
        .await
        .unwrap()
}

/// A fresh connection gets a normal 200 from the upstream.
async fn fresh_ok(addr: std::net::SocketAddr, extra: &str) {
    let mut c = Raw::connect(addr).await;
    c.send(format!("GET /v1/__fresh HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").as_bytes())
        .await;
    let r = c
        .final_response(false)
        .await
        .expect("fresh request: no response");
    assert_eq!(r.status, 200, "fresh request after the case: {}", r.head);
    assert_eq!(r.text(), "ok:/v1/__fresh");
}

/// Where a refusal is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// From the head: nothing at all reaches the upstream.
    Head,
    /// While the body streams: the head may reach the upstream, but never a
    /// complete body, and that upstream connection is closed.
    Body,
}

/// Asserts a generated refusal followed by a close.
async fn expect_refusal(c: &mut Raw, allowed: &[u16]) -> Resp {
    let r = c
        .response(false)
        .await
        .expect("no response before the connection closed");
    assert!(
        allowed.contains(&r.status),
        "expected one of {allowed:?}, got {}",
        r.head
    );
    assert!(r.complete, "refusal body incomplete");
    assert_eq!(
        r.header("connection").as_deref(),
        Some("close"),
        "{}",
        r.head
    );
    assert!(
        c.closes_within(Duration::from_secs(3)).await,
        "connection not closed after {}",
        r.status
    );
    assert!(
        c.buf.is_empty(),
        "bytes after the refusal: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
    r
}

/// The standard case: send `parts` (150 ms apart) on one connection,
/// expect one of `allowed`, then check the upstream and a fresh connection.
async fn refusal(
    configure: fn(Builder) -> Builder,
    extra: &str,
    parts: Vec<Vec<u8>>,
    allowed: &[u16],
    stage: Stage,
) {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, configure).await;
    let addr = proxy.local_addr();
    let mut c = Raw::connect(addr).await;
    let _writer = c.send_parts(parts, Duration::from_millis(150));
    expect_refusal(&mut c, allowed).await;
    drop(c);
    check_upstream_after(&up, stage).await;
    fresh_ok(addr, extra).await;
    let got = up.up.received();
    assert_eq!(got.len(), 1, "upstream requests: {got:?}");
    assert_eq!(got[0].target, "/v1/__fresh");
    if stage == Stage::Head {
        assert_eq!(
            up.up.raw(),
            got[0].head.as_bytes(),
            "upstream got more than the fresh request"
        );
    }
}

async fn check_upstream_after(up: &Up, stage: Stage) {
    match stage {
        Stage::Head => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                up.up.raw().is_empty(),
                "upstream received: {:?}",
                String::from_utf8_lossy(&up.up.raw())
            );
        }
        Stage::Body => {
            assert!(
                up.all_connections_closed().await,
                "the upstream connection was left open"
            );
            let raw = up.up.raw();
            if let Some(end) = find(&raw, b"\r\n\r\n") {
                let body = &raw[end + 4..];
                assert!(
                    find(body, b"0\r\n\r\n").is_none(),
                    "upstream got a terminator: {:?}",
                    String::from_utf8_lossy(body)
                );
            }
            assert!(
                up.up.received().is_empty(),
                "upstream got a complete request"
            );
        }
    }
}

/// `n` header lines `X-H<i>: value`.
fn header_lines(n: usize, value: &str) -> String {
    use std::fmt::Write as _;
    (0..n).fold(String::new(), |mut out, i| {
        let _ = write!(out, "X-H{i}: {value}\r\n");
        out
    })
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// A GET of `/v1/x` with `headers` (each ending in CRLF).
fn get_with(headers: &str) -> Vec<u8> {
    format!("GET /v1/x HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").into_bytes()
}

/// A request line with `target`, Host: localhost.
fn target(t: &str) -> Vec<u8> {
    format!("GET {t} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

/// Cases refused from the head: `name: bytes => [statuses];`.
macro_rules! head_cases {
    ($($(#[$m:meta])* $name:ident: $bytes:expr => $st:expr;)*) => {$(
        $(#[$m])*
        #[tokio::test]
        async fn $name() {
            refusal(same, "", vec![$bytes], &$st, Stage::Head).await;
        }
    )*};
}

/// Chunked bodies whose framing breaks S10. The head and a valid first
/// chunk go first; the bad bytes follow 150 ms later, so the upstream has
/// already been sent the head and must see its connection closed.
macro_rules! chunk_cases {
    ($($(#[$m:meta])* $name:ident: $bad:expr;)*) => {$(
        $(#[$m])*
        #[tokio::test]
        async fn $name() {
            let head = b("POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
            refusal(same, "", vec![head, $bad.to_vec()], &[400], Stage::Body).await;
        }
    )*};
}

// ---------------------------------------------------------------------------
// S1 version, S2 method, S3 target form, S4 path safety.
// ---------------------------------------------------------------------------

head_cases! {
    s1_http10: b("GET /v1/x HTTP/1.0\r\nHost: localhost\r\n\r\n") => [505];
    s1_http20: b("GET /v1/x HTTP/2.0\r\nHost: localhost\r\n\r\n") => [505];
    s1_http12: b("GET /v1/x HTTP/1.2\r\nHost: localhost\r\n\r\n") => [505];
    s1_http09_version: b("GET /v1/x HTTP/0.9\r\n\r\n") => [505];
    s1_http09_bare_request_line_400: b("GET /v1/x\r\n\r\n") => [400];
    s1_http2_preface: b("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") => [505];
    s1_te_in_http10_version_first: b("POST /v1/x HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n") => [505];
    s1_not_a_request_line: b("HELLO\r\n\r\n") => [400];
    s2_method_not_token_paren: b("GE(T /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s2_method_not_token_quote: b("G=\":<> /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s2_connect_authority: b("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n") => [400];
    s2_connect_origin_form: b("CONNECT /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s2_b3_trace_405: b("TRACE /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n") => [405];
    s3_absolute_form_http: target("http://example.com/v1/x") => [400];
    s3_absolute_form_https: target("https://127.0.0.1/v1/x") => [400];
    s3_authority_form: target("example.com:443") => [400];
    s3_asterisk_get: target("*") => [400];
    s3_options_asterisk: b("OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s3_double_slash: target("//evil.example.com/v1/x") => [400];
    s3_fragment: target("/v1/x#frag") => [400];
    s3_non_ascii_target: b("GET /v1/caf\u{e9} HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s3_del_in_target: b("GET /v1/a\x7fb HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s4_dot_dot_segment: target("/v1/../admin") => [400];
    s4_dot_segment: target("/v1/./x") => [400];
    s4_trailing_dot_dot: target("/v1/x/..") => [400];
    s4_pct_2e2e: target("/v1/%2e%2e/admin") => [400];
    s4_pct_2e_mixed_case: target("/v1/.%2E/admin") => [400];
    s4_pct_single_dot: target("/v1/%2E/x") => [400];
    s4_pct_2f: target("/v1/a%2fb") => [400];
    s4_pct_2f_upper: target("/v1/..%2Fadmin") => [400];
    s4_pct_5c: target("/v1/a%5cb") => [400];
    s4_pct_5c_upper: target("/v1/a%5Cb") => [400];
    s4_backslash: target("/v1/a\\..\\b") => [400];
    s4_dot_dot_semicolon: target("/v1/..;/admin") => [400];
    s4_dot_semicolon_param: target("/v1/.;x=1/admin") => [400];
    s4_invalid_percent_encoding: target("/v1/a%zz") => [400];
}

// ---------------------------------------------------------------------------
// S5 line endings, S6 field syntax, S7 names and values, S8 Host.
// ---------------------------------------------------------------------------

head_cases! {
    s5_bare_lf_after_request_line: b("GET /v1/x HTTP/1.1\nHost: localhost\r\n\r\n") => [400];
    s5_bare_lf_after_header: b("GET /v1/x HTTP/1.1\r\nHost: localhost\nX-A: b\r\n\r\n") => [400];
    s5_bare_lf_final: b("GET /v1/x HTTP/1.1\r\nHost: localhost\r\n\n") => [400];
    s5_bare_lf_only: b("GET /v1/x HTTP/1.1\nHost: localhost\n\n") => [400];
    s5_bare_cr_line_end: b("GET /v1/x HTTP/1.1\r\nHost: localhost\rX-A: b\r\n\r\n") => [400];
    s5_bare_cr_in_value: get_with("X-A: a\rb\r\n") => [400];
    s5_two_leading_empty_lines: b("\r\n\r\nGET /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s6_space_before_colon: get_with("X-A : b\r\n") => [400];
    s6_tab_before_colon: get_with("X-A\t: b\r\n") => [400];
    s6_space_before_colon_content_length: b("POST /v1/x HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello") => [400];
    s6_obs_fold_space: get_with("X-A: b\r\n c\r\n") => [400];
    s6_obs_fold_tab: get_with("X-A: b\r\n\tc\r\n") => [400];
    s6_first_header_line_starts_with_space: b("GET /v1/x HTTP/1.1\r\n Host: localhost\r\n\r\n") => [400];
    s6_nul_in_value: get_with("X-A: a\0b\r\n") => [400];
    s6_ctl_in_value: get_with("X-A: a\x01b\r\n") => [400];
    s6_del_in_value: get_with("X-A: a\x7fb\r\n") => [400];
    s6_nul_in_name: get_with("X\0A: b\r\n") => [400];
    s6_ctl_in_name: get_with("X\x1bA: b\r\n") => [400];
    s6_empty_name: get_with(": b\r\n") => [400];
    s6_no_colon: get_with("X-A b\r\n") => [400];
    s6_non_token_name: get_with("X(A): b\r\n") => [400];
    s6_space_in_name: get_with("X A: b\r\n") => [400];
    s7_underscore_in_name: get_with("X_Forwarded_For: 1.2.3.4\r\n") => [400];
    s7_underscore_content_length: b("POST /v1/x HTTP/1.1\r\nHost: localhost\r\nContent_Length: 5\r\n\r\nhello") => [400];
    s7_obs_text_in_content_length: b"POST /v1/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\xa0\r\n\r\nhello".to_vec() => [400];
    s7_obs_text_in_transfer_encoding: b"POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n".to_vec() => [400];
    s7_obs_text_in_x_api_key: get_with("x-api-key: k\u{e9}y\r\n") => [400];
    s7_obs_text_in_connection: get_with("Connection: keep-alive\u{e9}\r\n") => [400];
    s8_host_missing: b("GET /v1/x HTTP/1.1\r\nUser-Agent: t\r\n\r\n") => [400];
    s8_host_repeated_equal: get_with("Host: localhost\r\n") => [400];
    s8_host_repeated_different: get_with("Host: 127.0.0.1\r\n") => [400];
    s8_host_empty: b("GET /v1/x HTTP/1.1\r\nHost: \r\n\r\n") => [400];
    s8_host_with_path: b("GET /v1/x HTTP/1.1\r\nHost: localhost/x\r\n\r\n") => [400];
    s8_host_with_userinfo: b("GET /v1/x HTTP/1.1\r\nHost: user@localhost\r\n\r\n") => [400];
    s8_host_bad_port: b("GET /v1/x HTTP/1.1\r\nHost: localhost:80a\r\n\r\n") => [400];
    s8_host_port_too_long: b("GET /v1/x HTTP/1.1\r\nHost: localhost:123456\r\n\r\n") => [400];
    s8_host_with_space: b("GET /v1/x HTTP/1.1\r\nHost: local host\r\n\r\n") => [400];
    s8_host_non_ascii: b("GET /v1/x HTTP/1.1\r\nHost: caf\u{e9}\r\n\r\n") => [400];
}

// ---------------------------------------------------------------------------
// S9 framing headers (decided from the head: nothing goes upstream).
// ---------------------------------------------------------------------------

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /v1/x HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n{body}").into_bytes()
}

head_cases! {
    s9_cl_and_te: post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n") => [400];
    s9_te_and_cl: post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n") => [400];
    s9_cl_and_te_identity: post("Content-Length: 5\r\nTransfer-Encoding: identity\r\n", "hello") => [400];
    s9_two_cl_equal: post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello") => [400];
    s9_two_cl_different: post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!") => [400];
    s9_cl_comma_list: post("Content-Length: 5, 5\r\n", "hello") => [400];
    s9_cl_comma_list_no_space: post("Content-Length: 5,5\r\n", "hello") => [400];
    s9_cl_plus: post("Content-Length: +5\r\n", "hello") => [400];
    s9_cl_minus: post("Content-Length: -5\r\n", "hello") => [400];
    s9_cl_inner_space: post("Content-Length: 1 0\r\n", "helloworld") => [400];
    s9_cl_hex: post("Content-Length: 0x5\r\n", "hello") => [400];
    s9_cl_decimal_point: post("Content-Length: 5.0\r\n", "hello") => [400];
    s9_cl_empty: post("Content-Length: \r\n", "") => [400];
    s9_cl_overflow_u64: post("Content-Length: 18446744073709551616\r\n", "hello") => [400];
    s9_cl_overflow_many_digits: post("Content-Length: 99999999999999999999999999999\r\n", "hello") => [400];
    s9_te_chunked_identity: post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n") => [400];
    s9_te_xchunked: post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n") => [400, 501];
    s9_te_chunked_twice_lines: post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n") => [400];
    s9_te_chunked_twice_list: post("Transfer-Encoding: chunked, chunked\r\n", "0\r\n\r\n") => [400];
    s9_te_identity: post("Transfer-Encoding: identity\r\n", "") => [400, 501];
    s9_te_gzip_chunked: post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n") => [400];
    s9_te_gzip: post("Transfer-Encoding: gzip\r\n", "") => [400, 501];
    s9_te_empty: post("Transfer-Encoding: \r\n", "") => [400];
    s9_te_chunked_with_parameter: post("Transfer-Encoding: chunked;q=1\r\n", "0\r\n\r\n") => [400];
}

// ---------------------------------------------------------------------------
// S10 chunked bodies (decided while the body streams).
// ---------------------------------------------------------------------------

chunk_cases! {
    s10_chunk_size_not_hex: b"zz\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_17_hex_digits: b"00000000000000003\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_overflow_u64: b"10000000000000000\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_plus: b"+3\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_minus: b"-3\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_0x: b"0x3\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_leading_space: b" 3\r\nabc\r\n0\r\n\r\n";
    s10_chunk_size_empty_line: b"\r\nabc\r\n0\r\n\r\n";
    s10_missing_crlf_after_data: b"3\r\nabcX\r\n0\r\n\r\n";
    s10_bare_lf_after_data: b"3\r\nabc\n0\r\n\r\n";
    s10_bare_lf_after_size: b"3\nabc\r\n0\r\n\r\n";
    s10_bare_cr_after_size: b"3\rabc\r\n0\r\n\r\n";
    s10_bare_lf_in_extension: b"3;a=b\nabc\r\n0\r\n\r\n";
    s10_nul_in_extension: b"3;a\0b\r\nabc\r\n0\r\n\r\n";
    s10_unbalanced_quote_in_extension: b"3;a=\"b\r\nabc\r\n0\r\n\r\n";
    s10_bare_lf_after_last_chunk: b"0\nX: y\r\n\r\n";
    s10_trailer_bare_lf: b"0\r\nX-T: y\n\r\n";
    s10_trailer_without_colon: b"0\r\nnot a trailer\r\n\r\n";
    s10_trailer_obs_fold: b"0\r\nX-T: y\r\n z\r\n\r\n";
    s10_trailer_nul: b"0\r\nX-T: a\0b\r\n\r\n";
}

#[tokio::test]
async fn s10_chunk_extension_over_16k() {
    let head = b(
        "POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    );
    let mut bad = b"3;x=".to_vec();
    bad.resize(bad.len() + 17 * 1024, b'a');
    bad.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
    refusal(same, "", vec![head, bad], &[400], Stage::Body).await;
}

#[tokio::test]
async fn s10_chunk_extensions_over_16k_in_total() {
    // Each extension is small; their sum over the body is over the cap.
    let head = b(
        "POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    );
    let mut bad = Vec::new();
    for _ in 0..40 {
        bad.extend_from_slice(b"1;e=");
        bad.extend_from_slice(&[b'x'; 1000]);
        bad.extend_from_slice(b"\r\na\r\n");
    }
    bad.extend_from_slice(b"0\r\n\r\n");
    refusal(same, "", vec![head, bad], &[400], Stage::Body).await;
}

#[tokio::test]
async fn s10_s15_trailers_over_budget() {
    let head = b(
        "POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    );
    let mut bad = b"0\r\nX-Big: ".to_vec();
    bad.resize(bad.len() + 70 * 1024, b'a');
    bad.extend_from_slice(b"\r\n\r\n");
    refusal(same, "", vec![head, bad], &[400, 431], Stage::Body).await;
}

#[tokio::test]
async fn s10_bad_chunk_in_the_same_write_as_the_head() {
    // Decided before anything is sent: still never a terminator upstream.
    let bytes = b("POST /v1/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n+2\r\nde\r\n0\r\n\r\n");
    refusal(same, "", vec![bytes], &[400], Stage::Body).await;
}

// ---------------------------------------------------------------------------
// S11 hop-by-hop, S12 Expect.
// ---------------------------------------------------------------------------

head_cases! {
    s11_connection_nominates_host: get_with("Connection: host\r\n") => [400];
    s11_connection_nominates_content_length: post("Content-Length: 5\r\nConnection: content-length\r\n", "hello") => [400];
    s11_connection_nominates_transfer_encoding: post("Transfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n", "0\r\n\r\n") => [400];
    s11_connection_nominates_injected_header: get_with("Connection: close, X-Api-Key\r\n") => [400];
    s11_connection_not_a_token_list: get_with("Connection: a b\r\n") => [400];
    s12_expect_other_417: post("Content-Length: 5\r\nExpect: 200-ok\r\n", "hello") => [417];
    s12_expect_continue_plus_other_417: post("Content-Length: 5\r\nExpect: 100-continue\r\nExpect: foo\r\n", "hello") => [417];
}

#[tokio::test]
async fn s12_no_100_continue_before_a_refusal() {
    // Answerable from the head (403): the final status comes without a 100.
    refusal(
        same,
        "",
        vec![post(
            "Content-Length: 5\r\nExpect: 100-continue\r\nOrigin: http://evil.example\r\n",
            "",
        )],
        &[403],
        Stage::Head,
    )
    .await;
}

// ---------------------------------------------------------------------------
// B1–B3 browsers, K client keys, routing order.
// ---------------------------------------------------------------------------

head_cases! {
    b1_origin: get_with("Origin: http://evil.example\r\n") => [403];
    b1_origin_null: get_with("Origin: null\r\n") => [403];
    b1_sec_fetch_site: get_with("Sec-Fetch-Site: cross-site\r\n") => [403];
    b1_sec_fetch_site_same_origin: get_with("Sec-Fetch-Site: same-origin\r\n") => [403];
    b2_foreign_host: b("GET /v1/x HTTP/1.1\r\nHost: evil.example.com\r\n\r\n") => [403];
    b2_foreign_host_with_port: b("GET /v1/x HTTP/1.1\r\nHost: evil.example.com:8080\r\n\r\n") => [403];
    b2_rebinding_localhost_subdomain: b("GET /v1/x HTTP/1.1\r\nHost: localhost.evil.example\r\n\r\n") => [403];
    b2_rebinding_ip_like_name: b("GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1.nip.io\r\n\r\n") => [403];
    b1_before_b3_origin_and_trace: b("TRACE /v1/x HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil\r\n\r\n") => [403];
    b3_trace_root: b("TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n") => [405];
    route_unknown_path_404: target("/v2/x") => [404];
    route_prefix_needs_slash_404: target("/v1x") => [404];
    s1_version_before_syntax: b("GET /v1/../x HTTP/1.0\r\nHost: localhost\r\n\r\n") => [505];
    s4_syntax_before_browser: b("GET /v1/../x HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil\r\n\r\n") => [400];
}

#[tokio::test]
async fn b2_allow_host_accepts_the_name() {
    fn allow(b: Builder) -> Builder {
        b.allow_host("sandbox.internal")
    }
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, allow).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(b"GET /v1/a HTTP/1.1\r\nHost: sandbox.internal:8080\r\n\r\n")
        .await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
    // The same proxy still refuses another name.
    refusal(
        allow,
        "",
        vec![b("GET /v1/x HTTP/1.1\r\nHost: other.internal\r\n\r\n")],
        &[403],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn b2_local_names_accepted() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    for host in [
        "localhost",
        "LOCALHOST:1",
        "127.0.0.1:8080",
        "10.1.2.3",
        "[::1]:8080",
        "host.docker.internal",
    ] {
        let mut c = Raw::connect(proxy.local_addr()).await;
        c.send(format!("GET /v1/a HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(
            c.final_response(false).await.unwrap().status,
            200,
            "Host: {host}"
        );
    }
}

#[tokio::test]
async fn k_client_key_missing_401() {
    refusal(
        with_client_key,
        &format!("x-api-key: {CLIENT_KEY}\r\n"),
        vec![get_with("")],
        &[401],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn k_client_key_wrong_401() {
    let extra = format!("x-api-key: {CLIENT_KEY}\r\n");
    refusal(
        with_client_key,
        &extra,
        vec![get_with("x-api-key: ck-placeholder-CLIENT-KEY-77e2\r\n")],
        &[401],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn k_client_key_prefix_401() {
    let extra = format!("x-api-key: {CLIENT_KEY}\r\n");
    refusal(
        with_client_key,
        &extra,
        vec![get_with("x-api-key: ck-placeholder\r\n")],
        &[401],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn k_client_key_wrong_bearer_401() {
    let extra = format!("authorization: Bearer {CLIENT_KEY}\r\n");
    refusal(
        with_client_key,
        &extra,
        vec![get_with("authorization: Bearer nope\r\n")],
        &[401],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn k_client_key_basic_scheme_401() {
    let extra = format!("authorization: Bearer {CLIENT_KEY}\r\n");
    let bad = get_with(&format!("authorization: Basic {CLIENT_KEY}\r\n"));
    refusal(with_client_key, &extra, vec![bad], &[401], Stage::Head).await;
}

#[tokio::test]
async fn k_client_key_checked_before_route_401() {
    let extra = format!("x-api-key: {CLIENT_KEY}\r\n");
    refusal(
        with_client_key,
        &extra,
        vec![target("/nowhere")],
        &[401],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn k_b3_trace_before_client_key_405() {
    let extra = format!("x-api-key: {CLIENT_KEY}\r\n");
    refusal(
        with_client_key,
        &extra,
        vec![b("TRACE /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n")],
        &[405],
        Stage::Head,
    )
    .await;
}

async fn client_key_accepted(header: &str) {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_client_key).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&get_with(&format!("{header}\r\n"))).await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let got = up.up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header_values("x-api-key"), vec![SECRET.to_owned()]);
    assert!(got[0].header("authorization").is_none());
    assert!(
        find(&up.up.raw(), CLIENT_KEY.as_bytes()).is_none(),
        "client key reached the upstream"
    );
}

#[tokio::test]
async fn k_client_key_x_api_key_200() {
    client_key_accepted(&format!("x-api-key: {CLIENT_KEY}")).await;
}

#[tokio::test]
async fn k_client_key_bearer_200() {
    client_key_accepted(&format!("authorization: Bearer {CLIENT_KEY}")).await;
}

// ---------------------------------------------------------------------------
// S15 limits: 431, 413, 408.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s15_head_over_64k_431() {
    let big = "a".repeat(65 * 1024);
    refusal(
        same,
        "",
        vec![get_with(&format!("X-Big: {big}\r\n"))],
        &[431],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn s15_head_over_64k_refused_before_its_end_arrives() {
    // The head never ends: keyhole must not wait for it.
    let mut bytes = b("GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX-Big: ");
    bytes.resize(70 * 1024, b'a');
    refusal(same, "", vec![bytes], &[431], Stage::Head).await;
}

#[tokio::test]
async fn s15_head_over_64k_across_many_writes() {
    let parts: Vec<Vec<u8>> = std::iter::once(b("GET /v1/x HTTP/1.1\r\nHost: localhost\r\n"))
        .chain((0..9).map(|i| b(&format!("X-P{i}: {}\r\n", "b".repeat(8000)))))
        .collect();
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    let _w = c.send_parts(parts, Duration::from_millis(20));
    expect_refusal(&mut c, &[431]).await;
    check_upstream_after(&up, Stage::Head).await;
    fresh_ok(proxy.local_addr(), "").await;
}

#[tokio::test]
async fn s15_101_header_lines_431() {
    let headers: String = header_lines(100, "v");
    refusal(same, "", vec![get_with(&headers)], &[431], Stage::Head).await;
}

#[tokio::test]
async fn s15_100_header_lines_accepted() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let headers: String = header_lines(99, "v");
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&get_with(&headers)).await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
}

#[tokio::test]
async fn s15_one_mib_of_headers_431() {
    let headers = header_lines(64, &"c".repeat(16 * 1024));
    refusal(same, "", vec![get_with(&headers)], &[431], Stage::Head).await;
}

#[tokio::test]
async fn s15_one_mib_of_short_header_lines_431() {
    let headers: String = header_lines(60_000, "v");
    refusal(same, "", vec![get_with(&headers)], &[431], Stage::Head).await;
}

#[tokio::test]
async fn s15_leading_empty_lines_count_toward_head() {
    // 64 KiB of CRLFs before a request line is refused (400 or 431), never served.
    let mut bytes = b"\r\n".repeat(33 * 1024);
    bytes.extend_from_slice(&get_with(""));
    refusal(same, "", vec![bytes], &[400, 431], Stage::Head).await;
}

#[tokio::test]
async fn s15_content_length_over_body_limit_413() {
    refusal(
        with_body_limit,
        "",
        vec![post("Content-Length: 11\r\n", "hello world")],
        &[413],
        Stage::Head,
    )
    .await;
}

#[tokio::test]
async fn s15_chunked_over_body_limit_413() {
    let head = post("Transfer-Encoding: chunked\r\n", "8\r\n12345678\r\n");
    refusal(
        with_body_limit,
        "",
        vec![head, b("8\r\n12345678\r\n0\r\n\r\n")],
        &[413],
        Stage::Body,
    )
    .await;
}

#[tokio::test]
async fn s15_body_at_limit_accepted() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_body_limit).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&post(
        "Transfer-Encoding: chunked\r\n",
        "5\r\n12345\r\n5\r\n67890\r\n0\r\n\r\n",
    ))
    .await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
    assert_eq!(up.up.received()[0].body, b"1234567890");
}

/// Sends `parts` with `gap` between them and expects a 408 between
/// `min` and `max` after the first byte.
async fn expect_408(parts: Vec<Vec<u8>>, gap: Duration) {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_head_timeout).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    let started = Instant::now();
    let _w = c.send_parts(parts, gap);
    let r = expect_refusal(&mut c, &[408]).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_millis(2500),
        "408 after {elapsed:?}: {}",
        r.head
    );
    check_upstream_after(&up, Stage::Head).await;
    fresh_ok(proxy.local_addr(), "").await;
}

#[tokio::test]
async fn s15_stall_mid_head_408() {
    expect_408(vec![b("GET /v1/x HTTP/1.1\r\nHost: local")], Duration::ZERO).await;
}

#[tokio::test]
async fn s15_slowloris_trickle_not_reset_408() {
    // One byte every 200 ms: the deadline runs from the first byte.
    let head = b("GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n");
    expect_408(
        head.iter().map(|&byte| vec![byte]).collect(),
        Duration::from_millis(200),
    )
    .await;
}

fn with_idle_timeout(b: Builder) -> Builder {
    b.limits(Limits {
        idle_timeout: Duration::from_millis(800),
        ..limits()
    })
}

#[tokio::test]
async fn s15_idle_connection_without_a_request_is_closed() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_idle_timeout).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    let started = Instant::now();
    assert!(c.closes_within(Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(up.up.received().is_empty());
}

#[tokio::test]
async fn s15_idle_timer_restarts_with_each_request() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_idle_timeout).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    // Four requests 500 ms apart: 2 s in all, each gap within the 800 ms.
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        c.send(&target(&format!("/v1/n{i}"))).await;
        let r = c.final_response(false).await.expect("still open");
        assert_eq!((r.status, r.text()), (200, format!("ok:/v1/n{i}")));
    }
    // Then silence: closed after the idle time, not before.
    let quiet = Instant::now();
    assert!(c.closes_within(Duration::from_secs(5)).await);
    assert!(quiet.elapsed() >= Duration::from_millis(700));
}

// ---------------------------------------------------------------------------
// The head-size boundary, and heads refused before they end.
// ---------------------------------------------------------------------------

/// The head limit of the boundary cases: small, so a head of exactly that
/// many bytes is easy to build.
const SMALL_HEAD: usize = 300;

fn with_small_head(b: Builder) -> Builder {
    b.limits(Limits {
        max_head_bytes: SMALL_HEAD,
        ..limits()
    })
}

/// A GET of `/v1/x` whose head (`leading` CRLF included) is exactly `len`
/// bytes, padded in one header value.
fn head_of(len: usize, leading: bool) -> Vec<u8> {
    let start = if leading { "\r\n" } else { "" };
    let bare = format!("{start}GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX-Pad: \r\n\r\n");
    let pad = "p".repeat(len - bare.len());
    let head = format!("{start}GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX-Pad: {pad}\r\n\r\n");
    assert_eq!(head.len(), len);
    head.into_bytes()
}

#[tokio::test]
async fn defect3_head_of_exactly_max_head_bytes_accepted_one_more_431() {
    for leading in [false, true] {
        let up = upstream().await;
        let proxy = keyhole_v1(&up.up, with_small_head).await;
        let mut c = Raw::connect(proxy.local_addr()).await;
        c.send(&head_of(SMALL_HEAD, leading)).await;
        let r = c.final_response(false).await.expect("no response");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "ok:/v1/x"),
            "head of exactly {SMALL_HEAD} bytes, leading CRLF {leading}: {}",
            r.head
        );
        refusal(
            with_small_head,
            "",
            vec![head_of(SMALL_HEAD + 1, leading)],
            &[431],
            Stage::Head,
        )
        .await;
    }
}

fn with_long_head_timeout(b: Builder) -> Builder {
    b.limits(Limits {
        head_timeout: Duration::from_secs(30),
        ..limits()
    })
}

/// Sends `bytes`, the start of a head that never ends, to keyhole with a
/// 30 s head timeout: `status` must arrive within 2 s, keyhole must close,
/// and the upstream must receive nothing.
async fn refused_before_the_head_ends(bytes: &[u8], status: u16) {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, with_long_head_timeout).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    let started = Instant::now();
    c.send(bytes).await;
    let r = tokio::time::timeout(Duration::from_secs(2), c.response(false))
        .await
        .unwrap_or_else(|_| panic!("no answer within 2 s to {bytes:?}"))
        .expect("closed without a response");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.status, status, "{bytes:?}: {}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(c.closes_within(Duration::from_secs(3)).await);
    assert!(c.buf.is_empty(), "bytes after the refusal");
    check_upstream_after(&up, Stage::Head).await;
    fresh_ok(proxy.local_addr(), "").await;
}

#[tokio::test]
async fn early_refusal_bad_field_name_400() {
    refused_before_the_head_ends(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n",
        400,
    )
    .await;
}

#[tokio::test]
async fn early_refusal_bad_request_line_400() {
    refused_before_the_head_ends(b"G\x01T / HTTP/1.1\r\n", 400).await;
}

#[tokio::test]
async fn early_refusal_http10_request_line_505() {
    refused_before_the_head_ends(b"GET / HTTP/1.0\r\n", 505).await;
}

#[tokio::test]
async fn early_refusal_obs_fold_and_control_byte_400() {
    refused_before_the_head_ends(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\n folded\r\n", 400)
        .await;
    refused_before_the_head_ends(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX: a\x01", 400).await;
    refused_before_the_head_ends(b"GET /v1/x HTTP/1.1\r\nX : a", 400).await;
}

// ---------------------------------------------------------------------------
// S16 pipelining and smuggling.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s16_request_hidden_in_cl_body_is_only_a_body() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let hidden = "GET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&post(
        &format!("Content-Length: {}\r\n", hidden.len()),
        hidden,
    ))
    .await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/x"));
    // The same connection goes on with a real second request.
    c.send(&target("/v1/second")).await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/second"));
    let got = up.up.received();
    assert_eq!(
        got.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
        ["/v1/x", "/v1/second"]
    );
    assert_eq!(got[0].body, hidden.as_bytes());
}

#[tokio::test]
async fn s16_request_hidden_in_chunked_body_is_only_a_body() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let hidden = "GET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&post(
        "Transfer-Encoding: chunked\r\n",
        &format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len()),
    ))
    .await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/x"));
    let got = up.up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, hidden.as_bytes());
}

head_cases! {
    s16_request_after_rejected_one_same_write: [target("/v1/../x"), target("/v1/second")].concat() => [400];
    s16_cl_te_smuggle: post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s16_te_cl_smuggle: post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", "5c\r\nGET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n0\r\n\r\n") => [400];
    s16_te_obs_fold_smuggle: post("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n") => [400];
    s16_bare_lf_split_smuggle: b("GET /v1/x HTTP/1.1\r\nHost: localhost\r\nX-A: 1\nContent-Length: 40\r\n\r\n") => [400];
}

#[tokio::test]
async fn s16_valid_request_then_rejected_then_more_same_write() {
    // The first is served; the second refused; the third never reaches the upstream.
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(
        &[
            target("/v1/first"),
            post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
            target("/v1/third"),
        ]
        .concat(),
    )
    .await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/first"));
    expect_refusal(&mut c, &[400]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = up.up.received();
    assert_eq!(
        got.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
        ["/v1/first"]
    );
    assert!(find(&up.up.raw(), b"third").is_none());
}

#[tokio::test]
async fn s16_pipelined_requests_answered_in_order() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(
        &[
            target("/v1/one"),
            post("Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
            target("/v1/three"),
        ]
        .concat(),
    )
    .await;
    for want in ["ok:/v1/one", "ok:/v1/x", "ok:/v1/three"] {
        let r = c.final_response(false).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, want));
    }
}

// ---------------------------------------------------------------------------
// Accepted edge cases: the positive side of the rules above.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s5_one_leading_empty_line_accepted() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&[b"\r\n".to_vec(), target("/v1/a")].concat()).await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
}

#[tokio::test]
async fn s4_query_is_not_checked_and_forwarded_verbatim() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/a?x=../..&y=%2f%2e%2e")).await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
    assert_eq!(up.up.received()[0].target, "/v1/a?x=../..&y=%2f%2e%2e");
}

#[tokio::test]
async fn s9_chunked_case_insensitive_and_s10_reframed() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&post(
        "Transfer-Encoding: Chunked\r\n",
        "3;ext=\"q\"\r\nabc\r\n00\r\nX-Trailer: t\r\n\r\n",
    ))
    .await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let got = up.up.received();
    assert_eq!(
        got[0].header_values("transfer-encoding"),
        vec!["chunked".to_owned()]
    );
    assert_eq!(got[0].raw_body, b"3\r\nabc\r\n0\r\n\r\n");
}

#[tokio::test]
async fn s7_obs_text_forwarded_byte_exact() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(b"GET /v1/a HTTP/1.1\r\nHost: localhost\r\nX-Name: caf\xe9 \xff\r\n\r\n")
        .await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
    assert!(find(&up.up.raw(), b"caf\xe9 \xff\r\n").is_some());
}

#[tokio::test]
async fn s11_s13_hop_by_hop_and_h2c_upgrade_stripped() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&get_with(
        "Connection: Upgrade, HTTP2-Settings, X-Hop\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-Kept: 2\r\n",
    ))
    .await;
    assert_eq!(c.final_response(false).await.unwrap().status, 200);
    let got = &up.up.received()[0];
    for gone in [
        "upgrade",
        "http2-settings",
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
    ] {
        assert!(got.header(gone).is_none(), "{gone} forwarded: {}", got.head);
    }
    assert!(got
        .header_values("connection")
        .iter()
        .all(|v| v.eq_ignore_ascii_case("keep-alive") || v.eq_ignore_ascii_case("close")));
    assert_eq!(got.header("x-kept").as_deref(), Some("2"));
}

#[tokio::test]
async fn s12_expect_100_continue_works() {
    let up = upstream().await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&post("Content-Length: 5\r\nExpect: 100-continue\r\n", ""))
        .await;
    let r = c.response(false).await.unwrap();
    assert_eq!(r.status, 100, "{}", r.head);
    c.send(b"hello").await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(up.up.received()[0].body, b"hello");
    assert!(up.up.received()[0].header("expect").is_none());
}

// ---------------------------------------------------------------------------
// Many idle connections (run against the binary in a child process).
// ---------------------------------------------------------------------------

/// Kills the child process it holds (by its own handle) when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 10,000 concurrent idle client connections. The fd limit here is 20,000,
/// so keyhole runs as its own process (`CARGO_BIN_EXE_keyhole`): each
/// process then holds about 10,000 descriptors. Connections are opened 100
/// at a time; on a loaded 2-core machine an occasional SYN is retransmitted
/// after 1 s, so opening them all takes 5–20 s: the bound is 30 s. What
/// matters is the last step: with all 10,000 held open (half of them in the
/// middle of a head), a fresh request is answered within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s15_ten_thousand_idle_connections() {
    // Each side needs one descriptor per connection: `.ci/run` raises the
    // soft limit to the hard one (`ulimit -n`); a lower limit scales N down.
    let limit = open_file_limit();
    let n = 10_000.min(limit.saturating_sub(300));
    assert!(
        n >= 1_000,
        "ulimit -n is {limit}: raise it to run this test (10,300 or more)"
    );
    if n < 10_000 {
        eprintln!("ulimit -n is {limit}: testing {n} idle connections instead of 10,000");
    }
    let up = upstream().await;
    let ca = std::env::temp_dir().join(format!("keyhole-reject-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, &up.up.ca_pem).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .args(["--listen", "127.0.0.1:0", "--ca-file"])
        .arg(&ca)
        .args([
            "--route",
            &format!("/v1={}/v1", up.up.url("")),
            "--header",
            "x-api-key=${KEYHOLE_REJECT_KEY}",
        ])
        .env("KEYHOLE_REJECT_KEY", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = ChildGuard(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&ca);
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect(&line)
        .parse()
        .unwrap();

    let started = Instant::now();
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n / 100 {
        let batch = (0..100).map(|_| tokio::spawn(TcpStream::connect(addr)));
        for task in batch.collect::<Vec<_>>() {
            idle.push(task.await.unwrap().expect("connect"));
        }
    }
    let connecting = started.elapsed();
    eprintln!("{n} connections in {connecting:?}");
    assert!(
        connecting < Duration::from_secs(30),
        "{n} connections took {connecting:?}"
    );
    // Half of them start a request and stall.
    for s in idle.iter_mut().step_by(2) {
        s.write_all(b"GET /v1/x HTTP/1.1\r\n").await.unwrap();
    }
    let t = Instant::now();
    let mut c = Raw::connect(addr).await;
    c.send(&target("/v1/fresh")).await;
    let r = c
        .final_response(false)
        .await
        .expect("no answer with 10,000 idle connections");
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/fresh"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answer took {:?}",
        t.elapsed()
    );
    drop(idle);
}

/// The soft limit on open files, from /proc/self/limits (10,000 if unknown).
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        })
        .unwrap_or(10_300)
}

// ---------------------------------------------------------------------------
// R1–R5 upstream side.
// ---------------------------------------------------------------------------

/// GET `/v1/bad` is answered with `reply` (then the upstream closes); the
/// client must get `status` and a close, and a fresh request works.
async fn upstream_reply_502(reply: &'static [u8]) {
    let up = scripted(move |req| (req.target == "/v1/bad").then(|| reply.to_vec())).await;
    let proxy = keyhole_v1(&up.up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/bad")).await;
    let r = expect_refusal(&mut c, &[502]).await;
    assert!(find(&r.body, b"EVIL").is_none());
    fresh_ok(proxy.local_addr(), "").await;
}

macro_rules! upstream_cases {
    ($($(#[$m:meta])* $name:ident: $reply:expr;)*) => {$(
        $(#[$m])*
        #[tokio::test]
        async fn $name() {
            upstream_reply_502($reply).await;
        }
    )*};
}

upstream_cases! {
    r1_status_line_garbage: b"HTTX/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL";
    r1_status_four_digits: b"HTTP/1.1 2000 OK\r\ncontent-length: 4\r\n\r\nEVIL";
    r1_status_600: b"HTTP/1.1 600 Odd\r\ncontent-length: 4\r\n\r\nEVIL";
    r1_status_099: b"HTTP/1.1 099 Odd\r\ncontent-length: 4\r\n\r\nEVIL";
    r1_version_http2: b"HTTP/2.0 200 OK\r\ncontent-length: 4\r\n\r\nEVIL";
    r1_s13_status_101: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nEVIL";
    r2_cl_and_te: b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n4\r\nEVIL\r\n0\r\n\r\n";
    r2_two_cl_different: b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nEVIL!";
    r2_two_cl_equal: b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\nEVIL";
    r2_cl_list: b"HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\nEVIL";
    r2_cl_plus: b"HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\nEVIL";
    r2_te_gzip: b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nEVIL";
    r2_te_chunked_twice: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n4\r\nEVIL\r\n0\r\n\r\n";

    r2_bad_chunk_before_anything_relayed: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n+4\r\nEVIL\r\n0\r\n\r\n";
    r3_header_bare_cr: b"HTTP/1.1 200 OK\r\nx-a: a\rb\r\ncontent-length: 4\r\n\r\nEVIL";
    r3_header_bare_lf: b"HTTP/1.1 200 OK\r\nx-a: a\nx-b: b\r\ncontent-length: 4\r\n\r\nEVIL";
    r3_header_obs_fold: b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 4\r\n\r\nEVIL";
    r3_header_nul: b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 4\r\n\r\nEVIL";
    r3_space_before_colon: b"HTTP/1.1 200 OK\r\ncontent-length : 4\r\n\r\nEVIL";
    r1_too_many_interim_responses: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL";
    r5_upstream_closes_without_response: b"";
}

#[tokio::test]
async fn r3_response_head_over_limit_502() {
    let mut reply = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    reply.resize(70 * 1024, b'a');
    reply.extend_from_slice(b"\r\ncontent-length: 4\r\n\r\nEVIL");
    let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
    upstream_reply_502(reply).await;
}

#[tokio::test]
async fn r2_bad_chunk_after_head_relayed_closes() {
    // The head went out first: the client sees it, then a close, never a terminator.
    let up = Upstream::start_raw(|mut conn| async move {
        if Box::pin(conn.read_request()).await.is_some() {
            let _ = conn
                .write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ngood\r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = conn.write(b"+4\r\nEVIL\r\n0\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/x")).await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        !r.complete,
        "a cut-off body looked complete: {:?}",
        String::from_utf8_lossy(&r.raw_body)
    );
    assert!(find(&r.raw_body, b"EVIL").is_none());
    assert!(c.closes_within(Duration::from_secs(3)).await);
}

/// Sends a response head and part of its body, then resets the TCP connection.
async fn reset_mid_body(head: &'static [u8], partial: &'static [u8]) -> Resp {
    let up = Upstream::start_raw(move |mut conn| async move {
        if Box::pin(conn.read_request()).await.is_some() {
            let _ = conn.write(head).await;
            let _ = conn.write(partial).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            #[allow(deprecated)]
            let _ = conn.stream.get_ref().0.set_linger(Some(Duration::ZERO));
            drop(conn);
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/x")).await;
    let r = c.final_response(false).await.expect("no response head");
    assert_eq!(r.status, 200);
    assert!(
        c.closes_within(Duration::from_secs(3)).await,
        "client connection not closed"
    );
    assert!(
        !r.complete,
        "a cut-off body looked complete: {:?}",
        String::from_utf8_lossy(&r.raw_body)
    );
    r
}

#[tokio::test]
async fn r5_upstream_reset_mid_body_content_length() {
    let r = reset_mid_body(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
        b"0123456789",
    )
    .await;
    assert!(r.body.len() < 100);
}

#[tokio::test]
async fn r5_upstream_reset_mid_body_chunked() {
    let r = reset_mid_body(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
    )
    .await;
    assert!(find(&r.raw_body, b"0\r\n\r\n").is_none());
}

#[tokio::test]
async fn r5_untrusted_certificate_502() {
    let up = upstream().await;
    // No ca_pem: the test CA is not trusted.
    let route = Route::new("/", &up.up.url(""))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET));
    let proxy = Proxy::builder().route(route).start().await.unwrap();
    for _ in 0..2 {
        let mut c = Raw::connect(proxy.local_addr()).await;
        c.send(&target("/v1/x")).await;
        expect_refusal(&mut c, &[502]).await;
    }
    assert!(up.up.raw().is_empty());
}

#[tokio::test]
async fn r5_expired_certificate_502() {
    let up = Upstream::start_with(Pki::expired(), |mut conn| async move {
        while let Some(req) = Box::pin(conn.read_request()).await {
            let _ = conn.send(ok(&req.target)).await;
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    for _ in 0..2 {
        let mut c = Raw::connect(proxy.local_addr()).await;
        c.send(&target("/v1/x")).await;
        expect_refusal(&mut c, &[502]).await;
    }
    assert!(up.raw().is_empty());
}

#[tokio::test]
async fn r5_upstream_unreachable_502() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let route = Route::new("/", &format!("https://127.0.0.1:{port}")).unwrap();
    let proxy = Proxy::builder().route(route).start().await.unwrap();
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/x")).await;
    expect_refusal(&mut c, &[502]).await;
}

#[tokio::test]
async fn r5_upstream_timeout_504() {
    fn short(b: Builder) -> Builder {
        b.limits(Limits {
            upstream_timeout: Duration::from_secs(1),
            ..limits()
        })
    }
    let up = Upstream::start_raw(|mut conn| async move {
        while let Some(req) = Box::pin(conn.read_request()).await {
            if req.target == "/v1/slow" {
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
            let _ = conn.send(ok(&format!("ok:{}", req.target))).await;
        }
    })
    .await;
    let proxy = keyhole_v1(&up, short).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/slow")).await;
    expect_refusal(&mut c, &[504]).await;
    fresh_ok(proxy.local_addr(), "").await;
}

#[tokio::test]
async fn r5_upstream_timeout_runs_from_the_request_sent() {
    // A new upstream connection whose TLS handshake takes 700 ms (a TCP relay
    // that waits before passing bytes on), and an answer 500 ms after the
    // request: 1.2 s from the client's request, 0.5 s from sending it. With
    // a 1 s upstream timeout that is a 200, not a 504.
    let up = Upstream::start_raw(|mut conn| async move {
        while let Some(req) = Box::pin(conn.read_request()).await {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = conn.send(ok(&format!("ok:{}", req.target))).await;
        }
    })
    .await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let upstream_addr = up.addr;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = relay.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let mut server = TcpStream::connect(upstream_addr).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    let route = Route::new(
        "/v1",
        &format!("https://127.0.0.1:{}/v1", relay_addr.port()),
    )
    .unwrap()
    .header("x-api-key", Secret::new(SECRET));
    let proxy = Proxy::builder()
        .ca_pem(up.ca_pem.clone())
        .route(route)
        .limits(Limits {
            upstream_timeout: Duration::from_secs(1),
            ..limits()
        })
        .start()
        .await
        .unwrap();
    let mut c = Raw::connect(proxy.local_addr()).await;
    let started = Instant::now();
    c.send(&target("/v1/slow-start")).await;
    let r = c.final_response(false).await.expect("a response");
    assert_eq!((r.status, r.text().as_str()), (200, "ok:/v1/slow-start"));
    assert!(started.elapsed() >= Duration::from_millis(1100));
}

async fn early_answer(reply: &'static [u8]) {
    let up = Upstream::start_raw(move |mut conn| async move {
        if Box::pin(conn.read_head()).await.is_some() {
            let _ = conn.write(reply).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    let mut bytes = post("Content-Length: 1000000\r\n", "");
    bytes.extend_from_slice(&[b'x'; 1000]);
    c.send(&bytes).await;
    let r = c
        .final_response(false)
        .await
        .expect("the early response was not relayed");
    assert_eq!((r.status, r.text().as_str()), (413, "early"));
    assert!(
        c.closes_within(Duration::from_secs(3)).await,
        "connection kept open with the request body unsent"
    );
    assert!(c.buf.is_empty());
}

#[tokio::test]
async fn r4_upstream_answers_before_reading_body() {
    early_answer(b"HTTP/1.1 413 Too Large\r\ncontent-length: 5\r\nconnection: close\r\n\r\nearly")
        .await;
}

#[tokio::test]
async fn r4_upstream_answers_before_reading_body_keep_alive() {
    early_answer(b"HTTP/1.1 413 Too Large\r\ncontent-length: 5\r\n\r\nearly").await;
}

/// `/v1/a` (sent with `method`) is answered with `reply` and extra bytes
/// that look like a response; the next request on the same client
/// connection must get its own answer.
async fn no_body_then_next(method: &str, reply: &'static [u8], delay_stray: bool) {
    let up = Upstream::start_raw(move |mut conn| async move {
        while let Some(req) = Box::pin(conn.read_request()).await {
            if req.target == "/v1/a" {
                let stray = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!";
                if delay_stray {
                    let _ = conn.write(reply).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = conn.write(stray).await;
                } else {
                    let _ = conn.write(&[reply, &stray[..]].concat()).await;
                }
            } else if conn.send(ok(&format!("ok:{}", req.target))).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(format!("{method} /v1/a HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await;
    let r = c.final_response(method == "HEAD").await.unwrap();
    assert!(r.body.is_empty());
    if r.header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    {
        assert!(c.closes_within(Duration::from_secs(3)).await);
        c = Raw::connect(proxy.local_addr()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(&target("/v1/b")).await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ok:/v1/b"),
        "stray upstream bytes relayed as a response"
    );
}

#[tokio::test]
async fn r2_r4_body_after_204_not_relayed() {
    no_body_then_next("GET", b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
}

#[tokio::test]
async fn r2_r4_body_after_204_late_stray_bytes() {
    no_body_then_next("GET", b"HTTP/1.1 204 No Content\r\n\r\n", true).await;
}

#[tokio::test]
async fn r2_r4_body_after_304_not_relayed() {
    no_body_then_next("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", false).await;
}

#[tokio::test]
async fn r2_r4_body_after_head_not_relayed() {
    no_body_then_next(
        "HEAD",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        false,
    )
    .await;
}

#[tokio::test]
async fn r2_r4_body_after_head_late_stray_bytes() {
    no_body_then_next(
        "HEAD",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        true,
    )
    .await;
}

#[tokio::test]
async fn r1_interim_response_then_final() {
    let up = Upstream::start_raw(|mut conn| async move {
        while Box::pin(conn.read_request()).await.is_some() {
            let _ = conn.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").await;
        }
    })
    .await;
    let proxy = keyhole_v1(&up, same).await;
    let mut c = Raw::connect(proxy.local_addr()).await;
    c.send(&target("/v1/x")).await;
    let r = c.final_response(false).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hi"));
}
