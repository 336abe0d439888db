//! The keyhole command: argument parsing, logging set-up, signals, and the
//! `listening on` line; everything else is the library.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole::{Limits, Proxy, Route, Secret};
use tracing::field::{Field, Visit};
use tracing::span;

const USAGE: &str = "usage: keyhole [--listen ADDR] [--ca-file PEM]... [--client-key VALUE]
               [--allow-host NAME]... [--upstream-timeout SECS] [--idle-timeout SECS]
               [--head-timeout SECS] [--drain-timeout SECS] [--connect-timeout SECS]
               [--max-connections N] [--max-body-bytes N] [--max-head-bytes N]
               [--max-headers N] [--threads N] [--log-level LEVEL]
               (--route PREFIX=URL [--header NAME=VALUE]...)...
`${VAR}` in a header value or client key is read from the environment.
With no --route and ANTHROPIC_API_KEY set:
  --route /=https://api.anthropic.com --header 'x-api-key=${ANTHROPIC_API_KEY}'";

/// Parsed command line.
struct Cli {
    listen: SocketAddr,
    routes: Vec<Route>,
    client_key: Option<Secret>,
    allow_hosts: Vec<String>,
    ca_files: Vec<String>,
    limits: Limits,
    threads: Option<usize>,
    log_level: tracing::Level,
}

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("keyhole: {message}");
            return ExitCode::from(2);
        }
    };
    let log = BatchedStderr(Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    ))));
    log.flush_periodically();
    let subscriber = LogLines {
        max_level: cli.log_level,
        out: log.clone(),
    };
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("keyhole: cannot set up logging");
        return ExitCode::FAILURE;
    }
    // On one core (as when pinned with taskset) a single-threaded runtime
    // avoids the work-stealing scheduler's cross-thread bookkeeping.
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let mut runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(threads);
        runtime
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("keyhole: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    log.flush_now();
    code
}

/// Writes each event as one line, `2026-11-25T16:03:28.245123Z  INFO
/// message key=value ...`, to the batched stderr. keyhole has no spans, so a
/// subscriber is this small; tracing-subscriber's formatter and registry
/// (per-character escaping, a generic visitor, span bookkeeping) cost more
/// than the rest of a small proxied request. keyhole's messages carry only
/// validated request bytes and fixed texts; other values are written with
/// `Debug`, which escapes.
struct LogLines {
    max_level: tracing::Level,
    out: BatchedStderr,
}

impl tracing::Subscriber for LogLines {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::from_level(
            self.max_level,
        ))
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let Ok(mut out) = self.out.0.lock() else {
            return;
        };
        let out = &mut *out;
        let _ = out.write_all(&timestamp());
        let _ = out.write_all(match *event.metadata().level() {
            tracing::Level::ERROR => b" ERROR",
            tracing::Level::WARN => b"  WARN",
            tracing::Level::INFO => b"  INFO",
            tracing::Level::DEBUG => b" DEBUG",
            tracing::Level::TRACE => b" TRACE",
        });
        event.record(&mut Fields(out));
        let _ = out.write_all(b"\n");
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The current UTC time as `2026-11-25T16:03:28.245123Z`, written with
/// fixed-width digits (`write!` padding was most of a log line's cost).
fn timestamp() -> [u8; 27] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let mut stamp = *b"0000-00-00T00:00:00.000000Z";
    for (range, value) in [
        (0..4, year),
        (5..7, month),
        (8..10, day),
        (11..13, secs / 3600 % 24),
        (14..16, secs / 60 % 60),
        (17..19, secs % 60),
        (20..26, u64::from(now.subsec_micros())),
    ] {
        let mut value = value;
        for digit in stamp[range].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    stamp
}

/// Writes an event's fields: the message as is, the others as `name=value`.
struct Fields<'a>(&'a mut BufWriter<std::io::Stderr>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = self.0.write_all(b" ");
            let _ = self.0.write_all(value.as_bytes());
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = if field.name() == "message" {
            write!(self.0, " {value:?}")
        } else {
            write!(self.0, " {}={value:?}", field.name())
        };
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

/// How often batched log lines reach stderr. One `write` per request line
/// was one of the seven system calls keyhole made per proxied request.
const LOG_FLUSH: Duration = Duration::from_millis(100);

/// stderr behind a buffer that a background thread flushes every `LOG_FLUSH`.
#[derive(Clone)]
struct BatchedStderr(Arc<Mutex<BufWriter<std::io::Stderr>>>);

impl BatchedStderr {
    fn flush_now(&self) {
        if let Ok(mut log) = self.0.lock() {
            let _ = log.flush();
        }
    }

    fn flush_periodically(&self) {
        let log = self.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(LOG_FLUSH);
            log.flush_now();
        });
    }
}

async fn run(cli: Cli) -> ExitCode {
    let mut builder = Proxy::builder().listen(cli.listen).limits(cli.limits);
    for route in cli.routes {
        builder = builder.route(route);
    }
    if let Some(key) = cli.client_key {
        builder = builder.client_key(key);
    }
    for host in &cli.allow_hosts {
        builder = builder.allow_host(host);
    }
    for path in &cli.ca_files {
        match std::fs::read(path) {
            Ok(pem) => builder = builder.ca_pem(pem),
            Err(err) => {
                eprintln!("keyhole: cannot read CA file {path}: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    let proxy = match builder.start().await {
        Ok(proxy) => proxy,
        Err(err) => {
            eprintln!("keyhole: {err}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("keyhole: cannot install signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on http://{}", proxy.local_addr());
    let _ = stdout.flush();
    drop(stdout);
    signals.wait().await;
    tracing::info!("shutting down");
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT handlers, installed before the `listening on` line so
/// that a signal sent as soon as the line appears is never fatal.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        routes: Vec::new(),
        client_key: None,
        allow_hosts: Vec::new(),
        ca_files: Vec::new(),
        limits: Limits::default(),
        threads: None,
        log_level: tracing::Level::INFO,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                cli.listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v}: not an IP:PORT address"))?;
            }
            "--route" => {
                let v = value()?;
                let (prefix, url) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--route {v}: expected PREFIX=URL"))?;
                cli.routes
                    .push(Route::new(prefix, url).map_err(|e| e.to_string())?);
            }
            "--header" => {
                let v = value()?;
                let (name, template) = v.split_once('=').ok_or("--header: expected NAME=VALUE")?;
                let secret =
                    Secret::from_template(template).map_err(|e| format!("--header {name}: {e}"))?;
                let route = cli.routes.pop().ok_or("--header must follow a --route")?;
                cli.routes.push(route.header(name, secret));
            }
            "--client-key" => {
                let v = value()?;
                cli.client_key =
                    Some(Secret::from_template(&v).map_err(|e| format!("--client-key: {e}"))?);
            }
            "--allow-host" => cli.allow_hosts.push(value()?),
            "--ca-file" => cli.ca_files.push(value()?),
            "--upstream-timeout" => cli.limits.upstream_timeout = seconds(&flag, &value()?)?,
            "--idle-timeout" => cli.limits.idle_timeout = seconds(&flag, &value()?)?,
            "--head-timeout" => cli.limits.head_timeout = seconds(&flag, &value()?)?,
            "--drain-timeout" => cli.limits.drain_timeout = seconds(&flag, &value()?)?,
            "--connect-timeout" => {
                let d = seconds(&flag, &value()?)?;
                cli.limits.connect_timeout = d;
                cli.limits.tls_timeout = d;
            }
            "--max-connections" => cli.limits.max_connections = number(&flag, &value()?)?,
            "--max-body-bytes" => cli.limits.max_body_bytes = Some(number(&flag, &value()?)?),
            "--max-head-bytes" => cli.limits.max_head_bytes = number(&flag, &value()?)?,
            "--max-headers" => cli.limits.max_headers = number(&flag, &value()?)?,
            "--threads" => cli.threads = Some(number(&flag, &value()?)?),
            "--log-level" => {
                let v = value()?;
                cli.log_level = v.parse().map_err(|_| {
                    format!("--log-level {v}: use error, warn, info, debug or trace")
                })?;
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    if cli.routes.is_empty() && std::env::var_os("ANTHROPIC_API_KEY").is_some() {
        let secret = Secret::from_env("ANTHROPIC_API_KEY").map_err(|e| e.to_string())?;
        let route = Route::new("/", "https://api.anthropic.com").map_err(|e| e.to_string())?;
        cli.routes.push(route.header("x-api-key", secret));
    }
    if cli.routes.is_empty() {
        return Err(format!(
            "no route given and ANTHROPIC_API_KEY is not set\n{USAGE}"
        ));
    }
    Ok(Some(cli))
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{flag} {value}: expected a positive number of seconds"))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{flag} {value}: expected a number"));
    }
    value
        .parse()
        .map_err(|_| format!("{flag} {value}: number out of range"))
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn dates_for_log_timestamps() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
    }
}
