//! `https://` upstreams: verified against webpki roots plus a per-deployment `ca_file`.
mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A TLS upstream for "localhost" with a fresh self-signed certificate; returns its port and
/// the certificate PEM.
async fn tls_upstream() -> (u16, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key_der)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let id = req
                        .headers()
                        .get("x-keygate-key-id")
                        .map(|v| v.to_str().unwrap_or("").to_string())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "tls upstream saw {id} at {}",
                        req.uri().path()
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, cert_pem)
}

#[tokio::test]
async fn an_https_upstream_is_reached_with_its_ca_file_and_refused_without() {
    let (port, pem) = tls_upstream().await;
    let gw = start_gateway_with(|dir| {
        std::fs::write(dir.join("upstream-ca.pem"), &pem).unwrap();
        config_text(
            dir,
            "",
            &format!(
                "[[deployments]]\nname = \"trusted\"\nupstream = \"https://localhost:{port}\"\npath_prefix = \"/trusted\"\nstrip_prefix = true\nca_file = \"upstream-ca.pem\"\n\n\
                 [[deployments]]\nname = \"untrusted\"\nupstream = \"https://localhost:{port}\"\npath_prefix = \"/untrusted\"\n"
            ),
        )
    })
    .await;
    let (id, secret) = gw.operator_key();
    let ok = get(gw.addr(), "/trusted/hello", &[("x-api-key", &secret)]).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(
        ok.body,
        format!("tls upstream saw {id} at /hello").as_bytes()
    );
    // A self-signed certificate is not in the webpki roots: the handshake fails → 502.
    let refused = get(gw.addr(), "/untrusted/hello", &[("x-api-key", &secret)]).await;
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    assert_eq!(refused.code(), "upstream_unavailable");
}

#[test]
fn a_bad_ca_file_is_a_config_error_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let text = "[[deployments]]\nname = \"a\"\nupstream = \"https://localhost:1\"\nca_file = \"bad.pem\"\n";
    let path = dir.path().join("gateway.toml");
    let e = keygate::config::Config::parse(&path, text).unwrap_err();
    assert_eq!((e.line, e.col), (4, 11), "{e}");
    let text =
        "[[deployments]]\nname = \"a\"\nupstream = \"http://localhost:1\"\nca_file = \"bad.pem\"\n";
    let e = keygate::config::Config::parse(&path, text).unwrap_err();
    assert!(e.message.contains("only applies to an https"), "{e}");
}
