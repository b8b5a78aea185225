//! Shared test harness: an in-process upstream and gateway on 127.0.0.1:0, a key helper
//! and a small HTTP client. No fixed ports, no sleeps for readiness. The [`serve`] module
//! runs the compiled binary as a child process (CLI commands and `keygate serve`).
#![allow(dead_code)]

pub mod serve;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::audit::Actor;
use keygate::config::Config;
use keygate::manage::{KeyManager, KeySpec};
use keygate::server::{self, Running};
use tokio::net::TcpListener;

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A test upstream. Paths:
/// - `/slow?ms=N`: answers after N ms (simulates a slow backend);
/// - `/download?bytes=N`: streams N bytes in 64 KiB chunks;
/// - `/ws`: WebSocket echo;
/// - `/status?code=N`: answers with that status;
/// - anything else: JSON `{method, path, query, headers, body_bytes}` after draining the body.
pub async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(upstream_handler);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn query_num(req: &Request<Incoming>, name: &str) -> u64 {
    req.uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn upstream_handler(mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
        return Ok(Response::new(full("slow done")));
    }
    if path.ends_with("/status") {
        let code = StatusCode::from_u16(query_num(&req, "code") as u16).unwrap_or(StatusCode::OK);
        let mut r = Response::new(full("status"));
        *r.status_mut() = code;
        return Ok(r);
    }
    if path.ends_with("/download") {
        let total = query_num(&req, "bytes");
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(total, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(chunk.len() as u64) as usize;
                Some((
                    Ok::<_, Infallible>(Frame::data(chunk.slice(..n))),
                    left - n as u64,
                ))
            }
        });
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))));
    }
    if path.ends_with("/ws") {
        let key = req.headers().get("sec-websocket-key").cloned();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        });
        let accept = key
            .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
            .unwrap_or_default();
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        headers.insert(
            name.to_string(),
            serde_json::Value::String(values.join(", ")),
        );
    }
    let answer = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
        "version": format!("{:?}", parts.version),
    });
    let mut r = Response::new(full(serde_json::to_vec(&answer).unwrap()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}

/// A gateway running in this process, with its temporary directory.
pub struct TestGateway {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub manager: Arc<KeyManager>,
}

/// The config text with listeners on 127.0.0.1:0 and the store in `dir`, followed by `rest`
/// (deployments, extra sections).
pub fn config_text(dir: &std::path::Path, sections: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{sections}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \"{}\"\n\n{rest}\n",
        dir.join("keygate.redb").display()
    )
}

/// Starts a gateway from `text` written to a temp dir's gateway.toml.
pub async fn start_gateway_with(text_for: impl FnOnce(&std::path::Path) -> String) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = text_for(dir.path());
    let path: PathBuf = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    let running = server::start(config.clone()).await.unwrap();
    let manager = running.manager.clone();
    TestGateway {
        running,
        dir,
        config,
        manager,
    }
}

/// Starts a gateway with one deployment `app` on `upstream` (`echo` or an address) and
/// the given extra `[[deployments.routes]]` / sections appended.
pub async fn start_gateway(upstream: &str, extra: &str) -> TestGateway {
    let upstream = if upstream == "echo" {
        "echo".to_string()
    } else {
        format!("http://{upstream}")
    };
    start_gateway_with(|dir| {
        config_text(
            dir,
            "",
            &format!("[[deployments]]\nname = \"app\"\nupstream = \"{upstream}\"\n{extra}"),
        )
    })
    .await
}

impl TestGateway {
    /// Data-plane address.
    pub fn addr(&self) -> SocketAddr {
        self.running.data_addr
    }

    /// Creates a key; returns (id, secret).
    pub fn create_key(&self, spec: KeySpec) -> (String, String) {
        let v = self
            .manager
            .create(&self.config, &spec, &Actor::local())
            .unwrap();
        (
            v["key"]["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    }

    /// Creates an operator key for all deployments.
    pub fn operator_key(&self) -> (String, String) {
        self.create_key(KeySpec {
            name: Some("test".into()),
            role: Some("operator".into()),
            ..Default::default()
        })
    }
}

/// A collected HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The error code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sends one HTTP/1.1 request and collects the answer.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// One HTTP/1.1 client connection to `addr` (kept for the client's lifetime).
pub async fn h1_client(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connected to the gateway in time")
    .expect("connect to the gateway");
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    tx
}

/// GET with headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(addr, Method::GET, path, headers, Bytes::new()).await
}

/// An upstream whose `/slow` requests report their arrival and then wait until released
/// (or `?ms=` milliseconds, 30 s by default: a safety net); everything else answers 200 "ok".
pub struct GatedUpstream {
    pub addr: SocketAddr,
    pub arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
    pub release: Arc<tokio::sync::Notify>,
}

pub async fn gated_upstream() -> GatedUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let rel = release.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (arrived_tx, rel) = (arrived_tx.clone(), rel.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (arrived_tx, rel) = (arrived_tx.clone(), rel.clone());
                    async move {
                        if req.uri().path() == "/slow" {
                            let ms: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("ms="))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(30_000);
                            let _ = arrived_tx.send(());
                            tokio::select! {
                                _ = rel.notified() => {}
                                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                            }
                            return Ok::<_, Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"slow done"),
                            )));
                        }
                        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    GatedUpstream {
        addr,
        arrived,
        release,
    }
}

/// A route rule to follow a `[[deployments]]` table: `POST /scenarios` requires the scope
/// `create_scenarios`.
pub const CREATE_SCENARIOS_ROUTE: &str = r#"
  [[deployments.routes]]
  name = "create_scenarios"
  methods = ["POST"]
  path = "/scenarios"
  scope = "create_scenarios"
"#;

/// A route rule to follow a `[[deployments]]` table: `GET` and `HEAD /scenarios` require the
/// scope `read_scenarios`.
pub const READ_SCENARIOS_ROUTE: &str = r#"
  [[deployments.routes]]
  name = "read_scenarios"
  methods = ["GET", "HEAD"]
  path = "/scenarios"
  scope = "read_scenarios"
"#;

/// Every field of a key's JSON form (SPEC §1).
pub const KEY_FIELDS: [&str; 17] = [
    "id",
    "name",
    "description",
    "owner",
    "role",
    "scopes",
    "deployments",
    "env",
    "display",
    "status",
    "created_at",
    "expires_at",
    "revoked_at",
    "rate_limit",
    "last_used_at",
    "last_used_ip",
    "last_used_user_agent",
];

/// Keeps `Arc` in scope for tests that share state.
pub type Shared<T> = Arc<T>;

/// Reads one body-less request head off `stream` (`buf` keeps what was read past it): the
/// head's text without its blank line, or `None` once the stream ends.
pub async fn read_request_head(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    Some(head)
}
