//! Direct upstream connections (`src/direct.rs`): each client connection owns at most one
//! keep-alive HTTP/1.1 connection to a plain-HTTP upstream. Checked over real loopback
//! sockets: connection affinity, upstreams that close keep-alive connections (politely with
//! `Connection: close`, or silently), concurrent HTTP/2 streams, the `[server] workers`
//! setting, and that direct connections stay bounded.
//!
//! Everything runs on 127.0.0.1 with ports chosen by the OS. Nothing sleeps to wait for
//! something to happen: waits are on channels or barriers, and every wait has an upper bound
//! that fails the test with what it was waiting for.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{config_text, h1_client, start_gateway_with, TestGateway};
use http::header::CONNECTION;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Barrier, Notify, RwLock};

/// Upper bound for anything that should happen soon (a bound, never a wait).
const SOON: Duration = Duration::from_secs(10);

/// `keygate::direct::open_count()` is process-wide and the tests of this file run in
/// parallel: every test that opens direct connections holds this for reading; the one test
/// that measures the count holds it for writing, alone.
static DIRECT_COUNT: RwLock<()> = RwLock::const_new(());

// ---------------------------------------------------------------------------------------
// Upstreams that tell which of their connections served a request
// ---------------------------------------------------------------------------------------

/// How a [`peer_upstream`] treats keep-alive.
#[derive(Clone, Copy, Debug)]
enum Close {
    /// Keeps every connection open.
    Never,
    /// Answers the Nth request of each connection with `Connection: close`, then closes.
    After(usize),
    /// Serves one request per connection (`http1::Builder::keep_alive(false)`, which
    /// answers with `Connection: close`).
    Every,
}

/// An upstream counting its connections.
struct Upstream {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Connections that have ended so far.
    ended: watch::Receiver<usize>,
}

type UpBody = BoxBody<Bytes, Infallible>;

fn full(text: String) -> UpBody {
    Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed()
}

/// An upstream answering `"{peer port} {path}"`: the remote port identifies the upstream
/// TCP connection the request came over. Paths containing `/hold` answer the head and
/// `"start "` at once and `"end"` once `release` is notified; paths containing `/burst`
/// wait at `barrier` (when given) before answering, so the answer proves that all the
/// barrier's requests were at the upstream at the same time.
async fn upstream_with(
    close: Close,
    barrier: Option<Arc<Barrier>>,
    release: Arc<Notify>,
) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (ended_tx, ended) = watch::channel(0usize);
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let (barrier, release, ended_tx) = (barrier.clone(), release.clone(), ended_tx.clone());
            tokio::spawn(async move {
                let served = Arc::new(AtomicUsize::new(0));
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    let (barrier, release) = (barrier.clone(), release.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let text = format!("{} {path}", peer.port());
                        let mut resp = if path.contains("/hold") {
                            let chunks = futures_util::stream::unfold(0u8, move |state| {
                                let release = release.clone();
                                async move {
                                    match state {
                                        0 => Some((
                                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                                                b"start ",
                                            ))),
                                            1,
                                        )),
                                        1 => {
                                            release.notified().await;
                                            Some((Ok(Frame::data(Bytes::from_static(b"end"))), 2))
                                        }
                                        _ => None,
                                    }
                                }
                            });
                            Response::new(StreamBody::new(chunks).boxed())
                        } else {
                            if let (Some(b), true) = (&barrier, path.contains("/burst")) {
                                b.wait().await;
                            }
                            Response::new(full(text))
                        };
                        if matches!(close, Close::After(max) if n >= max) {
                            resp.headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = server_http1::Builder::new()
                    .keep_alive(!matches!(close, Close::Every))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                ended_tx.send_modify(|n| *n += 1);
            });
        }
    });
    Upstream {
        addr,
        accepted,
        ended,
    }
}

async fn peer_upstream(close: Close) -> Upstream {
    upstream_with(close, None, Arc::new(Notify::new())).await
}

impl Upstream {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` of its connections have ended.
    async fn wait_ended(&self, n: usize) {
        let mut ended = self.ended.clone();
        tokio::time::timeout(SOON, ended.wait_for(|e| *e >= n))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {n} upstream connection(s) to end (ended: {})",
                    *self.ended.borrow()
                )
            })
            .unwrap();
    }
}

/// An upstream that serves exactly one request per connection and then closes it
/// WITHOUT announcing it (no `Connection: close`): what a server does when its keep-alive
/// idle timeout fires right after a response. Written on a raw socket because hyper's
/// `keep_alive(false)` announces the close. Each closed connection's port is sent on
/// `closed` once the socket is closed (the FIN is on its way to the gateway).
struct SilentUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<u16>,
}

async fn silent_closing_upstream() -> SilentUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // "GET /path HTTP/1.1": the bodyless requests of these tests end at the head.
                let path = String::from_utf8_lossy(&head)
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("?")
                    .to_string();
                let body = format!("{} {path}", peer.port());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                drop(stream);
                let _ = closed_tx.send(peer.port());
            });
        }
    });
    SilentUpstream {
        addr,
        accepted,
        closed,
    }
}

// ---------------------------------------------------------------------------------------
// Gateway and clients
// ---------------------------------------------------------------------------------------

/// A deployment section.
fn deployment(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!("[[deployments]]\nname = \"{name}\"\nupstream = \"http://{upstream}\"\n{extra}\n")
}

/// A config with no per-key rate limit, `server_lines` in `[server]` and `deployments`.
fn gateway_config(dir: &Path, server_lines: &str, deployments: &str) -> String {
    config_text(
        dir,
        server_lines,
        &format!("[rate_limit]\ndefault = \"none\"\n\n{deployments}"),
    )
}

/// A gateway with `deployments` and an operator key; returns (gateway, secret).
async fn gateway(server_lines: &str, deployments: &str) -> (TestGateway, String) {
    let gw = start_gateway_with(|dir| gateway_config(dir, server_lines, deployments)).await;
    let (_, secret) = gw.operator_key();
    (gw, secret)
}

/// A gateway with one deployment `app` on `upstream`.
async fn app_gateway(upstream: SocketAddr) -> (TestGateway, String) {
    gateway("", &deployment("app", upstream, "")).await
}

fn keyed(path: &str, secret: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "gateway.test")
        .header("x-api-key", secret)
        .body(Empty::new())
        .unwrap()
}

/// One h2c (prior knowledge) client connection.
async fn h2_client(addr: SocketAddr) -> http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    tx
}

/// Bounds `fut` by [`SOON`].
async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {SOON:?}: {what}"))
}

async fn collect(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GET `path` on an open HTTP/1.1 connection (which must still be open).
async fn h1_get(
    tx: &mut http1::SendRequest<Empty<Bytes>>,
    path: &str,
    secret: &str,
) -> (StatusCode, String) {
    soon(&format!("GET {path} over HTTP/1.1"), async {
        tx.ready()
            .await
            .expect("the gateway closed the client connection");
        let resp = tx
            .send_request(keyed(path, secret))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        collect(resp).await
    })
    .await
}

/// GET `path` on an HTTP/2 connection.
async fn h2_get(
    mut tx: http2::SendRequest<Empty<Bytes>>,
    path: &str,
    secret: &str,
) -> (StatusCode, String) {
    tx.ready().await.expect("HTTP/2 connection ready");
    let resp = tx
        .send_request(keyed(path, secret))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    collect(resp).await
}

/// The upstream connection's port from a `"{port} {path}"` answer for `path`, checking
/// the status and that the answer is the one for `path`.
fn upstream_port((status, body): &(StatusCode, String), path: &str) -> u16 {
    assert_eq!(*status, StatusCode::OK, "GET {path}: {body:?}");
    let (port, seen) = body
        .split_once(' ')
        .unwrap_or_else(|| panic!("GET {path}: not an upstream answer: {body:?}"));
    assert_eq!(seen, path, "GET {path}: the answer is for another request");
    port.parse()
        .unwrap_or_else(|_| panic!("GET {path}: bad port in {body:?}"))
}

/// Waits (bounded, by re-checking after yielding: the counter has no notification) until
/// `keygate::direct::open_count()` satisfies `ok`.
async fn wait_open_count(what: &str, ok: impl Fn(usize) -> bool) -> usize {
    soon(what, async {
        loop {
            let n = keygate::direct::open_count();
            if ok(n) {
                return n;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 1. Connection affinity
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_client_connection_uses_one_upstream_connection() {
    let _shared = DIRECT_COUNT.read().await;
    let up = peer_upstream(Close::Never).await;
    let (gw, secret) = app_gateway(up.addr).await;

    let mut a = h1_client(gw.addr()).await;
    let mut ports_a = BTreeSet::new();
    for i in 0..5 {
        let path = format!("/a/{i}");
        ports_a.insert(upstream_port(&h1_get(&mut a, &path, &secret).await, &path));
    }
    assert_eq!(
        ports_a.len(),
        1,
        "sequential requests of one client connection went over several upstream connections: {ports_a:?}"
    );
    assert_eq!(up.accepted(), 1, "upstream connections opened");
    let port_a = *ports_a.first().unwrap();

    // A second client connection, used alternately with the first: each keeps its own.
    let mut b = h1_client(gw.addr()).await;
    let mut ports_b = BTreeSet::new();
    for i in 0..4 {
        let path = format!("/b/{i}");
        ports_b.insert(upstream_port(&h1_get(&mut b, &path, &secret).await, &path));
        let path = format!("/a/again/{i}");
        let port = upstream_port(&h1_get(&mut a, &path, &secret).await, &path);
        assert_eq!(
            port, port_a,
            "client connection A moved to another upstream connection"
        );
    }
    assert_eq!(ports_b.len(), 1, "client connection B: {ports_b:?}");
    assert_ne!(
        *ports_b.first().unwrap(),
        port_a,
        "two client connections shared one upstream connection"
    );
    assert_eq!(up.accepted(), 2, "upstream connections opened");
}

// ---------------------------------------------------------------------------------------
// 2. The upstream closes keep-alive connections with `Connection: close`
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_answering_connection_close_every_time_is_reconnected() {
    let _shared = DIRECT_COUNT.read().await;
    let up = peer_upstream(Close::Every).await;
    let (gw, secret) = app_gateway(up.addr).await;
    let mut client = h1_client(gw.addr()).await;
    let mut ports = BTreeSet::new();
    const N: usize = 6;
    for i in 0..N {
        let path = format!("/every/{i}");
        let answer = h1_get(&mut client, &path, &secret).await;
        ports.insert(upstream_port(&answer, &path));
    }
    assert_eq!(
        ports.len(),
        N,
        "each request needs its own upstream connection"
    );
    assert_eq!(up.accepted(), N);
}

#[tokio::test]
async fn an_upstream_closing_after_three_requests_is_reconnected() {
    let _shared = DIRECT_COUNT.read().await;
    let up = peer_upstream(Close::After(3)).await;
    let (gw, secret) = app_gateway(up.addr).await;
    let mut client = h1_client(gw.addr()).await;
    let mut ports = Vec::new();
    const N: usize = 10;
    for i in 0..N {
        let path = format!("/after3/{i}");
        let answer = h1_get(&mut client, &path, &secret).await;
        ports.push(upstream_port(&answer, &path));
    }
    // Requests 0-2 on the first upstream connection, 3-5 on the second, ...
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(
            *port,
            ports[i / 3 * 3],
            "request {i} did not reuse its group's connection: {ports:?}"
        );
    }
    let distinct: BTreeSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), N.div_ceil(3), "{ports:?}");
    assert_eq!(up.accepted(), N.div_ceil(3));
}

// ---------------------------------------------------------------------------------------
// 3. The upstream closes keep-alive connections silently
// ---------------------------------------------------------------------------------------

/// The upstream closes each connection right after its answer without announcing it. A
/// keep-alive request racing such a close is inherently lost: if the gateway writes the
/// next request before the FIN arrives, the upstream may have received it, and the gateway
/// cannot tell (no HTTP client may resend a non-idempotent request then). So before each
/// next request the test waits — on a channel, no sleep — until the upstream has closed
/// its socket: the FIN is then in the gateway's receive queue before the next request
/// reaches the gateway, and the gateway must notice the close (its task polls the direct
/// connection before the client connection) and send on a fresh connection, or, if it
/// already queued the request on the dead connection, have it handed back unsent and
/// resend it. Either way the client must see 200, never 502.
#[tokio::test]
async fn an_upstream_closing_without_notice_is_reconnected() {
    let _shared = DIRECT_COUNT.read().await;
    let mut up = silent_closing_upstream().await;
    let (gw, secret) = app_gateway(up.addr).await;
    let mut client = h1_client(gw.addr()).await;
    let mut ports = BTreeSet::new();
    const N: usize = 8;
    for i in 0..N {
        let path = format!("/silent/{i}");
        let answer = h1_get(&mut client, &path, &secret).await;
        let port = upstream_port(&answer, &path);
        ports.insert(port);
        let closed = soon("the upstream to close its connection", up.closed.recv())
            .await
            .expect("upstream task alive");
        assert_eq!(closed, port, "the upstream closed another connection");
    }
    assert_eq!(
        ports.len(),
        N,
        "each request needs a fresh upstream connection"
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), N);
}

// ---------------------------------------------------------------------------------------
// 4. HTTP/2 streams
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_http2_streams_all_succeed() {
    let _shared = DIRECT_COUNT.read().await;
    const N: usize = 8;
    // The upstream answers none of the burst until all N requests are there: concurrent
    // streams must not queue behind the client connection's one direct connection.
    let barrier = Arc::new(Barrier::new(N));
    let up = upstream_with(Close::Never, Some(barrier), Arc::new(Notify::new())).await;
    let (gw, secret) = app_gateway(up.addr).await;
    let tx = h2_client(gw.addr()).await;

    let burst = (0..N).map(|i| {
        let (tx, secret) = (tx.clone(), secret.clone());
        async move {
            let path = format!("/burst/{i}");
            let answer = h2_get(tx, &path, &secret).await;
            upstream_port(&answer, &path)
        }
    });
    let ports = soon(
        "all concurrent streams answered (they must reach the upstream together)",
        futures_util::future::join_all(burst),
    )
    .await;
    assert_eq!(ports.len(), N);

    // Sequential streams afterwards share the connection's one direct connection.
    let mut sequential = BTreeSet::new();
    for i in 0..5 {
        let path = format!("/after/{i}");
        let answer = soon("a sequential stream", h2_get(tx.clone(), &path, &secret)).await;
        sequential.insert(upstream_port(&answer, &path));
    }
    assert_eq!(
        sequential.len(),
        1,
        "sequential HTTP/2 streams used several upstream connections: {sequential:?}"
    );
    assert!(
        ports.contains(sequential.first().unwrap()),
        "the direct connection opened during the burst was not kept: burst {ports:?}, then {sequential:?}"
    );
}

/// Starts GET `path` on an HTTP/2 connection and returns once the response head and its
/// first body chunk (`"start "`) have arrived; the rest of the body is read by the handle.
async fn start_held_stream(
    tx: &http2::SendRequest<Empty<Bytes>>,
    path: &str,
    secret: &str,
) -> tokio::task::JoinHandle<Result<String, String>> {
    let mut tx = tx.clone();
    tx.ready().await.expect("HTTP/2 connection ready");
    let resp = soon(
        "the held stream's head",
        tx.send_request(keyed(path, secret)),
    )
    .await
    .expect("held stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = soon("the held stream's first chunk", body.frame())
        .await
        .expect("a first chunk")
        .expect("first chunk ok")
        .into_data()
        .expect("data");
    assert_eq!(&first[..], b"start ");
    tokio::spawn(async move {
        let rest = body
            .collect()
            .await
            .map_err(|e| format!("body cut: {e}"))?
            .to_bytes();
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&first),
            String::from_utf8_lossy(&rest)
        ))
    })
}

/// While one stream's response body is still streaming from the direct connection (its
/// sender was handed back at the response head), another stream of the same client
/// connection must not wait for that body to finish.
#[tokio::test]
async fn an_http2_stream_does_not_wait_for_another_streams_body() {
    let _shared = DIRECT_COUNT.read().await;
    let release = Arc::new(Notify::new());
    let up = upstream_with(Close::Never, None, release.clone()).await;
    // A deployment timeout well under SOON: a stream stuck behind the held body would get
    // 504 (or time out here) instead of 200.
    let (gw, secret) = gateway("", &deployment("app", up.addr, "timeout = \"3s\"")).await;
    let tx = h2_client(gw.addr()).await;

    let held = start_held_stream(&tx, "/hold", &secret).await;
    let answer = soon(
        "a second stream while the first one's body is open",
        h2_get(tx.clone(), "/quick", &secret),
    )
    .await;
    upstream_port(&answer, "/quick");

    release.notify_one();
    let body = soon("the held body to finish", held).await.unwrap();
    assert_eq!(body, Ok("start end".to_string()));
}

/// Same, with the second stream going to another deployment (another upstream): the held
/// stream's direct connection must not be closed under its streaming body.
#[tokio::test]
async fn an_http2_stream_to_another_upstream_does_not_cut_a_streaming_body() {
    let _shared = DIRECT_COUNT.read().await;
    let release = Arc::new(Notify::new());
    let up_a = upstream_with(Close::Never, None, release.clone()).await;
    let up_b = peer_upstream(Close::Never).await;
    let deployments = format!(
        "{}{}",
        deployment("a", up_a.addr, "path_prefix = \"/a\""),
        deployment("b", up_b.addr, "path_prefix = \"/b\"")
    );
    let (gw, secret) = gateway("", &deployments).await;
    let tx = h2_client(gw.addr()).await;

    let held = start_held_stream(&tx, "/a/hold", &secret).await;
    let answer = soon(
        "a stream to the other deployment",
        h2_get(tx.clone(), "/b/quick", &secret),
    )
    .await;
    upstream_port(&answer, "/b/quick");

    release.notify_one();
    let body = soon("the held body to finish", held).await.unwrap();
    assert_eq!(
        body,
        Ok("start end".to_string()),
        "the first stream's body was cut"
    );
}

// ---------------------------------------------------------------------------------------
// 5. `[server] workers`
// ---------------------------------------------------------------------------------------

#[test]
fn workers_is_validated_with_its_position() {
    let path = Path::new("gateway.toml");
    for bad in ["-1", "5000", "1025"] {
        let text = format!("[server]\nworkers = {bad}\n");
        let e = Config::parse(path, &text).expect_err(&format!("workers = {bad} accepted"));
        let shown = e.to_string();
        assert!(shown.contains("workers"), "workers = {bad}: {shown}");
        assert_eq!((e.line, e.col), (2, 11), "workers = {bad}: {shown}");
        assert!(
            shown.starts_with("gateway.toml:2:11:"),
            "workers = {bad}: {shown}"
        );
    }
    for (text, n) in [
        ("", 0),
        ("workers = 0", 0),
        ("workers = 2", 2),
        ("workers = 1024", 1024),
    ] {
        let c = Config::parse(path, &format!("[server]\n{text}\n"))
            .unwrap_or_else(|e| panic!("{text:?} rejected: {e}"));
        assert_eq!(c.server.workers, n, "{text:?}");
    }
}

/// A route rule for `path` requiring `scope` (the operator key has none).
fn scoped_route(path: &str) -> String {
    format!("\n  [[deployments.routes]]\n  name = \"special\"\n  path = \"{path}\"\n  scope = \"needs_this\"\n")
}

#[tokio::test]
async fn two_workers_serve_and_changing_workers_needs_a_restart() {
    let _shared = DIRECT_COUNT.read().await;
    let up = peer_upstream(Close::Never).await;
    let (gw, secret) = gateway("workers = 2", &deployment("app", up.addr, "")).await;
    assert_eq!(gw.config.server.workers, 2);

    // Connections go round robin over the two workers; each keeps its upstream connection.
    let mut clients = Vec::new();
    for c in 0..4 {
        let mut client = h1_client(gw.addr()).await;
        let mut ports = BTreeSet::new();
        for i in 0..3 {
            let path = format!("/w/{c}/{i}");
            ports.insert(upstream_port(
                &h1_get(&mut client, &path, &secret).await,
                &path,
            ));
        }
        assert_eq!(ports.len(), 1, "client {c}: {ports:?}");
        clients.push(client);
    }
    assert_eq!(up.accepted(), 4);

    // A file that changes `workers` (and adds a rule) is refused as a whole.
    let path = gw.dir.path().join("gateway.toml");
    let guarded = deployment("app", up.addr, &scoped_route("/special"));
    std::fs::write(
        &path,
        gateway_config(gw.dir.path(), "workers = 3", &guarded),
    )
    .unwrap();
    let err = gw
        .running
        .reloader
        .reload()
        .expect_err("a workers change cannot be applied live");
    assert!(err.contains("server.workers"), "{err:?}");
    assert!(
        err.to_lowercase().contains("restart"),
        "the message should say a restart is needed: {err:?}"
    );
    // The old configuration keeps serving, on old and new connections alike.
    for client in clients.iter_mut() {
        let answer = h1_get(client, "/special", &secret).await;
        upstream_port(&answer, "/special");
    }
    let mut fresh = h1_client(gw.addr()).await;
    let answer = h1_get(&mut fresh, "/special", &secret).await;
    upstream_port(&answer, "/special");

    // The same file with the old `workers` applies (the refusal was about `workers` only).
    std::fs::write(
        &path,
        gateway_config(gw.dir.path(), "workers = 2", &guarded),
    )
    .unwrap();
    gw.running
        .reloader
        .reload()
        .expect("the file without a workers change applies");
    let (status, body) = h1_get(&mut fresh, "/special", &secret).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

// ---------------------------------------------------------------------------------------
// 6. Direct connections stay bounded
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn many_requests_on_one_client_connection_hold_one_direct_connection() {
    // Alone: no other test of this file opens direct connections meanwhile.
    let _alone = DIRECT_COUNT.write().await;
    // Gateways of tests that just ended close theirs as their worker threads stop.
    let base = wait_open_count("direct connections of earlier tests to close", |n| n == 0).await;

    let up = peer_upstream(Close::Never).await;
    let (gw, secret) = app_gateway(up.addr).await;
    let mut client = h1_client(gw.addr()).await;
    let mut ports = BTreeSet::new();
    let mut most_open = base;
    const N: usize = 50;
    for i in 0..N {
        let path = format!("/many/{i}");
        ports.insert(upstream_port(
            &h1_get(&mut client, &path, &secret).await,
            &path,
        ));
        most_open = most_open.max(keygate::direct::open_count());
    }
    // Seen from the upstream: one connection for all N requests.
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(up.accepted(), 1);
    // Seen from the gateway's counter.
    assert_eq!(
        most_open,
        base + 1,
        "direct connections open during {N} requests on one client connection"
    );

    // Closing the client connection closes its upstream connection.
    drop(client);
    up.wait_ended(1).await;
    wait_open_count("the direct connection to be released", |n| n == base).await;
}
