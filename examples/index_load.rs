//! Measures start-up with a large store: the time to read every key and build the live
//! index, the resident memory the index takes per key, and the background move of that memory
//! onto huge pages.
//! `cargo run --release --example gen_store -- /tmp/k.redb 1000000 && \
//!  cargo run --release --example index_load -- /tmp/k.redb`

use std::time::Instant;

use keygate::keyindex::KeyIndex;
use keygate::store::Store;

// The allocator the keygate binary uses, so the memory per key is the binary's.
#[global_allocator]
static GLOBAL: keygate::alloc::Allocator = keygate::alloc::Allocator;

/// Resident set size in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: index_load STORE_PATH"))?;
    let before = rss();
    let started = Instant::now();
    let store = Store::open(std::path::Path::new(&path))?;
    // As `keygate serve` does.
    let (index, n) = KeyIndex::from_store(&store)?;
    let elapsed = started.elapsed();
    let per_key = |rss_now: u64| (rss_now - before) as f64 / n.max(1) as f64;
    let after = rss();
    println!(
        "keys: {n}\nload time: {:.3} s\nresident memory: {:.1} MiB total, {:.0} bytes per key",
        elapsed.as_secs_f64(),
        (after - before) as f64 / (1 << 20) as f64,
        per_key(after)
    );
    // What `keygate serve` then does in the background: move the key memory onto huge pages.
    match keygate::hugepages::move_key_memory(n) {
        Some(Ok(c)) => println!(
            "huge pages: {} of {} resident 2 MiB ranges collapsed in {:.3} s; resident memory then {:.0} bytes per key",
            c.collapsed,
            c.eligible,
            c.took.as_secs_f64(),
            per_key(rss())
        ),
        Some(Err(e)) => println!("huge pages: {e}"),
        None => {}
    }
    drop(index);
    Ok(())
}
