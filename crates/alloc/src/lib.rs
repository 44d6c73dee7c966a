//! The global allocator of Flotilla's processes: mimalloc, called so that
//! ordinary allocations take its fast path.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to
//! `mi_malloc_aligned`, alignment 1 or 8 included. In mimalloc (v2 and the
//! v3 it builds by default) that function only takes the plain path for
//! blocks up to 1 KiB, or for power-of-two sizes; anything else, such as a
//! 1.4 KiB `HeaderMap` table or a request's 4 KiB boxed future, is
//! over-allocated by the alignment and realigned. callgrind showed 3 such
//! allocations per proxied request in the gateway; calling mimalloc as
//! below saved ~400 of the request's ~31k user-space instructions (see
//! docs/benchmarks.md), for an alignment that every mimalloc block already
//! has.
//!
//! So: when the alignment is at most 16 and the size a multiple of it, the
//! request goes to plain `mi_malloc` / `mi_zalloc` / `mi_realloc`. That is
//! always enough: `MI_MAX_ALIGN_SIZE` is 16, so on 64-bit targets mimalloc
//! rounds small sizes up to whole pairs of words, its size classes are 8
//! bytes and then multiples of 16, and its pages start 16-aligned. Anything
//! else (a cache-line-aligned type, an odd layout) keeps the aligned calls.
//! The tests check the alignment of every path over many sizes, and fail
//! if the rule is loosened. The same rule is proposed upstream
//! (purpleprotocol/mimalloc_rust#170).
//!
//! mimalloc is built without transparent huge pages (`libmimalloc-sys`'s
//! `no_thp`). With them, mimalloc advises its 1 GiB arenas `MADV_HUGEPAGE`,
//! and every 2 MiB region any of the process's threads touched became 2 MiB
//! resident: the idle `flotilla up` process of the shop held 45 MiB of RSS
//! (28 MiB anonymous) with them and 21 MiB (4.2 MiB anonymous) without,
//! which took the running shop over its memory budget. Huge pages did make
//! the gateway's CPU per request ~6 % lower in two six-round A/B runs
//! (`benches/gateway/ab.sh`), with throughput within the noise (1.03× and
//! 0.96×); the resident memory is the surer cost.
//!
//! This is written here rather than taken from a crate because it is the
//! whole of what is needed (the FFI calls are `libmimalloc-sys`, which the
//! `mimalloc` crate itself wraps), and no published crate does it yet.

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as ffi;

/// mimalloc's guaranteed alignment for blocks whose size is a multiple of
/// it (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator: `#[global_allocator] static A:
/// flotilla_alloc::Allocator = flotilla_alloc::Allocator;`.
pub struct Allocator;

/// Whether a block of `size` bytes from plain `mi_malloc` is already
/// aligned to `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && size.is_multiple_of(align)
}

// SAFETY: every path returns memory from mimalloc aligned to the layout's
// alignment (plain calls only where mimalloc's size classes guarantee it,
// see `natural`), or null; `mi_free` and `mi_realloc*` accept any block
// mimalloc returned, whichever call made it.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: FFI calls with a size and a power-of-two alignment.
        unsafe {
            if natural(layout.size(), layout.align()) {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.size(), layout.align()) {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block this allocator returned; a
        // moved block is a fresh one under the same rule as `alloc`.
        unsafe {
            if natural(new_size, layout.align()) {
                ffi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Sizes around every size-class boundary up to 8 KiB, then some large.
    fn sizes() -> impl Iterator<Item = usize> {
        (1..=8192).chain([
            65_536 - 8,
            65_536,
            100_000,
            1 << 20,
            (1 << 20) + 24,
            5 << 20,
        ])
    }

    #[test]
    fn every_path_returns_aligned_usable_memory() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            // Many live blocks per size, so later ones come from inside a
            // page rather than only its (better aligned) start.
            let mut live = Vec::new();
            // Sizes that are not a multiple of the alignment too: a
            // `Layout` allows them, and plain `mi_malloc` would not align
            // those.
            for size in sizes() {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                for zeroed in [false, true] {
                    // SAFETY: non-zero size; each block is freed below with
                    // its layout.
                    let p = unsafe {
                        if zeroed {
                            a.alloc_zeroed(layout)
                        } else {
                            a.alloc(layout)
                        }
                    };
                    assert!(!p.is_null(), "alloc {size}/{align}");
                    assert_eq!(p as usize % align, 0, "alloc {size}/{align} misaligned");
                    // SAFETY: `p` holds `size` bytes.
                    let bytes = unsafe { core::slice::from_raw_parts_mut(p, size) };
                    if zeroed {
                        assert!(bytes.iter().all(|b| *b == 0), "zalloc {size}/{align}");
                    }
                    bytes[0] = 0xa5;
                    bytes[size - 1] = 0x5a;
                    live.push((p, layout));
                }
            }
            for (p, layout) in live {
                // SAFETY: allocated above with this layout, freed once.
                unsafe { a.dealloc(p, layout) }
            }
        }
    }

    #[test]
    fn realloc_keeps_contents_and_alignment() {
        let a = Allocator;
        for align in [1, 8, 16, 64] {
            let layout = Layout::from_size_align(align, align).expect("valid layout");
            // SAFETY: non-zero size.
            let mut p = unsafe { a.alloc(layout) };
            let mut layout = layout;
            // SAFETY: `p` holds at least one byte.
            unsafe { p.write(0x42) };
            // Grow through odd and even sizes, then shrink.
            for new_size in
                [3, 24, 48, 1000, 1500, 4100, 70_000, 24, 1].map(|s: usize| s.max(1) * align)
            {
                // SAFETY: `p` was allocated with `layout`; non-zero size.
                p = unsafe { a.realloc(p, layout, new_size) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "realloc to {new_size}/{align}");
                // SAFETY: the first byte survives every realloc.
                assert_eq!(unsafe { p.read() }, 0x42);
                layout = Layout::from_size_align(new_size, align).expect("valid layout");
            }
            // SAFETY: allocated with `layout`, freed once.
            unsafe { a.dealloc(p, layout) }
        }
    }
}
