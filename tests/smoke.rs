mod common;

use common::*;

#[tokio::test]
async fn a_valid_key_reaches_the_upstream_with_identity_headers() {
    let up = start_upstream().await;
    let gw = start_gateway(&up.to_string(), "").await;
    let (id, secret) = gw.operator_key();
    let a = get(gw.addr(), "/hello?x=1", &[("x-api-key", &secret)]).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let v = a.json();
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["headers"]["x-keygate-key-id"], id.as_str());
    assert_eq!(v["headers"]["x-keygate-deployment"], "app");
    assert!(v["headers"].get("x-api-key").is_none());
    let a = get(gw.addr(), "/hello", &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.code(), "missing_key");
}

#[tokio::test]
async fn admin_api_creates_and_revokes_keys_live() {
    let gw = start_gateway("echo", "").await;
    let admin = gw
        .running
        .bootstrap_secret
        .clone()
        .expect("bootstrap admin key on an empty store");
    let admin_addr = gw.running.admin_addr;
    let a = send(
        admin_addr,
        http::Method::POST,
        "/v1/keys",
        &[("x-api-key", &admin), ("content-type", "application/json")],
        r#"{"name":"ci","role":"operator"}"#,
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let v = a.json();
    let secret = v["secret"].as_str().unwrap().to_string();
    let id = v["key"]["id"].as_str().unwrap().to_string();
    let ok = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["ratelimit-limit"], "1000");
    let r = send(
        admin_addr,
        http::Method::POST,
        &format!("/v1/keys/{id}/revoke"),
        &[("x-api-key", &admin)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["key"]["status"], "revoked");
    let denied = get(gw.addr(), "/x", &[("x-api-key", &secret)]).await;
    assert_eq!(denied.status, 401);
    let usage = get(
        admin_addr,
        &format!("/v1/keys/{id}/usage?days=3"),
        &[("x-api-key", &admin)],
    )
    .await;
    assert_eq!(usage.status, 200, "{:?}", usage.body);
    assert_eq!(usage.json()["total"], 1, "{}", usage.json());
    let m = get(admin_addr, "/metrics", &[]).await;
    assert!(
        String::from_utf8_lossy(&m.body)
            .contains("keygate_requests_total{deployment=\"app\",status=\"2xx\"} 1"),
        "{:?}",
        m.body
    );
    let noauth = get(admin_addr, "/v1/keys", &[("x-api-key", &secret)]).await;
    assert_eq!(noauth.status, 401);
    let audit = get(admin_addr, "/v1/audit?limit=10", &[("x-api-key", &admin)]).await;
    let actions: Vec<String> = audit.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions[..3],
        ["admin.auth_failed", "key.revoked", "key.created"],
        "{actions:?}"
    );
}
