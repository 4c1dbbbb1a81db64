//! Requests a browser sends on another site's behalf (README, "Browsers and other sites").
//!
//! A page on another site can make the operator's browser send a "simple" request (a form
//! POST, a `fetch` with a `text/plain` body) to this server without asking first (no CORS
//! preflight), and the loopback rule would let it through without a key. Browsers say where
//! such a request comes from, so the guards refuse it:
//! - `Sec-Fetch-Site` other than `same-origin` or `none` (a typed address, a bookmark);
//! - else, from browsers that do not send that header, an `Origin` that is not this server's
//!   (its host and port are not the request's `Host`), or `null`.
//!
//! Requests without either header (curl, the SDKs, every program) are not browsers' and pass.
//!
//! A page can also point a name of its own at 127.0.0.1 (DNS rebinding) and become "same
//! origin" with this server; its requests then carry that name as `Host`. Where the loopback
//! rule stands in for a key, the `Host` must be loopback's: `localhost` (or a name under it)
//! or an IP address.

use crate::http::caller::Caller;
use crate::http::error::ApiError;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};

/// Refuse a request a browser sent from another site; and, when `keyless` (the loopback rule
/// admits it without a key), one whose host is not loopback's.
pub fn check(req: &Request, caller: &Caller, keyless: bool) -> Result<(), ApiError> {
    let host = request_host(req, caller);
    if from_another_site(req.headers(), &host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            "A browser sent this request from another site; this server answers its own pages and programs only",
        ));
    }
    if keyless {
        check_host(&host)?;
    }
    Ok(())
}

/// The host check alone, for the pages: a link from another site may open them, but under a
/// name of another site's (DNS rebinding) they would ask for the key on that site's origin.
pub fn check_page(req: &Request, caller: &Caller, keyless: bool) -> Result<(), ApiError> {
    if keyless {
        check_host(&request_host(req, caller))?;
    }
    Ok(())
}

fn check_host(host: &Host) -> Result<(), ApiError> {
    if loopback_host(host) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "host_not_allowed",
        "Without a key, this server answers requests addressed to localhost or an IP address only",
    ))
}

/// The host a request was addressed to, as the browser wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// Lowercase `host[:port]`.
    Named(String),
    /// Not said (an HTTP/1.0 request): not a browser's.
    Unsaid,
    /// Said twice differently, or unreadable.
    Unclear,
}

/// Through a trusted proxy that named its client, its `X-Forwarded-Host` (a proxy that
/// rewrites `Host` keeps the browser's there); else the request target's authority (HTTP/2's
/// `:authority`, an absolute-form target), which RFC 9112 §3.2.2 puts before `Host`; else the
/// one `Host` header.
fn request_host(req: &Request, caller: &Caller) -> Host {
    let headers = req.headers();
    if caller.forwarded
        && let Some(forwarded) = one_header(headers, "x-forwarded-host")
    {
        // The first of a list is the browser's (each proxy appends).
        return match forwarded {
            Some(v) => named(v.split(',').next().unwrap_or_default()),
            None => Host::Unclear,
        };
    }
    if let Some(authority) = req.uri().authority() {
        return named(authority.as_str());
    }
    match one_header(headers, header::HOST.as_str()) {
        None => Host::Unsaid,
        Some(Some(v)) => named(v),
        Some(None) => Host::Unclear,
    }
}

/// `None` without the header; `Some(None)` when it is there more than once or unreadable.
fn one_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<Option<&'a str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(None);
    }
    Some(first.to_str().ok())
}

fn named(host: &str) -> Host {
    let host = host.trim();
    if host.is_empty() {
        return Host::Unclear;
    }
    Host::Named(host.to_ascii_lowercase())
}

/// Whether a browser marked this request as coming from another site than `host`.
fn from_another_site(headers: &HeaderMap, host: &Host) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let (Some(origin), Host::Named(host)) = (origin.to_str().ok().and_then(origin_authority), host)
    else {
        // `null`, an origin that does not read, or no host to compare it with.
        return true;
    };
    origin != without_default_port(host)
}

/// `host[:port]` of an `Origin` (`scheme://host[:port]`), lowercase, without its scheme's
/// default port; `None` for `null` or anything else.
fn origin_authority(origin: &str) -> Option<String> {
    let (scheme, authority) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") || authority.is_empty() {
        return None;
    }
    if authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let default = if scheme == "http" { ":80" } else { ":443" };
    Some(
        authority
            .strip_suffix(default)
            .unwrap_or(&authority)
            .to_string(),
    )
}

/// A `Host` value without `:80` or `:443` (which scheme it came by is not known here; an
/// `Origin` with either default port compares equal to the host without it).
fn without_default_port(host: &str) -> String {
    host.strip_suffix(":80")
        .or_else(|| host.strip_suffix(":443"))
        .unwrap_or(host)
        .to_string()
}

/// Whether the host names loopback: `localhost`, a name under `.localhost`, or an IP
/// address (a name that resolves elsewhere cannot reach the loopback rule, and an address
/// cannot be rebound). An unsaid host (HTTP/1.0) is not a browser's.
fn loopback_host(host: &Host) -> bool {
    let host = match host {
        Host::Named(h) => h.as_str(),
        Host::Unsaid => return true,
        Host::Unclear => return false,
    };
    // `[v6]:port`, `[v6]`, `name:port`, `name`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || valid_port(port) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// A port as `Host` writes it: 1 to 5 digits (no sign), at most 65535.
fn valid_port(port: &str) -> bool {
    let port = port.strip_prefix(':').unwrap_or(port);
    (1..=5).contains(&port.len())
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::net::{IpAddr, Ipv4Addr};

    fn request(uri: &str, pairs: &[(&str, &[u8])]) -> Request {
        let mut req = Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        for (n, v) in pairs {
            req.headers_mut().append(
                axum::http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        req
    }

    fn direct() -> Caller {
        let lo = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Caller {
            peer: lo,
            client: lo,
            forwarded: false,
        }
    }

    fn proxied() -> Caller {
        Caller {
            forwarded: true,
            ..direct()
        }
    }

    fn foreign(pairs: &[(&str, &[u8])]) -> bool {
        let req = request("/", pairs);
        from_another_site(req.headers(), &request_host(&req, &direct()))
    }

    fn host_of(uri: &str, pairs: &[(&str, &[u8])], caller: Caller) -> Host {
        request_host(&request(uri, pairs), &caller)
    }

    #[test]
    fn sec_fetch_site_decides_first() {
        for (site, want) in [
            (&b"same-origin"[..], false),
            (b"none", false),
            (b"same-site", true),
            (b"cross-site", true),
            (b"", true),
            (b"SAME-ORIGIN", true),
            (b"\xff", true),
        ] {
            let pairs = [
                ("sec-fetch-site", site),
                ("host", &b"127.0.0.1:8317"[..]),
                ("origin", b"http://127.0.0.1:8317"),
            ];
            assert_eq!(foreign(&pairs), want, "{site:?}");
        }
    }

    #[test]
    fn the_origin_must_be_this_servers() {
        for (origin, host, want) in [
            ("http://127.0.0.1:8317", "127.0.0.1:8317", false),
            ("HTTP://LOCALHOST:8317", "localhost:8317", false),
            ("http://localhost", "localhost:80", false),
            ("https://proxy.example", "proxy.example", false),
            ("https://proxy.example:443", "proxy.example", false),
            ("http://[::1]:8317", "[::1]:8317", false),
            ("http://127.0.0.1:8318", "127.0.0.1:8317", true),
            ("http://evil.example", "127.0.0.1:8317", true),
            ("null", "127.0.0.1:8317", true),
            ("", "127.0.0.1:8317", true),
            ("file://", "127.0.0.1:8317", true),
            ("ftp://127.0.0.1:8317", "127.0.0.1:8317", true),
            ("http://u@127.0.0.1:8317", "127.0.0.1:8317", true),
            ("http://127.0.0.1:8317/x", "127.0.0.1:8317", true),
        ] {
            let pairs = [("origin", origin.as_bytes()), ("host", host.as_bytes())];
            assert_eq!(foreign(&pairs), want, "{origin} {host}");
        }
        // No Origin and no Sec-Fetch-Site: not a browser's.
        assert!(!foreign(&[("host", b"anything")]));
        assert!(!foreign(&[]));
        // An Origin with nothing to compare it with, or two hosts.
        assert!(foreign(&[("origin", b"http://127.0.0.1:8317")]));
        assert!(foreign(&[
            ("origin", b"http://127.0.0.1:8317"),
            ("host", b"127.0.0.1:8317"),
            ("host", b"127.0.0.1:8317"),
        ]));
    }

    #[test]
    fn the_host_is_the_authority_then_the_one_host_header() {
        let named = |h: &str| Host::Named(h.into());
        // HTTP/2's :authority and absolute-form targets come as the URI's authority.
        assert_eq!(
            host_of("http://evil.example/x", &[("host", b"127.0.0.1")], direct()),
            named("evil.example")
        );
        assert_eq!(
            host_of("http://EVIL.example:8317/", &[], direct()),
            named("evil.example:8317")
        );
        assert_eq!(
            host_of("/", &[("host", b" LocalHost:1 ")], direct()),
            named("localhost:1")
        );
        assert_eq!(host_of("/", &[], direct()), Host::Unsaid);
        for pairs in [
            &[("host", &b"a"[..]), ("host", b"a")][..],
            &[("host", b"")],
            &[("host", b"\xff")],
        ] {
            assert_eq!(host_of("/", pairs, direct()), Host::Unclear, "{pairs:?}");
        }
        // X-Forwarded-Host counts only through a trusted proxy that named its client.
        let behind = [
            ("host", &b"127.0.0.1:8317"[..]),
            ("x-forwarded-host", b"Evil.example, proxy.lan"),
        ];
        assert_eq!(host_of("/", &behind, proxied()), named("evil.example"));
        assert_eq!(host_of("/", &behind, direct()), named("127.0.0.1:8317"));
        let twice = [("x-forwarded-host", &b"a"[..]), ("x-forwarded-host", b"b")];
        assert_eq!(host_of("/", &twice, proxied()), Host::Unclear);
        // The proxy said nothing: its own Host stands.
        assert_eq!(
            host_of("/", &[("host", b"127.0.0.1:8317")], proxied()),
            named("127.0.0.1:8317")
        );
    }

    #[test]
    fn without_a_key_the_host_must_be_loopbacks() {
        for (host, ok) in [
            ("127.0.0.1:8317", true),
            ("127.0.0.1", true),
            ("10.0.0.5:8317", true),
            ("localhost:8317", true),
            ("localhost.:8317", true),
            ("app.localhost:8317", true),
            ("[::1]:8317", true),
            ("[::1]", true),
            ("evil.example:8317", false),
            ("localhost.evil.example", false),
            ("127.0.0.1.nip.io", false),
            ("[::1]x", false),
            ("[nonsense]:1", false),
            ("[fe80::1%25eth0]:1", false),
            ("127.0.0.1:99999", false),
            ("127.0.0.1:+80", false),
            ("127.0.0.1:", false),
            ("127.0.0.1:000080", false),
        ] {
            assert_eq!(loopback_host(&Host::Named(host.into())), ok, "{host}");
        }
        assert!(loopback_host(&Host::Unsaid));
        assert!(!loopback_host(&Host::Unclear));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let req = request(
            "/",
            &[("sec-fetch-site", b"cross-site"), ("host", b"127.0.0.1")],
        );
        assert_eq!(
            check(&req, &direct(), false).unwrap_err().code,
            "cross_site_request"
        );
        // The pages take a link from elsewhere; only their host is checked.
        assert!(check_page(&req, &direct(), true).is_ok());
        let req = request("/", &[("host", b"evil.example")]);
        assert_eq!(
            check(&req, &direct(), true).unwrap_err().code,
            "host_not_allowed"
        );
        assert_eq!(
            check_page(&req, &direct(), true).unwrap_err().code,
            "host_not_allowed"
        );
        assert!(check(&req, &direct(), false).is_ok());
        assert!(check_page(&req, &direct(), false).is_ok());
    }
}
