//! The providers: the registry of built-ins with their defaults, overridden or extended by the
//! config's `providers` blocks (everything that asks "is this a provider?" asks here), and per
//! upstream format what the request path needs to know: what goes into a call and what of its
//! answer comes back ([`exchange`]), the request's size and the answer's usage ([`wire`],
//! [`tap`]), what an error answer means ([`classify`]).

pub mod classify;
pub mod copilot;
pub mod exchange;
pub mod json;
pub mod tap;
pub mod wire;

use crate::crypto::Secret;
use crate::domain::ProviderName;
use crate::upstream::Target;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How a provider's API is spoken: how a credential is attached, where usage is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Openai,
    Anthropic,
    Gemini,
    Kiro,
}

/// Whether the proxy adds `stream_options.include_usage` to an OpenAI-format stream so the
/// provider reports its usage (`providers.<name>.stream_usage`). Only for providers that
/// accept the field: some refuse unknown fields outright (Mistral: 422 `extra_forbidden`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamUsage {
    /// Ask for it, and hide the usage chunk from a client that did not ask.
    Ask,
    /// Send the body as it came; read the usage the provider sends on its own.
    Never,
}

impl StreamUsage {
    /// The built-ins' defaults, from their documentation: OpenAI and DeepSeek document
    /// `stream_options.include_usage`. Mistral refuses fields it does not know, and sends
    /// `usage` in its last chunk unasked; Groq sends `x_groq.usage` in its last chunk
    /// unasked (and refused `stream_options` for a time); Copilot's API is not documented,
    /// and reports usage before the end of its streams unasked. A provider of another
    /// name speaks OpenAI's API, so it is asked as OpenAI is.
    fn default_for(name: &str) -> StreamUsage {
        match name {
            "mistral" | "groq" | "copilot" => StreamUsage::Never,
            _ => StreamUsage::Ask,
        }
    }
}

/// A `providers:` block. For a built-in every key is optional and overrides a default; a new
/// name needs `format` and `base_url`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub enabled: Option<bool>,
    pub format: Option<Format>,
    pub base_url: Option<String>,
    pub models: Option<Vec<String>>,
    /// `ask` or `never`: whether OpenAI-format streams get `stream_options.include_usage`
    /// (default per provider, see [`StreamUsage`]).
    pub stream_usage: Option<StreamUsage>,
    /// The RFC 6749 refresh grant's token endpoint, for this provider's `oauth` credentials
    /// (README, "Token refresh grants").
    pub token_url: Option<String>,
    /// The client id the refresh grant sends; required with `token_url`.
    pub client_id: Option<String>,
    /// The environment variable holding the client secret the refresh grant sends: a secret
    /// never sits in the file.
    pub client_secret_env: Option<String>,
    /// A `scope` the refresh grant asks for (none: the grant's original scope).
    pub scope: Option<String>,
    /// The secret read from `client_secret_env` at load.
    #[serde(skip)]
    pub client_secret: Option<Arc<Secret>>,
}

/// How a provider's `oauth` credentials are refreshed by the RFC 6749 refresh grant: its
/// `token_url`, `client_id`, the secret `client_secret_env` named, and `scope`. `Debug` shows
/// no secret (`Secret`'s prints nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSettings {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<Arc<Secret>>,
    pub scope: Option<String>,
}

/// One provider as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: ProviderName,
    pub format: Format,
    pub base_url: String,
    /// Model name patterns (`*` wildcards) that route to this provider.
    pub models: Vec<String>,
    pub enabled: bool,
    /// Whether OpenAI-format streams are asked for their usage.
    pub stream_usage: StreamUsage,
    /// The refresh grant of its `oauth` credentials, when its block names a `token_url`.
    pub refresh_grant: Option<GrantSettings>,
    /// `base_url` parsed once, so a request does not parse its URL again: `None` when it has
    /// a query or fragment, or does not parse (the URL is then parsed whole each time).
    base: Option<reqwest::Url>,
    /// The targets of the paths every request of this provider's format goes to, built once.
    fixed: Vec<(&'static str, Target)>,
    /// copilot (as an OpenAI-format provider): what its calls carry beyond the format's.
    pub copilot: Option<Arc<CopilotSetup>>,
    /// Whether the config's block named a `base_url` (which then wins over a credential's).
    base_configured: bool,
}

/// What a copilot call carries beyond the OpenAI format's, set up once
/// (`oauth.copilot.headers`, `oauth.copilot.allowed_api_hosts`): see [`copilot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopilotSetup {
    /// The editor headers every call carries, merged and checked at load.
    pub headers: copilot::HeaderList,
    /// The allowlist a credential's stored API base must still pass to be followed; `None`
    /// when `providers.copilot.base_url` is set, which wins.
    pub follow_api_base: Option<copilot::ApiHosts>,
}

impl CopilotSetup {
    /// Add the configured headers, a fresh `x-request-id`, and the vision flag when the body
    /// sends an image.
    pub fn add_headers(&self, headers: &mut HeaderMap, vision: bool) {
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert("x-request-id", copilot::request_id());
        if vision {
            headers.insert(
                "copilot-vision-request",
                axum::http::HeaderValue::from_static("true"),
            );
        }
    }
}

/// Paths that do not depend on the request, per format.
fn fixed_paths(format: Format) -> &'static [&'static str] {
    match format {
        Format::Openai => &["/chat/completions"],
        Format::Anthropic => &["/v1/messages"],
        Format::Gemini | Format::Kiro => &[],
    }
}

impl Provider {
    /// Where a request for `path` goes: built once for the fixed paths, else now.
    pub fn target(&self, path: &str) -> Option<Cow<'_, Target>> {
        if let Some((_, t)) = self.fixed.iter().find(|(p, _)| *p == path) {
            return Some(Cow::Borrowed(t));
        }
        Target::new(self.url(path)?).map(Cow::Owned)
    }

    /// Where a request for `path` goes with a credential whose stored API base is `api_base`
    /// (copilot): under that base when the provider follows credentials' bases and the base
    /// still passes the allowlist, else `None` (the provider's own target).
    pub fn target_under(&self, api_base: &str, path: &str) -> Option<Target> {
        let base = self.followed_base(api_base)?;
        Target::new(reqwest::Url::parse(&format!("{base}{path}")).ok()?)
    }

    /// `api_base` as checked by the allowlist, when the provider follows credentials' bases
    /// and the allowlist still allows it.
    fn followed_base(&self, api_base: &str) -> Option<String> {
        let hosts = self.copilot.as_ref()?.follow_api_base.as_ref()?;
        hosts.check(api_base).ok()
    }

    /// The base URL a lease holder calls with a credential whose stored API base is
    /// `api_base`: that base when [`Provider::target_under`] would follow it, else the
    /// provider's own.
    pub fn base_url_with(&self, api_base: Option<&str>) -> String {
        api_base
            .and_then(|b| self.followed_base(b))
            .unwrap_or_else(|| self.base_url.clone())
    }

    /// Whether calls may go to a credential's own API base ([`Provider::target_under`]).
    pub fn follows_api_base(&self) -> bool {
        self.copilot
            .as_ref()
            .is_some_and(|c| c.follow_api_base.is_some())
    }

    /// The URL of `path` (with its query, if any) under the base URL; `None` when they do not
    /// make one.
    pub fn url(&self, path: &str) -> Option<reqwest::Url> {
        let Some(base) = &self.base else {
            return reqwest::Url::parse(&format!("{}{}", self.base_url, path)).ok();
        };
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let mut url = base.clone();
        url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
        url.set_query(query);
        Some(url)
    }
}

fn parse_base(base_url: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(base_url)
        .ok()
        .filter(|u| !u.cannot_be_a_base() && u.query().is_none() && u.fragment().is_none())
}

/// The built-ins: name, format, default base URL, default model patterns.
const BUILT_INS: &[(&str, Format, &str, &[&str])] = &[
    (
        "claude",
        Format::Anthropic,
        "https://api.anthropic.com",
        &["claude-*"],
    ),
    (
        "openai",
        Format::Openai,
        "https://api.openai.com/v1",
        &["gpt-*", "o1*", "o3*", "o4*"],
    ),
    (
        "gemini",
        Format::Gemini,
        "https://generativelanguage.googleapis.com/v1beta",
        &["gemini-*"],
    ),
    (
        "mistral",
        Format::Openai,
        "https://api.mistral.ai/v1",
        &[
            "mistral-*",
            "open-mistral-*",
            "codestral-*",
            "ministral-*",
            "pixtral-*",
        ],
    ),
    (
        "groq",
        Format::Openai,
        "https://api.groq.com/openai/v1",
        &["llama-*", "llama3-*", "gemma*", "qwen-*"],
    ),
    (
        "deepseek",
        Format::Openai,
        "https://api.deepseek.com/v1",
        &["deepseek-*"],
    ),
    (
        "copilot",
        Format::Openai,
        "https://api.githubcopilot.com",
        &[],
    ),
    (
        "kiro",
        Format::Kiro,
        "https://q.us-east-1.amazonaws.com",
        &[],
    ),
];

pub fn is_built_in(name: &str) -> bool {
    BUILT_INS.iter().any(|(n, ..)| *n == name)
}

/// A built-in's format, `None` for another name.
pub fn built_in_format(name: &str) -> Option<Format> {
    BUILT_INS
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|(_, format, ..)| *format)
}

/// A provider name must be usable in a URL path segment and a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

/// All providers this server knows, by name.
#[derive(Debug, Clone)]
pub struct Registry {
    providers: BTreeMap<String, Arc<Provider>>,
}

impl Registry {
    /// Built-ins merged with config blocks. Config validation has already checked that custom
    /// blocks carry a format and a base URL, so this cannot fail.
    pub fn from_config(blocks: &BTreeMap<String, ProviderConfig>) -> Self {
        let mut providers = BTreeMap::new();
        for (name, format, base_url, models) in BUILT_INS {
            providers.insert(
                name.to_string(),
                Provider {
                    name: ProviderName::from(*name),
                    format: *format,
                    base_url: base_url.to_string(),
                    models: models.iter().map(|m| m.to_string()).collect(),
                    enabled: true,
                    stream_usage: StreamUsage::default_for(name),
                    refresh_grant: None,
                    base: None,
                    fixed: Vec::new(),
                    copilot: None,
                    base_configured: false,
                },
            );
        }
        for (name, block) in blocks {
            let entry = providers.entry(name.clone()).or_insert_with(|| Provider {
                name: ProviderName::from(name.as_str()),
                format: block.format.unwrap_or(Format::Openai),
                base_url: String::new(),
                models: Vec::new(),
                enabled: true,
                stream_usage: StreamUsage::default_for(name),
                refresh_grant: None,
                base: None,
                fixed: Vec::new(),
                copilot: None,
                base_configured: false,
            });
            if let Some(format) = block.format {
                entry.format = format;
            }
            if let Some(url) = &block.base_url {
                entry.base_url = url.trim_end_matches('/').to_string();
                entry.base_configured = true;
            }
            if let Some(models) = &block.models {
                entry.models = models.clone();
            }
            if let Some(enabled) = block.enabled {
                entry.enabled = enabled;
            }
            if let Some(stream_usage) = block.stream_usage {
                entry.stream_usage = stream_usage;
            }
            // Validation has required `client_id` with `token_url`.
            if let (Some(token_url), Some(client_id)) = (&block.token_url, &block.client_id) {
                entry.refresh_grant = Some(GrantSettings {
                    token_url: token_url.clone(),
                    client_id: client_id.clone(),
                    client_secret: block.client_secret.clone(),
                    scope: block.scope.clone(),
                });
            }
        }
        let providers = providers
            .into_iter()
            .map(|(name, mut p)| {
                p.base = parse_base(&p.base_url);
                p.fixed = fixed_paths(p.format)
                    .iter()
                    .filter_map(|path| Some((*path, Target::new(p.url(path)?)?)))
                    .collect();
                (name, Arc::new(p))
            })
            .collect();
        let mut registry = Registry { providers };
        registry.configure_copilot(
            copilot::merge_headers(&BTreeMap::new()).unwrap_or_default(),
            copilot::ApiHosts::default(),
        );
        registry
    }

    /// Set copilot's headers and API-base allowlist (`oauth.copilot`; the defaults until
    /// then). Nothing changes when copilot is not an OpenAI-format provider.
    pub fn configure_copilot(&mut self, headers: copilot::HeaderList, hosts: copilot::ApiHosts) {
        if let Some(p) = self.providers.get_mut("copilot")
            && p.format == Format::Openai
        {
            let setup = CopilotSetup {
                headers,
                follow_api_base: (!p.base_configured).then_some(hosts),
            };
            Arc::make_mut(p).copilot = Some(Arc::new(setup));
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values()
    }

    /// The provider of an OpenAI-format request for `model`: an explicit `provider/model`
    /// prefix (stripped from the model), else the first provider whose patterns match.
    pub fn route_openai<'m>(&self, model: &'m str) -> Option<(&Arc<Provider>, &'m str)> {
        if let Some((prefix, rest)) = model.split_once('/')
            && let Some(p) = self
                .providers
                .get(prefix)
                .filter(|p| p.format == Format::Openai)
        {
            return Some((p, rest));
        }
        self.providers
            .values()
            .filter(|p| p.format == Format::Openai)
            .find(|p| p.models.iter().any(|pat| glob(pat, model)))
            .map(|p| (p, model))
    }

    /// The provider a credential file belongs to, from its name: `claude.json` and
    /// `claude-work.json` are claude. The longest matching name wins, so a custom `my-llm`
    /// provider owns `my-llm-2.json` rather than a provider called `my`.
    pub fn from_file_stem(&self, stem: &str) -> Option<&str> {
        self.providers
            .keys()
            .filter(|name| {
                stem == name.as_str()
                    || (stem.starts_with(name.as_str())
                        && matches!(stem.as_bytes()[name.len()], b'-' | b'_' | b'.'))
            })
            .max_by_key(|name| name.len())
            .map(String::as_str)
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let r = registry();
        assert_eq!(
            r.route_openai("gpt-4o").map(|(p, m)| (p.name.as_str(), m)),
            Some(("openai", "gpt-4o"))
        );
        assert_eq!(r.route_openai("o3-mini").unwrap().0.name, "openai");
        assert_eq!(r.route_openai("deepseek-chat").unwrap().0.name, "deepseek");
        assert_eq!(
            r.route_openai("groq/llama-x")
                .map(|(p, m)| (p.name.as_str(), m)),
            Some(("groq", "llama-x"))
        );
        assert_eq!(
            r.route_openai("claude/x"),
            None,
            "claude is not an OpenAI-format provider"
        );
        assert!(r.route_openai("unknown-model").is_none());
        assert!(glob("a*b*c", "axxbyyc") && !glob("a*b", "ab-c") && glob("*", ""));
    }

    fn registry() -> Registry {
        let mut blocks = BTreeMap::new();
        blocks.insert(
            "my-llm".to_string(),
            ProviderConfig {
                format: Some(Format::Openai),
                base_url: Some("http://x/v1/".into()),
                ..Default::default()
            },
        );
        Registry::from_config(&blocks)
    }

    #[test]
    fn file_stems() {
        let r = registry();
        assert_eq!(r.from_file_stem("claude"), Some("claude"));
        assert_eq!(r.from_file_stem("claude-work"), Some("claude"));
        assert_eq!(r.from_file_stem("claude_2"), Some("claude"));
        assert_eq!(r.from_file_stem("claudex"), None);
        assert_eq!(r.from_file_stem("my-llm-2"), Some("my-llm"));
        assert_eq!(r.from_file_stem("keys"), None);
        assert_eq!(r.get("my-llm").unwrap().base_url, "http://x/v1");
    }

    #[test]
    fn stream_usage_defaults_and_overrides() {
        let r = registry();
        for (name, want) in [
            ("openai", StreamUsage::Ask),
            ("deepseek", StreamUsage::Ask),
            ("my-llm", StreamUsage::Ask),
            ("mistral", StreamUsage::Never),
            ("groq", StreamUsage::Never),
            ("copilot", StreamUsage::Never),
        ] {
            assert_eq!(r.get(name).unwrap().stream_usage, want, "{name}");
        }
        let mut blocks = BTreeMap::new();
        for (name, value) in [
            ("openai", StreamUsage::Never),
            ("mistral", StreamUsage::Ask),
        ] {
            blocks.insert(
                name.to_string(),
                ProviderConfig {
                    stream_usage: Some(value),
                    ..Default::default()
                },
            );
        }
        let r = Registry::from_config(&blocks);
        assert_eq!(r.get("openai").unwrap().stream_usage, StreamUsage::Never);
        assert_eq!(r.get("mistral").unwrap().stream_usage, StreamUsage::Ask);
        assert_eq!(r.get("groq").unwrap().stream_usage, StreamUsage::Never);
    }

    #[test]
    fn copilot_follows_a_credentials_api_base_unless_the_config_names_one() {
        let r = Registry::from_config(&BTreeMap::new());
        let copilot = r.get("copilot").unwrap();
        assert!(copilot.follows_api_base());
        assert!(r.get("openai").unwrap().copilot.is_none());
        let t = copilot
            .target_under(
                "https://api.business.githubcopilot.com",
                "/chat/completions",
            )
            .unwrap();
        let own = Target::new(
            reqwest::Url::parse("https://api.business.githubcopilot.com/chat/completions").unwrap(),
        )
        .unwrap();
        assert_eq!(t, own);
        // A stored base the allowlist no longer allows is not followed.
        assert!(
            copilot
                .target_under("https://evil.example", "/chat/completions")
                .is_none()
        );
        assert_eq!(
            copilot.base_url_with(Some("https://api.business.githubcopilot.com")),
            "https://api.business.githubcopilot.com"
        );
        assert_eq!(
            copilot.base_url_with(Some("https://evil.example")),
            "https://api.githubcopilot.com"
        );
        assert_eq!(copilot.base_url_with(None), "https://api.githubcopilot.com");
        let mut narrowed = r.clone();
        narrowed.configure_copilot(Vec::new(), copilot::ApiHosts::new(&[]).unwrap());
        let c = narrowed.get("copilot").unwrap();
        assert!(
            c.target_under(
                "https://api.business.githubcopilot.com",
                "/chat/completions"
            )
            .is_none()
        );
        // `providers.copilot.base_url` wins.
        let mut blocks = BTreeMap::new();
        blocks.insert(
            "copilot".to_string(),
            ProviderConfig {
                base_url: Some("http://127.0.0.1:9/".into()),
                ..Default::default()
            },
        );
        let r = Registry::from_config(&blocks);
        let copilot = r.get("copilot").unwrap();
        assert!(!copilot.follows_api_base());
        assert!(copilot.copilot.is_some(), "the headers still go on");
        assert!(
            copilot
                .target_under("https://api.githubcopilot.com", "/chat/completions")
                .is_none()
        );
    }

    #[test]
    fn copilot_calls_carry_the_editor_headers_a_request_id_and_the_vision_flag() {
        let r = Registry::from_config(&BTreeMap::new());
        let setup = r.get("copilot").unwrap().copilot.clone().unwrap();
        let mut h = HeaderMap::new();
        setup.add_headers(&mut h, false);
        for (name, value) in copilot::DEFAULT_HEADERS {
            assert_eq!(h[*name], *value, "{name}");
        }
        assert!(h.contains_key("x-request-id"));
        assert!(!h.contains_key("copilot-vision-request"));
        setup.add_headers(&mut h, true);
        assert_eq!(h["copilot-vision-request"], "true");
    }

    #[test]
    fn names() {
        assert!(valid_name("my-llm"));
        assert!(!valid_name("My"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
        assert!(is_built_in("kiro"));
    }
}
