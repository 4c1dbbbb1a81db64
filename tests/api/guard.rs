//! The guards under attack: bursts of wrong management keys, client-key guessing, clients
//! behind trusted reverse proxies, lifting bans, the `Authorization` scheme, and the policy
//! for the management key's argon2 hash.

use crate::common::{Api, Home, TestApp};
use cliproxyapi::crypto::{PhcParams, hash_secret, hash_secret_with};
use futures_util::future::join_all;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A policy-compliant hash that is quick to check (OWASP's m=7168,t=5 pair).
fn cheap_phc(secret: &str) -> String {
    let cost = PhcParams {
        m_kib: 7_168,
        t: 5,
        p: 1,
    };
    hash_secret_with(secret, cost).unwrap()
}

/// Requests to a running server from a chosen local address (127.0.0.0/8 is all local).
struct From {
    base: String,
    client: reqwest::Client,
}

impl Api for From {
    fn base(&self) -> &str {
        &self.base
    }
    fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

fn from(app: &TestApp, ip: &str) -> From {
    From {
        base: app.base.clone(),
        client: reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap(),
    }
}

const AUTHS: &str = "/v0/management/auths";
const BANS: &str = "/v0/management/bans";

/// GET `path` with a management key and, if given, an `X-Forwarded-For`.
async fn get_as(api: &impl Api, path: &str, mkey: &str, xff: Option<&str>) -> (u16, String) {
    let mut headers = vec![("x-management-key", mkey)];
    if let Some(x) = xff {
        headers.push(("x-forwarded-for", x));
    }
    let r = api.call_with("GET", path, None, &headers).await;
    let code = if r.status == 200 {
        String::new()
    } else {
        r.error_code()
    };
    (r.status, code)
}

/// [`get_as`], sent again while the answer is 503 `server_busy`: on a loaded machine a call
/// may wait past the server's 5 s for its turn at an argon2 check, and such a call runs no
/// check and counts nothing, so the counts the tests assert hold however slow the machine.
async fn get_settled(api: &impl Api, path: &str, mkey: &str, xff: Option<&str>) -> (u16, String) {
    let mut r = get_as(api, path, mkey, xff).await;
    for _ in 0..100 {
        if r != (503, "server_busy".to_string()) {
            break;
        }
        r = get_as(api, path, mkey, xff).await;
    }
    r
}

fn bans_of(v: &Value) -> Vec<(String, String)> {
    v["bans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert!(b["until"].as_str().is_some(), "{b}");
            (
                b["address"].as_str().unwrap().to_string(),
                b["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_wrong_management_keys_is_banned_after_few_checks() {
    let home = Home::new(&format!(
        "server:\n  trusted_proxies: [\"127.0.0.0/8\"]\nmanagement:\n  secret_key: \"{}\"\n  allow_remote: true\n",
        cheap_phc("the-right-key")
    ));
    let app = home.start().await;
    let guard = &app.guards.management;

    // 800 wrong keys at once from eight loopback addresses (one machine: one ban).
    let clients: Vec<From> = (2..=9)
        .map(|i| from(&app, &format!("127.0.0.{i}")))
        .collect();
    let calls = (0..800).map(|i| {
        let c = &clients[i % clients.len()];
        async move {
            let guess = format!("guess-{i}");
            get_settled(c, AUTHS, &guess, None).await
        }
    });
    let mut seen: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for r in join_all(calls).await {
        *seen.entry(r).or_default() += 1;
    }
    let (runs, peak) = guard.check_counts();
    assert_eq!(runs, 5, "{seen:?}");
    assert_eq!(
        seen,
        BTreeMap::from([
            ((401, "invalid_management_key".into()), 5),
            ((403, "too_many_attempts".into()), 795),
        ])
    );
    assert!(peak <= guard.permits(), "{peak} > {}", guard.permits());
    // The right key from any loopback address is refused too now.
    let local = from(&app, "127.0.0.1");
    assert_eq!(
        get_as(&local, AUTHS, "the-right-key", None).await,
        (403, "too_many_attempts".into())
    );
    let r = local
        .call_with("GET", BANS, None, &[("x-management-key", "the-right-key")])
        .await;
    assert_eq!(
        bans_of(&r.json()),
        vec![("loopback".into(), "management".into())]
    );

    // Then 800 more, forwarded for 17 remote clients: eight IPv4 addresses and nine hosts of
    // one IPv6 /64. Each address runs at most five checks and ends banned.
    let (before, _) = guard.check_counts();
    let mut xffs: Vec<String> = (1..=8).map(|i| format!("198.51.100.{i}")).collect();
    xffs.extend((1..=9).map(|i| format!("2001:db8:5:5:{i}::{i}")));
    let calls = (0..800).map(|i| {
        let c = &clients[i % clients.len()];
        let xff = xffs[i % xffs.len()].clone();
        async move {
            let guess = format!("guess-{i}");
            get_settled(c, AUTHS, &guess, Some(&xff)).await
        }
    });
    let mut seen: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for r in join_all(calls).await {
        *seen.entry(r).or_default() += 1;
    }
    let (runs, peak) = guard.check_counts();
    assert_eq!(runs - before, 9 * 5, "{seen:?}");
    assert_eq!(seen[&(401, "invalid_management_key".into())], 45);
    assert_eq!(seen[&(403, "too_many_attempts".into())], 755);
    assert!(peak <= guard.permits());
    let r = local
        .call_with(
            "DELETE",
            BANS,
            None,
            &[("x-management-key", "the-right-key")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let lifted = bans_of(&json!({"bans": r.json()["lifted"]}));
    assert_eq!(lifted.len(), 10);
    assert!(lifted.contains(&("2001:db8:5:5::/64".into(), "management".into())));
    assert!(lifted.contains(&("198.51.100.8".into(), "management".into())));
    assert_eq!(get_as(&local, AUTHS, "the-right-key", None).await.0, 200);
    app.stop().await;
    let log = home.auth_log();
    assert_eq!(log.matches("banned until").count(), 10, "{log}");
    assert!(log.contains("management access from 2001:db8:5:5::/64 banned until"));
    assert!(!log.contains("guess-"));
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_address() {
    let home = Home::new(&format!(
        "server:\n  trusted_proxies: [\"127.0.0.1\", \"10.0.0.0/8\"]\nmanagement:\n  secret_key: \"{}\"\n  allow_remote: true\n",
        cheap_phc("right")
    ));
    let app = home.start().await;
    let proxy = from(&app, "127.0.0.1");
    for _ in 0..5 {
        assert_eq!(
            get_as(&proxy, AUTHS, "wrong", Some("203.0.113.5")).await,
            (401, "invalid_management_key".into())
        );
    }
    let banned = (403, "too_many_attempts".to_string());
    let ok = (200, String::new());
    // Whose address counts: the last hop that is not one of our proxies.
    let cases: &[(&str, &(u16, String))] = &[
        ("203.0.113.5", &banned),
        ("203.0.113.6", &ok),
        ("  203.0.113.5  ", &banned),
        ("::ffff:203.0.113.5", &banned),
        // What the client wrote on the left changes nothing.
        ("203.0.113.6, 203.0.113.5", &banned),
        ("203.0.113.5, 203.0.113.6", &ok),
        ("127.0.0.1, 203.0.113.6", &ok),
        ("garbage, 203.0.113.5", &banned),
        // Our own proxies are skipped, however many.
        ("203.0.113.5, 10.1.2.3", &banned),
        ("203.0.113.5,10.1.2.3,10.9.9.9,127.0.0.1", &banned),
        ("203.0.113.6, 10.1.2.3, 10.9.9.9", &ok),
    ];
    for (xff, want) in cases {
        assert_eq!(
            &get_as(&proxy, AUTHS, "right", Some(xff)).await,
            *want,
            "{xff}"
        );
    }
    // Several header lines are one list.
    let r = proxy
        .call_with(
            "GET",
            AUTHS,
            None,
            &[
                ("x-management-key", "right"),
                ("x-forwarded-for", "203.0.113.5"),
                ("x-forwarded-for", "10.4.4.4"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    // A header that does not end with an address is refused, not blamed on the proxy.
    for xff in [
        "garbage",
        "",
        ",",
        "203.0.113.5:443",
        "203.0.113.6,",
        "unknown",
        "[::1]",
    ] {
        assert_eq!(
            get_as(&proxy, AUTHS, "right", Some(xff)).await,
            (400, "invalid_forwarded_for".into()),
            "{xff:?}"
        );
    }
    // The proxy's own calls (no header) and a peer that is not a proxy are themselves.
    assert_eq!(get_as(&proxy, AUTHS, "right", None).await, ok);
    let other = from(&app, "127.0.0.2");
    assert_eq!(
        get_as(&other, AUTHS, "right", Some("203.0.113.5")).await,
        ok
    );
    // IPv6 clients are banned by their /64.
    for i in 0..5 {
        let xff = format!("2001:db8:aa:bb::{i}");
        assert_eq!(get_as(&proxy, AUTHS, "wrong", Some(&xff)).await.0, 401);
    }
    for (xff, want) in [
        ("2001:db8:aa:bb::ffff", &banned),
        ("2001:db8:aa:bb:ffff:ffff:ffff:ffff", &banned),
        ("2001:db8:aa:bc::1", &ok),
        ("2001:db8:aa:ba:ffff:ffff:ffff:ffff", &ok),
    ] {
        assert_eq!(
            &get_as(&proxy, AUTHS, "right", Some(xff)).await,
            want,
            "{xff}"
        );
    }
    let r = proxy
        .call_with("GET", BANS, None, &[("x-management-key", "right")])
        .await;
    assert_eq!(
        bans_of(&r.json()),
        vec![
            ("203.0.113.5".into(), "management".into()),
            ("2001:db8:aa:bb::/64".into(), "management".into())
        ]
    );
    // The audit log names the forwarded client.
    let r = proxy
        .call_with(
            "POST",
            AUTHS,
            Some(r#"{"provider": "openai", "token": "sk-audited-0000000000"}"#),
            &[
                ("x-management-key", "right"),
                ("x-forwarded-for", "198.51.100.77, 10.0.0.2"),
            ],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    app.stop().await;
    assert!(
        home.auth_log()
            .contains("through the API from 198.51.100.77"),
        "{}",
        home.auth_log()
    );
}

#[tokio::test]
async fn forwarded_clients_are_not_loopback() {
    let home = Home::new("server:\n  trusted_proxies: [\"127.0.0.1\"]\n");
    let app = home.start().await;
    let proxy = from(&app, "127.0.0.1");
    let call = |path: &'static str, xff: Option<&'static str>| {
        let proxy = &proxy;
        async move {
            let mut h = vec![];
            if let Some(x) = xff {
                h.push(("x-forwarded-for", x));
            }
            let r = proxy.call_with("GET", path, None, &h).await;
            (
                r.status,
                if r.status == 200 {
                    String::new()
                } else {
                    r.error_code()
                },
            )
        }
    };
    for xff in [
        "203.0.113.5",
        "127.0.0.2, 203.0.113.5",
        "2001:db8::1",
        "::ffff:198.51.100.1",
    ] {
        assert_eq!(
            call(AUTHS, Some(xff)).await,
            (403, "remote_management_disabled".into()),
            "{xff}"
        );
        assert_eq!(
            call("/v1/models", Some(xff)).await,
            (403, "remote_clients_disabled".into()),
            "{xff}"
        );
    }
    for xff in [
        None,
        Some("127.0.0.1"),
        Some("203.0.113.5, ::1"),
        Some("127.0.0.1, 127.0.0.1"),
    ] {
        assert_eq!(call(AUTHS, xff).await.0, 200, "{xff:?}");
        assert_eq!(call("/v1/models", xff).await.0, 200, "{xff:?}");
    }
    assert_eq!(
        call("/v1/models", Some("nonsense")).await,
        (400, "invalid_forwarded_for".into())
    );
    // A local peer that is not a trusted proxy: its header is ignored, as before.
    let other = from(&app, "127.0.0.2");
    let r = other
        .call_with("GET", AUTHS, None, &[("x-forwarded-for", "203.0.113.5")])
        .await;
    assert_eq!(r.status, 200);
    app.stop().await;
}

/// GET /v1/models through the proxy for `xff`, with the client key `k` sent `how`.
async fn client_call(proxy: &From, xff: &str, how: &str, k: &str) -> (u16, String, Option<String>) {
    let (path, header) = match how {
        "bearer" => (
            "/v1/models".to_string(),
            Some(("authorization", format!("Bearer {k}"))),
        ),
        "x-api-key" => ("/v1/models".to_string(), Some(("x-api-key", k.to_string()))),
        "goog" => (
            "/v1/models".to_string(),
            Some(("x-goog-api-key", k.to_string())),
        ),
        "query" => (format!("/v1/models?key={k}"), None),
        _ => ("/v1/models".to_string(), None),
    };
    let mut h = vec![("x-forwarded-for", xff)];
    if let Some((n, v)) = &header {
        h.push((*n, v.as_str()));
    }
    let r = proxy.call_with("GET", &path, None, &h).await;
    let code = if r.status == 200 {
        String::new()
    } else {
        r.error_code()
    };
    (r.status, code, r.retry_after)
}

#[tokio::test]
async fn wrong_client_keys_are_banned_per_address() {
    let home = Home::new(
        "api_keys: [\"sk-client-one\", \"sk-client-two\"]\nserver:\n  trusted_proxies: [\"127.0.0.1\"]\n",
    );
    let app = home.start().await;
    let proxy = from(&app, "127.0.0.1");
    let a = "198.51.100.1";
    // Missing keys are not guesses.
    for _ in 0..30 {
        assert_eq!(
            client_call(&proxy, a, "none", "").await.1,
            "missing_api_key"
        );
    }
    // Ten wrong keys, through every place a key can be.
    for (i, how) in ["bearer", "x-api-key", "goog", "query"]
        .iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        let wrong = [
            "sk-client-on",
            "sk-client-onex",
            "SK-CLIENT-ONE",
            "x",
            "sk-client-three",
        ][i % 5];
        assert_eq!(
            client_call(&proxy, a, how, wrong).await.0,
            401,
            "{how} {wrong:?}"
        );
    }
    for how in ["bearer", "x-api-key", "goog", "query"] {
        let r = client_call(&proxy, a, how, "sk-client-one").await;
        assert_eq!((r.0, r.1.as_str()), (403, "too_many_attempts"), "{how}");
        // Fifteen minutes (less the moments this test took).
        let secs: u64 = r.2.unwrap().parse().unwrap();
        assert!((800..=900).contains(&secs), "{secs}");
    }
    // Only that address.
    assert_eq!(
        client_call(&proxy, "198.51.100.2", "bearer", "sk-client-two")
            .await
            .0,
        200
    );
    // An IPv6 /64 the same way.
    for i in 0..10 {
        let xff = format!("2001:db8:c::{i}");
        assert_eq!(client_call(&proxy, &xff, "x-api-key", "nope").await.0, 401);
    }
    assert_eq!(
        client_call(&proxy, "2001:db8:c::abcd", "bearer", "sk-client-one")
            .await
            .0,
        403
    );
    assert_eq!(
        client_call(&proxy, "2001:db8:d::1", "bearer", "sk-client-one")
            .await
            .0,
        200
    );
    // The operator sees and lifts them (management from loopback, no key configured).
    let local = from(&app, "127.0.0.1");
    let r = local.get(BANS).await;
    assert_eq!(
        bans_of(&r.json()),
        vec![
            ("198.51.100.1".into(), "client".into()),
            ("2001:db8:c::/64".into(), "client".into())
        ]
    );
    let r = local.delete(&format!("{BANS}?address={a}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["lifted"][0]["kind"], "client");
    assert_eq!(
        client_call(&proxy, a, "bearer", "sk-client-one").await.0,
        200
    );
    app.stop().await;
    let log = home.auth_log();
    assert!(
        log.contains("client access from 198.51.100.1 banned until"),
        "{log}"
    );
    assert!(
        log.contains("lifted the client ban on 198.51.100.1"),
        "{log}"
    );
    assert!(!log.contains("sk-client"), "{log}");
}

#[tokio::test]
async fn a_local_application_with_a_stale_client_key_locks_no_one_out() {
    let home = Home::new(
        "api_keys: [\"sk-client-one-0123456789\"]\nserver:\n  trusted_proxies: [\"127.0.0.1\"]\n",
    );
    let app = home.start().await;
    let right = "sk-client-one-0123456789";
    // One local application retrying with a stale key, far past the ban's ten, every way.
    let stale = from(&app, "127.0.0.2");
    for (i, how) in ["bearer", "x-api-key", "goog", "query"]
        .iter()
        .cycle()
        .take(60)
        .enumerate()
    {
        let (status, code, _) = client_call_direct(&stale, how, &format!("stale-{i}")).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "invalid_api_key"),
            "{i} {how}"
        );
    }
    // Every local application, the stale one included, still gets in with the right key.
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.255.255.254"] {
        let r = client_call_direct(&from(&app, ip), "bearer", right).await;
        assert_eq!(r.0, 200, "{ip}: {}", r.1);
    }
    let r = from(&app, "127.0.0.1").get(BANS).await;
    assert_eq!(bans_of(&r.json()), vec![]);
    // A loopback client forwarded by the local proxy is counted, as loopback; the direct
    // peers are not held to that ban.
    let proxy = from(&app, "127.0.0.1");
    for _ in 0..10 {
        assert_eq!(client_call(&proxy, "::1", "bearer", "nope").await.0, 401);
    }
    assert_eq!(
        client_call(&proxy, "::1", "bearer", right).await.1,
        "too_many_attempts"
    );
    let r = proxy.get(BANS).await;
    assert_eq!(
        bans_of(&r.json()),
        vec![("loopback".into(), "client".into())]
    );
    for ip in ["127.0.0.1", "127.0.0.2"] {
        assert_eq!(
            client_call_direct(&from(&app, ip), "bearer", right).await.0,
            200
        );
    }
    app.stop().await;
}

/// GET /v1/models from `api` itself (no `X-Forwarded-For`), with the client key `k`.
async fn client_call_direct(api: &From, how: &str, k: &str) -> (u16, String, Option<String>) {
    let (path, header) = match how {
        "bearer" => (
            "/v1/models".to_string(),
            Some(("authorization", format!("Bearer {k}"))),
        ),
        "x-api-key" => ("/v1/models".to_string(), Some(("x-api-key", k.to_string()))),
        "goog" => (
            "/v1/models".to_string(),
            Some(("x-goog-api-key", k.to_string())),
        ),
        _ => (format!("/v1/models?key={k}"), None),
    };
    let h: Vec<(&str, &str)> = header.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let r = api.call_with("GET", &path, None, &h).await;
    let code = if r.status == 200 {
        String::new()
    } else {
        r.error_code()
    };
    (r.status, code, r.retry_after)
}

#[test]
fn broad_trusted_proxies_are_warned_about_at_start() {
    let home = Home::new(
        "server:\n  trusted_proxies: [\"0.0.0.0/0\", \"10.0.0.0/8\", \"::/0\", \"2001:db8::/32\", \"fc00::/7\", \"2.0.0.0/7\", \"::ffff:10.0.0.0/104\", \"::ffff:0.0.0.0/97\", \"192.0.2.1\"]\n",
    );
    let out = home.run_binary(&["import"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let warned: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split("server.trusted_proxies: ").nth(1))
        .map(|rest| rest.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        warned,
        [
            "0.0.0.0/0",
            "::/0",
            "fc00::/7",
            "2.0.0.0/7",
            // IPv4-mapped blocks are the IPv4 blocks they name: /104 is a fine /8, /97 a /1.
            "0.0.0.0/1"
        ],
        "{stdout}"
    );
    // Narrow blocks, and none at all, are not.
    for proxies in ["[\"10.0.0.0/8\", \"2001:db8::/32\", \"::1\"]", "[]"] {
        let home = Home::new(&format!("server:\n  trusted_proxies: {proxies}\n"));
        let out = home.run_binary(&["import"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("trusted_proxies"), "{stdout}");
    }
}

#[tokio::test]
async fn the_console_lifts_bans_while_loopback_is_banned() {
    let home = Home::new(&format!(
        "server:\n  trusted_proxies: [\"127.0.0.1\"]\nmanagement:\n  secret_key: \"{}\"\n",
        cheap_phc("right")
    ));
    let app = home.start().await;
    let intruder = from(&app, "127.0.0.3");
    for _ in 0..5 {
        assert_eq!(get_as(&intruder, AUTHS, "wrong", None).await.0, 401);
    }
    let console = from(&app, "127.0.0.1");
    let banned = (403, "too_many_attempts".to_string());
    assert_eq!(get_as(&console, AUTHS, "right", None).await, banned);
    // The ban endpoints answer the console, with the key.
    let r = console
        .call_with("GET", BANS, None, &[("x-management-key", "right")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        bans_of(&r.json()),
        vec![("loopback".into(), "management".into())]
    );
    assert_eq!(
        console.get(BANS).await.error_code(),
        "missing_management_key"
    );
    assert_eq!(
        get_as(&console, BANS, "wrong", None).await,
        (401, "invalid_management_key".into())
    );
    // Not to a loopback client forwarded by the proxy, nor anyone else banned.
    assert_eq!(
        get_as(&console, BANS, "right", Some("127.0.0.1")).await,
        banned
    );
    assert_eq!(get_as(&intruder, AUTHS, "right", None).await, banned);
    let lift = |q: &'static str| {
        let console = &console;
        async move {
            console
                .call_with(
                    "DELETE",
                    &format!("{BANS}{q}"),
                    None,
                    &[("x-management-key", "right")],
                )
                .await
        }
    };
    for q in [
        "?address=",
        "?address=nonsense",
        "?address=10.0.0.0/8",
        "?address=2001:db8::/47",
        "?address=192.0.2.0/25",
        "?ip=1.2.3.4",
    ] {
        let r = lift(q).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_query"),
            "{q}"
        );
    }
    for q in [
        "?address=192.0.2.1",
        "?address=2001:db8::1",
        "?address=192.0.2.0/24",
        "?address=2001:db8::/48",
    ] {
        let r = lift(q).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (404, "ban_not_found"),
            "{q}"
        );
    }
    // Any loopback address names the loopback ban.
    let r = lift("?address=127.0.0.9").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        bans_of(&json!({"bans": r.json()["lifted"]})),
        vec![("loopback".into(), "management".into())]
    );
    assert_eq!(get_as(&console, AUTHS, "right", None).await.0, 200);
    assert_eq!(get_as(&console, BANS, "right", None).await.0, 200);
    // Lifting everything, while nothing is banned, lifts nothing and says so.
    let r = lift("").await;
    assert_eq!(r.json()["lifted"], json!([]));
    app.stop().await;
    let log = home.auth_log();
    assert!(
        log.contains("management access from loopback banned until"),
        "{log}"
    );
    assert!(
        log.contains("lifted the management ban on loopback") && log.contains("by 127.0.0.1"),
        "{log}"
    );
    assert!(
        log.contains("no ban to lift for any address (asked by 127.0.0.1)"),
        "{log}"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let home =
        Home::new("api_keys: [\"sk-client-one\"]\nmanagement:\n  secret_key: the-management-key\n");
    let app = home.start().await;
    for scheme in ["BEARER", "bearer", "Bearer", "bEaReR", "BeArEr"] {
        for gap in [" ", "      ", "\t", " \t "] {
            let m = format!("{scheme}{gap}the-management-key");
            let r = app
                .call_with("GET", AUTHS, None, &[("authorization", &m)])
                .await;
            assert_eq!(r.status, 200, "{m:?}: {}", r.text);
            let c = format!("{scheme}{gap}sk-client-one");
            let r = app
                .call_with("GET", "/v1/models", None, &[("authorization", &c)])
                .await;
            assert_eq!(r.status, 200, "{c:?}: {}", r.text);
        }
    }
    for bad in [
        "Bearerthe-management-key",
        "Basic the-management-key",
        "Bearer",
        "Token x",
    ] {
        let r = app
            .call_with("GET", AUTHS, None, &[("authorization", bad)])
            .await;
        assert_eq!(r.error_code(), "missing_management_key", "{bad}");
        let r = app
            .call_with("GET", "/v1/models", None, &[("authorization", bad)])
            .await;
        assert_eq!(r.error_code(), "missing_api_key", "{bad}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_management_key_hash_must_meet_the_policy() {
    let good = hash_secret("k").unwrap();
    let (head, rest) = good.split_at(good.find("$m=").unwrap());
    let salt_and_tag = &rest[rest[1..].find('$').unwrap() + 1..];
    assert!(head == "$argon2id$v=19");
    let refused = [
        format!("$argon2i$v=19$m=65536,t=3,p=4{salt_and_tag}"),
        format!("$argon2d$v=19$m=65536,t=3,p=4{salt_and_tag}"),
        format!("$argon2id$v=16$m=65536,t=3,p=4{salt_and_tag}"),
        format!("$argon2id$m=65536,t=3,p=4{salt_and_tag}"),
        format!("$argon2id$v=19$m=4294967295,t=3,p=4{salt_and_tag}"),
        format!("$argon2id$v=19$m=262145,t=1,p=1{salt_and_tag}"),
        format!("$argon2id$v=19$m=65536,t=1000,p=4{salt_and_tag}"),
        format!("$argon2id$v=19$m=65536,t=3,p=255{salt_and_tag}"),
        format!("$argon2id$v=19$m=8,t=1,p=1{salt_and_tag}"),
        format!("$argon2id$v=19$m=19455,t=2,p=1{salt_and_tag}"),
        format!("$argon2id$v=19$m=7168,t=4,p=1{salt_and_tag}"),
        format!("$argon2id$v=19$m=47103,t=1,p=1{salt_and_tag}"),
        "$argon2id$garbage".to_string(),
        "$argon2id$v=19$m=65536,t=3,p=4".to_string(),
    ];
    for phc in &refused {
        let home = Home::new(&format!("management:\n  secret_key: \"{phc}\"\n"));
        let err = home
            .build(&[], std::sync::Arc::new(chrono::Utc::now))
            .await
            .err()
            .unwrap_or_else(|| panic!("{phc} was accepted"));
        assert_eq!(err.exit_code(), 2, "{phc}: {err}");
        assert!(
            err.to_string().contains("management.secret_key"),
            "{phc}: {err}"
        );
    }
    // The binary stops with exit code 2 and one line.
    let home = Home::new(&format!("management:\n  secret_key: \"{}\"\n", refused[0]));
    let out = home.run_binary(&["import"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("management.secret_key") && stderr.contains("argon2i"),
        "{stderr}"
    );

    // Every OWASP pair, and hash-secret's own parameters, are accepted and work.
    for (m, t, p) in [
        (47_104, 1, 1),
        (19_456, 2, 1),
        (12_288, 3, 2),
        (9_216, 4, 1),
        (7_168, 5, 1),
        (65_536, 3, 4),
    ] {
        let phc = hash_secret_with("a-key", PhcParams { m_kib: m, t, p }).unwrap();
        let home = Home::new(&format!("management:\n  secret_key: \"{phc}\"\n"));
        let app = home.start().await;
        let r = app
            .call_with("GET", AUTHS, None, &[("authorization", "Bearer a-key")])
            .await;
        assert_eq!(r.status, 200, "{phc}: {}", r.text);
        let r = app
            .call_with("GET", AUTHS, None, &[("authorization", "Bearer a-kez")])
            .await;
        assert_eq!(r.status, 401, "{phc}");
        app.stop().await;
    }
}
