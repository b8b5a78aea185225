//! Times one usage flush with N active keys: `cargo run --release --example flush_profile -- 10000`.

use std::sync::Arc;

use http::{HeaderValue, Method};
use keygate::keyindex::KeyId;
use keygate::store::Store;
use keygate::usage::{Hit, Operation, Usage};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let usage = Usage::new(Arc::new(Store::open(&dir.path().join("u.redb"))?))?;
    let ids: Vec<KeyId> = (0..n)
        .map(|i| KeyId::from(format!("key_{i:016}").as_str()))
        .collect();
    let dep: Arc<str> = Arc::from("app");
    let ua = HeaderValue::from_static("wrk/4.1");
    for round in 0..5 {
        let now = chrono::Utc::now().timestamp();
        for id in &ids {
            usage.record(Hit {
                key: id.clone(),
                deployment: &dep,
                operation: Operation::Method(Method::GET),
                status: 200,
                now,
                ip: "10.0.0.1".parse()?,
                user_agent: Some(&ua),
            });
        }
        let t = std::time::Instant::now();
        let flushed = if round == 0 {
            usage.flush()?
        } else {
            usage.flush_due()?
        };
        println!(
            "round {round}: flushed {flushed} requests for {n} keys in {:?}",
            t.elapsed()
        );
    }
    Ok(())
}
