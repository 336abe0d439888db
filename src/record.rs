//! One request's log record, filled in as the exchange goes and written as
//! one line when it ends: method, route, path (never the query, which may
//! carry a credential), status, payload bytes each way, duration.

use tokio::time::Instant;

use crate::route::RouteTable;

/// One request's log fields; one per connection, reused for each request.
pub(crate) struct Record {
    /// The log line so far: method and path once the head parsed.
    line: String,
    /// Index of the matched route, `usize::MAX` before routing.
    pub(crate) route: usize,
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) started: Instant,
    /// When the exchange ended, if the clock was already read for it.
    pub(crate) ended: Option<Instant>,
}

impl Record {
    /// An empty record.
    pub(crate) fn new() -> Record {
        Record {
            line: String::new(),
            route: usize::MAX,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            started: Instant::now(),
            ended: None,
        }
    }

    /// Starts the record of a new request at `now`.
    pub(crate) fn reset(&mut self, now: Instant) {
        self.line.clear();
        self.route = usize::MAX;
        self.status = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.started = now;
        self.ended = None;
    }

    /// Gives up the line's memory while the connection is idle.
    pub(crate) fn release(&mut self) {
        self.line = String::new();
    }

    /// Names the request: its method and path (both validated by the head
    /// parser: a token and bytes 0x21..=0x7E, so nothing to escape).
    pub(crate) fn name(&mut self, method: &str, path: &str) {
        self.line.clear();
        // Room for the whole line, so it is allocated once.
        self.line.reserve(method.len() + path.len() + 96);
        self.line.push_str(method);
        self.line.push(' ');
        self.line.push_str(path);
    }

    /// Writes the line. Formatted as a single message because per-field
    /// formatting cost more than the rest of a small request.
    pub(crate) fn log(&mut self, table: &RouteTable, reason: Option<&str>) {
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let ended = self.ended.unwrap_or_else(Instant::now);
        let ms = u64::try_from(ended.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        if self.line.is_empty() {
            // Refused before the head parsed: no method or path to name.
            self.line.push_str("- -");
        }
        self.line.push_str(" route=");
        self.line.push_str(table.prefix(self.route));
        let numbers = [
            (" status=", u64::from(self.status)),
            (" in=", self.bytes_in),
            (" out=", self.bytes_out),
            (" ms=", ms),
        ];
        for (name, value) in numbers {
            self.line.push_str(name);
            let mut digits = [0; 20];
            let digits = crate::head::decimal(value, &mut digits);
            self.line.extend(digits.iter().map(|&d| char::from(d)));
        }
        if let Some(reason) = reason {
            self.line.push_str(" refused: ");
            self.line.push_str(reason);
        }
        tracing::info!(message = self.line.as_str());
    }
}
