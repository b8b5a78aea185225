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
