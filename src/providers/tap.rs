//! The usage tap on a streamed answer: it reads server-sent events as they pass, keeps the
//! latest usage report, and forwards every byte as it arrives, except (for OpenAI streams whose
//! client did not ask for usage) the usage-only chunk the proxy asked for on its behalf, which
//! needs whole events to be recognised.

use super::Format;
use super::wire::{Usage, is_openai_usage_chunk, usage_from_event};
use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Largest partial event kept while waiting for its end; past it the tap stops parsing (and
/// forwards everything) rather than grow without bound.
const MAX_PENDING: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct StreamTap {
    format: Format,
    /// Hide OpenAI's usage-only chunk (the client did not ask for it).
    hide_usage_chunk: bool,
    /// Bytes of the event in progress (all of them when hiding; a copy otherwise).
    pending: BytesMut,
    usage: Option<Usage>,
    /// The stream was not server-sent events (Gemini without `alt=sse`): parse it at the end.
    json_array: bool,
    overflowed: bool,
}

/// Where one event ends in `buf`, and the length of its separator.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if i + 3 < buf.len() && &buf[i..i + 4] == b"\r\n\r\n" {
            return Some((i, 4));
        }
        i += 1;
    }
    None
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
            usage: None,
            json_array,
            overflowed: false,
        }
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Take in one upstream chunk; return what to send the client now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.overflowed {
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        if self.pending.len() > MAX_PENDING {
            self.overflowed = true;
            let rest = self.pending.split().freeze();
            return if self.hide_usage_chunk { rest } else { chunk };
        }
        if self.json_array {
            return chunk;
        }
        let mut out = BytesMut::new();
        while let Some((end, sep)) = event_end(&self.pending) {
            let event = self.pending.split_to(end + sep);
            let json = event_json(&event[..end]);
            if let Some(json) = &json {
                usage_from_event(self.format, json, &mut self.usage);
            }
            let hide = self.hide_usage_chunk && json.as_ref().is_some_and(is_openai_usage_chunk);
            if self.hide_usage_chunk && !hide {
                out.extend_from_slice(&event);
            }
        }
        if self.hide_usage_chunk {
            out.freeze()
        } else {
            chunk
        }
    }

    /// The stream ended: what is left to send, and the usage.
    pub fn finish(&mut self) -> Bytes {
        if self.json_array && !self.overflowed {
            if let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&self.pending) {
                for item in &items {
                    usage_from_event(self.format, item, &mut self.usage);
                }
            }
            return Bytes::new();
        }
        if self.hide_usage_chunk {
            let rest = self.pending.split().freeze();
            if let Some(json) = event_json(&rest) {
                usage_from_event(self.format, &json, &mut self.usage);
                if is_openai_usage_chunk(&json) {
                    return Bytes::new();
                }
            }
            return rest;
        }
        let rest = self.pending.split();
        if let Some(json) = event_json(&rest) {
            usage_from_event(self.format, &json, &mut self.usage);
        }
        Bytes::new()
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
}
