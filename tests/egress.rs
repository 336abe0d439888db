//! Upstream connections through an HTTP CONNECT egress proxy (README "Egress
//! through a corporate proxy"): the tunnel, its reuse, Basic credentials,
//! refusals, bypass, TLS inside the tunnel, and the binary's `HTTPS_PROXY`,
//! `NO_PROXY` and `--egress-proxy`. The egress proxy is a tokio task the test
//! starts, which records every byte it sees.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::{Limits, Proxy, Secret};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The placeholder key the client sends (and keyhole checks and drops).
const PLACEHOLDER: &str = "kh-placeholder-CLIENT-KEY-77c1";

/// What the egress proxy does with each CONNECT.
#[derive(Clone)]
enum Mode {
    /// Answers 200 and splices to the target; with `Some(value)`, only if
    /// `Proxy-Authorization` is exactly `value`, else 407.
    Tunnel(Option<String>),
    /// Answers these bytes and closes.
    Answer(&'static [u8]),
    /// Says nothing and keeps the connection open.
    Silent,
    /// Closes without answering.
    Close,
}

/// A CONNECT proxy on 127.0.0.1 recording what it received.
struct EgressProxy {
    addr: SocketAddr,
    /// Each CONNECT head, exactly as received.
    heads: Arc<Mutex<Vec<String>>>,
    /// Every byte relayed through a tunnel, both ways.
    relayed: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EgressProxy {
    async fn start(mode: Mode) -> EgressProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let relayed = Arc::new(Mutex::new(Vec::new()));
        let (h, r) = (heads.clone(), relayed.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp, mode.clone(), h.clone(), r.clone()));
            }
        });
        EgressProxy {
            addr,
            heads,
            relayed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn relayed(&self) -> Vec<u8> {
        self.relayed.lock().unwrap().clone()
    }
}

async fn serve(
    mut tcp: TcpStream,
    mode: Mode,
    heads: Arc<Mutex<Vec<String>>>,
    relayed: Arc<Mutex<Vec<u8>>>,
) {
    let mut head = Vec::new();
    while find(&head, b"\r\n\r\n").is_none() {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    heads.lock().unwrap().push(head.clone());
    let auth = head
        .lines()
        .find_map(|l| l.strip_prefix("Proxy-Authorization: "));
    match mode {
        Mode::Tunnel(Some(want)) if auth != Some(want.as_str()) => {
            let _ = tcp
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
        Mode::Tunnel(_) => {
            let target = head.split(' ').nth(1).unwrap().to_owned();
            let Ok(upstream) = TcpStream::connect(&target).await else {
                return;
            };
            tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let (mut cr, mut cw) = tcp.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let up = relay(&mut cr, &mut uw, relayed.clone());
            let down = relay(&mut ur, &mut cw, relayed);
            tokio::join!(up, down);
        }
        Mode::Answer(bytes) => {
            let _ = tcp.write_all(bytes).await;
        }
        Mode::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
        Mode::Close => {}
    }
}

/// Copies `from` to `to`, recording every byte, until EOF.
async fn relay(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            let _ = to.shutdown().await;
            return;
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// A POST that carries the client's placeholder key and a body.
fn post(path: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {PLACEHOLDER}\r\ncontent-length: 5\r\n\r\nhello").into_bytes()
}

/// The exact CONNECT head for `upstream`, without credentials.
fn connect_head(upstream: &Upstream) -> String {
    let target = format!("127.0.0.1:{}", upstream.addr.port());
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// One request on a fresh connection; the response must come.
async fn ask(keyhole: SocketAddr, bytes: &[u8]) -> Response {
    tokio::time::timeout(STEP, request(keyhole, bytes))
        .await
        .expect("in time")
        .expect("a response")
}

fn assert_refused(res: &Response, status: u16, code: &str) {
    assert_eq!(res.status, status, "{}", res.head);
    assert_eq!(
        res.header("keyhole-error").as_deref(),
        Some(code),
        "{}",
        res.head
    );
}

#[tokio::test]
async fn a_request_goes_through_the_tunnel_and_no_key_crosses_it_in_clear() {
    let upstream = Upstream::start(|req| ok(&format!("saw {}", req.target))).await;
    let egress = EgressProxy::start(Mode::Tunnel(None)).await;
    let proxy = keyhole(&upstream, |b| {
        b.client_key(Secret::new(PLACEHOLDER))
            .egress_proxy(&egress.url(), "")
    })
    .await;
    let res = ask(proxy.local_addr(), &post("/v1/messages")).await;
    assert_eq!(res.status, 200, "{}", res.head);
    assert_eq!(res.text(), "saw /v1/messages");
    let got = upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header_values("x-api-key"), vec![SECRET.to_owned()]);
    assert_eq!(got[0].body, b"hello");
    // Nothing bypassed implicitly: the loopback upstream went through it.
    assert_eq!(egress.heads(), vec![connect_head(&upstream)]);
    let relayed = egress.relayed();
    assert_eq!(relayed.first(), Some(&0x16), "a TLS handshake record first");
    for clear in [SECRET, PLACEHOLDER, "x-api-key", "hello"] {
        assert!(
            find(&relayed, clear.as_bytes()).is_none(),
            "{clear} crossed the egress proxy in clear"
        );
    }
}

#[tokio::test]
async fn requests_reuse_one_tunnel() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let egress = EgressProxy::start(Mode::Tunnel(None)).await;
    let proxy = keyhole(&upstream, |b| b.egress_proxy(&egress.url(), "")).await;
    for _ in 0..5 {
        let res = ask(proxy.local_addr(), &get("/x")).await;
        assert_eq!(res.status, 200, "{}", res.head);
    }
    assert_eq!(upstream.received().len(), 5);
    assert_eq!(upstream.connections(), 1);
    assert_eq!(egress.heads().len(), 1, "one CONNECT for five requests");
}

#[tokio::test]
async fn basic_credentials_are_sent_percent_decoded() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    // base64("corp user:p@ss:w0rd")
    let want = "Basic Y29ycCB1c2VyOnBAc3M6dzByZA==";
    let egress = EgressProxy::start(Mode::Tunnel(Some(want.to_owned()))).await;
    let url = format!("http://corp%20user:p%40ss:w0rd@{}", egress.addr);
    let proxy = keyhole(&upstream, |b| b.egress_proxy(&url, "")).await;
    let res = ask(proxy.local_addr(), &get("/x")).await;
    assert_eq!(res.status, 200, "{}", res.head);
    let target = format!("127.0.0.1:{}", upstream.addr.port());
    assert_eq!(
        egress.heads(),
        vec![format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {want}\r\n\r\n"
        )]
    );
}

#[tokio::test]
async fn a_proxy_that_refuses_or_closes_is_502_egress_refused_and_nothing_reaches_upstream() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    for mode in [
        Mode::Tunnel(Some("Basic bm8=".to_owned())), // 407: no credentials given
        Mode::Answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
        Mode::Answer(b"HTTP/1.1 200 Connection established\r\n\r\nearly"),
        Mode::Answer(b"SSH-2.0-OpenSSH_9.6\r\n"),
        Mode::Close,
    ] {
        let egress = EgressProxy::start(mode).await;
        let proxy = keyhole(&upstream, |b| b.egress_proxy(&egress.url(), "")).await;
        let res = ask(proxy.local_addr(), &get("/x")).await;
        assert_refused(&res, 502, "egress-refused");
        assert_eq!(egress.heads(), vec![connect_head(&upstream)]);
    }
    assert_eq!(upstream.connections(), 0, "never a direct connection");
}

#[tokio::test]
async fn an_unreachable_proxy_is_502_and_a_silent_one_504() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let closed = format!("http://127.0.0.1:{}", closed_port().await);
    let proxy = keyhole(&upstream, |b| b.egress_proxy(&closed, "")).await;
    let res = ask(proxy.local_addr(), &get("/x")).await;
    assert_refused(&res, 502, "upstream-unreachable");

    let silent = EgressProxy::start(Mode::Silent).await;
    let limits = Limits {
        connect_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let proxy = keyhole(&upstream, |b| {
        b.egress_proxy(&silent.url(), "").limits(limits)
    })
    .await;
    let started = std::time::Instant::now();
    let res = ask(proxy.local_addr(), &get("/x")).await;
    assert_refused(&res, 504, "upstream-timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(silent.heads().len(), 1);
    assert_eq!(upstream.connections(), 0, "never a direct connection");
}

#[tokio::test]
async fn an_untrusted_certificate_inside_the_tunnel_is_502_upstream_tls() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let egress = EgressProxy::start(Mode::Tunnel(None)).await;
    // Not trusting the upstream's CA: the certificate is checked inside the tunnel.
    let proxy = Proxy::builder()
        .route(route_to(&upstream, "/", ""))
        .egress_proxy(&egress.url(), "")
        .start()
        .await
        .unwrap();
    let res = ask(proxy.local_addr(), &get("/x")).await;
    assert_refused(&res, 502, "upstream-tls");
    assert_eq!(egress.heads(), vec![connect_head(&upstream)]);
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn no_proxy_entries_bypass_the_proxy() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let egress = EgressProxy::start(Mode::Tunnel(None)).await;
    for list in ["127.0.0.1", "example.com, 127.0.0.1:1", "*"] {
        let proxy = keyhole(&upstream, |b| b.egress_proxy(&egress.url(), list)).await;
        let res = ask(proxy.local_addr(), &get("/x")).await;
        assert_eq!(res.status, 200, "{list}: {}", res.head);
    }
    // Never a mere suffix, and loopback is not bypassed implicitly.
    let proxy = keyhole(&upstream, |b| {
        b.egress_proxy(&egress.url(), "0.0.1,localhost")
    })
    .await;
    assert_eq!(ask(proxy.local_addr(), &get("/x")).await.status, 200);
    assert_eq!(
        egress.heads().len(),
        1,
        "only the last keyhole used the proxy"
    );
}

#[tokio::test]
async fn a_bad_egress_proxy_url_stops_start_without_showing_it() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    for url in [
        "https://user:hunter2@proxy:3128",
        "http://user:hunter2@proxy",
        "http://user:hunter2%zz@proxy:3128",
    ] {
        let err = builder_for(&upstream)
            .route(route_to(&upstream, "/", ""))
            .egress_proxy(url, "")
            .start()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("egress proxy URL: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    let err = builder_for(&upstream)
        .route(route_to(&upstream, "/", ""))
        .egress_proxy("http://proxy:3128", "ok.example, 10.0.0.0/8")
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"10.0.0.0/8\""), "{err}");
    // The builder's Debug shows no password either.
    let builder = Proxy::builder().egress_proxy("http://u:hunter2@p:1", "");
    assert!(!format!("{builder:?}").contains("hunter2"));
}

// --- the binary ------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_keyhole");

/// The keyhole binary, serving one route to `upstream`; killed on drop.
struct Binary {
    child: Child,
    addr: SocketAddr,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Binary {
    /// Starts keyhole with `args` after the route, and exactly `envs`.
    fn start(upstream: &Upstream, args: &[&str], envs: &[(&str, &str)]) -> Binary {
        let ca = temp_path("egress-ca.pem");
        std::fs::write(&ca, &upstream.ca_pem).unwrap();
        let route = format!("/={}", upstream.url(""));
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--route",
            &route,
            "--header",
            &format!("x-api-key={SECRET}"),
        ])
        .args(["--ca-file", ca.to_str().unwrap(), "--log-level", "trace"])
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("keyhole starts");
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let _ = std::fs::remove_file(&ca);
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.wait();
            panic!("no listening line: {}", stderr.join().unwrap());
        };
        Binary {
            addr: addr.parse().unwrap(),
            child,
            stderr: Some(stderr),
        }
    }

    /// Stops keyhole with SIGTERM and returns its stderr.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_honours_https_proxy_and_logs_neither_credentials_nor_keys() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    // base64("u:hunter2@corp")
    let want = "Basic dTpodW50ZXIyQGNvcnA=";
    let egress = EgressProxy::start(Mode::Tunnel(Some(want.to_owned()))).await;
    let url = format!("http://u:hunter2%40corp@{}/", egress.addr);
    let closed = format!("http://127.0.0.1:{}", closed_port().await);
    // Upper case wins over lower case.
    let bin = Binary::start(
        &upstream,
        &[],
        &[("HTTPS_PROXY", &url), ("https_proxy", &closed)],
    );
    let res = ask(bin.addr, &get("/x")).await;
    assert_eq!(res.status, 200, "{}", res.head);
    assert_eq!(egress.heads().len(), 1);
    let stderr = bin.stop();
    let line = format!(
        "  INFO https upstreams go through the egress proxy egress_proxy={}",
        egress.addr
    );
    assert!(stderr.lines().any(|l| l.ends_with(&line)), "{stderr}");
    for secret in ["hunter2", want, "dTpodW50ZXIy", SECRET] {
        assert!(!stderr.contains(secret), "{secret} logged: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_says_which_proxy_refused_and_why_without_credentials() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let egress = EgressProxy::start(Mode::Tunnel(Some("Basic other".to_owned()))).await;
    let url = format!("http://u:hunter2@{}", egress.addr);
    let bin = Binary::start(&upstream, &["--egress-proxy", &url], &[]);
    let res = ask(bin.addr, &get("/x")).await;
    assert_refused(&res, 502, "egress-refused");
    let stderr = bin.stop();
    let warn = format!(
        "  WARN egress proxy refused the tunnel egress_proxy={} status=407 upstream=127.0.0.1:{}",
        egress.addr,
        upstream.addr.port()
    );
    assert!(stderr.lines().any(|l| l.ends_with(&warn)), "{stderr}");
    assert!(stderr.contains(" error=egress-refused"), "{stderr}");
    assert!(
        !stderr.contains("hunter2") && !stderr.contains("dTpo"),
        "{stderr}"
    );
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_proxy_none_and_no_proxy_go_direct() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let egress = EgressProxy::start(Mode::Tunnel(None)).await;
    let url = egress.url();
    let bin = Binary::start(
        &upstream,
        &["--egress-proxy", "none"],
        &[("https_proxy", &url)],
    );
    assert_eq!(ask(bin.addr, &get("/x")).await.status, 200);
    let stderr = bin.stop();
    assert!(
        stderr.contains("  INFO ignored because of --egress-proxy none variable=https_proxy"),
        "{stderr}"
    );
    assert!(!stderr.contains("egress_proxy="), "{stderr}");
    for no_proxy in [("NO_PROXY", ".other, 127.0.0.1"), ("no_proxy", "*")] {
        let bin = Binary::start(&upstream, &[], &[("HTTPS_PROXY", &url), no_proxy]);
        assert_eq!(ask(bin.addr, &get("/x")).await.status, 200);
        bin.stop();
    }
    assert!(egress.heads().is_empty(), "{:?}", egress.heads());
    assert_eq!(upstream.connections(), 3);
}

#[test]
fn the_binary_names_where_a_bad_proxy_url_came_from_never_the_password() {
    for (args, envs, from) in [
        (
            &["--egress-proxy", "http://u:hunter2@proxy"][..],
            &[][..],
            "--egress-proxy",
        ),
        (&[][..], &[("https_proxy", "proxy:3128")][..], "https_proxy"),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--route",
            "/=https://127.0.0.1:9",
            "--header",
            "x-api-key=k",
        ])
        .args(args)
        .env_clear()
        .envs(envs.iter().copied());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("keyhole: {from}: egress proxy URL: ")),
            "{stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}
