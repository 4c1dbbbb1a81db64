//! What the request path does with a provider's answer (README, "Provider answers"): an unreachable provider
//! answers 502 at once and marks nothing; a stream that ends in an error is charged the larger
//! of its reservation and what it reported, in every format; the headers that name the pooled
//! key's owner never reach the client; `stream_options` goes only to providers that accept
//! it. The provider here is a scripted mock: each token gets the answer the test gives it.
//!
//! The verdicts of the classification (an overload, a region block, an exhausted-until date)
//! are driven through the real loop by the unit tests of `src/proxy/tests.rs` too, with every
//! count of keys and attempts; the last tests here check them against the providers' own
//! answers.

use crate::common::{Api, Home, Resp, TestApp, eventually};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENT_KEY: &str = "client-key-for-attempts";

/// A scripted answer: status, headers, the body's chunks, and whether the connection is cut
/// after them (the body then ends in an error, not its end).
#[derive(Clone, Default)]
struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<String>,
    cut: bool,
}

impl Script {
    fn json(status: u16, body: Value) -> Script {
        Script {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            chunks: vec![body.to_string()],
            cut: false,
        }
    }

    fn stream(events: Vec<String>, cut: bool) -> Script {
        Script {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks: events,
            cut,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Script {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[derive(Default)]
struct Scripted {
    scripts: Mutex<HashMap<String, Script>>,
    /// The bodies received, per token, in order.
    bodies: Mutex<Vec<(String, Bytes)>>,
}

struct Provider {
    base: String,
    state: Arc<Scripted>,
}

impl Provider {
    async fn start() -> Provider {
        let state = Arc::new(Scripted::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let base = crate::common::serve(app).await;
        Provider { base, state }
    }

    fn script(&self, token: &str, script: Script) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(token.into(), script);
    }

    fn bodies(&self, token: &str) -> Vec<Bytes> {
        self.state
            .bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == token)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Every provider of the tests pointed here.
    fn yaml(&self) -> String {
        self.yaml_with("", "")
    }

    /// As [`Provider::yaml`], with `keys` (YAML flow mapping entries) added to the block of
    /// `provider`.
    fn yaml_with(&self, provider: &str, keys: &str) -> String {
        let b = &self.base;
        let mut yaml = String::from("providers:\n");
        for (name, base) in [
            ("openai", format!("{b}/v1")),
            ("claude", b.clone()),
            ("gemini", format!("{b}/v1beta")),
            ("mistral", format!("{b}/v1")),
            ("groq", format!("{b}/v1")),
            ("deepseek", format!("{b}/v1")),
            ("copilot", format!("{b}/v1")),
        ] {
            let more = if name == provider {
                format!(", {keys}")
            } else {
                String::new()
            };
            yaml.push_str(&format!("  {name}: {{ base_url: \"{base}\"{more} }}\n"));
        }
        yaml
    }
}

async fn answer(State(state): State<Arc<Scripted>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = ["authorization", "x-api-key", "x-goog-api-key"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_string())
        .unwrap_or_default();
    state.bodies.lock().unwrap().push((token.clone(), body));
    let script = state
        .scripts
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or_else(|| Script::json(500, json!({"error": "no script"})));
    let cut = script.cut;
    let chunks = futures_util::stream::iter(
        script
            .chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
    );
    // A cut comes after what was sent went out: the body yields once (the server flushes
    // its writes) before it fails.
    let end = futures_util::stream::once(async move {
        tokio::task::yield_now().await;
        Err(std::io::Error::other("cut"))
    })
    .filter(move |_| std::future::ready(cut));
    let mut response = Response::new(Body::from_stream(chunks.chain(end)));
    *response.status_mut() = StatusCode::from_u16(script.status).unwrap();
    for (name, value) in script.headers {
        response.headers_mut().append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

async fn start(extra: &str) -> (Home, TestApp) {
    let home = Home::new(&format!("api_keys: [\"{CLIENT_KEY}\"]\n{extra}"));
    let app = home.start().await;
    (home, app)
}

async fn add(app: &TestApp, provider: &str, token: &str) {
    let body = json!({"provider": provider, "token": token, "label": token});
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// POST `body` (sent as these bytes) to `path` with the client key.
async fn send(app: &TestApp, path: &str, body: &str) -> (Resp, HeaderMap) {
    let resp = app
        .client()
        .post(format!("{}{path}", app.base()))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // A stream cut short ends in an error here; what arrived before it is kept.
    let mut text = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    (
        Resp {
            status,
            text,
            retry_after,
        },
        headers,
    )
}

/// Each credential by label, once nothing is reserved any more.
async fn settled(app: &TestApp) -> HashMap<String, Value> {
    eventually(Duration::from_secs(10), || async {
        let all = app.auths().await;
        all.iter().all(|c| c["quota"]["reserved"] == 0).then(|| {
            all.iter()
                .map(|a| (a["label"].as_str().unwrap().to_string(), a.clone()))
                .collect()
        })
    })
    .await
}

/// The path and body of a request of each format, with an output cap of `cap`.
fn request(provider: &str, cap: u64, stream: bool) -> (String, String) {
    match provider {
        "claude" => (
            "/v1/messages".into(),
            json!({"model": "claude-sonnet-4", "max_tokens": cap, "stream": stream,
                   "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        ),
        "gemini" => (
            format!(
                "/v1beta/models/gemini-2.5-flash:{}",
                if stream {
                    "streamGenerateContent"
                } else {
                    "generateContent"
                }
            ),
            json!({"contents": [{"parts": [{"text": "hi"}]}],
                   "generationConfig": {"maxOutputTokens": cap}})
            .to_string(),
        ),
        // The client asks for usage itself and names a model of openai's patterns, so the
        // body goes as it came and the reservation is computed on these bytes.
        _ => (
            "/v1/chat/completions".into(),
            json!({"model": "gpt-4o", "max_tokens": cap, "stream": stream,
                   "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        ),
    }
}

/// What a request of `body` reserves: its cap plus a quarter of its bytes, rounded up.
fn reservation(cap: u64, body: &str) -> u64 {
    cap + (body.len() as u64).div_ceil(4)
}

/// A port where nothing listens.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A server that accepts connections and never answers; counts them.
async fn silent() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    (port, accepted)
}

/// An unreachable provider (nothing listening, or nothing answering by the deadline): 502
/// `provider_unreachable` at once, naming the provider and the cause and no URL; one
/// connection per request however many keys; no key marked or charged; and the next request
/// reaches for the provider again instead of getting our 429.
#[tokio::test]
async fn an_unreachable_provider_answers_502_at_once_and_marks_nothing() {
    let refused = closed_port();
    let (silent_port, accepted) = silent().await;
    for (port, cause, counted) in [
        (refused, "connection refused", None),
        (silent_port, "timed out", Some(&accepted)),
    ] {
        for keys in [1, 3] {
            let b = format!("http://127.0.0.1:{port}");
            let (_home, app) = start(&format!(
                "proxy:\n  request_timeout: 300ms\n  max_attempts: 3\nproviders:\n  openai: {{ base_url: \"{b}/secret-path\" }}\n  claude: {{ base_url: \"{b}/secret-path\" }}\n  gemini: {{ base_url: \"{b}/secret-path\" }}\n"
            ))
            .await;
            for provider in ["openai", "claude", "gemini"] {
                for k in 0..keys {
                    add(&app, provider, &format!("{provider}-{k}-{port}")).await;
                }
                for round in 0..2 {
                    let before = counted.map(|c| c.load(Ordering::SeqCst));
                    let (path, body) = request(provider, 10, round == 1);
                    let (r, _) = send(&app, &path, &body).await;
                    let what = format!("{cause}, {provider}, {keys} keys, round {round}");
                    assert_eq!(
                        (r.status, r.error_code().as_str()),
                        (502, "provider_unreachable"),
                        "{what}: {}",
                        r.text
                    );
                    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
                    assert!(
                        message.contains(provider) && message.contains(cause),
                        "{what}: {message}"
                    );
                    assert!(
                        !message.contains("secret-path") && !message.contains("127.0.0.1"),
                        "{what}: {message}"
                    );
                    if let (Some(before), Some(c)) = (before, counted) {
                        assert_eq!(
                            c.load(Ordering::SeqCst) - before,
                            1,
                            "{what}: one connection, no other key tried"
                        );
                    }
                }
            }
            for (label, c) in settled(&app).await {
                assert_eq!(c["status"], "active", "{cause}: {label}");
                assert_eq!(c["cooldown_until"], Value::Null, "{cause}: {label}");
                assert_eq!(c["quota"]["used"], 0, "{cause}: {label}");
            }
            assert!(!_home.auth_log().contains("marked"), "{cause}");
            app.stop().await;
        }
    }
}

/// Anthropic's events, with `message_start` reporting `input` tokens.
fn anthropic_events(input: u64, output: u64, error: bool) -> Vec<String> {
    let mut events = vec![format!(
        "event: message_start\ndata: {}\n\n",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
               "content": [], "usage": {"input_tokens": input, "output_tokens": 1}}})
    )];
    events.push(format!(
        "event: content_block_delta\ndata: {}\n\n",
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}})
    ));
    events.push(format!(
        "event: message_delta\ndata: {}\n\n",
        json!({"type": "message_delta", "delta": {}, "usage": {"output_tokens": output}})
    ));
    if error {
        events.push(format!(
            "event: error\ndata: {}\n\n",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        ));
    } else {
        events.push(format!(
            "event: message_stop\ndata: {}\n\n",
            json!({"type": "message_stop"})
        ));
    }
    events
}

/// OpenAI chunks reporting `input`/`output` in a usage chunk; `error` puts an error object
/// after it instead of `[DONE]`.
fn openai_events(input: u64, output: u64, error: bool) -> Vec<String> {
    let mut events = vec![
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": null})
        ),
        format!(
            "data: {}\n\n",
            json!({"choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output}})
        ),
    ];
    if error {
        events.push(format!(
            "data: {}\n\n",
            json!({"error": {"message": "The server had an error", "type": "server_error"}})
        ));
    } else {
        events.push("data: [DONE]\n\n".into());
    }
    events
}

/// Gemini's JSON array (no `alt=sse`), one element per chunk, the last reporting `input` and
/// `output`; `cut` leaves the array open.
fn gemini_array(input: u64, output: u64, cut: bool) -> Vec<String> {
    let element = |out: u64| {
        json!({"candidates": [{"content": {"parts": [{"text": "Hel]lo}"}], "role": "model"}}],
               "usageMetadata": {"promptTokenCount": input, "candidatesTokenCount": out,
                                 "totalTokenCount": input + out}})
        .to_string()
    };
    let mut chunks = vec![
        format!("[{}", element(1)),
        format!(",\r\n{}", element(output / 2)),
        format!(",\r\n{}", element(output)),
    ];
    if !cut {
        chunks.push("]".into());
    }
    chunks
}

/// One rule for a stream that ends in an error, in every format: charged the larger of its
/// reservation and what it reported. Tried with a reservation above what was reported and
/// one below it, for an error event the provider sends (Anthropic's `event: error` after
/// `message_start`, an OpenAI error chunk), a connection cut after the usage, and (Gemini)
/// an array cut short; a stream that ends well is charged exactly.
#[tokio::test]
async fn a_stream_that_ends_in_an_error_is_charged_the_larger_of_reservation_and_reported() {
    let provider_mock = Provider::start().await;
    let (_home, app) = start(&provider_mock.yaml()).await;
    let (input, output) = (1200u64, 11u64);
    let reported = input + output;
    let mut n = 0;
    for provider in ["claude", "openai", "gemini"] {
        // (how the stream ends, whether it ended well)
        let endings: Vec<(&str, Vec<String>, bool, bool)> = match provider {
            "claude" => vec![
                (
                    "error event",
                    anthropic_events(input, output, true),
                    false,
                    false,
                ),
                (
                    "cut",
                    anthropic_events(input, output, false)[..3].to_vec(),
                    true,
                    false,
                ),
                (
                    "complete",
                    anthropic_events(input, output, false),
                    false,
                    true,
                ),
            ],
            "openai" => vec![
                (
                    "error chunk",
                    openai_events(input, output, true),
                    false,
                    false,
                ),
                (
                    "cut",
                    openai_events(input, output, false)[..2].to_vec(),
                    true,
                    false,
                ),
                ("complete", openai_events(input, output, false), false, true),
            ],
            _ => vec![
                (
                    "array left open",
                    gemini_array(input, output, true),
                    false,
                    false,
                ),
                ("cut", gemini_array(input, output, true), true, false),
                ("complete", gemini_array(input, output, false), false, true),
            ],
        };
        for (ending, events, cut, complete) in endings {
            // The extremes: a reservation far above what was reported, and the least one.
            for cap in [8000, 1] {
                n += 1;
                let token = format!("{provider}-{n}");
                add(&app, provider, &token).await;
                provider_mock.script(&token, Script::stream(events.clone(), cut));
                let (path, body) = request(provider, cap, true);
                let (r, _) = send(&app, &path, &body).await;
                assert_eq!(r.status, 200, "{provider} {ending}: {}", r.text);
                let used = settled(&app).await[&token]["quota"]["used"]
                    .as_u64()
                    .unwrap();
                let reserved = reservation(cap, &body);
                let want = if complete {
                    reported
                } else {
                    reported.max(reserved)
                };
                assert_eq!(
                    used, want,
                    "{provider}, {ending}, reservation {reserved}, reported {reported}"
                );
                // Disabled, so the next credential added is the one used.
                disable(&app, provider, &token).await;
            }
        }
    }
    app.stop().await;
}

/// Headers that name the pooled key's owner never reach the client, on plain answers,
/// streams and errors, in every format; the request ids and rate limits still do.
#[tokio::test]
async fn headers_that_name_the_key_owner_stay_behind() {
    let provider_mock = Provider::start().await;
    let (_home, app) = start(&provider_mock.yaml()).await;
    let leaks = [
        ("openai-organization", "org-owner-of-the-key"),
        ("openai-project", "proj_owner"),
        ("anthropic-organization-id", "11111111-owner"),
        ("set-cookie", "__cf_bm=owner; path=/"),
        ("x-goog-user-project", "owner-project"),
    ];
    let kept = [
        ("x-request-id", "req_123"),
        ("request-id", "req_456"),
        ("x-ratelimit-remaining-requests", "99"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("openai-processing-ms", "120"),
        ("openai-version", "2020-10-01"),
    ];
    let mut n = 0;
    for provider in ["openai", "claude", "gemini"] {
        let answers = [
            (
                "plain",
                Script::json(
                    200,
                    json!({"usage": {"prompt_tokens": 1, "input_tokens": 1}}),
                ),
                false,
            ),
            (
                "stream",
                Script::stream(vec!["data: {\"choices\": []}\n\n".into()], false),
                true,
            ),
            (
                "client error",
                Script::json(400, json!({"error": {"message": "bad request"}})),
                false,
            ),
        ];
        for (what, script, stream) in answers {
            n += 1;
            let token = format!("{provider}-h{n}");
            add(&app, provider, &token).await;
            let mut script = script;
            for (name, value) in leaks.iter().chain(kept.iter()) {
                script = script.header(name, value);
            }
            provider_mock.script(&token, script);
            let (path, body) = request(provider, 5, stream);
            let (r, headers) = send(&app, &path, &body).await;
            assert!(
                r.status == 200 || r.status == 400,
                "{provider} {what}: {}",
                r.status
            );
            for (name, value) in leaks {
                assert!(
                    headers.get(name).is_none(),
                    "{provider} {what}: {name} passed back"
                );
                assert!(!r.text.contains(value), "{provider} {what}");
            }
            for (name, value) in kept {
                assert_eq!(
                    headers.get(name).and_then(|v| v.to_str().ok()),
                    Some(value),
                    "{provider} {what}: {name}"
                );
            }
            disable(&app, provider, &token).await;
        }
    }
    app.stop().await;
}

/// `stream_options` is added only where the provider accepts it: OpenAI and DeepSeek by
/// default, never Mistral, Groq or Copilot (their bodies go as the client sent them); each
/// can be changed by `providers.<name>.stream_usage`. Where it is not asked, the usage the
/// provider sends on its own (Mistral's last chunk, Groq's `x_groq.usage`) is charged, and
/// the client sees every chunk.
#[tokio::test]
async fn stream_options_only_where_the_provider_accepts_it() {
    let provider_mock = Provider::start().await;
    let mistral_last = json!({"id": "m", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38}});
    let groq_last = json!({"id": "g", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "x_groq": {"id": "req_1", "usage": {"queue_time": 0.01, "prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38}}});
    let usage_chunk =
        json!({"id": "o", "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 7}});
    let content = json!({"id": "x", "choices": [{"index": 0, "delta": {"content": "Hello"}}]});
    let events = |last: &Value| {
        vec![
            format!("data: {content}\n\n"),
            format!("data: {last}\n\n"),
            "data: [DONE]\n\n".to_string(),
        ]
    };
    // (provider, its block's extra keys, asked, the provider's last chunk)
    let cases = [
        ("openai", "", true, &usage_chunk),
        ("deepseek", "", true, &usage_chunk),
        ("mistral", "", false, &mistral_last),
        ("groq", "", false, &groq_last),
        ("copilot", "", false, &mistral_last),
        ("mistral", "stream_usage: ask", true, &usage_chunk),
        ("groq", "stream_usage: ask", true, &usage_chunk),
        ("openai", "stream_usage: never", false, &mistral_last),
    ];
    for (provider, extra, asked, last) in cases {
        let yaml = if extra.is_empty() {
            provider_mock.yaml()
        } else {
            provider_mock.yaml_with(provider, extra)
        };
        let (_home, app) = start(&yaml).await;
        let token = format!("{provider}-so");
        add(&app, provider, &token).await;
        provider_mock.script(&token, Script::stream(events(last), false));
        let what = format!("{provider} {extra:?}");
        // The client's body, as it would send it (no stream_options), and one that asks.
        // The `provider/` prefix routes it and is stripped: the provider gets model `m`.
        let body = |model: &str, own: bool| {
            let mut b = json!({"model": model, "stream": true, "max_tokens": 5});
            if own {
                b["stream_options"] = json!({"include_usage": true});
            }
            b["messages"] = json!([{"role": "user", "content": "hi"}]);
            b.to_string()
        };
        let plain = body(&format!("{provider}/m"), false);
        let before = provider_mock.bodies(&token).len();
        let (r, _) = send(&app, "/v1/chat/completions", &plain).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        let got = provider_mock.bodies(&token)[before].clone();
        let sent: Value = serde_json::from_slice(&got).unwrap();
        if asked {
            assert_eq!(sent["stream_options"]["include_usage"], true, "{what}");
            assert!(
                !r.text.contains("prompt_tokens"),
                "{what}: hidden: {}",
                r.text
            );
        } else {
            assert!(
                got == body("m", false).as_bytes(),
                "{what}: the body went as it came"
            );
            // Nothing hidden: the client gets every chunk the provider sent.
            let expected: String = events(last).concat();
            assert_eq!(r.text, expected, "{what}");
        }
        let used = settled(&app).await[&token]["quota"]["used"]
            .as_u64()
            .unwrap();
        assert_eq!(used, 38, "{what}: the provider's usage is charged");
        // A client that asks itself: its body goes as it came, and it sees the usage.
        let own = body(&format!("{provider}/m"), true);
        let (r, _) = send(&app, "/v1/chat/completions", &own).await;
        assert_eq!(r.status, 200, "{what}");
        let got = provider_mock.bodies(&token).last().unwrap().clone();
        assert!(
            got == body("m", true).as_bytes(),
            "{what}: the client's own options as they came"
        );
        assert_eq!(r.text, events(last).concat(), "{what}");
        app.stop().await;
    }
}

/// A lease's error report may carry the provider's error body, read as the proxy reads the
/// answers it gets itself: the body decides the mark, not the status alone; without a status
/// the body is refused.
#[tokio::test]
async fn a_lease_report_reads_the_providers_error_body() {
    let (_home, app) = start("").await;
    let gemini_invalid = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}});
    let gemini_client = json!({"error": {"code": 400, "message": "Invalid value at 'contents'", "status": "INVALID_ARGUMENT"}});
    let openai_quota = json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
        "param": null, "code": "insufficient_quota"}});
    // (provider, status, body, status the credential ends with)
    let cases = [
        ("gemini", 400, Some(gemini_invalid.to_string()), "invalid"),
        ("gemini", 400, Some(gemini_client.to_string()), "active"),
        ("gemini", 400, None, "active"),
        ("openai", 429, Some(openai_quota.to_string()), "exhausted"),
        ("openai", 429, Some(String::new()), "cooldown"),
        ("openai", 429, Some("not json at all".into()), "cooldown"),
    ];
    for (n, (provider, status, body, after)) in cases.into_iter().enumerate() {
        let token = format!("{provider}-lease-{n}");
        add(&app, provider, &token).await;
        let (r, _) = send(
            &app,
            "/v1/credentials/lease",
            &json!({"provider": provider, "estimated_tokens": 10}).to_string(),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let lease = r.json();
        assert_eq!(lease["token"], token.as_str());
        let mut report = json!({"error_status": status});
        if let Some(body) = &body {
            report["error_body"] = json!(body);
        }
        let path = format!(
            "/v1/credentials/lease/{}/report",
            lease["lease_id"].as_str().unwrap()
        );
        let (r, _) = send(&app, &path, &report.to_string()).await;
        assert_eq!(r.status, 200, "{token}: {}", r.text);
        let all = settled(&app).await;
        assert_eq!(all[&token]["status"], after, "{token}");
        assert_eq!(all[&token]["quota"]["used"], 0, "{token}");
        disable(&app, provider, &token).await;
    }
    // A body without the status it came with is refused, and the lease stays open.
    add(&app, "openai", "openai-lease-last").await;
    let (r, _) = send(
        &app,
        "/v1/credentials/lease",
        &json!({"provider": "openai"}).to_string(),
    )
    .await;
    let path = format!(
        "/v1/credentials/lease/{}/report",
        r.json()["lease_id"].as_str().unwrap()
    );
    let (r, _) = send(&app, &path, r#"{"error_body": "{}"}"#).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_body"));
    let (r, _) = send(&app, &path, r#"{"tokens_used": 5}"#).await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;
}

// With the classification reading the providers' answers (529 and 503 overloaded, a region
// block, Anthropic's "You will regain access on"), the loop's verdicts hold against the
// providers' own answers: these check it end to end.

/// Overload per format: at most one other key tried, none marked, the provider's answer back.
#[tokio::test]
async fn an_overload_tries_one_other_key_and_answers_the_providers_error() {
    let provider_mock = Provider::start().await;
    let (_home, app) = start(&provider_mock.yaml()).await;
    let overloads = [
        (
            "claude",
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        (
            "openai",
            503,
            json!({"error": {"message": "The engine is currently overloaded, please try again later", "type": "server_error", "param": null, "code": null}}),
        ),
        (
            "gemini",
            503,
            json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}),
        ),
    ];
    for (provider, status, body) in overloads {
        let tokens: Vec<String> = (0..3).map(|k| format!("{provider}-over-{k}")).collect();
        for t in &tokens {
            add(&app, provider, t).await;
            provider_mock.script(t, Script::json(status, body.clone()));
        }
        let (path, request_body) = request(provider, 10, false);
        for round in 0..3 {
            let before: usize = tokens.iter().map(|t| provider_mock.bodies(t).len()).sum();
            let (r, _) = send(&app, &path, &request_body).await;
            assert_eq!(r.status, status, "{provider} {round}: {}", r.text);
            assert_eq!(r.json(), body, "{provider} {round}");
            let after: usize = tokens.iter().map(|t| provider_mock.bodies(t).len()).sum();
            assert_eq!(after - before, 2, "{provider} {round}: two keys tried");
        }
        let all = settled(&app).await;
        for t in &tokens {
            assert_eq!(all[t]["status"], "active", "{t}");
        }
    }
    app.stop().await;
}

/// A region block: one call, no mark, 502 `provider_location_refused` naming the provider.
#[tokio::test]
async fn a_region_block_marks_nothing_and_says_so() {
    let provider_mock = Provider::start().await;
    let (_home, app) = start(&provider_mock.yaml()).await;
    let blocks = [
        (
            "openai",
            403,
            json!({"error": {"code": "unsupported_country_region_territory", "message": "Country, region, or territory not supported", "param": null, "type": "request_forbidden"}}),
        ),
        (
            "gemini",
            400,
            json!({"error": {"code": 400, "message": "User location is not supported for the API use.", "status": "FAILED_PRECONDITION"}}),
        ),
    ];
    for (provider, status, body) in blocks {
        let tokens: Vec<String> = (0..3).map(|k| format!("{provider}-region-{k}")).collect();
        for t in &tokens {
            add(&app, provider, t).await;
            provider_mock.script(t, Script::json(status, body.clone()));
        }
        let (path, request_body) = request(provider, 10, false);
        let (r, _) = send(&app, &path, &request_body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (502, "provider_location_refused"),
            "{provider}: {}",
            r.text
        );
        assert!(r.text.contains(provider), "{}", r.text);
        let calls: usize = tokens.iter().map(|t| provider_mock.bodies(t).len()).sum();
        assert_eq!(calls, 1, "{provider}");
        let all = settled(&app).await;
        for t in &tokens {
            assert_eq!(all[t]["status"], "active", "{t}");
        }
    }
    app.stop().await;
}

/// Anthropic's usage limit with its date: the key is exhausted until then, the next key
/// answers meanwhile, and the key is back from that date (the server's clock moved on).
#[tokio::test]
async fn an_exhausted_key_is_back_at_the_date_the_provider_named() {
    let provider_mock = Provider::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\n{}",
        provider_mock.yaml()
    ));
    let now = Arc::new(Mutex::new(
        chrono::DateTime::parse_from_rfc3339("2026-11-20T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc),
    ));
    let read = now.clone();
    let app = home
        .start_with(
            &[],
            Arc::new(move || *read.lock().unwrap()) as cliproxyapi::state::Clock,
        )
        .await;
    add(&app, "claude", "claude-limited").await;
    add(&app, "claude", "claude-other").await;
    provider_mock.script(
        "claude-limited",
        Script::json(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error",
                   "message": "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC."}}),
        ),
    );
    let ok = Script::json(
        200,
        json!({"type": "message", "content": [], "usage": {"input_tokens": 3, "output_tokens": 4}}),
    );
    provider_mock.script("claude-other", ok.clone());
    let (path, body) = request("claude", 10, false);
    for _ in 0..3 {
        let (r, _) = send(&app, &path, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let all = settled(&app).await;
    assert_eq!(all["claude-limited"]["status"], "exhausted");
    assert_eq!(
        all["claude-limited"]["exhausted_until"],
        "2026-12-01T00:00:00Z"
    );
    assert_eq!(provider_mock.bodies("claude-limited").len(), 1);
    provider_mock.script("claude-limited", ok);
    *now.lock().unwrap() = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!(settled(&app).await["claude-limited"]["status"], "active");
    for _ in 0..2 {
        let (r, _) = send(&app, &path, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(provider_mock.bodies("claude-limited").len(), 2);
    app.stop().await;
}

/// Disable `provider`'s credential `token`, so the next one added is the one used.
async fn disable(app: &TestApp, provider: &str, token: &str) {
    let r = app
        .put(
            &format!("/v0/management/auths/{provider}?id={token}"),
            r#"{"disabled": true}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}
