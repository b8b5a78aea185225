//! Data-plane forwarding over real loopback sockets (SPEC §2): streaming, h2c, WebSocket,
//! header rewriting both ways, routing, upstream failures and connection timeouts.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// The most the process may grow while 1 GiB passes through it.
const RSS_BUDGET: u64 = 100 * MIB;
/// Upper bound for one 1 GiB transfer: a hang fails instead of blocking the run.
const BIG_TRANSFER_BOUND: Duration = Duration::from_secs(180);
/// Upper bound for anything that should happen "soon" (a bound, never a wait).
const SOON: Duration = Duration::from_secs(5);

/// The two 1 GiB tests measure this process's RSS; they must not overlap each other.
static BIG_TRANSFER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Resident set size of this process, in bytes (VmRSS).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Loads what a panic's backtrace symbolisation would load (the test binary's debug info,
/// 100+ MiB): a test failing in parallel must not show up as growth in the 1 GiB tests.
fn preload_backtrace_symbols() {
    let _ = std::backtrace::Backtrace::force_capture().to_string();
}

/// Records the highest RSS seen.
#[derive(Clone)]
struct RssPeak(Arc<AtomicU64>);

impl RssPeak {
    fn new(start: u64) -> Self {
        RssPeak(Arc::new(AtomicU64::new(start)))
    }

    fn sample(&self) {
        self.0.fetch_max(rss_bytes(), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gateway on `upstream` (an address or `echo`) with one operator key; returns (gateway, id, secret).
async fn gateway_with_key(upstream: &str, extra: &str) -> (TestGateway, String, String) {
    let gw = start_gateway(upstream, extra).await;
    let (id, secret) = gw.operator_key();
    (gw, id, secret)
}

/// The headers object of the upstream's JSON echo.
fn upstream_headers(a: &Answer) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["headers"]
        .as_object()
        .cloned()
        .expect("headers object")
}

/// Every header name and value the upstream saw, as one string (for "appears nowhere" checks).
fn all_text(h: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::Value::Object(h.clone()).to_string()
}

fn hdr<'a>(h: &'a serde_json::Map<String, serde_json::Value>, name: &str) -> Option<&'a str> {
    h.get(name)
        .map(|v| v.as_str().expect("string header value"))
}

/// An HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A hand-driven HTTP/1.1 client connection: exact bytes out, parsed responses in.
struct RawConn {
    io: BufReader<TcpStream>,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> Self {
        RawConn {
            io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.io.read_line(&mut line).await.unwrap();
        assert!(n > 0, "connection closed in the middle of a response");
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    /// Reads one response (Content-Length, chunked, or bodiless).
    async fn read_response(&mut self) -> RawResponse {
        let status_line = self.line().await;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if resp
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size_line = self.line().await;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let start = resp.body.len();
                resp.body.resize(start + size, 0);
                self.io.read_exact(&mut resp.body[start..]).await.unwrap();
                assert_eq!(self.line().await, "");
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().unwrap();
            resp.body.resize(len, 0);
            self.io.read_exact(&mut resp.body).await.unwrap();
        } else if !(status == 101 || status == 204 || status == 304 || (100..200).contains(&status))
        {
            self.io.read_to_end(&mut resp.body).await.unwrap();
        }
        resp
    }

    /// Reads until the peer closes (EOF or reset); panics if that takes longer than `bound`.
    /// Returns how long it took and whatever bytes arrived first.
    async fn closed_within(&mut self, bound: Duration) -> (Duration, Vec<u8>) {
        let start = Instant::now();
        let mut rest = Vec::new();
        match tokio::time::timeout(bound, self.io.read_to_end(&mut rest)).await {
            Ok(_) => (start.elapsed(), rest),
            Err(_) => panic!(
                "the server did not close the connection within {bound:?} (got {:?})",
                String::from_utf8_lossy(&rest)
            ),
        }
    }
}

/// Binds a port, then frees it: nothing listens there afterwards.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// An upstream that answers everything with hop-by-hop headers (and one ordinary header).
async fn start_hop_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("connection", "X-Resp-Hop")
                            .header("x-resp-hop", "1")
                            .header("keep-alive", "timeout=5")
                            .header("proxy-authenticate", "y")
                            .header("x-resp-kept", "1")
                            .body(Full::new(Bytes::from_static(b"hop")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------
// 1. Streaming 1 GiB both ways
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_upload_streams_through_without_buffering() {
    let _serial = BIG_TRANSFER.lock().await;
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "").await;
    let url = format!("http://{}/upload", gw.addr());

    // Warm up connections and buffers so the baseline includes them.
    let a = send(
        gw.addr(),
        Method::POST,
        "/upload",
        &[("x-api-key", &secret)],
        vec![7u8; MIB as usize],
    )
    .await;
    assert_eq!(a.json()["body_bytes"], MIB);

    const CHUNK: usize = 64 * 1024;
    let chunks = GIB / CHUNK as u64;
    let chunk = Bytes::from(vec![0xA5u8; CHUNK]);
    preload_backtrace_symbols();
    let before = rss_bytes();
    let peak = RssPeak::new(before);
    let sampler = peak.clone();
    // The body is generated lazily; every chunk is a refcounted view of one 64 KiB buffer.
    let stream = futures_util::stream::iter((0..chunks).map(move |i| {
        if i % 256 == 0 {
            sampler.sample(); // every 16 MiB sent
        }
        Ok::<_, Infallible>(Frame::data(chunk.clone()))
    }));
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(&url)
        .header("x-api-key", &secret)
        .body(StreamBody::new(stream))
        .unwrap();

    let start = Instant::now();
    let answer = tokio::time::timeout(BIG_TRANSFER_BOUND, async {
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    })
    .await
    .expect("1 GiB upload did not finish in time");
    let elapsed = start.elapsed();
    peak.sample();
    let (status, body) = answer;
    assert_eq!(
        status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["body_bytes"].as_u64(),
        Some(GIB),
        "upstream received {:?}",
        v["body_bytes"]
    );
    let grew = peak.get().saturating_sub(before);
    eprintln!(
        "1 GiB upload: {elapsed:.2?} ({:.0} MiB/s), RSS grew {:.1} MiB (before {:.1} MiB)",
        GIB as f64 / MIB as f64 / elapsed.as_secs_f64(),
        grew as f64 / MIB as f64,
        before as f64 / MIB as f64
    );
    assert!(
        grew < RSS_BUDGET,
        "RSS grew by {} MiB during a 1 GiB upload",
        grew / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_download_streams_through_without_buffering() {
    let _serial = BIG_TRANSFER.lock().await;
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "").await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = |bytes: u64| {
        Request::get(format!("http://{}/download?bytes={bytes}", gw.addr()))
            .header("x-api-key", &secret)
            .body(Empty::new())
            .unwrap()
    };

    // Warm up.
    let resp = client.request(request(MIB)).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len() as u64,
        MIB
    );

    preload_backtrace_symbols();
    let before = rss_bytes();
    let peak = RssPeak::new(before);
    let start = Instant::now();
    let received = tokio::time::timeout(BIG_TRANSFER_BOUND, async {
        let resp = client.request(request(GIB)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut received = 0u64;
        let mut next_sample = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download body error");
            if let Some(data) = frame.data_ref() {
                received += data.len() as u64;
            }
            if received >= next_sample {
                peak.sample();
                next_sample += 16 * MIB;
            }
        }
        received
    })
    .await
    .expect("1 GiB download did not finish in time");
    let elapsed = start.elapsed();
    peak.sample();
    assert_eq!(received, GIB);
    let grew = peak.get().saturating_sub(before);
    eprintln!(
        "1 GiB download: {elapsed:.2?} ({:.0} MiB/s), RSS grew {:.1} MiB (before {:.1} MiB)",
        GIB as f64 / MIB as f64 / elapsed.as_secs_f64(),
        grew as f64 / MIB as f64,
        before as f64 / MIB as f64
    );
    assert!(
        grew < RSS_BUDGET,
        "RSS grew by {} MiB during a 1 GiB download",
        grew / MIB
    );
}

// ---------------------------------------------------------------------------------------
// 2. h2c prior knowledge
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_forwarded_as_http11() {
    let up = start_upstream().await;
    let (gw, id, secret) = gateway_with_key(&up.to_string(), "").await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let req = Request::get(format!("http://{}/h2/path?q=1", gw.addr()))
        .header("x-api-key", &secret)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client
        .request(req)
        .await
        .expect("h2c request through the gateway");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.version(),
        Version::HTTP_2,
        "the gateway must answer h2c in HTTP/2"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        v["version"], "HTTP/1.1",
        "the upstream must be spoken to in HTTP/1.1: {v}"
    );
    assert_eq!(v["path"], "/h2/path");
    assert_eq!(v["query"], "q=1");
    let h = v["headers"].as_object().unwrap();
    assert_eq!(hdr(h, "x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(hdr(h, "x-keygate-role"), Some("operator"));
    assert_eq!(hdr(h, "x-keygate-deployment"), Some("app"));
    assert_eq!(
        hdr(h, "x-forwarded-host"),
        Some(gw.addr().to_string().as_str()),
        "from :authority"
    );
    assert!(!h.contains_key("x-api-key"));

    // A request body also crosses the h2 → h1 boundary.
    let req = Request::post(format!("http://{}/h2/body", gw.addr()))
        .header("x-api-key", &secret)
        .body(Full::new(Bytes::from(vec![1u8; 100_000])))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["body_bytes"], 100_000);
    assert_eq!(v["method"], "POST");

    // And a missing key is still a 401 over h2.
    let req = Request::get(format!("http://{}/h2", gw.addr()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------
// 3. WebSocket
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_echo_through_the_gateway() {
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "").await;
    let mut req = format!("ws://{}/ws", gw.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-api-key", secret.parse().unwrap());
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(SOON, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("handshake timed out")
        .expect("WebSocket handshake through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let messages = vec![
        Message::Text("hello through keygate".into()),
        Message::Binary(vec![0, 1, 2, 254, 255]),
        Message::Text("second text".into()),
        Message::Binary(big),
    ];
    tokio::time::timeout(SOON * 2, async {
        for m in messages {
            ws.send(m.clone()).await.unwrap();
            let back = ws.next().await.expect("stream ended").expect("ws error");
            assert_eq!(back, m);
        }
        ws.close(None).await.unwrap();
    })
    .await
    .expect("WebSocket echo timed out");
}

#[tokio::test]
async fn websocket_handshake_without_a_key_is_401() {
    let up = start_upstream().await;
    let (gw, _, _) = gateway_with_key(&up.to_string(), "").await;
    let req = format!("ws://{}/ws", gw.addr())
        .into_client_request()
        .unwrap();
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    match tokio_tungstenite::client_async(req, stream).await {
        Ok(_) => panic!("a WebSocket without a key was upgraded"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            let body = resp.body().clone().unwrap_or_default();
            assert!(
                String::from_utf8_lossy(&body).contains("missing_key"),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// 4. Hop-by-hop headers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_upstream() {
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "").await;
    let mut conn = RawConn::connect(gw.addr()).await;
    let request = format!(
        "GET /hop HTTP/1.1\r\n\
         Host: {}\r\n\
         X-API-Key: {secret}\r\n\
         Connection: keep-alive, X-Hop-Custom\r\n\
         X-Hop-Custom: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Proxy-Authorization: x\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: foo\r\n\
         X-Kept: yes\r\n\
         \r\n",
        gw.addr()
    );
    conn.write(request.as_bytes()).await;
    let resp = tokio::time::timeout(SOON, conn.read_response())
        .await
        .expect("no response");
    assert_eq!(
        resp.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    let v = resp.json();
    let h = v["headers"].as_object().unwrap();
    for name in [
        "connection",
        "x-hop-custom",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(!h.contains_key(name), "{name} reached the upstream: {h:?}");
    }
    assert_eq!(hdr(h, "x-kept"), Some("yes"));

    // The connection is still usable for a second request.
    let second = format!(
        "GET /again HTTP/1.1\r\nHost: {}\r\nX-API-Key: {secret}\r\n\r\n",
        gw.addr()
    );
    conn.write(second.as_bytes()).await;
    let resp = tokio::time::timeout(SOON, conn.read_response())
        .await
        .expect("no second response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["path"], "/again");
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let up = start_hop_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "").await;
    let mut conn = RawConn::connect(gw.addr()).await;
    let request = format!(
        "GET /x HTTP/1.1\r\nHost: {}\r\nX-API-Key: {secret}\r\n\r\n",
        gw.addr()
    );
    conn.write(request.as_bytes()).await;
    let resp = tokio::time::timeout(SOON, conn.read_response())
        .await
        .expect("no response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, b"hop");
    assert_eq!(resp.header("x-resp-kept"), Some("1"), "{:?}", resp.headers);
    for name in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            resp.header(name).is_none(),
            "{name} reached the client: {:?}",
            resp.headers
        );
    }
    assert!(
        resp.header("connection").is_none(),
        "the upstream's Connection header leaked: {:?}",
        resp.headers
    );
}

// ---------------------------------------------------------------------------------------
// 5. Credential removal
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn credentials_are_removed_before_the_upstream() {
    let up = start_upstream().await;
    let (gw, id, secret) = gateway_with_key(&up.to_string(), "").await;
    let bearer = format!("Bearer {secret}");

    let h = upstream_headers(&get(gw.addr(), "/c", &[("x-api-key", &secret)]).await);
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    assert!(!h.contains_key("x-api-key"), "{h:?}");

    let h = upstream_headers(&get(gw.addr(), "/c", &[("authorization", &bearer)]).await);
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    assert!(!h.contains_key("authorization"), "{h:?}");

    let h = upstream_headers(
        &get(
            gw.addr(),
            "/c",
            &[("authorization", &format!("bEaReR {secret}"))],
        )
        .await,
    );
    assert!(
        !h.contains_key("authorization"),
        "case-insensitive scheme: {h:?}"
    );

    // Another scheme is the upstream's business.
    let basic = "Basic dXNlcjpwYXNz";
    let h = upstream_headers(
        &get(
            gw.addr(),
            "/c",
            &[("x-api-key", &secret), ("authorization", basic)],
        )
        .await,
    );
    assert_eq!(hdr(&h, "authorization"), Some(basic));
    assert!(!h.contains_key("x-api-key"));
    assert!(!all_text(&h).contains(&secret));
}

#[tokio::test]
async fn a_bearer_key_next_to_a_basic_header_is_not_leaked() {
    // Two Authorization fields: the Bearer one authenticates and must go, the Basic one stays.
    let up = start_upstream().await;
    let (gw, id, secret) = gateway_with_key(&up.to_string(), "").await;
    let bearer = format!("Bearer {secret}");
    let basic = "Basic dXNlcjpwYXNz";
    for order in [[basic, bearer.as_str()], [bearer.as_str(), basic]] {
        let h = upstream_headers(
            &get(
                gw.addr(),
                "/c",
                &[("authorization", order[0]), ("authorization", order[1])],
            )
            .await,
        );
        assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
        assert!(
            !all_text(&h).contains(&secret),
            "the secret reached the upstream ({order:?}): {h:?}"
        );
        assert_eq!(
            hdr(&h, "authorization"),
            Some(basic),
            "the Basic credential must be kept ({order:?})"
        );
    }
}

#[tokio::test]
async fn forward_key_true_forwards_the_credential() {
    let up = start_upstream().await;
    let (gw, id, secret) =
        gateway_with_key(&up.to_string(), "\n[auth]\nforward_key = true\n").await;
    let h = upstream_headers(&get(gw.addr(), "/c", &[("x-api-key", &secret)]).await);
    assert_eq!(hdr(&h, "x-api-key"), Some(secret.as_str()));
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    let bearer = format!("Bearer {secret}");
    let h = upstream_headers(&get(gw.addr(), "/c", &[("authorization", &bearer)]).await);
    assert_eq!(hdr(&h, "authorization"), Some(bearer.as_str()));
}

#[tokio::test]
async fn a_query_parameter_key_is_accepted_and_removed_from_the_query() {
    let up = start_upstream().await;
    let (gw, id, secret) =
        gateway_with_key(&up.to_string(), "\n[auth]\nquery_param = \"api_key\"\n").await;

    let a = get(gw.addr(), &format!("/q?a=1&api_key={secret}&b=2"), &[]).await;
    let h = upstream_headers(&a);
    let v = a.json();
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(v["path"], "/q");
    assert_eq!(v["query"], "a=1&b=2");

    let a = get(gw.addr(), &format!("/q?api_key={secret}"), &[]).await;
    upstream_headers(&a);
    assert!(a.json()["query"].is_null(), "{}", a.json());

    // Off by default: without the setting the query is not a credential.
    let (gw2, _, secret2) = gateway_with_key(&up.to_string(), "").await;
    let a = get(gw2.addr(), &format!("/q?api_key={secret2}"), &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.code(), "missing_key");
}

// ---------------------------------------------------------------------------------------
// 6. X-Forwarded-*
// ---------------------------------------------------------------------------------------

fn gateway_config(
    upstream: SocketAddr,
    server_lines: &'static str,
) -> impl FnOnce(&std::path::Path) -> String {
    move |dir| {
        config_text(
            dir,
            server_lines,
            &format!("[[deployments]]\nname = \"app\"\nupstream = \"http://{upstream}\"\n"),
        )
    }
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(up, "trusted_proxies = []")).await;
    let (_, secret) = gw.operator_key();
    let a = get(
        gw.addr(),
        "/f",
        &[
            ("x-api-key", &secret),
            ("host", "public.example:8443"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    let h = upstream_headers(&a);
    assert_eq!(hdr(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(hdr(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hdr(&h, "x-forwarded-host"), Some("public.example:8443"));

    // Without client-sent values they are set the same way.
    let h = upstream_headers(
        &get(
            gw.addr(),
            "/f",
            &[("x-api-key", &secret), ("host", "plain.example")],
        )
        .await,
    );
    assert_eq!(hdr(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(hdr(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hdr(&h, "x-forwarded-host"), Some("plain.example"));
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_peer_are_extended() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(up, "trusted_proxies = [\"127.0.0.1/32\"]")).await;
    let (_, secret) = gw.operator_key();
    let a = get(
        gw.addr(),
        "/f",
        &[
            ("x-api-key", &secret),
            ("host", "internal:8080"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ],
    )
    .await;
    let h = upstream_headers(&a);
    assert_eq!(hdr(&h, "x-forwarded-for"), Some("1.2.3.4, 127.0.0.1"));
    assert_eq!(hdr(&h, "x-forwarded-proto"), Some("https"));
    assert_eq!(hdr(&h, "x-forwarded-host"), Some("public.example"));

    // A trusted peer that sends nothing gets the defaults.
    let h = upstream_headers(
        &get(
            gw.addr(),
            "/f",
            &[("x-api-key", &secret), ("host", "internal:8080")],
        )
        .await,
    );
    assert_eq!(hdr(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(hdr(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hdr(&h, "x-forwarded-host"), Some("internal:8080"));
}

// ---------------------------------------------------------------------------------------
// 7. Identity-header spoofing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn client_sent_identity_headers_are_replaced() {
    let up = start_upstream().await;
    let (gw, id, secret) = gateway_with_key(&up.to_string(), "").await;
    let a = get(
        gw.addr(),
        "/who",
        &[
            ("x-api-key", &secret),
            ("x-keygate-key-id", "evil"),
            ("x-keygate-role", "admin"),
            ("x-keygate-deployment", "other"),
            ("x-keygate-scopes", "*"),
            ("X-Keygate-Anything", "x"),
        ],
    )
    .await;
    let h = upstream_headers(&a);
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(hdr(&h, "x-keygate-role"), Some("operator"));
    assert_eq!(hdr(&h, "x-keygate-deployment"), Some("app"));
    assert_eq!(hdr(&h, "x-keygate-key-name"), Some("test"));
    assert_eq!(hdr(&h, "x-keygate-scopes"), Some(""));
    assert!(!h.contains_key("x-keygate-anything"), "{h:?}");
    assert!(!all_text(&h).contains("evil"));
}

// ---------------------------------------------------------------------------------------
// 8. Routing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn routing_by_prefix_strip_base_path_and_host() {
    let up = start_upstream().await;
    let gw = start_gateway_with(|dir| {
        config_text(
            dir,
            "",
            &format!(
                r#"
[[deployments]]
name = "stripped"
upstream = "http://{up}"
path_prefix = "/my-app"
strip_prefix = true

[[deployments]]
name = "kept"
upstream = "http://{up}"
path_prefix = "/kept"

[[deployments]]
name = "based"
upstream = "http://{up}/base"
path_prefix = "/based"
strip_prefix = true

[[deployments]]
name = "based-kept"
upstream = "http://{up}/base/"
path_prefix = "/bk"

[[deployments]]
name = "hosted"
upstream = "http://{up}"
hosts = ["api.example.com"]
"#
            ),
        )
    })
    .await;
    let (_, secret) = gw.operator_key();
    let key = ("x-api-key", secret.as_str());
    let route = |a: &Answer| -> (String, String, serde_json::Value) {
        let h = upstream_headers(a);
        let v = a.json();
        (
            hdr(&h, "x-keygate-deployment").unwrap().to_string(),
            v["path"].as_str().unwrap().to_string(),
            v["query"].clone(),
        )
    };

    let (d, p, q) = route(&get(gw.addr(), "/my-app/x?y=1", &[key]).await);
    assert_eq!(
        (d.as_str(), p.as_str(), q),
        ("stripped", "/x", serde_json::json!("y=1"))
    );
    let (d, p, _) = route(&get(gw.addr(), "/my-app", &[key]).await);
    assert_eq!((d.as_str(), p.as_str()), ("stripped", "/"));
    let (d, p, _) = route(&get(gw.addr(), "/my-app/a/b/", &[key]).await);
    assert_eq!((d.as_str(), p.as_str()), ("stripped", "/a/b/"));
    let (d, p, _) = route(&get(gw.addr(), "/kept/x", &[key]).await);
    assert_eq!((d.as_str(), p.as_str()), ("kept", "/kept/x"));
    let (d, p, _) = route(&get(gw.addr(), "/based/x", &[key]).await);
    assert_eq!((d.as_str(), p.as_str()), ("based", "/base/x"));
    let (d, p, _) = route(&get(gw.addr(), "/bk/x", &[key]).await);
    assert_eq!((d.as_str(), p.as_str()), ("based-kept", "/base/bk/x"));

    // Host-based: the named host goes to its deployment (even over a longer catch-all prefix).
    let (d, p, _) = route(&get(gw.addr(), "/anything", &[key, ("host", "api.example.com")]).await);
    assert_eq!((d.as_str(), p.as_str()), ("hosted", "/anything"));
    let (d, _, _) = route(
        &get(
            gw.addr(),
            "/my-app/x",
            &[key, ("host", "API.example.com:8080")],
        )
        .await,
    );
    assert_eq!(d, "hosted");

    // No deployment: prefixes match on whole segments, other hosts have no catch-all.
    for (path, host) in [
        ("/nothing", "other.example"),
        ("/my-appx", "other.example"),
        ("/", "other.example"),
    ] {
        let a = get(gw.addr(), path, &[key, ("host", host)]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.code(), "no_route", "{path}");
        assert_eq!(a.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn the_builtin_echo_upstream_reports_what_it_received() {
    let gw = start_gateway_with(|dir| {
        config_text(
            dir,
            "",
            "[[deployments]]\nname = \"demo\"\nupstream = \"echo\"\npath_prefix = \"/demo\"\nstrip_prefix = true\n\n[auth]\nquery_param = \"api_key\"\n",
        )
    })
    .await;
    let (id, secret) = gw.operator_key();
    let a = send(
        gw.addr(),
        Method::PUT,
        &format!("/demo/items/7?x=1&api_key={secret}"),
        &[("x-keygate-role", "admin"), ("x-kept", "1")],
        vec![0u8; 12345],
    )
    .await;
    let h = upstream_headers(&a);
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/items/7");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["body_bytes"], 12345);
    assert_eq!(hdr(&h, "x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(hdr(&h, "x-keygate-role"), Some("operator"));
    assert_eq!(hdr(&h, "x-keygate-deployment"), Some("demo"));
    assert_eq!(hdr(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(hdr(&h, "x-kept"), Some("1"));
    assert!(
        !a.body.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the echo shows the secret"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Upstream failures
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn nothing_listening_upstream_is_502_upstream_unavailable() {
    let dead = dead_addr().await;
    let (gw, _, secret) = gateway_with_key(&dead.to_string(), "").await;
    let start = Instant::now();
    let a = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(
        a.status,
        StatusCode::BAD_GATEWAY,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.code(), "upstream_unavailable");
    assert!(a.json()["error"]["message"].is_string());
    assert!(
        start.elapsed() < SOON,
        "a refused connection must fail fast, took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_slow_upstream_is_504_upstream_timeout() {
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "timeout = \"200ms\"\n").await;
    let start = Instant::now();
    let a = get(gw.addr(), "/slow?ms=3000", &[("x-api-key", &secret)]).await;
    let took = start.elapsed();
    assert_eq!(
        a.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.code(), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(200),
        "answered before the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "the timeout did not cut the wait: {took:?}"
    );

    // A prompt answer on the same deployment is fine.
    let a = get(gw.addr(), "/slow?ms=10", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(&a.body[..], b"slow done");
}

/// The deployment `timeout` is about the upstream's answer: an upload that keeps moving must
/// not be cut because sending it takes longer than that (nginx/Kong measure between reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_keeps_moving_is_not_cut_by_the_upstream_timeout() {
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "timeout = \"400ms\"\n").await;
    // A slow client: 8 chunks, 150 ms apart (1.2 s in all, every gap well under 400 ms).
    let stream = futures_util::stream::unfold(0u32, |i| async move {
        if i == 8 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![1u8; 1000]))),
            i + 1,
        ))
    });
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{}/upload", gw.addr()))
        .header("x-api-key", &secret)
        .body(StreamBody::new(Box::pin(stream)))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(SOON, client.request(req))
        .await
        .expect("no answer")
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "the upload cannot have been slow"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body_bytes"], 8000);
}

/// An upload that stops moving still ends in a 504 rather than holding the request forever.
#[tokio::test]
async fn a_stalled_upload_is_cut_by_the_upstream_timeout() {
    let up = start_upstream().await;
    let (gw, _, secret) = gateway_with_key(&up.to_string(), "timeout = \"300ms\"\n").await;
    let first = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from_static(
        b"start",
    )))]);
    let stream = first.chain(futures_util::stream::pending());
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{}/upload", gw.addr()))
        .header("x-api-key", &secret)
        .body(StreamBody::new(stream))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(SOON, client.request(req))
        .await
        .expect("a stalled upload was never cut")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------------
// 10. Connection timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_partial_request_is_cut_by_header_read_timeout() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(up, "header_read_timeout = \"300ms\"")).await;
    let (_, secret) = gw.operator_key();

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(b"GET /partial HT").await;
    let (took, _) = conn.closed_within(SOON).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed before the timeout: {took:?}"
    );

    // Headers that trickle in without ever ending are cut too.
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(format!("GET /slowloris HTTP/1.1\r\nHost: x\r\nX-API-Key: {secret}\r\n").as_bytes())
        .await;
    conn.closed_within(SOON).await;

    // A complete request is unaffected.
    let a = get(gw.addr(), "/ok", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(up, "idle_timeout = \"300ms\"")).await;
    let (_, secret) = gw.operator_key();

    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(format!("GET /first HTTP/1.1\r\nHost: x\r\nX-API-Key: {secret}\r\n\r\n").as_bytes())
        .await;
    let resp = tokio::time::timeout(SOON, conn.read_response())
        .await
        .expect("no response");
    assert_eq!(resp.status, 200);
    assert!(
        !resp
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close")),
        "must be keep-alive: {resp:?}"
    );
    let (took, rest) = conn.closed_within(SOON).await;
    assert!(
        rest.is_empty(),
        "unexpected bytes on an idle connection: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        took >= Duration::from_millis(250),
        "closed before the idle timeout: {took:?}"
    );
}

#[tokio::test]
async fn a_request_in_flight_is_not_cut_by_idle_timeout() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(up, "idle_timeout = \"300ms\"")).await;
    let (_, secret) = gw.operator_key();
    // The upstream takes longer than the idle timeout; the connection is busy, not idle.
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.write(
        format!("GET /slow?ms=1000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {secret}\r\n\r\n").as_bytes(),
    )
    .await;
    let resp = tokio::time::timeout(SOON, conn.read_response())
        .await
        .expect("no response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"slow done");
}

// ---------------------------------------------------------------------------------------
// Known server.rs problems (reported; not fixable from proxy.rs). Un-ignore once fixed.
// ---------------------------------------------------------------------------------------

/// hyper arms its header-read timer as soon as a keep-alive connection goes idle, so today an
/// idle keep-alive connection is closed after `header_read_timeout` (10 s by default), not
/// `idle_timeout` (60 s) — behind a load balancer whose idle timeout is longer than 10 s that
/// races into 502s.
#[tokio::test]
async fn a_keep_alive_connection_lives_for_idle_timeout_not_header_read_timeout() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(
        up,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
    ))
    .await;
    let (_, secret) = gw.operator_key();
    let mut conn = RawConn::connect(gw.addr()).await;
    let request = format!("GET /again HTTP/1.1\r\nHost: x\r\nX-API-Key: {secret}\r\n\r\n");
    conn.write(request.as_bytes()).await;
    assert_eq!(conn.read_response().await.status, 200);
    // Idle for well over header_read_timeout, well under idle_timeout: must stay open.
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(1500), conn.io.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the connection was closed after {:?} idle, idle_timeout is 30s",
        Duration::from_millis(1500)
    );
    conn.write(request.as_bytes()).await;
    assert_eq!(conn.read_response().await.status, 200);
}

/// During the auto (h1/h2) protocol detection no timer runs, so a connection that sends
/// nothing is held for `idle_timeout`, not `header_read_timeout`.
#[tokio::test]
async fn a_silent_connection_is_cut_by_header_read_timeout() {
    let up = start_upstream().await;
    let gw = start_gateway_with(gateway_config(
        up,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
    ))
    .await;
    let mut conn = RawConn::connect(gw.addr()).await;
    conn.closed_within(SOON).await;
}
