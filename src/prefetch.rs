//! Cache prefetch hints for the request path: with many keys, a request's key, state and
//! usage counter are rarely in cache, and a hint issued early lets those misses overlap with
//! other work (and each other) instead of stalling one after another where each is read.

/// Hints the CPU to load the cache line holding `p` (nothing on other architectures).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults or reads
    // memory in a way the program can observe, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints the CPU to load every cache line of the `len` bytes at address `at`.
#[inline(always)]
fn prefetch_range(at: usize, len: usize) {
    let first = at & !63;
    for line in (first..at.saturating_add(len)).step_by(64) {
        prefetch(line as *const u8);
    }
}

/// Where a value lies in memory, noted to be prefetched later (only the address is kept:
/// nothing is ever read through it, so it may outlive the value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lines {
    at: usize,
    len: usize,
}

impl Lines {
    /// The `len` bytes at address `at`.
    pub fn new(at: usize, len: usize) -> Self {
        Lines { at, len }
    }

    /// The memory of `value`.
    pub fn of<T>(value: &T) -> Self {
        Lines::new(value as *const T as usize, std::mem::size_of::<T>())
    }

    /// Starts loading them.
    #[inline(always)]
    pub fn prefetch(self) {
        prefetch_range(self.at, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_address_can_be_hinted() {
        let data = [0u8; 200];
        prefetch_range(data.as_ptr() as usize, data.len());
        prefetch_range(0, 64);
        prefetch_range(usize::MAX - 10, 100);
        Lines::new(usize::MAX - 10, 100).prefetch();
    }

    #[test]
    fn lines_of_a_value_are_its_address_and_size() {
        let v = [0u64; 5];
        assert_eq!(Lines::of(&v), Lines::new(v.as_ptr() as usize, 40));
    }
}
