//! Times one usage flush with N active keys, over R rounds (5 unless given):
//! `cargo run --release --example flush_profile -- 10000 [R]`.
//! Prints the wall time and the CPU time of each flush (the CPU time is what competes with the
//! data plane for a shared core; the wall time also holds the commit's wait for the disk).

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
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    for round in 0..rounds {
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
        let cpu = thread_cpu();
        let flushed = if round == 0 {
            usage.flush()?
        } else {
            usage.flush_due()?
        };
        println!(
            "round {round}: flushed {flushed} requests for {n} keys in {:?} ({:?} of CPU)",
            t.elapsed(),
            thread_cpu().saturating_sub(cpu)
        );
    }
    Ok(())
}

/// CPU time this thread has used so far.
fn thread_cpu() -> std::time::Duration {
    keygate::clock::read(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default()
}
