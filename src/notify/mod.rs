//! Webhook notifications of credential events (README, "Notifications").
//!
//! Producers (the request path's marks and rotations, the quota reset job) hand an [`Event`] to
//! the [`Notifier`], which puts it on the bounded queue of every webhook that subscribed to
//! its kind and returns at once: nothing on the request path waits for a receiver. One task per
//! webhook ([`deliver`]) posts each event as signed JSON, with the configured timeout and
//! retries with backoff, so a dead or slow receiver holds up only its own queue. A full queue
//! drops its oldest event and counts it ([`queue::DropQueue`]).
//!
//! An event carries ids, the provider, a reason and a time, never a secret. Each event also
//! has its line in `logs/auth.log`, written where the event is made.

mod deliver;
pub mod queue;

use crate::crypto::Secret;
use chrono::{DateTime, Utc};
use queue::DropQueue;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Events waiting per webhook before the oldest is dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// How long a stopping server lets deliveries under way finish before it drops them.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// What happened to a credential or a provider; the names are the config's and the body's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "credential.exhausted")]
    CredentialExhausted,
    #[serde(rename = "credential.invalid")]
    CredentialInvalid,
    #[serde(rename = "credential.expired")]
    CredentialExpired,
    #[serde(rename = "credential.cooldown")]
    CredentialCooldown,
    /// A request moved on to another credential after a failed attempt.
    #[serde(rename = "credential.rotated")]
    CredentialRotated,
    #[serde(rename = "credential.refreshed")]
    CredentialRefreshed,
    #[serde(rename = "refresh.failed")]
    RefreshFailed,
    /// One provider's quota period reset.
    #[serde(rename = "quota.reset")]
    QuotaReset,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CredentialExhausted => "credential.exhausted",
            EventKind::CredentialInvalid => "credential.invalid",
            EventKind::CredentialExpired => "credential.expired",
            EventKind::CredentialCooldown => "credential.cooldown",
            EventKind::CredentialRotated => "credential.rotated",
            EventKind::CredentialRefreshed => "credential.refreshed",
            EventKind::RefreshFailed => "refresh.failed",
            EventKind::QuotaReset => "quota.reset",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event, as its JSON body says it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: EventKind,
    pub provider: String,
    /// Absent for events of a whole provider (`quota.reset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    pub reason: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// Unique per event, the same on every retry, so a receiver can drop a repeat.
    pub id: String,
}

fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::domain::rfc3339(*at))
}

impl Event {
    pub fn new(
        event: EventKind,
        provider: &str,
        credential_id: Option<&str>,
        reason: impl Into<String>,
        at: DateTime<Utc>,
    ) -> Event {
        Event {
            event,
            provider: provider.to_string(),
            credential_id: credential_id.map(str::to_string),
            reason: reason.into(),
            at,
            id: format!("evt_{:032x}", rand::random::<u128>()),
        }
    }
}

/// One webhook: where it is, what it wants, and the secret its bodies are signed with.
pub struct Webhook {
    pub url: String,
    pub events: Vec<EventKind>,
    pub secret: Secret,
}

/// The handle producers send events through; clones share it. [`Notifier::none`] sends
/// nothing (no webhook configured, or a command that serves no requests).
#[derive(Clone, Default)]
pub struct Notifier(Arc<Inner>);

#[derive(Default)]
struct Inner {
    hooks: Vec<Hook>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Hook {
    events: Vec<EventKind>,
    queue: Arc<DropQueue<Arc<Event>>>,
}

impl Notifier {
    /// A notifier with no webhook.
    pub fn none() -> Notifier {
        Notifier::default()
    }

    /// Start a delivery task per webhook (inside the runtime), each posting within `timeout`.
    pub fn start(webhooks: Vec<Webhook>, timeout: Duration) -> Result<Notifier, String> {
        if webhooks.is_empty() {
            return Ok(Notifier::none());
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the webhook client: {e}"))?;
        let mut hooks = Vec::new();
        let mut tasks = Vec::new();
        for hook in webhooks {
            let queue = Arc::new(DropQueue::new(QUEUE_CAPACITY, deliver::origin(&hook.url)));
            hooks.push(Hook {
                events: hook.events,
                queue: queue.clone(),
            });
            let target = deliver::Target::new(client.clone(), hook.url, hook.secret);
            tasks.push(tokio::spawn(deliver::run(target, queue)));
        }
        Ok(Notifier(Arc::new(Inner {
            hooks,
            tasks: Mutex::new(tasks),
        })))
    }

    /// Queue `event` for every webhook that wants its kind. Never waits.
    pub fn send(&self, event: Event) {
        let mut shared: Option<Arc<Event>> = None;
        for hook in &self.0.hooks {
            if hook.events.contains(&event.event) {
                let e = shared.get_or_insert_with(|| Arc::new(event.clone()));
                hook.queue.push(e.clone());
            }
        }
    }

    /// Events dropped from full queues so far, all webhooks together.
    pub fn dropped(&self) -> u64 {
        self.0.hooks.iter().map(|h| h.queue.dropped()).sum()
    }

    /// Stop delivering: queued events are dropped, and deliveries under way get `grace` to
    /// finish before they are cut.
    pub async fn stop(&self, grace: Duration) {
        for hook in &self.0.hooks {
            hook.queue.close();
        }
        let tasks = std::mem::take(&mut *self.0.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + grace;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_names_no_credential_for_a_provider_event() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = Event::new(EventKind::QuotaReset, "claude", None, "reset", at);
        let body: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(body["event"], "quota.reset");
        assert_eq!(body["at"], "2026-01-02T03:04:05Z");
        assert!(body.get("credential_id").is_none(), "{body}");
        let other = Event::new(
            EventKind::CredentialInvalid,
            "openai",
            Some("c1"),
            "401",
            at,
        );
        assert_ne!(e.id, other.id);
        assert_eq!(serde_json::to_value(&other).unwrap()["credential_id"], "c1");
    }

    #[test]
    fn every_name_reads_back() {
        for kind in [
            EventKind::CredentialExhausted,
            EventKind::CredentialInvalid,
            EventKind::CredentialExpired,
            EventKind::CredentialCooldown,
            EventKind::CredentialRotated,
            EventKind::CredentialRefreshed,
            EventKind::RefreshFailed,
            EventKind::QuotaReset,
        ] {
            let text = serde_json::to_string(&kind).unwrap();
            assert_eq!(text, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<EventKind>(&text).unwrap(), kind);
        }
    }
}
