//! The success path of the per-request decision (credential → hash → lookup → checks → rate
//! limit → usage count) makes no heap allocation once warm. Counted with a counting global
//! allocator; this file holds a single test so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::Utc;
use http::{HeaderMap, HeaderValue, Method, Uri};
use keygate::config::Config;
use keygate::gateway::{Gateway, Outcome};
use keygate::keyindex::KeyIndex;
use keygate::keys::{
    display_secret, generate_id, generate_secret, hex, KeyRecord, Role, SecretHasher,
};
use keygate::store::Store;
use keygate::usage::Usage;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn the_success_path_does_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(
        &dir.path().join("gateway.toml"),
        "[rate_limit]\ndefault = \"1000000/1s\"\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n  [[deployments.routes]]\n  name = \"read_items\"\n  methods = [\"GET\"]\n  path = \"/items\"\n  scope = \"read\"\n",
    )
    .unwrap();
    let hasher = SecretHasher::new(None);
    let index = Arc::new(KeyIndex::new());
    let mut secrets = Vec::new();
    for i in 0..100 {
        let secret = generate_secret("kg", "prod").unwrap();
        index.apply(
            None,
            Some(&KeyRecord {
                id: generate_id().unwrap(),
                name: format!("key {i}"),
                description: String::new(),
                owner: "o".into(),
                role: Role::Viewer,
                scopes: vec!["read".into()],
                deployments: vec!["app".into()],
                env: "prod".into(),
                display: display_secret(&secret, "kg", "prod"),
                created_at: Utc::now(),
                expires_at: Some(Utc::now() + chrono::Duration::days(1)),
                revoked_at: None,
                rate_limit: None,
                digest: hex(&hasher.digest(&secret)),
                grace: vec![],
            }),
        );
        secrets.push(secret);
    }
    let store = Arc::new(Store::open(&dir.path().join("a.redb")).unwrap());
    let gw = Gateway::new(config, index, hasher, Arc::new(Usage::new(store).unwrap()));
    let rt = gw.runtime.load_full();
    let heads: Vec<HeaderMap> = secrets
        .iter()
        .map(|s| {
            let mut h = HeaderMap::new();
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {s}")).unwrap(),
            );
            h.insert("user-agent", HeaderValue::from_static("test/1.0"));
            h
        })
        .collect();
    let uri: Uri = "/items/42?x=1".parse().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let run = |rounds: usize| {
        for _ in 0..rounds {
            for h in &heads {
                let mut out = Outcome::default();
                let admitted = gw.admit(&rt, &Method::GET, &uri, h, None, ip, &mut out);
                assert!(admitted.is_ok());
                drop(admitted);
                gw.account(&rt, &out, 200, ip, h.get("user-agent"));
            }
        }
    };
    // Warm up: limiter slots, usage counters and last-use entries are created once per key.
    run(2);
    COUNTING.store(true, Ordering::Relaxed);
    run(10);
    COUNTING.store(false, Ordering::Relaxed);
    let n = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(
        n,
        0,
        "{n} heap allocations in {} warm decisions",
        10 * heads.len()
    );
}
