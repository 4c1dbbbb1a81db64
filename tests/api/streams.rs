//! Streamed answers through the proxy: events too large to parse pass through, and the usage
//! after them is still read, charged and (when the client did not ask for it) hidden.

use crate::common::{Api, Home};
use crate::mock::Mock;
use serde_json::json;

const CLIENT_KEY: &str = "client-key-for-streams";

#[tokio::test]
async fn usage_after_an_oversized_event_is_charged_and_hidden() {
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\n{}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "openai", "token": "sk-stream-1", "label": "s"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Past the tap's 4 MiB cap by one byte and by much more; and one under it.
    let cap = 4 * 1024 * 1024;
    for size in [cap + 1, 9 * 1024 * 1024 + 3, cap - 200] {
        let body = json!({"model": format!("gpt-huge-{size}"), "max_tokens": 20, "stream": true,
            "messages": [{"role": "user", "content": "Say hello with a very long answer."}]});
        let r = app
            .call_with(
                "POST",
                "/v1/chat/completions",
                Some(&body.to_string()),
                &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
            )
            .await;
        assert_eq!(r.status, 200, "{size}");
        assert!(r.text.len() > size, "{size}: the huge event arrived whole");
        assert!(
            !r.text.contains("prompt_tokens"),
            "{size}: the usage chunk the client did not ask for is hidden"
        );
        assert!(r.text.trim_end().ends_with("data: [DONE]"), "{size}");
        // Charged what the provider reported, not the reservation.
        let reported = mock.served("sk-stream-1").reported;
        assert!(reported > 0);
        let quota = crate::common::eventually(std::time::Duration::from_secs(10), || async {
            let a = app.auths().await;
            let q = a[0]["quota"].clone();
            (q["reserved"] == 0).then_some(q)
        })
        .await;
        assert_eq!(quota["used"].as_u64(), Some(reported), "{size}");
    }
    app.stop().await;
}
