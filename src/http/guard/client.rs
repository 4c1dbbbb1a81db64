//! The client-key check: `api_keys` compared in constant time, wrong keys counted per address.

use super::ban_table::{self, BanKey, Bans};
use crate::crypto::{Fingerprinter, Secret};
use crate::http::caller::Caller;
use crate::http::error::ApiError;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use subtle::ConstantTimeEq;

/// Client keys shorter than this get a warning at start: they are guessed online, and a
/// loopback peer is never banned for wrong ones.
pub const SHORT_KEY_CHARS: usize = 16;

/// The client-key guard's state: digests of `api_keys` under a per-process key (so every
/// compare is of 32 bytes, whatever the lengths) and its table of bans.
pub struct ClientAuth {
    digests: Vec<Vec<u8>>,
    digester: Fingerprinter,
    bans: Bans,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("keys", &self.digests.len())
            .finish()
    }
}

impl ClientAuth {
    pub fn new(api_keys: &[Secret]) -> ClientAuth {
        for (i, key) in api_keys.iter().enumerate() {
            if key.expose().chars().count() < SHORT_KEY_CHARS {
                tracing::warn!(
                    "api_keys: entry {i} is shorter than {SHORT_KEY_CHARS} characters; client keys can be guessed online, so use long random ones (such as the output of `cliproxyapi gen-key`)"
                );
            }
        }
        let digester = Fingerprinter::new(Fingerprinter::random_key());
        ClientAuth {
            digests: api_keys
                .iter()
                .map(|k| digester.content(k.expose().as_bytes()))
                .collect(),
            digester,
            bans: Bans::new(ban_table::CLIENT_RULE),
        }
    }

    /// The same, with a smaller table of bans.
    #[cfg(test)]
    fn with_ban_capacity(mut self, max_tracked: usize) -> ClientAuth {
        self.bans = Bans::with_capacity(ban_table::CLIENT_RULE, max_tracked);
        self
    }

    /// Whether any client key is configured (`api_keys` is not empty).
    pub fn has_keys(&self) -> bool {
        !self.digests.is_empty()
    }

    pub fn bans(&self) -> &Bans {
        &self.bans
    }

    /// Decide on one `/v1/*` call from `caller` presenting `presented` at `now`.
    ///
    /// A direct loopback peer is never banned nor counted: all of loopback is one address, so
    /// one local application retrying with a stale key would otherwise lock every other one
    /// out. A local process that wants to guess can do so (without a ban it is only slowed by
    /// how fast the server answers); client keys are long random secrets, and a process on
    /// this machine is already past most of what the bans defend.
    pub fn check(
        &self,
        caller: &Caller,
        presented: Option<&[u8]>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        if self.digests.is_empty() {
            if caller.is_loopback() {
                return Ok(());
            }
            caller.client_or_refuse()?;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_clients_disabled",
                "This server answers only loopback clients until api_keys are configured",
            ));
        }
        let key = BanKey::of(caller.client_or_refuse()?);
        let counted = !caller.is_direct_loopback();
        if counted {
            self.bans.check(key, now)?;
        }
        let Some(presented) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "Send an API key as Authorization: Bearer KEY, x-api-key, x-goog-api-key or ?key=",
            ));
        };
        let digest = self.digester.content(presented);
        // Every key is compared, so the time taken does not tell which one matched.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&digest));
        if bool::from(matched) {
            return Ok(());
        }
        if counted {
            // False when even the block was full: the key was compared uncounted, as the
            // table's doc explains, rather than every new address refused.
            let _ = self.bans.record_failure(key, now);
        }
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "The API key is not one of this server's",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn remote(ip: &str) -> Caller {
        Caller::resolve(Some(ip.parse().unwrap()), &HeaderMap::new(), &[])
    }

    fn forwarded(peer: &str, xff: &str, trusted: &str) -> Caller {
        let trusted: Vec<crate::config::Cidr> =
            vec![serde_json::from_value(serde_json::json!(trusted)).unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        Caller::resolve(Some(peer.parse().unwrap()), &h, &trusted)
    }

    fn code(r: Result<(), ApiError>) -> &'static str {
        r.map_or_else(|e| e.code, |()| "ok")
    }

    const RIGHT: &[u8] = b"sk-client-1-0123456789";

    #[test]
    fn client_keys_are_counted_and_banned() {
        let auth = ClientAuth::new(&[Secret::new("sk-client-1-0123456789"), Secret::new("k2")]);
        let now = Utc::now();
        let a = remote("192.0.2.1");
        for k in [RIGHT, b"k2"] {
            assert!(auth.check(&a, Some(k), now).is_ok());
        }
        for wrong in [
            &b""[..],
            b"sk-client-1-012345678",
            b"sk-client-1-01234567890",
            b"K2",
            b"k2 ",
            b"\xff",
        ] {
            assert_eq!(code(auth.check(&a, Some(wrong), now)), "invalid_api_key");
        }
        // A missing key is not a guess.
        for _ in 0..50 {
            assert_eq!(code(auth.check(&a, None, now)), "missing_api_key");
        }
        for _ in 0..4 {
            assert_eq!(code(auth.check(&a, Some(b"y"), now)), "invalid_api_key");
        }
        // The tenth wrong key banned the address: even the right key is refused now.
        let e = auth.check(&a, Some(RIGHT), now).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (403, "too_many_attempts"));
        assert_eq!(e.retry_after, Some(15 * 60));
        // Another address is not.
        assert!(auth.check(&remote("192.0.2.2"), Some(b"k2"), now).is_ok());
        let later = now + chrono::Duration::minutes(15);
        assert!(auth.check(&a, Some(RIGHT), later).is_ok());
    }

    #[test]
    fn a_direct_loopback_peer_is_never_banned() {
        let auth = ClientAuth::new(&[Secret::new("sk-client-1-0123456789")]);
        let now = Utc::now();
        let local = ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.255.255.254"];
        // A stale local application, retrying a thousand times.
        for i in 0..1000 {
            let caller = remote(local[i % local.len()]);
            assert_eq!(
                code(auth.check(&caller, Some(b"stale"), now)),
                "invalid_api_key"
            );
        }
        for ip in local {
            assert!(auth.check(&remote(ip), Some(RIGHT), now).is_ok(), "{ip}");
        }
        assert!(auth.bans().list(now).is_empty());
        assert!(auth.bans().take_events().is_empty());
        // A loopback client forwarded by a proxy is counted (as loopback), a remote one by
        // its address; neither ban reaches the direct peers.
        let via_proxy = forwarded("127.0.0.1", "::1", "127.0.0.1");
        let far = remote("198.51.100.1");
        for caller in [via_proxy, far] {
            for _ in 0..10 {
                assert_eq!(
                    code(auth.check(&caller, Some(b"x"), now)),
                    "invalid_api_key"
                );
            }
            assert_eq!(
                code(auth.check(&caller, Some(RIGHT), now)),
                "too_many_attempts"
            );
        }
        let banned: Vec<String> = auth
            .bans()
            .list(now)
            .iter()
            .map(|b| b.key.to_string())
            .collect();
        assert_eq!(banned, ["loopback", "198.51.100.1"]);
        for ip in local {
            assert!(auth.check(&remote(ip), Some(RIGHT), now).is_ok(), "{ip}");
        }
    }

    #[test]
    fn a_full_ban_table_refuses_no_new_client() {
        let auth = ClientAuth::new(&[Secret::new("sk-client-1-0123456789")]).with_ban_capacity(4);
        let now = Utc::now();
        let guess = |ip: &str| {
            for _ in 0..10 {
                assert_eq!(
                    code(auth.check(&remote(ip), Some(b"guess"), now)),
                    "invalid_api_key",
                    "{ip}"
                );
            }
        };
        // Four addresses banned fill the addresses; four /48s of /64s fill the blocks.
        for i in 0..4 {
            guess(&format!("2001:db8:0:{i:x}::1"));
        }
        for i in 1..=4 {
            guess(&format!("2001:db8:{i:x}::1"));
        }
        assert_eq!(auth.bans().list(now).len(), 8);
        // Addresses the table cannot hold: from the first to the hundredth, the right key
        // passes and wrong keys are answered as wrong, never 503.
        for i in 0..100u32 {
            let ip = format!("203.0.113.{}", i % 256);
            assert!(auth.check(&remote(&ip), Some(RIGHT), now).is_ok(), "{ip}");
            let ip6 = format!("2001:db8:ff{i:02x}::1");
            assert_eq!(
                code(auth.check(&remote(&ip6), Some(b"guess"), now)),
                "invalid_api_key"
            );
            assert!(auth.check(&remote(&ip6), Some(RIGHT), now).is_ok(), "{ip6}");
        }
        // The banned keep their bans: the addresses, and every /64 of a banned /48.
        for ip in ["2001:db8:0:3::9", "2001:db8:4:ffff::1"] {
            assert_eq!(
                code(auth.check(&remote(ip), Some(RIGHT), now)),
                "too_many_attempts",
                "{ip}"
            );
        }
        // And the table says it went uncounted.
        let events = auth.bans().take_events();
        assert!(
            events.iter().any(|e| e.contains("not counted")),
            "{events:?}"
        );
    }

    #[test]
    fn a_remote_proxy_forwarding_loopback_is_not_a_local_client() {
        let open = ClientAuth::new(&[]);
        let now = Utc::now();
        for (peer, trusted) in [("192.0.2.2", "192.0.2.0/24"), ("2001:db8::2", "::/0")] {
            for xff in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
                let e = open
                    .check(&forwarded(peer, xff, trusted), None, now)
                    .unwrap_err();
                assert_eq!(
                    (e.status.as_u16(), e.code),
                    (403, "remote_clients_disabled"),
                    "{peer} {xff}"
                );
            }
        }
        assert!(
            open.check(&forwarded("127.0.0.1", "::1", "127.0.0.1"), None, now)
                .is_ok()
        );
        assert!(open.check(&remote("::1"), None, now).is_ok());
    }
}
