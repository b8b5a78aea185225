//! The one typed error of the request paths, mapped to a status, a code and a JSON body.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// Every error the data plane and the admin API answer with (SPEC §2, §3).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewayError {
    /// Two different credentials in one request.
    #[error("the request carries two different API keys")]
    AmbiguousCredentials,
    /// No credential.
    #[error("an API key is required")]
    MissingKey,
    /// Malformed, bad checksum, unknown, revoked, deleted or rotated out.
    #[error("the API key is not valid")]
    InvalidKey,
    /// Past its expiry.
    #[error("the API key has expired")]
    KeyExpired {
        /// RFC 3339 expiry time.
        expired_at: String,
    },
    /// Key not allowed on this deployment.
    #[error("the API key is not allowed on this deployment")]
    DeploymentForbidden {
        /// The deployment's name.
        deployment: String,
    },
    /// Role or scopes do not allow the operation.
    #[error("the API key does not allow this operation")]
    InsufficientScope {
        /// What the operation needs.
        required: String,
        /// What the key has.
        granted: Vec<String>,
    },
    /// No deployment matches.
    #[error("no deployment matches this request")]
    NoRoute,
    /// The key is over its rate limit.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Requests per window.
        limit: u32,
        /// Window length in seconds.
        window_seconds: u64,
        /// Seconds until a request will be accepted.
        retry_after_seconds: u64,
    },
    /// The client IP sent too many bad keys.
    #[error("too many failed authentication attempts from this address")]
    TooManyFailures {
        /// Seconds until the address is accepted again.
        retry_after_seconds: u64,
    },
    /// Connect or protocol failure talking to the upstream.
    #[error("the upstream is unavailable")]
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// Admin API: unknown key id.
    #[error("no key with this id")]
    KeyNotFound,
    /// Admin API: bad request body or parameter.
    #[error("{message}")]
    InvalidRequest {
        /// The field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Admin API: unknown path.
    #[error("not found")]
    NotFound,
    /// Admin API: method not allowed on this path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Request body over the size limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// Something on our side failed (the store, the OS).
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            AmbiguousCredentials | InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            MissingKey | InvalidKey | KeyExpired { .. } => StatusCode::UNAUTHORIZED,
            DeploymentForbidden { .. } | InsufficientScope { .. } => StatusCode::FORBIDDEN,
            NoRoute | KeyNotFound | NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RateLimited { .. } | TooManyFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            AmbiguousCredentials => "ambiguous_credentials",
            MissingKey => "missing_key",
            InvalidKey => "invalid_key",
            KeyExpired { .. } => "key_expired",
            DeploymentForbidden { .. } => "deployment_forbidden",
            InsufficientScope { .. } => "insufficient_scope",
            NoRoute => "no_route",
            RateLimited { .. } => "rate_limited",
            TooManyFailures { .. } => "too_many_failures",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            KeyNotFound => "key_not_found",
            InvalidRequest { .. } => "invalid_request",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            PayloadTooLarge => "payload_too_large",
            Internal => "internal_error",
        }
    }

    /// A canned body for the errors without extra fields, so the hot path does not format.
    fn static_body(&self) -> Option<&'static [u8]> {
        use GatewayError::*;
        Some(match self {
            AmbiguousCredentials => br#"{"error":{"code":"ambiguous_credentials","message":"the request carries two different API keys"}}"#,
            MissingKey => br#"{"error":{"code":"missing_key","message":"an API key is required"}}"#,
            InvalidKey => br#"{"error":{"code":"invalid_key","message":"the API key is not valid"}}"#,
            NoRoute => br#"{"error":{"code":"no_route","message":"no deployment matches this request"}}"#,
            UpstreamUnavailable => br#"{"error":{"code":"upstream_unavailable","message":"the upstream is unavailable"}}"#,
            UpstreamTimeout => br#"{"error":{"code":"upstream_timeout","message":"the upstream did not answer in time"}}"#,
            _ => return None,
        })
    }

    /// The JSON body `{"error": {"code", "message", ...extra}}`.
    pub fn body_json(&self) -> serde_json::Value {
        use GatewayError::*;
        let mut inner = serde_json::json!({"code": self.code(), "message": self.to_string()});
        let extra = match self {
            KeyExpired { expired_at } => serde_json::json!({"expired_at": expired_at}),
            DeploymentForbidden { deployment } => serde_json::json!({"deployment": deployment}),
            InsufficientScope { required, granted } => {
                serde_json::json!({"required": required, "granted": granted})
            }
            RateLimited {
                limit,
                window_seconds,
                retry_after_seconds,
            } => serde_json::json!({
                "limit": limit, "window_seconds": window_seconds,
                "retry_after_seconds": retry_after_seconds
            }),
            TooManyFailures {
                retry_after_seconds,
            } => {
                serde_json::json!({"retry_after_seconds": retry_after_seconds})
            }
            InvalidRequest { field, .. } => serde_json::json!({"field": field}),
            _ => serde_json::Value::Null,
        };
        if let (Some(inner), serde_json::Value::Object(extra)) = (inner.as_object_mut(), extra) {
            inner.extend(extra);
        }
        serde_json::json!({ "error": inner })
    }

    /// The full HTTP response for this error.
    pub fn to_response(&self) -> Response<Body> {
        let mut resp = match self.static_body() {
            Some(bytes) => {
                let mut r = Response::new(body::full(Bytes::from_static(bytes)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            None => body::json(self.status(), &self.body_json()),
        };
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        match self {
            GatewayError::MissingKey
            | GatewayError::InvalidKey
            | GatewayError::KeyExpired { .. } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\""),
                );
            }
            GatewayError::RateLimited {
                retry_after_seconds,
                ..
            }
            | GatewayError::TooManyFailures {
                retry_after_seconds,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            _ => {}
        }
        resp
    }

    /// Shorthand for an `invalid_request` naming `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        GatewayError::InvalidRequest {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_bodies_match_generated_ones() {
        for e in [
            GatewayError::AmbiguousCredentials,
            GatewayError::MissingKey,
            GatewayError::InvalidKey,
            GatewayError::NoRoute,
            GatewayError::UpstreamUnavailable,
            GatewayError::UpstreamTimeout,
        ] {
            let canned: serde_json::Value =
                serde_json::from_slice(e.static_body().unwrap()).unwrap();
            assert_eq!(canned, e.body_json(), "{e:?}");
        }
    }

    #[test]
    fn extra_fields_are_merged() {
        let e = GatewayError::InsufficientScope {
            required: "a".into(),
            granted: vec!["b".into()],
        };
        let v = e.body_json();
        assert_eq!(v["error"]["code"], "insufficient_scope");
        assert_eq!(v["error"]["required"], "a");
        assert_eq!(v["error"]["granted"][0], "b");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
    }
}
