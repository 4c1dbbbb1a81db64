//! Clients that hold a connection by not taking their responses (README, Security, Limits):
//! the write deadline (HTTP/1.1, and HTTP/2 with a flow-control window of 0), HTTP/2 pings
//! that go unanswered, and the cap on a graceful stop; beside the clients that must not be
//! cut: a slow provider's stream, and a client that reads slowly but steadily.
//!
//! Each stalled client sits in a slot of a server with a small `max_connections` whose other
//! deadlines are an hour away: a normal client is then answered only once the stalled ones
//! are closed by the deadline under test.

use crate::common::{Api, Home, TestApp, eventually};
use crate::mock::Mock;
use crate::raw;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longer than any deadline these tests set, by far.
const PATIENCE: Duration = Duration::from_secs(15);
/// The size of the one large event of a "huge" stream: far more than the kernel's buffers.
const HUGE: usize = 8 << 20;
const CLAUDE: &str = r#"{"model":"claude-3-5-haiku-20241022","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

/// A streamed chat body for a model whose one large content event is `n` bytes.
fn huge_stream(n: usize) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini-huge-{n}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// A home with `server:` lines, openai served by `fast` and claude by `slow` (each with a
/// credential).
fn home(server: &str, fast: &Mock, slow: &Mock) -> Home {
    let home = Home::new(&format!(
        "server:\n{server}providers:\n  openai: {{ base_url: \"{}/v1\" }}\n  claude: {{ base_url: \"{}\" }}\n",
        fast.base, slow.base
    ));
    for provider in ["openai", "claude"] {
        home.auth_file(
            &format!("{provider}.json"),
            format!(
                r#"{{"provider": "{provider}", "type": "api_key", "token": "sk-stalls-{provider}"}}"#
            ),
        );
    }
    home
}

/// The ways a client can take a response's head and then nothing more.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// HTTP/1.1: a long stream, never read past its head.
    H1Stream,
    /// HTTP/2 with a window of 0: a 404's small JSON body.
    H2NotFound,
    /// HTTP/2 with a window of 0: a management list.
    H2List,
    /// HTTP/2 with a window of 0: a long stream.
    H2Stream,
}

const STALLS: [Stall; 4] = [
    Stall::H2NotFound,
    Stall::H1Stream,
    Stall::H2Stream,
    Stall::H2List,
];

/// A stalled client, holding its connection open.
enum Stalled {
    H1(tokio::net::TcpStream),
    H2 {
        _response: hyper::Response<h2::RecvStream>,
        _client: h2::client::SendRequest<bytes::Bytes>,
        connection: tokio::task::JoinHandle<()>,
    },
}

impl Stall {
    /// Open the connection, send the request, and return once the response's head came.
    async fn start(self, base: &str) -> Stalled {
        if let Stall::H1Stream = self {
            let mut s = raw::connect(base).await;
            let body = huge_stream(HUGE);
            s.write_all(raw::head("POST", "/v1/chat/completions", Some(body.len())).as_bytes())
                .await
                .unwrap();
            s.write_all(body.as_bytes()).await.unwrap();
            let (head, _) = raw::read_head(&mut s).await.expect("a response head");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            return Stalled::H1(s);
        }
        let (mut client, connection) = raw::h2_client(raw::connect(base).await, 0).await;
        let (method, path, body, status) = match self {
            Stall::H2NotFound => ("GET", "/nowhere", String::new(), 404),
            Stall::H2List => ("GET", "/v0/management/auths", String::new(), 200),
            _ => ("POST", "/v1/chat/completions", huge_stream(HUGE), 200),
        };
        let response = raw::h2_request(&mut client, base, method, path, &body).await;
        assert_eq!(response.status(), status, "{self:?}");
        Stalled::H2 {
            _response: response,
            _client: client,
            connection,
        }
    }
}

impl Stalled {
    /// Whether the server closed the connection (within [`PATIENCE`]) before the response
    /// was whole.
    async fn cut(self) -> bool {
        match self {
            Stalled::H1(mut s) => raw::read_to_end(&mut s, PATIENCE)
                .await
                .is_some_and(|rest| !String::from_utf8_lossy(&rest).contains("[DONE]")),
            Stalled::H2 { connection, .. } => {
                tokio::time::timeout(PATIENCE, connection).await.is_ok()
            }
        }
    }
}

/// A client that takes a slot and keeps it: a body announced with `Expect: 100-continue` and
/// never sent. Returns once the server has started reading it (`100 Continue`).
async fn take_a_slot(base: &str) -> tokio::net::TcpStream {
    let mut s = raw::connect(base).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\
                Expect: 100-continue\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, raw::read_response(&mut s))
        .await
        .expect("a slot is freed for it")
        .expect("an answer");
    assert_eq!(answer.status, 100);
    s
}

/// A normal client's call, on a connection of its own; panics if not answered in time.
async fn normal_call(app: &TestApp) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = tokio::time::timeout(
        PATIENCE,
        client.get(format!("{}/v1/models", app.base)).send(),
    )
    .await
    .expect("a normal client is answered once the stalled connections are closed")
    .expect("answered");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn responses_the_client_does_not_take_are_cut_after_write_timeout() {
    let (fast, slow) = (Mock::start().await, Mock::start().await);
    for (cap, write) in [(1, "200ms"), (4, "1s")] {
        let home = home(
            &format!(
                "  max_connections: {cap}\n  write_timeout: {write}\n  header_read_timeout: 1h\n  \
                 idle_timeout: 1h\n"
            ),
            &fast,
            &slow,
        );
        let app = home.start().await;
        let mut stalled = Vec::new();
        for kind in STALLS.iter().cycle().take(cap) {
            stalled.push((kind, kind.start(&app.base).await));
        }
        // Every slot is held by a response in flight: only the write deadline frees one.
        normal_call(&app).await;
        // Each stalled connection's slot goes to a client that keeps it: once all have one,
        // every stalled connection was closed (reading one before would let it go on).
        let mut kept = Vec::new();
        for _ in 0..cap {
            kept.push(take_a_slot(&app.base).await);
        }
        for (kind, s) in stalled {
            assert!(s.cut().await, "cap {cap}, {write}: {kind:?} not cut");
        }
        drop(kept);
        app.stop().await;
    }
}

#[tokio::test]
async fn a_stopping_server_drops_what_is_still_in_flight_after_shutdown_timeout() {
    let (fast, slow) = (Mock::start().await, Mock::start().await);
    // Far longer than the test: the request waits on its upstream until it is dropped.
    slow.state.delay_ms.store(3_600_000, Ordering::Relaxed);
    for stop in ["1ms", "1s"] {
        let home = home(
            &format!(
                "  shutdown_timeout: {stop}\n  write_timeout: 1h\n  header_read_timeout: 1h\n  \
                 idle_timeout: 1h\n"
            ),
            &fast,
            &slow,
        );
        let app = home.start().await;
        let mut stalled = Vec::new();
        for kind in STALLS {
            stalled.push((kind, kind.start(&app.base).await));
        }
        let seen = slow.state.seen_headers.lock().unwrap().len();
        let (base, client) = (app.base.clone(), app.client.clone());
        let waiting = tokio::spawn(async move {
            client
                .post(format!("{base}/v1/messages"))
                .header("content-type", "application/json")
                .body(CLAUDE)
                .send()
                .await
        });
        eventually(PATIENCE, || async {
            (slow.state.seen_headers.lock().unwrap().len() > seen).then_some(())
        })
        .await;
        tokio::time::timeout(PATIENCE, app.stop())
            .await
            .unwrap_or_else(|_| panic!("shutdown_timeout {stop}: the server did not stop"));
        for (kind, s) in stalled {
            assert!(s.cut().await, "{stop}: {kind:?} still open after the stop");
        }
        let waited = tokio::time::timeout(PATIENCE, waiting)
            .await
            .expect("the waiting request ends with the stop")
            .unwrap();
        assert!(waited.is_err(), "{stop}: {waited:?}");
        // The store closed cleanly: the same home starts again, lock and database free.
        let again = home.start().await;
        assert_eq!(again.get("/v1/models").await.status, 200);
        again.stop().await;
    }
}

#[tokio::test]
async fn http2_clients_that_do_not_answer_pings_are_closed() {
    let (fast, slow) = (Mock::start().await, Mock::start().await);
    // A second or more, so a busy test thread never misses a pong by more than the deadline.
    for write in [1000u64, 1500] {
        // The mute client's request is never answered (claude, on `slow`), so only the ping
        // deadline can free its slot; the live client's waits several ping rounds on its
        // upstream (openai, on `fast`) and is answered.
        slow.state.delay_ms.store(3_600_000, Ordering::Relaxed);
        fast.state.delay_ms.store(4 * write, Ordering::Relaxed);
        let home = home(
            &format!(
                "  max_connections: 2\n  write_timeout: {write}ms\n  header_read_timeout: 1h\n  \
                 idle_timeout: 1h\n"
            ),
            &fast,
            &slow,
        );
        let app = home.start().await;
        let seen = slow.state.seen_headers.lock().unwrap().len();
        // A client whose connection stops answering once its request is upstream.
        let (mut mute, connection) = {
            let stream = raw::connect(&app.base).await;
            let (client, connection) = h2::client::Builder::new()
                .handshake::<_, bytes::Bytes>(stream)
                .await
                .unwrap();
            (client, connection)
        };
        let (pause, paused) = tokio::sync::oneshot::channel::<()>();
        let held = tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                _ = paused => std::future::pending::<()>().await,
            }
        });
        let base = app.base.clone();
        let asked = tokio::spawn(async move {
            raw::h2_request(&mut mute, &base, "POST", "/v1/messages", CLAUDE).await
        });
        eventually(PATIENCE, || async {
            (slow.state.seen_headers.lock().unwrap().len() > seen).then_some(())
        })
        .await;
        pause.send(()).unwrap();
        // A live client waits on a slow upstream too, answering pings.
        let seen = fast.state.seen_headers.lock().unwrap().len();
        let (mut live, _live_connection) =
            raw::h2_client(raw::connect(&app.base).await, 65_535).await;
        let base = app.base.clone();
        let answered = tokio::spawn(async move {
            let r = raw::h2_request(&mut live, &base, "POST", "/v1/chat/completions", CHAT).await;
            let status = r.status();
            let mut body = r.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("the whole body");
                let _ = body.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            // Kept: dropping the last handle would let the client close its connection, and
            // free its slot, before the mute one is closed.
            (status, String::from_utf8_lossy(&text).into_owned(), live)
        });
        // Both slots are busy (the live one's request upstream, so it is not evicted as a
        // connection still waiting for its request): the normal client gets in once the mute
        // one is closed.
        eventually(PATIENCE, || async {
            (fast.state.seen_headers.lock().unwrap().len() > seen).then_some(())
        })
        .await;
        normal_call(&app).await;
        let (status, text, _live) = tokio::time::timeout(PATIENCE, answered)
            .await
            .expect("the live client is answered")
            .unwrap();
        assert_eq!(status, 200, "{write}ms: {text}");
        held.abort();
        asked.abort();
        app.stop().await;
    }
}

/// Read a long HTTP/1.1 stream `block` bytes at a time, pausing `every` between reads; the
/// whole response.
async fn read_slowly_h1(base: &str, size: usize, block: usize, every: Duration) -> String {
    let mut s = raw::connect(base).await;
    let body = huge_stream(size);
    s.write_all(raw::head("POST", "/v1/chat/completions", Some(body.len())).as_bytes())
        .await
        .unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; block];
    loop {
        tokio::time::sleep(every).await;
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
        // The chunked body's last chunk: the response is whole.
        if all.ends_with(b"0\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// The same over HTTP/2, giving the server `block` bytes of window every `every`.
async fn read_slowly_h2(base: &str, size: usize, block: u32, every: Duration) -> String {
    let (mut client, _connection) = raw::h2_client(raw::connect(base).await, block).await;
    let body = huge_stream(size);
    let response = raw::h2_request(&mut client, base, "POST", "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        all.extend_from_slice(&chunk);
        tokio::time::sleep(every.mul_f64(chunk.len() as f64 / f64::from(block))).await;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn clients_that_read_slowly_but_steadily_are_not_cut() {
    let (fast, slow) = (Mock::start().await, Mock::start().await);
    let home = home(
        "  write_timeout: 1s\n  header_read_timeout: 1h\n  idle_timeout: 1h\n",
        &fast,
        &slow,
    );
    let app = home.start().await;
    let size = 2 << 20;
    // About 1 MB/s and 0.5 MB/s, far slower than the server sends, for several times
    // `write_timeout`: the socket is full nearly all along, yet takes bytes steadily.
    let readers = [
        ("HTTP/1.1, 64 KiB every 60 ms", 64 << 10, 60),
        ("HTTP/1.1, 16 KiB every 30 ms", 16 << 10, 30),
        ("HTTP/2, 64 KiB of window every 60 ms", 64 << 10, 60),
        ("HTTP/2, 16 KiB of window every 30 ms", 16 << 10, 30),
    ];
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|(name, block, every)| {
            let base = app.base.clone();
            let every = Duration::from_millis(every);
            tokio::spawn(async move {
                let text = if name.starts_with("HTTP/2") {
                    read_slowly_h2(&base, size, block as u32, every).await
                } else {
                    read_slowly_h1(&base, size, block, every).await
                };
                (name, text)
            })
        })
        .collect();
    for task in tasks {
        let (name, text) = task.await.unwrap();
        assert!(
            text.len() > size && text.contains("[DONE]"),
            "{name}: cut after {} bytes",
            text.len()
        );
    }
    app.stop().await;
}

/// An HTTP/2 client with a window of 0 that keeps the connection busy with its own PINGs (each
/// answered with a PING ACK, bytes leaving the socket) or with a trickle of window still has its
/// stalled responses cut at the write deadline: only a response taking its next chunk counts as
/// its progress.
#[tokio::test]
async fn pings_and_trickles_do_not_keep_a_stalled_http2_response_alive() {
    let (fast, slow) = (Mock::start().await, Mock::start().await);
    for (streams, ping_every, trickle) in [
        (1, Duration::from_millis(100), false),
        (4, Duration::from_millis(150), false),
        (4, Duration::from_millis(150), true),
    ] {
        let home = home(
            "  max_connections: 1\n  write_timeout: 500ms\n  header_read_timeout: 1h\n  idle_timeout: 1h\n",
            &fast,
            &slow,
        );
        let app = home.start().await;
        let stream = raw::connect(&app.base).await;
        let (mut client, mut connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(stream)
            .await
            .unwrap();
        let mut pings = connection.ping_pong().expect("ping_pong");
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = closed.clone();
        let conn_task = tokio::spawn(async move {
            let _ = connection.await;
            seen.store(true, Ordering::SeqCst);
        });
        let mut responses = Vec::new();
        for _ in 0..streams {
            responses.push(raw::h2_request(&mut client, &app.base, "GET", "/nowhere", "").await);
        }
        let mut bodies: Vec<h2::RecvStream> =
            responses.into_iter().map(|r| r.into_body()).collect();
        let ping_task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ping_every).await;
                if trickle {
                    // One byte of window for each stream: a response that never finishes.
                    for body in &mut bodies {
                        let _ = body.flow_control().release_capacity(1);
                    }
                }
                if pings.ping(h2::Ping::opaque()).await.is_err() {
                    break;
                }
            }
        });
        eventually(PATIENCE, || async {
            closed.load(Ordering::SeqCst).then_some(())
        })
        .await;
        ping_task.abort();
        conn_task.abort();
        // The slot is free: a normal client is answered.
        let r = reqwest::Client::new()
            .get(format!("{}/v1/models", app.base))
            .timeout(PATIENCE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{streams} streams, trickle {trickle}");
        app.stop().await;
    }
}
