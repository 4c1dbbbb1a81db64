//! The JSON representation of credentials and quotas (contract section 4). Built from rows
//! that never hold a secret, so no response can carry a token in clear.

use crate::config::QuotaConfig;
use crate::domain::{CredentialRow, Status, rfc3339};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::from(rfc3339(t))).unwrap_or(Value::Null)
}

fn next_reset(quota: &QuotaConfig, row: &CredentialRow) -> Value {
    time(quota.schedule(&row.provider).next_reset(row.period_start))
}

pub fn credential(quota: &QuotaConfig, row: &CredentialRow) -> Value {
    json!({
        "id": row.id,
        "provider": row.provider,
        "type": row.kind.as_str(),
        "label": row.label,
        "token_preview": row.token_preview,
        "priority": row.priority,
        "disabled": row.status == Status::Disabled,
        "quota": {
            "limit": row.limit,
            "used": row.used,
            "remaining": row.remaining(),
            "reserved": row.reserved,
            "period_start": rfc3339(row.period_start),
            "next_reset": next_reset(quota, row),
        },
        "status": row.status.as_str(),
        "status_reason": row.status_reason,
        "expires_at": time(row.expires_at),
        "cooldown_until": time(row.cooldown_until),
        "last_used_at": time(row.last_used_at),
        "last_refresh_at": time(row.last_refresh_at),
        "source": row.source,
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
    })
}

pub fn credentials(quota: &QuotaConfig, rows: &[CredentialRow]) -> Vec<Value> {
    rows.iter().map(|r| credential(quota, r)).collect()
}

/// `GET .../{provider}/quota`: per-credential counters and the provider's total. The total
/// limit is unlimited (null) as soon as one credential is.
pub fn quota(quota: &QuotaConfig, provider: &str, rows: &[CredentialRow]) -> Value {
    let used: u64 = rows.iter().fold(0u64, |acc, r| acc.saturating_add(r.used));
    let limit: Option<u64> = rows
        .iter()
        .map(|r| r.limit)
        .try_fold(0u64, |acc, l| l.map(|l| acc.saturating_add(l)));
    let remaining: Option<u64> = rows
        .iter()
        .map(|r| r.remaining())
        .try_fold(0u64, |acc, l| l.map(|l| acc.saturating_add(l)));
    let credentials: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "limit": r.limit,
                "used": r.used,
                "remaining": r.remaining(),
                "reserved": r.reserved,
                "period_start": rfc3339(r.period_start),
                "next_reset": next_reset(quota, r),
            })
        })
        .collect();
    json!({
        "provider": provider,
        "total": { "limit": limit, "used": used, "remaining": remaining },
        "credentials": credentials,
    })
}
