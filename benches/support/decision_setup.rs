//! The decision set-up shared by `benches/decision.rs` and `examples/decision_profile.rs`
//! (included by both with `#[path]`): a gateway with `n` keys on the `echo` upstream, and
//! request heads carrying some of its secrets. Like `keygate serve`, it moves the key memory
//! onto huge pages once the keys are loaded (see `keygate::hugepages`).

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use keygate::config::Config;
use keygate::gateway::Gateway;
use keygate::keyindex::KeyIndex;
use keygate::keys::{KeyRecord, Role, SecretHasher};
use keygate::store::Store;
use keygate::usage::Usage;

pub const CONFIG: &str = r#"
[rate_limit]
default = "1000000000/1s"
[[deployments]]
name = "app"
upstream = "echo"
  [[deployments.routes]]
  name = "read_items"
  methods = ["GET"]
  path = "/items"
  scope = "read"
"#;

/// A gateway with `n` keys; returns it and up to 1024 of the secrets.
pub fn gateway(n: usize, dir: &std::path::Path) -> (Gateway, Vec<String>) {
    let config = Config::parse(&dir.join("gateway.toml"), CONFIG).expect("bench config");
    let hasher = SecretHasher::new(None);
    let index = Arc::new(KeyIndex::new());
    let mut secrets = Vec::new();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let (record, secret) = KeyRecord::issue(
            format!("key {i}"),
            Role::Operator,
            vec!["read".into()],
            vec!["app".into()],
            &hasher,
        )
        .expect("entropy");
        batch.push(record);
        if secrets.len() < 1024 {
            secrets.push(secret);
        }
        if batch.len() == batch.capacity() {
            index.load(batch.iter());
            batch.clear();
        }
    }
    index.load(batch.iter());
    // As `keygate serve` does once started (in the background there).
    let _ = keygate::hugepages::move_key_memory(n);
    let store = Arc::new(Store::open(&dir.join("bench.redb")).expect("store"));
    let usage = Arc::new(Usage::new(store).expect("usage"));
    (Gateway::new(config, index, hasher, usage), secrets)
}

/// One request head per secret: the key in `X-API-Key`, and a `User-Agent`.
pub fn request_heads(secrets: &[String]) -> Vec<HeaderMap> {
    secrets
        .iter()
        .map(|s| {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_str(s).expect("header"));
            h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
            h
        })
        .collect()
}
