//! The typed config: `config.yaml` with `CLIPROXY__SECTION__KEY` overrides, defaults in code,
//! unknown keys refused, and every value checked at start with an error that names its key.

use crate::crypto::Secret;
use crate::notify::EventKind;
use crate::providers::{self, Format, ProviderConfig};
use crate::quota::{CounterTokens, ResetSchedule};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why a config could not be used. The message names the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// A duration written as `"30s"`, `"5m"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// The longest duration a setting takes: a year. Deadlines are computed by adding a setting
/// to the clock, and a sum past what the clock holds would fail at the first request instead
/// of at start.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration like \"30s\", \"5m\" or \"1h\" ({e})"
            ))
        })?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "`{s}` is longer than a year, the longest a setting takes"
            )));
        }
        Ok(HumanDuration(d))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub auth_dir: PathBuf,
    pub database: DatabaseConfig,
    /// Client keys for `/v1/*`; empty admits loopback clients only.
    pub api_keys: Vec<Secret>,
    /// The listener's limits and the reverse proxies it trusts.
    pub server: ServerConfig,
    pub management: ManagementConfig,
    pub auth: AuthConfig,
    pub proxy: ProxyConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub oauth: OAuthConfig,
    pub logging: LoggingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8317,
            auth_dir: PathBuf::from("auths"),
            database: DatabaseConfig::default(),
            api_keys: Vec::new(),
            server: ServerConfig::default(),
            management: ManagementConfig::default(),
            auth: AuthConfig::default(),
            proxy: ProxyConfig::default(),
            providers: BTreeMap::new(),
            oauth: OAuthConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://data/cliproxy.db".into(),
        }
    }
}

/// A size in bytes, written as a whole number or with a unit: `"256MiB"`, `"64KiB"`, `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    fn parse(text: &str) -> Option<u64> {
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let n: u64 = number.parse().ok()?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "KB" => 1 << 10,
            "MiB" | "M" | "MB" => 1 << 20,
            "GiB" | "G" | "GB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(scale)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{s}` is not a size like 1048576, \"64KiB\", \"256MiB\" or \"1GiB\""
                ))
            }),
        }
    }
}

/// An address or a CIDR block (`10.0.0.0/8`, `::1`, `fd00::/8`), for `server.trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if let Ok(net) = t.parse::<ipnet::IpNet>() {
            // Peers are compared as IPv4 when they are IPv4-mapped, so a mapped block is kept
            // as the IPv4 block it names (`::ffff:10.0.0.0/104` is `10.0.0.0/8`).
            if let ipnet::IpNet::V6(v6) = net
                && v6.prefix_len() >= 96
                && let Some(v4) = v6.addr().to_ipv4_mapped()
                && let Ok(mapped) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            {
                return Ok(Cidr(ipnet::IpNet::V4(mapped.trunc())));
            }
            return Ok(Cidr(net.trunc()));
        }
        t.parse::<IpAddr>()
            .map(|ip| Cidr(ipnet::IpNet::from(ip.to_canonical())))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{s}` is not an address or CIDR block like 10.0.0.1, 10.0.0.0/8 or fd00::/8"
                ))
            })
    }
}

/// The listener's limits: what one client, or all of them together, can hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client connections open at once; past it, the oldest idle one makes room, or new ones
    /// wait in the listen backlog while every one is serving a request.
    pub max_connections: u32,
    /// Client connections open at once from one address (IPv6: one /64); trusted proxies are
    /// exempt. By default as many as `max_connections`'s default: a lower share keeps one
    /// address from taking every slot with requests in flight, but past it that address's idle
    /// kept-alive connections are closed for its new ones, and a client that reuses one at
    /// that moment sees its request fail.
    pub max_connections_per_address: u32,
    /// A request's headers must arrive within this, from its first byte.
    pub header_read_timeout: HumanDuration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub idle_timeout: HumanDuration,
    /// A request's body must arrive whole within this.
    pub body_read_timeout: HumanDuration,
    /// A response that makes no progress at the socket for this long closes its connection;
    /// also the HTTP/2 keep-alive ping's interval and timeout.
    pub write_timeout: HumanDuration,
    /// How long a stopping server lets requests in flight finish before it drops them.
    pub shutdown_timeout: HumanDuration,
    /// Request bodies held in memory across all requests at once.
    pub max_buffered_bytes: ByteSize,
    /// Reverse proxies whose `X-Forwarded-For` names the client (addresses or CIDR blocks).
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 1024,
            max_connections_per_address: 1024,
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            body_read_timeout: HumanDuration(Duration::from_secs(60)),
            write_timeout: HumanDuration(Duration::from_secs(60)),
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
            max_buffered_bytes: ByteSize(256 << 20),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementConfig {
    /// argon2id PHC string, or plain text (hashed at start). Empty: loopback only, no key.
    pub secret_key: Secret,
    /// Whether non-loopback clients may use the management API (needs `secret_key`).
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionStrategy {
    #[default]
    RoundRobin,
    QuotaAware,
    Priority,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub selection_strategy: SelectionStrategy,
    pub quota: QuotaConfig,
    pub refresh: RefreshConfig,
    pub encryption: EncryptionConfig,
    pub notifications: NotificationsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Tokens reserved for a request whose size is unknown.
    pub default_reservation: u64,
    /// Per provider; a provider not named here never resets.
    pub reset_schedule: BTreeMap<String, ResetSchedule>,
    /// Per provider: the limit a new credential takes when it names none (absent: unlimited).
    /// A default set through the management API is stored and wins over this one.
    pub default_limit: BTreeMap<String, CounterTokens>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        let mut reset_schedule = BTreeMap::new();
        reset_schedule.insert("claude".into(), ResetSchedule::Monthly);
        reset_schedule.insert("openai".into(), ResetSchedule::Monthly);
        reset_schedule.insert("gemini".into(), ResetSchedule::Daily);
        QuotaConfig {
            default_reservation: 4096,
            reset_schedule,
            default_limit: BTreeMap::new(),
        }
    }
}

impl QuotaConfig {
    pub fn schedule(&self, provider: &str) -> ResetSchedule {
        self.reset_schedule
            .get(provider)
            .cloned()
            .unwrap_or(ResetSchedule::Never)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Whether the refresh worker runs, and a provider's 401 triggers a refresh (a manual
    /// refresh works either way).
    pub enabled: bool,
    /// How often the worker checks (at most [`MAX_CHECK_INTERVAL`]).
    pub check_interval: HumanDuration,
    /// How long before its expiry a token is refreshed (at most [`MAX_REFRESH_LEAD`]).
    pub refresh_lead_time: HumanDuration,
    /// Calls to a token endpoint per refresh when it fails in a way worth retrying (a network
    /// error, a 429, a 5xx), 1 to [`MAX_REFRESH_TRIES`].
    pub max_tries: u32,
    /// The wait before the second call, doubled before each later one (at most
    /// [`MAX_RETRY_BACKOFF`]; a wait the endpoint names is used instead, up to the same bound).
    pub retry_backoff: HumanDuration,
}

/// The longest `auth.refresh.check_interval`.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The longest `auth.refresh.refresh_lead_time`.
pub const MAX_REFRESH_LEAD: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most `auth.refresh.max_tries`.
pub const MAX_REFRESH_TRIES: u32 = 10;
/// The longest `auth.refresh.retry_backoff`.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            enabled: true,
            check_interval: HumanDuration(Duration::from_secs(300)),
            refresh_lead_time: HumanDuration(Duration::from_secs(600)),
            max_tries: 3,
            retry_backoff: HumanDuration(Duration::from_secs(1)),
        }
    }
}

impl RefreshConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let interval = self.check_interval.0;
        if interval < Duration::from_secs(1) || interval > MAX_CHECK_INTERVAL {
            return Err(err(
                "`auth.refresh.check_interval`: must be between 1s and 24h",
            ));
        }
        if self.refresh_lead_time.0 > MAX_REFRESH_LEAD {
            return Err(err(
                "`auth.refresh.refresh_lead_time`: must be at most 30 days",
            ));
        }
        if !(1..=MAX_REFRESH_TRIES).contains(&self.max_tries) {
            return Err(err(format!(
                "`auth.refresh.max_tries`: must be between 1 and {MAX_REFRESH_TRIES}"
            )));
        }
        if self.retry_backoff.0 > MAX_RETRY_BACKOFF {
            return Err(err("`auth.refresh.retry_backoff`: must be at most 60s"));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    pub enabled: bool,
    /// base64 of 32 bytes.
    pub key: Secret,
    /// Name of an environment variable holding the key instead.
    pub key_env: String,
}

/// Webhooks told of credential events (README, "Notifications").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    pub webhooks: Vec<WebhookConfig>,
    /// How long one delivery may take (at most [`MAX_WEBHOOK_TIMEOUT`]).
    pub timeout: HumanDuration,
}

/// The longest `auth.notifications.timeout`: a delivery holds up its webhook's queue.
pub const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            webhooks: Vec::new(),
            timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    pub events: Vec<EventKind>,
    /// The environment variable holding the signing secret: a secret never sits in the file.
    pub secret_env: String,
    /// The secret read from `secret_env` at load.
    #[serde(skip)]
    pub secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Credentials tried per request before giving up.
    pub max_attempts: u32,
    pub request_timeout: HumanDuration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_attempts: 3,
            request_timeout: HumanDuration(Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    pub copilot: CopilotOAuthConfig,
    pub kiro: KiroOAuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopilotOAuthConfig {
    pub github_base_url: String,
    pub api_base_url: String,
    pub client_id: String,
    /// The scope the device flow asks GitHub for.
    pub scope: String,
    /// Headers merged over Copilot's defaults (`providers::copilot::DEFAULT_HEADERS`) on every
    /// chat call; the editor ones go on the token exchange too. `""` removes a default.
    pub headers: BTreeMap<String, String>,
    /// The hosts whose `endpoints.api` (from the token answer) is followed: names or `*.`
    /// suffix patterns; https only, whatever is listed.
    pub allowed_api_hosts: Vec<String>,
}

impl CopilotOAuthConfig {
    /// The merged header list (checked at load, so only a config that skipped validation
    /// gets the defaults alone).
    pub fn header_list(&self) -> providers::copilot::HeaderList {
        providers::copilot::merge_headers(&self.headers)
            .or_else(|_| providers::copilot::merge_headers(&BTreeMap::new()))
            .unwrap_or_default()
    }

    /// The allowlist (checked at load; an unchecked bad one allows nothing).
    pub fn api_hosts(&self) -> providers::copilot::ApiHosts {
        providers::copilot::ApiHosts::new(&self.allowed_api_hosts)
            .unwrap_or_else(|_| providers::copilot::ApiHosts::new(&[]).unwrap_or_default())
    }
}

impl Default for CopilotOAuthConfig {
    fn default() -> Self {
        CopilotOAuthConfig {
            github_base_url: "https://github.com".into(),
            api_base_url: "https://api.github.com".into(),
            client_id: "Iv1.b507a08c87ecfe98".into(),
            scope: "read:user".into(),
            headers: BTreeMap::new(),
            allowed_api_hosts: providers::copilot::DEFAULT_API_HOSTS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KiroOAuthConfig {
    pub oidc_base_url: String,
    pub region: String,
    pub start_url: String,
}

impl Default for KiroOAuthConfig {
    fn default() -> Self {
        KiroOAuthConfig {
            oidc_base_url: "https://oidc.{region}.amazonaws.com".into(),
            region: "us-east-1".into(),
            start_url: "https://view.awsapps.com/start".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub level: String,
    pub dir: PathBuf,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            dir: PathBuf::from("logs"),
        }
    }
}

/// Where the database lives, from `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    File(PathBuf),
}

/// A loaded config with its relative paths resolved against the config file's folder.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub database: DatabaseLocation,
    pub auth_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The folder relative `source` paths in import reports are shown against.
    pub base_dir: PathBuf,
    /// The config file read, if there was one.
    pub config_file: Option<PathBuf>,
    /// The secret settings the config file itself sets (not the environment): the file then
    /// needs to be private. A hashed management key is not counted.
    pub secrets_in_file: Vec<&'static str>,
}

/// Environment variables as (name, value).
type EnvVars = Vec<(String, String)>;

/// Keys whose environment value is a comma-separated list.
const ENV_LISTS: &[&str] = &["api_keys", "server.trusted_proxies"];

/// Settings that hold secrets. Their environment values are taken as the text written (the
/// generic parsing would turn `000123` into the number 123, or `true` into a boolean), and an
/// error about them never shows their value.
const SECRET_KEYS: &[&str] = &["api_keys", "management.secret_key", "auth.encryption.key"];

/// The secret setting an error path (`api_keys[2]`, `management.secret_key`) is under.
fn secret_key_of(path: &str) -> Option<&'static str> {
    SECRET_KEYS.iter().copied().find(|key| {
        path.strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('[') || rest.starts_with('.'))
    })
}

/// The secret settings `yaml` sets to something non-empty.
fn secrets_set_in(yaml: &str) -> Vec<&'static str> {
    let Ok(raw) = config::Config::builder()
        .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
        .build()
    else {
        return Vec::new();
    };
    let text = |key: &str| {
        raw.get::<config::Value>(key)
            .ok()
            .and_then(|v| v.into_string().ok())
            .filter(|v| !v.is_empty())
    };
    let mut found = Vec::new();
    if raw
        .get::<config::Value>("api_keys")
        .ok()
        .and_then(|v| v.into_array().ok())
        .is_some_and(|keys| !keys.is_empty())
    {
        found.push("api_keys");
    }
    if text("management.secret_key").is_some_and(|k| !crate::crypto::is_phc(&k)) {
        found.push("management.secret_key");
    }
    if text("auth.encryption.key").is_some() {
        found.push("auth.encryption.key");
    }
    found
}

impl Config {
    /// Load `path` (if it exists; a missing default file means all defaults) and the
    /// `CLIPROXY__*` environment, then validate.
    pub fn load(path: &Path, must_exist: bool) -> Result<Loaded, ConfigError> {
        Self::load_with_env(path, must_exist, std::env::vars())
    }

    /// As [`Config::load`], with the environment given, so tests need not touch the process's.
    pub fn load_with_env(
        path: &Path,
        must_exist: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let mut builder = config::Config::builder();
        let mut config_file = None;
        let mut secrets_in_file = Vec::new();
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("{}: cannot read config: {e}", path.display())))?;
            secrets_in_file = secrets_set_in(&text);
            config_file = Some(path.to_path_buf());
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Yaml));
        } else if must_exist {
            return Err(err(format!("{}: config file not found", path.display())));
        }
        // The other variables are kept for the webhooks' `secret_env`, read after validation.
        let (env, others): (EnvVars, EnvVars) = env
            .into_iter()
            .partition(|(k, _)| k.starts_with("CLIPROXY__"));
        let mut env: config::Map<String, String> = env.into_iter().collect();
        // Secret settings are set from their text as written, past the generic parsing.
        for (name, value) in env.clone() {
            let key = name["CLIPROXY__".len()..].to_lowercase().replace("__", ".");
            let Some(key) = SECRET_KEYS.iter().copied().find(|k| *k == key) else {
                continue;
            };
            env.remove(&name);
            let set = if key == "api_keys" {
                let keys: Vec<String> = if value.is_empty() {
                    Vec::new()
                } else {
                    value.split(',').map(str::to_string).collect()
                };
                builder.set_override(key, keys)
            } else {
                builder.set_override(key, value)
            };
            builder = set.map_err(|e| err(format!("`{key}`: {e}")))?;
        }
        let mut source = config::Environment::with_prefix("CLIPROXY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(env));
        for key in ENV_LISTS {
            source = source.with_list_parse_key(key);
        }
        let raw = builder
            .add_source(source)
            .build()
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        let mut config: Config = serde_path_to_error::deserialize(raw).map_err(|e| {
            let key = e.path().to_string();
            if let Some(secret) = secret_key_of(&key) {
                let what = if secret == "api_keys" {
                    "a list of texts"
                } else {
                    "text"
                };
                return err(format!(
                    "{}: `{key}`: must be {what} (quote it in YAML); the value is not shown",
                    path.display()
                ));
            }
            let inner = e.into_inner().to_string();
            if key == "." || key.is_empty() {
                err(format!("{}: {inner}", path.display()))
            } else {
                err(format!("{}: `{key}`: {inner}", path.display()))
            }
        })?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate()?;
        let lookup = |name: &str| {
            others
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        config.auth.notifications.read_secrets(lookup)?;
        read_client_secrets(&mut config.providers, lookup)?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        let database = match parse_database_url(&config.database.url)? {
            DatabaseLocation::File(p) => DatabaseLocation::File(resolve(&p)),
        };
        Ok(Loaded {
            auth_dir: resolve(&config.auth_dir),
            log_dir: resolve(&config.logging.dir),
            database,
            base_dir,
            config_file,
            secrets_in_file,
            config,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, block) in &self.providers {
            if !providers::valid_name(name) {
                return Err(err(format!(
                    "`providers.{name}`: a provider name is lowercase letters, digits, '-' and '_'"
                )));
            }
            if !providers::is_built_in(name) {
                if block.format.is_none() {
                    return Err(err(format!(
                        "`providers.{name}.format`: a new provider needs a format (openai, anthropic, gemini)"
                    )));
                }
                if block.base_url.is_none() {
                    return Err(err(format!(
                        "`providers.{name}.base_url`: a new provider needs a base URL"
                    )));
                }
            }
            if let Some(url) = &block.base_url {
                check_url(&format!("providers.{name}.base_url"), url)?;
            }
            let format = block.format.or(providers::built_in_format(name));
            if block.stream_usage.is_some() && format != Some(Format::Openai) {
                return Err(err(format!(
                    "`providers.{name}.stream_usage`: only OpenAI-format providers are asked for stream usage"
                )));
            }
            check_grant(name, block)?;
        }
        let quota = &self.auth.quota;
        for (key, name) in quota
            .reset_schedule
            .keys()
            .map(|name| ("reset_schedule", name))
            .chain(
                quota
                    .default_limit
                    .keys()
                    .map(|name| ("default_limit", name)),
            )
        {
            if !providers::is_built_in(name) && !self.providers.contains_key(name) {
                return Err(err(format!("`auth.quota.{key}.{name}`: unknown provider")));
            }
        }
        if self.auth.quota.default_reservation == 0 {
            return Err(err(
                "`auth.quota.default_reservation`: must be at least 1 token",
            ));
        }
        if self.proxy.max_attempts == 0 {
            return Err(err("`proxy.max_attempts`: must be at least 1"));
        }
        self.auth.refresh.validate()?;
        // An empty key would admit a client that sends an empty one.
        if let Some(i) = self.api_keys.iter().position(Secret::is_empty) {
            return Err(err(format!(
                "`api_keys[{i}]`: a client key must not be empty"
            )));
        }
        if self.management.allow_remote && self.management.secret_key.is_empty() {
            return Err(err(
                "`management.allow_remote`: remote management needs `management.secret_key`",
            ));
        }
        if self.auth.encryption.enabled
            && self.auth.encryption.key.is_empty()
            && self.auth.encryption.key_env.is_empty()
        {
            return Err(err(
                "`auth.encryption.key`: encryption is enabled but neither `key` nor `key_env` is set",
            ));
        }
        self.auth.notifications.validate()?;
        check_url(
            "oauth.copilot.github_base_url",
            &self.oauth.copilot.github_base_url,
        )?;
        check_url(
            "oauth.copilot.api_base_url",
            &self.oauth.copilot.api_base_url,
        )?;
        providers::copilot::merge_headers(&self.oauth.copilot.headers)
            .map_err(|e| err(format!("`oauth.copilot.headers`: {e}")))?;
        providers::copilot::ApiHosts::new(&self.oauth.copilot.allowed_api_hosts)
            .map_err(|e| err(format!("`oauth.copilot.allowed_api_hosts`: {e}")))?;
        check_url("oauth.kiro.oidc_base_url", &self.oauth.kiro.oidc_base_url)?;
        check_url("oauth.kiro.start_url", &self.oauth.kiro.start_url)?;
        check_log_level(&self.logging.level)?;
        self.server.validate()?;
        Ok(())
    }
}

/// Levels `logging.level` takes, alone or per target (`info,cliproxyapi::proxy=debug`).
const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// A level, or comma-separated directives each `level` or `target=level`. tracing's own parser
/// would take `verbose` as a target name and log nothing, so the levels are checked here.
fn check_log_level(filter: &str) -> Result<(), ConfigError> {
    let bad = || {
        err(format!(
            "`logging.level`: `{filter}` is not a level ({}) or a list of `target=level` directives",
            LOG_LEVELS.join(", ")
        ))
    };
    if filter.trim().is_empty() {
        return Err(bad());
    }
    for directive in filter.split(',') {
        let level = match directive.trim().rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(bad()),
            None => directive,
        };
        if !LOG_LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(bad());
        }
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Err(bad());
    }
    Ok(())
}

impl NotificationsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let timeout = self.timeout.0;
        if timeout.is_zero() || timeout > MAX_WEBHOOK_TIMEOUT {
            return Err(err(
                "`auth.notifications.timeout`: must be longer than 0s and at most 60s",
            ));
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            let key = format!("auth.notifications.webhooks[{i}]");
            check_url(&format!("{key}.url"), &hook.url)?;
            if reqwest::Url::parse(&hook.url).map_or(true, |u| u.host_str().is_none()) {
                return Err(err(format!(
                    "`{key}.url`: `{}` is not a URL with a host",
                    hook.url
                )));
            }
            if hook.events.is_empty() {
                return Err(err(format!("`{key}.events`: name at least one event")));
            }
            if hook.secret_env.trim().is_empty() {
                return Err(err(format!(
                    "`{key}.secret_env`: name the environment variable holding the webhook's secret"
                )));
            }
        }
        Ok(())
    }

    /// Read each webhook's secret from the variable its `secret_env` names (`lookup`); an
    /// unset or empty one is refused, naming the key and the variable, never a value.
    fn read_secrets(
        &mut self,
        mut lookup: impl FnMut(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for (i, hook) in self.webhooks.iter_mut().enumerate() {
            match lookup(&hook.secret_env) {
                Some(value) if !value.is_empty() => hook.secret = Secret::new(value),
                _ => {
                    return Err(err(format!(
                        "`auth.notifications.webhooks[{i}].secret_env`: the environment variable {} is not set or empty",
                        hook.secret_env
                    )));
                }
            }
        }
        Ok(())
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(err("`server.max_connections`: must be at least 1"));
        }
        if self.max_connections_per_address == 0 {
            return Err(err(
                "`server.max_connections_per_address`: must be at least 1",
            ));
        }
        for (key, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("write_timeout", self.write_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if d.0.is_zero() {
                return Err(err(format!("`server.{key}`: must be longer than 0s")));
            }
        }
        if self.max_buffered_bytes.0 < (1 << 20) {
            return Err(err(
                "`server.max_buffered_bytes`: must be at least 1MiB (the largest management body)",
            ));
        }
        Ok(())
    }
}

/// A provider block's refresh grant keys: `token_url` an http(s) URL with a host, and
/// `client_id` with it; the other keys only with a `token_url`.
fn check_grant(name: &str, block: &ProviderConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let Some(url) = &block.token_url else {
        for (k, set) in [
            ("client_id", block.client_id.is_some()),
            ("client_secret_env", block.client_secret_env.is_some()),
            ("scope", block.scope.is_some()),
        ] {
            if set {
                return Err(err(format!(
                    "`{}`: only used by the refresh grant; set `{}` too",
                    key(k),
                    key("token_url")
                )));
            }
        }
        return Ok(());
    };
    check_url(&key("token_url"), url)?;
    if reqwest::Url::parse(url).map_or(true, |u| u.host_str().is_none()) {
        return Err(err(format!(
            "`{}`: `{url}` is not a URL with a host",
            key("token_url")
        )));
    }
    let text =
        |v: &str| !v.trim().is_empty() && v.len() <= 1024 && !v.chars().any(char::is_control);
    match &block.client_id {
        None => {
            return Err(err(format!(
                "`{}`: the refresh grant needs a client id with `token_url`",
                key("client_id")
            )));
        }
        Some(id) if !text(id) => {
            return Err(err(format!(
                "`{}`: must be non-empty printable text of at most 1024 bytes",
                key("client_id")
            )));
        }
        Some(_) => {}
    }
    if block
        .client_secret_env
        .as_deref()
        .is_some_and(|v| v.trim().is_empty())
    {
        return Err(err(format!(
            "`{}`: name the environment variable holding the client secret",
            key("client_secret_env")
        )));
    }
    if block.scope.as_deref().is_some_and(|v| !text(v)) {
        return Err(err(format!(
            "`{}`: must be non-empty printable text of at most 1024 bytes",
            key("scope")
        )));
    }
    Ok(())
}

/// Read each refresh grant's client secret from the variable its `client_secret_env` names
/// (`lookup`); an unset or empty one is refused, naming the key and the variable, never a
/// value.
fn read_client_secrets(
    blocks: &mut BTreeMap<String, ProviderConfig>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (name, block) in blocks.iter_mut() {
        let Some(var) = &block.client_secret_env else {
            continue;
        };
        match lookup(var) {
            Some(value) if !value.is_empty() => {
                block.client_secret = Some(Arc::new(Secret::new(value)));
            }
            _ => {
                return Err(err(format!(
                    "`providers.{name}.client_secret_env`: the environment variable {var} is not set or empty"
                )));
            }
        }
    }
    Ok(())
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(err(format!(
            "`{key}`: `{url}` is not an http:// or https:// URL"
        )))
    }
}

fn parse_database_url(url: &str) -> Result<DatabaseLocation, ConfigError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(err(format!(
                "`database.url`: `{url}` names no file; use sqlite://path/to/file.db"
            )));
        }
        return Ok(DatabaseLocation::File(PathBuf::from(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(err(
            "`database.url`: PostgreSQL is not supported yet; use sqlite://path/to/file.db",
        ));
    }
    Err(err(format!(
        "`database.url`: `{url}` is not a sqlite:// URL"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load_with_env(
            &path,
            true,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_copilot_login_scope() {
        let l = load("port: 1234\n", &[]).unwrap();
        assert_eq!(l.config.oauth.copilot.scope, "read:user");
        let l = load(
            "oauth:\n  copilot: { scope: \"read:user user:email\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(l.config.oauth.copilot.scope, "read:user user:email");
        assert_eq!(l.config.oauth.copilot.client_id, "Iv1.b507a08c87ecfe98");
    }

    #[test]
    fn defaults_and_env_overrides() {
        let l = load(
            "port: 1234\n",
            &[
                ("CLIPROXY__PORT", "9000"),
                ("CLIPROXY__AUTH__SELECTION_STRATEGY", "priority"),
                ("CLIPROXY__API_KEYS", "a,b"),
                ("CLIPROXY__SERVER__TRUSTED_PROXIES", "10.0.0.1,fd00::/8"),
                ("CLIPROXY__SERVER__MAX_BUFFERED_BYTES", "2097152"),
                ("CLIPROXY_CONFIG", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(l.config.port, 9000);
        assert_eq!(
            l.config.auth.selection_strategy,
            SelectionStrategy::Priority
        );
        assert_eq!(l.config.api_keys.len(), 2);
        assert_eq!(l.config.server.trusted_proxies.len(), 2);
        assert_eq!(l.config.server.max_buffered_bytes, ByteSize(2 << 20));
        assert_eq!(l.config.auth.quota.default_reservation, 4096);
        assert!(l.auth_dir.ends_with("auths"));
        assert!(
            matches!(&l.database, DatabaseLocation::File(p) if p.ends_with("data/cliproxy.db"))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load("auth:\n  quota:\n    bogus: 1\n", &[]).unwrap_err().0;
        assert!(e.contains("auth.quota") && e.contains("bogus"), "{e}");
        let e = load("", &[("CLIPROXY__NOPE", "1")]).unwrap_err().0;
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = load("auth:\n  selection_strategy: fastest\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("auth.selection_strategy"), "{e}");
        let e = load("auth:\n  refresh:\n    check_interval: soon\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("auth.refresh.check_interval"), "{e}");
        for (key, value) in [
            ("check_interval", "0s"),
            ("check_interval", "500ms"),
            ("check_interval", "25h"),
            ("refresh_lead_time", "31d"),
            ("max_tries", "0"),
            ("max_tries", "11"),
            ("max_tries", "-1"),
            ("max_tries", "99999999999"),
            ("retry_backoff", "61s"),
        ] {
            let e = load(&format!("auth:\n  refresh:\n    {key}: {value}\n"), &[])
                .unwrap_err()
                .0;
            assert!(
                e.contains(&format!("auth.refresh.{key}")),
                "{key}={value}: {e}"
            );
        }
        let l = load(
            "auth:\n  refresh:\n    check_interval: 1s\n    refresh_lead_time: 30d\n    max_tries: 10\n    retry_backoff: 0s\n",
            &[],
        )
        .unwrap();
        assert_eq!(l.config.auth.refresh.max_tries, 10);
        for huge in [
            "367d",
            "1000000000y",
            "584942417355years",
            "18446744073709551615s",
        ] {
            let e = load(&format!("proxy:\n  request_timeout: {huge}\n"), &[])
                .unwrap_err()
                .0;
            assert!(e.contains("proxy.request_timeout"), "{huge}: {e}");
        }
        load("proxy:\n  request_timeout: 365d\n", &[]).unwrap();
        let e = load("port: lots\n", &[]).unwrap_err().0;
        assert!(e.contains("port"), "{e}");
        let e = load(
            "auth:\n  quota:\n    reset_schedule:\n      nope: daily\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("reset_schedule.nope"), "{e}");
        // `default_limit`: known providers, 0 to 10^15 tokens each.
        let l = load(
            "auth:\n  quota:\n    default_limit:\n      claude: 1000000000000000\n",
            &[("CLIPROXY__AUTH__QUOTA__DEFAULT_LIMIT__OPENAI", "0")],
        )
        .unwrap();
        let limits = &l.config.auth.quota.default_limit;
        assert_eq!(limits["claude"].get(), 1_000_000_000_000_000);
        assert_eq!(limits["openai"].get(), 0);
        for bad in [
            "claude: -1",
            "claude: 1000000000000001",
            "claude: lots",
            "nope: 5",
        ] {
            let e = load(
                &format!("auth:\n  quota:\n    default_limit:\n      {bad}\n"),
                &[],
            )
            .unwrap_err()
            .0;
            let key = format!("default_limit.{}", &bad[..bad.find(':').unwrap()]);
            assert!(e.contains(&key), "{bad}: {e}");
        }
        let e = load("providers:\n  my-llm: { base_url: http://x }\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("providers.my-llm.format"), "{e}");
        // `stream_usage`: ask or never, on OpenAI-format providers only.
        for good in [
            "providers:\n  mistral: { stream_usage: ask }\n",
            "providers:\n  openai: { stream_usage: never }\n",
            "providers:\n  my-llm: { format: openai, base_url: http://x, stream_usage: never }\n",
        ] {
            load(good, &[]).unwrap();
        }
        let groq = load("", &[("CLIPROXY__PROVIDERS__GROQ__STREAM_USAGE", "ask")]).unwrap();
        assert_eq!(
            groq.config.providers["groq"].stream_usage,
            Some(providers::StreamUsage::Ask)
        );
        for bad in [
            "providers:\n  openai: { stream_usage: always }\n",
            "providers:\n  openai: { stream_usage: true }\n",
            "providers:\n  claude: { stream_usage: ask }\n",
            "providers:\n  gemini: { stream_usage: never }\n",
            "providers:\n  my-llm: { format: anthropic, base_url: http://x, stream_usage: ask }\n",
            "providers:\n  openai: { format: gemini, stream_usage: ask }\n",
        ] {
            let e = load(bad, &[]).unwrap_err().0;
            assert!(e.contains("stream_usage"), "{bad}: {e}");
        }
        let e = load("database:\n  url: mysql://x\n", &[]).unwrap_err().0;
        assert!(e.contains("database.url"), "{e}");
    }

    #[test]
    fn refresh_grant_keys_are_checked() {
        let block = |keys: &str| {
            format!("providers:\n  my-llm: {{ format: openai, base_url: http://x, {keys} }}\n")
        };
        let env = [("MY_LLM_SECRET", "grant-secret-value")];
        let l = load(
            &block("token_url: \"https://auth.example/oauth/token\", client_id: cid, client_secret_env: MY_LLM_SECRET, scope: \"a b\""),
            &env,
        )
        .unwrap();
        let registry = providers::Registry::from_config(&l.config.providers);
        let grant = registry
            .get("my-llm")
            .unwrap()
            .refresh_grant
            .clone()
            .unwrap();
        assert_eq!(grant.token_url, "https://auth.example/oauth/token");
        assert_eq!(grant.client_id, "cid");
        assert_eq!(grant.scope.as_deref(), Some("a b"));
        assert_eq!(
            grant.client_secret.as_deref().map(Secret::expose),
            Some("grant-secret-value")
        );
        for shown in [
            format!("{grant:?}"),
            format!("{:?}", l.config.providers),
            format!("{:?}", registry.get("my-llm")),
        ] {
            assert!(!shown.contains("grant-secret-value"), "{shown}");
        }
        assert!(registry.get("openai").unwrap().refresh_grant.is_none());
        // A public client names no secret; a built-in takes the keys too, also from the
        // environment.
        let l = load(
            "providers:\n  claude: { token_url: \"http://127.0.0.1:9/t\" }\n",
            &[("CLIPROXY__PROVIDERS__CLAUDE__CLIENT_ID", "from-env")],
        )
        .unwrap();
        let registry = providers::Registry::from_config(&l.config.providers);
        let grant = registry
            .get("claude")
            .unwrap()
            .refresh_grant
            .clone()
            .unwrap();
        assert_eq!(grant.client_id, "from-env");
        assert!(grant.client_secret.is_none() && grant.scope.is_none());
        for (keys, key) in [
            (
                "token_url: ftp://x/t, client_id: c",
                "providers.my-llm.token_url",
            ),
            (
                "token_url: \"http://\", client_id: c",
                "providers.my-llm.token_url",
            ),
            (
                "token_url: \"https://a.example/t\"",
                "providers.my-llm.client_id",
            ),
            (
                "token_url: \"https://a.example/t\", client_id: \" \"",
                "providers.my-llm.client_id",
            ),
            ("client_id: c", "providers.my-llm.client_id"),
            ("client_secret_env: X", "providers.my-llm.client_secret_env"),
            ("scope: s", "providers.my-llm.scope"),
            (
                "token_url: \"https://a.example/t\", client_id: c, client_secret_env: \"\"",
                "providers.my-llm.client_secret_env",
            ),
            (
                "token_url: \"https://a.example/t\", client_id: c, client_secret_env: UNSET_VAR",
                "providers.my-llm.client_secret_env",
            ),
            (
                "token_url: \"https://a.example/t\", client_id: c, client_secret_env: EMPTY_VAR",
                "providers.my-llm.client_secret_env",
            ),
            (
                "token_url: \"https://a.example/t\", client_id: c, scope: \"\"",
                "providers.my-llm.scope",
            ),
            (
                "token_url: \"https://a.example/t\", client_id: c, client_secret: x",
                "client_secret",
            ),
        ] {
            let e = load(&block(keys), &[("EMPTY_VAR", "")]).unwrap_err().0;
            assert!(e.contains(key), "{keys}: {e}");
        }
        let e = load(
            &block(
                "token_url: \"https://a.example/t\", client_id: c, client_secret_env: UNSET_VAR",
            ),
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("UNSET_VAR"), "{e}");
    }

    #[test]
    fn webhooks_are_checked() {
        let hook = |url: &str, events: &str, secret_env: &str| {
            format!(
                "auth:\n  notifications:\n    webhooks:\n      - {{url: \"{url}\", events: {events}, secret_env: {secret_env}}}\n"
            )
        };
        let env = [("HOOK_SECRET", "s3cr3t-value")];
        let l = load(
            &hook(
                "https://hooks.example/x",
                "[credential.rotated, quota.reset]",
                "HOOK_SECRET",
            ),
            &env,
        )
        .unwrap();
        let n = &l.config.auth.notifications;
        assert_eq!(n.timeout, HumanDuration(Duration::from_secs(5)));
        assert_eq!(
            n.webhooks[0].events,
            [EventKind::CredentialRotated, EventKind::QuotaReset]
        );
        assert_eq!(n.webhooks[0].secret.expose(), "s3cr3t-value");
        assert!(!format!("{:?}", l.config).contains("s3cr3t"));
        // Every name of the README is taken.
        load(
            &hook(
                "http://127.0.0.1:9/",
                "[credential.exhausted, credential.invalid, credential.expired, credential.cooldown, credential.rotated, credential.refreshed, refresh.failed, quota.reset]",
                "HOOK_SECRET",
            ),
            &env,
        )
        .unwrap();
        for (yaml, env, key, also) in [
            (
                hook("https://h.example/", "[credential.bogus]", "HOOK_SECRET"),
                &env[..],
                "auth.notifications.webhooks[0].events[0]",
                "credential.bogus",
            ),
            (
                hook("https://h.example/", "[]", "HOOK_SECRET"),
                &env[..],
                "auth.notifications.webhooks[0].events",
                "",
            ),
            (
                hook("ftp://h.example/", "[quota.reset]", "HOOK_SECRET"),
                &env[..],
                "auth.notifications.webhooks[0].url",
                "ftp://",
            ),
            (
                hook("https://", "[quota.reset]", "HOOK_SECRET"),
                &env[..],
                "auth.notifications.webhooks[0].url",
                "",
            ),
            (
                hook("https://h.example/", "[quota.reset]", "HOOK_SECRET"),
                &[][..],
                "auth.notifications.webhooks[0].secret_env",
                "HOOK_SECRET",
            ),
            (
                hook("https://h.example/", "[quota.reset]", "HOOK_SECRET"),
                &[("HOOK_SECRET", "")][..],
                "auth.notifications.webhooks[0].secret_env",
                "HOOK_SECRET",
            ),
            (
                "auth:\n  notifications:\n    webhooks:\n      - {url: \"https://h.example/\", events: [quota.reset]}\n".into(),
                &env[..],
                "secret_env",
                "",
            ),
            (
                "auth:\n  notifications:\n    webhooks:\n      - {url: \"https://h.example/\", events: [quota.reset], secret_env: HOOK_SECRET, secret: x}\n".into(),
                &env[..],
                "auth.notifications.webhooks[0]",
                "secret",
            ),
            (
                "auth:\n  notifications:\n    timeout: 61s\n".into(),
                &env[..],
                "auth.notifications.timeout",
                "",
            ),
            (
                "auth:\n  notifications:\n    timeout: 0s\n".into(),
                &env[..],
                "auth.notifications.timeout",
                "",
            ),
        ] {
            let e = load(&yaml, env).unwrap_err().0;
            assert!(e.contains(key) && e.contains(also), "{yaml}: {e}");
            assert!(!e.contains("s3cr3t"), "{yaml}: {e}");
        }
        load("auth:\n  notifications:\n    timeout: 60s\n", &[]).unwrap();
    }

    #[test]
    fn copilot_headers_and_api_hosts_are_checked() {
        let l = load(
            "oauth:\n  copilot:\n    headers: {Editor-Version: vscode/2.0, openai-intent: \"\"}\n    allowed_api_hosts: [\"*.githubcopilot.com\"]\n",
            &[],
        )
        .unwrap();
        let copilot = &l.config.oauth.copilot;
        let headers = copilot.header_list();
        assert!(
            headers
                .iter()
                .any(|(n, v)| n == "editor-version" && v == "vscode/2.0")
        );
        assert!(!headers.iter().any(|(n, _)| n == "openai-intent"));
        assert!(
            copilot
                .api_hosts()
                .check("https://api.x.githubcopilot.com")
                .is_ok()
        );
        let defaults = load("", &[]).unwrap().config.oauth.copilot;
        assert_eq!(defaults.header_list().len(), 6);
        assert!(
            defaults
                .api_hosts()
                .check("https://api.githubcopilot.com")
                .is_ok()
        );
        for (yaml, key) in [
            ("headers: {authorization: x}", "oauth.copilot.headers"),
            ("headers: {Host: x}", "oauth.copilot.headers"),
            ("headers: {\"a b\": x}", "oauth.copilot.headers"),
            (
                "allowed_api_hosts: [\"a/b\"]",
                "oauth.copilot.allowed_api_hosts",
            ),
            (
                "allowed_api_hosts: [\"\"]",
                "oauth.copilot.allowed_api_hosts",
            ),
        ] {
            let e = load(&format!("oauth:\n  copilot:\n    {yaml}\n"), &[])
                .unwrap_err()
                .0;
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn log_levels_are_checked() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,cliproxyapi::proxy=debug",
            "auth=trace",
        ] {
            load(&format!("logging:\n  level: \"{good}\"\n"), &[]).unwrap();
        }
        for bad in [
            "verbose",
            "",
            "info,loud",
            "=debug",
            "x=verbose",
            "info=",
            "inf",
        ] {
            let e = load(&format!("logging:\n  level: \"{bad}\"\n"), &[])
                .unwrap_err()
                .0;
            assert!(e.contains("logging.level"), "{bad}: {e}");
        }
    }

    #[test]
    fn server_limits() {
        let l = load(
            "server:\n  max_buffered_bytes: 64MiB\n  trusted_proxies: [\"10.0.0.0/8\", \"::1\", \"fd00::1/8\"]\n",
            &[],
        )
        .unwrap();
        let s = &l.config.server;
        assert_eq!(s.max_buffered_bytes, ByteSize(64 << 20));
        assert!(s.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
        assert!(s.trusted_proxies[1].contains("::1".parse().unwrap()));
        assert!(s.trusted_proxies[2].contains("fd12::5".parse().unwrap()));
        assert!(!s.trusted_proxies[0].contains("11.0.0.1".parse().unwrap()));
        let l = load(
            "server:\n  trusted_proxies: [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\"]\n",
            &[],
        )
        .unwrap();
        let mapped = &l.config.server.trusted_proxies;
        assert!(mapped[0].contains("10.9.8.7".parse().unwrap()));
        assert!(mapped[0].contains("::ffff:10.9.8.7".parse().unwrap()));
        assert!(!mapped[0].contains("11.0.0.1".parse().unwrap()));
        assert!(mapped[1].contains("192.0.2.7".parse().unwrap()));
        let l = load("server:\n  trusted_proxies: [\"127.0.0.1\"]\n", &[]).unwrap();
        assert!(l.config.server.trusted_proxies[0].contains("::ffff:127.0.0.1".parse().unwrap()));
        for (yaml, key) in [
            ("server:\n  max_connections: 0\n", "server.max_connections"),
            ("server:\n  idle_timeout: 0s\n", "server.idle_timeout"),
            ("server:\n  write_timeout: 0s\n", "server.write_timeout"),
            (
                "server:\n  shutdown_timeout: 0s\n",
                "server.shutdown_timeout",
            ),
            (
                "server:\n  max_connections_per_address: 0\n",
                "server.max_connections_per_address",
            ),
            (
                "server:\n  max_buffered_bytes: 12 parsecs\n",
                "server.max_buffered_bytes",
            ),
            (
                "server:\n  max_buffered_bytes: 1KiB\n",
                "server.max_buffered_bytes",
            ),
            (
                "server:\n  max_buffered_bytes: 99999999999999GiB\n",
                "server.max_buffered_bytes",
            ),
            (
                "server:\n  trusted_proxies: [\"proxy.local\"]\n",
                "server.trusted_proxies",
            ),
            (
                "server:\n  trusted_proxies: [\"10.0.0.0/33\"]\n",
                "server.trusted_proxies",
            ),
        ] {
            let e = load(yaml, &[]).unwrap_err().0;
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    /// Values that the generic parsing would turn into numbers, booleans or lists.
    const TRICKY: &[&str] = &[
        "000123",
        "0",
        "-0",
        "9223372036854775808",
        "1e5",
        "1.50",
        "0x1F",
        "true",
        "FALSE",
        "[a, b]",
        "{k: v}",
        " padded ",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
    ];

    #[test]
    fn secret_overrides_keep_their_text() {
        for value in TRICKY {
            let l = load(
                "",
                &[
                    ("CLIPROXY__MANAGEMENT__SECRET_KEY", value),
                    ("CLIPROXY__AUTH__ENCRYPTION__KEY", value),
                    ("CLIPROXY__API_KEYS", value),
                ],
            )
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(l.config.management.secret_key.expose(), *value);
            assert_eq!(l.config.auth.encryption.key.expose(), *value);
            let keys: Vec<&str> = l.config.api_keys.iter().map(Secret::expose).collect();
            assert_eq!(keys, value.split(',').collect::<Vec<_>>(), "{value}");
        }
        let l = load("", &[("CLIPROXY__API_KEYS", "000123,true,1e5")]).unwrap();
        let keys: Vec<&str> = l.config.api_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["000123", "true", "1e5"]);
        // Set but empty: no client keys (not one empty key).
        let l = load("api_keys: [k]\n", &[("CLIPROXY__API_KEYS", "")]).unwrap();
        assert!(l.config.api_keys.is_empty());
        // Other settings are still parsed.
        let l = load("", &[("CLIPROXY__PORT", "0009000")]).unwrap();
        assert_eq!(l.config.port, 9000);
    }

    #[test]
    fn config_errors_never_show_a_secret() {
        let secret = "271828182845904523536";
        /// The config file, the environment, and the key the error must name.
        type Case<'a> = (String, Vec<(&'a str, String)>, &'a str);
        let cases: Vec<Case> = vec![
            // A secret beside a bad neighbour, from the environment.
            (
                String::new(),
                vec![
                    ("CLIPROXY__API_KEYS", format!("{secret},{secret}1")),
                    ("CLIPROXY__MANAGEMENT__SECRET_KEY", secret.to_string()),
                    ("CLIPROXY__AUTH__ENCRYPTION__KEY", secret.to_string()),
                    ("CLIPROXY__MANAGEMENT__ALLOW_REMOTE", "sometimes".into()),
                ],
                "management.allow_remote",
            ),
            (
                String::new(),
                vec![
                    ("CLIPROXY__API_KEYS", secret.to_string()),
                    ("CLIPROXY__PORT", "99999999".into()),
                ],
                "port",
            ),
            (
                String::new(),
                vec![("CLIPROXY__API_KEYS", format!("{secret},,x"))],
                "api_keys[1]",
            ),
            // Secrets in the file that YAML reads as numbers, booleans, lists or maps.
            (format!("api_keys: {secret}\n"), vec![], "api_keys"),
            (format!("api_keys: [{secret}]\n"), vec![], "api_keys[0]"),
            (
                format!("api_keys: [\"x\", {{k: {secret}}}]\n"),
                vec![],
                "api_keys[1]",
            ),
            (format!("api_keys: \"{secret}\"\n"), vec![], "api_keys"),
            (
                format!("management:\n  secret_key: {secret}\n"),
                vec![],
                "management.secret_key",
            ),
            (
                format!("management:\n  secret_key: [{secret}]\n"),
                vec![],
                "management.secret_key",
            ),
            (
                format!("auth:\n  encryption:\n    key: {secret}.5\n"),
                vec![],
                "auth.encryption.key",
            ),
            (
                "auth:\n  encryption:\n    key: true\n".into(),
                vec![],
                "auth.encryption.key",
            ),
            (
                format!("management:\n  secret_key: \"{secret}\"\n  allow_remote: maybe\n"),
                vec![],
                "management.allow_remote",
            ),
        ];
        for (yaml, env, key) in cases {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let e = load(&yaml, &env).unwrap_err().0;
            assert!(e.contains(key), "{yaml} {env:?}: {e}");
            // Not the secret, nor any long part of it.
            assert!(!e.contains(&secret[..8]), "{yaml} {env:?}: {e}");
        }
    }

    #[test]
    fn secrets_in_the_file_are_noticed() {
        for (yaml, found) in [
            ("", vec![]),
            ("api_keys: []\n", vec![]),
            ("api_keys: [\"k\"]\n", vec!["api_keys"]),
            ("management:\n  secret_key: \"\"\n", vec![]),
            (
                "management:\n  secret_key: plain-key\n",
                vec!["management.secret_key"],
            ),
            (
                "management:\n  secret_key: \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\"\n",
                vec![],
            ),
            (
                "auth:\n  encryption:\n    enabled: true\n    key_env: K\n",
                vec![],
            ),
            (
                "api_keys: [a]\nauth:\n  encryption:\n    key: \"abc\"\n",
                vec!["api_keys", "auth.encryption.key"],
            ),
        ] {
            assert_eq!(secrets_set_in(yaml), found, "{yaml}");
        }
        // From the environment only: the file holds none.
        let l = load("port: 1\n", &[("CLIPROXY__API_KEYS", "k")]).unwrap();
        assert!(l.secrets_in_file.is_empty());
        assert!(l.config_file.is_some());
    }

    #[test]
    fn secrets_do_not_print() {
        let l = load("management:\n  secret_key: hunter2hunter2\n", &[]).unwrap();
        assert!(!format!("{:?}", l.config).contains("hunter2"));
    }
}
