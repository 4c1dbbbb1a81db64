//! Secrets in responses, logs and at rest: no token appears in clear in any API response or in
//! `logs/auth.log`; no old secret stays in the database files after sealing, key rotation or a
//! secure delete (read raw, after a clean stop and after `kill -9`); a key that does not fit
//! changes nothing; sealed values open only in their own database and format; the fingerprint
//! key rotates; previews, leases, environment secrets, file modes and core dumps.

use crate::common::{Api, Home, Resp, assert_all_open};
use cliproxyapi::crypto::{EncryptionKey, to_hex};
use serde_json::{Value, json};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use std::path::PathBuf;
use std::sync::Arc;

const TOKENS: &[&str] = &[
    "sk-ant-api03-SECRETfileAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "sk-proj-SECRETfileBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    "sk-ant-api03-SECRETpostCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
    "sk-ant-api03-SECRETputDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD",
    "AIzaSECRETbulkEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE",
    "gho_SECRETrefreshFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
    "tid_SECRETaccessGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGG",
    "kiro-SECRETclientHHHHHHHHHHHHHHHHHHHHHHHHHHHHHH",
    "short1",
];

/// The distinctive middle of a token: a response must not hold even that.
fn core(token: &str) -> &str {
    if token.len() > 20 {
        &token[8..token.len() - 6]
    } else {
        token
    }
}

#[tokio::test]
async fn no_token_in_any_response_or_the_log() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        json!({"token": TOKENS[0], "label": "file"}).to_string(),
    );
    home.auth_file("openai.json", json!([{"token": TOKENS[1]}]).to_string());
    let app = home.start().await;
    let mut seen: Vec<Resp> = Vec::new();
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "claude", "type": "api_key", "token": TOKENS[2], "priority": 1})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    seen.push(r);
    // Duplicate: the error names the id, not the token.
    seen.push(
        app.post(
            "/v0/management/auths",
            &json!({"provider": "claude", "token": TOKENS[2]}).to_string(),
        )
        .await,
    );
    seen.push(
        app.put(
            &format!("/v0/management/auths/claude?id={id}"),
            &json!({"token": TOKENS[3]}).to_string(),
        )
        .await,
    );
    // A bad token value in a body: the error names the field, not the value.
    seen.push(
        app.put(
            &format!("/v0/management/auths/claude?id={id}"),
            &json!({"token": format!("{} x", TOKENS[3])}).to_string(),
        )
        .await,
    );
    seen.push(
        app.post(
            "/v0/management/auths",
            &json!({"provider": "claude", "token": TOKENS[3], "colour": TOKENS[3]}).to_string(),
        )
        .await,
    );
    seen.push(
        app.post(
            "/v0/management/auths/import",
            &json!({"auths": [
                {"provider": "gemini", "token": TOKENS[4]},
                {"provider": "copilot", "type": "oauth", "refresh_token": TOKENS[5], "access_token": TOKENS[6],
                 "expires_at": "2030-01-01T00:00:00Z"},
                {"provider": "kiro", "type": "oauth", "refresh_token": TOKENS[8], "client_id": "cid",
                 "client_secret": TOKENS[7], "region": "us-east-1", "auth_method": "builder_id"},
                {"provider": "nope", "token": TOKENS[4]}
            ]})
            .to_string(),
        )
        .await,
    );
    seen.push(app.get("/v0/management/auths").await);
    for p in ["claude", "openai", "gemini", "copilot", "kiro"] {
        seen.push(app.get(&format!("/v0/management/auths/{p}")).await);
        seen.push(app.get(&format!("/v0/management/auths/{p}/quota")).await);
    }
    seen.push(
        app.put(
            "/v0/management/auths/claude/quota",
            r#"{"limit": 5, "used": 9}"#,
        )
        .await,
    );
    seen.push(app.get("/v0/management/auths?status=exhausted").await);
    // Delete by token: the token is in the request, never in the answer or the log.
    seen.push(
        app.delete(&format!("/v0/management/auths/openai?id={}", TOKENS[1]))
            .await,
    );
    seen.push(
        app.delete(&format!("/v0/management/auths/openai?id={}", TOKENS[1]))
            .await,
    );
    seen.push(
        app.post("/v0/management/auths/import", r#"{"rescan": true}"#)
            .await,
    );
    app.stop().await;

    let log = home.auth_log();
    assert!(log.lines().count() >= 8, "the scenario was logged:\n{log}");
    for token in TOKENS {
        for r in &seen {
            assert!(
                !r.text.contains(core(token)),
                "token {token} in a response: {}",
                r.text
            );
        }
        assert!(!log.contains(core(token)), "token {token} in auth.log");
    }
    // The audit log in the database names actions, never secrets.
    let app = home.start().await;
    let audit = app.state.store.audit_dump().await.unwrap();
    assert!(audit.len() >= 8);
    for token in TOKENS {
        assert!(
            !audit.iter().any(|l| l.contains(core(token))),
            "token {token} in the audit log"
        );
    }
    app.stop().await;
}

// ---- helpers ---------------------------------------------------------------------------

fn enc_yaml(key: &str) -> String {
    format!("auth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n")
}

/// Rewrite the home's config: port 0 plus `extra`.
fn set_config(home: &Home, extra: &str) {
    std::fs::write(
        home.config_path(),
        format!("host: 127.0.0.1\nport: 0\n{extra}"),
    )
    .unwrap();
}

fn db_path(home: &Home) -> PathBuf {
    home.path().join("data/cliproxy.db")
}

/// The database, its WAL and its shared-memory file, raw (those that exist).
fn raw_db(home: &Home) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let p = format!("{}{suffix}", db_path(home).display());
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect()
}

/// The raw database files `needle` occurs in.
fn found_in(home: &Home, needle: &[u8]) -> Vec<String> {
    assert!(needle.len() >= 12, "a needle too short to be distinctive");
    raw_db(home)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect()
}

fn assert_gone(home: &Home, needles: &[Vec<u8>], when: &str) {
    for n in needles {
        let at = found_in(home, n);
        assert!(
            at.is_empty(),
            "{when}: {} still in {at:?}",
            String::from_utf8(n.clone()).unwrap_or_else(|_| to_hex(n))
        );
    }
}

fn assert_present(home: &Home, needles: &[Vec<u8>], when: &str) {
    for n in needles {
        assert!(
            !found_in(home, n).is_empty(),
            "{when}: {} is not on disk (the scan would miss it)",
            String::from_utf8(n.clone()).unwrap_or_else(|_| to_hex(n))
        );
    }
}

/// `n` tokens whose last 24 characters are random hex (the part searched for on disk; a
/// preview shows at most 4 of them).
fn tokens(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}{i:02}-{}", to_hex(&rand::random::<[u8; 12]>())))
        .collect()
}

fn needles(tokens: &[String]) -> Vec<Vec<u8>> {
    tokens
        .iter()
        .map(|t| t.as_bytes()[t.len() - 24..].to_vec())
        .collect()
}

async fn post_key(api: &impl Api, provider: &str, token: &str) -> String {
    let r = api
        .post(
            "/v0/management/auths",
            &json!({"provider": provider, "token": token}).to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

/// A read-write connection to the home's database, for changes behind the server's back.
async fn connect(home: &Home) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(db_path(home))
        .connect()
        .await
        .unwrap()
}

/// Another process's connection to the database, idle after one read (which maps the WAL
/// index, so a closing server knows it is not the last connection and does not checkpoint).
async fn hold_open(home: &Home) -> SqliteConnection {
    let mut conn = connect(home).await;
    let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_schema")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn
}

async fn exec(home: &Home, sql: &str) {
    let mut conn = connect(home).await;
    // Test-made statements, not outside input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// Every sealed value and key of the database: (what, bytes).
async fn sealed_values(home: &Home) -> Vec<(String, Vec<u8>)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db_path(home))
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let mut out: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT id || ' token', token_sealed FROM credentials WHERE token_sealed IS NOT NULL
         UNION ALL SELECT id || ' refresh', refresh_token_sealed FROM credentials
             WHERE refresh_token_sealed IS NOT NULL
         UNION ALL SELECT id || ' client secret', client_secret_sealed FROM credentials
             WHERE client_secret_sealed IS NOT NULL
         UNION ALL SELECT 'fingerprint key ' || generation, key_sealed FROM fingerprint_keys
         UNION ALL SELECT 'meta ' || key, value FROM meta WHERE key = 'key_check'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    out.sort();
    out
}

/// The database file and its WAL, byte for byte (a missing WAL is an empty one).
fn db_bytes(home: &Home) -> (Vec<u8>, Vec<u8>) {
    let read = |suffix: &str| {
        std::fs::read(format!("{}{suffix}", db_path(home).display())).unwrap_or_default()
    };
    (read(""), read("-wal"))
}

/// Put back the database and WAL that [`db_bytes`] read (a stale shared-memory index goes).
fn restore(home: &Home, (db, wal): &(Vec<u8>, Vec<u8>)) {
    let path = db_path(home).display().to_string();
    std::fs::write(&path, db).unwrap();
    if wal.is_empty() {
        let _ = std::fs::remove_file(format!("{path}-wal"));
    } else {
        std::fs::write(format!("{path}-wal"), wal).unwrap();
    }
    let _ = std::fs::remove_file(format!("{path}-shm"));
}

fn status_of<'a>(auths: &'a [Value], id: &str) -> &'a Value {
    auths
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no credential {id}"))
}

// ---- no old secret stays on disk ----------------------------------------------------------

/// Credentials of every secret field, added through a running server: api keys, copilot
/// (refresh and access token) and kiro (refresh token and client secret).
async fn add_mixed(api: &impl Api, toks: &[String]) {
    assert!(toks.len() >= 12);
    for (i, t) in toks[..8].iter().enumerate() {
        post_key(api, ["openai", "claude", "gemini"][i % 3], t).await;
    }
    let body = json!([
        {"provider": "copilot", "type": "oauth", "refresh_token": toks[8], "access_token": toks[9],
         "expires_at": "2030-01-01T00:00:00Z"},
        {"provider": "kiro", "type": "oauth", "refresh_token": toks[10], "client_id": "cid",
         "client_secret": toks[11], "region": "us-east-1", "auth_method": "builder_id"}
    ]);
    let r = api
        .post("/v0/management/auths/import", &body.to_string())
        .await;
    assert_eq!(r.json()["imported"], 2, "{}", r.text);
}

#[tokio::test]
async fn turning_encryption_on_leaves_no_clear_token_on_disk() {
    for kill in [false, true] {
        let home = Home::new("");
        let toks = tokens("sk-proj-on", 24);
        // Stored in clear, and left in the WAL by a kill.
        let server = home.spawn_binary();
        add_mixed(&server, &toks[..12]).await;
        add_mixed(&server, &toks[12..]).await;
        server.kill9();
        let all = needles(&toks);
        assert_present(&home, &all, "before sealing");

        let key = EncryptionKey::generate_base64();
        set_config(&home, &enc_yaml(&key));
        if kill {
            let server = home.spawn_binary();
            let auths = server.auths().await;
            assert_eq!(auths.len(), 20);
            assert_all_open(&auths, "kiro");
            server.kill9();
            assert_gone(&home, &all, "turned on, then kill -9");
        } else {
            // Another process has the database open (a backup, a shell), so the server's
            // close is not the last one, which would checkpoint.
            let hold = hold_open(&home).await;
            let app = home.start().await;
            assert_eq!(app.auths().await.len(), 20);
            assert!(
                home.auth_log()
                    .contains("sealed the secrets of 20 credential(s)")
            );
            app.stop().await;
            assert_gone(&home, &all, "turned on, then a clean stop");
            hold.close().await.unwrap();
        }
        // Sealed, not lost: they open under the key.
        let app = home.start().await;
        let auths = app.auths().await;
        assert_all_open(&auths, "kiro");
        let id = auths[0]["id"].as_str().unwrap();
        let token = app
            .state
            .store
            .open_token(&id.into())
            .await
            .unwrap()
            .unwrap();
        assert!(toks.iter().any(|t| t == token.expose()));
        app.stop().await;
    }
}

#[tokio::test]
async fn rotate_key_leaves_no_value_of_the_old_key_on_disk() {
    let (old, new) = (
        EncryptionKey::generate_base64(),
        EncryptionKey::generate_base64(),
    );
    let home = Home::new(&enc_yaml(&old));
    let server = home.spawn_binary();
    add_mixed(&server, &tokens("sk-rot", 12)).await;
    add_mixed(&server, &tokens("sk-rot2", 12)).await;
    // Killed: the values under the old key are in the WAL as well as in the file.
    server.kill9();
    let before = sealed_values(&home).await;
    // 16 api keys, 2 copilot and 2 kiro credentials with two secrets each, a fingerprint
    // key and the key check.
    assert_eq!(before.len(), 26);
    // The nonce and the start of the ciphertext: unique to each sealed value.
    let old_values: Vec<Vec<u8>> = before.iter().map(|(_, v)| v[5..29].to_vec()).collect();
    assert_present(&home, &old_values, "before the rotation");

    // Another process has the database open, so rotate-key's close is not the last one.
    let hold = hold_open(&home).await;
    let out = home.run_binary_env(&["rotate-key", "--new-key-env", "K"], &[("K", &new)]);
    assert!(out.status.success(), "{out:?}");
    assert_gone(&home, &old_values, "after rotate-key");
    hold.close().await.unwrap();
    let after = sealed_values(&home).await;
    assert!(
        after.len() > before.len(),
        "a new fingerprint key was added"
    );

    // Under the new key: usable, and still nothing of the old one after a kill.
    set_config(&home, &enc_yaml(&new));
    let server = home.spawn_binary();
    let auths = server.auths().await;
    assert_eq!(auths.len(), 20);
    assert_all_open(&auths, "kiro");
    server.kill9();
    assert_gone(&home, &old_values, "after rotate-key, a start and kill -9");
}

/// Replace and delete secrets in every way the API and an import can; returns the tokens
/// that must be gone from disk and those that must still be there (in clear: encryption is
/// off, which makes the scan's control).
async fn replace_and_delete(api: &impl Api, home: &Home) -> (Vec<String>, Vec<String>) {
    let added = add_to_remove(api, home).await;
    remove(api, home, added).await
}

/// What [`add_to_remove`] added: api keys with their ids, and copilot's tokens.
struct Added {
    toks: Vec<String>,
    ids: Vec<String>,
    first_access: Vec<String>,
    refresh: Vec<String>,
}

/// The copilot file of [`add_to_remove`]: the same refresh tokens, with `access` tokens.
fn copilot_file(refresh: &[String], access: &[String]) -> String {
    let entries: Vec<Value> = refresh
        .iter()
        .zip(access)
        .map(|(r, a)| {
            json!({"type": "oauth", "refresh_token": r, "access_token": a,
                             "expires_at": "2030-01-01T00:00:00Z"})
        })
        .collect();
    Value::from(entries).to_string()
}

/// Add the credentials [`remove`] replaces and deletes: api keys through the API, copilot
/// credentials through a rescan.
async fn add_to_remove(api: &impl Api, home: &Home) -> Added {
    let toks = tokens("sk-del", 8);
    let mut ids = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        ids.push(post_key(api, ["openai", "claude"][i % 2], t).await);
    }
    let first_access = tokens("tid_a", 3);
    let refresh = tokens("gho_r", 3);
    home.auth_file("copilot.json", copilot_file(&refresh, &first_access));
    let r = api
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.json()["imported"], 3, "{}", r.text);
    assert_present(
        home,
        &needles(&[&toks[..], &first_access[..]].concat()),
        "before",
    );
    Added {
        toks,
        ids,
        first_access,
        refresh,
    }
}

/// Delete and replace what [`add_to_remove`] added: by id, by token, through `PUT` and by an
/// import update. Returns the tokens that must be gone and those that must stay.
async fn remove(api: &impl Api, home: &Home, added: Added) -> (Vec<String>, Vec<String>) {
    let Added {
        toks,
        ids,
        first_access,
        refresh,
    } = added;
    let second_access = tokens("tid_b", 3);
    let replaced = tokens("sk-new", 2);

    // Deleted by id, by token, by id; replaced through PUT; updated by an import.
    for key in [&ids[0], &toks[1], &ids[2]] {
        let provider = if key == &toks[1] { "claude" } else { "openai" };
        let r = api
            .delete(&format!("/v0/management/auths/{provider}?id={key}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for (id, new) in ids[3..5].iter().zip(&replaced) {
        let provider = if id == &ids[3] { "claude" } else { "openai" };
        let r = api
            .put(
                &format!("/v0/management/auths/{provider}?id={id}"),
                &json!({"token": new}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    home.auth_file("copilot.json", copilot_file(&refresh, &second_access));
    let r = api
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.json()["updated"], 3, "{}", r.text);

    let gone = [&toks[..5], &first_access[..]].concat();
    let kept = [&toks[5..], &replaced[..], &second_access[..], &refresh[..]].concat();
    (gone, kept)
}

#[tokio::test]
async fn deleted_and_replaced_tokens_leave_no_copy_on_disk() {
    // kill -9 right after the last answer: no clean close to checkpoint.
    let home = Home::new("");
    let server = home.spawn_binary();
    let (gone, kept) = replace_and_delete(&server, &home).await;
    server.kill9();
    assert_present(&home, &needles(&kept), "kill -9");
    assert_gone(&home, &needles(&gone), "kill -9");

    // A clean stop, while another process has the database open (so the server's close is
    // not the last one, which would checkpoint).
    let home = Home::new("");
    let app = home.start().await;
    let hold = hold_open(&home).await;
    let (gone, kept) = replace_and_delete(&app, &home).await;
    // Already before the stop, once each change was answered.
    assert_gone(&home, &needles(&gone), "while running");
    app.stop().await;
    assert_present(&home, &needles(&kept), "clean stop");
    assert_gone(&home, &needles(&gone), "clean stop");
    hold.close().await.unwrap();
}

/// Another process's read transaction (a backup tool, a `sqlite3` shell): its snapshot, and
/// the WAL frames it needs, are kept until it ends.
struct Reader(SqliteConnection);

impl Reader {
    async fn begin(home: &Home) -> Reader {
        let mut conn = SqliteConnectOptions::new()
            .filename(db_path(home))
            .read_only(true)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
        let mut reader = Reader(conn);
        reader.credentials().await;
        reader
    }

    /// The credentials in the reader's snapshot.
    async fn credentials(&mut self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM credentials")
            .fetch_one(&mut self.0)
            .await
            .unwrap()
    }

    async fn end(mut self) {
        sqlx::raw_sql("COMMIT").execute(&mut self.0).await.unwrap();
        self.0.close().await.unwrap();
    }
}

const LOAD_KEY: &str = "client-key-for-the-load";

/// Leases (taken and reported) and proxied requests on gemini, in a loop, until stopped:
/// the request path's group commits, running beside the management calls.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..4)
            .map(|_| {
                let (base, stop, rounds) = (base.to_string(), stop.clone(), rounds.clone());
                let failed = failures.clone();
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let post = |path: String, body: Value| {
                        client
                            .post(format!("{base}{path}"))
                            .bearer_auth(LOAD_KEY)
                            .json(&body)
                            .send()
                    };
                    let fail = |what: String| failed.lock().unwrap().push(what);
                    while !stop.load(Ordering::Relaxed) {
                        let lease = post(
                            "/v1/credentials/lease".into(),
                            json!({"provider": "gemini", "estimated_tokens": 10}),
                        )
                        .await
                        .unwrap();
                        let status = lease.status().as_u16();
                        let lease: Value = lease.json().await.unwrap();
                        if status != 201 {
                            fail(format!("lease: {status} {lease}"));
                            continue;
                        }
                        let id = lease["lease_id"].as_str().unwrap();
                        let report = post(
                            format!("/v1/credentials/lease/{id}/report"),
                            json!({"tokens_used": 3}),
                        )
                        .await
                        .unwrap();
                        if report.status() != 200 {
                            fail(format!("report: {}", report.status()));
                        }
                        let proxied = post(
                            "/v1beta/models/gemini-x:generateContent".into(),
                            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
                        )
                        .await
                        .unwrap();
                        if proxied.status() != 200 {
                            let status = proxied.status();
                            fail(format!(
                                "proxied: {status} {}",
                                proxied.text().await.unwrap()
                            ));
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            rounds,
            failures,
            tasks,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until the load has done `more` rounds from now.
    async fn goes_on(&self, more: u64) {
        let from = self.rounds();
        crate::common::eventually(std::time::Duration::from_secs(20), || async {
            (self.rounds() >= from + more).then_some(())
        })
        .await;
    }

    /// Every failure the load met so far.
    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Stop; every failure the load met.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.failures.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_on_an_old_snapshot_stalls_no_write_and_old_secrets_go_when_it_ends() {
    let mock = crate::mock::Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"{LOAD_KEY}\"]\n{}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    for t in tokens("AIzaLoad", 3) {
        post_key(&app, "gemini", &t).await;
    }
    let load = Load::start(&app.base);
    load.goes_on(3).await;
    // The reader's snapshot from the extremes: from before the secrets were stored (it pins
    // the WAL frames that hold them), and holding the secrets themselves.
    for reader_first in [true, false] {
        let when = if reader_first {
            "a reader from before the secrets"
        } else {
            "a reader holding the secrets"
        };
        let early = if reader_first {
            Some(Reader::begin(&home).await)
        } else {
            None
        };
        let added = add_to_remove(&app, &home).await;
        let mut reader = match early {
            Some(r) => r,
            None => Reader::begin(&home).await,
        };
        let seen = reader.credentials().await;
        let (gone, kept) = remove(&app, &home, added).await;
        // Answered while the reader still holds its snapshot, in which the deleted
        // credentials still exist (so it keeps their secrets on disk: the scan's control).
        assert_eq!(reader.credentials().await, seen, "{when}");
        assert_present(&home, &needles(&gone), when);
        // The request path keeps committing beside the reader.
        load.goes_on(5).await;
        assert_eq!(load.failures(), Vec::<String>::new(), "{when}");
        reader.end().await;
        // Then the checkpoint retried in the background completes, the load going on.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let left = || {
            needles(&gone)
                .iter()
                .any(|n| !found_in(&home, n).is_empty())
        };
        while left() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_gone(&home, &needles(&gone), &format!("{when}, once it ended"));
        assert_present(&home, &needles(&kept), when);
    }
    let failures = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    app.stop().await;
}

// ---- a key that does not fit changes nothing ---------------------------------------------

#[tokio::test]
async fn a_key_that_cannot_be_verified_changes_nothing() {
    let key = EncryptionKey::generate_base64();
    let wrong = EncryptionKey::generate_base64();
    let home = Home::new(&enc_yaml(&key));
    let app = home.start().await;
    add_mixed(&app, &tokens("sk-check", 12)).await;
    app.stop().await;
    // The key check of another database under the same key.
    let other = Home::new(&enc_yaml(&key));
    other.start().await.stop().await;
    let foreign = sealed_values(&other)
        .await
        .into_iter()
        .find(|(what, _)| what == "meta key_check")
        .unwrap()
        .1;
    let good = db_bytes(&home);

    let plain_key = format!("x'00{}'", to_hex(&[b'a'; 64]));
    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong key", String::new(), &wrong),
        ("encryption off", String::new(), ""),
        (
            "no key check",
            "DELETE FROM meta WHERE key = 'key_check';".into(),
            &key,
        ),
        (
            "no key check, wrong key",
            "DELETE FROM meta WHERE key = 'key_check';".into(),
            &wrong,
        ),
        (
            "key check in clear",
            format!(
                "UPDATE meta SET value = x'00{}' WHERE key = 'key_check';",
                to_hex(b"cliproxyapi key check")
            ),
            &key,
        ),
        (
            "key check in clear, wrong key",
            format!(
                "UPDATE meta SET value = x'00{}' WHERE key = 'key_check';",
                to_hex(b"cliproxyapi key check")
            ),
            &wrong,
        ),
        (
            "key check of another database",
            format!(
                "UPDATE meta SET value = x'{}' WHERE key = 'key_check';",
                to_hex(&foreign)
            ),
            &key,
        ),
        (
            "another database id",
            format!(
                "UPDATE meta SET value = x'{}' WHERE key = 'database_id';",
                to_hex(&[b'0'; 32])
            ),
            &key,
        ),
        (
            "no key check, fingerprint key in clear, wrong key",
            format!(
                "DELETE FROM meta WHERE key = 'key_check';
                 UPDATE fingerprint_keys SET key_sealed = {plain_key};"
            ),
            &wrong,
        ),
        (
            "no key check, no fingerprint key, wrong key",
            "DELETE FROM meta WHERE key = 'key_check'; DELETE FROM fingerprint_keys;".into(),
            &wrong,
        ),
    ];
    let new_key = EncryptionKey::generate_base64();
    for (case, tamper, key_env) in cases {
        restore(&home, &good);
        if !tamper.is_empty() {
            exec(&home, &tamper).await;
        }
        let before = db_bytes(&home);
        let files = raw_db(&home)
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>();
        let (env, setting): (Vec<(&str, &str)>, &str) = if key_env.is_empty() {
            (
                vec![
                    ("CLIPROXY__AUTH__ENCRYPTION__ENABLED", "false"),
                    ("K", &new_key),
                ],
                "auth.encryption.enabled",
            )
        } else {
            (
                vec![
                    ("CLIPROXY__AUTH__ENCRYPTION__KEY", key_env),
                    ("K", &new_key),
                ],
                "auth.encryption.key",
            )
        };
        for args in [
            &[][..],
            &["serve"][..],
            &["import"][..],
            &["import", "--dry-run"][..],
            &["rotate-key", "--new-key-env", "K"][..],
        ] {
            let out = home.run_binary_env(args, &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{case} {args:?}: {stderr}");
            assert!(stderr.contains(setting), "{case} {args:?}: {stderr}");
            assert!(stderr.contains("nothing was changed"), "{case}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{case}: {stderr}");
            assert!(
                db_bytes(&home) == before,
                "{case} {args:?} changed the database files"
            );
            let now: Vec<String> = raw_db(&home).into_iter().map(|(p, _)| p).collect();
            assert_eq!(now, files, "{case} {args:?} left files behind");
        }
    }
    // The right key, but the fingerprint keys altered: the start fails, changing nothing,
    // rather than make a new key that would not find the stored fingerprints again.
    for tamper in [
        "DELETE FROM fingerprint_keys;".to_string(),
        format!("UPDATE fingerprint_keys SET key_sealed = {plain_key};"),
        "UPDATE fingerprint_keys SET generation = 7;".to_string(),
    ] {
        restore(&home, &good);
        exec(&home, &tamper).await;
        let before = db_bytes(&home);
        for args in [&[][..], &["import"][..]] {
            let out = home.run_binary(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{tamper} {args:?}: {stderr}");
            assert!(stderr.contains("fingerprint"), "{tamper}: {stderr}");
            assert!(
                db_bytes(&home) == before,
                "{tamper} {args:?} changed the database"
            );
        }
    }
    // The untouched database with the right key: every credential still opens.
    restore(&home, &good);
    let app = home.start().await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 10);
    assert_all_open(&auths, "kiro");
    app.stop().await;
}

// ---- only sealed values, only of this database --------------------------------------------

#[tokio::test]
async fn a_value_in_clear_in_an_encrypted_database_is_refused() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!("api_keys: [\"client\"]\n{}", enc_yaml(&key)));
    let app = home.start().await;
    let mut ids = Vec::new();
    for t in tokens("sk-good", 6) {
        ids.push(post_key(&app, "openai", &t).await);
    }
    app.stop().await;
    // Planted in clear: a token, an empty one, a long one, and one with bytes that are not
    // UTF-8; a refresh token and a client secret of other credentials.
    let planted = [
        "sk-planted-0000000000000000000000".to_string(),
        String::new(),
        format!("sk-planted-{}", "p".repeat(4000)),
    ];
    for (id, value) in ids.iter().zip(&planted) {
        exec(
            &home,
            &format!(
                "UPDATE credentials SET token_sealed = x'00{}' WHERE id = '{id}';",
                to_hex(value.as_bytes())
            ),
        )
        .await;
    }
    exec(
        &home,
        &format!(
            "UPDATE credentials SET token_sealed = x'00ff00' WHERE id = '{}';
             UPDATE credentials SET kind = 'oauth', refresh_token_sealed = x'00{}' WHERE id = '{}';",
            ids[3],
            to_hex(b"gho_planted_refresh_000000000"),
            ids[4]
        ),
    )
    .await;
    for round in 0..2 {
        let app = home.start().await;
        let auths = app.auths().await;
        for id in &ids[..5] {
            let a = status_of(&auths, id);
            assert_eq!(a["status"], "invalid", "round {round}: {a}");
            assert!(
                a["status_reason"].as_str().unwrap().contains("in clear"),
                "{a}"
            );
        }
        assert_eq!(status_of(&auths, &ids[5])["status"], "active");
        // Leases hand out only the good one.
        for _ in 0..4 {
            let r = app
                .call_with(
                    "POST",
                    "/v1/credentials/lease",
                    Some(r#"{"provider": "openai", "estimated_tokens": 1}"#),
                    &[("authorization", "Bearer client")],
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            assert_eq!(r.json()["credential_id"], ids[5].as_str());
            assert!(!r.text.contains("planted"));
        }
        app.stop().await;
        // Never sealed: still in clear, as planted.
        let values = sealed_values(&home).await;
        for id in &ids[..3] {
            let (_, v) = values
                .iter()
                .find(|(what, _)| what == &format!("{id} token"))
                .unwrap();
            assert_eq!(v[0], 0, "round {round}: {id} was sealed");
        }
    }
}

#[tokio::test]
async fn a_value_copied_from_another_database_does_not_open() {
    let key = EncryptionKey::generate_base64();
    let (a, b) = (Home::new(&enc_yaml(&key)), Home::new(&enc_yaml(&key)));
    let mut copied = Vec::new();
    for (home, ids) in [(&a, &mut copied), (&b, &mut Vec::new())] {
        let app = home.start().await;
        for t in tokens("sk-db", 2) {
            ids.push(post_key(&app, "openai", &t).await);
        }
        add_mixed(&app, &tokens("sk-dbm", 12)).await;
        if ids.len() == 2 {
            ids.extend(
                app.auths()
                    .await
                    .iter()
                    .filter(|x| x["provider"] == "copilot" || x["provider"] == "kiro")
                    .map(|x| x["id"].as_str().unwrap().to_string()),
            );
        }
        app.stop().await;
    }
    // Whole rows (same credential id) copied from a's database into b's.
    let columns = "id, provider, kind, label, fingerprint, token_sealed, refresh_token_sealed,
                   client_secret_sealed, token_preview, extra, priority, disabled, state,
                   state_reason, expires_at, source, import_digest, created_at, updated_at";
    let list = copied
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    exec(
        &b,
        &format!(
            "ATTACH DATABASE '{}' AS a;
             INSERT INTO credentials ({columns}) SELECT {columns} FROM a.credentials WHERE id IN ({list});
             INSERT INTO quotas (credential_seq, credential_id, limit_tokens, used, period_start)
                 SELECT c.seq, c.id, NULL, 0, 0 FROM credentials c WHERE c.id IN ({list});
             DETACH DATABASE a;",
            db_path(&a).display()
        ),
    )
    .await;
    let app = b.start().await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 12 + copied.len());
    for a in &auths {
        let id = a["id"].as_str().unwrap();
        if copied.iter().any(|c| c == id) {
            assert_eq!(a["status"], "invalid", "{a}");
            assert!(
                a["status_reason"].as_str().unwrap().contains("database"),
                "{a}"
            );
            assert!(
                app.state
                    .store
                    .open_token(&id.into())
                    .await
                    .unwrap()
                    .is_err()
            );
        } else {
            assert_all_open(std::slice::from_ref(a), "kiro");
        }
    }
    app.stop().await;
}

/// A value with the version byte of the first sealed format, which only builds before the
/// database id wrote: in an encrypted database its credential is `invalid`, saying why, and
/// the others keep working; without a key check, as those builds left a database, every start
/// is refused, naming the format, and nothing changes.
#[tokio::test]
async fn a_value_of_the_first_sealed_format_is_refused_by_name() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&enc_yaml(&key));
    let app = home.start().await;
    let mut ids = Vec::new();
    for t in tokens("sk-first", 3) {
        ids.push(post_key(&app, "openai", &t).await);
    }
    app.stop().await;
    // The first format had the current one's layout: a current value with version byte 1.
    let (_, mut old) = sealed_values(&home)
        .await
        .into_iter()
        .find(|(what, _)| what == &format!("{} token", ids[0]))
        .unwrap();
    old[0] = 1;
    exec(
        &home,
        &format!(
            "UPDATE credentials SET token_sealed = x'{}' WHERE id = '{}';",
            to_hex(&old),
            ids[0]
        ),
    )
    .await;
    let app = home.start().await;
    let auths = app.auths().await;
    let a = status_of(&auths, &ids[0]);
    assert_eq!(a["status"], "invalid", "{a}");
    assert!(
        a["status_reason"]
            .as_str()
            .unwrap()
            .contains("first format"),
        "{a}"
    );
    for id in &ids[1..] {
        assert_eq!(status_of(&auths, id)["status"], "active");
    }
    assert!(
        app.state
            .store
            .open_token(&ids[0].clone().into())
            .await
            .unwrap()
            .is_err()
    );
    app.stop().await;

    exec(&home, "DELETE FROM meta WHERE key = 'key_check';").await;
    let before = db_bytes(&home);
    let off = [("CLIPROXY__AUTH__ENCRYPTION__ENABLED", "false")];
    for (args, env) in [
        (&[][..], &[][..]),
        (&["import", "--dry-run"][..], &[][..]),
        (&[][..], &off[..]),
    ] {
        let out = home.run_binary_env(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("first format"), "{stderr}");
        assert!(stderr.contains("nothing was changed"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            db_bytes(&home) == before,
            "{args:?} {env:?} changed the database"
        );
    }
}

// ---- the fingerprint key rotates -----------------------------------------------------------

async fn fingerprints(home: &Home) -> Vec<(String, Vec<u8>)> {
    let mut conn = connect(home).await;
    let v = sqlx::query_as("SELECT id, fingerprint FROM credentials ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    v
}

async fn key_generations(home: &Home) -> Vec<i64> {
    let mut conn = connect(home).await;
    let v = sqlx::query_scalar("SELECT generation FROM fingerprint_keys ORDER BY generation")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    v
}

#[tokio::test]
async fn rotate_key_replaces_the_fingerprint_key_and_deleted_stays_deleted() {
    let keys: Vec<String> = (0..3).map(|_| EncryptionKey::generate_base64()).collect();
    let home = Home::new(&enc_yaml(&keys[0]));
    let file_tokens = tokens("sk-fpr", 5);
    home.auth_file(
        "openai.json",
        Value::from(
            file_tokens
                .iter()
                .map(|t| json!({"token": t}))
                .collect::<Vec<_>>(),
        )
        .to_string(),
    );
    let api_tokens = tokens("sk-fpa", 3);
    let app = home.start().await;
    for t in &api_tokens {
        post_key(&app, "claude", t).await;
    }
    // A tombstone, and an API edit that rescans must keep.
    let r = app
        .delete(&format!(
            "/v0/management/auths/openai?id={}",
            file_tokens[0]
        ))
        .await;
    assert_eq!(r.status, 200);
    let edited = app
        .auths()
        .await
        .iter()
        .find(|a| a["provider"] == "openai")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .put(
            &format!("/v0/management/auths/openai?id={edited}"),
            r#"{"priority": 7}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    app.stop().await;

    for round in 1..3 {
        let before = fingerprints(&home).await;
        let env = [
            ("CLIPROXY__AUTH__ENCRYPTION__KEY", keys[round - 1].as_str()),
            ("K", keys[round].as_str()),
        ];
        let out = home.run_binary_env(&["rotate-key", "--new-key-env", "K"], &env);
        assert!(out.status.success(), "{out:?}");
        let after = fingerprints(&home).await;
        assert_eq!(before.len(), after.len());
        for ((id, old), (id2, new)) in before.iter().zip(&after) {
            assert_eq!(id, id2);
            assert_ne!(
                old, new,
                "round {round}: the fingerprint of {id} did not change"
            );
        }
        // The older keys stay for the tombstone and the import digests.
        assert_eq!(
            key_generations(&home).await,
            (1..=round as i64 + 1).collect::<Vec<_>>()
        );

        let env = [("CLIPROXY__AUTH__ENCRYPTION__KEY", keys[round].as_str())];
        for _ in 0..2 {
            let app = home.start_with(&env, Arc::new(chrono::Utc::now)).await;
            let report = &app.import_report;
            // Unchanged entries are known (no update overwrites the edit); the deleted one
            // stays deleted.
            assert_eq!(
                (report.imported, report.updated, report.skipped),
                (0, 0, 5),
                "round {round}: {report:?}"
            );
            assert_eq!(report.notices.len(), 1, "{report:?}");
            let auths = app.auths().await;
            assert_eq!(auths.len(), 7);
            assert_eq!(status_of(&auths, &edited)["priority"], 7);
            // Found again by token, under the new key.
            let r = app
                .post(
                    "/v0/management/auths",
                    &json!({"provider": "claude", "token": api_tokens[0]}).to_string(),
                )
                .await;
            assert_eq!(r.status, 409, "{}", r.text);
            app.stop().await;
        }
    }
    // Deleting by token finds the credential under the newest key.
    let env = [("CLIPROXY__AUTH__ENCRYPTION__KEY", keys[2].as_str())];
    let app = home.start_with(&env, Arc::new(chrono::Utc::now)).await;
    let r = app
        .delete(&format!("/v0/management/auths/claude?id={}", api_tokens[1]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;

    // Nothing recorded under an older key (no tombstone, no import): no older key is kept.
    let home = Home::new(&enc_yaml(&keys[0]));
    let app = home.start().await;
    post_key(&app, "openai", &tokens("sk-only", 1)[0]).await;
    app.stop().await;
    let out = home.run_binary_env(&["rotate-key", "--new-key-env", "K"], &[("K", &keys[1])]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(key_generations(&home).await, [2]);
}

async fn credential_count(home: &Home) -> i64 {
    let mut conn = connect(home).await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

/// The writes a command that opened the database before a `rotate-key` could still make.
#[derive(Debug, Clone, Copy)]
enum StaleWrite {
    /// `import` of entries new to the database.
    ImportNew,
    /// `import` of a changed entry (its secret re-sealed).
    ImportChanged,
    ImportDryRun,
    /// An import through the API (a body, as the server's import endpoint takes it).
    ImportBody,
    /// The start's marking of credentials whose secrets do not open.
    MarkUnopenable,
}

#[tokio::test]
async fn a_command_started_before_rotate_key_writes_nothing_under_the_old_key() {
    use cliproxyapi::store::ImportMode;
    let mut key = EncryptionKey::generate_base64();
    let home = Home::new(&enc_yaml(&key));
    let toks = tokens("sk-proj-stale", 4);
    let file = |label: &str| json!([{"token": toks[0], "label": label}, {"token": toks[1]}]);
    home.auth_file("openai.json", file("first").to_string());
    let app = home.start().await;
    assert_eq!(app.auths().await.len(), 2);
    app.stop().await;

    for (i, write) in [
        StaleWrite::ImportNew,
        StaleWrite::ImportChanged,
        StaleWrite::ImportDryRun,
        StaleWrite::ImportBody,
        StaleWrite::MarkUnopenable,
    ]
    .into_iter()
    .enumerate()
    {
        // Opened as `cliproxyapi import` opens it, under the key of the config...
        let loaded =
            cliproxyapi::config::Config::load_with_env(&home.config_path(), true, Vec::new())
                .unwrap();
        let state = cliproxyapi::app::open_state(loaded, Arc::new(chrono::Utc::now))
            .await
            .unwrap();
        match write {
            StaleWrite::ImportNew => {
                home.auth_file("openai-more.json", json!([{"token": toks[2]}]).to_string());
            }
            StaleWrite::ImportChanged => {
                home.auth_file("openai.json", file("changed").to_string());
            }
            _ => {}
        }
        // ... then the key is rotated before its write.
        let next = EncryptionKey::generate_base64();
        let out = home.run_binary_env(&["rotate-key", "--new-key-env", "K"], &[("K", &next)]);
        assert!(out.status.success(), "{write:?}: {out:?}");
        let rotated = sealed_values(&home).await;
        let written = match write {
            StaleWrite::MarkUnopenable => state
                .store
                .prepare_secrets(chrono::Utc::now())
                .await
                .map(|_| ()),
            StaleWrite::ImportBody => {
                let mut batch = cliproxyapi::import::Batch::default();
                cliproxyapi::import::add_document(
                    &mut batch,
                    &state.registry,
                    "body",
                    json!([{"provider": "openai", "token": toks[3]},
                           {"provider": "openai", "token": toks[1], "label": format!("body {i}")}]),
                    None,
                );
                state
                    .import(batch, ImportMode::Body, "api", false)
                    .await
                    .map(|_| ())
            }
            _ => {
                let batch = state.read_paths(vec![home.path().join("auths")]).await;
                let dry_run = matches!(write, StaleWrite::ImportDryRun);
                state
                    .import(batch, ImportMode::Files, "cli", dry_run)
                    .await
                    .map(|_| ())
            }
        };
        let error = written.expect_err(&format!("{write:?} after the rotation"));
        assert!(
            error.to_string().contains(
                "the encryption key was rotated after this command started; run it again"
            ),
            "{write:?}: {error}"
        );
        state.store.close().await;
        assert_eq!(
            sealed_values(&home).await,
            rotated,
            "{write:?} changed secrets"
        );
        assert_eq!(
            credential_count(&home).await,
            2,
            "{write:?} added credentials"
        );
        key = next;
        set_config(&home, &enc_yaml(&key));
    }

    // Under the last key every credential opens; the files import now, under it.
    let app = home.start().await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 3, "{auths:?}");
    assert!(auths.iter().all(|a| a["status"] == "active"), "{auths:?}");
    assert!(auths.iter().any(|a| a["label"] == "changed"), "{auths:?}");
    app.stop().await;
}

#[tokio::test]
async fn rotate_key_refuses_while_a_server_holds_the_database() {
    let (key, new) = (
        EncryptionKey::generate_base64(),
        EncryptionKey::generate_base64(),
    );
    let home = Home::new(&enc_yaml(&key));
    let app = home.start().await;
    post_key(&app, "openai", "sk-held-0123456789abcdef").await;
    let out = home.run_binary_env(&["rotate-key", "--new-key-env", "K"], &[("K", &new)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {})", std::process::id())),
        "{stderr}"
    );
    // The server goes on adding credentials that open after a restart.
    let id = post_key(&app, "openai", "sk-held-after-0123456789").await;
    app.stop().await;
    let app = home.start().await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 2);
    assert!(auths.iter().all(|a| a["status"] == "active"), "{auths:?}");
    assert!(
        app.state
            .store
            .open_token(&id.clone().into())
            .await
            .unwrap()
            .is_ok()
    );
    app.stop().await;

    // While rotate-key holds it, no server starts.
    let lock =
        cliproxyapi::app::lock_database(&db_path(&home), cliproxyapi::app::Holder::RotateKey)
            .unwrap();
    let err = home
        .build(&[], Arc::new(chrono::Utc::now))
        .await
        .err()
        .expect("no server under rotate-key");
    let msg = err.to_string();
    assert!(
        msg.contains("rotate-key") && msg.contains(&format!("(pid {})", std::process::id())),
        "{msg}"
    );
    drop(lock);
    home.start().await.stop().await;
}

// ---- previews, leases, environment, files, core dumps -------------------------------------

#[tokio::test]
async fn previews_show_a_public_prefix_and_the_last_four() {
    let home = Home::new("");
    let app = home.start().await;
    let cases = [
        (
            "claude",
            "sk-ant-api03-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789wxyz",
            "sk-ant…wxyz",
        ),
        (
            "openai",
            "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd",
            "sk-proj…abcd",
        ),
        (
            "openai",
            "sk-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            "sk…6789",
        ),
        (
            "gemini",
            "AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ0123456",
            "AIza…3456",
        ),
        ("groq", "gsk_ABCDEFGHIJKLMNOPQRSTUVWXYZ012345", "gsk…2345"),
        ("openai", "no-known-prefix-ABCDEFGHIJKL", "…IJKL"),
        ("openai", "sk-ab12", "sk…2"),
        ("openai", "short", "…t"),
        ("openai", "abc", "…"),
    ];
    let mut ids = Vec::new();
    for (provider, token, preview) in cases {
        let id = post_key(&app, provider, token).await;
        let auths = app.auths().await;
        assert_eq!(status_of(&auths, &id)["token_preview"], preview, "{token}");
        ids.push((id, preview));
    }
    app.stop().await;
    // Previews stored under the earlier rule are recomputed once, at the next start.
    exec(
        &home,
        "UPDATE credentials SET token_preview = 'sk-ant-ap…90wxyz';
         DELETE FROM meta WHERE key = 'token_preview_rule';",
    )
    .await;
    let app = home.start().await;
    let auths = app.auths().await;
    for (id, preview) in &ids {
        assert_eq!(status_of(&auths, id)["token_preview"], *preview);
    }
    app.stop().await;
    // Once: a preview changed afterwards stays as it is.
    exec(&home, "UPDATE credentials SET token_preview = 'kept';").await;
    let app = home.start().await;
    assert!(
        app.auths()
            .await
            .iter()
            .all(|a| a["token_preview"] == "kept")
    );
    app.stop().await;
}

#[tokio::test]
async fn leases_need_a_client_key_even_from_loopback() {
    let home = Home::new("");
    let app = home.start().await;
    post_key(&app, "openai", "sk-lease-0123456789abcdef").await;
    for body in [
        r#"{"provider": "openai"}"#,
        r#"{"provider": "openai", "estimated_tokens": 1}"#,
        r#"{"provider": "nope"}"#,
        r#"{}"#,
        "not json",
    ] {
        let r = app.post("/v1/credentials/lease", body).await;
        assert_eq!(r.status, 403, "{body}: {}", r.text);
        assert_eq!(r.error_code(), "leases_need_client_key");
        assert!(!r.text.contains("sk-lease"));
    }
    for id in ["lease_x", "", "%00"] {
        let r = app
            .post(
                &format!("/v1/credentials/lease/{id}/report"),
                r#"{"tokens_used": 1}"#,
            )
            .await;
        assert_eq!(r.status, 403, "{id}: {}", r.text);
        assert_eq!(r.error_code(), "leases_need_client_key");
    }
    // The proxy API itself still answers loopback clients without keys.
    assert_eq!(app.get("/v1/models").await.status, 200);
    app.stop().await;

    // With a client key: leases work.
    let env = [("CLIPROXY__API_KEYS", "client-key")];
    let app = home.start_with(&env, Arc::new(chrono::Utc::now)).await;
    let auth = [("authorization", "Bearer client-key")];
    let r = app
        .call_with(
            "POST",
            "/v1/credentials/lease",
            Some(r#"{"provider": "openai"}"#),
            &auth,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let lease = r.json()["lease_id"].as_str().unwrap().to_string();
    let r = app
        .call_with(
            "POST",
            &format!("/v1/credentials/lease/{lease}/report"),
            Some(r#"{"tokens_used": 3}"#),
            &auth,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;
}

async fn models_with_key(app: &crate::common::TestApp, key: &str) -> u16 {
    app.call_with("GET", "/v1/models", None, &[("x-api-key", key)])
        .await
        .status
}

#[tokio::test]
async fn secret_settings_from_the_environment_keep_their_text() {
    let home = Home::new("");
    for value in ["000123", "true", "1e5", "-0", "0x10"] {
        let env = [
            ("CLIPROXY__API_KEYS", value),
            ("CLIPROXY__MANAGEMENT__SECRET_KEY", value),
        ];
        let app = home.start_with(&env, Arc::new(chrono::Utc::now)).await;
        assert_eq!(models_with_key(&app, value).await, 200, "{value}");
        for parsed in ["123", "1", "100000", "0", "16"] {
            if parsed != value {
                assert_eq!(
                    models_with_key(&app, parsed).await,
                    401,
                    "{value} as {parsed}"
                );
            }
        }
        let r = app
            .call_with(
                "GET",
                "/v0/management/auths",
                None,
                &[("x-management-key", value)],
            )
            .await;
        assert_eq!(r.status, 200, "{value}: {}", r.text);
        app.stop().await;
    }
    // A client key that reads as a number, alone and beside a bad value: the server starts,
    // or the error names the bad key; no output shows the key.
    for (env, code) in [
        (vec![("CLIPROXY__API_KEYS", "31415926535897")], 0),
        (
            vec![
                ("CLIPROXY__API_KEYS", "31415926535897,27182818284590"),
                ("CLIPROXY__MANAGEMENT__SECRET_KEY", "16180339887498"),
                ("CLIPROXY__PORT", "lots"),
            ],
            2,
        ),
    ] {
        let out = home.run_binary_env(&["import"], &env);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(code), "{env:?}: {stderr}");
        if code == 2 {
            assert!(stderr.contains("port"), "{stderr}");
        }
        for secret in ["3141592", "2718281", "1618033"] {
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{stderr}"
            );
        }
    }
}

#[test]
fn files_holding_secrets_that_others_can_read_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let phc = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$2d6Wf8gqC1Re2v2Ql8sK4qXkJqKXvDkT1v8yIyA8fGQ";
    let cases = [
        ("api_keys: [\"k\"]\n", 0o644, true),
        ("api_keys: [\"k\"]\n", 0o640, true),
        ("api_keys: [\"k\"]\n", 0o604, true),
        ("api_keys: [\"k\"]\n", 0o600, false),
        ("management:\n  secret_key: plain-key\n", 0o644, true),
        ("auth:\n  encryption:\n    key: \"abc\"\n", 0o644, true),
        ("", 0o644, false),
        ("api_keys: []\n", 0o666, false),
    ];
    for (extra, mode, warned) in cases {
        let home = Home::new(extra);
        chmod(&home.config_path(), mode);
        let out = home.run_binary(&["import"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains(&home.config_path().display().to_string()) && l.contains("WARN"));
        assert_eq!(line.is_some(), warned, "{extra:?} {mode:o}: {stdout}");
        if let Some(line) = line {
            assert!(line.contains(&format!("{mode:03o}")), "{line}");
            assert!(line.contains("chmod 600"), "{line}");
        }
    }
    // A hashed management key is not a secret to hide.
    let home = Home::new(&format!("management:\n  secret_key: \"{phc}\"\n"));
    chmod(&home.config_path(), 0o644);
    let out = home.run_binary(&["import"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("chmod"));

    // Credential files in auth_dir.
    let home = Home::new("");
    for (name, mode, warned) in [
        ("open.json", 0o644, true),
        ("group.json", 0o640, true),
        ("private.json", 0o600, false),
        ("team.example.json", 0o644, false),
    ] {
        let p = home.auth_file(
            name,
            json!({"provider": "openai", "token": format!("sk-{name}")}).to_string(),
        );
        chmod(&p, mode);
        let out = home.run_binary(&["import"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let hit = stdout
            .lines()
            .any(|l| l.contains(&p.display().to_string()) && l.contains("chmod 600"));
        assert_eq!(hit, warned, "{name} {mode:o}: {stdout}");
    }
}

#[test]
fn the_server_cannot_dump_core() {
    let home = Home::new("");
    let server = home.spawn_binary();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

#[tokio::test]
async fn secret_settings_are_wiped_from_the_running_config() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "api_keys: [\"client-key-to-wipe\", \"second-client-key\"]\nmanagement:\n  secret_key: plain-management-key-to-wipe\nauth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n"
    ));
    let app = home.start().await;
    // The guards hold digests and the store its cipher: the settings in clear are gone...
    let config = &app.state.config.config;
    assert!(config.api_keys.is_empty());
    assert!(config.management.secret_key.is_empty());
    assert!(config.auth.encryption.key.is_empty());
    // ...and every key still works, as the wrong ones still fail.
    for (key, status) in [
        ("plain-management-key-to-wipe", 200),
        ("plain-management-key", 401),
    ] {
        let r = app
            .call_with(
                "GET",
                "/v0/management/auths",
                None,
                &[("x-management-key", key)],
            )
            .await;
        assert_eq!(r.status, status, "{}", r.text);
    }
    for (key, status) in [
        ("client-key-to-wipe", 200),
        ("second-client-key", 200),
        ("client-key", 401),
    ] {
        assert_eq!(models_with_key(&app, key).await, status, "{key}");
    }
    let r = app
        .call_with(
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": "sk-ant-sealed-after-wipe"}"#),
            &[("x-management-key", "plain-management-key-to-wipe")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    app.stop().await;
    let restarted = home.start().await;
    assert_eq!(
        restarted.state.store.integrity_check().await.unwrap().len(),
        0
    );
    let r = restarted
        .call_with(
            "POST",
            "/v1/credentials/lease",
            Some(r#"{"provider": "claude", "estimated_tokens": 1}"#),
            &[("authorization", "Bearer client-key-to-wipe")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json()["token"], "sk-ant-sealed-after-wipe");
    restarted.stop().await;
}
