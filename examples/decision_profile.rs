//! Runs the per-request decision in a loop for profiling (e.g. under
//! `valgrind --tool=callgrind`): `cargo run --release --example decision_profile -- 100000 200000`.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};
use keygate::config::Config;
use keygate::gateway::{Gateway, Outcome};
use keygate::keyindex::KeyIndex;
use keygate::keys::{KeyRecord, Role, SecretHasher};
use keygate::store::Store;
use keygate::usage::Usage;

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
    let config = Config::parse(
        &dir.path().join("gateway.toml"),
        "[rate_limit]\ndefault = \"1000000000/1s\"\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n  [[deployments.routes]]\n  name = \"read_items\"\n  methods = [\"GET\"]\n  path = \"/items\"\n  scope = \"read\"\n",
    )?;
    let hasher = SecretHasher::new(None);
    let index = Arc::new(KeyIndex::with_capacity(n));
    let mut secrets = Vec::new();
    for i in 0..n {
        let (r, secret) = KeyRecord::issue(
            format!("key {i}"),
            Role::Operator,
            vec!["read".into()],
            vec!["app".into()],
            &hasher,
        )?;
        index.apply(None, Some(&r));
        if secrets.len() < 1024 {
            secrets.push(secret);
        }
    }
    let store = Arc::new(Store::open(&dir.path().join("p.redb"))?);
    let gw = Gateway::new(config, index, hasher, Arc::new(Usage::new(store)?));
    let rt = gw.runtime.load_full();
    let heads: Vec<HeaderMap> = secrets
        .iter()
        .map(|s| {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_str(s).expect("header"));
            h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
            h
        })
        .collect();
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
