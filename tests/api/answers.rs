//! Provider answers read by what they mean (README, "Provider answers"),
//! against the provider-like mock: a client's words quoted back in an error
//! mark nothing, in any format; out-of-credit keys are skipped; a request too large for the
//! limit, a region block and a provider's own overload mark no key; every wait a provider
//! names is the cooldown.

use crate::common::{Api, Home, Resp, TestApp, eventually};
use crate::provider_mock::{ProviderMock, Reply};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const KEY: &str = "answers-client-key";

async fn setup(mock: &ProviderMock, extra: &str) -> (Home, TestApp) {
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  selection_strategy: priority\n{}{extra}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    (home, app)
}

/// Add a credential labelled with its token, `priority` first (lower is tried first).
async fn add(app: &TestApp, provider: &str, token: &str, priority: u64) -> String {
    let body = json!({"provider": provider, "token": token, "label": token, "priority": priority});
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn post(app: &TestApp, path: &str, body: &Value) -> Resp {
    app.call_with(
        "POST",
        path,
        Some(&body.to_string()),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await
}

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

fn chat(model: &str) -> Value {
    json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}

fn claude() -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}

fn gemini() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}})
}

/// Every credential by label, once no reservation is left (settlements and releases may land
/// just after the answer).
async fn credentials(app: &TestApp) -> HashMap<String, Value> {
    eventually(Duration::from_secs(10), || async {
        let all: HashMap<String, Value> = app
            .auths()
            .await
            .into_iter()
            .map(|a| (a["label"].as_str().unwrap().to_string(), a))
            .collect();
        all.values()
            .all(|c| c["quota"]["reserved"] == 0)
            .then_some(all)
    })
    .await
}

/// Every credential is as it was added: active, not cooling, no reason.
fn untouched(all: &HashMap<String, Value>, context: &str) {
    for (label, c) in all {
        assert_eq!(c["status"], "active", "{context}: {label}: {c}");
        assert_eq!(c["cooldown_until"], Value::Null, "{context}: {label}: {c}");
    }
}

/// What a client writes where errors quote it back: none of it is the provider's verdict.
const HOSTILE: &[&str] = &[
    "API_KEY_INVALID",
    "API_KEY_EXPIRED",
    "SERVICE_DISABLED",
    "CONSUMER_SUSPENDED",
    "insufficient_quota",
    "rate_limit_exceeded",
    "unsupported_country_region_territory",
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
    "You have reached your specified API usage limits. You will regain access on 2099-01-01 at 00:00 UTC.",
    "This organization has been disabled.",
    "Your project has been denied access. Please contact support.",
    "Request too large for gpt-4o: Limit 1, Requested 2.",
    r#"{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}"#,
];

/// The requests that put `word` where each format's errors quote it: (path, body).
fn hostile_requests(word: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    // OpenAI: an unknown argument, a model, a key of a message.
    let mut b = chat("gpt-4o");
    b[word] = json!(word);
    out.push((CHAT.to_string(), b));
    out.push((CHAT.to_string(), chat(&format!("openai/{word}"))));
    let mut b = chat("gpt-4o");
    b["messages"][0][word] = json!(word);
    out.push((CHAT.to_string(), b));
    // Anthropic: an unknown field (named first in its message), a model, a key of a message.
    let mut b = claude();
    b[word] = json!(word);
    out.push((MESSAGES.to_string(), b));
    let mut b = claude();
    b["model"] = json!(word);
    out.push((MESSAGES.to_string(), b));
    let mut b = claude();
    b["messages"][0][word] = json!(word);
    out.push((MESSAGES.to_string(), b));
    // Gemini: an unknown field, a key of a content, an enum value; a streamed call answers
    // in an array; a model name where the word can be one.
    let mut b = gemini();
    b[word] = json!(word);
    out.push((GENERATE.to_string(), b.clone()));
    out.push((
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent".to_string(),
        b,
    ));
    let mut b = gemini();
    b["contents"][0][word] = json!(word);
    out.push((GENERATE.to_string(), b));
    let mut b = gemini();
    b["generationConfig"]["responseModalities"] = json!([word]);
    out.push((GENERATE.to_string(), b));
    if word
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        out.push((format!("/v1beta/models/{word}:generateContent"), gemini()));
    }
    out
}

/// Defect 1: Gemini's 400 quotes an unknown field ("Unknown name \"API_KEY_INVALID\""); one
/// request with such a field marked every key invalid. Now nothing the client writes marks a
/// key, and each such request costs one upstream call; only the provider's own ErrorInfo does.
#[tokio::test]
async fn words_a_gemini_error_quotes_mark_no_key() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "").await;
    for (i, t) in ["AIza-g1", "AIza-g2", "AIza-g3"].iter().enumerate() {
        add(&app, "gemini", t, i as u64 + 1).await;
    }
    for word in HOSTILE {
        for (path, body) in hostile_requests(word)
            .into_iter()
            .filter(|(p, _)| p.starts_with("/v1beta"))
        {
            let before = mock.total_calls();
            let r = post(&app, &path, &body).await;
            assert!(
                r.status == 400 || r.status == 404,
                "{path} {body}: {} {}",
                r.status,
                r.text
            );
            assert_eq!(mock.total_calls(), before + 1, "{path} {body}: one call");
        }
        untouched(&credentials(&app).await, word);
    }
    assert_eq!(post(&app, GENERATE, &gemini()).await.status, 200);
    // The provider's own verdict on a key still counts, for that key only.
    mock.reply(
        "AIza-g1",
        Reply::gemini_key_invalid("API key not valid. Please pass a valid API key."),
    );
    mock.reply("AIza-g2", Reply::gemini_service_disabled());
    let r = post(&app, GENERATE, &gemini()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let all = credentials(&app).await;
    assert_eq!(all["AIza-g1"]["status"], "invalid");
    assert_eq!(all["AIza-g2"]["status"], "invalid");
    assert_eq!(all["AIza-g3"]["status"], "active");
    app.stop().await;
}

/// Defect 2: "Your credit balance is too low…" and "You have reached your specified API usage
/// limits…" are 400 invalid_request_error; the key stayed active and one request in N failed.
/// Now the key is exhausted and the next one is tried.
#[tokio::test]
async fn out_of_credit_anthropic_keys_are_skipped() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "proxy:\n  max_attempts: 8\n").await;
    let soon = (Utc::now() + chrono::Duration::days(3))
        .format("%Y-%m-%d at %H:%M")
        .to_string();
    let keys = [
        ("sk-ant-credit", Some(Reply::anthropic_credit_balance())),
        (
            "sk-ant-limit-dated",
            Some(Reply::anthropic_usage_limits(Some(&soon))),
        ),
        (
            "sk-ant-limit-far",
            Some(Reply::anthropic_usage_limits(Some("2999-12-01 at 00:00"))),
        ),
        (
            "sk-ant-limit-past",
            Some(Reply::anthropic_usage_limits(Some("2020-01-01 at 00:00"))),
        ),
        ("sk-ant-limit", Some(Reply::anthropic_usage_limits(None))),
        (
            "sk-ant-disabled",
            Some(Reply::anthropic_organization_disabled()),
        ),
        ("sk-ant-fine", None),
    ];
    for (i, (token, reply)) in keys.iter().enumerate() {
        add(&app, "claude", token, i as u64 + 1).await;
        if let Some(reply) = reply {
            mock.reply(token, reply.clone());
        }
    }
    let r = post(&app, MESSAGES, &claude()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let all = credentials(&app).await;
    for (token, want, reason) in [
        ("sk-ant-credit", "exhausted", "out of credit"),
        ("sk-ant-limit-dated", "exhausted", "usage limit"),
        ("sk-ant-limit-far", "exhausted", "usage limit"),
        ("sk-ant-limit-past", "exhausted", "usage limit"),
        ("sk-ant-limit", "exhausted", "usage limit"),
        ("sk-ant-disabled", "invalid", "disabled"),
    ] {
        let c = &all[token];
        assert_eq!(c["status"], want, "{token}: {c}");
        let why = c["status_reason"].as_str().unwrap();
        assert!(
            why.contains(reason) && why.contains("HTTP 400"),
            "{token}: {why}"
        );
        assert_eq!(mock.calls(token), 1, "{token}");
    }
    assert_eq!(all["sk-ant-fine"]["status"], "active");
    // The next requests go straight to the key that works.
    for _ in 0..3 {
        assert_eq!(post(&app, MESSAGES, &claude()).await.status, 200);
    }
    for (token, _) in &keys[..6] {
        assert_eq!(mock.calls(token), 1, "{token} is skipped");
    }
    assert_eq!(mock.calls("sk-ant-fine"), 4);
    app.stop().await;
}

/// Defect 3: a request larger than the organisation's tokens-per-minute limit got a 429 like a
/// rate limit, was tried on every key and cooled each. It is the client's: answered after one
/// call, nothing marked. A real rate limit still cools its key.
#[tokio::test]
async fn a_request_too_large_for_the_limit_is_the_clients() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "").await;
    for i in 1..=3 {
        add(&app, "openai", &format!("sk-big-{i}"), i).await;
        add(&app, "groq", &format!("gsk-big-{i}"), i).await;
    }
    let variants = [
        (
            "openai",
            Reply::openai_request_too_large(30_000, 50_000),
            429,
        ),
        ("openai", Reply::openai_request_too_large(0, 1), 429),
        (
            "openai",
            Reply::openai_request_too_large(1, 18_446_744_073_709_551_615),
            429,
        ),
        ("openai", Reply::openai_request_too_large_plain(), 429),
        ("groq", Reply::groq_request_too_large(429), 429),
        ("groq", Reply::groq_request_too_large(413), 413),
    ];
    for (provider, reply, status) in variants {
        let (prefix, model) = match provider {
            "openai" => ("sk-big", "gpt-4o"),
            _ => ("gsk-big", "groq/llama-3.3-70b-versatile"),
        };
        for i in 1..=3 {
            mock.reply(&format!("{prefix}-{i}"), reply.clone());
        }
        let before = mock.total_calls();
        let r = post(&app, CHAT, &chat(model)).await;
        assert_eq!(r.status, status, "{}", r.text);
        assert!(r.text.contains("Request too large"), "{}", r.text);
        assert_eq!(mock.total_calls(), before + 1, "{}: one call", reply.body);
        untouched(&credentials(&app).await, &reply.body);
    }
    // Within the limit, the same words are a rate limit: the key cools and the next is tried.
    mock.reply(
        "sk-big-1",
        Reply::openai_request_too_large(30_000, 3_000).with(&[("retry-after", "20")]),
    );
    mock.reply("sk-big-2", Reply::openai_rate_limited("tokens", &[]));
    mock.reply("sk-big-3", Reply::openai_rate_limited("requests", &[]));
    let r = post(&app, CHAT, &chat("gpt-4o")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    let all = credentials(&app).await;
    for i in 1..=3 {
        assert_eq!(all[&format!("sk-big-{i}")]["status"], "cooldown");
    }
    app.stop().await;
}

/// Defect 4: a region block (OpenAI's 403 unsupported_country_region_territory, Anthropic's
/// 403 "Request not allowed", Gemini's 400 FAILED_PRECONDITION "User location is not
/// supported") is about where the server runs: it marks no key. (How many keys are asked is
/// the request path's; this holds either way.)
#[tokio::test]
async fn a_region_block_marks_no_key() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "").await;
    let cases = [
        (
            "openai",
            "sk-region",
            Reply::openai_region(),
            CHAT,
            chat("gpt-4o"),
        ),
        (
            "claude",
            "sk-ant-region",
            Reply::anthropic_region(),
            MESSAGES,
            claude(),
        ),
        (
            "gemini",
            "AIza-region",
            Reply::gemini_location(),
            GENERATE,
            gemini(),
        ),
    ];
    for (provider, prefix, reply, path, body) in cases {
        for i in 1..=3 {
            let token = format!("{prefix}-{i}");
            add(&app, provider, &token, i).await;
            mock.reply(&token, reply.clone());
        }
        for _ in 0..2 {
            let r = post(&app, path, &body).await;
            assert!(r.status >= 400, "{provider}: {} {}", r.status, r.text);
            untouched(&credentials(&app).await, provider);
        }
    }
    app.stop().await;
}

/// A provider's own state (overload, a model out of capacity) and a refusal of what the
/// request names (a model the project may not use, a resource the key may not touch) are not
/// the key's: nothing is marked. (How many keys are asked is the request path's.)
#[tokio::test]
async fn provider_states_and_refused_resources_mark_no_key() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "").await;
    let cases = [
        (
            "claude",
            "sk-ant-529",
            Reply::anthropic_overloaded(),
            MESSAGES,
            claude(),
        ),
        (
            "claude",
            "sk-ant-perm",
            Reply::anthropic_permission(),
            MESSAGES,
            claude(),
        ),
        (
            "openai",
            "sk-503",
            Reply::openai_overloaded(),
            CHAT,
            chat("gpt-4o"),
        ),
        (
            "openai",
            "sk-project",
            Reply::openai_project_model(),
            CHAT,
            chat("gpt-4o"),
        ),
        (
            "gemini",
            "AIza-503",
            Reply::gemini_unavailable(),
            GENERATE,
            gemini(),
        ),
        (
            "mistral",
            "mistral-capacity",
            Reply::mistral_capacity(),
            CHAT,
            chat("mistral/mistral-small-latest"),
        ),
        (
            "groq",
            "gsk-flex",
            Reply::groq_flex_capacity(),
            CHAT,
            chat("groq/llama-3.3-70b-versatile"),
        ),
    ];
    for (provider, prefix, reply, path, body) in cases {
        let mut ids = Vec::new();
        for i in 1..=2 {
            let token = format!("{prefix}-{i}");
            ids.push(add(&app, provider, &token, i).await);
            mock.reply(&token, reply.clone());
        }
        let r = post(&app, path, &body).await;
        assert_eq!(r.status, reply.status, "{prefix}: {}", r.text);
        untouched(&credentials(&app).await, prefix);
        for id in ids {
            app.delete(&format!("/v0/management/auths/{provider}?id={id}"))
                .await;
        }
    }
    app.stop().await;
}

/// Acceptance 2: whatever a client writes, in every format, no credential's status changes
/// unless the provider's own structured verdict says so.
#[tokio::test]
async fn no_client_request_changes_a_credential() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "").await;
    for i in 1..=3 {
        add(&app, "openai", &format!("sk-oa-{i}"), i).await;
        add(&app, "claude", &format!("sk-ant-{i}"), i).await;
        add(&app, "gemini", &format!("AIza-{i}"), i).await;
    }
    for word in HOSTILE {
        for (path, body) in hostile_requests(word) {
            let before = mock.total_calls();
            let r = post(&app, &path, &body).await;
            assert!(
                (400..500).contains(&r.status),
                "{path} {body}: {} {}",
                r.status,
                r.text
            );
            assert_eq!(mock.total_calls(), before + 1, "{path} {body}: one call");
        }
    }
    untouched(&credentials(&app).await, "after every hostile request");
    // The provider's structured verdicts do change the key they are about, and only it.
    mock.reply("sk-oa-1", Reply::openai_insufficient_quota());
    mock.reply("sk-oa-2", Reply::openai_invalid_key());
    mock.reply("sk-ant-1", Reply::anthropic_credit_balance());
    mock.reply("sk-ant-2", Reply::anthropic_invalid_key());
    mock.reply("AIza-1", Reply::gemini_denied_access());
    add(&app, "deepseek", "sk-ds-1", 1).await;
    add(&app, "deepseek", "sk-ds-2", 2).await;
    mock.reply("sk-ds-1", Reply::deepseek_insufficient_balance());
    for (path, body) in [
        (CHAT, chat("gpt-4o")),
        (CHAT, chat("deepseek/deepseek-chat")),
        (MESSAGES, claude()),
        (GENERATE, gemini()),
    ] {
        let r = post(&app, path, &body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    let all = credentials(&app).await;
    for (token, want) in [
        ("sk-oa-1", "exhausted"),
        ("sk-oa-2", "invalid"),
        ("sk-oa-3", "active"),
        ("sk-ant-1", "exhausted"),
        ("sk-ant-2", "invalid"),
        ("sk-ant-3", "active"),
        ("AIza-1", "invalid"),
        ("AIza-2", "active"),
        ("AIza-3", "active"),
        ("sk-ds-1", "exhausted"),
        ("sk-ds-2", "active"),
    ] {
        assert_eq!(all[token]["status"], want, "{token}: {}", all[token]);
    }
    app.stop().await;
}

/// The cooldown a case expects.
enum Want {
    Secs(i64),
    At(DateTime<Utc>),
}

fn http_date(at: DateTime<Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Defect 5 and acceptance 3: the cooldown is the wait the provider names, in each of the
/// forms they name it (Retry-After in seconds or as a date, Gemini's RetryInfo, OpenAI's
/// reset durations of the limit the error names, Anthropic's reset dates of the spent
/// limits), within a day; without one, 30 s.
#[tokio::test]
async fn cooldowns_follow_the_wait_the_provider_names() {
    let mock = ProviderMock::start().await;
    let (_home, app) = setup(&mock, "proxy:\n  max_attempts: 1\n").await;
    let now = Utc::now();
    let in_secs = |s: i64| now + chrono::Duration::seconds(s);
    let day = 86_400;
    let openai_resets = |kind: &str, requests: &str, tokens: &str| {
        Reply::openai_rate_limited(
            kind,
            &[
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", requests),
                ("x-ratelimit-limit-tokens", "30000"),
                ("x-ratelimit-remaining-tokens", "29000"),
                ("x-ratelimit-reset-tokens", tokens),
            ],
        )
    };
    let anthropic_resets = |spent: i64, other: i64| {
        vec![
            (
                "anthropic-ratelimit-requests-limit".to_string(),
                "50".to_string(),
            ),
            ("anthropic-ratelimit-requests-remaining".into(), "12".into()),
            (
                "anthropic-ratelimit-requests-reset".into(),
                rfc3339(in_secs(other)),
            ),
            (
                "anthropic-ratelimit-input-tokens-limit".into(),
                "30000".into(),
            ),
            (
                "anthropic-ratelimit-input-tokens-remaining".into(),
                "0".into(),
            ),
            (
                "anthropic-ratelimit-input-tokens-reset".into(),
                rfc3339(in_secs(spent)),
            ),
        ]
    };
    let with = |reply: Reply, headers: Vec<(String, String)>| Reply {
        headers: reply.headers.into_iter().chain(headers).collect(),
        ..reply
    };
    // A wait in seconds, or until a date (counted from when the request is sent).
    let at = |s: i64| Want::At(in_secs(s));
    let secs = Want::Secs;
    let cases: Vec<(&str, Reply, Want)> = vec![
        // Retry-After, in seconds and as an HTTP date.
        (
            "openai",
            Reply::openai_rate_limited("requests", &[("retry-after", "45")]),
            secs(45),
        ),
        (
            "openai",
            Reply::openai_rate_limited("requests", &[("retry-after", &http_date(in_secs(90)))]),
            at(90),
        ),
        // OpenAI's resets: the limit the error names, else the spent one.
        ("openai", openai_resets("requests", "6m0s", "1s"), secs(360)),
        (
            "openai",
            openai_resets("tokens", "6m0s", "1h2m3.5s"),
            secs(3724),
        ),
        ("openai", openai_resets("tokens", "6m0s", "20ms"), secs(1)),
        (
            "openai",
            openai_resets("invalid_request_error", "2m59.56s", "7.66s"),
            secs(180),
        ),
        // Gemini's RetryInfo in the body.
        (
            "gemini",
            Reply::gemini_resource_exhausted(Some("37s")),
            secs(37),
        ),
        (
            "gemini",
            Reply::gemini_resource_exhausted(Some("1.5s")),
            secs(2),
        ),
        // Anthropic's resets without Retry-After: the spent limit's, not the other's.
        (
            "claude",
            with(Reply::anthropic_rate_limited(&[]), anthropic_resets(75, 5)),
            at(75),
        ),
        (
            "claude",
            with(
                Reply::anthropic_rate_limited(&[("retry-after", "12")]),
                anthropic_resets(75, 5),
            ),
            secs(12),
        ),
        // No wait named: the default.
        (
            "openai",
            Reply::openai_rate_limited("requests", &[]),
            secs(30),
        ),
        ("claude", Reply::anthropic_rate_limited(&[]), secs(30)),
        ("gemini", Reply::gemini_resource_exhausted(None), secs(30)),
        // Hostile values: a day at most; what is not a wait is the default.
        (
            "openai",
            Reply::openai_rate_limited("requests", &[("retry-after", "1e300")]),
            secs(day),
        ),
        (
            "openai",
            openai_resets("requests", "99999999999h", "1s"),
            secs(day),
        ),
        (
            "openai",
            openai_resets("requests", "-5s", "garbage"),
            secs(30),
        ),
        (
            "openai",
            Reply::openai_rate_limited(
                "requests",
                &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
            ),
            secs(day),
        ),
        (
            "gemini",
            Reply::gemini_resource_exhausted(Some("-1s")),
            secs(30),
        ),
        (
            "gemini",
            Reply::gemini_resource_exhausted(Some("99999999999999s")),
            secs(day),
        ),
        (
            "claude",
            with(
                Reply::anthropic_rate_limited(&[]),
                vec![("anthropic-ratelimit-tokens-reset".into(), "soon".into())],
            ),
            secs(30),
        ),
    ];
    for (i, (provider, reply, want)) in cases.into_iter().enumerate() {
        let token = format!("{provider}-wait-{i}");
        let id = add(&app, provider, &token, 1).await;
        mock.reply(&token, reply.clone());
        let (path, body) = match provider {
            "openai" => (CHAT, chat("gpt-4o")),
            "claude" => (MESSAGES, claude()),
            _ => (GENERATE, gemini()),
        };
        let before = Utc::now();
        let r = post(&app, path, &body).await;
        assert_eq!(r.status, 429, "{token}: {}", r.text);
        let c = &credentials(&app).await[&token];
        assert_eq!(c["status"], "cooldown", "{token}: {c}");
        let until = DateTime::parse_from_rfc3339(c["cooldown_until"].as_str().unwrap()).unwrap();
        let wait = (until.with_timezone(&Utc) - before).num_seconds();
        let want = match want {
            Want::Secs(s) => s,
            Want::At(t) => (t - before).num_seconds(),
        };
        assert!(
            (want - 2..=want + 2).contains(&wait),
            "{token}: cooling {wait} s, the provider named {want} s ({:?})",
            reply.headers
        );
        app.delete(&format!("/v0/management/auths/{provider}?id={id}"))
            .await;
    }
    app.stop().await;
}
