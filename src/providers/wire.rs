//! What differs between the upstream formats in what is read of a request and its answer: the
//! fields of a client's body the request path reads ([`Peek`]), how big a request may get, and
//! where usage is in a body or a stream. How a call is made is in [`super::exchange`]; what an
//! error answer means for the credential that got it, in [`super::classify`].

use super::Format;
use super::json::{Pick, Picked, Quantity};
pub use crate::domain::Usage;
use crate::quota::MAX_REQUEST_TOKENS;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess};
use serde_json::Value;

fn u(v: &Value) -> Option<u64> {
    v.as_u64()
}

/// The fields of a client's request body that the request path reads, each only if it has
/// the kind the request path uses; everything else, and every other field, is skipped as it
/// is parsed, never built (see [`super::json`]). The body is forwarded as the bytes it came as
/// unless something in it must change. A key given twice reads its last value.
#[derive(Debug, Default)]
pub struct Peek {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<Quantity>,
    max_completion_tokens: Option<Quantity>,
    /// `stream_options.include_usage`.
    include_usage: Option<bool>,
    /// `generationConfig.maxOutputTokens`.
    max_output_tokens: Option<Quantity>,
}

/// `stream_options`: only `include_usage` is read.
struct StreamOptions(Option<bool>);

impl Pick for StreamOptions {
    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        one_member(map, "include_usage").map(|v| Some(StreamOptions(v)))
    }
}

/// `generationConfig`: only `maxOutputTokens` is read.
struct GenerationConfig(Option<Quantity>);

impl Pick for GenerationConfig {
    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        one_member(map, "maxOutputTokens").map(|v| Some(GenerationConfig(v)))
    }
}

/// Read one member of an object (its last occurrence) as `T`, skipping the others.
fn one_member<'de, A: MapAccess<'de>, T: Pick>(
    mut map: A,
    wanted: &str,
) -> Result<Option<T>, A::Error> {
    let mut found = None;
    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
        if key == wanted {
            found = map.next_value::<Picked<T>>()?.0;
        } else {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(found)
}

/// The keys of [`Peek`], read without allocating.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum PeekKey {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    StreamOptions,
    #[serde(rename = "generationConfig")]
    GenerationConfig,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Peek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Peek;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Peek, A::Error> {
                let mut p = Peek::default();
                while let Some(key) = map.next_key::<PeekKey>()? {
                    match key {
                        PeekKey::Model => p.model = map.next_value::<Picked<_>>()?.0,
                        PeekKey::Stream => p.stream = map.next_value::<Picked<_>>()?.0,
                        PeekKey::MaxTokens => p.max_tokens = map.next_value::<Picked<_>>()?.0,
                        PeekKey::MaxCompletionTokens => {
                            p.max_completion_tokens = map.next_value::<Picked<_>>()?.0
                        }
                        PeekKey::StreamOptions => {
                            p.include_usage = map
                                .next_value::<Picked<StreamOptions>>()?
                                .0
                                .and_then(|o| o.0)
                        }
                        PeekKey::GenerationConfig => {
                            p.max_output_tokens = map
                                .next_value::<Picked<GenerationConfig>>()?
                                .0
                                .and_then(|g| g.0)
                        }
                        PeekKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(Visit)
    }
}

impl Peek {
    /// Read a body that must be a JSON object. `Err(None)` when it is valid JSON but not an
    /// object; `Err(Some(e))` when it is not JSON.
    pub fn read(body: &[u8]) -> Result<Peek, Option<serde_json::Error>> {
        if !super::json::is_object(body) {
            return Err(super::json::not_an_object(body));
        }
        serde_json::from_slice::<Peek>(body).map_err(Some)
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// `"stream": true`.
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// `"stream_options": {"include_usage": true}`.
    pub fn includes_usage(&self) -> bool {
        self.include_usage.unwrap_or(false)
    }
}

/// An output cap from a client's body: a whole number of tokens up to
/// [`MAX_REQUEST_TOKENS`] (`100.0` counts as 100). A number outside that is refused with the
/// message for a 400; anything else is not a cap we can read (the provider will judge it).
fn output_cap(name: &str, value: Option<Quantity>) -> Result<Option<u64>, String> {
    match value {
        None => Ok(None),
        Some(Quantity::Whole(tokens)) if tokens <= MAX_REQUEST_TOKENS => Ok(Some(tokens)),
        Some(n @ Quantity::Whole(_)) => Err(format!(
            "`{name}` is {n}: more than {MAX_REQUEST_TOKENS}, the most tokens one request may ask for"
        )),
        Some(Quantity::Other(f)) if f > MAX_REQUEST_TOKENS as f64 => Err(format!(
            "`{name}` is {f}: more than {MAX_REQUEST_TOKENS}, the most tokens one request may ask for"
        )),
        Some(n) => Err(format!("`{name}` is {n}: give a whole number of tokens")),
    }
}

/// The tokens a request may use: its output cap plus an estimate of its prompt (a quarter of
/// the body's bytes, rounded up, which errs high for text), or `default` without a cap. `Err`
/// (the message for a 400) when a cap is not a whole number within [`MAX_REQUEST_TOKENS`].
pub fn reservation(
    format: Format,
    body: &Peek,
    body_len: usize,
    default: u64,
) -> Result<u64, String> {
    let cap = match format {
        Format::Openai | Format::Kiro => {
            let completion = output_cap("max_completion_tokens", body.max_completion_tokens)?;
            let max = output_cap("max_tokens", body.max_tokens)?;
            completion.or(max)
        }
        Format::Anthropic => output_cap("max_tokens", body.max_tokens)?,
        Format::Gemini => output_cap("generationConfig.maxOutputTokens", body.max_output_tokens)?,
    };
    // The body is at most a few tens of MiB, so the sum stays far below any overflow.
    Ok(match cap {
        Some(cap) => cap.saturating_add(body_len.div_ceil(4) as u64),
        None => default,
    })
}

/// Read access to a usage object's counters: a parsed [`Value`], or the [`Counts`] read
/// straight from an answer's bytes. One reading of each format serves both.
trait Counters {
    /// Whether the field is there, whatever its value.
    fn has(&self, key: &str) -> bool;
    /// The field as a whole number.
    fn num(&self, key: &str) -> Option<u64>;
}

impl Counters for Value {
    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(u)
    }
}

/// A counter read from an answer: absent, or present with a whole number or something else.
#[derive(Debug, Default)]
enum Count {
    #[default]
    Absent,
    Present(Option<u64>),
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Count::Present(u(&Value::deserialize(d)?)))
    }
}

/// The counters of every format's usage object; the rest of it is skipped. Read only from an
/// object, a key given twice reading its last value, as a `Value` would.
#[derive(Debug, Default)]
struct Counts {
    prompt_tokens: Count,
    completion_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    prompt_token_count: Count,
    total_token_count: Count,
    candidates_token_count: Count,
    thoughts_token_count: Count,
    tool_use_prompt_token_count: Count,
}

/// The keys of [`Counts`], read without allocating.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    #[serde(rename = "promptTokenCount")]
    PromptTokenCount,
    #[serde(rename = "totalTokenCount")]
    TotalTokenCount,
    #[serde(rename = "candidatesTokenCount")]
    CandidatesTokenCount,
    #[serde(rename = "thoughtsTokenCount")]
    ThoughtsTokenCount,
    #[serde(rename = "toolUsePromptTokenCount")]
    ToolUsePromptTokenCount,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Counts;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Counts, A::Error> {
                let mut c = Counts::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::PromptTokens => &mut c.prompt_tokens,
                        Key::CompletionTokens => &mut c.completion_tokens,
                        Key::InputTokens => &mut c.input_tokens,
                        Key::OutputTokens => &mut c.output_tokens,
                        Key::CacheCreationInputTokens => &mut c.cache_creation_input_tokens,
                        Key::CacheReadInputTokens => &mut c.cache_read_input_tokens,
                        Key::PromptTokenCount => &mut c.prompt_token_count,
                        Key::TotalTokenCount => &mut c.total_token_count,
                        Key::CandidatesTokenCount => &mut c.candidates_token_count,
                        Key::ThoughtsTokenCount => &mut c.thoughts_token_count,
                        Key::ToolUsePromptTokenCount => &mut c.tool_use_prompt_token_count,
                        Key::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value()?;
                }
                Ok(c)
            }
        }
        d.deserialize_map(Visit)
    }
}

impl Counts {
    fn field(&self, key: &str) -> &Count {
        match key {
            "prompt_tokens" => &self.prompt_tokens,
            "completion_tokens" => &self.completion_tokens,
            "input_tokens" => &self.input_tokens,
            "output_tokens" => &self.output_tokens,
            "cache_creation_input_tokens" => &self.cache_creation_input_tokens,
            "cache_read_input_tokens" => &self.cache_read_input_tokens,
            "promptTokenCount" => &self.prompt_token_count,
            "totalTokenCount" => &self.total_token_count,
            "candidatesTokenCount" => &self.candidates_token_count,
            "thoughtsTokenCount" => &self.thoughts_token_count,
            "toolUsePromptTokenCount" => &self.tool_use_prompt_token_count,
            _ => &Count::Absent,
        }
    }
}

impl Counters for Counts {
    fn has(&self, key: &str) -> bool {
        matches!(self.field(key), Count::Present(_))
    }

    fn num(&self, key: &str) -> Option<u64> {
        match self.field(key) {
            Count::Present(n) => *n,
            Count::Absent => None,
        }
    }
}

/// Usage in a non-streamed answer.
pub fn usage_from_body(format: Format, body: &Value) -> Option<Usage> {
    match format {
        Format::Openai | Format::Kiro => openai_usage(body.get("usage")?),
        Format::Anthropic => anthropic_usage(body.get("usage")?),
        Format::Gemini => gemini_usage(body.get("usageMetadata")?),
    }
}

/// Usage in a non-streamed answer, read straight from its bytes: only the counters are kept,
/// the rest of the answer is skipped.
pub fn usage_from_answer(format: Format, body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Answer {
        usage: Option<Counts>,
        #[serde(rename = "usageMetadata")]
        usage_metadata: Option<Counts>,
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        // A usage that is not an object (or the other format's one): read it as a Value, as
        // the counters of streamed events are.
        return usage_from_body(format, &serde_json::from_slice(body).ok()?);
    };
    match format {
        Format::Openai | Format::Kiro => openai_usage(&answer.usage?),
        Format::Anthropic => anthropic_usage(&answer.usage?),
        Format::Gemini => gemini_usage(&answer.usage_metadata?),
    }
}

// Sums of a provider's counts saturate, and `Usage::reported` clamps each total: a provider
// that reports 2^64 - 1 tokens plus 2 is charged the most one request can use, not 1.

fn openai_usage(usage: &impl Counters) -> Option<Usage> {
    Some(Usage::reported(
        usage.num("prompt_tokens")?,
        usage.num("completion_tokens").unwrap_or(0),
    ))
}

fn anthropic_usage(usage: &impl Counters) -> Option<Usage> {
    let field = |k: &str| usage.num(k).unwrap_or(0);
    if !usage.has("input_tokens") && !usage.has("output_tokens") {
        return None;
    }
    Some(Usage::reported(
        field("input_tokens")
            .saturating_add(field("cache_creation_input_tokens"))
            .saturating_add(field("cache_read_input_tokens")),
        field("output_tokens"),
    ))
}

/// Gemini's `usageMetadata`: the prompt and the tool-use prompt (the results of tools the
/// model called, fed back to it) are input; the candidates and thoughts are output, and
/// `totalTokenCount` is all four. `cachedContentTokenCount` is the cached part of the prompt,
/// already inside `promptTokenCount`, so it is not added.
fn gemini_usage(meta: &impl Counters) -> Option<Usage> {
    let field = |k: &str| meta.num(k);
    let input = field("promptTokenCount")
        .unwrap_or(0)
        .saturating_add(field("toolUsePromptTokenCount").unwrap_or(0));
    let output = match field("totalTokenCount") {
        Some(total) => total.saturating_sub(input),
        None => field("candidatesTokenCount")
            .unwrap_or(0)
            .saturating_add(field("thoughtsTokenCount").unwrap_or(0)),
    };
    if [
        "promptTokenCount",
        "totalTokenCount",
        "toolUsePromptTokenCount",
    ]
    .iter()
    .all(|k| field(k).is_none())
    {
        return None;
    }
    Some(Usage::reported(input, output))
}

/// Fold one streamed event (its `data:` JSON) into the usage seen so far.
pub fn usage_from_event(format: Format, event: &Value, seen: &mut Option<Usage>) {
    match format {
        // Groq reports a stream's usage unasked in its last chunk's `x_groq.usage`, in
        // OpenAI's shape; a `usage` beside it (when asked) says the same.
        Format::Openai | Format::Kiro => {
            let usage = usage_from_body(format, event).or_else(|| {
                openai_usage(event.pointer("/x_groq/usage").filter(|u| u.is_object())?)
            });
            if let Some(usage) = usage {
                *seen = Some(usage);
            }
        }
        Format::Anthropic => {
            let current = seen.get_or_insert_with(Usage::default);
            match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    if let Some(usage) = event.pointer("/message/usage").and_then(anthropic_usage) {
                        current.input = current.input.max(usage.input);
                        current.output = current.output.max(usage.output);
                    }
                }
                // `output_tokens` here is cumulative: keep the last, never add.
                Some("message_delta") => {
                    if let Some(usage) = event.get("usage").and_then(anthropic_usage) {
                        current.input = current.input.max(usage.input);
                        current.output = usage.output.max(current.output);
                    }
                }
                _ => {}
            }
            if *current == Usage::default() {
                *seen = None;
            }
        }
        // Every record has the same shape as a whole answer; the last one counts.
        Format::Gemini => {
            if let Some(usage) = event.get("usageMetadata").and_then(gemini_usage) {
                *seen = Some(usage);
            }
        }
    }
}

/// Is this OpenAI stream event the usage-only chunk the proxy asked for?
pub fn is_openai_usage_chunk(event: &Value) -> bool {
    event.get("usage").is_some_and(|u| !u.is_null())
        && event
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn anthropic_stream_usage_is_cumulative() {
        let mut seen = None;
        for ev in [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}}),
            json!({"type": "content_block_delta"}),
            json!({"type": "message_delta", "usage": {"output_tokens": 10}}),
            json!({"type": "message_delta", "usage": {"output_tokens": 15}}),
        ] {
            usage_from_event(Format::Anthropic, &ev, &mut seen);
        }
        assert_eq!(
            seen,
            Some(Usage {
                input: 25,
                output: 15
            })
        );
    }

    fn peek(body: &Value) -> Peek {
        Peek::read(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn reservations() {
        let body = json!({"max_tokens": 100, "messages": []});
        let len = body.to_string().len();
        assert_eq!(
            reservation(Format::Openai, &peek(&body), len, 4096),
            Ok(100 + len.div_ceil(4) as u64)
        );
        assert_eq!(
            reservation(Format::Openai, &peek(&json!({})), 2, 4096),
            Ok(4096)
        );
        assert_eq!(
            reservation(
                Format::Gemini,
                &peek(&json!({"generationConfig": {"maxOutputTokens": 8}})),
                4,
                4096
            ),
            Ok(9)
        );
        // Caps within the bound, in any JSON spelling of a whole number.
        for (cap, tokens) in [
            ("0", 0),
            ("1", 1),
            ("100.0", 100),
            ("1e3", 1000),
            ("1000000000", MAX_REQUEST_TOKENS),
        ] {
            for (format, body) in [
                (Format::Openai, format!("{{\"max_tokens\": {cap}}}")),
                (
                    Format::Openai,
                    format!("{{\"max_completion_tokens\": {cap}}}"),
                ),
                (Format::Anthropic, format!("{{\"max_tokens\": {cap}}}")),
                (
                    Format::Gemini,
                    format!("{{\"generationConfig\": {{\"maxOutputTokens\": {cap}}}}}"),
                ),
            ] {
                let p = Peek::read(body.as_bytes()).unwrap();
                assert_eq!(reservation(format, &p, 0, 7), Ok(tokens), "{body}");
            }
        }
        // Above the bound, negative or fractional: refused, naming the field.
        for cap in [
            "18446744073709551615",
            "9223372036854775807",
            "1000000001",
            "100000000000000000000",
            "1e300",
            "-1",
            "-9223372036854775808",
            "0.5",
        ] {
            for (format, body, field) in [
                (
                    Format::Openai,
                    format!("{{\"max_tokens\": {cap}}}"),
                    "max_tokens",
                ),
                (
                    Format::Openai,
                    format!("{{\"max_tokens\": 5, \"max_completion_tokens\": {cap}}}"),
                    "max_completion_tokens",
                ),
                (
                    Format::Openai,
                    format!("{{\"max_completion_tokens\": 5, \"max_tokens\": {cap}}}"),
                    "max_tokens",
                ),
                (
                    Format::Anthropic,
                    format!("{{\"max_tokens\": {cap}}}"),
                    "max_tokens",
                ),
                (
                    Format::Gemini,
                    format!("{{\"generationConfig\": {{\"maxOutputTokens\": {cap}}}}}"),
                    "maxOutputTokens",
                ),
            ] {
                let p = Peek::read(body.as_bytes()).unwrap();
                let e = reservation(format, &p, 10, 7).unwrap_err();
                assert!(e.contains(field), "{body}: {e}");
            }
        }
    }

    #[test]
    fn usage_sums_saturate_and_clamp() {
        let max = u64::MAX;
        let answers = [
            (
                Format::Anthropic,
                json!({"usage": {"input_tokens": max, "cache_read_input_tokens": 2, "output_tokens": 1}}),
                (MAX_REQUEST_TOKENS, 1),
            ),
            (
                Format::Anthropic,
                json!({"usage": {"input_tokens": max, "cache_creation_input_tokens": max, "cache_read_input_tokens": max, "output_tokens": max}}),
                (MAX_REQUEST_TOKENS, MAX_REQUEST_TOKENS),
            ),
            (
                Format::Gemini,
                json!({"usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": max, "thoughtsTokenCount": 2}}),
                (1, MAX_REQUEST_TOKENS),
            ),
            (
                Format::Gemini,
                json!({"usageMetadata": {"promptTokenCount": max, "totalTokenCount": max}}),
                (MAX_REQUEST_TOKENS, 0),
            ),
            (
                Format::Openai,
                json!({"usage": {"prompt_tokens": max, "completion_tokens": 9223372036854775807u64}}),
                (MAX_REQUEST_TOKENS, MAX_REQUEST_TOKENS),
            ),
            (
                Format::Openai,
                json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
                (3, 4),
            ),
        ];
        for (format, body, (input, output)) in answers {
            let want = Some(Usage { input, output });
            assert_eq!(
                usage_from_answer(format, body.to_string().as_bytes()),
                want,
                "{body}"
            );
            assert_eq!(usage_from_body(format, &body), want, "{body}");
        }
        // Streamed events go through the same readings.
        let mut seen = None;
        usage_from_event(
            Format::Anthropic,
            &json!({"type": "message_start", "message": {"usage": {"input_tokens": max, "cache_read_input_tokens": 2}}}),
            &mut seen,
        );
        assert_eq!(seen.map(|u| u.input), Some(MAX_REQUEST_TOKENS));
    }

    #[test]
    fn peeks() {
        let p = Peek::read(br#" {"model": "m", "stream": true, "x": [1, {"y": 2}], "stream_options": {"include_usage": true}}"#).unwrap();
        assert_eq!(
            (p.model(), p.stream(), p.includes_usage()),
            (Some("m"), true, true)
        );
        // Fields of unexpected types read as absent, as a key given twice reads its last.
        let p = Peek::read(br#"{"model": 5, "stream": "yes", "max_tokens": "9"}"#).unwrap();
        assert_eq!((p.model(), p.stream()), (None, false));
        assert_eq!(reservation(Format::Openai, &p, 10, 7), Ok(7));
        let p = Peek::read(br#"{"model": "a", "model": "b"}"#).unwrap();
        assert_eq!(p.model(), Some("b"));
        // Not an object: valid JSON, or not JSON at all.
        assert!(matches!(Peek::read(b"[null, null]"), Err(None)));
        assert!(matches!(Peek::read(b"\"x\""), Err(None)));
        assert!(matches!(Peek::read(b"{\"model\": "), Err(Some(_))));
        assert!(matches!(Peek::read(b""), Err(Some(_))));
    }

    #[test]
    fn answers_read_like_bodies() {
        let answers = [
            (
                Format::Openai,
                json!({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "prompt_tokens_details": {"cached_tokens": 3}}}),
            ),
            (Format::Openai, json!({"usage": {"completion_tokens": 20}})),
            (Format::Openai, json!({"usage": null})),
            (
                Format::Openai,
                json!({"usage": {"prompt_tokens": "10", "completion_tokens": 2}}),
            ),
            (Format::Openai, json!({"choices": []})),
            (
                Format::Anthropic,
                json!({"content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 5, "output_tokens": 7, "cache_creation_input_tokens": 11, "cache_read_input_tokens": 13}}),
            ),
            (
                Format::Anthropic,
                json!({"usage": {"input_tokens": null, "service_tier": "standard"}}),
            ),
            (
                Format::Anthropic,
                json!({"usage": {"cache_read_input_tokens": 4}}),
            ),
            (
                Format::Gemini,
                json!({"candidates": [], "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 30, "candidatesTokenCount": 12}}),
            ),
            (
                Format::Gemini,
                json!({"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 12, "thoughtsTokenCount": 5}}),
            ),
            (
                Format::Gemini,
                json!({"usageMetadata": {"candidatesTokenCount": 12}}),
            ),
            (Format::Openai, json!({"usage": [10, 20]})),
            (
                Format::Openai,
                json!({"usage": {"prompt_tokens": 1}, "usageMetadata": 5}),
            ),
            (Format::Anthropic, json!({"usage": "none"})),
        ];
        for (format, body) in answers {
            assert_eq!(
                usage_from_answer(format, body.to_string().as_bytes()),
                usage_from_body(format, &body),
                "{format:?} {body}"
            );
        }
        assert_eq!(
            usage_from_answer(Format::Anthropic, br#"{"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 13}}"#),
            Some(Usage { input: 18, output: 7 })
        );
        assert_eq!(usage_from_answer(Format::Openai, b"not json"), None);
        // A key given twice reads its last value, as in a Value.
        assert_eq!(
            usage_from_answer(
                Format::Openai,
                br#"{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens": 3}}"#
            ),
            Some(Usage {
                input: 3,
                output: 2
            })
        );
    }
}
