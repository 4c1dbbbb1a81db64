//! One pending session's poller (RFC 8628 §3.4-3.5): wait the interval, poll the token
//! endpoint once through the flow, and act on the answer. `authorization_pending` polls again;
//! `slow_down` raises the interval for this and every later poll (to the provider's new
//! interval, else by [`SLOW_DOWN_STEP`]), bounded to [`super::MAX_INTERVAL`];
//! `access_denied`, `expired_token` and any other error end the session; a network error, a
//! 429 or a 5xx polls again after a wait that doubles each time (up to
//! [`super::MAX_INTERVAL`]). Approval stores the credential
//! ([`store_credential`]) and ends the session `success`.

use super::{Logins, bound_interval};
use crate::crypto::Secret;
use crate::domain::login::{LoginTokens, Poll, SLOW_DOWN_STEP};
use crate::domain::refresh::RefreshTrigger;
use crate::domain::{CredentialId, CredentialKind, NewCredential, ProviderName};
use crate::oauth::OauthFlow;
use crate::refresh::Outcome;
use crate::store::{
    CredentialPatch, LoginEnd, LoginSecrets, LoginSession, LoginStatus, StoreError,
};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why a session past its time ends.
const EXPIRED: &str = "the code expired before the login was approved";
/// The actor of the audit rows a login's credential gets.
const ACTOR: &str = "oauth";

/// Takes the poller's handle out of the service however the task ends.
struct Landed<'a>(&'a Logins, &'a str);

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        self.0.landed(self.1);
    }
}

/// Poll `session` until it ends or the server stops; the first poll at `due`.
pub(super) async fn run(
    this: Logins,
    session: LoginSession,
    flow: Arc<dyn OauthFlow>,
    mut due: DateTime<Utc>,
    mut stop: watch::Receiver<bool>,
) {
    let _landed = Landed(&this, &session.id);
    let (id, provider) = (session.id.as_str(), &session.provider);
    let mut interval = bound_interval(session.interval);
    // After polls that failed in a way worth retrying (a timeout, a 429, a 5xx): the wait
    // before the next, doubled each time up to the longest interval (RFC 8628 §3.5 asks for
    // an exponential backoff); reset by any answer.
    let mut backoff: Option<Duration> = None;
    loop {
        let wait = (due - this.now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        if this.stopping() {
            return;
        }
        let now = this.now();
        if now >= session.expires_at {
            let end = LoginEnd::Failed(LoginStatus::Expired, EXPIRED.into());
            this.end(id, provider, &end).await;
            return;
        }
        let secrets = match this.0.store.login_secrets(id).await {
            Ok(Some(secrets)) => secrets,
            // Ended (the cleanup expired it) or gone (a key rotation deleted it).
            Ok(None) => return,
            Err(StoreError::Crypto(e)) => {
                tracing::error!(session = id, error = %e, "a login's device code does not open");
                let end = LoginEnd::Failed(
                    LoginStatus::Error,
                    "the login's stored device code cannot be opened (the encryption settings changed); start the login again".into(),
                );
                this.end(id, provider, &end).await;
                return;
            }
            Err(e) => {
                tracing::warn!(session = id, error = %e, "cannot read a pending login; polling it later");
                due = super::after(now, interval);
                continue;
            }
        };
        let poll = flow.poll_login(secrets.material(), now).await;
        let retried = matches!(poll, Poll::Retry(_));
        backoff = retried.then(|| {
            backoff
                .map_or(interval, |b| b.saturating_mul(2))
                .min(crate::oauth::device::MAX_INTERVAL)
        });
        match poll {
            Poll::Pending => {}
            // The provider's new interval, but never less than RFC 8628's 5 s more.
            Poll::SlowDown(Some(new)) => {
                interval = bound_interval(new.max(interval + SLOW_DOWN_STEP))
            }
            Poll::SlowDown(None) => interval = bound_interval(interval + SLOW_DOWN_STEP),
            Poll::Denied => {
                let end = LoginEnd::Failed(LoginStatus::Denied, "the user denied the login".into());
                this.end(id, provider, &end).await;
                return;
            }
            Poll::Expired => {
                let end = LoginEnd::Failed(LoginStatus::Expired, EXPIRED.into());
                this.end(id, provider, &end).await;
                return;
            }
            Poll::Failed(message) => {
                this.end(id, provider, &LoginEnd::Failed(LoginStatus::Error, message))
                    .await;
                return;
            }
            Poll::Retry(message) => {
                tracing::warn!(session = id, %provider, reason = %message, "a login poll failed; polling again after a longer wait");
            }
            Poll::Success(tokens) => {
                let end = store_credential(&this, provider, secrets, tokens).await;
                this.end(id, provider, &end).await;
                return;
            }
        }
        let now = this.now();
        due = super::after(now, backoff.unwrap_or(interval));
        match this.0.store.set_login_poll(id, interval, due, now).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(session = id, error = %e, "cannot record a login's next poll"),
        }
    }
}

/// A copy of a secret, made on purpose: the duplicate's update needs the tokens the add had.
fn copy(secret: &Secret) -> Secret {
    Secret::new(secret.expose())
}

/// Store the credential of an approved login: added as a new OAuth credential of `provider`
/// (source `oauth:<provider>`, labelled with the name the flow gave), or, when the provider
/// and refresh token are one stored already, or the provider and the account the flow named
/// (copilot: the GitHub user), that credential's tokens replaced (which lifts an `invalid` or
/// `expired` mark); its label stays. A credential without an access token (copilot's GitHub
/// token alone) is refreshed once at once, so it is usable now; should that fail, the worker
/// tries again, and the login still succeeded.
async fn store_credential(
    this: &Logins,
    provider: &ProviderName,
    secrets: LoginSecrets,
    tokens: LoginTokens,
) -> LoginEnd {
    let LoginSecrets { client, extra, .. } = secrets;
    let mut extra = extra;
    extra.account = tokens.account;
    let client_secret = client.map(|c| {
        extra.client_id.get_or_insert(c.client_id);
        if extra.client_secret_expires_at.is_none() {
            extra.client_secret_expires_at = c.client_secret_expires_at;
        }
        c.client_secret
    });
    let access_token = tokens.access_token.filter(|t| !t.is_empty());
    let refresh_token = Some(tokens.refresh_token).filter(|t| !t.is_empty());
    if access_token.is_none() && refresh_token.is_none() {
        return LoginEnd::Failed(
            LoginStatus::Error,
            "the provider approved the login but sent no token".into(),
        );
    }
    let new = NewCredential {
        provider: provider.to_string(),
        kind: CredentialKind::Oauth,
        token: access_token,
        refresh_token,
        client_secret,
        extra,
        priority: 100,
        // A flow's name for the account, kept only when a label could be it.
        label: tokens
            .label
            .filter(|l| crate::import::check_label(l).is_ok()),
        limit: None,
        used: 0,
        disabled: false,
        expires_at: tokens.expires_at,
    };
    let now = this.now();
    let store = &this.0.store;
    let id = match store
        .add(&new, &format!("oauth:{provider}"), ACTOR, now)
        .await
    {
        Ok(row) => row.id,
        Err(StoreError::Duplicate { id }) => {
            let id = CredentialId::from(id);
            let patch = CredentialPatch {
                token: new.token.as_ref().map(copy),
                refresh_token: new.refresh_token.as_ref().map(copy),
                expires_at: Some(new.expires_at),
                ..Default::default()
            };
            if let Err(e) = store.update(&id, &patch, ACTOR, now).await {
                return cannot_store(&e);
            }
            id
        }
        Err(e) => return cannot_store(&e),
    };
    if new.token.is_none() {
        let refresh = this
            .0
            .refresher
            .refresh(&id, provider, RefreshTrigger::Manual, 1);
        match tokio::time::timeout(super::FIRST_REFRESH_PATIENCE, refresh).await {
            // Refused for good (no Copilot seat, a revoked token): the login did not give a
            // usable credential, and the page must say so.
            Ok(Outcome::Failed {
                reason,
                rejected: true,
            }) => {
                return LoginEnd::Failed(
                    LoginStatus::Error,
                    format!(
                        "the login was approved and credential {id} stored, but the provider refused its token: {reason}"
                    ),
                );
            }
            Ok(Outcome::Failed { reason, .. }) => {
                tracing::warn!(credential = %id, %reason, "the first refresh of a new login's credential failed; the refresh worker tries again");
            }
            Err(_) => {
                tracing::warn!(credential = %id, "the first refresh of a new login's credential is slow; it goes on in the background");
            }
            Ok(_) => {}
        }
    }
    LoginEnd::Success(id)
}

fn cannot_store(e: &StoreError) -> LoginEnd {
    tracing::error!(error = %e, "cannot store a login's credential");
    LoginEnd::Failed(
        LoginStatus::Error,
        "the login was approved, but the server could not store the credential; see its log".into(),
    )
}
