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

use crate::http::error::ApiError;
use axum::http::{HeaderMap, StatusCode, header};

/// Refuse a request a browser sent from another site; and, when `keyless` (the loopback rule
/// admits it without a key), one whose `Host` is not loopback's.
pub fn check(headers: &HeaderMap, keyless: bool) -> Result<(), ApiError> {
    if from_another_site(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            "A browser sent this request from another site; this server answers its own pages and programs only",
        ));
    }
    if keyless && !loopback_host(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            "Without a key, this server answers requests addressed to localhost or an IP address only",
        ));
    }
    Ok(())
}

/// Whether a browser marked this request as coming from another site.
fn from_another_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let (Some(origin), Some(host)) = (
        origin.to_str().ok().and_then(origin_authority),
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.trim().to_ascii_lowercase()),
    ) else {
        // `null`, an origin that does not read, or no `Host` to compare it with.
        return true;
    };
    origin != without_default_port(&host)
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

/// Whether the `Host` names loopback: `localhost`, a name under `.localhost`, or an IP
/// address (a name that resolves elsewhere cannot reach the loopback rule, and an address
/// cannot be rebound). No `Host` (HTTP/1.0) is not a browser's.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
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
            None => host.as_str(),
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn valid_port(port: &str) -> bool {
    port.strip_prefix(':')
        .unwrap_or(port)
        .parse::<u16>()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn sec_fetch_site_decides_first() {
        for (site, foreign) in [
            (&b"same-origin"[..], false),
            (b"none", false),
            (b"same-site", true),
            (b"cross-site", true),
            (b"", true),
            (b"SAME-ORIGIN", true),
            (b"\xff", true),
        ] {
            let h = headers(&[
                ("sec-fetch-site", site),
                ("host", b"127.0.0.1:8317"),
                ("origin", b"http://127.0.0.1:8317"),
            ]);
            assert_eq!(from_another_site(&h), foreign, "{site:?}");
        }
    }

    #[test]
    fn the_origin_must_be_this_servers() {
        for (origin, host, foreign) in [
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
            let h = headers(&[("origin", origin.as_bytes()), ("host", host.as_bytes())]);
            assert_eq!(from_another_site(&h), foreign, "{origin} {host}");
        }
        // No Origin and no Sec-Fetch-Site: not a browser's.
        assert!(!from_another_site(&headers(&[("host", b"anything")])));
        assert!(!from_another_site(&HeaderMap::new()));
        // An Origin with nothing to compare it with.
        assert!(from_another_site(&headers(&[(
            "origin",
            b"http://127.0.0.1:8317"
        )])));
    }

    #[test]
    fn without_a_key_the_host_must_be_loopbacks() {
        for (host, ok) in [
            (&b"127.0.0.1:8317"[..], true),
            (b"127.0.0.1", true),
            (b"10.0.0.5:8317", true),
            (b"localhost:8317", true),
            (b"LOCALHOST", true),
            (b"localhost.:8317", true),
            (b"app.localhost:8317", true),
            (b"[::1]:8317", true),
            (b"[::1]", true),
            (b"evil.example:8317", false),
            (b"localhost.evil.example", false),
            (b"127.0.0.1.nip.io", false),
            (b"[::1]x", false),
            (b"[nonsense]:1", false),
            (b"127.0.0.1:99999", false),
            (b"127.0.0.1:", false),
            (b"", false),
            (b"\xff", false),
        ] {
            let h = headers(&[("host", host)]);
            assert_eq!(loopback_host(&h), ok, "{host:?}");
            assert_eq!(check(&h, true).is_ok(), ok, "{host:?}");
            assert!(check(&h, false).is_ok(), "{host:?}");
        }
        assert!(loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let h = headers(&[("sec-fetch-site", b"cross-site"), ("host", b"127.0.0.1")]);
        assert_eq!(check(&h, false).unwrap_err().code, "cross_site_request");
        let h = headers(&[("host", b"evil.example")]);
        assert_eq!(check(&h, true).unwrap_err().code, "host_not_allowed");
    }
}
