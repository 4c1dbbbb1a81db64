//! Kiro's refresh half: the OIDC refresh grant with the stored client, and registering a new
//! client when its secret expired, against a scripted mock.

use super::super::testing::{self, Mock, json, now};
use super::*;
use serde_json::json as j;

pub(super) fn flow(base: &str) -> KiroFlow {
    KiroFlow::new(
        Http::new(),
        &KiroOAuthConfig {
            oidc_base_url: format!("{base}/{{region}}/"),
            ..Default::default()
        },
    )
}

/// A kiro credential with a registered client whose secret expires at `secret_expires`.
fn material(secret_expires: Option<DateTime<Utc>>) -> RefreshMaterial {
    let mut m = testing::material("kiro", Some("rt-kiro-1"));
    m.client_secret = Some(Secret::new("cs-old"));
    m.extra.client_id = Some("client-old".into());
    m.extra.client_secret_expires_at = secret_expires;
    m.extra.region = Some("eu-west-1".into());
    m
}

fn registered(n: u32) -> testing::Scripted {
    json(
        200,
        j!({"clientId": format!("client-{n}"), "clientSecret": format!("cs-{n}"),
                  "clientSecretExpiresAt": now().timestamp() + 90 * 86400,
                  "clientIdIssuedAt": now().timestamp()}),
    )
}

#[tokio::test]
async fn refreshes_with_the_stored_client() {
    let (mock, base) = Mock::start(vec![
        json(
            200,
            j!({"accessToken": "at-k", "expiresIn": 28800, "refreshToken": "rt-kiro-2",
                      "tokenType": "Bearer"}),
        ),
        json(200, j!({"accessToken": "at-k2", "expiresIn": 3600})),
    ])
    .await;
    let flow = flow(&base);
    let m = material(Some(now() + TimeDelta::days(30)));
    let got = flow.refresh(&m, now()).await.unwrap();
    assert_eq!(got.access_token.expose(), "at-k");
    assert_eq!(got.expires_at, now() + TimeDelta::seconds(28800));
    assert_eq!(got.refresh_token.as_ref().unwrap().expose(), "rt-kiro-2");
    assert!(got.client.is_none());
    testing::assert_no_secret(&got, &["at-k", "rt-kiro-2"]);
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/eu-west-1/token");
    assert_eq!(
        sent[0].json(),
        j!({"clientId": "client-old", "clientSecret": "cs-old",
            "grantType": "refresh_token", "refreshToken": "rt-kiro-1"})
    );
    // No rotation.
    let got = flow.refresh(&m, now()).await.unwrap();
    assert!(got.refresh_token.is_none());
}

#[tokio::test]
async fn an_expiring_or_missing_client_is_registered_again_first() {
    for m in [
        material(Some(now() + TimeDelta::minutes(4))),
        material(Some(now() - TimeDelta::days(1))),
        {
            let mut m = material(None);
            m.client_secret = None;
            m.extra.region = None;
            m
        },
    ] {
        let (mock, base) = Mock::start(vec![
            registered(7),
            json(200, j!({"accessToken": "at-new", "expiresIn": 3600})),
        ])
        .await;
        let got = flow(&base).refresh(&m, now()).await.unwrap();
        let client = got.client.as_ref().unwrap();
        assert_eq!(client.client_id, "client-7");
        assert_eq!(client.client_secret.expose(), "cs-7");
        assert_eq!(
            client.client_secret_expires_at,
            Some(now() + TimeDelta::days(90))
        );
        testing::assert_no_secret(&got, &["cs-7", "at-new"]);
        let sent = mock.requests();
        let region = m.extra.region.as_deref().unwrap_or("us-east-1");
        assert_eq!(sent[0].path, format!("/{region}/client/register"));
        assert_eq!(
            sent[0].json(),
            j!({"clientName": "Kiro IDE", "clientType": "public", "scopes": SCOPES,
                "grantTypes": GRANT_TYPES})
        );
        assert_eq!(sent[1].json()["clientId"], "client-7");
        assert_eq!(sent[1].json()["clientSecret"], "cs-7");
    }
}

#[tokio::test]
async fn invalid_client_registers_once_and_retries_once() {
    let invalid = || {
        json(
            401,
            j!({"error": "invalid_client", "error_description": "bad secret cs-old"}),
        )
    };
    let (mock, base) = Mock::start(vec![
        invalid(),
        registered(8),
        json(200, j!({"accessToken": "at-8", "expiresIn": 3600})),
    ])
    .await;
    let flow = flow(&base);
    let m = material(Some(now() + TimeDelta::days(30)));
    let got = flow.refresh(&m, now()).await.unwrap();
    assert_eq!(got.client.as_ref().unwrap().client_id, "client-8");
    let paths: Vec<String> = mock.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/eu-west-1/token",
            "/eu-west-1/client/register",
            "/eu-west-1/token"
        ]
    );

    // Refused again with the new client: final, and not a third try.
    let (mock, base) = Mock::start(vec![invalid(), registered(9), invalid(), registered(10)]).await;
    let e = self::flow(&base).refresh(&m, now()).await.unwrap_err();
    assert_eq!(
        e,
        FlowError::Rejected("invalid_client: bad secret *** (HTTP 401)".into())
    );
    assert_eq!(mock.requests().len(), 3);

    // A client registered just now and refused is not registered again.
    let (mock, base) = Mock::start(vec![registered(11), invalid(), registered(12)]).await;
    let mut none = material(None);
    none.client_secret = None;
    let e = self::flow(&base).refresh(&none, now()).await.unwrap_err();
    assert!(matches!(e, FlowError::Rejected(_)), "{e:?}");
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn failures() {
    let (mock, base) = Mock::start(vec![
        json(
            400,
            j!({"error": "invalid_grant", "error_description": "Invalid refresh token rt-kiro-1"}),
        ),
        json(500, j!({"error": "server_error"})),
        (429, vec![("retry-after", "30".into())], vec![]),
        (200, vec![], b"<html>".to_vec()),
        testing::huge(10 << 20),
        json(200, j!({"accessToken": "a", "expiresIn": 1e300})),
        json(200, j!({"accessToken": "a", "expiresIn": -1})),
    ])
    .await;
    let flow = flow(&base);
    let m = material(None);
    let next = async || flow.refresh(&m, now()).await;
    assert_eq!(
        next().await.unwrap_err(),
        FlowError::Rejected("invalid_grant: Invalid refresh token *** (HTTP 400)".into())
    );
    assert!(matches!(
        next().await.unwrap_err(),
        FlowError::Transient {
            retry_after: None,
            ..
        }
    ));
    assert!(matches!(
        next().await.unwrap_err(),
        FlowError::Transient { retry_after: Some(d), .. } if d.as_secs() == 30
    ));
    for _ in 0..2 {
        let e = next().await.unwrap_err();
        assert!(
            matches!(&e, FlowError::Transient { reason, .. } if reason.starts_with("answer unreadable")),
            "{e:?}"
        );
    }
    assert_eq!(
        next().await.unwrap().expires_at,
        now() + client::MAX_LIFETIME
    );
    assert_eq!(
        next().await.unwrap().expires_at,
        now() + client::MIN_LIFETIME
    );
    assert_eq!(mock.requests().len(), 7);
}

#[tokio::test]
async fn a_refused_registration_is_final_and_a_failing_one_transient() {
    let mut m = material(None);
    m.client_secret = None;
    let (_mock, base) = Mock::start(vec![
        json(
            400,
            j!({"error": "invalid_request", "error_description": "no"}),
        ),
        json(500, j!({})),
        json(200, j!({"clientId": "c"})),
    ])
    .await;
    let flow = flow(&base);
    assert_eq!(
        flow.refresh(&m, now()).await.unwrap_err(),
        FlowError::Rejected("client registration: invalid_request: no (HTTP 400)".into())
    );
    assert!(matches!(
        flow.refresh(&m, now()).await.unwrap_err(),
        FlowError::Transient { .. }
    ));
    assert!(matches!(
        flow.refresh(&m, now()).await.unwrap_err(),
        FlowError::Transient { .. }
    ));
}

#[tokio::test]
async fn bad_regions_and_missing_tokens_send_nothing() {
    let (mock, base) = Mock::start(vec![]).await;
    let flow = flow(&base);
    for region in ["", "EU-WEST-1", "a/b", "x.evil.example", &"a".repeat(33)] {
        let mut m = material(None);
        m.extra.region = Some(region.to_string());
        assert!(
            matches!(
                flow.refresh(&m, now()).await.unwrap_err(),
                FlowError::Unrefreshable(_)
            ),
            "{region}"
        );
    }
    let mut m = material(None);
    m.refresh_token = None;
    assert!(matches!(
        flow.refresh(&m, now()).await.unwrap_err(),
        FlowError::Unrefreshable(_)
    ));
    assert!(mock.requests().is_empty());
    testing::assert_no_secret(&m, &["cs-old", "rt-kiro-1", "old-access-token"]);
    testing::assert_no_secret(&flow, &["cs-old"]);
}
