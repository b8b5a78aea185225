//! What a handler answers: the response, and the `RateLimit-*` headers that go with it.
//! Each server path adds the latter its own way: keygate's own HTTP/1.1 path writes them
//! straight into the response head, hyper's path sets them in the header map.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};

use crate::body::{self, Body};
use crate::h1upstream::write_header_line;
use crate::ratelimit::Decision;

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// A handler's answer to one request.
pub struct Answer {
    /// The response (an upstream's, relayed, may carry its head unparsed: see
    /// [`body::take_raw_head`]).
    pub response: Response<Body>,
    /// The rate-limit decision the `RateLimit-*` headers report, when one was made.
    pub rate: Option<Decision>,
}

impl From<Response<Body>> for Answer {
    fn from(response: Response<Body>) -> Self {
        Answer {
            response,
            rate: None,
        }
    }
}

impl Answer {
    /// The response with every header in its map (for hyper's server path).
    pub fn into_response(self) -> Response<Body> {
        let mut response = self.response;
        let (mut parts, mut body) = response.into_parts();
        if let Some(raw) = body::take_raw_head(&mut body) {
            raw.append_to(&mut parts.headers);
        }
        if let Some(d) = self.rate {
            set_rate_headers(&mut parts.headers, d);
        }
        response = Response::from_parts(parts, body);
        response
    }
}

/// The `RateLimit-*` values of a decision: limit, remaining, reset (none when unlimited).
fn rate_values(d: Decision) -> Option<[u64; 3]> {
    match d {
        Decision::Unlimited => None,
        Decision::Allowed {
            limit,
            remaining,
            reset,
            ..
        } => Some([u64::from(limit), u64::from(remaining), reset]),
        Decision::Denied { limit, reset, .. } => Some([u64::from(limit), 0, reset]),
    }
}

/// Adds `RateLimit-*` headers for an allowed or denied decision to a header map.
pub fn set_rate_headers(headers: &mut HeaderMap, d: Decision) {
    let Some([limit, remaining, reset]) = rate_values(d) else {
        return;
    };
    headers.reserve(3);
    headers.insert(&RATELIMIT_LIMIT, count_header(limit));
    headers.insert(&RATELIMIT_REMAINING, count_header(remaining));
    headers.insert(&RATELIMIT_RESET, count_header(reset));
}

/// `n` as a header value. Values below 4096 (most limits, remainders and resets) come from a
/// table made once, so they are neither formatted nor allocated per response.
fn count_header(n: u64) -> HeaderValue {
    const CACHED: usize = 4096;
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        // One buffer with every number, kept for the life of the process: static header
        // values are cloned without reference counting.
        let mut text = String::new();
        let mut ends = Vec::with_capacity(CACHED);
        for i in 0..CACHED {
            text.push_str(&i.to_string());
            ends.push(text.len());
        }
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let v = HeaderValue::from_static(&text[start..end]);
                start = end;
                v
            })
            .collect()
    });
    usize::try_from(n)
        .ok()
        .and_then(|i| table.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// Writes the `RateLimit-*` header lines for a decision (the same fields as
/// [`set_rate_headers`]; a test checks they agree).
pub fn write_rate_lines(out: &mut Vec<u8>, d: Decision) {
    let Some(values) = rate_values(d) else {
        return;
    };
    let names = [&RATELIMIT_LIMIT, &RATELIMIT_REMAINING, &RATELIMIT_RESET];
    let mut digits = itoa::Buffer::new();
    for (name, value) in names.into_iter().zip(values) {
        write_header_line(out, name, digits.format(value).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_headers_match_their_numbers() {
        for n in [0u64, 1, 9, 10, 4095, 4096, 100_000_000, u64::MAX] {
            assert_eq!(count_header(n), n.to_string().as_str(), "{n}");
        }
    }

    #[test]
    fn written_rate_lines_match_the_header_map_ones() {
        let decisions = [
            Decision::Unlimited,
            Decision::Allowed {
                limit: 100,
                remaining: 99,
                reset: 60,
                window: 60,
            },
            Decision::Denied {
                limit: 5_000_000,
                reset: 86_400,
                retry_after: 3,
                window: 86_400,
            },
        ];
        for d in decisions {
            let mut map = HeaderMap::new();
            set_rate_headers(&mut map, d);
            let from_map: String = map
                .iter()
                .map(|(n, v)| format!("{n}: {}\r\n", v.to_str().unwrap()))
                .collect();
            let mut written = Vec::new();
            write_rate_lines(&mut written, d);
            assert_eq!(String::from_utf8(written).unwrap(), from_map, "{d:?}");
        }
    }
}
