//! The data plane's request pipeline over one immutable configuration snapshot per request:
//! route → (failed-auth guard) → authenticate → authorise → rate limit → forward → count
//! usage and metrics → access log.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use crate::answer::Answer;
use crate::auth::{authorize, extract_credential, Verifier};
use crate::body::{self, Body, RequestBody};
use crate::clock::unix_now;
use crate::config::{AuthConfig, Config, Upstream};
use crate::direct::DirectUpstream;
use crate::error::GatewayError;
use crate::keyindex::{KeyIndex, LiveKey};
use crate::keys::{check_secret_format, SecretHasher};
use crate::keystate::KeyLines;
use crate::metrics::{DeploymentCounters, Gauges, Metrics};
use crate::proxy::{self, ConnInfo, UpstreamClient, UpstreamTarget};
use crate::ratelimit::{Decision, FailedAuth, KeyLimits};
use crate::router::{self, RouteMatch};
use crate::usage::{Hit, Operation, Usage};

/// What is built from one deployment's config.
struct DeploymentRuntime {
    client: Option<UpstreamClient>,
    target: Option<UpstreamTarget>,
    name: Arc<str>,
    /// One operation per route rule, made once (requests refer to them, cloning nothing).
    route_operations: Vec<Operation>,
    counters: Arc<DeploymentCounters>,
}

/// A configuration snapshot with what is built from it.
pub struct Runtime {
    /// The validated configuration.
    pub config: Config,
    deployments: Vec<DeploymentRuntime>,
}

impl Runtime {
    /// Builds clients and counters for a configuration.
    pub fn new(config: Config, metrics: &Metrics) -> Self {
        let deployments = config
            .deployments
            .iter()
            .map(|d| DeploymentRuntime {
                client: match d.upstream {
                    Upstream::Echo => None,
                    Upstream::Http { .. } => match crate::upstream::build_client(d.connect_timeout, d.ca_file.as_deref()) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            // Validation loads the CA file too, so this is a race with an edit.
                            tracing::error!(deployment = %d.name, error = %e, "cannot build the upstream client; requests will get 502");
                            None
                        }
                    },
                },
                target: match &d.upstream {
                    Upstream::Echo => None,
                    Upstream::Http {
                        scheme, authority, ..
                    } => Some(UpstreamTarget::new(
                        scheme.clone(),
                        authority.clone(),
                        d.connect_timeout,
                    )),
                },
                name: Arc::from(d.name.as_str()),
                route_operations: d
                    .routes
                    .iter()
                    .map(|r| Operation::Route(Arc::from(r.name.as_str())))
                    .collect(),
                counters: metrics.deployment(&d.name),
            })
            .collect();
        Runtime {
            config,
            deployments,
        }
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
    /// Per-key rate limits (the limiters live in each key's state).
    pub limits: KeyLimits,
    /// Failed authentications per client IP.
    pub failed_auth: FailedAuth,
    /// Usage counters.
    pub usage: Arc<Usage>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Set once shutdown has begun (readiness turns 503).
    pub draining: AtomicBool,
}

/// What one request did, for usage, metrics and the access log.
#[derive(Default)]
pub struct Outcome {
    /// Unix seconds when the decision was made (read once per request).
    now: i64,
    key: Option<Arc<LiveKey>>,
    deployment: Option<usize>,
    operation: Option<OperationRef>,
    error: Option<&'static str>,
    authorized: bool,
    rate: Option<Decision>,
}

/// The operation a request counts under, as the outcome records it: a route rule by index
/// into its deployment's operations, or the method.
enum OperationRef {
    Route(usize),
    Method(Method),
}

impl Outcome {
    /// The operation, resolved in `rt` (borrowed for a route rule).
    fn operation<'a>(&self, rt: &'a Runtime) -> Option<Cow<'a, Operation>> {
        match self.operation.as_ref()? {
            OperationRef::Route(i) => rt
                .deployments
                .get(self.deployment?)?
                .route_operations
                .get(*i)
                .map(Cow::Borrowed),
            OperationRef::Method(m) => Some(Cow::Owned(Operation::Method(m.clone()))),
        }
    }

    /// Records the error a request ended with.
    pub fn fail(&mut self, e: &GatewayError) {
        self.error = Some(e.code());
    }
}

fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn counts_as_failed_auth(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::MissingKey | GatewayError::InvalidKey | GatewayError::AmbiguousCredentials
    )
}

impl Gateway {
    /// A gateway serving `config` with the keys in `keys`, counting usage into `usage`.
    pub fn new(
        config: Config,
        keys: Arc<KeyIndex>,
        hasher: SecretHasher,
        usage: Arc<Usage>,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        let failed_auth = FailedAuth::new();
        failed_auth.configure(config.rate_limit.failed_auth_per_ip);
        Gateway {
            runtime: ArcSwap::from_pointee(Runtime::new(config, &metrics)),
            keys,
            hasher,
            limits: KeyLimits::new(),
            failed_auth,
            usage,
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// Replaces the configuration snapshot; requests in flight keep the one they started with.
    pub fn apply_config(&self, config: Config) {
        self.failed_auth
            .configure(config.rate_limit.failed_auth_per_ip);
        self.runtime
            .store(Arc::new(Runtime::new(config, &self.metrics)));
    }

    /// The metrics text with current gauges.
    pub fn render_metrics(&self) -> String {
        let gauges = Gauges {
            keys_loaded: self.keys.len() as u64,
            usage_pending: self.usage.pending(),
            usage_flush_seconds: self
                .usage
                .last_flush_micros
                .load(std::sync::atomic::Ordering::Relaxed) as f64
                / 1e6,
        };
        self.metrics.render(&gauges)
    }

    /// Handles one data-plane request: one access-log line, usage and metrics. `direct` is
    /// the client connection's own upstream connection.
    // Not an `async fn`: that copies its arguments into locals at the start (the block below
    // holds each once).
    #[allow(clippy::manual_async_fn)]
    pub fn handle<'a, 'd, 'r>(
        &'a self,
        req: &'r mut Request<RequestBody>,
        conn: ConnInfo,
        direct: &'d Arc<DirectUpstream>,
    ) -> impl Future<Output = Answer> + Send + use<'a, 'd, 'r> {
        async move {
            let rt = self.runtime.load_full();
            // The access line needs these after the request is gone; copy them only when it is
            // written.
            let logged = tracing::enabled!(target: "keygate::access", tracing::Level::INFO)
                .then(|| (req.method().clone(), req.uri().clone(), Instant::now()));
            let ip = proxy::client_ip(
                conn.peer.ip(),
                req.headers(),
                &rt.config.server.trusted_proxies,
            );
            let user_agent = req.headers().get(header::USER_AGENT).cloned();
            let mut out = Outcome::default();
            let resp = match self.process(&rt, req, &conn, direct, ip, &mut out).await {
                Ok(r) => r,
                Err(e) => {
                    out.fail(&e);
                    e.to_response()
                }
            };
            let status = resp.status().as_u16();
            self.account(&rt, &out, status, ip, user_agent.as_ref());
            let answer = Answer {
                response: resp,
                rate: out.rate,
            };
            let Some((method, uri, start)) = logged else {
                return answer;
            };
            let dep = out.deployment.and_then(|i| rt.deployments.get(i));
            tracing::info!(
                target: "keygate::access",
                client_ip = %ip,
                method = %method,
                path = uri.path(),
                status,
                key_id = out.key.as_ref().map(|k| k.id_str()),
                deployment = dep.map(|d| &*d.name),
                operation = out.operation(&rt).as_deref().map(Operation::as_str),
                error = out.error,
                latency_us = start.elapsed().as_micros() as u64,
                "request"
            );
            answer
        }
    }

    /// Credential → live key under the per-IP failed-auth lockout, shared by the data plane
    /// and the admin API: a locked address gets 429 without a lookup for credentials that
    /// cannot be keys; failures for which `counts` holds are counted and become 429 once the
    /// address is over its limit.
    pub fn identify_guarded(
        &self,
        auth: &AuthConfig,
        headers: &HeaderMap,
        query: Option<&str>,
        ip: IpAddr,
        now: i64,
        counts: fn(&GatewayError) -> bool,
    ) -> Result<Arc<LiveKey>, GatewayError> {
        let blocked = self.failed_auth.blocked(ip);
        let identified = extract_credential(headers, query, auth).and_then(|cred| {
            if let Some(retry) = blocked {
                if check_secret_format(cred.secret, &auth.prefix, &auth.environments).is_none() {
                    return Err(GatewayError::TooManyFailures {
                        retry_after_seconds: retry,
                    });
                }
            }
            Verifier {
                index: &self.keys,
                hasher: &self.hasher,
                auth,
            }
            .identify(cred.secret, now)
        });
        match identified {
            Err(e) if counts(&e) => match self.failed_auth.record_failure(ip).or(blocked) {
                Some(retry) => Err(GatewayError::TooManyFailures {
                    retry_after_seconds: retry,
                }),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Counts a finished request: per-deployment and auth metrics, and the key's usage.
    /// Memory only: no I/O, no lock held beyond a map shard.
    pub fn account(
        &self,
        rt: &Runtime,
        out: &Outcome,
        status: u16,
        ip: IpAddr,
        user_agent: Option<&HeaderValue>,
    ) {
        let dep = out.deployment.and_then(|i| rt.deployments.get(i));
        match dep {
            Some(d) => d.counters.count(status),
            None => self.metrics.count_unrouted(status),
        }
        if out.authorized || out.error.is_some_and(|c| c != "no_route") {
            let ok = out.authorized && out.error.is_none_or(|c| c.starts_with("upstream"));
            self.metrics
                .count_auth(if ok { "ok" } else { out.error.unwrap_or("ok") });
        }
        if let (Some(key), Some(d), Some(op)) = (&out.key, dep, out.operation(rt)) {
            let state = self.usage.key_states().of(key);
            self.usage.record(Hit {
                state,
                deployment: &d.name,
                operation: &op,
                status,
                now: if out.now != 0 { out.now } else { unix_now() },
                ip,
                user_agent,
            });
            key.note_counter(state.recent.address());
        }
    }

    /// Route → credential → key → deployment/scope → rate limit for one request head: the
    /// decision `handle` makes before forwarding (public so benchmarks measure exactly it).
    #[allow(clippy::too_many_arguments)]
    pub fn admit<'r, 'o>(
        &self,
        rt: &'r Runtime,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        host: Option<&str>,
        ip: IpAddr,
        out: &'o mut Outcome,
    ) -> Result<(RouteMatch<'r>, &'o LiveKey), GatewayError> {
        let Some(m) = router::route(&rt.config, host, uri.path(), method) else {
            return Err(GatewayError::NoRoute);
        };
        self.note_route(rt, &m, method, out);
        let key = self.check(rt, headers, uri.query(), &m, method, ip, out)?;
        Ok((m, key))
    }

    async fn process(
        &self,
        rt: &Runtime,
        req: &mut Request<RequestBody>,
        conn: &ConnInfo,
        direct: &Arc<DirectUpstream>,
        ip: IpAddr,
        out: &mut Outcome,
    ) -> Result<Response<Body>, GatewayError> {
        let cfg = &rt.config;
        if let Some(fa) = cfg.auth.forward_auth_path.as_deref() {
            if router::segment_prefix(req.uri().path(), fa) {
                return self.forward_auth(rt, req, fa, ip, out);
            }
        }
        let (m, key) = self.admit(
            rt,
            req.method(),
            req.uri(),
            req.headers(),
            request_host(req),
            ip,
            out,
        )?;
        // The TSC through quanta: ~12 ns a reading, where `Instant::now` costs ~30 ns on
        // virtual machines.
        let started = quanta::Instant::now();
        // Boxed: every enclosing future (process, handle, the connection's) would otherwise
        // carry and copy the forwarding future. At 2.3 KB, unboxed, the moves cost more than
        // the allocation; at 728 bytes (round three) the two measured even.
        let result = Box::pin(self.forward(rt, req, conn, direct, &m, key)).await;
        if result.is_ok()
            || matches!(
                result,
                Err(GatewayError::UpstreamTimeout | GatewayError::UpstreamUnavailable)
            )
        {
            self.metrics.observe_upstream(started.elapsed());
        }
        result
    }

    fn note_route(&self, rt: &Runtime, m: &RouteMatch<'_>, method: &Method, out: &mut Outcome) {
        out.deployment = Some(m.index);
        let rule = m.route_index.filter(|&i| {
            rt.deployments
                .get(m.index)
                .is_some_and(|d| i < d.route_operations.len())
        });
        out.operation = Some(match rule {
            Some(i) => OperationRef::Route(i),
            None => OperationRef::Method(method.clone()),
        });
    }

    /// Failed-auth guard → credential → key → deployment/scope → rate limit.
    #[allow(clippy::too_many_arguments)]
    fn check<'o>(
        &self,
        rt: &Runtime,
        headers: &HeaderMap,
        query: Option<&str>,
        m: &RouteMatch<'_>,
        method: &Method,
        ip: IpAddr,
        out: &'o mut Outcome,
    ) -> Result<&'o LiveKey, GatewayError> {
        let cfg = &rt.config;
        out.now = unix_now();
        let key = self.identify_guarded(
            &cfg.auth,
            headers,
            query,
            ip,
            out.now,
            counts_as_failed_auth,
        )?;
        // The outcome keeps the key (for usage and the log) and the caller borrows it from
        // there: no second reference count per request.
        let key: &LiveKey = out.key.insert(key);
        authorize(key, m.deployment, m.route, method)?;
        let decision = self.limits.check(
            &self.usage.key_states().of(key).limiter,
            cfg.limit_for(key.role, key.rate_limit.as_ref()),
        );
        out.rate = Some(decision);
        if let Decision::Denied {
            limit,
            retry_after,
            window,
            ..
        } = decision
        {
            return Err(GatewayError::RateLimited {
                limit,
                window_seconds: window,
                retry_after_seconds: retry_after,
            });
        }
        out.authorized = true;
        Ok(key)
    }

    /// Sends the admitted request upstream. The request is borrowed, not moved, down this
    /// chain (each async layer would otherwise hold its own copy, and every copy is moved
    /// per request); only the paths that need it owned (hyper's, echo) take it out.
    async fn forward(
        &self,
        rt: &Runtime,
        req: &mut Request<RequestBody>,
        conn: &ConnInfo,
        direct: &Arc<DirectUpstream>,
        m: &RouteMatch<'_>,
        key: &LiveKey,
    ) -> Result<Response<Body>, GatewayError> {
        let cfg = &rt.config;
        let d = m.deployment;
        let upgrade = proxy::is_upgrade_request(req);
        let host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let rewrite = proxy::Rewrite::new(
            req.headers_mut(),
            conn,
            host.as_ref(),
            &cfg.server.trusted_proxies,
            &cfg.auth,
            proxy::Identity { key, deployment: d },
            upgrade,
        );

        let uri = req.uri();
        let path = if d.strip_prefix {
            router::strip_segment_prefix(uri.path(), &d.path_prefix)
        } else {
            uri.path()
        };
        let stripped_query;
        let query = match (&cfg.auth.query_param, uri.query()) {
            (Some(name), Some(q)) if !cfg.auth.forward_key => {
                stripped_query = proxy::strip_query_param(q, name);
                stripped_query.as_deref()
            }
            (_, q) => q,
        };
        let runtime = rt.deployments.get(m.index);
        match (
            &d.upstream,
            runtime.and_then(|r| r.client.as_ref().zip(r.target.as_ref())),
        ) {
            (Upstream::Http { base_path, .. }, Some((client, target))) => {
                *req.uri_mut() = proxy::origin_form(uri, base_path, path, query)?;
                // Noted now, while in cache; prefetched when the answer's head is in (see
                // `KeyLines`).
                let lines = KeyLines::of(key, self.usage.key_states().of(key));
                proxy::forward(client, direct, target, req, rewrite, d.timeout)
                    .await
                    .inspect(|_| lines.prefetch())
            }
            (Upstream::Http { .. }, None) => Err(GatewayError::UpstreamUnavailable),
            (Upstream::Echo, _) => {
                let pq = match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                *req.uri_mut() = pq
                    .parse()
                    .map_err(|_| GatewayError::invalid("path", "bad path"))?;
                rewrite.apply(req.headers_mut());
                let req = std::mem::replace(req, Request::new(RequestBody::Empty));
                Ok(Box::pin(crate::echo::respond(req)).await)
            }
        }
    }

    /// The forward-auth endpoint (nginx `auth_request`, Traefik `ForwardAuth`, Envoy
    /// `ext_authz`): the same checks on the original request described by headers, no
    /// forwarding; 200 with the identity headers, or the error.
    fn forward_auth(
        &self,
        rt: &Runtime,
        req: &Request<RequestBody>,
        own_path: &str,
        ip: IpAddr,
        out: &mut Outcome,
    ) -> Result<Response<Body>, GatewayError> {
        let cfg = &rt.config;
        let h = req.headers();
        let method = match header_str(h, "x-forwarded-method")
            .or_else(|| header_str(h, "x-original-method"))
        {
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| GatewayError::invalid("x-forwarded-method", "bad method"))?,
            None => req.method().clone(),
        };
        // Envoy appends the original path to the auth service's path prefix.
        let envoy_path = req
            .uri()
            .path()
            .get(own_path.len()..)
            .filter(|p| p.starts_with('/'));
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
        self.note_route(rt, &m, &method, out);
        let key = self.check(rt, h, query, &m, &method, ip, out)?;
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::OK;
        proxy::set_identity_headers(resp.headers_mut(), key, m.deployment);
        Ok(resp)
    }
}
