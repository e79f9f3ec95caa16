//! `transports::decode_batch` and `decode_response`: what every delivery
//! request and answer from a peer goes through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

fuzz_target!(init: seeds::write(seeds::envelope_batch()), |data: &[u8]| {
    checks::envelope_batch(data);
});
