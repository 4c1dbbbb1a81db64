//! The listener's limits (README, Security, Limits): the connection cap (with room made by
//! closing idle connections) and each address's share of it, the header, idle and body
//! deadlines, and the budget of buffered body bytes, each tried with raw sockets that hold,
//! trickle or stall as a hostile client would. Responses that clients do not take, and the
//! stop, are in `stalls.rs`.

use crate::common::{Api, Home, eventually};
use crate::mock::Mock;
use crate::raw::{self, RawResponse};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

const MIB: usize = 1024 * 1024;
/// Longer than any deadline these tests set, by far: a connection still open after it was
/// not closed by a deadline.
const PATIENCE: Duration = Duration::from_secs(15);
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// A home with `server:` lines and, with a mock, an openai and a gemini credential served by
/// it.
fn home(server: &str, mock: Option<&Mock>) -> Home {
    let providers = mock.map(Mock::providers_yaml).unwrap_or_default();
    let server = if server.is_empty() {
        String::new()
    } else {
        format!("server:\n{server}")
    };
    let home = Home::new(&format!("{server}{providers}"));
    if mock.is_some() {
        for provider in ["openai", "gemini"] {
            home.auth_file(
                &format!("{provider}.json"),
                format!(r#"{{"provider": "{provider}", "type": "api_key", "token": "sk-limits-{provider}"}}"#),
            );
        }
    }
    home
}

/// A chat body of exactly `size` bytes (JSON padded with spaces) for a model no provider
/// serves: the server reads it whole and answers 404 `unknown_model`, without sending MiBs
/// to the mock.
fn unrouted_of(size: usize) -> String {
    let body = r#"{"model":"no-such-model","messages":[]}"#;
    assert!(size >= body.len());
    format!("{body}{}", " ".repeat(size - body.len()))
}

/// A client whose every request opens its own connection, so a test's short idle timeout never
/// meets a pooled connection just as it is closed.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A connection from `source` whose request is in flight: its body is announced and never
/// sent (the server reads it until `body_read_timeout`).
async fn busy_from(base: &str, source: &str) -> TcpStream {
    let mut s = raw::connect_from(base, source).await;
    s.write_all(raw::head("POST", "/v1/chat/completions", Some(100)).as_bytes())
        .await
        .unwrap();
    s.write_all(b"{").await.unwrap();
    s
}

/// Whether `s`, which sent a request, gets no answer for a while (it waits in the backlog).
async fn unanswered(s: &mut TcpStream) -> bool {
    tokio::time::timeout(Duration::from_millis(300), raw::read_response(s))
        .await
        .is_err()
}

#[tokio::test]
async fn past_the_cap_busy_connections_keep_their_slots_and_new_ones_wait() {
    for cap in [1usize, 2, 5] {
        let home = home(
            &format!("  max_connections: {cap}\n  body_read_timeout: 1h\n"),
            None,
        );
        let app = home.start().await;
        let mut held = Vec::new();
        for _ in 0..cap {
            held.push(busy_from(&app.base, "127.0.0.1").await);
        }
        // More waiting than the cap: the kernel completes their handshakes, the server does
        // not accept them while every slot serves a request.
        let mut waiting = Vec::new();
        for _ in 0..=cap {
            let mut s = raw::connect(&app.base).await;
            s.write_all(raw::head("GET", "/v1/models", None).as_bytes())
                .await
                .unwrap();
            waiting.push(s);
        }
        for s in &mut waiting {
            assert!(
                unanswered(s).await,
                "cap {cap}: a connection past the cap was served"
            );
        }
        // One slot freed: every waiting connection is served in turn, each kept-alive one
        // making room for the next once it is idle.
        drop(held.pop());
        for (i, s) in waiting.iter_mut().enumerate() {
            let answer = tokio::time::timeout(PATIENCE, raw::read_response(s))
                .await
                .unwrap_or_else(|_| panic!("cap {cap}: waiting connection {i} never served"))
                .expect("an answer");
            assert_eq!(answer.status, 200);
        }
        // The busy ones were never closed for them.
        for s in &mut held {
            assert!(
                unanswered(s).await,
                "cap {cap}: a busy connection was closed"
            );
        }
        drop(held);
        assert_eq!(app.get("/v1/models").await.status, 200);
        app.stop().await;
    }
}

/// `count` clients from `source` that connect and send nothing (or, every other one, half a
/// request line), each connecting again as soon as the server closes it; how many times the
/// server closed one.
fn idle_clients(
    base: &str,
    source: &'static str,
    count: usize,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    std::sync::Arc<AtomicUsize>,
) {
    let closed = std::sync::Arc::new(AtomicUsize::new(0));
    let tasks = (0..count)
        .map(|i| {
            let (base, closed) = (base.to_string(), closed.clone());
            tokio::spawn(async move {
                loop {
                    let mut s = raw::connect_from(&base, source).await;
                    if i % 2 == 1 {
                        let _ = s.write_all(b"GET /v1/mod").await;
                    }
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    closed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    (tasks, closed)
}

#[tokio::test]
async fn at_the_cap_idle_connections_make_room_for_new_clients() {
    for (cap, idle) in [(1usize, 200usize), (4, 300), (50, 300)] {
        // Only making room can close the idle ones: their deadlines are an hour away.
        let home = home(
            &format!("  max_connections: {cap}\n  header_read_timeout: 1h\n  idle_timeout: 1h\n"),
            None,
        );
        let app = home.start().await;
        let (tasks, closed) = idle_clients(&app.base, "127.0.0.1", idle);
        eventually(PATIENCE, || async {
            (closed.load(Ordering::Relaxed) >= cap).then_some(())
        })
        .await;
        // A normal client, from the same address as the idle ones and from another, gets in
        // within moments, every time.
        for source in ["127.0.0.1", "127.0.0.2", "127.0.0.1"] {
            let answer = tokio::time::timeout(Duration::from_secs(10), async {
                let mut s = raw::connect_from(&app.base, source).await;
                raw::request(&mut s, "GET", "/v1/models", b"").await
            })
            .await
            .unwrap_or_else(|_| panic!("cap {cap}, {idle} idle: a normal client was kept out"));
            assert_eq!(answer.status, 200);
        }
        for t in tasks {
            t.abort();
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn one_address_is_served_on_at_most_its_share_of_connections() {
    for per in [1usize, 3] {
        let home = home(
            &format!(
                "  max_connections: 100\n  max_connections_per_address: {per}\n  \
                 body_read_timeout: 1h\n  header_read_timeout: 1h\n  idle_timeout: 1h\n  \
                 trusted_proxies: [\"127.0.0.3\"]\n"
            ),
            None,
        );
        let app = home.start().await;
        // Kept-alive idle connections: the address's oldest makes room for its next one.
        let mut idle = Vec::new();
        for _ in 0..per {
            let mut s = raw::connect(&app.base).await;
            assert_eq!(
                raw::request(&mut s, "GET", "/v1/models", b"").await.status,
                200
            );
            idle.push(s);
        }
        let mut next = raw::connect(&app.base).await;
        assert_eq!(
            raw::request(&mut next, "GET", "/v1/models", b"")
                .await
                .status,
            200
        );
        assert!(
            raw::closed_within(&mut idle[0], PATIENCE).await,
            "per {per}: the oldest idle connection stayed"
        );
        drop((idle, next));
        // Every connection of an address busy: a new one from it waits (its address does not
        // keep anyone else out meanwhile), and is served when one of them ends.
        let mut busy = Vec::new();
        for _ in 0..per {
            busy.push(busy_from(&app.base, "127.0.0.4").await);
        }
        let mut parked = raw::connect_from(&app.base, "127.0.0.4").await;
        parked
            .write_all(raw::head("GET", "/v1/models", None).as_bytes())
            .await
            .unwrap();
        assert!(
            unanswered(&mut parked).await,
            "per {per}: served past its share"
        );
        for s in &mut busy {
            assert!(
                unanswered(s).await,
                "per {per}: a busy connection was closed"
            );
        }
        // Other addresses are not concerned; a trusted proxy may hold more.
        let mut s = raw::connect_from(&app.base, "127.0.0.2").await;
        assert_eq!(
            raw::request(&mut s, "GET", "/v1/models", b"").await.status,
            200
        );
        drop(busy.pop());
        let answer = tokio::time::timeout(PATIENCE, raw::read_response(&mut parked))
            .await
            .expect("served once one of its address's requests ended")
            .expect("an answer");
        assert_eq!(answer.status, 200);
        let mut proxied = Vec::new();
        for _ in 0..per + 2 {
            proxied.push(busy_from(&app.base, "127.0.0.3").await);
        }
        let mut s = raw::connect_from(&app.base, "127.0.0.3").await;
        assert_eq!(
            raw::request(&mut s, "GET", "/v1/models", b"").await.status,
            200
        );
        // (Requests still in flight would hold the stop up for `shutdown_timeout`.)
        drop((busy, proxied, parked));
        app.stop().await;
    }
}

/// A slow client: it sends `first`, then the parts of `then` in turn with `every` between
/// them, round and round, and never closes its side of the connection.
struct Slow {
    name: &'static str,
    first: Vec<u8>,
    then: Vec<Vec<u8>>,
    every: Duration,
}

impl Slow {
    fn new(name: &'static str, first: impl Into<Vec<u8>>) -> Slow {
        Slow {
            name,
            first: first.into(),
            then: Vec::new(),
            every: Duration::ZERO,
        }
    }

    fn then(mut self, parts: Vec<Vec<u8>>, every_ms: u64) -> Slow {
        self.then = parts;
        self.every = Duration::from_millis(every_ms);
        self
    }

    /// Connect and start sending; the read half, and the task that writes.
    async fn start(self, base: &str) -> (OwnedReadHalf, tokio::task::JoinHandle<()>) {
        let (r, mut w) = raw::connect(base).await.into_split();
        let writer = tokio::spawn(async move {
            if w.write_all(&self.first).await.is_err() {
                return;
            }
            for part in self.then.iter().cycle() {
                tokio::time::sleep(self.every).await;
                if w.write_all(part).await.is_err() {
                    return;
                }
            }
            // Dropping the write half would half-close the connection.
            std::future::pending::<()>().await;
        });
        (r, writer)
    }

    /// Whether the server closes the connection within [`PATIENCE`].
    async fn closed(self, base: &str) -> bool {
        let (mut r, writer) = self.start(base).await;
        let closed = raw::closed_within(&mut r, PATIENCE).await;
        writer.abort();
        closed
    }

    /// The server's answer, and whether it closed the connection after it.
    async fn answer(self, base: &str) -> (Option<RawResponse>, bool) {
        let (mut r, writer) = self.start(base).await;
        let answer = tokio::time::timeout(PATIENCE, raw::read_response(&mut r))
            .await
            .ok()
            .flatten();
        let closed = answer.is_some() && raw::closed_within(&mut r, PATIENCE).await;
        writer.abort();
        (answer, closed)
    }
}

fn bytes_of(text: &str) -> Vec<Vec<u8>> {
    text.bytes().map(|b| vec![b]).collect()
}

#[tokio::test]
async fn slow_headers_are_closed_after_header_read_timeout() {
    let home = home("  header_read_timeout: 1s\n  idle_timeout: 1h\n", None);
    let app = home.start().await;
    let base = app.base.clone();
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let h2_settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let h2_ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let line = || vec![b"X-Slow: a\r\n".to_vec()];
    let slow = [
        Slow::new("nothing at all", []),
        Slow::new("half a request line", b"GET /v1/mod"),
        Slow::new("a byte every 100 ms", []).then(
            bytes_of("GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaa\r\n"),
            100,
        ),
        Slow::new("a header line every 200 ms", b"GET /v1/models HTTP/1.1\r\n").then(line(), 200),
        Slow::new(
            "a header line every 900 ms",
            b"POST /v0/management/auths HTTP/1.1\r\n",
        )
        .then(line(), 900),
        Slow::new("an HTTP/2 preface and no request", h2_preface.clone()),
        Slow::new(
            "HTTP/2 pings and no request",
            [h2_preface, h2_settings.to_vec()].concat(),
        )
        .then(vec![h2_ping], 200),
    ];
    let mut tasks = Vec::new();
    for slow in slow {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            (slow.name, slow.closed(&base).await)
        }));
    }
    // The next request on a kept-alive connection gets its own header clock.
    tasks.push(tokio::spawn(async move {
        let mut s = raw::connect(&base).await;
        for _ in 0..3 {
            let r = raw::request(&mut s, "GET", "/v1/models", b"").await;
            assert_eq!(r.status, 200);
        }
        s.write_all(b"GET /v1/models HTTP/1.1\r\n").await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            while w.write_all(b"X-Slow: a\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let closed = raw::closed_within(&mut r, PATIENCE).await;
        writer.abort();
        ("a slow second request on a kept-alive connection", closed)
    }));
    for task in tasks {
        let (name, closed) = task.await.unwrap();
        assert!(closed, "{name}: still open after {PATIENCE:?}");
    }
    assert_eq!(app.get("/v1/models").await.status, 200);
    app.stop().await;
}

#[tokio::test]
async fn idle_kept_alive_connections_are_closed_after_idle_timeout() {
    let home = home("  header_read_timeout: 1h\n  idle_timeout: 1s\n", None);
    let app = home.start().await;
    let mut tasks = Vec::new();
    for (requests, path) in [
        (1, "/v1/models"),
        (5, "/v1/models"),
        (2, "/v0/management/auths"),
    ] {
        let base = app.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = raw::connect(&base).await;
            for _ in 0..requests {
                assert_eq!(raw::request(&mut s, "GET", path, b"").await.status, 200);
            }
            (requests, raw::closed_within(&mut s, PATIENCE).await)
        }));
    }
    for task in tasks {
        let (requests, closed) = task.await.unwrap();
        assert!(closed, "idle after {requests} request(s): still open");
    }
    app.stop().await;
}

#[tokio::test]
async fn requests_in_flight_outlast_the_idle_and_header_timeouts() {
    let mock = Mock::start().await;
    // Every pause of the mock is longer than all three timeouts: a slow provider is not a
    // client that does not read.
    mock.state.delay_ms.store(700, Ordering::Relaxed);
    let home = home(
        "  header_read_timeout: 500ms\n  idle_timeout: 500ms\n  write_timeout: 500ms\n",
        Some(&mock),
    );
    let app = home.start().await;
    let client = fresh_client();
    let post = |path: &str, body: &str| {
        client
            .post(format!("{}{path}", app.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let gemini = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let (streamed, streamed_h2, answered, listed) = tokio::join!(
        post(
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            gemini
        ),
        h2.post(format!("{}/v1/chat/completions", app.base))
            .header("content-type", "application/json")
            .body(r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#)
            .send(),
        post("/v1/chat/completions", CHAT),
        async {
            // A management call on a connection that idles in between.
            client
                .get(format!("{}/v0/management/auths", app.base))
                .send()
                .await
        },
    );
    let streamed = streamed.unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.expect("the whole stream");
    assert!(text.contains("tok2"), "the stream was cut: {text}");
    let streamed_h2 = streamed_h2.unwrap();
    assert_eq!(streamed_h2.version(), reqwest::Version::HTTP_2);
    let text = streamed_h2.text().await.expect("the whole HTTP/2 stream");
    assert!(text.contains("[DONE]"), "the HTTP/2 stream was cut: {text}");
    let answered = answered.unwrap();
    assert_eq!(answered.status(), 200);
    assert!(
        answered
            .text()
            .await
            .unwrap()
            .contains("hello from the mock")
    );
    assert_eq!(listed.unwrap().status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn slow_bodies_get_408_after_body_read_timeout_and_are_closed() {
    let home = home(
        "  body_read_timeout: 1s\n  header_read_timeout: 1h\n  idle_timeout: 1h\n",
        None,
    );
    let app = home.start().await;
    let with = |method: &str, path: &str, length: usize, sent: usize| {
        let mut bytes = raw::head(method, path, Some(length)).into_bytes();
        bytes.extend(std::iter::repeat_n(b' ', sent));
        bytes
    };
    let chat = "/v1/chat/completions";
    let slow = [
        Slow::new("1 byte announced, none sent", with("POST", chat, 1, 0)),
        Slow::new("31 MiB announced, none sent", with("POST", chat, 31 * MIB, 0)),
        Slow::new("half of 1000 bytes", with("POST", chat, 1000, 500)),
        Slow::new("1 MiB but its last byte", with("POST", chat, MIB, MIB - 1)),
        Slow::new("31 MiB a KiB at a time", with("POST", chat, 31 * MIB, 0))
            .then(vec![vec![b' '; 1024]], 100),
        Slow::new(
            "chunked, never ending",
            format!(
                "POST {chat} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\n"
            ),
        )
        .then(vec![b"1\r\n \r\n".to_vec()], 300),
        Slow::new(
            "a management body, half sent",
            with("POST", "/v0/management/auths", 100, 50),
        ),
        Slow::new(
            "an Anthropic body, a byte at a time",
            with("POST", "/v1/messages", 100, 0),
        )
        .then(vec![b" ".to_vec()], 200),
    ];
    let tasks: Vec<_> = slow
        .into_iter()
        .map(|slow| {
            let base = app.base.clone();
            tokio::spawn(async move { (slow.name, slow.answer(&base).await) })
        })
        .collect();
    for task in tasks {
        let (name, (answer, closed)) = task.await.unwrap();
        let answer = answer.unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(answer.status, 408, "{name}: {answer:?}");
        assert_eq!(answer.error_code(), "body_timeout", "{name}");
        assert!(closed, "{name}: the connection stayed open");
    }
    assert_eq!(app.get("/v1/models").await.status, 200);
    app.stop().await;
}

/// A connection holding `sent` bytes of a proxy body that announced `announced`.
async fn hold_body(base: &str, announced: usize, sent: usize) -> TcpStream {
    let mut s = raw::connect(base).await;
    s.write_all(raw::head("POST", "/v1/chat/completions", Some(announced)).as_bytes())
        .await
        .unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

/// Announce a body of `size` bytes to `path` with `Expect: 100-continue` and send none of it:
/// the answer if the server refuses it at once, `None` if it starts reading (hyper then sends
/// `100 Continue`; the connection is dropped, holding nothing).
async fn announce(base: &str, path: &str, size: usize) -> Option<RawResponse> {
    let mut s = raw::connect(base).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, raw::read_response(&mut s))
        .await
        .expect("either 100 Continue or a refusal")
        .expect("an answer");
    (answer.status != 100).then_some(answer)
}

/// Poll until a chat body of `size` bytes is refused for want of budget (the held bytes have
/// reached the server); that refusal.
async fn until_busy(base: &str, size: usize) -> RawResponse {
    eventually(PATIENCE, || async {
        announce(base, "/v1/chat/completions", size)
            .await
            .filter(|r| r.status == 503)
    })
    .await
}

/// Poll until a chat body of `size` bytes would be read, then send one; whether it was read
/// whole (and refused only for its model).
async fn read_whole_when_free(app: &impl Api, size: usize) -> bool {
    eventually(PATIENCE, || async {
        announce(app.base(), "/v1/chat/completions", size)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let r = app.post("/v1/chat/completions", &unrouted_of(size)).await;
    (r.status, r.error_code()) == (404, "unknown_model".to_string())
}

#[tokio::test]
async fn bodies_past_the_budget_get_503_and_the_budget_comes_back() {
    let mock = Mock::start().await;
    // 8 MiB: large proxy bodies (over 1 MiB) may fill 6, all proxy bodies 7, management 8.
    let home = home(
        "  max_buffered_bytes: 8MiB\n  body_read_timeout: 1m\n",
        Some(&mock),
    );
    let app = home.start().await;
    let base = app.base.clone();
    let large = 6 * MIB;

    // Never fits: 413 at once, whatever is free.
    for (path, size) in [
        ("/v1/chat/completions", large + 1),
        ("/v1/chat/completions", 32 * MIB + 1),
        // The largest length hyper passes on (it refuses the two above with 431 itself).
        ("/v1/chat/completions", usize::MAX - 2),
        ("/v0/management/auths", MIB + 1),
    ] {
        let r = announce(&base, path, size).await.expect("refused at once");
        assert_eq!(
            (r.status, r.error_code()),
            (413, "body_too_large".into()),
            "{size}"
        );
    }

    // Bytes count as they arrive: a client announcing the whole large share but sending 1 MiB
    // holds 1 MiB, not 6.
    let holder = hold_body(&base, large, MIB).await;
    until_busy(&base, large - MIB + 1).await;
    assert!(
        read_whole_when_free(&app, large - MIB).await,
        "exactly what is left"
    );
    drop(holder);
    assert!(read_whole_when_free(&app, large).await);

    for (count, size) in [(1, large), (2, large / 2), (5, large / 5)] {
        // Each holder sends all but the last byte; the last holder takes what integer
        // division left over.
        let mut holders = Vec::new();
        for i in 0..count {
            let size = if i == count - 1 {
                large - size * (count - 1)
            } else {
                size
            };
            holders.push(hold_body(&base, size, size - 1).await);
        }
        let r = until_busy(&base, MIB + 1).await;
        assert_eq!(r.error_code(), "server_busy", "{count} x {size}");
        let retry_after = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
        assert!(
            retry_after.is_some_and(|s| s >= 1),
            "503 needs a Retry-After"
        );

        // Large bodies cannot crowd out small ones, nor proxy bodies management.
        let r = app.post("/v1/chat/completions", CHAT).await;
        assert_eq!(r.status, 200, "{count} x {size}: {}", r.text);
        assert_eq!(app.get("/v0/management/auths").await.status, 200);
        let small_holder = hold_body(&base, MIB, MIB - 1).await;
        until_busy(&base, CHAT.len()).await;
        let padded = format!(r#"{{"limit": 1000000}}{}"#, " ".repeat(MIB / 2));
        let r = app.put("/v0/management/auths/openai/quota", &padded).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = app
            .post(
                "/v0/management/auths",
                r#"{"provider": "claude", "type": "api_key", "token": "sk-ant-limits"}"#,
            )
            .await;
        assert!(r.status == 201 || r.status == 409, "{}", r.text);

        // Given back when the holders go: the whole large share fits again (a byte still
        // held would not let it).
        drop(holders);
        drop(small_holder);
        assert!(read_whole_when_free(&app, large).await, "{count} x {size}");
    }
    app.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_with_the_peer_address() {
    let home = home("  idle_timeout: 1s\n", None);
    let app = home.start().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        // The loopback rule needs the peer address: without it, 403.
        let r = client
            .get(format!("{}/v1/models", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
    }
    app.stop().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let mock = Mock::start().await;
    mock.state.delay_ms.store(500, Ordering::Relaxed);
    let home = home("", Some(&mock));
    let app = home.start().await;
    let (base, client) = (app.base.clone(), app.client.clone());
    let in_flight = tokio::spawn(async move {
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(CHAT)
            .send()
            .await
    });
    eventually(PATIENCE, || async {
        (!mock.state.seen_headers.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // Connections with nothing in flight do not hold the stop up: a kept-alive one, one in
    // the middle of its headers, one that sent nothing.
    let mut idle = raw::connect(&app.base).await;
    assert_eq!(
        raw::request(&mut idle, "GET", "/v1/models", b"")
            .await
            .status,
        200
    );
    let mut heading = raw::connect(&app.base).await;
    heading
        .write_all(b"GET /v1/models HTTP/1.1\r\n")
        .await
        .unwrap();
    let silent = raw::connect(&app.base).await;
    let base = app.base.clone();
    tokio::time::timeout(PATIENCE, app.stop())
        .await
        .expect("the server stops");
    drop((idle, heading, silent));
    let answered = in_flight.await.unwrap().expect("answered");
    assert_eq!(answered.status(), 200);
    assert!(
        tokio::net::TcpStream::connect(raw::addr(&base))
            .await
            .is_err()
    );
}

/// At the cap, when the connection to close is the new one itself (parked at its address's
/// share), it is closed and the server goes on accepting: a connection that becomes idle
/// afterwards still makes room for the next client.
#[tokio::test]
async fn a_new_connection_closed_for_room_does_not_stall_accepting() {
    let home = home(
        "  max_connections: 2\n  max_connections_per_address: 1\n  body_read_timeout: 1h\n  header_read_timeout: 1h\n  idle_timeout: 1h\n  shutdown_timeout: 1s\n",
        None,
    );
    let app = home.start().await;
    // 127.0.0.2's share is taken by a request in flight for an hour.
    let _busy = busy_from(&app.base, "127.0.0.2").await;
    // 127.0.0.3: one request answered, then idle, so the server takes the cap's next
    // connection meaning to close this one for it...
    let mut x = raw::connect_from(&app.base, "127.0.0.3").await;
    assert_eq!(
        raw::request(&mut x, "GET", "/v1/models", b"").await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...but it starts a second request, whose body is still coming, before that one comes.
    x.write_all(raw::head("POST", "/v1/chat/completions", Some(100)).as_bytes())
        .await
        .unwrap();
    x.write_all(b"{").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second connection from 127.0.0.2: parked, and the only one that could make room.
    let mut parked = raw::connect_from(&app.base, "127.0.0.2").await;
    assert!(raw::closed_within(&mut parked, Duration::from_secs(10)).await);
    // 127.0.0.3's request ends: its connection is idle, so the next client gets in.
    x.write_all(&[b' '; 99]).await.unwrap();
    raw::read_response(&mut x).await.expect("answered");
    let normal = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = raw::connect_from(&app.base, "127.0.0.4").await;
        raw::request(&mut s, "GET", "/v1/models", b"").await
    })
    .await
    .expect("a new client is served while an idle connection can make room");
    assert_eq!(normal.status, 200);
    app.stop().await;
}
