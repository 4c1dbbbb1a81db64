//! The attempt loop against the verdicts themselves: what each verdict marks and what follows
//! ([`after_failure`], [`mark_for`]), and the real loop (reservation, upstream call over HTTP,
//! release) driven by a local mock whose answers a test classifier reads as the verdict under
//! test, whatever `classify` makes of them today.

use super::attempts::{Then, after_failure, mark_for};
use super::*;
use crate::config::{Config, DatabaseLocation};
use crate::domain::{CredentialKind, NewCredential, OauthExtra, Status};
use crate::store::{ListFilter, StoreOptions};
use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn secs(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::seconds(n)
}

#[test]
fn each_verdict_marks_its_own_and_decides_what_follows() {
    let now = t0();
    let cases: Vec<(Verdict, Option<Mark>, Then)> = vec![
        (Verdict::ClientError, None, Then::Answer),
        (
            Verdict::Invalid("bad key".into()),
            Some(Mark::Invalid("bad key".into())),
            Then::TryAnother,
        ),
        (
            Verdict::Exhausted {
                reason: "credit".into(),
                until: None,
            },
            Some(Mark::Exhausted {
                reason: "credit".into(),
                until: None,
            }),
            Then::TryAnother,
        ),
        (
            Verdict::Exhausted {
                reason: "credit".into(),
                until: Some(now + secs(3600)),
            },
            Some(Mark::Exhausted {
                reason: "credit".into(),
                until: Some(now + secs(3600)),
            }),
            Then::TryAnother,
        ),
        (
            Verdict::RateLimited {
                wait: std::time::Duration::from_secs(37),
                reason: "slow".into(),
            },
            Some(Mark::Cooldown {
                until: now + secs(37),
                reason: "slow".into(),
            }),
            Then::TryAnother,
        ),
        (
            Verdict::Location("region".into()),
            None,
            Then::Refused("region".into()),
        ),
    ];
    for (verdict, mark, then) in cases {
        for before in [false, true] {
            let mut overloaded = before;
            assert_eq!(
                after_failure(&verdict, &mut overloaded, now),
                (mark.clone(), then.clone()),
                "{verdict:?}"
            );
            assert_eq!(overloaded, before, "{verdict:?} leaves the overload alone");
        }
    }
    // Overload: another credential once, then the provider's answer; never a mark.
    let overload = Verdict::Overloaded("overloaded".into());
    let mut overloaded = false;
    assert_eq!(
        after_failure(&overload, &mut overloaded, now),
        (None, Then::TryAnother)
    );
    assert!(overloaded);
    for _ in 0..3 {
        assert_eq!(
            after_failure(&overload, &mut overloaded, now),
            (None, Then::Answer)
        );
    }
}

#[test]
fn an_exhausted_date_is_held_between_a_minute_and_a_year() {
    let now = t0();
    let until = |at: Option<DateTime<Utc>>| match mark_for(
        &Verdict::Exhausted {
            reason: "r".into(),
            until: at,
        },
        now,
    ) {
        Some(Mark::Exhausted { until, .. }) => until,
        other => panic!("{other:?}"),
    };
    let day = 86_400;
    for (given, held) in [
        (DateTime::<Utc>::MIN_UTC, now + secs(60)),
        (DateTime::UNIX_EPOCH, now + secs(60)),
        (now - secs(1), now + secs(60)),
        (now, now + secs(60)),
        (now + secs(59), now + secs(60)),
        (now + secs(60), now + secs(60)),
        (now + secs(61), now + secs(61)),
        (now + secs(30 * day), now + secs(30 * day)),
        (now + secs(366 * day), now + secs(366 * day)),
        (now + secs(366 * day + 1), now + secs(366 * day)),
        (DateTime::<Utc>::MAX_UTC, now + secs(366 * day)),
    ] {
        assert_eq!(until(Some(given)), Some(held), "{given}");
    }
    assert_eq!(until(None), None);
}

/// What the mock answers a token with: status, extra headers, body.
type Answers = HashMap<String, (u16, Vec<(&'static str, String)>, String)>;

#[derive(Default)]
struct Upstream {
    answers: Mutex<Answers>,
    /// Requests per token, in order.
    calls: Mutex<Vec<String>>,
}

impl Upstream {
    fn answer(&self, token: &str, status: u16, headers: Vec<(&'static str, String)>, body: &str) {
        self.answers
            .lock()
            .unwrap()
            .insert(token.to_string(), (status, headers, body.to_string()));
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

async fn mock_answer(State(up): State<Arc<Upstream>>, headers: HeaderMap) -> Response {
    let token = ["authorization", "x-api-key", "x-goog-api-key"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_string())
        .unwrap_or_default();
    up.calls.lock().unwrap().push(token.clone());
    let answer = up.answers.lock().unwrap().get(&token).cloned();
    let (status, extra, body) = answer.unwrap_or_else(|| {
        (
            200,
            Vec::new(),
            r#"{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "input_tokens": 1, "output_tokens": 2}, "usageMetadata": {"promptTokenCount": 1, "totalTokenCount": 3}}"#.into(),
        )
    });
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in extra {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_str(&value).unwrap());
    }
    response
}

/// Reads the mock's answers as the verdicts under test: 529 and 503 overloaded, 451 a
/// region block, an `x-test-until` header exhausted until that date; anything else as
/// [`crate::providers::classify::classify_at`] does.
fn test_classify(
    format: Format,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
) -> Verdict {
    if let Some(until) = headers.get("x-test-until") {
        let until = DateTime::parse_from_rfc3339(until.to_str().unwrap()).unwrap();
        return Verdict::Exhausted {
            reason: "credit gone".into(),
            until: Some(until.with_timezone(&Utc)),
        };
    }
    match status.as_u16() {
        529 | 503 => Verdict::Overloaded("overloaded".into()),
        451 => Verdict::Location("not served in this region".into()),
        _ => crate::providers::classify::classify_at(format, status, headers, body, now),
    }
}

struct Harness {
    path: RequestPath,
    store: Store,
    upstream: Arc<Upstream>,
    clock: Arc<AtomicI64>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A request path (not served) with `keys` of `provider`, pointed at a mock.
    async fn new(provider: &str, keys: &[&str], max_attempts: u32) -> Harness {
        let upstream = Arc::new(Upstream::default());
        let app = axum::Router::new()
            .fallback(mock_answer)
            .with_state(upstream.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "port: 0\nproxy:\n  max_attempts: {max_attempts}\nproviders:\n  openai: {{ base_url: \"{base}/v1\" }}\n  claude: {{ base_url: \"{base}\" }}\n  gemini: {{ base_url: \"{base}/v1beta\" }}\n"
            ),
        )
        .unwrap();
        let loaded = Config::load_with_env(&path, true, std::iter::empty()).unwrap();
        let clock = Arc::new(AtomicI64::new(t0().timestamp()));
        let read = clock.clone();
        let DatabaseLocation::File(database) = &loaded.database;
        let store = Store::open(StoreOptions {
            path: database.clone(),
            encryption: crate::crypto::Encryption::off(),
            schedules: Default::default(),
            default_limits: Default::default(),
            read_connections: 1,
        })
        .await
        .unwrap();
        let config = &loaded.config;
        let parts = Parts {
            store: store.clone(),
            upstream: crate::upstream::Upstream::new(config.proxy.request_timeout.0).unwrap(),
            auth_log: Arc::new(AuthLog::open(&loaded.log_dir).unwrap()),
            registry: Arc::new(Registry::from_config(&config.providers)),
            clock: Arc::new(move || {
                DateTime::from_timestamp(read.load(Ordering::SeqCst), 0).unwrap()
            }),
            settings: Settings::from_config(config),
            notifier: crate::notify::Notifier::none(),
            refresher: None,
        };
        let path = RequestPath::classifying_with(parts, test_classify);
        for key in keys {
            let new = NewCredential {
                provider: provider.into(),
                kind: CredentialKind::ApiKey,
                token: Some(crate::crypto::Secret::new(*key)),
                refresh_token: None,
                client_secret: None,
                extra: OauthExtra::default(),
                priority: 100,
                label: Some(key.to_string()),
                limit: None,
                used: 0,
                disabled: false,
                expires_at: None,
            };
            store.add(&new, "api", "test", t0()).await.unwrap();
        }
        Harness {
            path,
            store,
            upstream,
            clock,
            _dir: dir,
        }
    }

    /// A request to `provider` through the loop, with the test classifier.
    async fn forward(&self, provider: &str) -> Result<Forwarded, PathError> {
        let (path, body) = match provider {
            "openai" => (
                "/chat/completions",
                r#"{"model": "gpt-4o", "max_tokens": 10}"#,
            ),
            "claude" => ("/v1/messages", r#"{"model": "claude-x", "max_tokens": 10}"#),
            _ => (
                "/models/gemini-x:generateContent",
                r#"{"generationConfig": {"maxOutputTokens": 10}}"#,
            ),
        };
        let call = Call {
            provider: self.path.registry().get(provider).unwrap().clone(),
            path: path.into(),
            peek: Peek::read(body.as_bytes()).unwrap(),
            raw: Bytes::from_static(body.as_bytes()),
            stream: false,
            pass_headers: Vec::new(),
        };
        self.path.clone().forward(call).await
    }

    /// A request answered with the provider's answer: its status and body.
    async fn request(&self, provider: &str) -> (StatusCode, String) {
        match self.forward(provider).await {
            Ok(Forwarded {
                status,
                body: AnswerBody::Whole(body),
                ..
            }) => (status, String::from_utf8(body.to_vec()).unwrap()),
            Ok(_) => panic!("{provider}: a streamed answer to a request not streamed"),
            Err(e) => panic!("{provider}: {e}"),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.path.now()
    }

    /// Each credential's label, status and reserved tokens, once the ledger settled.
    async fn credentials(&self) -> Vec<(String, Status, u64)> {
        let page = self
            .store
            .list(&ListFilter::default(), self.now())
            .await
            .unwrap();
        page.rows
            .into_iter()
            .map(|r| (r.label.unwrap_or_default(), r.status, r.reserved))
            .collect()
    }

    fn advance_to(&self, at: DateTime<Utc>) {
        self.clock.store(at.timestamp(), Ordering::SeqCst);
    }
}

const FORMATS: [(&str, u16, &str); 3] = [
    (
        "claude",
        529,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ),
    (
        "openai",
        503,
        r#"{"error":{"message":"The engine is currently overloaded","type":"server_error"}}"#,
    ),
    (
        "gemini",
        503,
        r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
    ),
];

/// Overloaded on every key: one other key tried, the provider's answer back as it came, and
/// no key marked, whatever the number of keys and attempts.
#[tokio::test]
async fn an_overload_tries_one_other_key_and_marks_none() {
    for (provider, status, body) in FORMATS {
        // (keys, max_attempts, upstream calls expected)
        for (keys, attempts, calls) in [(1, 3, 1), (3, 1, 1), (2, 3, 2), (3, 3, 2), (5, 10, 2)] {
            let names: Vec<String> = (0..keys).map(|k| format!("{provider}-key-{k}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let h = Harness::new(provider, &names, attempts).await;
            for key in &names {
                h.upstream
                    .answer(key, status, vec![("request-id", "req_1".into())], body);
            }
            let what = format!("{provider}, {keys} keys, {attempts} attempts");
            let (got, text) = h.request(provider).await;
            assert_eq!(got.as_u16(), status, "{what}: {text}");
            assert_eq!(text, body, "{what}: the provider's answer as it came");
            assert_eq!(h.upstream.calls().len(), calls, "{what}");
            for (label, st, reserved) in h.credentials().await {
                assert_eq!((st, reserved), (Status::Active, 0), "{what}: {label}");
            }
            // The next request is not turned away by us: it reaches the provider again.
            let (again, _) = h.request(provider).await;
            assert_eq!(again.as_u16(), status, "{what}");
            assert_eq!(h.upstream.calls().len(), 2 * calls, "{what}");
            h.store.close().await;
        }
    }
}

/// An overload on the first key and an answer on the second: the client gets the answer.
/// A rate limit before the overloads still marks its own key and does not count as one.
#[tokio::test]
async fn an_overload_then_another_answer() {
    for (provider, status, body) in FORMATS {
        let h = Harness::new(provider, &["a", "b", "c"], 3).await;
        h.upstream.answer("a", status, Vec::new(), body);
        let (got, _) = h.request(provider).await;
        assert_eq!(got, StatusCode::OK, "{provider}");
        assert_eq!(h.upstream.calls(), ["a", "b"], "{provider}");
        h.store.close().await;

        let h = Harness::new(provider, &["a", "b", "c"], 3).await;
        h.upstream
            .answer("a", 429, vec![("retry-after", "30".into())], "{}");
        h.upstream.answer("b", status, Vec::new(), body);
        h.upstream.answer("c", status, Vec::new(), body);
        let (got, text) = h.request(provider).await;
        assert_eq!((got.as_u16(), text.as_str()), (status, body), "{provider}");
        assert_eq!(h.upstream.calls(), ["a", "b", "c"], "{provider}");
        let statuses: Vec<(String, Status)> = h
            .credentials()
            .await
            .into_iter()
            .map(|(l, s, _)| (l, s))
            .collect();
        assert_eq!(
            statuses,
            [
                ("a".to_string(), Status::Cooldown),
                ("b".to_string(), Status::Active),
                ("c".to_string(), Status::Active)
            ],
            "{provider}"
        );
        h.store.close().await;
    }
}

/// A region block: one call, no mark, our error naming the provider and the reason.
#[tokio::test]
async fn a_region_block_answers_at_once_and_marks_none() {
    for (provider, _, _) in FORMATS {
        for keys in [1, 3] {
            let names: Vec<String> = (0..keys).map(|k| format!("k{k}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let h = Harness::new(provider, &names, 3).await;
            for key in &names {
                h.upstream.answer(
                    key,
                    451,
                    Vec::new(),
                    r#"{"error":{"message":"unsupported_country_region_territory"}}"#,
                );
            }
            // The HTTP edge answers it 502 `provider_location_refused` with this message
            // (`http::error`'s tests).
            let refused = h.forward(provider).await;
            let Err(e @ PathError::LocationRefused { .. }) = refused else {
                panic!("{provider}: not refused");
            };
            let message = e.to_string();
            assert!(
                message.contains(provider) && message.contains("not served in this region"),
                "{message}"
            );
            assert_eq!(h.upstream.calls().len(), 1, "{provider} {keys}");
            for (label, st, reserved) in h.credentials().await {
                assert_eq!((st, reserved), (Status::Active, 0), "{provider}: {label}");
            }
            h.store.close().await;
        }
    }
}

/// Exhausted until a date: marked until it (the next key answers meanwhile), and back in
/// rotation from that date on, for the shortest wait, a day and a month.
#[tokio::test]
async fn an_exhausted_key_comes_back_at_its_date() {
    for (provider, _, _) in FORMATS {
        for wait in [60, 86_400, 31 * 86_400] {
            let h = Harness::new(provider, &["a", "b"], 3).await;
            let until = t0() + secs(wait);
            h.upstream.answer(
                "a",
                400,
                vec![("x-test-until", crate::domain::rfc3339(until))],
                "{}",
            );
            let (got, _) = h.request(provider).await;
            assert_eq!(got, StatusCode::OK, "{provider} {wait}");
            assert_eq!(h.upstream.calls(), ["a", "b"]);
            let row = |label: &'static str| {
                let (store, now) = (h.store.clone(), h.now());
                async move {
                    let page = store.list(&ListFilter::default(), now).await.unwrap();
                    page.rows
                        .into_iter()
                        .find(|r| r.label.as_deref() == Some(label))
                        .unwrap()
                }
            };
            let a = row("a").await;
            assert_eq!(
                (a.status, a.exhausted_until),
                (Status::Exhausted, Some(until))
            );
            // Until the date, every request goes to b.
            h.upstream.answer("a", 200, Vec::new(), "{}");
            h.advance_to(until - secs(1));
            for _ in 0..3 {
                assert_eq!(h.request(provider).await.0, StatusCode::OK);
            }
            assert_eq!(h.upstream.calls()[2..], ["b", "b", "b"]);
            // From the date on, a is back in the rotation.
            h.advance_to(until);
            assert_eq!(row("a").await.status, Status::Active);
            for _ in 0..2 {
                assert_eq!(h.request(provider).await.0, StatusCode::OK);
            }
            let last: Vec<String> = h.upstream.calls()[5..].to_vec();
            assert!(
                last.contains(&"a".to_string()),
                "{provider} {wait}: {last:?}"
            );
            h.store.close().await;
        }
    }
}
