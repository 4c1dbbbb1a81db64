//! Leases: a credential's token handed to a client that calls the provider itself, reserved
//! through the same attempt loop as a proxied request, and settled by the client's report of
//! what it used, or released with the mark its reported error gives (read as the proxy reads
//! the answers it gets itself), or at its reservation when it expires unreported. Until then
//! its holder may renew it: the lease lasts its length again, and the holder gets the
//! credential's current token (a new one after a refresh).

use super::attempts::{Attempts, Granted, mark_for};
use super::settle::Held;
use super::{PathError, RequestPath};
use crate::crypto::Secret;
use crate::domain::{CredentialId, ReservationId};
use crate::providers::wire::Usage;
use crate::providers::{Format, Provider};
use crate::quota::RequestTokens;
use crate::store::{Renewal, Unavailable};
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

/// A lease handed out, or renewed.
pub struct Lease {
    pub id: ReservationId,
    pub credential_id: CredentialId,
    pub provider: Arc<Provider>,
    pub token: Arc<Secret>,
    /// Where the holder sends its calls: the provider's base URL, or (copilot) the API base
    /// the credential's token answer named, when followed.
    pub base_url: String,
    pub expires_at: DateTime<Utc>,
    /// The access token's own expiry (`None` for an API key).
    pub token_expires_at: Option<DateTime<Utc>>,
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
        let token_expires_at = self.0.store.token_expires_at(&credential_id);
        let base_url = self.base_url_for(&provider, &credential_id);
        Ok(Lease {
            id,
            credential_id,
            provider,
            token,
            base_url,
            expires_at,
            token_expires_at,
        })
    }

    /// Renew lease `lease_id`: it lasts its length again from now, and its holder gets the
    /// credential's current token and that token's expiry. A lease whose credential is out of
    /// use (disabled, invalid, expired, deleted) is not renewed.
    #[tracing::instrument(level = "debug", name = "renew", skip_all, fields(lease = lease_id.as_str()))]
    pub async fn renew(&self, lease_id: &ReservationId) -> Result<Lease, PathError> {
        let renewed = match self.0.store.renew_lease(lease_id, self.now()).await? {
            Renewal::Renewed(r) => r,
            Renewal::NotFound => return Err(PathError::LeaseNotFound),
            Renewal::CredentialDeleted => {
                return Err(PathError::LeaseCredentialUnusable("deleted"));
            }
            Renewal::CredentialUnusable(status) => {
                return Err(PathError::LeaseCredentialUnusable(status.as_str()));
            }
        };
        let provider = self
            .0
            .registry
            .get(renewed.provider.as_str())
            .cloned()
            .ok_or_else(|| PathError::UnknownProvider(renewed.provider.to_string()))?;
        // The mirror keeps the opened token current: after a refresh or a replacement, the new
        // one. A stored token that no longer opens leaves the lease renewed but is not handed
        // out; the proxy's own next use of it marks the credential.
        let token = match self.0.store.open_token(&renewed.credential_id).await? {
            Ok(token) => token,
            Err(_) => return Err(PathError::LeaseCredentialUnusable("invalid")),
        };
        let base_url = self.base_url_for(&provider, &renewed.credential_id);
        Ok(Lease {
            id: lease_id.clone(),
            credential_id: renewed.credential_id,
            provider,
            token,
            base_url,
            expires_at: renewed.expires_at,
            token_expires_at: renewed.token_expires_at,
        })
    }

    /// The base URL a lease of `credential` names ([`Provider::base_url_with`]); the mirror is
    /// asked only for a provider that follows credentials' API bases.
    fn base_url_for(&self, provider: &Provider, credential: &CredentialId) -> String {
        if !provider.follows_api_base() {
            return provider.base_url.clone();
        }
        provider.base_url_with(self.0.store.api_base(credential).as_deref())
    }

    /// Settle or release lease `lease_id` by its holder's report.
    #[tracing::instrument(level = "debug", name = "report", skip_all, fields(lease = lease_id.as_str()))]
    pub async fn report(
        &self,
        lease_id: &ReservationId,
        input: ReportInput,
    ) -> Result<Reported, PathError> {
        let Some((credential_id, provider, token_at)) = self.0.store.lease(lease_id).await? else {
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
            // marks it; an overload, a region block or the client's own error marks nothing;
            // a 401 on an OAuth credential refreshes it instead (the application renews its
            // lease for the new token).
            let mut mark = mark_for(&verdict, now);
            let rejected = crate::refresh::Rejected::HeldAt(token_at);
            let renewal = self
                .renew_rejected(status, &verdict, held.credential(), &provider, rejected)
                .await;
            if renewal != super::TokenRenewal::Not {
                mark = None;
            }
            held.release(mark, " by a lease report").await?;
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
