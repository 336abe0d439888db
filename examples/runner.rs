//! A sandbox runner embedding keyhole: one key per sandbox, revoked when the
//! runner decides, and each sandbox's requests read back from keyhole's
//! structured log events.
//!
//! The "sandboxes" here are child processes running the official `anthropic`
//! Python SDK, and the upstream is the fake Messages API of keyhole's
//! end-to-end tests (`tests/e2e/fake_anthropic.py`) on a throwaway
//! certificate, so the example needs no network and no real key:
//!
//! ```text
//! python3 -m venv /tmp/venv && /tmp/venv/bin/pip install anthropic
//! KEYHOLE_PYTHON=/tmp/venv/bin/python cargo run --example runner
//! ```
//!
//! What it does: starts keyhole on a free loopback port with client keys
//! required and a tight allowlist; gives each of two sandboxes its own key
//! (`add_client`) as `ANTHROPIC_API_KEY` and keyhole's address as
//! `ANTHROPIC_BASE_URL`; revokes sandbox `a` (`remove_client`) after its
//! second answer while `b` keeps streaming; prints what each client did,
//! taken from the `keyhole::request` events; shuts keyhole down. It exits
//! non-zero if anything did not happen as described.

// An example talks to its terminal; the library itself never prints.
#![allow(clippy::disallowed_macros)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use keyhole::{Proxy, Route, Secret};
use tracing::field::{Field, Visit};

/// What each sandbox runs: a few requests with the SDK, one line per answer.
/// Sandbox `b` streams, so its answers arrive event by event.
const SANDBOX: &str = r#"
import os, sys, time, anthropic
client = anthropic.Anthropic(max_retries=0)
for i in range(int(sys.argv[1])):
    try:
        if os.environ["SANDBOX"] == "b":
            with client.messages.stream(model="claude-x", max_tokens=64,
                    messages=[{"role": "user", "content": "hi"}]) as stream:
                text = "".join(stream.text_stream)
        else:
            text = client.messages.create(model="claude-x", max_tokens=64,
                    messages=[{"role": "user", "content": "hi"}]).content[0].text
        print("ok", i + 1, text[:20], flush=True)
    except anthropic.APIStatusError as err:
        print("refused", err.status_code, err.response.headers.get("keyhole-error"), flush=True)
        sys.exit(3)
    time.sleep(0.2)
"#;

/// One `keyhole::request` event, as the runner keeps it.
#[derive(Debug, Default)]
struct Request {
    client: String,
    method: String,
    path: String,
    status: u64,
    error: String,
    upstream_request_id: String,
}

impl Visit for Request {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "client" => &mut self.client,
            "method" => &mut self.method,
            "path" => &mut self.path,
            "error" => &mut self.error,
            "upstream_request_id" => &mut self.upstream_request_id,
            _ => return,
        };
        value.clone_into(slot);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "status" {
            self.status = value;
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

/// A subscriber that keeps keyhole's request events and drops the rest: the
/// runner's own audit trail, receiving the fields structured.
#[derive(Clone, Default)]
struct Audit(Arc<Mutex<Vec<Request>>>);

impl tracing::Subscriber for Audit {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "keyhole::request"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut request = Request::default();
        event.record(&mut request);
        self.0.lock().unwrap().push(request);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let audit = Audit::default();
    tracing::subscriber::set_global_default(audit.clone())?;
    let python = std::env::var("KEYHOLE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let dir = std::env::temp_dir().join(format!("keyhole-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (ca_pem, cert, key) = throwaway_certificates()?;
    std::fs::write(dir.join("server.pem"), cert)?;
    std::fs::write(dir.join("server.key"), key)?;

    // The upstream: the fake Messages API, holding the real key.
    let real_key = "sk-ant-example-real-key";
    let fake = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/fake_anthropic.py"
        ))
        .args(["--cert", &dir.join("server.pem").to_string_lossy()])
        .args(["--keyfile", &dir.join("server.key").to_string_lossy()])
        .args(["--key", real_key, "--delay", "0.05"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut fake = Reaped(fake);
    let mut port = String::new();
    BufReader::new(fake.0.stdout.take().ok_or("no stdout")?).read_line(&mut port)?;
    let upstream = format!("https://127.0.0.1:{}", port.trim());

    let runtime = tokio::runtime::Runtime::new()?;
    let proxy = runtime.block_on(
        Proxy::builder()
            .listen("127.0.0.1:0".parse()?)
            .require_client_key()
            .ca_pem(ca_pem)
            .route(
                Route::new("/", &upstream)?
                    .header("x-api-key", Secret::new(real_key))
                    .allow("POST", "/v1/messages")
                    .allow("POST", "/v1/messages/count_tokens")
                    .allow("GET", "/v1/models/*"),
            )
            .start(),
    )?;
    let base_url = format!("http://{}", proxy.local_addr());
    println!("keyhole on {base_url}, upstream {upstream}");

    // One key per sandbox, handed over in its environment.
    let mut sandboxes = BTreeMap::new();
    for (name, requests) in [("a", "10"), ("b", "8")] {
        let key = proxy.add_client(name)?;
        let child = Command::new(&python)
            .args(["-c", SANDBOX, requests])
            .env("SANDBOX", name)
            .env("ANTHROPIC_API_KEY", key.expose_secret())
            .env("ANTHROPIC_BASE_URL", &base_url)
            .stdout(Stdio::piped())
            .spawn()?;
        sandboxes.insert(name, Reaped(child));
    }

    // Sandbox a is cut off after its second answer; b must not notice.
    let mut lines_a = BufReader::new(sandboxes.get_mut("a").unwrap().0.stdout.take().unwrap());
    let mut said_a = Vec::new();
    let mut line = String::new();
    while lines_a.read_line(&mut line)? > 0 {
        print!("sandbox a: {line}");
        said_a.push(std::mem::take(&mut line));
        if said_a.len() == 2 {
            assert!(proxy.remove_client("a"), "a was registered");
            println!("runner: revoked sandbox a");
        }
    }
    let lines_b = BufReader::new(sandboxes.get_mut("b").unwrap().0.stdout.take().unwrap());
    let said_b: Vec<String> = lines_b.lines().collect::<Result<_, _>>()?;
    for line in &said_b {
        println!("sandbox b: {line}");
    }
    let status_a = sandboxes.get_mut("a").unwrap().0.wait()?;
    let status_b = sandboxes.get_mut("b").unwrap().0.wait()?;
    runtime.block_on(proxy.shutdown());

    // The audit trail, per client, from keyhole's own events.
    let requests = audit.0.lock().unwrap();
    let mut out = std::io::stdout().lock();
    // A refused key names no client: `-`.
    for name in ["a", "b", "-"] {
        writeln!(out, "client {name}:")?;
        for r in requests.iter().filter(|r| r.client == name) {
            writeln!(
                out,
                "  {} {} -> {} {} {}",
                r.method, r.path, r.status, r.error, r.upstream_request_id
            )?;
        }
    }
    let answered = |name: &str, status: u64| {
        (requests.iter())
            .filter(|r| r.client == name && r.status == status)
            .count()
    };
    // After the revocation, a's next request is refused as an unknown key.
    let refused_a = requests
        .iter()
        .filter(|r| r.status == 401 && r.error == "client-key")
        .count();
    let checks = [
        (status_a.code() == Some(3), "sandbox a ends refused"),
        (
            said_a
                .last()
                .is_some_and(|l| l.starts_with("refused 401 client-key")),
            "a sees 401 client-key",
        ),
        (
            answered("a", 200) == 2,
            "a got two answers before the revocation",
        ),
        (
            refused_a == 1,
            "exactly one request refused after the revocation",
        ),
        (status_b.success(), "sandbox b finishes"),
        (
            said_b.len() == 8 && answered("b", 200) == 8,
            "b got all eight streams",
        ),
    ];
    let mut failed = false;
    for (ok, what) in checks {
        println!("{} {what}", if ok { "PASS" } else { "FAIL" });
        failed |= !ok;
    }
    std::fs::remove_dir_all(&dir)?;
    if failed {
        return Err("the runner example did not behave as described".into());
    }
    Ok(())
}

/// A child process that is killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throwaway CA (PEM, for keyhole to trust) and a server certificate and
/// key (PEM) for 127.0.0.1 signed by it.
fn throwaway_certificates() -> Result<(String, String, String), rcgen::Error> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}
