//! The delivery protocol's stream framing, read from bytes in memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::seeds;

fuzz_target!(init: seeds::write(seeds::delivery_codec()), |data: &[u8]| {
    protonode_fuzz::delivery_codec(data);
});
