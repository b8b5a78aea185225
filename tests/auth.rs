//! Data-plane authentication and authorisation, end to end over loopback sockets: every
//! error code of SPEC §2 with its status, JSON body and headers, key lifecycle effects
//! (revoke, delete, rotate with and without grace, expiry), roles and scopes, and the
//! forward-auth endpoint in its nginx, Traefik and Envoy dialects.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DurationRound, Utc};
use common::*;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keygate::audit::Actor;
use keygate::keys::{generate_secret, rfc3339, KeyRecord};
use keygate::manage::{KeySpec, VerifyRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// An upstream that answers 200 "upstream" to everything and counts the requests it got.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"upstream",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Rate limits off, so that the many failures below never turn into 429s.
const NO_LIMITS: &str = "[rate_limit]\ndefault = \"none\"\nfailed_auth_per_ip = \"none\"\n";

/// Two deployments on one counting upstream, no catch-all:
/// - `app` on `/app`, with [`CREATE_SCENARIOS_ROUTE`] (`POST /scenarios` requires
///   `create_scenarios`);
/// - `other` on `/other`.
async fn gateway_with(auth_section: &str) -> (TestGateway, Arc<AtomicUsize>) {
    let (up, hits) = counting_upstream().await;
    let rest = format!(
        r#"{NO_LIMITS}
{auth_section}

[[deployments]]
name = "app"
upstream = "http://{up}"
path_prefix = "/app"
{CREATE_SCENARIOS_ROUTE}
[[deployments]]
name = "other"
upstream = "http://{up}"
path_prefix = "/other"
"#
    );
    let gw = start_gateway_with(|dir| config_text(dir, "", &rest)).await;
    (gw, hits)
}

async fn gateway() -> (TestGateway, Arc<AtomicUsize>) {
    gateway_with("").await
}

fn spec(name: &str, role: &str, scopes: &[&str], deployments: &[&str]) -> KeySpec {
    KeySpec {
        name: Some(name.into()),
        role: Some(role.into()),
        scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
        deployments: Some(deployments.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// GET `path` with `secret` in `X-API-Key`.
async fn get_keyed(gw: &TestGateway, path: &str, secret: &str) -> Answer {
    get(gw.addr(), path, &[("x-api-key", secret)]).await
}

/// A request with `secret` in `X-API-Key`.
async fn send_keyed(
    gw: &TestGateway,
    method: Method,
    path: &str,
    secret: &str,
    body: impl Into<Bytes>,
) -> Answer {
    send(gw.addr(), method, path, &[("x-api-key", secret)], body).await
}

/// Asserts a JSON error answer (SPEC §2) and returns its `error` object.
#[track_caller]
fn assert_error(a: &Answer, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(
        a.status.as_u16(),
        status,
        "expected {status} {code}, got {:?} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let ct = a
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "content-type {ct:?} for {code}"
    );
    let v = a.json();
    let err = v
        .get("error")
        .unwrap_or_else(|| panic!("no error object in {v}"))
        .clone();
    assert_eq!(err["code"], code, "{v}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message missing: {v}"
    );
    err
}

/// Asserts the request reached the upstream (200 with the upstream's body).
#[track_caller]
fn assert_forwarded(a: &Answer) {
    assert_eq!(
        a.status.as_u16(),
        200,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(&a.body[..], b"upstream");
}

/// Replaces a key's stored record the way a second process or an old store would leave it,
/// and applies it to the live index (no waiting for real time to pass).
fn rewrite_record(gw: &TestGateway, id: &str, change: impl FnOnce(&mut KeyRecord)) -> KeyRecord {
    let prev = gw.running.store.get_key(id).unwrap().expect("key exists");
    let mut rec = prev.clone();
    change(&mut rec);
    gw.running.store.put_key(&rec, Some(&prev), None).unwrap();
    gw.running.gateway.keys.apply(Some(&prev), Some(&rec));
    rec
}

/// Changes one base62 character of the random part, keeping the shape (so only the checksum
/// can reject it).
fn flip_char(secret: &str, from_end: usize) -> String {
    let mut bytes = secret.as_bytes().to_vec();
    let i = bytes.len() - from_end;
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    String::from_utf8(bytes).unwrap()
}

// ---------------------------------------------------------------------------------------
// Credentials: missing, ambiguous, header forms
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_key_is_401_with_www_authenticate() {
    let (gw, hits) = gateway().await;
    for headers in [
        vec![],
        vec![("authorization", "Basic Zm9vOmJhcg==")],
        vec![("x-api-key", "")],
        vec![("authorization", "Bearer")],
    ] {
        let a = get(gw.addr(), "/app/x", &headers).await;
        assert_error(&a, 401, "missing_key");
        let www = a
            .headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok());
        assert_eq!(www, Some("Bearer realm=\"keygate\""), "{headers:?}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing may reach the upstream"
    );
}

#[tokio::test]
async fn two_different_keys_are_ambiguous_but_the_same_key_twice_is_fine() {
    let (gw, hits) = gateway().await;
    let (_, a_secret) = gw.operator_key();
    let (_, b_secret) = gw.operator_key();
    let bearer_b = format!("Bearer {b_secret}");
    let a = get(
        gw.addr(),
        "/app/x",
        &[("x-api-key", &a_secret), ("authorization", &bearer_b)],
    )
    .await;
    let err = assert_error(&a, 400, "ambiguous_credentials");
    assert!(
        !err.to_string().contains(&a_secret) && !err.to_string().contains(&b_secret),
        "secret echoed: {err}"
    );

    // One good key and one garbage value are still two different credentials.
    let a = get(
        gw.addr(),
        "/app/x",
        &[
            ("x-api-key", "garbage"),
            ("authorization", &format!("Bearer {a_secret}")),
        ],
    )
    .await;
    assert_error(&a, 400, "ambiguous_credentials");
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let bearer_a = format!("Bearer {a_secret}");
    let a = get(
        gw.addr(),
        "/app/x",
        &[("x-api-key", &a_secret), ("authorization", &bearer_a)],
    )
    .await;
    assert_forwarded(&a);
}

#[tokio::test]
async fn ambiguity_includes_the_query_parameter_when_enabled() {
    let (gw, _) = gateway_with("[auth]\nquery_param = \"api_key\"\n").await;
    let (_, a_secret) = gw.operator_key();
    let (_, b_secret) = gw.operator_key();
    let a = get(
        gw.addr(),
        &format!("/app/x?api_key={b_secret}"),
        &[("x-api-key", &a_secret)],
    )
    .await;
    assert_error(&a, 400, "ambiguous_credentials");
    let a = get(
        gw.addr(),
        &format!("/app/x?api_key={a_secret}"),
        &[("x-api-key", &a_secret)],
    )
    .await;
    assert_forwarded(&a);
    let a = get(gw.addr(), &format!("/app/x?x=1&api_key={a_secret}"), &[]).await;
    assert_forwarded(&a);
}

#[tokio::test]
async fn query_parameter_is_off_by_default() {
    let (gw, _) = gateway().await;
    let (_, secret) = gw.operator_key();
    for name in ["api_key", "key", "apikey", "access_token"] {
        let a = get(gw.addr(), &format!("/app/x?{name}={secret}"), &[]).await;
        assert_error(&a, 401, "missing_key");
    }
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let (gw, hits) = gateway().await;
    let (_, secret) = gw.operator_key();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let value = format!("{scheme} {secret}");
        let a = get(gw.addr(), "/app/x", &[("authorization", &value)]).await;
        assert_forwarded(&a);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    // Another scheme carrying the same text is not our credential.
    let a = get(
        gw.addr(),
        "/app/x",
        &[("authorization", &format!("Token {secret}"))],
    )
    .await;
    assert_error(&a, 401, "missing_key");
}

// ---------------------------------------------------------------------------------------
// invalid_key in all its forms
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_and_unknown_keys_are_invalid() {
    let (gw, hits) = gateway().await;
    let (_, secret) = gw.operator_key();
    let unknown = generate_secret("kg", "prod").unwrap();
    let cases = [
        "hello".to_string(),
        "kg_prod_".to_string(),
        format!("{secret}x"),
        secret[..secret.len() - 1].to_string(),
        secret.replace("kg_prod_", "kg_prod__"),
        // Right shape, one mistyped character (its checksum is wrong, and no digest matches).
        flip_char(&secret, 10),
        // A mistyped checksum character.
        flip_char(&secret, 1),
        // A well-formed key with a valid checksum that was never issued.
        unknown,
    ];
    for bad in &cases {
        let a = get_keyed(&gw, "/app/x", bad).await;
        let err = assert_error(&a, 401, "invalid_key");
        assert!(
            !a.json().to_string().contains(bad.as_str()),
            "the presented key is echoed: {err}"
        );
        let bearer = format!("Bearer {bad}");
        let a = get(gw.addr(), "/app/x", &[("authorization", &bearer)]).await;
        assert_error(&a, 401, "invalid_key");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_forwarded(&get_keyed(&gw, "/app/x", &secret).await);
}

#[tokio::test]
async fn non_text_header_value_is_invalid_not_a_crash() {
    let (gw, _) = gateway().await;
    let mut conn = TcpStream::connect(gw.addr()).await.unwrap();
    conn.write_all(b"GET /app/x HTTP/1.1\r\nHost: t\r\nX-API-Key: kg_prod_\xff\xfe\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("invalid_key"), "{text}");
}

#[tokio::test]
async fn non_ascii_query_key_is_rejected_cleanly() {
    // A secret with a multi-byte character placed so that the body split would fall inside it.
    let (gw, _) = gateway_with("[auth]\nquery_param = \"api_key\"\n").await;
    let tail = "A".repeat(38);
    let mut conn = TcpStream::connect(gw.addr()).await.unwrap();
    let req = format!(
        "GET /app/x?api_key=kg_a\u{e9}{tail} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    // Either the HTTP layer refuses the request line (400) or the key is invalid (401); the
    // connection must not just be dropped by a panicking handler.
    assert!(
        text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 401"),
        "{text:?}"
    );
}

#[tokio::test]
async fn verify_of_a_non_ascii_secret_answers_invalid_key() {
    let (gw, _) = gateway().await;
    for key in [
        format!("kg_a\u{e9}{}", "A".repeat(38)),
        format!("kg_prod_{}\u{e9}", "A".repeat(37)),
        "\u{e9}".repeat(30),
    ] {
        let req = VerifyRequest {
            key,
            deployment: None,
            method: None,
            path: None,
            scope: None,
        };
        let v = gw.manager.verify(&gw.config, &req).unwrap();
        assert_eq!(v["valid"], false, "{v}");
        assert_eq!(v["code"], "invalid_key", "{v}");
    }
}

#[tokio::test]
async fn wrong_prefix_or_environment_is_invalid_even_if_the_digest_is_known() {
    // Only the `acme` prefix and the `prod` environment are configured.
    let (gw, _) = gateway_with("[auth]\nprefix = \"acme\"\nenvironments = [\"prod\"]\n").await;
    let (id, secret) = gw.operator_key();
    assert!(secret.starts_with("acme_prod_"), "{secret}");
    assert_forwarded(&get_keyed(&gw, "/app/x", &secret).await);

    // Give the key a digest that answers to a well-formed key with another prefix, then one
    // with an unconfigured environment: the format check must refuse both before the lookup.
    let hasher = keygate::keys::SecretHasher::from_env();
    for foreign in [
        generate_secret("kg", "prod").unwrap(),
        generate_secret("acme", "dev").unwrap(),
    ] {
        rewrite_record(&gw, &id, |r| {
            r.digest = keygate::keys::hex(&hasher.digest(&foreign))
        });
        assert!(
            gw.running
                .gateway
                .keys
                .lookup(&hasher.digest(&foreign))
                .is_some(),
            "the digest is indexed"
        );
        let a = get_keyed(&gw, "/app/x", &foreign).await;
        assert_error(&a, 401, "invalid_key");
    }
    // The original secret no longer answers after its digest was replaced.
    assert_error(&get_keyed(&gw, "/app/x", &secret).await, 401, "invalid_key");
}

#[tokio::test]
async fn revoked_key_is_invalid_at_once() {
    let (gw, hits) = gateway().await;
    let (id, secret) = gw.operator_key();
    assert_forwarded(&get_keyed(&gw, "/app/x", &secret).await);
    gw.manager.revoke(&id, &Actor::local()).unwrap();
    assert_error(&get_keyed(&gw, "/app/x", &secret).await, 401, "invalid_key");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // A rotation cannot bring it back.
    assert!(gw
        .manager
        .rotate(&gw.config, &id, None, &Actor::local())
        .is_err());
    assert_error(&get_keyed(&gw, "/app/x", &secret).await, 401, "invalid_key");
}

#[tokio::test]
async fn deleted_key_is_invalid_at_once() {
    let (gw, _) = gateway().await;
    let (id, secret) = gw.operator_key();
    let (_, other) = gw.operator_key();
    assert_forwarded(&get_keyed(&gw, "/app/x", &secret).await);
    gw.manager.delete(&id, &Actor::local()).unwrap();
    assert_error(&get_keyed(&gw, "/app/x", &secret).await, 401, "invalid_key");
    // Other keys are untouched.
    assert_forwarded(&get_keyed(&gw, "/app/x", &other).await);
}

#[tokio::test]
async fn rotation_without_grace_swaps_secrets_at_once() {
    let (gw, _) = gateway().await;
    let (id, old) = gw.operator_key();
    let v = gw
        .manager
        .rotate(&gw.config, &id, None, &Actor::local())
        .unwrap();
    let new = v["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(v["key"]["id"], id.as_str());
    assert_error(&get_keyed(&gw, "/app/x", &old).await, 401, "invalid_key");
    assert_forwarded(&get_keyed(&gw, "/app/x", &new).await);
}

#[tokio::test]
async fn rotation_with_grace_keeps_both_secrets_until_the_grace_ends() {
    let (gw, _) = gateway().await;
    let (id, old) = gw.operator_key();
    let v = gw
        .manager
        .rotate(&gw.config, &id, Some("1h"), &Actor::local())
        .unwrap();
    let new = v["secret"].as_str().unwrap().to_string();
    for s in [&old, &new] {
        let a = get_keyed(&gw, "/app/x", s).await;
        assert_forwarded(&a);
    }
    let rec = gw.running.store.get_key(&id).unwrap().unwrap();
    assert_eq!(rec.grace.len(), 1);
    let left = rec.grace[0].valid_until - Utc::now();
    assert!(
        left > chrono::Duration::minutes(59) && left <= chrono::Duration::hours(1),
        "{left:?}"
    );

    // The grace period is over (as if an hour had passed).
    rewrite_record(&gw, &id, |r| {
        r.grace[0].valid_until = Utc::now() - chrono::Duration::seconds(1)
    });
    assert_error(&get_keyed(&gw, "/app/x", &old).await, 401, "invalid_key");
    assert_forwarded(&get_keyed(&gw, "/app/x", &new).await);
}

#[tokio::test]
async fn revoking_or_deleting_during_grace_stops_both_secrets() {
    let (gw, _) = gateway().await;
    for revoke in [true, false] {
        let (id, old) = gw.operator_key();
        let v = gw
            .manager
            .rotate(&gw.config, &id, Some("1h"), &Actor::local())
            .unwrap();
        let new = v["secret"].as_str().unwrap().to_string();
        assert_forwarded(&get_keyed(&gw, "/app/x", &old).await);
        if revoke {
            gw.manager.revoke(&id, &Actor::local()).unwrap();
        } else {
            gw.manager.delete(&id, &Actor::local()).unwrap();
        }
        for s in [&old, &new] {
            assert_error(&get_keyed(&gw, "/app/x", s).await, 401, "invalid_key");
        }
    }
}

#[tokio::test]
async fn expired_key_is_401_key_expired_with_the_time() {
    let (gw, hits) = gateway().await;
    let (id, secret) = gw.create_key(KeySpec {
        expires: Some("1h".into()),
        ..spec("exp", "operator", &[], &["*"])
    });
    assert_forwarded(&get_keyed(&gw, "/app/x", &secret).await);
    let at = (Utc::now() - chrono::Duration::minutes(5))
        .duration_trunc(chrono::Duration::seconds(1))
        .unwrap();
    rewrite_record(&gw, &id, |r| r.expires_at = Some(at));
    let a = get_keyed(&gw, "/app/x", &secret).await;
    let err = assert_error(&a, 401, "key_expired");
    assert_eq!(err["expired_at"], rfc3339(&at), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The manager agrees on the status.
    assert_eq!(gw.manager.show(&id).unwrap()["key"]["status"], "expired");
}

// ---------------------------------------------------------------------------------------
// Deployments, roles and scopes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn key_for_another_deployment_is_403_deployment_forbidden() {
    let (gw, hits) = gateway().await;
    let (_, secret) = gw.create_key(spec("only-other", "operator", &["*"], &["other"]));
    let a = get_keyed(&gw, "/app/x", &secret).await;
    let err = assert_error(&a, 403, "deployment_forbidden");
    assert_eq!(err["deployment"], "app", "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_forwarded(&get_keyed(&gw, "/other/x", &secret).await);

    // An admin key reaches every deployment whatever its list says.
    let (_, admin) = gw.create_key(spec("admin", "admin", &[], &["other"]));
    assert_forwarded(&get_keyed(&gw, "/app/x", &admin).await);
}

#[tokio::test]
async fn viewer_may_only_read() {
    let (gw, hits) = gateway().await;
    let (_, secret) = gw.create_key(spec("viewer", "viewer", &["read_scenarios"], &["*"]));
    for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
        let a = send_keyed(&gw, m.clone(), "/app/x", &secret, Bytes::new()).await;
        assert_eq!(a.status.as_u16(), 200, "{m}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let a = send_keyed(&gw, m.clone(), "/app/x", &secret, "{}").await;
        let err = assert_error(&a, 403, "insufficient_scope");
        assert!(
            err["required"]
                .as_str()
                .is_some_and(|r| r.contains(m.as_str())),
            "{m}: {err}"
        );
        assert_eq!(
            err["granted"],
            serde_json::json!(["read_scenarios"]),
            "{err}"
        );
    }
    // Even a wildcard scope does not lift the role's restriction.
    let (_, star_viewer) = gw.create_key(spec("viewer*", "viewer", &["*"], &["*"]));
    let a = send_keyed(&gw, Method::POST, "/app/scenarios", &star_viewer, "{}").await;
    assert_error(&a, 403, "insufficient_scope");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn route_scope_is_enforced() {
    let (gw, hits) = gateway().await;
    let (_, reader) = gw.create_key(spec("reader", "operator", &["read_scenarios"], &["app"]));
    for path in ["/app/scenarios", "/app/scenarios/42", "/app/scenarios/"] {
        let a = send_keyed(&gw, Method::POST, path, &reader, "{}").await;
        let err = assert_error(&a, 403, "insufficient_scope");
        assert_eq!(err["required"], "create_scenarios", "{path}: {err}");
        assert_eq!(
            err["granted"],
            serde_json::json!(["read_scenarios"]),
            "{err}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // The rule is for POST on whole segments only.
    assert_forwarded(&get_keyed(&gw, "/app/scenarios", &reader).await);
    assert_forwarded(&send_keyed(&gw, Method::POST, "/app/scenariosX", &reader, "{}").await);

    let (_, creator) = gw.create_key(spec("creator", "operator", &["create_scenarios"], &["app"]));
    let (_, star) = gw.create_key(spec("star", "operator", &["*"], &["app"]));
    let (_, admin) = gw.create_key(spec("admin", "admin", &[], &["*"]));
    for s in [&creator, &star, &admin] {
        assert_forwarded(&send_keyed(&gw, Method::POST, "/app/scenarios", s, "{}").await);
    }
}

#[tokio::test]
async fn no_matching_deployment_is_404_no_route() {
    let (gw, hits) = gateway().await;
    let (_, secret) = gw.operator_key();
    for path in ["/", "/nowhere", "/apple", "/application/x"] {
        let a = get_keyed(&gw, path, &secret).await;
        assert_error(&a, 404, "no_route");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// Forward-auth endpoint
// ---------------------------------------------------------------------------------------

/// `my-app` on `/my-app` with the create/read scope rules on `/scenarios` and `host-app` for
/// `api.example.com`, both on a counting upstream that forward-auth must never call.
async fn forward_auth_gateway() -> (TestGateway, Arc<AtomicUsize>) {
    let (up, hits) = counting_upstream().await;
    let rest = format!(
        r#"{NO_LIMITS}
[[deployments]]
name = "my-app"
upstream = "http://{up}"
path_prefix = "/my-app"
{CREATE_SCENARIOS_ROUTE}{READ_SCENARIOS_ROUTE}
[[deployments]]
name = "host-app"
upstream = "http://{up}"
hosts = ["api.example.com"]
"#
    );
    let gw = start_gateway_with(|dir| config_text(dir, "", &rest)).await;
    (gw, hits)
}

struct FaKeys {
    writer_id: String,
    writer: String,
    reader: String,
    host_only: String,
}

fn forward_auth_keys(gw: &TestGateway) -> FaKeys {
    let (writer_id, writer) = gw.create_key(KeySpec {
        owner: Some("alice".into()),
        ..spec(
            "CI writer",
            "operator",
            &["create_scenarios", "read_scenarios"],
            &["my-app"],
        )
    });
    let (_, reader) = gw.create_key(spec("reader", "viewer", &["read_scenarios"], &["my-app"]));
    let (_, host_only) = gw.create_key(spec("host", "operator", &[], &["host-app"]));
    FaKeys {
        writer_id,
        writer,
        reader,
        host_only,
    }
}

#[track_caller]
fn assert_allowed(a: &Answer, id: &str, deployment: &str) {
    assert_eq!(
        a.status.as_u16(),
        200,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    let h = |n: &str| {
        a.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("x-keygate-key-id").as_deref(), Some(id));
    assert_eq!(h("x-keygate-deployment").as_deref(), Some(deployment));
    assert!(
        h("x-keygate-role").is_some()
            && h("x-keygate-key-name").is_some()
            && h("x-keygate-scopes").is_some()
    );
    assert_ne!(&a.body[..], b"upstream", "forward-auth must not forward");
}

#[tokio::test]
async fn forward_auth_nginx_style() {
    let (gw, hits) = forward_auth_gateway().await;
    let k = forward_auth_keys(&gw);
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[
            ("x-original-uri", "/my-app/scenarios?page=2"),
            ("x-original-method", "POST"),
            ("x-api-key", &k.writer),
        ],
    )
    .await;
    assert_allowed(&a, &k.writer_id, "my-app");
    let h = |n: &str| {
        a.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(h("x-keygate-key-name"), "CI writer");
    assert_eq!(h("x-keygate-owner"), "alice");
    assert_eq!(h("x-keygate-role"), "operator");
    assert_eq!(h("x-keygate-scopes"), "create_scenarios,read_scenarios");

    // Denials: no key, and a read-only key for the original POST (the auth request itself is a GET).
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[
            ("x-original-uri", "/my-app/scenarios"),
            ("x-original-method", "POST"),
        ],
    )
    .await;
    assert_error(&a, 401, "missing_key");
    assert_eq!(
        a.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer realm=\"keygate\"")
    );
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[
            ("x-original-uri", "/my-app/scenarios"),
            ("x-original-method", "POST"),
            ("x-api-key", &k.reader),
        ],
    )
    .await;
    assert_error(&a, 403, "insufficient_scope");
    // The read-only key may read.
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[
            ("x-original-uri", "/my-app/scenarios"),
            ("x-original-method", "GET"),
            ("x-api-key", &k.reader),
        ],
    )
    .await;
    assert_eq!(a.status.as_u16(), 200);
    // An unknown original path is no_route.
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[("x-original-uri", "/elsewhere"), ("x-api-key", &k.writer)],
    )
    .await;
    assert_error(&a, 404, "no_route");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "forward-auth forwarded a request"
    );

    // The same key through the proxy does reach the upstream (the counter works).
    assert_forwarded(&send_keyed(&gw, Method::POST, "/my-app/scenarios", &k.writer, "{}").await);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn forward_auth_traefik_style() {
    let (gw, hits) = forward_auth_gateway().await;
    let k = forward_auth_keys(&gw);
    let host_id = gw.manager.list(&Default::default()).unwrap()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "host")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let traefik =
        |method: &'static str, host: &'static str, uri: &'static str, secret: Option<&str>| {
            let mut h = vec![
                ("x-forwarded-method", method.to_string()),
                ("x-forwarded-proto", "https".to_string()),
                ("x-forwarded-host", host.to_string()),
                ("x-forwarded-uri", uri.to_string()),
            ];
            if let Some(s) = secret {
                h.push(("authorization", format!("Bearer {s}")));
            }
            h
        };
    let call = |h: Vec<(&'static str, String)>| {
        let addr = gw.addr();
        async move {
            let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            get(addr, "/.keygate/auth", &refs).await
        }
    };

    // Host-based routing from X-Forwarded-Host.
    let a = call(traefik(
        "DELETE",
        "api.example.com:443",
        "/v1/things/7?x=1",
        Some(k.host_only.as_str()),
    ))
    .await;
    assert_allowed(&a, &host_id, "host-app");
    let a = call(traefik(
        "GET",
        "api.example.com",
        "/my-app/scenarios",
        Some(k.writer.as_str()),
    ))
    .await;
    let err = assert_error(&a, 403, "deployment_forbidden");
    assert_eq!(err["deployment"], "host-app");

    // Path-based routing and scopes.
    let a = call(traefik(
        "POST",
        "gw.example.com",
        "/my-app/scenarios",
        Some(k.writer.as_str()),
    ))
    .await;
    assert_allowed(&a, &k.writer_id, "my-app");
    let a = call(traefik(
        "POST",
        "gw.example.com",
        "/my-app/scenarios",
        Some(k.reader.as_str()),
    ))
    .await;
    let err = assert_error(&a, 403, "insufficient_scope");
    assert!(
        err["required"].as_str().is_some_and(|r| !r.is_empty()),
        "{err}"
    );
    let a = call(traefik("POST", "gw.example.com", "/my-app/scenarios", None)).await;
    assert_error(&a, 401, "missing_key");
    let a = call(traefik(
        "POST",
        "gw.example.com",
        "/my-app/scenarios",
        Some(flip_char(&k.writer, 5).as_str()),
    ))
    .await;
    assert_error(&a, 401, "invalid_key");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "forward-auth forwarded a request"
    );
}

#[tokio::test]
async fn forward_auth_envoy_style() {
    let (gw, hits) = forward_auth_gateway().await;
    let k = forward_auth_keys(&gw);
    // Envoy ext_authz (HTTP): original method, original path appended, original Host.
    let envoy = |method: Method, path: &'static str, host: &'static str, secret: Option<String>| {
        let addr = gw.addr();
        async move {
            let mut h = vec![("host", host)];
            if let Some(s) = secret.as_deref() {
                h.push(("x-api-key", s));
            }
            send(addr, method, path, &h, Bytes::new()).await
        }
    };
    let a = envoy(
        Method::POST,
        "/.keygate/auth/my-app/scenarios",
        "gw.internal",
        Some(k.writer.clone()),
    )
    .await;
    assert_allowed(&a, &k.writer_id, "my-app");
    let a = envoy(
        Method::GET,
        "/.keygate/auth/my-app/scenarios/3?full=1",
        "gw.internal",
        Some(k.reader.clone()),
    )
    .await;
    assert_eq!(a.status.as_u16(), 200);
    assert_eq!(a.headers.get("x-keygate-role").unwrap(), "viewer");

    let a = envoy(
        Method::POST,
        "/.keygate/auth/my-app/scenarios",
        "gw.internal",
        Some(k.reader.clone()),
    )
    .await;
    let err = assert_error(&a, 403, "insufficient_scope");
    assert!(err["granted"].is_array(), "{err}");
    let a = envoy(
        Method::POST,
        "/.keygate/auth/my-app/scenarios",
        "gw.internal",
        None,
    )
    .await;
    assert_error(&a, 401, "missing_key");
    // The Host routes to host-app, which the writer key does not have.
    let a = envoy(
        Method::GET,
        "/.keygate/auth/v1/x",
        "api.example.com",
        Some(k.writer.clone()),
    )
    .await;
    let err = assert_error(&a, 403, "deployment_forbidden");
    assert_eq!(err["deployment"], "host-app");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "forward-auth forwarded a request"
    );
}

#[tokio::test]
async fn forward_auth_can_be_disabled_or_moved() {
    let (gw, hits) = gateway_with("[auth]\nforward_auth_path = \"/_auth\"\n").await;
    let (id, secret) = gw.operator_key();
    let a = get(
        gw.addr(),
        "/_auth",
        &[("x-original-uri", "/app/x"), ("x-api-key", &secret)],
    )
    .await;
    assert_allowed(&a, &id, "app");
    // The default path is an ordinary (unrouted) path now.
    let a = get(
        gw.addr(),
        "/.keygate/auth",
        &[("x-original-uri", "/app/x"), ("x-api-key", &secret)],
    )
    .await;
    assert_error(&a, 404, "no_route");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}
