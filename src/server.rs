//! Listeners and connections: accept, HTTP/1.1 + h2c (auto-detected), upgrades, header-read
//! and idle timeouts, and graceful shutdown (stop accepting, drain, exit).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::Request;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::AdminApi;
use crate::answer::Answer;
use crate::audit::Actor;
use crate::body::RequestBody;
use crate::clock::CoarseStopwatch;
use crate::config::Config;
use crate::direct::DirectUpstream;
use crate::gateway::Gateway;
use crate::h1server;
use crate::hugepages;
use crate::keyindex::KeyIndex;
use crate::keys::SecretHasher;
use crate::manage::{KeyManager, KeySpec};
use crate::proxy::ConnInfo;
use crate::proxyproto::{self, Prefixed};
use crate::reload::{self, Reloader};
use crate::store::Store;
use crate::tls::{self, load_certified_key, CertResolver};
use crate::usage::Usage;
use crate::workers::Workers;
use tokio_rustls::TlsAcceptor;

/// Per-connection timeouts.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Max time to receive a request's headers.
    pub header_read_timeout: Duration,
    /// Close a connection with no traffic and no request in flight for this long.
    pub idle_timeout: Duration,
    /// Expect a PROXY protocol header first.
    pub proxy_protocol: bool,
}

/// Something that answers requests on a listener.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; `direct` is the client connection's own upstream connection.
    /// The request is lent: a handler that needs it owned takes it out (`std::mem::replace`),
    /// and keygate's own server path reuses what is left (its header map's memory) for the
    /// connection's next request.
    fn handle(
        &self,
        req: &mut Request<RequestBody>,
        conn: ConnInfo,
        direct: &Arc<DirectUpstream>,
    ) -> impl Future<Output = Answer> + Send;
    /// Timeouts for a new connection.
    fn conn_settings(&self) -> ConnSettings;
    /// True when HTTP/1.1 connections start on keygate's own server path (`h1server`)
    /// rather than hyper's.
    fn own_http1(&self) -> bool {
        false
    }
}

impl Handler for Gateway {
    fn handle(
        &self,
        req: &mut Request<RequestBody>,
        conn: ConnInfo,
        direct: &Arc<DirectUpstream>,
    ) -> impl Future<Output = Answer> + Send {
        Gateway::handle(self, req, conn, direct)
    }

    fn conn_settings(&self) -> ConnSettings {
        let rt = self.runtime.load();
        let server = &rt.config.server;
        ConnSettings {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            proxy_protocol: server.proxy_protocol,
        }
    }

    fn own_http1(&self) -> bool {
        true
    }
}

/// Marks "not waiting for request headers".
const NOT_WAITING: u64 = u64::MAX;

/// Last I/O time, requests in flight, and since when request headers are awaited, for one
/// connection's idle and header-read timeouts. (hyper's own header timer also runs between
/// keep-alive requests, which would cut idle connections at `header_read_timeout`.)
struct Activity {
    clock: CoarseStopwatch,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    headers_since_ms: AtomicU64,
    read_any: AtomicBool,
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            clock: CoarseStopwatch::start(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            // From accept, the first request's headers are awaited.
            headers_since_ms: AtomicU64::new(0),
            read_any: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes arrived: on an idle HTTP/1 connection they start the next request's headers.
    fn on_read(&self, first_bytes: &[u8]) {
        self.touch();
        if !self.read_any.swap(true, Ordering::Relaxed) && first_bytes.starts_with(b"PRI * HTTP/2")
        {
            // HTTP/2 sends pings and settings between requests; it has no header phase to time.
            self.http2.store(true, Ordering::Relaxed);
            self.headers_since_ms.store(NOT_WAITING, Ordering::Relaxed);
            return;
        }
        if !self.http2.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.headers_since_ms.load(Ordering::Relaxed) == NOT_WAITING
        {
            self.headers_since_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A request's headers are complete.
    fn on_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.headers_since_ms.store(NOT_WAITING, Ordering::Relaxed);
    }

    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        self.clock.at(self.last_ms.load(Ordering::Relaxed), idle)
    }

    /// When the awaited request headers are overdue, if headers are awaited.
    fn header_deadline(&self, timeout: Duration) -> Option<tokio::time::Instant> {
        let since = self.headers_since_ms.load(Ordering::Relaxed);
        (since != NOT_WAITING).then(|| self.clock.at(since, timeout))
    }
}

/// A stream that records when bytes last moved.
struct ActivityStream<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read(&buf.filled()[before..]);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decrements the in-flight count when a request's handler finishes.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serves one connection until it closes, the idle timeout fires, or shutdown drains it:
/// on keygate's own HTTP/1.1 path while its requests fit it (`http1_first`, for a handler
/// that has one), then on hyper's.
async fn serve_connection<H, S>(
    stream: S,
    conn: ConnInfo,
    handler: Arc<H>,
    settings: ConnSettings,
    shutdown: watch::Receiver<bool>,
    http1_first: bool,
) where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let direct = Arc::new(DirectUpstream::default());
    let stream = if http1_first && handler.own_http1() {
        let served = h1server::serve(stream, conn, &*handler, settings, shutdown.clone(), &direct);
        tokio::pin!(served);
        // The direct upstream connection hyper's client may hold is polled right here, as
        // in `serve_with_hyper`.
        let ended = std::future::poll_fn(|cx| {
            direct.poll_drive(cx);
            let polled = served.as_mut().poll(cx);
            if polled.is_pending() {
                direct.poll_drive(cx);
            }
            polled
        })
        .await;
        match ended {
            h1server::Ended::Closed => return,
            h1server::Ended::HandOff(stream) => stream,
        }
    } else {
        Prefixed::new(stream)
    };
    serve_with_hyper(stream, conn, handler, settings, shutdown, direct).await;
}

/// Serves a connection with hyper (HTTP/1.1 and h2c, upgrades) until it closes, the idle
/// timeout fires, or shutdown drains it.
async fn serve_with_hyper<H, S>(
    stream: S,
    conn: ConnInfo,
    handler: Arc<H>,
    settings: ConnSettings,
    mut shutdown: watch::Receiver<bool>,
    direct: Arc<DirectUpstream>,
) where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(ActivityStream {
        inner: stream,
        activity: activity.clone(),
    });
    let svc_activity = activity.clone();
    let svc_direct = direct.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let direct = svc_direct.clone();
        svc_activity.on_request();
        let guard = InFlight(svc_activity.clone());
        async move {
            let mut req = req.map(RequestBody::from);
            let resp = handler
                .handle(&mut req, conn, &direct)
                .await
                .into_response();
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Enforced below instead, only while a request's headers are actually awaited.
        .header_read_timeout(None)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut draining = *shutdown.borrow();
    if draining {
        connection.as_mut().graceful_shutdown();
    }
    // One timer for the nearer of the idle and header-read deadlines, and a stop signal that
    // is polled only once it has fired: this loop runs on every wake of the connection, so it
    // checks two cheap flags instead of polling timers and channels each time.
    let probe = shutdown.clone();
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    tokio::pin!(stop);
    let next_deadline = |activity: &Activity| {
        let idle = activity.idle_deadline(settings.idle_timeout);
        let next = match activity.header_deadline(settings.header_read_timeout) {
            Some(h) if h < idle => h,
            _ => idle,
        };
        // A request in flight past the idle deadline keeps the connection: look again later
        // rather than spinning on a deadline already passed.
        next.max(tokio::time::Instant::now() + Duration::from_millis(100))
    };
    let timer = tokio::time::sleep_until(next_deadline(&activity));
    tokio::pin!(timer);
    let mut timer_registered = false;
    let mut stop_registered = false;
    enum Wake {
        Closed(Result<(), Box<dyn std::error::Error + Send + Sync>>),
        Stop,
        Timer,
    }
    loop {
        let wake = std::future::poll_fn(|cx| {
            // The direct upstream connection is polled right here, before (to deliver
            // responses) and after (to send what a handler just queued) the client side.
            direct.poll_drive(cx);
            if let Poll::Ready(res) = connection.as_mut().poll(cx) {
                return Poll::Ready(Wake::Closed(res));
            }
            direct.poll_drive(cx);
            if !draining && (!stop_registered || probe.has_changed().unwrap_or(true)) {
                stop_registered = true;
                if stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stop);
                }
            }
            if !timer_registered || timer.is_elapsed() {
                timer_registered = true;
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Closed(res) => {
                if let Err(e) = res {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                }
                break;
            }
            Wake::Stop => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            Wake::Timer => {
                let now = tokio::time::Instant::now();
                let quiet = activity.in_flight.load(Ordering::Relaxed) == 0;
                let overdue = activity
                    .header_deadline(settings.header_read_timeout)
                    .is_some_and(|d| now >= d);
                if overdue && quiet {
                    // Slow or silent clients (slowloris) are cut, not drained.
                    tracing::debug!(peer = %conn.peer, "closing a connection whose request headers did not arrive in time");
                    break;
                }
                let idle = now >= activity.idle_deadline(settings.idle_timeout);
                if idle && quiet && !draining {
                    tracing::debug!(peer = %conn.peer, "closing idle connection");
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                timer.as_mut().reset(next_deadline(&activity));
                timer_registered = false;
            }
        }
    }
}

/// Reads the PROXY header (when configured) and the TLS handshake (on a TLS listener),
/// bounded by the header-read timeout, then serves HTTP.
async fn accept_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let settings = handler.conn_settings();
    let _ = stream.set_nodelay(true);
    let (stream, client) = if settings.proxy_protocol {
        match tokio::time::timeout(settings.header_read_timeout, proxyproto::accept(stream)).await {
            Ok(Ok((stream, addr))) => (stream, addr.unwrap_or(peer)),
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "closing a connection without a valid PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %peer, "closing a connection that sent no PROXY header in time");
                return;
            }
        }
    } else {
        (Prefixed::new(stream), peer)
    };
    let conn = ConnInfo {
        peer: client,
        tls: tls.is_some(),
    };
    match tls {
        None => serve_connection(stream, conn, handler, settings, shutdown, true).await,
        Some(acceptor) => {
            match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await
            {
                Ok(Ok(tls_stream)) => {
                    // A client that chose HTTP/2 by ALPN goes straight to hyper.
                    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_connection(tls_stream, conn, handler, settings, shutdown, !h2).await
                }
                Ok(Err(e)) => tracing::debug!(peer = %client, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %client, "TLS handshake timed out"),
            }
        }
    }
}

/// Accepts on `listener` until `shutdown` turns true, then waits up to `grace()` for open
/// connections to finish. Connections are served on `workers` when given, else on the
/// current runtime.
pub async fn serve_listener<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    grace: impl Fn() -> Duration,
    tls: Option<TlsAcceptor>,
    workers: Option<Arc<Workers>>,
) {
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    let shutdown = shutdown.clone();
                    let open = open_tx.clone();
                    let tls = tls.clone();
                    // Handed over as a std stream: it registers with the reactor of the
                    // runtime that serves it (a worker's, or this one).
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(peer = %peer, error = %e, "cannot hand a connection over");
                            continue;
                        }
                    };
                    let task = async move {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => accept_connection(stream, peer, handler, tls, shutdown).await,
                            Err(e) => tracing::warn!(peer = %peer, error = %e, "cannot hand a connection over"),
                        }
                        drop(open);
                    };
                    match &workers {
                        Some(workers) => workers.spawn(task),
                        None => {
                            tokio::spawn(task);
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(open_tx);
    let grace = grace();
    if tokio::time::timeout(grace, open_rx.recv()).await.is_err() {
        tracing::warn!(grace = ?grace, "connections still open after the shutdown grace; closing them");
    }
}

/// A gateway started in this process.
pub struct Running {
    /// Data-plane address actually bound.
    pub data_addr: SocketAddr,
    /// Admin API address actually bound.
    pub admin_addr: SocketAddr,
    /// TLS data-plane address, when `[server.tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    /// Reloads configuration and certificates.
    pub reloader: Arc<Reloader>,
    /// The shared state.
    pub gateway: Arc<Gateway>,
    /// The key store.
    pub store: Arc<Store>,
    /// Key management bound to the live index.
    pub manager: Arc<KeyManager>,
    /// The admin key minted on first start of an empty store (shown once).
    pub bootstrap_secret: Option<String>,
    begin_shutdown: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    // Dropped last: stops the data-plane worker threads.
    _workers: Arc<Workers>,
}

impl Running {
    /// Begins graceful shutdown: readiness turns 503 at once; after `drain_delay` the data
    /// plane stops accepting and drains; the admin API stays up until it has.
    pub fn shutdown(&self) {
        self.gateway.draining.store(true, Ordering::Relaxed);
        let _ = self.begin_shutdown.send(true);
    }

    /// Waits until every listener has drained (or its grace ran out), then flushes usage.
    pub async fn wait(self) {
        let _ = self.supervisor.await;
        for t in self.background {
            t.abort();
            // Wait for it to stop so the store is not in use once `wait` returns.
            let _ = t.await;
        }
        let usage = self.gateway.usage.clone();
        match tokio::task::spawn_blocking(move || usage.flush()).await {
            Ok(Ok(n)) => tracing::info!(requests = n, "final usage flush"),
            Ok(Err(e)) => tracing::error!(error = %e, "final usage flush failed"),
            Err(e) => tracing::error!(error = %e, "final usage flush panicked"),
        }
    }
}

/// Mints the first admin key when the store has never had one.
fn bootstrap(
    store: &Store,
    manager: &KeyManager,
    config: &Config,
) -> anyhow::Result<Option<String>> {
    const MARK: &str = "bootstrapped";
    if store.meta_get(MARK)?.is_some() {
        return Ok(None);
    }
    let minted = if store.key_count()? == 0 {
        let spec = KeySpec {
            name: Some("bootstrap admin".into()),
            role: Some("admin".into()),
            description: Some(
                "minted on first start; rotate or revoke once you have your own admin keys".into(),
            ),
            ..Default::default()
        };
        let v = manager
            .create(config, &spec, &Actor::local())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        v["secret"].as_str().map(str::to_string)
    } else {
        None
    };
    store.meta_set(MARK, b"1")?;
    Ok(minted)
}

/// Opens the store, loads the keys and starts the listeners and background tasks.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = Arc::new(Store::open(&config.store.path)?);
    let loaded = Instant::now();
    let (keys, count) = KeyIndex::from_store(&store).context("loading keys")?;
    let keys = Arc::new(keys);
    tracing::info!(keys = count, elapsed_ms = loaded.elapsed().as_millis() as u64, store = %config.store.path.display(), "key store loaded");
    let usage = Arc::new(Usage::new(store.clone())?);
    let hasher = SecretHasher::from_env();
    let mut manager = KeyManager::new(store.clone(), Some(keys.clone()), hasher.clone());
    manager.usage = usage.clone();
    let manager = Arc::new(manager);
    let bootstrap_secret = bootstrap(&store, &manager, &config)?;

    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    let data_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let tls = match &config.server.tls {
        None => None,
        Some(t) => {
            let key = load_certified_key(&t.cert, &t.key).map_err(anyhow::Error::msg)?;
            let resolver = Arc::new(CertResolver::new(key));
            let acceptor = TlsAcceptor::from(tls::server_config(resolver.clone())?);
            let l = TcpListener::bind(t.listen)
                .await
                .with_context(|| format!("cannot listen on {} (server.tls.listen)", t.listen))?;
            Some((l, acceptor, resolver))
        }
    };
    let workers =
        Arc::new(Workers::start(config.server.workers).context("cannot start the worker threads")?);
    tracing::info!(workers = workers.len(), "data-plane workers started");
    let config_path = config.source.clone();
    let gateway = Arc::new(Gateway::new(config, keys, hasher, usage.clone()));
    let admin = Arc::new(AdminApi {
        gateway: gateway.clone(),
        manager: manager.clone(),
        usage: usage.clone(),
    });

    let (begin_shutdown, begin_rx) = watch::channel(false);
    let (data_stop, shutdown_rx) = watch::channel(false);
    let (admin_stop, admin_rx) = watch::channel(false);
    let grace_of = |gw: Arc<Gateway>| move || gw.runtime.load().config.server.shutdown_grace;
    let data = tokio::spawn(serve_listener(
        listener,
        gateway.clone(),
        shutdown_rx.clone(),
        grace_of(gateway.clone()),
        None,
        Some(workers.clone()),
    ));
    let mut listeners = vec![data];
    let mut tls_addr = None;
    let mut resolver = None;
    if let Some((l, acceptor, r)) = tls {
        tls_addr = Some(l.local_addr()?);
        resolver = Some(r);
        listeners.push(tokio::spawn(serve_listener(
            l,
            gateway.clone(),
            shutdown_rx.clone(),
            grace_of(gateway.clone()),
            Some(acceptor),
            Some(workers.clone()),
        )));
        tracing::info!(listen = ?tls_addr, "TLS data plane listening");
    }
    let admin_task = tokio::spawn(serve_listener(
        admin_listener,
        admin,
        admin_rx,
        grace_of(gateway.clone()),
        None,
        None,
    ));
    let supervisor = tokio::spawn(supervise_shutdown(
        gateway.clone(),
        begin_rx,
        data_stop,
        listeners,
        admin_stop,
        admin_task,
    ));
    let reloader = Arc::new(Reloader::new(gateway.clone(), config_path, resolver));
    let flusher = tokio::spawn(usage_flusher(gateway.clone()));
    tracing::info!(listen = %data_addr, "data plane listening");
    tracing::info!(listen = %admin_addr, "admin API listening");
    hugepages::move_key_memory_in_background(count);
    Ok(Running {
        data_addr,
        admin_addr,
        tls_addr,
        reloader,
        gateway,
        store,
        manager,
        bootstrap_secret,
        begin_shutdown,
        supervisor,
        background: vec![flusher],
        _workers: workers,
    })
}

/// Orders shutdown: readiness is already 503; wait `drain_delay` so load balancers notice,
/// stop and drain the data plane, then the admin API.
async fn supervise_shutdown(
    gateway: Arc<Gateway>,
    mut begin: watch::Receiver<bool>,
    data_stop: watch::Sender<bool>,
    data: Vec<JoinHandle<()>>,
    admin_stop: watch::Sender<bool>,
    admin: JoinHandle<()>,
) {
    while !*begin.borrow_and_update() {
        if begin.changed().await.is_err() {
            break;
        }
    }
    let delay = gateway.runtime.load().config.server.drain_delay;
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "readiness is 503; waiting drain_delay before closing the listeners");
        tokio::time::sleep(delay).await;
    }
    let _ = data_stop.send(true);
    for t in data {
        let _ = t.await;
    }
    let _ = admin_stop.send(true);
    let _ = admin.await;
}

/// Flushes usage every `usage_flush_interval`, prunes old days hourly, and keeps the
/// failed-auth limiter's memory bounded.
async fn usage_flusher(gateway: Arc<Gateway>) {
    let background = match LowPriority::start("keygate-usage") {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the usage flush thread; usage is only written at shutdown");
            return;
        }
    };
    let mut last_prune: Option<Instant> = None;
    loop {
        let (interval, retention) = {
            let rt = gateway.runtime.load();
            (
                rt.config.store.usage_flush_interval,
                rt.config.store.usage_retention_days,
            )
        };
        tokio::time::sleep(interval).await;
        let usage = gateway.usage.clone();
        let prune = last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
        let result = background
            .run(move || {
                let flushed = usage.flush_due();
                let pruned = if prune {
                    Some(usage.prune(retention))
                } else {
                    None
                };
                (flushed, pruned)
            })
            .await;
        match result {
            Ok((flushed, pruned)) => {
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "usage flush failed");
                }
                if let Some(p) = pruned {
                    last_prune = Some(Instant::now());
                    match p {
                        Ok(n) if n > 0 => tracing::info!(rows = n, "pruned old usage"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "usage pruning failed"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "usage flush task failed"),
        }
        gateway.failed_auth.housekeeping();
    }
}

/// A thread at the lowest CPU priority (nice 19) for the periodic usage flush: when it shares
/// a core with the data plane, request latency wins over the flush (measured: the flush on
/// the same core at equal priority drove the p99 of benches/load.sh).
struct LowPriority {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl LowPriority {
    fn start(name: &str) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if !crate::workers::lower_thread_priority() {
                    tracing::debug!("cannot lower the usage flush thread's priority");
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(LowPriority { jobs })
    }

    /// Runs `f` on the thread and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, &'static str> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| "the flush thread has stopped")?;
        rx.await.map_err(|_| "the flush job panicked")
    }
}

/// Tells systemd (when it started us with `Type=notify`) what we are doing.
fn sd_notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `keygate serve`: runs until SIGTERM/SIGINT, reloading on file changes and SIGHUP, then
/// drains gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    crate::logging::init(&config.log);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let running = start(config).await?;
    if let Some(secret) = &running.bootstrap_secret {
        // The one time this secret is shown: printed, never logged.
        println!(
            "\nFirst start with an empty key store: minted an admin key.\n\n    {secret}\n\nStore it now (e.g. export KEYGATE_ADMIN_KEY=...); it will not be shown again.\n"
        );
    }
    let _watcher = match reload::watch(running.reloader.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration for changes; reload with SIGHUP");
            None
        }
    };
    sd_notify(&[sd_notify::NotifyState::Ready]);
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                sd_notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::monotonic_usec_now()?]);
                let r = running.reloader.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                sd_notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    };
    tracing::info!(
        signal,
        "shutting down: no new connections, finishing in-flight requests"
    );
    sd_notify(&[sd_notify::NotifyState::Stopping]);
    running.shutdown();
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}
