//! The keyhole command: argument parsing, logging set-up, signals, the
//! start-up lines and the `listening on` line; everything else is the library.

// The binary writes its own contract lines (`listening on`, usage, errors).
#![allow(clippy::disallowed_macros)]

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::{Builder, ClientLimits, Limits, Proxy, Route, Secret};
use tokio::signal::unix::{signal, SignalKind};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span;

mod json;

const USAGE: &str = "usage: keyhole [--listen ADDR] [--ca-file PEM]... [--client-key VALUE]
               [--client NAME=VALUE]... [--clients-file PATH] [--require-client-key]
               [--log-format text|json] [--egress-proxy http://[USER:PASS@]HOST:PORT|none]
               [--allow-host NAME]... [--upstream-timeout SECS] [--idle-timeout SECS]
               [--head-timeout SECS] [--drain-timeout SECS] [--connect-timeout SECS]
               [--max-connections N] [--max-body-bytes N] [--max-head-bytes N]
               [--max-headers N] [--threads N] [--log-level LEVEL]
               [--max-concurrent N] [--max-requests-per-minute N] [--max-tokens-per-hour N]
               (--route PREFIX=URL [--header NAME=VALUE]... [--allow 'METHOD PATTERN']...)...
       keyhole --version
`${VAR}` in a header value or client key is read from the environment,
`${file:PATH}` from a file (read again on SIGHUP).
With no --route and ANTHROPIC_API_KEY set:
  --route /=https://api.anthropic.com --header 'x-api-key=${ANTHROPIC_API_KEY}'";

/// Parsed command line: the builder with what it takes as given, and what
/// `run` completes it with.
struct Cli {
    builder: Builder,
    routes: Vec<Route>,
    ca_files: Vec<String>,
    /// `--egress-proxy`: a URL or `none`.
    egress_proxy: Option<String>,
    limits: Limits,
    budgets: ClientLimits,
    threads: Option<usize>,
    log_level: tracing::Level,
    log_json: bool,
}

/// `--route PREFIX=URL`.
fn route(arg: &str) -> Result<Route, String> {
    let (prefix, url) =
        (arg.split_once('=')).ok_or_else(|| format!("--route {arg}: expected PREFIX=URL"))?;
    Route::new(prefix, url).map_err(|e| e.to_string())
}

/// `--header NAME=VALUE` on `route` (a NAME given twice is refused at start).
fn header(route: Route, arg: &str) -> Result<Route, String> {
    let (name, template) = arg.split_once('=').ok_or("--header: expected NAME=VALUE")?;
    Ok(route.header(name, secret(&format!("--header {name}"), template)?))
}

/// `--allow 'METHOD PATTERN'` on `route`.
fn allow(route: Route, arg: &str) -> Result<Route, String> {
    let (method, pattern) = (arg.split_once(' '))
        .ok_or_else(|| format!("--allow {arg:?}: expected 'METHOD PATTERN'"))?;
    Ok(route.allow(method, pattern.trim_start()))
}

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cli)) => cli,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => return fail(message, 2),
    };
    let log = LogLines::new(Box::new(std::io::stderr()), cli.log_level, cli.log_json);
    if tracing::subscriber::set_global_default(log.clone()).is_err() {
        return fail("cannot set up logging", 1);
    }
    // On one core (as when pinned with taskset) a single-threaded runtime
    // avoids the work-stealing scheduler's cross-thread bookkeeping.
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let mut runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Ignored by the current-thread runtime; zero would panic.
    let runtime = match runtime.worker_threads(threads.max(1)).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(format!("cannot start the runtime: {err}"), 1),
    };
    let code = runtime.block_on(run(cli));
    log.flush_now();
    code
}

/// Says why keyhole stops, and stops it with `code`.
fn fail(why: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("keyhole: {why}");
    ExitCode::from(code)
}

/// Writes each event as one line, `2026-11-25T16:03:28.245123Z  INFO
/// message key=value ...`, to the batched stderr. keyhole has no spans, so a
/// subscriber is this small; tracing-subscriber's formatter and registry
/// (per-character escaping, a generic visitor, span bookkeeping) cost more
/// than the rest of a small proxied request. Every value is escaped
/// (`write_field`): messages carry request paths, and `%` fields carry
/// upstream-derived text such as the names in a TLS certificate.
#[derive(Clone)]
struct LogLines {
    max_level: tracing::Level,
    /// Shared with the thread that flushes it every `LOG_FLUSH`.
    sink: Arc<Mutex<Sink>>,
}

/// How often batched log lines reach stderr. One `write` per request line
/// was one of the seven system calls keyhole made per proxied request.
const LOG_FLUSH: Duration = Duration::from_millis(100);

/// What the log's lock guards: the buffered lines, the line being built,
/// and a value formatted for escaping.
struct Sink {
    out: BufWriter<Box<dyn Write + Send>>,
    line: Vec<u8>,
    scratch: String,
    /// `--log-format json`: one JSON object per line instead.
    json: bool,
    /// The second the last timestamp was worked out for, and its text.
    stamp: (u64, [u8; 27]),
}

impl LogLines {
    /// Lines to `out` (stderr, or in tests another writer) behind a buffer
    /// that a background thread, started here, flushes every `LOG_FLUSH`.
    fn new(out: Box<dyn Write + Send>, max_level: tracing::Level, json: bool) -> LogLines {
        let sink = Sink {
            out: BufWriter::with_capacity(64 * 1024, out),
            line: Vec::new(),
            scratch: String::new(),
            json,
            stamp: (u64::MAX, [0; 27]),
        };
        let sink = Arc::new(Mutex::new(sink));
        let log = LogLines { max_level, sink };
        let flusher = log.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(LOG_FLUSH);
            flusher.flush_now();
        });
        log
    }

    /// Writes the buffered lines out now: from the flusher, and at exit.
    fn flush_now(&self) {
        if let Ok(mut sink) = self.sink.lock() {
            let _ = sink.out.flush();
        }
    }
}

impl tracing::Subscriber for LogLines {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max_level))
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let Ok(mut sink) = self.sink.lock() else {
            return;
        };
        let sink = &mut *sink;
        let level = event.metadata().level().as_str();
        let line = &mut sink.line;
        line.clear();
        if sink.json {
            line.extend_from_slice(b"{\"ts\":\"");
            line.extend_from_slice(&timestamp(&mut sink.stamp));
            line.extend_from_slice(b"\",\"level\":\"");
            line.extend_from_slice(level.as_bytes());
            line.push(b'"');
        } else {
            line.extend_from_slice(&timestamp(&mut sink.stamp));
            // Right-aligned in six columns: ` ERROR`, `  INFO`.
            line.extend_from_slice(&b"  "[..6 - level.len()]);
            line.extend_from_slice(level.as_bytes());
        }
        event.record(sink);
        sink.line
            .extend_from_slice(if sink.json { b"}\n" } else { b"\n" });
        let _ = sink.out.write_all(&sink.line);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The current UTC time as `2026-11-25T16:03:28.245123Z`, written with
/// fixed-width digits (`write!` padding was most of a log line's cost); the
/// date and time of day are worked out again only when the second changes.
fn timestamp(last: &mut (u64, [u8; 27])) -> [u8; 27] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let digits = |stamp: &mut [u8; 27], range: std::ops::Range<usize>, mut value: u64| {
        for digit in stamp[range].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    if last.0 != secs {
        let (year, month, day) = civil_from_days(secs / 86_400);
        last.1 = *b"0000-00-00T00:00:00.000000Z";
        for (range, value) in [
            (0..4, year),
            (5..7, month),
            (8..10, day),
            (11..13, secs / 3600 % 24),
            (14..16, secs / 60 % 60),
            (17..19, secs % 60),
        ] {
            digits(&mut last.1, range, value);
        }
        last.0 = secs;
    }
    let mut stamp = last.1;
    digits(&mut stamp, 20..26, u64::from(now.subsec_micros()));
    stamp
}

impl Sink {
    /// Starts a JSON member, `,"name":`.
    fn json_name(&mut self, field: &Field) {
        let name = field.name();
        let name = if name == "message" { "msg" } else { name };
        self.line.extend_from_slice(b",\"");
        self.line.extend_from_slice(name.as_bytes());
        self.line.extend_from_slice(b"\":");
    }

    /// Starts a number or boolean: `,"name":` or ` name=`.
    fn name_plain(&mut self, field: &Field) {
        if self.json {
            self.json_name(field);
        } else {
            self.line.push(b' ');
            self.line.extend_from_slice(field.name().as_bytes());
            self.line.push(b'=');
        }
    }

    /// A number or boolean, as it prints: never escaped or quoted.
    fn plain(&mut self, field: &Field, value: impl std::fmt::Display) {
        self.name_plain(field);
        let _ = write!(self.line, "{value}");
    }
}

/// Writes an event's fields to `line`: as ` key=value` (`write_field`),
/// or with `json` as JSON members (`message` as `msg`), numbers and
/// booleans as JSON numbers and literals, everything else as strings.
impl Visit for Sink {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.json {
            self.json_name(field);
            json::write_string(&mut self.line, value);
        } else {
            write_field(&mut self.line, field.name(), value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        // Every request's line has several: digits by hand, not `write!`.
        self.name_plain(field);
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = value;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.line.extend_from_slice(&digits[at..]);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.plain(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.plain(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.shrink_to(1024); // a rare long value does not keep its allocation
        let _ = write!(scratch, "{value:?}");
        self.record_str(field, &scratch);
        self.scratch = scratch;
    }
}

/// Writes ` message`, or ` name=value` for any other field, escaped so that
/// an event stays one line and a value cannot pass for more fields: control
/// bytes and `\` as `\n`, `\r`, `\t`, `\\` or `\xHH`, and a field value that
/// is empty or holds a space, `=` or `"` in double quotes, `"` as `\"`.
fn write_field(out: &mut Vec<u8>, name: &str, value: &str) {
    let message = name == "message";
    let quote =
        !message && (value.is_empty() || value.bytes().any(|b| matches!(b, b' ' | b'=' | b'"')));
    out.push(b' ');
    if !message {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(if quote { b"=\"" } else { b"=" });
    }
    json::escape(out, value, quote, b"x");
    if quote {
        out.push(b'"');
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

async fn run(cli: Cli) -> ExitCode {
    let mut builder = cli.builder.limits(cli.limits).client_limits(cli.budgets);
    for route in cli.routes {
        builder = builder.route(route);
    }
    for path in &cli.ca_files {
        match std::fs::read(path) {
            Ok(pem) => builder = builder.ca_pem(pem),
            Err(err) => return fail(format!("cannot read CA file {path}: {err}"), 1),
        }
    }
    // The library reads no environment; the binary honours HTTPS_PROXY.
    let egress = match (cli.egress_proxy, env_var("HTTPS_PROXY", "https_proxy")) {
        (Some(url), Some((name, _))) if url == "none" => {
            tracing::info!(variable = name, "ignored because of --egress-proxy none");
            None
        }
        (Some(url), _) => Some(("--egress-proxy", url)).filter(|(_, url)| url != "none"),
        (None, from_env) => from_env,
    };
    if let Some((_, url)) = &egress {
        let no_proxy = env_var("NO_PROXY", "no_proxy").map(|(_, list)| list);
        builder = builder.egress_proxy(url, &no_proxy.unwrap_or_default());
    }
    let proxy = match builder.start().await {
        Ok(proxy) => proxy,
        Err(err @ keyhole::Error::BadEgressProxy(_)) => {
            return fail(format!("{}: {err}", egress.map_or("", |(from, _)| from)), 1)
        }
        Err(err) => return fail(err, 1),
    };
    // Installed before the `listening on` line, so that a signal sent as soon
    // as the line appears is never fatal.
    let signals = signal(SignalKind::terminate()).and_then(|t| {
        let int = signal(SignalKind::interrupt())?;
        Ok((t, int, signal(SignalKind::hangup())?))
    });
    let (mut term, mut int, mut hup) = match signals {
        Ok(signals) => signals,
        Err(err) => return fail(format!("cannot install signal handlers: {err}"), 1),
    };
    let listen = proxy.local_addr();
    if listen.ip().is_unspecified() {
        tracing::warn!(%listen, "listening on every network interface: anyone there can use the keys");
    }
    // stdout is line-buffered: the line is flushed at its newline.
    let _ = writeln!(std::io::stdout(), "listening on http://{listen}");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // All or nothing: a failed reload changes nothing.
                if let Err(err) = proxy.reload() {
                    tracing::warn!(error = %err, "reload failed; nothing changed");
                }
            }
        }
    }
    tracing::info!("shutting down");
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        builder: Proxy::builder(),
        routes: Vec::new(),
        ca_files: Vec::new(),
        egress_proxy: None,
        limits: Limits::default(),
        budgets: ClientLimits::default(),
        threads: None,
        log_level: tracing::Level::INFO,
        log_json: false,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            (inline.map(str::to_owned).or_else(|| args.next()))
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--help" | "-h" | "--version" => {
                let version = format!("keyhole {}", env!("CARGO_PKG_VERSION"));
                println!("{}", if flag == "--version" { &version } else { USAGE });
                return Ok(None);
            }
            "--listen" => {
                let addr = parsed(flag, &value()?, "an IP:PORT address")?;
                cli.builder = cli.builder.listen(addr);
            }
            "--route" => cli.routes.push(route(&value()?)?),
            "--header" => {
                let route = cli.routes.pop().ok_or("--header must follow a --route")?;
                cli.routes.push(header(route, &value()?)?);
            }
            "--allow" => {
                let route = cli.routes.pop().ok_or("--allow must follow a --route")?;
                cli.routes.push(allow(route, &value()?)?);
            }
            "--client-key" => cli.builder = cli.builder.client_key(secret(flag, &value()?)?),
            "--client" => {
                let arg = value()?;
                let (name, template) =
                    arg.split_once('=').ok_or("--client: expected NAME=VALUE")?;
                let key = secret(&format!("--client {name}"), template)?;
                cli.builder = cli.builder.client(name, key);
            }
            "--require-client-key" => cli.builder = cli.builder.require_client_key(),
            "--clients-file" => cli.builder = cli.builder.clients_file(&value()?),
            "--log-format" => {
                cli.log_json = match value()?.as_str() {
                    "text" => false,
                    "json" => true,
                    other => return Err(format!("--log-format {other}: expected text or json")),
                };
            }
            "--allow-host" => cli.builder = cli.builder.allow_host(&value()?),
            "--ca-file" => cli.ca_files.push(value()?),
            "--egress-proxy" => cli.egress_proxy = Some(value()?),
            limit if limit.starts_with("--max-") || limit.ends_with("-timeout") => {
                set_limit(&mut cli, limit, &value()?)?;
            }
            "--threads" => cli.threads = Some(number(flag, &value()?)?),
            "--log-level" => {
                cli.log_level = parsed(flag, &value()?, "error, warn, info, debug or trace")?;
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    if cli.routes.is_empty() {
        if std::env::var_os("ANTHROPIC_API_KEY").is_none() {
            return Err(format!(
                "no route given and ANTHROPIC_API_KEY is not set\n{USAGE}"
            ));
        }
        let default = route("/=https://api.anthropic.com")?;
        cli.routes
            .push(header(default, "x-api-key=${ANTHROPIC_API_KEY}")?);
    }
    Ok(Some(cli))
}

/// Sets the limit or budget `flag` names (`--max-…`, `--…-timeout`).
fn set_limit(cli: &mut Cli, flag: &str, value: &str) -> Result<(), String> {
    let (limits, budgets) = (&mut cli.limits, &mut cli.budgets);
    match flag {
        "--upstream-timeout" => limits.upstream_timeout = seconds(flag, value)?,
        "--idle-timeout" => limits.idle_timeout = seconds(flag, value)?,
        "--head-timeout" => limits.head_timeout = seconds(flag, value)?,
        "--drain-timeout" => limits.drain_timeout = seconds(flag, value)?,
        "--connect-timeout" => {
            limits.connect_timeout = seconds(flag, value)?;
            limits.tls_timeout = limits.connect_timeout;
        }
        "--max-connections" => limits.max_connections = number(flag, value)?,
        "--max-body-bytes" => limits.max_body_bytes = Some(number(flag, value)?),
        "--max-head-bytes" => limits.max_head_bytes = number(flag, value)?,
        "--max-headers" => limits.max_headers = number(flag, value)?,
        "--max-concurrent" => budgets.max_concurrent = Some(number(flag, value)?),
        "--max-requests-per-minute" => budgets.max_requests_per_minute = Some(number(flag, value)?),
        "--max-tokens-per-hour" => budgets.max_tokens_per_hour = Some(number(flag, value)?),
        _ => return Err(format!("unknown argument {flag:?}\n{USAGE}")),
    }
    Ok(())
}

/// Expands `template` for `what` (`--header NAME`, `--client NAME` or
/// `--client-key`) and refuses an empty result, naming the template (made
/// of variable and file names only, never a value).
fn secret(what: &str, template: &str) -> Result<Secret, String> {
    let secret = Secret::from_template(template).map_err(|e| format!("{what}: {e}"))?;
    if secret.expose_secret().is_empty() {
        return Err(format!("{what}: value {template:?} is empty"));
    }
    Ok(secret)
}

/// The variable `upper`, else `lower`, with its name; empty counts as unset.
fn env_var(upper: &'static str, lower: &'static str) -> Option<(&'static str, String)> {
    let set = |name| Some((name, std::env::var(name).ok().filter(|v| !v.is_empty())?));
    set(upper).or_else(|| set(lower))
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{flag} {value}: expected a positive number of seconds"))
}

fn parsed<T: std::str::FromStr>(flag: &str, value: &str, expected: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} {value}: expected {expected}"))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{flag} {value}: expected a number"));
    }
    parsed(flag, value, "a number in range")
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, write_field, LogLines};
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    fn field(name: &str, value: &str) -> String {
        let mut out = Vec::new();
        write_field(&mut out, name, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escaping_keeps_every_value_on_its_line() {
        // A message is text: escaped, never quoted.
        assert_eq!(
            field("message", r#"GET /a"b=c route=/"#),
            r#" GET /a"b=c route=/"#
        );
        assert_eq!(
            field("message", "a\r\n\t\\\0\x1b[2K\x7f\u{e9}"),
            " a\\r\\n\\t\\\\\\x00\\x1b[2K\\x7f\u{e9}"
        );
        assert_eq!(
            field("upstream", "127.0.0.1:443"),
            " upstream=127.0.0.1:443"
        );
        assert_eq!(field("error", "x\ny"), r" error=x\ny");
        // Quoted when it could pass for more fields or for none.
        assert_eq!(field("error", ""), r#" error="""#);
        assert_eq!(field("error", "a b"), r#" error="a b""#);
        assert_eq!(field("error", "k=v"), r#" error="k=v""#);
        assert_eq!(
            field("error", "say \"hi\" \\ \n"),
            r#" error="say \"hi\" \\ \n""#
        );
        for byte in (0u8..0x20).chain([0x7f]) {
            let value = format!("a{}b", char::from(byte));
            let line = field("error", &value) + &field("message", &value);
            assert!(line.bytes().all(|b| b >= 0x20 && b != 0x7f), "{line:?}");
        }
    }

    /// A writer tests can read back.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl Write for Written {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_display_field_cannot_forge_a_log_line() {
        let written = Written::default();
        let log = LogLines::new(Box::new(written.clone()), tracing::Level::INFO, false);
        tracing::subscriber::with_default(log.clone(), || {
            let err = "a\nINFO forged";
            tracing::warn!(error = %err, "upstream failed");
            tracing::warn!(error = ?err, "the same, as Debug");
            tracing::info!(message = "GET /x\r\n2026-01-01T00:00:00.000000Z  INFO forged");
            tracing::info!(path = "/a b", n = 3, ok = true, "{}", "x\\y");
            tracing::debug!("below the level");
        });
        log.flush_now();
        let text = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().map(|line| &line[27..]).collect();
        assert_eq!(
            lines,
            [
                r#"  WARN upstream failed error="a\nINFO forged""#,
                r#"  WARN the same, as Debug error="\"a\\nINFO forged\"""#,
                r"  INFO GET /x\r\n2026-01-01T00:00:00.000000Z  INFO forged",
                r#"  INFO x\\y path="/a b" n=3 ok=true"#,
            ],
            "{text}"
        );
    }

    #[test]
    fn dates_for_log_timestamps() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
    }
}
