//! Cheap clock reads for the request path. A clock read costs 6–30 ns on the virtual machines
//! gateways run on (a coarse clock through the vDSO ~6 ns, the TSC ~12 ns, `Instant::now`
//! ~30 ns here), and a request made several. While requests come often, the request path
//! reads the time a background thread takes once a millisecond instead (one load, like
//! nginx's cached time): precise enough for second-granularity expiry, usage days, the `Date`
//! header, rate limits (a GCRA limiter sees time move in 1 ms steps; its long-run rate is
//! exact) and I/O timeouts. While they are rare, the thread stops ticking (a wake-up a
//! millisecond cost ~3% of a core on a virtual machine) and reads take the time themselves.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the clock thread takes the time while it ticks.
pub const TICK: Duration = Duration::from_millis(1);
/// How often the clock thread looks at the read rate while it does not tick.
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// Ticking starts after an idle check period with this many reads (1 000 a second).
const START_READS: u64 = 100;
/// Ticking is judged over windows of this many ticks...
const WINDOW_TICKS: u32 = 100;
/// ...and stops after a window in which fewer ticks than this were read (the rate where a read
/// of its own costs less than the ticks).
const KEEP_READ_TICKS: u32 = 10;

/// When the clock thread ticks (pure, so it is tested without threads or time).
#[derive(Debug, Default)]
struct Pace {
    ticks: u32,
    read_ticks: u32,
}

impl Pace {
    /// After an idle check period with `reads` reads: whether to start ticking.
    fn start(reads: u64) -> bool {
        reads >= START_READS
    }

    /// After a tick; `read` tells whether the time was read since the tick before. Returns
    /// whether to keep ticking.
    fn tick(&mut self, read: bool) -> bool {
        self.ticks += 1;
        self.read_ticks += u32::from(read);
        if self.ticks < WINDOW_TICKS {
            return true;
        }
        let keep = self.read_ticks >= KEEP_READ_TICKS;
        *self = Pace::default();
        keep
    }
}

/// The clock thread's time, and what it needs to know to pace itself.
struct Ticks {
    /// What the monotonic readings count from.
    origin: Instant,
    /// Set while the thread ticks: the values below are then at most a tick old.
    ticking: AtomicBool,
    /// Set by a read since the last tick (tested first: one store per tick, not per read).
    read: AtomicBool,
    /// Nanoseconds from `origin`, at the last tick.
    monotonic_nanos: AtomicU64,
    /// Unix seconds, at the last tick.
    unix_secs: AtomicI64,
    /// Reads while not ticking, since the thread last looked.
    idle_reads: AtomicU64,
}

impl Ticks {
    fn take(&self) {
        self.monotonic_nanos
            .store(self.precise_monotonic_nanos(), Ordering::Relaxed);
        self.unix_secs.store(precise_unix_secs(), Ordering::Relaxed);
    }

    fn precise_monotonic_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// True when the ticked values may be used; otherwise the read counts toward the rate.
    fn ticked(&self) -> bool {
        if self.ticking.load(Ordering::Acquire) {
            if !self.read.load(Ordering::Relaxed) {
                self.read.store(true, Ordering::Relaxed);
            }
            return true;
        }
        self.idle_reads.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The clock thread's loop.
    fn run(&self) -> ! {
        let mut pace = Pace::default();
        loop {
            if self.ticking.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                self.take();
                if !pace.tick(self.read.swap(false, Ordering::Relaxed)) {
                    self.ticking.store(false, Ordering::Relaxed);
                }
            } else {
                std::thread::sleep(IDLE_CHECK);
                if Pace::start(self.idle_reads.swap(0, Ordering::Relaxed)) {
                    self.take();
                    pace = Pace::default();
                    // Release: a read that sees the flag sees the values just taken.
                    self.ticking.store(true, Ordering::Release);
                }
            }
        }
    }
}

fn precise_unix_secs() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// The clock, its thread started on first use (when the thread cannot be started, it never
/// ticks and every read takes the time itself).
fn ticks() -> &'static Ticks {
    static TICKS: OnceLock<Ticks> = OnceLock::new();
    TICKS.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("keygate-clock".into())
            .spawn(|| {
                // Blocks until `get_or_init` below has returned.
                ticks().run()
            });
        Ticks {
            origin: Instant::now(),
            ticking: AtomicBool::new(false),
            read: AtomicBool::new(false),
            monotonic_nanos: AtomicU64::new(0),
            unix_secs: AtomicI64::new(0),
            idle_reads: AtomicU64::new(0),
        }
    })
}

/// Unix seconds (while ticking, as of the last tick: at most about a millisecond behind).
pub fn unix_now() -> i64 {
    let t = ticks();
    if t.ticked() {
        t.unix_secs.load(Ordering::Relaxed)
    } else {
        precise_unix_secs()
    }
}

/// Monotonic time since the clock's origin (while ticking, as of the last tick).
pub fn monotonic() -> Duration {
    Duration::from_nanos(monotonic_nanos())
}

fn monotonic_nanos() -> u64 {
    let t = ticks();
    if t.ticked() {
        t.monotonic_nanos.load(Ordering::Relaxed)
    } else {
        t.precise_monotonic_nanos()
    }
}

/// The clock's monotonic time as an instant (for deadlines seconds away, where a reading up to
/// a tick early does not matter).
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
    fn frequent_reads_start_the_ticks_and_rare_ones_stop_them() {
        assert!(!Pace::start(START_READS - 1));
        assert!(Pace::start(START_READS));
        // A window with just enough ticks read keeps ticking.
        let mut pace = Pace::default();
        assert!((0..WINDOW_TICKS).all(|i| pace.tick(i < KEEP_READ_TICKS)));
        // The next window starts afresh: one read tick short of the mark stops the ticks at
        // the window's end, not before.
        let kept: Vec<bool> = (0..WINDOW_TICKS)
            .map(|i| pace.tick(i < KEEP_READ_TICKS - 1))
            .collect();
        assert!(kept[..kept.len() - 1].iter().all(|&k| k));
        assert!(!kept[kept.len() - 1]);
    }

    #[test]
    fn ticked_clocks_track_the_precise_ones() {
        let t = ticks();
        // Read as a busy gateway does until the clock thread ticks (it looks every 100 ms).
        let give_up = Instant::now() + Duration::from_secs(10);
        while !t.ticking.load(Ordering::Acquire) {
            assert!(
                Instant::now() < give_up,
                "the clock thread never started ticking"
            );
            std::hint::black_box(monotonic());
        }
        let a = monotonic();
        // Never ahead of the precise clock it is taken from, and moved on by the ticks.
        assert!(a <= ticks().origin.elapsed());
        while monotonic() == a {
            assert!(Instant::now() < give_up, "the ticked time never moved");
        }
        assert!((unix_now() - precise_unix_secs()).abs() <= 1);
        // The rate limiters' clock is the same time.
        use governor::clock::Clock;
        let limiter_now = Duration::from(TickClock.now());
        assert!(limiter_now > a && limiter_now <= ticks().origin.elapsed());
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
