//! K-rules: injected secrets and the client key never appear in any log line
//! (tracing captured at TRACE), in any response keyhole generates, or in the
//! `Debug`/`Display` of keyhole's public types and errors. Client-sent
//! credential values and query strings are not logged either.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::{Builder, Error, Limits, Proxy, Route, Secret};
use support::{find, ok, Pki, Upstream, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A second injected value, read from the environment through a template.
const SECOND_SECRET: &str = "sk-second-TEMPLATE-secret-91d3";
const SECOND_VAR: &str = "KEYHOLE_SECRETS_TEST_SECOND";
/// The key the sandbox must present.
const CLIENT_KEY: &str = "ck-CLIENT-KEY-must-not-leak-5b7e";
/// What a client sends as its own credential (stripped, never logged).
const CLIENT_CREDENTIAL: &str = "client-sent-credential-PLACEHOLDER-0c4d";
/// Something in a query string (never logged).
const QUERY_SECRET: &str = "QUERY-token-never-logged-6a2f";

/// Every value that must never leak.
fn forbidden() -> Vec<&'static str> {
    vec![
        SECRET,
        SECOND_SECRET,
        CLIENT_KEY,
        CLIENT_CREDENTIAL,
        QUERY_SECRET,
    ]
}

/// A `MakeWriter` target: every formatted log line lands in the buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Installs a TRACE subscriber for this thread (the current-thread runtime
/// polls keyhole's tasks here too).
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    (cap, tracing::subscriber::set_default(subscriber))
}

fn assert_clean(what: &str, text: &[u8]) {
    for secret in forbidden() {
        assert!(
            find(text, secret.as_bytes()).is_none(),
            "{what} contains {secret:?}: {}",
            String::from_utf8_lossy(text)
        );
    }
}

/// An upstream that answers by target: `/v1/bad` malformed, `/v1/slow`
/// never, `/v1/reset` cut off mid-body, anything else `ok:<path>`.
async fn upstream() -> Upstream {
    Upstream::start_raw(|mut conn| async move {
        while let Some(req) = Box::pin(conn.read_request()).await {
            let path = req.target.split('?').next().unwrap_or_default().to_owned();
            match path.as_str() {
                "/v1/bad" => {
                    let _ = conn
                        .write(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nxyz",
                        )
                        .await;
                    return;
                }
                "/v1/slow" => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    return;
                }
                "/v1/reset" => {
                    let _ = conn
                        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                        .await;
                    return;
                }
                _ => {
                    if conn.send(ok(&format!("ok:{path}"))).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

fn route(upstream: &Upstream, prefix: &str) -> Route {
    std::env::set_var(SECOND_VAR, SECOND_SECRET);
    Route::new(prefix, &upstream.url(prefix))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET))
        .header(
            "x-second",
            Secret::from_template(&format!("Bearer ${{{SECOND_VAR}}}")).unwrap(),
        )
}

fn builder(upstream: &Upstream) -> Builder {
    Proxy::builder()
        .ca_pem(upstream.ca_pem.clone())
        .route(route(upstream, "/v1"))
        .client_key(Secret::new(CLIENT_KEY))
        .limits(Limits {
            head_timeout: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(1),
            max_body_bytes: Some(1000),
            ..Limits::default()
        })
}

/// Sends `bytes` on a new connection and returns everything keyhole sends
/// back until it closes (or 4 s pass).
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

fn status(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One request per class of outcome: `(request, expected status)`.
fn requests() -> Vec<(String, u16)> {
    let key = format!("x-api-key: {CLIENT_KEY}\r\n");
    let bearer = format!("authorization: Bearer {CLIENT_KEY}\r\n");
    let cred =
        format!("x-api-key: {CLIENT_KEY}\r\nproxy-authorization: Basic {CLIENT_CREDENTIAL}\r\n");
    let q = QUERY_SECRET;
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}connection: close\r\n\r\n")
    };
    vec![
        (get(&format!("/v1/ok?token={q}"), &key), 200),
        (get(&format!("/v1/ok?token={q}"), &bearer), 200),
        (get("/v1/creds", &cred), 200),
        (format!("POST /v1/up?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}transfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), 200),
        // Refusals, one per class.
        (get(&format!("/v1/ok?token={q}"), ""), 401),
        (get(&format!("/v1/ok?token={q}"), &format!("x-api-key: {CLIENT_CREDENTIAL}\r\n")), 401),
        (get(&format!("/v1/ok?token={q}"), &format!("authorization: Bearer {CLIENT_CREDENTIAL}\r\n")), 401),
        (get(&format!("/v1/ok?token={q}"), &format!("{key}Origin: http://evil\r\n")), 403),
        (format!("GET /v1/ok?token={q} HTTP/1.1\r\nHost: evil.example\r\n{key}\r\n"), 403),
        (get(&format!("/other?token={q}"), &key), 404),
        (format!("TRACE /v1/ok?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}\r\n"), 405),
        (format!("GET /v1/../x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}\r\n"), 400),
        (format!("POST /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
        (format!("POST /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}transfer-encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"), 400),
        (format!("GET /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}X_Bad: {CLIENT_CREDENTIAL}\r\n\r\n"), 400),
        (format!("GET /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {CLIENT_KEY}\nX: y\r\n\r\n"), 400),
        (format!("GET /v1/x?token={q} HTTP/1.0\r\nHost: localhost\r\n{key}\r\n"), 505),
        (format!("POST /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}content-length: 5000\r\n\r\n"), 413),
        (format!("POST /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}expect: teapot\r\ncontent-length: 1\r\n\r\nx"), 417),
        (format!("GET /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}x-big: {}\r\n\r\n", "a".repeat(70 * 1024)), 431),
        (format!("GET /v1/x?token={q} HTTP/1.1\r\nHost: localhost\r\n{key}"), 408),
        // Upstream failures.
        (get(&format!("/v1/bad?token={q}"), &key), 502),
        (get(&format!("/v1/slow?token={q}"), &key), 504),
        (get(&format!("/v1/reset?token={q}"), &key), 200),
    ]
}

#[tokio::test]
async fn k_no_secret_in_logs_or_generated_responses() {
    let (logs, _guard) = capture();
    let up = upstream().await;
    let proxy = builder(&up).start().await.unwrap();
    for (request, want) in requests() {
        let response = exchange(proxy.local_addr(), request.as_bytes()).await;
        assert_eq!(
            status(&response),
            want,
            "{request:.120}\n-> {}",
            String::from_utf8_lossy(&response)
        );
        assert_clean("a response", &response);
    }
    // The injected values did reach the upstream, the client's did not.
    let raw = up.raw();
    assert!(
        find(&raw, SECRET.as_bytes()).is_some() && find(&raw, SECOND_SECRET.as_bytes()).is_some()
    );
    assert!(
        find(&raw, CLIENT_KEY.as_bytes()).is_none(),
        "client key forwarded"
    );
    assert!(
        find(&raw, CLIENT_CREDENTIAL.as_bytes()).is_none(),
        "client credential forwarded"
    );

    // An untrusted upstream certificate (502) with its own proxy.
    let untrusted = Proxy::builder()
        .route(route(&up, "/v1"))
        .start()
        .await
        .unwrap();
    let response = exchange(
        untrusted.local_addr(),
        format!("GET /v1/x?token={QUERY_SECRET} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&response), 502);
    assert_clean("a response", &response);
    untrusted.shutdown().await;
    proxy.shutdown().await;

    let text = logs.text();
    // The capture works: one line per request, refusals included.
    assert!(
        text.contains("status=200") && text.contains("status=401") && text.contains("status=502"),
        "{text}"
    );
    assert!(text.contains("/v1/ok"), "paths are logged: {text}");
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "TRACE level not captured: {text}"
    );
    assert_clean("the log", text.as_bytes());
}

#[tokio::test]
async fn k_expired_certificate_no_secret_in_logs() {
    let (logs, _guard) = capture();
    let up = Upstream::start_with(Pki::expired(), |mut conn| async move {
        while Box::pin(conn.read_request()).await.is_some() {}
    })
    .await;
    let proxy = builder(&up).start().await.unwrap();
    let request = format!("GET /v1/x?token={QUERY_SECRET} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {CLIENT_KEY}\r\n\r\n");
    let response = exchange(proxy.local_addr(), request.as_bytes()).await;
    assert_eq!(status(&response), 502);
    assert_clean("a response", &response);
    drop(proxy);
    assert!(logs.text().contains("status=502"), "{}", logs.text());
    assert_clean("the log", logs.text().as_bytes());
}

#[tokio::test]
async fn k_debug_output_redacted() {
    let up = upstream().await;
    let secret = Secret::new(SECRET);
    assert_clean("Secret Debug", format!("{secret:?}").as_bytes());
    assert_clean(
        "Secret Debug (alternate)",
        format!("{secret:#?}").as_bytes(),
    );
    let r = route(&up, "/v1");
    let debug = format!("{r:?} {r:#?}");
    assert_clean("Route Debug", debug.as_bytes());
    assert!(
        debug.contains("x-api-key"),
        "header names are shown: {debug}"
    );
    let b = builder(&up);
    assert_clean("Builder Debug", format!("{b:?} {b:#?}").as_bytes());
    let handle = b.start().await.unwrap();
    assert_clean(
        "ProxyHandle Debug",
        format!("{handle:?} {handle:#?}").as_bytes(),
    );
    let limits = Limits::default();
    assert_clean("Limits Debug", format!("{limits:?}").as_bytes());
}

fn assert_error_clean(err: &Error) {
    let text = format!("{err} {err:?} {err:#?}");
    assert_clean("an Error", text.as_bytes());
}

#[tokio::test]
async fn k_errors_never_show_values() {
    let up = upstream().await;
    let mut errors: Vec<Error> = Vec::new();

    // A header value with CR/LF that would inject a header.
    let bad_value = Route::new("/v1", &up.url(""))
        .unwrap()
        .header("x-api-key", Secret::new(format!("{SECRET}\r\nx-evil: 1")));
    errors.push(Proxy::builder().route(bad_value).start().await.unwrap_err());
    let padded = Route::new("/v1", &up.url(""))
        .unwrap()
        .header("x-api-key", Secret::new(format!(" {SECRET} ")));
    errors.push(Proxy::builder().route(padded).start().await.unwrap_err());
    let nul = Route::new("/v1", &up.url(""))
        .unwrap()
        .header("x-api-key", Secret::new(format!("{SECRET}\0")));
    errors.push(Proxy::builder().route(nul).start().await.unwrap_err());

    // A client key with a control byte.
    let ok_route = || {
        Route::new("/v1", &up.url(""))
            .unwrap()
            .header("x-api-key", Secret::new(SECRET))
    };
    errors.push(
        Proxy::builder()
            .route(ok_route())
            .client_key(Secret::new(format!("{CLIENT_KEY}\n")))
            .start()
            .await
            .unwrap_err(),
    );

    // An environment variable holding a control byte, and an unset one.
    std::env::set_var(
        "KEYHOLE_SECRETS_TEST_CRLF",
        format!("{SECOND_SECRET}\r\nx-evil: 1"),
    );
    let err = Secret::from_template("Bearer ${KEYHOLE_SECRETS_TEST_CRLF}").unwrap_err();
    assert!(
        err.to_string().contains("KEYHOLE_SECRETS_TEST_CRLF"),
        "{err}"
    );
    errors.push(err);
    errors.push(Secret::from_env("KEYHOLE_SECRETS_TEST_SURELY_UNSET").unwrap_err());
    errors.push(Secret::from_template(&format!("{SECRET} ${{unterminated")).unwrap_err());

    // Bind failure, duplicate prefix, a non-token name, no routes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    errors.push(
        Proxy::builder()
            .listen(taken.local_addr().unwrap())
            .route(ok_route())
            .start()
            .await
            .unwrap_err(),
    );
    errors.push(
        Proxy::builder()
            .route(ok_route())
            .route(ok_route())
            .start()
            .await
            .unwrap_err(),
    );
    let bad_name = Route::new("/v1", &up.url(""))
        .unwrap()
        .header("x api key", Secret::new(SECRET));
    errors.push(Proxy::builder().route(bad_name).start().await.unwrap_err());
    errors.push(
        Proxy::builder()
            .client_key(Secret::new(CLIENT_KEY))
            .start()
            .await
            .unwrap_err(),
    );

    for err in &errors {
        assert_error_clean(err);
    }
}
