//! One request's audit record, filled in as the exchange goes and emitted
//! as one `tracing` event with named fields when it ends (README "Audit
//! log"): client, route, method, path (never the query, which may carry a
//! credential), status, payload bytes each way, durations, the upstream's
//! request id and keyhole's error code.

use std::sync::Arc;

use tokio::time::Instant;

use crate::route::RouteTable;

/// One request's log fields; one per connection, reused for each request.
pub(crate) struct Record {
    /// The method followed by the path, once the head parsed.
    name: String,
    method_len: usize,
    /// The client whose key the request carried, when keys are required.
    pub(crate) client: Option<Arc<str>>,
    /// Index of the matched route, `usize::MAX` before routing.
    pub(crate) route: usize,
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) started: Instant,
    /// From the request sent to the response head.
    pub(crate) upstream_ms: Option<u64>,
    /// The upstream response's `request-id` or `x-request-id`.
    pub(crate) request_id: String,
    /// When the exchange ended, if the clock was already read for it.
    pub(crate) ended: Option<Instant>,
    /// Model tokens in and out the response reported (token budgets).
    pub(crate) tokens: Option<(u64, u64)>,
}

/// Longest upstream request id kept for the log.
pub(crate) const MAX_REQUEST_ID: usize = 128;

impl Record {
    /// An empty record.
    pub(crate) fn new() -> Record {
        Record {
            name: String::new(),
            method_len: 0,
            client: None,
            route: usize::MAX,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            started: Instant::now(),
            upstream_ms: None,
            request_id: String::new(),
            ended: None,
            tokens: None,
        }
    }

    /// Starts the record of a new request at `now`.
    pub(crate) fn reset(&mut self, now: Instant) {
        self.name.clear();
        self.method_len = 0;
        self.client = None;
        self.route = usize::MAX;
        self.status = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.started = now;
        self.upstream_ms = None;
        self.request_id.clear();
        self.ended = None;
        self.tokens = None;
    }

    /// Gives up the strings' memory while the connection is idle.
    pub(crate) fn release(&mut self) {
        self.name = String::new();
        self.request_id = String::new();
    }

    /// Names the request: its method and path (both validated by the head
    /// parser: a token and bytes 0x21..=0x7E).
    pub(crate) fn name(&mut self, method: &str, path: &str) {
        self.name.clear();
        self.name.push_str(method);
        self.name.push_str(path);
        self.method_len = method.len();
    }

    /// Emits the request's event (target `keyhole::request`), with the
    /// `keyhole-error` code and reason if keyhole answered itself.
    pub(crate) fn log(&mut self, table: &RouteTable, error: Option<(&'static str, &'static str)>) {
        if !tracing::enabled!(target: "keyhole::request", tracing::Level::INFO) {
            return;
        }
        let ended = self.ended.unwrap_or_else(Instant::now);
        let duration_ms = u64::try_from(ended.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let (method, path) = match self.name.split_at(self.method_len) {
            ("", _) => ("-", "-"),
            named => named,
        };
        let request_id = Some(self.request_id.as_str()).filter(|id| !id.is_empty());
        tracing::info!(
            target: "keyhole::request",
            client = self.client.as_deref().unwrap_or("-"),
            route = table.prefix(self.route),
            method,
            path,
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms,
            upstream_ms = self.upstream_ms,
            upstream_request_id = request_id,
            tokens_in = self.tokens.map(|t| t.0),
            tokens_out = self.tokens.map(|t| t.1),
            error = error.map(|(code, _)| code),
            reason = error.map(|(_, reason)| reason),
            "request"
        );
    }
}

/// Keeps an upstream request id for the log: its visible ASCII bytes, at
/// most `MAX_REQUEST_ID` of them.
pub(crate) fn keep_request_id(kept: &mut String, value: &[u8]) {
    kept.clear();
    let visible = value.iter().filter(|b| b.is_ascii_graphic());
    kept.extend(visible.take(MAX_REQUEST_ID).map(|&b| char::from(b)));
}
