//! Test helpers of the flows: a token endpoint mock on 127.0.0.1:0 that answers from a script
//! and records what it was sent, and credential material to refresh.

use crate::crypto::Secret;
use crate::domain::refresh::RefreshMaterial;
use crate::domain::{CredentialId, OauthExtra, ProviderName};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.body.as_bytes())
            .into_owned()
            .collect()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// The fixed now of the flows' tests.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

/// A scripted answer: status, extra headers, body.
pub type Scripted = (u16, Vec<(&'static str, String)>, Vec<u8>);

pub fn json(status: u16, body: serde_json::Value) -> Scripted {
    (
        status,
        vec![("content-type", "application/json".into())],
        body.to_string().into_bytes(),
    )
}

#[derive(Clone, Default)]
pub struct Mock {
    script: Arc<Mutex<VecDeque<Scripted>>>,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Mock {
    /// A mock answering `script` in order (500 once it runs out); returns it and its base URL.
    pub async fn start(script: Vec<Scripted>) -> (Mock, String) {
        let mock = Mock {
            script: Arc::new(Mutex::new(script.into())),
            received: Arc::default(),
        };
        let m = mock.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let m = m.clone();
                async move {
                    m.received.lock().unwrap().push(Received {
                        method,
                        path: uri.path().to_string(),
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                    let (status, headers, body) = m.script.lock().unwrap().pop_front().unwrap_or((
                        500,
                        vec![],
                        b"script ran out".to_vec(),
                    ));
                    let mut response = axum::response::Response::new(axum::body::Body::from(body));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (name, value) in headers {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (mock, format!("http://{addr}"))
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

pub fn material(provider: &str, refresh_token: Option<&str>) -> RefreshMaterial {
    RefreshMaterial {
        credential_id: CredentialId::new("cred_test"),
        provider: ProviderName::from(provider),
        access_token: Some(Secret::new("old-access-token")),
        refresh_token: refresh_token.map(Secret::new),
        client_secret: None,
        extra: OauthExtra::default(),
        expires_at: None,
    }
}

/// What an answer of `bytes` bytes of JSON-looking text looks like.
pub fn huge(bytes: usize) -> Scripted {
    let mut body = b"{\"access_token\":\"".to_vec();
    body.resize(bytes, b'a');
    (200, vec![], body)
}

/// `Debug` of `value` shows none of `secrets`.
pub fn assert_no_secret(value: &impl std::fmt::Debug, secrets: &[&str]) {
    let shown = format!("{value:?}");
    for s in secrets {
        assert!(!shown.contains(s), "{s} in {shown}");
    }
}
