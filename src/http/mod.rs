//! The HTTP edge: routers, the management guard, extractors, the one error shape, views.

pub mod error;
pub mod extract;
pub mod guard;
pub mod management;
pub mod view;

use crate::app::AppState;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use management::Actor;
use std::net::SocketAddr;
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

async fn management_guard(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let decision = state
        .management
        .check(
            peer.map(|p| p.ip()),
            guard::presented_key(req.headers()),
            state.now(),
        )
        .await;
    if let Err(e) = decision {
        return e.into_response();
    }
    req.extensions_mut().insert(Actor::from_peer(peer));
    next.run(req).await
}
