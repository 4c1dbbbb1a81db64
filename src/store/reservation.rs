//! The request path's vocabulary with the store: what is asked for ([`ReserveRequest`]),
//! what is held ([`Reservation`]), why nothing could be held ([`Unavailable`]), what a
//! failure does to a credential ([`Mark`]) and what renewing a lease did ([`Renewal`]). A
//! leaf: the operations (`requests.rs`) and the ledger that decides and commits them
//! (`ledger/`) both speak it, neither through the other.

use crate::config::SelectionStrategy;
use crate::domain::status::Status;
use crate::domain::{CredentialId, ProviderName, ReservationId};
use chrono::{DateTime, Utc};

/// What a reservation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationKind {
    Request,
    Lease,
}

/// A request to reserve tokens on some credential of a provider.
#[derive(Debug, Clone)]
pub struct ReserveRequest<'a> {
    pub provider: &'a ProviderName,
    pub tokens: u64,
    pub strategy: SelectionStrategy,
    /// Credentials this request already tried.
    pub exclude: &'a [CredentialId],
    pub kind: ReservationKind,
    /// When an unreported lease is settled at its reservation.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Tokens held on a credential until settled or released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub credential_id: CredentialId,
    pub tokens: u64,
}

/// Why nothing could be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The provider has no credential at all.
    NoCredentials,
    /// Every credential is exhausted, cooling down or full of reservations; the earliest may be
    /// usable again in this many seconds. `in_flight`: some credential has room but for the
    /// reservations of requests in flight, which settlements will free.
    Busy { retry_after: u64, in_flight: bool },
    /// Every credential is disabled, invalid or expired (or was tried already).
    Unusable,
    /// Every credential that is not unusable is out of quota (or too small for the request),
    /// and its provider's quota never resets.
    Exhausted,
}

/// What happened to the credential that made a request fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    Invalid(String),
    /// Out of credit or quota: until `until` when the provider named a date, else until the
    /// next reset.
    Exhausted {
        reason: String,
        until: Option<DateTime<Utc>>,
    },
    Cooldown {
        until: DateTime<Utc>,
        reason: String,
    },
}

impl Mark {
    /// One line for the auth log.
    pub fn describe(&self) -> String {
        match self {
            Mark::Invalid(r) => format!("invalid: {r}"),
            Mark::Exhausted {
                reason,
                until: None,
            } => format!("exhausted: {reason}"),
            Mark::Exhausted {
                reason,
                until: Some(until),
            } => format!(
                "exhausted until {}: {reason}",
                crate::domain::rfc3339(*until)
            ),
            Mark::Cooldown { until, reason } => {
                format!(
                    "cooling down until {}: {reason}",
                    crate::domain::rfc3339(*until)
                )
            }
        }
    }
}

/// What renewing a lease did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Extended by its length from now.
    Renewed(RenewedLease),
    /// No such lease: never made, reported, or past its expiry (the sweep settles it).
    NotFound,
    /// Its credential was deleted (and the lease with it) while this server ran.
    CredentialDeleted,
    /// Its credential is disabled, invalid or expired now: not extended.
    CredentialUnusable(Status),
}

impl Renewal {
    /// A lease's credential in this status cannot be renewed on: its token is refused, or the
    /// operator took it out. A credential cooling down or out of quota keeps its lease: the
    /// lease's tokens are reserved already, and the holder learns the rest from the provider.
    pub fn refuses(status: Status) -> bool {
        matches!(status, Status::Disabled | Status::Invalid | Status::Expired)
    }
}

/// A lease as renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewedLease {
    pub credential_id: CredentialId,
    pub provider: ProviderName,
    /// Its new expiry.
    pub expires_at: DateTime<Utc>,
    /// Its credential's access-token expiry now (`None` for an API key, or a token without one).
    pub token_expires_at: Option<DateTime<Utc>>,
}

/// [`ReserveRequest`] owned, to travel to the ledger's thread.
#[derive(Debug, Clone)]
pub(in crate::store) struct ReserveRequestOwned {
    pub provider: String,
    pub tokens: u64,
    pub strategy: SelectionStrategy,
    pub exclude: Vec<String>,
    pub kind: ReservationKind,
    pub expires_at: Option<DateTime<Utc>>,
}
