//! Authentication and authorisation of one request: extract the credential, check its
//! format, hash, look up, then status, expiry, deployment and scope checks.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::{header, HeaderMap, Method};

use crate::config::{AuthConfig, Deployment, Route};
use crate::error::GatewayError;
use crate::keyindex::{KeyIndex, LiveKey};
use crate::keys::{check_secret_shape, rfc3339, Role, SecretHasher};

/// Where the accepted credential came from (so it can be removed before forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// The configured header (`X-API-Key`).
    Header,
    /// `Authorization: Bearer`.
    Bearer,
    /// The configured query parameter.
    Query,
}

/// A credential found in a request.
#[derive(Debug, Clone, Copy)]
pub struct Credential<'a> {
    /// The presented secret: bytes, as sent (a secret is checked byte-wise, so it needs no
    /// UTF-8 pass; anything that is not one of our keys fails the format check or lookup).
    pub secret: &'a [u8],
    /// Where it came from.
    pub source: CredentialSource,
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// Finds the value of query parameter `name` in `query`.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Extracts the credential. Two different credentials → `ambiguous_credentials`; none →
/// `missing_key`.
pub fn extract_credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    cfg: &AuthConfig,
) -> Result<Credential<'a>, GatewayError> {
    let mut found: Option<Credential<'a>> = None;
    let mut offer = |secret: &'a [u8], source| -> Result<(), GatewayError> {
        if secret.is_empty() {
            return Ok(());
        }
        match found {
            Some(c) if c.secret != secret => Err(GatewayError::AmbiguousCredentials),
            Some(_) => Ok(()),
            None => {
                found = Some(Credential { secret, source });
                Ok(())
            }
        }
    };
    for v in headers.get_all(&cfg.header) {
        offer(v.as_bytes().trim_ascii(), CredentialSource::Header)?;
    }
    if cfg.bearer {
        for v in headers.get_all(header::AUTHORIZATION) {
            if let Some(token) = bearer_token(v.as_bytes()) {
                offer(token, CredentialSource::Bearer)?;
            }
        }
    }
    if let (Some(name), Some(q)) = (&cfg.query_param, query) {
        if let Some(v) = query_value(q, name) {
            offer(v.as_bytes(), CredentialSource::Query)?;
        }
    }
    // Not `ok_or`: that builds the error on every call and drops it out of line.
    let Some(found) = found else {
        return Err(GatewayError::MissingKey);
    };
    Ok(found)
}

/// Whether a method is read-only (all a viewer may use).
fn is_read_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Everything the decision needs besides the request.
pub struct Verifier<'a> {
    /// Live keys.
    pub index: &'a KeyIndex,
    /// Secret hasher.
    pub hasher: &'a SecretHasher,
    /// Auth settings.
    pub auth: &'a AuthConfig,
}

impl Verifier<'_> {
    /// Finds the live key for a secret and checks it is usable at `now` (format, digest,
    /// grace period, expiry).
    ///
    /// The checksum is not computed here: a secret whose checksum is wrong cannot match a
    /// stored digest, so it fails the lookup as `invalid_key` all the same, and checking it
    /// first would cost every valid request a CRC to make only the failures cheaper. (A
    /// locked-out address still gets the full check before any hashing: see
    /// `Gateway::identify_guarded`.)
    pub fn identify(&self, secret: &[u8], now: i64) -> Result<Arc<LiveKey>, GatewayError> {
        if check_secret_shape(secret, &self.auth.prefix, &self.auth.environments).is_none() {
            return Err(GatewayError::InvalidKey);
        }
        let digest = self.hasher.digest(secret);
        let Some(entry) = self.index.lookup(&digest) else {
            return Err(GatewayError::InvalidKey);
        };
        entry.key.prefetch();
        if entry.valid_until.is_some_and(|until| now >= until) {
            return Err(GatewayError::InvalidKey);
        }
        if let Some(exp) = entry.key.expires_at {
            if now >= exp {
                let at = DateTime::<Utc>::from_timestamp(exp, 0).unwrap_or_default();
                return Err(GatewayError::KeyExpired {
                    expired_at: rfc3339(&at),
                });
            }
        }
        Ok(entry.key)
    }
}

/// Checks the role's method rule: viewers may only read.
pub fn authorize_method(key: &LiveKey, method: &Method) -> Result<(), GatewayError> {
    if key.role == Role::Viewer && !is_read_only(method) {
        return Err(GatewayError::InsufficientScope {
            required: format!("method:{method}"),
            granted: key.scope_list(),
        });
    }
    Ok(())
}

/// Checks that `key` may call `method` on `deployment` through `route`.
pub fn authorize(
    key: &LiveKey,
    deployment: &Deployment,
    route: Option<&Route>,
    method: &Method,
) -> Result<(), GatewayError> {
    if !key.allows_deployment(&deployment.name) {
        return Err(GatewayError::DeploymentForbidden {
            deployment: deployment.name.clone(),
        });
    }
    authorize_method(key, method)?;
    if let Some(scope) = route.and_then(|r| r.scope.as_deref()) {
        if !key.has_scope(scope) {
            return Err(GatewayError::InsufficientScope {
                required: scope.to_string(),
                granted: key.scope_list(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cfg() -> AuthConfig {
        crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[auth]\nquery_param = \"api_key\"\n",
        )
        .unwrap()
        .auth
    }

    #[test]
    fn extraction_rules() {
        let cfg = cfg();
        let mut h = HeaderMap::new();
        assert_eq!(
            extract_credential(&h, None, &cfg).unwrap_err(),
            GatewayError::MissingKey
        );
        h.insert("x-api-key", HeaderValue::from_static("a"));
        assert_eq!(extract_credential(&h, None, &cfg).unwrap().secret, b"a");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bEaReR a"));
        assert_eq!(extract_credential(&h, None, &cfg).unwrap().secret, b"a");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(
            extract_credential(&h, None, &cfg).unwrap_err(),
            GatewayError::AmbiguousCredentials
        );
        h.remove(header::AUTHORIZATION);
        assert_eq!(
            extract_credential(&h, Some("x=1&api_key=c"), &cfg).unwrap_err(),
            GatewayError::AmbiguousCredentials
        );
        h.clear();
        let c = extract_credential(&h, Some("x=1&api_key=c"), &cfg).unwrap();
        assert_eq!((c.secret, c.source), (&b"c"[..], CredentialSource::Query));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        assert_eq!(
            extract_credential(&h, None, &cfg).unwrap_err(),
            GatewayError::MissingKey
        );
        // Bytes that are not text are still a credential sent: offered as they are (trimmed),
        // to fail the format check later; two different ones are ambiguous.
        h.clear();
        h.insert("x-api-key", HeaderValue::from_bytes(b" \xffk\t").unwrap());
        assert_eq!(extract_credential(&h, None, &cfg).unwrap().secret, b"\xffk");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xfe").unwrap(),
        );
        assert_eq!(
            extract_credential(&h, None, &cfg).unwrap_err(),
            GatewayError::AmbiguousCredentials
        );
        h.remove("x-api-key");
        let c = extract_credential(&h, None, &cfg).unwrap();
        assert_eq!(
            (c.secret, c.source),
            (&b"\xfe"[..], CredentialSource::Bearer)
        );
    }
}
