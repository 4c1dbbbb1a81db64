//! Security (README, "Security"): management keys and lock-out, encryption at rest, key
//! rotation, wrong keys, and secrets kept out of every file on disk.

use crate::common::{Api, Home, assert_all_open};
use axum::http::HeaderMap;
use chrono::{DateTime, Duration, Utc};
use cliproxyapi::config::ManagementConfig;
use cliproxyapi::crypto::{EncryptionKey, Secret, hash_secret};
use cliproxyapi::http::caller::Caller;
use cliproxyapi::http::guard::ManagementAuth;
use cliproxyapi::state::Clock;
use serde_json::json;
use std::sync::{Arc, Mutex};

/// A clock the test moves by hand.
fn manual_clock() -> (Clock, Arc<Mutex<DateTime<Utc>>>) {
    let now = Arc::new(Mutex::new(Utc::now()));
    let read = now.clone();
    (Arc::new(move || *read.lock().unwrap()), now)
}

fn enc_config(key: &str) -> String {
    format!("auth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n")
}

#[tokio::test]
async fn management_key_and_lockout() {
    let home = Home::new("management:\n  secret_key: s3cret-key\n");
    let (clock, now) = manual_clock();
    let app = home.start_with(&[], clock).await;
    let list = |headers: &'static [(&'static str, &'static str)]| {
        let app = &app;
        async move {
            app.call_with("GET", "/v0/management/auths", None, headers)
                .await
        }
    };
    let r = list(&[]).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "missing_management_key")
    );
    let r = list(&[("authorization", "Bearer nope")]).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "invalid_management_key")
    );
    assert_eq!(
        list(&[("authorization", "Bearer s3cret-key")]).await.status,
        200
    );
    assert_eq!(
        list(&[("x-management-key", "s3cret-key")]).await.status,
        200
    );
    // Five wrong keys (one is already counted; a success resets the count).
    for _ in 0..5 {
        let r = list(&[("x-management-key", "wrong")]).await;
        assert_eq!(r.status, 401);
    }
    // The sixth try, even with the right key, is refused until the ban ends.
    let r = list(&[("x-management-key", "s3cret-key")]).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "too_many_attempts")
    );
    assert_eq!(r.retry_after.as_deref(), Some("1800"));
    *now.lock().unwrap() += Duration::minutes(29);
    assert_eq!(
        list(&[("x-management-key", "s3cret-key")]).await.status,
        403
    );
    *now.lock().unwrap() += Duration::minutes(1);
    assert_eq!(
        list(&[("x-management-key", "s3cret-key")]).await.status,
        200
    );
    app.stop().await;
    // The plain-text key was never written anywhere.
    assert!(!home.auth_log().contains("s3cret-key"));
}

#[tokio::test]
async fn management_key_as_phc_and_remote_policy() {
    let phc = hash_secret("another-key").unwrap();
    let home = Home::new(&format!("management:\n  secret_key: \"{phc}\"\n"));
    let app = home.start().await;
    let r = app
        .call_with(
            "GET",
            "/v0/management/auths",
            None,
            &[("authorization", "Bearer another-key")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;

    // The policy on the client address, for non-loopback clients.
    let now = Utc::now();
    let caller =
        |ip: Option<&str>| Caller::resolve(ip.map(|i| i.parse().unwrap()), &HeaderMap::new(), &[]);
    let remote = caller(Some("192.0.2.7"));
    let local = caller(Some("::ffff:127.0.0.1"));
    let no_key = ManagementAuth::from_config(&ManagementConfig::default())
        .await
        .unwrap();
    assert!(no_key.check(&local, None, false, now).await.is_ok());
    assert_eq!(
        no_key
            .check(&remote, None, false, now)
            .await
            .unwrap_err()
            .status,
        403
    );
    assert_eq!(
        no_key
            .check(&caller(None), None, false, now)
            .await
            .unwrap_err()
            .status,
        403
    );
    let config = ManagementConfig {
        secret_key: Secret::new(phc.clone()),
        allow_remote: false,
    };
    let keyed = ManagementAuth::from_config(&config).await.unwrap();
    let e = keyed
        .check(&remote, Some("another-key"), false, now)
        .await
        .unwrap_err();
    assert_eq!(
        (e.status.as_u16(), e.code),
        (403, "remote_management_disabled")
    );
    let config = ManagementConfig {
        secret_key: Secret::new(phc),
        allow_remote: true,
    };
    let remote_ok = ManagementAuth::from_config(&config).await.unwrap();
    assert!(
        remote_ok
            .check(&remote, Some("another-key"), false, now)
            .await
            .is_ok()
    );
    assert_eq!(
        remote_ok
            .check(&remote, Some("x"), false, now)
            .await
            .unwrap_err()
            .status,
        401
    );
    assert_eq!(
        remote_ok
            .check(&remote, None, false, now)
            .await
            .unwrap_err()
            .status,
        401
    );
    // An unknown client is refused, even with the key (nothing to ban).
    assert_eq!(
        remote_ok
            .check(&caller(None), Some("another-key"), false, now)
            .await
            .unwrap_err()
            .status,
        403
    );
    // A bad PHC string in config is refused at start.
    let bad = ManagementConfig {
        secret_key: Secret::new("$argon2id$garbage"),
        allow_remote: false,
    };
    assert!(
        ManagementAuth::from_config(&bad)
            .await
            .unwrap_err()
            .contains("management.secret_key")
    );
}

const TOKENS: [&str; 6] = [
    "sk-ant-api03-ENCfileAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "sk-ant-api03-ENCpostBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    "sk-ant-api03-ENCputCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
    "AIzaENCbulkDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD",
    "gho_ENCrefreshEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE",
    "sk-ant-api03-ENCgoneFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
];

/// Every file under the home's data and log folders, raw.
fn disk_bytes(home: &Home) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["data", "logs"] {
        if let Ok(entries) = std::fs::read_dir(home.path().join(dir)) {
            for e in entries.flatten() {
                out.push((
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out
}

fn assert_no_token_on_disk(home: &Home, tokens: &[&str]) {
    let files = disk_bytes(home);
    assert!(files.iter().any(|(p, _)| p.ends_with("cliproxy.db")));
    for (path, bytes) in &files {
        for token in tokens {
            let needle = &token.as_bytes()[6..token.len() - 4];
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{token} in clear in {path}"
            );
        }
    }
}

async fn scenario(app: &impl Api) {
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "claude", "token": TOKENS[1], "label": "post"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = app
        .put(
            &format!("/v0/management/auths/claude?id={id}"),
            &json!({"token": TOKENS[2]}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200);
    let body = json!([
        {"provider": "gemini", "token": TOKENS[3]},
        {"provider": "copilot", "type": "oauth", "refresh_token": TOKENS[4]},
        {"provider": "claude", "token": TOKENS[5]}
    ]);
    let r = app
        .post("/v0/management/auths/import", &body.to_string())
        .await;
    assert_eq!(r.json()["imported"], 3);
    let r = app
        .delete(&format!("/v0/management/auths/claude?id={}", TOKENS[5]))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn encryption_keeps_tokens_out_of_the_database_wal_and_logs() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&enc_config(&key));
    home.auth_file("claude.json", json!({"token": TOKENS[0]}).to_string());
    let app = home.start().await;
    scenario(&app).await;
    // While running: the WAL holds the latest writes.
    assert_no_token_on_disk(&home, &TOKENS);
    let auths = app.auths().await;
    assert_eq!(auths.len(), 4);
    assert_all_open(&auths, "copilot");
    app.stop().await;
    assert_no_token_on_disk(&home, &TOKENS);
    // The tokens still open: the credentials are usable after a restart.
    let app = home.start().await;
    let id = app.auths().await[0]["id"].as_str().unwrap().to_string();
    let token = app
        .state
        .store
        .open_token(&id.clone().into())
        .await
        .unwrap()
        .unwrap();
    assert!(TOKENS.contains(&token.expose()));
    app.stop().await;
}

#[tokio::test]
async fn turning_encryption_on_seals_existing_rows() {
    let home = Home::new("");
    home.auth_file("claude.json", json!({"token": TOKENS[0]}).to_string());
    let app = home.start().await;
    scenario(&app).await;
    app.stop().await;
    let key = EncryptionKey::generate_base64();
    let env = [
        ("CLIPROXY__AUTH__ENCRYPTION__ENABLED", "true"),
        ("CLIPROXY__AUTH__ENCRYPTION__KEY", key.as_str()),
    ];
    let app = home.start_with(&env, Arc::new(Utc::now)).await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 4);
    assert_all_open(&auths, "copilot");
    assert!(
        home.auth_log()
            .contains("sealed the secrets of 4 credential(s)")
    );
    app.stop().await;
    assert_no_token_on_disk(&home, &TOKENS);
    // Now the database needs the key.
    let err = home
        .build(&[], Arc::new(Utc::now))
        .await
        .err()
        .expect("no key: no start");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("auth.encryption.enabled"), "{err}");
}

#[tokio::test]
async fn a_sealed_value_moved_to_another_row_does_not_open() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&enc_config(&key));
    let app = home.start().await;
    let mut ids = Vec::new();
    for (token, label) in [
        ("sk-ant-one-1111111111", "a"),
        ("sk-ant-two-2222222222", "b"),
        ("sk-ant-three-33333333", "c"),
    ] {
        let r = app
            .post(
                "/v0/management/auths",
                &json!({"provider": "claude", "token": token, "label": label}).to_string(),
            )
            .await;
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    app.stop().await;
    // Copy a's sealed token into b's row, behind the server's back.
    {
        use sqlx::Connection;
        let url = format!(
            "sqlite://{}",
            home.path().join("data/cliproxy.db").display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "UPDATE credentials SET token_sealed = (SELECT token_sealed FROM credentials WHERE id = ?1) WHERE id = ?2",
        )
        .bind(&ids[0])
        .bind(&ids[1])
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let app = home.start().await;
    let auths = app.auths().await;
    let by_id = |id: &str| auths.iter().find(|a| a["id"] == id).unwrap().clone();
    assert_eq!(by_id(&ids[0])["status"], "active");
    assert_eq!(by_id(&ids[2])["status"], "active");
    let b = by_id(&ids[1]);
    assert_eq!(b["status"], "invalid");
    assert!(
        b["status_reason"]
            .as_str()
            .unwrap()
            .contains("moved from another credential"),
        "{b}"
    );
    assert!(
        app.state
            .store
            .open_token(&ids[1].clone().into())
            .await
            .unwrap()
            .is_err()
    );
    assert_eq!(
        app.state
            .store
            .open_token(&ids[0].clone().into())
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "sk-ant-one-1111111111"
    );
    assert!(
        home.auth_log()
            .contains(&format!("credential {} is unusable", ids[1]))
    );
    // A new token through the API makes it usable again.
    let r = app
        .put(
            &format!("/v0/management/auths/claude?id={}", ids[1]),
            r#"{"token": "sk-ant-two-new-22222"}"#,
        )
        .await;
    assert_eq!(r.json()["status"], "active");
    app.stop().await;
}

/// The database file and its WAL (the shared-memory index is not the database), as
/// (name, length, hash) so a failure prints something readable.
fn file_digest(home: &Home) -> Vec<(String, usize, u64)> {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<_> = disk_bytes(home)
        .into_iter()
        .filter(|(p, _)| p.ends_with("cliproxy.db") || p.ends_with("cliproxy.db-wal"))
        .map(|(p, b)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.hash(&mut h);
            (p, b.len(), h.finish())
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn a_wrong_or_missing_key_stops_the_start_and_changes_nothing() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&enc_config(&key));
    let server = home.spawn_binary();
    for i in 0..5 {
        let body = json!({"provider": "openai", "token": format!("sk-wrongkey-{i}-xxxxxxxx")});
        assert_eq!(
            server
                .post("/v0/management/auths", &body.to_string())
                .await
                .status,
            201
        );
    }
    // Killed: the WAL is left behind, unmerged.
    server.kill9();
    let before = file_digest(&home);
    let other = EncryptionKey::generate_base64();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("CLIPROXY__AUTH__ENCRYPTION__KEY", other.as_str())],
            "auth.encryption.key",
        ),
        (
            vec![("CLIPROXY__AUTH__ENCRYPTION__KEY", "not-base64!")],
            "auth.encryption.key",
        ),
        (
            vec![("CLIPROXY__AUTH__ENCRYPTION__KEY", "")],
            "auth.encryption.key",
        ),
        (
            vec![(
                "CLIPROXY__AUTH__ENCRYPTION__KEY_ENV",
                "CLIPROXY_TEST_UNSET_KEY",
            )],
            "auth.encryption.key_env",
        ),
        (
            vec![("CLIPROXY__AUTH__ENCRYPTION__ENABLED", "false")],
            "auth.encryption.enabled",
        ),
    ];
    for (env, setting) in cases {
        for args in [&[][..], &["import"][..]] {
            let out = home.run_binary_env(args, &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{env:?} {args:?}: {stderr}");
            assert!(stderr.contains(setting), "{env:?}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert_eq!(file_digest(&home), before, "{env:?} changed the database");
        }
    }
    // The right key still works, with everything in place.
    let server = home.spawn_binary();
    assert_eq!(server.auths().await.len(), 5);
}

async fn statuses(home: &Home, key: &str) -> Option<Vec<String>> {
    let env = [("CLIPROXY__AUTH__ENCRYPTION__KEY", key)];
    let app = home.build(&env, Arc::new(Utc::now)).await.ok()?;
    let state = app.state();
    let store = &state.store;
    let mut filter = cliproxyapi::store::ListFilter::default();
    let mut statuses = Vec::new();
    loop {
        let page = store.list(&filter, Utc::now()).await.unwrap();
        statuses.extend(page.rows.iter().map(|r| r.status.as_str().to_string()));
        match page.next {
            Some(next) => filter.after = Some(next),
            None => break,
        }
    }
    store.close().await;
    Some(statuses)
}

#[tokio::test]
async fn rotate_key_is_all_or_nothing() {
    let old = EncryptionKey::generate_base64();
    let new = EncryptionKey::generate_base64();
    let home = Home::new(&enc_config(&old));
    let n = 3000;
    let items: Vec<_> = (0..n)
        .map(|i| json!({"provider": "openai", "token": format!("sk-rotate-{i:05}-abcdefghijkl"), "refresh_token": null}))
        .collect();
    home.auth_file("openai.json", serde_json::to_vec(&items).unwrap());
    let app = home.start().await;
    assert_eq!(app.import_report.imported, n);
    app.stop().await;

    // kill -9 at several moments: the database is wholly under one key or the other.
    for delay_ms in [10u64, 40, 80, 150, 300] {
        let mut child = home
            .command(
                &["rotate-key", "--new-key-env", "CLIPROXY_TEST_NEW_KEY"],
                &[("CLIPROXY_TEST_NEW_KEY", new.as_str())],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let under_old = statuses(&home, &old).await;
        let under_new = statuses(&home, &new).await;
        match (&under_old, &under_new) {
            (Some(s), None) | (None, Some(s)) => {
                assert_eq!(s.len(), n);
                assert!(
                    s.iter().all(|st| st == "active"),
                    "a credential did not open after a kill at {delay_ms} ms"
                );
            }
            _ => panic!(
                "after a kill at {delay_ms} ms: old opens {}, new opens {}",
                under_old.is_some(),
                under_new.is_some()
            ),
        }
        if under_new.is_some() {
            // Completed before the kill: rotate back for the next round.
            let out = home.run_binary_env(
                &["rotate-key", "--new-key-env", "K"],
                &[
                    ("CLIPROXY__AUTH__ENCRYPTION__KEY", new.as_str()),
                    ("K", old.as_str()),
                ],
            );
            assert_eq!(out.status.code(), Some(0));
        }
    }

    // A full rotation: usable under the new key only.
    let out = home.run_binary_env(
        &["rotate-key", "--new-key-env", "K"],
        &[("K", new.as_str())],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("re-encrypted {n} credential(s)"))
    );
    assert!(statuses(&home, &old).await.is_none());
    let s = statuses(&home, &new).await.unwrap();
    assert!(s.len() == n && s.iter().all(|st| st == "active"));
}

#[test]
fn key_commands() {
    let home = Home::new("");
    let out = home.run_binary(&["gen-key"]);
    assert_eq!(out.status.code(), Some(0));
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(EncryptionKey::from_base64(key.trim()).is_ok());
    let mut child = home
        .command(&["hash-secret"], &[])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"my management key\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let phc = String::from_utf8(out.stdout).unwrap();
    // RFC 9106's second recommendation: argon2id, 64 MiB, 3 passes, 4 lanes, a 16-byte salt
    // (22 base64 characters) and a 32-byte tag (43).
    assert!(phc.starts_with("$argon2id$v=19$m=65536,t=3,p=4$"), "{phc}");
    let parts: Vec<&str> = phc.trim().split('$').collect();
    assert_eq!(
        (parts.len(), parts[4].len(), parts[5].len()),
        (6, 22, 43),
        "{phc}"
    );
    cliproxyapi::crypto::check_phc(phc.trim()).unwrap();
    assert!(cliproxyapi::crypto::verify_secret(
        phc.trim(),
        "my management key"
    ));
    // Secrets up to 4 KiB are hashed; a longer one (or an endless stdin) is refused, not read
    // whole.
    for (len, code) in [(8usize << 20, 2), (4097, 2), (4096, 0)] {
        let mut child = home
            .command(&["hash-secret"], &[])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // The command stops reading at its limit: a broken pipe here is expected.
        let _ = stdin.write_all(&vec![b'k'; len]);
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{len}: {out:?}");
    }
    // Files are owner-only.
    use std::os::unix::fs::PermissionsExt;
    let out = home.run_binary(&["import"]);
    assert_eq!(out.status.code(), Some(0));
    for (p, mode) in [
        ("data", 0o700),
        ("data/cliproxy.db", 0o600),
        ("logs", 0o700),
        ("logs/auth.log", 0o600),
    ] {
        let m = std::fs::metadata(home.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{p}");
    }
}
