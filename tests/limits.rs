//! Rate limits end to end over loopback sockets (SPEC §2, §5): exactly N of a burst pass with
//! the `RateLimit-*` headers, the 429 answer and its `Retry-After`, precedence key > role >
//! default (and `"none"`), limit changes without a restart (admin API, key manager, config
//! reload), limiter state freed on delete, and the failed-authentication lockout per client
//! IP with and without trusted proxies.

mod common;

use common::*;
use http::Method;
use keygate::audit::Actor;
use keygate::manage::KeySpec;
use keygate::units::Limit;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A key spec with a role and an optional own limit (`None` = role/default applies).
fn spec(name: &str, role: &str, limit: Option<&str>) -> KeySpec {
    KeySpec {
        name: Some(name.into()),
        role: Some(role.into()),
        rate_limit: limit.map(|l| Some(l.to_string())),
        ..Default::default()
    }
}

/// A header as a number, failing with the whole answer when it is missing or not a number.
fn num(a: &Answer, name: &str) -> u64 {
    let v = a
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header: {a:?}"));
    v.to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {v:?}"))
}

/// True when the answer carries none of the `RateLimit-*` headers.
fn no_rate_headers(a: &Answer) -> bool {
    ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]
        .iter()
        .all(|h| !a.headers.contains_key(*h))
}

/// Sends `n` GETs with `secret` and returns the answers in order.
async fn burst(gw: &TestGateway, secret: &str, n: usize) -> Vec<Answer> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(gw.addr(), "/x", &[("x-api-key", secret)]).await);
    }
    out
}

/// Asserts that exactly `limit` of `limit + 1` quick requests pass, each with
/// `RateLimit-Limit: limit`, and the next is a 429 `rate_limited`.
async fn assert_limit(gw: &TestGateway, secret: &str, limit: u64) {
    let answers = burst(gw, secret, limit as usize + 1).await;
    for (i, a) in answers[..limit as usize].iter().enumerate() {
        assert_eq!(a.status, 200, "request {i} of a {limit}-limit: {a:?}");
        assert_eq!(num(a, "ratelimit-limit"), limit, "request {i}: {a:?}");
        assert_eq!(
            num(a, "ratelimit-remaining"),
            limit - 1 - i as u64,
            "request {i}: {a:?}"
        );
    }
    let last = &answers[limit as usize];
    assert_eq!(
        last.status, 429,
        "request {limit} of a {limit}-limit must be refused: {last:?}"
    );
    assert_eq!(last.code(), "rate_limited");
    assert_eq!(last.json()["error"]["limit"], limit);
}

/// Sends a request with a bad key (and optional X-Forwarded-For).
async fn bad_key(gw: &TestGateway, xff: Option<&str>) -> Answer {
    let mut headers = vec![("x-api-key", "kg_prod_not-a-real-key")];
    if let Some(x) = xff {
        headers.push(("x-forwarded-for", x));
    }
    get(gw.addr(), "/x", &headers).await
}

// ---------------------------------------------------------------------------------------
// 1. Exactly N of N+k pass
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn exactly_n_of_a_burst_pass_with_ratelimit_headers() {
    let gw = start_gateway("echo", "").await;
    let (_, secret) = gw.create_key(spec("five", "operator", Some("5/1m")));
    let answers = burst(&gw, &secret, 8).await;

    let mut last_reset = 0;
    for (i, a) in answers[..5].iter().enumerate() {
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert_eq!(num(a, "ratelimit-limit"), 5, "request {i}");
        assert_eq!(num(a, "ratelimit-remaining"), 4 - i as u64, "request {i}");
        // Seconds until the full limit is back: one cell (12 s) per request used, at most
        // the window, never shrinking while the burst is being used up.
        let reset = num(a, "ratelimit-reset");
        assert!(
            (1..=60).contains(&reset),
            "request {i}: RateLimit-Reset {reset}"
        );
        assert!(
            reset >= last_reset,
            "request {i}: RateLimit-Reset went from {last_reset} to {reset}"
        );
        last_reset = reset;
        assert!(
            !a.headers.contains_key("retry-after"),
            "request {i}: Retry-After on a 200"
        );
    }
    assert!(
        last_reset >= 48,
        "after using all 5 cells of 12 s, the full limit is ~60 s away, got {last_reset}"
    );

    for (i, a) in answers[5..].iter().enumerate() {
        assert_eq!(a.status, 429, "request {}: {a:?}", i + 5);
        assert_eq!(a.headers["content-type"], "application/json");
        let v = a.json();
        assert_eq!(v["error"]["code"], "rate_limited", "{v}");
        assert_eq!(v["error"]["limit"], 5, "{v}");
        assert_eq!(v["error"]["window_seconds"], 60, "{v}");
        let retry = v["error"]["retry_after_seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("retry_after_seconds: {v}"));
        // The next cell frees up within 12 s (60 s / 5).
        assert!((1..=12).contains(&retry), "retry_after_seconds {retry}");
        assert_eq!(
            num(a, "retry-after"),
            retry,
            "Retry-After header and body disagree"
        );
        assert_eq!(num(a, "ratelimit-limit"), 5);
        assert_eq!(num(a, "ratelimit-remaining"), 0);
        let reset = num(a, "ratelimit-reset");
        assert!(
            reset >= retry && reset <= 60,
            "RateLimit-Reset {reset} with Retry-After {retry}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. Precedence key > role > default; "none"
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn key_limit_beats_role_limit_beats_default() {
    let gw = start_gateway(
        "echo",
        "\n[rate_limit]\ndefault = \"3/1m\"\n[rate_limit.roles]\nviewer = \"2/1m\"\n",
    )
    .await;
    let (_, operator) = gw.create_key(spec("op", "operator", None));
    let (_, viewer) = gw.create_key(spec("viewer", "viewer", None));
    let (_, own) = gw.create_key(spec("own", "operator", Some("4/1m")));
    let (_, viewer_own) = gw.create_key(spec("viewer-own", "viewer", Some("4/1m")));
    let (_, unlimited) = gw.create_key(spec("unlimited", "viewer", Some("none")));

    assert_limit(&gw, &operator, 3).await; // default
    assert_limit(&gw, &viewer, 2).await; // role
    assert_limit(&gw, &own, 4).await; // key
    assert_limit(&gw, &viewer_own, 4).await; // key beats the viewer role

    // "none" on the key: no headers, never limited (the role and default would allow 2 and 3).
    for (i, a) in burst(&gw, &unlimited, 12).await.iter().enumerate() {
        assert_eq!(a.status, 200, "request {i} of an unlimited key: {a:?}");
        assert!(
            no_rate_headers(a),
            "request {i}: an unlimited key gets no RateLimit headers: {:?}",
            a.headers
        );
    }
}

#[tokio::test]
async fn default_none_disables_the_limit() {
    let gw = start_gateway(
        "echo",
        "\n[rate_limit]\ndefault = \"none\"\n[rate_limit.roles]\nviewer = \"2/1m\"\n",
    )
    .await;
    let (_, operator) = gw.create_key(spec("op", "operator", None));
    for (i, a) in burst(&gw, &operator, 12).await.iter().enumerate() {
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert!(no_rate_headers(a), "request {i}: {:?}", a.headers);
    }
    // A role limit still applies with no default.
    let (_, viewer) = gw.create_key(spec("viewer", "viewer", None));
    assert_limit(&gw, &viewer, 2).await;
}

// ---------------------------------------------------------------------------------------
// 3. Limit changes without a restart
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_patched_key_limit_applies_to_the_next_request() {
    let gw = start_gateway("echo", "").await;
    let admin = gw
        .running
        .bootstrap_secret
        .clone()
        .expect("bootstrap admin key");
    let (id, secret) = gw.create_key(spec("patched", "operator", Some("2/1m")));
    assert_limit(&gw, &secret, 2).await;

    // Through the admin API: the answer comes after the data plane sees the change.
    let a = send(
        gw.running.admin_addr,
        Method::PATCH,
        &format!("/v1/keys/{id}"),
        &[("x-api-key", &admin), ("content-type", "application/json")],
        r#"{"rate_limit": "7/1m"}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["key"]["rate_limit"], "7/1m");
    let next = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(
        next.status, 200,
        "the new, higher limit starts afresh: {next:?}"
    );
    assert_eq!(num(&next, "ratelimit-limit"), 7);
    assert_eq!(num(&next, "ratelimit-remaining"), 6);

    // Through the key manager, clearing the key's own limit: the default (1000/1m) applies.
    let clear = KeySpec {
        rate_limit: Some(None),
        ..Default::default()
    };
    gw.manager
        .update(&gw.config, &id, &clear, &Actor::local())
        .unwrap();
    let next = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(num(&next, "ratelimit-limit"), 1000);

    // And to "none": no headers at all.
    let none = KeySpec {
        rate_limit: Some(Some("none".into())),
        ..Default::default()
    };
    gw.manager
        .update(&gw.config, &id, &none, &Actor::local())
        .unwrap();
    let next = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert!(no_rate_headers(&next), "{:?}", next.headers);
}

/// The limiter belongs to the key, not to one version of it: an update that leaves the limit
/// alone, and a rotation, publish a new live key, and the spent limit must carry over.
#[tokio::test]
async fn a_spent_limit_survives_updates_and_rotation() {
    let gw = start_gateway("echo", "").await;
    let (id, secret) = gw.create_key(spec("steady", "operator", Some("2/1m")));
    assert_limit(&gw, &secret, 2).await;

    let rename = KeySpec {
        name: Some("steady, renamed".into()),
        ..Default::default()
    };
    gw.manager
        .update(&gw.config, &id, &rename, &Actor::local())
        .unwrap();
    let a = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, 429, "renaming must not refill the limit: {a:?}");

    let rotated = gw
        .manager
        .rotate(&gw.config, &id, Some("1h"), &Actor::local())
        .unwrap();
    let new_secret = rotated["secret"].as_str().expect("new secret").to_string();
    for s in [&new_secret, &secret] {
        let a = get(gw.addr(), "/x", &[("x-api-key", s)]).await;
        assert_eq!(a.status, 429, "rotation must not refill the limit: {a:?}");
    }
}

#[tokio::test]
async fn a_new_config_default_applies_to_new_requests() {
    let gw = start_gateway("echo", "\n[rate_limit]\ndefault = \"50/1m\"\n").await;
    let (_, secret) = gw.create_key(spec("cfg", "operator", None));
    let (_, own) = gw.create_key(spec("own", "operator", Some("4/1m")));
    let a = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(num(&a, "ratelimit-limit"), 50, "{a:?}");

    let mut changed = gw.config.clone();
    changed.rate_limit.default = Limit::parse("3/1m").unwrap();
    gw.running.gateway.apply_config(changed);
    assert_limit(&gw, &secret, 3).await;
    // A key's own limit is unaffected by the default.
    let a = get(gw.addr(), "/x", &[("x-api-key", &own)]).await;
    assert_eq!(num(&a, "ratelimit-limit"), 4, "{a:?}");

    // Back to no default: the key is no longer limited, even though it was just refused.
    let mut off = gw.config.clone();
    off.rate_limit.default = None;
    gw.running.gateway.apply_config(off);
    let a = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(no_rate_headers(&a), "{:?}", a.headers);
}

// ---------------------------------------------------------------------------------------
// 4. Delete frees limiter state
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn deleting_a_key_frees_its_limiter() {
    let gw = start_gateway("echo", "").await;
    let admin = gw
        .running
        .bootstrap_secret
        .clone()
        .expect("bootstrap admin key");
    // A key's limiter lives in its per-key state, made on its first request.
    let limits = gw.running.gateway.usage.key_states();
    assert_eq!(limits.len(), 0, "no request yet, no limiter");
    let (a_id, a_secret) = gw.operator_key();
    let (_, b_secret) = gw.operator_key();
    for secret in [&a_secret, &b_secret] {
        let r = get(gw.addr(), "/x", &[("x-api-key", secret)]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(limits.len(), 2, "one limiter per key used");

    let d = send(
        gw.running.admin_addr,
        Method::DELETE,
        &format!("/v1/keys/{a_id}"),
        &[("x-api-key", &admin)],
        "",
    )
    .await;
    assert_eq!(d.status, 204, "{d:?}");
    assert_eq!(limits.len(), 1, "the deleted key's limiter is gone");
    let r = get(gw.addr(), "/x", &[("x-api-key", &a_secret)]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        limits.len(),
        1,
        "a refused deleted key gets no limiter back"
    );
    let r = get(gw.addr(), "/x", &[("x-api-key", &b_secret)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(limits.len(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Failed-authentication lockout per client IP
// ---------------------------------------------------------------------------------------

fn assert_too_many_failures(a: &Answer) {
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.code(), "too_many_failures", "{a:?}");
    let retry = a.json()["error"]["retry_after_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("retry_after_seconds: {a:?}"));
    // 3/1m: one failure is forgiven every 20 s.
    assert!((1..=20).contains(&retry), "retry_after_seconds {retry}");
    assert_eq!(num(a, "retry-after"), retry);
}

#[tokio::test]
async fn an_ip_with_too_many_bad_keys_is_locked_out_but_valid_keys_pass() {
    let gw = start_gateway("echo", "\n[rate_limit]\nfailed_auth_per_ip = \"3/1m\"\n").await;
    let (_, secret) = gw.operator_key();
    let (dead_id, dead) = gw.operator_key();
    gw.manager.delete(&dead_id, &Actor::local()).unwrap();

    // Three failures of different kinds: malformed, well-formed but deleted, missing.
    let a = bad_key(&gw, None).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (401, "invalid_key"),
        "{a:?}"
    );
    let a = get(gw.addr(), "/x", &[("x-api-key", &dead)]).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (401, "invalid_key"),
        "{a:?}"
    );
    let a = get(gw.addr(), "/x", &[]).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (401, "missing_key"),
        "{a:?}"
    );

    // The fourth bad or missing key is refused before any lookup.
    assert_too_many_failures(&bad_key(&gw, None).await);
    assert_too_many_failures(&get(gw.addr(), "/x", &[]).await);
    assert_too_many_failures(&get(gw.addr(), "/x", &[("x-api-key", &dead)]).await);

    // A valid key from the same address still works.
    let ok = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test]
async fn the_lockout_follows_the_client_ip_behind_a_trusted_proxy() {
    let gw = start_gateway_with(|dir| {
        config_text(
            dir,
            "trusted_proxies = [\"127.0.0.1/32\"]",
            "[rate_limit]\nfailed_auth_per_ip = \"3/1m\"\n\n[[deployments]]\nname = \"app\"\nupstream = \"echo\"\n",
        )
    })
    .await;
    let (_, secret) = gw.operator_key();
    for i in 0..3 {
        let a = bad_key(&gw, Some("203.0.113.7")).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (401, "invalid_key"),
            "failure {i}: {a:?}"
        );
    }
    assert_too_many_failures(&bad_key(&gw, Some("203.0.113.7")).await);
    // The same client through a second proxy hop still is that client.
    assert_too_many_failures(&bad_key(&gw, Some("203.0.113.7, 127.0.0.1")).await);

    // Another client behind the same proxy is not locked out...
    let other = bad_key(&gw, Some("203.0.113.8")).await;
    assert_eq!(
        (other.status.as_u16(), other.code().as_str()),
        (401, "invalid_key"),
        "{other:?}"
    );
    // ...nor is the proxy itself.
    let proxy = bad_key(&gw, None).await;
    assert_eq!(
        (proxy.status.as_u16(), proxy.code().as_str()),
        (401, "invalid_key"),
        "{proxy:?}"
    );
    // And the locked-out client with a valid key gets through.
    let ok = get(
        gw.addr(),
        "/x",
        &[("x-api-key", &secret), ("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored_for_the_lockout() {
    let gw = start_gateway("echo", "\n[rate_limit]\nfailed_auth_per_ip = \"3/1m\"\n").await;
    for (i, xff) in ["203.0.113.7", "203.0.113.8", "198.51.100.1"]
        .into_iter()
        .enumerate()
    {
        let a = bad_key(&gw, Some(xff)).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (401, "invalid_key"),
            "failure {i}: {a:?}"
        );
    }
    // All three counted against 127.0.0.1, whatever the header claimed.
    assert_too_many_failures(&bad_key(&gw, Some("203.0.113.9")).await);
    assert_too_many_failures(&bad_key(&gw, None).await);
}
