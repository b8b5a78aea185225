//! The global allocator: mimalloc, through its plain entry points whenever the alignment
//! asked for is one every mimalloc block has anyway (8 bytes). The `mimalloc` crate always
//! calls the "aligned" entry points, whose fast path covers only blocks up to 1 KiB: every
//! larger allocation took the generic aligned path instead (in the load profile, a request's
//! ~4.6 KB forwarding future cost ~1 300 instructions to allocate, against ~100).
//!
//! Built with mimalloc's `no_thp`: with transparent huge pages allowed, about one start-up in
//! three spent 0.5–0.8 s of kernel time compacting memory.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment of every block mimalloc hands out.
const PLAIN_ALIGN: usize = 8;

/// mimalloc as the global allocator (see the module documentation).
pub struct Allocator;

// SAFETY: every path forwards to mimalloc with the size and, when larger than what all of
// its blocks have, the alignment of the layout; blocks are freed by `mi_free`, which takes
// blocks from either kind of entry point.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for_and_survive_realloc() {
        for align in [1usize, 2, 4, 8, 16, 64, 4096] {
            for size in [1usize, 7, 8, 24, 100, 1024, 1025, 4600, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero-size layout; the block is written within its size and
                // freed with the same layout.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let q = Allocator.realloc(p, layout, size * 2);
                    assert_eq!(q as usize % align, 0, "realloc: size {size} align {align}");
                    assert_eq!(*q.add(size - 1), 0xab);
                    Allocator.dealloc(q, Layout::from_size_align(size * 2, align).unwrap());
                    let z = Allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    Allocator.dealloc(z, layout);
                }
            }
        }
    }
}
