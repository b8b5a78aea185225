//! Cache prefetch hints for the request path: with many keys, a request's key, state and
//! usage counter are rarely in cache, and a hint issued early lets those misses overlap with
//! other work instead of stalling where the memory is first read.

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
