//! The official Python SDKs, unchanged, against the server and local mock providers. Built
//! with `--features sdk-tests` by `scripts/test.sh`, which installs the SDKs in a virtual
//! environment and names its interpreter in `CLIPROXY_SDK_PYTHON`.

use crate::common::{Api, Home};
use crate::mock::Mock;
use serde_json::json;

#[tokio::test]
async fn official_python_sdks_work_unchanged() {
    let python = std::env::var("CLIPROXY_SDK_PYTHON")
        .expect("CLIPROXY_SDK_PYTHON names the venv's python (scripts/test.sh sets it)");
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"sdk-client-key\"]\n{}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    let tokens = [
        ("openai", "sk-sdk-oa"),
        ("claude", "sk-sdk-ant"),
        ("gemini", "AIza-sdk-g"),
    ];
    for (provider, token) in tokens {
        let body = json!({"provider": provider, "token": token, "label": token});
        assert_eq!(
            app.post("/v0/management/auths", &body.to_string())
                .await
                .status,
            201
        );
    }
    let base = app.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/sdk/scenario.py"
            ))
            .arg(base)
            .arg("sdk-client-key")
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
    let auths = crate::common::eventually(std::time::Duration::from_secs(10), || async {
        let a = app.auths().await;
        a.iter().all(|c| c["quota"]["reserved"] == 0).then_some(a)
    })
    .await;
    for (_, token) in tokens {
        let a = auths.iter().find(|a| a["label"] == token).unwrap();
        let served = mock.served(token);
        assert!(served.requests >= 2, "{token}");
        assert_eq!(
            a["quota"]["used"].as_u64().unwrap(),
            served.reported,
            "{token}"
        );
    }
    assert!(!mock.saw("sdk-client-key"));
    app.stop().await;
}
