//! Operations: hot reload under traffic (file watcher and SIGHUP), rejected reloads that keep
//! the old configuration serving, TLS (ALPN h2/http1.1, certificate swap), the PROXY
//! protocol, and readiness during a graceful shutdown.
//!
//! Everything runs on 127.0.0.1 with ports chosen by the OS. Nothing sleeps to wait for
//! something to happen: every wait polls its condition with a bound and fails with what it
//! was waiting for.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::serve::{keygate, run_command, signal, Serve};
use common::{
    config_text, gated_upstream, get, start_gateway_with, start_upstream, Answer, TestGateway,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest wait for a change to take effect (a reload, a certificate swap, a drain).
const BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Polls `f` until it returns `Some`, for at most [`BOUND`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {BOUND:?} waiting for {what}"
        );
        // A poll interval, not a synchronisation: the condition is re-checked.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces `path` the way editors and config-management tools do: write a temporary file
/// in the same directory, then rename it over the original.
fn write_atomically(path: &Path, text: &str) {
    let name = path.file_name().unwrap().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One line of the admin `/metrics` answer, by its series (name and labels).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let a = get(admin, "/metrics", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let text = String::from_utf8_lossy(&a.body).into_owned();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(str::trim)
                .filter(|v| !v.contains(' '))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

const RELOADS_OK: &str = "keygate_config_reloads_total{result=\"ok\"}";
const RELOADS_FAILED: &str = "keygate_config_reloads_total{result=\"failed\"}";

/// A route rule for `path` requiring `scope`.
fn scoped_route(name: &str, path: &str, scope: &str) -> String {
    format!("\n  [[deployments.routes]]\n  name = \"{name}\"\n  path = \"{path}\"\n  scope = \"{scope}\"\n")
}

/// A gateway config with deployment `app` on `upstream`, no per-key rate limit (the tests
/// send many requests), `server_lines` in `[server]` and `routes` in the deployment.
fn app_config(dir: &Path, upstream: SocketAddr, server_lines: &str, routes: &str) -> String {
    config_text(
        dir,
        server_lines,
        &format!("[rate_limit]\ndefault = \"none\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"http://{upstream}\"\n{routes}"),
    )
}

fn config_path(gw: &TestGateway) -> PathBuf {
    gw.dir.path().join("gateway.toml")
}

/// Sends `req` on an open HTTP/1.1 connection and collects the answer.
async fn send_h1(
    tx: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Answer, String> {
    tx.ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    collect(resp).await
}

/// Sends `req` on an open HTTP/2 connection and collects the answer.
async fn send_h2(
    tx: &mut http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Answer, String> {
    tx.ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    collect(resp).await
}

async fn collect(resp: Response<Incoming>) -> Result<Answer, String> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let version = resp.version();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body failed: {e}"))?
        .to_bytes();
    let mut headers = headers;
    // Keep the protocol version visible to the tests.
    headers.insert("x-test-version", format!("{version:?}").parse().unwrap());
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// An HTTP/1.1 client connection over `io`.
async fn h1_over<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> http1::SendRequest<Full<Bytes>> {
    let (tx, conn) = http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    tx
}

/// An HTTP/2 client connection over `io`.
async fn h2_over<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> http2::SendRequest<Full<Bytes>> {
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    tx
}

/// A request with the key in `X-API-Key`.
fn keyed(uri: &str, secret: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", "gateway.test")
        .header("x-api-key", secret)
        .body(Full::default())
        .unwrap()
}

/// The headers the upstream received, from its JSON answer.
fn upstream_headers(a: &Answer) -> Value {
    let v = a.json();
    assert!(v["headers"].is_object(), "not an upstream answer: {v}");
    v["headers"].clone()
}

// ---------------------------------------------------------------------------------------
// 1. Hot reload under traffic
// ---------------------------------------------------------------------------------------

/// Requests sent by the background clients and their outcomes.
#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Traffic {
    fn total(&self) -> u64 {
        self.ok.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst)
    }

    fn record(&self, how: &str, r: Result<(StatusCode, Bytes), String>) {
        match r {
            Ok((StatusCode::OK, _)) => {
                self.ok.fetch_add(1, Ordering::SeqCst);
            }
            other => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                let mut f = self.failures.lock().unwrap();
                if f.len() < 10 {
                    f.push(format!("{how}: {other:?}"));
                }
            }
        }
    }

    /// Waits until at least `n` more requests than `from` have completed.
    async fn wait_for(&self, from: u64, n: u64) {
        eventually(&format!("{n} more requests under traffic"), || async {
            (self.total() >= from + n).then_some(())
        })
        .await;
    }
}

/// Sends requests on pooled keep-alive connections until told to stop.
async fn keep_alive_client(t: Arc<Traffic>, addr: SocketAddr, secret: String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    while !t.stop.load(Ordering::SeqCst) {
        let req = keyed(&format!("http://{addr}/normal"), &secret);
        let r = tokio::time::timeout(BOUND, async {
            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?
                .to_bytes();
            Ok((status, body))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        t.record("keep-alive", r);
    }
}

/// Sends each request on a new connection until told to stop.
async fn new_connection_client(t: Arc<Traffic>, addr: SocketAddr, secret: String) {
    while !t.stop.load(Ordering::SeqCst) {
        let r = tokio::time::timeout(BOUND, async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut tx, conn) = http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            let a = send_h1(&mut tx, keyed("/normal", &secret)).await?;
            Ok((a.status, a.body))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        t.record("new connection", r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_traffic_drops_no_request() {
    let up = start_upstream().await;
    let gw = start_gateway_with(|dir| app_config(dir, up, "", "")).await;
    let (_, secret) = gw.operator_key();
    let addr = gw.addr();
    let admin = gw.running.admin_addr;
    let path = config_path(&gw);
    let auth = [("x-api-key", secret.as_str())];

    // Before any reload, no rule guards /special.
    let a = get(addr, "/special", &auth).await;
    assert_eq!(a.status, 200, "{a:?}");
    let ok_before = metric(admin, RELOADS_OK).await;
    assert_eq!(ok_before, 0.0);

    let _watcher = keygate::reload::watch(gw.running.reloader.clone()).expect("watch the config");

    let traffic = Arc::new(Traffic::default());
    let clients = vec![
        tokio::spawn(keep_alive_client(traffic.clone(), addr, secret.clone())),
        tokio::spawn(keep_alive_client(traffic.clone(), addr, secret.clone())),
        tokio::spawn(new_connection_client(traffic.clone(), addr, secret.clone())),
    ];
    traffic.wait_for(0, 30).await;

    // Three successive edits, each adding a rule, each while requests keep flowing.
    let mut routes = String::new();
    for i in 1..=3 {
        routes.push_str(&scoped_route(
            &format!("special{i}"),
            &format!("/special{i}"),
            "needs_this",
        ));
        let path_i = format!("/special{i}");
        assert_eq!(
            get(addr, &path_i, &auth).await.status,
            200,
            "{path_i} guarded before its rule was written"
        );
        write_atomically(&path, &app_config(gw.dir.path(), up, "", &routes));
        let a = eventually(&format!("the rule for {path_i} to apply"), || async {
            let a = get(addr, &path_i, &auth).await;
            (a.status == 403).then_some(a)
        })
        .await;
        assert_eq!(a.code(), "insufficient_scope", "{a:?}");
        assert_eq!(a.json()["error"]["required"], "needs_this", "{a:?}");
        let done = traffic.total();
        traffic.wait_for(done, 20).await;
    }

    traffic.stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(BOUND * 2, c)
            .await
            .expect("traffic clients stop")
            .unwrap();
    }
    let failures = traffic.failures.lock().unwrap().clone();
    assert_eq!(
        traffic.failed.load(Ordering::SeqCst),
        0,
        "requests failed during reloads: {failures:#?}"
    );
    assert!(
        traffic.ok.load(Ordering::SeqCst) >= 90,
        "too little traffic: {}",
        traffic.total()
    );

    // The normal path still answers, and the metrics count the reloads (none failed: the
    // file was never seen half-written).
    assert_eq!(get(addr, "/normal", &auth).await.status, 200);
    assert!(metric(admin, RELOADS_OK).await >= 3.0);
    assert_eq!(metric(admin, RELOADS_FAILED).await, 0.0);
}

/// Kubernetes mounts a ConfigMap as `gateway.toml -> ..data/gateway.toml` with
/// `..data -> ..<timestamp>`, and updates it by renaming a new `..data` symlink into place:
/// no event in the watched directory names `gateway.toml`, yet its content changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_picked_up_by_the_watcher() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let version = |name: &str, routes: &str| {
        std::fs::create_dir(d.join(name)).unwrap();
        std::fs::write(
            d.join(name).join("gateway.toml"),
            app_config(d, up, "", routes),
        )
        .unwrap();
    };
    version("..v1", "");
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.toml", d.join("gateway.toml")).unwrap();
    let config = keygate::config::Config::load(&d.join("gateway.toml")).unwrap();
    let running = keygate::server::start(config.clone()).await.unwrap();
    let spec = keygate::manage::KeySpec {
        name: Some("k8s".into()),
        role: Some("operator".into()),
        ..Default::default()
    };
    let created = running
        .manager
        .create(&config, &spec, &keygate::audit::Actor::local())
        .unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    let auth = [("x-api-key", secret.as_str())];
    let addr = running.data_addr;
    assert_eq!(get(addr, "/special", &auth).await.status, 200);
    let _watcher = keygate::reload::watch(running.reloader.clone()).expect("watch the config");

    // The kubelet's update: new version directory, new symlink, renamed over ..data.
    version("..v2", &scoped_route("special", "/special", "needs_this"));
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();

    let a = eventually("the swapped ConfigMap to apply", || async {
        let a = get(addr, "/special", &auth).await;
        (a.status == 403).then_some(a)
    })
    .await;
    assert_eq!(a.code(), "insufficient_scope", "{a:?}");
    assert_eq!(get(addr, "/normal", &auth).await.status, 200);
    assert!(metric(running.admin_addr, RELOADS_OK).await >= 1.0);
    running.shutdown();
    tokio::time::timeout(BOUND, running.wait())
        .await
        .expect("the gateway stops");
}

// ---------------------------------------------------------------------------------------
// 2 and 3. Rejected reloads keep the previous configuration
// ---------------------------------------------------------------------------------------

/// The 1-based line of `text` that starts with `start` (after indentation).
fn line_of(text: &str, start: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no {start:?} in\n{text}"))
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_rejected_and_the_old_one_keeps_serving() {
    let up = start_upstream().await;
    let guarded = scoped_route("special", "/special", "needs_this");
    let gw = start_gateway_with(|dir| app_config(dir, up, "", &guarded)).await;
    let (_, secret) = gw.operator_key();
    let (addr, admin) = (gw.addr(), gw.running.admin_addr);
    let path = config_path(&gw);
    let auth = [("x-api-key", secret.as_str())];
    let old_behaviour = || async {
        let n = get(addr, "/normal", &auth).await;
        assert_eq!(n.status, 200, "{n:?}");
        let s = get(addr, "/special", &auth).await;
        assert_eq!(
            (s.status, s.code()),
            (StatusCode::FORBIDDEN, "insufficient_scope".to_string()),
            "{s:?}"
        );
    };
    old_behaviour().await;
    let _watcher = keygate::reload::watch(gw.running.reloader.clone()).expect("watch the config");

    // An unknown field (a typo), in a file that would also drop the /special rule.
    let unknown = app_config(gw.dir.path(), up, "", "timeoutt = \"5s\"\n");
    let line = line_of(&unknown, "timeoutt");
    write_atomically(&path, &unknown);
    // The watcher sees it and rejects it.
    eventually("the watcher to reject the file", || async {
        (metric(admin, RELOADS_FAILED).await >= 1.0).then_some(())
    })
    .await;
    old_behaviour().await;
    // An explicit reload says where the problem is.
    let failed_before = metric(admin, RELOADS_FAILED).await;
    let err = gw
        .running
        .reloader
        .reload()
        .expect_err("a file with an unknown field is rejected");
    let location = format!("{}:{line}:1", path.display());
    assert!(err.contains(&location), "expected {location} in {err:?}");
    assert!(err.contains("timeoutt"), "{err:?}");
    assert!(metric(admin, RELOADS_FAILED).await > failed_before);
    old_behaviour().await;

    // A syntax error: an unterminated string.
    let mut syntax = app_config(gw.dir.path(), up, "", "");
    syntax.push_str("\n[[deployments]]\nname = \"broken\nupstream = \"echo\"\n");
    let line = line_of(&syntax, "name = \"broken");
    write_atomically(&path, &syntax);
    let failed_before = metric(admin, RELOADS_FAILED).await;
    let err = gw
        .running
        .reloader
        .reload()
        .expect_err("a file with a syntax error is rejected");
    let location = format!("{}:{line}:", path.display());
    assert!(err.contains(&location), "expected {location}COL in {err:?}");
    assert!(metric(admin, RELOADS_FAILED).await > failed_before);
    old_behaviour().await;
    assert_eq!(
        metric(admin, RELOADS_OK).await,
        0.0,
        "a rejected file was counted as applied"
    );

    // Once the file is fixed, it applies: /special is no longer guarded.
    write_atomically(&path, &app_config(gw.dir.path(), up, "", ""));
    eventually("the fixed file to apply", || async {
        (get(addr, "/special", &auth).await.status == 200).then_some(())
    })
    .await;
    assert!(metric(admin, RELOADS_OK).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_change_is_refused_as_a_whole() {
    let up = start_upstream().await;
    let gw = start_gateway_with(|dir| app_config(dir, up, "", "")).await;
    let (_, secret) = gw.operator_key();
    let (addr, admin) = (gw.addr(), gw.running.admin_addr);
    let path = config_path(&gw);
    let auth = [("x-api-key", secret.as_str())];
    let guarded = scoped_route("special", "/special", "needs_this");
    let with_rule = app_config(gw.dir.path(), up, "", &guarded);
    let server_listen = "[server]\nlisten = \"127.0.0.1:0\"";
    let admin_listen = "[admin]\nlisten = \"127.0.0.1:0\"";
    assert!(
        with_rule.contains(server_listen) && with_rule.contains(admin_listen),
        "{with_rule}"
    );

    let cases = [
        (
            "server.listen",
            with_rule.replace(server_listen, "[server]\nlisten = \"127.0.0.1:1\""),
        ),
        (
            "admin.listen",
            with_rule.replace(admin_listen, "[admin]\nlisten = \"127.0.0.1:1\""),
        ),
    ];
    for (field, text) in cases {
        write_atomically(&path, &text);
        let failed_before = metric(admin, RELOADS_FAILED).await;
        let err = gw
            .running
            .reloader
            .reload()
            .expect_err("a listen change cannot be applied live");
        assert!(err.contains(field), "{field}: {err:?}");
        assert!(
            err.to_lowercase().contains("restart"),
            "{field}: the message should say a restart is needed: {err:?}"
        );
        assert!(metric(admin, RELOADS_FAILED).await > failed_before);
        // Nothing of the file was applied: the new rule is not enforced.
        let a = get(addr, "/special", &auth).await;
        assert_eq!(
            a.status, 200,
            "{field}: part of a refused file was applied: {a:?}"
        );
    }
    assert_eq!(metric(admin, RELOADS_OK).await, 0.0);

    // The same rule without the listen change applies.
    write_atomically(&path, &with_rule);
    gw.running
        .reloader
        .reload()
        .expect("the file without a listen change applies");
    assert_eq!(get(addr, "/special", &auth).await.status, 403);
}

// ---------------------------------------------------------------------------------------
// 4. SIGHUP reload of the real binary
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration_of_a_running_binary() {
    let up = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // gateway.toml is a symlink to conf/gateway.toml, edited in place there: nothing happens
    // in the directory the file watcher watches (gateway.toml's own), so only SIGHUP can make
    // this change apply — the test cannot pass through the watcher.
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let target = dir.path().join("conf").join("gateway.toml");
    let config = dir.path().join("gateway.toml");
    std::os::unix::fs::symlink(&target, &config).unwrap();
    let text = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \"data/keygate.redb\"\n\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\n[rate_limit]\ndefault = \"none\"\n\n\
             [[deployments]]\nname = \"app\"\nupstream = \"http://{up}\"\n{extra}"
        )
    };
    std::fs::write(&target, text("")).unwrap();

    let mut c = keygate(dir.path(), &config);
    c.args([
        "keys", "create", "--name", "ops", "--role", "operator", "--json",
    ]);
    let created = run_command(c).ok().json();
    let secret = created["secret"].as_str().expect("secret").to_string();
    let auth = [("x-api-key", secret.as_str())];

    let mut serve = Serve::start(keygate(dir.path(), &config)).await;
    let addr = serve.addr;
    let admin = serve.listen_addr("admin API listening").await;
    let deployment_of = |a: &Answer| {
        upstream_headers(a)["x-keygate-deployment"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    let a = get(addr, "/other/x", &auth).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(deployment_of(&a), "app");

    // A second deployment takes over /other.
    let other = format!("\n[[deployments]]\nname = \"other\"\nupstream = \"http://{up}\"\npath_prefix = \"/other\"\n");
    std::fs::write(&target, text(&other)).unwrap();
    let a = get(addr, "/other/x", &auth).await;
    assert_eq!(
        deployment_of(&a),
        "app",
        "the change applied without SIGHUP"
    );

    signal(serve.pid, "HUP");
    serve.wait_for_log("configuration reloaded").await;
    eventually("the new deployment to serve /other", || async {
        let a = get(addr, "/other/x", &auth).await;
        (a.status == 200 && deployment_of(&a) == "other").then_some(())
    })
    .await;
    assert_eq!(deployment_of(&get(addr, "/x", &auth).await), "app");
    assert!(metric(admin, RELOADS_OK).await >= 1.0);

    // A broken file on SIGHUP is rejected; the process keeps serving the last good config.
    std::fs::write(&target, text(&format!("{other}bogus_field = 1\n"))).unwrap();
    signal(serve.pid, "HUP");
    serve
        .wait_for_log("configuration reload rejected; the previous configuration keeps serving")
        .await;
    let a = get(addr, "/other/x", &auth).await;
    assert_eq!(
        (a.status, deployment_of(&a)),
        (StatusCode::OK, "other".to_string()),
        "{a:?}"
    );
    assert!(metric(admin, RELOADS_FAILED).await >= 1.0);

    let status = serve.stop().await;
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", serve.output());
}

// ---------------------------------------------------------------------------------------
// 5. TLS
// ---------------------------------------------------------------------------------------

/// A self-signed certificate for `localhost`: (cert PEM, key PEM, cert DER).
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        ck.cert.pem(),
        ck.key_pair.serialize_pem(),
        ck.cert.der().clone(),
    )
}

/// A client trusting `roots`, offering `alpn` and only `versions`.
fn tls_client(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection does a full handshake: a resumed session would report the
    // certificate of the session it resumes, not the one the server presents now.
    cfg.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(cfg))
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        BOUND,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake")
}

fn peer_cert(s: &TlsStream) -> CertificateDer<'static> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
        .into_owned()
}

const ALL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A gateway as [`app_config`] with `server_lines` in `[server]` and a TLS listener on
/// 127.0.0.1:0 serving `cert` and `key` (PEM), written to its directory as `cert.pem` and
/// `key.pem`.
async fn start_tls_gateway(
    up: SocketAddr,
    server_lines: &str,
    cert: &str,
    key: &str,
) -> TestGateway {
    start_gateway_with(|dir| {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let tls = format!(
            "{server_lines}\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        );
        app_config(dir, up, &tls, "")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_and_http2_and_swaps_certificates() {
    let up = start_upstream().await;
    let (cert1, key1, der1) = self_signed();
    let gw = start_tls_gateway(up, "", &cert1, &key1).await;
    let (id, secret) = gw.operator_key();
    let tls_addr = gw.running.tls_addr.expect("a TLS listener");
    let (cert2, key2, der2) = self_signed();
    assert_ne!(der1, der2);
    let roots = [der1.clone(), der2.clone()];

    let check_upstream_saw = |a: &Answer, what: &str| {
        assert_eq!(a.status, 200, "{what}: {a:?}");
        let h = upstream_headers(a);
        assert_eq!(h["x-forwarded-proto"], "https", "{what}: {h}");
        assert_eq!(h["x-keygate-key-id"], id.as_str(), "{what}: {h}");
        assert_eq!(h["x-keygate-deployment"], "app", "{what}: {h}");
        assert_eq!(h["x-keygate-role"], "operator", "{what}: {h}");
        assert!(
            h.get("x-api-key").is_none(),
            "{what}: the key reached the upstream: {h}"
        );
    };

    // HTTP/1.1 by ALPN.
    let s = tls_connect(tls_addr, &tls_client(&roots, &[b"http/1.1"], ALL_VERSIONS)).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let v = s.get_ref().1.protocol_version().unwrap();
    assert!(
        matches!(
            v,
            rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2
        ),
        "{v:?}"
    );
    assert_eq!(peer_cert(&s), der1);
    let mut h1_old = h1_over(s).await;
    let a = send_h1(&mut h1_old, keyed("/tls1", &secret)).await.unwrap();
    check_upstream_saw(&a, "HTTP/1.1 over TLS");
    assert_eq!(a.headers["x-test-version"], "HTTP/1.1");

    // HTTP/2 by ALPN.
    let s = tls_connect(
        tls_addr,
        &tls_client(&roots, &[b"h2", b"http/1.1"], ALL_VERSIONS),
    )
    .await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2_old = h2_over(s).await;
    let a = send_h2(
        &mut h2_old,
        keyed(
            &format!("https://localhost:{}/tls2", tls_addr.port()),
            &secret,
        ),
    )
    .await
    .unwrap();
    check_upstream_saw(&a, "HTTP/2 over TLS");
    assert_eq!(a.headers["x-test-version"], "HTTP/2.0");

    // TLS 1.2 is still offered (for older clients); nothing below it exists in rustls.
    let s = tls_connect(
        tls_addr,
        &tls_client(&roots, &[b"http/1.1"], &[&rustls::version::TLS12]),
    )
    .await;
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let a = send_h1(&mut h1_over(s).await, keyed("/tls12", &secret))
        .await
        .unwrap();
    check_upstream_saw(&a, "TLS 1.2");

    // Renewal: certbot-style replacement of both files, picked up by the watcher.
    let watcher = keygate::reload::watch(gw.running.reloader.clone()).expect("watch the files");
    let dir = gw.dir.path();
    write_atomically(&dir.join("key.pem"), &key2);
    write_atomically(&dir.join("cert.pem"), &cert2);
    let connector = tls_client(&roots, &[b"h2", b"http/1.1"], ALL_VERSIONS);
    let s = eventually("new connections to get the new certificate", || async {
        let s = tls_connect(tls_addr, &connector).await;
        (peer_cert(&s) == der2).then_some(s)
    })
    .await;
    let a = send_h2(
        &mut h2_over(s).await,
        keyed(
            &format!("https://localhost:{}/tls3", tls_addr.port()),
            &secret,
        ),
    )
    .await
    .unwrap();
    check_upstream_saw(&a, "HTTP/2 with the new certificate");

    // Connections opened before the swap keep working.
    let a = send_h1(&mut h1_old, keyed("/tls1-again", &secret))
        .await
        .unwrap();
    check_upstream_saw(&a, "HTTP/1.1 connection from before the swap");
    let a = send_h2(
        &mut h2_old,
        keyed(
            &format!("https://localhost:{}/tls2-again", tls_addr.port()),
            &secret,
        ),
    )
    .await
    .unwrap();
    check_upstream_saw(&a, "HTTP/2 connection from before the swap");

    // Without the watcher, files changed on disk are not picked up until an explicit
    // certificate reload, which applies at once.
    drop(watcher);
    std::fs::write(dir.join("key.pem"), &key1).unwrap();
    std::fs::write(dir.join("cert.pem"), &cert1).unwrap();
    assert_eq!(peer_cert(&tls_connect(tls_addr, &connector).await), der2);
    gw.running.reloader.reload_certificate();
    assert_eq!(peer_cert(&tls_connect(tls_addr, &connector).await), der1);
}

// ---------------------------------------------------------------------------------------
// 6. PROXY protocol
// ---------------------------------------------------------------------------------------

/// A PROXY v2 header for TCP over IPv4 (`command` 0x21 = PROXY, 0x20 = LOCAL).
fn proxy_v2(command: u8, src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    if command == 0x20 {
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return h;
    }
    h.extend_from_slice(&[command, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h
}

/// Sends `header`, then one HTTP/1.1 request with `headers` on the same connection.
async fn via_proxy(
    addr: SocketAddr,
    header: &[u8],
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let mut tx = h1_over(tcp).await;
    let mut req = Request::get(path).header("host", "gateway.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(BOUND, send_h1(&mut tx, req.body(Full::default()).unwrap()))
        .await
        .expect("an answer in time")
        .unwrap()
}

/// Reads until the peer closes (or fails); returns what was read.
async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(BOUND, tcp.read(&mut buf))
            .await
            .expect("the gateway closes the connection in time")
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_gives_the_client_address() {
    let up = start_upstream().await;
    let gw = start_gateway_with(|dir| {
        let text = app_config(dir, up, "proxy_protocol = true\ntrusted_proxies = []\n", "");
        text.replace(
            "default = \"none\"",
            "default = \"none\"\nfailed_auth_per_ip = \"3/1m\"",
        )
    })
    .await;
    let (_, secret) = gw.operator_key();
    let addr = gw.addr();
    let auth = [
        ("x-api-key", secret.as_str()),
        ("x-forwarded-for", "1.2.3.4"),
    ];

    // v1, with the request in the same write as the header.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let raw = format!(
        "PROXY TCP4 203.0.113.9 127.0.0.1 51234 8080\r\nGET /pp1 HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {secret}\r\n\
         X-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let got = String::from_utf8_lossy(&read_until_closed(&mut tcp).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.contains(r#""x-forwarded-for":"203.0.113.9""#),
        "the upstream did not see the PROXY v1 address: {got}"
    );

    // v1 again through a client, reading the upstream's view properly.
    let a = via_proxy(
        addr,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 51234 8080\r\n",
        "/pp1b",
        &auth,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream_headers(&a)["x-forwarded-for"], "203.0.113.9");

    // v1 over IPv6, and v1 UNKNOWN (the balancer does not know: the TCP peer is the client).
    let a = via_proxy(
        addr,
        b"PROXY TCP6 2001:db8::9 ::1 51234 8080\r\n",
        "/pp6",
        &auth,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream_headers(&a)["x-forwarded-for"], "2001:db8::9");
    let a = via_proxy(addr, b"PROXY UNKNOWN\r\n", "/pp-unknown", &auth).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream_headers(&a)["x-forwarded-for"], "127.0.0.1");

    // v2 PROXY.
    let a = via_proxy(
        addr,
        &proxy_v2(0x21, [198, 51, 100, 7], 51234, [127, 0, 0, 1], 8080),
        "/pp2",
        &auth,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream_headers(&a)["x-forwarded-for"], "198.51.100.7");

    // v2 LOCAL (a load balancer's health check): the TCP peer is the client.
    let a = via_proxy(
        addr,
        &proxy_v2(0x20, [0; 4], 0, [0; 4], 0),
        "/pp-local",
        &auth,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream_headers(&a)["x-forwarded-for"], "127.0.0.1");

    // No PROXY header: closed without an HTTP answer.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET /plain HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {secret}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut tcp).await;
    assert!(
        got.is_empty(),
        "answered a connection without a PROXY header: {:?}",
        String::from_utf8_lossy(&got)
    );

    // The failed-auth lockout counts per PROXY address, not per (shared) TCP peer.
    let bad = [("x-api-key", "not-a-key")];
    let locked = [203, 0, 113, 50];
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let a = via_proxy(
            addr,
            &proxy_v2(0x21, locked, 40000, [127, 0, 0, 1], 8080),
            "/x",
            &bad,
        )
        .await;
        statuses.push(a.status.as_u16());
        if a.status == 429 {
            assert_eq!(a.code(), "too_many_failures", "{a:?}");
            break;
        }
        assert_eq!(a.code(), "invalid_key", "{a:?}");
    }
    assert_eq!(
        statuses.last(),
        Some(&429),
        "no lockout after repeated bad keys: {statuses:?}"
    );
    let a = via_proxy(
        addr,
        &proxy_v2(0x21, [203, 0, 113, 51], 40000, [127, 0, 0, 1], 8080),
        "/x",
        &bad,
    )
    .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNAUTHORIZED, "invalid_key".to_string()),
        "another client address was locked out: {a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_header_precedes_the_tls_handshake() {
    let up = start_upstream().await;
    let (cert, key, der) = self_signed();
    let gw = start_tls_gateway(up, "proxy_protocol = true\n", &cert, &key).await;
    let (_, secret) = gw.operator_key();
    let tls_addr = gw.running.tls_addr.unwrap();
    let mut tcp = TcpStream::connect(tls_addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.77 127.0.0.1 51234 8443\r\n")
        .await
        .unwrap();
    let connector = tls_client(&[der], &[b"h2"], ALL_VERSIONS);
    let s = tokio::time::timeout(
        BOUND,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tx = h2_over(s).await;
    let a = send_h2(
        &mut tx,
        keyed(
            &format!("https://localhost:{}/pp-tls", tls_addr.port()),
            &secret,
        ),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let h = upstream_headers(&a);
    assert_eq!(h["x-forwarded-for"], "203.0.113.77", "{h}");
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
}

// ---------------------------------------------------------------------------------------
// 7. Readiness during a graceful shutdown
// ---------------------------------------------------------------------------------------

fn readyz() -> Request<Full<Bytes>> {
    Request::get("/readyz")
        .header("host", "admin.test")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_draining() {
    let mut up = gated_upstream().await;
    let gw =
        start_gateway_with(|dir| app_config(dir, up.addr, "shutdown_grace = \"30s\"\n", "")).await;
    let (_, secret) = gw.operator_key();
    let (addr, admin) = (gw.addr(), gw.running.admin_addr);

    // A load balancer's keep-alive connection to the admin port, opened before shutdown.
    let mut probe = h1_over(TcpStream::connect(admin).await.unwrap()).await;
    let a = send_h1(&mut probe, readyz()).await.unwrap();
    assert_eq!(a.status, 200, "{a:?}");

    // A slow request keeps the gateway draining.
    let s = secret.clone();
    let slow = tokio::spawn(async move { get(addr, "/slow", &[("x-api-key", &s)]).await });
    tokio::time::timeout(BOUND, up.arrived.recv())
        .await
        .expect("the slow request reached the upstream")
        .unwrap();

    gw.running.shutdown();
    // Readiness turns 503 at once, before the listeners close...
    let a = send_h1(&mut probe, readyz())
        .await
        .expect("/readyz on the open admin connection right after shutdown began");
    assert_eq!(a.status, 503, "{a:?}");
    // Shutdown has begun once the data plane refuses new connections.
    eventually("the data plane to stop accepting", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the in-flight request ended before it was released"
    );

    // ...and stays 503 while the in-flight request drains: on the open connection...
    let a = send_h1(&mut probe, readyz()).await;
    let a = a.unwrap_or_else(|e| {
        panic!("the admin keep-alive connection could not ask /readyz during the drain ({e}): readiness can never be seen as 503")
    });
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.json()["status"], "draining", "{a:?}");
    // ...and on a new connection, as a Kubernetes probe makes one each time.
    let fresh = TcpStream::connect(admin).await;
    let fresh = fresh
        .unwrap_or_else(|e| panic!("the admin listener refuses probes during the drain ({e})"));
    let a = send_h1(&mut h1_over(fresh).await, readyz()).await.unwrap();
    assert_eq!(a.status, 503, "{a:?}");

    up.release.notify_one();
    let a = tokio::time::timeout(BOUND, slow)
        .await
        .expect("the slow request finished")
        .unwrap();
    assert_eq!(
        (a.status, &a.body[..]),
        (StatusCode::OK, &b"slow done"[..]),
        "{a:?}"
    );
    tokio::time::timeout(BOUND, gw.running.wait())
        .await
        .expect("the gateway stopped after draining");
}
