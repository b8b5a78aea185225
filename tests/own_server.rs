//! keygate's own HTTP/1.1 server path (`h1server`), seen from a raw client socket: exact
//! request bytes go out, responses are parsed byte by byte, so the wire format (status
//! line, framing, `date`, `connection: close`), keep-alive, pipelining, the hand-off of a
//! connection to hyper, the connection timeouts and graceful shutdown are what is asserted.
//!
//! Everything runs on 127.0.0.1 with ports chosen by the OS. Nothing sleeps to wait for
//! something to happen: every wait is bounded by [`SOON`], which fails the test with what
//! it was waiting for; the timeout tests wait for short configured timeouts to fire.

mod common;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{config_text, start_gateway, start_gateway_with, start_upstream, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Upper bound for anything that should happen soon (a bound, never a wait).
const SOON: Duration = Duration::from_secs(10);

/// Bounds `fut` by [`SOON`].
async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {SOON:?}: {what}"))
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------

/// One HTTP/1.1 response as read off the socket.
#[derive(Debug)]
struct Resp {
    /// The status line as sent, without its CRLF.
    status_line: String,
    status: u16,
    /// Header fields in order: (lowercased name, value).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Trailer fields of a chunked body: (lowercased name, value).
    trailers: Vec<(String, String)>,
    /// Whether the body was chunked.
    chunked: bool,
}

impl Resp {
    /// The first value of header `name` (lowercase).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lowercase).
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `connection: close` was sent.
    fn closes(&self) -> bool {
        self.all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} in {self:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The response is a 200 with a content-length body that is the echo's JSON for
    /// `method path`; returns that JSON.
    fn echoed(&self, method: &str, path: &str) -> serde_json::Value {
        assert_eq!(self.status, 200, "{method} {path}: {self:?}");
        assert_eq!(
            self.status_line, "HTTP/1.1 200 OK",
            "{method} {path}: {self:?}"
        );
        assert!(!self.chunked, "{method} {path}: chunked, expected a length");
        assert_eq!(
            self.all("content-length"),
            vec![self.body.len().to_string().as_str()],
            "{method} {path}: content-length does not match the body"
        );
        let v = self.json();
        assert_eq!(v["method"], method, "{v}");
        assert_eq!(v["path"], path, "{v}");
        v
    }
}

/// A client connection on a raw socket. Bytes read past one response stay in `buf` for
/// the next.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = soon("connect to the gateway", TcpStream::connect(addr))
            .await
            .expect("connect to the gateway");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        soon("write to the gateway", self.stream.write_all(bytes))
            .await
            .expect("write to the gateway");
    }

    /// Reads more bytes into `buf`; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) => panic!("read from the gateway: {e} (buffered: {:?})", self.text()),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// One CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "the connection closed in the middle of a response (buffered: {:?})",
                self.text()
            );
        }
    }

    /// Exactly `n` bytes.
    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "the connection closed with {} of {n} body bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Header (or trailer) fields up to the blank line.
    async fn fields(&mut self) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return fields;
            }
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            assert_eq!(k, k.trim(), "whitespace around a field name: {line:?}");
            fields.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }

    /// Reads one response (to a request of method HEAD when `head`), bounded by [`SOON`].
    async fn response(&mut self, head: bool) -> Resp {
        soon("a response", self.response_unbounded(head)).await
    }

    async fn response_unbounded(&mut self, head: bool) -> Resp {
        let status_line = self.line().await;
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "bad status line {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = self.fields().await;
        let mut resp = Resp {
            status_line,
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
            chunked: false,
        };
        if head || (100..200).contains(&status) || status == 204 || status == 304 {
            return resp;
        }
        if let Some(te) = resp.header("transfer-encoding") {
            assert!(
                te.eq_ignore_ascii_case("chunked"),
                "unexpected transfer-encoding {te:?}"
            );
            assert!(
                resp.header("content-length").is_none(),
                "both chunked and content-length: {resp:?}"
            );
            resp.chunked = true;
            loop {
                let size_line = self.line().await;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                if size == 0 {
                    resp.trailers = self.fields().await;
                    break;
                }
                let data = self.exact(size).await;
                resp.body.extend_from_slice(&data);
                assert_eq!(self.line().await, "", "no CRLF after a chunk");
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .parse()
                .unwrap_or_else(|_| panic!("bad content-length {len:?}"));
            resp.body = self.exact(len).await;
        } else {
            // Close-delimited.
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    /// Reads until the gateway closes the connection (EOF or reset), bounded by `bound`;
    /// returns how long that took and the bytes that arrived meanwhile (buffered ones
    /// included).
    async fn closed_within(&mut self, bound: Duration) -> (Duration, Vec<u8>) {
        let start = Instant::now();
        let ended = tokio::time::timeout(bound, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        if ended.is_err() {
            panic!(
                "the gateway did not close the connection within {bound:?} (got {:?})",
                self.text()
            );
        }
        (start.elapsed(), std::mem::take(&mut self.buf))
    }

    /// How long until the gateway closed the connection, having sent nothing more.
    async fn silently_closed(&mut self) -> Duration {
        let (took, rest) = self.closed_within(SOON).await;
        assert!(
            rest.is_empty(),
            "bytes before the close: {:?}",
            String::from_utf8_lossy(&rest)
        );
        took
    }

    /// The connection is closed with nothing more sent.
    async fn expect_closed(&mut self) {
        let (_, rest) = self.closed_within(SOON).await;
        assert!(
            rest.is_empty(),
            "bytes after the last response: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A request head: `method target HTTP/1.1`, `host`, the key (when given), `extra` lines
/// (each ending in CRLF), the blank line.
fn req(method: &str, target: &str, secret: Option<&str>, extra: &str) -> String {
    let key = secret.map_or(String::new(), |s| format!("x-api-key: {s}\r\n"));
    format!("{method} {target} HTTP/1.1\r\nhost: gateway.test\r\n{key}{extra}\r\n")
}

/// A gateway with deployment `app` on the built-in echo upstream and an operator key.
async fn echo_gateway() -> (TestGateway, String) {
    let gw = start_gateway("echo", "").await;
    let (_, secret) = gw.operator_key();
    (gw, secret)
}

/// A gateway with `server_lines` in `[server]` and deployment `app` on `upstream` (an
/// address, or `echo`), and an operator key.
async fn gateway_with(upstream: &str, server_lines: &str) -> (TestGateway, String) {
    let upstream = if upstream == "echo" {
        "echo".to_string()
    } else {
        format!("http://{upstream}")
    };
    let gw = start_gateway_with(|dir| {
        config_text(
            dir,
            server_lines,
            &format!("[[deployments]]\nname = \"app\"\nupstream = \"{upstream}\"\n"),
        )
    })
    .await;
    let (_, secret) = gw.operator_key();
    (gw, secret)
}

/// An echo gateway with the `[server]` timeout lines given, and a connection on which one
/// GET of `path` has been answered.
async fn one_request_answered(timeouts: &str, path: &str) -> (TestGateway, Raw, String) {
    let (gw, secret) = gateway_with("echo", timeouts).await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", path, Some(&secret), "").as_bytes()).await;
    c.response(false).await.echoed("GET", path);
    (gw, c, secret)
}

// ---------------------------------------------------------------------------------------
// A scripted raw-TCP upstream (as in tests/raw_upstream.rs, reduced)
// ---------------------------------------------------------------------------------------

/// A scripted upstream: each request head received (on any connection) is reported on
/// `seen` and answered with the next reply's pieces (each its own write; an empty piece
/// closes the connection); once the script runs out the connection is closed.
struct Scripted {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<String>,
}

impl Scripted {
    /// The next request head the upstream received (without the blank line).
    async fn next_seen(&mut self) -> String {
        soon("the upstream to receive a request", self.seen.recv())
            .await
            .expect("upstream task alive")
    }
}

async fn script_upstream(script: Vec<Vec<Vec<u8>>>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (script, seen_tx) = (script.clone(), seen_tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Requests here have no body: a request ends at its blank line.
                    let Some(head) = common::read_request_head(&mut stream, &mut buf).await else {
                        return;
                    };
                    let _ = seen_tx.send(head);
                    let Some(pieces) = script.lock().unwrap().pop_front() else {
                        return;
                    };
                    for piece in pieces {
                        if piece.is_empty() {
                            // The script says close.
                            let _ = stream.shutdown().await;
                            return;
                        }
                        if stream.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                }
            });
        }
    });
    Scripted { addr, seen }
}

/// A complete keep-alive answer with a content-length body.
fn ok_with(body: &str) -> Vec<Vec<u8>> {
    vec![format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()]
}

// ---------------------------------------------------------------------------------------
// 1. Keep-alive and pipelining
// ---------------------------------------------------------------------------------------

/// Three GETs one after another on one connection: each gets a whole 200 with a correct
/// content-length, the connection stays open (no `connection: close`), and each reached
/// the upstream (a real one over TCP, which echoes what it received).
#[tokio::test]
async fn three_gets_on_one_keep_alive_connection() {
    let up = start_upstream().await;
    let (gw, secret) = gateway_with(&up.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;
    for (i, path) in ["/one", "/two", "/three"].into_iter().enumerate() {
        let target = format!("{path}?n={i}");
        // Only the first carries x-seq: each request's fields are its own, though the
        // connection refills one request for all of them.
        let extra = if i == 0 { "x-seq: s\r\n" } else { "" };
        c.send(req("GET", &target, Some(&secret), extra).as_bytes())
            .await;
        let r = c.response(false).await;
        let v = r.echoed("GET", path);
        assert_eq!(v["query"], format!("n={i}"), "{v}");
        if i == 0 {
            assert_eq!(v["headers"]["x-seq"], "s", "{v}");
        } else {
            assert!(v["headers"].get("x-seq").is_none(), "{v}");
        }
        assert_eq!(v["body_bytes"], 0, "{v}");
        assert_eq!(v["version"], "HTTP/1.1", "{v}");
        assert!(!r.closes(), "request {i}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("transfer-encoding").is_none(), "{r:?}");
    }
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

/// Three GETs in one write: three answers, in order, each complete.
#[tokio::test]
async fn pipelined_gets_are_answered_in_order() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    let paths = ["/p1", "/p2/long/er", "/p3"];
    let all: String = paths
        .iter()
        .map(|p| req("GET", p, Some(&secret), ""))
        .collect();
    c.send(all.as_bytes()).await;
    for path in paths {
        let r = c.response(false).await;
        r.echoed("GET", path);
        assert!(!r.closes(), "{r:?}");
    }
    // Still open and in step.
    c.send(req("GET", "/p4", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/p4");
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

/// A pipelined request with `content-length: 0` is served like one without, and the
/// request behind it is not taken for its body.
#[tokio::test]
async fn content_length_zero_is_a_body_less_request() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    let both = req("DELETE", "/z", Some(&secret), "content-length: 0\r\n")
        + &req("GET", "/after", Some(&secret), "");
    c.send(both.as_bytes()).await;
    let v = c.response(false).await.echoed("DELETE", "/z");
    assert_eq!(v["body_bytes"], 0, "{v}");
    c.response(false).await.echoed("GET", "/after");
}

// ---------------------------------------------------------------------------------------
// 2. Hand-off to hyper in the middle of a connection
// ---------------------------------------------------------------------------------------

/// A GET, then a POST with a body and a GET in one write (the POST hands the connection to
/// hyper with the bytes already read, the GET behind it included), then one more GET: all
/// four answered, in order, on one connection.
#[tokio::test]
async fn a_request_with_a_body_hands_the_connection_over_mid_way() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/a", Some(&secret), "").as_bytes()).await;
    let v = c.response(false).await.echoed("GET", "/a");
    assert_eq!(v["body_bytes"], 0);

    let post = req(
        "POST",
        "/b",
        Some(&secret),
        "content-type: text/plain\r\ncontent-length: 5\r\n",
    ) + "hello"
        + &req("GET", "/c", Some(&secret), "");
    c.send(post.as_bytes()).await;
    let r = c.response(false).await;
    let v = r.echoed("POST", "/b");
    assert_eq!(v["body_bytes"], 5, "{v}");
    assert!(!r.closes(), "{r:?}");
    let v = c.response(false).await.echoed("GET", "/c");
    assert_eq!(v["body_bytes"], 0, "{v}");

    c.send(req("GET", "/d", Some(&secret), "").as_bytes()).await;
    let r = c.response(false).await;
    r.echoed("GET", "/d");
    assert_eq!(r.all("date").len(), 1, "{r:?}");
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

/// Request shapes the own path does not serve (HTTP/1.0, `Expect`, chunked upload) are
/// answered (by hyper) on the same connection after an own-path request.
#[tokio::test]
async fn other_request_shapes_are_served_after_the_hand_off() {
    let (gw, secret) = echo_gateway().await;

    // Expect: 100-continue: an interim 100, then the answer.
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/first", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/first");
    c.send(
        req(
            "PUT",
            "/expect",
            Some(&secret),
            "expect: 100-continue\r\ncontent-length: 3\r\n",
        )
        .as_bytes(),
    )
    .await;
    let interim = c.response(false).await;
    assert_eq!(interim.status, 100, "{interim:?}");
    c.send(b"abc").await;
    let v = c.response(false).await.echoed("PUT", "/expect");
    assert_eq!(v["body_bytes"], 3, "{v}");

    // A chunked upload.
    c.send(
        (req(
            "POST",
            "/chunked",
            Some(&secret),
            "transfer-encoding: chunked\r\n",
        ) + "4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let v = c.response(false).await.echoed("POST", "/chunked");
    assert_eq!(v["body_bytes"], 6, "{v}");

    // HTTP/1.0 (no keep-alive asked for): answered, then the connection closes.
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/first", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/first");
    c.send(format!("GET /old HTTP/1.0\r\nx-api-key: {secret}\r\n\r\n").as_bytes())
        .await;
    let status_line = soon("the HTTP/1.0 answer", c.line()).await;
    assert!(
        status_line.starts_with("HTTP/1.") && status_line.contains(" 200 "),
        "{status_line:?}"
    );
    let (_, rest) = c.closed_within(SOON).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"path\":\"/old\""), "{rest}");
}

// ---------------------------------------------------------------------------------------
// 3. Connection: close, HEAD
// ---------------------------------------------------------------------------------------

/// `Connection: close` from the client: the answer says `connection: close` and the
/// gateway closes the connection after it; requests pipelined behind it are not answered.
#[tokio::test]
async fn connection_close_from_the_client_closes_after_the_answer() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/bye", Some(&secret), "Connection: Close\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    r.echoed("GET", "/bye");
    assert!(r.closes(), "no connection: close: {r:?}");
    c.expect_closed().await;

    // With another token in the list, and a request pipelined behind it.
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/x", Some(&secret), "").as_bytes()).await;
    let r = c.response(false).await;
    assert!(!r.closes(), "{r:?}");
    let both = req(
        "GET",
        "/last",
        Some(&secret),
        "connection: keep-alive, close\r\n",
    ) + &req("GET", "/never", Some(&secret), "");
    c.send(both.as_bytes()).await;
    let r = c.response(false).await;
    r.echoed("GET", "/last");
    assert!(r.closes(), "{r:?}");
    c.expect_closed().await;
}

/// HEAD: the head with the length a GET's body would have, no body bytes; the next
/// request on the connection is answered and parsed in step.
#[tokio::test]
async fn head_answers_have_no_body_and_the_connection_stays_in_step() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    let both = req("HEAD", "/h", Some(&secret), "") + &req("GET", "/after-head", Some(&secret), "");
    // The two in one write: body bytes after the HEAD answer would be read as the GET's
    // status line.
    c.send(both.as_bytes()).await;
    let head = c.response(true).await;
    assert_eq!(head.status_line, "HTTP/1.1 200 OK", "{head:?}");
    let len: usize = head
        .header("content-length")
        .unwrap_or_else(|| panic!("no content-length on the HEAD answer: {head:?}"))
        .parse()
        .unwrap();
    assert!(len > 0, "{head:?}");
    assert!(head.header("transfer-encoding").is_none(), "{head:?}");
    assert!(!head.closes(), "{head:?}");
    let get = c.response(false).await;
    let v = get.echoed("GET", "/after-head");
    assert_eq!(v["body_bytes"], 0);

    // And once more on its own (nothing pipelined that could hide stray bytes).
    c.send(req("HEAD", "/h2", Some(&secret), "").as_bytes())
        .await;
    let head = c.response(true).await;
    assert_eq!(head.status, 200, "{head:?}");
    c.send(req("GET", "/g2", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/g2");
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

/// The answer to a HEAD relayed from an upstream keeps the upstream's content-length (once)
/// and has no body; a GET pipelined behind it gets its own answer.
#[tokio::test]
async fn head_answers_from_an_upstream_keep_its_length() {
    let mut up = script_upstream(vec![
        vec![b"HTTP/1.1 200 OK\r\nx-up: head\r\ncontent-length: 42\r\n\r\n".to_vec()],
        ok_with("after"),
    ])
    .await;
    let (gw, secret) = gateway_with(&up.addr.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;
    let both = req("HEAD", "/thing", Some(&secret), "") + &req("GET", "/after", Some(&secret), "");
    c.send(both.as_bytes()).await;
    let head = c.response(true).await;
    assert_eq!(head.status_line, "HTTP/1.1 200 OK", "{head:?}");
    assert_eq!(head.header("x-up"), Some("head"), "{head:?}");
    assert_eq!(head.all("content-length"), vec!["42"], "{head:?}");
    assert!(head.header("transfer-encoding").is_none(), "{head:?}");
    let get = c.response(false).await;
    assert_eq!(get.status, 200, "{get:?}");
    assert_eq!(get.body, b"after", "{get:?}");
    assert_eq!(get.all("content-length"), vec!["5"], "{get:?}");
    assert!(up.next_seen().await.starts_with("HEAD /thing HTTP/1.1\r\n"));
    assert!(up.next_seen().await.starts_with("GET /after HTTP/1.1\r\n"));
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

// ---------------------------------------------------------------------------------------
// 4. Framing of relayed answers: chunked with trailers, no-body statuses, Date
// ---------------------------------------------------------------------------------------

/// An answer the upstream sends chunked (one write, then byte by byte) reaches the client
/// chunked, with the same body and the upstream's trailer; 204 and 304 answers carry no
/// body; the connection stays in step throughout.
#[tokio::test]
async fn chunked_answers_are_rechunked_with_their_trailers() {
    let chunked =
        b"HTTP/1.1 200 OK\r\nx-up: 1\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
5;ext=1\r\nhello\r\n\
6\r\n world\r\n\
A\r\n 012345678\r\n\
0\r\nx-checksum: abc\r\n\r\n";
    let body_at = chunked.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut bytewise = vec![chunked[..body_at].to_vec()];
    bytewise.extend(chunked[body_at..].iter().map(|b| vec![*b]));
    let mut up = script_upstream(vec![
        vec![chunked.to_vec()],
        bytewise,
        vec![b"HTTP/1.1 204 No Content\r\nx-up: 204\r\n\r\n".to_vec()],
        vec![b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n".to_vec()],
        ok_with("next"),
    ])
    .await;
    let (gw, secret) = gateway_with(&up.addr.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;

    for i in 0..2 {
        c.send(req("GET", &format!("/chunked/{i}"), Some(&secret), "").as_bytes())
            .await;
        let r = c.response(false).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "answer {i}: {r:?}");
        assert!(r.chunked, "answer {i} not chunked: {r:?}");
        assert_eq!(r.all("transfer-encoding"), vec!["chunked"], "answer {i}");
        assert_eq!(r.header("x-up"), Some("1"), "answer {i}");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            "hello world 012345678",
            "answer {i}"
        );
        assert_eq!(
            r.trailer("x-checksum"),
            Some("abc"),
            "answer {i}: the trailer was not relayed: {r:?}"
        );
        assert!(!r.closes(), "answer {i}: {r:?}");
        let seen = up.next_seen().await;
        assert!(
            seen.starts_with(&format!("GET /chunked/{i} HTTP/1.1\r\n")),
            "{seen}"
        );
    }

    c.send(req("GET", "/nothing", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status_line, "HTTP/1.1 204 No Content", "{r:?}");
    assert_eq!(r.header("x-up"), Some("204"));
    assert!(
        r.header("content-length").is_none() && r.header("transfer-encoding").is_none(),
        "framing on a 204: {r:?}"
    );
    c.send(req("GET", "/cached", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified", "{r:?}");
    assert!(r.header("transfer-encoding").is_none(), "{r:?}");

    // Nothing of the no-body answers was left on the wire.
    c.send(req("GET", "/next", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"next");
    assert_eq!(r.all("content-length"), vec!["4"], "{r:?}");
    assert!(c.buf.is_empty(), "stray bytes: {:?}", c.text());
}

/// Every answer has exactly one `date`: keygate's own (a current HTTP date) when the
/// upstream sent none, the upstream's when it sent one.
#[tokio::test]
async fn answers_have_exactly_one_date() {
    let upstream_date = "Mon, 01 Jan 2024 00:00:00 GMT";
    let up = script_upstream(vec![
        ok_with("undated"),
        vec![
            format!("HTTP/1.1 200 OK\r\nDate: {upstream_date}\r\ncontent-length: 5\r\n\r\ndated")
                .into_bytes(),
        ],
    ])
    .await;
    let (gw, secret) = gateway_with(&up.addr.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;

    let before = SystemTime::now() - Duration::from_secs(2);
    c.send(req("GET", "/undated", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.body, b"undated", "{r:?}");
    assert_eq!(r.all("content-length"), vec!["7"], "{r:?}");
    let dates = r.all("date");
    assert_eq!(dates.len(), 1, "{r:?}");
    let at = httpdate::parse_http_date(dates[0])
        .unwrap_or_else(|e| panic!("not an HTTP date {:?}: {e}", dates[0]));
    let after = SystemTime::now() + Duration::from_secs(2);
    assert!(
        before <= at && at <= after,
        "date {:?} is not now",
        dates[0]
    );

    c.send(req("GET", "/dated", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.body, b"dated", "{r:?}");
    assert_eq!(r.all("content-length"), vec!["5"], "{r:?}");
    assert_eq!(r.all("date"), vec![upstream_date], "{r:?}");

    // keygate's own answers (an error here) are dated once too.
    c.send(req("GET", "/nokey", None, "").as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.all("date").len(), 1, "{r:?}");
}

// ---------------------------------------------------------------------------------------
// 5. Error answers
// ---------------------------------------------------------------------------------------

/// keygate's own error answers (401 without or with a wrong key) are framed by
/// content-length, and the connection stays usable for the next request.
#[tokio::test]
async fn error_answers_are_framed_and_keep_the_connection() {
    let (gw, secret) = echo_gateway().await;
    let mut c = Raw::connect(gw.addr()).await;
    let all = req("GET", "/a", None, "")
        + &req("GET", "/b", Some("kg_wrong_key"), "")
        + &req("GET", "/c", Some(&secret), "");
    c.send(all.as_bytes()).await;
    for expected in ["missing_key", ""] {
        let r = c.response(false).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.status_line, "HTTP/1.1 401 Unauthorized", "{r:?}");
        assert!(!r.chunked, "{r:?}");
        assert_eq!(
            r.all("content-length"),
            vec![r.body.len().to_string().as_str()],
            "{r:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let code = r.json()["error"]["code"].as_str().unwrap_or("").to_string();
        if expected.is_empty() {
            assert!(!code.is_empty(), "{r:?}");
        } else {
            assert_eq!(code, expected, "{r:?}");
        }
        assert!(!r.closes(), "{r:?}");
    }
    c.response(false).await.echoed("GET", "/c");
    c.send(req("GET", "/d", None, "").as_bytes()).await;
    assert_eq!(c.response(false).await.status, 401);
    c.send(req("GET", "/e", Some(&secret), "").as_bytes()).await;
    c.response(false).await.echoed("GET", "/e");
}

// ---------------------------------------------------------------------------------------
// 6. Malformed requests, big heads
// ---------------------------------------------------------------------------------------

/// Sends `bytes` (after one good request on the same connection when `after_good`) and
/// expects a 400 and then the connection closed.
async fn expect_400_and_close(gw: &TestGateway, secret: &str, bytes: &[u8], after_good: bool) {
    let mut c = Raw::connect(gw.addr()).await;
    if after_good {
        c.send(req("GET", "/good", Some(secret), "").as_bytes())
            .await;
        c.response(false).await.echoed("GET", "/good");
    }
    c.send(bytes).await;
    let shown = String::from_utf8_lossy(bytes).into_owned();
    let r = c.response(false).await;
    assert_eq!(r.status, 400, "{shown:?} → {r:?}");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "{shown:?}");
    let (_, rest) = c.closed_within(SOON).await;
    assert!(
        rest.is_empty(),
        "{shown:?}: bytes after the 400: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// A target `http::Uri` rejects, a garbled request line and a bad header line get a 400
/// (from hyper, after the hand-off) and the connection closes: no hang, no silent drop.
#[tokio::test]
async fn malformed_requests_get_400() {
    let (gw, secret) = echo_gateway().await;
    let bad: [&[u8]; 9] = [
        // httparse takes these targets; http::Uri does not.
        b"GET /a<b> HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /a`b HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /a\x80b HTTP/1.1\r\nhost: x\r\n\r\n",
        // Not a request line.
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nhost: x\r\n\r\n",
        b"GET / HTTP/2.0\r\nhost: x\r\n\r\n",
        // Not a header line; a control character in a value; a folded line.
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",
    ];
    for bytes in bad {
        expect_400_and_close(&gw, &secret, bytes, false).await;
        expect_400_and_close(&gw, &secret, bytes, true).await;
    }
}

/// A request head over 64 KiB (70 headers of 1000 bytes) goes to hyper, which serves it,
/// the next request on the connection too.
#[tokio::test]
async fn a_head_over_64_kib_is_served() {
    let (gw, secret) = echo_gateway().await;
    let value = |i: usize| format!("{i:02}-{}", "v".repeat(997));
    let extra: String = (0..70)
        .map(|i| format!("x-big-{i:02}: {}\r\n", value(i)))
        .collect();
    let big = req("GET", "/big", Some(&secret), &extra);
    assert!(big.len() > 64 * 1024, "{}", big.len());
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/small", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/small");
    c.send(big.as_bytes()).await;
    let r = c.response(false).await;
    let v = r.echoed("GET", "/big");
    for i in [0, 35, 69] {
        assert_eq!(
            v["headers"][format!("x-big-{i:02}")],
            value(i),
            "header {i}"
        );
    }
    assert!(!r.closes(), "{r:?}");
    c.send(req("GET", "/after", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/after");

    // As the first request of a connection too.
    let mut c = Raw::connect(gw.addr()).await;
    c.send(big.as_bytes()).await;
    c.response(false).await.echoed("GET", "/big");
}

/// Up to 100 header fields a head is served; with 101 hyper (after the hand-off) answers
/// 431 and closes the connection.
#[tokio::test]
async fn a_head_with_more_than_100_fields_gets_431() {
    let (gw, secret) = echo_gateway().await;
    // `req` adds two fields (host, x-api-key).
    let fields = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: v{i}\r\n")).collect() };
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/hundred", Some(&secret), &fields(98)).as_bytes())
        .await;
    let v = c.response(false).await.echoed("GET", "/hundred");
    assert_eq!(v["headers"]["x-h97"], "v97", "{v}");
    c.send(req("GET", "/too-many", Some(&secret), &fields(99)).as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(
        r.status_line, "HTTP/1.1 431 Request Header Fields Too Large",
        "{r:?}"
    );
    c.expect_closed().await;
}

/// A WebSocket handshake after a request served on the own path is handed to hyper: 101,
/// then frames both ways over the same connection.
#[tokio::test]
async fn an_upgrade_after_an_own_path_request_is_handed_to_hyper() {
    let up = start_upstream().await;
    let (gw, secret) = gateway_with(&up.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/before", Some(&secret), "").as_bytes())
        .await;
    c.response(false).await.echoed("GET", "/before");
    c.send(
        req(
            "GET",
            "/ws",
            Some(&secret),
            "connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status_line, "HTTP/1.1 101 Switching Protocols", "{r:?}");
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{r:?}"
    );
    // A masked text frame "hi"; the echo comes back unmasked.
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    c.send(&[
        0x81,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        b'h' ^ mask[0],
        b'i' ^ mask[1],
    ])
    .await;
    let echoed = soon("the echoed frame", c.exact(4)).await;
    assert_eq!(echoed, [0x81, 0x02, b'h', b'i']);
}

// ---------------------------------------------------------------------------------------
// 7. Graceful shutdown
// ---------------------------------------------------------------------------------------

/// Shutdown closes an idle keep-alive connection at once (long before its idle timeout)
/// and lets a request in flight on another connection finish, answered with
/// `connection: close`, after which that connection closes.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_requests_in_flight() {
    let mut up = common::gated_upstream().await;
    let (gw, secret) = gateway_with(
        &up.addr.to_string(),
        "idle_timeout = \"60s\"\nheader_read_timeout = \"30s\"\nshutdown_grace = \"30s\"\n",
    )
    .await;

    // An idle keep-alive connection (one request answered).
    let mut idle = Raw::connect(gw.addr()).await;
    idle.send(req("GET", "/ok", Some(&secret), "").as_bytes())
        .await;
    let r = idle.response(false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{r:?}");
    assert!(!r.closes(), "{r:?}");

    // A connection with a request in flight.
    let mut busy = Raw::connect(gw.addr()).await;
    busy.send(req("GET", "/ok", Some(&secret), "").as_bytes())
        .await;
    assert_eq!(busy.response(false).await.status, 200);
    busy.send(req("GET", "/slow", Some(&secret), "").as_bytes())
        .await;
    soon("the slow request to reach the upstream", up.arrived.recv())
        .await
        .expect("upstream alive");

    gw.running.shutdown();
    let took = idle.silently_closed().await;
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");

    up.release.notify_one();
    let r = busy.response(false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"slow done"[..]), "{r:?}");
    assert!(
        r.closes(),
        "the answer during the drain lacks connection: close: {r:?}"
    );
    busy.expect_closed().await;
    let Ok(()) = tokio::time::timeout(SOON, gw.running.wait()).await else {
        panic!("the gateway did not stop after draining");
    };
}

// ---------------------------------------------------------------------------------------
// 8. Timeouts
// ---------------------------------------------------------------------------------------

/// A later request's head that stops half way is cut by header_read_timeout (counted from
/// its first byte), not left open for the idle timeout.
#[tokio::test]
async fn a_later_head_that_stalls_is_cut_by_header_read_timeout() {
    let (gw, mut c, secret) = one_request_answered(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"60s\"\n",
        "/first",
    )
    .await;
    c.send(format!("GET /second HTTP/1.1\r\nhost: x\r\nx-api-key: {secret}\r\n").as_bytes())
        .await;
    let took = c.silently_closed().await;
    assert!(
        took >= Duration::from_millis(250),
        "closed before header_read_timeout: {took:?}"
    );

    // Half a first head, too.
    let mut c = Raw::connect(gw.addr()).await;
    c.send(b"GET /half HTTP/1.1\r\nhost: x\r\n").await;
    let took = c.silently_closed().await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
}

/// An idle keep-alive connection is closed by idle_timeout (1 s here), not by the shorter
/// header_read_timeout (200 ms); a connection that never sends anything is closed by
/// header_read_timeout.
#[tokio::test]
async fn an_idle_connection_lives_for_idle_timeout_not_header_read_timeout() {
    let (gw, mut c, _) = one_request_answered(
        "header_read_timeout = \"200ms\"\nidle_timeout = \"1s\"\n",
        "/once",
    )
    .await;
    let took = c.silently_closed().await;
    assert!(
        took >= Duration::from_millis(900),
        "an idle keep-alive connection was closed after {took:?}, idle_timeout is 1s"
    );

    let mut silent = Raw::connect(gw.addr()).await;
    let took = silent.silently_closed().await;
    assert!(took >= Duration::from_millis(150), "{took:?}");
}

/// A later head that trickles in, a byte every 50 ms without ever ending, is cut by
/// header_read_timeout counted from its first byte: each byte does not start the count again.
#[tokio::test]
async fn a_later_head_that_trickles_is_cut_by_header_read_timeout() {
    let (_gw, mut c, _) = one_request_answered(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"60s\"\n",
        "/first",
    )
    .await;
    let start = Instant::now();
    let (mut rd, mut wr) = c.stream.split();
    let trickle = async {
        // Pacing, not synchronisation: 200 bytes over 10 s at most.
        let mut every = tokio::time::interval(Duration::from_millis(50));
        let mut head = b"GET /slowloris HTTP/1.1\r\nx-a: ".to_vec();
        head.resize(200, b'a');
        for byte in head {
            every.tick().await;
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let closed = async {
        let mut chunk = [0u8; 1024];
        if let Ok(n @ 1..) = rd.read(&mut chunk).await {
            panic!(
                "an answer to a head never completed: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            );
        }
    };
    tokio::select! {
        () = closed => {}
        () = trickle => panic!("the trickle was written whole"),
        () = tokio::time::sleep(SOON) => panic!("not closed within {SOON:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "a trickling head was closed after {took:?}, header_read_timeout is 300ms"
    );
}

/// Part of the next head pipelined behind a request (in the same write) is a head begun:
/// when the rest never comes, header_read_timeout cuts it, not idle_timeout.
#[tokio::test]
async fn a_partial_head_pipelined_behind_a_request_is_cut_by_header_read_timeout() {
    // idle_timeout is short enough to end the test (within SOON) when it is what applies.
    let (gw, secret) = gateway_with(
        "echo",
        "header_read_timeout = \"300ms\"\nidle_timeout = \"8s\"\n",
    )
    .await;
    let mut c = Raw::connect(gw.addr()).await;
    let bytes = req("GET", "/first", Some(&secret), "") + "GET /second HTTP/1.1\r\nhost: x\r\n";
    c.send(bytes.as_bytes()).await;
    c.response(false).await.echoed("GET", "/first");
    let took = c.silently_closed().await;
    assert!(
        took < Duration::from_secs(4),
        "half a head pipelined behind a request was cut after {took:?} (idle_timeout is 8s), \
         not by header_read_timeout (300ms)"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Bodies of unknown length, bodies cut short
// ---------------------------------------------------------------------------------------

/// An upstream answer delimited by the upstream closing its connection has no length: it
/// reaches the client chunked, whole, and the client connection stays open.
#[tokio::test]
async fn a_close_delimited_answer_is_chunked_to_the_client() {
    let body: String = (0..30_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut pieces = vec![b"HTTP/1.1 200 OK\r\nx-up: 1\r\nconnection: close\r\n\r\n".to_vec()];
    pieces.extend(body.as_bytes().chunks(7_000).map(<[u8]>::to_vec));
    pieces.push(Vec::new());
    let up = script_upstream(vec![pieces]).await;
    let (gw, secret) = gateway_with(&up.addr.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/stream", Some(&secret), "").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert!(r.chunked, "not chunked: {:?}", r.headers);
    assert_eq!(r.header("x-up"), Some("1"));
    assert!(!r.closes(), "{:?}", r.headers);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body.as_bytes(), "the body differs");
    // Still usable (keygate's own error answer needs no upstream).
    c.send(req("GET", "/nokey", None, "").as_bytes()).await;
    assert_eq!(c.response(false).await.status, 401);
}

/// An upstream answer whose body breaks off before its content-length is not passed off
/// as complete: the client gets the head announcing 10 bytes, fewer bytes, and then the
/// connection closes.
#[tokio::test]
async fn a_body_cut_short_closes_the_client_connection() {
    let up = script_upstream(vec![vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
        Vec::new(),
    ]])
    .await;
    let (gw, secret) = gateway_with(&up.addr.to_string(), "").await;
    let mut c = Raw::connect(gw.addr()).await;
    c.send(req("GET", "/short", Some(&secret), "").as_bytes())
        .await;
    let r = soon("the head", async {
        let status_line = c.line().await;
        (status_line, c.fields().await)
    })
    .await;
    assert_eq!(r.0, "HTTP/1.1 200 OK", "{r:?}");
    assert!(
        r.1.iter().any(|(k, v)| k == "content-length" && v == "10"),
        "{r:?}"
    );
    let (_, rest) = c.closed_within(SOON).await;
    assert!(
        rest.len() < 10,
        "a cut body was completed: {:?}",
        String::from_utf8_lossy(&rest)
    );
}
