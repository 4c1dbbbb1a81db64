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
//! A loopback address in the header means the machine of the hop that wrote it (the entry on
//! its right, or the peer for the rightmost): a proxy on another host that names 127.0.0.1 is
//! forwarding a process on *its* host. So a forwarded loopback client is loopback here only
//! when every hop between it and us, the peer included, is loopback too; otherwise the client
//! is the nearest of those hops that is not, a remote client like any other. Without that, a
//! trusted proxy elsewhere (or anyone inside a broad trusted block) could claim
//! `X-Forwarded-For: 127.0.0.1` and get loopback's rights, or share loopback's bans.
//!
//! Without the header, a trusted peer is the client. `Forwarded` and `X-Real-IP` are not read.

use super::error::ApiError;
use crate::config::Cidr;
use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use std::net::{IpAddr, SocketAddr};

/// Entries of `X-Forwarded-For` read at most; a longer chain of trusted proxies is not real.
pub const MAX_HOPS: usize = 32;

/// IPv4 blocks in `server.trusted_proxies` shorter than this prefix get a warning at start.
pub const BROAD_V4_PREFIX: u8 = 8;
/// IPv6 blocks shorter than this prefix (a whole ISP's allocation) get a warning at start.
pub const BROAD_V6_PREFIX: u8 = 32;

/// The client of one request, as the guards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The TCP peer, if the connection has one (always, behind the real listener).
    pub peer: Option<IpAddr>,
    /// The client: the peer, or the address a trusted proxy forwarded. `None` when it cannot
    /// be known (no peer, or a trusted proxy's unreadable header). Loopback only when the
    /// whole path to us is.
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
        let forwarded = |client: Option<IpAddr>| Caller {
            peer,
            client,
            forwarded: true,
        };
        // Several header lines are one list, in order.
        let lines: Vec<Option<&str>> = values.map(|v| v.to_str().ok()).collect();
        // The nearest hop walked so far (the peer first) that is not loopback: the machine
        // whose loopback the next entry to the left would be.
        let mut machine = (!p.is_loopback()).then_some(p);
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
                    return forwarded(Some(on_our_side(ip, machine)));
                }
                last_trusted = Some(on_our_side(ip, machine));
                if !ip.is_loopback() {
                    machine = Some(ip);
                }
            }
        }
        forwarded(last_trusted)
    }

    /// The caller of an axum request (the peer from `ConnectInfo`).
    pub fn of_request(req: &Request, trusted: &[Cidr]) -> Caller {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Caller::resolve(peer, req.headers(), trusted)
    }

    /// Whether the client is on this machine (the loopback rules): a loopback client over a
    /// loopback peer ([`Caller::resolve`] checks the hops between).
    pub fn is_loopback(&self) -> bool {
        self.client.is_some_and(|ip| ip.is_loopback())
            && self.peer.is_some_and(|ip| ip.is_loopback())
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

/// A forwarded address as seen from here: a loopback address written by a hop on another
/// machine names that machine.
fn on_our_side(ip: IpAddr, machine: Option<IpAddr>) -> IpAddr {
    match machine {
        Some(m) if ip.is_loopback() => m,
        _ => ip,
    }
}

/// What is wrong with an entry of `server.trusted_proxies`, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustProblem {
    /// Wider than an IPv4 /8 or an IPv6 /32: every host in it may name any client. (An
    /// IPv4-mapped block is read as the IPv4 block it names, see `config::Cidr`.)
    Broad,
}

impl TrustProblem {
    /// The problem with `cidr`, if it has one.
    pub fn of(cidr: &Cidr) -> Option<TrustProblem> {
        match cidr.0 {
            ipnet::IpNet::V4(n) if n.prefix_len() < BROAD_V4_PREFIX => Some(TrustProblem::Broad),
            ipnet::IpNet::V4(_) => None,
            ipnet::IpNet::V6(n) if n.prefix_len() < BROAD_V6_PREFIX => Some(TrustProblem::Broad),
            ipnet::IpNet::V6(_) => None,
        }
    }
}

/// Warn, at start, about entries of `server.trusted_proxies` that trust far more than a
/// reverse proxy: every host inside such a block can pick the address the bans count and the
/// audit log names (though never loopback's rights, unless it is on this machine).
pub fn warn_about_trusted_proxies(trusted: &[Cidr]) {
    for cidr in trusted {
        match TrustProblem::of(cidr) {
            Some(TrustProblem::Broad) => tracing::warn!(
                "server.trusted_proxies: {} trusts every host in a block that wide to name its own client in X-Forwarded-For, so any of them can choose the address that is banned and logged; list only your reverse proxies (IPv4 blocks of /{BROAD_V4_PREFIX} or narrower, IPv6 /{BROAD_V6_PREFIX} or narrower)",
                cidr.0
            ),
            None => {}
        }
    }
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
    fn a_forwarded_loopback_client_is_loopback_only_over_a_loopback_path() {
        let t = &[
            "192.0.2.0/24",
            "10.0.0.0/8",
            "127.0.0.0/8",
            "::1",
            "2001:db8:aa::/48",
        ];
        // (peer, X-Forwarded-For, the client, loopback).
        let cases: &[(&str, &[&[u8]], &str, bool)] = &[
            // A proxy on another host naming loopback forwards a process on its own host,
            // in every spelling of loopback.
            ("192.0.2.2", &[b"127.0.0.1"], "192.0.2.2", false),
            ("192.0.2.2", &[b"127.255.255.254"], "192.0.2.2", false),
            ("192.0.2.2", &[b"::1"], "192.0.2.2", false),
            ("192.0.2.2", &[b"::ffff:127.0.0.1"], "192.0.2.2", false),
            ("::ffff:192.0.2.2", &[b"127.0.0.1"], "192.0.2.2", false),
            ("2001:db8:aa::5", &[b"::1"], "2001:db8:aa::5", false),
            ("2001:db8:aa::5", &[b"127.0.0.1"], "2001:db8:aa::5", false),
            // What a client writes on the left of a remote proxy changes nothing.
            (
                "192.0.2.2",
                &[b"127.0.0.1, ::1, 127.0.0.1"],
                "192.0.2.2",
                false,
            ),
            ("192.0.2.2", &[b"garbage, 127.0.0.1"], "192.0.2.2", false),
            // A loopback hop right of a remote one is that remote machine's.
            ("127.0.0.1", &[b"127.0.0.1, 10.0.0.5"], "10.0.0.5", false),
            ("::1", &[b"::1, 10.0.0.5, 127.0.0.1"], "10.0.0.5", false),
            (
                "127.0.0.1",
                &[b"127.0.0.1", b"2001:db8:aa::9", b"::1"],
                "2001:db8:aa::9",
                false,
            ),
            // The nearest remote hop counts, not the farthest.
            (
                "127.0.0.1",
                &[b"::1, 10.0.0.7, 10.0.0.5"],
                "10.0.0.7",
                false,
            ),
            // Remote clients stay themselves, whatever the path.
            (
                "127.0.0.1",
                &[b"203.0.113.5, 10.0.0.5"],
                "203.0.113.5",
                false,
            ),
            (
                "192.0.2.2",
                &[b"203.0.113.5, 127.0.0.1"],
                "203.0.113.5",
                false,
            ),
            ("127.0.0.1", &[b"203.0.113.5, ::1"], "203.0.113.5", false),
            // Loopback all the way, over IPv4, IPv6 and IPv4-mapped hops: this machine.
            ("127.0.0.1", &[b"127.0.0.1"], "127.0.0.1", true),
            ("127.0.0.1", &[b"::1"], "::1", true),
            ("::1", &[b"::ffff:127.0.0.2"], "127.0.0.2", true),
            (
                "::ffff:127.0.0.1",
                &[b"127.0.0.1, ::1, 127.0.0.2"],
                "127.0.0.1",
                true,
            ),
            ("127.0.0.1", &[b"garbage, ::1"], "::1", true),
        ];
        for (peer, values, want, loopback) in cases {
            let c = client(peer, values, t);
            assert_eq!(c.client, ip(want), "{peer} {values:?}");
            assert_eq!(c.is_loopback(), *loopback, "{peer} {values:?}");
            assert!(c.forwarded && !c.is_direct_loopback(), "{peer} {values:?}");
        }
        // A loopback client that is not a trusted proxy names the hop that wrote it too.
        let c = client("10.0.0.1", &[b"198.51.100.1, 127.0.0.1"], &["10.0.0.0/8"]);
        assert_eq!((c.client, c.is_loopback()), (ip("10.0.0.1"), false));
        let c = client("127.0.0.1", &[b"198.51.100.1, ::1"], &["127.0.0.1"]);
        assert_eq!((c.client, c.is_loopback()), (ip("::1"), true));
        // Trusting a whole block changes none of it.
        for trusted in [&["0.0.0.0/0", "::/0"][..], &["192.0.2.2"]] {
            for xff in [&b"127.0.0.1"[..], b"::1", b"127.0.0.1, 127.0.0.1"] {
                let c = client("192.0.2.2", &[xff], trusted);
                assert!(!c.is_loopback(), "{trusted:?} {xff:?}");
                assert_ne!(c.client, ip("127.0.0.1"));
            }
        }
        // Whatever the fields say, loopback needs a loopback peer.
        let c = Caller {
            peer: ip("192.0.2.2"),
            client: ip("127.0.0.1"),
            forwarded: true,
        };
        assert!(!c.is_loopback());
    }

    #[test]
    fn broad_and_mapped_trusted_blocks_are_named() {
        let problem = |s: &str| TrustProblem::of(&cidrs(&[s])[0]);
        for broad in [
            "0.0.0.0/0",
            "0.0.0.0/1",
            "128.0.0.0/7",
            "::/0",
            "::/1",
            "2000::/3",
            "2001:db8::/31",
            "fd00::/8",
        ] {
            assert_eq!(problem(broad), Some(TrustProblem::Broad), "{broad}");
        }
        // IPv4-mapped blocks are the IPv4 blocks they name.
        assert_eq!(problem("::ffff:0:0/96"), Some(TrustProblem::Broad));
        for mapped in ["::ffff:10.0.0.0/104", "::ffff:10.0.0.1/128"] {
            assert_eq!(problem(mapped), None, "{mapped}");
        }
        for fine in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.0.2.1",
            "255.255.255.255/32",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "::1",
            "::ffff:10.0.0.1",
            "fd00::1/128",
        ] {
            assert_eq!(problem(fine), None, "{fine}");
        }
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
