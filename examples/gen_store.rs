//! Generates a key store with many keys for benchmarks:
//! `cargo run --release --example gen_store -- STORE_PATH COUNT [SECRETS_FILE]`.
//! Keys are operators on every deployment with no rate limit of their own; the secrets are
//! written one per line to SECRETS_FILE (for load generators) when given.

use std::io::Write;

use keygate::keys::{KeyRecord, Role, SecretHasher};
use keygate::store::Store;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(count)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: gen_store STORE_PATH COUNT [SECRETS_FILE]");
    };
    let count: usize = count.parse()?;
    let store = Store::open(std::path::Path::new(path))?;
    let hasher = SecretHasher::from_env();
    let mut secrets = match args.get(3) {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..count {
        let (record, secret) = KeyRecord::issue(
            format!("bench key {i}"),
            Role::Operator,
            vec!["read".into(), "write".into()],
            vec!["*".into()],
            &hasher,
        )?;
        batch.push(record);
        if let Some(w) = secrets.as_mut() {
            writeln!(w, "{secret}")?;
        }
        if batch.len() == batch.capacity() {
            store.insert_keys(&batch)?;
            batch.clear();
        }
    }
    store.insert_keys(&batch)?;
    // Mark the store as set up so `serve` mints no bootstrap admin key.
    store.meta_set("bootstrapped", b"1")?;
    eprintln!("wrote {count} keys to {path}");
    Ok(())
}
