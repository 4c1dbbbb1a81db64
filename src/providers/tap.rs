//! The usage tap on a streamed answer: it reads server-sent events as they pass, keeps the
//! latest usage report, and forwards every byte as it arrives, except (for OpenAI streams whose
//! client did not ask for usage) the usage-only chunk the proxy asked for on its behalf, which
//! needs whole events to be recognised. It also notes a stream that reports its own failure
//! (an `error` event or object), which is settled as failed (see `proxy/settle.rs`).
//!
//! An event longer than [`MAX_PENDING`] is passed through unparsed as it arrives, without
//! being buffered, and parsing starts again after its end: a usage report is small, and a huge
//! event before it must neither grow the buffer without bound nor stop the report being read
//! (and hidden) after it.
//!
//! A Gemini stream without `alt=sse` is one JSON array, sent an element at a time: each
//! element is read when its last byte arrives (an element longer than [`MAX_PENDING`] is
//! skipped the same way), so a stream cut short has the usage its elements reported.

use super::Format;
use super::wire::{Usage, is_openai_usage_chunk, usage_from_event};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Largest event (separator included) kept whole to be parsed. Longer ones pass unparsed.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// The longest event separator (`\r\n\r\n`), less one: how many bytes before a chunk can hold
/// the start of a separator that ends in it.
const SEPARATOR_LOOKBEHIND: usize = 3;

#[derive(Debug)]
pub struct StreamTap {
    format: Format,
    /// Hide OpenAI's usage-only chunk (the client did not ask for it).
    hide_usage_chunk: bool,
    /// Bytes of the event in progress (all of them when hiding; a copy otherwise), at most
    /// `cap`.
    pending: BytesMut,
    /// [`MAX_PENDING`]; smaller in tests, so every size around it can be tried.
    cap: usize,
    /// The event in progress is longer than `cap`: its bytes pass through unkept until its
    /// end.
    oversized: bool,
    /// The last bytes seen of an oversized event, for a separator split across chunks.
    tail: Vec<u8>,
    usage: Option<Usage>,
    /// The stream reported its own failure.
    failed: bool,
    /// The stream is a JSON array (Gemini without `alt=sse`), read element by element.
    array: Option<ArrayReader>,
}

/// Where a JSON-array stream stands: the structure scanned so far (the element in progress
/// is kept in the tap's `pending`).
#[derive(Debug, Default)]
struct ArrayReader {
    /// How deep the scan is in arrays and objects.
    depth: u64,
    /// The depth of the elements' insides: 2 in the array, or 1 when the stream turned out
    /// to be a single object (read whole as one element). 0 until the first byte that is
    /// not white space.
    element: u64,
    in_string: bool,
    escaped: bool,
    /// The element in progress is longer than the cap: its bytes are not kept.
    oversized: bool,
    /// The outermost array (or object) closed.
    closed: bool,
}

/// Whether a streamed event (or array element) is the provider's report of a failure: an
/// Anthropic `error` event (`{"type": "error", "error": {...}}`), or the `error` object OpenAI
/// and Gemini send in place of a chunk.
fn reports_error(json: &Value) -> bool {
    json.get("type").and_then(Value::as_str) == Some("error")
        || json.get("error").is_some_and(Value::is_object)
}

/// Where the first event separator that ends inside `chunk` ends: the number of bytes of
/// `chunk` up to and including it, and the separator's length. `before` holds the bytes that
/// preceded `chunk` in the stream (only its last [`SEPARATOR_LOOKBEHIND`] matter), so a
/// separator split across chunks is found.
fn separator_end(before: &[u8], chunk: &[u8]) -> Option<(usize, usize)> {
    let before = &before[before.len().saturating_sub(SEPARATOR_LOOKBEHIND)..];
    // The byte `back` places before `chunk[i]`, reaching into `before`.
    let byte_before = |i: usize, back: usize| -> Option<u8> {
        match i.checked_sub(back) {
            Some(j) => Some(chunk[j]),
            None => before.len().checked_sub(back - i).map(|j| before[j]),
        }
    };
    for (i, &b) in chunk.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        if byte_before(i, 1) == Some(b'\n') {
            return Some((i + 1, 2));
        }
        if byte_before(i, 1) == Some(b'\r')
            && byte_before(i, 2) == Some(b'\n')
            && byte_before(i, 3) == Some(b'\r')
        {
            return Some((i + 1, 4));
        }
    }
    None
}

/// Add to `tail` the last bytes of `more`, keeping the last [`SEPARATOR_LOOKBEHIND`] bytes.
fn keep_tail(tail: &mut Vec<u8>, more: &[u8]) {
    tail.extend_from_slice(&more[more.len().saturating_sub(SEPARATOR_LOOKBEHIND)..]);
    let excess = tail.len().saturating_sub(SEPARATOR_LOOKBEHIND);
    tail.drain(..excess);
}

/// Add `bytes` to what goes to the client, when the tap builds it (only when hiding).
fn forward(out: &mut Option<BytesMut>, bytes: &[u8]) {
    if let Some(out) = out {
        out.extend_from_slice(bytes);
    }
}

/// The JSON of an event's `data:` lines, if any.
fn event_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    if data.is_empty() || data == "[DONE]" {
        return None;
    }
    serde_json::from_str(&data).ok()
}

impl StreamTap {
    pub fn new(format: Format, hide_usage_chunk: bool, json_array: bool) -> Self {
        StreamTap {
            format,
            hide_usage_chunk,
            pending: BytesMut::new(),
            cap: MAX_PENDING,
            oversized: false,
            tail: Vec::new(),
            usage: None,
            failed: false,
            array: json_array.then(ArrayReader::default),
        }
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the stream reported its own failure (or, for a JSON array, ended before the
    /// array closed): it is then settled as failed, even if its connection closed cleanly.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Read one event's (or element's) JSON: its usage, and whether it reports a failure.
    fn read(&mut self, json: &Value) {
        usage_from_event(self.format, json, &mut self.usage);
        self.failed |= reports_error(json);
    }

    /// Take in one upstream chunk; return what to send the client now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.array.is_some() {
            self.scan_array(&chunk);
            return chunk;
        }
        // Without hiding, every byte goes out as it came, and `pending` is only a copy.
        let mut out = self.hide_usage_chunk.then(BytesMut::new);
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            if self.oversized {
                let Some((n, _)) = separator_end(&self.tail, rest) else {
                    forward(&mut out, rest);
                    keep_tail(&mut self.tail, rest);
                    break;
                };
                forward(&mut out, &rest[..n]);
                rest = &rest[n..];
                self.oversized = false;
                self.tail.clear();
                continue;
            }
            match separator_end(&self.pending, rest) {
                Some((n, sep)) if self.pending.len() + n <= self.cap => {
                    self.pending.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    let event = self.pending.split().freeze();
                    self.take_event(&event, sep, &mut out);
                }
                // The event ends here, but is too long to have been kept whole.
                Some((n, _)) => {
                    forward(&mut out, &self.pending.split());
                    forward(&mut out, &rest[..n]);
                    rest = &rest[n..];
                }
                None if self.pending.len() + rest.len() <= self.cap => {
                    self.pending.extend_from_slice(rest);
                    break;
                }
                None => {
                    self.tail.clear();
                    keep_tail(&mut self.tail, &self.pending);
                    keep_tail(&mut self.tail, rest);
                    forward(&mut out, &self.pending.split());
                    forward(&mut out, rest);
                    // Give the buffer back: it may be as large as the cap.
                    self.pending = BytesMut::new();
                    self.oversized = true;
                    break;
                }
            }
        }
        match out {
            Some(out) => out.freeze(),
            None => chunk,
        }
    }

    /// Scan a chunk of a JSON-array stream, reading each element whose end is in it.
    fn scan_array(&mut self, chunk: &[u8]) {
        let Some(mut a) = self.array.take() else {
            return;
        };
        // Where the element in progress starts in this chunk (0 when it began before it).
        let mut start = (a.element > 0 && a.depth >= a.element).then_some(0);
        for (i, &b) in chunk.iter().enumerate() {
            if a.closed {
                break;
            }
            if a.in_string {
                match b {
                    _ if a.escaped => a.escaped = false,
                    b'\\' => a.escaped = true,
                    b'"' => a.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => continue,
                _ if a.element == 0 => {
                    // The first byte says what the stream is.
                    a.element = if b == b'[' { 2 } else { 1 };
                }
                _ => {}
            }
            match b {
                b'"' => a.in_string = true,
                b'[' | b'{' => {
                    a.depth = a.depth.saturating_add(1);
                    if a.depth == a.element {
                        start = Some(i);
                    }
                }
                b']' | b'}' => {
                    if a.depth == a.element
                        && let Some(from) = start.take()
                    {
                        self.keep(&mut a, &chunk[from..=i]);
                        self.take_element(&mut a);
                    }
                    a.depth = a.depth.saturating_sub(1);
                    a.closed = a.depth == 0;
                }
                _ => {}
            }
        }
        if let Some(from) = start {
            self.keep(&mut a, &chunk[from..]);
        }
        self.array = Some(a);
    }

    /// Keep the bytes of the element in progress, up to the cap.
    fn keep(&mut self, a: &mut ArrayReader, bytes: &[u8]) {
        if a.oversized {
            return;
        }
        if self.pending.len() + bytes.len() > self.cap {
            a.oversized = true;
            // Give the buffer back: it may be as large as the cap.
            self.pending = BytesMut::new();
        } else {
            self.pending.extend_from_slice(bytes);
        }
    }

    /// The element in progress is whole: read it (unless it was too long to keep).
    fn take_element(&mut self, a: &mut ArrayReader) {
        let element = self.pending.split();
        if !std::mem::take(&mut a.oversized)
            && let Ok(json) = serde_json::from_slice::<Value>(&element)
        {
            self.read(&json);
        }
    }

    /// One whole event (with its separator of `sep` bytes): read its usage, and forward it
    /// unless it is the usage chunk to hide.
    fn take_event(&mut self, event: &[u8], sep: usize, out: &mut Option<BytesMut>) {
        let json = event_json(&event[..event.len() - sep]);
        if let Some(json) = &json {
            self.read(json);
        }
        let hide = self.hide_usage_chunk && json.as_ref().is_some_and(is_openai_usage_chunk);
        if !hide {
            forward(out, event);
        }
    }

    /// The stream ended: what is left to send, and the usage.
    pub fn finish(&mut self) -> Bytes {
        if let Some(a) = &self.array {
            // An array that never closed was cut short, however its connection ended.
            self.failed |= !a.closed;
            self.pending = BytesMut::new();
            return Bytes::new();
        }
        // An oversized last event went out as it came.
        let rest = self.pending.split().freeze();
        let json = event_json(&rest);
        if let Some(json) = &json {
            self.read(json);
        }
        if self.hide_usage_chunk && !json.as_ref().is_some_and(is_openai_usage_chunk) {
            rest
        } else {
            Bytes::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(tap: &mut StreamTap, parts: &[&str]) -> String {
        let mut out = String::new();
        for p in parts {
            out.push_str(
                std::str::from_utf8(&tap.feed(Bytes::copy_from_slice(p.as_bytes()))).unwrap(),
            );
        }
        out.push_str(std::str::from_utf8(&tap.finish()).unwrap());
        out
    }

    #[test]
    fn openai_usage_chunk_is_hidden_and_counted() {
        let mut tap = StreamTap::new(Format::Openai, true, false);
        let out = feed_all(
            &mut tap,
            &[
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n",
                "\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\n",
                "data: [DONE]\n\n",
            ],
        );
        assert_eq!(
            tap.usage(),
            Some(Usage {
                input: 5,
                output: 7
            })
        );
        assert!(out.contains("\"hi\""));
        assert!(!out.contains("prompt_tokens"));
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn pass_through_forwards_every_byte_at_once() {
        let mut tap = StreamTap::new(Format::Openai, false, false);
        let chunk = Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}",
        );
        assert_eq!(
            tap.feed(chunk.clone()),
            chunk,
            "forwarded before the event is complete"
        );
        assert_eq!(
            tap.feed(Bytes::from_static(b"\n\n")),
            Bytes::from_static(b"\n\n")
        );
        assert_eq!(
            tap.usage(),
            Some(Usage {
                input: 1,
                output: 2
            })
        );
    }

    #[test]
    fn gemini_json_array_stream() {
        let mut tap = StreamTap::new(Format::Gemini, false, true);
        let out = feed_all(
            &mut tap,
            &[
                "[{\"candidates\":[]},\n",
                "{\"usageMetadata\":{\"promptTokenCount\":3,\"totalTokenCount\":10}}]",
            ],
        );
        assert!(out.starts_with('['));
        assert_eq!(
            tap.usage(),
            Some(Usage {
                input: 3,
                output: 7
            })
        );
    }

    /// A Gemini JSON-array stream: `n` chunks, each reporting cumulative usage (input 8,
    /// output 10 per chunk so far), with text that holds JSON's own punctuation.
    fn gemini_array(n: usize, sep: &str) -> (String, Vec<usize>) {
        let mut s = String::from("[");
        let mut ends = Vec::new();
        for i in 1..=n {
            if i > 1 {
                s.push(',');
                s.push_str(sep);
            }
            s.push_str(&format!(
                r#"{{"candidates": [{{"content": {{"parts": [{{"text": "a ] }} [ {{ \" \\ \\\" ,{i}"}}]}}}}], "usageMetadata": {{"promptTokenCount": 8, "candidatesTokenCount": {out}, "totalTokenCount": {total}}}}}"#,
                out = 10 * i,
                total = 8 + 10 * i
            ));
            ends.push(s.len());
        }
        s.push_str(sep);
        s.push(']');
        (s, ends)
    }

    /// Each element is read when its last byte arrives, however the stream is cut into
    /// chunks, and whatever its text holds; a stream cut anywhere has the usage of the
    /// elements it delivered whole, and is failed unless the array closed.
    #[test]
    fn gemini_array_elements_are_read_as_they_arrive() {
        for sep in ["", "\n", "\r\n", " \n  "] {
            let (stream, ends) = gemini_array(4, sep);
            let bytes = stream.as_bytes();
            for piece in [1, 2, 3, 7, 64, usize::MAX] {
                for cut in [
                    0,
                    1,
                    ends[0] - 1,
                    ends[0],
                    ends[1] + 1,
                    ends[3],
                    bytes.len() - 1,
                    bytes.len(),
                ] {
                    let mut tap = StreamTap::new(Format::Gemini, false, true);
                    let mut out = Vec::new();
                    for chunk in bytes[..cut].chunks(piece.min(cut.max(1))) {
                        out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(chunk)));
                    }
                    let whole = ends.iter().filter(|e| **e <= cut).count() as u64;
                    let what = format!("sep {sep:?} piece {piece} cut {cut}");
                    let want = (whole > 0).then_some(Usage {
                        input: 8,
                        output: 10 * whole,
                    });
                    assert_eq!(tap.usage(), want, "{what}: read before the end");
                    assert!(tap.finish().is_empty());
                    assert_eq!(tap.usage(), want, "{what}");
                    assert_eq!(tap.failed(), cut < bytes.len(), "{what}");
                    assert!(out == bytes[..cut], "{what}: passed through as it came");
                    assert!(tap.pending.is_empty(), "{what}");
                }
            }
        }
    }

    /// An element longer than the cap is skipped (never kept past it), and the ones after it
    /// are read; an element that reports an error fails the stream.
    #[test]
    fn gemini_array_oversized_and_error_elements() {
        let usage = r#"{"usageMetadata": {"promptTokenCount": 2, "totalTokenCount": 5}}"#;
        let huge = format!(r#"{{"candidates": [{{"text": "{}"}}]}}"#, "x".repeat(500));
        let error = r#"{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}"#;
        for (stream, failed) in [
            (format!("[{huge},{usage}]"), false),
            (format!("[{usage},{huge}]"), false),
            (format!("[{huge},{huge},{usage}]"), false),
            (format!("[{usage},{error}]"), true),
            (format!("[{usage},\n{error}\n]"), true),
        ] {
            for piece in [1, 5, 100, usize::MAX] {
                let mut tap = StreamTap::new(Format::Gemini, false, true);
                tap.cap = 200;
                for chunk in stream.as_bytes().chunks(piece.min(stream.len())) {
                    tap.feed(Bytes::copy_from_slice(chunk));
                    assert!(tap.pending.len() <= tap.cap, "kept {}", tap.pending.len());
                }
                tap.finish();
                assert_eq!(
                    tap.usage(),
                    Some(Usage {
                        input: 2,
                        output: 3
                    }),
                    "{piece}: {stream:.40}"
                );
                assert_eq!(tap.failed(), failed, "{piece}: {stream:.40}");
            }
        }
        // A single object rather than an array (an error answer, say) is one element.
        let mut tap = StreamTap::new(Format::Gemini, false, true);
        tap.feed(Bytes::from_static(error.as_bytes()));
        tap.finish();
        assert!(tap.failed());
        let mut tap = StreamTap::new(Format::Gemini, false, true);
        tap.feed(Bytes::copy_from_slice(usage.as_bytes()));
        tap.finish();
        assert!(!tap.failed());
        assert_eq!(tap.usage().map(|u| u.total()), Some(5));
    }

    /// An error event after the stream started fails it, in every format, wherever it falls
    /// and however it is cut; the usage reported before it is kept.
    #[test]
    fn error_events_fail_the_stream() {
        let anthropic_start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1200,\"output_tokens\":11}}}";
        let anthropic_delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"error\"}}";
        let anthropic_error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}";
        let openai_chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}],\"usage\":null,\"error\":null}";
        let openai_error =
            "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}";
        let gemini_chunk = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"error\"}]}}],\"usageMetadata\":{\"promptTokenCount\":4,\"totalTokenCount\":9}}";
        let gemini_error = "data: {\"error\":{\"code\":500,\"message\":\"Internal error\",\"status\":\"INTERNAL\"}}";
        let cases = [
            (
                Format::Anthropic,
                anthropic_start,
                anthropic_delta,
                anthropic_error,
                (1200, 11),
            ),
            (
                Format::Openai,
                openai_chunk,
                openai_chunk,
                openai_error,
                (0, 0),
            ),
            (
                Format::Gemini,
                gemini_chunk,
                gemini_chunk,
                gemini_error,
                (4, 5),
            ),
        ];
        for (format, first, middle, error, (input, output)) in cases {
            let want = (input + output > 0).then_some(Usage { input, output });
            for sep in ["\n\n", "\r\n\r\n"] {
                let events = |list: &[&str]| -> String {
                    list.iter().map(|e| format!("{e}{sep}")).collect()
                };
                for (stream, failed) in [
                    (events(&[first, middle, middle]), false),
                    (events(&[first, middle, error]), true),
                    (events(&[first, error, middle]), true),
                    // The last event without its separator is read at the end.
                    (format!("{}{error}", events(&[first, middle])), true),
                ] {
                    for piece in [1, 3, 17, usize::MAX] {
                        for hide in [false, true] {
                            let mut tap =
                                StreamTap::new(format, hide && format == Format::Openai, false);
                            for chunk in stream.as_bytes().chunks(piece.min(stream.len())) {
                                tap.feed(Bytes::copy_from_slice(chunk));
                            }
                            tap.finish();
                            let what = format!("{format:?} {sep:?} {piece}: {stream:.60}");
                            assert_eq!(tap.failed(), failed, "{what}");
                            assert_eq!(tap.usage(), want, "{what}");
                        }
                    }
                }
            }
        }
    }

    /// An OpenAI content event of exactly `size` bytes, separator included.
    fn content_event(size: usize, sep: &str) -> String {
        let head = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";
        let end = "\"}}],\"usage\":null}";
        let pad = size - head.len() - end.len() - sep.len();
        format!("{head}{}{end}{sep}", "x".repeat(pad))
    }

    const USAGE_EVENT: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}";

    /// The usage-only chunk, padded to exactly `size` bytes with its `\n\n`.
    fn usage_event(size: usize) -> String {
        let pad = size - USAGE_EVENT.len() - 11;
        let e = format!(
            "{},\"pad\":\"{}\"}}\n\n",
            &USAGE_EVENT[..USAGE_EVENT.len() - 1],
            "y".repeat(pad)
        );
        assert_eq!(e.len(), size);
        e
    }

    /// A tap whose cap is `cap` rather than [`MAX_PENDING`].
    fn tap_with_cap(hide: bool, cap: usize) -> StreamTap {
        let mut tap = StreamTap::new(Format::Openai, hide, false);
        tap.cap = cap;
        tap
    }

    /// Feed `stream` cut into pieces of the `sizes` given (cycled), and also cut inside every
    /// separator; check at every step that the tap kept at most its cap and (when it builds
    /// the output) forwarded all the rest but the `hidden` bytes of usage chunks.
    fn feed_in_pieces(
        tap: &mut StreamTap,
        stream: &[u8],
        sizes: &[usize],
        hidden: usize,
    ) -> Vec<u8> {
        let mut cuts: Vec<usize> = Vec::new();
        let mut at = 0usize;
        for size in sizes.iter().cycle() {
            at = at.saturating_add(*size);
            if at >= stream.len() {
                break;
            }
            cuts.push(at);
        }
        for (i, w) in stream.windows(2).enumerate() {
            if w == b"\n\n" || w == b"\r\n" {
                cuts.push(i + 1);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts.push(stream.len());
        let mut out = Vec::new();
        let mut from = 0;
        for to in cuts {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(&stream[from..to])));
            from = to;
            assert!(tap.pending.len() <= tap.cap, "kept {}", tap.pending.len());
            if tap.hide_usage_chunk {
                assert!(
                    out.len() + tap.cap + hidden >= to,
                    "held back {}",
                    to - out.len()
                );
            }
        }
        out.extend_from_slice(&tap.finish());
        out
    }

    /// A small event, an oversized one of `size` bytes, another small one, the usage chunk
    /// and `[DONE]`: the usage is read and hidden, everything else arrives in order.
    fn check_usage_after_oversized(cap: usize, size: usize, sep: &str, chunking: &[usize]) {
        let small = content_event(100, sep);
        let huge = content_event(size, sep);
        let usage = format!("{USAGE_EVENT}{sep}");
        let done = format!("data: [DONE]{sep}");
        let stream = format!("{small}{huge}{small}{usage}{done}");
        let what = format!("cap {cap}, size {size}, sep {sep:?}, chunks {chunking:?}");
        let mut tap = tap_with_cap(true, cap);
        let out = feed_in_pieces(&mut tap, stream.as_bytes(), chunking, usage.len());
        assert_eq!(
            tap.usage(),
            Some(Usage {
                input: 5,
                output: 7
            }),
            "{what}"
        );
        assert!(
            out == format!("{small}{huge}{small}{done}").as_bytes(),
            "{what}: the usage chunk is hidden, all else forwarded in order"
        );
        let mut tap = tap_with_cap(false, cap);
        let out = feed_in_pieces(&mut tap, stream.as_bytes(), chunking, 0);
        assert_eq!(
            tap.usage(),
            Some(Usage {
                input: 5,
                output: 7
            }),
            "{what}"
        );
        assert!(out == stream.as_bytes(), "{what}: passed through unchanged");
    }

    #[test]
    fn usage_after_an_oversized_event_is_read_and_hidden() {
        let cap = 200;
        let mut chunkings: Vec<Vec<usize>> = (1..=9).map(|n| vec![n]).collect();
        chunkings.extend([
            vec![64],
            vec![cap - 1],
            vec![cap],
            vec![cap + 1],
            vec![cap - 1, 2, 1],
            vec![usize::MAX],
        ]);
        for sep in ["\n\n", "\r\n\r\n"] {
            for size in [
                cap + 1,
                cap + 2,
                cap + 3,
                cap + 4,
                cap + 5,
                2 * cap + 7,
                50 * cap,
            ] {
                for chunking in &chunkings {
                    check_usage_after_oversized(cap, size, sep, chunking);
                }
            }
        }
    }

    #[test]
    fn usage_after_an_oversized_event_at_the_real_cap() {
        for size in [MAX_PENDING + 1, 2 * MAX_PENDING + 3] {
            for chunking in [&[16 * 1024 + 1][..], &[usize::MAX]] {
                check_usage_after_oversized(MAX_PENDING, size, "\n\n", chunking);
            }
        }
    }

    #[test]
    fn events_up_to_the_cap_are_parsed() {
        for cap in [200, MAX_PENDING] {
            for size in [cap - 1, cap] {
                for chunking in [&[usize::MAX][..], &[7, 1]] {
                    let mut tap = tap_with_cap(true, cap);
                    let out =
                        feed_in_pieces(&mut tap, usage_event(size).as_bytes(), chunking, size);
                    assert_eq!(
                        tap.usage(),
                        Some(Usage {
                            input: 5,
                            output: 7
                        }),
                        "{size}"
                    );
                    assert!(
                        out.is_empty(),
                        "{size}: the whole event is the hidden chunk"
                    );
                }
            }
            // One byte more and it is not kept, so not hidden: it goes out as it came.
            let over = usage_event(cap + 1);
            let mut tap = tap_with_cap(true, cap);
            let out = feed_in_pieces(&mut tap, over.as_bytes(), &[1 << 20], 0);
            assert_eq!(tap.usage(), None);
            assert!(out == over.as_bytes());
        }
    }

    #[test]
    fn an_oversized_last_event_goes_out_whole() {
        let cap = 200;
        for sep in ["", "\n", "\r\n\r"] {
            let stream = format!("{USAGE_EVENT}\n\n{}{sep}", content_event(cap + 100, ""));
            for hide in [true, false] {
                for piece in [1, 3, 64, usize::MAX] {
                    let mut tap = tap_with_cap(hide, cap);
                    let out = feed_in_pieces(
                        &mut tap,
                        stream.as_bytes(),
                        &[piece],
                        USAGE_EVENT.len() + 2,
                    );
                    assert_eq!(
                        tap.usage(),
                        Some(Usage {
                            input: 5,
                            output: 7
                        })
                    );
                    let expected = if hide {
                        &stream.as_bytes()[USAGE_EVENT.len() + 2..]
                    } else {
                        stream.as_bytes()
                    };
                    assert!(out == expected, "sep {sep:?} hide {hide} piece {piece}");
                }
            }
        }
    }

    #[test]
    fn separators_split_across_chunks() {
        for sep in ["\n\n", "\r\n\r\n"] {
            let stream = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}{sep}{USAGE_EVENT}{sep}data: [DONE]{sep}"
            );
            for size in 1..8 {
                let mut tap = StreamTap::new(Format::Openai, true, false);
                let out = feed_in_pieces(
                    &mut tap,
                    stream.as_bytes(),
                    &[size],
                    USAGE_EVENT.len() + sep.len(),
                );
                assert_eq!(
                    tap.usage(),
                    Some(Usage {
                        input: 5,
                        output: 7
                    }),
                    "{size}"
                );
                let out = String::from_utf8(out).unwrap();
                assert!(!out.contains("prompt_tokens"), "{size}: {out}");
                assert!(
                    out.ends_with(&format!("data: [DONE]{sep}")),
                    "{size}: {out}"
                );
            }
        }
    }

    #[test]
    fn separator_end_looks_back_across_chunks() {
        assert_eq!(separator_end(b"", b"a\n\nb"), Some((3, 2)));
        assert_eq!(separator_end(b"a\n", b"\nb"), Some((1, 2)));
        assert_eq!(separator_end(b"a\r\n\r", b"\nb"), Some((1, 4)));
        assert_eq!(separator_end(b"\r", b"\n\r\nb"), Some((3, 4)));
        assert_eq!(separator_end(b"\r\n", b"\r\n"), Some((2, 4)));
        assert_eq!(separator_end(b"", b"\r\n\r"), None);
        assert_eq!(separator_end(b"x", b"\n"), None);
        assert_eq!(separator_end(b"", b""), None);
    }
}
