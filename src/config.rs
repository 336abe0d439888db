//! Configuration: routes, injected headers, limits, and the `Secret` type.
//!
//! Everything here is validated once, when the proxy is built, so the request
//! path never meets a malformed route or a header value that could inject a
//! CR/LF into the upstream head.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;

/// A value keyhole injects or compares but never shows: no `Display`, a
/// redacted `Debug`, and its bytes are overwritten when it is dropped. One
/// read from a file (`${file:PATH}`) remembers its template, so that a
/// reload reads the file again.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>, Option<Arc<str>>);

impl Secret {
    /// Wraps a value given directly (the caller's copy is not erased).
    #[must_use]
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Zeroizing::new(value.into().into_bytes()), None)
    }

    /// Reads the file at `path`: its contents without trailing CR, LF,
    /// spaces and tabs. Fails naming the path, never the contents, when it
    /// cannot be read or holds a control byte. Read again on reload.
    pub fn from_file(path: &str) -> Result<Secret, Error> {
        Secret::from_template(&format!("${{file:{path}}}"))
    }

    /// Reads environment variable `var`; fails naming `var` when it is unset,
    /// not UTF-8, or holds a control byte.
    pub fn from_env(var: &str) -> Result<Secret, Error> {
        Secret::from_template(&format!("${{{var}}}"))
    }

    /// Expands every `${VAR}` in `template` from the environment, e.g.
    /// `Bearer ${OPENAI_API_KEY}`, and every `${file:PATH}` from that file
    /// (see `from_file`). Fails naming the variable or path, never a value.
    pub fn from_template(template: &str) -> Result<Secret, Error> {
        // Each variable is read once, and `out` then reserved for exactly
        // what it holds: a `Vec` that grew would free a copy unzeroed.
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some((text, after)) = rest.split_once("${") {
            let (var, tail) = after.split_once('}').ok_or(Error::BadTemplate)?;
            let value = if let Some(path) = var.strip_prefix("file:") {
                read_secret_file(path)?
            } else {
                if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(Error::BadTemplate);
                }
                let unset = |_| Error::UnsetVariable(var.to_owned());
                let value = Zeroizing::new(std::env::var(var).map_err(unset)?);
                if value.bytes().any(is_control) {
                    return Err(Error::VariableHasControlByte(var.to_owned()));
                }
                value
            };
            parts.push((text, value));
            rest = tail;
        }
        let len = parts.iter().map(|(text, value)| text.len() + value.len());
        let mut out = Zeroizing::new(Vec::with_capacity(len.sum::<usize>() + rest.len()));
        for (text, value) in &parts {
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(rest.as_bytes());
        let source = template.contains("${file:").then(|| Arc::from(template));
        Ok(Secret(out, source))
    }

    /// Warns about each file this value was read from that every user may
    /// read (mode bit `0o004`): the key is then not the operator's alone.
    pub(crate) fn warn_if_world_readable(&self) {
        use std::os::unix::fs::PermissionsExt;
        let mut rest = self.1.as_deref().unwrap_or_default();
        while let Some((_, after)) = rest.split_once("${file:") {
            let Some((path, tail)) = after.split_once('}') else {
                return;
            };
            let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
            if mode & 0o004 != 0 {
                tracing::warn!(path, "secret file is readable by every user");
            }
            rest = tail;
        }
    }

    /// The value read again from its files, if it came from any.
    pub(crate) fn reread(&self) -> Option<Result<Secret, Error>> {
        self.1.as_deref().map(Secret::from_template)
    }

    /// The raw bytes, for injection and constant-time comparison only.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as text, to hand to whoever must hold it (a client key
    /// from `ProxyHandle::add_client`, for its sandbox). A `Secret` is
    /// always UTF-8: it is made from a `String` or expanded from one.
    #[must_use]
    pub fn expose_secret(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret file's contents without trailing CR, LF, spaces and tabs.
fn read_secret_file(path: &str) -> Result<Zeroizing<String>, Error> {
    let fail = |why| Error::SecretFile(path.to_owned(), why);
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|_| fail("cannot be read"))?);
    let text = std::str::from_utf8(&bytes).map_err(|_| fail("is not UTF-8"))?;
    let text = text.trim_end_matches(['\r', '\n', ' ', '\t']);
    if text.bytes().any(is_control) {
        return Err(fail("holds a control byte"));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// A control byte: anything that could end or corrupt a header line.
pub(crate) fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

/// RFC 9110 §5.6.2 `tchar`, looked up: the head scanner asks for every byte
/// of every name.
pub(crate) fn is_tchar(byte: u8) -> bool {
    static TCHAR: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0u8;
        while b < 128 {
            table[b as usize] = b.is_ascii_alphanumeric()
                || matches!(b, b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+')
                || matches!(b, b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~');
            b += 1;
        }
        table
    };
    TCHAR[usize::from(byte)]
}

/// RFC 9110 `token`: one or more `tchar`.
pub(crate) fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| is_tchar(b))
}

/// One upstream: requests whose path is `prefix` or starts with `prefix/`
/// go to `url`, carrying the route's injected headers.
#[derive(Clone)]
#[must_use]
pub struct Route {
    pub(crate) prefix: String,
    pub(crate) upstream: UpstreamUrl,
    pub(crate) headers: Vec<(String, Secret)>,
    pub(crate) client_key: Option<Secret>,
    /// What the route forwards, if it has an allowlist.
    pub(crate) allows: Vec<Allow>,
}

/// One allowlist entry: a method (`*`: any) and an upstream path, or
/// with `subtree` that path and every path below it (README "Allowlists").
#[derive(Debug, Clone)]
pub(crate) struct Allow {
    entry: String,
    method: String,
    path: String,
    subtree: bool,
}

impl Allow {
    /// Checks the entry as written, for `Route::validate`; the error quotes it.
    fn validate(&self) -> Result<(), Error> {
        let bad = |why| Err(Error::BadAllow(self.entry.clone(), why));
        // `*` is itself a `tchar`, so "any method" passes as a token.
        if !is_token(self.method.as_bytes()) {
            return bad("METHOD must be a method name or *");
        }
        if !(self.path.starts_with('/') || self.subtree && self.path.is_empty()) {
            return bad("PATTERN must start with /");
        }
        if self.path.contains('*') || !self.path.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("PATTERN may hold * only as a final /*, and no spaces or controls");
        }
        Ok(())
    }

    /// Does the request's method and upstream path (no query) match?
    pub(crate) fn matches(&self, method: &str, path: &[u8]) -> bool {
        let method_ok = self.method == "*" || self.method == method;
        let rest = path.strip_prefix(self.path.as_bytes());
        method_ok
            && rest.is_some_and(|rest| rest.is_empty() || self.subtree && rest.starts_with(b"/"))
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        let allows: Vec<&str> = self.allows.iter().map(|a| a.entry.as_str()).collect();
        f.debug_struct("Route")
            .field("prefix", &self.prefix)
            .field("upstream", &self.upstream.authority)
            .field("injected_headers", &names)
            .field("client_key", &self.client_key)
            .field("allows", &allows)
            .finish()
    }
}

impl Route {
    /// A route from `prefix` (starting with `/`) to `url`
    /// (`https://host[:port][/path]`, or `http://` for a loopback host only).
    pub fn new(prefix: &str, url: &str) -> Result<Route, Error> {
        Ok(Route {
            prefix: parse_prefix(prefix)?,
            upstream: UpstreamUrl::parse(url)?,
            headers: Vec::new(),
            client_key: None,
            allows: Vec::new(),
        })
    }

    /// Adds a header the forwarded request carries exactly once, replacing
    /// any the client sent. Name and value are checked when the proxy starts.
    pub fn header(mut self, name: &str, value: Secret) -> Route {
        self.headers.push((name.to_ascii_lowercase(), value));
        self
    }

    /// Requires requests on this route to carry `key` (as `x-api-key` or
    /// `authorization: Bearer`), on top of any proxy-wide client key; so a
    /// runner can give each sandbox its own placeholder. Otherwise 401.
    pub fn client_key(mut self, key: Secret) -> Route {
        self.client_key = Some(key);
        self
    }

    /// Adds an allowlist entry: once a route has one, it forwards only
    /// requests that match one (else 403). `method` is a method name or `*`;
    /// `pattern` an upstream path (after the route's rewrite, without the
    /// query), matched exactly, or, ending in `/*`, that path and every path
    /// below it. Checked when the proxy starts.
    pub fn allow(mut self, method: &str, pattern: &str) -> Route {
        self.allows.push(Allow {
            entry: format!("{method} {pattern}"),
            method: method.to_owned(),
            path: pattern.strip_suffix("/*").unwrap_or(pattern).to_owned(),
            subtree: pattern.ends_with("/*"),
        });
        self
    }

    /// Does this route inject the header `name` (compared case-insensitively)?
    pub(crate) fn injects(&self, name: &[u8]) -> bool {
        (self.headers.iter()).any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
    }

    /// Checks the injected headers: token names, each name once (the
    /// upstream would otherwise get two keys), non-empty values without
    /// control bytes or padding (RFC 9110 §5.5).
    pub(crate) fn validate(&self) -> Result<(), Error> {
        for (i, (name, value)) in self.headers.iter().enumerate() {
            let framing = ["host", "content-length", "transfer-encoding"].contains(&name.as_str());
            if !is_token(name.as_bytes()) || framing {
                return Err(Error::BadHeaderName(name.clone()));
            }
            if self.headers[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::DuplicateHeader(self.prefix.clone(), name.clone()));
            }
            check_value(value, name)?;
        }
        if let Some(key) = &self.client_key {
            check_value(key, "client key")?;
        }
        self.allows.iter().try_for_each(Allow::validate)
    }
}

/// A configured value must be non-empty, unpadded and free of control bytes,
/// so it can neither vanish nor add a line to the upstream head.
pub(crate) fn check_value(value: &Secret, what: &str) -> Result<(), Error> {
    let bytes = value.expose();
    if bytes.is_empty() {
        return Err(Error::EmptyValue(what.to_owned()));
    }
    if bytes.starts_with(b" ") || bytes.ends_with(b" ") || bytes.iter().any(|&b| is_control(b)) {
        return Err(Error::BadHeaderValue(what.to_owned()));
    }
    Ok(())
}

fn parse_prefix(prefix: &str) -> Result<String, Error> {
    let bad = |why| Error::BadPrefix(prefix.to_owned(), why);
    if !prefix.starts_with('/') {
        return Err(bad("must start with /"));
    }
    if prefix.contains(['?', '#', '%', '\\']) || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("only plain path characters are allowed"));
    }
    let trimmed = prefix.trim_end_matches('/');
    if odd_segment(trimmed) {
        return Err(bad("empty or dot segments are not allowed"));
    }
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// Does `path` (starting with `/` or empty, trailing `/` trimmed) have an
/// empty or a dot segment, which could escape a base path or be normalised
/// away?
fn odd_segment(path: &str) -> bool {
    path.contains("//") || path.split('/').any(|s| s == "." || s == "..")
}

/// A parsed, validated upstream URL.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamUrl {
    pub(crate) tls: bool,
    /// Host without brackets, for DNS and SNI.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// What the forwarded `Host` carries: `host` or `host:port` as written.
    pub(crate) authority: String,
    /// Prepended to the forwarded path; empty or `/...` without a trailing `/`.
    pub(crate) path: String,
}

impl fmt::Display for UpstreamUrl {
    /// The URL as configured, less a trailing `/`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

impl UpstreamUrl {
    pub(crate) fn parse(url: &str) -> Result<UpstreamUrl, Error> {
        let bad = |why| Error::BadUrl(url.to_owned(), why);
        let (tls, rest) = match url.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => return Err(bad("must start with https:// (or http:// for loopback)")),
        };
        if rest.contains(['?', '#', '@', '\\']) || !rest.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("no user info, query, fragment or unusual characters"));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = split_authority(authority).ok_or_else(|| bad("invalid host or port"))?;
        if !tls && !is_loopback(host) {
            let why = "http:// is only allowed for loopback hosts; use https://";
            return Err(bad(why));
        }
        let path = path.trim_end_matches('/');
        if path.contains('%') || odd_segment(path) {
            return Err(bad("path with empty, dot or encoded segments"));
        }
        Ok(UpstreamUrl {
            tls,
            host: host.to_owned(),
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.to_ascii_lowercase(),
            path: path.to_owned(),
        })
    }
}

/// Splits `host[:port]` and checks both; a bracketed IPv6 literal's host
/// comes without its brackets (for DNS and SNI).
pub(crate) fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        match rest {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        let (host, port) =
            (authority.split_once(':')).map_or((authority, None), |(h, p)| (h, Some(p)));
        let name = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        if host.is_empty() || !host.bytes().all(name) {
            return None;
        }
        (host, port)
    };
    let port = match port {
        None => None,
        // Digits only: `parse` would take a sign.
        Some(p) if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) => return None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|&n| n != 0)?),
    };
    Some((host, port))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Every bound and timeout, with the defaults of the command-line contract.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head, leading empty lines included: a head of exactly
    /// this many bytes passes, one more is 431. 1 byte to 16 MiB.
    pub max_head_bytes: usize,
    /// Most header lines in a request head (431 beyond); 1 to 256.
    pub max_headers: usize,
    /// Most client connections served at once; beyond it a new connection
    /// gets 503 and is closed, so a flood cannot starve the ones in progress.
    pub max_connections: usize,
    /// Largest request body accepted (413 beyond); `None` for no limit.
    pub max_body_bytes: Option<u64>,
    /// Time to receive a complete request head once its first byte arrived (408).
    pub head_timeout: Duration,
    /// Longest silence while relaying a body in either direction, and while a
    /// client connection waits for its next request.
    pub idle_timeout: Duration,
    /// Longest wait for the upstream's response head once the request was sent (504).
    pub upstream_timeout: Duration,
    /// Longest wait for the upstream TCP connection (504).
    pub connect_timeout: Duration,
    /// Longest wait for the upstream TLS handshake (504).
    pub tls_timeout: Duration,
    /// How long in-flight requests may still run after shutdown begins.
    pub drain_timeout: Duration,
    /// Idle upstream connections kept per route; 0 turns pooling off.
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept for reuse.
    pub pool_idle_timeout: Duration,
}

/// 64 KiB of head is far beyond any real API client and bounds per-connection memory.
pub(crate) const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// 100 header lines, as the contract says; real SDK requests send about 20.
pub(crate) const DEFAULT_MAX_HEADERS: usize = 100;
/// The fixed header array handed to httparse; `Limits::max_headers` is at most this.
pub(crate) const HEADER_ARRAY_LEN: usize = 256;

/// The longest any timeout may be: `Instant + Duration` panics on overflow,
/// and a year is beyond any real wait.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Heads beyond this are not HTTP clients; the bound keeps a head's buffer small.
const MAX_HEAD_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Connection permits are `u32` in tokio's semaphore; a million is far beyond a host's sockets.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl Limits {
    /// Checks every field once, at start, so no later arithmetic on them can
    /// overflow or panic; the error names the field.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |field, why| Err(Error::BadLimit(field, why));
        if !(1..=MAX_HEAD_BYTES_LIMIT).contains(&self.max_head_bytes) {
            return bad("max_head_bytes", "must be 1 to 16 MiB");
        }
        if !(1..=HEADER_ARRAY_LEN).contains(&self.max_headers) {
            return bad("max_headers", "must be 1 to 256");
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return bad("max_connections", "must be 1 to 1,000,000");
        }
        let timeouts = [
            ("head_timeout", self.head_timeout),
            ("idle_timeout", self.idle_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("connect_timeout", self.connect_timeout),
            ("tls_timeout", self.tls_timeout),
            ("drain_timeout", self.drain_timeout),
            ("pool_idle_timeout", self.pool_idle_timeout),
        ];
        for (field, value) in timeouts {
            if value.is_zero() || value > MAX_TIMEOUT {
                return bad(field, "must be more than zero and at most a year");
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_connections: 16_384,
            max_body_bytes: None,
            head_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            tls_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            pool_max_idle: 256,
            pool_idle_timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let secret = Secret::new("sk-live-123");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let route = Route::new("/", "https://api.example.com")
            .unwrap()
            .header("X-Api-Key", secret);
        assert!(!format!("{route:?}").contains("sk-live"));
    }

    #[test]
    fn template_expands_and_names_unset_variable() {
        std::env::set_var("KEYHOLE_TEST_TEMPLATE_KEY", "abc");
        let s = Secret::from_template("Bearer ${KEYHOLE_TEST_TEMPLATE_KEY}!").unwrap();
        assert_eq!(s.expose(), b"Bearer abc!");
        let err = Secret::from_template("${KEYHOLE_TEST_SURELY_UNSET}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable KEYHOLE_TEST_SURELY_UNSET is not set"
        );
        assert!(matches!(
            Secret::from_template("${oops"),
            Err(Error::BadTemplate)
        ));
        std::env::set_var("KEYHOLE_TEST_TEMPLATE_CRLF", "a\r\nx-evil: 1");
        let err = Secret::from_template("${KEYHOLE_TEST_TEMPLATE_CRLF}").unwrap_err();
        assert!(err.to_string().contains("KEYHOLE_TEST_TEMPLATE_CRLF"));
        assert!(!err.to_string().contains("evil"));
    }

    #[test]
    fn a_long_template_is_reserved_exactly() {
        // A buffer that grew would have freed an unzeroed copy of the value.
        std::env::set_var("KEYHOLE_TEST_TEMPLATE_LONG", "k".repeat(300));
        let template = "a ${KEYHOLE_TEST_TEMPLATE_LONG} b ${KEYHOLE_TEST_TEMPLATE_LONG}";
        let s = Secret::from_template(template).unwrap();
        assert_eq!(
            s.expose(),
            format!("a {0} b {0}", "k".repeat(300)).as_bytes()
        );
        assert_eq!(s.0.capacity(), s.0.len());
    }

    #[test]
    fn urls() {
        let u = UpstreamUrl::parse("https://api.openai.com/v1/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("api.openai.com", 443, "/v1")
        );
        assert_eq!(u.authority, "api.openai.com");
        let u = UpstreamUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (u.port, u.authority.as_str(), u.path.as_str()),
            (8443, "127.0.0.1:8443", "")
        );
        let u = UpstreamUrl::parse("http://[::1]:80/x").unwrap();
        assert_eq!((u.host.as_str(), u.tls), ("::1", false));
        for bad in [
            "http://api.example.com",
            "ftp://x",
            "https://user@host",
            "https://host:0",
            "https://host:99999",
            "https://host/a/../b",
            "https://host?x",
            "https://",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("/").unwrap(), "/");
        assert_eq!(parse_prefix("/openai/").unwrap(), "/openai");
        for bad in ["openai", "/a/../b", "/a//b", "/a%2f", "/a?b"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_validation() {
        let ok = Route::new("/", "https://h")
            .unwrap()
            .header("x-api-key", Secret::new("k"));
        assert!(ok.validate().is_ok());
        let bad = Route::new("/", "https://h")
            .unwrap()
            .header("x api", Secret::new("k"));
        assert!(matches!(bad.validate(), Err(Error::BadHeaderName(_))));
        let bad = Route::new("/", "https://h")
            .unwrap()
            .header("x", Secret::new("a\nb"));
        let err = bad.validate().unwrap_err();
        assert!(!err.to_string().contains("a\nb"));
    }
}
