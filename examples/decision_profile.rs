//! Runs the per-request decision in a loop for profiling (e.g. under
//! `valgrind --tool=callgrind`): `cargo run --release --example decision_profile -- 100000 200000`.
//! With `spread` after the numbers it times blocks of 16 keys and of 1 024 keys alternately
//! and prints both and what their difference is made of: the keys' memory, and the bench's
//! own request heads (out of cache when 1 024 of them take turns). With `parallel` it
//! runs the loop on every core at once, each thread over its own share of the keys (what
//! the threads share then shows: shared counters, locks).

use std::net::IpAddr;

use http::{Method, Uri};
use keygate::gateway::Outcome;

// The allocator the binary ships with (memory layout decides much of the 1M-key case).
#[global_allocator]
static GLOBAL: keygate::alloc::Allocator = keygate::alloc::Allocator;

#[path = "../benches/support/decision_setup.rs"]
mod decision_setup;

use decision_setup::{gateway, request_heads};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, iterations) = (
        args.first().copied().unwrap_or(100_000),
        args.get(1).copied().unwrap_or(200_000),
    );
    let dir = tempfile::tempdir()?;
    let (gw, secrets) = gateway(n, dir.path());
    let rt = gw.runtime.load_full();
    let heads = request_heads(&secrets);
    let uri: Uri = "/items/42?x=1".parse()?;
    let ip: IpAddr = "10.1.2.3".parse()?;
    let run = |heads: &[http::HeaderMap], iterations: usize| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        for i in 0..iterations {
            let h = &heads[i % heads.len()];
            let mut out = Outcome::default();
            gw.admit(&rt, &Method::GET, &uri, h, None, ip, &mut out)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            gw.account(&rt, &out, 200, ip, h.get(http::header::USER_AGENT));
        }
        Ok(started.elapsed().as_nanos() as f64 / iterations.max(1) as f64)
    };
    if std::env::args().any(|a| a == "parallel") {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let per = std::thread::scope(|s| {
            let runs: Vec<_> = (0..threads)
                .map(|t| {
                    let mine: Vec<http::HeaderMap> =
                        heads.iter().skip(t).step_by(threads).cloned().collect();
                    s.spawn(move || run(&mine, iterations))
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().map_err(|_| anyhow::anyhow!("a thread panicked"))?)
                .collect::<anyhow::Result<Vec<f64>>>()
        })?;
        let per: Vec<String> = per.iter().map(|p| format!("{p:.0}")).collect();
        println!(
            "{iterations} decisions over {n} keys on each of {threads} threads at once: {} ns each",
            per.join(", ")
        );
        return Ok(());
    }
    if !std::env::args().any(|a| a == "spread") {
        let per = run(&heads, iterations)?;
        println!("{iterations} decisions over {n} keys: {per:.0} ns each");
        return Ok(());
    }
    // Blocks of 16 keys (always in cache) and of all 1 024, alternating in one process: the
    // difference is what the keys' memory costs, and it holds while this host's speed drifts.
    // A third kind of block has 1 024 heads carrying only the 16 hot keys: what the bench's
    // own request heads cost when they are not in cache (a served request's head has just
    // been parsed, so it is).
    let hot = &heads[..heads.len().min(16)];
    let repeated: Vec<String> = (0..heads.len())
        .map(|i| secrets[i % hot.len()].clone())
        .collect();
    let cold_heads = request_heads(&repeated);
    let (mut few, mut all, mut by_keys, mut by_heads) = (vec![], vec![], vec![], vec![]);
    for _ in 0..(iterations / 600_000).max(1) {
        let (f, h, a) = (
            run(hot, 200_000)?,
            run(&cold_heads, 200_000)?,
            run(&heads, 200_000)?,
        );
        few.push(f);
        all.push(a);
        by_keys.push(a - h);
        by_heads.push(h - f);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{n} keys, medians of {} block triples: 16 keys {:.0} ns, 1 024 keys {:.0} ns; of the \
         difference, the keys' memory {:.0} ns and the request heads' {:.0} ns",
        few.len(),
        median(&mut few),
        median(&mut all),
        median(&mut by_keys),
        median(&mut by_heads)
    );
    Ok(())
}
