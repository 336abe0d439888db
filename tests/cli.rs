//! The `keyhole` binary: its listening line, a request through a route, start-up
//! refusals, signals, and the default route.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
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
        let line = self
            .stdout
            .recv_timeout(WAIT)
            .expect("a listening line on stdout");
        let port = line
            .strip_prefix("listening on http://127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse::<u16>()
            .unwrap_or_else(|_| panic!("unexpected first line {line:?}"));
        assert_ne!(port, 0);
        assert_eq!(line, format!("listening on http://127.0.0.1:{port}"));
        port
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
        let stdout: Vec<String> = self.stdout.try_iter().collect();
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
        line.contains(" INFO GET /api/v1/models route=/api status=200 in=0 out=36 ms="),
        "{line}"
    );
    assert!(!line.contains("limit=2"), "the query was logged: {line}");
    assert!(
        lines[1].contains(" INFO GET /elsewhere route=- status=404 "),
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
