//! What a provider's error answer means for the credential that got it: one table per format,
//! read over the parsed answer, never over its text. A row matches on the status, then the
//! error's type (Gemini: its status) and code, then a structured reason (Gemini's
//! `google.rpc.ErrorInfo`), and only last on a fixed sentence of the provider's, compared with
//! the whole message (or a fixed start whose rest is read strictly). An error can quote the
//! client's request back (an unknown field's name, a value, part of a message: Anthropic's
//! `<field>: Extra inputs are not permitted`, Gemini's `Unknown name "<field>"`), so a word
//! found anywhere in its text says nothing about the credential: a client that could mark a
//! credential by writing the right words could take a whole pool out of service.
//!
//! Also the waits a provider names (`Retry-After`, Gemini's `RetryInfo`, OpenAI's and
//! Anthropic's reset headers), each read by its own function and clamped to a day
//! ([`MAX_RETRY_AFTER`]); without one, [`DEFAULT_RATE_LIMIT_COOLDOWN`].
//!
//! Each row names the provider's documentation page or the public bug report its answer was
//! taken from, so a row can be checked against its source.

use super::Format;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Utc};
use serde_json::{Map, Value};
use std::time::Duration;

/// What an upstream error answer means, read from its structure: whose fault it is, and so
/// what happens to the credential that got it and whether another is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The client's own request (400, 404, 413, 422, a request too large for any key…): pass
    /// the answer on, mark nothing, try no other credential.
    ClientError,
    /// The credential is rejected (wrong, revoked, disabled): marked invalid.
    Invalid(String),
    /// The credential is out of credit or quota: marked exhausted until `until` when the
    /// provider names a date, else until the next reset.
    Exhausted {
        reason: String,
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The credential is rate-limited: it cools down for `wait` (what the provider named,
    /// else a default), and the next one is tried.
    RateLimited { wait: Duration, reason: String },
    /// The provider itself is overloaded or failing (every key would get the same): nothing
    /// is marked; another credential is tried at most once, then the provider's answer goes
    /// back.
    Overloaded(String),
    /// The provider refuses where this server runs (a region block), not the key: nothing is
    /// marked, no other credential is tried, and the client is told what happened.
    Location(String),
}

/// The longest cooldown a provider's named wait (or a lease report's `retry_after`) can
/// impose on a credential: a day. A longer one is taken as a day.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Cooldown after a 429 that names no wait (the README's documented default).
pub const DEFAULT_RATE_LIMIT_COOLDOWN: Duration = Duration::from_secs(30);
/// The furthest an "exhausted until" date of a provider's is believed: Anthropic's spend limits
/// are monthly, so a date further than a month and a day away is taken as that far.
pub const MAX_EXHAUSTED_UNTIL: TimeDelta = TimeDelta::days(32);

/// What an error answer (status, headers, body) means for the credential, read now.
pub fn classify(format: Format, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    classify_at(format, status, headers, body, Utc::now())
}

/// [`classify`] at `now` (a wait named as a date is counted from it).
pub fn classify_at(
    format: Format,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> Verdict {
    classify_answer(format, status, Waits::Headers(headers), body, now)
}

/// What a lease holder's report of an error answer means: the answer read as
/// [`classify_at`] reads the proxy's own, its `Retry-After` given in seconds (past
/// [`MAX_RETRY_AFTER`] it counts as that).
pub fn classify_report(
    format: Format,
    status: StatusCode,
    retry_after: Option<u64>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Verdict {
    classify_answer(format, status, Waits::Reported(retry_after), body, now)
}

/// Where an error answer names its waits.
#[derive(Clone, Copy)]
enum Waits<'a> {
    /// The headers it came with (`Retry-After`, the formats' reset headers).
    Headers(&'a HeaderMap),
    /// A lease holder's report: the `Retry-After` seconds it gave, if any.
    Reported(Option<u64>),
}

fn classify_answer(
    format: Format,
    status: StatusCode,
    waits: Waits<'_>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Verdict {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let parsed = Parsed::read(format, &json);
    let code = status.as_u16();
    let table = match format {
        Format::Openai => OPENAI,
        Format::Anthropic => ANTHROPIC,
        Format::Gemini => GEMINI,
        Format::Kiro => STATUS_ONLY,
    };
    let Some(row) = table.iter().find(|row| row.matches(code, &parsed)) else {
        return Verdict::ClientError;
    };
    let reason = |what: &str| format!("{what} (HTTP {code} from the provider)");
    match row.then {
        Then::Client => Verdict::ClientError,
        Then::Invalid(what) => Verdict::Invalid(reason(what)),
        Then::Exhausted(what) => Verdict::Exhausted {
            reason: reason(what),
            until: None,
        },
        Then::ExhaustedUntil(what) => Verdict::Exhausted {
            reason: reason(what),
            until: parsed
                .message
                .and_then(anthropic_regain)
                .and_then(|until| until.map(|u| u.and_utc()))
                .and_then(|until| believable_until(until, now)),
        },
        Then::RateLimited(what) => Verdict::RateLimited {
            wait: named_wait(format, waits, &json, parsed.kind, now)
                .unwrap_or(DEFAULT_RATE_LIMIT_COOLDOWN),
            reason: reason(what),
        },
        Then::Overloaded(what) => Verdict::Overloaded(reason(what)),
        Then::Location(what) => Verdict::Location(reason(what)),
    }
}

/// What the tables read of an error answer: each part only where its format puts it, and only
/// when it is a string.
#[derive(Debug, Default)]
struct Parsed<'a> {
    /// OpenAI's and Anthropic's `error.type`, Gemini's `error.status`.
    kind: Option<&'a str>,
    /// OpenAI's `error.code`.
    code: Option<&'a str>,
    /// `error.message`.
    message: Option<&'a str>,
    /// Gemini: the `reason` of each `google.rpc.ErrorInfo` of domain `googleapis.com` in
    /// `error.details`.
    reasons: Vec<&'a str>,
}

const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";

impl<'a> Parsed<'a> {
    fn read(format: Format, json: &'a Value) -> Parsed<'a> {
        let Some(error) = error_object(format, json) else {
            return Parsed::default();
        };
        let text = |key: &str| error.get(key).and_then(Value::as_str);
        match format {
            Format::Openai | Format::Kiro => Parsed {
                kind: text("type"),
                code: text("code"),
                message: text("message"),
                reasons: Vec::new(),
            },
            Format::Anthropic => Parsed {
                kind: text("type"),
                code: None,
                message: text("message"),
                reasons: Vec::new(),
            },
            Format::Gemini => Parsed {
                kind: text("status"),
                code: None,
                message: text("message"),
                reasons: details(error)
                    .filter(|d| {
                        d.get("@type").and_then(Value::as_str) == Some(ERROR_INFO)
                            && d.get("domain").and_then(Value::as_str) == Some("googleapis.com")
                    })
                    .filter_map(|d| d.get("reason").and_then(Value::as_str))
                    .collect(),
            },
        }
    }
}

/// The error object of an answer, where each format puts it. OpenAI's `{"error": {…}}`, or the
/// top level when it says `"object": "error"` (Mistral); Anthropic's `{"type": "error",
/// "error": {…}}` (its region block comes without the outer `type`); Gemini's
/// `{"error": {…}}`, also as the one member of an array (a `streamGenerateContent` answer
/// without `alt=sse`).
fn error_object(format: Format, json: &Value) -> Option<&Map<String, Value>> {
    let json = match (format, json) {
        (Format::Gemini, Value::Array(items)) => items.first()?,
        _ => json,
    };
    if let Some(error) = json.get("error").and_then(Value::as_object) {
        return Some(error);
    }
    match format {
        Format::Openai if json.get("object").and_then(Value::as_str) == Some("error") => {
            json.as_object()
        }
        _ => None,
    }
}

/// The objects in a Gemini error's `details`.
fn details(error: &Map<String, Value>) -> impl Iterator<Item = &Map<String, Value>> {
    error
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

/// One row of a format's table: what it matches, and what it means. The first row that
/// matches decides; a table ends with rows by status alone.
#[derive(Clone, Copy)]
struct Row {
    /// The statuses it applies to, both ends included.
    status: (u16, u16),
    /// The error's type (Gemini: its status); `None` for any.
    kind: Option<&'static str>,
    /// OpenAI's `error.code`; `None` for any.
    code: Option<&'static str>,
    /// A Gemini `google.rpc.ErrorInfo` reason; `None` for any.
    reason: Option<&'static str>,
    message: Message,
    then: Then,
}

/// How a row reads the error's message.
#[derive(Clone, Copy)]
enum Message {
    Any,
    /// The whole message is this sentence of the provider's.
    Whole(&'static str),
    /// The message passes this strict reading (a fixed start and a rest read field by field).
    Reads(fn(&str) -> bool),
}

/// What a row means. The text says what happened to the credential, for its status reason
/// and the auth log; it never repeats the provider's message, which may hold the client's words.
#[derive(Clone, Copy)]
enum Then {
    Client,
    Invalid(&'static str),
    Exhausted(&'static str),
    /// Exhausted until the date Anthropic's message names, when it names one.
    ExhaustedUntil(&'static str),
    RateLimited(&'static str),
    Overloaded(&'static str),
    Location(&'static str),
}

/// A row that matches any answer, to build the others from.
const ANY: Row = Row {
    status: (0, u16::MAX),
    kind: None,
    code: None,
    reason: None,
    message: Message::Any,
    then: Then::Client,
};

const fn status(code: u16, then: Then) -> Row {
    Row {
        status: (code, code),
        then,
        ..ANY
    }
}

const fn statuses(from: u16, to: u16, then: Then) -> Row {
    Row {
        status: (from, to),
        then,
        ..ANY
    }
}

impl Row {
    fn matches(&self, status: u16, answer: &Parsed) -> bool {
        (self.status.0..=self.status.1).contains(&status)
            && self.kind.is_none_or(|k| answer.kind == Some(k))
            && self.code.is_none_or(|c| answer.code == Some(c))
            && self.reason.is_none_or(|r| answer.reasons.contains(&r))
            && match self.message {
                Message::Any => true,
                Message::Whole(sentence) => answer.message == Some(sentence),
                Message::Reads(read) => answer.message.is_some_and(read),
            }
    }
}

const OVERLOADED: Then = Then::Overloaded("the provider is overloaded or failing");
const RATE_LIMITED: Then = Then::RateLimited("rate-limited");
const REJECTED: Then = Then::Invalid("rejected the credential");
const OUT_OF_CREDIT: Then = Then::Exhausted("out of credit");

/// OpenAI and the OpenAI-format providers (Groq, DeepSeek, Mistral, Copilot, custom ones).
static OPENAI: &[Row] = &[
    // https://developers.openai.com/docs/guides/error-codes: "401 Invalid Authentication /
    // Incorrect API key provided / You must be a member of an organization"; restricted keys
    // missing a scope get 401 too (openai/codex#31506). Groq, DeepSeek and Mistral answer a
    // wrong key with 401 as well (console.groq.com/docs/errors,
    // api-docs.deepseek.com/quick_start/error_codes, mistralai/client-python#170).
    status(401, REJECTED),
    // DeepSeek "402 - Insufficient Balance" (api-docs.deepseek.com/quick_start/error_codes).
    status(402, OUT_OF_CREDIT),
    // OpenAI "403 Country, region, or territory not supported": code
    // unsupported_country_region_territory, type request_forbidden
    // (home-assistant/core#120072). Where this server runs, not the key.
    Row {
        status: (403, 403),
        code: Some("unsupported_country_region_territory"),
        then: Then::Location("the provider does not serve the region this server runs in"),
        ..ANY
    },
    // Other 403s are about what the request asked for: "Project `proj_…` does not have access
    // to model `gpt-4o-mini`", type invalid_request_error, code model_not_found
    // (cursor/cursor#2953, Aider-AI/aider#1903); Groq's "permission restrictions"
    // (console.groq.com/docs/errors). A key's own failure is a 401.
    status(403, Then::Client),
    // "429 You exceeded your current quota, please check your plan and billing details":
    // type and code insufficient_quota (developers.openai.com/docs/guides/error-codes).
    Row {
        status: (429, 429),
        kind: Some("insufficient_quota"),
        then: Then::Exhausted("quota exceeded"),
        ..ANY
    },
    Row {
        status: (429, 429),
        code: Some("insufficient_quota"),
        then: Then::Exhausted("quota exceeded"),
        ..ANY
    },
    // "Request too large for gpt-4o in organization org-… on tokens per min (TPM): Limit
    // 30000, Requested 36278. The input or output tokens must be reduced…", type tokens, code
    // rate_limit_exceeded (Aider-AI/aider#1880, TheR1D/shell_gpt#653): the request can never
    // fit the limit, on any key. (Groq answers the same with 413, ClientError below.)
    Row {
        status: (429, 429),
        code: Some("rate_limit_exceeded"),
        message: Message::Reads(too_large_for_limit),
        then: Then::Client,
        ..ANY
    },
    // Mistral's "Service tier capacity exceeded for this model." (continuedev/continue#6185):
    // the model is out of capacity for every key.
    Row {
        status: (429, 429),
        message: Message::Whole("Service tier capacity exceeded for this model."),
        then: OVERLOADED,
        ..ANY
    },
    // "429 Rate limit reached for requests / tokens" (developers.openai.com/docs/guides/
    // error-codes); Groq's type tokens/requests, code rate_limit_exceeded
    // (console.groq.com/docs/rate-limits); DeepSeek "429 - Rate Limit Reached"; Mistral
    // `{"message":"Requests rate limit exceeded"}` (dnakov/anon-kode#53).
    status(429, RATE_LIMITED),
    // Groq's "498 Flex Tier Capacity Exceeded", error capacity_exceeded
    // (console.groq.com/docs/flex-processing).
    status(498, OVERLOADED),
    // "500 The server had an error", "503 The engine is currently overloaded" / "Slow Down"
    // (developers.openai.com/docs/guides/error-codes); DeepSeek "500 - Server Error",
    // "503 - Server Overloaded"; Groq 500/502/503 (console.groq.com/docs/errors).
    statuses(500, 599, OVERLOADED),
    // Everything else is the request's own: 400, 404 model_not_found, 413 (Groq's "Request
    // too large for model" on its TPM limit, continuedev/continue#10218), 422 (DeepSeek's
    // "Invalid Parameters", Mistral's extra_forbidden).
    statuses(0, u16::MAX, Then::Client),
];

/// Anthropic (https://docs.claude.com/en/api/errors: 400 invalid_request_error,
/// 401 authentication_error, 402 billing_error, 403 permission_error, 404 not_found_error,
/// 413 request_too_large, 429 rate_limit_error, 500 api_error, 504 timeout_error,
/// 529 overloaded_error).
static ANTHROPIC: &[Row] = &[
    // "Your credit balance is too low to access the Anthropic API. Please go to Plans &
    // Billing to upgrade or purchase credits." (anthropics/claude-quickstarts#229,
    // anthropics/claude-code#4684). The whole message: a 400 starts with the client's words
    // ("<field>: Extra inputs are not permitted", Aider-AI/aider#3367), so a start proves
    // nothing.
    Row {
        status: (400, 400),
        kind: Some("invalid_request_error"),
        message: Message::Whole(
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        ),
        then: OUT_OF_CREDIT,
        ..ANY
    },
    // "You have reached your specified API usage limits. You will regain access on
    // 2026-04-01 at 00:00 UTC." (anthropics/claude-code#2127, #38035,
    // continuedev/continue#11934): exhausted until that date.
    Row {
        status: (400, 400),
        kind: Some("invalid_request_error"),
        message: Message::Reads(is_usage_limit),
        then: Then::ExhaustedUntil("reached its API usage limit"),
        ..ANY
    },
    // "This organization has been disabled." (anthropics/claude-code#19028, #54311).
    Row {
        status: (400, 400),
        kind: Some("invalid_request_error"),
        message: Message::Whole("This organization has been disabled."),
        then: Then::Invalid("its organization is disabled"),
        ..ANY
    },
    status(400, Then::Client),
    // 401 authentication_error: "invalid x-api-key".
    status(401, REJECTED),
    // 402 billing_error: "There's an issue with your billing or payment information".
    status(402, OUT_OF_CREDIT),
    // A region block comes from the edge as `{"error":{"type":"forbidden","message":"Request
    // not allowed"}}` (anthropics/claude-code#1613, enricoros/big-AGI#485,
    // anthropics/anthropic-sdk-typescript#457).
    Row {
        status: (403, 403),
        kind: Some("forbidden"),
        message: Message::Whole("Request not allowed"),
        then: Then::Location("the provider does not serve the region this server runs in"),
        ..ANY
    },
    // 403 permission_error: "Your API key does not have permission to use the specified
    // resource" — the resource the request names (a model, a beta, a file). A key's own
    // failure is a 401.
    status(403, Then::Client),
    // 429 rate_limit_error.
    status(429, RATE_LIMITED),
    // 500 api_error, 504 timeout_error, 529 overloaded_error: the provider's state.
    statuses(500, 599, OVERLOADED),
    // 404 not_found_error, 413 request_too_large and the rest: the request's own.
    statuses(0, u16::MAX, Then::Client),
];

/// Gemini (https://ai.google.dev/gemini-api/docs/troubleshooting: 400 INVALID_ARGUMENT,
/// 400 FAILED_PRECONDITION, 403 PERMISSION_DENIED, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED,
/// 500 INTERNAL, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED). A key's state comes as a
/// `google.rpc.ErrorInfo` reason (googleapis/googleapis google/api/error_reason.proto).
static GEMINI: &[Row] = &[
    // "API key not valid. Please pass a valid API key." and "API key expired. Please renew
    // the API key.", both 400 INVALID_ARGUMENT with reason API_KEY_INVALID
    // (continuedev/continue#11336, google-gemini/gemini-cli#4430).
    key_reason("API_KEY_INVALID", "the API key is invalid"),
    key_reason("API_KEY_EXPIRED", "the API key expired"),
    // "Generative Language API has not been used in project … or it is disabled", 403
    // PERMISSION_DENIED, reason SERVICE_DISABLED
    // (google-gemini/deprecated-generative-ai-python#10, google/generative-ai-docs#74).
    key_reason("SERVICE_DISABLED", "the API is disabled for its project"),
    // "Permission denied: Consumer 'api_key:…' has been suspended.", 403, reason
    // CONSUMER_SUSPENDED (google/generative-ai-docs#356).
    key_reason("CONSUMER_SUSPENDED", "its project is suspended"),
    // "Permission denied on resource project …", 403, reason CONSUMER_INVALID
    // (gemini-cli-extensions/nanobanana#16).
    key_reason("CONSUMER_INVALID", "its project is invalid"),
    // The key's restrictions exclude this API or this server (error_reason.proto).
    key_reason(
        "API_KEY_SERVICE_BLOCKED",
        "the API key may not call this API",
    ),
    key_reason(
        "API_KEY_IP_ADDRESS_BLOCKED",
        "the API key may not be used from this address",
    ),
    key_reason(
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "the API key is restricted to other referrers",
    ),
    key_reason(
        "API_KEY_ANDROID_APP_BLOCKED",
        "the API key is restricted to an Android app",
    ),
    key_reason(
        "API_KEY_IOS_APP_BLOCKED",
        "the API key is restricted to an iOS app",
    ),
    key_reason("BILLING_DISABLED", "billing is disabled for its project"),
    // "User location is not supported for the API use.", 400 FAILED_PRECONDITION
    // (google-gemini/gemini-cli#24641), and "Gemini API free tier is not available in your
    // country. Please enable billing on your project in Google AI Studio."
    // (ai.google.dev/gemini-api/docs/troubleshooting): where this server runs.
    Row {
        status: (400, 400),
        kind: Some("FAILED_PRECONDITION"),
        message: Message::Whole("User location is not supported for the API use."),
        then: Then::Location("the provider does not serve the region this server runs in"),
        ..ANY
    },
    Row {
        status: (400, 400),
        kind: Some("FAILED_PRECONDITION"),
        message: Message::Whole(
            "Gemini API free tier is not available in your country. Please enable billing on your project in Google AI Studio.",
        ),
        then: Then::Location(
            "the provider's free tier does not serve the region this server runs in",
        ),
        ..ANY
    },
    // Any other 400 is the request's: "Invalid JSON payload received. Unknown name \"…\":
    // Cannot find field." quotes the client's field.
    status(400, Then::Client),
    status(401, REJECTED),
    status(402, OUT_OF_CREDIT),
    // 403s without a reason: "Your project has been denied access. Please contact support."
    // (gethouston/houston#1220, poenl/gemini-api#8) and "Your API key was reported as leaked.
    // Please use another API key." are the key's.
    Row {
        status: (403, 403),
        message: Message::Whole("Your project has been denied access. Please contact support."),
        then: Then::Invalid("its project was denied access"),
        ..ANY
    },
    Row {
        status: (403, 403),
        message: Message::Whole("Your API key was reported as leaked. Please use another API key."),
        then: Then::Invalid("the API key was reported as leaked"),
        ..ANY
    },
    // Other 403s are about what the request names: "You do not have permission to access the
    // File … or it may not exist", a tuned model (ai.google.dev/gemini-api/docs/
    // troubleshooting).
    status(403, Then::Client),
    // 429 RESOURCE_EXHAUSTED, with google.rpc.QuotaFailure and google.rpc.RetryInfo
    // (browserbase/mcp-server-browserbase#129). Even a per-day quota (quotaId
    // "…PerDay…") comes with a RetryInfo of seconds (diegosouzapw/OmniRoute#9504), and every
    // quota is per model: a day-long mark for one model's quota would take the key from all
    // of them, so the wait named is the wait taken.
    status(429, RATE_LIMITED),
    // 500 INTERNAL, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED.
    statuses(500, 599, OVERLOADED),
    statuses(0, u16::MAX, Then::Client),
];

/// A Gemini key's state named by an ErrorInfo reason, with the status it comes with.
const fn key_reason(reason: &'static str, what: &'static str) -> Row {
    Row {
        status: (400, 403),
        reason: Some(reason),
        then: Then::Invalid(what),
        ..ANY
    }
}

/// Formats the proxy does not speak (Kiro, through leases), whose reports carry a status
/// only: what the status alone says.
static STATUS_ONLY: &[Row] = &[
    status(401, REJECTED),
    status(402, OUT_OF_CREDIT),
    // AWS answers an expired or wrong token with 403 (ExpiredTokenException,
    // UnrecognizedClientException: docs.aws.amazon.com CommonErrors).
    status(403, REJECTED),
    status(429, RATE_LIMITED),
    statuses(500, 599, OVERLOADED),
    statuses(0, u16::MAX, Then::Client),
];

/// OpenAI's "Request too large for <model> … : Limit <n>, Requested <m>. …" with more
/// requested than the limit: the start is fixed, and the numbers are the last "Limit …,
/// Requested …" in the message (the model name before them is the client's word).
fn too_large_for_limit(message: &str) -> bool {
    let Some(rest) = message.strip_prefix("Request too large for ") else {
        return false;
    };
    let Some(at) = rest.rfind("Limit ") else {
        return false;
    };
    let rest = &rest[at + "Limit ".len()..];
    let (limit, rest) = leading_number(rest);
    let Some(rest) = rest.strip_prefix(", Requested ") else {
        return false;
    };
    let (requested, _) = leading_number(rest);
    matches!((limit, requested), (Some(l), Some(r)) if r > l)
}

/// The whole number `text` starts with (a few digits: a longer run is no number of this
/// kind), and what follows it.
fn leading_number(text: &str) -> (Option<u64>, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = (1..=20)
        .contains(&end)
        .then(|| text[..end].parse().ok())
        .flatten();
    (number, &text[end..])
}

const USAGE_LIMITS: &str = "You have reached your specified API usage limits.";
const REGAIN: &str = " You will regain access on ";

fn is_usage_limit(message: &str) -> bool {
    anthropic_regain(message).is_some()
}

/// Anthropic's usage-limit message, read strictly: the fixed sentence alone (`Some(None)`), or
/// followed by exactly " You will regain access on YYYY-MM-DD at HH:MM UTC." (`Some(Some(date
/// and time in UTC))`). Anything else, even the sentence followed by other words, is not it.
pub fn anthropic_regain(message: &str) -> Option<Option<NaiveDateTime>> {
    let rest = message.strip_prefix(USAGE_LIMITS)?;
    if rest.is_empty() {
        return Some(None);
    }
    let when = rest.strip_prefix(REGAIN)?.strip_suffix(" UTC.")?;
    let (date, time) = when.split_once(" at ")?;
    let digits_at = |s: &str, seps: &[usize], sep: u8| {
        s.bytes().enumerate().all(|(i, b)| {
            if seps.contains(&i) {
                b == sep
            } else {
                b.is_ascii_digit()
            }
        })
    };
    if date.len() != 10 || time.len() != 5 || !digits_at(date, &[4, 7], b'-') {
        return None;
    }
    if !digits_at(time, &[2], b':') {
        return None;
    }
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let time = NaiveTime::parse_from_str(time, "%H:%M").ok()?;
    Some(Some(date.and_time(time)))
}

/// An "exhausted until" date as far as it is believed: `None` (until the next reset) when it
/// is not in the future, and at most [`MAX_EXHAUSTED_UNTIL`] away.
fn believable_until(until: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if until <= now {
        return None;
    }
    Some(until.min(now.checked_add_signed(MAX_EXHAUSTED_UNTIL).unwrap_or(until)))
}

/// The wait a rate-limited answer names, the way its format names it; `None` when it names
/// none (or only values that are not a wait).
fn named_wait(
    format: Format,
    waits: Waits<'_>,
    body: &Value,
    kind: Option<&str>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let headers = match waits {
        Waits::Headers(headers) => headers,
        Waits::Reported(secs) => {
            // A report carries no reset headers: the body (Gemini's `RetryInfo`), then the
            // seconds it gave.
            let reported = || secs.map(|s| clamp_wait(s as f64));
            return match format {
                Format::Gemini => gemini_retry_delay(body).or_else(reported),
                Format::Openai | Format::Anthropic | Format::Kiro => reported(),
            };
        }
    };
    match format {
        Format::Gemini => gemini_retry_delay(body).or_else(|| retry_after(headers, now)),
        Format::Openai => retry_after(headers, now).or_else(|| openai_reset(headers, kind)),
        Format::Anthropic => retry_after(headers, now).or_else(|| anthropic_reset(headers, now)),
        Format::Kiro => retry_after(headers, now),
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// `Retry-After` (RFC 9110 section 10.2.3): seconds (a fraction rounds up), or an HTTP date
/// (a past one is no wait). `None` when it is missing, negative, `NaN` or not a wait.
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = header(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0).then(|| clamp_wait(secs));
    }
    let at = http_date(value)?;
    Some(until(at, now))
}

/// An HTTP date in any of its three forms: IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"),
/// RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime ("Sun Nov  6 08:49:37 1994").
fn http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc2822(value) {
        return Some(at.with_timezone(&Utc));
    }
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(value, f).ok())
        .map(|at| at.and_utc())
}

/// The wait until `at`: none when it has passed, at most a day.
fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    let ms = at.signed_duration_since(now).num_milliseconds();
    clamp_wait(ms as f64 / 1000.0)
}

/// Gemini's `google.rpc.RetryInfo.retryDelay` in the error's `details` (a protobuf Duration
/// in JSON: "37s", "1.5s", "0.000001s"); the longest when there are several.
pub fn gemini_retry_delay(body: &Value) -> Option<Duration> {
    let error = error_object(Format::Gemini, body)?;
    details(error)
        .filter(|d| d.get("@type").and_then(Value::as_str) == Some(RETRY_INFO))
        .filter_map(|d| d.get("retryDelay")?.as_str())
        .filter_map(protobuf_duration)
        .max()
}

/// A protobuf Duration's JSON form: digits, an optional fraction of at most nine digits, and
/// `s`. Negative and malformed values are `None`; huge ones are a day.
fn protobuf_duration(value: &str) -> Option<Duration> {
    let number = value.strip_suffix('s')?;
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || fraction.len() > 9 || !digits(fraction) {
        return None;
    }
    if number.ends_with('.') {
        return None;
    }
    number.parse::<f64>().ok().map(clamp_wait)
}

/// OpenAI's `x-ratelimit-reset-requests` / `-tokens` (Go durations, "6m0s", "1s", "20ms"):
/// the reset of the limit the error names (its type is `requests` or `tokens`, as Groq's
/// are), else of the limits with none `remaining`, else of both; the longest of those.
pub fn openai_reset(headers: &HeaderMap, kind: Option<&str>) -> Option<Duration> {
    const LIMITS: [&str; 2] = ["requests", "tokens"];
    let reset = |limit: &&str| {
        header(headers, &format!("x-ratelimit-reset-{limit}"))
            .and_then(go_duration)
            .map(clamp_wait)
    };
    let spent =
        |limit: &&str| header(headers, &format!("x-ratelimit-remaining-{limit}")) == Some("0");
    let named: Vec<&str> = match kind {
        Some(k) if LIMITS.contains(&k) => vec![k],
        _ => LIMITS.iter().copied().filter(spent).collect(),
    };
    named
        .iter()
        .filter_map(reset)
        .max()
        .or_else(|| LIMITS.iter().filter_map(reset).max())
}

/// A Go `time.Duration` as it prints ("1h2m3.5s", "6m0s", "20ms", "0s", "0"), in seconds.
/// Negative or malformed values are `None`; huge ones are huge (the caller clamps).
pub fn go_duration(value: &str) -> Option<f64> {
    if value == "0" {
        return Some(0.0);
    }
    let mut rest = value;
    let mut total = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(end);
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return None;
        }
        let number: f64 = number.parse().ok()?;
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = after;
    }
    Some(total)
}

/// Anthropic's `anthropic-ratelimit-*-reset` (RFC 3339), when there is no `Retry-After`: the
/// latest reset of the limits with none `remaining`, else the latest of all.
pub fn anthropic_reset(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let mut spent = None;
    let mut any = None;
    for (name, value) in headers {
        let Some(limit) = name
            .as_str()
            .strip_prefix("anthropic-ratelimit-")
            .and_then(|n| n.strip_suffix("-reset"))
        else {
            continue;
        };
        let Some(at) = value
            .to_str()
            .ok()
            .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
            .map(|at| at.with_timezone(&Utc))
        else {
            continue;
        };
        any = any.max(Some(at));
        if header(headers, &format!("anthropic-ratelimit-{limit}-remaining")) == Some("0") {
            spent = spent.max(Some(at));
        }
    }
    spent.or(any).map(|at| until(at, now))
}

/// `secs` seconds (rounded up), at most [`MAX_RETRY_AFTER`]; never panics, whatever `secs` is
/// (`inf` and huge values are the maximum, `NaN` and negatives zero).
pub fn clamp_wait(secs: f64) -> Duration {
    let max = MAX_RETRY_AFTER.as_secs_f64();
    let secs = if secs.is_nan() {
        0.0
    } else {
        secs.clamp(0.0, max)
    };
    Duration::from_secs_f64(secs.ceil())
}

#[cfg(test)]
mod tests;
