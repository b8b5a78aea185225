//! The response body type shared by the data plane and the admin API.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A response body: either a canned/generated buffer or a streamed upstream body.
pub type Body = Either<Full<Bytes>, Incoming>;

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    Either::Left(Full::new(Bytes::new()))
}

/// A streamed body.
pub fn stream(incoming: Incoming) -> Body {
    Either::Right(incoming)
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
