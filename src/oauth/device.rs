//! What the device-flow logins (RFC 8628) share, whatever the provider's field names: the
//! bounds on a device authorization answer (lifetimes, intervals, codes, verification links)
//! and the reading of a poll's answer into a [`Poll`] (`authorization_pending`, `slow_down`,
//! `access_denied`, `expired_token`, any other error, a retryable failure). Copilot's GitHub
//! device flow ([`super::copilot`]) and Kiro's AWS SSO OIDC ([`super::kiro`]) read their
//! answers here; the tokens of a success are theirs to read.

use super::client::{self, Answer};
use crate::crypto::Secret;
use crate::domain::OauthExtra;
use crate::domain::login::{DEFAULT_INTERVAL, DeviceAuthorization, Poll};
use crate::domain::refresh::FlowError;
use reqwest::StatusCode;
use serde_json::{Map, Value};
use std::time::Duration;

/// The grant type of a device-flow poll (RFC 8628 §3.4).
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The shortest and longest time the codes of an authorization are taken to be good for.
pub const MIN_EXPIRES_IN: Duration = Duration::from_secs(30);
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(3600);
/// The lifetime assumed when an answer names none (RFC 8628 makes it required; GitHub's
/// codes live 15 minutes).
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(900);
/// The shortest and longest interval between polls, whatever the provider asks for.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The longest user code (in characters) shown to the user.
pub const MAX_USER_CODE: usize = 64;
/// The longest verification link, in bytes.
pub const MAX_URI: usize = 2048;
/// The longest device code, in bytes.
pub const MAX_DEVICE_CODE: usize = 4096;

/// The JSON field names of a provider's device authorization answer.
pub struct Fields {
    pub device_code: &'static str,
    pub user_code: &'static str,
    pub verification_uri: &'static str,
    pub verification_uri_complete: &'static str,
    pub expires_in: &'static str,
    pub interval: &'static str,
}

/// RFC 8628's own names (GitHub's and most providers').
pub const RFC8628_FIELDS: Fields = Fields {
    device_code: "device_code",
    user_code: "user_code",
    verification_uri: "verification_uri",
    verification_uri_complete: "verification_uri_complete",
    expires_in: "expires_in",
    interval: "interval",
};

/// Read a device authorization answer's `map`, bounded, into the authorization a flow
/// answers (no client, no extra fields: a flow with either sets them); anything out of bounds
/// is `Transient` "answer unreadable" (the provider's answer is wrong, not the request).
pub fn read_codes(
    map: &Map<String, Value>,
    fields: &Fields,
    secrets: &[&str],
) -> Result<DeviceAuthorization, FlowError> {
    let bad = |field: &str, what: &str| client::unreadable(&format!("`{field}` {what}"), secrets);
    let device_code = match map.get(fields.device_code).and_then(Value::as_str) {
        Some(c)
            if !c.is_empty()
                && c.len() <= MAX_DEVICE_CODE
                && c.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Secret::new(c)
        }
        _ => return Err(bad(fields.device_code, "is not a device code")),
    };
    let user_code = match map.get(fields.user_code).and_then(Value::as_str) {
        Some(c) if user_code_ok(c) => c.to_string(),
        _ => return Err(bad(fields.user_code, "is not a user code")),
    };
    let verification_uri = match map.get(fields.verification_uri).and_then(Value::as_str) {
        Some(u) if web_url(u) => u.to_string(),
        _ => return Err(bad(fields.verification_uri, "is not an http(s) URL")),
    };
    let verification_uri_complete = match map.get(fields.verification_uri_complete) {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) if u.is_empty() => None,
        Some(Value::String(u)) if web_url(u) => Some(u.clone()),
        Some(_) => {
            return Err(bad(
                fields.verification_uri_complete,
                "is not an http(s) URL",
            ));
        }
    };
    let expires_in = client::seconds(map, fields.expires_in, secrets)?
        .map_or(DEFAULT_EXPIRES_IN, |s| {
            clamp(s, MIN_EXPIRES_IN, MAX_EXPIRES_IN)
        });
    let interval = client::seconds(map, fields.interval, secrets)?
        .map_or(DEFAULT_INTERVAL, |s| clamp(s, MIN_INTERVAL, MAX_INTERVAL));
    Ok(DeviceAuthorization {
        device_code,
        user_code,
        verification_uri,
        verification_uri_complete,
        expires_in,
        interval,
        client: None,
        extra: OauthExtra::default(),
    })
}

/// `seconds` as a duration within `[min, max]`.
fn clamp(seconds: i64, min: Duration, max: Duration) -> Duration {
    let secs = seconds.clamp(min.as_secs() as i64, max.as_secs() as i64);
    Duration::from_secs(secs.unsigned_abs())
}

/// At most [`MAX_USER_CODE`] printable ASCII characters (spaces included), not blank: the
/// page shows it large for the user to type, so nothing invisible or reordering (a bidi
/// control, a control character) may hide in it.
pub fn user_code_ok(code: &str) -> bool {
    !code.trim().is_empty()
        && code.len() <= MAX_USER_CODE
        && code.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

/// A link a user is sent to: an https:// URL (or http:// to this machine, a local test
/// server) with a host and no user or password in it, of at most [`MAX_URI`] bytes.
pub fn web_url(text: &str) -> bool {
    text.len() <= MAX_URI
        && reqwest::Url::parse(text).is_ok_and(|u| {
            let Some(host) = u.host_str().filter(|h| !h.is_empty()) else {
                return false;
            };
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            let local = host.eq_ignore_ascii_case("localhost")
                || ip
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            let scheme_ok = u.scheme() == "https" || (u.scheme() == "http" && local);
            scheme_ok && u.username().is_empty() && u.password().is_none()
        })
}

/// Whether a failed answer is worth asking again: a timeout, a rate limit, a server error.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// Whether an answer to a start call is a failure (not a 2xx, or an `error` whatever the
/// status: GitHub answers errors with 200), and what it means: `Transient` for a timeout, a
/// rate limit or a server error, else `Rejected` with the provider's words (the request or
/// the config is refused; asking again will not help).
pub fn start_failure(answer: &Answer, secrets: &[&str]) -> Option<FlowError> {
    let error = client::json_object(answer, secrets).ok().is_some_and(|m| {
        m.get("error")
            .and_then(Value::as_str)
            .is_some_and(|e| !e.is_empty())
    });
    if answer.status.is_success() && !error {
        return None;
    }
    let failure = client::failure(answer, secrets, true);
    Some(if retryable(answer.status) {
        failure
    } else {
        FlowError::Rejected(failure.reason().to_string())
    })
}

/// What a poll's answer says before its tokens are read: `Err` with the outcome for every
/// answer but a 2xx without an `error`, whose JSON object is returned for the flow to read
/// its tokens from. The `error` field is read whatever the status (GitHub answers its errors
/// with 200). `interval_field` names the new interval a `slow_down` may bring.
pub fn poll_answer(
    answer: Result<Answer, FlowError>,
    interval_field: &str,
    secrets: &[&str],
) -> Result<Map<String, Value>, Poll> {
    let answer = answer.map_err(|e| Poll::Retry(e.reason().to_string()))?;
    let status = answer.status;
    let map = client::json_object(&answer, secrets);
    let error = map
        .as_ref()
        .ok()
        .and_then(|m| m.get("error"))
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty());
    match error {
        Some("authorization_pending") => return Err(Poll::Pending),
        Some("slow_down") => {
            // An interval that is not a number is as if none were named: the caller adds
            // the step.
            let interval = map
                .as_ref()
                .ok()
                .and_then(|m| client::seconds(m, interval_field, secrets).ok().flatten())
                .map(|s| clamp(s, MIN_INTERVAL, MAX_INTERVAL));
            return Err(Poll::SlowDown(interval));
        }
        Some("access_denied") => return Err(Poll::Denied),
        Some("expired_token") => return Err(Poll::Expired),
        _ => {}
    }
    if retryable(status) {
        return Err(Poll::Retry(
            client::failure(&answer, secrets, false)
                .reason()
                .to_string(),
        ));
    }
    if error.is_some() || !status.is_success() {
        return Err(Poll::Failed(
            client::failure(&answer, secrets, false)
                .reason()
                .to_string(),
        ));
    }
    // A 2xx whose body cannot be read may be a proxy's glitch: poll again.
    map.map_err(|e| Poll::Retry(e.reason().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SNAKE: Fields = RFC8628_FIELDS;

    fn map(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    fn answer(status: u16, body: &[u8]) -> Result<Answer, FlowError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: None,
            body: Some(body.to_vec()),
            rate_limited: false,
        })
    }

    #[test]
    fn codes_are_bounded() {
        let good = json!({"device_code": "dc", "user_code": "ABCD-EFGH",
                          "verification_uri": "https://github.com/login/device",
                          "expires_in": 900, "interval": 5});
        let codes = read_codes(&map(good.clone()), &SNAKE, &[]).unwrap();
        assert_eq!(codes.user_code, "ABCD-EFGH");
        assert_eq!(codes.expires_in, Duration::from_secs(900));
        assert_eq!(codes.interval, Duration::from_secs(5));
        assert!(codes.verification_uri_complete.is_none());
        for (field, value, expires, interval) in [
            ("expires_in", json!(1e300), MAX_EXPIRES_IN, DEFAULT_INTERVAL),
            ("expires_in", json!(-5), MIN_EXPIRES_IN, DEFAULT_INTERVAL),
            (
                "expires_in",
                json!(null),
                DEFAULT_EXPIRES_IN,
                DEFAULT_INTERVAL,
            ),
            ("interval", json!(0), DEFAULT_EXPIRES_IN, MIN_INTERVAL),
            (
                "interval",
                json!(u64::MAX),
                DEFAULT_EXPIRES_IN,
                MAX_INTERVAL,
            ),
            (
                "interval",
                json!("7"),
                DEFAULT_EXPIRES_IN,
                Duration::from_secs(7),
            ),
        ] {
            let mut m = map(good.clone());
            m.remove("expires_in");
            m.remove("interval");
            m.insert(field.into(), value);
            let codes = read_codes(&m, &SNAKE, &[]).unwrap();
            assert_eq!(
                (codes.expires_in, codes.interval),
                (expires, interval),
                "{m:?}"
            );
        }
        let long_uri = format!("https://x.example/{}", "a".repeat(MAX_URI));
        for (field, value) in [
            ("device_code", json!("")),
            ("device_code", json!("a b")),
            ("device_code", json!("d".repeat(MAX_DEVICE_CODE + 1))),
            ("device_code", json!(5)),
            ("user_code", json!("")),
            ("user_code", json!("   ")),
            ("user_code", json!("AB\nCD")),
            ("user_code", json!("AB\u{202e}CD")),
            ("user_code", json!("ÉCOLE")),
            ("user_code", json!("X".repeat(MAX_USER_CODE + 1))),
            ("verification_uri", json!("javascript:alert(1)")),
            ("verification_uri", json!("ftp://x.example/")),
            ("verification_uri", json!("http://github.com/login/device")),
            (
                "verification_uri",
                json!("https://user:pw@github.com/login/device"),
            ),
            ("verification_uri", json!("https://token@github.com/")),
            ("verification_uri_complete", json!("http://10.0.0.1/device")),
            ("verification_uri", json!("https://")),
            ("verification_uri", json!(long_uri)),
            ("verification_uri", json!(null)),
            ("verification_uri_complete", json!("data:text/html,hi")),
            ("verification_uri_complete", json!(7)),
            ("expires_in", json!("soon")),
        ] {
            let mut m = map(good.clone());
            m.insert(field.into(), value);
            let e = read_codes(&m, &SNAKE, &[]).unwrap_err();
            assert!(
                matches!(&e, FlowError::Transient { reason, .. } if reason.starts_with("answer unreadable")),
                "{field}: {e:?}"
            );
        }
        // The longest user code and link are taken; a blank complete link is none.
        let mut m = map(good);
        m.insert("user_code".into(), json!(format!("{}Z", "X Y".repeat(21))));
        let uri = format!("https://x.example/{}", "a".repeat(MAX_URI - 18));
        m.insert("verification_uri_complete".into(), json!(uri));
        let codes = read_codes(&m, &SNAKE, &[]).unwrap();
        assert_eq!(codes.verification_uri_complete.unwrap().len(), MAX_URI);
        // http:// to this machine (a local test server) is taken.
        for local in [
            "http://127.0.0.1:8080/d",
            "http://localhost/d",
            "http://[::1]/d",
        ] {
            m.insert("verification_uri_complete".into(), json!(local));
            let codes = read_codes(&m, &SNAKE, &[]).unwrap();
            assert_eq!(codes.verification_uri_complete.as_deref(), Some(local));
        }
        m.insert("verification_uri_complete".into(), json!(""));
        assert!(
            read_codes(&m, &SNAKE, &[])
                .unwrap()
                .verification_uri_complete
                .is_none()
        );
    }

    #[test]
    fn poll_answers_are_classified() {
        let poll = |status: u16, body: &str| {
            poll_answer(answer(status, body.as_bytes()), "interval", &["dc-secret"])
        };
        assert!(matches!(
            poll(400, r#"{"error":"authorization_pending"}"#),
            Err(Poll::Pending)
        ));
        assert!(matches!(
            poll(200, r#"{"error":"authorization_pending"}"#),
            Err(Poll::Pending)
        ));
        assert!(matches!(
            poll(400, r#"{"error":"slow_down"}"#),
            Err(Poll::SlowDown(None))
        ));
        assert!(matches!(
            poll(200, r#"{"error":"slow_down","interval":10}"#),
            Err(Poll::SlowDown(Some(d))) if d == Duration::from_secs(10)
        ));
        assert!(matches!(
            poll(200, r#"{"error":"slow_down","interval":1e300}"#),
            Err(Poll::SlowDown(Some(MAX_INTERVAL)))
        ));
        assert!(matches!(
            poll(200, r#"{"error":"slow_down","interval":"later"}"#),
            Err(Poll::SlowDown(None))
        ));
        assert!(matches!(
            poll(400, r#"{"error":"access_denied"}"#),
            Err(Poll::Denied)
        ));
        assert!(matches!(
            poll(400, r#"{"error":"expired_token"}"#),
            Err(Poll::Expired)
        ));
        assert!(matches!(
            poll(200, r#"{"error":"incorrect_device_code","error_description":"dc-secret is wrong"}"#),
            Err(Poll::Failed(m)) if m == "incorrect_device_code: *** is wrong (HTTP 200)"
        ));
        assert!(
            matches!(poll(404, "not found"), Err(Poll::Failed(m)) if m == "the token endpoint answered 404")
        );
        for status in [429, 408, 500, 503] {
            assert!(
                matches!(
                    poll(status, r#"{"error":"server_error"}"#),
                    Err(Poll::Retry(_))
                ),
                "{status}"
            );
        }
        assert!(
            matches!(poll(200, "<html>"), Err(Poll::Retry(m)) if m.starts_with("answer unreadable"))
        );
        assert!(poll(200, r#"{"access_token":"x"}"#).is_ok());
        let huge = Answer {
            status: StatusCode::OK,
            retry_after: None,
            body: None,
            rate_limited: false,
        };
        assert!(matches!(
            poll_answer(Ok(huge), "interval", &[]),
            Err(Poll::Retry(_))
        ));
        let down = Err(client::transient(
            "the token endpoint is unreachable",
            &[],
            None,
        ));
        assert!(
            matches!(poll_answer(down, "interval", &[]), Err(Poll::Retry(m)) if m == "the token endpoint is unreachable")
        );
    }
}
