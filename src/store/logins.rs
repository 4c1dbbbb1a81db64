//! The store's side of device-flow logins (RFC 8628): the sessions the login service polls in
//! the background (`oauth_sessions`). A session's device code and the secret of a client
//! registered for it are sealed, bound to the session's id, and wiped when it ends; what a
//! session shows ([`LoginSession`]) holds no secret, and what a poll needs ([`LoginSecrets`])
//! is read apart. A pending session whose sealed values no longer open (the encryption
//! settings changed) cannot be polled: the service ends it `error`.

use super::{Result, Store, StoreError, after, clip, random_id, secs};
use crate::crypto::{Field, Secret};
use crate::domain::login::{DeviceAuthorization, PollMaterial};
use crate::domain::refresh::NewClient;
use crate::domain::{CredentialId, OauthExtra, ProviderName, from_unix};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The most characters of a session's message kept: what a provider says is bounded.
pub const MAX_LOGIN_MESSAGE: usize = 300;
/// The longest user code, verification link or client id a session keeps (the login service
/// bounds the device code, the client and the extra fields before they get here).
const MAX_FIELD: usize = 2048;

/// Where a login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    /// Waiting for the user; polled in the background.
    Pending,
    /// The user approved and the credential is stored.
    Success,
    /// The user refused (`access_denied`).
    Denied,
    /// The codes ran out before approval (`expired_token`, or past `expires_at`).
    Expired,
    /// Any other end: the provider's error, or a session that cannot be polled any more.
    Error,
}

impl LoginStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginStatus::Pending => "pending",
            LoginStatus::Success => "success",
            LoginStatus::Denied => "denied",
            LoginStatus::Expired => "expired",
            LoginStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> LoginStatus {
        match s {
            "pending" => LoginStatus::Pending,
            "success" => LoginStatus::Success,
            "denied" => LoginStatus::Denied,
            "expired" => LoginStatus::Expired,
            // The table's CHECK allows nothing else.
            _ => LoginStatus::Error,
        }
    }
}

/// A session as the service and the routes see it: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginSession {
    pub id: String,
    pub provider: ProviderName,
    pub status: LoginStatus,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    /// The wait between polls (raised by `slow_down`).
    pub interval: Duration,
    pub expires_at: DateTime<Utc>,
    pub next_poll_at: DateTime<Utc>,
    pub credential_id: Option<CredentialId>,
    pub message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a poll of a pending session needs, opened: its device code, its client, the fields
/// the credential will carry. `Debug` shows no secret (`Secret`'s prints nothing).
#[derive(Debug)]
pub struct LoginSecrets {
    pub device_code: Secret,
    pub client: Option<NewClient>,
    pub extra: OauthExtra,
}

impl LoginSecrets {
    /// What [`crate::oauth::OauthFlow::poll_login`] is given.
    pub fn material(&self) -> PollMaterial<'_> {
        PollMaterial {
            device_code: &self.device_code,
            client: self.client.as_ref(),
            extra: &self.extra,
        }
    }
}

/// How a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginEnd {
    /// The credential is stored as this id.
    Success(CredentialId),
    /// `Denied`, `Expired` or `Error`, with why.
    Failed(LoginStatus, String),
}

/// What [`Store::insert_login`] did not store.
#[derive(Debug, thiserror::Error)]
pub enum InsertLoginError {
    /// As many sessions as allowed are pending.
    #[error("{0} logins are pending already")]
    TooMany(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fresh session id: `oas_` and 20 random lowercase letters and digits.
pub fn new_login_id() -> String {
    random_id("oas_", 20)
}

struct SessionRow {
    id: String,
    provider: String,
    status: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    interval_secs: i64,
    expires_at: i64,
    next_poll_at: i64,
    credential_id: Option<String>,
    message: Option<String>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

/// The sessions' rows, without their secrets; `$rest` (a string literal) ends the statement.
macro_rules! session_rows {
    ($rest:tt $(, $arg:expr)*) => {
        sqlx::query_as!(
            SessionRow,
            "SELECT id, provider, status, user_code, verification_uri, verification_uri_complete,
                    interval_secs, expires_at, next_poll_at, credential_id, message, created_at,
                    updated_at, finished_at
             FROM oauth_sessions " + $rest
            $(, $arg)*
        )
    };
}

impl From<SessionRow> for LoginSession {
    fn from(r: SessionRow) -> Self {
        LoginSession {
            id: r.id,
            provider: r.provider.into(),
            status: LoginStatus::parse(&r.status),
            user_code: r.user_code,
            verification_uri: r.verification_uri,
            verification_uri_complete: r.verification_uri_complete,
            interval: Duration::from_secs(u64::try_from(r.interval_secs).unwrap_or(0)),
            expires_at: from_unix(r.expires_at),
            next_poll_at: from_unix(r.next_poll_at),
            credential_id: r.credential_id.map(CredentialId::from),
            message: r.message,
            created_at: from_unix(r.created_at),
            updated_at: from_unix(r.updated_at),
            finished_at: r.finished_at.map(from_unix),
        }
    }
}

impl Store {
    /// Store a new pending session for `auth` (its device code and client secret sealed under
    /// the new id), unless `max_pending` sessions are pending already: the count and the
    /// insert are one `BEGIN IMMEDIATE` transaction, so concurrent starts cannot pass the limit.
    /// The first poll is due one interval from `now`.
    #[tracing::instrument(skip_all, fields(provider = %provider))]
    pub async fn insert_login(
        &self,
        provider: &ProviderName,
        auth: &DeviceAuthorization,
        max_pending: u64,
        now: DateTime<Utc>,
    ) -> std::result::Result<LoginSession, InsertLoginError> {
        let id = new_login_id();
        let device_code = self.sealer.seal(&id, Field::DeviceCode, &auth.device_code);
        let (client_id, client_secret, client_expiry) = match &auth.client {
            Some(c) => (
                Some(clip(&c.client_id, MAX_FIELD)),
                Some(self.sealer.seal(&id, Field::ClientSecret, &c.client_secret)),
                c.client_secret_expires_at.map(|t| t.timestamp()),
            ),
            None => (None, None, None),
        };
        let extra = serde_json::to_string(&auth.extra).unwrap_or_else(|_| "{}".into());
        let user_code = clip(&auth.user_code, MAX_FIELD);
        let uri = clip(&auth.verification_uri, MAX_FIELD);
        let complete = auth
            .verification_uri_complete
            .as_deref()
            .map(|u| clip(u, MAX_FIELD));
        let interval = secs(auth.interval);
        let expires_at = after(now, auth.expires_in);
        let next_poll = after(now, auth.interval);
        let ts = now.timestamp();
        let provider_text = provider.as_str();
        let mut tx = self.begin_write().await?;
        let pending = count_pending(&mut *tx).await?;
        if pending >= max_pending {
            return Err(InsertLoginError::TooMany(pending));
        }
        sqlx::query!(
            "INSERT INTO oauth_sessions (id, provider, status, device_code_sealed, client_id,
                 client_secret_sealed, client_secret_expires_at, user_code, verification_uri,
                 verification_uri_complete, interval_secs, expires_at, next_poll_at, extra,
                 created_at, updated_at)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14)",
            id,
            provider_text,
            device_code,
            client_id,
            client_secret,
            client_expiry,
            user_code,
            uri,
            complete,
            interval,
            expires_at,
            next_poll,
            extra,
            ts
        )
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(self.login(&id).await?.ok_or(StoreError::NotFound)?)
    }

    /// A session, without its secrets; `None` when there is none of that id.
    #[tracing::instrument(skip_all)]
    pub async fn login(&self, id: &str) -> Result<Option<LoginSession>> {
        let row = session_rows!("WHERE id = ?", id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(LoginSession::from))
    }

    /// Every pending session (for resuming their polling at start), oldest first.
    #[tracing::instrument(skip_all)]
    pub async fn pending_logins(&self) -> Result<Vec<LoginSession>> {
        let rows = session_rows!("WHERE status = 'pending' ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.into_iter().map(LoginSession::from).collect())
    }

    /// The number of pending sessions.
    pub async fn count_pending_logins(&self) -> Result<u64> {
        count_pending(&self.reader).await
    }

    /// What polling a pending session needs, opened. `Ok(None)` when the session is gone or no
    /// longer pending; a sealed value that does not open is a [`StoreError::Crypto`] (which
    /// names the field, never the value).
    #[tracing::instrument(skip_all)]
    pub async fn login_secrets(&self, id: &str) -> Result<Option<LoginSecrets>> {
        let Some(row) = sqlx::query!(
            "SELECT device_code_sealed, client_id, client_secret_sealed,
                    client_secret_expires_at, extra
             FROM oauth_sessions WHERE id = ? AND status = 'pending'",
            id
        )
        .fetch_optional(&self.reader)
        .await?
        else {
            return Ok(None);
        };
        let Some(sealed) = row.device_code_sealed else {
            return Ok(None);
        };
        let device_code = self.sealer.open(id, Field::DeviceCode, &sealed)?;
        let client = match (row.client_id, row.client_secret_sealed) {
            (Some(client_id), Some(sealed)) => Some(NewClient {
                client_id,
                client_secret: self.sealer.open(id, Field::ClientSecret, &sealed)?,
                client_secret_expires_at: row.client_secret_expires_at.map(from_unix),
            }),
            _ => None,
        };
        let extra = serde_json::from_str::<OauthExtra>(&row.extra).unwrap_or_else(|e| {
            tracing::warn!(session = id, error = %e, "a login's extra fields do not read");
            OauthExtra::default()
        });
        Ok(Some(LoginSecrets {
            device_code,
            client,
            extra,
        }))
    }

    /// Record the next poll of a pending session: its interval (raised by `slow_down`) and
    /// when it is due. False when the session is no longer pending.
    #[tracing::instrument(skip_all)]
    pub async fn set_login_poll(
        &self,
        id: &str,
        interval: Duration,
        next_poll_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (interval, next, ts) = (secs(interval), next_poll_at.timestamp(), now.timestamp());
        let mut tx = self.begin_write().await?;
        let n = sqlx::query!(
            "UPDATE oauth_sessions SET interval_secs = ?1, next_poll_at = ?2, updated_at = ?3
             WHERE id = ?4 AND status = 'pending'",
            interval,
            next,
            ts,
            id
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// End a pending session: `success` with its credential, or a final status with its
    /// message (cut to [`MAX_LOGIN_MESSAGE`] characters). Its sealed values are wiped in the
    /// same statement. False when it was not pending (ended already, or gone).
    #[tracing::instrument(skip_all)]
    pub async fn finish_login(&self, id: &str, end: &LoginEnd, now: DateTime<Utc>) -> Result<bool> {
        let (status, credential, message) = match end {
            LoginEnd::Success(cred) => (LoginStatus::Success, Some(cred.as_str()), None),
            // A pending end is no end: an error, so a session never stays pending for good.
            LoginEnd::Failed(LoginStatus::Pending | LoginStatus::Success, m) => {
                (LoginStatus::Error, None, Some(clip(m, MAX_LOGIN_MESSAGE)))
            }
            LoginEnd::Failed(status, m) => (*status, None, Some(clip(m, MAX_LOGIN_MESSAGE))),
        };
        let (status, ts) = (status.as_str(), now.timestamp());
        let mut tx = self.begin_write().await?;
        let n = sqlx::query!(
            "UPDATE oauth_sessions SET status = ?1, credential_id = ?2, message = ?3,
                 device_code_sealed = NULL, client_secret_sealed = NULL,
                 updated_at = ?4, finished_at = ?4
             WHERE id = ?5 AND status = 'pending'",
            status,
            credential,
            message,
            ts,
            id
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if n == 1 {
            // The session's sealed secrets were cleared: no old copy stays in the WAL. In the
            // background: the login's end is not held up by a checkpoint.
            let store = self.clone();
            tokio::spawn(async move { store.forget_old_secrets().await });
        }
        Ok(n == 1)
    }

    /// Housekeeping: pending sessions past their `expires_at` end `expired` (their secrets
    /// wiped), and sessions that ended before `finished_before` are deleted. Returns (expired,
    /// deleted).
    #[tracing::instrument(skip_all)]
    pub async fn prune_logins(
        &self,
        now: DateTime<Utc>,
        finished_before: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        let (ts, before) = (now.timestamp(), finished_before.timestamp());
        let mut tx = self.begin_write().await?;
        let expired = sqlx::query!(
            "UPDATE oauth_sessions SET status = 'expired',
                 message = 'the code expired before the login was approved',
                 device_code_sealed = NULL, client_secret_sealed = NULL,
                 updated_at = ?1, finished_at = ?1
             WHERE status = 'pending' AND expires_at <= ?1",
            ts
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let deleted = sqlx::query!(
            "DELETE FROM oauth_sessions WHERE status <> 'pending' AND finished_at < ?",
            before
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if expired > 0 {
            let store = self.clone();
            tokio::spawn(async move { store.forget_old_secrets().await });
        }
        Ok((expired, deleted))
    }
}

/// The number of pending sessions, as `conn` sees them (the reader, or the write
/// transaction that checks the limit before an insert).
async fn count_pending<'e>(conn: impl sqlx::SqliteExecutor<'e>) -> Result<u64> {
    let n = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "n!: i64" FROM oauth_sessions WHERE status = 'pending'"#
    )
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Encryption, EncryptionKey};
    use crate::store::test_options;
    use chrono::TimeZone;

    async fn store(dir: &std::path::Path, encryption: Encryption) -> Store {
        Store::open(test_options(dir, encryption)).await.unwrap()
    }

    fn key() -> EncryptionKey {
        EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap()
    }

    fn auth(client: bool) -> DeviceAuthorization {
        DeviceAuthorization {
            device_code: Secret::new("device-code-secret-123"),
            user_code: "ABCD-EFGH".into(),
            verification_uri: "https://example.test/device".into(),
            verification_uri_complete: Some("https://example.test/device?c=ABCD-EFGH".into()),
            expires_in: Duration::from_secs(900),
            interval: Duration::from_secs(5),
            client: client.then(|| NewClient {
                client_id: "client-1".into(),
                client_secret: Secret::new("client-secret-456"),
                client_secret_expires_at: Some(Utc.timestamp_opt(2_000_000_000, 0).unwrap()),
            }),
            extra: OauthExtra {
                region: Some("us-east-1".into()),
                ..Default::default()
            },
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[tokio::test]
    async fn a_session_from_insert_to_success_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Encryption::with_key(&key())).await;
        let kiro = ProviderName::from("kiro");
        let s = store
            .insert_login(&kiro, &auth(true), 100, t(0))
            .await
            .unwrap();
        assert!(s.id.starts_with("oas_") && s.id.len() == 24, "{}", s.id);
        assert_eq!(s.status, LoginStatus::Pending);
        assert_eq!(s.user_code, "ABCD-EFGH");
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.expires_at, t(900));
        assert_eq!(s.next_poll_at, t(5));
        assert!(!format!("{s:?}").contains("device-code-secret"));
        assert_eq!(store.pending_logins().await.unwrap(), vec![s.clone()]);
        assert_eq!(store.count_pending_logins().await.unwrap(), 1);

        let secrets = store.login_secrets(&s.id).await.unwrap().unwrap();
        assert_eq!(secrets.device_code.expose(), "device-code-secret-123");
        let client = secrets.client.as_ref().unwrap();
        assert_eq!(client.client_id, "client-1");
        assert_eq!(client.client_secret.expose(), "client-secret-456");
        assert_eq!(secrets.extra.region.as_deref(), Some("us-east-1"));
        let debug = format!("{secrets:?}");
        assert!(
            !debug.contains("secret-123") && !debug.contains("secret-456"),
            "{debug}"
        );

        assert!(
            store
                .set_login_poll(&s.id, Duration::from_secs(10), t(20), t(10))
                .await
                .unwrap()
        );
        let got = store.login(&s.id).await.unwrap().unwrap();
        assert_eq!(got.interval, Duration::from_secs(10));
        assert_eq!(got.next_poll_at, t(20));

        let cred = CredentialId::from("cred_x");
        let end = LoginEnd::Success(cred.clone());
        assert!(store.finish_login(&s.id, &end, t(30)).await.unwrap());
        // Once only.
        assert!(!store.finish_login(&s.id, &end, t(31)).await.unwrap());
        assert!(
            !store
                .set_login_poll(&s.id, Duration::from_secs(1), t(40), t(40))
                .await
                .unwrap()
        );
        let got = store.login(&s.id).await.unwrap().unwrap();
        assert_eq!(got.status, LoginStatus::Success);
        assert_eq!(got.credential_id, Some(cred));
        assert_eq!(got.finished_at, Some(t(30)));
        // Ended: no secrets left to poll with.
        assert!(store.login_secrets(&s.id).await.unwrap().is_none());
        assert!(store.pending_logins().await.unwrap().is_empty());

        // Kept an hour after it ended, then deleted.
        assert_eq!(store.prune_logins(t(60), t(29)).await.unwrap(), (0, 0));
        assert_eq!(store.prune_logins(t(4000), t(31)).await.unwrap(), (0, 1));
        assert!(store.login(&s.id).await.unwrap().is_none());
        store.close().await;
    }

    #[tokio::test]
    async fn failed_ends_expiry_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Encryption::off()).await;
        let p = ProviderName::from("copilot");
        let a = store.insert_login(&p, &auth(false), 2, t(0)).await.unwrap();
        assert!(
            store
                .login_secrets(&a.id)
                .await
                .unwrap()
                .unwrap()
                .client
                .is_none()
        );
        let b = store.insert_login(&p, &auth(false), 2, t(0)).await.unwrap();
        match store.insert_login(&p, &auth(false), 2, t(0)).await {
            Err(InsertLoginError::TooMany(2)) => {}
            other => panic!("{other:?}"),
        }
        let long = "x".repeat(1000);
        let end = LoginEnd::Failed(LoginStatus::Denied, long);
        assert!(store.finish_login(&a.id, &end, t(1)).await.unwrap());
        let got = store.login(&a.id).await.unwrap().unwrap();
        assert_eq!(got.status, LoginStatus::Denied);
        assert_eq!(got.message.unwrap().len(), MAX_LOGIN_MESSAGE);
        // Room again for one.
        let c = store.insert_login(&p, &auth(false), 2, t(0)).await.unwrap();
        // Past expires_at: expired by the housekeeping; the ended `a` is not touched yet.
        assert_eq!(store.prune_logins(t(900), t(0)).await.unwrap(), (2, 0));
        for id in [&b.id, &c.id] {
            let got = store.login(id).await.unwrap().unwrap();
            assert_eq!(got.status, LoginStatus::Expired);
            assert!(store.login_secrets(id).await.unwrap().is_none());
        }
        assert!(store.login("oas_nope").await.unwrap().is_none());
        store.close().await;
    }

    #[tokio::test]
    async fn rotating_the_key_deletes_the_pending_logins() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Encryption::with_key(&key())).await;
        let p = ProviderName::from("kiro");
        let pending = store
            .insert_login(&p, &auth(true), 100, t(0))
            .await
            .unwrap();
        let ended = store
            .insert_login(&p, &auth(true), 100, t(0))
            .await
            .unwrap();
        let end = LoginEnd::Failed(LoginStatus::Denied, "no".into());
        assert!(store.finish_login(&ended.id, &end, t(1)).await.unwrap());
        store.rekey(&Encryption::with_key(&key())).await.unwrap();
        assert!(store.login(&pending.id).await.unwrap().is_none());
        let kept = store.login(&ended.id).await.unwrap().unwrap();
        assert_eq!(kept.status, LoginStatus::Denied);
        store.close().await;
    }

    #[tokio::test]
    async fn a_pending_logins_secrets_are_sealed_when_encryption_is_turned_on() {
        let dir = tempfile::tempdir().unwrap();
        let store1 = store(dir.path(), Encryption::off()).await;
        let p = ProviderName::from("copilot");
        let s = store1
            .insert_login(&p, &auth(false), 100, t(0))
            .await
            .unwrap();
        let before = store1.login_secrets(&s.id).await.unwrap().unwrap();
        let code = before.material().device_code.expose().to_string();
        store1.close().await;
        drop(store1);
        // Encryption turned on: the device code stored in clear is sealed at the start, and
        // opens as before.
        let store2 = store(dir.path(), Encryption::with_key(&key())).await;
        let after = store2.login_secrets(&s.id).await.unwrap().unwrap();
        assert_eq!(after.material().device_code.expose(), code);
        let raw: Vec<u8> =
            sqlx::query_scalar("SELECT device_code_sealed FROM oauth_sessions WHERE id = ?")
                .bind(&s.id)
                .fetch_one(&store2.reader)
                .await
                .unwrap();
        assert!(!raw.windows(code.len()).any(|w| w == code.as_bytes()));
        store2.close().await;
    }
}
