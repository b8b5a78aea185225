//! keygate's own HTTP/1.1 exchange with a plain-HTTP upstream for the commonest request:
//! one without a body (GET, HEAD, DELETE, …). The request head is written straight from the
//! rewritten header map, the response head is parsed with `httparse`, and the response body
//! reads itself off the connection as the client side asks for it, handing the connection
//! back to its client connection's [`DirectUpstream`] when it ends. No connection task, no
//! channels: in the load profile hyper's client (its dispatch channels, connection task and
//! codec) was over a third of the user-space instructions per request.
//!
//! Everything else (request bodies, upgrades, `https://`, concurrent HTTP/2 streams) keeps
//! going through hyper (`proxy::forward`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::Authority;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version,
};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::LazyTimer;
use crate::direct::{DirectUpstream, Permit, RawTake};
use crate::error::GatewayError;
use crate::proxy::UpstreamTarget;

/// Most header lines a response head may carry (hyper's client default).
const MAX_HEADERS: usize = 100;
/// Largest response head, and largest buffered read (hyper's client default).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// First read size of a connection; doubled while reads fill it, up to [`MAX_READ`].
const INITIAL_READ: usize = 8 * 1024;
/// Largest single read.
const MAX_READ: usize = 256 * 1024;
/// Longest chunk-size line (extensions included) and largest trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// An upstream connection this module speaks HTTP/1.1 on.
pub struct RawConn {
    stream: TcpStream,
    /// The upstream it is connected to.
    target: Authority,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// Size of the next read.
    read_size: usize,
    /// The request head being written (kept for its capacity).
    head: Vec<u8>,
    /// Bounds the wait for response heads (kept from request to request).
    timer: Option<LazyTimer>,
    _permit: Permit,
}

impl RawConn {
    /// The upstream this connection goes to.
    pub fn target(&self) -> &Authority {
        &self.target
    }

    /// False when the upstream has closed the idle connection (or sent bytes nobody asked
    /// for): the reactor's readiness says so without a system call in the common case.
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    fn reserve_read(&mut self) {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
    }

    /// Notes a read of `n` bytes: a read that filled what was offered asks for a larger one.
    fn grew(&mut self, n: usize, offered: usize) -> usize {
        if n >= offered && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        n
    }

    /// Reads more into `buf` (`Ok(0)` at the end of the stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.len() >= MAX_HEAD {
            // Only a parser that cannot make progress leaves this much unconsumed.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "upstream framing line too long",
            )));
        }
        self.reserve_read();
        // (Before reads went through `AsyncRead`, the load's `strace` counted one "nothing
        // yet" system call per request.)
        let offered = self.read_size.min(self.buf.capacity() - self.buf.len());
        let n = ready!(poll_read_into(&mut self.stream, cx, &mut self.buf, offered))?;
        Poll::Ready(Ok(self.grew(n, offered)))
    }

    /// Writes the request head and reads the final response head.
    async fn round_trip(&mut self, request: &RequestHead<'_>) -> Result<Head, Failure> {
        self.head.clear();
        request.encode(&mut self.head);
        self.stream
            .write_all(&self.head)
            .await
            .map_err(Failure::Unseen)?;
        let mut answered = false;
        loop {
            // Nothing read yet (the usual first pass): nothing to parse.
            let parsed = if self.buf.is_empty() {
                None
            } else {
                parse_head(&mut self.buf)?
            };
            if let Some(head) = parsed {
                answered = true;
                if head.status.is_informational() {
                    // 100 Continue, 103 Early Hints…: the final answer follows. (101 is for
                    // upgrades, which never come this way: see `Head::framing`.)
                    if head.status != StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Failure::Broken("response head too large".into()));
            }
            let got = !self.buf.is_empty() || answered;
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if !got => {
                    return Err(Failure::Unseen(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => return Err(Failure::Broken("upstream closed mid-head".into())),
                Ok(_) => {}
                Err(e) if !got => return Err(Failure::Unseen(e)),
                Err(e) => return Err(Failure::Broken(e.to_string())),
            }
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
enum Failure {
    /// Nothing came back (the upstream may never have seen the request): a reused
    /// connection's request can be sent again on a fresh one.
    Unseen(io::Error),
    /// The upstream answered something unusable, or broke off.
    Broken(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unseen(e) => write!(f, "no answer: {e}"),
            Failure::Broken(what) => f.write_str(what),
        }
    }
}

/// The request head to write.
struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    host: &'a HeaderValue,
    headers: &'a HeaderMap,
    /// Headers replaced or added on the way (written here, not put in a header map first).
    edits: &'a dyn HeadEdits,
}

/// Changes to a request's headers applied while its head is written.
pub trait HeadEdits: Send + Sync {
    /// True for a field of the map not to write (it is replaced or removed).
    fn skips(&self, name: &HeaderName, value: &HeaderValue) -> bool;
    /// Writes further header lines (`name: value\r\n`).
    fn write(&self, out: &mut Vec<u8>);
}

/// No changes.
impl HeadEdits for () {
    fn skips(&self, name: &HeaderName, _: &HeaderValue) -> bool {
        *name == header::HOST
    }
    fn write(&self, _: &mut Vec<u8>) {}
}

/// Appends the header line `name: value\r\n`.
pub fn write_header_line(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    let name = name.as_str().as_bytes();
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl RequestHead<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        let target = self.uri.path_and_query().map_or("/", |pq| pq.as_str());
        out.extend_from_slice(if target.is_empty() {
            b"/"
        } else {
            target.as_bytes()
        });
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in self.headers {
            if !self.edits.skips(name, value) {
                write_header_line(out, name, value.as_bytes());
            }
        }
        self.edits.write(out);
        // As hyper does: methods that normally carry a body say it is empty (some servers
        // answer 411 otherwise).
        let bodied = matches!(*self.method, Method::POST | Method::PUT | Method::PATCH);
        if bodied && !self.headers.contains_key(header::CONTENT_LENGTH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    /// The fields to pass on, unparsed.
    raw: RawHead,
    /// The `Content-Length` (`Err`: not a number, or differing values).
    length: Result<Option<u64>, &'static str>,
    /// `Content-Length` was sent beside `Transfer-Encoding` (and dropped).
    length_beside_chunked: bool,
    /// `Connection: close` was sent.
    close: bool,
    /// `Connection: keep-alive` was sent.
    keep_alive: bool,
    /// The last `Transfer-Encoding` field's final coding is `chunked` (`None`: no field).
    chunked: Option<bool>,
}

/// A response head's fields as they go on to the client: the upstream's header lines (the
/// names as sent), without the hop-by-hop ones (RFC 9110 §7.6.1: `Connection` and what it
/// names, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`…) and without a `Content-Length`
/// that `Transfer-Encoding` overrides. keygate's own server path writes them out as they
/// are; hyper's puts them in a header map first ([`RawHead::append_to`]).
#[derive(Debug, Clone)]
pub struct RawHead {
    /// `name: value\r\n` lines.
    lines: Bytes,
    /// The `Content-Length` among them.
    pub length: Option<u64>,
    /// A `Date` is among them.
    pub dated: bool,
}

impl RawHead {
    /// The header lines, each ending in CRLF.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Adds the fields to a header map (values are slices of the lines).
    pub fn append_to(self, headers: &mut HeaderMap) {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut terminated = BytesMut::with_capacity(self.lines.len() + 2);
        terminated.extend_from_slice(&self.lines);
        terminated.extend_from_slice(b"\r\n");
        let text = terminated.freeze();
        let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(&text, &mut raw)
        else {
            // Written by `parse_head` from fields httparse accepted: cannot happen.
            return;
        };
        headers.reserve(fields.len());
        for f in fields.iter() {
            // SAFETY (of the bytes): httparse accepted them as a field value, which is what
            // `HeaderValue` allows.
            let value = unsafe {
                HeaderValue::from_maybe_shared_unchecked(text.slice(span_in(&text, f.value)))
            };
            if let Ok(name) = HeaderName::from_bytes(f.name.as_bytes()) {
                headers.append(name, value);
            }
        }
    }
}

/// Where `part`, a slice httparse took from `whole`, lies in it (`0..0` for an empty part,
/// which need not point into `whole`).
pub fn span_in(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    if part.is_empty() || start > whole.len() {
        0..0
    } else {
        start..start + part.len()
    }
}

/// Reads at most `max` bytes from `io` into `buf`'s spare capacity (`Ok(0)` at the end of
/// the stream). Through `AsyncRead`, so that a read which drains the socket clears its
/// readiness and the next wait costs no system call.
pub fn poll_read_into<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    max: usize,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let offered = max.min(spare.len());
    let mut rb = tokio::io::ReadBuf::uninit(&mut spare[..offered]);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: the reader initialised (filled) the first `n` spare bytes.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// True for a hop-by-hop field name (RFC 9110 §7.6.1), in any case.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    // Most names are ruled out by their length alone. (Tried: a `match` on the length
    // naming each length's candidates: more instructions and a jump table's mispredictions.)
    matches!(name.len(), 2 | 7 | 10 | 16..=19) && NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Parses a response head off the front of `buf` (`None`: incomplete).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Failure> {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        &buf[..],
        &mut raw,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failure::Broken(format!("malformed response head: {e}"))),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Failure::Broken("bad status code".into()))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // First the fields that say how this hop works: they decide what else is passed on.
    let (mut close, mut keep_alive, mut chunked) = (false, false, None);
    let mut named: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let mut lines = Vec::with_capacity(len);
    let mut length = Ok(None);
    let mut length_beside_chunked = false;
    let mut dated = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if is_hop_by_hop(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if chunked.is_some() {
                // The final coding decides; a length beside it is not passed on.
                length_beside_chunked = true;
                continue;
            }
            length = length.and_then(|found| merge_length(found, h.value));
        } else if name.eq_ignore_ascii_case(b"date") {
            dated = true;
        }
        lines.extend_from_slice(name);
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(h.value);
        lines.extend_from_slice(b"\r\n");
    }
    buf.advance(len);
    Ok(Some(Head {
        status,
        version,
        raw: RawHead {
            lines: Bytes::from(lines),
            length: length.ok().flatten(),
            dated,
        },
        length,
        length_beside_chunked,
        close,
        keep_alive,
        chunked,
    }))
}

/// `found` with one more `Content-Length` field (`"5, 5"` lists are allowed: RFC 9110
/// §8.6); differing or non-numeric values are an error.
pub fn merge_length(mut found: Option<u64>, value: &[u8]) -> Result<Option<u64>, &'static str> {
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let n = std::str::from_utf8(part)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("bad content-length")?;
        if found.is_some_and(|f| f != n) {
            return Err("conflicting content-length values");
        }
        found = Some(n);
    }
    Ok(found)
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    /// The body's framing, and whether the connection can carry another request after it.
    fn framing(&mut self, method: &Method) -> Result<(Framing, bool), Failure> {
        if self.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Failure::Broken(
                "101 to a request that asked no upgrade".into(),
            ));
        }
        let mut keep_alive = !self.close && (self.version == Version::HTTP_11 || self.keep_alive);
        let framing = if *method == Method::HEAD
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else if let Some(chunked) = self.chunked {
            // The final coding decides; a length beside it is not to be trusted.
            if self.length_beside_chunked {
                keep_alive = false;
            }
            if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        } else {
            match self.length.map_err(|e| Failure::Broken(e.into()))? {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
        if framing == Framing::UntilClose {
            keep_alive = false;
        }
        Ok((framing, keep_alive))
    }
}

/// Methods a request may be repeated with (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A direct connection lent to one exchange; gives it back (or lets it close) when dropped.
struct Checkout {
    home: Arc<DirectUpstream>,
    conn: Option<Box<RawConn>>,
    /// The connection may carry another request: set only once a body has ended as framed
    /// (a body dropped half-read leaves the rest of it on the wire).
    reusable: bool,
    /// Already handed back (the slot may since have been lent to another request).
    released: bool,
}

impl Checkout {
    /// Hands the connection back (when reusable) or closes it; only the first call counts.
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let conn = self
            .conn
            .take()
            .filter(|c| self.reusable && c.buf.is_empty())
            .map(|mut c| {
                // An idle connection keeps a small buffer: a large body grew it, and up to
                // `MAX_DIRECT` connections may sit idle.
                if c.buf.capacity() > 4 * INITIAL_READ {
                    c.buf = BytesMut::new();
                }
                c.read_size = INITIAL_READ;
                c
            });
        self.home.return_raw(conn);
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        self.release();
    }
}

/// Opens a connection for this module, under the process-wide bound on direct connections.
async fn connect(target: &UpstreamTarget) -> Result<Option<Box<RawConn>>, GatewayError> {
    let Some(permit) = Permit::acquire() else {
        return Ok(None);
    };
    let authority = &target.authority;
    let stream = crate::direct::open(authority, target.connect_timeout).await?;
    Ok(Some(Box::new(RawConn {
        stream,
        target: authority.clone(),
        buf: BytesMut::new(),
        read_size: INITIAL_READ,
        head: Vec::with_capacity(512),
        timer: None,
        _permit: permit,
    })))
}

/// Sends a body-less request (origin-form `uri`, no `Host` in `headers`) on the client
/// connection's own upstream connection and returns the response, its body still on the
/// wire. `Ok(None)`: no direct connection is to be had (one is in use by a concurrent
/// HTTP/2 stream, or the process holds its maximum); the caller sends it another way.
/// `timeout` bounds the wait for the response head.
pub async fn exchange(
    direct: &Arc<DirectUpstream>,
    target: &UpstreamTarget,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    edits: &dyn HeadEdits,
    timeout: Duration,
) -> Result<Option<Response<RawBody>>, GatewayError> {
    let (conn, mut reused) = match direct.take_raw(&target.authority) {
        RawTake::Busy => return Ok(None),
        RawTake::Idle(conn) => (Some(conn), true),
        RawTake::Absent => (None, false),
    };
    let mut checkout = Checkout {
        home: direct.clone(),
        conn,
        reusable: false,
        released: false,
    };
    let request = RequestHead {
        method,
        uri,
        host: &target.host,
        headers,
        edits,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !checkout.conn.as_mut().is_some_and(|c| c.still_open()) {
            reused = false;
            // Boxed: a new connection is the rare case, and its future would otherwise
            // enlarge (and make costlier to move) every request's.
            checkout.conn = match Box::pin(connect(target)).await? {
                Some(conn) => Some(conn),
                None => return Ok(None),
            };
        }
        let Some(conn) = checkout.conn.as_mut() else {
            return Ok(None);
        };
        // The connection's own timer, re-used from request to request.
        let mut timer = conn
            .timer
            .take()
            .unwrap_or_else(|| LazyTimer::new(deadline));
        timer.disarm();
        let answer = {
            let round_trip = conn.round_trip(&request);
            tokio::pin!(round_trip);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = round_trip.as_mut().poll(cx) {
                    return Poll::Ready(Ok(r));
                }
                match timer.poll_expired(cx, deadline) {
                    Poll::Ready(()) => Poll::Ready(Err(())),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        conn.timer = Some(timer);
        let failure = match answer {
            Err(_) => {
                tracing::debug!(upstream = %target.authority, "no response head in time");
                return Err(GatewayError::UpstreamTimeout);
            }
            Ok(Ok(mut head)) => {
                let (framing, keep_alive) = match head.framing(method) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(upstream = %target.authority, error = %e, "unusable upstream response");
                        return Err(GatewayError::UpstreamUnavailable);
                    }
                };
                let body = RawBody::new(checkout, framing, keep_alive, head.raw);
                // The header map stays empty: the fields travel unparsed with the body. The
                // upstream's version decided this hop's keep-alive; the client's hop is
                // framed by the server side (an HTTP/1.0 version here would close it).
                let mut resp = Response::new(body);
                *resp.status_mut() = head.status;
                return Ok(Some(resp));
            }
            Ok(Err(f)) => f,
        };
        checkout.conn = None;
        match failure {
            // The kept-alive connection was closed under us before anything came back: the
            // upstream may never have seen the request; once more on a fresh connection.
            Failure::Unseen(_) if reused && idempotent(method) => continue,
            f => {
                tracing::debug!(upstream = %target.authority, error = %f, "upstream request failed");
                return Err(GatewayError::UpstreamUnavailable);
            }
        }
    }
}

/// What a chunked body that breaks off says.
const CLOSED_IN_CHUNKS: &str = "upstream closed inside a chunked body";

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then the final CRLF.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// A response body read straight off its upstream connection, with its response's fields.
pub struct RawBody {
    /// The response's fields, until a server path takes them.
    head: Option<RawHead>,
    checkout: Checkout,
    state: State,
    /// The upstream allows another request on the connection after this body.
    keep_alive: bool,
}

impl RawBody {
    fn new(checkout: Checkout, framing: Framing, keep_alive: bool, head: RawHead) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = RawBody {
            head: Some(head),
            checkout,
            state,
            keep_alive,
        };
        if state == State::Done {
            // Nothing to read: the connection is free for the next request right away.
            body.finish();
        }
        body
    }

    /// The response's fields (until taken).
    pub fn head(&self) -> Option<&RawHead> {
        self.head.as_ref()
    }

    /// Takes the response's fields.
    pub fn take_head(&mut self) -> Option<RawHead> {
        self.head.take()
    }

    /// The body ended as framed: the connection goes back for the next request (when the
    /// upstream keeps it alive).
    fn finish(&mut self) {
        self.state = State::Done;
        self.checkout.reusable = self.keep_alive;
        self.checkout.release();
    }

    /// The body broke off: the connection closes.
    fn fail(&mut self, what: impl Into<String>) -> io::Error {
        self.state = State::Done;
        self.checkout.reusable = false;
        self.checkout.release();
        io::Error::new(io::ErrorKind::InvalidData, what.into())
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let Some(conn) = self.checkout.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::Chunked(Chunk::Data(left)) => {
                    if conn.buf.is_empty() {
                        let closed = "upstream closed before the body ended";
                        if let Some(err) = ready!(self.fill_or_fail(cx, closed)) {
                            return Poll::Ready(Some(Err(err)));
                        }
                        continue;
                    }
                    let n = left.min(conn.buf.len() as u64) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    match self.state {
                        State::Length(_) if left == 0 => self.finish(),
                        State::Length(_) => self.state = State::Length(left),
                        _ if left == 0 => self.state = State::Chunked(Chunk::DataEnd),
                        _ => self.state = State::Chunked(Chunk::Data(left)),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            // The end of this body is the end of the connection.
                            self.keep_alive = false;
                            self.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(self.fail(e.to_string())))),
                    }
                }
                State::Chunked(Chunk::Size) => match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.buf.advance(used);
                        self.state = State::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() > MAX_CHUNK_LINE => {
                        return Poll::Ready(Some(Err(self.fail("chunk-size line too long"))));
                    }
                    Ok(httparse::Status::Partial) => {
                        if let Some(err) = ready!(self.fill_or_fail(cx, CLOSED_IN_CHUNKS)) {
                            return Poll::Ready(Some(Err(err)));
                        }
                    }
                    Err(_) => return Poll::Ready(Some(Err(self.fail("bad chunk size")))),
                },
                State::Chunked(Chunk::DataEnd) => {
                    if conn.buf.len() >= 2 {
                        if &conn.buf[..2] != b"\r\n" {
                            return Poll::Ready(Some(Err(self.fail("chunk not ended by CRLF"))));
                        }
                        conn.buf.advance(2);
                        self.state = State::Chunked(Chunk::Size);
                    } else if let Some(err) = ready!(self.fill_or_fail(cx, CLOSED_IN_CHUNKS)) {
                        return Poll::Ready(Some(Err(err)));
                    }
                }
                State::Chunked(Chunk::Trailers) => {
                    let mut raw = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(&conn.buf, &mut raw) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for f in fields {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            conn.buf.advance(used);
                            self.finish();
                            if trailers.is_empty() {
                                return Poll::Ready(None);
                            }
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if conn.buf.len() > MAX_TRAILERS => {
                            return Poll::Ready(Some(Err(self.fail("trailers too large"))));
                        }
                        Ok(httparse::Status::Partial) => {
                            if let Some(err) = ready!(self.fill_or_fail(cx, CLOSED_IN_CHUNKS)) {
                                return Poll::Ready(Some(Err(err)));
                            }
                        }
                        Err(_) => return Poll::Ready(Some(Err(self.fail("bad trailers")))),
                    }
                }
            }
        }
    }

    /// Reads more for a reader that needs it: `Pending` while waiting, `Some(error)` when
    /// the connection failed or ended (`closed` says where; the body is then over).
    fn fill_or_fail(&mut self, cx: &mut Context<'_>, closed: &str) -> Poll<Option<io::Error>> {
        let Some(conn) = self.checkout.conn.as_mut() else {
            return Poll::Ready(Some(io::ErrorKind::NotConnected.into()));
        };
        Poll::Ready(match ready!(conn.poll_fill(cx)) {
            Ok(0) => Some(self.fail(closed)),
            Ok(_) => None,
            Err(e) => Some(self.fail(e.to_string())),
        })
    }
}

impl http_body::Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut().step(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                true,
            ),
        ];
        for (text, framing, keep_alive) in cases {
            let mut h = head(text);
            assert_eq!(h.framing(&get).unwrap(), (framing, keep_alive), "{text:?}");
        }
        let mut h = head("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n");
        assert_eq!(h.framing(&Method::HEAD).unwrap().0, Framing::Empty);
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(head(bad).framing(&get).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hop_by_hop_names_are_known_in_any_case() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
        ] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
            assert!(is_hop_by_hop(name.to_uppercase().as_bytes()), "{name}");
        }
        // Same lengths as hop-by-hop names, and a prefix of one.
        for name in [
            "tx",
            "content",
            "user-agent",
            "proxy-connectio",
            "proxy-authorizatio",
            "x-proxy-connectio",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_fields_are_read_not_kept() {
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
             transfer-encoding: gzip, chunked\r\nx-up: 1\r\n\r\n",
        );
        assert_eq!(
            (h.keep_alive, h.close, h.chunked),
            (true, false, Some(true))
        );
        assert_eq!(h.raw.lines(), b"x-up: 1\r\n");
        // Fields the Connection field names go too, and so do Upgrade and Trailer.
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nx-hop: 1\r\nUpgrade: h2c\r\n\
             Trailer: x-t\r\nX-Kept: 2\r\nDate: d\r\n\r\n",
        );
        assert!(h.close && h.raw.dated);
        assert_eq!(h.raw.lines(), b"X-Kept: 2\r\nDate: d\r\n");
        // A length beside Transfer-Encoding is not passed on.
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(h.raw.lines().is_empty() && h.raw.length.is_none());
    }

    #[test]
    fn head_fields_reach_a_header_map_and_partial_heads_wait() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: 1\r\nx-a: 2\r\n"[..]);
        assert!(parse_head(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\r\nbody");
        let h = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::OK);
        let mut map = HeaderMap::new();
        h.raw.append_to(&mut map);
        let values: Vec<_> = map.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"body");
        let mut junk = BytesMut::from(&b"FOO\r\n\r\n"[..]);
        assert!(parse_head(&mut junk).is_err());
    }

    /// Drops `x-drop`, adds `x-extra: 1`.
    struct Extra;

    impl HeadEdits for Extra {
        fn skips(&self, name: &HeaderName, _: &HeaderValue) -> bool {
            name.as_str() == "x-drop"
        }
        fn write(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"x-extra: 1\r\n");
        }
    }

    #[test]
    fn request_head_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert("x-keygate-key-id", HeaderValue::from_static("key_1"));
        headers.insert("x-drop", HeaderValue::from_static("1"));
        let uri: Uri = "/a/b?c=1".parse().unwrap();
        let host = HeaderValue::from_static("up:8080");
        let mut out = Vec::new();
        RequestHead {
            method: &Method::GET,
            uri: &uri,
            host: &host,
            headers: &headers,
            edits: &Extra,
        }
        .encode(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?c=1 HTTP/1.1\r\nhost: up:8080\r\nx-keygate-key-id: key_1\r\nx-extra: 1\r\n\r\n"
        );
        let mut out = Vec::new();
        RequestHead {
            method: &Method::POST,
            uri: &uri,
            host: &host,
            headers: &HeaderMap::new(),
            edits: &(),
        }
        .encode(&mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("content-length: 0\r\n\r\n"));
    }
}
