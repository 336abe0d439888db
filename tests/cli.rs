//! The `keyhole` binary: its listening line, a request through a route, start-up
//! lines and refusals, log lines that cannot be forged, signals, and the
//! default route.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_keyhole");
/// Bound for any wait on the process.
const WAIT: Duration = Duration::from_secs(20);

/// A running keyhole process; killed on drop if still running.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts keyhole with `args` and exactly the environment `envs` (plus nothing else).
fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("keyhole starts");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    Running {
        child,
        stdout: rx,
        stderr: Some(stderr),
    }
}

impl Running {
    /// The first stdout line, which must be the listening line; returns the port.
    fn listening_port(&self) -> u16 {
        let addr = self.listening_addr();
        assert_eq!(addr.ip(), std::net::Ipv4Addr::LOCALHOST);
        addr.port()
    }

    /// The first stdout line, which must be the listening line; returns the address.
    fn listening_addr(&self) -> SocketAddr {
        let line = self
            .stdout
            .recv_timeout(WAIT)
            .expect("a listening line on stdout");
        let addr: SocketAddr = line
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        assert_ne!(addr.port(), 0);
        assert_eq!(line, format!("listening on http://{addr}"));
        addr
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the exit (bounded) and returns the status and stderr.
    fn wait(mut self) -> (ExitStatus, String, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "keyhole did not exit in time");
            thread::sleep(Duration::from_millis(20));
        };
        // The reader thread may not have passed on the last lines yet; it
        // ends (and the channel closes) once the pipe does.
        let timeout = Duration::from_secs(2);
        let stdout: Vec<String> =
            std::iter::from_fn(|| self.stdout.recv_timeout(timeout).ok()).collect();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (status, stderr, stdout)
    }
}

/// A pause before signalling, so these tests do not depend on how soon after
/// the listening line the signal handlers exist (see
/// `sigterm_right_after_listening_line_exits_0`).
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// Starts keyhole, stops it once it listens, and returns its stderr.
fn start_up_log(args: &[&str], envs: &[(&str, &str)]) -> String {
    let run = spawn(args, envs);
    run.listening_addr();
    settle();
    run.terminate();
    let (status, stderr, _) = run.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.lines().all(is_log_line), "{stderr}");
    stderr
}

/// Whether `line` is one whole log line: a timestamp, a level, then text.
fn is_log_line(line: &str) -> bool {
    let stamp = line.bytes().zip(*b"dddd-dd-ddTdd:dd:dd.ddddddZ");
    stamp
        .filter(|&(c, p)| c == p || (p == b'd' && c.is_ascii_digit()))
        .count()
        == 27
        && [" ERROR ", "  WARN ", "  INFO ", " DEBUG ", " TRACE "]
            .iter()
            .any(|level| line[27..].starts_with(level))
}

/// Runs keyhole expecting it to refuse to start.
fn refused(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String, Vec<String>) {
    let run = spawn(args, envs);
    let (status, stderr, stdout) = run.wait();
    assert!(!status.success(), "keyhole started with {args:?}");
    assert!(
        !stdout.iter().any(|l| l.starts_with("listening")),
        "{args:?} printed {stdout:?}"
    );
    (status, stderr, stdout)
}

#[tokio::test]
async fn prints_listening_line_serves_a_route_and_exits_0_on_sigterm() {
    let upstream = Upstream::start(|req| ok(&format!("upstream saw {}", req.target))).await;
    let ca_file = temp_path("ca.pem");
    std::fs::write(&ca_file, &upstream.ca_pem).unwrap();
    let route = format!("/api={}", upstream.url("/base"));
    let run = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            &route,
            "--header",
            "x-api-key=${KH_CLI_TEST_KEY}",
            "--header",
            "authorization=Bearer ${KH_CLI_TEST_KEY}-2",
            "--ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[("KH_CLI_TEST_KEY", SECRET)],
    );
    let port = run.listening_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let res = tokio::time::timeout(
        WAIT,
        request(addr, b"GET /api/v1/models?limit=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: placeholder\r\n\r\n"),
    )
    .await
    .expect("in time")
    .expect("a response");
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "upstream saw /base/v1/models?limit=2");
    let got = upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header_values("x-api-key"), vec![SECRET.to_owned()]);
    assert_eq!(
        got[0].header_values("authorization"),
        vec![format!("Bearer {SECRET}-2")]
    );
    assert_eq!(
        got[0].header_values("host"),
        vec![format!("127.0.0.1:{}", upstream.addr.port())]
    );
    let res = tokio::time::timeout(WAIT, request(addr, &get("/elsewhere")))
        .await
        .expect("in time")
        .expect("a response");
    assert_eq!(res.status, 404);

    run.terminate();
    let (status, stderr, stdout) = run.wait();
    let _ = std::fs::remove_file(&ca_file);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; stderr: {stderr}"
    );
    assert!(
        stdout.is_empty(),
        "exactly one line on stdout, then {stdout:?}"
    );
    assert!(!stderr.contains(SECRET), "the key was logged");
    // One line per request: method, path without the query, route, status,
    // bytes each way, duration.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(" status=")).collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    let line = lines[0];
    assert!(
        line.contains(" INFO request client=- route=/api method=GET path=/api/v1/models status=200 bytes_in=0 bytes_out=36 duration_ms="),
        "{line}"
    );
    assert!(!line.contains("limit=2"), "the query was logged: {line}");
    assert!(
        lines[1].contains(" INFO request client=- route=- method=GET path=/elsewhere status=404 "),
        "{}",
        lines[1]
    );
}

#[tokio::test]
async fn unset_variable_in_header_exits_non_zero_naming_it_only() {
    let other = "kh-other-value-7d1e-do-not-print";
    let (_, stderr, stdout) = refused(
        &[
            "--route",
            "/a=https://127.0.0.1:9",
            "--header",
            "x-api-key=${KH_CLI_SET_VAR}",
            "--route",
            "/b=https://127.0.0.1:9",
            "--header",
            "authorization=Bearer ${KH_CLI_SURELY_UNSET_VAR}",
        ],
        &[
            ("KH_CLI_SET_VAR", other),
            ("KH_CLI_ANOTHER", "kh-another-value-55"),
        ],
    );
    assert!(
        stderr.contains("KH_CLI_SURELY_UNSET_VAR"),
        "the message names the variable: {stderr}"
    );
    let all = format!("{stderr}{}", stdout.join("\n"));
    assert!(
        !all.contains(other) && !all.contains("kh-another-value-55"),
        "a value was printed: {all}"
    );
}

#[tokio::test]
async fn header_value_with_control_byte_exits_non_zero_naming_the_variable() {
    let (_, stderr, stdout) = refused(
        &[
            "--route",
            "/=https://127.0.0.1:9",
            "--header",
            "x-api-key=${KH_CLI_CRLF}",
        ],
        &[("KH_CLI_CRLF", "abc\r\nx-evil: 1")],
    );
    assert!(stderr.contains("KH_CLI_CRLF"), "{stderr}");
    let all = format!("{stderr}{}", stdout.join("\n"));
    assert!(!all.contains("x-evil"), "the value was printed: {all}");
}

#[tokio::test]
async fn plain_http_to_non_loopback_host_exits_non_zero() {
    for url in [
        "http://example.com",
        "http://api.anthropic.com/v1",
        "http://10.0.0.1:8080",
        "http://192.168.1.1",
    ] {
        let route = format!("/={url}");
        refused(
            &[
                "--listen",
                "127.0.0.1:0",
                "--route",
                &route,
                "--header",
                "x-api-key=k",
            ],
            &[],
        );
    }
}

#[tokio::test]
async fn plain_http_to_loopback_is_accepted() {
    let run = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            "/=http://127.0.0.1:9",
            "--header",
            "x-api-key=k",
        ],
        &[],
    );
    run.listening_port();
    settle();
    run.terminate();
    let (status, stderr, _) = run.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[tokio::test]
async fn header_before_any_route_exits_non_zero() {
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--header",
            "x-api-key=k",
            "--route",
            "/=https://127.0.0.1:9",
        ],
        &[],
    );
    refused(
        &[
            "--header",
            "x-api-key=${KH_CLI_KEY}",
            "--route",
            "/=https://127.0.0.1:9",
        ],
        &[("KH_CLI_KEY", "v"), ("ANTHROPIC_API_KEY", "sk-ant-test")],
    );
}

#[tokio::test]
async fn default_route_from_anthropic_api_key_starts_and_exits_0_on_sigterm() {
    let key = "sk-ant-test-default-route-0b7c";
    let run = spawn(&["--listen", "127.0.0.1:0"], &[("ANTHROPIC_API_KEY", key)]);
    run.listening_port();
    settle();
    run.terminate();
    let (status, stderr, stdout) = run.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stdout.is_empty());
    assert!(!stderr.contains(key));
}

#[tokio::test]

async fn sigterm_right_after_listening_line_exits_0() {
    // The listening line means ready; a supervisor may stop keyhole at once.
    // Repeated because the window is short: a few milliseconds per start.
    for attempt in 0..20 {
        let run = spawn(
            &["--listen", "127.0.0.1:0"],
            &[("ANTHROPIC_API_KEY", "sk-ant-test")],
        );
        run.listening_port();
        run.terminate();
        let (status, stderr, _) = run.wait();
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: SIGTERM right after the listening line ended keyhole by signal {:?}; stderr: {stderr}",
            std::os::unix::process::ExitStatusExt::signal(&status)
        );
    }
}

#[tokio::test]
async fn no_route_and_no_anthropic_key_exits_non_zero() {
    refused(&["--listen", "127.0.0.1:0"], &[]);
}

#[test]
fn version_prints_name_and_version_and_exits_0() {
    let run = spawn(&["--version"], &[]);
    let (status, stderr, stdout) = run.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(
        stdout,
        vec![format!("keyhole {}", env!("CARGO_PKG_VERSION"))]
    );
    assert_eq!(stderr, "");
}

#[test]
fn start_up_logs_each_route_with_its_header_names_never_values() {
    let stderr = start_up_log(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            "/api/=https://127.0.0.1:9/base",
            "--header",
            "X-Api-Key=${KH_CLI_KEY}",
            "--header",
            "authorization=Bearer ${KH_CLI_KEY}",
            "--route",
            "/other=https://localhost:9",
            "--header",
            "x-api-key=literal-value-kh-77",
            "--client-key",
            "${KH_CLI_CLIENT}",
        ],
        &[
            ("KH_CLI_KEY", SECRET),
            ("KH_CLI_CLIENT", "kh-client-value-3"),
        ],
    );
    let routes: Vec<&str> = stderr.lines().filter(|l| l.contains(" route ")).collect();
    assert_eq!(routes.len(), 2, "{stderr}");
    assert!(
        routes[0].ends_with(
            "  INFO route prefix=/api upstream=https://127.0.0.1:9/base headers=x-api-key,authorization"
        ),
        "{}",
        routes[0]
    );
    assert!(
        routes[1]
            .ends_with("  INFO route prefix=/other upstream=https://localhost:9 headers=x-api-key"),
        "{}",
        routes[1]
    );
    assert!(!stderr.contains(" WARN "), "{stderr}");
    for value in [SECRET, "literal-value-kh-77", "kh-client-value-3"] {
        assert!(!stderr.contains(value), "a value was logged: {stderr}");
    }
}

#[test]
fn route_injecting_nothing_warns() {
    let stderr = start_up_log(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            "/open=https://127.0.0.1:9",
            "--route",
            "/keyed=https://127.0.0.1:9",
            "--header",
            "x-api-key=k",
        ],
        &[],
    );
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("route injects no header")
            && warnings[0].ends_with(" prefix=/open upstream=https://127.0.0.1:9"),
        "{}",
        warnings[0]
    );
    assert!(stderr.contains("  INFO route prefix=/keyed "), "{stderr}");
}

#[test]
fn listening_on_an_unspecified_address_warns() {
    let args = [
        "--listen",
        "0.0.0.0:0",
        "--route",
        "/=https://127.0.0.1:9",
        "--header",
        "x-api-key=k",
    ];
    let stderr = start_up_log(&args, &[]);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(" listen=0.0.0.0:") && warnings[0].contains("network"),
        "{}",
        warnings[0]
    );
}

#[test]
fn empty_header_value_exits_non_zero_naming_the_header_and_variable() {
    let (_, stderr, _) = refused(
        &[
            "--route",
            "/=https://127.0.0.1:9",
            "--header",
            "x-api-key=${KH_CLI_EMPTY}",
        ],
        &[("KH_CLI_EMPTY", "")],
    );
    assert!(
        stderr.contains("x-api-key") && stderr.contains("KH_CLI_EMPTY") && stderr.contains("empty"),
        "{stderr}"
    );
    let (_, stderr, _) = refused(
        &[
            "--route",
            "/=https://127.0.0.1:9",
            "--header",
            "x-api-key=${KH_CLI_EMPTY}${KH_CLI_EMPTY2}",
        ],
        &[("KH_CLI_EMPTY", ""), ("KH_CLI_EMPTY2", "")],
    );
    assert!(stderr.contains("KH_CLI_EMPTY2"), "{stderr}");
    let (_, stderr, _) = refused(
        &["--route", "/=https://127.0.0.1:9", "--header", "x-api-key="],
        &[],
    );
    assert!(
        stderr.contains("x-api-key") && stderr.contains("empty"),
        "{stderr}"
    );
    let (_, stderr, _) = refused(&["--listen", "127.0.0.1:0"], &[("ANTHROPIC_API_KEY", "")]);
    assert!(
        stderr.contains("ANTHROPIC_API_KEY") && stderr.contains("empty"),
        "{stderr}"
    );
}

#[test]
fn empty_client_key_exits_non_zero_naming_the_option_and_variable() {
    let route = [
        "--route",
        "/=https://127.0.0.1:9",
        "--header",
        "x-api-key=k",
    ];
    let (_, stderr, _) = refused(
        &[&route[..], &["--client-key", "${KH_CLI_EMPTY}"]].concat(),
        &[("KH_CLI_EMPTY", "")],
    );
    assert!(
        stderr.contains("--client-key")
            && stderr.contains("KH_CLI_EMPTY")
            && stderr.contains("empty"),
        "{stderr}"
    );
    let (_, stderr, _) = refused(&[&route[..], &["--client-key="]].concat(), &[]);
    assert!(
        stderr.contains("--client-key") && stderr.contains("empty"),
        "{stderr}"
    );
}

#[test]
fn same_header_twice_in_a_route_exits_non_zero_naming_it() {
    let (_, stderr, stdout) = refused(
        &[
            "--route",
            "/=https://127.0.0.1:9",
            "--header",
            "x-api-key=kh-first-value-1",
            "--header",
            "X-API-Key=kh-second-value-2",
        ],
        &[],
    );
    assert!(
        stderr.to_ascii_lowercase().contains("x-api-key") && stderr.contains("twice"),
        "{stderr}"
    );
    let all = format!("{stderr}{}", stdout.join("\n"));
    assert!(
        !all.contains("kh-first-value-1") && !all.contains("kh-second-value-2"),
        "{all}"
    );
    // The same name on two routes is fine.
    start_up_log(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            "/a=https://127.0.0.1:9",
            "--header",
            "x-api-key=k",
            "--route",
            "/b=https://127.0.0.1:9",
            "--header",
            "x-api-key=k",
        ],
        &[],
    );
}

/// A CA and an upstream certificate whose only name is `name`.
fn pki_named(name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.into())
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

#[tokio::test]
async fn defect7_log_lines_cannot_be_forged_by_an_upstream_certificate_name() {
    // The TLS error names the certificate's names, as the upstream sent them.
    let forged = "kh.invalid\n1999-01-01T00:00:00.000000Z  INFO forged\r\x1b[2K\\";
    let upstream = Upstream::start_with(pki_named(forged), |_| async {}).await;
    let ca_file = temp_path("forge-ca.pem");
    std::fs::write(&ca_file, &upstream.ca_pem).unwrap();
    let route = format!("/={}", upstream.url(""));
    let run = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--route",
            &route,
            "--header",
            "x-api-key=k",
            "--ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], run.listening_port()));
    let res = tokio::time::timeout(WAIT, request(addr, &get("/v1/a\"b=c")))
        .await
        .expect("in time")
        .expect("a response");
    assert_eq!(res.status, 502);
    settle();
    run.terminate();
    let (status, stderr, _) = run.wait();
    let _ = std::fs::remove_file(&ca_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.lines().all(is_log_line), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("forged")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("  WARN upstream TLS handshake failed upstream=127.0.0.1:")
            && lines[0].contains(r#"error="invalid peer certificate: "#)
            && lines[0].contains(
                r#"DnsName(\"kh.invalid\n1999-01-01T00:00:00.000000Z  INFO forged\r\x1b[2K\\\")"#
            ),
        "{}",
        lines[0]
    );
    assert!(
        stderr.contains(
            r#"  INFO request client=- route=/ method=GET path="/v1/a\"b=c" status=502 "#
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn json_log_lines_parse_with_hostile_bytes() {
    // Hostile text from the upstream (a certificate name with CR, LF, ESC)
    // and from the client (quotes and backslashes in the path).
    let forged = "kh.invalid\n\"}{\"level\":\"ERROR\r\x1b[2K\\";
    let bad_tls = Upstream::start_with(pki_named(forged), |_| async {}).await;
    let good = Upstream::start(|_| ok("fine")).await;
    let ca_file = temp_path("json-ca.pem");
    std::fs::write(&ca_file, format!("{}{}", bad_tls.ca_pem, good.ca_pem)).unwrap();
    let (bad_route, good_route) = (
        format!("/bad={}", bad_tls.url("")),
        format!("/good={}", good.url("")),
    );
    let run = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--client",
            "sandbox-1=key-one",
            "--route",
            &bad_route,
            "--header",
            "x-api-key=k",
            "--route",
            &good_route,
            "--header",
            "x-api-key=k",
            "--ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], run.listening_port()));
    let with_key = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: key-one\r\n\r\n").into_bytes()
    };
    for (path, status) in [("/bad/v1/a\"b{c}", 502), ("/good/v1/x?k=secret", 200)] {
        let res = tokio::time::timeout(WAIT, request(addr, &with_key(path)))
            .await
            .expect("in time")
            .expect("a response");
        assert_eq!(res.status, status, "{path}");
    }
    let res = request(addr, &get("/good/v1/x")).await.unwrap();
    assert_eq!(res.status, 401);
    settle();
    run.terminate();
    let (status, stderr, _) = run.wait();
    let _ = std::fs::remove_file(&ca_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let mut requests = Vec::new();
    for line in stderr.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        for field in ["ts", "level", "msg"] {
            assert!(object[field].is_string(), "{field} in {line}");
        }
        assert_eq!(object["ts"].as_str().unwrap().len(), 27, "{line}");
        if object["msg"] == "request" {
            requests.push(object);
        }
    }
    assert!(
        !stderr.contains("secret") && !stderr.contains("key-one"),
        "{stderr}"
    );
    assert_eq!(requests.len(), 3, "{stderr}");
    let bad = &requests[0];
    assert_eq!(bad["client"], "sandbox-1");
    assert_eq!(bad["route"], "/bad");
    assert_eq!(bad["method"], "GET");
    assert_eq!(bad["path"], "/bad/v1/a\"b{c}");
    assert_eq!(bad["status"], 502);
    assert_eq!(bad["error"], "upstream-tls");
    let good = &requests[1];
    assert_eq!(good["path"], "/good/v1/x");
    assert_eq!(good["status"], 200);
    assert_eq!(good["bytes_out"], 4);
    assert!(
        good["duration_ms"].is_u64() && good["upstream_ms"].is_u64(),
        "{good}"
    );
    assert_eq!(requests[2]["status"], 401);
    assert_eq!(requests[2]["client"], "-");
    assert_eq!(requests[2]["error"], "client-key");
}

#[tokio::test]
async fn sighup_reloads_file_secrets_and_clients_and_allowlists_work_from_the_command_line() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let ca_file = temp_path("hup-ca.pem");
    std::fs::write(&ca_file, &upstream.ca_pem).unwrap();
    let key_file = temp_path("hup-key");
    std::fs::write(&key_file, "upstream-key-1\n").unwrap();
    let shared = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(&key_file, shared).unwrap();
    let route = format!("/api={}", upstream.url("/base"));
    let header = format!("x-api-key=${{file:{}}}", key_file.display());
    let run = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--client",
            "alpha=${ALPHA_KEY}",
            "--route",
            &route,
            "--header",
            &header,
            "--allow",
            "GET /base/v1/models/*",
            "--ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[("ALPHA_KEY", "alpha-secret")],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], run.listening_port()));
    let send = |path: &'static str, key: &'static str| async move {
        let bytes = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n\r\n");
        tokio::time::timeout(WAIT, request(addr, bytes.as_bytes()))
            .await
            .expect("in time")
            .expect("a response")
    };
    assert_eq!(send("/api/v1/models/x", "alpha-secret").await.status, 200);
    let refused = send("/api/v1/messages", "alpha-secret").await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.header("keyhole-error").as_deref(),
        Some("not-allowed")
    );
    assert_eq!(send("/api/v1/models", "wrong").await.status, 401);
    std::fs::write(&key_file, "upstream-key-2").unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The reload is logged once done; poll the effect instead of the log.
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(send("/api/v1/models", "alpha-secret").await.status, 200);
        let last = upstream.received().last().unwrap().header("x-api-key");
        if last.as_deref() == Some("upstream-key-2") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&key_file).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    settle();
    assert_eq!(send("/api/v1/models", "alpha-secret").await.status, 200);
    assert_eq!(
        upstream
            .received()
            .last()
            .unwrap()
            .header("x-api-key")
            .as_deref(),
        Some("upstream-key-2"),
        "a failed reload changed the key"
    );
    run.terminate();
    let (status, stderr, _) = run.wait();
    let _ = std::fs::remove_file(&ca_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("  INFO reloaded"), "{stderr}");
    assert!(
        stderr.contains("  WARN reload failed; nothing changed"),
        "{stderr}"
    );
    assert!(stderr.contains(" client=alpha "), "{stderr}");
    // Mode 0644: every user may read it.
    assert!(
        stderr.contains("  WARN secret file is readable by every user path="),
        "{stderr}"
    );
    assert!(
        !stderr.contains("upstream-key") && !stderr.contains("alpha-secret"),
        "{stderr}"
    );
}

/// Runs the binary with `--log-format json`, `extra` options and one route
/// `/` to `upstream` (trusting its CA), sends each request of `exchange`
/// expecting its status, stops it, and returns the request lines of its log.
async fn json_request_lines(
    upstream: &Upstream,
    extra: &[&str],
    exchange: &[(&[u8], u16)],
) -> Vec<serde_json::Value> {
    let ca_file = temp_path("json-lines-ca.pem");
    std::fs::write(&ca_file, &upstream.ca_pem).unwrap();
    let route = format!("/={}", upstream.url(""));
    let ca = ca_file.to_str().unwrap();
    let mut args = vec!["--log-format", "json", "--ca-file", ca];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--route", &route, "--header", "x-api-key=k"]);
    let run = spawn(&args, &[]);
    let addr = SocketAddr::from(([127, 0, 0, 1], run.listening_port()));
    for (bytes, status) in exchange {
        let res = tokio::time::timeout(WAIT, request(addr, bytes)).await;
        assert_eq!(res.expect("in time").expect("a response").status, *status);
    }
    settle();
    run.terminate();
    let (status, stderr, _) = run.wait();
    let _ = std::fs::remove_file(&ca_file);
    assert_eq!(status.code(), Some(0), "{stderr}");
    (stderr.lines())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .filter(|o: &serde_json::Value| o["msg"] == "request")
        .collect()
}

#[tokio::test]
async fn budgets_from_the_command_line_log_tokens_and_refusals() {
    let body = r#"{"type":"message","usage":{"input_tokens":70,"output_tokens":40}}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let upstream = Upstream::start(move |_| Reply::Bytes(answer.clone().into_bytes())).await;
    let post: &[u8] = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nx-api-key: key-one\r\ncontent-length: 2\r\n\r\n{}";
    let budgets = [
        "--client",
        "box-1=key-one",
        "--max-tokens-per-hour",
        "100",
        "--max-concurrent",
        "4",
        "--max-requests-per-minute",
        "60",
    ];
    let requests = json_request_lines(&upstream, &budgets, &[(post, 200), (post, 429)]).await;
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0]["client"], "box-1");
    assert_eq!(requests[0]["tokens_in"], 70);
    assert_eq!(requests[0]["tokens_out"], 40);
    assert_eq!(requests[1]["status"], 429);
    assert_eq!(requests[1]["error"], "tokens");
    assert!(requests[1].get("tokens_in").is_none(), "{}", requests[1]);
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn json_log_carries_the_upstream_request_id_escaped() {
    // An upstream request id with quotes and backslashes (visible ASCII,
    // kept) and a space (not visible, dropped).
    let reply = "HTTP/1.1 200 OK\r\nrequest-id: req_\"x\\y\" z\r\ncontent-length: 2\r\n\r\nok";
    let upstream = Upstream::start(move |_| Reply::Bytes(reply.as_bytes().to_vec())).await;
    let requests = json_request_lines(&upstream, &[], &[(&get("/v1/x"), 200)]).await;
    let line = requests.first().expect("a request line");
    assert_eq!(line["upstream_request_id"], "req_\"x\\y\"z", "{line}");
    assert!(line["upstream_ms"].is_u64(), "{line}");
}
