//! Egress through an HTTP CONNECT proxy (RFC 9110 §9.3.6): the proxy's URL
//! and `NO_PROXY` list, validated once at start; the CONNECT request keyhole
//! writes; and the proxy's answer, parsed from the bytes received so far.
//! Pure: no sockets, no clocks (`upstream` does the IO).

use std::net::{IpAddr, SocketAddr};

use zeroize::Zeroizing;

use crate::clients::base64;
use crate::config::{split_authority, Secret, UpstreamUrl};
use crate::error::Error;
use crate::head::Scan;

/// The standard base64 alphabet (RFC 4648 §4), which Basic uses (RFC 7617 §2).
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The longest answer head read from the proxy: `200 Connection established`
/// is a few dozen bytes; 8 KiB leaves room for a chatty proxy's fields and
/// bounds what a hostile one makes keyhole hold.
pub(crate) const MAX_ANSWER_BYTES: usize = 8 * 1024;
/// Most field lines in that answer (httparse's array, on the stack).
const MAX_ANSWER_FIELDS: usize = 32;

/// An egress proxy, and the upstreams that bypass it.
#[derive(Debug)]
pub(crate) struct Egress {
    /// `HOST:PORT` as written: where to connect, and all that logs show.
    pub(crate) authority: String,
    /// What ends a CONNECT head: `Proxy-Authorization: Basic
    /// base64(user:pass)` (RFC 7617) when the URL has USER:PASS, and the
    /// empty line.
    pub(crate) end: Secret,
    /// `NO_PROXY` entries, as `key` writes them (`.*` for `*`), any `:port`
    /// dropped.
    no_proxy: Vec<String>,
}

impl Egress {
    /// Parses `http://[USER:PASS@]HOST:PORT[/]` (`%XX` in USER:PASS decoded,
    /// as curl does) and a `NO_PROXY` list. Errors never show the URL: it
    /// may hold a password.
    pub(crate) fn parse(url: &str, no_proxy: &str) -> Result<Egress, Error> {
        let rest = (url.strip_prefix("http://"))
            .ok_or(Error::BadEgressProxy("must start with http://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let userinfo = rest.rsplit_once('@').map(|(userinfo, _)| userinfo);
        let authority = &rest[userinfo.map_or(0, |u| u.len() + 1)..];
        let port = split_authority(authority).and_then(|(_, port)| port);
        port.ok_or(Error::BadEgressProxy("expected [USER:PASS@]HOST:PORT"))?;
        let no_proxy = (no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()))
            .map(|e| bypass_entry(e).ok_or_else(|| Error::BadNoProxy(e.to_owned())))
            .collect::<Result<_, _>>()?;
        Ok(Egress {
            authority: authority.to_owned(),
            end: userinfo.map_or(Ok(Secret::new("\r\n")), basic)?,
            no_proxy,
        })
    }

    /// Whether connections to `url` go through this proxy: only `https://`
    /// ones (`http://` ones are loopback), and not those whose host is
    /// listed in `NO_PROXY` or is a subdomain of a listed name: its `key`
    /// ends with the entry's (never a mere suffix). Ports never count.
    pub(crate) fn carries(&self, url: &UpstreamUrl) -> bool {
        let host = key(&url.host);
        url.tls && !(self.no_proxy.iter()).any(|e| e == ".*" || host.ends_with(e.as_str()))
    }
}

/// The start of the CONNECT request for `url`'s host and port (RFC 9110
/// §9.3.6): the authority-form target (RFC 9112 §3.2.3), the same in `Host`.
/// `Egress::end` follows it.
pub(crate) fn connect_head(url: &UpstreamUrl) -> String {
    let target = url.host.parse().map_or_else(
        |_| format!("{}:{}", url.host, url.port),
        |ip| SocketAddr::new(ip, url.port).to_string(),
    );
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n")
}

/// The proxy's answer to CONNECT, from the bytes received so far:
/// `Partial` until its head ends; `Complete(n)` for a 2xx whose head is the
/// first `n` bytes (RFC 9110 §9.3.6: only a 2xx opens the tunnel, and any
/// framing fields in it are ignored); `Err(Some(status))` for any other
/// status, `Err(None)` for bytes that are no response head of at most
/// `MAX_ANSWER_BYTES` and `MAX_ANSWER_FIELDS` lines.
pub(crate) fn parse_answer(bytes: &[u8]) -> Result<Scan, Option<u16>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_ANSWER_FIELDS];
    let mut answer = httparse::Response::new(&mut fields);
    match answer.parse(&bytes[..bytes.len().min(MAX_ANSWER_BYTES)]) {
        Ok(httparse::Status::Partial) if bytes.len() < MAX_ANSWER_BYTES => Ok(Scan::Partial),
        Ok(httparse::Status::Complete(n)) => match answer.code {
            Some(200..=299) => Ok(Scan::Complete(n)),
            code => Err(code),
        },
        _ => Err(None),
    }
}

/// The credentials field and the empty line from a URL's `USER:PASS`, `%XX`
/// decoded (RFC 3986 §2.1); every copy reserved exactly and zeroed.
fn basic(userinfo: &str) -> Result<Secret, Error> {
    let bad = Error::BadEgressProxy("USER:PASS needs a : and only %XX escapes");
    let mut plain = Zeroizing::new(Vec::with_capacity(userinfo.len()));
    percent_decode(userinfo, &mut plain)
        .filter(|()| userinfo.contains(':'))
        .ok_or(bad)?;
    let mut end = String::with_capacity(31 + plain.len().div_ceil(3) * 4);
    end.push_str("Proxy-Authorization: Basic ");
    base64(&plain, BASE64, true, &mut end);
    end.push_str("\r\n\r\n");
    Ok(Secret::new(end))
}

/// Appends `text` to `out` with each `%XX` decoded; `None` for a `%` not
/// followed by two hex digits. Never grows `out` beyond `text.len()`.
fn percent_decode(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let mut parts = text.split('%');
    out.extend_from_slice(parts.next()?.as_bytes());
    for part in parts {
        // `from_str_radix` alone would take `+F`.
        let hex = part.get(..2).filter(|h| !h.starts_with('+'))?;
        out.push(u8::from_str_radix(hex, 16).ok()?);
        out.extend_from_slice(&part.as_bytes()[2..]);
    }
    Some(())
}

/// One `NO_PROXY` entry as `Egress::carries` compares it; `None` if it is
/// not `*`, a name (`example.com`, `.example.com`) or an IP literal, each
/// with an optional `:port`.
fn bypass_entry(entry: &str) -> Option<String> {
    if entry == "*" || entry.parse::<IpAddr>().is_ok() {
        return Some(key(entry));
    }
    split_authority(entry.strip_prefix('.').unwrap_or(entry)).map(|(host, _)| key(host))
}

/// A host as compared with `NO_PROXY` entries, so that one ends with another
/// exactly when it is that host or a subdomain of that name: a name in lower
/// case after a `.`, an IP as `IpAddr` writes it in brackets (`[::1]` for
/// `0:0::1`), which no name's key ends with.
fn key(host: &str) -> String {
    let ip = host.parse::<IpAddr>().map(|ip| format!("[{ip}]"));
    ip.unwrap_or_else(|_| format!(".{}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> UpstreamUrl {
        UpstreamUrl::parse(text).unwrap()
    }

    #[test]
    fn proxy_urls() {
        let e = Egress::parse("http://proxy.corp:3128/", "").unwrap();
        assert_eq!(e.authority, "proxy.corp:3128");
        assert_eq!(e.end.expose(), b"\r\n");
        let e = Egress::parse("http://[::1]:8080", "").unwrap();
        assert_eq!(e.authority, "[::1]:8080");
        // `%XX` decoded; the last `@` ends USER:PASS.
        let e = Egress::parse("http://us%65r:p@ss%3a%2F@proxy:1", "").unwrap();
        // base64("user:p@ss:/")
        let end = b"Proxy-Authorization: Basic dXNlcjpwQHNzOi8=\r\n\r\n";
        assert_eq!(e.end.expose(), end);
        for bad in [
            "https://proxy:3128",
            "proxy:3128",
            "http://proxy",
            "http://proxy:0",
            "http://proxy:3128/path",
            "http://user@proxy:3128",
            "http://@proxy:3128",
            "http://user:pa%zzss@proxy:3128",
            "http://user:pass%4@proxy:3128",
            "http://user:pa%+Fss@proxy:3128",
        ] {
            let err = Egress::parse(bad, "").unwrap_err().to_string();
            assert!(err.starts_with("egress proxy URL: "), "{bad}: {err}");
            assert!(!err.contains("pass") && !err.contains("proxy:"), "{err}");
        }
    }

    #[test]
    fn no_proxy_matches_names_subdomains_and_ips() {
        let e = Egress::parse(
            "http://p:1",
            " example.com , .Other.org:8443,10.0.0.1:80, [::1], 0:0::2,,",
        )
        .unwrap();
        for bypassed in [
            "https://example.com",
            "https://api.example.com:8443",
            "https://a.b.EXAMPLE.com",
            "https://other.org",
            "https://x.other.org",
            "https://10.0.0.1",
            "https://[::1]:9",
            "https://[::2]",
        ] {
            assert!(!e.carries(&url(bypassed)), "{bypassed}");
        }
        for carried in [
            "https://badexample.com",
            "https://example.com.evil",
            "https://example.co",
            "https://10.0.0.10",
            "https://127.0.0.1",
            "https://localhost",
            "https://sub.10.0.0.1",
        ] {
            assert!(e.carries(&url(carried)), "{carried}");
        }
        // Plain http:// (loopback only) never goes through the proxy.
        assert!(!e.carries(&url("http://127.0.0.1:8080")));
        // A name entry never matches an IP's tail.
        let name = Egress::parse("http://p:1", "0.0.1").unwrap();
        assert!(name.carries(&url("https://127.0.0.1")));
        assert!(!name.carries(&url("https://x.0.0.1")));
        let all = Egress::parse("http://p:1", "*").unwrap();
        assert!(!all.carries(&url("https://api.example.com")));
        for bad in ["*.example.com", "10.0.0.0/8", "a b", "host:x"] {
            let err = Egress::parse("http://p:1", bad).unwrap_err();
            assert!(matches!(err, Error::BadNoProxy(ref e) if e == bad), "{bad}");
        }
    }

    #[test]
    fn connect_head_carries_target_host_and_credentials() {
        assert_eq!(
            connect_head(&url("https://api.example.com/v1")),
            "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n"
        );
        assert_eq!(
            connect_head(&url("https://[::1]:8443")),
            "CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
        );
        // RFC 7617 §2's example.
        let with = Egress::parse("http://Aladdin:open%20sesame@p:1", "").unwrap();
        let end = b"Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n";
        assert_eq!(with.end.expose(), end);
    }

    #[test]
    fn answers() {
        let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
        assert_eq!(parse_answer(ok), Ok(Scan::Complete(ok.len())));
        for n in 0..ok.len() {
            assert_eq!(parse_answer(&ok[..n]), Ok(Scan::Partial), "{n}");
        }
        // Framing fields in a 2xx are ignored; what follows the head is the caller's.
        let framed = b"HTTP/1.0 204 x\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_answer(framed), Ok(Scan::Complete(framed.len() - 5)));
        let refused =
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n";
        assert_eq!(parse_answer(refused), Err(Some(407)));
        assert_eq!(
            parse_answer(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            Err(Some(403))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Err(Some(100))
        );
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n"), Err(None));
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(MAX_ANSWER_BYTES - 1, b'a');
        assert_eq!(parse_answer(&long), Ok(Scan::Partial));
        long.push(b'a');
        assert_eq!(parse_answer(&long), Err(None));
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(33));
        assert_eq!(parse_answer(many.as_bytes()), Err(None));
    }
}
