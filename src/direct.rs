//! A client connection's own keep-alive connection to a plain-HTTP upstream, polled by the
//! client connection's task: a request goes upstream without a pool lookup and without a
//! hand-off to another task (profiled: the pooled client's per-request cost was the largest
//! single item after the HTTP codec). `https://` upstreams, upgrade requests, concurrent
//! HTTP/2 streams and connections beyond [`MAX_DIRECT`] use the shared pool instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::GatewayError;
use crate::h1upstream::RawConn;
use crate::proxy::UpstreamBody;

/// At most this many direct upstream connections per process; requests of further client
/// connections share the pool (which keeps upstream connection counts bounded when many
/// clients hold idle keep-alive connections).
pub const MAX_DIRECT: usize = 4096;

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// The number of direct upstream connections open now.
pub fn open_count() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Holds one place under [`MAX_DIRECT`] until dropped.
pub struct Permit;

impl Permit {
    /// A place, unless [`MAX_DIRECT`] are taken.
    pub fn acquire() -> Option<Permit> {
        OPEN.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < MAX_DIRECT).then_some(n + 1)
        })
        .ok()
        .map(|_| Permit)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `host:port` to connect to (an IPv6 literal keeps its brackets, as `SocketAddr` parsing
/// wants them; a name is resolved).
fn connect_address(authority: &Authority) -> String {
    format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    )
}

/// Opens a TCP connection to a plain-HTTP upstream within `connect_timeout`, Nagle off
/// (`502` when refused, `504` when it takes too long).
pub async fn open(
    target: &Authority,
    connect_timeout: Duration,
) -> Result<TcpStream, GatewayError> {
    let connecting = TcpStream::connect(connect_address(target));
    let stream = match tokio::time::timeout(connect_timeout, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(upstream = %target, error = %e, "upstream connect failed");
            return Err(GatewayError::UpstreamUnavailable);
        }
        Err(_) => {
            tracing::debug!(upstream = %target, "upstream connect timed out");
            return Err(GatewayError::UpstreamTimeout);
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A request sender on a direct connection.
pub type Sender = SendRequest<UpstreamBody>;

/// A sender lent out for one request.
pub struct Lease {
    /// Sends the request.
    pub sender: Sender,
    /// False for a one-off connection (not the slot's): it is not given back.
    held: bool,
}

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
struct Slot {
    /// The upstream the connection below talks to.
    target: Option<Authority>,
    /// Its sender while idle (taken out while a request uses it).
    sender: Option<Sender>,
    /// The connection itself, polled by the client connection's task.
    driver: Option<Driver>,
    /// That task's waker, to have a newly opened connection polled.
    waker: Option<Waker>,
    /// Idle connections `h1upstream` speaks on (body-less requests), one per upstream this
    /// client connection's requests went to, at most [`MAX_RAW_IDLE`], oldest first.
    // Boxed: a connection moves between here and each request that borrows it.
    #[allow(clippy::vec_box)]
    raw: Vec<Box<RawConn>>,
    /// True while a request has it (or is opening one).
    raw_out: bool,
}

/// `a == b` for upstream authorities, first by address: a connection's target is a clone of
/// its deployment's (sharing its bytes), so that is nearly always the answer, and
/// `Authority`'s own comparison ignores ASCII case byte by byte (~250 instructions per
/// request in the load benchmark).
fn same_target(a: &Authority, b: &Authority) -> bool {
    std::ptr::eq(a.as_str(), b.as_str()) || a == b
}

/// Idle `h1upstream` connections a client connection keeps, to as many upstreams: its
/// requests may go to several deployments (a load balancer's connection carries anybody's),
/// and alternating between two must not reconnect every time.
pub const MAX_RAW_IDLE: usize = 4;

/// What [`DirectUpstream::take_raw`] found.
pub enum RawTake {
    /// The idle connection, lent to the caller.
    Idle(Box<RawConn>),
    /// None yet: the caller may open one (and hands it back the same way).
    Absent,
    /// Another request of this client connection uses it.
    Busy,
}

/// One client connection's direct upstream connection (at most one at a time).
#[derive(Default)]
pub struct DirectUpstream {
    slot: Mutex<Slot>,
}

impl DirectUpstream {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The idle open connection to `target`, taken out for one request; hand it back with
    /// [`DirectUpstream::give_back`] once the response head has arrived.
    pub fn take(&self, target: &Authority) -> Option<Lease> {
        let mut slot = self.lock();
        if !slot.target.as_ref().is_some_and(|t| same_target(t, target)) {
            return None;
        }
        let sender = slot.sender.as_ref()?;
        if sender.is_closed() {
            // The upstream closed it (keep-alive limit, idle timeout): forget it now so that
            // `connect` does not take the slot for busy.
            slot.sender = None;
            slot.driver = None;
            slot.target = None;
            return None;
        }
        if !sender.is_ready() {
            // A response body is still arriving on it (another HTTP/2 stream's).
            return None;
        }
        slot.sender
            .take()
            .map(|sender| Lease { sender, held: true })
    }

    /// Lends out the idle `h1upstream` connection to `target`. Whatever is lent, including
    /// `Absent`, is answered by one [`DirectUpstream::return_raw`].
    pub fn take_raw(&self, target: &Authority) -> RawTake {
        let mut slot = self.lock();
        if slot.raw_out {
            return RawTake::Busy;
        }
        slot.raw_out = true;
        match slot
            .raw
            .iter()
            .position(|c| same_target(c.target(), target))
        {
            Some(i) => RawTake::Idle(slot.raw.remove(i)),
            None => RawTake::Absent,
        }
    }

    /// Ends a [`DirectUpstream::take_raw`] loan: `conn` is kept for the next request (`None`:
    /// it closed, or cannot carry another request).
    pub fn return_raw(&self, conn: Option<Box<RawConn>>) {
        let mut slot = self.lock();
        slot.raw_out = false;
        if let Some(conn) = conn {
            if slot.raw.len() >= MAX_RAW_IDLE {
                // The least recently used goes (and closes).
                slot.raw.remove(0);
            }
            slot.raw.push(conn);
        }
    }

    /// True while a request uses the held connection: lent out, or its response body is
    /// still arriving (the sender comes back with the response head).
    fn busy(slot: &Slot) -> bool {
        slot.driver.is_some()
            && slot
                .sender
                .as_ref()
                .is_none_or(|s| !s.is_ready() && !s.is_closed())
    }

    /// Returns a sender taken with `take` (or made by `connect`) for the next request.
    pub fn give_back(&self, target: &Authority, lease: Lease) {
        if !lease.held || lease.sender.is_closed() {
            return;
        }
        let mut slot = self.lock();
        if slot.target.as_ref().is_some_and(|t| same_target(t, target)) && slot.sender.is_none() {
            slot.sender = Some(lease.sender);
        }
    }

    /// Opens a connection to `target`, replacing the idle one held (which closes). `Ok(None)`
    /// when the held one is busy (a concurrent HTTP/2 stream) or the process already holds
    /// [`MAX_DIRECT`] direct connections: the caller uses the pool.
    pub async fn connect(
        &self,
        target: &Authority,
        connect_timeout: Duration,
    ) -> Result<Option<Lease>, GatewayError> {
        if Self::busy(&self.lock()) {
            return Ok(None);
        }
        let Some(permit) = Permit::acquire() else {
            return Ok(None);
        };
        let stream = open(target, connect_timeout).await?;
        let (sender, connection) = Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                tracing::debug!(upstream = %target, error = %e, "upstream handshake failed");
                GatewayError::UpstreamUnavailable
            })?;
        let driver: Driver = Box::pin(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "direct upstream connection ended with an error");
            }
        });
        let mut slot = self.lock();
        if Self::busy(&slot) {
            // Another stream of this client connection opened one meanwhile and uses it;
            // this one serves a single request on its own task.
            drop(slot);
            tokio::spawn(driver);
            return Ok(Some(Lease {
                sender,
                held: false,
            }));
        }
        slot.target = Some(target.clone());
        slot.sender = None;
        slot.driver = Some(driver);
        if let Some(w) = &slot.waker {
            w.wake_by_ref();
        }
        Ok(Some(Lease { sender, held: true }))
    }

    /// Polls the held connection (reads responses, writes requests, notices a close). The
    /// client connection's task calls this each time it is woken.
    pub fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut slot = self.lock();
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        if let Some(driver) = slot.driver.as_mut() {
            if let Poll::Ready(()) = driver.as_mut().poll(cx) {
                slot.driver = None;
                slot.sender = None;
                slot.target = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn connect_addresses_keep_ipv6_brackets() {
        for (authority, addr) in [
            ("[::1]:8080", "[::1]:8080"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("backend", "backend:80"),
        ] {
            assert_eq!(super::connect_address(&authority.parse().unwrap()), addr);
        }
    }

    #[test]
    fn targets_match_by_address_or_by_value() {
        use http::uri::Authority;
        let a: Authority = "127.0.0.1:9000".parse().unwrap();
        assert!(super::same_target(&a, &a.clone()));
        // Another copy of the same authority (a reloaded config), in another case.
        assert!(super::same_target(&a, &"127.0.0.1:9000".parse().unwrap()));
        let b: Authority = "Backend:80".parse().unwrap();
        assert!(super::same_target(&b, &"backend:80".parse().unwrap()));
        assert!(!super::same_target(&a, &"127.0.0.1:9001".parse().unwrap()));
        assert!(!super::same_target(&a, &b));
    }
}
