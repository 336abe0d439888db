//! Request and response heads: httparse tokenizes, this file decides.
//!
//! httparse is lenient on purpose (bare LF, leading blank lines, any target
//! form, `+5` lengths never reach it but would reach `str::parse`). Every
//! rule of keyhole's strict profile that can be decided from the head bytes
//! alone is enforced here, each marked with its rule id (S1–S16, R1–R3).
//! Pure functions over bytes: no IO, no clocks.

use std::mem::MaybeUninit;

use crate::config::{is_token, HEADER_ARRAY_LEN};
use crate::error::Refusal;

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Response only: the body runs until the upstream closes.
    UntilClose,
}

/// Where a head ends, found incrementally so that bytes are scanned once
/// however the head is split across reads.
#[derive(Debug, Default, Clone)]
pub(crate) struct HeadScan {
    pos: usize,
    line_start: usize,
    lines: usize,
    leading_empty_line: bool,
}

/// What a scan found so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The head is not complete yet.
    Partial,
    /// The head is the first `n` bytes.
    Complete(usize),
}

impl HeadScan {
    /// Scans `buf` (the bytes of one head, from its first byte; earlier calls
    /// saw a prefix of it). Enforces S5 (CRLF only) and S15 (size and line
    /// limits, across read boundaries, before the head is complete).
    pub(crate) fn scan(
        &mut self,
        buf: &[u8],
        max_bytes: usize,
        max_lines: usize,
    ) -> Result<Scan, Refusal> {
        let mut i = self.pos;
        let limit = buf.len().min(max_bytes);
        while i < buf.len() {
            // Most bytes are neither CR nor LF: look at eight at a time and
            // jump straight to the first that might be.
            if i + 8 <= limit {
                let word = buf[i..i + 8].try_into().map_or(0, u64::from_le_bytes);
                let below_14 = bytes_below_14(word);
                if below_14 == 0 {
                    i += 8;
                    continue;
                }
                i += (below_14.trailing_zeros() / 8) as usize;
            }
            match buf[i] {
                // A line ending: taken as a pair, so any LF met on its own is bare.
                b'\r' => match buf.get(i + 1) {
                    None => break,
                    Some(b'\n') => {
                        let end = i + 2;
                        // The LF, like every byte, must sit within the limit.
                        if end > max_bytes + 1 {
                            return Err(Refusal::HeadTooLarge);
                        }
                        if end - self.line_start == 2 {
                            if self.lines > 0 {
                                return Ok(Scan::Complete(end));
                            }
                            // RFC 9112 §2.2 tolerates one empty line before the
                            // request line (a client's stray CRLF after a body); more is noise.
                            if self.leading_empty_line {
                                return Err(Refusal::BadRequest("empty lines before request line"));
                            }
                            self.leading_empty_line = true;
                        } else {
                            self.lines += 1;
                            // The request line plus `max_lines` header lines.
                            if self.lines > max_lines + 1 {
                                return Err(Refusal::HeadTooLarge);
                            }
                        }
                        self.line_start = end;
                        i = end;
                    }
                    // S5/S6: bare CR.
                    Some(_) => return Err(Refusal::BadRequest("bare CR in head")),
                },
                // S5: a bare LF is a line ending httparse accepts and others may not.
                b'\n' => return Err(Refusal::BadRequest("bare LF in head")),
                _ => i += 1,
            }
            if i > max_bytes {
                return Err(Refusal::HeadTooLarge);
            }
        }
        self.pos = i;
        if buf.len() > max_bytes {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(Scan::Partial)
    }
}

/// The high bit of each of the eight bytes that may be below 14 (so
/// possibly CR or LF). The lowest marked byte is exactly the first byte
/// below 14: a borrow only runs upwards from a byte that was below 14.
fn bytes_below_14(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    word.wrapping_sub(ONES * 14) & !word & HIGHS
}

/// A validated request head, borrowing the connection's buffer.
#[derive(Debug)]
pub(crate) struct RequestHead<'h, 'b> {
    pub(crate) method: &'b str,
    /// The origin-form target, path and query.
    pub(crate) target: &'b str,
    /// Length of the path part of `target` (before `?`).
    pub(crate) path_len: usize,
    pub(crate) headers: &'h [httparse::Header<'b>],
    /// S1–S16 facts the later steps act on, in the contract's check order.
    pub(crate) browser: bool,
    pub(crate) host: &'b [u8],
    pub(crate) trace: bool,
    pub(crate) close: bool,
    pub(crate) expect: Expect,
    /// Body framing, or the reason it is refused (answered after routing).
    pub(crate) framing: Result<Framing, Refusal>,
}

/// What the client's `Expect` asked for (S12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    None,
    Continue,
    Other,
}

impl RequestHead<'_, '_> {
    /// The path part of the target (no query).
    pub(crate) fn path(&self) -> &str {
        &self.target[..self.path_len]
    }
}

/// Room for httparse's headers, left uninitialised: filling 256 empty
/// headers (8 KiB) twice per request cost more than parsing the heads.
pub(crate) type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; HEADER_ARRAY_LEN];

/// Fresh header slots for httparse.
pub(crate) fn header_array<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; HEADER_ARRAY_LEN]
}

/// Parses and validates a complete request head (as found by `HeadScan`).
pub(crate) fn parse_request<'h, 'b>(
    head: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<RequestHead<'h, 'b>, Refusal> {
    check_version(head)?;
    let mut req = httparse::Request::new(&mut []);
    // S6: httparse's own errors (obs-fold, whitespace before the colon, bad
    // tokens, control bytes) are final; no lenient retry.
    match req.parse_with_uninit_headers(head, storage) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(Refusal::BadRequest("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(Refusal::VersionNotSupported),
        Err(err) => return Err(Refusal::BadRequest(httparse_reason(err))),
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Refusal::VersionNotSupported);
    };
    // S2: httparse accepts any visible ASCII as a method.
    if !is_token(method.as_bytes()) {
        return Err(Refusal::BadRequest("method is not a token"));
    }
    if method == "CONNECT" {
        return Err(Refusal::BadRequest("CONNECT is not supported"));
    }
    let path_len = check_target(target)?;
    let headers: &'h [httparse::Header<'b>] = req.headers;

    let mut host = None;
    let mut hosts = 0;
    let mut browser = false;
    let mut close = false;
    let mut expect = Expect::None;
    let mut lengths = 0u32;
    let mut length = None;
    let mut codings = 0u32;
    let mut chunked = false;
    for h in headers {
        let name = h.name.as_bytes();
        // S7: `_` is a token character, but some servers read it as `-`.
        if name.contains(&b'_') {
            return Err(Refusal::BadRequest("underscore in header name"));
        }
        // S6: httparse has already refused every control byte but HTAB in
        // a value (see the test `control_bytes_in_values_are_refused`).
        let value = trim(h.value);
        let interpreted = |v: &[u8]| v.is_ascii();
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = parse_length(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            if !interpreted(value) {
                return Err(Refusal::BadRequest("invalid Connection header"));
            }
            for option in list_items(value) {
                if !is_token(option) {
                    return Err(Refusal::BadRequest("invalid Connection header"));
                }
                close |= option.eq_ignore_ascii_case(b"close");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            // S12: only a single 100-continue is understood.
            expect = if expect == Expect::None && value.eq_ignore_ascii_case(b"100-continue") {
                Expect::Continue
            } else {
                Expect::Other
            };
        } else if h.name.eq_ignore_ascii_case("origin")
            || h.name.eq_ignore_ascii_case("sec-fetch-site")
        {
            browser = true; // B1
        } else if (h.name.eq_ignore_ascii_case("x-api-key")
            || h.name.eq_ignore_ascii_case("authorization"))
            && !interpreted(value)
        {
            return Err(Refusal::BadRequest("invalid credential header"));
        }
    }
    // S8: exactly one Host, syntactically valid; its value is never forwarded.
    let host = match (hosts, host) {
        (1, Some(host)) if valid_host(host) => host,
        (0, _) => return Err(Refusal::BadRequest("missing Host header")),
        (1, _) => return Err(Refusal::BadRequest("invalid Host header")),
        _ => return Err(Refusal::BadRequest("more than one Host header")),
    };
    Ok(RequestHead {
        method,
        target,
        path_len,
        headers,
        browser,
        host,
        trace: method == "TRACE",
        close,
        expect,
        framing: request_framing(lengths, length, codings, chunked),
    })
}

/// S9: at most one framing header, each exactly once and exactly valid.
fn request_framing(
    lengths: u32,
    length: Option<u64>,
    codings: u32,
    chunked: bool,
) -> Result<Framing, Refusal> {
    match (lengths, codings) {
        (0, 0) => Ok(Framing::Empty),
        (1, 0) => match length {
            Some(0) => Ok(Framing::Empty),
            Some(n) => Ok(Framing::Length(n)),
            None => Err(Refusal::BadRequest("invalid Content-Length")),
        },
        (0, 1) if chunked => Ok(Framing::Chunked),
        (0, 1) => Err(Refusal::BadRequest("Transfer-Encoding other than chunked")),
        (0, _) => Err(Refusal::BadRequest("more than one Transfer-Encoding")),
        (_, 0) => Err(Refusal::BadRequest("more than one Content-Length")),
        _ => Err(Refusal::BadRequest(
            "both Content-Length and Transfer-Encoding",
        )),
    }
}

/// S1: a request line `METHOD SP TARGET SP HTTP/x.y` with any version but
/// 1.1 is 505; a line without a version token at all is left to httparse (400).
fn check_version(head: &[u8]) -> Result<(), Refusal> {
    let head = head.strip_prefix(b"\r\n").unwrap_or(head);
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let Some(space) = line.iter().rposition(|&b| b == b' ') else {
        return Ok(());
    };
    match &line[space + 1..] {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if (*major, *minor) == (b'1', b'1') {
                Ok(())
            } else {
                Err(Refusal::VersionNotSupported)
            }
        }
        _ => Ok(()),
    }
}

/// S3 and S4: origin-form only, and a path that cannot escape its route after
/// the prefix is swapped (never normalised, refused). Returns the path length.
fn check_target(target: &str) -> Result<usize, Refusal> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Refusal::BadRequest("request target is not origin-form"));
    }
    if bytes.starts_with(b"//") {
        return Err(Refusal::BadRequest("request target starts with //"));
    }
    if bytes
        .iter()
        .any(|&b| !(0x21..=0x7e).contains(&b) || b == b'#')
    {
        return Err(Refusal::BadRequest("invalid byte in request target"));
    }
    let path_len = bytes.iter().position(|&b| b == b'?').unwrap_or(bytes.len());
    let path = &bytes[..path_len];
    if path.contains(&b'\\') {
        return Err(Refusal::BadRequest("backslash in path"));
    }
    let mut rest = path;
    while let Some(i) = rest.iter().position(|&b| b == b'%') {
        let encoded = rest.get(i + 1..i + 3).unwrap_or_default();
        if encoded.len() != 2 || !encoded.iter().all(u8::is_ascii_hexdigit) {
            return Err(Refusal::BadRequest("invalid percent-encoding in path"));
        }
        if encoded.eq_ignore_ascii_case(b"2f") || encoded.eq_ignore_ascii_case(b"5c") {
            return Err(Refusal::BadRequest("encoded slash or backslash in path"));
        }
        rest = &rest[i + 3..];
    }
    for segment in path.split(|&b| b == b'/') {
        // Cut at `;` (path parameters some servers strip) before deciding.
        let segment = segment.split(|&b| b == b';').next().unwrap_or_default();
        if is_dot_segment(segment) {
            return Err(Refusal::BadRequest("dot segment in path"));
        }
    }
    Ok(path_len)
}

/// `.` or `..`, each dot possibly written `%2e`/`%2E`.
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut dots = 0;
    let mut rest = segment;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1..3].eq_ignore_ascii_case(b"2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// S8: `uri-host [":" port]`, host an IP literal in brackets or a reg-name.
fn valid_host(host: &[u8]) -> bool {
    let (name, port) = if host.first() == Some(&b'[') {
        let Some(end) = host.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &host[end + 1..] {
            [] => (&host[..=end], &b""[..]),
            [b':', port @ ..] => (&host[..=end], port),
            _ => return false,
        }
    } else {
        match host.iter().position(|&b| b == b':') {
            Some(i) => (&host[..i], &host[i + 1..]),
            None => (host, &b""[..]),
        }
    };
    let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
    !name.is_empty()
        && (name[0] == b'[' || name.iter().all(|&b| reg_name(b)))
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
}

/// B2: is this `Host` one a sandbox (not a browser after DNS rebinding) sends?
pub(crate) fn host_is_local(host: &[u8], allowed: &[String]) -> bool {
    let name = if host.first() == Some(&b'[') {
        return true; // a bracketed literal, checked by valid_host
    } else {
        host.split(|&b| b == b':').next().unwrap_or_default()
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.eq_ignore_ascii_case("host.docker.internal")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// S9: `1*DIGIT` with checked arithmetic (`str::parse` accepts `+5`).
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Strips leading and trailing SP/HTAB (RFC 9110 §5.5 OWS).
pub(crate) fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// The elements of a comma-separated list, trimmed, empty ones skipped.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

fn httparse_reason(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid version",
    }
}

/// Most interim (1xx) responses accepted before the final one (R1).
pub(crate) const MAX_INTERIM_RESPONSES: usize = 16;

/// A validated upstream response head (R1–R3).
#[derive(Debug)]
pub(crate) struct ResponseHead<'h, 'b> {
    pub(crate) status: u16,
    pub(crate) reason: &'b [u8],
    pub(crate) headers: &'h [httparse::Header<'b>],
    /// The body framing for this response to this request method.
    pub(crate) framing: Framing,
    /// The upstream will close (or must be closed) after this response.
    pub(crate) close: bool,
    /// Validated `Content-Length`, relayed as metadata on bodiless responses.
    pub(crate) length: Option<u64>,
}

/// Parses and validates an upstream response head; any violation is a 502.
pub(crate) fn parse_response<'h, 'b>(
    head: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
    request_was_head: bool,
) -> Result<ResponseHead<'h, 'b>, Refusal> {
    let mut res = httparse::Response::new(&mut []);
    // The default configuration: every leniency off (R3).
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, head, storage)
    {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) | Err(_) => return Err(Refusal::BadGateway("malformed upstream response head")),
    }
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err(Refusal::BadGateway("malformed upstream status line"));
    };
    // R1: three digits 100–599; keyhole never asks for an upgrade.
    if !(100..=599).contains(&status) {
        return Err(Refusal::BadGateway("upstream status out of range"));
    }
    if status == 101 {
        return Err(Refusal::BadGateway("upstream switched protocols"));
    }
    let reason = res.reason.unwrap_or_default().as_bytes();
    let headers: &'h [httparse::Header<'b>] = res.headers;
    let mut close = version == 0;
    let mut lengths = 0;
    let mut length = None;
    let mut codings = 0;
    let mut chunked = false;
    for h in headers {
        // R3: httparse has already refused control bytes, as for requests.
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = parse_length(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= list_items(value).any(|o| o.eq_ignore_ascii_case(b"close"));
        }
    }
    // R2: RFC 9112 §6.3, in order. A proxy that cannot tell where a response
    // ends must not guess, so anything ambiguous is 502 rather than relayed.
    match (lengths, codings) {
        (0 | 1, 0) | (0, 1) => {}
        (_, 0) | (0, _) => return Err(Refusal::BadGateway("duplicate upstream framing header")),
        _ => {
            return Err(Refusal::BadGateway(
                "upstream sent Content-Length and Transfer-Encoding",
            ))
        }
    }
    if lengths == 1 && length.is_none() {
        return Err(Refusal::BadGateway("invalid upstream Content-Length"));
    }
    if codings == 1 && (!chunked || version == 0) {
        return Err(Refusal::BadGateway(
            "upstream Transfer-Encoding other than chunked",
        ));
    }
    let framing = if request_was_head || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(ResponseHead {
        status,
        reason,
        headers,
        framing,
        close,
        length,
    })
}

/// Hop-by-hop and framing fields keyhole never relays from one side to the
/// other (S11, S13): it writes its own framing and connection handling.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "http2-settings",
        "transfer-encoding",
        "content-length",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The header names a message's `Connection` fields nominate as hop-by-hop.
pub(crate) fn nominated<'a>(headers: &'a [httparse::Header<'_>]) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| list_items(h.value))
}

/// Do the `Connection` fields nominate anything besides `keep-alive` (which
/// is stripped anyway)? Most messages carry only `keep-alive`, and then no
/// field needs checking against the nominations one by one.
pub(crate) fn nominates_others(headers: &[httparse::Header<'_>]) -> bool {
    nominated(headers).any(|n| !n.eq_ignore_ascii_case(b"keep-alive"))
}

/// Is `name` in the `Connection` nominations?
pub(crate) fn is_nominated(headers: &[httparse::Header<'_>], name: &str) -> bool {
    nominated(headers).any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Writes the head keyhole sends the client for an upstream response:
/// status line, end-to-end headers byte for byte, its own framing fields.
/// The caller adds its connection field and the final CRLF.
pub(crate) fn write_response_head(out: &mut Vec<u8>, res: &ResponseHead<'_, '_>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(res.status));
    out.push(b' ');
    out.extend_from_slice(res.reason);
    out.extend_from_slice(b"\r\n");
    let nominates = nominates_others(res.headers);
    for h in res.headers {
        if is_hop_by_hop(h.name) || (nominates && is_nominated(res.headers, h.name)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(trim(h.value));
        out.extend_from_slice(b"\r\n");
    }
    match res.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        // A close-delimited body is re-framed as chunked (see `BodyReader::feed`).
        Framing::Chunked | Framing::UntilClose => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        // A bodiless response keeps the length it describes (HEAD, 304).
        Framing::Empty if res.status >= 200 && res.status != 204 => {
            if let Some(n) = res.length {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
        }
        Framing::Empty => {}
    }
}

/// Appends `n` in decimal, without the formatting machinery or an allocation.
pub(crate) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// `n` in decimal ASCII digits, written into `digits`.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(bytes: &[u8]) -> Result<Scan, Refusal> {
        HeadScan::default().scan(bytes, 65536, 100)
    }

    fn parse(bytes: &[u8]) -> Result<(Framing, bool), Refusal> {
        let mut storage = header_array();
        let head = parse_request(bytes, &mut storage)?;
        Ok((head.framing?, head.close))
    }

    #[test]
    fn scan_finds_end_across_splits() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        for split in 0..req.len() {
            let mut scan = HeadScan::default();
            let first = scan.scan(&req[..split], 65536, 100).unwrap();
            let end = match first {
                Scan::Complete(n) => n,
                Scan::Partial => match scan.scan(req, 65536, 100).unwrap() {
                    Scan::Complete(n) => n,
                    Scan::Partial => panic!("split {split}"),
                },
            };
            assert_eq!(end, req.len() - 4);
        }
    }

    #[test]
    fn hop_by_hop_names_in_any_case() {
        for name in [
            "Connection",
            "keep-alive",
            "PROXY-CONNECTION",
            "te",
            "Trailer",
            "upgrade",
            "HTTP2-Settings",
            "transfer-encoding",
            "Content-Length",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "ta",
            "trailers",
            "connectiox",
            "content-type",
            "x",
            "",
            "keep_alive",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn control_bytes_in_values_are_refused() {
        // parse_request and parse_response rely on httparse for this (S6, R3).
        for b in (0u8..0x20).chain([0x7f]).filter(|&b| b != b'\t') {
            let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nX: a".to_vec();
            req.extend_from_slice(&[b, b'b', b'\r', b'\n', b'\r', b'\n']);
            assert!(parse(&req).is_err(), "request with {b:#x}");
            let mut res = b"HTTP/1.1 200 OK\r\nX: a".to_vec();
            res.extend_from_slice(&[b, b'b', b'\r', b'\n', b'\r', b'\n']);
            let mut storage = header_array();
            assert!(
                parse_response(&res, &mut storage, false).is_err(),
                "response with {b:#x}"
            );
        }
    }

    #[test]
    fn word_skip_never_misses_a_line_ending() {
        for b in 0u8..=255 {
            for pos in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[pos] = b;
                let marked = bytes_below_14(u64::from_le_bytes(bytes));
                if b < 14 {
                    assert_eq!(marked.trailing_zeros() / 8, pos as u32, "{b} at {pos}");
                } else {
                    assert_eq!(marked, 0, "{b} at {pos}");
                }
            }
        }
        // Whatever follows the first byte below 14 (more such bytes, bytes
        // with the high bit) never moves the mark.
        for pos in 0..8 {
            for fill in [0u8, 9, 13, 14, 0x7f, 0x80, 0xff] {
                let mut bytes = [fill; 8];
                bytes[..pos].fill(b'x');
                bytes[pos] = b'\r';
                let marked = bytes_below_14(u64::from_le_bytes(bytes));
                assert_eq!(
                    marked.trailing_zeros() / 8,
                    pos as u32,
                    "{fill} after {pos}"
                );
            }
        }
        assert_eq!(bytes_below_14(u64::from_le_bytes(*b"abcdefgh")), 0);
        let long =
            b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: aaaaaaaaaaaaaaaaaa\r\n\r\n";
        assert_eq!(scan_all(long).unwrap(), Scan::Complete(long.len()));
        assert!(
            scan_all(b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\nHost: a\r\n\r\n").is_err()
        );
    }

    #[test]
    fn s5_bare_lf_and_cr_rejected() {
        assert!(scan_all(b"GET / HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(scan_all(b"GET / HTTP/1.1\r\nHost: a\n\r\n").is_err());
        assert!(scan_all(b"GET / HTTP/1.1\rHost: a\r\n\r\n").is_err());
        assert_eq!(scan_all(b"GET / HTTP/1.1\r").unwrap(), Scan::Partial);
    }

    #[test]
    fn s15_limits_enforced_before_completion() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(70_000, b'a');
        assert_eq!(scan_all(&big), Err(Refusal::HeadTooLarge));
        let many = "GET / HTTP/1.1\r\n".to_owned() + &"a: b\r\n".repeat(101);
        assert_eq!(scan_all(many.as_bytes()), Err(Refusal::HeadTooLarge));
        let ok = "GET / HTTP/1.1\r\n".to_owned() + &"a: b\r\n".repeat(100) + "\r\n";
        assert!(matches!(scan_all(ok.as_bytes()), Ok(Scan::Complete(_))));
    }

    #[test]
    fn one_leading_empty_line_tolerated() {
        assert!(matches!(
            scan_all(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Scan::Complete(_))
        ));
        assert!(scan_all(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(parse(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
    }

    #[test]
    fn s1_versions() {
        for v in ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/3.0"] {
            let req = format!("GET / {v}\r\nHost: a\r\n\r\n");
            assert_eq!(
                parse(req.as_bytes()).unwrap_err(),
                Refusal::VersionNotSupported,
                "{v}"
            );
        }
        assert_eq!(
            parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap_err(),
            Refusal::VersionNotSupported
        );
        assert!(matches!(
            parse(b"GET /\r\n\r\n"),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n"),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn s2_s3_s4_targets() {
        for target in [
            "http://a/x",
            "a:443",
            "*",
            "//x",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2E/b",
            "/a/..;x/b",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%zz",
            "/a%2",
            "/..",
            "/a#f",
        ] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(
                matches!(parse(req.as_bytes()), Err(Refusal::BadRequest(_))),
                "{target}"
            );
        }
        for target in [
            "/",
            "/a/b?x=../..",
            "/a/.well-known",
            "/a/...",
            "/a%20b",
            "/v1/messages?beta=true",
        ] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(parse(req.as_bytes()).is_ok(), "{target}");
        }
        assert!(parse(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(parse(b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(parse(b"GE(T / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
    }

    #[test]
    fn s6_s7_fields() {
        for req in [
            &b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX_Y: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX\x01: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: clo\xffse\r\n\r\n",
        ] {
            assert!(parse(req).is_err(), "{}", String::from_utf8_lossy(req));
        }
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n").is_ok());
    }

    #[test]
    fn s8_host() {
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a:x\r\n\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").is_ok());
        assert!(host_is_local(b"127.0.0.1:8080", &[]));
        assert!(host_is_local(b"LOCALHOST", &[]));
        assert!(host_is_local(b"host.docker.internal:1", &[]));
        assert!(!host_is_local(b"evil.example", &[]));
        assert!(host_is_local(b"proxy.internal", &["proxy.internal".into()]));
    }

    #[test]
    fn s9_framing() {
        let f = |h: &str| parse(format!("POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n").as_bytes());
        assert_eq!(f("Content-Length: 5\r\n").unwrap().0, Framing::Length(5));
        assert_eq!(f("Content-Length: 0\r\n").unwrap().0, Framing::Empty);
        assert_eq!(
            f("Transfer-Encoding: Chunked\r\n").unwrap().0,
            Framing::Chunked
        );
        assert_eq!(f("").unwrap().0, Framing::Empty);
        for bad in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: -5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: 5 5\r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: \r\n",
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
        ] {
            assert!(matches!(f(bad), Err(Refusal::BadRequest(_))), "{bad}");
        }
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_length(b"18446744073709551616"), None);
    }

    #[test]
    fn connection_and_expect() {
        let mut storage = header_array();
        let head = parse_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\nExpect: 100-Continue\r\n\r\n",
            &mut storage,
        )
        .unwrap();
        assert!(head.close);
        assert_eq!(head.expect, Expect::Continue);
        let mut storage = header_array();
        let head = parse_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nExpect: foo\r\n\r\n",
            &mut storage,
        )
        .unwrap();
        assert_eq!(head.expect, Expect::Other);
    }

    fn response(bytes: &[u8], head: bool) -> Result<(u16, Framing, bool), Refusal> {
        let mut storage = header_array();
        let r = parse_response(bytes, &mut storage, head)?;
        Ok((r.status, r.framing, r.close))
    }

    #[test]
    fn r1_r2_response_framing() {
        assert_eq!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).unwrap(),
            (200, Framing::Length(3), false)
        );
        assert_eq!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true)
                .unwrap()
                .1,
            Framing::Empty
        );
        assert_eq!(
            response(b"HTTP/1.1 204 No\r\n\r\n", false).unwrap().1,
            Framing::Empty
        );
        assert_eq!(
            response(b"HTTP/1.1 304 NM\r\n\r\n", false).unwrap().1,
            Framing::Empty
        );
        assert_eq!(
            response(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap(),
            (200, Framing::UntilClose, true)
        );
        assert_eq!(
            response(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .unwrap()
            .1,
            Framing::Chunked
        );
        assert!(
            response(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
                .unwrap()
                .2
        );
        for bad in [
            &b"HTTP/1.1 101 Switching\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 600 Nope\r\n\r\n",
            b"HTTP/1.1 20 Nope\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
        ] {
            assert!(
                response(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn response_head_rewrite_drops_hop_by_hop() {
        let mut storage = header_array();
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nContent-Type: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            &mut storage,
            false,
        )
        .unwrap();
        let mut out = Vec::new();
        write_response_head(&mut out, &r);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: a\r\ntransfer-encoding: chunked\r\n"
        );
    }
}
