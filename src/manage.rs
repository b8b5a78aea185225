//! Key management: create, list, show, update, rotate, revoke, delete and verify. One place
//! for the rules, used by the offline CLI and the admin API alike. Every change is one store
//! transaction (with its audit event), then applied to the live index if there is one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::audit::Actor;
use crate::auth::{authorize, Verifier};
use crate::config::Config;
use crate::error::GatewayError;
use crate::keyindex::KeyIndex;
use crate::keys::{
    display_secret, generate_id, generate_secret, hex, parse_expiry, GraceSecret, KeyRecord,
    LastUsed, Role, SecretHasher, Status,
};
use crate::store::{Store, StoreError};
use crate::units::{parse_duration, Limit};

/// Fields accepted by create and update (admin API body, CLI options).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Name (required on create).
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Owner.
    pub owner: Option<String>,
    /// Role name.
    pub role: Option<String>,
    /// Scopes.
    pub scopes: Option<Vec<String>>,
    /// Deployments (`*` for all).
    pub deployments: Option<Vec<String>>,
    /// Environment (create only).
    pub env: Option<String>,
    /// Expiry: duration, RFC 3339 or `never`.
    pub expires: Option<String>,
    /// `N/DURATION`, `none`; `null` (or `default`) clears it so the role/default applies.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit: Option<Option<String>>,
}

fn double_option<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Query for listing keys.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `active`, `expired`, `revoked` or `all` (default `active`).
    pub status: Option<String>,
    /// Exact owner.
    pub owner: Option<String>,
    /// Case-insensitive substring of the name.
    pub q: Option<String>,
}

/// A failure of a management operation.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// Maps to an HTTP error answer.
    #[error("{}", .0.body_json()["error"]["message"].as_str().unwrap_or("error"))]
    Request(GatewayError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<GatewayError> for ManageError {
    fn from(e: GatewayError) -> Self {
        ManageError::Request(e)
    }
}

impl ManageError {
    /// The HTTP error this becomes.
    pub fn to_gateway_error(&self) -> GatewayError {
        match self {
            ManageError::Request(e) => e.clone(),
            ManageError::Store(_) => GatewayError::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, ManageError>;

/// Looks up usage-derived "last used" facts for a key.
pub trait LastUsedSource: Send + Sync {
    /// Last-use facts for `id`.
    fn last_used(&self, id: &str) -> LastUsed;
    /// Drops the usage of a deleted key.
    fn forget(&self, _id: &str) {}
}

/// No usage recorded.
pub struct NoUsage;

impl LastUsedSource for NoUsage {
    fn last_used(&self, _id: &str) -> LastUsed {
        LastUsed::default()
    }
}

/// The key manager.
pub struct KeyManager {
    /// The store.
    pub store: Arc<Store>,
    /// The live index, when a gateway is serving.
    pub index: Option<Arc<KeyIndex>>,
    /// Secret hasher.
    pub hasher: SecretHasher,
    /// Last-used facts.
    pub usage: Arc<dyn LastUsedSource>,
}

fn clean_text(
    field: &str,
    v: &str,
    max: usize,
    required: bool,
) -> std::result::Result<String, GatewayError> {
    let v = v.trim();
    if required && v.is_empty() {
        return Err(GatewayError::invalid(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if v.chars().count() > max {
        return Err(GatewayError::invalid(
            field,
            format!("{field} is longer than {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(GatewayError::invalid(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(v.to_string())
}

fn clean_list(field: &str, items: &[String]) -> std::result::Result<Vec<String>, GatewayError> {
    let mut out: Vec<String> = Vec::new();
    for item in items.iter().flat_map(|i| i.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if item.len() > 200 || item.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(GatewayError::invalid(
                field,
                format!("bad entry {item:?} in {field}"),
            ));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_string());
        }
        if out.len() > MAX_LIST_ITEMS {
            return Err(GatewayError::invalid(
                field,
                format!("{field} may list at most {MAX_LIST_ITEMS} entries"),
            ));
        }
    }
    Ok(out)
}

/// Most scopes or deployments one key may list (keeps a key's strings small for the index).
const MAX_LIST_ITEMS: usize = 32;

fn normalize_limit(text: &str) -> std::result::Result<Option<String>, GatewayError> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    match Limit::parse(t) {
        Ok(Some(l)) => Ok(Some(l.to_string())),
        Ok(None) => Ok(Some("none".to_string())),
        Err(e) => Err(GatewayError::invalid("rate_limit", e)),
    }
}

fn check_deployments(cfg: &Config, list: &[String]) -> std::result::Result<(), GatewayError> {
    for d in list {
        if d != "*" && !cfg.deployments.iter().any(|c| &c.name == d) {
            return Err(GatewayError::invalid(
                "deployments",
                format!("unknown deployment {d:?} (not in {})", cfg.source.display()),
            ));
        }
    }
    Ok(())
}

impl KeyManager {
    /// A manager over `store`, updating `index` when given.
    pub fn new(store: Arc<Store>, index: Option<Arc<KeyIndex>>, hasher: SecretHasher) -> Self {
        KeyManager {
            store,
            index,
            hasher,
            usage: Arc::new(NoUsage),
        }
    }

    /// The JSON form of a record.
    pub fn key_json(&self, r: &KeyRecord) -> Value {
        r.to_json(Utc::now(), &self.usage.last_used(&r.id))
    }

    fn load(&self, id: &str) -> Result<KeyRecord> {
        self.store
            .get_key(id)?
            .ok_or(ManageError::Request(GatewayError::KeyNotFound))
    }

    fn commit(
        &self,
        record: &KeyRecord,
        previous: Option<&KeyRecord>,
        ev: &crate::audit::AuditEvent,
    ) -> Result<()> {
        self.store.put_key(record, previous, Some(ev))?;
        if let Some(index) = &self.index {
            index.apply(previous, Some(record));
        }
        Ok(())
    }

    /// Creates a key; answers `{"key": …, "secret": …}`.
    pub fn create(&self, cfg: &Config, spec: &KeySpec, actor: &Actor) -> Result<Value> {
        let now = Utc::now();
        let name = clean_text("name", spec.name.as_deref().unwrap_or(""), 200, true)?;
        let role: Role = match &spec.role {
            None => Role::Operator,
            Some(r) => r.parse().map_err(|e| GatewayError::invalid("role", e))?,
        };
        let env = match &spec.env {
            Some(e) if cfg.auth.environments.iter().any(|c| c == e) => e.clone(),
            Some(e) => {
                return Err(GatewayError::invalid(
                    "env",
                    format!(
                        "unknown environment {e:?} (configured: {})",
                        cfg.auth.environments.join(", ")
                    ),
                )
                .into())
            }
            None => cfg
                .auth
                .environments
                .iter()
                .find(|e| *e == "prod")
                .unwrap_or(&cfg.auth.environments[0])
                .clone(),
        };
        let deployments = match &spec.deployments {
            None => vec!["*".to_string()],
            Some(d) => clean_list("deployments", d)?,
        };
        if deployments.is_empty() {
            return Err(GatewayError::invalid(
                "deployments",
                "deployments must name at least one deployment, or \"*\"",
            )
            .into());
        }
        check_deployments(cfg, &deployments)?;
        let expires_at = self.expiry(spec.expires.as_deref(), now)?;
        let secret = generate_secret(&cfg.auth.prefix, &env).map_err(|_| GatewayError::Internal)?;
        let record = KeyRecord {
            id: generate_id().map_err(|_| GatewayError::Internal)?,
            name,
            description: clean_text(
                "description",
                spec.description.as_deref().unwrap_or(""),
                2000,
                false,
            )?,
            owner: clean_text("owner", spec.owner.as_deref().unwrap_or(""), 200, false)?,
            role,
            scopes: clean_list("scopes", spec.scopes.as_deref().unwrap_or(&[]))?,
            deployments,
            display: display_secret(&secret, &cfg.auth.prefix, &env),
            env,
            created_at: now,
            expires_at,
            revoked_at: None,
            rate_limit: match &spec.rate_limit {
                Some(Some(l)) => normalize_limit(l)?,
                _ => None,
            },
            digest: hex(&self.hasher.digest(&secret)),
            grace: vec![],
        };
        let ev = actor.event("key.created", Some(&record.id), Some(&record.name), vec![]);
        self.commit(&record, None, &ev)?;
        Ok(json!({"key": self.key_json(&record), "secret": secret}))
    }

    fn expiry(&self, text: Option<&str>, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        let Some(text) = text else { return Ok(None) };
        let at = parse_expiry(text, now).map_err(|e| GatewayError::invalid("expires", e))?;
        if at.is_some_and(|t| t <= now) {
            return Err(GatewayError::invalid("expires", "expires must be in the future").into());
        }
        Ok(at)
    }

    /// Lists keys; answers `{"keys": [...]}`.
    pub fn list(&self, filter: &ListFilter) -> Result<Value> {
        let now = Utc::now();
        let wanted = match filter.status.as_deref().unwrap_or("active") {
            "all" => None,
            "active" => Some(Status::Active),
            "expired" => Some(Status::Expired),
            "revoked" => Some(Status::Revoked),
            other => {
                return Err(GatewayError::invalid(
                    "status",
                    format!("unknown status {other:?} (use active, expired, revoked or all)"),
                )
                .into())
            }
        };
        let q = filter.q.as_deref().map(str::to_lowercase);
        let mut keys: Vec<KeyRecord> = self
            .store
            .list_keys()?
            .into_iter()
            .filter(|k| wanted.is_none_or(|s| k.status(now) == s))
            .filter(|k| filter.owner.as_deref().is_none_or(|o| k.owner == o))
            .filter(|k| {
                q.as_deref()
                    .is_none_or(|q| k.name.to_lowercase().contains(q))
            })
            .collect();
        keys.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(json!({"keys": keys.iter().map(|k| self.key_json(k)).collect::<Vec<_>>()}))
    }

    /// Shows one key; answers `{"key": …}` (callers add the usage summary).
    pub fn show(&self, id: &str) -> Result<Value> {
        let r = self.load(id)?;
        Ok(json!({"key": self.key_json(&r)}))
    }

    /// Updates a key; answers `{"key": …}`.
    pub fn update(&self, cfg: &Config, id: &str, spec: &KeySpec, actor: &Actor) -> Result<Value> {
        let prev = self.load(id)?;
        if spec.env.is_some() {
            return Err(GatewayError::invalid(
                "env",
                "the environment is part of the secret and cannot change; create a new key",
            )
            .into());
        }
        let mut r = prev.clone();
        let now = Utc::now();
        let mut changes = Vec::new();
        let mut set = |field: &str, changed: bool| {
            if changed {
                changes.push(field.to_string());
            }
        };
        if let Some(v) = &spec.name {
            let v = clean_text("name", v, 200, true)?;
            set("name", v != r.name);
            r.name = v;
        }
        if let Some(v) = &spec.description {
            let v = clean_text("description", v, 2000, false)?;
            set("description", v != r.description);
            r.description = v;
        }
        if let Some(v) = &spec.owner {
            let v = clean_text("owner", v, 200, false)?;
            set("owner", v != r.owner);
            r.owner = v;
        }
        if let Some(v) = &spec.role {
            let v: Role = v.parse().map_err(|e| GatewayError::invalid("role", e))?;
            set("role", v != r.role);
            r.role = v;
        }
        if let Some(v) = &spec.scopes {
            let v = clean_list("scopes", v)?;
            set("scopes", v != r.scopes);
            r.scopes = v;
        }
        if let Some(v) = &spec.deployments {
            let v = clean_list("deployments", v)?;
            if v.is_empty() {
                return Err(GatewayError::invalid(
                    "deployments",
                    "deployments must name at least one deployment, or \"*\"",
                )
                .into());
            }
            check_deployments(cfg, &v)?;
            set("deployments", v != r.deployments);
            r.deployments = v;
        }
        if let Some(v) = &spec.expires {
            let v = self.expiry(Some(v), now)?;
            set("expires_at", v != r.expires_at);
            r.expires_at = v;
        }
        if let Some(v) = &spec.rate_limit {
            let v = match v {
                Some(text) => normalize_limit(text)?,
                None => None,
            };
            set("rate_limit", v != r.rate_limit);
            r.rate_limit = v;
        }
        if r.revoked_at.is_some() && !changes.is_empty() {
            return Err(GatewayError::invalid(
                "id",
                "the key is revoked; a revoked key cannot be changed",
            )
            .into());
        }
        if !changes.is_empty() {
            let ev = actor.event("key.updated", Some(&r.id), Some(&r.name), changes);
            self.commit(&r, Some(&prev), &ev)?;
        }
        Ok(json!({"key": self.key_json(&r)}))
    }

    /// Issues a new secret; the old one stops at once or after `grace`. Answers
    /// `{"key": …, "secret": …}`.
    pub fn rotate(
        &self,
        cfg: &Config,
        id: &str,
        grace: Option<&str>,
        actor: &Actor,
    ) -> Result<Value> {
        let prev = self.load(id)?;
        if prev.revoked_at.is_some() {
            return Err(GatewayError::invalid(
                "id",
                "the key is revoked; a revoked key cannot be rotated",
            )
            .into());
        }
        let now = Utc::now();
        let grace = match grace.map(str::trim).filter(|g| !g.is_empty()) {
            None => None,
            Some(g) => Some(parse_duration(g).map_err(|e| GatewayError::invalid("grace", e))?),
        };
        let mut r = prev.clone();
        // A rotation ends every earlier grace period: after a leak, rotating must kill
        // all old secrets (only the one rotated out now may get a new grace).
        r.grace.clear();
        if let Some(g) = grace.filter(|g| !g.is_zero()) {
            let g = chrono::Duration::from_std(g)
                .map_err(|_| GatewayError::invalid("grace", "grace is too long"))?;
            let until = now
                .checked_add_signed(g)
                .ok_or_else(|| GatewayError::invalid("grace", "grace is too long"))?;
            r.grace.push(GraceSecret {
                digest: r.digest.clone(),
                valid_until: until,
            });
        }
        let secret =
            generate_secret(&cfg.auth.prefix, &r.env).map_err(|_| GatewayError::Internal)?;
        r.digest = hex(&self.hasher.digest(&secret));
        r.display = display_secret(&secret, &cfg.auth.prefix, &r.env);
        let changes = if grace.is_some_and(|g| !g.is_zero()) {
            vec!["secret".to_string(), "grace".to_string()]
        } else {
            vec!["secret".to_string()]
        };
        let ev = actor.event("key.rotated", Some(&r.id), Some(&r.name), changes);
        self.commit(&r, Some(&prev), &ev)?;
        Ok(json!({"key": self.key_json(&r), "secret": secret}))
    }

    /// Revokes a key for good; answers `{"key": …}`. Revoking twice changes nothing.
    pub fn revoke(&self, id: &str, actor: &Actor) -> Result<Value> {
        let prev = self.load(id)?;
        if prev.revoked_at.is_some() {
            return Ok(json!({"key": self.key_json(&prev)}));
        }
        let mut r = prev.clone();
        r.revoked_at = Some(Utc::now());
        r.grace.clear();
        let ev = actor.event("key.revoked", Some(&r.id), Some(&r.name), vec![]);
        self.commit(&r, Some(&prev), &ev)?;
        Ok(json!({"key": self.key_json(&r)}))
    }

    /// Deletes a key (its audit entries stay). Returns the deleted record.
    pub fn delete(&self, id: &str, actor: &Actor) -> Result<KeyRecord> {
        let r = self.load(id)?;
        let ev = actor.event("key.deleted", Some(&r.id), Some(&r.name), vec![]);
        self.store.delete_key(&r, Some(&ev))?;
        if let Some(index) = &self.index {
            index.apply(Some(&r), None);
        }
        self.usage.forget(&r.id);
        Ok(r)
    }

    /// Validates a secret as the data plane would; answers `{"valid", "code", "key"}`.
    /// With no live index (offline), the store is consulted.
    pub fn verify(&self, cfg: &Config, req: &VerifyRequest) -> Result<Value> {
        let offline;
        let index = match &self.index {
            Some(i) => i.as_ref(),
            None => {
                offline = KeyIndex::new();
                let digest = self.hasher.digest(&req.key);
                if let Some(id) = self.store.id_for_digest(&digest)? {
                    if let Some(r) = self.store.get_key(&id)? {
                        offline.apply(None, Some(&r));
                    }
                }
                &offline
            }
        };
        let verifier = Verifier {
            index,
            hasher: &self.hasher,
            auth: &cfg.auth,
        };
        let method = match &req.method {
            None => http::Method::GET,
            Some(m) => http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| GatewayError::invalid("method", format!("bad method {m:?}")))?,
        };
        let now = Utc::now().timestamp();
        let key = match verifier.identify(req.key.as_bytes(), now) {
            Ok(k) => k,
            Err(e) => return Ok(self.verify_answer(&req.key, Some(e))),
        };
        let path = req.path.as_deref().unwrap_or("/");
        if !path.starts_with('/') {
            return Err(GatewayError::invalid("path", "path must start with '/'").into());
        }
        let outcome = match &req.deployment {
            Some(name) => {
                let d = cfg
                    .deployments
                    .iter()
                    .find(|d| &d.name == name)
                    .ok_or_else(|| {
                        GatewayError::invalid("deployment", format!("unknown deployment {name:?}"))
                    })?;
                let rest = crate::router::strip_segment_prefix(path, &d.path_prefix);
                let route = d.routes.iter().find(|r| {
                    (r.methods.is_empty() || r.methods.contains(&method))
                        && crate::router::segment_prefix(rest, &r.path)
                });
                authorize(&key, d, route, &method)
            }
            None if req.path.is_some() => match crate::router::route(cfg, None, path, &method) {
                Some(m) => authorize(&key, m.deployment, m.route, &method),
                None => Err(GatewayError::NoRoute),
            },
            None => crate::auth::authorize_method(&key, &method),
        };
        let outcome = outcome.and_then(|()| match &req.scope {
            Some(s) if !key.has_scope(s) => Err(GatewayError::InsufficientScope {
                required: s.clone(),
                granted: key.scope_list(),
            }),
            _ => Ok(()),
        });
        Ok(self.verify_answer(&req.key, outcome.err()))
    }

    fn verify_answer(&self, secret: &str, error: Option<GatewayError>) -> Value {
        let record = match &error {
            Some(GatewayError::InvalidKey | GatewayError::MissingKey) => None,
            _ => self
                .store
                .id_for_digest(&self.hasher.digest(secret))
                .ok()
                .flatten()
                .and_then(|id| self.store.get_key(&id).ok().flatten()),
        };
        let mut v = json!({
            "valid": error.is_none(),
            "code": error.as_ref().map(|e| e.code()),
            "key": record.as_ref().map(|r| self.key_json(r)),
        });
        if let Some(e) = &error {
            v["error"] = e.body_json()["error"].clone();
        }
        v
    }
}

/// Body of `POST /v1/verify` and options of `keygate keys verify`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The secret to check.
    pub key: String,
    /// Deployment to check access to.
    pub deployment: Option<String>,
    /// Method (default GET).
    pub method: Option<String>,
    /// Request path, for routing and route scopes.
    pub path: Option<String>,
    /// A scope the key must grant.
    pub scope: Option<String>,
}
