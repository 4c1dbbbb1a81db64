//! The ceiling of this server's HTTP stack, for the benchmark (`bench/run.sh`): the same axum
//! server, tokio runtime and reqwest client as cliproxyapi, forwarding `POST
//! /v1/chat/completions` to the upstream and its answer back, and nothing else (no parsing, no
//! credential, no accounting). What cliproxyapi adds is measured against this and against nginx.
//!
//! Run: `cargo run --release --example bare_proxy -- 127.0.0.1:18082 http://127.0.0.1:18080/v1`

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::sync::Arc;

struct Upstream {
    client: reqwest::Client,
    url: reqwest::Url,
}

async fn forward(State(up): State<Arc<Upstream>>, body: Bytes) -> Response {
    let sent = up
        .client
        .post(up.url.clone())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let answer = match sent {
        Ok(r) => r,
        Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
    };
    let status = answer.status();
    let content_type = answer.headers().get("content-type").cloned();
    let mut response = Response::new(Body::from_stream(answer.bytes_stream()));
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
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client");
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(Arc::new(Upstream { client, url }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.expect("serve");
}
