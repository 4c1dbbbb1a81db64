//! One webhook's delivery task: take the next event from its queue, post it signed, and retry
//! what may pass later (a connection error or timeout, a 5xx, a 429) after 1 s, 2 s and 4 s;
//! then give it up with a warning. Other answers are final. The events of one webhook go out
//! in order, one at a time; another webhook's task is not held up by this one's.

use super::Event;
use super::queue::DropQueue;
use crate::crypto::Secret;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// The waits before each retry.
const BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// The header with the body's signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-cliproxy-signature";
/// The header naming the event.
pub const EVENT_HEADER: &str = "x-cliproxy-event";

/// Where one webhook's events go, and the secret that signs them.
pub(super) struct Target {
    client: reqwest::Client,
    url: String,
    /// What the logs name: the URL's origin only, as a path or query may hold a receiver's
    /// token.
    shown: String,
    secret: Secret,
}

impl Target {
    pub(super) fn new(client: reqwest::Client, url: String, secret: Secret) -> Target {
        Target {
            client,
            shown: origin(&url),
            url,
            secret,
        }
    }
}

/// `scheme://host[:port]` of `url`, for logs.
pub(super) fn origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => "(a webhook)".to_string(),
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Deliver the queue's events until it is closed.
pub(super) async fn run(target: Target, queue: Arc<DropQueue<Arc<Event>>>) {
    while let Some(event) = queue.pop().await {
        deliver(&target, &event).await;
    }
}

/// Whether an answer is worth another try.
fn retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

async fn deliver(target: &Target, event: &Event) {
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "cannot write a webhook body");
            return;
        }
    };
    let signature = signature(&target.secret, &body);
    let mut waits = BACKOFF.iter();
    loop {
        let sent = target
            .client
            .post(&target.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, &signature)
            .header(EVENT_HEADER, event.event.as_str())
            .body(body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(answer) if answer.status().is_success() => return,
            Ok(answer) if !retryable(answer.status()) => {
                tracing::warn!(
                    webhook = %target.shown, event = %event.event, id = %event.id,
                    status = answer.status().as_u16(),
                    "the webhook refused an event; it is not sent again"
                );
                return;
            }
            Ok(answer) => format!("status {}", answer.status().as_u16()),
            // Without the URL, which the logs name by its origin only.
            Err(e) => e.without_url().to_string(),
        };
        let Some(wait) = waits.next() else {
            tracing::warn!(
                webhook = %target.shown, event = %event.event, id = %event.id, error = %failure,
                "cannot deliver an event to the webhook after {} retries; giving it up",
                BACKOFF.len()
            );
            return;
        };
        tracing::debug!(
            webhook = %target.shown, event = %event.event, error = %failure,
            "webhook delivery failed; retrying in {wait:?}"
        );
        tokio::time::sleep(*wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_name_the_origin_only() {
        assert_eq!(
            origin("https://hooks.example:8443/T000/B000/XXXX?token=abc"),
            "https://hooks.example:8443"
        );
    }

    #[test]
    fn the_signature_is_rfc_4231s() {
        // RFC 4231, test case 2.
        let secret = Secret::new("Jefe");
        assert_eq!(
            signature(&secret, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
