//! Routing and rewrite: the only place a client's head becomes an upstream head.
//!
//! `RouteTable::forward` runs the checks the contract orders after head syntax
//! (browser and Host 403, method 405, client key 401, route 404, framing 400)
//! and builds a `Forward`, whose fields are private: the upstream writer takes
//! nothing else, so an unrewritten head cannot reach an upstream.

use std::sync::{Arc, PoisonError, RwLock};

use zeroize::Zeroize;

use crate::budget::{Admission, Budget};
use crate::clients::Clients;
use crate::config::{check_value, Route, Secret};
use crate::error::Error;
use crate::error::Refusal;
use crate::head::{self, Expect, Framing, RequestHead};

/// The routes, longest prefix first, plus the per-proxy policy.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
    /// The values each route injects now, in the order of its headers:
    /// replaced whole by `set_header` and `reload`, so a request reads one
    /// consistent set and keeps it.
    values: Vec<RwLock<Arc<[Secret]>>>,
    clients: Arc<Clients>,
    allowed_hosts: Vec<String>,
}

/// A request rewritten for its upstream, ready to be written. Only
/// `RouteTable::forward` builds one, and `Upstream::send` takes nothing else.
pub(crate) struct Forward {
    route: usize,
    /// The client whose key the request carried (when keys are required,
    /// or the shared budget when limits are on), holding its concurrency
    /// slot while this lives.
    admission: Option<Admission>,
    /// The upstream head, which holds injected secrets: reserved exactly
    /// once so it never reallocates (a reallocation would free a copy of
    /// the key unzeroed), and zeroed on drop.
    head: Vec<u8>,
    framing: Framing,
    expect_continue: bool,
    is_head: bool,
    close: bool,
}

impl Drop for Forward {
    // The head holds injected secrets; do not leave them in freed memory.
    fn drop(&mut self) {
        self.head.zeroize();
    }
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("route", &self.route)
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl Forward {
    /// Index of the route (and upstream) this request goes to.
    pub(crate) fn route(&self) -> usize {
        self.route
    }
    /// The serialized upstream head.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }
    /// The admitted client, if any (see `Forward::admission`).
    pub(crate) fn admission(&self) -> Option<&Admission> {
        self.admission.as_ref()
    }
    /// Are the response's model tokens counted?
    pub(crate) fn counts_tokens(&self) -> bool {
        (self.admission.as_ref()).is_some_and(|a| a.budget().limits.counts_tokens())
    }
    /// The request body's framing.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }
    /// The client asked for `100-continue`.
    pub(crate) fn expect_continue(&self) -> bool {
        self.expect_continue
    }
    /// The method was HEAD (the response has no body).
    pub(crate) fn is_head(&self) -> bool {
        self.is_head
    }
    /// The client asked to close after this exchange.
    pub(crate) fn close(&self) -> bool {
        self.close
    }
}

impl RouteTable {
    /// Builds the table; routes are matched longest prefix first.
    pub(crate) fn new(
        mut routes: Vec<Route>,
        clients: Arc<Clients>,
        allowed_hosts: Vec<String>,
    ) -> RouteTable {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let values = (routes.iter())
            .map(|r| RwLock::new(r.headers.iter().map(|(_, v)| v.clone()).collect()))
            .collect();
        RouteTable {
            routes,
            values,
            clients,
            allowed_hosts,
        }
    }

    /// Replaces the value route `prefix` injects as `name` (a header it
    /// already injects); requests whose head is read afterwards carry it.
    pub(crate) fn set_header(&self, prefix: &str, name: &str, value: Secret) -> Result<(), Error> {
        let index = (self.routes.iter().position(|r| r.prefix == prefix))
            .ok_or_else(|| Error::UnknownRoute(prefix.to_owned()))?;
        let headers = &self.routes[index].headers;
        let slot = (headers
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name)))
        .ok_or_else(|| Error::BadHeaderName(name.to_owned()))?;
        check_value(&value, name)?;
        let mut values = self.values[index]
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = values.to_vec();
        next[slot] = value;
        *values = next.into();
        Ok(())
    }

    /// Reads every value that came from a file again; all or nothing: if one
    /// fails, nothing changes and the error says which. With `clients` (the
    /// clients file, read again), the file's clients are replaced too.
    pub(crate) fn reload(&self, clients: Option<Vec<crate::clients::Client>>) -> Result<(), Error> {
        let mut fresh = Vec::with_capacity(self.routes.len());
        for (route, current) in self.routes.iter().zip(&self.values) {
            let current = current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let mut next = Vec::with_capacity(current.len());
            for ((name, _), value) in route.headers.iter().zip(current.iter()) {
                let value = value.reread().transpose()?.unwrap_or_else(|| value.clone());
                check_value(&value, name)?;
                next.push(value);
            }
            fresh.push(next);
        }
        if let Some(clients) = clients {
            self.clients.replace_file_clients(clients)?;
        }
        for (slot, next) in self.values.iter().zip(fresh) {
            *slot.write().unwrap_or_else(PoisonError::into_inner) = next.into();
        }
        Ok(())
    }

    /// The client registry every connection checks keys against.
    pub(crate) fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The routes in match order (index = `Forward::route`).
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The prefix of route `index`, for logs.
    pub(crate) fn prefix(&self, index: usize) -> &str {
        self.routes.get(index).map_or("-", |r| r.prefix.as_str())
    }

    /// Runs the policy checks in the contract's order and rewrites the head.
    /// `max_body` is the optional body limit (413).
    pub(crate) fn forward(
        &self,
        req: &RequestHead<'_, '_>,
        max_body: Option<u64>,
    ) -> Result<Forward, Refusal> {
        // A web page in the host's browser, or DNS rebinding
        // (docs/strict-profile.md, "Browser and DNS-rebinding defence").
        if req.browser {
            return Err(Refusal::Browser);
        }
        if !head::host_is_local(req.host, &self.allowed_hosts) {
            return Err(Refusal::ForeignHost);
        }
        // TRACE would reflect the injected key (RFC 9110 §9.3.8).
        if req.trace {
            return Err(Refusal::MethodNotAllowed);
        }
        let client = if self.clients.required {
            Some(identify(req.headers, &self.clients).ok_or(Refusal::Unauthorized)?)
        } else {
            self.clients.anonymous.clone()
        };
        // Longest prefix on a segment boundary, case-sensitive
        // (docs/strict-profile.md, "Path safety").
        let index = self
            .routes
            .iter()
            .position(|r| prefix_matches(&r.prefix, req.path()))
            .ok_or(Refusal::NotFound)?;
        let route = &self.routes[index];
        if let Some(key) = &route.client_key {
            if !carries_client_key(req.headers, key.expose()) {
                return Err(Refusal::Unauthorized);
            }
        }
        if !route.allows.is_empty() && !allowed(req, route) {
            return Err(Refusal::NotAllowed);
        }
        let admission = client.as_ref().map(Budget::admit).transpose()?;
        let framing = req.framing?;
        if req.expect == Expect::Other {
            return Err(Refusal::ExpectationFailed);
        }
        if matches!((max_body, framing), (Some(limit), Framing::Length(n)) if n > limit) {
            return Err(Refusal::PayloadTooLarge);
        }
        // A nomination must not remove what framing or injection relies on
        // (RFC 9110 §7.6.1).
        let protected = |name: &[u8]| {
            let framing = [&b"host"[..], b"content-length", b"transfer-encoding"];
            framing.iter().any(|p| name.eq_ignore_ascii_case(p)) || route.injects(name)
        };
        if head::nominated(req.headers).any(protected) {
            return Err(Refusal::BadRequest(
                "Connection nominates a protected header",
            ));
        }
        let values = self.values[index]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let identity = (client.as_ref()).is_some_and(|c| c.limits.counts_tokens());
        Ok(Forward {
            route: index,
            admission,
            head: rewrite(req, route, &values, framing, identity),
            framing,
            expect_continue: req.expect == Expect::Continue && framing != Framing::Empty,
            is_head: req.method == "HEAD",
            close: req.close,
        })
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Appends the upstream target: the URL's path, the rest of the client's
/// path after the prefix, and the query, byte for byte (never decoded or
/// normalised: RFC 3986 §6 equivalences are the upstream's business).
fn push_target(out: &mut Vec<u8>, req: &RequestHead<'_, '_>, route: &Route) {
    let (url, prefix, target) = (&route.upstream, &route.prefix, req.target.as_bytes());
    let skip = if prefix == "/" { 0 } else { prefix.len() };
    let rest = target.get(skip..req.path_len).unwrap_or_default();
    out.extend_from_slice(url.path.as_bytes());
    out.extend_from_slice(rest);
    if url.path.is_empty() && rest.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(target.get(req.path_len..).unwrap_or_default());
}

/// Should this client header be dropped before forwarding (RFC 9110 §7.6.1
/// hop-by-hop fields, §7.8 Upgrade, and every credential)?
fn is_stripped(name: &str, req: &RequestHead<'_, '_>, route: &Route, nominates: bool) -> bool {
    const CREDENTIALS: [&str; 5] = [
        "host",
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "expect",
    ];
    head::is_hop_by_hop(name)
        || CREDENTIALS.iter().any(|c| c.eq_ignore_ascii_case(name))
        || route.injects(name.as_bytes())
        || (nominates && head::is_nominated(req.headers, name))
}

/// The upstream head. With `identity` (token budgets on), exactly one
/// `accept-encoding: identity` replaces the client's, so that the usage in
/// the response can be read (RFC 9110 §12.5.3).
fn rewrite(
    req: &RequestHead<'_, '_>,
    route: &Route,
    values: &[Secret],
    framing: Framing,
    identity: bool,
) -> Vec<u8> {
    // An upper bound of what is written below, so `out` never grows: the
    // fixed parts (request line and host field framing, the framing field,
    // `accept-encoding`, the final CRLF) take under 96 bytes, and each client field grows by
    // at most its `: ` and CRLF.
    let fields = req.headers.iter().map(|h| h.name.len() + h.value.len() + 4);
    let injected =
        (route.headers.iter().zip(values)).map(|((n, _), v)| n.len() + v.expose().len() + 4);
    let bound = 96
        + req.method.len()
        + route.upstream.path.len()
        + req.target.len()
        + route.upstream.authority.len()
        + fields.sum::<usize>()
        + injected.sum::<usize>();
    let mut out = Vec::with_capacity(bound);
    let capacity = out.capacity();
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    push_target(&mut out, req, route);
    for part in [" HTTP/1.1\r\nhost: ", &route.upstream.authority, "\r\n"] {
        out.extend_from_slice(part.as_bytes());
    }
    let nominates = head::nominates_others(req.headers);
    for h in req.headers {
        let encoding = identity && h.name.eq_ignore_ascii_case("accept-encoding");
        if !encoding && !is_stripped(h.name, req, route, nominates) {
            head::push_field(&mut out, h.name.as_bytes(), head::trim(h.value));
        }
    }
    for ((name, _), value) in route.headers.iter().zip(values) {
        head::push_field(&mut out, name.as_bytes(), value.expose());
    }
    if identity {
        out.extend_from_slice(b"accept-encoding: identity\r\n");
    }
    head::push_framing(&mut out, framing, None);
    out.extend_from_slice(b"\r\n");
    debug_assert_eq!(out.capacity(), capacity, "the upstream head reallocated");
    out
}

/// The credentials a request carries: every `x-api-key` value and every
/// `authorization` value (its `Bearer` token; another scheme counts as an
/// empty key, which matches none).
fn credentials<'a>(headers: &'a [httparse::Header<'a>]) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers.iter().filter_map(|h| {
        let value = head::trim(h.value);
        if h.name.eq_ignore_ascii_case("x-api-key") {
            Some(value)
        } else if h.name.eq_ignore_ascii_case("authorization") {
            Some(match value.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => head::trim(&value[7..]),
                _ => b"",
            })
        } else {
            None
        }
    })
}

/// Does the request carry the route's client key? Every credential must
/// carry it, and at least one must be there: two credentials that disagree
/// are refused, not guessed between (which one a server would read is
/// exactly the ambiguity a sandbox could exploit). Every one is compared,
/// so timing does not reveal which one failed.
fn carries_client_key(headers: &[httparse::Header<'_>], key: &[u8]) -> bool {
    let mut seen = false;
    let mut all_match = true;
    for candidate in credentials(headers) {
        seen = true;
        all_match &= constant_time_eq(candidate, key);
    }
    seen && all_match
}

/// The registered client whose key the request carries, by the same rule:
/// every credential must carry the same registered key.
fn identify(headers: &[httparse::Header<'_>], clients: &Clients) -> Option<Arc<Budget>> {
    let mut found: Option<Arc<Budget>> = None;
    let mut all_match = true;
    for candidate in credentials(headers) {
        match (clients.lookup(candidate), &found) {
            (Some(name), Some(first)) => all_match &= Arc::ptr_eq(&name, first),
            (Some(name), None) => found = Some(name),
            (None, _) => all_match = false,
        }
    }
    found.filter(|_| all_match)
}

/// Is the request on the route's allowlist? Entries match the upstream
/// path after the rewrite, without the query (README "Allowlists").
fn allowed(req: &RequestHead<'_, '_>, route: &Route) -> bool {
    let mut path = Vec::with_capacity(route.upstream.path.len() + req.target.len());
    push_target(&mut path, req, route);
    let path = &path[..path.len() - (req.target.len() - req.path_len)];
    route
        .allows
        .iter()
        .any(|allow| allow.matches(req.method, path))
}

/// Compares without an early exit: the time depends on the lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::head::{header_array, parse_request};

    fn table(key: Option<&str>) -> RouteTable {
        let routes = vec![
            Route::new("/", "https://root.example")
                .unwrap()
                .header("x-api-key", Secret::new("ROOTKEY")),
            Route::new("/openai", "https://api.openai.com/v1")
                .unwrap()
                .header("Authorization", Secret::new("Bearer OAI")),
            Route::new("/openai/files", "https://files.example/").unwrap(),
        ];
        let clients = Clients::new(key.is_some(), crate::budget::ClientLimits::default());
        if let Some(key) = key {
            clients.add("default", &Secret::new(key), None).unwrap();
        }
        RouteTable::new(routes, Arc::new(clients), vec!["allowed.example".into()])
    }

    fn forward(table: &RouteTable, req: &str) -> Result<(String, String), Refusal> {
        let mut storage = header_array();
        let head = parse_request(req.as_bytes(), &mut storage)?;
        let fwd = table.forward(&head, Some(1000))?;
        let host = table.routes()[fwd.route()].upstream.host.clone();
        Ok((host, String::from_utf8(fwd.head.clone()).unwrap()))
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let t = table(None);
        let go = |path: &str| {
            forward(
                &t,
                &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            )
            .unwrap()
        };
        let (host, head) = go("/openai/chat?x=1");
        assert_eq!(host, "api.openai.com");
        assert!(head.starts_with("GET /v1/chat?x=1 HTTP/1.1\r\nhost: api.openai.com\r\n"));
        assert!(go("/openai").1.starts_with("GET /v1 HTTP/1.1"));
        assert!(go("/openai?q").1.starts_with("GET /v1?q HTTP/1.1"));
        let (host, head) = go("/openaiX/chat");
        assert_eq!(host, "root.example");
        assert!(head.starts_with("GET /openaiX/chat HTTP/1.1"));
        assert_eq!(go("/openai/files/1").0, "files.example");
        assert!(go("/openai/files").1.starts_with("GET / HTTP/1.1"));
        assert!(go("/openai/files?a=b").1.starts_with("GET /?a=b HTTP/1.1"));
    }

    #[test]
    fn strips_credentials_and_hop_by_hop_and_injects_once() {
        let t = table(None);
        let (_, head) = forward(
            &t,
            "POST /openai/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAUTHORIZATION: Bearer client\r\nauthorization: x\r\nX-Api-Key: k\r\nProxy-Authorization: p\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 1\r\nTE: trailers\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\nX-Keep: a b \r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            head,
            "POST /v1/x HTTP/1.1\r\nhost: api.openai.com\r\nX-Keep: a b\r\nauthorization: Bearer OAI\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn policy_order_and_statuses() {
        let t = table(Some("placeholder"));
        let req = |extra: &str, path: &str| {
            forward(
                &t,
                &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"),
            )
            .map(|_| ())
        };
        assert_eq!(req("Origin: http://evil\r\n", "/"), Err(Refusal::Browser));
        assert!(matches!(
            forward(
                &t,
                "GET / HTTP/1.1\r\nHost: evil.example\r\nx-api-key: placeholder\r\n\r\n"
            ),
            Err(Refusal::ForeignHost)
        ));
        assert!(forward(
            &t,
            "GET / HTTP/1.1\r\nHost: allowed.example\r\nx-api-key: placeholder\r\n\r\n"
        )
        .is_ok());
        assert_eq!(
            forward(&t, "TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n").map(|_| ()),
            Err(Refusal::MethodNotAllowed)
        );
        assert_eq!(req("", "/"), Err(Refusal::Unauthorized));
        assert_eq!(
            req("x-api-key: placeholdeR\r\n", "/"),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(req("x-api-key: placeholder\r\n", "/"), Ok(()));
        assert_eq!(req("authorization: bearer placeholder\r\n", "/"), Ok(()));
        assert_eq!(
            req(
                "x-api-key: placeholder\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
                "/"
            ),
            Err(Refusal::BadRequest(
                "both Content-Length and Transfer-Encoding"
            ))
        );
        assert_eq!(
            req("x-api-key: placeholder\r\nContent-Length: 1001\r\n", "/"),
            Err(Refusal::PayloadTooLarge)
        );
        assert_eq!(
            req("x-api-key: placeholder\r\nExpect: x\r\n", "/"),
            Err(Refusal::ExpectationFailed)
        );
        assert!(matches!(
            req("x-api-key: placeholder\r\nConnection: host\r\n", "/"),
            Err(Refusal::BadRequest(_))
        ));
        // The route injects x-api-key, so nominating it is refused; other credentials may be.
        assert!(matches!(
            req("x-api-key: placeholder\r\nConnection: x-api-key\r\n", "/"),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(
            req(
                "x-api-key: placeholder\r\nConnection: authorization\r\n",
                "/"
            ),
            Ok(())
        );
        let only = RouteTable::new(
            vec![Route::new("/a", "https://h").unwrap()],
            Arc::new(Clients::new(false, crate::budget::ClientLimits::default())),
            vec![],
        );
        assert_eq!(
            forward(&only, "GET /b HTTP/1.1\r\nHost: localhost\r\n\r\n").map(|_| ()),
            Err(Refusal::NotFound)
        );
    }

    #[test]
    fn per_route_client_key() {
        let routes = vec![
            Route::new("/a", "https://a.example")
                .unwrap()
                .client_key(Secret::new("key-a")),
            Route::new("/b", "https://b.example").unwrap(),
        ];
        let t = RouteTable::new(
            routes,
            Arc::new(Clients::new(false, crate::budget::ClientLimits::default())),
            vec![],
        );
        let go = |path: &str, key: &str| {
            forward(
                &t,
                &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n\r\n"),
            )
            .map(|_| ())
        };
        assert_eq!(go("/a/x", "key-a"), Ok(()));
        assert_eq!(go("/a/x", "key-b"), Err(Refusal::Unauthorized));
        assert_eq!(go("/b/x", "anything"), Ok(()));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
