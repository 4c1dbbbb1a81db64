//! HTTP/1.1 by hand over TCP, for the tests that must control every byte and every pause:
//! held connections, slow headers, slow bodies.

use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://")
        .parse()
        .expect("a base URL of an address")
}

pub async fn connect(base: &str) -> TcpStream {
    TcpStream::connect(addr(base)).await.expect("connects")
}

/// A request head; `length` is the Content-Length announced, if any.
pub fn head(method: &str, path: &str, length: Option<usize>) -> String {
    let length = length
        .map(|n| format!("Content-Length: {n}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{length}\r\n"
    )
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of our error shape, checking the shape on the way.
    pub fn error_code(&self) -> String {
        let v = self.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "not our error shape: {v}"
        );
        v["error"]["code"].as_str().expect("error code").to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Read one response whose body has a Content-Length; `None` if the connection ends first.
pub async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut body = buf[end..].to_vec();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    response.body = body;
    Some(response)
}

/// Send a whole request and read its answer.
pub async fn request(stream: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> RawResponse {
    let length = (method != "GET").then_some(body.len());
    stream
        .write_all(head(method, path, length).as_bytes())
        .await
        .unwrap();
    stream.write_all(body).await.unwrap();
    read_response(stream).await.expect("an answer")
}

/// Whether the server closes (or resets) the connection within `within`; what it sends
/// before that is read and dropped.
pub async fn closed_within(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let drain = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, drain).await.is_ok()
}

/// A connection from `source` (another loopback address: a client of another address).
pub async fn connect_from(base: &str, source: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(format!("{source}:0").parse().expect("an IPv4 address"))
        .expect("binds to a loopback address");
    socket.connect(addr(base)).await.expect("connects")
}

/// Read up to the end of a response's head; the head, and the bytes of the body read with it.
/// `None` if the connection ends first.
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = buf.split_off(i + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), body));
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Everything the server sends until it closes the connection, or `None` if it has not
/// closed it within `within`.
pub async fn read_to_end(
    stream: &mut (impl AsyncRead + Unpin),
    within: Duration,
) -> Option<Vec<u8>> {
    let read = async {
        let mut all = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()
}

/// An HTTP/2 (prior knowledge) client over `stream` announcing `window` as its streams'
/// flow-control window (0: the server may send no body byte until the client allows it).
/// The client answers pings and settings while its connection task runs; the task ends when
/// the server closes the connection.
pub async fn h2_client(
    stream: TcpStream,
    window: u32,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await
        .expect("an HTTP/2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, task)
}

/// Send `method path` with `body` on an HTTP/2 client; the response's head, its body unread.
pub async fn h2_request(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    base: &str,
    method: &str,
    path: &str,
    body: &str,
) -> hyper::Response<h2::RecvStream> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let ready = client.clone().ready().await.expect("a stream slot");
    *client = ready;
    let (response, mut send) = client
        .send_request(request, body.is_empty())
        .expect("the request is sent");
    if !body.is_empty() {
        send.send_data(bytes::Bytes::from(body.to_string()), true)
            .expect("the body is sent");
    }
    response.await.expect("a response head")
}
