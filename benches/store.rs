//! Store benchmark: importing 10,000 credentials (one array file, and 1,000 files of 10) into a
//! fresh database, re-importing them unchanged, and listing pages of 100 of 10,000 over HTTP
//! (following each page's `next` cursor).
//!
//! Run: `cargo bench --bench store` (a release build). Prints one table; no assertions, since
//! timings belong in a benchmark and not in the test suite.

use cliproxyapi::app::Application;
use cliproxyapi::config::Config;
use cliproxyapi::state::AppState;
use cliproxyapi::store::ImportMode;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 10_000;

fn entry(i: usize) -> serde_json::Value {
    json!({
        "type": "api_key",
        "token": format!("sk-ant-api03-bench-{i:06}-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"),
        "priority": (i % 50) as i64,
        "label": format!("bench {i}"),
        "quota": {"limit": 1_000_000, "used": i}
    })
}

fn write_home(dir: &Path, files: usize) {
    std::fs::create_dir_all(dir.join("auths")).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        "host: 127.0.0.1\nport: 0\nlogging:\n  level: warn\n",
    )
    .unwrap();
    let per_file = N / files;
    for f in 0..files {
        let items: Vec<_> = (f * per_file..(f + 1) * per_file).map(entry).collect();
        let name = if files == 1 {
            "claude.json".to_string()
        } else {
            format!("claude-{f:04}.json")
        };
        std::fs::write(
            dir.join("auths").join(name),
            serde_json::to_vec(&items).unwrap(),
        )
        .unwrap();
    }
}

/// Read, validate and import `auth_dir` once, as `cliproxyapi import` does; returns the time.
async fn import_once(state: &AppState) -> (Duration, usize, usize) {
    let started = Instant::now();
    let batch = state.read_paths(vec![state.config.auth_dir.clone()]).await;
    let report = state
        .import(batch, ImportMode::Files, "bench", false)
        .await
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    (started.elapsed(), report.imported, report.skipped)
}

async fn bench_import(files: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    write_home(dir.path(), files);
    let loaded = Config::load_with_env(&dir.path().join("config.yaml"), true, Vec::new()).unwrap();
    let state = cliproxyapi::app::open_state(loaded, Arc::new(chrono::Utc::now))
        .await
        .unwrap();
    let (first, imported, _) = import_once(&state).await;
    assert_eq!(imported, N);
    let (again, _, skipped) = import_once(&state).await;
    assert_eq!(skipped, N);
    state.store.close().await;
    (first, again)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench_list() -> (Duration, Duration, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    write_home(dir.path(), 1);
    let loaded = Config::load_with_env(&dir.path().join("config.yaml"), true, Vec::new()).unwrap();
    let app = Application::build(loaded).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    let mut filtered = Vec::new();
    // Page after page, following `next` (and from the start again after the last page).
    let mut next: [Option<String>; 2] = [None, None];
    for i in 0..300 {
        for (k, query) in ["limit=100", "provider=claude&status=active&limit=100"]
            .iter()
            .enumerate()
        {
            let url = match &next[k] {
                Some(after) => format!("{base}/v0/management/auths?{query}&after={after}"),
                None => format!("{base}/v0/management/auths?{query}"),
            };
            let started = Instant::now();
            let body = client
                .get(&url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let took = started.elapsed();
            let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(page["auths"].as_array().unwrap().len(), 100, "{url}");
            next[k] = page["next"].as_str().map(str::to_string);
            if i >= 20 {
                [&mut times, &mut filtered][k].push(took);
            }
        }
    }
    times.sort();
    filtered.sort();
    let _ = tx.send(());
    server.await.unwrap().unwrap();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&filtered, 0.5),
        percentile(&filtered, 0.99),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (one_first, one_again) = bench_import(1).await;
        let (many_first, many_again) = bench_import(1000).await;
        let (p50, p99, f50, f99) = bench_list().await;
        println!("| what | time | target |");
        println!("| --- | --- | --- |");
        println!(
            "| import 10,000 credentials, one array file, fresh database | {} | < 3 s |",
            ms(one_first)
        );
        println!(
            "| the same again, unchanged (all skipped) | {} | |",
            ms(one_again)
        );
        println!(
            "| import 10,000 credentials, 1,000 files, fresh database | {} | < 3 s |",
            ms(many_first)
        );
        println!(
            "| the same again, unchanged (all skipped) | {} | |",
            ms(many_again)
        );
        println!(
            "| GET /v0/management/auths?limit=100 of 10,000, p50 | {} | < 20 ms |",
            ms(p50)
        );
        println!("| the same, p99 | {} | < 20 ms |", ms(p99));
        println!(
            "| with ?provider=claude&status=active, p50 | {} | |",
            ms(f50)
        );
        println!("| the same, p99 | {} | |", ms(f99));
    });
}
