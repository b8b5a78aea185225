//! Cheap clock reads for the request path. The coarse clocks are read from memory the kernel
//! updates every scheduler tick (a few ms): precise enough for second-granularity expiry,
//! usage days and timeouts, and a fraction of the cost of a full clock read (which showed in
//! the load profile: several reads per request).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn coarse(clock: libc::clockid_t) -> Option<Duration> {
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
    let since_epoch = coarse(libc::CLOCK_REALTIME_COARSE)
        .or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// Monotonic time since an unspecified start (coarse), on the clock `Instant` uses.
pub fn monotonic() -> Duration {
    coarse(libc::CLOCK_MONOTONIC_COARSE).unwrap_or_default()
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
}
