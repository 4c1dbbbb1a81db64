//! A fast mock of an OpenAI-compatible upstream, for the benchmark (`bench/run.sh`).
//!
//! `POST /v1/chat/completions` answers a fixed chat completion reporting 10 prompt and 20
//! completion tokens, or, with `"stream": true`, 50 SSE chunks (plus the usage chunk when
//! `stream_options.include_usage` is set) and `[DONE]`. `GET /stats` tells how many requests
//! it answered, how many tokens it reported and how many it answered overloaded, so the
//! benchmark can check the totals.
//!
//! With `MOCK_OVERLOADED_KEY` set, a request whose bearer is that key gets 529 and an
//! OpenAI-style overload error instead, so every proxied request that tries that credential
//! first fails one attempt and moves on (bench/README.md, "Webhooks down or slow").
//!
//! Run: `cargo run --release --example mock_upstream -- 127.0.0.1:18080`

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    reported: AtomicU64,
    overloaded: AtomicU64,
    /// `Bearer <MOCK_OVERLOADED_KEY>`, when set: the credential answered 529.
    overloaded_bearer: Option<String>,
}

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
const CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}],\"usage\":null}\n\n";
const USAGE_CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\n";

const OVERLOADED: &str = r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}"#;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn chat(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: Bytes) -> Response {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(bearer) = &stats.overloaded_bearer
        && headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == bearer.as_bytes())
    {
        stats.overloaded.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::from_u16(529).expect("529 is a valid status"),
            [("content-type", "application/json")],
            OVERLOADED,
        )
            .into_response();
    }
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !contains(&compact, b"\"stream\":true") {
        stats.reported.fetch_add(30, Ordering::Relaxed);
        return ([("content-type", "application/json")], ANSWER).into_response();
    }
    let include_usage = contains(&compact, b"\"include_usage\":true");
    if include_usage {
        stats.reported.fetch_add(30, Ordering::Relaxed);
    }
    let stream = futures_util::stream::iter((0..52).filter_map(move |i| {
        let part = match i {
            0..50 => CHUNK,
            50 if include_usage => USAGE_CHUNK,
            50 => return None,
            _ => "data: [DONE]\n\n",
        };
        Some(Ok::<Bytes, std::io::Error>(Bytes::from_static(
            part.as_bytes(),
        )))
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn stats(State(stats): State<Arc<Stats>>) -> String {
    format!(
        "{{\"requests\":{},\"reported_tokens\":{},\"overloaded\":{}}}",
        stats.requests.load(Ordering::Relaxed),
        stats.reported.load(Ordering::Relaxed),
        stats.overloaded.load(Ordering::Relaxed)
    )
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let state = Arc::new(Stats {
        overloaded_bearer: std::env::var("MOCK_OVERLOADED_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .map(|k| format!("Bearer {k}")),
        ..Stats::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/stats", get(stats))
        .with_state(state);
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bind")
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await.expect("serve");
}
