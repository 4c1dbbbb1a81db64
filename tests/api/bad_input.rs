//! Bad input loses nothing: bad files are reported with path and reason while good ones are
//! imported, and bad requests get a 4xx with our error JSON, never a 5xx.

use crate::common::{Api, Home};
use serde_json::json;

#[tokio::test]
async fn bad_files_are_reported_and_good_ones_imported() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        r#"{"type": "api_key", "token": "sk-ant-good1"}"#,
    );
    home.auth_file(
        "openai-many.json",
        r#"[{"token": "sk-good2"}, {"token": "sk-good3", "priority": 5}]"#,
    );
    home.auth_file("gemini-broken.json", r#"{"type": "api_key", "token": "#);
    home.auth_file("mistral.json", r#"{"type": "api_key", "priority": 1}"#);
    home.auth_file("acme.json", r#"{"type": "api_key", "token": "x1"}"#);
    home.auth_file("groq.json", "");
    home.auth_file("deepseek.json", [0xffu8, 0xfe, 0x00, 0x7b, 0x22]);
    let mut garbage = Vec::with_capacity(10 * 1024 * 1024);
    let mut x: u32 = 12345;
    while garbage.len() < 10 * 1024 * 1024 {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        garbage.push(b"{[\"x:,}] a"[(x >> 24) as usize % 10]);
    }
    home.auth_file("claude-garbage.json", &garbage);
    home.auth_file("claude.example.json", r#"{"token": "sk-ant-example"}"#);
    home.auth_file("notes.txt", "not a credential file");

    let app = home.start().await;
    let report = &app.import_report;
    assert_eq!(report.imported, 3, "{report:?}");
    let reason = |file: &str| -> String {
        let source = format!("file:{}", home.path().join("auths").join(file).display());
        report
            .errors
            .iter()
            .find(|e| e.source == source)
            .unwrap_or_else(|| panic!("no error for {file}: {report:?}"))
            .error
            .clone()
    };
    assert!(reason("gemini-broken.json").starts_with("invalid JSON"));
    assert_eq!(reason("mistral.json"), "token is required");
    assert!(reason("acme.json").contains("names no known provider"));
    assert_eq!(reason("groq.json"), "file is empty");
    assert!(reason("deepseek.json").contains("not UTF-8"));
    assert!(reason("claude-garbage.json").starts_with("invalid JSON"));
    assert_eq!(report.errors.len(), 6, "{report:?}");

    // The errors are in the auth log too, with their paths.
    let log = home.auth_log();
    for file in [
        "gemini-broken.json",
        "mistral.json",
        "acme.json",
        "groq.json",
        "deepseek.json",
        "claude-garbage.json",
    ] {
        assert!(log.contains(file), "{file} not in the log");
    }
    // The server serves.
    let auths = app.auths().await;
    assert_eq!(auths.len(), 3);
    // The same through the import endpoint's rescan.
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["imported"], 0);
    assert_eq!(v["skipped"], 3);
    assert_eq!(v["errors"].as_array().unwrap().len(), 6);
    app.stop().await;

    // And through the CLI: the same per-file report, and a non-zero exit.
    let out = home.run_binary(&["import", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("acme.json") && stdout.contains("names no known provider"),
        "{stdout}"
    );
}

#[tokio::test]
async fn bad_requests_get_our_error_json() {
    let home = Home::new("");
    let app = home.start().await;
    for token in ["sk-ant-a1", "sk-ant-a2"] {
        let body = json!({"provider": "claude", "type": "api_key", "token": token}).to_string();
        assert_eq!(app.post("/v0/management/auths", &body).await.status, 201);
    }
    let big = format!(
        r#"{{"provider": "claude", "token": "sk-ant-big", "label": "{}"}}"#,
        "x".repeat(1024 * 1024 + 10)
    );
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/v0/management/auths",
            Some("{bad json"),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(""),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some("[1,2]"),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": 42}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": "t", "priority": "high"}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": "t", "quota": {"limit": -5}}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": "t", "colour": "red"}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "nope", "token": "t"}"#),
            400,
            "unknown_provider",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"token": "t"}"#),
            400,
            "invalid_credential",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude"}"#),
            400,
            "invalid_credential",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(r#"{"provider": "claude", "token": "t", "expires_at": "tomorrow"}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v0/management/auths",
            Some(&big),
            413,
            "body_too_large",
        ),
        (
            "PUT",
            "/v0/management/auths/claude",
            Some(r#"{"priority": 3}"#),
            409,
            "ambiguous_credential",
        ),
        (
            "PUT",
            "/v0/management/auths/claude?id=cred_nope",
            Some(r#"{"priority": 3}"#),
            404,
            "credential_not_found",
        ),
        (
            "PUT",
            "/v0/management/auths/claude?id=sk-ant-a1",
            Some(r#"{}"#),
            400,
            "invalid_body",
        ),
        (
            "PUT",
            "/v0/management/auths/claude?id=sk-ant-a1",
            Some(r#"{"priority": 1e99}"#),
            400,
            "invalid_body",
        ),
        (
            "PUT",
            "/v0/management/auths/claude?id=sk-ant-a1",
            Some(r#"{"token": "sk-ant-a2"}"#),
            409,
            "duplicate_credential",
        ),
        (
            "PUT",
            "/v0/management/auths/nope",
            Some(r#"{"priority": 3}"#),
            404,
            "unknown_provider",
        ),
        (
            "DELETE",
            "/v0/management/auths/claude",
            None,
            400,
            "missing_id",
        ),
        (
            "DELETE",
            "/v0/management/auths/claude?id=nothing",
            None,
            404,
            "credential_not_found",
        ),
        (
            "DELETE",
            "/v0/management/auths/openai?id=sk-ant-a1",
            None,
            404,
            "credential_not_found",
        ),
        (
            "GET",
            "/v0/management/auths/nope",
            None,
            404,
            "unknown_provider",
        ),
        (
            "GET",
            "/v0/management/auths?status=sleepy",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v0/management/auths?limit=ten",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v0/management/auths?provider=nope",
            None,
            404,
            "unknown_provider",
        ),
        (
            "GET",
            "/v0/management/auths?colour=red",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v0/management/auths/nope/quota",
            None,
            404,
            "unknown_provider",
        ),
        (
            "PUT",
            "/v0/management/auths/claude/quota",
            Some(r#"{"limit": "lots"}"#),
            400,
            "invalid_body",
        ),
        (
            "PUT",
            "/v0/management/auths/claude/quota",
            Some(r#"{}"#),
            400,
            "invalid_body",
        ),
        (
            "PUT",
            "/v0/management/auths/claude/quota?id=cred_nope",
            Some(r#"{"limit": 5}"#),
            404,
            "credential_not_found",
        ),
        (
            "POST",
            "/v0/management/auths/import",
            Some("{"),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v0/management/auths/import",
            Some(r#"{"rescan": "yes"}"#),
            400,
            "invalid_body",
        ),
        (
            "PATCH",
            "/v0/management/auths",
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/v0/management/nothing", None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let r = app.call(method, path, body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{method} {path} {}: {}",
            body.map(|b| &b[..b.len().min(80)]).unwrap_or(""),
            r.text
        );
    }
    // Nothing was lost or changed by all that.
    let auths = app.auths().await;
    assert_eq!(auths.len(), 2);
    assert!(auths.iter().all(|a| a["priority"] == 100));
    app.stop().await;
}

/// Many malformed bodies of every kind to every endpoint: never a 5xx, always our shape.
#[tokio::test]
async fn no_input_makes_a_5xx() {
    let home = Home::new("");
    let app = home.start().await;
    assert_eq!(
        app.post(
            "/v0/management/auths",
            r#"{"provider":"openai","token":"sk-1"}"#
        )
        .await
        .status,
        201
    );
    let bodies = [
        "null",
        "true",
        "0",
        "\"s\"",
        "[]",
        "{}",
        "[{}]",
        "{\"auths\": 5}",
        "{\"auths\": [null]}",
        "{\"provider\": null}",
        "{\"provider\": 7}",
        "{\"token\": null, \"provider\": \"openai\"}",
        "{\"provider\": \"openai\", \"token\": \"\"}",
        "{\"provider\": \"openai\", \"token\": \"a\\u0000b\"}",
        "{\"provider\": \"openai\", \"type\": \"weird\", \"token\": \"x\"}",
        "{\"provider\": \"openai\", \"type\": \"oauth\"}",
        "{\"provider\": \"openai\", \"token\": \"x\", \"priority\": 99999999999999999999}",
        "{\"provider\": \"openai\", \"token\": \"x\", \"quota\": {\"limit\": 18446744073709551615, \"used\": 18446744073709551615}}",
        "{\"provider\": \"openai\", \"token\": \"x\", \"label\": null, \"disabled\": \"no\"}",
        "{\"limit\": null}",
        "{\"limit\": -1}",
        "{\"used\": 5, \"reset\": 1}",
        "{\"rescan\": true, \"x\": 1}",
        "\u{feff}{}",
        "{\"a\":",
        "{\"provider\": \"openai\", \"token\": \"x\", \"expires_at\": \"2026-13-45T00:00:00Z\"}",
    ];
    let paths = [
        ("POST", "/v0/management/auths"),
        ("POST", "/v0/management/auths/import"),
        ("PUT", "/v0/management/auths/openai"),
        ("PUT", "/v0/management/auths/openai/quota"),
        ("PUT", "/v0/management/auths/openai?id=sk-1"),
        ("PUT", "/v0/management/auths/openai/quota?id=sk-1"),
    ];
    for (method, path) in paths {
        for body in bodies {
            let r = app.call(method, path, Some(body)).await;
            assert!(
                r.status < 500,
                "{method} {path} {body}: {} {}",
                r.status,
                r.text
            );
            if r.status >= 400 {
                r.error_code();
            }
        }
    }
    for path in [
        "/v0/management/auths?limit=-1",
        "/v0/management/auths?offset=99999999999",
        "/v0/management/auths?limit=0",
        "/v0/management/auths/%00",
        "/v0/management/auths/%FF%FE",
        "/v0/management/auths/%FF/quota",
        "/v0/management/auths/..%2F..",
        "/v0/management/auths/openai/quota/extra",
        "/v0/management/auths/refresh/status",
    ] {
        let r = app.get(path).await;
        assert!(r.status < 500, "{path}: {} {}", r.status, r.text);
        if r.status >= 400 {
            r.error_code();
        }
    }
    app.stop().await;
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// A body of `size` bytes: `head`, then `0,` repeated, then `tail`.
fn zeros(head: &str, size: usize, tail: &str) -> Vec<u8> {
    let mut body = head.as_bytes().to_vec();
    while body.len() + tail.len() + 2 < size {
        body.extend_from_slice(b"0,");
    }
    body.push(b'0');
    body.extend_from_slice(tail.as_bytes());
    body
}

/// A body of `size` bytes: `head` (an open object), then `,"a":0` repeated, then `}`.
fn members(head: &str, size: usize) -> Vec<u8> {
    let mut body = head.as_bytes().to_vec();
    while body.len() + 7 < size {
        body.extend_from_slice(br#","a":0"#);
    }
    body.push(b'}');
    body
}

/// A large body of tiny JSON elements is read without being built into a JSON tree (which
/// takes tens of times its size): whatever the request path reads or changes in it, the
/// server's memory grows by a small multiple of the body, not by gigabytes.
#[tokio::test]
async fn large_json_bodies_are_read_without_being_built() {
    let mock = crate::mock::Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"big-body-key\"]\n{}",
        mock.providers_yaml()
    ));
    for (file, token) in [
        ("openai.json", "sk-big-1"),
        ("claude.json", "sk-ant-big-1"),
        ("gemini.json", "AIza-big-1"),
    ] {
        home.auth_file(file, format!(r#"{{"token": "{token}"}}"#));
    }
    let server = home.spawn_binary();
    let pid = server.child.id();
    let client = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>| {
        client
            .post(format!("{}{path}", server.base))
            .header("authorization", "Bearer big-body-key")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let small = br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}"#;
    assert_eq!(
        post("/v1/chat/completions", small.to_vec())
            .await
            .unwrap()
            .status(),
        200
    );
    let baseline = peak_memory(pid);
    // 8 MiB of `0,`: four million elements, which a JSON tree holds in over 300 MB.
    let size = 8 << 20;
    let cases = [
        // Peeked, then rebuilt to ask for usage.
        (
            "/v1/chat/completions",
            zeros(
                r#"{"model":"gpt-4o","stream":true,"messages":["#,
                size,
                "]}",
            ),
        ),
        // Peeked, then rebuilt to strip the provider prefix.
        (
            "/v1/chat/completions",
            zeros(r#"{"model":"openai/gpt-4o","messages":["#, size, "]}"),
        ),
        // A million tiny members at the top level, rebuilt both ways.
        (
            "/v1/chat/completions",
            members(r#"{"model":"gpt-4o","stream":true"#, size),
        ),
        (
            "/v1/chat/completions",
            members(r#"{"model":"openai/gpt-4o""#, size),
        ),
        // Every field the request path reads, huge where it is not the kind it reads.
        ("/v1/messages", zeros(r#"{"model":["#, size, "]}")),
        (
            "/v1/messages",
            zeros(r#"{"model":"claude-x","max_tokens":["#, size, "]}"),
        ),
        (
            "/v1/chat/completions",
            zeros(
                r#"{"model":"gpt-4o","stream":true,"stream_options":{"x":["#,
                size,
                "]}}",
            ),
        ),
        (
            "/v1beta/models/gemini-x:generateContent",
            zeros(r#"{"generationConfig":{"stopSequences":["#, size, "]}}"),
        ),
        // The lease body (1 MiB at most) goes straight into its struct.
        (
            "/v1/credentials/lease",
            zeros(r#"{"provider":"claude","x":["#, 1 << 20, "]}"),
        ),
    ];
    for (path, body) in cases {
        let len = body.len();
        let r = post(path, body).await.unwrap();
        // The mock refuses bodies this large (the answer may be its 413, or a 502 when it
        // closes before reading all); what matters is what the server held.
        assert_ne!(r.status(), 500, "{path} ({len} bytes)");
        let grown = peak_memory(pid).saturating_sub(baseline);
        assert!(
            grown < 100_000_000,
            "{path} ({len} bytes): the server grew by {} MB",
            grown / 1_000_000
        );
    }
    let models = client
        .get(format!("{}/v1/models", server.base))
        .header("authorization", "Bearer big-body-key")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
}
