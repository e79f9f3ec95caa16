//! `Payload::decode` (every envelope's payload) and `Plaintext::decode`
//! (inside every MLS application message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

fuzz_target!(init: seeds::write(seeds::payload()), |data: &[u8]| {
    checks::payload(data);
});
