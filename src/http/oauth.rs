//! The device-flow routes (README "OAuth device flows"), behind the management guard:
//! `POST /v0/oauth/{provider}/start` starts a login and answers the code the user enters;
//! `GET /v0/oauth/{provider}/status?session=` answers where it stands. The polling itself is
//! the server's, in the background ([`crate::login`]).

use super::error::ApiError;
use super::extract::{Path, Query};
use crate::domain::login::LoginRequest;
use crate::domain::{AuthMethod, rfc3339};
use crate::login::LoginError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

/// The largest start body read (a method, a start URL and a region).
const MAX_START_BODY: usize = 16 * 1024;
/// The longest start URL taken.
const MAX_START_URL: usize = 2048;

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        let message = e.to_string();
        match e {
            LoginError::UnknownProvider(p) => ApiError::unknown_provider(&p),
            LoginError::NoLoginFlow(_) => ApiError::not_found("no_login_flow", message),
            LoginError::TooMany => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_logins", message)
            }
            LoginError::Invalid(_) => ApiError::bad_request("invalid_login_request", message),
            LoginError::Refused(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "login_refused", message)
            }
            LoginError::Unreachable { retry_after, .. } => {
                let e = ApiError::new(StatusCode::BAD_GATEWAY, "provider_unreachable", message);
                match retry_after {
                    // The provider's wait (bounded again: a flow an embedding program
                    // registers may say anything).
                    Some(wait) => e.retry_after(wait.as_secs().clamp(1, 3600)),
                    None => e,
                }
            }
            LoginError::Stopping => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", message)
            }
            LoginError::Store(e) => e.into(),
        }
    }
}

/// The start body: nothing (copilot, or kiro's Builder ID), or kiro's method with, for
/// Identity Center, its start URL and region (the configured one when it names none).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    method: Option<AuthMethod>,
    start_url: Option<String>,
    region: Option<String>,
}

/// A region as AWS names them: `^[a-z0-9-]{1,32}$`.
fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An `https://` URL with a host, no credentials, at most [`MAX_START_URL`] long.
fn valid_start_url(text: &str) -> bool {
    text.len() <= MAX_START_URL
        && reqwest::Url::parse(text).is_ok_and(|u| {
            u.scheme() == "https"
                && u.host_str().is_some_and(|h| !h.is_empty())
                && u.username().is_empty()
                && u.password().is_none()
        })
}

/// The validated [`LoginRequest`] of a start body.
fn login_request(body: StartBody) -> AppResult<LoginRequest> {
    let bad = |m: &str| ApiError::bad_request("invalid_body", m.to_string());
    if let Some(url) = &body.start_url
        && !valid_start_url(url)
    {
        return Err(bad("`start_url` must be an https:// URL"));
    }
    if let Some(region) = &body.region
        && !valid_region(region)
    {
        return Err(bad(
            "`region` must be 1 to 32 lowercase letters, digits and dashes (like us-east-1)",
        ));
    }
    match body.method {
        Some(AuthMethod::Idc) if body.start_url.is_none() => Err(bad(
            "the `idc` method needs `start_url` (the organisation's Identity Center), and takes its `region`",
        )),
        Some(AuthMethod::BuilderId) | None if body.start_url.is_some() || body.region.is_some() => {
            Err(bad(
                "`start_url` and `region` go with the `idc` method only (Builder ID has its own)",
            ))
        }
        _ => Ok(LoginRequest {
            method: body.method,
            start_url: body.start_url,
            region: body.region,
        }),
    }
}

/// `POST /v0/oauth/{provider}/start`: 200 with the session and the code to enter.
pub async fn start(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    request: Request,
) -> AppResult<axum::Json<Value>> {
    let bytes = super::extract::read_bytes(request, &(), MAX_START_BODY).await?;
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_body",
            "The body must be a JSON object, or nothing",
        ));
    } else {
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let body: StartBody = super::extract::deserialize_body(&mut de)?;
        // One JSON object and nothing after it.
        de.end()
            .map_err(|e| ApiError::bad_request("invalid_body", format!("Invalid body: {e}")))?;
        body
    };
    let request = login_request(body)?;
    let session = state.logins.start(&provider, &request).await?;
    let expires_in = (session.expires_at - state.now()).num_seconds().max(0);
    Ok(axum::Json(json!({
        "session": session.id,
        "user_code": session.user_code,
        "verification_uri": session.verification_uri,
        "verification_uri_complete": session.verification_uri_complete,
        "expires_in": expires_in,
        "interval": session.interval.as_secs(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    session: String,
}

/// `GET /v0/oauth/{provider}/status?session=`: where the login stands; 404
/// `session_not_found` for a session that is not there (or is another provider's).
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(q): Query<StatusQuery>,
) -> AppResult<axum::Json<Value>> {
    super::management::known_provider(&state, &provider)?;
    let Some(s) = state.logins.status(&provider, &q.session).await? else {
        return Err(ApiError::not_found(
            "session_not_found",
            "No such login session (it may have ended more than an hour ago)",
        ));
    };
    let mut out = json!({
        "status": s.status.as_str(),
        "user_code": s.user_code,
        "verification_uri": s.verification_uri,
        "verification_uri_complete": s.verification_uri_complete,
        "expires_at": rfc3339(s.expires_at),
        "interval": s.interval.as_secs(),
    });
    if let Some(id) = &s.credential_id {
        out["credential_id"] = json!(id);
    }
    if let Some(message) = &s.message {
        out["message"] = json!(message);
    }
    Ok(axum::Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Result<LoginRequest, String> {
        let b: StartBody = serde_json::from_value(v).map_err(|e| e.to_string())?;
        login_request(b).map_err(|e| e.message)
    }

    #[test]
    fn start_bodies() {
        assert_eq!(body(json!({})).unwrap(), LoginRequest::default());
        assert_eq!(
            body(json!({"method": "builder_id"})).unwrap().method,
            Some(AuthMethod::BuilderId)
        );
        let idc = body(
            json!({"method": "idc", "start_url": "https://my.awsapps.com/start",
                              "region": "eu-west-1"}),
        )
        .unwrap();
        assert_eq!(idc.region.as_deref(), Some("eu-west-1"));
        let idc = body(json!({"method": "idc", "start_url": "https://my.awsapps.com/start"}));
        assert_eq!(idc.unwrap().region, None);
        for bad in [
            json!({"method": "idc"}),
            json!({"method": "idc", "region": "us-east-1"}),
            json!({"method": "idc", "start_url": "http://x.example/start", "region": "us-east-1"}),
            json!({"method": "idc", "start_url": "https://u:p@x.example/", "region": "us-east-1"}),
            json!({"method": "idc", "start_url": "https://x.example/", "region": "US-EAST-1"}),
            json!({"method": "idc", "start_url": "https://x.example/", "region": "a".repeat(33)}),
            json!({"method": "idc", "start_url": "https://x.example/", "region": ""}),
            json!({"method": "builder_id", "region": "us-east-1"}),
            json!({"start_url": "https://x.example/"}),
            json!({"method": "password"}),
            json!({"method": "idc", "extra": 1}),
        ] {
            assert!(body(bad.clone()).is_err(), "{bad}");
        }
    }
}
