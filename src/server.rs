//! The accept loop and the public handle: connection permits, accept errors,
//! the shutdown signal and the bounded drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::budget::{ClientLimits, Usage};
use crate::clients::Clients;
use crate::config::{Limits, Route, Secret};
use crate::conn::{self, Phase, Shared};
use crate::egress::Egress;
use crate::error::{Error, Refusal};
use crate::route::RouteTable;
use crate::upstream::{self, Upstream, Wakeup};

/// Entry point of the library API.
///
/// ```no_run
/// # async fn run() -> Result<(), keyhole::Error> {
/// use keyhole::{Proxy, Route, Secret};
/// let proxy = Proxy::builder()
///     .listen("127.0.0.1:0".parse().unwrap())
///     .route(Route::new("/", "https://api.anthropic.com")?.header("x-api-key", Secret::from_env("ANTHROPIC_API_KEY")?))
///     .start()
///     .await?;
/// println!("listening on http://{}", proxy.local_addr());
/// proxy.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Proxy;

impl Proxy {
    /// A builder with no routes, listening on `127.0.0.1:0`, default limits.
    pub fn builder() -> Builder {
        Builder {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            routes: Vec::new(),
            clients: Vec::new(),
            clients_file: None,
            require_client_key: false,
            client_limits: ClientLimits::default(),
            listener: None,
            allowed_hosts: Vec::new(),
            ca_pems: Vec::new(),
            egress_proxy: None,
            limits: Limits::default(),
        }
    }
}

/// Configures and starts a proxy. Everything is validated by `start`.
/// Cloning gives the same configuration for another proxy (a runner that
/// starts one per sandbox); a listener given with `Builder::listener` is
/// shared, so each of them would accept on it.
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    listen: SocketAddr,
    routes: Vec<Route>,
    clients: Vec<(String, Secret)>,
    clients_file: Option<String>,
    require_client_key: bool,
    client_limits: ClientLimits,
    /// A socket the caller bound (see `Builder::listener`).
    listener: Option<Arc<std::net::TcpListener>>,
    allowed_hosts: Vec<String>,
    ca_pems: Vec<Vec<u8>>,
    /// The egress proxy's URL (a `Secret`: it may hold a password) and
    /// `NO_PROXY` list.
    egress_proxy: Option<(Secret, String)>,
    limits: Limits,
}

impl Builder {
    /// The address to bind; port 0 picks a free one (see `ProxyHandle::local_addr`).
    pub fn listen(mut self, addr: SocketAddr) -> Builder {
        self.listen = addr;
        self
    }

    /// Adds a route; the longest matching prefix wins.
    pub fn route(mut self, route: Route) -> Builder {
        self.routes.push(route);
        self
    }

    /// Requires every request to carry this key as `x-api-key` or
    /// `authorization: Bearer` (else 401): the client named `default`.
    pub fn client_key(self, key: Secret) -> Builder {
        self.client("default", key)
    }

    /// Registers a named client key (a sandbox's). Once any is given, every
    /// request must carry a registered key (else 401), and its log line
    /// names the client. Names are 1–64 bytes of `A-Z a-z 0-9 . _ -`;
    /// names and keys are unique (checked by `start`).
    pub fn client(mut self, name: &str, key: Secret) -> Builder {
        self.clients.push((name.to_owned(), key));
        self
    }

    /// The spend limits of every client registered without limits of its
    /// own (`ProxyHandle::add_client_with` gives one its own). While client
    /// keys are not required, all requests share one budget under them.
    pub fn client_limits(mut self, limits: ClientLimits) -> Builder {
        self.client_limits = limits;
        self
    }

    /// Registers the clients listed in a file (`NAME KEY` per line; empty
    /// lines and `#` comments skipped), read at start and again by
    /// `ProxyHandle::reload`, which revokes clients no longer listed.
    pub fn clients_file(mut self, path: &str) -> Builder {
        self.clients_file = Some(path.to_owned());
        self
    }

    /// Requires a client key even while none is registered: every request
    /// is 401 until `ProxyHandle::add_client` registers one.
    pub fn require_client_key(mut self) -> Builder {
        self.require_client_key = true;
        self
    }

    /// Serves on a socket the caller bound (inside a network namespace, or
    /// passed by systemd) instead of binding `listen`.
    pub fn listener(mut self, listener: std::net::TcpListener) -> Builder {
        self.listener = Some(Arc::new(listener));
        self
    }

    /// Accepts this name in the client's `Host` header, besides IP literals,
    /// `localhost` and `host.docker.internal`.
    pub fn allow_host(mut self, name: &str) -> Builder {
        self.allowed_hosts.push(name.to_owned());
        self
    }

    /// Trusts the certificates in this PEM text as upstream roots, on top of
    /// the built-in webpki roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Builder {
        self.ca_pems.push(pem.into());
        self
    }

    /// Sends `https://` upstream connections through the HTTP CONNECT
    /// proxy at `url`, `http://[USER:PASS@]HOST:PORT` (`%XX` in USER:PASS
    /// decoded), except those to hosts in `no_proxy`, a `NO_PROXY` list
    /// (`""` for none): comma-separated `*`, names (each with its
    /// subdomains) and IP literals, any `:port` ignored. Checked by `start`,
    /// whose errors never show the URL. The library reads no environment: a
    /// program that honours `HTTPS_PROXY` and `NO_PROXY` passes them here.
    pub fn egress_proxy(mut self, url: &str, no_proxy: &str) -> Builder {
        self.egress_proxy = Some((Secret::new(url), no_proxy.to_owned()));
        self
    }

    /// Replaces the limits and timeouts.
    pub fn limits(mut self, limits: Limits) -> Builder {
        self.limits = limits;
        self
    }

    /// Validates the configuration, binds, and starts accepting. The proxy
    /// is accepting connections when this returns.
    pub async fn start(self) -> Result<ProxyHandle, Error> {
        if self.routes.is_empty() {
            return Err(Error::NoRoutes);
        }
        self.limits.validate()?;
        for (i, route) in self.routes.iter().enumerate() {
            route.validate()?;
            if self.routes[..i].iter().any(|r| r.prefix == route.prefix) {
                return Err(Error::DuplicatePrefix(route.prefix.clone()));
            }
            (route.headers.iter()).for_each(|(_, v)| v.warn_if_world_readable());
            // One line per route: its prefix, upstream and the names it
            // injects, never a value.
            let names: Vec<&str> = route.headers.iter().map(|(n, _)| n.as_str()).collect();
            let (prefix, upstream) = (&route.prefix, &route.upstream);
            if names.is_empty() {
                tracing::warn!(%prefix, %upstream, "route injects no header");
            } else {
                tracing::info!(%prefix, %upstream, headers = names.join(","), "route");
            }
        }
        let required =
            self.require_client_key || !self.clients.is_empty() || self.clients_file.is_some();
        self.client_limits.validate()?;
        let clients = Arc::new(Clients::new(required, self.client_limits));
        for (name, key) in &self.clients {
            clients.add(name, key, None)?;
            key.warn_if_world_readable();
        }
        if let Some(path) = &self.clients_file {
            clients.replace_file_clients(crate::clients::read_clients_file(path)?)?;
        }
        let connector = upstream::tls_connector(&self.ca_pems)?;
        let egress = (self.egress_proxy.as_ref())
            .map(|(url, no_proxy)| Egress::parse(url.expose_secret(), no_proxy).map(Arc::new))
            .transpose()?;
        if let Some(e) = &egress {
            tracing::info!(egress_proxy = %e.authority, "https upstreams go through the egress proxy");
        }
        let table = RouteTable::new(self.routes, clients, self.allowed_hosts);
        let wakeup = Arc::new(Wakeup::default());
        let upstreams = (table.routes().iter())
            .map(|r| Upstream::new(&r.upstream, &connector, wakeup.clone(), egress.as_ref()))
            .collect::<Result<_, _>>()?;
        let bind = |err| Error::Bind(self.listen, err);
        let listener = match self.listener {
            // A descriptor of its own, as the builder may have been cloned.
            Some(shared) => (shared.set_nonblocking(true))
                .and_then(|()| TcpListener::from_std(shared.try_clone()?))
                .map_err(bind)?,
            None => TcpListener::bind(self.listen).await.map_err(bind)?,
        };
        let local_addr = listener.local_addr().map_err(bind)?;
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        let shared = Arc::new(Shared {
            table,
            upstreams,
            limits: self.limits,
        });
        // keyhole's tasks carry the caller's span (a runner's
        // `info_span!("sandbox", id = …)` then labels keyhole's events).
        let span = tracing::Span::current();
        let accept = accept_loop(listener, shared.clone(), phase_rx.clone(), permits.clone());
        let accept = tokio::spawn(accept.instrument(span.clone()));
        let pool = shared.clone();
        let reaper = async move {
            let max_age = pool.limits.pool_idle_timeout;
            tokio::select! {
                () = upstream::reap(&pool.upstreams, wakeup, max_age) => {}
                () = conn::reached(phase_rx, Phase::Closing) => {}
            }
        };
        tokio::spawn(reaper.instrument(span));
        Ok(ProxyHandle {
            local_addr,
            clients_file: self.clients_file,
            phase: phase_tx,
            permits,
            shared,
            accept,
        })
    }
}

/// A running proxy. Dropping it stops accepting and closes every connection
/// at once; `shutdown` does the same gracefully.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    clients_file: Option<String>,
    phase: watch::Sender<Phase>,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    /// The accept loop; aborting it once it ended does nothing.
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// The bound address (with the real port when 0 was asked for).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Registers a client under `name` with a fresh key, returned once: `kh_`
    /// and 43 base64url characters, 256 bits from the operating system's
    /// generator. Hand `expose_secret()` of it to the sandbox.
    pub fn add_client(&self, name: &str) -> Result<Secret, Error> {
        let key = crate::clients::generate_key()?;
        self.add_client_key(name, &key)?;
        Ok(key)
    }

    /// Registers a client under `name` with a key of the caller's.
    pub fn add_client_key(&self, name: &str, key: &Secret) -> Result<(), Error> {
        self.shared.table.clients().add(name, key, None)
    }

    /// `add_client` with spend limits of the client's own in place of
    /// `Builder::client_limits`.
    pub fn add_client_with(&self, name: &str, limits: ClientLimits) -> Result<Secret, Error> {
        let key = crate::clients::generate_key()?;
        self.shared.table.clients().add(name, &key, Some(limits))?;
        Ok(key)
    }

    /// What the client `name` has used since the proxy started (`-`: the
    /// budget unidentified requests share); `None` for no such client.
    #[must_use]
    pub fn usage(&self, name: &str) -> Option<Usage> {
        self.shared.table.clients().usage(name)
    }

    /// Revokes a client: once this returns, no request carrying its key is
    /// forwarded, also on connections already open; requests already
    /// forwarded finish. False if no client had that name.
    #[allow(clippy::must_use_candidate)] // revoking is the point; the answer is optional
    pub fn remove_client(&self, name: &str) -> bool {
        self.shared.table.clients().remove(name)
    }

    /// Replaces the value the route with `prefix` injects as `name` (one of
    /// the headers it was configured with), for a runner that holds keys in
    /// memory (from a vault, say). Requests whose head is read afterwards
    /// carry the new value; requests in flight keep theirs.
    pub fn set_header(&self, prefix: &str, name: &str, value: Secret) -> Result<(), Error> {
        self.shared.table.set_header(prefix, name, value)
    }

    /// Reads every `${file:…}` value and the clients file again, all or
    /// nothing: on success the requests whose head is read afterwards use
    /// the new values (those in flight keep theirs) and clients gone from
    /// the file are revoked; on failure nothing changes and the error names
    /// the file.
    pub fn reload(&self) -> Result<(), Error> {
        let file = self.clients_file.as_deref();
        let clients = file.map(crate::clients::read_clients_file).transpose()?;
        self.shared.table.reload(clients)?;
        tracing::info!("reloaded");
        Ok(())
    }

    /// Stops accepting, lets requests in flight finish for up to the drain
    /// timeout, then closes whatever is left (a cut-off body never looks
    /// complete) and returns.
    pub async fn shutdown(mut self) {
        let drain = self.shared.limits.drain_timeout;
        self.phase.send_replace(Phase::Draining);
        let _ = (&mut self.accept).await;
        // At most a million (`Limits::validate`), so this fits.
        let all = u32::try_from(self.shared.limits.max_connections).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(drain, self.permits.acquire_many(all)).await;
        // Closing also ends the pool's reaper, which closes idle upstream
        // connections as it goes.
        self.phase.send_replace(Phase::Closing);
        if drained.is_err() {
            // Closing tasks only need to be polled once to drop their sockets.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.permits.acquire_many(all)).await;
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Closing);
        self.accept.abort();
    }
}

/// Pause after an accept error such as running out of file descriptors,
/// so the loop does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    permits: Arc<Semaphore>,
) {
    let turn_away_permits = Arc::new(Semaphore::new(TURN_AWAY_PERMITS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p != Phase::Running) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Response heads and SSE events are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        // The futures are made inside the tasks: made outside and moved
        // in, each would take its room twice in every task, a kilobyte more
        // per idle connection.
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            let (shared, phase) = (shared.clone(), phase.clone());
            let serve = async move {
                conn::serve(stream, shared, phase).await;
                drop(permit);
            };
            tokio::spawn(serve.in_current_span());
        } else if let Ok(permit) = turn_away_permits.clone().try_acquire_owned() {
            tokio::spawn(async move {
                turn_away(stream).await;
                drop(permit);
            });
        }
        // Beyond both limits the connection is closed at once, unanswered:
        // a flood must not grow the number of tasks.
    }
}

/// Most connections answered 503 at once; each holds a task for up to
/// `TURN_AWAY_TIME`.
const TURN_AWAY_PERMITS: usize = 64;
const TURN_AWAY_TIME: Duration = Duration::from_secs(1);

/// Over the connection limit: a clear 503 rather than a silent queue.
async fn turn_away(mut stream: TcpStream) {
    let response = Refusal::Unavailable.response();
    let _ = tokio::time::timeout(TURN_AWAY_TIME, stream.write_all(&response)).await;
}
