//! Moves the memory the key index filled at start-up onto transparent huge pages, in the
//! background once serving has begun.
//!
//! With a million keys, a request's key, its index slot and its state are spread over some
//! 300 MB: on 4 KiB pages nearly every one of them is also a TLB miss (a page walk, dearer
//! still under virtualisation). On 2 MiB pages the whole set fits the TLB. Huge pages at
//! allocation time are not an option: with them, about one start-up in three spent
//! 0.5–0.8 s compacting memory (see `alloc`, built with mimalloc's `no_thp`). Collapsing
//! afterwards (`MADV_COLLAPSE`, Linux 6.1+) costs that time in a background thread instead.
//!
//! Only 2 MiB ranges that are nearly all resident are collapsed: a collapse fills the range's
//! missing pages, so sparse ranges (thread stacks, a half-used arena) would grow.

use std::time::{Duration, Instant};

/// Size of a transparent huge page on x86_64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// What a collapse pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collapse {
    /// 2 MiB ranges that were resident enough to collapse.
    pub eligible: usize,
    /// Ranges now on huge pages.
    pub collapsed: usize,
    /// How long the pass took.
    pub took: Duration,
}

/// Why no pass ran.
#[derive(Debug, thiserror::Error)]
pub enum CollapseError {
    /// The kernel lacks `MADV_COLLAPSE` (before 6.1) or transparent huge pages are off.
    #[error("the kernel cannot collapse memory into huge pages (needs Linux 6.1+ with transparent huge pages not set to never)")]
    Unsupported,
    /// `/proc/self/maps` could not be read.
    #[error("reading /proc/self/maps: {0}")]
    Maps(#[from] std::io::Error),
}

/// Collapses every 2 MiB range of private anonymous memory with at least [`MIN_RESIDENT`]
/// of its pages resident. Blocking.
pub fn collapse_resident() -> Result<Collapse, CollapseError> {
    imp::collapse_resident(MIN_RESIDENT)
}

/// True when `keys` live keys are enough for huge pages to matter: below this, their memory
/// (~300 bytes each) fits what a TLB of 4 KiB pages covers (8 MiB with 2 048 entries).
fn worth_it(keys: usize) -> bool {
    keys >= 30_000
}

/// What `keygate serve` does once `keys` keys are loaded, here and now (for benchmarks and
/// tools): [`collapse_resident`] when the keys are enough for it to matter, else `None`.
pub fn move_key_memory(keys: usize) -> Option<Result<Collapse, CollapseError>> {
    worth_it(keys).then(collapse_resident)
}

/// When `keys` loaded keys are enough for it to matter, runs [`collapse_resident`] on a
/// thread of its own, at the lowest priority, and logs what it did.
pub fn move_key_memory_in_background(keys: usize) {
    if !worth_it(keys) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("keygate-hugepages".into())
        .spawn(|| {
            crate::workers::lower_thread_priority();
            match collapse_resident() {
                Ok(c) => tracing::info!(
                    eligible = c.eligible,
                    collapsed = c.collapsed,
                    took_ms = c.took.as_millis() as u64,
                    "key memory moved to huge pages"
                ),
                Err(e) => tracing::info!("key memory stays on 4 KiB pages: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the huge-page thread; key memory stays on 4 KiB pages");
    }
}

/// The share of a range's pages that must be resident for it to be collapsed: a collapse
/// then grows resident memory by at most 1/16.
pub const MIN_RESIDENT: f64 = 15.0 / 16.0;

/// A private anonymous mapping from `/proc/self/maps`.
fn anonymous_ranges(maps: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    maps.lines().filter_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let _offset = fields.next()?;
        let _device = fields.next()?;
        let inode = fields.next()?;
        let path = fields.next();
        // Private, writable, not a file; the heap counts, stacks and special maps do not.
        let anonymous = inode == "0" && matches!(path, None | Some("[heap]"));
        if !(perms.starts_with("rw") && perms.ends_with('p') && anonymous) {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (start < end).then_some((start, end))
    })
}

/// The whole 2 MiB-aligned ranges inside `start..end`.
fn huge_ranges(start: usize, end: usize) -> impl Iterator<Item = usize> {
    let first = start.div_ceil(HUGE_PAGE).saturating_mul(HUGE_PAGE);
    let last = end / HUGE_PAGE * HUGE_PAGE;
    (first..last).step_by(HUGE_PAGE)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::*;

    /// Re-enables transparent huge pages for the process while alive (mimalloc turned them
    /// off at start), and restores the setting it found when dropped.
    struct ThpAllowed {
        was_disabled: bool,
    }

    impl ThpAllowed {
        fn new() -> Self {
            // SAFETY: prctl with these options reads or sets one process flag; no pointers.
            let was_disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } == 1;
            if was_disabled {
                // SAFETY: as above.
                unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) };
            }
            ThpAllowed { was_disabled }
        }
    }

    impl Drop for ThpAllowed {
        fn drop(&mut self) {
            if self.was_disabled {
                // Collapsed ranges stay on huge pages; new memory goes back to 4 KiB pages.
                // SAFETY: as above.
                unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
            }
        }
    }

    /// Pages of the range at `at` that are resident, or `None` when the kernel says no.
    fn resident_pages(at: usize, page: usize, vec: &mut [u8]) -> Option<usize> {
        // SAFETY: `vec` has one byte per page of the range (HUGE_PAGE / page); mincore only
        // writes those bytes and only inspects the page tables of `at..at + HUGE_PAGE`, which
        // need not be mapped (then it fails with ENOMEM).
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, HUGE_PAGE, vec.as_mut_ptr()) };
        (rc == 0).then(|| {
            vec[..HUGE_PAGE / page]
                .iter()
                .filter(|&&b| b & 1 != 0)
                .count()
        })
    }

    pub fn collapse_resident(min_resident: f64) -> Result<Collapse, CollapseError> {
        let started = Instant::now();
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 && HUGE_PAGE % p as usize == 0 => p as usize,
            _ => return Err(CollapseError::Unsupported),
        };
        let need = ((HUGE_PAGE / page) as f64 * min_resident.clamp(0.0, 1.0)).ceil() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let _allowed = ThpAllowed::new();
        let mut vec = vec![0u8; HUGE_PAGE / page];
        let mut done = Collapse::default();
        for (start, end) in anonymous_ranges(&maps) {
            for at in huge_ranges(start, end) {
                if resident_pages(at, page, &mut vec).is_none_or(|n| n < need) {
                    continue;
                }
                done.eligible += 1;
                // SAFETY: MADV_COLLAPSE changes how the range is mapped, never its contents;
                // the range lies in a mapping of this process (it may have been unmapped since
                // the maps were read: the call then fails, harmlessly).
                let rc = unsafe {
                    libc::madvise(at as *mut libc::c_void, HUGE_PAGE, libc::MADV_COLLAPSE)
                };
                if rc == 0 {
                    done.collapsed += 1;
                } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
                    && done.collapsed == 0
                {
                    return Err(CollapseError::Unsupported);
                }
            }
        }
        done.took = started.elapsed();
        Ok(done)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::*;

    pub fn collapse_resident(_min_resident: f64) -> Result<Collapse, CollapseError> {
        let _ = (Instant::now(), HUGE_PAGE);
        Err(CollapseError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_anonymous_writable_mappings_are_candidates() {
        let maps = "\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0 \n\
55d0c0400000-55d0c0800000 rw-p 00000000 00:00 0                          [heap]\n\
7f0000000000-7f0000400000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6\n\
7f0000400000-7f0000800000 rw-s 00000000 00:01 77                         /dev/zero (deleted)\n\
7f0000800000-7f0000c00000 rw-p 00000000 00:00 0                          [stack]\n\
7f0000c00000-7f0001000000 ---p 00000000 00:00 0 \n\
7f0001000000-7f0001400000 rw-p 00000000 00:00 0\n\
garbage line\n";
        let found: Vec<_> = anonymous_ranges(maps).collect();
        assert_eq!(
            found,
            vec![
                (0x55d0c0000000, 0x55d0c0400000),
                (0x55d0c0400000, 0x55d0c0800000),
                (0x7f0001000000, 0x7f0001400000),
            ]
        );
    }

    /// `AnonHugePages` of this process, in KiB.
    fn anon_huge_kib() -> u64 {
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_resident_buffer_collapses_and_keeps_its_contents() {
        // 8 MiB with every page written: at least three whole 2 MiB ranges, all resident.
        let value = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let buf: Vec<u64> = (0..(8 << 20) / 8).map(value).collect();
        match collapse_resident() {
            // A kernel without MADV_COLLAPSE (or with THP off): there is nothing to collapse.
            Err(CollapseError::Unsupported) => {}
            Err(e) => panic!("{e}"),
            Ok(c) => {
                assert!(c.eligible >= 3, "{c:?}");
                assert!(c.collapsed <= c.eligible, "{c:?}");
                if c.collapsed > 0 {
                    assert!(anon_huge_kib() >= 2048, "{c:?}");
                }
            }
        }
        assert!(buf.iter().enumerate().all(|(i, &v)| v == value(i)));
    }

    #[test]
    fn huge_ranges_are_whole_and_aligned() {
        let mb = 1 << 20;
        assert_eq!(huge_ranges(0, 4 * mb).collect::<Vec<_>>(), vec![0, 2 * mb]);
        assert_eq!(huge_ranges(mb, 5 * mb).collect::<Vec<_>>(), vec![2 * mb]);
        assert_eq!(huge_ranges(mb, 3 * mb).count(), 0);
        assert_eq!(huge_ranges(usize::MAX - mb, usize::MAX).count(), 0);
    }
}
