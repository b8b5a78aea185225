//! Times one usage flush with N active keys: `cargo run --release --example flush_profile -- 10000`.

use std::sync::Arc;

use http::{HeaderValue, Method};
use keygate::store::Store;
use keygate::usage::{Hit, Operation, Usage};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let usage = Usage::new(Arc::new(Store::open(&dir.path().join("u.redb"))?))?;
    let states: Vec<_> = (0..n)
        .map(|i| usage.key_states().of_id(&format!("key_{i:016}")))
        .collect();
    let op = Operation::Method(Method::GET);
    let dep: Arc<str> = Arc::from("app");
    let ua = HeaderValue::from_static("wrk/4.1");
    for round in 0..5 {
        let now = chrono::Utc::now().timestamp();
        for state in &states {
            usage.record(Hit {
                state,
                deployment: &dep,
                operation: &op,
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
