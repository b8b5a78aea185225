//! The data plane's request pipeline: route → authenticate → authorise → forward → log,
//! over one immutable configuration snapshot per request.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{authorize, extract_credential, Verifier};
use crate::body::{self, Body};
use crate::config::{Config, Upstream};
use crate::error::GatewayError;
use crate::keyindex::{KeyIndex, LiveKey};
use crate::keys::SecretHasher;
use crate::proxy::{self, ConnInfo, UpstreamClient};
use crate::router::{self, RouteMatch};

/// A configuration snapshot with what is built from it (one pooled client per deployment).
pub struct Runtime {
    /// The validated configuration.
    pub config: Config,
    clients: Vec<Option<UpstreamClient>>,
}

impl Runtime {
    /// Builds the clients for a configuration.
    pub fn new(config: Config) -> Self {
        let clients = config
            .deployments
            .iter()
            .map(|d| match d.upstream {
                Upstream::Echo => None,
                Upstream::Http { .. } => Some(proxy::build_client(d.connect_timeout)),
            })
            .collect();
        Runtime { config, clients }
    }
}

/// The shared state of a running gateway.
pub struct Gateway {
    /// The current configuration snapshot (swapped whole on reload).
    pub runtime: ArcSwap<Runtime>,
    /// Live keys.
    pub keys: Arc<KeyIndex>,
    /// Secret hasher.
    pub hasher: SecretHasher,
}

/// What the access log line says about a request.
#[derive(Default)]
struct AccessLog {
    key_id: Option<Arc<LiveKey>>,
    deployment: Option<usize>,
    operation: Option<Box<str>>,
    error: Option<&'static str>,
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

impl Gateway {
    /// A gateway serving `config` with the keys in `keys`.
    pub fn new(config: Config, keys: Arc<KeyIndex>, hasher: SecretHasher) -> Self {
        Gateway { runtime: ArcSwap::from_pointee(Runtime::new(config)), keys, hasher }
    }

    /// Handles one data-plane request, logging one access line.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let rt = self.runtime.load_full();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let client_ip = proxy::client_ip(conn.peer.ip(), req.headers(), &rt.config.server.trusted_proxies);
        let mut log = AccessLog::default();
        let resp = match self.process(&rt, req, &conn, &mut log).await {
            Ok(r) => r,
            Err(e) => {
                log.error = Some(e.code());
                e.to_response()
            }
        };
        let deployment = log.deployment.and_then(|i| rt.config.deployments.get(i)).map(|d| d.name.as_str());
        tracing::info!(
            target: "keygate::access",
            client_ip = %client_ip,
            method = %method,
            path = uri.path(),
            status = resp.status().as_u16(),
            key_id = log.key_id.as_ref().map(|k| &*k.id),
            deployment,
            operation = log.operation.as_deref(),
            error = log.error,
            latency_us = start.elapsed().as_micros() as u64,
            "request"
        );
        resp
    }

    fn verifier<'a>(&'a self, cfg: &'a Config) -> Verifier<'a> {
        Verifier { index: &self.keys, hasher: &self.hasher, auth: &cfg.auth }
    }

    async fn process(&self, rt: &Runtime, req: Request<Incoming>, conn: &ConnInfo, log: &mut AccessLog) -> Result<Response<Body>, GatewayError> {
        let cfg = &rt.config;
        if let Some(fa) = cfg.auth.forward_auth_path.as_deref() {
            if router::segment_prefix(req.uri().path(), fa) {
                return self.forward_auth(cfg, &req, fa, log);
            }
        }
        let m = router::route(cfg, request_host(&req), req.uri().path(), req.method()).ok_or(GatewayError::NoRoute)?;
        log.deployment = Some(m.index);
        log.operation = Some(m.operation(req.method()).into());
        let key = self.check(cfg, req.headers(), req.uri().query(), &m, req.method(), log)?;
        self.forward(rt, req, conn, &m, &key).await
    }

    /// Credential → key → deployment/scope checks.
    fn check(&self, cfg: &Config, headers: &HeaderMap, query: Option<&str>, m: &RouteMatch<'_>, method: &Method, log: &mut AccessLog) -> Result<Arc<LiveKey>, GatewayError> {
        let cred = extract_credential(headers, query, &cfg.auth)?;
        let key = self.verifier(cfg).identify(cred.secret, unix_now())?;
        log.key_id = Some(key.clone());
        authorize(&key, m.deployment, m.route, method)?;
        Ok(key)
    }

    async fn forward(&self, rt: &Runtime, req: Request<Incoming>, conn: &ConnInfo, m: &RouteMatch<'_>, key: &LiveKey) -> Result<Response<Body>, GatewayError> {
        let cfg = &rt.config;
        let d = m.deployment;
        let upgrade = proxy::is_upgrade_request(&req);
        let (mut parts, incoming) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let headers = &mut parts.headers;
        proxy::strip_keygate_headers(headers);
        proxy::strip_credential(headers, &cfg.auth);
        proxy::strip_hop_by_hop(headers, upgrade);
        proxy::set_forwarded_headers(headers, conn, host.as_ref(), &cfg.server.trusted_proxies);
        proxy::set_identity_headers(headers, key, d);
        headers.remove(header::HOST);

        let path = if d.strip_prefix { router::strip_segment_prefix(parts.uri.path(), &d.path_prefix) } else { parts.uri.path() };
        let stripped_query;
        let query = match (&cfg.auth.query_param, parts.uri.query()) {
            (Some(name), Some(q)) if !cfg.auth.forward_key => {
                stripped_query = proxy::strip_query_param(q, name);
                stripped_query.as_deref()
            }
            (_, q) => q,
        };
        match (&d.upstream, rt.clients.get(m.index).and_then(Option::as_ref)) {
            (Upstream::Http { scheme, authority, base_path }, Some(client)) => {
                parts.uri = proxy::upstream_uri(scheme, authority, base_path, path, query)?;
                proxy::forward(client, Request::from_parts(parts, incoming), d.timeout).await
            }
            _ => {
                let pq = match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                parts.uri = pq.parse().map_err(|_| GatewayError::invalid("path", "bad path"))?;
                Ok(crate::echo::respond(Request::from_parts(parts, incoming)).await)
            }
        }
    }

    /// The forward-auth endpoint (nginx `auth_request`, Traefik `ForwardAuth`, Envoy
    /// `ext_authz`): the same checks on the original request described by headers, no
    /// forwarding; 200 with the identity headers, or the error.
    fn forward_auth(&self, cfg: &Config, req: &Request<Incoming>, own_path: &str, log: &mut AccessLog) -> Result<Response<Body>, GatewayError> {
        let h = req.headers();
        let method = match header_str(h, "x-forwarded-method").or_else(|| header_str(h, "x-original-method")) {
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| GatewayError::invalid("x-forwarded-method", "bad method"))?,
            None => req.method().clone(),
        };
        // Envoy appends the original path to the auth service's path prefix.
        let envoy_path = req.uri().path().get(own_path.len()..).filter(|p| p.starts_with('/'));
        let original = header_str(h, "x-forwarded-uri")
            .or_else(|| header_str(h, "x-original-uri"))
            .or(envoy_path)
            .unwrap_or("/");
        let (path, query) = match original.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (original, envoy_path.and(req.uri().query())),
        };
        let host = header_str(h, "x-forwarded-host").or_else(|| request_host(req));
        let m = router::route(cfg, host, path, &method).ok_or(GatewayError::NoRoute)?;
        log.deployment = Some(m.index);
        log.operation = Some(m.operation(&method).into());
        let key = self.check(cfg, h, query, &m, &method, log)?;
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::OK;
        proxy::set_identity_headers(resp.headers_mut(), &key, m.deployment);
        Ok(resp)
    }
}
