//! Requests a browser sends on another site's behalf (README, "Browsers and other sites"): a
//! page elsewhere cannot make the operator's browser manage credentials, start a login or
//! spend quota through the loopback rule, by a simple cross-site request or by DNS rebinding.
//! Programs (no `Origin`, no `Sec-Fetch-Site`) and the server's own pages pass.

use crate::common::{Api, Home, TestApp};
use serde_json::json;

/// A raw request with `headers` and a `text/plain` body (the kind a page elsewhere may send
/// without asking first): its status and error code.
async fn send(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = app
        .client
        .request(method.parse().unwrap(), format!("{}{path}", app.base))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let code = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code)
}

fn host(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn pages_elsewhere_cannot_manage_through_the_loopback_rule() {
    let home = Home::new("");
    let app = home.start().await;
    let own = format!("http://{}", host(&app));
    let add = json!({"provider": "openai", "token": "sk-from-evil"}).to_string();
    let foreign: &[&[(&str, &str)]] = &[
        &[("origin", "https://evil.example")],
        &[("origin", "null")],
        &[("origin", "http://127.0.0.1:1")],
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ],
        &[("sec-fetch-site", "same-site"), ("origin", &own)],
    ];
    for headers in foreign {
        for (method, path, body) in [
            ("POST", "/v0/management/auths", add.as_str()),
            ("POST", "/v0/management/auths/import", add.as_str()),
            ("DELETE", "/v0/management/auths/openai", ""),
            ("POST", "/v0/oauth/copilot/start", ""),
            (
                "POST",
                "/v1/chat/completions",
                r#"{"model":"gpt-4o","messages":[]}"#,
            ),
            ("DELETE", "/v0/management/bans", ""),
        ] {
            let got = send(&app, method, path, headers, body).await;
            assert_eq!(
                got,
                (403, "cross_site_request".to_string()),
                "{method} {path} {headers:?}"
            );
        }
    }
    assert!(app.auths().await.is_empty(), "nothing was added");

    // DNS rebinding: a name of the page's own, pointed at loopback, is "same origin".
    let rebound = [
        ("host", "rebound.evil.example:8317"),
        ("origin", "http://rebound.evil.example:8317"),
    ];
    for path in ["/v0/management/auths", "/v1/models"] {
        let got = send(&app, "GET", path, &rebound, "").await;
        assert_eq!(got, (403, "host_not_allowed".to_string()), "{path}");
    }
    let got = send(&app, "POST", "/v0/management/auths", &rebound, &add).await;
    assert_eq!(got, (403, "host_not_allowed".to_string()));
    assert!(app.auths().await.is_empty(), "nothing was added");

    // The server's own page (same origin), a typed address, and programs pass.
    for headers in [
        &[("sec-fetch-site", "same-origin"), ("origin", own.as_str())][..],
        &[("sec-fetch-site", "none")],
        &[("origin", own.as_str())],
        &[("host", "localhost")],
        &[],
    ] {
        let (status, code) = send(&app, "GET", "/v0/management/auths", headers, "").await;
        assert_eq!(status, 200, "{headers:?}: {code}");
    }
    let r = app.post("/v0/management/auths", &add).await;
    assert_eq!(r.status, 201, "{}", r.text);

    // The pages open from a link elsewhere, but not under another site's name.
    let (status, _) = send(
        &app,
        "GET",
        "/v0/oauth/kiro",
        &[("sec-fetch-site", "cross-site")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let got = send(
        &app,
        "GET",
        "/v0/oauth/kiro",
        &[("host", "rebound.evil.example")],
        "",
    )
    .await;
    assert_eq!(got, (403, "host_not_allowed".to_string()));
    let got = send(
        &app,
        "GET",
        "/v0/oauth/copilot/status?session=x",
        &[("origin", "https://evil.example")],
        "",
    )
    .await;
    assert_eq!(got, (403, "cross_site_request".to_string()));
    app.stop().await;
}

/// HTTP/2 (cleartext, as a proxy in front may speak it) names the host in `:authority`, not
/// in a `Host` header: the same rules hold.
#[tokio::test]
async fn over_http2_the_authority_is_the_host() {
    let home = Home::new("");
    let app = home.start().await;
    let addr: std::net::SocketAddr = host(&app).parse().unwrap();
    let h2 = |name: &str| {
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .resolve(name, addr)
            .build()
            .unwrap()
    };
    let port = addr.port();
    let rebound = h2("rebound.evil.example")
        .get(format!(
            "http://rebound.evil.example:{port}/v0/management/auths"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.version(), reqwest::Version::HTTP_2);
    assert_eq!(rebound.status(), 403);
    let own = format!("http://127.0.0.1:{port}");
    let ok = h2("127.0.0.1")
        .get(format!("{own}/v0/management/auths"))
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let elsewhere = h2("127.0.0.1")
        .get(format!("{own}/v0/management/auths"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 403);
    app.stop().await;
}

/// Behind a trusted proxy on this machine that rewrites `Host`, its `X-Forwarded-Host` is the
/// name the browser used.
#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_host_counts() {
    let home = Home::new("server:\n  trusted_proxies: [\"127.0.0.1/32\"]\n");
    let app = home.start().await;
    let through = |forwarded_host: &'static str, origin: Option<&'static str>| {
        let mut h = vec![
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-host", forwarded_host),
        ];
        if let Some(o) = origin {
            h.push(("origin", o));
        }
        h
    };
    let got = send(
        &app,
        "GET",
        "/v0/management/auths",
        &through("rebound.evil.example", None),
        "",
    )
    .await;
    assert_eq!(got, (403, "host_not_allowed".to_string()));
    let got = send(
        &app,
        "POST",
        "/v0/oauth/copilot/start",
        &through("localhost:8080", Some("http://evil.example")),
        "",
    )
    .await;
    assert_eq!(got, (403, "cross_site_request".to_string()));
    // The page behind the proxy calls its own origin: it passes.
    let (status, code) = send(
        &app,
        "GET",
        "/v0/management/auths",
        &through("localhost:8080", Some("http://localhost:8080")),
        "",
    )
    .await;
    assert_eq!(status, 200, "{code}");
    app.stop().await;
}

#[tokio::test]
async fn with_keys_the_host_is_free_but_other_sites_are_still_refused() {
    let phc = cliproxyapi::crypto::hash_secret("the-management-key").unwrap();
    let home = Home::new(&format!(
        "api_keys: [\"client-key-1\"]\nmanagement:\n  secret_key: \"{phc}\"\n"
    ));
    let app = home.start().await;
    let key = [
        ("x-management-key", "the-management-key"),
        ("host", "cliproxy.internal:8317"),
    ];
    let (status, code) = send(&app, "GET", "/v0/management/auths", &key, "").await;
    assert_eq!(status, 200, "{code}");
    let client = [
        ("authorization", "Bearer client-key-1"),
        ("host", "cliproxy.internal"),
    ];
    let (status, code) = send(&app, "GET", "/v1/models", &client, "").await;
    assert_eq!(status, 200, "{code}");
    // A key is a header no other site's page can send; the management API refuses such a
    // page's requests all the same.
    let got = send(
        &app,
        "GET",
        "/v0/management/auths",
        &[
            ("x-management-key", "the-management-key"),
            ("sec-fetch-site", "cross-site"),
        ],
        "",
    )
    .await;
    assert_eq!(got, (403, "cross_site_request".to_string()));
    app.stop().await;
}
