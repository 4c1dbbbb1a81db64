//! What every flow shares when it talks to a token endpoint: the one HTTP client (rustls, a
//! 30 s timeout, redirects not followed), answers read to at most 64 KiB, the OAuth error body
//! (`{"error", "error_description"}`, read whatever the status) and what a failed answer means,
//! and the bounds on what an answer may bring (lifetimes, tokens, reasons). Everything here
//! treats the provider's answer as untrusted: nothing in it can panic, grow without bound, or
//! carry a secret we sent into a reason.

use crate::crypto::Secret;
use crate::domain::refresh::FlowError;
use chrono::{DateTime, TimeDelta, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

/// How long one call to a token endpoint may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer that is read; a longer one is not an answer we understand.
pub const MAX_ANSWER: usize = 64 * 1024;
/// The longest token (access, refresh, client secret) an answer may bring.
pub const MAX_TOKEN: usize = 32 * 1024;
/// The longest reason a failure carries.
pub const MAX_REASON: usize = 300;
/// The longest wait a `Retry-After` may ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The shortest lifetime a new token is given: a provider answering 0 or a negative number
/// would otherwise have it refreshed again at once, in a loop.
pub const MIN_LIFETIME: TimeDelta = TimeDelta::seconds(60);
/// The longest lifetime a new token is given.
pub const MAX_LIFETIME: TimeDelta = TimeDelta::days(366);
/// The lifetime assumed when an answer names none (RFC 6749 §5.1 makes `expires_in` optional).
pub const DEFAULT_LIFETIME: TimeDelta = TimeDelta::seconds(3600);

/// The OAuth errors that say the grant or the client is refused for good (RFC 6749 §5.2).
const FINAL_ERRORS: &[&str] = &[
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_request",
];

/// The HTTP client of the token endpoints, built once. Building a reqwest client can fail
/// (its TLS set-up); the failure is kept and every call then fails as `Transient`, so a
/// program without one still starts and says why each refresh failed.
#[derive(Clone)]
pub struct Http(Result<reqwest::Client, String>);

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(_) => f.write_str("Http"),
            Err(e) => write!(f, "Http(unusable: {e})"),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        let built = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            // A token endpoint that redirects is not followed: the request carries secrets.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the token endpoints' HTTP client: {e}"));
        if let Err(e) = &built {
            tracing::error!(error = %e, "token refreshes will fail");
        }
        Http(built)
    }

    /// The client, or why there is none.
    pub fn client(&self) -> Result<&reqwest::Client, FlowError> {
        self.0.as_ref().map_err(|e| FlowError::Transient {
            reason: e.clone(),
            retry_after: None,
        })
    }

    /// POST `pairs` to `url` as an `application/x-www-form-urlencoded` body (RFC 6749's and
    /// RFC 8628's requests), asking for JSON, and read the answer as [`send`] does.
    pub async fn post_form(
        &self,
        url: &str,
        pairs: &[(&str, &str)],
        secrets: &[&str],
    ) -> Result<Answer, FlowError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let request = self
            .client()?
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body);
        send(request, secrets).await
    }

    /// POST `body` to `url` as JSON, asking for JSON, and read the answer as [`send`] does.
    pub async fn post_json(
        &self,
        url: &str,
        body: &Value,
        secrets: &[&str],
    ) -> Result<Answer, FlowError> {
        let request = self
            .client()?
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        send(request, secrets).await
    }
}

/// A token endpoint's answer, read to at most [`MAX_ANSWER`] bytes.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// `Retry-After` in seconds, clamped to [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
    /// The body, or `None` when it was longer than [`MAX_ANSWER`] or broke off.
    pub body: Option<Vec<u8>>,
    /// `x-ratelimit-remaining: 0`: GitHub's way of saying a 403 is a rate limit.
    pub rate_limited: bool,
}

/// Send `request` and read its answer. Only a failure to get an answer is an error here
/// (`Transient`); what the answer says is the caller's to read.
pub async fn send(request: reqwest::RequestBuilder, secrets: &[&str]) -> Result<Answer, FlowError> {
    let mut response = request.send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "the token endpoint timed out"
        } else {
            "the token endpoint is unreachable"
        };
        transient(&format!("{what}: {}", e.without_url()), secrets, None)
    })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    let rate_limited = response
        .headers()
        .get("x-ratelimit-remaining")
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"0");
    // A body announced as too long is not read at all.
    let mut body = (response.content_length().unwrap_or(0) <= MAX_ANSWER as u64).then(Vec::new);
    while let Some(buf) = body.as_mut() {
        match response.chunk().await {
            Ok(Some(chunk)) if buf.len() + chunk.len() <= MAX_ANSWER => {
                buf.extend_from_slice(&chunk)
            }
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => body = None,
        }
    }
    Ok(Answer {
        status,
        retry_after,
        body,
        rate_limited,
    })
}

/// The JSON object of a successful answer, or `Transient` "answer unreadable".
pub fn json_object(
    answer: &Answer,
    secrets: &[&str],
) -> Result<serde_json::Map<String, Value>, FlowError> {
    let Some(body) = &answer.body else {
        return Err(unreadable("longer than 64 KiB", secrets));
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(unreadable("not a JSON object", secrets)),
        Err(_) => Err(unreadable("not JSON", secrets)),
    }
}

/// What a failed answer's body says: the OAuth `error` and `error_description`, or GitHub's
/// `message` (or `error_details.message`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: Option<String>,
    pub description: Option<String>,
    pub message: Option<String>,
}

impl ErrorBody {
    pub fn read(answer: &Answer) -> ErrorBody {
        let Some(Ok(Value::Object(map))) =
            answer.body.as_deref().map(serde_json::from_slice::<Value>)
        else {
            return ErrorBody::default();
        };
        // Not cut here (the body is at most 64 KiB): a secret cut in two would no longer be
        // found by `scrub`, and its first part would show.
        let text = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
        };
        ErrorBody {
            error: text(map.get("error")),
            description: text(map.get("error_description")),
            message: text(map.get("message"))
                .or_else(|| text(map.get("error_details").and_then(|d| d.get("message")))),
        }
    }

    /// `<error>: <error_description>`, else the message, else `fallback`.
    fn reason(&self, fallback: String) -> String {
        match (&self.error, &self.description, &self.message) {
            (Some(e), Some(d), _) => format!("{e}: {d}"),
            (Some(e), None, Some(m)) => format!("{e}: {m}"),
            (Some(e), None, None) => e.clone(),
            (None, _, Some(m)) => m.clone(),
            (None, Some(d), None) => d.clone(),
            (None, None, None) => fallback,
        }
    }
}

/// What a failed answer means. `invalid_grant` and the other final OAuth errors (with 400 or
/// 401), any 401, and a 403 when `forbidden_is_final` are `Rejected`; everything else (429,
/// 5xx, a 404 or a redirect from a misconfigured URL, which a fixed config cures) is
/// `Transient`.
pub fn failure(answer: &Answer, secrets: &[&str], forbidden_is_final: bool) -> FlowError {
    let body = ErrorBody::read(answer);
    let status = answer.status;
    let code = status.as_u16();
    // The provider's words, with the status they came with.
    let reason = match body.reason(String::new()) {
        words if words.is_empty() => format!("the token endpoint answered {code}"),
        words => format!("{words} (HTTP {code})"),
    };
    let final_error = body
        .error
        .as_deref()
        .is_some_and(|e| FINAL_ERRORS.contains(&e));
    // GitHub answers its rate limits with 403 too: with a wait, `x-ratelimit-remaining: 0`, or
    // words saying so. Those pass; a 403 for anything else (no Copilot seat) is final.
    let rate_limit = answer.rate_limited
        || answer.retry_after.is_some()
        || reason.to_ascii_lowercase().contains("rate limit");
    let rejected = status == StatusCode::UNAUTHORIZED
        || (status == StatusCode::BAD_REQUEST && final_error)
        || (status == StatusCode::FORBIDDEN && forbidden_is_final && !rate_limit);
    if rejected {
        FlowError::Rejected(scrub(&reason, secrets))
    } else {
        transient(&reason, secrets, answer.retry_after)
    }
}

pub fn transient(reason: &str, secrets: &[&str], retry_after: Option<Duration>) -> FlowError {
    FlowError::Transient {
        reason: scrub(reason, secrets),
        retry_after,
    }
}

/// A `Transient` "answer unreadable" failure.
pub fn unreadable(why: &str, secrets: &[&str]) -> FlowError {
    transient(&format!("answer unreadable: {why}"), secrets, None)
}

/// `reason` with every secret in `secrets` replaced by `***`, control characters by spaces,
/// and cut to [`MAX_REASON`] characters.
pub fn scrub(reason: &str, secrets: &[&str]) -> String {
    let mut text = reason.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "***");
    }
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    out.truncate(out.trim_end().len());
    out
}

/// A token from an answer's `field`: non-empty, at most [`MAX_TOKEN`] bytes, and visible
/// ASCII (it goes into a header); else `Transient` "answer unreadable".
pub fn token(
    map: &serde_json::Map<String, Value>,
    field: &str,
    secrets: &[&str],
) -> Result<Secret, FlowError> {
    match optional_token(map, field, secrets)? {
        Some(t) => Ok(t),
        None => Err(unreadable(&format!("no `{field}`"), secrets)),
    }
}

/// As [`token`], for a field that may be absent (or null, or empty).
pub fn optional_token(
    map: &serde_json::Map<String, Value>,
    field: &str,
    secrets: &[&str],
) -> Result<Option<Secret>, FlowError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s))
            if s.len() <= MAX_TOKEN && s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(Secret::new(s.as_str())))
        }
        Some(_) => Err(unreadable(&format!("`{field}` is not a token"), secrets)),
    }
}

/// A whole number of seconds from an answer's `field`: a JSON number (a fraction is cut, one
/// past i64 saturates) or a numeric string, as some providers send; `None` when absent or
/// null; else `Transient` "answer unreadable".
pub fn seconds(
    map: &serde_json::Map<String, Value>,
    field: &str,
    secrets: &[&str],
) -> Result<Option<i64>, FlowError> {
    let bad = || unreadable(&format!("`{field}` is not a number"), secrets);
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            // `as` saturates, and a NaN cannot come from JSON.
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) => s.trim().parse::<i64>().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

/// `now + seconds`, within [now + [`MIN_LIFETIME`], now + [`MAX_LIFETIME`]].
pub fn expiry_in(now: DateTime<Utc>, seconds: i64) -> DateTime<Utc> {
    let lifetime = seconds.clamp(MIN_LIFETIME.num_seconds(), MAX_LIFETIME.num_seconds());
    now + TimeDelta::seconds(lifetime)
}

/// When a new token expires: `now` plus the lifetime in seconds an answer's `field` names
/// ([`seconds`]), or [`DEFAULT_LIFETIME`] when it names none, within the bounds of
/// [`expiry_in`].
pub fn expiry_from(
    map: &serde_json::Map<String, Value>,
    field: &str,
    now: DateTime<Utc>,
    secrets: &[&str],
) -> Result<DateTime<Utc>, FlowError> {
    let lifetime = seconds(map, field, secrets)?.unwrap_or(DEFAULT_LIFETIME.num_seconds());
    Ok(expiry_in(now, lifetime))
}

/// A unix time in seconds, within the same bounds as [`expiry_in`].
pub fn expiry_at(now: DateTime<Utc>, unix_seconds: i64) -> DateTime<Utc> {
    expiry_in(now, unix_seconds.saturating_sub(now.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: None,
            body: Some(body.as_bytes().to_vec()),
            rate_limited: false,
        }
    }

    #[test]
    fn githubs_rate_limit_403s_are_worth_retrying() {
        let no_seat = answer(403, r#"{"message":"No Copilot seat"}"#);
        assert!(matches!(
            failure(&no_seat, &[], true),
            FlowError::Rejected(_)
        ));
        let worded = answer(
            403,
            r#"{"message":"API rate limit exceeded for user ID 1."}"#,
        );
        assert!(matches!(
            failure(&worded, &[], true),
            FlowError::Transient { .. }
        ));
        let headed = Answer {
            rate_limited: true,
            ..answer(403, r#"{"message":"forbidden"}"#)
        };
        assert!(matches!(
            failure(&headed, &[], true),
            FlowError::Transient { .. }
        ));
        let waits = Answer {
            retry_after: Some(Duration::from_secs(60)),
            ..answer(403, "")
        };
        assert!(matches!(
            failure(&waits, &[], true),
            FlowError::Transient {
                retry_after: Some(_),
                ..
            }
        ));
    }

    #[tokio::test]
    async fn answers_are_read_to_64_kib() {
        use futures_util::stream;
        let app = axum::Router::new()
            .route(
                "/chunked",
                axum::routing::get(|| async {
                    // 10 MiB without a length: cut off at 64 KiB, not read to the end.
                    let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 1 << 20]));
                    axum::body::Body::from_stream(stream::iter(chunks))
                }),
            )
            .route(
                "/small",
                axum::routing::get(|| async { "x".repeat(MAX_ANSWER) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = Http::new();
        let client = http.client().unwrap();
        let big = send(client.get(format!("{base}/chunked")), &[])
            .await
            .unwrap();
        assert_eq!(big.status, StatusCode::OK);
        assert!(big.body.is_none());
        assert!(matches!(
            json_object(&big, &[]),
            Err(FlowError::Transient { reason, .. }) if reason.starts_with("answer unreadable")
        ));
        let small = send(client.get(format!("{base}/small")), &[])
            .await
            .unwrap();
        assert_eq!(small.body.map(|b| b.len()), Some(MAX_ANSWER));
    }

    #[test]
    fn failures_are_classified() {
        let f = failure(
            &answer(
                400,
                r#"{"error":"invalid_grant","error_description":"revoked"}"#,
            ),
            &[],
            false,
        );
        assert_eq!(
            f,
            FlowError::Rejected("invalid_grant: revoked (HTTP 400)".into())
        );
        let f = failure(&answer(401, "nonsense"), &[], false);
        assert_eq!(
            f,
            FlowError::Rejected("the token endpoint answered 401".into())
        );
        assert!(matches!(
            failure(&answer(400, r#"{"error":"temporarily_weird"}"#), &[], false),
            FlowError::Transient { .. }
        ));
        assert!(matches!(
            failure(&answer(403, r#"{"message":"no"}"#), &[], false),
            FlowError::Transient { .. }
        ));
        assert_eq!(
            failure(
                &answer(403, r#"{"error_details":{"message":"no seat"}}"#),
                &[],
                true
            ),
            FlowError::Rejected("no seat (HTTP 403)".into())
        );
        for status in [429, 500, 502, 404, 302] {
            assert!(
                matches!(
                    failure(&answer(status, ""), &[], false),
                    FlowError::Transient { .. }
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn reasons_are_scrubbed_and_bounded() {
        let long = "x".repeat(1000);
        assert_eq!(scrub(&long, &[]).chars().count(), MAX_REASON);
        assert_eq!(scrub("a\nb\u{7}c", &[]), "a b c");
        assert_eq!(
            scrub("bad token rt-123 here", &["rt-123", ""]),
            "bad token *** here"
        );
        let f = failure(
            &answer(
                400,
                r#"{"error":"invalid_grant","error_description":"token rt-9 is revoked"}"#,
            ),
            &["rt-9"],
            false,
        );
        assert_eq!(f.reason(), "invalid_grant: token *** is revoked (HTTP 400)");
        // A long token echoed whole is removed whole, not cut and then shown in part.
        let token = "t".repeat(5000);
        let body = serde_json::json!({"error": "invalid_grant", "error_description": token});
        let f = failure(&answer(400, &body.to_string()), &[&token], false);
        assert_eq!(f.reason(), "invalid_grant: *** (HTTP 400)");
    }

    #[test]
    fn numbers_and_lifetimes_are_bounded() {
        let now = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let map: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"a": 1e300, "b": -5, "c": "120", "d": 18446744073709551615, "e": [1], "f": 1.5}"#,
        )
        .unwrap();
        assert_eq!(
            expiry_in(now, seconds(&map, "a", &[]).unwrap().unwrap()),
            now + MAX_LIFETIME
        );
        assert_eq!(
            expiry_in(now, seconds(&map, "b", &[]).unwrap().unwrap()),
            now + MIN_LIFETIME
        );
        assert_eq!(seconds(&map, "c", &[]).unwrap(), Some(120));
        assert_eq!(
            expiry_in(now, seconds(&map, "d", &[]).unwrap().unwrap()),
            now + MAX_LIFETIME
        );
        assert!(seconds(&map, "e", &[]).is_err());
        assert_eq!(seconds(&map, "f", &[]).unwrap(), Some(1));
        assert_eq!(seconds(&map, "missing", &[]).unwrap(), None);
        assert_eq!(expiry_at(now, i64::MIN), now + MIN_LIFETIME);
        assert_eq!(expiry_at(now, i64::MAX), now + MAX_LIFETIME);
        assert_eq!(
            expiry_at(now, now.timestamp() + 600),
            now + TimeDelta::seconds(600)
        );
    }

    #[test]
    fn tokens_are_bounded() {
        let map: serde_json::Map<String, Value> = serde_json::from_value(serde_json::json!({
            "ok": "abc", "empty": "", "big": "x".repeat(MAX_TOKEN + 1), "num": 5, "space": "a b"
        }))
        .unwrap();
        assert_eq!(token(&map, "ok", &[]).unwrap().expose(), "abc");
        for field in ["empty", "big", "num", "space", "missing"] {
            assert!(
                matches!(token(&map, field, &[]), Err(FlowError::Transient { .. })),
                "{field}"
            );
        }
        assert!(optional_token(&map, "missing", &[]).unwrap().is_none());
    }
}
