//! The device-flow login service ([`Logins`], README "OAuth device flows"): it starts a login
//! through the provider's [`crate::oauth::OauthFlow`], stores the session (its device code
//! sealed), polls the provider's token endpoint in the background (one task per pending
//! session, [`poll`]) following RFC 8628, stores the credential when the user approves, and
//! answers the status the page asks for.
//!
//! - At most [`MAX_PENDING`] sessions are pending at once.
//! - Sessions survive a restart: [`Logins::resume`] at start polls the pending ones again from
//!   their stored next poll, and ends those past their time `expired`.
//! - Ended sessions are kept [`FINISHED_KEPT`] (so a page can still read how its login ended),
//!   then deleted by [`Logins::cleanup`], which the jobs run every minute.
//! - The auth log gets a line when a login starts and when it ends; never a code or a token
//!   (not the user code either).

mod poll;

use crate::domain::login::{DeviceAuthorization, LoginRequest};
use crate::domain::refresh::FlowError;
use crate::domain::{Clock, ProviderName};
use crate::events::AuthLog;
use crate::oauth::{Flows, OauthFlow};
use crate::providers::Registry;
use crate::refresh::Refresher;
use crate::store::{
    InsertLoginError, LoginEnd, LoginSession, LoginStatus, MAX_LOGIN_MESSAGE, Store, StoreError,
};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The most sessions pending at once: each is a task polling a provider.
pub const MAX_PENDING: u64 = 100;
// The bounds the flows apply to a device authorization, applied again here to whatever flow
// an embedding program registers: the wait between polls, how long the codes are good for.
pub use crate::oauth::device::{MAX_EXPIRES_IN, MAX_INTERVAL, MIN_EXPIRES_IN, MIN_INTERVAL};
/// How long an ended session is kept before the cleanup deletes it.
pub const FINISHED_KEPT: Duration = Duration::from_secs(60 * 60);
/// How long a stopping server waits for pollers in the middle of a poll (one whose user just
/// approved stores its credential, and waits for its first refresh) before it stops them:
/// longer than that wait ([`FIRST_REFRESH_PATIENCE`]), so an approved login is recorded as
/// such before the server stops.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long a login waits for the first refresh of a credential stored without an access
/// token (copilot) before it reports success; the refresh goes on in its own task.
pub const FIRST_REFRESH_PATIENCE: Duration = Duration::from_secs(10);

/// Why a login did not start.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("Unknown provider `{0}`")]
    UnknownProvider(String),
    #[error("Provider `{0}` has no device-flow login")]
    NoLoginFlow(String),
    #[error("{MAX_PENDING} logins are pending already; finish or wait for one of them")]
    TooMany,
    /// The flow cannot serve the request as made (a start URL or region it does not take):
    /// nothing was sent to the provider.
    #[error("The login cannot start: {0}")]
    Invalid(String),
    /// The provider refused to start the login, in its words.
    #[error("The provider refused to start the login: {0}")]
    Refused(String),
    /// The provider could not be reached, or answered a 429 or a 5xx: worth trying again,
    /// after `retry_after` when it named a wait.
    #[error("The provider could not start the login now (try again later): {reason}")]
    Unreachable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("The server is stopping")]
    Stopping,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the service is built from.
pub struct Parts {
    pub store: Store,
    /// The same flows the refresher has.
    pub flows: Flows,
    pub registry: Arc<Registry>,
    pub refresher: Refresher,
    pub auth_log: Arc<AuthLog>,
    pub clock: Clock,
}

/// The login service; clones share it.
#[derive(Clone)]
pub struct Logins(Arc<Inner>);

struct Inner {
    store: Store,
    flows: Flows,
    registry: Arc<Registry>,
    refresher: Refresher,
    auth_log: Arc<AuthLog>,
    clock: Clock,
    /// The poller of each pending session this process polls, by session id.
    pollers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Set when the server stops: pollers stop at their next wait, none start.
    stop: tokio::sync::watch::Sender<bool>,
    /// Starts between their check of the pending count and their session stored (the
    /// provider's device authorization in between): each holds a slot, so concurrent starts
    /// past [`MAX_PENDING`] are refused before any reaches the provider.
    starting: AtomicU64,
    /// Held while a start counts the pending sessions and takes its slot, and while one
    /// stores its session and gives its slot back: a count never sees a start both stored and
    /// under way.
    counting: tokio::sync::Mutex<()>,
}

/// A start's slot in [`Inner::starting`], given back when its session is stored, or when the
/// start ends otherwise (refused, failed, cancelled).
struct Slot<'a>(Option<&'a AtomicU64>);

impl Slot<'_> {
    fn give_back(&mut self) {
        if let Some(starting) = self.0.take() {
            starting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Lock a map, whatever a panicking holder left (its entries stay valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An interval within [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
pub fn bound_interval(interval: Duration) -> Duration {
    interval.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Whether the user code and the verification links of `auth` may be shown to the user.
fn shown_ok(auth: &DeviceAuthorization) -> bool {
    use crate::oauth::device::{user_code_ok, web_url};
    user_code_ok(&auth.user_code)
        && web_url(&auth.verification_uri)
        && auth
            .verification_uri_complete
            .as_deref()
            .is_none_or(web_url)
}

/// The most a flow's non-secret extra fields may take, as JSON.
const MAX_EXTRA_JSON: usize = 8 * 1024;

/// Whether what a session keeps of `auth` is within bounds: a device code (not empty) as the
/// built-in flows read one, a client's id and secret as long as a token, the extra fields.
fn stored_ok(auth: &DeviceAuthorization) -> bool {
    use crate::oauth::client::MAX_TOKEN;
    use crate::oauth::device::MAX_DEVICE_CODE;
    let code = auth.device_code.expose();
    !code.is_empty()
        && code.len() <= MAX_DEVICE_CODE
        && auth.client.as_ref().is_none_or(|c| {
            c.client_id.len() <= MAX_TOKEN && c.client_secret.expose().len() <= MAX_TOKEN
        })
        && serde_json::to_string(&auth.extra).is_ok_and(|j| j.len() <= MAX_EXTRA_JSON)
}

/// `now + d`, saturating (the waits are bounded; nothing here may panic).
fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Logins {
    pub fn new(parts: Parts) -> Logins {
        Logins(Arc::new(Inner {
            store: parts.store,
            flows: parts.flows,
            registry: parts.registry,
            refresher: parts.refresher,
            auth_log: parts.auth_log,
            clock: parts.clock,
            pollers: Mutex::new(HashMap::new()),
            stop: tokio::sync::watch::channel(false).0,
            starting: AtomicU64::new(0),
            counting: tokio::sync::Mutex::new(()),
        }))
    }

    fn now(&self) -> DateTime<Utc> {
        (self.0.clock)()
    }

    fn stopping(&self) -> bool {
        *self.0.stop.borrow()
    }

    /// The flow that logs in for `provider`.
    fn login_flow(&self, provider: &str) -> Result<Arc<dyn OauthFlow>, LoginError> {
        if !self.0.registry.contains(provider) {
            return Err(LoginError::UnknownProvider(provider.to_string()));
        }
        self.0
            .flows
            .get(provider)
            .filter(|f| f.has_login())
            .ok_or_else(|| LoginError::NoLoginFlow(provider.to_string()))
    }

    /// Start a login for `provider`: the flow's device authorization, the session stored, its
    /// poller started. The session as stored (its first poll one interval from now).
    pub async fn start(
        &self,
        provider: &str,
        request: &LoginRequest,
    ) -> Result<LoginSession, LoginError> {
        let flow = self.login_flow(provider)?;
        if self.stopping() {
            return Err(LoginError::Stopping);
        }
        // A slot before the provider is asked: the pending sessions and the starts under way
        // together stay within the limit (the insert checks the stored count again, for
        // servers sharing the database).
        let mut slot = self.slot().await?;
        let mut auth: DeviceAuthorization =
            flow.start_login(request, self.now())
                .await
                .map_err(|e| match e {
                    FlowError::Transient {
                        reason,
                        retry_after,
                    } => LoginError::Unreachable {
                        reason,
                        retry_after,
                    },
                    FlowError::Rejected(r) => LoginError::Refused(r),
                    FlowError::Unrefreshable(r) => LoginError::Invalid(r),
                })?;
        auth.interval = bound_interval(auth.interval);
        auth.expires_in = auth.expires_in.clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN);
        // What the user is shown, checked again whatever flow answered (one an embedding
        // program registers included): a code of printable ASCII, links the user may open;
        // and what is stored, within the bounds the built-in flows read it with.
        if !shown_ok(&auth) {
            return Err(LoginError::Refused(
                "the flow's device authorization has a user code or verification link that \
                 cannot be shown (printable ASCII up to 64 characters; https:// links without \
                 a user or password)"
                    .into(),
            ));
        }
        if !stored_ok(&auth) {
            return Err(LoginError::Refused(
                "the flow's device authorization is too large to keep (a device code of at \
                 most 4 KiB, a client of at most 32 KiB, extra fields of at most 8 KiB)"
                    .into(),
            ));
        }
        let provider = ProviderName::from(provider);
        let now = self.now();
        let counting = self.0.counting.lock().await;
        let session = self
            .0
            .store
            .insert_login(&provider, &auth, MAX_PENDING, now)
            .await
            .map_err(|e| match e {
                InsertLoginError::TooMany(_) => LoginError::TooMany,
                InsertLoginError::Store(e) => LoginError::Store(e),
            })?;
        // Stored: counted as pending from now on, no longer as under way.
        slot.give_back();
        drop(counting);
        drop(auth);
        self.0
            .auth_log
            .record(&format!("login {} started for {provider}", session.id));
        self.spawn(&session, flow, after(now, session.interval));
        Ok(session)
    }

    /// A slot for one start, or `TooMany` when the pending sessions and the starts under way
    /// fill [`MAX_PENDING`].
    async fn slot(&self) -> Result<Slot<'_>, LoginError> {
        let _counting = self.0.counting.lock().await;
        let pending = self.0.store.count_pending_logins().await?;
        let starting = &self.0.starting;
        if pending.saturating_add(starting.load(Ordering::Acquire)) >= MAX_PENDING {
            return Err(LoginError::TooMany);
        }
        starting.fetch_add(1, Ordering::AcqRel);
        Ok(Slot(Some(starting)))
    }

    /// The session `id` of `provider`; `None` when there is none (or it is another
    /// provider's).
    pub async fn status(
        &self,
        provider: &str,
        id: &str,
    ) -> Result<Option<LoginSession>, StoreError> {
        Ok(self
            .0
            .store
            .login(id)
            .await?
            .filter(|s| s.provider.as_str() == provider))
    }

    /// At start: end the pending sessions past their time `expired`, and poll the others again
    /// from their stored next poll. Returns how many pollers it started.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        self.prune(self.now()).await?;
        let mut started = 0;
        for session in self.0.store.pending_logins().await? {
            match self.login_flow(session.provider.as_str()) {
                Ok(flow) => {
                    let due = session.next_poll_at;
                    self.spawn(&session, flow, due);
                    started += 1;
                }
                Err(e) => {
                    let end = LoginEnd::Failed(LoginStatus::Error, e.to_string());
                    self.end(&session.id, &session.provider, &end).await;
                }
            }
        }
        if started > 0 {
            self.0
                .auth_log
                .record(&format!("resumed polling {started} pending login(s)"));
        }
        Ok(started)
    }

    /// Housekeeping at `now`: pending sessions past their time end `expired`; sessions ended
    /// more than [`FINISHED_KEPT`] ago are deleted; a pending session nobody polls gets its
    /// poller.
    pub async fn cleanup(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.prune(now).await?;
        // A pending session without a poller (its start was cancelled between storing it and
        // spawning the poller) gets one; `spawn` leaves a polled session alone.
        for session in self.0.store.pending_logins().await? {
            if let Ok(flow) = self.login_flow(session.provider.as_str()) {
                self.spawn(&session, flow, session.next_poll_at);
            }
        }
        Ok(())
    }

    /// Pending sessions past their time at `now` end `expired`; sessions ended more than
    /// [`FINISHED_KEPT`] ago are deleted.
    async fn prune(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let kept = chrono::TimeDelta::from_std(FINISHED_KEPT).unwrap_or_default();
        let before = now.checked_sub_signed(kept).unwrap_or(now);
        let (expired, deleted) = self.0.store.prune_logins(now, before).await?;
        if expired > 0 {
            self.0.auth_log.record(&format!(
                "{expired} pending login(s) expired before they were approved"
            ));
        }
        if deleted > 0 {
            tracing::debug!(deleted, "deleted ended logins");
        }
        Ok(())
    }

    /// The server is stopping: pollers stop at their next wait (a stopped one resumes at the
    /// next start); those in the middle of a poll get `grace` to finish it, then are stopped.
    pub async fn stop(&self, grace: Duration) {
        self.0.stop.send_replace(true);
        let handles: Vec<JoinHandle<()>> = lock(&self.0.pollers).drain().map(|(_, h)| h).collect();
        let deadline = tokio::time::Instant::now() + grace;
        for mut handle in handles {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                handle.abort();
            }
        }
    }

    /// Start the poller of `session`, its first poll at `due`.
    fn spawn(&self, session: &LoginSession, flow: Arc<dyn OauthFlow>, due: DateTime<Utc>) {
        if self.stopping() {
            return;
        }
        // Under the lock from the check to the insert: a session never gets a second poller,
        // and a poller that ends at once removes its entry (`landed` waits for the lock)
        // only after it was inserted.
        let mut pollers = lock(&self.0.pollers);
        if pollers.get(&session.id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let this = self.clone();
        let stop = self.0.stop.subscribe();
        let task = tokio::spawn(poll::run(this, session.clone(), flow, due, stop));
        pollers.insert(session.id.clone(), task);
    }

    /// A poller is done: forget its handle.
    fn landed(&self, id: &str) {
        lock(&self.0.pollers).remove(id);
    }

    /// End session `id` with `end`, and say so in the auth log.
    async fn end(&self, id: &str, provider: &ProviderName, end: &LoginEnd) {
        match self.0.store.finish_login(id, end, self.now()).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(session = id, error = %e, "cannot record the end of a login");
                return;
            }
        }
        let line = match end {
            LoginEnd::Success(cred) => {
                format!("login {id} for {provider} succeeded: credential {cred} stored")
            }
            LoginEnd::Failed(status, message) => {
                let message: String = message.chars().take(MAX_LOGIN_MESSAGE).collect();
                format!(
                    "login {id} for {provider} ended {}: {message}",
                    status.as_str()
                )
            }
        };
        self.0.auth_log.record(&line);
    }
}
