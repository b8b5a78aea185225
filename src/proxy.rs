//! Forwarding: header rewriting both ways (hop-by-hop, credential, X-Forwarded-*, identity
//! headers), the pooled upstream client, streaming bodies and HTTP upgrades.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;

use crate::body::{self, Body, RequestBody};
use crate::clock::CoarseStopwatch;
use crate::config::{AuthConfig, Deployment};
use crate::direct::DirectUpstream;
use crate::error::GatewayError;
use crate::h1upstream::write_header_line;
use crate::keyindex::LiveKey;

/// The pooled client used for one deployment.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// When a request body last moved on its way upstream (on the coarse clock: it is read for
/// every body frame, and the timeouts it serves are seconds long).
struct Progress {
    clock: CoarseStopwatch,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            clock: CoarseStopwatch::start(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.clock.elapsed_ms(), Ordering::Relaxed);
    }

    /// `timeout` after the body last moved (or after the start, for a body never polled).
    fn deadline(&self, timeout: Duration) -> tokio::time::Instant {
        self.clock.at(self.last_ms.load(Ordering::Relaxed), timeout)
    }
}

/// A client's request body streamed to the upstream, noting each frame, so the deployment
/// timeout measures the upstream's silence rather than how long the upload takes.
pub struct UpstreamBody {
    inner: RequestBody,
    progress: Arc<Progress>,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if res.is_ready() {
            self.progress.touch();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Headers that describe one hop only (RFC 9110 §7.6.1) and are never forwarded.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// `X-Keygate-Key-Id`.
pub static H_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
/// `X-Keygate-Key-Name`.
pub static H_KEY_NAME: HeaderName = HeaderName::from_static("x-keygate-key-name");
/// `X-Keygate-Owner`.
pub static H_OWNER: HeaderName = HeaderName::from_static("x-keygate-owner");
/// `X-Keygate-Role`.
pub static H_ROLE: HeaderName = HeaderName::from_static("x-keygate-role");
/// `X-Keygate-Scopes`.
pub static H_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
/// `X-Keygate-Deployment`.
pub static H_DEPLOYMENT: HeaderName = HeaderName::from_static("x-keygate-deployment");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// True when the request asks for a protocol upgrade (WebSocket and the like).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True for a `Connection` token that names a header [`HOP_BY_HOP`] removes anyway, or an
/// option that names no header (`close`, `keep-alive`).
fn known_connection_token(token: &str) -> bool {
    token.eq_ignore_ascii_case("close")
        || HOP_BY_HOP
            .iter()
            .any(|h| token.eq_ignore_ascii_case(h.as_str()))
}

/// Removes hop-by-hop headers and those named in `Connection`. With `keep_upgrade`, the
/// `Connection: upgrade` / `Upgrade` pair survives (for upgrade requests and 101 answers).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the (few) names instead of a hash probe per hop-by-hop name: most
    // messages carry none, or only `Connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut has_upgrade = false;
    for name in headers.keys() {
        let text = name.as_str();
        // Hop-by-hop names are 2, 7, 10 or 16–19 bytes long: most names are ruled out by
        // their length alone.
        if !matches!(text.len(), 2 | 7 | 10 | 16..=19) {
            continue;
        }
        if *name == header::UPGRADE {
            has_upgrade = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h.as_str() == text) {
            present[i] = true;
        }
    }
    if present.contains(&true) {
        if present[0] {
            let named: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !known_connection_token(t))
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for name in named {
                if !(keep_upgrade && name == header::UPGRADE) {
                    headers.remove(&name);
                }
            }
        }
        for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if has_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Removes every client-sent `X-Keygate-*` header (they are ours to set).
pub fn strip_keygate_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| k.as_str().starts_with("x-keygate-")) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-keygate-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(&n);
    }
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// Maps IPv4-mapped IPv6 addresses to IPv4 so `127.0.0.1/32` matches `::ffff:127.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client address: the peer, or — when the peer is a trusted proxy — the first
/// untrusted address in `X-Forwarded-For` counting from the right.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut candidate = peer;
    let entries = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','));
    for entry in entries {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                let ip = canonical(ip);
                candidate = ip;
                if !is_trusted(ip, trusted) {
                    return ip;
                }
            }
            // A garbled entry ends the trusted chain; the last good hop is the client.
            Err(_) => return candidate,
        }
    }
    candidate
}

/// Facts about the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// Remote address.
    pub peer: std::net::SocketAddr,
    /// True for the TLS listener.
    pub tls: bool,
}

thread_local! {
    /// The last peer address formatted as a header value on this thread: connections from
    /// one client or load balancer repeat it, and formatting allocates.
    static PEER_HEADER: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `ip` as a header value, formatted once while it repeats.
fn peer_header(ip: IpAddr) -> HeaderValue {
    PEER_HEADER.with(|cell| {
        let mut cached = cell.borrow_mut();
        match &*cached {
            Some((last, v)) if *last == ip => v.clone(),
            _ => {
                let v = HeaderValue::from_str(&ip.to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
                *cached = Some((ip, v.clone()));
                v
            }
        }
    })
}

/// The `X-Forwarded-*` headers a request goes upstream with, following the
/// `trusted_proxies` rules: for each, `Some(value)` replaces what the client sent, `None`
/// leaves it as sent; `host: Some(None)` removes it.
pub struct Forwarded {
    /// `X-Forwarded-For`.
    pub for_: Option<HeaderValue>,
    /// `X-Forwarded-Proto`.
    pub proto: Option<HeaderValue>,
    /// `X-Forwarded-Host`.
    pub host: Option<Option<HeaderValue>>,
}

impl Forwarded {
    /// Works out the headers for a request with `headers` from `conn`.
    pub fn new(
        headers: &HeaderMap,
        conn: &ConnInfo,
        host: Option<&HeaderValue>,
        trusted: &[IpNet],
    ) -> Self {
        let peer = canonical(conn.peer.ip());
        let from_trusted = is_trusted(peer, trusted);
        let existing: Vec<&str> = if from_trusted {
            headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        } else {
            Vec::new()
        };
        let for_ = if existing.is_empty() {
            Some(peer_header(peer))
        } else {
            HeaderValue::from_str(&format!("{}, {peer}", existing.join(", "))).ok()
        };
        let proto = (!(from_trusted && headers.contains_key(&X_FORWARDED_PROTO)))
            .then(|| HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
        let host =
            (!(from_trusted && headers.contains_key(&X_FORWARDED_HOST))).then(|| host.cloned());
        Forwarded { for_, proto, host }
    }

    /// Sets them in a header map.
    pub fn apply(self, headers: &mut HeaderMap) {
        if let Some(v) = self.for_ {
            headers.insert(&X_FORWARDED_FOR, v);
        }
        if let Some(v) = self.proto {
            headers.insert(&X_FORWARDED_PROTO, v);
        }
        match self.host {
            Some(Some(v)) => {
                headers.insert(&X_FORWARDED_HOST, v);
            }
            Some(None) => {
                headers.remove(&X_FORWARDED_HOST);
            }
            None => {}
        }
    }

    /// True for a header whose client-sent values these replace (or remove).
    fn replaces(&self, name: &HeaderName) -> bool {
        (self.for_.is_some() && *name == X_FORWARDED_FOR)
            || (self.proto.is_some() && *name == X_FORWARDED_PROTO)
            || (self.host.is_some() && *name == X_FORWARDED_HOST)
    }

    /// Writes the headers these set as HTTP/1.1 header lines.
    fn write(&self, out: &mut Vec<u8>) {
        let set = [
            (&X_FORWARDED_FOR, self.for_.as_ref()),
            (&X_FORWARDED_PROTO, self.proto.as_ref()),
            (
                &X_FORWARDED_HOST,
                self.host.as_ref().and_then(Option::as_ref),
            ),
        ];
        for (name, value) in set {
            if let Some(v) = value {
                write_header_line(out, name, v.as_bytes());
            }
        }
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host` following the `trusted_proxies` rules.
pub fn set_forwarded_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    trusted: &[IpNet],
) {
    Forwarded::new(headers, conn, host, trusted).apply(headers);
}

/// What keygate does to a request's headers on its way upstream: client-sent `X-Keygate-*`,
/// the credential (unless `forward_key`), hop-by-hop fields and `Host` go; the forwarded
/// and identity headers come. keygate's own HTTP/1.1 client applies it while writing the
/// request head (the header map is never changed); hyper's path and echo apply it to the
/// map ([`Rewrite::apply`]). A test checks that both give the same fields.
pub struct Rewrite<'a> {
    /// `X-Forwarded-*`.
    pub forwarded: Forwarded,
    /// `X-Keygate-*`.
    pub identity: Identity<'a>,
    /// Where the credential came from.
    pub auth: &'a AuthConfig,
    /// An upgrade request: its `Connection: upgrade` / `Upgrade` pair stays.
    pub upgrade: bool,
}

impl<'a> Rewrite<'a> {
    /// The rewrite of a request with `headers` (`host`: its `Host`, or its URI's authority)
    /// from `conn`. A `Connection` field naming other fields is applied to the map right
    /// away (rare): the fields it names are hop-by-hop for this request only.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        headers: &mut HeaderMap,
        conn: &ConnInfo,
        host: Option<&HeaderValue>,
        trusted: &[IpNet],
        auth: &'a AuthConfig,
        identity: Identity<'a>,
        upgrade: bool,
    ) -> Self {
        if names_fields(headers) {
            strip_hop_by_hop(headers, upgrade);
        }
        Rewrite {
            forwarded: Forwarded::new(headers, conn, host, trusted),
            identity,
            auth,
            upgrade,
        }
    }

    /// Applies it to a header map (hyper's path, echo).
    pub fn apply(self, headers: &mut HeaderMap) {
        strip_keygate_headers(headers);
        strip_credential(headers, self.auth);
        strip_hop_by_hop(headers, self.upgrade);
        headers.remove(header::HOST);
        // Room for the additions at once, not one growth at a time.
        headers.reserve(9);
        self.forwarded.apply(headers);
        set_identity_headers(headers, self.identity.key, self.identity.deployment);
    }
}

/// True when a `Connection` field names a field that is not hop-by-hop anyway.
fn names_fields(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| {
            !t.is_empty() && !t.eq_ignore_ascii_case("keep-alive") && !known_connection_token(t)
        })
}

impl crate::h1upstream::HeadEdits for Rewrite<'_> {
    fn skips(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        let text = name.as_str();
        crate::h1upstream::is_hop_by_hop(text.as_bytes())
            || *name == header::HOST
            || text.starts_with("x-keygate-")
            || self.forwarded.replaces(name)
            || (!self.auth.forward_key
                && (*name == self.auth.header
                    || (self.auth.bearer && *name == header::AUTHORIZATION && is_bearer(value))))
    }

    fn write(&self, out: &mut Vec<u8>) {
        self.forwarded.write(out);
        self.identity.write(out);
    }
}

/// Who a request was admitted as: what the identity headers upstream say.
#[derive(Clone, Copy)]
pub struct Identity<'a> {
    /// The key.
    pub key: &'a LiveKey,
    /// The deployment the request goes to.
    pub deployment: &'a Deployment,
}

impl Identity<'_> {
    /// The identity headers, as (name, value) pairs.
    fn fields(&self) -> [(&'static HeaderName, &[u8]); 6] {
        [
            (&H_KEY_ID, self.key.id_bytes()),
            (&H_KEY_NAME, self.key.name_bytes()),
            (&H_OWNER, self.key.owner_bytes()),
            (&H_ROLE, self.key.role.as_str().as_bytes()),
            (&H_SCOPES, self.key.scopes_bytes()),
            (&H_DEPLOYMENT, self.deployment.name_header.as_bytes()),
        ]
    }

    /// Writes the identity headers as HTTP/1.1 header lines (for `h1upstream`). The values
    /// are header-safe: key strings are filtered when the live key is built, and deployment
    /// names are validated with the config.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in self.fields() {
            write_header_line(out, name, value);
        }
    }
}

/// Adds the identity headers for `key` on `deployment` (the same fields as
/// [`Identity::write`], as zero-copy header values; a test checks they agree).
pub fn set_identity_headers(headers: &mut HeaderMap, key: &LiveKey, deployment: &Deployment) {
    headers.insert(&H_KEY_ID, key.hv_id());
    headers.insert(&H_KEY_NAME, key.hv_name());
    headers.insert(&H_OWNER, key.hv_owner());
    headers.insert(&H_ROLE, key.hv_role());
    headers.insert(&H_SCOPES, key.hv_scopes());
    headers.insert(&H_DEPLOYMENT, deployment.name_header.clone());
}

/// Removes the credential that authenticated the request, unless `forward_key` is set.
pub fn strip_credential(headers: &mut HeaderMap, auth: &AuthConfig) {
    if auth.forward_key {
        return;
    }
    headers.remove(&auth.header);
    if auth.bearer && headers.contains_key(header::AUTHORIZATION) {
        // Only our Bearer credential goes; another scheme (Basic…) is the upstream's business.
        // Every Authorization field is looked at: the Bearer one need not be the first.
        let all = headers.get_all(header::AUTHORIZATION).iter().count();
        let kept: Vec<HeaderValue> = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter(|v| !is_bearer(v))
            .cloned()
            .collect();
        if kept.len() != all {
            headers.remove(header::AUTHORIZATION);
            for v in kept {
                headers.append(header::AUTHORIZATION, v);
            }
        }
    }
}

/// True for an `Authorization` value with the Bearer scheme (as `auth` reads it).
fn is_bearer(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
}

/// Removes the key's query parameter from a query string; `None` when nothing is left.
pub fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The origin-form URI sent upstream: base path + (optionally prefix-stripped) path +
/// query. The client's URI is reused as is when nothing changes (no allocation).
pub fn origin_form(
    original: &Uri,
    base_path: &str,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, GatewayError> {
    if base_path.is_empty()
        && original.scheme().is_none()
        && path.len() == original.path().len()
        && query == original.query()
    {
        return Ok(original.clone());
    }
    let mut pq =
        String::with_capacity(base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base_path);
    pq.push_str(path);
    if pq.is_empty() {
        pq.push('/');
    }
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    Uri::try_from(pq).map_err(|_| GatewayError::UpstreamUnavailable)
}

fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Where one deployment's requests go.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// The `Host` header sent upstream (the port only when not the scheme's default).
    pub host: HeaderValue,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
}

impl UpstreamTarget {
    /// The target for an upstream at `scheme://authority`.
    pub fn new(scheme: Scheme, authority: Authority, connect_timeout: Duration) -> Self {
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => HeaderValue::from_str(authority.as_str()),
            _ => HeaderValue::from_str(authority.host()),
        }
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        UpstreamTarget {
            scheme,
            authority,
            host,
            connect_timeout,
        }
    }
}

/// Waits for `fut` until `timeout` after the request body last moved.
async fn within<F: std::future::Future>(
    progress: &Progress,
    timeout: Duration,
    fut: F,
) -> Result<F::Output, GatewayError> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            res = fut.as_mut() => return Ok(res),
            _ = tokio::time::sleep_until(progress.deadline(timeout)) => {
                if tokio::time::Instant::now() >= progress.deadline(timeout) {
                    return Err(GatewayError::UpstreamTimeout);
                }
            }
        }
    }
}

fn upstream_error(e: &(dyn std::error::Error + 'static)) -> GatewayError {
    tracing::debug!(error = %e, "upstream request failed");
    if is_timeout(e) {
        GatewayError::UpstreamTimeout
    } else {
        GatewayError::UpstreamUnavailable
    }
}

/// Sends on the shared pool; `req` has an origin-form URI and no `Host` (the pool sets it).
async fn send_pooled(
    client: &UpstreamClient,
    target: &UpstreamTarget,
    mut req: Request<UpstreamBody>,
    progress: &Progress,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| GatewayError::UpstreamUnavailable)?;
    within(progress, timeout, client.request(req))
        .await?
        .map_err(|e| upstream_error(&e))
}

/// Sends on the client connection's own upstream connection, opening it when needed; a
/// request the upstream never saw (its keep-alive connection had just closed) is sent once
/// more on a fresh connection. Falls back to the pool when no direct connection is to be had.
async fn send_direct(
    direct: &DirectUpstream,
    client: &UpstreamClient,
    target: &UpstreamTarget,
    mut req: Request<UpstreamBody>,
    progress: &Progress,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let mut retried = false;
    loop {
        let lease = match direct.take(&target.authority) {
            Some(lease) => Some(lease),
            // Boxed: these rarely-run futures would otherwise enlarge (and make costlier
            // to move) every request's future.
            None => Box::pin(direct.connect(&target.authority, target.connect_timeout)).await?,
        };
        let Some(mut lease) = lease else {
            return Box::pin(send_pooled(client, target, req, progress, timeout)).await;
        };
        if within(progress, timeout, lease.sender.ready())
            .await?
            .is_err()
        {
            // Closed before we could use it; nothing was sent.
            if retried {
                return Err(GatewayError::UpstreamUnavailable);
            }
            retried = true;
            continue;
        }
        req.headers_mut().insert(header::HOST, target.host.clone());
        match within(progress, timeout, lease.sender.try_send_request(req)).await? {
            Ok(resp) => {
                direct.give_back(&target.authority, lease);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !retried => {
                    retried = true;
                    req = unsent;
                    req.headers_mut().remove(header::HOST);
                }
                _ => return Err(upstream_error(e.error())),
            },
        }
    }
}

/// Sends `req` (origin-form URI, no `Host`) upstream and streams the answer back. `timeout`
/// bounds the wait for the response headers, counted from when the request body last moved
/// (so a long upload that keeps moving is not cut, and a stalled one is). Plain-HTTP
/// requests go on the client connection's own upstream connection (`direct`); upgrade
/// requests go through the pool and are spliced to the upstream's upgraded connection.
// Not an `async fn`, whose future would hold each argument twice (see `Gateway::handle`).
#[allow(clippy::manual_async_fn)]
pub fn forward<'a>(
    client: &'a UpstreamClient,
    direct: &'a Arc<DirectUpstream>,
    target: &'a UpstreamTarget,
    req: &'a mut Request<RequestBody>,
    rewrite: Rewrite<'a>,
    timeout: Duration,
) -> impl Future<Output = Result<Response<Body>, GatewayError>> + Send + 'a {
    async move {
        let upgrade = is_upgrade_request(req);
        if !upgrade
            && target.scheme == Scheme::HTTP
            && http_body::Body::is_end_stream(req.body())
            && req.method() != Method::CONNECT
        {
            // The commonest request, without a body: keygate's own HTTP/1.1 exchange.
            let sent = crate::h1upstream::exchange(
                direct,
                target,
                req.method(),
                req.uri(),
                req.headers(),
                // Applied while writing the request head: the header map stays as it came.
                &rewrite,
                timeout,
            )
            .await?;
            if let Some(resp) = sent {
                // Its fields travel with the body, hop-by-hop ones already left out.
                return Ok(resp.map(body::raw));
            }
        }
        // hyper's path takes the request (its body streams upstream). Boxed: it is the rarer
        // path, and its futures would otherwise make every request's future larger (and each
        // move of it costlier).
        let req = std::mem::replace(req, Request::new(RequestBody::Empty));
        Box::pin(forward_with_hyper(
            client, direct, target, req, rewrite, timeout, upgrade,
        ))
        .await
    }
}

/// [`forward`] through hyper's client: requests with a body, upgrades, `https://`, and
/// whatever keygate's own client could not take.
async fn forward_with_hyper(
    client: &UpstreamClient,
    direct: &Arc<DirectUpstream>,
    target: &UpstreamTarget,
    mut req: Request<RequestBody>,
    rewrite: Rewrite<'_>,
    timeout: Duration,
    upgrade: bool,
) -> Result<Response<Body>, GatewayError> {
    rewrite.apply(req.headers_mut());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    *req.version_mut() = Version::HTTP_11;
    let progress = Arc::new(Progress::new());
    let req = req.map(|inner| UpstreamBody {
        inner,
        progress: progress.clone(),
    });
    let resp = if !upgrade && target.scheme == Scheme::HTTP {
        send_direct(direct, client, target, req, &progress, timeout).await?
    } else {
        Box::pin(send_pooled(client, target, req, &progress, timeout)).await?
    };
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let mut resp = resp;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, upstream_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut upstream_io = TokioIo::new(upstream_io);
                    if let Err(e) =
                        tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await
                    {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    let (mut parts, incoming) = resp.into_parts();
    // A length beside Transfer-Encoding is not the body's (RFC 9112 §6.3): the body was
    // decoded by its chunks and is framed afresh towards the client, so the length goes.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, switching && upgrade);
    // The client's hop speaks keygate's own version (RFC 9110 §7.6.2); an HTTP/1.0 answer
    // from the upstream must not turn the client connection into a one-shot one.
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, body::stream(incoming)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarded headers keygate's own HTTP/1.1 writer sends (client fields it skips,
    /// plus the lines it writes) are what hyper's path gets by setting them in the map.
    #[test]
    fn written_forwarded_headers_match_the_header_map_ones() {
        let peers = ["127.0.0.1:5000", "203.0.113.9:5000"];
        let hosts = [Some(HeaderValue::from_static("api.example")), None];
        for peer in peers {
            for host in &hosts {
                for sent in [false, true] {
                    let mut h = HeaderMap::new();
                    h.insert("accept", HeaderValue::from_static("*/*"));
                    if sent {
                        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.7"));
                        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
                        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("front.example"));
                    }
                    let conn = ConnInfo {
                        peer: peer.parse().unwrap(),
                        tls: false,
                    };
                    let mut map = h.clone();
                    set_forwarded_headers(&mut map, &conn, host.as_ref(), &trusted());
                    let mut from_map: Vec<String> = map
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .collect();
                    let fwd = Forwarded::new(&h, &conn, host.as_ref(), &trusted());
                    let mut out = Vec::new();
                    fwd.write(&mut out);
                    let mut written: Vec<String> = h
                        .iter()
                        .filter(|(n, _)| !fwd.replaces(n))
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .chain(String::from_utf8(out).unwrap().lines().map(str::to_string))
                        .collect();
                    from_map.sort();
                    written.sort();
                    assert_eq!(written, from_map, "peer {peer}, host {host:?}, sent {sent}");
                }
            }
        }
        // An untrusted peer's own values replace whatever it sent, host included (removed).
        let conn = ConnInfo {
            peer: "203.0.113.9:5000".parse().unwrap(),
            tls: true,
        };
        let fwd = Forwarded::new(&HeaderMap::new(), &conn, None, &trusted());
        assert!(fwd.replaces(&X_FORWARDED_FOR) && fwd.replaces(&X_FORWARDED_HOST));
    }

    /// A config with an echo deployment `billing`, and a viewer key named "CI pipeline" on it
    /// with the scopes `read` and `data:read`.
    fn billing_viewer() -> (crate::config::Config, LiveKey) {
        let config = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[[deployments]]\nname = \"billing\"\nupstream = \"echo\"\n",
        )
        .unwrap();
        let hasher = crate::keys::SecretHasher::new(None);
        let (record, _) = crate::keys::KeyRecord::issue(
            "CI pipeline".into(),
            crate::keys::Role::Viewer,
            vec!["read".into(), "data:read".into()],
            vec!["billing".into()],
            &hasher,
        )
        .unwrap();
        (config, LiveKey::from_record(&record))
    }

    /// The identity headers keygate's own HTTP/1.1 writer sends are the ones hyper's path
    /// sets in the header map, in the same order.
    #[test]
    fn written_identity_headers_match_the_header_map_ones() {
        let (config, key) = billing_viewer();
        let deployment = &config.deployments[0];
        let mut map = HeaderMap::new();
        set_identity_headers(&mut map, &key, deployment);
        let from_map: Vec<String> = map
            .iter()
            .map(|(n, v)| format!("{n}: {}\r\n", v.to_str().unwrap()))
            .collect();
        let mut written = Vec::new();
        Identity {
            key: &key,
            deployment,
        }
        .write(&mut written);
        assert_eq!(String::from_utf8(written).unwrap(), from_map.concat());
        assert_eq!(map.len(), 6);
        assert_eq!(map["x-keygate-scopes"], "read,data:read");
    }

    /// keygate's own client writes what hyper's path gets by rewriting the header map:
    /// the map's fields it does not skip plus the lines it writes, for requests with
    /// hop-by-hop fields, client-sent identity headers, credentials in every place and
    /// forwarded headers from trusted and untrusted peers.
    #[test]
    fn written_rewrite_matches_the_header_map_rewrite() {
        use crate::h1upstream::HeadEdits;
        let (config, key) = billing_viewer();
        let deployment = &config.deployments[0];
        let requests: [&[(&str, &str)]; 5] = [
            &[
                ("host", "api.example"),
                ("x-api-key", "k"),
                ("accept", "*/*"),
            ],
            &[
                ("host", "api.example"),
                ("authorization", "Bearer k"),
                ("authorization", "Basic Zm9v"),
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("x-keygate-role", "admin"),
                ("X-Keygate-Key-Id", "forged"),
            ],
            &[
                ("connection", "close, x-secret-hop"),
                ("x-secret-hop", "1"),
                ("x-forwarded-for", "198.51.100.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "front.example"),
                ("upgrade", "h2c"),
                ("proxy-authorization", "Basic x"),
            ],
            &[
                ("transfer-encoding", "chunked"),
                ("trailer", "x-t"),
                ("x-api-key", "k"),
            ],
            &[("user-agent", "curl"), ("accept", "a"), ("accept", "b")],
        ];
        for forward_key in [false, true] {
            let mut auth = config.auth.clone();
            auth.forward_key = forward_key;
            for fields in requests {
                for peer in ["127.0.0.1:5000", "203.0.113.9:5000"] {
                    let mut map = HeaderMap::new();
                    for (n, v) in fields {
                        map.append(
                            HeaderName::from_bytes(n.as_bytes()).unwrap(),
                            HeaderValue::from_static(v),
                        );
                    }
                    let conn = ConnInfo {
                        peer: peer.parse().unwrap(),
                        tls: false,
                    };
                    let host = map.get(header::HOST).cloned();
                    let rewrite = |map: &mut HeaderMap| {
                        Rewrite::new(
                            map,
                            &conn,
                            host.as_ref(),
                            &trusted(),
                            &auth,
                            Identity {
                                key: &key,
                                deployment,
                            },
                            false,
                        )
                    };
                    let mut applied = map.clone();
                    rewrite(&mut applied).apply(&mut applied);
                    let mut from_map: Vec<String> = applied
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .collect();
                    let edits = rewrite(&mut map);
                    let mut out = Vec::new();
                    edits.write(&mut out);
                    let mut written: Vec<String> = map
                        .iter()
                        .filter(|(n, v)| !edits.skips(n, v))
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .chain(String::from_utf8(out).unwrap().lines().map(str::to_string))
                        .collect();
                    from_map.sort();
                    written.sort();
                    assert_eq!(
                        written, from_map,
                        "{fields:?} from {peer}, forward_key {forward_key}"
                    );
                    assert!(!written.iter().any(|l| l.starts_with("x-secret-hop")));
                }
            }
        }
    }

    fn trusted() -> Vec<IpNet> {
        vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn client_ip_from_trusted_chain() {
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 5.6.7.8, 10.0.0.2"),
        );
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &trusted()).to_string(), "5.6.7.8");
        let untrusted: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(untrusted, &h, &trusted()).to_string(), "9.9.9.9");
        assert_eq!(
            client_ip(peer, &HeaderMap::new(), &trusted()).to_string(),
            "127.0.0.1"
        );
    }

    #[test]
    fn only_bearer_authorization_fields_are_removed() {
        let auth = crate::config::Config::parse(std::path::Path::new("t.toml"), "")
            .unwrap()
            .auth;
        for order in [["Basic Zm9v", "Bearer k"], ["bearer k", "Basic Zm9v"]] {
            let mut h = HeaderMap::new();
            for v in order {
                h.append(header::AUTHORIZATION, HeaderValue::from_static(v));
            }
            strip_credential(&mut h, &auth);
            let left: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
            assert_eq!(left, ["Basic Zm9v"], "{order:?}");
        }
    }

    #[test]
    fn query_param_removed() {
        assert_eq!(
            strip_query_param("a=1&api_key=x&b=2", "api_key").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_query_param("api_key=x", "api_key"), None);
    }
}
