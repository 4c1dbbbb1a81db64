//! An exchange with a provider, format by format: which of the client's headers go on, how the
//! credential is attached, how the body is prepared (an OpenAI stream asked for its usage on
//! the client's behalf), how the streamed answer is read, and which of the answer's headers
//! go back to the client. The request path (`crate::proxy`) asks here and decides nothing by
//! format itself; where usage is in an answer is read in [`super::wire`] and [`super::tap`],
//! what an error answer means in [`super::classify`].

use super::json;
use super::tap::StreamTap;
use super::wire::{self, Peek};
use super::{Format, Provider, StreamUsage};
use axum::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

/// Why a client's body cannot be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Valid JSON of another kind than an object.
    #[error("The body must be a JSON object")]
    NotAnObject,
    #[error("The body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    /// A field the request path reads holds what no request may ask (the message says which).
    #[error("{0}")]
    Invalid(String),
}

impl From<Option<serde_json::Error>> for BodyError {
    /// From [`Peek::read`]'s and [`json::member`]'s errors: `None` for JSON that is not an
    /// object.
    fn from(error: Option<serde_json::Error>) -> Self {
        error.map_or(BodyError::NotAnObject, BodyError::NotJson)
    }
}

/// The client's headers a provider of `format` may need (never a key).
pub fn pass_headers(format: Format, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let names: &[&str] = match format {
        Format::Anthropic => &["anthropic-version", "anthropic-beta"],
        Format::Openai | Format::Gemini | Format::Kiro => &[],
    };
    names
        .iter()
        .filter_map(|n| {
            headers
                .get(*n)
                .map(|v| (HeaderName::from_static(n), v.clone()))
        })
        .collect()
}

/// Where the provider expects the credential: the header, and what goes before the token.
fn credential_header(format: Format) -> (HeaderName, &'static str) {
    match format {
        Format::Openai | Format::Kiro => (AUTHORIZATION, "Bearer "),
        Format::Anthropic => (HeaderName::from_static("x-api-key"), ""),
        Format::Gemini => (HeaderName::from_static("x-goog-api-key"), ""),
    }
}

/// The headers of an upstream call: the client's passed-on ones, the format's defaults (the
/// Anthropic API version when the client named none), and the credential attached the
/// provider's way. `Err` (why the credential is invalid) when the token cannot be sent in a
/// header at all.
pub fn headers(
    format: Format,
    pass: &[(HeaderName, HeaderValue)],
    token: &str,
) -> Result<HeaderMap, String> {
    let (auth_name, auth_prefix) = credential_header(format);
    let auth = crate::upstream::credential_value(auth_prefix, token)
        .map_err(|_| "its token holds characters an HTTP header cannot carry".to_string())?;
    let mut headers = HeaderMap::with_capacity(4 + pass.len());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    for (k, v) in pass {
        headers.append(k, v.clone());
    }
    if format == Format::Anthropic && !headers.contains_key("anthropic-version") {
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    }
    headers.insert(auth_name, auth);
    Ok(headers)
}

/// A client's body made ready for its provider.
#[derive(Debug)]
pub struct Prepared {
    /// The bytes to send: the client's, unless something in them had to change.
    pub body: Bytes,
    /// The tokens to reserve for the request ([`wire::reservation`]).
    pub tokens: u64,
    /// The stream was asked for its usage on the client's behalf, so the usage-only chunk is
    /// hidden from the client ([`stream_tap`]).
    pub hide_usage_chunk: bool,
    /// copilot: the body sends an image (`copilot-vision-request`).
    pub vision: bool,
}

/// Prepare the body `raw` (read into `peek`) for `provider`. An OpenAI-format stream is asked
/// for its usage on the client's behalf only where the provider accepts `stream_options`
/// (`providers.<name>.stream_usage`), and only when the client did not ask itself. Otherwise
/// the body goes as it came, and the usage the provider sends on its own (Mistral's last
/// chunk, Groq's `x_groq.usage`) is read as it passes.
pub fn prepare(
    provider: &Provider,
    peek: &Peek,
    raw: &Bytes,
    stream: bool,
    default_reservation: u64,
) -> Result<Prepared, BodyError> {
    let hide_usage_chunk = provider.format == Format::Openai
        && stream
        && provider.stream_usage == StreamUsage::Ask
        && !peek.includes_usage();
    let body = if hide_usage_chunk {
        ask_for_usage(raw)?
    } else {
        raw.clone()
    };
    let tokens = wire::reservation(provider.format, peek, body.len(), default_reservation)
        .map_err(BodyError::Invalid)?;
    let vision = provider.copilot.is_some() && super::copilot::has_image(&body);
    Ok(Prepared {
        body,
        tokens,
        hide_usage_chunk,
        vision,
    })
}

/// `body` (a JSON object, as [`Peek::read`] found) with member `key` set to `value` (JSON
/// text), as new bytes; every other byte is kept as it came (see [`json::set_member`]).
pub fn rewrite(body: &[u8], key: &str, value: &str) -> Result<Bytes, BodyError> {
    json::set_member(body, key, value)
        .map(Bytes::from)
        .map_err(BodyError::from)
}

/// Ask an OpenAI stream for its usage: `stream_options.include_usage` set, the other options
/// kept (a `stream_options` that is not an object is replaced).
fn ask_for_usage(body: &[u8]) -> Result<Bytes, BodyError> {
    let options = json::member(body, "stream_options")?
        .and_then(|o| json::set_member(o.get().as_bytes(), "include_usage", "true").ok());
    let options = match &options {
        Some(o) => std::str::from_utf8(o).map_err(|_| BodyError::NotAnObject)?,
        None => r#"{"include_usage":true}"#,
    };
    rewrite(body, "stream_options", options)
}

/// The usage tap for a streamed answer of `format` to a request for `path`: a Gemini stream
/// asked for without `alt=sse` is one JSON array rather than server-sent events.
pub fn stream_tap(format: Format, path: &str, hide_usage_chunk: bool) -> StreamTap {
    let json_array = format == Format::Gemini && !path.contains("alt=sse");
    StreamTap::new(format, hide_usage_chunk, json_array)
}

/// Answer headers worth passing back to the client: the answer's type, the provider's waits
/// and rate limits, and its request ids (for support). Nothing that says whose key answered:
/// OpenAI's `openai-organization` and `openai-project` name the pooled key's owner, so of
/// OpenAI's own headers only the version and the processing time pass (and no
/// `anthropic-organization-id`, no `x-goog-*`, no cookies).
fn passes_back(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "content-type"
            | "retry-after"
            | "request-id"
            | "x-request-id"
            | "openai-version"
            | "openai-processing-ms"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
}

/// The headers of `answer` that pass back to the client ([`passes_back`]).
pub fn answer_headers(answer: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in answer {
        if passes_back(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Registry;
    use std::collections::BTreeMap;

    fn provider(name: &str) -> std::sync::Arc<Provider> {
        Registry::from_config(&BTreeMap::new())
            .get(name)
            .unwrap()
            .clone()
    }

    fn prepared(name: &str, body: &str, stream: bool) -> Prepared {
        let raw = Bytes::copy_from_slice(body.as_bytes());
        let peek = Peek::read(&raw).unwrap();
        prepare(&provider(name), &peek, &raw, stream, 4096).unwrap()
    }

    #[test]
    fn only_openai_streams_of_providers_that_accept_it_are_asked_for_usage() {
        let asked = prepared("openai", r#"{"model": "gpt-4o", "stream": true}"#, true);
        assert!(asked.hide_usage_chunk);
        assert_eq!(
            asked.body,
            r#"{"model": "gpt-4o", "stream": true,"stream_options":{"include_usage":true}}"#
        );
        let kept = r#"{"stream": true, "stream_options": {"x": 1}}"#;
        assert_eq!(
            prepared("openai", kept, true).body,
            r#"{"stream": true, "stream_options": {"x": 1,"include_usage":true}}"#
        );
        for (name, body, stream) in [
            ("openai", r#"{"stream": false}"#, false),
            (
                "openai",
                r#"{"stream": true, "stream_options": {"include_usage": true}}"#,
                true,
            ),
            ("mistral", r#"{"stream": true}"#, true),
            ("claude", r#"{"stream": true}"#, true),
            ("gemini", "{}", true),
        ] {
            let p = prepared(name, body, stream);
            assert!(!p.hide_usage_chunk, "{name} {body}");
            assert_eq!(p.body, body, "{name}: the body as it came");
        }
        let raw = Bytes::from_static(br#"{"max_tokens": -1}"#);
        let peek = Peek::read(&raw).unwrap();
        let refused = prepare(&provider("openai"), &peek, &raw, false, 4096);
        assert!(matches!(refused, Err(BodyError::Invalid(m)) if m.contains("max_tokens")));
    }

    #[test]
    fn the_credential_goes_where_each_format_expects_it() {
        let pass = pass_headers(
            Format::Anthropic,
            &HeaderMap::from_iter([
                (
                    HeaderName::from_static("anthropic-beta"),
                    HeaderValue::from_static("b"),
                ),
                (
                    HeaderName::from_static("x-api-key"),
                    HeaderValue::from_static("client-key"),
                ),
            ]),
        );
        assert_eq!(pass.len(), 1, "only the Anthropic headers, never a key");
        let sent = headers(Format::Anthropic, &pass, "sk-ant").unwrap();
        assert_eq!(sent["x-api-key"], "sk-ant");
        assert_eq!(sent["anthropic-version"], "2023-06-01");
        assert_eq!(sent["anthropic-beta"], "b");
        let named = [(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static("2024-01-01"),
        )];
        let sent = headers(Format::Anthropic, &named, "k").unwrap();
        assert_eq!(sent.get_all("anthropic-version").iter().count(), 1);
        assert_eq!(sent["anthropic-version"], "2024-01-01");
        assert_eq!(
            headers(Format::Openai, &[], "sk").unwrap()["authorization"],
            "Bearer sk"
        );
        assert_eq!(
            headers(Format::Gemini, &[], "g").unwrap()["x-goog-api-key"],
            "g"
        );
        assert!(headers(Format::Openai, &[], "bad\nkey").is_err());
    }

    #[test]
    fn only_harmless_answer_headers_pass_back() {
        let answer = HeaderMap::from_iter(
            [
                ("content-type", "application/json"),
                ("retry-after", "3"),
                ("x-ratelimit-remaining-requests", "0"),
                ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:00Z"),
                ("openai-organization", "the-owner"),
                ("set-cookie", "a=b"),
                ("x-goog-api-client", "x"),
            ]
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v))),
        );
        let back = answer_headers(&answer);
        let names: Vec<&str> = back.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "retry-after",
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-tokens-reset"
            ]
        );
    }
}
