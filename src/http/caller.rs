//! Who is calling: the address both guards ban, the loopback rules test and the audit log
//! names. It is the TCP peer's, unless the peer is one of `server.trusted_proxies`; then it is
//! the last hop of `X-Forwarded-For` that is not itself a trusted proxy.
//!
//! The header is read from the right, because each proxy appends the address it received the
//! request from: the rightmost entries were written by our own proxies and can be believed,
//! while everything left of the first untrusted hop was written by the client and could say
//! anything. Reading stops at the first entry that is not a bare IP address (a port, a name,
//! `unknown`, an empty item, bytes that are not text) or after [`MAX_HOPS`] entries: the client
//! is then the last address read, the nearest hop a trusted proxy vouched for, so a bad entry
//! can only move the blame towards our proxies, never to an address the client chose. When
//! not even the rightmost entry is an address, the client is unknown and both guards refuse the
//! request (400 `invalid_forwarded_for`): a trusted proxy that sends that is misconfigured,
//! and treating its callers as the proxy itself would make every one of them share one
//! address (and, for a proxy on the same machine, loopback's rights).
//!
//! Without the header, a trusted peer is the client. `Forwarded` and `X-Real-IP` are not read.

use super::error::ApiError;
use crate::config::Cidr;
use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use std::net::{IpAddr, SocketAddr};

/// Entries of `X-Forwarded-For` read at most; a longer chain of trusted proxies is not real.
pub const MAX_HOPS: usize = 32;

/// The client of one request, as the guards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The TCP peer, if the connection has one (always, behind the real listener).
    pub peer: Option<IpAddr>,
    /// The client: the peer, or the address a trusted proxy forwarded. `None` when it cannot
    /// be known (no peer, or a trusted proxy's unreadable header).
    pub client: Option<IpAddr>,
    /// Whether the request came through a trusted proxy that named its client.
    pub forwarded: bool,
}

impl Caller {
    /// The caller of a request whose TCP peer is `peer` (canonical: an IPv4-mapped IPv6
    /// address is its IPv4 address).
    pub fn resolve(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[Cidr]) -> Caller {
        let peer = peer.map(|ip| ip.to_canonical());
        let direct = Caller {
            peer,
            client: peer,
            forwarded: false,
        };
        let Some(p) = peer else { return direct };
        if !is_trusted(p, trusted) {
            return direct;
        }
        let mut values = headers.get_all("x-forwarded-for").iter().peekable();
        if values.peek().is_none() {
            return direct;
        }
        // Several header lines are one list, in order.
        let lines: Vec<Option<&str>> = values.map(|v| v.to_str().ok()).collect();
        let mut last_trusted = None;
        let mut walked = 0;
        'lines: for line in lines.iter().rev() {
            let Some(line) = line else { break };
            for entry in line.rsplit(',') {
                walked += 1;
                if walked > MAX_HOPS {
                    break 'lines;
                }
                let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                    break 'lines;
                };
                let ip = ip.to_canonical();
                if !is_trusted(ip, trusted) {
                    return Caller {
                        peer,
                        client: Some(ip),
                        forwarded: true,
                    };
                }
                last_trusted = Some(ip);
            }
        }
        Caller {
            peer,
            client: last_trusted,
            forwarded: true,
        }
    }

    /// The caller of an axum request (the peer from `ConnectInfo`).
    pub fn of_request(req: &Request, trusted: &[Cidr]) -> Caller {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Caller::resolve(peer, req.headers(), trusted)
    }

    /// Whether the client is on this machine (the loopback rules).
    pub fn is_loopback(&self) -> bool {
        self.client.is_some_and(|ip| ip.is_loopback())
    }

    /// Whether the TCP peer itself is on this machine and speaks for itself (not a proxy
    /// forwarding someone else): the operator at the console.
    pub fn is_direct_loopback(&self) -> bool {
        !self.forwarded && self.peer.is_some_and(|ip| ip.is_loopback())
    }

    /// The client's address, or the refusal both guards give when it cannot be known.
    pub fn client_or_refuse(&self) -> Result<IpAddr, ApiError> {
        self.client.ok_or_else(|| {
            if self.forwarded {
                ApiError::bad_request(
                    "invalid_forwarded_for",
                    "The X-Forwarded-For header from the reverse proxy does not end with a client address",
                )
            } else {
                ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "unknown_client",
                    "The client's address is unknown",
                )
            }
        })
    }

    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match self.client {
            Some(ip) => ip.to_string(),
            None => "unknown".into(),
        }
    }
}

fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter()
            .map(|s| serde_json::from_value(serde_json::json!(s)).unwrap())
            .collect()
    }

    fn xff(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn client(peer: &str, values: &[&[u8]], trusted: &[&str]) -> Caller {
        Caller::resolve(Some(peer.parse().unwrap()), &xff(values), &cidrs(trusted))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let all: &[&[&[u8]]] = &[
            &[],
            &[b"127.0.0.1"],
            &[b"203.0.113.9, 127.0.0.1"],
            &[b"garbage"],
            &[b"::1", b"127.0.0.1"],
        ];
        for trusted in [&[][..], &["10.0.0.0/8"], &["::1"]] {
            for values in all {
                let c = client("192.0.2.1", values, trusted);
                assert_eq!(c.client, ip("192.0.2.1"), "{values:?} {trusted:?}");
                assert!(!c.forwarded && !c.is_loopback() && !c.is_direct_loopback());
            }
        }
        // A local client not listed as a proxy keeps loopback, and its header is ignored.
        let c = client("127.0.0.1", &[b"203.0.113.9"], &["10.0.0.0/8"]);
        assert!(c.is_loopback() && c.is_direct_loopback());
        let c = client("::ffff:127.0.0.1", &[], &[]);
        assert_eq!(c.client, ip("127.0.0.1"));
        assert!(c.is_direct_loopback());
    }

    #[test]
    fn a_trusted_peer_names_the_last_untrusted_hop() {
        let t = &["10.0.0.0/8", "::1", "127.0.0.1", "2001:db8:ffff::/48"];
        let cases: &[(&str, &[&[u8]], &str)] = &[
            // One hop, with and without spaces.
            ("10.0.0.1", &[b"203.0.113.5"], "203.0.113.5"),
            ("10.0.0.1", &[b"  203.0.113.5  "], "203.0.113.5"),
            // What the client wrote (left) is never believed.
            ("10.0.0.1", &[b"127.0.0.1, 203.0.113.5"], "203.0.113.5"),
            (
                "10.0.0.1",
                &[b"1.2.3.4,198.51.100.7,10.9.9.9"],
                "198.51.100.7",
            ),
            // Several trusted hops, over several header lines.
            (
                "127.0.0.1",
                &[b"8.8.8.8, 203.0.113.5", b"10.1.1.1", b"10.2.2.2,10.3.3.3"],
                "203.0.113.5",
            ),
            // IPv6 clients and proxies, and IPv4-mapped forms.
            ("::1", &[b"2001:db8:1:2::99"], "2001:db8:1:2::99"),
            (
                "::ffff:10.0.0.1",
                &[b"::ffff:203.0.113.5, 2001:db8:ffff::1"],
                "203.0.113.5",
            ),
            // Every hop trusted: the leftmost is the client (it is inside our network).
            ("10.0.0.1", &[b"10.7.7.7, 10.8.8.8"], "10.7.7.7"),
            ("127.0.0.1", &[b"127.0.0.1"], "127.0.0.1"),
            // A bad entry stops the walk: the nearest address on its right is the client.
            ("10.0.0.1", &[b"garbage, 10.4.4.4"], "10.4.4.4"),
            ("10.0.0.1", &[b"203.0.113.1, unknown, 10.4.4.4"], "10.4.4.4"),
            ("10.0.0.1", &[b"203.0.113.1:8080, 10.4.4.4"], "10.4.4.4"),
            ("10.0.0.1", &[b"203.0.113.1,,10.4.4.4"], "10.4.4.4"),
            ("10.0.0.1", &[b"[2001:db8::1], 10.4.4.4"], "10.4.4.4"),
            ("10.0.0.1", &[b"\xff\xfe", b"10.4.4.4"], "10.4.4.4"),
        ];
        for (peer, values, want) in cases {
            let c = client(peer, values, t);
            assert_eq!(c.client, ip(want), "{peer} {values:?}");
            assert!(c.forwarded && !c.is_direct_loopback(), "{peer} {values:?}");
        }
        // A forwarded loopback client is loopback for the loopback rules, but not the
        // operator at the console.
        let c = client("127.0.0.1", &[b"127.0.0.1"], t);
        assert!(c.is_loopback() && !c.is_direct_loopback());
        // A trusted peer without the header is the client itself.
        let c = client("10.0.0.1", &[], t);
        assert_eq!((c.client, c.forwarded), (ip("10.0.0.1"), false));
    }

    #[test]
    fn an_unreadable_header_from_a_trusted_peer_is_refused() {
        let t = &["10.0.0.0/8", "127.0.0.1"];
        let long = vec!["10.1.1.1"; MAX_HOPS + 1].join(",");
        let bad: &[&[&[u8]]] = &[
            &[b""],
            &[b" "],
            &[b","],
            &[b"garbage"],
            &[b"unknown"],
            &[b"203.0.113.5:443"],
            &[b"203.0.113.5, "],
            &[b"203.0.113.5,garbage"],
            &[b"localhost"],
            &[b"999.1.1.1"],
            &[b"\xff"],
            &[b"203.0.113.5", b"\x80"],
            &[b"fe80::1%eth0"],
        ];
        for values in bad {
            for peer in ["10.0.0.1", "127.0.0.1"] {
                let c = client(peer, values, t);
                assert_eq!(c.client, None, "{peer} {values:?}");
                assert!(!c.is_loopback() && !c.is_direct_loopback());
                let e = c.client_or_refuse().unwrap_err();
                assert_eq!((e.status.as_u16(), e.code), (400, "invalid_forwarded_for"));
            }
        }
        // Past MAX_HOPS trusted entries the walk stops at the last one read.
        let c = client("10.0.0.1", &[format!("203.0.113.5,{long}").as_bytes()], t);
        assert_eq!(c.client, ip("10.1.1.1"));
        let c = Caller::resolve(None, &xff(&[b"203.0.113.5"]), &cidrs(t));
        assert_eq!(c.client, None);
        assert_eq!(c.client_or_refuse().unwrap_err().code, "unknown_client");
    }
}
