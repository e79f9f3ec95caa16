//! A frame can claim any length it likes; decoding it must not believe it.
//!
//! This test binary counts every allocation (its own global allocator) and
//! checks that decoding small hostile frames never asks for a large block,
//! whatever sizes their length prefixes claim. It holds a single test so that
//! no other test allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use transports::{
    decode_batch, decode_response, Refusal, MAX_BATCH_ENVELOPES, MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
};

/// Records the largest single allocation while `MEASURING` is on.
struct CountingAllocator;

static MEASURING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if MEASURING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Largest single allocation made while running `f`.
fn largest_allocation_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    MEASURING.store(true, Ordering::SeqCst);
    let out = f();
    MEASURING.store(false, Ordering::SeqCst);
    (out, LARGEST.load(Ordering::SeqCst))
}

/// Postcard's varint of `n`.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The start of an envelope whose payload claims `claimed` bytes and carries
/// only a few.
fn envelope_claiming(claimed: u64) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION];
    out.extend_from_slice(&[7; 32]);
    out.extend(varint(claimed));
    out.extend_from_slice(b"tiny");
    out
}

/// Anything above this for a frame of a few dozen bytes would mean a claimed
/// length was believed.
const SMALL: usize = 4 * 1024;

#[test]
fn hostile_length_prefixes_do_not_allocate_what_they_claim() {
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "a batch claiming u64::MAX envelopes",
            varint(u64::MAX),
            true,
        ),
        (
            "a batch claiming the most envelopes allowed but holding one",
            [varint(MAX_BATCH_ENVELOPES as u64), envelope_claiming(4)].concat(),
            true,
        ),
        (
            "an envelope claiming a 2^62-byte payload",
            [varint(1), envelope_claiming(1 << 62)].concat(),
            true,
        ),
        (
            "an envelope claiming a payload just under the limit",
            [varint(1), envelope_claiming(MAX_PAYLOAD_BYTES as u64)].concat(),
            true,
        ),
        (
            "a response claiming u64::MAX receipts",
            [vec![0x00], varint(u64::MAX)].concat(),
            false,
        ),
        (
            "a response claiming the most receipts allowed but holding one",
            [vec![0x00], varint(MAX_BATCH_ENVELOPES as u64), vec![0x00]].concat(),
            false,
        ),
    ];
    for (story, frame, is_batch) in cases {
        let (refused, largest) = largest_allocation_of(|| {
            if is_batch {
                decode_batch(&frame).map(drop)
            } else {
                decode_response(&frame).map(drop)
            }
        });
        let err = refused.expect_err(story);
        assert_ne!(err.refusal(), Refusal::Unavailable, "{story}");
        assert!(
            largest <= SMALL,
            "{story}: a {}-byte frame made a {largest}-byte allocation",
            frame.len()
        );
    }
}
