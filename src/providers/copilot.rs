//! What Copilot's private API expects beyond the OpenAI format, and what of it we follow: the
//! editor headers every chat call and token exchange carries (defaults merged with
//! `oauth.copilot.headers`, checked at load and built once), the two per-request ones
//! (`x-request-id`, `copilot-vision-request`), and the allowlist that decides whether the
//! `endpoints.api` a token answer names is followed (`oauth.copilot.allowed_api_hosts`).
//! Protocol notes: README, "Token refresh".

use axum::http::{HeaderName, HeaderValue};
use std::collections::BTreeMap;

/// The headers Copilot's editors send, as the chat calls carry them by default.
pub const DEFAULT_HEADERS: &[(&str, &str)] = &[
    ("copilot-integration-id", "vscode-chat"),
    ("editor-version", "vscode/1.99.3"),
    ("editor-plugin-version", "copilot-chat/0.26.7"),
    ("openai-intent", "conversation-panel"),
    ("x-github-api-version", "2025-04-01"),
    ("user-agent", "GitHubCopilotChat/0.26.7"),
];

/// Of the configured headers, those the token exchange sends too.
pub const EXCHANGE_HEADERS: &[&str] = &[
    "editor-version",
    "editor-plugin-version",
    "user-agent",
    "x-github-api-version",
];

/// Headers the config may not set: the credential, and what the HTTP client owns.
const REFUSED: &[&str] = &["authorization", "host", "content-length"];

/// The most headers `oauth.copilot.headers` may leave after the merge.
pub const MAX_HEADERS: usize = 32;

/// The hosts whose `endpoints.api` is followed by default (GitHub's plans' API hosts).
pub const DEFAULT_API_HOSTS: &[&str] = &[
    "api.githubcopilot.com",
    "api.individual.githubcopilot.com",
    "api.business.githubcopilot.com",
    "api.enterprise.githubcopilot.com",
];

/// A header list sent as it is, built once.
pub type HeaderList = Vec<(HeaderName, HeaderValue)>;

/// [`DEFAULT_HEADERS`] with `overrides` merged over them (names compared case-insensitively;
/// a value of `""` removes a default). `Err` says which entry is refused and why.
pub fn merge_headers(overrides: &BTreeMap<String, String>) -> Result<HeaderList, String> {
    let mut merged: BTreeMap<String, String> = DEFAULT_HEADERS
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    for (name, value) in overrides {
        let lower = name.to_ascii_lowercase();
        if REFUSED.contains(&lower.as_str()) {
            return Err(format!(
                "`{name}` is set by the server and cannot be configured"
            ));
        }
        if HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(format!("`{name}` is not an HTTP header name"));
        }
        if value.is_empty() {
            merged.remove(&lower);
        } else if HeaderValue::from_str(value).is_err() {
            return Err(format!("the value of `{name}` is not an HTTP header value"));
        } else {
            merged.insert(lower, value.clone());
        }
    }
    if merged.len() > MAX_HEADERS {
        return Err(format!("at most {MAX_HEADERS} headers"));
    }
    merged
        .into_iter()
        .map(|(n, v)| {
            let name = HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(&v).map_err(|e| e.to_string())?;
            Ok((name, value))
        })
        .collect()
}

/// Of `all` (a [`merge_headers`] list), the headers the token exchange sends.
pub fn exchange_headers(all: &[(HeaderName, HeaderValue)]) -> HeaderList {
    all.iter()
        .filter(|(n, _)| EXCHANGE_HEADERS.contains(&n.as_str()))
        .cloned()
        .collect()
}

/// A fresh random `x-request-id`, shaped like a version 4 UUID.
pub fn request_id() -> HeaderValue {
    let n: u128 = rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{n:032x}");
    let id = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    HeaderValue::from_str(&id).expect("hex and dashes are a header value")
}

/// Whether an OpenAI chat body sends an image: a content part of type `image_url` in one of
/// its messages. The bytes are searched first, so a body without the word is not parsed.
pub fn has_image(body: &[u8]) -> bool {
    const WORD: &[u8] = b"image_url";
    if !body.windows(WORD.len()).any(|w| w == WORD) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        messages: Vec<Message>,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        #[serde(default)]
        content: serde_json::Value,
    }
    let Ok(parsed) = serde_json::from_slice::<Body>(body) else {
        return false;
    };
    parsed.messages.iter().any(|m| {
        m.content.as_array().is_some_and(|parts| {
            parts
                .iter()
                .any(|p| p.get("type").and_then(|t| t.as_str()) == Some("image_url"))
        })
    })
}

/// The hosts an `endpoints.api` may name to be followed: exact host names, or `*.suffix`
/// patterns matching any name that ends in `.suffix` (not `suffix` itself). Compared in
/// lower case; a trailing dot on the URL's host is refused rather than stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiHosts(Vec<String>);

impl Default for ApiHosts {
    fn default() -> Self {
        ApiHosts(DEFAULT_API_HOSTS.iter().map(|h| h.to_string()).collect())
    }
}

impl ApiHosts {
    /// `entries` checked: each a host name (letters, digits, `-`, `.`), optionally behind `*.`.
    pub fn new(entries: &[String]) -> Result<ApiHosts, String> {
        let mut hosts = Vec::with_capacity(entries.len());
        for entry in entries {
            let lower = entry.to_ascii_lowercase();
            let name = lower.strip_prefix("*.").unwrap_or(&lower);
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!("`{entry}` is not a host name or `*.` pattern"));
            }
            hosts.push(lower);
        }
        Ok(ApiHosts(hosts))
    }

    fn allows_host(&self, host: &str) -> bool {
        self.0.iter().any(|entry| match entry.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => host == entry,
        })
    }

    /// `url` as the base to follow, or why not: it must be `https`, name no user, password,
    /// port other than 443, query or fragment, and its host (a name, not an IP literal)
    /// must be allowed. The base comes back without a trailing `/`.
    pub fn check(&self, url: &str) -> Result<String, String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "it is not a URL".to_string())?;
        if parsed.scheme() != "https" {
            return Err("it is not https".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("it names a user".into());
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("it has a query or fragment".into());
        }
        if parsed.port().is_some() {
            return Err("it names a port".into());
        }
        let Some(host) = parsed.host_str() else {
            return Err("it names no host".into());
        };
        // The URL parser writes every IPv4 form as dotted quads, IPv6 in brackets.
        if host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err("its host is an IP address".into());
        }
        if !self.allows_host(host) {
            return Err(format!("host `{host}` is not allowed"));
        }
        Ok(parsed.as_str().trim_end_matches('/').to_string())
    }

    /// The host of `url`, for a log line that must not carry the rest (a path may hold
    /// anything).
    pub fn host_of(url: &str) -> String {
        reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "(none)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn headers_merge_over_the_defaults() {
        let all = merge_headers(&o(&[])).unwrap();
        assert_eq!(all.len(), DEFAULT_HEADERS.len());
        let all = merge_headers(&o(&[
            ("Editor-Version", "vscode/2.0"),
            ("openai-intent", ""),
            ("x-interaction-type", "conversation-agent"),
        ]))
        .unwrap();
        let get = |n: &str| all.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get("editor-version").unwrap(), "vscode/2.0");
        assert!(get("openai-intent").is_none(), "\"\" removes a default");
        assert_eq!(get("x-interaction-type").unwrap(), "conversation-agent");
        let ex = exchange_headers(&all);
        let names: Vec<&str> = ex.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "editor-plugin-version",
                "editor-version",
                "user-agent",
                "x-github-api-version"
            ]
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        for (name, value, why) in [
            ("Authorization", "x", "set by the server"),
            ("host", "x", "set by the server"),
            ("content-length", "1", "set by the server"),
            ("bad name", "x", "not an HTTP header name"),
            ("", "x", "not an HTTP header name"),
            ("x-ok", "line\nbreak", "not an HTTP header value"),
        ] {
            let e = merge_headers(&o(&[(name, value)])).unwrap_err();
            assert!(e.contains(why), "{name}: {e}");
        }
        let many: BTreeMap<String, String> = (0..MAX_HEADERS)
            .map(|i| (format!("x-h{i}"), "v".to_string()))
            .collect();
        assert!(merge_headers(&many).unwrap_err().contains("at most 32"));
    }

    #[test]
    fn request_ids_are_fresh_and_uuid_shaped() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        let parts: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&s[14..15], "4");
    }

    #[test]
    fn images_are_found_in_content_parts_only() {
        let with = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}"#;
        assert!(has_image(with));
        assert!(!has_image(br#"{"messages":[{"content":"an image_url"}]}"#));
        assert!(!has_image(
            br#"{"messages":[{"content":[{"type":"text"}]}]}"#
        ));
        assert!(!has_image(b"image_url not json"));
    }

    #[test]
    fn the_allowlist() {
        let hosts = ApiHosts::default();
        assert_eq!(
            hosts.check("https://api.githubcopilot.com").unwrap(),
            "https://api.githubcopilot.com"
        );
        assert_eq!(
            hosts
                .check("https://API.Business.GithubCopilot.com/")
                .unwrap(),
            "https://api.business.githubcopilot.com",
            "host names compare in lower case"
        );
        for (url, why) in [
            ("http://api.githubcopilot.com", "not https"),
            ("https://user:pw@api.githubcopilot.com", "names a user"),
            ("https://user@api.githubcopilot.com", "names a user"),
            ("https://evil.example", "not allowed"),
            ("https://api.githubcopilot.com.evil.com", "not allowed"),
            ("https://evilapi.githubcopilot.com", "not allowed"),
            ("https://api.githubcopilot.com.", "not allowed"),
            ("https://api.githubcopilot.com:8443", "names a port"),
            ("https://127.0.0.1", "IP address"),
            ("https://[::1]", "IP address"),
            ("https://api.githubcopilot.com/?x=1", "query or fragment"),
            ("https://api.githubcopilot.com/#f", "query or fragment"),
            ("not a url", "not a URL"),
        ] {
            let e = hosts.check(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
        let pattern = ApiHosts::new(&["*.GitHubCopilot.com".into()]).unwrap();
        assert!(pattern.check("https://api.x.githubcopilot.com").is_ok());
        assert!(pattern.check("https://githubcopilot.com").is_err());
        assert!(pattern.check("https://evilgithubcopilot.com").is_err());
        assert!(pattern.check("https://githubcopilot.com.evil.com").is_err());
        for bad in ["", "*.", "a..b", "a/b", "host:443", "*", "1.2.3.4:1"] {
            assert!(ApiHosts::new(&[bad.into()]).is_err(), "{bad}");
        }
        assert_eq!(
            ApiHosts::host_of("https://evil.example/a?secret"),
            "evil.example"
        );
    }
}
