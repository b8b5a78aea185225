//! A small client for the admin API, used by the CLI when a running gateway holds the store.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::Config;

/// Why an admin API call failed before producing an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No admin key configured for the online path.
    #[error("the key store is held by a running keygate; to manage keys through its admin API set KEYGATE_ADMIN_KEY or pass --admin-key-file (an admin-role key)")]
    NoAdminKey,
    /// The key file could not be read.
    #[error("cannot read the admin key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gateway could not be reached.
    #[error("cannot reach the keygate admin API at {addr}: {message}")]
    Unreachable {
        /// The admin address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// An admin API endpoint with its credential.
pub struct AdminClient {
    addr: SocketAddr,
    key: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never printed.
        f.debug_struct("AdminClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl AdminClient {
    /// The client for `config`'s admin listener, with the key from `--admin-key-file` or
    /// `KEYGATE_ADMIN_KEY`.
    pub fn new(config: &Config, key_file: Option<&Path>) -> Result<Self, ClientError> {
        let key = match key_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ClientError::KeyFile {
                    path: path.display().to_string(),
                    source,
                })?
                .trim()
                .to_string(),
            None => std::env::var("KEYGATE_ADMIN_KEY")
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        if key.is_empty() {
            return Err(ClientError::NoAdminKey);
        }
        let mut addr = config.admin.listen;
        // A wildcard listen address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Ok(AdminClient { addr, key })
    }

    /// Sends one request and returns the status and JSON answer (`null` for no body).
    pub fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            addr: self.addr,
            message,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        rt.block_on(async {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let bytes = match body {
                Some(v) => {
                    Bytes::from(serde_json::to_vec(v).map_err(|e| unreachable(e.to_string()))?)
                }
                None => Bytes::new(),
            };
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{}{}", self.addr, path_and_query))
                .header("x-api-key", &self.key)
                .header("content-type", "application/json")
                .body(Full::new(bytes))
                .map_err(|e| unreachable(e.to_string()))?;
            let resp =
                tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
                    .await
                    .map_err(|_| unreachable("no answer within 30s".into()))?
                    .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            let value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body)
                    .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned()))
            };
            Ok((status, value))
        })
    }
}
