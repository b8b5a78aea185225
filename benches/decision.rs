//! The per-request decision, measured without sockets: credential extraction from a
//! `HeaderMap`, format + checksum, hashing, index lookup, constant-time compare, status /
//! expiry / deployment / scope checks, rate limit, usage counter bump — at 1 000, 100 000 and
//! 1 000 000 keys. Plus the upstream header rewrite.
//!
//! `cargo bench --bench decision`

use std::net::{IpAddr, SocketAddr};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, Method, Uri};
use keygate::gateway::Outcome;
use keygate::keys::{KeyRecord, Role, SecretHasher};
use keygate::proxy::{self, ConnInfo};

// The allocator the keygate binary ships with: where keys land in memory decides much of the
// 1M-key case.
#[global_allocator]
static GLOBAL: keygate::alloc::Allocator = keygate::alloc::Allocator;

#[path = "support/decision_setup.rs"]
mod decision_setup;

use decision_setup::{gateway, request_heads};

/// Key counts to measure. `cargo test --all-targets` runs benches once as a smoke test
/// (without `--bench`); there the big indexes would only cost time.
fn key_counts() -> &'static [usize] {
    if std::env::args().any(|a| a == "--bench") {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[1_000]
    }
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    let uri: Uri = "/items/42?x=1".parse().expect("uri");
    let ip: IpAddr = "10.1.2.3".parse().expect("ip");
    for &n in key_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (gw, secrets) = gateway(n, dir.path());
        let heads = request_heads(&secrets);
        let rt = gw.runtime.load_full();
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("admit_and_count", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % heads.len();
                let h = &heads[i];
                let mut out = Outcome::default();
                let admitted = gw.admit(&rt, &Method::GET, &uri, h, None, ip, &mut out);
                assert!(admitted.is_ok());
                gw.account(&rt, &out, 200, ip, h.get(http::header::USER_AGENT));
            })
        });
    }
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, secrets) = gateway(1, dir.path());
    let rt = gw.runtime.load_full();
    let uri: Uri = "/items/42".parse().expect("uri");
    let mut h = HeaderMap::new();
    h.insert(
        "x-api-key",
        HeaderValue::from_str(&secrets[0]).expect("header"),
    );
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert("user-agent", HeaderValue::from_static("curl/8.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.1"));
    let mut out = Outcome::default();
    let (m, key) = gw
        .admit(
            &rt,
            &Method::GET,
            &uri,
            &h,
            None,
            "127.0.0.1".parse().expect("ip"),
            &mut out,
        )
        .expect("admitted");
    let conn = ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        tls: false,
    };
    let cfg = &rt.config;
    let host = h.get("host").cloned();
    c.bench_function("header_rewrite", |b| {
        b.iter_batched_ref(
            || h.clone(),
            |headers| {
                proxy::strip_keygate_headers(headers);
                proxy::strip_credential(headers, &cfg.auth);
                proxy::strip_hop_by_hop(headers, false);
                proxy::set_forwarded_headers(
                    headers,
                    &conn,
                    host.as_ref(),
                    &cfg.server.trusted_proxies,
                );
                proxy::set_identity_headers(headers, key, m.deployment);
                headers.remove(http::header::HOST);
            },
            BatchSize::SmallInput,
        )
    });
}

/// Time from the store commit to the data plane refusing the key: applying a revoked record
/// to the live index (at 1 000 000 keys).
fn revocation(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = *key_counts().last().unwrap_or(&1_000);
    let (gw, _) = gateway(n, dir.path());
    let hasher = SecretHasher::new(None);
    let (active, secret) = KeyRecord::issue(
        "victim".into(),
        Role::Operator,
        vec![],
        vec!["*".into()],
        &hasher,
    )
    .expect("entropy");
    let mut revoked = active.clone();
    revoked.revoked_at = Some(Utc::now());
    let digest = hasher.digest(&secret);
    c.bench_function(&format!("revocation_visible/{n}"), |b| {
        b.iter_batched(
            || gw.keys.apply(None, Some(&active)),
            |()| {
                gw.keys.apply(Some(&active), Some(&revoked));
                assert!(gw.keys.lookup(&digest).is_none());
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = decision, header_rewrite, revocation
}
criterion_main!(benches);
