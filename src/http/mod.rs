//! The HTTP edge: the listener, routers, the guards, extractors, the one error shape, views.

pub mod bans;
pub mod body;
pub mod caller;
pub mod error;
pub mod extract;
pub mod guard;
pub mod listener;
pub mod management;
pub mod oauth;
pub mod pages;
pub mod proxy;
pub mod refresh;
pub mod view;

use crate::proxy::RequestPath;
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
pub use guard::Guards;
use std::sync::Arc;

/// What the routes are served with: the application's shared state, the guards in front of
/// the routes, and the request path the proxy routes call. A handler takes the parts it needs
/// (`State<Arc<AppState>>`, `State<Arc<Guards>>`, `State<RequestPath>`).
#[derive(Clone)]
pub struct HttpState {
    pub app: Arc<AppState>,
    pub guards: Arc<Guards>,
    pub path: RequestPath,
}

impl FromRef<HttpState> for RequestPath {
    fn from_ref(state: &HttpState) -> Self {
        state.path.clone()
    }
}

impl FromRef<HttpState> for Arc<AppState> {
    fn from_ref(state: &HttpState) -> Self {
        state.app.clone()
    }
}

impl FromRef<HttpState> for Arc<Guards> {
    fn from_ref(state: &HttpState) -> Self {
        state.guards.clone()
    }
}

/// The whole application router. Serve it with [`listener::serve`], which gives each request
/// its TCP peer address (for the guards) and its body limits (for the body readers).
pub fn router(state: HttpState) -> Router {
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
        .route("/auths/refresh/status", get(refresh::status))
        .route("/auths/{provider}/refresh", post(refresh::refresh))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::management_guard,
        ))
        .merge(
            // Its own guard: the operator at the console may lift bans while banned.
            Router::new()
                .route("/bans", get(bans::list).delete(bans::lift))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    guard::recovery_guard,
                )),
        );
    let v1 = Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/models", get(proxy::models))
        .route("/v1/messages", post(proxy::messages))
        .route("/v1beta/models/{model_action}", post(proxy::gemini))
        // google-genai 3.x calls the same methods under /v1.
        .route("/v1/models/{model_action}", post(proxy::gemini))
        .route("/v1/credentials/lease", post(proxy::lease))
        .route(
            "/v1/credentials/lease/{lease_id}/report",
            post(proxy::report),
        )
        .route("/v1/credentials/lease/{lease_id}/renew", post(proxy::renew))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::client_guard,
        ))
        .layer(DefaultBodyLimit::max(proxy::MAX_PROXY_BODY));
    // Management bodies may use the share of the body budget kept from proxy bodies.
    let management = management
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::Extension(body::BodyClass::Management));
    // The device flows, behind the same rules as the management API (they store credentials).
    let oauth = Router::new()
        .route("/{provider}/start", post(oauth::start))
        .route("/{provider}/status", get(oauth::status))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::management_guard,
        ))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::Extension(body::BodyClass::Management));
    Router::new()
        .nest("/v0/management", management)
        .nest("/v0/oauth", oauth)
        .merge(pages::router(state.clone()))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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
