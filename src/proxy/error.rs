//! What the request path answers when it cannot forward, lease or report. Each variant's text
//! is the sentence a client may read; the HTTP edge gives each its status and code, and logs
//! a [`PathError::Store`] or [`PathError::Task`] without passing it on.

use crate::domain::ProviderName;
use crate::providers::exchange::BodyError;
use crate::store::{StoreError, Unavailable};
use crate::upstream::Cause;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// No provider of that name (a lease's `provider`).
    #[error("Unknown provider `{0}`")]
    UnknownProvider(String),
    #[error("Provider {0} is disabled in the config")]
    ProviderDisabled(ProviderName),
    /// Nothing could be reserved.
    #[error("{}", unavailable(provider.as_str(), why))]
    Unavailable {
        provider: ProviderName,
        why: Unavailable,
    },
    /// The provider could not be reached at all: no credential is blamed, and no other is
    /// tried (they all go to the same host).
    #[error("Provider {provider} could not be reached: {}", cause.describe())]
    Unreachable {
        provider: ProviderName,
        cause: Cause,
    },
    /// The provider refuses where this server runs (a region block): the fault is neither the
    /// client's nor a key's, and every key would get the same.
    #[error(
        "Provider {provider} refuses to serve the location this server runs in ({reason}); no credential was marked, and none would be served from here"
    )]
    LocationRefused {
        provider: ProviderName,
        reason: String,
    },
    /// Every attempt was used on a credential that could not be sent.
    #[error("No credential of provider {0} succeeded")]
    NoneSucceeded(ProviderName),
    /// A successful answer that was not read whole (not streamed): nothing reaches the client.
    #[error("The provider's answer was cut short")]
    CutShort,
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("This request's path and the provider's base URL do not make a URL HTTP can carry")]
    InvalidPath,
    /// A lease report that says neither what was used nor how it failed, or says it wrongly.
    #[error("{0}")]
    InvalidReport(&'static str),
    #[error("No such lease, or it was already reported or expired")]
    LeaseNotFound,
    /// A renewal of a lease whose credential is out of use (`disabled`, `invalid`, `expired`,
    /// or `deleted`): the lease is left as it was.
    #[error(
        "The lease's credential is {0} now, so the lease was not renewed; report it, or lease again"
    )]
    LeaseCredentialUnusable(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The exchange's task failed (it panicked).
    #[error("the request path's task failed: {0}")]
    Task(String),
}

/// The sentence for "nothing could be reserved".
fn unavailable(provider: &str, why: &Unavailable) -> String {
    match why {
        Unavailable::NoCredentials => format!("No credentials for provider {provider}"),
        Unavailable::Busy { retry_after, .. } => format!(
            "Every credential for provider {provider} is exhausted, cooling down or busy; retry in {retry_after} s"
        ),
        Unavailable::Exhausted => format!(
            "Every credential for provider {provider} has no room left for this request, and its quota never resets (auth.quota.reset_schedule); raise or reset a limit"
        ),
        Unavailable::Unusable => format!(
            "No usable credentials for provider {provider}: every one is disabled, invalid or expired"
        ),
    }
}
