//! The built-in `echo` upstream: answers with the method, path, query and headers it
//! received (so a first user sees the identity headers), after draining the body.

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use crate::body::{self, Body, RequestBody};

/// Answers a request forwarded to the echo upstream.
pub async fn respond(req: Request<RequestBody>) -> Response<Body> {
    let (parts, mut incoming) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("<binary>"))
            .collect();
        headers.insert(name.as_str().to_string(), Value::String(values.join(", ")));
    }
    let answer = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    body::json(StatusCode::OK, &answer)
}
