//! Cheap clock reads for the request path. A clock read costs 6–30 ns on the virtual machines
//! gateways run on (a coarse clock through the vDSO ~6 ns, the TSC ~12 ns, `Instant::now`
//! ~30 ns here), and a request made several: the request path reads the time a background
//! thread takes once a millisecond instead (one load, like nginx's cached time). That is
//! precise enough for second-granularity expiry, usage days, the `Date` header, rate limits
//! (a GCRA limiter sees time move in 1 ms steps; its long-run rate is exact) and
//! I/O timeouts.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the clock thread takes the time.
pub const TICK: Duration = Duration::from_millis(1);

/// The time as of the clock thread's last tick.
struct Ticks {
    /// What the monotonic readings count from.
    origin: Instant,
    /// Nanoseconds from `origin`.
    monotonic_nanos: AtomicU64,
    /// Unix seconds.
    unix_secs: AtomicI64,
    /// False when the thread could not be started: readers then read the clocks themselves.
    ticking: bool,
}

impl Ticks {
    fn take(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.monotonic_nanos.store(nanos, Ordering::Relaxed);
        self.unix_secs.store(precise_unix_secs(), Ordering::Relaxed);
    }
}

fn precise_unix_secs() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// The ticks, the thread taking them started on first use.
fn ticks() -> &'static Ticks {
    static TICKS: OnceLock<Ticks> = OnceLock::new();
    TICKS.get_or_init(|| {
        let origin = Instant::now();
        let started = std::thread::Builder::new()
            .name("keygate-clock".into())
            .spawn(|| loop {
                std::thread::sleep(TICK);
                // Unset only while `get_or_init` below has not yet returned.
                if let Some(t) = TICKS.get() {
                    t.take();
                }
            })
            .is_ok();
        let t = Ticks {
            origin,
            monotonic_nanos: AtomicU64::new(0),
            unix_secs: AtomicI64::new(0),
            ticking: started,
        };
        t.take();
        t
    })
}

/// Unix seconds (as of the last tick: at most about a millisecond behind).
pub fn unix_now() -> i64 {
    let t = ticks();
    if t.ticking {
        t.unix_secs.load(Ordering::Relaxed)
    } else {
        precise_unix_secs()
    }
}

/// Monotonic time since the clock's origin (as of the last tick).
pub fn monotonic() -> Duration {
    Duration::from_nanos(monotonic_nanos())
}

fn monotonic_nanos() -> u64 {
    let t = ticks();
    if t.ticking {
        t.monotonic_nanos.load(Ordering::Relaxed)
    } else {
        u64::try_from(t.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The ticked monotonic time as an instant (for deadlines seconds away, where a reading up to a
/// tick early does not matter).
pub fn instant() -> Instant {
    ticks().origin + monotonic()
}

/// The ticked clock as a governor clock, for rate limiters.
#[derive(Debug, Clone, Copy, Default)]
pub struct TickClock;

impl governor::clock::Clock for TickClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        monotonic_nanos().into()
    }
}

/// Milliseconds since its creation on the ticked clock, for timers read on every I/O
/// (connection activity, request-body progress): a reading is one load, and a reading turns
/// back into a `tokio` instant for the deadline.
#[derive(Debug, Clone, Copy)]
pub struct CoarseStopwatch {
    /// The ticked monotonic time at the start.
    start: Duration,
}

impl CoarseStopwatch {
    /// Starts now.
    pub fn start() -> Self {
        CoarseStopwatch { start: monotonic() }
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        monotonic().saturating_sub(self.start).as_millis() as u64
    }

    /// The instant `ms` milliseconds after the start, plus `after`.
    pub fn at(&self, ms: u64, after: Duration) -> tokio::time::Instant {
        let start = ticks().origin + self.start;
        tokio::time::Instant::from_std(start + Duration::from_millis(ms) + after)
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
    fn ticked_clocks_track_the_precise_ones() {
        assert!(ticks().ticking);
        assert!((unix_now() - precise_unix_secs()).abs() <= 1);
        let a = monotonic();
        // Never ahead of the precise clock it is taken from.
        assert!(a <= ticks().origin.elapsed());
        std::thread::sleep(Duration::from_millis(30));
        let b = monotonic();
        assert!(b > a && b - a >= Duration::from_millis(15), "{a:?} {b:?}");
        // The rate limiters' clock is the same time.
        use governor::clock::Clock;
        let limiter_now = Duration::from(TickClock.now());
        assert!(limiter_now >= b && limiter_now <= ticks().origin.elapsed());
    }

    #[test]
    fn a_stopwatch_deadline_is_on_the_precise_clock() {
        let watch = CoarseStopwatch::start();
        let after = Duration::from_millis(100);
        let deadline = watch.at(watch.elapsed_ms(), after).into_std();
        let precise = Instant::now() + after;
        // The ticked start lags the precise time by up to a tick (more when the clock
        // thread waits for a core): the deadline may come that much early, never late.
        assert!(deadline <= precise, "{deadline:?} {precise:?}");
        assert!(precise - deadline < Duration::from_millis(50));
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
