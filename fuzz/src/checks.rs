//! Invariant checks shared by the fuzz targets and the corpus replay test
//! (`tests/fuzz_corpus.rs`). Only `keyhole`, `httparse`, `std` and, as the
//! reference JSON parser, `serde_json` with the `serde` traits it implements
//! (dev-dependencies of the main crate too) here, so the replay compiles on
//! stable.
//!
//! Every function takes the bytes of one input and panics (through `assert!`)
//! when keyhole breaks one of its promises; a refusal is never a failure.
//! Rule ids (S1–S16, R1–R5) are the short names `docs/strict-profile.md`
//! lists for its rules.

use keyhole::fuzzing::{self, BodyFraming, FUZZ_KEY};

/// Host of the `/` route of the fuzz table (`https://upstream.example/base`).
pub const ROOT_HOST: &str = "upstream.example";
/// Base path of the `/` route.
pub const ROOT_BASE: &str = "/base";
/// Host of the `/openai` route (`https://api.example/v1`).
pub const OPENAI_HOST: &str = "api.example";
/// Prefix and base path of the `/openai` route.
pub const OPENAI_PREFIX: &str = "/openai";
/// Base path of the `/openai` route.
pub const OPENAI_BASE: &str = "/v1";

/// Header names that must never reach an upstream from a client: hop-by-hop
/// (S11, S13), credentials (S11) and `expect` (S12, keyhole answers it).
/// `host`, `content-length` and `transfer-encoding` are only ever keyhole's own.
const NEVER_FORWARDED: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "proxy-authorization",
    "expect",
    "authorization",
    "x-api-key",
    "host",
    "content-length",
];

/// Hop-by-hop names that never appear in a relayed response head (R2, S11).
const NEVER_RELAYED: [&str; 9] = [
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

/// Room for any head keyhole accepts (100 fields) plus what it adds.
const MAX_FIELDS: usize = 512;

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Strips SP/HTAB at both ends (OWS, RFC 9110 §5.5).
fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// A field line as `(name, trimmed value)`, owned so the head can be dropped.
type Field = (Vec<u8>, Vec<u8>);

fn fields(headers: &[httparse::Header<'_>]) -> Vec<Field> {
    headers
        .iter()
        .map(|h| (h.name.as_bytes().to_vec(), trim(h.value).to_vec()))
        .collect()
}

/// `1*DIGIT` as a number (a value keyhole accepted as a length).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn count(fields: &[Field], name: &str) -> usize {
    fields.iter().filter(|(n, _)| eq(n, name)).count()
}

/// The names a head's `Connection` fields nominate as hop-by-hop (S11).
fn nominated(fields: &[Field]) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|(n, _)| eq(n, "connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b',').map(trim))
        .filter(|t| !t.is_empty())
        .map(<[u8]>::to_ascii_lowercase)
        .collect()
}

/// S5: every line ends in CRLF, there is no bare CR or LF, and the only empty
/// line is the one that ends the head (when `terminated`).
fn assert_crlf_lines(head: &[u8], terminated: bool) {
    for (i, &b) in head.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(head.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && head[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    assert!(head.ends_with(b"\r\n"), "head does not end with CRLF");
    let body = if terminated {
        assert!(head.ends_with(b"\r\n\r\n"), "head not terminated");
        &head[..head.len() - 2]
    } else {
        head
    };
    assert!(
        !body.windows(4).any(|w| w == b"\r\n\r\n") && !body.starts_with(b"\r\n"),
        "empty line inside the head"
    );
}

/// The request target keyhole must send upstream for an origin-form client
/// target, per S4 and the fuzz route table, with the route's host: computed
/// from the path alone, independently of keyhole's code.
fn expected_rewrite(client_target: &str) -> (&'static str, String) {
    let path = client_target.split('?').next().unwrap_or_default();
    let openai = path == OPENAI_PREFIX
        || path
            .strip_prefix(OPENAI_PREFIX)
            .is_some_and(|r| r.starts_with('/'));
    if openai {
        let rest = &client_target[OPENAI_PREFIX.len()..];
        (OPENAI_HOST, format!("{OPENAI_BASE}{rest}"))
    } else {
        (ROOT_HOST, format!("{ROOT_BASE}{client_target}"))
    }
}

/// Target 1 (`request_head`): scan, parse, validate, route and rewrite.
///
/// # Panics
/// When an accepted head is forwarded in a form that differs from what was
/// accepted, smuggles a framing or hop-by-hop field, or lacks the key.
pub fn request_head(data: &[u8]) {
    let head = match fuzzing::scan_head(data) {
        Ok(Some(n)) => {
            assert!(
                n > 0 && n <= data.len(),
                "scan consumed {n} of {}",
                data.len()
            );
            &data[..n]
        }
        // What the scanner calls incomplete, the parser must not accept.
        Ok(None) => {
            assert!(
                fuzzing::parse_request(data).is_err(),
                "parser accepts a head the scanner calls incomplete"
            );
            assert!(fuzzing::forward_request(data).is_err());
            return;
        }
        Err(status) => {
            // 505: a request line with another version, refused once it ends.
            assert!(
                (400..500).contains(&status) || status == 505,
                "scan refused with {status}"
            );
            return;
        }
    };
    let parsed = fuzzing::parse_request(head);
    let forwarded = fuzzing::forward_request(head);
    if let Err(status) = &parsed {
        assert!((400..=505).contains(status), "parse refused with {status}");
        assert!(forwarded.is_err(), "forwarded a head the parser refused");
    }
    let Ok(fwd) = forwarded else { return };
    let Ok((method, target, framing)) = parsed else {
        unreachable!()
    };
    assert_eq!(fwd.framing, framing);

    // The client's head, as a strict tokenizer sees it.
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut client = httparse::Request::new(&mut storage);
    let status = client.parse(head).expect("accepted head re-tokenizes");
    assert_eq!(status, httparse::Status::Complete(head.len()));
    assert_eq!(client.method, Some(method.as_str()));
    assert_eq!(client.path, Some(target.as_str()));
    assert_eq!(client.version, Some(1), "only HTTP/1.1 is accepted (S1)");
    let client_fields = fields(client.headers);

    // S9: exactly one framing, from exactly one valid field line.
    let (cl, te) = (
        count(&client_fields, "content-length"),
        count(&client_fields, "transfer-encoding"),
    );
    let cl_value = client_fields
        .iter()
        .find(|(n, _)| eq(n, "content-length"))
        .and_then(|(_, v)| digits(v));
    match framing {
        BodyFraming::Empty => assert!(
            te == 0 && (cl == 0 || (cl == 1 && cl_value == Some(0))),
            "empty framing from CL={cl} TE={te}"
        ),
        BodyFraming::Length(n) => {
            assert!(cl == 1 && te == 0, "length framing from CL={cl} TE={te}");
            assert_eq!(cl_value, Some(n));
        }
        BodyFraming::Chunked => assert!(cl == 0 && te == 1, "chunked from CL={cl} TE={te}"),
        BodyFraming::UntilClose => panic!("a request is never close-delimited"),
    }
    assert_eq!(count(&client_fields, "host"), 1, "S8: exactly one Host");
    assert!(target.starts_with('/') && !target.starts_with("//"), "S3");

    check_forwarded_head(&fwd, &method, &target, &client_fields);
}

/// The head `fwd` forwards for a request of `method` and `client_target`
/// with `client_fields`.
fn check_forwarded_head(
    fwd: &fuzzing::Forwarded,
    method: &str,
    client_target: &str,
    client_fields: &[Field],
) {
    let (host, target) = expected_rewrite(client_target);
    assert_eq!(fwd.upstream_host, host, "wrong route for {client_target}");
    assert_crlf_lines(&fwd.head, true);

    // Re-parse with httparse, default (strict) configuration.
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut up = httparse::Request::new(&mut storage);
    let status = up.parse(&fwd.head).expect("forwarded head re-parses");
    assert_eq!(status, httparse::Status::Complete(fwd.head.len()));
    assert_eq!(up.method, Some(method));
    assert_eq!(up.path, Some(target.as_str()));
    assert_eq!(up.version, Some(1));
    let up_fields = fields(up.headers);

    // Exactly one host, the upstream's authority, and first.
    assert_eq!(count(&up_fields, "host"), 1);
    assert_eq!(up_fields[0], (b"host".to_vec(), host.as_bytes().to_vec()));

    // The injected credential exactly once; the other credential never.
    let (key_name, key_value, other) = if host == OPENAI_HOST {
        ("authorization", format!("Bearer {FUZZ_KEY}"), "x-api-key")
    } else {
        ("x-api-key", FUZZ_KEY.to_owned(), "authorization")
    };
    let keys: Vec<&Field> = up_fields.iter().filter(|(n, _)| eq(n, key_name)).collect();
    assert_eq!(keys.len(), 1, "{key_name} injected {} times", keys.len());
    assert_eq!(keys[0].1, key_value.as_bytes());
    assert_eq!(count(&up_fields, other), 0, "client {other} forwarded");

    // keyhole's own framing line, once, in canonical form; nothing else frames.
    let framing_fields: Vec<&Field> = up_fields
        .iter()
        .filter(|(n, _)| eq(n, "content-length") || eq(n, "transfer-encoding"))
        .collect();
    match fwd.framing {
        BodyFraming::Empty => assert!(framing_fields.is_empty(), "framing on empty body"),
        BodyFraming::Length(n) => assert_eq!(
            framing_fields,
            [&(b"content-length".to_vec(), n.to_string().into_bytes())]
        ),
        BodyFraming::Chunked => assert_eq!(
            framing_fields,
            [&(b"transfer-encoding".to_vec(), b"chunked".to_vec())]
        ),
        BodyFraming::UntilClose => panic!("a request is never close-delimited"),
    }
    for name in NEVER_FORWARDED {
        if name != "host" && name != "content-length" && name != key_name {
            assert_eq!(count(&up_fields, name), 0, "{name} forwarded");
        }
    }
    let nominated = nominated(client_fields);
    for (name, _) in &up_fields[1..] {
        let lower = name.to_ascii_lowercase();
        assert!(
            !nominated.contains(&lower),
            "nominated field {} forwarded",
            String::from_utf8_lossy(name)
        );
    }

    // Every other client field, in order, byte for byte after OWS trimming.
    let kept: Vec<&Field> = client_fields
        .iter()
        .filter(|(n, _)| {
            !NEVER_FORWARDED.iter().any(|s| eq(n, s))
                && !eq(n, "transfer-encoding")
                && !nominated.contains(&n.to_ascii_lowercase())
        })
        .collect();
    let extra = 2 + usize::from(!framing_fields.is_empty());
    assert_eq!(up_fields.len(), kept.len() + extra, "field count");
    let middle: Vec<&Field> = up_fields[1..=kept.len()].iter().collect();
    assert_eq!(middle, kept, "end-to-end fields changed");

    // And keyhole's own parser reads back what it wrote (a head with more
    // fields than keyhole accepts from a client is refused with 431 only).
    match fuzzing::parse_request(&fwd.head) {
        Ok((method2, target2, framing)) => {
            assert_eq!(method2, method);
            assert_eq!(target2, target);
            assert_eq!(framing, fwd.framing);
        }
        Err(431) => assert!(up_fields.len() > 100, "431 for {} fields", up_fields.len()),
        Err(status) => panic!("keyhole refuses its own upstream head with {status}"),
    }
}

/// Target 2 (`chunked_body`): the chunked decoder fed whole and in `splits`
/// (offsets into `data`, any order, out-of-range ones ignored).
///
/// # Panics
/// When the split feeding disagrees with the whole one, or the canonical
/// re-encoding is not a fixed point.
pub fn chunked_body(data: &[u8], splits: &[usize]) {
    let whole = fuzzing::decode_chunked(&[data]);
    let mut cuts: Vec<usize> = splits
        .iter()
        .copied()
        .filter(|&s| s <= data.len())
        .collect();
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        pieces.push(&data[start..cut]);
        start = cut;
    }
    pieces.push(&data[start..]);
    assert_eq!(
        fuzzing::decode_chunked(&pieces),
        whole,
        "split at {splits:?}"
    );

    let Ok((used, out, payload, done)) = whole else {
        return;
    };
    assert!(used <= data.len(), "consumed {used} of {}", data.len());
    assert!(payload <= out.len() as u64);
    if !done {
        assert_eq!(used, data.len(), "stopped early without finishing");
        return;
    }
    assert!(out.ends_with(b"0\r\n\r\n"), "canonical body not terminated");
    // Canonical output is a fixed point: it decodes to itself.
    assert_eq!(
        fuzzing::decode_chunked(&[&out]),
        Ok((out.len(), out.clone(), payload, true)),
        "canonical re-encoding is not a fixed point"
    );
}

/// Split points for replaying a `chunked_body` seed without `arbitrary`:
/// every single cut for small inputs, plus one-byte pieces, plus cuts whose
/// gaps are taken from the input's own bytes.
#[must_use]
pub fn replay_splits(data: &[u8]) -> Vec<Vec<usize>> {
    let mut all: Vec<Vec<usize>> = Vec::new();
    if data.len() <= 4096 {
        all.extend((0..=data.len()).map(|i| vec![i]));
        all.push((0..=data.len()).collect());
    }
    all.push(derived_splits(data));
    all
}

/// Cuts whose gaps (1 to 17 bytes) are taken from the input's own bytes.
#[must_use]
pub fn derived_splits(data: &[u8]) -> Vec<usize> {
    let mut at = 0;
    let mut derived = Vec::new();
    for &b in data {
        at += usize::from(b % 17) + 1;
        if at > data.len() {
            break;
        }
        derived.push(at);
    }
    derived
}

/// Target 3 (`response_head`): an upstream response head, for a GET and for
/// a HEAD request.
///
/// # Panics
/// When the framing decision breaks RFC 9112 §6.3 or the relayed head keeps
/// an upstream framing or hop-by-hop field.
pub fn response_head(data: &[u8]) {
    let get = fuzzing::relay_response(data, false);
    let head = fuzzing::relay_response(data, true);
    assert_eq!(get.is_ok(), head.is_ok(), "HEAD changes the verdict");
    for (res, was_head) in [(get, false), (head, true)] {
        match res {
            Ok(r) => check_relayed(data, &r, was_head),
            Err(status) => assert_eq!(status, 502, "refused upstream head with {status}"),
        }
    }
}

fn check_relayed(data: &[u8], r: &fuzzing::Relayed, was_head: bool) {
    assert!(
        (100..=599).contains(&r.status) && r.status != 101,
        "R1: {}",
        r.status
    );
    let bodiless = was_head || r.status < 200 || r.status == 204 || r.status == 304;
    if bodiless {
        assert_eq!(r.framing, BodyFraming::Empty, "R2: {} has a body", r.status);
    }
    if r.framing == BodyFraming::UntilClose {
        assert!(r.close, "close-delimited body on a reusable connection");
    }

    // The upstream's head, as a strict tokenizer sees it.
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut upstream = httparse::Response::new(&mut storage);
    let status = upstream.parse(data).expect("accepted head re-tokenizes");
    assert_eq!(status, httparse::Status::Complete(data.len()));
    assert_eq!(upstream.code, Some(r.status));
    let up_fields = fields(upstream.headers);
    let (cl, te) = (
        count(&up_fields, "content-length"),
        count(&up_fields, "transfer-encoding"),
    );
    assert!(cl + te <= 1, "R2: CL={cl} TE={te} accepted");
    let cl_value = up_fields
        .iter()
        .find(|(n, _)| eq(n, "content-length"))
        .and_then(|(_, v)| digits(v));
    assert_eq!(
        cl_value.is_some(),
        cl == 1,
        "R2: invalid Content-Length accepted"
    );
    match r.framing {
        BodyFraming::Chunked => assert_eq!(te, 1),
        BodyFraming::Length(n) => assert_eq!(cl_value, Some(n)),
        BodyFraming::UntilClose => assert_eq!(cl + te, 0),
        BodyFraming::Empty => {}
    }

    // What keyhole writes to the client (it appends its own connection field).
    let mut relayed = r.head.clone();
    relayed.extend_from_slice(b"\r\n");
    assert!(relayed.starts_with(b"HTTP/1.1 "));
    assert_crlf_lines(&relayed, true);
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut client = httparse::Response::new(&mut storage);
    let status = client.parse(&relayed).expect("relayed head re-parses");
    assert_eq!(status, httparse::Status::Complete(relayed.len()));
    assert_eq!(client.code, Some(r.status));
    assert_eq!(client.version, Some(1));
    let out = fields(client.headers);

    let framing_fields: Vec<&Field> = out
        .iter()
        .filter(|(n, _)| eq(n, "content-length") || eq(n, "transfer-encoding"))
        .collect();
    match r.framing {
        BodyFraming::Length(n) => assert_eq!(
            framing_fields,
            [&(b"content-length".to_vec(), n.to_string().into_bytes())]
        ),
        // A close-delimited body is re-framed as chunked, so a truncated
        // one never looks complete to the client.
        BodyFraming::Chunked | BodyFraming::UntilClose => assert_eq!(
            framing_fields,
            [&(b"transfer-encoding".to_vec(), b"chunked".to_vec())]
        ),
        // HEAD and 304 keep the length they describe, as metadata only.
        BodyFraming::Empty => {
            if r.status < 200 || r.status == 204 || cl_value.is_none() {
                assert!(framing_fields.is_empty(), "framing on {}", r.status);
            } else {
                let n = cl_value.unwrap_or_default().to_string().into_bytes();
                assert_eq!(framing_fields, [&(b"content-length".to_vec(), n)]);
            }
        }
    }
    for name in NEVER_RELAYED {
        if name != "content-length" && name != "transfer-encoding" {
            assert_eq!(count(&out, name), 0, "{name} relayed");
        }
    }
    let nominated = nominated(&up_fields);
    for (name, _) in &out {
        let framing_line = eq(name, "content-length") || eq(name, "transfer-encoding");
        assert!(
            framing_line || !nominated.contains(&name.to_ascii_lowercase()),
            "nominated field {} relayed",
            String::from_utf8_lossy(name)
        );
    }
    // End-to-end fields pass unchanged, in order.
    let kept: Vec<&Field> = up_fields
        .iter()
        .filter(|(n, _)| {
            !NEVER_RELAYED.iter().any(|s| eq(n, s)) && !nominated.contains(&n.to_ascii_lowercase())
        })
        .collect();
    let relayed_kept: Vec<&Field> = out.iter().take(out.len() - framing_fields.len()).collect();
    assert_eq!(relayed_kept, kept, "end-to-end fields changed");
}

/// S4: is `path` free of dot segments (also `%2e`-encoded, also before a
/// `;`), encoded slashes and backslashes?
fn path_is_safe(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return false;
    }
    lower.split('/').all(|segment| {
        let segment = segment.split(';').next().unwrap_or_default();
        let decoded = segment.replace("%2e", ".");
        decoded != "." && decoded != ".."
    })
}

/// The upstream target keyhole would send for `target` through the fuzz
/// route table, with the upstream host; the error is the status.
pub fn route_target(target: &str) -> Result<(String, String), u16> {
    let bytes = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let fwd = fuzzing::forward_request(bytes.as_bytes())?;
    let head = String::from_utf8(fwd.head).map_err(|_| 500u16)?;
    let line = head.split("\r\n").next().unwrap_or_default();
    let upstream_target = line.split(' ').nth(1).unwrap_or_default().to_owned();
    Ok((fwd.upstream_host, upstream_target))
}

/// Target 4 (`route_rewrite`): an arbitrary request target through the
/// fixed route table.
///
/// # Panics
/// When a rewritten target leaves its route's base path, reaches the other
/// route across a prefix boundary, or carries a path-traversal form.
pub fn route_rewrite(data: &[u8]) {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let result = route_target(target);
    // Bytes outside 0x21..=0x7E end the target in the request line (a space
    // or CRLF), so only clean targets are compared with the model.
    if !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return;
    }
    let Ok((host, upstream)) = result else {
        return;
    };
    assert!(
        target.starts_with('/') && !target.starts_with("//"),
        "S3: {target}"
    );
    assert!(!target.contains('#'), "S3: fragment in {target}");
    let (expected_host, expected) = expected_rewrite(target);
    assert_eq!(host, expected_host, "prefix boundary: {target}");
    assert_eq!(upstream, expected, "rewrite of {target}");
    let base = if host == OPENAI_HOST {
        OPENAI_BASE
    } else {
        ROOT_BASE
    };
    let rest = upstream.strip_prefix(base).expect("upstream under base");
    assert!(
        rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        "escaped base path: {upstream}"
    );
    let path = upstream.split('?').next().unwrap_or_default();
    assert!(path_is_safe(path), "unsafe upstream path: {upstream}");
    let client_path = target.split('?').next().unwrap_or_default();
    assert!(path_is_safe(client_path), "unsafe client path: {target}");
    if client_path == OPENAI_PREFIX || client_path.starts_with("/openai/") {
        assert_ne!(host, ROOT_HOST, "/openai/ reached the root route");
    } else {
        assert_ne!(host, OPENAI_HOST, "{target} reached the /openai route");
    }
}

/// One request keyhole should forward, as the pure functions decide it.
struct Expected {
    host: String,
    head: Vec<u8>,
    /// The canonical body bytes (for a refused chunked body: the longest
    /// valid prefix, any prefix of which may have been sent).
    body: Vec<u8>,
    complete: bool,
}

/// A chunked body at the start of `rest`: the canonical bytes keyhole relays,
/// the bytes it consumes and whether it ended. For a refused body, the
/// canonical form of its longest valid prefix (validity of a prefix is
/// monotonic, so it is found by bisection), any prefix of which may be sent.
fn chunked_prefix(rest: &[u8]) -> (Vec<u8>, usize, bool) {
    if let Ok((used, out, _, done)) = fuzzing::decode_chunked(&[rest]) {
        return (out, used, done);
    }
    let (mut ok, mut bad) = (0, rest.len());
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        if fuzzing::decode_chunked(&[&rest[..mid]]).is_ok() {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    let out = fuzzing::decode_chunked(&[&rest[..ok]]).map_or(Vec::new(), |r| r.1);
    (out, rest.len(), false)
}

/// The requests a client byte stream should produce upstream, in order:
/// heads through `scan_head` and `forward_request`, bodies by their
/// framing; the model stops at the first refusal, incomplete request or
/// `Connection: close`, as keyhole closes there (S14, S16).
fn expected_requests(mut rest: &[u8]) -> Vec<Expected> {
    let mut all = Vec::new();
    while let Ok(Some(n)) = fuzzing::scan_head(rest) {
        let Ok(fwd) = fuzzing::forward_request(&rest[..n]) else {
            break;
        };
        let close = {
            let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let mut req = httparse::Request::new(&mut storage);
            let _ = req.parse(&rest[..n]);
            nominated(&fields(req.headers)).contains(&b"close".to_vec())
        };
        rest = &rest[n..];
        let (body, used, complete) = match fwd.framing {
            BodyFraming::Empty | BodyFraming::UntilClose => (Vec::new(), 0, true),
            BodyFraming::Length(len) => {
                let take = usize::try_from(len).unwrap_or(usize::MAX).min(rest.len());
                (rest[..take].to_vec(), take, take as u64 == len)
            }
            BodyFraming::Chunked => chunked_prefix(rest),
        };
        rest = &rest[used..];
        all.push(Expected {
            host: fwd.upstream_host.clone(),
            head: fwd.head.clone(),
            body,
            complete,
        });
        if close || !complete {
            break;
        }
    }
    all
}

/// Target 5 (`connection`): a client byte stream, split at `splits`, through
/// the real connection loop against in-memory upstreams.
///
/// # Panics
/// When the loop hangs, or an upstream receives anything but a prefix of the
/// requests the pure functions accept, in order, byte for byte: in
/// particular any request after one that was refused.
pub fn connection(data: &[u8], splits: &[usize]) {
    let mut cuts: Vec<usize> = splits
        .iter()
        .copied()
        .filter(|&s| s <= data.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        pieces.push(&data[start..cut]);
        start = cut;
    }
    pieces.push(&data[start..]);
    let report = super::harness::run_connection(&pieces);
    assert!(!report.hung, "connection loop did not finish");
    if !report.client_output.is_empty() {
        assert!(
            report.client_output.starts_with(b"HTTP/1.1 "),
            "client got a non-response"
        );
    }

    let expected = expected_requests(data);
    // Streams to one host are opened one after another and carry that host's
    // requests in client order; streams to different hosts interleave.
    let mut next_for_host: Vec<(String, usize)> = Vec::new();
    let mut answered = 0;
    for stream in report.upstream_streams.iter().filter(|s| !s.is_empty()) {
        let Some(first) = expected.iter().find(|e| stream.starts_with(&e.head)) else {
            panic!(
                "upstream got a head keyhole should not send: {:?}",
                String::from_utf8_lossy(&stream[..stream.len().min(300)])
            );
        };
        let host = first.host.clone();
        if !next_for_host.iter().any(|(h, _)| *h == host) {
            next_for_host.push((host.clone(), 0));
        }
        let cursor = next_for_host
            .iter_mut()
            .find(|(h, _)| *h == host)
            .map(|(_, i)| i)
            .expect("cursor");
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let Some(offset) = expected[*cursor..].iter().position(|e| e.host == host) else {
                panic!("upstream {host} got a request keyhole refused or never received");
            };
            let e = &expected[*cursor + offset];
            *cursor += offset + 1;
            assert!(
                rest.starts_with(&e.head),
                "upstream {host} got {:?}, expected {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(300)]),
                String::from_utf8_lossy(&e.head)
            );
            rest = &rest[e.head.len()..];
            let body_len = e.body.len().min(rest.len());
            assert_eq!(
                &rest[..body_len],
                &e.body[..body_len],
                "body relayed differently"
            );
            rest = &rest[body_len..];
            if e.complete && body_len == e.body.len() {
                answered += 1;
            } else {
                assert!(rest.is_empty(), "bytes after a truncated body");
            }
        }
    }
    assert!(
        report.upstream_requests <= answered,
        "upstream answered {} requests, {answered} complete ones were sent",
        report.upstream_requests
    );
}

/// The JSON log escaper (`keyhole::json`, the binary's `--log-format json`):
/// any text comes out as one JSON string without a raw control byte, and a
/// reference parser reads back exactly the text, alone and as a member of
/// an object like a log line.
pub fn json_escape(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    keyhole::json::write_string(&mut out, &text);
    assert!(
        out.iter().all(|&b| b >= 0x20 && b != 0x7f),
        "raw control byte in {out:?}"
    );
    let back: String = serde_json::from_slice(&out).expect("a valid JSON string");
    assert_eq!(back, text);
    let mut line = b"{\"msg\":\"request\",\"path\":".to_vec();
    line.extend_from_slice(&out);
    line.extend_from_slice(b",\"status\":200}");
    let object: serde_json::Value = serde_json::from_slice(&line).expect("a valid JSON object");
    assert_eq!(object["path"].as_str(), Some(&*text));
}

/// The egress proxy's answer to CONNECT (`keyhole::fuzzing::connect_answer`),
/// fed whole and as growing prefixes cut at `splits`, as the tunnel's reads
/// see it: the first prefix that is not incomplete decides, and decides as
/// the whole does; the tunnel opens only on a 2xx head httparse reads the
/// same, of at most 8 KiB; consumed ≤ input.
///
/// # Panics
/// When a split changes the verdict or a tunnel opens on anything else.
pub fn connect_response(data: &[u8], splits: &[usize]) {
    let whole = fuzzing::connect_answer(data);
    let mut cuts: Vec<usize> = splits
        .iter()
        .copied()
        .filter(|&s| s <= data.len())
        .collect();
    cuts.sort_unstable();
    cuts.push(data.len());
    let fed = cuts
        .iter()
        .map(|&cut| fuzzing::connect_answer(&data[..cut]))
        .find(|r| *r != Ok(None))
        .unwrap_or(Ok(None));
    assert_eq!(fed, whole, "split at {splits:?}");
    match whole {
        Ok(Some(n)) => {
            assert!(
                n <= data.len() && n <= 8192,
                "consumed {n} of {}",
                data.len()
            );
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut res = httparse::Response::new(&mut fields);
            assert_eq!(res.parse(&data[..n]), Ok(httparse::Status::Complete(n)));
            assert!(
                res.code.is_some_and(|c| (200..300).contains(&c)),
                "{:?}",
                res.code
            );
        }
        Ok(None) => assert!(data.len() < 8192, "incomplete past the limit"),
        Err(Some(code)) => assert!(!(200..300).contains(&code), "a {code} refused"),
        Err(None) => {}
    }
}

/// Target `usage_scan`: the usage scanner over a response body. The
/// first byte picks the media type (odd: `text/event-stream`, even:
/// `application/json`; the seeds start with `s` or `j`), the rest is the
/// body; `splits` are offsets into the body.
///
/// # Panics
/// When the counts depend on how the body is split, the totals are not the
/// saturating sums, or (for a JSON body a reference parser accepts) the
/// counts differ from the reference's reading of the same document.
pub fn usage_scan(data: &[u8], splits: &[usize]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let content_type: &[u8] = if first & 1 == 1 {
        b"text/event-stream; charset=utf-8"
    } else {
        b" Application/JSON"
    };
    let scan =
        |pieces: &[&[u8]]| fuzzing::scan_usage(content_type, pieces).expect("a scanned media type");
    let whole = scan(&[body]);
    let mut cuts: Vec<usize> = splits
        .iter()
        .copied()
        .filter(|&s| s <= body.len())
        .collect();
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        pieces.push(&body[start..cut]);
        start = cut;
    }
    pieces.push(&body[start..]);
    assert_eq!(scan(&pieces), whole, "split at {splits:?}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(scan(&bytes), whole, "byte by byte");

    let [input, output, creation, read, prompt, completion] = whole.counts;
    let sum = |a: u64, b: u64| a.saturating_add(b);
    assert_eq!(
        whole.tokens_in(),
        sum(sum(input, creation), sum(read, prompt))
    );
    assert_eq!(whole.tokens_out(), sum(output, completion));
    assert_eq!(whole.seen(), whole.counts != [0; 6]);
    if first & 1 == 0 {
        if let Some(want) = reference_usage(body) {
            assert_eq!(whole.counts, want, "the reference parser reads otherwise");
        }
    }
}

/// The usage of a JSON document as `serde_json` reads it, by the README's
/// rule (direct integer members of an object that is the value of a `usage`
/// key, the largest of each), with the scanner's documented limits: a name
/// with an escape matches nothing, a usage object deeper than 64 levels
/// does not count. `None` when the reference refuses the document or when
/// it cannot tell an integer too large for u64 (which saturates) from a
/// float (which does not count).
fn reference_usage(body: &[u8]) -> Option<[u64; 6]> {
    use serde::de::DeserializeSeed;
    let mut found = reference::Found::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let walk = reference::Walk {
        found: &mut found,
        depth: 0,
        usage: false,
        field: None,
    };
    walk.deserialize(&mut de).ok()?;
    de.end().ok()?;
    (!found.ambiguous).then_some(found.fields)
}

/// The `serde` visitors `reference_usage` walks a document with.
mod reference {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    const FIELDS: [&str; 6] = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "prompt_tokens",
        "completion_tokens",
    ];

    /// The largest count of each field, and whether one was out of reach.
    #[derive(Default)]
    pub(super) struct Found {
        pub(super) fields: [u64; 6],
        pub(super) ambiguous: bool,
    }

    /// One value, at `depth` containers down; `usage`: it is the value of
    /// a `usage` key; `field`: it is a direct member of a usage object.
    pub(super) struct Walk<'f> {
        pub(super) found: &'f mut Found,
        pub(super) depth: u32,
        pub(super) usage: bool,
        pub(super) field: Option<usize>,
    }

    /// A member name: `None` when it had an escape (not borrowed).
    struct Name;

    impl<'de> DeserializeSeed<'de> for Name {
        type Value = Option<&'de str>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Name {
        type Value = Option<&'de str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a name")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_u64<E>(self, v: u64) -> Result<(), E> {
            if let Some(i) = self.field {
                self.found.fields[i] = self.found.fields[i].max(v);
            }
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, v: f64) -> Result<(), E> {
            // An integer literal past u64::MAX arrives as a float.
            self.found.ambiguous |= self.field.is_some() && v >= 1.8e19;
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let depth = self.depth + 1;
            while seq
                .next_element_seed(Walk {
                    found: &mut *self.found,
                    depth,
                    usage: false,
                    field: None,
                })?
                .is_some()
            {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let depth = self.depth + 1;
            let is_usage = self.usage && depth <= 64; // the scanner's bit stacks
            while let Some(name) = map.next_key_seed(Name)? {
                let field = FIELDS
                    .iter()
                    .position(|f| Some(*f) == name)
                    .filter(|_| is_usage);
                let usage = name == Some("usage");
                map.next_value_seed(Walk {
                    found: &mut *self.found,
                    depth,
                    usage,
                    field,
                })?;
            }
            Ok(())
        }
    }
}
