//! The admin API (SPEC §3): key management over JSON, audit, verify, health. Only
//! `admin`-role keys get in; every change is committed and applied to the live index before
//! the answer is sent.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::answer;
use crate::audit::Actor;
use crate::body::{self, Body, RequestBody};
use crate::direct::DirectUpstream;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::keys::Role;
use crate::manage::{KeyManager, KeySpec, ListFilter, ManageError, VerifyRequest};
use crate::proxy::{self, ConnInfo};
use crate::server::{ConnSettings, Handler};
use crate::usage::UsageReader;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

/// The admin API handler.
pub struct AdminApi {
    /// The running gateway (config snapshot, live keys, readiness).
    pub gateway: Arc<Gateway>,
    /// Key management over the same store and live index.
    pub manager: Arc<KeyManager>,
    /// Usage reports.
    pub usage: Arc<dyn UsageReader>,
}

type Answer = Result<Response<Body>, GatewayError>;

fn ok(status: StatusCode, v: &Value) -> Answer {
    Ok(body::json(status, v))
}

fn query_param(req: &Request<RequestBody>, name: &str) -> Option<String> {
    req.uri()
        .query()
        .and_then(|q| crate::auth::query_value(q, name))
        .map(percent_decode)
}

/// Decodes `%XX` and `+` in a query value.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_json<T: DeserializeOwned>(
    req: Request<RequestBody>,
    empty_ok: bool,
) -> Result<Option<T>, GatewayError> {
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(GatewayError::PayloadTooLarge)
        }
        Err(_) => {
            return Err(GatewayError::invalid(
                "body",
                "could not read the request body",
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(None)
        } else {
            Err(GatewayError::invalid("body", "a JSON body is required"))
        };
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // The top-level field at fault (`scopes[1]` → `scopes`); the path is `.` at the root
        // and `?` where the parser could not tell (truncated input).
        let top = path.split(['.', '[']).next().unwrap_or_default();
        let field = if !top.is_empty() && top != "?" {
            top.to_string()
        } else if let Some(name) = msg.split('`').nth(1).filter(|_| msg.contains("field")) {
            // serde names unknown/missing fields only in the message: lift the name out.
            name.to_string()
        } else {
            "body".to_string()
        };
        GatewayError::invalid(&field, format!("invalid request body: {msg}"))
    })?;
    // One JSON value and nothing after it (whitespace aside).
    de.end()
        .map_err(|e| GatewayError::invalid("body", format!("invalid request body: {e}")))?;
    Ok(Some(value))
}

fn manage_err(e: ManageError) -> GatewayError {
    if let ManageError::Store(err) = &e {
        tracing::error!(error = %err, "admin operation failed in the store");
    }
    e.to_gateway_error()
}

impl AdminApi {
    /// Authenticates an admin request; records failed attempts in the audit trail.
    fn authenticate(&self, req: &Request<RequestBody>, ip: IpAddr) -> Result<Actor, GatewayError> {
        let rt = self.gateway.runtime.load();
        // The admin API never takes keys from the query string (URLs end up in logs), and it
        // shares the data plane's per-IP lockout, where every failed admin login counts; a
        // locked address adds no more audit events, while a valid admin key from it works.
        let now = chrono::Utc::now().timestamp();
        let outcome =
            self.gateway
                .identify_guarded(&rt.config.auth, req.headers(), None, ip, now, |_| true);
        let ip_text = ip.to_string();
        match outcome {
            Ok(key) if key.role == Role::Admin => Ok(Actor {
                key_id: Some(key.id_str().to_string()),
                client_ip: Some(ip_text),
            }),
            Ok(key) => {
                self.audit_failure(&ip_text, Some(key.id_str()));
                Err(GatewayError::InsufficientScope {
                    required: "role:admin".into(),
                    granted: key.scope_list(),
                })
            }
            Err(e @ GatewayError::TooManyFailures { .. }) => Err(e),
            Err(e) => {
                self.audit_failure(&ip_text, None);
                Err(e)
            }
        }
    }

    fn audit_failure(&self, ip: &str, key_id: Option<&str>) {
        let actor = Actor {
            key_id: key_id.map(str::to_string),
            client_ip: Some(ip.to_string()),
        };
        let ev = actor.event("admin.auth_failed", None, None, vec![]);
        if let Err(e) = self.manager.store.append_audit(&ev) {
            tracing::error!(error = %e, "could not record a failed admin authentication");
        }
    }

    async fn route(&self, req: Request<RequestBody>, conn: ConnInfo) -> Answer {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let method = req.method().clone();
        let read = method == Method::GET || method == Method::HEAD;
        match (&method, segments.as_slice()) {
            (_, ["healthz"]) if read => return ok(StatusCode::OK, &json!({"status": "ok"})),
            (_, ["readyz"]) if read => {
                return if self.gateway.draining.load(Ordering::Relaxed) {
                    ok(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "draining"}),
                    )
                } else {
                    ok(StatusCode::OK, &json!({"status": "ready"}))
                };
            }
            (_, ["metrics"]) if read => {
                let mut r = Response::new(body::full(self.gateway.render_metrics()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return Ok(r);
            }
            (_, ["healthz" | "readyz" | "metrics"]) => return method_not_allowed("GET, HEAD"),
            (_, ["v1", ..]) => {}
            _ => return Err(GatewayError::NotFound),
        }
        let ip = {
            let rt = self.gateway.runtime.load();
            proxy::client_ip(
                conn.peer.ip(),
                req.headers(),
                &rt.config.server.trusted_proxies,
            )
        };
        let actor = self.authenticate(&req, ip)?;
        let rt = self.gateway.runtime.load_full();
        let cfg = &rt.config;
        let m = self.manager.clone();
        match (&method, &segments[1..]) {
            (&Method::POST, ["keys"]) => {
                let spec: KeySpec = read_json(req, false).await?.unwrap_or_default();
                let cfg = rt.clone();
                let v = blocking(move || m.create(&cfg.config, &spec, &actor)).await?;
                ok(StatusCode::CREATED, &v)
            }
            (&Method::GET, ["keys"]) => {
                let filter = ListFilter {
                    status: query_param(&req, "status"),
                    owner: query_param(&req, "owner"),
                    q: query_param(&req, "q"),
                };
                let v = blocking(move || m.list(&filter)).await?;
                ok(StatusCode::OK, &v)
            }
            (&Method::GET, ["keys", id]) => {
                let id = id.to_string();
                let usage = self.usage.clone();
                let mut v = blocking(move || m.show(&id)).await?;
                let key_id = v["key"]["id"].as_str().unwrap_or_default().to_string();
                v["usage"] = usage.summary(&key_id).map_err(|_| GatewayError::Internal)?;
                ok(StatusCode::OK, &v)
            }
            (&Method::PATCH, ["keys", id]) => {
                let id = id.to_string();
                let spec: KeySpec = read_json(req, false).await?.unwrap_or_default();
                let cfg = rt.clone();
                let v = blocking(move || m.update(&cfg.config, &id, &spec, &actor)).await?;
                ok(StatusCode::OK, &v)
            }
            (&Method::POST, ["keys", id, "rotate" | "regenerate"]) => {
                #[derive(serde::Deserialize, Default)]
                #[serde(deny_unknown_fields)]
                struct RotateBody {
                    grace: Option<String>,
                }
                let id = id.to_string();
                let b: RotateBody = read_json(req, true).await?.unwrap_or_default();
                let cfg = rt.clone();
                let v = blocking(move || m.rotate(&cfg.config, &id, b.grace.as_deref(), &actor))
                    .await?;
                ok(StatusCode::OK, &v)
            }
            (&Method::POST, ["keys", id, "revoke"]) => {
                let id = id.to_string();
                let v = blocking(move || m.revoke(&id, &actor)).await?;
                ok(StatusCode::OK, &v)
            }
            (&Method::DELETE, ["keys", id]) => {
                let id = id.to_string();
                blocking(move || m.delete(&id, &actor)).await?;
                let mut r = Response::new(body::empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                Ok(r)
            }
            (&Method::GET, ["keys", id, "usage"]) => {
                let days = match query_param(&req, "days") {
                    None => 7,
                    Some(d) => d
                        .parse::<u32>()
                        .ok()
                        .filter(|d| (1..=366).contains(d))
                        .ok_or_else(|| {
                            GatewayError::invalid(
                                "days",
                                "days must be a whole number from 1 to 366",
                            )
                        })?,
                };
                let id = id.to_string();
                let usage = self.usage.clone();
                // 404 for unknown ids, like every other key route.
                let _ = blocking(move || m.show(&id).map(|v| v["key"]["id"].clone())).await?;
                let key_id = segments[2].to_string();
                let v = usage
                    .report(&key_id, days)
                    .map_err(|_| GatewayError::Internal)?;
                ok(StatusCode::OK, &v)
            }
            (&Method::POST, ["verify"]) => {
                let body: VerifyRequest = read_json(req, false)
                    .await?
                    .ok_or_else(|| GatewayError::invalid("key", "key is required"))?;
                let cfg = rt.clone();
                let v = blocking(move || m.verify(&cfg.config, &body)).await?;
                ok(StatusCode::OK, &v)
            }
            (&Method::GET, ["audit"]) => {
                let limit = match query_param(&req, "limit") {
                    None => 100,
                    Some(l) => l
                        .parse::<usize>()
                        .ok()
                        .filter(|l| (1..=10_000).contains(l))
                        .ok_or_else(|| {
                            GatewayError::invalid(
                                "limit",
                                "limit must be a whole number from 1 to 10000",
                            )
                        })?,
                };
                let store = self.manager.store.clone();
                let events = tokio::task::spawn_blocking(move || store.list_audit(limit))
                    .await
                    .map_err(|_| GatewayError::Internal)?
                    .map_err(|e| manage_err(e.into()))?;
                ok(StatusCode::OK, &json!({"events": events}))
            }
            (_, rest) => {
                let _ = cfg;
                match allowed_methods(rest) {
                    Some(allow) => method_not_allowed(allow),
                    None => Err(GatewayError::NotFound),
                }
            }
        }
    }
}

/// The methods a known `/v1/...` resource answers (for 405 and its `Allow` header).
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["keys"] => Some("GET, POST"),
        ["keys", _] => Some("GET, PATCH, DELETE"),
        ["keys", _, "rotate" | "regenerate" | "revoke"] => Some("POST"),
        ["keys", _, "usage"] => Some("GET"),
        ["verify"] => Some("POST"),
        ["audit"] => Some("GET"),
        _ => None,
    }
}

/// 405 with the `Allow` header RFC 9110 requires.
fn method_not_allowed(allow: &'static str) -> Answer {
    let mut r = GatewayError::MethodNotAllowed.to_response();
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allow));
    Ok(r)
}

/// Runs a store-touching operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ManageError> + Send + 'static,
) -> Result<T, GatewayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| GatewayError::Internal)?
        .map_err(manage_err)
}

impl Handler for AdminApi {
    async fn handle(
        &self,
        req: &mut Request<RequestBody>,
        conn: ConnInfo,
        _direct: &Arc<DirectUpstream>,
    ) -> answer::Answer {
        let req = std::mem::replace(req, Request::new(RequestBody::Empty));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = self
            .route(req, conn)
            .await
            .unwrap_or_else(|e| e.to_response());
        tracing::info!(target: "keygate::admin", client_ip = %conn.peer.ip(), method = %method, path, status = resp.status().as_u16(), "admin request");
        resp.into()
    }

    fn conn_settings(&self) -> ConnSettings {
        // The admin listener is reached directly, never through a PROXY-speaking balancer.
        ConnSettings {
            proxy_protocol: false,
            ..self.gateway.conn_settings()
        }
    }
}
