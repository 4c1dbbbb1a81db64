//! A local mock of the OpenAI, Anthropic and Gemini APIs, reached over real HTTP through the
//! configured base URLs. Its behaviour depends on the credential it receives: a token
//! containing `bad` gets 401, `broke` 402, `quota` OpenAI's insufficient_quota 429, `slow` a
//! 429 with `retry-after: 30`, `down` a 503; any other succeeds. It reports usage derived from
//! the request and keeps, per token, the requests it served and the tokens it reported. An
//! OpenAI model named `…-huge-N` streams one content event of N bytes before the usage.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub reported: u64,
}

#[derive(Default)]
pub struct MockState {
    pub served: Mutex<HashMap<String, Served>>,
    /// Order in which tokens were served successfully.
    pub order: Mutex<Vec<String>>,
    /// Every header value the mock has seen, to check client keys never arrive.
    pub seen_headers: Mutex<Vec<String>>,
    /// Delay between streamed chunks and before answers, in milliseconds.
    pub delay_ms: AtomicU64,
}

pub struct Mock {
    pub base: String,
    pub state: Arc<MockState>,
}

impl Mock {
    pub async fn start() -> Mock {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/v1beta/models/{model_action}", post(gemini))
            .with_state(state.clone());
        let base = crate::common::serve(app).await;
        Mock { base, state }
    }

    /// The config lines that point openai, claude and gemini at this mock.
    pub fn providers_yaml(&self) -> String {
        format!(
            "providers:\n  openai: {{ base_url: \"{b}/v1\" }}\n  claude: {{ base_url: \"{b}\" }}\n  gemini: {{ base_url: \"{b}/v1beta\" }}\n",
            b = self.base
        )
    }

    pub fn served(&self, token: &str) -> Served {
        self.state
            .served
            .lock()
            .unwrap()
            .get(token)
            .copied()
            .unwrap_or_default()
    }

    pub fn order(&self) -> Vec<String> {
        self.state.order.lock().unwrap().clone()
    }

    pub fn saw(&self, needle: &str) -> bool {
        self.state
            .seen_headers
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.contains(needle))
    }
}

fn token_of(headers: &HeaderMap) -> String {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    h("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
        .or_else(|| h("x-api-key"))
        .or_else(|| h("x-goog-api-key"))
        .unwrap_or_default()
}

/// The failure a token asks for, in the provider's error shape.
fn failure(token: &str, format: &str) -> Option<Response> {
    let (status, kind) = if token.contains("bad") {
        (401, "authentication_error")
    } else if token.contains("broke") {
        (402, "insufficient_balance")
    } else if token.contains("quota") {
        (429, "insufficient_quota")
    } else if token.contains("slow") {
        (429, "rate_limit_exceeded")
    } else if token.contains("down") {
        (503, "overloaded")
    } else {
        return None;
    };
    let body = match format {
        "anthropic" => json!({"type": "error", "error": {"type": kind, "message": "mock failure"}}),
        "gemini" => json!({"error": {"code": status, "message": "mock failure", "status": kind}}),
        _ => json!({"error": {"message": "mock failure", "type": kind, "code": kind}}),
    };
    let mut resp = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    if token.contains("slow") {
        resp.headers_mut()
            .insert("retry-after", "30".parse().unwrap());
    }
    Some(resp)
}

impl MockState {
    fn record_headers(&self, headers: &HeaderMap) {
        let mut seen = self.seen_headers.lock().unwrap();
        for v in headers.values() {
            seen.push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
    }

    fn record(&self, token: &str, reported: u64) {
        let mut served = self.served.lock().unwrap();
        let s = served.entry(token.to_string()).or_default();
        s.requests += 1;
        s.reported += reported;
        self.order.lock().unwrap().push(token.to_string());
    }

    async fn pause(&self) {
        let ms = self.delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// Usage for a request: input from its size (well under the proxy's estimate of a quarter of
/// its bytes), output its cap or 11.
fn usage_for(body: &[u8], cap: Option<u64>) -> (u64, u64) {
    (
        (body.len() as u64 / 10).max(1),
        cap.unwrap_or(11).clamp(1, 11),
    )
}

fn sse(events: Vec<String>, state: Arc<MockState>) -> Response {
    let stream =
        futures_util::stream::unfold((events.into_iter(), state), |(mut it, state)| async move {
            let ev = it.next()?;
            state.pause().await;
            Some((Ok::<Bytes, std::io::Error>(Bytes::from(ev)), (it, state)))
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn openai(State(state): State<Arc<MockState>>, headers: HeaderMap, raw: Bytes) -> Response {
    state.record_headers(&headers);
    let token = token_of(&headers);
    if let Some(f) = failure(&token, "openai") {
        return f;
    }
    state.pause().await;
    let body: Value = serde_json::from_slice(&raw).unwrap();
    let cap = body.get("max_tokens").and_then(Value::as_u64);
    let (input, output) = usage_for(&raw, cap);
    let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
    let model = body["model"].clone();
    if body["stream"] == true {
        let include = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let mut events: Vec<String> = (0..5)
            .map(|i| {
                let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}], "usage": null});
                format!("data: {chunk}\n\n")
            })
            .collect();
        // A model named `…-huge-N` gets one content event of N bytes before the usage chunk.
        if let Some(n) = model
            .as_str()
            .and_then(|m| m.rsplit_once("-huge-"))
            .and_then(|(_, n)| n.parse::<usize>().ok())
        {
            let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": {"content": "x".repeat(n)}, "finish_reason": null}], "usage": null});
            events.push(format!("data: {chunk}\n\n"));
        }
        if include {
            let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage});
            events.push(format!("data: {chunk}\n\n"));
            state.record(&token, input + output);
        } else {
            state.record(&token, 0);
        }
        events.push("data: [DONE]\n\n".into());
        return sse(events, state);
    }
    state.record(&token, input + output);
    axum::Json(json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello from the mock"}, "finish_reason": "stop"}],
        "usage": usage
    }))
    .into_response()
}

async fn anthropic(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    state.record_headers(&headers);
    let token = token_of(&headers);
    if let Some(f) = failure(&token, "anthropic") {
        return f;
    }
    assert!(
        headers.contains_key("anthropic-version"),
        "anthropic-version is sent"
    );
    state.pause().await;
    let body: Value = serde_json::from_slice(&raw).unwrap();
    let (input, output) = usage_for(&raw, body.get("max_tokens").and_then(Value::as_u64));
    state.record(&token, input + output);
    let model = body["model"].clone();
    if body["stream"] == true {
        let msg = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}});
        let mut events = vec![
            format!(
                "event: message_start\ndata: {}\n\n",
                json!({"type": "message_start", "message": msg})
            ),
            format!(
                "event: content_block_start\ndata: {}\n\n",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            ),
        ];
        for i in 0..3 {
            events.push(format!("event: content_block_delta\ndata: {}\n\n", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}})));
        }
        events.push(format!(
            "event: content_block_stop\ndata: {}\n\n",
            json!({"type": "content_block_stop", "index": 0})
        ));
        // Cumulative output counts: the last one is the total.
        for out in [output.div_ceil(2), output] {
            events.push(format!("event: message_delta\ndata: {}\n\n", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": out}})));
        }
        events.push(format!(
            "event: message_stop\ndata: {}\n\n",
            json!({"type": "message_stop"})
        ));
        return sse(events, state);
    }
    axum::Json(json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "hello from the mock"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output}
    }))
    .into_response()
}

async fn gemini(
    State(state): State<Arc<MockState>>,
    Path(model_action): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    state.record_headers(&headers);
    let token = token_of(&headers);
    if let Some(f) = failure(&token, "gemini") {
        return f;
    }
    state.pause().await;
    let body: Value = serde_json::from_slice(&raw).unwrap();
    let cap = body
        .pointer("/generationConfig/maxOutputTokens")
        .and_then(Value::as_u64);
    let (input, output) = usage_for(&raw, cap);
    state.record(&token, input + output);
    let chunk = |text: &str, out: u64| {
        json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
               "usageMetadata": {"promptTokenCount": input, "candidatesTokenCount": out, "totalTokenCount": input + out},
               "modelVersion": "gemini-mock"})
    };
    if model_action.ends_with(":streamGenerateContent") {
        let events = vec![
            format!("data: {}\r\n\r\n", chunk("tok0 ", 1)),
            format!("data: {}\r\n\r\n", chunk("tok1 ", output.div_ceil(2))),
            format!("data: {}\r\n\r\n", chunk("tok2", output)),
        ];
        return sse(events, state);
    }
    axum::Json(chunk("hello from the mock", output)).into_response()
}
