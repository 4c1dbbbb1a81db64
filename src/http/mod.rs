//! The HTTP edge: routers, the management guard, extractors, the one error shape, views.

pub mod error;
pub mod extract;
pub mod management;
pub mod view;

use crate::app::AppState;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use management::Actor;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The whole application router. Serve it with `into_make_service_with_connect_info`, so the
/// management guard sees the TCP peer address.
pub fn router(state: Arc<AppState>) -> Router {
    let management = Router::new()
        .route("/auths", get(management::list).post(management::add))
        .route("/auths/import", post(management::import))
        .route(
            "/auths/{provider}",
            get(management::list_provider)
                .put(management::update)
                .delete(management::delete),
        )
        .route(
            "/auths/{provider}/quota",
            get(management::quota).put(management::set_quota),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            management_guard,
        ));
    Router::new()
        .nest("/v0/management", management)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "No such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This endpoint does not take that method",
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic message may hold anything; it is not repeated here.
    ApiError::internal(&"a handler panicked").into_response()
}

/// Whether a management call from `peer` with the presented key may go on (contract
/// section 8). Without a configured key only loopback clients are admitted; with one, the key
/// must match and remote clients also need `allow_remote`.
pub fn management_decision(
    peer: Option<IpAddr>,
    presented: Option<&str>,
    secret_key: &crate::crypto::Secret,
    allow_remote: bool,
) -> Result<(), ApiError> {
    let loopback = peer.is_some_and(|ip| ip.is_loopback() || ip.to_canonical().is_loopback());
    if secret_key.is_empty() {
        return if loopback {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_management_disabled",
                "The management API answers only loopback clients unless a management key is configured",
            ))
        };
    }
    if !loopback && !allow_remote {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "remote_management_disabled",
            "The management API answers remote clients only with management.allow_remote",
        ));
    }
    match presented {
        Some(key) if secret_key.ct_eq(key) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_management_key",
            "The management key is wrong",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_management_key",
            "Send the management key as Authorization: Bearer KEY or X-Management-Key: KEY",
        )),
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-management-key") {
        return v.to_str().ok();
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

async fn management_guard(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let management = &state.config.config.management;
    if let Err(e) = management_decision(
        peer.map(|p| p.ip()),
        presented_key(req.headers()),
        &management.secret_key,
        management.allow_remote,
    ) {
        return e.into_response();
    }
    req.extensions_mut().insert(Actor::from_peer(peer));
    next.run(req).await
}
