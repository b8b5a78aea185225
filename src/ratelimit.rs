//! Rate limits: per-key GCRA limiters (governor, lock-free) and the failed-authentication
//! limiter per client IP.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::units::Limit;

type KeyLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;
type IpLimiter = RateLimiter<IpAddr, DashMapStateStore<IpAddr>, DefaultClock>;

/// `N/period` with a burst of N as a governor quota.
fn quota(limit: Limit) -> Quota {
    let n = NonZeroU32::new(limit.requests).unwrap_or(NonZeroU32::MIN);
    let per_cell = (limit.period / n.get()).max(Duration::from_nanos(1));
    Quota::with_period(per_cell).map_or_else(|| Quota::per_second(n), |q| q.allow_burst(n))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No limit applies.
    Unlimited,
    /// Allowed; the numbers for the `RateLimit-*` headers.
    Allowed {
        /// Requests per window.
        limit: u32,
        /// Left after this request.
        remaining: u32,
        /// Seconds until the full limit is available again.
        reset: u64,
        /// Window length in seconds.
        window: u64,
    },
    /// Refused.
    Denied {
        /// Requests per window.
        limit: u32,
        /// Seconds until a request will pass.
        retry_after: u64,
        /// Seconds until the full limit is available again.
        reset: u64,
        /// Window length in seconds.
        window: u64,
    },
}

/// A limiter made for one limit.
pub struct Slot {
    limit: Limit,
    limiter: KeyLimiter,
    /// Time per request (`period / requests`) and the window in whole seconds, worked out
    /// once: divisions cost more than the rest of the check.
    per_cell: Duration,
    window: u64,
}

impl Slot {
    fn new(limit: Limit, clock: &DefaultClock) -> Self {
        Slot {
            limit,
            limiter: RateLimiter::direct_with_clock(quota(limit), clock.clone()).with_middleware(),
            per_cell: limit.period / limit.requests.max(1),
            window: ceil_secs(limit.period),
        }
    }
}

/// A key's limiter (in its `keystate::KeyState`): made on the key's first limited request and
/// replaced when its limit changes (key update or config reload). The first one sits inline
/// and is read with one load: most keys never change limit, and their requests then follow
/// no pointer and go through no `ArcSwap` protocol (each was a stall per request with many
/// keys). Once the limit changes, the first is retired for good and the current limiter
/// lives behind `changed`.
#[derive(Default)]
pub struct LimiterCell {
    first: OnceLock<Slot>,
    /// Set once the key's limit has changed away from the first limiter's.
    first_retired: AtomicBool,
    changed: ArcSwapOption<Slot>,
}

/// Decides per-key limits; the limiter state itself lives in each key's [`LimiterCell`].
#[derive(Default)]
pub struct KeyLimits {
    clock: DefaultClock,
}

impl KeyLimits {
    /// New.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request against `limit` with the key's limiter in `cell`.
    #[inline]
    pub fn check(&self, cell: &LimiterCell, limit: Option<Limit>) -> Decision {
        let Some(limit) = limit else {
            return Decision::Unlimited;
        };
        if !cell.first_retired.load(Ordering::Acquire) {
            let first = cell.first.get_or_init(|| Slot::new(limit, &self.clock));
            if first.limit == limit {
                return self.decide(first);
            }
            cell.first_retired.store(true, Ordering::Release);
        }
        self.check_changed(cell, limit)
    }

    /// [`KeyLimits::check`] for a key whose limit has changed since its first request.
    #[cold]
    #[inline(never)]
    fn check_changed(&self, cell: &LimiterCell, limit: Limit) -> Decision {
        if let Some(slot) = cell.changed.load().as_deref() {
            if slot.limit == limit {
                return self.decide(slot);
            }
        }
        // The limit changed: a fresh limiter, unless a concurrent request has just installed
        // one for this same limit.
        let fresh = Arc::new(Slot::new(limit, &self.clock));
        let mut installed = fresh.clone();
        cell.changed.rcu(|current| {
            installed = match current {
                Some(s) if s.limit == limit => s.clone(),
                _ => fresh.clone(),
            };
            Some(installed.clone())
        });
        self.decide(&installed)
    }

    // Inlined into the request's decision: returned through memory, the decision's fields
    // were written one by one and read straight back 16 bytes at a time, a load that has to
    // wait for those stores to reach the cache.
    #[inline(always)]
    fn decide(&self, slot: &Slot) -> Decision {
        let (limit, per_cell, window) = (slot.limit, slot.per_cell, slot.window);
        match slot.limiter.check() {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                let used = limit.requests.saturating_sub(remaining);
                Decision::Allowed {
                    limit: limit.requests,
                    remaining,
                    reset: ceil_secs(per_cell * used),
                    window,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision::Denied {
                    limit: limit.requests,
                    retry_after: ceil_secs(wait).max(1),
                    reset: ceil_secs(wait + per_cell * limit.requests.saturating_sub(1)),
                    window,
                }
            }
        }
    }
}

struct FailLimiter {
    limit: Limit,
    limiter: IpLimiter,
}

/// Failed authentications per client IP. An IP over its limit is refused before any key
/// lookup for malformed or missing credentials.
#[derive(Default)]
pub struct FailedAuth {
    current: ArcSwapOption<FailLimiter>,
    blocked_until: DashMap<IpAddr, std::time::Instant, foldhash::fast::RandomState>,
    /// Entries in `blocked_until`, so the common case (nobody blocked) is one atomic load.
    blocked_count: AtomicUsize,
    clock: DefaultClock,
}

impl FailedAuth {
    /// New; call [`FailedAuth::configure`] with the limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the limit (keeps state when unchanged).
    pub fn configure(&self, limit: Option<Limit>) {
        let same = match (self.current.load().as_deref(), limit) {
            (Some(cur), Some(l)) => cur.limit == l,
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.current.store(limit.map(|l| {
                Arc::new(FailLimiter {
                    limit: l,
                    limiter: RateLimiter::dashmap_with_clock(quota(l), self.clock.clone()),
                })
            }));
            self.blocked_until.clear();
            self.blocked_count.store(0, Ordering::Relaxed);
        }
    }

    fn unblock(&self, ip: &IpAddr) {
        if self.blocked_until.remove(ip).is_some() {
            self.blocked_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Seconds the IP stays blocked, if it is.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        if self.blocked_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let until = *self.blocked_until.get(&ip)?;
        let now = std::time::Instant::now();
        if now < until {
            Some(ceil_secs(until - now).max(1))
        } else {
            self.unblock(&ip);
            None
        }
    }

    /// Counts a failure; returns the retry-after seconds when the IP is now over the limit.
    pub fn record_failure(&self, ip: IpAddr) -> Option<u64> {
        let cur = self.current.load();
        let fl = cur.as_deref()?;
        match fl.limiter.check_key(&ip) {
            Ok(_) => None,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                if self
                    .blocked_until
                    .insert(ip, std::time::Instant::now() + wait)
                    .is_none()
                {
                    self.blocked_count.fetch_add(1, Ordering::Relaxed);
                }
                Some(ceil_secs(wait).max(1))
            }
        }
    }

    /// Drops state of IPs that have not failed recently (bounded memory).
    pub fn housekeeping(&self) {
        if let Some(fl) = self.current.load().as_deref() {
            fl.limiter.retain_recent();
            fl.limiter.shrink_to_fit();
        }
        let now = std::time::Instant::now();
        self.blocked_until.retain(|_, until| {
            let keep = *until > now;
            if !keep {
                self.blocked_count.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_n_pass_then_denied() {
        let limits = KeyLimits::new();
        let cell = LimiterCell::default();
        let limit = Limit::parse("5/1m").unwrap();
        for i in 0..5 {
            match limits.check(&cell, limit) {
                Decision::Allowed {
                    remaining,
                    limit: 5,
                    ..
                } => assert_eq!(remaining, 4 - i),
                other => panic!("request {i}: {other:?}"),
            }
        }
        match limits.check(&cell, limit) {
            Decision::Denied {
                retry_after,
                limit: 5,
                window: 60,
                ..
            } => assert!((1..=12).contains(&retry_after), "{retry_after}"),
            other => panic!("{other:?}"),
        }
        // A changed limit starts afresh, and its limiter then counts on.
        let changed = Limit::parse("6/1m").unwrap();
        assert!(matches!(
            limits.check(&cell, changed),
            Decision::Allowed { remaining: 5, .. }
        ));
        assert!(matches!(
            limits.check(&cell, changed),
            Decision::Allowed { remaining: 4, .. }
        ));
        // And so does a change back to the first limit (its exhausted limiter is not reused).
        assert!(matches!(
            limits.check(&cell, limit),
            Decision::Allowed { remaining: 4, .. }
        ));
        assert!(matches!(
            limits.check(&cell, limit),
            Decision::Allowed { remaining: 3, .. }
        ));
        assert_eq!(limits.check(&cell, None), Decision::Unlimited);
    }

    #[test]
    fn failures_block_an_ip() {
        let f = FailedAuth::new();
        f.configure(Limit::parse("2/1m").unwrap());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(f.record_failure(ip), None);
        assert_eq!(f.record_failure(ip), None);
        assert!(f.record_failure(ip).is_some());
        assert!(f.blocked(ip).is_some());
        assert!(f.blocked("10.0.0.2".parse().unwrap()).is_none());
    }
}
