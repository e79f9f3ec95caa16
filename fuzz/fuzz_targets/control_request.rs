//! `protonode::control::parse_request`: every line on the daemon's control
//! socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protonode_fuzz::{checks, seeds};

fuzz_target!(init: seeds::write(seeds::control_request()), |data: &[u8]| {
    checks::control_request(data);
});
