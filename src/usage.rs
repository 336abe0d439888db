//! Model-token usage, read from a response body as it is relayed: pure over
//! bytes, no IO, no tokio, no clocks, no allocation.
//!
//! `UsageScan` observes (never alters) the payload bytes of a JSON body
//! (RFC 8259) or of a server-sent event stream, whose events' `data` are
//! JSON texts (WHATWG HTML §9.2). The fields `input_tokens`, `output_tokens`,
//! `cache_creation_input_tokens`, `cache_read_input_tokens`, `prompt_tokens`
//! and `completion_tokens` count only as direct members, with a non-negative
//! integer value, of an object that is the value of a `usage` member, at any
//! depth; for each, the largest value seen is kept. Its state is a few words
//! whatever the input: a depth counter, two bit stacks for the outermost
//! `MAX_DEPTH` containers, a short name buffer and a number accumulator.
//! String content and SSE `data` values are read in runs, every other byte
//! moves the state one step, so the result is the same however the body is
//! split.

use crate::head::trim;

/// Containers tracked as object or array and as usage object or not: the
/// width of the bit stacks. Deeper ones are only counted (no usage object is
/// seen there), so a deep document cannot hide the usage that follows it.
const MAX_DEPTH: u32 = u64::BITS;
/// Longest member name kept: the longest field (`cache_creation_input_tokens`,
/// 27 bytes) fits; a longer name matches none.
const MAX_KEY: usize = 32;
/// The fields counted, in the order of `Usage::counts`: Anthropic's, then
/// `OpenAI`'s.
const FIELDS: [&[u8]; 6] = [
    b"input_tokens",
    b"output_tokens",
    b"cache_creation_input_tokens",
    b"cache_read_input_tokens",
    b"prompt_tokens",
    b"completion_tokens",
];

/// What kind of body, from the response's content-type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// `application/json`: one JSON text (RFC 8259).
    Json,
    /// `text/event-stream`: server-sent events (WHATWG HTML §9.2).
    EventStream,
}

/// The body kind of a `content-type` value, or `None` for any other media
/// type. The type and subtype are case-insensitive and parameters (such as
/// `charset`) do not matter (RFC 9110 §8.3.1); OWS around them is dropped.
pub(crate) fn body_kind(content_type: &[u8]) -> Option<BodyKind> {
    match trim(content_type.split(|&b| b == b';').next()?) {
        m if m.eq_ignore_ascii_case(b"application/json") => Some(BodyKind::Json),
        m if m.eq_ignore_ascii_case(b"text/event-stream") => Some(BodyKind::EventStream),
        _ => None,
    }
}

/// Token counts seen so far in one response: for each field, the largest
/// value seen (the counts are cumulative, as in Anthropic's `message_start`
/// then `message_delta`), 0 when never seen. Public only for the fuzzing
/// seam (`fuzzing::TokenCounts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub))]
pub struct Usage {
    /// `input_tokens`, `output_tokens`, `cache_creation_input_tokens`,
    /// `cache_read_input_tokens`, `prompt_tokens`, `completion_tokens`.
    pub counts: [u64; 6],
}

#[cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub))]
impl Usage {
    /// Input + cache creation + cache read + prompt tokens, saturating.
    #[must_use]
    pub fn tokens_in(&self) -> u64 {
        let [input, _, creation, read, prompt, _] = self.counts;
        input
            .saturating_add(creation)
            .saturating_add(read)
            .saturating_add(prompt)
    }

    /// Output + completion tokens, saturating.
    #[must_use]
    pub fn tokens_out(&self) -> u64 {
        let [_, output, .., completion] = self.counts;
        output.saturating_add(completion)
    }

    /// Whether any field was seen with a count: a usage of zeros charges
    /// nothing, so it is not told apart from none.
    #[must_use]
    pub fn seen(&self) -> bool {
        *self != Usage::default()
    }
}

/// Reads the usage of one response body, fed in the pieces it arrives in.
#[derive(Debug, Default)]
pub(crate) struct UsageScan {
    /// The JSON body, or the current event's `data`.
    json: Json,
    /// The largest value of each field so far.
    usage: Usage,
    /// Where an event stream is in its current line; `None` for a JSON body.
    line: Option<Line>,
    /// The last byte was a CR, so an LF now ends no further line.
    after_cr: bool,
}

/// Where an event stream is in a line (WHATWG HTML §9.2.6). A leading
/// byte order mark is not skipped (§9.2.5): the APIs read here send none,
/// and with one only a first line of `data` would be missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// In the field name, after this many bytes of `data:`: `Name(0)` is the
    /// start of the line, `Name(5)` just after `data:`, where one space is
    /// not part of the value.
    Name(u8),
    /// In a `data` value, which goes to the JSON tokenizer.
    Data,
    /// In a comment or a field other than `data`, ignored.
    Skip,
}

impl UsageScan {
    /// A scanner for a body of `kind`, nothing seen yet.
    pub(crate) fn new(kind: BodyKind) -> UsageScan {
        UsageScan {
            line: (kind == BodyKind::EventStream).then_some(Line::Name(0)),
            ..UsageScan::default()
        }
    }

    /// Observes the next payload bytes of the body.
    pub(crate) fn feed(&mut self, payload: &[u8]) {
        let Some(mut line) = self.line else {
            self.json.feed(payload, &mut self.usage);
            return;
        };
        let mut i = 0;
        while let Some(&b) = payload.get(i) {
            i += 1;
            let after_cr = std::mem::replace(&mut self.after_cr, b == b'\r');
            line = match line {
                // A line ends with CRLF, LF or CR (WHATWG HTML §9.2.5).
                _ if b == b'\n' && after_cr => continue,
                // An empty line ends the event: the next data is a new JSON text.
                Line::Name(0) if b == b'\r' || b == b'\n' => {
                    self.json = Json::default();
                    Line::Name(0)
                }
                // One event's data lines are joined with LF (§9.2.6), JSON whitespace
                // (`data` without a colon is an empty one). Other lines end with one
                // too: it only ever follows another, or starts the text, where a
                // second changes nothing.
                _ if b == b'\r' || b == b'\n' => {
                    self.json.feed(b"\n", &mut self.usage);
                    Line::Name(0)
                }
                // Only `data` counts; a line starting with `:` is a comment (§9.2.6).
                Line::Name(n) if b"data:".get(usize::from(n)) == Some(&b) => Line::Name(n + 1),
                Line::Name(5) if b == b' ' => Line::Data,
                Line::Name(5) | Line::Data => {
                    // The rest of the value, from `b` (so the run is at least 1), at once.
                    let rest = &payload[i - 1..];
                    let run = rest.iter().position(|&b| b == b'\r' || b == b'\n');
                    let run = run.unwrap_or(rest.len());
                    i += run - 1;
                    self.json.feed(&rest[..run], &mut self.usage);
                    Line::Data
                }
                Line::Name(_) | Line::Skip => Line::Skip,
            };
        }
        self.line = Some(line);
    }

    /// The counts seen so far.
    pub(crate) fn usage(&self) -> Usage {
        self.usage
    }
}

/// Where the JSON tokenizer is (RFC 8259). Strings are read exactly, so no
/// content is taken for structure; of the rest only what finding usage
/// needs is tracked: the nesting, and which string was a member name (the
/// one a `:` follows, §4). Some grammar errors (a missing or doubled comma,
/// `[1:2]`) go unnoticed: a valid document is read the same for it, and an
/// invalid one can at worst count a usage its own sender wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Between tokens.
    #[default]
    Between,
    /// In a string (§7).
    Str,
    /// After a backslash in a string.
    Escape,
    /// In a number (§6) or a literal (`true`, `false`, `null`), skipped as a
    /// run of the bytes they are made of, not spelled out. Its value so far
    /// is in `number`; it counts only while it is a non-negative integer.
    Scalar,
    /// After the top-level object or array: only whitespace may follow (§2).
    Done,
    /// Malformed: everything else is ignored.
    Error,
}

/// What the member name before a `:` means for the value that follows.
#[derive(Debug, Clone, Copy, Default)]
enum Member {
    /// Nothing: its value does not count.
    #[default]
    Other,
    /// `usage`: an object value is a usage object.
    Usage,
    /// One of `FIELDS`, a direct member of a usage object: its index.
    Count(usize),
}

/// An incremental JSON tokenizer that tracks only what finding usage needs.
#[derive(Debug, Clone, Default)]
struct Json {
    state: State,
    /// Containers open around the current position.
    depth: u32,
    /// Bit `d - 1`: the container at depth `d` is an object, not an array.
    objects: u64,
    /// Bit `d - 1`: the container at depth `d` is a usage object.
    usages: u64,
    /// The first bytes of the last string, which a `:` makes a member name.
    key: [u8; MAX_KEY],
    /// The length of the last string; over `MAX_KEY` (so not all in `key`)
    /// when the name cannot match.
    key_len: usize,
    /// Set by a `:`, taken by the value after it; `Other` once a number
    /// cannot be a count.
    member: Member,
    /// The integer being read, saturating.
    number: u64,
}

impl Json {
    /// Reads the next bytes, raising `usage` for each field seen.
    fn feed(&mut self, bytes: &[u8], usage: &mut Usage) {
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            i += 1;
            let blank = matches!(b, b' ' | b'\t' | b'\n' | b'\r'); // §2
            let scalar = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-');
            match self.state {
                // String content is skipped in one run up to `"` or `\`.
                State::Str => {
                    let rest = &bytes[i - 1..];
                    let run = rest.iter().position(|&b| b == b'"' || b == b'\\');
                    let run = run.unwrap_or(rest.len());
                    self.push_key(&rest[..run]);
                    i += run;
                    match rest.get(run) {
                        Some(b'"') => self.state = State::Between,
                        // Names with escapes are not matched: real APIs never send one.
                        Some(_) => (self.state, self.key_len) = (State::Escape, MAX_KEY + 1),
                        None => {}
                    }
                }
                // Every escape is `\` and one byte; `\uXXXX` digits are plain content (§7).
                State::Escape => self.state = State::Str,
                State::Scalar if b.is_ascii_digit() => {
                    let digit = u64::from(b - b'0');
                    self.number = self.number.saturating_mul(10).saturating_add(digit);
                }
                // A sign, fraction, exponent or letter: not a count.
                State::Scalar if scalar => self.member = Member::Other,
                State::Scalar => {
                    if let Member::Count(field) = std::mem::take(&mut self.member) {
                        usage.counts[field] = usage.counts[field].max(self.number);
                    }
                    // The byte that ended it is read again, between tokens.
                    (self.state, i) = (State::Between, i - 1);
                }
                State::Between | State::Done if blank => {}
                State::Between => self.token(b),
                State::Done => self.state = State::Error,
                State::Error => return,
            }
        }
    }

    /// Reads a token's first byte: the member set by a `:` goes to the value
    /// that starts here, if one does.
    fn token(&mut self, b: u8) {
        let member = std::mem::take(&mut self.member);
        match b {
            b'"' => (self.state, self.key_len) = (State::Str, 0),
            b':' => self.member = self.name(),
            b',' => {}
            b'{' | b'[' => self.open(b == b'{', member),
            b'}' | b']' => self.close(b == b'}'),
            b'0'..=b'9' => {
                (self.state, self.member) = (State::Scalar, member);
                self.number = u64::from(b - b'0');
            }
            b'-' | b't' | b'f' | b'n' => self.state = State::Scalar,
            _ => self.state = State::Error,
        }
    }

    /// Opens an object or array, the value of `member`.
    fn open(&mut self, object: bool, member: Member) {
        // Past u32::MAX levels opens stop counting, so a close comes early: no
        // panic, and nothing that deep counts anyway.
        self.depth = self.depth.saturating_add(1);
        let (bit, usage) = (self.bit(), object && matches!(member, Member::Usage));
        self.objects = (self.objects & !bit) | if object { bit } else { 0 };
        self.usages = (self.usages & !bit) | if usage { bit } else { 0 };
    }

    /// Closes the innermost container with `}` (`object`) or `]`; a close
    /// that matches no open is malformed.
    fn close(&mut self, object: bool) {
        let bit = self.bit();
        match self.depth.checked_sub(1) {
            Some(depth) if bit == 0 || (self.objects & bit != 0) == object => {
                self.depth = depth;
                if depth == 0 {
                    self.state = State::Done;
                }
            }
            _ => self.state = State::Error,
        }
    }

    /// The bit of the innermost container in `objects` and `usages`; 0 at
    /// the top level and deeper than `MAX_DEPTH`.
    fn bit(&self) -> u64 {
        match self.depth {
            1..=MAX_DEPTH => 1 << (self.depth - 1),
            _ => 0,
        }
    }

    /// Keeps the next bytes of a string while they fit.
    fn push_key(&mut self, bytes: &[u8]) {
        let start = self.key_len;
        self.key_len = start.saturating_add(bytes.len());
        if let Some(room) = self.key.get_mut(start..self.key_len) {
            room.copy_from_slice(bytes);
        }
    }

    /// What the last string means as a member name of the innermost object.
    fn name(&self) -> Member {
        let name = self.key.get(..self.key_len).unwrap_or_default();
        match FIELDS.iter().position(|&field| field == name) {
            Some(field) if self.usages & self.bit() != 0 => Member::Count(field),
            _ if name == b"usage" => Member::Usage,
            _ => Member::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anthropic, not streamed: the text holds a fake usage inside a string.
    const ANTHROPIC_JSON: &str = r#"{"id":"msg_01","type":"message","role":"assistant","content":[{"type":"text","text":"Hi \"usage\": {\"input_tokens\": 999}"}],"model":"claude-x","stop_reason":"end_turn","usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"output_tokens":12,"cache_creation":{"ephemeral_5m_input_tokens":0},"server_tool_use":{"web_search_requests":0}}}"#;
    /// Anthropic, streamed: input in `message_start`, output in `message_delta`.
    const ANTHROPIC_SSE: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-x\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    /// `OpenAI`, not streamed: `prompt_tokens_details` is nested, not counted.
    const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    /// `OpenAI`, streamed with `include_usage`.
    const OPENAI_SSE: &str = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: {\"id\":\"c\",\"choices\":[{\"delta\":{}, \"finish_reason\":\"stop\"}],\"usage\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\ndata: [DONE]\n\n";

    fn scan(kind: BodyKind, pieces: &[&[u8]]) -> Usage {
        let mut scan = UsageScan::new(kind);
        for piece in pieces {
            scan.feed(piece);
        }
        scan.usage()
    }

    /// The usage of `body` fed whole, after asserting that every split in
    /// two and byte-by-byte feeding give the same.
    fn usage(kind: BodyKind, body: &str) -> Usage {
        let body = body.as_bytes();
        let whole = scan(kind, &[body]);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(scan(kind, &[a, b]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan(kind, &bytes), whole, "byte by byte");
        whole
    }

    fn in_out(kind: BodyKind, body: &str) -> (u64, u64) {
        let u = usage(kind, body);
        (u.tokens_in(), u.tokens_out())
    }

    use BodyKind::{EventStream as Sse, Json as J};

    #[test]
    fn real_shapes() {
        let u = usage(J, ANTHROPIC_JSON);
        assert_eq!(u.counts, [25, 12, 3, 4, 0, 0]);
        assert_eq!((u.tokens_in(), u.tokens_out()), (32, 12));
        assert_eq!(in_out(Sse, ANTHROPIC_SSE), (25, 15));
        assert_eq!(in_out(J, OPENAI_JSON), (9, 12));
        assert_eq!(in_out(Sse, OPENAI_SSE), (9, 2));
        assert!(usage(Sse, OPENAI_SSE).seen());
    }

    #[test]
    fn the_kind_must_match_the_body() {
        // An event stream read as one JSON text is malformed after `event`.
        assert_eq!(usage(J, ANTHROPIC_SSE), Usage::default());
        assert!(!usage(J, ANTHROPIC_SSE).seen());
        // A JSON body is one line of an unknown field to SSE.
        assert_eq!(usage(Sse, ANTHROPIC_JSON), Usage::default());
    }

    #[test]
    fn sse_line_ends_and_fields() {
        let crlf = ANTHROPIC_SSE.replace('\n', "\r\n");
        assert_eq!(in_out(Sse, &crlf), (25, 15));
        let cr = ANTHROPIC_SSE.replace('\n', "\r");
        assert_eq!(in_out(Sse, &cr), (25, 15));
        // One event's data lines are joined with LF: JSON whitespace.
        let multi = "data: {\"usage\":\r\ndata:{\"input_tokens\"\ndata:  :7}}\r\r\n";
        assert_eq!(in_out(Sse, multi), (7, 0));
        // `data` without a colon adds an empty line to the data.
        assert_eq!(
            in_out(
                Sse,
                "data: {\"usage\"\ndata\ndata: :{\"output_tokens\":3}}\n\n"
            ),
            (0, 3)
        );
        // Comments, other fields and near-misses are not data.
        let others = ": {\"usage\":{\"input_tokens\":1}}\nid: {\"usage\":{\"input_tokens\":2}}\ndat: {\"usage\":{\"input_tokens\":3}}\ndatas: {\"usage\":{\"input_tokens\":4}}\nDATA: {\"usage\":{\"input_tokens\":5}}\n\n";
        assert_eq!(usage(Sse, others), Usage::default());
        // An unfinished event does not spill into the next one.
        assert_eq!(
            in_out(Sse, "data: {\"usage\":{\"input_tokens\":\n\ndata: 5}\n\n"),
            (0, 0)
        );
        assert_eq!(
            in_out(
                Sse,
                "data: {\"x\":\"\n\ndata: {\"usage\":{\"input_tokens\":6}}\n\n"
            ),
            (6, 0)
        );
        // Without the space after the colon, and with a second space kept (JSON whitespace).
        assert_eq!(
            in_out(Sse, "data:{\"usage\":{\"prompt_tokens\":8}}\n\n"),
            (8, 0)
        );
    }

    #[test]
    fn only_direct_members_of_a_usage_object_count() {
        let cases = [
            (r#"{"input_tokens":5,"x":{"output_tokens":6}}"#, (0, 0)),
            (
                r#"{"usage":{"details":{"input_tokens":5}},"output_tokens":6}"#,
                (0, 0),
            ),
            (r#"{"a":[{"b":[{"usage":{"input_tokens":5}}]}]}"#, (5, 0)),
            (
                r#"[{"usage":{"input_tokens":5}},{"usage":{"input_tokens":3,"output_tokens":2}}]"#,
                (5, 2),
            ),
            // A usage key inside a usage object's nested object, and after it.
            (
                r#"{"usage":{"x":{"usage":{"input_tokens":5}},"output_tokens":2}}"#,
                (5, 2),
            ),
            (
                r#"{"usage":{"usage":{"input_tokens":5},"output_tokens":2}}"#,
                (5, 2),
            ),
            // A usage that is not an object, or an array of objects.
            (r#"{"usage":[{"input_tokens":5}],"x":{"usage":7}}"#, (0, 0)),
            (r#"{"usage":{"input_tokens":{"output_tokens":5}}}"#, (0, 0)),
            // A member named like a field but as a value.
            (
                r#"{"usage":{"x":"input_tokens","y":["output_tokens",5]}}"#,
                (0, 0),
            ),
            // Escaped names do not match (documented); a long name neither.
            (
                r#"{"usage":{"input\u005ftokens":5,"input_tokens_but_a_much_longer_name":6}}"#,
                (0, 0),
            ),
            (r#"{"\u0075sage":{"input_tokens":5}}"#, (0, 0)),
            (r#"{"usage":{"s":"\"}\\","input_tokens":5}}"#, (5, 0)),
        ];
        for (body, want) in cases {
            assert_eq!(in_out(J, body), want, "{body}");
        }
    }

    #[test]
    fn only_non_negative_integers_count_and_the_largest_wins() {
        let cases = [
            (
                r#"{"usage":{"input_tokens":5.0,"output_tokens":-3}}"#,
                (0, 0),
            ),
            (
                r#"{"usage":{"input_tokens":1e3,"output_tokens":"7"}}"#,
                (0, 0),
            ),
            (
                r#"{"usage":{"input_tokens":null,"output_tokens":true}}"#,
                (0, 0),
            ),
            (r#"{"usage":{"input_tokens":7,"input_tokens":3}}"#, (7, 0)),
            (
                r#"{"usage":{"input_tokens": 0 , "output_tokens" : 12 }}"#,
                (0, 12),
            ),
            (
                r#"{"usage":{"input_tokens":99999999999999999999999}}"#,
                (u64::MAX, 0),
            ),
            (
                r#"{"usage":{"input_tokens":18446744073709551615,"prompt_tokens":1}}"#,
                (u64::MAX, 0),
            ),
            (
                r#"{"usage":{"output_tokens":18446744073709551615,"completion_tokens":9}}"#,
                (0, u64::MAX),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(in_out(J, body), want, "{body}");
        }
        let sse = "data: {\"usage\":{\"output_tokens\":15}}\n\ndata: {\"usage\":{\"output_tokens\":4}}\n\n";
        assert_eq!(in_out(Sse, sse), (0, 15));
    }

    #[test]
    fn deep_nesting_neither_counts_nor_hides_what_follows() {
        let deep = format!(
            r#"{{"x":{}{{"usage":{{"input_tokens":5}}}}{},"usage":{{"output_tokens":2}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(in_out(J, &deep), (0, 2));
        let at_64 = format!(
            "{}{{\"usage\":{{\"input_tokens\":3}}}}{}",
            "[".repeat(62),
            "]".repeat(62)
        );
        assert_eq!(
            in_out(J, &at_64),
            (3, 0),
            "the usage object at depth 64 counts"
        );
        let at_65 = format!(
            "{}{{\"usage\":{{\"input_tokens\":3}}}}{}",
            "[".repeat(63),
            "]".repeat(63)
        );
        assert_eq!(in_out(J, &at_65), (0, 0), "one deeper is not tracked");
    }

    #[test]
    fn malformed_json_stops_the_scan() {
        let cases = [
            r#"{"usage":{"input_tokens":5}}}{"usage":{"output_tokens":2}}"#,
            r#"{"usage":{"input_tokens":5}} {"usage":{"output_tokens":2}}"#,
            r#"]{"usage":{"output_tokens":2}}"#,
            r#"{"usage":{"output_tokens" 2}}"#,
            r#"{"usage":{"output_tokens":nul 2}}"#,
            r#"{"a":[1}"usage":{"output_tokens":2}}"#,
            "\u{0}\u{ff}garbage{\"usage\":{\"output_tokens\":2}}",
        ];
        for body in cases {
            assert_eq!(in_out(J, body).1, 0, "{body}");
        }
        // Tolerated: a doubled comma (the grammar between tokens is not checked).
        assert_eq!(in_out(J, r#"{"a":1,,"usage":{"output_tokens":2}}"#), (0, 2));
        // Counts seen before the error stay.
        assert_eq!(
            in_out(
                J,
                r#"{"usage":{"input_tokens":5},]"usage":{"output_tokens":2}}"#
            ),
            (5, 0)
        );
        // In an event stream, the next event starts afresh.
        let sse = "data: [DONE]\n\ndata: }{\"usage\":{\"input_tokens\":1}}\n\ndata: {\"usage\":{\"input_tokens\":4}}\n\n";
        assert_eq!(in_out(Sse, sse), (4, 0));
    }

    #[test]
    fn body_kinds() {
        assert_eq!(body_kind(b"application/json"), Some(BodyKind::Json));
        assert_eq!(
            body_kind(b" Application/JSON ; charset=utf-8"),
            Some(BodyKind::Json)
        );
        assert_eq!(
            body_kind(b"text/event-stream;charset=UTF-8"),
            Some(BodyKind::EventStream)
        );
        assert_eq!(
            body_kind(b"\tTEXT/Event-Stream\t"),
            Some(BodyKind::EventStream)
        );
        for other in [
            &b"text/plain"[..],
            b"application/jsonl",
            b"application/problem+json",
            b"",
            b"application/ json",
        ] {
            assert_eq!(body_kind(other), None);
        }
    }
}
