//! Many credentials: lists and the quota view page by an opaque keyset cursor with a default
//! page and a maximum; every management write takes effect on the request path at once
//! (rotation, priority order, quotas), the mirror following only what the write touched.

use crate::common::{Api, Home, TestApp};
use serde_json::{Value, json};
use std::collections::HashMap;

const CLIENT_KEY: &str = "client-key-for-scale-tests";

fn ok(r: &crate::common::Resp) -> Value {
    assert!(r.status < 300, "{} {}", r.status, r.text);
    r.json()
}

/// Import `entries` through the bulk endpoint.
async fn import(app: &TestApp, entries: Vec<Value>) {
    let r = app
        .post(
            "/v0/management/auths/import",
            &Value::from(entries).to_string(),
        )
        .await;
    let report = ok(&r);
    assert_eq!(report["errors"], json!([]), "{report}");
}

/// Every page of `path` (which has its own query, or none) at `limit` rows a page, from
/// `after` on, following `next`: the rows' labels (ids in the quota view), and the pages.
async fn walk(
    app: &TestApp,
    path: &str,
    limit: Option<u32>,
    key: &str,
    mut after: Option<String>,
) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    for pages in 1.. {
        let mut query: Vec<String> = Vec::new();
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        if let Some(a) = &after {
            query.push(format!("after={a}"));
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}{sep}{}", query.join("&"))
        };
        let page = ok(&app.get(&url).await);
        let rows = page[key].as_array().unwrap();
        if let Some(l) = limit {
            assert!(rows.len() <= l as usize, "{url}: {} rows", rows.len());
        }
        labels.extend(rows.iter().map(|r| {
            r.get("label")
                .and_then(Value::as_str)
                .unwrap_or_else(|| r["id"].as_str().unwrap())
                .to_string()
        }));
        match page.get("next") {
            Some(next) => {
                assert!(!rows.is_empty(), "{url}: an empty page with a next cursor");
                after = Some(next.as_str().unwrap().to_string());
            }
            None => return (labels, pages),
        }
    }
    unreachable!()
}

/// A credential as `populate` made it.
struct Made {
    provider: &'static str,
    priority: i64,
    label: String,
    disabled: bool,
}

/// Credentials in several providers, priorities shared by many, some disabled; in list order.
async fn populate(app: &TestApp) -> Vec<Made> {
    let mut expected = Vec::new();
    let mut entries = Vec::new();
    for (provider, n) in [("openai", 23), ("claude", 9), ("gemini", 1)] {
        for i in 0..n {
            // Priorities repeat (and the extremes appear), so pages end inside a level.
            let priority = [5, 1, 5, 1_000_000, -1_000_000, 1][i % 6];
            let label = format!("{provider}-{i:02}");
            let disabled = i % 4 == 3;
            entries.push(json!({"provider": provider, "token": format!("sk-{label}"),
                                "label": label, "priority": priority, "disabled": disabled}));
            expected.push(Made {
                provider,
                priority,
                label,
                disabled,
            });
        }
    }
    import(app, entries).await;
    // List order: provider, then priority, then creation (entries were created in order).
    expected.sort_by_key(|m| (m.provider, m.priority));
    expected
}

fn labels<'a>(rows: impl IntoIterator<Item = &'a Made>) -> Vec<String> {
    rows.into_iter().map(|m| m.label.clone()).collect()
}

#[tokio::test]
async fn lists_page_by_cursor_in_list_order() {
    let home = Home::new("");
    let app = home.start().await;
    let expected = populate(&app).await;
    let all = labels(&expected);
    let base = "/v0/management/auths";

    // Every page size, the extremes first: each walk sees every row once, in order, and ends.
    for limit in [1, 1000, 2, 32, 33, 34, 3, 7, 10] {
        let (seen, pages) = walk(&app, base, Some(limit), "auths", None).await;
        assert_eq!(seen, all, "limit {limit}");
        assert_eq!(pages, all.len().div_ceil(limit as usize), "limit {limit}");
    }
    // The default page holds them all here: no cursor.
    let page = ok(&app.get(base).await);
    assert!(page.get("next").is_none(), "{page}");

    // Filters keep working across pages, and a provider's own list pages the same way.
    type Keep = fn(&Made) -> bool;
    let filters: [(&str, Keep); 4] = [
        ("provider=claude", |m| m.provider == "claude"),
        ("status=disabled", |m| m.disabled),
        ("status=active&provider=openai", |m| {
            m.provider == "openai" && !m.disabled
        }),
        ("provider=gemini", |m| m.provider == "gemini"),
    ];
    for (query, keep) in filters {
        let want = labels(expected.iter().filter(|m| keep(m)));
        for limit in [1, 2, 5, 1000] {
            let path = format!("{base}?{query}");
            let (seen, _) = walk(&app, &path, Some(limit), "auths", None).await;
            assert_eq!(seen, want, "{query} limit {limit}");
        }
    }
    for provider in ["openai", "claude", "gemini"] {
        let want = labels(expected.iter().filter(|m| m.provider == provider));
        for limit in [1, 4, 1000] {
            let path = format!("{base}/{provider}");
            let (seen, _) = walk(&app, &path, Some(limit), "auths", None).await;
            assert_eq!(seen, want, "{provider} limit {limit}");
            let path = format!("{base}/{provider}/quota");
            let (lines, _) = walk(&app, &path, Some(limit), "credentials", None).await;
            assert_eq!(lines.len(), want.len(), "{provider} quota limit {limit}");
        }
    }

    // Rows added and removed between pages neither repeat nor hide the others.
    let openai = labels(expected.iter().filter(|m| m.provider == "openai"));
    let first = ok(&app.get(&format!("{base}?provider=openai&limit=6")).await);
    let listed: Vec<&str> = first["auths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(listed, openai[..6]);
    let cursor = first["next"].as_str().unwrap().to_string();
    // Gone: one already listed and one not yet; new: one inside a level, one at the end.
    for label in [&openai[2], &openai[9]] {
        ok(&app.delete(&format!("{base}/openai?id=sk-{label}")).await);
    }
    import(
        &app,
        vec![
            json!({"provider": "openai", "token": "sk-late-mid", "label": "late-mid", "priority": 5}),
            json!({"provider": "openai", "token": "sk-late-end", "label": "late-end", "priority": 1_000_000}),
        ],
    )
    .await;
    let path = format!("{base}?provider=openai");
    let (rest, _) = walk(&app, &path, Some(4), "auths", Some(cursor)).await;
    let mut want: Vec<String> = openai[6..]
        .iter()
        .filter(|l| **l != openai[9])
        .cloned()
        .collect();
    // New rows sort by priority, then creation: the newest last in their level.
    let up_to_5 = expected
        .iter()
        .filter(|m| m.provider == "openai" && m.priority <= 5)
        .count();
    want.insert(up_to_5 - 6 - 1, "late-mid".into());
    want.push("late-end".into());
    assert_eq!(rest, want);
    app.stop().await;
}

#[tokio::test]
async fn the_default_page_is_500_and_the_quota_total_covers_every_credential() {
    let home = Home::new("");
    let app = home.start().await;
    let n = 1203;
    let entries: Vec<Value> = (0..n)
        .map(|i| json!({"provider": "openai", "token": format!("sk-many-{i:05}"), "label": format!("m{i:05}"),
                        "quota": {"limit": 1000, "used": i % 1000}}))
        .collect();
    for chunk in entries.chunks(500) {
        import(&app, chunk.to_vec()).await;
    }
    let base = "/v0/management/auths";
    // Without a limit: pages of 500, then the rest.
    let (seen, pages) = walk(&app, base, None, "auths", None).await;
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..n).map(|i| format!("m{i:05}")).collect();
    assert_eq!(seen, want);
    let first = ok(&app.get(base).await);
    assert_eq!(first["auths"].as_array().unwrap().len(), 500);
    assert!(first["next"].is_string());
    let provider = ok(&app.get(&format!("{base}/openai")).await);
    assert_eq!(provider["provider"], "openai");
    assert_eq!(provider["auths"].as_array().unwrap().len(), 500);
    assert!(provider["next"].is_string());

    // The quota view: a page of counters, the total over all of them.
    let quota = ok(&app.get(&format!("{base}/openai/quota")).await);
    assert_eq!(quota["credentials"].as_array().unwrap().len(), 500);
    let used: u64 = (0..n as u64).map(|i| i % 1000).sum();
    assert_eq!(
        quota["total"],
        json!({"limit": n * 1000, "used": used, "remaining": n as u64 * 1000 - used})
    );
    let path = format!("{base}/openai/quota");
    let (lines, pages) = walk(&app, &path, None, "credentials", None).await;
    assert_eq!((lines.len(), pages), (n, 3));
    // The answer to a quota change is the view's first page too.
    let r = app
        .put(&format!("{base}/openai/quota"), r#"{"limit": null}"#)
        .await;
    let changed = ok(&r);
    assert_eq!(changed["credentials"].as_array().unwrap().len(), 500);
    assert_eq!(
        changed["total"],
        json!({"limit": null, "used": used, "remaining": null})
    );
    assert!(changed["next"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn bad_limits_and_cursors_are_invalid_query() {
    let home = Home::new("");
    let app = home.start().await;
    let expected = populate(&app).await;
    let base = "/v0/management/auths";
    let page = ok(&app.get(&format!("{base}?limit=2")).await);
    let cursor = page["next"].as_str().unwrap().to_string();
    let claude = ok(&app.get(&format!("{base}?provider=claude&limit=2")).await);
    let claude_cursor = claude["next"].as_str().unwrap().to_string();
    let path = format!("{base}/claude");
    let after = Some(claude_cursor.clone());
    let (rest, _) = walk(&app, &path, Some(100), "auths", after).await;
    let claude = labels(expected.iter().filter(|m| m.provider == "claude"));
    assert_eq!(rest, claude[2..], "a provider's cursor serves its own list");

    let mut bad: Vec<String> = [
        "limit=0",
        "limit=1001",
        "limit=4294967295",
        "limit=4294967296",
        "limit=99999999999",
        "limit=-1",
        "limit=ten",
        "limit=",
        "offset=0",
        "offset=10",
        "after=",
        "after=x",
        "after=%FF%FE",
        "after=!!!!",
        "after=AAAA",
    ]
    .iter()
    .map(|q| format!("{base}?{q}"))
    .collect();
    bad.push(format!("{base}?after={}", "A".repeat(20_000)));
    bad.push(format!("{base}?after={}", "QUJD".repeat(40)));
    // Each character of a real cursor changed, the cursor cut short or made longer.
    for i in 0..cursor.len() {
        let mut changed = cursor.clone().into_bytes();
        changed[i] = if changed[i] == b'A' { b'B' } else { b'A' };
        bad.push(format!(
            "{base}?after={}",
            String::from_utf8(changed).unwrap()
        ));
    }
    bad.push(format!("{base}?after={}", &cursor[..cursor.len() - 1]));
    bad.push(format!("{base}?after={}A", cursor));
    bad.push(format!("{base}?after={cursor}{cursor}"));
    // A real cursor with another filter than the one it was made for.
    bad.push(format!("{base}?provider=openai&after={cursor}"));
    bad.push(format!("{base}?status=active&after={cursor}"));
    bad.push(format!("{base}?after={claude_cursor}"));
    bad.push(format!("{base}/openai?after={claude_cursor}"));
    bad.push(format!("{base}/openai/quota?after={claude_cursor}"));
    for provider_path in ["/openai", "/openai/quota"] {
        for q in [
            "limit=0",
            "limit=1001",
            "after=x",
            "offset=1",
            "status=active",
        ] {
            bad.push(format!("{base}{provider_path}?{q}"));
        }
    }
    for path in &bad {
        let r = app.get(path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_query"),
            "{path}: {}",
            &r.text
        );
    }
    // The largest page is allowed.
    ok(&app.get(&format!("{base}?limit=1000")).await);
    app.stop().await;
}

/// Lease one token from openai (so the pick is seen at once) and report it used up front.
async fn pick(app: &TestApp, names: &HashMap<String, String>) -> String {
    let r = app
        .call_with(
            "POST",
            "/v1/credentials/lease",
            Some(r#"{"provider": "openai", "estimated_tokens": 1}"#),
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
        )
        .await;
    if r.status != 201 {
        return format!("{} {}", r.status, r.error_code());
    }
    let lease = r.json();
    let report = app
        .call_with(
            "POST",
            &format!(
                "/v1/credentials/lease/{}/report",
                lease["lease_id"].as_str().unwrap()
            ),
            Some(r#"{"tokens_used": 0}"#),
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
        )
        .await;
    assert!(report.status < 300, "{}", report.text);
    names[lease["credential_id"].as_str().unwrap()].clone()
}

async fn picks(app: &TestApp, names: &HashMap<String, String>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(pick(app, names).await);
    }
    out
}

async fn add(app: &TestApp, names: &mut HashMap<String, String>, label: &str, priority: i64) {
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "openai", "token": format!("sk-{label}"), "label": label,
                    "priority": priority})
            .to_string(),
        )
        .await;
    let id = ok(&r)["id"].as_str().unwrap().to_string();
    names.insert(id, label.to_string());
}

/// Learn the ids of credentials made by an import.
async fn learn(app: &TestApp, names: &mut HashMap<String, String>) {
    for a in app.auths().await {
        names.insert(
            a["id"].as_str().unwrap().to_string(),
            a["label"].as_str().unwrap().to_string(),
        );
    }
}

async fn put(app: &TestApp, path: &str, body: Value) {
    ok(&app.put(path, &body.to_string()).await);
}

#[tokio::test]
async fn round_robin_follows_every_kind_of_write_at_once() {
    let home = Home::new(&format!("api_keys: [\"{CLIENT_KEY}\"]\n"));
    let app = home.start().await;
    let mut names = HashMap::new();
    let auths = "/v0/management/auths/openai";
    for label in ["a", "b", "c"] {
        add(&app, &mut names, label, 100).await;
    }
    assert_eq!(picks(&app, &names, 4).await, ["a", "b", "c", "a"]);
    // Added: after the last credential, so next in turn right after the last pick's round.
    add(&app, &mut names, "d", 100).await;
    assert_eq!(picks(&app, &names, 4).await, ["b", "c", "d", "a"]);
    // Disabled, then enabled again.
    put(&app, &format!("{auths}?id=sk-b"), json!({"disabled": true})).await;
    assert_eq!(picks(&app, &names, 3).await, ["c", "d", "a"]);
    put(
        &app,
        &format!("{auths}?id=sk-b"),
        json!({"disabled": false}),
    )
    .await;
    assert_eq!(picks(&app, &names, 1).await, ["b"]);
    // Deleted before the cursor: the turn goes on with the credential after the last pick.
    ok(&app.delete(&format!("{auths}?id=sk-a")).await);
    assert_eq!(picks(&app, &names, 3).await, ["c", "d", "b"]);
    // Deleted at the cursor: the next one takes its turn.
    ok(&app.delete(&format!("{auths}?id=sk-c")).await);
    assert_eq!(picks(&app, &names, 2).await, ["d", "b"]);
    add(&app, &mut names, "c2", 100).await;
    // A quota of nothing on one credential, then for all of them: nothing left at all.
    put(&app, &format!("{auths}/quota?id=sk-d"), json!({"limit": 0})).await;
    assert_eq!(picks(&app, &names, 3).await, ["c2", "b", "c2"]);
    put(&app, &format!("{auths}/quota"), json!({"limit": 0})).await;
    assert_eq!(pick(&app, &names).await, "429 credentials_busy");
    put(&app, &format!("{auths}/quota"), json!({"limit": null})).await;
    assert_eq!(picks(&app, &names, 3).await, ["b", "d", "c2"]);
    // Used up, then reset.
    put(
        &app,
        &format!("{auths}/quota?id=sk-b"),
        json!({"limit": 10, "used": 10}),
    )
    .await;
    assert_eq!(picks(&app, &names, 3).await, ["d", "c2", "d"]);
    put(
        &app,
        &format!("{auths}/quota?id=sk-b"),
        json!({"reset": true}),
    )
    .await;
    assert_eq!(picks(&app, &names, 2).await, ["c2", "b"]);
    // Imported: a new one joins at the end; a changed one keeps its turn.
    import(
        &app,
        vec![
            json!({"provider": "openai", "token": "sk-e", "label": "e"}),
            json!({"provider": "openai", "token": "sk-d", "label": "d", "priority": 7}),
        ],
    )
    .await;
    learn(&app, &mut names).await;
    assert_eq!(picks(&app, &names, 4).await, ["d", "c2", "e", "b"]);
    // A new token for one: still the same credential, in the same turn.
    put(
        &app,
        &format!("{auths}?id=sk-d"),
        json!({"token": "sk-d-new"}),
    )
    .await;
    assert_eq!(picks(&app, &names, 4).await, ["d", "c2", "e", "b"]);
    // Expired (an API key cannot be refreshed), then not; a new label changes nothing.
    let past = json!({"expires_at": "2020-01-01T00:00:00Z", "label": "c2"});
    put(&app, &format!("{auths}?id=sk-c2"), past).await;
    assert_eq!(picks(&app, &names, 3).await, ["d", "e", "b"]);
    put(
        &app,
        &format!("{auths}?id=sk-c2"),
        json!({"expires_at": null}),
    )
    .await;
    assert_eq!(picks(&app, &names, 3).await, ["d", "c2", "e"]);
    app.stop().await;
}

#[tokio::test]
async fn priority_order_follows_every_kind_of_write_at_once() {
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\nauth:\n  selection_strategy: priority\n"
    ));
    let app = home.start().await;
    let mut names = HashMap::new();
    let auths = "/v0/management/auths/openai";
    add(&app, &mut names, "a", 1).await;
    add(&app, &mut names, "b", 1).await;
    add(&app, &mut names, "c", 2).await;
    assert_eq!(picks(&app, &names, 3).await, ["a", "b", "a"]);
    // Moved down a level: its old level goes on without it.
    put(&app, &format!("{auths}?id=sk-a"), json!({"priority": 3})).await;
    assert_eq!(picks(&app, &names, 2).await, ["b", "b"]);
    // Moved into a level: in creation order within it.
    put(&app, &format!("{auths}?id=sk-b"), json!({"priority": 2})).await;
    assert_eq!(picks(&app, &names, 3).await, ["b", "c", "b"]);
    // An older one moved into a level whose turn is under way: the turn goes on after the
    // last pick (c), not again from a shifted position.
    put(&app, &format!("{auths}?id=sk-a"), json!({"priority": 2})).await;
    assert_eq!(picks(&app, &names, 3).await, ["c", "a", "b"]);
    // Moved out of it to the top, then deleted: the level resumes after its last pick.
    put(
        &app,
        &format!("{auths}?id=sk-a"),
        json!({"priority": -1_000_000}),
    )
    .await;
    assert_eq!(picks(&app, &names, 2).await, ["a", "a"]);
    ok(&app.delete(&format!("{auths}?id=sk-a")).await);
    assert_eq!(picks(&app, &names, 2).await, ["c", "b"]);
    // No room on one: the level's other one serves.
    put(&app, &format!("{auths}/quota?id=sk-c"), json!({"limit": 0})).await;
    assert_eq!(picks(&app, &names, 2).await, ["b", "b"]);
    // Imported at a better priority: first at once; and a new credential of the same level.
    import(
        &app,
        vec![
            json!({"provider": "openai", "token": "sk-f", "label": "f", "priority": 0}),
            json!({"provider": "openai", "token": "sk-g", "label": "g", "priority": 0}),
        ],
    )
    .await;
    learn(&app, &mut names).await;
    assert_eq!(picks(&app, &names, 3).await, ["f", "g", "f"]);
    // Disabled and re-prioritised in one change.
    put(
        &app,
        &format!("{auths}?id=sk-f"),
        json!({"disabled": true, "priority": 2}),
    )
    .await;
    assert_eq!(picks(&app, &names, 2).await, ["g", "g"]);
    app.stop().await;
}
