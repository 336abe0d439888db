//! keyhole: a small, strict HTTP/1.1 proxy that lets a sandbox call paid
//! APIs without ever holding the API key.
//!
//! The sandbox sends plain HTTP/1.1 to keyhole on the host. keyhole drops
//! whatever credentials the sandbox sent, injects the real key, and relays
//! the request over TLS (rustls) to the configured upstream, streaming both
//! bodies with their payload bytes unchanged.
//!
//! ```no_run
//! use keyhole::{Proxy, Route, Secret};
//! # async fn run() -> Result<(), keyhole::Error> {
//! let proxy = Proxy::builder()
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .route(Route::new("/", "https://api.anthropic.com")?.header("x-api-key", Secret::from_env("ANTHROPIC_API_KEY")?))
//!     .start()
//!     .await?; // bound and accepting when it returns
//! let port = proxy.local_addr().port();
//! # let _ = port;
//! proxy.shutdown().await; // graceful; dropping the handle also stops it
//! # Ok(()) }
//! ```
//!
//! # Threat model
//!
//! keyhole defends the key against the code in the sandbox, which it treats
//! as hostile: that code may send any bytes, open many connections, stall,
//! or try to make keyhole and the upstream disagree about where a request
//! ends (request smuggling) so that an unchecked request carries the key.
//!
//! - **Smuggling.** Every head is parsed strictly (RFC 9112, keyhole's strict
//!   profile): anything ambiguous — Content-Length with Transfer-Encoding,
//!   duplicate lengths, bad chunk framing, bare LF, obs-fold — is refused with
//!   a 4xx and the connection is closed; nothing of it reaches the upstream.
//!   keyhole re-serializes every head and re-frames every chunked body itself.
//! - **Steering.** The client never chooses the upstream: only the path
//!   prefix selects a configured route; `Host`, absolute-form targets and
//!   CONNECT are refused or ignored; dot segments and encoded slashes that
//!   could escape a route's base path are refused, never normalised.
//! - **Leaks.** Injected values live in [`Secret`], which has no `Display`, a
//!   redacted `Debug`, and is zeroed on drop. Logs carry method, route, path
//!   (no query), status, sizes and time, never header values. Generated
//!   responses are fixed strings. `TRACE` is refused (it would echo the key).
//! - **Browsers.** A web page in the host's browser can reach loopback:
//!   requests with `Origin`/`Sec-Fetch-Site`, or with a `Host` that is not an
//!   IP literal, `localhost`, `host.docker.internal` or an allowed name
//!   (DNS rebinding), are refused.
//! - **Exhaustion.** Heads, header counts, chunk extensions, trailers and
//!   connections are bounded; every wait has a timeout; bodies stream through
//!   fixed buffers.
//!
//! keyhole assumes the host and its environment are trusted, that upstream
//! TLS certificates are verified against the webpki roots (plus any CA the
//! operator adds), and that the configured upstreams never echo request
//! headers back. It does not filter what the sandbox asks the API to do, rate
//! limit, tunnel `WebSocket` or HTTP/2, or protect a key from the upstream itself.
//!
//! # Life of a request
//!
//! `server` accepts and hands each connection to `conn::serve`, whose
//! `Handler` holds the connection's state and runs one step per method: it
//! reads a head (`relay::read_head`, scanned as bytes arrive by
//! `head::HeadScan`, which refuses a head as soon as it cannot become valid),
//! validates it (`head::parse_request`), applies policy and rewrites it
//! (`route::RouteTable::forward`, producing an unforgeable `Forward`), sends
//! it with the first body bytes in one write on a pooled or new connection
//! (`upstream::Upstream::send`, which takes nothing but a `Forward`), pumps
//! the body (`relay::pump` with `body::Reframer`), reads and validates the
//! response head (`head::parse_response`) and relays the response body the
//! same way. `upstream::reap` closes idle pooled connections the upstream
//! closed or that outlived the pool's idle time. The strict rules, each
//! with its RFC section, are in `docs/strict-profile.md`.
#![forbid(unsafe_code)]

mod body;
mod clients;
mod config;
mod conn;
mod error;
mod head;
mod record;
mod relay;
mod route;
mod server;
mod upstream;
// Not yet wired into the relay: until it is, only the fuzzing seam calls it.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
mod usage;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// The binary's JSON log escaper, here for its fuzz target only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod json;

pub use config::{Limits, Route, Secret};
pub use error::Error;
pub use server::{Builder, Proxy, ProxyHandle};
