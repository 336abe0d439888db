//! Request and response heads: httparse tokenizes, this file decides.
//!
//! httparse is lenient on purpose (bare LF, leading blank lines, any target
//! form, `+5` lengths never reach it but would reach `str::parse`). Every
//! check that can be made from the head bytes alone is made here, each
//! citing the section of RFC 9112 or RFC 9110 it rests on, or saying why
//! keyhole is stricter than the RFC.
//! Pure functions over bytes: no IO, no clocks.

use std::mem::MaybeUninit;

use crate::config::{is_control, is_tchar, is_token, HEADER_ARRAY_LEN};
use crate::error::Refusal;

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Public only for the fuzz targets, through `fuzzing::BodyFraming`.
#[cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub))]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Response only: the body runs until the upstream closes.
    UntilClose,
}

/// Which peer a head comes from: it starts with a request line or a status
/// line, and what is wrong with it is the client's fault (4xx, 505) or the
/// upstream's (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Request,
    Response,
}

/// Where a head ends, found incrementally so that bytes are scanned once
/// however the head is split across reads; and where it goes wrong: at the
/// first byte that no valid head could go on with, not when it ends (a bad
/// head may never end, and waiting for it only helps a slow attacker).
#[derive(Debug, Clone, Default)]
pub(crate) struct HeadScan {
    /// The part each line starts in: a response's lines are only checked
    /// for control bytes.
    fresh: Part,
    pos: usize,
    part: Part,
    /// Complete lines so far, the empty line before a request line aside.
    lines: usize,
    leading_empty_line: bool,
}

/// Where in its line the next byte of a head falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Part {
    /// No byte of this line yet.
    #[default]
    LineStart,
    /// A request line: its method, then its target (`TargetStart`: none of
    /// it yet), then the first `n` bytes of its version.
    Method,
    TargetStart,
    Target,
    Version(u8),
    /// A request's field name, before its colon.
    Name,
    /// Where only control bytes are refused: a request's field value, a
    /// response's lines (the rest is left to httparse, 502 either way).
    Value,
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
    pub(crate) fn new(side: Side) -> HeadScan {
        let fresh = match side {
            Side::Request => Part::LineStart,
            Side::Response => Part::Value,
        };
        HeadScan {
            fresh,
            part: fresh,
            ..HeadScan::default()
        }
    }

    /// Scans `buf` (the bytes of one head, from its first byte; earlier calls
    /// saw a prefix of it) from where the last call stopped. The head may be
    /// `max_bytes` long, an empty line before it included, and hold
    /// `max_lines` field lines; one byte or line more is refused as soon as
    /// it is there, before the head ends.
    pub(crate) fn scan(
        &mut self,
        buf: &[u8],
        max_bytes: usize,
        max_lines: usize,
    ) -> Result<Scan, Refusal> {
        // Nothing past the limit is looked at: a head that has not ended
        // within its first `max_bytes` bytes is too large, however it goes on.
        let head = &buf[..buf.len().min(max_bytes)];
        let mut i = self.pos;
        while i < head.len() {
            // Most bytes leave their part as it is, and are skipped in runs;
            // the others go one by one (`next`), which says what is wrong.
            let rest = &head[i..];
            i += match self.part {
                Part::Value => first_control(rest),
                Part::Method | Part::Name => rest.iter().take_while(|&&b| is_tchar(b)).count(),
                Part::Target => rest.iter().take_while(|b| b.is_ascii_graphic()).count(),
                _ => 0,
            };
            let Some(&b) = head.get(i) else { break };
            match b {
                // A line ending: taken as a pair, so any LF met on its own is bare.
                b'\r' => {
                    if !matches!(self.part, Part::LineStart | Part::Value) {
                        line_end(self.part, &head[..i])?;
                    }
                    let empty = i == 0 || head[..i].ends_with(b"\r\n");
                    match head.get(i + 1) {
                        None => break,
                        Some(b'\n') => i += 2,
                        // RFC 9112 §2.2: a bare CR is invalid, and some read it as a line end.
                        Some(_) => return Err(Refusal::BadRequest("bare CR in head")),
                    }
                    if !empty {
                        self.lines += 1;
                        // The first line plus `max_lines` field lines.
                        if self.lines > max_lines.saturating_add(1) {
                            return Err(Refusal::HeadTooLarge);
                        }
                    } else if self.lines > 0 {
                        return Ok(Scan::Complete(i));
                    } else if std::mem::replace(&mut self.leading_empty_line, true) {
                        // RFC 9112 §2.2 tolerates an empty line before the request line
                        // (a client's stray CRLF after a body); more is noise.
                        return Err(Refusal::BadRequest("empty lines before request line"));
                    }
                    self.part = self.fresh;
                }
                // RFC 9112 §2.2: a bare LF is a line ending httparse accepts and others may not.
                b'\n' => return Err(Refusal::BadRequest("bare LF in head")),
                b => {
                    self.part = self.next(b)?;
                    i += 1;
                }
            }
        }
        self.pos = i;
        if buf.len() > max_bytes {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(Scan::Partial)
    }

    /// Where in its line the scan is after byte `b` (neither CR nor LF), or
    /// why no valid head goes on this way.
    fn next(&self, b: u8) -> Result<Part, Refusal> {
        match self.part {
            // RFC 9110 §5.5: a field value is HTAB, SP, VCHAR and obs-text;
            // so is a status line (RFC 9112 §4).
            Part::Value if b == b'\t' || (b >= b' ' && b != 0x7f) => Ok(Part::Value),
            Part::Value => Err(Refusal::BadRequest("control byte in head")),
            Part::LineStart if self.lines == 0 => request_line(Part::LineStart, b),
            // RFC 9112 §5.1: a field name is a token (RFC 9110 §5.6.2) and
            // the colon follows it at once.
            Part::LineStart | Part::Name if is_tchar(b) => Ok(Part::Name),
            Part::Name if b == b':' => Ok(Part::Value),
            Part::LineStart | Part::Name => Err(Refusal::BadRequest(match (self.part, b) {
                // RFC 9112 §5.2: obs-fold, which some join to the last value.
                (Part::LineStart, b' ' | b'\t') => "obs-fold in head",
                // RFC 9112 §5.1: some would strip it, and read another name.
                (_, b' ' | b'\t') => "whitespace before colon",
                _ => "invalid field name",
            })),
            part => request_line(part, b),
        }
    }
}

/// One byte of a request line (RFC 9112 §3): a method token (RFC 9110
/// §5.6.2), SP, a target of visible ASCII (RFC 9112 §3.2; keyhole takes no
/// other byte there), SP, `HTTP/` DIGIT "." DIGIT (RFC 9112 §2.3). The scan
/// runs it as bytes arrive and `parse_request` over the whole line, so a
/// head gets the same answer however it was split.
fn request_line(part: Part, b: u8) -> Result<Part, Refusal> {
    match (part, b) {
        (Part::LineStart | Part::Method, _) if is_tchar(b) => Ok(Part::Method),
        (Part::Method, b' ') => Ok(Part::TargetStart),
        (Part::TargetStart | Part::Target, b'!'..=b'~') => Ok(Part::Target),
        (Part::Target, b' ') => Ok(Part::Version(0)),
        (Part::Version(n @ (5 | 7)), b'0'..=b'9') => Ok(Part::Version(n + 1)),
        (Part::Version(n @ 0..=6), _) if b"HTTP/0."[usize::from(n)] == b => {
            Ok(Part::Version(n + 1))
        }
        _ => Err(Refusal::BadRequest("malformed request line")),
    }
}

/// A request line or a field name ends (`line`: up to its CR). A request
/// line's version is decided first, HTTP/1.1 only (RFC 9110 §15.6.6; 1.0
/// too is refused, for the smallest surface); a line that is not `method SP
/// target SP HTTP/d.d` is malformed.
fn line_end(part: Part, line: &[u8]) -> Result<(), Refusal> {
    match part {
        Part::Name => Err(Refusal::BadRequest("field line without a colon")),
        Part::Version(8) if line.ends_with(b"1.1") => Ok(()),
        Part::Version(8) => Err(Refusal::VersionNotSupported),
        _ => Err(Refusal::BadRequest("malformed request line")),
    }
}

/// Where the first control byte of `bytes` is (its length if none): eight
/// bytes at a time, as most are visible, then byte by byte from the first
/// eight that hold one.
fn first_control(bytes: &[u8]) -> usize {
    let words = bytes.chunks_exact(8).flat_map(<[u8; 8]>::try_from);
    let clean = words.take_while(|&w| controls(u64::from_le_bytes(w)) == 0);
    let start = 8 * clean.count();
    let rest = bytes[start..].iter();
    start + rest.take_while(|&&b| !is_control(b)).count()
}

/// The high bit of each of the eight bytes that may be a control byte (below
/// 0x20, so CR and LF too, or DEL). The lowest marked byte is exactly the
/// first control byte: in each half a borrow only runs upwards from a byte
/// that was one, so no byte below the first is ever marked.
fn controls(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let del = word ^ (ONES * 0x7f);
    (below_space | (del.wrapping_sub(ONES) & !del)) & HIGHS
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
    /// What the later steps act on, in the order they are checked.
    pub(crate) browser: bool,
    pub(crate) host: &'b [u8],
    pub(crate) trace: bool,
    pub(crate) close: bool,
    pub(crate) expect: Expect,
    /// Body framing, or the reason it is refused (answered after routing).
    pub(crate) framing: Result<Framing, Refusal>,
}

/// What the client's `Expect` asked for (RFC 9110 §10.1.1).
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

/// Fresh room for httparse's headers, left uninitialised: filling 256 empty
/// headers (8 KiB) twice per request cost more than parsing the heads.
pub(crate) fn header_array<'b>() -> [MaybeUninit<httparse::Header<'b>>; HEADER_ARRAY_LEN] {
    [const { MaybeUninit::uninit() }; HEADER_ARRAY_LEN]
}

/// Parses and validates a complete request head (as found by `HeadScan`).
pub(crate) fn parse_request<'h, 'b>(
    head: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<RequestHead<'h, 'b>, Refusal> {
    // The request line by the scan's own rules (the version first, 505),
    // so a head gets the same answer whichever of the two refuses it.
    let line = head.strip_prefix(b"\r\n").unwrap_or(head);
    let line = &line[..line.iter().position(|&b| b == b'\r').unwrap_or(line.len())];
    let part = line
        .iter()
        .try_fold(Part::LineStart, |part, &b| request_line(part, b))?;
    line_end(part, line)?;
    let mut req = httparse::Request::new(&mut []);
    // RFC 9112 §5: httparse's own errors are final; no lenient retry. What
    // it refuses (obs-fold, whitespace before the colon, bad tokens, control
    // bytes) `HeadScan` has refused already, with its own reason, in every
    // head it found the end of: only a head that was not scanned gets here.
    match req.parse_with_uninit_headers(head, storage) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Ok(_) | Err(_) => return Err(Refusal::BadRequest("malformed request head")),
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Refusal::VersionNotSupported);
    };
    // RFC 9110 §9.3.6: a tunnel would carry anything past keyhole's checks.
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
    let mut facts = Facts::default();
    for h in headers {
        // `_` is a token character (RFC 9110 §5.6.2), but CGI-style servers
        // read it as `-`: `X_Api_Key` would reach them as `X-Api-Key`.
        if h.name.as_bytes().contains(&b'_') {
            return Err(Refusal::BadRequest("underscore in header name"));
        }
        // RFC 9110 §5.5: httparse has already refused every control byte but
        // HTAB in a value (see the test `control_bytes_in_values_are_refused`).
        let value = trim(h.value);
        if facts.note(h.name, value) {
            continue;
        }
        // obs-text (RFC 9110 §5.5) is relayed as it is where keyhole does not
        // look, and refused where it does (`is_ascii` below): it means
        // nothing defined there.
        let is = |name: &str| h.name.eq_ignore_ascii_case(name);
        if is("host") {
            hosts += 1;
            host = Some(value);
        } else if is("connection") {
            // RFC 9110 §7.6.1: a list of tokens.
            if !value.is_ascii() || !list_items(value).all(is_token) {
                return Err(Refusal::BadRequest("invalid Connection header"));
            }
            close |= list_items(value).any(|o| o.eq_ignore_ascii_case(b"close"));
        } else if is("expect") {
            // RFC 9110 §10.1.1: only a single 100-continue is understood.
            expect = if expect == Expect::None && value.eq_ignore_ascii_case(b"100-continue") {
                Expect::Continue
            } else {
                Expect::Other
            };
        } else if is("origin") || is("sec-fetch-site") {
            // Sent by browsers only: a web page is trying to use the key.
            browser = true;
        } else if (is("x-api-key") || is("authorization")) && !value.is_ascii() {
            return Err(Refusal::BadRequest("invalid credential header"));
        }
    }
    // RFC 9112 §3.2: exactly one Host, syntactically valid (a MUST); its
    // value is never forwarded.
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
        framing: body_framing(Side::Request, &facts),
    })
}

/// What a head says about its body, collected field by field.
#[derive(Debug, Default)]
struct Facts {
    lengths: u32,
    /// The last Content-Length, if it was `1*DIGIT` and fits in a u64.
    length: Option<u64>,
    codings: u32,
    /// The last Transfer-Encoding was exactly `chunked`.
    chunked: bool,
    /// An HTTP/1.0 message, which has no transfer codings (RFC 9112 §6.1).
    http10: bool,
    /// A response without a body whatever its fields say (RFC 9112 §6.3
    /// rule 1: to HEAD, 1xx, 204, 304).
    bodiless: bool,
}

impl Facts {
    /// Notes `name: value` if it is a framing field; false for any other.
    fn note(&mut self, name: &str, value: &[u8]) -> bool {
        if name.eq_ignore_ascii_case("content-length") {
            self.lengths = self.lengths.saturating_add(1);
            self.length = parse_length(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.codings = self.codings.saturating_add(1);
            self.chunked = value.eq_ignore_ascii_case(b"chunked");
        } else {
            return false;
        }
        true
    }
}

/// Where a message body ends (RFC 9112 §6.1, §6.3), for requests and
/// responses alike: request smuggling lives between two readings of this,
/// so keyhole has one. Whatever two parsers could read two ways is refused
/// (400 from a client, 502 from an upstream), never guessed at, even where
/// the message has no body (so a HEAD does not change the verdict): both
/// framing fields, either one twice (equal or not), a length that is not
/// one `1*DIGIT`, a coding other than exactly `chunked` (keyhole knows no
/// other), any coding in HTTP/1.0.
fn body_framing(side: Side, f: &Facts) -> Result<Framing, Refusal> {
    let why = match (f.lengths, f.codings, f.length) {
        (1, 0, None) => "invalid Content-Length",
        (0, 1, _) if !f.chunked || f.http10 => "Transfer-Encoding other than chunked",
        (2.., 0, _) => "more than one Content-Length",
        (0, 2.., _) => "more than one Transfer-Encoding",
        (1.., 1.., _) => "both Content-Length and Transfer-Encoding",
        _ if f.bodiless => return Ok(Framing::Empty),
        (0, 1, _) => return Ok(Framing::Chunked),
        (_, _, Some(0)) => return Ok(Framing::Empty),
        (_, _, Some(n)) => return Ok(Framing::Length(n)),
        // Neither field: a request has no body, a response runs to the close.
        _ if side == Side::Request => return Ok(Framing::Empty),
        _ => return Ok(Framing::UntilClose),
    };
    Err(match side {
        Side::Request => Refusal::BadRequest(why),
        Side::Response => Refusal::BadGateway(why),
    })
}

/// RFC 9112 §3.2.1: origin-form only (the other forms name a host or no
/// resource), and a path that cannot escape its route once the prefix is
/// swapped: dot segments (RFC 3986 §5.2.4) and encoded or back slashes,
/// which servers decode differently, are refused, never normalised.
/// Returns the path length.
fn check_target(target: &str) -> Result<usize, Refusal> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Refusal::BadRequest("request target is not origin-form"));
    }
    if bytes.starts_with(b"//") {
        return Err(Refusal::BadRequest("request target starts with //"));
    }
    // Visible ASCII only, as `request_line` has made sure; and no
    // fragment, for which origin-form has no room (RFC 9112 §3.2.1).
    if bytes.contains(&b'#') {
        return Err(Refusal::BadRequest("fragment in request target"));
    }
    let path_len = bytes.iter().position(|&b| b == b'?').unwrap_or(bytes.len());
    let path = &bytes[..path_len];
    if path.contains(&b'\\') {
        return Err(Refusal::BadRequest("backslash in path"));
    }
    for i in (0..path.len()).filter(|&i| path[i] == b'%') {
        let encoded = path.get(i + 1..i + 3).unwrap_or_default();
        if encoded.len() != 2 || !encoded.iter().all(u8::is_ascii_hexdigit) {
            return Err(Refusal::BadRequest("invalid percent-encoding in path"));
        }
        if encoded.eq_ignore_ascii_case(b"2f") || encoded.eq_ignore_ascii_case(b"5c") {
            return Err(Refusal::BadRequest("encoded slash or backslash in path"));
        }
    }
    if path.split(|&b| b == b'/').any(is_dot_segment) {
        return Err(Refusal::BadRequest("dot segment in path"));
    }
    Ok(path_len)
}

/// `.` or `..`, each dot possibly written `%2e`/`%2E`, once cut at `;`
/// (path parameters, which some servers strip before deciding).
fn is_dot_segment(segment: &[u8]) -> bool {
    const DOTS: [&[u8]; 6] = [b".", b"..", b"%2e", b".%2e", b"%2e.", b"%2e%2e"];
    let segment = segment.split(|&b| b == b';').next().unwrap_or_default();
    DOTS.iter().any(|dots| segment.eq_ignore_ascii_case(dots))
}

/// RFC 9110 §7.2: `uri-host [":" port]`, host an IP literal in brackets or
/// a reg-name (RFC 3986 §3.2.2).
fn valid_host(host: &[u8]) -> bool {
    // An IP literal ends at its bracket (an unclosed one is no name), a
    // reg-name at the port's colon.
    let name_len = match host.first() {
        Some(b'[') => host.iter().position(|&b| b == b']').map(|end| end + 1),
        _ => host.iter().position(|&b| b == b':'),
    };
    let (name, port) = host.split_at(name_len.unwrap_or(host.len()));
    let port = match port {
        [b':', port @ ..] => port,
        [] => port,
        _ => return false,
    };
    let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
    let literal = |b: &u8| b.is_ascii_hexdigit() || b":.".contains(b);
    let name_ok = match name {
        [b'[', inner @ .., b']'] => !inner.is_empty() && inner.iter().all(literal),
        _ => !name.is_empty() && name.iter().all(reg_name),
    };
    name_ok && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// Is this `Host` one a sandbox sends? DNS rebinding, a browser's way to
/// reach loopback, needs a domain name that is not in this list.
pub(crate) fn host_is_local(host: &[u8], allowed: &[String]) -> bool {
    let name = host.split(|&b| b == b':').next().unwrap_or_default();
    // A bracketed literal (checked by `valid_host`) is an IP address.
    host.starts_with(b"[")
        || std::str::from_utf8(name).is_ok_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
        || name.eq_ignore_ascii_case(b"localhost")
        || name.eq_ignore_ascii_case(b"host.docker.internal")
        || allowed
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
}

/// RFC 9110 §8.6: `1*DIGIT`, checked first (`str::parse` accepts `+5`), that
/// fits in a u64.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Strips leading and trailing SP/HTAB (RFC 9110 §5.5 OWS).
pub(crate) fn trim(value: &[u8]) -> &[u8] {
    let text = |b: &u8| *b != b' ' && *b != b'\t';
    let start = value.iter().position(text).unwrap_or(value.len());
    let end = value.iter().rposition(text).map_or(start, |i| i + 1);
    &value[start..end]
}

/// The elements of a comma-separated list, trimmed, empty ones skipped.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|item| !item.is_empty())
}

/// Most interim (1xx) responses accepted before the final one: RFC 9110
/// §15.2 sets no bound, and an upstream could otherwise stall a request.
pub(crate) const MAX_INTERIM_RESPONSES: usize = 16;

/// A validated upstream response head.
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
    // The default configuration: every leniency off (RFC 9112 §5).
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, head, storage)
    {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) | Err(_) => return Err(Refusal::BadGateway("malformed upstream response head")),
    }
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err(Refusal::BadGateway("malformed upstream status line"));
    };
    // RFC 9110 §15: three digits 100–599. A 101 would switch to a protocol
    // keyhole cannot check, and it never asks for one (RFC 9110 §7.8).
    if !(100..=599).contains(&status) {
        return Err(Refusal::BadGateway("upstream status out of range"));
    }
    if status == 101 {
        return Err(Refusal::BadGateway("upstream switched protocols"));
    }
    let headers: &'h [httparse::Header<'b>] = res.headers;
    // HTTP/1.0 closes unless told otherwise, and keyhole never asks.
    let mut close = version == 0;
    let mut facts = Facts {
        http10: version == 0,
        bodiless: request_was_head || status < 200 || status == 204 || status == 304,
        ..Facts::default()
    };
    for h in headers {
        // RFC 9110 §5.5: httparse has already refused control bytes, as for requests.
        let value = trim(h.value);
        if !facts.note(h.name, value) && h.name.eq_ignore_ascii_case("connection") {
            close |= list_items(value).any(|o| o.eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = body_framing(Side::Response, &facts)?;
    Ok(ResponseHead {
        status,
        reason: res.reason.unwrap_or_default().as_bytes(),
        headers,
        framing,
        close: close || framing == Framing::UntilClose,
        length: facts.length,
    })
}

/// Hop-by-hop (RFC 9110 §7.6.1) and framing fields keyhole never relays from
/// one side to the other: it writes its own framing and connection handling,
/// and never upgrades (RFC 9110 §7.8).
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
        // keyhole's own `keyhole-error` marks only its own answers.
        let own = h.name.eq_ignore_ascii_case("keyhole-error");
        if !(own || is_hop_by_hop(h.name) || (nominates && is_nominated(res.headers, h.name))) {
            push_field(out, h.name.as_bytes(), trim(h.value));
        }
    }
    // A bodiless response keeps the length it describes (HEAD, 304).
    let keeps_length = res.status >= 200 && res.status != 204;
    push_framing(out, res.framing, res.length.filter(|_| keeps_length));
}

/// Appends `n` in decimal: on every head, where `write!` and its
/// formatting machinery cost ten times as much.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends the field line `name: value` and its CRLF.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

/// Appends keyhole's own framing field for a body: requests and responses
/// alike, never the peer's. `bodiless_length` is the `Content-Length` a
/// message without a body keeps.
pub(crate) fn push_framing(out: &mut Vec<u8>, framing: Framing, bodiless_length: Option<u64>) {
    match (framing, bodiless_length) {
        (Framing::Length(n), _) | (Framing::Empty, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        // A close-delimited body is re-framed as chunked (see `Reframer::feed`).
        (Framing::Chunked | Framing::UntilClose, _) => {
            push_field(out, b"transfer-encoding", b"chunked");
        }
        (Framing::Empty, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(bytes: &[u8]) -> Result<Scan, Refusal> {
        request_scan().scan(bytes, 65536, 100)
    }

    fn parse(bytes: &[u8]) -> Result<(Framing, bool), Refusal> {
        let mut storage = header_array();
        let head = parse_request(bytes, &mut storage)?;
        Ok((head.framing?, head.close))
    }

    fn request_scan() -> HeadScan {
        HeadScan::new(Side::Request)
    }

    /// Scans `bytes` one byte more at a time, as trickled by a peer.
    fn trickle(
        side: Side,
        bytes: &[u8],
        max_bytes: usize,
        max_lines: usize,
    ) -> Result<Scan, Refusal> {
        let mut scan = HeadScan::new(side);
        for end in 1..bytes.len() {
            let got = scan.scan(&bytes[..end], max_bytes, max_lines);
            if got != Ok(Scan::Partial) {
                return got;
            }
        }
        scan.scan(bytes, max_bytes, max_lines)
    }

    fn scan_trickled(bytes: &[u8], max_bytes: usize, max_lines: usize) -> Result<Scan, Refusal> {
        trickle(Side::Request, bytes, max_bytes, max_lines)
    }

    /// A GET head of exactly `len` bytes (a leading CRLF included if
    /// `leading`), padded in one header value.
    fn head_of(len: usize, leading: bool) -> Vec<u8> {
        let mut head = if leading {
            b"\r\n".to_vec()
        } else {
            Vec::new()
        };
        head.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nX: ");
        head.resize(len - 4, b'p');
        head.extend_from_slice(b"\r\n\r\n");
        head
    }

    #[test]
    fn head_of_exactly_max_bytes_accepted_one_more_431() {
        for n in [40, 41, 64, 100, 1000, 65536] {
            for leading in [false, true] {
                let head = head_of(n, leading);
                let mut more = head.clone();
                more.extend_from_slice(b"NEXT");
                for bytes in [&head, &more] {
                    assert_eq!(request_scan().scan(bytes, n, 100), Ok(Scan::Complete(n)));
                    assert_eq!(scan_trickled(bytes, n, 100), Ok(Scan::Complete(n)));
                }
                assert!(parse(&head).is_ok());
                // One byte more (the last is the LF that ends the head).
                let over = head_of(n + 1, leading);
                for bytes in [&head, &over] {
                    let max = bytes.len() - 1;
                    assert_eq!(
                        request_scan().scan(bytes, max, 100),
                        Err(Refusal::HeadTooLarge)
                    );
                    assert_eq!(scan_trickled(bytes, max, 100), Err(Refusal::HeadTooLarge));
                }
                // The head's last CR fits, its LF does not.
                assert_eq!(
                    request_scan().scan(&head[..n - 1], n - 1, 100),
                    Ok(Scan::Partial)
                );
            }
        }
    }

    #[test]
    fn configured_limits_are_total() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let line_only = b"GET / HTTP/1.1\r\n\r\n";
        for max_lines in [0, usize::MAX] {
            assert_eq!(
                request_scan().scan(head, usize::MAX, max_lines),
                if max_lines == 0 {
                    Err(Refusal::HeadTooLarge)
                } else {
                    Ok(Scan::Complete(head.len()))
                }
            );
            assert_eq!(
                scan_trickled(line_only, usize::MAX, max_lines),
                Ok(Scan::Complete(line_only.len()))
            );
            assert_eq!(
                request_scan().scan(head, 0, max_lines),
                Err(Refusal::HeadTooLarge)
            );
            assert_eq!(
                scan_trickled(head, 0, max_lines),
                Err(Refusal::HeadTooLarge)
            );
            assert_eq!(request_scan().scan(b"", 0, max_lines), Ok(Scan::Partial));
        }
        assert_eq!(
            scan_trickled(head, usize::MAX, usize::MAX),
            Ok(Scan::Complete(head.len()))
        );
    }

    #[test]
    fn early_refusal_before_the_head_ends() {
        for (start, status) in [
            (
                &b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n"[..],
                400,
            ),
            (b"G\x01T / HTTP/1.1\r\n", 400),
            (b"G\x01", 400),
            (b"GE(T", 400),
            (b"GET / HTTP/1.0\r\n", 505),
            (b"GET / HTTP/2.0\r\n", 505),
            (b"PRI * HTTP/2.0\r\n", 505),
            (b"GET / HTTP/1.1x", 400),
            (b"GET / HTTPS", 400),
            (b"GET  /", 400),
            (b"GET / \r", 400),
            (b" GET", 400),
            (b"GET /\x7f", 400),
            (b"GET /caf\xc3\xa9 ", 400),
            (b"GET /\r\n", 400),
            (b"\r\n\x01", 400),
            (b"GET / HTTP/1.1\r\n folded", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\tfolded", 400),
            (b"GET / HTTP/1.1\r\nHost : a", 400),
            (b"GET / HTTP/1.1\r\nHost\t: a", 400),
            (b"GET / HTTP/1.1\r\n: a", 400),
            (b"GET / HTTP/1.1\r\nHo(st: a", 400),
            (b"GET / HTTP/1.1\r\nHost\r\n", 400),
            (b"GET / HTTP/1.1\r\nX: a\x00", 400),
            (b"GET / HTTP/1.1\r\nX: abcdefghijklmnop\x1bqrstuvwxyz", 400),
            (b"GET / HTTP/1.1\r\nX: abcdefghijklmnopqrstuvwxyz\x7f", 400),
            (b"GET / HTTP/1.1\r\nX: a\x0b", 400),
        ] {
            let whole = request_scan().scan(start, 65536, 100);
            let trickled = scan_trickled(start, 65536, 100);
            for got in [whole, trickled] {
                assert_eq!(
                    got.map_err(Refusal::status),
                    Err(status),
                    "{}",
                    String::from_utf8_lossy(start)
                );
            }
        }
        for partial in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\t ok"[..],
            b"\r\nGET / HTTP/1.",
            b"GET /a?b=c HTTP/1.1\r\nX-Y:",
            b"OPTIONS * HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nX:\r\n",
        ] {
            assert_eq!(scan_trickled(partial, 65536, 100), Ok(Scan::Partial));
        }
    }

    #[test]
    fn trickled_heads_are_scanned_once() {
        // 60,000 bytes one at a time in a target, a name and a value: a scan
        // that went back to the start of its line would take minutes here.
        let long = "a".repeat(60_000);
        for head in [
            format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nX-{long}: a\r\nHost: a\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nX: {long}\r\nHost: a\r\n\r\n"),
        ] {
            let head = head.as_bytes();
            assert_eq!(
                scan_trickled(head, 65536, 100),
                Ok(Scan::Complete(head.len()))
            );
            assert!(parse(head).is_ok());
        }
    }

    /// Heads the parser accepts, in many shapes.
    const VALID_HEADS: [&[u8]; 10] = [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: localhost:8080\r\nContent-Type: application/json\r\nContent-Length: 12\r\nX-Tab:\ta\tb\t\r\nAccept: */*\r\n\r\n",
        b"PUT /a%20b HTTP/1.1\r\nhost: [::1]:80\r\nTransfer-Encoding: chunked\r\nX-Obs: caf\xc3\xa9 \xff\r\nX-Empty:\r\nX-Spaces:    \r\n\r\n",
        b"M-SEARCH! /~user/x.y HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\nExpect: 100-continue\r\n\r\n",
        b"GET /a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/v/w/x/y/z?q=1&r=2 HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\nAccept-Language: en-US,en;q=0.9\r\nCookie: a=b; c=d; e=\"quoted value\"\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: a\r\nX: !#$%&'*+-.^_`|~ \"(),/:;<=>?@[\\]{}\r\n\r\n",
        b"DELETE /x HTTP/1.1\r\nHost: host.docker.internal\r\nAuthorization: Bearer abc.def-ghi\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nA:b\r\nB: c\r\nC:  d  \r\n\r\n",
        b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
    ];

    #[test]
    fn early_checks_never_refuse_what_the_parser_accepts() {
        // Every valid head, trickled: the scan finds its end, the parser accepts it.
        for head in VALID_HEADS {
            assert!(parse(head).is_ok(), "{}", String::from_utf8_lossy(head));
            assert_eq!(
                scan_trickled(head, 65536, 100),
                Ok(Scan::Complete(head.len()))
            );
        }
        // Each valid head with one byte replaced or inserted (never a CR or
        // LF, so the lines stay where they were): whatever the scan refuses,
        // early or not, the parser refuses with the same status.
        let bytes = [
            0u8, 1, b'\t', 0x0b, 0x1f, b' ', b'"', b'(', b':', b';', b'_', b'A', b'/', b'.', b'H',
            b'0', b'1', b'2', b'%', b'#', b'?', 0x7f, 0x80, 0xff,
        ];
        let mut refused = 0;
        for head in VALID_HEADS {
            for at in 0..head.len() - 2 {
                for &b in &bytes {
                    let mut replaced = head.to_vec();
                    if replaced[at] == b'\r' || replaced[at] == b'\n' {
                        continue;
                    }
                    replaced[at] = b;
                    let mut inserted = head.to_vec();
                    inserted.insert(at, b);
                    for case in [replaced, inserted] {
                        let scanned = scan_trickled(&case, 65536, 100);
                        assert_eq!(
                            scanned,
                            request_scan().scan(&case, 65536, 100),
                            "{}",
                            String::from_utf8_lossy(&case)
                        );
                        match scanned {
                            Ok(Scan::Complete(n)) => assert_eq!(n, case.len()),
                            Ok(Scan::Partial) => panic!("{}", String::from_utf8_lossy(&case)),
                            Err(refusal) => {
                                refused += 1;
                                // The parser's own verdict, framing (answered after routing) aside.
                                let mut storage = header_array();
                                assert_eq!(
                                    parse_request(&case, &mut storage)
                                        .map(|_| ())
                                        .map_err(Refusal::status),
                                    Err(refusal.status()),
                                    "{}",
                                    String::from_utf8_lossy(&case)
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(refused > 1000, "{refused}");
    }

    #[test]
    fn scan_finds_end_across_splits() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        for split in 0..req.len() {
            let mut scan = request_scan();
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
        // RFC 9110 §5.5: the scan refuses them as they arrive, and
        // parse_request and parse_response rely on httparse for this.
        for b in (0u8..0x20).chain([0x7f]).filter(|&b| b != b'\t') {
            let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nX: a".to_vec();
            req.extend_from_slice(&[b, b'b', b'\r', b'\n', b'\r', b'\n']);
            assert!(parse(&req).is_err(), "request with {b:#x}");
            let mut res = b"HTTP/1.1 200 OK\r\nX: a".to_vec();
            res.extend_from_slice(&[b, b'b', b'\r', b'\n', b'\r', b'\n']);
            if b != b'\r' && b != b'\n' {
                assert!(
                    scan_all(&req[..req.len() - 5]).is_err(),
                    "request with {b:#x}"
                );
                let res = &res[..res.len() - 5];
                assert!(HeadScan::new(Side::Response).scan(res, 65536, 100).is_err());
            }
            let mut storage = header_array();
            assert!(
                parse_response(&res, &mut storage, false).is_err(),
                "response with {b:#x}"
            );
        }
    }

    #[test]
    fn tchar_table_is_the_token_set() {
        for b in 0u8..=255 {
            let token = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), token, "{b:#x}");
        }
    }

    #[test]
    fn word_skip_never_misses_a_control_byte() {
        for b in 0u8..=255 {
            for pos in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[pos] = b;
                let marked = controls(u64::from_le_bytes(bytes));
                if b < 0x20 || b == 0x7f {
                    assert_eq!(marked.trailing_zeros() / 8, pos as u32, "{b} at {pos}");
                } else {
                    assert_eq!(marked, 0, "{b} at {pos}");
                }
            }
        }
        // Whatever follows the first control byte (more of them, bytes with
        // the high bit, bytes just above or below each class) never moves
        // the mark, and nothing before it is marked.
        for pos in 0..8 {
            for first in [0u8, b'\t', b'\r', 0x1f, 0x7f] {
                for fill in [0u8, 9, 13, 0x1f, 0x20, 0x21, 0x7e, 0x7f, 0x80, 0xff] {
                    for before in [b' ', b'x', b'~', 0x80, 0xfe, 0xff] {
                        let mut bytes = [fill; 8];
                        bytes[..pos].fill(before);
                        bytes[pos] = first;
                        let marked = controls(u64::from_le_bytes(bytes));
                        assert_eq!(
                            marked.trailing_zeros() / 8,
                            pos as u32,
                            "{first} after {pos} of {before}, then {fill}"
                        );
                    }
                }
            }
        }
        assert_eq!(controls(u64::from_le_bytes(*b"abcdefgh")), 0);
        assert_eq!(controls(u64::from_le_bytes(*b" ~\x80\xff!@ \xfe")), 0);
        let long =
            b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: aaaaaaaaaaaaaaaaaa\r\n\r\n";
        assert_eq!(scan_all(long).unwrap(), Scan::Complete(long.len()));
        assert!(
            scan_all(b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\nHost: a\r\n\r\n").is_err()
        );
    }

    #[test]
    fn bare_lf_and_cr_rejected() {
        assert!(scan_all(b"GET / HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(scan_all(b"GET / HTTP/1.1\r\nHost: a\n\r\n").is_err());
        assert!(scan_all(b"GET / HTTP/1.1\rHost: a\r\n\r\n").is_err());
        assert_eq!(scan_all(b"GET / HTTP/1.1\r").unwrap(), Scan::Partial);
    }

    #[test]
    fn limits_enforced_before_completion() {
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
    fn only_http_1_1_accepted() {
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
    fn methods_and_targets() {
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
    fn field_syntax_names_and_values() {
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
    fn host_field() {
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
    fn request_framing() {
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

    #[test]
    fn framing_decided_once_for_both_sides() {
        let facts = |lengths, length, codings, chunked| Facts {
            lengths,
            length,
            codings,
            chunked,
            ..Facts::default()
        };
        // The same facts, the same verdict: 400 from a client, 502 from an upstream.
        for (f, ok) in [
            (facts(0, None, 0, false), None),
            (facts(1, Some(0), 0, false), Some(Framing::Empty)),
            (facts(1, Some(7), 0, false), Some(Framing::Length(7))),
            (facts(0, None, 1, true), Some(Framing::Chunked)),
            (facts(1, None, 0, false), None),
            (facts(2, Some(7), 0, false), None),
            (facts(0, None, 2, true), None),
            (facts(1, Some(7), 1, true), None),
            (facts(0, None, 1, false), None),
        ] {
            let request = body_framing(Side::Request, &f);
            let response = body_framing(Side::Response, &f);
            match ok {
                Some(framing) => {
                    assert_eq!(request, Ok(framing), "{f:?}");
                    assert_eq!(response, Ok(framing), "{f:?}");
                }
                None if f.lengths + f.codings == 0 => {
                    assert_eq!(request, Ok(Framing::Empty));
                    assert_eq!(response, Ok(Framing::UntilClose));
                }
                None => {
                    assert!(matches!(request, Err(Refusal::BadRequest(_))), "{f:?}");
                    assert!(matches!(response, Err(Refusal::BadGateway(_))), "{f:?}");
                    // A bodiless response is refused all the same.
                    let bodiless = Facts {
                        bodiless: true,
                        ..f
                    };
                    let response = body_framing(Side::Response, &bodiless);
                    assert!(matches!(response, Err(Refusal::BadGateway(_))), "{f:?}");
                }
            }
        }
        // HTTP/1.0 has no transfer codings; a bodiless response has no body.
        let f = Facts {
            http10: true,
            ..facts(0, None, 1, true)
        };
        assert!(matches!(
            body_framing(Side::Response, &f),
            Err(Refusal::BadGateway(_))
        ));
        let f = Facts {
            bodiless: true,
            ..facts(1, Some(7), 0, false)
        };
        assert_eq!(body_framing(Side::Response, &f), Ok(Framing::Empty));
        let f = Facts {
            bodiless: true,
            ..facts(0, None, 1, true)
        };
        assert_eq!(body_framing(Side::Response, &f), Ok(Framing::Empty));
    }

    /// Response heads the parser accepts.
    const VALID_RESPONSES: [&[u8]; 6] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 \r\n\r\n",
        b"HTTP/1.0 404 Not\tFound, \"really\" (caf\xc3\xa9) \xff\r\nX:\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-Obs: caf\xc3\xa9\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];

    #[test]
    fn response_scan_refuses_control_bytes_never_valid_heads() {
        for head in VALID_RESPONSES {
            let mut storage = header_array();
            assert!(parse_response(head, &mut storage, false).is_ok());
            let got = trickle(Side::Response, head, 65536, 100);
            assert_eq!(got, Ok(Scan::Complete(head.len())));
        }
        // Control bytes are refused as they arrive; the field syntax is left
        // to parse_response (502 either way).
        for start in [
            &b"HTTP/1.1 200 O\x01K"[..],
            b"HTTP/1.1 200 OK\x7f",
            b"HTTP/1.1 200 OK\r\nX: a\x00",
            b"HTTP/1.1 200 OK\r\nX\x0b: a",
        ] {
            assert!(trickle(Side::Response, start, 65536, 100).is_err());
        }
        for start in [
            &b"HTTP/1.1 200 OK\r\nX : a"[..],
            b"HTTP/1.1 200 OK\r\nX\r\n",
        ] {
            assert_eq!(
                trickle(Side::Response, start, 65536, 100),
                Ok(Scan::Partial)
            );
        }
        // Whatever the scan refuses, the parser refuses too (502).
        for head in VALID_RESPONSES {
            for at in 0..head.len() - 2 {
                for b in [0u8, b'\t', b' ', b':', b'(', 0x7f, 0x80] {
                    if head[at] == b'\r' || head[at] == b'\n' {
                        continue;
                    }
                    let mut case = head.to_vec();
                    case[at] = b;
                    if trickle(Side::Response, &case, 65536, 100).is_err() {
                        let mut storage = header_array();
                        let parsed = parse_response(&case, &mut storage, false);
                        assert!(parsed.is_err(), "{}", String::from_utf8_lossy(&case));
                    }
                }
            }
        }
    }

    #[test]
    fn comments_cite_rfc_sections_not_rule_ids() {
        // A rule id is a capital S, R or B and one or two digits, alone.
        let is_rule_id = |word: &str| {
            let mut chars = word.chars();
            matches!(chars.next(), Some('S' | 'R' | 'B'))
                && (1..=2).contains(&chars.clone().count())
                && chars.all(|c| c.is_ascii_digit())
        };
        for line in include_str!("head.rs").lines() {
            let Some((_, comment)) = line.split_once("//") else {
                continue;
            };
            for word in comment.split(|c: char| !c.is_ascii_alphanumeric()) {
                assert!(!is_rule_id(word), "{line}");
            }
        }
    }

    fn response(bytes: &[u8], head: bool) -> Result<(u16, Framing, bool), Refusal> {
        let mut storage = header_array();
        let r = parse_response(bytes, &mut storage, head)?;
        Ok((r.status, r.framing, r.close))
    }

    #[test]
    fn response_status_and_framing() {
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
