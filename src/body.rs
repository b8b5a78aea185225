//! The response body type shared by the data plane and the admin API.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::h1upstream::{RawBody, RawHead};

/// A response body: a canned/generated buffer, or a streamed upstream body (from hyper's
/// client, or read by `h1upstream` itself).
pub type Body = Either<Full<Bytes>, Either<Incoming, RawBody>>;

/// A request body: hyper's, or none at all (a body-less request read by keygate's own
/// HTTP/1.1 server path, `h1server`).
pub enum RequestBody {
    /// Read by hyper.
    Incoming(Incoming),
    /// No body.
    Empty,
}

impl From<Incoming> for RequestBody {
    fn from(incoming: Incoming) -> Self {
        RequestBody::Incoming(incoming)
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Incoming(inner) => std::pin::Pin::new(inner).poll_frame(cx),
            RequestBody::Empty => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(inner) => inner.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            RequestBody::Incoming(inner) => inner.size_hint(),
            RequestBody::Empty => http_body::SizeHint::with_exact(0),
        }
    }
}

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
    Either::Right(Either::Left(incoming))
}

/// A body read off a direct upstream connection by `h1upstream`.
pub fn raw(body: RawBody) -> Body {
    Either::Right(Either::Right(body))
}

/// The unparsed response fields a body read by `h1upstream` carries.
pub fn raw_head(body: &Body) -> Option<&RawHead> {
    match body {
        Either::Right(Either::Right(raw)) => raw.head(),
        _ => None,
    }
}

/// Takes the unparsed response fields out of a body read by `h1upstream`.
pub fn take_raw_head(body: &mut Body) -> Option<RawHead> {
    match body {
        Either::Right(Either::Right(raw)) => raw.take_head(),
        _ => None,
    }
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
