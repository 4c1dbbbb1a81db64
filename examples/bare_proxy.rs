//! The ceiling of this server's HTTP stack, for the benchmark (`bench/run.sh`): the same axum
//! server and the same upstream client (`cliproxyapi::upstream`) as cliproxyapi, forwarding
//! `POST /v1/chat/completions` to the upstream and its answer back, and nothing else (no
//! parsing, no credential, no accounting; tokio's default of a worker per core). What
//! cliproxyapi adds is measured against this and against nginx.
//!
//! Run: `cargo run --release --example bare_proxy -- 127.0.0.1:18082 http://127.0.0.1:18080/v1`

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cliproxyapi::upstream::{Target, Upstream};
use std::sync::Arc;

struct Forward {
    upstream: Upstream,
    target: Target,
}

async fn forward(State(to): State<Arc<Forward>>, body: Bytes) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let answer = match to.upstream.post(&to.target, headers, body).await {
        Ok(a) => a,
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
    };
    let status = answer.status;
    let content_type = answer.headers.get("content-type").cloned();
    let mut response = Response::new(Body::from_stream(answer.into_stream()));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert("content-type", ct);
    }
    response
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18082".into());
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:18080/v1".into());
    let url = reqwest::Url::parse(&format!("{base}/chat/completions")).expect("upstream URL");
    let upstream = Upstream::new(std::time::Duration::from_secs(600)).expect("HTTP client");
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(Arc::new(Forward {
            upstream,
            target: Target::new(url).expect("upstream URL"),
        }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.expect("serve");
}
