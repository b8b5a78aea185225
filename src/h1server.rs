//! keygate's own HTTP/1.1 server path for the commonest request: HTTP/1.1 without a body or an
//! upgrade. It reads request heads with `httparse`, hands each request to the handler and
//! writes the answer itself (status line, framing, keep-alive), with the connection's
//! header-read and idle timeouts and graceful shutdown. In the load profile hyper's server
//! side (its dispatcher, codec and buffers) was about a quarter of keygate's user-space
//! instructions per request.
//!
//! The first request of any other shape (a body, `Expect`, an upgrade, HTTP/1.0, HTTP/2's
//! preface, a target not in origin form, a head `httparse` rejects or one over [`MAX_HEAD`])
//! hands the connection, with every byte already read, to hyper for the rest of its life:
//! hyper answers all that this module does not handle, its errors included.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::answer::{write_rate_lines, Answer};
use crate::body::{Body, RequestBody};
use crate::clock::{unix_now, CoarseStopwatch, LazyTimer};
use crate::direct::DirectUpstream;
use crate::h1upstream::{merge_length, poll_read_into, span_in, write_header_line, RawHead};
use crate::proxy::ConnInfo;
use crate::proxyproto::Prefixed;
use crate::ratelimit::Decision;
use crate::server::{ConnSettings, Handler};

/// Most header lines a request head may carry here (hyper's server default).
const MAX_HEADERS: usize = 100;
/// Largest request head read here; a larger one goes to hyper, which applies its own limit.
pub const MAX_HEAD: usize = 64 * 1024;
/// Read size.
const READ_SIZE: usize = 8 * 1024;
/// Body bytes copied behind the head (or behind each other) into one write.
const COALESCE: usize = 16 * 1024;

/// How a connection left this module.
pub enum Ended<S> {
    /// Closed (by either side, a timeout, or shutdown).
    Closed,
    /// A request this module does not serve arrived: the connection, with what was read of
    /// it, goes on with hyper.
    HandOff(Prefixed<S>),
}

/// Serves HTTP/1.1 requests on `io` until it closes or a request of another shape arrives.
/// The caller polls `direct`'s hyper connection alongside (see `server`).
pub async fn serve<S, H>(
    mut io: S,
    conn: ConnInfo,
    handler: &H,
    settings: ConnSettings,
    shutdown: watch::Receiver<bool>,
    direct: &Arc<DirectUpstream>,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler,
{
    let mut guard = Guard::new(settings, shutdown);
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut fields: Vec<(HeaderName, Range<usize>)> = Vec::new();
    let mut names = NameCache::default();
    // One request for the connection's life, refilled for each: its header map keeps its
    // memory from request to request (at most `MAX_HEADERS` fields' worth; a handler that
    // needs the request owned takes it).
    let mut req = Request::new(RequestBody::Empty);
    // The first request's head is awaited from accept (slowloris), later ones from their
    // first byte; between requests the idle timeout applies.
    let mut head_since = Some(0);
    loop {
        let shape = loop {
            if !buf.is_empty() {
                match scan(&buf, &mut fields, &mut names) {
                    Scan::Served(shape) => break shape,
                    Scan::Partial if buf.len() < MAX_HEAD => {}
                    Scan::Partial | Scan::Other => {
                        return Ended::HandOff(Prefixed::with_prefix(io, buf.freeze()))
                    }
                }
            } else if guard.draining {
                return close(io, &settings).await;
            }
            let deadline = match head_since {
                Some(since) => guard.clock.at(since, settings.header_read_timeout),
                None => guard.idle_deadline(),
            };
            match read_more(&mut io, &mut buf, &mut guard, deadline).await {
                Ok(0) | Err(Interrupt::Expired | Interrupt::Failed) => return Ended::Closed,
                Ok(_) => {
                    head_since.get_or_insert(guard.last_io);
                }
                // Only an idle connection hears it: it closes now.
                Err(Interrupt::Stop) => return close(io, &settings).await,
            }
        };
        head_since = None;
        let head = buf.split_to(shape.len).freeze();
        if !request(&head, shape.method, shape.target, &mut fields, &mut req) {
            // A target `http::Uri` rejects: hyper answers it (400).
            let mut all = BytesMut::from(&head[..]);
            all.extend_from_slice(&buf);
            return Ended::HandOff(Prefixed::with_prefix(io, all.freeze()));
        }
        let is_head = req.method() == Method::HEAD;
        let answer = handler.handle(&mut req, conn, direct).await;
        // Its target and header values are slices of the head: they go before it does.
        clear(&mut req);
        drop(head);
        let close_after = shape.close || guard.stopping();
        let whole =
            write_response(&mut io, &mut out, &mut guard, answer, is_head, close_after).await;
        match whole {
            Ok(true) if !close_after => {
                guard.touch();
                // Bytes of the next request came with this one: its head has begun.
                if !buf.is_empty() {
                    head_since = Some(guard.last_io);
                }
            }
            Ok(_) => return close(io, &settings).await,
            Err(_) => return Ended::Closed,
        }
    }
}

/// Ends the connection: the write side closes (TLS sends its close notification), bounded
/// by the idle timeout.
async fn close<S: AsyncWrite + Unpin>(mut io: S, settings: &ConnSettings) -> Ended<S> {
    let _ = tokio::time::timeout(settings.idle_timeout, io.shutdown()).await;
    Ended::Closed
}

/// What a request head looks like.
enum Scan {
    /// Complete and served here.
    Served(Shape),
    /// Incomplete.
    Partial,
    /// For hyper.
    Other,
}

/// A complete request head served here.
struct Shape {
    /// Its length in bytes.
    len: usize,
    method: Method,
    /// Where the request target is in the head.
    target: Range<usize>,
    /// `Connection: close` was sent.
    close: bool,
}

/// The header names a connection has sent, for its later requests: `HeaderName::from_bytes`
/// allocates a lower-cased copy of every name `http` has no constant for (`X-API-Key`, which
/// nearly every request to keygate carries, among them); a clone of the first costs a
/// reference count.
#[derive(Default)]
struct NameCache(Vec<HeaderName>);

impl NameCache {
    /// Most names kept per connection.
    const MAX: usize = 16;

    /// The header name spelled `raw` (any case); `None` when it is not a valid name.
    fn name(&mut self, raw: &[u8]) -> Option<HeaderName> {
        // Names are kept lower-cased, and most differ in length: a cheap miss.
        if let Some(known) = self
            .0
            .iter()
            .find(|n| n.as_str().as_bytes().eq_ignore_ascii_case(raw))
        {
            return Some(known.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        if self.0.len() < Self::MAX {
            self.0.push(name.clone());
        }
        Some(name)
    }
}

/// Parses the head at the front of `buf`; for one served here, `fields` gets its header
/// names and where their values are.
fn scan(buf: &[u8], fields: &mut Vec<(HeaderName, Range<usize>)>, names: &mut NameCache) -> Scan {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Scan::Partial,
        Err(_) => return Scan::Other,
    };
    if req.version != Some(1) {
        return Scan::Other;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Scan::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Scan::Other;
    };
    if method == Method::CONNECT || !target.starts_with('/') {
        return Scan::Other;
    }
    let span = |part: &[u8]| span_in(&buf[..len], part);
    let mut close = false;
    fields.clear();
    for h in req.headers.iter() {
        let Some(name) = names.name(h.name.as_bytes()) else {
            return Scan::Other;
        };
        if name == header::CONTENT_LENGTH {
            if h.value.trim_ascii() != b"0" {
                return Scan::Other;
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Scan::Other;
        } else if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Scan::Other;
                }
            }
        }
        fields.push((name, span(h.value)));
    }
    Scan::Served(Shape {
        len,
        method,
        target: span(target.as_bytes()),
        close,
    })
}

/// Fills `req` (new, or emptied by [`clear`]: no fields, no body) with a scanned head; its
/// target and header values are slices of `head`. False for a target `http::Uri` rejects.
fn request(
    head: &Bytes,
    method: Method,
    target: Range<usize>,
    fields: &mut Vec<(HeaderName, Range<usize>)>,
    req: &mut Request<RequestBody>,
) -> bool {
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target)) else {
        return false;
    };
    let headers = req.headers_mut();
    headers.reserve(fields.len());
    for (name, span) in fields.drain(..) {
        // SAFETY (of the value's bytes): httparse accepts only HTAB, SP, visible ASCII and
        // obs-text in field values, which is what `HeaderValue` allows (hyper relies on
        // the same).
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(span)) };
        headers.append(name, value);
    }
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    true
}

/// Empties a handled request for the next one, keeping its header map's memory.
fn clear(req: &mut Request<RequestBody>) {
    req.headers_mut().clear();
    *req.uri_mut() = Uri::default();
    req.extensions_mut().clear();
    *req.body_mut() = RequestBody::Empty;
}

/// Why a wait ended early.
enum Interrupt {
    /// Its deadline passed.
    Expired,
    /// Shutdown began.
    Stop,
    /// The connection failed.
    Failed,
}

/// The connection's one timer (for every wait: head, idle, write, body) and its shutdown
/// signal.
struct Guard {
    clock: CoarseStopwatch,
    /// When bytes last moved (milliseconds on `clock`).
    last_io: u64,
    idle: Duration,
    timer: LazyTimer,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    probe: watch::Receiver<bool>,
    stop_armed: bool,
    draining: bool,
}

impl Guard {
    fn new(settings: ConnSettings, mut shutdown: watch::Receiver<bool>) -> Self {
        let clock = CoarseStopwatch::start();
        let draining = *shutdown.borrow();
        let probe = shutdown.clone();
        Guard {
            clock,
            last_io: 0,
            idle: settings.idle_timeout,
            timer: LazyTimer::new(clock.at(0, settings.header_read_timeout)),
            stop: Box::pin(async move {
                let _ = shutdown.changed().await;
            }),
            probe,
            stop_armed: false,
            draining,
        }
    }

    /// Bytes moved.
    fn touch(&mut self) {
        self.last_io = self.clock.elapsed_ms();
    }

    fn idle_deadline(&self) -> Instant {
        self.clock.at(self.last_io, self.idle)
    }

    /// Ready once `deadline` has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        self.timer.poll_expired(cx, deadline)
    }

    /// True once shutdown has begun; registers for the signal (once) while it has not.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.draining && (!self.stop_armed || self.probe.has_changed().unwrap_or(true)) {
            self.stop_armed = true;
            self.draining = self.stop.as_mut().poll(cx).is_ready();
        }
        self.draining
    }

    /// True once shutdown has begun.
    fn stopping(&mut self) -> bool {
        if !self.draining && self.probe.has_changed().unwrap_or(true) {
            self.draining = true;
        }
        self.draining
    }
}

/// Reads more of a request head into `buf`; an idle connection (nothing buffered) also
/// listens for shutdown.
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    guard: &mut Guard,
    deadline: Instant,
) -> Result<usize, Interrupt> {
    let idle = buf.is_empty();
    poll_fn(|cx| {
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match poll_read_into(io, cx, buf, usize::MAX) {
            Poll::Ready(Ok(n)) => {
                guard.touch();
                return Poll::Ready(Ok(n));
            }
            Poll::Ready(Err(_)) => return Poll::Ready(Err(Interrupt::Failed)),
            Poll::Pending => {}
        }
        if idle && guard.poll_stop(cx) {
            return Poll::Ready(Err(Interrupt::Stop));
        }
        if guard.poll_expired(cx, deadline).is_ready() {
            return Poll::Ready(Err(Interrupt::Expired));
        }
        Poll::Pending
    })
    .await
}

/// Writes all of `data`, giving up when nothing moves for the idle timeout.
async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    data: &[u8],
    guard: &mut Guard,
) -> io::Result<()> {
    let mut written = 0;
    poll_fn(|cx| {
        while written < data.len() {
            match Pin::new(&mut *io).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    guard.touch();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let deadline = guard.idle_deadline();
                    if guard.poll_expired(cx, deadline).is_ready() {
                        return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                    }
                    return Poll::Pending;
                }
            }
        }
        // TLS holds written bytes until flushed; a TCP stream's flush does nothing.
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Pending => {
                let deadline = guard.idle_deadline();
                if guard.poll_expired(cx, deadline).is_ready() {
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
            done => done,
        }
    })
    .await
}

/// How the response body is framed towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (a `Content-Length` nobody can read was passed on).
    UntilClose,
}

/// The `Content-Length` value (`"5, 5"` too, as RFC 9110 §8.6 allows); `None` when it is
/// not a number or its parts differ.
fn parse_length(value: &[u8]) -> Option<u64> {
    merge_length(None, value).ok().flatten()
}

/// What goes into a response head besides the status and the header map.
struct HeadExtras<'a> {
    /// An upstream's unparsed fields.
    raw: Option<&'a RawHead>,
    /// The `RateLimit-*` fields.
    rate: Option<Decision>,
    /// The body's length, when known.
    exact: Option<u64>,
    /// The answer to a HEAD request.
    is_head: bool,
    /// The connection closes after this response.
    close: bool,
}

/// Appends the response head; returns how the body is framed.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    extras: HeadExtras<'_>,
) -> Framing {
    let HeadExtras {
        raw,
        rate,
        exact,
        is_head,
        close,
    } = extras;
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = raw.and_then(|r| r.length);
    let mut bad_length = false;
    let mut dated = raw.is_some_and(|r| r.dated);
    if let Some(raw) = raw {
        out.extend_from_slice(raw.lines());
    }
    if let Some(d) = rate {
        write_rate_lines(out, d);
    }
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            match parse_length(value.as_bytes()) {
                Some(n) => length = Some(n),
                None => bad_length = true,
            }
        } else if *name == header::DATE {
            dated = true;
        }
        write_header_line(out, name, value.as_bytes());
    }
    if !dated {
        write_date(out);
    }
    let no_body_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if is_head || no_body_status {
        // A HEAD answer says how long the body would be, when it is known.
        if let (true, false, None, Some(n)) = (is_head, no_body_status, length, exact) {
            write_length(out, n);
        }
        Framing::None
    } else if bad_length {
        Framing::UntilClose
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = exact {
        write_length(out, n);
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if close || framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a chunk-size line for `n` bytes.
fn write_chunk_size(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value of the current second, formatted once a second on each thread.
    static DATE: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
}

fn write_date(out: &mut Vec<u8>) {
    let now = unix_now();
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != now {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(now).unwrap_or(0));
            *cached = (now, httpdate::fmt_http_date(at));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(cached.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Writes the response. `Ok(true)`: it went out whole and framed, so the connection can
/// carry the next request; `Ok(false)`: its body broke off (the client sees it cut short, and
/// the connection must close).
// Not an `async fn`, whose future would hold the answer twice (see `Gateway::handle`).
#[allow(clippy::manual_async_fn)]
fn write_response<'a, S: AsyncWrite + Unpin>(
    io: &'a mut S,
    out: &'a mut Vec<u8>,
    guard: &'a mut Guard,
    answer: Answer,
    is_head: bool,
    close: bool,
) -> impl Future<Output = io::Result<bool>> + 'a {
    async move {
        let (parts, mut body) = answer.response.into_parts();
        out.clear();
        let extras = HeadExtras {
            raw: crate::body::raw_head(&body),
            rate: answer.rate,
            exact: body.size_hint().exact(),
            is_head,
            close,
        };
        let framing = encode_head(out, &parts, extras);
        drop(parts);
        if framing == Framing::None || (body.is_end_stream() && framing != Framing::Chunked) {
            write_all(io, out, guard).await?;
            return Ok(
                framing != Framing::UntilClose && !matches!(framing, Framing::Length(n) if n != 0)
            );
        }
        let mut sent: u64 = 0;
        let mut trailers: Option<HeaderMap> = None;
        let ended_whole = loop {
            // Take what the body has ready without waiting; wait only with nothing left to write.
            let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            let next = match polled {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    if !out.is_empty() {
                        write_all(io, out, guard).await?;
                        out.clear();
                    }
                    match next_frame(&mut body, guard).await {
                        Some(next) => next,
                        None => return Err(io::ErrorKind::TimedOut.into()),
                    }
                }
            };
            guard.touch();
            let frame: Frame<Bytes> = match next {
                None => break true,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body broke off");
                    break false;
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                    continue;
                }
            };
            if frame.is_empty() {
                continue;
            }
            sent += frame.len() as u64;
            if let Framing::Length(n) = framing {
                if sent > n {
                    tracing::debug!("response body longer than its content-length");
                    break false;
                }
            }
            if framing == Framing::Chunked {
                write_chunk_size(out, frame.len());
            }
            if out.len() + frame.len() <= COALESCE {
                out.extend_from_slice(&frame);
            } else {
                write_all(io, out, guard).await?;
                out.clear();
                write_all(io, &frame, guard).await?;
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
        };
        let whole = ended_whole
            && match framing {
                Framing::Length(n) => sent == n,
                Framing::Chunked => {
                    out.extend_from_slice(b"0\r\n");
                    for (name, value) in trailers.iter().flatten() {
                        write_header_line(out, name, value.as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    true
                }
                Framing::None | Framing::UntilClose => false,
            };
        if !out.is_empty() {
            write_all(io, out, guard).await?;
            out.clear();
        }
        Ok(whole)
    }
}

/// The body's next frame; `None` when it stays silent for the idle timeout.
async fn next_frame(
    body: &mut Body,
    guard: &mut Guard,
) -> Option<Option<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>> {
    poll_fn(|cx| {
        if let Poll::Ready(next) = Pin::new(&mut *body).poll_frame(cx) {
            return Poll::Ready(Some(next));
        }
        let deadline = guard.idle_deadline();
        if guard.poll_expired(cx, deadline).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn scanned(text: &str) -> Scan {
        scan(text.as_bytes(), &mut Vec::new(), &mut NameCache::default())
    }

    #[test]
    fn only_body_less_http_11_requests_in_origin_form_are_served_here() {
        for served in [
            "GET / HTTP/1.1\r\nhost: a\r\n\r\n",
            "DELETE /v1/x?y=1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            "HEAD / HTTP/1.1\r\nconnection: keep-alive\r\n\r\n",
        ] {
            assert!(matches!(scanned(served), Scan::Served(_)), "{served}");
        }
        for other in [
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(matches!(scanned(other), Scan::Other), "{other}");
        }
        assert!(matches!(scanned("GET / HTTP/1.1\r\nhost:"), Scan::Partial));
        match scanned("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n") {
            Scan::Served(s) => assert!(s.close),
            _ => panic!("not served"),
        }
    }

    #[test]
    fn header_names_are_remembered_per_connection_in_any_case() {
        let mut names = NameCache::default();
        let first = names.name(b"X-API-Key").unwrap();
        assert_eq!(first, "x-api-key");
        assert_eq!(names.name(b"x-api-KEY").unwrap(), "x-api-key");
        assert_eq!(names.name(b"Host").unwrap(), header::HOST);
        assert!(names.name(b"bad name").is_none());
        assert_eq!(names.0.len(), 2, "one entry per name, whatever its case");
        for i in 0..40 {
            let raw = format!("x-extra-{i}");
            assert_eq!(names.name(raw.as_bytes()).unwrap(), raw.as_str());
        }
        assert_eq!(names.0.len(), NameCache::MAX, "bounded");
    }

    /// Scans `text` and fills `req` with it; returns the head the request's slices are of.
    fn fill(text: &'static str, req: &mut Request<RequestBody>) -> Bytes {
        let mut fields = Vec::new();
        let Scan::Served(shape) = scan(text.as_bytes(), &mut fields, &mut NameCache::default())
        else {
            panic!("not served: {text}");
        };
        assert_eq!(shape.len, text.len());
        let head = Bytes::from(text);
        assert!(request(&head, shape.method, shape.target, &mut fields, req));
        head
    }

    #[test]
    fn requests_are_slices_of_the_head() {
        let mut req = Request::new(RequestBody::Empty);
        let head = fill(
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nEmpty:\r\n\r\n",
            &mut req,
        );
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["x-api-key"], "k");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["empty"], "");
        // Cleared for the next request on the connection: nothing of this one is left.
        clear(&mut req);
        drop(head);
        assert!(req.headers().is_empty() && req.uri() == "/");
        fill("HEAD /c HTTP/1.1\r\nUser-Agent: u\r\n\r\n", &mut req);
        assert_eq!((req.method(), req.uri().path()), (&Method::HEAD, "/c"));
        assert_eq!(req.headers().len(), 1);
        assert_eq!(req.headers()["user-agent"], "u");
    }

    fn head_of(resp: Response<Body>, is_head: bool, close: bool) -> (String, Framing) {
        let mut out = Vec::new();
        let (parts, body) = resp.into_parts();
        let extras = HeadExtras {
            raw: None,
            rate: None,
            exact: body.size_hint().exact(),
            is_head,
            close,
        };
        let framing = encode_head(&mut out, &parts, extras);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_frame_their_bodies() {
        let (text, framing) = head_of(Response::new(crate::body::full("hello")), false, false);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 5\r\n") && text.contains("date: "));
        assert!(text.ends_with("\r\n\r\n") && !text.contains("connection"));
        assert_eq!(framing, Framing::Length(5));

        let (text, framing) = head_of(Response::new(crate::body::full("hello")), true, true);
        assert!(text.contains("content-length: 5\r\n") && text.contains("connection: close"));
        assert_eq!(framing, Framing::None);

        let mut resp = Response::new(crate::body::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut()
            .insert(header::DATE, HeaderValue::from_static("x"));
        let (text, framing) = head_of(resp, false, false);
        assert_eq!(text, "HTTP/1.1 304 Not Modified\r\ndate: x\r\n\r\n");
        assert_eq!(framing, Framing::None);

        let mut resp = Response::new(crate::body::full("hello"));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert_eq!(head_of(resp, false, false).1, Framing::Length(5));
        let mut resp = Response::new(crate::body::full("hello"));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("4, 5"));
        let (text, framing) = head_of(resp, false, false);
        assert_eq!(framing, Framing::UntilClose);
        assert!(text.contains("connection: close"));
    }

    #[test]
    fn chunk_sizes_are_hex_and_lengths_decimal() {
        for n in [0usize, 9, 10, 255, 4096, 1 << 40] {
            let mut out = Vec::new();
            write_chunk_size(&mut out, n);
            assert_eq!(out, format!("{n:x}\r\n").as_bytes());
        }
        assert_eq!(parse_length(b"12"), Some(12));
        assert_eq!(parse_length(b"1 2"), None);
        assert_eq!(parse_length(b""), None);
    }
}
