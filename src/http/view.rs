//! The JSON representation of credentials and quotas (README, "Management API"). Built from rows
//! that never hold a secret, so no response can carry a token in clear. Each view borrows its
//! row and is serialized straight into the response body: a page of a list builds no
//! intermediate JSON values.

use crate::config::QuotaConfig;
use crate::domain::{CredentialRow, Status, rfc3339};
use crate::store::QuotaTotal;
use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

/// A time as the API shows it (RFC 3339, or null).
struct Time(Option<DateTime<Utc>>);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(t) => s.serialize_str(&rfc3339(t)),
            None => s.serialize_none(),
        }
    }
}

fn next_reset(quota: &QuotaConfig, row: &CredentialRow) -> Time {
    Time(
        quota
            .schedule(row.provider.as_str())
            .next_reset(row.period_start),
    )
}

/// A credential's counters.
#[derive(Serialize)]
pub struct Counters {
    limit: Option<u64>,
    used: u64,
    remaining: Option<u64>,
    reserved: u64,
    period_start: Time,
    next_reset: Time,
}

impl Counters {
    fn of(quota: &QuotaConfig, row: &CredentialRow) -> Counters {
        Counters {
            limit: row.limit,
            used: row.used,
            remaining: row.remaining(),
            reserved: row.reserved,
            period_start: Time(Some(row.period_start)),
            next_reset: next_reset(quota, row),
        }
    }
}

/// A credential as the API shows it.
#[derive(Serialize)]
pub struct Credential<'a> {
    id: &'a str,
    provider: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    label: Option<&'a str>,
    token_preview: &'a str,
    priority: i64,
    disabled: bool,
    quota: Counters,
    status: &'static str,
    status_reason: Option<&'a str>,
    expires_at: Time,
    cooldown_until: Time,
    exhausted_until: Time,
    last_used_at: Time,
    last_refresh_at: Time,
    source: &'a str,
    created_at: Time,
    updated_at: Time,
}

pub fn credential<'a>(quota: &QuotaConfig, row: &'a CredentialRow) -> Credential<'a> {
    Credential {
        id: row.id.as_str(),
        provider: row.provider.as_str(),
        kind: row.kind.as_str(),
        label: row.label.as_deref(),
        token_preview: &row.token_preview,
        priority: row.priority,
        disabled: row.status == Status::Disabled,
        quota: Counters::of(quota, row),
        status: row.status.as_str(),
        status_reason: row.status_reason.as_deref(),
        expires_at: Time(row.expires_at),
        cooldown_until: Time(row.cooldown_until),
        exhausted_until: Time(row.exhausted_until),
        last_used_at: Time(row.last_used_at),
        last_refresh_at: Time(row.last_refresh_at),
        source: &row.source,
        created_at: Time(Some(row.created_at)),
        updated_at: Time(Some(row.updated_at)),
    }
}

/// A page of credentials: `{"provider"?, "auths": [...], "next"?}`.
#[derive(Serialize)]
pub struct CredentialPage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    auths: Vec<Credential<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

pub fn credentials<'a>(
    quota: &QuotaConfig,
    provider: Option<&'a str>,
    rows: &'a [CredentialRow],
    next: Option<String>,
) -> CredentialPage<'a> {
    CredentialPage {
        provider,
        auths: rows.iter().map(|r| credential(quota, r)).collect(),
        next,
    }
}

/// One credential's line in the quota view.
#[derive(Serialize)]
pub struct QuotaLine<'a> {
    id: &'a str,
    #[serde(flatten)]
    counters: Counters,
}

/// `GET .../{provider}/quota`: the provider's total (over all its credentials), the default
/// limit its new credentials take, and a page of per-credential counters.
#[derive(Serialize)]
pub struct Quota<'a> {
    provider: &'a str,
    total: QuotaTotalView,
    /// The limit a credential added now takes when it names none (`null`: unlimited).
    default_limit: Option<u64>,
    credentials: Vec<QuotaLine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Serialize)]
struct QuotaTotalView {
    limit: Option<u64>,
    used: u64,
    remaining: Option<u64>,
}

pub fn quota<'a>(
    quota: &QuotaConfig,
    provider: &'a str,
    total: QuotaTotal,
    default_limit: Option<u64>,
    rows: &'a [CredentialRow],
    next: Option<String>,
) -> Quota<'a> {
    Quota {
        provider,
        total: QuotaTotalView {
            limit: total.limit,
            used: total.used,
            remaining: total.remaining,
        },
        default_limit,
        credentials: rows
            .iter()
            .map(|r| QuotaLine {
                id: r.id.as_str(),
                counters: Counters::of(quota, r),
            })
            .collect(),
        next,
    }
}
