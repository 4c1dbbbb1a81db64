//! The request path's HTTP client: calls to the providers.
//!
//! Calls go through hyper's pooled client over rustls, set up as reqwest sets it up (aws-lc-rs,
//! the platform's certificate verifier, ALPN `h2` then `http/1.1`, TCP_NODELAY, keep-alive
//! probes every 15 s given up after 3, a 30 s connect timeout, no redirects, and up to two
//! retries when an HTTP/2 server shuts a connection down gracefully or refuses a stream).
//! reqwest's own layers on top of it (URL re-parsing, the redirect policy, the proxy lookup,
//! its timeout futures) cost a fifth of cliproxyapi's instructions per request, and on the
//! 2-core machine an axum server forwarding through hyper's client did 29-33k requests/s
//! against 19-22k through reqwest (bench/README.md). A destination that the environment's
//! proxy variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`) send through a proxy
//! still goes through reqwest, which speaks to proxies. Either way one deadline,
//! `proxy.request_timeout`, covers the whole exchange, the answer's body included.

use axum::http::uri::Scheme;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How long opening a connection to a provider may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keep-alive on provider connections: idle time and interval of the probes, and how many
/// go unanswered before the connection is dropped (reqwest's defaults).
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 3;
/// Retries after an HTTP/2 graceful shutdown (on a new connection) or a refused stream.
const H2_RETRIES: usize = 2;

/// What kept a call from its answer, as a client may be told it: a fixed phrase per kind,
/// never a URL, a header or a library's own text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The deadline (`proxy.request_timeout`, or the connect timeout) passed first.
    TimedOut,
    /// Nothing listens at the provider's address.
    Refused,
    /// The provider's host name does not resolve.
    Dns,
    /// The TLS handshake failed (an untrusted certificate, or not TLS at all).
    Tls,
    /// The connection was closed or reset before the answer came.
    Closed,
    Other,
}

impl Cause {
    pub fn describe(self) -> &'static str {
        match self {
            Cause::TimedOut => "timed out",
            Cause::Refused => "connection refused",
            Cause::Dns => "its host name does not resolve (DNS)",
            Cause::Tls => "the TLS handshake failed",
            Cause::Closed => "the connection was closed before an answer",
            Cause::Other => "the connection failed",
        }
    }

    /// The cause named by an error's chain: the first timeout, refusal, TLS or DNS failure
    /// in it, else a closed connection, else other.
    fn of(error: &(dyn std::error::Error + 'static)) -> Cause {
        let mut found = Cause::Other;
        let mut cause = Some(error);
        while let Some(c) = cause {
            // An I/O error's `source` skips the error it wraps, and hyper-rustls reports a
            // failed handshake as an I/O error around tokio-rustls's around rustls's: look
            // into those here.
            let mut wrapped = Some(c);
            while let Some(w) = wrapped {
                match Cause::of_one(w) {
                    Some(Cause::Closed) => found = Cause::Closed,
                    Some(decided) => return decided,
                    None => {}
                }
                wrapped = w
                    .downcast_ref::<std::io::Error>()
                    .and_then(|e| e.get_ref())
                    .map(|e| e as &(dyn std::error::Error + 'static));
            }
            cause = c.source();
        }
        found
    }

    /// What one error of a chain says, if anything.
    fn of_one(e: &(dyn std::error::Error + 'static)) -> Option<Cause> {
        use std::io::ErrorKind;
        if e.is::<rustls::Error>() {
            return Some(Cause::Tls);
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            return match e.kind() {
                ErrorKind::TimedOut => Some(Cause::TimedOut),
                ErrorKind::ConnectionRefused => Some(Cause::Refused),
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => Some(Cause::Closed),
                _ => None,
            };
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_closed() || e.is_incomplete_message() || e.is_canceled())
        {
            return Some(Cause::Closed);
        }
        // hyper-util's connector names a failed lookup only in its text (its error type is
        // private); the text is the library's own, never a host name.
        (e.to_string() == "dns error").then_some(Cause::Dns)
    }
}

/// Why a call failed before or while its answer arrived. Its text names no URL and no header.
#[derive(Debug)]
pub struct UpstreamError {
    cause: Cause,
    message: String,
}

impl UpstreamError {
    fn timed_out() -> Self {
        UpstreamError {
            cause: Cause::TimedOut,
            message: "the request timed out".into(),
        }
    }

    fn new(error: &(dyn std::error::Error + 'static)) -> Self {
        // The chain of causes, as reqwest's errors print them ("client error (Connect): tcp
        // connect error: Connection refused").
        let mut message = error.to_string();
        let mut cause = error.source();
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        UpstreamError {
            cause: Cause::of(error),
            message,
        }
    }

    pub fn other(message: impl Into<String>) -> Self {
        UpstreamError {
            cause: Cause::Other,
            message: message.into(),
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.cause == Cause::TimedOut
    }

    pub fn cause(&self) -> Cause {
        self.cause
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UpstreamError {}

fn from_reqwest(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        return UpstreamError::timed_out();
    }
    UpstreamError::new(&e.without_url())
}

type AnswerBody = UnsyncBoxBody<Bytes, UpstreamError>;

/// A provider's answer: status and headers, and a body that must arrive by the deadline.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: AnswerStream,
}

impl Answer {
    fn new(parts: axum::http::response::Parts, body: AnswerBody, deadline: Instant) -> Answer {
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: AnswerStream {
                body,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
            },
        }
    }

    /// At most `limit` bytes of the body.
    pub async fn read_limited(self, limit: usize) -> Result<Bytes, UpstreamError> {
        use futures_util::StreamExt;
        let mut body = self.body;
        // Most answers come in one chunk: it is kept as it is, and only a second one is
        // copied after it.
        let mut first = Bytes::new();
        let mut joined = bytes::BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            let len = if joined.is_empty() {
                first.len()
            } else {
                joined.len()
            };
            let chunk = chunk.slice(..chunk.len().min(limit - len));
            let total = len + chunk.len();
            if len == 0 {
                first = chunk;
            } else {
                if joined.is_empty() {
                    joined.extend_from_slice(&first);
                }
                joined.extend_from_slice(&chunk);
            }
            if total >= limit {
                break;
            }
        }
        Ok(if joined.is_empty() {
            first
        } else {
            joined.freeze()
        })
    }

    /// The body as it arrives.
    pub fn into_stream(self) -> AnswerStream {
        self.body
    }
}

/// An answer's body, chunk by chunk, failing with a timeout once the deadline passes.
pub struct AnswerStream {
    body: AnswerBody,
    deadline: Pin<Box<Sleep>>,
}

impl Stream for AnswerStream {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(UpstreamError::timed_out())));
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    // Trailers: nothing to pass on.
                }
            }
        }
    }
}

/// The request path's client; clones share the connection pools.
#[derive(Clone)]
pub struct Upstream {
    direct: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// For destinations the environment sends through a proxy.
    proxied: reqwest::Client,
    /// `None` when no proxy variable is set, so nothing is looked up per request.
    proxies: Option<std::sync::Arc<Matcher>>,
    timeout: Duration,
}

impl Upstream {
    /// A client whose every exchange must end within `timeout`.
    pub fn new(timeout: Duration) -> Result<Upstream, String> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| format!("cannot load the platform's certificate verifier: {e}"))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(KEEPALIVE));
        http.set_keepalive_interval(Some(KEEPALIVE));
        http.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let direct = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(HttpsConnector::from((http, tls)));
        let proxied = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let any_proxy = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some() || std::env::var_os(v.to_lowercase()).is_some());
        Ok(Upstream {
            direct,
            proxied,
            proxies: any_proxy.then(|| std::sync::Arc::new(Matcher::from_env())),
            timeout,
        })
    }

    /// POST `body` to `target` with `headers`, and wait for the answer's status and headers.
    /// It runs in the request path's span (provider, credential, attempt), not one of its own:
    /// instrumenting this future would copy it once more per request.
    pub async fn post(
        &self,
        target: &Target,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let deadline = Instant::now() + self.timeout;
        if self
            .proxies
            .as_ref()
            .is_some_and(|m| m.intercept(&target.uri).is_some())
        {
            return self
                .post_proxied(&target.url, headers, body, deadline)
                .await;
        }
        // Only a TLS connection can turn out to be HTTP/2, whose shutdowns are retried: keep
        // what a retry needs only then.
        let retry = (target.uri.scheme() == Some(&Scheme::HTTPS)).then(|| headers.clone());
        let request = |headers: HeaderMap| {
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = Method::POST;
            *request.uri_mut() = target.uri.clone();
            *request.headers_mut() = headers;
            request
        };
        let mut next = request(headers);
        let mut retries = 0;
        let response = loop {
            let sent = tokio::time::timeout_at(deadline, self.direct.request(next)).await;
            match sent {
                Err(_) => return Err(UpstreamError::timed_out()),
                Ok(Ok(r)) => break r,
                Ok(Err(e)) => match &retry {
                    Some(headers) if retries < H2_RETRIES && refused_by_h2(&e) => {
                        retries += 1;
                        next = request(headers.clone());
                    }
                    _ => return Err(UpstreamError::new(&e)),
                },
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.map_err(|e| UpstreamError::new(&e)).boxed_unsync();
        Ok(Answer::new(parts, body, deadline))
    }

    async fn post_proxied(
        &self,
        url: &reqwest::Url,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let response = self
            .proxied
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(from_reqwest)?;
        let response: axum::http::Response<reqwest::Body> = response.into();
        let (parts, body) = response.into_parts();
        Ok(Answer::new(
            parts,
            body.map_err(from_reqwest).boxed_unsync(),
            deadline,
        ))
    }
}

/// A request that an HTTP/2 server turned away unprocessed, so it may be sent again:
/// a graceful shutdown (GOAWAY with NO_ERROR) or a refused stream, as reqwest retries them.
fn refused_by_h2(error: &hyper_util::client::legacy::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        if let Some(e) = c.downcast_ref::<h2::Error>() {
            return e.is_remote()
                && ((e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
                    || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        cause = c.source();
    }
    false
}

/// Where a call goes: the URL, and the same as the URI hyper sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    url: reqwest::Url,
    uri: Uri,
}

impl Target {
    /// `None` for a URL that HTTP cannot carry (a path over 64 KB, say).
    pub fn new(url: reqwest::Url) -> Option<Target> {
        let uri = url.as_str().parse().ok()?;
        Some(Target { url, uri })
    }
}

/// The header that carries `token` for a provider, marked sensitive (never logged by hyper).
pub fn credential_value(prefix: &str, token: &str) -> Result<HeaderValue, UpstreamError> {
    // The joined text is a copy of the token: wiped once the header holds its own.
    let text = zeroize::Zeroizing::new(format!("{prefix}{token}"));
    let mut value = HeaderValue::from_str(&text).map_err(|_| {
        UpstreamError::other("the credential holds characters a header cannot carry")
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(chunks: Vec<&'static str>) -> Answer {
        let frames = chunks.into_iter().map(|c| {
            Ok::<_, UpstreamError>(hyper::body::Frame::data(Bytes::from_static(c.as_bytes())))
        });
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let parts = axum::http::Response::new(()).into_parts().0;
        Answer::new(
            parts,
            body.boxed_unsync(),
            Instant::now() + Duration::from_secs(60),
        )
    }

    async fn read(chunks: &[&'static str], limit: usize) -> String {
        let bytes = answer(chunks.to_vec()).read_limited(limit).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// A local address whose server does `serve` with each connection it accepts.
    async fn server<F, Fut>(serve: F) -> std::net::SocketAddr
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn));
            }
        });
        addr
    }

    async fn cause_of(url: &str, timeout: Duration) -> (Cause, String) {
        let upstream = Upstream::new(timeout).unwrap();
        let target = Target::new(reqwest::Url::parse(url).unwrap()).unwrap();
        match upstream.post(&target, HeaderMap::new(), Bytes::new()).await {
            Ok(a) => panic!("{url}: answered {}", a.status),
            Err(e) => (e.cause(), e.to_string()),
        }
    }

    /// Each way a provider can fail to answer is told apart, by the error's chain, and its
    /// text names no URL.
    #[tokio::test]
    async fn causes_are_told_apart() {
        let long = Duration::from_secs(30);
        // Nothing listens: refused.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = gone.local_addr().unwrap().port();
        drop(gone);
        for scheme in ["http", "https"] {
            let url = format!("{scheme}://127.0.0.1:{port}/v1/x?key=secret");
            let (cause, text) = cause_of(&url, long).await;
            assert_eq!(cause, Cause::Refused, "{text}");
            assert!(!text.contains("secret") && !text.contains("/v1"), "{text}");
        }
        // Accepted, never answered: timed out at the deadline.
        let silent = server(|conn| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(conn);
        })
        .await;
        for scheme in ["http", "https"] {
            let url = format!("{scheme}://{silent}/x");
            let (cause, text) = cause_of(&url, Duration::from_millis(200)).await;
            assert_eq!(cause, Cause::TimedOut, "{scheme}: {text}");
        }
        // Accepted and closed at once, or after reading the request: closed.
        let closing = server(|conn| async move { drop(conn) }).await;
        let (cause, text) = cause_of(&format!("http://{closing}/x"), long).await;
        assert_eq!(cause, Cause::Closed, "{text}");
        let reading = server(|mut conn| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
        })
        .await;
        let (cause, text) = cause_of(&format!("http://{reading}/x"), long).await;
        assert_eq!(cause, Cause::Closed, "{text}");
        // TLS to a server that does not speak it, or that closes during the handshake.
        let plain = server(|mut conn| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
        .await;
        let (cause, text) = cause_of(&format!("https://{plain}/x"), long).await;
        assert_eq!(cause, Cause::Tls, "{text}");
        let (cause, text) = cause_of(&format!("https://{reading}/x"), long).await;
        assert!(matches!(cause, Cause::Tls | Cause::Closed), "{text}");
        // Every cause reads as a fixed phrase.
        for cause in [
            Cause::TimedOut,
            Cause::Refused,
            Cause::Dns,
            Cause::Tls,
            Cause::Closed,
            Cause::Other,
        ] {
            assert!(!cause.describe().is_empty());
        }
    }

    #[tokio::test]
    async fn read_limited_joins_chunks_and_stops_at_the_limit() {
        assert_eq!(read(&["hello"], 100).await, "hello");
        assert_eq!(read(&["hel", "lo", " world"], 100).await, "hello world");
        assert_eq!(read(&["hel", "lo", " world"], 4).await, "hell");
        assert_eq!(read(&["hello"], 2).await, "he");
        assert_eq!(read(&["", "ab"], 5).await, "ab");
        assert_eq!(read(&[], 5).await, "");
    }
}
