//! Model-token usage, read from a response body as it is relayed: pure over
//! bytes, no IO, no tokio, no clocks, no allocation.
//!
//! `UsageScan` observes the payload bytes (it never alters them) of a JSON
//! body or of a server-sent event stream and keeps, for each usage field,
//! the largest value seen (see the README's token budgets). Its state is a
//! few words whatever the input: a JSON tokenizer with a depth counter, two
//! bit stacks for the innermost `MAX_DEPTH` containers, a short key buffer
//! and a number accumulator. Every byte advances it or is skipped in a run,
//! so the result is the same however the body is split across reads.

use crate::head::trim;

/// Containers tracked as object or array and as usage object or not: the
/// width of the bit stacks. Deeper ones are only counted (no usage field is
/// read there), so a deep document cannot hide the usage that follows it.
const MAX_DEPTH: u32 = 64;
/// Longest member name kept: the longest field (`cache_creation_input_tokens`,
/// 27 bytes) fits; a longer name matches none.
const MAX_KEY: usize = 32;
/// The fields counted, in the order of `UsageScan::counts`.
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
    let media = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    let media = trim(media);
    if media.eq_ignore_ascii_case(b"application/json") {
        Some(BodyKind::Json)
    } else if media.eq_ignore_ascii_case(b"text/event-stream") {
        Some(BodyKind::EventStream)
    } else {
        None
    }
}

/// Token counts seen so far in one response: for each field, the largest
/// value seen (the counts are cumulative, as in Anthropic's `message_start`
/// then `message_delta`), 0 when never seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// `input_tokens` (Anthropic).
    pub(crate) input_tokens: u64,
    /// `output_tokens` (Anthropic).
    pub(crate) output_tokens: u64,
    /// `cache_creation_input_tokens` (Anthropic).
    pub(crate) cache_creation_input_tokens: u64,
    /// `cache_read_input_tokens` (Anthropic).
    pub(crate) cache_read_input_tokens: u64,
    /// `prompt_tokens` (OpenAI).
    pub(crate) prompt_tokens: u64,
    /// `completion_tokens` (OpenAI).
    pub(crate) completion_tokens: u64,
}

impl Usage {
    /// Input + cache creation + cache read + prompt tokens, saturating.
    pub(crate) fn tokens_in(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
            .saturating_add(self.prompt_tokens)
    }

    /// Output + completion tokens, saturating.
    pub(crate) fn tokens_out(&self) -> u64 {
        self.output_tokens.saturating_add(self.completion_tokens)
    }

    /// Whether any field was seen with a count: a usage of zeros charges
    /// nothing, so it is not told apart from none.
    pub(crate) fn seen(&self) -> bool {
        *self != Usage::default()
    }
}

/// Reads the usage of one response body, fed in the pieces it arrives in.
#[derive(Debug)]
pub(crate) struct UsageScan {
    /// The JSON body, or the current event's `data`.
    json: Json,
    /// The largest value of each of `FIELDS` so far.
    counts: [u64; 6],
    /// Where an event stream is in its current line; `None` for a JSON body.
    line: Option<Line>,
    /// The last byte was a CR, so an LF now ends no further line.
    after_cr: bool,
}

/// Where an event stream is in a line (WHATWG HTML §9.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// In the field name, after this many bytes of `data`; `Name(0)` is the
    /// start of the line.
    Name(u8),
    /// Just after `data:`, where one space is not part of the value.
    Space,
    /// In a `data` value, which goes to the JSON tokenizer.
    Data,
    /// In a comment or a field other than `data`, ignored.
    Skip,
}

impl UsageScan {
    /// A scanner for a body of `kind`, nothing seen yet.
    pub(crate) fn new(kind: BodyKind) -> UsageScan {
        UsageScan {
            json: Json::new(),
            counts: [0; 6],
            line: (kind == BodyKind::EventStream).then_some(Line::Name(0)),
            after_cr: false,
        }
    }

    /// Observes the next payload bytes of the body.
    pub(crate) fn feed(&mut self, payload: &[u8]) {
        let Some(mut line) = self.line else {
            self.json.feed(payload, &mut self.counts);
            return;
        };
        let mut i = 0;
        while let Some(&b) = payload.get(i) {
            // A line ends with CRLF, LF or CR (WHATWG HTML §9.2.5).
            if b == b'\r' || b == b'\n' {
                i += 1;
                if !(b == b'\n' && std::mem::take(&mut self.after_cr)) {
                    self.end_line(line);
                    line = Line::Name(0);
                    self.after_cr = b == b'\r';
                }
                continue;
            }
            self.after_cr = false;
            line = match line {
                // Only `data` counts; a line starting with `:` is a comment (§9.2.6).
                Line::Name(4) if b == b':' => Line::Space,
                Line::Name(n) if b"data".get(usize::from(n)) == Some(&b) => Line::Name(n + 1),
                Line::Name(_) => Line::Skip,
                Line::Space if b == b' ' => Line::Data,
                Line::Space | Line::Data | Line::Skip => {
                    let rest = &payload[i..];
                    let run = rest.iter().position(|&b| b == b'\r' || b == b'\n');
                    let run = run.unwrap_or(rest.len());
                    if line != Line::Skip {
                        self.json.feed(&rest[..run], &mut self.counts);
                        line = Line::Data;
                    }
                    i += run;
                    continue;
                }
            };
            i += 1;
        }
        self.line = Some(line);
    }

    /// Ends a line of an event stream: an empty one ends the event, whose
    /// data is a new JSON text; the lines of one event's data are joined
    /// with LF (§9.2.6), which to JSON is whitespace between tokens.
    fn end_line(&mut self, line: Line) {
        match line {
            Line::Name(0) => self.json = Json::new(),
            // `data` without a colon is a data line with an empty value.
            Line::Name(4) | Line::Space | Line::Data => self.json.feed(b"\n", &mut self.counts),
            Line::Name(_) | Line::Skip => {}
        }
    }

    /// The counts seen so far.
    pub(crate) fn usage(&self) -> Usage {
        let [input, output, creation, read, prompt, completion] = self.counts;
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: creation,
            cache_read_input_tokens: read,
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }
}

/// What the JSON tokenizer expects next (RFC 8259 §2–§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value: at the start, after `:`, or after `,` in an array.
    Value,
    /// Just after `[`: a value or `]`.
    FirstValue,
    /// Just after `{`: a member name or `}`.
    FirstKey,
    /// After `,` in an object: a member name.
    Key,
    /// After a member name: `:`.
    Colon,
    /// After a value: `,` or a close, or at the top level only whitespace.
    After,
    /// In a string, a member name if `key`.
    Str { key: bool },
    /// After a backslash in a string.
    Escape { key: bool },
    /// In a non-negative integer, its value so far in `number`.
    Int,
    /// In a number that cannot be a count (negative, fraction, exponent).
    Skip,
    /// In `true`, `false` or `null`, with these bytes still to come.
    Literal(&'static [u8]),
    /// Malformed: everything else is ignored.
    Error,
}

/// What the member name just read means for the value that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    /// Nothing: its value does not count.
    Other,
    /// `usage`: an object value is a usage object.
    Usage,
    /// A direct member of a usage object named `FIELDS[i]`.
    Count(usize),
}

/// An incremental JSON tokenizer that tracks only what finding usage needs.
#[derive(Debug, Clone)]
struct Json {
    state: State,
    /// Containers open around the current position.
    depth: u32,
    /// Bit `d - 1`: the container at depth `d` is an object, not an array.
    objects: u64,
    /// Bit `d - 1`: the container at depth `d` is the value of a `usage` key.
    usages: u64,
    /// The first bytes of the member name being read.
    key: [u8; MAX_KEY],
    /// How many of `key` are used; over `MAX_KEY` when the name cannot match.
    key_len: usize,
    member: Member,
    /// The integer being read, saturating.
    number: u64,
}

impl Json {
    /// A tokenizer before the first byte of a JSON text.
    fn new() -> Json {
        Json {
            state: State::Value,
            depth: 0,
            objects: 0,
            usages: 0,
            key: [0; MAX_KEY],
            key_len: 0,
            member: Member::Other,
            number: 0,
        }
    }

    /// Reads the next bytes, raising `counts` for each usage field seen.
    fn feed(&mut self, bytes: &[u8], counts: &mut [u64; 6]) {
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match self.state {
                // String content is skipped in one run up to `"` or `\`.
                State::Str { key } => {
                    let rest = &bytes[i..];
                    let run = rest.iter().position(|&b| b == b'"' || b == b'\\');
                    let run = run.unwrap_or(rest.len());
                    if key {
                        self.push_key(&rest[..run]);
                    }
                    i += run;
                    match rest.get(run) {
                        Some(b'"') if key => self.end_key(),
                        Some(b'"') => self.end_value(),
                        // Names with escapes are not matched: real APIs never send one.
                        Some(_) => {
                            (self.state, self.key_len) = (State::Escape { key }, MAX_KEY + 1)
                        }
                        None => continue,
                    }
                }
                State::Error => return,
                _ => {
                    if !self.byte(b, counts) {
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    /// Reads one byte outside string content; `false` when a number ended
    /// before it, so the byte is read again in the new state.
    fn byte(&mut self, b: u8, counts: &mut [u64; 6]) -> bool {
        let blank = matches!(b, b' ' | b'\t' | b'\n' | b'\r'); // RFC 8259 §2
        match self.state {
            // Every escape is `\` and one byte; `\uXXXX` digits are plain content (§7).
            State::Escape { key } => self.state = State::Str { key },
            State::Int if b.is_ascii_digit() => {
                let digit = u64::from(b - b'0');
                self.number = self.number.saturating_mul(10).saturating_add(digit);
            }
            State::Int | State::Skip if matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') => {
                self.state = State::Skip;
            }
            State::Skip if b.is_ascii_digit() => {}
            State::Int | State::Skip => {
                if let (State::Int, Member::Count(field)) = (self.state, self.member) {
                    counts[field] = counts[field].max(self.number);
                }
                self.end_value();
                return false;
            }
            State::Literal(rest) => match rest.split_first() {
                Some((&want, rest)) if want == b => {
                    self.state = State::Literal(rest);
                    if rest.is_empty() {
                        self.end_value();
                    }
                }
                _ => self.state = State::Error,
            },
            _ if self.depth > MAX_DEPTH => self.deep(b),
            _ if blank => {}
            State::FirstKey if b == b'}' => self.close(true),
            State::FirstValue if b == b']' => self.close(false),
            State::FirstKey | State::Key if b == b'"' => {
                (self.state, self.key_len) = (State::Str { key: true }, 0);
            }
            State::Colon if b == b':' => self.state = State::Value,
            State::Value | State::FirstValue => self.value(b),
            State::After if self.depth > 0 => match b {
                b',' if self.is_object() => self.state = State::Key,
                b',' => self.state = State::Value,
                b'}' => self.close(true),
                b']' => self.close(false),
                _ => self.state = State::Error,
            },
            _ => self.state = State::Error,
        }
        true
    }

    /// Starts the value whose first byte is `b`.
    fn value(&mut self, b: u8) {
        self.state = match b {
            b'"' => State::Str { key: false },
            b'{' | b'[' => return self.open(b == b'{'),
            b'0'..=b'9' => {
                self.number = u64::from(b - b'0');
                State::Int
            }
            b'-' => State::Skip,
            b't' => State::Literal(b"rue"),
            b'f' => State::Literal(b"alse"),
            b'n' => State::Literal(b"ull"),
            _ => State::Error,
        };
    }

    /// Below `MAX_DEPTH` nothing counts and the container kinds are not
    /// kept, so only strings and brackets matter until it closes.
    fn deep(&mut self, b: u8) {
        match b {
            b'"' => self.state = State::Str { key: false },
            b'{' | b'[' => self.open(b == b'{'),
            b'}' | b']' => {
                self.depth -= 1;
                self.end_value();
            }
            _ => {}
        }
    }

    /// Opens an object or array as the current value.
    fn open(&mut self, object: bool) {
        let Some(depth) = self.depth.checked_add(1) else {
            self.state = State::Error;
            return;
        };
        self.depth = depth;
        let bit = self.bit();
        let usage = object && self.member == Member::Usage;
        self.objects = if object {
            self.objects | bit
        } else {
            self.objects & !bit
        };
        self.usages = if usage {
            self.usages | bit
        } else {
            self.usages & !bit
        };
        self.member = Member::Other;
        self.state = if object {
            State::FirstKey
        } else {
            State::FirstValue
        };
    }

    /// Closes the current container with `}` (`object`) or `]`.
    fn close(&mut self, object: bool) {
        match self.depth.checked_sub(1) {
            Some(depth) if self.is_object() == object => {
                self.depth = depth;
                self.end_value();
            }
            _ => self.state = State::Error,
        }
    }

    /// The bit of the innermost container in `objects` and `usages`; 0 at
    /// the top level and below `MAX_DEPTH`.
    fn bit(&self) -> u64 {
        1u64.checked_shl(self.depth.wrapping_sub(1)).unwrap_or(0)
    }

    /// Whether the innermost container is an object.
    fn is_object(&self) -> bool {
        self.objects & self.bit() != 0
    }

    /// Keeps the next bytes of a member name, or marks it too long to match.
    fn push_key(&mut self, bytes: &[u8]) {
        let end = self.key_len.saturating_add(bytes.len());
        if let Some(room) = self.key.get_mut(self.key_len..end) {
            room.copy_from_slice(bytes);
            self.key_len = end;
        } else {
            self.key_len = MAX_KEY + 1;
        }
    }

    /// A member name ended: decides what its value means.
    fn end_key(&mut self) {
        let name = self.key.get(..self.key_len).unwrap_or_default();
        let in_usage = self.usages & self.bit() != 0;
        let field = FIELDS.iter().position(|f| *f == name);
        self.member = match field {
            Some(i) if in_usage => Member::Count(i),
            _ if name == b"usage" => Member::Usage,
            _ => Member::Other,
        };
        self.state = State::Colon;
    }

    /// A value ended, at the top level or in the container around it.
    fn end_value(&mut self) {
        self.member = Member::Other;
        self.state = State::After;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anthropic, not streamed: the text holds a fake usage inside a string.
    const ANTHROPIC_JSON: &str = r#"{"id":"msg_01","type":"message","role":"assistant","content":[{"type":"text","text":"Hi \"usage\": {\"input_tokens\": 999}"}],"model":"claude-x","stop_reason":"end_turn","usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"output_tokens":12,"cache_creation":{"ephemeral_5m_input_tokens":0},"server_tool_use":{"web_search_requests":0}}}"#;
    /// Anthropic, streamed: input in `message_start`, output in `message_delta`.
    const ANTHROPIC_SSE: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-x\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    /// OpenAI, not streamed: `prompt_tokens_details` is nested, not counted.
    const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}}"#;
    /// OpenAI, streamed with `include_usage`.
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
        assert_eq!((u.input_tokens, u.cache_creation_input_tokens), (25, 3));
        assert_eq!((u.cache_read_input_tokens, u.output_tokens), (4, 12));
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
            r#"{"a":1,,"usage":{"output_tokens":2}}"#,
            "\u{0}\u{ff}garbage{\"usage\":{\"output_tokens\":2}}",
        ];
        for body in cases {
            assert_eq!(in_out(J, body).1, 0, "{body}");
        }
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
