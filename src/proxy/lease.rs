//! Leases: a credential's token handed to a client that calls the provider itself, reserved
//! through the same attempt loop as a proxied request, and settled by the client's report of
//! what it used, or released with the mark its reported error gives (read as the proxy reads
//! the answers it gets itself), or at its reservation when it expires unreported.

use super::attempts::{Attempts, Granted, mark_for};
use super::settle::Held;
use super::{PathError, RequestPath};
use crate::crypto::Secret;
use crate::domain::{CredentialId, ReservationId};
use crate::providers::wire::Usage;
use crate::providers::{Format, Provider};
use crate::quota::RequestTokens;
use crate::store::Unavailable;
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use std::sync::Arc;

/// How long a lease lasts before it is settled at its reservation.
const LEASE_MINUTES: i64 = 10;

/// A request for a lease.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseInput {
    provider: String,
    estimated_tokens: Option<RequestTokens>,
}

/// A lease handed out.
pub struct Lease {
    pub id: ReservationId,
    pub credential_id: CredentialId,
    pub provider: Arc<Provider>,
    pub token: Arc<Secret>,
    pub expires_at: DateTime<Utc>,
}

/// A lease holder's report: the tokens it used, or the error status its call got.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportInput {
    tokens_used: Option<RequestTokens>,
    input_tokens: Option<RequestTokens>,
    output_tokens: Option<RequestTokens>,
    error_status: Option<u16>,
    /// Seconds, as the provider's `Retry-After` said; past a day it counts as a day.
    retry_after: Option<u64>,
    /// The provider's error body as it came (text), read as the proxy reads the answers it
    /// gets itself: what it says about the credential (exhausted until a date, a region
    /// block, an overload) decides the mark, not the status alone.
    error_body: Option<String>,
}

/// What a report did to its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// Released after an error (its credential marked if the error was its own).
    Released,
    /// Settled with the tokens it reported.
    Settled { tokens_used: u64 },
}

impl RequestPath {
    /// Lease a credential of `input.provider`.
    #[tracing::instrument(level = "debug", name = "lease", skip_all, fields(provider = %input.provider, attempt = tracing::field::Empty, credential = tracing::field::Empty))]
    pub async fn lease(&self, input: LeaseInput) -> Result<Lease, PathError> {
        let provider = self
            .0
            .registry
            .get(&input.provider)
            .cloned()
            .ok_or(PathError::UnknownProvider(input.provider))?;
        if !provider.enabled {
            return Err(PathError::ProviderDisabled(provider.name.clone()));
        }
        let tokens = input
            .estimated_tokens
            .map_or(self.0.settings.default_reservation, RequestTokens::get);
        let expires_at = self.now() + Duration::minutes(LEASE_MINUTES);
        let mut attempts = Attempts::lease(self, &provider.name, tokens, expires_at);
        let Some(Granted { held, token }) = attempts.next().await? else {
            let (provider, why) = (provider.name.clone(), Unavailable::Unusable);
            return Err(PathError::Unavailable { provider, why });
        };
        let (id, credential_id) = held.keep();
        Ok(Lease {
            id,
            credential_id,
            provider,
            token,
            expires_at,
        })
    }

    /// Settle or release lease `lease_id` by its holder's report.
    #[tracing::instrument(level = "debug", name = "report", skip_all, fields(lease = lease_id.as_str()))]
    pub async fn report(
        &self,
        lease_id: &ReservationId,
        input: ReportInput,
    ) -> Result<Reported, PathError> {
        let Some((credential_id, provider)) = self.0.store.lease(lease_id).await? else {
            return Err(PathError::LeaseNotFound);
        };
        if input.error_body.is_some() && input.error_status.is_none() {
            return Err(PathError::InvalidReport(
                "error_body comes with the error_status it was answered with",
            ));
        }
        if let Some(status) = input.error_status {
            let status = StatusCode::from_u16(status)
                .map_err(|_| PathError::InvalidReport("error_status is not an HTTP status"))?;
            // From here the lease is released, even if reading the report were to fail.
            let held = Held::new(self, lease_id.clone(), credential_id, &provider);
            let format = self
                .0
                .registry
                .get(provider.as_str())
                .map_or(Format::Openai, |p| p.format);
            let body = input.error_body.as_deref().unwrap_or("").as_bytes();
            let now = self.now();
            let verdict = crate::providers::classify::classify_report(
                format,
                status,
                input.retry_after,
                body,
                now,
            );
            // The same verdicts as a proxied request's: only the credential's own failure
            // marks it; an overload, a region block or the client's own error marks nothing.
            held.release(mark_for(&verdict, now), " by a lease report")
                .await?;
            return Ok(Reported::Released);
        }
        let count = |t: Option<RequestTokens>| t.map_or(0, RequestTokens::get);
        let usage = match (input.tokens_used, input.input_tokens, input.output_tokens) {
            (Some(t), None, None) => Usage::reported(0, t.get()),
            (None, i, o) if i.is_some() || o.is_some() => Usage::reported(count(i), count(o)),
            _ => {
                return Err(PathError::InvalidReport(
                    "Report tokens_used (or input_tokens and output_tokens), or error_status",
                ));
            }
        };
        if !self
            .0
            .store
            .settle(lease_id, usage, false, self.now())
            .await?
        {
            return Err(PathError::LeaseNotFound);
        }
        Ok(Reported::Settled {
            tokens_used: usage.total(),
        })
    }
}
