//! Runs the per-request decision in a loop for profiling (e.g. under
//! `valgrind --tool=callgrind`): `cargo run --release --example decision_profile -- 100000 200000`.

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
    let started = std::time::Instant::now();
    for i in 0..iterations {
        let h = &heads[i % heads.len()];
        let mut out = Outcome::default();
        gw.admit(&rt, &Method::GET, &uri, h, None, ip, &mut out)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        gw.account(&rt, &out, 200, ip, h.get(http::header::USER_AGENT));
    }
    let per = started.elapsed() / iterations as u32;
    println!("{iterations} decisions over {n} keys: {per:?} each");
    Ok(())
}
