//! The management guard (contract section 8): who may call `/v0/management` and `/v0/oauth`.
//!
//! Without a configured key only loopback clients are served. With one, every call presents it
//! (`Authorization: Bearer` or `X-Management-Key`), checked against its argon2id hash off the
//! async runtime; remote clients also need `allow_remote`. Five wrong keys from one address
//! ban that address for 30 minutes. The address is the TCP peer's, never a header.

use super::error::ApiError;
use crate::config::ManagementConfig;
use crate::crypto::{self, Fingerprinter};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Wrong keys from one address before it is banned.
pub const MAX_FAILURES: u32 = 5;
/// How long a ban lasts.
pub const BAN_MINUTES: i64 = 30;
/// Addresses tracked at most; beyond it, entries without a live ban are dropped first.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Default, Clone, Copy)]
struct Attempts {
    failures: u32,
    banned_until: Option<DateTime<Utc>>,
}

pub struct ManagementAuth {
    /// The argon2id PHC string of the key; `None` when no key is configured.
    phc: Option<String>,
    allow_remote: bool,
    attempts: Mutex<HashMap<IpAddr, Attempts>>,
    /// A keyed digest of the last key that verified, so a correct key costs one argon2 run
    /// per process rather than one per request.
    accepted: Mutex<Option<Vec<u8>>>,
    digester: Fingerprinter,
}

impl std::fmt::Debug for ManagementAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementAuth")
            .field("key_configured", &self.phc.is_some())
            .field("allow_remote", &self.allow_remote)
            .finish()
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.to_canonical().is_loopback()
}

/// The key a request presents, if any.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-management-key") {
        return v.to_str().ok().map(str::trim);
    }
    super::extract::bearer_token(headers)
}

impl ManagementAuth {
    /// From the config: a PHC string is used as it is; plain text is hashed now, with a
    /// warning to store the hash instead.
    pub async fn from_config(config: &ManagementConfig) -> Result<Self, String> {
        let key = config.secret_key.expose().trim().to_string();
        let phc = if key.is_empty() {
            None
        } else if crypto::is_phc(&key) {
            crypto::check_phc(&key).map_err(|e| format!("`management.secret_key`: {e}"))?;
            Some(key)
        } else {
            tracing::warn!(
                "management.secret_key is plain text; it was hashed for this run. Store the output of `cliproxyapi hash-secret` instead"
            );
            let phc = tokio::task::spawn_blocking(move || crypto::hash_secret(&key))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("`management.secret_key`: cannot hash it: {e}"))?;
            Some(phc)
        };
        Ok(ManagementAuth {
            phc,
            allow_remote: config.allow_remote,
            attempts: Mutex::new(HashMap::new()),
            accepted: Mutex::new(None),
            digester: Fingerprinter::new(Fingerprinter::random_key()),
        })
    }

    /// Decide on one call from `peer` presenting `presented` at `now`.
    pub async fn check(
        &self,
        peer: Option<IpAddr>,
        presented: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let loopback = peer.is_some_and(is_loopback);
        let Some(phc) = &self.phc else {
            return if loopback {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "remote_management_disabled",
                    "The management API answers only loopback clients unless a management key is configured",
                ))
            };
        };
        if !loopback && !self.allow_remote {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_management_disabled",
                "The management API answers remote clients only with management.allow_remote",
            ));
        }
        let peer = peer.expect("a loopback or admitted remote peer has an address");
        if let Some(until) = self.banned_until(peer, now) {
            let secs = (until - now).num_seconds().max(1) as u64;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "too_many_attempts",
                format!("Too many wrong management keys from this address; try again in {secs} s"),
            )
            .retry_after(secs));
        }
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_management_key",
                "Send the management key as Authorization: Bearer KEY or X-Management-Key: KEY",
            ));
        };
        if self.verify(phc, presented).await {
            self.attempts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
            Ok(())
        } else {
            self.record_failure(peer, now);
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_management_key",
                "The management key is wrong",
            ))
        }
    }

    async fn verify(&self, phc: &str, presented: &str) -> bool {
        let digest = self.digester.content(presented.as_bytes());
        let cached = self
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if cached.is_some_and(|c| bool::from(subtle::ConstantTimeEq::ct_eq(&c[..], &digest[..]))) {
            return true;
        }
        let (phc, presented) = (phc.to_string(), presented.to_string());
        let ok = tokio::task::spawn_blocking(move || crypto::verify_secret(&phc, &presented))
            .await
            .unwrap_or(false);
        if ok {
            *self.accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
        }
        ok
    }

    fn banned_until(&self, peer: IpAddr, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        match attempts.get(&peer).and_then(|a| a.banned_until) {
            Some(until) if until > now => Some(until),
            Some(_) => {
                attempts.remove(&peer);
                None
            }
            None => None,
        }
    }

    fn record_failure(&self, peer: IpAddr, now: DateTime<Utc>) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if attempts.len() >= MAX_TRACKED && !attempts.contains_key(&peer) {
            attempts.retain(|_, a| a.banned_until.is_some_and(|u| u > now));
        }
        let entry = attempts.entry(peer).or_default();
        entry.failures += 1;
        if entry.failures >= MAX_FAILURES {
            entry.failures = 0;
            entry.banned_until = Some(now + Duration::minutes(BAN_MINUTES));
            tracing::warn!(%peer, "management access banned for {BAN_MINUTES} minutes after {MAX_FAILURES} wrong keys");
        }
    }
}
