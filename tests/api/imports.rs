//! Imports that must not fight or hang: the same credential in several sources is taken from
//! the first and reported for the others, API edits survive rescans, and files that are not
//! regular files (or never end) are reported without being read whole or blocking.

use crate::common::{Api, Home};
use crate::operations::run_bounded;
use serde_json::{Value, json};
use std::path::Path;

fn source(home: &Home, file: &str) -> String {
    format!("file:{}", home.path().join("auths").join(file).display())
}

async fn rescan(app: &impl Api) -> Value {
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

async fn import_body(app: &impl Api, body: Value) -> Value {
    let r = app
        .post("/v0/management/auths/import", &body.to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

fn counts(report: &Value) -> (u64, u64, u64, usize) {
    (
        report["imported"].as_u64().unwrap(),
        report["updated"].as_u64().unwrap(),
        report["skipped"].as_u64().unwrap(),
        report["errors"].as_array().unwrap().len(),
    )
}

/// The notices of a report as (source, text).
fn notices(report: &Value) -> Vec<(String, String)> {
    report["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["source"].as_str().unwrap().to_string(),
                n["notice"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The duplicate notice of `loser` names `winner`.
fn assert_duplicate(report: &Value, loser: &str, winner: &str) {
    let all = notices(report);
    let (_, text) = all
        .iter()
        .find(|(s, _)| s == loser)
        .unwrap_or_else(|| panic!("no notice for {loser}: {report}"));
    assert!(
        text.contains("duplicate") && text.contains(winner),
        "{loser}: {text}"
    );
}

#[tokio::test]
async fn the_same_token_in_several_files_is_taken_from_the_first() {
    let home = Home::new("");
    // Imported alone first: later files sorted before it take over, once.
    home.auth_file(
        "openai-b.json",
        r#"{"token": "sk-twin-1", "priority": 7, "label": "b"}"#,
    );
    let app = home.start().await;
    assert_eq!(app.import_report.imported, 1);

    home.auth_file(
        "openai-a.json",
        r#"{"token": "sk-twin-1", "priority": 3, "label": "a", "quota": {"limit": 500}}"#,
    );
    home.auth_file(
        "openai-c.json",
        r#"[{"token": "sk-other-1", "label": "other"},
            {"token": "sk-twin-1", "priority": 9, "label": "c", "disabled": true}]"#,
    );
    // Another provider with the same token is another credential, not a duplicate.
    home.auth_file(
        "claude.json",
        r#"{"token": "sk-twin-1", "label": "claude"}"#,
    );
    let report = rescan(&app).await;
    assert_eq!(counts(&report), (2, 1, 2, 0), "{report}");
    assert_duplicate(
        &report,
        &source(&home, "openai-b.json"),
        &source(&home, "openai-a.json"),
    );
    assert_duplicate(
        &report,
        &format!("{}[1]", source(&home, "openai-c.json")),
        &source(&home, "openai-a.json"),
    );
    assert_eq!(notices(&report).len(), 2, "{report}");
    let twin = || async {
        let auths = app.auths().await;
        let twins: Vec<Value> = auths
            .into_iter()
            .filter(|a| a["provider"] == "openai" && a["label"] != "other")
            .collect();
        assert_eq!(twins.len(), 1, "{twins:?}");
        twins[0].clone()
    };
    let t = twin().await;
    assert_eq!(
        (
            &t["label"],
            &t["priority"],
            &t["quota"]["limit"],
            &t["status"]
        ),
        (&json!("a"), &json!(3), &json!(500), &json!("active"))
    );
    assert_eq!(t["source"], source(&home, "openai-a.json").as_str());

    // Again and again: nothing changes, the duplicates are told each time.
    for _ in 0..3 {
        let report = rescan(&app).await;
        assert_eq!(counts(&report), (0, 0, 5, 0), "{report}");
        assert_eq!(notices(&report).len(), 2, "{report}");
    }

    // An edit through the API survives rescans.
    let id = t["id"].as_str().unwrap().to_string();
    let r = app
        .put(
            &format!("/v0/management/auths/openai?id={id}"),
            r#"{"priority": 42, "label": "edited", "disabled": true}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for _ in 0..2 {
        let report = rescan(&app).await;
        assert_eq!(counts(&report), (0, 0, 5, 0), "{report}");
        let t = twin().await;
        assert_eq!(
            (&t["label"], &t["priority"], &t["status"]),
            (&json!("edited"), &json!(42), &json!("disabled"))
        );
    }

    // The auth log names both files of each duplicate.
    let log = home.auth_log();
    let line = log
        .lines()
        .find(|l| l.contains("import notice") && l.contains("openai-c.json[1]"))
        .unwrap_or_else(|| panic!("no notice line: {log}"));
    assert!(line.contains("openai-a.json"), "{line}");
    app.stop().await;

    // The CLI says the same; the first in sorted path order wins whatever the order named.
    let out = run_bounded(home.command(
        &[
            "import",
            "--dry-run",
            "auths/openai-c.json",
            "auths/openai-b.json",
        ],
        &[],
    ));
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("skipped\tfile:auths/openai-c.json[1]"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains("duplicate") && line.contains("openai-b.json"),
        "{line}"
    );
    assert!(
        stdout.contains("0 imported, 1 updated, 2 skipped"),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_same_token_twice_in_a_body_is_taken_from_the_first_entry() {
    let home = Home::new("");
    let app = home.start().await;
    let body = json!([
        {"provider": "openai", "token": "sk-body-1", "label": "first", "priority": 1},
        {"provider": "openai", "token": "sk-body-1", "label": "second", "priority": 2},
        {"provider": "claude", "token": "sk-body-1", "label": "claude"},
        {"provider": "openai", "token": "sk-body-2", "label": "two"},
        {"provider": "openai", "token": "sk-body-1", "label": "third", "quota": {"limit": 9}},
        {"provider": "openai", "token": "sk-body-2", "label": "two again"}
    ]);
    let report = import_body(&app, body.clone()).await;
    assert_eq!(counts(&report), (3, 0, 3, 0), "{report}");
    assert_duplicate(&report, "body[1]", "body[0]");
    assert_duplicate(&report, "body[4]", "body[0]");
    assert_duplicate(&report, "body[5]", "body[3]");
    let auths = app.auths().await;
    assert_eq!(auths.len(), 3);
    let first = crate::common::by_label(&auths, "first");
    assert_eq!(
        (&first["priority"], &first["quota"]["limit"]),
        (&json!(1), &Value::Null)
    );
    // The same body again changes nothing; in the list shape too.
    let report = import_body(&app, body.clone()).await;
    assert_eq!(counts(&report), (0, 0, 6, 0), "{report}");
    let report = import_body(&app, json!({"auths": body})).await;
    assert_eq!(counts(&report), (0, 0, 6, 0), "{report}");
    assert_duplicate(&report, "body[4]", "body[0]");
    app.stop().await;
}

#[tokio::test]
async fn duplicates_of_a_deleted_credential_stay_deleted() {
    let home = Home::new("");
    home.auth_file("openai-a.json", r#"{"token": "sk-gone-1", "label": "a"}"#);
    home.auth_file("openai-b.json", r#"{"token": "sk-gone-1", "label": "b"}"#);
    home.auth_file("openai-c.json", r#"{"token": "sk-gone-1", "label": "c"}"#);
    let app = home.start().await;
    let report = &app.import_report;
    assert_eq!((report.imported, report.updated, report.skipped), (1, 0, 2));
    let id = app.auths().await[0]["id"].as_str().unwrap().to_string();
    let r = app
        .delete(&format!("/v0/management/auths/openai?id={id}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for _ in 0..2 {
        let report = rescan(&app).await;
        assert_eq!(counts(&report), (0, 0, 3, 0), "{report}");
        let all = notices(&report);
        assert!(
            all.iter()
                .any(|(s, n)| *s == source(&home, "openai-a.json") && n.contains("deleted")),
            "{report}"
        );
        assert_duplicate(&report, &source(&home, "openai-b.json"), "openai-a.json");
        assert_duplicate(&report, &source(&home, "openai-c.json"), "openai-a.json");
        assert!(app.auths().await.is_empty());
    }
    // A body brings it back, from its first entry only.
    let report = import_body(
        &app,
        json!([{"provider": "openai", "token": "sk-gone-1", "label": "back"},
               {"provider": "openai", "token": "sk-gone-1", "label": "not this"}]),
    )
    .await;
    assert_eq!(counts(&report), (1, 0, 1, 0), "{report}");
    assert_duplicate(&report, "body[1]", "body[0]");
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["label"], "back");
    // The files then take it over from their first, once.
    let report = rescan(&app).await;
    assert_eq!(counts(&report), (0, 1, 2, 0), "{report}");
    let report = rescan(&app).await;
    assert_eq!(counts(&report), (0, 0, 3, 0), "{report}");
    assert_eq!(app.auths().await[0]["label"], "a");
    app.stop().await;
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[tokio::test]
async fn files_that_are_not_regular_or_never_end_are_reported_not_read() {
    let home = Home::new("");
    let auths = home.path().join("auths");
    let outside = home.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    home.auth_file("claude.json", r#"{"token": "sk-ant-fine"}"#);
    // Size 0, and more than the cap behind it.
    std::os::unix::fs::symlink("/proc/self/pagemap", auths.join("openai-pagemap.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", auths.join("openai-zero.json")).unwrap();
    std::os::unix::fs::symlink("/dev/null", auths.join("openai-null.json")).unwrap();
    mkfifo(&auths.join("gemini-fifo.json"));
    mkfifo(&outside.join("fifo"));
    std::os::unix::fs::symlink(outside.join("fifo"), auths.join("gemini-fifo-link.json")).unwrap();
    std::fs::create_dir(auths.join("mistral-dir.json")).unwrap();
    std::os::unix::fs::symlink(&outside, auths.join("mistral-dirlink.json")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(auths.join("groq-sock.json")).unwrap();
    // A sparse file that says it is past the cap.
    let big = std::fs::File::create(auths.join("deepseek-big.json")).unwrap();
    big.set_len(64 * 1024 * 1024 + 1).unwrap();
    drop(big);

    let expected = [
        ("openai-pagemap.json", "larger than the 64 MiB"),
        (
            "openai-zero.json",
            "a character device is not a regular file",
        ),
        (
            "openai-null.json",
            "a character device is not a regular file",
        ),
        ("gemini-fifo.json", "a FIFO is not a regular file"),
        ("gemini-fifo-link.json", "a FIFO is not a regular file"),
        ("mistral-dir.json", "a folder is not a regular file"),
        ("mistral-dirlink.json", "a folder is not a regular file"),
        ("groq-sock.json", "a socket is not a regular file"),
        ("deepseek-big.json", "larger than the 64 MiB"),
    ];
    let check = |errors: &[(String, String)], what: &str| {
        for (file, reason) in expected {
            let src = source(&home, file);
            let (_, error) = errors
                .iter()
                .find(|(s, _)| *s == src)
                .unwrap_or_else(|| panic!("{what}: no error for {file}: {errors:?}"));
            assert!(error.contains(reason), "{what}: {file}: {error}");
        }
        assert_eq!(errors.len(), expected.len(), "{what}: {errors:?}");
    };

    let app = home.start().await;
    let report = &app.import_report;
    assert_eq!(report.imported, 1, "the good file is imported: {report:?}");
    let errors: Vec<(String, String)> = report
        .errors
        .iter()
        .map(|e| (e.source.clone(), e.error.clone()))
        .collect();
    check(&errors, "start");
    let log = home.auth_log();
    for (file, _) in expected {
        assert!(log.contains(file), "{file} not in the log");
    }
    let report = rescan(&app).await;
    let errors: Vec<(String, String)> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_string(),
                e["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    check(&errors, "rescan");
    app.stop().await;

    // Named on the command line, a FIFO is reported at once, not waited on.
    for file in [
        "gemini-fifo.json",
        "gemini-fifo-link.json",
        "openai-pagemap.json",
    ] {
        let path = auths.join(file);
        let out = run_bounded(home.command(&["import", "--dry-run", path.to_str().unwrap()], &[]));
        assert_eq!(out.status.code(), Some(1), "{file}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("error\tfile:{}", path.display())),
            "{stdout}"
        );
    }
}
