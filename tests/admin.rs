//! The admin API (SPEC §3) end to end over loopback sockets: every endpoint with its answers
//! and errors, authentication, the live key index (create/revoke/delete/rotate take effect
//! on the data plane before the admin answer is sent, and survive a restart), a revocation
//! race under a multi-threaded runtime, the audit trail, and that no secret is ever echoed
//! back or written to disk.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use keygate::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Deployment `app` (catch-all, with a scoped route), deployment `other` on `/other`, no
/// rate limits (so that many failures never turn into 429s).
const EXTRA: &str = r#"
  [[deployments.routes]]
  name = "create_scenarios"
  methods = ["POST"]
  path = "/scenarios"
  scope = "create_scenarios"

[rate_limit]
default = "none"
failed_auth_per_ip = "none"

[[deployments]]
name = "other"
upstream = "echo"
path_prefix = "/other"
"#;

/// An admin API client holding an admin secret.
struct Admin {
    addr: SocketAddr,
    key: String,
}

impl Admin {
    fn of(gw: &TestGateway) -> Admin {
        Admin::at(
            gw.running.admin_addr,
            gw.running
                .bootstrap_secret
                .clone()
                .expect("bootstrap admin key on an empty store"),
        )
    }

    fn at(addr: SocketAddr, key: String) -> Admin {
        Admin { addr, key }
    }

    async fn call(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Answer {
        send(
            self.addr,
            method,
            path,
            &[
                ("x-api-key", &self.key),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, Bytes::new()).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, body.to_string()).await
    }

    async fn patch(&self, id: &str, body: Value) -> Answer {
        self.call(Method::PATCH, &format!("/v1/keys/{id}"), body.to_string())
            .await
    }

    /// Creates a key; returns (id, secret, key JSON).
    async fn create(&self, body: Value) -> (String, String, Value) {
        let a = self.post("/v1/keys", body).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        let v = a.json();
        (
            v["key"]["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
            v["key"].clone(),
        )
    }

    async fn rotate(&self, id: &str, body: &str) -> String {
        let a = self
            .call(
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                body.to_string(),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.json()["secret"].as_str().unwrap().to_string()
    }

    async fn revoke(&self, id: &str) -> Answer {
        self.call(Method::POST, &format!("/v1/keys/{id}/revoke"), Bytes::new())
            .await
    }

    async fn delete(&self, id: &str) -> Answer {
        self.call(Method::DELETE, &format!("/v1/keys/{id}"), Bytes::new())
            .await
    }

    /// The newest `limit` audit events.
    async fn audit(&self, limit: usize) -> Vec<Value> {
        let a = self.get(&format!("/v1/audit?limit={limit}")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.json()["events"].as_array().unwrap().clone()
    }

    /// The id of the admin key itself (via /v1/verify).
    async fn own_id(&self) -> String {
        let a = self.post("/v1/verify", json!({"key": self.key})).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.json()["key"]["id"].as_str().unwrap().to_string()
    }

    /// Ids listed by `GET path`.
    async fn list_ids(&self, path: &str) -> BTreeSet<String> {
        let a = self.get(path).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
        a.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Status of a data-plane GET with `secret`.
async fn data_status(addr: SocketAddr, path: &str, secret: &str) -> StatusCode {
    get(addr, path, &[("x-api-key", secret)]).await.status
}

/// Asserts an `invalid_request` answer naming `field`.
#[track_caller]
fn assert_invalid(a: &Answer, field: &str, what: &str) {
    assert_eq!(a.status, 400, "{what}: {:?}", a.body);
    let v = a.json();
    assert_eq!(v["error"]["code"], "invalid_request", "{what}: {v}");
    assert_eq!(v["error"]["field"], field, "{what}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that neither a secret nor its random body appears in `bytes`.
#[track_caller]
fn assert_no_secret(bytes: &[u8], secrets: &[&str], what: &str) {
    for s in secrets {
        assert!(!contains(bytes, s.as_bytes()), "{what} contains a secret");
        // The random part alone (after `{prefix}_{env}_`), in case it were stored re-framed.
        let body = s.rsplit('_').next().unwrap();
        assert!(
            !contains(bytes, body.as_bytes()),
            "{what} contains a secret's body"
        );
    }
}

/// Sends raw bytes on a new connection and reads the answer's status line and headers
/// (stops at the end of the head, or at EOF).
async fn raw_head(addr: SocketAddr, head: &str, then: Option<&[u8]>) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if let Some(rest) = then {
        s.write_all(rest).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An HTTP/1.1 keep-alive connection.
async fn keep_alive(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// One GET on a keep-alive connection; `None` when the connection failed.
async fn ka_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    key: Option<&str>,
) -> Option<(StatusCode, Bytes)> {
    sender.ready().await.ok()?;
    let mut req = Request::get(path).header("host", "keygate.test");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

// ---------------------------------------------------------------------------------------
// POST /v1/keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_answers_201_with_every_field_and_the_secret_once() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let before = Utc::now() - chrono::Duration::seconds(1);
    let a = admin
        .post(
            "/v1/keys",
            json!({"name": "CI pipeline", "description": "runs the tests", "owner": "alice", "role": "viewer",
                   "scopes": ["read_scenarios", "data:read"], "deployments": ["app"], "env": "ci",
                   "expires": "30d", "rate_limit": "1000/1h"}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    let top: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, BTreeSet::from(["key", "secret"]), "{v}");
    let key = &v["key"];
    let fields: BTreeSet<&str> = key
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, BTreeSet::from(KEY_FIELDS), "{key}");

    let secret = v["secret"].as_str().unwrap();
    let body = secret
        .strip_prefix("kg_ci_")
        .unwrap_or_else(|| panic!("secret format: {secret}"));
    assert_eq!(body.len(), 38, "{secret}");
    assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()), "{secret}");

    let id = key["id"].as_str().unwrap();
    assert!(
        id.starts_with("key_")
            && id.len() == 20
            && id[4..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    assert_eq!(key["name"], "CI pipeline");
    assert_eq!(key["description"], "runs the tests");
    assert_eq!(key["owner"], "alice");
    assert_eq!(key["role"], "viewer");
    assert_eq!(key["scopes"], json!(["read_scenarios", "data:read"]));
    assert_eq!(key["deployments"], json!(["app"]));
    assert_eq!(key["env"], "ci");
    assert_eq!(
        key["display"],
        format!("kg_ci_****…{}", &secret[secret.len() - 4..])
    );
    assert_eq!(key["status"], "active");
    assert_eq!(key["revoked_at"], Value::Null);
    assert_eq!(key["rate_limit"], "1000/1h");
    assert_eq!(key["last_used_at"], Value::Null);
    assert_eq!(key["last_used_ip"], Value::Null);
    assert_eq!(key["last_used_user_agent"], Value::Null);
    let created =
        chrono::DateTime::parse_from_rfc3339(key["created_at"].as_str().unwrap()).unwrap();
    assert!(key["created_at"].as_str().unwrap().ends_with('Z'), "{key}");
    assert!(created >= before && created <= Utc::now(), "{key}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(key["expires_at"].as_str().unwrap()).unwrap();
    let in_30d = created + chrono::Duration::days(30);
    assert!(
        (expires - in_30d).num_seconds().abs() <= 2,
        "expires {expires} vs {in_30d}"
    );

    // Defaults: operator, every deployment, prod, never expires, role/default limit.
    let (_, s2, k2) = admin.create(json!({"name": "defaults"})).await;
    assert_eq!(k2["role"], "operator");
    assert_eq!(k2["deployments"], json!(["*"]));
    assert_eq!(k2["env"], "prod");
    assert!(s2.starts_with("kg_prod_"));
    assert_eq!(k2["expires_at"], Value::Null);
    assert_eq!(k2["rate_limit"], Value::Null);
    assert_eq!(k2["scopes"], json!([]));
    assert_eq!(k2["description"], "");
    assert_eq!(k2["owner"], "");

    // The key works on the data plane at once; the secret is never shown again.
    assert_eq!(data_status(gw.addr(), "/hello", secret).await, 200);
    for path in [
        format!("/v1/keys/{id}"),
        "/v1/keys?status=all".to_string(),
        format!("/v1/keys/{id}/usage"),
    ] {
        let a = admin.get(&path).await;
        assert_eq!(a.status, 200, "{path}");
        assert_no_secret(&a.body, &[secret, &s2], &path);
        assert!(
            !String::from_utf8_lossy(&a.body).contains("\"secret\""),
            "{path}"
        );
    }
}

#[tokio::test]
async fn create_rejects_bad_bodies_naming_the_field() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let audit_before = admin.audit(1000).await.len();
    let cases: &[(&str, &str, &str)] = &[
        ("unknown field", r#"{"name":"x","colour":"red"}"#, "colour"),
        (
            "scopes as a string",
            r#"{"name":"x","scopes":"read"}"#,
            "scopes",
        ),
        (
            "deployments as a string",
            r#"{"name":"x","deployments":"app"}"#,
            "deployments",
        ),
        (
            "a scope as a number",
            r#"{"name":"x","scopes":["a",1]}"#,
            "scopes",
        ),
        ("two JSON values", r#"{"name":"x"}{"name":"y"}"#, "body"),
        ("trailing garbage", r#"{"name":"x"} and more"#, "body"),
        ("name as a number", r#"{"name":5}"#, "name"),
        ("bad role", r#"{"name":"x","role":"root"}"#, "role"),
        ("bad env", r#"{"name":"x","env":"moon"}"#, "env"),
        ("bad expires", r#"{"name":"x","expires":"soon"}"#, "expires"),
        (
            "expires in the past",
            r#"{"name":"x","expires":"2001-01-01T00:00:00Z"}"#,
            "expires",
        ),
        (
            "bad rate_limit",
            r#"{"name":"x","rate_limit":"lots"}"#,
            "rate_limit",
        ),
        (
            "rate_limit as a number",
            r#"{"name":"x","rate_limit":5}"#,
            "rate_limit",
        ),
        (
            "unknown deployment",
            r#"{"name":"x","deployments":["ghost"]}"#,
            "deployments",
        ),
        (
            "no deployments",
            r#"{"name":"x","deployments":[]}"#,
            "deployments",
        ),
        ("empty name", r#"{"name":""}"#, "name"),
        ("blank name", r#"{"name":"   "}"#, "name"),
        ("no name", r#"{"owner":"alice"}"#, "name"),
        (
            "control characters in the name",
            r#"{"name":"a\u0007b"}"#,
            "name",
        ),
        ("not JSON", "name=x", "body"),
        ("truncated JSON", r#"{"name":"x""#, "body"),
        ("not an object", r#"["x"]"#, "body"),
        ("empty body", "", "body"),
    ];
    for (what, body, field) in cases {
        let a = admin.call(Method::POST, "/v1/keys", body.to_string()).await;
        assert_invalid(&a, field, what);
    }
    // Nothing was created, nothing audited.
    assert_eq!(
        admin.list_ids("/v1/keys?status=all").await.len(),
        1,
        "only the bootstrap key"
    );
    assert_eq!(admin.audit(1000).await.len(), audit_before);

    // Exactly 64 KiB is accepted; one byte more is 413.
    let frame = r#"{"name":"big","description":""}"#.len();
    let desc = "d".repeat(64 * 1024 - frame);
    let body = json!({"name": "big", "description": desc}).to_string();
    assert_eq!(body.len(), 64 * 1024);
    let a = admin.call(Method::POST, "/v1/keys", body).await;
    // (The description is over its own length limit: rejected by validation, not by size.)
    assert_invalid(&a, "description", "64 KiB body");

    // Over the limit with Content-Length: refused from the head alone.
    let head = format!(
        "POST /v1/keys HTTP/1.1\r\nhost: a\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        admin.key,
        64 * 1024 + 1
    );
    let got = raw_head(admin.addr, &head, None).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    // Chunked, so only counting the bytes can tell: one chunk one byte over the limit.
    let head = format!(
        "POST /v1/keys HTTP/1.1\r\nhost: a\r\nx-api-key: {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        admin.key,
        64 * 1024 + 1
    );
    let chunk = vec![b' '; 64 * 1024 + 1];
    let got = raw_head(admin.addr, &head, Some(&chunk)).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("application/json"),
        "{got}"
    );
    // PATCH and verify have the same limit.
    let big = json!({"name": "x".repeat(70 * 1024)}).to_string();
    let id = admin.own_id().await;
    let a = admin
        .call(Method::PATCH, &format!("/v1/keys/{id}"), big.clone())
        .await;
    assert_eq!(a.status, 413, "{:?}", a.body);
    assert_eq!(a.code(), "payload_too_large");
    assert_eq!(admin.list_ids("/v1/keys?status=all").await.len(), 1);
}

// ---------------------------------------------------------------------------------------
// GET /v1/keys, GET /v1/keys/{id}
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn list_filters_by_status_owner_and_name() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let boot = admin.own_id().await;
    let (a, sa, _) = admin
        .create(json!({"name": "Billing CI", "owner": "alice"}))
        .await;
    let (b, sb, _) = admin
        .create(json!({"name": "deploy bot", "owner": "bob"}))
        .await;
    let (c, sc, _) = admin
        .create(json!({"name": "old billing", "owner": "alice"}))
        .await;
    let (d, _, _) = admin
        .create(json!({"name": "expired thing", "owner": "alice", "expires": "1h"}))
        .await;
    assert_eq!(admin.revoke(&c).await.status, 200);
    // Age `d` past its expiry directly in the store (no waiting for a clock).
    let prev = gw.running.store.get_key(&d).unwrap().unwrap();
    let mut rec = prev.clone();
    rec.expires_at = Some(Utc::now() - chrono::Duration::hours(1));
    gw.running.store.put_key(&rec, Some(&prev), None).unwrap();
    gw.manager
        .index
        .as_ref()
        .unwrap()
        .apply(Some(&prev), Some(&rec));

    let set = |ids: &[&String]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        admin.list_ids("/v1/keys").await,
        set(&[&boot, &a, &b]),
        "default is active"
    );
    assert_eq!(
        admin.list_ids("/v1/keys?status=active").await,
        set(&[&boot, &a, &b])
    );
    assert_eq!(admin.list_ids("/v1/keys?status=revoked").await, set(&[&c]));
    assert_eq!(admin.list_ids("/v1/keys?status=expired").await, set(&[&d]));
    assert_eq!(
        admin.list_ids("/v1/keys?status=all").await,
        set(&[&boot, &a, &b, &c, &d])
    );
    assert_eq!(admin.list_ids("/v1/keys?owner=alice").await, set(&[&a]));
    assert_eq!(
        admin.list_ids("/v1/keys?owner=alice&status=all").await,
        set(&[&a, &c, &d])
    );
    assert_eq!(
        admin.list_ids("/v1/keys?owner=carol&status=all").await,
        set(&[])
    );
    assert_eq!(admin.list_ids("/v1/keys?q=billing").await, set(&[&a]));
    assert_eq!(
        admin.list_ids("/v1/keys?q=BILLING&status=all").await,
        set(&[&a, &c])
    );
    assert_eq!(
        admin.list_ids("/v1/keys?q=bIlLiNg%20ci").await,
        set(&[&a]),
        "percent-decoded"
    );
    assert_eq!(
        admin.list_ids("/v1/keys?q=deploy+bot").await,
        set(&[&b]),
        "plus is a space"
    );
    assert_eq!(
        admin.list_ids("/v1/keys?q=nothing-like-this").await,
        set(&[])
    );
    assert_eq!(
        admin
            .list_ids("/v1/keys?q=billing&owner=bob&status=all")
            .await,
        set(&[])
    );

    let one = admin.get("/v1/keys?status=all").await;
    let v = one.json();
    let keys = v["keys"].as_array().unwrap();
    for k in keys {
        let fields: BTreeSet<&str> = k.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, BTreeSet::from(KEY_FIELDS), "{k}");
    }
    let status_of = |id: &str| keys.iter().find(|k| k["id"] == id).unwrap()["status"].clone();
    assert_eq!(status_of(&c), "revoked");
    assert_eq!(status_of(&d), "expired");
    assert_eq!(status_of(&a), "active");
    assert_no_secret(&one.body, &[&sa, &sb, &sc, &admin.key], "list");
    assert!(
        !String::from_utf8_lossy(&one.body).contains("digest"),
        "list shows digests"
    );

    for bad in ["bogus", "ACTIVE", ""] {
        let a = admin.get(&format!("/v1/keys?status={bad}")).await;
        if bad.is_empty() {
            // `?status=` with no value: treated as absent or refused, never a 500.
            assert!(a.status == 200 || a.status == 400, "{:?}", a.body);
        } else {
            assert_invalid(&a, "status", bad);
        }
    }
}

#[tokio::test]
async fn show_answers_the_key_with_a_usage_summary() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, secret, created) = admin
        .create(json!({"name": "shown", "owner": "alice"}))
        .await;
    assert_eq!(
        get(
            gw.addr(),
            "/x",
            &[("x-api-key", &secret), ("user-agent", "probe/1")]
        )
        .await
        .status,
        200
    );
    let a = admin.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let v = a.json();
    let top: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, BTreeSet::from(["key", "usage"]), "{v}");
    assert_eq!(v["key"]["id"], id.as_str());
    assert_eq!(v["key"]["name"], created["name"]);
    assert_eq!(v["key"]["created_at"], created["created_at"]);
    assert_eq!(v["key"]["last_used_ip"], "127.0.0.1");
    assert_eq!(v["key"]["last_used_user_agent"], "probe/1");
    assert!(v["key"]["last_used_at"].is_string(), "{v}");
    let u = &v["usage"];
    assert_eq!(u["key_id"], id.as_str());
    assert_eq!(u["total"], 1, "{u}");
    assert_eq!(u["by_status"]["2xx"], 1, "{u}");
    assert!(u["days"].as_array().is_some_and(|d| !d.is_empty()), "{u}");
    assert_no_secret(&a.body, &[&secret], "show");
}

#[tokio::test]
async fn unknown_ids_are_404_key_not_found_everywhere() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    for id in ["key_0000000000000000", "nope", "key_%2E%2E"] {
        let cases = [
            (Method::GET, format!("/v1/keys/{id}"), ""),
            (Method::PATCH, format!("/v1/keys/{id}"), r#"{"name":"x"}"#),
            (Method::POST, format!("/v1/keys/{id}/rotate"), ""),
            (Method::POST, format!("/v1/keys/{id}/regenerate"), ""),
            (Method::POST, format!("/v1/keys/{id}/revoke"), ""),
            (Method::DELETE, format!("/v1/keys/{id}"), ""),
            (Method::GET, format!("/v1/keys/{id}/usage"), ""),
            (Method::GET, format!("/v1/keys/{id}/usage?days=3"), ""),
        ];
        for (m, path, body) in cases {
            let a = admin.call(m.clone(), &path, body.to_string()).await;
            assert_eq!(a.status, 404, "{m} {path}: {:?}", a.body);
            assert_eq!(a.code(), "key_not_found", "{m} {path}");
            assert_eq!(a.headers["content-type"], "application/json");
        }
    }
}

// ---------------------------------------------------------------------------------------
// PATCH /v1/keys/{id}
// ---------------------------------------------------------------------------------------

fn changes_of(ev: &Value) -> BTreeSet<String> {
    ev["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn patch_changes_fields_and_takes_effect_at_once() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let me = admin.own_id().await;
    let (id, secret, _) = admin
        .create(json!({"name": "patchy", "owner": "alice", "description": "d", "scopes": ["a"], "deployments": ["app"], "rate_limit": "1/1h"}))
        .await;

    // The key's own limit applies: one request, then 429.
    assert_eq!(data_status(gw.addr(), "/x", &secret).await, 200);
    assert_eq!(data_status(gw.addr(), "/x", &secret).await, 429);

    let a = admin
        .patch(
            &id,
            json!({"name": "patched", "owner": "carol", "description": "d"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let v = a.json();
    let top: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, BTreeSet::from(["key"]), "{v}");
    assert_eq!(v["key"]["name"], "patched");
    assert_eq!(v["key"]["owner"], "carol");
    let ev = &admin.audit(1).await[0];
    assert_eq!(ev["action"], "key.updated");
    assert_eq!(ev["target_key_id"], id.as_str());
    assert_eq!(ev["target_name"], "patched");
    assert_eq!(ev["actor_key_id"], me.as_str());
    assert_eq!(
        changes_of(ev),
        BTreeSet::from(["name".to_string(), "owner".to_string()]),
        "only changed fields: {ev}"
    );

    // The same values again change nothing and add no audit event.
    let count = admin.audit(1000).await.len();
    let a = admin
        .patch(&id, json!({"name": "patched", "owner": "carol"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(admin.audit(1000).await.len(), count);

    // `"rate_limit": null` clears the key's own limit (the default, none, applies) — the
    // data plane lets the very next request through.
    let a = admin.patch(&id, json!({"rate_limit": null})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["key"]["rate_limit"], Value::Null);
    assert_eq!(
        changes_of(&admin.audit(1).await[0]),
        BTreeSet::from(["rate_limit".to_string()])
    );
    let ok = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.headers.get("ratelimit-limit").is_none(),
        "{:?}",
        ok.headers
    );

    // Scopes, deployments, expiry and limit together.
    let a = admin.patch(&id, json!({"scopes": ["create_scenarios"], "deployments": ["other"], "expires": "7d", "rate_limit": "5/1s"})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let k = &a.json()["key"];
    assert_eq!(k["scopes"], json!(["create_scenarios"]));
    assert_eq!(k["deployments"], json!(["other"]));
    assert_eq!(k["rate_limit"], "5/1s");
    let exp = chrono::DateTime::parse_from_rfc3339(k["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        (exp.with_timezone(&Utc) - (Utc::now() + chrono::Duration::days(7)))
            .num_seconds()
            .abs()
            <= 5,
        "{k}"
    );
    assert_eq!(
        changes_of(&admin.audit(1).await[0]),
        ["scopes", "deployments", "expires_at", "rate_limit"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    // Enforced at once: `app` is now forbidden, `other` allowed.
    let denied = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.code(), "deployment_forbidden");
    assert_eq!(data_status(gw.addr(), "/other/x", &secret).await, 200);
    // `expires: never` clears the expiry.
    let a = admin
        .patch(&id, json!({"expires": "never", "deployments": ["*"]}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["key"]["expires_at"], Value::Null);
    // A role change is enforced at once too.
    let a = admin.patch(&id, json!({"role": "viewer"})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let post = send(gw.addr(), Method::POST, "/x", &[("x-api-key", &secret)], "").await;
    assert_eq!(post.status, 403, "{:?}", post.body);
    assert_eq!(post.code(), "insufficient_scope");

    // Errors name the field and change nothing.
    let count = admin.audit(1000).await.len();
    assert_invalid(
        &admin.patch(&id, json!({"env": "dev"})).await,
        "env",
        "env cannot change",
    );
    assert_invalid(
        &admin.patch(&id, json!({"role": "boss"})).await,
        "role",
        "bad role",
    );
    assert_invalid(
        &admin.patch(&id, json!({"deployments": ["ghost"]})).await,
        "deployments",
        "unknown deployment",
    );
    assert_invalid(
        &admin.patch(&id, json!({"deployments": []})).await,
        "deployments",
        "no deployments",
    );
    assert_invalid(
        &admin.patch(&id, json!({"expires": "later"})).await,
        "expires",
        "bad expiry",
    );
    assert_invalid(
        &admin.patch(&id, json!({"rate_limit": "fast"})).await,
        "rate_limit",
        "bad limit",
    );
    assert_invalid(
        &admin.patch(&id, json!({"name": ""})).await,
        "name",
        "empty name",
    );
    assert_invalid(
        &admin.patch(&id, json!({"scopes": "x"})).await,
        "scopes",
        "scopes as a string",
    );
    assert_invalid(
        &admin.patch(&id, json!({"nickname": "x"})).await,
        "nickname",
        "unknown field",
    );
    assert_invalid(
        &admin
            .call(Method::PATCH, &format!("/v1/keys/{id}"), "nope")
            .await,
        "body",
        "not JSON",
    );
    // A failed PATCH that also carried valid fields applied none of them.
    assert_invalid(
        &admin
            .patch(&id, json!({"name": "half", "role": "boss"}))
            .await,
        "role",
        "partial",
    );
    assert_eq!(
        admin.get(&format!("/v1/keys/{id}")).await.json()["key"]["name"],
        "patched"
    );
    assert_eq!(admin.audit(1000).await.len(), count);

    // A revoked key cannot be patched.
    assert_eq!(admin.revoke(&id).await.status, 200);
    let a = admin.patch(&id, json!({"name": "zombie"})).await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.code(), "invalid_request");
    let k = admin.get(&format!("/v1/keys/{id}")).await.json()["key"].clone();
    assert_eq!(k["name"], "patched");
    assert_eq!(k["status"], "revoked");
    assert_eq!(data_status(gw.addr(), "/x", &secret).await, 401);
}

// ---------------------------------------------------------------------------------------
// rotate, revoke, delete
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rotate_issues_a_new_secret_for_the_same_key() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, s1, k1) = admin
        .create(json!({"name": "rot", "owner": "o", "scopes": ["x"], "env": "stg"}))
        .await;
    for body in ["", "{}", "  \n", r#"{"grace":"1h"}"#, r#"{"grace":null}"#] {
        let a = admin
            .call(
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                body.to_string(),
            )
            .await;
        assert_eq!(a.status, 200, "body {body:?}: {:?}", a.body);
        let v = a.json();
        let top: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(top, BTreeSet::from(["key", "secret"]), "{v}");
        let s = v["secret"].as_str().unwrap();
        assert!(s.starts_with("kg_stg_") && s != s1, "{s}");
        let k = &v["key"];
        for same in [
            "id",
            "name",
            "owner",
            "scopes",
            "env",
            "created_at",
            "role",
            "deployments",
        ] {
            assert_eq!(k[same], k1[same], "{same} kept");
        }
        assert_eq!(k["display"], format!("kg_stg_****…{}", &s[s.len() - 4..]));
    }
    // The alias.
    let a = admin
        .call(Method::POST, &format!("/v1/keys/{id}/regenerate"), "")
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(admin.audit(1).await[0]["action"], "key.rotated");
    // Bad bodies.
    assert_invalid(
        &admin
            .call(
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                r#"{"grace":"soon"}"#,
            )
            .await,
        "grace",
        "bad grace",
    );
    assert_invalid(
        &admin
            .call(
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                r#"{"graze":"1h"}"#,
            )
            .await,
        "graze",
        "unknown field",
    );
    assert_invalid(
        &admin
            .call(
                Method::POST,
                &format!("/v1/keys/{id}/rotate"),
                r#"{"grace":60}"#,
            )
            .await,
        "grace",
        "grace as a number",
    );
    assert_invalid(
        &admin
            .call(Method::POST, &format!("/v1/keys/{id}/rotate"), "1h")
            .await,
        "body",
        "not JSON",
    );
    // A revoked key cannot be rotated back to life.
    assert_eq!(admin.revoke(&id).await.status, 200);
    let a = admin
        .call(Method::POST, &format!("/v1/keys/{id}/rotate"), "")
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.code(), "invalid_request");
    assert_eq!(
        admin.get(&format!("/v1/keys/{id}")).await.json()["key"]["status"],
        "revoked"
    );
}

#[tokio::test]
async fn revoke_is_idempotent_and_delete_is_final() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, secret, _) = admin.create(json!({"name": "goner"})).await;
    let first = admin.revoke(&id).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let k1 = first.json()["key"].clone();
    assert_eq!(k1["status"], "revoked");
    assert!(k1["revoked_at"].is_string(), "{k1}");
    let second = admin.revoke(&id).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.json()["key"]["revoked_at"],
        k1["revoked_at"],
        "revocation time kept"
    );
    let revoked_events = admin
        .audit(1000)
        .await
        .iter()
        .filter(|e| e["action"] == "key.revoked" && e["target_key_id"] == id.as_str())
        .count();
    assert_eq!(revoked_events, 1, "revoking twice is recorded once");
    assert_eq!(data_status(gw.addr(), "/x", &secret).await, 401);

    let (id2, secret2, _) = admin.create(json!({"name": "deleted one"})).await;
    assert_eq!(data_status(gw.addr(), "/x", &secret2).await, 200);
    let d = admin.delete(&id2).await;
    assert_eq!(d.status, 204, "{:?}", d.body);
    assert!(d.body.is_empty(), "{:?}", d.body);
    assert_eq!(data_status(gw.addr(), "/x", &secret2).await, 401);
    for path in [format!("/v1/keys/{id2}"), format!("/v1/keys/{id2}/usage")] {
        let a = admin.get(&path).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "key_not_found".to_string()),
            "{path}"
        );
    }
    let again = admin.delete(&id2).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.code(), "key_not_found");
    assert!(!admin.list_ids("/v1/keys?status=all").await.contains(&id2));
    // A revoked key can be deleted as well.
    assert_eq!(admin.delete(&id).await.status, 204);
    assert!(!admin.list_ids("/v1/keys?status=all").await.contains(&id));
}

// ---------------------------------------------------------------------------------------
// GET /v1/keys/{id}/usage
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn usage_report_has_the_documented_shape() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, secret, _) = admin
        .create(json!({"name": "busy", "scopes": ["create_scenarios"], "deployments": ["app"]}))
        .await;
    let today_before = Utc::now().date_naive();
    let h = [
        ("x-api-key", secret.as_str()),
        ("user-agent", "usage-test/2"),
    ];
    assert_eq!(
        send(gw.addr(), Method::POST, "/scenarios", &h, "a")
            .await
            .status,
        200
    );
    assert_eq!(
        send(gw.addr(), Method::POST, "/scenarios/1", &h, "b")
            .await
            .status,
        200
    );
    assert_eq!(get(gw.addr(), "/x", &h).await.status, 200);
    assert_eq!(get(gw.addr(), "/other/y", &h).await.status, 403);

    let a = admin.get(&format!("/v1/keys/{id}/usage?days=3")).await;
    let today = Utc::now().date_naive();
    assert_eq!(a.status, 200, "{:?}", a.body);
    let u = a.json();
    let fields: BTreeSet<&str> = u.as_object().unwrap().keys().map(String::as_str).collect();
    let expected = [
        "key_id",
        "days",
        "total",
        "avg_per_day",
        "by_operation",
        "by_deployment",
        "by_status",
        "error_rate",
        "last_used_at",
        "last_used_ip",
        "last_used_user_agent",
    ];
    assert_eq!(fields, BTreeSet::from(expected), "{u}");
    assert_eq!(u["key_id"], id.as_str());
    let days = u["days"].as_array().unwrap();
    assert_eq!(days.len(), 3, "{u}");
    let dates: Vec<chrono::NaiveDate> = days
        .iter()
        .map(|d| d["date"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(dates[2], today, "newest last");
    assert_eq!(
        dates[0] + chrono::Days::new(1),
        dates[1],
        "oldest first, consecutive"
    );
    assert_eq!(dates[1] + chrono::Days::new(1), dates[2]);
    let per_day: Vec<u64> = days
        .iter()
        .map(|d| d["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(per_day.iter().sum::<u64>(), 4, "{u}");
    if today_before == today {
        assert_eq!(per_day, [0, 0, 4], "zero days included: {u}");
    }
    assert_eq!(u["total"], 4);
    assert_eq!(u["avg_per_day"], 1.3);
    assert_eq!(
        u["by_operation"],
        json!([{"name": "GET", "requests": 2, "share": 0.5}, {"name": "create_scenarios", "requests": 2, "share": 0.5}]),
        "{u}"
    );
    assert_eq!(
        u["by_deployment"],
        json!([{"name": "app", "requests": 3, "share": 0.75}, {"name": "other", "requests": 1, "share": 0.25}]),
        "{u}"
    );
    assert_eq!(
        u["by_status"],
        json!({"2xx": 3, "3xx": 0, "4xx": 1, "5xx": 0})
    );
    assert_eq!(u["error_rate"], 0.25);
    assert_eq!(u["last_used_ip"], "127.0.0.1");
    assert_eq!(u["last_used_user_agent"], "usage-test/2");
    let last = chrono::DateTime::parse_from_rfc3339(u["last_used_at"].as_str().unwrap()).unwrap();
    assert!((Utc::now() - last.with_timezone(&Utc)).num_seconds().abs() <= 5);

    // Default 7 days; 1 day; the largest allowed.
    assert_eq!(
        admin.get(&format!("/v1/keys/{id}/usage")).await.json()["days"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let one = admin
        .get(&format!("/v1/keys/{id}/usage?days=1"))
        .await
        .json();
    assert_eq!(one["days"].as_array().unwrap().len(), 1);
    assert_eq!(one["days"][0]["date"], today.to_string());
    assert_eq!(
        admin
            .get(&format!("/v1/keys/{id}/usage?days=366"))
            .await
            .json()["days"]
            .as_array()
            .unwrap()
            .len(),
        366
    );
    for bad in ["0", "-1", "abc", "1.5", "367", "99999999999"] {
        assert_invalid(
            &admin.get(&format!("/v1/keys/{id}/usage?days={bad}")).await,
            "days",
            bad,
        );
    }

    // A key never used: all zero, nulls for last use.
    let (idle, _, _) = admin.create(json!({"name": "idle"})).await;
    let u = admin
        .get(&format!("/v1/keys/{idle}/usage?days=2"))
        .await
        .json();
    assert_eq!(u["total"], 0);
    assert_eq!(
        u["days"],
        json!([{"date": (today - chrono::Days::new(1)).to_string(), "requests": 0}, {"date": today.to_string(), "requests": 0}])
    );
    assert_eq!(u["error_rate"], 0.0);
    assert_eq!(u["by_operation"], json!([]));
    assert_eq!(u["last_used_at"], Value::Null);
    assert_eq!(u["last_used_ip"], Value::Null);
}

// ---------------------------------------------------------------------------------------
// POST /v1/verify
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn verify_checks_a_key_like_the_data_plane() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, secret, _) = admin
        .create(json!({"name": "svc", "scopes": ["read"], "deployments": ["app"]}))
        .await;
    let (_, viewer, _) = admin
        .create(json!({"name": "viewer", "role": "viewer"}))
        .await;
    let verify = |body: Value| {
        let admin = &admin;
        async move {
            let a = admin.post("/v1/verify", body).await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            a
        }
    };

    let a = verify(json!({"key": secret})).await;
    let v = a.json();
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["code"], Value::Null);
    assert_eq!(v["key"]["id"], id.as_str());
    let fields: BTreeSet<&str> = v["key"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, BTreeSet::from(KEY_FIELDS));
    assert_no_secret(&a.body, &[&secret], "verify answer");

    let cases: &[(Value, bool, Option<&str>)] = &[
        (json!({"key": secret, "deployment": "app"}), true, None),
        (
            json!({"key": secret, "deployment": "app", "method": "get", "path": "/x"}),
            true,
            None,
        ),
        (json!({"key": secret, "scope": "read"}), true, None),
        (
            json!({"key": secret, "deployment": "other"}),
            false,
            Some("deployment_forbidden"),
        ),
        (
            json!({"key": secret, "path": "/other/thing"}),
            false,
            Some("deployment_forbidden"),
        ),
        (
            json!({"key": secret, "deployment": "app", "method": "POST", "path": "/scenarios"}),
            false,
            Some("insufficient_scope"),
        ),
        (
            json!({"key": secret, "path": "/scenarios", "method": "POST"}),
            false,
            Some("insufficient_scope"),
        ),
        (
            json!({"key": secret, "scope": "write"}),
            false,
            Some("insufficient_scope"),
        ),
        (
            json!({"key": viewer, "deployment": "app", "method": "DELETE", "path": "/x"}),
            false,
            Some("insufficient_scope"),
        ),
        (
            json!({"key": viewer, "deployment": "app", "method": "HEAD", "path": "/x"}),
            true,
            None,
        ),
        (
            json!({"key": "kg_prod_garbage"}),
            false,
            Some("invalid_key"),
        ),
        (json!({"key": ""}), false, Some("invalid_key")),
    ];
    for (body, valid, code) in cases {
        let v = verify(body.clone()).await.json();
        assert_eq!(v["valid"], *valid, "{body}: {v}");
        assert_eq!(
            v["code"],
            code.map_or(Value::Null, Value::from),
            "{body}: {v}"
        );
        if *valid || *code != Some("invalid_key") {
            assert!(v["key"]["id"].is_string(), "{body}: {v}");
        } else {
            assert_eq!(v["key"], Value::Null, "{body}: {v}");
        }
    }
    let v = verify(json!({"key": secret, "scope": "write"}))
        .await
        .json();
    assert_eq!(v["error"]["required"], "write", "{v}");

    // Request errors.
    assert_invalid(
        &admin
            .post("/v1/verify", json!({"key": secret, "deployment": "ghost"}))
            .await,
        "deployment",
        "unknown deployment",
    );
    assert_invalid(&admin.post("/v1/verify", json!({})).await, "key", "no key");
    assert_invalid(
        &admin
            .post("/v1/verify", json!({"key": secret, "verb": "GET"}))
            .await,
        "verb",
        "unknown field",
    );
    assert_invalid(
        &admin.post("/v1/verify", json!({"key": 5})).await,
        "key",
        "key as a number",
    );
    assert_invalid(
        &admin.call(Method::POST, "/v1/verify", "").await,
        "body",
        "no body",
    );
    assert_invalid(
        &admin
            .post("/v1/verify", json!({"key": secret, "path": "x"}))
            .await,
        "path",
        "relative path",
    );

    // Revoked, deleted, rotated out: invalid_key.
    let (rid, rsecret, _) = admin.create(json!({"name": "r"})).await;
    assert_eq!(verify(json!({"key": rsecret})).await.json()["valid"], true);
    admin.revoke(&rid).await;
    let v = verify(json!({"key": rsecret})).await.json();
    assert_eq!(
        (v["valid"].clone(), v["code"].clone()),
        (json!(false), json!("invalid_key")),
        "{v}"
    );
    let (oid, old, _) = admin.create(json!({"name": "o"})).await;
    let new = admin.rotate(&oid, "").await;
    assert_eq!(
        verify(json!({"key": old})).await.json()["code"],
        "invalid_key"
    );
    assert_eq!(verify(json!({"key": new})).await.json()["valid"], true);
    admin.delete(&oid).await;
    assert_eq!(
        verify(json!({"key": new})).await.json()["code"],
        "invalid_key"
    );
}

// ---------------------------------------------------------------------------------------
// GET /v1/audit, health, routing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_lists_newest_first_with_a_limit() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    for i in 0..5 {
        admin.create(json!({"name": format!("k{i}")})).await;
    }
    let all = admin.audit(100).await;
    // The bootstrap key's creation (by the local process) and ours.
    assert_eq!(all.len(), 6, "{all:?}");
    let names: Vec<&str> = all
        .iter()
        .map(|e| e["target_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k4", "k3", "k2", "k1", "k0", "bootstrap admin"]);
    assert_eq!(
        all[5]["actor_key_id"],
        Value::Null,
        "bootstrap is by the local process"
    );
    let times: Vec<chrono::DateTime<chrono::FixedOffset>> = all
        .iter()
        .map(|e| chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let two = admin.audit(2).await;
    assert_eq!(two, all[..2]);
    let dflt = admin.get("/v1/audit").await;
    assert_eq!(dflt.status, 200);
    assert_eq!(dflt.json()["events"].as_array().unwrap().len(), 6);
    for bad in ["0", "-3", "x", "100001"] {
        assert_invalid(
            &admin.get(&format!("/v1/audit?limit={bad}")).await,
            "limit",
            bad,
        );
    }
}

#[tokio::test]
async fn health_readiness_and_unknown_routes() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let addr = gw.running.admin_addr;
    for path in ["/healthz", "/readyz"] {
        let a = get(addr, path, &[]).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
    }
    let m = get(addr, "/metrics", &[]).await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));

    // Unknown paths.
    for path in ["/", "/nope", "/v2/keys", "/healthz/x"] {
        let a = get(addr, path, &[]).await;
        assert_eq!(a.status, 404, "{path}: {:?}", a.body);
        assert_eq!(a.code(), "not_found", "{path}");
    }
    for path in [
        "/v1",
        "/v1/nope",
        "/v1/keys/key_0000000000000000/bogus",
        "/v1/keys/a/b/c",
    ] {
        let a = admin.get(path).await;
        assert_eq!(a.status, 404, "{path}: {:?}", a.body);
        assert_eq!(a.code(), "not_found", "{path}");
    }
    // Wrong methods.
    let (id, _, _) = admin.create(json!({"name": "m"})).await;
    let cases = [
        (Method::PUT, "/v1/keys".to_string()),
        (Method::DELETE, "/v1/keys".to_string()),
        (Method::POST, format!("/v1/keys/{id}")),
        (Method::PUT, format!("/v1/keys/{id}")),
        (Method::GET, format!("/v1/keys/{id}/rotate")),
        (Method::GET, format!("/v1/keys/{id}/revoke")),
        (Method::DELETE, format!("/v1/keys/{id}/usage")),
        (Method::GET, "/v1/verify".to_string()),
        (Method::POST, "/v1/audit".to_string()),
        (Method::DELETE, "/v1/audit".to_string()),
    ];
    for (m, path) in cases {
        let a = admin.call(m.clone(), &path, Bytes::new()).await;
        assert_eq!(a.status, 405, "{m} {path}: {:?}", a.body);
        assert_eq!(a.code(), "method_not_allowed", "{m} {path}");
        let allow = a
            .headers
            .get("allow")
            .unwrap_or_else(|| panic!("{m} {path}: no Allow header"))
            .to_str()
            .unwrap()
            .to_string();
        assert!(!allow.contains(m.as_str()), "{m} {path}: Allow {allow}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let a = send(addr, Method::POST, path, &[], "").await;
        assert_eq!(a.status, 405, "POST {path}: {:?}", a.body);
        assert_eq!(a.headers["allow"], "GET, HEAD");
        assert_eq!(
            send(addr, Method::HEAD, path, &[], "").await.status,
            200,
            "HEAD {path}"
        );
    }
    // The key is untouched by all that.
    assert_eq!(
        admin.get(&format!("/v1/keys/{id}")).await.json()["key"]["status"],
        "active"
    );
}

/// An upstream that reports each request's arrival and answers it only when released.
async fn gated_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    Arc<tokio::sync::Semaphore>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (arrived, gate) = (arrived_tx.clone(), gate.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let (arrived, gate) = (arrived.clone(), gate.clone());
                        async move {
                            let _ = arrived.send(());
                            gate.acquire().await.unwrap().forget();
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"released")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, arrived_rx, release)
}

#[tokio::test]
async fn readiness_turns_503_once_shutdown_has_begun() {
    let (up, mut arrived, release) = gated_upstream().await;
    let gw = start_gateway(&up.to_string(), EXTRA).await;
    let admin = Admin::of(&gw);
    let addr = admin.addr;
    let (_, secret, _) = admin.create(json!({"name": "in flight"})).await;
    let mut before = keep_alive(addr).await;
    assert_eq!(ka_get(&mut before, "/readyz", None).await.unwrap().0, 200);

    // A data-plane request held by the upstream keeps the data plane draining, and the
    // admin API stays up until it has drained.
    let data = gw.addr();
    let in_flight =
        tokio::spawn(async move { get(data, "/slow", &[("x-api-key", &secret)]).await });
    arrived.recv().await.unwrap();

    gw.running.shutdown();
    // On a connection opened before shutdown, and on a new one.
    let (status, body) = ka_get(&mut before, "/readyz", None)
        .await
        .expect("admin API up while draining");
    assert_eq!(status, 503, "{body:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["status"],
        "draining"
    );
    let a = get(addr, "/readyz", &[]).await;
    assert_eq!(a.status, 503, "{:?}", a.body);
    assert_eq!(
        get(addr, "/healthz", &[]).await.status,
        200,
        "still alive while draining"
    );
    assert_eq!(
        admin.get("/v1/keys").await.status,
        200,
        "admin API still serves while draining"
    );

    // The held request completes; then everything stops.
    release.add_permits(1);
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(&a.body[..], b"released");
    let TestGateway {
        running, manager, ..
    } = gw;
    drop(manager);
    running.wait().await;
    assert!(
        ka_get(&mut before, "/readyz", None).await.is_none(),
        "admin connections closed after the drain"
    );
}

// ---------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_api_needs_an_admin_key_and_audits_failures() {
    let gw = start_gateway(
        "echo",
        &format!("{EXTRA}\n[auth]\nquery_param = \"api_key\"\n"),
    )
    .await;
    let admin = Admin::of(&gw);
    let addr = admin.addr;
    let (op_id, op, _) = admin
        .create(json!({"name": "op", "role": "operator", "scopes": ["*"]}))
        .await;
    let (_, admin2, _) = admin
        .create(json!({"name": "second admin", "role": "admin"}))
        .await;
    let (rev_id, revoked_admin, _) = admin
        .create(json!({"name": "revoked admin", "role": "admin"}))
        .await;
    admin.revoke(&rev_id).await;
    let unknown = keygate::keys::generate_secret("kg", "prod").unwrap();
    let before = admin.audit(1000).await.len();

    // No key.
    let a = get(addr, "/v1/keys", &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.code(), "missing_key");
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"keygate\"");
    // Keys in the query string are ignored even though the data plane accepts them.
    let a = get(addr, &format!("/v1/keys?api_key={}", admin.key), &[]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNAUTHORIZED, "missing_key".to_string())
    );
    assert_eq!(
        get(gw.addr(), &format!("/x?api_key={}", admin.key), &[])
            .await
            .status,
        200,
        "the data plane takes the query key"
    );
    // Not an admin.
    let a = get(addr, "/v1/keys", &[("x-api-key", &op)]).await;
    assert_eq!(a.status, 403, "{:?}", a.body);
    assert_eq!(a.code(), "insufficient_scope");
    let a = send(
        addr,
        Method::POST,
        "/v1/keys",
        &[("authorization", &format!("Bearer {op}"))],
        r#"{"name":"sneaky"}"#,
    )
    .await;
    assert_eq!(a.status, 403, "{:?}", a.body);
    // Invalid keys: unknown, malformed, revoked.
    for bad in [
        unknown.as_str(),
        "kg_prod_nope",
        "hunter2",
        revoked_admin.as_str(),
    ] {
        let a = get(addr, "/v1/keys", &[("x-api-key", bad)]).await;
        assert_eq!(a.status, 401, "{bad}: {:?}", a.body);
        assert_eq!(a.code(), "invalid_key", "{bad}");
        assert_no_secret(&a.body, &[bad], "error answer");
    }
    // Unknown paths under /v1 need the key too (no route discovery without one).
    assert_eq!(get(addr, "/v1/nope", &[]).await.status, 401);
    let failures = 2 + 2 + 4 + 1;
    let names: BTreeSet<String> = admin.get("/v1/keys?status=all").await.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains("sneaky"), "the operator created nothing");

    // Bearer and a second admin key work.
    let a = get(
        addr,
        "/v1/keys",
        &[("authorization", &format!("bearer {admin2}"))],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = get(addr, "/v1/keys", &[("x-api-key", &admin.key)]).await;
    assert_eq!(a.status, 200);

    let events = admin.audit(1000).await;
    let new: Vec<&Value> = events[..events.len() - before].iter().collect();
    let failed: Vec<&&Value> = new
        .iter()
        .filter(|e| e["action"] == "admin.auth_failed")
        .collect();
    assert_eq!(failed.len(), failures, "{new:?}");
    assert_eq!(
        new.len(),
        failures,
        "successful reads are not audited: {new:?}"
    );
    for e in &failed {
        assert_eq!(e["client_ip"], "127.0.0.1", "{e}");
        assert_eq!(e["target_key_id"], Value::Null, "{e}");
        assert!(e["time"].is_string(), "{e}");
    }
    // The operator's attempts name the operator's key; the others name no key.
    let by_op = failed
        .iter()
        .filter(|e| e["actor_key_id"] == op_id.as_str())
        .count();
    assert_eq!(by_op, 2, "{failed:?}");
    assert_eq!(
        failed
            .iter()
            .filter(|e| e["actor_key_id"].is_null())
            .count(),
        failures - 2
    );
    let raw = admin.get("/v1/audit?limit=1000").await;
    assert_no_secret(
        &raw.body,
        &[&op, &admin2, &revoked_admin, &unknown, &admin.key],
        "audit",
    );
}

// ---------------------------------------------------------------------------------------
// Live index, restart
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn api_changes_reach_the_data_plane_before_the_answer() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let data = gw.addr();

    let (id, s1, _) = admin.create(json!({"name": "live"})).await;
    assert_eq!(
        data_status(data, "/x", &s1).await,
        200,
        "usable as soon as created"
    );

    let s2 = admin.rotate(&id, "").await;
    assert_eq!(
        data_status(data, "/x", &s1).await,
        401,
        "old secret dead at once"
    );
    assert_eq!(data_status(data, "/x", &s2).await, 200);

    let s3 = admin.rotate(&id, r#"{"grace":"1h"}"#).await;
    assert_eq!(
        data_status(data, "/x", &s2).await,
        200,
        "old secret works during grace"
    );
    assert_eq!(data_status(data, "/x", &s3).await, 200);
    // A later rotation without grace stops every older secret at once, including one still
    // in an earlier grace period (rotating after a leak must kill them all).
    let s4 = admin.rotate(&id, "").await;
    assert_eq!(data_status(data, "/x", &s3).await, 401);
    assert_eq!(data_status(data, "/x", &s4).await, 200);
    assert_eq!(data_status(data, "/x", &s2).await, 401);

    // Revocation also ends every grace period.
    let (gid, g1, _) = admin.create(json!({"name": "graced"})).await;
    let g2 = admin.rotate(&gid, r#"{"grace":"1h"}"#).await;
    assert_eq!(data_status(data, "/x", &g1).await, 200);
    assert_eq!(admin.revoke(&gid).await.status, 200);
    for s in [&g1, &g2] {
        let a = get(data, "/x", &[("x-api-key", s)]).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNAUTHORIZED, "invalid_key".to_string())
        );
    }

    // Deletion, including of a key in a grace period.
    let (did, d1, _) = admin.create(json!({"name": "doomed"})).await;
    let d2 = admin.rotate(&did, r#"{"grace":"1h"}"#).await;
    assert_eq!(admin.delete(&did).await.status, 204);
    assert_eq!(data_status(data, "/x", &d1).await, 401);
    assert_eq!(data_status(data, "/x", &d2).await, 401);

    // A key the admin API just created on one keep-alive connection works on another
    // already-open one.
    let mut conn = keep_alive(data).await;
    assert_eq!(ka_get(&mut conn, "/x", Some(&s4)).await.unwrap().0, 200);
    let (_, fresh, _) = admin.create(json!({"name": "fresh"})).await;
    assert_eq!(ka_get(&mut conn, "/x", Some(&fresh)).await.unwrap().0, 200);
    assert_eq!(admin.revoke(&id).await.status, 200);
    assert_eq!(ka_get(&mut conn, "/x", Some(&s4)).await.unwrap().0, 401);
}

#[tokio::test]
async fn key_state_and_secrecy_survive_a_restart() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let data = gw.addr();
    let (rid, revoked, _) = admin.create(json!({"name": "revoked"})).await;
    admin.revoke(&rid).await;
    let (gid, grace_old, _) = admin.create(json!({"name": "graced"})).await;
    let grace_new = admin.rotate(&gid, r#"{"grace":"1h"}"#).await;
    let (nid, rotated_out, _) = admin.create(json!({"name": "rotated"})).await;
    let rotated_new = admin.rotate(&nid, "").await;
    let (did, deleted, _) = admin.create(json!({"name": "deleted"})).await;
    admin.delete(&did).await;
    let (_, plain, _) = admin
        .create(json!({"name": "plain", "owner": "alice"}))
        .await;
    assert_eq!(data_status(data, "/x", &plain).await, 200);

    let good = [&grace_old, &grace_new, &rotated_new, &plain];
    let bad = [&revoked, &rotated_out, &deleted];
    let check = |data: SocketAddr| async move {
        for s in good {
            assert_eq!(data_status(data, "/x", s).await, 200);
        }
        for s in bad {
            assert_eq!(data_status(data, "/x", s).await, 401);
        }
    };
    check(data).await;

    let admin_key = admin.key.clone();
    let all: Vec<&str> = good
        .iter()
        .chain(bad.iter())
        .map(|s| s.as_str())
        .chain([admin_key.as_str()])
        .collect();
    let TestGateway {
        running,
        dir,
        manager,
        ..
    } = gw;
    drop(manager);
    running.shutdown();
    running.wait().await;

    // Only digests went to disk.
    let store_bytes = std::fs::read(dir.path().join("keygate.redb")).unwrap();
    assert!(store_bytes.len() > 1000);
    assert!(
        contains(&store_bytes, rid.as_bytes()),
        "sanity: the store holds the key ids"
    );
    assert_no_secret(&store_bytes, &all, "the redb file");

    // Same config file, new process state.
    let config = Config::load(&dir.path().join("gateway.toml")).unwrap();
    let running = keygate::server::start(config)
        .await
        .expect("restart on the same store");
    assert!(
        running.bootstrap_secret.is_none(),
        "no second bootstrap key"
    );
    check(running.data_addr).await;
    let admin = Admin::at(running.admin_addr, admin_key);
    let a = admin.get(&format!("/v1/keys/{rid}")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["key"]["status"], "revoked");
    assert_eq!(admin.get(&format!("/v1/keys/{did}")).await.status, 404);
    // Actions after the restart still apply live.
    let r = admin.revoke(&gid).await;
    assert_eq!(r.status, 200);
    assert_eq!(data_status(running.data_addr, "/x", &grace_old).await, 401);
    assert_eq!(data_status(running.data_addr, "/x", &grace_new).await, 401);
    let events = admin.audit(1000).await;
    let deleted_ev = events
        .iter()
        .find(|e| e["action"] == "key.deleted")
        .expect("delete audited");
    assert_eq!(deleted_ev["target_key_id"], did.as_str());
    assert_eq!(
        deleted_ev["target_name"], "deleted",
        "audit survives the key and the restart"
    );
    running.shutdown();
    running.wait().await;
}

// ---------------------------------------------------------------------------------------
// Revocation race
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_started_after_the_revoke_answer_gets_through() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (id, secret, _) = admin.create(json!({"name": "raced"})).await;
    let data = gw.addr();

    const MAX_REQUESTS: usize = 20_000;
    const AFTER_REVOKE: usize = 300;
    let deadline = Instant::now() + Duration::from_secs(30);
    let revoked_at: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let (warm_tx, warm_rx) = tokio::sync::oneshot::channel::<()>();

    let hammer = {
        let revoked_at = revoked_at.clone();
        let secret = secret.clone();
        tokio::spawn(async move {
            // Two keep-alive connections, used alternately.
            let mut conns = [keep_alive(data).await, keep_alive(data).await];
            let mut log: Vec<(Instant, StatusCode)> = Vec::new();
            let mut warm_tx = Some(warm_tx);
            let mut after = 0;
            let mut oks = 0;
            while log.len() < MAX_REQUESTS && Instant::now() < deadline {
                let i = log.len() % 2;
                let start = Instant::now();
                let status = match ka_get(&mut conns[i], "/x", Some(&secret)).await {
                    Some((s, _)) => s,
                    None => {
                        // The server never closes these; count it as a failure to see.
                        conns[i] = keep_alive(data).await;
                        StatusCode::from_u16(599).unwrap()
                    }
                };
                log.push((start, status));
                if status == 200 {
                    oks += 1;
                    if oks == 50 {
                        if let Some(tx) = warm_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                if revoked_at.get().is_some() {
                    after += 1;
                    if after >= AFTER_REVOKE {
                        break;
                    }
                }
            }
            log
        })
    };

    warm_rx.await.expect("the key worked before the revocation");
    let r = admin.revoke(&id).await;
    let answered = Instant::now();
    assert_eq!(r.status, 200, "{:?}", r.body);
    revoked_at.set(answered).unwrap();

    let log = hammer.await.unwrap();
    let before_ok = log
        .iter()
        .filter(|(t, s)| *t < answered && *s == 200)
        .count();
    let after: Vec<&(Instant, StatusCode)> = log.iter().filter(|(t, _)| *t > answered).collect();
    assert!(
        before_ok >= 50,
        "{before_ok} successes before the revocation"
    );
    assert!(
        !after.is_empty(),
        "no request started after the revoke answer ({} in all)",
        log.len()
    );
    let leaked: Vec<_> = after.iter().filter(|(_, s)| *s != 401).collect();
    assert!(
        leaked.is_empty(),
        "{} of {} requests started after the revoke answer were not 401: {:?}",
        leaked.len(),
        after.len(),
        &leaked[..leaked.len().min(5)]
    );
    assert!(
        log.iter().all(|(_, s)| *s == 200 || *s == 401),
        "only 200 and 401 expected"
    );
}

// ---------------------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn every_action_is_audited_with_its_actor_and_no_secret() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let me = admin.own_id().await;
    let (id, s1, _) = admin
        .create(json!({"name": "audited", "scopes": ["a"]}))
        .await;
    let patched = admin
        .patch(
            &id,
            json!({"name": "audited2", "scopes": ["a", "b"], "owner": ""}),
        )
        .await;
    assert_eq!(patched.status, 200);
    let s2 = admin.rotate(&id, "").await;
    let s3 = admin.rotate(&id, r#"{"grace":"10m"}"#).await;
    assert_eq!(admin.revoke(&id).await.status, 200);
    let (did, s4, _) = admin.create(json!({"name": "to delete"})).await;
    assert_eq!(admin.delete(&did).await.status, 204);
    let _ = get(admin.addr, "/v1/keys", &[("x-api-key", "kg_prod_wrong")]).await;

    let raw = admin.get("/v1/audit?limit=100").await;
    assert_eq!(raw.status, 200);
    let events = raw.json()["events"].as_array().unwrap().clone();
    let ours: Vec<&Value> = events
        .iter()
        .take_while(|e| e["target_name"] != "bootstrap admin")
        .collect();
    let actions: Vec<&str> = ours.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "admin.auth_failed",
            "key.deleted",
            "key.created",
            "key.revoked",
            "key.rotated",
            "key.rotated",
            "key.updated",
            "key.created"
        ],
        "{events:?}"
    );
    let fields = [
        "time",
        "action",
        "actor_key_id",
        "client_ip",
        "target_key_id",
        "target_name",
        "changes",
    ];
    for e in &events {
        let have: BTreeSet<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(have, BTreeSet::from(fields), "{e}");
        let t = e["time"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(t).is_ok() && t.ends_with('Z'),
            "{e}"
        );
    }
    for e in &ours[1..] {
        assert_eq!(e["actor_key_id"], me.as_str(), "{e}");
        assert_eq!(e["client_ip"], "127.0.0.1", "{e}");
    }
    let ev = |i: usize| ours[i];
    assert_eq!(ev(7)["target_key_id"], id.as_str());
    assert_eq!(ev(7)["target_name"], "audited");
    assert_eq!(ev(7)["changes"], json!([]));
    assert_eq!(
        changes_of(ev(6)),
        BTreeSet::from(["name".to_string(), "scopes".to_string()]),
        "owner was already empty"
    );
    assert_eq!(ev(6)["target_name"], "audited2");
    assert_eq!(ev(5)["changes"], json!(["secret"]));
    assert_eq!(
        changes_of(ev(4)),
        BTreeSet::from(["secret".to_string(), "grace".to_string()])
    );
    assert_eq!(ev(3)["target_key_id"], id.as_str());
    assert_eq!(ev(2)["target_key_id"], did.as_str());
    assert_eq!(ev(1)["action"], "key.deleted");
    assert_eq!(ev(1)["target_key_id"], did.as_str());
    assert_eq!(ev(1)["target_name"], "to delete");
    assert_eq!(ev(0)["actor_key_id"], Value::Null);
    assert_eq!(ev(0)["client_ip"], "127.0.0.1");

    // No secret anywhere: audit, list, show.
    let secrets = [s1.as_str(), &s2, &s3, &s4, &admin.key];
    assert_no_secret(&raw.body, &secrets, "audit");
    let list = admin.get("/v1/keys?status=all").await;
    assert_no_secret(&list.body, &secrets, "list");
    let show = admin.get(&format!("/v1/keys/{id}")).await;
    assert_no_secret(&show.body, &secrets, "show");
}

#[tokio::test]
async fn verify_applies_the_viewer_method_rule_without_a_deployment() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let (_, viewer, _) = admin.create(json!({"name": "v", "role": "viewer"})).await;
    let post = admin
        .post("/v1/verify", json!({"key": viewer, "method": "POST"}))
        .await
        .json();
    assert_eq!(post["valid"], false, "{post}");
    assert_eq!(post["code"], "insufficient_scope");
    let get = admin
        .post("/v1/verify", json!({"key": viewer, "method": "GET"}))
        .await
        .json();
    assert_eq!(get["valid"], true, "{get}");
}

#[tokio::test]
async fn failed_admin_logins_are_locked_out_per_ip() {
    let gw = start_gateway(
        "echo",
        "\n[rate_limit]\ndefault = \"none\"\nfailed_auth_per_ip = \"3/1m\"\n",
    )
    .await;
    let admin = Admin::of(&gw);
    let wrong = Admin::at(gw.running.admin_addr, "kg_prod_not-a-key".to_string());
    for i in 0..3 {
        let a = wrong.get("/v1/keys").await;
        assert_eq!(a.status, 401, "attempt {i}: {:?}", a.body);
    }
    let blocked = wrong.get("/v1/keys").await;
    assert_eq!(blocked.status, 429, "{:?}", blocked.body);
    assert_eq!(blocked.code(), "too_many_failures");
    assert!(blocked.headers.contains_key("retry-after"));
    // Once blocked, more attempts are refused without writing more audit events.
    let before = admin
        .audit(1000)
        .await
        .iter()
        .filter(|e| e["action"] == "admin.auth_failed")
        .count();
    for _ in 0..5 {
        assert_eq!(wrong.get("/v1/keys").await.status, 429);
    }
    let after = admin.audit(1000).await;
    let failed = after
        .iter()
        .filter(|e| e["action"] == "admin.auth_failed")
        .count();
    assert_eq!(
        failed, before,
        "blocked attempts must not fill the audit trail"
    );
}

#[tokio::test]
async fn a_key_lists_at_most_32_scopes() {
    let gw = start_gateway("echo", EXTRA).await;
    let admin = Admin::of(&gw);
    let scopes: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    let a = admin
        .post("/v1/keys", json!({"name": "many", "scopes": scopes}))
        .await;
    assert_invalid(&a, "scopes", "33 scopes");
    let ok: Vec<String> = (0..32).map(|i| format!("s{i}")).collect();
    admin.create(json!({"name": "enough", "scopes": ok})).await;
}
