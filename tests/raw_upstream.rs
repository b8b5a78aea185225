//! How keygate relays responses from a scripted raw-TCP HTTP/1.1 upstream: an upstream that
//! reads each request head itself and answers with literal bytes, so every test controls
//! the response framing byte by byte (content-length, chunked with extensions and trailers,
//! close-delimited, 1xx, 204/304/HEAD, HTTP/1.0, malformed answers, bodies cut short).
//!
//! These pin behaviour that must not change whatever HTTP/1 client keygate uses upstream
//! for body-less requests: what the upstream receives, what the client gets, when upstream
//! connections are reused and when a fresh one is needed.
//!
//! Everything runs on 127.0.0.1 with ports chosen by the OS. Nothing sleeps to wait for
//! something to happen: waits are on channels, and every wait has an upper bound ([`SOON`])
//! that fails the test with what it was waiting for.

mod common;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{h1_client, start_gateway, TestGateway};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Upper bound for anything that should happen soon (a bound, never a wait).
const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------------------

/// What the upstream answers to one request.
struct Reply {
    /// Written in order, each followed by a flush and a yield (so the gateway may see the
    /// answer in several reads).
    pieces: Vec<Vec<u8>>,
    /// Whether and when the upstream closes the connection after the pieces.
    close: Close,
}

/// When a [`Reply`]'s connection is closed.
enum Close {
    /// It stays open for the next request.
    No,
    /// Right after the answer.
    Now,
    /// Once the answer is written and `Notify` is notified, without reading the socket
    /// meanwhile: an idle keep-alive connection closed by the upstream.
    When(Arc<Notify>),
}

impl Reply {
    /// `bytes` in one write; the connection stays open.
    fn keep(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply {
            pieces: vec![bytes.into()],
            close: Close::No,
        }
    }

    /// `bytes` in one write, then the upstream closes the connection.
    fn close(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::keep(bytes).then_close()
    }

    /// Several writes; the connection stays open.
    fn pieces(pieces: Vec<Vec<u8>>) -> Reply {
        Reply {
            pieces,
            close: Close::No,
        }
    }

    /// The same, closing the connection afterwards.
    fn then_close(mut self) -> Reply {
        self.close = Close::Now;
        self
    }

    /// The same, closing the connection once `signal` is notified.
    fn then_close_when(mut self, signal: Arc<Notify>) -> Reply {
        self.close = Close::When(signal);
        self
    }
}

/// `bytes` one byte per write.
fn bytewise(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.iter().map(|b| vec![*b]).collect()
}

/// One request head as the upstream received it.
#[derive(Debug)]
struct Seen {
    /// The upstream connection it came over (0 for the first accepted, then 1, …).
    conn: usize,
    /// The head's text, up to and without the blank line.
    head: String,
}

impl Seen {
    fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }

    /// The value of header `name` (first field, case-insensitive name).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A scripted upstream: every request, on whatever connection, gets the next [`Reply`];
/// once the script is exhausted a request gets no answer and its connection is closed.
struct Scripted {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Each request head, in the order received.
    seen: mpsc::UnboundedReceiver<Seen>,
    /// Each connection's number once it is closed (by the script or by the gateway).
    ended: mpsc::UnboundedReceiver<usize>,
}

impl Scripted {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next request head the upstream received.
    async fn next_seen(&mut self) -> Seen {
        soon("the upstream to receive a request", self.seen.recv())
            .await
            .expect("upstream task alive")
    }

    /// Waits until upstream connection `conn` is closed.
    async fn wait_ended(&mut self, conn: usize) {
        soon(&format!("upstream connection {conn} to close"), async {
            loop {
                let ended = self.ended.recv().await.expect("upstream task alive");
                if ended == conn {
                    return;
                }
            }
        })
        .await
    }
}

async fn script_upstream(script: Vec<Reply>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (ended_tx, ended) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Each piece leaves as its own segment.
            let _ = stream.set_nodelay(true);
            let conn = counter.fetch_add(1, Ordering::SeqCst);
            let (script, seen_tx, ended_tx) = (script.clone(), seen_tx.clone(), ended_tx.clone());
            tokio::spawn(async move {
                serve_script(stream, conn, &script, &seen_tx).await;
                let _ = ended_tx.send(conn);
            });
        }
    });
    Scripted {
        addr,
        accepted,
        seen,
        ended,
    }
}

/// Serves one connection until the script says close, the script runs out or the peer
/// closes; the stream is dropped (closed) on return.
async fn serve_script(
    mut stream: TcpStream,
    conn: usize,
    script: &Mutex<VecDeque<Reply>>,
    seen: &mpsc::UnboundedSender<Seen>,
) {
    let mut buf = Vec::new();
    loop {
        // The requests of these tests have no body: a request ends at its blank line.
        let Some(head) = common::read_request_head(&mut stream, &mut buf).await else {
            return;
        };
        let _ = seen.send(Seen { conn, head });
        let Some(reply) = script.lock().unwrap().pop_front() else {
            return;
        };
        for piece in &reply.pieces {
            if stream.write_all(piece).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        match reply.close {
            Close::No => {}
            Close::Now => {
                let _ = stream.shutdown().await;
                return;
            }
            Close::When(signal) => {
                // Bounded: a test that never signals fails on its own waits.
                let _ = tokio::time::timeout(SOON, signal.notified()).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway and clients
// ---------------------------------------------------------------------------------------

/// A gateway with one deployment on `up`; returns (gateway, key id, secret).
async fn gateway_for(up: &Scripted) -> (TestGateway, String, String) {
    let gw = start_gateway(&up.addr.to_string(), "").await;
    let (id, secret) = gw.operator_key();
    (gw, id, secret)
}

/// Bounds `fut` by [`SOON`].
async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {SOON:?}: {what}"))
}

/// GET `path` with the key, on a fresh client connection (bounded).
async fn get(gw: &TestGateway, path: &str, secret: &str) -> common::Answer {
    soon(
        &format!("GET {path}"),
        common::get(gw.addr(), path, &[("x-api-key", secret)]),
    )
    .await
}

/// What a client connection got for one request.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// The whole body, or why it could not be read to its end.
    body: Result<Bytes, String>,
}

impl Got {
    /// The body, which must have been read in full.
    fn body(&self) -> &[u8] {
        match &self.body {
            Ok(b) => b,
            Err(e) => panic!("the body could not be read: {e} (status {})", self.status),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends `method path` with the key on an open HTTP/1.1 client connection (which must
/// still be open) and reads the answer.
async fn h1_send(
    tx: &mut http1::SendRequest<Empty<Bytes>>,
    method: Method,
    path: &str,
    secret: &str,
) -> Got {
    h1_try_send(tx, method.clone(), path, secret)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: no response head: {e}"))
}

/// The same; `Err` when the connection ended without a response head.
async fn h1_try_send(
    tx: &mut http1::SendRequest<Empty<Bytes>>,
    method: Method,
    path: &str,
    secret: &str,
) -> Result<Got, String> {
    soon(&format!("{method} {path} over HTTP/1.1"), async {
        tx.ready()
            .await
            .expect("the gateway closed the client connection");
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "gateway.test")
            .header("x-api-key", secret)
            .body(Empty::new())
            .unwrap();
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Ok(Got {
            status,
            version,
            headers,
            body,
        })
    })
    .await
}

async fn h1_get(tx: &mut http1::SendRequest<Empty<Bytes>>, path: &str, secret: &str) -> Got {
    h1_send(tx, Method::GET, path, secret).await
}

/// A client on a raw socket, to see the gateway's answers byte for byte. Understands
/// content-length bodies only.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        let stream = soon("connect to the gateway", TcpStream::connect(addr))
            .await
            .expect("connect to the gateway");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends GET `path` with the key; returns the answer's head (text, without the blank
    /// line) and its content-length body.
    async fn get(&mut self, path: &str, secret: &str) -> (String, Vec<u8>) {
        let req =
            format!("GET {path} HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {secret}\r\n\r\n");
        soon(&format!("raw GET {path}"), async {
            self.stream.write_all(req.as_bytes()).await.unwrap();
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                self.fill(path).await;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end + 4);
            let len: usize = head
                .split("\r\n")
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim())
                })
                .unwrap_or_else(|| panic!("raw GET {path}: no content-length: {head}"))
                .parse()
                .unwrap();
            while self.buf.len() < len {
                self.fill(path).await;
            }
            let body = self.buf.drain(..len).collect();
            (head, body)
        })
        .await
    }

    async fn fill(&mut self, path: &str) {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => panic!("raw GET {path}: the gateway closed the connection"),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("raw GET {path}: {e}"),
        }
    }
}

/// A complete keep-alive answer with a content-length body.
fn ok_with(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------
// 1. Content-length bodies, and what the upstream receives
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_body_is_relayed_exactly() {
    let head = b"HTTP/1.1 201 Created\r\nx-up: 1\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\n";
    // Second answer: the head byte by byte, the body in three pieces.
    let mut split = bytewise(head);
    split.extend([b"hel".to_vec(), b"lo wo".to_vec(), b"rld".to_vec()]);
    let mut one_write = head.to_vec();
    one_write.extend_from_slice(b"hello world");
    let mut up = script_upstream(vec![Reply::keep(one_write), Reply::pieces(split)]).await;
    let (gw, key_id, secret) = gateway_for(&up).await;

    for (i, path) in ["/items/1?q=a%20b&n=2", "/items/2"].into_iter().enumerate() {
        let a = get(&gw, path, &secret).await;
        assert_eq!(a.status, StatusCode::CREATED, "answer {i}: {:?}", a.body);
        assert_eq!(a.headers.get("x-up").unwrap(), "1", "answer {i}");
        assert_eq!(a.headers.get("content-type").unwrap(), "text/plain");
        assert_eq!(&a.body[..], b"hello world", "answer {i}");

        let seen = up.next_seen().await;
        assert_eq!(seen.request_line(), format!("GET {path} HTTP/1.1"));
        assert_eq!(
            seen.header("host"),
            Some(up.addr.to_string().as_str()),
            "{seen:?}"
        );
        assert_eq!(
            seen.header("x-api-key"),
            None,
            "the key went upstream: {seen:?}"
        );
        assert_eq!(
            seen.header("x-keygate-key-id"),
            Some(key_id.as_str()),
            "{seen:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. Chunked bodies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn chunked_body_with_extension_and_trailer_is_relayed_decoded() {
    let chunked =
        b"HTTP/1.1 200 OK\r\nx-up: 1\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
5;ext=1\r\nhello\r\n\
6;a=b;c=\"d\"\r\n world\r\n\
A\r\n 012345678\r\n\
0\r\nx-checksum: abc\r\n\r\n";
    // The same answer with the head in two pieces and the body byte by byte: cut inside
    // every size line, extension, data, CRLF and the trailer section.
    let body_at = chunked.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut pieces = vec![chunked[..20].to_vec(), chunked[20..body_at].to_vec()];
    pieces.extend(bytewise(&chunked[body_at..]));
    let mut up = script_upstream(vec![
        Reply::keep(chunked.to_vec()),
        Reply::pieces(pieces),
        // After the trailer section the connection must be at the next response.
        Reply::keep(ok_with("next")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    for i in 0..2 {
        let got = h1_get(&mut client, &format!("/chunked/{i}"), &secret).await;
        assert_eq!(got.status, StatusCode::OK, "answer {i}: {got:?}");
        assert_eq!(got.header("x-up"), Some("1"), "answer {i}");
        assert_eq!(got.body(), b"hello world 012345678", "answer {i}");
        if let Some(te) = got.header("transfer-encoding") {
            assert_eq!(te, "chunked", "answer {i}");
        }
    }
    let got = h1_get(&mut client, "/after", &secret).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body(), b"next");
    for _ in 0..3 {
        assert_eq!(up.next_seen().await.conn, 0, "a new upstream connection");
    }
    assert_eq!(up.accepted(), 1);
}

// ---------------------------------------------------------------------------------------
// 3. Close-delimited bodies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn close_delimited_body_is_relayed_in_full() {
    let body: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut pieces = vec![b"HTTP/1.1 200 OK\r\nx-up: 1\r\nconnection: close\r\n\r\n".to_vec()];
    pieces.extend(body.chunks(7_000).map(<[u8]>::to_vec));
    let mut up = script_upstream(vec![
        Reply::pieces(pieces).then_close(),
        Reply::keep(ok_with("second")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let got = h1_get(&mut client, "/stream", &secret).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-up"), Some("1"));
    let got_body = got.body();
    assert_eq!(got_body.len(), body.len(), "close-delimited body length");
    assert!(got_body == &body[..], "close-delimited body bytes differ");

    // The client connection is still usable; the upstream one is not reused.
    let got = h1_get(&mut client, "/again", &secret).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body(), b"second");
    assert_eq!(up.next_seen().await.conn, 0);
    assert_eq!(up.next_seen().await.conn, 1);
}

// ---------------------------------------------------------------------------------------
// 4. Answers without a body: 204, 304, HEAD
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn no_body_answers_have_no_body_and_keep_the_connections_in_step() {
    let mut up = script_upstream(vec![
        // HEAD: the representation's length, no body.
        Reply::keep(&b"HTTP/1.1 200 OK\r\nx-up: head\r\ncontent-length: 42\r\n\r\n"[..]),
        Reply::keep(&b"HTTP/1.1 204 No Content\r\nx-up: 204\r\n\r\n"[..]),
        // A 304 may carry the length of the representation it stands for; no body follows.
        Reply::keep(
            &b"HTTP/1.1 304 Not Modified\r\nx-up: 304\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n"
                [..],
        ),
        Reply::keep(ok_with("after")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let head = h1_send(&mut client, Method::HEAD, "/thing", &secret).await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("x-up"), Some("head"));
    assert_eq!(head.header("content-length"), Some("42"), "{head:?}");
    assert!(head.body().is_empty(), "HEAD got body bytes: {head:?}");
    assert!(up
        .next_seen()
        .await
        .request_line()
        .starts_with("HEAD /thing "));

    let nc = h1_get(&mut client, "/nc", &secret).await;
    assert_eq!(nc.status, StatusCode::NO_CONTENT, "{nc:?}");
    assert_eq!(nc.header("x-up"), Some("204"));
    assert!(nc.body().is_empty(), "{nc:?}");

    let nm = h1_get(&mut client, "/nm", &secret).await;
    assert_eq!(nm.status, StatusCode::NOT_MODIFIED, "{nm:?}");
    assert_eq!(nm.header("x-up"), Some("304"));
    assert_eq!(nm.header("etag"), Some("\"v1\""));
    assert!(nm.body().is_empty(), "{nm:?}");

    // Nothing was read past those heads on either side: the next answer is intact, on the
    // same upstream connection.
    let after = h1_get(&mut client, "/after", &secret).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.body(), b"after");
    for _ in 0..3 {
        assert_eq!(up.next_seen().await.conn, 0);
    }
    assert_eq!(up.accepted(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Informational answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn informational_answers_are_skipped() {
    let mut early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".to_vec();
    early.extend(ok_with("final"));
    let up = script_upstream(vec![
        Reply::keep(early),
        // Two of them, the second in its own writes.
        Reply::pieces(vec![
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".to_vec(),
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nx-up: 1\r\ncontent-length: 6\r\n\r\nfinal2".to_vec(),
        ]),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let got = h1_get(&mut client, "/hints", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"final");
    let got = h1_get(&mut client, "/hints2", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-up"), Some("1"));
    assert_eq!(got.body(), b"final2");
    assert_eq!(up.accepted(), 1);
}

// ---------------------------------------------------------------------------------------
// 6. Keep-alive reuse
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_is_reused_until_the_upstream_says_close() {
    let mut up = script_upstream(vec![
        Reply::keep(ok_with("one")),
        Reply::keep(ok_with("two")),
        Reply::close(
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nthree"[..],
        ),
        Reply::keep(ok_with("four")),
        Reply::keep(ok_with("five")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    for (path, body) in [("/1", "one"), ("/2", "two"), ("/3", "three")] {
        let got = h1_get(&mut client, path, &secret).await;
        assert_eq!(got.status, StatusCode::OK, "{path}: {got:?}");
        assert_eq!(got.body(), body.as_bytes(), "{path}");
        assert_eq!(up.next_seen().await.conn, 0, "{path}");
    }
    assert_eq!(up.accepted(), 1, "keep-alive requests opened connections");
    // `connection: close` is the upstream hop's business.
    up.wait_ended(0).await;

    for (path, body) in [("/4", "four"), ("/5", "five")] {
        let got = h1_get(&mut client, path, &secret).await;
        assert_eq!(got.status, StatusCode::OK, "{path}: {got:?}");
        assert_eq!(got.body(), body.as_bytes(), "{path}");
        assert_eq!(up.next_seen().await.conn, 1, "{path}");
    }
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn connection_close_answer_is_not_passed_to_the_client() {
    let up = script_upstream(vec![
        Reply::close(&b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..]),
        Reply::keep(ok_with("again")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;
    let got = h1_get(&mut client, "/close", &secret).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body(), b"ok");
    assert_ne!(got.header("connection"), Some("close"), "{got:?}");
    // The client connection stays open.
    let got = h1_get(&mut client, "/again", &secret).await;
    assert_eq!(got.body(), b"again");
}

// ---------------------------------------------------------------------------------------
// 7. An upstream closing an idle keep-alive connection without notice
// ---------------------------------------------------------------------------------------

/// The upstream answers with keep-alive (no `connection: close`), then closes the
/// connection anyway: once it is idle (a server's idle timeout firing between two
/// requests), and right after answering. The next request on the same client connection
/// must go over a new upstream connection and get 200, never 502.
#[tokio::test]
async fn upstream_closing_idle_connection_silently_is_reconnected() {
    let idle_close = Arc::new(Notify::new());
    let mut up = script_upstream(vec![
        Reply::keep(ok_with("first")).then_close_when(idle_close.clone()),
        Reply::close(ok_with("second")),
        Reply::keep(ok_with("third")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let got = h1_get(&mut client, "/first", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"first");
    assert_eq!(up.next_seen().await.conn, 0);
    // The whole answer is at the client: the upstream connection is idle at the gateway.
    idle_close.notify_one();
    // The FIN is on its way to the gateway before the next request leaves.
    up.wait_ended(0).await;

    let got = h1_get(&mut client, "/second", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "after an idle close: {got:?}");
    assert_eq!(got.body(), b"second");
    assert_eq!(up.next_seen().await.conn, 1);
    up.wait_ended(1).await;

    let got = h1_get(&mut client, "/third", &secret).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "after a close right after the answer: {got:?}"
    );
    assert_eq!(got.body(), b"third");
    assert_eq!(up.next_seen().await.conn, 2);
    assert_eq!(up.accepted(), 3);
}

// ---------------------------------------------------------------------------------------
// 8. Malformed answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn garbage_status_line_is_502_upstream_unavailable() {
    let mut up = script_upstream(vec![
        Reply::keep(&b"FOO\r\n\r\n"[..]),
        Reply::keep(ok_with("fine")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let got = h1_get(&mut client, "/garbage", &secret).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
    let json: serde_json::Value = serde_json::from_slice(got.body()).unwrap();
    assert_eq!(json["error"]["code"], "upstream_unavailable", "{json}");
    assert_eq!(up.next_seen().await.conn, 0);

    // The client connection survives; the broken upstream connection is not reused.
    let got = h1_get(&mut client, "/fine", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"fine");
    assert_eq!(up.next_seen().await.conn, 1);
}

#[tokio::test]
async fn malformed_heads_are_502_upstream_unavailable() {
    let cases: [&[u8]; 5] = [
        b"FOO\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\ncontent-length: 0\r\n\r\n",
    ];
    for case in cases {
        let up = script_upstream(vec![Reply::keep(case)]).await;
        let (gw, _, secret) = gateway_for(&up).await;
        let a = get(&gw, "/malformed", &secret).await;
        let shown = String::from_utf8_lossy(case);
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{shown:?}: {a:?}");
        assert_eq!(a.code(), "upstream_unavailable", "{shown:?}");
    }
}

/// An upstream that closes in the middle of a body: whatever the client gets, it must not
/// look like a complete answer. Acceptable: no response head at all (the connection
/// closes), a head whose body then fails to read to its end, or an error status.
#[tokio::test]
async fn body_cut_short_is_not_passed_off_as_complete() {
    let cases: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
        // Chunked, without its last chunk.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nA\r\n0123456789\r\n",
    ];
    for case in cases {
        let shown = String::from_utf8_lossy(case);
        let mut up = script_upstream(vec![Reply::close(case)]).await;
        let (gw, _, secret) = gateway_for(&up).await;
        let mut client = h1_client(gw.addr()).await;

        let got = h1_try_send(&mut client, Method::GET, "/cut", &secret).await;
        up.next_seen().await;
        let Ok(got) = got else {
            continue;
        };
        match &got.body {
            Ok(body) => {
                assert_ne!(
                    got.status,
                    StatusCode::OK,
                    "{shown:?}: a cut body passed off as a whole 200 answer: {got:?}"
                );
                assert_ne!(body.len(), 100, "{shown:?}: {got:?}");
            }
            Err(_) => {
                // The head went out before the body was cut: the client sees the framing
                // broken, not a short body that looks whole.
                assert_eq!(got.status, StatusCode::OK, "{shown:?}: {got:?}");
                if let Some(len) = got.header("content-length") {
                    assert_eq!(len, "100", "{shown:?}: {got:?}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 9. HTTP/1.0 answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn http_1_0_answers_are_relayed_and_their_connections_not_reused() {
    let mut up = script_upstream(vec![
        // No keep-alive: an HTTP/1.0 connection ends with the answer. This upstream leaves
        // it open anyway; the gateway must not send another request on it.
        Reply::keep(&b"HTTP/1.0 200 OK\r\nx-up: 1\r\ncontent-length: 5\r\n\r\nhello"[..]),
        Reply::keep(ok_with("next")),
        // A close-delimited HTTP/1.0 answer.
        Reply::close(&b"HTTP/1.0 200 OK\r\nx-up: 2\r\n\r\nuntil the end"[..]),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;

    // Seen raw: whatever version the status line names, the client connection stays open.
    let mut client = RawClient::connect(gw.addr()).await;
    let (head, body) = client.get("/old", &secret).await;
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(head.contains("\r\nx-up: 1\r\n"), "{head}");
    assert_eq!(body, b"hello");
    assert_eq!(up.next_seen().await.conn, 0);

    let (head, body) = client.get("/next", &secret).await;
    assert!(head.contains(" 200 "), "{head}");
    assert_eq!(body, b"next");
    assert_eq!(
        up.next_seen().await.conn,
        1,
        "a request went over an HTTP/1.0 connection that had answered without keep-alive"
    );

    let a = get(&gw, "/old2", &secret).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.headers.get("x-up").unwrap(), "2");
    assert_eq!(&a.body[..], b"until the end");
    assert_eq!(up.next_seen().await.conn, 2);
}

/// A client's keep-alive HTTP/1.1 connection must not be cut short because the upstream
/// spoke HTTP/1.0: the gateway is to answer in its own HTTP version (RFC 9110 §6.2).
#[tokio::test]
async fn http_1_0_answer_keeps_the_client_connection_usable() {
    let mut up = script_upstream(vec![
        Reply::close(&b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello"[..]),
        Reply::keep(ok_with("second")),
    ])
    .await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;

    let got = h1_get(&mut client, "/old", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"hello");
    assert_eq!(got.version, Version::HTTP_11, "{got:?}");
    let got = h1_get(&mut client, "/second", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"second");
    assert_eq!(up.next_seen().await.conn, 0);
    assert_eq!(up.next_seen().await.conn, 1);
}

// ---------------------------------------------------------------------------------------
// 10. Transfer-Encoding and Content-Length together
// ---------------------------------------------------------------------------------------

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an intermediary must
/// drop the Content-Length before forwarding.
#[tokio::test]
async fn chunked_framing_wins_over_content_length() {
    let both = &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..];
    let up = script_upstream(vec![Reply::keep(both), Reply::keep(both)]).await;
    let (gw, _, secret) = gateway_for(&up).await;
    let mut client = h1_client(gw.addr()).await;
    let got = h1_get(&mut client, "/both", &secret).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.body(), b"hello world", "{got:?}");
    if let Some(len) = got.header("content-length") {
        assert_eq!(
            len, "11",
            "a content-length the body does not match: {got:?}"
        );
    }
    // A request with a body goes upstream through hyper's client instead: the same rule.
    let a = soon(
        "POST /both",
        common::send(
            gw.addr(),
            Method::POST,
            "/both",
            &[("x-api-key", &secret)],
            "x",
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(&a.body[..], b"hello world", "{a:?}");
    assert!(
        a.headers
            .get("content-length")
            .is_none_or(|len| len == "11"),
        "{a:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 11. A large header block
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn many_long_headers_are_relayed() {
    const N: usize = 50;
    let value = |i: usize| format!("{i:02}-{}", "v".repeat(90));
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..N {
        head.push_str(&format!("x-big-{i:02}: {}\r\n", value(i)));
    }
    head.push_str("content-length: 4\r\n\r\nbody");
    // Written in pieces smaller than one header line.
    let pieces = head.as_bytes().chunks(37).map(<[u8]>::to_vec).collect();
    let up = script_upstream(vec![Reply::pieces(pieces)]).await;
    let (gw, _, secret) = gateway_for(&up).await;

    let a = get(&gw, "/big", &secret).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(&a.body[..], b"body");
    for i in 0..N {
        let name = format!("x-big-{i:02}");
        assert_eq!(
            a.headers
                .get(&name)
                .map(|v| v.to_str().unwrap().to_string()),
            Some(value(i)),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 12. When a direct connection goes back for the next request
// ---------------------------------------------------------------------------------------

/// Serves one connection: answers the first request head with `answer`, then keeps the
/// socket open until the other side closes it.
async fn one_answer_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        s.write_all(answer).await.unwrap();
        let mut rest = [0u8; 64];
        while s.read(&mut rest).await.unwrap_or(0) > 0 {}
    });
    addr
}

/// Sends `GET /x` with keygate's own HTTP/1.1 client on `direct` to `upstream`.
async fn raw_get(
    direct: &Arc<keygate::direct::DirectUpstream>,
    upstream: SocketAddr,
) -> (
    http::uri::Authority,
    http::Response<keygate::h1upstream::RawBody>,
) {
    let authority: http::uri::Authority = upstream.to_string().parse().unwrap();
    let target =
        keygate::proxy::UpstreamTarget::new(http::uri::Scheme::HTTP, authority.clone(), SOON);
    let uri = "/x".parse().unwrap();
    let resp = soon(
        "the response head",
        keygate::h1upstream::exchange(
            direct,
            &target,
            &Method::GET,
            &uri,
            &HeaderMap::new(),
            &(),
            SOON,
        ),
    )
    .await
    .expect("an answer")
    .expect("a direct connection");
    (authority, resp)
}

/// A body read to its end gives its upstream connection back for the next request.
#[tokio::test]
async fn a_body_read_to_its_end_gives_its_connection_back() {
    use keygate::direct::{DirectUpstream, RawTake};
    let up = one_answer_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc").await;
    let direct = Arc::new(DirectUpstream::default());
    let (authority, resp) = raw_get(&direct, up).await;
    let body = soon("the body", resp.into_body().collect()).await;
    assert_eq!(&body.expect("the body").to_bytes()[..], b"abc");
    assert!(
        matches!(direct.take_raw(&authority), RawTake::Idle(_)),
        "the connection was not kept for the next request"
    );
}

/// A body dropped half-read (an HTTP/2 client can cancel a stream and go on) leaves the
/// rest of it on the wire, where the next request would read it as its answer: that
/// connection must not be handed back.
#[tokio::test]
async fn a_half_read_body_does_not_give_its_connection_back() {
    use keygate::direct::{DirectUpstream, RawTake};
    let up = one_answer_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await;
    let direct = Arc::new(DirectUpstream::default());
    let (authority, resp) = raw_get(&direct, up).await;
    let mut body = resp.into_body();
    let first = soon("the first body bytes", body.frame()).await;
    let first = first
        .expect("a frame")
        .expect("data")
        .into_data()
        .expect("data");
    assert_eq!(&first[..], b"abc");
    drop(body);
    assert!(
        matches!(direct.take_raw(&authority), RawTake::Absent),
        "a connection with half a body still on the wire was kept for the next request"
    );
}

/// A client connection whose requests go to two deployments alternately keeps one upstream
/// connection to each (no reconnect per request).
#[tokio::test]
async fn alternating_deployments_keep_a_connection_each() {
    let replies = |body: &str| (0..2).map(|_| Reply::keep(ok_with(body))).collect();
    let a = script_upstream(replies("a")).await;
    let b = script_upstream(replies("b")).await;
    let gw = common::start_gateway_with(|dir| {
        common::config_text(
            dir,
            "",
            &format!(
                "[[deployments]]\nname = \"a\"\nupstream = \"http://{}\"\npath_prefix = \"/a\"\n\n\
                 [[deployments]]\nname = \"b\"\nupstream = \"http://{}\"\npath_prefix = \"/b\"\n",
                a.addr, b.addr
            ),
        )
    })
    .await;
    let (_, secret) = gw.operator_key();
    let mut client = h1_client(gw.addr()).await;
    for (path, body) in [("/a/1", "a"), ("/b/1", "b"), ("/a/2", "a"), ("/b/2", "b")] {
        let got = h1_get(&mut client, path, &secret).await;
        assert_eq!(got.status, StatusCode::OK, "{path}: {got:?}");
        assert_eq!(got.body(), body.as_bytes(), "{path}");
    }
    assert_eq!(
        (a.accepted(), b.accepted()),
        (1, 1),
        "upstream connections opened"
    );
}
