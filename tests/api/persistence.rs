//! State survives restarts, `kill -9` included; imports are idempotent; deletions stick.

use crate::common::{Api, Home};
use serde_json::{Value, json};

fn find<'a>(auths: &'a [Value], preview_label: &str) -> &'a Value {
    crate::common::by_label(auths, preview_label)
}

#[tokio::test]
async fn state_survives_kill_9_and_reimport() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        r#"[{"token": "sk-ant-file1", "label": "f1", "priority": 1, "quota": {"limit": 1000, "used": 10}},
            {"token": "sk-ant-file2", "label": "f2", "priority": 2}]"#,
    );
    home.auth_file("openai.json", r#"{"token": "sk-file3", "label": "f3"}"#);

    let server = home.spawn_binary();
    let auths = server.auths().await;
    assert_eq!(auths.len(), 3);
    let f1 = find(&auths, "f1")["id"].as_str().unwrap().to_string();
    let f2 = find(&auths, "f2")["id"].as_str().unwrap().to_string();
    // Changes through the API: priority, limit, used, a new credential, a deletion.
    let r = server
        .put(
            &format!("/v0/management/auths/claude?id={f1}"),
            r#"{"priority": 7, "label": "f1-renamed"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = server
        .put(
            &format!("/v0/management/auths/claude/quota?id={f1}"),
            r#"{"limit": 5000, "used": 1234}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = server
        .post(
            "/v0/management/auths",
            &json!({"provider": "gemini", "token": "AIza-api1", "label": "a1", "priority": 3,
                    "quota": {"limit": 77}})
            .to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = server
        .delete(&format!("/v0/management/auths/claude?id={f2}"))
        .await;
    assert_eq!(r.status, 200);
    let before = server.auths().await;
    server.kill9();

    // Restart: everything as it was; the unchanged files change nothing, the deleted
    // credential stays deleted.
    let server = home.spawn_binary();
    let after = server.auths().await;
    assert_eq!(after.len(), 3, "{after:#?}");
    let strip = |v: &[Value]| -> Vec<Value> {
        v.iter()
            .map(|a| {
                let mut a = a.clone();
                a.as_object_mut().unwrap().remove("status_reason");
                a
            })
            .collect()
    };
    assert_eq!(strip(&before), strip(&after));
    let f1v = find(&after, "f1-renamed");
    assert_eq!(f1v["priority"], 7);
    assert_eq!(f1v["quota"]["limit"], 5000);
    assert_eq!(f1v["quota"]["used"], 1234);
    assert!(after.iter().all(|a| a["id"] != f2.as_str()));
    assert!(
        home.auth_log()
            .contains("deleted through the management API")
    );

    // Importing the same files again through the CLI: no duplicate, counters kept.
    server.kill9();
    let out = home.run_binary(&["import"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 imported, 0 updated, 3 skipped"),
        "{stdout}"
    );
    let server = home.spawn_binary();
    assert_eq!(strip(&server.auths().await), strip(&before));

    // A changed entry updates its credential in place, keeping its counter.
    home.auth_file(
        "claude.json",
        r#"[{"token": "sk-ant-file1", "label": "f1", "priority": 4, "quota": {"limit": 1000, "used": 10}},
            {"token": "sk-ant-file2", "label": "f2", "priority": 2}]"#,
    );
    let r = server
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.status, 200);
    let report = r.json();
    assert_eq!(
        (report["imported"].as_u64(), report["updated"].as_u64()),
        (Some(0), Some(1)),
        "{report}"
    );
    assert_eq!(
        report["notices"].as_array().unwrap().len(),
        1,
        "f2 is tombstoned"
    );
    let auths = server.auths().await;
    let f1v = find(&auths, "f1");
    assert_eq!(f1v["id"], f1.as_str());
    assert_eq!(f1v["priority"], 4);
    assert_eq!(f1v["quota"]["used"], 1234, "live counter kept");
    assert_eq!(f1v["quota"]["limit"], 1000, "the file's limit now");

    // Adding the deleted credential again through the API brings it back.
    let r = server
        .post(
            "/v0/management/auths",
            r#"{"provider": "claude", "token": "sk-ant-file2", "label": "f2"}"#,
        )
        .await;
    assert_eq!(r.status, 201);
    server.kill9();

    // The database is sound after all those kills.
    let app = home.start().await;
    let problems = app.state.store.integrity_check().await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(app.auths().await.len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn graceful_restart_in_process_keeps_everything() {
    let home = Home::new("");
    let app = home.start().await;
    for i in 0..20 {
        let body = json!({"provider": "openai", "token": format!("sk-{i}"), "label": format!("k{i}"), "priority": i});
        assert_eq!(
            app.post("/v0/management/auths", &body.to_string())
                .await
                .status,
            201
        );
    }
    let before = app.auths().await;
    let problems = app.state.store.integrity_check().await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    app.stop().await;
    let app = home.start().await;
    assert_eq!(app.auths().await, before);
    app.stop().await;
}

/// One server per database: a second one is refused with a message naming the first, which
/// goes on serving; once it stops, a server starts again. CLI commands are not refused.
#[tokio::test]
async fn a_second_server_on_the_same_database_is_refused() {
    let home = Home::new("");
    let app = home.start().await;
    let err = home
        .build(&[], std::sync::Arc::new(chrono::Utc::now))
        .await
        .err()
        .expect("a second server on the same database is refused");
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    assert!(
        msg.contains("another cliproxyapi server")
            && msg.contains(&format!("(pid {})", std::process::id())),
        "{msg}"
    );
    let out = home.run_binary(&["import"]);
    assert!(out.status.success(), "{out:?}");
    assert!(app.auths().await.is_empty());
    app.stop().await;
    let app = home.start().await;
    app.stop().await;
}
