//! What can go wrong, as closed enums with fixed text.
//!
//! `Refusal` is every answer keyhole generates itself: each variant maps to
//! exactly one status, and its message is a static string, so no request byte
//! and no secret can ever reach a generated response or its log line.
//! `Error` is what configuration and start-up can fail with.

use std::fmt;

/// Which of a client's budgets refused a request (README "Spend controls").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Too many requests in flight.
    Concurrency,
    /// The request-rate bucket is empty.
    Rate,
    /// The model-token bucket is empty.
    Tokens,
}

/// A response keyhole generates itself, then closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 400: malformed or ambiguous request.
    BadRequest(&'static str),
    /// 401: missing or wrong client key.
    Unauthorized,
    /// 403: a browser's request (`Origin`, `Sec-Fetch-Site`).
    Browser,
    /// 403: a `Host` that is not a local name.
    ForeignHost,
    /// 403: the route's allowlist does not list this method and path.
    NotAllowed,
    /// 404: no route matches.
    NotFound,
    /// 405: `TRACE` would echo the injected key.
    MethodNotAllowed,
    /// 408: the request head (or body) stalled.
    RequestTimeout,
    /// 413: body over the configured limit.
    PayloadTooLarge,
    /// 417: an expectation other than `100-continue`.
    ExpectationFailed,
    /// 431: request head over the size or line limit.
    HeadTooLarge,
    /// 429: the client's budget refuses the request; retry after the
    /// seconds given.
    Limited(Limit, u32),
    /// 502: the upstream's response broke a rule, or it closed without one.
    BadGateway(&'static str),
    /// 502: no connection to the upstream (DNS, TCP).
    Unreachable(&'static str),
    /// 502: the TLS handshake with the upstream failed.
    UpstreamTls,
    /// 502: the egress proxy answered CONNECT with anything but a 2xx, or
    /// closed, or spoke before TLS: the tunnel did not open.
    EgressRefused(&'static str),
    /// 503: connection limit reached.
    Unavailable,
    /// 504: upstream timed out.
    GatewayTimeout(&'static str),
    /// 505: any version but HTTP/1.1.
    VersionNotSupported,
}

// The reason texts too long for their row in `Refusal::answer`.
/// 403 `not-allowed`.
const NOT_ALLOWED: &str = "this method and path are not on the route's allowlist";
/// 413 `body-too-large`.
const BODY_TOO_LARGE: &str = "request body over the configured limit";
/// 417 `expectation`.
const EXPECTATION: &str = "only Expect: 100-continue is supported";
/// 429 `concurrency`.
const IN_FLIGHT: &str = "too many requests in flight for this client";
/// 429 `tokens`.
const TOKENS_SPENT: &str = "this client's model-token budget is spent";

impl Refusal {
    /// The status code this refusal is answered with, its `keyhole-error`
    /// code, and the fixed reason text sent as the body and logged: one row
    /// per variant.
    fn answer(self) -> (u16, &'static str, &'static str) {
        match self {
            Self::BadRequest(why) => (400, "bad-request", why),
            Self::Unauthorized => (401, "client-key", "missing or wrong client key"),
            Self::Browser => (403, "browser", "browser requests are refused"),
            Self::ForeignHost => (403, "host", "Host is not a local name"),
            Self::NotAllowed => (403, "not-allowed", NOT_ALLOWED),
            Self::NotFound => (404, "no-route", "no route matches this path"),
            Self::MethodNotAllowed => (405, "method", "TRACE is not allowed"),
            Self::RequestTimeout => (408, "request-timeout", "request not received in time"),
            Self::PayloadTooLarge => (413, "body-too-large", BODY_TOO_LARGE),
            Self::ExpectationFailed => (417, "expectation", EXPECTATION),
            Self::HeadTooLarge => (431, "head-too-large", "request head too large"),
            Self::Limited(Limit::Concurrency, _) => (429, "concurrency", IN_FLIGHT),
            Self::Limited(Limit::Rate, _) => (429, "rate", "this client's request rate is spent"),
            Self::Limited(Limit::Tokens, _) => (429, "tokens", TOKENS_SPENT),
            Self::BadGateway(why) => (502, "upstream-malformed", why),
            Self::Unreachable(why) => (502, "upstream-unreachable", why),
            Self::UpstreamTls => (502, "upstream-tls", "upstream TLS handshake failed"),
            Self::EgressRefused(why) => (502, "egress-refused", why),
            Self::Unavailable => (503, "overloaded", "too many connections"),
            Self::GatewayTimeout(why) => (504, "upstream-timeout", why),
            Self::VersionNotSupported => (505, "version", "only HTTP/1.1 is supported"),
        }
    }

    pub(crate) fn status(self) -> u16 {
        self.answer().0
    }

    /// The fixed reason text sent as the body and logged.
    pub(crate) fn reason(self) -> &'static str {
        self.answer().2
    }

    /// The `keyhole-error` code (README "Responses keyhole makes itself").
    pub(crate) fn code(self) -> &'static str {
        self.answer().1
    }

    /// The whole response: status line, fixed headers, the reason as body.
    pub(crate) fn response(self) -> Vec<u8> {
        let (status, code, body) = self.answer();
        let retry = match self {
            Refusal::Limited(_, seconds) => format!("retry-after: {seconds}\r\n"),
            _ => String::new(),
        };
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\nkeyhole-error: {code}\r\n{retry}content-length: {}\r\nconnection: close\r\n\r\n{body}\n",
            phrase(status),
            body.len() + 1,
        )
        .into_bytes()
    }
}

/// The reason phrase of each status `Refusal::answer` gives (RFC 9110 §15).
fn phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "HTTP Version Not Supported",
    }
}

/// A configuration or start-up failure. Messages name variables, headers and
/// URLs, never a secret value.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `${VAR}` names a variable that is not set (or not UTF-8).
    UnsetVariable(String),
    /// `${VAR}` has a value with a control byte, which could inject headers.
    VariableHasControlByte(String),
    /// `${` without a closing `}` or with an empty or invalid name.
    BadTemplate,
    /// A header name that is not an HTTP token.
    BadHeaderName(String),
    /// A header value with CR, LF, NUL or another control byte (the value is not shown).
    BadHeaderValue(String),
    /// An injected header or client key whose value is empty.
    EmptyValue(String),
    /// The same injected header name twice in one route (route prefix, name).
    DuplicateHeader(String, String),
    /// A `Limits` field out of range (field, allowed range).
    BadLimit(&'static str, &'static str),
    /// A route prefix that is not an origin-form path.
    BadPrefix(String, &'static str),
    /// A route URL that keyhole will not forward to.
    BadUrl(String, &'static str),
    /// Two routes with the same prefix.
    DuplicatePrefix(String),
    /// No route configured.
    NoRoutes,
    /// Extra CA certificates (`Builder::ca_pem`) that hold no usable certificate.
    BadCertificate(&'static str),
    /// Binding the listening socket at this address failed.
    Bind(std::net::SocketAddr, std::io::Error),
    /// A client name that is not 1–64 bytes of `A-Z a-z 0-9 . _ -`.
    BadClientName,
    /// Two clients with this name.
    DuplicateClient(String),
    /// This client's key is another client's too.
    DuplicateClientKey(String),
    /// An allowlist entry (`METHOD PATTERN`) that is not valid, and why.
    BadAllow(String, &'static str),
    /// The operating system's random generator failed.
    Random,
    /// A `${file:PATH}` secret that cannot be used, and why.
    SecretFile(String, &'static str),
    /// No route has this prefix (`ProxyHandle::set_header`).
    UnknownRoute(String),
    /// A clients file that cannot be used: its path, the line (0: the whole
    /// file) and why.
    ClientsFile(String, usize, &'static str),
    /// An egress proxy URL that cannot be used, and why (the URL is not
    /// shown: it may hold a password).
    BadEgressProxy(&'static str),
    /// A `NO_PROXY` entry that is not `*`, a host name or an IP address.
    BadNoProxy(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsetVariable(var) => write!(f, "environment variable {var} is not set"),
            Self::VariableHasControlByte(var) => write!(
                f,
                "environment variable {var} contains a control byte (CR, LF, NUL, ...)"
            ),
            Self::BadTemplate => f.write_str("unterminated or empty ${...} in a header value"),
            Self::BadHeaderName(name) => write!(f, "header name {name:?} is not an HTTP token"),
            Self::BadHeaderValue(name) => {
                write!(f, "value of header {name:?} contains a control byte")
            }
            Self::BadPrefix(prefix, why) => write!(f, "route prefix {prefix:?}: {why}"),
            Self::BadUrl(url, why) => write!(f, "route URL {url:?}: {why}"),
            Self::EmptyValue(name) => write!(f, "value of {name:?} is empty"),
            Self::DuplicateHeader(prefix, name) => {
                write!(f, "route {prefix:?} injects header {name:?} twice")
            }
            Self::BadLimit(field, why) => write!(f, "limit {field}: {why}"),
            Self::DuplicatePrefix(prefix) => write!(f, "route prefix {prefix:?} given twice"),
            Self::NoRoutes => f.write_str("no route configured (add one with Builder::route)"),
            Self::BadCertificate(why) => write!(f, "extra CA certificates: {why}"),
            Self::Bind(addr, err) => write!(f, "cannot listen on {addr}: {err}"),
            Self::BadClientName => {
                f.write_str("a client name must be 1 to 64 bytes of A-Z a-z 0-9 . _ -")
            }
            Self::DuplicateClient(name) => write!(f, "client {name:?} is registered twice"),
            Self::DuplicateClientKey(name) => {
                write!(f, "client {name:?} has the key of another client")
            }
            Self::BadAllow(entry, why) => write!(f, "allowlist entry {entry:?}: {why}"),
            Self::Random => f.write_str("the operating system's random generator failed"),
            Self::SecretFile(path, why) => write!(f, "secret file {path}: {why}"),
            Self::UnknownRoute(prefix) => write!(f, "no route has the prefix {prefix:?}"),
            Self::ClientsFile(path, 0, why) => write!(f, "clients file {path}: {why}"),
            Self::ClientsFile(path, line, why) => {
                write!(f, "clients file {path}, line {line}: {why}")
            }
            Self::BadEgressProxy(why) => write!(f, "egress proxy URL: {why}"),
            Self::BadNoProxy(e) => write!(f, "NO_PROXY entry {e:?}: not *, a name or an IP"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_response_is_well_framed() {
        let bytes = Refusal::BadRequest("bare LF in head").response();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains("connection: close"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(body, "bare LF in head\n");
    }
}
