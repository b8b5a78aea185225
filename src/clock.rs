//! Cheap clock reads for the request path. The coarse clocks are read from memory the kernel
//! updates every scheduler tick (a few ms): precise enough for second-granularity expiry,
//! usage days and timeouts, and a fraction of the cost of a full clock read (which showed in
//! the load profile: several reads per request).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads `clock` (a `CLOCK_*` id) with `clock_gettime`; `None` when the call fails.
pub fn read(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call touches nothing else.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Unix seconds (coarse: lags real time by at most a tick).
pub fn unix_now() -> i64 {
    let since_epoch = read(libc::CLOCK_REALTIME_COARSE)
        .or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// Monotonic time since an unspecified start (coarse), on the clock `Instant` uses.
pub fn monotonic() -> Duration {
    read(libc::CLOCK_MONOTONIC_COARSE).unwrap_or_default()
}

/// Milliseconds since its creation on the coarse monotonic clock, for timers read on every
/// I/O (connection activity, request-body progress): a reading is cheap, and a reading turns
/// back into a `tokio` instant for the deadline.
#[derive(Debug, Clone, Copy)]
pub struct CoarseStopwatch {
    start: std::time::Instant,
    start_coarse: Duration,
}

impl CoarseStopwatch {
    /// Starts now.
    pub fn start() -> Self {
        CoarseStopwatch {
            start: std::time::Instant::now(),
            start_coarse: monotonic(),
        }
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        monotonic().saturating_sub(self.start_coarse).as_millis() as u64
    }

    /// The instant `ms` milliseconds after the start, plus `after`.
    pub fn at(&self, ms: u64, after: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + Duration::from_millis(ms) + after)
    }
}

/// One tokio timer serving a run of deadlines, most of which never fire: it is set once
/// and moved only when it fires before the deadline now waited for (then on to that one) or
/// a nearer deadline comes. A wait costs a comparison instead of registering and removing
/// a timer of its own (which showed in the load profile).
pub struct LazyTimer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Polled with the current waiter's waker, and not fired since.
    armed: bool,
}

impl LazyTimer {
    /// A timer first set for `deadline`.
    pub fn new(deadline: tokio::time::Instant) -> Self {
        LazyTimer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed: false,
        }
    }

    /// Forgets the waker it was polled with: call it before a new waiter (which may be
    /// another task) uses the timer.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Ready once `deadline` has passed.
    pub fn poll_expired(
        &mut self,
        cx: &mut std::task::Context<'_>,
        deadline: tokio::time::Instant,
    ) -> std::task::Poll<()> {
        use std::future::Future;
        use std::task::Poll;
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
            self.armed = false;
        }
        loop {
            if self.armed && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            self.armed = true;
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline: on to this one.
            self.sleep.as_mut().reset(deadline);
            self.armed = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_track_the_precise_ones() {
        let precise = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((unix_now() - precise).abs() <= 1);
        let a = monotonic();
        std::thread::sleep(Duration::from_millis(30));
        let b = monotonic();
        assert!(b > a && b - a >= Duration::from_millis(15), "{a:?} {b:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_timer_fires_at_the_deadline_waited_for() {
        use std::future::poll_fn;
        use tokio::time::Instant;
        let start = Instant::now();
        let mut timer = LazyTimer::new(start + Duration::from_secs(1));
        // A later deadline: the timer fires at 1 s, finds it early and moves on to 5 s.
        poll_fn(|cx| timer.poll_expired(cx, start + Duration::from_secs(5))).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        // A nearer deadline than the timer's: it is brought forward.
        let mut timer = LazyTimer::new(start + Duration::from_secs(60));
        let now = Instant::now();
        poll_fn(|cx| timer.poll_expired(cx, now + Duration::from_secs(2))).await;
        assert_eq!(Instant::now() - now, Duration::from_secs(2));
    }
}
