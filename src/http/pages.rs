//! The OAuth pages (README, "OAuth pages"): `GET /v0/oauth/copilot` and
//! `GET /v0/oauth/kiro`, and the script and style they share under `/v0/oauth/assets/`.
//!
//! They are static: HTML, CSS and JavaScript embedded in the binary from `pages/`, nothing
//! fetched from elsewhere. The page starts a device flow and polls its status through the
//! JSON routes of contract section 6 (`POST /v0/oauth/{provider}/start`,
//! `GET /v0/oauth/{provider}/status`), which are behind the management guard. A browser
//! cannot send the management key when it opens a page, so the shell and its assets are
//! served under [`guard::page_guard`](super::guard::page_guard) (the management rules but the
//! key); the page asks for the key when one is configured and sends it with every call.
//! The one thing a page is told is whether to ask: `data-key` on its `<body>`, which an
//! unauthenticated call to the management API tells anyone anyway (401 or not).
//!
//! Every answer here carries a strict content security policy (scripts and styles from this
//! origin only, calls to this origin only, no frames, no forms posted anywhere), and is never
//! cached, framed, or sent as a referrer.

use super::{Guards, HttpState};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::{Arc, LazyLock};

/// The page both flows share; `{{NAME}}` marks what each fills in ([`Page`]).
const PAGE_HTML: &str = include_str!("pages/page.html");
const PAGE_JS: &str = include_str!("pages/page.js");
const PAGE_CSS: &str = include_str!("pages/page.css");

/// What one provider's page says in the shared shell.
struct Page {
    provider: &'static str,
    heading: &'static str,
    lead: &'static str,
    /// Where the user enters the code ("on GitHub").
    enter_where: &'static str,
    /// What the user chooses before the start (Kiro: Builder ID or Identity Center).
    choices: &'static str,
}

const COPILOT: Page = Page {
    provider: "copilot",
    heading: "GitHub Copilot",
    lead: "Log in with the GitHub account that has Copilot. The server keeps the GitHub \
           token and exchanges it for Copilot tokens as they expire.",
    enter_where: "on GitHub",
    choices: "",
};

const KIRO: Page = Page {
    provider: "kiro",
    heading: "Kiro",
    lead: "Log in with AWS Builder ID or your organisation's IAM Identity Center. The server \
           keeps the tokens and refreshes them as they expire.",
    enter_where: "at AWS",
    choices: include_str!("pages/kiro-choices.html"),
};

impl Page {
    /// The shell filled in (its texts are ours, written as HTML).
    fn render(&self) -> String {
        PAGE_HTML
            .replace("{{PROVIDER}}", self.provider)
            .replace("{{HEADING}}", self.heading)
            .replace("{{LEAD}}", self.lead)
            .replace("{{WHERE}}", self.enter_where)
            .replace("{{CHOICES}}", self.choices)
    }
}

static COPILOT_HTML: LazyLock<String> = LazyLock::new(|| COPILOT.render());
static KIRO_HTML: LazyLock<String> = LazyLock::new(|| KIRO.render());

/// Where the page says whether it asks for the key; replaced in each answer.
const KEY_MARK: &str = "data-key=\"ask\"";

/// The policy of every answer: nothing inline, nothing from elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page routes, each behind the page guard. Merged at the top of the application router.
pub fn router(state: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/v0/oauth/copilot", get(copilot))
        .route("/v0/oauth/kiro", get(kiro))
        .route("/v0/oauth/assets/page.js", get(script))
        .route("/v0/oauth/assets/page.css", get(style))
        .route_layer(middleware::from_fn_with_state(
            state,
            super::guard::page_guard,
        ))
}

async fn copilot(State(guards): State<Arc<Guards>>) -> Response {
    html(&guards, &COPILOT_HTML)
}

async fn kiro(State(guards): State<Arc<Guards>>) -> Response {
    html(&guards, &KIRO_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

fn html(guards: &Guards, page: &str) -> Response {
    let ask = if guards.management.key_configured() {
        "data-key=\"required\""
    } else {
        "data-key=\"none\""
    };
    asset("text/html; charset=utf-8", page.replacen(KEY_MARK, ask, 1))
}

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut response = body.into().into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_has_the_key_mark_once_and_no_inline_code() {
        for (page, provider) in [(&*COPILOT_HTML, "copilot"), (&*KIRO_HTML, "kiro")] {
            // Every mark filled in, the provider's own.
            assert!(!page.contains("{{"), "{page}");
            assert!(page.contains(&format!("data-provider=\"{provider}\"")));
            assert!(page.contains(&format!("href=\"/v0/management/auths/{provider}\"")));
            assert_eq!(page.matches(KEY_MARK).count(), 1);
            assert!(page.contains("<meta name=\"viewport\""));
            assert!(page.contains("src=\"/v0/oauth/assets/page.js\""));
            assert!(page.contains("href=\"/v0/oauth/assets/page.css\""));
            // The policy allows no inline script, style or handler; nothing from elsewhere.
            for banned in ["<script>", "<style", " style=", "src=\"http", "href=\"http"] {
                assert!(!page.contains(banned), "{banned}");
            }
            // No event handler attributes (` onclick=`).
            for (at, _) in page.match_indices(" on") {
                let name: String = page[at + 3..]
                    .chars()
                    .take_while(char::is_ascii_alphabetic)
                    .collect();
                assert!(!page[at + 3 + name.len()..].starts_with('='), "on{name}=");
            }
        }
        assert!(KIRO_HTML.contains("<fieldset id=\"method\">"));
        assert!(!COPILOT_HTML.contains("<fieldset"));
        for banned in ["url(", "@import", "http"] {
            assert!(!PAGE_CSS.contains(banned), "{banned}");
        }
        assert!(!PAGE_JS.contains("http://") && !PAGE_JS.contains("https://"));
        // Server data reaches the page as text only.
        assert!(!PAGE_JS.contains("innerHTML") && !PAGE_JS.contains("outerHTML"));
        assert!(!PAGE_JS.contains("insertAdjacentHTML") && !PAGE_JS.contains("document.write"));
    }
}
