//! The provider-specific part of an OAuth credential's life: behind one trait, [`OauthFlow`],
//! the call to a provider's token endpoint that turns the stored material
//! ([`RefreshMaterial`]) into new tokens ([`Refreshed`]) or says why not ([`FlowError`]).
//! The refresh worker decides when and how often; a flow makes one call (or kiro's few) and
//! answers. [`Flows`] holds them by provider name: copilot's token exchange ([`copilot`]),
//! kiro's AWS SSO OIDC grant ([`kiro`]), the RFC 6749 refresh grant of any provider whose
//! config names a `token_url` ([`grant`]), and whatever an embedding program registers (DEV.md).
//! Copilot and kiro also log in with a device flow (RFC 8628): [`OauthFlow::start_login`] and
//! [`OauthFlow::poll_login`], with the bounds and the poll outcomes they share in [`device`].
//! [`client`] is what they share: the HTTP client, the error body, the bounds on an answer.

pub mod client;
pub mod copilot;
pub mod device;
pub mod grant;
pub mod kiro;

use crate::config::Config;
use crate::domain::ProviderName;
use crate::domain::login::{DeviceAuthorization, LoginRequest, Poll, PollMaterial};
use crate::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use crate::providers::Registry;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The provider-specific part of an OAuth login and refresh. Copilot, Kiro and the RFC 6749
/// grant are its first implementations; an embedding program registers its own with
/// [`Flows::register`].
pub trait OauthFlow: Send + Sync {
    /// Exchange the stored material for a new access token. One call: no retry loop inside
    /// (the worker retries `Transient` errors with backoff).
    fn refresh<'a>(
        &'a self,
        material: &'a RefreshMaterial,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Refreshed, FlowError>>;

    /// Whether this flow logs in with a device flow ([`OauthFlow::start_login`]).
    fn has_login(&self) -> bool {
        false
    }

    /// Start a device-flow login: whatever the provider needs first (kiro registers a
    /// client), then the device authorization. `Unrefreshable` when the request cannot be
    /// served as made, without a call (a start URL or region the flow does not take: 400 to
    /// the caller); `Rejected` when the provider refused (502 with its reason); `Transient`
    /// when it could not be reached.
    fn start_login<'a>(
        &'a self,
        request: &'a LoginRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<DeviceAuthorization, FlowError>> {
        let _ = (request, now);
        Box::pin(async {
            Err(FlowError::Unrefreshable(
                "this provider has no login flow".into(),
            ))
        })
    }

    /// Poll the token endpoint once for the login `material` belongs to.
    fn poll_login<'a>(
        &'a self,
        material: PollMaterial<'a>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Poll> {
        let _ = (material, now);
        Box::pin(async { Poll::Failed("this provider has no login flow".into()) })
    }
}

/// The flows by provider name.
#[derive(Clone, Default)]
pub struct Flows {
    flows: BTreeMap<ProviderName, Arc<dyn OauthFlow>>,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Flows").field(&self.flows.keys()).finish()
    }
}

impl Flows {
    /// copilot and kiro (when those providers exist in the registry), and the RFC 6749 grant
    /// for every provider whose config block names `token_url` (which wins over copilot's or
    /// kiro's own flow: the config said so).
    pub fn from_config(config: &Config, registry: &Registry) -> Flows {
        let http = client::Http::new();
        let mut flows = Flows::default();
        if registry.contains("copilot") {
            flows.register(
                ProviderName::from("copilot"),
                Arc::new(copilot::CopilotFlow::new(
                    http.clone(),
                    &config.oauth.copilot,
                )),
            );
        }
        if registry.contains("kiro") {
            flows.register(
                ProviderName::from("kiro"),
                Arc::new(kiro::KiroFlow::new(http.clone(), &config.oauth.kiro)),
            );
        }
        for provider in registry.all() {
            if let Some(settings) = &provider.refresh_grant {
                flows.register(
                    provider.name.clone(),
                    Arc::new(grant::GrantFlow::new(http.clone(), settings.clone())),
                );
            }
        }
        flows
    }

    /// Add `flow` for `provider`, replacing the one it had.
    pub fn register(&mut self, provider: ProviderName, flow: Arc<dyn OauthFlow>) {
        self.flows.insert(provider, flow);
    }

    /// Add every flow of `other`, replacing those of the same providers (an embedding
    /// program's or a test's flows over the config's).
    pub fn merge(&mut self, other: Flows) {
        self.flows.extend(other.flows);
    }

    pub fn get(&self, provider: &str) -> Option<Arc<dyn OauthFlow>> {
        self.flows.get(provider).cloned()
    }

    /// The providers that have a flow, sorted.
    pub fn providers(&self) -> Vec<ProviderName> {
        self.flows.keys().cloned().collect()
    }
}

/// The refresh token a flow presents, or `Unrefreshable` without one.
fn refresh_token<'m>(material: &'m RefreshMaterial, what: &str) -> Result<&'m str, FlowError> {
    material
        .refresh_token
        .as_ref()
        .map(|t| t.expose())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FlowError::Unrefreshable(format!("the credential has no {what}")))
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Fixed;
    impl OauthFlow for Fixed {
        fn refresh<'a>(
            &'a self,
            _: &'a RefreshMaterial,
            _: DateTime<Utc>,
        ) -> BoxFuture<'a, Result<Refreshed, FlowError>> {
            Box::pin(async { Err(FlowError::Unrefreshable("fixed".into())) })
        }
    }

    #[tokio::test]
    async fn flows_by_provider() {
        let mut blocks = BTreeMap::new();
        blocks.insert(
            "my-llm".to_string(),
            crate::providers::ProviderConfig {
                format: Some(crate::providers::Format::Openai),
                base_url: Some("http://x/v1".into()),
                token_url: Some("http://auth.example/token".into()),
                client_id: Some("cid".into()),
                ..Default::default()
            },
        );
        let config = Config::default();
        let registry = Registry::from_config(&blocks);
        let mut flows = Flows::from_config(&config, &registry);
        assert_eq!(flows.providers(), vec!["copilot", "kiro", "my-llm"]);
        assert!(flows.get("openai").is_none());
        flows.register(ProviderName::from("openai"), Arc::new(Fixed));
        let material = testing::material("openai", Some("rt"));
        let got = flows
            .get("openai")
            .unwrap()
            .refresh(&material, Utc::now())
            .await;
        assert_eq!(got.unwrap_err(), FlowError::Unrefreshable("fixed".into()));
        assert_eq!(
            format!("{flows:?}"),
            r#"Flows(["copilot", "kiro", "my-llm", "openai"])"#
        );
    }
}
