//! A mock of the providers that answers the way they do, reached over real HTTP through the
//! configured base URLs (`openai`, `mistral`, `groq`, `deepseek`, `claude`, `gemini`).
//!
//! A token the test gave a [`Reply`] gets that reply, word for word (the bodies and headers
//! below are the providers' own, each from the source named beside it; `{model}` in a body is
//! replaced by the model the request named, as the providers quote it). Any other token is
//! answered as the provider would answer its request: its fields are checked against the
//! provider's schema, and a field, value or message part the provider does not know is quoted
//! back in the provider's error, exactly where the provider quotes it; a request it accepts
//! gets a non-streamed answer with usage.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One provider answer: status, headers and body, as the provider sends them.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn new(status: u16, headers: &[(&str, &str)], body: Value) -> Reply {
        Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        }
    }

    /// The same reply with more headers.
    pub fn with(mut self, headers: &[(&str, &str)]) -> Reply {
        self.headers
            .extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    // OpenAI (developers.openai.com/docs/guides/error-codes) and the OpenAI-format providers.

    fn openai(status: u16, message: &str, kind: &str, code: Value) -> Reply {
        Reply::new(
            status,
            &[
                ("x-request-id", "req_7c1f3b2a9d8e4f60a1b2c3d4e5f60718"),
                ("openai-processing-ms", "23"),
            ],
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        )
    }

    pub fn openai_invalid_key() -> Reply {
        Reply::openai(
            401,
            "Incorrect API key provided: sk-proj-********************abcd. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            json!("invalid_api_key"),
        )
    }

    pub fn openai_insufficient_quota() -> Reply {
        Reply::openai(
            429,
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            json!("insufficient_quota"),
        )
    }

    /// "Rate limit reached for requests" with the rate-limit headers of that moment.
    pub fn openai_rate_limited(kind: &str, headers: &[(&str, &str)]) -> Reply {
        Reply::openai(
            429,
            &format!("Rate limit reached for gpt-4o in organization org-2itOgSdqw0DhUYp0QyLhttLL on {kind} per min. Limit: 500, Used: 500, Requested: 1. Please try again in 120ms. Visit https://platform.openai.com/account/rate-limits to learn more."),
            kind,
            json!("rate_limit_exceeded"),
        )
        .with(headers)
    }

    /// Aider-AI/aider#1880.
    pub fn openai_request_too_large(limit: u64, requested: u64) -> Reply {
        Reply::openai(
            429,
            &format!("Request too large for gpt-4o in organization org-2itOgSdqw0DhUYp0QyLhttLL on tokens per min (TPM): Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more."),
            "tokens",
            json!("rate_limit_exceeded"),
        )
        .with(&[
            ("x-ratelimit-limit-tokens", &limit.to_string()),
            ("x-ratelimit-remaining-tokens", &limit.to_string()),
            ("x-ratelimit-reset-tokens", "0s"),
        ])
    }

    /// vanna-ai/vanna-flask#11: the same, without the organization.
    pub fn openai_request_too_large_plain() -> Reply {
        Reply::openai(
            429,
            "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 342389. The input or output tokens must be reduced in order to run successfully.",
            "tokens",
            json!("rate_limit_exceeded"),
        )
    }

    /// Groq's wording (elizaOS/eliza#4040), with 429 and with the 413 Groq sends
    /// (assafelovic/gpt-researcher#985).
    pub fn groq_request_too_large(status: u16) -> Reply {
        Reply::new(
            status,
            &[("x-request-id", "req_01jp8c0e2ffd9tq8m0dbhb6a1e")],
            json!({"error": {"message": "Request too large for model `llama-3.1-8b-instant` in organization `org_01j5b4pz9jff492fq686vypsx6` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 6294, please reduce your message size and try again. Visit https://console.groq.com/docs/rate-limits for more information.", "type": "tokens", "code": "rate_limit_exceeded"}}),
        )
    }

    /// home-assistant/core#120072.
    pub fn openai_region() -> Reply {
        Reply::openai(
            403,
            "Country, region, or territory not supported",
            "request_forbidden",
            json!("unsupported_country_region_territory"),
        )
    }

    /// cursor/cursor#2953, quoting the model.
    pub fn openai_project_model() -> Reply {
        Reply::openai(
            403,
            "Project `proj_QRf115YMnQwMUdTI9cu2sWQ8` does not have access to model `{model}`",
            "invalid_request_error",
            json!("model_not_found"),
        )
    }

    pub fn openai_overloaded() -> Reply {
        Reply::openai(
            503,
            "The engine is currently overloaded, please try again later",
            "server_error",
            Value::Null,
        )
    }

    /// api-docs.deepseek.com/quick_start/error_codes: "402 - Insufficient Balance".
    pub fn deepseek_insufficient_balance() -> Reply {
        Reply::new(
            402,
            &[],
            json!({"error": {"message": "Insufficient Balance", "type": "unknown_error", "param": null, "code": "invalid_request_error"}}),
        )
    }

    /// continuedev/continue#6185.
    pub fn mistral_capacity() -> Reply {
        Reply::new(
            429,
            &[],
            json!({"object": "error", "message": "Service tier capacity exceeded for this model.", "type": "invalid_request_error", "param": null, "code": null}),
        )
    }

    /// console.groq.com/docs/flex-processing.
    pub fn groq_flex_capacity() -> Reply {
        Reply::new(
            498,
            &[],
            json!({"error": {"message": "Flex tier capacity exceeded. This is a temporary error due to high demand. Please retry your request later.", "type": "capacity_exceeded", "code": "capacity_exceeded"}}),
        )
    }

    // Anthropic (docs.claude.com/en/api/errors).

    fn anthropic(status: u16, kind: &str, message: &str) -> Reply {
        Reply::new(
            status,
            &[("request-id", "req_011CZLrUfBVkVHn5T6EqQaf7")],
            json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CZLrUfBVkVHn5T6EqQaf7"}),
        )
    }

    /// anthropics/claude-quickstarts#229.
    pub fn anthropic_credit_balance() -> Reply {
        Reply::anthropic(
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        )
    }

    /// anthropics/claude-code#38035; `None`: the sentence alone.
    pub fn anthropic_usage_limits(regain: Option<&str>) -> Reply {
        let message = match regain {
            Some(when) => format!(
                "You have reached your specified API usage limits. You will regain access on {when} UTC."
            ),
            None => "You have reached your specified API usage limits.".to_string(),
        };
        Reply::anthropic(400, "invalid_request_error", &message)
    }

    /// anthropics/claude-code#19028.
    pub fn anthropic_organization_disabled() -> Reply {
        Reply::anthropic(
            400,
            "invalid_request_error",
            "This organization has been disabled.",
        )
    }

    pub fn anthropic_invalid_key() -> Reply {
        Reply::anthropic(401, "authentication_error", "invalid x-api-key")
    }

    pub fn anthropic_permission() -> Reply {
        Reply::anthropic(
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        )
    }

    /// anthropics/claude-code#1613: from the edge, without the outer `type`.
    pub fn anthropic_region() -> Reply {
        Reply::new(
            403,
            &[("server", "cloudflare"), ("cf-ray", "89cdc7d74e3e2512-SJC")],
            json!({"error": {"type": "forbidden", "message": "Request not allowed"}}),
        )
    }

    pub fn anthropic_rate_limited(headers: &[(&str, &str)]) -> Reply {
        Reply::anthropic(
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50,000 input tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
        )
        .with(headers)
    }

    pub fn anthropic_overloaded() -> Reply {
        Reply::anthropic(529, "overloaded_error", "Overloaded")
    }

    // Gemini (ai.google.dev/gemini-api/docs/troubleshooting).

    fn gemini(status: u16, state: &str, message: &str, details: Value) -> Reply {
        let mut error = json!({"code": status, "message": message, "status": state});
        if details != Value::Null {
            error["details"] = details;
        }
        Reply::new(
            status,
            &[("content-type", "application/json; charset=UTF-8")],
            json!({ "error": error }),
        )
    }

    fn error_info(reason: &str) -> Value {
        json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}})
    }

    /// continuedev/continue#11336 (an expired key comes with API_KEY_INVALID too).
    pub fn gemini_key_invalid(message: &str) -> Reply {
        Reply::gemini(
            400,
            "INVALID_ARGUMENT",
            message,
            json!([Reply::error_info("API_KEY_INVALID"), {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message}]),
        )
    }

    /// google/generative-ai-docs#74.
    pub fn gemini_service_disabled() -> Reply {
        Reply::gemini(
            403,
            "PERMISSION_DENIED",
            "Generative Language API has not been used in project 411082643095 before or it is disabled. Enable it by visiting https://console.developers.google.com/apis/api/generativelanguage.googleapis.com/overview?project=411082643095 then retry.",
            json!([{"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Google developers console API activation", "url": "https://console.developers.google.com/apis/api/generativelanguage.googleapis.com/overview?project=411082643095"}]}, Reply::error_info("SERVICE_DISABLED")]),
        )
    }

    /// gethouston/houston#1220.
    pub fn gemini_denied_access() -> Reply {
        Reply::gemini(
            403,
            "PERMISSION_DENIED",
            "Your project has been denied access. Please contact support.",
            Value::Null,
        )
    }

    /// google-gemini/gemini-cli#24641.
    pub fn gemini_location() -> Reply {
        Reply::gemini(
            400,
            "FAILED_PRECONDITION",
            "User location is not supported for the API use.",
            Value::Null,
        )
    }

    /// browserbase/mcp-server-browserbase#129: QuotaFailure, and RetryInfo when `delay` is
    /// given.
    pub fn gemini_resource_exhausted(delay: Option<&str>) -> Reply {
        let mut details = vec![
            json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}),
            json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count", "quotaId": "GenerateContentPaidTierInputTokensPerModelPerMinute", "quotaDimensions": {"location": "global", "model": "{model}"}, "quotaValue": "4000000"}]}),
        ];
        if let Some(d) = delay {
            details.push(
                json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": d}),
            );
        }
        Reply::gemini(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
            Value::Array(details),
        )
    }

    pub fn gemini_unavailable() -> Reply {
        Reply::gemini(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            Value::Null,
        )
    }
}

#[derive(Default)]
struct MockState {
    replies: Mutex<HashMap<String, Reply>>,
    calls: Mutex<HashMap<String, u64>>,
}

pub struct ProviderMock {
    pub base: String,
    state: Arc<MockState>,
}

impl ProviderMock {
    pub async fn start() -> ProviderMock {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/v1beta/models/{model_action}", post(gemini))
            .with_state(state.clone());
        let base = crate::common::serve(app).await;
        ProviderMock { base, state }
    }

    /// The config lines that point the providers at this mock.
    pub fn providers_yaml(&self) -> String {
        let b = &self.base;
        let mut yaml = String::from("providers:\n");
        for name in ["openai", "mistral", "groq", "deepseek"] {
            yaml.push_str(&format!("  {name}: {{ base_url: \"{b}/v1\" }}\n"));
        }
        yaml.push_str(&format!("  claude: {{ base_url: \"{b}\" }}\n"));
        yaml.push_str(&format!("  gemini: {{ base_url: \"{b}/v1beta\" }}\n"));
        yaml
    }

    /// What `token` gets from now on.
    pub fn reply(&self, token: &str, reply: Reply) {
        self.state
            .replies
            .lock()
            .unwrap()
            .insert(token.to_string(), reply);
    }

    /// Calls that reached the mock with `token`.
    pub fn calls(&self, token: &str) -> u64 {
        self.state
            .calls
            .lock()
            .unwrap()
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Calls that reached the mock, all tokens together.
    pub fn total_calls(&self) -> u64 {
        self.state.calls.lock().unwrap().values().sum()
    }
}

fn token_of(headers: &HeaderMap) -> String {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    h("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h("x-api-key"))
        .or_else(|| h("x-goog-api-key"))
        .unwrap_or_default()
        .to_string()
}

/// The reply set for this token, if any, with the request's model quoted in; counts the call.
fn canned(state: &MockState, headers: &HeaderMap, model: &str) -> Option<Response> {
    let token = token_of(headers);
    *state
        .calls
        .lock()
        .unwrap()
        .entry(token.clone())
        .or_default() += 1;
    let reply = state.replies.lock().unwrap().get(&token).cloned()?;
    let quoted = serde_json::to_string(model).unwrap();
    let body = reply.body.replace("{model}", &quoted[1..quoted.len() - 1]);
    Some(send(reply.status, &reply.headers, body))
}

fn send(status: u16, headers: &[(String, String)], body: String) -> Response {
    let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        r.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

fn object(raw: &[u8]) -> Map<String, Value> {
    serde_json::from_slice(raw).expect("the proxy forwards JSON objects only")
}

/// The first key of `map` not in `known`.
fn unknown<'a>(map: &'a Map<String, Value>, known: &[&str]) -> Option<&'a str> {
    map.keys().map(String::as_str).find(|k| !known.contains(k))
}

/// The first unknown key of the `list` entries, with its index.
fn unknown_in<'a>(list: Option<&'a Value>, known: &[&str]) -> Option<(usize, &'a str)> {
    list?
        .as_array()?
        .iter()
        .enumerate()
        .find_map(|(i, m)| Some((i, unknown(m.as_object()?, known)?)))
}

const OPENAI_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "n",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "seed",
    "user",
];
const OPENAI_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "mistral-small-latest",
    "llama-3.3-70b-versatile",
    "deepseek-chat",
];

async fn openai(State(state): State<Arc<MockState>>, headers: HeaderMap, raw: Bytes) -> Response {
    let body = object(&raw);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if let Some(r) = canned(&state, &headers, model) {
        return r;
    }
    let error = |status, message: String, code: Value| {
        let e = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
        send(status, &[], e.to_string())
    };
    if let Some(field) = unknown(&body, OPENAI_FIELDS) {
        return error(
            400,
            format!("Unrecognized request argument supplied: {field}"),
            Value::Null,
        );
    }
    if let Some((i, key)) = unknown_in(
        body.get("messages"),
        &["role", "content", "name", "tool_calls", "tool_call_id"],
    ) {
        return error(
            400,
            format!(
                "Additional properties are not allowed ('{key}' was unexpected) - 'messages.{i}'"
            ),
            Value::Null,
        );
    }
    if !OPENAI_MODELS.contains(&model) {
        return error(
            404,
            format!("The model `{model}` does not exist or you do not have access to it."),
            json!("model_not_found"),
        );
    }
    let answer = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    });
    send(200, &[], answer.to_string())
}

const ANTHROPIC_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
];

async fn anthropic(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body = object(&raw);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if let Some(r) = canned(&state, &headers, model) {
        return r;
    }
    let error = |status, kind: &str, message: String| {
        let e = json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CWATQkxGxjfeEZCDJwiKD"});
        send(
            status,
            &[("request-id".into(), "req_011CWATQkxGxjfeEZCDJwiKD".into())],
            e.to_string(),
        )
    };
    // Anthropic names the field first (Aider-AI/aider#3367, RooCodeInc/Roo-Code#11429).
    if let Some(field) = unknown(&body, ANTHROPIC_FIELDS) {
        return error(
            400,
            "invalid_request_error",
            format!("{field}: Extra inputs are not permitted"),
        );
    }
    if let Some((i, key)) = unknown_in(body.get("messages"), &["role", "content"]) {
        return error(
            400,
            "invalid_request_error",
            format!("messages.{i}.{key}: Extra inputs are not permitted"),
        );
    }
    if !model.starts_with("claude-") {
        // anthropics/anthropic-sdk-typescript#690.
        return error(404, "not_found_error", format!("model: {model}"));
    }
    let answer = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 9, "output_tokens": 3}
    });
    send(200, &[], answer.to_string())
}

const GEMINI_FIELDS: &[&str] = &[
    "contents",
    "generationConfig",
    "safetySettings",
    "systemInstruction",
    "tools",
    "toolConfig",
    "cachedContent",
];

async fn gemini(
    State(state): State<Arc<MockState>>,
    Path(model_action): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let (model, action) = model_action.rsplit_once(':').unwrap_or((&model_action, ""));
    if let Some(r) = canned(&state, &headers, model) {
        return r;
    }
    let body = object(&raw);
    // A stream without alt=sse answers as a JSON array, errors included.
    let array = action == "streamGenerateContent" && !query.unwrap_or_default().contains("alt=sse");
    let error = |status: u16, state: &str, message: String, details: Value| {
        let mut e = json!({"error": {"code": status, "message": message, "status": state}});
        if details != Value::Null {
            e["error"]["details"] = details;
        }
        let e = if array { json!([e]) } else { e };
        send(status, &[], e.to_string())
    };
    // Google quotes an unknown field by name (the "Unknown name \"API_KEY_INVALID\"").
    let unknown_name = |message: String| {
        error(
            400,
            "INVALID_ARGUMENT",
            message.clone(),
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"description": message}]}]),
        )
    };
    if let Some(field) = unknown(&body, GEMINI_FIELDS) {
        return unknown_name(format!(
            "Invalid JSON payload received. Unknown name \"{field}\": Cannot find field."
        ));
    }
    if let Some((i, key)) = unknown_in(body.get("contents"), &["role", "parts"]) {
        return unknown_name(format!(
            "Invalid JSON payload received. Unknown name \"{key}\" at 'contents[{i}]': Cannot find field."
        ));
    }
    // An enum value it does not know is quoted after the field's path and type.
    if let Some(bad) = body
        .get("generationConfig")
        .and_then(|g| g.get("responseModalities"))
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .filter_map(Value::as_str)
                .find(|v| !["TEXT", "IMAGE", "AUDIO"].contains(v))
        })
    {
        let bad = serde_json::to_string(bad).unwrap();
        return error(
            400,
            "INVALID_ARGUMENT",
            format!(
                "Invalid value at 'generation_config.response_modalities[0]' (type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig.Modality), {bad}"
            ),
            Value::Null,
        );
    }
    if !model.starts_with("gemini-") {
        return error(
            404,
            "NOT_FOUND",
            format!(
                "models/{model} is not found for API version v1beta, or is not supported for {action}. Call ListModels to see the list of available models and their supported methods."
            ),
            Value::Null,
        );
    }
    let answer = json!({
        "candidates": [{"content": {"parts": [{"text": "hello"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12},
        "modelVersion": model
    });
    let answer = if array { json!([answer]) } else { answer };
    send(200, &[], answer.to_string())
}
