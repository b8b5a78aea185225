//! `gateway.toml`: parse → validate → an immutable [`Config`]. Every error names file:line:col.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::keys::Role;
use crate::units::{parse_duration, Limit};

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct ConfigError {
    /// The config file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[server]`: the data-plane listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Max time to receive a request's headers.
    pub header_read_timeout: Duration,
    /// Close a keep-alive connection idle this long.
    pub idle_timeout: Duration,
    /// How long in-flight requests may finish after a stop signal.
    pub shutdown_grace: Duration,
    /// How long to keep accepting after a stop signal while readiness reports 503.
    pub drain_delay: Duration,
    /// Expect a PROXY protocol header on each connection.
    pub proxy_protocol: bool,
    /// Data-plane worker threads (each serves its connections start to end); 0 = one per CPU.
    pub workers: usize,
    /// The optional TLS listener.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: a second data-plane listener speaking TLS (HTTP/1.1 + HTTP/2 by ALPN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[admin]`: the admin API listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
}

/// `[store]`: the redb file and usage bookkeeping.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The redb file (relative paths are relative to the config file's directory).
    pub path: PathBuf,
    /// How often usage counters are flushed to disk.
    pub usage_flush_interval: Duration,
    /// How many days of usage are kept.
    pub usage_retention_days: u32,
}

/// `[auth]`: where credentials come from and what they look like.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Secret prefix (`kg`).
    pub prefix: String,
    /// Allowed environments.
    pub environments: Vec<String>,
    /// Credential header (lower-cased).
    pub header: HeaderName,
    /// Accept `Authorization: Bearer`.
    pub bearer: bool,
    /// Query parameter carrying the key, if enabled.
    pub query_param: Option<String>,
    /// Send the credential on to the upstream.
    pub forward_key: bool,
    /// Path of the forward-auth endpoint, if enabled.
    pub forward_auth_path: Option<String>,
}

/// `[rate_limit]`.
#[derive(Debug, Clone, Default)]
pub struct RateLimitConfig {
    /// Per-key default (`None` = unlimited).
    pub default: Option<Limit>,
    /// Failed authentications allowed per client IP.
    pub failed_auth_per_ip: Option<Limit>,
    /// Per-role limits overriding the default (`None` = unlimited).
    pub roles: RoleLimits,
}

/// Per-role limits, one slot per role: a request reads one entry (no hashing).
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleLimits([Option<Option<Limit>>; 3]);

impl RoleLimits {
    /// The role's slot (a match, so a new role cannot compile without one).
    fn slot(role: Role) -> usize {
        match role {
            Role::Admin => 0,
            Role::Operator => 1,
            Role::Viewer => 2,
        }
    }

    /// The role's own limit (`Some(None)` = unlimited), if the config sets one.
    pub fn get(&self, role: Role) -> Option<Option<Limit>> {
        self.0[Self::slot(role)]
    }

    /// Sets the role's limit (`None` = unlimited).
    pub fn set(&mut self, role: Role, limit: Option<Limit>) {
        self.0[Self::slot(role)] = Some(limit);
    }
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Pretty or JSON.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `keygate=debug`.
    pub level: String,
}

/// Where a deployment's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The built-in echo responder.
    Echo,
    /// An HTTP server.
    Http {
        /// `http` or `https`.
        scheme: http::uri::Scheme,
        /// host:port.
        authority: http::uri::Authority,
        /// Path prepended to every forwarded path ("" for none, never ends with '/').
        base_path: String,
    },
}

/// A route rule inside a deployment.
#[derive(Debug, Clone)]
pub struct Route {
    /// Operation name in usage stats.
    pub name: String,
    /// Methods it applies to (empty = all).
    pub methods: Vec<Method>,
    /// Path prefix relative to the deployment's prefix (whole segments).
    pub path: String,
    /// Scope required, if any.
    pub scope: Option<String>,
}

/// A deployment: an upstream and the requests that go to it.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Unique name.
    pub name: String,
    /// The name as a header value, for `X-Keygate-Deployment`.
    pub name_header: HeaderValue,
    /// Target.
    pub upstream: Upstream,
    /// Host names (lower-case, no port; `*.x` wildcards); empty = any.
    pub hosts: Vec<String>,
    /// Path prefix ("/" or "/a/b", no trailing slash).
    pub path_prefix: String,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Time for the upstream to send response headers.
    pub timeout: Duration,
    /// Route rules, first match wins.
    pub routes: Vec<Route>,
    /// Extra CA certificates (PEM) trusted for an `https://` upstream.
    pub ca_file: Option<PathBuf>,
}

/// A validated, immutable configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[rate_limit]`.
    pub rate_limit: RateLimitConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[[deployments]]`.
    pub deployments: Vec<Deployment>,
}

type S<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    deployments: Vec<RawDeployment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: S<String>,
    trusted_proxies: Option<Vec<Spanned<String>>>,
    header_read_timeout: S<String>,
    idle_timeout: S<String>,
    shutdown_grace: S<String>,
    drain_delay: S<String>,
    proxy_protocol: S<bool>,
    workers: S<i64>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: S<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: S<String>,
    usage_flush_interval: S<String>,
    usage_retention_days: S<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    prefix: S<String>,
    environments: S<Vec<String>>,
    header: S<String>,
    bearer: Option<bool>,
    query_param: S<String>,
    forward_key: Option<bool>,
    forward_auth_path: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    default: S<String>,
    failed_auth_per_ip: S<String>,
    #[serde(default)]
    roles: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: S<String>,
    level: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    name: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    path_prefix: S<String>,
    strip_prefix: Option<bool>,
    connect_timeout: S<String>,
    timeout: S<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    ca_file: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    path: S<String>,
    scope: S<String>,
}

/// Turns byte offsets into file:line:col errors.
struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        ConfigError {
            file: self.file.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    fn whole_file(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: 1,
            col: 1,
            message: message.into(),
        }
    }
}

fn duration_or(loc: &Locator, v: &S<String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s.get_ref()).map_err(|e| loc.at(s.span(), e)),
    }
}

fn addr_or(loc: &Locator, v: &S<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    match v {
        None => Ok(default.parse().expect("default addresses are valid")),
        Some(s) => s.get_ref().parse().map_err(|_| {
            loc.at(
                s.span(),
                format!(
                    "bad address {:?}: expected IP:PORT such as \"0.0.0.0:8080\"",
                    s.get_ref()
                ),
            )
        }),
    }
}

fn limit_or(
    loc: &Locator,
    v: &S<String>,
    default: Option<Limit>,
) -> Result<Option<Limit>, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => Limit::parse(s.get_ref()).map_err(|e| loc.at(s.span(), e)),
    }
}

fn is_segment_prefix(path: &str) -> bool {
    path.starts_with('/') && !path.contains("//") && !path.contains(['?', '#', ' '])
}

/// Normalises a path prefix: leading '/', no trailing '/' unless it is "/".
fn normalize_prefix(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

fn parse_upstream(loc: &Locator, v: &Spanned<String>) -> Result<Upstream, ConfigError> {
    let text = v.get_ref().trim();
    if text == "echo" {
        return Ok(Upstream::Echo);
    }
    let bad = |why: &str| loc.at(v.span(), format!("bad upstream {text:?}: {why}"));
    let uri: http::Uri = text
        .parse()
        .map_err(|_| bad("expected \"echo\" or a URL such as \"http://127.0.0.1:9000\""))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| bad("missing scheme (http://)"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(bad("use http:// or https://"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("missing host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed"));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream::Http {
        scheme,
        authority,
        base_path,
    })
}

fn validate_env_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            col: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates config text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let loc = Locator {
            file: path.display().to_string(),
            text,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(span) => loc.at(span, message),
                None => loc.whole_file(message),
            }
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::validate(raw, &loc, path, &base_dir)
    }

    fn validate(
        raw: RawConfig,
        loc: &Locator,
        path: &Path,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        let s = &raw.server;
        let mut trusted_proxies = Vec::new();
        for p in s.trusted_proxies.iter().flatten() {
            let text = p.get_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| loc.at(p.span(), format!("bad trusted proxy {text:?}: expected an IP or CIDR such as \"10.0.0.0/8\"")))?;
            trusted_proxies.push(net);
        }
        let server = ServerConfig {
            listen: addr_or(loc, &s.listen, "0.0.0.0:8080")?,
            trusted_proxies,
            header_read_timeout: duration_or(loc, &s.header_read_timeout, Duration::from_secs(10))?,
            idle_timeout: duration_or(loc, &s.idle_timeout, Duration::from_secs(60))?,
            shutdown_grace: duration_or(loc, &s.shutdown_grace, Duration::from_secs(30))?,
            drain_delay: duration_or(loc, &s.drain_delay, Duration::ZERO)?,
            proxy_protocol: s.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref()),
            workers: match &s.workers {
                None => 0,
                Some(w) => usize::try_from(*w.get_ref())
                    .ok()
                    .filter(|w| *w <= 1024)
                    .ok_or_else(|| {
                        loc.at(
                            w.span(),
                            "workers must be a whole number from 0 (one per CPU) to 1024",
                        )
                    })?,
            },
            tls: match &s.tls {
                None => None,
                Some(t) => {
                    let resolve = |p: &Spanned<String>| -> Result<PathBuf, ConfigError> {
                        if p.get_ref().trim().is_empty() {
                            return Err(loc.at(p.span(), "the path must not be empty"));
                        }
                        let path = PathBuf::from(p.get_ref());
                        Ok(if path.is_relative() {
                            base_dir.join(path)
                        } else {
                            path
                        })
                    };
                    let tls = TlsConfig {
                        listen: addr_or(loc, &t.listen, "0.0.0.0:8443")?,
                        cert: resolve(&t.cert)?,
                        key: resolve(&t.key)?,
                    };
                    // Fail `keygate check` (ExecStartPre) on a certificate that would not load.
                    crate::tls::load_certified_key(&tls.cert, &tls.key)
                        .map_err(|e| loc.at(t.cert.span(), e))?;
                    Some(tls)
                }
            },
        };
        for (field, v) in [
            ("header_read_timeout", &s.header_read_timeout),
            ("idle_timeout", &s.idle_timeout),
        ] {
            if let Some(v) = v {
                if parse_duration(v.get_ref()).is_ok_and(|d| d.is_zero()) {
                    return Err(loc.at(v.span(), format!("{field} must be longer than zero")));
                }
            }
        }
        let admin = AdminConfig {
            listen: addr_or(loc, &raw.admin.listen, "127.0.0.1:8091")?,
        };
        if admin.listen == server.listen && admin.listen.port() != 0 {
            let span = raw.admin.listen.as_ref().map_or(0..0, |l| l.span());
            return Err(loc.at(span, "admin.listen must differ from server.listen"));
        }

        let st = &raw.store;
        let store_path = match &st.path {
            None => PathBuf::from("data/keygate.redb"),
            Some(p) if p.get_ref().trim().is_empty() => {
                return Err(loc.at(p.span(), "store.path must not be empty"))
            }
            Some(p) => PathBuf::from(p.get_ref()),
        };
        let store_path = if store_path.is_relative() {
            base_dir.join(store_path)
        } else {
            store_path
        };
        let retention = match &st.usage_retention_days {
            None => 90,
            Some(d) => u32::try_from(*d.get_ref())
                .ok()
                .filter(|d| *d >= 1)
                .ok_or_else(|| {
                    loc.at(
                        d.span(),
                        "usage_retention_days must be a whole number of days, at least 1",
                    )
                })?,
        };
        let flush = duration_or(loc, &st.usage_flush_interval, Duration::from_secs(1))?;
        if flush.is_zero() {
            let span = st.usage_flush_interval.as_ref().map_or(0..0, |v| v.span());
            return Err(loc.at(span, "usage_flush_interval must be longer than zero"));
        }
        let store = StoreConfig {
            path: store_path,
            usage_flush_interval: flush,
            usage_retention_days: retention,
        };

        let a = &raw.auth;
        let prefix =
            match &a.prefix {
                None => "kg".to_string(),
                Some(p) if validate_env_name(p.get_ref()) => p.get_ref().clone(),
                Some(p) => return Err(loc.at(
                    p.span(),
                    "auth.prefix must be 1-16 letters or digits (it is followed by '_' in keys)",
                )),
            };
        let environments = match &a.environments {
            None => ["dev", "ci", "stg", "prod"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(loc.at(
                        list.span(),
                        "auth.environments must list at least one environment",
                    ));
                }
                if let Some(bad) = list.get_ref().iter().find(|e| !validate_env_name(e)) {
                    return Err(loc.at(
                        list.span(),
                        format!("bad environment {bad:?}: use 1-16 letters or digits"),
                    ));
                }
                list.get_ref().clone()
            }
        };
        let header = match &a.header {
            None => HeaderName::from_static("x-api-key"),
            Some(h) => HeaderName::from_bytes(h.get_ref().trim().as_bytes())
                .map_err(|_| loc.at(h.span(), format!("bad header name {:?}", h.get_ref())))?,
        };
        if header == http::header::AUTHORIZATION || header.as_str().starts_with("x-keygate-") {
            let span = a.header.as_ref().map_or(0..0, |h| h.span());
            return Err(loc.at(
                span,
                "auth.header cannot be Authorization or an X-Keygate-* header",
            ));
        }
        let query_param = a
            .query_param
            .as_ref()
            .map(|q| q.get_ref().trim().to_string())
            .filter(|q| !q.is_empty());
        let forward_auth_path = match &a.forward_auth_path {
            None => Some("/.keygate/auth".to_string()),
            Some(p) if p.get_ref().is_empty() => None,
            Some(p) if is_segment_prefix(p.get_ref()) && p.get_ref() != "/" => {
                Some(normalize_prefix(p.get_ref()))
            }
            Some(p) => return Err(loc.at(
                p.span(),
                "forward_auth_path must be a path such as \"/.keygate/auth\", or \"\" to disable",
            )),
        };
        let auth = AuthConfig {
            prefix,
            environments,
            header,
            bearer: a.bearer.unwrap_or(true),
            query_param,
            forward_key: a.forward_key.unwrap_or(false),
            forward_auth_path,
        };

        let r = &raw.rate_limit;
        let mut roles = RoleLimits::default();
        for (role, limit) in &r.roles {
            let role: Role = role.parse().map_err(|e: String| loc.at(limit.span(), e))?;
            roles.set(
                role,
                Limit::parse(limit.get_ref()).map_err(|e| loc.at(limit.span(), e))?,
            );
        }
        let rate_limit = RateLimitConfig {
            default: limit_or(loc, &r.default, Limit::parse("1000/1m").ok().flatten())?,
            failed_auth_per_ip: limit_or(
                loc,
                &r.failed_auth_per_ip,
                Limit::parse("30/1m").ok().flatten(),
            )?,
            roles,
        };

        let log = LogConfig {
            format: match &raw.log.format {
                None => LogFormat::Pretty,
                Some(f) => match f.get_ref().as_str() {
                    "pretty" => LogFormat::Pretty,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(loc.at(
                            f.span(),
                            format!("bad log format {other:?}: use \"pretty\" or \"json\""),
                        ))
                    }
                },
            },
            level: match &raw.log.level {
                None => "info".to_string(),
                Some(l) => {
                    tracing_subscriber::EnvFilter::try_new(l.get_ref()).map_err(|e| {
                        loc.at(l.span(), format!("bad log level {:?}: {e}", l.get_ref()))
                    })?;
                    l.get_ref().clone()
                }
            },
        };

        let mut names = HashSet::new();
        let mut deployments = Vec::new();
        for d in &raw.deployments {
            let name = d.name.get_ref().trim().to_string();
            if name.is_empty() || name == "*" || name.contains(',') {
                return Err(loc.at(
                    d.name.span(),
                    "a deployment name must be non-empty and cannot be \"*\" or contain ','",
                ));
            }
            let name_header = HeaderValue::from_str(&name)
                .map_err(|_| loc.at(d.name.span(), "a deployment name must be printable ASCII"))?;
            if !names.insert(name.clone()) {
                return Err(loc.at(d.name.span(), format!("duplicate deployment name {name:?}")));
            }
            let upstream = parse_upstream(loc, &d.upstream)?;
            let mut hosts = Vec::new();
            for h in &d.hosts {
                let host = h.get_ref().trim().to_ascii_lowercase();
                let bare = host.strip_prefix("*.").unwrap_or(&host);
                if bare.is_empty()
                    || !bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(loc.at(h.span(), format!("bad host {host:?}: expected a name such as \"api.example.com\" or \"*.example.com\" (no port)")));
                }
                hosts.push(host);
            }
            let path_prefix = match &d.path_prefix {
                None => "/".to_string(),
                Some(p) if is_segment_prefix(p.get_ref()) => normalize_prefix(p.get_ref()),
                Some(p) => {
                    return Err(loc.at(
                        p.span(),
                        format!("bad path_prefix {:?}: must start with '/'", p.get_ref()),
                    ))
                }
            };
            let mut routes = Vec::new();
            for rr in &d.routes {
                let mut methods = Vec::new();
                for m in &rr.methods {
                    let text = m.get_ref().trim().to_ascii_uppercase();
                    let method = Method::from_bytes(text.as_bytes())
                        .map_err(|_| loc.at(m.span(), format!("bad method {:?}", m.get_ref())))?;
                    methods.push(method);
                }
                let path = match &rr.path {
                    None => "/".to_string(),
                    Some(p) if is_segment_prefix(p.get_ref()) => normalize_prefix(p.get_ref()),
                    Some(p) => {
                        return Err(loc.at(
                            p.span(),
                            format!("bad route path {:?}: must start with '/'", p.get_ref()),
                        ))
                    }
                };
                let scope = rr
                    .scope
                    .as_ref()
                    .map(|s| s.get_ref().trim().to_string())
                    .filter(|s| !s.is_empty());
                let rname = rr.name.get_ref().trim();
                if rname.is_empty() {
                    return Err(loc.at(rr.name.span(), "a route name must not be empty"));
                }
                routes.push(Route {
                    name: rname.to_string(),
                    methods,
                    path,
                    scope,
                });
            }
            let connect_timeout = duration_or(loc, &d.connect_timeout, Duration::from_secs(5))?;
            let timeout = duration_or(loc, &d.timeout, Duration::from_secs(30))?;
            for (v, t) in [(&d.connect_timeout, connect_timeout), (&d.timeout, timeout)] {
                if t.is_zero() {
                    return Err(loc.at(
                        v.as_ref().map_or(0..0, |v| v.span()),
                        "timeouts must be longer than zero",
                    ));
                }
            }
            let ca_file = match &d.ca_file {
                None => None,
                Some(p) => {
                    let path = PathBuf::from(p.get_ref());
                    let path = if path.is_relative() {
                        base_dir.join(path)
                    } else {
                        path
                    };
                    if !matches!(upstream, Upstream::Http { ref scheme, .. } if *scheme == http::uri::Scheme::HTTPS)
                    {
                        return Err(
                            loc.at(p.span(), "ca_file only applies to an https:// upstream")
                        );
                    }
                    crate::upstream::root_store(Some(&path)).map_err(|e| loc.at(p.span(), e))?;
                    Some(path)
                }
            };
            deployments.push(Deployment {
                name,
                name_header,
                upstream,
                hosts,
                path_prefix,
                strip_prefix: d.strip_prefix.unwrap_or(false),
                connect_timeout,
                timeout,
                routes,
                ca_file,
            });
        }

        Ok(Config {
            source: path.to_path_buf(),
            server,
            admin,
            store,
            auth,
            rate_limit,
            log,
            deployments,
        })
    }

    /// The limit for a key: its own, else its role's, else the default (`None` = unlimited).
    pub fn limit_for(&self, role: Role, own: Option<&Option<Limit>>) -> Option<Limit> {
        match own {
            Some(l) => *l,
            None => match self.rate_limit.roles.get(role) {
                Some(l) => l,
                None => self.rate_limit.default,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.auth.prefix, "kg");
        assert_eq!(c.auth.forward_auth_path.as_deref(), Some("/.keygate/auth"));
        assert_eq!(c.rate_limit.default.unwrap().requests, 1000);
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let e = parse("[server]\nlisten = \"0.0.0.0:1\"\nlistne = 3\n").unwrap_err();
        assert_eq!((e.line, e.col), (3, 1), "{e}");
        assert!(e.message.contains("listne"), "{e}");
    }

    #[test]
    fn bad_duration_is_located() {
        let e = parse("[server]\nidle_timeout = \"5x\"\n").unwrap_err();
        assert_eq!((e.line, e.col), (2, 16), "{e}");
        assert!(
            e.to_string().starts_with("gateway.toml:2:16: bad duration"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_deployment_is_located() {
        let text = "[[deployments]]\nname = \"a\"\nupstream = \"echo\"\n[[deployments]]\nname = \"a\"\nupstream = \"echo\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
    }

    #[test]
    fn bad_upstream_and_limit() {
        let e = parse("[[deployments]]\nname = \"a\"\nupstream = \"ftp://x\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse("[rate_limit]\ndefault = \"ten/1m\"\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn limit_precedence() {
        let c = parse("[rate_limit]\ndefault = \"10/1m\"\n[rate_limit.roles]\nviewer = \"5/1m\"\n")
            .unwrap();
        assert_eq!(c.limit_for(Role::Viewer, None).unwrap().requests, 5);
        assert_eq!(c.limit_for(Role::Operator, None).unwrap().requests, 10);
        assert_eq!(c.limit_for(Role::Admin, None).unwrap().requests, 10);
        let c = parse("[rate_limit.roles]\nadmin = \"none\"\noperator = \"7/1s\"\n").unwrap();
        assert_eq!(c.limit_for(Role::Admin, None), None);
        assert_eq!(c.limit_for(Role::Operator, None).unwrap().requests, 7);
        assert_eq!(c.limit_for(Role::Viewer, None).unwrap().requests, 1000);
        let own = Limit::parse("3/1m").unwrap();
        assert_eq!(c.limit_for(Role::Viewer, Some(&own)).unwrap().requests, 3);
        assert_eq!(c.limit_for(Role::Viewer, Some(&None)), None);
    }
}
